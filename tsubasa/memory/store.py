"""Milvus storage for the raw turn log, extracted observations, memories and their history.

Every collection has `tenant_id` as its partition key and `user_id` as a scalar field; every query
carries both, built only from validated identifiers. Primary keys are deterministic so replays
upsert the same rows. `uri` may be a Milvus Lite file, a `milvus-lite server` URL or a remote Milvus.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any, Protocol

import numpy as np

from tsubasa.config import MilvusConfig
from tsubasa.memory.milvus import (
    HISTORY,
    MAX_TEXT,
    MEMORIES,
    OBSERVATIONS,
    SESSIONS,
    TURNS,
    MilvusCollections,
)
from tsubasa.schema import (
    EvolutionDecision,
    EvolutionOp,
    MemoryRecord,
    MemoryVersion,
    Observation,
    Turn,
    stable_id,
    validate_identifier,
)

log = logging.getLogger(__name__)


def _ms(dt: datetime) -> int:
    return int(dt.timestamp() * 1000)


def _from_ms(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def _date(s: str) -> date | None:
    return date.fromisoformat(s) if s else None


def scope_filter(tenant_id: str, user_id: str | None = None, **equals: str) -> str:
    """Filter expression for one tenant (and user, and other string fields); identifiers are
    validated first, so nothing a caller passes can change the expression's structure."""
    parts = [f'tenant_id == "{validate_identifier(tenant_id, "tenant_id")}"']
    if user_id is not None:
        parts.append(f'user_id == "{validate_identifier(user_id, "user_id")}"')
    for field, value in equals.items():
        parts.append(f'{field} == "{validate_identifier(value, field)}"')
    return " and ".join(parts)


@dataclass
class StoredObservation:
    observation: Observation
    vector: np.ndarray
    decision: EvolutionDecision | None
    applied: bool


@dataclass
class SessionInfo:
    session_id: str
    session_date: str
    turns: int
    first_at: datetime
    last_at: datetime
    state: str = "open"  # "open" (no marker yet) | "extracted" | "done"
    observations: int = 0


_SOURCE_ID = re.compile(r"^[A-Za-z0-9_.@:/+-]{1,128}$")
"""Source ids that can be put inside a quoted filter literal as they are (no quotes or backslashes)."""


@dataclass
class SessionState:
    state: str  # "extracted" | "done"
    n_observations: int
    updated_at: datetime


class MemoryStore(Protocol):
    """What the writing and reading paths need from storage (implemented by MilvusStore)."""

    def upsert_turns(self, turns: Sequence[Turn], vectors: np.ndarray) -> int: ...
    def existing_turn_ids(self, turns: Sequence[Turn]) -> set[str]: ...
    def session_turns(self, tenant_id: str, user_id: str, session_id: str) -> list[Turn]: ...
    def search_turns(self, tenant_id: str, user_id: str, vector: np.ndarray, k: int,
                     text: str | None = None) -> list[tuple[Turn, float]]: ...
    def open_sessions(self, tenant_id: str, user_id: str) -> list[str]: ...
    def session_state(self, tenant_id: str, user_id: str, session_id: str) -> SessionState | None: ...
    def set_session_state(self, tenant_id: str, user_id: str, session_id: str, state: str, n: int) -> None: ...
    def upsert_observations(self, obs: Sequence[Observation], vectors: np.ndarray) -> None: ...
    def session_observations(self, tenant_id: str, user_id: str, session_id: str) -> list[StoredObservation]: ...
    def record_decision(self, obs: Observation, vector: np.ndarray, decision: EvolutionDecision,
                        applied: bool) -> None: ...
    def search_observations(self, tenant_id: str, user_id: str, vector: np.ndarray, k: int,
                            text: str | None = None) -> list[tuple[Observation, float]]: ...
    def search_memories(self, tenant_id: str, user_id: str, vector: np.ndarray, k: int,
                        text: str | None = None) -> list[MemoryRecord]: ...
    def get_memory(self, tenant_id: str, user_id: str, memory_id: str) -> tuple[MemoryRecord, np.ndarray] | None: ...
    def write_memory(self, record: MemoryRecord, vector: np.ndarray, op: EvolutionOp, observation_id: str) -> None: ...
    def memory_history(self, tenant_id: str, user_id: str, memory_id: str) -> list[MemoryVersion]: ...
    def history_for_observation(self, tenant_id: str, user_id: str, observation_id: str) -> MemoryVersion | None: ...
    def list_memories(self, tenant_id: str, user_id: str) -> list[MemoryRecord]: ...
    def list_observations(self, tenant_id: str, user_id: str) -> list[Observation]: ...
    def list_turns(self, tenant_id: str, user_id: str) -> list[Turn]: ...
    def counts(self, tenant_id: str | None = None) -> dict[tuple[str, str], dict[str, int]]: ...
    def forget_user(self, tenant_id: str, user_id: str) -> dict[str, int]: ...


