"""The run report: PNG figures (matplotlib, Agg) and one HTML page next to them.

Works from the pipeline's metrics.json summary plus the evaluation's per-user table, so it can
be re-rendered from a finished run (`write_report(read_json(OUT/metrics.json), OUT, per_user)`).
Every table of model numbers carries the baseline gate rows beside it.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from rlsim.plots import save_png  # noqa: E402

# off_by_1 = exactly one point off, within_1 = at most one point off (rlsim.metrics).
GATE_COLUMNS = ["rmse", "mae", "exact", "off_by_1", "within_1", "ndcg@10", "ndcg_floor@10"]
SIDE_COLORS = {"train": "#8da0cb", "test": "#fc8d62"}


def fmt_cell(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return "nan" if np.isnan(v) else f"{v:.4f}"
    return html.escape(str(v))


def html_table(rows: list[dict], columns: list[str], first: str = "name", highlight: set[str] | None = None) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in [first, *columns])
    body = []
    for r in rows:
        cls = ' class="model"' if highlight and r.get(first) in highlight else ""
        cells = "".join(f"<td>{fmt_cell(r.get(c))}</td>" for c in columns)
        body.append(f"<tr{cls}><td>{fmt_cell(r.get(first))}</td>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def gate_rows(models: dict[str, dict], baselines: dict[str, dict], k: int = 10) -> list[dict]:
    """Model rows first, then the baselines, on the same columns (the gate's NDCG is always @10)."""
    rows = []
    for name, m in models.items():
        rows.append({"name": name, **m})
    for name, m in baselines.items():
        rows.append({"name": f"baseline: {name}", **m})
    return rows


# --------------------------------------------------------------------------- figures

def plot_per_user(per_user: pd.DataFrame, k: int, path: Path) -> Path | None:
    if per_user is None or per_user.empty:
        return None
    models = list(dict.fromkeys(per_user["model"]))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric in zip(axes, ["accuracy", f"ndcg@{k}"]):
        data, pos, colors = [], [], []
        for i, m in enumerate(models):
            for j, side in enumerate(["train", "test"]):
                v = per_user[(per_user.model == m) & (per_user.side == side)][metric].dropna().to_numpy()
                data.append(v if len(v) else np.array([np.nan]))
                pos.append(i * 3 + j)
                colors.append(SIDE_COLORS[side])
        bp = ax.boxplot(data, positions=pos, widths=0.8, patch_artist=True, showfliers=False,
                        medianprops={"color": "black"})
        for patch, c in zip(bp["boxes"], colors):
            patch.set_facecolor(c)
        ax.set_xticks([i * 3 + 0.5 for i in range(len(models))], models)
        ax.set_title(f"per-user {metric}")
        ax.grid(axis="y", alpha=0.3)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in SIDE_COLORS.values()]
    axes[1].legend(handles, ["train", "test"], loc="lower right")
    return save_png(fig, path)


def plot_gini(per_user: pd.DataFrame, path: Path) -> Path | None:
    if per_user is None or per_user.empty or "gini" not in per_user:
        return None
    users = per_user.drop_duplicates("user_id")
    model = per_user["model"].iloc[0]
    test = per_user[(per_user.model == model) & (per_user.side == "test")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].hist(users["gini"].dropna(), bins=20, color="#66c2a5", edgecolor="white")
    axes[0].set_xlabel("Gini of the user's training ratings")
    axes[0].set_ylabel("users")
    axes[0].set_title("Gini distribution")
    axes[1].scatter(test["gini"], test["accuracy"], s=10, alpha=0.5, color="#fc8d62")
    axes[1].set_xlabel("Gini")
    axes[1].set_ylabel("test accuracy")
    axes[1].set_title(f"Gini vs per-user accuracy ({model})")
    for ax in axes:
        ax.grid(alpha=0.3)
    return save_png(fig, path)


POLICY_NAMES = {"random": "random", "popularity": "popularity-first", "greedy": "reward-model\ngreedy",
                "policy": "policy", "simulator_oracle": "simulator\noracle", "real_oracle": "real\noracle"}
POLICY_COLORS = {"random": "#bbbbbb", "popularity": "#e5c494", "greedy": "#a6d854", "policy": "#8da0cb",
                 "simulator_oracle": "#66c2a5", "real_oracle": "#333333"}


def _bars(ax, names, vals, colors, fmt="%.3f", zoom=True):
    bars = ax.bar([POLICY_NAMES.get(n, n) for n in names], vals, color=[colors[n] for n in names])
    ax.bar_label(bars, fmt=fmt)
    finite = [v for v in vals if np.isfinite(v)]
    if finite and zoom:
        # Ratings differ by tenths: an axis from 0 would hide the random-to-oracle gap.
        lo, hi = min(finite), max(finite)
        pad = max(0.1 * (hi - lo), 0.02)
        ax.set_ylim(lo - 3 * pad, hi + 2 * pad)
    ax.grid(axis="y", alpha=0.3)


