"""`rlsim data prepare|verify`: load (or download) a dataset, cache it, check official checksums."""

from __future__ import annotations

import json
from pathlib import Path

from rlsim.cli import add_data_args, data_config
from rlsim.data import get_spec, load_movielens, make_split, verify_members
from rlsim.data.movielens import locate
from rlsim.errors import DataError
from rlsim.io import write_json


def register(sub) -> None:
    p = sub.add_parser("data", help="prepare or verify a dataset")
    dsub = p.add_subparsers(dest="data_command", required=True)
    prep = dsub.add_parser("prepare", help="load (downloading if needed), cache as Parquet, print a summary")
    add_data_args(prep)
    prep.add_argument("--out", help="also write ratings/items/users/split Parquet and summary.json here")
    prep.set_defaults(func=cmd_prepare)
    ver = dsub.add_parser("verify", help="check a local copy's files against the official md5s")
    add_data_args(ver)
    ver.set_defaults(func=cmd_verify)


def cmd_prepare(args) -> int:
    cfg = data_config(args)
    ds = load_movielens(cfg.dataset, data_dir=cfg.data_dir, cache_dir=cfg.cache_dir, overviews=cfg.overviews,
                        download=cfg.download)
    split = make_split(ds, cfg.split, seed=cfg.seed, test_frac=cfg.test_frac)
    summary = {**ds.summary(), **split.summary()}
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        ds.ratings.to_parquet(out / "ratings.parquet", index=False)
        ds.items.to_parquet(out / "items.parquet", index=False)
        ds.users.to_parquet(out / "users.parquet", index=False)
        split.train.to_parquet(out / "train.parquet", index=False)
        split.test.to_parquet(out / "test.parquet", index=False)
        write_json(out / "summary.json", summary)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_verify(args) -> int:
    cfg = data_config(args)
    spec = get_spec(cfg.dataset)
    folder = locate(spec, Path(cfg.data_dir).expanduser())
    if folder is None:
        raise DataError(f"{cfg.dataset} not found in {cfg.data_dir}")
    report = verify_members(spec, folder)
    print(json.dumps({"folder": str(folder), "files": report}, indent=2))
    bad = [f for f, r in report.items() if not r["ok"]]
    if bad:
        raise DataError(f"checksum mismatch for {', '.join(bad)} in {folder}")
    return 0
