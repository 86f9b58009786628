"""Bad peers: a malformed reply is rejected, logged with its node id, and never aggregated.

Plain replies (``privacy=none``) are checked per site in ``FederatedKMeans.aggregate_fit``;
SecAgg+ masked vectors are screened before Flower sums them (``server.secagg_checks``), here in
full SecAgg+ rounds between Flower's real workflow and real site ClientApps, delivered in this
process through a grid that serialises every message as the transport does. A decoded secure
sum that no honest sites can produce stops the round before the coordinator sees it.
"""

from __future__ import annotations

import importlib
import logging
import math
import time
import uuid
from collections.abc import Iterable

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, Metadata, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import (
    Code,
    FitRes,
    Parameters,
    Status,
    ndarray_to_bytes,
    ndarrays_to_parameters,
)
from flwr.common.secure_aggregation.ndarrays_arithmetic import (
    factor_combine,
    factor_extract,
    parameters_addition,
    parameters_mod,
)
from flwr.common.secure_aggregation.quantization import dequantize, quantize
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.compat.common import recorddict_compat as compat
from flwr.server import LegacyContext, ServerConfig
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from client.app import SiteData, make_client_app, site_statistics
from common import mask_prg, secagg_primitives
from common.dp import DpSettings, round_noise_std
from common.errors import ProtocolError
from common.features import FeatureSpec
from common.protocol import (
    KMEANS_PHASES,
    Phase,
    Role,
    check_site_reply,
    reply_roles,
    reply_shapes,
)
from common.secagg_params import neighbourhood_size, threshold_for
from common.secure_sum import (
    CLIPPING_RANGE,
    MAX_WEIGHT,
    MODULUS_RANGE,
    SecAggPlusSumCodec,
    quantization_range_for,
)
from common.site_policy import RunPlan, SitePolicy
from server.coordinator import KMeansCoordinator, KMeansSettings
from server.dp_coordinator import DPKMeansCoordinator
from server.secagg_checks import ScreeningSecAggPlusWorkflow, check_masked_reply
from server.strategy import IMPOSSIBLE_NOISE_STDS, FederatedKMeans, RejectedReply
from simulations.datasets import PartitionedSites, SyntheticCustomers
from simulations.faults import (
    MASKED_FAULTS,
    PLAIN_FAULTS,
    damage_plain_reply,
    make_bad_reply_mod,
)

# The server's side of the SecAgg+ mask generator and secret sharing, as server.app installs them.
mask_prg.install(
    importlib.import_module("flwr.server.workflow.secure_aggregation.secaggplus_workflow"),
    importlib.import_module("flwr.common.secure_aggregation.secaggplus_utils"),
)
secagg_primitives.install(
    importlib.import_module("flwr.server.workflow.secure_aggregation.secaggplus_workflow"),
    importlib.import_module("flwr.common.secure_aggregation.crypto.shamir"),
)

POPULATION = SyntheticCustomers(num_customers=800, num_regions=4).load(seed=2)
FEATURES = POPULATION.features
K, CANDIDATES = 3, 30
MARKER = -7777.0
"""A value planted in bad replies: it must appear in no error message and no log line."""


def _settings(*, partial: bool = False) -> KMeansSettings:
    return KMeansSettings(k=K, n_init=1, init_rounds=1, init_candidates=CANDIDATES,
                          max_rounds=5, accept_partial_rounds=partial)


def _run_plan(num_sites: int) -> RunPlan:
    return RunPlan(features=tuple(f.name for f in FEATURES), k=K, n_init=1, init="summary",
                   init_candidates=CANDIDATES, init_rounds=1, max_rounds=5,
                   num_sites=num_sites, prg=secagg_primitives.SUITE_ID)


def _parts(num_sites: int) -> list[np.ndarray]:
    return [POPULATION.raw[p]
            for p in np.array_split(np.arange(POPULATION.raw.shape[0]), num_sites)]


def _fitres(arrays, *, num_examples: int = 1, metrics=None) -> FitRes:
    return FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), num_examples,
                  metrics or {})


def _lloyd_reply() -> tuple[list[tuple[int, ...]], list[np.ndarray]]:
    """The public shapes of a Lloyd round with k=3 and one honest site's reply to it."""
    d = len(FEATURES)
    centres = np.random.default_rng(0).normal(size=(K, d))
    site = SiteData(raw=_parts(3)[0], features=FEATURES)
    reply = site_statistics(site, Phase.LLOYD, [np.zeros(d), np.ones(d), centres])
    return reply_shapes(Phase.LLOYD, n_centres=K, n_features=d), reply


