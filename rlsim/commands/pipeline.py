"""`rlsim pipeline`: every stage in order into OUT/<stage>/, then OUT/metrics.json and OUT/report.html.

Ray is started (or joined with --ray-address) once, here: every stage that needs it (the sweep,
the policy's simulator actor and env runners, the persona pool) runs in that one Ray.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from rlsim.cli import add_data_args, add_quiet_arg, add_ray_arg, data_config, load_config_file
from rlsim.commands.ray_session import cli_ray

# Stages that run on Ray (the sweep's trials, the policy's simulator actor and env runners, the persona pool;
# the reward stage too when reward.workers >= 1).
RAY_STAGES = {"sweep", "policy", "personas"}


def reward_on_ray(sections: dict) -> bool:
    """The reward stage trains on Ray Train when reward.workers >= 1."""
    from rlsim.reward.config import RewardConfig

    return RewardConfig.from_dict(sections.get("reward")).workers >= 1


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


def cmd_pipeline(args) -> int:
    from rlsim.pipeline import make_context, run_pipeline

    sections = load_config_file(args)
    cfg = data_config(args, sections)
    if args.stages:
        sections = {**sections, "pipeline": {**(sections.get("pipeline") or {}),
                                             "stages": [s.strip() for s in args.stages.split(",") if s.strip()]}}
    persona_cfg = key = None
    stages = (sections.get("pipeline") or {}).get("stages") or []
    if {"personas", "profiles"} & set(stages or ["personas"]):
        # The endpoint and key come from the environment, here at the edge (never written to OUT).
        from rlsim.commands.personas import api_key, persona_config

        persona_cfg = persona_config(args, sections)
        key = api_key(persona_cfg)
    ctx = make_context(sections, cfg, args.out, progress=not args.quiet, persona_cfg=persona_cfg, api_key=key)
    needs_ray = bool(set(ctx.cfg.stages) & RAY_STAGES) or ("reward" in ctx.cfg.stages and reward_on_ray(sections))
    with cli_ray(args, args.num_cpus) if needs_ray else contextlib.nullcontext():
        summary = run_pipeline(ctx, force=args.force)
    out = Path(args.out)
    ran = ", ".join(summary["ran"]) or "nothing (all stages were done)"
    print(f"ran: {ran}")
    print(f"wrote {out / 'metrics.json'} and {out / 'report.html'}")
    return 0
