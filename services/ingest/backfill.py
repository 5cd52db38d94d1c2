"""Backfill: rebuild raw turn logs from a topic's retained history with Ray Data.

The read is bounded: each partition is read from its start (or a given offset) up to the end it had
when the backfill began, one Ray Data read task per partition; an actor pool appends the events
through the same idempotent `MemoryWriter` as the live consumer (event ids already stored are
skipped, the Kafka offset is the turn's sequence), so a backfill over a live log is harmless.

Two readers:
- `ray`: Ray Data's own `ray.data.read_kafka` (Ray >= 2.50; needs confluent-kafka). It resolves
  and clamps its end offsets to the broker's ListOffsets high watermark.
- `kafka-python`: `KafkaHistoryDatasource` below, the same shape (a Ray Data datasource, one bounded
  read task per partition) but its end offsets come from the high watermark in fetch responses.
`auto` (the default) uses `ray` when confluent-kafka is installed and the broker's ListOffsets
answer agrees with its fetch responses, else `kafka-python`. The local broker (tansu) answers
ListOffsets with 1 for every partition, so against it `read_kafka` returns one message per
partition; `auto` detects that and says so.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from ray.data.datasource import Datasource

from services.ingest.kafka_io import client_kwargs, topic_partitions
from tsubasa.config import KafkaConfig, Settings
from tsubasa.schema import EventKind, InvalidEventError, parse_event

log = logging.getLogger(__name__)

Reader = Literal["auto", "ray", "kafka-python"]


def fetch_end_offsets(cfg: KafkaConfig, partitions: list[int], timeout_s: float = 30.0) -> dict[int, int]:
    """Each partition's produced end as reported in fetch responses (the high watermark)."""
    from kafka import KafkaConsumer, TopicPartition

    c = KafkaConsumer(**client_kwargs(cfg), enable_auto_commit=False, max_poll_records=1)
    tps = [TopicPartition(cfg.topic, p) for p in partitions]
    try:
        c.assign(tps)
        c.seek_to_beginning(*tps)
        deadline = time.monotonic() + timeout_s
        while any(c.highwater(tp) is None for tp in tps):
            if time.monotonic() > deadline:
                missing = [tp.partition for tp in tps if c.highwater(tp) is None]
                raise RuntimeError(f"no fetch response for partitions {missing} of {cfg.topic}")
            c.poll(timeout_ms=200)
        return {tp.partition: int(c.highwater(tp)) for tp in tps}
    finally:
        c.close()


def list_offsets_ends(cfg: KafkaConfig, partitions: list[int]) -> dict[int, int]:
    """The broker's ListOffsets answer for the latest offset (what `read_kafka` trusts)."""
    from kafka import KafkaConsumer, TopicPartition

    c = KafkaConsumer(**client_kwargs(cfg), enable_auto_commit=False)
    try:
        ends = c.end_offsets([TopicPartition(cfg.topic, p) for p in partitions])
        return {tp.partition: int(off) for tp, off in ends.items()}
    finally:
        c.close()


def choose_reader(cfg: KafkaConfig, partitions: list[int], ends: dict[int, int], reader: Reader) -> tuple[str, str]:
    """(reader, why)."""
    if reader != "auto":
        return reader, "requested"
    if importlib.util.find_spec("confluent_kafka") is None:
        return "kafka-python", "confluent-kafka is not installed (ray.data.read_kafka needs it)"
    listed = list_offsets_ends(cfg, partitions)
    if listed != ends:
        return "kafka-python", (f"the broker's ListOffsets ends {listed} disagree with its fetch high watermarks "
                                f"{ends}; ray.data.read_kafka clamps to the former and would stop early")
    return "ray", "ListOffsets agrees with fetch responses"


