"""The tabular autoencoder, its federated protocol pieces and the encoder a model carries."""

from __future__ import annotations

import base64
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from common.autoencoder import (
    AESettings,
    TabularLayout,
    build_model,
    code_reconstructions,
    embed,
    local_train,
    n_params,
    split_code,
    standardise,
)
from common.errors import ConfigError, DataError, ProtocolError, SiteRefusal
from common.features import FeatureSpec
from common.protocol import Phase, check_site_reply, reply_roles, reply_shapes
from common.segment_encoder import SegmentEncoder, segment_of_centre
from common.segment_model import SegmentModel
from common.site_policy import RunPlan, SitePolicy, SiteSession
from server.ae_coordinator import AEKMeansCoordinator
from server.coordinator import KMeansSettings

FEATURES = (
    FeatureSpec(name="spend", transform="log1p"),
    FeatureSpec(name="visits"),
    FeatureSpec(name="newsletter", kind="boolean"),
    FeatureSpec(name="channel=store", kind="category", group="channel"),
    FeatureSpec(name="channel=web", kind="category", group="channel"),
    FeatureSpec(name="channel=app", kind="category", group="channel"),
)
SMALL = AESettings(hidden=(8,), embed_dim=2, category_dim=2, local_epochs=2, batch_size=32,
                   lr=1e-2, rounds=3, device="cpu", bottleneck="tanh", local_optimizer="adam",
                   local_steps=0, server_optimizer="average", drift_correction="none", moves=0)
"""The first design (FedAvg of local Adam epochs through a noisy tanh bottleneck), small."""


def _records(n: int, seed: int = 0) -> np.ndarray:
    """Two clear groups: store+newsletter low spenders, app high spenders."""
    rng = np.random.default_rng(seed)
    group = rng.integers(0, 2, n)
    raw = np.zeros((n, len(FEATURES)))
    raw[:, 0] = np.where(group == 0, rng.lognormal(3, 0.3, n), rng.lognormal(6, 0.3, n))
    raw[:, 1] = np.where(group == 0, 2, 20) + rng.normal(0, 1, n)
    raw[:, 2] = (group == 0).astype(float)
    raw[np.arange(n), np.where(group == 0, 3, 5)] = 1.0
    return raw


def _x(raw: np.ndarray) -> np.ndarray:
    layout = TabularLayout.from_features(FEATURES)
    t = raw.copy()
    t[:, 0] = np.log1p(t[:, 0])
    return standardise(t, layout, t.mean(axis=0), t.std(axis=0) + 1e-12)


# --------------------------------------------------------------------------- the network

def test_the_layout_follows_kinds_and_groups():
    layout = TabularLayout.from_features(FEATURES)
    assert layout.numeric == (0, 1)
    assert layout.boolean == (2,)
    assert layout.categorical == ((3, 4, 5),)
    assert layout.names == ("spend", "visits", "newsletter", "channel")
    assert layout.n_original == 4 and layout.n_columns == 6


def test_a_malformed_categorical_feature_is_refused_naming_it():
    split = (FEATURES[3], FEATURES[0], FEATURES[4])
    with pytest.raises(ConfigError, match=r"'channel'.*not consecutive"):
        TabularLayout.from_features(split)
    with pytest.raises(ConfigError, match="'channel' has 1 value"):
        TabularLayout.from_features((FEATURES[0], FEATURES[3]))
    with pytest.raises(ConfigError, match="needs its group"):
        FeatureSpec(name="channel=web", kind="category")


def test_settings_are_validated_with_the_key_named():
    with pytest.raises(ConfigError, match="ae_embed_dim=0"):
        AESettings(embed_dim=0)
    with pytest.raises(ConfigError, match="ae_prox_mu"):
        AESettings(prox_mu=-1.0)
    with pytest.raises(ConfigError, match="device='tpu'"):
        AESettings(device="tpu")
    plan = SMALL.plan_json()
    assert "device" not in json.loads(plan)  # where a site trains is the site's choice
    assert AESettings.from_plan_json(plan, device="cpu") == SMALL
    with pytest.raises(ValueError, match="keys"):
        AESettings.from_plan_json(json.dumps({"hidden": [8]}))


def test_the_flat_vector_round_trips_and_refuses_another_length():
    layout = TabularLayout.from_features(FEATURES)
    model = build_model(layout, SMALL)
    flat = model.get_flat()
    assert flat.shape == (n_params(layout, SMALL),) and flat.dtype == np.float64
    # Seeded initial weights: every party rebuilds the same; another seed differs.
    assert np.array_equal(build_model(layout, SMALL).get_flat(), flat)
    other = AESettings(**{**SMALL.to_dict(), "hidden": (8,), "seed": 1})
    assert not np.array_equal(build_model(layout, other).get_flat(), flat)
    model.set_flat(flat * 2)
    assert np.allclose(model.get_flat(), flat * 2, rtol=1e-6)
    with pytest.raises(DataError, match="this architecture has"):
        model.set_flat(flat[:-1])
    with pytest.raises(DataError):
        model.set_flat(np.full_like(flat, np.nan))


def _trained_twice(settings: AESettings, records: int, seed: int):  # type: ignore[no-untyped-def]
    """Two local trainings from the same start, data and seed (and the start, data, layout)."""
    layout = TabularLayout.from_features(FEATURES)
    x = _x(_records(records))
    start = build_model(layout, settings).get_flat()
    runs = [local_train(start, x, layout=layout, settings=settings,
                        rng=np.random.default_rng(seed)) for _ in range(2)]
    assert np.array_equal(runs[0].params, runs[1].params)  # deterministic on CPU
    return start, x, layout, runs


def test_local_training_is_deterministic_on_cpu_and_lowers_the_loss():
    start, x, layout, runs = _trained_twice(SMALL, 400, 3)
    assert runs[0].n_records == 400 and runs[0].steps == 2 * 13
    params = start
    losses = []
    for _ in range(6):
        trained = local_train(params, x, layout=layout, settings=SMALL,
                              rng=np.random.default_rng(len(losses)))
        losses.append(trained.loss_sum / trained.n_records)
        params = trained.params
    assert losses[-1] < 0.5 * losses[0]
    z = embed(params, x, layout=layout, settings=SMALL)
    assert z.shape == (400, 2) and np.all(np.isfinite(z))


def test_fedprox_keeps_a_site_nearer_the_global_weights():
    layout = TabularLayout.from_features(FEATURES)
    x = _x(_records(300))
    start = build_model(layout, SMALL).get_flat()
    plain = local_train(start, x, layout=layout, settings=SMALL, rng=np.random.default_rng(0))
    prox = local_train(start, x, layout=layout,
                       settings=AESettings(**{**SMALL.to_dict(), "prox_mu": 10.0}),
                       rng=np.random.default_rng(0))
    assert np.linalg.norm(prox.params - start) < np.linalg.norm(plain.params - start)


# --------------------------------------------------------------------------- protocol

