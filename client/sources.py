"""Read what a data contract allows from its source, with column projection, into typed arrays.

Three kinds of source, one result (:class:`SourceRows`):

* **CSV** (``.csv`` / ``.csv.gz``) and **Parquet** files are read by DuckDB. Only the columns the
  contract names are projected (a CSV's other columns are split off as text and never parsed;
  a Parquet file's other columns are never decoded). Casting, vocabulary lookup and, for
  transaction-level sources, the aggregation to customer features all run inside the engine.
* **SQL** tables (any SQLAlchemy URL; SQLite and PostgreSQL tested) are queried for the named
  columns only, ordered by the subject id; a transaction-level table is aggregated by the
  database itself (``GROUP BY``).

Nothing here decides what is valid or who may take part: invalid cells become ``NaN`` (numbers,
booleans) or ``-1`` (categories), and :mod:`client.gate` applies the contract's ``on_invalid``
rule. Messages name the file (or URL and table), the row and the column, never a cell's value.
"""

from __future__ import annotations

import csv
import gzip
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from client.contract import DataContract, FeatureContract, quote_identifier, source_columns
from common.errors import DataError

_TRUE = ("true", "1", "yes", "y", "t")
_FALSE = ("false", "0", "no", "n", "f")


@dataclass
class SourceRows:
    """Customer rows read from a source, typed but not yet validated.

    Attributes
    ----------
    location : str
        The file, or URL and table, for messages.
    ids : ndarray of object, shape (n,), or None
        Raw subject ids, normalised (:func:`normalise_id`; ``None`` where missing). ``None``
        for a customer-level file: its ids are in ``id_column`` instead.
    rows : ndarray of int64, shape (n,)
        1-based row of each customer in the source (data rows of a file, rows of the query
        ordered by subject id, or customers ordered by id for transaction sources).
    values : dict of str to ndarray
        Per contract feature: float64 (numeric and boolean, ``NaN`` where empty or invalid)
        or int64 vocabulary index (categorical, ``-1`` where invalid).
    consent : ndarray of float64 or None
        The consent column (1, 0, ``NaN`` where not a boolean) when consent lives in a column.
    rejected : list of (int, str)
        Rows the reader could not split into fields: (line, reason).
    transactions : dict of str to int
        For transaction sources: rows read, rows invalid, rows after ``as_of``.
    id_column : pyarrow.ChunkedArray or None
        A customer-level file's ids as the engine read them (not normalised: the gate strips
        them as it hashes them, :func:`client.pseudonyms.column_digests`, with no Python call
        per id). :meth:`id_values` gives them as an object array.
    """

    location: str
    ids: NDArray[Any] | None
    rows: NDArray[np.int64]
    values: dict[str, NDArray[Any]]
    consent: NDArray[np.float64] | None = None
    rejected: list[tuple[int, str]] = field(default_factory=list)
    transactions: dict[str, Any] = field(default_factory=dict)
    row_label: str = "row"
    id_column: Any = None

    def __len__(self) -> int:
        """Return the number of customer rows."""
        return len(self.id_column) if self.ids is None else int(self.ids.shape[0])

    def id_values(self) -> NDArray[Any]:
        """Return the ids as an object array (made from ``id_column`` on first use).

        From ``id_column`` they are as the file holds them, not normalised: apply
        :func:`normalise_id` (the gate does).
        """
        if self.ids is None:
            self.ids = _objects(self.id_column.to_numpy(zero_copy_only=False))
        return self.ids


# -- file sources (DuckDB) -------------------------------------------------------------------


def _csv_header(path: Path, where: str) -> list[str]:
    try:
        opener: Any = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8-sig", newline="") as handle:
            first = next(csv.reader(handle), None)
    except FileNotFoundError:
        raise DataError("file not found (check source.path in the contract).",
                        path=where) from None
    except UnicodeDecodeError as exc:
        raise DataError(f"the header is not UTF-8 text (byte {exc.start}).", path=where) from None
    except (OSError, EOFError, csv.Error, gzip.BadGzipFile, zlib.error) as exc:
        raise DataError(f"cannot be read as CSV ({exc}).", path=where) from None
    if not first:
        raise DataError("the file is empty; expected a header row.", path=where)
    return [h.strip() for h in first]


