"""Observation extraction: per session and target speaker, an LLM distils the turns into
standalone, absolutely dated observations with provenance (the ids of the turns they came from).

Parsing is strict about what it keeps and never raises on malformed model output: it accepts a
JSON list or `- [date] text (turns: ...)` lines, drops what does not qualify and counts why.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date

import numpy as np

from tsubasa.config import MemoryConfig
from tsubasa.embed import Embedder
from tsubasa.llm.base import Engine, SamplingParams, msgs
from tsubasa.llm.models import SMOLLM2, TINY_QWEN3
from tsubasa.memory import prompts
from tsubasa.memory.dates import human_date, resolve_relative
from tsubasa.memory.guards import ObservationGuard, content_words
from tsubasa.schema import Observation, Turn, stable_id

log = logging.getLogger(__name__)
SMALL_MODELS = {TINY_QWEN3, SMOLLM2}

_BULLET = re.compile(r"^\s*(?:[-*•]+|\d+[.)]|observation\s*\d*\s*:)\s*", re.I)
_DATE = re.compile(r"^\s*[\[(]?\s*(\d{4}-\d{2}-\d{2})\s*[\])]?\s*[:\-–—]?\s*")
_TURNS_TAIL = re.compile(r"\(\s*(?:turns?|ids?|sources?|from)\s*[:=]?\s*([^)]*)\)\s*\.?\s*$", re.I)
_ID_TOKEN = re.compile(r"[A-Za-z0-9_.@:-]+")
_META = re.compile(
    r"\b(this|the) (conversation|chat|session|dialogue)\b|\b(is|was|seems|appears|being) (very |really |quite |so )?"
    r"(supportive|friendly|nice|helpful|encouraging|polite|enthusiastic|excited to chat|happy to chat)\b"
    r"|^(sure|here are|observations?:|note:)",
    re.I,
)
_PLACEHOLDER = re.compile(r"YYYY|<[^>]+>|\bobservation\b\s*\(turns", re.I)


@dataclass
class ExtractionStats:
    """What the parser kept and dropped, by reason (for logs and tests)."""

    lines: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    json_used: bool = False
    attributed: int = 0


@dataclass
class ParsedObservation:
    text: str
    event_date: date | None
    source_ids: list[str]
    speaker: str = ""
    attributed: bool = False


def transcript(turns: Sequence[Turn]) -> str:
    return "\n".join(f"[{t.source_id}] {t.speaker}: {t.text}" for t in turns)


def _ids_in(raw: str, known: set[str]) -> list[str]:
    found = []
    for tok in _ID_TOKEN.findall(raw):
        tok = tok.strip(".,;:")
        if tok in known and tok not in found:
            found.append(tok)
    return found


def _clean_text(text: str) -> str:
    text = re.sub(r"\s+", " ", text).strip().strip('"').strip()
    return text.rstrip(" ,;")


def _from_json(raw: str) -> list[dict] | None:
    start, end = raw.find("["), raw.rfind("]")
    if start < 0 or end <= start:
        return None
    try:
        data = json.loads(raw[start:end + 1])
    except (ValueError, TypeError):
        return None
    if not isinstance(data, list) or not all(isinstance(x, dict) for x in data):
        return None
    return data


def parse_observations(raw: str, known_ids: Sequence[str], report_date: date | None, speaker: str,
                       max_items: int = 20, stats: ExtractionStats | None = None,
                       speakers: Sequence[str] = (), seen: set[str] | None = None,
                       guard: ObservationGuard | None = None) -> list[ParsedObservation]:
    """Parse an extractor reply. Never raises; whatever cannot be used is dropped and counted.

    A line that starts with `<speaker>:` (small models echo turns) is kept for that speaker;
    `seen` de-duplicates across the calls of one session. With a `guard` (see guards.py) each line
    must be about `speaker`, supported by its turns and not a repeat. Relative dates ("yesterday")
    are rewritten against `report_date` and give the event date."""
    stats = stats if stats is not None else ExtractionStats()
    known = set(known_ids)
    candidates: list[tuple[str, str | None, list[str]]] = []
    items = _from_json(raw) if isinstance(raw, str) else None
    if items is not None:
        stats.json_used = True
        for it in items:
            text = it.get("text") or it.get("observation") or it.get("fact") or ""
            when = it.get("date") or it.get("event_date")
            src = it.get("turns") or it.get("source_ids") or it.get("evidence") or []
            src = src if isinstance(src, list) else [src]
            candidates.append((str(text), str(when) if when else None,
                               _ids_in(" ".join(str(s) for s in src), known)))
    elif isinstance(raw, str):
        for line in raw.splitlines():
            if not line.strip():
                continue
            line = _BULLET.sub("", line, count=1)
            when = None
            if m := _DATE.match(line):
                when, line = m.group(1), line[m.end():]
            ids: list[str] = []
            if m := _TURNS_TAIL.search(line):
                ids, line = _ids_in(m.group(1), known), line[:m.start()]
            bracket = re.findall(r"\[([^\]]+)\]", line)
            for b in bracket:
                ids.extend(i for i in _ids_in(b, known) if i not in ids)
            line = re.sub(r"\[[^\]]*\]", "", line)
            candidates.append((line, when, ids))
    stats.lines += len(candidates)
    out: list[ParsedObservation] = []
    kept_words: list[set[str]] = []
    if guard is not None:
        guard.new_reply()
        kept_words = guard.kept  # repeats are caught across the windows of one session
    seen = seen if seen is not None else set()
    for text, when, ids in candidates:
        text = _clean_text(text)
        who = speaker
        if guard is None:
            for s in speakers:
                if text.lower().startswith(s.lower() + ":"):
                    who, text = s, f"{s}: {text[len(s) + 1:].strip()}"
        words = text.split()
        if len(words) < 4:
            stats.dropped["too_short"] += 1
            continue
        if len(words) > 80:
            stats.dropped["too_long"] += 1
            continue
        if _PLACEHOLDER.search(text):
            stats.dropped["template_echo"] += 1
            continue
        if _META.search(text):
            stats.dropped["meta"] += 1
            continue
        if guard is not None:
            if guard.looping:
                stats.dropped["loop"] += 1
                break
            fixed = guard.check(text, ids, stats.dropped)
            if fixed is None:
                continue
            text = fixed
            words = content_words(text, guard.names)
            if guard.repeated(words, kept_words, stats.dropped):
                continue
            kept_words.append(words)
        key = re.sub(r"\W+", " ", text.lower()).strip()
        if key in seen:
            stats.dropped["duplicate"] += 1
            continue
        seen.add(key)
        event_date = None
        if when:
            try:
                event_date = date.fromisoformat(when.strip()[:10])
            except ValueError:
                stats.dropped["bad_date_kept_text"] += 1
        text, relative = resolve_relative(text, report_date)
        event_date = event_date or relative or report_date
        if not text.endswith((".", "!", "?")):
            text += "."
        out.append(ParsedObservation(text=text, event_date=event_date, source_ids=ids, speaker=who))
        if len(out) >= max_items:
            break
    stats.kept += len(out)
    return out


class ObservationExtractor:
    """Turns one session's turns into observations about each target speaker (one batched LLM call)."""

    def __init__(self, engine: Engine, embedder: Embedder, cfg: MemoryConfig | None = None) -> None:
        self.engine = engine
        self.embedder = embedder
        self.cfg = cfg or MemoryConfig()

    def speakers(self, turns: Sequence[Turn]) -> list[str]:
        seen = list(dict.fromkeys(t.speaker for t in turns))
        if self.cfg.target_speakers:
            return [s for s in seen if s in self.cfg.target_speakers]
        return [s for s in seen if s.lower() != "assistant"]

    @property
    def compact(self) -> bool:
        if self.cfg.extract_prompt == "auto":
            return getattr(self.engine, "model_name", "") in SMALL_MODELS
        return self.cfg.extract_prompt == "compact"

    def prompt(self, turns: Sequence[Turn], speaker: str, report_date: date | None, max_items: int | None = None):
        rd = report_date.isoformat() if report_date else "unknown"
        if self.compact:
            text = "\n".join(f"{t.speaker}: {t.text}" for t in turns)
            user = prompts.EXTRACT_USER_COMPACT.format(
                report_date=rd, session_date=turns[0].session_date or rd, transcript=text, speaker=speaker)
            return msgs(("user", user))
        others = [s for s in dict.fromkeys(t.speaker for t in turns) if s != speaker]
        user = prompts.EXTRACT_USER.format(
            speakers=" and ".join(dict.fromkeys(t.speaker for t in turns)),
            session_date=human_date(report_date) if report_date else "an unknown date",
            transcript="\n".join(f"{t.speaker}: {t.text}" for t in turns),
            max_items=max_items or self.cfg.max_observations_per_session, speaker=speaker,
            others=" or ".join(others) or "anyone else")
        return msgs(("system", prompts.EXTRACT_SYSTEM), ("user", user))

    def windows(self, turns: Sequence[Turn]) -> list[Sequence[Turn]]:
        """The session cut into consecutive windows of `extract_window_turns` turns (a short last
        window joins the one before it), or the whole session when windows are off."""
        n = self.cfg.extract_window_turns
        if n <= 0 or len(turns) <= n:
            return [turns]
        cuts = list(range(0, len(turns), n))
        if len(cuts) > 1 and len(turns) - cuts[-1] < n // 2:
            cuts.pop()
        return [turns[a:b] for a, b in zip(cuts, [*cuts[1:], len(turns)], strict=True)]

    def extract(self, turns: Sequence[Turn]) -> tuple[list[Observation], ExtractionStats]:
        """Observations of one session (all target speakers), with provenance: one batched LLM call
        with a prompt per (window, target speaker who speaks in it)."""
        stats = ExtractionStats()
        if not turns:
            return [], stats
        first = turns[0]
        report_date = min(t.timestamp for t in turns).date()
        speakers = self.speakers(turns)
        if not speakers:
            return [], stats
        jobs = [(w, s) for w in self.windows(turns) for s in speakers if any(t.speaker == s for t in w)]
        cap = self.cfg.max_observations_per_session
        replies = self.engine.generate(
            [self.prompt(w, s, report_date, self._max_items(w, s)) for w, s in jobs],
            SamplingParams(max_new_tokens=self.cfg.extract_max_new_tokens))
        known = [t.source_id for t in turns]
        all_speakers = list(dict.fromkeys(t.speaker for t in turns))
        guards = {s: None if self.compact or not self.cfg.guards else ObservationGuard(turns, s) for s in speakers}
        per_speaker: Counter = Counter()
        row = {t.source_id: i for i, t in enumerate(turns)}
        vecs: np.ndarray | None = None
        parsed: list[ParsedObservation] = []
        seen: set[str] = set()
        for (window, speaker), reply in zip(jobs, replies, strict=True):
            found = []
            for p in parse_observations(reply.text, known, report_date, speaker, cap, stats, all_speakers, seen,
                                        guards[speaker]):
                p.speaker = p.speaker or speaker
                if per_speaker[p.speaker] >= cap:
                    stats.dropped["over_cap"] += 1
                    continue
                per_speaker[p.speaker] += 1
                found.append(p)
            if found:
                if vecs is None:  # the session's turns, embedded once for all its windows and speakers
                    vecs = self.embedder.embed([t.text for t in turns])
                parsed.extend(self._attribute(found, window, vecs[[row[t.source_id] for t in window]], stats))
        stats.kept = len(parsed)
        obs = [Observation(
            observation_id=stable_id(first.tenant_id, first.user_id, first.session_id, p.speaker, str(i), prefix="o"),
            tenant_id=first.tenant_id, user_id=first.user_id, session_id=first.session_id, speaker=p.speaker,
            text=p.text, event_date=p.event_date, report_date=report_date, source_ids=p.source_ids,
            attributed=p.attributed, index=i) for i, p in enumerate(parsed)]
        log.info("session %s: %d observations from %d lines in %d calls (dropped %s)", first.session_id, len(obs),
                 stats.lines, len(jobs), dict(stats.dropped))
        return obs, stats

    def _max_items(self, window: Sequence[Turn], speaker: str) -> int:
        """Lines asked for: the window's share of the per-session cap, at least 3 (a window of a few
        turns asked for 20 lines invites invention)."""
        if self.cfg.extract_window_turns <= 0:
            return self.cfg.max_observations_per_session
        own = sum(t.speaker == speaker for t in window)
        return max(3, min(self.cfg.max_observations_per_session, own))

    def _attribute(self, parsed: list[ParsedObservation], turns: Sequence[Turn], tv: np.ndarray,
                   stats: ExtractionStats) -> list[ParsedObservation]:
        """Provenance and the speaker check, by similarity to `turns` (a window; `tv` their embeddings).

        An observation that cites no turn gets the most similar turn(s) of its speaker (at least
        `attribution_min_similarity`, else the single best one). With the full prompt, one whose best
        match among another target speaker's turns beats its best own turn by `speaker_margin` is that
        other speaker's fact credited to the wrong person, and is dropped (`other_speakers_turns`)."""
        if not parsed:
            return parsed
        sims = self.embedder.embed([p.text for p in parsed]) @ tv.T
        targets = set(self.speakers(turns))
        kept = []
        for p, row in zip(parsed, sims, strict=True):
            own = np.array([t.speaker == p.speaker for t in turns])
            # Only another *target* speaker's life can be misattributed: an assistant that paraphrases
            # the user's facts back ("great that you fixed the canoe") must not veto them.
            rival = np.array([t.speaker != p.speaker and t.speaker in targets for t in turns])
            if not self.compact and self.cfg.guards and own.any() and rival.any() \
                    and row[rival].max() > row[own].max() + self.cfg.speaker_margin:
                stats.dropped["other_speakers_turns"] += 1
                continue
            kept.append(p)
            if p.source_ids:
                continue
            scores = np.where(own, row, row - 0.1)  # prefer the speaker's own turns
            order = np.argsort(-scores)
            picked = [turns[i].source_id for i in order[:2] if scores[i] >= self.cfg.attribution_min_similarity]
            p.source_ids = picked or [turns[int(order[0])].source_id]
            p.attributed = True
            stats.attributed += 1
        return kept
