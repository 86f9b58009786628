"""The next round's SecAgg+ set-up riding on this round's unmask request.

Site side: real site ClientApps (guard, Flower's ``secaggplus_mod``, audit) with a scripted
server (tests/secagg_driver.py). Server side: the two grid wrappers of ``server.secagg_prekeys``
in front of a grid that records what reaches it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from common.protocol import NEXT_KEYS_RECORD, NEXT_SETUP_RECORD, PHASE_KEY, ROUND_KEY
from common.site_policy import SitePolicy
from server.secagg_prekeys import NextKeys, NextSetupGrid, PrekeyedSetupGrid, setup_parameters
from tests.secagg_driver import SecAggDriver
from tests.unit.test_secagg_guard import (
    POPULATION,
    _assert_refused,
    _moments_instruction,
    _site_apps,
)


def _lloyd_instruction(n: int) -> tuple[list, dict]:
    """A second-round instruction (Lloyd step from three public centres)."""
    _, config = _moments_instruction(n)
    d = len(POPULATION.features)
    centres = np.random.default_rng(0).normal(size=(3, d))
    return [np.zeros(d), np.ones(d), centres], {**config, PHASE_KEY: "lloyd", ROUND_KEY: 2}


def _honest_round(driver: SecAggDriver, *, next_setup=None, setup=True):
    nodes = driver.nodes
    if setup:
        assert not any(r.has_error() for r in driver.setup(share_num=4, threshold=4).values())
    assert not any(r.has_error() for r in driver.share_keys().values())
    instruction = _moments_instruction(4) if setup else _lloyd_instruction(4)
    collected = driver.collect(*instruction)
    assert not any(r.has_error() for r in collected.values())
    return collected, driver.unmask({n: (nodes, []) for n in nodes}, next_setup=next_setup)


def test_a_round_starts_at_share_keys_with_the_keys_sent_with_the_last_unmask(tmp_path):
    driver = SecAggDriver(_site_apps(4, SitePolicy(require_dp=False), tmp_path))
    first_keys = dict(driver.public_keys)
    _, unmasked = _honest_round(driver, next_setup=driver.setup_configs(share_num=4,
                                                                          threshold=4))
    first_keys = dict(driver.public_keys)
    for reply in unmasked.values():
        assert not reply.has_error()
        records = reply.content.config_records
        assert Key.SHARE_LIST in records[RECORD_KEY_CONFIGS]  # this round's shares, as always
        keys = records[NEXT_KEYS_RECORD]
        assert sorted(keys.keys()) == sorted([Key.PUBLIC_KEY_1, Key.PUBLIC_KEY_2])
        assert all(isinstance(k, bytes) and len(k) == 32 for k in keys.values())
    assert set(driver.next_keys) == set(driver.nodes)
    fresh = {k for pair in driver.next_keys.values() for k in pair}
    assert len(fresh) == 8 and not fresh & {k for pair in first_keys.values() for k in pair}

    # Round 2 without a set-up exchange: the sites accept share_keys straight away.
    driver.next_round("2")
    collected, unmasked = _honest_round(driver, setup=False)
    assert all(Key.MASKED_PARAMETERS in r.content.config_records[RECORD_KEY_CONFIGS]
               for r in collected.values())
    assert not any(r.has_error() for r in unmasked.values())

    audit = [json.loads(line) for line in
             (tmp_path / "audit" / "site-0.jsonl").read_text().splitlines()]
    assert [e["stage"] for e in audit] == [
        "setup", "share_keys", "collect_masked_vectors", "unmask+setup",
        "share_keys", "collect_masked_vectors", "unmask"]
    both = audit[3]
    assert both["secagg"]["sample_num"] == 4 and both["next_secagg"]["threshold"] == 4
    assert NEXT_KEYS_RECORD in both["configs"]


@pytest.mark.parametrize(("change", "why"), [
    ({Key.THRESHOLD: 3}, "threshold 3 of 4"),
    ({Key.SHARE_NUMBER: 3, Key.THRESHOLD: 3}, "neighbourhood of 3 for 4"),
    ({Key.TARGET_RANGE: 2**30}, "can wrap"),
    ({Key.SAMPLE_NUMBER: 2}, "at least 3"),
])
def test_a_weak_next_setup_is_refused_and_withholds_the_unmask_shares(tmp_path, change, why):
    driver = SecAggDriver(_site_apps(4, SitePolicy(require_dp=False), tmp_path))
    weak = {**driver.setup_configs(share_num=4, threshold=4), **change}
    _, unmasked = _honest_round(driver, next_setup=weak)
    for reply in unmasked.values():
        _assert_refused(reply, code="federation" if Key.SAMPLE_NUMBER in change else "secagg")
    assert why in (tmp_path / "site-logs" / "site-0.log").read_text()
    # ... and the refused set-up leaves no keys to start a round with.
    driver.next_round("2")
    for reply in driver.share_keys().values():
        _assert_refused(reply)


def test_a_next_setup_rides_only_on_an_unmask_request(tmp_path):
    driver = SecAggDriver(_site_apps(4, SitePolicy(require_dp=False), tmp_path))
    driver.setup(share_num=4, threshold=4)
    nid = driver.nodes[0]
    content = RecordDict({NEXT_SETUP_RECORD: ConfigRecord(
        driver.setup_configs(share_num=4, threshold=4))})
    cfg = {Key.STAGE: Stage.SHARE_KEYS}
    cfg.update({str(other): pair for other, pair in driver.public_keys.items()})
    _assert_refused(driver.send(nid, cfg, content))
    assert "may ride only on an unmask" in (tmp_path / "site-logs" / "site-0.log").read_text()


def test_a_next_setup_with_other_keys_is_refused(tmp_path):
    driver = SecAggDriver(_site_apps(4, SitePolicy(require_dp=False), tmp_path))
    odd = {**driver.setup_configs(share_num=4, threshold=4), "stage": "setup"}
    _, unmasked = _honest_round(driver, next_setup=odd)
    for reply in unmasked.values():
        _assert_refused(reply)
    assert "expected exactly" in (tmp_path / "site-logs" / "site-0.log").read_text()


# -- server side --------------------------------------------------------------------------


class _RecordingGrid:
    """Stands for the SuperLink: records what is sent; answers with the given replies."""

    def __init__(self, answer=None) -> None:
        self.sent: list[list[Message]] = []
        self.answer = answer or (lambda messages: [])

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        self.sent.append(messages)
        return self.answer(messages)


def _message(nid: int, configs: dict) -> Message:
    import time

    from flwr.app import MessageType, Metadata

    metadata = Metadata(run_id=7, message_id=f"m{nid}", src_node_id=1, dst_node_id=nid,
                        reply_to_message_id="", group_id="2", created_at=time.time(),
                        ttl=3600.0, message_type=MessageType.TRAIN)
    return Message(content=RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(dict(configs))}),
                   metadata=metadata)


PARAMS = setup_parameters(4, num_shares=4, reconstruction_threshold=4, clipping_range=1.0,
                          quantization_range=2**29, modulus_range=2**32, max_weight=1.0)
KEYS = {nid: (bytes([nid]) * 32, bytes([nid + 100]) * 32) for nid in (1, 2, 3, 4)}


def test_setup_is_answered_from_the_keys_only_when_sites_and_parameters_match():
    setup = {Key.STAGE: Stage.SETUP, **PARAMS}
    inner = _RecordingGrid()
    grid = PrekeyedSetupGrid(inner, prepared=NextKeys(parameters=dict(PARAMS), keys=KEYS))
    replies = list(grid.send_and_receive([_message(n, setup) for n in (3, 1, 4, 2)]))
    assert grid.used and inner.sent == []
    got = {r.metadata.src_node_id: r.content.config_records[RECORD_KEY_CONFIGS] for r in replies}
    assert got == {n: {Key.PUBLIC_KEY_1: KEYS[n][0], Key.PUBLIC_KEY_2: KEYS[n][1]}
                   for n in KEYS}


@pytest.mark.parametrize("case", ["other_threshold", "a_site_more", "a_site_less"])
def test_setup_goes_out_as_usual_when_the_round_differs(case):
    params = {**PARAMS, Key.THRESHOLD: 3} if case == "other_threshold" else PARAMS
    nodes = {"a_site_more": (1, 2, 3, 4, 5), "a_site_less": (1, 2, 3)}.get(case, (1, 2, 3, 4))
    inner = _RecordingGrid()
    grid = PrekeyedSetupGrid(inner, prepared=NextKeys(parameters=dict(PARAMS), keys=KEYS))
    grid.send_and_receive([_message(n, {Key.STAGE: Stage.SETUP, **params}) for n in nodes])
    assert not grid.used
    assert [m.metadata.dst_node_id for m in inner.sent[0]] == list(nodes)


def test_unmask_requests_carry_the_next_setup_and_only_sound_keys_are_kept():
    def answer(messages):
        out = []
        for m in messages:
            keys = {1: KEYS[1], 2: (b"short", b"x" * 32), 3: (KEYS[3][0], KEYS[3][0])}.get(
                m.metadata.dst_node_id, KEYS.get(m.metadata.dst_node_id))
            content = RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({Key.NODE_ID_LIST: [1]})})
            if m.metadata.dst_node_id != 4:  # site 4 sends no keys
                content.config_records[NEXT_KEYS_RECORD] = ConfigRecord(
                    {Key.PUBLIC_KEY_1: keys[0], Key.PUBLIC_KEY_2: keys[1]})
            out.append(Message(content, reply_to=m))
        return out

    inner = _RecordingGrid(answer)
    grid = NextSetupGrid(inner, parameters=PARAMS)
    unmask = {Key.STAGE: Stage.UNMASK, Key.ACTIVE_NODE_ID_LIST: [1, 2, 3, 4],
              Key.DEAD_NODE_ID_LIST: []}
    replies = list(grid.send_and_receive([_message(n, unmask) for n in (1, 2, 3, 4)]))
    for sent in inner.sent[0]:
        assert dict(sent.content.config_records[NEXT_SETUP_RECORD].items()) == PARAMS
    assert all(NEXT_KEYS_RECORD not in r.content.config_records for r in replies)
    assert grid.next.keys == {1: KEYS[1]}  # short, repeated and missing keys are not kept
    assert grid.next.parameters == PARAMS


@pytest.mark.parametrize(("sites", "shares", "threshold"), [
    (4, 4, 1.0), (100, 27, 1.0), (100, 27, 20), (10, 0.5, 0.66), (3, 1.0, 1.0), (7, 0.2, 0.5)])
def test_setup_parameters_follow_flowers_rule(monkeypatch, sites, shares, threshold):
    """Flower 1.42's own set-up stage, run on a recording grid, sends these parameters."""
    from flwr.app import ArrayRecord
    from flwr.common import FitIns
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.workflow import SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
    from flwr.server.workflow.constant import Key as WorkflowKey
    from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 7), ("_node_id", 0), ("_task_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)

    class _Proxy:
        def __init__(self, nid: int) -> None:
            self.node_id = nid

    class _Strategy:
        def configure_fit(self, server_round, parameters, client_manager):
            return [(_Proxy(n), FitIns(parameters, {})) for n in range(1, sites + 1)]

    class _Manager:
        def num_available(self):
            return sites

    context = LegacyContext.__new__(LegacyContext)
    context.__dict__.update(state=RecordDict({
        MAIN_CONFIGS_RECORD: ConfigRecord({WorkflowKey.CURRENT_ROUND: 1}),
        MAIN_PARAMS_RECORD: ArrayRecord()}), strategy=_Strategy(), client_manager=_Manager())
    captured: list[Message] = []

    def answer(messages):
        captured.extend(messages)
        return []

    workflow = SecAggPlusWorkflow(num_shares=shares, reconstruction_threshold=threshold,
                                  clipping_range=1.0, quantization_range=2**20,
                                  modulus_range=2**32, max_weight=1.0)
    workflow.setup_stage(_RecordingGrid(answer), context, WorkflowState())
    configs = captured[0].content.config_records[RECORD_KEY_CONFIGS]
    sent = {k: v for k, v in configs.items() if k != Key.STAGE}
    assert sent == setup_parameters(sites, num_shares=shares,
                                    reconstruction_threshold=threshold, clipping_range=1.0,
                                    quantization_range=2**20, modulus_range=2**32,
                                    max_weight=1.0)
