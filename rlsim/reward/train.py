"""Training the v-tf reward model as a stage: data, features, one or several members (in process,
or on Ray Train workers: rlsim.reward.distributed), evaluation beside the baselines, checkpoint and
metrics; also the Ray Tune trainable (via report_fn). The loop itself is rlsim.reward.loop.
No global configuration, no environment reads, no ray.init().
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

import numpy as np

from rlsim.config import DataConfig, to_dict
from rlsim.data import holdout_validation, load_split
from rlsim.embeddings import TextEncoder, item_embeddings
from rlsim.io import write_json, write_parquet
from rlsim.reward.config import RewardConfig
from rlsim.reward.features import build_features
from rlsim.reward.loop import fit_one, planned_epochs, torch_threads, training_threads
from rlsim.reward.predict import RewardPredictor

log = logging.getLogger(__name__)


def training_summary(history: list[dict], metrics: dict, cfg: RewardConfig) -> dict:
    """The numbers a reader of the report wants: best validation epoch (per ensemble member: the
    weights kept), whether early stopping ended training, and validation beside test."""
    members: dict[int, list[dict]] = {}
    for h in history:
        members.setdefault(h.get("member", 0), []).append(h)
    best = [min(rows, key=lambda r: r["val_rmse"]) for rows in members.values()]
    planned = planned_epochs(cfg)
    return {"best_epoch": [int(b["epoch"]) for b in best],
            "stopped_early": any(len(rows) < planned for rows in members.values()),
            "planned_epochs": int(planned),
            "val_rmse": float(np.mean([b["val_rmse"] for b in best])),
            "val_accuracy": float(np.mean([b["val_accuracy"] for b in best])),
            "test_rmse": metrics["model"]["rmse"], "test_accuracy": metrics["model"]["accuracy"]}


def prepare(data_cfg: DataConfig, dataset=None, split=None):
    if dataset is None or split is None:
        dataset, split = load_split(data_cfg)
    text = item_embeddings(dataset.items, TextEncoder(data_cfg.text_model, data_cfg.cache_dir))
    return dataset, split, text


def train_reward_model(data_cfg: DataConfig, cfg: RewardConfig, out_dir: Path | None,
                       report_fn: Callable[[dict], None] | None = None, dataset=None, split=None,
                       train_callbacks: list | None = None) -> dict:
    """Train (and evaluate) the reward model; writes OUT/checkpoint, metrics.json, per_user.parquet, plots.

    cfg.workers >= 1 trains on Ray Train (rlsim.reward.distributed; Ray must be running): report_fn
    then gets the epoch rows after training, and train_callbacks (e.g. Tune's TuneReportCallback)
    see them live."""
    from rlsim.reward.evaluate import evaluate_predictor, write_plots

    cfg.validate()
    if cfg.workers:
        from rlsim.errors import require_ray

        require_ray("reward training with reward.workers >= 1 (Ray Train)")  # before any loading
    t_start = time.perf_counter()
    with torch_threads(training_threads(cfg)):  # the text model's cold encoding too: it also runs alone
        dataset, split, text = prepare(data_cfg, dataset, split)
    fit_train, val = holdout_validation(split.train, cfg.val_frac, cfg.seed)
    ft = build_features(dataset.items, dataset.users, fit_train, text)
    models, history = [], []
    for k in range(cfg.ensemble):
        if cfg.workers:
            from rlsim.reward.distributed import fit_distributed

            m, h = fit_distributed(ft, fit_train, val, dataset.scale, cfg, cfg.seed + 1000 * k, member=k,
                                   callbacks=train_callbacks)
            for row in h if report_fn is not None else ():  # the workers reported live to Ray Train
                report_fn(dict(row))
        else:
            m, h = fit_one(ft, fit_train, val, dataset.scale, cfg, cfg.seed + 1000 * k, report_fn, member=k)
        models.append(m)
        history.extend(h)
    train_seconds = time.perf_counter() - t_start
    predictor = RewardPredictor(models, ft, dataset.scale, cfg, data=to_dict(data_cfg))
    metrics, per_user = evaluate_predictor(predictor, split.train, split.test, seed=data_cfg.seed,
                                           validation=val, fit_train=fit_train)
    epochs = [h["seconds"] for h in history]
    result = {"dataset": data_cfg.dataset, "split": split.summary(), **metrics,
              "train_fit_pairs": len(fit_train), "validation_pairs": len(val),
              "history": history, "epochs_run": len(history),
              "seconds_per_epoch": float(np.mean(epochs)) if epochs else None,
              "train_seconds": train_seconds, "reward": to_dict(cfg), **training_summary(history, metrics, cfg)}
    if out_dir is not None:
        out_dir = Path(out_dir)
        predictor.save(out_dir / "checkpoint")
        write_parquet(per_user, out_dir / "per_user.parquet")
        write_plots(per_user, out_dir, f"({data_cfg.dataset} {split.name})")
        write_json(out_dir / "metrics.json", result)
    return result
