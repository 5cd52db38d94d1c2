"""Session-close and commit-point rules of the ingest consumer (pure bookkeeping, no Kafka)."""

from __future__ import annotations

from datetime import UTC, datetime

from services.ingest.kafka_io import DeadLetter, partition_for_key
from services.ingest.service import assign_partitions
from services.ingest.session_writer import shard_of
from services.ingest.tracker import PartitionTracker
from tsubasa.schema import Event, EventKind

T0 = datetime(2024, 1, 1, tzinfo=UTC)


def ev(user: str, session: str, i: int, kind: EventKind = EventKind.TURN) -> Event:
    turn = kind == EventKind.TURN
    return Event(event_id=f"{user}.{session}.{i}", tenant_id="t", user_id=user, session_id=session, timestamp=T0,
                 kind=kind, speaker="A" if turn else "", text="hello" if turn else "")


def never(_key) -> bool:
    return False


def test_session_end_closes_and_pins_until_processed():
    t = PartitionTracker(0, start_offset=10)
    assert t.observe(ev("u", "s1", 0), 10, 0.0, never) == []
    assert t.observe(ev("u", "s1", 1), 11, 0.0, never) == []
    assert t.commit_offset() == 10  # the open session pins its first event
    closes = t.observe(ev("u", "s1", 2, EventKind.SESSION_END), 12, 0.0, never)
    assert [(c.session_id, c.reason, c.pin, c.trigger_offset) for c in closes] == [("s1", "end", 10, 12)]
    assert t.commit_offset() == 10  # closed, not yet processed
    t.finished(("t", "u", "s1"))
    assert t.commit_offset() == 13


def test_newer_session_closes_the_previous_one():
    t = PartitionTracker(0, 0)
    t.observe(ev("u", "s1", 0), 0, 0.0, never)
    t.observe(ev("v", "s9", 0), 1, 0.0, never)
    closes = t.observe(ev("u", "s2", 0), 2, 0.0, never)
    assert [(c.session_id, c.reason) for c in closes] == [("s1", "newer")]
    t.finished(("t", "u", "s1"))
    assert t.commit_offset() == 1  # v's open session still pins


def test_idle_close_only_when_caught_up():
    t = PartitionTracker(0, 0)
    t.observe(ev("u", "s1", 0), 0, 100.0, never)
    assert t.idle(200.0, 30.0, caught_up=False) == []  # a backlog may still hold its next turn
    assert t.idle(120.0, 30.0, caught_up=True) == []
    closes = t.idle(131.0, 30.0, caught_up=True)
    assert [(c.session_id, c.reason, c.trigger_offset) for c in closes] == [("s1", "idle", -1)]


def test_events_of_processed_sessions_neither_open_nor_close():
    t = PartitionTracker(0, 0)
    t.observe(ev("u", "s2", 0), 5, 0.0, never)
    late = t.observe(ev("u", "s1", 7), 6, 0.0, lambda key: key == ("t", "u", "s1"))
    assert late == [] and t.late_events == 1 and t.open[("t", "u")].session_id == "s2"
    dup_end = t.observe(ev("u", "s1", 8, EventKind.SESSION_END), 7, 0.0, lambda key: key == ("t", "u", "s1"))
    assert dup_end == [] and t.commit_offset() == 5


def test_dead_lettered_records_advance_the_commit_point():
    t = PartitionTracker(0, 0)
    t.handled(0)
    t.handled(1)
    assert t.commit_offset() == 2


def test_partitioning_sharding_and_assignment_are_stable():
    # kafka-python / Java client murmur2: the same key always lands on the same partition
    assert partition_for_key("acme:alice", 8) == partition_for_key(b"acme:alice", 8)
    assert {shard_of("acme", "alice", 4) for _ in range(3)} == {shard_of("acme", "alice", 4)}
    assert assign_partitions([0, 1, 2, 3, 4], 2) == [[0, 2, 4], [1, 3]]
    assert assign_partitions([0, 1], 5) == [[0], [1]]


def test_dead_letter_record_keeps_the_original_bytes():
    import json

    raw = b"\xff\xfe not utf-8"
    d = DeadLetter("not valid JSON", "validation", "events", 3, 41, b"k", raw)
    rec = json.loads(d.to_json())
    assert rec["reason"] == "not valid JSON" and rec["source"] == {"topic": "events", "partition": 3, "offset": 41,
                                                                   "key": "k"}
    assert DeadLetter.original_payload(rec) == raw


def test_done_sessions_reads_a_polls_markers_once():
    """The consumer asks about each session it has not seen open; a prefetch answers a whole poll
    in one read, and a key it did not cover costs a read of its own."""
    from services.ingest.tracker import DoneSessions

    markers = {("t", "u1", "s1"): "done", ("t", "u2", "s1"): "extracted"}
    reads: list[list] = []

    def read(keys):
        reads.append(list(keys))
        return {k: markers[k] for k in keys if k in markers}

    done = DoneSessions(read, limit=2)
    t = PartitionTracker(0, start_offset=0)
    events = [ev("u1", "s1", 0), ev("u2", "s1", 0), ev("u3", "s1", 0)]
    done.prefetch(k for e in events if (k := t.asks_done(e)) is not None)
    assert reads == [[("t", "u1", "s1"), ("t", "u2", "s1"), ("t", "u3", "s1")]]
    # u1's session is processed: its replayed event is late and opens nothing; the others open
    assert [t.observe(e, i, 0.0, done) for i, e in enumerate(events)] == [[], [], []]
    assert t.late_events == 1 and set(t.open) == {("t", "u2"), ("t", "u3")}
    assert len(reads) == 1
    # an event of an open session is not asked about; a key the prefetch did not cover is read alone
    assert t.asks_done(ev("u2", "s1", 1)) is None
    assert done(("t", "u9", "s1")) is False and reads[-1] == [("t", "u9", "s1")]
    # remembered keys are not read again; the cache is bounded
    done.remember(("t", "u5", "s1"))
    done.remember(("t", "u6", "s1"))
    assert done(("t", "u6", "s1")) is True and len(reads) == 2
    done.prefetch([("t", "u6", "s1")])
    assert len(reads) == 2


def test_a_restarting_writer_is_waited_out_and_never_dead_letters_a_session():
    """The crash test found sessions dead-lettered as 'writer actor kept dying' while one killed
    writer took longer to restart than 11 short retries on a loaded machine: a restart is an
    outage, a session that keeps killing its writer is poison."""
    from services.ingest.tracker import MAX_WAIT_S, Close, InFlight

    close = Close(0, "t", "u", "s1", "end", 0, 1, b"")
    waiting = InFlight(close, None)
    pauses = []
    for _ in range(1000):  # ~2.7 h of restarting at the longest pause
        assert waiting.failed("unavailable", 0.0, 0.1, max_retries=3) is False
        pauses.append(waiting.not_before)
    assert pauses[:3] == [0.1, 0.2, 0.4] and max(pauses) == MAX_WAIT_S and waiting.actor_failures == 0

    dying = InFlight(close, None)
    assert [dying.failed("died", 0.0, 0.1, max_retries=3) for _ in range(12)] == [False] * 10 + [True] * 2

    failing = InFlight(close, None)
    assert [failing.failed("error", 0.0, 0.1, max_retries=3) for _ in range(4)] == [False, False, False, True]
    assert failing.not_before == 0.1 * 2 ** 3
