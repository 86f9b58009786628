"""Server-side state machine of federated k-means, free of Flower.

:class:`KMeansCoordinator` decides what every round asks the sites for and turns the summed
statistics of the round into the next state: global scaling, initial centroids, Lloyd updates
and, at the end, the :class:`~common.segment_model.SegmentModel`. The Flower strategy in
:mod:`server.strategy` only moves its instructions and sums over the network.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from common.errors import ConfigError, ProtocolError
from common.features import FeatureSpec
from common.init import centres_from_summary, random_centres
from common.kmeans import (
    TIE_RTOL,
    KMeansStats,
    centroid_shift,
    has_converged,
    update_centroids,
)
from common.protocol import Phase, instruction_shapes, reply_shapes
from common.scaling import GlobalScaler
from common.segment_model import ProfileStats, SegmentModel

INIT_METHODS = ("summary", "random")
_MOVING, _CONVERGED, _STOPPED = "moving", "converged", "stopped"  # states of a Lloyd restart


@dataclass(frozen=True)
class KMeansSettings:
    """Settings of one federated k-means run (validated on construction).

    Attributes
    ----------
    k : int
        Number of segments before small ones are merged.
    max_rounds : int
        Upper bound on Lloyd rounds.
    tol : float
        Convergence tolerance on the centroid shift (standardised units) and on the relative
        cost decrease.
    init : str
        ``"summary"`` (default, robust to non-IID sites) or ``"random"`` (baseline).
    init_candidates : int
        Candidate centres of the over-clustering initialisation (``0`` means ``10 * k``).
    init_rounds : int
        Federated Lloyd rounds on the candidates.
    n_init : int
        Independent Lloyd runs carried in parallel in the same rounds (each from its own
        k-means++ draw on the summary); the run with the lowest cost is published.
    min_segment_size : int
        Segments smaller than this are merged before publication.
    accept_partial_rounds : bool
        Whether a round in which some sites dropped out may still be used. Off by default: a
        partial sum biases the model and, compared with the full sums of other rounds, gives
        away the missing site's statistics.
    seed : int
        Seed of the server's random choices (candidates, k-means++ on the summary).
    """

    k: int = 5
    max_rounds: int = 30
    tol: float = 1e-4
    init: str = "summary"
    init_candidates: int = 0
    init_rounds: int = 5
    n_init: int = 6
    min_segment_size: int = 10
    accept_partial_rounds: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.k < 2:
            raise ConfigError(f"model.k={self.k} should be >= 2.")
        if self.max_rounds < 1:
            raise ConfigError(f"strategy.max_rounds={self.max_rounds} should be >= 1.")
        if not self.tol > 0:
            raise ConfigError(f"strategy.tol={self.tol} should be > 0.")
        if self.init not in INIT_METHODS:
            raise ConfigError(f"strategy.init={self.init!r} should be one of {INIT_METHODS}.")
        if self.init_candidates and self.init_candidates < self.k:
            raise ConfigError(
                f"strategy.init_candidates={self.init_candidates} should be 0 (auto) or >= "
                f"model.k={self.k}."
            )
        if self.init_rounds < 1:
            raise ConfigError(f"strategy.init_rounds={self.init_rounds} should be >= 1.")
        if self.n_init < 1:
            raise ConfigError(f"strategy.n_init={self.n_init} should be >= 1.")
        if self.min_segment_size < 1:
            raise ConfigError(f"model.min_segment_size={self.min_segment_size} should be >= 1.")

    @property
    def n_candidates(self) -> int:
        """Candidate centres used by the summary initialisation."""
        return self.init_candidates or 10 * self.k


@dataclass
class RoundRecord:
    """What the server learned in one round (aggregates only)."""

    round: int
    phase: str
    num_sites: int
    seconds: float
    cost: float | None = None
    shift: float | None = None
    reseeded: int = 0
    restart: int | None = None
    """Lloyd rounds: the restart (``strategy.n_init``) whose cost and shift are shown."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return dict(self.__dict__)


