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