# --------------------------------------------------------------------------- the layout


@pytest.mark.parametrize("dp", [False, True])
@pytest.mark.parametrize("phase", KMEANS_PHASES)
def test_every_array_of_every_reply_has_a_role(phase, dp):
    shapes = reply_shapes(phase, n_centres=4, n_features=3, dp=dp)
    roles = reply_roles(phase, dp=dp)
    assert len(roles) == len(shapes)
    assert roles.count(Role.COUNT) == 1
    # The count array is the one of shape (k,) or (1,) -- never a (k, d) block.
    assert len(shapes[roles.index(Role.COUNT)]) == 1


@pytest.mark.parametrize("phase", KMEANS_PHASES)
def test_honest_site_replies_pass_the_check_in_every_phase(phase):
    site = SiteData(raw=_parts(3)[0], features=FEATURES)
    d = len(FEATURES)
    rng = np.random.default_rng(0)
    instruction = [] if phase is Phase.MOMENTS else [
        np.zeros(d), np.ones(d), rng.normal(size=(4, d))]
    reply = site_statistics(site, phase, instruction)
    shapes = reply_shapes(phase, n_centres=0 if phase is Phase.MOMENTS else 4, n_features=d)
    check_site_reply(reply, phase=phase, shapes=shapes)


@pytest.mark.parametrize(("fault", "problem"), [
    ("missing_array", r"^3 arrays; the lloyd phase expects 4\.$"),
    ("extra_array", r"^5 arrays; the lloyd phase expects 4\.$"),
    ("wrong_shape", r"^array #3 \(costs or sums of squares\) has shape \(2,\); expected \(3,\)\.$"),
    ("int_dtype", r"^array #0 \(sums\) has dtype int64; expected float64\.$"),
    ("non_finite", r"^array #3 \(costs or sums of squares\) holds non-finite values\.$"),
    ("negative_count", r"^array #2 \(counts\) holds negative values\.$"),
    ("fractional_count", r"^array #2 \(counts\) holds values that are not whole numbers\.$"),
])
def test_each_malformed_plain_reply_is_refused_naming_what_is_wrong(fault, problem):
    shapes, reply = _lloyd_reply()
    check_site_reply(reply, phase=Phase.LLOYD, shapes=shapes)  # the honest reply passes
    with pytest.raises(ProtocolError, match=problem):
        check_site_reply(damage_plain_reply(reply, Phase.LLOYD, fault), phase=Phase.LLOYD,
                         shapes=shapes)


def test_every_plain_fault_is_covered_above():
    covered = {"missing_array", "extra_array", "wrong_shape", "int_dtype", "non_finite",
               "negative_count", "fractional_count"}
    assert set(PLAIN_FAULTS) == covered


def test_a_negative_cost_is_refused():
    shapes, reply = _lloyd_reply()
    reply[3][0] = MARKER
    with pytest.raises(ProtocolError, match=r"array #3 \(costs or sums of squares\) holds "
                                            "negative values") as info:
        check_site_reply(reply, phase=Phase.LLOYD, shapes=shapes)
    assert "7777" not in str(info.value)


# --------------------------------------------------------------------------- plain rounds


def _plain_round(coordinator: KMeansCoordinator, bad: dict[int, FitRes] | None = None
                 ) -> tuple[FederatedKMeans, list, list[int]]:
    """Three sites' honest moments replies (node ids 101..103), some replaced by ``bad``."""
    strategy = FederatedKMeans(coordinator=coordinator, num_sites=3, codec=None)
    results, counts = [], []
    for i, part in enumerate(_parts(3)):
        node = 101 + i
        reply = site_statistics(SiteData(raw=part, features=FEATURES), Phase.MOMENTS, [])
        counts.append(int(reply[0][0]))
        proxy = GridClientProxy(node, None, 7)  # type: ignore[arg-type]
        results.append((proxy, (bad or {}).get(node, _fitres(reply))))
    return strategy, results, counts


def _negative_count_reply() -> FitRes:
    reply = site_statistics(SiteData(raw=_parts(3)[1], features=FEATURES), Phase.MOMENTS, [])
    reply[0][0] = MARKER
    return _fitres(reply)


