"""Flower (legacy ``Strategy``) adapter around :class:`server.coordinator.KMeansCoordinator`.

SecAgg+ exists in Flower 1.42 only on the legacy path (``LegacyContext`` +
``SecAggPlusWorkflow``), so this strategy implements the legacy interface. It sends every site
the same public instruction, and in ``aggregate_fit`` receives either SecAgg+'s aggregated mean
(every result then carries the same parameters) or the plain per-site replies, turns them into
sums and hands them to the coordinator.

Bad peers: a plain reply that does not have the round's public layout (count, shape, dtype,
finite values, whole non-negative counts) is rejected here, logged with the node id and what
was wrong, and treated as that site's failure; SecAgg+'s masked vectors are screened the same
way before Flower sums them (:mod:`server.secagg_checks`). A decoded secure sum that no set of
honest sites can produce stops the run before the coordinator sees it.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from logging import ERROR, INFO
from typing import Any

import numpy as np
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.logger import log
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy
from numpy.typing import NDArray

from common.dp import round_noise_std
from common.errors import SITE_ERROR_PREFIX, ConfigError, ProtocolError
from common.protocol import (
    GROUPS_KEY,
    PHASE_KEY,
    PLAN_KEY,
    ROUND_KEY,
    Role,
    check_site_reply,
    reply_roles,
)
from common.secure_sum import FRACTION_BITS, SecAggPlusSumCodec, plain_sum
from server.ae_coordinator import AEKMeansCoordinator
from server.coordinator import KMeansCoordinator, RoundRecord
from server.dp_coordinator import DPKMeansCoordinator

IMPOSSIBLE_NOISE_STDS = 12.0
"""A DP count this many worst-case noise stds below zero is refused as impossible.

