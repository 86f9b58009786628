"""Flower's simulation engine, driven faster: one-pass dispatch, two tasks in flight per worker.

Flower 1.42's simulation engine (``flwr.server.superlink.fleet.vce.vce_api``) moves messages
from its in-memory SuperLink state to the Ray workers with ``add_messages_to_queue``: every
0.1 s, for *each* simulated site, ``InMemoryLinkState.get_message_ins`` walks *every* stored
message (checking its expiry and federation). With ``n`` sites and ``n`` messages in flight that
is ``n**2`` checks per look: at 100 sites the dispatch thread alone used about a third of a core
of this 2-core machine, competing with the sites it feeds, and at 1,000 sites one look takes
seconds (docs/BENCHMARKS.md, "SecAgg+ at 100 and 1,000 sites").

:func:`install` replaces that function with :func:`add_messages_to_queue`, which walks the
stored messages once per look, keeps only undelivered ones addressed to a simulated site, runs
Flower's own validity check on those, marks them delivered and queues them -- what the
original does, in one pass. It applies to the in-memory state only (the one ``run_simulation``
uses) and defers to Flower's function for any other state.

It also pipelines the Ray workers (:func:`pipelined_build`). Flower gives each Ray actor one
driver thread that submits a message, waits for the reply, stores it and only then submits the
next: the actor idles while the driver serialises, stores and dispatches (a third of a SecAgg+
round at 100 sites, whose four stages each send every site a message). Listing every actor
:data:`TASKS_PER_WORKER` times in Flower's actor pool gives it that many driver threads, so its
next message is already queued at the actor when it finishes one (Ray runs an actor's tasks
one at a time, in order). A site still has at most one message in flight: each SecAgg+ stage
waits for every reply before the next is sent.

Only the simulation installs this; a deployment never runs this engine.
"""

from __future__ import annotations

import importlib
import threading
from queue import Queue
from typing import Any

from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend
from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
from flwr.supercore.date import now

from common.mask_prg import calls_by_global_name, require_supported_flower
from server.grid import LOOK_GAP_PER_MESSAGE, MIN_LOOK_GAP, REPLY_SIGNAL, StoreSignal

VCE_API = "flwr.server.superlink.fleet.vce.vce_api"
"""The simulation engine's module whose dispatch function is replaced."""

PATCHED_NAME = "add_messages_to_queue"

TASKS_PER_WORKER = 2
"""Messages in flight per Ray actor (each a driver thread of Flower's engine)."""

_ORIGINAL: dict[str, Any] = {}

PUSHED = StoreSignal()
"""Notified whenever the ServerApp stores a message for the sites (wakes the dispatcher)."""

IDLE_LOOK = 0.1
"""Seconds between two looks at the stored messages when no store was signalled (Flower's)."""



def _signal_stores(state: InMemoryLinkState) -> None:
    """Make ``state`` signal every message it stores, so neither side waits out a poll interval.

    Instructions notify :data:`PUSHED`, replies :data:`server.grid.REPLY_SIGNAL`. Flower's
    engine looks for new instructions every 0.1 s, and the ServerApp's grid for replies every
    ``poll_interval``: up to 0.2 s of idle time per exchange, three exchanges per SecAgg+ round
    against one for a plain round. A stored reply is signalled with the id of the instruction it
    answers (:meth:`server.grid.StoreSignal.take`). Wrapped on this instance only.
    """
    if getattr(state, "_fedseg_signals", False):
        return
    store_ins, store_res = state.store_message_ins, state.store_message_res

    def store_message_ins(*args: Any, **kwargs: Any) -> Any:
        try:
            return store_ins(*args, **kwargs)
        finally:
            PUSHED.notify()

    def store_message_res(message: Any) -> Any:
        stored = None
        try:
            stored = store_res(message)
            return stored
        finally:
            # Name the instruction answered, so the grid asks the state about it alone.
            REPLY_SIGNAL.notify(message.metadata.reply_to_message_id if stored else None)

    state.store_message_ins = store_message_ins  # type: ignore[method-assign]
    state.store_message_res = store_message_res  # type: ignore[method-assign]
    state._fedseg_signals = True  # type: ignore[attr-defined]


