"""kafka-python clients built from `KafkaConfig`, topic creation, partitioning and dead-letter records.

Everything Kafka-specific that the consumer, producer and backfill share lives here, so the other
modules speak in events and offsets. kafka-python's default partitioner is murmur2 (the Java
client's); librdkafka-based producers must set `partitioner=murmur2_random` to agree with it.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from tsubasa.config import KafkaConfig

log = logging.getLogger(__name__)


def client_kwargs(cfg: KafkaConfig) -> dict[str, Any]:
    """Connection settings common to consumers, producers and the admin client."""
    kw: dict[str, Any] = {"bootstrap_servers": cfg.bootstrap_servers.split(","),
                          "security_protocol": cfg.security_protocol}
    if cfg.security_protocol.startswith("SASL"):
        kw.update(sasl_mechanism=cfg.sasl_mechanism, sasl_plain_username=cfg.sasl_username,
                  sasl_plain_password=cfg.sasl_password.get_secret_value() if cfg.sasl_password else None)
    return kw


def make_consumer(cfg: KafkaConfig, **overrides: Any):
    """A consumer with manual commits; partitions are assigned by the caller (`assign`)."""
    from kafka import KafkaConsumer

    kw = dict(client_kwargs(cfg), group_id=cfg.group_id, enable_auto_commit=False,
              auto_offset_reset="earliest", session_timeout_ms=cfg.session_timeout_ms,
              heartbeat_interval_ms=cfg.heartbeat_interval_ms, max_poll_records=cfg.max_poll_records)
    kw.update(overrides)
    return KafkaConsumer(**kw)


def make_producer(cfg: KafkaConfig, **overrides: Any):
    """A producer that keeps per-key order across retries (one request in flight per broker)."""
    from kafka import KafkaProducer

    kw = dict(client_kwargs(cfg), acks="all", retries=10, linger_ms=5,
              max_in_flight_requests_per_connection=1, request_timeout_ms=15_000)
    kw.update(overrides)
    return KafkaProducer(**kw)


def ensure_topics(cfg: KafkaConfig, partitions: int | None = None, timeout_s: float = 30.0) -> dict[str, int]:
    """Create the event and dead-letter topics if missing; return {topic: partition count}."""
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import TopicAlreadyExistsError

    admin = KafkaAdminClient(**client_kwargs(cfg))
    try:
        existing = set(admin.list_topics())
        wanted = {cfg.topic: partitions or cfg.partitions, cfg.dead_letter_topic: 1}
        new = [NewTopic(t, num_partitions=n, replication_factor=1) for t, n in wanted.items() if t not in existing]
        if new:
            with contextlib.suppress(TopicAlreadyExistsError):  # created meanwhile by another process
                admin.create_topics(new)
    finally:
        admin.close()
    return {t: len(topic_partitions(cfg, t, timeout_s)) for t in (cfg.topic, cfg.dead_letter_topic)}


def topic_partitions(cfg: KafkaConfig, topic: str | None = None, timeout_s: float = 30.0) -> list[int]:
    """Partition ids of `topic` (default: the event topic), waiting for metadata to appear."""
    from kafka import KafkaConsumer

    topic = topic or cfg.topic
    c = KafkaConsumer(**client_kwargs(cfg), enable_auto_commit=False)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            parts = c.partitions_for_topic(topic)
            if parts:
                return sorted(parts)
            if time.monotonic() > deadline:
                raise RuntimeError(f"kafka.topic {topic!r} has no partitions on {cfg.bootstrap_servers}")
            time.sleep(0.2)
            c.topics()  # refresh metadata
    finally:
        c.close()


def partition_for_key(key: str | bytes, n_partitions: int) -> int:
    """The partition kafka-python (and the Java client) picks for `key`: murmur2, positive, modulo."""
    from kafka.partitioner.default import murmur2

    data = key.encode() if isinstance(key, str) else key
    return (murmur2(data) & 0x7FFFFFFF) % n_partitions


def committed_offsets(cfg: KafkaConfig, partitions: list[int] | None = None) -> dict[int, int | None]:
    """The group's committed offset per partition of the event topic (None: nothing committed)."""
    from kafka import TopicPartition

    c = make_consumer(cfg)
    try:
        parts = partitions if partitions is not None else topic_partitions(cfg)
        return {p: c.committed(TopicPartition(cfg.topic, p), timeout_ms=10_000) for p in parts}
    finally:
        c.close()


@dataclass
class DeadLetter:
    """One dead-letter record: why, where it came from and the original bytes (replayable as is)."""

    reason: str
    stage: str
    """`validation` (the event is malformed), `append` (storing it failed) or `session` (processing
    the session it closed failed after retries)."""
    topic: str
    partition: int
    offset: int
    key: bytes | None
    payload: bytes
    attempts: int = 0
    session: str | None = None
    """`tenant:user:session` for `session` failures."""

    def to_json(self) -> bytes:
        try:
            text, b64 = self.payload.decode("utf-8"), None
        except UnicodeDecodeError:
            text, b64 = None, base64.b64encode(self.payload).decode()
        return json.dumps({
            "reason": self.reason, "stage": self.stage, "source": {
                "topic": self.topic, "partition": self.partition, "offset": self.offset,
                "key": self.key.decode("utf-8", errors="replace") if self.key is not None else None},
            "session": self.session, "attempts": self.attempts,
            "failed_at": datetime.now(UTC).isoformat(), "payload": text, "payload_base64": b64,
        }).encode()

    @staticmethod
    def original_payload(record: dict[str, Any]) -> bytes:
        """The original message bytes from a decoded dead-letter record."""
        if record.get("payload_base64"):
            return base64.b64decode(record["payload_base64"])
        return (record.get("payload") or "").encode()
