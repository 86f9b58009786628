"""The fast ``.npy`` reader gives exactly ``np.load``'s array, and numpy's errors otherwise."""

from __future__ import annotations

import io

import numpy as np
import pytest
from flwr.common import ndarray_to_bytes
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from common.npy import bytes_to_ndarray

DTYPES = st.sampled_from(["<i8", "<u8", "<i4", "<f8", "<f4", "|u1", "|i1", ">i8", "<f2",
                          "?", "<c16", "<M8[s]", "<U3"])


def _np_load(blob: bytes) -> np.ndarray:
    return np.load(io.BytesIO(blob), allow_pickle=False)


@settings(max_examples=300, deadline=None)
@given(hnp.arrays(DTYPES, hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5)),
       st.booleans())
def test_same_array_as_np_load(array, fortran):
    if fortran:
        array = np.asfortranarray(array)
    blob = ndarray_to_bytes(array)
    ours, numpys = bytes_to_ndarray(blob), _np_load(blob)
    assert ours.dtype == numpys.dtype and ours.shape == numpys.shape
    np.testing.assert_array_equal(ours, numpys)
    assert ours.flags.writeable  # as np.load's


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 3))
def test_bad_bytes_get_numpys_own_error(noise, cut):
    good = ndarray_to_bytes(np.arange(12, dtype=np.int64).reshape(3, 4))
    for blob in (noise, good[:len(good) - cut] + noise, good[:10 + cut] + noise):
        try:
            expected = _np_load(blob)
        except Exception as exc:  # whatever numpy raises, ours must raise too
            with pytest.raises(type(exc)):
                bytes_to_ndarray(blob)
        else:
            np.testing.assert_array_equal(bytes_to_ndarray(blob), expected)


def test_never_unpickles():
    blob = io.BytesIO()
    np.save(blob, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="allow_pickle"):
        bytes_to_ndarray(blob.getvalue())


def test_a_masked_vector_is_read_without_np_load(monkeypatch):
    blob = ndarray_to_bytes(np.arange(54, dtype=np.int64).reshape(6, 9))
    monkeypatch.setattr(np, "load", lambda *a, **k: pytest.fail("np.load was called"))
    np.testing.assert_array_equal(bytes_to_ndarray(blob), np.arange(54).reshape(6, 9))