def test_autoencoder_replies_have_public_shapes_and_roles():
    assert reply_shapes(Phase.AE_TRAIN, n_centres=0, n_features=4, n_params=99) == \
        [(99,), (1,), (1,)]
    assert reply_shapes(Phase.EMBED, n_centres=0, n_features=4) == [(1,), (4,), (4,)]
    # Profile of an ae_kmeans run: assigned in the 4-d embedding, profiles of 6 features.
    assert reply_shapes(Phase.PROFILE, n_centres=3, n_features=4, n_profile=6) == \
        [(3,), (3, 6), (3,), (3, 6), (3, 6)]
    assert len(reply_roles(Phase.AE_TRAIN)) == 3


def _coordinator(**changes) -> AEKMeansCoordinator:
    settings = KMeansSettings(k=2, n_init=1, init_rounds=1, init_candidates=4, max_rounds=3)
    return AEKMeansCoordinator(settings=settings, features=FEATURES,
                               ae=AESettings(**{**SMALL.to_dict(), **changes}))


def _moments(n: float) -> list[np.ndarray]:
    d = len(FEATURES)
    return [np.array([n]), np.full(d, n * 0.5), np.full(d, n * 1.0)]


def test_the_server_averages_weights_by_customers_from_the_secure_sums_only():
    coordinator = _coordinator()
    coordinator.step(_moments(30.0), server_round=1, num_sites=2)
    assert coordinator.phase is Phase.AE_TRAIN
    p = coordinator.n_params
    w1, w2 = np.full(p, 1.0), np.full(p, 4.0)
    # Site 1 has 10 customers, site 2 has 20: the sums are 10*w1 + 20*w2 and 30.
    coordinator.step([10 * w1 + 20 * w2, np.array([30.0]), np.array([6.0])],
                     server_round=2, num_sites=2)
    assert np.allclose(coordinator.weights, 3.0)
    assert coordinator.history[-1].cost == pytest.approx(0.2)
    name, arrays, groups = coordinator.instruction()
    assert name == "ae_train" and groups == 1
    assert [a.shape for a in arrays] == coordinator.expected_instruction_shapes()
    with pytest.raises(ProtocolError, match="impossible"):
        coordinator.step([np.zeros(p), np.array([29.5]), np.array([1.0])], server_round=3,
                         num_sites=2)
    with pytest.raises(ProtocolError, match="impossible"):  # not the moments round's count
        coordinator.step([np.zeros(p), np.array([31.0]), np.array([1.0])], server_round=3,
                         num_sites=2)


def test_the_run_moves_through_training_embedding_clusters_and_profile():
    coordinator = _coordinator(rounds=1)
    p, d, m = coordinator.n_params, len(FEATURES), 2
    coordinator.step(_moments(30.0), server_round=1, num_sites=2)
    coordinator.step([np.zeros(p), np.array([30.0]), np.array([3.0])], server_round=2,
                     num_sites=2)
    assert coordinator.phase is Phase.EMBED
    coordinator.step([np.array([30.0]), np.full(m, 3.0), np.full(m, 60.0)], server_round=3,
                     num_sites=2)
    assert coordinator.phase is Phase.INIT
    name, arrays, _ = coordinator.instruction()
    assert name == "init"
    assert [a.shape for a in arrays] == [(d,), (d,), (p,), (m,), (m,), (4, m)]
    assert coordinator.expected_reply_shapes() == [(4, m), (4, m), (4,), (4,)]


# --------------------------------------------------------------------------- the site

def _plan(coordinator: AEKMeansCoordinator, **changes) -> RunPlan:
    values = dict(features=tuple(f.name for f in FEATURES), k=2, n_init=1, init="summary",
                  init_candidates=4, init_rounds=1, max_rounds=3, num_sites=3, model="ae_kmeans",
                  ae=coordinator.run_plan_ae())
    return RunPlan(**{**values, **changes})


def test_a_site_pins_the_encoder_and_the_embedding_scaling():
    coordinator = _coordinator(rounds=2)
    plan = _plan(coordinator)
    p, d, m = coordinator.n_params, len(FEATURES), 2
    base = [np.zeros(d), np.ones(d), np.zeros(p)]
    session = SiteSession()
    session.admit(plan, Phase.MOMENTS, [], groups=1)
    with pytest.raises(SiteRefusal, match="not allowed"):  # no cluster round before embed
        session.admit(plan, Phase.INIT, [*base, np.zeros(m), np.ones(m), np.zeros((4, m))],
                      groups=1)
    session.admit(plan, Phase.AE_TRAIN, base, groups=1)
    session.admit(plan, Phase.AE_TRAIN, [base[0], base[1], np.ones(p)], groups=1)
    with pytest.raises(SiteRefusal, match="not allowed"):  # a third training round
        session.admit(plan, Phase.AE_TRAIN, base, groups=1)
    encoder = np.full(p, 0.5)
    session.admit(plan, Phase.EMBED, [base[0], base[1], encoder], groups=1)
    cluster = [base[0], base[1], encoder, np.zeros(m), np.ones(m), np.zeros((4, m))]
    session.admit(plan, Phase.INIT, cluster, groups=1)
    swapped = [base[0], base[1], encoder + 1e-9, *cluster[3:]]
    with pytest.raises(SiteRefusal, match="weights differ") as info:
        session.admit(plan, Phase.LLOYD, [*swapped[:5], np.zeros((2, m))], groups=1)
    assert info.value.code == "protocol"
    rescaled = [*cluster[:3], np.zeros(m), np.full(m, 2.0), np.zeros((2, m))]
    with pytest.raises(SiteRefusal, match="embedding's scaling changed"):
        session.admit(plan, Phase.LLOYD, rescaled, groups=1)
    with pytest.raises(SiteRefusal, match="embedding arrays"):
        session.admit(plan, Phase.LLOYD, [*cluster[:5], np.zeros((50, m))], groups=1)
    session.admit(plan, Phase.LLOYD, [*cluster[:5], np.zeros((2, m))], groups=1)
    session.admit(plan, Phase.PROFILE, [*cluster[:5], np.zeros((2, m))], groups=1)


@pytest.mark.parametrize(("policy", "plan_changes", "match"), [
    ({"max_ae_rounds": 1}, {}, r"autoencoder training rounds \(candidates and moves\)=2 exceeds"),
    ({"max_embed_dim": 1}, {}, "embedding size=2 exceeds"),
    ({"max_ae_params": 10}, {}, "autoencoder parameters=.* exceeds"),
    ({"max_ae_epochs": 1}, {}, "local epochs=2 exceeds"),
    ({}, {"dp": "{}"}, "not differentially private"),
    ({"require_dp": True}, {}, "answers only DP runs"),
    ({}, {"model": "kmeans"}, "only with it"),
    ({}, {"ae": ""}, "only with it"),
])
def test_autoencoder_plans_outside_the_site_policy_are_refused(policy, plan_changes, match):
    plan = _plan(_coordinator(rounds=2), **plan_changes)
    site = SitePolicy(**{"require_dp": False, **policy})
    with pytest.raises(SiteRefusal, match=match):
        plan.check_against(site, features=plan.features, prg=plan.prg)


