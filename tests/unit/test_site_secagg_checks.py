"""A site checks the SecAgg+ set-up itself and refuses rounds that would break the encoding."""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord, Context, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_STATE

from client.app import codec_from_secagg_state
from common.errors import ProtocolError
from common.secure_sum import quantization_range_for


def _context(**state) -> Context:
    base = {"sample_num": 5, "target_range": quantization_range_for(5), "clipping_range": 1.0,
            "max_weight": 1.0, "mod_range": 2**32}
    base.update(state)
    records = RecordDict({RECORD_KEY_STATE: ConfigRecord(base)})
    return Context(run_id=1, node_id=1, node_config={}, state=records, run_config={})


def test_a_safe_setup_gives_the_matching_codec():
    codec = codec_from_secagg_state(_context())
    assert codec.quantization_range == quantization_range_for(5)


def test_a_range_that_could_wrap_is_refused():
    with pytest.raises(ProtocolError, match="refusing SecAgg\\+ round with 5 sites"):
        codec_from_secagg_state(_context(target_range=2**30))


@pytest.mark.parametrize(("key", "value"), [("clipping_range", 8.0), ("max_weight", 1000.0),
                                             ("mod_range", 2**31)])
def test_other_protocol_parameters_are_refused(key, value):
    with pytest.raises(ProtocolError, match="requires"):
        codec_from_secagg_state(_context(**{key: value}))


def test_missing_setup_is_refused():
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    with pytest.raises(ProtocolError, match="no SecAgg\\+ set-up"):
        codec_from_secagg_state(context)
