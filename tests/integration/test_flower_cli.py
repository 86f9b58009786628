"""``flwr run .`` against a local simulation federation (a real local SuperLink process)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.integration


def test_flwr_run_dot_builds_a_segment_model_with_secagg(tmp_path):
    flwr = Path(sys.executable).parent / "flwr"
    assert flwr.is_file(), "the flwr CLI is installed with flwr[simulation]"
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n'
        "options.num-supernodes = 3\n"
    )
    out = tmp_path / "out"
    sites = tmp_path / "sites"
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0",
           # Each site's own configuration: its data and its directory (never the run config).
           "FEDSEG_SITE_OVERRIDES": "data.num_customers=3000 data.num_regions=3",
           "FEDSEG_SITE_DIR": str(sites),
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "PATH": f"{flwr.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    run_config = (f'fedseg-overrides="data.num_customers=3000 data.num_regions=3 model.k=4 '
                  f'strategy.n_init=2" fedseg-output-dir="{out}"')
    try:
        proc = subprocess.run([str(flwr), "run", ".", "--stream", "--run-config", run_config],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=400,
                              check=False)
    finally:
        # `flwr run` leaves its local SuperLink running detached; stop exactly ours.
        if shutil.which("pkill"):
            subprocess.run(["pkill", "-f", f"flower-superlink.*{home}"], check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    model = json.loads((out / "segments.json").read_text())
    assert model["privacy"]["secure_aggregation"] == "secagg+"
    assert len(model["segments"]) == 4
    assert sum(s["size"] for s in model["segments"]) > 2500
    assert sorted(p.name for p in (sites / "audit").glob("*.jsonl")) == [
        "site-0.jsonl", "site-1.jsonl", "site-2.jsonl"]
    assert not (out / "audit").exists()  # the run config does not place a site's logs
    assert "segment model:" in proc.stdout + proc.stderr
