"""Attacks on the SecAgg+ exchange, run against real site ClientApps with a scripted server.

Attack 2 of the hardening issue: Flower 1.42's ``secaggplus_mod`` answers an unmask request that
lists a site as both active and dead, handing the server both of that site's secrets. The first
test reproduces that on Flower's mod alone (the bug report in docs/SECURITY.md); the others show
that a fedseg site refuses it and every other deviation, with a code and no share.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Context
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.crypto import shamir as secagg_shamir
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_STATE, Key

from client.app import make_client_app
from common.errors import SITE_ERROR_PREFIX
from common.protocol import GROUPS_KEY, PHASE_KEY, PLAN_KEY, ROUND_KEY
from common.secagg_primitives import SUITE_ID
from common.site_policy import RunPlan, SitePolicy
from simulations.datasets import PartitionedSites, SyntheticCustomers
from tests.secagg_driver import SecAggDriver, shares_for

POPULATION = SyntheticCustomers(num_customers=800, num_regions=4).load(seed=2)


class _Constant(NumPyClient):
    def __init__(self, value: float) -> None:
        self.value = value

    def fit(self, parameters, config):
        return [np.array([self.value * 2**-10 - 0.5])], 1, {}


def _constant_client_fn(value: float):
    def client_fn(context: Context):
        return _Constant(value).to_client()

    return client_fn


def _site_apps(n: int, policy: SitePolicy, root) -> list[ClientApp]:
    parts = np.array_split(np.arange(POPULATION.raw.shape[0]), n)
    loader = PartitionedSites(parts=tuple(POPULATION.raw[p] for p in parts),
                              features=POPULATION.features)
    app = make_client_app(loader, policy=policy, site_root=root)
    return [app] * n


def _moments_instruction(n: int) -> tuple[list, dict]:
    plan = RunPlan(features=tuple(f.name for f in POPULATION.features), k=3, n_init=1,
                   init="summary", init_candidates=30, init_rounds=1, max_rounds=5, num_sites=n,
                   prg=SUITE_ID)
    return [], {PHASE_KEY: "moments", ROUND_KEY: 1, GROUPS_KEY: 1, PLAN_KEY: plan.to_json()}


def _assert_refused(reply, code="secagg"):
    assert reply.has_error(), "the site answered a request it must refuse"
    assert reply.error.reason.startswith(f"{SITE_ERROR_PREFIX} {code}:"), reply.error.reason
    assert not reply.has_content()


def test_flower_mod_alone_gives_both_secrets_of_a_site_listed_active_and_dead():
    # Flower's own mod, majority threshold 2 of 3: the lying request yields site A's mask seed
    # AND its pairwise-mask key from B and C, with no colluding site.
    apps = [ClientApp(client_fn=_constant_client_fn(v), mods=[secaggplus_mod])
            for v in (1.0, 2.0, 3.0)]
    driver = SecAggDriver(apps)
    a, b, c = driver.nodes
    driver.setup(share_num=3, threshold=2)
    driver.share_keys()
    assert not any(r.has_error() for r in driver.collect([np.zeros(1)], {}).values())
    replies = driver.unmask({b: ([a, b, c], [a]), c: ([a, b, c], [a])})
    assert not any(r.has_error() for r in replies.values())
    seed_shares = [shares_for(replies[n], a)[0] for n in (b, c)]
    key_shares = [shares_for(replies[n], a)[1] for n in (b, c)]
    state = driver.contexts[a].state.config_records[RECORD_KEY_STATE]
    # The secret sharing in force (fedseg's, installed by client.app at import) -- looked up
    # now, not bound at this module's import, which may come first.
    assert secagg_shamir.combine_shares(seed_shares) == state["rd_seed"]
    # Both secrets: A's vector is readable.
    assert secagg_shamir.combine_shares(key_shares) == state["sk1"]


def test_a_fedseg_site_refuses_the_active_and_dead_lie(tmp_path):
    # The permissive setting: dead lists allowed.
    policy = SitePolicy(tolerate_dropouts=True, require_dp=False)
    driver = SecAggDriver(_site_apps(4, policy, tmp_path))
    a, b, c, d = driver.nodes
    assert not any(r.has_error() for r in driver.setup(share_num=4, threshold=3).values())
    assert not any(r.has_error() for r in driver.share_keys().values())
    arrays, config = _moments_instruction(4)
    assert not any(r.has_error() for r in driver.collect(arrays, config).values())
    lie = ([a, b, c, d], [a])
    replies = driver.unmask({b: lie, c: lie, d: lie})
    for reply in replies.values():
        _assert_refused(reply)
    log = (tmp_path / "site-logs" / "site-1.log").read_text()
    assert "as both active and dead" in log
    audit = (tmp_path / "audit" / "site-1.jsonl").read_text().splitlines()
    assert '"stage": "unmask"' in audit[-1] and '"error_code": "secagg"' in audit[-1]


def test_an_honest_exchange_passes_the_guard_and_a_refused_site_stays_out(tmp_path):
    driver = SecAggDriver(_site_apps(4, SitePolicy(require_dp=False), tmp_path))
    nodes = driver.nodes
    driver.setup(share_num=4, threshold=4)
    driver.share_keys()
    arrays, config = _moments_instruction(4)
    collected = driver.collect(arrays, config)
    assert all(Key.MASKED_PARAMETERS in r.content.config_records["secaggplus_configs"]
               for r in collected.values())
    replies = driver.unmask({n: (nodes, []) for n in nodes})
    assert not any(r.has_error() for r in replies.values())
    # A second unmask in the same round is refused (no second set of shares).
    again = driver.unmask({nodes[0]: (nodes[1:], [nodes[0]])})
    _assert_refused(again[nodes[0]])


def test_without_dropout_tolerance_no_dead_site_is_ever_unmasked(tmp_path):
    driver = SecAggDriver(_site_apps(4, SitePolicy(require_dp=False), tmp_path))
    a, b, c, d = driver.nodes
    driver.setup(share_num=4, threshold=4)
    driver.share_keys()
    driver.collect(*_moments_instruction(4))
    replies = driver.unmask({b: ([b, c, d], [a])})
    _assert_refused(replies[b])


@pytest.mark.parametrize(("setup", "why"), [
    ({"share_num": 4, "threshold": 3}, "threshold 3 of 4"),           # majority, no tolerance
    ({"share_num": 3, "threshold": 3}, "neighbourhood of 3 for 4"),   # smaller than required
    ({"share_num": 4, "threshold": 4, "target_range": 2**30}, "can wrap"),
])
def test_weak_setups_are_refused_before_any_key_is_made(tmp_path, setup, why):
    driver = SecAggDriver(_site_apps(4, SitePolicy(require_dp=False), tmp_path))
    for reply in driver.setup(**setup).values():
        _assert_refused(reply)
        assert Key.PUBLIC_KEY_1 not in str(reply)
    assert why in (tmp_path / "site-logs" / "site-0.log").read_text()


def test_a_two_site_federation_is_refused_by_the_sites(tmp_path):
    driver = SecAggDriver(_site_apps(2, SitePolicy(require_dp=False), tmp_path))
    for reply in driver.setup(share_num=2, threshold=2).values():
        _assert_refused(reply, code="federation")


def test_a_forged_neighbourhood_is_refused(tmp_path):
    driver = SecAggDriver(_site_apps(4, SitePolicy(require_dp=False), tmp_path))
    a, b, c, d = driver.nodes
    driver.setup(share_num=4, threshold=4)
    keys = driver.public_keys
    forged = {
        a: {n: keys[n] for n in (a, b)},                         # too few neighbours
        b: {**keys, c: keys[d]},                                  # repeated keys
        c: {n: keys[n] for n in (a, b, d)} | {999: keys[c]},      # own keys missing
    }
    replies = driver.share_keys(forged)
    for nid in (a, b, c):
        _assert_refused(replies[nid])
    assert not replies[d].has_error()
