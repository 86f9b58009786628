"""Global standardisation from summed moments."""

from __future__ import annotations

import numpy as np
import pytest

from common.errors import ProtocolError
from common.scaling import GlobalScaler, compute_moments
from common.secure_sum import plain_sum


def test_scaler_from_site_moments_equals_pooled_statistics():
    rng = np.random.default_rng(0)
    sites = [rng.normal(loc=i * 3, scale=i + 1, size=(50 * (i + 1), 4)) for i in range(4)]
    scaler = GlobalScaler.from_moments(plain_sum([compute_moments(s) for s in sites]),
                                       n_features=4)
    pooled = np.vstack(sites)
    np.testing.assert_allclose(scaler.mean, pooled.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(scaler.std, pooled.std(axis=0), rtol=1e-9)
    assert scaler.count == len(pooled)
    z = scaler.transform(pooled)
    np.testing.assert_allclose(z.mean(axis=0), 0, atol=1e-9)
    np.testing.assert_allclose(scaler.inverse_transform(z), pooled, rtol=1e-12, atol=1e-12)


def test_constant_feature_scales_to_zero_not_nan():
    data = np.column_stack([np.full(10, 7.0), np.arange(10.0)])
    scaler = GlobalScaler.from_moments(compute_moments(data), n_features=2)
    assert scaler.std[0] == 1.0
    assert np.all(scaler.transform(data)[:, 0] == 0.0)


def test_moments_shape_and_count_validation():
    with pytest.raises(ProtocolError, match="shapes"):
        GlobalScaler.from_moments([np.ones(1), np.ones(3), np.ones(2)], n_features=3)
    with pytest.raises(ProtocolError, match="at least 2"):
        GlobalScaler.from_moments(compute_moments(np.ones((1, 2))), n_features=2)
