"""Growth curves: each stage's wall time and peak memory at 100k / 1M / 10M ratings.

    python bench/scaling.py [--sizes 100k 1m 10m] [--source ml-latest-small] [--stages ...]
                            [--data-dir DIR] [--cache-dir DIR] [--out bench/results/scaling.json]

The data are the synthetic presets (`synthetic-<size>`, rlsim.data.synthetic) generated from the
source's statistics, with the user and item counts of the MovieLens release of that size; the
split is `temporal`. Every (stage, size) runs in a fresh subprocess, so peak memory (the
process's own ru_maxrss, inputs included) never mixes between stages; `seconds` is the stage's
own work, `setup_seconds` loading its inputs (from the warm Parquet caches). Stages:

  generate       synthetic data generated into the cache (streamed by chunks of users)
  data           load the dataset + temporal split (what every stage starts with)
  baselines      fit and evaluate global/user/rounded/bias/MF (the baseline gate)
  embeddings     genre/plot/full-text vectors of every item from an empty cache (default backend)
  candidates     RankZero top-25 (popularity + FAISS similarity) and recall@25
  env_build      build_env_data: the env's feature tables
  reward_epoch   one epoch of the v-tf reward model (measured over up to --reward-steps batches and
                 scaled to the whole epoch when the epoch is longer: see "extrapolated")
  ppo_iteration  build RLlib PPO and run one iteration against the MF simulator (sampled ratings,
                 driver-side env runner; EnvData is shared, never deep-copied by RLlib)
  persona_offline  offline persona fit + rating the held-out pairs of --persona-users users
  persona_server   the openai backend against the test server (tests/fake_openai.py) for
                   --server-users users' held-out pairs, no Ray

Writes bench/results/scaling.json ("stages": {stage: {size: {"seconds", "peak_rss_mb", ...}}},
"growth": log-log slopes between sizes) and bench/results/scaling.png (log-log curves).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/, also when imported from elsewhere
from _child import measure_child  # noqa: E402

STAGES = ["generate", "data", "baselines", "embeddings", "candidates", "env_build", "reward_epoch",
          "ppo_iteration", "persona_offline", "persona_server"]
SIZES = {"100k": 100_000, "1m": 1_000_000, "10m": 10_000_000, "25m": 25_000_000}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------ one stage (child process)

def _mark_setup(info: dict) -> None:
    """Inputs loaded: the stage's own clock starts; the peak so far is the inputs' share."""
    info["setup_done"] = time.perf_counter()
    info["setup_peak_rss_mb"] = round(_rss_mb())


class Ctx:
    def __init__(self, args):
        self.args = args
        self.name = f"synthetic-{args.size}" + (f"-from-{args.source}" if args.source != "ml-latest-small" else "")
        self.work = Path(args.work) / self.name
        self.work.mkdir(parents=True, exist_ok=True)
        self._loaded = None

    def dcfg(self, **kw):
        from rlsim.config import DataConfig

        return DataConfig(dataset=self.name, data_dir=self.args.data_dir, cache_dir=self.args.cache_dir,
                          split="temporal", download=False, **kw)

    def load(self):
        if self._loaded is None:
            from rlsim.data import load_split

            self._loaded = load_split(self.dcfg())
        return self._loaded

    def vectors(self):
        from rlsim.embeddings import TextEncoder, item_embeddings

        ds, _ = self.load()
        return item_embeddings(ds.items, TextEncoder(self.dcfg().text_model, self.args.cache_dir))


def stage_generate(ctx: Ctx, info: dict):
    from rlsim.data import load_movielens
    from rlsim.data.synthetic import _cache_folder, generate, preset_config

    cfg = preset_config(ctx.name)
    src = load_movielens(cfg.source, data_dir=ctx.args.data_dir, cache_dir=ctx.args.cache_dir, download=False)
    # Into the cache folder the data layer reads, so the later stages load this very dataset.
    folder = _cache_folder(Path(ctx.args.cache_dir).expanduser(), ctx.name, cfg, src)
    shutil.rmtree(folder, ignore_errors=True)
    _mark_setup(info)
    generate(src, cfg, folder, name=ctx.name)
    info["stage_done"] = time.perf_counter()
    info["ratings"] = cfg.n_ratings
    info["bytes"] = sum(p.stat().st_size for p in folder.iterdir())


def stage_data(ctx: Ctx, info: dict):
    _mark_setup(info)
    ds, split = ctx.load()
    info.update(ratings=len(ds.ratings), users=int(ds.ratings.user_id.nunique()), items=len(ds.items),
                train=len(split.train), test=len(split.test))


def stage_baselines(ctx: Ctx, info: dict):
    from rlsim.baselines import evaluate_baselines

    ds, split = ctx.load()
    _mark_setup(info)
    res = evaluate_baselines(split.train, split.test, ds.scale)
    info["rmse"] = {k: round(v["rmse"], 4) for k, v in res.items()}


def stage_embeddings(ctx: Ctx, info: dict):
    from rlsim.embeddings import TextEncoder, item_embeddings

    ds, _ = ctx.load()
    fresh = Path(tempfile.mkdtemp(prefix="rlsim-emb-", dir=ctx.work))
    # In this process (not the default child process), so ru_maxrss still counts the encoding.
    enc = TextEncoder(ctx.dcfg().text_model, fresh, in_child=False)
    _mark_setup(info)
    item_embeddings(ds.items, enc)
    info["stage_done"] = time.perf_counter()
    info.update(texts=3 * len(ds.items), distinct_texts=enc.encoded, backend=enc.backend, items=len(ds.items),
                texts_per_s=round(enc.encoded / (info["stage_done"] - info["setup_done"]), 1))
    # Keep the vectors for the later stages (merged into the shared cache).
    shared = TextEncoder(ctx.dcfg().text_model, ctx.args.cache_dir)
    shared._load_cache().update(enc._load_cache())
    shared._save_cache()
    shutil.rmtree(fresh, ignore_errors=True)


def stage_candidates(ctx: Ctx, info: dict):
    from rlsim.candidates import CandidatesConfig, build_candidates, recall_at_k
    from rlsim.io import write_parquet

    ds, split = ctx.load()
    emb = ctx.vectors()["text"]
    cfg = CandidatesConfig()
    _mark_setup(info)
    cands = build_candidates(split.train, ds.items, emb, cfg)
    info["recall@25"] = round(recall_at_k(cands, split.test, cfg.like_threshold)["recall"], 4)
    info["stage_done"] = time.perf_counter()
    write_parquet(cands, ctx.work / "candidates.parquet")


def stage_env_build(ctx: Ctx, info: dict):
    import pandas as pd

    from rlsim.env import build_env_data

    ds, split = ctx.load()
    emb = ctx.vectors()["text"]
    cands = pd.read_parquet(ctx.work / "candidates.parquet")
    _mark_setup(info)
    data = build_env_data(split.train, ds.items, cands, emb, ds.scale)
    info["stage_done"] = time.perf_counter()
    info.update(users=len(data.user_ids), cand_feat_mb=round(data.cand_feat.nbytes / 2**20, 1))
    data.save(ctx.work / "env_data")


def stage_reward_epoch(ctx: Ctx, info: dict):
    import math

    from rlsim.data import holdout_validation
    from rlsim.reward.config import RewardConfig
    from rlsim.reward.features import build_features
    from rlsim.reward.loop import fit_one

    ds, split = ctx.load()
    text = ctx.vectors()
    cfg = RewardConfig(epochs=1, decay_epochs=0, patience=1)
    _mark_setup(info)
    fit_train, val = holdout_validation(split.train, cfg.val_frac, cfg.seed)
    ft = build_features(ds.items, ds.users, fit_train, text)
    t_feat = time.perf_counter()
    steps = math.ceil(len(fit_train) / cfg.batch_size)
    max_steps = ctx.args.reward_steps
    rows = fit_train if steps <= max_steps else fit_train.sample(max_steps * cfg.batch_size, random_state=0)
    val_rows = val if len(val) <= 20_000 else val.sample(20_000, random_state=0)
    t0 = time.perf_counter()
    _, hist = fit_one(ft, rows, val_rows, ds.scale, cfg, cfg.seed)
    t_loop = time.perf_counter() - t0
    done = math.ceil(len(rows) / cfg.batch_size)
    epoch = (t_feat - info["setup_done"]) + t_loop * steps / done
    info["stage_done"] = info["setup_done"] + epoch
    info.update(features_seconds=round(t_feat - info["setup_done"], 2), steps_per_epoch=steps, measured_steps=done,
                seconds_per_step=round(t_loop / done, 4), extrapolated=done < steps,
                val_rmse=round(hist[-1]["val_rmse"], 4))


def stage_ppo_iteration(ctx: Ctx, info: dict):
    import ray

    from rlsim.env import EnvData
    from rlsim.policy.config import PolicyConfig
    from rlsim.policy.train import build_ppo_config, env_config
    from rlsim.simulators.point import baseline_simulator

    ds, split = ctx.load()
    data = EnvData.load(ctx.work / "env_data")
    source = baseline_simulator("mf", split.train, ds.scale)  # sampled ratings, one request per step
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             _temp_dir=tempfile.mkdtemp(prefix="rlsim-ray-", dir="/tmp"))
    try:
        pcfg = PolicyConfig(iterations=1)
        _mark_setup(info)
        algo = build_ppo_config(env_config(data, pcfg, source=source), data, pcfg).build_algo()
        t1 = time.perf_counter()
        algo.train()
        t2 = time.perf_counter()
        algo.train()
        t3 = time.perf_counter()
        algo.stop()
        info["stage_done"] = t2
        info.update(build_seconds=round(t1 - info["setup_done"], 2), first_iteration_seconds=round(t2 - t1, 2),
                    second_iteration_seconds=round(t3 - t2, 2), train_batch_size=pcfg.train_batch_size)
    finally:
        ray.shutdown()


def _sample_users(test, n: int):
    import numpy as np

    users = np.sort(test["user_id"].unique())
    return np.sort(np.random.default_rng(0).choice(users, size=min(n, len(users)), replace=False))


def stage_persona_offline(ctx: Ctx, info: dict):
    import numpy as np

    from rlsim.personas.config import PersonaConfig
    from rlsim.personas.source import offline_persona

    ds, split = ctx.load()
    vec = ctx.vectors()["text"]
    pairs = split.test[split.test["user_id"].isin(_sample_users(split.test, ctx.args.persona_users))]
    _mark_setup(info)
    model = offline_persona(ds, split.train, PersonaConfig(), vec)
    t_fit = time.perf_counter()
    raw = model.predict_raw(pairs["user_id"].to_numpy(), pairs["item_id"].to_numpy())
    info["stage_done"] = time.perf_counter()
    y = pairs["rating"].to_numpy(float)
    info.update(fit_seconds=round(t_fit - info["setup_done"], 2), rate_seconds=round(info["stage_done"] - t_fit, 2),
                pairs=len(pairs), users=int(pairs.user_id.nunique()),
                rmse_snapped=round(float(np.sqrt(np.mean((ds.scale.round(raw) - y) ** 2))), 4),
                rmse_unsnapped=round(float(np.sqrt(np.mean((raw - y) ** 2))), 4))


def stage_persona_server(ctx: Ctx, info: dict):
    from rlsim.personas.backends import BackendSpec
    from rlsim.personas.config import PersonaConfig
    from rlsim.personas.job import run_rating_job
    from rlsim.personas.source import prompt_builder
    from tests.fake_openai import FakeOpenAI

    ds, split = ctx.load()
    vec = ctx.vectors()["text"]
    users = _sample_users(split.test, ctx.args.server_users)
    pairs = split.test[split.test["user_id"].isin(users)][["user_id", "item_id"]]
    cfg = PersonaConfig(backend="openai", model="fake-model", cache=False, rpm=1e9, tpm=1e12, max_retries=2)
    out = Path(tempfile.mkdtemp(prefix="rlsim-pool-", dir=ctx.work))
    with FakeOpenAI() as srv:
        spec = BackendSpec("openai", "fake-model", srv.base_url, api_key="bench")
        _mark_setup(info)
        units = prompt_builder(ds, split.train, cfg, vec, users=users).units(pairs)
        t_units = time.perf_counter()
        s = run_rating_job(units, out, spec, cfg, None, use_ray=False, progress=False)
        info["stage_done"] = time.perf_counter()
    shutil.rmtree(out, ignore_errors=True)
    info.update(prompt_seconds=round(t_units - info["setup_done"], 2), rate_seconds=round(info["stage_done"] - t_units, 2),
                pairs=len(pairs), rated=s["rated"], requests=s["usage"]["requests"])


def run_child(args) -> int:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(1)
    ctx = Ctx(args)
    info: dict = {}
    t0 = time.perf_counter()
    globals()[f"stage_{args.run_stage}"](ctx, info)
    end = info.pop("stage_done", None) or time.perf_counter()
    setup = info.pop("setup_done", t0)
    info = {"seconds": round(end - setup, 2), "setup_seconds": round(setup - t0, 2),
            "peak_rss_mb": round(_rss_mb()), **info,
            # Other processes on the machine slow a stage down: the load it ran under.
            "load_avg_1m": round(os.getloadavg()[0], 2)}
    print("RESULT " + json.dumps(info), flush=True)
    return 0


# ------------------------------------------------------------------------ the driver

def _slope(xs, ys):
    import numpy as np

    pts = [(x, y) for x, y in zip(xs, ys) if y and y > 0]
    if len(pts) < 2:
        return None
    lx, ly = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
    return round(float(np.polyfit(lx, ly, 1)[0]), 3)


def growth(results: dict) -> dict:
    out = {}
    for stage, by_size in results.items():
        sizes = [s for s in SIZES if s in by_size and "seconds" in by_size[s]]
        n = [SIZES[s] for s in sizes]
        out[stage] = {"time_exponent": _slope(n, [by_size[s]["seconds"] for s in sizes]),
                      "memory_exponent": _slope(n, [by_size[s]["peak_rss_mb"] for s in sizes]),
                      "sizes": sizes}
        if len(sizes) >= 2:  # the last step alone (the largest sizes dominate a cost's growth)
            a, b = sizes[-2], sizes[-1]
            out[stage]["time_exponent_last"] = _slope([SIZES[a], SIZES[b]],
                                                      [by_size[a]["seconds"], by_size[b]["seconds"]])
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    colors = plt.get_cmap("tab20").colors
    for j, (stage, by_size) in enumerate(results.items()):
        sizes = [s for s in SIZES if s in by_size and "seconds" in by_size[s]]
        if not sizes:
            continue
        x = [SIZES[s] for s in sizes]
        style = dict(color=colors[(2 * j) % 20 if j < 10 else (2 * j + 1) % 20], marker="os^vD"[j % 5], label=stage)
        axes[0].plot(x, [max(by_size[s]["seconds"], 1e-2) for s in sizes], "-", **style)
        axes[1].plot(x, [by_size[s]["peak_rss_mb"] for s in sizes], "-", **style)
    for ax, ylab in zip(axes, ["seconds", "peak RSS (MB)"]):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("ratings")
        ax.set_ylabel(ylab)
        ax.grid(True, which="both", alpha=0.3)
    lo, hi = 1e5, 1e7
    axes[0].plot([lo, hi], [1, 100], "k--", lw=1, label="slope 1 (linear)")
    axes[1].axhline(3072, color="r", ls=":", lw=1, label="3 GB")
    axes[0].set_title("wall time per stage")
    axes[1].set_title("peak memory per stage (fresh process)")
    axes[0].text(1.05e5, 3e4, "* reward_epoch at 1M/10M: extrapolated from measured batches", fontsize=7)
    axes[1].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=["100k", "1m", "10m"], choices=list(SIZES))
    p.add_argument("--stages", nargs="+", default=STAGES, choices=STAGES)
    p.add_argument("--source", default="ml-latest-small")
    p.add_argument("--data-dir", default=os.environ.get("RLSIM_DATA_DIR", "/work/shared/datasets"))
    p.add_argument("--cache-dir", default=os.environ.get("RLSIM_CACHE_DIR", "/tmp/rlsim-scaling-cache"))
    p.add_argument("--work", default="/tmp/rlsim-scaling-work")
    p.add_argument("--reward-steps", type=int, default=300, help="reward-model batches measured per epoch")
    p.add_argument("--persona-users", type=int, default=500)
    p.add_argument("--server-users", type=int, default=20)
    p.add_argument("--timeout", type=int, default=3600, help="seconds per (stage, size)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "scaling.json"))
    p.add_argument("--merge", action="store_true", help="keep other entries of an existing --out")
    p.add_argument("--run-stage", help=argparse.SUPPRESS)
    p.add_argument("--size", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.run_stage:
        return run_child(args)

    out = Path(args.out)
    doc = json.loads(out.read_text()) if args.merge and out.is_file() else {}
    results = doc.get("stages", {})
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    for size in args.sizes:
        for stage in args.stages:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--run-stage", stage, "--size", size,
                   "--source", args.source, "--data-dir", args.data_dir, "--cache-dir", args.cache_dir,
                   "--work", args.work, "--reward-steps", str(args.reward_steps),
                   "--persona-users", str(args.persona_users), "--server-users", str(args.server_users)]
            res = measure_child(cmd, env, args.timeout)
            results.setdefault(stage, {})[size] = res
            print(f"{size:>4} {stage:<16} " + json.dumps(res)[:400], flush=True)
            doc.update({"stages": results, "growth": growth(results)})
            _write(out, doc, args)
    plot(results, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


def _write(out: Path, doc: dict, args) -> None:
    import torch

    from rlsim.data.synthetic import PRESETS
    from rlsim.embeddings import resolve_backend

    doc["setup"] = {
        "data": "synthetic presets generated from the source's statistics (rlsim.data.synthetic), temporal split",
        "source": args.source, "presets": {k: dict(zip(("ratings", "users", "items"), v)) for k, v in PRESETS.items()},
        "peak_rss_mb": "ru_maxrss of the stage's own fresh process (inputs included; Ray's own daemons not)",
        "seconds": "the stage's work, after loading its inputs (setup_seconds)",
        "text_backend": resolve_backend(None), "threads": 1, "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(), "python": platform.python_version(),
        "torch": torch.__version__, "reward_steps_measured": args.reward_steps,
        "persona_users": args.persona_users, "server_users": args.server_users}
    from rlsim.io import write_json

    write_json(out, doc)


if __name__ == "__main__":
    sys.exit(main())
