"""Synthetic event streams for the ingest tests and benchmark, and a scripted LLM that logs calls.

The scripted engine stands in for the model only: the real extractor, parser and memory manager
run on its replies. Every call is appended (one line, O_APPEND) to a log shared by all processes,
so a test can count extraction calls per session across actor crashes.
"""

from __future__ import annotations

import functools
import json
import os
import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from scripted import ScriptedEngine

from tsubasa.memory import prompts
from tsubasa.schema import Event, EventKind

VERBS = ["repaired", "painted", "cooked", "planted", "photographed", "sold", "borrowed", "built", "cleaned",
         "sketched"]
NOUNS = ["bicycle", "garden", "kitchen", "canoe", "guitar", "bookshelf", "telescope", "aquarium", "kayak",
         "greenhouse", "piano", "treehouse"]
CITIES = ["Lisbon", "Osaka", "Nairobi", "Quito", "Tromso", "Hanoi", "Cusco", "Tbilisi", "Perth", "Bergen",
          "Accra", "Oaxaca", "Reykjavik", "Tallinn", "Hobart", "Valparaiso", "Zanzibar", "Kyoto", "Lviv", "Porto"]
HOBBIES = ["pottery", "rock climbing", "chess", "salsa dancing", "beekeeping", "sailing", "origami", "fencing",
           "birdwatching", "calligraphy", "archery", "glassblowing", "surfing", "knitting", "astronomy"]
_ID = re.compile(r"\b([A-Za-z0-9_.@-]+) (s\d+) turn \d+:")


def speaker_name(user: str) -> str:
    return "Ann" + user[-2:]


def facts_for(user: str, sid: str) -> tuple[str, str]:
    """The two facts the scripted writer extracts from a session; its first turn states them, so the
    writer's guards (support, speaker) accept them as they would a faithful model's."""
    h = sum(map(ord, user + sid))
    name = speaker_name(user)
    a = f"{name} plans a trip to {CITIES[h % len(CITIES)]} to learn {HOBBIES[h % len(HOBBIES)]} in {sid}"
    b = (f"{name} keeps a {NOUNS[h % len(NOUNS)]} and {VERBS[(h // 3) % len(VERBS)]} it with a neighbour "
         f"from {CITIES[(h // 7) % len(CITIES)]} during {sid}")
    return a, b


def turn_text(user: str, sid: str, k: int, chat: str) -> str:
    """Turn k of a scripted session: `<user> <sid> turn <k>: <chat>`; turn 0 also states the session's
    facts in the first person, as a faithful model's source would."""
    text = f"{user} {sid} turn {k}: {chat}"
    if k == 0:
        name = speaker_name(user)
        text += "".join(f". {f.replace(name, 'I', 1)}" for f in facts_for(user, sid))
    return text


@dataclass
class Workload:
    events: list[Event]
    turns: dict[tuple[str, str], set[str]] = field(default_factory=dict)
    """Per user, the event ids of its turns."""
    sessions: list[tuple[str, str, str]] = field(default_factory=list)
    """Every session (all are closed by the end: session_end, a newer session, or idle)."""
    close_reason: dict[tuple[str, str, str], str] = field(default_factory=dict)

    @property
    def n_turns(self) -> int:
        return sum(len(v) for v in self.turns.values())


def workload(tenant: str = "acme", users: int = 50, sessions: int = 5, per_session: int = 40,
             prefix: str = "user", start: datetime | None = None, all_end: bool = False) -> Workload:
    """`users * sessions * per_session` events, interleaved over users session by session.

    Session 3 of every third user has no session_end (a newer session closes it); the last session
    of every odd user has none either (the idle timeout closes it); the rest end explicitly
    (`all_end`: every session ends explicitly)."""
    start = start or datetime(2024, 1, 1, 9, 0, tzinfo=UTC)
    w = Workload(events=[])
    per_user: list[list[list[Event]]] = []
    for i in range(users):
        uid = f"{prefix}{i:02d}"
        name = speaker_name(uid)
        w.turns[(tenant, uid)] = set()
        user_sessions = []
        for j in range(1, sessions + 1):
            sid = f"s{j}"
            when = start + timedelta(days=7 * j, minutes=i)
            ended = all_end or not ((j == 3 and i % 3 == 0) or (j == sessions and i % 2 == 1))
            n_turns = per_session - 1 if ended else per_session
            evs = []
            for k in range(n_turns):
                speaker = name if k % 2 == 0 else "assistant"
                text = turn_text(uid, sid, k, f"I {VERBS[(i + k) % len(VERBS)]} the {NOUNS[(j + k) % len(NOUNS)]}")
                eid = f"{uid}.{sid}.t{k}"
                evs.append(Event(event_id=eid, tenant_id=tenant, user_id=uid, session_id=sid,
                                 timestamp=when + timedelta(seconds=k), speaker=speaker, text=text))
                w.turns[(tenant, uid)].add(eid)
            if ended:
                evs.append(Event(event_id=f"{uid}.{sid}.end", tenant_id=tenant, user_id=uid, session_id=sid,
                                 timestamp=when + timedelta(seconds=n_turns), kind=EventKind.SESSION_END))
            key = (tenant, uid, sid)
            w.sessions.append(key)
            w.close_reason[key] = "end" if ended else ("newer" if j < sessions else "idle")
            user_sessions.append(evs)
        per_user.append(user_sessions)
    depth = max(len(s) for s in per_user)
    for j in range(depth):
        for user_sessions in per_user:
            if j < len(user_sessions):
                w.events.extend(user_sessions[j])
    return w


# ---- scripted model ----------------------------------------------------------------------------
def _log_call(log_path: str, kind: str, key: str) -> None:
    line = json.dumps({"pid": os.getpid(), "kind": kind, "key": key, "t": time.time()}) + "\n"
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def scripted_reply(log_path: str, fail_users: tuple[str, ...], prompt) -> str:
    """Two distinct dated observations per session; `ADD` for every evolution decision."""
    system = prompt[0].content if len(prompt) > 1 else ""
    body = prompt[-1].content
    if system == prompts.EXTRACT_SYSTEM:
        m = _ID.search(body)
        user, sid = (m.group(1), m.group(2)) if m else ("unknown", "s0")
        _log_call(log_path, "extract", f"{user}:{sid}")
        if user in fail_users:
            raise RuntimeError(f"scripted LLM failure for {user}")
        h = sum(map(ord, user + sid))
        a, b = facts_for(user, sid)
        first = f"{user}.{sid}.t0"
        return f"- [2024-02-0{h % 9 + 1}] {a} (turns: {first})\n- [2024-02-1{h % 9}] {b} (turns: {first})"
    if system == prompts.DECIDE_SYSTEM:
        m = re.search(r"New observation: (.*)", body)
        _log_call(log_path, "decide", m.group(1).strip() if m else "")
        return "OPERATION: ADD\nMEMORY:"
    _log_call(log_path, "other", "")
    return ""


def make_engine(log_path: str, fail_users: tuple[str, ...] = ()):
    return ScriptedEngine(functools.partial(scripted_reply, log_path, fail_users))


def engine_factory(log_path: str | Path, fail_users: tuple[str, ...] = ()):
    """Picklable factory for the writer actors."""
    return functools.partial(make_engine, str(log_path), tuple(fail_users))


def read_calls(log_path: str | Path) -> list[dict]:
    p = Path(log_path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
