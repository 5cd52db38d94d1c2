"""Milvus storage for the raw turn log, extracted observations, memories and their history.

Every collection has `tenant_id` as its partition key and `user_id` as a scalar field; every query
carries both, built only from validated identifiers. Primary keys are deterministic so replays
upsert the same rows. `uri` may be a Milvus Lite file, a `milvus-lite server` URL or a remote Milvus.

Every read names its consistency (docs/memory.md): what the writer reads back (markers, a session's
turns and observations, candidate memories, history, ids already stored) is Strong; searches that
ground answers pass `stale_ok=True` and run at `milvus.search_consistency` (Bounded by default).
The raw turn log (stored unembedded unless `memory.embed_turns_on_ingest`, vectors filled on demand)
is the TurnLog mixin (turnlog.py).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any, Protocol

import numpy as np

from tsubasa.config import MilvusConfig
from tsubasa.memory.inspection import SessionInfo, StoreInspection
from tsubasa.memory.milvus import (
    HISTORY,
    MEMORIES,
    OBSERVATIONS,
    SESSIONS,
    TURNS,
    scope_filter,
)
from tsubasa.memory.rows import (
    HIST_FIELDS,
    MEM_FIELDS,
    OBS_FIELDS,
    StoredObservation,
    from_ms,
    hist_row,
    mem_from_row,
    mem_row,
    ms,
    obs_from_row,
    obs_row,
    stored_obs_from_row,
    version_from_row,
)
from tsubasa.memory.turnlog import EmbedFn, TurnLog
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

__all__ = ["MemoryStore", "MilvusStore", "SessionInfo", "SessionState", "StoredObservation", "open_store",
           "scope_filter"]

log = logging.getLogger(__name__)



@dataclass
class SessionState:
    state: str  # "extracted" | "done"
    n_observations: int
    updated_at: datetime


class MemoryStore(Protocol):
    """What the writing and reading paths need from storage (implemented by MilvusStore).

    Reads see every write before them unless `stale_ok` (then they may lag a few seconds)."""

    turn_flags: bool
    """Whether turns may be stored unembedded (else `upsert_turns` needs vectors or `embed`)."""

    def upsert_turns(self, turns: Sequence[Turn], vectors: np.ndarray | None = None,
                     embed: EmbedFn | None = None) -> int: ...
    def embed_missing_turns(self, tenant_id: str, user_id: str, embed: EmbedFn) -> int: ...
    def existing_turn_ids(self, turns: Sequence[Turn]) -> set[str]: ...
    def session_turns(self, tenant_id: str, user_id: str, session_id: str) -> list[Turn]: ...
    def search_turns(self, tenant_id: str, user_id: str, vector: np.ndarray, k: int,
                     text: str | None = None, stale_ok: bool = False) -> list[tuple[Turn, float]]: ...
    def open_sessions(self, tenant_id: str, user_id: str) -> list[str]: ...
    def session_state(self, tenant_id: str, user_id: str, session_id: str) -> SessionState | None: ...
    def session_states(self, keys: Sequence[tuple[str, str, str]]) -> dict[tuple[str, str, str], SessionState]: ...
    def set_session_state(self, tenant_id: str, user_id: str, session_id: str, state: str, n: int) -> None: ...
    def upsert_observations(self, obs: Sequence[Observation], vectors: np.ndarray) -> None: ...
    def session_observations(self, tenant_id: str, user_id: str, session_id: str) -> list[StoredObservation]: ...
    def record_decision(self, obs: Observation, vector: np.ndarray, decision: EvolutionDecision,
                        applied: bool) -> None: ...
    def search_observations(self, tenant_id: str, user_id: str, vector: np.ndarray, k: int,
                            text: str | None = None, stale_ok: bool = False) -> list[tuple[Observation, float]]: ...
    def search_memories(self, tenant_id: str, user_id: str, vector: np.ndarray, k: int,
                        text: str | None = None, stale_ok: bool = False) -> list[MemoryRecord]: ...
    def get_memory(self, tenant_id: str, user_id: str, memory_id: str) -> tuple[MemoryRecord, np.ndarray] | None: ...
    def write_memory(self, record: MemoryRecord, vector: np.ndarray, op: EvolutionOp, observation_id: str) -> None: ...
    def memory_history(self, tenant_id: str, user_id: str, memory_id: str) -> list[MemoryVersion]: ...
    def history_for_observation(self, tenant_id: str, user_id: str, observation_id: str) -> MemoryVersion | None: ...
    def list_memories(self, tenant_id: str, user_id: str) -> list[MemoryRecord]: ...
    def list_observations(self, tenant_id: str, user_id: str) -> list[Observation]: ...
    def list_turns(self, tenant_id: str, user_id: str) -> list[Turn]: ...
    def counts(self, tenant_id: str | None = None) -> dict[tuple[str, str], dict[str, int]]: ...
    def forget_user(self, tenant_id: str, user_id: str) -> dict[str, int]: ...


class MilvusStore(TurnLog, StoreInspection):
    """MemoryStore on Milvus (Lite file, lite server or a cluster)."""

    # ---- turns: the log itself is TurnLog (turnlog.py) ---------------------------------------
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
        return self.session_states([(tenant_id, user_id, session_id)]).get((tenant_id, user_id, session_id))

    def session_states(self, keys: Sequence[tuple[str, str, str]]) -> dict[tuple[str, str, str], SessionState]:
        """The markers of many sessions, (tenant, user, session) -> state, in one read; sessions
        without a marker are absent."""
        by_pk = {stable_id(*k, prefix="s"): k for k in keys}
        if not by_pk:
            return {}
        rows = self._get(SESSIONS, list(by_pk), ["id", "state", "n", "updated_at"])
        return {by_pk[r["id"]]: SessionState(state=r["state"], n_observations=r["n"],
                                             updated_at=from_ms(r["updated_at"])) for r in rows}

    def set_session_state(self, tenant_id: str, user_id: str, session_id: str, state: str, n: int) -> None:
        pk = stable_id(tenant_id, user_id, session_id, prefix="s")
        self.client.upsert(self.names[SESSIONS], [{
            "id": pk, "tenant_id": validate_identifier(tenant_id, "tenant_id"),
            "user_id": validate_identifier(user_id, "user_id"), "session_id": session_id, "state": state,
            "n": n, "updated_at": ms(datetime.now(UTC)), "vec": [1.0, 0.0]}])

    # ---- observations -------------------------------------------------------------------------
    def upsert_observations(self, obs: Sequence[Observation], vectors: np.ndarray) -> None:
        if obs:
            self.client.upsert(self.names[OBSERVATIONS],
                               [obs_row(o, v, None, False) for o, v in zip(obs, vectors, strict=True)])

    def record_decision(self, obs: Observation, vector: np.ndarray, decision: EvolutionDecision,
                        applied: bool) -> None:
        self.client.upsert(self.names[OBSERVATIONS], [obs_row(obs, vector, decision, applied)])

    def session_observations(self, tenant_id: str, user_id: str, session_id: str) -> list[StoredObservation]:
        rows = self._query_all(OBSERVATIONS, scope_filter(tenant_id, user_id, session_id=session_id),
                               [*OBS_FIELDS, "vec"])
        return sorted(map(stored_obs_from_row, rows), key=lambda s: s.observation.index)

    def observation_vectors(self, tenant_id: str, user_id: str, ids: Sequence[str]) -> dict[str, np.ndarray]:
        if not ids:
            return {}
        rows = self._get(OBSERVATIONS, list(ids), ["tenant_id", "user_id", "vec"])
        return {r["id"]: np.asarray(r["vec"], dtype=np.float32) for r in rows
                if r["tenant_id"] == tenant_id and r["user_id"] == user_id}

    def list_observations(self, tenant_id: str, user_id: str) -> list[Observation]:
        rows = self._query_all(OBSERVATIONS, scope_filter(tenant_id, user_id), OBS_FIELDS)
        return sorted(map(obs_from_row, rows), key=lambda o: (o.report_date or date.min, o.session_id, o.index))

    def search_observations(self, tenant_id: str, user_id: str, vector: np.ndarray, k: int,
                            text: str | None = None, stale_ok: bool = False) -> list[tuple[Observation, float]]:
        hits = self._search(OBSERVATIONS, vector, scope_filter(tenant_id, user_id), k, OBS_FIELDS, text,
                            self._level(stale_ok))
        return [(obs_from_row(h), h["_score"]) for h in hits]

    # ---- memories -----------------------------------------------------------------------------
    def search_memories(self, tenant_id: str, user_id: str, vector: np.ndarray, k: int,
                        text: str | None = None, stale_ok: bool = False) -> list[MemoryRecord]:
        """Top-k current memories; dense cosine scores (evolution thresholds read them), or with
        `text` hybrid RRF scores where the collection has BM25."""
        hits = self._search(MEMORIES, vector, scope_filter(tenant_id, user_id), k, ["id", *MEM_FIELDS], text,
                            self._level(stale_ok))
        return [mem_from_row(h) for h in hits]

    def get_memory(self, tenant_id: str, user_id: str, memory_id: str) -> tuple[MemoryRecord, np.ndarray] | None:
        validate_identifier(memory_id, "memory_id")
        rows = self._get(MEMORIES, [memory_id], ["id", *MEM_FIELDS, "vec"])
        if not rows or rows[0]["tenant_id"] != tenant_id or rows[0]["user_id"] != user_id:
            return None  # another tenant's or user's memory is simply not there
        return mem_from_row(rows[0]), np.asarray(rows[0]["vec"], dtype=np.float32)

    def list_memories(self, tenant_id: str, user_id: str) -> list[MemoryRecord]:
        rows = self._query_all(MEMORIES, scope_filter(tenant_id, user_id), ["id", *MEM_FIELDS])
        return sorted(map(mem_from_row, rows), key=lambda m: (m.created_at, m.memory_id))

    def write_memory(self, record: MemoryRecord, vector: np.ndarray, op: EvolutionOp, observation_id: str) -> None:
        """Append the version to history first, then upsert the current row: a crash in between
        is repaired on replay from the history (the history is the source of truth)."""
        vec = np.asarray(vector, dtype=np.float32).tolist()
        self.client.upsert(self.names[HISTORY], [hist_row(record, vec, op, observation_id)])
        self.client.upsert(self.names[MEMORIES], [mem_row(record, vec, op)])

    def memory_history(self, tenant_id: str, user_id: str, memory_id: str) -> list[MemoryVersion]:
        rows = self._query_all(HISTORY, scope_filter(tenant_id, user_id, memory_id=memory_id), HIST_FIELDS)
        return sorted(map(version_from_row, rows), key=lambda v: v.version)

    def history_for_observation(self, tenant_id: str, user_id: str, observation_id: str) -> MemoryVersion | None:
        rows = self._query_all(HISTORY, scope_filter(tenant_id, user_id, observation_id=observation_id), HIST_FIELDS)
        return version_from_row(rows[0]) if rows else None

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


def open_store(cfg: MilvusConfig, uri: str) -> MilvusStore:
    return MilvusStore(cfg, uri=uri)


def iter_batches(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]
