"""The apps ``flwr run .`` submits (``pyproject.toml``): a local simulation, or a deployment.

:data:`server_app` is the deployment ServerApp, :data:`server.deploy.server_app`.
:data:`client_app` answers a node that has a data contract (``fedseg-contract`` in its node
config: a real site on ``flower-supernode``) with :data:`client.deploy.client_app`, and a
node of Flower's simulation engine (a ``partition-id``, no contract) with
:func:`simulated_site_app`, which builds the population from the site's own configuration and
takes the node's partition. A site on ``fedseg-supernode`` never runs this module: it answers
with the fedseg installed at the site (:mod:`client.supernode`).

The sites never read the run config: each composes the same ``conf/`` tree with **its own**
overrides (environment ``FEDSEG_SITE_OVERRIDES``, or node config ``fedseg-site-overrides``) and
writes its audit log, site log and round ledger under its own directory (``FEDSEG_SITE_DIR`` or
node config ``fedseg-site-dir``). So a submitted run cannot switch a site's privacy off, point it at
another file or column, or move its logs (docs/SECURITY.md, attack 3).
"""

from __future__ import annotations

import functools

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client import deploy
from client.app import SiteData, make_client_app
from common.config import compose_config
from common.site_policy import site_policy_from_config
from server.deploy import run_output_dir, server_app
from simulations.datasets import PartitionedSites
from simulations.run import build_sites

__all__ = ["client_app", "run_output_dir", "server_app", "simulated_site_app"]


@functools.lru_cache(maxsize=2)
def _sites(site_overrides: str, num_nodes: int) -> PartitionedSites:
    """Build every node's partition once per worker process (bounded cache, immutable keys)."""
    population, parts = build_sites(compose_config(site_overrides), default_num_sites=num_nodes)
    return PartitionedSites(parts=tuple(population.raw[p] for p in parts),
                            features=population.features)


@functools.lru_cache(maxsize=4)
def simulated_site_app(site_overrides: str, site_dir: str) -> ClientApp:
    """Build a simulated site's ClientApp from the site's own configuration only."""
    cfg = compose_config(site_overrides)
    policy = site_policy_from_config(cfg.site, secagg=None)

    def loader(context: Context) -> SiteData:
        sites = _sites(site_overrides, int(context.node_config.get("num-partitions", 0)))
        return sites(context)

    return make_client_app(loader, policy=policy, site_root=site_dir)


def _client_main(message: Message, context: Context) -> Message:
    """Dispatch to the site's app; nothing here depends on the run config."""
    if deploy.SITE_CONTRACT_NODE in context.node_config:
        return deploy.client_app(message, context)
    site_overrides = deploy.site_setting(context, deploy.SITE_OVERRIDES_NODE,
                                         deploy.SITE_OVERRIDES_ENV, "")
    site_dir = deploy.site_setting(context, deploy.SITE_DIR_NODE, deploy.SITE_DIR_ENV,
                                   deploy.DEFAULT_SITE_DIR)
    return simulated_site_app(site_overrides, site_dir)(message, context)


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