def test_a_bad_plain_reply_is_dropped_and_a_full_round_stops(caplog):
    coordinator = KMeansCoordinator(settings=_settings(), features=FEATURES)
    strategy, results, _ = _plain_round(coordinator, {102: _negative_count_reply()})
    with caplog.at_level(logging.ERROR, logger="flwr"), \
            pytest.raises(ProtocolError) as info:
        strategy.aggregate_fit(1, results, [])
    message = str(info.value)
    assert message.startswith("round 1 (moments): only 2 of 3 sites took part (site errors: "
                              "node 102: reply rejected, not aggregated: array #0 (counts) "
                              "holds negative values). ")
    assert coordinator.history == [] and coordinator.scaler is None
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert logged == ["round 1: the reply of node 102 is rejected and not aggregated, the site "
                      "counts as dropped from this round: array #0 (counts) holds negative "
                      "values."]
    assert "7777" not in message + " ".join(logged)


def test_with_partial_rounds_accepted_the_other_sites_are_summed():
    coordinator = KMeansCoordinator(settings=_settings(partial=True), features=FEATURES)
    strategy, results, counts = _plain_round(coordinator, {102: _negative_count_reply()})
    strategy.aggregate_fit(1, results, [])
    assert coordinator.history[-1].num_sites == 2
    assert coordinator.scaler is not None
    assert coordinator.scaler.count == counts[0] + counts[2]


@pytest.mark.parametrize(("bad", "problem"), [
    (_fitres([np.ones(1), np.ones(7), np.ones(7)], num_examples=5),
     "num_examples or metrics set beside the statistics"),
    (_fitres([np.ones(1), np.ones(7), np.ones(7)], metrics={"spend": 1.0}),
     "num_examples or metrics set beside the statistics"),
    (FitRes(Status(Code.OK, ""), Parameters(tensors=[b"not numpy"], tensor_type="numpy.ndarray"),
            1, {}),
     "its arrays cannot be read as numpy arrays"),
])
def test_side_channels_and_unreadable_arrays_are_rejected_per_site(bad, problem):
    coordinator = KMeansCoordinator(settings=_settings(partial=True), features=FEATURES)
    strategy, results, _ = _plain_round(coordinator, {103: bad})
    failures: list = []
    kept = strategy.screen_plain_replies(1, results, failures)
    assert [proxy.node_id for proxy, _ in kept] == [101, 102]
    assert len(failures) == 1 and isinstance(failures[0], RejectedReply)
    assert failures[0].node_id == 103 and problem in failures[0].problem


def test_a_round_with_every_reply_rejected_names_them_all():
    coordinator = KMeansCoordinator(settings=_settings(partial=True), features=FEATURES)
    wrong = _fitres([np.ones(1), np.ones(6), np.ones(7)])  # one feature short
    strategy, results, _ = _plain_round(coordinator, {101: wrong, 102: wrong, 103: wrong})
    with pytest.raises(ProtocolError, match=r"round 1 \(moments\): no site replied \(site "
                                            r"errors: node 101: .*node 102: .*node 103: "
                                            r".*nothing is published"):
        strategy.aggregate_fit(1, results, [])
    assert coordinator.history == []


# --------------------------------------------------------------------------- decoding


def _flower_mean(payloads: list[list[np.ndarray]], q: int, *, factors: list[int] | None = None
                 ) -> list[np.ndarray]:
    """SecAgg+'s aggregated mean with Flower's own functions (masks cancel; left out).

    ``factors`` are the weight factors the sites mask: an honest site's is ``q``.
    """
    n = len(payloads)
    factors = factors or [q] * n
    total = None
    for arrays, factor in zip(payloads, factors, strict=True):
        quantised = [a.astype(np.int64)  # as with the int64 masks added
                     for a in factor_combine(factor, quantize(arrays, CLIPPING_RANGE, q))]
        total = quantised if total is None else parameters_addition(total, quantised)
    assert total is not None
    q_total, recon = factor_extract(parameters_mod(total, MODULUS_RANGE))
    out = dequantize(recon, CLIPPING_RANGE, q)
    return [(v - (n - 1) * CLIPPING_RANGE) * (q / q_total) for v in out]


def _moments_payloads(codec: SecAggPlusSumCodec) -> list[list[np.ndarray]]:
    return [codec.encode(site_statistics(SiteData(raw=p, features=FEATURES), Phase.MOMENTS, []))
            for p in _parts(3)]


