"""Rows of the Milvus collections and the records they hold (turns, observations, memories, versions).

Pure conversions, no client: field lists, row -> record and record -> row, with the stored lengths.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

import numpy as np

from tsubasa.memory.milvus import MAX_TEXT
from tsubasa.schema import EvolutionDecision, EvolutionOp, MemoryRecord, MemoryVersion, Observation, Turn, stable_id


def ms(dt: datetime) -> int:
    return int(dt.timestamp() * 1000)


def from_ms(value: int) -> datetime:
    return datetime.fromtimestamp(value / 1000, tz=UTC)


def _date(s: str) -> date | None:
    return date.fromisoformat(s) if s else None


@dataclass
class StoredObservation:
    observation: Observation
    vector: np.ndarray
    decision: EvolutionDecision | None
    applied: bool


TURN_FIELDS = ["tenant_id", "user_id", "event_id", "session_id", "speaker", "text", "source_id",
               "session_date", "ts", "seq"]
OBS_FIELDS = ["tenant_id", "user_id", "observation_id", "session_id", "speaker", "text", "event_date",
              "report_date", "source_ids", "attributed", "idx", "decision", "applied"]
MEM_FIELDS = ["tenant_id", "user_id", "text", "version", "created_at", "updated_at", "last_op",
              "source_ids", "observation_ids", "event_date"]
HIST_FIELDS = ["memory_id", "version", "text", "op", "observation_id", "at"]


def turn_from_row(row: dict[str, Any]) -> Turn:
    return Turn(event_id=row["event_id"], tenant_id=row["tenant_id"], user_id=row["user_id"],
                session_id=row["session_id"], speaker=row["speaker"], text=row["text"],
                source_id=row["source_id"], session_date=row["session_date"],
                timestamp=from_ms(row["ts"]), seq=row["seq"])


def turn_row(t: Turn) -> dict[str, Any]:
    """The turn's fields (its vector, where the layout keeps one in the row, is added by TurnLog)."""
    return {"id": t.pk, "tenant_id": t.tenant_id, "user_id": t.user_id, "event_id": t.event_id,
            "session_id": t.session_id, "speaker": t.speaker[:128], "text": t.text[:MAX_TEXT],
            "source_id": t.source_id[:128], "session_date": t.session_date[:64], "ts": ms(t.timestamp),
            "seq": t.seq}


def turn_order(t: Turn) -> tuple[datetime, int, str]:
    """Timestamps order a session; seq breaks ties (events may arrive in several batches)."""
    return t.timestamp, t.seq, t.event_id


def obs_from_row(row: dict[str, Any]) -> Observation:
    return Observation(
        observation_id=row["observation_id"], tenant_id=row["tenant_id"], user_id=row["user_id"],
        session_id=row["session_id"], speaker=row["speaker"], text=row["text"],
        event_date=_date(row["event_date"]), report_date=_date(row["report_date"]),
        source_ids=json.loads(row["source_ids"]), attributed=row["attributed"], index=row["idx"])


def stored_obs_from_row(row: dict[str, Any]) -> StoredObservation:
    return StoredObservation(obs_from_row(row), np.asarray(row["vec"], dtype=np.float32),
                             EvolutionDecision.model_validate_json(row["decision"]) if row["decision"] else None,
                             bool(row["applied"]))


def obs_row(o: Observation, vector: np.ndarray, decision: EvolutionDecision | None, applied: bool) -> dict[str, Any]:
    return {"id": o.observation_id, "tenant_id": o.tenant_id, "user_id": o.user_id,
            "observation_id": o.observation_id, "session_id": o.session_id, "speaker": o.speaker[:128],
            "text": o.text[:4096], "event_date": o.event_date.isoformat() if o.event_date else "",
            "report_date": o.report_date.isoformat() if o.report_date else "",
            "source_ids": json.dumps(o.source_ids)[:8192], "attributed": o.attributed, "idx": o.index,
            "decision": decision.model_dump_json()[:8192] if decision else "", "applied": applied,
            "vec": np.asarray(vector, dtype=np.float32).tolist()}


def mem_from_row(row: dict[str, Any]) -> MemoryRecord:
    return MemoryRecord(
        memory_id=row["id"], tenant_id=row["tenant_id"], user_id=row["user_id"], text=row["text"],
        version=row["version"], created_at=from_ms(row["created_at"]), updated_at=from_ms(row["updated_at"]),
        last_op=EvolutionOp(row["last_op"]), source_ids=json.loads(row["source_ids"]),
        observation_ids=json.loads(row["observation_ids"]), event_date=_date(row["event_date"]),
        score=row.get("_score"))


def mem_row(record: MemoryRecord, vec: list[float], op: EvolutionOp) -> dict[str, Any]:
    return {"id": record.memory_id, "tenant_id": record.tenant_id, "user_id": record.user_id,
            "text": record.text[:8192], "version": record.version, "created_at": ms(record.created_at),
            "updated_at": ms(record.updated_at), "last_op": op.value,
            "source_ids": json.dumps(record.source_ids)[:16384],
            "observation_ids": json.dumps(record.observation_ids)[:16384],
            "event_date": record.event_date.isoformat() if record.event_date else "", "vec": vec}


def hist_row(record: MemoryRecord, vec: list[float], op: EvolutionOp, observation_id: str) -> dict[str, Any]:
    return {"id": stable_id(record.memory_id, str(record.version), prefix="h"), "tenant_id": record.tenant_id,
            "user_id": record.user_id, "memory_id": record.memory_id, "version": record.version,
            "text": record.text[:8192], "op": op.value, "observation_id": observation_id,
            "at": ms(record.updated_at), "vec": vec}


def version_from_row(r: dict[str, Any]) -> MemoryVersion:
    return MemoryVersion(memory_id=r["memory_id"], version=r["version"], text=r["text"], op=EvolutionOp(r["op"]),
                         observation_id=r["observation_id"], at=from_ms(r["at"]))
