"""The study's real-behaviour side: reference strategies, per-user outcomes, and their summary.

Every policy and every reference is judged on the same held-out users of a seed (drawn only among
users with held-out behaviour) and the same candidates. Per user and seed:
- ``hit``: the first pick has a held-out rating >= the like threshold (watched and liked);
- ``watched``: the first pick has any held-out rating;
- ``ndcg``: NDCG@k of the top-k slate the strategy makes of all valid candidates, gain = held-out
  rating (NaN, so outside the denominator, for a user with no held-out-rated candidate).
Coverage is per seed: distinct items picked over distinct valid candidate items of those users.
References: popularity-first, random (its expectation), the real oracle, explicit MF top-1
(rlsim.baselines), implicit BPR top-1 (rlsim.bpr, settings chosen on a training validation slice),
and the reward model's greedy pick when a checkpoint is known. The hybrid curve's middle thresholds
are judged against both of its ends (persona-only, reward-model-only) the same way.
"""

from __future__ import annotations

import numpy as np

from rlsim.study_stats import (beats_both, bootstrap_indices, paired_spearman, paired_vs, point, replicate_means,
                               summarize)

METRICS = {"hit_rate": "hit", "watch_rate": "watched", "ndcg": "ndcg"}
DENOMINATORS = {
    "hit_rate": "held-out users per seed (all of them: every one has held-out behaviour)",
    "watch_rate": "held-out users per seed",
    "ndcg": "held-out users per seed with at least one held-out-rated candidate",
    "coverage": "distinct valid candidate items of the seed's held-out users"}
REFERENCES = ("popularity", "random", "real_oracle", "mf_top1", "bpr_top1", "reward_model_greedy")


def reference_scores(data, train, scale, seed: int, reward_table: np.ndarray | None = None,
                     bpr_grid: list | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """[U, K] scores of every env user's candidates for each scored reference (fitted on the
    training ratings only), and how BPR's settings were chosen."""
    from rlsim.baselines import MatrixFactorization
    from rlsim.bpr import select_bpr

    users = np.broadcast_to(data.user_ids[:, None], data.cand_items.shape)
    mf = MatrixFactorization(seed=seed).fit(train, scale)
    bpr, chosen = select_bpr(train, bpr_grid or None, seed=seed)
    out = {"popularity": data.pop_score.astype(float),
           "mf_top1": mf.predict(users.ravel(), data.cand_items.ravel()).reshape(users.shape),
           "bpr_top1": bpr.score(users, data.cand_items)}
    if reward_table is not None:
        out["reward_model_greedy"] = np.asarray(reward_table, float)
    return out, {"bpr": chosen}


def strategy_outcomes(sub, real: np.ndarray, scores: np.ndarray, like: float, k: int,
                      mask: np.ndarray | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """Per-user hit / watched / ndcg of the strategy whose first pick is the argmax of ``scores``
    over ``mask`` (default: valid candidates with a finite score), and its coverage."""
    from rlsim.policy.evaluate import argmax_masked, coverage, pick_outcomes, slate_ndcg

    scores = np.asarray(scores, float)
    mask = sub.cand_valid & np.isfinite(scores) if mask is None else mask
    picks = argmax_masked(scores, mask)
    o = pick_outcomes(sub, real, picks, like, mask)
    o["ndcg"] = slate_ndcg(sub, real, np.where(mask, scores, -np.inf), k)
    return o, coverage(sub, picks)


def references_for_users(sub, real: np.ndarray, scores: dict[str, np.ndarray], like: float,
                         k: int) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, dict]]:
    """Every reference's per-user outcomes on these users (``scores`` already cut to them)."""
    from rlsim.policy.evaluate import random_outcomes

    outs, cov = {}, {}
    for name, sc in {**scores, "real_oracle": np.nan_to_num(real, nan=-np.inf)}.items():
        mask = sub.cand_valid if name == "real_oracle" else None
        outs[name], cov[name] = strategy_outcomes(sub, real, sc, like, k, mask)
    outs["random"] = random_outcomes(sub, real, like, k)
    cov["random"] = None  # a uniform pick has no single slate
    return outs, cov


