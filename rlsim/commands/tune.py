"""`rlsim tune reward`: an ASHA sweep of the reward model; writes OUT/best.yaml for `rlsim reward train`."""

from __future__ import annotations

import json
import os
from pathlib import Path

from rlsim.cli import add_data_args, apply_flags, data_config, load_config_file
from rlsim.config import from_dict


def register(sub) -> None:
    p = sub.add_parser("tune", help="Ray Tune sweeps")
    s = p.add_subparsers(dest="tune_command", required=True)
    r = s.add_parser("reward", help="ASHA sweep of the reward model (sections: data, reward, tune)")
    add_data_args(r)
    r.add_argument("--out", required=True, help="folder for best.yaml, trials.csv, metrics.json")
    r.add_argument("--num-samples", type=int, help="trials (tune.num_samples)")
    r.add_argument("--max-concurrent", type=int, help="trials at once (tune.max_concurrent)")
    r.add_argument("--max-epochs", type=int, help="epochs per trial at most (tune.max_epochs)")
    r.add_argument("--storage-path", help="experiment root: folder or URI (file:///..., s3://...)")
    r.add_argument("--name", help="experiment name (tune.name)")
    r.add_argument("--resume", action="store_true", help="restore <storage-path>/<name> and finish it")
    r.add_argument("--address", help="Ray cluster to join (default $RAY_ADDRESS, else a local Ray)")
    r.set_defaults(func=cmd_tune_reward)


def cmd_tune_reward(args) -> int:
    from rlsim.reward.config import RewardConfig
    from rlsim.tune import TuneConfig, run_sweep

    file_cfg = load_config_file(args)
    dcfg = data_config(args, file_cfg)
    base = RewardConfig.from_dict(file_cfg.get("reward"))
    tcfg = from_dict(TuneConfig, file_cfg.get("tune"), "tune")
    apply_flags(tcfg, args, [(f, f) for f in ("num_samples", "max_concurrent", "max_epochs", "storage_path", "name")])
    if tcfg.storage_path is None:
        tcfg.storage_path = str((Path(args.out) / "ray_results").resolve())
    address = args.address or os.environ.get("RAY_ADDRESS")
    if address:
        import ray

        ray.init(address=address if not address.startswith("http") else "auto", log_to_driver=False)
    metrics = run_sweep(dcfg, base, tcfg, out_dir=args.out, resume=args.resume)
    print(json.dumps({"best_config": metrics["best_config"], "best": metrics["best"],
                      "n_trials": metrics["n_trials"], "n_errors": metrics["n_errors"]}, indent=2))
    print(f"wrote {Path(args.out) / 'best.yaml'} (use: rlsim reward train --config {Path(args.out) / 'best.yaml'})")
    return 0
