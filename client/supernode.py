"""``fedseg-supernode``: Flower 1.42's SuperNode, with the site's own long-lived ClientApp.

A site's IT team starts this instead of ``flower-supernode``; it takes exactly the same
arguments (``--superlink``, ``--root-certificates``, ``--auth-supernode-private-key``,
``--node-config``, ``--port`` ...) and runs Flower's own SuperNode in this process, with two
changes, both for the site's sake:

1. **The site runs its own installed ClientApp, in one long-lived worker.** Flower's default
   (``--isolation subprocess``) starts a fresh ``flwr-clientapp`` process for every message and
   runs the code of the app bundle *the server submitted*. Here the SuperNode runs with
   ``--isolation process`` and a worker thread of this process takes each task from the
   SuperNode's local Runtime API and answers it with :data:`client.deploy.client_app` -- the
   fedseg installed on this machine, which checks every request against the site's own policy.
   The app is imported once, and the site's privacy gate stays open between messages (consent,
   erasures and the source are still checked at every round).
2. **Short polls while a run is active.** Flower 1.42's SuperNode waits a hard-coded 3 s
   between two empty pulls from the SuperLink and 0.5 s between two looks for the ClientApp's
   reply; a SecAgg+ round pays both on each of its four stages. This launcher polls the
   SuperLink every ``--fedseg-poll`` seconds for ``--fedseg-active-window`` seconds after the
   last message and every ``--fedseg-idle-poll`` seconds otherwise (one small request a
   second per idle site), and the worker wakes the loop as soon as a reply is ready.

Measured effect and the facts behind it: docs/DEPLOYMENT.md ("Round latency").
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
import types
from collections.abc import Callable, Sequence
from typing import Any

FLOWER_VERSION = "1.42.0"
"""The Flower release whose SuperNode internals this launcher was written against."""
DEFAULT_POLL = 0.2
DEFAULT_ACTIVE_WINDOW = 120.0
FLOWER_IDLE_POLL = 3.0
"""The idle poll hard-coded in Flower 1.42's SuperNode loop."""
DEFAULT_IDLE_POLL = 1.0
HEARTBEAT_EVERY = 10.0
"""Seconds between two task heartbeats while the worker computes (Flower expires a claimed
task after 30 s without one)."""

log = logging.getLogger("fedseg.supernode")


class PollClock:
    """Stand-in for the ``time`` module inside Flower's SuperNode loop.

    ``sleep`` of the idle poll (Flower's 3 s) becomes ``fast`` while a message arrived within
    the last ``window`` seconds, and ``idle_poll`` otherwise. Every shorter wait -- the loop
    looking for the ClientApp's reply every 0.5 s -- ends as soon as the site worker signals
    :attr:`reply_ready` (at most ``fast``).
    Everything else is the real ``time`` module. :attr:`task_ready` is set whenever the loop
    has stored a new message, so the worker takes it at once instead of polling for it.
    """

    def __init__(self, *, fast: float, window: float, idle: float = FLOWER_IDLE_POLL,
                 idle_poll: float | None = None) -> None:
        self.fast, self.window, self.idle = fast, window, idle
        self.idle_poll = idle if idle_poll is None else idle_poll
        self.last_activity = float("-inf")
        self.task_ready = threading.Event()
        self.reply_ready = threading.Event()

    def touch(self) -> None:
        """Note that a message arrived now, and wake the worker."""
        self.last_activity = time.monotonic()
        self.task_ready.set()

    def sleep(self, seconds: float) -> None:
        """Sleep for the shortened interval (see the class docstring)."""
        if seconds >= self.idle:
            active = time.monotonic() - self.last_activity < self.window
            time.sleep(self.fast if active else self.idle_poll)
        else:
            self.reply_ready.wait(min(seconds, self.fast))
            self.reply_ready.clear()

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def install_poll_clock(module: types.ModuleType, clock: PollClock) -> None:
    """Put ``clock`` in place of ``module.time`` and note every message the loop pulls.

    ``module`` is ``flwr.supernode.start_client_internal``: its loop calls the module-level
    ``time.sleep`` and ``_pull_and_store_message`` (which returns the run id of a pulled
    message, None when there was none).
    """
    pull = module._pull_and_store_message

    def pull_and_note(*args: Any, **kwargs: Any) -> Any:
        run_id = pull(*args, **kwargs)
        if run_id is not None:
            clock.touch()
        return run_id

    module.time = clock  # type: ignore[attr-defined]
    module._pull_and_store_message = pull_and_note  # type: ignore[attr-defined]


