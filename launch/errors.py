"""User-facing errors: raised by library code, turned into one line and exit code 2 by the CLI."""


class UserError(Exception):
    """Bad input the user can fix (config, paths, data). The message is the whole story."""

    exit_code = 2


class ConfigError(UserError):
    """An unknown key, a wrong type or an impossible combination of settings."""


class DataError(UserError):
    """Missing, empty or inconsistent data (shard specs, folders, manifests)."""


class CheckpointError(UserError):
    """A checkpoint that is missing, partial or does not fit the model / config."""
