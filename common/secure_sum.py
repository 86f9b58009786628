"""Exact secure sums through SecAgg+: encode site statistics so the server recovers sums.

Flower's SecAgg+ (``secaggplus_mod`` / ``SecAggPlusWorkflow``) reveals only
``sum_i(q_i * quantise(v_i)) / sum_i(q_i)`` of the sites' vectors, after clipping every entry to
``[-clipping_range, clipping_range]`` and stochastically rounding it onto ``quantization_range``
levels. Scaling floats into that range loses precision with every site and needs public bounds on
the data. fedseg instead sends **integers that the quantiser carries exactly**:

* every site reports weight 1 (``num_examples=1`` with ``max_weight=1``), so ``q_i = Q``;
* ``Q = 2**L`` and ``clipping_range = 1``: the value ``x = m * 2/Q - 1`` for an integer
  ``0 <= m < Q`` is quantised to exactly ``m`` (the stochastic rounding of an integer is that
  integer), so the masked sum the server unmasks is the exact integer ``sum_i m_i``;
* each float64 statistic is written as a fixed-point integer (``FRACTION_BITS`` fractional bits,
  two's complement modulo ``2**TOTAL_BITS``) and split into ``L``-bit limbs, one limb per slice
  of the sent array; the server adds the limb sums back together with their carries. A site's
  value must stay below ``MAX_ABS_VALUE`` so that the sum over up to ``2**SITE_BITS`` sites
  cannot wrap the word.

The decoded sum equals the plain float sum up to ``2**-FRACTION_BITS`` per site and entry.
``Q`` is chosen from the number of sites so that ``(n + 1) * Q <= 2**32``: the masked sum can
never wrap Flower's ``modulus_range`` (Flower does not check this; an overflow is silent).

Public offset: a site encodes ``v * 2**FRACTION_BITS + OFFSET`` instead of the two's complement
of ``v``. The server learns every limb's sum, not only their combination: with two's complement,
a negative value sets all of its upper limbs to ``2**L - 1``, so the upper limb sums counted the
sites that sent a negative value. ``OFFSET`` has bit ``j*L - 1`` set for every limb boundary
``j*L``, so at every boundary above a value's magnitude the offset's lower part sits mid-range
and neither a positive nor a negative value carries or borrows across it: those limbs hold the
offset's constant digits at every site. What remains (docs/SECURITY.md): at the boundaries
*below* a value's magnitude the limb sums still count carries out of the sites' lower digits,
at most ``log2(n + 1)`` bits per boundary about how the sites' residues modulo ``2**(j*L)``
add up -- not signs, not values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from common.errors import ConfigError, ProtocolError

MODULUS_RANGE = 2**32
"""Flower's SecAgg+ modulus (its maximum): masked sums live in ``Z_{2**32}``."""

FRACTION_BITS = 24
"""Fixed-point resolution of an encoded statistic: ``2**-24 ~ 6e-8`` per site and entry."""

TOTAL_BITS = 128
"""Width of the two's complement fixed-point word in which the sum over all sites is formed."""

SITE_BITS = 16
"""Headroom for the number of sites: at most ``2**16`` sites can be summed without wrapping."""

CLIPPING_RANGE = 1.0
"""SecAgg+ clipping range used with this encoding: limbs are mapped into ``[-1, 1)``."""

MAX_WEIGHT = 1.0
"""SecAgg+ ``max_weight``: every site reports ``num_examples=1`` so all weights are equal."""

MAX_ABS_VALUE = 2.0 ** (TOTAL_BITS - FRACTION_BITS - SITE_BITS - 1)
"""Largest magnitude one site may send (``2**87 ~ 1.5e26``): ``2**16`` of them cannot wrap."""


LIMB_TOLERANCE = 1e-3
"""Largest distance of a decoded limb sum from a whole number before the aggregate is refused.

Flower unmasks in integers and then averages in float64 (``n * Q <= 2**32`` times a relative
error of a few ``2**-53``): an honest limb sum is within ``2**-19`` of a whole number. A site
that masks another weight than ``Q`` scales every limb sum ``L`` by ``n*Q / (n*Q + e)``; the
public offset keeps the upper limb sums near ``n*Q/2``, which then move by about ``e/2`` and
are refused unless every limb sum lands next to a whole number (an even ``e`` can); what gets
through is left to the coordinator's plausibility checks (``server.coordinator.check_sums``).
"""


