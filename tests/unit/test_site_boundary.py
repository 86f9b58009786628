"""Attacks 3-6 of the hardening issue, against the real site code paths.

3: the run config cannot switch a site's privacy off, choose its data or move its logs;
4: an error reply carries a code, never a value, and is audited with its SecAgg+ stage;
5: a mask-generator mismatch is refused by the sites and caught by the server;
6: no limb sum reveals signs, and an out-of-range value is refused at the first round with the
   feature and the fix named.
"""

from __future__ import annotations

import json
import time
import types

import numpy as np
import pytest
from flwr.app import Context, Message, MessageType, Metadata, RecordDict
from flwr.common import FitIns, ndarrays_to_parameters
from flwr.compat.common import recorddict_compat as compat

import client.app
from client.app import SiteClient, SiteData, make_client_app
from common import mask_prg, secagg_primitives
from common.errors import DataError, ProtocolError, SiteRefusal, public_site_error
from common.features import FeatureSpec
from common.protocol import GROUPS_KEY, PHASE_KEY, PLAN_KEY, ROUND_KEY, Phase
from common.secure_sum import SecAggPlusSumCodec, quantization_range_for
from common.site_policy import RunPlan, SitePolicy
from server.coordinator import check_sums
from simulations.datasets import CsvCustomers
from tests.secagg_driver import SecAggDriver

FEATURES = (FeatureSpec("spend"), FeatureSpec("visits"))
EMAIL = "jane.doe@example.com"


def _plan(features=("spend", "visits"), **changes) -> RunPlan:
    base = {"features": tuple(features), "k": 2, "n_init": 1, "init": "summary",
            "init_candidates": 20, "init_rounds": 1, "max_rounds": 5, "num_sites": 3,
            "prg": secagg_primitives.SUITE_ID}
    base.update(changes)
    return RunPlan(**base)


def _moments_config(plan: RunPlan) -> dict:
    return {PHASE_KEY: "moments", ROUND_KEY: 1, GROUPS_KEY: 1, PLAN_KEY: plan.to_json()}


def _plain_train(config: dict, arrays=()) -> Message:
    content = compat.fitins_to_recorddict(FitIns(ndarrays_to_parameters(list(arrays)), config),
                                          keep_input=True)
    metadata = Metadata(run_id=3, message_id="m1", src_node_id=1, dst_node_id=5,
                        reply_to_message_id="", group_id="1", created_at=time.time(),
                        ttl=600.0, message_type=MessageType.TRAIN)
    return Message(content=content, metadata=metadata)


def _context(run_config=None) -> Context:
    return Context(run_id=3, node_id=5, node_config={"partition-id": 0, "num-partitions": 3},
                   state=RecordDict(), run_config=run_config or {})


def _failing_loader(context: Context) -> SiteData:
    raise DataError(f"value {EMAIL!r} is not a number", path="customers.csv", row=7,
                    column="spend")


# --- 4: errors leave as codes ----------------------------------------------------------------

def test_a_data_error_naming_a_cell_leaves_the_site_as_a_code_only(tmp_path):
    app = make_client_app(_failing_loader, policy=SitePolicy(mechanism="none"),
                          site_root=tmp_path)
    reply = app(_plain_train(_moments_config(_plan())), _context())
    assert reply.has_error()
    assert reply.error.reason == public_site_error("data")
    assert EMAIL not in reply.error.reason and "customers.csv" not in reply.error.reason
    log = (tmp_path / "site-logs" / "site-0.log").read_text()
    assert EMAIL in log and "row 7" in log  # the full reason stays at the site
    (entry,) = [json.loads(x) for x in (tmp_path / "audit" / "site-0.jsonl").read_text()
                .splitlines()]
    assert entry["error_code"] == "data" and entry["has_error"] is True
    assert EMAIL not in json.dumps(entry)


def test_an_error_inside_secagg_is_audited_with_its_stage(tmp_path):
    apps = [make_client_app(_failing_loader, policy=SitePolicy(require_dp=False),
                            site_root=tmp_path)] * 3
    driver = SecAggDriver(apps)
    driver.setup(share_num=3, threshold=3)
    driver.share_keys()
    replies = driver.collect([], _moments_config(_plan()))
    assert all(r.has_error() and EMAIL not in r.error.reason for r in replies.values())
    entries = [json.loads(x) for x in (tmp_path / "audit" / "site-0.jsonl").read_text()
               .splitlines()]
    assert [e["stage"] for e in entries] == ["setup", "share_keys", "collect_masked_vectors"]
    assert entries[-1]["error_code"] == "data" and entries[0]["error_code"] is None


# --- 3: the run config decides nothing at a site ---------------------------------------------

def test_the_run_config_cannot_switch_privacy_off_or_choose_data_or_logs(tmp_path, monkeypatch):
    site_dir, elsewhere = tmp_path / "site", tmp_path / "chosen-by-server"
    monkeypatch.setenv("FEDSEG_SITE_DIR", str(site_dir))
    monkeypatch.setenv("FEDSEG_SITE_OVERRIDES", "data.num_customers=2000 data.num_regions=3")
    from simulations.flower_app import client_app

    hostile = {"fedseg-overrides": "privacy=none site.mechanism=none data=csv "
                                   "data.path=/etc/passwd data.site_column=x "
                                   "data.features=[email]",
               "fedseg-output-dir": str(elsewhere)}
    reply = client_app(_plain_train(_moments_config(_plan(features=("email",)))),
                       _context(hostile))
    assert reply.has_error() and reply.error.reason == public_site_error("protocol")
    assert not elsewhere.exists()
    assert (site_dir / "audit" / "site-0.jsonl").is_file()
    assert "plain training reply" in (site_dir / "site-logs" / "site-0.log").read_text()


