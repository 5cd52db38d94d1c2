"""Partition consumer actors: Kafka -> raw turn log -> (on session close) session writers.

Each actor owns a fixed set of partitions (`assign`, not group rebalancing; see service.py for why)
and runs one loop in a background thread, started by `__init__`, so a restarted actor resumes by
itself from the group's committed offset:

    poll -> validate (invalid -> dead-letter topic) -> append turns to the raw log through the
    users' writer actors and wait for them (event ids already stored are skipped) -> track
    sessions -> hand closed sessions to the user's writer -> commit the smallest offset that a
    crash would need to replay (tracker.py)

A consumer holds no model and no embedder (only Kafka clients and a store client for session
markers), so a crashed one is back in about a second.

Back-pressure: while `kafka.max_pending_sessions` closed sessions wait for writers, the actor
pauses its partitions (it keeps polling, so the client stays alive, but fetches nothing).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass

import ray

from services.ingest.kafka_io import DeadLetter, make_consumer, make_producer
from services.ingest.metrics import ConsumerMetrics, PartitionMetrics, RayMetricsExporter
from services.ingest.session_writer import shard_of
from services.ingest.tracker import Close, DoneSessions, InFlight, PartitionTracker, SessionKey, SessionQueue
from tsubasa.config import Settings
from tsubasa.schema import Event, EventKind, InvalidEventError, parse_event

log = logging.getLogger(__name__)

_DONE_CACHE = 200_000  # session keys known to be processed (bounded; a miss costs one Milvus get)


class StorageUnavailableError(RuntimeError):
    """Every event of a batch failed to store: an outage, not poison. Retry; never dead-letter."""


class TransientKafkaError(RuntimeError):
    """A dead-letter write failed; the batch is handled again (nothing is committed meanwhile)."""


@dataclass
class _Parsed:
    partition: int
    offset: int
    event: Event
    payload: bytes


class PartitionConsumer:
    """The consumer loop for a set of partitions (wrapped as a Ray actor by the service)."""

    def __init__(self, settings: Settings, partitions: list[int], writers: list[str], name: str = "consumer",
                 start: bool = True) -> None:
        from kafka import TopicPartition

        from tsubasa.memory.store import MilvusStore

        self.settings = settings
        self.cfg = settings.kafka
        self.name = name
        # Writers by name, not handle: a handle among the constructor's arguments would live in the
        # object store, and Ray cannot guarantee those for restarts (ray-project/ray#53727).
        self.writers = [ray.get_actor(w) for w in writers]
        self.store = MilvusStore(settings.milvus, uri=settings.milvus_uri)  # session markers only
        self.tps = [TopicPartition(self.cfg.topic, p) for p in partitions]
        self.consumer = make_consumer(self.cfg)
        self.consumer.assign(self.tps)
        self.trackers = {tp.partition: PartitionTracker(tp.partition, self.consumer.position(tp)) for tp in self.tps}
        self.committed = {p: t.next_offset for p, t in self.trackers.items()}
        self._producer = None
        self.queue = SessionQueue()
        self.done = DoneSessions(self._marker_states, limit=_DONE_CACHE)
        self.m = ConsumerMetrics(name=name, pid=os.getpid())
        self._closed: Counter[str] = Counter()
        self._dlq: Counter[str] = Counter()
        self._stop = threading.Event()
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self._last_commit = 0.0
        self._thread: threading.Thread | None = None
        self._exporter = RayMetricsExporter(name) if ray.is_initialized() else None
        log.info("%s: partitions %s from offsets %s", name, partitions, self.committed)
        if start:
            self._thread = threading.Thread(target=self._run, name=f"{name}-loop", daemon=True)
            self._thread.start()

    # ---- control (actor methods) ---------------------------------------------------------------
    def metrics(self) -> ConsumerMetrics:
        with self._lock:
            m = self.m.model_copy(deep=True)
            m.sessions_closed = dict(self._closed)
            m.dead_lettered = dict(self._dlq)
            m.late_events = sum(t.late_events for t in self.trackers.values())
            m.partitions = []
            for tp in self.tps:
                t = self.trackers[tp.partition]
                hw = self.consumer.highwater(tp)
                committed = self.committed[tp.partition]
                m.partitions.append(PartitionMetrics(
                    partition=tp.partition, committed=committed, position=t.next_offset, highwater=hw,
                    lag=None if hw is None else max(0, hw - committed), open_sessions=len(t.open),
                    pending_sessions=t.pending))
            return m

    def pid(self) -> int:
        return os.getpid()

    def stop(self, grace_s: float = 30.0) -> ConsumerMetrics:
        """Stop fetching, let in-flight sessions finish (up to `grace_s`), commit what is durable."""
        self._grace_s = grace_s
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=grace_s + 30)
        return self.metrics()

    # ---- the loop ------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self.step()
            self._drain(getattr(self, "_grace_s", 30.0))
        except Exception:  # a bug or an unexpected client state: crash, Ray restarts us, replay heals
            log.exception("%s: consumer loop failed; exiting so that the actor restarts", self.name)
            os._exit(70)
        finally:
            self._stopped.set()

    def step(self, poll_ms: int = 200) -> None:
        """One iteration: sessions, back-pressure, poll + handle, idle closes, commit."""
        self._collect_sessions()
        self._submit_sessions()
        self._backpressure()
        records = self.consumer.poll(timeout_ms=poll_ms, max_records=self.cfg.max_poll_records)
        if records:
            self._handle_with_retry({tp.partition: recs for tp, recs in records.items() if recs})
        now = time.monotonic()
        for tp in self.tps:
            closes = self.trackers[tp.partition].idle(now, self.cfg.session_idle_timeout_s, self._caught_up(tp))
            self._enqueue(closes)
        if time.monotonic() - self._last_commit >= self.cfg.commit_interval_s:
            self._commit()
            if self._exporter is not None:
                self._exporter.export(self.metrics())

    def _drain(self, grace_s: float) -> None:
        deadline = time.monotonic() + grace_s
        while len(self.queue) and time.monotonic() < deadline:
            self._collect_sessions()
            self._submit_sessions()
            time.sleep(0.05)
        self._commit()
        self.consumer.close(autocommit=False)
        if self._producer is not None:
            self._producer.close(timeout=10)

    def _caught_up(self, tp) -> bool:
        hw = self.consumer.highwater(tp)
        return hw is not None and self.trackers[tp.partition].next_offset >= hw

    # ---- records -------------------------------------------------------------------------------
    def _handle_with_retry(self, batches: dict[int, list]) -> None:
        delay = max(self.cfg.retry_backoff_s, 0.05)
        while True:
            try:
                self._handle(batches)
                return
            except (StorageUnavailableError, TransientKafkaError) as exc:
                log.warning("%s: batch at %s not stored yet (%s); retrying in %.1fs", self.name,
                            {p: recs[0].offset for p, recs in batches.items() if recs}, exc, delay)
                if self._stop.is_set():
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 30.0)

    def _handle(self, batches: dict[int, list]) -> None:
        """One poll, all its partitions: validate, then append every partition's turns in one round
        through the writers (one call per writer, not per partition: appends cost per call), then
        track each partition's sessions in offset order."""
        parsed: dict[int, list[_Parsed]] = {}
        dead: list[DeadLetter] = []
        for partition, records in sorted(batches.items()):
            records = [r for r in records if r.offset >= self.trackers[partition].next_offset]  # a retried batch
            batches[partition] = records
            parsed[partition] = []
            for r in records:
                payload = r.value if r.value is not None else b""
                try:
                    parsed[partition].append(_Parsed(partition, r.offset, parse_event(payload, key=r.key), payload))
                except InvalidEventError as exc:
                    dead.append(DeadLetter(str(exc), "validation", r.topic, partition, r.offset, r.key, payload))
        for p, reason in self._store([x for ps in parsed.values() for x in ps]):
            dead.append(DeadLetter(reason, "append", self.cfg.topic, p.partition, p.offset,
                                   p.event.key.encode(), p.payload, attempts=self.cfg.max_retries + 1))
        self._dead_letter(dead)
        # after the store and the dead letters, which may raise and retry the poll: one marker read per poll
        self.done.prefetch(key for partition, items in parsed.items() for p in items
                           if (key := self.trackers[partition].asks_done(p.event)) is not None)
        bad = {(d.partition, d.offset) for d in dead}
        now = time.monotonic()
        closes: list[Close] = []
        for partition, records in sorted(batches.items()):
            tracker = self.trackers[partition]
            for r in records:
                if (partition, r.offset) in bad:
                    tracker.handled(r.offset)
            for p in parsed[partition]:
                if (partition, p.offset) not in bad:
                    closes.extend(tracker.observe(p.event, p.offset, now, self.done, p.payload))
            with self._lock:
                self.m.consumed += len(records)
        self._enqueue(closes)

    def _store(self, parsed: list[_Parsed]) -> list[tuple[_Parsed, str]]:
        """Append the batch's turns through the users' writers (bounded retries); isolate events
        that fail on their own. A writer that is down (restarting) is an outage: retried, never
        dead-lettered."""
        turns = [p for p in parsed if p.event.kind == EventKind.TURN]
        if not turns:
            return []
        err: Exception | None = None
        for attempt in range(self.cfg.max_retries + 1):
            try:
                self._append(turns)
                return []
            except ray.exceptions.RayTaskError as exc:  # raised inside append: Milvus, embedder, data
                err = exc
                log.warning("%s: append failed (attempt %d): %r", self.name, attempt + 1, exc.cause)
                time.sleep(self.cfg.retry_backoff_s * (2 ** attempt))
        failed: list[tuple[_Parsed, str]] = []
        for p in turns:
            try:
                self._append([p])
            except ray.exceptions.RayTaskError as exc:
                failed.append((p, f"append failed: {exc.cause!r}"))
        if len(failed) == len(turns):
            raise StorageUnavailableError(repr(err.cause if isinstance(err, ray.exceptions.RayTaskError) else err))
        return failed

    def _append(self, items: list[_Parsed]) -> None:
        # Kafka order is the user's order: the offset is the turn's sequence unless the producer set one.
        shards: dict[int, list[Event]] = {}
        for p in items:
            e = p.event if "seq" in p.event.metadata else p.event.model_copy(
                update={"metadata": {**p.event.metadata, "seq": p.offset}})
            shards.setdefault(shard_of(e.tenant_id, e.user_id, len(self.writers)), []).append(e)
        refs = [self.writers[i].append.remote(evs) for i, evs in shards.items()]
        try:
            results = ray.get(refs)
        except ray.exceptions.RayActorError as exc:
            raise StorageUnavailableError(f"writer unavailable: {exc!r}") from exc
        with self._lock:
            self.m.appended += sum(r["appended"] for r in results)
            self.m.duplicates += sum(r["duplicates"] for r in results)

    def _dead_letter(self, dead: list[DeadLetter]) -> None:
        if not dead:
            return
        from kafka.errors import KafkaError

        if self._producer is None:
            self._producer = make_producer(self.cfg)
        try:
            futures = [self._producer.send(self.cfg.dead_letter_topic, key=d.key, value=d.to_json()) for d in dead]
            self._producer.flush(timeout=30)
            for f in futures:
                f.get(timeout=30)
        except KafkaError as exc:
            raise TransientKafkaError(f"dead-letter write failed: {exc!r}") from exc
        with self._lock:
            self._dlq.update(d.stage for d in dead)
        for d in dead:
            log.warning("%s: dead-lettered %s:%d@%d (%s): %s", self.name, d.topic, d.partition, d.offset, d.stage,
                        d.reason[:300])

    def _marker_states(self, keys: list[SessionKey]) -> dict[SessionKey, str]:
        return {k: st.state for k, st in self.store.session_states(keys).items()}

    # ---- sessions ------------------------------------------------------------------------------
    def _enqueue(self, closes: list[Close]) -> None:
        if not closes:
            return
        with self._lock:
            self._closed.update(c.reason for c in closes)
        for c in closes:
            self.queue.waiting.setdefault(c.user, deque()).append(c)

    def _submit(self, item: InFlight) -> None:
        c = item.close
        writer = self.writers[shard_of(c.tenant_id, c.user_id, len(self.writers))]
        item.ref = writer.process.remote(c.tenant_id, c.user_id, c.session_id)
        self.queue.inflight[c.user] = item

    def _submit_sessions(self) -> None:
        now = time.monotonic()
        for user, item in list(self.queue.retry.items()):
            if now >= item.not_before:
                del self.queue.retry[user]
                self._submit(item)
        for user, q in list(self.queue.waiting.items()):
            if user in self.queue.inflight or user in self.queue.retry:
                continue
            if q:
                self._submit(InFlight(q.popleft(), None))
            if not q:
                del self.queue.waiting[user]

    def _collect_sessions(self) -> None:
        if not self.queue.inflight:
            return
        by_ref = {item.ref: user for user, item in self.queue.inflight.items()}
        ready, _ = ray.wait(list(by_ref), num_returns=len(by_ref), timeout=0)
        for ref in ready:
            user = by_ref[ref]
            item = self.queue.inflight.pop(user)
            try:
                res = ray.get(ref)
            except ray.exceptions.RayActorError as exc:  # restarting or died: retry, it resumes from markers
                restarting = isinstance(exc, ray.exceptions.ActorUnavailableError)
                if not restarting:
                    with self._lock:
                        self.m.writer_restarts_seen += 1
                if item.failed("unavailable" if restarting else "died", time.monotonic(), self.cfg.retry_backoff_s,
                               self.cfg.max_retries):
                    self._session_failed(item, f"writer actor kept dying: {exc!r}")
                else:
                    self.queue.retry[user] = item
                continue
            except ray.exceptions.RayTaskError as exc:
                with self._lock:
                    self.m.session_retries += 1
                if item.failed("error", time.monotonic(), self.cfg.retry_backoff_s, self.cfg.max_retries):
                    self._session_failed(item, f"session processing failed: {exc.cause!r}")
                else:
                    self.queue.retry[user] = item
                continue
            self._finish(item.close, skipped=bool(res.get("skipped")))

    def _finish(self, c: Close, skipped: bool) -> None:
        self.trackers[c.partition].finished(c.key)
        self.done.remember(c.key)
        with self._lock:
            if skipped:
                self.m.sessions_skipped += 1
            else:
                self.m.sessions_processed += 1

    def _session_failed(self, item: InFlight, reason: str) -> None:
        c = item.close
        payload = c.trigger_payload or (
            f'{{"tenant_id": "{c.tenant_id}", "user_id": "{c.user_id}", "session_id": "{c.session_id}", '
            f'"closed_by": "{c.reason}"}}').encode()
        d = DeadLetter(reason, "session", self.cfg.topic, c.partition, c.trigger_offset,
                       f"{c.tenant_id}:{c.user_id}".encode(), payload, attempts=item.attempts + item.actor_failures,
                       session=":".join(c.key))
        while True:
            try:
                self._dead_letter([d])
                break
            except TransientKafkaError as exc:
                log.warning("%s: %s; retrying", self.name, exc)
                time.sleep(max(self.cfg.retry_backoff_s, 0.5))
        self.trackers[c.partition].finished(c.key)

    # ---- flow control and commits --------------------------------------------------------------
    def _backpressure(self) -> None:
        pending = len(self.queue)
        if not self.m.paused and pending >= self.cfg.max_pending_sessions:
            self.consumer.pause(*self.tps)
            with self._lock:
                self.m.paused = True
                self.m.backpressure_pauses += 1
        elif self.m.paused and pending <= self.cfg.max_pending_sessions // 2:
            self.consumer.resume(*self.tps)
            with self._lock:
                self.m.paused = False

    def _commit(self) -> None:
        from kafka.errors import KafkaError
        from kafka.structs import OffsetAndMetadata

        self._last_commit = time.monotonic()
        offsets = {}
        for tp in self.tps:
            off = self.trackers[tp.partition].commit_offset()
            if off > self.committed[tp.partition]:  # the commit point only moves forward
                offsets[tp] = OffsetAndMetadata(off, "", -1)
        if not offsets:
            return
        try:
            self.consumer.commit(offsets, timeout_ms=10_000)
        except KafkaError as exc:  # broker away: keep the old commit point, try again next interval
            log.warning("%s: commit failed (%r); will retry", self.name, exc)
            return
        with self._lock:
            for tp, om in offsets.items():
                self.m.committed_events += max(0, om.offset - self.committed[tp.partition])
                self.committed[tp.partition] = om.offset
            self.m.commits += 1
