"""Ray Tune sweep of the reward model: ASHA over lr, width, layers, heads, dropout, batch size.

Each trial is `train_reward_model` with `tune.report` as its per-epoch report_fn, so ASHA stops
weak trials after `grace_period` epochs. With reward.workers >= 1 a trial is a Ray Train run
(TorchTrainer with that many workers, 1 CPU each, on top of the trial's own cpus_per_trial) whose
epoch reports reach Tune through TuneReportCallback. The experiment lives at <storage_path>/<name> (a local
folder or a pyarrow filesystem URI such as file:///... or s3://...), and a second call with
resume=True continues it with Tuner.restore. The best trial's config is exported as a YAML
that `rlsim reward train --config best.yaml` accepts (sections data + reward).

Nothing here calls ray.init(): the caller (the CLI, the pipeline command or a job) starts or joins
Ray once, so the sweep uses that Ray's CPUs and temp dir, and so do the stages after it.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlsim.config import DataConfig, dump_yaml, to_dict
from rlsim.errors import ConfigError
from rlsim.io import write_json

log = logging.getLogger(__name__)

SAMPLERS = ("choice", "grid", "uniform", "loguniform", "randint")


def default_search_space() -> dict[str, Any]:
    return {
        "lr": {"loguniform": [3e-4, 5e-3]},
        "dim": {"choice": [32, 64]},
        "layers": {"choice": [1, 2]},
        "heads": {"choice": [2, 4]},
        "dropout": {"uniform": [0.0, 0.3]},
        "batch_size": {"choice": [256, 512, 1024]},
    }


@dataclass
class TuneConfig:
    """The `tune:` YAML section."""

    num_samples: int = 8
    max_concurrent: int = 2
    # ASHA: every trial runs at least grace_period epochs; max_epochs caps them all (reward.epochs).
    grace_period: int = 2
    max_epochs: int = 8
    reduction_factor: int = 2
    metric: str = "val_rmse"
    mode: str = "min"
    # Local folder or pyarrow URI (file:///..., s3://bucket/prefix, gs://...); None = ~/ray_results.
    storage_path: str | None = None
    name: str = "reward_sweep"
    cpus_per_trial: float = 1.0
    seed: int = 0
    # {param: value | {choice|grid: [...]} | {uniform|loguniform|randint: [lo, hi]}}; params are RewardConfig fields.
    search_space: dict[str, Any] = field(default_factory=default_search_space)

    def validate(self) -> "TuneConfig":
        if self.mode not in ("min", "max"):
            raise ConfigError(f"tune.mode must be min or max, got {self.mode!r}")
        for name in ("num_samples", "max_concurrent", "grace_period", "max_epochs", "reduction_factor"):
            if getattr(self, name) < 1:
                raise ConfigError(f"tune.{name} must be >= 1")
        if self.grace_period > self.max_epochs:
            raise ConfigError("tune.grace_period must be <= tune.max_epochs")
        if not isinstance(self.search_space, dict) or not self.search_space:
            raise ConfigError("tune.search_space must be a non-empty mapping")
        return self


def build_param_space(space: dict[str, Any], reward_fields: set[str] | None = None) -> dict[str, Any]:
    """Translate the YAML search space into Ray Tune samplers, rejecting unknown params and samplers."""
    from ray import tune

    out = {}
    for name, spec in space.items():
        if reward_fields is not None and name not in reward_fields:
            raise ConfigError(f"tune.search_space: '{name}' is not a reward config field")
        if not isinstance(spec, dict):
            out[name] = spec
            continue
        if len(spec) != 1 or next(iter(spec)) not in SAMPLERS:
            raise ConfigError(f"tune.search_space.{name}: expected one of {SAMPLERS} as the only key, got {spec}")
        kind, args = next(iter(spec.items()))
        if not isinstance(args, list) or not args:
            raise ConfigError(f"tune.search_space.{name}.{kind} needs a list")
        if kind == "choice":
            out[name] = tune.choice(args)
        elif kind == "grid":
            out[name] = tune.grid_search(args)
        else:
            if len(args) != 2:
                raise ConfigError(f"tune.search_space.{name}.{kind} needs [low, high]")
            out[name] = getattr(tune, kind)(*args)
    return out


def _trial(config: dict, data_cfg: DataConfig, base, dataset, split, threads: int) -> None:
    """One Tune trial: the reward model with this trial's hyperparameters, reporting every epoch."""
    import torch
    from ray import tune

    from rlsim.reward.train import train_reward_model

    torch.set_num_threads(max(1, threads))
    cfg = dataclasses.replace(base, **config, progress=False, threads=max(1, threads))
    if cfg.workers:
        # The trial is a Ray Train run: its workers' per-epoch reports reach Tune (and ASHA) through
        # this callback. Ray Train V2 (Ray's default) drops Tuner(trainer): a trial launches the trainer.
        from ray.tune.integration.ray_train import TuneReportCallback

        train_reward_model(data_cfg, cfg, None, dataset=dataset, split=split, train_callbacks=[TuneReportCallback()])
    else:
        train_reward_model(data_cfg, cfg, None, report_fn=tune.report, dataset=dataset, split=split)


