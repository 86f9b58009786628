"""A site sending a malformed reply in a real Flower simulation: it is left out, never summed.

The faulty site computes its statistics honestly; a mod (``simulations.faults``) then damages
what leaves it. The server rejects the reply, names the node and what was wrong, and the site
counts as dropped: the round stops unless the run accepts partial rounds, and then the others'
sum is used, exactly.
"""

from __future__ import annotations

import json

import pytest

from common.errors import ProtocolError
from simulations.datasets import ByGroupPartition, SyntheticCustomers
from simulations.faults import make_bad_reply_mod
from simulations.run import run

pytestmark = pytest.mark.integration

SMALL = ("data.num_customers=2000", "data.num_regions=3", "model.k=3", "strategy.n_init=1",
         "strategy.init_rounds=1", "seed=4")
TOLERANT = ("data.num_customers=3000", "data.num_regions=4", "model.k=3", "strategy.n_init=1",
            "strategy.init_rounds=1", "seed=3", "strategy.accept_partial_rounds=true",
            "site.tolerate_dropouts=true")


def _metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _customers_without(site: int, *, num_customers: int, num_regions: int, seed: int) -> int:
    population = SyntheticCustomers(num_customers=num_customers,
                                    num_regions=num_regions).load(seed=seed)
    parts = ByGroupPartition().split(population, num_sites=num_regions, seed=seed)
    return sum(len(p) for i, p in enumerate(parts) if i != site)


def test_a_plain_reply_with_a_negative_count_stops_the_round_naming_the_node(make_cfg,
                                                                             tmp_path):
    cfg = make_cfg(*SMALL, "privacy=none")
    with pytest.raises(ProtocolError) as info:
        run(cfg, output_dir=tmp_path, client_mods=(
            make_bad_reply_mod(site=0, server_round=2, fault="negative_count"),))
    message = str(info.value)
    assert "round 2 (init): only 2 of 3 sites took part" in message
    assert "reply rejected, not aggregated: array #2 (counts) holds negative values)" in message
    assert not (tmp_path / "segments.json").exists()


@pytest.mark.parametrize(("privacy", "fault"), [("none", "wrong_shape"),
                                               ("secagg", "missing_array")])
def test_with_partial_rounds_a_malformed_reply_is_left_out_of_the_sum(make_cfg, tmp_path,
                                                                      privacy, fault):
    """Plain: the reply is dropped. SecAgg+: the bad vector is never added, and its pairwise
    masks are rebuilt from its neighbours' key shares as for a site that dropped out."""
    cfg = make_cfg(*TOLERANT, f"privacy={privacy}")
    run(cfg, output_dir=tmp_path, client_mods=(
        make_bad_reply_mod(site=1, server_round=1, fault=fault),))
    metrics = _metrics(tmp_path)
    assert [m["num_sites"] for m in metrics[:2]] == [3, 4]
    model = json.loads((tmp_path / "segments.json").read_text())
    assert model["scaling"]["count"] == _customers_without(1, num_customers=3000,
                                                          num_regions=4, seed=3)


def test_without_dropout_tolerance_a_malformed_masked_vector_halts_the_round(make_cfg,
                                                                             tmp_path):
    cfg = make_cfg(*SMALL, "privacy=secagg")
    with pytest.raises(ProtocolError) as info:
        run(cfg, output_dir=tmp_path, client_mods=(
            make_bad_reply_mod(site=2, server_round=2, fault="wrong_shape"),))
    message = str(info.value)
    assert "round 2 (init) produced no aggregate" in message
    assert "reply rejected, not aggregated: masked array #4 has shape" in message
    assert "Nothing is published" in message
    assert not (tmp_path / "segments.json").exists()
