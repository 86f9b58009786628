"""MLflow tracking against a real local MLflow store (SQLite file): what is logged, and not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from common.config import compose_config
from common.errors import ConfigError
from server.report import write_report
from server.tracking import ARTEFACTS, flatten, log_run, log_run_or_warn
from simulations.datasets import SyntheticCustomers
from tests.unit.test_report import _write_run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = _write_run(tmp_path_factory.mktemp("tracked"),
                      SyntheticCustomers(num_customers=2000, num_regions=3))
    summary = json.loads((root / "summary.json").read_text())
    summary.update({"ari_vs_truth": 0.91, "cost_ratio": 1.0012})
    (root / "summary.json").write_text(json.dumps(summary))
    write_report(root)
    return root


def test_a_run_is_logged_with_params_round_metrics_and_artefacts(run_dir: Path, tmp_path):
    uri = f"sqlite:///{tmp_path / 'ml' / 'mlflow.db'}"
    cfg = compose_config("model.k=4 privacy=secagg")
    run_id = log_run(run_dir, cfg, uri=uri, experiment="unit")
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.k"] == "4" and run.data.params["privacy.timeout"] == "120.0"
    assert run.data.metrics["ari_vs_truth"] == pytest.approx(0.91)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    costed = [m for m in metrics if m["cost"] is not None]
    history = client.get_metric_history(run_id, "round.cost")
    assert [(h.step, h.value) for h in history] == [(m["round"], m["cost"]) for m in costed]
    logged = {a.path for a in client.list_artifacts(run_id)}
    assert logged == {name for name in ARTEFACTS if (run_dir / name).is_file()}
    assert {"segments.json", "report.html"} <= logged
    # nothing else than the published files: no site directory, no customer file
    assert not any("sites" in path or path.endswith(".csv") for path in logged)


def test_tracking_is_off_by_default_and_says_where_it_logged(run_dir: Path, tmp_path):
    lines: list[str] = []
    assert log_run_or_warn(run_dir, compose_config(""), say=lines.append) is None
    assert lines == []
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = compose_config(f"tracking.mlflow=true tracking.uri={uri} tracking.experiment=e2")
    run_id = log_run_or_warn(run_dir, cfg, say=lines.append)
    assert run_id is not None and lines == [f"mlflow: run {run_id} in experiment 'e2' at {uri}"]


def test_a_tracking_store_that_fails_is_a_warning_not_a_lost_run(run_dir: Path, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    cfg = compose_config(f"tracking.mlflow=true tracking.uri=sqlite:///{blocker}/x/mlflow.db")
    lines: list[str] = []
    assert log_run_or_warn(run_dir, cfg, say=lines.append) is None
    assert len(lines) == 1 and lines[0].startswith("warning: MLflow logging failed")
    assert (run_dir / "segments.json").is_file()


def test_params_are_flattened_and_long_values_cut():
    flat = flatten({"a": {"b": 1, "c": [1, 2]}, "d": "x" * 600})
    assert flat["a.b"] == "1" and flat["a.c"] == "[1, 2]"
    assert len(flat["d"]) == 500 and flat["d"].endswith("...")


def test_an_unknown_tracking_key_fails_at_compose_time():
    with pytest.raises(ConfigError, match="mlfow"):
        compose_config("tracking.mlfow=true")