def test_decode_refuses_a_sum_with_a_site_masking_another_weight():
    codec = SecAggPlusSumCodec(quantization_range_for(3))
    q = codec.quantization_range
    payloads = _moments_payloads(codec)
    honest = codec.decode(_flower_mean(payloads, q), num_sites=3)
    assert honest[0][0] == POPULATION.raw.shape[0]
    for factor in (0, 1, q - 1, q + 1):
        with pytest.raises(ProtocolError, match=r"aggregate #\d is not a sum of 3 sites' limbs"):
            codec.decode(_flower_mean(payloads, q, factors=[q, factor, q]), num_sites=3)


@pytest.mark.parametrize("value", [np.nan, np.inf, 1.0, -1.5])
def test_decode_refuses_limb_sums_no_sites_can_reach(value):
    codec = SecAggPlusSumCodec(quantization_range_for(3))
    mean = _flower_mean(_moments_payloads(codec), codec.quantization_range)
    mean[1] = mean[1].copy()
    mean[1].flat[0] = value  # 1.0 is a limb sum of 3 * Q: above 3 * (Q - 1)
    with pytest.raises(ProtocolError, match=r"aggregate #1 is not a sum of 3 sites' limbs"):
        codec.decode(mean, num_sites=3)


def test_an_undecodable_secure_sum_stops_the_round_before_the_coordinator():
    codec = SecAggPlusSumCodec(quantization_range_for(3))
    coordinator = KMeansCoordinator(settings=_settings(), features=FEATURES)
    strategy = FederatedKMeans(coordinator=coordinator, num_sites=3, codec=codec)
    mean = _flower_mean(_moments_payloads(codec), codec.quantization_range, factors=[
        codec.quantization_range, 0, codec.quantization_range])
    results = [(GridClientProxy(101 + i, None, 7), _fitres(mean))  # type: ignore[arg-type]
               for i in range(3)]
    with pytest.raises(ProtocolError, match=r"^round 4 \(moments\): the secure sum cannot be "
                                            r"decoded: aggregate #0 .* Nothing is published\.$"):
        strategy.aggregate_fit(4, results, [])
    assert coordinator.history == [] and coordinator.scaler is None


DP_FEATURES = (FeatureSpec("spend", transform="log1p"), FeatureSpec("visits"))
DP_BOUNDS = {"spend": (0.0, 10_000.0), "visits": (0.0, 50.0)}


@pytest.mark.parametrize(("stds_below_zero", "impossible"),
                         [(1.0, False), (IMPOSSIBLE_NOISE_STDS + 1, True)])
def test_a_dp_count_far_below_zero_is_refused_as_impossible(stds_below_zero, impossible):
    dp = DpSettings(init_candidates=8, init_rounds=1, lloyd_rounds=2).dp_plan(
        DP_FEATURES, DP_BOUNDS, num_sites=3)
    coordinator = DPKMeansCoordinator(settings=_settings(), features=DP_FEATURES, dp=dp,
                                      init_candidates=8)
    codec = SecAggPlusSumCodec(quantization_range_for(3))
    strategy = FederatedKMeans(coordinator=coordinator, num_sites=3, codec=codec,
                               fraction_bits=dp.grid_bits)
    count_std = round_noise_std(Phase.MOMENTS, dp, DP_FEATURES)[0]
    worst = count_std * math.sqrt(3)  # every site relying on its own noise alone
    total = -stds_below_zero * (worst if impossible else count_std)
    word = round(total * dp.gamma / 3)
    payloads = [codec.encode_words([np.array([word], dtype=object),
                                    np.zeros(2, dtype=np.int64), np.zeros(2, dtype=np.int64)])
                for _ in range(3)]
    mean = _flower_mean(payloads, codec.quantization_range)
    if impossible:
        with pytest.raises(ProtocolError, match=r"^round 1 \(moments\): the decoded aggregate "
                                                r"is impossible \(counts more than 12 noise "
                                                r"stds below zero\).*Nothing is published\.$"):
            strategy.decode_secure_sum(1, mean, num_sites=3)
    else:
        sums = strategy.decode_secure_sum(1, mean, num_sites=3)
        assert sums[0][0] == pytest.approx(3 * word / dp.gamma)
        assert sums[0][0] < 0  # noisy, slightly negative: possible, passed on


# --------------------------------------------------------------------------- SecAgg+ rounds


