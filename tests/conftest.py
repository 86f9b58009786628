"""Shared fixtures: composing the project's Hydra config the way the command line does."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from common.config import register_configs
from tests.postgres_server import PostgresServer

ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = ROOT / "conf"
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture
def make_cfg() -> Callable[..., DictConfig]:
    """Compose ``conf/config.yaml`` with overrides, as ``python -m simulations.run`` would."""
    register_configs()

    def _make(*overrides: str) -> DictConfig:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose("config", overrides=list(overrides))

    return _make


@pytest.fixture
def wholesale_csv() -> Path:
    """The UCI Wholesale customers CSV from ../shared/data, or a skip with the reason."""
    path = SHARED_DATA / "wholesale_customers.csv"
    if not path.is_file():
        pytest.skip(f"real-data test: {path} is absent (../shared/data is not part of the repo)")
    return path


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One throwaway PostgreSQL server per test session (stopped and removed at the end)."""
    with PostgresServer() as server:
        yield server


@pytest.fixture(scope="session")
def postgres_url(postgres_server: PostgresServer) -> str:
    """URL of database ``fedseg`` on the session's PostgreSQL server (``postgresql+psycopg``).

    Fails (never skips) when PostgreSQL is not installed: ``.ci/run`` installs it.
    """
    return postgres_server.url
