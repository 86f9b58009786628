"""The encoder a ``model=ae_kmeans`` segment model carries, so sites assign customers locally.

A site must never execute code from a file the server sent: the encoder is stored as plain
numbers in the segment model's JSON -- the architecture (a few integers naming a layout this
fedseg builds itself, :data:`common.autoencoder.ARCHITECTURE_ID`), the weights as base64 of
little-endian float64, the embedding's scaling and centres -- and a SHA-256 checksum over
all of it, verified before anything is used. Nothing is unpickled (no ``pickle``, no
``torch.load``); a file whose checksum, architecture or sizes do not match is refused with
the key that is wrong.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from common.autoencoder import (
    ARCHITECTURE_ID,
    AESettings,
    TabularLayout,
    embed,
    n_params,
    standardise,
)
from common.errors import DataError
from common.features import FeatureSpec
from common.kmeans import assign
from common.scaling import GlobalScaler

ENCODER_FORMAT = "fedseg.segment-encoder"
ENCODER_VERSION = 1
WEIGHTS_DTYPE = "<f8"


@dataclass(frozen=True)
class SegmentEncoder:
    """Encoder weights plus the embedding's scaling and centres (see module docstring).

    Attributes
    ----------
    settings : AESettings
        Architecture and the training settings it was trained with.
    weights : ndarray of shape (n_params,)
    mean, std : ndarray of shape (embed_dim,)
        Standardisation of the embedding (its secure moments).
    centres : ndarray of shape (n_centres, embed_dim)
        The k-means centres in the standardised embedding, before small segments were merged.
    segment_of_centre : tuple of int
        Published segment id of each centre (merged centres share one).
    """

    settings: AESettings
    weights: NDArray[np.float64]
    mean: NDArray[np.float64]
    std: NDArray[np.float64]
    centres: NDArray[np.float64]
    segment_of_centre: tuple[int, ...]

    def assign(self, transformed: NDArray[np.float64], *, features: tuple[FeatureSpec, ...],
               scaler: GlobalScaler) -> NDArray[np.intp]:
        """Segment of each record (records after their transforms; numeric ones z-scored here)."""
        layout = TabularLayout.from_features(features)
        x = standardise(transformed, layout, scaler.mean, scaler.std)
        z = embed(self.weights, x, layout=layout, settings=self.settings)
        labels, _ = assign((z - self.mean) / self.std, self.centres)
        return np.asarray(self.segment_of_centre, dtype=np.intp)[labels]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form with its checksum (``sha256`` over the canonical JSON of the rest)."""
        body = {
            "format": ENCODER_FORMAT,
            "version": ENCODER_VERSION,
            "architecture": self.settings.architecture(),
            "training": json.loads(self.settings.plan_json()),
            "weights": {
                "dtype": WEIGHTS_DTYPE,
                "shape": [int(self.weights.size)],
                "base64": base64.b64encode(
                    np.ascontiguousarray(self.weights, dtype=WEIGHTS_DTYPE).tobytes()).decode(),
            },
            "embedding_scaling": {"mean": [float(v) for v in self.mean],
                                  "std": [float(v) for v in self.std]},
            "centres": [[float(v) for v in row] for row in self.centres],
            "segment_of_centre": [int(s) for s in self.segment_of_centre],
        }
        return {**body, "sha256": _checksum(body)}

    @classmethod
    def from_dict(cls, doc: Any, *, features: tuple[FeatureSpec, ...], n_segments: int,
                  source: str = "<dict>") -> SegmentEncoder:
        """Verify the checksum, then rebuild; every mismatch names the key (never unpickles).

        Parameters
        ----------
        doc : dict
            The ``encoder`` section of a segment model.
        features : tuple of FeatureSpec
            The model's features (they fix the network's input layout).
        n_segments : int
            Published segments (``segment_of_centre`` must point into them).
        source : str
            File name for messages.
        """
        if not isinstance(doc, dict):
            raise DataError("key 'encoder' should be an object.", path=source)
        body = {k: v for k, v in doc.items() if k != "sha256"}
        if doc.get("format") != ENCODER_FORMAT or doc.get("version") != ENCODER_VERSION:
            raise DataError(f"key 'encoder': format {doc.get('format')!r} version "
                            f"{doc.get('version')!r}; this fedseg reads {ENCODER_FORMAT!r} "
                            f"version {ENCODER_VERSION}.", path=source)
        if doc.get("sha256") != _checksum(body):
            raise DataError("key 'encoder.sha256' does not match the encoder's content: the "
                            "file was altered or damaged; refusing to use it.", path=source)
        try:
            architecture = doc["architecture"]
            if architecture.get("id") != ARCHITECTURE_ID:
                raise ValueError(f"architecture {architecture.get('id')!r}; this fedseg builds "
                                 f"{ARCHITECTURE_ID!r}")
            settings = AESettings.from_plan_json(json.dumps(doc["training"]), device="auto")
            if settings.architecture() != architecture:
                raise ValueError("'architecture' and 'training' disagree")
            weights_doc = doc["weights"]
            if weights_doc.get("dtype") != WEIGHTS_DTYPE:
                raise ValueError(f"weights dtype {weights_doc.get('dtype')!r}; expected "
                                 f"{WEIGHTS_DTYPE!r}")
            raw = base64.b64decode(str(weights_doc["base64"]), validate=True)
            size = np.dtype(WEIGHTS_DTYPE).itemsize
            if len(raw) % size:
                raise ValueError(f"'encoder.weights' holds {len(raw)} bytes, not whole "
                                 f"{WEIGHTS_DTYPE} values ({size} bytes each)")
            weights = np.frombuffer(raw, dtype=WEIGHTS_DTYPE).astype(np.float64)
            mean = np.asarray(doc["embedding_scaling"]["mean"], dtype=np.float64)
            std = np.asarray(doc["embedding_scaling"]["std"], dtype=np.float64)
            centres = np.asarray(doc["centres"], dtype=np.float64)
            mapping = tuple(int(s) for s in doc["segment_of_centre"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise DataError(f"malformed key 'encoder': {exc}.", path=source) from exc
        expected = n_params(TabularLayout.from_features(features), settings)
        m = settings.embed_dim
        problems = []
        if weights.shape != (expected,) or list(weights_doc.get("shape", [])) != [expected]:
            problems.append(f"'encoder.weights' holds {weights.size} values; the architecture "
                            f"over these features has {expected}")
        if mean.shape != (m,) or std.shape != (m,) or not np.all(std > 0):
            problems.append(f"'encoder.embedding_scaling' should hold {m} means and {m} stds > 0")
        if centres.ndim != 2 or centres.shape[1:] != (m,) or len(mapping) != centres.shape[0]:
            problems.append(f"'encoder.centres' should be (n, {m}) with one "
                            "'segment_of_centre' entry per centre")
        if any(not 0 <= s < n_segments for s in mapping):
            problems.append(f"'encoder.segment_of_centre' should point into the {n_segments} "
                            "segments")
        if not all(np.all(np.isfinite(a)) for a in (weights, mean, std, centres)):
            problems.append("'encoder' holds non-finite numbers")
        if problems:
            raise DataError("; ".join(problems) + ".", path=source)
        return cls(settings=settings, weights=weights, mean=mean, std=std, centres=centres,
                   segment_of_centre=mapping)


def _checksum(body: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of ``body``."""
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def segment_of_centre(n_centres: int, merged: list[dict[str, Any]],
                      centres: NDArray[np.float64]) -> tuple[int, ...]:
    """Map each centre to its published segment after :meth:`ProfileStats.merge_small`.

    Merged centres follow the segment they joined; a dropped (empty) centre follows the
    nearest surviving centre; published ids are the survivors in their original order.

    Parameters
    ----------
    n_centres : int
    merged : list of dict
        The merge log: ``{"segment": i, "into": j or None}`` in original indices.
    centres : ndarray of shape (n_centres, embed_dim)
    """
    owner = list(range(n_centres))
    dropped: set[int] = set()
    for entry in merged:
        seg, into = int(entry["segment"]), entry["into"]
        for c in range(n_centres):
            if owner[c] == seg:
                if into is None:
                    dropped.add(c)
                else:
                    owner[c] = int(into)
    survivors = sorted({owner[c] for c in range(n_centres) if c not in dropped})
    published = {anchor: i for i, anchor in enumerate(survivors)}
    result = []
    for c in range(n_centres):
        if c in dropped:
            alive = [o for o in range(n_centres) if o not in dropped]
            nearest = min(alive, key=lambda o: float(np.sum((centres[o] - centres[c]) ** 2)))
            result.append(published[owner[nearest]])
        else:
            result.append(published[owner[c]])
    return tuple(result)
