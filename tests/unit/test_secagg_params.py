"""SecAgg+ neighbourhood and threshold choice, and what t colluding shares reveal."""

from __future__ import annotations

import math
import os

import pytest
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares

from common.errors import ConfigError
from server.app import COMPLETE_GRAPH_MAX_SITES, SecAggSettings, secagg_shares


@pytest.mark.parametrize("num_sites", [2, 3, 5, 10, 30, 31, 50, 100, 1000, 65536])
def test_shares_and_threshold_follow_the_documented_rule(num_sites):
    shares, threshold = secagg_shares(num_sites)
    assert 2 <= threshold <= shares <= num_sites
    if num_sites <= COMPLETE_GRAPH_MAX_SITES:
        assert shares == num_sites
    else:
        assert shares % 2 == 1 and shares >= 3 * math.log2(num_sites)
    if shares >= 3:
        assert threshold > shares / 2  # a strict majority of the neighbourhood
    # Dropouts tolerated per neighbourhood:
    assert shares - threshold == (shares - 1) // 2 or shares == 2


def test_five_sites_tolerate_two_dropouts_and_two_colluders():
    shares, threshold = secagg_shares(5)
    assert (shares, threshold) == (5, 3)


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
    """Flower 1.42's own resolution in SecAggPlusWorkflow.setup_stage (constructor + set-up)."""
    from flwr.server.workflow import SecAggPlusWorkflow

    workflow = SecAggPlusWorkflow(num_shares=num_shares, reconstruction_threshold=threshold)
    shares, t = workflow.num_shares, workflow.reconstruction_threshold
    if isinstance(shares, float):
        shares = round(shares * num_samples)
        if shares < num_samples and shares & 1 == 0:
            shares += 1
        if shares <= 2:
            shares = num_samples
    if isinstance(t, float):
        t = max(round(t * shares), 2)
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
    assert SecAggSettings(num_shares=2).resolve(5) == (3, 2)
    assert SecAggSettings(num_shares=4).resolve(10) == (5, 3)
