"""One exception type for user-facing errors: the CLI prints its message on one line and exits 2."""


class RlsimError(Exception):
    """An error caused by input (files, config, data, an endpoint), not by a bug in rlsim."""


class DataError(RlsimError):
    """Missing, corrupt or malformed dataset files."""


class ConfigError(RlsimError):
    """Invalid or inconsistent configuration."""
