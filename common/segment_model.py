"""The segment model: fedseg's product, a versioned JSON document sites apply locally.

It is built by the server from aggregated statistics only (:class:`ProfileStats` summed over
sites), after segments smaller than the minimum size have been merged into their nearest
neighbour, and it carries the privacy settings it was built under. Sites load it with
:meth:`SegmentModel.load` and assign their own customers with :meth:`SegmentModel.assign`;
assignments never leave the site.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from common.errors import DataError, ProtocolError
from common.features import FeatureSpec, apply_transforms, invert_transforms
from common.kmeans import assign
from common.scaling import GlobalScaler
from common.segment_encoder import SegmentEncoder

SCHEMA_NAME = "fedseg.segment-model"
SCHEMA_VERSION = 1
ENCODER_SCHEMA_VERSION = 2
"""A model that assigns through an encoder (``model=ae_kmeans``): a reader that only knows
version 1 would assign by the profile centroids instead, so it must refuse the file."""

NAME_THRESHOLD = 0.5
"""A feature enters a segment's name when its mean is this many global stds from average."""


@dataclass(frozen=True)
class ProfileStats:
    """Additive per-segment statistics for the final model (one last secure round).

    Attributes
    ----------
    counts : ndarray of shape (n_segments,)
    sums : ndarray of shape (n_segments, n_features)
        Sums of standardised points.
    costs : ndarray of shape (n_segments,)
        Within-segment sums of squares in standardised space.
    raw_sums, raw_sumsq : ndarray of shape (n_segments, n_features)
        Sums and sums of squares in raw units (for profiles a person can read).
    """

    counts: NDArray[np.float64]
    sums: NDArray[np.float64]
    costs: NDArray[np.float64] | None
    raw_sums: NDArray[np.float64] | None
    raw_sumsq: NDArray[np.float64] | None

    @classmethod
    def from_dp(cls, counts: NDArray[np.float64], sums: NDArray[np.float64]) -> ProfileStats:
        """Noisy counts and standardised sums only (``privacy=secagg_dp``, :mod:`common.dp`).

        Costs and raw-unit sums are not released under DP; profiles then show each segment's
        typical value (its centroid mapped back to raw units) instead of raw means and stds.
        """
        return cls(counts=np.asarray(counts, np.float64), sums=np.asarray(sums, np.float64),
                   costs=None, raw_sums=None, raw_sumsq=None)

    @staticmethod
    def shapes(n_segments: int, n_features: int) -> list[tuple[int, ...]]:
        """Public shapes of :meth:`to_arrays`."""
        k, d = n_segments, n_features
        return [(k,), (k, d), (k,), (k, d), (k, d)]

    def to_arrays(self) -> list[NDArray[np.float64]]:
        """Return the layout sent to the server."""
        assert self.costs is not None and self.raw_sums is not None and \
            self.raw_sumsq is not None
        return [self.counts, self.sums, self.costs, self.raw_sums, self.raw_sumsq]

    @classmethod
    def from_arrays(
        cls, arrays: list[NDArray[np.float64]], *, n_segments: int, n_features: int
    ) -> ProfileStats:
        """Build from :meth:`to_arrays` output (or its sum), checking the public shapes."""
        got = [np.shape(a) for a in arrays]
        expected = cls.shapes(n_segments, n_features)
        if got != expected:
            raise ProtocolError(f"profile statistics have shapes {got}; expected {expected}.")
        c, s, co, rs, rq = (np.asarray(a, dtype=np.float64) for a in arrays)
        return cls(counts=c, sums=s, costs=co, raw_sums=rs, raw_sumsq=rq)

    @classmethod
    def compute(
        cls,
        raw: NDArray[np.float64],
        scaled: NDArray[np.float64],
        centroids: NDArray[np.float64],
    ) -> ProfileStats:
        """Compute the statistics of one site's records for the given centroids.

        Parameters
        ----------
        raw : ndarray of shape (n_samples, n_features)
            Raw feature values.
        scaled : ndarray of shape (n_samples, n_features)
            The same records transformed and globally standardised.
        centroids : ndarray of shape (n_segments, n_features)
        """
        labels, d2 = assign(scaled, centroids)
        return cls.compute_labelled(raw, scaled, labels, d2, n_segments=centroids.shape[0])

    @classmethod
    def compute_labelled(
        cls,
        raw: NDArray[np.float64],
        scaled: NDArray[np.float64],
        labels: NDArray[np.intp],
        distances: NDArray[np.float64],
        *,
        n_segments: int,
    ) -> ProfileStats:
        """Statistics of one site's records already assigned to segments elsewhere.

        ``model=ae_kmeans`` assigns in the embedding; the profile still sums the original
        features so that segments read in their units.

        Parameters
        ----------
        raw, scaled : ndarray of shape (n_samples, n_features)
            Raw and globally standardised records.
        labels : ndarray of shape (n_samples,)
            Segment of each record.
        distances : ndarray of shape (n_samples,)
            Squared distance of each record to its centre (in the space it was assigned in).
        n_segments : int
        """
        k, d = n_segments, raw.shape[1]
        counts = np.bincount(labels, minlength=k).astype(np.float64)
        costs = np.bincount(labels, weights=distances, minlength=k).astype(np.float64)
        sums = np.zeros((k, d))
        raw_sums = np.zeros((k, d))
        raw_sumsq = np.zeros((k, d))
        np.add.at(sums, labels, scaled)
        np.add.at(raw_sums, labels, raw)
        np.add.at(raw_sumsq, labels, raw * raw)
        return cls(counts=counts, sums=sums, costs=costs, raw_sums=raw_sums, raw_sumsq=raw_sumsq)

    def merge_small(self, min_size: int) -> tuple[ProfileStats, list[dict[str, Any]]]:
        """Merge every segment smaller than ``min_size`` into its nearest neighbour.

        The smallest offending segment is merged first into the segment whose standardised
        mean is closest; statistics are additive, so the merged segment is exact. Empty
        segments are dropped. Stops when every segment has ``min_size`` members or one is left.

        Returns
        -------
        merged : ProfileStats
        log : list of dict
            One entry per merge: ``{"segment": i, "into": j}`` in original indices (``into``
            None for a dropped empty segment). The size of a merged segment is not recorded:
            it is below the publication floor.
        """
        k, d = self.sums.shape
        exact = self.costs is not None and self.raw_sums is not None and \
            self.raw_sumsq is not None
        zeros = np.zeros((k, d))
        groups: list[list[int]] = [[i] for i in range(len(self.counts))]
        counts = list(self.counts)
        sums = [row.copy() for row in self.sums]
        costs = list(self.costs) if self.costs is not None else [0.0] * k
        raw_sums = [row.copy() for row in (self.raw_sums if self.raw_sums is not None
                                           else zeros)]
        raw_sumsq = [row.copy() for row in (self.raw_sumsq if self.raw_sumsq is not None
                                            else zeros)]
        log: list[dict[str, Any]] = []
        while len(counts) > 1:
            small = [i for i, c in enumerate(counts) if c < min_size]
            if not small:
                break
            i = min(small, key=lambda s: counts[s])
            # A noisy (DP) count can be zero or below: such a segment is dropped as empty.
            if counts[i] <= 0:
                log.append({"segment": groups[i][0], "into": None})
            else:
                centre_i = sums[i] / counts[i]
                others = [j for j in range(len(counts)) if j != i and counts[j] > 0]
                j = min(
                    others, key=lambda o: float(np.sum((sums[o] / counts[o] - centre_i) ** 2))
                )
                log.append({"segment": groups[i][0], "into": groups[j][0]})
                # Exact merge: cost about the merged mean by the parallel-axis theorem.
                n = counts[i] + counts[j]
                mean = (sums[i] + sums[j]) / n
                shift_i = counts[i] * float(np.sum((sums[i] / counts[i] - mean) ** 2))
                shift_j = counts[j] * float(np.sum((sums[j] / counts[j] - mean) ** 2))
                costs[j] = costs[i] + costs[j] + shift_i + shift_j
                counts[j] = n
                sums[j] = sums[j] + sums[i]
                raw_sums[j] = raw_sums[j] + raw_sums[i]
                raw_sumsq[j] = raw_sumsq[j] + raw_sumsq[i]
                groups[j] = groups[j] + groups[i]
            for lst in (groups, counts, sums, costs, raw_sums, raw_sumsq):
                del lst[i]
        m = len(counts)
        merged = ProfileStats(
            counts=np.asarray(counts, dtype=np.float64),
            sums=np.asarray(sums, dtype=np.float64).reshape(m, -1),
            costs=np.asarray(costs, dtype=np.float64) if exact else None,
            raw_sums=np.asarray(raw_sums, dtype=np.float64).reshape(m, -1) if exact else None,
            raw_sumsq=np.asarray(raw_sumsq, dtype=np.float64).reshape(m, -1) if exact else None,
        )
        return merged, log