def test_more_local_steps_than_the_site_allows_are_refused():
    plan = _plan(_coordinator(rounds=2, local_steps=40))
    plan.check_against(SitePolicy(require_dp=False, max_ae_local_steps=40),
                       features=plan.features, prg=plan.prg)
    with pytest.raises(SiteRefusal, match="local steps per round=40 exceeds this site's limit 39"):
        plan.check_against(SitePolicy(require_dp=False, max_ae_local_steps=39),
                           features=plan.features, prg=plan.prg)


def test_a_scaffold_anchor_other_than_the_last_rounds_weights_is_refused():
    """The site's second gradient is measured only where it trained last round."""
    coordinator = _coordinator(rounds=3, drift_correction="scaffold")
    plan = _plan(coordinator)
    p, d = coordinator.n_params, len(FEATURES)
    scale = [np.zeros(d), np.ones(d)]
    first, second = np.full(p, 0.1), np.full(p, 0.2)
    session = SiteSession.from_json(SiteSession().to_json())
    session.admit(plan, Phase.MOMENTS, [], groups=1)
    # Round 1: no control yet, so the anchor is not used and anything goes.
    session.admit(plan, Phase.AE_TRAIN, [*scale, first, np.full(p, 9.0), np.zeros(p)], groups=1)
    session = SiteSession.from_json(session.to_json())  # as the node's context keeps it
    with pytest.raises(SiteRefusal, match="SCAFFOLD anchor") as info:
        session.admit(plan, Phase.AE_TRAIN, [*scale, second, first + 1e-9, np.ones(p)],
                      groups=1)
    assert info.value.code == "protocol"
    session.admit(plan, Phase.AE_TRAIN, [*scale, second, first, np.ones(p)], groups=1)
    with pytest.raises(SiteRefusal, match="SCAFFOLD anchor"):  # round 2's weights now
        session.admit(plan, Phase.AE_TRAIN, [*scale, second, first, np.ones(p)], groups=1)


def test_a_malformed_autoencoder_plan_is_a_protocol_refusal():
    coordinator = _coordinator()
    doc = json.loads(coordinator.run_plan_ae())
    for broken in ({**doc, "architecture": "torch.load"}, {**doc, "n_params": -1},
                   {**doc, "settings": {**doc["settings"], "hidden": ["x"]}}):
        plan = _plan(coordinator, ae=json.dumps(broken))
        with pytest.raises(SiteRefusal) as info:
            plan.check_against(SitePolicy(require_dp=False), features=plan.features, prg="")
        assert info.value.code == "protocol"


# --------------------------------------------------------------------------- the model file

def _encoder(n_centres: int = 3) -> SegmentEncoder:
    layout = TabularLayout.from_features(FEATURES)
    rng = np.random.default_rng(0)
    return SegmentEncoder(settings=SMALL, weights=build_model(layout, SMALL).get_flat(),
                          mean=np.zeros(2), std=np.ones(2),
                          centres=rng.normal(size=(n_centres, 2)),
                          segment_of_centre=tuple(range(n_centres)))


def test_the_encoder_round_trips_and_assigns_like_the_embedding():
    encoder = _encoder()
    doc = json.loads(json.dumps(encoder.to_dict()))
    loaded = SegmentEncoder.from_dict(doc, features=FEATURES, n_segments=3)
    assert np.array_equal(loaded.weights, encoder.weights)
    raw = _records(50)
    t = raw.copy()
    t[:, 0] = np.log1p(t[:, 0])
    from common.scaling import GlobalScaler

    scaler = GlobalScaler(mean=t.mean(axis=0), std=t.std(axis=0) + 1e-12, count=50.0)
    labels = loaded.assign(t, features=FEATURES, scaler=scaler)
    z = embed(encoder.weights, standardise(t, TabularLayout.from_features(FEATURES),
                                           scaler.mean, scaler.std),
              layout=TabularLayout.from_features(FEATURES), settings=SMALL)
    expected = np.argmin(((z[:, None, :] - encoder.centres[None]) ** 2).sum(-1), axis=1)
    assert np.array_equal(labels, expected)


def test_a_tampered_encoder_is_refused_by_its_checksum():
    doc = _encoder().to_dict()
    weights = np.frombuffer(base64.b64decode(doc["weights"]["base64"]), "<f8").copy()
    weights[0] += 1.0
    doc["weights"]["base64"] = base64.b64encode(weights.tobytes()).decode()
    with pytest.raises(DataError, match=r"sha256.*does not match"):
        SegmentEncoder.from_dict(doc, features=FEATURES, n_segments=3, source="m.json")


class _Marker:
    """Unpickling this writes a file: proof that a loader executed code from the model."""

    path = ""

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path(self.path).write_text, ("pwned",))


def test_the_loader_never_unpickles_even_a_payload_with_a_valid_checksum(tmp_path, monkeypatch):
    marker = tmp_path / "marker"
    _Marker.path = str(marker)
    payload = pickle.dumps(_Marker())
    doc = _encoder().to_dict()
    body = {k: v for k, v in doc.items() if k != "sha256"}
    body["weights"] = {**body["weights"], "base64": base64.b64encode(payload).decode()}
    from common.segment_encoder import _checksum

    forged = {**body, "sha256": _checksum(body)}  # a server can recompute the checksum
    calls = []
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: calls.append("pickle.loads"))
    monkeypatch.setattr(pickle, "load", lambda *a, **k: calls.append("pickle.load"))
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append("torch.load"))
    with pytest.raises(DataError, match=r"encoder\.weights"):
        SegmentEncoder.from_dict(forged, features=FEATURES, n_segments=3)
    assert not marker.exists() and calls == []
    # A valid encoder loads without ever calling them either.
    SegmentEncoder.from_dict(_encoder().to_dict(), features=FEATURES, n_segments=3)
    assert calls == []


def test_a_model_with_an_encoder_is_version_2_and_needs_it(tmp_path):
    from tests.unit.test_segment_model import _model_doc

    doc = _model_doc()
    assert doc["schema_version"] == 1
    doc["schema_version"] = 2
    path = tmp_path / "model.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(DataError, match="needs key 'encoder'"):
        SegmentModel.load(path)


def test_centres_follow_the_segment_they_were_merged_into():
    centres = np.array([[0.0, 0.0], [5.0, 5.0], [0.1, 0.0], [9.0, 9.0], [5.1, 5.0]])
    # centre 2 merged into 0, centre 4 into 1, centre 3 empty and dropped.
    log = [{"segment": 2, "into": 0}, {"segment": 4, "into": 1}, {"segment": 3, "into": None}]
    assert segment_of_centre(5, log, centres) == (0, 1, 0, 1, 1)
    # A merge into a group that later merges again follows it.
    log = [{"segment": 2, "into": 0}, {"segment": 0, "into": 1}]
    assert segment_of_centre(5, log, centres) == (0, 0, 0, 1, 2)


# --------------------------------------------------------------------------- the site client

def _client(tmp_path: Path, **policy):  # type: ignore[no-untyped-def]
    from flwr.app import Context, RecordDict

    from client.app import SiteClient
    from client.gate import SiteData

    context = Context(run_id=3, node_id=5, node_config={"partition-id": 0}, state=RecordDict(),
                      run_config={})
    site = SiteData(raw=_records(200), features=FEATURES)
    return SiteClient(site, context,
                      policy=SitePolicy(**{"require_dp": False, "mechanism": "none", **policy}),
                      site_root=tmp_path)


