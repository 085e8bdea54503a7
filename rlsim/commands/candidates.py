"""`rlsim candidates build`: RankZero top-K candidates per user (Parquet) and their recall@K."""

from __future__ import annotations

import json
from pathlib import Path

from rlsim.candidates import write_candidates
from rlsim.cli import add_data_args, run_config


def register(sub) -> None:
    p = sub.add_parser("candidates", help="RankZero candidate generation")
    s = p.add_subparsers(dest="candidates_command", required=True)
    b = s.add_parser("build", help="top-K candidates per user (popularity + FAISS similarity)")
    add_data_args(b)
    b.add_argument("--out", required=True, help="output folder (candidates.parquet, metrics.json)")
    b.add_argument("--k", type=int, help="candidates per user (default 25)")
    b.add_argument("--weights", help="fixed POP,SIM blend weights, e.g. 0.5,0.5 (default: chosen on a validation "
                                     "slice of the training ratings)")
    b.add_argument("--like-threshold", type=float, help="held-out rating counted as liked (default 4)")
    b.set_defaults(func=cmd_build)


def cmd_build(args) -> int:
    run = run_config(args)
    metrics = write_candidates(run.data, run.candidates.validate(), args.out)
    c = metrics["candidates"]
    print(json.dumps({**{k: round(c[k]["recall"], 4) for k in ("popularity", "similarity", "blend")},
                      "weights": c["weights"], "weights_from": c["weights_from"]}))
    print(f"wrote {Path(args.out) / 'candidates.parquet'}")
    return 0