class SiteWorker:
    """Take tasks from the SuperNode's Runtime API and answer them with one ClientApp.

    Parameters
    ----------
    runtime_address : str
        ``host:port`` of the SuperNode's local Runtime API (its ``--host``/``--port``).
    app : callable
        ``(message, context) -> reply``: the site's ClientApp.
    clock : PollClock
        Shared with the SuperNode loop: it wakes the worker when a message is stored
        (``task_ready``) and is woken when a reply is pushed (``reply_ready``).
    idle_poll : float, default=1.0
        Seconds between two looks for a task when nothing woke the worker.
    """

    def __init__(self, runtime_address: str, app: Callable[[Any, Any], Any], *,
                 clock: PollClock, idle_poll: float = 1.0) -> None:
        self.runtime_address = runtime_address
        self.app = app
        self.clock = clock
        self.idle_poll = idle_poll
        self.stop = threading.Event()
        self.tasks = 0

    def _client(self, token: str | None = None) -> Any:
        from flwr.supercore.interceptors import (
            RuntimeTokenHttpInterceptor,
            RuntimeVersionHttpInterceptor,
        )
        from flwr.supercore.runtime import RuntimeHttpClient

        interceptors: list[Any] = [RuntimeVersionHttpInterceptor(component_name="SuperExec"
                                                                 if token is None
                                                                 else "flwr-clientapp")]
        if token is not None:
            interceptors.append(RuntimeTokenHttpInterceptor(token))
        return RuntimeHttpClient.from_server_address(
            server_address=self.runtime_address, insecure=True, root_certificates=None,
            interceptors=interceptors, retry_invoker=site_retry_invoker())

    def run(self) -> None:
        """Serve tasks until :attr:`stop` is set."""
        from flwr.proto.runtime_pb2 import AcquireTaskRequest
        from flwr.supercore.constant import TaskType

        client = self._client()
        request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
        try:
            self._serve_forever(client, request)
        except BaseException as exc:  # a stalled SuperNode is worse than a restart
            if not self.stop.is_set():
                log.error("the site worker stopped (%s); stopping the SuperNode so that its "
                          "service manager restarts it", type(exc).__name__)
                print(f"fedseg-supernode: the site worker stopped ({type(exc).__name__}: "
                      f"{exc}); exiting", file=sys.stderr, flush=True)
                os.kill(os.getpid(), signal.SIGTERM)
        finally:
            client.close()

    def _serve_forever(self, client: Any, request: Any) -> None:
        while not self.stop.is_set():
            try:
                response = client.AcquireTask(request)
            except Exception as exc:  # the Runtime API not up yet, or restarting
                log.debug("waiting for the SuperNode's Runtime API: %s", exc)
                self.stop.wait(0.5)
                continue
            if response.HasField("task") and response.token:
                self.serve(response.token)
                self.clock.reply_ready.set()
                continue  # another task may be waiting: look again at once
            self.clock.task_ready.wait(self.idle_poll)
            self.clock.task_ready.clear()

    def serve(self, token: str) -> None:
        """Answer one task: pull its message and context, run the app, push the reply."""
        from flwr.app import Message
        from flwr.app.error import Error
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest
        from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

        client = self._client(token)
        done = threading.Event()

        def heartbeat() -> None:
            while not done.wait(HEARTBEAT_EVERY):
                try:
                    client.SendTaskHeartbeat(SendTaskHeartbeatRequest())
                except Exception as exc:  # the task ends anyway once the reply is pushed
                    log.debug("task heartbeat failed: %s", exc)

        beats = threading.Thread(target=heartbeat, name="fedseg-task-heartbeat", daemon=True)
        beats.start()
        context, message, pushed = None, None, False
        status, details = SubStatus.FAILED, "the site's ClientApp did not answer"
        try:
            message, context = pull_task_input(client, backoff=0.02)
            try:
                reply = self.app(message, context)
                status, details = SubStatus.COMPLETED, ""
            except Exception as exc:  # fedseg's boundary mod sanitises its own errors
                log.error("the site's ClientApp raised %s", type(exc).__name__)
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                      reason="the site's ClientApp failed; see its site log"),
                                reply_to=message)
            push_message(client, reply, context)
            pushed = True
            self.tasks += 1
        except Exception as exc:
            log.error("task failed between the SuperNode and the site worker: %s",
                      type(exc).__name__)
            status, details = SubStatus.FAILED, f"site worker: {type(exc).__name__}"
        finally:
            done.set()
            beats.join()
        if message is not None and context is not None and not pushed:
            # The SuperNode waits for a reply to every message it handed out: send an error
            # one, or it would never pull another message.
            try:
                push_message(client, Message(Error(
                    code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                    reason="the site could not answer this message"), reply_to=message),
                    context)
                pushed = True
            except Exception as exc:
                log.error("could not send an error reply either: %s", type(exc).__name__)
        try:
            push_task_output(client=client, context=context, sub_status=status,
                             details=details)
        finally:
            client.close()
        if message is not None and not pushed:
            raise WorkerStalled("a message was handed out and no reply could be sent")


