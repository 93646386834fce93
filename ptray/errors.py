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


class StartupError(Exception):
    """A worker raised an exception before its first optimizer step: an import, an op build, a config or shape error.
    The same set-up would raise it again, so the driver stops the run instead of restarting the workers
    (`session.fit_with_retries`). It carries the original as text: exceptions reach the driver pickled, without their
    traceback or cause."""

    def __init__(self, message: str, traceback_text: str, user_error: bool):
        super().__init__(message)
        self.message, self.traceback_text, self.user_error = message, traceback_text, user_error

    def __reduce__(self):
        return (self.__class__, (self.message, self.traceback_text, self.user_error))
