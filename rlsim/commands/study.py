"""`rlsim study`: train a policy on each simulated user, judge every policy on every simulator and
on real held-out behaviour, and answer whether more faithful simulators give better policies.

Ray is started (or joined with --ray-address) here, once, for the whole study.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from rlsim.cli import add_data_args, add_quiet_arg, add_ray_arg, run_config
from rlsim.commands.ray_session import cli_ray
from rlsim.errors import ConfigError
from rlsim.run_config import api_key, personas_for


def register(sub) -> None:
    p = sub.add_parser("study", help="the sim-to-real study: a policy per simulator, judged by every simulator "
                                     "and by real held-out ratings")
    add_data_args(p)
    p.add_argument("--out", required=True, help="study folder (study.json, matrix.png, report.html, policies/)")
    p.add_argument("--sources", help="comma-separated sources (default: the config's study.sources)")
    p.add_argument("--seeds", type=int, help="policies per source (study.seeds, default 3)")
    p.add_argument("--env-steps", type=int, help="env steps per policy (study.env_steps)")
    p.add_argument("--reward-checkpoint", help="an existing reward model (default: train one)")
    p.add_argument("--num-cpus", type=int, help="CPUs for the local Ray instance (default: all)")
    from rlsim.commands.policy import llm_args

    llm_args(p)  # --base-url and --model add LLM personas to the study (source llm_persona)
    add_ray_arg(p)
    add_quiet_arg(p)
    p.set_defaults(func=cmd_study)


def _llm_persona(run) -> dict | None:
    """When `personas.backend` is openai or --base-url / --model ask for LLM personas, an endpoint is
    configured (YAML, OPENAI_BASE_URL / OPENAI_API_KEY or Azure's) and no running persona actor is named,
    the study starts an LLM persona simulator actor for itself (source llm_persona) and stops it at the
    end. The key is read here, at the edge, and never written."""
    import uuid

    scfg = run.study
    # An endpoint or a chat model on the command line asks for LLM personas.
    flagged = run.given("personas.base_url", "flag") or run.given("personas.model", "flag")
    if scfg.llm_persona_actor or (run.personas.backend != "openai" and not flagged):
        return None
    cfg = personas_for(run, "llm")
    try:
        key = api_key(cfg, os.environ)
    except ConfigError:  # no endpoint configured: the study runs without an LLM persona
        return None
    scfg.llm_persona_actor = f"rlsim-llm-persona-{uuid.uuid4().hex[:12]}"
    return {"persona_cfg": cfg, "api_key": key, "options": dict(run.llm_persona)}


def cmd_study(args) -> int:
    from rlsim.study import run_study

    run = run_config(args)
    llm = _llm_persona(run)
    run.study.validate()
    with cli_ray(args, args.num_cpus):
        result = run_study(run, args.out, progress=not args.quiet, llm_persona=llm)
    print(json.dumps({"answer": result["answer"],
                      "real_hit_rate": {n: r["hit_rate"]["mean"] for n, r in result["sources"].items()},
                      "vs_popularity": {n: {k: r["vs_popularity"][k] for k in ("mean", "ci95", "p_holm")}
                                        for n, r in result["sources"].items()},
                      "popularity_hit_rate": result["references"]["popularity"]["hit_rate"]["mean"]}))
    for note in result.get("notes", []):
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {Path(args.out) / 'study.json'} and {Path(args.out) / 'report.html'}")
    return 0