class WorkerStalled(RuntimeError):
    """The SuperNode holds a message the worker could not answer: restart the process."""


def site_retry_invoker() -> Any:
    """Retry the local Runtime API's transient failures briefly; never signal the process.

    Flower's ``make_simple_http_retry_invoker`` sends SIGINT to its own process on an HTTP
    401 -- right for a one-shot ``flwr-clientapp``, fatal here, where the process is the
    SuperNode. A refused request (4xx) is raised to the worker, which ends that task.
    """
    import httpx
    from flwr.supercore.retry.retry_invoker import RetryInvoker, exponential

    def give_up(exc: Exception) -> bool:
        if isinstance(exc, httpx.HTTPStatusError):
            return exc.response.status_code not in (502, 503, 504)
        return False

    return RetryInvoker(wait_gen_factory=lambda: exponential(base_delay=0.05, max_delay=1),
                        recoverable_exceptions=(httpx.TransportError, httpx.HTTPStatusError),
                        max_tries=8, max_time=10.0, should_giveup=give_up)


def pull_task_input(client: Any, *, backoff: float) -> tuple[Any, Any]:
    """Pull a task's message and context from the SuperNode's Runtime API.

    Flower's ``run_clientapp.pull_task_input`` with a short retry: the SuperNode hands out a
    task before it has finished pulling the message's objects from the SuperLink, and Flower's
    retry starts at 1 s and doubles (``PULL_INITIAL_BACKOFF``), which a one-shot process pays
    once but a SecAgg+ round pays on every stage. The app bundle (FAB) is not fetched: the site
    answers with its own installed fedseg.
    """
    from flwr.app import Message
    from flwr.common.serde import context_from_proto
    from flwr.proto.node_pb2 import Node
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest
    from flwr.supercore.inflatable.inflatable_protobuf_utils import (
        make_confirm_message_received_fn_protobuf,
        make_pull_object_fn_protobuf,
    )
    from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
    from flwr.supercore.task_identity import TaskIdentity

    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id, TaskIdentity.run_id = res.task_id, res.run.run_id
    TaskIdentity.node_id = res.context.node_id
    context = context_from_proto(res.context)
    pulled = client.PullMessages(PullAppMessagesRequest())
    for _ in range(100):  # the SuperNode creates the task a moment before storing its message
        if pulled.messages_list:
            break
        time.sleep(0.02)
        pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("the SuperNode handed out a task without a message")
    node = Node(node_id=context.node_id)
    tree = pulled.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree, make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node,
                                                  context.run_id),
        return_type=Message, initial_backoff=backoff, backoff_cap=max(backoff, 0.5))
    message.metadata.__dict__["_message_id"] = tree.object_id
    return message, context


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedseg-supernode", add_help=False,
        description="Run a fedseg site: Flower's SuperNode with the site's own long-lived "
                    "ClientApp. Every other argument is flower-supernode's (see below).")
    parser.add_argument("--fedseg-poll", type=float, default=DEFAULT_POLL, metavar="SECONDS",
                        help="seconds between two looks for work while a run is active "
                             f"(default {DEFAULT_POLL}; Flower 1.42's own: 3 s)")
    parser.add_argument("--fedseg-active-window", type=float, default=DEFAULT_ACTIVE_WINDOW,
                        metavar="SECONDS",
                        help="keep polling fast this long after the last message, then fall "
                             "back to --fedseg-idle-poll (default "
                             f"{DEFAULT_ACTIVE_WINDOW:g})")
    parser.add_argument("--fedseg-idle-poll", type=float, default=DEFAULT_IDLE_POLL,
                        metavar="SECONDS",
                        help="seconds between two looks for work when no run is active "
                             f"(default {DEFAULT_IDLE_POLL:g}; Flower 1.42's own: 3 s)")
    parser.add_argument("-h", "--help", action="store_true")
    return parser


