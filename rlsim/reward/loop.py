"""The v-tf reward model's training loop, shared by the in-process fit_one and the Ray Train workers
of rlsim.reward.distributed (run_epochs): tensors of a ratings frame, the loss (cross-entropy over
rating classes plus an MSE term on the expected rating, and the choice head's BCE), AdamW with warmup
and cosine decay, validation sums, early stopping (the best epoch's weights are kept).
"""

from __future__ import annotations

import logging
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from rlsim.data.schema import RatingScale
from rlsim.reward.config import RewardConfig
from rlsim.reward.features import FeatureTables
from rlsim.reward.model import VanillaTransformer, csr_runs

log = logging.getLogger(__name__)


def tensors(ft: FeatureTables, df: pd.DataFrame, scale: RatingScale, device,
             choice: bool = False) -> dict[str, torch.Tensor]:
    idx = ft.encode(df["user_id"].to_numpy(), df["item_id"].to_numpy())
    t = {k: torch.as_tensor(v, device=device) for k, v in idx.items()}
    t["y"] = torch.as_tensor(scale.to_class(df["rating"].to_numpy()), device=device)
    t["r"] = torch.as_tensor(df["rating"].to_numpy(np.float32), device=device)
    if choice:  # what the choice loss draws its unrated movies from
        t["own_watch"] = torch.as_tensor(ft.in_history(idx["user"], idx["item"]), device=device)
        t["text_of_item"] = torch.as_tensor(np.r_[0, ft._lookup(ft._t, ft.item_ids)], device=device)
        t["hist_keys"] = torch.as_tensor(ft._hist_keys, device=device)
        # The same ratings as CSR rows (user -> rated items): the "dot" head masks its pool with them.
        t["hist_rows"] = torch.searchsorted(t["hist_keys"], torch.arange(ft.n_users + 1, device=device) * ft.n_items)
        t["hist_cols"] = t["hist_keys"] % ft.n_items
    return t


def _choice_batch(model, tr: dict, b: torch.Tensor, user, item, real_user, real_item, k: int,
                  gen: torch.Generator, odds: int | None = None) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """The batch's picks followed by k movies per pick drawn at random (the user never rated them):
    model inputs, choice labels (1 pick, 0 passed over) and weights (0 for a draw that was in fact rated;
    odds / k otherwise, so k draws stand for `odds` unrated movies per pick)."""
    device = b.device
    n_items = model.item_emb.num_embeddings
    nu = real_user.repeat_interleave(k)
    ni = torch.randint(1, n_items, (len(nu),), generator=gen).to(device)
    rated = rated_mask(tr["hist_keys"], nu, ni, n_items)
    n = len(b)
    inputs = {"user": torch.cat([user, nu]), "item": torch.cat([item, ni]),
              "text": torch.cat([tr["text"][b], tr["text_of_item"][ni]]),
              "demo": torch.cat([tr["demo"][b], tr["demo"][b].repeat_interleave(k)]),
              "self_r": torch.cat([tr["self_r"][b], torch.zeros(len(nu), device=device)]),
              "real_user": torch.cat([real_user, nu]), "real_item": torch.cat([real_item, ni]),
              "own_watch": torch.cat([tr["own_watch"][b], torch.zeros(len(nu), device=device)])}
    labels = torch.cat([torch.ones(n, device=device), torch.zeros(len(nu), device=device)])
    weights = torch.cat([torch.ones(n, device=device), (~rated).float() * ((odds or k) / k)])
    return inputs, labels, weights


def rated_mask(hist_keys: torch.Tensor, users: torch.Tensor, items: torch.Tensor, n_items: int) -> torch.Tensor:
    """Which (user, item) rows of the broadcast users x items are training ratings (hist_keys: the
    sorted user * n_items + item keys of FeatureTables)."""
    keys = users * n_items + items
    if not len(hist_keys):
        return torch.zeros_like(keys, dtype=torch.bool)
    pos = torch.searchsorted(hist_keys, keys.contiguous()).clamp(max=len(hist_keys) - 1)
    return hist_keys[pos] == keys


