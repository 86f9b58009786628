"""The exact SecAgg+ encoding, checked through Flower's own quantiser and unmasking arithmetic."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.common.secure_aggregation.ndarrays_arithmetic import factor_combine, factor_extract
from flwr.common.secure_aggregation.quantization import dequantize, quantize
from hypothesis import given, settings
from hypothesis import strategies as st

from common.errors import ConfigError, ProtocolError
from common.secure_sum import (
    CLIPPING_RANGE,
    FRACTION_BITS,
    MAX_ABS_VALUE,
    MODULUS_RANGE,
    SecAggPlusSumCodec,
    check_no_wrap,
    plain_sum,
    quantization_range_for,
)


def secaggplus_mean(payloads: list[list[np.ndarray]], q: int, rng: np.random.Generator):
    """Replay SecAgg+'s client quantisation, masking and server unmasking (Flower's functions)."""
    n = len(payloads)
    masked_sum = None
    masks_sum = None
    for arrays in payloads:
        quantised = factor_combine(q, quantize(arrays, CLIPPING_RANGE, q))  # weight 1 -> factor Q
        masks = [rng.integers(0, MODULUS_RANGE, a.shape, dtype=np.int64) for a in quantised]
        masked = [(a + m) % MODULUS_RANGE for a, m in zip(quantised, masks, strict=True)]
        masked_sum = masked if masked_sum is None else [
            (s + a) % MODULUS_RANGE for s, a in zip(masked_sum, masked, strict=True)]
        masks_sum = masks if masks_sum is None else [
            (s + m) % MODULUS_RANGE for s, m in zip(masks_sum, masks, strict=True)]
    unmasked = [(s - m) % MODULUS_RANGE for s, m in zip(masked_sum, masks_sum, strict=True)]
    q_total, recon = factor_extract(unmasked)
    out = dequantize(recon, CLIPPING_RANGE, q)
    offset = -(n - 1) * CLIPPING_RANGE
    return [(v + offset) * (q / q_total) for v in out]


@pytest.mark.parametrize(("num_sites", "expected"), [(2, 2**30), (5, 2**29), (20, 2**27),
                                                     (100, 2**25)])
def test_quantization_range_is_largest_safe_power_of_two(num_sites, expected):
    q = quantization_range_for(num_sites)
    assert q == expected
    assert (num_sites + 1) * q <= MODULUS_RANGE < (num_sites + 1) * 2 * q


def test_quantization_range_rejects_a_single_site():
    with pytest.raises(ConfigError, match="num_sites=1"):
        quantization_range_for(1)


def test_configuration_that_could_wrap_is_refused():
    with pytest.raises(ConfigError, match="overflow"):
        check_no_wrap(num_sites=20, quantization_range=2**28)
    check_no_wrap(num_sites=20, quantization_range=2**27)


@pytest.mark.parametrize("num_sites", [2, 5, 20])
def test_decoded_secure_sum_equals_float_sum(num_sites):
    rng = np.random.default_rng(num_sites)
    codec = SecAggPlusSumCodec(quantization_range_for(num_sites))
    sites = [[rng.normal(0, 1e4, (6, 7)), rng.integers(0, 5000, 6).astype(float),
              rng.exponential(1e6, 6)] for _ in range(num_sites)]
    means = secaggplus_mean([codec.encode(s) for s in sites], codec.quantization_range, rng)
    decoded = codec.decode(means, num_sites=num_sites)
    expected = plain_sum(sites)
    for got, want in zip(decoded, expected, strict=True):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=0, atol=num_sites * 2.0**-FRACTION_BITS)


def test_extreme_values_do_not_wrap_with_the_maximum_site_count():
    num_sites = 100
    codec = SecAggPlusSumCodec(quantization_range_for(num_sites))
    big = 2.0**86
    sites = [[np.array([big, -big, 0.0, 1.5])] for _ in range(num_sites)]
    means = secaggplus_mean([codec.encode(s) for s in sites], codec.quantization_range,
                            np.random.default_rng(0))
    decoded = codec.decode(means, num_sites=num_sites)[0]
    np.testing.assert_array_equal(decoded, [big * num_sites, -big * num_sites, 0.0, 150.0])


def test_encoded_entries_lie_on_the_quantiser_grid_in_range():
    codec = SecAggPlusSumCodec(2**29)
    (encoded,) = codec.encode([np.array([[-3.25, 7.0], [1e12, -1e-9]])])
    assert encoded.shape == (codec.limbs, 2, 2)
    assert encoded.min() >= -1.0 and encoded.max() < 1.0
    levels = (encoded + 1.0) * (codec.quantization_range / 2)
    np.testing.assert_array_equal(levels, np.rint(levels))


def test_encode_refuses_non_finite_and_oversized_values():
    codec = SecAggPlusSumCodec(2**29)
    with pytest.raises(ProtocolError, match="non-finite"):
        codec.encode([np.array([1.0, np.nan])])
    with pytest.raises(ProtocolError, match="too large"):
        codec.encode([np.array([2.0**88])])


def test_decode_rejects_wrong_layout():
    codec = SecAggPlusSumCodec(2**29)
    with pytest.raises(ProtocolError, match="expected"):
        codec.decode([np.zeros((2, 3))], num_sites=2)


def test_plain_sum_rejects_mismatched_shapes():
    with pytest.raises(ProtocolError, match="shape"):
        plain_sum([[np.zeros(3)], [np.zeros(4)]])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.floats(-1e9, 1e9, allow_nan=False), min_size=3, max_size=3),
                min_size=2, max_size=8))
def test_property_sum_is_exact_to_fixed_point_resolution(rows):
    n = len(rows)
    codec = SecAggPlusSumCodec(quantization_range_for(n))
    sites = [[np.array(r)] for r in rows]
    means = secaggplus_mean([codec.encode(s) for s in sites], codec.quantization_range,
                            np.random.default_rng(1))
    decoded = codec.decode(means, num_sites=n)[0]
    np.testing.assert_allclose(decoded, np.sum(rows, axis=0), rtol=0,
                               atol=n * 2.0**-FRACTION_BITS + 1e-9 * np.abs(rows).sum())


def test_plain_sum_does_not_depend_on_arrival_order():
    rng = np.random.default_rng(5)
    sites = [[rng.normal(0, 1e6, (4, 3)) * 10.0 ** rng.integers(-8, 8)] for _ in range(7)]
    forward = plain_sum(sites)[0]
    backward = plain_sum(sites[::-1])[0]
    np.testing.assert_array_equal(forward, backward)
    np.testing.assert_allclose(forward, np.sum([s[0] for s in sites], axis=0), rtol=1e-12)


def test_maximum_site_count_with_extreme_values_cannot_wrap():
    num_sites = 2**16  # the most sites fedseg accepts in one round
    q = quantization_range_for(num_sites)
    codec = SecAggPlusSumCodec(q)
    extreme = np.array([MAX_ABS_VALUE * (1 - 2**-40), -MAX_ABS_VALUE * (1 - 2**-40), 0.0])
    (payload,) = codec.encode([extreme])
    # Every site sends the same extreme payload: the unmasked sum is num_sites * levels.
    levels = quantize([payload], CLIPPING_RANGE, q)[0].astype(np.int64)
    assert levels.max() <= q - 1
    total = levels * num_sites
    assert total.max() + num_sites * q < MODULUS_RANGE  # entries and weight factors both fit
    mean = dequantize([total], CLIPPING_RANGE, q)[0]
    mean = (mean - (num_sites - 1) * CLIPPING_RANGE) / num_sites
    (decoded,) = codec.decode([mean], num_sites=num_sites)
    np.testing.assert_allclose(decoded, extreme * num_sites, rtol=1e-12)


def test_more_sites_than_supported_are_refused_before_anything_runs():
    with pytest.raises(ConfigError, match="too many"):
        quantization_range_for(2**16 + 1)


def reference_encode(codec: SecAggPlusSumCodec, values: np.ndarray) -> np.ndarray:
    """The encoding entry by entry in Python integers (the definition the fast path must meet)."""
    modulus, mask = 1 << 128, codec.quantization_range - 1
    flat = np.asarray(values, dtype=np.float64).ravel().tolist()
    out = np.empty((codec.limbs, len(flat)))
    for j, value in enumerate(flat):
        word = (round(value * (1 << FRACTION_BITS)) + codec.offset) % modulus
        for limb in range(codec.limbs):
            m = (word >> (limb * codec.limb_bits)) & mask
            out[limb, j] = m * (2.0 / codec.quantization_range) - 1.0
    return out.reshape(codec.limbs, *np.shape(values))


_EDGES = [0.0, -0.0, 0.5 * 2.0**-FRACTION_BITS, -0.5 * 2.0**-FRACTION_BITS,
          1.5 * 2.0**-FRACTION_BITS, -2.5 * 2.0**-FRACTION_BITS, 1e-30, -1e-30, 1.0, -1.0,
          2.0**63, -(2.0**63), np.nextafter(MAX_ABS_VALUE, 0), -np.nextafter(MAX_ABS_VALUE, 0),
          2.0**40 - 2.0**-FRACTION_BITS, -(2.0**40) + 2.0**-FRACTION_BITS]


@pytest.mark.parametrize("q", [2**16, 2**25, 2**27, 2**29, 2**30, 2**31])
def test_vectorised_encoding_equals_the_integer_definition_at_the_edges(q):
    codec = SecAggPlusSumCodec(q)
    values = np.array(_EDGES)
    np.testing.assert_array_equal(codec.encode([values])[0], reference_encode(codec, values))


@settings(max_examples=60, deadline=None)
@given(st.sampled_from([2**16, 2**25, 2**29, 2**31]),
       st.lists(st.floats(-MAX_ABS_VALUE / 2, MAX_ABS_VALUE / 2, allow_nan=False,
                          allow_subnormal=True), min_size=1, max_size=12),
       st.integers(-60, 80))
def test_property_vectorised_encoding_equals_the_integer_definition(q, values, scale):
    codec = SecAggPlusSumCodec(q)
    arr = np.clip(np.array(values) * 2.0**scale, -MAX_ABS_VALUE / 2, MAX_ABS_VALUE / 2)
    np.testing.assert_array_equal(codec.encode([arr])[0], reference_encode(codec, arr))
