"""`rlsim data prepare|verify|synth`: load (or download) a dataset, cache it, check official checksums,
generate a synthetic MovieLens-shaped dataset from a real one's statistics."""

from __future__ import annotations

import json
from pathlib import Path

from rlsim.cli import add_data_args, run_config
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
    syn = dsub.add_parser("synth", help="generate a synthetic MovieLens-shaped dataset (SYNTHETIC ratings) from a "
                                        "real dataset's statistics")
    add_data_args(syn)
    syn.add_argument("--source", help="real dataset whose statistics and item text are used "
                                      "(default: --dataset, else ml-latest-small)")
    syn.add_argument("--size", choices=["100k", "1m", "10m", "25m"],
                     help="ratings, users and items of the MovieLens release of that size")
    syn.add_argument("--ratings", help="number of ratings, e.g. 2.5m (instead of --size)")
    syn.add_argument("--users", type=int, help="default: ratings / the source's ratings per user")
    syn.add_argument("--items", type=int, help="default: the source's items x (ratings ratio)^0.4")
    syn.add_argument("--synth-seed", type=int, default=0, help="generator seed (default 0)")
    syn.add_argument("--out", required=True, help="folder to write; load it with --dataset <folder name> "
                                                  "--data-dir <its parent>")
    syn.add_argument("--quiet", action="store_true", help="no progress bar")
    syn.set_defaults(func=cmd_synth)


def cmd_prepare(args) -> int:
    cfg = run_config(args).data
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
    cfg = run_config(args).data
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


def cmd_synth(args) -> int:
    from rlsim.data.synthetic import PRESETS, SynthConfig, default_counts, generate, parse_size, read_meta

    cfg = run_config(args).data
    source = args.source or (args.dataset if args.dataset and not args.dataset.startswith("synthetic") else None) \
        or "ml-latest-small"
    if args.size and args.ratings:
        raise DataError("give --size or --ratings, not both")
    src = load_movielens(source, data_dir=cfg.data_dir, cache_dir=cfg.cache_dir, overviews=cfg.overviews,
                         download=cfg.download)
    if args.size:
        n, users, items = PRESETS[args.size]
    else:
        n = parse_size(args.ratings or "1m")
        users, items = default_counts(src, n)
    synth = SynthConfig(n_ratings=n, n_users=args.users or users, n_items=args.items or items, source=source,
                        seed=args.synth_seed)
    out = Path(args.out)
    generate(src, synth, out, name=out.name, progress=not args.quiet)
    meta = read_meta(out)
    print(json.dumps({"name": meta["name"], "ratings": n, "users": synth.n_users, "items": synth.n_items,
                      "source": source, "folder": str(out)}, indent=2))
    print(f"SYNTHETIC data written to {out}; load it with --dataset {out.name} --data-dir {out.parent}")
    return 0
