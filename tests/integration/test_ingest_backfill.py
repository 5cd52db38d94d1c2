"""Backfill rebuilds raw logs from a topic's retained history with a bounded Ray Data read, through
the same idempotent writer (a second backfill writes nothing new)."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def test_backfill_rebuilds_raw_logs_idempotently(tmp_path, broker, milvus_server, ray_local, embedder):
    from ingest_workload import make_engine, read_calls, workload

    from services.ingest.backfill import backfill
    from services.ingest.kafka_io import ensure_topics
    from services.ingest.producer import EventProducer
    from tsubasa.memory.store import MilvusStore
    from tsubasa.memory.writer import MemoryWriter

    from .conftest import make_ingest_settings

    settings = make_ingest_settings(tmp_path, broker.bootstrap, milvus_server.url, partitions=3)
    w = workload(users=6, sessions=3, per_session=12, prefix="b")
    ensure_topics(settings.kafka)
    with EventProducer(settings.kafka) as producer:
        produced = producer.produce([*w.events[:50], (b"acme:b00", b"{oops"), *w.events[50:],
                                     (b"acme:b01", b'{"event_id": "only"}')])

    report = backfill(settings, concurrency=1)
    # tansu answers ListOffsets with 1: Ray Data's read_kafka would stop there, so auto falls back
    assert report.reader == "kafka-python" and "ListOffsets" in report.why
    assert report.end_offsets == produced.end_offsets
    assert report.read == len(w.events) + 2
    assert report.invalid == 2 and report.appended == w.n_turns and report.duplicates == 0
    store = MilvusStore(settings.milvus, uri=settings.milvus_uri)
    for (tenant, user), ids in w.turns.items():
        assert {t.event_id for t in store.list_turns(tenant, user)} == ids

    again = backfill(settings, concurrency=1)
    assert again.appended == 0 and again.duplicates == w.n_turns

    # the sessions the history closes, processed through the same writer (idempotent)
    closed = report.closed_sessions()
    assert sorted(closed) == sorted(k for k in w.sessions if w.close_reason[k] != "idle")
    log = tmp_path / "calls.jsonl"
    writer = MemoryWriter(store, embedder, make_engine(str(log)), settings.memory)
    for key in closed:
        assert not writer.process_session(*key).skipped
    assert all(writer.process_session(*key).skipped for key in closed)
    assert len([c for c in read_calls(log) if c["kind"] == "extract"]) == len(closed)
    store.close()