def experiment_path(tcfg: TuneConfig) -> str:
    root = tcfg.storage_path or str(Path("~/ray_results").expanduser())
    return root.rstrip("/") + "/" + tcfg.name


def best_config_yaml(data_cfg: DataConfig, base, best_config: dict, max_epochs: int) -> dict:
    """The YAML `rlsim reward train --config` reads: data + the base reward section with the winner's values."""
    reward = {**to_dict(base), **best_config, "epochs": max_epochs}
    return {"data": to_dict(data_cfg), "reward": reward}


def run_sweep(data_cfg: DataConfig, base, tcfg: TuneConfig, out_dir: str | Path | None = None,
              dataset=None, split=None, resume: bool = False) -> dict:
    """Run (or, with resume=True and an existing experiment, restore and finish) the sweep.

    Writes OUT/best.yaml, OUT/trials.csv and OUT/metrics.json when out_dir is given; returns the
    metrics (best config and score, trial counts, experiment path).
    """
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from rlsim.errors import require_ray
    from rlsim.reward.train import prepare

    require_ray("the reward sweep")
    tcfg.validate()
    base = dataclasses.replace(base, epochs=tcfg.max_epochs, progress=False)
    base.validate()
    fields = {f.name for f in dataclasses.fields(base)}
    param_space = build_param_space(tcfg.search_space, fields)
    if tcfg.storage_path and "://" not in tcfg.storage_path:
        tcfg = dataclasses.replace(tcfg, storage_path=str(Path(tcfg.storage_path).expanduser().resolve()))
    # Load once (and embed item text once) in the driver; trials get it through the object store.
    dataset, split, _ = prepare(data_cfg, dataset, split)
    trainable = tune.with_parameters(_trial, data_cfg=data_cfg, base=base, dataset=dataset, split=split,
                                     threads=int(max(1, tcfg.cpus_per_trial)))
    trainable = tune.with_resources(trainable, {"cpu": tcfg.cpus_per_trial})
    path = experiment_path(tcfg)
    if resume and tune.Tuner.can_restore(path):
        log.info("restoring the sweep at %s", path)
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True,
                                   param_space=param_space)
    else:
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=tcfg.max_epochs,
                                  grace_period=tcfg.grace_period, reduction_factor=tcfg.reduction_factor)
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(metric=tcfg.metric, mode=tcfg.mode, scheduler=scheduler,
                                        num_samples=tcfg.num_samples, max_concurrent_trials=tcfg.max_concurrent),
            run_config=tune.RunConfig(name=tcfg.name, storage_path=tcfg.storage_path, verbose=1),
        )
    grid = tuner.fit()
    errors = len(grid.errors)
    if errors == len(grid):
        raise ConfigError(f"every trial of the sweep failed; first error: {grid.errors[0]}")
    # scope="all": early stopping keeps each trial's best epoch, so compare trials on their best epoch.
    best = grid.get_best_result(metric=tcfg.metric, mode=tcfg.mode, scope="all")
    df = best.metrics_dataframe
    best_row = df.loc[df[tcfg.metric].idxmin() if tcfg.mode == "min" else df[tcfg.metric].idxmax()]
    best_config = {k: best.config[k] for k in tcfg.search_space}
    metrics = {
        "experiment_path": path,
        "n_trials": len(grid),
        "n_errors": errors,
        "best_config": best_config,
        "best": {k: float(best_row[k]) for k in ("val_rmse", "val_accuracy", "val_loss", "train_loss")
                 if k in best_row},
        "best_epoch": int(best_row["training_iteration"]),
        "metric": tcfg.metric,
        "mode": tcfg.mode,
        "tune": to_dict(tcfg),
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        dump_yaml(best_config_yaml(data_cfg, base, best_config, tcfg.max_epochs), out / "best.yaml")
        table = grid.get_dataframe(filter_metric=tcfg.metric, filter_mode=tcfg.mode)
        keep = [c for c in table.columns if c.startswith("config/") or c in
                ("trial_id", "training_iteration", "val_rmse", "val_accuracy", "val_loss", "train_loss")]
        table[keep].to_csv(out / "trials.csv", index=False)
        write_json(out / "metrics.json", metrics)
    return metrics