def summarize_outcomes(outcomes: dict[str, dict[str, np.ndarray]], coverage: dict[str, list],
                       sources: list[str], fidelity: dict[str, dict[str, float]], measures: dict[str, int],
                       n_boot: int, seed: int) -> dict:
    """The study's real-behaviour result from per-user outcomes [seed, user] of every strategy.

    ``outcomes[metric][name]``; sources and references share the bootstrap's indices, so every
    difference is paired. Sources form one Holm family per metric, references another."""
    hit = outcomes["hit"]
    S, U = np.asarray(hit[sources[0]]).shape
    idx = bootstrap_indices(S, U, n_boot, seed)
    refs = [r for r in REFERENCES if r in hit]

    def block(name: str) -> dict:
        b = {m: summarize(outcomes[key][name], idx) for m, key in METRICS.items()}
        cv = [c["coverage"] for c in coverage.get(name) or [] if c]
        b["coverage"] = {"mean": float(np.mean(cv)) if cv else None, "per_seed": cv} if cv else None
        return b

    result = {"sources": {n: block(n) for n in sources}, "references": {n: block(n) for n in refs}}
    for metric, key in METRICS.items():
        suffix = "" if metric == "hit_rate" else f"_{metric}"
        for family, names in (("sources", sources), ("references", [r for r in refs if r != "popularity"])):
            for n, row in paired_vs(outcomes[key], "popularity", names, idx).items():
                result[family][n][f"vs_popularity{suffix}"] = row
    # The bar beside popularity: implicit MF's top-1 (BPR) on the same users; "ties" = its interval holds 0.
    if "bpr_top1" in hit:
        for n, row in paired_vs(hit, "bpr_top1", sources, idx).items():
            result["sources"][n]["vs_bpr_top1"] = row
    result["fidelity_vs_real_spearman"] = {
        m: paired_spearman({n: sign * fidelity[n][m] for n in sources if fidelity.get(n, {}).get(m) is not None},
                           {n: hit[n] for n in sources}, idx) for m, sign in measures.items()}
    short = [n for n in sources if result["sources"][n]["vs_popularity"]["verdict"] != "better"]
    result["shortfall"] = shortfall(outcomes, short, idx) if short and "popularity" in hit else None
    if "hybrid" in sources:
        result["hybrid_vs_ends"] = {"ends": ["offline_persona", "reward_model"], "metric": "hit_rate",
                                    **beats_both(hit, "hybrid", ["offline_persona", "reward_model"], idx)}
    result["metric_denominators"] = DENOMINATORS
    result["bootstrap"] = {"replicates": n_boot, "seed": seed, "levels": "seeds, then held-out users within each",
                           "p_value": "two-sided bootstrap: 2 x the smaller share of replicates on either side of 0",
                           "correction": "Holm over all sources (and separately over the references), per metric"}
    return result


def shortfall(outcomes: dict[str, dict[str, np.ndarray]], names: list[str], idx) -> dict:
    """Which question a policy that does not beat popularity-first gets wrong. hit = watched x liked
    when watched, so its hit-rate gap to popularity (H - Hp) splits exactly into a choice part, watched
    less often at popularity's like share ((W - Wp) Hp / Wp), and a rating part, liked less often when
    watched (H - W Hp / Wp). Point values and paired bootstrap intervals (the same replicates as
    every other interval); ``question`` names the part that costs the most over these policies."""
    hit, watched = outcomes["hit"], outcomes["watched"]

    def parts(h, w, hp, wp):
        share = hp / np.where(wp > 0, wp, np.nan)
        return (w - wp) * share, h - w * share

    base = (replicate_means(hit["popularity"], idx), replicate_means(watched["popularity"], idx))
    rows = {}
    for n in names:
        pc, pr = parts(point(hit[n]), point(watched[n]), point(hit["popularity"]), point(watched["popularity"]))
        bc, br = parts(replicate_means(hit[n], idx), replicate_means(watched[n], idx), *base)
        rows[n] = {"choice": _finite(pc), "rating": _finite(pr), "choice_ci95": _percentiles(bc),
                   "rating_ci95": _percentiles(br)}
    total = {k: sum(r[k] or 0.0 for r in rows.values()) for k in ("choice", "rating")}
    return {"sources": rows, "question": "choice" if total["choice"] <= total["rating"] else "rating",
            "definition": "hit-rate gap to popularity-first = choice part (W - Wp) Hp/Wp + rating part H - W Hp/Wp"}


def _finite(v: float) -> float | None:
    return float(v) if np.isfinite(v) else None


def _percentiles(boots: np.ndarray) -> list[float] | None:
    ok = boots[np.isfinite(boots)]
    return [float(np.percentile(ok, 2.5)), float(np.percentile(ok, 97.5))] if len(ok) else None


