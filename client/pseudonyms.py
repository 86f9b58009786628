"""HMAC-SHA256 pseudonyms of whole id columns, as 32-byte digests.

The gate pseudonymises every subject id it reads. :mod:`client._pseudonyms` (C, OpenSSL's
SHA-256, the GIL released and the column split over the CPUs) does it about 12x faster than a
Python loop (1,000,000 ids: 0.06 s instead of 0.73 s); where it was not built (no C compiler
or OpenSSL headers at install time) the same digests come from Python's :mod:`hmac`.
``tests/unit/test_pseudonyms.py`` checks both against ``hmac.digest`` on arbitrary ids.

Digests are kept as an ``(n, 32)`` uint8 array; :func:`to_hex` gives the 64-character form the
store and the CLI use (:meth:`client.site_key.SiteKey.pseudonym`), only when they need it.
"""

from __future__ import annotations

import hmac
import os
import re
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

_native: Any
try:
    from client import _pseudonyms as _native  # type: ignore[attr-defined, no-redef]
except ImportError:  # not built: the Python path below gives the same digests
    _native = None

DIGEST = 32
OK, MISSING, NON_ASCII_EDGE, STRIPPED = 0, 1, 2, 3
_PSEUDONYM = re.compile(r"[0-9a-f]{64}")
_HEX_DIGITS = b"0123456789abcdef"


def backend() -> str:
    """Return ``"native"`` when the C module is in use, ``"python"`` otherwise."""
    return "python" if _native is None else "native"


def _threads() -> int:
    try:
        return max(1, min(len(os.sched_getaffinity(0)), 16))
    except (AttributeError, OSError):
        return max(1, min(os.cpu_count() or 1, 16))


def _python_digests(key: bytes, ids: Sequence[Any], *, strip: bool
                    ) -> tuple[NDArray[np.uint8], NDArray[np.uint8]]:
    n = len(ids)
    out = np.zeros((n, DIGEST), dtype=np.uint8)
    status = np.zeros(n, dtype=np.uint8)
    for i, raw in enumerate(ids):
        if raw is None and strip:
            status[i] = MISSING
            continue
        if not isinstance(raw, str):
            raise TypeError(f"pseudonyms: id at position {i} is {type(raw).__name__}, "
                            "expected str" + (" or None" if strip else ""))
        text = raw.strip() if strip else raw
        if not text:
            if strip:
                status[i] = MISSING
                continue
        elif text != raw:
            status[i] = STRIPPED
        out[i] = np.frombuffer(hmac.digest(key, text.encode("utf-8"), "sha256"), np.uint8)
    return out, status


def digests(key: bytes, ids: Sequence[Any], *, strip: bool = False
            ) -> tuple[NDArray[np.uint8], NDArray[np.uint8]]:
    """Return HMAC-SHA256 digests of ids under ``key``, and a status per id.

    Parameters
    ----------
    key : bytes
        The HMAC key.
    ids : sequence of str (or None where ``strip``)
        The ids, hashed as UTF-8.
    strip : bool
        Normalise as readers do (:func:`client.sources.normalise_id`: ``str.strip()``) before
        hashing; ``None`` and ids empty after stripping are missing.

    Returns
    -------
    digests : ndarray of uint8, shape (n, 32)
        Zero rows where the status is ``MISSING``.
    status : ndarray of uint8, shape (n,)
        ``OK`` hashed as given, ``STRIPPED`` hashed after stripping, ``MISSING`` no id.
    """
    items = ids if isinstance(ids, list) else list(ids)
    if _native is None:
        return _python_digests(key, items, strip=strip)
    raw, flags = _native.hmac_list(key, items, strip, _threads())
    out = np.frombuffer(raw, dtype=np.uint8).reshape(len(items), DIGEST)
    status = np.frombuffer(flags, dtype=np.uint8)
    edge = np.flatnonzero(status == NON_ASCII_EDGE)
    if edge.size:  # Unicode whitespace may surround them: str.strip() decides
        out, status = out.copy(), status.copy()
        fixed, fixed_status = _python_digests(key, [items[i] for i in edge], strip=True)
        out[edge] = fixed
        status[edge] = fixed_status
    return out, status


