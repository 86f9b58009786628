"""Project error types: every message names what was wrong and what was expected."""

from __future__ import annotations


class FedsegError(Exception):
    """Base class of every error fedseg raises on purpose."""


class ConfigError(FedsegError):
    """A configuration value is missing, of the wrong type or out of range."""


class DataError(FedsegError):
    """Input data does not satisfy its contract.

    Parameters
    ----------
    message : str
        What was wrong and what was expected.
    path : str or None
        The file the data came from, if any.
    row : int or None
        1-based data row (header excluded) where the problem was found.
    column : str or None
        The column concerned.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        row: int | None = None,
        column: str | None = None,
    ) -> None:
        self.path = path
        self.row = row
        self.column = column
        where = []
        if path is not None:
            where.append(f"file {path!r}")
        if row is not None:
            where.append(f"row {row}")
        if column is not None:
            where.append(f"column {column!r}")
        prefix = (", ".join(where) + ": ") if where else ""
        super().__init__(prefix + message)


class ProtocolError(FedsegError):
    """A federated message did not have the public layout agreed for its phase."""
