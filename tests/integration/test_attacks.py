"""A deviating server against real sites in a real Flower simulation (SecAgg+ on): it gets nothing.

Attack 1 of the hardening issue: after one moments round, a server sends ``profile`` requests
with thousands of centres, each splitting the previous round's cells, and read customers' records
from the exact sums. A fedseg site checks each request against its policy and the run's plan
before computing: the request is refused, no masked vector leaves, and the operator sees only
the sites' error codes.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from common.errors import ProtocolError
from common.protocol import Phase
from server.coordinator import KMeansCoordinator
from simulations.run import run

pytestmark = pytest.mark.integration

# The exact-sum protocol (privacy=secagg): these attacks read exact sums; the DP default is
# attacked in test_dp_simulation.py.
SMALL = ("data.num_customers=2000", "data.num_regions=3", "model.k=3", "strategy.n_init=1",
         "strategy.init_rounds=1", "seed=4", "privacy=secagg")


class CellSplittingCoordinator(KMeansCoordinator):
    """Honest moments round, then ``profile`` requests of 3,510 centres (the recorded attack)."""

    def step(self, sums, *, server_round, num_sites):  # type: ignore[no-untyped-def]
        super().step(sums, server_round=server_round, num_sites=num_sites)
        if server_round == 1:
            self.phase = Phase.PROFILE
            rng = np.random.default_rng(0)
            self.centres = rng.normal(size=(3510, self.n_features))


def _factory(settings, features):
    def make() -> KMeansCoordinator:
        return CellSplittingCoordinator(settings=settings, features=features)

    return make


def _audit(out):
    return [json.loads(line) for f in sorted((out / "audit").glob("site-*.jsonl"))
            for line in f.read_text().splitlines()]


def test_a_cell_splitting_server_is_refused_and_learns_only_codes(make_cfg, tmp_path):
    cfg = make_cfg(*SMALL)
    from server.coordinator import KMeansSettings
    from simulations.datasets import synthetic_features

    settings = KMeansSettings(k=3, n_init=1, init_rounds=1, seed=4)
    with pytest.raises(ProtocolError) as info:
        run(cfg, output_dir=tmp_path,
            coordinator_factory=_factory(settings, synthetic_features()))
    message = str(info.value)
    assert "round 2 (profile) produced no aggregate" in message
    assert "fedseg-site-error protocol" in message and "Nothing is published" in message
    assert not (tmp_path / "segments.json").exists()
    entries = _audit(tmp_path)
    round2 = [e for e in entries if e["round"] == "2" and e["stage"] == "collect_masked_vectors"]
    assert len(round2) == 3 and all(e["error_code"] == "protocol" for e in round2)
    # No site sent a masked vector (or anything else with data) in the attack round.
    assert not any("masked_parameters" in json.dumps(e["configs"]) for e in entries
                   if e["round"] == "2")
    logs = [p.read_text() for p in (tmp_path / "site-logs").glob("site-*.log")]
    assert len(logs) == 3 and all("the plan allows [(7,), (7,), (3, 7)]" in log for log in logs)


def test_a_plan_beyond_the_site_policy_is_refused_at_the_first_round(make_cfg, tmp_path):
    cfg = make_cfg(*SMALL, "strategy.init_candidates=3510")
    with pytest.raises(ProtocolError, match=r"round 1 \(moments\).*fedseg-site-error policy"):
        run(cfg, output_dir=tmp_path)
    assert not (tmp_path / "segments.json").exists()
    logs = " ".join(p.read_text() for p in (tmp_path / "site-logs").glob("site-*.log"))
    assert "init_candidates=3510 exceeds this site's limit 200" in logs


def test_a_server_without_secagg_gets_no_plain_reply(make_cfg, tmp_path):
    # The server runs privacy=none; the sites' own policy requires SecAgg+.
    cfg = make_cfg(*SMALL, "privacy=none", "site.mechanism=secagg+")
    with pytest.raises(ProtocolError, match="fedseg-site-error protocol"):
        run(cfg, output_dir=tmp_path)
    entries = _audit(tmp_path)
    assert entries and all(e["has_error"] and not e["arrays"] for e in entries)
