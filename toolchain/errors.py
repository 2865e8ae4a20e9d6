"""Errors a user can cause: the CLI prints them as one line and exits with status 2."""


class ToolchainError(Exception):
    """A problem with the user's input or environment, with a message saying what to do."""


class DataError(ToolchainError):
    """The dataset is missing, empty, of an unknown layout or corrupt."""


class CheckpointError(ToolchainError):
    """A checkpoint cannot be read or does not fit the architecture."""


class ConfigError(ToolchainError, ValueError):
    """A setting out of range (a ratio, an architecture, a size): a ValueError to library callers."""
