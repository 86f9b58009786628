"""``fedseg-site`` on real files: plain errors with exit status 2, consent, rights, rotation."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from client.gate import PrivacyGate
from client.site_cli import main
from tests.gate_sites import ROWS, make_site


def _run(capsys: pytest.CaptureFixture[str], contract: Path, *argv: str) -> tuple[int, str, str]:
    code = main(["--contract", str(contract), *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_keygen_refuses_to_overwrite_and_a_readable_key_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    contract = make_site(tmp_path)
    code, _, err = _run(capsys, contract, "keygen")
    assert code == 2 and "--force" in err
    os.chmod(tmp_path / "site.key", 0o644)
    code, _, err = _run(capsys, contract, "check")
    assert code == 2 and "chmod 600" in err and "Traceback" not in err


def test_check_lists_used_ignored_and_excluded(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    contract = make_site(tmp_path)
    code, out, _ = _run(capsys, contract, "check")
    assert code == 0
    assert "never read name, email (direct identifiers, by contract)" in out
    assert "3 would take part now" in out and "1 no consent" in out
    assert "pseudonyms HMAC-SHA256 under the site key" in out


@pytest.mark.parametrize(("change", "expected"), [
    ({"features": [{"name": "spend", "type": "text"}]}, "features[0] (name 'spend').type"),
    ({"source": {"path": "nowhere.csv"}}, "file not found"),
    ({"features": [{"name": "absent"}]}, "missing column(s) ['absent']"),
])
def test_bad_contracts_and_sources_exit_2_with_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], change: dict, expected: str) -> None:
    contract = make_site(tmp_path, **change)
    code, _, err = _run(capsys, contract, "check")
    assert code == 2 and expected in err and "Traceback" not in err


def test_bad_rows_exit_2_naming_row_and_column(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    rows = [r.copy() for r in ROWS]
    rows[1][5] = "fax"
    contract = make_site(tmp_path, rows=rows)
    code, _, err = _run(capsys, contract, "check")
    assert code == 2 and "row 2" in err and "column 'channel'" in err
    assert "declared vocabulary" in err and "fax" not in err


def test_consent_import_status_and_bad_file(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    contract = make_site(tmp_path, consent={"mode": "ledger"})
    consents = tmp_path / "consents.csv"
    consents.write_text("customer_id,granted_at,withdrawn_at\nA1,2026-01-01,\n"
                        "A2,2026-01-01,2026-02-01\nA3,true,\n", "utf-8")
    code, _, err = _run(capsys, contract, "consent", "import", str(consents))
    assert code == 2 and "row 3" in err and "--granted-at" in err  # 'true' has no date
    code, out, _ = _run(capsys, contract, "consent", "import", str(consents),
                        "--granted-at", "2026-01-01")
    assert code == 0 and "imported 3" in out
    code, out, _ = _run(capsys, contract, "consent", "status")
    status = json.loads(out)
    assert status["taking_part_now"] == 2  # A1 and A3
    assert status["excluded"]["withdrawn"] == 1 and status["excluded"]["no_consent"] == 1
    consents.write_text("customer_id,granted_at\nA1,yesterday\n", "utf-8")
    code, _, err = _run(capsys, contract, "consent", "import", str(consents))
    assert code == 2 and "row 1" in err and "granted_at" in err


def test_rectify_erase_and_access(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    contract = make_site(tmp_path)
    rows = [r.copy() for r in ROWS]
    rows[0][4] = "30"  # visits of A1 corrected in the source
    make_site(tmp_path, rows=rows)
    code, out, _ = _run(capsys, contract, "rectify", "A1")
    assert code == 0 and json.loads(out)["features_used_from_next_round"]["visits"] == 30.0
    code, out, _ = _run(capsys, contract, "erase", "A1")
    assert code == 0 and json.loads(out)["erased"] is True
    code, out, _ = _run(capsys, contract, "erase", "A1")
    assert code == 0 and "already erased" in out
    code, out, _ = _run(capsys, contract, "access", "A1")
    answer = json.loads(out)
    assert answer["held"] is False and "nothing is held" in answer["statement"]
    code, _, err = _run(capsys, contract, "rectify", "NOPE")
    assert code == 2 and "no valid row of the source" in err


def test_rotate_key_rekeys_the_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    contract = make_site(tmp_path)
    assert main(["--contract", str(contract), "consent", "withdraw", "A1"]) == 0
    assert main(["--contract", str(contract), "erase", "A2"]) == 0
    before = PrivacyGate.open(contract)
    old = set(before.load().pseudonyms)
    before.close()
    capsys.readouterr()
    code, out, _ = _run(capsys, contract, "rotate-key")
    result = json.loads(out)
    assert code == 0 and result["rekeyed"]["unmapped"] == 0
    after = PrivacyGate.open(contract)
    data = after.load()
    assert set(data.pseudonyms).isdisjoint(old)            # every pseudonym changed
    assert data.report.excluded["withdrawn"] == 1 and data.report.excluded["erased"] == 1
    assert after.key.pseudonym("A2") in after.store.erased()
    after.close()
    assert list(tmp_path.glob("site.key.retired-*"))


def test_transaction_contract_with_ledger_via_cli(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "tx.csv").write_text(
        "customer_id,ts,amount\nC1,2026-01-01,10\nC2,2026-01-05,20\nC2,2026-01-06,5\n", "utf-8")
    contract = tmp_path / "contract.yaml"
    doc = {"contract": "fedseg.data-contract/1", "site": {"name": "t"},
           "source": {"path": "tx.csv", "level": "transaction"}, "subject_id": "customer_id",
           "transactions": {"timestamp": "ts", "amount": "amount", "as_of": "2026-01-10"},
           "features": [{"name": "monetary", "aggregate": "monetary"},
                        {"name": "frequency", "aggregate": "frequency"}]}
    contract.write_text(yaml.safe_dump(doc), "utf-8")
    assert main(["--contract", str(contract), "keygen"]) == 0
    assert main(["--contract", str(contract), "consent", "grant", "C2",
                 "--at", "2026-01-01"]) == 0
    capsys.readouterr()
    code, out, _ = _run(capsys, contract, "access", "C2")
    answer = json.loads(out)
    assert code == 0
    assert answer["features_used"] == {"monetary": 25.0, "frequency": 2.0}
    assert answer["takes_part_in_rounds_now"] is True
