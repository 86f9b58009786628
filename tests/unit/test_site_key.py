"""The site key file: permissions, no overwrite, stable fingerprint, pseudonyms, subkeys."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import stat
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import given, settings
from hypothesis import strategies as st

from client.site_key import KEY_FORMAT, SiteKey, generate_key_file
from common.errors import ConfigError

_NOW = datetime(2024, 1, 1, tzinfo=UTC)


def _master(path: Path) -> bytes:
    return base64.b64decode(json.loads(path.read_text())["key"])


def _hkdf(master: bytes, info: bytes, length: int = 32) -> bytes:
    return HKDF(algorithm=SHA256(), length=length, salt=None, info=info).derive(master)


@pytest.fixture
def key_path(tmp_path: Path) -> Path:
    return tmp_path / "secrets" / "site.key"


def test_generate_writes_owner_only_json_with_32_random_bytes(key_path: Path) -> None:
    # Execute
    key = generate_key_file(key_path)

    # Assert
    doc = json.loads(key_path.read_text())
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert doc["format"] == KEY_FORMAT
    assert len(base64.b64decode(doc["key"])) == 32
    assert key.path == key_path
    assert key.created_at.utcoffset() is not None


def test_generate_refuses_to_overwrite_without_force(key_path: Path) -> None:
    # Prepare
    generate_key_file(key_path)
    before = key_path.read_bytes()

    # Execute
    with pytest.raises(ConfigError) as info:
        generate_key_file(key_path)

    # Assert
    assert str(key_path) in str(info.value)
    assert "--force" in str(info.value)
    assert key_path.read_bytes() == before


def test_generate_with_force_replaces_atomically_owner_only(key_path: Path) -> None:
    # Prepare
    old = generate_key_file(key_path)

    # Execute
    new = generate_key_file(key_path, force=True)

    # Assert
    assert new.key_id != old.key_id
    assert SiteKey.load(key_path).key_id == new.key_id
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert sorted(p.name for p in key_path.parent.iterdir()) == [key_path.name]


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620])
def test_load_refuses_a_key_group_or_others_can_access(key_path: Path, mode: int) -> None:
    # Prepare
    generate_key_file(key_path)
    os.chmod(key_path, mode)

    # Execute
    with pytest.raises(ConfigError) as info:
        SiteKey.load(key_path)

    # Assert
    message = str(info.value)
    assert str(key_path) in message
    assert oct(mode) in message
    assert f"chmod 600 {key_path}" in message


def test_load_accepts_owner_read_only(key_path: Path) -> None:
    # Prepare
    key = generate_key_file(key_path)
    os.chmod(key_path, 0o400)

    # Execute
    loaded = SiteKey.load(key_path)

    # Assert
    assert loaded.key_id == key.key_id


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("{not json", "not readable JSON"),
        (json.dumps({"format": "other/9", "key": "", "created_at": ""}), "format 'other/9'"),
        (
            json.dumps({"format": KEY_FORMAT, "key": base64.b64encode(b"x" * 16).decode(),
                        "created_at": "2024-01-01T00:00:00+00:00"}),
            "base64 of 32 bytes",
        ),
        (
            json.dumps({"format": KEY_FORMAT, "key": "%%%not-base64%%%",
                        "created_at": "2024-01-01T00:00:00+00:00"}),
            "base64 of 32 bytes",
        ),
        (
            json.dumps({"format": KEY_FORMAT, "key": base64.b64encode(b"k" * 32).decode(),
                        "created_at": "2024-01-01T00:00:00"}),
            "UTC offset",
        ),
    ],
)
def test_load_names_the_file_and_what_was_expected(
    key_path: Path, content: str, expected: str
) -> None:
    # Prepare
    key_path.parent.mkdir(parents=True)
    key_path.write_text(content)
    os.chmod(key_path, 0o600)

    # Execute
    with pytest.raises(ConfigError) as info:
        SiteKey.load(key_path)

    # Assert
    assert str(key_path) in str(info.value)
    assert expected in str(info.value)
    assert base64.b64encode(b"k" * 32).decode() not in str(info.value)


def test_load_of_a_missing_file_names_it(key_path: Path) -> None:
    # Execute
    with pytest.raises(ConfigError) as info:
        SiteKey.load(key_path)

    # Assert
    assert str(key_path) in str(info.value)
    assert "does not exist" in str(info.value)


def test_repr_and_str_never_show_key_bytes(key_path: Path) -> None:
    # Prepare
    key = generate_key_file(key_path)
    master = _master(key_path)

    # Execute
    shown = repr(key) + str(key)

    # Assert
    assert base64.b64encode(master).decode() not in shown
    assert master.hex() not in shown
    assert repr(master)[2:-1] not in shown
    assert key.key_id in shown


def test_key_id_is_stable_hkdf_fingerprint_not_a_hash_of_the_key(key_path: Path) -> None:
    # Prepare
    key = generate_key_file(key_path)
    master = _master(key_path)

    # Execute
    first, second = SiteKey.load(key_path), SiteKey.load(key_path)

    # Assert
    assert first.key_id == second.key_id == key.key_id
    assert key.key_id == _hkdf(master, b"fedseg key id", 8).hex()
    assert len(key.key_id) == 16
    assert key.key_id not in hashlib.sha256(master).hexdigest()


def test_key_ids_differ_between_keys(tmp_path: Path) -> None:
    # Execute
    a = generate_key_file(tmp_path / "a.key")
    b = generate_key_file(tmp_path / "b.key")

    # Assert
    assert a.key_id != b.key_id
    assert a != b


def test_pseudonym_is_hmac_sha256_under_the_hkdf_pseudonym_subkey(key_path: Path) -> None:
    # Prepare
    key = generate_key_file(key_path)
    subkey = _hkdf(_master(key_path), b"fedseg pseudonym v1")

    # Execute
    pseudonym = key.pseudonym("CUST-0001")

    # Assert
    assert pseudonym == hmac.new(subkey, b"CUST-0001", hashlib.sha256).hexdigest()
    assert pseudonym != hmac.new(_master(key_path), b"CUST-0001", hashlib.sha256).hexdigest()


def test_pseudonyms_are_deterministic_per_key_and_differ_across_keys(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "a.key"
    a = generate_key_file(path)
    b = generate_key_file(tmp_path / "b.key")
    ids = ["CUST-1", "CUST-2", "ünïcødé-3"]

    # Execute
    first = a.pseudonymise(ids)
    again = SiteKey.load(path).pseudonymise(ids)
    other = b.pseudonymise(ids)

    # Assert
    assert first == again
    assert len(set(first)) == 3
    assert not set(first) & set(other)


@settings(max_examples=50, deadline=None)
@given(ids=st.lists(st.text(max_size=40), max_size=20))
def test_pseudonymise_equals_pseudonym_per_id(ids: list[str]) -> None:
    # Prepare
    key = SiteKey(path=Path("mem.key"), created_at=_NOW, _master=b"\x07" * 32)

    # Execute
    batch = key.pseudonymise(iter(ids))

    # Assert
    assert batch == [key.pseudonym(i) for i in ids]


def test_pseudonymise_names_the_first_id_that_is_not_a_string(key_path: Path) -> None:
    # Prepare
    key = generate_key_file(key_path)

    # Execute
    with pytest.raises(TypeError) as info:
        key.pseudonymise(["a", "b", 3, "d"])  # type: ignore[list-item]

    # Assert
    assert "ids[2]" in str(info.value)


def test_subkeys_are_distinct_per_label_and_aead_round_trips(key_path: Path) -> None:
    # Prepare
    key = generate_key_file(key_path)
    nonce = b"\x00" * 12

    # Execute
    labels = ["fedseg store v1", "fedseg pseudonym v1", "fedseg key id", "other"]
    subkeys = {label: key.derive(label) for label in labels}
    sealed = key.aead().encrypt(nonce, b"payload", b"aad")

    # Assert
    assert len(set(subkeys.values())) == len(labels)
    assert subkeys["fedseg store v1"] == _hkdf(_master(key_path), b"fedseg store v1")
    assert key.aead("store").decrypt(nonce, sealed, b"aad") == b"payload"
    assert key.aead("store") is key.aead()