@dataclass(frozen=True)
class Segment:
    """One published segment."""

    id: int
    name: str
    description: str
    size: int
    share: float
    centroid_scaled: list[float]
    centroid: dict[str, float]
    mean: dict[str, float]
    std: dict[str, float]


def _fmt(value: float) -> str:
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 1:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _name_segments(
    centroids_scaled: NDArray[np.float64], features: tuple[FeatureSpec, ...]
) -> list[tuple[str, list[int]]]:
    """Readable names from each segment's most distinctive features (by |z|)."""
    named: list[tuple[str, list[int]]] = []
    for z in centroids_scaled:
        order = [int(j) for j in np.argsort(-np.abs(z)) if abs(z[j]) >= NAME_THRESHOLD]
        named.append(("", order))
    result: list[tuple[str, list[int]]] = []
    for idx, (_, order) in enumerate(named):
        z = centroids_scaled[idx]
        words = [features[j].high if z[j] > 0 else features[j].low for j in order]
        result.append((", ".join(words[:2]) if words else "average customers", order))
    # Disambiguate equal names with a third distinctive feature, then with a number.
    names = [n for n, _ in result]
    for idx, (name, order) in enumerate(result):
        if names.count(name) > 1 and len(order) > 2:
            z = centroids_scaled[idx]
            j = order[2]
            names[idx] = f"{name}, {features[j].high if z[j] > 0 else features[j].low}"
    for idx, name in enumerate(names):
        if names.count(name) > 1:
            names[idx] = f"{name} ({idx + 1})"
    return [(n[:1].upper() + n[1:], order) for n, (_, order) in zip(names, result, strict=True)]


