"""SecAgg+ neighbourhood and threshold choice, and what t colluding shares reveal."""

from __future__ import annotations

import math
import os

import pytest
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares

from common.errors import ConfigError
from common.secagg_params import (
    COMPLETE_GRAPH_MAX_SITES,
    _hypergeom_tail,
    colluders_to_expose,
    exposure_probability,
    neighbourhood_size,
    threshold_for,
)
from server.app import SecAggSettings, secagg_shares


@pytest.mark.parametrize("num_sites", [2, 3, 5, 10, 30, 31, 50, 100, 1000, 65536])
@pytest.mark.parametrize("tolerate", [False, True])
def test_shares_and_threshold_follow_the_documented_rule(num_sites, tolerate):
    shares, threshold = secagg_shares(num_sites, tolerate_dropouts=tolerate)
    assert 2 <= threshold <= shares <= num_sites
    if num_sites <= COMPLETE_GRAPH_MAX_SITES:
        assert shares == num_sites
    else:
        assert shares % 2 == 1 or shares == num_sites
        # The stated bound holds: a run exposes some site with probability <= 2**-40.
        assert exposure_probability(num_sites, shares, tolerate_dropouts=tolerate,
                                    collusion_fraction=1 / 3, rounds=200) <= 2.0**-40
        if shares > 3 and shares < num_sites:  # and it is the smallest odd size that does
            assert exposure_probability(num_sites, shares - 2, tolerate_dropouts=tolerate,
                                        collusion_fraction=1 / 3, rounds=200) > 2.0**-40
    if not tolerate:
        assert threshold == shares  # no secret can be rebuilt without every neighbour
    else:
        assert shares - threshold == (shares - 1) // 3 or shares == 2


def test_a_lying_server_needs_more_colluders_than_the_threshold_rule_leaves():
    # Majority threshold (the old rule) with 5 sites: 2*3 - 5 = 1 colluder sufficed.
    assert colluders_to_expose(5, 3) == 1
    assert colluders_to_expose(5, threshold_for(5, tolerate_dropouts=True)) == 3
    assert colluders_to_expose(5, threshold_for(5, tolerate_dropouts=False)) == 4


def test_the_old_three_log2_rule_fails_the_bound_the_new_sizes_meet():
    old = math.ceil(3 * math.log2(1000)) | 1
    assert exposure_probability(1000, old, tolerate_dropouts=False, collusion_fraction=1 / 3,
                                rounds=50) > 2.0**-40
    assert neighbourhood_size(1000) > old


@pytest.mark.parametrize("num_sites", [31, 50, 100, 1000])
@pytest.mark.parametrize("tolerate", [False, True])
def test_the_server_default_meets_every_default_site_policy(num_sites, tolerate):
    from common.site_policy import SitePolicy

    assert secagg_shares(num_sites, tolerate_dropouts=tolerate) == \
        SitePolicy(tolerate_dropouts=tolerate).required_secagg(num_sites)


def test_hypergeometric_tail_is_exact_on_small_cases():
    # 1 of C(49, 16) draws holds all 16 marked items.
    assert _hypergeom_tail(49, 16, 16, 16) == pytest.approx(1 / math.comb(49, 16), rel=1e-9)
    assert _hypergeom_tail(10, 3, 4, 0) == pytest.approx(1.0)
    exact = sum(math.comb(3, i) * math.comb(7, 4 - i) for i in (2, 3)) / math.comb(10, 4)
    assert _hypergeom_tail(10, 3, 4, 2) == pytest.approx(exact, rel=1e-12)


def test_explicit_settings_resolve_and_bad_ones_are_refused():
    assert SecAggSettings(num_shares=1.0, reconstruction_threshold=0.67).resolve(10) == (10, 7)
    assert SecAggSettings(num_shares=7, reconstruction_threshold=4).resolve(20) == (7, 4)
    with pytest.raises(ConfigError, match=r"privacy\.num_shares"):
        SecAggSettings(num_shares=30).resolve(10)
    with pytest.raises(ConfigError, match=r"privacy\.reconstruction_threshold"):
        SecAggSettings(num_shares=5, reconstruction_threshold=6).resolve(10)


@pytest.mark.parametrize("num_sites", [3, 5, 20])
def test_fewer_than_threshold_colluding_shares_do_not_reveal_a_mask_key(num_sites):
    shares, threshold = secagg_shares(num_sites)
    secret = os.urandom(32)
    parts = create_shares(secret, threshold, shares)
    assert combine_shares(parts[:threshold]) == secret
    assert combine_shares(parts[-threshold:]) == secret
    # t - 1 colluders (plus the server) cannot rebuild the key: combining fails or yields
    # something else.
    try:
        rebuilt = combine_shares(parts[: threshold - 1])
    except ValueError:
        rebuilt = None
    assert rebuilt != secret


def _flower_resolution(num_shares, threshold, num_samples):
    """Flower 1.42's own resolution in SecAggPlusWorkflow.setup_stage (constructor + set-up).

    The sent parameters are ``server.secagg_prekeys.setup_parameters``, itself checked against
    Flower's running set-up stage (tests/unit/test_secagg_prekeys.py); Flower then makes an
    even neighbourhood odd.
    """
    from flwr.common.secure_aggregation.secaggplus_constants import Key
    from flwr.server.workflow import SecAggPlusWorkflow

    from server.secagg_prekeys import setup_parameters

    workflow = SecAggPlusWorkflow(num_shares=num_shares, reconstruction_threshold=threshold)
    sent = setup_parameters(num_samples, num_shares=workflow.num_shares,
                            reconstruction_threshold=workflow.reconstruction_threshold,
                            clipping_range=1.0, quantization_range=2, modulus_range=2**32,
                            max_weight=1.0)
    shares, t = sent[Key.SHARE_NUMBER], sent[Key.THRESHOLD]
    if num_samples != shares and shares & 1 == 0:
        shares += 1
    # Neighbourhood actually built: the ring of 2 * (shares // 2) + 1 sites (capped at n).
    return min(num_samples, 2 * (shares >> 1) + 1), t


@pytest.mark.parametrize(("num_sites", "settings"), [
    (2, {}), (3, {}), (5, {}), (40, {}), (10, {"num_shares": 4}), (10, {"num_shares": 0.5}),
    (5, {"num_shares": 1.0, "reconstruction_threshold": 1.0}), (20, {"num_shares": 7}),
])
def test_recorded_parameters_are_the_ones_flower_uses(num_sites, settings):
    shares, threshold = SecAggSettings(**settings).resolve(num_sites)
    passed_shares = shares if shares > 2 else 1.0
    passed_threshold = threshold if threshold < shares else 1.0
    assert _flower_resolution(passed_shares, passed_threshold, num_sites) == (shares, threshold)


@pytest.mark.parametrize("bad", [0, -1, 3.5, 7])
def test_impossible_or_ambiguous_neighbourhoods_are_refused(bad):
    with pytest.raises(ConfigError, match=r"privacy\.num_shares"):
        SecAggSettings(num_shares=bad).resolve(5)


def test_even_neighbourhoods_are_rounded_up_like_flowers_ring():
    assert SecAggSettings(num_shares=2).resolve(5) == (3, 3)
    assert SecAggSettings(num_shares=4).resolve(10) == (5, 5)
    assert SecAggSettings(num_shares=4).resolve(10, tolerate_dropouts=True) == (5, 4)
