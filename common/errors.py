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


SITE_ERROR_CODES: dict[str, str] = {
    "policy": "the request is outside this site's policy",
    "protocol": "the request does not follow the fedseg protocol",
    "secagg": "the secure-aggregation exchange is inconsistent or unsafe",
    "budget": "this site's round budget is spent",
    "federation": "the federation is too small for this site's policy",
    "data": "the site could not load or check its data",
    "range": "a site statistic is outside the secure-sum encoding's range",
    "internal": "the site hit an internal error",
}
"""Codes a site may send to the server, each with the only text that leaves the site."""

SITE_ERROR_PREFIX = "fedseg-site-error"
"""Marker of a sanitised site error in an error reply (``<prefix> <code>: <generic text>``)."""


class SiteRefusal(FedsegError):
    """A site refuses a request; only :attr:`code` and its generic text leave the site.

    Parameters
    ----------
    code : str
        One of :data:`SITE_ERROR_CODES`.
    detail : str
        The full reason, written to the site's own log only (it may name local values).
    """

    def __init__(self, code: str, detail: str) -> None:
        if code not in SITE_ERROR_CODES:
            raise ValueError(f"unknown site error code {code!r}; expected one of "
                             f"{sorted(SITE_ERROR_CODES)}.")
        self.code = code
        self.detail = detail
        super().__init__(f"[{code}] {detail}")


def site_error_code(exc: BaseException) -> str:
    """Map any exception raised at a site to the code that may leave the site."""
    if isinstance(exc, SiteRefusal):
        return exc.code
    if isinstance(exc, DataError):
        return "data"
    if isinstance(exc, ProtocolError):
        return "protocol"
    if isinstance(exc, ConfigError):
        return "policy"
    return "internal"


def public_site_error(code: str) -> str:
    """Return the text of an error reply for ``code``: a code and a generic message, no value."""
    return f"{SITE_ERROR_PREFIX} {code}: {SITE_ERROR_CODES[code]} (details in the site's log)"