def _flower_option(argv: Sequence[str], name: str, default: str) -> str:
    """Return the value of ``--name VALUE`` / ``--name=VALUE`` in ``argv`` (last wins)."""
    value = default
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fedseg-supernode``."""
    args = list(sys.argv[1:] if argv is None else argv)
    ours, flower_args = _parser().parse_known_args(args)
    if ours.help:
        _parser().print_help()
        print("\nflower-supernode's arguments (all accepted here):\n")
        from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

        _parse_args_run_supernode().print_help()
        return 0
    for name, value in (("--fedseg-poll", ours.fedseg_poll),
                        ("--fedseg-active-window", ours.fedseg_active_window),
                        ("--fedseg-idle-poll", ours.fedseg_idle_poll)):
        if not 0 < value <= 3600:
            print(f"fedseg-supernode: {name}={value} should be in (0, 3600] seconds.",
                  file=sys.stderr)
            return 2
    unsupported = [a for a in flower_args if a.split("=", 1)[0] in (
        "--superexec-auth-secret-file", "--ssl-certfile", "--ssl-keyfile", "--ssl-ca-certfile")]
    if unsupported:
        print(f"fedseg-supernode: {unsupported[0].split('=', 1)[0]} is not supported: the site "
              "worker runs in this process and reaches the SuperNode's Runtime API on "
              "loopback without TLS or a SuperExec secret.", file=sys.stderr)
        return 2
    isolation = _flower_option(flower_args, "--isolation", "process")
    if isolation != "process":
        print("fedseg-supernode: the site's ClientApp runs in this process (--isolation "
              f"process); got --isolation {isolation}. Use flower-supernode for Flower's "
              "subprocess isolation.", file=sys.stderr)
        return 2
    import flwr
    from flwr.supernode import start_client_internal

    if flwr.__version__ != FLOWER_VERSION:
        print(f"fedseg-supernode: written for Flower {FLOWER_VERSION}, found "
              f"{flwr.__version__}; install the pinned version (pyproject.toml).",
              file=sys.stderr)
        return 2
    clock = PollClock(fast=ours.fedseg_poll, window=ours.fedseg_active_window,
                      idle_poll=ours.fedseg_idle_poll)
    install_poll_clock(start_client_internal, clock)

    from client.deploy import client_app, prepare
    from common.errors import FedsegError

    node_config = _flower_option(flower_args, "--node-config", "")
    if node_config:
        from flwr.common.config import parse_config_args

        try:
            print(f"fedseg-supernode: {prepare(parse_config_args([node_config]))}", flush=True)
        except FedsegError as exc:
            print(f"fedseg-supernode: {exc}", file=sys.stderr)
            return 2
        except Exception as exc:  # e.g. a TOML error in --node-config
            print(f"fedseg-supernode: could not read --node-config: {exc}", file=sys.stderr)
            return 2
    host = _flower_option(flower_args, "--host", "127.0.0.1")
    port = _flower_option(flower_args, "--port", "9094")
    worker = SiteWorker(f"{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}",
                        client_app, clock=clock)
    thread = threading.Thread(target=worker.run, name="fedseg-site-worker", daemon=True)
    thread.start()
    sys.argv = ["flower-supernode", *flower_args, "--isolation", "process"]
    from flwr.supernode.cli.flower_supernode import flower_supernode

    try:
        flower_supernode()
    finally:
        worker.stop.set()
    return 0


if __name__ == "__main__":
    sys.exit(main())
