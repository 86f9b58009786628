"""Differential privacy in real Flower simulations (SecAgg+ on): spend, ledgers, refusals."""

from __future__ import annotations

import json

import pytest
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from flwr.simulation import run_simulation

from client.app import make_client_app
from common.errors import ProtocolError
from server.app import RunResult, make_server_app
from simulations.datasets import PartitionedSites
from simulations.run import build_sites, plan_from_config, run, site_policy_from_config

pytestmark = pytest.mark.integration

SMALL = ("data.num_customers=4000", "data.num_regions=3", "model.k=3", "seed=2")


def _direct_epsilon(multipliers: list[float], delta: float) -> float:
    accountant = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-3)
    for m in multipliers:
        accountant.compose(dp_event.GaussianDpEvent(m))
    return float(accountant.get_epsilon(delta))


def test_a_dp_run_records_what_it_spent_everywhere(make_cfg, tmp_path):
    summary = run(make_cfg(*SMALL), output_dir=tmp_path)
    dp = summary["differential_privacy"]
    assert dp["epsilon_target"] == 1.0 and dp["delta"] == 1e-6
    planned = sum(dp["rounds"].values())
    assert planned == 7  # moments, 2 init, 3 Lloyd, profile (conf/privacy/secagg_dp.yaml)
    assert 0.99 <= dp["epsilon_spent"] <= 1.0 and dp["rounds_released"] == planned
    model = json.loads((tmp_path / "segments.json").read_text())
    assert model["privacy"]["differential_privacy"]["epsilon_spent"] == dp["epsilon_spent"]
    assert all(s["std"] == {} for s in model["segments"])  # raw spreads are not released
    for site in range(3):
        ledger = [json.loads(line) for line in
                  (tmp_path / "site-state" / f"site-{site}-privacy.jsonl").read_text()
                  .splitlines()]
        multipliers = [e["noise_multiplier"] for e in ledger]
        assert len(multipliers) == planned
        # The site's own accountant equals dp_accounting on the same mechanism list.
        direct = _direct_epsilon(multipliers, 1e-6)
        assert ledger[-1]["epsilon_after"] == pytest.approx(direct, rel=1e-5)
        assert summary["site_privacy"][f"site-{site}"]["epsilon_spent"] == \
            pytest.approx(direct, rel=1e-5)
        audit = [json.loads(line) for line in
                 (tmp_path / "audit" / f"site-{site}.jsonl").read_text().splitlines()]
        sent = [e for e in audit if e["stage"] == "collect_masked_vectors"]
        assert len(sent) == planned and all(e["privacy"]["epsilon_spent"] > 0 for e in sent)
        assert sent[-1]["privacy"]["epsilon_spent"] == pytest.approx(direct, rel=1e-5)
    # One fresh noise draw; twenty in-process draws of this set-up: median 1.001, worst 1.079.
    assert summary["cost_ratio"] < 1.15


def test_a_plan_beyond_the_sites_budget_is_refused_before_anything_starts(make_cfg, tmp_path):
    from common.errors import ConfigError

    with pytest.raises(ConfigError, match=r"beyond their budget site\.dp_epsilon=0\.5"):
        run(make_cfg(*SMALL, "site.dp_epsilon=0.5"), output_dir=tmp_path)
    assert not (tmp_path / "audit").exists()


def test_a_server_that_keeps_asking_past_the_budget_gets_refusals(make_cfg, tmp_path):
    """Sites with a lifetime budget of 1.3 answer one run of epsilon=1; a second is refused."""
    cfg = make_cfg(*SMALL, "site.dp_epsilon=1.3")
    population, parts = build_sites(cfg)
    plan = plan_from_config(cfg, features=population.features, num_sites=len(parts))
    policy = site_policy_from_config(cfg.site, secagg=True, dp=(1.0, 1e-6))
    sites = tmp_path / "sites"  # the sites' own directory, kept between runs
    client_app = make_client_app(
        PartitionedSites(parts=tuple(population.raw[p] for p in parts),
                         features=population.features),
        policy=policy, site_root=str(sites))
    backend = {"client_resources": {"num_cpus": 1.0, "num_gpus": 0.0},
               "init_args": {"log_to_driver": False, "include_dashboard": False}}
    results: list[RunResult] = []
    run_simulation(server_app=make_server_app(plan, on_result=results.append),
                   client_app=client_app, num_supernodes=len(parts), backend_config=backend)
    assert len(results) == 1 and results[0].model is not None
    ledgers = sorted((sites / "site-state").glob("site-*-privacy.jsonl"))
    before = [p.read_text() for p in ledgers]
    assert len(ledgers) == 3 and all(len(t.splitlines()) == 7 for t in before)
    with pytest.raises(ProtocolError) as info:
        run_simulation(server_app=make_server_app(plan, on_result=results.append),
                       client_app=client_app, num_supernodes=len(parts),
                       backend_config=backend)
    message = str(info.value)
    assert "round 1 (moments) produced no aggregate" in message
    assert "fedseg-site-error budget" in message and "Nothing is published" in message
    assert [p.read_text() for p in ledgers] == before  # nothing more was released
    logs = " ".join(p.read_text() for p in (sites / "site-logs").glob("site-*.log"))
    assert "site.dp_epsilon" in logs and "already spent" in logs


def test_a_dp_run_tolerating_a_dropout_publishes_with_the_planned_epsilon(make_cfg, tmp_path):
    """A site dies at round 2; with dropouts tolerated the others' noise still covers it."""
    from simulations.faults import make_dropout_mod

    cfg = make_cfg("data.num_customers=6000", "data.num_regions=4", "model.k=3", "seed=3",
                   "strategy.accept_partial_rounds=true", "site.tolerate_dropouts=true")
    summary = run(cfg, output_dir=tmp_path, client_mods=(
        make_dropout_mod(site=1, server_round=2, stage="collect_masked_vectors"),))
    dp = summary["differential_privacy"]
    assert 0.99 <= dp["epsilon_spent"] <= 1.0
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["num_sites"] for m in metrics[:3]] == [4, 3, 4]
    # Every site charged exactly what it computed: the dropped site missed round 2.
    for site in range(4):
        ledger = (tmp_path / "site-state" / f"site-{site}-privacy.jsonl").read_text().splitlines()
        assert len(ledger) == (6 if site == 1 else 7)
        assert json.loads(ledger[-1])["epsilon_after"] <= 1.0
