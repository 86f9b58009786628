"""The privacy gate over real files: contract, sources, validation, consent, erasure."""

from __future__ import annotations

import gzip
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import numpy as np
import pytest
import yaml

from client.contract import load_contract, parse_contract, source_columns
from client.gate import PrivacyGate
from client.sources import read_source
from common.errors import ConfigError, DataError
from tests.gate_sites import ROWS, contract_doc, make_site, write_csv, write_sqlite


def _open(contract: Path) -> PrivacyGate:
    return PrivacyGate.open(contract)


def test_contract_errors_name_file_key_and_expectation(tmp_path: Path) -> None:
    doc = contract_doc()
    doc["features"][1]["type"] = "text"
    doc["sorce"] = {}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(doc), "utf-8")
    with pytest.raises(ConfigError) as err:
        load_contract(path)
    text = str(err.value)
    assert str(path) in text
    assert "features[1] (name 'visits').type" in text and "numeric" in text
    assert "sorce: unknown key" in text


@pytest.mark.parametrize(("change", "expected"), [
    ({"features": [{"name": "email"}]}, "direct identifier"),
    ({"features": [{"name": "c", "type": "categorical"}]}, "vocabulary"),
    ({"features": [{"name": "s", "clip": [5, 1]}]}, "low < high"),
    ({"source": {"path": "a.csv", "url": "sqlite:///x.db"}}, "exactly one"),
    ({"source": {"path": "t.csv", "level": "transaction"}}, "transactions section"),
    ({"consent": {"mode": "column"}}, "consent.column"),
    ({"features": [{"name": "a"}, {"name": "a"}]}, "declared twice"),
])
def test_contract_refuses_inconsistent_declarations(change: dict, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        parse_contract(contract_doc(**change), where="c.yaml")


def test_contract_refuses_non_mapping_and_bad_yaml(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("features: [unclosed\n", "utf-8")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_contract(path)
    with pytest.raises(ConfigError, match="expected a mapping"):
        parse_contract([1, 2], where="c.yaml")


def test_projection_never_names_direct_identifiers() -> None:
    contract = parse_contract(contract_doc(), where="c.yaml")
    columns = source_columns(contract)
    assert "name" not in columns and "email" not in columns
    assert set(columns) == {"customer_id", "consent", "spend", "visits", "channel", "member"}


def test_gate_types_features_consent_and_pseudonymises(tmp_path: Path) -> None:
    gate = _open(make_site(tmp_path))
    data = gate.load()
    # A3 declined consent: three customers take part.
    assert data.report.used == 3 and data.report.excluded["no_consent"] == 1
    names = [f.name for f in data.site.features]
    assert names == ["spend", "visits", "channel=store", "channel=web", "member"]
    rows = {tuple(r) for r in data.site.raw.tolist()}
    # spend 5000 is clipped to the declared 1000 (and counted)
    assert (1000.0, 40.0, 1.0, 0.0, 0.0) in rows
    assert (120.5, 3.0, 0.0, 1.0, 1.0) in rows
    assert data.report.clipped == {"spend": 1}
    assert all(len(p) == 64 and p not in {"A1", "A2", "A4"} for p in data.pseudonyms)
    assert set(data.pseudonyms) == {gate.key.pseudonym(i) for i in ("A1", "A2", "A4")}
    spec = data.site.features[0]
    assert (spec.title, spec.high, spec.low) == ("Annual spend", "big spenders",
                                                 "small spenders")
    gate.close()


@pytest.mark.parametrize("fmt", ["csv.gz", "parquet", "sqlite"])
def test_every_source_kind_gives_the_same_rows(tmp_path: Path, fmt: str) -> None:
    base = _open(make_site(tmp_path / "csv")).load()
    site = tmp_path / fmt.replace(".", "_")
    site.mkdir()
    csv_path = write_csv(site / "plain.csv", ROWS)
    if fmt == "csv.gz":
        (site / "customers.csv.gz").write_bytes(gzip.compress(csv_path.read_bytes()))
        source = {"path": "customers.csv.gz"}
    elif fmt == "parquet":
        duckdb.connect().execute(
            "COPY (SELECT * FROM read_csv(?, all_varchar=true)) TO ? (FORMAT parquet)",
            [str(csv_path), str(site / "customers.parquet")])
        source = {"path": "customers.parquet"}
    else:
        write_sqlite(site / "customers.sqlite", ROWS)
        source = {"url": "sqlite:///customers.sqlite", "table": "customers"}
    data = _open(make_site(site, rows=ROWS, source=source)).load()
    order = np.lexsort(base.site.raw.T)
    other = np.lexsort(data.site.raw.T)
    np.testing.assert_array_equal(base.site.raw[order], data.site.raw[other])
    assert data.report.excluded == base.report.excluded


def test_error_mode_names_file_row_and_column_without_the_value(tmp_path: Path) -> None:
    rows = [r.copy() for r in ROWS]
    rows[2][3] = "SECRET-NOT-A-NUMBER"
    with pytest.raises(DataError) as err:
        _open(make_site(tmp_path, rows=rows)).load()
    text = str(err.value)
    assert "row 3" in text and "column 'spend'" in text and "customers.csv" in text
    assert "finite number" in text and "SECRET" not in text


def test_quarantine_excludes_and_counts_each_reason(tmp_path: Path) -> None:
    rows = [r.copy() for r in ROWS] + [
        ["A5", "E", "e@x", "abc", "1", "web", "no", "true"],      # bad number
        ["A6", "F", "f@x", "5", "1", "fax", "no", "true"],        # outside vocabulary
        ["A7", "G", "g@x", "5", "1", "web", "maybe", "true"],     # not a boolean
        ["A1", "H", "h@x", "5", "1", "web", "no", "true"],        # duplicate id (with row 1)
        ["", "I", "i@x", "5", "1", "web", "no", "true"],          # missing id
    ]
    data = _open(make_site(tmp_path, rows=rows, on_invalid="quarantine")).load()
    reasons = data.report.invalid_by_reason
    assert reasons["duplicate subject id"] == 2
    assert reasons["spend: invalid value"] == 1
    assert reasons["channel: invalid value"] == 1
    assert reasons["member: invalid value"] == 1
    assert reasons["missing subject id"] == 1
    assert data.report.excluded["invalid"] == 6
    assert data.report.used == 2  # A2, A4 (A1 is duplicated, A3 declined)


def test_malformed_csv_line_is_reported_or_quarantined(tmp_path: Path) -> None:
    contract = make_site(tmp_path)
    with (tmp_path / "customers.csv").open("a", encoding="utf-8") as handle:
        handle.write("A9,x,y,1,2,web,no,true,EXTRA\n")
    with pytest.raises(DataError, match="line 6"):
        _open(contract).load()
    doc = yaml.safe_load(contract.read_text("utf-8"))
    doc["on_invalid"] = "quarantine"
    contract.write_text(yaml.safe_dump(doc), "utf-8")
    data = _open(contract).load()
    assert data.report.invalid_by_reason == {"malformed row": 1}
    assert data.report.used == 3


def test_duplicate_header_and_missing_column_are_refused(tmp_path: Path) -> None:
    header = ["customer_id", "spend", "spend", "visits", "channel", "member", "consent"]
    write_csv(tmp_path / "dup.csv", [["A1", "1", "2", "3", "web", "no", "true"]], header)
    contract = make_site(tmp_path, source={"path": "dup.csv"}, direct_identifiers=[])
    with pytest.raises(DataError, match="more than once"):
        _open(contract).load()
    write_csv(tmp_path / "miss.csv", [["A1", "3"]], ["customer_id", "visits"])
    contract = make_site(tmp_path, source={"path": "miss.csv"}, direct_identifiers=[])
    with pytest.raises(DataError, match=r"missing column\(s\) \['consent', 'spend'"):
        _open(contract).load()


def test_ledger_withdrawal_and_erasure_take_effect_at_next_load(tmp_path: Path) -> None:
    gate = _open(make_site(tmp_path))
    before = gate.load()
    now = datetime.now(UTC)
    a1, a2 = gate.key.pseudonym("A1"), gate.key.pseudonym("A2")
    gate.store.withdraw(a1, purpose="segmentation", at=now, source="test")
    gate.store.erase(a2, at=now, reason="test")
    after = gate.load(at=now + timedelta(seconds=1))
    assert before.report.used - after.report.used == 2
    assert a1 not in set(after.pseudonyms) and a2 not in set(after.pseudonyms)
    assert after.report.excluded["withdrawn"] == 1 and after.report.excluded["erased"] == 1
    # A later grant in the ledger brings A1 back; the erasure is permanent.
    gate.store.grant(a1, purpose="segmentation", at=now + timedelta(seconds=2), source="t")
    again = gate.load(at=now + timedelta(seconds=3))
    assert a1 in set(again.pseudonyms) and a2 not in set(again.pseudonyms)
    gate.close()


def test_ledger_mode_needs_a_grant(tmp_path: Path) -> None:
    contract = make_site(tmp_path, consent={"mode": "ledger"})
    gate = _open(contract)
    assert gate.load().report.used == 0
    gate.store.grant(gate.key.pseudonym("A3"), purpose="segmentation",
                     at=datetime.now(UTC) - timedelta(seconds=5), source="t")
    data = gate.load()
    assert data.report.used == 1 and data.pseudonyms[0] == gate.key.pseudonym("A3")
    gate.close()


TX_HEADER = ["customer_id", "order_id", "ts", "amount", "category", "email"]
TX_ROWS = [
    ["C1", "o1", "2026-01-01 10:00:00", "10.0", "food", "c1@x"],
    ["C1", "o2", "2026-01-11 10:00:00", "30.0", "toys", "c1@x"],
    ["C1", "o2", "2026-01-11 10:00:00", "20.0", "food", "c1@x"],
    ["C2", "o3", "2026-01-21 10:00:00", "5.0", "food", "c2@x"],
    ["C2", "o4", "2026-03-01 10:00:00", "7.0", "food", "c2@x"],   # after as_of: ignored
]


def _tx_contract(tmp_path: Path, source: dict) -> Path:
    doc = contract_doc(
        source={**source, "level": "transaction"}, direct_identifiers=["email"],
        consent={"mode": "ledger"},
        transactions={"timestamp": "ts", "amount": "amount", "order_id": "order_id",
                      "category": "category", "as_of": "2026-01-31"},
        features=[{"name": "recency_days", "aggregate": "recency_days"},
                  {"name": "frequency", "aggregate": "frequency"},
                  {"name": "monetary", "aggregate": "monetary"},
                  {"name": "avg_basket", "aggregate": "average_basket"},
                  {"name": "tenure_days", "aggregate": "tenure_days"},
                  {"name": "food_share", "aggregate": "category_share", "category": "food"}])
    return make_site(tmp_path, **{k: v for k, v in doc.items() if k != "contract"})


@pytest.mark.parametrize("kind", ["csv", "sqlite"])
def test_transactions_aggregate_to_customer_features(tmp_path: Path, kind: str) -> None:
    if kind == "csv":
        write_csv(tmp_path / "tx.csv", TX_ROWS, TX_HEADER)
        source = {"path": "tx.csv"}
    else:
        # a database stores amounts as numbers (SQLite text amounts count as invalid)
        typed = [[*r[:3], float(r[3]), *r[4:]] for r in TX_ROWS]
        write_sqlite(tmp_path / "tx.sqlite", typed, table="tx", header=TX_HEADER)
        source = {"url": "sqlite:///tx.sqlite", "table": "tx"}
    contract = _tx_contract(tmp_path, source)
    rows = read_source(load_contract(contract))
    assert list(rows.ids) == ["C1", "C2"]
    c1 = {k: float(v[0]) for k, v in rows.values.items()}
    # as_of 2026-01-31 00:00; last purchase 2026-01-11 10:00 -> 19.583 days
    assert c1["recency_days"] == pytest.approx(19 + 14 / 24)
    assert c1["tenure_days"] == pytest.approx(29 + 14 / 24)
    assert c1["frequency"] == 2.0 and c1["monetary"] == 60.0 and c1["avg_basket"] == 30.0
    assert c1["food_share"] == pytest.approx(0.5)
    assert rows.values["monetary"][1] == 5.0  # the March order is after as_of
    assert rows.transactions["after_as_of"] == 1 and rows.transactions["read"] == 5


def test_invalid_transactions_are_counted_in_quarantine(tmp_path: Path) -> None:
    write_csv(tmp_path / "tx.csv", [*TX_ROWS, ["C3", "o9", "not a time", "1", "food", "x"]],
              TX_HEADER)
    contract = _tx_contract(tmp_path, {"path": "tx.csv"})
    with pytest.raises(DataError, match="1 transaction"):
        _open(contract).load()
    doc = yaml.safe_load(contract.read_text("utf-8"))
    doc["on_invalid"] = "quarantine"
    contract.write_text(yaml.safe_dump(doc), "utf-8")
    data = _open(contract).load()
    assert data.report.invalid_by_reason == {"invalid transaction": 1}
    assert data.report.rows_read == 2


@pytest.mark.parametrize("name", ["customers.yaml", "transactions.yaml"])
def test_example_contracts_in_conf_are_valid(name: str) -> None:
    root = Path(__file__).resolve().parents[2]
    contract = load_contract(root / "conf" / "contracts" / name)
    assert contract.purpose == "segmentation" and contract.feature_specs()
    assert not set(source_columns(contract)) & set(contract.direct_identifiers)
