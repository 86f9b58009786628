"""Real processes on 127.0.0.1: a SuperLink with TLS and SuperNode authentication, SuperNodes.

The PKI comes from ``fedseg-pki`` (common/pki.py); every process is stopped by its PID.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from common.pki import init_pki
from simulations.deployment import Deployment

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    federation = Deployment(tmp_path_factory.mktemp("deploy"))
    try:
        federation.start_superlink()
        yield federation
    finally:
        federation.stop()
        assert all(p.poll() is not None for p in federation.procs.values())


def test_a_registered_site_connects_over_tls(deployment: Deployment) -> None:
    deployment.site_key("north")
    registered = deployment.register("north")
    assert registered.returncode == 0, registered.stdout + registered.stderr
    assert "registered successfully" in registered.stdout
    deployment.start_supernode("north")
    assert deployment.wait_for("supernode-north", "SuperNode ID:", timeout=60), \
        deployment.log("supernode-north")[-2000:]


def test_an_unregistered_site_is_refused(deployment: Deployment) -> None:
    deployment.site_key("intruder")  # a valid key pair, never registered
    deployment.start_supernode("intruder", max_retries=1)
    assert deployment.wait_for("supernode-intruder", "Failed to activate SuperNode",
                               timeout=60), deployment.log("supernode-intruder")[-2000:]
    assert "SuperNode ID:" not in deployment.log("supernode-intruder")
    assert "No SuperNode found with the given public key" in deployment.log("superlink")


def test_a_node_without_the_ca_cannot_connect(deployment: Deployment, tmp_path: Path) -> None:
    other = init_pki(tmp_path / "other-pki")  # a CA the SuperLink's certificate is not from
    deployment.site_key("stranger")
    assert deployment.register("stranger").returncode == 0
    deployment.start_supernode("stranger", ca=other.ca_cert, max_retries=1)
    assert deployment.wait_for("supernode-stranger", "CERTIFICATE_VERIFY_FAILED",
                               timeout=60), deployment.log("supernode-stranger")[-2000:]
    assert "SuperNode ID:" not in deployment.log("supernode-stranger")


OVERRIDES = ["data.num_customers=900", "data.num_regions=3", "model.k=3", "privacy=secagg",
             "strategy.max_rounds=2", "strategy.init_rounds=1", "strategy.n_init=1"]


def test_a_real_deployment_equals_the_simulation(tmp_path: Path) -> None:
    """3 ``fedseg-supernode`` sites over TLS with auth, each on its own files behind its gate."""
    import json
    import subprocess

    import numpy as np
    from hydra import compose, initialize_config_dir

    from simulations.deployment import BIN
    from simulations.run import CONF_DIR, build_sites, run
    from simulations.site_sources import write_sites

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[*OVERRIDES, "centralized_reference=false"])
    population, parts = build_sites(cfg)
    contracts = write_sites(population, parts, sites_dir=tmp_path / "sites",
                            state_dir=tmp_path / "site-state")
    federation = Deployment(tmp_path / "deploy")
    try:
        federation.start_superlink()
        federation.start_sites(contracts, state_dir=tmp_path / "site-state",
                               site_overrides="site.require_dp=false")
        out = tmp_path / "deployed"
        run_config = f'fedseg-overrides="{" ".join(OVERRIDES)}" fedseg-output-dir="{out}"'
        result = subprocess.run([str(BIN / "flwr"), "run", ".", "local", "--stream",
                                 "--run-config", run_config],
                                cwd=Path(__file__).resolve().parents[2], env=federation.env,
                                capture_output=True, text=True, timeout=900, check=False)
        assert (out / "segments.json").is_file(), result.stdout[-3000:] + result.stderr[-2000:]
        # The same run submitted from an app bundle whose ClientApp is hostile: sites on
        # fedseg-supernode answer with the fedseg installed at the site, never the bundle's.
        hostile, marker = _hostile_app(tmp_path / "hostile-app"), tmp_path / "bundle-code-ran"
        hostile_out = tmp_path / "deployed-hostile"
        rerun = federation.flwr_run(
            f'fedseg-overrides="{" ".join(OVERRIDES)}" fedseg-output-dir="{hostile_out}"',
            app=hostile)
        assert rerun.completed, rerun.output[-3000:]
        assert not marker.exists()
        assert json.loads((hostile_out / "segments.json").read_text("utf-8"))["segments"] == \
            json.loads((out / "segments.json").read_text("utf-8"))["segments"]
        # The default privacy (SecAgg+ with site-held DP): fresh noise every run, so the model
        # is not compared bit for bit; it completes with DP recorded and plausible sizes.
        dp_out = tmp_path / "deployed-dp"
        dp_run = federation.flwr_run(
            f'fedseg-overrides="{" ".join(o for o in OVERRIDES if "privacy" not in o)}" '
            f'fedseg-output-dir="{dp_out}"')
        assert dp_run.completed, dp_run.output[-3000:]
        dp_model = json.loads((dp_out / "segments.json").read_text("utf-8"))
        assert dp_model["privacy"]["differential_privacy"]["epsilon_target"] == 1.0
        assert abs(sum(s["size"] for s in dp_model["segments"]) - 813) < 813 * 0.2
    finally:
        federation.stop()
    summary = json.loads((out / "summary.json").read_text("utf-8"))
    assert sorted(summary["sites"].values()) == ["site0", "site1", "site2"]  # registered names
    assert summary["dropouts"] == []
    assert (out / "config.resolved.yaml").is_file()
    # the deployed server writes the run report too: every segment, the sites by name
    report = (out / "report.html").read_text("utf-8")
    assert all(f"<td>{s['name']}</td>" in report
               for s in json.loads((out / "segments.json").read_text("utf-8"))["segments"])
    assert "Sites: site0, site1, site2" in report and "No site dropped out." in report
    simulated = tmp_path / "simulated"
    run(cfg, output_dir=simulated)
    deployed_model = json.loads((out / "segments.json").read_text("utf-8"))
    simulated_model = json.loads((simulated / "segments.json").read_text("utf-8"))
    assert deployed_model["scaling"]["count"] == simulated_model["scaling"]["count"] == 813.0
    np.testing.assert_allclose(deployed_model["scaling"]["mean"],
                               simulated_model["scaling"]["mean"], rtol=1e-9)
    def centroids(model: dict) -> np.ndarray:
        return np.array([[*s["centroid_scaled"], *s["centroid"].values()]
                         for s in model["segments"]])

    np.testing.assert_allclose(centroids(deployed_model), centroids(simulated_model),
                               rtol=1e-9)
    assert [s["size"] for s in deployed_model["segments"]] == \
        [s["size"] for s in simulated_model["segments"]]
    # each site's audit log, under its own directory, is intact
    from client.audit_chain import verify_chain

    logs = sorted((tmp_path / "site-state" / "audit").glob("site-*.jsonl"))
    assert [p.name for p in logs] == ["site-site0.jsonl", "site-site1.jsonl", "site-site2.jsonl"]
    assert all(verify_chain(p).ok for p in logs)
    # Real SuperNodes set up once per run (the log holds this test's runs): every later
    # round's keys rode on the previous round's unmask.
    for log in logs:
        entries = [json.loads(line) for line in log.read_text("utf-8").splitlines()]
        stages = [e["stage"] for e in entries]
        assert {e["round"] for e in entries if e["stage"] == "setup"} == {"1"}, stages
        assert stages.count("unmask+setup") == stages.count("collect_masked_vectors") > 1
        assert stages.count("setup") < stages.count("collect_masked_vectors") / 2


def _hostile_app(root: Path) -> Path:
    """A copy of the fedseg app whose submitted ClientApp would leave a marker and fail."""
    import shutil

    from simulations.deployment import REPO

    shutil.copytree(REPO, root, ignore=shutil.ignore_patterns(
        ".git", ".venv", "outputs", "multirun", "__pycache__", "*.egg-info", ".*_cache"))
    marker = root.parent / "bundle-code-ran"
    with (root / "simulations" / "flower_app.py").open("a", encoding="utf-8") as handle:
        handle.write(
            "\n\ndef _client_main(message, context):  # what a hostile operator ships\n"
            f"    Path({str(marker)!r}).write_text('the bundle ran at a site')\n"
            "    raise RuntimeError('hostile bundle')\n")
    text = (root / "simulations" / "flower_app.py").read_text("utf-8")
    if "from pathlib import Path" not in text:
        (root / "simulations" / "flower_app.py").write_text(
            text.replace("import functools\n", "import functools\nfrom pathlib import Path\n",
                         1), "utf-8")
    return root
