"""An Optuna study over k, rounds and restarts (``hydra/sweeper=tune``), as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

pytestmark = pytest.mark.integration

# test_cli's small simulation (2,000 customers in 3 regions, 3 sites), one init round; each
# trial's time is mostly its own Ray start (about 10 s of its 14 s here), so the study runs
# without SecAgg+ (privacy=none: the same federated BIC, from plain sums; SecAgg+ sums are exact
# too, and test_cli's sweep runs with them).
SMALL = ("data.num_customers=2000", "data.num_regions=3", "strategy.init_rounds=1",
         "centralized_reference=false")
# A small search space: both ends of every interval are allowed.
SPACE = {"model.k": (3, 4), "strategy.max_rounds": (3, 6), "strategy.n_init": (1, 2)}
TRIALS = 3


def _run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    return subprocess.run([sys.executable, "-m", "simulations.run", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


def test_an_optuna_study_tunes_k_rounds_and_restarts_on_the_federated_bic(tmp_path: Path):
    space = [f"{key}=int(interval({low},{high}))" for key, (low, high) in SPACE.items()]
    started = time.perf_counter()
    proc = _run("-m", "hydra/sweeper=tune", f"hydra.sweeper.n_trials={TRIALS}",
                "privacy=none", *SMALL, *space, f"hydra.sweep.dir={tmp_path}")
    seconds = time.perf_counter() - started
    assert proc.returncode == 0, proc.stderr[-3000:]

    results = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    assert results["name"] == "optuna"
    best = results["best_params"]
    assert set(best) == set(SPACE)
    for key, (low, high) in SPACE.items():
        assert isinstance(best[key], int) and low <= best[key] <= high, (key, best[key])

    # one simulation per trial, each returning the federated BIC it wrote to summary.json
    summaries = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("*/summary.json"))]
    assert len(summaries) == TRIALS
    objectives = [s["objective"] for s in summaries]
    assert all(o["name"] == "bic" and o["value"] is not None for o in objectives)
    assert results["best_value"] == pytest.approx(max(o["value"] for o in objectives))
    # the best trial's own run is the one with that value, at the k Optuna reports
    winner = max(summaries, key=lambda s: s["objective"]["value"])
    assert winner["k"] == best["model.k"]
    # the sweep's k comparison scores the same runs with the same BIC
    compared = json.loads((tmp_path / "k_selection.json").read_text())["runs"]
    assert sorted(r["bic"] for r in compared) == pytest.approx(
        sorted(o["value"] for o in objectives))
    assert "Best parameters" in proc.stdout + proc.stderr
    print(f"{TRIALS} trials in {seconds:.1f}s: best {best}, BIC {results['best_value']:.1f}")


def test_a_study_on_the_federated_bic_under_dp_is_refused_before_the_first_round(tmp_path):
    proc = _run("-m", "hydra/sweeper=tune", "hydra.sweeper.n_trials=2", *SMALL,
                f"hydra.sweep.dir={tmp_path}", timeout=120)
    assert proc.returncode == 2
    assert "objective=bic" in proc.stderr and "privacy=secagg" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.glob("*/segments.json"))
    assert "starting Flower" not in proc.stdout
