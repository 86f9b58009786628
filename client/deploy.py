"""The deployment ClientApp: a site reads only its own data, through its own privacy gate.

Everything about a site comes from the site itself -- the node config its IT team gives
``fedseg-supernode`` / ``flower-supernode`` -- and nothing from the run the server submits:

``fedseg-contract``
    The site's data contract (source, key file, store; ``fedseg-site check`` validates it).
``fedseg-site-name``
    The stable name of the site's audit log and privacy ledger (default: the contract's
    ``site.name``).
``fedseg-site-dir``
    Where the site keeps its audit log, site log and privacy ledger (default
    ``FEDSEG_SITE_DIR``, else the contract's ``site.state_dir``, where ``fedseg-site audit
    verify`` and ``fedseg-site report`` look).
``fedseg-site-overrides``
    The site's own policy as Hydra overrides of ``conf/site`` (e.g. ``site.dp_epsilon=2``);
    a submitted run cannot switch a site's privacy off (docs/SECURITY.md, attack 3).

``fedseg-supernode`` (:mod:`client.supernode`) always answers with this app -- the fedseg
installed at the site -- whatever app bundle the server submits. ``flwr run .`` names
:mod:`simulations.flower_app`, which uses this app for a node with a contract and serves the
nodes of Flower's simulation engine (a ``partition-id``, no contract) itself.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from client.app import SiteData, make_client_app
from client.gate import open_gate
from client.site_files import SITE_NAME_NODE
from client.site_store import SiteStore
from common.config import compose_config
from common.dp import epsilon_spent
from common.errors import ConfigError
from common.site_policy import site_policy_from_config

SITE_CONTRACT_NODE = "fedseg-contract"
SITE_OVERRIDES_ENV, SITE_OVERRIDES_NODE = "FEDSEG_SITE_OVERRIDES", "fedseg-site-overrides"
SITE_DIR_ENV, SITE_DIR_NODE = "FEDSEG_SITE_DIR", "fedseg-site-dir"
DEFAULT_SITE_DIR = "outputs/flwr-sites"


def site_setting(context: Context, node_key: str, env_key: str, default: str) -> str:
    """Return a site's own setting: its node config first, then its environment."""
    value = context.node_config.get(node_key)
    return str(value) if value is not None else os.environ.get(env_key, default)


@functools.lru_cache(maxsize=4)
def contract_app(contract: str, site_overrides: str, site_dir: str) -> ClientApp:
    """Build the ClientApp of the site whose data contract is ``contract`` (once per process).

    The gate is opened here, so a wrong contract, key or store fails at the first message
    with the project's error rather than at every round.
    """
    cfg = compose_config(site_overrides)
    policy = site_policy_from_config(cfg.site, secagg=None)
    gate = open_gate(contract)

    def loader(context: Context) -> SiteData:
        return gate.load().site  # consent, erasures and the source, checked at every round

    def head_store(context: Context) -> SiteStore:
        return gate.store

    return make_client_app(loader, policy=policy, site_root=site_dir, head_store=head_store)


def _site_app_for(context: Context) -> ClientApp | None:
    """Return the app of the site whose contract the node config names (None: no contract).

    Fills in ``fedseg-site-name`` from the contract when the node config does not set it.
    """
    contract = context.node_config.get(SITE_CONTRACT_NODE)
    if contract is None:
        return None
    site_overrides = site_setting(context, SITE_OVERRIDES_NODE, SITE_OVERRIDES_ENV, "")
    declared = open_gate(str(contract)).contract
    context.node_config.setdefault(SITE_NAME_NODE, declared.site.name)
    site_dir = site_setting(context, SITE_DIR_NODE, SITE_DIR_ENV, str(declared.state_dir))
    return contract_app(str(contract), site_overrides, site_dir)


def prepare(node_config: dict[str, Any]) -> str:
    """Open the site's gate and read its data once, before the SuperNode connects.

    ``fedseg-supernode`` calls this at start, so a broken contract, key, store or source stops
    the service with the project's error (which file, row, column) instead of failing every
    round, and the first round pays neither for the first read nor for loading the DP
    accountant. Returns a one-line summary.
    """
    context = Context(run_id=0, node_id=0, node_config=dict(node_config), state=RecordDict(),
                      run_config={})
    if _site_app_for(context) is None:
        raise ConfigError(f"the node config has no '{SITE_CONTRACT_NODE}'; start the SuperNode "
                          f"with --node-config '{SITE_CONTRACT_NODE}=\"/path/contract.yaml\"' "
                          "(docs/SITE-GUIDE.md).")
    gated = open_gate(str(node_config[SITE_CONTRACT_NODE])).load()
    epsilon_spent([1.0], 1e-6)  # loads the DP accountant the first DP round would wait for
    return (f"site '{context.node_config[SITE_NAME_NODE]}': {gated.site.raw.shape[0]} "
            "customers with consent pass the privacy gate")


def _site_main(message: Message, context: Context) -> Message:
    """Answer one message with the site's own app; nothing here reads the run config."""
    app = _site_app_for(context)
    if app is not None:
        return app(message, context)
    raise ConfigError(
        f"this SuperNode has no '{SITE_CONTRACT_NODE}' in its node config: start it with "
        f"--node-config '{SITE_CONTRACT_NODE}=\"/path/to/contract.yaml\"' (docs/DEPLOYMENT.md)."
    )


client_app = ClientApp()


@client_app.train()
def _train(message: Message, context: Context) -> Message:
    return _site_main(message, context)


@client_app.evaluate()
def _evaluate(message: Message, context: Context) -> Message:
    return _site_main(message, context)


@client_app.query()
def _query(message: Message, context: Context) -> Message:
    return _site_main(message, context)
