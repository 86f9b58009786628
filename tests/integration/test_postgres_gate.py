"""The privacy gate over a real PostgreSQL server: source table and site store, against SQLite.

The same customers (and transactions) sit in a typed PostgreSQL table and in a SQLite file (or
a CSV read by DuckDB); one site key serves both, so pseudonyms agree. The gate must give the
same rows, the same report counts and the same consent/erasure effects through either, and
the store on PostgreSQL must hold no raw subject id in any column.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa
import yaml

from client.contract import load_contract
from client.gate import GatedData, PrivacyGate
from client.site_key import generate_key_file
from client.sources import read_source
from tests.gate_sites import HEADER, ROWS, contract_doc, write_csv, write_sqlite
from tests.postgres_server import PostgresServer
from tests.unit.test_gate import TX_HEADER, TX_ROWS, _tx_contract

pytestmark = pytest.mark.integration

# ROWS plus one row per quarantine reason the gate can meet in a typed table
EXTRA_ROWS: list[list[Any]] = [
    ["A5", "Ed", "e@x", None, "1", "web", "no", "true"],           # spend missing
    ["A6", "Fi", "f@x", "5", "1", "fax", "no", "true"],            # outside vocabulary
    ["A7", "Gu", "g@x", "5", "1", "web", "maybe", "true"],         # not a boolean
    ["A1", "Hu", "h@x", "5", "1", "web", "no", "true"],            # duplicate id
    ["A8", "Io", "i@x", "5", "1", "web", "no", None],              # consent missing
]
CUSTOMERS: list[list[Any]] = [*ROWS, *EXTRA_ROWS]
SENTINELS = ["SENTINEL-7c41e0-ann", "SENTINEL-7c41e0-bob", "SENTINEL-7c41e0-cy"]


def _number(cell: str | None) -> float | None:
    return None if cell is None else float(cell)


def _flag(cell: str | None) -> bool | None:
    return None if cell is None else cell == "true"


def _create_table(url: str, name: str, columns: dict[str, Any],
                  rows: list[dict[str, Any]]) -> None:
    """Create a typed table and insert ``rows`` through SQLAlchemy."""
    metadata = sa.MetaData()
    table = sa.Table(name, metadata, *(sa.Column(c, t) for c, t in columns.items()))
    engine = sa.create_engine(url)
    try:
        metadata.create_all(engine)
        with engine.begin() as conn:
            conn.execute(table.insert(), rows)
    finally:
        engine.dispose()


def _create_customers(url: str, rows: list[list[Any]]) -> None:
    """A typed ``customers`` table: TEXT ids/names, DOUBLE PRECISION, BOOLEAN consent."""
    _create_table(url, "customers", {
        "customer_id": sa.Text, "name": sa.Text, "email": sa.Text, "spend": sa.Double,
        "visits": sa.Double, "channel": sa.Text, "member": sa.Text, "consent": sa.Boolean},
        [{"customer_id": r[0], "name": r[1], "email": r[2], "spend": _number(r[3]),
          "visits": _number(r[4]), "channel": r[5], "member": r[6], "consent": _flag(r[7])}
         for r in rows])


@pytest.fixture(scope="module")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pg-gate-key") / "site.key"
    generate_key_file(path)
    return path


@pytest.fixture(scope="module")
def customers_url(postgres_server: PostgresServer) -> str:
    url = postgres_server.new_database("gate_customers")
    _create_customers(url, CUSTOMERS)
    return url


def _contract(directory: Path, key_file: Path, source: dict[str, Any], store: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    doc = contract_doc(site={"name": "north", "key_file": str(key_file), "store": store},
                       source=source, on_invalid="quarantine")
    path = directory / "contract.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False), "utf-8")
    return path


@pytest.fixture
def gates(postgres_server: PostgresServer, customers_url: str, key_file: Path,
          tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[dict[str, PrivacyGate]]:
    """One gate over PostgreSQL (source and store), one over SQLite (source and store)."""
    store_url = postgres_server.new_database(f"gate_store_{request.node.name[5:30].lower()}")
    write_sqlite(tmp_path / "customers.sqlite", CUSTOMERS)
    opened = {
        "postgresql": PrivacyGate.open(_contract(
            tmp_path / "pg", key_file, {"url": customers_url, "table": "customers"},
            store_url)),
        "sqlite": PrivacyGate.open(_contract(
            tmp_path / "lite", key_file,
            {"url": f"sqlite:///{tmp_path / 'customers.sqlite'}", "table": "customers"},
            f"sqlite:///{tmp_path / 'store.sqlite'}")),
    }
    yield opened
    for gate in opened.values():
        gate.close()


def _sorted_rows(data: GatedData) -> np.ndarray:
    return data.site.raw[np.lexsort(data.site.raw.T)]


def _counts(data: GatedData) -> dict[str, Any]:
    r = data.report
    return {"rows_read": r.rows_read, "used": r.used, "excluded": r.excluded,
            "invalid_by_reason": r.invalid_by_reason, "clipped": r.clipped}


def test_postgres_table_gives_the_same_rows_and_counts_as_sqlite(
        gates: dict[str, PrivacyGate]) -> None:
    pg, lite = (gates[k].load() for k in ("postgresql", "sqlite"))
    assert gates["postgresql"].store.url.startswith("postgresql+psycopg://")
    np.testing.assert_array_equal(_sorted_rows(pg), _sorted_rows(lite))
    assert set(pg.pseudonyms) == set(lite.pseudonyms)
    assert _counts(pg) == _counts(lite)
    # hand-checked: A2, A4 used; A3 declined; A1 twice, A5-A8 one reason each
    assert _counts(pg) == {
        "rows_read": 9, "used": 2,
        "excluded": {"invalid": 6, "erased": 0, "withdrawn": 0, "no_consent": 1},
        "invalid_by_reason": {"duplicate subject id": 2, "spend: invalid value": 1,
                              "channel: invalid value": 1, "member: invalid value": 1,
                              "consent: not a boolean": 1},
        "clipped": {"spend": 1}}


def test_withdrawal_and_erasure_in_the_postgres_store_match_sqlite(
        gates: dict[str, PrivacyGate]) -> None:
    now = datetime.now(UTC)
    before = {k: g.load(at=now) for k, g in gates.items()}
    key = gates["postgresql"].key
    a2, a4 = key.pseudonym("A2"), key.pseudonym("A4")
    assert {a2, a4} == set(before["postgresql"].pseudonyms)
    for gate in gates.values():
        assert gate.store.withdraw(a2, purpose="segmentation", at=now, source="test")
        gate.store.erase(a4, at=now, reason="test")
    after = {k: g.load(at=now + timedelta(seconds=1)) for k, g in gates.items()}
    for name in gates:
        assert set(before[name].pseudonyms) - set(after[name].pseudonyms) == {a2, a4}
        assert after[name].report.used == 0
        assert after[name].report.excluded["withdrawn"] == 1
        assert after[name].report.excluded["erased"] == 1
    assert _counts(after["postgresql"]) == _counts(after["sqlite"])
    # a later grant brings A2 back through both stores; the erasure stays
    for gate in gates.values():
        gate.store.grant(a2, purpose="segmentation", at=now + timedelta(seconds=2),
                         source="test")
    again = {k: g.load(at=now + timedelta(seconds=3)) for k, g in gates.items()}
    assert set(again["postgresql"].pseudonyms) == set(again["sqlite"].pseudonyms) == {a2}


def _create_transactions(url: str, rows: list[list[Any]]) -> None:
    """A typed transaction table: TIMESTAMP ts, DOUBLE PRECISION amount."""
    _create_table(url, "tx", {
        "customer_id": sa.Text, "order_id": sa.Text, "ts": sa.DateTime, "amount": sa.Double,
        "category": sa.Text, "email": sa.Text},
        [dict(zip(TX_HEADER, row, strict=True)) for row in rows])


def _typed_tx(row: list[str | None]) -> list[Any]:
    stamp = None if row[2] is None else datetime.fromisoformat(row[2])
    return [row[0], row[1], stamp, _number(row[3]), row[4], row[5]]


def test_postgres_aggregates_transactions_like_duckdb_over_csv(
        postgres_server: PostgresServer, tmp_path: Path) -> None:
    # one transaction without a timestamp: invalid in both, not counted in any feature
    rows: list[list[Any]] = [*TX_ROWS, ["C2", "o5", None, "9.0", "food", "c2@x"]]
    url = postgres_server.new_database("gate_transactions")
    _create_transactions(url, [_typed_tx(r) for r in rows])
    (tmp_path / "csv").mkdir()
    write_csv(tmp_path / "csv" / "tx.csv", [["" if c is None else c for c in r] for r in rows],
              TX_HEADER)
    from_csv = read_source(load_contract(_tx_contract(tmp_path / "csv", {"path": "tx.csv"})))
    from_pg = read_source(load_contract(
        _tx_contract(tmp_path / "pg", {"url": url, "table": "tx"})))
    assert list(from_pg.ids) == list(from_csv.ids) == ["C1", "C2"]
    assert from_pg.values.keys() == from_csv.values.keys()
    for name, values in from_csv.values.items():
        np.testing.assert_allclose(from_pg.values[name], values, rtol=1e-12, err_msg=name)
    for count in ("read", "invalid", "after_as_of"):
        assert from_pg.transactions[count] == from_csv.transactions[count], count
    assert from_pg.transactions["read"] == 6 and from_pg.transactions["invalid"] == 1
    # hand-checked C1 (as in tests/unit/test_gate.py): 2 orders, 60 EUR, half food
    c1 = {k: float(v[0]) for k, v in from_pg.values.items()}
    assert c1["frequency"] == 2.0 and c1["monetary"] == 60.0 and c1["avg_basket"] == 30.0
    assert c1["recency_days"] == pytest.approx(19 + 14 / 24)
    assert c1["food_share"] == pytest.approx(0.5)


def test_a_transaction_with_two_bad_cells_counts_once_in_both_readers(
        postgres_server: PostgresServer, tmp_path: Path) -> None:
    rows: list[list[Any]] = [*TX_ROWS, ["C2", "o5", None, None, "food", "c2@x"]]
    url = postgres_server.new_database("gate_transactions_two_bad")
    _create_transactions(url, [_typed_tx(r) for r in rows])
    (tmp_path / "csv").mkdir()
    write_csv(tmp_path / "csv" / "tx.csv", [["" if c is None else c for c in r] for r in rows],
              TX_HEADER)
    from_csv = read_source(load_contract(_tx_contract(tmp_path / "csv", {"path": "tx.csv"})))
    from_pg = read_source(load_contract(
        _tx_contract(tmp_path / "pg", {"url": url, "table": "tx"})))
    assert from_pg.transactions["invalid"] == 1
    assert from_csv.transactions["invalid"] == 1


def _text_cells(url: str) -> list[tuple[str, str, bytes]]:
    """Every text or binary cell of every table: (table, column, value as bytes)."""
    engine = sa.create_engine(url)
    cells: list[tuple[str, str, bytes]] = []
    try:
        inspector = sa.inspect(engine)
        with engine.connect() as conn:
            for table in inspector.get_table_names():
                for column in inspector.get_columns(table):
                    if not isinstance(column["type"], sa.String | sa.LargeBinary):
                        continue
                    query = sa.text(f'SELECT "{column["name"]}" FROM "{table}"')
                    for (value,) in conn.execute(query):
                        if value is not None:
                            raw = value.encode() if isinstance(value, str) else bytes(value)
                            cells.append((table, column["name"], raw))
    finally:
        engine.dispose()
    return cells


def test_postgres_store_holds_no_raw_subject_id(
        postgres_server: PostgresServer, key_file: Path, tmp_path: Path) -> None:
    store_url = postgres_server.new_database("gate_store_sentinels")
    rows = [[s, "n", "e", "1", "1", "web", "no", "true"] for s in SENTINELS]
    write_csv(tmp_path / "customers.csv", rows, HEADER)
    gate = PrivacyGate.open(_contract(tmp_path, key_file, {"path": "customers.csv"}, store_url))
    try:
        now = datetime.now(UTC)
        assert gate.load(at=now).report.used == len(SENTINELS)
        first, second, third = (gate.key.pseudonym(s) for s in SENTINELS)
        gate.store.grant(first, purpose="segmentation", at=now, source=f"import {SENTINELS[0]}")
        gate.store.withdraw(second, purpose="segmentation", at=now, source="test")
        gate.store.erase(third, at=now, reason=f"GDPR art. 17 request of {SENTINELS[2]}")
        gate.store.replace_assignments([first, second], [0, 1], ["low", "high"],
                                       model_sha256="ab" * 32, at=now)
        after = gate.load(at=now + timedelta(seconds=1))
    finally:
        gate.close()
    assert after.report.used == 1 and set(after.pseudonyms) == {first}
    cells = _text_cells(store_url)
    tables = {table for table, _, _ in cells}
    assert {"consent", "erasures", "assignments"} <= tables
    # the query reaches the subjects' rows: their pseudonyms are there in clear
    assert {first.encode(), second.encode(), third.encode()} <= {v for _, _, v in cells}
    for sentinel in SENTINELS:
        leaks = [(t, c) for t, c, v in cells if sentinel.encode() in v]
        assert leaks == [], f"{sentinel} stored in clear in {leaks}"
