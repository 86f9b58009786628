"""Server-side state machine of ``model=ae_kmeans``, free of Flower.

Phases: ``moments`` (global scaling of the features) -> ``ae_train`` rounds (each site trains
the autoencoder from the global weights for a few local steps and sends ``n_i * w_i`` and
``n_i`` -- with SCAFFOLD also ``n_i * c_i``, the sum of its customers' loss gradients at the
global weights -- inside the exact secure sum, so the server learns only the customer-weighted
averages ``sum(n_i w_i) / sum(n_i)`` and ``c = sum(n_i c_i) / sum(n_i)``; it moves the global
weights towards the average (FedAvg) or by Adam on the difference (FedAdam) and sends ``c`` and
the weights it was measured at with the next round) -> ``embed`` (secure
moments of the embedding) -> ``init`` / ``lloyd`` (the existing federated k-means, reused as
:class:`~server.coordinator.KMeansCoordinator`, in the standardised embedding) -> ``profile``
(per-segment sums of the *original* features, so the segments read as today). The segment
model carries the encoder (:class:`common.segment_encoder.SegmentEncoder`) so that every site
assigns its customers locally.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from numpy.typing import NDArray

from common.autoencoder import (
    SERVER_ADAM,
    AESettings,
    TabularLayout,
    build_model,
    code_reconstructions,
    n_params,
    split_code,
)
from common.errors import ProtocolError
from common.features import FeatureSpec
from common.protocol import Phase, ae_instruction_shapes, reply_shapes
from common.scaling import GlobalScaler
from common.segment_encoder import SegmentEncoder, segment_of_centre
from common.segment_model import ProfileStats, SegmentModel
from server.coordinator import (
    CoordinatorViews,
    KMeansCoordinator,
    KMeansSettings,
    RoundRecord,
    check_sums,
)


@dataclass
class AEKMeansCoordinator(CoordinatorViews):
    """Drives a federated autoencoder, then federated k-means in its embedding.

    Parameters
    ----------
    settings : KMeansSettings
        The k-means part (k, restarts, rounds, tolerance, minimum segment size, seed).
    features : tuple of FeatureSpec
        The public feature list every site uses, in order (with kinds and groups).
    ae : AESettings
        The autoencoder: architecture, local training, federated rounds, seed of the
        initial weights.
    """

    settings: KMeansSettings
    features: tuple[FeatureSpec, ...]
    ae: AESettings
    phase: Phase = Phase.MOMENTS
    scaler: GlobalScaler | None = None
    history: list[RoundRecord] = field(default_factory=list)
    model_stats: ProfileStats | None = None
    ae_rounds: int = 0
    ae_loss: list[float] = field(default_factory=list)
    ae_gradient_norm: list[float] = field(default_factory=list)
    code_shares: list[list[float]] = field(default_factory=list)
    code_splits: list[dict[str, int]] = field(default_factory=list)
    candidate_losses: list[float] = field(default_factory=list)
    chosen_candidate: int | None = None
    candidate_weights: list[NDArray[np.float64]] = field(default_factory=list)
    move_log: list[dict[str, Any]] = field(default_factory=list)
    settled_loss: float | None = None
    final_loss: float | None = None
    """Released loss of the model embedded: the kept candidate's or, with moves, the kept
    move's (``loss_per_round[-1]`` is the last round trained, often a rejected move's)."""
    final_code_shares: list[float] | None = None
    inner: KMeansCoordinator | None = None
    _moments_sites: int = 0
    _round_started: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        self.layout = TabularLayout.from_features(self.features)
        self.n_params = n_params(self.layout, self.ae)
        self.weights: NDArray[np.float64] = build_model(self.layout, self.ae).get_flat()
        # SCAFFOLD: the global mean gradient (zero: none measured yet) and the weights it was
        # measured at; FedAdam: the server optimiser's moments.
        self.control = np.zeros(self.n_params)
        self.anchor = self.weights.copy()
        self._adam_m = np.zeros(self.n_params)
        self._adam_v = np.zeros(self.n_params)
        # Dead-code splits: consecutive looks each code has been dead at.
        self._dead_looks = np.zeros(self.ae.embed_dim, dtype=np.int64)
        # Candidates (``ae.candidates``): the weights of the best one finished so far.
        self._best_weights: NDArray[np.float64] | None = None
        self._best: dict[str, Any] = {}
        # Merge-and-split moves: the model kept so far (weights, loss, code statistics, server
        # Adam moments), the rank of the pair the next move merges, rounds the move has left.
        self._kept: dict[str, Any] = {}
        self._move_rank = 0
        self._move_left = 0
        self._move: dict[str, Any] = {}
        self.embedding_features = tuple(
            FeatureSpec(name=f"embedding_{i}") for i in range(self.ae.embed_dim))

    # -- views used by the strategy ---------------------------------------------------------

    @property
    def centres(self) -> NDArray[np.float64] | None:  # type: ignore[override]
        """Centres in the standardised embedding (None before the cluster phases)."""
        return None if self.inner is None else self.inner.centres

    @property
    def lloyd_rounds(self) -> int:
        """Lloyd rounds run in the embedding."""
        return 0 if self.inner is None else self.inner.lloyd_rounds

    @property
    def converged(self) -> bool:
        """Whether the published Lloyd run converged."""
        return self.inner is not None and self.inner.converged

    def groups(self) -> int:
        """Independent centre sets in this round's centres (parallel Lloyd runs)."""
        return 1 if self.inner is None or self.phase is Phase.PROFILE else self.inner.groups()

    def run_plan_ae(self) -> str:
        """Return the autoencoder part of the public run plan (sites check and pin it)."""
        from common.autoencoder import ARCHITECTURE_ID

        return json.dumps({"architecture": ARCHITECTURE_ID, "n_params": self.n_params,
                           "settings": json.loads(self.ae.plan_json())}, sort_keys=True)

    def instruction(self) -> tuple[str, list[NDArray[np.float64]], int]:
        """Return the phase name, the public arrays and the group count for this round."""
        self._round_started = time.perf_counter()
        if self.phase is Phase.MOMENTS:
            return self.phase.value, [], 1
        assert self.scaler is not None
        base = [self.scaler.mean, self.scaler.std, self.weights]
        if self.phase is Phase.AE_TRAIN and self.ae.control_variates:
            return self.phase.value, [*base, self.anchor, self.control], 1
        if self.phase in (Phase.AE_TRAIN, Phase.EMBED):
            return self.phase.value, base, 1
        assert self.inner is not None and self.inner.scaler is not None \
            and self.inner.centres is not None
        inner = self.inner
        assert inner.scaler is not None and inner.centres is not None
        return (self.phase.value,
                [*base, inner.scaler.mean, inner.scaler.std, inner.centres], self.groups())

    def expected_reply_shapes(self) -> list[tuple[int, ...]]:
        """Public shapes of every site's reply in the current phase."""
        d, m = self.n_features, self.ae.embed_dim
        return reply_shapes(self.phase, n_centres=self.n_centres(),
                            n_features=d if self.phase is Phase.MOMENTS else m,
                            n_params=self.n_params, n_profile=d,
                            control_variates=self.ae.control_variates,
                            code_statistics=m if self.ae.code_statistics else 0)

    def expected_instruction_shapes(self) -> list[tuple[int, ...]]:
        """Public shapes of the instruction arrays in the current phase."""
        return ae_instruction_shapes(self.phase, n_centres=self.n_centres(),
                                     n_features=self.n_features, n_params=self.n_params,
                                     embed_dim=self.ae.embed_dim,
                                     control_variates=self.ae.control_variates)

    # -- rounds -------------------------------------------------------------------------------

    def step(self, sums: list[NDArray[np.float64]], *, server_round: int, num_sites: int) -> None:
        """Consume the statistics of this round summed over ``num_sites`` sites."""
        if self.done:
            raise ProtocolError("the run is finished; no further round expected.")
        got = [np.shape(s) for s in sums]
        if got != self.expected_reply_shapes():
            raise ProtocolError(
                f"round {server_round} ({self.phase.value}): aggregate has shapes {got}; "
                f"expected {self.expected_reply_shapes()}.")
        record = RoundRecord(round=server_round, phase=self.phase.value, num_sites=num_sites,
                             seconds=0.0)
        expected = self._moments_count(num_sites)
        if self.phase is Phase.MOMENTS:
            check_sums(Phase.MOMENTS, sums, num_sites=num_sites, groups=1,
                       expected_count=None, server_round=server_round)
            self.scaler = GlobalScaler.from_moments(sums, n_features=self.n_features)
            self._moments_sites = num_sites
            self.phase = Phase.AE_TRAIN
        elif self.phase is Phase.AE_TRAIN:
            self._ae_step(sums, record, expected=expected, server_round=server_round,
                          num_sites=num_sites)
        elif self.phase is Phase.PROFILE:
            check_sums(Phase.PROFILE, sums, num_sites=num_sites, groups=1,
                       expected_count=expected, server_round=server_round)
            self.model_stats = ProfileStats.from_arrays(
                sums, n_segments=self.settings.k, n_features=self.n_features)
            assert self.model_stats.costs is not None
            record.cost = float(self.model_stats.costs.sum())
        else:  # embed, init, lloyd: the k-means coordinator in the embedding
            if self.phase is Phase.EMBED:
                self.inner = KMeansCoordinator(settings=self.settings,
                                               features=self.embedding_features)
            assert self.inner is not None
            self.inner.step(sums, server_round=server_round, num_sites=num_sites)
            inner_record = self.inner.history[-1]
            record.cost, record.shift = inner_record.cost, inner_record.shift
            record.reseeded = inner_record.reseeded
            record.restart = inner_record.restart
            self.phase = self.inner.phase
        record.seconds = time.perf_counter() - self._round_started
        self.history.append(record)

    def _ae_step(self, sums: list[NDArray[np.float64]], record: RoundRecord, *,
                 expected: float | None, server_round: int, num_sites: int) -> None:
        """One server update from the customer-weighted mean of the sites' trained weights.

        ``average``: the mean becomes the global weights (FedAvg / FedProx); ``adam``: Adam
        (:data:`common.autoencoder.SERVER_ADAM`) steps along the mean's difference to the
        global weights. With SCAFFOLD the mean gradient ``sum(n_i c_i) / sum(n_i)`` at the
        weights just sent becomes the next round's control.
        """
        weighted, count, loss = (np.asarray(a, dtype=np.float64) for a in sums[:3])
        gradient = np.asarray(sums[3], dtype=np.float64) if self.ae.control_variates else None
        # The sites release per-code sums only in the rounds that use them (zeros otherwise).
        released = self.ae.code_statistics_released(self.ae_rounds + 1)
        code_counts, code_loss = ((np.asarray(a, dtype=np.float64) for a in sums[-2:])
                                  if released else (None, None))
        tol = num_sites * 2.0**-20
        where = f"round {server_round} (ae_train)"
        n = float(count[0])
        if not (np.all(np.isfinite(weighted)) and np.isfinite(n) and np.isfinite(loss[0])) \
                or (gradient is not None and not np.all(np.isfinite(gradient))) \
                or (code_counts is not None and code_loss is not None and not (
                    np.all(np.isfinite(code_counts)) and np.all(np.isfinite(code_loss))
                    and np.all(code_counts > -tol) and np.all(code_loss > -tol)
                    and abs(code_counts.sum() - n) <= tol)) \
                or n < 1 or abs(n - round(n)) > tol or loss[0] < -tol \
                or (expected is not None and abs(n - expected) > tol):
            raise ProtocolError(
                f"{where}: the decoded sums are impossible (a customer count that is not whole,"
                " not the moments round's, or a negative loss). A site's mask generator or "
                "encoding does not match the server's, or a site is faulty; nothing is "
                "published.")
        average = weighted / n
        sent = self.weights
        if self.ae.server_optimizer == "adam":
            beta1, beta2, eps = SERVER_ADAM
            delta = average - sent
            self._adam_m = beta1 * self._adam_m + (1.0 - beta1) * delta
            self._adam_v = beta2 * self._adam_v + (1.0 - beta2) * delta * delta
            self.weights = sent + self.ae.server_lr * self._adam_m / (np.sqrt(self._adam_v) + eps)
        else:
            self.weights = average
        if gradient is not None:
            self.control, self.anchor = gradient / n, sent
            self.ae_gradient_norm.append(float(np.linalg.norm(self.control)))
        record.cost = float(loss[0] / n)  # mean reconstruction loss at the weights sent
        self.ae_loss.append(record.cost)
        self.ae_rounds += 1
        stats = None
        if code_counts is not None and code_loss is not None:
            self.code_shares.append([float(v) for v in code_counts / n])
            stats = (code_counts / n, code_loss)
        if self.ae_rounds > self.ae.candidate_rounds:
            self._move_step(record.cost, stats)
            return
        within = self.ae_rounds - self.candidate * int(self.ae.rounds)
        if stats is not None and self.ae.split_round(within) and within < int(self.ae.rounds):
            self._split_dead_code(*stats)
        if within >= int(self.ae.rounds):
            self._finish_candidate(record.cost, stats)

    @property
    def candidate(self) -> int:
        """Index of the candidate being trained (the last one once training is over)."""
        return min(len(self.candidate_losses), int(self.ae.candidates) - 1)

    def _finish_candidate(self, loss: float, stats: tuple[NDArray[np.float64], ...] | None
                          ) -> None:
        """Keep the candidate if its released loss is the lowest so far; start the next one.

        ``loss`` is the mean reconstruction loss over all customers at the weights sent in the
        candidate's last round -- a secure sum divided by a secure sum, the same statistic
        whoever holds the data -- so the choice reveals nothing the training did not.
        """
        if not self.candidate_losses or loss < min(self.candidate_losses):
            self._best_weights = self.weights.copy()
            self.chosen_candidate = len(self.candidate_losses)
            self._best = {"weights": self.weights.copy(), "loss": loss, "stats": stats,
                          "adam": (self._adam_m.copy(), self._adam_v.copy())}
        self.candidate_losses.append(loss)
        self.candidate_weights.append(self.weights.copy())
        if len(self.candidate_losses) < int(self.ae.candidates):
            seed = self.ae.candidate_seed(len(self.candidate_losses))
            self.weights = build_model(self.layout, replace(self.ae, seed=seed)).get_flat()
            self.control = np.zeros(self.n_params)
            self.anchor = self.weights.copy()
            self._adam_m = np.zeros(self.n_params)
            self._adam_v = np.zeros(self.n_params)
            self._dead_looks = np.zeros(self.ae.embed_dim, dtype=np.int64)
            return
        assert self._best_weights is not None
        self.weights = self._best_weights
        self.final_loss = float(self._best["loss"])
        best_stats = self._best["stats"]
        self.final_code_shares = (None if best_stats is None
                                  else [float(v) for v in best_stats[0]])
        if int(self.ae.moves):
            # The trained model first trains move_rounds more rounds itself, so each move is
            # compared with a model trained as long (another 60 rounds alone lowered the loss of
            # a data=mixed model by 0.003, as much as a right move gains).
            self._kept = dict(self._best)
            self._restore(self._kept)
            self._move = {"round": self.ae_rounds, "settle": True}
            self._move_left = int(self.ae.move_rounds)
            return
        self.phase = Phase.EMBED

    def _restore(self, state: dict[str, Any]) -> None:
        """Start from a kept model: its weights and Adam moments, no SCAFFOLD control."""
        self.weights = state["weights"].copy()
        self._adam_m, self._adam_v = (a.copy() for a in state["adam"])
        self.control = np.zeros(self.n_params)
        self.anchor = self.weights.copy()

    def _start_move(self) -> None:
        """Start the next merge-and-split move from the kept model, or end the training."""
        kept = self._kept
        self._restore(kept)
        self.final_loss = float(kept["loss"])
        self.final_code_shares = (None if kept["stats"] is None
                                  else [float(v) for v in kept["stats"][0]])
        if len(self.move_log) >= int(self.ae.moves) or kept["stats"] is None:
            self.phase = Phase.EMBED
            return
        shares, loss_sums = kept["stats"]
        recon = code_reconstructions(kept["weights"], layout=self.layout, settings=self.ae)
        m = int(self.ae.embed_dim)
        pairs = sorted((float(np.sum((recon[i] - recon[j]) ** 2)), i, j)
                       for i in range(m) for j in range(i + 1, m))
        mean_loss = loss_sums / np.maximum(shares, 1e-12)
        # Moves in order: the closest pair first, and for each pair the other codes by
        # decreasing loss per customer (the pair's partner now holds both, so it is not split).
        order = [(i, j, int(c)) for _, i, j in pairs
                 for c in np.argsort(-mean_loss, kind="stable")
                 if c not in (i, j) and shares[c] > 0]
        if not order:  # unreachable with embed_dim >= 3 (AESettings checks it); never divide by 0
            self.phase = Phase.EMBED
            return
        i, j, source = order[self._move_rank % len(order)]
        emptied = i if shares[i] <= shares[j] else j
        rng = np.random.default_rng([int(self.ae.seed), self.ae_rounds, 4])
        self.weights = split_code(kept["weights"], layout=self.layout, settings=self.ae,
                                  dead=emptied, source=source, rng=rng)
        self.anchor = self.weights.copy()
        self._move = {"round": self.ae_rounds, "merged": [int(i), int(j)],
                      "emptied": int(emptied), "source": source}
        self._move_left = int(self.ae.move_rounds)

    def _move_step(self, loss: float, stats: tuple[NDArray[np.float64], ...] | None) -> None:
        """Count a move's round; at its last, keep it if its released loss is the lower."""
        self._move_left -= 1
        if self._move_left > 0:
            return
        if self._move.get("settle"):
            self.settled_loss = loss
            self._kept = {"weights": self.weights.copy(), "loss": loss, "stats": stats,
                          "adam": (self._adam_m.copy(), self._adam_v.copy())}
            self._start_move()
            return
        kept = loss < self._kept["loss"]
        self.move_log.append({**self._move, "loss": loss, "loss_before": self._kept["loss"],
                              "kept": bool(kept)})
        if kept:
            self._kept = {"weights": self.weights.copy(), "loss": loss, "stats": stats,
                          "adam": (self._adam_m.copy(), self._adam_v.copy())}
            self._move_rank = 0
        else:
            self._move_rank += 1
        self._start_move()

    def _split_dead_code(self, shares: NDArray[np.float64], loss: NDArray[np.float64]) -> None:
        """Re-seed one dead code by splitting the live code with the largest loss (sum or mean).

        ``shares`` and ``loss`` are the secure sums' customers per code (as shares of all) and
        loss sums per code, measured at the weights just sent. A split changes the weights the
        next round starts from, so that round's SCAFFOLD correction is skipped (zero control):
        the sites' gradients were measured at a model that no longer exists.
        """
        is_dead = shares < self.ae.split_share
        self._dead_looks = np.where(is_dead, self._dead_looks + 1, 0)
        dead = np.flatnonzero(self._dead_looks >= int(self.ae.split_patience))
        live = np.flatnonzero(~is_dead)
        if not len(dead) or not len(live):
            return
        score = loss[live] / shares[live] if self.ae.split_source == "mean_loss" else loss[live]
        source = int(live[np.argmax(score)])
        rng = np.random.default_rng([int(self.ae.seed), self.ae_rounds, 2])
        self.weights = split_code(self.weights, layout=self.layout, settings=self.ae,
                                  dead=int(dead[0]), source=source, rng=rng)
        self.control = np.zeros(self.n_params)
        self._dead_looks[int(dead[0])] = 0
        self.code_splits.append({"round": self.ae_rounds, "dead": int(dead[0]),
                                 "source": source, "candidate": self.candidate})

    # -- the product ------------------------------------------------------------------------

    def build_model(self, *, privacy: dict[str, Any], config: dict[str, Any]) -> SegmentModel:
        """Package the final statistics and the encoder as a :class:`SegmentModel`."""
        if self.model_stats is None or self.scaler is None or self.inner is None \
                or self.inner.centres is None or self.inner.scaler is None:
            raise ProtocolError("the run has not reached the profile round; no model to build.")
        inner = self.inner
        training = {
            "model": "ae_kmeans",
            "autoencoder": {**self.ae.to_dict(), "n_params": self.n_params,
                            "architecture": self.ae.architecture(),
                            "loss_per_round": list(self.ae_loss),
                            "gradient_norm_per_round": list(self.ae_gradient_norm),
                            "code_splits": list(self.code_splits),
                            "candidate_losses": list(self.candidate_losses),
                            "chosen_candidate": self.chosen_candidate,
                            "merge_split_moves": list(self.move_log),
                            "loss_before_moves": self.settled_loss,
                            "final_loss": self.final_loss,
                            "final_code_shares": self.final_code_shares,
                            "code_shares_last_round": (self.code_shares[-1]
                                                       if self.code_shares else None),
                            "client_drift_fix": ", ".join(
                                [fix for fix, on in (("fedprox", self.ae.prox_mu > 0),
                                                     ("scaffold", self.ae.control_variates))
                                 if on]) or "none"},
            "k_requested": self.settings.k,
            "init": self.settings.init,
            "n_init": self.settings.n_init,
            "best_run": inner.best_run,
            "lloyd_rounds": inner.lloyd_rounds,
            "total_rounds": len(self.history),
            "converged": inner.converged,
            "tol": self.settings.tol,
            "cost_in_embedding": None if self.model_stats.costs is None
            else float(self.model_stats.costs.sum()),
            "num_records": float(self.model_stats.counts.sum()),
        }
        model = self._segment_model(privacy=privacy, training=training, config=config)
        centres = np.asarray(inner.centres, dtype=np.float64)
        embedding_scaler = inner.scaler
        assert embedding_scaler is not None
        encoder = SegmentEncoder(
            settings=self.ae, weights=self.weights, mean=embedding_scaler.mean,
            std=embedding_scaler.std, centres=centres,
            segment_of_centre=segment_of_centre(len(centres), model.merged, centres))
        return replace(model, encoder=encoder)
