"""Screen SecAgg+ masked vectors before Flower sums them: a malformed one is a dropped site.

Flower 1.42's ``SecAggPlusWorkflow.collect_masked_vectors_stage`` adds up every masked vector
it receives, array by array (``parameters_addition``): a vector with fewer arrays than the first
one raises ``IndexError`` deep inside Flower, one with more is silently truncated, an array of
another shape is broadcast into the sum or raises, and a float array breaks the modular
reduction. The server cannot read a masked vector, but its *layout* is public: Flower's weight
factor of shape ``(1,)``, then the round's encoded statistics
(:meth:`server.strategy.FederatedKMeans.expected_reply_shapes`), every array int64 with entries
in ``[0, modulus_range)``; beside it travel ``num_examples=1``, no metrics and no plain arrays.

:class:`ScreeningSecAggPlusWorkflow` checks every reply of that stage before Flower's code sees
it. A reply that fails is logged with its node id and what was wrong (never a value), recorded
among the round's failures, and withheld from Flower, which then treats the site exactly as one
that did not answer: it leaves the active set, its result is not among the round's results (so
the decoder divides by the right number of sites), and the unmask stage removes its pairwise
masks from the others' vectors with its neighbours' key shares. Its own vector, still under its
private mask, is never unmasked: the server never asks for a dropped site's mask seed. Whether
the round goes on is then SecAgg+'s threshold rule (every site's neighbourhood must keep
``reconstruction_threshold`` active sites; with dropouts not tolerated that is all of them) and,
after unmasking, ``strategy.accept_partial_rounds``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, cast

import flwr.compat.common.recorddict_compat as compat
import numpy as np
from flwr.app import Message
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid

from common.errors import ProtocolError
from common.npy import bytes_to_ndarray
from server.grid import DelegatingGrid, FastPollGrid
from server.strategy import FederatedKMeans, reject_reply

WEIGHT_FACTOR_SHAPE = (1,)
"""Shape of the array Flower's ``secaggplus_mod`` puts first: the site's masked weight factor."""

MASKED_DTYPE = np.dtype(np.int64)
"""Dtype of every masked array an honest site sends (Flower's quantiser plus int64 masks).

Requiring exactly this matters: numpy adds int64 and uint64 into float64, on which Flower's
modular reduction fails.
"""


def check_masked_reply(
    message: Message, *, expected_shapes: Sequence[tuple[int, ...]], mod_range: int
) -> None:
    """Refuse a reply of the collect-masked-vectors stage that no honest site can send.

    Parameters
    ----------
    message : flwr.app.Message
        One site's reply (without an error).
    expected_shapes : sequence of tuple of int
        Shapes of the masked arrays, Flower's weight factor first.
    mod_range : int
        SecAgg+'s modulus: every masked entry is in ``[0, mod_range)``.

    Raises
    ------
    ProtocolError
        Naming the first problem found (layout only, never a value).
    """
    content = message.content
    configs = content.config_records.get(RECORD_KEY_CONFIGS)
    value = None if configs is None else configs.get(Key.MASKED_PARAMETERS)
    if not isinstance(value, list) or not all(isinstance(b, bytes) for b in value):
        raise ProtocolError("the reply carries no masked vector (a list of serialised arrays).")
    blobs = cast(list[bytes], value)
    if len(blobs) != len(expected_shapes):
        raise ProtocolError(f"the masked vector has {len(blobs)} arrays; expected "
                            f"{len(expected_shapes)} (weight factor and statistics).")
    for index, (blob, shape) in enumerate(zip(blobs, expected_shapes, strict=True)):
        try:
            arr = bytes_to_ndarray(blob)
        except Exception as exc:  # whatever numpy raises on bytes it cannot read
            raise ProtocolError(f"masked array #{index} cannot be read as a numpy array "
                                f"({type(exc).__name__}).") from exc
        if arr.dtype != MASKED_DTYPE:
            raise ProtocolError(f"masked array #{index} has dtype {arr.dtype}; expected "
                                f"{MASKED_DTYPE}.")
        if arr.shape != tuple(shape):
            raise ProtocolError(f"masked array #{index} has shape {arr.shape}; expected "
                                f"{tuple(shape)}.")
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= mod_range):
            raise ProtocolError(f"masked array #{index} has entries outside [0, modulus).")
    try:
        fitres = compat.recorddict_to_fitres(content, keep_input=True)
    except Exception as exc:  # a reply Flower's own conversion would crash on
        raise ProtocolError(f"the reply's fit result cannot be read ({type(exc).__name__}).") \
            from exc
    if fitres.num_examples != 1 or fitres.metrics:
        raise ProtocolError("num_examples or metrics set beside the masked vector; expected "
                            "num_examples=1 and no metrics.")
    if fitres.parameters.tensors:
        raise ProtocolError("plain arrays travel beside the masked vector.")


class ScreeningSecAggPlusWorkflow(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow, screening every masked vector before it is summed.

    Takes ``SecAggPlusWorkflow``'s parameters. The strategy in the ``LegacyContext`` must be
    a :class:`server.strategy.FederatedKMeans`: it knows the round's public reply layout.
    """

    def collect_masked_vectors_stage(
        self, grid: Grid, context: LegacyContext, state: WorkflowState
    ) -> bool:
        """Run Flower's masked-vector stage on replies that follow the round's layout."""
        strategy = context.strategy
        if not isinstance(strategy, FederatedKMeans):
            raise TypeError(f"{type(self).__name__} needs a FederatedKMeans strategy (it "
                            f"knows the reply layout); got {type(strategy).__name__}.")
        cfg = context.state.config_records[MAIN_CONFIGS_RECORD]
        server_round = int(cfg[WorkflowKey.CURRENT_ROUND])  # type: ignore[arg-type]
        expected = [WEIGHT_FACTOR_SHAPE, *strategy.expected_reply_shapes()]

        def admit(reply: Message) -> bool:
            if reply.has_error():
                return True  # Flower records it as a failure itself
            try:
                check_masked_reply(reply, expected_shapes=expected, mod_range=state.mod_range)
            except ProtocolError as exc:
                state.failures.append(
                    reject_reply(server_round, reply.metadata.src_node_id, str(exc)))
                if isinstance(grid, FastPollGrid):  # named among the round's dropouts
                    grid.record_lost(reply.metadata.src_node_id, f"reply rejected: {exc}")
                return False
            return True

        return bool(super().collect_masked_vectors_stage(
            ScreenedGrid(grid, admit=admit), context, state))


class ScreenedGrid(DelegatingGrid):
    """Delegate to ``grid``, returning from ``send_and_receive`` only the replies ``admit`` keeps.

    Parameters
    ----------
    grid : flwr.serverapp.Grid
    admit : callable
        ``reply -> bool``; a reply it refuses is withheld, as if it never arrived.
    """

    def __init__(self, grid: Grid, *, admit: Any) -> None:
        super().__init__(grid)
        self.admit = admit

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Send through the wrapped grid; return the replies ``admit`` keeps."""
        replies = list(self.inner.send_and_receive(messages, timeout=timeout))
        return [reply for reply in replies if self.admit(reply)]