def quantization_range_for(num_sites: int) -> int:
    """Return the SecAgg+ ``quantization_range`` that cannot overflow for ``num_sites`` sites.

    Parameters
    ----------
    num_sites : int
        Number of sites sampled in the round (at least 2, as SecAgg+ requires).

    Returns
    -------
    int
        The largest power of two ``Q`` with ``(num_sites + 1) * Q <= 2**32``. Each site's
        quantised entry is at most ``Q - 1`` and the weight factor it adds is ``Q``, so the sums
        of both stay below the modulus.
    """
    if not isinstance(num_sites, int) or num_sites < 2:
        raise ConfigError(f"num_sites={num_sites!r} should be an integer >= 2 for SecAgg+.")
    bound = MODULUS_RANGE // (num_sites + 1)
    if num_sites > 2**SITE_BITS:
        raise ConfigError(
            f"num_sites={num_sites} is too many for one SecAgg+ round (expected at most "
            f"{2**SITE_BITS} sites)."
        )
    return 1 << (bound.bit_length() - 1)


def check_no_wrap(*, num_sites: int, quantization_range: int) -> None:
    """Refuse a SecAgg+ configuration whose masked sum could wrap the modulus.

    Parameters
    ----------
    num_sites : int
        Sites taking part in the round.
    quantization_range : int
        The ``quantization_range`` the workflow would use.
    """
    if (num_sites + 1) * quantization_range > MODULUS_RANGE:
        raise ConfigError(
            f"quantization_range={quantization_range} with num_sites={num_sites} can overflow "
            f"SecAgg+'s modulus 2**32: expected quantization_range <= "
            f"{MODULUS_RANGE // (num_sites + 1)}."
        )