def add_messages_to_queue(state: Any, queue: Queue[Any], nodes_mapping: dict[int, int],
                          f_stop: threading.Event) -> None:
    """Put undelivered messages for the simulated sites in ``queue`` until ``f_stop`` is set.

    Same contract as Flower's function of the same name (which it replaces); one pass over the
    stored messages per look instead of one per site.
    """
    if not isinstance(state, InMemoryLinkState):
        _ORIGINAL[PATCHED_NAME](state, queue, nodes_mapping, f_stop)
        return
    nodes = set(nodes_mapping)
    _signal_stores(state)
    while not f_stop.is_set():
        seen = PUSHED.generation
        with state.lock:
            # As Flower's: at most one message per site per look, the oldest stored first.
            waiting: dict[int, str] = {}
            for msg_id, msg in state.message_ins_store.items():
                node = msg.metadata.dst_node_id
                if msg.metadata.delivered_at == "" and node in nodes and node not in waiting:
                    waiting[node] = msg_id
            ready = []
            if waiting:
                # Flower's check: drops expired messages and those outside the federation.
                state._check_stored_messages(set(waiting.values()))
                delivered_at = now().isoformat()
                for msg_id in waiting.values():
                    stored = state.message_ins_store.get(msg_id)
                    if stored is not None and stored.metadata.delivered_at == "":
                        stored.metadata.delivered_at = delivered_at
                        ready.append(stored)
        for msg in ready:
            queue.put(msg)
        if not ready and not PUSHED.wait(seen, IDLE_LOOK):
            continue  # nothing stored: look again, as Flower's engine does every 0.1 s
        f_stop.wait(MIN_LOOK_GAP + LOOK_GAP_PER_MESSAGE * len(state.message_ins_store))


def pipelined_build(self: RayBackend, app_fn: Any) -> None:
    """Flower's ``RayBackend.build``, then every actor listed :data:`TASKS_PER_WORKER` times."""
    _ORIGINAL["build"](self, app_fn)
    pool = self.pool
    if pool is None:
        return
    actors = list(pool.pool)
    pool.pool = [actor for actor in actors for _ in range(TASKS_PER_WORKER)]
    pool.num_actors = len(pool.pool)  # Flower starts one driver thread per entry


def install(flower_version: str | None = None) -> None:
    """Make Flower's simulation engine dispatch with :func:`add_messages_to_queue`.

    Raises
    ------
    RuntimeError
        Flower is not a version this was checked against, or its engine no longer looks the
        function up by name (the replacement would silently not apply).
    """
    require_supported_flower(flower_version, "simulation message dispatch")
    module = importlib.import_module(VCE_API)
    current = getattr(module, PATCHED_NAME, None)
    if current is add_messages_to_queue:
        return
    if not callable(current) or not calls_by_global_name(module.run_api, module, PATCHED_NAME):
        raise RuntimeError(f"{VCE_API}.run_api does not start {PATCHED_NAME} through its module: "
                           "this Flower version's simulation engine is not the one fedseg's "
                           "dispatch replacement was written for.")
    assigned = set(InMemoryLinkState.__init__.__code__.co_names)
    if not ({"lock", "message_ins_store"} <= assigned
            and callable(getattr(InMemoryLinkState, "_check_stored_messages", None))):
        raise RuntimeError("InMemoryLinkState lacks lock, message_ins_store or "
                           "_check_stored_messages: fedseg's simulation dispatch replacement "
                           "does not fit this Flower version.")
    pool_code = importlib.import_module("flwr.simulation.ray_transport.ray_actor")
    submit = pool_code.BasicActorPool.submit.__code__.co_names
    workers: Any = vars(RayBackend)["num_workers"]
    if not {"pool", "pop"} <= set(submit) or "num_actors" not in workers.fget.__code__.co_names:
        raise RuntimeError("Flower's Ray actor pool no longer pops actors from a list and counts "
                           "workers by num_actors: fedseg's pipelining does not fit it.")
    _ORIGINAL[PATCHED_NAME] = current
    _ORIGINAL["build"] = RayBackend.build
    setattr(module, PATCHED_NAME, add_messages_to_queue)
    RayBackend.build = pipelined_build  # type: ignore[method-assign]


def uninstall() -> None:
    """Put Flower's dispatch and actor pool back (the benchmark compares both)."""
    if PATCHED_NAME in _ORIGINAL:
        setattr(importlib.import_module(VCE_API), PATCHED_NAME, _ORIGINAL[PATCHED_NAME])
    if "build" in _ORIGINAL:
        RayBackend.build = _ORIGINAL["build"]  # type: ignore[method-assign]
