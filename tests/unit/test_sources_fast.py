"""The fast CSV read (numbers and booleans parsed by DuckDB's CSV reader) equals the text read.

``client.sources`` first reads a customer CSV with its numeric and boolean columns typed in the
CSV reader itself; a file with any cell that reader refuses is read again with every cell as
text (``TRY_CAST`` and the boolean words). Both must give the same rows, values and ids for any
file: here the second read is forced (no typed columns) and the two compared cell by cell.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from client import sources
from client.contract import load_contract
from client.sources import read_source
from tests.gate_sites import HEADER, contract_doc, write_csv

NUMBERS = ["1", " 1", "1 ", "120.5", "-0", "+1", ".5", "5.", "1e3", "1E-3", "1,5", "1_000",
           "0x10", "inf", "-Infinity", "nan", "NaN", "1e400", "", " ", "١", "\uff11", "1.2.3",
           "12abc", "00012", "1d", "1f", "--1", "true"]
BOOLEANS = ["true", "false", "TRUE", "False", "t", "F", "yes", "No", "Y", "n", "1", "0", "",
            " yes", "no ", "on", "off", "2", "1.0", "tru", "ja", "\u0131", "nan"]
# cells DuckDB's typed CSV reader accepts (it fails the read on the others)
NUMBERS_OK = ["1", " 1", "1 ", "120.5", "-0", "+1", ".5", "5.", "1e3", "1E-3", "1_000", "inf",
              "-Infinity", "nan", "NaN", "1e400", "", "00012"]
BOOLEANS_OK = ["true", "false", "TRUE", "False", "t", "F", "yes", "No", "Y", "n", "1", "0", ""]
IDS = ["A1", " A2", "A3\t", "é4", "", " "]
CATEGORIES = ["store", "web", " web", "Web", "fax", ""]


def _row(draw: st.DrawFn, i: int, clean: bool) -> list[str]:
    numbers = st.sampled_from(NUMBERS_OK if clean else NUMBERS)
    booleans = st.sampled_from(BOOLEANS_OK if clean else BOOLEANS)
    return [draw(st.sampled_from(IDS)) + str(i), "N", "e@x", draw(numbers), draw(numbers),
            draw(st.sampled_from(CATEGORIES)), draw(booleans), draw(booleans)]


@st.composite
def tables(draw: st.DrawFn) -> tuple[bool, list[list[str]]]:
    """(clean, rows): clean files hold only cells the typed read accepts."""
    clean = draw(st.booleans())
    n = draw(st.integers(1, 12))
    return clean, [_row(draw, i, clean) for i in range(n)]


def _same(a: Any, b: Any) -> bool:
    return np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sources-fast")


@settings(max_examples=120, deadline=None, suppress_health_check=[
    HealthCheck.function_scoped_fixture])
@given(table=tables(), clip=st.booleans())
def test_the_typed_csv_read_equals_the_text_read(root: Path, table: tuple[bool, list[list[str]]],
                                                 clip: bool,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    clean, rows = table
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        directory = Path(tmp)
        write_csv(directory / "customers.csv", rows, HEADER)
        doc = contract_doc(site={"name": "north"}, on_invalid="quarantine")
        if not clip:
            doc["features"][0].pop("clip")
        (directory / "contract.yaml").write_text(yaml.safe_dump(doc), "utf-8")
        contract = load_contract(directory / "contract.yaml")
        typed = sources._reader_types(contract)
        assert typed == {"spend": "DOUBLE", "visits": "DOUBLE", "member": "BOOLEAN",
                         "consent": "BOOLEAN"}
        if clean:  # the typed read itself succeeds: the comparison below is of both reads
            con = sources.connect_engine()
            sql, params, _ = sources._customer_query(contract, con, fast=True)
            assert con.sql(sql, params=params).to_arrow_table().num_rows == len(rows)
            con.close()
        fast = read_source(contract)
        with monkeypatch.context() as m:
            m.setattr(sources, "_reader_types", lambda _contract: {})
            text = read_source(contract)
    assert len(fast) == len(text) == len(rows)
    assert fast.id_values().tolist() == text.id_values().tolist()
    assert fast.rows.tolist() == text.rows.tolist() and fast.rejected == text.rejected
    assert fast.values.keys() == text.values.keys()
    for name in fast.values:
        assert _same(fast.values[name], text.values[name]), name
    assert _same(fast.consent, text.consent)


def test_a_cell_the_typed_read_refuses_is_read_as_text(tmp_path: Path) -> None:
    rows = [["A1", "N", "e", " 12 ", "3", "web", " yes", "true"],
            ["A2", "N", "e", "7", "x", "store", "no", "maybe"]]
    write_csv(tmp_path / "customers.csv", rows)
    (tmp_path / "contract.yaml").write_text(yaml.safe_dump(contract_doc()), "utf-8")
    out = read_source(load_contract(tmp_path / "contract.yaml"))
    assert _same(out.values["spend"], [12.0, 7.0])
    assert _same(out.values["visits"], [3.0, np.nan])  # invalid: the gate decides what to do
    assert _same(out.values["member"], [1.0, 0.0])
    assert _same(out.consent, [1.0, np.nan])


def test_the_engine_never_spills_customer_data_to_disk(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # DuckDB's default in-memory database spills to ./.tmp past its memory limit: raw cells,
    # unencrypted. The gate's connections have no temporary directory: the query fails instead.
    import duckdb

    monkeypatch.chdir(tmp_path)
    con = sources.connect_engine()
    try:
        assert con.sql("SELECT current_setting('temp_directory')").fetchall() == [("",)]
        con.execute("SET memory_limit = '40MB'")
        with pytest.raises(duckdb.OutOfMemoryException) as caught:
            con.sql("SELECT md5(range::VARCHAR) AS s FROM range(3000000) ORDER BY s") \
                .to_arrow_table()
    finally:
        con.close()
    assert list(tmp_path.iterdir()) == []
    assert "never lets it spill customer data to disk" in sources.engine_error(caught.value)


def _read_in_child(contract: str, queue: Any) -> None:
    queue.put(len(read_source(load_contract(contract))))


def test_a_process_forked_after_reads_can_read(tmp_path: Path) -> None:
    # A DuckDB database that outlived its read (say, one cached per thread) makes a forked
    # child that drops it hang or crash; a site's worker may fork after it has read.
    import multiprocessing
    import threading

    write_csv(tmp_path / "customers.csv", [["A1", "N", "e", "1", "2", "web", "yes", "true"]])
    (tmp_path / "contract.yaml").write_text(yaml.safe_dump(contract_doc()), "utf-8")
    contract = str(tmp_path / "contract.yaml")
    reader = threading.Thread(target=lambda: read_source(load_contract(contract)))
    reader.start()
    reader.join()
    assert len(read_source(load_contract(contract))) == 1
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_read_in_child, args=(contract, queue))
    child.start()
    child.join(60)
    alive = child.is_alive()
    if alive:
        child.kill()
    assert not alive and child.exitcode == 0 and queue.get(timeout=5) == 1
