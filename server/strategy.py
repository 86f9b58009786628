"""Flower (legacy ``Strategy``) adapter around :class:`server.coordinator.KMeansCoordinator`.

SecAgg+ exists in Flower 1.42 only on the legacy path (``LegacyContext`` +
``SecAggPlusWorkflow``), so this strategy implements the legacy interface. It sends every site
the same public instruction, and in ``aggregate_fit`` receives either SecAgg+'s aggregated mean
(every result then carries the same parameters) or the plain per-site replies, turns them into
sums and hands them to the coordinator.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from logging import INFO

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

from common.errors import SITE_ERROR_PREFIX, ProtocolError
from common.protocol import GROUPS_KEY, PHASE_KEY, PLAN_KEY, ROUND_KEY
from common.secure_sum import FRACTION_BITS, SecAggPlusSumCodec, plain_sum
from server.coordinator import KMeansCoordinator, RoundRecord
from server.dp_coordinator import DPKMeansCoordinator


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
        coordinator: KMeansCoordinator | DPKMeansCoordinator,
        num_sites: int,
        codec: SecAggPlusSumCodec | None,
        on_round: Callable[[RoundRecord], None] | None = None,
        run_plan: str = "",
        fraction_bits: int = FRACTION_BITS,
    ) -> None:
        super().__init__()
        self.coordinator = coordinator
        self.num_sites = num_sites
        self.codec = codec
        self.on_round = on_round
        self.run_plan = run_plan
        self.fraction_bits = fraction_bits

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
        clients = client_manager.sample(num_clients=self.num_sites, min_num_clients=self.num_sites)
        return [(client, fit_ins) for client in clients]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Turn the round's replies into sums and advance the coordinator."""
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
            sums = self.codec.decode(mean, num_sites=len(results),
                                     fraction_bits=self.fraction_bits)
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