class CoordinatorViews:
    """Read-only views shared by the exact and the DP coordinators (fields they both define)."""

    features: tuple[FeatureSpec, ...]
    centres: NDArray[np.float64] | None
    model_stats: ProfileStats | None
    scaler: GlobalScaler | None
    settings: Any

    _moments_sites: int

    def _moments_count(self, num_sites: int) -> float | None:
        """Return the customers every later round must count (unknown after a partial round)."""
        if self.scaler is None or num_sites != self._moments_sites:
            return None
        return self.scaler.count

    @property
    def n_features(self) -> int:
        """Number of features."""
        return len(self.features)

    @property
    def done(self) -> bool:
        """True once the profile round has been aggregated."""
        return self.model_stats is not None

    def n_centres(self) -> int:
        """Centres the current phase sends to sites (0 in the moments phase)."""
        return 0 if self.centres is None else int(self.centres.shape[0])

    def _segment_model(self, *, privacy: dict[str, Any], training: dict[str, Any],
                       config: dict[str, Any]) -> SegmentModel:
        """Build the published model from the profile round (both coordinators)."""
        assert self.model_stats is not None and self.scaler is not None
        return SegmentModel.build(
            stats=self.model_stats,
            features=self.features,
            scaler=self.scaler,
            min_segment_size=self.settings.min_segment_size,
            privacy=privacy,
            training=training,
            config=config,
        )


