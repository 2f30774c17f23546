"""Errors a user can meet. The CLI prints these as one line plus a hint, never a traceback."""


class LensTuneError(Exception):
    """Base class for every error caused by user input (files, recipes, arguments)."""


class ModelLoadError(LensTuneError):
    """A checkpoint or model folder could not be loaded as asked."""


class RecipeError(LensTuneError):
    """A recipe file (or a command-line override of it) is invalid."""


class DatasetError(LensTuneError):
    """Training data is missing, empty or unreadable."""
