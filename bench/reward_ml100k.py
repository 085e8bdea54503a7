"""Benchmark: the v-tf reward model on the official ML-100K folds u1..u5.

    python bench/reward_ml100k.py [--folds u1 u2 ...] [--epochs N] [--ensemble K] [--jobs 2] [--set key=value ...]

Reads the real data from --data-dir (default $RLSIM_DATA_DIR or /work/shared/datasets) and skips with
a message when it is absent. Writes bench/results/reward_ml100k.json: the mean and per-fold RMSE (and
accuracy) of the model, the baselines per fold and their means, seconds per epoch, peak memory,
settings and versions.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run_fold(job) -> dict:
    """Train and evaluate on one fold; a summary dict (runs in a worker process with --jobs)."""
    fold, data_dir, cache_dir, overrides, run_dir = job
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [{fold}] %(message)s", force=True)
    from rlsim.config import DataConfig
    from rlsim.reward.config import RewardConfig
    from rlsim.reward.train import train_reward_model

    dcfg = DataConfig(dataset="ml-100k", data_dir=data_dir, cache_dir=cache_dir, split=fold, download=False)
    res = train_reward_model(dcfg, RewardConfig.from_dict(overrides), Path(run_dir) / fold if run_dir else None)
    out = {"rmse": res["model"]["rmse"], "mae": res["model"]["mae"], "accuracy": res["model"]["accuracy"],
           "exact": res["model"]["exact"], "ndcg@10": res["model"]["ndcg@10"], "epochs_run": res["epochs_run"],
           "best_val_rmse": min(h["val_rmse"] for h in res["history"]),
           "seconds_per_epoch": res["seconds_per_epoch"], "train_seconds": res["train_seconds"],
           "baselines": {k: {"rmse": v["rmse"], "mae": v["mae"], "ndcg@10": v["ndcg@10"]}
                         for k, v in res["baselines"].items()},
           "history": [{k: round(v, 5) for k, v in h.items()} for h in res["history"]]}
    print(f"{fold}: rmse {out['rmse']:.4f} acc {out['accuracy']:.4f} (mf {out['baselines']['mf']['rmse']:.4f}, "
          f"bias {out['baselines']['bias']['rmse']:.4f}) {res['epochs_run']} epochs, "
          f"{res['seconds_per_epoch']:.1f} s/epoch", flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--folds", nargs="+", default=["u1", "u2", "u3", "u4", "u5"])
    p.add_argument("--epochs", type=int, help="override reward.epochs")
    p.add_argument("--ensemble", type=int, default=2,
                   help="seeds averaged per fold (reward.ensemble); 2 is the benchmarked setting, 1 a single model")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="RewardConfig overrides (YAML values)")
    p.add_argument("--data-dir", default=os.environ.get("RLSIM_DATA_DIR", "/work/shared/datasets"))
    p.add_argument("--cache-dir", default=os.environ.get("RLSIM_CACHE_DIR", "/tmp/rlsim-cache"))
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "reward_ml100k.json"))
    p.add_argument("--run-dir", help="also keep each fold's run folder (checkpoint, per-user metrics, plots) here")
    p.add_argument("--jobs", type=int, default=1, help="folds trained in parallel (one process each)")
    args = p.parse_args(argv)

    if not (Path(args.data_dir) / "ml-100k" / "u1.base").is_file():
        print(f"skipped: ML-100K not found under {args.data_dir} (set RLSIM_DATA_DIR or --data-dir)")
        return 0
    import torch

    from rlsim.config import to_dict
    from rlsim.io import write_json
    from rlsim.reward.config import RewardConfig

    overrides = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    overrides.setdefault("ensemble", args.ensemble)
    cfg = RewardConfig.from_dict(overrides)
    t0 = time.perf_counter()
    jobs = [(fold, args.data_dir, args.cache_dir, overrides, args.run_dir) for fold in args.folds]
    if args.jobs > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as pool:
            done = list(pool.map(run_fold, jobs))
    else:
        done = [run_fold(j) for j in jobs]
    folds = dict(zip(args.folds, done))
    names = list(next(iter(folds.values()))["baselines"])
    result = {
        "benchmark": "reward_ml100k", "model": "vanilla_transformer",
        "rmse_mean": float(np.mean([f["rmse"] for f in folds.values()])),
        "mae_mean": float(np.mean([f["mae"] for f in folds.values()])),
        "accuracy_mean": float(np.mean([f["accuracy"] for f in folds.values()])),
        "baselines_rmse_mean": {n: float(np.mean([f["baselines"][n]["rmse"] for f in folds.values()])) for n in names},
        "folds": folds,
        "seconds_per_epoch": float(np.mean([f["seconds_per_epoch"] for f in folds.values()])),
        "total_seconds": time.perf_counter() - t0,
        "peak_rss_mb": max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                           resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024,
        "jobs": args.jobs,
        "settings": {"reward": to_dict(cfg), "folds": args.folds,
                     "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "torch_threads": torch.get_num_threads()},
        "versions": {"torch": torch.__version__, "python": platform.python_version(), "numpy": np.__version__},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
    }
    write_json(args.out, result)
    print(f"rmse_mean {result['rmse_mean']:.4f} (mf {result['baselines_rmse_mean']['mf']:.4f}, "
          f"bias {result['baselines_rmse_mean']['bias']:.4f}); wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
