"""Ray at the CLI edge: join the Ray this process already has (inside a job or the pipeline),
else start a private one, and stop only what was started here."""

from __future__ import annotations

import logging
from contextlib import contextmanager

WORKER_ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
PRIVATE_RAY_SYSTEM_CONFIG = {"enable_worker_prestart": False, "prestart_worker_first_driver": False}


def quiet_ray(verbose: bool, rllib: bool = False) -> int:
    """Ray's and RLlib's own notices (token auth, "started a local instance", new API stack,
    deprecations raised inside RLlib itself) are library logs: shown only with --verbose.

    Importing ray (and ray.rllib) resets their loggers' levels, so they are imported first."""
    import ray  # noqa: F401

    if rllib:
        import ray.rllib  # noqa: F401 (imported for its logger's level)
    level = logging.INFO if verbose else logging.ERROR
    for name in ("ray", "ray.rllib", "ray.tune", "ray.train", "ray.data"):
        logging.getLogger(name).setLevel(level)
    return level


@contextmanager
def ray_session(address: str | None = None, verbose: bool = False, **init_kwargs):
    import ray

    if ray.is_initialized():
        yield ray
        return
    level = quiet_ray(verbose)
    init_kwargs.setdefault("log_to_driver", verbose)
    init_kwargs.setdefault("logging_level", level)
    init_kwargs.setdefault("runtime_env", {"env_vars": WORKER_ENV})
    if address:
        ray.init(address=address, **{k: v for k, v in init_kwargs.items()
                                     if k in ("log_to_driver", "logging_level", "runtime_env", "namespace")})
    else:
        # "local": a private Ray even when RAY_ADDRESS points at some cluster.
        ray.init(address="local", **init_kwargs)
    quiet_ray(verbose, rllib=True)  # ray.init reconfigures its logger
    try:
        yield ray
    finally:
        ray.shutdown()


def cli_ray(args, num_cpus: int | None = None):
    """The Ray a command runs in: --ray-address; else, inside `ray job submit`, the job's cluster;
    else a private local Ray with its own short temp dir (Ray's socket paths must stay under ~100
    characters; RLSIM_RAY_TEMP_DIR lets a supervisor, a bench or a test, find and clean it up)."""
    import os
    import tempfile

    address = getattr(args, "ray_address", None)
    if address is None and ("RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ or os.environ.get("RAY_JOB_ID")):
        address = "auto"
    verbose = bool(getattr(args, "verbose", False))
    if address:
        return ray_session(address, verbose=verbose)
    tmp = os.environ.get("RLSIM_RAY_TEMP_DIR") or tempfile.mkdtemp(prefix="rlsim-ray-", dir="/tmp")
    # No dashboard and no prestarted idle workers: a private Ray takes no jobs, and its tasks and
    # actors start their own workers; the two idle ones Ray keeps per CPU held ~170 MB for nothing.
    return ray_session(None, verbose=verbose, num_cpus=num_cpus, include_dashboard=False, _temp_dir=tmp,
                       _system_config=PRIVATE_RAY_SYSTEM_CONFIG)
