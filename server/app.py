"""The ServerApp: runs federated k-means rounds, with SecAgg+ by default.

SecAgg+ exists only on Flower 1.42's legacy path, so the app wraps the legacy strategy in a
``LegacyContext`` and runs each round through ``SecAggPlusWorkflow`` (or Flower's plain fit
workflow when ``privacy=none``). Unlike ``DefaultWorkflow`` it stops as soon as the coordinator
is done instead of running a fixed number of rounds. This module is the one place that knows
these Flower details, so it can be swapped when Flower ships a Message-API SecAgg+.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import flwr.compat.common.recorddict_compat as compat
from flwr.app import ConfigRecord, Context
from flwr.common import ndarrays_to_parameters
from flwr.common.logger import log
from flwr.server import LegacyContext, ServerApp, ServerConfig
from flwr.server.compat.app_utils import start_update_client_manager_thread
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.server.workflow.default_workflows import default_fit_workflow
from flwr.serverapp import Grid

from common import mask_prg, secagg_primitives, shamir
from common.autoencoder import AESettings, TabularLayout
from common.dp import DpPlan, DpSettings, epsilon_spent
from common.errors import ConfigError, ProtocolError
from common.features import FeatureSpec
from common.secagg_params import neighbourhood_size, threshold_for
from common.secure_sum import (
    CLIPPING_RANGE,
    FRACTION_BITS,
    MAX_WEIGHT,
    MODULUS_RANGE,
    SecAggPlusSumCodec,
    check_no_wrap,
    quantization_range_for,
)
from common.segment_model import SegmentModel
from common.site_policy import RunPlan
from server.ae_coordinator import AEKMeansCoordinator
from server.coordinator import KMeansCoordinator, KMeansSettings, RoundRecord
from server.dp_coordinator import DPKMeansCoordinator, expected_noise_summary
from server.grid import Dropout, FastPollGrid, site_names
from server.secagg_checks import ScreeningSecAggPlusWorkflow
from server.secagg_prekeys import NextKeys, NextSetupGrid, PrekeyedSetupGrid, setup_parameters
from server.strategy import FIRST_ROUND_WAIT, FederatedKMeans, describe_failure

_SECAGG_MOD = importlib.import_module("flwr.server.workflow.secure_aggregation.secaggplus_workflow")
SECAGG_MODULES = (_SECAGG_MOD,
                  importlib.import_module("flwr.common.secure_aggregation.secaggplus_utils"))
"""Flower modules whose SecAgg+ mask generator the server replaces (see common.mask_prg)."""
PRIMITIVE_MODULES = (_SECAGG_MOD,
                     importlib.import_module("flwr.common.secure_aggregation.crypto.shamir"))
"""... and whose key agreement and secret sharing it replaces (common.secagg_primitives)."""
mask_prg.install(*SECAGG_MODULES)
secagg_primitives.install(*PRIMITIVE_MODULES)


def secagg_suite() -> str:
    """Return the SecAgg+ suite in force here (masks, secret sharing, key agreement)."""
    return secagg_primitives.suite_of(SECAGG_MODULES, PRIMITIVE_MODULES)


SECAGG_STAGES = ("setup", "share_keys", "collect_masked_vectors", "unmask")
"""The four SecAgg+ stages of a round, each one message exchange with every site."""


AE_DP_REFUSAL = (
    "model=ae_kmeans with privacy=secagg_dp is refused: the autoencoder's training is not "
    "differentially private yet (its weight updates would leave the sites without being "
    "accounted in their privacy budgets). Use model=ae_kmeans privacy=secagg (exact secure "
    "sums; the sites must allow runs without DP: site.require_dp=false), or model=kmeans "
    "with DP.")

Coordinator = KMeansCoordinator | DPKMeansCoordinator | AEKMeansCoordinator
"""The server's state machines: exact k-means, DP k-means, autoencoder + k-means."""