@dataclass
class KMeansCoordinator(CoordinatorViews):
    """Drives the phases of federated k-means from summed site statistics.

    Parameters
    ----------
    settings : KMeansSettings
    features : tuple of FeatureSpec
        The public feature list every site uses, in order.
    """

    settings: KMeansSettings
    features: tuple[FeatureSpec, ...]
    phase: Phase = Phase.MOMENTS
    scaler: GlobalScaler | None = None
    centres: NDArray[np.float64] | None = None
    history: list[RoundRecord] = field(default_factory=list)
    model_stats: ProfileStats | None = None
    converged: bool = False
    lloyd_rounds: int = 0
    best_run: int = 0
    _init_round: int = 0
    _run_state: list[str] = field(default_factory=list)
    _run_cost: list[float] = field(default_factory=list)
    _previous_cost: list[float | None] = field(default_factory=list)
    _round_started: float = field(default_factory=time.perf_counter)
    _moments_sites: int = 0

    def __post_init__(self) -> None:
        self._rng = np.random.default_rng(self.settings.seed)

    def groups(self) -> int:
        """Independent centre sets in this round's centres (parallel Lloyd runs)."""
        return self.settings.n_init if self.phase is Phase.LLOYD else 1

    def instruction(self) -> tuple[str, list[NDArray[np.float64]], int]:
        """Return the phase name, the public arrays and the group count for this round."""
        self._round_started = time.perf_counter()
        if self.phase is Phase.MOMENTS:
            return self.phase.value, [], 1
        assert self.scaler is not None and self.centres is not None
        return self.phase.value, [self.scaler.mean, self.scaler.std, self.centres], self.groups()

    def expected_reply_shapes(self) -> list[tuple[int, ...]]:
        """Public shapes of every site's reply in the current phase."""
        return reply_shapes(self.phase, n_centres=self.n_centres(), n_features=self.n_features)

    def expected_instruction_shapes(self) -> list[tuple[int, ...]]:
        """Public shapes of the instruction arrays in the current phase."""
        return instruction_shapes(
            self.phase, n_centres=self.n_centres(), n_features=self.n_features
        )

    def step(self, sums: list[NDArray[np.float64]], *, server_round: int, num_sites: int) -> None:
        """Consume the statistics of this round summed over ``num_sites`` sites.

        Parameters
        ----------
        sums : list of ndarray
            Summed replies, in the layout of :func:`common.protocol.reply_shapes`.
        server_round : int
        num_sites : int
            Sites whose replies are in the sum.
        """
        if self.done:
            raise ProtocolError("the run is finished; no further round expected.")
        got = [np.shape(s) for s in sums]
        if got != self.expected_reply_shapes():
            raise ProtocolError(
                f"round {server_round} ({self.phase.value}): aggregate has shapes {got}; "
                f"expected {self.expected_reply_shapes()}."
            )
        check_sums(self.phase, sums, num_sites=num_sites, groups=self.groups(),
                   expected_count=self._moments_count(num_sites), server_round=server_round)
        record = RoundRecord(round=server_round, phase=self.phase.value, num_sites=num_sites,
                             seconds=0.0)
        k, d = self.settings.k, self.n_features
        if self.phase is Phase.MOMENTS:
            self.scaler = GlobalScaler.from_moments(sums, n_features=d)
            self._moments_sites = num_sites
            if self.settings.init == "summary":
                self.centres = random_centres(self.settings.n_candidates, d, rng=self._rng)
                self.phase = Phase.INIT
            else:
                self._start_lloyd(
                    [random_centres(k, d, rng=self._rng) for _ in range(self.settings.n_init)]
                )
        elif self.phase is Phase.INIT:
            assert self.centres is not None
            stats = KMeansStats.from_arrays(sums, n_clusters=self.n_centres(), n_features=d)
            record.cost = stats.cost
            self._init_round += 1
            if self._init_round >= self.settings.init_rounds:
                # Run 0 starts from the best of 10 k-means++ restarts on the summary; the others
                # from single draws, so that the parallel runs explore different optima.
                self._start_lloyd([
                    centres_from_summary(
                        stats, k, rng=self._rng, min_count=self.settings.min_segment_size,
                        n_init=10 if run == 0 else 1,
                    )
                    for run in range(self.settings.n_init)
                ])
            else:
                self.centres, reseeded = update_centroids(stats, self.centres)
                record.reseeded = int(reseeded.sum())
        elif self.phase is Phase.LLOYD:
            self._lloyd_step(sums, record)
        else:  # Phase.PROFILE
            self.model_stats = ProfileStats.from_arrays(sums, n_segments=k, n_features=d)
            assert self.model_stats.costs is not None
            record.cost = float(self.model_stats.costs.sum())
        record.seconds = time.perf_counter() - self._round_started
        self.history.append(record)

    def _start_lloyd(self, starts: list[NDArray[np.float64]]) -> None:
        """Begin ``n_init`` parallel Lloyd runs from the given centre sets."""
        self.centres = np.vstack(starts)
        runs = len(starts)
        self._run_state = [_MOVING] * runs
        self._run_cost = [float("inf")] * runs
        self._previous_cost = [None] * runs
        self.phase = Phase.LLOYD

    def _lloyd_step(self, sums: list[NDArray[np.float64]], record: RoundRecord) -> None:
        """One Lloyd update of every run still moving; pick the best run when none moves."""
        assert self.centres is not None
        k, d, runs = self.settings.k, self.n_features, len(self._run_state)
        stats = KMeansStats.from_arrays(sums, n_clusters=runs * k, n_features=d)
        new_all = self.centres.copy()
        shifts = [0.0] * runs  # a frozen run does not move
        for run in range(runs):
            block = slice(run * k, (run + 1) * k)
            run_stats = stats.block(run * k, (run + 1) * k)
            self._run_cost[run] = run_stats.cost
            if self._run_state[run] != _MOVING:
                continue  # frozen: its centres stay, its cost is re-measured each round
            new, reseeded = update_centroids(run_stats, self.centres[block])
            shift = centroid_shift(self.centres[block], new)
            shifts[run] = shift
            record.reseeded += int(reseeded.sum())
            previous = self._previous_cost[run]
            if not reseeded.any() and has_converged(
                shift=shift, previous_cost=previous, cost=run_stats.cost, tol=self.settings.tol
            ):
                self._run_state[run] = _CONVERGED
            elif previous is not None and self._cannot_catch_up(run, previous - run_stats.cost):
                self._run_state[run] = _STOPPED
            self._previous_cost[run] = run_stats.cost
            new_all[block] = new
        # The round line reads as one run's progress: the cost and shift of the run that is
        # best so far (the first of equal ones), never a cost of one and a shift of another.
        lowest = min(self._run_cost)
        leader = next(r for r, c in enumerate(self._run_cost)
                      if c <= lowest + TIE_RTOL * abs(lowest))
        record.cost = self._run_cost[leader]
        record.shift = shifts[leader]
        record.restart = leader if runs > 1 else None
        self.centres = new_all
        self.lloyd_rounds += 1
        moving = _MOVING in self._run_state
        if not moving or self.lloyd_rounds >= self.settings.max_rounds:
            # Runs that reached the same optimum differ only by rounding: take the first of
            # them, so that the SecAgg+ and the plain path publish the same segment order.
            self.best_run = leader
            self.converged = self._run_state[self.best_run] == _CONVERGED
            self.centres = new_all[self.best_run * k:(self.best_run + 1) * k]
            self.phase = Phase.PROFILE

    def _cannot_catch_up(self, run: int, last_gain: float) -> bool:
        """Whether a still-moving run is beaten for good by a converged one.

        Lloyd's cost gains usually shrink from round to round; a run whose cost exceeds the
        best converged run's by more than its last gain times the rounds left is stopped (not
        counted as converged), so one slowly drifting restart does not hold the whole
        federation for ``max_rounds``.
        """
        converged = [c for c, state in zip(self._run_cost, self._run_state, strict=True)
                     if state == _CONVERGED]
        if not converged:
            return False
        rounds_left = self.settings.max_rounds - self.lloyd_rounds - 1
        gap = self._run_cost[run] - min(converged)
        return gap > 0 and gap > max(last_gain, 0.0) * rounds_left

    def build_model(
        self, *, privacy: dict[str, Any], config: dict[str, Any]
    ) -> SegmentModel:
        """Package the final statistics as a :class:`SegmentModel`."""
        if self.model_stats is None or self.scaler is None:
            raise ProtocolError("the run has not reached the profile round; no model to build.")
        lloyd = [r for r in self.history if r.phase == Phase.LLOYD.value]
        training = {
            "k_requested": self.settings.k,
            "init": self.settings.init,
            "init_candidates": self.settings.n_candidates if self.settings.init == "summary"
            else 0,
            "n_init": self.settings.n_init,
            "best_run": self.best_run,
            "run_costs": list(self._run_cost),
            "run_states": list(self._run_state),
            "lloyd_rounds": len(lloyd),
            "total_rounds": len(self.history),
            "converged": self.converged,
            "tol": self.settings.tol,
            "cost": None if self.model_stats.costs is None
            else float(self.model_stats.costs.sum()),
            "num_records": float(self.model_stats.counts.sum()),
        }
        return self._segment_model(privacy=privacy, training=training, config=config)


