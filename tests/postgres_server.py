"""A throwaway, real PostgreSQL server for tests (``initdb`` + ``pg_ctl`` in a temp dir).

``PostgresServer`` creates a fresh cluster in a directory from ``tempfile.mkdtemp()``,
starts it on a free TCP port of 127.0.0.1 with trust authentication (user ``fedseg``),
creates the database ``fedseg`` and, on exit, stops the server, makes sure its process
is gone and removes the directory. The PostgreSQL binaries are not a Python dependency:
``.ci/run`` installs Debian's ``postgresql`` package when no ``initdb`` is found, so a
missing installation is an error here (tests fail), never a skip.

``initdb`` refuses to run as root; under root, every PostgreSQL command runs as the
``postgres`` system user (created by Debian's package) through ``runuser``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import psycopg
from psycopg import sql

USER = "fedseg"
DATABASE = "fedseg"
HOST = "127.0.0.1"
SERVICE_USER = "postgres"
DEBIAN_PG_ROOT = Path("/usr/lib/postgresql")
START_ATTEMPTS = 5
STOP_GRACE_S = 10.0
COMMAND_TIMEOUT_S = 120.0
_PR_SET_CHILD_SUBREAPER = 36


class PostgresUnavailableError(RuntimeError):
    """The PostgreSQL server binaries, or a user allowed to run them, are missing."""


def find_bin_dir() -> Path:
    """Directory holding ``initdb``, ``pg_ctl`` and ``postgres``: PATH first, then Debian's."""
    names = ("initdb", "pg_ctl", "postgres")
    candidates: list[Path] = []
    found = shutil.which("initdb")
    if found:
        candidates.append(Path(found).resolve().parent)
    if DEBIAN_PG_ROOT.is_dir():
        versions = [p for p in DEBIAN_PG_ROOT.iterdir() if re.fullmatch(r"\d+(\.\d+)?", p.name)]
        versions.sort(key=lambda p: tuple(int(x) for x in p.name.split(".")), reverse=True)
        candidates.extend(v / "bin" for v in versions)
    for bin_dir in candidates:
        if all(os.access(bin_dir / n, os.X_OK) for n in names):
            return bin_dir
    raise PostgresUnavailableError(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found in PATH or "
        f"{DEBIAN_PG_ROOT}/<version>/bin. These tests need a real PostgreSQL server: "
        "`.ci/run` installs Debian's `postgresql` package "
        "(apt-get install postgresql) before running the tests."
    )


def pid_alive(pid: int) -> bool:
    """True when ``pid`` is a running (not zombie) process."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # Field 3 (after the parenthesised command name) is the state; Z/X: exited, unreaped.
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


@contextlib.contextmanager
def _child_subreaper() -> Iterator[None]:
    """While active, orphaned descendants (the daemonised postmaster) become our children.

    ``pg_ctl start`` daemonises the postmaster; its parent exits, so it is re-parented.
    Some containers' PID 1 never reaps, leaving the stopped postmaster a zombie whose PID
    still "exists". Adopting it (Linux ``PR_SET_CHILD_SUBREAPER``) lets ``stop`` reap it.
    Elsewhere this is a no-op and init reaps the postmaster as usual.
    """
    if not sys.platform.startswith("linux"):
        yield
        return
    libc = ctypes.CDLL(None, use_errno=True)
    enabled = libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    try:
        yield
    finally:
        if enabled:
            libc.prctl(_PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def _reap(pid: int) -> None:
    """Collect ``pid``'s exit status if it is our (exited) child; ignore it otherwise."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


