"""The audit log is a hash chain: any change, deletion, reordering or truncation is found."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
from pathlib import Path

import pytest

from client.audit_chain import GENESIS, AuditChain, verify_chain
from client.site_files import SiteFiles, audit_head_name
from common.errors import ConfigError


class DictHeadStore:
    """The site store's meta table, in memory."""

    def __init__(self) -> None:
        self.meta: dict[str, str] = {}

    def get_meta(self, name: str) -> str | None:
        return self.meta.get(name)

    def set_meta(self, name: str, value: str) -> None:
        self.meta[name] = value


def _entry(i: int) -> dict[str, object]:
    return {"round": i, "stage": "collect_masked_vectors", "bytes": 100 + i,
            "sha256": f"{i:064x}", "privacy": None}


def _chain(path: Path, n: int = 5, store: DictHeadStore | None = None) -> list[str]:
    chain = AuditChain(path, head_store=store)
    return [chain.append(_entry(i)) for i in range(1, n + 1)]


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines(keepends=True)


def _append_many(path: str, worker: int, count: int, barrier) -> None:
    barrier.wait()  # all workers start together, so their appends interleave
    chain = AuditChain(Path(path))
    for i in range(count):
        chain.append({"worker": worker, "i": i})


def test_a_chain_of_five_entries_verifies_with_hand_checked_links(tmp_path):
    # Prepare
    log = tmp_path / "audit" / "site-0.jsonl"
    # Execute
    hashes = _chain(log)
    result = verify_chain(log, expected_head=hashes[-1])
    # Assert
    assert result.ok and result.problem is None
    assert result.lines == 5 and result.head == hashes[-1]
    first = json.loads(_lines(log)[0])
    assert first["seq"] == 1 and first["prev"] == GENESIS and first["round"] == 1
    body = {k: v for k, v in first.items() if k != "hash"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    assert first["hash"] == hashlib.sha256(canonical).hexdigest() == hashes[0]
    assert [json.loads(x)["prev"] for x in _lines(log)[1:]] == hashes[:-1]


def test_changing_one_value_in_line_3_is_found_at_line_3(tmp_path):
    # Prepare
    log = tmp_path / "site-0.jsonl"
    _chain(log)
    lines = _lines(log)
    changed = json.loads(lines[2])
    changed["bytes"] = 0
    lines[2] = json.dumps(changed, sort_keys=True) + "\n"
    log.write_text("".join(lines), encoding="utf-8")
    # Execute
    result = verify_chain(log)
    # Assert
    assert not result.ok
    assert result.problem == "line 3: hash mismatch (the line was changed)"
    assert result.lines == 5 and result.head == json.loads(lines[1])["hash"]


def test_deleting_line_2_is_found_at_line_2(tmp_path):
    # Prepare
    log = tmp_path / "site-0.jsonl"
    _chain(log)
    lines = _lines(log)
    log.write_text("".join(lines[:1] + lines[2:]), encoding="utf-8")
    # Execute
    result = verify_chain(log)
    # Assert
    assert not result.ok and result.lines == 4
    assert result.problem == ("line 2: prev does not match line 1's hash (a line was deleted "
                              "or reordered)")


def test_swapping_lines_2_and_3_is_found_at_line_2(tmp_path):
    # Prepare
    log = tmp_path / "site-0.jsonl"
    _chain(log)
    lines = _lines(log)
    lines[1], lines[2] = lines[2], lines[1]
    log.write_text("".join(lines), encoding="utf-8")
    # Execute
    result = verify_chain(log)
    # Assert
    assert not result.ok
    assert result.problem is not None and result.problem.startswith("line 2: prev does not match")


def test_truncating_the_last_line_is_found_against_the_head_in_the_store(tmp_path):
    # Prepare
    log, store = tmp_path / "site-0.jsonl", DictHeadStore()
    hashes = _chain(log, store=store)
    log.write_text("".join(_lines(log)[:-1]), encoding="utf-8")
    # Execute
    alone = verify_chain(log)  # the shorter chain is valid by itself
    result = verify_chain(log, expected_head=store.get_meta("audit_head:site-0.jsonl"))
    # Assert
    assert alone.ok and alone.head == hashes[3]
    assert not result.ok and result.lines == 4
    assert result.problem == (f"the log ends at line 4 with hash {hashes[3][:16]}..., but the "
                              f"site store records head {hashes[4][:16]}...: lines were "
                              "removed from the end or the file was replaced")


def test_a_missing_log_is_ok_only_without_an_expected_head(tmp_path):
    # Prepare
    log = tmp_path / "never-written.jsonl"
    # Execute
    fresh = verify_chain(log)
    deleted = verify_chain(log, expected_head="a" * 64)
    # Assert
    assert fresh.ok and fresh.lines == 0 and fresh.head is None
    assert not deleted.ok and deleted.lines == 0 and "does not exist" in str(deleted.problem)


@pytest.mark.parametrize(("tail", "what"), [
    (b'{"round": 6, "sta', "does not end with a newline"),
    (b'{"round": 6, "sta\n', "is not valid JSON"),
])
def test_a_torn_last_line_makes_append_refuse_and_leaves_the_file_alone(tmp_path, tail, what):
    # Prepare
    log = tmp_path / "site-0.jsonl"
    _chain(log, n=2)
    with log.open("ab") as handle:
        handle.write(tail)
    before = log.read_bytes()
    # Execute
    with pytest.raises(ConfigError) as caught:
        AuditChain(log).append(_entry(3))
    # Assert
    message = str(caught.value)
    assert str(log) in message and f"line 3 {what}" in message
    assert "fedseg-site audit verify" in message
    assert log.read_bytes() == before


def test_a_legacy_unchained_log_is_reported_and_not_extended(tmp_path):
    # Prepare
    log = tmp_path / "site-0.jsonl"
    log.write_text(json.dumps(_entry(1), sort_keys=True) + "\n", encoding="utf-8")
    # Execute
    result = verify_chain(log)
    with pytest.raises(ConfigError, match="line 1 has no hash"):
        AuditChain(log).append(_entry(2))
    # Assert
    assert not result.ok
    assert result.problem == "line 1: no hash (written before the audit log was chained)"
    assert len(_lines(log)) == 1


def test_four_processes_appending_concurrently_give_one_valid_chain(tmp_path):
    # Prepare
    log = tmp_path / "audit" / "site-0.jsonl"
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(4)
    workers = [context.Process(target=_append_many, args=(str(log), w, 50, barrier))
               for w in range(4)]
    # Execute
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    result = verify_chain(log)
    # Assert
    assert [w.exitcode for w in workers] == [0, 0, 0, 0]
    assert result.ok, result.problem
    assert result.lines == 200
    entries = [json.loads(x) for x in _lines(log)]
    assert sorted((e["worker"], e["i"]) for e in entries) == [
        (w, i) for w in range(4) for i in range(50)]


def test_the_head_store_receives_each_new_head(tmp_path):
    # Prepare
    store = DictHeadStore()
    chain = AuditChain(tmp_path / "site-0.jsonl", head_store=store, name="site-0")
    # Execute
    first = chain.append(_entry(1))
    after_first = dict(store.meta)
    second = chain.append(_entry(2))
    # Assert
    assert after_first == {"audit_head:site-0": first}
    assert store.meta == {"audit_head:site-0": second}
    assert json.loads(_lines(tmp_path / "site-0.jsonl")[-1])["hash"] == second
    assert chain.verify().ok


def test_site_files_append_audit_keeps_the_entry_keys_and_chains_them(tmp_path):
    # Prepare
    store = DictHeadStore()
    files = SiteFiles(tmp_path, "0", head_store=store)
    # Execute
    heads = [files.append_audit(_entry(i)) for i in (1, 2)]
    entries = [json.loads(x) for x in _lines(files.audit_log)]
    # Assert
    assert [e["round"] for e in entries] == [1, 2] and entries[1]["sha256"] == f"{2:064x}"
    assert [e["seq"] for e in entries] == [1, 2] and entries[1]["prev"] == heads[0]
    assert store.meta == {f"audit_head:{audit_head_name(files.audit_log)}": heads[1]}
    assert SiteFiles(tmp_path, "0") == files  # the store takes no part in equality


def test_lines_longer_than_the_tail_block_still_chain(tmp_path):
    # Prepare
    log = tmp_path / "site-0.jsonl"
    chain = AuditChain(log)
    # Execute
    first = chain.append({"configs": "x" * 10_000})
    chain.append({"configs": "y" * 9_000})
    chain.append({"round": 3})
    entries = [json.loads(x) for x in _lines(log)]
    # Assert
    assert [e["seq"] for e in entries] == [1, 2, 3] and entries[1]["prev"] == first
    assert verify_chain(log).ok
