"""The deployment ServerApp: composes the same Hydra tree as the simulation.

``flwr run . <connection> --run-config '...'`` carries only two keys: ``fedseg-overrides``
(space-separated Hydra overrides, the same meaning as on the simulation's command line) and
``fedseg-output-dir`` (empty: each run writes to its own ``outputs/flwr/<date>/<time>-run<id>/``).
No site path or site setting is ever part of it: sites read only their own node config
(:mod:`client.deploy`). The server needs only the public feature schema (``data``) and the
number of SuperNodes connected.

The rounds run on :class:`server.grid.FastPollGrid`, which answers a stage as soon as the last
reply lands instead of on Flower 1.42's fixed 3 s poll (docs/DEPLOYMENT.md, round latency).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from omegaconf import OmegaConf

from common.config import check_run_config, compose_config, instantiate_config
from common.errors import ConfigError, FedsegError
from server.app import run_federated_kmeans
from server.grid import FastPollGrid
from server.plan import plan_from_config
from server.progress import RoundProgress
from server.report import RunArtifacts, warnings_for, write_report_or_warn
from server.tracking import log_run_or_warn, require_mlflow

OVERRIDES_KEY = "fedseg-overrides"
OUTPUT_KEY = "fedseg-output-dir"


def run_output_dir(configured: str, run_id: int) -> Path:
    """Return the run's own output directory: the run config's, else a fresh one per run.

    ``fedseg-output-dir`` empty (the default) gives ``outputs/flwr/<date>/<time>-run<id>``, so
    no run overwrites another's model.
    """
    if configured:
        return Path(configured)
    return Path("outputs") / "flwr" / time.strftime("%Y-%m-%d") / \
        f"{time.strftime('%H-%M-%S')}-run{run_id}"


server_app = ServerApp()


@server_app.main()
def _server_main(grid: Grid, context: Context) -> None:
    cfg = compose_config(str(context.run_config.get(OVERRIDES_KEY, "")))
    check_run_config(cfg)
    if cfg.tracking.mlflow:
        require_mlflow()
    data = instantiate_config(cfg.data)
    grid = FastPollGrid(grid, poll_interval=float(cfg.federation.poll_interval))
    nodes = len(list(grid.get_node_ids()))
    num_sites = nodes if cfg.federation.num_sites is None else int(cfg.federation.num_sites)
    if num_sites > nodes:
        raise ConfigError(
            f"federation.num_sites={num_sites} but the federation has {nodes} SuperNodes "
            "connected; start every site's SuperNode before `flwr run`."
        )
    plan = plan_from_config(cfg, features=data.feature_specs(), num_sites=int(num_sites))
    try:
        with RoundProgress(total_rounds=plan.max_rounds, quiet=bool(cfg.quiet)) as progress:
            result = run_federated_kmeans(grid, context, plan, on_round=progress.on_round)
    except FedsegError as exc:
        print(f"[fedseg] run failed: {exc}", flush=True)
        raise
    assert result.model is not None
    out = run_output_dir(str(context.run_config.get(OUTPUT_KEY, "")), context.run_id)
    out.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, out / "config.resolved.yaml", resolve=True)
    result.model.to_json(out / "segments.json")
    with (out / "metrics.jsonl").open("w", encoding="utf-8") as handle:
        for record in result.coordinator.history:
            handle.write(json.dumps(record.to_dict()) + "\n")
    summary: dict[str, Any] = {
        "cost": result.coordinator.history[-1].cost, "rounds": len(result.coordinator.history),
        "seconds": result.seconds, "num_sites": plan.num_sites, "k": plan.settings.k,
        "secagg": plan.secagg is not None, "finished_at": time.time(),
        "sites": result.sites, "dropouts": result.dropouts,
        "converged": result.coordinator.converged,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    for segment in result.model.segments:
        print(f"[fedseg] {segment.name:<44} {segment.size:>7}", flush=True)
    for warning in warnings_for(RunArtifacts(model=result.model, summary=summary)):
        print(f"[fedseg] warning: {warning}", flush=True)
    report = write_report_or_warn(out, say=lambda line: print(f"[fedseg] {line}", flush=True))
    print(f"[fedseg] segment model: {(out / 'segments.json').resolve()}", flush=True)
    if report is not None:
        print(f"[fedseg] report: {report.resolve()}", flush=True)
    print(f"[fedseg] run directory: {out.resolve()} (segments.json, summary.json, "
          "metrics.jsonl, config.resolved.yaml, report.html)", flush=True)
    log_run_or_warn(out, cfg, say=lambda line: print(f"[fedseg] {line}", flush=True))
