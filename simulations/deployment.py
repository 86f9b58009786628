"""A real Flower 1.42 deployment on 127.0.0.1: SuperLink (TLS, SuperNode auth) and SuperNodes.

Used by the deployment tests and the latency benchmark (``simulations/bench/deployment.py``).
Every process is started in its own session and stopped by its PID's process group (never by
name); logs go to files the callers read. Facts used: docs/FLOWER-1.42-DEPLOYMENT-FACTS.md.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from common.pki import PkiPaths, init_pki, site_keys

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parent.parent
"""The fedseg project directory: the app ``flwr run`` submits."""
ROUND_LINE = re.compile(r"\[fedseg\] round +(\d+) (\w+) +sites=(\d+).* ([0-9.]+)s")


def free_port() -> int:
    """Return a TCP port free on 127.0.0.1 now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Deployment:
    """SuperLink + SuperNodes as OS processes under ``root`` (a test's tmp directory)."""

    def __init__(self, root: Path, *, database: bool = False) -> None:
        self.root = root
        self.database = database  # True: the SuperLink keeps its state in superlink.db
        self.pki = PkiPaths(root / "pki")
        self.home = root / "flwr-home"
        self.logs = root / "logs"
        self.port = free_port()
        self.procs: dict[str, subprocess.Popen[Any]] = {}
        self.node_ids: dict[str, str] = {}
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
        """Return what process ``name`` has logged so far."""
        path = self.logs / f"{name}.log"
        return path.read_text("utf-8", errors="replace") if path.exists() else ""

    def wait_for(self, name: str, text: str, *, timeout: float = 60.0) -> bool:
        """Wait until process ``name`` logs ``text``; False on timeout or exit without it."""
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
        """Create the PKI and the flwr connection profile; start the SuperLink (TLS, auth)."""
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
            "--port", str(self.port),
            *(["--database", str(self.root / "superlink.db")] if self.database else []),
            "--disable-runtime-dependency-installation"])
        if not self.wait_for("superlink", "Uvicorn running on https://127.0.0.1"):
            raise RuntimeError("SuperLink did not start:\n" + self.log("superlink")[-3000:])

    def site_key(self, site: str) -> Path:
        """Create the site's authentication key pair (``fedseg-pki site``)."""
        return site_keys(self.pki.root, site)

    def register(self, site: str) -> subprocess.CompletedProcess[str]:
        """Register the site's public key under its name (``flwr supernode register``)."""
        done = subprocess.run([str(BIN / "flwr"), "supernode", "register",
                               str(self.pki.site_dir(site) / "auth.pub"), "local",
                               "--name", site],
                              capture_output=True, text=True, env=self.env, cwd=self.root,
                              timeout=60, check=False)
        match = re.search(r"SuperNode (\d+) registered", done.stdout)
        if match:
            self.node_ids[site] = match.group(1)
        return done

    def node_status(self, site: str) -> str:
        """Return the SuperLink's view of a site: ``registered``, ``online``, ``offline``."""
        listed = subprocess.run([str(BIN / "flwr"), "supernode", "list", "local", "--format",
                                 "json"], capture_output=True, text=True, env=self.env,
                                cwd=self.root, timeout=60, check=False)
        try:
            nodes = json.loads(listed.stdout).get("nodes", [])
        except json.JSONDecodeError:
            return "unknown"
        return next((str(n["status"]) for n in nodes
                     if n.get("node-id") == self.node_ids.get(site)), "unknown")

    def restart_supernode(self, site: str, *, timeout: float = 180, **kwargs: Any) -> None:
        """Start a killed site again once the SuperLink has marked it offline.

        Flower refuses to activate a node it still holds online; it marks a node whose process
        died offline about a minute after its last heartbeat (a service manager's restart
        loop, e.g. systemd's ``Restart=on-failure``, rides this out the same way).
        """
        deadline = time.monotonic() + timeout
        while self.node_status(site) == "online":
            if time.monotonic() > deadline:
                raise RuntimeError(f"the SuperLink still holds {site} online")
            time.sleep(2)
        self.start_supernode(site, **kwargs)

    def start_supernode(self, site: str, *, node_config: str = "", ca: Path | None = None,
                        auth: bool = True, max_retries: int | None = None,
                        program: str = "fedseg-supernode", extra: list[str] | None = None,
                        ) -> None:
        """Start a site's SuperNode (``fedseg-supernode``, or Flower's ``flower-supernode``)."""
        argv = [str(BIN / program), "--superlink", f"127.0.0.1:{self.port}",
                "--root-certificates", str(ca or self.pki.ca_cert), "--port", str(free_port())]
        if auth:
            argv += ["--auth-supernode-private-key", str(self.pki.site_dir(site) / "auth.key")]
        if node_config:
            argv += ["--node-config", node_config]
        if max_retries is not None:
            argv += ["--max-retries", str(max_retries)]
        self._start(f"supernode-{site}", [*argv, *(extra or [])])

    @staticmethod
    def node_config(contract: Path | str, site: str, state_dir: Path | str,
                    site_overrides: str = "") -> str:
        """Return a site's ``--node-config``: its contract, name, directory and own policy."""
        return (f'fedseg-contract="{contract}" fedseg-site-name="{site}" '
                f'fedseg-site-dir="{state_dir}" fedseg-site-overrides="{site_overrides}"')

    def start_sites(self, contracts: Sequence[Path], *, state_dir: Path, site_overrides: str = "",
                    program: str = "fedseg-supernode", extra: list[str] | None = None,
                    ) -> list[str]:
        """Register ``site0``, ``site1``, ... and start their SuperNodes; wait until connected.

        Each site reads its own contract; raises ``RuntimeError`` with the log of a site that
        could not register or connect.
        """
        names = [f"site{i}" for i in range(len(contracts))]
        for name, contract in zip(names, contracts, strict=True):
            self.site_key(name)
            registered = self.register(name)
            if registered.returncode != 0:
                raise RuntimeError(registered.stdout + registered.stderr)
            self.start_supernode(name, program=program, extra=extra, node_config=self.node_config(
                contract, name, state_dir, site_overrides))
        for name in names:
            if not self.wait_for(f"supernode-{name}", "SuperNode ID:", timeout=120):
                raise RuntimeError(self.log(f"supernode-{name}")[-3000:])
        return names

    def kill(self, name: str) -> None:
        """SIGKILL a process (and its process group) this deployment started."""
        proc = self.procs[name]
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)

    def flwr_run(self, run_config: str, *, timeout: float = 900,
                 on_line: Callable[[str], None] | None = None,
                 app: Path = REPO) -> FlwrRun:
        """Submit ``app`` (fedseg) with ``flwr run --stream``; return its output and final status.

        ``flwr run --stream`` exits 0 even when the ServerApp failed, so the status comes from
        ``flwr list --run-id``. ``on_line`` sees every streamed line as it arrives (a test uses
        it to kill a SuperNode mid-run).
        """
        argv = [str(BIN / "flwr"), "run", str(app), "local", "--stream", "--run-config",
                run_config]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env=self.env, cwd=self.root, text=True, start_new_session=True)
        self.procs["flwr-run"] = proc
        lines: list[str] = []
        deadline = time.monotonic() + timeout
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if on_line is not None:
                on_line(line)
            if time.monotonic() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                break
        proc.wait(timeout=30)
        output = "".join(lines)
        match = re.search(r"Successfully started run (\d+)", output)
        status = "not started"
        if match:
            listed = subprocess.run(
                [str(BIN / "flwr"), "list", "local", "--run-id", match.group(1), "--format",
                 "json"], capture_output=True, text=True, env=self.env, cwd=self.root,
                timeout=60, check=False)
            try:
                runs = json.loads(listed.stdout).get("runs", [])
                status = str(runs[0].get("status", "unknown")) if runs else "unknown"
            except json.JSONDecodeError:
                status = "unknown: " + listed.stdout[-300:]
        return FlwrRun(output=output, status=status,
                       run_id=int(match.group(1)) if match else None)


class FlwrRun:
    """What one ``flwr run`` left: its streamed output and the run's final status."""

    def __init__(self, *, output: str, status: str, run_id: int | None) -> None:
        self.output, self.status, self.run_id = output, status, run_id

    @property
    def completed(self) -> bool:
        """Whether Flower recorded the run as ``finished:completed``."""
        return self.status == "finished:completed"

    def round_seconds(self) -> list[tuple[int, str, int, float]]:
        """``(round, phase, sites, seconds)`` of every round the ServerApp printed."""
        return [(int(m[1]), m[2], int(m[3]), float(m[4]))
                for m in ROUND_LINE.finditer(self.output)]
