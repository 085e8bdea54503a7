"""`rlsim pipeline`: every stage in order into OUT/<stage>/, then OUT/metrics.json and OUT/report.html."""

from __future__ import annotations

from pathlib import Path

from rlsim.cli import add_data_args, data_config, load_config_file


def register(sub) -> None:
    p = sub.add_parser("pipeline", help="run data -> baselines -> reward -> candidates -> PPO -> personas -> "
                                        "evaluate, and write the report")
    add_data_args(p)
    p.add_argument("--out", required=True, help="run folder (one subfolder per stage)")
    p.add_argument("--stages", help="comma-separated stages to run instead of the config's pipeline.stages")
    p.add_argument("--force", action="store_true", help="redo stages whose outputs exist")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_pipeline)


def cmd_pipeline(args) -> int:
    from rlsim.pipeline import make_context, run_pipeline

    sections = load_config_file(args)
    cfg = data_config(args, sections)
    if args.stages:
        sections = {**sections, "pipeline": {**(sections.get("pipeline") or {}),
                                             "stages": [s.strip() for s in args.stages.split(",") if s.strip()]}}
    ctx = make_context(sections, cfg, args.out, progress=not args.no_progress)
    summary = run_pipeline(ctx, force=args.force)
    out = Path(args.out)
    ran = ", ".join(summary["ran"]) or "nothing (all stages were done)"
    print(f"ran: {ran}")
    print(f"wrote {out / 'metrics.json'} and {out / 'report.html'}")
    return 0
