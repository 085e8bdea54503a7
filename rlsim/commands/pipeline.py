"""`rlsim pipeline`: every stage in order into OUT/<stage>/, then OUT/metrics.json and OUT/report.html.

Ray is started (or joined with --ray-address) once, here: every stage that needs it (the sweep,
the policy's simulator actor and env runners, the persona pool) runs in that one Ray.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

from rlsim.cli import add_data_args, add_quiet_arg, add_ray_arg, run_config
from rlsim.commands.ray_session import cli_ray
from rlsim.run_config import api_key, personas_for

# Stages that run on Ray (the sweep's trials, the policy's simulator actor and env runners, the persona pool;
# the reward stage too when reward.workers >= 1).
RAY_STAGES = {"sweep", "policy", "personas"}


def register(sub) -> None:
    p = sub.add_parser("pipeline", help="run data -> baselines -> reward -> candidates -> PPO -> personas -> "
                                        "evaluate, and write the report")
    add_data_args(p)
    p.add_argument("--out", required=True, help="run folder (one subfolder per stage)")
    p.add_argument("--stages", help="comma-separated stages to run instead of the config's pipeline.stages")
    p.add_argument("--force", action="store_true", help="redo stages whose outputs exist")
    p.add_argument("--num-cpus", type=int, help="CPUs for the local Ray instance (default: all)")
    add_ray_arg(p)
    add_quiet_arg(p)
    p.set_defaults(func=cmd_pipeline)


def persona_edge(run, env) -> tuple:
    """(PersonaConfig, API key) when the run has a persona stage; the endpoint and key come from the
    environment, here at the edge (never written to OUT)."""
    if not {"personas", "profiles"} & set(run.pipeline.stages or ["personas"]):
        return None, None
    cfg = personas_for(run, "pool")
    return cfg, api_key(cfg, env)


def needs_ray(run) -> bool:
    """The sweep, the policy and the persona pool run on Ray; the reward stage too when reward.workers >= 1."""
    stages = set(run.pipeline.stages)
    return bool(stages & RAY_STAGES) or ("reward" in stages and run.reward.validate().workers >= 1)


def cmd_pipeline(args) -> int:
    from rlsim.pipeline import make_context, run_pipeline

    run = run_config(args)
    persona_cfg, key = persona_edge(run, os.environ)
    ctx = make_context(run, args.out, progress=not args.quiet, persona_cfg=persona_cfg, api_key=key)
    with cli_ray(args, args.num_cpus) if needs_ray(run) else contextlib.nullcontext():
        summary = run_pipeline(ctx, force=args.force)
    out = Path(args.out)
    ran = ", ".join(summary["ran"]) or "nothing (all stages were done)"
    print(f"ran: {ran}")
    for note in (summary["stages"].get("evaluate") or {}).get("notes", []):
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {out / 'metrics.json'} and {out / 'report.html'}")
    return 0