def _config(plan: RunPlan, phase: str) -> dict:
    from common.protocol import GROUPS_KEY, PHASE_KEY, PLAN_KEY, ROUND_KEY

    return {PHASE_KEY: phase, ROUND_KEY: 1, GROUPS_KEY: 1, PLAN_KEY: plan.to_json()}


def test_a_site_checks_the_announced_model_size_against_its_own_features(tmp_path):
    coordinator = _coordinator()
    doc = json.loads(coordinator.run_plan_ae())
    lying = _plan(coordinator, ae=json.dumps({**doc, "n_params": doc["n_params"] + 8}))
    with pytest.raises(SiteRefusal, match="this site's features give") as info:
        _client(tmp_path).admit(_config(lying, "moments"), [])
    assert info.value.code == "protocol"


def test_a_run_that_cannot_finish_within_todays_rounds_is_refused_before_it_starts(tmp_path):
    plan = _plan(_coordinator(rounds=2))
    planned = 1 + 2 + 1 + 1 + 3 + 1  # moments, training, embed, init, Lloyd, profile
    assert plan.max_total_rounds == planned
    refused = _client(tmp_path / "a", max_rounds_per_day=planned - 1)
    with pytest.raises(SiteRefusal, match=rf"plans up to {planned} rounds; {planned - 1} of "
                       rf"this site's {planned - 1} a day") as info:
        refused.admit(_config(plan, "moments"), [])
    assert info.value.code == "budget"
    assert refused.files is not None and refused.files.rounds_in_last_day() == 0
    # With room for the whole run it starts, and each answered round counts against the day.
    client = _client(tmp_path / "b", max_rounds_per_day=planned + 2)
    client.admit(_config(plan, "moments"), [])
    assert client.files is not None and client.files.rounds_in_last_day() == 1
    for _ in range(planned - 1):  # the run answers all its rounds
        client.files.admit_round(max_per_day=planned + 2)
    # A second run the same day (a fresh session) would need ``planned`` more; 2 are left.
    again = _client(tmp_path / "b", max_rounds_per_day=planned + 2)
    with pytest.raises(SiteRefusal, match=r"plans up to 9 rounds; 2 of this site's 11"):
        again.admit(_config(plan, "moments"), [])
    assert again.files is not None and again.files.rounds_in_last_day() == planned


def test_the_round_ledger_refuses_the_round_after_the_daily_limit(tmp_path):
    from client.site_files import DAY_SECONDS

    files = _client(tmp_path, max_rounds_per_day=3).files
    assert files is not None
    now = 1_000_000.0
    files.admit_round(max_per_day=3, now=now - DAY_SECONDS - 1)  # older than a day
    assert [files.admit_round(max_per_day=3, now=now + i) for i in range(3)] == [1, 2, 3]
    with pytest.raises(SiteRefusal, match="3 rounds answered in the last 24 hours") as info:
        files.admit_round(max_per_day=3, now=now + 3)
    assert info.value.code == "budget"
    files.ledger.write_text(files.ledger.read_text() + "torn-li")  # a crash mid-line
    assert files.rounds_in_last_day(now=now + 4) == 3


def test_a_site_answers_a_training_round_with_weighted_weights_count_and_loss(tmp_path):
    coordinator = _coordinator()
    plan = _plan(coordinator)
    client = _client(tmp_path)
    moments, _, _ = client.fit([], _config(plan, "moments"))
    coordinator.step(moments, server_round=1, num_sites=3)
    _, arrays, _ = coordinator.instruction()
    reply, num_examples, metrics = client.fit(arrays, _config(plan, "ae_train"))
    assert (num_examples, metrics) == (1, {})  # nothing in clear beside the statistics
    assert [a.shape for a in reply] == [(coordinator.n_params,), (1,), (1,)]
    assert reply[1][0] == 200.0
    trained = reply[0] / reply[1][0]
    assert not np.allclose(trained, coordinator.weights)  # it trained ...
    assert np.max(np.abs(trained - coordinator.weights)) < 1.0  # ... from the global weights
    # The compute time stays in the node's state for the audit log; it is never sent.
    from client.audit import COMPUTE_RECORD

    assert client.context.state.config_records[COMPUTE_RECORD]["cpu_seconds"] >= 0


# --------------------------------------------------------------------------- the default recipe

RECIPE = AESettings(hidden=(8,), embed_dim=2, category_dim=2, batch_size=32, local_steps=5,
                    rounds=3, device="cpu", moves=0)
"""The default recipe (Gumbel-softmax codes, local SGD + SCAFFOLD, server Adam), small."""


def test_the_gumbel_softmax_bottleneck_anneals_and_embeds_on_the_simplex():
    assert RECIPE.bottleneck == "gumbel_softmax" and RECIPE.control_variates
    assert RECIPE.temperature(0) == pytest.approx(RECIPE.temperature_start)
    assert RECIPE.temperature(RECIPE.rounds - 1) == pytest.approx(RECIPE.temperature_end)
    assert RECIPE.temperature_start > RECIPE.temperature(1) > RECIPE.temperature_end
    layout = TabularLayout.from_features(FEATURES)
    x = _x(_records(100))
    z = embed(build_model(layout, RECIPE).get_flat(), x, layout=layout, settings=RECIPE)
    assert z.shape == (100, 2) and np.all(z >= 0) and np.allclose(z.sum(axis=1), 1.0)
    assert RECIPE.architecture()["bottleneck"] == "gumbel_softmax"
    with pytest.raises(ConfigError, match="bottleneck"):
        AESettings(bottleneck="vq")
    with pytest.raises(ConfigError, match="drift_correction"):
        AESettings(drift_correction="fednova")
    # Names travel in the plan and come back; a number where a name belongs is refused.
    assert AESettings.from_plan_json(RECIPE.plan_json(), device="cpu") == RECIPE
    with pytest.raises(ValueError, match="server_optimizer"):
        AESettings.from_plan_json(json.dumps({**json.loads(RECIPE.plan_json()),
                                              "server_optimizer": 1}))


def test_local_sgd_takes_the_planned_steps_and_returns_the_gradient_sum():
    start, x, layout, runs = _trained_twice(RECIPE, 300, 1)
    assert runs[0].steps == 5 and runs[0].gradient_sum is not None
    assert runs[0].gradient_sum.shape == start.shape and np.any(runs[0].gradient_sum != 0)
    # A zero control means "none measured yet": the same training as without one.
    zero = local_train(start, x, layout=layout, settings=RECIPE, rng=np.random.default_rng(1),
                       anchor=start, control=np.zeros_like(start))
    assert np.array_equal(zero.params, runs[0].params)
    # With a control the site's own gradient at the anchor is swapped for it: c - c_i.
    corrected = local_train(start, x, layout=layout, settings=RECIPE,
                            rng=np.random.default_rng(1), anchor=start,
                            control=np.full_like(start, 0.1))
    assert not np.allclose(corrected.params, runs[0].params)
    plain = local_train(start, x, layout=layout, rng=np.random.default_rng(1),
                        settings=AESettings(**{**RECIPE.to_dict(), "hidden": (8,),
                                               "drift_correction": "none"}))
    assert plain.gradient_sum is None


