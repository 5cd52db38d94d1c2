"""Poison events go to the dead-letter topic with a reason and their original bytes; the
partition keeps flowing. A session whose processing keeps failing is dead-lettered after bounded
retries. Real broker, real Ray actors, real Milvus Lite server."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

TS = "2024-03-01T10:00:00+00:00"


def _event(**kw) -> dict:
    base = {"event_id": "x", "tenant_id": "acme", "user_id": "alice", "session_id": "s1", "timestamp": TS,
            "kind": "turn", "speaker": "Alice", "text": "I adopted a cat named Miso"}
    base.update(kw)
    return base


def _raw(d: dict) -> bytes:
    return json.dumps(d).encode()


KEY = b"acme:alice"
# (name, key, payload, a word the reason must contain)
MALFORMED = [
    ("bad json", KEY, b'{"event_id": "m1", "tenant_id": ', "JSON"),
    ("not utf-8", KEY, b"\xff\xfe\x00garbage", "JSON"),
    ("not an object", KEY, b'["a", "list"]', "object"),
    ("missing fields", KEY, _raw({"event_id": "m2", "tenant_id": "acme", "text": "hi"}), "user_id: Field required"),
    ("wrong type: timestamp", KEY, _raw(_event(event_id="m3", timestamp="next tuesday")), "timestamp"),
    ("wrong type: event_id", KEY, _raw(_event(event_id=42)), "event_id"),
    ("wrong type: metadata", KEY, _raw(_event(event_id="m4", metadata=["a"])), "metadata"),
    ("oversize text", KEY, _raw(_event(event_id="m5", text="x" * 16_001)), "text"),
    ("oversize event", KEY, _raw(_event(event_id="m6", text="y" * 70_000)), "65536-byte limit"),
    ("unknown kind", KEY, _raw(_event(event_id="m7", kind="reaction")), "kind"),
    ("unknown schema version", KEY, _raw(_event(event_id="m8", schema_version=2)), "schema_version"),
    ("invalid user id", b"acme:bob smith", _raw(_event(event_id="m9", user_id="bob smith")), "user_id"),
    ("injection in tenant id", b'acme" or 1==1:alice', _raw(_event(event_id="m10", tenant_id='acme" or 1==1')),
     "tenant_id"),
    ("path in session id", KEY, _raw(_event(event_id="m11", session_id="../etc")), "session_id"),
    ("turn without text", KEY, _raw(_event(event_id="m12", text="   ")), "non-empty text"),
    ("key is not tenant:user", b"acme:mallory", _raw(_event(event_id="m13")), "key"),
    ("extra field", KEY, _raw(_event(event_id="m14", secret="x")), "secret"),
    ("NUL in text", KEY, _raw(_event(event_id="m15", text="I adopted\u0000 a cat")), "text: control character U+0000"),
    ("escape in speaker", KEY, _raw(_event(event_id="m16", speaker="Ali\x1bce")), "speaker: control character U+001B"),
    ("raw NUL byte in the JSON", KEY, _raw(_event(event_id="m17")).replace(b"Miso", b"Mi\x00so"), "JSON"),
]


def test_malformed_events_are_dead_lettered_and_the_partition_flows(tmp_path, broker, milvus_server, ray_local):
    from ingest_workload import engine_factory, read_calls, turn_text

    from services.ingest.kafka_io import DeadLetter, make_consumer, partition_for_key
    from services.ingest.producer import EventProducer
    from services.ingest.service import IngestService
    from tsubasa.memory.store import MilvusStore
    from tsubasa.schema import Event, EventKind

    from .conftest import make_ingest_settings

    settings = make_ingest_settings(tmp_path, broker.bootstrap, milvus_server.url, partitions=2, consumers=1,
                                    writers=1, max_retries=1)
    when = datetime(2024, 3, 1, 10, tzinfo=UTC)

    def turns(user: str, sid: str, n: int, start: int = 0, end: bool = False) -> list:
        name = "Ann" + user[-2:]
        out = [Event(event_id=f"{user}.{sid}.t{k}", tenant_id="acme", user_id=user, session_id=sid,
                     timestamp=when.replace(minute=k), speaker=name if k % 2 == 0 else "assistant",
                     text=turn_text(user, sid, k, "I painted the canoe")) for k in range(start, start + n)]
        if end:
            out.append(Event(event_id=f"{user}.{sid}.end", tenant_id="acme", user_id=user, session_id=sid,
                             timestamp=when.replace(minute=59), kind=EventKind.SESSION_END))
        return out

    # valid turns, then every malformed message, then more valid turns and session ends; plus a
    # user whose session the (scripted) model always fails on
    stream: list = turns("alice01", "s1", 4)
    stream += [(key, payload) for _, key, payload, _ in MALFORMED]
    stream += turns("alice01", "s1", 4, start=4, end=True) + turns("bob02", "s1", 6, end=True)
    stream += turns("poison03", "s1", 4, end=True) + turns("carol04", "s1", 4, end=True)
    calls_log = tmp_path / "calls.jsonl"
    service = IngestService(settings, engine_factory=engine_factory(calls_log, fail_users=("poison03",))).start()
    with EventProducer(settings.kafka) as producer:
        produced = producer.produce(stream)
    assert service.wait_until(lambda: service.drained(produced.end_offsets), timeout_s=180), \
        service.metrics().summary()
    final = service.stop(grace_s=10)

    # every malformed message is in the dead-letter topic once, with a reason naming the problem
    dlq = make_consumer(settings.kafka, group_id=None)
    dlq.subscribe([settings.kafka.dead_letter_topic])
    records = []
    for _ in range(40):
        for recs in dlq.poll(timeout_ms=250).values():
            records.extend(json.loads(r.value) for r in recs)
        if len(records) >= len(MALFORMED) + 1:
            break
    dlq.close()
    validation = [r for r in records if r["stage"] == "validation"]
    assert len(validation) == len(MALFORMED), [r["reason"] for r in validation]
    by_payload = {DeadLetter.original_payload(r): r for r in validation}
    for name, key, payload, word in MALFORMED:
        rec = by_payload.get(payload)
        assert rec is not None, f"{name} not dead-lettered"
        assert word.lower() in rec["reason"].lower(), (name, rec["reason"])
        assert rec["source"]["topic"] == settings.kafka.topic and rec["source"]["offset"] >= 0
        assert rec["source"]["partition"] == partition_for_key(key, 2)

    # the session the model fails on: dead-lettered after bounded retries, the rest flowed on
    session_dead = [r for r in records if r["stage"] == "session"]
    assert [r["session"] for r in session_dead] == ["acme:poison03:s1"]
    assert "scripted LLM failure" in session_dead[0]["reason"]
    assert session_dead[0]["attempts"] == settings.kafka.max_retries + 1
    assert json.loads(session_dead[0]["payload"])["kind"] == "session_end"
    extract_calls = [c for c in read_calls(calls_log) if c["kind"] == "extract" and c["key"].startswith("poison03")]
    assert len(extract_calls) == settings.kafka.max_retries + 1

    # valid events after the poison ones were stored and their sessions processed
    store = MilvusStore(settings.milvus, uri=settings.milvus_uri)
    assert len(store.list_turns("acme", "alice01")) == 8
    assert len(store.list_turns("acme", "bob02")) == 6
    assert len(store.list_turns("acme", "poison03")) == 4
    for user in ("alice01", "bob02", "carol04"):
        state = store.session_state("acme", user, "s1")
        assert state is not None and state.state == "done", user
        assert len(store.list_memories("acme", user)) == 2
    assert store.session_state("acme", "poison03", "s1") is None
    assert final.by_key("dead_lettered") == {"validation": len(MALFORMED), "session": 1}
    committed = {p: off or 0 for p, off in service.committed().items()}
    assert committed == {p: produced.end_offsets.get(p, 0) for p in committed}
    store.close()
