"""The end-to-end run: each stage writes OUT/<stage>/ (metrics.json last), and a rerun skips done stages.

Stages are plain functions ``fn(ctx, stage_dir) -> metrics`` in STAGES; `rlsim pipeline`, the
jobs/ entrypoints, the study (its reward model and candidates) and the tests all call
:func:`run_stage` / :func:`run_pipeline`. The context holds the typed RunConfig (rlsim.run_config). A stage
counts as done when its metrics.json exists, which is written only after everything else.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import pandas as pd

from rlsim.baselines import baseline_predictions, evaluate_baselines, fit_baselines
from rlsim.config import DataConfig
from rlsim.errors import ConfigError
from rlsim.io import read_json, write_json, write_parquet
from rlsim.metrics import (ndcg_summary, pearson, per_user_accuracy, per_user_gini,
                           per_user_ndcg, rating_histogram, rating_metrics, spearman)

if TYPE_CHECKING:
    from rlsim.run_config import RunConfig

log = logging.getLogger(__name__)

DEFAULT_STAGES = ["data", "baselines", "reward", "candidates", "policy", "personas", "evaluate"]


@dataclass
class PipelineConfig:
    """The `pipeline:` section: which stages run, and the evaluation's knobs."""

    stages: list[str] = field(default_factory=lambda: list(DEFAULT_STAGES))
    # NDCG cut-off shown in the boxplots and the gate table.
    k: int = 10
    # Users sampled for the offline persona stage (0 = all test users).
    persona_users: int = 30
    # Baselines drawn beside the reward model in the per-user plots.
    compare_baselines: list[str] = field(default_factory=lambda: ["bias", "mf"])
    # Simulators whose fidelity (micro, macro = sampled-rating histogram, discrimination, session)
    # the evaluate stage measures on the test split (reward_model needs the reward stage).
    fidelity: list[str] = field(default_factory=lambda: ["reward_model", "offline_persona", "bias", "mf"])


@dataclass
class RunContext:
    """What every stage sees: the typed run config (each stage takes its section), OUT."""

    run: "RunConfig"
    out: Path
    progress: bool = True
    # The persona stage's config as the edge resolved it (endpoint from the environment), and the
    # API key: held in memory only, never written (the effective config.yaml has no key).
    persona_cfg: Any = None
    api_key: str | None = field(default=None, repr=False)
    _loaded: tuple | None = None

    @property
    def data_cfg(self) -> DataConfig:
        return self.run.data

    @property
    def cfg(self) -> PipelineConfig:
        return self.run.pipeline

    def load(self):
        if self._loaded is None:
            from rlsim.data import load_split

            self._loaded = load_split(self.data_cfg)
        return self._loaded

    def stage_dir(self, name: str) -> Path:
        return self.out / name

    def stage_metrics(self, name: str) -> dict | None:
        """A finished stage's metrics; None while absent or incomplete (run_stage adds stage_seconds last)."""
        p = self.stage_dir(name) / "metrics.json"
        if not p.is_file():
            return None
        m = read_json(p)
        return m if "stage_seconds" in m else None


def make_context(run: "RunConfig", out: str | Path, progress: bool = True, persona_cfg=None,
                 api_key: str | None = None, loaded: tuple | None = None) -> RunContext:
    """The stages' context; ``loaded`` = (dataset, split) when the caller has them already."""
    cfg = run.pipeline
    unknown = [s for s in cfg.stages if s not in STAGES]
    if unknown:
        raise ConfigError(f"unknown pipeline stage(s) {unknown} (known: {', '.join(STAGES)})")
    if "sweep" in cfg.stages and "reward" in cfg.stages and cfg.stages.index("sweep") > cfg.stages.index("reward"):
        raise ConfigError("pipeline.stages: 'sweep' must come before 'reward' (the reward stage trains with its best)")
    return RunContext(run=run, out=Path(out), progress=progress, persona_cfg=persona_cfg, api_key=api_key,
                      _loaded=loaded)


