"""Customer-level CSV loading with column projection and precise errors.

Only the columns a run declares (features, and optionally the site and label columns) are
kept; every other column of the file is skipped as it is read. Any problem raises
:class:`~common.errors.DataError` naming the file, the 1-based data row and the column.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterator
from dataclasses import dataclass
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
    """

    raw: NDArray[np.float64]
    sites: NDArray[np.str_] | None
    labels: NDArray[np.str_] | None


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


def read_customer_csv(
    path: str | Path,
    *,
    features: tuple[FeatureSpec, ...],
    site_column: str | None = None,
    label_column: str | None = None,
) -> CustomerColumns:
    """Read the declared columns of a customer-level CSV file.

    Parameters
    ----------
    path : str or Path
        The CSV file (header row, comma separated).
    features : tuple of FeatureSpec
        Numeric feature columns, in model order. Values must be finite numbers; ``log1p``
        features must be > -1.
    site_column, label_column : str, optional
        Extra columns to keep (kept as strings).

    Returns
    -------
    CustomerColumns
    """
    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise DataError("file not found (check data.path).", path=where)
    wanted = [f.name for f in features]
    extra = [c for c in (site_column, label_column) if c is not None]
    duplicates = {c for c in wanted + extra if (wanted + extra).count(c) > 1}
    if duplicates:
        raise DataError(f"columns {sorted(duplicates)} are requested twice.", path=where)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8.", path=where
        ) from exc
    except OSError as exc:
        raise DataError(f"cannot be read ({exc.strerror}).", path=where) from exc
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
        if len(row) != len(header):
            raise DataError(
                f"has {len(row)} fields; the header has {len(header)}.", path=where, row=row_no
            )
        values = []
        for spec, idx in zip(features, feature_idx, strict=True):
            cell = row[idx].strip()
            try:
                value = float(cell)
            except ValueError as exc:
                raise DataError(
                    f"value {cell!r} is not a number; expected a numeric value.",
                    path=where, row=row_no, column=spec.name,
                ) from exc
            if not math.isfinite(value):
                raise DataError(f"value {cell!r} is not finite.", path=where, row=row_no,
                                column=spec.name)
            if spec.transform == "log1p" and value <= -1:
                raise DataError(
                    f"value {value:g} is <= -1; log1p needs values > -1.",
                    path=where, row=row_no, column=spec.name,
                )
            values.append(value)
        rows.append(values)
        if site_idx is not None:
            site = row[site_idx].strip()
            if not site:
                raise DataError("empty site value.", path=where, row=row_no,
                                column=site_column)
            sites.append(site)
        if label_idx is not None:
            labels.append(row[label_idx].strip())
    if not rows:
        raise DataError("no data rows after the header.", path=where)
    return CustomerColumns(
        raw=np.asarray(rows, dtype=np.float64).reshape(len(rows), len(features)),
        sites=np.asarray(sites, dtype=str) if site_idx is not None else None,
        labels=np.asarray(labels, dtype=str) if label_idx is not None else None,
    )
