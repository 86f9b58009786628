"""A Flower ``Grid`` that collects replies as soon as they land, and names the sites.

Flower 1.42's deployment grid (``flwr.superlink.grid.http_grid.HttpGrid``) waits a fixed 3 s
between two looks for replies, so every SecAgg+ stage costs up to 3 s of idle time on the
server side alone (docs/FLOWER-1.42-DEPLOYMENT-FACTS.md, section 5). :class:`FastPollGrid`
wraps any grid and re-implements only ``send_and_receive`` on the grid's own
``push_messages`` / ``pull_messages``, looking every ``poll_interval`` seconds; each look is
one small request to the SuperLink on the operator's own host.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

from common.errors import ConfigError

DEFAULT_POLL_INTERVAL = 0.1
"""Seconds between two looks for replies (Flower 1.42's own: 3 s)."""

_PULL_DEADLINE = threading.local()
"""``at``: when the current stage ends (monotonic; set by ``FastPollGrid.send_and_receive``)."""


def bound_reply_pulls() -> None:
    """Cap Flower's pull of a reply's objects by the current stage's deadline (installed once).

    A site that dies while uploading its reply leaves a reply whose objects never arrive;
    Flower 1.42's deployment grid then retries them (``pull_objects``: up to 500 tries, 7,200 s)
    until the SuperLink's object-push session expires, about 3 minutes, whatever
    ``privacy.timeout`` says (measured: a 45 s stage took 185 s). Within a stage, the pull now
    gives up when the stage does; the reply comes back as Flower's ``MESSAGE_UNAVAILABLE``
    error, and the site is named as dropped out.
    """
    from flwr.superlink.grid import http_grid

    original = http_grid.pull_objects
    if getattr(original, "fedseg_bounded", False):
        return

    def pull_objects(*args: Any, **kwargs: Any) -> Any:
        deadline = getattr(_PULL_DEADLINE, "at", None)
        if deadline is not None:
            left = max(0.5, deadline - time.monotonic())
            given = kwargs.get("max_time")
            kwargs["max_time"] = left if given is None else min(float(given), left)
        return original(*args, **kwargs)

    pull_objects.fedseg_bounded = True  # type: ignore[attr-defined]
    http_grid.pull_objects = pull_objects


class StoreSignal:
    """Wakes a waiter as soon as a message is stored, in the same process.

    :data:`REPLY_SIGNAL` wakes a waiting :class:`FastPollGrid` as soon as a reply is stored.
    A deployed SuperLink runs in another process, so nothing signals there and the grid looks
    every ``poll_interval`` seconds. The simulation engine stores replies in the server's own
    process and calls :meth:`notify` after each (``simulations.engine``), so a stage ends when
    its last reply lands instead of up to one poll interval later -- at every exchange of a
    round. A generation counter makes a reply stored between a look and the wait count.

    A notification may name what was stored (the id of the instruction a reply answers): the
    grid then looks up only those replies (:meth:`take`) instead of every awaited one -- a look
    costs the SuperLink state time per message it is asked about, and at 1,000 sites asking
    about every awaited message at each look was most of the server's own work in a round.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._generation = 0
        self._stored: set[str] = set()
        self._unnamed = False

    @property
    def generation(self) -> int:
        """Number of notifications so far (read before a look, passed to :meth:`wait`)."""
        return self._generation

    def notify(self, key: str | None = None) -> None:
        """Record that a message was stored (``key``: what it answers, if known); wake waiters."""
        with self._cond:
            self._generation += 1
            if key:
                self._stored.add(key)
            else:
                self._unnamed = True
            self._cond.notify_all()

    def take(self, awaited: set[str]) -> set[str] | None:
        """Return and forget the notified keys among ``awaited``.

        ``None`` when a store since the last call named nothing: look at everything awaited.
        """
        with self._cond:
            if self._unnamed:
                self._unnamed = False
                return None
            found = self._stored & awaited
            self._stored -= found
            return found

    def forget(self, keys: Iterable[str]) -> None:
        """Forget notified keys nobody will :meth:`take` (an exchange that ended)."""
        with self._cond:
            self._stored.difference_update(keys)

    def wait(self, seen: int, timeout: float) -> bool:
        """Wait until a notification after generation ``seen``, at most ``timeout`` s."""
        with self._cond:
            return self._cond.wait_for(lambda: self._generation != seen, timeout)


REPLY_SIGNAL = StoreSignal()
"""The process's reply signal (notified by the simulation engine; idle in a deployment)."""

MIN_LOOK_GAP = 0.002
"""Seconds at least between two signalled looks, so that a burst of stores is one look."""

LOOK_GAP_PER_MESSAGE = 2e-5
"""... plus this per message a look goes over (the simulation engine's look at every stored
instruction; at 1,000 sites a look per stored message made the waiting quadratic)."""

FULL_LOOK_GAP = 1.0
"""While replies are signalled by name, seconds at most between two looks at every awaited
message (Flower's own checks: expired messages, sites gone offline)."""


class DelegatingGrid(Grid):
    """A ``Grid`` that hands every call to the grid it wraps (subclasses change one or two).

    Parameters
    ----------
    grid : flwr.serverapp.Grid
        The grid Flower hands the ServerApp (or another wrapper).
    """

    def __init__(self, grid: Grid) -> None:
        self.inner = grid

    def __getattr__(self, name: str) -> Any:
        # Anything not defined here (Flower-internal helpers) is the wrapped grid's.
        return getattr(self.inner, name)

    def set_run(self, run: Any) -> None:  # noqa: D102 - as Grid
        self.inner.set_run(run)

    @property
    def run(self) -> Any:  # noqa: D102 - as Grid
        return self.inner.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:  # noqa: D102 - as Grid
        return self.inner.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:  # noqa: D102 - as Grid
        return self.inner.get_node_ids()

    def get_nodes(self) -> Iterable[Any]:  # noqa: D102 - as Grid
        return self.inner.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # noqa: D102
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # noqa: D102
        return self.inner.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Send and wait through the wrapped grid."""
        return self.inner.send_and_receive(messages, timeout=timeout)


@dataclass(frozen=True)
class Dropout:
    """A site that left a round: it did not answer a stage in time, or answered with an error.

    Attributes
    ----------
    round : int
    stage : str
        The SecAgg+ stage (``setup``, ``share_keys``, ``collect_masked_vectors``, ``unmask``)
        or ``fit`` (plain rounds).
    node_id : int
    site : str
        The site's registered name (:func:`site_names`).
    reason : str
        ``no reply within N s``, Flower's ``node unavailable``, or the site's sanitised error.
    """

    round: int
    stage: str
    node_id: int
    site: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """Return the dropout as JSON-ready values."""
        return asdict(self)


class FastPollGrid(DelegatingGrid):
    """Delegate to ``grid``; wait for replies with a short poll; note who did not answer.

    Parameters
    ----------
    grid : flwr.serverapp.Grid
        The grid Flower hands the ServerApp.
    poll_interval : float, default=DEFAULT_POLL_INTERVAL
        Seconds between two looks for replies, in (0, 10].
    """

    def __init__(self, grid: Grid, *, poll_interval: float = DEFAULT_POLL_INTERVAL) -> None:
        if not 0 < poll_interval <= 10:
            raise ConfigError(f"federation.poll_interval={poll_interval} should be in (0, 10] "
                              "seconds.")
        super().__init__(grid)
        bound_reply_pulls()
        self.poll_interval = poll_interval
        self.names: dict[int, str] = {}
        self.round, self.stage = 0, "fit"
        self.stage_timeout: float | None = None
        self.dropouts: list[Dropout] = []
        self._round_start = 0

    def begin_round(self, server_round: int, stage: str) -> None:
        """Label the exchanges that follow (the SecAgg+ workflow relabels each stage)."""
        self.round, self.stage, self._round_start = server_round, stage, len(self.dropouts)

    def round_dropouts(self) -> list[Dropout]:
        """Return the sites lost since :meth:`begin_round`, each once (its first stage)."""
        seen: set[int] = set()
        lost = []
        for drop in self.dropouts[self._round_start:]:
            if drop.node_id not in seen:
                seen.add(drop.node_id)
                lost.append(drop)
        return lost

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push ``messages``; return the replies once all arrived or ``timeout`` s passed.

        A destination that went offline is answered by the SuperLink with an error reply
        (``NODE_UNAVAILABLE``), so ``timeout=None`` still ends once Flower notices the loss.
        """
        messages = list(messages)
        ids = list(self.inner.push_messages(messages))
        destination = {mid: m.metadata.dst_node_id for mid, m in zip(ids, messages, strict=True)}
        del messages
        pending = set(ids)
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        signalled, last_full = False, -FULL_LOOK_GAP
        _PULL_DEADLINE.at = deadline  # a reply's objects are pulled no longer than the stage
        try:
            while pending:
                seen = REPLY_SIGNAL.generation
                look = None
                if signalled and time.monotonic() - last_full < FULL_LOOK_GAP:
                    # Ask only about the messages whose replies were signalled stored.
                    look = REPLY_SIGNAL.take(pending)
                if look is None:
                    look, last_full = set(pending), time.monotonic()
                if look:
                    for reply in self.inner.pull_messages(look):
                        replies.append(reply)
                        pending.discard(reply.metadata.reply_to_message_id)
                if not pending or (deadline is not None and time.monotonic() >= deadline):
                    break
                signalled = REPLY_SIGNAL.wait(seen, self.poll_interval)
                if signalled:
                    # Let the replies landing now arrive together: one look for a burst.
                    time.sleep(MIN_LOOK_GAP)
        finally:
            _PULL_DEADLINE.at = None
        REPLY_SIGNAL.forget(ids)
        for reply in replies:
            if reply.has_error():
                self.record_lost(destination.get(reply.metadata.reply_to_message_id,
                                           reply.metadata.src_node_id),
                           _error_text(reply.error.reason or ""))
        for mid in sorted(pending):
            self.record_lost(destination[mid], f"no reply within {timeout:g} s"
                       if timeout is not None else "no reply")
        return replies

    def record_lost(self, node_id: int, reason: str) -> None:
        """Note that ``node_id`` left the current stage of the round, and why."""
        self.dropouts.append(Dropout(round=self.round, stage=self.stage, node_id=int(node_id),
                                     site=self.names.get(int(node_id), f"node {node_id}"),
                                     reason=reason))


def site_names(grid: Grid) -> dict[int, str]:
    """Return ``node_id -> name`` of the connected SuperNodes.

    The name is the one the operator gave ``flwr supernode register --name`` (bound to the
    site's authentication key, so a site cannot choose another's); a node without one, and
    every node of a simulation, is named ``node <id>``.
    """
    names: dict[int, str] = {}
    for node in grid.get_nodes():
        name = str(getattr(node, "name", "") or "")
        names[int(node.node_id)] = name or f"node {node.node_id}"
    return names


def _error_text(reason: str) -> str:
    """Return a short reason for an error reply (Flower's node-unavailable, or the site's code)."""
    from server.strategy import describe_failure

    if "Node Unavailable" in reason or "heartbeat" in reason:
        return "offline (Flower: no heartbeat)"
    return describe_failure(reason)
