"""Batch pseudonyms (client.pseudonyms, client/_pseudonyms.c) against Python's hmac, by property.

The C module hashes whole id columns with the GIL released; these tests hold it to the
reference (``hmac.digest`` of the id ``str.strip()``-ed as the readers do), run the Python
fallback on the same inputs, and feed it malformed Arrow buffers.
"""

from __future__ import annotations

import hmac
import shutil
import sys
import sysconfig
from itertools import pairwise
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from client import pseudonyms
from client.site_key import SiteKey, generate_key_file
from client.sources import normalise_id

KEY = bytes(range(32))
FIXTURE = [HealthCheck.function_scoped_fixture]  # the backend fixture is the same per example
# ids as sources hold them: ASCII, Unicode, every kind of surrounding whitespace, blanks
WHITESPACE = [" ", "\t", "\n", "\r", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x1f", "\x85",
              "\xa0", "\u1680", "\u2000", "\u2028", "\u2029", "\u202f", "\u205f", "\u3000"]
IDS = st.one_of(
    st.none(),
    st.text(max_size=80),
    st.builds(lambda a, b, c: a + b + c, st.text(st.sampled_from(WHITESPACE), max_size=3),
              st.text(max_size=20), st.text(st.sampled_from(WHITESPACE), max_size=3)),
    st.sampled_from(["C00000001", "", "   ", "é", " é ", "x" * 200]),
)


def _reference(ids: list[str | None]) -> tuple[list[bytes | None], list[bool]]:
    """HMAC of the normalised id (None where missing), and whether stripping changed it."""
    out: list[bytes | None] = []
    changed = []
    for raw in ids:
        text = normalise_id(raw)
        out.append(None if text is None else hmac.digest(KEY, text.encode(), "sha256"))
        changed.append(text is not None and text != raw)
    return out, changed


def _check(ids: list[str | None], d: np.ndarray, status: np.ndarray) -> None:
    expected, changed = _reference(ids)
    assert d.shape == (len(ids), 32) and status.shape == (len(ids),)
    for i, want in enumerate(expected):
        if want is None:
            assert status[i] == pseudonyms.MISSING and not d[i].any()
        else:
            assert bytes(d[i]) == want
            assert status[i] == (pseudonyms.STRIPPED if changed[i] else pseudonyms.OK)


def _can_build() -> bool:
    """Whether this machine has what `pip install` needs to build client._pseudonyms."""
    include = Path(sysconfig.get_paths()["include"]) / "Python.h"
    return shutil.which("cc") is not None and include.exists() \
        and Path("/usr/include/openssl/sha.h").exists()


def _native_or_skip() -> None:
    if pseudonyms.backend() == "native":
        return
    if _can_build():  # built wherever it can be: its absence here is a failure
        pytest.fail("client._pseudonyms was not built although a C compiler and OpenSSL are "
                    "present")
    pytest.skip("no C compiler or OpenSSL headers: client._pseudonyms cannot be built here "
                "(the Python path is tested)")