def pool_batch(tr: dict, real_user: torch.Tensor, n_items: int, cfg: RewardConfig,
               gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The "dot" head's negatives: cfg.choice_pool movies drawn at random for the whole batch, and
    weights [batch, pool] that make them cfg.choice_negatives unrated movies per pick (0 where the
    user rated the movie: a rated movie is never passed over)."""
    device = real_user.device
    pool = torch.randint(1, n_items, (cfg.choice_pool,), generator=gen).to(device)
    # The batch users' rated movies as a dense [batch, n_items] mask (their CSR rows scattered): a
    # gather per (pick, pool movie), where a search of every pair's key costs 10x more.
    starts = tr["hist_rows"][real_user]
    lengths = tr["hist_rows"][real_user + 1] - starts
    base, within, _ = csr_runs(starts, lengths)
    row = torch.repeat_interleave(torch.arange(len(real_user), device=device), lengths)
    rated = torch.zeros(len(real_user), n_items, dtype=torch.bool, device=device)
    rated[row, tr["hist_cols"][base + within]] = True
    return pool, (~rated[:, pool]).float() * (cfg.choice_negatives / cfg.choice_pool)


def choice_loss(pick: torch.Tensor, pool_logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy per pick: the pick against its weighted unrated movies (summed over the batch)."""
    return (F.binary_cross_entropy_with_logits(pick, torch.ones_like(pick), reduction="sum")
            + F.binary_cross_entropy_with_logits(pool_logits, torch.zeros_like(pool_logits), weight=weights,
                                                 reduction="sum"))


def _loss(model, logits, y, r, cfg: RewardConfig):
    loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
    if cfg.mse_weight > 0:
        loss = loss + cfg.mse_weight * F.mse_loss(model.expected(logits), r)
    return loss


@torch.no_grad()
def validation_sums(model, val: dict, cfg: RewardConfig, batch: int = 32768) -> torch.Tensor:
    """[loss sum, squared-error sum, correct, count] over these rows: sums, so that workers holding
    shards of the validation set can add theirs up (validation_metrics turns them into means)."""
    model.eval()
    keys = ("user", "item", "text", "demo", "self_r")
    sums = torch.zeros(4, dtype=torch.float64)
    for s in range(0, len(val["y"]), batch):
        logits = model(**{k: val[k][s:s + batch] for k in keys})
        y, r = val["y"][s:s + batch], val["r"][s:s + batch]
        sq = (model.expected(logits) - r) ** 2
        loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing, reduction="sum")
        if cfg.mse_weight > 0:
            loss = loss + cfg.mse_weight * sq.sum()
        sums += torch.stack([loss.double(), sq.sum().double(), (logits.argmax(1) == y).sum().double(),
                             torch.tensor(float(len(y)), dtype=torch.float64)]).cpu()
    return sums


def validation_metrics(sums: torch.Tensor) -> dict:
    loss, sq, correct, n = (float(v) for v in sums)
    n = max(n, 1.0)
    return {"val_loss": loss / n, "val_rmse": math.sqrt(sq / n), "val_accuracy": correct / n}


def _validate(model, val: dict, cfg: RewardConfig) -> dict:
    return validation_metrics(validation_sums(model, val, cfg))


def planned_epochs(cfg: RewardConfig) -> int:
    """The cosine reaches zero after decay_epochs: training ends there."""
    if cfg.schedule == "cosine" and cfg.decay_epochs:
        return min(cfg.epochs, cfg.decay_epochs)
    return cfg.epochs


def steps_per_epoch(n: int, cfg: RewardConfig) -> tuple[int, int]:
    """(batches of a whole epoch over n examples, batches actually run: at most cfg.max_batches)."""
    full = math.ceil(n / cfg.batch_size)
    return full, min(full, cfg.max_batches) if cfg.max_batches else full


def _optimizer(model: VanillaTransformer, cfg: RewardConfig, steps: int):
    """AdamW (heavier decay on the ID tables) with linear warmup then cosine decay over the planned steps."""
    ids = {id(p) for p in model.id_parameters()}
    groups = [{"params": model.id_parameters(), "weight_decay": cfg.emb_weight_decay},
              {"params": [p for p in model.parameters() if id(p) not in ids], "weight_decay": cfg.weight_decay}]
    opt = torch.optim.AdamW(groups, lr=cfg.lr)
    total, warm = planned_epochs(cfg) * steps, max(1, int(cfg.warmup_epochs * steps))

    def lr_at(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.schedule == "constant":
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_at)


def train_step(net, opt, sched, tr: dict, b: torch.Tensor, cfg: RewardConfig, gen: torch.Generator) -> float:
    """One optimiser step on the rows b of tr; returns the batch's summed loss. net is the model or
    its DistributedDataParallel wrapper (whose backward also averages the gradients over workers)."""
    model = getattr(net, "module", net)
    device = b.device
    real_user, real_item = tr["user"][b], tr["item"][b]
    user, item = real_user, real_item
    if cfg.unknown_prob > 0:  # teach the unknown rows by hiding a few ids
        user = user.masked_fill(torch.rand(len(b), generator=gen).to(device) < cfg.unknown_prob, 0)
        item = item.masked_fill(torch.rand(len(b), generator=gen).to(device) < cfg.unknown_prob, 0)
    if not model.has_choice:
        logits = net(user, item, tr["text"][b], tr["demo"][b], self_r=tr["self_r"][b],
                     real_user=real_user, real_item=real_item)
        loss = _loss(model, logits, tr["y"][b], tr["r"][b], cfg)
    elif model.choice_user is not None:  # "dot": the picks against one shared pool of unrated movies
        pool, weights = pool_batch(tr, real_user, model.item_emb.num_embeddings, cfg, gen)
        logits, pick, pool_logits = net(user, item, tr["text"][b], tr["demo"][b], self_r=tr["self_r"][b],
                                        real_user=real_user, real_item=real_item, own_watch=tr["own_watch"][b],
                                        head="both", pool_item=pool, pool_text=tr["text_of_item"][pool])
        loss = _loss(model, logits, tr["y"][b], tr["r"][b], cfg) + cfg.choice_weight * (
            choice_loss(pick, pool_logits, weights) / len(b))
    else:  # "joint": rating the picks and choosing them over unrated movies, in one forward
        inputs, labels, weights = _choice_batch(model, tr, b, user, item, real_user, real_item,
                                                cfg.choice_draws or cfg.choice_negatives, gen,
                                                cfg.choice_negatives)
        logits, pick = net(**inputs, head="both", n_rated=len(b))
        loss = _loss(model, logits, tr["y"][b], tr["r"][b], cfg) + cfg.choice_weight * (
            F.binary_cross_entropy_with_logits(pick, labels, weight=weights, reduction="sum") / len(b))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    return loss.item() * len(b)


