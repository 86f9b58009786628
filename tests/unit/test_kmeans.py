"""Core k-means maths against hand-computed values, numpy and scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from sklearn.cluster import KMeans

from common.errors import ProtocolError
from common.kmeans import (
    KMeansStats,
    assign,
    centroid_shift,
    compute_stats,
    has_converged,
    update_centroids,
    weighted_kmeans,
)


def test_stats_on_hand_computed_example():
    points = np.array([[0.0, 0.0], [2.0, 0.0], [10.0, 10.0], [12.0, 10.0], [11.0, 13.0]])
    centroids = np.array([[1.0, 0.0], [11.0, 11.0]])
    stats = compute_stats(points, centroids)
    np.testing.assert_array_equal(stats.counts, [2, 3])
    np.testing.assert_array_equal(stats.sums, [[2, 0], [33, 33]])
    # cluster 0: 1 + 1; cluster 1: (1+1) + (1+1) + (0+4)
    np.testing.assert_array_equal(stats.costs, [2, 8])
    new, empty = update_centroids(stats, centroids)
    np.testing.assert_array_equal(new, [[1, 0], [11, 11]])
    assert not empty.any()


def test_assign_breaks_ties_to_lowest_index():
    labels, d2 = assign(np.array([[1.0, 0.0]]), np.array([[0.0, 0.0], [2.0, 0.0]]))
    assert labels.tolist() == [0] and d2.tolist() == [1.0]


def test_assign_rejects_mismatched_features():
    with pytest.raises(ValueError, match="same number of features"):
        assign(np.zeros((3, 2)), np.zeros((2, 3)))


def test_one_lloyd_step_matches_scikit_learn():
    rng = np.random.default_rng(0)
    points = rng.normal(size=(500, 4)) + rng.integers(0, 3, (500, 1)) * 4
    init = points[:3].copy()
    stats = compute_stats(points, init)
    new, _ = update_centroids(stats, init)
    ref = KMeans(3, init=init, n_init=1, max_iter=1, algorithm="lloyd").fit(points)
    np.testing.assert_allclose(new, ref.cluster_centers_, rtol=1e-10)
    # sklearn reports the inertia of the labels it assigned with the initial centres.
    np.testing.assert_allclose(stats.cost, np.sum((points - init[assign(points, init)[0]]) ** 2))


def test_empty_cluster_is_reseeded_by_splitting_the_costliest():
    points = np.array([[0.0, 0.0], [0.0, 1.0], [10.0, 0.0], [10.0, 4.0]])
    centroids = np.array([[0.0, 0.5], [10.0, 2.0], [100.0, 100.0]])
    stats = compute_stats(points, centroids)
    assert stats.counts[2] == 0
    new, empty = update_centroids(stats, centroids)
    assert empty.tolist() == [False, False, True]
    # Donor is cluster 1 (cost 8 > 0.5), split along its widest axis (y, std 2) about (10, 2).
    np.testing.assert_allclose((new[1] + new[2]) / 2, [10.0, 2.0])
    shift = np.sqrt(2 / np.pi) * 2.0
    np.testing.assert_allclose(sorted([new[1, 1], new[2, 1]]), [2 - shift, 2 + shift])
    np.testing.assert_allclose([new[1, 0], new[2, 0]], [10.0, 10.0])
    assert np.all(np.isfinite(new)) and not np.allclose(new[1], new[2])
    after = compute_stats(points, new)
    assert after.counts.min() >= 1 and after.cost < stats.cost


def test_several_empty_clusters_stay_finite():
    points = np.random.default_rng(1).normal(size=(50, 3))
    centroids = np.vstack([np.zeros((1, 3)), np.full((4, 3), 1e3)])
    new, empty = update_centroids(compute_stats(points, centroids), centroids)
    assert empty.sum() == 4 and np.all(np.isfinite(new))
    assert len(np.unique(new.round(12), axis=0)) == 5


def test_stats_shape_validation():
    with pytest.raises(ProtocolError, match="expected"):
        KMeansStats.from_arrays([np.zeros((2, 3)), np.zeros((2, 3)), np.zeros(2), np.zeros(3)],
                                n_clusters=2, n_features=3)


def test_convergence_rules():
    assert has_converged(shift=1e-6, previous_cost=None, cost=5.0, tol=1e-4)
    assert not has_converged(shift=1.0, previous_cost=None, cost=5.0, tol=1e-4)
    assert has_converged(shift=1.0, previous_cost=100.0, cost=99.999, tol=1e-4)
    assert not has_converged(shift=1.0, previous_cost=100.0, cost=90.0, tol=1e-4)
    assert centroid_shift(np.zeros((2, 2)), np.array([[3.0, 4.0], [0.0, 1.0]])) == 5.0


def test_weighted_kmeans_equals_kmeans_on_repeated_points():
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(40, 2)) * 5
    weights = rng.integers(1, 20, 40).astype(float)
    _, cost = weighted_kmeans(centres, 4, sample_weight=weights, rng=rng, n_init=10)
    expanded = np.repeat(centres, weights.astype(int), axis=0)
    ref = KMeans(4, n_init=10, random_state=0).fit(expanded)
    assert cost <= ref.inertia_ * (1 + 1e-6)


@settings(max_examples=30, deadline=None)
@given(arrays(np.float64, st.tuples(st.integers(2, 40), st.just(3)),
              elements=st.floats(-1e3, 1e3)),
       st.integers(1, 39))
def test_property_stats_are_additive_across_sites(points, cut):
    cut = min(cut, len(points) - 1)
    centroids = np.array([[0.0, 0.0, 0.0], [100.0, 0.0, 0.0], [0.0, -50.0, 20.0]])
    whole = compute_stats(points, centroids)
    split = compute_stats(points[:cut], centroids) + compute_stats(points[cut:], centroids)
    np.testing.assert_allclose(split.sums, whole.sums, atol=1e-8)
    np.testing.assert_array_equal(split.counts, whole.counts)
    np.testing.assert_allclose(split.costs, whole.costs, rtol=1e-10, atol=1e-6)
