"""Full-strength SecAgg+ masks replace Flower's 32-bit-seeded generator on both sides."""

from __future__ import annotations

import importlib
import os
import types

import numpy as np
import pytest
from scipy.stats import chisquare

from common import mask_prg
from common.errors import ConfigError

UTILS = importlib.import_module("flwr.common.secure_aggregation.secaggplus_utils")


def _fold_collision() -> tuple[bytes, bytes]:
    """Two different 32-byte keys whose 32-bit XOR folds are equal (words swapped)."""
    key = os.urandom(32)
    swapped = key[4:8] + key[0:4] + key[8:]
    assert key != swapped
    return key, swapped


def test_client_and_server_modules_use_the_keystream_generator():
    import client.app
    import server.app

    assert mask_prg.is_installed(*client.app.SECAGG_MODULES)
    assert mask_prg.is_installed(*server.app.SECAGG_MODULES)
    mod = importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")
    workflow = importlib.import_module(
        "flwr.server.workflow.secure_aggregation.secaggplus_workflow")
    assert mod.pseudo_rand_gen is mask_prg.keystream_masks
    assert workflow.pseudo_rand_gen is mask_prg.keystream_masks


def test_keys_colliding_under_flowers_fold_give_independent_masks():
    import server.app  # noqa: F401  (installs the generator)

    a, b = _fold_collision()
    shapes = [(1,), (4, 1000)]
    original = mask_prg._REPLACED[UTILS.__name__]
    weak_a, weak_b = original(a, 2**32, shapes), original(b, 2**32, shapes)
    assert all(np.array_equal(x, y) for x, y in zip(weak_a, weak_b, strict=True))
    strong_a = mask_prg.keystream_masks(a, 2**32, shapes)
    strong_b = mask_prg.keystream_masks(b, 2**32, shapes)
    equal = np.mean(strong_a[1] == strong_b[1])
    assert equal < 1e-3  # independent uniform 32-bit words almost never coincide
    # Deterministic for one key: both ends of a pairwise mask derive the same values.
    again = mask_prg.keystream_masks(a, 2**32, shapes)
    assert all(np.array_equal(x, y) for x, y in zip(strong_a, again, strict=True))


@pytest.mark.parametrize("num_range", [2**32, 2**20, 1000])
def test_masks_are_uniform(num_range):
    (masks,) = mask_prg.keystream_masks(os.urandom(32), num_range, [(200_000,)])
    assert masks.min() >= 0 and masks.max() < num_range and masks.dtype == np.int64
    bins = 1000 if num_range == 1000 else 64  # equal-width bins: each holds num_range/bins values
    counts = np.bincount((masks * bins // num_range).astype(int), minlength=bins)
    assert counts.size == bins
    assert chisquare(counts).pvalue > 1e-4


def test_shapes_match_flowers_contract():
    out = mask_prg.keystream_masks(b"k" * 44, 2**32, [(), (2, 3), (5,)])
    assert [o.shape for o in out] == [(), (2, 3), (5,)]
    assert all(o.dtype == np.int64 for o in out)


def test_bad_range_is_refused():
    with pytest.raises(ConfigError, match="num_range"):
        mask_prg.keystream_masks(b"k" * 32, 2**33, [(3,)])


def test_install_refuses_a_module_without_the_function():
    stranger = types.ModuleType("flwr_from_the_future")
    with pytest.raises(RuntimeError, match=r"flwr==1\.42\.0"):
        mask_prg.install(stranger)


@pytest.mark.parametrize("num_range", [2, 2**16, 2**31, 2**32])
def test_power_of_two_masks_are_the_keystream_words_modulo_the_range(num_range):
    import hashlib

    seed = b"pairwise key of two sites" * 2
    masks = mask_prg.keystream_masks(seed, num_range, [(1,), (7, 3), ()])
    words = mask_prg._keystream_words(hashlib.sha256(seed).digest(), 1 + 21 + 1).astype(np.int64)
    expected = words % num_range
    got = np.concatenate([m.ravel() for m in masks])
    np.testing.assert_array_equal(got, expected)
    assert all(m.dtype == np.int64 for m in masks)
