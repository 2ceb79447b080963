"""User-facing errors: each carries one line that says what is wrong and what to do."""


class AttnflowsError(Exception):
    """An error caused by user input or the environment, reported as one line."""


class InputError(AttnflowsError, ValueError):
    """Bad text, file, flag or parameter value."""


class ModelError(AttnflowsError):
    """A model that cannot be loaded or a pair that cannot be compared."""


class StoreError(AttnflowsError):
    """A run directory that is missing, foreign, corrupted or stale."""


class TruncationWarning(UserWarning):
    """An input was longer than the model allows and was cut."""