class InProcessGrid(Grid):
    """Deliver every message to a real site ClientApp in this process, serialised both ways."""

    def __init__(self, apps: dict[int, ClientApp]) -> None:
        self.apps = apps
        self.contexts = {
            nid: Context(run_id=7, node_id=nid,
                         node_config={"partition-id": i, "num-partitions": len(apps)},
                         state=RecordDict(), run_config={})
            for i, nid in enumerate(apps)}

    def set_run(self, run):  # pragma: no cover - not used by the workflow
        raise AssertionError("the code under test must not call this grid method")

    @property
    def run(self):  # pragma: no cover
        raise AssertionError("the code under test must not call this grid method")

    def create_message(self, *args, **kwargs):  # pragma: no cover
        raise AssertionError("the code under test must not call this grid method")

    def get_node_ids(self) -> Iterable[int]:
        return list(self.apps)

    def push_messages(self, messages):  # pragma: no cover
        raise AssertionError("the code under test must not call this grid method")

    def pull_messages(self, message_ids):  # pragma: no cover
        raise AssertionError("the code under test must not call this grid method")

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for message in messages:
            proto = message_to_proto(message)  # as the SuperLink: a fresh copy with an id
            proto.metadata.message_id = uuid.uuid4().hex
            received = message_from_proto(proto)
            nid = received.metadata.dst_node_id
            reply = self.apps[nid](received, self.contexts[nid])
            replies.append(message_from_proto(message_to_proto(reply)))
        return replies


