"""Markdown tables of bench/results/study.json (the README's and docs/study.md's), one per dataset.

    python bench/study_table.py [bench/results/study.json]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _ci(v: dict | None) -> str:
    if not v or v.get("mean") is None:
        return "–"
    lo, hi = v["ci95"] or (None, None)
    return f"{v['mean']:+.3f} [{lo:+.3f}, {hi:+.3f}]" + (f", Holm p {v['p_holm']:.3f}" if v.get("p_holm") is not None else "")


def table(name: str, d: dict) -> str:
    held = d["held_out"]
    rows = [f"**{name}**: {d['held_out_users']} held-out users per seed (drawn among {held['eligible_users']} with "
            f"held-out ratings), {d['seeds']} seeds, {d['env_steps_per_policy']:,} env steps per policy, "
            f"{d['wall_seconds'] / 60:.0f} min on {d['cpus']} cores.", "",
            "| strategy | real hit rate | watch rate | NDCG@10 | vs popularity-first (hit rate, 95% CI) | vs BPR top-1 |",
            "|---|---|---|---|---|---|"]
    for n, s in d["sources"].items():
        rows.append(f"| PPO on {n} | {s['hit_rate']['mean']:.3f} | {s['watch_rate']['mean']:.3f} | "
                    f"{s['ndcg']['mean']:.3f} | {_ci(s.get('vs_popularity'))} | {_ci(s.get('vs_bpr_top1'))} |")
    for n, s in d["references"].items():
        rows.append(f"| {n} | {s['hit_rate']['mean']:.3f} | {s['watch_rate']['mean']:.3f} | {s['ndcg']['mean']:.3f} | "
                    f"{_ci(s.get('vs_popularity')) if n != 'popularity' else ''} | |")
    short = d.get("shortfall")
    if short:  # where a policy falls short of popularity-first: watched less often, or liked less when watched
        rows += ["", f"Shortfall from popularity-first's hit rate (the question gets wrong: {short['question']}):", "",
                 "| PPO on | choice part (95% CI) | rating part (95% CI) |", "|---|---|---|"]
        for n, r in short["sources"].items():
            rows.append(f"| {n} | {_part(r, 'choice')} | {_part(r, 'rating')} |")
    return "\n".join(rows)


def _part(r: dict, k: str) -> str:
    ci = r.get(f"{k}_ci95")
    return "–" if r.get(k) is None else f"{r[k]:+.3f}" + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "")


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    path = Path(args[0]) if args else ROOT / "bench" / "results" / "study.json"
    d = json.loads(path.read_text())
    for name, block in d.get("datasets", {}).items():
        print(table(name, block) + "\n")
        print(block.get("answer", "") + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
