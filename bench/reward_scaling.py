"""Reward-model training on Ray Train: ratings/s and peak memory per worker, 1 and 2 workers.

    python bench/reward_scaling.py [--sizes 1m 10m] [--workers 1 2] [--max-batches K] [--epochs N] [--set KEY=VALUE ...]
                                   [--compare-u1] [--data-dir DIR] [--cache-dir DIR]
                                   [--out bench/results/reward_scaling.json] [--merge]

Runs `train_reward_model` (library default RewardConfig but `epochs`, with reward.workers = 1, 2, ...)
on the synthetic presets (`synthetic-<size>`, rlsim.data.synthetic; temporal split), each
(size, workers) in a fresh process with its own private Ray of `workers` CPUs. Writes
`runs.<size>_<workers>w` = {ratings_per_s, peak_rss_mb, test_rmse, ...}:

  ratings_per_s  training pairs per second of the epochs' batches (validation excluded), all
                 workers together, the mean over the epochs run
  peak_rss_mb    per worker: ru_maxrss of the Ray Train worker processes (the largest; Ray and torch
                 imports included); driver_peak_rss_mb is the driver's (data, features, evaluation)
  test_rmse      of the model trained; with --max-batches it saw only epochs x K batches of the
                 training pairs, so it is not a converged model's RMSE (labelled partial_epochs)

--max-batches K caps the batches per epoch for a quick measurement: epoch_seconds is then
extrapolated to the whole epoch from the measured ratings/s (extrapolated: true).
--compare-u1 also trains on real ML-100K u1 with the library default RewardConfig, once per
--workers value, and writes their test and validation RMSE under "ml100k_u1" (--workers 0: the
plain in-process loop, for reference).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/, also when imported from elsewhere
from _child import measure_child, reward_settings  # noqa: E402


def run_child(args) -> int:
    """One (dataset, workers) training in this process, under a private Ray; prints RESULT {...}."""
    import torch

    torch.set_num_threads(1)
    from rlsim.commands.ray_session import ray_session
    from rlsim.config import DataConfig
    from rlsim.reward.config import RewardConfig
    from rlsim.reward.loop import steps_per_epoch
    from rlsim.reward.train import train_reward_model

    u1 = args.dataset == "ml-100k"
    dcfg = DataConfig(dataset=args.dataset, data_dir=args.data_dir, cache_dir=args.cache_dir,
                      split="u1" if u1 else "temporal", download=False)
    overrides = {"workers": args.run_workers}
    if not u1:  # the u1 comparison is the library default, unchanged
        overrides.update(epochs=args.epochs, patience=args.epochs, max_batches=args.max_batches,
                         **reward_settings(args.set).get("", {}))
    cfg = RewardConfig(**overrides).validate()
    tmp = tempfile.mkdtemp(prefix="rlsim-ray-", dir="/tmp")
    t0 = time.perf_counter()
    # --workers 0: the plain in-process loop, for reference (no Ray).
    session = ray_session(None, num_cpus=args.run_workers, include_dashboard=False, _temp_dir=tmp) \
        if args.run_workers else contextlib.nullcontext()
    with session:
        res = train_reward_model(dcfg, cfg, None)
    wall = time.perf_counter() - t0
    hist = res["history"]
    n_fit = res["train_fit_pairs"]
    full, run = steps_per_epoch(n_fit, cfg)
    rate = sum(h["ratings_per_s"] for h in hist) / len(hist)
    cpu_rate = sum(h.get("ratings_per_cpu_s", 0.0) for h in hist) / len(hist)
    driver_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = {"ratings_per_s": round(rate, 1), "ratings_per_cpu_s": round(cpu_rate, 1),
           "peak_rss_mb": round(max(h.get("worker_peak_rss_mb", driver_rss) for h in hist)),
           "test_rmse": round(res["model"]["rmse"], 5), "val_rmse": round(res["val_rmse"], 5),
           "workers": args.run_workers, "train_pairs": n_fit, "epochs_run": len(hist),
           "batches_per_epoch": run, "full_batches_per_epoch": full, "extrapolated": run < full,
           "partial_epochs": run < full, "epoch_seconds": round(n_fit / rate, 1),
           "train_seconds": round(res["train_seconds"], 1), "wall_seconds": round(wall, 1),
           "driver_peak_rss_mb": round(driver_rss), "reward_settings": {} if u1 else reward_settings(args.set).get("", {}),
           "load_avg_1m": round(os.getloadavg()[0], 2)}
    print("RESULT " + json.dumps(out), flush=True)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="*", default=["1m", "10m"], choices=["100k", "1m", "10m", "25m"])
    p.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    p.add_argument("--epochs", type=int, default=1, help="epochs per synthetic run (reward.epochs)")
    p.add_argument("--max-batches", type=int, default=0,
                   help="batches per epoch at most (0: whole epochs); epoch_seconds is then extrapolated")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="reward settings of the synthetic runs (e.g. history_sample=128 batch_size=2048)")
    p.add_argument("--tag", default="", help="appended to the synthetic runs' keys (runs.<size>_<workers>w_<tag>)")
    p.add_argument("--compare-u1", action="store_true", help="also ML-100K u1, library default config, per --workers")
    p.add_argument("--source", default="ml-latest-small", help="the synthetic data's source dataset")
    p.add_argument("--data-dir", default=os.environ.get("RLSIM_DATA_DIR", "/work/shared/datasets"))
    p.add_argument("--cache-dir", default=os.environ.get("RLSIM_CACHE_DIR", "/tmp/rlsim-scaling-cache"))
    p.add_argument("--timeout", type=int, default=7200, help="seconds per run")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "reward_scaling.json"))
    p.add_argument("--merge", action="store_true", help="keep the other entries of an existing --out")
    p.add_argument("--dataset", help=argparse.SUPPRESS)
    p.add_argument("--run-workers", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.dataset:
        return run_child(args)

    out = Path(args.out)
    doc = json.loads(out.read_text()) if args.merge and out.is_file() else {}
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    suffix = "" if args.source == "ml-latest-small" else f"-from-{args.source}"
    tag = f"_{args.tag}" if args.tag else ""
    jobs = [(f"{size}_{w}w{tag}", f"synthetic-{size}{suffix}", w, "runs") for size in args.sizes for w in args.workers]
    if args.compare_u1:
        jobs += [(f"{w}w", "ml-100k", w, "ml100k_u1") for w in args.workers]
    for key, dataset, workers, section in jobs:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--dataset", dataset, "--run-workers", str(workers),
               "--epochs", str(args.epochs), "--max-batches", str(args.max_batches), "--set", *args.set,
               "--data-dir", args.data_dir, "--cache-dir", args.cache_dir]
        res = measure_child(cmd, env, args.timeout)
        res["command"] = "python bench/reward_scaling.py " + " ".join(sys.argv[1:])
        doc.setdefault(section, {})[key] = res
        print(f"{section}.{key}: {json.dumps(res)[:400]}", flush=True)
        u1 = doc.get("ml100k_u1", {})
        if section == "ml100k_u1" and all("test_rmse" in u1.get(k, {}) for k in ("1w", "2w")):
            u1["test_rmse_difference_1w_2w"] = round(abs(u1["1w"]["test_rmse"] - u1["2w"]["test_rmse"]), 5)
        _write(out, doc, args)
    print(f"wrote {out}")
    return 0


def _write(out: Path, doc: dict, args) -> None:
    import torch

    from rlsim.io import write_json

    command = "python bench/reward_scaling.py " + " ".join(sys.argv[1:])
    commands = (doc.get("setup") or {}).get("commands", [])
    doc["setup"] = {
        "commands": commands + [command] if command not in commands else commands,
        "data": f"synthetic presets from {args.source} (rlsim.data.synthetic), temporal split; "
                "ml100k_u1: real ML-100K u1 with the library default RewardConfig",
        "reward": "library default RewardConfig but epochs, max_batches (0 = whole epochs), reward.workers and "
                  "each run's reward_settings (--set)",
        "ratings_per_s": "training pairs per second of the epochs' batches, all workers together (validation excluded)",
        "ratings_per_cpu_s": "the same pairs per CPU second of one worker (rank 0): the rate with a core per worker",
        "peak_rss_mb": "per Ray Train worker: the largest worker's ru_maxrss (Ray and torch imports included)",
        "test_rmse": "of the run's model; with max_batches it saw only part of each epoch (partial_epochs)",
        "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
        "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
        "threads_per_worker": 1, "note": "one CPU per worker; the machine may be shared (load_avg_1m per run)"}
    write_json(out, doc)


if __name__ == "__main__":
    sys.exit(main())
