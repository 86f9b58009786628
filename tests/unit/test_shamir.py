"""Shamir secret sharing over GF(2**521 - 1): any threshold shares rebuild, fewer do not."""

from __future__ import annotations

import itertools
import os
import random

import pytest

from common import shamir


@pytest.mark.parametrize("length", [0, 1, 31, 32, 63, 64, 65, 128, 241])
@pytest.mark.parametrize(("threshold", "num"), [(1, 1), (2, 3), (5, 5), (19, 27)])
def test_any_threshold_shares_rebuild_the_secret(length, threshold, num):
    rng = random.Random(length * 1000 + num)
    secret = os.urandom(length)
    shares = shamir.create_shares(secret, threshold, num)
    assert len(shares) == num
    assert len({len(s) for s in shares}) == 1
    for _ in range(5):
        subset = rng.sample(shares, rng.randint(threshold, num))
        assert shamir.combine_shares(subset) == secret


def test_fewer_than_threshold_shares_do_not_rebuild_it():
    secret = os.urandom(32)
    shares = shamir.create_shares(secret, 6, 9)
    for subset in itertools.combinations(shares, 5):
        try:
            rebuilt = shamir.combine_shares(list(subset))
        except ValueError:
            continue
        assert rebuilt != secret


def test_threshold_minus_one_shares_are_independent_of_the_secret():
    # With t - 1 shares fixed, every secret is consistent with them: interpolating the t - 1
    # shares together with (0, s') gives a valid degree t - 1 polynomial for any s'.
    secret, other = b"\x01" * 32, b"\xfe" * 32
    shares = shamir.create_shares(secret, 3, 5)
    pad = shamir.CHUNK_BYTES - len(other)
    other_value = int.from_bytes(other + bytes([pad]) * pad, "big")
    xs = [int.from_bytes(s[:4], "little") for s in shares[:2]]
    ys = [int.from_bytes(s[4:4 + shamir.VALUE_BYTES], "big") for s in shares[:2]]
    # The polynomial through (0, other_value), (x1, y1), (x2, y2) gives shares 3..5 that
    # combine, with shares 1 and 2, to `other`.
    points = [(0, other_value), *zip(xs, ys, strict=True)]

    def value_at(x: int) -> int:
        total = 0
        for i, (xi, yi) in enumerate(points):
            num, den = 1, 1
            for j, (xj, _) in enumerate(points):
                if j != i:
                    num = num * (x - xj) % shamir.PRIME
                    den = den * (xi - xj) % shamir.PRIME
            total += yi * num * pow(den, -1, shamir.PRIME)
        return total % shamir.PRIME

    forged = [x.to_bytes(4, "little") + value_at(x).to_bytes(shamir.VALUE_BYTES, "big")
              for x in (3, 4, 5)]
    assert shamir.combine_shares([*shares[:2], forged[0]]) == other
    assert shamir.combine_shares(shares[:3]) == secret


def test_shares_differ_between_splits_of_the_same_secret():
    secret = os.urandom(32)
    first = shamir.create_shares(secret, 3, 4)
    second = shamir.create_shares(secret, 3, 4)
    assert all(a[4:] != b[4:] for a, b in zip(first, second, strict=True))


def test_malformed_share_lists_raise_value_error():
    shares = shamir.create_shares(b"seed" * 8, 2, 3)
    too_big = shares[0][:4] + (shamir.PRIME + 1).to_bytes(shamir.VALUE_BYTES, "big")
    cases = {
        "no shares": [],
        "different lengths": [shares[0], shares[1] + b"\0"],
        "repeated index": [shares[0], shares[0]],
        "zero index": [bytes(4) + shares[0][4:], shares[1]],
        "truncated": [shares[0][:-1], shares[1][:-1]],
        "value outside the field": [too_big, shares[1]],
        "pycryptodome share": [bytes(4) + bytes(16), (2).to_bytes(4, "little") + bytes(16)],
    }
    for name, share_list in cases.items():
        with pytest.raises(ValueError, match="Failed to combine shares"):
            shamir.combine_shares(share_list)
            pytest.fail(f"{name}: combined without an error")


def test_split_refuses_impossible_thresholds():
    for threshold, num in [(0, 3), (4, 3), (1, 0)]:
        with pytest.raises(ValueError, match="threshold"):
            shamir.create_shares(b"x", threshold, num)


def test_cached_weights_serve_every_order_of_the_same_indices():
    # The server combines many secrets over the same index set; the weights are cached by the
    # set, so each order of the shares must still get the weight of its own index.
    rng = random.Random(7)
    secrets_ = [os.urandom(32) for _ in range(6)]
    for secret in secrets_:
        shares = shamir.create_shares(secret, 4, 7)
        for _ in range(4):
            subset = rng.sample(shares[:5], 5)  # indices {1..5} in a new order each time
            assert shamir.combine_shares(subset) == secret
    assert shamir._weights_at_zero.cache_info().hits > 0
