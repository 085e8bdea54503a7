"""Reward-model training on Ray Train: a TorchTrainer (DDP) whose workers each train on their own
shard of the training ratings (RewardConfig.workers >= 1).

The driver builds the feature tables once; every worker needs all of them (the rating-history
matrices are model buffers). The training pairs are split by a seeded permutation into one disjoint
shard per worker, each put into the object store on its own, so a worker fetches and encodes only
its shard. A permutation split rather than a Ray Data dataset: the pairs are already in memory,
encoding them needs the feature tables, and a streaming executor per epoch would cost more than
the step on a few CPUs; the split is exact (disjoint, covering), random across users and seeded.

Each epoch a worker permutes its shard and cuts it into as many batches as the one-process loop
runs (ceil(n / batch_size)), so the global batch (the workers' shares together) and the lr schedule
are the same as with workers=0. The loop itself is rlsim.reward.train.run_epochs. Validation rows
are sharded too and their sums all-reduced, so every worker computes the same validation RMSE and
early stopping stops them all at the same epoch. Rank 0 puts the best epoch's weights and the
history in the run's one checkpoint; the driver loads them into a VanillaTransformer.

Nothing here starts Ray: the caller (the CLI, a job, a Tune trial) has.
"""

from __future__ import annotations

import resource
import shutil
import tempfile
import uuid
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from rlsim.config import to_dict
from rlsim.data.schema import RatingScale
from rlsim.errors import ConfigError, RlsimError, require_ray
from rlsim.reward.config import RewardConfig
from rlsim.reward.features import FeatureTables
from rlsim.reward.model import VanillaTransformer
from rlsim.reward.loop import (EpochHooks, run_epochs, steps_per_epoch, tensors, validation_metrics,
                               validation_sums)

WEIGHTS = "weights.pt"


def shard_indices(n: int, workers: int, seed: int) -> list[np.ndarray]:
    """Row positions of each worker's shard: a seeded permutation of range(n) cut into `workers`
    near-equal parts (disjoint, together all n rows; each sorted)."""
    perm = np.random.default_rng(seed).permutation(n)
    return [np.sort(part) for part in np.array_split(perm, workers)]


def check_shards(n: int, cfg: RewardConfig) -> None:
    full, _ = steps_per_epoch(n, cfg)
    if n // cfg.workers < full:
        raise ConfigError(f"reward.workers={cfg.workers}: {n} training ratings give a worker fewer rows "
                          f"({n // cfg.workers}) than batches per epoch ({full}); use fewer workers")


