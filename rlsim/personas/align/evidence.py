"""What the reflection prompt shows a persona of its own answers (errors, per-genre bias, wrong pair
choices and what-ifs), and one record per question (answers.parquet)."""

from __future__ import annotations

import numpy as np

from rlsim.data.schema import RatingScale, genre_list
from rlsim.personas import prompts as P
from rlsim.personas.align.config import MAX_SHOWN_ERRORS
from rlsim.personas.align.plan import item_of


def evidence_of(p: dict, ns: dict[int, float], pairs: dict[str, str], wi: dict[int, float], rows,
                scale: RatingScale) -> tuple[dict, list[dict]]:
    """What the reflection prompt shows, and one record per question (answers.parquet)."""
    recs = []
    lab = lambda i: P.movie_label(item_of(rows, i))  # noqa: E731
    errs = []  # (item, guess, real)
    for c in p["chunks"]:
        for i in c["items"]:
            g = ns.get(i)
            recs.append({"step": "next_state", "key": c["key"], "item_id": i, "other_item_id": -1,
                         "real": c["real"][i], "guess": np.nan if g is None else g, "choice": "",
                         "correct": None if g is None else bool(g == c["real"][i])})
            if g is not None:
                errs.append((i, g, c["real"][i]))
    wrong_pairs, n_pairs = [], 0
    for q in p["pairs"]:
        ch = pairs.get(q["key"], "")
        right = "A" if q["ra"] > q["rb"] else "B"
        recs.append({"step": "pair", "key": q["key"], "item_id": q["a"], "other_item_id": q["b"],
                     "real": q["ra"] - q["rb"], "guess": np.nan, "choice": ch,
                     "correct": None if not ch else ch == right})
        if ch:
            n_pairs += 1
            if ch != right:
                a, b, ra, rb = (q["a"], q["b"], q["ra"], q["rb"]) if ch == "A" else (q["b"], q["a"], q["rb"], q["ra"])
                wrong_pairs.append((lab(a), lab(b), ra, rb))
    wrong_wi = []
    for w in p["whatif"]:
        g = wi.get(w["instead"])
        recs.append({"step": "whatif", "key": f"w{w['shown'][0]}", "item_id": w["instead"],
                     "other_item_id": w["shown"][0], "real": w["real"], "guess": np.nan if g is None else g,
                     "choice": "", "correct": None if g is None else bool(g == w["real"])})
        if g is not None:
            errs.append((w["instead"], g, w["real"]))
            if g != w["real"]:
                wrong_wi.append((lab(w["instead"]), lab(w["shown"][0]), g, w["real"]))
    ns_err = [(i, g, r) for c in p["chunks"] for i in c["items"] for g, r in [(ns.get(i), c["real"][i])]
              if g is not None]
    d = np.array([g - r for _, g, r in ns_err], float)
    wrong = sorted([e for e in ns_err if e[1] != e[2]], key=lambda e: -abs(e[1] - e[2]))[:MAX_SHOWN_ERRORS]
    order = {i: k for k, (i, _, _) in enumerate(ns_err)}
    wrong.sort(key=lambda e: order[e[0]])  # in time order
    by_genre: dict[str, list[float]] = {}
    for i, g, r in errs:
        for gen in genre_list(item_of(rows, i)["genres"]):
            by_genre.setdefault(gen, []).append(g - r)
    genres = sorted(((k, float(np.mean(v)), len(v)) for k, v in by_genre.items() if len(v) >= 2),
                    key=lambda x: (-abs(x[1]), x[0]))[:5]
    ev = {"predictions": [(lab(i), g, r) for i, g, r in wrong], "n_predictions": int(len(d)),
          "exact": int(np.sum(d == 0)), "bias": float(d.mean()) if len(d) else 0.0,
          "mae": float(np.abs(d).mean()) if len(d) else 0.0, "genres": genres, "pairs": wrong_pairs,
          "n_pairs": n_pairs, "pairs_right": n_pairs - len(wrong_pairs), "whatif": wrong_wi}
    return ev, recs


def evidence_summary(ev: dict) -> dict:
    return {"n_predictions": ev["n_predictions"], "exact": ev["exact"], "bias": ev["bias"], "mae": ev["mae"],
            "n_pairs": ev["n_pairs"], "pairs_right": ev["pairs_right"], "whatif_wrong": len(ev["whatif"])}
