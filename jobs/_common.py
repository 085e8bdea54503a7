"""Shared edge for the job entrypoints: parse args, join Ray, run stages, upload the outputs.

Every jobs/<stage>.py is `run_job(["<stage>"])`. Inside `ray job submit` (RAY_ADDRESS or a
job's runtime context is set) it joins that cluster with ray.init(address="auto"); run by hand
without one it starts a local Ray. The output may be a local folder or a pyarrow filesystem URI
(s3://..., gs://..., file:///...): stages write to a local folder that is then uploaded with
pyarrow.fs.copy_files, and a rerun into the same folder skips finished stages.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

# The repository root (the job's working_dir) holds the rlsim package when it is not installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse_args(stages: list[str], argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=f"rlsim job: {', '.join(stages)}")
    p.add_argument("config", help="experiment YAML (configs/...)")
    p.add_argument("--out", required=True, help="output folder or URI (s3://..., gs://..., file:///...)")
    p.add_argument("--data-dir", help="folder with the MovieLens data (default: the config's or $RLSIM_DATA_DIR)")
    p.add_argument("--cache-dir", help="cache folder (default: the config's or $RLSIM_CACHE_DIR)")
    p.add_argument("--work-dir", help="local folder the stages write to before upload (URI outputs)")
    p.add_argument("--force", action="store_true", help="redo finished stages")
    return p.parse_args(argv)


def connect_ray():
    import ray

    from rlsim.commands.ray_session import WORKER_ENV, quiet_ray

    if ray.is_initialized():
        return
    verbose = bool(os.environ.get("RLSIM_VERBOSE"))
    # Worker logs (RLlib's own notices) stay in Ray's log files unless RLSIM_VERBOSE is set.
    kw = dict(log_to_driver=verbose, logging_level=quiet_ray(verbose), runtime_env={"env_vars": WORKER_ENV})
    if os.environ.get("RAY_ADDRESS") or os.environ.get("RAY_JOB_ID"):
        ray.init(address="auto", **kw)
    else:
        ray.init(include_dashboard=False, **kw)
    quiet_ray(verbose, rllib=True)


def is_local(uri: str) -> bool:
    return "://" not in uri


def upload(local: Path, uri: str) -> None:
    import pyarrow.fs as pafs

    if uri.startswith("file://"):
        dest_fs, dest_path = pafs.LocalFileSystem(), uri[len("file://"):]
    else:
        dest_fs, dest_path = pafs.FileSystem.from_uri(uri)
    dest_fs.create_dir(dest_path, recursive=True)
    pafs.copy_files(str(local), dest_path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=dest_fs)


def run_job(stages: list[str], argv=None) -> dict:
    """Run the stages; a user error (bad config, missing data) ends the job with one line and exit 2."""
    from rlsim.errors import RlsimError

    try:
        return _run(stages, argv)
    except RlsimError as exc:
        print(f"rlsim job: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _run(stages: list[str], argv=None) -> dict:
    from rlsim.cli import data_config
    from rlsim.config import load_yaml
    from rlsim.pipeline import make_context, run_pipeline, run_stage

    args = parse_args(stages, argv)
    sections = load_yaml(args.config)
    cfg = data_config(argparse.Namespace(data_dir=args.data_dir, cache_dir=args.cache_dir), sections)
    local = Path(args.out) if is_local(args.out) else Path(args.work_dir or tempfile.mkdtemp(prefix="rlsim-job-"))
    if stages != ["pipeline"]:
        sections = {**sections, "pipeline": {**(sections.get("pipeline") or {}), "stages": stages}}
    connect_ray()
    from rlsim.commands.personas import api_key, persona_config

    # The persona endpoint and key come from the job's environment (never written to OUT).
    persona_cfg = persona_config(argparse.Namespace(), sections)
    ctx = make_context(sections, cfg, local, progress=False, persona_cfg=persona_cfg, api_key=api_key(persona_cfg))
    if stages == ["pipeline"]:
        result = run_pipeline(ctx, force=args.force)
    else:
        result = {}
        for name in stages:
            metrics, ran = run_stage(ctx, name, force=args.force)
            result[name] = metrics
            print(f"stage {name}: {'ran' if ran else 'already done'} -> {local / name}")
    if not is_local(args.out):
        upload(local, args.out)
        print(f"uploaded {local} to {args.out}")
    return result