def num_limbs(quantization_range: int) -> int:
    """Return how many limbs of ``log2(quantization_range)`` bits a fixed-point word needs."""
    limb_bits = quantization_range.bit_length() - 1
    return -(-TOTAL_BITS // limb_bits)


@dataclass(frozen=True)
class SecAggPlusSumCodec:
    """Encode float64 statistics into exact-integer SecAgg+ payloads and decode their sum.

    Parameters
    ----------
    quantization_range : int
        A power of two, as returned by :func:`quantization_range_for`.
    """

    quantization_range: int

    def __post_init__(self) -> None:
        q = self.quantization_range
        if q < 2 or q & (q - 1):
            raise ConfigError(f"quantization_range={q} should be a power of two >= 2.")

    @property
    def limb_bits(self) -> int:
        """Bits carried per limb."""
        return self.quantization_range.bit_length() - 1

    @property
    def limbs(self) -> int:
        """Limbs per encoded entry."""
        return num_limbs(self.quantization_range)

    @property
    def offset(self) -> int:
        """Public offset added to every fixed-point word: bit ``j*L - 1`` for each boundary."""
        return sum(1 << (j * self.limb_bits - 1) for j in range(1, self.limbs)
                   if j * self.limb_bits - 1 < TOTAL_BITS)

    def encoded_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of the payload that encodes an array of ``shape``."""
        return (self.limbs, *shape)

    def encode(self, arrays: Sequence[NDArray[np.float64]]) -> list[NDArray[np.float64]]:
        """Encode each array into limbs mapped onto SecAgg+'s exact quantisation grid.

        Parameters
        ----------
        arrays : sequence of ndarray
            Statistics of any shape; every entry must be finite with
            ``|x| < MAX_ABS_VALUE``.

        Returns
        -------
        list of ndarray
            One float64 array of shape ``(limbs, *shape)`` per input, entries in ``[-1, 1)``.
        """
        out: list[NDArray[np.float64]] = []
        for index, arr in enumerate(arrays):
            values = np.asarray(arr, dtype=np.float64)
            if not np.all(np.isfinite(values)):
                raise ProtocolError(f"statistic #{index} holds a non-finite value; cannot encode.")
            if values.size and float(np.max(np.abs(values))) >= MAX_ABS_VALUE:
                raise ProtocolError(
                    f"statistic #{index} has |value| >= {MAX_ABS_VALUE:.3g}: "
                    "too large for the secure-sum encoding (rescale or log-transform the feature)."
                )
            digits = self._word_digits(np.rint(values.ravel() * float(1 << FRACTION_BITS)))
            limbs = digits * (2.0 / self.quantization_range) - 1.0
            out.append(limbs.reshape(self.encoded_shape(values.shape)))
        return out

    def _word_digits(self, whole: NDArray[np.float64]) -> NDArray[np.float64]:
        """Return the limbs of ``(whole + offset) mod 2**TOTAL_BITS`` for integer-valued floats.

        Exact, without Python integers: ``|whole| < 2**111`` is split into base-``2**L``
        digits by floor division by a power of two (exact in float64: every quotient and
        remainder is an integer the format holds), the offset's digits are added with their
        carries in int64, and the top limb keeps only the word's bits below ``TOTAL_BITS``.
        Equal, entry for entry, to the per-entry Python-integer reference (tested).

        Parameters
        ----------
        whole : ndarray
            1-D float64 integers (the fixed-point words before the offset).

        Returns
        -------
        ndarray
            float64 of shape ``(limbs, whole.size)``, each entry an integer in ``[0, Q)``.
        """
        bits, count = self.limb_bits, self.limbs
        base = float(1 << bits)
        mask = (1 << bits) - 1
        digits = np.empty((count, whole.size), dtype=np.int64)
        rest = whole
        for limb in range(count):
            quotient = np.floor(rest / base)
            digits[limb] = (rest - quotient * base).astype(np.int64)
            rest = quotient
        # rest is now 0 or -1 (a negative word): a multiple of 2**(count*bits) >= 2**128,
        # which vanishes modulo 2**TOTAL_BITS.
        carry = np.zeros(whole.size, dtype=np.int64)
        offset = self.offset
        for limb in range(count):
            total = digits[limb] + ((offset >> (limb * bits)) & mask) + carry
            digits[limb] = total & mask
            carry = total >> bits
        top_bits = TOTAL_BITS - (count - 1) * bits
        digits[count - 1] &= (1 << top_bits) - 1
        return digits.astype(np.float64)

    def encode_words(self, arrays: Sequence[NDArray[Any]]) -> list[NDArray[np.float64]]:
        """Encode statistics already on the fixed-point grid (integers, ``2**-FRACTION_BITS``).

        The differentially private path (:mod:`common.dp`) forms its sums and noise as integers
        on this grid, so no float rounding happens between the noise and the secure sum.
        """
        out: list[NDArray[np.float64]] = []
        modulus = 1 << TOTAL_BITS
        mask = self.quantization_range - 1
        limit = int(MAX_ABS_VALUE) << FRACTION_BITS
        for index, arr in enumerate(arrays):
            words = np.asarray(arr)
            if words.dtype.kind not in "iuO" or not all(
                    isinstance(v, int | np.integer) and not isinstance(v, bool)
                    for v in words.ravel().tolist()):
                raise ProtocolError(f"statistic #{index} is not on the integer grid.")
            flat = [int(v) for v in words.ravel().tolist()]
            if flat and max(abs(v) for v in flat) >= limit:
                raise ProtocolError(f"statistic #{index} is too large for the secure-sum "
                                    "encoding.")
            limbs = np.empty((self.limbs, len(flat)), dtype=np.float64)
            for j, value in enumerate(flat):
                word = (value + self.offset) % modulus
                for limb in range(self.limbs):
                    m = (word >> (limb * self.limb_bits)) & mask
                    limbs[limb, j] = m * (2.0 / self.quantization_range) - 1.0
            out.append(limbs.reshape(self.encoded_shape(words.shape)))
        return out

    def decode(
        self, means: Sequence[NDArray[np.float64]], *, num_sites: int,
        fraction_bits: int = FRACTION_BITS,
    ) -> list[NDArray[np.float64]]:
        """Recover the sums of the sites' statistics from SecAgg+'s aggregated mean.

        Parameters
        ----------
        means : sequence of ndarray
            What SecAgg+ hands to ``aggregate_fit``: per array of shape ``(limbs, *shape)``, the
            mean over the ``num_sites`` reporting sites of the encoded payloads.
        num_sites : int
            Sites whose vectors are in the aggregate (sampled minus dropped).
        fraction_bits : int, default=FRACTION_BITS
            Fixed-point resolution the sites encoded with (finer for DP statistics).

        Returns
        -------
        list of ndarray
            float64 sums of shape ``shape`` per statistic.

        Raises
        ------
        ProtocolError
            When an array does not have ``limbs`` rows, or its limb sums are not whole numbers
            between ``0`` and ``num_sites * (quantization_range - 1)``: no set of
            ``num_sites`` sites following the encoding can produce it.
        """
        if num_sites < 1:
            raise ProtocolError(f"num_sites={num_sites} should be >= 1 to decode a sum.")
        modulus = 1 << TOTAL_BITS
        half = modulus >> 1
        offsets = num_sites * self.offset
        out: list[NDArray[np.float64]] = []
        for index, mean in enumerate(means):
            arr = np.asarray(mean, dtype=np.float64)
            if arr.ndim < 1 or arr.shape[0] != self.limbs:
                raise ProtocolError(
                    f"aggregate #{index} has shape {arr.shape}; expected ({self.limbs}, ...)."
                )
            # Undo SecAgg+'s averaging and the [-1, 1) mapping: exact integer limb sums.
            scaled = (arr * num_sites + num_sites) * (self.quantization_range / 2.0)
            limb_sums = np.rint(scaled)
            # Every site's limb is a whole number in [0, Q - 1], so their sum is one in
            # [0, n * (Q - 1)]; Flower's float arithmetic is off by under 2**-19 here.
            if not np.all(np.isfinite(scaled)) or \
                    np.any(np.abs(scaled - limb_sums) > LIMB_TOLERANCE) or \
                    np.any(limb_sums < 0) or \
                    np.any(limb_sums > num_sites * (self.quantization_range - 1)):
                raise ProtocolError(
                    f"aggregate #{index} is not a sum of {num_sites} sites' limbs (whole numbers "
                    f"between 0 and {num_sites} * (quantization_range - 1)): a site's masked "
                    "vector or weight does not follow the encoding."
                )
            flat = limb_sums.reshape(self.limbs, -1)
            result = np.empty(flat.shape[1], dtype=np.float64)
            for j in range(flat.shape[1]):
                total = 0
                for limb in range(self.limbs):
                    total += int(flat[limb, j]) << (limb * self.limb_bits)
                total = (total - offsets) % modulus
                if total >= half:
                    total -= modulus
                result[j] = total / (1 << fraction_bits)
            out.append(result.reshape(arr.shape[1:]))
        return out


def plain_sum(site_arrays: Sequence[Sequence[NDArray[np.float64]]]) -> list[NDArray[np.float64]]:
    """Sum the sites' statistics when no secure aggregation is used (``privacy=none``).

    Parameters
    ----------
    site_arrays : sequence of sequences of ndarray
        Per site, the list of statistics it sent; every site must send the same shapes.

    Returns
    -------
    list of ndarray
        The float64 element-wise sums, correctly rounded (``math.fsum``): the result does not
        depend on the order in which site replies arrive, so runs are reproducible.
    """
    if not site_arrays:
        raise ProtocolError("no site results to sum.")
    first = site_arrays[0]
    shapes = [np.shape(a) for a in first]
    for site, arrays in enumerate(site_arrays):
        if len(arrays) != len(first):
            raise ProtocolError(
                f"site result #{site} has {len(arrays)} arrays; expected {len(first)}."
            )
        for index, (shape, arr) in enumerate(zip(shapes, arrays, strict=True)):
            if np.shape(arr) != shape:
                raise ProtocolError(
                    f"site result #{site} array #{index} has shape {np.shape(arr)}; "
                    f"expected {shape}."
                )
    sums = []
    for index, shape in enumerate(shapes):
        stacked = np.stack([np.asarray(arrays[index], dtype=np.float64).ravel()
                            for arrays in site_arrays])
        total = np.array([math.fsum(column) for column in stacked.T.tolist()], dtype=np.float64)
        sums.append(total.reshape(shape))
    return sums
