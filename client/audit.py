"""The site's boundary: sanitised errors and an audit log line per message the site sends.

Each audit line records what left the site and under which guarantee: the round (Flower group
id), message type, the SecAgg+ stage answered, the shapes of every array or byte string in the
reply, its size in bytes on the wire (protobuf), a SHA-256 hash of that serialisation, the
clear-text metric keys, the privacy mechanism, and the error code of an error reply. It never
records a value.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.constant import ErrorCode
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_STATE
from flwr.common.serde import recorddict_to_proto

from client.audit_chain import HeadStore
from client.site_files import SiteFiles, site_id
from common.errors import public_site_error, site_error_code
from common.protocol import NEXT_SETUP_RECORD

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


def incoming_stage(message: Message) -> str | None:
    """Return the SecAgg+ stage a request asks for (read before ``secaggplus_mod`` pops it).

    An unmask request that also carries the next round's set-up
    (:mod:`client.secagg_prekeys`) is ``"unmask+setup"``.
    """
    if message.has_content() and SECAGG_CONFIGS_KEY in message.content.config_records:
        stage = message.content.config_records[SECAGG_CONFIGS_KEY].get("stage")
        if stage is None:
            return None
        if NEXT_SETUP_RECORD in message.content.config_records:
            return f"{stage!s}+setup"
        return str(stage)
    return None


PRIVACY_RECORD = "fedseg.privacy"
"""Key of the site's privacy spend after its last DP release, in the node's context state."""


SECAGG_PUBLIC_PARAMETERS = ("sample_num", "share_num", "threshold", "clipping_range",
                            "target_range", "mod_range", "max_weight")
"""SecAgg+ set-up values recorded in the audit log (public; the state's keys and seeds never)."""


def secagg_parameters(context: Context) -> dict[str, Any] | None:
    """Return the public SecAgg+ parameters of the site's current round, if any."""
    record = context.state.config_records.get(RECORD_KEY_STATE)
    if record is None:
        return None
    return {k: record[k] for k in SECAGG_PUBLIC_PARAMETERS if k in record}


COMPUTE_RECORD = "fedseg.compute"
"""Key of the last computation's wall / CPU seconds in the node's context state (site-local)."""


def take_compute_state(context: Context) -> dict[str, Any] | None:
    """Return and clear the compute time of the reply just computed (audit only, never sent)."""
    record = context.state.config_records.pop(COMPUTE_RECORD, None)
    return None if record is None else {str(k): v for k, v in record.items()}


def privacy_state(context: Context) -> dict[str, Any] | None:
    """Return the site's DP spend so far (epsilon, delta, budget, last multiplier), if any."""
    record = context.state.config_records.get(PRIVACY_RECORD)
    return None if record is None else {str(k): v for k, v in record.items()}


def make_boundary_mod(site_root: str | Path, *, mechanism: str,
                      head_store: Callable[[Context], HeadStore | None] | None = None) -> Mod:
    """Return the site's outermost mod: sanitise errors, then audit whatever leaves.

    * Any exception raised below (a refusal, a data error naming a cell, a bug) becomes an
      error reply carrying only a code and a generic text
      (:func:`common.errors.public_site_error`); the full reason and traceback go to the site's
      own log (:class:`client.site_files.SiteFiles`).
    * Every reply, error replies included, is described in the audit log with the SecAgg+ stage
      it answers. If the audit entry cannot be written, no data is sent: the reply is replaced
      by an ``internal`` error.

    Parameters
    ----------
    site_root : str or Path
        The site's directory (audit log, site log, round ledger).
    mechanism : str
        Privacy mechanism protecting the replies (``"secagg+"`` or ``"none"``).
    head_store : callable, optional
        ``context -> store``: where the site keeps the head hash of its audit log (its site
        store), so that ``fedseg-site audit verify`` also detects lines cut from the end.
    """
    root = Path(site_root)

    def boundary_mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
        files = SiteFiles(root, site_id(context),
                          head_store=None if head_store is None else head_store(context))
        stage = incoming_stage(message)
        secagg_before = secagg_parameters(context)
        code = None
        try:
            reply = call_next(message, context)
        except Exception as exc:
            code = site_error_code(exc)
            try:
                files.log(f"round {message.metadata.group_id} stage {stage} refused [{code}]",
                          str(exc), exc=exc)
            except OSError:
                pass  # the reply below still carries no value
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                  reason=public_site_error(code)), reply_to=message)
        entry = {
            "time": round(time.time(), 3),
            "site": files.site,
            "round": message.metadata.group_id,
            "stage": stage,
            "in_type": message.metadata.message_type,
            "mechanism": mechanism if message.metadata.message_type == "train" else "none",
            "error_code": code,
            "privacy": privacy_state(context),
            "compute": take_compute_state(context),
            "secagg": secagg_parameters(context),
            **describe_message(reply),
        }
        if stage is not None and stage.endswith("+setup"):
            # This round's parameters, and the next round's the site just set up with.
            entry["secagg"], entry["next_secagg"] = secagg_before, entry["secagg"]
        try:
            files.append_audit(entry)
        except Exception as exc:  # unwritable, a torn / changed chain, the store: send nothing
            if code is None:
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                      reason=public_site_error("internal")), reply_to=message)
            try:
                files.log("audit log not writable; reply withheld", str(exc))
            except OSError:
                pass
        return reply

    return boundary_mod


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
