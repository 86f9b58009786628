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
