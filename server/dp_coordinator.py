"""Server-side state machine of differentially private federated k-means (``privacy=secagg_dp``).

Redesigned for a privacy budget (measured in docs/BENCHMARKS.md, "Differential privacy"):

* **fixed schedule** -- moments (1 round), initialisation (``init_rounds``), Lloyd
  (``lloyd_rounds``), profile (1): every round costs budget, so the plan is known and
  accounted before the first release; there is no data-dependent early stop;
* **one centre set per round** -- parallel restarts would count every customer once per set;
  restarts happen on the server, for free, on the private summary;
* **a private initialisation that does not scatter budget**: a few dozen data-independent
  candidates (not thousands), one or two noisy Lloyd rounds on them, then weighted k-means++
  with many restarts on the noisy candidate means (post-processing);
* **centre-relative clipping**: a customer contributes its offset from its centre, clipped to
  ``privacy.clip`` standardised units, so the noise scales with a cluster's spread rather than
  with the whole feature range;
* the profile round is the last Lloyd step: the published centroids are its noisy means, the
  published sizes its noisy counts; segments below ``model.min_segment_size`` (by noisy count)
  are merged, all by post-processing.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from common.dp import DpPlan, round_noise_std, transformed_bounds
from common.errors import ProtocolError
from common.features import FeatureSpec
from common.init import random_centres
from common.kmeans import weighted_kmeans
from common.protocol import Phase, instruction_shapes, reply_shapes
from common.scaling import GlobalScaler
from common.segment_model import ProfileStats, SegmentModel
from server.coordinator import CoordinatorViews, KMeansSettings, RoundRecord

MIN_STD_FRACTION = 1e-3
"""A noisy variance is floored at this fraction of the feature's declared half-range, squared."""

COUNT_NOISE_FLOOR = 3.0
"""A centre whose noisy count is below this many count-noise stds is treated as empty."""


