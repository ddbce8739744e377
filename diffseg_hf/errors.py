"""One exception family for user errors; the CLI shows them as one line.

Internal invariants are plain ``assert`` statements with the values in the message.
"""


class DiffsegError(Exception):
    """A user error: bad recipe, missing data, bad checkpoint, bad flag. Its message is one line
    that names the bad field, file or flag and says how to fix it."""

    exit_code = 2  # what the CLI exits with


class RecipeError(DiffsegError):
    """A recipe file or override is invalid."""


class DataError(DiffsegError):
    """A data source is missing or malformed."""


class CheckpointError(DiffsegError):
    """A model, classifier or training checkpoint folder is missing, corrupted or incompatible."""
