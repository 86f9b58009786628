"""The deployment pieces that run without processes: the server's grid, the site launcher."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable

import pytest
from flwr.app import Context, Message, MessageType, Metadata, RecordDict
from flwr.app.error import Error
from flwr.proto.node_pb2 import NodeInfo
from flwr.serverapp import Grid

from client import deploy, supernode
from common.errors import ConfigError
from server.grid import FastPollGrid, site_names


class LoopbackGrid(Grid):
    """A grid whose nodes answer (or not) after a delay; stands in for the SuperLink only."""

    def __init__(self, answers: dict[int, tuple[float, str | None] | None],
                 names: dict[int, str] | None = None) -> None:
        self.answers = answers  # node -> (delay s, error reason or None) | None: never
        self.names = names or {}
        self.sent: dict[str, tuple[Message, float]] = {}
        self.pulls = 0

    def set_run(self, run):  # pragma: no cover - not used
        raise AssertionError("the code under test must not call this grid method")

    @property
    def run(self):  # pragma: no cover - not used
        raise AssertionError("the code under test must not call this grid method")

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        metadata = Metadata(run_id=1, message_id="", src_node_id=0, dst_node_id=dst_node_id,
                            reply_to_message_id="", group_id=group_id,
                            created_at=time.time(), ttl=600.0, message_type=message_type)
        return Message(content=content, metadata=metadata)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.answers)

    def get_nodes(self):
        return [NodeInfo(node_id=n, name=self.names.get(n, "")) for n in self.answers]

    def push_messages(self, messages):
        ids = []
        for i, message in enumerate(messages):
            mid = f"m{len(self.sent) + i}-{message.metadata.dst_node_id}"
            self.sent[mid] = (message, time.monotonic())
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids):
        self.pulls += 1
        replies = []
        for mid in message_ids:
            message, sent_at = self.sent[mid]
            answer = self.answers[message.metadata.dst_node_id]
            if answer is None or time.monotonic() - sent_at < answer[0]:
                continue
            message.metadata.__dict__["_message_id"] = mid
            if answer[1] is None:
                reply = Message(RecordDict(), reply_to=message)
            else:
                reply = Message(Error(code=0, reason=answer[1]), reply_to=message)
            replies.append(reply)
        return replies

    def send_and_receive(self, messages, *, timeout=None):  # pragma: no cover - Flower's
        raise AssertionError("FastPollGrid must not use the wrapped grid's slow wait")


def _messages(grid: Grid, nodes: list[int]) -> list[Message]:
    return [grid.create_message(RecordDict(), MessageType.TRAIN, n, "1") for n in nodes]


def test_replies_are_collected_as_soon_as_the_last_one_lands():
    inner = LoopbackGrid({1: (0.0, None), 2: (0.3, None)})
    grid = FastPollGrid(inner, poll_interval=0.02)
    started = time.monotonic()
    replies = list(grid.send_and_receive(_messages(grid, [1, 2]), timeout=5))
    assert sorted(r.metadata.src_node_id for r in replies) == [1, 2]
    assert grid.dropouts == []
    assert time.monotonic() - started < 1.5  # not Flower's 3 s
    assert inner.pulls >= 2


def test_a_silent_site_and_an_error_reply_are_named_with_their_stage():
    inner = LoopbackGrid({1: (0.0, None), 2: None, 3: (0.0, "Error: Node Unavailable — x")},
                         names={1: "north", 2: "south", 3: "east"})
    grid = FastPollGrid(inner, poll_interval=0.02)
    grid.names = site_names(grid)
    grid.begin_round(4, "fit")
    grid.stage = "share_keys"
    replies = list(grid.send_and_receive(_messages(grid, [1, 2, 3]), timeout=0.2))
    assert len(replies) == 2
    lost = {d.site: d for d in grid.round_dropouts()}
    assert set(lost) == {"south", "east"}
    assert lost["south"].reason == "no reply within 0.2 s"
    assert lost["east"].reason == "offline (Flower: no heartbeat)"
    assert {d.round for d in lost.values()} == {4}
    assert {d.stage for d in lost.values()} == {"share_keys"}
    # a later stage of the same round does not list a site twice
    grid.stage = "unmask"
    list(grid.send_and_receive(_messages(grid, [2]), timeout=0.05))
    assert [d.site for d in grid.round_dropouts()].count("south") == 1
    assert len(grid.dropouts) == 3


def test_nodes_without_a_registered_name_are_named_by_id():
    assert site_names(LoopbackGrid({7: None, 8: None}, names={8: "lisbon"})) == \
        {7: "node 7", 8: "lisbon"}


@pytest.mark.parametrize("poll", [0.0, -1.0, 11.0])
def test_a_poll_interval_out_of_range_is_a_config_error(poll):
    with pytest.raises(ConfigError, match=r"federation\.poll_interval"):
        FastPollGrid(LoopbackGrid({}), poll_interval=poll)


# --- fedseg-supernode ---------------------------------------------------------------------

def test_the_idle_poll_is_short_only_while_a_run_is_active():
    clock = supernode.PollClock(fast=0.01, window=0.3, idle=0.5, idle_poll=0.25)
    started = time.monotonic()
    clock.sleep(0.5)  # nothing arrived yet: the idle interval
    assert 0.24 <= time.monotonic() - started < 0.45
    clock.touch()
    assert clock.task_ready.is_set()
    started = time.monotonic()
    clock.sleep(0.5)
    assert time.monotonic() - started < 0.15
    time.sleep(0.35)  # the active window has passed
    started = time.monotonic()
    clock.sleep(0.5)
    assert time.monotonic() - started >= 0.24


def test_the_reply_wait_ends_when_the_worker_signals():
    clock = supernode.PollClock(fast=5.0, window=1.0, idle=10.0)
    threading.Timer(0.05, clock.reply_ready.set).start()
    started = time.monotonic()
    clock.sleep(0.5)  # Flower's reply poll
    assert time.monotonic() - started < 0.4
    assert not clock.reply_ready.is_set()


def test_the_clock_is_the_time_module_for_everything_else():
    clock = supernode.PollClock(fast=0.1, window=1.0)
    assert abs(clock.time() - time.time()) < 1
    assert clock.monotonic is time.monotonic


def test_install_keeps_flowers_pull_and_notes_each_message():
    import types

    calls = []
    module = types.ModuleType("fake_loop")
    module._pull_and_store_message = lambda **kw: calls.append(kw) or kw.get("run")
    clock = supernode.PollClock(fast=0.1, window=60)
    supernode.install_poll_clock(module, clock)
    assert module.time is clock
    assert module._pull_and_store_message(run=None) is None
    assert not clock.task_ready.is_set()
    assert module._pull_and_store_message(run=12) == 12
    assert clock.task_ready.is_set() and len(calls) == 2


@pytest.mark.parametrize(("argv", "value"), [
    (["--port", "9100"], "9100"), (["--port=9101"], "9101"), ([], "9094"),
    (["--port", "1", "--port", "2"], "2"),
])
def test_flower_options_are_read_like_argparse(argv, value):
    assert supernode._flower_option(argv, "--port", "9094") == value


def test_subprocess_isolation_is_refused_with_a_reason(capsys):
    assert supernode.main(["--isolation", "subprocess", "--superlink", "127.0.0.1:1"]) == 2
    assert "--isolation process" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--fedseg-poll", "--fedseg-active-window",
                                  "--fedseg-idle-poll"])
def test_a_bad_poll_setting_is_refused(flag, capsys):
    assert supernode.main([flag, "0"]) == 2
    assert flag in capsys.readouterr().err


def test_help_lists_fedsegs_and_flowers_options(capsys):
    assert supernode.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--fedseg-poll" in out and "--auth-supernode-private-key" in out


def test_a_site_without_a_contract_is_told_which_node_config_to_set():
    context = Context(run_id=1, node_id=2, node_config={}, state=RecordDict(), run_config={})
    message = Message(RecordDict(), metadata=Metadata(
        run_id=1, message_id="m", src_node_id=0, dst_node_id=2, reply_to_message_id="",
        group_id="1", created_at=time.time(), ttl=60.0, message_type=MessageType.TRAIN))
    with pytest.raises(ConfigError, match="fedseg-contract"):
        deploy._site_main(message, context)


def test_a_contract_site_writes_its_audit_where_fedseg_site_looks(tmp_path, monkeypatch):
    """No fedseg-site-name / -dir in the node config: the contract's name and state_dir."""
    import json

    from client.site_files import SiteFiles
    from tests.gate_sites import make_site

    monkeypatch.delenv("FEDSEG_SITE_DIR", raising=False)
    contract = make_site(tmp_path / "north", site={"name": "north", "state_dir": "state"})
    context = Context(run_id=1, node_id=2, node_config={"fedseg-contract": str(contract)},
                      state=RecordDict(), run_config={"fedseg-overrides": "privacy=none"})
    message = Message(RecordDict(), metadata=Metadata(
        run_id=1, message_id="m", src_node_id=0, dst_node_id=2, reply_to_message_id="",
        group_id="1", created_at=time.time(), ttl=60.0, message_type=MessageType.TRAIN))
    reply = deploy.client_app(message, context)
    assert reply.has_error()  # a plain request: the site's default policy wants SecAgg+
    log = SiteFiles(tmp_path / "north" / "state", "north").audit_log
    entries = [json.loads(line) for line in log.read_text("utf-8").splitlines()]
    assert entries[-1]["site"] == "north" and entries[-1]["error_code"] == "protocol"


