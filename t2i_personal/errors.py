"""Exceptions with messages that name the offending file, key or value and say what to do.

Every CLI and the demo catch :class:`UserError` and show its message without a traceback: it means the input
must change, not the code.
"""


class UserError(Exception):
    """Something the user gave (a file, a key, a value, a folder) cannot be used; the message says what to do."""


class ConfigError(UserError, ValueError):
    """A configuration value is unknown, invalid or contradicts another one."""


class ModelLoadError(UserError, OSError):
    """A base model could not be found, reached or safely loaded."""


class TrainingDiverged(UserError, RuntimeError):
    """The loss or its gradients stayed NaN/inf: the settings (precision, learning rate) must change."""
