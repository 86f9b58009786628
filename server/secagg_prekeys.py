"""The next round's SecAgg+ set-up, sent inside this round's unmask request (server side).

Flower's SecAgg+ workflow runs four exchanges per round; the first (set-up) only sends every
sampled site the round's public parameters and collects two fresh public keys from each. The
sites already answer an unmask request at the end of every round, so fedseg's workflow puts the
parameters it expects the next round to use in that request; each site answers the set-up
right after its unmask shares (``client.secagg_prekeys``) and returns its next public keys in
the same reply. When the next round begins, Flower's set-up stage runs as always -- sampling,
computing the parameters, shuffling the neighbourhoods -- but its exchange is answered from
those keys (:class:`PrekeyedSetupGrid`) if, and only if, the round samples exactly the sites
that sent keys and the parameters equal the ones those sites checked and set up with.
Otherwise the set-up is sent as usual and the sites make fresh keys.

One exchange fewer per round: three instead of four, after the first round.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.serverapp import Grid

from common.protocol import NEXT_KEYS_RECORD, NEXT_SETUP_RECORD
from server.grid import DelegatingGrid

PUBLIC_KEY_BYTES = 32
"""Length of a raw X25519 public key (``common.secagg_primitives``)."""


def setup_parameters(num_samples: int, *, num_shares: int | float,
                     reconstruction_threshold: int | float, clipping_range: float,
                     quantization_range: int, modulus_range: int,
                     max_weight: float) -> dict[str, Any]:
    """Return the set-up parameters Flower 1.42's ``SecAggPlusWorkflow.setup_stage`` sends.

    The same rule as Flower's (a fraction of the sampled sites, made odd, at least 3; a
    threshold as a fraction of the shares, at least 2), without the stage key. A mismatch with
    what Flower then sends only costs the set-up exchange: :class:`PrekeyedSetupGrid` compares.
    """
    if isinstance(num_shares, float):
        shares = round(num_shares * num_samples)
        if shares < num_samples and shares & 1 == 0:
            shares += 1
        if shares <= 2:
            shares = num_samples
    else:
        shares = num_shares
    if isinstance(reconstruction_threshold, float):
        threshold = max(round(reconstruction_threshold * shares), 2)
    else:
        threshold = reconstruction_threshold
    return {
        Key.SAMPLE_NUMBER: num_samples,
        Key.SHARE_NUMBER: shares,
        Key.THRESHOLD: threshold,
        Key.CLIPPING_RANGE: clipping_range,
        Key.TARGET_RANGE: quantization_range,
        Key.MOD_RANGE: modulus_range,
        Key.MAX_WEIGHT: max_weight,
    }


@dataclass
class NextKeys:
    """Public keys the sites made for the next round, and the parameters they checked."""

    parameters: dict[str, Any]
    keys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)


class NextSetupGrid(DelegatingGrid):
    """Add the next round's set-up to every unmask request; collect the keys from the replies.

    Parameters
    ----------
    grid : flwr.serverapp.Grid
    parameters : dict
        :func:`setup_parameters` for the next round as expected now.
    """

    def __init__(self, grid: Grid, *, parameters: dict[str, Any]) -> None:
        super().__init__(grid)
        self.next = NextKeys(parameters=dict(parameters))

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Send with the next set-up attached; strip (and keep) the keys from the replies."""
        messages = list(messages)
        for msg in messages:  # Flower may share one content between messages: set once
            if NEXT_SETUP_RECORD not in msg.content.config_records:
                msg.content.config_records[NEXT_SETUP_RECORD] = ConfigRecord(
                    dict(self.next.parameters))
        replies = list(self.inner.send_and_receive(messages, timeout=timeout))
        for reply in replies:
            if reply.has_error() or NEXT_KEYS_RECORD not in reply.content.config_records:
                continue
            record = reply.content.config_records[NEXT_KEYS_RECORD]
            del reply.content[NEXT_KEYS_RECORD]
            pk1, pk2 = record.get(Key.PUBLIC_KEY_1), record.get(Key.PUBLIC_KEY_2)
            if isinstance(pk1, bytes) and isinstance(pk2, bytes) and \
                    len(pk1) == len(pk2) == PUBLIC_KEY_BYTES and pk1 != pk2:
                self.next.keys[int(reply.metadata.src_node_id)] = (pk1, pk2)
        return replies


class PrekeyedSetupGrid(DelegatingGrid):
    """Answer Flower's set-up exchange from keys the sites sent with the last unmask reply.

    Only when every set-up message names a site that sent keys, every site that sent keys is
    sampled, and the parameters are exactly those the sites set up with; otherwise the set-up
    goes out as usual (:attr:`used` tells which happened).

    Parameters
    ----------
    grid : flwr.serverapp.Grid
    prepared : NextKeys
    """

    def __init__(self, grid: Grid, *, prepared: NextKeys) -> None:
        super().__init__(grid)
        self.prepared = prepared
        self.used = False

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Return the prepared keys as the sites' set-up replies, or send the set-up."""
        messages = list(messages)
        keys = self.prepared.keys
        targets = [int(m.metadata.dst_node_id) for m in messages]
        matches = bool(messages) and len(set(targets)) == len(targets) and \
            set(targets) == set(keys) and all(
                RECORD_KEY_CONFIGS in m.content.config_records and
                {k: v for k, v in m.content.config_records[RECORD_KEY_CONFIGS].items()
                 if k != Key.STAGE} == self.prepared.parameters
                for m in messages)
        if not matches:
            return self.inner.send_and_receive(messages, timeout=timeout)
        self.used = True
        return [Message(RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({
            Key.PUBLIC_KEY_1: keys[nid][0], Key.PUBLIC_KEY_2: keys[nid][1]})}), reply_to=msg)
            for nid, msg in zip(targets, messages, strict=True)]