def column_digests(key: bytes, column: Any) -> tuple[NDArray[np.uint8], NDArray[np.uint8]]:
    """:func:`digests` with ``strip=True`` of a pyarrow string column, without Python strs.

    Parameters
    ----------
    key : bytes
    column : pyarrow.ChunkedArray or pyarrow.Array of strings
        Nulls are missing ids.
    """
    import pyarrow as pa

    chunks = list(column.chunks) if isinstance(column, pa.ChunkedArray) else [column]
    if _native is None:
        return digests(key, [v for chunk in chunks for v in chunk.to_pylist()], strip=True)
    total = sum(len(chunk) for chunk in chunks)
    out = np.empty((total, DIGEST), dtype=np.uint8)
    status = np.empty(total, dtype=np.uint8)
    at = 0
    for chunk in chunks:
        if chunk.type not in (pa.string(), pa.large_string()):
            chunk = chunk.cast(pa.large_string())
        n = len(chunk)
        _, offsets, data = chunk.buffers()
        rows = slice(at, at + n)
        _native.hmac_column(key, offsets, b"" if data is None else data, chunk.offset, n,
                            chunk.type == pa.large_string(), out[rows], status[rows],
                            _threads())
        if chunk.null_count:
            nulls = np.flatnonzero(chunk.is_null().to_numpy(zero_copy_only=False)) + at
            out[nulls] = 0
            status[nulls] = MISSING
        edge = np.flatnonzero(status[rows] == NON_ASCII_EDGE)
        if edge.size:  # Unicode whitespace may surround them: str.strip() decides
            fixed, fixed_status = _python_digests(
                key, [chunk[int(i)].as_py() for i in edge], strip=True)
            out[edge + at] = fixed
            status[edge + at] = fixed_status
        at += n
    return out, status


def duplicate_rows(d: NDArray[np.uint8], skip: NDArray[np.bool_]) -> NDArray[np.bool_]:
    """Return a mask of rows whose digest also belongs to another row (``skip`` rows excluded).

    Parameters
    ----------
    d : ndarray of uint8, shape (n, 32)
    skip : ndarray of bool, shape (n,)
    """
    if _native is not None:
        flags = _native.duplicates(np.ascontiguousarray(d),
                                   np.ascontiguousarray(skip, dtype=np.uint8))
        return np.frombuffer(flags, dtype=np.uint8).astype(bool)
    keys = np.ascontiguousarray(d).view(np.dtype((np.void, DIGEST))).ravel()
    out = np.zeros(d.shape[0], dtype=bool)
    take = np.flatnonzero(~skip)
    if take.size:
        _, inverse, counts = np.unique(keys[take], return_inverse=True, return_counts=True)
        out[take] = counts[inverse] > 1
    return out


def to_hex(d: NDArray[np.uint8]) -> NDArray[Any]:
    """Return the 64-character lowercase hex pseudonyms of digests (object array of str)."""
    text = np.ascontiguousarray(d).tobytes().hex()
    width = 2 * DIGEST
    return np.asarray([text[i:i + width] for i in range(0, len(text), width)], dtype=object)


def from_hex(pseudonyms: Iterable[str]) -> NDArray[np.uint8]:
    """Return the digests of 64-character lowercase hex pseudonyms (others are skipped).

    Pseudonyms are always written in that form, so anything else can match no row.
    """
    # exactly 64 lowercase hex digits (bytes.fromhex would skip spaces and shift every digest
    # after a malformed entry)
    good = [p for p in pseudonyms if isinstance(p, str) and len(p) == 2 * DIGEST]
    joined = "".join(good)
    try:
        clean = not joined.encode("ascii").translate(None, _HEX_DIGITS)
    except UnicodeEncodeError:
        clean = False
    if not clean:  # rare: drop the entries that are not pseudonyms
        joined = "".join(p for p in good if _PSEUDONYM.fullmatch(p))
    return np.frombuffer(bytes.fromhex(joined), dtype=np.uint8).reshape(-1, DIGEST)


def member_mask(d: NDArray[np.uint8], wanted: NDArray[np.uint8]) -> NDArray[np.bool_]:
    """Return the rows of ``d`` whose digest is one of ``wanted`` (exact, all 32 bytes).

    Native: a hash table of ``wanted`` (keyed per process, so chosen digests cannot all
    collide). Python: rows are matched on their first 8 bytes (sorted
    search) and then confirmed on all 32.
    """
    n = d.shape[0]
    if n == 0 or wanted.shape[0] == 0:
        return np.zeros(n, dtype=bool)
    rows = np.ascontiguousarray(d)
    want = np.ascontiguousarray(wanted)
    if _native is not None:
        return np.frombuffer(_native.members(rows, want),
                             dtype=np.uint8).astype(bool)
    keys = rows.view("<u8")[:, 0]
    want_keys = want.view("<u8")[:, 0]
    order = np.argsort(want_keys, kind="stable")
    sorted_keys = want_keys[order]
    if np.any(sorted_keys[1:] == sorted_keys[:-1]):  # two wanted digests share 8 bytes
        wanted_set = {bytes(w) for w in want}
        return np.fromiter((bytes(r) in wanted_set for r in rows), dtype=bool, count=n)
    pos = np.searchsorted(sorted_keys, keys)
    pos[pos == sorted_keys.size] = 0
    candidate = np.flatnonzero(sorted_keys[pos] == keys)
    out = np.zeros(n, dtype=bool)
    if candidate.size:
        same = np.all(rows[candidate] == want[order[pos[candidate]]], axis=1)
        out[candidate[same]] = True
    return out