def test_clipping_bounds_each_local_step_whatever_the_gradient_scale():
    layout = TabularLayout.from_features(FEATURES)
    x = _x(_records(300))
    start = build_model(layout, RECIPE).get_flat()
    tiny = 1e-4
    clipped = local_train(start, x, layout=layout, rng=np.random.default_rng(1),
                          settings=AESettings(**{**RECIPE.to_dict(), "hidden": (8,),
                                                 "drift_correction": "none",
                                                 "clip_norm": tiny}))
    # Plain SGD: each step moves the weights by at most lr * clip_norm.
    moved = float(np.linalg.norm(clipped.params - start))
    assert 0 < moved <= clipped.steps * RECIPE.lr * tiny * (1 + 1e-4)
    with pytest.raises(ConfigError, match="clip_norm"):
        AESettings(clip_norm=-1.0)


def test_numeric_weight_scales_only_the_numeric_part_of_the_loss():
    layout = TabularLayout.from_features(FEATURES)
    x = torch.as_tensor(_x(_records(200)))
    losses = []
    for weight in (1.0, 2.0, 3.0):  # same seed: the same initial weights
        model = build_model(layout, AESettings(**{**RECIPE.to_dict(), "hidden": (8,),
                                                  "numeric_weight": weight}))
        with torch.no_grad():
            losses.append(float(model.loss(x.to(torch.float32))))
    # Linear in the weight, and the numeric part is positive
    assert losses[1] - losses[0] == pytest.approx(losses[2] - losses[1], rel=1e-4)
    assert losses[1] > losses[0]
    with pytest.raises(ConfigError, match="numeric_weight"):
        AESettings(numeric_weight=0.0)


def test_scaffold_adds_the_gradient_sum_to_replies_and_the_control_to_instructions():
    assert reply_shapes(Phase.AE_TRAIN, n_centres=0, n_features=4, n_params=99,
                        control_variates=True) == [(99,), (1,), (1,), (99,)]
    assert len(reply_roles(Phase.AE_TRAIN, control_variates=True)) == 4
    settings = KMeansSettings(k=2, n_init=1, init_rounds=1, init_candidates=4, max_rounds=3)
    coordinator = AEKMeansCoordinator(settings=settings, features=FEATURES, ae=RECIPE)
    coordinator.step(_moments(30.0), server_round=1, num_sites=2)
    p = coordinator.n_params
    _, arrays, _ = coordinator.instruction()
    assert [a.shape for a in arrays] == coordinator.expected_instruction_shapes() == \
        [(len(FEATURES),), (len(FEATURES),), (p,), (p,), (p,)]
    assert not np.any(arrays[4])  # no control measured before the first round
    first_round = arrays
    sent = coordinator.weights.copy()
    trained = sent + 1.0
    coordinator.step([30 * trained, np.array([30.0]), np.array([6.0]), np.full(p, 3.0),
                      np.array([20.0, 10.0]), np.array([4.0, 2.0])],
                     server_round=2, num_sites=2)
    # Server Adam's first step moves every weight by server_lr * 0.1 / (sqrt(0.01) + eps).
    beta1, beta2, eps = (0.9, 0.99, 1e-3)
    step = RECIPE.server_lr * (1 - beta1) / (np.sqrt(1 - beta2) + eps)
    assert np.allclose(coordinator.weights - sent, step)
    _, arrays, _ = coordinator.instruction()
    assert np.array_equal(arrays[3], sent) and np.allclose(arrays[4], 0.1)
    session = SiteSession()
    plan = _plan(coordinator)
    session.admit(plan, Phase.MOMENTS, [], groups=1)
    with pytest.raises(SiteRefusal, match="needs 5 arrays"):
        session.admit(plan, Phase.AE_TRAIN, arrays[:3], groups=1)
    with pytest.raises(SiteRefusal, match="SCAFFOLD arrays"):
        session.admit(plan, Phase.AE_TRAIN, [*arrays[:4], np.zeros(p - 1)], groups=1)
    with pytest.raises(SiteRefusal, match="SCAFFOLD anchor"):  # round 1 not trained here
        session.admit(plan, Phase.AE_TRAIN, arrays, groups=1)
    session.admit(plan, Phase.AE_TRAIN, first_round, groups=1)
    session.admit(plan, Phase.AE_TRAIN, arrays, groups=1)


def _first_training_reply(ae: AESettings, site_root: Path):  # type: ignore[no-untyped-def]
    """A real site's (200 customers) reply to the first ``ae_train`` request of ``ae``'s plan."""
    settings = KMeansSettings(k=2, n_init=1, init_rounds=1, init_candidates=4, max_rounds=3)
    coordinator = AEKMeansCoordinator(settings=settings, features=FEATURES, ae=ae)
    plan = _plan(coordinator)
    client = _client(site_root)
    moments, _, _ = client.fit([], _config(plan, "moments"))
    coordinator.step(moments, server_round=1, num_sites=3)
    _, arrays, _ = coordinator.instruction()
    reply, _, _ = client.fit(arrays, _config(plan, "ae_train"))
    return coordinator, reply


def test_a_site_releases_code_sums_only_in_the_rounds_that_use_them(tmp_path):
    assert not RECIPE.code_statistics_released(1)  # no look in round 1, no move
    _, reply = _first_training_reply(RECIPE, tmp_path)
    assert reply[1][0] == 200.0 and reply[2][0] > 0  # the count and the loss sum travel
    assert [a.shape for a in reply[4:]] == [(2,), (2,)] and not np.any(reply[4:])
    # A plan that looks for dead codes in round 1 gets them there: per code, the customers
    # whose most likely code it is, and their loss sums.
    looking = AESettings(**{**RECIPE.to_dict(), "split_every": 1, "split_until": 1.0})
    coordinator, reply = _first_training_reply(looking, tmp_path / "looking")
    assert reply[4].sum() == 200.0 and reply[5].sum() == pytest.approx(reply[2][0])
    coordinator.step(reply, server_round=2, num_sites=1)
    assert coordinator.code_shares == [list(reply[4] / 200.0)]


def test_a_site_answers_a_scaffold_round_with_its_gradient_sum(tmp_path):
    coordinator, reply = _first_training_reply(RECIPE, tmp_path)
    p = coordinator.n_params
    assert [a.shape for a in reply] == [(p,), (1,), (1,), (p,), (2,), (2,)] \
        and reply[1][0] == 200.0
    coordinator.step(reply, server_round=2, num_sites=1)
    assert np.allclose(coordinator.control, reply[3] / 200.0)


# --------------------------------------------------------------------------- dead-code splits

SPLITTING = AESettings(hidden=(8,), embed_dim=3, category_dim=2, batch_size=32, local_steps=5,
                       rounds=4, split_every=2, split_until=1.0, split_patience=1,
                       device="cpu", moves=0)
"""The default recipe with three codes, looking for dead codes every second round and
splitting one at the first look it is dead at."""


