"""Regression tests for problems found by an adversarial review of the privacy gate."""

from __future__ import annotations

import os
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest

from client.audit_chain import AuditChain, verify_chain
from client.contract import parse_contract
from client.gate import PrivacyGate
from client.site_cli import main
from common.errors import ConfigError
from tests.gate_sites import ROWS, contract_doc, make_site, write_csv

PURPOSE = "segmentation"


def test_ids_with_tabs_get_one_pseudonym_in_every_reader_and_the_cli(tmp_path: Path) -> None:
    rows = [r.copy() for r in ROWS]
    rows[0][0] = "A1\t"
    contract = make_site(tmp_path, rows=rows)
    assert main(["--contract", str(contract), "erase", "A1"]) == 0
    data = PrivacyGate.open(contract).load()
    assert data.report.excluded["erased"] == 1
    # the same file sent to the record-by-record reader (a stray CR line ending)
    text = (tmp_path / "customers.csv").read_text("utf-8").replace("\r\n", "\n")
    (tmp_path / "customers.csv").write_text(text.replace("\n", "\r\n", 1), "utf-8")
    assert PrivacyGate.open(contract).load().report.excluded["erased"] == 1


def test_cli_refuses_an_id_the_source_does_not_hold(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    contract = make_site(tmp_path)
    assert main(["--contract", str(contract), "erase", "a1"]) == 2  # case matters
    assert "--not-in-source" in capsys.readouterr().err
    assert main(["--contract", str(contract), "erase", "Z9", "--not-in-source"]) == 0


def test_export_leaves_out_withdrawn_customers_and_is_owner_only(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    contract = make_site(tmp_path)
    gate = PrivacyGate.open(contract)
    data = gate.load()
    gate.store.replace_assignments(list(data.pseudonyms), [0] * len(data.pseudonyms),
                                   ["seg"] * len(data.pseudonyms), model_sha256="0" * 64,
                                   at=datetime.now(UTC))
    gate.close()
    assert main(["--contract", str(contract), "consent", "withdraw", "A1"]) == 0
    out = tmp_path / "labels.csv"
    out.write_text("old\n", "utf-8")
    os.chmod(out, 0o644)
    assert main(["--contract", str(contract), "export-assignments", "--out", str(out)]) == 0
    lines = out.read_text("utf-8").splitlines()
    assert [line.split(",")[0] for line in lines[1:]] == ["A2", "A4"]
    assert out.stat().st_mode & 0o077 == 0
    capsys.readouterr()
    code = main(["--contract", str(contract), "export-assignments", "--out",
                 str(tmp_path / "no-such-dir" / "x.csv")])
    assert code == 2 and "cannot write" in capsys.readouterr().err


def test_truncated_audit_log_is_never_extended(tmp_path: Path) -> None:
    class Heads(dict):
        def get_meta(self, name: str) -> str | None:
            return self.get(name)

        def set_meta(self, name: str, value: str) -> None:
            self[name] = value

    heads = Heads()
    log = tmp_path / "audit.jsonl"
    chain = AuditChain(log, head_store=heads)
    for i in range(3):
        chain.append({"round": i})
    lines = log.read_text("utf-8").splitlines(keepends=True)
    log.write_text("".join(lines[:-1]), "utf-8")
    with pytest.raises(ConfigError, match="removed from the end"):
        chain.append({"round": 9})
    assert not verify_chain(log, expected_head=heads.get_meta(chain.meta_name)).ok


def test_a_copy_restoring_size_and_mtime_is_still_re_read(tmp_path: Path) -> None:
    contract = make_site(tmp_path)
    gate = PrivacyGate.open(contract)
    assert 40.0 in gate.load().site.raw[:, 1]
    source = tmp_path / "customers.csv"
    stat = source.stat()
    data = source.read_bytes().replace(b"5000,40,store", b"5000,14,store")  # a rectification
    assert len(data) == stat.st_size
    source.write_bytes(data)
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # as cp -p / rsync -t do
    visits = gate.load().site.raw[:, 1]
    assert 14.0 in visits and 40.0 not in visits
    gate.close()


def test_rotation_is_refused_while_an_erased_subject_has_left_the_source(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    contract = make_site(tmp_path)
    assert main(["--contract", str(contract), "erase", "A2"]) == 0
    make_site(tmp_path, rows=[r for r in ROWS if r[0] != "A2"])  # deleted from the source
    capsys.readouterr()
    assert main(["--contract", str(contract), "rotate-key"]) == 2
    assert "no longer in the source" in capsys.readouterr().err
    assert not (tmp_path / "site.key.new").exists()
    gate = PrivacyGate.open(contract)  # the old key still opens the store
    assert gate.key.pseudonym("A2") in gate.store.erased()
    gate.close()


@pytest.mark.parametrize("spelling", ["Email", " EMAIL ", "ｅｍａｉｌ"])
def test_a_direct_identifier_is_refused_under_another_spelling(spelling: str) -> None:
    doc = contract_doc(features=[{"name": "mail", "column": spelling}])
    with pytest.raises(ConfigError, match="direct identifier"):
        parse_contract(doc, where="c.yaml")


def test_utc_offsets_in_transactions_agree_between_csv_and_sqlite(tmp_path: Path) -> None:
    header = ["customer_id", "ts", "amount"]
    rows = [["C1", "2026-05-01T10:00:00+00:00", "1.0"],
            ["C1", "2026-05-31T23:00:00-05:00", "10.0"]]  # = 2026-06-01 04:00 UTC: after as_of
    write_csv(tmp_path / "tx.csv", rows, header)
    con = sqlite3.connect(tmp_path / "tx.sqlite")
    con.execute("CREATE TABLE tx (customer_id TEXT, ts TEXT, amount REAL)")
    con.executemany("INSERT INTO tx VALUES (?, ?, ?)", [[r[0], r[1], float(r[2])] for r in rows])
    con.commit()
    con.close()
    results = []
    for i, source in enumerate([{"path": "tx.csv"}, {"url": "sqlite:///tx.sqlite",
                                                     "table": "tx"}]):
        site = tmp_path / f"s{i}"
        site.mkdir()
        for name in ("tx.csv", "tx.sqlite"):
            (site / name).write_bytes((tmp_path / name).read_bytes())
        contract = make_site(
            site, source={**source, "level": "transaction"}, consent={"mode": "ledger"},
            direct_identifiers=[],
            transactions={"timestamp": "ts", "amount": "amount", "as_of": "2026-06-01"},
            features=[{"name": "monetary", "aggregate": "monetary"}])
        from client.contract import load_contract
        from client.sources import read_source

        got = read_source(load_contract(contract))
        results.append((float(got.values["monetary"][0]), got.transactions["after_as_of"]))
    assert results == [(1.0, 1), (1.0, 1)]


def test_duckdb_errors_never_quote_a_cell(tmp_path: Path) -> None:
    from client.sources import engine_error

    message = engine_error(RuntimeError("Conversion Error: Could not convert string "
                                        "'TOPSECRET-42' to DOUBLE"))
    assert "TOPSECRET" not in message and "Conversion Error" in message


def test_check_on_a_headerless_file_never_prints_a_record(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    contract = make_site(tmp_path)
    body = (tmp_path / "customers.csv").read_text("utf-8").splitlines(keepends=True)[1:]
    (tmp_path / "customers.csv").write_text("".join(body), "utf-8")
    code = main(["--contract", str(contract), "check"])
    captured = capsys.readouterr()
    assert code == 2
    assert "ann@example.com" not in captured.out + captured.err
    assert "Ann Smith" not in captured.out + captured.err


def test_a_truncated_store_payload_is_reported_as_tampering(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    contract = make_site(tmp_path, consent={"mode": "ledger"})
    assert main(["--contract", str(contract), "consent", "grant", "A1",
                 "--at", "2026-01-01"]) == 0
    con = sqlite3.connect(tmp_path / "site-store.sqlite")
    con.execute("UPDATE consent SET payload = substr(payload, 1, 5)")
    con.commit()
    con.close()
    capsys.readouterr()
    assert main(["--contract", str(contract), "consent", "status"]) == 2
    assert "tampered" in capsys.readouterr().err
