"""Global standardisation from securely aggregated moments.

Every site sends ``[count, sum, sum of squares]`` of its (transformed) features; the server sees
only their sums across sites and derives one global mean and standard deviation per feature, so
all sites standardise identically. Local statistics are never used for scaling: on non-IID data
they would put each site in a different coordinate system.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from common.errors import ProtocolError

_MIN_STD = 1e-12


def compute_moments(points: NDArray[np.float64]) -> list[NDArray[np.float64]]:
    """Return the additive moments ``[count (1,), sums (d,), sums of squares (d,)]`` of points.

    Parameters
    ----------
    points : ndarray of shape (n_samples, n_features)
    """
    x = np.asarray(points, dtype=np.float64)
    return [
        np.array([float(x.shape[0])]),
        x.sum(axis=0),
        np.einsum("ij,ij->j", x, x),
    ]


@dataclass(frozen=True)
class GlobalScaler:
    """Per-feature standardisation ``(x - mean) / std`` with global statistics.

    Attributes
    ----------
    mean : ndarray of shape (n_features,)
    std : ndarray of shape (n_features,)
        Population standard deviation; a constant feature gets 1.0 (it then scales to 0).
    count : float
        Number of records the statistics were computed on.
    """

    mean: NDArray[np.float64]
    std: NDArray[np.float64]
    count: float

    @classmethod
    def from_moments(cls, moments: list[NDArray[np.float64]], *, n_features: int) -> GlobalScaler:
        """Build the scaler from moments summed over sites.

        Parameters
        ----------
        moments : list of ndarray
            ``[count (1,), sums (d,), sums of squares (d,)]``.
        n_features : int
            The public feature count ``d``.
        """
        shapes = [np.shape(m) for m in moments]
        if shapes != [(1,), (n_features,), (n_features,)]:
            raise ProtocolError(
                f"moments have shapes {shapes}; expected [(1,), ({n_features},), ({n_features},)]."
            )
        count = float(moments[0][0])
        if count < 2:
            raise ProtocolError(f"only {count:g} records across all sites; need at least 2.")
        mean = moments[1] / count
        var = np.maximum(moments[2] / count - mean**2, 0.0)
        std = np.sqrt(var)
        std = np.where(std < _MIN_STD * np.maximum(1.0, np.abs(mean)), 1.0, std)
        return cls(mean=mean, std=std, count=count)

    def transform(self, points: NDArray[np.float64]) -> NDArray[np.float64]:
        """Standardise points of shape (n_samples, n_features)."""
        return (np.asarray(points, dtype=np.float64) - self.mean) / self.std

    def inverse_transform(self, points: NDArray[np.float64]) -> NDArray[np.float64]:
        """Map standardised points back to the (transformed) feature space."""
        return np.asarray(points, dtype=np.float64) * self.std + self.mean
