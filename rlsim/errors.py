"""One exception type for user-facing errors: the CLI prints its message on one line and exits 2."""


class RlsimError(Exception):
    """An error caused by input (files, config, data, an endpoint), not by a bug in rlsim."""


class DataError(RlsimError):
    """Missing, corrupt or malformed dataset files."""


class ConfigError(RlsimError):
    """Invalid or inconsistent configuration."""


class RewardFailed(RlsimError):
    """Too many of a policy's rewards failed (the simulator could not answer): training stopped.
    ``metrics`` is what the run recorded (train_metrics.json)."""

    def __init__(self, message: str, metrics: dict | None = None):
        super().__init__(message)
        self.metrics = metrics or {}


def require_ray(what: str) -> None:
    """Library code never starts Ray (the CLI, the pipeline command and jobs/ do, once, at the edge):
    a call without a running Ray says so instead of silently starting a private instance."""
    import ray

    if not ray.is_initialized():
        raise RlsimError(f"{what} needs a running Ray: call ray.init() (or run it through the rlsim CLI or a job)")
