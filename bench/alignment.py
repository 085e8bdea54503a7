"""Alignment from demonstrations (`rlsim personas align`) per backend -> bench/results/alignment.json.

THE NUMBERS ARE THE SCRIPTED TEST PERSONA'S, NOT AN LLM'S. The fake OpenAI-compatible server answers as
``tests.fake_openai.ScriptedPersona``: it knows each user's real ML-100K ratings, rates every movie one
point below them (clipped at 1) until its prompt holds the lesson it writes when shown its errors ("I
rate about one point higher than my first guess."), and rates exactly after. So the before/after move
has one known cause, and the bench measures the machinery: that the loop finds the bias from the
demonstrations, writes the lesson, stores it, and that the lesson reaches every later prompt; plus what
it costs in requests and tokens per aligned user (real prompts on real ML-100K users; the server's
token counts are ~4 characters per token).

Backends:
- openai: the scripted persona behind the openai backend, through the Ray pool and cluster limiter;
- tinytroupe: the same behind TinyTroupe agents (run in the TinyTroupe venv when there is one,
  ``--tinytroupe-python``; skipped otherwise);
- offline: alignment does not apply (the offline persona is not an LLM and has no lessons): the
  refusal is recorded.

Cost per aligned user is reported at the test price of ``fake-model`` ($1 / $2 per 1M prompt /
completion tokens) and at gpt-4o-mini's list price for the same tokens (an estimate of what an LLM
run of the same prompts would cost, not a measurement of an LLM).

Run: python bench/alignment.py [--users 40] [--tt-users 6] [--data-dir /work/shared/datasets]  (~3 minutes)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rlsim.config import DataConfig  # noqa: E402
from rlsim.data import load_movielens  # noqa: E402
from rlsim.errors import ConfigError  # noqa: E402
from rlsim.personas.align import AlignConfig  # noqa: E402
from rlsim.personas.config import DEFAULT_PRICES, PersonaConfig  # noqa: E402
from rlsim.personas.cost import cost_usd  # noqa: E402
from rlsim.personas.run import align_stage  # noqa: E402
from tests.fake_openai import LESSON, FakeOpenAI, FaultConfig  # noqa: E402

KEYS = ("n", "rmse", "mae", "exact", "off_by_1", "within_1", "mean_signed_error")
LABEL = "scripted test persona (tests/fake_openai.py ScriptedPersona), not an LLM"


def cache_dir(base: str) -> str:
    """A fresh cache (no response cache of earlier runs) with the embeddings of the default cache, if any."""
    d = tempfile.mkdtemp(prefix="rla-bench-")
    emb = Path(base).expanduser() / "embeddings"
    if emb.is_dir():
        shutil.copytree(emb, Path(d) / "embeddings")
    return d


def run_backend(backend: str, users: int, data_dir: str, cache: str, use_ray: bool) -> dict:
    dcfg = DataConfig(dataset="ml-100k", split="u1", data_dir=data_dir, cache_dir=cache, download=False)
    ds = load_movielens("ml-100k", data_dir=data_dir, cache_dir=cache, download=False)
    table = {(int(u), int(i)): float(r) for u, i, r in ds.ratings[["user_id", "item_id", "rating"]]
             .itertuples(index=False)}
    with FakeOpenAI(FaultConfig()) as srv:
        persona = srv.set_persona(table)
        cfg = PersonaConfig(backend=backend, model="fake-model", base_url=srv.base_url, rpm=60000, tpm=1e9,
                            max_concurrency=16, n_workers=2)
        out = Path(tempfile.mkdtemp(prefix=f"rla-{backend}-"))
        t0 = time.monotonic()
        if use_ray:
            import ray

            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                     configure_logging=False, _temp_dir=tempfile.mkdtemp(prefix="rlab", dir="/tmp"))
        try:
            m = align_stage(dcfg, cfg, AlignConfig(), out, users=users, api_key="bench", use_ray=use_ray,
                            progress=False)
        finally:
            if use_ray:
                ray.shutdown()
        wall = time.monotonic() - t0
        rate_prompts = [t for k, _, t in persona.seen if k == "rate"]
        after_with_lesson = sum(LESSON in t for t in rate_prompts)
        requests_sent = len(srv.log)
    per, meas = m["per_aligned_user"], m["measurement_per_aligned_user"]
    price = DEFAULT_PRICES["gpt-4o-mini"]
    mini = cost_usd({"gpt-4o-mini": price}, "gpt-4o-mini", per["prompt_tokens"], per["completion_tokens"])
    res = {
        "persona": f"{LABEL}, behind the {backend} backend",
        "users": m["users"], "validation_pairs": m["validation"]["rated_before_and_after"],
        "before": {k: m["before"].get(k) for k in KEYS}, "after": {k: m["after"].get(k) for k in KEYS},
        "delta_rmse": m["delta"].get("rmse"),
        "lessons_per_user": m["lessons_per_user"]["mean"],
        "lessons": sorted(set(pd.read_parquet(out / "lessons.parquet")["text"])),
        "own_demonstrations": m["align_answers"],
        "requests_per_aligned_user": per["requests"], "tokens_per_aligned_user": per["tokens"],
        "prompt_tokens_per_aligned_user": per["prompt_tokens"],
        "completion_tokens_per_aligned_user": per["completion_tokens"],
        "cost_usd_per_aligned_user_at_test_price": per["cost_usd"],
        "cost_usd_per_aligned_user_at_gpt-4o-mini_price": mini,
        "measurement_tokens_per_aligned_user": meas["tokens"],
        "measurement_requests_per_aligned_user": meas["requests"],
        "failures": m["failures"], "requests_sent": requests_sent,
        # The before measurement sends no lesson, the after one sends it in every prompt.
        "rating_prompts_with_the_lesson": after_with_lesson,
        "rating_prompts_without": len(rate_prompts) - after_with_lesson,
        "before_requests": m["usage"]["before"]["requests"], "after_requests": m["usage"]["after"]["requests"],
        "pool": "Ray actors and the cluster limiter" if use_ray else "in-process engine",
        "wall_s": wall, "notes": m["notes"],
    }
    shutil.rmtree(out, ignore_errors=True)
    return res


def dry_run_entry(users, data_dir: str, cache: str) -> dict:
    """What aligning these users with gpt-4o-mini would send and cost (a dry run: nothing is called)."""
    dcfg = DataConfig(dataset="ml-100k", split="u1", data_dir=data_dir, cache_dir=cache, download=False)
    cfg = PersonaConfig(backend="openai", model="gpt-4o-mini", base_url="http://127.0.0.1:9/v1")
    est = align_stage(dcfg, cfg, AlignConfig(), tempfile.mkdtemp(), users=users, dry_run=True, use_ray=False,
                      progress=False)
    n = max(1, est["users"])
    return {"model": "gpt-4o-mini", "users": est["users"], "skipped_users": est["skipped_users"],
            "align": est["align"], "before": est["before"], "after": est["after"], "total": est["total"],
            "align_cost_usd_per_user": est["align"]["cost_usd"] / n,
            "total_cost_usd_per_user": est["total"]["cost_usd"] / n,
            "token_counter": est["token_counter"], "note": est["note"]}


def offline_entry(data_dir: str, cache: str) -> dict:
    dcfg = DataConfig(dataset="ml-100k", split="u1", data_dir=data_dir, cache_dir=cache, download=False)
    try:
        align_stage(dcfg, PersonaConfig(backend="offline"), AlignConfig(), tempfile.mkdtemp(), users=5,
                    use_ray=False, progress=False)
    except ConfigError as exc:
        return {"applies": False, "refused_with": str(exc)}
    raise SystemExit("the offline backend was not refused")


def tinytroupe_entry(python: str | None, users: int, data_dir: str, cache: str) -> dict:
    if not python or not Path(python).is_file():
        return {"skipped": "no Python with TinyTroupe (--tinytroupe-python)"}
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        part = f.name
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([python, __file__, "--only", "tinytroupe", "--tt-users", str(users), "--data-dir", data_dir,
                        "--cache-dir", cache, "--part", part], env=env, capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        return {"failed": r.stderr[-2000:]}
    return json.loads(Path(part).read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=40, help="users aligned through the openai backend")
    ap.add_argument("--tt-users", type=int, default=6, help="users aligned through TinyTroupe agents")
    ap.add_argument("--data-dir", default=os.environ.get("RLSIM_DATA_DIR", "/work/shared/datasets"))
    ap.add_argument("--cache-dir", default=os.environ.get("RLSIM_CACHE_DIR", "~/.cache/rlsim"),
                    help="embeddings are copied from here; responses are cached in a fresh folder")
    ap.add_argument("--tinytroupe-python", default=str(REPO.parent / "tinytroupe" / ".venv" / "bin" / "python"))
    ap.add_argument("--only", help=argparse.SUPPRESS)
    ap.add_argument("--part", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "alignment.json"))
    a = ap.parse_args()
    cache = cache_dir(a.cache_dir) if a.only is None else a.cache_dir
    if a.only == "tinytroupe":  # the child process, in the TinyTroupe venv
        Path(a.part).write_text(json.dumps(run_backend("tinytroupe", a.tt_users, a.data_dir, cache, use_ray=False)))
        return
    t0 = time.time()
    result = {
        "what": f"THE {LABEL.upper()}: rates one point below the real rating until its prompt holds the lesson it "
                "writes from its errors, exact after. The before/after move has this one known cause; the numbers "
                "measure the alignment machinery and its cost, not how an LLM persona aligns.",
        "dataset": "ml-100k", "split": "u1", "settings": vars(AlignConfig()),
        "command": "python bench/alignment.py " + " ".join(sys.argv[1:]),
        "backends": {
            "openai": run_backend("openai", a.users, a.data_dir, cache, use_ray=True),
            "tinytroupe": tinytroupe_entry(a.tinytroupe_python, a.tt_users, a.data_dir, cache),
            "offline": offline_entry(a.data_dir, cache),
        },
        "dry_run_every_evaluable_u1_user_gpt-4o-mini": dry_run_entry(None, a.data_dir, cache),
    }
    result["wall_s"] = time.time() - t0
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    shutil.rmtree(cache, ignore_errors=True)
    print(json.dumps({b: {k: v.get(k) for k in ("before", "after", "tokens_per_aligned_user", "applies", "skipped")
                          if k in v} for b, v in result["backends"].items()}, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
