"""Fault injection for simulations: make a site drop out of a SecAgg+ round on purpose."""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key


class SiteDropout(RuntimeError):
    """Raised by the dropout mod to simulate a site that disappears mid-protocol."""


def make_dropout_mod(*, site: int, server_round: int, stage: str) -> Mod:
    """Return a mod that makes ``site`` fail at ``stage`` of SecAgg+ in ``server_round``.

    Parameters
    ----------
    site : int
        The simulated node's ``partition-id``.
    server_round : int
        Round (Flower group id) in which the site drops.
    stage : str
        SecAgg+ stage: ``setup``, ``share_keys``, ``collect_masked_vectors`` or ``unmask``.
    """

    def dropout_mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if (
            int(context.node_config.get("partition-id", -1)) == site
            and message.metadata.group_id == str(server_round)
            and message.has_content()
            and RECORD_KEY_CONFIGS in message.content.config_records
            and message.content.config_records[RECORD_KEY_CONFIGS].get(Key.STAGE) == stage
        ):
            raise SiteDropout(f"site {site} drops out at {stage} of round {server_round}")
        return call_next(message, context)

    return dropout_mod
