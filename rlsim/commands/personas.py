"""`rlsim personas profile|rate|evaluate|align`: flags -> configs -> Ray -> rlsim.personas.run -> printed results.

The API key and endpoint come from the environment here, at the edge (OPENAI_API_KEY /
OPENAI_BASE_URL, or AZURE_OPENAI_API_KEY / AZURE_OPENAI_ENDPOINT, through rlsim.run_config) and are
passed in; the key is never logged, cached or written. Ray: --ray-address joins a running cluster; inside `ray job submit` the job's cluster is
joined; otherwise a private local Ray is started (own temp dir, no dashboard) and stopped after.
--no-ray runs everything in this process. Each command takes only the flags it uses.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from pathlib import Path

import pandas as pd

from rlsim.cli import add_data_args, add_quiet_arg, add_ray_arg, run_config
from rlsim.commands.ray_session import cli_ray
from rlsim.errors import ConfigError, RlsimError
from rlsim.personas.config import PersonaConfig
from rlsim.run_config import api_key, personas_for

log = logging.getLogger("rlsim.personas")

def _endpoint_args(g) -> None:
    g.add_argument("--backend", choices=["auto", "offline", "openai", "tinytroupe"], default=None,
                   help="auto (default): openai when OPENAI_BASE_URL or AZURE_OPENAI_ENDPOINT is set, else offline")
    g.add_argument("--model", help="chat model (Azure: the deployment name)")
    g.add_argument("--base-url", help="OpenAI-compatible endpoint (default $OPENAI_BASE_URL)")
    g.add_argument("--api-version", help="Azure OpenAI api-version (default $OPENAI_API_VERSION)")


def _call_args(g, concurrency_help: str) -> None:
    g.add_argument("--concurrency", type=int, help=concurrency_help)
    g.add_argument("--rpm", type=float, help="requests per minute, shared by every job on the cluster and endpoint")
    g.add_argument("--tpm", type=float, help="tokens per minute, shared by every job on the cluster and endpoint")
    g.add_argument("--max-retries", type=int, help="retries of a failed or unusable answer")
    g.add_argument("--timeout", type=float, help="seconds per request")
    g.add_argument("--budget-usd", type=float, help="hard cap on this job's spend (needs a price for the model); "
                                                    "what it leaves unrated fails with reason 'budget'")
    g.add_argument("--dry-run", action="store_true", help="estimate requests, tokens and cost; call nothing")
    g.add_argument("--no-cache", action="store_true", help="do not read or write the response cache")
    g.add_argument("--no-ray", action="store_true", help="run in this process (limits then apply to it alone)")


def _job_args(g) -> None:
    g.add_argument("--users", type=int, help="only this many users (seeded sample, --seed)")
    g.add_argument("--batch-size", type=int, help="movies per request")
    g.add_argument("--k-similar", type=int, help="own-history movies shown per rated movie")
    g.add_argument("--workers", type=int, help="Ray persona actors")
    g.add_argument("--shard-users", type=int, help="users per result shard")
    g.add_argument("--profiles", help="folder from `rlsim personas profile` on the same dataset and split "
                                      "(default: structured profiles, built now)")
    g.add_argument("--calibrate", action="store_true", help="quantile-map ratings onto each user's training ratings")
    g.add_argument("--lessons", help="folder from `rlsim personas align` on the same dataset and split: each user's "
                                     "lessons enter every prompt (LLM backends only)")


# flag dest -> AlignConfig field
def _align_args(g) -> None:
    g.add_argument("--demos", type=int, help="demonstrations per user: their most recent training ratings outside "
                                             "the validation slice (default 30)")
    g.add_argument("--chunk", type=int, help="next-state movies per request: predict them, then see them (default 5)")
    g.add_argument("--history", type=int, help="real ratings shown before each next-state chunk (default 8)")
    g.add_argument("--pair-questions", type=int, help="'which did you rate higher?' pairs per user (default 6)")
    g.add_argument("--whatif", type=int, help="'what if the session had shown B instead of A?' cases per user "
                                              "(default 4)")
    g.add_argument("--max-lessons", type=int, help="lessons a persona may write (default 3)")
    g.add_argument("--validation-frac", type=float, help="share of each user's training ratings held out to measure "
                                                         "fidelity before and after (default 0.2)")


def register(sub) -> None:
    sp = sub.add_parser("personas", help="persona agents: profiles, rating, fidelity")
    ps = sp.add_subparsers(dest="personas_command", required=True)

    p = ps.add_parser("profile", help="build structured / psych / lusifer profiles from training ratings")
    add_data_args(p)
    g = p.add_argument_group("profiles")
    g.add_argument("--kind", choices=["structured", "psych", "lusifer"],
                   help="profile kind (personas.profile; default structured)")
    g.add_argument("--users", type=int, help="only this many users (seeded sample of the evaluable users, --seed)")
    _endpoint_args(g)
    _call_args(g, "profile requests in flight")
    add_ray_arg(p)
    add_quiet_arg(p)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_profile)

    for verb, hlp, func in (("rate", "rate (user, item) pairs with the persona pool (sharded, resumable)", cmd_rate),
                            ("evaluate", "fidelity against held-out ratings, beside the baseline gate", cmd_evaluate)):
        p = ps.add_parser(verb, help=hlp)
        add_data_args(p)
        g = p.add_argument_group("personas")
        _endpoint_args(g)
        _job_args(g)
        _call_args(g, "requests in flight per actor")
        add_ray_arg(p)
        add_quiet_arg(p)
        if verb == "rate":
            p.add_argument("--pairs", help="Parquet/CSV with user_id,item_id (default: the split's test pairs)")
        else:
            p.add_argument("--reward-checkpoint", help="also score the reward model on the same pairs")
            p.add_argument("--ndcg-k", type=int, default=10)
        p.add_argument("--out", required=True)
        p.set_defaults(func=func)

    p = ps.add_parser("align", help="AlignUSER-style alignment: lessons from each user's own demonstrations "
                                    "(LLM backends; fidelity before/after on a validation slice)")
    add_data_args(p)
    g = p.add_argument_group("personas")
    _endpoint_args(g)
    g.add_argument("--users", type=int, help="only this many users (the seeded sample `evaluate --users` draws)")
    g.add_argument("--batch-size", type=int, help="movies per request of the before/after measurement")
    g.add_argument("--k-similar", type=int, help="own-history movies shown per rated movie (before/after)")
    g.add_argument("--workers", type=int, help="Ray persona actors (before/after measurement)")
    g.add_argument("--shard-users", type=int, help="users per result shard (before/after measurement)")
    g.add_argument("--profiles", help="folder from `rlsim personas profile` on the same dataset and split "
                                      "(default: structured profiles of the demonstrations, built now)")
    g.add_argument("--lessons", help="an earlier `personas align` folder to start from (its lessons are refined; "
                                     "the version goes up)")
    _call_args(g, "alignment requests in flight")
    a = p.add_argument_group("alignment")
    _align_args(a)
    add_ray_arg(p)
    add_quiet_arg(p)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_align)


# ---------------------------------------------------------------- config, key and Ray from the edge

def ray_for_personas(args, cfg: PersonaConfig):
    """Join --ray-address (or the job's cluster inside `ray job submit`), else start a private local Ray.

    The backend is loaded here first: a broken install (TinyTroupe) is one ConfigError line, not a Ray
    started for nothing and a traceback per actor (without Ray the stage checks it before embeddings).
    """
    if cfg.backend != "offline":
        from rlsim.personas.backends.factory import check_backend
        from rlsim.personas.stages_common import backend_spec

        check_backend(backend_spec(cfg))
    return cli_ray(args, num_cpus=max(2, cfg.n_workers))


def _ray(args, cfg: PersonaConfig, needed: bool):
    return ray_for_personas(args, cfg) if needed and not args.no_ray else contextlib.nullcontext()


def read_pairs(path: str) -> pd.DataFrame:
    p = Path(path)
    if not p.is_file():
        raise RlsimError(f"pairs file not found: {p}")
    try:
        df = pd.read_parquet(p) if p.suffix == ".parquet" else pd.read_csv(p)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's input
        raise RlsimError(f"cannot read pairs file {p}: {str(exc).splitlines()[0][:200]}") from None
    missing = {"user_id", "item_id"} - set(df.columns)
    if missing:
        raise RlsimError(f"pairs file {p} lacks column(s) {sorted(missing)}")
    return df[["user_id", "item_id"]].astype("int64").drop_duplicates().reset_index(drop=True)


def _notes(result: dict) -> None:
    for n in result.get("notes") or []:
        print(f"rlsim: note: {n}", file=sys.stderr)


def _crash_marker() -> str | None:
    return os.environ.get("RLSIM_TEST_CRASH_MARKER") or None  # test hook: kill one worker once


# ---------------------------------------------------------------- commands

def cmd_profile(args) -> int:
    from rlsim.personas import run

    conf = run_config(args)
    dcfg, cfg = conf.data, personas_for(conf, "pool")
    llm = cfg.profile != "structured"
    key = api_key(cfg, os.environ) if llm and cfg.backend != "offline" else None
    with _ray(args, cfg, llm and not args.dry_run):
        meta = run.build_profiles_stage(dcfg, cfg, cfg.profile, args.out, users=args.users, api_key=key,
                                        use_ray=not args.no_ray, dry_run=args.dry_run, progress=not args.quiet)
    if args.dry_run:
        print(json.dumps(meta))
        print(f"wrote {Path(args.out) / 'dry_run.json'}")
        return 0
    _notes(meta)
    print(f"wrote {meta['users']} {cfg.profile} profiles to {args.out}")
    return 0


def _common(args):
    conf = run_config(args)
    dcfg, cfg = conf.data, personas_for(conf, "pool")
    key = api_key(cfg, os.environ) if cfg.backend != "offline" else None
    return dcfg, cfg, key


def cmd_rate(args) -> int:
    from rlsim.personas import run

    dcfg, cfg, key = _common(args)
    pairs = read_pairs(args.pairs) if args.pairs else None
    with _ray(args, cfg, not args.dry_run):
        summary = run.rate_stage(dcfg, cfg, args.out, pairs=pairs, users=args.users, profiles=args.profiles,
                                 api_key=key, use_ray=not args.no_ray, dry_run=args.dry_run,
                                 progress=not args.quiet, crash_marker=_crash_marker(), lessons=args.lessons)
    _notes(summary)
    if args.dry_run:
        print(json.dumps({k: v for k, v in summary.items() if k != "notes"}))
        print(f"wrote {Path(args.out) / 'dry_run.json'}")
        return 0
    print(json.dumps({k: summary.get(k) for k in ("pairs", "rated", "failed", "failure_reasons", "retried",
                                                  "resumed", "spent_usd")}))
    print(f"wrote {summary['ratings']}")
    return 0


def cmd_evaluate(args) -> int:
    from rlsim.personas import run

    dcfg, cfg, key = _common(args)
    with _ray(args, cfg, not args.dry_run):
        result = run.evaluate_stage(dcfg, cfg, args.out, users=args.users, profiles=args.profiles,
                                    reward_checkpoint=args.reward_checkpoint, ndcg_k=args.ndcg_k, api_key=key,
                                    use_ray=not args.no_ray, dry_run=args.dry_run, progress=not args.quiet,
                                    crash_marker=_crash_marker(), lessons=args.lessons)
    _notes(result)
    if args.dry_run:
        print(json.dumps({k: v for k, v in result.items() if k != "notes"}))
        print(f"wrote {Path(args.out) / 'dry_run.json'}")
        return 0
    p = result["persona"]
    print(json.dumps({"persona_rmse": round(p.get("rmse", float("nan")), 4), "coverage": round(result["coverage"], 4),
                      **{f"{k}_rmse": round(v["rmse"], 4) for k, v in result["baselines"].items()}}))
    print(f"wrote {Path(args.out) / 'metrics.json'}")
    return 0


def cmd_align(args) -> int:
    from rlsim.personas import run
    from rlsim.personas.align import OFFLINE_REFUSAL

    conf = run_config(args)
    dcfg, cfg, acfg = conf.data, personas_for(conf, "pool"), conf.align.validate()
    if cfg.backend == "offline":  # before Ray or any data: the offline persona has no lessons
        raise ConfigError(OFFLINE_REFUSAL)
    key = api_key(cfg, os.environ)
    with _ray(args, cfg, not args.dry_run):
        result = run.align_stage(dcfg, cfg, acfg, args.out, users=args.users, profiles=args.profiles,
                                 lessons=args.lessons, api_key=key, use_ray=not args.no_ray, dry_run=args.dry_run,
                                 progress=not args.quiet)
    _notes(result)
    if args.dry_run:
        print(json.dumps({k: v for k, v in result.items() if k != "notes"}))
        print(f"wrote {Path(args.out) / 'dry_run.json'}")
        return 0
    def part(k):
        v = result.get(k)
        return v if isinstance(v, dict) else {}

    b, a, per, users = part("before"), part("after"), part("per_aligned_user"), part("users")
    print(json.dumps({"aligned_users": users.get("aligned"), "failed_users": users.get("failed"),
                      "lessons_per_user": part("lessons_per_user").get("mean"),
                      "rmse_before": b.get("rmse"), "rmse_after": a.get("rmse"),
                      "tokens_per_aligned_user": per.get("tokens"), "cost_usd_per_aligned_user": per.get("cost_usd"),
                      "spent_usd": result.get("spent_usd")}))
    print(f"wrote {Path(args.out) / 'lessons.json'} and {Path(args.out) / 'metrics.json'}")
    return 0
