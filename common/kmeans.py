"""K-means sufficient statistics, centroid updates and server-side weighted k-means.

Sites compute :class:`KMeansStats` on their own (standardised) points; only the sums of those
statistics across sites reach the server, which updates the centroids with
:func:`update_centroids`. The statistics are additive, so ``sum of site stats`` equals the
statistics of the pooled data and one federated Lloyd step equals one centralised Lloyd step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from common.errors import ProtocolError

_EPS = 1e-12
TIE_RTOL = 1e-9
"""Costs within this relative distance are the same optimum reached twice (rounding only)."""
_HALF_GAUSSIAN_SHIFT = float(np.sqrt(2.0 / np.pi))


@dataclass(frozen=True)
class KMeansStats:
    """Additive per-cluster statistics of a set of points.

    Attributes
    ----------
    sums : ndarray of shape (n_clusters, n_features)
        Sum of the points assigned to each cluster.
    sq_sums : ndarray of shape (n_clusters, n_features)
        Per-feature sum of squares of those points (used to split clusters along their widest
        axis when another cluster runs empty).
    counts : ndarray of shape (n_clusters,)
        Number (or total weight) of points per cluster.
    costs : ndarray of shape (n_clusters,)
        Sum of squared distances of the points to their cluster's centroid.
    """

    sums: NDArray[np.float64]
    sq_sums: NDArray[np.float64]
    counts: NDArray[np.float64]
    costs: NDArray[np.float64]

    @property
    def cost(self) -> float:
        """Total within-cluster sum of squares."""
        return float(self.costs.sum())

    def to_arrays(self) -> list[NDArray[np.float64]]:
        """Return ``[sums, sq_sums, counts, costs]``, the layout sent to the server."""
        return [self.sums, self.sq_sums, self.counts, self.costs]

    @classmethod
    def from_arrays(
        cls, arrays: list[NDArray[np.float64]], *, n_clusters: int, n_features: int
    ) -> KMeansStats:
        """Build statistics from ``[sums, sq_sums, counts, costs]`` after checking shapes.

        Parameters
        ----------
        arrays : list of ndarray
            As produced by :meth:`to_arrays` (or their sum over sites).
        n_clusters, n_features : int
            The public shape the arrays must have.
        """
        k, d = n_clusters, n_features
        expected = [(k, d), (k, d), (k,), (k,)]
        got = [np.shape(a) for a in arrays]
        if got != expected:
            raise ProtocolError(f"k-means statistics have shapes {got}; expected {expected}.")
        sums, sq_sums, counts, costs = (np.asarray(a, dtype=np.float64) for a in arrays)
        return cls(sums=sums, sq_sums=sq_sums, counts=counts, costs=costs)

    def block(self, start: int, stop: int) -> KMeansStats:
        """Statistics of clusters ``start:stop`` (one of several parallel runs)."""
        part = slice(start, stop)
        return KMeansStats(sums=self.sums[part], sq_sums=self.sq_sums[part],
                           counts=self.counts[part], costs=self.costs[part])

    def __add__(self, other: KMeansStats) -> KMeansStats:
        return KMeansStats(
            sums=self.sums + other.sums,
            sq_sums=self.sq_sums + other.sq_sums,
            counts=self.counts + other.counts,
            costs=self.costs + other.costs,
        )


def assign(
    points: NDArray[np.float64], centroids: NDArray[np.float64]
) -> tuple[NDArray[np.intp], NDArray[np.float64]]:
    """Assign every point to its nearest centroid.

    Parameters
    ----------
    points : ndarray of shape (n_samples, n_features)
    centroids : ndarray of shape (n_clusters, n_features)

    Returns
    -------
    labels : ndarray of shape (n_samples,)
        Index of the nearest centroid (lowest index on ties).
    sq_dist : ndarray of shape (n_samples,)
        Squared Euclidean distance to that centroid.
    """
    points = np.asarray(points, dtype=np.float64)
    centroids = np.asarray(centroids, dtype=np.float64)
    if points.ndim != 2 or centroids.ndim != 2 or points.shape[1] != centroids.shape[1]:
        raise ValueError(
            f"points of shape {points.shape} and centroids of shape {centroids.shape} should "
            "both be 2-D with the same number of features."
        )
    # |x - c|^2 = |x|^2 - 2 x.c + |c|^2 in float64. The nearest centre minimises
    # |c|^2 - 2 x.c (|x|^2 is the same for every centre), computed in place in one (n, k)
    # array; |x|^2 is added to the chosen centre's term only, then floored at zero.
    partial = points @ centroids.T
    partial *= -2.0
    partial += np.einsum("ij,ij->i", centroids, centroids)[None, :]
    labels = np.argmin(partial, axis=1)
    d2 = np.take_along_axis(partial, labels[:, None], axis=1)[:, 0]
    d2 += np.einsum("ij,ij->i", points, points)
    np.maximum(d2, 0.0, out=d2)
    return labels, d2


def compute_stats(
    points: NDArray[np.float64],
    centroids: NDArray[np.float64],
    *,
    sample_weight: NDArray[np.float64] | None = None,
) -> KMeansStats:
    """Compute the k-means sufficient statistics of ``points`` for the given centroids.

    Parameters
    ----------
    points : ndarray of shape (n_samples, n_features)
    centroids : ndarray of shape (n_clusters, n_features)
    sample_weight : ndarray of shape (n_samples,), optional
        Weight of every point (default 1).

    Returns
    -------
    KMeansStats
        Per-cluster sums, counts and costs; clusters with no point get zeros.
    """
    labels, d2 = assign(points, centroids)
    points = np.asarray(points, dtype=np.float64)
    k, d = centroids.shape
    # Per-centre sums by one bincount per feature: each bin adds its points in row order, as
    # np.add.at does, without its per-row dispatch (about twice as fast at millions of rows).
    w = None if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    sums = np.empty((k, d), dtype=np.float64)
    sq_sums = np.empty((k, d), dtype=np.float64)
    for j in range(d):
        column = points[:, j] if w is None else points[:, j] * w
        sums[:, j] = np.bincount(labels, weights=column, minlength=k)
        squares = points[:, j] * points[:, j] if w is None else column * points[:, j]
        sq_sums[:, j] = np.bincount(labels, weights=squares, minlength=k)
    counts = np.bincount(labels, weights=w, minlength=k).astype(np.float64)
    costs = np.bincount(labels, weights=d2 if w is None else w * d2,
                        minlength=k).astype(np.float64)
    return KMeansStats(sums=sums, sq_sums=sq_sums, counts=counts, costs=costs)


def update_centroids(
    stats: KMeansStats, centroids: NDArray[np.float64], *, min_count: float = 0.5
) -> tuple[NDArray[np.float64], NDArray[np.bool_]]:
    """Lloyd update ``sums / counts`` with explicit empty-cluster handling.

    A cluster whose (global) count is below ``min_count`` is *empty*. It is re-seeded by
    splitting the cluster with the largest cost along that cluster's widest feature: the
    donor's mean and the empty centroid move to ``mean -/+ 0.8 * std`` on that axis (the means
    of the two halves of a Gaussian cut at its mean are ``+-sqrt(2/pi) ~ 0.8`` stds away).
    Re-seeding uses only aggregated statistics. A cluster with no spread is never split.

    Parameters
    ----------
    stats : KMeansStats
        Statistics summed over all sites for ``centroids``.
    centroids : ndarray of shape (n_clusters, n_features)
        The centroids the statistics were computed for.
    min_count : float, default=0.5
        Clusters with fewer (weighted) points are treated as empty.

    Returns
    -------
    new_centroids : ndarray of shape (n_clusters, n_features)
    reseeded : ndarray of shape (n_clusters,) of bool
        Which clusters were empty and re-seeded. An empty cluster that could not be re-seeded
        (no cluster with spread left to split) keeps its centre and is not marked.
    """
    counts = stats.counts
    empty = counts < min_count
    new = centroids.copy()
    filled = ~empty
    new[filled] = stats.sums[filled] / counts[filled, None]
    reseeded = np.zeros_like(empty)
    if empty.any() and filled.any():
        costs = np.where(filled, stats.costs, 0.0)
        var = np.zeros_like(new)
        var[filled] = np.maximum(
            stats.sq_sums[filled] / counts[filled, None] - new[filled] ** 2, 0.0
        )
        for idx in np.flatnonzero(empty):
            donor = int(np.argmax(costs))
            axis = int(np.argmax(var[donor]))
            spread = float(np.sqrt(var[donor, axis]))
            if costs[donor] <= 0.0 or spread <= 0.0:
                break  # nothing left to split: remaining empty clusters keep their centres
            step = _HALF_GAUSSIAN_SHIFT * spread
            new[idx] = new[donor]
            new[idx, axis] += step
            new[donor, axis] -= step
            # Each half keeps about half the cost and (1 - 2/pi) of the variance on the axis.
            costs[donor] /= 2.0
            var[donor, axis] *= 1.0 - 2.0 / np.pi
            costs[idx], var[idx] = costs[donor], var[donor]
            reseeded[idx] = True
    return new, reseeded


def centroid_shift(old: NDArray[np.float64], new: NDArray[np.float64]) -> float:
    """Largest Euclidean move of any centroid between two iterations."""
    return float(np.max(np.linalg.norm(np.asarray(new) - np.asarray(old), axis=1)))


def has_converged(
    *, shift: float, previous_cost: float | None, cost: float, tol: float
) -> bool:
    """Convergence test: centroids barely moved or the cost stopped decreasing.

    Parameters
    ----------
    shift : float
        :func:`centroid_shift` of the last update (standardised units).
    previous_cost, cost : float
        Costs of the previous and current assignment (``previous_cost`` None on the first).
    tol : float
        Tolerance on both the shift and the relative cost decrease.
    """
    if shift <= tol:
        return True
    if previous_cost is None:
        return False
    return (previous_cost - cost) <= tol * max(abs(previous_cost), _EPS)


def kmeans_plus_plus(
    points: NDArray[np.float64],
    n_clusters: int,
    *,
    sample_weight: NDArray[np.float64],
    rng: np.random.Generator,
) -> NDArray[np.float64]:
    """Weighted k-means++ seeding (Arthur & Vassilvitskii, 2007) with greedy trials.

    Parameters
    ----------
    points : ndarray of shape (n_points, n_features)
    n_clusters : int
    sample_weight : ndarray of shape (n_points,)
    rng : numpy.random.Generator

    Returns
    -------
    ndarray of shape (n_clusters, n_features)
    """
    n = points.shape[0]
    w = np.asarray(sample_weight, dtype=np.float64)
    trials = 2 + int(np.log(n_clusters))
    centers = np.empty((n_clusters, points.shape[1]))
    first = rng.choice(n, p=w / w.sum())
    centers[0] = points[first]
    closest = np.sum((points - centers[0]) ** 2, axis=1)
    for c in range(1, n_clusters):
        potential = w * closest
        total = potential.sum()
        if total <= 0:
            candidates = rng.choice(n, size=trials, p=w / w.sum())
        else:
            candidates = rng.choice(n, size=trials, p=potential / total)
        best, best_pot, best_closest = -1, np.inf, closest
        for cand in candidates:
            new_closest = np.minimum(closest, np.sum((points - points[cand]) ** 2, axis=1))
            pot = float(np.sum(w * new_closest))
            if pot < best_pot:
                best, best_pot, best_closest = int(cand), pot, new_closest
        centers[c] = points[best]
        closest = best_closest
    return centers


def weighted_kmeans(
    points: NDArray[np.float64],
    n_clusters: int,
    *,
    sample_weight: NDArray[np.float64],
    rng: np.random.Generator,
    n_init: int = 10,
    max_iter: int = 100,
    tol: float = 1e-8,
) -> tuple[NDArray[np.float64], float]:
    """Weighted k-means (k-means++ seeding, Lloyd iterations), best of ``n_init`` runs.

    Used by the server on *aggregated* summaries (weighted centres), never on raw points.

    Parameters
    ----------
    points : ndarray of shape (n_points, n_features)
    n_clusters : int
        Must not exceed the number of points with positive weight.
    sample_weight : ndarray of shape (n_points,)
    rng : numpy.random.Generator
    n_init, max_iter : int
    tol : float

    Returns
    -------
    centroids : ndarray of shape (n_clusters, n_features)
    cost : float
        Weighted within-cluster sum of squares of ``points``.
    """
    w = np.asarray(sample_weight, dtype=np.float64)
    positive = int(np.count_nonzero(w > 0))
    if positive < n_clusters:
        raise ValueError(f"n_points with positive weight={positive} should be >= "
                         f"n_clusters={n_clusters}.")
    best_centroids, best_cost = None, np.inf
    for _ in range(n_init):
        centroids = kmeans_plus_plus(points, n_clusters, sample_weight=w, rng=rng)
        previous = None
        for _ in range(max_iter):
            stats = compute_stats(points, centroids, sample_weight=w)
            new, _ = update_centroids(stats, centroids, min_count=1e-9)
            shift = centroid_shift(centroids, new)
            centroids = new
            if has_converged(shift=shift, previous_cost=previous, cost=stats.cost, tol=tol):
                break
            previous = stats.cost
        cost = compute_stats(points, centroids, sample_weight=w).cost
        # Restarts that reach the same optimum (often with permuted labels) differ only by
        # rounding: keep the first, so results do not hinge on the last bits of the input.
        if cost < best_cost * (1.0 - TIE_RTOL):
            best_centroids, best_cost = centroids, cost
    assert best_centroids is not None  # n_init >= 1 always sets it
    return best_centroids, float(best_cost)
