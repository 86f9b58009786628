"""Customer-level CSV loading with column projection and precise errors.

Only the columns a run declares (features, and optionally the site and label columns) are
kept; every other column of the file is skipped as it is read. Any problem raises
:class:`~common.errors.DataError` naming the file, the 1-based data row and the column.

Two readers, one contract: a valid file is read by DuckDB's CSV reader (columnar, projected,
``.csv.gz`` read directly; ~10x faster than Python at a million rows, docs/BENCHMARKS.md), and
anything DuckDB does not read cleanly -- a bad cell, a short row, an empty site, bytes that are
not UTF-8 -- is re-read by the line-by-line reference reader, which raises the precise error.
Both give identical results on valid files (property-tested). A header naming a requested
column twice is refused instead of silently taking the first.
"""

from __future__ import annotations

import csv
import gzip
import io
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from common.errors import DataError
from common.features import FeatureSpec


@dataclass(frozen=True)
class CustomerColumns:
    """Projected content of a customer CSV.

    Attributes
    ----------
    raw : ndarray of shape (n_rows, n_features)
        Feature values in file units.
    sites : ndarray of shape (n_rows,) of str or None
        Value of the site column per row, when one was requested.
    labels : ndarray of shape (n_rows,) of str or None
        Value of the label column per row, when one was requested.
    invalid : dict of str to int
        Rows excluded by reason (``on_invalid="quarantine"`` only).
    """

    raw: NDArray[np.float64]
    sites: NDArray[np.str_] | None
    labels: NDArray[np.str_] | None
    invalid: dict[str, int] = field(default_factory=dict)


def _rows(reader: Iterator[list[str]], where: str) -> Iterator[list[str]]:
    """Yield CSV rows, turning the csv module's errors into a DataError with the row."""
    row_no = 0
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise DataError(f"malformed CSV ({exc}).", path=where, row=row_no) from exc
        row_no += 1
        yield row


def _read_text(path: Path, where: str) -> str:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as handle:
                data = handle.read()
        else:
            data = path.read_bytes()
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8.", path=where
        ) from exc
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise DataError(f"cannot be read ({reason}).", path=where) from exc


def _check_request(path: Path, where: str, wanted: list[str], extra: list[str]) -> None:
    if not path.is_file():
        raise DataError("file not found (check data.path).", path=where)
    duplicates = {c for c in wanted + extra if (wanted + extra).count(c) > 1}
    if duplicates:
        raise DataError(f"columns {sorted(duplicates)} are requested twice.", path=where)