def _check_columns(header: list[str], wanted: list[str], where: str) -> None:
    missing = [c for c in wanted if c not in header]
    if missing:
        # The names are not quoted back: a file without its header row would show its first
        # customer's values here.
        raise DataError(f"missing column(s) {missing} named by the contract; the source has "
                        f"{len(header)} column(s) and none of these names (is the header row "
                        "missing, or a column renamed?). `fedseg-site check` lists the source's "
                        "columns.", path=where, column=missing[0])
    twice = sorted({c for c in wanted if header.count(c) > 1})
    if twice:
        raise DataError(f"the header names column(s) {twice} more than once; which one to use "
                        "is ambiguous. Rename the duplicates.", path=where, column=twice[0])


def _typed(expr: str, f: FeatureContract, params: list[Any], *, text: bool) -> str:
    """Return SQL (DuckDB) turning one source column into the feature's typed value."""
    cell = f"trim(CAST({expr} AS VARCHAR))"
    if f.type == "numeric":
        return f"TRY_CAST({cell} AS DOUBLE)" if text else f"TRY_CAST({expr} AS DOUBLE)"
    if f.type == "boolean":
        return (f"CASE WHEN lower({cell}) IN {_TRUE} THEN 1.0::DOUBLE "
                f"WHEN lower({cell}) IN {_FALSE} THEN 0.0::DOUBLE ELSE NULL END")
    params.append(list(f.vocabulary or []))
    return f"coalesce(list_position(?, {cell}), 0) - 1"


def engine_error(exc: BaseException) -> str:
    """Return a database error's first line with quoted literals masked (cells stay local)."""
    if _out_of_memory(exc):
        return ("the source needs more memory than the engine may use, and fedseg never lets "
                "it spill customer data to disk: run the site on a machine with more memory, "
                "or split the source")
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return re.sub(r"'[^']*'?", "'…'", first)


def _fetch(con: Any, sql: str, params: list[Any], where: str) -> dict[str, Any]:
    import duckdb

    try:
        return dict(con.execute(sql, params).fetchnumpy())
    except duckdb.Error as exc:
        raise DataError(f"cannot be read ({engine_error(exc)}).", path=where) from None


def _float(column: Any) -> NDArray[np.float64]:
    values = np.asarray(np.ma.filled(column, np.nan) if np.ma.isMaskedArray(column) else column,
                        dtype=np.float64)
    finite = np.isfinite(values)
    return values if finite.all() else np.where(finite, values, np.nan)


def _ints(column: Any) -> NDArray[np.int64]:
    filled = np.ma.filled(column, -1) if np.ma.isMaskedArray(column) else column
    return np.asarray(filled, dtype=np.int64)


def normalise_id(value: Any) -> str | None:
    """Return the one form of a subject id used everywhere (readers, CLI, consent files)."""
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _normalised_ids(column: Any) -> NDArray[Any]:
    return np.asarray([normalise_id(v) for v in _objects(column).tolist()], dtype=object)


def _objects(column: Any) -> NDArray[Any]:
    if np.ma.isMaskedArray(column):
        out = np.asarray(column.data, dtype=object)
        out[np.ma.getmaskarray(column)] = None
        return out
    return np.asarray(column, dtype=object)


def _file_relation(contract: DataContract, con: Any, *, types: dict[str, str] | None = None,
                   rejects: bool = True) -> tuple[str, dict[str, str], str, list[Any]]:
    """Return (FROM clause, column -> SQL expression, where, params) for a file source.

    For a CSV, the columns in ``types`` are parsed by the CSV reader itself as that type
    (``DOUBLE``, ``BOOLEAN``: a cell that is not one fails the read, and the caller reads again
    as text); all others are text. ``rejects`` keeps the lines that do not split into the
    header's fields in DuckDB's ``reject_errors`` table instead of failing the read.
    """
    types = types or {}
    assert contract.source.path is not None
    path = contract.resolve(contract.source.path)
    where = str(path)
    if not path.is_file():
        raise DataError("file not found (check source.path in the contract).", path=where)
    wanted = source_columns(contract)
    if contract.source.kind == "parquet":
        import duckdb

        try:
            described = con.execute("DESCRIBE SELECT * FROM read_parquet(?)",
                                    [str(path)]).fetchall()
        except duckdb.Error as exc:
            raise DataError(f"is not a readable Parquet file ({engine_error(exc)}).",
                            path=where) from None
        header = [str(row[0]) for row in described]
        _check_columns(header, wanted, where)
        exprs = {c: quote_identifier(c) for c in wanted}
        return ("read_parquet(?, file_row_number=true)", exprs, where, [str(path)])
    header = _csv_header(path, where)
    _check_columns(header, wanted, where)
    columns = "{" + ", ".join(
        f"'c{i}': '{types.get(name, 'VARCHAR')}'"
        for i, name in enumerate(header)) + "}"
    options = ("header=true, delim=',', quote='\"', escape='\"', strict_mode=true, "
               f"null_padding=false, store_rejects={'true' if rejects else 'false'}, "
               "auto_detect=false")
    exprs = {c: f"c{header.index(c)}" for c in wanted}
    return (f"read_csv(?, columns={columns}, {options})", exprs, where, [str(path)])