class KafkaHistoryDatasource(Datasource):
    """A Ray Data datasource: one bounded read task per partition, [start, end) offsets."""

    def __init__(self, cfg: KafkaConfig, ends: dict[int, int], starts: dict[int, int] | None = None) -> None:
        self.cfg = cfg
        self.ends = ends
        self.starts = starts or {}

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_name(self) -> str:
        return "KafkaHistory"

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list:
        from ray.data.block import BlockMetadata
        from ray.data.datasource import ReadTask

        tasks = []
        for p, end in sorted(self.ends.items()):
            start = self.starts.get(p, 0)
            if start >= end:
                continue
            meta = BlockMetadata(num_rows=end - start, size_bytes=None, exec_stats=None,
                                 input_files=(f"kafka://{self.cfg.topic}/{p}",))
            tasks.append(ReadTask(_partition_reader(self.cfg, p, start, end), meta,
                                  per_task_row_limit=per_task_row_limit))
        return tasks


def _partition_reader(cfg: KafkaConfig, partition: int, start: int, end: int):
    def read() -> Iterable:
        import pyarrow as pa
        from kafka import KafkaConsumer, TopicPartition

        c = KafkaConsumer(**client_kwargs(cfg), enable_auto_commit=False, max_poll_records=1000)
        tp = TopicPartition(cfg.topic, partition)
        c.assign([tp])
        c.seek(tp, start)
        rows: list[dict[str, Any]] = []
        nxt, idle_since = start, time.monotonic()
        try:
            while nxt < end:
                got = c.poll(timeout_ms=500).get(tp, [])
                if not got:
                    if time.monotonic() - idle_since > 60:
                        raise RuntimeError(f"partition {partition} stalled at offset {nxt} (end {end})")
                    continue
                idle_since = time.monotonic()
                for r in got:
                    if r.offset >= end:
                        nxt = end
                        break
                    rows.append({"partition": partition, "offset": r.offset, "key": r.key, "value": r.value})
                    nxt = r.offset + 1
                if len(rows) >= 1000:
                    yield pa.Table.from_pylist(rows)
                    rows = []
            if rows:
                yield pa.Table.from_pylist(rows)
        finally:
            c.close()

    return read


class RawLogAppender:
    """Ray Data UDF (actor pool): parse messages and append turns through `MemoryWriter`."""

    def __init__(self, settings: Settings) -> None:
        from services.ingest.session_writer import set_torch_threads
        from tsubasa.memory.runtime import MemorySystem
        from tsubasa.memory.writer import MemoryWriter

        set_torch_threads(settings.kafka.actor_torch_threads)
        system = MemorySystem(settings)
        self.store = system.store
        self.writer = MemoryWriter(system.store, system.embedder, None, settings.memory)

    def __call__(self, batch) -> dict[str, list]:
        out: dict[str, list] = {k: [] for k in ("partition", "offset", "status", "tenant_id", "user_id",
                                                  "session_id", "reason")}
        events = []
        for row in batch.to_pylist():
            status, reason, ev = "turn", "", None
            try:
                ev = parse_event(row["value"] or b"", key=row["key"])
                if ev.kind == EventKind.SESSION_END:
                    status = "end"
                elif "seq" not in ev.metadata:
                    ev = ev.model_copy(update={"metadata": {**ev.metadata, "seq": row["offset"]}})
            except InvalidEventError as exc:
                status, reason = "invalid", str(exc)
            out["partition"].append(row["partition"])
            out["offset"].append(row["offset"])
            out["reason"].append(reason)
            out["tenant_id"].append(ev.tenant_id if ev else "")
            out["user_id"].append(ev.user_id if ev else "")
            out["session_id"].append(ev.session_id if ev else "")
            out["status"].append(status)
            if status == "turn":
                events.append(ev)
        existing = self.store.existing_turn_ids([e.to_turn() for e in events])
        fresh = [e for e in events if e.to_turn().pk not in existing]
        if fresh:
            self.writer.append(fresh)
        fresh_ids = {e.event_id for e in fresh}
        i = 0
        for j, status in enumerate(out["status"]):  # mark stored-before turns as duplicates
            if status == "turn":
                if events[i].event_id not in fresh_ids:
                    out["status"][j] = "duplicate"
                i += 1
        return out


