"""The site store: nothing about a subject in clear, tamper evidence, consent semantics, rekey.

Runs on SQLite files in ``tmp_path``; the round trip also runs on a real PostgreSQL server
started by the ``postgres_server`` fixture (tests/postgres_server.py).
"""

from __future__ import annotations

import json
import sqlite3
import stat
from collections.abc import Iterator
from contextlib import closing
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidTag
from sqlalchemy import create_engine, text

import client.site_store as site_store
from client.site_key import SiteKey, generate_key_file
from client.site_store import SiteStore
from common.errors import ConfigError

T0 = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
PURPOSE = "segmentation"
SHA = "ab" * 32


def at(days: float) -> datetime:
    return T0 + timedelta(days=days)


@pytest.fixture
def key(tmp_path: Path) -> SiteKey:
    return generate_key_file(tmp_path / "keys" / "site.key")


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "sub" / "site.db"


@pytest.fixture
def store(db_path: Path, key: SiteKey) -> Iterator[SiteStore]:
    with SiteStore(f"sqlite:///{db_path}", key) as opened:
        yield opened


def _raw_payload(db_path: Path, table: str, pseudonym: str) -> bytes:
    with closing(sqlite3.connect(db_path)) as con:
        query = f"SELECT payload FROM {table} WHERE pseudonym = ?"
        row = con.execute(query, (pseudonym,)).fetchone()
    return bytes(row[0])


def _write(db_path: Path, *statements: tuple[str, tuple]) -> None:
    """Tamper with the file directly, as an attacker with file access would."""
    with closing(sqlite3.connect(db_path)) as con, con:
        for sql, args in statements:
            con.execute(sql, args)


# -- opening --------------------------------------------------------------------------------


def test_sqlite_file_is_created_owner_only_with_its_parents(
    store: SiteStore, db_path: Path
) -> None:
    # Execute
    mode = stat.S_IMODE(db_path.stat().st_mode)

    # Assert
    assert mode == 0o600
    assert store.counts() == {"consent": 0, "erasures": 0, "assignments": 0, "meta": 1}


def test_opening_with_another_key_names_both_key_ids(
    db_path: Path, key: SiteKey, tmp_path: Path
) -> None:
    # Prepare
    SiteStore(f"sqlite:///{db_path}", key).close()
    other = generate_key_file(tmp_path / "other.key")

    # Execute
    with pytest.raises(ConfigError) as info:
        SiteStore(f"sqlite:///{db_path}", other)

    # Assert
    message = str(info.value)
    assert f"was created with key {key.key_id}, this key is {other.key_id}" in message
    assert str(db_path) in message


def test_reopening_with_the_same_key_reads_what_was_written(db_path: Path, key: SiteKey) -> None:
    # Prepare
    p = key.pseudonym("CUST-1")
    with SiteStore(f"sqlite:///{db_path}", key) as first:
        first.grant(p, purpose=PURPOSE, at=at(0), source="crm")

    # Execute
    with SiteStore(f"sqlite:///{db_path}", SiteKey.load(key.path)) as again:
        history = again.consent_history(p)

    # Assert
    assert history == [{
        "purpose": PURPOSE, "granted_at": "2024-03-01T12:00:00.000000+00:00",
        "withdrawn_at": None, "source": "crm", "withdrawal_source": None,
    }]


def test_unopenable_url_is_named_with_its_password_masked(key: SiteKey) -> None:
    # Prepare
    url = "postgresql+psycopg://alice:s3cret-pw@127.0.0.1:1/nodb?connect_timeout=2"

    # Execute
    with pytest.raises(ConfigError) as info:
        SiteStore(url, key)

    # Assert
    message = str(info.value)
    assert "alice:***@127.0.0.1:1/nodb" in message
    assert "s3cret-pw" not in message


@pytest.mark.parametrize("url", ["not a url", "nosuchdriver://alice:s3cret-pw@host/db"])
def test_malformed_url_is_refused_without_its_password(key: SiteKey, url: str) -> None:
    # Execute
    with pytest.raises(ConfigError) as info:
        SiteStore(url, key)

    # Assert
    assert "s3cret-pw" not in str(info.value)
    assert "store" in str(info.value)


def test_a_file_that_is_not_a_database_is_refused(tmp_path: Path, key: SiteKey) -> None:
    # Prepare
    path = tmp_path / "notes.txt"
    path.write_text("x" * 4096)

    # Execute
    with pytest.raises(ConfigError) as info:
        SiteStore(f"sqlite:///{path}", key)

    # Assert
    assert str(path) in str(info.value)