def check_sums(
    phase: Phase,
    sums: list[NDArray[np.float64]],
    *,
    num_sites: int,
    groups: int,
    expected_count: float | None,
    server_round: int,
) -> None:
    """Refuse decoded sums that no honest set of sites can produce.

    A mask-generator mismatch, a faulty site or a broken decoder gives sums near the modulus
    (sizes of 1e30, negative costs); they must stop the run before anything is published.
    Checks: every entry finite; counts whole and non-negative, each centre group counting the
    customers of the moments round (when the same sites took part); costs and sums of squares
    non-negative; and Cauchy-Schwarz ``n * sum(x**2) >= sum(x)**2`` for the moments.

    Parameters
    ----------
    phase : Phase
    sums : list of ndarray
        Decoded sums in the layout of :func:`common.protocol.reply_shapes`.
    num_sites : int
    groups : int
        Independent centre sets in the round (parallel Lloyd runs).
    expected_count : float or None
        Customers counted in the moments round, when comparable.
    server_round : int
    """
    where = f"round {server_round} ({phase.value})"
    # Per site and entry the encoding rounds to 2**-24; counts are whole at every site.
    tol = num_sites * 2.0**-20

    def refuse(what: str) -> ProtocolError:
        return ProtocolError(
            f"{where}: the decoded sums are impossible ({what}). A site's mask generator or "
            "encoding does not match the server's, or a site is faulty; nothing is published.")

    arrays = [np.asarray(a, dtype=np.float64) for a in sums]
    if not all(np.all(np.isfinite(a)) for a in arrays):
        raise refuse("non-finite values")

    def whole_nonnegative(counts: NDArray[np.float64], name: str) -> None:
        # Above 2**40 (a trillion customers) every float is "whole": such a count is noise.
        if np.any(counts < -tol) or np.any(counts > 2.0**40) or \
                np.any(np.abs(counts - np.rint(counts)) > tol):
            raise refuse(f"{name} that are not whole numbers between 0 and 2**40")

    if phase is Phase.MOMENTS:
        count, total, squares = arrays
        whole_nonnegative(count, "a customer count")
        if np.any(squares < -tol) or np.any(
                count[0] * squares < total**2 * (1 - 1e-9) - tol * (1 + np.abs(total))):
            raise refuse("sums of squares below what the sums imply")
        return
    if phase is Phase.PROFILE:
        counts, costs, nonneg = arrays[0], arrays[2], [arrays[4]]
    else:
        counts, costs, nonneg = arrays[2], arrays[3], [arrays[1]]
    whole_nonnegative(counts, "segment counts")
    if np.any(costs < -tol) or any(np.any(a < -tol) for a in nonneg):
        raise refuse("negative costs or sums of squares")
    if expected_count is not None:
        per_group = counts.reshape(groups, -1).sum(axis=1)
        if np.any(np.abs(per_group - expected_count) > tol * max(1, counts.size)):
            raise refuse(f"segment counts that do not add up to the {expected_count:.0f} "
                         "customers of the moments round")