def _rejects(con: Any, kind: str) -> list[tuple[int, str]]:
    if kind != "csv":
        return []
    # one per line: DuckDB lists a short line once per missing column
    rows = con.execute("SELECT line, min(error_type) FROM reject_errors GROUP BY line "
                       "ORDER BY line").fetchall()
    return [(int(line), str(kind_).lower().replace("_", " ")) for line, kind_ in rows]


def _read_csv_python(contract: DataContract) -> SourceRows:
    """Record-by-record reader for CSV files DuckDB cannot split (mixed line endings, ...).

    Slower, same result: each record that does not have the header's number of fields is
    rejected with its record number; the projected cells are typed like a SQL source's.
    """
    assert contract.source.path is not None
    path = contract.resolve(contract.source.path)
    where = str(path)
    try:
        opener: Any = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle)
            header = [h.strip() for h in next(reader, [])]
            wanted = source_columns(contract)
            _check_columns(header, wanted, where)
            index = [header.index(c) for c in wanted]
            cells: list[list[str]] = [[] for _ in wanted]
            rows: list[int] = []
            rejected: list[tuple[int, str]] = []
            for number, record in enumerate(reader, start=1):
                if not record:
                    continue  # an empty line (a record of blank fields is a row: invalid)
                if len(record) != len(header):
                    rejected.append((number + 1, "too many columns" if len(record) >
                                     len(header) else "missing columns"))
                    continue
                rows.append(number)
                for out, i in zip(cells, index, strict=True):
                    out.append(record[i])
    except UnicodeDecodeError as exc:
        raise DataError(f"is not UTF-8 text (byte {exc.start}); expected a UTF-8 CSV file.",
                        path=where) from None
    except (OSError, EOFError, csv.Error, gzip.BadGzipFile, zlib.error) as exc:
        raise DataError(f"cannot be read as CSV ({exc}).", path=where) from None
    columns = dict(zip(wanted, cells, strict=True))
    result = _typed_python(contract, columns, where)
    result.rows = np.asarray(rows, dtype=np.int64)
    result.rejected = rejected
    return result


def connect_engine() -> Any:
    """Return a new in-memory DuckDB connection that never writes customer data to disk.

    DuckDB's default in-memory database spills to ``./.tmp`` when a query outgrows its memory
    limit: raw ids and cell values, unencrypted, in the process's working directory. With no
    temporary directory such a query fails instead (:func:`engine_error` says what to do).
    """
    import duckdb

    return duckdb.connect(config={"temp_directory": ""})


def _out_of_memory(exc: BaseException) -> bool:
    import duckdb

    return isinstance(exc, duckdb.OutOfMemoryException)


def _reader_types(contract: DataContract) -> dict[str, str]:
    """CSV columns the CSV reader may parse itself: DOUBLE or BOOLEAN, for one use only.

    DuckDB's BOOLEAN accepts exactly the words :func:`_typed` accepts (true/false, t/f, yes/no,
    y/n, 1/0 in any case; an empty cell is NULL) and fails on anything else, a padded word
    included, so the text read decides those files (tests/unit/test_sources_fast.py).
    """
    uses: dict[str, set[str]] = {}
    for f in contract.features:
        uses.setdefault(f.source_column, set()).add(f.type)
    uses.setdefault(contract.subject_id, set()).add("id")
    if contract.consent.column:
        uses.setdefault(contract.consent.column, set()).add("boolean")
    kinds = {"numeric": "DOUBLE", "boolean": "BOOLEAN"}
    return {column: kinds[next(iter(used))] for column, used in uses.items()
            if len(used) == 1 and next(iter(used)) in kinds}