def _need(module: str, stage: str):
    """Import a stage's module, or say plainly which stage needs what."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and module.startswith(exc.name.split(".")[0]) and exc.name.startswith("rlsim"):
            raise ConfigError(f"stage '{stage}' needs {module}, which is not available in this install") from None
        raise


# --------------------------------------------------------------------------- stages

def stage_data(ctx: RunContext, d: Path) -> dict:
    ds, split = ctx.load()
    write_parquet(split.train, d / "train.parquet")
    write_parquet(split.test, d / "test.parquet")
    return {**ds.summary(), **split.summary()}


def stage_baselines(ctx: RunContext, d: Path) -> dict:
    ds, split = ctx.load()
    return {"dataset": ds.name, "split": split.name,
            "baselines": evaluate_baselines(split.train, split.test, ds.scale, seed=ctx.data_cfg.seed)}


def _reward_cfg(ctx: RunContext):
    _need("rlsim.reward.config", "reward")
    return dataclasses.replace(ctx.run.reward).validate()  # a copy: stage_reward sets progress on it


def stage_reward(ctx: RunContext, d: Path) -> dict:
    """The reward model; when the sweep stage ran, with the sweep's best hyperparameters."""
    train_mod = _need("rlsim.reward.train", "reward")
    cfg = _reward_cfg(ctx)
    sweep = ctx.stage_metrics("sweep") if "sweep" in ctx.cfg.stages else None
    if sweep:
        cfg = dataclasses.replace(cfg, **sweep["best_config"]).validate()
    cfg.progress = ctx.progress
    ds, split = ctx.load()
    metrics = train_mod.train_reward_model(ctx.data_cfg, cfg, d, dataset=ds, split=split)
    metrics["hyperparameters_from"] = "sweep (OUT/sweep/best.yaml)" if sweep else "config reward: section"
    if sweep:
        metrics["sweep_best_config"] = sweep["best_config"]
    # Predictions on both sides of the split feed the per-user train-vs-test plots.
    predictor = _need("rlsim.reward.predict", "reward").RewardPredictor.load(d / "checkpoint")
    for side, pairs in (("train", split.train), ("test", split.test)):
        pred = predictor.predict(pairs["user_id"].to_numpy(), pairs["item_id"].to_numpy())
        write_parquet(pairs[["user_id", "item_id", "rating"]].assign(predicted=np.asarray(pred, float)),
                      d / f"predictions_{side}.parquet")
    return metrics


def stage_sweep(ctx: RunContext, d: Path) -> dict:
    from rlsim.tune import run_sweep

    tcfg = dataclasses.replace(ctx.run.tune)
    if tcfg.storage_path is None:
        tcfg.storage_path = str((d / "ray_results").resolve())
    ds, split = ctx.load()
    return run_sweep(ctx.data_cfg, _reward_cfg(ctx), tcfg, out_dir=d, dataset=ds, split=split)


def _candidates_cfg(ctx: RunContext):
    _need("rlsim.candidates", "candidates")
    return ctx.run.candidates.validate()


def stage_candidates(ctx: RunContext, d: Path) -> dict:
    ds, split = ctx.load()
    return _need("rlsim.candidates", "candidates").write_candidates(ctx.data_cfg, _candidates_cfg(ctx), d,
                                                                   dataset=ds, split=split)


def stage_policy(ctx: RunContext, d: Path) -> dict:
    """PPO over the candidates against the reward model (MF when the reward stage has not run),
    judged on held-out users."""
    run = _need("rlsim.policy.run", "policy")
    from rlsim.simulators.factory import SimulatorSpec

    ds, split = ctx.load()
    pcfg = ctx.run.policy.validate()
    cpath = ctx.stage_dir("candidates") / "candidates.parquet"
    cands = pd.read_parquet(cpath) if cpath.is_file() else None
    ckpt = ctx.stage_dir("reward") / "checkpoint"
    spec = SimulatorSpec("reward_model", str(ckpt)) if ckpt.is_dir() else SimulatorSpec("mf")
    train = run.train_policy(ctx.data_cfg, pcfg, spec, d / "train", candidates=cands, ccfg=_candidates_cfg(ctx),
                             persona_cfg=ctx.run.personas, dataset=ds, split=split, progress=ctx.progress)
    metrics = run.evaluate_policy(ctx.data_cfg, d / "train", d, persona_cfg=ctx.run.personas, dataset=ds,
                                  split=split)
    metrics["training"] = {k: train.get(k) for k in ("wall_seconds", "env_steps", "env_steps_per_s", "users")}
    return metrics


def _persona_cfg(ctx: RunContext):
    if ctx.persona_cfg is not None:
        return ctx.persona_cfg
    return ctx.run.personas.validate()


def _ray_running() -> bool:
    import ray

    return ray.is_initialized()


def stage_profiles(ctx: RunContext, d: Path) -> dict:
    """Persona profiles (personas.profile: structured, psych or lusifer) of the persona stage's users."""
    run = _need("rlsim.personas.run", "profiles")
    pcfg = _persona_cfg(ctx)
    return run.build_profiles_stage(ctx.data_cfg, pcfg, pcfg.profile, d, users=ctx.cfg.persona_users or None,
                                    api_key=ctx.api_key, use_ray=_ray_running(), progress=ctx.progress)


