"""The next round's SecAgg+ set-up, answered together with this round's unmask request.

A SecAgg+ round is four exchanges (set-up, share keys, masked vectors, unmask); the set-up only
hands the site the round's public parameters and returns two fresh public keys. fedseg's server
sends the *next* round's set-up parameters inside this round's unmask request
(:data:`common.protocol.NEXT_SETUP_RECORD`); the site answers the unmask as always, then runs
the set-up stage on those parameters -- through its own guard (:mod:`client.secagg_guard`,
which checks them against the site's policy exactly as for a separate set-up message) and
Flower's ``secaggplus_mod`` (fresh key pairs) -- and returns the two public keys beside its
unmask shares (:data:`common.protocol.NEXT_KEYS_RECORD`). The next round then starts at the
share-keys stage: three exchanges per round instead of four.

Nothing else changes: the keys are generated once, for one round, after the previous round's
secrets were revealed; the private keys stay in the node's context as between any two stages.
A server that sends a separate set-up instead (its prediction of the next round did not hold)
simply gets fresh keys again. Parameters the site refuses end the exchange with an error: the
site then withholds this round's unmask shares too, as for any refused request.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from common.errors import SiteRefusal
from common.protocol import NEXT_KEYS_RECORD, NEXT_SETUP_RECORD

SETUP_KEYS = frozenset({Key.SAMPLE_NUMBER, Key.SHARE_NUMBER, Key.THRESHOLD, Key.CLIPPING_RANGE,
                        Key.TARGET_RANGE, Key.MOD_RANGE, Key.MAX_WEIGHT})
"""The set-up parameters Flower's SecAgg+ workflow sends (and nothing else rides along)."""


def carries_next_setup(message: Message) -> bool:
    """Return True when ``message`` carries the next round's set-up parameters."""
    return (message.metadata.message_type == MessageType.TRAIN and message.has_content()
            and NEXT_SETUP_RECORD in message.content.config_records)


def next_setup_mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Answer an unmask request, then the next round's set-up riding on it, in one reply.

    Place it before the site's SecAgg+ guard, so that both requests pass the guard and
    Flower's ``secaggplus_mod`` in order. Any other message passes through unchanged.
    """
    if not carries_next_setup(message):
        return call_next(message, context)
    content = message.content
    configs = content.config_records.get(RECORD_KEY_CONFIGS)
    if configs is None or configs.get(Key.STAGE) != Stage.UNMASK:
        raise SiteRefusal("secagg", "the next round's set-up may ride only on an unmask "
                          "request.")
    nxt = content.config_records[NEXT_SETUP_RECORD]
    if set(nxt.keys()) != SETUP_KEYS:
        raise SiteRefusal("secagg", f"the next round's set-up carries {sorted(nxt.keys())}; "
                          f"expected exactly {sorted(SETUP_KEYS)}.")
    parameters = {key: nxt[key] for key in SETUP_KEYS}
    del content[NEXT_SETUP_RECORD]
    reply = call_next(message, context)
    if reply.has_error():
        return reply
    # The same request, now asking for the set-up stage (its metadata names this site).
    message.content = RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(
        {Key.STAGE: Stage.SETUP, **parameters})})
    keys = call_next(message, context)
    if keys.has_error() or RECORD_KEY_CONFIGS not in keys.content.config_records:
        raise SiteRefusal("secagg", "the next round's set-up produced no public keys.")
    reply.content.config_records[NEXT_KEYS_RECORD] = ConfigRecord(
        dict(keys.content.config_records[RECORD_KEY_CONFIGS].items()))
    return reply
