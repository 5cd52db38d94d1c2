import re
from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from tsubasa.memory.store import scope_filter
from tsubasa.schema import Event, InvalidIdentifierError, stable_id, validate_identifier

INJECTIONS = [
    'u1" or tenant_id != "x',
    "u1' or 1==1",
    'a" || user_id like "%',
    "../etc/passwd",
    "a b",
    "",
    "x" * 129,
    "tenant\\",
    "-leading-dash",
    "a..b",
    "user\nnewline",
]


@pytest.mark.parametrize("bad", INJECTIONS)
def test_identifier_rejects_injection(bad):
    with pytest.raises(InvalidIdentifierError, match="not a valid identifier"):
        validate_identifier(bad, "user_id")


def test_scope_filter_rejects_injection_and_names_field():
    assert scope_filter("acme", "u-1") == 'tenant_id == "acme" and user_id == "u-1"'
    with pytest.raises(InvalidIdentifierError, match="user_id"):
        scope_filter("acme", 'u" or tenant_id != "')
    with pytest.raises(InvalidIdentifierError, match="tenant_id"):
        scope_filter('acme" or 1 == 1 or "', "u")


@pytest.mark.parametrize("good", ["conv-26", "user_01", "a.b@c", "T1"])
def test_identifier_accepts(good):
    assert validate_identifier(good) == good


def _event(**kw):
    base = dict(event_id="e1", tenant_id="t1", user_id="u1", session_id="s1",
                timestamp=datetime(2023, 5, 8, tzinfo=UTC), speaker="Caroline", text="hello")
    base.update(kw)
    return Event(**base)


def test_event_validation_reasons():
    assert _event().key == "t1:u1"
    with pytest.raises(ValidationError, match="user_id"):
        _event(user_id='x" or 1')
    with pytest.raises(ValidationError, match="non-empty text"):
        _event(text="  ")
    with pytest.raises(ValidationError, match="at most 16000"):
        _event(text="x" * 16_001)
    with pytest.raises(ValidationError, match="kind"):
        _event(kind="shout")
    with pytest.raises(ValidationError, match="extra"):
        _event(unexpected=1)
    end = _event(kind="session_end", text="", speaker="")
    assert end.kind == "session_end"


def test_naive_timestamp_becomes_utc_and_turn_keeps_source():
    ev = _event(timestamp=datetime(2023, 5, 8, 13, 56), source_id="D1:3", metadata={"seq": 4})
    turn = ev.to_turn()
    assert turn.timestamp.tzinfo is not None and turn.source_id == "D1:3" and turn.seq == 4


def test_stable_id_is_deterministic():
    assert stable_id("a", "b") == stable_id("a", "b") != stable_id("ab", "")


@pytest.mark.parametrize(("field", "value", "code"), [
    ("text", "a\x00b", "U+0000"), ("text", "bell\x07", "U+0007"), ("speaker", "A\x1bB", "U+001B"),
    ("source_id", "x\x7f", "U+007F")])
def test_event_refuses_control_characters(field, value, code):
    from tsubasa.schema import InvalidEventError, parse_event

    raw = {"event_id": "e1", "tenant_id": "t1", "user_id": "u1", "session_id": "s1",
           "timestamp": "2023-05-08T00:00:00Z", "speaker": "Caroline", "text": "hello", field: value}
    with pytest.raises(InvalidEventError, match=rf"^{field}: control character {re.escape(code)} at position \d+"):
        parse_event(raw)
    with pytest.raises(InvalidEventError, match="metadata: session_date: control character U\\+0000"):
        parse_event({**raw, field: "ok", "metadata": {"session_date": "8 May\x00"}})


def test_event_keeps_tabs_and_new_lines():
    assert _event(text="a\tb\nc\r\nd").text == "a\tb\nc\r\nd"
