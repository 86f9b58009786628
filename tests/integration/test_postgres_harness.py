"""The test PostgreSQL harness: a real server, reachable through SQLAlchemy, cleaned up."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests import postgres_server as harness
from tests.postgres_server import PostgresServer

pytestmark = pytest.mark.integration


def test_fixture_server_round_trips_rows(
    postgres_url: str, postgres_server: PostgresServer
) -> None:
    assert postgres_url.startswith("postgresql+psycopg://fedseg@127.0.0.1:")
    assert postgres_server.pid is not None
    os.kill(postgres_server.pid, 0)  # the postmaster is alive during the test

    metadata = sa.MetaData()
    items = sa.Table(
        "harness_items",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.Text, nullable=False),
    )
    engine = sa.create_engine(postgres_url)
    try:
        metadata.create_all(engine)
        with engine.begin() as conn:
            conn.execute(items.insert(), [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}])
        with engine.connect() as conn:
            rows = conn.execute(sa.select(items.c.id, items.c.name).order_by(items.c.id)).all()
            version = conn.execute(sa.text("SHOW server_version")).scalar_one()
        assert [tuple(r) for r in rows] == [(1, "a"), (2, "b")]
        assert version
    finally:
        metadata.drop_all(engine)
        engine.dispose()


def test_context_manager_stops_server_and_removes_dir() -> None:
    with PostgresServer() as server:
        pid = server.pid
        base_dir = server.base_dir
        assert pid is not None and base_dir is not None
        os.kill(pid, 0)
        other = server.new_database("harness_other")
        engine = sa.create_engine(other)
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT current_database()")).scalar_one() == (
                "harness_other"
            )
        engine.dispose()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not base_dir.exists()


def test_cleanup_when_body_raises() -> None:
    server = PostgresServer()
    with pytest.raises(RuntimeError, match="boom"), server:
        raise RuntimeError("boom")
    assert server.pid is not None and server.base_dir is not None
    with pytest.raises(ProcessLookupError):
        os.kill(server.pid, 0)
    assert not server.base_dir.exists()


def test_retries_when_port_is_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = int(busy.getsockname()[1])
        ports = iter([taken])
        real_free_port = harness._free_port
        monkeypatch.setattr(harness, "_free_port", lambda: next(ports, real_free_port()))
        with PostgresServer() as server:
            assert server.port is not None and server.port != taken
            engine = sa.create_engine(server.url)
            with engine.connect() as conn:
                assert conn.execute(sa.text("SELECT 1")).scalar_one() == 1
            engine.dispose()


def test_missing_postgres_is_an_error_naming_ci_run(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(harness, "DEBIAN_PG_ROOT", tmp_path / "no")
    with pytest.raises(harness.PostgresUnavailableError, match=r"\.ci/run"):
        PostgresServer()
