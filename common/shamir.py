"""Shamir secret sharing of the SecAgg+ secrets over the prime field GF(2**521 - 1).

Every round of SecAgg+ each site splits its two mask secrets (the 32-byte seed of its self mask
and the private key of its pairwise masks) into one share per neighbour, and the server combines
one site's shares in the unmask stage. Flower 1.42 does both with pycryptodome's ``Shamir``,
which works in GF(2**128) with pure-Python field arithmetic on 16-byte chunks: at 100 sites
(27 neighbours each) splitting took about 60 % of every site's CPU in a SecAgg+ round
(docs/BENCHMARKS.md, "SecAgg+ at 100 sites").

This module replaces ``create_shares`` and ``combine_shares``, on both sides of the protocol,
with the same scheme over the Mersenne prime ``p = 2**521 - 1``, where a field multiplication is
one CPython big-integer operation:

* the secret is padded (PKCS#7 style, 1..64 bytes) to a multiple of 64 bytes, and each 64-byte
  chunk read as a big-endian integer ``s < 2**512 < p``;
* per chunk, a polynomial of degree ``threshold - 1`` with constant term ``s`` and the other
  coefficients drawn uniformly from GF(p) by :mod:`secrets`; share ``x`` (1-based) is its value
  at ``x``;
* a share is ``<4-byte little-endian x><66-byte big-endian value per chunk>`` (Flower's layout,
  wider values), so Flower's share-distribution code carries it unchanged;
* combining is Lagrange interpolation at 0 over every share given; any ``threshold`` shares
  rebuild the secret, and fewer reveal nothing about it (the standard perfect-secrecy argument
  holds in any field whose size exceeds the number of shares).

Malformed share lists (different lengths, repeated or zero indices, a chunk value outside the
field, a result that is not a padded secret) raise ``ValueError`` as Flower's function does.

:mod:`common.secagg_primitives` installs the two functions into Flower's SecAgg+ code on both
sides; :data:`SCHEME_ID` is part of the suite identifier that travels in the run plan, so a site
and a server that split and combine differently refuse each other before any share is made.
"""

from __future__ import annotations

import functools
import secrets

PRIME = 2**521 - 1
"""The field's modulus (a Mersenne prime)."""

CHUNK_BYTES = 64
"""Secret bytes per field element (``2**512 < PRIME``)."""

VALUE_BYTES = (PRIME.bit_length() + 7) // 8
"""Bytes of one share value (66)."""

INDEX_BYTES = 4
"""Bytes of a share's index, little-endian, as in Flower's layout."""

SCHEME_ID = "shamir-gf(2^521-1)/1"
"""Identifier of this secret sharing (part of :data:`common.secagg_primitives.SUITE_ID`)."""

def create_shares(secret: bytes, threshold: int, num: int) -> list[bytes]:
    """Split ``secret`` into ``num`` shares, any ``threshold`` of which rebuild it.

    Drop-in replacement for Flower's ``create_shares`` (same signature and output type).

    Parameters
    ----------
    secret : bytes
        The secret, any length (a mask seed or a serialised private key).
    threshold : int
        Shares needed to rebuild it, ``1 <= threshold <= num``.
    num : int
        Shares to make, ``1 <= num < 2**32``.

    Returns
    -------
    list of bytes
        Share ``i`` (0-based) is the polynomials' values at ``x = i + 1``.
    """
    if not 1 <= threshold <= num < 2**(8 * INDEX_BYTES):
        raise ValueError(f"Shamir split needs 1 <= threshold <= num < 2**32; got "
                         f"threshold={threshold}, num={num}.")
    pad = CHUNK_BYTES - len(secret) % CHUNK_BYTES
    padded = bytes(secret) + bytes([pad]) * pad
    shares = [bytearray(x.to_bytes(INDEX_BYTES, "little")) for x in range(1, num + 1)]
    for start in range(0, len(padded), CHUNK_BYTES):
        constant = int.from_bytes(padded[start:start + CHUNK_BYTES], "big")
        # Highest degree first, for Horner's rule.
        coefficients = [secrets.randbelow(PRIME) for _ in range(threshold - 1)] + [constant]
        for x, share in enumerate(shares, start=1):
            value = 0
            for coefficient in coefficients:
                value = (value * x + coefficient) % PRIME
            share += value.to_bytes(VALUE_BYTES, "big")
    return [bytes(share) for share in shares]


@functools.lru_cache(maxsize=256)
def _weights_at_zero(xs: tuple[int, ...]) -> dict[int, int]:
    """Lagrange weights at 0 for the sorted, distinct indices ``xs``, by index.

    Cached: in a round every site's shares come back from neighbours at the same positions, so
    the server combines a thousand secrets over a handful of index sets (at 1,000 sites the
    weights were most of the server's own CPU in the unmask stage).
    """
    weights = {}
    for i, xi in enumerate(xs):
        numerator, denominator = 1, 1
        for j, xj in enumerate(xs):
            if j != i:
                numerator = numerator * xj % PRIME
                denominator = denominator * (xj - xi) % PRIME
        weights[xi] = numerator * pow(denominator, -1, PRIME) % PRIME
    return weights


def _lagrange_at_zero(xs: list[int]) -> list[int]:
    """Weights ``w_i`` with ``f(0) = sum w_i f(x_i)`` for any polynomial of degree < len(xs)."""
    by_index = _weights_at_zero(tuple(sorted(xs)))
    return [by_index[x] for x in xs]


def combine_shares(share_list: list[bytes]) -> bytes:
    """Rebuild the secret from shares made by :func:`create_shares`.

    Drop-in replacement for Flower's ``combine_shares``. With fewer shares than the threshold
    the result is unrelated to the secret (and almost surely not a padded secret: an error).

    Raises
    ------
    ValueError
        The shares are malformed, or do not combine into a padded secret.
    """
    if not share_list:
        raise ValueError("Failed to combine shares: no shares.")
    size = len(share_list[0])
    chunks, rest = divmod(size - INDEX_BYTES, VALUE_BYTES)
    if chunks < 1 or rest or any(len(share) != size for share in share_list):
        raise ValueError("Failed to combine shares: malformed share lengths.")
    xs = [int.from_bytes(share[:INDEX_BYTES], "little") for share in share_list]
    if 0 in xs or len(set(xs)) != len(xs):
        raise ValueError("Failed to combine shares: zero or repeated share indices.")
    weights = _lagrange_at_zero(xs)
    padded = bytearray()
    for c in range(chunks):
        start = INDEX_BYTES + c * VALUE_BYTES
        total = 0
        for weight, share in zip(weights, share_list, strict=True):
            value = int.from_bytes(share[start:start + VALUE_BYTES], "big")
            if value >= PRIME:
                raise ValueError("Failed to combine shares: a share value is outside the field.")
            total += weight * value
        total %= PRIME
        if total >= 2**(8 * CHUNK_BYTES):
            raise ValueError("Failed to combine shares.")
        padded += total.to_bytes(CHUNK_BYTES, "big")
    pad = padded[-1]
    if not 1 <= pad <= CHUNK_BYTES or padded[-pad:] != bytes([pad]) * pad:
        raise ValueError("Failed to combine shares.")
    return bytes(padded[:-pad])