def _header(path: Path, where: str) -> list[str] | None:
    """Return the header row (first record) without loading the file; None if unreadable."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8-sig", newline="") as handle:
            first = next(csv.reader(handle), None)
    except (OSError, EOFError, UnicodeDecodeError, csv.Error, gzip.BadGzipFile):
        return None
    return None if first is None else [h.strip() for h in first]


def read_customer_csv(
    path: str | Path,
    *,
    features: tuple[FeatureSpec, ...],
    site_column: str | None = None,
    label_column: str | None = None,
    on_invalid: str = "error",
) -> CustomerColumns:
    """Read the declared columns of a customer-level CSV file (``.csv`` or ``.csv.gz``).

    DuckDB reads a valid file; any irregularity is re-read by the reference reader for a
    precise error (module docstring).

    Parameters
    ----------
    path : str or Path
        The CSV file (header row, comma separated), optionally gzip-compressed.
    features : tuple of FeatureSpec
        Numeric feature columns, in model order. Values must be finite numbers; ``log1p``
        features must be > -1.
    site_column, label_column : str, optional
        Extra columns to keep (kept as strings).
    on_invalid : {"error", "quarantine"}
        ``error`` stops at the first bad row (file, row and column named); ``quarantine``
        excludes every bad row and counts it by reason in ``CustomerColumns.invalid``.

    Returns
    -------
    CustomerColumns
    """
    path = Path(path)
    where = str(path)
    if on_invalid not in ("error", "quarantine"):
        raise DataError(f"on_invalid={on_invalid!r} should be 'error' or 'quarantine'.",
                        path=where)
    wanted = [f.name for f in features]
    extra = [c for c in (site_column, label_column) if c is not None]
    _check_request(path, where, wanted, extra)
    header = _header(path, where)
    if header is not None:
        twice = sorted({c for c in wanted + extra if header.count(c) > 1})
        if twice:
            raise DataError(f"the header names column(s) {twice} more than once; which one "
                            "to use is ambiguous. Rename the duplicates.", path=where,
                            column=twice[0])
        if all(c in header for c in wanted + extra):
            fast = _read_with_duckdb(path, header, features, site_column, label_column)
            if fast is not None:
                return fast
    return _read_reference(path, features=features, site_column=site_column,
                           label_column=label_column, on_invalid=on_invalid)


def _read_with_duckdb(
    path: Path,
    header: list[str],
    features: tuple[FeatureSpec, ...],
    site_column: str | None,
    label_column: str | None,
) -> CustomerColumns | None:
    """Projected columnar read; None whenever the file is not perfectly regular.

    Columns are declared by position (``c0``, ``c1``, ...) from the header the caller read, so
    no name needs quoting and only the requested positions are materialised.
    """
    import duckdb

    columns = "{" + ", ".join(f"'c{i}': 'VARCHAR'" for i in range(len(header))) + "}"
    # Features are parsed by DuckDB (correctly rounded, like Python's float); a cell it cannot
    # parse becomes NULL and sends the file to the reference reader.
    parts = [f'TRY_CAST(trim(c{header.index(f.name)}) AS DOUBLE) AS "f{j}"'
             for j, f in enumerate(features)]
    parts += [f'c{header.index(c)} AS "{key}"'
              for key, c in (("site", site_column), ("label", label_column)) if c]
    options = ("header=true, delim=',', quote='\"', escape='\"', strict_mode=true, "
               "null_padding=false, store_rejects=true, auto_detect=false")
    from client.sources import connect_engine

    con = connect_engine()  # never spills raw cells to disk
    try:
        result = con.execute(
            f"SELECT {', '.join(parts)} FROM read_csv(?, columns={columns}, {options})",
            [str(path)]).fetchnumpy()
        if con.execute("SELECT count(*) FROM reject_errors").fetchone() != (0,):
            return None
    except duckdb.Error:
        return None
    finally:
        con.close()
    n = len(result["f0"]) if features else 0
    if n == 0:
        return None
    raw = np.empty((n, len(features)), dtype=np.float64)
    for j, spec in enumerate(features):
        column = result[f"f{j}"]
        if np.ma.isMaskedArray(column) and np.any(np.ma.getmaskarray(column)):
            return None  # an empty or unparseable cell: the reference reader names it
        values = np.asarray(column, dtype=np.float64)
        if not np.all(np.isfinite(values)) or (spec.transform == "log1p"
                                               and np.any(values <= -1)):
            return None
        raw[:, j] = values
    rows = {name: result[key] for key, name in (("site", site_column), ("label", label_column))
            if name}
    sites = labels = None
    if site_column:
        column = rows[site_column]
        if hasattr(column, "mask") and np.any(column.mask):
            return None
        sites = np.char.strip(np.asarray(column, dtype=str))
        if np.any(sites == ""):
            return None
    if label_column:
        column = rows[label_column]
        filled = np.asarray(np.ma.filled(column, ""), dtype=str) if hasattr(column, "mask") \
            else np.asarray(column, dtype=str)
        labels = np.char.strip(filled)
    return CustomerColumns(raw=raw, sites=sites, labels=labels)


def _read_reference(
    path: Path,
    *,
    features: tuple[FeatureSpec, ...],
    site_column: str | None = None,
    label_column: str | None = None,
    on_invalid: str = "error",
) -> CustomerColumns:
    """Line-by-line reference reader: the precise error for any irregular file.

    Same parameters and result as :func:`read_customer_csv` (without its header checks).
    """
    invalid: dict[str, int] = {}
    where = str(path)
    wanted = [f.name for f in features]
    extra = [c for c in (site_column, label_column) if c is not None]
    text = _read_text(path, where)
    reader = _rows(csv.reader(io.StringIO(text, newline="")), where)
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration as exc:
        raise DataError("the file is empty; expected a header row.", path=where) from exc
    missing = [c for c in wanted + extra if c not in header]
    if missing:
        raise DataError(
            f"missing column(s) {missing}; the header has {header}.", path=where,
            column=missing[0],
        )
    feature_idx = [header.index(c) for c in wanted]
    site_idx = header.index(site_column) if site_column else None
    label_idx = header.index(label_column) if label_column else None
    rows: list[list[float]] = []
    sites: list[str] = []
    labels: list[str] = []
    for row_no, row in enumerate(reader, start=1):
        if not row or all(not cell.strip() for cell in row):
            continue
        try:
            parsed = _parse_row(row, row_no, header, features, feature_idx, site_idx, label_idx,
                                where, site_column)
        except DataError as exc:
            if on_invalid == "error":
                raise
            key = f"{exc.column}: invalid value" if exc.column else "malformed row"
            invalid[key] = invalid.get(key, 0) + 1
            continue
        values, site, label = parsed
        rows.append(values)
        if site is not None:
            sites.append(site)
        if label is not None:
            labels.append(label)
    if not rows:
        raise DataError("no valid data rows after the header." if invalid else
                        "no data rows after the header.", path=where)
    return CustomerColumns(
        raw=np.asarray(rows, dtype=np.float64).reshape(len(rows), len(features)),
        sites=np.asarray(sites, dtype=str) if site_idx is not None else None,
        labels=np.asarray(labels, dtype=str) if label_idx is not None else None,
        invalid=invalid,
    )


def _parse_row(row: list[str], row_no: int, header: list[str],
               features: tuple[FeatureSpec, ...], feature_idx: list[int], site_idx: int | None,
               label_idx: int | None, where: str, site_column: str | None
               ) -> tuple[list[float], str | None, str | None]:
    """Parse one data row; raise the DataError naming its row and column."""
    if len(row) != len(header):
        raise DataError(f"has {len(row)} fields; the header has {len(header)}.", path=where,
                        row=row_no)
    values = []
    for spec, idx in zip(features, feature_idx, strict=True):
        cell = row[idx].strip()
        try:
            value = float(cell)
        except ValueError as exc:
            raise DataError(f"value {cell!r} is not a number; expected a numeric value.",
                            path=where, row=row_no, column=spec.name) from exc
        if not math.isfinite(value):
            raise DataError(f"value {cell!r} is not finite.", path=where, row=row_no,
                            column=spec.name)
        if spec.transform == "log1p" and value <= -1:
            raise DataError(f"value {value:g} is <= -1; log1p needs values > -1.",
                            path=where, row=row_no, column=spec.name)
        values.append(value)
    site = None
    if site_idx is not None:
        site = row[site_idx].strip()
        if not site:
            raise DataError("empty site value.", path=where, row=row_no, column=site_column)
    label = row[label_idx].strip() if label_idx is not None else None
    return values, site, label