def _customer_query(contract: DataContract, con: Any, *, fast: bool
                    ) -> tuple[str, list[Any], str]:
    """Return (SQL, parameters, where) reading a customer-level file's projected columns.

    ``fast`` (CSV only): numeric and boolean columns are parsed by the CSV reader and malformed
    lines fail the read instead of being kept aside, which takes about half the time on a valid
    file; the caller reads again with ``fast=False`` when it fails.
    """
    text = contract.source.kind == "csv"
    types = _reader_types(contract) if fast and text else {}
    relation, exprs, where, params = _file_relation(contract, con, types=types,
                                                    rejects=not fast)
    parts = [f"CAST({exprs[contract.subject_id]} AS VARCHAR) AS id"]  # stripped when hashed
    extra: list[Any] = []

    def value(column: str, f: FeatureContract) -> str:
        if types.get(column) == "DOUBLE":
            return exprs[column]
        if types.get(column) == "BOOLEAN":  # (a CAST here would be pushed into the reader)
            return (f"CASE WHEN {exprs[column]} THEN 1.0::DOUBLE WHEN NOT {exprs[column]} "
                    "THEN 0.0::DOUBLE END")
        return _typed(exprs[column], f, extra, text=text)

    for j, f in enumerate(contract.features):
        parts.append(f"{value(f.source_column, f)} AS v{j}")
    if contract.consent.column:
        flag = FeatureContract(name="consent", type="boolean")
        parts.append(f"{value(contract.consent.column, flag)} AS consent")
    if contract.source.kind == "parquet":
        parts.append("file_row_number + 1 AS rn")
    # list parameters of vocabularies come before the file path in the statement text
    return f"SELECT {', '.join(parts)} FROM {relation}", [*extra, *params], where


def _read_file_customers(contract: DataContract) -> SourceRows:
    """Read a customer-level CSV or Parquet file (ids as read, in ``id_column``).

    A CSV is first read the fast way (:func:`_customer_query`); a file that fails it (a cell
    that is not a number, a line that does not split) is read again with every cell as text and
    malformed lines kept aside, and a file DuckDB cannot split at all by the record reader.
    """
    import duckdb

    where = contract.source_location
    table: Any = None
    rejected: list[tuple[int, str]] = []
    # One connection per read, closed after it: a DuckDB database must not outlive the read in
    # a process that may fork (a child that drops an inherited one hangs or crashes).
    if contract.source.kind == "csv":
        fast = connect_engine()
        try:
            sql, params, where = _customer_query(contract, fast, fast=True)
            table = fast.sql(sql, params=params).to_arrow_table()
        except duckdb.Error as exc:
            if _out_of_memory(exc):
                raise DataError(f"cannot be read ({engine_error(exc)}).", path=where) from None
            table = None  # read again below, every cell as text
        finally:
            fast.close()
    if table is None:
        con = connect_engine()  # its own: the reject_errors table is per connection
        try:
            sql, params, where = _customer_query(contract, con, fast=False)
            try:
                table = con.sql(sql, params=params).to_arrow_table()
            except duckdb.Error as exc:
                if contract.source.kind != "csv" or _out_of_memory(exc):
                    raise
                return _read_csv_python(contract)
            rejected = _rejects(con, contract.source.kind)
        except duckdb.Error as exc:
            raise DataError(f"cannot be read ({engine_error(exc)}).", path=where) from None
        finally:
            con.close()
    values: dict[str, NDArray[Any]] = {}
    for j, f in enumerate(contract.features):
        column = table.column(f"v{j}")
        values[f.name] = _ints(column.fill_null(-1).to_numpy()) if f.type == "categorical" \
            else _float(column.to_numpy())
    n = table.num_rows
    if "rn" in table.column_names:
        rows = np.asarray(table.column("rn").to_numpy(), dtype=np.int64)
    else:  # CSV: DuckDB keeps file order (preserve_insertion_order); skip rejected lines
        rows = np.arange(1, n + len(rejected) + 1, dtype=np.int64)
        if rejected:
            rows = np.setdiff1d(rows, np.asarray([line - 1 for line, _ in rejected]))
    if rows.size != n:  # lines and records disagree (a quoted line break near a bad line)
        return _read_csv_python(contract)
    return SourceRows(
        location=where, ids=None, id_column=table.column("id"),
        rows=rows, values=values,
        consent=_float(table.column("consent").to_numpy()) if contract.consent.column
        else None,
        rejected=rejected, row_label="row")


