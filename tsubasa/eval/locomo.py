"""LoCoMo loader (`locomo10.json`, CC BY-NC 4.0, read from disk, never shipped).

Copes with the file's quirks: integer answers, category 5 without `answer`, malformed evidence ids
("D8:6; D9:17", "D:11:26", "D"), image turns (their BLIP caption is kept as text), session dates
such as "1:56 pm on 8 May, 2023".
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from pathlib import Path

from pydantic import BaseModel

from tsubasa.schema import Event, EventKind

CATEGORY_NAMES = {1: "multi-hop", 2: "temporal", 3: "open-domain", 4: "single-hop", 5: "adversarial"}
SCORED_CATEGORIES = (1, 2, 3, 4)  # category 5 is excluded from F1 / BLEU-1 / J, as in the paper
CATEGORY_IDS = {name: cid for cid, name in CATEGORY_NAMES.items()}
SPLITS = {"train": (1,), "validation": (2,), "test": tuple(range(3, 11))}
"""Memory-R1's split, by 1-based position in locomo10.json: conversation 1 trains, 2 validates, 3-10 test."""
_EVIDENCE = re.compile(r"D:?(\d+):(\d+)")
_SESSION_KEY = re.compile(r"^session_(\d+)$")
DEFAULT_PATHS = ("../shared/data/locomo10.json", "shared/data/locomo10.json")


class LocomoNotFoundError(FileNotFoundError):
    pass


def default_locomo_path() -> Path:
    """`$TSUBASA_LOCOMO` or ../shared/data/locomo10.json; LocomoNotFoundError with a clear message."""
    env = os.environ.get("TSUBASA_LOCOMO")
    for cand in ([env] if env else []) + list(DEFAULT_PATHS):
        p = Path(cand)
        if p.is_file():
            return p
    raise LocomoNotFoundError(
        "LoCoMo data not found: put locomo10.json at ../shared/data/ or set TSUBASA_LOCOMO "
        "(CC BY-NC 4.0, not shipped with TSUBASA)")


def parse_session_date(text: str) -> datetime:
    """'1:56 pm on 8 May, 2023' -> aware datetime (UTC)."""
    return datetime.strptime(text.strip(), "%I:%M %p on %d %B, %Y").replace(tzinfo=UTC)


def normalise_evidence(raw: Iterable[str]) -> list[str]:
    out: list[str] = []
    for item in raw:
        for s, t in _EVIDENCE.findall(str(item)):
            did = f"D{int(s)}:{int(t)}"
            if did not in out:
                out.append(did)
    return out


class LocomoTurn(BaseModel):
    dia_id: str
    speaker: str
    text: str


class LocomoSession(BaseModel):
    index: int
    date_text: str
    when: datetime
    turns: list[LocomoTurn]

    @property
    def session_id(self) -> str:
        return f"session_{self.index}"


class LocomoQA(BaseModel):
    qa_id: str = ""
    """Stable id `<sample_id>.q<index>` (index in the file's `qa` list, from 0)."""
    question: str
    answer: str | None
    category: int
    evidence: list[str]
    adversarial_answer: str | None = None

    @property
    def scored(self) -> bool:
        return self.category in SCORED_CATEGORIES and self.answer is not None


class LocomoConversation(BaseModel):
    sample_id: str
    speaker_a: str
    speaker_b: str
    sessions: list[LocomoSession]
    qa: list[LocomoQA]
    observations: dict[int, list[tuple[str, str, list[str]]]]
    """Per session index: (speaker, observation text, evidence dia_ids) as LoCoMo's GPT wrote them."""

    @property
    def turns(self) -> list[LocomoTurn]:
        return [t for s in self.sessions for t in s.turns]

    def session(self, index: int) -> LocomoSession:
        for s in self.sessions:
            if s.index == index:
                return s
        raise KeyError(f"{self.sample_id} has no session {index}")


def _turn_text(t: dict) -> str:
    text = str(t.get("text", "")).strip()
    if t.get("blip_caption"):
        text = f"{text} [shares a photo: {t['blip_caption']}]".strip()
    return text


def _conversation(raw: dict) -> LocomoConversation:
    conv = raw["conversation"]
    sessions = []
    for key, turns in conv.items():
        m = _SESSION_KEY.match(key)
        if not m or not isinstance(turns, list) or not turns:
            continue
        idx = int(m.group(1))
        date_text = conv.get(f"session_{idx}_date_time", "")
        sessions.append(LocomoSession(
            index=idx, date_text=date_text, when=parse_session_date(date_text),
            turns=[LocomoTurn(dia_id=t["dia_id"], speaker=t["speaker"], text=_turn_text(t)) for t in turns]))
    sessions.sort(key=lambda s: s.index)
    qa = []
    for i, q in enumerate(raw.get("qa", [])):
        ans = q.get("answer")
        qa.append(LocomoQA(qa_id=f"{raw['sample_id']}.q{i:03d}", question=q["question"],
                           answer=None if ans is None else str(ans),
                           category=int(q["category"]), evidence=normalise_evidence(q.get("evidence", [])),
                           adversarial_answer=q.get("adversarial_answer")))
    obs: dict[int, list[tuple[str, str, list[str]]]] = {}
    for key, per_speaker in (raw.get("observation") or {}).items():
        m = re.match(r"session_(\d+)_observation", key)
        if not m:
            continue
        for speaker, items in per_speaker.items():
            for item in items:
                text, ev = item[0], item[1] if len(item) > 1 else []
                ev = normalise_evidence(ev if isinstance(ev, list) else [ev])
                obs.setdefault(int(m.group(1)), []).append((speaker, str(text), ev))
    return LocomoConversation(sample_id=raw["sample_id"], speaker_a=conv.get("speaker_a", ""),
                              speaker_b=conv.get("speaker_b", ""), sessions=sessions, qa=qa, observations=obs)