@pytest.fixture(params=["native", "python"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "python":
        monkeypatch.setattr(pseudonyms, "_native", None)
    else:
        _native_or_skip()
    return str(request.param)


def test_the_native_module_is_built_where_a_compiler_and_openssl_are() -> None:
    # `pip install -e .` builds it (pyproject.toml); without it the gate is ~12x slower to hash
    assert not _can_build() or pseudonyms.backend() == "native"


@settings(max_examples=150, deadline=None, suppress_health_check=FIXTURE)
@given(ids=st.lists(IDS, max_size=40))
def test_list_digests_equal_hmac_of_the_normalised_id(backend: str,
                                                      ids: list[str | None]) -> None:
    d, status = pseudonyms.digests(KEY, ids, strip=True)
    _check(ids, d, status)


@settings(max_examples=150, deadline=None, suppress_health_check=FIXTURE)
@given(ids=st.lists(IDS, max_size=40), cut=st.integers(0, 5), large=st.booleans(),
       chunks=st.integers(1, 3))
def test_arrow_column_digests_equal_the_list_digests(backend: str, ids: list[str | None],
                                                     cut: int, large: bool,
                                                     chunks: int) -> None:
    kind = pa.large_string() if large else pa.string()
    padded = ["pad"] * cut + ids  # a sliced array starts at a non-zero offset
    array = pa.array(padded, type=kind).slice(cut)
    bounds = np.linspace(0, len(ids), chunks + 1).astype(int)
    column = pa.chunked_array([array.slice(a, b - a) for a, b in pairwise(bounds)], type=kind)
    d, status = pseudonyms.column_digests(KEY, column)
    _check(ids, d, status)


def test_without_strip_every_str_is_hashed_as_it_is(backend: str) -> None:
    ids = ["", " a ", "\u3000b", "C1"]
    d, status = pseudonyms.digests(KEY, ids)
    assert [bytes(r) for r in d] == [hmac.digest(KEY, i.encode(), "sha256") for i in ids]
    assert not status.any()
    with pytest.raises(TypeError, match="position 1"):
        pseudonyms.digests(KEY, ["a", None])
    with pytest.raises(UnicodeEncodeError):
        pseudonyms.digests(KEY, ["\ud800"])


def test_many_ids_split_across_threads_equal_one_by_one(backend: str) -> None:
    ids = [f" C{i:07d}" if i % 3 else f"C{i:07d}" for i in range(60_000)]
    d, status = pseudonyms.digests(KEY, ids, strip=True)
    for i in (0, 1, 19_999, 20_000, 40_001, 59_999):
        assert bytes(d[i]) == hmac.digest(KEY, ids[i].strip().encode(), "sha256")
    assert int(np.count_nonzero(status == pseudonyms.STRIPPED)) == 40_000


@settings(max_examples=100, deadline=None, suppress_health_check=FIXTURE)
@given(values=st.lists(st.integers(0, 12), max_size=60),
       skip=st.lists(st.booleans(), max_size=60),
       wanted=st.sets(st.integers(0, 15), max_size=10))
def test_duplicates_and_membership_match_python_sets(backend: str, values: list[int],
                                                     skip: list[bool],
                                                     wanted: set[int]) -> None:
    ids = [f"id{v}" for v in values]
    d, _ = pseudonyms.digests(KEY, ids)
    skipped = np.array((skip + [False] * len(ids))[:len(ids)], dtype=bool)
    dup = pseudonyms.duplicate_rows(d, skipped)
    counted = [v for v, s in zip(values, skipped, strict=True) if not s]
    assert dup.tolist() == [not s and counted.count(v) > 1
                            for v, s in zip(values, skipped, strict=True)]
    hexes = pseudonyms.to_hex(d).tolist()
    wanted_hex = set(pseudonyms.to_hex(pseudonyms.digests(KEY, [f"id{v}" for v in wanted])[0])
                     .tolist())
    mask = pseudonyms.member_mask(d, pseudonyms.from_hex(wanted_hex | {"not-a-pseudonym"}))
    assert mask.tolist() == [h in wanted_hex for h in hexes]
    assert hexes == [hmac.digest(KEY, i.encode(), "sha256").hex() for i in ids]


def test_from_hex_skips_what_no_pseudonym_can_be() -> None:
    good, other = "ab" * 32, "cd" * 32
    # "00" * 31 + "  " is 64 characters that bytes.fromhex would read as 31 bytes, shifting
    # every digest after it
    out = pseudonyms.from_hex([good, good.upper(), "zz" * 32, "ab" * 31, "00" * 31 + "  ",
                               " " + "ab" * 31 + "a", "é" * 64, other, 7])  # type: ignore[list-item]
    assert [bytes(r).hex() for r in out] == [good, other]


def test_membership_is_exact_when_many_digests_share_their_first_bytes(backend: str) -> None:
    # store entries chosen to collide on any fixed bits must neither be missed nor slow to find
    rows = np.zeros((3000, 32), dtype=np.uint8)
    rows[:, 8:12] = np.arange(3000, dtype="<u4").view(np.uint8).reshape(-1, 4)
    wanted = rows[::3]
    assert pseudonyms.member_mask(rows, wanted).tolist() == [i % 3 == 0 for i in range(3000)]
    assert not pseudonyms.duplicate_rows(rows, np.zeros(3000, bool)).any()


def test_malformed_arrow_buffers_are_refused_not_read() -> None:
    _native_or_skip()
    native = pseudonyms._native
    out, status = np.empty((2, 32), np.uint8), np.empty(2, np.uint8)
    data = b"abcdef"
    for offsets in ([0, 3, 2], [0, 3, 99], [-1, 3, 6]):
        with pytest.raises(ValueError, match="offsets"):
            native.hmac_column(KEY, np.asarray(offsets, np.int32), data, 0, 2, False, out,
                               status)
    with pytest.raises(ValueError, match="shorter"):
        native.hmac_column(KEY, np.asarray([0, 3], np.int32), data, 0, 2, False, out, status)
    for start in (sys.maxsize - 1, sys.maxsize, -1):  # no overflow past the bounds check
        with pytest.raises(ValueError, match="shorter"):
            native.hmac_column(KEY, np.asarray([0, 3, 6], np.int32), data, start, 1, False,
                               out[:1], status[:1])
    with pytest.raises(ValueError, match="32 bytes per row"):
        native.hmac_column(KEY, np.asarray([0, 3, 6], np.int32), data, 0, 2, False, out[:1],
                           status)
    native.hmac_column(KEY, np.asarray([0, 3, 6], np.int64), data, 0, 2, True, out, status)
    assert bytes(out[1]) == hmac.digest(KEY, b"def", "sha256")


def test_site_key_batch_and_single_pseudonyms_agree(tmp_path: Path) -> None:
    key = generate_key_file(tmp_path / "site.key")
    assert isinstance(key, SiteKey)
    ids = ["C1", " C1", "é", ""]
    assert key.pseudonymise(ids) == [key.pseudonym(i) for i in ids]
    with pytest.raises(TypeError, match=r"ids\[1\] must be str"):
        key.pseudonymise(["C1", 2])  # type: ignore[list-item]
