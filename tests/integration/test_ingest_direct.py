"""The write path without Kafka (what the gateway's /v1/events calls): validation with reasons,
all-or-nothing by default, sessions closed by session_end or a newer session, idempotent replays.
Real Milvus Lite and embedder; the scripted engine stands in for the model."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

pytestmark = pytest.mark.integration


def test_accept_events_validates_stores_and_closes_sessions(tmp_path, store, embedder, settings):
    from ingest_workload import make_engine, read_calls

    from services.ingest.direct import accept_events, close_idle_sessions
    from tsubasa.memory.writer import MemoryWriter

    log = tmp_path / "calls.jsonl"
    writer = MemoryWriter(store, embedder, make_engine(str(log)), settings.memory)
    t0 = datetime(2024, 5, 1, tzinfo=UTC)

    def turn(sid: str, k: int) -> dict:
        return {"event_id": f"d07.{sid}.t{k}", "tenant_id": "acme", "user_id": "d07", "session_id": sid,
                "timestamp": (t0 + timedelta(minutes=k)).isoformat(), "speaker": "Ann07" if k % 2 == 0 else "assistant",
                "text": f"d07 {sid} turn {k}: I repaired the kayak"}

    bad = {**turn("s1", 9), "user_id": "d 07"}
    res = accept_events(writer, [turn("s1", 0), bad])
    assert [(r.index, "user_id" in r.reason) for r in res.rejected] == [(1, True)]
    assert res.accepted == 0 and store.list_turns("acme", "d07") == []  # all or nothing

    res = accept_events(writer, [turn("s1", k) for k in range(4)])
    assert res.new_turns == 4 and res.closed_sessions == []  # s1 is still open
    res = accept_events(writer, [turn("s2", k) for k in range(2)])  # a newer session closes s1
    assert res.closed_sessions == [("acme", "d07", "s1")] and not res.sessions[0].skipped
    end = {**turn("s2", 2), "event_id": "d07.s2.end", "kind": "session_end", "speaker": "", "text": ""}
    res = accept_events(writer, [turn("s2", 2), end])
    assert res.closed_sessions == [("acme", "d07", "s2")]

    again = accept_events(writer, [turn("s1", k) for k in range(4)] + [end])  # a replay
    assert again.new_turns == 0 and all(s.skipped for s in again.sessions)
    assert close_idle_sessions(writer, "acme", "d07") == []
    extract = [c for c in read_calls(log) if c["kind"] == "extract"]
    assert sorted(c["key"] for c in extract) == ["d07:s1", "d07:s2"]
    assert [t.event_id for t in store.session_turns("acme", "d07", "s2")] == [f"d07.s2.t{k}" for k in range(3)]