@dataclass
class DPKMeansCoordinator(CoordinatorViews):
    """Drives the DP phases from noisy sums (same interface as ``KMeansCoordinator``).

    Parameters
    ----------
    settings : KMeansSettings
        ``k``, ``min_segment_size`` and ``seed`` are used; the schedule comes from ``dp``.
    features : tuple of FeatureSpec
    dp : DpPlan
    init_candidates : int
        Data-independent candidate centres of the initialisation.
    """

    settings: KMeansSettings
    features: tuple[FeatureSpec, ...]
    dp: DpPlan
    init_candidates: int
    phase: Phase = Phase.MOMENTS
    scaler: GlobalScaler | None = None
    centres: NDArray[np.float64] | None = None
    history: list[RoundRecord] = field(default_factory=list)
    model_stats: ProfileStats | None = None
    converged: bool = False
    lloyd_rounds: int = 0
    best_run: int = 0
    _init_round: int = 0
    _box: tuple[NDArray[np.float64], NDArray[np.float64]] | None = None
    _round_started: float = field(default_factory=time.perf_counter)
    _released: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._rng = np.random.default_rng(self.settings.seed)

    @property
    def released_multipliers(self) -> list[float]:
        """Noise multiplier of every round released so far (what the run has spent)."""
        return list(self._released)

    def groups(self) -> int:
        """One centre set per round under DP."""
        return 1

    def instruction(self) -> tuple[str, list[NDArray[np.float64]], int]:
        """Return the phase name, the public arrays and the group count for this round."""
        self._round_started = time.perf_counter()
        if self.phase is Phase.MOMENTS:
            return self.phase.value, [], 1
        assert self.scaler is not None and self.centres is not None
        return self.phase.value, [self.scaler.mean, self.scaler.std, self.centres], 1

    def expected_reply_shapes(self) -> list[tuple[int, ...]]:
        """Public shapes of every site's reply in the current phase (DP layout)."""
        return reply_shapes(self.phase, n_centres=self.n_centres(), n_features=self.n_features,
                            dp=True)

    def expected_instruction_shapes(self) -> list[tuple[int, ...]]:
        """Public shapes of the instruction arrays in the current phase."""
        return instruction_shapes(self.phase, n_centres=self.n_centres(),
                                  n_features=self.n_features)

    def step(self, sums: list[NDArray[np.float64]], *, server_round: int, num_sites: int) -> None:
        """Consume the noisy sums of this round (value units, DP layout)."""
        if self.done:
            raise ProtocolError("the run is finished; no further round expected.")
        got = [np.shape(s) for s in sums]
        if got != self.expected_reply_shapes():
            raise ProtocolError(f"round {server_round} ({self.phase.value}): aggregate has "
                                f"shapes {got}; expected {self.expected_reply_shapes()}.")
        arrays = [np.asarray(s, dtype=np.float64) for s in sums]
        if not all(np.all(np.isfinite(a)) for a in arrays):
            raise ProtocolError(f"round {server_round} ({self.phase.value}): the decoded sums "
                                "are impossible (non-finite values); nothing is published.")
        self._released.append(self.dp.sigma[self.phase.value])
        record = RoundRecord(round=server_round, phase=self.phase.value, num_sites=num_sites,
                             seconds=0.0)
        if self.phase is Phase.MOMENTS:
            self._moments(arrays)
            self.centres = np.clip(
                random_centres(self.init_candidates, self.n_features, rng=self._rng),
                *self.box)
            self.phase = Phase.INIT
        elif self.phase is Phase.INIT:
            sums_u, counts = arrays
            self.centres = self._update(self.centres, sums_u, counts)
            self._init_round += 1
            if self._init_round >= self.dp.rounds["init"]:
                self.centres = self._summary(self.centres, counts)
                self.phase = Phase.LLOYD if self.dp.rounds.get("lloyd", 0) else Phase.PROFILE
        elif self.phase is Phase.LLOYD:
            sums_u, counts = arrays
            old = self.centres
            assert old is not None
            self.centres = self._update(old, sums_u, counts)
            record.shift = float(np.max(np.linalg.norm(self.centres - old, axis=1)))
            self.lloyd_rounds += 1
            if self.lloyd_rounds >= self.dp.rounds["lloyd"]:
                self.phase = Phase.PROFILE
        else:
            counts, sums_u = arrays
            assert self.centres is not None
            self.model_stats = ProfileStats.from_dp(
                counts, counts[:, None] * self.centres + sums_u)
            self.converged = False  # a fixed DP schedule: convergence is not tested
        record.seconds = time.perf_counter() - self._round_started
        self.history.append(record)

    @property
    def box(self) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """The declared bounds in standardised units (public once the scaling is)."""
        assert self._box is not None
        return self._box

    def _moments(self, arrays: list[NDArray[np.float64]]) -> None:
        count_arr, s1, s2 = arrays
        low, high = transformed_bounds(self.dp.bounds, self.features)
        mid, half = (low + high) / 2, (high - low) / 2
        count = float(count_arr[0])
        count_std = round_noise_std(Phase.MOMENTS, self.dp, self.features)[0]
        if count < max(2.0, 10 * count_std):
            raise ProtocolError(
                f"the noisy customer count ({count:.0f}) is within 10 noise stds "
                f"({count_std:.1f}) of zero: this federation is too small for "
                f"privacy.epsilon={self.dp.epsilon}. Raise privacy.epsilon or add customers; "
                "nothing is published.")
        # Normalised moments (common.dp.moments_words): z = (x - mid) / half in [-1, 1].
        z_mean = np.clip(s1 / count, -1.0, 1.0)
        z_second = np.clip(s2 / count + 0.5, 0.0, 1.0)
        # A variance the noise cannot resolve is floored at twice the noise std of the mean
        # square (a degenerate, near-zero std would blow that feature up in the model).
        square_noise = round_noise_std(Phase.MOMENTS, self.dp, self.features)[2] / count
        z_var = np.clip(z_second - z_mean**2, max(MIN_STD_FRACTION**2, 2 * square_noise), 1.0)
        mean = mid + half * z_mean
        var = half * half * z_var
        self.scaler = GlobalScaler(mean=mean, std=np.sqrt(var), count=count)
        self._box = ((low - mean) / self.scaler.std, (high - mean) / self.scaler.std)
        k = self.settings.k
        counts_std = round_noise_std(Phase.LLOYD if self.dp.rounds.get("lloyd") else
                                     Phase.PROFILE, self.dp, self.features)
        noise = counts_std[1] if self.dp.rounds.get("lloyd") else counts_std[0]
        if count / k < COUNT_NOISE_FLOOR * noise:
            raise ProtocolError(
                f"about {count / k:.0f} customers per segment, but each segment's count gets "
                f"noise of std {noise:.0f} at privacy.epsilon={self.dp.epsilon}: the segments "
                "would be noise. Raise privacy.epsilon, lower model.k or add customers; "
                "nothing beyond the noisy moments is released.")

    def _count_floor(self, phase: Phase) -> float:
        stds = round_noise_std(phase, self.dp, self.features)
        count_std = stds[0] if phase is Phase.PROFILE else stds[1]
        return COUNT_NOISE_FLOOR * count_std

    def _update(self, centres: NDArray[np.float64] | None, sums_u: NDArray[np.float64],
                counts: NDArray[np.float64]) -> NDArray[np.float64]:
        """Noisy Lloyd step: ``c + sum(clip(x - c)) / n`` where the noisy count is trustworthy."""
        assert centres is not None
        floor = max(self._count_floor(self.phase), 1.0)
        new = centres.copy()
        ok = counts >= floor
        new[ok] = centres[ok] + sums_u[ok] / counts[ok, None]
        return np.clip(new, *self.box)

    def _summary(self, centres: NDArray[np.float64], counts: NDArray[np.float64]
                 ) -> NDArray[np.float64]:
        """Reduce the noisy candidate means to ``k`` centres (weighted k-means++, restarts)."""
        k = self.settings.k
        floor = max(self._count_floor(Phase.INIT), float(self.settings.min_segment_size))
        keep = counts >= floor
        if int(keep.sum()) < k:
            keep = np.zeros_like(keep)
            keep[np.argsort(-counts)[:k]] = True
        weights = np.maximum(counts[keep], 1.0)
        result, _ = weighted_kmeans(centres[keep], k, sample_weight=weights, rng=self._rng,
                                    n_init=20)
        return np.asarray(result, dtype=np.float64)

    def build_model(self, *, privacy: dict[str, Any], config: dict[str, Any]) -> SegmentModel:
        """Package the noisy profile as a :class:`SegmentModel` (post-processing only)."""
        if self.model_stats is None or self.scaler is None:
            raise ProtocolError("the run has not reached the profile round; no model to build.")
        training = {
            "k_requested": self.settings.k,
            "init": "dp-summary",
            "init_candidates": self.init_candidates,
            "n_init": 1,
            "lloyd_rounds": self.lloyd_rounds,
            "total_rounds": len(self.history),
            "converged": None,
            "cost": None,
            "num_records": float(self.model_stats.counts.sum()),
        }
        return self._segment_model(privacy=privacy, training=training, config=config)


def expected_noise_summary(dp: DpPlan, features: tuple[FeatureSpec, ...]) -> dict[str, Any]:
    """Noise std per released array and phase (value units), for the run record."""
    return {p.value: [float(f"{s:.4g}") for s in round_noise_std(p, dp, features)]
            for p in (Phase.MOMENTS, Phase.INIT, Phase.LLOYD, Phase.PROFILE)
            if dp.rounds.get(p.value, 0) and not math.isnan(dp.sigma[p.value])}
