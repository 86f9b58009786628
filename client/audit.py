"""The site's audit log: one JSON line per message the site sends.

Each line records what left the site and under which guarantee: the round (Flower group id),
message type, SecAgg+ stage, the shapes of every array or byte string in the reply, its size in
bytes on the wire (protobuf), a SHA-256 hash of that serialisation, the clear-text
``num_examples`` and metric keys, and the privacy mechanism. It never records a value.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.serde import recorddict_to_proto

SECAGG_CONFIGS_KEY = "secaggplus_configs"


def describe_message(message: Message) -> dict[str, Any]:
    """Describe an outgoing reply without any of its values.

    Parameters
    ----------
    message : flwr.app.Message
        The reply a ClientApp is about to send.

    Returns
    -------
    dict
        ``message_type``, ``group_id``, ``bytes``, ``sha256``, ``arrays`` (record -> key ->
        shape), ``configs`` (record -> key -> type/length), ``has_error``.
    """
    info: dict[str, Any] = {
        "message_type": message.metadata.message_type,
        "group_id": message.metadata.group_id,
        "has_error": message.has_error(),
        "arrays": {},
        "configs": {},
        "bytes": 0,
        "sha256": "",
    }
    if not message.has_content():
        return info
    content = message.content
    payload = recorddict_to_proto(content).SerializeToString(deterministic=True)
    info["bytes"] = len(payload)
    info["sha256"] = hashlib.sha256(payload).hexdigest()
    for name, record in content.array_records.items():
        info["arrays"][name] = {key: list(arr.shape) for key, arr in record.items()}
    for name, config in content.config_records.items():
        described: dict[str, Any] = {}
        for key, value in config.items():
            if isinstance(value, list):
                described[key] = {"type": "list", "len": len(value),
                                  "item_bytes": [len(v) for v in value
                                                 if isinstance(v, bytes)]}
            elif isinstance(value, bytes):
                described[key] = {"type": "bytes", "len": len(value)}
            else:
                described[key] = {"type": type(value).__name__}
        info["configs"][name] = described
    for name, metrics in content.metric_records.items():
        info.setdefault("metrics", {})[name] = sorted(metrics.keys())
    return info


def make_audit_mod(audit_dir: str | Path, *, mechanism: str) -> Mod:
    """Return a mod that appends a description of every reply to the site's audit log.

    Parameters
    ----------
    audit_dir : str or Path
        Directory of the log; the file is ``site-<partition-id or node-id>.jsonl``.
    mechanism : str
        Privacy mechanism protecting the replies (``"secagg+"`` or ``"none"``).
    """
    directory = Path(audit_dir)

    def audit_mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
        reply = call_next(message, context)
        site = context.node_config.get("partition-id", context.node_id)
        stage = None
        if message.has_content() and SECAGG_CONFIGS_KEY in message.content.config_records:
            stage = message.content.config_records[SECAGG_CONFIGS_KEY].get("stage")
        entry = {
            "time": round(time.time(), 3),
            "site": str(site),
            "round": message.metadata.group_id,
            "stage": stage,
            "mechanism": mechanism if message.metadata.message_type == "train" else "none",
            **describe_message(reply),
        }
        directory.mkdir(parents=True, exist_ok=True)
        with (directory / f"site-{site}.jsonl").open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry, sort_keys=True) + "\n")
        return reply

    return audit_mod


def make_capture_mod(capture_dir: str | Path) -> Mod:
    """Return a mod that saves every outgoing reply, byte for byte, for inspection.

    Each reply's content is written as the protobuf Flower serialises
    (``<site>-<n>.pb``) with a JSON sidecar (``<site>-<n>.json``) holding the metadata and the
    phase the site was asked for. Put it outermost (first in ``mods``) to see exactly what
    leaves the site. Meant for audits and tests; it stores masked payloads, never raw records.

    Parameters
    ----------
    capture_dir : str or Path
        Directory for the captured messages.
    """
    directory = Path(capture_dir)

    def capture_mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
        reply = call_next(message, context)
        site = str(context.node_config.get("partition-id", context.node_id))
        directory.mkdir(parents=True, exist_ok=True)
        seq = len(list(directory.glob(f"site-{site}-*.json")))
        phase = None
        if message.has_content():
            for record in message.content.config_records.values():
                if "fedseg.phase" in record:
                    phase = record["fedseg.phase"]
        payload = (recorddict_to_proto(reply.content).SerializeToString(deterministic=True)
                   if reply.has_content() else b"")
        stem = directory / f"site-{site}-{seq:04d}"
        stem.with_suffix(".pb").write_bytes(payload)
        sidecar = {"site": site, "seq": seq, "phase": phase, "in_type":
                   message.metadata.message_type, **describe_message(reply)}
        stem.with_suffix(".json").write_text(json.dumps(sidecar, sort_keys=True), "utf-8")
        return reply

    return capture_mod