def stage_personas(ctx: RunContext, d: Path) -> dict:
    """Persona ratings of a user sample's held-out pairs through the Ray persona pool (the offline
    persona too), scored beside the reward model and the gate."""
    run = _need("rlsim.personas.run", "personas")
    ckpt = ctx.stage_dir("reward") / "checkpoint"
    profiles = ctx.stage_dir("profiles")
    return run.evaluate_stage(ctx.data_cfg, _persona_cfg(ctx), d, users=ctx.cfg.persona_users or None,
                              profiles=profiles if (profiles / "profiles.json").is_file() else None,
                              reward_checkpoint=ckpt if ckpt.is_dir() else None, ndcg_k=ctx.cfg.k,
                              api_key=ctx.api_key, use_ray=_ray_running(), progress=ctx.progress)


def _per_user_rows(df: pd.DataFrame, scale, k: int, model: str, side: str) -> pd.DataFrame:
    acc = per_user_accuracy(df, scale)
    nd = per_user_ndcg(df, ks=(k,)).set_index("user_id")[[f"ndcg@{k}"]]
    out = nd.join(acc, how="outer").reset_index()
    return out.assign(model=model, side=side)


def _model_predictions(ctx: RunContext) -> dict[str, dict[str, pd.DataFrame]]:
    """{model: {"train": df, "test": df}} with user_id, item_id, rating, predicted."""
    ds, split = ctx.load()
    preds: dict[str, dict[str, pd.DataFrame]] = {}
    rdir = ctx.stage_dir("reward")
    if (rdir / "predictions_test.parquet").is_file():
        preds["reward_model"] = {s: pd.read_parquet(rdir / f"predictions_{s}.parquet") for s in ("train", "test")}
    names = [n for n in ctx.cfg.compare_baselines]
    if names:
        models = fit_baselines(split.train, ds.scale, seed=ctx.data_cfg.seed)
        bad = [n for n in names if n not in models]
        if bad:
            raise ConfigError(f"pipeline.compare_baselines: unknown baseline(s) {bad}")
        for side, pairs in (("train", split.train), ("test", split.test)):
            p = baseline_predictions({n: models[n] for n in names}, pairs)
            for n in names:
                preds.setdefault(n, {})[side] = pairs[["user_id", "item_id", "rating"]].assign(predicted=p[n].to_numpy())
    return preds


FIDELITY_KEYS = ("rmse", "nll", "tv_sampled", "five_star_share", "real_five_star_share", "like_acc_1to1",
                 "like_acc_1to3", "like_acc_1to9", "session_nll_gain")


def _fidelity_row(f: dict) -> dict:
    return {**{k: f[k] for k in FIDELITY_KEYS}, "method": f["simulator"].get("method"),
            "within_1": f["micro"].get("within_1"), "spearman_per_user": f["micro"].get("spearman_per_user")}


def simulator_fidelity(ctx: RunContext) -> dict[str, dict]:
    """rlsim.simulators.fidelity for each simulator in pipeline.fidelity on the test split."""
    from rlsim.personas.config import PersonaConfig
    from rlsim.simulators.factory import SimulatorSpec, simulator_factory
    from rlsim.simulators.fidelity import fidelity

    ds, split = ctx.load()
    kinds = {"reward_model": "model", "offline_persona": "personas", "bias": "bias", "mf": "mf"}
    bad = [n for n in ctx.cfg.fidelity if n not in kinds]
    if bad:
        raise ConfigError(f"pipeline.fidelity: unknown simulator(s) {bad} (known: {', '.join(kinds)})")
    ckpt = ctx.stage_dir("reward") / "checkpoint"
    pcfg = ctx.run.personas
    if pcfg.backend != "offline":
        pcfg = PersonaConfig(offline=pcfg.offline)  # the fidelity table's persona row is the offline one
    out = {}
    for name in ctx.cfg.fidelity:
        if name == "reward_model" and not ckpt.is_dir():
            continue
        spec = SimulatorSpec(kinds[name], str(ckpt) if name == "reward_model" else None)
        sim = simulator_factory(spec, ds, split.train, seed=ctx.data_cfg.seed, persona_cfg=pcfg,
                                text_model=ctx.data_cfg.text_model, cache_dir=ctx.data_cfg.cache_dir)()
        out[name] = fidelity(sim, split.train, split.test, seed=ctx.data_cfg.seed)
    return out


