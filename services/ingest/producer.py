"""Publish events to the event topic, keyed `tenant:user` (LoCoMo replay, benchmarks, tests).

Delivery is at-least-once: a send that fails (broker away) is sent again until `deadline_s`; a
duplicate in the topic is harmless because the raw log is keyed by event id.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from services.ingest.kafka_io import make_producer
from tsubasa.config import KafkaConfig
from tsubasa.schema import Event

log = logging.getLogger(__name__)


@dataclass
class ProduceReport:
    produced: int = 0
    resent: int = 0
    seconds: float = 0.0
    end_offsets: dict[int, int] = field(default_factory=dict)
    """Per partition: last acknowledged offset + 1 (the produced end, as the broker acknowledged it)."""
    per_partition: dict[int, int] = field(default_factory=dict)

    @property
    def events_per_s(self) -> float:
        return self.produced / self.seconds if self.seconds else 0.0


class EventProducer:
    def __init__(self, cfg: KafkaConfig, topic: str | None = None, **overrides) -> None:
        self.cfg = cfg
        self.topic = topic or cfg.topic
        self.producer = make_producer(cfg, **overrides)

    def produce(self, events: Iterable[Event | tuple[bytes | None, bytes]], *, batch: int = 500,
                rate: float = 0.0, deadline_s: float = 300.0,
                on_batch: Callable[[ProduceReport], None] | None = None) -> ProduceReport:
        """Send events (or raw `(key, value)` pairs) in order, batch by batch, each batch acknowledged
        before the next; failed sends are retried in their original order. `rate` caps events/s."""
        report = ProduceReport()
        t0 = time.monotonic()
        chunk: list[tuple[bytes | None, bytes]] = []
        for item in events:
            if isinstance(item, Event):
                chunk.append((item.key.encode(), item.model_dump_json().encode()))
            else:
                chunk.append(item)
            if len(chunk) >= batch:
                self._send_acked(chunk, report, t0 + deadline_s)
                chunk = []
                if on_batch:
                    on_batch(report)
                if rate > 0:
                    ahead = report.produced / rate - (time.monotonic() - t0)
                    if ahead > 0:
                        time.sleep(ahead)
        if chunk:
            self._send_acked(chunk, report, t0 + deadline_s)
            if on_batch:
                on_batch(report)
        report.seconds = time.monotonic() - t0
        return report

    def _send_acked(self, chunk: list[tuple[bytes | None, bytes]], report: ProduceReport, deadline: float) -> None:
        from kafka.errors import KafkaError

        todo = chunk
        delay = 0.5
        while todo:
            futures = []
            for key, value in todo:
                try:
                    futures.append(self.producer.send(self.topic, key=key, value=value))
                except KafkaError as exc:  # buffer full / metadata unavailable: counts as failed
                    futures.append(exc)
            try:
                self.producer.flush(timeout=30)
            except KafkaError as exc:
                log.warning("flush failed: %r", exc)
            failed = []
            for (key, value), f in zip(todo, futures, strict=True):
                if isinstance(f, Exception):
                    failed.append((key, value))
                    continue
                try:
                    md = f.get(timeout=30)
                except KafkaError:
                    failed.append((key, value))
                    continue
                report.produced += 1
                report.per_partition[md.partition] = report.per_partition.get(md.partition, 0) + 1
                report.end_offsets[md.partition] = max(report.end_offsets.get(md.partition, 0), md.offset + 1)
            if failed:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{len(failed)} events not produced to {self.topic} before the deadline")
                log.warning("%d sends failed; resending in %.1fs", len(failed), delay)
                report.resent += len(failed)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
            todo = failed

    def close(self) -> None:
        self.producer.close(timeout=10)

    def __enter__(self) -> EventProducer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def interleave_sessions(streams: list[list[list[Event]]]) -> list[Event]:
    """Order several users' sessions as a live stream would: round-robin over users, session by
    session, each user's own events in order."""
    out: list[Event] = []
    depth = max((len(s) for s in streams), default=0)
    for i in range(depth):
        for sessions in streams:
            if i < len(sessions):
                out.extend(sessions[i])
    return out
