"""The server's grid ends a stage when its last reply is stored, not a poll interval later."""

from __future__ import annotations

import threading
import time

from server.grid import REPLY_SIGNAL, FastPollGrid, StoreSignal


def test_signal_wakes_a_waiter_and_never_loses_a_notification():
    signal = StoreSignal()
    seen = signal.generation
    signal.notify()  # between a look and the wait: the wait must not sleep through it
    started = time.monotonic()
    assert signal.wait(seen, 30.0) is True
    assert time.monotonic() - started < 5
    assert signal.wait(signal.generation, 0.01) is False  # nothing new: times out

    seen = signal.generation
    woke = []
    waiter = threading.Thread(target=lambda: woke.append(signal.wait(seen, 30.0)))
    waiter.start()
    time.sleep(0.05)
    signal.notify()
    waiter.join(timeout=5)
    assert woke == [True]


class _Reply:
    """A reply as FastPollGrid reads it (metadata.reply_to_message_id, has_error)."""

    def __init__(self, to: str) -> None:
        self.metadata = type("Meta", (), {"reply_to_message_id": to, "src_node_id": 5})()

    def has_error(self) -> bool:
        return False


class _SlowSuperLink:
    """A grid whose one reply is stored by another thread after a while (then signalled)."""

    def __init__(self) -> None:
        self.stored: list[_Reply] = []
        self.looks = 0

    def push_messages(self, messages):
        def store_later() -> None:
            time.sleep(0.2)
            self.stored.append(_Reply("m1"))
            REPLY_SIGNAL.notify()

        threading.Thread(target=store_later, daemon=True).start()
        return ["m1"]

    def pull_messages(self, ids):
        self.looks += 1
        return [r for r in self.stored if r.metadata.reply_to_message_id in ids]


def test_stage_ends_when_the_reply_is_signalled_not_after_the_poll_interval():
    link = _SlowSuperLink()
    grid = FastPollGrid(link, poll_interval=10.0)  # type: ignore[arg-type]
    message = type("Msg", (), {"metadata": type("M", (), {"dst_node_id": 5})()})()
    started = time.monotonic()
    replies = list(grid.send_and_receive([message]))
    assert [r.metadata.reply_to_message_id for r in replies] == ["m1"]
    assert time.monotonic() - started < 5  # one 10 s poll would have taken 10 s
    assert grid.dropouts == []


def test_signal_keeps_named_stores_until_taken_or_forgotten():
    signal = StoreSignal()
    signal.notify("a")
    signal.notify("b")
    assert signal.take({"b", "c"}) == {"b"}
    assert signal.take({"b"}) == set()  # taken once
    signal.forget(["a"])
    assert signal.take({"a"}) == set()
    signal.notify("d")
    signal.notify()  # a store that named nothing: the next look must be at everything
    assert signal.take({"d"}) is None
    assert signal.take({"d"}) == {"d"}


class _ManyRepliesLink:
    """A grid whose replies are stored one at a time by another thread, each signalled by name;
    every look records which ids it was asked about."""

    def __init__(self, count: int, gap: float) -> None:
        self.ids = [f"m{i}" for i in range(count)]
        self.stored: dict[str, _Reply] = {}
        self.looks: list[set[str]] = []
        self.gap = gap

    def push_messages(self, messages):
        def store_all() -> None:
            for mid in self.ids:
                time.sleep(self.gap)
                self.stored[mid] = _Reply(mid)
                REPLY_SIGNAL.notify(mid)

        threading.Thread(target=store_all, daemon=True).start()
        return list(self.ids)

    def pull_messages(self, ids):
        ids = set(ids)
        self.looks.append(ids)
        found = [self.stored.pop(mid) for mid in sorted(ids) if mid in self.stored]
        return found


def _messages(count: int):
    meta = type("M", (), {"dst_node_id": 5})()
    return [type("Msg", (), {"metadata": meta})() for _ in range(count)]


def test_signalled_looks_ask_only_about_the_replies_stored():
    link = _ManyRepliesLink(60, gap=0.005)
    grid = FastPollGrid(link, poll_interval=10.0)  # type: ignore[arg-type]
    replies = list(grid.send_and_receive(_messages(60)))
    assert sorted(r.metadata.reply_to_message_id for r in replies) == sorted(link.ids)
    assert link.looks[0] == set(link.ids)  # the first look is at every awaited message
    asked_later = [len(look) for look in link.looks[1:]]
    assert asked_later and max(asked_later) < 60
    # Each id is asked about once at the first look and at most once when signalled, so the
    # looks cost what arrived, not (looks x awaited): well under 60 per look again.
    assert sum(asked_later) <= 60 + 60  # + the ids of full looks (at most one more, 1 s)
    assert grid.dropouts == []


def test_without_named_signals_every_look_asks_about_every_awaited_message():
    # A deployed SuperLink signals nothing: each look (every poll interval) is a full one.
    class Unsignalled(_ManyRepliesLink):
        def push_messages(self, messages):
            self.stored = {mid: _Reply(mid) for mid in self.ids[:3]}
            return list(self.ids)

    link = Unsignalled(5, gap=0.0)
    grid = FastPollGrid(link, poll_interval=0.05)  # type: ignore[arg-type]
    replies = list(grid.send_and_receive(_messages(5), timeout=0.3))
    assert len(replies) == 3
    assert link.looks[0] == set(link.ids)
    assert all(look == {"m3", "m4"} for look in link.looks[1:]) and len(link.looks) >= 3
    assert sorted(d.reason for d in grid.dropouts) == ["no reply within 0.3 s"] * 2


def test_a_reply_whose_objects_never_arrive_is_given_up_with_the_stage():
    # Flower's deployment grid retries a dead site's half-uploaded reply for minutes
    # (pull_objects: 500 tries, 7,200 s); inside a stage the pull ends with the stage.
    import pytest
    from flwr.supercore.inflatable.inflatable_utils import ObjectPullError, ObjectUnavailableError
    from flwr.superlink.grid import http_grid

    import server.grid as grid_module

    grid_module.bound_reply_pulls()
    grid_module.bound_reply_pulls()  # installed once, not wrapped twice
    assert http_grid.pull_objects.fedseg_bounded
    tries = []

    def never_there(object_id: str) -> bytes:
        tries.append(object_id)
        raise ObjectUnavailableError(object_id)

    grid_module._PULL_DEADLINE.at = time.monotonic() + 1.0
    try:
        started = time.monotonic()
        with pytest.raises(ObjectPullError):
            http_grid.pull_objects(object_ids=["a"], pull_object_fn=never_there)
        assert time.monotonic() - started < 10  # Flower alone: 500 tries, up to 7,200 s
        assert 1 <= len(tries) <= 3
    finally:
        grid_module._PULL_DEADLINE.at = None