_NUMERIC = ("TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UTINYINT", "USMALLINT",
            "UINTEGER", "UBIGINT", "FLOAT", "DOUBLE", "DECIMAL")


def _typed_exprs(contract: DataContract, con: Any, kind: str, exprs: dict[str, str],
                 params: list[Any]) -> dict[str, str]:
    """Typed SQL per transaction column; Parquet columns already typed skip the text round trip."""
    t = contract.transactions
    assert t is not None
    types: dict[str, str] = {}
    if kind == "parquet":
        types = {str(r[0]): str(r[1]) for r in con.execute(
            "DESCRIBE SELECT * FROM read_parquet(?)", params).fetchall()}

    def text(col: str) -> str:
        return f"trim({exprs[col]})" if kind == "csv" or types.get(col) == "VARCHAR" \
            else f"trim(CAST({exprs[col]} AS VARCHAR))"

    ts_type = types.get(t.timestamp, "")
    amount_type = types.get(t.amount, "")
    # Text timestamps go through TIMESTAMPTZ on a UTC session: an offset (-05:00) is applied,
    # a naive time is taken as UTC, as the SQL reader and the as_of date do.
    # Grouped on the space-trimmed id (fast); the group keys are then normalised in Python
    # like every other reader's ids, and two groups that meet there are flagged as duplicates.
    out = {"id": text(contract.subject_id),
           "ts": f"CAST({exprs[t.timestamp]} AS TIMESTAMP)"
           if ts_type in ("TIMESTAMP", "DATE", "TIMESTAMP_NS", "TIMESTAMP_MS", "TIMESTAMP_S",
                          "TIMESTAMP WITH TIME ZONE")
           else f"CAST(TRY_CAST({text(t.timestamp)} AS TIMESTAMPTZ) AS TIMESTAMP)",
           "amount": f"CAST({exprs[t.amount]} AS DOUBLE)"
           if amount_type.split("(")[0] in _NUMERIC
           else f"TRY_CAST({text(t.amount)} AS DOUBLE)"}
    if t.order_id:
        out["order_id"] = text(t.order_id)
    if t.category:
        out["category"] = text(t.category)
    return out


