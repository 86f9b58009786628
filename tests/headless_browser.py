"""A real headless Chromium, driven over the DevTools protocol on a pipe (test support).

No WebDriver and no extra Python package: Chromium's ``--remote-debugging-pipe`` reads
DevTools commands (JSON, NUL-terminated) on file descriptor 3 and writes replies and events on
descriptor 4. :class:`HeadlessBrowser` starts Debian's ``chromium-headless-shell`` (or
``chromium``), opens a page, and reports what a person would see: console errors, uncaught
exceptions, failed or network requests, the DOM's answers to JavaScript questions, and a
screenshot. The process is stopped by its PID (``Browser.close``, then SIGKILL if it hangs).

``.ci/run`` installs ``chromium-headless-shell`` when no browser is found.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import queue
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome")


def find_browser() -> str | None:
    """Path of the first installed Chromium build, or None."""
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclass
class PageVisit:
    """What loading one page produced."""

    console_errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    failed_requests: list[str] = field(default_factory=list)
    screenshot: bytes = b""


class BrowserError(RuntimeError):
    """The browser did not answer, or answered a command with an error."""


class HeadlessBrowser:
    """One headless Chromium process and one page in it.

    Use as a context manager::

        with HeadlessBrowser() as browser:
            visit = browser.open(Path("report.html"))
            rows = browser.evaluate("document.querySelectorAll('tr').length")
    """

    def __init__(self, binary: str | None = None, *, timeout: float = 60.0) -> None:
        found = binary or find_browser()
        if found is None:
            raise BrowserError("no Chromium found (install Debian's chromium-headless-shell)")
        self.binary = found
        self.timeout = timeout
        self._next_id = 0
        self._events: queue.Queue[dict[str, Any]] = queue.Queue()
        self._replies: dict[int, dict[str, Any]] = {}
        self._cond = threading.Condition()
        self._profile = tempfile.mkdtemp(prefix="fedseg-chromium-")
        self.proc: subprocess.Popen[bytes] | None = None
        self.session: str | None = None

    # -- process ---------------------------------------------------------------------------

    def __enter__(self) -> HeadlessBrowser:
        cmd_read, cmd_write = os.pipe()
        out_read, out_write = os.pipe()

        def _wire() -> None:  # in the child: commands on fd 3, replies on fd 4
            a = fcntl.fcntl(cmd_read, fcntl.F_DUPFD, 10)
            b = fcntl.fcntl(out_write, fcntl.F_DUPFD, 10)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen(
            [self.binary, "--headless", "--remote-debugging-pipe", "--no-sandbox",
             "--disable-gpu", "--no-first-run", "--no-default-browser-check",
             "--disable-extensions", "--disable-background-networking",
             f"--user-data-dir={self._profile}", "about:blank"],
            pass_fds=(3, 4), preexec_fn=_wire,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(cmd_read)
        os.close(out_write)
        self._writer = os.fdopen(cmd_write, "wb", buffering=0)
        self._reader = threading.Thread(target=self._read, args=(out_read,), daemon=True)
        self._reader.start()
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget",
                                 {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable", session=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the browser (by its own command, then by PID) and remove its profile."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.call("Browser.close", timeout=10)
            except BrowserError:
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        shutil.rmtree(self._profile, ignore_errors=True)

    def _read(self, fd: int) -> None:
        buffer = b""
        with os.fdopen(fd, "rb", buffering=0) as stream:
            while chunk := stream.read(65536):
                buffer += chunk
                while b"\0" in buffer:
                    raw, buffer = buffer.split(b"\0", 1)
                    message = json.loads(raw)
                    if "id" in message:
                        with self._cond:
                            self._replies[message["id"]] = message
                            self._cond.notify_all()
                    else:
                        self._events.put(message)

    # -- protocol --------------------------------------------------------------------------

    def call(self, method: str, params: dict[str, Any] | None = None, *,
             session: bool = False, timeout: float | None = None) -> dict[str, Any]:
        """Send one DevTools command and return its result."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method,
                                   "params": params or {}}
        if session:
            message["sessionId"] = self.session
        try:
            self._writer.write(json.dumps(message).encode() + b"\0")
        except (BrokenPipeError, OSError) as exc:
            raise BrowserError(f"{method}: the browser is gone ({exc})") from exc
        deadline = time.monotonic() + (timeout or self.timeout)
        with self._cond:
            while message["id"] not in self._replies:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BrowserError(f"{method}: no answer within {timeout or self.timeout}s")
                self._cond.wait(left)
            reply = self._replies.pop(message["id"])
        if "error" in reply:
            raise BrowserError(f"{method}: {reply['error']}")
        result: dict[str, Any] = reply.get("result", {})
        return result

    def evaluate(self, expression: str) -> Any:
        """Evaluate JavaScript in the page and return its JSON value."""
        result = self.call("Runtime.evaluate", {"expression": expression,
                                                "returnByValue": True, "awaitPromise": True},
                           session=True)
        if "exceptionDetails" in result:
            raise BrowserError(f"evaluate: {result['exceptionDetails']}")
        return result["result"].get("value")

    def open(self, page: Path, *, width: int = 1280, height: int = 900) -> PageVisit:
        """Load ``page`` (a file), wait for its load event, collect errors and a screenshot."""
        visit = PageVisit()
        self.call("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
                  session=True)
        self.call("Page.navigate", {"url": page.resolve().as_uri()}, session=True)
        deadline = time.monotonic() + self.timeout
        loaded = False
        while not loaded or not self._events.empty():
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError(f"{page}: no load event within {self.timeout}s")
            try:
                event = self._events.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            self._record(event, visit)
            loaded = loaded or event.get("method") == "Page.loadEventFired"
        time.sleep(0.3)  # late console messages (a script's errors after load)
        while not self._events.empty():
            self._record(self._events.get_nowait(), visit)
        shot = self.call("Page.captureScreenshot",
                         {"format": "png", "captureBeyondViewport": True}, session=True)
        visit.screenshot = base64.b64decode(shot["data"])
        return visit

    @staticmethod
    def _record(event: dict[str, Any], visit: PageVisit) -> None:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            visit.console_errors.append(
                " ".join(str(a.get("value", a.get("description", ""))) for a in params["args"]))
        elif method == "Runtime.exceptionThrown":
            visit.console_errors.append(str(params["exceptionDetails"].get("text")))
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            visit.console_errors.append(str(params["entry"].get("text")))
        elif method == "Network.requestWillBeSent":
            visit.requests.append(str(params["request"]["url"]))
        elif method == "Network.loadingFailed":
            visit.failed_requests.append(str(params.get("errorText")))
