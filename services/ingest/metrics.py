"""Ingest metrics: what each consumer actor reports, and the service-wide sum.

Counters are per actor incarnation (a restarted actor starts from zero); offsets and lag are read
from Kafka and are authoritative. Lag is `highwater - committed`, where the high watermark is the
one the broker puts in each fetch response (the produced end of the partition): the local broker's
ListOffsets answer (`end_offsets`) is wrong, so it is never used.
"""

from __future__ import annotations

from collections import Counter

from pydantic import BaseModel, Field


class PartitionMetrics(BaseModel):
    partition: int
    committed: int
    """Offset committed to the group (everything below it is durable and, for closed sessions, processed)."""
    position: int
    """Next offset this consumer will read."""
    highwater: int | None
    """Produced end of the partition, from the last fetch response (None before the first fetch)."""
    lag: int | None
    """highwater - committed."""
    open_sessions: int
    pending_sessions: int


class ConsumerMetrics(BaseModel):
    name: str
    pid: int
    consumed: int = 0
    appended: int = 0
    """Turns newly written to the raw log."""
    duplicates: int = 0
    """Turns already in the raw log (replays, producer retries): skipped, never rewritten."""
    late_events: int = 0
    """Events of sessions already processed (stored, but the session is not processed again)."""
    dead_lettered: dict[str, int] = Field(default_factory=dict)
    """By stage: validation, append, session."""
    sessions_closed: dict[str, int] = Field(default_factory=dict)
    """By reason: end, newer, idle."""
    sessions_processed: int = 0
    sessions_skipped: int = 0
    """Closed again after a replay; the `done` marker made it a no-op."""
    session_retries: int = 0
    writer_restarts_seen: int = 0
    commits: int = 0
    committed_events: int = 0
    """Offsets moved past by commits in this incarnation."""
    paused: bool = False
    backpressure_pauses: int = 0
    partitions: list[PartitionMetrics] = Field(default_factory=list)


class IngestMetrics(BaseModel):
    consumers: list[ConsumerMetrics]
    unavailable: list[str] = Field(default_factory=list)
    """Consumer actors that did not answer (restarting)."""

    def total(self, field: str) -> int:
        return sum(getattr(c, field) for c in self.consumers)

    def by_key(self, field: str) -> dict[str, int]:
        out: Counter[str] = Counter()
        for c in self.consumers:
            out.update(getattr(c, field))
        return dict(out)

    @property
    def partitions(self) -> list[PartitionMetrics]:
        return sorted((p for c in self.consumers for p in c.partitions), key=lambda p: p.partition)

    @property
    def pending_sessions(self) -> int:
        return sum(p.pending_sessions for p in self.partitions)

    def summary(self) -> dict[str, object]:
        return {
            "consumed": self.total("consumed"), "appended": self.total("appended"),
            "duplicates": self.total("duplicates"), "late_events": self.total("late_events"),
            "committed_events": self.total("committed_events"), "dead_lettered": self.by_key("dead_lettered"),
            "sessions_closed": self.by_key("sessions_closed"), "sessions_processed": self.total("sessions_processed"),
            "sessions_skipped": self.total("sessions_skipped"), "pending_sessions": self.pending_sessions,
            "lag": {p.partition: p.lag for p in self.partitions},
        }


class RayMetricsExporter:
    """Publishes a consumer's metrics through `ray.util.metrics` (Prometheus via the Ray dashboard
    agent): counters for events and sessions, gauges for committed offset and lag per partition."""

    COUNTERS = ("consumed", "appended", "duplicates", "late_events", "sessions_processed", "sessions_skipped",
                "session_retries", "commits")

    def __init__(self, consumer: str) -> None:
        from ray.util.metrics import Counter as RayCounter
        from ray.util.metrics import Gauge

        self.tags = {"consumer": consumer}
        self.counters = {f: RayCounter(f"tsubasa_ingest_{f}_total", description=f"ingest {f}", tag_keys=("consumer",))
                         for f in self.COUNTERS}
        self.dead = RayCounter("tsubasa_ingest_dead_lettered_total", description="records dead-lettered",
                               tag_keys=("consumer", "stage"))
        self.closed = RayCounter("tsubasa_ingest_sessions_closed_total", description="sessions closed",
                                 tag_keys=("consumer", "reason"))
        self.committed = Gauge("tsubasa_ingest_committed_offset", description="committed offset",
                               tag_keys=("partition",))
        self.lag = Gauge("tsubasa_ingest_lag", description="fetch high watermark - committed offset",
                         tag_keys=("partition",))
        self.paused = Gauge("tsubasa_ingest_paused", description="1 while back-pressure pauses fetching",
                            tag_keys=("consumer",))
        self._last: dict[str, int] = {}

    def _inc(self, counter, key: str, value: int, tags: dict[str, str]) -> None:
        delta = value - self._last.get(key, 0)
        if delta > 0:
            counter.inc(delta, tags=tags)
            self._last[key] = value

    def export(self, m: ConsumerMetrics) -> None:
        for f, c in self.counters.items():
            self._inc(c, f, getattr(m, f), self.tags)
        for stage, n in m.dead_lettered.items():
            self._inc(self.dead, f"dead:{stage}", n, {**self.tags, "stage": stage})
        for reason, n in m.sessions_closed.items():
            self._inc(self.closed, f"closed:{reason}", n, {**self.tags, "reason": reason})
        self.paused.set(float(m.paused), tags=self.tags)
        for p in m.partitions:
            self.committed.set(p.committed, tags={"partition": str(p.partition)})
            if p.lag is not None:
                self.lag.set(p.lag, tags={"partition": str(p.partition)})
