"""Exceptions raised for a user's mistakes: each names the file, line or field at fault."""

from __future__ import annotations

from pathlib import Path


class RouterRetrieverError(Exception):
    """Base class of the errors this package raises for bad input or configuration."""


class DataError(RouterRetrieverError, ValueError):
    """A data file is missing or malformed.

    The message starts with ``path:line:`` when a line is at fault, so editors can jump to it.
    """

    def __init__(self, message: str, path: str | Path | None = None, line: int | None = None):
        self.path = None if path is None else Path(path)
        self.line = line
        where = ""
        if path is not None:
            where = f"{path}:{line}: " if line is not None else f"{path}: "
        super().__init__(where + message)


class ModelError(RouterRetrieverError, ValueError):
    """A model, adapter or expert folder cannot be used (wrong base model, unsafe format, ...)."""
