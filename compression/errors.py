"""User-facing errors.

Anything that is the user's fault (a bad file, a bad config value) raises a subclass of
``PrunepipeError`` whose message is one line naming *what* is wrong and *where*. The CLI prints
that line and exits non-zero without a traceback; everything else is a bug and keeps its traceback.
"""


class PrunepipeError(Exception):
    """A problem with the user's input: printed as one line, exit code 2."""


class ConfigError(PrunepipeError):
    pass


class DataError(PrunepipeError):
    pass


class ModelError(PrunepipeError):
    pass


class CheckpointError(PrunepipeError):
    pass


class StageError(PrunepipeError):
    """A stage cannot go on (e.g. the loss diverged); earlier outputs are kept."""
