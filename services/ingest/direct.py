"""The write path without Kafka or Ray: what the gateway's `/v1/events` (and scripts) call.

    from services.ingest.direct import accept_events
    result = accept_events(system.writer, request_items)          # validate, append, process
    if result.rejected: -> HTTP 422 with [(index, reason), ...]   # nothing was written

Same rules as the Kafka path: turns are stored idempotently by event id; a session is processed
when it closes (its `session_end` event, or a newer session of the same user) through the same
`MemoryWriter`, whose `done` marker makes a replay a no-op. Idle closes need a clock: the Kafka
consumer has one; without it call `close_idle_sessions` (e.g. from a periodic job).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tsubasa.memory.writer import MemoryWriter, SessionResult
from tsubasa.schema import Event, EventKind, InvalidEventError, parse_event


@dataclass
class Rejected:
    index: int
    reason: str
    """Names the field: `user_id: identifier 'a b' is not a valid identifier ...`."""


@dataclass
class DirectIngestResult:
    received: int = 0
    accepted: int = 0
    new_turns: int = 0
    rejected: list[Rejected] = field(default_factory=list)
    closed_sessions: list[tuple[str, str, str]] = field(default_factory=list)
    sessions: list[SessionResult] = field(default_factory=list)


def validate_events(items: Sequence[Event | bytes | str | Mapping[str, Any]]) -> tuple[list[Event], list[Rejected]]:
    """Parse every item; return the valid events and a reason for each invalid one."""
    events: list[Event] = []
    rejected: list[Rejected] = []
    for i, item in enumerate(items):
        try:
            events.append(item if isinstance(item, Event) else parse_event(item if not isinstance(item, Mapping)
                                                                             else dict(item)))
        except InvalidEventError as exc:
            rejected.append(Rejected(i, str(exc)))
    return events, rejected


def sessions_closed_by(writer: MemoryWriter, events: Sequence[Event]) -> list[tuple[str, str, str]]:
    """Sessions that `events` close, per user in order: every unprocessed session older than the
    user's newest one in `events`, and the newest too if it was ended explicitly."""
    latest: dict[tuple[str, str], str] = {}
    ended: set[tuple[str, str, str]] = set()
    for ev in events:
        latest[(ev.tenant_id, ev.user_id)] = ev.session_id
        if ev.kind == EventKind.SESSION_END:
            ended.add((ev.tenant_id, ev.user_id, ev.session_id))
    out: list[tuple[str, str, str]] = []
    for (tenant, user), newest in latest.items():
        for s in writer.store.open_sessions(tenant, user):
            if s != newest or (tenant, user, s) in ended:
                out.append((tenant, user, s))
        if (tenant, user, newest) in ended and (tenant, user, newest) not in out:
            out.append((tenant, user, newest))  # ended without turns stored: nothing to extract, marks it done
    return out


def accept_events(writer: MemoryWriter, items: Sequence[Event | bytes | str | Mapping[str, Any]], *,
                  process_sessions: bool = True, partial: bool = False) -> DirectIngestResult:
    """Validate, store and (optionally) process the sessions the events close.

    With `partial=False` (the default) one invalid item rejects the whole request and nothing is
    written; with `partial=True` the valid items are written and the invalid ones reported. With
    `process_sessions=False` the closed sessions are only listed (run `process_closed` later, e.g.
    in a background task: extraction calls the LLM and takes seconds)."""
    events, rejected = validate_events(items)
    res = DirectIngestResult(received=len(items), rejected=rejected)
    if rejected and not partial:
        return res
    # Without a Kafka offset, order turns by time: MemoryWriter would number them by request position.
    appended = writer.append([e if "seq" in e.metadata else
                              e.model_copy(update={"metadata": {**e.metadata, "seq": 0}}) for e in events])
    res.accepted, res.new_turns = len(events), appended.new_turns
    res.closed_sessions = sessions_closed_by(writer, events)
    if process_sessions:
        res.sessions = process_closed(writer, res.closed_sessions)
    return res


def process_closed(writer: MemoryWriter, closed: Sequence[tuple[str, str, str]]) -> list[SessionResult]:
    """Process closed sessions in the given order (idempotent: done sessions are skipped)."""
    return [writer.process_session(*key) for key in closed]


def close_idle_sessions(writer: MemoryWriter, tenant_id: str, user_id: str) -> list[SessionResult]:
    """Process every open session of a user, the newest included (for a periodic idle sweep)."""
    return writer.process_open_sessions(tenant_id, user_id, keep_latest_open=False)
