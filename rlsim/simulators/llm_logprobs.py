"""Reading distributions from an answer's token logprobs (OpenAI's logprobs.content)."""

from __future__ import annotations

import math
import re

import numpy as np


def is_integer_scale(scale) -> bool:
    return float(scale.step).is_integer() and float(scale.min).is_integer()


def _number(token: str) -> float | None:
    t = str(token).strip().strip('",}]:').strip()
    try:
        x = float(t)
    except ValueError:
        return None
    return x if math.isfinite(x) else None


def logprob_distributions(tokens: list, item_ids: list[int], scale) -> tuple[dict[int, np.ndarray], dict[int, str]]:
    """{item: distribution} read at each rating's token of a JSON answer, and {item: why not}.

    tokens: [[token, logprob, [[alternative, logprob], ...]], ...] of one completion. The answer is
    the tokens' concatenation; each "<id>": <value> is located in it and the token that starts the
    value gives the distribution: exp(logprob) of each alternative that is a rating value on the
    scale, renormalised (alternatives that are not rating values are dropped). A token whose
    alternatives hold fewer than two rating values (none, or the token alone) carries no distribution,
    only the answer: that item is "point_mass_logprobs", never a one-hot row labelled logprobs."""
    text = "".join(str(t[0]) for t in tokens)
    starts = np.cumsum([0] + [len(str(t[0])) for t in tokens])
    want = {int(i) for i in item_ids}
    out: dict[int, np.ndarray] = {}
    why: dict[int, str] = {}
    for m in re.finditer(r'"?(\d+)"?\s*:\s*"?(-?\d+(?:\.\d+)?)', text):
        iid = int(m.group(1))
        if iid not in want or iid in out:
            continue
        pos = m.start(2)
        j = int(np.searchsorted(starts, pos, side="right") - 1)
        if j < 0 or j >= len(tokens):
            why[iid] = "no_logprobs"
            continue
        alts = tokens[j][2] if len(tokens[j]) > 2 else []
        p = np.zeros(scale.n_classes)
        for a, alp in alts:
            x = _number(a)
            if x is None or x < scale.min or x > scale.max or float(scale.round(x)) != x:
                continue
            p[int(scale.to_class(x))] += math.exp(float(alp))
        if (p > 0).sum() < 2:
            why[iid] = "point_mass_logprobs"
            continue
        out[iid] = p / p.sum()
    for i in want - set(out):
        why.setdefault(i, "no_logprobs")
    return out, why