def secagg_shares(num_sites: int, *, tolerate_dropouts: bool = False) -> tuple[int, int]:
    """Choose the SecAgg+ neighbourhood size and reconstruction threshold for ``num_sites``.

    The derivation (what a lying server and its colluders need, the hypergeometric bound for
    neighbourhoods above 30 sites) is in :mod:`common.secagg_params`; every site re-derives the
    same minimum from its own policy and refuses a weaker set-up.

    Parameters
    ----------
    num_sites : int
        Sites sampled in the round (>= 2).
    tolerate_dropouts : bool, default=False
        Whether the run uses rounds with dropped sites (``strategy.accept_partial_rounds``).
        Without, the threshold is the whole neighbourhood.

    Returns
    -------
    (num_shares, threshold) : tuple of int
    """
    shares = neighbourhood_size(num_sites, tolerate_dropouts=tolerate_dropouts)
    return shares, threshold_for(shares, tolerate_dropouts=tolerate_dropouts)


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
        Shares needed to rebuild a secret: ``None`` is the whole neighbourhood (or, when
        dropouts are tolerated, all but ``floor((s - 1) / 3)``; see common.secagg_params); a
        value <= 1 is a fraction of ``num_shares``; a value > 1 is a count. Sites refuse a
        threshold below their policy's rule.
    timeout : float or None
        Seconds to wait for the sites' replies in each stage (None: until every site has
        answered or Flower has found it offline, ~60 s after its last heartbeat).
    stage_timeouts : mapping or None
        Per-stage overrides of ``timeout``, keyed by :data:`SECAGG_STAGES` (a missing or null
        entry: ``timeout``).
    """

    num_shares: float | None = None
    reconstruction_threshold: float | None = None
    timeout: float | None = None
    stage_timeouts: Mapping[str, float | None] | None = None

    def stage_timeout(self, stage: str) -> float | None:
        """Seconds to wait for replies in ``stage`` (checked by :meth:`check_timeouts`)."""
        override = dict(self.stage_timeouts or {}).get(stage)
        return self.timeout if override is None else float(override)

    def check_timeouts(self) -> None:
        """Refuse unknown stage names and non-positive timeouts, naming the key."""
        unknown = sorted(set(self.stage_timeouts or {}) - set(SECAGG_STAGES))
        if unknown:
            raise ConfigError(f"privacy.stage_timeouts has unknown stage(s) {unknown}; "
                              f"expected some of {list(SECAGG_STAGES)}.")
        for stage in SECAGG_STAGES:
            value = self.stage_timeout(stage)
            if value is not None and not (isinstance(value, int | float) and 0 < value < 1e6):
                key = ("privacy.timeout" if dict(self.stage_timeouts or {}).get(stage) is None
                       else f"privacy.stage_timeouts.{stage}")
                raise ConfigError(f"{key}={value!r} should be a number of seconds > 0 "
                                  "(or null: wait until every site answered).")

    def resolve(self, num_sites: int, *, tolerate_dropouts: bool = False) -> tuple[int, int]:
        """Return the ``(num_shares, threshold)`` Flower will use for ``num_sites`` sites.

        Flower builds each neighbourhood as a ring of ``2 * (s // 2) + 1`` sites, so an even
        ``s`` below ``num_sites`` is rounded up to the next odd number here (Flower does the
        same, with a warning); the values returned are exactly the ones in force.
        """
        if num_sites == 2:
            shares = 2  # two sites: each is the other's only neighbour
        elif self.num_shares is None:
            shares = secagg_shares(num_sites, tolerate_dropouts=tolerate_dropouts)[0]
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
            threshold = threshold_for(shares, tolerate_dropouts=tolerate_dropouts)
        else:
            threshold = _count_or_fraction(self.reconstruction_threshold, shares,
                                           "privacy.reconstruction_threshold")
        if not 2 <= threshold <= shares:
            raise ConfigError(
                f"privacy.reconstruction_threshold={self.reconstruction_threshold} gives "
                f"{threshold} for {shares} shares; expected between 2 and {shares}."
            )
        return shares, threshold


@dataclass(frozen=True)
class SecAggDpSettings(SecAggSettings, DpSettings):
    """SecAgg+ with customer-level DP held by the sites (``privacy=secagg_dp``, the default).

    The SecAgg+ settings of :class:`SecAggSettings` and the DP target and schedule of
    :class:`common.dp.DpSettings` (which calibrates the plan).
    """


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
    dp : DpPlan or None
        The differential-privacy plan (``privacy=secagg_dp``), calibrated before the run.
    ae : AESettings or None
        ``model=ae_kmeans``: the federated autoencoder whose embedding the segments are found
        in (:mod:`server.ae_coordinator`).
    """

    settings: KMeansSettings
    features: tuple[FeatureSpec, ...]
    num_sites: int
    secagg: SecAggSettings | None
    config: dict[str, Any] = field(default_factory=dict)
    dp: DpPlan | None = None
    ae: AESettings | None = None

    def __post_init__(self) -> None:
        if self.num_sites < 2:
            raise ConfigError(f"federation.num_sites={self.num_sites} should be >= 2.")
        if self.ae is not None and self.dp is not None:
            raise ConfigError(AE_DP_REFUSAL)
        if self.ae is not None:
            TabularLayout.from_features(self.features)  # categorical columns well formed
        if self.dp is not None and self.secagg is None:
            raise ConfigError("differential privacy needs SecAgg+: each site adds only its "
                              "share of the noise.")
        if self.secagg is not None:
            check_no_wrap(num_sites=self.num_sites, quantization_range=self.quantization_range)
            self.secagg_parameters()
            self.secagg.check_timeouts()

    @property
    def max_rounds(self) -> int:
        """Rounds of a run at most: moments + initialisation + Lloyd + profile."""
        if self.dp is not None:
            return sum(self.dp.rounds.values())
        extra = 0 if self.ae is None else self.ae.training_rounds + 1  # training + embed
        return 2 + extra + self.settings.init_rounds + self.settings.max_rounds

    @property
    def init_candidates(self) -> int:
        """Candidate centres of the initialisation."""
        if self.dp is not None:
            assert isinstance(self.secagg, SecAggDpSettings)
            return self.secagg.init_candidates
        return self.settings.n_candidates if self.settings.init == "summary" else 0

    def new_coordinator(self) -> Coordinator:
        """Return the state machine for this plan (DP, exact, or autoencoder + k-means)."""
        if self.ae is not None:
            return AEKMeansCoordinator(settings=self.settings, features=self.features,
                                       ae=self.ae)
        if self.dp is not None:
            return DPKMeansCoordinator(settings=self.settings, features=self.features,
                                       dp=self.dp, init_candidates=self.init_candidates)
        return KMeansCoordinator(settings=self.settings, features=self.features)

    def secagg_parameters(self) -> tuple[int, int]:
        """``(num_shares, threshold)`` in force for this plan (SecAgg+ only)."""
        assert self.secagg is not None
        return self.secagg.resolve(
            self.num_sites, tolerate_dropouts=self.settings.accept_partial_rounds)

    def run_plan(self, *, prg: str) -> RunPlan:
        """Return the public plan announced to sites with every instruction (they check it)."""
        if self.dp is not None:
            return RunPlan(
                features=tuple(f.name for f in self.features), k=self.settings.k, n_init=1,
                init="summary", init_candidates=self.init_candidates,
                init_rounds=self.dp.rounds["init"], max_rounds=self.dp.rounds["lloyd"],
                num_sites=self.num_sites, prg=prg, dp=self.dp.to_json())
        summary = self.settings.init == "summary"
        ae = {} if self.ae is None else {
            "model": "ae_kmeans",
            "ae": AEKMeansCoordinator(settings=self.settings, features=self.features,
                                      ae=self.ae).run_plan_ae()}
        return RunPlan(
            features=tuple(f.name for f in self.features), k=self.settings.k,
            n_init=self.settings.n_init, init=self.settings.init,
            init_candidates=self.settings.n_candidates if summary else 0,
            init_rounds=self.settings.init_rounds if summary else 0,
            max_rounds=self.settings.max_rounds, num_sites=self.num_sites,
            prg=prg if self.secagg is not None else "", **ae,
        )

    @property
    def quantization_range(self) -> int:
        """SecAgg+ quantisation range for this federation's size."""
        return quantization_range_for(self.num_sites)

    def privacy_record(self, released: list[float] | None = None) -> dict[str, Any]:
        """Describe the privacy guarantees, as recorded in the segment model.

        Parameters
        ----------
        released : list of float, optional
            Noise multipliers of the rounds actually released (DP runs): their composition
            is the epsilon spent.
        """
        if self.secagg is None:
            return {"secure_aggregation": "none", "differential_privacy": None}
        shares, threshold = self.secagg_parameters()
        return {
            "secure_aggregation": "secagg+",
            "secagg": {
                "num_shares": shares,
                "reconstruction_threshold": threshold,
                "clipping_range": CLIPPING_RANGE,
                "quantization_range": self.quantization_range,
                "modulus_range": MODULUS_RANGE,
                "max_weight": MAX_WEIGHT,
                "encoding": "exact fixed-point limbs with public offset (common.secure_sum)",
                "mask_prg": mask_prg.PRG_ID,
                "secret_sharing": shamir.SCHEME_ID,
                "key_agreement": secagg_primitives.KEX_ID,
                "dropouts_tolerated": self.settings.accept_partial_rounds,
            },
            "differential_privacy": None if self.dp is None else self.dp_record(released),
        }

    def dp_record(self, released: list[float] | None) -> dict[str, Any]:
        """Describe the DP guarantee of this run: target, planned and spent epsilon, mechanism."""
        assert self.dp is not None
        spent = None if released is None else epsilon_spent(released, self.dp.delta)
        return {
            "unit": "customer (add/remove one customer anywhere in the federation)",
            "epsilon_target": self.dp.epsilon,
            "epsilon_planned": self.dp.planned_epsilon(),
            "epsilon_spent": spent,
            "delta": self.dp.delta,
            "rounds_released": None if released is None else len(released),
            "mechanism": self.dp.mechanism + " (each site adds its share before SecAgg+)",
            "accountant": "dp_accounting PLD (pessimistic), composed by the server and by "
                          "every site over its own ledger",
            "noise_multipliers": dict(self.dp.sigma),
            "rounds": dict(self.dp.rounds),
            "clip_norm": self.dp.clip,
            "grid_bits": self.dp.grid_bits,
            "bounds": {f.name: list(b) for f, b in zip(self.features, self.dp.bounds,
                                                       strict=True)},
            "noise_std": expected_noise_summary(self.dp, self.features),
            "sites_relied_on": "planned sites minus tolerated dropouts minus "
                               "floor(site.collusion_fraction * sites)",
        }


class FailureRecordingSecAggPlusWorkflow(ScreeningSecAggPlusWorkflow):
    """Flower's SecAgg+ workflow with a timeout per stage, naming the sites a round lost.

    Sites answer refusals with a code and a generic text only; when a refusal or a dropout
    halts a round, those codes and the sites' names are what tells the operator why.

    Parameters
    ----------
    stage_timeouts : mapping
        Seconds to wait for replies in each of :data:`SECAGG_STAGES` (None: until every site
        answered or was found offline).
    **kwargs
        ``SecAggPlusWorkflow``'s parameters.
    """

    def __init__(self, *, stage_timeouts: Mapping[str, float | None], planned_sites: int = 0,
                 parameters_for: Callable[[int], tuple[float, float]] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.stage_timeouts = dict(stage_timeouts)
        self.planned_sites = planned_sites
        self.parameters_for = parameters_for
        self._sized = False
        self._state: Any = None
        self._next_keys: NextKeys | None = None
        self._prekeyed = False

    def _fit_to_connected(self, context: LegacyContext) -> None:
        """Size the round's SecAgg+ parameters to the sites still connected.

        After a site has left for good (``strategy.accept_partial_rounds``), a round samples
        fewer sites than planned; the neighbourhood and threshold are then derived for that
        number by the same rule, or every site would refuse a neighbourhood larger than the
        round.
        """
        if self.parameters_for is None:
            return
        wait = 0.0 if self._sized else FIRST_ROUND_WAIT  # the first round waits for sites
        self._sized = True
        deadline = time.monotonic() + wait
        connected = context.client_manager.num_available()
        while connected < self.planned_sites and time.monotonic() < deadline:
            time.sleep(0.1)
            connected = context.client_manager.num_available()
        connected = min(self.planned_sites, connected)
        if connected < 2:
            return
        try:
            self.num_shares, self.reconstruction_threshold = self.parameters_for(connected)
        except ConfigError:
            pass  # an explicit neighbourhood larger than the round: the sites refuse it

    def _enter(self, stage: str, grid: Grid) -> None:
        self.timeout = self.stage_timeouts.get(stage)
        if isinstance(grid, FastPollGrid):
            grid.stage, grid.stage_timeout = stage, self.timeout

    def setup_stage(self, grid: Grid, context: LegacyContext, state: Any) -> bool:
        """Remember the round's state, then run Flower's set-up stage.

        A site lost here never received or sent keys: it is out of the round, not *dead* (see
        :meth:`share_keys_stage`).
        """
        self._state = state
        self._enter("setup", grid)
        self._fit_to_connected(context)
        prepared, self._next_keys = self._next_keys, None
        self._prekeyed = False
        if prepared is not None and prepared.keys:
            # Keys the sites made with the last unmask reply (server.secagg_prekeys): used
            # only if this round samples exactly them, with the parameters they checked.
            prekeyed = PrekeyedSetupGrid(grid, prepared=prepared)
            ok = bool(super().setup_stage(prekeyed, context, state))
            self._prekeyed = prekeyed.used
        else:
            ok = bool(super().setup_stage(grid, context, state))
        _forget(state, set(state.sampled_node_ids) - set(state.active_node_ids))
        return ok

    def share_keys_stage(self, grid: Grid, context: LegacyContext, state: Any) -> bool:
        """Run Flower's key-sharing stage under its own timeout.

        A site lost in this stage never handed out shares of its keys, so no other site masked
        with it or can rebuild its masks. Flower 1.42 still lists it as *dead* in the unmask
        request (every site that passed set-up and is not active), which no honest site can
        answer (each site's guard refuses naming a site it exchanged no shares with, and
        Flower's own mod would fail on the missing share): it is taken out of the round here.
        """
        self._enter("share_keys", grid)
        if self._prekeyed:
            # The round's first exchange (its set-up rode on the last unmask): a site first
            # heard from now gets the set-up's time, as it would have in a separate set-up.
            setup = self.stage_timeouts.get("setup")
            self.timeout = None if setup is None or self.timeout is None else \
                max(setup, self.timeout)
            if isinstance(grid, FastPollGrid):
                grid.stage_timeout = self.timeout
        before = set(state.active_node_ids)
        ok = bool(super().share_keys_stage(grid, context, state))
        _forget(state, before - set(state.active_node_ids))
        return ok

    def collect_masked_vectors_stage(self, grid: Grid, context: LegacyContext,
                                     state: Any) -> bool:
        """Run Flower's masked-vector stage under its own timeout."""
        self._enter("collect_masked_vectors", grid)
        return bool(super().collect_masked_vectors_stage(grid, context, state))

    def unmask_stage(self, grid: Grid, context: LegacyContext, state: Any) -> bool:
        """Run Flower's unmasking stage under its own timeout."""
        self._enter("unmask", grid)
        parameters = self._next_setup_parameters(len(state.active_node_ids))
        if parameters is None:
            return bool(super().unmask_stage(grid, context, state))
        attached = NextSetupGrid(grid, parameters=parameters)
        ok = bool(super().unmask_stage(attached, context, state))
        self._next_keys = attached.next if ok else None
        return ok

    def _next_setup_parameters(self, sites: int) -> dict[str, Any] | None:
        """Return the set-up parameters the next round sends if it samples ``sites`` sites."""
        if sites < 2:
            return None
        shares, threshold = self.num_shares, self.reconstruction_threshold
        if self.parameters_for is not None:
            try:
                shares, threshold = self.parameters_for(min(self.planned_sites, sites))
            except ConfigError:
                return None
        return setup_parameters(sites, num_shares=shares, reconstruction_threshold=threshold,
                                clipping_range=self.clipping_range,
                                quantization_range=self.quantization_range,
                                modulus_range=self.modulus_range, max_weight=self.max_weight)

    def failure_reasons(self) -> list[str]:
        """Distinct site error texts of the last round (sanitised by the sites)."""
        failures = [] if self._state is None else list(self._state.failures)
        return sorted({describe_failure(f) for f in failures})


def _forget(state: Any, lost: set[int]) -> None:
    """Take sites that never handed out key shares out of a SecAgg+ round's state.

    No site masked with them (Flower's client masks only with the neighbours whose shares it
    received), so they are neither *dead* at unmask (no one could answer for them) nor part of
    any dead site's pairwise masks the server rebuilds (their public keys may not even exist).
    Whether enough sites remain is unchanged: they were not active.
    """
    if not lost:
        return
    state.sampled_node_ids = set(state.sampled_node_ids) - lost
    for node in lost:
        state.nid_to_neighbours.pop(node, None)
    for neighbours in state.nid_to_neighbours.values():
        neighbours -= lost


def flower_secagg_args(shares: int, threshold: int) -> tuple[float, float]:
    """Return ``(num_shares, reconstruction_threshold)`` as Flower's workflow takes them.

    Flower refuses integer shares <= 2 (only two sites: both share with each other) and
    integer thresholds equal to the shares; the fraction 1.0 ("all") gives Flower the same
    integers in those two cases.
    """
    return (shares if shares > 2 else 1.0), (threshold if threshold < shares else 1.0)


def describe_dropouts(dropouts: list[Dropout]) -> str:
    """One phrase naming the sites that dropped out, e.g. ``site 'north' (share_keys: ...)``."""
    return "; ".join(f"site '{d.site}' ({d.stage}: {d.reason})" for d in dropouts)


@dataclass
class RunResult:
    """What a finished run leaves behind on the server side."""

    coordinator: Coordinator
    model: SegmentModel | None = None
    seconds: float = 0.0
    sites: dict[str, str] = field(default_factory=dict)
    """``node id -> site name`` of the sites at the start of the run."""
    dropouts: list[dict[str, Any]] = field(default_factory=list)
    """Sites lost during the run: round, stage, node id, site name, reason."""


def run_federated_kmeans(
    grid: Grid,
    context: Context,
    plan: FederationPlan,
    *,
    on_round: Callable[[RoundRecord], None] | None = None,
    coordinator: Coordinator | None = None,
) -> RunResult:
    """Run all rounds of federated k-means on ``grid`` and build the segment model.

    Parameters
    ----------
    grid : flwr.serverapp.Grid
    context : flwr.app.Context
    plan : FederationPlan
    on_round : callable, optional
        Progress callback, called after every round.
    coordinator : KMeansCoordinator, optional
        The state machine deciding each round's instruction (default: a fresh one for
        ``plan``). The attack tests pass a deviating one: sites must refuse it.
    """
    started = time.perf_counter()
    if not isinstance(grid, FastPollGrid):
        grid = FastPollGrid(grid)
    names = site_names(grid)
    grid.names = names
    if coordinator is None:
        coordinator = plan.new_coordinator()
    codec = SecAggPlusSumCodec(plan.quantization_range) if plan.secagg is not None else None
    announced = plan.run_plan(prg=secagg_suite())
    strategy = FederatedKMeans(
        coordinator=coordinator, num_sites=plan.num_sites, codec=codec, on_round=on_round,
        run_plan=announced.to_json(),
        fraction_bits=FRACTION_BITS if plan.dp is None else plan.dp.grid_bits,
    )
    workflow: FailureRecordingSecAggPlusWorkflow | None = None
    if plan.secagg is not None:
        shares, threshold = flower_secagg_args(*plan.secagg_parameters())
        secagg = plan.secagg
        workflow = FailureRecordingSecAggPlusWorkflow(
            num_shares=shares,
            reconstruction_threshold=threshold,
            planned_sites=plan.num_sites,
            parameters_for=lambda n: flower_secagg_args(*secagg.resolve(
                n, tolerate_dropouts=plan.settings.accept_partial_rounds)),
            max_weight=MAX_WEIGHT,
            clipping_range=CLIPPING_RANGE,
            quantization_range=plan.quantization_range,
            modulus_range=MODULUS_RANGE,
            stage_timeouts={stage: plan.secagg.stage_timeout(stage) for stage in SECAGG_STAGES},
        )
        fit_workflow: Callable[[Grid, Context], None] = workflow
    else:
        fit_workflow = default_fit_workflow
    max_rounds = plan.max_rounds
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
            grid.begin_round(server_round, "fit")
            try:
                fit_workflow(grid, legacy)
            except ProtocolError as exc:
                lost = grid.round_dropouts()
                if lost:
                    raise ProtocolError(f"{exc} Dropped out: {describe_dropouts(lost)}.") \
                        from exc
                gone = sorted(names[n] for n in set(names) - set(grid.get_node_ids()))
                if gone:
                    raise ProtocolError(f"{exc} No longer connected: "
                                        f"{', '.join(repr(g) for g in gone)}.") from exc
                raise
            lost = grid.round_dropouts()
            for drop in lost:
                log(WARNING, "fedseg: round %s: site '%s' dropped out (%s: %s)",
                    server_round, drop.site, drop.stage, drop.reason)
            if len(coordinator.history) == before:
                reasons = workflow.failure_reasons() if workflow is not None else []
                raise ProtocolError(
                    f"round {server_round} ({coordinator.phase.value}) produced no aggregate: "
                    "secure aggregation halted"
                    + (f"; dropped out: {describe_dropouts(lost)}" if lost else "")
                    + (f"; site replies: {'; '.join(reasons)}." if reasons
                       else "." if lost else " (too few sites replied?).")
                    + " Nothing is published."
                )
    finally:
        stop.set()
        thread.join()
    if not coordinator.done:
        raise ProtocolError(f"the run ended after {max_rounds} rounds without a model.")
    released = coordinator.released_multipliers if isinstance(
        coordinator, DPKMeansCoordinator) else None
    model = coordinator.build_model(privacy=plan.privacy_record(released), config=plan.config)
    log(INFO, "fedseg: segment model built with %d segments", len(model.segments))
    return RunResult(coordinator=coordinator, model=model, seconds=time.perf_counter() - started,
                     sites={str(k): v for k, v in names.items()},
                     dropouts=[d.to_dict() for d in grid.dropouts])


def make_server_app(
    plan: FederationPlan,
    *,
    on_result: Callable[[RunResult], None],
    on_round: Callable[[RoundRecord], None] | None = None,
    coordinator_factory: Callable[[], Coordinator] | None = None,
) -> ServerApp:
    """Build a ServerApp that runs ``plan`` and passes the result to ``on_result``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        coordinator = None if coordinator_factory is None else coordinator_factory()
        on_result(run_federated_kmeans(grid, context, plan, on_round=on_round,
                                       coordinator=coordinator))

    return app
