"""Initialisation of federated k-means that is robust to non-IID sites and sends no raw point.

The default, ``summary`` initialisation, works in two steps:

1. *Over-clustering under secure aggregation.* The server proposes ``n_candidates`` (several
   times ``k``) data-independent centres drawn from N(0, I) in the globally standardised space
   and runs a few federated Lloyd rounds on them (empty candidates are re-seeded by splitting
   the costliest one). Sites only ever send per-candidate sums, counts and costs, summed across
   sites by SecAgg+.
2. *Server-side reduction.* The aggregated candidate means, weighted by their global counts,
   form a small weighted summary of the pooled data (a coreset in the spirit of k-FED, Dennis
   et al., 2021, but aggregated across sites). The server runs weighted k-means++ with
   ``n_init`` restarts on it and takes the best ``k`` centres.

Candidates with fewer than ``min_count`` records are left out of the summary, so a centre that
describes one or a few customers never shapes the model.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from common.errors import ProtocolError
from common.kmeans import KMeansStats, weighted_kmeans


def random_centres(
    n_centres: int, n_features: int, *, rng: np.random.Generator
) -> NDArray[np.float64]:
    """Draw data-independent centres from N(0, I) in the standardised feature space.

    Parameters
    ----------
    n_centres, n_features : int
    rng : numpy.random.Generator
    """
    if n_centres < 1 or n_features < 1:
        raise ValueError(f"n_centres={n_centres} and n_features={n_features} should be >= 1.")
    return rng.standard_normal((n_centres, n_features))


def centres_from_summary(
    stats: KMeansStats,
    n_clusters: int,
    *,
    rng: np.random.Generator,
    min_count: float,
    n_init: int = 10,
) -> NDArray[np.float64]:
    """Reduce aggregated candidate statistics to ``n_clusters`` initial centroids.

    Parameters
    ----------
    stats : KMeansStats
        Candidate statistics summed over all sites (last over-clustering round).
    n_clusters : int
        The ``k`` of the model.
    rng : numpy.random.Generator
    min_count : float
        Candidates with a smaller global count are excluded from the summary.
    n_init : int, default=10
        Restarts of the server-side weighted k-means.

    Returns
    -------
    ndarray of shape (n_clusters, n_features)
    """
    keep = stats.counts >= max(min_count, 1e-9)
    if int(keep.sum()) < n_clusters:
        # Too few well-populated candidates: fall back to every non-empty one.
        keep = stats.counts > 0
    if int(keep.sum()) < n_clusters:
        raise ProtocolError(
            f"the data hold only {int(keep.sum())} well-separated groups of customers for "
            f"model.k={n_clusters}: lower model.k (or raise strategy.init_candidates)."
        )
    points = stats.sums[keep] / stats.counts[keep, None]
    centroids, _ = weighted_kmeans(
        points, n_clusters, sample_weight=stats.counts[keep], rng=rng, n_init=n_init
    )
    return centroids
