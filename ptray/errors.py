"""User-facing errors: anything a user can fix by changing their config, data or command.

The CLI turns these into a one-paragraph message and a non-zero exit; everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A mistake in the user's input: the message says what is wrong, where, and how to fix it."""


class ConfigError(UserError):
    """A bad config key or value."""


class DataError(UserError):
    """Missing, empty or corrupt input data."""


class TrainingStopped(UserError):
    """Training stopped itself (e.g. the loss stayed non-finite); the last good checkpoint is kept."""