@dataclass(frozen=True)
class SegmentModel:
    """The published segment model (see module docstring); serialise with :meth:`to_json`."""

    features: tuple[FeatureSpec, ...]
    scaler: GlobalScaler
    segments: tuple[Segment, ...]
    privacy: dict[str, Any]
    training: dict[str, Any]
    config: dict[str, Any]
    merged: list[dict[str, Any]] = field(default_factory=list)
    created_at: str = ""
    encoder: SegmentEncoder | None = None
    """``model=ae_kmeans``: customers are assigned in the encoder's embedding."""

    @property
    def centroids_scaled(self) -> NDArray[np.float64]:
        """Centroids in standardised space, shape (n_segments, n_features)."""
        return np.asarray([s.centroid_scaled for s in self.segments], dtype=np.float64)

    @classmethod
    def build(
        cls,
        *,
        stats: ProfileStats,
        features: tuple[FeatureSpec, ...],
        scaler: GlobalScaler,
        min_segment_size: int,
        privacy: dict[str, Any],
        training: dict[str, Any],
        config: dict[str, Any],
    ) -> SegmentModel:
        """Merge small segments, then name, describe and package the rest.

        Parameters
        ----------
        stats : ProfileStats
            Per-segment statistics summed over all sites at the final centroids.
        features : tuple of FeatureSpec
        scaler : GlobalScaler
        min_segment_size : int
            Segments with fewer members are merged into their nearest neighbour.
        privacy, training, config : dict
            Recorded verbatim in the model.
        """
        total = float(stats.counts.sum())
        if total < min_segment_size:
            raise ProtocolError(
                f"only {total:g} customers across all sites, fewer than "
                f"model.min_segment_size={min_segment_size}: no segment can be published."
            )
        merged, log = stats.merge_small(min_segment_size)
        centroids = merged.sums / merged.counts[:, None]
        centroid_raw = invert_transforms(scaler.inverse_transform(centroids), features)
        if merged.raw_sums is not None and merged.raw_sumsq is not None:
            means = merged.raw_sums / merged.counts[:, None]
            stds: NDArray[np.float64] | None = np.sqrt(
                np.maximum(merged.raw_sumsq / merged.counts[:, None] - means**2, 0.0))
            overall = merged.raw_sums.sum(axis=0) / total
        else:
            # DP: raw-unit sums are not released. A segment's typical value is its centroid
            # in raw units; "overall" is the centre of the global scaling, in raw units.
            means, stds = centroid_raw, None
            overall = invert_transforms(scaler.mean[None, :], features)[0]
        names = _name_segments(centroids, features)
        segments = []
        for i, (name, order) in enumerate(names):
            share = float(merged.counts[i] / total)
            parts = []
            for j in order[:3]:
                spec = features[j]
                unit = f" {spec.unit}" if spec.unit else ""
                word = spec.high if centroids[i, j] > 0 else spec.low
                parts.append(
                    f"{spec.name} {_fmt(means[i, j])}{unit} vs {_fmt(overall[j])} overall ({word})"
                )
            detail = "; ".join(parts) if parts else "no feature far from the overall average"
            segments.append(
                Segment(
                    id=i,
                    name=name,
                    description=f"{int(merged.counts[i])} customers ({share:.1%}): {detail}.",
                    size=round(float(merged.counts[i])),
                    share=share,
                    centroid_scaled=[float(v) for v in centroids[i]],
                    centroid={f.name: float(v) for f, v in zip(features, centroid_raw[i],
                                                               strict=True)},
                    mean={f.name: float(v) for f, v in zip(features, means[i], strict=True)},
                    std={} if stds is None else
                    {f.name: float(v) for f, v in zip(features, stds[i], strict=True)},
                )
            )
        return cls(
            features=features,
            scaler=scaler,
            segments=tuple(segments),
            privacy={**privacy, "min_segment_size": int(min_segment_size)},
            training=training,
            config=config,
            merged=log,
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )

    def assign(self, raw: NDArray[np.float64]) -> NDArray[np.intp]:
        """Assign raw customer records (shape (n_samples, n_features)) to segment ids, locally."""
        raw = np.asarray(raw, dtype=np.float64)
        if raw.ndim != 2 or raw.shape[1] != len(self.features):
            raise DataError(
                f"records of shape {raw.shape} should have {len(self.features)} columns "
                f"({', '.join(f.name for f in self.features)})."
            )
        for j, spec in enumerate(self.features):
            column = raw[:, j]
            bad = ~np.isfinite(column)
            if spec.transform == "log1p":
                bad |= column <= -1
            if bad.any():
                row = int(np.flatnonzero(bad)[0])
                expected = "a finite number > -1" if spec.transform == "log1p" else \
                    "a finite number"
                raise DataError(f"value {column[row]!r} is not {expected}.", row=row + 1,
                                column=spec.name)
        transformed = apply_transforms(raw, self.features)
        if self.encoder is not None:
            return self.encoder.assign(transformed, features=self.features, scaler=self.scaler)
        labels, _ = assign(self.scaler.transform(transformed), self.centroids_scaled)
        return labels

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary following schema ``fedseg.segment-model`` (v2 with an encoder)."""
        return {
            "schema": SCHEMA_NAME,
            "schema_version": SCHEMA_VERSION if self.encoder is None else ENCODER_SCHEMA_VERSION,
            "created_at": self.created_at,
            "features": [
                {"name": f.name, "unit": f.unit, "transform": f.transform,
                 "high_label": f.high_label, "low_label": f.low_label, "label": f.label,
                 "kind": f.kind, "group": f.group}
                for f in self.features
            ],
            "scaling": {
                "space": "transformed",
                "mean": [float(v) for v in self.scaler.mean],
                "std": [float(v) for v in self.scaler.std],
                "count": float(self.scaler.count),
            },
            "segments": [s.__dict__ for s in self.segments],
            "merged_segments": self.merged,
            "privacy": self.privacy,
            "training": self.training,
            "config": self.config,
            **({} if self.encoder is None else {"encoder": self.encoder.to_dict()}),
        }

    def to_json(self, path: str | Path) -> None:
        """Write the model to ``path`` as indented JSON."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def from_dict(cls, doc: dict[str, Any], *, source: str = "<dict>") -> SegmentModel:
        """Load and validate a model dictionary; errors name the offending key."""
        if not isinstance(doc, dict):
            raise DataError(f"expected a JSON object, got {type(doc).__name__}.", path=source)
        if doc.get("schema") != SCHEMA_NAME:
            raise DataError(f"key 'schema' is {doc.get('schema')!r}; expected {SCHEMA_NAME!r}.",
                            path=source)
        version = doc.get("schema_version")
        if version not in (SCHEMA_VERSION, ENCODER_SCHEMA_VERSION):
            raise DataError(
                f"key 'schema_version' is {version!r}; this fedseg reads versions "
                f"{SCHEMA_VERSION} and {ENCODER_SCHEMA_VERSION}.", path=source)
        if (version == ENCODER_SCHEMA_VERSION) != ("encoder" in doc):
            raise DataError(f"key 'schema_version' is {version!r}, which "
                            f"{'needs' if version == ENCODER_SCHEMA_VERSION else 'has no'} key "
                            "'encoder'.", path=source)
        try:
            features = tuple(FeatureSpec(**f) for f in doc["features"])
            d = len(features)
            scaling = doc["scaling"]
            scaler = GlobalScaler(mean=np.asarray(scaling["mean"], dtype=np.float64),
                                  std=np.asarray(scaling["std"], dtype=np.float64),
                                  count=float(scaling["count"]))
            segments = tuple(Segment(**s) for s in doc["segments"])
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"malformed segment model: {exc!r}.", path=source) from exc
        if scaler.mean.shape != (d,) or scaler.std.shape != (d,):
            raise DataError(f"key 'scaling' should hold {d} means and stds.", path=source)
        for s in segments:
            if len(s.centroid_scaled) != d:
                raise DataError(f"segment {s.id}: 'centroid_scaled' should have {d} values.",
                                path=source)
        encoder = None if "encoder" not in doc else SegmentEncoder.from_dict(
            doc["encoder"], features=features, n_segments=len(segments), source=source)
        return cls(features=features, scaler=scaler, segments=segments,
                   privacy=doc.get("privacy", {}), training=doc.get("training", {}),
                   config=doc.get("config", {}), merged=doc.get("merged_segments", []),
                   created_at=doc.get("created_at", ""), encoder=encoder)

    @classmethod
    def load(cls, path: str | Path) -> SegmentModel:
        """Read a model written by :meth:`to_json`."""
        try:
            doc = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise DataError("segment model file not found.", path=str(path)) from exc
        except json.JSONDecodeError as exc:
            raise DataError(f"not valid JSON ({exc.msg} at line {exc.lineno}).",
                            path=str(path)) from exc
        except UnicodeDecodeError as exc:
            raise DataError("is not UTF-8 text; expected a JSON segment model.",
                            path=str(path)) from exc
        except OSError as exc:
            raise DataError(f"cannot be read ({exc.strerror}).", path=str(path)) from exc
        return cls.from_dict(doc, source=str(path))