def test_a_broken_contract_stops_the_supernode_before_it_connects(tmp_path, capsys):
    from tests.gate_sites import make_site

    contract = make_site(tmp_path / "north", source={"path": "missing.csv"})
    code = supernode.main(["--superlink", "127.0.0.1:1", "--node-config",
                           f'fedseg-contract="{contract}"'])
    err = capsys.readouterr().err
    assert code == 2 and "missing.csv" in err and "Traceback" not in err


def test_an_unreadable_node_config_is_refused(capsys):
    assert supernode.main(["--node-config", "fedseg-contract=/no/quotes"]) == 2
    assert "--node-config" in capsys.readouterr().err


def test_prepare_reads_the_site_once_and_names_it(tmp_path):
    from tests.gate_sites import make_site

    contract = make_site(tmp_path / "north")
    summary = deploy.prepare({"fedseg-contract": str(contract)})
    assert summary == "site 'north': 3 customers with consent pass the privacy gate"
    with pytest.raises(ConfigError, match="fedseg-contract"):
        deploy.prepare({})


def test_a_contract_schema_gives_the_server_exactly_the_features_each_site_computes(tmp_path):
    from client.gate import PrivacyGate
    from common.config import compose_config, instantiate_config
    from server.plan import plan_from_config
    from tests.gate_sites import make_site

    contract = make_site(tmp_path / "north")  # numeric, categorical and boolean features
    cfg = compose_config(f"data=contract data.path={contract} privacy=secagg")
    schema = instantiate_config(cfg.data)
    plan = plan_from_config(cfg, features=schema.feature_specs(), num_sites=3)
    site = PrivacyGate.open(contract).load().site
    announced = plan.run_plan(prg="chacha20-sha256/1").features
    assert announced == tuple(f.name for f in site.features)
    assert "channel=web" in announced and "member" in announced
    with pytest.raises(ConfigError, match="data=contract"):
        schema.load(seed=0)


def test_the_example_contract_declares_every_bound_dp_needs():
    from common.config import compose_config, instantiate_config
    from server.plan import plan_from_config

    cfg = compose_config("data=contract data.path=conf/contracts/customers.yaml")
    schema = instantiate_config(cfg.data)
    plan = plan_from_config(cfg, features=schema.feature_specs(), num_sites=5)
    assert plan.dp is not None and len(plan.dp.bounds) == len(schema.feature_specs())


def test_a_refused_runtime_request_is_raised_not_turned_into_a_sigint():
    """Flower's invoker SIGINTs its own process on 401; here that process is the SuperNode."""
    import httpx

    request = httpx.Request("POST", "http://127.0.0.1/acquire")
    calls = []

    def refused():
        calls.append(1)
        raise httpx.HTTPStatusError("401", request=request,
                                    response=httpx.Response(401, request=request))

    with pytest.raises(httpx.HTTPStatusError):
        supernode.site_retry_invoker().invoke(refused)
    assert calls == [1]  # no retry, and this test process is still running


def test_the_unsupported_runtime_options_are_refused(capsys):
    assert supernode.main(["--superexec-auth-secret-file", "/x"]) == 2
    assert "--superexec-auth-secret-file is not supported" in capsys.readouterr().err
