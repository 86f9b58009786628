"""Public feature metadata and the transforms applied at the site before standardisation."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from common.errors import ConfigError

TRANSFORMS = ("none", "log1p")
KINDS = ("numeric", "boolean", "category")
"""What a column holds: a number, a 0/1 flag, or one 0/1 column of a one-hot categorical."""


@dataclass(frozen=True)
class FeatureSpec:
    """What the federation agrees about one feature (public, data-independent).

    Attributes
    ----------
    name : str
        Column name.
    unit : str
        Unit for reports, e.g. ``"days"``.
    transform : str
        ``"none"`` or ``"log1p"``, applied before global standardisation.
    high_label, low_label : str
        Words used in segment names when a segment is well above / below average.
    label : str
        What a reader calls the feature (e.g. ``"Annual spend"``); defaults to the name.
    kind : str
        ``"numeric"`` (default), ``"boolean"`` (0/1) or ``"category"``: one 0/1 column of a
        categorical feature one-hot encoded over its declared vocabulary.
    group : str
        For ``kind="category"``: the categorical feature this column belongs to (its columns
        are consecutive, one per vocabulary value, exactly one of them 1 per record).
    """

    name: str
    unit: str = ""
    transform: str = "none"
    high_label: str = ""
    low_label: str = ""
    label: str = ""
    kind: str = "numeric"
    group: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"feature {self.name!r}: kind={self.kind!r} should be one of "
                              f"{', '.join(KINDS)}.")
        if (self.kind == "category") != bool(self.group):
            raise ConfigError(f"feature {self.name!r}: a category column needs its group (the "
                              "categorical feature it belongs to), and only it has one.")
        if self.kind != "numeric" and self.transform != "none":
            raise ConfigError(f"feature {self.name!r}: a {self.kind} column takes no transform.")
        if self.transform not in TRANSFORMS:
            raise ConfigError(
                f"feature {self.name!r}: transform={self.transform!r} should be one of "
                f"{', '.join(TRANSFORMS)}."
            )

    @property
    def title(self) -> str:
        """What a reader calls the feature (``label``, else the name)."""
        return self.label or self.name

    @property
    def high(self) -> str:
        """Word for a high value (defaults to ``"high <name>"``)."""
        return self.high_label or f"high {self.name}"

    @property
    def low(self) -> str:
        """Word for a low value (defaults to ``"low <name>"``)."""
        return self.low_label or f"low {self.name}"


def apply_transforms(
    raw: NDArray[np.float64], features: tuple[FeatureSpec, ...]
) -> NDArray[np.float64]:
    """Apply each feature's transform column-wise.

    Parameters
    ----------
    raw : ndarray of shape (n_samples, n_features)
        Raw values; ``log1p`` columns must be > -1 (checked by the data loaders).
    features : tuple of FeatureSpec
        One per column.
    """
    out = np.array(raw, dtype=np.float64, copy=True)
    for j, spec in enumerate(features):
        if spec.transform == "log1p":
            out[:, j] = np.log1p(out[:, j])
    return out


def invert_transforms(
    values: NDArray[np.float64], features: tuple[FeatureSpec, ...]
) -> NDArray[np.float64]:
    """Map transformed values back to raw units (``expm1`` for ``log1p``)."""
    out = np.array(values, dtype=np.float64, copy=True)
    for j, spec in enumerate(features):
        if spec.transform == "log1p":
            out[..., j] = np.expm1(out[..., j])
    return out