QUESTIONS = {"choice": "which movie the user watches next (their picks are watched less often than "
                       "popularity-first's)",
             "rating": "whether the user likes what they watch (their watched picks are liked less often)"}


def shortfall_text(short: dict | None) -> str:
    if not short:
        return ""
    rows = "; ".join(f"{n} {r['choice']:+.3f} choice, {r['rating']:+.3f} rating" for n, r in short["sources"].items()
                     if r["choice"] is not None and r["rating"] is not None)
    return (f" Where a policy does not beat popularity-first, its hit-rate gap splits into a choice and a rating "
            f"part ({rows}): the simulated users get wrong {QUESTIONS[short['question']]}.")


def answer(summary: dict, sources: list[str], held: dict) -> str:
    """One paragraph from every source's paired difference from popularity-first (no best-of)."""
    parts = []
    for n in sources:
        v = summary["sources"][n]["vs_popularity"]
        ci = v["ci95"]
        parts.append(f"{n} {v['mean']:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}], Holm p={v['p_holm']:.3f}"
                     if v["mean"] is not None and ci and v["p_holm"] is not None else f"{n} undetermined")
    verdicts = [summary["sources"][n]["vs_popularity"]["verdict"] for n in sources]
    better = [n for n, v in zip(sources, verdicts) if v == "better"]
    worse = [n for n, v in zip(sources, verdicts) if v == "worse"]
    head = (f"On {held['users_per_seed']} held-out users per seed (drawn among the {held['eligible_users']} users "
            f"with held-out ratings), {held['seeds']} seeds, the real hit rate of each policy minus "
            f"popularity-first's (paired, 95% interval): " + "; ".join(parts) + ". ")
    verdict = (("Policies that beat popularity-first after Holm correction: " + ", ".join(better) + ". ")
               if better else "No policy beats popularity-first after Holm correction. ")
    if worse:
        verdict += "Significantly worse: " + ", ".join(worse) + ". "
    vs_bpr = {n: summary["sources"][n].get("vs_bpr_top1") for n in sources}
    if any(vs_bpr.values()):
        v = {n: r["verdict"] for n, r in vs_bpr.items() if r}
        tie_or_better = [n for n in better if v.get(n) in ("better", "no detectable difference")]
        verdict += ("Against implicit MF's top-1 (BPR, Holm over sources): "
                    + "; ".join(f"{n} {r['mean']:+.3f} [{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}]"
                                for n, r in vs_bpr.items() if r and r["mean"] is not None and r["ci95"])
                    + (". Beat popularity-first and at least tie BPR: " + ", ".join(tie_or_better) + ". "
                       if tie_or_better else ". No policy both beats popularity-first and ties BPR. "))
    c = summary["fidelity_vs_real_spearman"].get("nll") or {}
    if c.get("spearman") is None:
        corr = "Too few sources to correlate fidelity with real performance."
    else:
        ci = c.get("ci95")
        corr = (f"Spearman between fidelity (lower NLL) and the real hit rate across sources is {c['spearman']:+.2f}"
                + (f" (paired bootstrap interval {ci[0]:+.2f} to {ci[1]:+.2f})." if ci else "."))
    hyb = summary.get("hybrid_vs_ends")
    if hyb and hyb.get("better") is not None:
        corr += (" The hybrid " + ("beats" if hyb["better"] else "does not beat")
                 + " both persona-only and reward-model-only with paired intervals.")
    return head + verdict + corr + shortfall_text(summary.get("shortfall"))


def curve_ends(curve: list[dict]) -> tuple[float, float] | None:
    """(persona-only threshold 0, reward-model-only: the largest threshold >= 1, which never asks)."""
    ths = [c["threshold"] for c in curve]
    top = max(ths, default=0.0)
    return (0.0, top) if 0.0 in ths and top >= 1.0 else None


def curve_vs_ends(per_user: dict[float, list], ends, n_boot: int, seed: int) -> dict:
    """Per middle threshold: its paired real-hit-rate differences from both ends and whether it
    beats both (rlsim.study_stats.beats_both); the same held-out users per seed at every threshold."""
    if ends is None:
        return {}
    arrays = {th: np.stack(v) for th, v in per_user.items()}
    S, U = arrays[ends[0]].shape
    idx = bootstrap_indices(S, U, n_boot, seed)
    return {th: beats_both(arrays, th, list(ends), idx) for th in arrays if th not in ends}
