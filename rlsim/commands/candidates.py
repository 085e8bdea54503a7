"""`rlsim candidates build`: RankZero top-K candidates per user (Parquet) and their recall@K."""

from __future__ import annotations

import json
from pathlib import Path

from rlsim.candidates import CandidatesConfig, evaluate_candidates
from rlsim.cli import add_data_args, apply_flags, data_config, load_config_file
from rlsim.config import from_dict
from rlsim.errors import ConfigError


def register(sub) -> None:
    p = sub.add_parser("candidates", help="RankZero candidate generation")
    s = p.add_subparsers(dest="candidates_command", required=True)
    b = s.add_parser("build", help="top-K candidates per user (popularity + FAISS similarity)")
    add_data_args(b)
    b.add_argument("--out", required=True, help="output folder (candidates.parquet, metrics.json)")
    b.add_argument("--k", type=int, help="candidates per user (default 25)")
    b.add_argument("--weights", help="POP,SIM blend weights, e.g. 0.5,0.5")
    b.add_argument("--like-threshold", type=float, help="held-out rating counted as liked (default 4)")
    b.set_defaults(func=cmd_build)


def candidates_config(args, file_cfg: dict) -> CandidatesConfig:
    cfg = from_dict(CandidatesConfig, file_cfg.get("candidates"), "candidates")
    apply_flags(cfg, args, [("k", "k"), ("like_threshold", "like_threshold")])
    if getattr(args, "weights", None):
        try:
            cfg.pop_weight, cfg.sim_weight = (float(x) for x in args.weights.split(","))
        except ValueError:
            raise ConfigError(f"--weights must be POP,SIM (two numbers), got {args.weights!r}") from None
    return cfg.validate()


def cmd_build(args) -> int:
    from rlsim.baselines import evaluate_baselines
    from rlsim.data import load_split
    from rlsim.embeddings import item_text_vectors
    from rlsim.io import write_json, write_parquet

    file_cfg = load_config_file(args)
    dcfg = data_config(args, file_cfg)
    ccfg = candidates_config(args, file_cfg)
    ds, split = load_split(dcfg)
    emb = item_text_vectors(ds.items, dcfg.text_model, dcfg.cache_dir)
    cands, metrics = evaluate_candidates(split.train, split.test, ds.items, emb, ccfg)
    out = Path(args.out)
    write_parquet(cands, out / "candidates.parquet")
    metrics = {"dataset": dcfg.dataset, "split": split.summary(), "candidates": metrics,
               "baselines": evaluate_baselines(split.train, split.test, ds.scale, seed=dcfg.seed)}
    write_json(out / "metrics.json", metrics)
    print(json.dumps({k: round(metrics["candidates"][k]["recall"], 4)
                      for k in ("popularity", "similarity", "blend")}))
    print(f"wrote {out / 'candidates.parquet'}")
    return 0
