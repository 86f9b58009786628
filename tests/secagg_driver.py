"""Play the server's side of Flower's SecAgg+ exchange by hand, so a test can lie at any stage.

The sites are real ClientApps (their mods, their SiteClient, Flower's ``secaggplus_mod``); only
the server is scripted. Messages are built exactly as Flower 1.42's ``SecAggPlusWorkflow``
builds them (``flwr/server/workflow/secure_aggregation/secaggplus_workflow.py``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, Metadata, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import FitIns, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat as compat

from common.protocol import NEXT_KEYS_RECORD, NEXT_SETUP_RECORD
from common.secure_sum import CLIPPING_RANGE, MAX_WEIGHT, MODULUS_RANGE, quantization_range_for


class SecAggDriver:
    """A scripted SecAgg+ server talking to real site ClientApps (node ids 101, 102, ...)."""

    def __init__(self, apps: Sequence[ClientApp], *, round_id: str = "1") -> None:
        self.nodes = [101 + i for i in range(len(apps))]
        self.apps = dict(zip(self.nodes, apps, strict=True))
        self.contexts = {
            nid: Context(run_id=7, node_id=nid,
                         node_config={"partition-id": i, "num-partitions": len(apps)},
                         state=RecordDict(), run_config={})
            for i, nid in enumerate(self.nodes)
        }
        self.round_id = round_id
        self.sent = 0
        self.public_keys: dict[int, list[bytes]] = {}
        self.ciphertexts: dict[int, dict[int, bytes]] = {}
        self.next_keys: dict[int, list[bytes]] = {}

    def send(self, nid: int, configs: dict[str, Any], content: RecordDict | None = None
             ) -> Message:
        """Send one SecAgg+ stage message to ``nid`` and return its reply."""
        body = RecordDict() if content is None else content
        body.config_records[RECORD_KEY_CONFIGS] = ConfigRecord(configs)  # type: ignore[arg-type]
        self.sent += 1
        metadata = Metadata(run_id=7, message_id=f"m{self.sent}", src_node_id=1,
                            dst_node_id=nid, reply_to_message_id="", group_id=self.round_id,
                            created_at=time.time(), ttl=3600.0,
                            message_type=MessageType.TRAIN)
        msg = Message(content=body, metadata=metadata)
        return self.apps[nid](msg, self.contexts[nid])

    def setup(self, *, share_num: int, threshold: int, sample_num: int | None = None,
              target_range: int | None = None) -> dict[int, Message]:
        """Stage 0: parameters; remembers the public keys of the sites that answered."""
        n = len(self.nodes) if sample_num is None else sample_num
        cfg = {Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: n, Key.SHARE_NUMBER: share_num,
               Key.THRESHOLD: threshold, Key.CLIPPING_RANGE: CLIPPING_RANGE,
               Key.TARGET_RANGE: target_range or quantization_range_for(max(n, 2)),
               Key.MOD_RANGE: MODULUS_RANGE, Key.MAX_WEIGHT: MAX_WEIGHT}
        replies = {nid: self.send(nid, dict(cfg)) for nid in self.nodes}
        for nid, reply in replies.items():
            if not reply.has_error():
                rec = reply.content.config_records[RECORD_KEY_CONFIGS]
                self.public_keys[nid] = [rec[Key.PUBLIC_KEY_1], rec[Key.PUBLIC_KEY_2]]
        return replies

    def share_keys(self, neighbourhoods: dict[int, dict[int, list[bytes]]] | None = None
                   ) -> dict[int, Message]:
        """Stage 1: forward public keys (everyone's by default); route the encrypted shares."""
        replies = {}
        for nid in self.nodes:
            keys = (neighbourhoods or {}).get(nid, self.public_keys)
            cfg: dict[str, Any] = {Key.STAGE: Stage.SHARE_KEYS}
            cfg.update({str(other): pair for other, pair in keys.items()})
            replies[nid] = self.send(nid, cfg)
        for src, reply in replies.items():
            if reply.has_error():
                continue
            rec = reply.content.config_records[RECORD_KEY_CONFIGS]
            for dst, ctxt in zip(rec[Key.DESTINATION_LIST], rec[Key.CIPHERTEXT_LIST],
                                 strict=True):
                self.ciphertexts.setdefault(int(dst), {})[src] = ctxt
        return replies

    def collect(self, arrays: list[np.ndarray], config: dict[str, Any]) -> dict[int, Message]:
        """Stage 2: the fit instruction plus the shares addressed to each site."""
        replies = {}
        for nid in self.nodes:
            fitins = FitIns(ndarrays_to_parameters(arrays), dict(config))
            content = compat.fitins_to_recorddict(fitins, keep_input=True)
            incoming = self.ciphertexts.get(nid, {})
            replies[nid] = self.send(nid, {
                Key.STAGE: Stage.COLLECT_MASKED_VECTORS,
                Key.CIPHERTEXT_LIST: list(incoming.values()),
                Key.SOURCE_LIST: list(incoming.keys())}, content)
        return replies

    def unmask(self, lists: dict[int, tuple[list[int], list[int]]],
               next_setup: dict[str, Any] | None = None) -> dict[int, Message]:
        """Stage 3: per site, the (active, dead) lists the server claims.

        ``next_setup``: the next round's set-up parameters, sent along as fedseg's server does
        (``server.secagg_prekeys``); the sites' next public keys are then remembered.
        """
        replies = {}
        for nid, (active, dead) in lists.items():
            content = None
            if next_setup is not None:
                content = RecordDict({NEXT_SETUP_RECORD: ConfigRecord(dict(next_setup))})
            replies[nid] = self.send(nid, {Key.STAGE: Stage.UNMASK,
                                           Key.ACTIVE_NODE_ID_LIST: active,
                                           Key.DEAD_NODE_ID_LIST: dead}, content)
        if next_setup is not None:
            self.next_keys = {
                nid: [r.content.config_records[NEXT_KEYS_RECORD][Key.PUBLIC_KEY_1],
                      r.content.config_records[NEXT_KEYS_RECORD][Key.PUBLIC_KEY_2]]
                for nid, r in replies.items()
                if not r.has_error() and NEXT_KEYS_RECORD in r.content.config_records}
        return replies

    def next_round(self, round_id: str) -> None:
        """Start the next round with the keys the sites sent in their last unmask replies."""
        self.round_id = round_id
        self.public_keys = dict(self.next_keys)
        self.ciphertexts = {}

    def setup_configs(self, *, share_num: int, threshold: int) -> dict[str, Any]:
        """The set-up parameters (no stage key) for every site of the driver."""
        n = len(self.nodes)
        return {Key.SAMPLE_NUMBER: n, Key.SHARE_NUMBER: share_num, Key.THRESHOLD: threshold,
                Key.CLIPPING_RANGE: CLIPPING_RANGE, Key.TARGET_RANGE: quantization_range_for(n),
                Key.MOD_RANGE: MODULUS_RANGE, Key.MAX_WEIGHT: MAX_WEIGHT}


def shares_for(reply: Message, owner: int) -> list[bytes]:
    """Key shares of ``owner`` in an unmask reply (the seed share first, then the key share)."""
    rec = reply.content.config_records[RECORD_KEY_CONFIGS]
    return [share for nid, share in zip(rec[Key.NODE_ID_LIST], rec[Key.SHARE_LIST], strict=True)
            if nid == owner]
