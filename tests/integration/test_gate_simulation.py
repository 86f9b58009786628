"""Real simulations through the privacy gate, with the site CLI acting between runs."""

from __future__ import annotations

import json
import sqlite3
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir

from client.site_cli import main as site_main
from simulations.run import CONF_DIR, run

pytestmark = pytest.mark.integration

SENTINEL_ID = "SENTINEL-ID-93731"
SENTINEL_NAME = "Sentinel Q. Person"
SENTINEL_VALUE = 123.456789012


def _cfg(sites_dir: Path, *extra: str) -> Any:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=[
            "data.num_customers=4000", "model.k=4", "privacy=secagg",
            f"federation.sites_dir={sites_dir}", "centralized_reference=false", *extra])


def _site(sites: Path, i: int) -> str:
    return str(sites / f"site-{i}" / "contract.yaml")


def _customer(sites: Path, i: int, offset: int = 0) -> str:
    con = sqlite3.connect(sites / f"site-{i}" / "customers.sqlite")
    try:
        rows = con.execute("SELECT customer_id FROM customers WHERE consent = 1 "
                           "ORDER BY customer_id").fetchall()
    finally:
        con.close()
    return str(rows[offset][0])


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = site_main(list(argv))
    return code, capsys.readouterr().out


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("gate")
    sites = root / "sites"
    first = run(_cfg(sites), output_dir=root / "run1")
    withdrawn, erased = _customer(sites, 0), _customer(sites, 1)
    assert site_main(["--contract", _site(sites, 0), "consent", "withdraw", withdrawn]) == 0
    assert site_main(["--contract", _site(sites, 1), "erase", erased]) == 0
    second = run(_cfg(sites), output_dir=root / "run2")
    return {"root": root, "sites": sites, "first": first, "second": second,
            "withdrawn": withdrawn, "erased": erased}


def _model(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "segments.json").read_text("utf-8"))


def test_withdrawal_and_erasure_change_the_model_by_exactly_two(two_runs: dict) -> None:
    one, two = _model(two_runs["root"] / "run1"), _model(two_runs["root"] / "run2")
    assert one["scaling"]["count"] - two["scaling"]["count"] == 2
    sizes_one = sum(s["size"] for s in one["segments"])
    sizes_two = sum(s["size"] for s in two["segments"])
    assert sizes_one - sizes_two == 2
    gates_one = two_runs["first"]["site_gates"]
    gates_two = two_runs["second"]["site_gates"]
    assert gates_two[0]["excluded"]["withdrawn"] == 1 and gates_one[0]["excluded"]["withdrawn"] == 0
    assert gates_two[1]["excluded"]["erased"] == 1
    assert gates_one[0]["used"] - gates_two[0]["used"] == 1
    assert gates_one[1]["used"] - gates_two[1]["used"] == 1