# -- nothing in clear ----------------------------------------------------------------------


def test_sentinel_ids_names_and_plaintext_never_reach_the_file(
    db_path: Path, key: SiteKey
) -> None:
    # Prepare
    raw_ids = ["SENTINEL-ID-7731", "SENTINEL-ID-7732", "SENTINEL-ID-7733"]
    segment_name = "SENTINEL-SEGMENT-Big-Spenders"
    ps = key.pseudonymise(raw_ids)

    # Execute
    with SiteStore(f"sqlite:///{db_path}", key) as store:
        store.grant(ps[0], purpose=PURPOSE, at=at(0), source="SENTINEL-SOURCE-crm")
        store.withdraw(ps[0], purpose=PURPOSE, at=at(1), source="SENTINEL-SOURCE-web")
        store.import_consents([(ps[1], at(0), None, "SENTINEL-SOURCE-csv")], purpose=PURPOSE)
        store.replace_assignments(ps, [0, 1, 2], [segment_name] * 3, model_sha256=SHA, at=at(2))
        store.erase(ps[2], at=at(3), reason="SENTINEL-REASON-art17")
    files = [p for p in db_path.parent.iterdir() if p.name.startswith(db_path.name)]
    blob = b"".join(p.read_bytes() for p in files)

    # Assert
    assert ps[0].encode() in blob  # the pseudonyms are the only subject data in clear
    forbidden = [
        *(i.encode() for i in raw_ids),
        *(i.encode("utf-16-le") for i in raw_ids),
        b"SENTINEL",
        segment_name.encode(),
        b"granted_at", b"withdrawn_at", b"segment_name", b"erased_at", b"2024-03",
        key.derive("fedseg pseudonym v1"),
        key.derive("fedseg store v1"),
        key._master,
        key.derive("fedseg pseudonym v1").hex().encode(),
    ]
    for needle in forbidden:
        assert needle not in blob, needle


# -- tamper evidence -----------------------------------------------------------------------


def test_swapping_payloads_between_subjects_fails_authentication(
    store: SiteStore, db_path: Path, key: SiteKey
) -> None:
    # Prepare
    a, b = key.pseudonymise(["CUST-A", "CUST-B"])
    store.grant(a, purpose=PURPOSE, at=at(0), source="crm")
    store.withdraw(b, purpose=PURPOSE, at=at(0), source="crm")
    pa, pb = _raw_payload(db_path, "consent", a), _raw_payload(db_path, "consent", b)
    _write(db_path, ("UPDATE consent SET payload = ? WHERE pseudonym = ?", (pb, a)),
           ("UPDATE consent SET payload = ? WHERE pseudonym = ?", (pa, b)))

    # Execute
    with pytest.raises(ConfigError) as state_error:
        store.consent_state(PURPOSE, at(1))
    with pytest.raises(ConfigError) as history_error:
        store.consent_history(a)

    # Assert
    for error in (state_error, history_error):
        assert "fails authentication" in str(error.value)
        assert "tampered with or the key is wrong" in str(error.value)


def test_moving_a_record_to_another_purpose_fails_authentication(
    store: SiteStore, db_path: Path, key: SiteKey
) -> None:
    # Prepare
    p = key.pseudonym("CUST-A")
    store.grant(p, purpose="analytics", at=at(0), source="crm")
    _write(db_path, ("UPDATE consent SET purpose = ?", (PURPOSE,)))

    # Execute
    with pytest.raises(ConfigError) as info:
        store.consent_state(PURPOSE, at(1))

    # Assert
    assert "fails authentication" in str(info.value)


def test_swapping_assignments_fails_authentication(
    store: SiteStore, db_path: Path, key: SiteKey
) -> None:
    # Prepare
    a, b = key.pseudonymise(["CUST-A", "CUST-B"])
    store.replace_assignments([a, b], [0, 1], ["low", "high"], model_sha256=SHA, at=at(0))
    pa, pb = _raw_payload(db_path, "assignments", a), _raw_payload(db_path, "assignments", b)
    _write(db_path, ("UPDATE assignments SET payload = ? WHERE pseudonym = ?", (pb, a)),
           ("UPDATE assignments SET payload = ? WHERE pseudonym = ?", (pa, b)))

    # Execute
    with pytest.raises(ConfigError) as info:
        store.assignment(a)

    # Assert
    assert "row assignments id=" in str(info.value)
    assert "fails authentication" in str(info.value)


