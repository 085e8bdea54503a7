"""The numbers of an alignment run: the dry run's estimate, fidelity before and after, usage per user,
and how the persona did on its own demonstrations."""

from __future__ import annotations

import numpy as np
import pandas as pd

from rlsim.data.schema import RatingScale
from rlsim.personas import prompts as P
from rlsim.personas.align.config import LESSON_COMPLETION, PAIR_COMPLETION, AlignConfig
from rlsim.personas.align.evidence import evidence_of
from rlsim.personas.align.plan import ns_messages, pair_messages, whatif_messages
from rlsim.personas.usage import completion_estimate


def estimate_align(plans: dict[int, dict], profiles: dict[int, str], current: dict[int, list[str]],
                   acfg: AlignConfig, rows, scale: RatingScale, cfg) -> dict:
    """Requests, tokens and dollars of the alignment requests, every answer usable at the first try; the
    reflection is estimated at its largest (every prediction, pair and what-if wrong)."""
    from rlsim.personas.cost import cost_usd
    from rlsim.personas.prompts import messages_tokens

    req = p_tok = c_tok = 0
    for u, p in plans.items():
        prof = P.profile_with_lessons(profiles.get(u, "A movie viewer."), current.get(u, []))
        msgs = ns_messages(p, prof, rows, scale)
        req += len(msgs)
        p_tok += sum(messages_tokens(m) for m in msgs)
        c_tok += sum(completion_estimate(len(c["items"])) for c in p["chunks"])
        if p["pairs"]:
            req += 1
            p_tok += messages_tokens(pair_messages(p, prof, rows, scale))
            c_tok += 4 + PAIR_COMPLETION * len(p["pairs"])
        if p["whatif"]:
            req += 1
            p_tok += messages_tokens(whatif_messages(p, prof, rows, scale))
            c_tok += completion_estimate(len(p["whatif"]))
        lo, hi = scale.min, scale.max
        worst = {i: (r + scale.step if r + scale.step <= hi else r - scale.step)
                 for c in p["chunks"] for i, r in c["real"].items()}
        wi = {w["instead"]: (w["real"] + scale.step if w["real"] + scale.step <= hi else
                             max(lo, w["real"] - scale.step)) for w in p["whatif"]}
        wrong = {q["key"]: ("B" if q["ra"] > q["rb"] else "A") for q in p["pairs"]}
        ev, _ = evidence_of(p, worst, wrong, wi, rows, scale)
        req += 1
        p_tok += messages_tokens(P.reflection_messages(u, prof, ev, acfg.max_lessons, scale, current.get(u) or None))
        c_tok += 8 + LESSON_COMPLETION * acfg.max_lessons
    n = max(1, len(plans))
    return {"users": len(plans), "requests": req, "prompt_tokens": p_tok, "completion_tokens": c_tok,
            "cost_usd": cost_usd(cfg.prices, cfg.model, p_tok, c_tok), "requests_per_user": req / n,
            "tokens_per_user": (p_tok + c_tok) / n}


def fidelity_subset(df: pd.DataFrame, scale: RatingScale, col: str) -> dict:
    """RMSE, MAE, exact, off_by_1, within_1, close match, per-user Spearman and the mean signed error."""
    from rlsim.personas.evaluate import fidelity_metrics

    if not len(df):
        return {"n": 0}
    m = fidelity_metrics(df[["user_id", "item_id", "rating", col]].rename(columns={col: "predicted"}), scale)
    out = {k: m[k] for k in ("n", "rmse", "mae", "exact", "off_by_1", "within_1", "close_match",
                             "spearman_per_user") if k in m}
    out["mean_signed_error"] = float(np.mean(df[col].to_numpy(float) - df["rating"].to_numpy(float)))
    return out


def describe_counts(counts: list[int]) -> dict:
    if not counts:
        return {"mean": None, "min": None, "max": None, "histogram": {}}
    c = np.asarray(counts, int)
    return {"mean": float(c.mean()), "min": int(c.min()), "max": int(c.max()),
            "histogram": {str(k): int(v) for k, v in zip(*np.unique(c, return_counts=True))}}


def per_user(usage: dict, n: int) -> dict:
    n = max(1, n)
    tok = usage.get("prompt_tokens", 0) + usage.get("completion_tokens", 0)
    return {"requests": usage.get("requests", 0) / n, "cached_requests": usage.get("cached_requests", 0) / n,
            "prompt_tokens": usage.get("prompt_tokens", 0) / n,
            "completion_tokens": usage.get("completion_tokens", 0) / n, "tokens": tok / n,
            "cost_usd": usage.get("cost_usd", 0.0) / n}


def answer_summary(answers: pd.DataFrame) -> dict:
    """How the persona did on its own demonstrations (before it wrote lessons)."""
    out = {}
    for step in ("next_state", "whatif"):
        a = answers[(answers["step"] == step) & answers["guess"].notna()]
        d = a["guess"].to_numpy(float) - a["real"].to_numpy(float)
        out[step] = {"answered": int(len(a)), "asked": int((answers["step"] == step).sum()),
                     "mae": float(np.abs(d).mean()) if len(d) else None,
                     "mean_signed_error": float(d.mean()) if len(d) else None,
                     "exact": float(np.mean(d == 0)) if len(d) else None}
    pa = answers[(answers["step"] == "pair") & (answers["choice"] != "")]
    out["pairs"] = {"answered": int(len(pa)), "asked": int((answers["step"] == "pair").sum()),
                    "accuracy": float(pa["correct"].astype(bool).mean()) if len(pa) else None}
    return out
