"""A real Flower 1.42 deployment on 127.0.0.1 for tests: SuperLink (TLS, SuperNode auth), nodes.

Every process is started in its own session and stopped by its PID's process group (never by
name); logs go to files the tests read. Facts used: docs/FLOWER-1.42-DEPLOYMENT-FACTS.md.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from common.pki import PkiPaths, init_pki, site_keys

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Deployment:
    """SuperLink + SuperNodes as OS processes under ``root`` (a test's tmp directory)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.pki = PkiPaths(root / "pki")
        self.home = root / "flwr-home"
        self.logs = root / "logs"
        self.port = free_port()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                    "FLWR_HOME": str(self.home), "FLWR_TELEMETRY_ENABLED": "0",
                    "FLWR_DISABLE_UPDATE_CHECK": "1",
                    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}

    # -- processes ---------------------------------------------------------------------------

    def _start(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        self.logs.mkdir(parents=True, exist_ok=True)
        log = (self.logs / f"{name}.log").open("wb")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                cwd=self.root, start_new_session=True)
        log.close()
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text("utf-8", errors="replace") if path.exists() else ""

    def wait_for(self, name: str, text: str, *, timeout: float = 60.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log(name):
                return True
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is not None:
                return text in self.log(name)
            time.sleep(0.2)
        return False

    def stop(self) -> None:
        """Stop every process this deployment started, by process group, then by PID."""
        for proc in self.procs.values():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for proc in self.procs.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=10)

    # -- set-up ------------------------------------------------------------------------------

    def start_superlink(self) -> None:
        init_pki(self.pki.root)
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "config.toml").write_text(
            '[superlink]\ndefault = "local"\n\n[superlink.local]\n'
            f'address = "127.0.0.1:{self.port}"\n'
            f'root-certificates = "{self.pki.ca_cert.resolve()}"\n', "utf-8")
        self._start("superlink", [
            str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(self.pki.ca_cert),
            "--ssl-certfile", str(self.pki.server_cert), "--ssl-keyfile",
            str(self.pki.server_key), "--enable-supernode-auth", "--host", "127.0.0.1",
            "--port", str(self.port), "--database", str(self.root / "superlink.db"),
            "--disable-runtime-dependency-installation"])
        if not self.wait_for("superlink", "Uvicorn running on https://127.0.0.1"):
            raise RuntimeError("SuperLink did not start:\n" + self.log("superlink")[-3000:])

    def site_key(self, site: str) -> Path:
        return site_keys(self.pki.root, site)

    def register(self, site: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "flwr"), "supernode", "register",
                               str(self.pki.site_dir(site) / "auth.pub"), "local"],
                              capture_output=True, text=True, env=self.env, cwd=self.root,
                              timeout=60, check=False)

    def start_supernode(self, site: str, *, node_config: str = "", ca: Path | None = None,
                        auth: bool = True, max_retries: int | None = None) -> None:
        argv = [str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{self.port}",
                "--root-certificates", str(ca or self.pki.ca_cert), "--port", str(free_port())]
        if auth:
            argv += ["--auth-supernode-private-key", str(self.pki.site_dir(site) / "auth.key")]
        if node_config:
            argv += ["--node-config", node_config]
        if max_retries is not None:
            argv += ["--max-retries", str(max_retries)]
        self._start(f"supernode-{site}", argv)