def test_a_split_code_takes_half_of_its_source_and_leaves_the_rest_alone():
    layout = TabularLayout.from_features(FEATURES)
    before = build_model(layout, SPLITTING)
    after = build_model(layout, SPLITTING)
    after.set_flat(split_code(before.get_flat(), layout=layout, settings=SPLITTING, dead=2,
                              source=0, rng=np.random.default_rng(0)))
    old_row, new_rows = before.encoder[-1].weight, after.encoder[-1].weight
    # Opposite nudges: the two halves average to the source's row and column.
    assert torch.allclose(new_rows[0] + new_rows[2], 2 * old_row[0], atol=1e-6)
    assert not torch.allclose(new_rows[0], new_rows[2])
    old_col, new_cols = before.decoder[0].weight, after.decoder[0].weight
    assert torch.allclose(new_cols[:, 0] + new_cols[:, 2], 2 * old_col[:, 0], atol=1e-6)
    assert not torch.allclose(new_cols[:, 0], new_cols[:, 2])
    bias = after.encoder[-1].bias
    assert bias[0].item() == bias[2].item() == pytest.approx(
        before.encoder[-1].bias[0].item() - np.log(2.0), abs=1e-6)
    # Code 1 and every other layer are untouched.
    assert torch.equal(new_rows[1], old_row[1]) and torch.equal(new_cols[:, 1], old_col[:, 1])
    for (name, a), b in zip(before.named_parameters(), after.parameters(), strict=True):
        if name not in ("encoder.2.weight", "encoder.2.bias", "decoder.0.weight"):
            assert torch.equal(a, b), name
    with pytest.raises(ConfigError, match="two different codes"):
        split_code(before.get_flat(), layout=layout, settings=SPLITTING, dead=1, source=1,
                   rng=np.random.default_rng(0))


def _train_sums(coordinator: AEKMeansCoordinator, counts, losses) -> list[np.ndarray]:
    p = coordinator.n_params
    return [30 * coordinator.weights, np.array([30.0]), np.array([float(sum(losses))]),
            np.full(p, 3.0), np.array(counts, dtype=float), np.array(losses, dtype=float)]


def _splitting_coordinator() -> AEKMeansCoordinator:
    """A :data:`SPLITTING` run after its moments round (30 customers, 2 sites)."""
    settings = KMeansSettings(k=3, n_init=1, init_rounds=1, init_candidates=4, max_rounds=3)
    coordinator = AEKMeansCoordinator(settings=settings, features=FEATURES, ae=SPLITTING)
    coordinator.step(_moments(30.0), server_round=1, num_sites=2)
    return coordinator


def test_the_server_splits_a_dead_code_off_the_live_code_with_the_largest_loss():
    coordinator = _splitting_coordinator()
    # Training round 1 is no look (else code 0, the largest loss, would be split off) ...
    coordinator.step(_train_sums(coordinator, [10, 0, 20], [9.0, 0.0, 6.0]), server_round=2,
                     num_sites=2)
    assert coordinator.code_splits == [] and np.any(coordinator.control)
    # ... round 2 is: code 1 holds no customer, code 2 has the larger loss.
    coordinator.step(_train_sums(coordinator, [12, 0, 18], [3.0, 0.0, 6.0]), server_round=3,
                     num_sites=2)
    assert coordinator.code_splits == [{"round": 2, "dead": 1, "source": 2,
                                        "candidate": 0}]
    # The next round starts from other weights than the gradients were measured at.
    assert not np.any(coordinator.control)
    assert coordinator.code_shares[-1] == [0.4, 0.0, 0.6]


def test_code_sums_are_read_only_in_the_rounds_that_release_them():
    coordinator = _splitting_coordinator()
    # Round 1 releases none (not a look): whatever arrives there is not read.
    coordinator.step(_train_sums(coordinator, [12, 1, 18], [3.0, 0.0, 6.0]), server_round=2,
                     num_sites=2)
    assert coordinator.code_shares == [] and coordinator.code_splits == []
    # Round 2 is a look: a share is a count of customers, one that does not add up is refused.
    with pytest.raises(ProtocolError, match="impossible"):
        coordinator.step(_train_sums(coordinator, [12, 1, 18], [3.0, 0.0, 6.0]),
                         server_round=3, num_sites=2)


def test_the_default_plan_releases_code_sums_in_15_of_its_520_rounds():
    ae = AESettings()
    released = [r for r in range(1, ae.training_rounds + 1) if ae.code_statistics_released(r)]
    looks = list(range(10, 101, 10))  # every 10 rounds in the first half
    assert released == [*looks, 200, 280, 360, 440, 520]
    assert not any(AESettings(split_share=0.0, moves=0).code_statistics_released(r)
                   for r in range(1, 201))
    no_moves = AESettings(moves=0)
    assert [r for r in range(1, 201) if no_moves.code_statistics_released(r)] == looks


def test_a_code_is_split_only_after_patience_looks_dead_in_a_row():
    settings = KMeansSettings(k=3, n_init=1, init_rounds=1, init_candidates=4, max_rounds=3)
    ae = AESettings(**{**SPLITTING.to_dict(), "hidden": (8,), "rounds": 6, "split_every": 1,
                       "split_patience": 2})
    coordinator = AEKMeansCoordinator(settings=settings, features=FEATURES, ae=ae)
    coordinator.step(_moments(30.0), server_round=1, num_sites=2)
    # dead, back, dead, dead: only the second death in a row splits it.
    for server_round, counts in enumerate(([12, 0, 18], [11, 1, 18], [12, 0, 18],
                                           [12, 0, 18]), start=2):
        coordinator.step(_train_sums(coordinator, counts, [3.0, 0.0, 6.0]),
                         server_round=server_round, num_sites=2)
        assert len(coordinator.code_splits) == (server_round == 5)
    assert coordinator.code_splits == [{"round": 4, "dead": 1, "source": 2,
                                        "candidate": 0}]


def test_mean_loss_splits_the_code_that_reconstructs_its_customers_worst():
    settings = KMeansSettings(k=3, n_init=1, init_rounds=1, init_candidates=4, max_rounds=3)
    ae = AESettings(**{**SPLITTING.to_dict(), "hidden": (8,), "split_source": "mean_loss"})
    coordinator = AEKMeansCoordinator(settings=settings, features=FEATURES, ae=ae)
    coordinator.step(_moments(30.0), server_round=1, num_sites=2)
    for server_round in (2, 3):  # code 0: the larger loss sum, code 2: the larger mean
        coordinator.step(_train_sums(coordinator, [24, 0, 6], [12.0, 0.0, 6.0]),
                         server_round=server_round, num_sites=2)
    assert coordinator.code_splits == [{"round": 2, "dead": 1, "source": 2,
                                        "candidate": 0}]
    with pytest.raises(ConfigError, match="split_source"):
        AESettings(split_source="largest")