class MilvusStore(MilvusCollections):
    """MemoryStore on Milvus (Lite file, lite server or a cluster)."""

    # ---- turns --------------------------------------------------------------------------------
    _TURN_FIELDS = ["tenant_id", "user_id", "event_id", "session_id", "speaker", "text", "source_id",
                    "session_date", "ts", "seq"]

    @staticmethod
    def _turn(row: dict[str, Any]) -> Turn:
        return Turn(event_id=row["event_id"], tenant_id=row["tenant_id"], user_id=row["user_id"],
                    session_id=row["session_id"], speaker=row["speaker"], text=row["text"],
                    source_id=row["source_id"], session_date=row["session_date"],
                    timestamp=_from_ms(row["ts"]), seq=row["seq"])

    def existing_turn_ids(self, turns: Sequence[Turn]) -> set[str]:
        if not turns:
            return set()
        rows = self.client.get(self.names[TURNS], ids=[t.pk for t in turns], output_fields=["id"])
        return {r["id"] for r in rows}

    def upsert_turns(self, turns: Sequence[Turn], vectors: np.ndarray) -> int:
        """Store turns (idempotent by event id); return how many were not stored before."""
        if not turns:
            return 0
        new = len(turns) - len(self.existing_turn_ids(turns))
        rows = [{"id": t.pk, "tenant_id": t.tenant_id, "user_id": t.user_id, "event_id": t.event_id,
                 "session_id": t.session_id, "speaker": t.speaker[:128], "text": t.text[:MAX_TEXT],
                 "source_id": t.source_id[:128], "session_date": t.session_date[:64], "ts": _ms(t.timestamp),
                 "seq": t.seq, "vec": v.tolist()} for t, v in zip(turns, vectors, strict=True)]
        self.client.upsert(self.names[TURNS], rows)
        return new

    def session_turns(self, tenant_id: str, user_id: str, session_id: str) -> list[Turn]:
        rows = self._query_all(TURNS, scope_filter(tenant_id, user_id, session_id=session_id), self._TURN_FIELDS)
        # timestamps order a session; seq breaks ties (events may arrive in several batches)
        return sorted((self._turn(r) for r in rows), key=lambda t: (t.timestamp, t.seq, t.event_id))

    def list_turns(self, tenant_id: str, user_id: str) -> list[Turn]:
        rows = self._query_all(TURNS, scope_filter(tenant_id, user_id), self._TURN_FIELDS)
        return sorted((self._turn(r) for r in rows), key=lambda t: (t.timestamp, t.seq, t.event_id))

    def search_turns(self, tenant_id: str, user_id: str, vector: np.ndarray, k: int,
                     text: str | None = None) -> list[tuple[Turn, float]]:
        """Top-k turns of one user; with `text`, hybrid (dense + BM25) where the collection has BM25."""
        hits = self._search(TURNS, vector, scope_filter(tenant_id, user_id), k, self._TURN_FIELDS, text)
        return [(self._turn(h), h["_score"]) for h in hits]

    def open_sessions(self, tenant_id: str, user_id: str) -> list[str]:
        """Sessions with turns but no `done` marker, oldest first."""
        rows = self._query_all(TURNS, scope_filter(tenant_id, user_id), ["session_id", "ts"])
        first: dict[str, int] = {}
        for r in rows:
            first[r["session_id"]] = min(first.get(r["session_id"], r["ts"]), r["ts"])
        done = {r["session_id"] for r in self._query_all(
            SESSIONS, scope_filter(tenant_id, user_id) + ' and state == "done"', ["session_id"])}
        return [s for s in sorted(first, key=lambda s: (first[s], s)) if s not in done]

    # ---- session markers ----------------------------------------------------------------------
    def session_state(self, tenant_id: str, user_id: str, session_id: str) -> SessionState | None:
        pk = stable_id(tenant_id, user_id, session_id, prefix="s")
        rows = self.client.get(self.names[SESSIONS], ids=[pk], output_fields=["state", "n", "updated_at"])
        if not rows:
            return None
        r = rows[0]
        return SessionState(state=r["state"], n_observations=r["n"], updated_at=_from_ms(r["updated_at"]))

    def set_session_state(self, tenant_id: str, user_id: str, session_id: str, state: str, n: int) -> None:
        pk = stable_id(tenant_id, user_id, session_id, prefix="s")
        self.client.upsert(self.names[SESSIONS], [{
            "id": pk, "tenant_id": validate_identifier(tenant_id, "tenant_id"),
            "user_id": validate_identifier(user_id, "user_id"), "session_id": session_id, "state": state,
            "n": n, "updated_at": _ms(datetime.now(UTC)), "vec": [1.0, 0.0]}])

    # ---- observations -------------------------------------------------------------------------
    _OBS_FIELDS = ["tenant_id", "user_id", "observation_id", "session_id", "speaker", "text", "event_date",
                   "report_date", "source_ids", "attributed", "idx", "decision", "applied"]

    @staticmethod
    def _obs(row: dict[str, Any]) -> Observation:
        return Observation(
            observation_id=row["observation_id"], tenant_id=row["tenant_id"], user_id=row["user_id"],
            session_id=row["session_id"], speaker=row["speaker"], text=row["text"],
            event_date=_date(row["event_date"]), report_date=_date(row["report_date"]),
            source_ids=json.loads(row["source_ids"]), attributed=row["attributed"], index=row["idx"])

    def _obs_row(self, o: Observation, vector: np.ndarray, decision: EvolutionDecision | None,
                 applied: bool) -> dict[str, Any]:
        return {"id": o.observation_id, "tenant_id": o.tenant_id, "user_id": o.user_id,
                "observation_id": o.observation_id, "session_id": o.session_id, "speaker": o.speaker[:128],
                "text": o.text[:4096], "event_date": o.event_date.isoformat() if o.event_date else "",
                "report_date": o.report_date.isoformat() if o.report_date else "",
                "source_ids": json.dumps(o.source_ids)[:8192], "attributed": o.attributed, "idx": o.index,
                "decision": decision.model_dump_json()[:8192] if decision else "", "applied": applied,
                "vec": np.asarray(vector, dtype=np.float32).tolist()}

    def upsert_observations(self, obs: Sequence[Observation], vectors: np.ndarray) -> None:
        if obs:
            self.client.upsert(self.names[OBSERVATIONS],
                               [self._obs_row(o, v, None, False) for o, v in zip(obs, vectors, strict=True)])

    def record_decision(self, obs: Observation, vector: np.ndarray, decision: EvolutionDecision,
                        applied: bool) -> None:
        self.client.upsert(self.names[OBSERVATIONS], [self._obs_row(obs, vector, decision, applied)])

    def session_observations(self, tenant_id: str, user_id: str, session_id: str) -> list[StoredObservation]:
        rows = self._query_all(OBSERVATIONS, scope_filter(tenant_id, user_id, session_id=session_id),
                               [*self._OBS_FIELDS, "vec"])
        out = [StoredObservation(self._obs(r), np.asarray(r["vec"], dtype=np.float32),
                                 EvolutionDecision.model_validate_json(r["decision"]) if r["decision"] else None,
                                 bool(r["applied"])) for r in rows]
        return sorted(out, key=lambda s: s.observation.index)

    def observation_vectors(self, tenant_id: str, user_id: str, ids: Sequence[str]) -> dict[str, np.ndarray]:
        if not ids:
            return {}
        rows = self.client.get(self.names[OBSERVATIONS], ids=list(ids), output_fields=["tenant_id", "user_id", "vec"])
        return {r["id"]: np.asarray(r["vec"], dtype=np.float32) for r in rows
                if r["tenant_id"] == tenant_id and r["user_id"] == user_id}

    def list_observations(self, tenant_id: str, user_id: str) -> list[Observation]:
        rows = self._query_all(OBSERVATIONS, scope_filter(tenant_id, user_id), self._OBS_FIELDS)
        return sorted((self._obs(r) for r in rows), key=lambda o: (o.report_date or date.min, o.session_id, o.index))

    def search_observations(self, tenant_id: str, user_id: str, vector: np.ndarray, k: int,
                            text: str | None = None) -> list[tuple[Observation, float]]:
        hits = self._search(OBSERVATIONS, vector, scope_filter(tenant_id, user_id), k, self._OBS_FIELDS, text)
        return [(self._obs(h), h["_score"]) for h in hits]

    # ---- memories -----------------------------------------------------------------------------
    _MEM_FIELDS = ["tenant_id", "user_id", "text", "version", "created_at", "updated_at", "last_op",
                   "source_ids", "observation_ids", "event_date"]

    @staticmethod
    def _mem(row: dict[str, Any]) -> MemoryRecord:
        return MemoryRecord(
            memory_id=row["id"], tenant_id=row["tenant_id"], user_id=row["user_id"], text=row["text"],
            version=row["version"], created_at=_from_ms(row["created_at"]), updated_at=_from_ms(row["updated_at"]),
            last_op=EvolutionOp(row["last_op"]), source_ids=json.loads(row["source_ids"]),
            observation_ids=json.loads(row["observation_ids"]), event_date=_date(row["event_date"]),
            score=row.get("_score"))

    def search_memories(self, tenant_id: str, user_id: str, vector: np.ndarray, k: int,
                        text: str | None = None) -> list[MemoryRecord]:
        """Top-k current memories; dense cosine scores (evolution thresholds read them), or with
        `text` hybrid RRF scores where the collection has BM25."""
        hits = self._search(MEMORIES, vector, scope_filter(tenant_id, user_id), k, ["id", *self._MEM_FIELDS], text)
        return [self._mem(h) for h in hits]

    def get_memory(self, tenant_id: str, user_id: str, memory_id: str) -> tuple[MemoryRecord, np.ndarray] | None:
        validate_identifier(memory_id, "memory_id")
        rows = self.client.get(self.names[MEMORIES], ids=[memory_id], output_fields=["id", *self._MEM_FIELDS, "vec"])
        if not rows or rows[0]["tenant_id"] != tenant_id or rows[0]["user_id"] != user_id:
            return None  # another tenant's or user's memory is simply not there
        return self._mem(rows[0]), np.asarray(rows[0]["vec"], dtype=np.float32)

    def list_memories(self, tenant_id: str, user_id: str) -> list[MemoryRecord]:
        rows = self._query_all(MEMORIES, scope_filter(tenant_id, user_id), ["id", *self._MEM_FIELDS])
        return sorted((self._mem(r) for r in rows), key=lambda m: (m.created_at, m.memory_id))

    def write_memory(self, record: MemoryRecord, vector: np.ndarray, op: EvolutionOp, observation_id: str) -> None:
        """Append the version to history first, then upsert the current row: a crash in between
        is repaired on replay from the history (the history is the source of truth)."""
        vec = np.asarray(vector, dtype=np.float32).tolist()
        self.client.upsert(self.names[HISTORY], [{
            "id": stable_id(record.memory_id, str(record.version), prefix="h"), "tenant_id": record.tenant_id,
            "user_id": record.user_id, "memory_id": record.memory_id, "version": record.version,
            "text": record.text[:8192], "op": op.value, "observation_id": observation_id,
            "at": _ms(record.updated_at), "vec": vec}])
        self.client.upsert(self.names[MEMORIES], [{
            "id": record.memory_id, "tenant_id": record.tenant_id, "user_id": record.user_id,
            "text": record.text[:8192], "version": record.version, "created_at": _ms(record.created_at),
            "updated_at": _ms(record.updated_at), "last_op": op.value,
            "source_ids": json.dumps(record.source_ids)[:16384],
            "observation_ids": json.dumps(record.observation_ids)[:16384],
            "event_date": record.event_date.isoformat() if record.event_date else "", "vec": vec}])

    _HIST_FIELDS = ["memory_id", "version", "text", "op", "observation_id", "at"]

    @staticmethod
    def _version(r: dict[str, Any]) -> MemoryVersion:
        return MemoryVersion(memory_id=r["memory_id"], version=r["version"], text=r["text"], op=EvolutionOp(r["op"]),
                             observation_id=r["observation_id"], at=_from_ms(r["at"]))

    def memory_history(self, tenant_id: str, user_id: str, memory_id: str) -> list[MemoryVersion]:
        rows = self._query_all(HISTORY, scope_filter(tenant_id, user_id, memory_id=memory_id), self._HIST_FIELDS)
        return sorted((self._version(r) for r in rows), key=lambda v: v.version)

    def history_for_observation(self, tenant_id: str, user_id: str, observation_id: str) -> MemoryVersion | None:
        rows = self._query_all(HISTORY, scope_filter(tenant_id, user_id, observation_id=observation_id),
                               self._HIST_FIELDS)
        return self._version(rows[0]) if rows else None

    # ---- admin --------------------------------------------------------------------------------
    def counts(self, tenant_id: str | None = None) -> dict[tuple[str, str], dict[str, int]]:
        """Rows per (tenant, user) in each collection."""
        flt = scope_filter(tenant_id) if tenant_id else 'tenant_id != ""'
        out: dict[tuple[str, str], dict[str, int]] = {}
        for key in (TURNS, OBSERVATIONS, MEMORIES, HISTORY):
            c = Counter((r["tenant_id"], r["user_id"]) for r in self._query_all(key, flt, ["tenant_id", "user_id"]))
            for tu, n in c.items():
                out.setdefault(tu, {k: 0 for k in (TURNS, OBSERVATIONS, MEMORIES, HISTORY)})[key] = n
        return out

    def forget_user(self, tenant_id: str, user_id: str) -> dict[str, int]:
        """Delete everything stored for one user (turns, observations, memories, history, markers)."""
        flt = scope_filter(tenant_id, user_id)
        deleted = {}
        for key, name in self.names.items():
            n = len(self._query_all(key, flt, ["id"]))
            if n:
                self.client.delete(name, filter=flt)
            deleted[key] = n
        return deleted

    # ---- reading for inspection (the gateway's memory inspector) -------------------------------
    def get_observations(self, tenant_id: str, user_id: str, ids: Sequence[str]) -> list[StoredObservation]:
        """The stored observations with these ids that belong to this user (others are simply absent)."""
        if not ids:
            return []
        rows = self.client.get(self.names[OBSERVATIONS], ids=list(dict.fromkeys(ids)),
                               output_fields=[*self._OBS_FIELDS, "vec"])
        return [StoredObservation(self._obs(r), np.asarray(r["vec"], dtype=np.float32),
                                  EvolutionDecision.model_validate_json(r["decision"]) if r["decision"] else None,
                                  bool(r["applied"])) for r in rows
                if r["tenant_id"] == tenant_id and r["user_id"] == user_id]

    def turns_by_source(self, tenant_id: str, user_id: str, source_ids: Sequence[str]) -> list[Turn]:
        """A user's turns whose `source_id` is one of `source_ids` (provenance), in conversation order."""
        wanted = list(dict.fromkeys(source_ids))
        if not wanted:
            return []
        if all(_SOURCE_ID.fullmatch(s) for s in wanted):  # safe inside a quoted filter literal
            listed = ", ".join(f'"{s}"' for s in wanted)
            rows = self._query_all(TURNS, f"{scope_filter(tenant_id, user_id)} and source_id in [{listed}]",
                                   self._TURN_FIELDS)
            turns = [self._turn(r) for r in rows]
        else:  # a source id a filter literal cannot carry: match in Python instead
            turns = [t for t in self.list_turns(tenant_id, user_id) if t.source_id in set(wanted)]
        return sorted(turns, key=lambda t: (t.timestamp, t.seq, t.event_id))

    def user_history(self, tenant_id: str, user_id: str) -> list[MemoryVersion]:
        """Every version of every memory of one user, by memory then version."""
        rows = self._query_all(HISTORY, scope_filter(tenant_id, user_id), self._HIST_FIELDS)
        return sorted((self._version(r) for r in rows), key=lambda v: (v.memory_id, v.version))

    def sessions(self, tenant_id: str, user_id: str) -> list[SessionInfo]:
        """One user's sessions (from the turn log and the session markers), oldest first."""
        flt = scope_filter(tenant_id, user_id)
        info: dict[str, SessionInfo] = {}
        for r in self._query_all(TURNS, flt, ["session_id", "session_date", "ts"]):
            at = _from_ms(r["ts"])
            s = info.setdefault(r["session_id"], SessionInfo(r["session_id"], r["session_date"], 0, at, at))
            s.turns += 1
            s.first_at, s.last_at = min(s.first_at, at), max(s.last_at, at)
        for r in self._query_all(SESSIONS, flt, ["session_id", "state", "n"]):
            if r["session_id"] in info:
                info[r["session_id"]].state, info[r["session_id"]].observations = r["state"], r["n"]
        return sorted(info.values(), key=lambda s: (s.first_at, s.session_id))

    def users(self, tenant_id: str) -> list[str]:
        rows = self._query_all(TURNS, scope_filter(tenant_id), ["user_id"])
        rows += self._query_all(MEMORIES, scope_filter(tenant_id), ["user_id"])
        return sorted({r["user_id"] for r in rows})



def open_store(cfg: MilvusConfig, uri: str) -> MilvusStore:
    return MilvusStore(cfg, uri=uri)


def iter_batches(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]