def test_access_on_erased_subject_says_nothing_is_held(
        two_runs: dict, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = _cli(capsys, "--contract", _site(two_runs["sites"], 1), "access",
                     two_runs["erased"])
    answer = json.loads(out)
    assert code == 0 and answer["held"] is False and answer["erased"]["reason"]
    assert "nothing is held" in answer["statement"]
    code, out = _cli(capsys, "--contract", _site(two_runs["sites"], 0), "access",
                     two_runs["withdrawn"])
    answer = json.loads(out)
    assert answer["takes_part_in_rounds_now"] is False
    assert [h["withdrawn_at"] is not None for h in answer["consent_history"]] == [True]


def test_site_operations_assign_export_report_and_audit(
        two_runs: dict, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    contract = _site(two_runs["sites"], 2)
    model = two_runs["root"] / "run2" / "segments.json"
    code, out = _cli(capsys, "--contract", contract, "assign", "--model", str(model))
    assert code == 0 and "assigned" in out
    subject = _customer(two_runs["sites"], 2, offset=3)
    _, out = _cli(capsys, "--contract", contract, "access", subject)
    segment = json.loads(out)["current_segment"]
    names = [s["name"] for s in _model(two_runs["root"] / "run2")["segments"]]
    assert segment["segment_name"] in names
    exported = tmp_path / "labels.csv"
    code, _ = _cli(capsys, "--contract", contract, "export-assignments", "--out", str(exported))
    lines = exported.read_text("utf-8").splitlines()
    assert code == 0 and lines[0] == "customer_id,segment_id,segment_name"
    assert any(line.startswith(subject + ",") for line in lines)
    assert exported.stat().st_mode & 0o077 == 0
    code, out = _cli(capsys, "--contract", contract, "audit", "verify")
    assert code == 0 and "chain intact" in out
    code, out = _cli(capsys, "--contract", contract, "report")
    assert code == 0 and "consent coverage" in out and "erasures: 0 recorded" in out


def test_audit_verify_detects_a_changed_line(
        two_runs: dict, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    log = two_runs["root"] / "run2" / "audit" / "site-3.jsonl"
    copy = tmp_path / "site-3.jsonl"
    lines = log.read_text("utf-8").splitlines()
    lines[2] = lines[2].replace('"bytes": ', '"bytes": 1')
    copy.write_text("\n".join(lines) + "\n", "utf-8")
    code, out = _cli(capsys, "--contract", _site(two_runs["sites"], 3), "audit", "verify",
                     "--log", str(copy), "--no-store")
    assert code == 2 and "line 3" in out


def test_sentinel_values_never_reach_any_file_the_site_writes(
        two_runs: dict, capsys: pytest.CaptureFixture[str]) -> None:
    sites, root = two_runs["sites"], two_runs["root"]
    source = sites / "site-2" / "customers.sqlite"
    con = sqlite3.connect(source)
    columns = [r[1] for r in con.execute("PRAGMA table_info(customers)").fetchall()]
    values = {c: SENTINEL_VALUE for c in columns}
    values.update({"customer_id": SENTINEL_ID, "name": SENTINEL_NAME,
                   "email": "sentinel@example.invalid", "consent": 1,
                   "online_share": 0.123456789012, "discount_share": 0.123456789012,
                   "tenure_years": 7.123456789012})
    con.execute(f"INSERT INTO customers VALUES ({', '.join('?' * len(columns))})",
                [values[c] for c in columns])
    con.commit()
    con.close()
    out = root / "run3"
    summary = run(_cfg(sites), output_dir=out)
    assert summary["site_gates"][2]["used"] == two_runs["second"]["site_gates"][2]["used"] + 1
    contract = _site(sites, 2)
    for argv in (["check"], ["consent", "status"], ["report"], ["audit", "verify"],
                 ["assign", "--model", str(out / "segments.json")],
                 ["consent", "withdraw", SENTINEL_ID], ["consent", "grant", SENTINEL_ID]):
        assert site_main(["--contract", contract, *argv]) in (0, 2)
    capsys.readouterr()
    needles = [SENTINEL_ID.encode(), SENTINEL_NAME.encode(), b"sentinel@example",
               b"123.456789", b"0.123456789", struct.pack("<d", SENTINEL_VALUE),
               struct.pack(">d", SENTINEL_VALUE)]
    checked = 0
    for path in [*out.rglob("*"), *sites.rglob("*")]:
        if not path.is_file() or path == source:
            continue  # the site's own source table is the one place the values belong
        data = path.read_bytes()
        checked += 1
        for needle in needles:
            assert needle not in data, f"{needle!r} found in {path}"
    assert checked > 20


def test_site_cli_help_and_errors_are_plain(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "client.site_cli", "--help"],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0 and "consent" in result.stdout and "erase" in result.stdout
    result = subprocess.run([sys.executable, "-m", "client.site_cli", "--contract",
                             str(tmp_path / "missing.yaml"), "check"],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "missing.yaml not found" in result.stderr