def _read_file_transactions(contract: DataContract) -> SourceRows:
    """One pass over a transaction file: per-customer aggregates and validity counts."""
    import duckdb

    t = contract.transactions
    assert t is not None
    where = contract.source_location
    con = connect_engine()
    try:
        con.execute("SET TimeZone = 'UTC'")
        relation, exprs, where, params = _file_relation(contract, con)
        kind = contract.source.kind
        typed = _typed_exprs(contract, con, kind, exprs, params)
        as_of = f"TIMESTAMP '{t.as_of_utc.replace(tzinfo=None).isoformat()}'"
        base = ", ".join(f"{sql} AS {name}" for name, sql in typed.items())
        flags = ("(id IS NULL OR id = '') AS bad_id, ts IS NULL AS bad_ts, "
                 "(amount IS NULL OR NOT isfinite(amount)) AS bad_amount")
        ok = f"NOT (bad_id OR bad_ts OR bad_amount) AND ts <= {as_of}"
        freq = "count(DISTINCT order_id) FILTER (WHERE ok)" if t.order_id \
            else "count(*) FILTER (WHERE ok)"
        extra: list[Any] = []
        parts = []
        for j, f in enumerate(contract.features):
            if f.aggregate == "recency_days":
                expr = f"(epoch({as_of}) - epoch(max(ts) FILTER (WHERE ok))) / 86400.0"
            elif f.aggregate == "tenure_days":
                expr = f"(epoch({as_of}) - epoch(min(ts) FILTER (WHERE ok))) / 86400.0"
            elif f.aggregate == "frequency":
                expr = f"CAST({freq} AS DOUBLE)"
            elif f.aggregate == "monetary":
                expr = "sum(amount) FILTER (WHERE ok)"
            elif f.aggregate == "average_basket":
                expr = f"sum(amount) FILTER (WHERE ok) / {freq}"
            else:
                extra.append(f.category)
                expr = ("coalesce(sum(amount) FILTER (WHERE ok AND category = ?) "
                        "/ nullif(sum(amount) FILTER (WHERE ok), 0), 0.0)")
            parts.append(f"CAST({expr} AS DOUBLE) AS v{j}")
        sql = (f"CREATE TEMP TABLE per AS SELECT id, count(*) AS n, "
               f"count(*) FILTER (WHERE bad_id) AS n_bad_id, "
               f"count(*) FILTER (WHERE bad_ts) AS n_bad_ts, "
               f"count(*) FILTER (WHERE bad_amount) AS n_bad_amount, "
               f"count(*) FILTER (WHERE bad_id OR bad_ts OR bad_amount) AS n_bad, "
               f"count(*) FILTER (WHERE NOT (bad_id OR bad_ts OR bad_amount) "
               f"AND ts > {as_of}) AS n_late, count(*) FILTER (WHERE ok) AS n_ok, "
               f"{', '.join(parts)} FROM (SELECT *, {ok} AS ok FROM "
               f"(SELECT *, {flags} FROM (SELECT {base} FROM {relation}))) GROUP BY id")
        con.execute(sql, [*extra, *params])  # the SELECT list comes before the FROM
        result = _fetch(con, "SELECT id, row_number() OVER (ORDER BY id) AS rn, "
                        + ", ".join(f"v{j}" for j in range(len(contract.features)))
                        + " FROM per WHERE n_ok > 0 ORDER BY id", [], where)
        totals = con.execute(
            "SELECT sum(n), sum(n_bad_id), sum(n_bad_ts), sum(n_bad_amount), sum(n_bad), "
            "sum(n_late) FROM per").fetchone()
        assert totals is not None
        total, bad_id, bad_ts, bad_amount, bad, late = totals
        names = {"subject_id": bad_id, t.timestamp: bad_ts, t.amount: bad_amount}
        bad_columns = {k: int(v) for k, v in names.items() if v}
        first_bad = None
        if bad:  # rare: locate the first invalid line with a second (slower) query
            first_bad = _first_invalid_transaction(con, typed, relation, params)
        counts = {"read": int(total or 0), "invalid": int(bad or 0),
                  "invalid_by_column": bad_columns, "after_as_of": int(late or 0),
                  "first_invalid_row": first_bad}
        rejected = _rejects(con, kind)
    except duckdb.Error as exc:
        raise DataError(f"cannot be aggregated ({engine_error(exc)}).",
                        path=where) from None
    finally:
        con.close()
    values = {f.name: _float(result[f"v{j}"]) for j, f in enumerate(contract.features)}
    return SourceRows(location=where, ids=_normalised_ids(result["id"]),
                      rows=np.asarray(result["rn"], dtype=np.int64), values=values,
                      rejected=rejected, transactions=counts, row_label="customer")


def _first_invalid_transaction(con: Any, typed: dict[str, str], relation: str,
                               params: list[Any]) -> int | None:
    """1-based data row of the first invalid transaction (only run when there is one)."""
    base = ", ".join(f"{sql} AS {name}" for name, sql in typed.items())
    row = con.execute(
        f"SELECT min(line) FROM (SELECT {base}, row_number() OVER () AS line FROM {relation}) "
        "WHERE id IS NULL OR id = '' OR ts IS NULL OR amount IS NULL OR NOT isfinite(amount)",
        params).fetchone()
    return None if row is None or row[0] is None else int(row[0])


# -- SQL sources (SQLAlchemy) ----------------------------------------------------------------


def open_engine(contract: DataContract) -> tuple[Any, str]:
    """Return a SQLAlchemy engine on the source (SQLite files read-only) and its name."""
    from sqlalchemy import create_engine
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    url = contract.resolve_url(str(contract.source.url))
    where = contract.source_location
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        file = Path(url[len("sqlite:///"):])
        if not file.is_file():
            raise DataError("database file not found (check source.url in the contract).",
                            path=where)
        url = f"sqlite:///file:{file}?mode=ro&uri=true"
    try:
        return create_engine(url), where
    except (ArgumentError, NoSuchModuleError, ImportError) as exc:
        raise DataError(f"is not a usable SQLAlchemy URL ({exc}).", path=where) from None