@dataclass
class BackfillReport:
    reader: str
    why: str
    end_offsets: dict[int, int]
    read: int = 0
    appended: int = 0
    duplicates: int = 0
    session_ends: int = 0
    invalid: int = 0
    invalid_samples: list[str] = field(default_factory=list)
    seconds: float = 0.0
    sessions: dict[tuple[str, str], list[tuple[str, bool]]] = field(default_factory=dict)
    """Per user: sessions in stream order, with whether a session_end named them."""

    def closed_sessions(self) -> list[tuple[str, str, str]]:
        """Sessions the history closes: all but each user's newest, and the newest if it ended."""
        out = []
        for (t, u), sessions in self.sessions.items():
            for i, (s, ended) in enumerate(sessions):
                if ended or i < len(sessions) - 1:
                    out.append((t, u, s))
        return out


def backfill(settings: Settings, *, reader: Reader = "auto", starts: dict[int, int] | None = None,
             concurrency: int = 1, batch_size: int = 500) -> BackfillReport:
    """Read the topic's retained history (bounded) and append every valid turn to the raw log."""
    import ray

    from services.ingest.service import prepare_store

    cfg = settings.kafka
    prepare_store(settings)
    partitions = topic_partitions(cfg)
    ends = fetch_end_offsets(cfg, partitions)
    chosen, why = choose_reader(cfg, partitions, ends, reader)
    log.info("backfill %s: reader %s (%s); ends %s", cfg.topic, chosen, why, ends)
    t0 = time.monotonic()
    if chosen == "ray":
        ds = ray.data.read_kafka(cfg.topic, bootstrap_servers=cfg.bootstrap_servers.split(","),
                                 start_offset={cfg.topic: dict(starts)} if starts else "earliest",
                                 end_offset={cfg.topic: dict(ends)}, consumer_config=_confluent_auth(cfg))
        ds = ds.select_columns(["partition", "offset", "key", "value"])
    else:
        ds = ray.data.read_datasource(KafkaHistoryDatasource(cfg, ends, starts),
                                      override_num_blocks=max(1, len(ends)))  # one block stream per partition
    out = ds.map_batches(RawLogAppender, fn_constructor_args=(settings,), batch_size=batch_size,
                         batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=concurrency),
                         num_cpus=cfg.actor_num_cpus)
    report = BackfillReport(reader=chosen, why=why, end_offsets=ends)
    order: dict[tuple[str, str], dict[str, tuple[int, int, bool]]] = {}
    for b in out.iter_batches(batch_format="pyarrow", batch_size=None):
        for row in b.to_pylist():
            report.read += 1
            st = row["status"]
            if st == "invalid":
                report.invalid += 1
                if len(report.invalid_samples) < 5:
                    report.invalid_samples.append(f"{row['partition']}@{row['offset']}: {row['reason']}")
                continue
            report.appended += st == "turn"
            report.duplicates += st == "duplicate"
            report.session_ends += st == "end"
            user = (row["tenant_id"], row["user_id"])
            first, _, ended = order.setdefault(user, {}).get(row["session_id"], (row["offset"], 0, False))
            order[user][row["session_id"]] = (min(first, row["offset"]), 0, ended or st == "end")
    for user, sessions in order.items():
        report.sessions[user] = [(s, v[2]) for s, v in sorted(sessions.items(), key=lambda kv: kv[1][0])]
    report.seconds = time.monotonic() - t0
    return report


def _confluent_auth(cfg: KafkaConfig) -> dict[str, Any] | None:
    if not cfg.security_protocol.startswith("SASL"):
        return None
    return {"security.protocol": cfg.security_protocol, "sasl.mechanism": cfg.sasl_mechanism,
            "sasl.username": cfg.sasl_username,
            "sasl.password": cfg.sasl_password.get_secret_value() if cfg.sasl_password else ""}

