"""The simulation on an existing Ray cluster: a real Ray head on 127.0.0.1, stopped by PID."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from simulations.deployment import free_port
from tests.conftest import ROOT

pytestmark = pytest.mark.integration

RAY = Path(sys.executable).with_name("ray")


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``ray start --head --block`` on 127.0.0.1; SIGTERM to its PID stops the whole head."""
    port = free_port()
    log = tmp_path_factory.mktemp("ray-head") / "head.log"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    # Its own temp dir (short: Ray's socket paths must fit 107 bytes), so that the head's
    # ray_current_cluster file never lands in the machine's /tmp/ray for other Ray users.
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")
    with log.open("w", encoding="utf-8") as handle:
        head = subprocess.Popen(
            [str(RAY), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
             f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
             "--disable-usage-stats", f"--temp-dir={temp_dir}"],
            stdout=handle, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in log.read_text(encoding="utf-8"):
            assert head.poll() is None, log.read_text(encoding="utf-8")[-3000:]
            assert time.monotonic() < deadline, log.read_text(encoding="utf-8")[-3000:]
            time.sleep(0.5)
        yield f"127.0.0.1:{port}"
    finally:
        head.terminate()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait(timeout=30)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _cluster_jobs(address: str) -> int:
    """Drivers the cluster's GCS has seen (asked from a separate process)."""
    probe = subprocess.run(
        [sys.executable, "-c",
         "import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False); "
         "from ray._private.state import state; print(len(state.job_table()))", address],
        capture_output=True, text=True, timeout=120, check=False)
    assert probe.returncode == 0, probe.stderr[-2000:]
    return int(probe.stdout.strip().splitlines()[-1])


def test_the_simulation_runs_on_an_existing_ray_cluster(ray_head: str, tmp_path: Path):
    stale = Path("/tmp/ray/ray_current_cluster")
    stale_before = stale.read_text() if stale.is_file() else None
    before = _cluster_jobs(ray_head)
    proc = subprocess.run(
        [sys.executable, "-m", "simulations.run", f"federation.ray_address={ray_head}",
         "privacy=secagg", "data.num_customers=2000", "data.num_regions=3",
         "strategy.n_init=1", "centralized_reference=false", "quiet=true",
         f"hydra.run.dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=600,
        check=False, env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert f"on the Ray cluster at {ray_head}" in proc.stdout
    summary = json.loads((tmp_path / "summary.json").read_text(encoding="utf-8"))
    assert summary["ray_address"] == ray_head and summary["num_sites"] == 3
    assert (tmp_path / "segments.json").is_file()
    # the run was a driver of this cluster (the probe itself is one more)
    assert _cluster_jobs(ray_head) >= before + 2
    # and the head left no "current cluster" behind for other local Ray users
    assert (stale.read_text() if stale.is_file() else None) == stale_before


def test_a_local_run_never_joins_a_cluster_named_in_ray_current_cluster(tmp_path: Path):
    """A stale /tmp/ray/ray_current_cluster (a `ray start` long stopped) is not followed."""
    stale = Path("/tmp/ray/ray_current_cluster")
    saved = stale.read_text() if stale.is_file() else None
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_text(f"127.0.0.1:{free_port()}")  # nothing listens there
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "simulations.run", "privacy=none",
             "data.num_customers=1500", "data.num_regions=3", "strategy.n_init=1",
             "centralized_reference=false", "quiet=true", f"hydra.run.dir={tmp_path}"],
            cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
            env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"})
    finally:
        if saved is None:
            stale.unlink(missing_ok=True)
        else:
            stale.write_text(saved)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert (tmp_path / "segments.json").is_file()