def test_code_statistics_travel_only_with_the_gumbel_softmax_split():
    assert reply_shapes(Phase.AE_TRAIN, n_centres=0, n_features=4, n_params=9,
                        control_variates=True, code_statistics=3) == \
        [(9,), (1,), (1,), (9,), (3,), (3,)]
    assert not AESettings(split_share=0.0, moves=0).code_statistics
    assert not AESettings(bottleneck="tanh", moves=0).code_statistics
    shapes = [(9,), (1,), (1,), (9,), (3,), (3,)]
    reply = [np.zeros(9), np.ones(1), np.ones(1), np.zeros(9), np.array([1.0, 0.0, 0.0]),
             np.array([0.5, 0.0, 0.0])]
    check_site_reply(reply, phase=Phase.AE_TRAIN, shapes=shapes)
    with pytest.raises(ProtocolError, match=r"#4 \(counts\).*whole"):
        check_site_reply([*reply[:4], np.array([0.5, 0.5, 0.0]), reply[5]],
                         phase=Phase.AE_TRAIN, shapes=shapes)
    with pytest.raises(ProtocolError, match=r"#5 .*negative"):
        check_site_reply([*reply[:5], np.array([-0.5, 0.0, 0.0])], phase=Phase.AE_TRAIN,
                         shapes=shapes)


# --------------------------------------------------------------------------- candidates

def test_each_candidate_restarts_the_temperature_from_its_own_initial_weights():
    ae = AESettings(rounds=4, candidates=3, seed=7, moves=0)
    assert ae.training_rounds == 12
    assert [ae.temperature(r) for r in (0, 4, 8)] == [ae.temperature_start] * 3
    assert ae.temperature(7) == pytest.approx(ae.temperature_end)
    assert ae.temperature(5) == pytest.approx(ae.temperature(1))
    seeds = [ae.candidate_seed(c) for c in range(3)]
    assert seeds[0] == 7 and len(set(seeds)) == 3
    with pytest.raises(ConfigError, match="candidates=0"):
        AESettings(candidates=0)


def _candidate_round(coordinator: AEKMeansCoordinator, loss: float, server_round: int,
                     value: float) -> None:
    p = coordinator.n_params
    coordinator.step([np.full(p, 30.0 * value), np.array([30.0]), np.array([30.0 * loss])],
                     server_round=server_round, num_sites=2)


@pytest.mark.parametrize(("losses", "chosen"), [((0.9, 0.5, 0.7), 1), ((0.4, 0.5, 0.6), 0),
                                                ((0.9, 0.8, 0.7), 2)])
def test_the_candidate_with_the_lowest_released_last_round_loss_is_kept(losses, chosen):
    coordinator = _coordinator(rounds=2, candidates=3)
    coordinator.step(_moments(30.0), server_round=1, num_sites=2)
    starts = []
    server_round = 1
    for c, loss in enumerate(losses):
        starts.append(coordinator.weights.copy())
        # Each candidate's first round reports a loss lower than every last round: only the
        # last round's counts. Sites send weights c + 1 (FedAvg: the new global weights).
        for first, value in ((True, 0.01), (False, loss)):
            server_round += 1
            assert coordinator.phase is Phase.AE_TRAIN
            _candidate_round(coordinator, value, server_round, float(c + 1 + 10 * first))
    assert coordinator.phase is Phase.EMBED
    assert coordinator.candidate_losses == pytest.approx(list(losses))
    assert coordinator.chosen_candidate == chosen
    assert np.allclose(coordinator.weights, chosen + 1.0)
    # Every candidate started from its own seeded weights, the first from the run's seed.
    assert np.array_equal(starts[0], build_model(coordinator.layout, coordinator.ae).get_flat())
    assert not np.allclose(starts[1], starts[0]) and not np.allclose(starts[2], starts[1])
    assert coordinator.ae_rounds == 6 and len(coordinator.ae_loss) == 6


def test_a_new_candidate_starts_without_the_last_ones_control_or_server_moments():
    settings = KMeansSettings(k=3, n_init=1, init_rounds=1, init_candidates=4, max_rounds=3)
    ae = AESettings(**{**SPLITTING.to_dict(), "hidden": (8,), "rounds": 2, "candidates": 2})
    coordinator = AEKMeansCoordinator(settings=settings, features=FEATURES, ae=ae)
    coordinator.step(_moments(30.0), server_round=1, num_sites=2)
    coordinator.step(_train_sums(coordinator, [10, 10, 10], [3.0, 3.0, 3.0]), server_round=2,
                     num_sites=2)
    assert np.any(coordinator.control)
    coordinator.step(_train_sums(coordinator, [10, 10, 10], [3.0, 3.0, 3.0]), server_round=3,
                     num_sites=2)
    assert coordinator.phase is Phase.AE_TRAIN and coordinator.candidate == 1
    assert not np.any(coordinator.control)
    assert np.array_equal(coordinator.anchor, coordinator.weights)
    name, arrays, _ = coordinator.instruction()
    assert name == "ae_train" and not np.any(arrays[4])


def test_a_site_admits_rounds_times_candidates_training_rounds_and_no_more():
    coordinator = _coordinator(rounds=2, candidates=2)
    plan = _plan(coordinator)
    p, d = coordinator.n_params, len(FEATURES)
    base = [np.zeros(d), np.ones(d), np.zeros(p)]
    session = SiteSession()
    session.admit(plan, Phase.MOMENTS, [], groups=1)
    for _ in range(4):
        session.admit(plan, Phase.AE_TRAIN, base, groups=1)
    with pytest.raises(SiteRefusal, match="not allowed"):
        session.admit(plan, Phase.AE_TRAIN, base, groups=1)
    with pytest.raises(SiteRefusal, match=r"training rounds \(candidates and moves\)=4 exceeds"):
        plan.check_against(SitePolicy(require_dp=False, max_ae_rounds=3),
                           features=plan.features, prg=plan.prg)


def test_code_reconstructions_are_the_decoded_pure_codes_on_the_loss_scales():
    layout = TabularLayout.from_features(FEATURES)
    params = build_model(layout, SPLITTING).get_flat()
    recon = code_reconstructions(params, layout=layout, settings=SPLITTING)
    model = build_model(layout, SPLITTING)
    out = model.decoder(torch.eye(3)).detach().double().numpy()
    assert recon.shape == (3, 2 + 1 + 3)
    assert np.allclose(recon[:, :2], out[:, :2])  # numbers as decoded (numeric_weight 1)
    assert np.allclose(recon[:, 2], 1 / (1 + np.exp(-out[:, 2])))  # flag probability
    assert np.allclose(recon[:, 3:].sum(axis=1), 1.0)  # category probabilities
    halved = AESettings(**{**SPLITTING.to_dict(), "numeric_weight": 0.25})
    assert np.allclose(code_reconstructions(params, layout=layout, settings=halved)[:, :2],
                       0.5 * out[:, :2])


def _moving(moves: int = 2) -> AEKMeansCoordinator:
    settings = KMeansSettings(k=3, n_init=1, init_rounds=1, init_candidates=4, max_rounds=3)
    ae = AESettings(**{**SPLITTING.to_dict(), "rounds": 2, "split_until": 0.0,
                       "moves": moves, "move_rounds": 2})
    coordinator = AEKMeansCoordinator(settings=settings, features=FEATURES, ae=ae)
    coordinator.step(_moments(30.0), server_round=1, num_sites=2)
    return coordinator