# --- 5: SecAgg+ primitives (mask generator, secret sharing) must match ------------------------

@pytest.mark.parametrize(("patch", "modules"), [(mask_prg, "SECAGG_MODULES"),
                                                (secagg_primitives, "PRIMITIVE_MODULES")])
def test_a_site_without_a_replaced_primitive_refuses_to_take_part(tmp_path, patch, modules):
    site = SiteData(raw=np.random.default_rng(0).normal(size=(50, 2)), features=FEATURES)
    patch.uninstall(*getattr(client.app, modules))
    try:
        with pytest.raises(SiteRefusal, match=r"SecAgg\+ primitives are") as info:
            SiteClient(site, _context(), policy=SitePolicy(require_dp=False)).admit(
                _moments_config(_plan()), [])
        assert info.value.code == "secagg"
    finally:
        patch.install(*getattr(client.app, modules))
    assert patch.is_installed(*getattr(client.app, modules))


def test_install_checks_the_flower_version_and_the_call_sites():
    with pytest.raises(RuntimeError, match=r"flwr==1\.43\.0 is installed"):
        mask_prg.install(*client.app.SECAGG_MODULES, flower_version="1.43.0")
    name = "flwr.client.mod.secure_aggregation.secaggplus_mod"
    fake = types.ModuleType(name)
    exec("def pseudo_rand_gen(seed, r, dims):\n    return []\n"
         "def _collect_masked_vectors(prg=pseudo_rand_gen):\n    return prg(b'', 2, [])\n",
         fake.__dict__)
    with pytest.raises(RuntimeError, match="does not call pseudo_rand_gen through its module"):
        mask_prg.install(fake)


def test_the_server_refuses_sums_that_masks_did_not_cancel_in():
    rng = np.random.default_rng(5)
    codec = SecAggPlusSumCodec(quantization_range_for(3))
    points = [rng.normal(size=(n, 2)) for n in (40, 25, 60)]
    moments = [[np.array([float(len(p))]), p.sum(axis=0), (p * p).sum(axis=0)] for p in points]
    encoded = [codec.encode(m) for m in moments]
    mean = [np.mean([e[i] for e in encoded], axis=0) for i in range(3)]
    honest = codec.decode(mean, num_sites=3)
    check_sums(Phase.MOMENTS, honest, num_sites=3, groups=1, expected_count=None,
               server_round=1)
    assert honest[0][0] == 125
    for _ in range(5):
        # One side masking with another generator: its masks stay in the sum as uniform noise
        # on SecAgg+'s grid.
        noise = [rng.integers(0, codec.quantization_range, size=m.shape) * 2.0
                 / codec.quantization_range / 3 for m in mean]
        garbage = codec.decode([m + n for m, n in zip(mean, noise, strict=True)], num_sites=3)
        with pytest.raises(ProtocolError, match="decoded sums are impossible"):
            check_sums(Phase.MOMENTS, garbage, num_sites=3, groups=1, expected_count=None,
                       server_round=1)


# --- 6: encoding edges ------------------------------------------------------------------------

def _limb_sums(codec: SecAggPlusSumCodec, values: list[float]) -> np.ndarray:
    q = codec.quantization_range
    limbs = [np.rint((codec.encode([np.array([v])])[0][:, 0] + 1.0) * q / 2) for v in values]
    return np.sum(limbs, axis=0)


def test_no_limb_sum_reveals_how_many_sites_sent_a_negative_value():
    codec = SecAggPlusSumCodec(quantization_range_for(5))
    none_negative = _limb_sums(codec, [0.3, 0.1, 0.2, 0.4, 0.25])
    three_negative = _limb_sums(codec, [-0.3, -0.1, -0.2, 0.4, 0.45])
    # Above the values' magnitude every limb holds the public offset's digits at every site.
    np.testing.assert_array_equal(none_negative[1:], three_negative[1:])
    # Two's complement (the old encoding) put the count of negatives in the top limb.
    top = [((round(v * 2**24) % 2**128) >> (codec.limb_bits * (codec.limbs - 1)))
           for v in (-0.3, -0.1, -0.2, 0.4, 0.45)]
    assert sum(top) == 3 * ((2**128 - 1) >> (codec.limb_bits * (codec.limbs - 1)))


def test_a_huge_valid_value_is_refused_at_the_first_round_with_the_feature_and_fix():
    raw = np.abs(np.random.default_rng(1).normal(size=(40, 2))) * 100
    raw[3, 0] = 2e13  # one customer: its square overflows the raw sums of squares
    site = SiteData(raw=raw, features=FEATURES)
    client_ = SiteClient(site, _context(), policy=SitePolicy(mechanism="none"))
    with pytest.raises(SiteRefusal, match=r"feature 'spend'.*data\.clip\.spend") as info:
        client_.fit([], _moments_config(_plan()))
    assert info.value.code == "range"


def test_data_clip_is_the_fix_that_works(tmp_path):
    path = tmp_path / "c.csv"
    rows = ["store,spend,visits"] + [f"s{i % 3},{100 + i},{i % 7}" for i in range(60)]
    rows[5] = "s1,2e13,3"
    path.write_text("\n".join(rows) + "\n")
    data = CsvCustomers(path=str(path), site_column="store", features=["spend", "visits"],
                        clip={"spend": [0, 1e6]})
    population = data.load(seed=0)
    assert population.raw[:, 0].max() == 1e6
    assert "1 value(s) of 'spend' clipped" in population.description
    site = SiteData(raw=population.raw, features=population.features)
    reply, _, _ = SiteClient(site, _context(), policy=SitePolicy(mechanism="none")).fit(
        [], _moments_config(_plan()))
    assert reply[0][0] == 60