def stage_evaluate(ctx: RunContext, d: Path) -> dict:
    """Per-user accuracy/NDCG (train vs test), Gini correlations, histograms, and every stage's numbers
    beside the baseline gate."""
    ds, split = ctx.load()
    k = ctx.cfg.k
    preds = _model_predictions(ctx)
    rows = [_per_user_rows(df, ds.scale, k, m, side) for m, sides in preds.items() for side, df in sides.items()]
    per_user = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()
    gini = per_user_gini(split.train, ds.scale)
    n_train = split.train.groupby("user_id").size().rename("n_train")
    if len(per_user):
        per_user = per_user.merge(gini.reset_index(), on="user_id", how="left").merge(
            n_train.reset_index(), on="user_id", how="left")
    write_parquet(per_user, d / "per_user.parquet")

    gate = (ctx.stage_metrics("baselines") or stage_baselines(ctx, d))["baselines"]
    models = {}
    correlations = {}
    for m, sides in preds.items():
        test = sides["test"]
        mm = rating_metrics(test["rating"], test["predicted"], ds.scale)
        # ndcg@10 always, to sit beside the gate's; ndcg@k for the plots' cut-off.
        mm.update(ndcg_summary(test, ks=tuple(sorted({10, k}))))
        models[m] = mm
        pu = per_user[(per_user.model == m) & (per_user.side == "test")]
        correlations[m] = {f"{metric}~{col}": {"spearman": spearman(pu[col], pu[metric]),
                                                "pearson": pearson(pu[col], pu[metric])}
                           for metric in ("accuracy", f"ndcg@{k}") for col in ("gini", "n_train")}
    real = split.test["rating"].to_numpy()
    fid = simulator_fidelity(ctx)
    # Macro fidelity: ratings SAMPLED from each simulator (one per test pair) against the real test
    # histogram; a point prediction snapped to the scale would hide the spread.
    histograms = {"values": ds.scale.values.tolist(), "real_test": rating_histogram(real, ds.scale).tolist(),
                  **{name: f["macro"]["sampled_histogram"] for name, f in fid.items()}}
    personas = ctx.stage_metrics("personas")
    out = {"k": k, "models": models, "baselines": gate, "correlations": correlations,
           "histograms": histograms, "fidelity": {name: _fidelity_row(f) for name, f in fid.items()},
           "gini": {"mean": float(gini.mean()), "median": float(gini.median()), "n_users": int(len(gini))},
           "notes": sorted({f["session"]["note"] for f in fid.values() if f["session"].get("note")})}
    policy = ctx.stage_metrics("policy")
    if policy:
        out["policy"] = {k2: policy.get(k2) for k2 in (
            "policy", "random", "popularity", "greedy", "simulator_oracle", "real_oracle", "gap_closed",
            "real_hit_rate", "held_out_users", "ndcg", "greedy_source", "like_threshold", "train_users", "reward")}
    if personas:
        out["personas"] = {k2: personas.get(k2) for k2 in ("persona", "reward_model", "baselines", "users",
                                                            "coverage", "backend") if k2 in personas}
    return out


STAGES: dict[str, Callable[[RunContext, Path], dict]] = {
    "data": stage_data,
    "baselines": stage_baselines,
    "reward": stage_reward,
    "sweep": stage_sweep,
    "candidates": stage_candidates,
    "policy": stage_policy,
    "profiles": stage_profiles,
    "personas": stage_personas,
    "evaluate": stage_evaluate,
}


# --------------------------------------------------------------------------- running

def run_stage(ctx: RunContext, name: str, force: bool = False) -> tuple[dict, bool]:
    """(metrics, ran): run one stage unless its metrics.json already exists."""
    if name not in STAGES:
        raise ConfigError(f"unknown stage '{name}' (known: {', '.join(STAGES)})")
    d = ctx.stage_dir(name)
    done = ctx.stage_metrics(name)
    if done is not None and not force:
        log.info("stage %s: done already (%s), skipping", name, d / "metrics.json")
        return done, False
    d.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    metrics = STAGES[name](ctx, d)
    metrics = {**metrics, "stage_seconds": round(time.time() - t0, 2)}
    write_json(d / "metrics.json", metrics)
    return metrics, True


def run_pipeline(ctx: RunContext, force: bool = False, report: bool = True) -> dict:
    """Run ctx.cfg.stages in order, then write OUT/metrics.json (all stages) and OUT/report.html."""
    from tqdm.auto import tqdm

    ctx.out.mkdir(parents=True, exist_ok=True)
    all_metrics: dict[str, Any] = {}
    ran = []
    bar = tqdm(ctx.cfg.stages, desc="pipeline", unit="stage", disable=not ctx.progress)
    for name in bar:
        bar.set_postfix_str(name)
        # Evaluation reads the others' outputs, so it is redone whenever anything before it ran.
        metrics, did = run_stage(ctx, name, force=force or (name == "evaluate" and bool(ran)))
        if did:
            ran.append(name)
        all_metrics[name] = metrics
    summary = {"dataset": ctx.data_cfg.dataset, "split": ctx.data_cfg.split, "stages": all_metrics, "ran": ran}
    write_json(ctx.out / "metrics.json", summary)
    if report:
        from rlsim.report import write_report

        per_user_path = ctx.stage_dir("evaluate") / "per_user.parquet"
        per_user = pd.read_parquet(per_user_path) if per_user_path.is_file() else None
        write_report(summary, ctx.out, per_user=per_user)
    return summary
