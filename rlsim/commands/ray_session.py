"""Ray at the CLI edge: join the Ray this process already has (inside a job or the pipeline),
else start a private one, and stop only what was started here."""

from __future__ import annotations

from contextlib import contextmanager

WORKER_ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@contextmanager
def ray_session(address: str | None = None, **init_kwargs):
    import ray

    if ray.is_initialized():
        yield ray
        return
    if address:
        ray.init(address=address, log_to_driver=False, runtime_env={"env_vars": WORKER_ENV})
    else:
        init_kwargs.setdefault("runtime_env", {"env_vars": WORKER_ENV})
        # "local": a private Ray even when RAY_ADDRESS points at some cluster.
        ray.init(address="local", **init_kwargs)
    try:
        yield ray
    finally:
        ray.shutdown()
