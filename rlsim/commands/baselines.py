"""`rlsim baselines`: the baseline gate on one split, written to OUT/metrics.json."""

from __future__ import annotations

import json
from pathlib import Path

from rlsim.baselines import evaluate_baselines
from rlsim.cli import add_data_args, run_config
from rlsim.data import load_split
from rlsim.io import write_json


def register(sub) -> None:
    p = sub.add_parser("baselines", help="global/user/rounded-user mean, bias and MF on a split")
    add_data_args(p)
    p.add_argument("--out", required=True, help="output folder (metrics.json)")
    p.set_defaults(func=cmd_baselines)


def cmd_baselines(args) -> int:
    cfg = run_config(args).data
    ds, split = load_split(cfg)
    result = {"dataset": cfg.dataset, "split": split.summary(), "baselines": evaluate_baselines(
        split.train, split.test, ds.scale, seed=cfg.seed)}
    path = write_json(Path(args.out) / "metrics.json", result)
    print(json.dumps({k: round(v["rmse"], 4) for k, v in result["baselines"].items()}))
    print(f"wrote {path}")
    return 0