def _sql_table(contract: DataContract, engine: Any, where: str) -> Any:
    from sqlalchemy import MetaData, Table
    from sqlalchemy.exc import NoSuchTableError, SQLAlchemyError

    try:
        table = Table(str(contract.source.table), MetaData(), autoload_with=engine)
    except NoSuchTableError:
        raise DataError("the table does not exist.", path=where) from None
    except SQLAlchemyError as exc:
        raise DataError(f"cannot be opened ({engine_error(exc)}).", path=where) from None
    header = [c.name for c in table.columns]
    _check_columns(header, source_columns(contract), where)
    return table


def _py_float(values: list[Any]) -> NDArray[np.float64]:
    try:
        out = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        out = np.empty(len(values), dtype=np.float64)
        for i, v in enumerate(values):
            try:
                out[i] = float(v.strip() if isinstance(v, str) else v)
            except (TypeError, ValueError, AttributeError):
                out[i] = np.nan
    return np.where(np.isfinite(out), out, np.nan)


def _py_bool(values: list[Any]) -> NDArray[np.float64]:
    table = {**dict.fromkeys(_TRUE, 1.0), **dict.fromkeys(_FALSE, 0.0)}
    out = np.full(len(values), np.nan)
    for i, v in enumerate(values):
        if isinstance(v, bool | int) and v in (0, 1):
            out[i] = float(v)
        elif isinstance(v, str):
            out[i] = table.get(v.strip().lower(), np.nan)
    return out


def _py_category(values: list[Any], vocabulary: list[str]) -> NDArray[np.int64]:
    index = {v: i for i, v in enumerate(vocabulary)}
    return np.fromiter((index.get(v.strip(), -1) if isinstance(v, str) else -1 for v in values),
                       dtype=np.int64, count=len(values))


def _py_ids(values: list[Any]) -> NDArray[Any]:
    return np.asarray([normalise_id(v) for v in values], dtype=object)


def _read_sql_customers(contract: DataContract) -> SourceRows:
    from sqlalchemy import select, type_coerce
    from sqlalchemy.exc import SQLAlchemyError
    from sqlalchemy.types import NullType

    engine, where = open_engine(contract)
    try:
        table = _sql_table(contract, engine, where)
        wanted = source_columns(contract)
        # Raw driver values (no SQLAlchemy result processing): a declared BOOLEAN holding the
        # text 'false' must not become True, a NUMERIC holding text must not raise.
        query = select(*[type_coerce(table.c[c], NullType()) for c in wanted]).order_by(
            table.c[contract.subject_id])
        with engine.connect() as conn:
            rows = conn.execute(query).fetchall()
    except SQLAlchemyError as exc:
        raise DataError(f"cannot be read ({engine_error(exc)}).", path=where) from None
    finally:
        engine.dispose()
    columns = dict(zip(wanted, (list(c) for c in zip(*rows, strict=True)), strict=True)) \
        if rows else {c: [] for c in wanted}
    result = _typed_python(contract, columns, where)
    result.row_label = f"row (ordered by {contract.subject_id})"
    return result


def _typed_python(contract: DataContract, columns: dict[str, list[Any]],
                  where: str) -> SourceRows:
    """Type projected cells in Python (SQL results, irregular CSV files)."""
    n = len(columns[contract.subject_id])
    values: dict[str, NDArray[Any]] = {}
    for f in contract.features:
        raw = columns[f.source_column]
        if f.type == "numeric":
            values[f.name] = _py_float(raw)
        elif f.type == "boolean":
            values[f.name] = _py_bool(raw)
        else:
            values[f.name] = _py_category(raw, list(f.vocabulary or []))
    consent = _py_bool(columns[contract.consent.column]) if contract.consent.column else None
    return SourceRows(location=where, ids=_py_ids(columns[contract.subject_id]),
                      rows=np.arange(1, n + 1, dtype=np.int64), values=values,
                      consent=consent)


