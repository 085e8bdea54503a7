"""`rlsim personas profile|rate|evaluate`: LLM (or offline) persona agents that rate movies.

The API key is read here from the environment (OPENAI_API_KEY / AZURE_OPENAI_API_KEY) and passed
in; it is never logged, cached or written. Ray is started here (local, no dashboard, own temp
dir) unless --no-ray; the offline backend never needs Ray.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from rlsim.cli import add_data_args, apply_flags, data_config, load_config_file
from rlsim.commands.ray_session import ray_session
from rlsim.config import from_dict
from rlsim.data import load_split
from rlsim.errors import ConfigError, RlsimError
from rlsim.io import write_json, write_parquet
from rlsim.personas.backends import BackendSpec, check_backend
from rlsim.personas.config import PersonaConfig

log = logging.getLogger("rlsim.personas")


def add_persona_args(p) -> None:
    g = p.add_argument_group("personas")
    g.add_argument("--backend", choices=["auto", "offline", "openai", "tinytroupe"], default=None,
                   help="auto (default): openai when OPENAI_BASE_URL or AZURE_OPENAI_ENDPOINT is set, else offline")
    g.add_argument("--model", help="chat model (Azure: the deployment name)")
    g.add_argument("--base-url", help="OpenAI-compatible endpoint (default $OPENAI_BASE_URL)")
    g.add_argument("--api-version", help="Azure OpenAI api-version (default $OPENAI_API_VERSION)")
    g.add_argument("--users", type=int, help="only this many users (seeded sample)")
    g.add_argument("--batch-size", type=int, help="movies per request")
    g.add_argument("--k-similar", type=int, help="own-history movies shown per rated movie")
    g.add_argument("--workers", type=int, help="Ray persona actors")
    g.add_argument("--concurrency", type=int, help="in-flight requests per actor")
    g.add_argument("--rpm", type=float, help="requests per minute, cluster-wide")
    g.add_argument("--tpm", type=float, help="tokens per minute, cluster-wide")
    g.add_argument("--max-retries", type=int)
    g.add_argument("--shard-users", type=int, help="users per result shard (the unit of resume)")
    g.add_argument("--timeout", type=float, help="seconds per request")
    g.add_argument("--budget-usd", type=float, help="hard cap on spend; unrated items fail with reason 'budget'")
    g.add_argument("--dry-run", action="store_true", help="estimate tokens and cost, call nothing")
    g.add_argument("--profiles", help="folder from `rlsim personas profile` (default: structured, built now)")
    g.add_argument("--calibrate", action="store_true", help="quantile-map ratings onto each user's training ratings")
    g.add_argument("--no-cache", action="store_true", help="do not read or write the response cache")
    g.add_argument("--no-ray", action="store_true", help="run the LLM requests in this process")
    g.add_argument("--quiet", action="store_true", help="no progress bars")


def register(sub) -> None:
    sp = sub.add_parser("personas", help="persona agents: profiles, rating, fidelity")
    ps = sp.add_subparsers(dest="personas_command", required=True)
    p = ps.add_parser("profile", help="build structured / psych / lusifer profiles from training ratings")
    add_data_args(p)
    add_persona_args(p)
    p.add_argument("--kind", choices=["structured", "psych", "lusifer"], default="structured")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_profile)
    p = ps.add_parser("rate", help="rate (user, item) pairs with the persona pool (sharded, resumable)")
    add_data_args(p)
    add_persona_args(p)
    p.add_argument("--pairs", help="Parquet/CSV with user_id,item_id (default: the split's test pairs)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_rate)
    p = ps.add_parser("evaluate", help="fidelity against held-out ratings, beside the baseline gate")
    add_data_args(p)
    add_persona_args(p)
    p.add_argument("--reward-checkpoint", help="also score the reward model on the same pairs")
    p.add_argument("--ndcg-k", type=int, default=10)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_evaluate)


# ---------------------------------------------------------------- config and backend from the edge

def persona_config(args) -> PersonaConfig:
    # httpx logs every request at INFO; keep the console for progress and results.
    for name in ("httpx", "httpx2", "openai"):
        logging.getLogger(name).setLevel(logging.WARNING)
    file_cfg = load_config_file(args)
    cfg = from_dict(PersonaConfig, file_cfg.get("personas"), "personas")
    env = os.environ
    apply_flags(cfg, args, [("model", "model"), ("base_url", "base_url"), ("api_version", "api_version"),
                            ("batch_size", "batch_size"), ("k_similar", "k_similar"), ("workers", "n_workers"),
                            ("concurrency", "max_concurrency"), ("rpm", "rpm"), ("tpm", "tpm"),
                            ("max_retries", "max_retries"), ("shard_users", "shard_users"), ("timeout", "timeout_s"),
                            ("budget_usd", "budget_usd")])
    if getattr(args, "calibrate", False):
        cfg.calibrate = True
    if getattr(args, "no_cache", False):
        cfg.cache = False
    if cfg.base_url is None:
        cfg.base_url = env.get("OPENAI_BASE_URL") or env.get("AZURE_OPENAI_ENDPOINT")
    if cfg.api_version is None and env.get("AZURE_OPENAI_ENDPOINT") and cfg.base_url == env.get("AZURE_OPENAI_ENDPOINT"):
        cfg.api_version = env.get("OPENAI_API_VERSION") or env.get("AZURE_OPENAI_API_VERSION") or "2024-10-21"
    backend = getattr(args, "backend", None) or ("auto" if "backend" not in (file_cfg.get("personas") or {})
                                                  else cfg.backend)
    if backend == "auto":
        backend = "openai" if cfg.base_url else "offline"
    cfg.backend = backend
    if cfg.budget_usd is not None and cfg.budget_usd < 0:
        raise ConfigError("--budget-usd must be >= 0")
    return cfg


def backend_spec(cfg: PersonaConfig) -> BackendSpec:
    env = os.environ
    key = env.get("AZURE_OPENAI_API_KEY") if cfg.api_version else None
    key = key or env.get("OPENAI_API_KEY")
    if cfg.backend == "openai" and not cfg.base_url and not key:
        raise ConfigError("the openai backend needs OPENAI_API_KEY (and OPENAI_BASE_URL for other endpoints)")
    return BackendSpec(kind=cfg.backend, model=cfg.model, base_url=cfg.base_url, api_version=cfg.api_version,
                       timeout_s=cfg.timeout_s, api_key=key)


def ray_for_personas(cfg: PersonaConfig):
    """Join the running Ray (a job, the pipeline) or start a private local one."""
    # RLSIM_RAY_TEMP_DIR lets a supervisor (bench, tests) find and clean up after a killed job.
    tmp = os.environ.get("RLSIM_RAY_TEMP_DIR") or tempfile.mkdtemp(prefix="rlsim-ray-")
    return ray_session(address=None, include_dashboard=False, _temp_dir=tmp, num_cpus=max(2, cfg.n_workers),
                       log_to_driver=False, configure_logging=False, namespace="rlsim-personas")


def select_users(ids, n: int | None, seed: int) -> np.ndarray:
    ids = np.array(sorted(set(int(x) for x in ids)))
    if n is None or n >= len(ids):
        return ids
    return np.sort(np.random.default_rng(seed).choice(ids, size=n, replace=False))


def read_pairs(path: str) -> pd.DataFrame:
    p = Path(path)
    if not p.is_file():
        raise RlsimError(f"pairs file not found: {p}")
    df = pd.read_parquet(p) if p.suffix == ".parquet" else pd.read_csv(p)
    missing = {"user_id", "item_id"} - set(df.columns)
    if missing:
        raise RlsimError(f"pairs file {p} lacks column(s) {sorted(missing)}")
    return df[["user_id", "item_id"]].astype("int64").drop_duplicates().reset_index(drop=True)


# ---------------------------------------------------------------- commands

def _vectors(ds, dcfg):
    from rlsim.embeddings import item_text_vectors

    return item_text_vectors(ds.items, dcfg.text_model, dcfg.cache_dir)


def _cache_path(dcfg, cfg) -> str | None:
    return str(Path(dcfg.cache_dir).expanduser() / "personas" / "responses.sqlite") if cfg.cache else None


def cmd_profile(args) -> int:
    from rlsim.personas.limiter import LocalLimiter, RateLimiter
    from rlsim.personas.pool import RatingEngine
    from rlsim.personas.profiles import build_profiles, save_profiles
    from rlsim.personas.cache import ResponseCache

    dcfg, cfg = data_config(args), persona_config(args)
    ds, split = load_split(dcfg)
    users = select_users(split.train["user_id"], args.users, dcfg.seed)
    train = split.train[split.train["user_id"].isin(users)]
    engine = None
    if args.kind != "structured":
        if cfg.backend == "offline":
            raise ConfigError(f"'{args.kind}' profiles need an LLM: set OPENAI_BASE_URL or pass --backend openai")
        spec = backend_spec(cfg)
        check_backend(spec)
        cp = _cache_path(dcfg, cfg)
        engine = RatingEngine(spec, cfg, LocalLimiter(RateLimiter(cfg.rpm, cfg.tpm, cfg.budget_usd)),
                              ResponseCache(cp) if cp else None)
    df = build_profiles(args.kind, train, ds.items, ds.users, ds.scale, engine, cfg.max_concurrency,
                        cfg.lusifer_last_n, cfg.lusifer_batch, progress=not args.quiet)
    save_profiles(df, train, args.out)
    write_json(Path(args.out) / "profiles.json", {"kind": args.kind, "dataset": dcfg.dataset, "split": split.name,
                                                  "users": int(len(df)), "backend": cfg.backend, "model": cfg.model
                                                  if args.kind != "structured" else None})
    print(f"wrote {len(df)} {args.kind} profiles to {args.out}")
    return 0


def rate_pairs(ds, split, dcfg, cfg: PersonaConfig, pairs: pd.DataFrame, out_dir: Path, args) -> tuple[pd.DataFrame, dict]:
    """Ratings for pairs: user_id, item_id, predicted, predicted_raw, status, reason (+ the job summary)."""
    if cfg.backend != "offline" and not args.dry_run:
        # Before embeddings and Ray: a broken install is one line, not a traceback per actor or task.
        check_backend(backend_spec(cfg))
    vectors = _vectors(ds, dcfg)
    if cfg.backend == "offline":
        from rlsim.personas.source import offline_persona

        if args.dry_run:
            return pd.DataFrame(), {"backend": "offline", "requests": 0, "cost_usd": 0.0, "pairs": int(len(pairs))}
        model = offline_persona(ds, split.train, cfg, vectors)
        raw = model.predict_raw(pairs["user_id"].to_numpy(), pairs["item_id"].to_numpy())
        pred = ds.scale.round(raw) if cfg.offline.snap else raw
        df = pairs[["user_id", "item_id"]].assign(predicted=pred, predicted_raw=raw, status="ok", reason="")
        return df, {"backend": "offline", "pairs": int(len(df)), "rated": int(len(df)), "failed": 0,
                    "usage": {"requests": 0, "cost_usd": 0.0}}
    from rlsim.personas.pool import dry_run, run_rating_job
    from rlsim.personas.profiles import load_profile_texts
    from rlsim.personas.source import prompt_builder

    spec = backend_spec(cfg)
    if cfg.budget_usd is not None:
        from rlsim.personas.cost import require_price

        require_price(cfg.prices, spec.model)
    profiles = load_profile_texts(args.profiles) if args.profiles else None
    units = prompt_builder(ds, split.train, cfg, vectors, profiles, users=pairs["user_id"].unique()).units(pairs)
    if args.dry_run:
        est = dry_run(units, spec, cfg)
        return pd.DataFrame(), est
    use_ray = not args.no_ray
    with ray_for_personas(cfg) if use_ray else contextlib.nullcontext():
        summary = run_rating_job(units, out_dir, spec, cfg, _cache_path(dcfg, cfg), use_ray=use_ray,
                                 progress=not args.quiet, crash_marker=os.environ.get("RLSIM_TEST_CRASH_MARKER"))
    res = pd.read_parquet(out_dir / "ratings.parquet")
    df = pairs[["user_id", "item_id"]].merge(res, on=["user_id", "item_id"], how="left")
    df = df.rename(columns={"rating": "predicted"})
    df["predicted_raw"] = df["predicted"]
    return df, summary


def _maybe_calibrate(df, split, ds, cfg):
    if cfg.calibrate and len(df):
        from rlsim.personas.calibrate import calibrate

        df["predicted_uncalibrated"] = df["predicted"]
        df["predicted"] = calibrate(df.rename(columns={"predicted": "r"}), split.train, ds.scale, col="r").to_numpy()
        df["predicted_raw"] = df["predicted"]
    return df


def cmd_rate(args) -> int:
    dcfg, cfg = data_config(args), persona_config(args)
    ds, split = load_split(dcfg)
    pairs = read_pairs(args.pairs) if args.pairs else split.test[["user_id", "item_id"]]
    users = select_users(pairs["user_id"], args.users, dcfg.seed)
    pairs = pairs[pairs["user_id"].isin(users)].reset_index(drop=True)
    out = Path(args.out)
    df, summary = rate_pairs(ds, split, dcfg, cfg, pairs, out / "job", args)
    if args.dry_run:
        write_json(out / "dry_run.json", summary)
        print(json.dumps(summary))
        return 0
    df = _maybe_calibrate(df, split, ds, cfg)
    write_parquet(df, out / "ratings.parquet")
    write_json(out / "summary.json", {"backend": cfg.backend, "model": cfg.model if cfg.backend != "offline" else None,
                                      **summary})
    print(json.dumps({k: summary.get(k) for k in ("pairs", "rated", "failed", "failure_reasons")}))
    print(f"wrote {out / 'ratings.parquet'}")
    return 0


def cmd_evaluate(args) -> int:
    from rlsim.personas.evaluate import evaluate_persona, plot_histograms

    dcfg, cfg = data_config(args), persona_config(args)
    ds, split = load_split(dcfg)
    users = select_users(split.test["user_id"], args.users, dcfg.seed)
    test = split.test[split.test["user_id"].isin(users)].reset_index(drop=True)
    out = Path(args.out)
    df, summary = rate_pairs(ds, split, dcfg, cfg, test[["user_id", "item_id"]], out / "job", args)
    if args.dry_run:
        write_json(out / "dry_run.json", summary)
        print(json.dumps(summary))
        return 0
    df = _maybe_calibrate(df, split, ds, cfg)
    pairs = test[["user_id", "item_id", "rating"]].merge(df, on=["user_id", "item_id"], how="left")
    reward = None
    if args.reward_checkpoint:
        try:
            from rlsim.reward.predict import RewardPredictor
        except ImportError as exc:
            raise RlsimError(f"--reward-checkpoint needs rlsim.reward ({exc})") from None
        reward = RewardPredictor.load(args.reward_checkpoint)
    result = evaluate_persona(split.train, pairs, ds.scale, seed=dcfg.seed, reward_predictor=reward, k=args.ndcg_k)
    result = {"dataset": dcfg.dataset, "split": split.name, "backend": cfg.backend,
              "model": cfg.model if cfg.backend != "offline" else None, "users": int(len(users)),
              "calibrated": cfg.calibrate, **result,
              "failure_reasons": summary.get("failure_reasons", {}), "usage": summary.get("usage", {})}
    if cfg.backend == "offline":
        result["offline_config"] = dict(vars(cfg.offline))
    write_parquet(pairs, out / "pairs.parquet")
    write_json(out / "metrics.json", result)
    plot_histograms(result, ds.scale, out / "histogram.png", f"{dcfg.dataset} {split.name}: {cfg.backend} persona")
    p = result["persona"]
    print(json.dumps({"persona_rmse": round(p.get("rmse", float("nan")), 4), "coverage": round(result["coverage"], 4),
                      **{f"{k}_rmse": round(v["rmse"], 4) for k, v in result["baselines"].items()}}))
    print(f"wrote {out / 'metrics.json'}")
    return 0
