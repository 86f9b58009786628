"""Properties of the gate's boundary: whatever a site hands it fails only with project errors.

A contract document, a contract file's bytes, a CSV file (plain or gzip), a Parquet file or a
SQLite table: the gate either returns :class:`GatedData` or raises a ``FedsegError``
(``ConfigError`` / ``DataError``), never another exception; in quarantine mode every row it
read is accounted for; no error message quotes a cell. Violations found while writing these
properties (and since fixed) are pinned at the end as regression tests, each a minimal
reproduction; the property strategies leave out exactly those inputs, and say so.
"""

from __future__ import annotations

import copy
import csv
import gzip
import io
import sqlite3
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from client.contract import DataContract, load_contract, parse_contract
from client.gate import GatedData, PrivacyGate
from client.site_key import generate_key_file
from common.errors import ConfigError, DataError, FedsegError
from tests.gate_sites import HEADER, ROWS, contract_doc, write_csv, write_sqlite

WHERE = "contract-3f9c1d.yaml"
MODES = ("error", "quarantine")
EXCLUDED = {"invalid", "erased", "withdrawn", "no_consent"}
FAST = settings(max_examples=15, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# -- contract documents -----------------------------------------------------------------------

SCALARS = (st.none() | st.booleans() | st.integers() | st.floats()
           | st.text(max_size=10))
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=16)
KNOWN_KEYS = st.sampled_from([*sorted(contract_doc()), "transactions", "on_invalid"])
TOP_LEVEL = st.dictionaries(KNOWN_KEYS | st.text(max_size=8), JSON, max_size=8)
UNKNOWN_KEY = st.from_regex(r"[a-z]{2,6}_zq", fullmatch=True)


def _tx_doc() -> dict[str, Any]:
    """A valid transaction-level contract (as tests/unit/test_gate.py's ``_tx_contract``)."""
    return contract_doc(
        source={"path": "tx.csv", "level": "transaction"}, direct_identifiers=["email"],
        consent={"mode": "ledger"},
        transactions={"timestamp": "ts", "amount": "amount", "order_id": "order_id",
                      "category": "category", "as_of": "2026-01-31"},
        features=[{"name": "recency", "aggregate": "recency_days"},
                  {"name": "share", "aggregate": "category_share", "category": "food"}])