# -- consent semantics ---------------------------------------------------------------------


def test_consent_state_before_at_and_after_grant_and_withdrawal(
    store: SiteStore, key: SiteKey
) -> None:
    # Prepare: a grants at day 1 and withdraws at day 3; b only grants at day 2.
    a, b = key.pseudonymise(["CUST-A", "CUST-B"])
    store.grant(a, purpose=PURPOSE, at=at(1), source="crm")
    store.grant(b, purpose=PURPOSE, at=at(2), source="crm")
    store.withdraw(a, purpose=PURPOSE, at=at(3), source="web")

    # Execute
    states = {day: store.consent_state(PURPOSE, at(day)) for day in (0, 1, 2.5, 3, 4)}

    # Assert
    assert states[0] == (set(), set())
    assert states[1] == ({a}, set())  # granted_at <= at
    assert states[2.5] == ({a, b}, set())
    assert states[3] == ({b}, {a})  # withdrawn_at <= at: no longer active
    assert states[4] == ({b}, {a})
    assert store.consent_state("other-purpose", at(4)) == (set(), set())


def test_grant_and_withdraw_report_whether_they_changed_anything(
    store: SiteStore, key: SiteKey
) -> None:
    # Prepare
    p = key.pseudonym("CUST-A")

    # Execute
    results = [
        store.grant(p, purpose=PURPOSE, at=at(0), source="crm"),
        store.grant(p, purpose=PURPOSE, at=at(1), source="crm"),  # already active
        store.withdraw(p, purpose=PURPOSE, at=at(2), source="web"),
        store.withdraw(p, purpose=PURPOSE, at=at(3), source="web"),  # already withdrawn
        store.grant(p, purpose=PURPOSE, at=at(4), source="crm"),  # consents again
    ]

    # Assert
    assert results == [True, False, True, False, True]
    history = store.consent_history(p)
    assert [(h["granted_at"][:10], (h["withdrawn_at"] or "")[:10]) for h in history] == [
        ("2024-03-01", "2024-03-03"), ("2024-03-05", ""),
    ]
    assert history[0]["withdrawal_source"] == "web"
    assert store.consent_state(PURPOSE, at(3)) == (set(), {p})
    assert store.consent_state(PURPOSE, at(5)) == ({p}, set())


def test_a_withdrawal_before_any_grant_is_honoured(store: SiteStore, key: SiteKey) -> None:
    # Prepare: withdrawal at day 5 is recorded before a grant dated day 3 arrives.
    p = key.pseudonym("CUST-A")
    store.withdraw(p, purpose=PURPOSE, at=at(5), source="web")

    # Execute
    added = store.grant(p, purpose=PURPOSE, at=at(3), source="late-crm-export")

    # Assert
    assert added is True
    assert store.consent_history(p)[0]["granted_at"] is None
    assert store.consent_state(PURPOSE, at(4)) == ({p}, set())
    assert store.consent_state(PURPOSE, at(6)) == (set(), {p})


def test_timestamps_must_be_timezone_aware_and_are_stored_in_utc(
    store: SiteStore, key: SiteKey
) -> None:
    # Prepare
    p = key.pseudonym("CUST-A")
    paris = timezone(timedelta(hours=2))

    # Execute
    with pytest.raises(ValueError, match="timezone-aware"):
        store.grant(p, purpose=PURPOSE, at=datetime(2024, 1, 1), source="crm")
    with pytest.raises(ValueError, match="timezone-aware"):
        store.consent_state(PURPOSE, datetime(2024, 1, 1))
    store.grant(p, purpose=PURPOSE, at=datetime(2024, 1, 1, 14, tzinfo=paris), source="crm")

    # Assert
    assert store.consent_history(p)[0]["granted_at"] == "2024-01-01T12:00:00.000000+00:00"


def test_raw_ids_and_free_text_purposes_are_refused(store: SiteStore) -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="64 lowercase hex"):
        store.grant("CUST-0001", purpose=PURPOSE, at=at(0), source="crm")
    with pytest.raises(ValueError, match="public name"):
        store.grant("a" * 64, purpose="email alice@example.com", at=at(0), source="crm")
    assert store.counts()["consent"] == 0


