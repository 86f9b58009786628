"""Fault injection for simulations: a site that drops out, or sends a malformed reply."""

from __future__ import annotations

from typing import Any, cast

import flwr.compat.common.recorddict_compat as compat
import numpy as np
from flwr.app import Context, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common import (
    bytes_to_ndarray,
    ndarray_to_bytes,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from numpy.typing import NDArray

from common.protocol import PHASE_KEY, Phase, Role, parse_phase, reply_roles
from common.secure_sum import MODULUS_RANGE


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


PLAIN_FAULTS = ("missing_array", "extra_array", "wrong_shape", "int_dtype", "non_finite",
                "negative_count", "fractional_count")
"""Faults :func:`make_bad_reply_mod` can put into a plain (``privacy=none``) reply."""

MASKED_FAULTS = ("missing_array", "extra_array", "wrong_shape", "float_dtype", "out_of_range")
"""Faults :func:`make_bad_reply_mod` can put into a SecAgg+ masked vector."""


def make_bad_reply_mod(*, site: int, server_round: int, fault: str) -> Mod:
    """Return a mod that makes ``site`` send a malformed reply in ``server_round``.

    The site computes its reply honestly; the mod then damages what leaves it: with SecAgg+
    the masked vector of the ``collect_masked_vectors`` stage (:data:`MASKED_FAULTS`), without
    the plain statistics of the fit reply (:data:`PLAIN_FAULTS`).

    Parameters
    ----------
    site : int
        The simulated node's ``partition-id``.
    server_round : int
        Round (Flower group id) in which the reply is damaged.
    fault : str
        ``missing_array`` / ``extra_array``: one array fewer / more; ``wrong_shape``: the last
        array flattened (a plain one also an entry short); ``int_dtype`` / ``float_dtype``:
        the arrays in another dtype; ``non_finite``: a NaN in the last array;
        ``negative_count`` / ``fractional_count``: a count of -1 / plus 0.5;
        ``out_of_range``: a masked entry equal to the modulus.
    """
    if fault not in PLAIN_FAULTS + MASKED_FAULTS:
        raise ValueError(f"fault={fault!r}; expected one of "
                         f"{sorted(set(PLAIN_FAULTS + MASKED_FAULTS))}.")

    def bad_reply_mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
        targeted = (int(context.node_config.get("partition-id", -1)) == site
                    and message.metadata.group_id == str(server_round)
                    and message.metadata.message_type == MessageType.TRAIN
                    and message.has_content())
        # Read before the inner mods run: Flower's secaggplus_mod pops the stage key.
        configs = message.content.config_records.get(RECORD_KEY_CONFIGS) if targeted else None
        stage = None if configs is None else configs.get(Key.STAGE)
        reply = call_next(message, context)
        if not targeted or reply.has_error():
            return reply
        if configs is None:
            phase = parse_phase(compat.recorddict_to_fitins(message.content, keep_input=True)
                                .config.get(PHASE_KEY))
            fitres = compat.recorddict_to_fitres(reply.content, keep_input=True)
            arrays = damage_plain_reply(parameters_to_ndarrays(fitres.parameters), phase, fault)
            reply.content.array_records["fitres.parameters"] = compat.parameters_to_arrayrecord(
                ndarrays_to_parameters(arrays), keep_input=True)
        elif stage == Stage.COLLECT_MASKED_VECTORS:
            record = reply.content.config_records[RECORD_KEY_CONFIGS]
            masked = [bytes_to_ndarray(b)
                      for b in cast(list[bytes], record[Key.MASKED_PARAMETERS])]
            record[Key.MASKED_PARAMETERS] = [ndarray_to_bytes(a)
                                             for a in damage_masked_vector(masked, fault)]
        return reply

    return bad_reply_mod


def damage_plain_reply(arrays: list[NDArray[Any]], phase: Phase, fault: str) -> list[NDArray[Any]]:
    """Apply a :data:`PLAIN_FAULTS` fault to a site's plain statistics."""
    arrays = [np.array(a) for a in arrays]
    count = reply_roles(phase).index(Role.COUNT)
    if fault == "missing_array":
        return arrays[:-1]
    if fault == "extra_array":
        return [*arrays, np.zeros(1)]
    if fault == "wrong_shape":
        return [*arrays[:-1], arrays[-1].ravel()[:-1]]
    if fault == "int_dtype":
        return [a.astype(np.int64) for a in arrays]
    if fault == "non_finite":
        arrays[-1].flat[0] = np.nan
    elif fault == "negative_count":
        arrays[count].flat[0] = -1.0
    elif fault == "fractional_count":
        arrays[count].flat[0] += 0.5
    else:
        raise ValueError(f"fault={fault!r} does not apply to a plain reply.")
    return arrays


def damage_masked_vector(arrays: list[NDArray[Any]], fault: str) -> list[NDArray[Any]]:
    """Apply a :data:`MASKED_FAULTS` fault to a masked vector."""
    if fault == "missing_array":
        return arrays[:-1]
    if fault == "extra_array":
        return [*arrays, np.zeros(1, dtype=np.int64)]
    if fault == "wrong_shape":
        return [*arrays[:-1], arrays[-1].ravel()]
    if fault == "float_dtype":
        return [a.astype(np.float64) for a in arrays]
    if fault == "out_of_range":
        last = np.array(arrays[-1])
        last.flat[0] = MODULUS_RANGE
        return [*arrays[:-1], last]
    raise ValueError(f"fault={fault!r} does not apply to a masked vector.")