BASE_DOCS = st.sampled_from([contract_doc, _tx_doc]).map(lambda make: make())


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every key path inside a nested dict/list document (the root excluded)."""
    items = node.items() if isinstance(node, dict) else \
        enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        yield (*prefix, key)
        yield from _paths(child, (*prefix, key))


def _at(doc: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        doc = doc[key]
    return doc


def _other_type(old: Any) -> Callable[[Any], bool]:
    return lambda value: type(value) is not type(old)


@st.composite
def mutated_contracts(draw: st.DrawFn) -> dict[str, Any]:
    """A valid contract with 1-3 mutations: drop a key, retype a value, add an unknown key."""
    doc = copy.deepcopy(draw(BASE_DOCS))
    for _ in range(draw(st.integers(1, 3))):
        paths = list(_paths(doc))
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent, key = _at(doc, path[:-1]), path[-1]
        op = draw(st.sampled_from(["drop", "retype", "add"]))
        if op == "drop":
            del parent[key]
        elif op == "retype":
            parent[key] = draw(JSON.filter(_other_type(parent[key])))
        else:
            target = parent[key] if isinstance(parent[key], dict) else parent
            if isinstance(target, dict):
                target[draw(UNKNOWN_KEY)] = draw(JSON)
    return doc


def _parse(data: Any) -> DataContract | ConfigError:
    """``parse_contract`` result, or its ConfigError (any other exception propagates)."""
    try:
        contract = parse_contract(data, where=WHERE)
    except ConfigError as exc:
        assert WHERE in str(exc)
        return exc
    assert isinstance(contract, DataContract)
    return contract


@settings(max_examples=100, deadline=None)
@given(JSON | TOP_LEVEL)
def test_any_document_parses_or_raises_config_error_naming_the_file(data: Any) -> None:
    _parse(data)


@settings(max_examples=120, deadline=None)
@given(mutated_contracts())
def test_mutated_contract_parses_or_raises_config_error_naming_the_file(doc: Any) -> None:
    _parse(doc)


@settings(max_examples=60, deadline=None)
@given(BASE_DOCS, st.data())
def test_unknown_key_is_named_with_its_key_path(doc: dict[str, Any], data: st.DataObject) -> None:
    dicts = [()] + [p for p in _paths(doc) if isinstance(_at(doc, p), dict)]
    path = data.draw(st.sampled_from(dicts))
    name = data.draw(UNKNOWN_KEY)
    _at(doc, path)[name] = data.draw(JSON)
    result = _parse(doc)
    assert isinstance(result, ConfigError)
    assert f"{name}: unknown key" in str(result)


def test_valid_base_documents_parse() -> None:
    # the mutation properties start from valid documents (else they prove little)
    assert isinstance(_parse(contract_doc()), DataContract)
    assert isinstance(_parse(_tx_doc()), DataContract)


# -- contract files ---------------------------------------------------------------------------

YAML_PIECES = st.sampled_from([
    b"!!python/object/apply:os.system ['true']", b"&a [*a, *a]", b"? [1, 2]\n: x\n",
    b"{1: 2, null: 3}", b"contract: !!binary AAAA\n", b"site: !!set {a}\n", b"--- 1\n--- 2\n",
    b"\x00", b"\xff\xfe", b"\xef\xbb\xbf", b"as_of: 2026-01-31\n", b"a: *missing\n",
    b"\t- x\n", b"'unclosed", b"features: [\n",
])


@st.composite
def contract_bytes(draw: st.DrawFn) -> bytes:
    """Arbitrary bytes, arbitrary text, or a (mutated) contract's YAML with bytes spliced in."""
    kind = draw(st.sampled_from(["bytes", "text", "yaml"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "text":
        return draw(st.text(max_size=200)).encode("utf-8")
    doc = draw(mutated_contracts() | BASE_DOCS)
    text = yaml.safe_dump(doc, sort_keys=False).encode("utf-8")
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(YAML_PIECES | st.binary(max_size=4)) + text[at:]
    return text


@settings(max_examples=100, deadline=None)
@given(contract_bytes())
def test_any_contract_file_loads_or_raises_config_error(content: bytes) -> None:
    # also tested below: deep nesting (RecursionError), impossible dates (ValueError)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / WHERE
        path.write_bytes(content)
        try:
            contract = load_contract(path)
        except ConfigError as exc:
            assert WHERE in str(exc)
        else:
            assert isinstance(contract, DataContract)


# -- sources ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Site:
    """A key and a store shared by every example (both outside the per-example directory)."""

    root: Path
    key: Path
    store: Path

    def open(self, directory: Path, source: dict[str, Any], on_invalid: str) -> PrivacyGate:
        site = {"name": "north", "key_file": str(self.key), "store": f"sqlite:///{self.store}"}
        path = directory / f"contract-{on_invalid}.yaml"
        doc = contract_doc(site=site, source=source, on_invalid=on_invalid)
        path.write_text(yaml.safe_dump(doc, sort_keys=False), "utf-8")
        return PrivacyGate.open(path)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    root = tmp_path_factory.mktemp("gate-properties")
    key = root / "site.key"
    generate_key_file(key)
    return Site(root=root, key=key, store=root / "store.sqlite")


def _load(site: Site, directory: Path, source: dict[str, Any],
          on_invalid: str) -> GatedData | FedsegError:
    """The gate's data, or the project error it raised (any other exception propagates)."""
    try:
        gate = site.open(directory, source, on_invalid)
    except FedsegError as exc:
        return exc
    try:
        data = gate.load()
    except FedsegError as exc:
        return exc
    finally:
        gate.close()
    _check_accounting(data, on_invalid)
    return data


def _check_accounting(data: GatedData, on_invalid: str) -> None:
    """Every row read is used or excluded for one counted reason; shapes agree."""
    report = data.report
    assert set(report.excluded) == EXCLUDED
    assert all(count >= 0 for count in report.excluded.values())
    assert report.used + sum(report.excluded.values()) == report.rows_read
    assert report.used == len(data.pseudonyms) == data.site.raw.shape[0]
    if on_invalid == "error":
        # error mode never quarantines: a returned load had nothing invalid
        assert report.excluded["invalid"] == 0 and report.invalid_by_reason == {}
    else:
        assert bool(report.excluded["invalid"]) <= bool(report.invalid_by_reason)


def _both_modes(site: Site, directory: Path, source: dict[str, Any]) -> list[Any]:
    results = [_load(site, directory, source, mode) for mode in MODES]
    for mode, result in zip(MODES, results, strict=True):
        event(f"{mode}: {type(result).__name__}")
    return results


# CSV-ish text: header permutations, awkward cells, ragged rows, mixed line ends, bad bytes.
CELLS = st.sampled_from(["A1", "A2", "", " ", "120.5", " 12 ", "5000", "-3", "1e400", "nan",
                         "web", "store", "fax", "yes", "no", "TRUE", "false", "maybe"]) \
    | st.text(alphabet=st.sampled_from(list('ab1.,"\n\r \t;\\\x00é')), max_size=6)
LINE_ENDS = st.sampled_from(["\n", "\r\n", "\r"])


@st.composite
def headers(draw: st.DrawFn) -> list[str]:
    """HEADER permuted, sometimes with a column dropped, duplicated or added."""
    header = list(draw(st.permutations(HEADER)))
    edit = draw(st.sampled_from(["none", "none", "none", "drop", "duplicate", "extra"]))
    column = draw(st.sampled_from(header))
    if edit == "drop":
        header.remove(column)
    elif edit == "duplicate":
        header.insert(draw(st.integers(0, len(header))), column)
    elif edit == "extra":
        header.insert(draw(st.integers(0, len(header))), "notes")
    return header


@st.composite
def csv_bytes(draw: st.DrawFn) -> bytes:
    header = draw(headers())
    n = len(header)
    width = st.sampled_from([n, n, n, n, n - 1, n + 1, 1])
    rows = draw(st.lists(width.flatmap(lambda w: st.lists(CELLS, min_size=w, max_size=w)),
                         max_size=8))
    records = [header, *rows]
    if draw(st.booleans()):
        out = io.StringIO()
        csv.writer(out, lineterminator=draw(LINE_ENDS)).writerows(records)
        text = out.getvalue()
    else:  # no quoting at all: commas, quotes and newlines in cells break the records
        text = "".join(",".join(r) + draw(LINE_ENDS) for r in records)
    lines = text.split("\n")
    for _ in range(draw(st.integers(0, 2))):
        lines.insert(draw(st.integers(1, len(lines))), "")
    data = "\n".join(lines).encode("utf-8")
    if draw(st.booleans()):
        data = b"\xef\xbb\xbf" + data
    for _ in range(draw(st.integers(0, 2))):
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.sampled_from([b"\xff", b"\xc3", b"\x80", b"\xe2\x82"])) \
            + data[at:]
    return data


@pytest.mark.parametrize("suffix", ["csv", "csv.gz"])
@settings(FAST, suppress_health_check=list(HealthCheck))
@given(content=csv_bytes())
def test_any_csv_text_loads_or_raises_a_project_error(site: Site, suffix: str,
                                                      content: bytes) -> None:
    with tempfile.TemporaryDirectory(dir=site.root) as tmp:
        directory = Path(tmp)
        # gzip.compress of any text is a valid stream; corrupt streams: a test below
        data = gzip.compress(content) if suffix == "csv.gz" else content
        (directory / f"customers.{suffix}").write_bytes(data)
        _both_modes(site, directory, {"path": f"customers.{suffix}"})


ID_CELLS = st.from_regex(r"[A-Z][0-9]{1,2}", fullmatch=True)


@st.composite
def regular_tables(draw: st.DrawFn) -> tuple[list[list[str]], int]:
    """Rows in HEADER's columns, some with a wrong number of fields; the malformed count."""
    rows = draw(st.lists(st.tuples(ID_CELLS, st.lists(CELLS, min_size=7, max_size=7),
                                   st.sampled_from([0, 0, 0, 1, -1])), min_size=1, max_size=8))
    table = []
    for ident, cells, extra in rows:
        row = [ident, *cells]
        table.append([*row, "x"] if extra > 0 else row[:-1] if extra < 0 else row)
    return table, sum(1 for _, _, extra in rows if extra)


@settings(FAST, suppress_health_check=list(HealthCheck))
@given(regular_tables())
def test_quarantine_accounts_for_every_record_of_a_well_quoted_file(
        site: Site, table: tuple[list[list[str]], int]) -> None:
    # ids are never blank: an all-blank record is dropped by one reader only (xfail below)
    rows, malformed = table
    with tempfile.TemporaryDirectory(dir=site.root) as tmp:
        directory = Path(tmp)
        write_csv(directory / "customers.csv", rows)
        data = _load(site, directory, {"path": "customers.csv"}, "quarantine")
    assert isinstance(data, GatedData), data
    assert data.report.invalid_by_reason.get("malformed row", 0) == malformed
    assert data.report.rows_read == len(rows)  # malformed lines are rows read, then excluded


PARQUET_TYPES = st.sampled_from(["VARCHAR", "DOUBLE", "BIGINT", "BOOLEAN", "BLOB", "DATE",
                                 "VARCHAR[]", "STRUCT(a INTEGER)"])


@pytest.mark.parametrize("kind", ["bytes", "typed"])
@settings(FAST, max_examples=12, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_any_parquet_file_loads_or_raises_a_project_error(site: Site, kind: str,
                                                          data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory(dir=site.root) as tmp:
        directory = Path(tmp)
        path = directory / "customers.parquet"
        if kind == "bytes":
            body = data.draw(st.binary(max_size=300))
            path.write_bytes(data.draw(st.sampled_from([b"", b"PAR1"])) + body
                             + data.draw(st.sampled_from([b"", b"PAR1"])))
        else:
            header = list(dict.fromkeys(data.draw(headers())))
            types = [data.draw(PARQUET_TYPES) for _ in header]
            rows = data.draw(st.lists(st.lists(CELLS, min_size=len(header),
                                               max_size=len(header)), max_size=6))
            con = duckdb.connect()
            try:
                con.execute("CREATE TABLE t (" + ", ".join(f"c{i} VARCHAR"
                                                           for i in range(len(header))) + ")")
                if rows:
                    con.executemany(f"INSERT INTO t VALUES ({', '.join('?' * len(header))})",
                                    rows)
                select = ", ".join(f'TRY_CAST(c{i} AS {t}) AS "{h}"'
                                   for i, (h, t) in enumerate(zip(header, types, strict=True)))
                con.execute(f"COPY (SELECT {select} FROM t) TO '{path}' (FORMAT parquet)")
            finally:
                con.close()
        _both_modes(site, directory, {"path": "customers.parquet"})


SQL_VALUES = (st.none() | st.text(max_size=6) | st.integers(-(2**63), 2**63 - 1)
              | st.floats() | st.binary(max_size=4)
              | st.sampled_from(["A1", "120.5", "web", "store", "yes", "no", "true", "false"]))
# SQLAlchemy post-processes NUMERIC/DECIMAL, DATE/DATETIME/TIME, JSON and BOOLEAN columns on
# SQLite declared types that once raised or changed values: tests below; here, the others.
SQL_TYPES = st.sampled_from(["", "TEXT", "INTEGER", "REAL", "BLOB", "VARCHAR(8)"])


@settings(FAST, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_any_sqlite_table_loads_or_raises_a_project_error(site: Site,
                                                          data: st.DataObject) -> None:
    header = list(dict.fromkeys(data.draw(headers())))
    types = [data.draw(SQL_TYPES) for _ in header]
    rows = data.draw(st.lists(st.lists(SQL_VALUES, min_size=len(header), max_size=len(header)),
                              max_size=8))
    with tempfile.TemporaryDirectory(dir=site.root) as tmp:
        directory = Path(tmp)
        con = sqlite3.connect(directory / "customers.sqlite")
        try:
            con.execute("CREATE TABLE customers (" + ", ".join(
                f'"{h}" {t}' for h, t in zip(header, types, strict=True)) + ")")
            con.executemany(f"INSERT INTO customers VALUES ({', '.join('?' * len(header))})",
                            rows)
            con.commit()
        finally:
            con.close()
        _both_modes(site, directory, {"url": f"sqlite:///{directory / 'customers.sqlite'}",
                                      "table": "customers"})


# -- no cell value in a message ----------------------------------------------------------------

TOKEN = st.from_regex(r"ZQ[0-9a-f]{12}", fullmatch=True)
NUMBERS = st.floats(min_value=0, max_value=1e6, allow_nan=False).map(repr)
GOOD_ROW = st.tuples(NUMBERS, NUMBERS, st.sampled_from(["web", "store"]),
                     st.sampled_from(["yes", "no"]), st.sampled_from(["true", "false"]))


def _write_source(directory: Path, kind: str, rows: list[list[str]]) -> dict[str, Any]:
    if kind == "sqlite":
        write_sqlite(directory / "c.sqlite", rows)
        return {"url": f"sqlite:///{directory / 'c.sqlite'}", "table": "customers"}
    csv_path = write_csv(directory / "c.csv", rows)
    if kind == "csv.gz":
        (directory / "c.csv.gz").write_bytes(gzip.compress(csv_path.read_bytes()))
        return {"path": "c.csv.gz"}
    if kind == "parquet":
        duckdb.connect().execute(
            "COPY (SELECT * FROM read_csv(?, all_varchar=true)) TO ? (FORMAT parquet)",
            [str(csv_path), str(directory / "c.parquet")])
        return {"path": "c.parquet"}
    return {"path": "c.csv"}


@pytest.mark.parametrize("kind", ["csv", "csv.gz", "parquet", "sqlite"])
@settings(FAST, max_examples=6, suppress_health_check=list(HealthCheck))
@given(rows=st.lists(GOOD_ROW, min_size=1, max_size=6), token=TOKEN, data=st.data())
def test_error_messages_never_quote_a_bad_cell(site: Site, kind: str, rows: list[tuple],
                                               token: str, data: st.DataObject) -> None:
    table = [[f"C{i}", f"name {i}", f"c{i}@x", *row[:2], *row[2:]] for i, row in enumerate(rows)]
    at = data.draw(st.integers(0, len(table) - 1))
    column = data.draw(st.sampled_from(["spend", "visits"]))
    table[at][HEADER.index(column)] = token
    with tempfile.TemporaryDirectory(dir=site.root) as tmp:
        directory = Path(tmp)
        source = _write_source(directory, kind, table)
        error, quarantined = _both_modes(site, directory, source)
    assert isinstance(error, DataError), error
    assert token not in str(error)
    assert f"column {column!r}" in str(error) and "finite number" in str(error)
    assert isinstance(quarantined, GatedData), quarantined
    assert quarantined.report.invalid_by_reason == {f"{column}: invalid value": 1}
    assert token not in repr(quarantined.report.to_dict())


# -- known violations (minimal reproductions; remove the mark when fixed) ------------------------


def _one(site: Site, tmp_path: Path, source: dict[str, Any],
         on_invalid: str = "quarantine") -> GatedData | FedsegError:
    return _load(site, tmp_path, source, on_invalid)


def test_corrupt_gzip_raises_data_error(site: Site, tmp_path: Path) -> None:
    content = bytearray(gzip.compress(",".join(HEADER).encode() + b"\nA1,a,b,1,2,web,no,true\n"))
    content[15] ^= 0xFF
    (tmp_path / "c.csv.gz").write_bytes(bytes(content))
    assert isinstance(_one(site, tmp_path, {"path": "c.csv.gz"}), DataError)


def test_deeply_nested_contract_raises_config_error(tmp_path: Path) -> None:
    path = tmp_path / WHERE
    path.write_text("[" * 1100, "utf-8")
    with pytest.raises(ConfigError):
        load_contract(path)


def test_impossible_yaml_date_raises_config_error(tmp_path: Path) -> None:
    path = tmp_path / WHERE
    path.write_text("as_of: 2026-13-45\n", "utf-8")
    with pytest.raises(ConfigError):
        load_contract(path)


def test_malformed_line_is_in_the_excluded_counts(site: Site, tmp_path: Path) -> None:
    path = write_csv(tmp_path / "c.csv", ROWS)
    with path.open("a", encoding="utf-8") as handle:
        handle.write("A9,x,y,1,2,web,no,true,EXTRA\n")
    data = _one(site, tmp_path, {"path": "c.csv"})
    assert isinstance(data, GatedData)
    assert data.report.used + sum(data.report.excluded.values()) == len(ROWS) + 1


def test_all_blank_record_is_counted_by_the_fallback_reader(site: Site, tmp_path: Path) -> None:
    # a bare \r line end sends the file to the fallback reader
    text = ",".join(HEADER) + "\r" + "\n".join(",".join(r) for r in ROWS) + "\n,,,,,,,\n"
    (tmp_path / "c.csv").write_text(text, "utf-8")
    data = _one(site, tmp_path, {"path": "c.csv"})
    assert isinstance(data, GatedData)
    assert data.report.rows_read == len(ROWS) + 1


def test_headerless_csv_error_quotes_no_cell(site: Site, tmp_path: Path) -> None:
    rows = [r.copy() for r in ROWS]
    rows[0][2] = "ZQsecret@example.com"
    (tmp_path / "c.csv").write_text("".join(",".join(r) + "\n" for r in rows), "utf-8")
    error = _one(site, tmp_path, {"path": "c.csv"})
    assert isinstance(error, DataError)
    assert "ZQsecret" not in str(error)


@pytest.mark.parametrize("declared", ["NUMERIC", "DATE"])
def test_sqlite_declared_type_with_a_bad_cell_is_invalid(site: Site, tmp_path: Path,
                                                         declared: str) -> None:
    con = sqlite3.connect(tmp_path / "c.sqlite")
    con.execute("CREATE TABLE customers (" + ", ".join(
        f'"{h}" {declared if h == "spend" else ""}' for h in HEADER) + ")")
    con.executemany("INSERT INTO customers VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    [*ROWS, ["A5", "n", "e", "garbage", "1", "web", "no", "true"]])
    con.commit()
    con.close()
    data = _one(site, tmp_path, {"url": f"sqlite:///{tmp_path / 'c.sqlite'}",
                                 "table": "customers"})
    assert isinstance(data, GatedData)
    assert data.report.invalid_by_reason == {"spend: invalid value": 1}


def test_sqlite_boolean_column_with_text_false_is_no_consent(site: Site, tmp_path: Path) -> None:
    con = sqlite3.connect(tmp_path / "c.sqlite")
    con.execute("CREATE TABLE customers (" + ", ".join(
        f'"{h}" {"BOOLEAN" if h == "consent" else ""}' for h in HEADER) + ")")
    con.executemany("INSERT INTO customers VALUES (?, ?, ?, ?, ?, ?, ?, ?)", ROWS)
    con.commit()
    con.close()
    data = _one(site, tmp_path, {"url": f"sqlite:///{tmp_path / 'c.sqlite'}",
                                 "table": "customers"})
    assert isinstance(data, GatedData)
    assert data.report.excluded["no_consent"] == 1  # A3 declined ("false")
