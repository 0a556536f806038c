"""Exceptions with messages that name the offending file, key or value and say what to do."""


class ConfigError(ValueError):
    """A configuration value is unknown, invalid or contradicts another one."""


class ModelLoadError(OSError):
    """A base model could not be found, reached or safely loaded."""
