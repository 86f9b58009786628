"""Optional experiment tracking with MLflow: params, per-round metrics, artefacts of a run.

Off by default. ``tracking.mlflow=true`` logs each finished run (simulation or deployed
server) to a local MLflow store -- an SQLite file, ``mlruns/mlflow.db`` under the working
directory unless ``tracking.uri`` names another (any MLflow tracking URI) -- with:

* **params**: the resolved configuration, flattened (``model.k``, ``privacy.epsilon``...);
* **metrics per round** (``step`` = round): cost, shift, sites reporting, seconds, bytes
  uploaded per site -- the server's aggregates only, as in ``metrics.jsonl``;
* **summary metrics**: ``ari_vs_truth``, ``cost_ratio``, ``rounds``, ``seconds``, ε spent...;
* **artefacts**: ``segments.json``, ``summary.json``, ``metrics.jsonl``, ``report.html``,
  ``config.resolved.yaml``.

Compare runs with ``mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db`` (the full
``mlflow`` package; fedseg installs only ``mlflow-skinny``, the logging client). Nothing a site
holds is logged: the same published files and aggregates as the run directory.
"""

from __future__ import annotations

import json
import math
import numbers
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from common.errors import ConfigError

ARTEFACTS = ("segments.json", "summary.json", "metrics.jsonl", "report.html",
             "config.resolved.yaml")
ROUND_METRICS = ("cost", "shift", "num_sites", "seconds", "bytes_uploaded_per_site",
                 "cpu_seconds_per_site")
SUMMARY_METRICS = ("ari_vs_truth", "ari_vs_centralized", "cost_ratio", "cost", "rounds",
                   "lloyd_rounds", "seconds", "segments_published", "num_customers",
                   "bytes_uploaded_per_site_round", "central_ari_vs_truth")
MAX_PARAM_LENGTH = 500
"""MLflow refuses longer parameter values; longer ones are cut with a marker."""


def default_uri(cwd: Path | None = None) -> str:
    """``sqlite:///<cwd>/mlruns/mlflow.db``: a local file store."""
    root = (cwd or Path.cwd()) / "mlruns"
    return f"sqlite:///{(root / 'mlflow.db').resolve()}"


def flatten(cfg: DictConfig | dict[str, Any]) -> dict[str, str]:
    """Flatten a config into ``a.b.c -> value`` strings (MLflow params)."""
    tree = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    flat: dict[str, str] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else str(key), value)
        else:
            text = json.dumps(node) if isinstance(node, (list, tuple)) else str(node)
            if len(text) > MAX_PARAM_LENGTH:
                text = text[:MAX_PARAM_LENGTH - 3] + "..."
            flat[prefix] = text

    walk("", tree)
    return flat


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def require_mlflow() -> None:
    """Refuse ``tracking.mlflow=true`` up front when MLflow's client is not installed."""
    try:
        import mlflow  # noqa: F401
    except ImportError as exc:
        raise ConfigError("tracking.mlflow=true needs MLflow's client: pip install "
                          "'mlflow-skinny' (fedseg's dev extra has it).") from exc


def log_run_or_warn(run_dir: str | Path, cfg: DictConfig, *, say: Any) -> str | None:
    """Log the run when ``tracking.mlflow`` is on; a failure is a warning, never a lost run."""
    if not bool(cfg.tracking.mlflow):
        return None
    uri = cfg.tracking.uri or default_uri()
    try:
        run_id = log_run(run_dir, cfg, uri=uri, experiment=str(cfg.tracking.experiment))
    except ConfigError:
        raise
    except Exception as exc:  # MLflow raises many kinds of errors; the run itself is done
        say(f"warning: MLflow logging failed ({type(exc).__name__}: {exc}); the run's "
            "outputs are complete.")
        return None
    say(f"mlflow: run {run_id} in experiment {cfg.tracking.experiment!r} at {uri}")
    return run_id


def log_run(run_dir: str | Path, cfg: DictConfig, *, uri: str | None = None,
            experiment: str = "fedseg", run_name: str | None = None) -> str:
    """Log a finished run directory to MLflow; return the MLflow run id.

    Raises
    ------
    ConfigError
        MLflow is not installed.
    """
    require_mlflow()
    import mlflow
    from mlflow.tracking import MlflowClient

    root = Path(run_dir)
    tracking_uri = uri or default_uri()
    if tracking_uri.startswith("sqlite:///"):
        Path(tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        location = None
        if tracking_uri.startswith("sqlite:///"):
            location = (Path(tracking_uri.removeprefix("sqlite:///")).parent /
                        "artifacts").resolve().as_uri()
        experiment_id = client.create_experiment(experiment, artifact_location=location)
    else:
        experiment_id = found.experiment_id
    run = client.create_run(experiment_id, run_name=run_name or root.name,
                            tags={"fedseg.run_dir": str(root.resolve())})
    run_id = run.info.run_id
    status = "FAILED"
    try:
        params = flatten(cfg)
        items = sorted(params.items())
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            batch = [mlflow.entities.Param(k, v) for k, v in items[start:start + 100]]
            client.log_batch(run_id, params=batch)
        metrics = []
        metrics_file = root / "metrics.jsonl"
        if metrics_file.is_file():
            for line in metrics_file.read_text(encoding="utf-8").splitlines():
                record = json.loads(line)
                for key in ROUND_METRICS:
                    value = _number(record.get(key))
                    if value is not None:
                        metrics.append(mlflow.entities.Metric(
                            f"round.{key}", value, 0, int(record["round"])))
        summary_file = root / "summary.json"
        if summary_file.is_file():
            summary = json.loads(summary_file.read_text(encoding="utf-8"))
            for key in SUMMARY_METRICS:
                value = _number(summary.get(key))
                if value is not None:
                    metrics.append(mlflow.entities.Metric(key, value, 0, 0))
            dp = summary.get("differential_privacy") or {}
            value = _number(dp.get("epsilon_spent"))
            if value is not None:
                metrics.append(mlflow.entities.Metric("epsilon_spent", value, 0, 0))
        for start in range(0, len(metrics), 1000):
            client.log_batch(run_id, metrics=metrics[start:start + 1000])
        for name in ARTEFACTS:
            if (root / name).is_file():
                client.log_artifact(run_id, str(root / name))
        status = "FINISHED"
    finally:
        client.set_terminated(run_id, status=status)
    return run_id
