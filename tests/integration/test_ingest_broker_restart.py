"""A broker crash and restart mid-stream (tansu on S3 storage) loses nothing: every event ends up in
the raw log once, every session is processed once (one extraction call each), and the committed
offsets reach the end. The producer keeps producing through the outage (at-least-once: a resend
after a failed acknowledgement may duplicate a message; the raw log is keyed by event id)."""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def test_broker_restart_mid_stream_loses_nothing(tmp_path, persistent_broker, milvus_server, ray_local):
    from ingest_workload import engine_factory, read_calls, workload

    from services.ingest.producer import EventProducer
    from services.ingest.service import IngestService
    from tsubasa.memory.store import MilvusStore

    from .conftest import make_ingest_settings

    settings = make_ingest_settings(tmp_path, persistent_broker.bootstrap, milvus_server.url, partitions=2,
                                    consumers=1, writers=1)
    w = workload(users=10, sessions=4, per_session=25, prefix="r")
    calls_log = tmp_path / "calls.jsonl"
    service = IngestService(settings, engine_factory=engine_factory(calls_log)).start()

    reports: dict = {}
    progress = {"n": 0}

    def produce() -> None:
        with EventProducer(settings.kafka, request_timeout_ms=5000, max_block_ms=5000) as producer:
            reports["r"] = producer.produce(w.events, batch=50, rate=150,
                                            on_batch=lambda r: progress.__setitem__("n", r.produced))

    t = threading.Thread(target=produce, daemon=True)
    t.start()
    while progress["n"] < len(w.events) * 0.35:
        time.sleep(0.1)
    committed_before = service.committed()
    persistent_broker.restart(down_s=2.0, crash=True)  # SIGKILL, then start on the same S3 storage
    restarted_at = progress["n"]
    t.join(timeout=180)
    assert not t.is_alive()
    report = reports["r"]
    assert report.produced >= len(w.events)
    assert 0 < restarted_at < len(w.events), "the restart must land mid-stream"

    assert service.wait_until(lambda: service.drained(report.end_offsets), timeout_s=180), \
        service.metrics().summary()
    service.stop(grace_s=10)
    committed = {p: off or 0 for p, off in service.committed().items()}
    assert committed == {p: report.end_offsets.get(p, 0) for p in committed}
    assert all((committed[p] or 0) >= (committed_before.get(p) or 0) for p in committed)

    store = MilvusStore(settings.milvus, uri=settings.milvus_uri)
    for (tenant, user), ids in w.turns.items():
        got = [t.event_id for t in store.list_turns(tenant, user)]
        assert len(got) == len(set(got)) and set(got) == ids, user
    extract = Counter(c["key"] for c in read_calls(calls_log) if c["kind"] == "extract")
    assert extract == Counter({f"{u}:{s}": 1 for _, u, s in w.sessions})
    for tenant, user, sid in w.sessions:
        state = store.session_state(tenant, user, sid)
        assert state is not None and state.state == "done"
        assert len(store.session_observations(tenant, user, sid)) == 2
    print(f"\nbroker restarted after {restarted_at} of {len(w.events)} events; producer resent {report.resent}")
    store.close()
