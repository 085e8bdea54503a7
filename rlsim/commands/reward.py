"""`rlsim reward train|evaluate|tune`: the v-tf reward model on a split, with the baseline gate
beside it, and its Ray Tune sweep (Ray started or joined here, at the edge)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

from rlsim.cli import add_data_args, add_quiet_arg, add_ray_arg, run_config
from rlsim.config import to_dict
from rlsim.errors import ConfigError
from rlsim.run_config import REWARD_FLAGS

if TYPE_CHECKING:
    from rlsim.reward.config import RewardConfig


def register(sub) -> None:
    p = sub.add_parser("reward", help="train or evaluate the transformer reward model")
    rsub = p.add_subparsers(dest="reward_command", required=True)
    tr = rsub.add_parser("train", help="train v-tf on a split; writes checkpoint/, metrics.json, per_user.parquet")
    add_data_args(tr)
    g = tr.add_argument_group("reward model (override the `reward:` section of --config)")
    for name, tp in REWARD_FLAGS.items():
        g.add_argument("--" + name.replace("_", "-"), type=tp, dest=f"reward_{name}", metavar=name.upper())
    g.add_argument("--no-history", action="store_true", help="drop the rated-items token")
    g.add_argument("--no-user-features", action="store_true", help="drop the demographics token")
    g.add_argument("--no-history-ratings", action="store_true", help="drop the user/item rating-history tokens")
    tr.add_argument("--out", required=True, help="run folder")
    tr.add_argument("--num-cpus", type=int, help="CPUs for the local Ray instance with --workers (default: all)")
    add_ray_arg(tr)
    add_quiet_arg(tr)
    tr.set_defaults(func=cmd_train)
    ev = rsub.add_parser("evaluate", help="reload a checkpoint and evaluate it on a split")
    add_data_args(ev)
    ev.add_argument("--checkpoint", required=True, help="checkpoint folder (or a run folder holding checkpoint/)")
    ev.add_argument("--out", required=True, help="output folder (metrics.json, per_user.parquet, plots)")
    ev.set_defaults(func=cmd_evaluate)
    tu = rsub.add_parser("tune", help="ASHA sweep (sections: data, reward, tune); writes OUT/best.yaml")
    add_data_args(tu)
    tu.add_argument("--out", required=True, help="folder for best.yaml, trials.csv, metrics.json")
    tu.add_argument("--num-samples", type=int, help="trials (tune.num_samples)")
    tu.add_argument("--max-concurrent", type=int, help="trials at once (tune.max_concurrent)")
    tu.add_argument("--max-epochs", type=int, help="epochs per trial at most (tune.max_epochs)")
    tu.add_argument("--storage-path", help="experiment root: folder or URI (file:///..., s3://...)")
    tu.add_argument("--name", help="experiment name (tune.name)")
    tu.add_argument("--resume", action="store_true", help="restore <storage-path>/<name> and finish it")
    tu.add_argument("--num-cpus", type=int, help="CPUs for the local Ray instance (default: all)")
    add_ray_arg(tu)
    tu.set_defaults(func=cmd_tune)


def reward_config(run) -> "RewardConfig":
    """The `reward:` section with its flags, validated; a copy (the command sets progress on it)."""
    import dataclasses

    return dataclasses.replace(run.reward).validate()


def _summary(result: dict) -> str:
    m = result["model"]
    line = {k: round(m[k], 4) for k in ("rmse", "mae", "accuracy", "ndcg@10", "ndcg_floor@10")}
    line["baselines_rmse"] = {k: round(v["rmse"], 4) for k, v in result["baselines"].items()}
    return json.dumps(line)


def cmd_train(args) -> int:
    from rlsim.commands.ray_session import cli_ray
    from rlsim.reward.train import train_reward_model

    run = run_config(args)
    dcfg, cfg = run.data, reward_config(run)
    cfg.progress = not args.quiet
    # --workers N: a Ray Train run, in the Ray started or joined here (the plain loop needs none).
    with cli_ray(args, args.num_cpus) if cfg.workers else contextlib.nullcontext():
        result = train_reward_model(dcfg, cfg, Path(args.out))
    print(_summary(result))
    print(f"wrote {Path(args.out) / 'metrics.json'} and checkpoint {Path(args.out) / 'checkpoint'}")
    return 0


def cmd_evaluate(args) -> int:
    from rlsim.data import load_split
    from rlsim.io import write_json, write_parquet
    from rlsim.reward.evaluate import evaluate_predictor, write_plots
    from rlsim.reward.predict import RewardPredictor

    dcfg = run_config(args).data
    predictor = RewardPredictor.load(args.checkpoint)
    ds, split = load_split(dcfg)
    if ds.scale != predictor.scale:
        raise ConfigError(f"checkpoint scale {predictor.scale.to_dict()} differs from {dcfg.dataset}'s "
                          f"{ds.scale.to_dict()}")
    metrics, per_user = evaluate_predictor(predictor, split.train, split.test, seed=dcfg.seed)
    out = Path(args.out)
    result = {"dataset": dcfg.dataset, "split": split.summary(), "checkpoint": str(args.checkpoint), **metrics,
              "reward": to_dict(predictor.cfg), "trained_on": predictor.data}
    write_parquet(per_user, out / "per_user.parquet")
    write_plots(per_user, out, f"({dcfg.dataset} {split.name})")
    write_json(out / "metrics.json", result)
    print(_summary(result))
    print(f"wrote {out / 'metrics.json'}")
    return 0


def cmd_tune(args) -> int:
    from rlsim.commands.ray_session import cli_ray
    from rlsim.tune import run_sweep

    run = run_config(args)
    dcfg, base, tcfg = run.data, reward_config(run), run.tune
    if tcfg.storage_path is None:
        tcfg.storage_path = str((Path(args.out) / "ray_results").resolve())
    with cli_ray(args, args.num_cpus):
        metrics = run_sweep(dcfg, base, tcfg, out_dir=args.out, resume=args.resume)
    print(json.dumps({"best_config": metrics["best_config"], "best": metrics["best"],
                      "n_trials": metrics["n_trials"], "n_errors": metrics["n_errors"]}, indent=2))
    print(f"wrote {Path(args.out) / 'best.yaml'} (use: rlsim reward train --config {Path(args.out) / 'best.yaml'})")
    return 0