class PostgresServer:
    """A throwaway PostgreSQL cluster; use as a context manager.

    Attributes (valid inside the ``with`` block): ``url`` (SQLAlchemy URL of database
    ``fedseg``, ``postgresql+psycopg://fedseg@127.0.0.1:<port>/fedseg``), ``port``,
    ``pid`` (the postmaster's PID), ``base_dir`` (the temp dir removed on exit).
    """

    def __init__(self) -> None:
        self.bin_dir = find_bin_dir()
        self._run_as: list[str] = []
        self._uid_gid: tuple[int, int] | None = None
        if os.geteuid() == 0:
            try:
                entry = pwd.getpwnam(SERVICE_USER)
            except KeyError:
                raise PostgresUnavailableError(
                    "running as root, and initdb refuses root: the PostgreSQL server must "
                    f"run as the '{SERVICE_USER}' system user, which does not exist. "
                    "Debian's `postgresql` package (installed by `.ci/run`) creates it."
                ) from None
            runuser = shutil.which("runuser")
            if runuser is None:
                raise PostgresUnavailableError("running as root but `runuser` is not available")
            self._run_as = [runuser, "-u", SERVICE_USER, "--"]
            self._uid_gid = (entry.pw_uid, entry.pw_gid)
        self.base_dir: Path | None = None
        self.port: int | None = None
        self.pid: int | None = None

    # -- paths -------------------------------------------------------------------------
    @property
    def data_dir(self) -> Path:
        return self._base / "data"

    @property
    def socket_dir(self) -> Path:
        return self._base / "sock"

    @property
    def log_file(self) -> Path:
        return self._base / "postgres.log"

    @property
    def _base(self) -> Path:
        if self.base_dir is None:
            raise RuntimeError("PostgresServer is not started")
        return self.base_dir

    @property
    def url(self) -> str:
        return self.url_for(DATABASE)

    def url_for(self, database: str) -> str:
        """SQLAlchemy URL of ``database`` on this server."""
        if self.port is None:
            raise RuntimeError("PostgresServer is not started")
        return f"postgresql+psycopg://{USER}@{HOST}:{self.port}/{database}"

    # -- lifecycle ---------------------------------------------------------------------
    def __enter__(self) -> PostgresServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Create the cluster, start the server and create database ``fedseg``."""
        self.base_dir = Path(tempfile.mkdtemp(prefix="fedseg-pg-"))
        try:
            self._prepare_dirs()
            self._pg(
                "initdb",
                "-D",
                str(self.data_dir),
                "-A",
                "trust",
                "-U",
                USER,
                "--encoding=UTF8",
                "--no-locale",
                "--no-sync",
            )
            self._start_on_free_port()
            self.new_database(DATABASE)
        except BaseException:
            self.stop()
            raise

    def _prepare_dirs(self) -> None:
        base = self._base
        base.chmod(0o700)
        self.socket_dir.mkdir(mode=0o700)
        if self._uid_gid is not None:
            for path in (base, self.socket_dir):
                os.chown(path, *self._uid_gid)

    def _start_on_free_port(self) -> None:
        for attempt in range(1, START_ATTEMPTS + 1):
            port = _free_port()
            options = f"-h {HOST} -p {port} -k {self.socket_dir} -c fsync=off"
            with _child_subreaper():
                result = self._pg(
                    "pg_ctl",
                    "-D",
                    str(self.data_dir),
                    "-o",
                    options,
                    "-l",
                    str(self.log_file),
                    "-w",
                    "-t",
                    "60",
                    "start",
                    check=False,
                )
            if result.returncode == 0:
                self.port = port
                pid_line = (self.data_dir / "postmaster.pid").read_text().splitlines()[0]
                self.pid = int(pid_line)
                return
            log = self._read_log()
            if "Address already in use" not in log or attempt == START_ATTEMPTS:
                raise RuntimeError(
                    f"pg_ctl start failed (exit {result.returncode}):\n{result.stdout}\n"
                    f"{result.stderr}\n--- {self.log_file} ---\n{log}"
                )
            # Port taken between choosing and binding: try another one, on a fresh log.
            self.log_file.unlink(missing_ok=True)
        raise AssertionError("unreachable")

    def stop(self) -> None:
        """Stop the server (fast), make sure its process is gone, remove the temp dir."""
        try:
            if self.base_dir is not None and (self.data_dir / "postmaster.pid").exists():
                self._pg(
                    "pg_ctl", "-D", str(self.data_dir), "-m", "fast", "-w", "stop", check=False
                )
            if self.pid is not None:
                deadline = time.monotonic() + STOP_GRACE_S
                _reap(self.pid)
                while pid_alive(self.pid) and time.monotonic() < deadline:
                    time.sleep(0.05)
                    _reap(self.pid)
                if pid_alive(self.pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self.pid, signal.SIGKILL)
                    with contextlib.suppress(ChildProcessError):
                        os.waitpid(self.pid, 0)
        finally:
            if self.base_dir is not None:
                shutil.rmtree(self.base_dir, ignore_errors=True)

    # -- databases ---------------------------------------------------------------------
    def new_database(self, name: str) -> str:
        """Create database ``name`` (owned by ``fedseg``) and return its SQLAlchemy URL."""
        conninfo = f"host={HOST} port={self.port} user={USER} dbname=postgres"
        with psycopg.connect(conninfo, autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url_for(name)

    # -- helpers -----------------------------------------------------------------------
    def _read_log(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except OSError:
            return ""

    def _pg(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [*self._run_as, str(self.bin_dir / tool), *args]
        result = subprocess.run(
            cmd,
            cwd=self._base,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT_S,
            check=False,
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(cmd)} failed (exit {result.returncode}):\n"
                f"{result.stdout}\n{result.stderr}"
            )
        return result
