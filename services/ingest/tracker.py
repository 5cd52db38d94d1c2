"""Per-partition bookkeeping: which sessions are open or closing, and how far it is safe to commit.

Pure Python (no Kafka, no Ray), so its rules are unit-tested directly.

A session closes on (1) its `session_end` event, (2) the first event of another session of the same
user (one partition owns each user, so partition order is the user's order), or (3) an idle timeout:
no event for it for `session_idle_timeout_s` while the partition has been read to its end (when the
consumer lags, the backlog may still hold the session's next turn, so idleness cannot be judged).

The committed offset is the smallest offset that a crash would need to replay:
min(first offset of every open or not-yet-processed session, next unhandled offset). Replaying
from there is cheap and safe: stored turns are skipped by event id, and a processed session's
`done` marker turns its re-close into a no-op, so the LLM is never asked again.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from tsubasa.schema import Event, EventKind

UserKey = tuple[str, str]
SessionKey = tuple[str, str, str]


@dataclass
class OpenSession:
    session_id: str
    first_offset: int
    last_seen: float
    """Monotonic seconds when its latest event was consumed."""


@dataclass
class Close:
    """A session to process, with the offset it pins until processed and what closed it."""

    partition: int
    tenant_id: str
    user_id: str
    session_id: str
    reason: str  # "end" | "newer" | "idle"
    pin: int
    trigger_offset: int
    """Offset of the event that closed it (-1 for an idle close)."""
    trigger_payload: bytes = b""

    @property
    def key(self) -> SessionKey:
        return (self.tenant_id, self.user_id, self.session_id)

    @property
    def user(self) -> UserKey:
        return (self.tenant_id, self.user_id)


class DoneSessions:
    """Which sessions were processed: a bounded cache in front of the store's `done` markers.

    The tracker asks once per session it has not seen open (a replayed or late event of a
    processed session must not reopen it). `prefetch` reads the markers of every session a poll
    may open in one call; a key it did not cover costs one read of its own."""

    def __init__(self, read: Callable[[list[SessionKey]], dict[SessionKey, str]], limit: int = 200_000) -> None:
        self._read = read
        """keys -> their marker state (`done`, `extracted`, ...); keys without a marker absent."""
        self.limit = limit
        self._done: dict[SessionKey, None] = {}
        self._not_done: set[SessionKey] = set()  # as read by the latest prefetch

    def prefetch(self, keys: Iterable[SessionKey]) -> None:
        want = sorted({k for k in keys if k not in self._done})
        states = self._read(want) if want else {}
        done = {k for k, state in states.items() if state == "done"}
        for k in done:
            self.remember(k)
        self._not_done = set(want) - done

    def __call__(self, key: SessionKey) -> bool:
        if key in self._done:
            return True
        if key in self._not_done:
            return False
        if self._read([key]).get(key) == "done":
            self.remember(key)
            return True
        return False

    def remember(self, key: SessionKey) -> None:
        self._done[key] = None
        if len(self._done) > self.limit:
            self._done.pop(next(iter(self._done)))


class PartitionTracker:
    """Open sessions, closing sessions and the commit point of one partition."""

    def __init__(self, partition: int, start_offset: int) -> None:
        self.partition = partition
        self.next_offset = start_offset
        """Every record below this offset was handled (appended, or dead-lettered)."""
        self.open: dict[UserKey, OpenSession] = {}
        self.closing: dict[SessionKey, int] = {}
        self.late_events = 0

    def observe(self, ev: Event, offset: int, now: float, is_done: Callable[[SessionKey], bool],
                payload: bytes = b"") -> list[Close]:
        """Account for one stored event (in partition order); return the sessions it closes.

        `is_done(key)` says whether a session was already processed: an event of such a session is
        a late duplicate (or a replay) and neither opens nor closes anything."""
        user: UserKey = (ev.tenant_id, ev.user_id)
        key: SessionKey = (ev.tenant_id, ev.user_id, ev.session_id)
        self.next_offset = max(self.next_offset, offset + 1)
        cur = self.open.get(user)
        current = cur is not None and cur.session_id == ev.session_id
        if key in self.closing or (not current and is_done(key)):
            self.late_events += int(ev.kind == EventKind.TURN)
            return []
        closes: list[Close] = []
        if cur is not None and not current:
            del self.open[user]
            closes.append(self._close(user, cur, "newer", offset, payload))
            cur = None
        if ev.kind == EventKind.SESSION_END:
            first = cur.first_offset if cur is not None else offset
            self.open.pop(user, None)
            closes.append(self._close(user, OpenSession(ev.session_id, first, now), "end", offset, payload))
        elif cur is None:
            self.open[user] = OpenSession(ev.session_id, offset, now)
        else:
            cur.last_seen = now
        return closes

    def asks_done(self, ev: Event) -> SessionKey | None:
        """The session `observe(ev)` would ask `is_done` about, if any (for `DoneSessions.prefetch`)."""
        key: SessionKey = (ev.tenant_id, ev.user_id, ev.session_id)
        cur = self.open.get((ev.tenant_id, ev.user_id))
        if key in self.closing or (cur is not None and cur.session_id == ev.session_id):
            return None
        return key

    def handled(self, offset: int) -> None:
        """A record that opens nothing (dead-lettered) was dealt with."""
        self.next_offset = max(self.next_offset, offset + 1)

    def idle(self, now: float, timeout_s: float, caught_up: bool) -> list[Close]:
        """Close sessions idle for `timeout_s`; only when the partition has been read to its end."""
        if not caught_up:
            return []
        out = []
        for user, s in list(self.open.items()):
            if now - s.last_seen >= timeout_s:
                del self.open[user]
                out.append(self._close(user, s, "idle", -1, b""))
        return out

    def _close(self, user: UserKey, s: OpenSession, reason: str, trigger: int, payload: bytes) -> Close:
        c = Close(self.partition, user[0], user[1], s.session_id, reason, s.first_offset, trigger, payload)
        self.closing[c.key] = min(self.closing.get(c.key, c.pin), c.pin)
        return c

    def finished(self, key: SessionKey) -> None:
        """The session was processed (or dead-lettered): release its pin."""
        self.closing.pop(key, None)

    def commit_offset(self) -> int:
        """The offset to commit: a crash replays from here and loses nothing."""
        pins = [s.first_offset for s in self.open.values()]
        pins.extend(self.closing.values())
        return min([*pins, self.next_offset])

    @property
    def pending(self) -> int:
        return len(self.closing)


FailureKind = Literal["unavailable", "died", "error"]
"""How a session's processing call failed: its writer was restarting (`unavailable`), died during the
call (`died`), or the call raised (`error`)."""
MAX_WAIT_S = 10.0
"""Longest pause between tries while a writer restarts."""


@dataclass
class InFlight:
    """A closed session handed to its user's writer (`ref`: the pending call), with its retries."""

    close: Close
    ref: Any
    attempts: int = 0
    actor_failures: int = 0
    waits: int = 0
    not_before: float = 0.0

    def failed(self, kind: FailureKind, now: float, backoff_s: float, max_retries: int) -> bool:
        """Account for a failed call: set `not_before` and return False to retry, or return True
        when the session is to be dead-lettered.
        - `unavailable`: the writer is restarting, an outage: waited out (the pause doubles up to
          MAX_WAIT_S), never dead-lettered (a loaded machine may take a minute to restart it);
        - `died`: retried; a session that keeps killing its writer (more than max(10, 3 x
          `max_retries`) deaths) is poison;
        - `error`: retried with a doubling pause, `max_retries` times."""
        if kind == "unavailable":
            self.waits += 1
            self.not_before = now + min(max(backoff_s, 0.05) * 2 ** min(self.waits - 1, 8), MAX_WAIT_S)
            return False
        if kind == "died":
            self.actor_failures += 1
            self.not_before = now + backoff_s
            return self.actor_failures > max(10, 3 * max_retries)
        self.attempts += 1
        self.not_before = now + backoff_s * (2 ** (self.attempts - 1))
        return self.attempts > max_retries


@dataclass
class SessionQueue:
    """Closed sessions waiting per user (FIFO), at most one per user at a writer."""

    waiting: dict[UserKey, deque[Close]] = field(default_factory=dict)
    inflight: dict[UserKey, InFlight] = field(default_factory=dict)
    retry: dict[UserKey, InFlight] = field(default_factory=dict)

    def __len__(self) -> int:
        return sum(len(q) for q in self.waiting.values()) + len(self.inflight) + len(self.retry)
