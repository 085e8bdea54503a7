"""Plain training loop of the v-tf reward model; also the Ray Tune trainable (via report_fn).

Cross-entropy over rating classes plus an MSE term on the expected rating, AdamW with warmup and
cosine decay, early stopping on a per-user validation set carved from train (the best epoch's
weights are kept). No global configuration, no environment reads, no ray.init().
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from rlsim.config import DataConfig, to_dict
from rlsim.data import holdout_validation, load_split
from rlsim.data.schema import RatingScale
from rlsim.embeddings import TextEncoder, item_embeddings
from rlsim.io import write_json, write_parquet
from rlsim.reward.config import RewardConfig
from rlsim.reward.features import FeatureTables, build_features
from rlsim.reward.model import VanillaTransformer
from rlsim.reward.predict import RewardPredictor

log = logging.getLogger(__name__)


def _tensors(ft: FeatureTables, df: pd.DataFrame, scale: RatingScale, device) -> dict[str, torch.Tensor]:
    idx = ft.encode(df["user_id"].to_numpy(), df["item_id"].to_numpy())
    t = {k: torch.as_tensor(v, device=device) for k, v in idx.items()}
    t["y"] = torch.as_tensor(scale.to_class(df["rating"].to_numpy()), device=device)
    t["r"] = torch.as_tensor(df["rating"].to_numpy(np.float32), device=device)
    return t


def _loss(model, logits, y, r, cfg: RewardConfig):
    loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
    if cfg.mse_weight > 0:
        loss = loss + cfg.mse_weight * F.mse_loss(model.expected(logits), r)
    return loss


@torch.no_grad()
def _validate(model, val: dict, cfg: RewardConfig, batch: int = 32768) -> dict:
    model.eval()
    keys = ("user", "item", "text", "demo", "self_r")
    logits = torch.cat([model(**{k: val[k][s:s + batch] for k in keys}) for s in range(0, len(val["y"]), batch)])
    exp = model.expected(logits)
    return {"val_loss": float(_loss(model, logits, val["y"], val["r"], cfg)),
            "val_rmse": float(torch.sqrt(torch.mean((exp - val["r"]) ** 2))),
            "val_accuracy": float((logits.argmax(1) == val["y"]).float().mean())}


def fit_one(ft: FeatureTables, fit_train: pd.DataFrame, val: pd.DataFrame, scale: RatingScale,
            cfg: RewardConfig, seed: int, report_fn: Callable[[dict], None] | None = None,
            member: int = 0) -> tuple[VanillaTransformer, list[dict]]:
    """Train one model; returns it with the best validation epoch's weights, and the epoch history."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    device = torch.device(cfg.device)
    model = VanillaTransformer(cfg, ft, scale.values).to(device)
    tr, va = _tensors(ft, fit_train, scale, device), _tensors(ft, val, scale, device)
    ids = {id(p) for p in model.id_parameters()}
    groups = [{"params": model.id_parameters(), "weight_decay": cfg.emb_weight_decay},
              {"params": [p for p in model.parameters() if id(p) not in ids], "weight_decay": cfg.weight_decay}]
    opt = torch.optim.AdamW(groups, lr=cfg.lr)
    n = len(tr["y"])
    steps = math.ceil(n / cfg.batch_size)
    n_epochs = cfg.epochs
    if cfg.schedule == "cosine" and cfg.decay_epochs:
        n_epochs = min(cfg.epochs, cfg.decay_epochs)
    total, warm = n_epochs * steps, max(1, int(cfg.warmup_epochs * steps))

    def lr_at(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.schedule == "constant":
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    gen = torch.Generator().manual_seed(seed)
    best, best_state, bad, history = math.inf, None, 0, []
    from tqdm.auto import tqdm

    bar = tqdm(total=n_epochs, desc=f"reward model{f' (member {member + 1})' if cfg.ensemble > 1 else ''}",
               unit="epoch", disable=not cfg.progress)
    for epoch in range(1, n_epochs + 1):
        t0 = time.perf_counter()
        model.train()
        perm = torch.randperm(n, generator=gen).to(device)
        total_loss = 0.0
        for s in range(0, n, cfg.batch_size):
            b = perm[s:s + cfg.batch_size]
            real_user, real_item = tr["user"][b], tr["item"][b]
            user, item = real_user, real_item
            if cfg.unknown_prob > 0:  # teach the unknown rows by hiding a few ids
                user = user.masked_fill(torch.rand(len(b), generator=gen).to(device) < cfg.unknown_prob, 0)
                item = item.masked_fill(torch.rand(len(b), generator=gen).to(device) < cfg.unknown_prob, 0)
            logits = model(user, item, tr["text"][b], tr["demo"][b], self_r=tr["self_r"][b],
                           real_user=real_user, real_item=real_item)
            loss = _loss(model, logits, tr["y"][b], tr["r"][b], cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total_loss += loss.item() * len(b)
        row = {"epoch": epoch, "train_loss": total_loss / n, **_validate(model, va, cfg),
               "seconds": time.perf_counter() - t0}
        if member:
            row["member"] = member
        history.append(row)
        log.info("epoch %d train_loss %.4f val_loss %.4f val_rmse %.4f val_acc %.4f (%.1fs)", epoch,
                 row["train_loss"], row["val_loss"], row["val_rmse"], row["val_accuracy"], row["seconds"])
        if report_fn is not None:
            report_fn(dict(row))
        bar.update(1)
        bar.set_postfix(val_rmse=f"{row['val_rmse']:.4f}")
        if row["val_rmse"] < best - 1e-5:
            best, bad = row["val_rmse"], 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            bad += 1
            if bad >= cfg.patience:
                break
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    return model.eval(), history


def training_summary(history: list[dict], metrics: dict, cfg: RewardConfig) -> dict:
    """The numbers a reader of the report wants: best validation epoch (per ensemble member: the
    weights kept), whether early stopping ended training, and validation beside test."""
    members: dict[int, list[dict]] = {}
    for h in history:
        members.setdefault(h.get("member", 0), []).append(h)
    best = [min(rows, key=lambda r: r["val_rmse"]) for rows in members.values()]
    planned = min(cfg.epochs, cfg.decay_epochs) if cfg.schedule == "cosine" and cfg.decay_epochs else cfg.epochs
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
                       report_fn: Callable[[dict], None] | None = None, dataset=None, split=None) -> dict:
    """Train (and evaluate) the reward model; writes OUT/checkpoint, metrics.json, per_user.parquet, plots."""
    from rlsim.reward.evaluate import evaluate_predictor, write_plots

    cfg.validate()
    t_start = time.perf_counter()
    dataset, split, text = prepare(data_cfg, dataset, split)
    fit_train, val = holdout_validation(split.train, cfg.val_frac, cfg.seed)
    ft = build_features(dataset.items, dataset.users, fit_train, text)
    models, history = [], []
    for k in range(cfg.ensemble):
        m, h = fit_one(ft, fit_train, val, dataset.scale, cfg, cfg.seed + 1000 * k, report_fn, member=k)
        models.append(m)
        history.extend(h)
    train_seconds = time.perf_counter() - t_start
    predictor = RewardPredictor(models, ft, dataset.scale, cfg, data=to_dict(data_cfg))
    metrics, per_user = evaluate_predictor(predictor, split.train, split.test, seed=data_cfg.seed,
                                           validation=val, fit_train=fit_train)
    epochs = [h["seconds"] for h in history]
    result = {"dataset": data_cfg.dataset, "split": split.summary(), **metrics,
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
