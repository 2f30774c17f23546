"""Errors a user can meet. The CLI prints these as one line plus a hint, never a traceback."""


class LensTuneError(Exception):
    """Base class for every error caused by user input (files, recipes, arguments)."""


class ModelLoadError(LensTuneError):
    """A checkpoint or model folder could not be loaded as asked."""