@pytest.fixture
def server_identity(monkeypatch):
    """Flower's workflow builds messages with the task identity a ServerApp process has."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 7)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 0)


def secagg_moments_round(root, *, fault: str | None, tolerate: bool,
                         workflow_type: type[SecAggPlusWorkflow] = ScreeningSecAggPlusWorkflow,
                         num_sites: int = 4) -> KMeansCoordinator:
    """One SecAgg+ moments round with real sites; site 1 (node 102) sends ``fault``."""
    parts = _parts(num_sites)
    loader = PartitionedSites(parts=tuple(parts), features=FEATURES)
    policy = SitePolicy(require_dp=False, tolerate_dropouts=tolerate)
    honest = make_client_app(loader, policy=policy, site_root=root)
    bad = honest if fault is None else make_client_app(
        loader, policy=policy, site_root=root,
        extra_mods=[make_bad_reply_mod(site=1, server_round=1, fault=fault)])
    grid = InProcessGrid({101 + i: bad if i == 1 else honest for i in range(num_sites)})
    q = quantization_range_for(num_sites)
    coordinator = KMeansCoordinator(settings=_settings(partial=tolerate), features=FEATURES)
    strategy = FederatedKMeans(coordinator=coordinator, num_sites=num_sites,
                               codec=SecAggPlusSumCodec(q),
                               run_plan=_run_plan(num_sites).to_json())
    shares = neighbourhood_size(num_sites, tolerate_dropouts=tolerate)
    threshold = threshold_for(shares, tolerate_dropouts=tolerate)
    workflow = workflow_type(
        num_shares=shares, reconstruction_threshold=threshold if threshold < shares else 1.0,
        max_weight=MAX_WEIGHT, clipping_range=CLIPPING_RANGE, quantization_range=q,
        modulus_range=MODULUS_RANGE)
    legacy = LegacyContext(context=Context(run_id=7, node_id=0, node_config={},
                                           state=RecordDict(), run_config={}),
                           config=ServerConfig(num_rounds=5), strategy=strategy)
    for nid in grid.apps:
        legacy.client_manager.register(GridClientProxy(nid, grid, 7))
    legacy.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        ndarrays_to_parameters([]), keep_input=True)
    legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
        {WorkflowKey.CURRENT_ROUND: 1, WorkflowKey.START_TIME: time.time()})
    workflow(grid, legacy)
    return coordinator


MASKED_PROBLEMS = {
    "missing_array": "the masked vector has 3 arrays; expected 4 (weight factor and statistics).",
    "extra_array": "the masked vector has 5 arrays; expected 4 (weight factor and statistics).",
    "wrong_shape": "masked array #3 has shape (35,); expected (5, 7).",
    "float_dtype": "masked array #0 has dtype float64; expected int64.",
    "out_of_range": "masked array #3 has entries outside [0, modulus).",
}


def test_every_masked_fault_is_covered():
    assert set(MASKED_FAULTS) == set(MASKED_PROBLEMS)


@pytest.mark.parametrize("fault", MASKED_FAULTS)
def test_a_malformed_masked_vector_is_left_out_and_the_others_are_summed_exactly(
        fault, tmp_path, server_identity, caplog):
    sizes = [len(p) for p in _parts(4)]
    with caplog.at_level(logging.ERROR, logger="flwr"):
        coordinator = secagg_moments_round(tmp_path, fault=fault, tolerate=True)
    # Site 1 counts as dropped: the three others' sum, decoded exactly (its pairwise masks
    # were removed with its neighbours' key shares; its own vector was never summed).
    assert [r.num_sites for r in coordinator.history] == [3]
    assert coordinator.scaler is not None
    assert coordinator.scaler.count == sum(sizes) - sizes[1]
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert logged == ["round 1: the reply of node 102 is rejected and not aggregated, the "
                      f"site counts as dropped from this round: {MASKED_PROBLEMS[fault]}"]


def test_honest_sites_pass_the_screen(tmp_path, server_identity, caplog):
    with caplog.at_level(logging.ERROR, logger="flwr"):
        coordinator = secagg_moments_round(tmp_path, fault=None, tolerate=False)
    assert [r.num_sites for r in coordinator.history] == [4]
    assert coordinator.scaler is not None
    assert coordinator.scaler.count == POPULATION.raw.shape[0]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_without_dropout_tolerance_a_malformed_vector_halts_the_round(
        tmp_path, server_identity, caplog):
    with caplog.at_level(logging.INFO, logger="flwr"):
        coordinator = secagg_moments_round(tmp_path, fault="wrong_shape", tolerate=False)
    assert coordinator.history == [] and coordinator.scaler is None
    messages = [r.getMessage() for r in caplog.records]
    assert any("node 102 is rejected and not aggregated" in m for m in messages)
    # SecAgg+'s threshold (the whole neighbourhood) is not met: Flower stops the round.
    assert "Insufficient available nodes." in messages
    assert "Secure aggregation halted." in messages


@pytest.mark.parametrize(("fault", "error"), [("missing_array", IndexError),
                                              ("wrong_shape", ValueError),
                                              ("float_dtype", TypeError)])
def test_flowers_own_workflow_breaks_on_the_same_replies(fault, error, tmp_path,
                                                         server_identity):
    # The reason for the screen: without it these replies crash the server mid-round.
    with pytest.raises(error):
        secagg_moments_round(tmp_path, fault=fault, tolerate=True,
                             workflow_type=SecAggPlusWorkflow)


def _masked_message(arrays, *, fitres: FitRes | None = None) -> Message:
    content = compat.fitres_to_recorddict(fitres or _fitres([]), keep_input=True)
    content.config_records[RECORD_KEY_CONFIGS] = ConfigRecord(
        {Key.MASKED_PARAMETERS: [ndarray_to_bytes(a) for a in arrays]})
    metadata = Metadata(run_id=7, message_id="m1", src_node_id=102, dst_node_id=0,
                        reply_to_message_id="m0", group_id="1", created_at=time.time(),
                        ttl=600.0, message_type=MessageType.TRAIN)
    return Message(content=content, metadata=metadata)


@pytest.mark.parametrize(("change", "problem"), [
    ({}, None),
    ({"fitres": _fitres([], num_examples=2)}, "num_examples or metrics set beside"),
    ({"fitres": _fitres([np.ones(3)])}, "plain arrays travel beside the masked vector"),
    ({"dtype": np.uint64}, "masked array #0 has dtype uint64; expected int64"),
    ({"value": -1}, "masked array #1 has entries outside [0, modulus)"),
])
def test_masked_reply_check_covers_side_channels_dtype_and_range(change, problem):
    shapes = [(1,), (5, 3)]
    arrays = [np.array([7], dtype=change.get("dtype", np.int64)),
              np.full((5, 3), change.get("value", MODULUS_RANGE - 1), dtype=np.int64)]
    message = _masked_message(arrays, fitres=change.get("fitres"))
    if problem is None:
        check_masked_reply(message, expected_shapes=shapes, mod_range=MODULUS_RANGE)
        return
    with pytest.raises(ProtocolError) as info:
        check_masked_reply(message, expected_shapes=shapes, mod_range=MODULUS_RANGE)
    assert problem in str(info.value)