def test_import_consents_20000_records(store: SiteStore, key: SiteKey) -> None:
    # Prepare: every 4th subject withdrew at day 2; subject 0 has a second, later grant.
    ps = key.pseudonymise([f"CUST-{i}" for i in range(20_000)])
    records = [(p, at(1), at(2) if i % 4 == 0 else None, "crm") for i, p in enumerate(ps)]
    records.append((ps[0], at(3), None, "crm-2"))

    # Execute
    inserted = store.import_consents(iter(records), purpose=PURPOSE)

    # Assert
    active, withdrawn = store.consent_state(PURPOSE, at(2.5))
    assert inserted == 20_001
    assert store.counts()["consent"] == 20_001
    assert len(active) == 15_000 and len(withdrawn) == 5_000
    assert ps[1] in active and ps[4] in withdrawn
    assert [h["source"] for h in store.consent_history(ps[0])] == ["crm", "crm-2"]
    assert ps[0] in store.consent_state(PURPOSE, at(4))[0]


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        (("raw-id", T0, None, "crm"), r"record\[1\]"),
        (("p", T0, T0 - timedelta(days=1), "crm"), "is before granted_at"),
        (("p", None, None, "crm"), "both None"),
        (("p", datetime(2024, 1, 1), None, "crm"), "timezone-aware"),
        (("p", T0, None, 7), "source must be str"),
    ],
)
def test_import_names_the_bad_record_and_writes_nothing(
    store: SiteStore, key: SiteKey, record: tuple, expected: str
) -> None:
    # Prepare
    good = key.pseudonym("CUST-0")
    bad = (key.pseudonym("CUST-1") if record[0] == "p" else record[0], *record[1:])

    # Execute
    with pytest.raises(ValueError, match=expected):
        store.import_consents([(good, T0, None, "crm"), bad], purpose=PURPOSE)

    # Assert
    assert store.counts()["consent"] == 0


# -- erasure -------------------------------------------------------------------------------


def test_erase_removes_consent_and_assignment_and_logs_it(store: SiteStore, key: SiteKey) -> None:
    # Prepare
    a, b = key.pseudonymise(["CUST-A", "CUST-B"])
    store.grant(a, purpose=PURPOSE, at=at(0), source="crm")
    store.withdraw(a, purpose="marketing", at=at(0), source="crm")
    store.grant(b, purpose=PURPOSE, at=at(0), source="crm")
    store.replace_assignments([a, b], [0, 1], ["low", "high"], model_sha256=SHA, at=at(1))

    # Execute
    counts = store.erase(a, at=at(2), reason="art. 17 request 42")

    # Assert
    assert counts == {"consent": 2, "assignments": 1}
    assert store.consent_history(a) == [] and store.assignment(a) is None
    assert store.erased() == {a}
    assert store.erasure(a) == {"erased_at": "2024-03-03T12:00:00.000000+00:00",
                                "reason": "art. 17 request 42"}
    assert store.erasure(b) is None
    assert store.consent_state(PURPOSE, at(3)) == ({b}, set())
    assert store.assignment(b) is not None


def test_erasing_again_deletes_new_rows_and_keeps_the_first_record(
    store: SiteStore, key: SiteKey
) -> None:
    # Prepare
    p = key.pseudonym("CUST-A")
    store.erase(p, at=at(0), reason="first")
    store.grant(p, purpose=PURPOSE, at=at(1), source="re-import")

    # Execute
    counts = store.erase(p, at=at(2), reason="second")

    # Assert
    assert counts == {"consent": 1, "assignments": 0}
    assert store.erasure(p) == {"erased_at": "2024-03-01T12:00:00.000000+00:00",
                                "reason": "first"}
    assert store.counts()["erasures"] == 1


# -- assignments ---------------------------------------------------------------------------


