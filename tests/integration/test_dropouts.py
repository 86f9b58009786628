"""Sites that die mid-run, as real OS processes: SIGKILL SuperNodes during SecAgg+ rounds.

One federation of 4 sites (SuperLink with TLS and SuperNode authentication, 4
``fedseg-supernode`` processes, each on its own site files behind its privacy gate) serves
every test here, in order; each test restarts the sites it killed. Every process is stopped
by its PID at the end.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.config import compose_config
from simulations.deployment import Deployment, FlwrRun
from simulations.run import build_sites
from simulations.site_sources import write_sites

pytestmark = pytest.mark.integration

SITES = 4
DATA = f"data.num_customers=1200 data.num_regions={SITES} model.k=3"
SERVER = (f"{DATA} privacy=secagg strategy.max_rounds=3 strategy.init_rounds=1 "
          "strategy.n_init=1 privacy.timeout=15 privacy.stage_timeouts.setup=45")
"""SecAgg+ without DP (quicker); a site silent for 15 s in a stage (45 s at setup) has dropped
out. At setup a live SuperNode on a loaded 2-core CI machine once took over 20 s to answer (its
ClientApp process starts per message), which failed a run that killed only one other site."""
SITE_POLICY = "site.require_dp=false site.tolerate_dropouts=true"
KILL_AFTER_ROUND = 2


class Federation:
    """The 4-site deployment shared by the tests of this module."""

    def __init__(self, root: Path) -> None:
        cfg = compose_config(f"{DATA} centralized_reference=false")
        population, parts = build_sites(cfg)
        self.contracts = write_sites(population, parts, sites_dir=root / "sites",
                                     state_dir=root / "site-state")
        self.root = root
        self.deployment = Deployment(root / "deploy")
        self.deployment.start_superlink()
        self.deployment.start_sites(self.contracts, state_dir=root / "site-state",
                                    site_overrides=SITE_POLICY)
        self.runs = 0

    @staticmethod
    def name(i: int) -> str:
        return f"site{i}"

    def node_config(self, i: int) -> str:
        return self.deployment.node_config(self.contracts[i], self.name(i),
                                           self.root / "site-state", SITE_POLICY)

    def wait_online(self, sites: range | list[int]) -> None:
        for i in sites:
            assert self.deployment.wait_for(f"supernode-{self.name(i)}", "SuperNode ID:",
                                            timeout=120), \
                self.deployment.log(f"supernode-{self.name(i)}")[-2000:]

    def restart(self, sites: list[int]) -> None:
        for i in sites:
            self.deployment.restart_supernode(self.name(i), node_config=self.node_config(i))
        self.wait_online(sites)

    def run(self, extra: str = "", *, kill: list[int] = ()) -> tuple[FlwrRun, Path]:
        """``flwr run`` the app; SIGKILL the ``kill`` sites once round 2 is done."""
        self.runs += 1
        out = self.root / f"run-{self.runs}"
        fired = threading.Event()

        def on_line(line: str) -> None:
            if kill and not fired.is_set() and f"round {KILL_AFTER_ROUND:>2} " in line:
                fired.set()
                for i in kill:
                    self.deployment.kill(f"supernode-{self.name(i)}")

        result = self.deployment.flwr_run(
            f'fedseg-overrides="{SERVER} {extra}" fedseg-output-dir="{out}"', timeout=600,
            on_line=on_line)
        assert not kill or fired.is_set(), result.output[-3000:]
        return result, out


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    fed = None
    try:
        fed = Federation(tmp_path_factory.mktemp("dropouts"))
        yield fed
    finally:
        if fed is not None:
            fed.deployment.stop()
            assert all(p.poll() is not None for p in fed.deployment.procs.values())


def test_a_site_killed_mid_run_stops_it_named_and_nothing_is_published(federation):
    result, out = federation.run(kill=[3])
    failure = "\n".join(line for line in result.output.splitlines() if "run failed" in line)
    assert result.status == "finished:failed", result.output[-3000:]
    assert "site 'site3'" in failure, result.output[-3000:]
    assert "Nothing is published" in result.output
    assert not (out / "segments.json").exists()
    # the site comes back: the next run takes all four sites
    federation.restart([3])
    result, out = federation.run()
    assert result.completed, result.output[-3000:]
    summary = json.loads((out / "summary.json").read_text("utf-8"))
    assert summary["num_sites"] == SITES and summary["dropouts"] == []
    assert sorted(summary["sites"].values()) == [f"site{i}" for i in range(SITES)]


def test_with_partial_rounds_the_run_completes_with_three_and_records_the_dropout(federation):
    result, out = federation.run("strategy.accept_partial_rounds=true", kill=[1])
    assert result.completed, result.output[-3000:]
    summary = json.loads((out / "summary.json").read_text("utf-8"))
    assert {d["site"] for d in summary["dropouts"]} == {"site1"}
    assert min(d["round"] for d in summary["dropouts"]) == KILL_AFTER_ROUND + 1
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["num_sites"] for m in metrics][:KILL_AFTER_ROUND] == [SITES] * KILL_AFTER_ROUND
    assert all(m["num_sites"] == SITES - 1 for m in metrics[KILL_AFTER_ROUND:])
    assert (out / "segments.json").is_file()
    federation.restart([1])


def test_three_of_four_killed_is_a_clear_failure(federation):
    result, out = federation.run("strategy.accept_partial_rounds=true", kill=[0, 1, 2])
    failure = "\n".join(line for line in result.output.splitlines() if "run failed" in line)
    assert result.status == "finished:failed", result.output[-3000:]
    assert "Nothing is published" in failure, result.output[-3000:]
    # The round halts as soon as too few sites remain: the sites it names are killed ones (a
    # site killed a moment later may still have answered that stage).
    named = set(re.findall(r"site '(site\d)'", failure))
    assert named and named <= {"site0", "site1", "site2"}, failure
    assert not (out / "segments.json").exists()
