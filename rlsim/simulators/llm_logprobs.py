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



def _watch_word(token: str) -> str | None:
    """'yes' or 'no' for a token that starts one of them ("yes", ' "y', "No"), else None."""
    t = str(token).strip().strip('"').strip().lower()
    if not t:
        return None
    return "yes" if "yes".startswith(t) else ("no" if "no".startswith(t) else None)


def watch_probabilities(tokens: list, item_ids: list[int]) -> tuple[dict[int, float], dict[int, str]]:
    """{item: P(yes)} read at each answer's token of a page-choice JSON answer ({"<id>": "yes"|"no"}),
    and {item: why not}: exp(logprob) of the alternatives that start "yes" or "no", renormalised over
    those two. A token whose alternatives hold only one of them is "point_mass_logprobs"."""
    text = "".join(str(t[0]) for t in tokens)
    starts = np.cumsum([0] + [len(str(t[0])) for t in tokens])
    want = {int(i) for i in item_ids}
    out: dict[int, float] = {}
    why: dict[int, str] = {}
    for m in re.finditer(r'"?(\d+)"?\s*:\s*"?(yes|no)', text, re.I):
        iid = int(m.group(1))
        if iid not in want or iid in out:
            continue
        j = int(np.searchsorted(starts, m.start(2), side="right") - 1)
        if j < 0 or j >= len(tokens):
            why[iid] = "no_logprobs"
            continue
        mass = {"yes": 0.0, "no": 0.0}
        for a, alp in (tokens[j][2] if len(tokens[j]) > 2 else []):
            w = _watch_word(a)
            if w is not None:
                mass[w] += math.exp(float(alp))
        if min(mass.values()) <= 0:
            why[iid] = "point_mass_logprobs"
            continue
        out[iid] = mass["yes"] / (mass["yes"] + mass["no"])
    for i in want - set(out):
        why.setdefault(i, "no_logprobs")
    return out, why
