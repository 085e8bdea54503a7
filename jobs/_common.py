"""Shared edge for the job entrypoints: parse args, join Ray, run stages, upload the outputs.

Every jobs/<stage>.py is `run_job(["<stage>"])`. Ray is started or joined the one way the CLI
does it (rlsim.commands.ray_session.cli_ray): inside `ray job submit` it joins the job's cluster,
with --ray-address (default $RAY_ADDRESS) that cluster, else it starts a private local Ray. The output may be a local folder or a pyarrow filesystem URI
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
    p.add_argument("--ray-address", default=os.environ.get("RAY_ADDRESS"),
                   help="join this Ray cluster (default $RAY_ADDRESS; inside `ray job submit`, the job's cluster; "
                        "else a private local Ray)")
    # default None: not given, so $RLSIM_VERBOSE decides (rlsim.run_config.resolve).
    p.add_argument("--verbose", action="store_true", default=None,
                   help="library logs, Ray's worker logs included (default $RLSIM_VERBOSE)")
    return p.parse_args(argv)


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
    from rlsim.commands.ray_session import cli_ray
    from rlsim.run_config import resolve

    args = parse_args(stages, argv)
    # A stage job runs just its stages, whatever the config's pipeline.stages says.
    flags = {"data_dir": args.data_dir, "cache_dir": args.cache_dir, "verbose": args.verbose,
             "stages": None if stages == ["pipeline"] else stages}
    run = resolve(args.config, os.environ, flags)
    args.verbose = run.verbose  # read by cli_ray
    local = Path(args.out) if is_local(args.out) else Path(args.work_dir or tempfile.mkdtemp(prefix="rlsim-job-"))
    with cli_ray(args):  # the one way rlsim starts or joins Ray, as the CLI does
        result = _stages(args, stages, run, local)
    if not is_local(args.out):
        upload(local, args.out)
        print(f"uploaded {local} to {args.out}")
    return result


def _stages(args, stages, run, local: Path) -> dict:
    from rlsim.pipeline import make_context, run_pipeline, run_stage
    from rlsim.run_config import api_key, personas_for

    # The persona endpoint and key come from the job's environment (never written to OUT).
    persona_cfg = personas_for(run, "pool")
    ctx = make_context(run, local, progress=False, persona_cfg=persona_cfg, api_key=api_key(persona_cfg, os.environ))
    if stages == ["pipeline"]:
        result = run_pipeline(ctx, force=args.force)
    else:
        result = {}
        for name in stages:
            metrics, ran = run_stage(ctx, name, force=args.force)
            result[name] = metrics
            print(f"stage {name}: {'ran' if ran else 'already done'} -> {local / name}")
    return result