@dataclass
class EpochHooks:
    """What differs between the in-process loop and a Ray Train worker: which rows make each
    batch, how validation is computed, how the loss sums are added up over workers, and what
    happens after each epoch (a worker reports it, with a checkpoint at the end)."""

    batches: Callable[[], list[torch.Tensor]]  # one epoch's row indices, drawn at the epoch's start
    validate: Callable[[], dict]
    total: Callable[[float, int], tuple[float, int]] = lambda loss, seen: (loss, seen)
    on_epoch: Callable[[dict, dict | None, list[dict], bool], None] | None = None  # row, best state, history, last


def run_epochs(net, tr: dict, cfg: RewardConfig, steps: int, gen: torch.Generator, hooks: EpochHooks,
               report_fn: Callable[[dict], None] | None = None, member: int = 0) -> tuple[list[dict], dict | None]:
    """The training loop of both paths: epochs of train_step, validation, early stopping. Returns the
    epoch history and the best validation epoch's state_dict."""
    model = getattr(net, "module", net)
    opt, sched = _optimizer(model, cfg, steps)
    n_epochs = planned_epochs(cfg)
    best, best_state, bad, history = math.inf, None, 0, []
    from tqdm.auto import tqdm

    model.training_cache(keep=True)
    bar = tqdm(total=n_epochs, desc=f"reward model{f' (member {member + 1})' if cfg.ensemble > 1 else ''}",
               unit="epoch", disable=not cfg.progress)
    for epoch in range(1, n_epochs + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        net.train()
        total_loss, seen = 0.0, 0
        for b in hooks.batches():
            total_loss += train_step(net, opt, sched, tr, b, cfg, gen)
            seen += len(b)
        train_seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
        total_loss, seen = hooks.total(total_loss, seen)
        row = {"epoch": epoch, "train_loss": total_loss / seen, **hooks.validate(),
               "seconds": time.perf_counter() - t0, "train_seconds": train_seconds,
               "ratings_per_s": seen / max(train_seconds, 1e-9),
               # this process's CPU time: what the rate would be with a core each, on a shared machine
               "ratings_per_cpu_s": seen / max(cpu_seconds, 1e-9)}
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
        last = bad >= cfg.patience or epoch == n_epochs
        if hooks.on_epoch is not None:
            hooks.on_epoch(row, best_state, history, last)
        if last:
            break
    bar.close()
    model.training_cache(keep=False)
    return history, best_state


def training_threads(cfg: RewardConfig) -> int:
    """Torch threads for training in this process: reward.threads, or (0) the cores it may use."""
    if cfg.threads:
        return cfg.threads
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # no affinity on this platform
        return max(1, os.cpu_count() or 1)


@contextmanager
def torch_threads(n: int):
    """torch.set_num_threads(n) for the block, then back to what it was."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fit_one(ft: FeatureTables, fit_train: pd.DataFrame, val: pd.DataFrame, scale: RatingScale,
            cfg: RewardConfig, seed: int, report_fn: Callable[[dict], None] | None = None,
            member: int = 0) -> tuple[VanillaTransformer, list[dict]]:
    """Train one model in this process (with training_threads(cfg) torch threads); returns it with the
    best validation epoch's weights, and the epoch history."""
    with torch_threads(training_threads(cfg)):
        return _fit_one(ft, fit_train, val, scale, cfg, seed, report_fn, member)


def _fit_one(ft, fit_train, val, scale, cfg, seed, report_fn, member):
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    device = torch.device(cfg.device)
    model = VanillaTransformer(cfg, ft, scale.values).to(device)
    tr, va = tensors(ft, fit_train, scale, device, cfg.choice_weight > 0), tensors(ft, val, scale, device)
    n = len(tr["y"])
    steps = steps_per_epoch(n, cfg)[1]
    gen = torch.Generator().manual_seed(seed)

    def batches() -> list[torch.Tensor]:
        perm = torch.randperm(n, generator=gen).to(device)
        return [perm[s:s + cfg.batch_size] for s in range(0, steps * cfg.batch_size, cfg.batch_size)]

    history, best_state = run_epochs(model, tr, cfg, steps, gen,
                                     EpochHooks(batches, lambda: _validate(model, va, cfg)), report_fn, member)
    if best_state is not None:
        model.load_state_dict(best_state)
    return model.eval(), history


