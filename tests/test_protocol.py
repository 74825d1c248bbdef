"""The protocol module and its documentation agree; messages round-trip; bad lines are refused."""
import json
import re
from pathlib import Path

import pytest

from training_core.protocol import (CONTROLS, EVENTS, PROTOCOL_VERSION, ProtocolError, decode_control,
                                    decode_event, encode, make_control, make_event)

DOC = Path(__file__).resolve().parents[1] / "docs" / "protocol.md"


def doc_table(heading):
    text = DOC.read_text(encoding="utf-8").split(heading, 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in text.splitlines():
        m = re.match(r"\| `(\w+)` \|(.*)", line)
        if m:
            rows[m.group(1)] = m.group(2)
    return rows


def test_doc_lists_every_event_with_its_required_fields():
    rows = doc_table("## Events")
    assert set(rows) == set(EVENTS)
    for name, fields in EVENTS.items():
        required_cell = rows[name].split("|")[0]
        assert set(re.findall(r"`(\w+)`", required_cell)) == set(fields), name


def test_doc_lists_every_control():
    assert set(doc_table("## Control messages")) == set(CONTROLS)


def test_round_trip_and_non_finite_numbers_become_null():
    ev = make_event("eval", step=3, eval_loss=float("nan"), perplexity=float("inf"))
    line = encode(ev)
    assert line.endswith("\n") and line.count("\n") == 1
    back = decode_event(line)
    assert back["v"] == PROTOCOL_VERSION and back["eval_loss"] is None and back["perplexity"] is None
    assert decode_control(encode(make_control("pause")))["type"] == "pause"


@pytest.mark.parametrize("line", ["not json", "[1,2]", '{"v": 99, "type": "pause"}', '{"v": 1, "type": "explode"}'])
def test_bad_control_lines_are_refused(line):
    with pytest.raises(ProtocolError):
        decode_control(line)


def test_events_missing_required_fields_are_refused():
    with pytest.raises(ProtocolError):
        make_event("step", step=1)
    with pytest.raises(ProtocolError):
        decode_event('{"v": 1, "type": "checkpoint", "time": 0, "step": 1}')


def test_one_shot_answers_are_versioned():
    from training_core.protocol import decode_answer, encode_answer
    text = encode_answer({"records": 3, "loss": float("nan")})
    assert json.loads(text)["v"] == PROTOCOL_VERSION
    assert decode_answer(text) == {"records": 3, "loss": None}
    for bad in ('{"v": 99, "records": 3}', "[1]", "not json"):
        with pytest.raises(ProtocolError):
            decode_answer(bad)
