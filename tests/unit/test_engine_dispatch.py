"""The simulation's one-pass message dispatch is installed only where it fits."""

from __future__ import annotations

import importlib

import pytest

from simulations import engine

VCE = importlib.import_module(engine.VCE_API)


def test_install_replaces_flowers_dispatch_and_uninstall_restores_it():
    engine.install()
    try:
        assert VCE.add_messages_to_queue is engine.add_messages_to_queue
        engine.install()  # idempotent
        assert VCE.add_messages_to_queue is engine.add_messages_to_queue
    finally:
        engine.uninstall()
    assert VCE.add_messages_to_queue is not engine.add_messages_to_queue
    assert VCE.add_messages_to_queue.__module__ == engine.VCE_API


def test_install_refuses_an_unchecked_flower_version():
    with pytest.raises(RuntimeError, match=r"flwr==1\.43\.0 is installed"):
        engine.install(flower_version="1.43.0")


def _in_memory_state():
    """A real InMemoryLinkState, as Flower's run_simulation creates it."""
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.superlink.federation import NoOpFederationManager

    return LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(),
                            ObjectStoreFactory()).state()


@pytest.fixture
def task_identity(monkeypatch):
    """Messages are made inside a task (as in a ServerApp): give them one."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 7)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 0)


def test_state_signals_every_store_and_keeps_flowers_answer(task_identity):
    from flwr.app import Message, RecordDict

    from server.grid import REPLY_SIGNAL

    state = _in_memory_state()
    engine._signal_stores(state)
    engine._signal_stores(state)  # wrapped once only
    pushed, replies = engine.PUSHED.generation, REPLY_SIGNAL.generation
    # A message for no run: Flower refuses it (None) -- and the waiter is still woken.
    invalid = Message(RecordDict(), dst_node_id=1234, message_type="train")
    assert state.store_message_ins(invalid) is None
    assert engine.PUSHED.generation == pushed + 1
    assert REPLY_SIGNAL.generation == replies
    assert state.store_message_res(invalid) is None
    assert REPLY_SIGNAL.generation == replies + 1


def test_dispatcher_waits_on_the_push_signal_not_a_poll(monkeypatch, task_identity):
    import threading
    import time
    from queue import Queue

    state = _in_memory_state()
    monkeypatch.setattr(engine, "IDLE_LOOK", 60.0)  # a poll alone would not look again
    queue: Queue = Queue()
    stop = threading.Event()
    looks = []

    def counting(ids):  # Flower's check, for a message of no run: drop it
        looks.append(set(ids))
        for msg_id in ids:
            state.message_ins_store.pop(msg_id, None)

    state._check_stored_messages = counting
    thread = threading.Thread(target=engine.add_messages_to_queue,
                              args=(state, queue, {7: 0}, stop), daemon=True)
    thread.start()
    try:
        time.sleep(0.3)  # the dispatcher made its first look and now waits
        from flwr.app import Message, RecordDict

        msg = Message(RecordDict(), dst_node_id=7, message_type="train")
        with state.lock:  # stored as Flower's state would (its checks are Flower's business)
            state.message_ins_store[msg.metadata.message_id] = msg
        engine.PUSHED.notify()
        deadline = time.monotonic() + 10
        while not looks and time.monotonic() < deadline:
            time.sleep(0.01)
        assert looks == [{msg.metadata.message_id}]  # looked again at once, long before 60 s
    finally:
        stop.set()
        engine.PUSHED.notify()
        thread.join(timeout=5)
    assert not thread.is_alive()