def _all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return t
    from ray.train.torch import get_device

    out = t.to(get_device())  # NCCL reduces on the GPU, gloo on the CPU
    dist.all_reduce(out, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return out.cpu()


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _worker_loop(config: dict) -> None:
    """One Ray Train worker: its shard, the shared loop (DDP-averaged gradients), a report per epoch."""
    import ray
    import ray.train
    import ray.train.torch

    torch.set_num_threads(1)  # one CPU per worker: more threads only fight over it
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    cfg = RewardConfig(**{**config["reward"], "progress": False})
    scale: RatingScale = config["scale"]
    seed = config["seed"]
    device = ray.train.torch.get_device()
    with warnings.catch_warnings():
        # Object-store arrays are read-only; the model never writes into these tables.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        ft: FeatureTables = ray.get(config["features"])
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        model = VanillaTransformer(cfg, ft, scale.values).to(device)
        tr = tensors(ft, ray.get(config["shards"][rank]), scale, device, cfg.choice_weight > 0)
        va = tensors(ft, ray.get(config["val_shards"][rank]), scale, device)
    # Buffers (feature tables, history matrices) are equal everywhere by construction: no broadcasts.
    net = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"broadcast_buffers": False})
    full, steps = steps_per_epoch(config["n_train"], cfg)
    gen = torch.Generator().manual_seed(seed + 104_729 * rank)  # per-worker shuffles and id masks
    n = len(tr["y"])

    def batches() -> list[torch.Tensor]:
        perm = torch.randperm(n, generator=gen).to(device)
        return list(torch.tensor_split(perm, full))[:steps]

    def validate() -> dict:
        return validation_metrics(_all_reduce(validation_sums(model, va, cfg)))

    def total(loss: float, seen: int) -> tuple[float, int]:
        t = _all_reduce(torch.tensor([loss, float(seen)], dtype=torch.float64))
        return float(t[0]), int(t[1])

    def on_epoch(row: dict, best_state: dict | None, history: list[dict], last: bool) -> None:
        # In place: the history rows (and so metrics.json) carry them too.
        row.update(workers=ctx.get_world_size(),
                   worker_peak_rss_mb=float(_all_reduce(torch.tensor([_peak_rss_mb()], dtype=torch.float64),
                                                        "max")[0]))
        metrics = dict(row)
        if not (last and rank == 0):
            ray.train.report(metrics)
            return
        folder = Path(tempfile.mkdtemp(prefix="rlsim-ckpt-"))
        try:
            state = {k: v.detach().cpu() for k, v in (best_state or model.state_dict()).items()
                     if k not in VanillaTransformer.DERIVED_BUFFERS}
            torch.save({"state": state, "history": history}, folder / WEIGHTS)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(folder)))
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    run_epochs(net, tr, cfg, steps, gen, EpochHooks(batches, validate, total, on_epoch), member=config["member"])


def fit_distributed(ft: FeatureTables, fit_train: pd.DataFrame, val: pd.DataFrame, scale: RatingScale,
                    cfg: RewardConfig, seed: int, member: int = 0,
                    callbacks: list | None = None) -> tuple[VanillaTransformer, list[dict]]:
    """fit_one on Ray Train with cfg.workers workers: the model with the best validation epoch's
    weights, and the epoch history (rows as fit_one's, plus workers and worker_peak_rss_mb).

    callbacks: Ray Train callbacks, e.g. Tune's TuneReportCallback inside a sweep's trial."""
    import ray
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    require_ray("reward training with reward.workers >= 1 (Ray Train)")
    check_shards(len(fit_train), cfg)
    shards = [ray.put(fit_train.iloc[idx].reset_index(drop=True))
              for idx in shard_indices(len(fit_train), cfg.workers, seed)]
    val_shards = [ray.put(val.iloc[idx].reset_index(drop=True))
                  for idx in np.array_split(np.arange(len(val)), cfg.workers)]
    config = {"reward": to_dict(cfg), "scale": scale, "seed": seed, "member": member, "n_train": len(fit_train),
              "features": ray.put(ft), "shards": shards, "val_shards": val_shards}
    storage = cfg.storage_path or tempfile.mkdtemp(prefix="rlsim-train-")
    trainer = TorchTrainer(
        _worker_loop, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.device == "cuda",
                                     resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name=f"reward-m{member}-{uuid.uuid4().hex[:8]}", storage_path=storage,
                             callbacks=list(callbacks or []), checkpoint_config=CheckpointConfig(num_to_keep=1)))
    try:
        result = trainer.fit()
        if result.checkpoint is None:
            raise RlsimError(f"the Ray Train run at {result.path} ended without a checkpoint")
        with result.checkpoint.as_directory() as folder:
            saved = torch.load(Path(folder) / WEIGHTS, map_location=cfg.device, weights_only=True)
    finally:
        if cfg.storage_path is None:
            shutil.rmtree(storage, ignore_errors=True)
    model = VanillaTransformer(cfg, ft, scale.values).to(torch.device(cfg.device))
    missing, unexpected = model.load_state_dict(saved["state"], strict=False)
    if unexpected or [k for k in missing if k not in model.DERIVED_BUFFERS]:
        raise RlsimError(f"the Ray Train checkpoint does not match the model: {missing or unexpected}")
    return model.eval(), saved["history"]