def test_replace_assignments_replaces_everything_and_iterates_in_pages(
    store: SiteStore, key: SiteKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    monkeypatch.setattr(site_store, "CHUNK_ROWS", 3)
    ps = key.pseudonymise([f"CUST-{i}" for i in range(10)])
    store.replace_assignments(ps, [9] * 10, ["old"] * 10, model_sha256=SHA, at=at(0))

    # Execute
    written = store.replace_assignments(
        ps[:7], list(range(7)), [f"seg-{i}" for i in range(7)], model_sha256="cd" * 32, at=at(1)
    )

    # Assert
    listed = dict(store.iter_assignments())
    assert written == 7 and store.count_assignments() == 7
    assert set(listed) == set(ps[:7])
    assert listed[ps[3]] == {"segment_id": 3, "segment_name": "seg-3", "model_sha256": "cd" * 32,
                             "assigned_at": "2024-03-02T12:00:00.000000+00:00"}
    assert store.assignment(ps[8]) is None


def test_clear_assignment_removes_only_that_subject(store: SiteStore, key: SiteKey) -> None:
    # Prepare
    a, b = key.pseudonymise(["CUST-A", "CUST-B"])
    store.replace_assignments([a, b], [0, 1], ["low", "high"], model_sha256=SHA, at=at(0))

    # Execute
    removed = [store.clear_assignment(a), store.clear_assignment(a)]

    # Assert
    assert removed == [True, False]
    assert store.assignment(a) is None and store.assignment(b) is not None


@pytest.mark.parametrize(
    ("ids", "names", "sha", "expected"),
    [
        ([0, 1], ["a"], SHA, "same length"),
        ([0, 1.5], ["a", "b"], SHA, r"segment_ids\[1\] must be an integer"),
        ([0, 1], ["a", "b"], "not-a-sha", "model_sha256"),
    ],
)
def test_replace_assignments_refuses_bad_input_and_keeps_the_old_rows(
    store: SiteStore, key: SiteKey, ids: list, names: list, sha: str, expected: str
) -> None:
    # Prepare
    ps = key.pseudonymise(["CUST-A", "CUST-B"])
    store.replace_assignments(ps, [5, 5], ["kept", "kept"], model_sha256=SHA, at=at(0))

    # Execute
    with pytest.raises(ValueError, match=expected):
        store.replace_assignments(ps, ids, names, model_sha256=sha, at=at(1))

    # Assert
    assert store.assignment(ps[0])["segment_name"] == "kept"  # type: ignore[index]


def test_replace_assignments_names_a_repeated_subject(store: SiteStore, key: SiteKey) -> None:
    # Prepare
    a, b = key.pseudonymise(["CUST-A", "CUST-B"])

    # Execute
    with pytest.raises(ValueError, match=r"pseudonyms\[2\] repeats pseudonyms\[0\]"):
        store.replace_assignments([a, b, a], [0, 1, 2], ["x"] * 3, model_sha256=SHA, at=at(0))

    # Assert
    assert store.count_assignments() == 0


# -- meta and describe ---------------------------------------------------------------------


def test_meta_upserts_and_protects_the_key_id(store: SiteStore, key: SiteKey) -> None:
    # Execute
    store.set_meta("model_sha256", "one")
    store.set_meta("model_sha256", "two")

    # Assert
    assert store.get_meta("model_sha256") == "two"
    assert store.get_meta("missing") is None
    assert store.get_meta("key_id") == key.key_id
    with pytest.raises(ValueError, match="reserved"):
        store.set_meta("key_id", "0" * 16)


def test_describe_masks_the_url_and_shows_counts_not_data(
    store: SiteStore, key: SiteKey
) -> None:
    # Prepare
    store.grant(key.pseudonym("CUST-A"), purpose=PURPOSE, at=at(0), source="crm")

    # Execute
    described = store.describe()

    # Assert
    assert described["key_id"] == key.key_id
    assert described["tables"]["consent"] == 1
    assert described["encryption"] == "AES-256-GCM, key HKDF-SHA256 from the site key"
    assert 0 <= described["key_age_days"] < 1
    assert key.pseudonym("CUST-A") not in json.dumps(described)


# -- rekey ---------------------------------------------------------------------------------


def test_rekey_maps_pseudonyms_and_reencrypts_under_the_new_key(
    db_path: Path, key: SiteKey, tmp_path: Path
) -> None:
    # Prepare: A and B are in the source; C (erased) is not, so it cannot be mapped.
    new_key = generate_key_file(tmp_path / "new.key")
    raw = ["CUST-A", "CUST-B", "CUST-C"]
    old_ps, new_ps = key.pseudonymise(raw), new_key.pseudonymise(raw)
    with SiteStore(f"sqlite:///{db_path}", key) as store:
        store.grant(old_ps[0], purpose=PURPOSE, at=at(0), source="crm")
        store.withdraw(old_ps[0], purpose=PURPOSE, at=at(1), source="web")
        store.grant(old_ps[1], purpose=PURPOSE, at=at(0), source="crm")
        store.replace_assignments(old_ps[:2], [0, 1], ["low", "high"], model_sha256=SHA,
                                  at=at(2))
        store.erase(old_ps[2], at=at(3), reason="art. 17")

        # Execute
        result = store.rekey(new_key, {old_ps[0]: new_ps[0], old_ps[1]: new_ps[1]})
        state_after = store.consent_state(PURPOSE, at(2))

    # Assert
    assert result == {"consent": 2, "erasures": 1, "assignments": 2, "unmapped": 1,
                      "unmapped_subjects": 1}
    assert state_after == ({new_ps[1]}, {new_ps[0]})
    with pytest.raises(ConfigError, match="was created with key"):
        SiteStore(f"sqlite:///{db_path}", key)
    with SiteStore(f"sqlite:///{db_path}", new_key) as reopened:
        assert reopened.assignment(new_ps[1])["segment_name"] == "high"  # type: ignore[index]
        assert reopened.assignment(old_ps[1]) is None
        assert reopened.erased() == {old_ps[2]}
        assert reopened.consent_history(new_ps[0])[0]["withdrawal_source"] == "web"
    payload = _raw_payload(db_path, "assignments", new_ps[1])
    aad = f"assignments|{new_ps[1]}".encode()
    assert json.loads(new_key.aead().decrypt(payload[:12], payload[12:], aad))["segment_id"] == 1
    with pytest.raises(InvalidTag):
        key.aead().decrypt(payload[:12], payload[12:], aad)


def test_rekey_refuses_a_mapping_that_merges_subjects(
    store: SiteStore, key: SiteKey, tmp_path: Path
) -> None:
    # Prepare
    new_key = generate_key_file(tmp_path / "new.key")
    a, b = key.pseudonymise(["CUST-A", "CUST-B"])
    store.grant(a, purpose=PURPOSE, at=at(0), source="crm")

    # Execute
    with pytest.raises(ValueError, match="injective"):
        store.rekey(new_key, {a: "f" * 64, b: "f" * 64})

    # Assert
    assert store.get_meta("key_id") == key.key_id
    assert store.consent_state(PURPOSE, at(1)) == ({a}, set())


# -- PostgreSQL (a real server, started by the fixture) ------------------------------------


@pytest.mark.integration
def test_round_trip_on_postgresql(key: SiteKey, tmp_path: Path, postgres_server: Any) -> None:
    # Prepare
    url = postgres_server.new_database("store_round_trip")
    engine = create_engine(url)
    with engine.begin() as conn:
        for table in ("consent", "erasures", "assignments", "meta"):
            conn.execute(text(f"DROP TABLE IF EXISTS {table}"))
    engine.dispose()
    ps = key.pseudonymise([f"CUST-{i}" for i in range(1_000)])
    new_key = generate_key_file(tmp_path / "new.key")
    new_ps = new_key.pseudonymise([f"CUST-{i}" for i in range(1_000)])

    # Execute
    with SiteStore(url, key) as store:
        store.import_consents([(p, at(0), None, "crm") for p in ps], purpose=PURPOSE)
        store.withdraw(ps[0], purpose=PURPOSE, at=at(1), source="web")
        store.replace_assignments(ps, [i % 3 for i in range(1_000)], ["s"] * 1_000,
                                  model_sha256=SHA, at=at(1))
        store.erase(ps[1], at=at(2), reason="art. 17")
        store.set_meta("model", "m1")
        store.set_meta("model", "m2")
        rekeyed = store.rekey(new_key, dict(zip(ps, new_ps, strict=True)))
        active, withdrawn = store.consent_state(PURPOSE, at(3))
        counts = store.counts()
        first = store.assignment(new_ps[2])

    # Assert
    assert rekeyed["unmapped"] == 0
    assert len(active) == 998 and withdrawn == {new_ps[0]}
    # meta: key_id, model, consent_version
    assert counts == {"consent": 999, "erasures": 1, "assignments": 999, "meta": 3}
    assert first is not None and first["segment_id"] == 2


def test_consent_state_cache_sees_writes_from_another_store_instance(
        key: SiteKey, tmp_path: Path) -> None:
    # Prepare: two handles on one file, as a running site and the site CLI
    url = f"sqlite:///{tmp_path / 'store.sqlite'}"
    a, b = key.pseudonymise(["A", "B"])
    with SiteStore(url, key) as running, SiteStore(url, key) as cli:
        running.import_consents([(a, at(0), None, "crm"), (b, at(0), None, "crm")],
                                purpose=PURPOSE)
        first = running.consent_state(PURPOSE, at(5))
        again = running.consent_state(PURPOSE, at(6))  # served from the cache
        # Execute
        cli.withdraw(a, purpose=PURPOSE, at=at(7), source="web")
        after = running.consent_state(PURPOSE, at(8))
        before_withdrawal = running.consent_state(PURPOSE, at(6))
    # Assert
    assert first == again == ({a, b}, set())
    assert after == ({b}, {a})
    assert before_withdrawal == ({a, b}, set())
