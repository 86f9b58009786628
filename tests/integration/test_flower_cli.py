"""``flwr run .`` against a real SuperLink process in simulation mode, started and stopped here.

The test starts ``flower-superlink --simulation`` itself on free loopback ports (its own state
database under ``tmp_path``), points a Flower connection profile at it, and stops exactly that
process by its PID afterwards -- never by name, so no other SuperLink on the host is touched.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.integration


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _wait_for_port(port: int, process: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"flower-superlink exited ({process.returncode}): "
                                 f"{log.read_text()[-2000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise AssertionError(f"flower-superlink did not listen on {port}: {log.read_text()[-2000:]}")


def _stop(process: subprocess.Popen) -> None:
    """Stop the SuperLink we started, and its children (its own process group), by PID."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=20)


def test_flwr_run_dot_builds_a_segment_model_with_secagg(tmp_path):
    bin_dir = Path(sys.executable).parent
    flwr, superlink = bin_dir / "flwr", bin_dir / "flower-superlink"
    assert flwr.is_file() and superlink.is_file(), "installed with flwr[simulation]"
    port, health = _free_ports(2)  # one HTTP port carries Control, Fleet and Runtime APIs
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "test"\n\n[superlink.test]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    sites, out = tmp_path / "sites", tmp_path / "out"
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           # Each site's own configuration: its data and its directory (never the run config).
           "FEDSEG_SITE_OVERRIDES": "data.num_customers=3000 data.num_regions=3",
           "FEDSEG_SITE_DIR": str(sites),
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    log = tmp_path / "superlink.log"
    with log.open("w") as log_handle:
        process = subprocess.Popen(
            [str(superlink), "--insecure", "--simulation", "--isolation", "subprocess",
             "--host", "127.0.0.1", "--port", str(port),
             "--health-server-address", f"127.0.0.1:{health}",
             "--database", str(tmp_path / "superlink.db")],
            cwd=ROOT, env=env, stdout=log_handle, stderr=subprocess.STDOUT,
            start_new_session=True)
    try:
        _wait_for_port(port, process, log)
        run_config = (f'fedseg-overrides="data.num_customers=3000 data.num_regions=3 '
                      f'model.k=4 strategy.n_init=2" fedseg-output-dir="{out}"')
        proc = subprocess.run(
            [str(flwr), "run", ".", "test", "--stream", "--run-config", run_config,
             "--federation-config", "num-supernodes=3"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=400, check=False)
    finally:
        _stop(process)
    assert process.returncode is not None  # ours is gone; nothing else was signalled
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    model = json.loads((out / "segments.json").read_text())
    assert (out / "config.resolved.yaml").is_file()
    assert model["privacy"]["secure_aggregation"] == "secagg+"
    assert len(model["segments"]) == 4
    assert sum(s["size"] for s in model["segments"]) > 2500
    assert sorted(p.name for p in (sites / "audit").glob("*.jsonl")) == [
        "site-0.jsonl", "site-1.jsonl", "site-2.jsonl"]
    assert not (out / "audit").exists()  # the run config does not place a site's logs
    assert "segment model:" in proc.stdout + proc.stderr
