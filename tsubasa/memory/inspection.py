"""Reads for inspection (the gateway's memory inspector): a user's sessions, history, provenance.

A mixin of MilvusStore. These reads run at Strong consistency like the writer's: a person checking
what was just written expects to see it, and the inspector's rate is a person's. Its search goes
through the Retriever instead, at the serving level, so it shows what a chat request is grounded on.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from tsubasa.memory.milvus import HISTORY, MEMORIES, OBSERVATIONS, SESSIONS, TURNS, MilvusCollections, scope_filter
from tsubasa.memory.rows import (
    HIST_FIELDS,
    OBS_FIELDS,
    TURN_FIELDS,
    StoredObservation,
    from_ms,
    stored_obs_from_row,
    turn_from_row,
    turn_order,
    version_from_row,
)
from tsubasa.schema import MemoryVersion, Turn


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


class StoreInspection(MilvusCollections):
    """What the inspector reads beyond the writer's own reads."""

    def get_observations(self, tenant_id: str, user_id: str, ids: Sequence[str]) -> list[StoredObservation]:
        """The stored observations with these ids that belong to this user (others are simply absent)."""
        if not ids:
            return []
        rows = self._get(OBSERVATIONS, list(dict.fromkeys(ids)), [*OBS_FIELDS, "vec"])
        return [stored_obs_from_row(r) for r in rows if r["tenant_id"] == tenant_id and r["user_id"] == user_id]

    def turns_by_source(self, tenant_id: str, user_id: str, source_ids: Sequence[str]) -> list[Turn]:
        """A user's turns whose `source_id` is one of `source_ids` (provenance), in conversation order."""
        wanted = list(dict.fromkeys(source_ids))
        if not wanted:
            return []
        flt = scope_filter(tenant_id, user_id)
        if all(_SOURCE_ID.fullmatch(s) for s in wanted):  # safe inside a quoted filter literal
            listed = ", ".join(f'"{s}"' for s in wanted)
            turns = [turn_from_row(r) for r in self._query_all(TURNS, f"{flt} and source_id in [{listed}]",
                                                                TURN_FIELDS)]
        else:  # a source id a filter literal cannot carry: match in Python instead
            keep = set(wanted)
            turns = [t for t in map(turn_from_row, self._query_all(TURNS, flt, TURN_FIELDS)) if t.source_id in keep]
        return sorted(turns, key=turn_order)

    def user_history(self, tenant_id: str, user_id: str) -> list[MemoryVersion]:
        """Every version of every memory of one user, by memory then version."""
        rows = self._query_all(HISTORY, scope_filter(tenant_id, user_id), HIST_FIELDS)
        return sorted((version_from_row(r) for r in rows), key=lambda v: (v.memory_id, v.version))

    def sessions(self, tenant_id: str, user_id: str) -> list[SessionInfo]:
        """One user's sessions (from the turn log and the session markers), oldest first."""
        flt = scope_filter(tenant_id, user_id)
        info: dict[str, SessionInfo] = {}
        for r in self._query_all(TURNS, flt, ["session_id", "session_date", "ts"]):
            at = from_ms(r["ts"])
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