@lru_cache(maxsize=4)
def _load(path: str) -> tuple[LocomoConversation, ...]:
    with open(path) as fh:
        return tuple(_conversation(c) for c in json.load(fh))


def load_locomo(path: str | Path | None = None) -> list[LocomoConversation]:
    return list(_load(str(path or default_locomo_path())))


def get_conversation(conv_id: str, path: str | Path | None = None) -> LocomoConversation:
    convs = load_locomo(path)
    for c in convs:
        if c.sample_id == conv_id:
            return c
    raise KeyError(f"no LoCoMo conversation {conv_id!r}; have {', '.join(c.sample_id for c in convs)}")


def category_id(value: int | str) -> int:
    """A category given by id (1-5) or name (`multi-hop`, `temporal`, ...) -> its id."""
    text = str(value).strip().lower()
    if text.isdigit() and int(text) in CATEGORY_NAMES:
        return int(text)
    if text in CATEGORY_IDS:
        return CATEGORY_IDS[text]
    raise ValueError(f"unknown LoCoMo category {value!r}: use 1-5 or one of {', '.join(CATEGORY_IDS)}")


def parse_categories(spec: str | None) -> list[int]:
    """'1-4' / '1,3' / 'temporal,single-hop' / 'all' -> sorted category ids."""
    if not spec or spec == "all":
        return list(CATEGORY_NAMES)
    picked: set[int] = set()
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        if "-" in part and all(x.strip().isdigit() for x in part.split("-", 1)):
            a, b = (int(x) for x in part.split("-", 1))
            if a > b:
                raise ValueError(f"empty category range {part!r}")
            picked.update(category_id(i) for i in range(a, b + 1))
        else:
            picked.add(category_id(part))
    if not picked:
        raise ValueError("no category selected")
    return sorted(picked)


def select_conversations(convs: list[LocomoConversation], spec: str | None) -> list[LocomoConversation]:
    """Conversations by sample id (`conv-26,conv-30`), 1-based position (`1-3`), Memory-R1 split
    name (`train`, `validation`, `test`) or `all`; order follows the file."""
    if not spec or spec == "all":
        return list(convs)
    by_id = {c.sample_id: c for c in convs}
    positions: list[int] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        if part in SPLITS:
            positions.extend(SPLITS[part])
        elif part in by_id:
            positions.append(convs.index(by_id[part]) + 1)
        else:
            try:
                positions.extend(parse_range(part, list(range(1, len(convs) + 1))))
            except ValueError:
                raise ValueError(f"unknown conversation {part!r}: use a sample id ({convs[0].sample_id}, ...), "
                                 f"a position 1-{len(convs)}, a split ({', '.join(SPLITS)}) or 'all'") from None
    if not positions:
        raise ValueError("no conversation selected")
    bad = [p for p in positions if p > len(convs)]
    if bad:
        raise ValueError(f"conversation position(s) {bad} beyond the {len(convs)} in the file")
    return [convs[p - 1] for p in sorted(set(positions))]


def parse_range(spec: str | None, universe: list[int]) -> list[int]:
    """'1-3,5' -> [1, 2, 3, 5] (within universe); None/'all' -> universe."""
    if not spec or spec == "all":
        return list(universe)
    picked: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        if "-" in part:
            a, b = part.split("-", 1)
            picked.extend(range(int(a), int(b) + 1))
        elif part:
            picked.append(int(part))
    bad = [p for p in picked if p not in universe]
    if bad:
        raise ValueError(f"out of range: {bad} (available {universe[0]}-{universe[-1]})")
    return picked


def session_events(conv: LocomoConversation, session: LocomoSession, tenant_id: str, user_id: str,
                   close: bool = True) -> list[Event]:
    """One session as TSUBASA events (one per turn, plus a session-end event)."""
    events = []
    for seq, t in enumerate(session.turns):
        events.append(Event(
            event_id=f"{conv.sample_id}.{t.dia_id.replace(':', '.')}", tenant_id=tenant_id, user_id=user_id,
            session_id=session.session_id, timestamp=session.when + timedelta(seconds=seq),
            kind=EventKind.TURN, speaker=t.speaker, text=t.text[:16000], source_id=t.dia_id,
            metadata={"seq": seq, "session_date": session.date_text}))
    if close:
        events.append(Event(
            event_id=f"{conv.sample_id}.{session.session_id}.end", tenant_id=tenant_id, user_id=user_id,
            session_id=session.session_id, timestamp=session.when + timedelta(seconds=len(session.turns)),
            kind=EventKind.SESSION_END))
    return events
