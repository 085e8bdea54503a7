"""The `rlsim` command. With jobs/, the only place that reads environment variables or starts Ray.

Each area registers its own subcommands (``register(subparsers)`` in the modules listed in
COMMAND_MODULES); this file owns the shared flags, config loading and error handling.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from rlsim.errors import RlsimError
from rlsim.run_config import RunConfig, resolve, verbose_from

# Modules exposing register(subparsers); each adds its own subcommands.
COMMAND_MODULES = [
    "rlsim.commands.personas",
    "rlsim.commands.data",
    "rlsim.commands.baselines",
    "rlsim.commands.reward",
    "rlsim.commands.candidates",
    "rlsim.commands.policy",
    "rlsim.commands.pipeline",
    "rlsim.commands.study",
    "rlsim.commands.llm",
]


def add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--config", help="experiment YAML (sections: data, reward, ...); flags override it")
    g.add_argument("--dataset", help="ml-100k | ml-latest-small | ml-1m | ml-25m | synthetic-100k|1m|10m|25m[-from-SRC]")
    g.add_argument("--split", help="u1..u5, ua, ub (ml-100k), temporal, random")
    g.add_argument("--data-dir", help="folder with the dataset (default $RLSIM_DATA_DIR)")
    g.add_argument("--cache-dir", help="Parquet/embedding cache (default $RLSIM_CACHE_DIR or ~/.cache/rlsim)")
    g.add_argument("--overviews", help="plot overviews CSV (default: <data-dir>/overviews/<dataset>_overviews.csv)")
    g.add_argument("--no-download", action="store_true", help="fail instead of downloading from GroupLens")
    g.add_argument("--seed", type=int)
    g.add_argument("--text-model", help="sentence-transformers model for item text, optionally @BACKEND (torch, "
                   "torch-bf16, openvino, onnx-int8; default all-MiniLM-L6-v2, backend auto)")


def add_quiet_arg(p: argparse.ArgumentParser) -> None:
    """--quiet: no progress bars; results and the paths written are still printed."""
    p.add_argument("--quiet", action="store_true", help="no progress bars (results and paths are still printed)")


def add_ray_arg(p: argparse.ArgumentParser) -> None:
    """--ray-address: every command that uses Ray joins a cluster the same way."""
    p.add_argument("--ray-address", help="join a running Ray cluster ('auto' or HOST:PORT; default: a private "
                                         "local Ray, or the job's cluster inside `ray job submit`)")


def run_config(args, yaml=None) -> RunConfig:
    """The command's RunConfig: --config (or ``yaml``, a loaded mapping), then the environment, then the
    flags given (rlsim.run_config.resolve)."""
    return resolve(getattr(args, "config", None) if yaml is None else yaml, os.environ, vars(args))


def configure_logging(verbose: bool) -> None:
    """Default output is progress, results and paths: library logs (faiss loader lines, Ray notices,
    sentence-transformers, the transformers weight-loading bar) only with --verbose."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    # httpx logs every persona request at INFO; keep the console for progress and results.
    for name in ("httpx", "httpx2", "openai"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if not verbose:
        # Read by huggingface_hub/transformers when they are imported (later, lazily).
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlsim", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show library logs (rlsim, Ray, faiss, ...; default $RLSIM_VERBOSE)")
    sub = parser.add_subparsers(dest="command", required=True)
    for mod in COMMAND_MODULES:
        importlib.import_module(mod).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.verbose = verbose_from(os.environ, args.verbose)  # --verbose, else $RLSIM_VERBOSE
        configure_logging(args.verbose)
        rc = args.func(args)
    except RlsimError as exc:
        print(f"rlsim: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rlsim: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
