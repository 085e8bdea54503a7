"""The study's report: OUT/report.html with matrix.png (and hybrid.png), from study.json.

The answer first, then every source's paired difference from popularity-first (all sources, each
with its interval, Holm p and denominator), the real metrics of sources and references, fidelity
and the matrix.
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from rlsim.report import CSS, POLICY_NAMES, fmt_cell, html_table, plt, save_png

REFERENCE_LABELS = {"popularity": "popularity-first", "random": "random (expectation)", "real_oracle": "real oracle",
                    "mf_top1": "explicit MF top-1", "bpr_top1": "implicit BPR top-1",
                    "reward_model_greedy": "reward-model greedy"}


def _names(result: dict) -> list[str]:
    return list(result.get("source_names") or result.get("sources") or [])


def plot_study(result: dict, path: Path) -> Path | None:
    """Left: the matrix, the mean rating each source (columns) gives the picks of the policy trained
    on each source (rows), on held-out users. Right: the real held-out hit rate of each policy and
    each reference with its 95% paired-bootstrap interval (seeds, then users)."""
    sources, matrix = _names(result), result.get("matrix") or {}
    if not sources or not matrix:
        return None
    m = np.array([[matrix[r].get(c) if matrix[r].get(c) is not None else np.nan for c in sources] for r in sources],
                 float)
    fig, axes = plt.subplots(1, 2, figsize=(14, 0.6 * len(sources) + 3.2), gridspec_kw={"width_ratios": [1.2, 1]})
    ax = axes[0]
    im = ax.imshow(m, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(sources)), sources, rotation=30, ha="right")
    ax.set_yticks(range(len(sources)), sources)
    ax.set_xlabel("judged by (simulated rating of the picks)")
    ax.set_ylabel("policy trained on")
    for i in range(len(sources)):
        for j in range(len(sources)):
            if np.isfinite(m[i, j]):
                ax.text(j, i, f"{m[i, j]:.3f}", ha="center", va="center",
                        color="white" if m[i, j] < np.nanmean(m) else "black", fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.04)
    ax.set_title("every policy judged by every simulator (held-out users)")
    ax = axes[1]
    blocks = {**(result.get("sources") if isinstance(result.get("sources"), dict) else {}),
              **(result.get("references") or {})}
    names = [n for n in blocks if (blocks[n].get("hit_rate") or {}).get("mean") is not None]
    vals = np.array([blocks[n]["hit_rate"]["mean"] for n in names], float)
    cis = [blocks[n]["hit_rate"].get("ci95") or [v, v] for n, v in zip(names, vals)]
    err = [[v - c[0] for v, c in zip(vals, cis)], [c[1] - v for v, c in zip(vals, cis)]]
    colors = ["#8da0cb" if n in sources else "#e5c494" if n == "popularity" else "#bbbbbb" for n in names]
    ax.barh(range(len(names)), vals, xerr=err, color=colors, capsize=3)
    ax.set_yticks(range(len(names)), [n if n in sources else REFERENCE_LABELS.get(n, n) for n in names])
    ax.invert_yaxis()
    for y, v in enumerate(vals):
        ax.text(v, y, f" {v:.3f}", va="center", fontsize=8)
    held = result.get("held_out") or {}
    ax.set_xlabel("real held-out hit rate of the first pick (95% paired bootstrap interval)")
    ax.set_title(f"real users ({held.get('users_per_seed', result.get('held_out_users'))} held-out users x "
                 f"{result.get('seeds')} seeds)")
    ax.grid(axis="x", alpha=0.3)
    return save_png(fig, path)


def plot_hybrid_curve(curve: list[dict], path: Path) -> Path | None:
    if not curve:
        return None
    pts = sorted(curve, key=lambda c: c["calls_saved"])
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot([c["calls_saved"] for c in pts], [c["real_hit_rate"] for c in pts], "o-", color="#8da0cb")
    for c in pts:
        ax.annotate(f"t={c['threshold']:g}", (c["calls_saved"], c["real_hit_rate"]), fontsize=8,
                    textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel("persona calls saved vs persona-only")
    ax.set_ylabel("real held-out hit rate")
    ax.set_title("hybrid reward: persona calls saved vs real quality")
    ax.grid(alpha=0.3)
    return save_png(fig, path)


def _ci(c) -> str | None:
    return None if not c else f"{c[0]:+.4f} .. {c[1]:+.4f}"


def _metric_rows(blocks: dict, label) -> list[dict]:
    rows = []
    for n, b in blocks.items():
        row = {"name": label(n)}
        for m in ("hit_rate", "watch_rate", "ndcg"):
            s = b.get(m) or {}
            row[m], row[f"{m}_ci95"], row[f"{m}_users"] = s.get("mean"), _ci(s.get("ci95")), s.get("n_users")
        row["coverage"] = (b.get("coverage") or {}).get("mean")
        rows.append(row)
    return rows


def write_study_report(result: dict, out: str | Path, hybrid: dict | None = None) -> Path:
    """OUT/report.html for `rlsim study`: the answer first, then the paired differences from
    popularity-first, real metrics with denominators, fidelity, the matrix."""
    out = Path(out)
    held = result.get("held_out") or {}
    parts = [f"<h1>rlsim study: {fmt_cell(result.get('dataset'))} / {fmt_cell(result.get('split'))}</h1>",
             f"<h2>The answer</h2><p>{html.escape(str(result.get('answer', '')))}</p>",
             f"<p class='note'>{fmt_cell(result.get('seeds'))} seeds, {fmt_cell(result.get('env_steps_per_policy'))} env "
             f"steps per policy, judged on {fmt_cell(result.get('held_out_users'))} held-out users per seed, drawn among "
             f"the {fmt_cell(held.get('eligible_users'))} of {fmt_cell(held.get('env_users'))} users with held-out "
             "behaviour; every oracle drawn from a simulator is labelled as such.</p>"]
    srcs = result.get("sources") if isinstance(result.get("sources"), dict) else {}
    refs = result.get("references") or {}
    vs = [{"name": n, **{k: b[key].get(k) for k in ("mean", "p", "p_holm", "verdict", "n_users", "n_seeds")},
           "ci95": _ci(b[key].get("ci95")), "family": fam}
          for fam, blocks in (("sources", srcs), ("references", refs))
          for n, b in blocks.items() for key in ["vs_popularity"] if b.get(key)]
    if vs:
        boot = result.get("bootstrap") or {}
        parts.append("<h2>Real hit rate minus popularity-first's (paired, every source)</h2>"
                     f"<p class='note'>Two-level paired bootstrap ({fmt_cell(boot.get('replicates'))} replicates: seeds, "
                     "then held-out users within each; the same resamples for every strategy). p: "
                     f"{html.escape(str(boot.get('p_value', '')))}; p_holm: Holm over all sources (references are "
                     "their own family). n_users: held-out users per seed; n_seeds: seeds.</p>"
                     + html_table(vs, ["mean", "ci95", "p", "p_holm", "verdict", "n_users", "n_seeds", "family"]))
    hyb = result.get("hybrid_vs_ends")
    if hyb and hyb.get("vs"):
        rows = [{"name": f"hybrid minus {e}", "mean": v["mean"], "ci95": _ci(v["ci95"]), "p_holm": v.get("p_holm")}
                for e, v in hyb["vs"].items()]
        parts.append(f"<h3>Hybrid against both ends: {'better' if hyb.get('better') else 'not better'}</h3>"
                     + html_table(rows, ["mean", "ci95", "p_holm"]))
    corr = result.get("fidelity_vs_real_spearman") or {}
    rows = [{"name": m, "spearman": c.get("spearman"), "ci95": _ci(c.get("ci95")),
             "left_out (coverage)": ", ".join(f"{n} ({v:.3f})" for n, v in
                                              (c.get("excluded_low_coverage") or {}).items())}
            for m, c in corr.items()]
    parts.append("<h3>Fidelity vs real performance (Spearman across sources)</h3>"
                 "<p class='note'>Each fidelity measure is signed so that higher means more faithful; the real "
                 "side is the policy's held-out hit rate; the interval uses the same paired resamples. A source "
                 "that answered fewer test pairs than the study's min_fidelity_coverage is left out (its NLL "
                 "covers only the pairs it answered).</p>"
                 + html_table(rows, ["spearman", "ci95", "left_out (coverage)"]))
    dens = result.get("metric_denominators") or {}
    parts.append("<h2>Real held-out behaviour</h2><p class='note'>"
                 + "; ".join(f"{html.escape(k)}: over {html.escape(v)}" for k, v in dens.items()) + ".</p>"
                 + html_table(_metric_rows(srcs, lambda n: f"policy trained on {n}")
                              + _metric_rows(refs, lambda n: REFERENCE_LABELS.get(n, POLICY_NAMES.get(n, n))),
                              ["hit_rate", "hit_rate_ci95", "hit_rate_users", "watch_rate", "watch_rate_ci95",
                               "ndcg", "ndcg_ci95", "ndcg_users", "coverage"]))
    fid = result.get("fidelity") or {}
    parts.append("<h2>Fidelity of each source (test split)</h2><p class='note'>coverage: answered / asked test "
                 "pairs; RMSE and NLL are over the answered ones.</p>" + html_table(
        [{"name": n, **f} for n, f in fid.items()],
        ["method", "coverage", "rmse", "nll", "tv_sampled", "five_star_share", "real_five_star_share",
         "like_acc_1to1", "like_acc_1to3", "like_acc_1to9", "session_nll_gain"]))
    ref = (result.get("choice_reference") or {}).get("popularity")
    rows = [{"name": n, **(f.get("choice") or {})} for n, f in fid.items() if f.get("choice")]
    if ref and rows:
        parts.append("<h3>Would they watch it? Choice fidelity</h3><p class='note'>A held-out watched movie among "
                     "1, 3 or 9 never-rated ones: the share of trials where the source ranks it first, and AUC / F1 "
                     "at 1:9, beside popularity's picks in the same trials (the reference to beat).</p>"
                     + html_table(rows + [{"name": "popularity (reference)", **ref}],
                                  ["auc", "acc_1to1", "acc_1to3", "acc_1to9", "f1_1to9", "trials_1to9"]))
    acc = result.get("reward_accounting") or {}
    if acc:
        parts.append("<h3>Training rewards asked of each source</h3><p class='note'>A failed reward (the source "
                     "could not answer) earns the user's mean; training stops past policy.max_failed_share.</p>"
                     + html_table([{"name": n, **a, "failed_by_reason": ", ".join(f"{k}: {v}" for k, v in
                                                                                 (a.get("failed_by_reason") or {}).items())}
                                   for n, a in acc.items()], ["asked", "answered", "failed", "failed_by_reason"]))
    img = out / "matrix.png"
    if plot_study(result, img):
        parts.append(f"<h2>Every policy judged by every source, and by real users</h2><img src='{img.name}'>")
    if hybrid and hybrid.get("curve"):
        img = out / "hybrid.png"
        plot_hybrid_curve(hybrid["curve"], img)
        rows = [{"name": f"threshold {c['threshold']:g}", **c,
                 "beats_both_ends": None if c.get("beats_both_ends") is None else c["beats_both_ends"].get("better")}
                for c in hybrid["curve"]]
        parts.append(f"<h2>Hybrid reward: persona calls saved</h2><img src='{img.name}'>" + html_table(
            rows, ["calls_saved", "persona_calls", "real_hit_rate", "beats_both_ends", "nll", "rmse"]))
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>rlsim study</title><style>{CSS}</style>"
            f"</head><body>{''.join(parts)}</body></html>\n")
    path = out / "report.html"
    path.write_text(page)
    return path