def _train_and_settle(coordinator: AEKMeansCoordinator) -> np.ndarray:
    """The candidate's 2 rounds, then its 2 settling rounds (loss 18 / 30 = 0.6 each)."""
    for server_round in (2, 3):
        coordinator.step(_train_sums(coordinator, [16, 8, 6], [8.0, 4.0, 6.0]),
                         server_round=server_round, num_sites=2)
    trained = coordinator.weights.copy()
    assert coordinator._move == {"round": 2, "settle": True}  # no move yet
    for server_round in (4, 5):
        assert np.array_equal(coordinator.weights, trained)  # server Adam keeps them
        coordinator.step(_train_sums(coordinator, [16, 8, 6], [8.0, 4.0, 6.0]),
                         server_round=server_round, num_sites=2)
    assert coordinator.settled_loss == pytest.approx(0.6)
    return trained


def test_a_merge_and_split_move_empties_the_smaller_of_the_closest_pair_into_another_code():
    coordinator = _moving()
    trained = _train_and_settle(coordinator)
    recon = code_reconstructions(trained, layout=coordinator.layout, settings=coordinator.ae)
    distance = {(i, j): np.sum((recon[i] - recon[j]) ** 2) for i, j in ((0, 1), (0, 2), (1, 2))}
    i, j = min(distance, key=distance.__getitem__)
    emptied = (i, j)[int([16, 8, 6][j] < [16, 8, 6][i])]
    # With three codes the code split is the one outside the pair.
    assert coordinator._move == {"round": 4, "merged": [i, j], "emptied": emptied,
                                 "source": ({0, 1, 2} - {i, j}).pop()}
    assert coordinator.phase is Phase.AE_TRAIN and not np.array_equal(coordinator.weights,
                                                                      trained)
    name, arrays, _ = coordinator.instruction()
    assert name == "ae_train" and not np.any(arrays[4])  # no SCAFFOLD control across a move
    assert coordinator.ae.temperature(coordinator.ae_rounds) == coordinator.ae.temperature_end


def test_a_move_is_kept_only_if_its_released_loss_is_lower():
    coordinator = _moving()
    trained = _train_and_settle(coordinator)
    first_move = coordinator._move
    # Move 1 ends at loss 0.7 (its first round's loss does not count): rejected, so move 2
    # starts from the settled model again, with the next closest pair.
    for server_round, loss in ((6, 0.1), (7, 21.0)):
        coordinator.step(_train_sums(coordinator, [16, 8, 6], [loss, 0.0, 0.0]),
                         server_round=server_round, num_sites=2)
    assert coordinator.move_log[0]["kept"] is False
    assert coordinator._move["merged"] != first_move["merged"]
    # Move 2 ends at 0.5 < 0.6: kept, and its weights are the ones embedded.
    moved = coordinator.weights.copy()  # the sites send it back: server Adam keeps it
    for server_round, loss in ((8, 30.0), (9, 15.0)):
        coordinator.step(_train_sums(coordinator, [16, 8, 6], [loss, 0.0, 0.0]),
                         server_round=server_round, num_sites=2)
    assert [m["kept"] for m in coordinator.move_log] == [False, True]
    assert coordinator.move_log[1]["loss"] == pytest.approx(0.5)
    assert coordinator.phase is Phase.EMBED
    assert np.array_equal(coordinator.weights, moved)
    assert not np.array_equal(coordinator.weights, trained)
    assert coordinator.ae_rounds == coordinator.ae.training_rounds == 8
    # The model file reports the embedded model's loss, not the last round's (move 2's too).
    assert coordinator.final_loss == pytest.approx(0.5) == coordinator.ae_loss[-1]


def test_when_every_move_loses_the_settled_model_is_embedded():
    coordinator = _moving(moves=1)
    trained = _train_and_settle(coordinator)
    for server_round in (6, 7):
        coordinator.step(_train_sums(coordinator, [16, 8, 6], [18.0, 0.0, 0.0]),
                         server_round=server_round, num_sites=2)  # equal loss: not lower
    assert coordinator.phase is Phase.EMBED
    assert np.array_equal(coordinator.weights, trained)
    assert coordinator.ae_rounds == coordinator.ae.training_rounds == 6
    assert coordinator.final_loss == pytest.approx(0.6)
    with pytest.raises(ConfigError, match=r"moves=1 needs .*split_share=0\.0.*moves=0"):
        AESettings(moves=1, split_share=0.0)
    with pytest.raises(ConfigError, match=r"moves=3 needs .*bottleneck=tanh.*moves=0"):
        AESettings(bottleneck="tanh")
    with pytest.raises(ConfigError, match="move_rounds=0 >= 1"):
        AESettings(move_rounds=0)
    with pytest.raises(ConfigError, match=r"moves=3 needs embed_dim >= 3.*embed_dim=2"):
        AESettings(embed_dim=2)


def test_the_model_reports_the_embedded_models_loss_not_a_rejected_moves():
    coordinator = _moving(moves=1)
    _train_and_settle(coordinator)
    for server_round, loss in ((6, 18.0), (7, 21.0)):
        coordinator.step(_train_sums(coordinator, [20, 4, 6], [loss, 0.0, 0.0]),
                         server_round=server_round, num_sites=2)
    assert coordinator.move_log[0]["kept"] is False and coordinator.phase is Phase.EMBED
    assert coordinator.ae_loss[-1] == pytest.approx(0.7)  # the rejected move's last round
    assert coordinator.final_loss == pytest.approx(0.6)  # the settled model, embedded
    assert coordinator.final_code_shares == pytest.approx([16 / 30, 8 / 30, 6 / 30])


def test_the_default_recipe_with_its_moves_fits_the_default_site_policy():
    """A site with conf/site/default.yaml admits ``model=ae_kmeans`` as configured by default."""
    ae = AESettings()
    assert ae.moves == 3
    assert ae.training_rounds == ae.rounds + (ae.moves + 1) * ae.move_rounds == 520
    assert ae.training_rounds <= SitePolicy().max_ae_rounds
    site_yaml = OmegaConf.load(Path(__file__).resolve().parents[2] / "conf/site/default.yaml")
    assert ae.training_rounds <= int(site_yaml.max_ae_rounds)


def test_the_central_reference_runs_the_same_protocol_on_the_pooled_data_deterministically():
    from simulations.datasets import MixedCustomers
    from simulations.run import central_ae_kmeans

    population = MixedCustomers(num_customers=800).load(seed=0)
    ae = AESettings(hidden=(8,), embed_dim=4, category_dim=2, batch_size=32, local_steps=5,
                    rounds=4, split_every=2, moves=1, move_rounds=2, device="cpu", seed=0)
    settings = KMeansSettings(k=4, n_init=1, init_rounds=1, init_candidates=8, max_rounds=5,
                              seed=0)
    first = central_ae_kmeans(population, ae, settings=settings, device="cpu")
    again = central_ae_kmeans(population, ae, settings=settings, device="cpu")
    assert first.labels.shape == (population.raw.shape[0],)
    assert set(np.unique(first.labels)) <= set(range(4)) and len(np.unique(first.labels)) >= 2
    assert np.array_equal(first.labels, again.labels) and first.loss == again.loss
    assert np.isfinite(first.loss) and first.loss > 0
