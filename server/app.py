"""The ServerApp: runs federated k-means rounds, with SecAgg+ by default.

SecAgg+ exists only on Flower 1.42's legacy path, so the app wraps the legacy strategy in a
``LegacyContext`` and runs each round through ``SecAggPlusWorkflow`` (or Flower's plain fit
workflow when ``privacy=none``). Unlike ``DefaultWorkflow`` it stops as soon as the coordinator
is done instead of running a fixed number of rounds. This module is the one place that knows
these Flower details, so it can be swapped when Flower ships a Message-API SecAgg+.
"""

from __future__ import annotations

import importlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from logging import INFO
from typing import Any

import flwr.compat.common.recorddict_compat as compat
from flwr.app import ConfigRecord, Context
from flwr.common import ndarrays_to_parameters
from flwr.common.logger import log
from flwr.server import LegacyContext, ServerApp, ServerConfig
from flwr.server.compat.app_utils import start_update_client_manager_thread
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.server.workflow.default_workflows import default_fit_workflow
from flwr.serverapp import Grid

from common import mask_prg
from common.errors import ConfigError, ProtocolError
from common.features import FeatureSpec
from common.secure_sum import (
    CLIPPING_RANGE,
    MAX_WEIGHT,
    MODULUS_RANGE,
    SecAggPlusSumCodec,
    check_no_wrap,
    quantization_range_for,
)
from common.segment_model import SegmentModel
from server.coordinator import KMeansCoordinator, KMeansSettings, RoundRecord
from server.strategy import FederatedKMeans

SECAGG_MODULES = (
    importlib.import_module("flwr.server.workflow.secure_aggregation.secaggplus_workflow"),
    importlib.import_module("flwr.common.secure_aggregation.secaggplus_utils"),
)
"""Flower modules whose SecAgg+ mask generator the server replaces (see common.mask_prg)."""
mask_prg.install(*SECAGG_MODULES)


COMPLETE_GRAPH_MAX_SITES = 30
"""Up to this many sites every site shares its secrets with every other (see secagg_shares)."""