def plot_policy(policy: dict, path: Path) -> Path | None:
    """Two panels: real held-out hit rate of the picks (the independent check), and the mean
    simulated rating of the picks (the simulator's own view, its oracle drawn from itself)."""
    real = [n for n in ("random", "popularity", "greedy", "policy", "real_oracle") if isinstance(policy.get(n), dict)]
    sim = [n for n in ("random", "popularity", "greedy", "policy", "simulator_oracle")
           if isinstance(policy.get(n), dict)]
    if not sim:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
    _bars(axes[0], real, [policy[n].get("hit_rate", np.nan) for n in real], POLICY_COLORS, zoom=False)
    axes[0].set_ylabel("hit rate")
    users = policy.get("held_out_users")
    axes[0].set_title(f"real held-out likes among the picks ({users} held-out users)" if users else
                      "real held-out likes among the picks")
    _bars(axes[1], sim, [policy[n].get("mean_reward", np.nan) for n in sim], POLICY_COLORS)
    gap = policy.get("gap_closed")
    axes[1].set_ylabel("mean simulated rating")
    axes[1].set_title("simulator's view" + (f" (gap closed vs simulator oracle {gap:.1%})"
                                            if isinstance(gap, (int, float)) else ""))
    return save_png(fig, path)


def plot_histograms(hists: dict, path: Path) -> Path | None:
    if not hists or "values" not in hists:
        return None
    values = hists["values"]
    series = [(k, v) for k, v in hists.items() if k != "values"]
    if not series:
        return None
    width = 0.8 / len(series)
    x = np.arange(len(values))
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(values) + 2), 4))
    for i, (name, h) in enumerate(series):
        label = "real (test)" if name == "real_test" else f"{name} (sampled)"
        ax.bar(x + (i - (len(series) - 1) / 2) * width, h, width, label=label,
               color="#333333" if name == "real_test" else None)
    ax.set_xticks(x, [f"{v:g}" for v in values])
    ax.set_xlabel("rating")
    ax.set_ylabel("share of ratings")
    ax.set_title("real test ratings vs ratings sampled from each simulator")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return save_png(fig, path)


def plot_personas(personas: dict, path: Path, k: int = 10) -> Path | None:
    rows = {n: personas.get(n) for n in ("persona", "reward_model") if isinstance(personas.get(n), dict)}
    if not rows:
        return None
    metrics = [m for m in ("exact", "within_1", f"ndcg@{k}") if any(m in r for r in rows.values())]
    x = np.arange(len(metrics))
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for i, (name, r) in enumerate(rows.items()):
        ax.bar(x + (i - 0.5) * 0.38, [r.get(m, np.nan) or np.nan for m in metrics], 0.38, label=name)
    ax.set_xticks(x, ["accuracy (exact)" if m == "exact" else m for m in metrics])
    ax.set_ylim(0, 1)
    ax.set_title("personas vs reward model on shared users")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    return save_png(fig, path)


# --------------------------------------------------------------------------- page

CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:.85em;display:block;overflow-x:auto;max-width:100%}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
td:first-child,th:first-child{text-align:left}tr.model td{font-weight:600;background:#eef3ff}
img{max-width:100%;border:1px solid #eee}h2{border-bottom:1px solid #ddd;padding-bottom:.2em}
.note{color:#666;font-size:.9em}"""


def write_report(summary: dict, out: str | Path, per_user: pd.DataFrame | None = None) -> Path:
    """Write OUT/report.html and its PNGs from the pipeline summary (OUT/metrics.json's content)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stages = summary.get("stages", {})
    ev = stages.get("evaluate", {})
    k = int(ev.get("k", 10))
    gate = ev.get("baselines") or stages.get("baselines", {}).get("baselines", {})
    parts = [f"<h1>rlsim report: {fmt_cell(summary.get('dataset'))} / {fmt_cell(summary.get('split'))}</h1>"]

    if "data" in stages:
        d = stages["data"]
        parts.append("<h2>Data</h2>" + html_table(
            [{"name": d.get("dataset"), **{c: d.get(c) for c in ("ratings", "users", "items", "train", "test")}}],
            ["ratings", "users", "items", "train", "test"]))

    parts.append("<h2>Baseline gate</h2><p class='note'>Every model number below is shown beside these "
                 "baselines, on the same test pairs.</p>")
    models = dict(ev.get("models", {}))
    parts.append(html_table(gate_rows(models, gate, k), GATE_COLUMNS, highlight=set(models)))

    if (reward := stages.get("reward")):
        keys = [c for c in ("best_epoch", "epochs_run", "planned_epochs", "stopped_early", "val_rmse", "val_accuracy",
                            "test_rmse", "test_accuracy", "train_seconds", "hyperparameters_from") if c in reward]
        if keys:
            row = {"name": "reward_model", **reward,
                   "best_epoch": ", ".join(str(e) for e in reward.get("best_epoch", []))}
            parts.append("<h3>Reward model training</h3><p class='note'>Validation is a per-user slice carved "
                         "out of the training ratings; the weights of the best validation epoch are kept.</p>"
                         + html_table([row], keys))

    img = out / "per_user.png"
    if plot_per_user(per_user, k, img):
        parts.append(f"<h2>Per-user accuracy and NDCG@{k}: train vs test</h2><img src='{img.name}'>")

    img = out / "gini.png"
    if plot_gini(per_user, img):
        parts.append(f"<h2>Gini of users' ratings</h2><img src='{img.name}'>")
    if ev.get("correlations"):
        rows = []
        for model, corr in ev["correlations"].items():
            for pair, c in corr.items():
                rows.append({"name": model, "pair": pair, "spearman": c.get("spearman"), "pearson": c.get("pearson")})
        parts.append("<h3>Correlations (test side, per user)</h3>" + html_table(rows, ["pair", "spearman", "pearson"],
                                                                                first="name"))

    fid = ev.get("fidelity")
    if fid:
        parts.append("<h2>Simulated users: fidelity to real held-out ratings</h2><p class='note'>Micro: RMSE of "
                     "the expected rating and NLL of the real one. Macro: total variation between the histogram "
                     "of ratings <em>sampled</em> from the simulator and the real test histogram, and the 5-star "
                     "share. Discrimination (Agent4Rec): how often a held-out movie the user liked is preferred "
                     "to 1, 3 or 9 movies they never rated (chance 0.5, 0.25, 0.1). Session: NLL gained by "
                     "conditioning on the user's earlier held-out ratings, replayed in time order.</p>")
        cols = ["method", "rmse", "nll", "within_1", "tv_sampled", "five_star_share", "real_five_star_share",
                "like_acc_1to1", "like_acc_1to3", "like_acc_1to9", "session_nll_gain"]
        parts.append(html_table([{"name": n, **r} for n, r in fid.items()], cols))
        img = out / "histograms.png"
        if plot_histograms(ev.get("histograms", {}), img):
            parts.append(f"<img src='{img.name}'>")

    policy = ev.get("policy") or stages.get("policy")
    if policy:
        img = out / "policy.png"
        users = policy.get("held_out_users")
        parts.append(f"<h2>Policy on held-out users</h2><p class='note'>{fmt_cell(users)} users (a seeded share) were "
                     "never trained on. Left and first table: the independent check, the users' real held-out "
                     "ratings of the picks (a pick without one is a miss for the hit rate). Right: the simulator's "
                     "own view; its oracle is drawn from the simulator, not from real users.</p>")
        if plot_policy(policy, img):
            parts.append(f"<img src='{img.name}'>")
        names = [n for n in ("policy", "random", "popularity", "greedy", "simulator_oracle", "real_oracle")
                 if isinstance(policy.get(n), dict)]
        nd = policy.get("ndcg") or {}
        rows = [{"name": POLICY_NAMES.get(n, n).replace("\n", " "), **policy[n],
                 "ranking_ndcg": nd.get({"greedy": "greedy", "simulator_oracle": "simulator"}.get(n, n))}
                for n in names]
        parts.append(html_table(rows, ["hit_rate", "mean_real_rating", "real_coverage", "mean_reward", "gap_closed",
                                       "ranking_ndcg"], highlight={"policy"}))
        parts.append(f"<p class='note'>ranking_ndcg: NDCG@{fmt_cell(nd.get('k'))} of each strategy's ranking of the "
                     f"candidates against the held-out ratings ({fmt_cell(nd.get('users'))} users with two or more); "
                     f"floor (random ranking) {fmt_cell(nd.get('floor'))}. mean_reward is the simulated rating.</p>")
        parts.append(f"<p>Gap closed against the simulator oracle (simulated ratings, held-out users): "
                     f"{fmt_cell(policy.get('gap_closed'))}.</p>")
        tu = policy.get("train_users")
        if isinstance(tu, dict):
            parts.append(f"<p>On the {fmt_cell(tu.get('users'))} training users: gap closed {fmt_cell(tu.get('gap_closed'))}, "
                         f"real hit rate {fmt_cell((tu.get('real_hit_rate') or {}).get('policy'))}.</p>")

    personas = ev.get("personas") or stages.get("personas")
    if personas:
        img = out / "personas.png"
        parts.append("<h2>Personas vs reward model (shared users)</h2>")
        if plot_personas(personas, img, k):
            parts.append(f"<img src='{img.name}'>")
        pm = {n: personas[n] for n in ("persona", "reward_model") if isinstance(personas.get(n), dict)}
        parts.append(html_table(gate_rows(pm, personas.get("baselines") or {}, k), GATE_COLUMNS, highlight=set(pm)))

    timing = [{"name": n, "seconds": m.get("stage_seconds")} for n, m in stages.items() if isinstance(m, dict)]
    parts.append("<h2>Stages</h2>" + html_table(timing, ["seconds"]))
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>rlsim report</title><style>{CSS}</style>"
            f"</head><body>{''.join(parts)}</body></html>\n")
    path = out / "report.html"
    path.write_text(page)
    return path
