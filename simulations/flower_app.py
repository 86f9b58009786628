"""Flower CLI entry points: ``flwr run .`` on a local simulation federation.

``pyproject.toml`` names :data:`server_app` and :data:`client_app` as the app's components.
Flower's run config -- chosen by whoever submits the run -- carries Hydra overrides for the
**server** (``fedseg-overrides``) and the server's output directory (``fedseg-output-dir``).
The sites never read it: each composes the same ``conf/`` tree with **its own** overrides
(environment ``FEDSEG_SITE_OVERRIDES``, or node config ``fedseg-site-overrides``) and writes its
audit log, site log and round ledger under its own directory (``FEDSEG_SITE_DIR`` or node config
``fedseg-site-dir``, default ``outputs/flwr-sites``). So a submitted run cannot switch a site's
privacy off, point it at another file or column, or move its logs (docs/SECURITY.md, attack 3).
Each simulated node takes the partition given by its ``partition-id``; the server never loads
any data (it only needs the public feature list and the number of nodes).
"""

from __future__ import annotations

import functools
import json
import os
import shlex
import time
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from client.app import SiteData, make_client_app
from common.config import register_configs
from common.errors import ConfigError
from server.app import run_federated_kmeans
from server.coordinator import RoundRecord
from simulations.datasets import PartitionedSites
from simulations.run import build_sites, plan_from_config, site_policy_from_config
from simulations.site_sources import open_gate

OVERRIDES_KEY = "fedseg-overrides"
OUTPUT_KEY = "fedseg-output-dir"
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


@functools.lru_cache(maxsize=4)
def compose_config(overrides: str) -> DictConfig:
    """Compose ``conf/config.yaml`` with space-separated Hydra overrides (cached per string)."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=shlex.split(overrides))


SITE_OVERRIDES_ENV, SITE_OVERRIDES_NODE = "FEDSEG_SITE_OVERRIDES", "fedseg-site-overrides"
SITE_DIR_ENV, SITE_DIR_NODE = "FEDSEG_SITE_DIR", "fedseg-site-dir"
SITE_CONTRACT_NODE = "fedseg-contract"
"""Node config: the site's data contract; its records are then read through its privacy gate."""
DEFAULT_SITE_DIR = "outputs/flwr-sites"


def _overrides(context: Context) -> str:
    """Return the server's Hydra overrides (from the run config; never read by a site)."""
    return str(context.run_config.get(OVERRIDES_KEY, ""))


def _site_setting(context: Context, node_key: str, env_key: str, default: str) -> str:
    """Return a site's own setting: its node config first, then its environment."""
    value = context.node_config.get(node_key)
    return str(value) if value is not None else os.environ.get(env_key, default)


@functools.lru_cache(maxsize=2)
def _sites(site_overrides: str, num_nodes: int) -> PartitionedSites:
    """Build every node's partition once per worker process (bounded cache, immutable keys)."""
    population, parts = build_sites(compose_config(site_overrides), default_num_sites=num_nodes)
    return PartitionedSites(parts=tuple(population.raw[p] for p in parts),
                            features=population.features)


@functools.lru_cache(maxsize=4)
def _site_app(site_overrides: str, site_dir: str) -> ClientApp:
    """Build the site's ClientApp from the site's own configuration only."""
    cfg = compose_config(site_overrides)
    policy = site_policy_from_config(cfg.site, secagg=None)

    def loader(context: Context) -> SiteData:
        contract = context.node_config.get(SITE_CONTRACT_NODE)
        if contract is not None:  # a site with its own data behind its privacy gate
            return open_gate(str(contract)).load().site
        sites = _sites(site_overrides, int(context.node_config.get("num-partitions", 0)))
        return sites(context)

    return make_client_app(loader, policy=policy, site_root=site_dir)


def _client_main(message: Message, context: Context) -> Message:
    """Dispatch to the site's app; nothing here depends on the run config."""
    site_overrides = _site_setting(context, SITE_OVERRIDES_NODE, SITE_OVERRIDES_ENV, "")
    site_dir = _site_setting(context, SITE_DIR_NODE, SITE_DIR_ENV, DEFAULT_SITE_DIR)
    return _site_app(site_overrides, site_dir)(message, context)


client_app = ClientApp()


@client_app.train()
def _train(message: Message, context: Context) -> Message:
    return _client_main(message, context)


@client_app.evaluate()
def _evaluate(message: Message, context: Context) -> Message:
    return _client_main(message, context)


@client_app.query()
def _query(message: Message, context: Context) -> Message:
    return _client_main(message, context)


server_app = ServerApp()


def run_output_dir(configured: str, run_id: int) -> Path:
    """Return the run's own output directory: the run config's, else a fresh one per run.

    ``fedseg-output-dir`` empty (the default) gives ``outputs/flwr/<date>/<time>-run<id>``, so
    no run overwrites another's model.
    """
    if configured:
        return Path(configured)
    return Path("outputs") / "flwr" / time.strftime("%Y-%m-%d") / \
        f"{time.strftime('%H-%M-%S')}-run{run_id}"


def _print_round(record: RoundRecord) -> None:
    cost = "" if record.cost is None else f" cost={record.cost:,.1f}"
    print(f"[fedseg] round {record.round:>2} {record.phase:<8} sites={record.num_sites}{cost} "
          f"{record.seconds:.2f}s", flush=True)


@server_app.main()
def _server_main(grid: Grid, context: Context) -> None:
    overrides = _overrides(context)
    cfg = compose_config(overrides)
    data = instantiate(cfg.data)
    nodes = len(list(grid.get_node_ids()))
    num_sites = nodes if cfg.federation.num_sites is None else int(cfg.federation.num_sites)
    if num_sites > nodes:
        raise ConfigError(
            f"federation.num_sites={num_sites} but the federation has {nodes} SuperNodes; "
            "every site must take part in every round."
        )
    plan = plan_from_config(cfg, features=data.feature_specs(), num_sites=int(num_sites))
    settings = plan.settings
    result = run_federated_kmeans(grid, context, plan, on_round=_print_round)
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
        "seconds": result.seconds, "num_sites": plan.num_sites, "k": settings.k,
        "secagg": plan.secagg is not None, "finished_at": time.time(),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    for segment in result.model.segments:
        print(f"[fedseg] {segment.name:<44} {segment.size:>7}", flush=True)
    print(f"[fedseg] segment model: {(out / 'segments.json').resolve()}", flush=True)
    print(f"[fedseg] run directory: {out.resolve()} (segments.json, summary.json, "
          "metrics.jsonl, config.resolved.yaml)", flush=True)