The noise on a count is a sum of the sites' independent discrete Gaussians; a discrete
Gaussian of parameter ``s**2`` is ``s**2``-sub-Gaussian (Canonne, Kamath & Steinke, "The Discrete
Gaussian for Differential Privacy", NeurIPS 2020), so the sum is sub-Gaussian with the summed
variance ``sigma**2`` and ``P(noise < -12 sigma) <= exp(-12**2 / 2) < 1e-31`` per entry. The true
count is never negative.
"""


class RejectedReply(ProtocolError):
    """A site's reply refused before aggregation: the site counts as dropped from the round.

    Parameters
    ----------
    node_id : int
        The Flower node that sent the reply.
    problem : str
        What was wrong with it (layout only, never a value).
    """

    def __init__(self, node_id: int, problem: str) -> None:
        self.node_id = node_id
        self.problem = problem
        # No final period: callers list several failures and close the sentence themselves.
        super().__init__(f"node {node_id}: reply rejected, not aggregated: "
                         f"{problem.rstrip('.')}")


def reject_reply(server_round: int, node_id: int, problem: str) -> RejectedReply:
    """Log a rejected reply (node id and problem) and return it as the site's failure."""
    log(ERROR, "round %s: the reply of node %s is rejected and not aggregated, the site counts "
        "as dropped from this round: %s", server_round, node_id, problem)
    return RejectedReply(node_id, problem)


FIRST_ROUND_WAIT = 60.0
"""Seconds the first round waits for every site to be connected (later rounds do not wait)."""


class FederatedKMeans(Strategy):
    """Federated k-means over sums of site statistics.

    Parameters
    ----------
    coordinator : KMeansCoordinator
        The Flower-free state machine.
    num_sites : int
        Sites that must take part in every round (all of them: k-means needs every site).
    codec : SecAggPlusSumCodec or None
        The exact-sum decoder when SecAgg+ is on; ``None`` sums plain replies.
    on_round : callable, optional
        Called with every :class:`RoundRecord` (progress output).
    run_plan : str
        The public run plan (``RunPlan.to_json()``) sent with every instruction; sites refuse
        requests outside it.
    fraction_bits : int
        Fixed-point resolution of the sites' statistics (finer under DP: ``DpPlan.grid_bits``).
    """

    def __init__(
        self,
        *,
        coordinator: KMeansCoordinator | DPKMeansCoordinator | AEKMeansCoordinator,
        num_sites: int,
        codec: SecAggPlusSumCodec | None,
        on_round: Callable[[RoundRecord], None] | None = None,
        run_plan: str = "",
        fraction_bits: int = FRACTION_BITS,
    ) -> None:
        super().__init__()
        if codec is None and isinstance(coordinator, DPKMeansCoordinator):
            raise ConfigError("differential privacy needs SecAgg+ (a codec): each site adds "
                              "only its share of the noise.")
        self.coordinator = coordinator
        self.num_sites = num_sites
        self.codec = codec
        self.on_round = on_round
        self.run_plan = run_plan
        self.fraction_bits = fraction_bits
        self._configured = False

    def __repr__(self) -> str:
        mode = "secagg+" if self.codec is not None else "plain"
        return f"FederatedKMeans(k={self.coordinator.settings.k}, sites={self.num_sites}, {mode})"

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        """Nothing to initialise from sites: the first round computes global moments."""
        return ndarrays_to_parameters([])

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """Send every site the public instruction of the current phase."""
        if self.coordinator.done:
            return []
        phase, arrays, groups = self.coordinator.instruction()
        fit_ins = FitIns(
            ndarrays_to_parameters(arrays),
            {PHASE_KEY: phase, ROUND_KEY: server_round, GROUPS_KEY: groups,
             PLAN_KEY: self.run_plan},
        )
        wanted = self.num_sites
        available = client_manager.num_available()
        deadline = time.monotonic() + (FIRST_ROUND_WAIT if not self._configured else 0.0)
        while available < wanted and time.monotonic() < deadline:
            time.sleep(0.1)  # a simulation's nodes register once the server has started
            available = client_manager.num_available()
        self._configured = True
        if available < wanted:
            # A site that died is not waited for (Flower's sample() would block for a day).
            if not self.coordinator.settings.accept_partial_rounds:
                raise ProtocolError(
                    f"round {server_round} ({self.coordinator.phase.value}): only {available} "
                    f"of {wanted} sites are connected; every site must take part in every "
                    "round (strategy.accept_partial_rounds=false). Nothing is published.")
            if available < 2:
                raise ProtocolError(
                    f"round {server_round} ({self.coordinator.phase.value}): only {available} "
                    f"of {wanted} sites are connected; secure aggregation needs at least 2. "
                    "Nothing is published.")
            wanted = available
        clients = client_manager.sample(num_clients=wanted, min_num_clients=wanted)
        return [(client, fit_ins) for client in clients]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Turn the round's replies into sums and advance the coordinator.

        Plain replies that do not follow the round's public layout are moved to ``failures``
        first (:meth:`screen_plain_replies`), so the partial-round rule below applies to them.
        """
        failures = list(failures)
        if self.codec is None:
            results = self.screen_plain_replies(server_round, results, failures)
        if failures:
            log(INFO, "round %s: %s site(s) failed or dropped", server_round, len(failures))
        if not results:
            reasons = "; ".join(sorted({describe_failure(f) for f in failures})) or "no reply"
            raise ProtocolError(f"round {server_round} ({self.coordinator.phase.value}): no "
                                f"site replied (site errors: {reasons}); nothing is published.")
        if len(results) < self.num_sites and not self.coordinator.settings.accept_partial_rounds:
            reasons = "; ".join(sorted({describe_failure(f) for f in failures})) or "no reply"
            raise ProtocolError(
                f"round {server_round} ({self.coordinator.phase.value}): only {len(results)} of "
                f"{self.num_sites} sites took part (site errors: {reasons}). fedseg uses a "
                "round only when every site is in it: a partial sum would bias the segments "
                "and, set against the other rounds, reveal the missing site's statistics. "
                "Rerun when all sites are up, or set strategy.accept_partial_rounds=true (see "
                "docs/SECURITY.md)."
            )
        for _, res in results:
            # Side channels: these travel beside the masked vector in clear.
            if res.num_examples != 1 or res.metrics:
                raise ProtocolError(
                    f"round {server_round}: a site reply carries num_examples="
                    f"{res.num_examples} and metrics {sorted(res.metrics)}; expected 1 and none."
                )
        if self.codec is not None:
            mean = parameters_to_ndarrays(results[0][1].parameters)
            sums = self.decode_secure_sum(server_round, mean, num_sites=len(results))
        else:
            sums = plain_sum([parameters_to_ndarrays(res.parameters) for _, res in results])
        self.coordinator.step(
            [np.asarray(s, dtype=np.float64) for s in sums],
            server_round=server_round,
            num_sites=len(results),
        )
        if self.on_round is not None:
            self.on_round(self.coordinator.history[-1])
        return None, {}

    def expected_reply_shapes(self) -> list[tuple[int, ...]]:
        """Shapes of every site's reply this round: the phase's statistics, encoded with SecAgg+.

        :mod:`server.secagg_checks` checks each masked vector against these (after Flower's
        weight factor); :meth:`screen_plain_replies` checks plain replies.
        """
        shapes = self.coordinator.expected_reply_shapes()
        if self.codec is None:
            return shapes
        return [self.codec.encoded_shape(shape) for shape in shapes]

    def screen_plain_replies(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> list[tuple[ClientProxy, FitRes]]:
        """Return the plain replies that follow the round's layout; add the others to ``failures``.

        A rejected reply is logged with its node id and what was wrong (never a value) and
        appended to ``failures`` as a :class:`RejectedReply`, so it is never summed and its
        site counts as dropped.

        Parameters
        ----------
        server_round : int
        results : list of (ClientProxy, FitRes)
            The round's replies, as Flower received them.
        failures : list
            The round's failures; extended in place.
        """
        phase = self.coordinator.phase
        shapes = self.expected_reply_shapes()
        kept = []
        for proxy, res in results:
            try:
                if res.num_examples != 1 or res.metrics:
                    raise ProtocolError("num_examples or metrics set beside the statistics; "
                                        "expected num_examples=1 and no metrics.")
                try:
                    arrays = parameters_to_ndarrays(res.parameters)
                except Exception as exc:  # whatever numpy raises on bytes it cannot read
                    raise ProtocolError("its arrays cannot be read as numpy arrays "
                                        f"({type(exc).__name__}).") from exc
                check_site_reply(arrays, phase=phase, shapes=shapes)
            except ProtocolError as exc:
                failures.append(reject_reply(server_round, proxy.node_id, str(exc)))
                continue
            kept.append((proxy, res))
        return kept

    def decode_secure_sum(
        self, server_round: int, mean: list[NDArray[Any]], *, num_sites: int
    ) -> list[NDArray[np.float64]]:
        """Decode SecAgg+'s mean into sums, refusing an aggregate no honest sites can produce.

        Checked before the coordinator sees anything: every limb sum is whole and in range
        (:meth:`SecAggPlusSumCodec.decode`), the sums have the round's public shapes and are
        finite, and under DP no count lies ``IMPOSSIBLE_NOISE_STDS`` worst-case noise stds
        below zero. (The exact coordinator checks the exact sums further, first thing in its
        ``step``: :func:`server.coordinator.check_sums`.)

        Parameters
        ----------
        server_round : int
        mean : list of ndarray
            The aggregated mean SecAgg+ hands to ``aggregate_fit``.
        num_sites : int
            Sites whose masked vectors are in it.
        """
        assert self.codec is not None
        where = f"round {server_round} ({self.coordinator.phase.value})"
        try:
            sums = self.codec.decode(mean, num_sites=num_sites, fraction_bits=self.fraction_bits)
        except ProtocolError as exc:
            raise ProtocolError(f"{where}: the secure sum cannot be decoded: {exc} Nothing is "
                                "published.") from exc
        got = [np.shape(s) for s in sums]
        expected = self.coordinator.expected_reply_shapes()
        if got != expected:
            raise ProtocolError(f"{where}: the decoded aggregate has shapes {got}; expected "
                                f"{expected}. Nothing is published.")
        if not all(np.all(np.isfinite(s)) for s in sums):
            raise ProtocolError(f"{where}: the decoded aggregate holds non-finite values. "
                                "Nothing is published.")
        if isinstance(self.coordinator, DPKMeansCoordinator):
            self._check_dp_counts(where, sums, num_sites=num_sites)
        return sums

    def _check_dp_counts(self, where: str, sums: list[NDArray[np.float64]], *,
                         num_sites: int) -> None:
        """Refuse noisy counts further below zero than any honest noise reaches."""
        assert isinstance(self.coordinator, DPKMeansCoordinator)
        phase = self.coordinator.phase
        stds = round_noise_std(phase, self.coordinator.dp, self.coordinator.features)
        roles = reply_roles(phase, dp=True)
        for values, std, role in zip(sums, stds, roles, strict=True):
            # round_noise_std is the least noise; a site relying on fewer honest sites adds
            # more, at most sqrt(num_sites) times the least in total.
            floor = -IMPOSSIBLE_NOISE_STDS * std * math.sqrt(num_sites)
            if role is Role.COUNT and np.any(values < floor):
                raise ProtocolError(
                    f"{where}: the decoded aggregate is impossible (counts more than "
                    f"{IMPOSSIBLE_NOISE_STDS:g} noise stds below zero): a site's mask "
                    "generator or encoding does not match the server's, or a site is faulty. "
                    "Nothing is published.")

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        """No federated evaluation: evaluate messages bypass SecAgg+, so none are sent."""
        return []

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        """Never called (no evaluate round)."""
        return None, {}

    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
        """No centralised evaluation on the server: it holds no data."""
        return None



def describe_failure(failure: object) -> str:
    """One line about a failed site reply: the site's sanitised error when it sent one."""
    error = failure[1] if isinstance(failure, tuple) else failure
    if isinstance(error, BaseException) and error.args:
        error = error.args[0]
    text = str(getattr(error, "reason", error))
    match = re.search(re.escape(SITE_ERROR_PREFIX) + r" [a-z]+: [^'\"\n(]+", text)
    if match:
        return match.group(0).strip()
    # A ClientApp exception outside fedseg's boundary mod: "... occurred. Message: <text>".
    match = re.search(r"Message: (.+?)(?:\\n|\n|$)", text)
    if match:
        return match.group(1)[:300]
    lines = text.strip().splitlines()
    return (lines[-1] if lines else type(error).__name__)[:300]