def secagg_shares(num_sites: int) -> tuple[int, int]:
    """Choose the SecAgg+ neighbourhood size and reconstruction threshold for ``num_sites``.

    SecAgg+ (Bell, Bonawitz, Gascon, Lepoint, Raykova, "Secure single-server aggregation with
    (poly)logarithmic overhead", CCS 2020) secret-shares each site's mask keys with ``s``
    neighbours; any ``t`` of them can rebuild the keys of a dropped site.

    * ``s``: federations of customer-data sites are small, so up to
      :data:`COMPLETE_GRAPH_MAX_SITES` sites every site is everyone's neighbour (``s = n``):
      the strongest setting, and its O(n^2) key agreements cost little at that size. Beyond,
      the paper's logarithmic neighbourhoods apply: the smallest odd ``s >= 3 * log2(n)``
      (odd because Flower's neighbour ring is symmetric around each site).
    * ``t = floor(s / 2) + 1``, a strict majority of a neighbourhood: the server needs ``t``
      shares to unmask anything, so it learns nothing beyond the sum unless ``t`` of a site's
      neighbours collude with it, and the round survives up to ``s - t`` dropped neighbours.

    Parameters
    ----------
    num_sites : int
        Sites sampled in the round (>= 2).

    Returns
    -------
    (num_shares, threshold) : tuple of int
    """
    if num_sites < 2:
        raise ConfigError(f"num_sites={num_sites} should be >= 2 for SecAgg+.")
    if num_sites <= COMPLETE_GRAPH_MAX_SITES:
        shares = num_sites
    else:
        shares = math.ceil(3 * math.log2(num_sites))
        shares += 1 - shares % 2
        shares = min(shares, num_sites)
    return shares, max(2, shares // 2 + 1)


@dataclass(frozen=True)
class SecAggSettings:
    """SecAgg+ protocol settings.

    Attributes
    ----------
    num_shares : float or None
        Neighbourhood size: ``None`` chooses it from the number of sites
        (:func:`secagg_shares`); a value <= 1 is a fraction of the sampled sites; a value > 1
        is a count.
    reconstruction_threshold : float or None
        Shares needed to rebuild a secret: ``None`` is a strict majority of the
        neighbourhood; a value <= 1 is a fraction of ``num_shares``; a value > 1 is a count.
    timeout : float or None
        Seconds to wait for replies in each stage (None: wait for all).
    """

    num_shares: float | None = None
    reconstruction_threshold: float | None = None
    timeout: float | None = None

    def resolve(self, num_sites: int) -> tuple[int, int]:
        """Return the ``(num_shares, threshold)`` Flower will use for ``num_sites`` sites.

        Flower builds each neighbourhood as a ring of ``2 * (s // 2) + 1`` sites, so an even
        ``s`` below ``num_sites`` is rounded up to the next odd number here (Flower does the
        same, with a warning); the values returned are exactly the ones in force.
        """
        if num_sites == 2:
            shares = 2  # two sites: each is the other's only neighbour
        elif self.num_shares is None:
            shares = secagg_shares(num_sites)[0]
        else:
            shares = _count_or_fraction(self.num_shares, num_sites, "privacy.num_shares")
            if shares < num_sites and shares % 2 == 0:
                shares += 1
            if not 3 <= shares <= num_sites:
                raise ConfigError(
                    f"privacy.num_shares={self.num_shares} gives {shares} shares for {num_sites} "
                    f"sites; expected between 3 and {num_sites}."
                )
        if self.reconstruction_threshold is None:
            threshold = max(2, shares // 2 + 1)
        else:
            threshold = _count_or_fraction(self.reconstruction_threshold, shares,
                                           "privacy.reconstruction_threshold")
        if not 2 <= threshold <= shares:
            raise ConfigError(
                f"privacy.reconstruction_threshold={self.reconstruction_threshold} gives "
                f"{threshold} for {shares} shares; expected between 2 and {shares}."
            )
        return shares, threshold


def _count_or_fraction(value: float, total: int, key: str) -> int:
    """Read a setting that is a fraction of ``total`` (<= 1) or a whole count (> 1)."""
    if value <= 0:
        raise ConfigError(f"{key}={value} should be > 0 (a fraction <= 1 or a count).")
    if value <= 1:
        return max(2, round(value * total))
    if value != int(value):
        raise ConfigError(f"{key}={value} should be a whole number when above 1.")
    return int(value)


def no_secure_aggregation() -> None:
    """Return ``None``: the explicit ``privacy=none`` choice (sites send plain statistics)."""
    return None


@dataclass(frozen=True)
class FederationPlan:
    """Everything the ServerApp needs, all public.

    Attributes
    ----------
    settings : KMeansSettings
    features : tuple of FeatureSpec
    num_sites : int
    secagg : SecAggSettings or None
        None runs without secure aggregation (an explicit choice: ``privacy=none``).
    config : dict
        Resolved configuration recorded in the segment model.
    """

    settings: KMeansSettings
    features: tuple[FeatureSpec, ...]
    num_sites: int
    secagg: SecAggSettings | None
    config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_sites < 2:
            raise ConfigError(f"federation.num_sites={self.num_sites} should be >= 2.")
        if self.secagg is not None:
            check_no_wrap(num_sites=self.num_sites, quantization_range=self.quantization_range)
            self.secagg.resolve(self.num_sites)

    @property
    def quantization_range(self) -> int:
        """SecAgg+ quantisation range for this federation's size."""
        return quantization_range_for(self.num_sites)

    def privacy_record(self) -> dict[str, Any]:
        """Describe the privacy guarantees, as recorded in the segment model."""
        if self.secagg is None:
            return {"secure_aggregation": "none", "differential_privacy": None}
        shares, threshold = self.secagg.resolve(self.num_sites)
        return {
            "secure_aggregation": "secagg+",
            "secagg": {
                "num_shares": shares,
                "reconstruction_threshold": threshold,
                "clipping_range": CLIPPING_RANGE,
                "quantization_range": self.quantization_range,
                "modulus_range": MODULUS_RANGE,
                "max_weight": MAX_WEIGHT,
                "encoding": "exact fixed-point limbs (common.secure_sum)",
            },
            "differential_privacy": None,
        }


@dataclass
class RunResult:
    """What a finished run leaves behind on the server side."""

    coordinator: KMeansCoordinator
    model: SegmentModel | None = None
    seconds: float = 0.0


def run_federated_kmeans(
    grid: Grid,
    context: Context,
    plan: FederationPlan,
    *,
    on_round: Callable[[RoundRecord], None] | None = None,
) -> RunResult:
    """Run all rounds of federated k-means on ``grid`` and build the segment model.

    Parameters
    ----------
    grid : flwr.serverapp.Grid
    context : flwr.app.Context
    plan : FederationPlan
    on_round : callable, optional
        Progress callback, called after every round.
    """
    started = time.perf_counter()
    coordinator = KMeansCoordinator(settings=plan.settings, features=plan.features)
    codec = SecAggPlusSumCodec(plan.quantization_range) if plan.secagg is not None else None
    strategy = FederatedKMeans(
        coordinator=coordinator, num_sites=plan.num_sites, codec=codec, on_round=on_round
    )
    if plan.secagg is not None:
        shares, threshold = plan.secagg.resolve(plan.num_sites)
        # Flower refuses integer shares <= 2 (only two sites: both share with each other) and
        # integer thresholds equal to the shares; the fraction 1.0 ("all") gives Flower the
        # same integers in those two cases.
        fit_workflow: Callable[[Grid, Context], None] = SecAggPlusWorkflow(
            num_shares=shares if shares > 2 else 1.0,
            reconstruction_threshold=threshold if threshold < shares else 1.0,
            max_weight=MAX_WEIGHT,
            clipping_range=CLIPPING_RANGE,
            quantization_range=plan.quantization_range,
            modulus_range=MODULUS_RANGE,
            timeout=plan.secagg.timeout,
        )
    else:
        fit_workflow = default_fit_workflow
    # Upper bound on rounds: moments + init + Lloyd + profile.
    max_rounds = 2 + plan.settings.init_rounds + plan.settings.max_rounds
    legacy = LegacyContext(
        context=context, config=ServerConfig(num_rounds=max_rounds), strategy=strategy
    )
    thread, stop, registered = start_update_client_manager_thread(grid, legacy.client_manager)
    registered.wait()
    try:
        legacy.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
            ndarrays_to_parameters([]), keep_input=True
        )
        cfg = ConfigRecord()
        cfg[Key.START_TIME] = time.time()
        legacy.state.config_records[MAIN_CONFIGS_RECORD] = cfg
        for server_round in range(1, max_rounds + 1):
            if coordinator.done:
                break
            cfg[Key.CURRENT_ROUND] = server_round
            before = len(coordinator.history)
            fit_workflow(grid, legacy)
            if len(coordinator.history) == before:
                raise ProtocolError(
                    f"round {server_round} ({coordinator.phase.value}) produced no aggregate: "
                    "secure aggregation halted (too few sites replied?)."
                )
    finally:
        stop.set()
        thread.join()
    if not coordinator.done:
        raise ProtocolError(f"the run ended after {max_rounds} rounds without a model.")
    model = coordinator.build_model(privacy=plan.privacy_record(), config=plan.config)
    log(INFO, "fedseg: segment model built with %d segments", len(model.segments))
    return RunResult(coordinator=coordinator, model=model, seconds=time.perf_counter() - started)


def make_server_app(
    plan: FederationPlan,
    *,
    on_result: Callable[[RunResult], None],
    on_round: Callable[[RoundRecord], None] | None = None,
) -> ServerApp:
    """Build a ServerApp that runs ``plan`` and passes the result to ``on_result``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        on_result(run_federated_kmeans(grid, context, plan, on_round=on_round))

    return app
