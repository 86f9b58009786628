"""Real Flower simulations (Ray engine, SecAgg+): exactness, message contents, outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.common.serde import recorddict_from_proto
from flwr.compat.common.recorddict_compat import recorddict_to_fitres
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

from client.audit import make_capture_mod
from common.protocol import NEXT_KEYS_RECORD, Phase, reply_shapes
from common.secure_sum import SecAggPlusSumCodec, quantization_range_for
from simulations.datasets import SyntheticCustomers
from simulations.run import run
from simulations.synthetic import generate_customers

pytestmark = pytest.mark.integration

SMALL = ("data.num_customers=4000", "data.num_regions=3", "model.k=4", "strategy.n_init=2",
         "seed=7")


def _segments(path: Path) -> np.ndarray:
    doc = json.loads((path / "segments.json").read_text())
    return np.array([s["centroid_scaled"] for s in doc["segments"]])


def _metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def secagg_and_plain_runs(tmp_path_factory):
    """One SecAgg+ run with every outgoing message captured, and the same run without SecAgg+."""
    from hydra import compose, initialize_config_dir

    from common.config import register_configs
    from tests.conftest import CONF_DIR

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg_secagg = compose("config", overrides=[*SMALL, "privacy=secagg"])
        cfg_plain = compose("config", overrides=[*SMALL, "privacy=none"])
    secagg_dir = tmp_path_factory.mktemp("secagg")
    plain_dir = tmp_path_factory.mktemp("plain")
    capture_dir = tmp_path_factory.mktemp("capture")
    secagg = run(cfg_secagg, output_dir=secagg_dir,
                 client_mods=(make_capture_mod(capture_dir),))
    plain = run(cfg_plain, output_dir=plain_dir)
    return {"secagg": (secagg, secagg_dir), "plain": (plain, plain_dir), "capture": capture_dir,
            "cfg": cfg_secagg}


def test_secagg_path_reproduces_plain_path_round_by_round(secagg_and_plain_runs):
    secagg, secagg_dir = secagg_and_plain_runs["secagg"]
    plain, plain_dir = secagg_and_plain_runs["plain"]
    assert secagg["secagg"] is True and plain["secagg"] is False
    m_secagg, m_plain = _metrics(secagg_dir), _metrics(plain_dir)
    assert [m["phase"] for m in m_secagg] == [m["phase"] for m in m_plain]
    for a, b in zip(m_secagg, m_plain, strict=True):
        if a["cost"] is not None:
            assert abs(a["cost"] - b["cost"]) <= 1e-6 * abs(b["cost"]), a["round"]
    c_secagg, c_plain = _segments(secagg_dir), _segments(plain_dir)
    rel = np.abs(c_secagg - c_plain).max() / np.abs(c_plain).max()
    assert rel < 1e-4
    assert secagg["cost_ratio"] < 1.05 and secagg["rounds"] == plain["rounds"]


def assert_sites_sent_only_public_aggregates(capture: Path, cfg, summary: dict, *,
                                             dropped_replies: int = 0) -> None:
    """Check every captured outgoing message of a SecAgg+ run (see module docstring)."""
    num_sites, k, d = summary["num_sites"], summary["k"], 7
    codec = SecAggPlusSumCodec(quantization_range_for(num_sites))
    table = generate_customers(num_customers=cfg.data.num_customers,
                               num_regions=cfg.data.num_regions, seed=cfg.seed)
    identifiers = [s.encode() for s in
                   [*table.customer_id[:500], *table.email[:500], *table.name[:500]]]
    site_sizes = set(summary["site_sizes"])
    sidecars = sorted(capture.glob("*.json"))
    # 4 SecAgg+ stages in the first round, then 3 per round and site (the next round's set-up
    # rides on the unmask), less the replies a dropped site never sent.
    rounds = summary["rounds"]
    assert len(sidecars) >= num_sites * (3 * rounds + 1) - 2 * dropped_replies
    masked_replies = next_keys = 0
    n_candidates = 10 * k
    for sidecar in sidecars:
        meta = json.loads(sidecar.read_text())
        payload = sidecar.with_suffix(".pb").read_bytes()
        # Only SecAgg+ training replies leave a site: no evaluate or query replies at all.
        assert meta["message_type"] == "train" and meta["in_type"] == "train"
        assert not meta["has_error"]
        # Arrays never travel in clear: every ArrayRecord of a reply is empty.
        assert all(not arrays for arrays in meta["arrays"].values()), meta
        for ident in identifiers:
            assert ident not in payload
        content = recorddict_from_proto(ProtoRecordDict.FromString(payload))
        assert set(content.config_records) <= {RECORD_KEY_CONFIGS, NEXT_KEYS_RECORD,
                                               "fitres.metrics", "fitres.status"}, meta
        if NEXT_KEYS_RECORD in content.config_records:  # two public keys, nothing else
            keys = content.config_records[NEXT_KEYS_RECORD]
            assert sorted(keys) == sorted([Key.PUBLIC_KEY_1, Key.PUBLIC_KEY_2])
            assert all(isinstance(v, bytes) and len(v) == 32 for v in keys.values())
            next_keys += 1
        secagg_cfg = content.config_records[RECORD_KEY_CONFIGS]
        if Key.MASKED_PARAMETERS not in secagg_cfg:
            continue
        masked_replies += 1
        fitres = recorddict_to_fitres(content, keep_input=True)
        assert fitres.num_examples == 1 and fitres.metrics == {}
        phase = Phase(meta["phase"])
        groups = cfg.strategy.n_init if phase is Phase.LLOYD else 1
        n_centres = {Phase.MOMENTS: 0, Phase.INIT: n_candidates, Phase.LLOYD: k * groups,
                     Phase.PROFILE: k}[phase]
        expected = [(1,)] + [codec.encoded_shape(s)
                             for s in reply_shapes(phase, n_centres=n_centres, n_features=d)]
        shapes = [bytes_to_ndarray(b).shape for b in secagg_cfg[Key.MASKED_PARAMETERS]]
        assert shapes == expected, (phase, shapes)
        assert not any(dim in site_sizes for shape in shapes for dim in shape)
    assert masked_replies == num_sites * rounds - dropped_replies
    assert next_keys >= num_sites * (rounds - 1) - 2 * dropped_replies


def test_every_message_a_site_sends_carries_only_public_shapes(secagg_and_plain_runs):
    summary, _ = secagg_and_plain_runs["secagg"]
    assert_sites_sent_only_public_aggregates(secagg_and_plain_runs["capture"],
                                             secagg_and_plain_runs["cfg"], summary)


def test_outputs_are_complete(secagg_and_plain_runs):
    _, out = secagg_and_plain_runs["secagg"]
    for name in ("segments.json", "metrics.jsonl", "summary.json", "config.resolved.yaml"):
        assert (out / name).is_file(), name
    written = json.loads((out / "summary.json").read_text())
    for key in ("cost", "centralized_cost", "cost_ratio", "ari_vs_truth", "ari_vs_centralized",
                "rounds", "seconds", "num_sites", "k", "secagg",
                "bytes_uploaded_per_site_round"):
        assert key in written, key
    assert written["bytes_uploaded_per_site_round"] > 0
    metrics = _metrics(out)
    assert len(metrics) == written["rounds"]
    assert all(m["bytes_uploaded_per_site"] > 0 for m in metrics)
    assert {m["phase"] for m in metrics} == {"moments", "init", "lloyd", "profile"}
    doc = json.loads((out / "segments.json").read_text())
    assert doc["privacy"]["secure_aggregation"] == "secagg+"
    assert doc["privacy"]["min_segment_size"] == 10
    assert len({s["name"] for s in doc["segments"]}) == len(doc["segments"])
    audit_lines = [json.loads(line) for f in (out / "audit").glob("site-*.jsonl")
                   for line in f.read_text().splitlines()]
    assert audit_lines and all(e["mechanism"] == "secagg+" for e in audit_lines)
    assert all("sha256" in e and e["bytes"] > 0 for e in audit_lines)


def test_population_excludes_refused_consent():
    population = SyntheticCustomers(num_customers=2000, num_regions=3).load(seed=1)
    table = generate_customers(num_customers=2000, num_regions=3, seed=1)
    assert population.raw.shape[0] == int(table.consent.sum()) < 2000
    np.testing.assert_array_equal(population.raw, table.features[table.consent])


def test_secagg_round_with_a_dropped_site_decodes_the_survivors_sum(make_cfg, tmp_path):
    from simulations.faults import make_dropout_mod

    cfg = make_cfg("data.num_customers=3000", "data.num_regions=4", "model.k=3",
                   "strategy.n_init=1", "strategy.init_rounds=1", "seed=3",
                   "strategy.accept_partial_rounds=true", "site.tolerate_dropouts=true",
                   "privacy=secagg")  # exact sums: the survivors' sum is compared exactly
    dropped = 1
    capture = tmp_path / "capture"
    summary = run(cfg, output_dir=tmp_path / "out", client_mods=(
        make_capture_mod(capture),
        make_dropout_mod(site=dropped, server_round=1, stage="collect_masked_vectors"),))
    # A second full run whose every outgoing message is checked, dropout included.
    assert_sites_sent_only_public_aggregates(capture, cfg, summary, dropped_replies=1)
    tmp_path = tmp_path / "out"
    metrics = _metrics(tmp_path)
    assert metrics[0]["phase"] == "moments" and metrics[0]["num_sites"] == 3
    assert all(m["num_sites"] == 4 for m in metrics[1:])
    model = json.loads((tmp_path / "segments.json").read_text())
    sizes = summary["site_sizes"]
    # Round 1 summed only the three surviving sites, exactly (the dropped site's pairwise
    # masks were rebuilt by the server from the survivors' key shares).
    assert model["scaling"]["count"] == sum(sizes) - sizes[dropped]
    population = SyntheticCustomers(num_customers=3000, num_regions=4).load(seed=3)
    from common.features import apply_transforms
    from simulations.datasets import ByGroupPartition

    parts = ByGroupPartition().split(population, num_sites=4, seed=3)
    survivors = np.vstack([population.raw[p] for i, p in enumerate(parts) if i != dropped])
    expected_mean = apply_transforms(survivors, population.features).mean(axis=0)
    np.testing.assert_allclose(model["scaling"]["mean"], expected_mean, rtol=1e-9)


def test_a_site_lost_while_sharing_keys_leaves_the_survivors_summed_exactly(make_cfg,
                                                                           tmp_path):
    """Flower 1.42 lists such a site as dead at unmask; it holds no shares, so it is left out."""
    from simulations.faults import make_dropout_mod

    cfg = make_cfg("data.num_customers=2000", "data.num_regions=4", "model.k=3",
                   "strategy.n_init=1", "strategy.init_rounds=1", "seed=3",
                   "strategy.accept_partial_rounds=true", "site.tolerate_dropouts=true",
                   "privacy=secagg")
    dropped = 2
    summary = run(cfg, output_dir=tmp_path, client_mods=(
        make_dropout_mod(site=dropped, server_round=1, stage="share_keys"),))
    metrics = _metrics(tmp_path)
    assert metrics[0]["num_sites"] == 3 and all(m["num_sites"] == 4 for m in metrics[1:])
    model = json.loads((tmp_path / "segments.json").read_text())
    sizes = summary["site_sizes"]
    assert model["scaling"]["count"] == sum(sizes) - sizes[dropped]


def test_sites_lost_before_and_after_sharing_keys_in_one_round_leave_an_exact_sum(make_cfg,
                                                                                 tmp_path):
    """One site lost while sharing keys, one after: only the second one's masks are rebuilt."""
    from simulations.faults import make_dropout_mod

    cfg = make_cfg("data.num_customers=2800", "data.num_regions=7", "model.k=3",
                   "strategy.n_init=1", "strategy.init_rounds=1", "seed=4",
                   "strategy.accept_partial_rounds=true", "site.tolerate_dropouts=true",
                   "privacy=secagg")  # 7 sites: threshold 5, two dropouts tolerated
    summary = run(cfg, output_dir=tmp_path, client_mods=(
        make_dropout_mod(site=1, server_round=1, stage="share_keys"),
        make_dropout_mod(site=4, server_round=1, stage="collect_masked_vectors")))
    metrics = _metrics(tmp_path)
    assert metrics[0]["num_sites"] == 5 and all(m["num_sites"] == 7 for m in metrics[1:])
    model = json.loads((tmp_path / "segments.json").read_text())
    sizes = summary["site_sizes"]
    assert model["scaling"]["count"] == sum(sizes) - sizes[1] - sizes[4]


def test_a_dropout_stops_the_run_by_default_with_a_clear_error(make_cfg, tmp_path):
    from common.errors import ProtocolError
    from simulations.faults import make_dropout_mod

    cfg = make_cfg("data.num_customers=2000", "data.num_regions=3", "model.k=3",
                   "strategy.n_init=1", "strategy.init_rounds=1", "seed=5")
    with pytest.raises(ProtocolError,
                       match=r"round 2 \(init\) produced no aggregate.*site 0 drops out.*"
                             r"Nothing is published"):
        run(cfg, output_dir=tmp_path, client_mods=(
            make_dropout_mod(site=0, server_round=2, stage="collect_masked_vectors"),))
    assert not (tmp_path / "segments.json").exists()
