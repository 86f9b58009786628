"""Flower CLI entry points: ``flwr run .`` on a local simulation federation.

``pyproject.toml`` names :data:`server_app` and :data:`client_app` as the app's components.
Flower's run config carries only Hydra overrides (``fedseg-overrides``) and an output
directory (``fedseg-output-dir``); both apps compose the same ``conf/`` tree with them, so a
setting means the same thing here as in ``python -m simulations.run``. Each simulated node
takes the partition given by its ``partition-id``; the server never loads any data (it only
needs the public feature list and the number of nodes).
"""

from __future__ import annotations

import functools
import json
import shlex
import time
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.client import Client
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.serverapp import Grid, ServerApp
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig

from client.app import SiteClient, require_secagg_mod
from client.audit import make_audit_mod
from common.config import register_configs
from common.errors import ConfigError
from server.app import run_federated_kmeans
from server.coordinator import RoundRecord
from simulations.datasets import PartitionedSites
from simulations.run import build_sites, plan_from_config

OVERRIDES_KEY = "fedseg-overrides"
OUTPUT_KEY = "fedseg-output-dir"
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


@functools.lru_cache(maxsize=4)
def compose_config(overrides: str) -> DictConfig:
    """Compose ``conf/config.yaml`` with space-separated Hydra overrides (cached per string)."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=shlex.split(overrides))


def _overrides(context: Context) -> str:
    return str(context.run_config.get(OVERRIDES_KEY, ""))


@functools.lru_cache(maxsize=2)
def _sites(overrides: str, num_nodes: int) -> PartitionedSites:
    """Build every node's partition once per worker process (bounded cache, immutable keys)."""
    population, parts = build_sites(compose_config(overrides), default_num_sites=num_nodes)
    return PartitionedSites(parts=tuple(population.raw[p] for p in parts),
                            features=population.features)


def _secagg(overrides: str) -> bool:
    return instantiate(compose_config(overrides).privacy) is not None


def _client_fn(context: Context) -> Client:
    overrides = _overrides(context)
    sites = _sites(overrides, int(context.node_config.get("num-partitions", 0)))
    return SiteClient(sites(context), context, secagg=_secagg(overrides)).to_client()


def _privacy_mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Apply the site's privacy configuration: SecAgg+ (and refuse plain rounds) or none."""
    overrides = _overrides(context)
    if not _secagg(overrides):
        return call_next(message, context)

    def with_secagg(msg: Message, ctx: Context) -> Message:
        return secaggplus_mod(msg, ctx, call_next)

    return require_secagg_mod(message, context, with_secagg)


def _audit_mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    out = Path(str(context.run_config.get(OUTPUT_KEY, "outputs/flwr-run"))) / "audit"
    mechanism = "secagg+" if _secagg(_overrides(context)) else "none"
    return make_audit_mod(out, mechanism=mechanism)(message, context, call_next)


client_app = ClientApp(client_fn=_client_fn, mods=[_audit_mod, _privacy_mod])
server_app = ServerApp()


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
    out = Path(str(context.run_config.get(OUTPUT_KEY, "outputs/flwr-run")))
    out.mkdir(parents=True, exist_ok=True)
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
