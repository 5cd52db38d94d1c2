"""The ingest service: consumer actors and session-writer actors on Ray.

Partition ownership: per-partition assignment supervised by Ray, not a Kafka consumer group.
The service reads the topic's partitions once, gives partition p to consumer actor p mod N
(`KafkaConsumer.assign`), and creates every actor with `max_restarts=-1`. Why:

- Recovery is one actor restart: Ray notices a dead actor at once and re-runs its constructor,
  which resumes from the group's committed offset. A consumer group would first wait
  `session_timeout_ms` for the dead member, then stop every member for an eager rebalance, and
  again when the restarted actor rejoins: two stop-the-world pauses per crash.
- The owner of a user is fixed: one partition per user (murmur2 of `tenant:user`), one actor per
  partition, so the single-writer-per-user order needs no coordination between actors.
- The group id is still used for offsets (`commit` with a manual assignment), so standard Kafka
  tooling shows committed offsets and lag.

What it gives up: partitions added to the topic, or a changed number of consumers, are picked up on
the next start of the service (not live), and the broker does not fence a zombie consumer; a zombie
can only rewrite what is already there, since turns are keyed by event id and sessions by their
`done` marker.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import ray

from services.ingest.consumer import PartitionConsumer
from services.ingest.kafka_io import ensure_topics, make_consumer, topic_partitions
from services.ingest.metrics import ConsumerMetrics, IngestMetrics
from services.ingest.session_writer import EngineFactory, SessionWriter
from tsubasa.config import Settings

log = logging.getLogger(__name__)


class LocalMilvusFileError(ValueError):
    """Ray actors are separate processes; a Milvus Lite file admits one process."""


def check_milvus_uri(settings: Settings) -> None:
    uri = settings.milvus_uri
    if "://" not in uri:
        raise LocalMilvusFileError(
            f"milvus.uri is a Milvus Lite file ({uri}); the ingest actors are separate processes and a "
            "Milvus Lite file admits one. Start `milvus-lite server --data-dir DIR --host 127.0.0.1 "
            "--port 19530` and set TSUBASA_MILVUS__URI=http://127.0.0.1:19530 (or use a Milvus cluster).")


def prepare_store(settings: Settings) -> None:
    """Create the Milvus collections once, before several actors would race to create them."""
    from tsubasa.memory.store import MilvusStore

    MilvusStore(settings.milvus, uri=settings.milvus_uri)


def assign_partitions(partitions: list[int], n_consumers: int) -> list[list[int]]:
    """Partition p goes to consumer p mod N (N capped at the number of partitions)."""
    n = max(1, min(n_consumers, len(partitions)))
    return [partitions[i::n] for i in range(n)]


class IngestService:
    """Starts, watches and stops the ingest actors for one topic."""

    def __init__(self, settings: Settings, engine_factory: EngineFactory | None = None,
                 name: str | None = None) -> None:
        self.settings = settings
        self.cfg = settings.kafka
        self.engine_factory = engine_factory
        self.name = name or f"tsubasa-ingest-{uuid.uuid4().hex[:6]}"
        self.writers: list[Any] = []
        self.consumers: list[Any] = []
        self.assignment: list[list[int]] = []
        self.partitions: list[int] = []
        self._offsets_reader = None

    def start(self, wait_ready: bool = True, timeout_s: float = 300.0) -> IngestService:
        check_milvus_uri(self.settings)
        if not ray.is_initialized():
            raise RuntimeError("call ray.init() (or tsubasa ingest run) before starting the ingest service")
        ensure_topics(self.cfg)
        prepare_store(self.settings)
        self.partitions = topic_partitions(self.cfg)
        self.assignment = assign_partitions(self.partitions, self.cfg.consumers)
        opts = {"max_restarts": -1, "num_cpus": self.cfg.actor_num_cpus}
        writer_cls = ray.remote(concurrency_groups={"append": 1, "control": 1})(SessionWriter)
        self.writers = [writer_cls.options(name=f"{self.name}-writer-{i}", **opts)
                        .remote(self.settings, self.engine_factory, i) for i in range(self.cfg.writers)]
        consumer_cls = ray.remote(PartitionConsumer)
        self.consumers = [consumer_cls.options(name=f"{self.name}-consumer-{i}", **opts)
                          .remote(self.settings, parts, [f"{self.name}-writer-{i}" for i in range(len(self.writers))],
                                  f"consumer-{i}")
                          for i, parts in enumerate(self.assignment)]
        log.info("%s: %d consumers over partitions %s, %d writers", self.name, len(self.consumers),
                 self.assignment, len(self.writers))
        if wait_ready:
            self.wait_ready(timeout_s)
        return self

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        """Block until every actor finished its constructor (models and clients loaded)."""
        refs = [w.stats.remote() for w in self.writers] + [c.pid.remote() for c in self.consumers]
        ray.get(refs, timeout=timeout_s)

    # ---- observing -----------------------------------------------------------------------------
    def metrics(self, timeout_s: float = 10.0) -> IngestMetrics:
        """Every consumer's metrics; an actor that is restarting is listed as unavailable."""
        out: list[ConsumerMetrics] = []
        missing: list[str] = []
        refs = [c.metrics.remote() for c in self.consumers]
        for i, ref in enumerate(refs):
            try:
                out.append(ray.get(ref, timeout=timeout_s))
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                missing.append(f"consumer-{i}")
        return IngestMetrics(consumers=out, unavailable=missing)

    def pids(self, timeout_s: float = 120.0) -> dict[str, int]:
        """Process ids of the actors (for operators and crash tests); waits out restarts."""
        calls = {f"consumer-{i}": (lambda c=c: c.pid.remote()) for i, c in enumerate(self.consumers)}
        calls.update({f"writer-{i}": (lambda w=w: w.stats.remote()) for i, w in enumerate(self.writers)})
        out: dict[str, int] = {}
        deadline = time.monotonic() + timeout_s
        for name, call in calls.items():
            while True:
                try:
                    got = ray.get(call(), timeout=max(1.0, deadline - time.monotonic()))
                    out[name] = got["pid"] if isinstance(got, dict) else got
                    break
                except ray.exceptions.RayActorError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)
        return out

    def committed(self) -> dict[int, int | None]:
        """The group's committed offsets, read from Kafka (one reader kept open between calls)."""
        from kafka import TopicPartition

        if self._offsets_reader is None:
            self._offsets_reader = make_consumer(self.cfg)
        return {p: self._offsets_reader.committed(TopicPartition(self.cfg.topic, p), timeout_ms=10_000)
                for p in self.partitions}

    def drained(self, end_offsets: dict[int, int] | None = None) -> bool:
        """True when every partition's committed offset reached its end (given, else the fetch
        high watermark) and no session waits: everything produced is in memory."""
        m = self.metrics()
        if m.unavailable:
            return False
        for p in m.partitions:
            end = end_offsets.get(p.partition, 0) if end_offsets is not None else p.highwater
            if end is None or p.committed < end or p.pending_sessions or p.open_sessions:
                return False
        return True

    def wait_until(self, predicate: Callable[[], bool], timeout_s: float, every_s: float = 0.5) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if predicate():
                    return True
            except ray.exceptions.RayActorError:
                pass
            time.sleep(every_s)
        return False

    # ---- stopping ------------------------------------------------------------------------------
    def stop(self, grace_s: float = 30.0) -> IngestMetrics:
        """Graceful shutdown: consumers stop fetching, finish in-flight sessions (up to `grace_s`)
        and commit what is durable; then every actor is released."""
        final: list[ConsumerMetrics] = []
        missing: list[str] = []
        refs = [c.stop.remote(grace_s) for c in self.consumers]
        for i, ref in enumerate(refs):
            try:
                final.append(ray.get(ref, timeout=grace_s + 60))
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                missing.append(f"consumer-{i}")
        for a in [*self.consumers, *self.writers]:
            ray.kill(a, no_restart=True)
        if self._offsets_reader is not None:
            self._offsets_reader.close()
            self._offsets_reader = None
        self.consumers, self.writers = [], []
        return IngestMetrics(consumers=final, unavailable=missing)
