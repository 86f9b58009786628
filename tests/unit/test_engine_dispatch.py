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