def _read_sql_transactions(contract: DataContract) -> SourceRows:
    from sqlalchemy import Float, and_, case, cast, func, literal, or_, select
    from sqlalchemy.exc import SQLAlchemyError

    t = contract.transactions
    assert t is not None
    engine, where = open_engine(contract)
    try:
        table = _sql_table(contract, engine, where)
        ident, ts, amount = (table.c[contract.subject_id], table.c[t.timestamp],
                             table.c[t.amount])
        sqlite = engine.dialect.name == "sqlite"
        as_of = t.as_of_utc.replace(tzinfo=None)
        stamp = func.datetime(ts) if sqlite else ts  # SQLite keeps timestamps as text
        bad = [ident.is_(None), stamp.is_(None), amount.is_(None)]
        if sqlite:
            bad.append(func.typeof(amount).notin_(["integer", "real"]))
        bad_any = or_(*bad)
        as_of_value: Any = as_of.isoformat(sep=" ") if sqlite else as_of
        late = and_(~bad_any, stamp > literal(as_of_value))
        ok = and_(~bad_any, stamp <= literal(as_of_value))
        freq = func.count(func.distinct(table.c[t.order_id])) if t.order_id else func.count()
        parts = [ident.label("id"), func.max(stamp).label("last"),
                 func.min(stamp).label("first")]
        for j, f in enumerate(contract.features):
            if f.aggregate == "frequency":
                expr: Any = cast(freq, Float)
            elif f.aggregate == "monetary":
                expr = cast(func.sum(amount), Float)
            elif f.aggregate == "average_basket":
                expr = cast(func.sum(amount), Float) / cast(freq, Float)
            elif f.aggregate == "category_share":
                in_cat = func.sum(case((table.c[str(t.category)] == f.category, amount),
                                       else_=0))
                expr = cast(in_cat, Float) / func.nullif(cast(func.sum(amount), Float), 0)
            else:
                continue  # recency and tenure: computed from first/last below
            parts.append(expr.label(f"v{j}"))
        query = select(*parts).where(ok).group_by(ident).order_by(ident)
        counts_query = select(
            func.count(), func.sum(case((bad_any, 1), else_=0)),
            func.sum(case((late, 1), else_=0)))
        with engine.connect() as conn:
            rows = conn.execute(query).fetchall()
            total, invalid, after = conn.execute(counts_query.select_from(table)).one()
    except SQLAlchemyError as exc:
        raise DataError(f"cannot be aggregated ({engine_error(exc)}).",
                        path=where) from None
    finally:
        engine.dispose()
    cols: list[Any] = list(zip(*rows, strict=True)) if rows else [() for _ in parts]
    names = [p.name for p in parts]
    by_name = dict(zip(names, cols, strict=True))
    as_of64 = np.datetime64(as_of, "us")
    values: dict[str, NDArray[Any]] = {}
    for j, f in enumerate(contract.features):
        if f.aggregate in ("recency_days", "tenure_days"):
            key = "last" if f.aggregate == "recency_days" else "first"
            stamps = np.asarray([str(v) for v in by_name[key]], dtype="datetime64[us]")
            days: NDArray[Any] = (as_of64 - stamps) / np.timedelta64(1, "D")  # type: ignore[operator]
            values[f.name] = np.asarray(days, dtype=np.float64)
        else:
            values[f.name] = _py_float(list(by_name[f"v{j}"]))
            if f.aggregate == "category_share":
                values[f.name] = np.nan_to_num(values[f.name], nan=0.0)
    return SourceRows(location=where, ids=_py_ids(list(by_name["id"])),
                      rows=np.arange(1, len(rows) + 1, dtype=np.int64), values=values,
                      transactions={"read": int(total or 0), "invalid": int(invalid or 0),
                                    "invalid_by_column": {}, "after_as_of": int(after or 0),
                                    "first_invalid_row": None},
                      row_label="customer")


def read_source(contract: DataContract) -> SourceRows:
    """Read the contract's projection of its source.

    Parameters
    ----------
    contract : DataContract

    Returns
    -------
    SourceRows
        Typed, unvalidated customer rows (see :mod:`client.gate` for validation).

    Raises
    ------
    DataError
        The source cannot be read, or lacks a column the contract names (file/URL and column
        named; no cell value is ever quoted).
    """
    transaction = contract.source.level == "transaction"
    if contract.source.kind == "sql":
        return _read_sql_transactions(contract) if transaction else \
            _read_sql_customers(contract)
    return _read_file_transactions(contract) if transaction else \
        _read_file_customers(contract)
