"""Self-learning data: factoid question/answer pairs about a user, written from the user's history.

A `UserCorpus` is a snapshot of one user's raw turns and current memories (plain data: it travels
to Ray actors without a Milvus connection). Facts are the user's memories (dated, with provenance),
or speaker turns when the user has no memories yet. For each fact the LLM writes one question and a
short answer (`llm` mode); `template` mode writes deterministic cloze questions instead (for random
or very small models); `auto` tops up LLM output with templates when too few pairs survive.

Filters drop unparseable, unanswerable (empty, "unknown", or an answer not supported by the fact),
trivially-dated (a relative date, or a date the question already states), over-long and
near-duplicate pairs. Output is deterministic given the seed and cached on disk by a key over the
corpus, the model and the settings, so a re-run does not regenerate.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import date, datetime
from pathlib import Path

import numpy as np
from pydantic import BaseModel, Field

from tsubasa.config import DistillConfig
from tsubasa.distill.prompts import PROMPT_VERSION, synth_messages
from tsubasa.embed import Embedder
from tsubasa.llm.base import Engine, SamplingParams
from tsubasa.memory.retrieve import grounding_dated
from tsubasa.schema import QAPair, stable_id

log = logging.getLogger(__name__)


def iso_dated(text: str, when: date | None) -> str:
    """A fact for synthesis: `[2023-05-07] text` (the filters below parse the ISO date)."""
    return f"[{when.isoformat()}] {text}" if when else text

FILTER_VERSION = 2  # part of the cache key: bump when parsing or filters change
_QA_RE = re.compile(r"Question\s*[:：]\s*(?P<q>.+?)\s*(?:\n|\s)+Answer\s*[:：]\s*(?P<a>[^\n]+)", re.I | re.S)
_WORD_RE = re.compile(r"[A-Za-z0-9']+")
_STOP_WORDS = (
    "a an the of to in on at for with and or but is are was were be been being has have had do does did "
    "i you he she it we they me him her them my your his its our their this that these those what which who "
    "whom whose when where why how from by as about into than then so not no yes")
_STOP = frozenset(_STOP_WORDS.split())
_UNANSWERABLE = re.compile(r"\b(unknown|not (mentioned|stated|specified|known|given)|n/?a|no information|"
                           r"cannot (be )?(determined|answer)|i don'?t know|unclear|none)\b", re.I)
_RELATIVE_DATE = re.compile(r"\b(yesterday|today|tomorrow|tonight|last (week|month|year|night|weekend)|"
                            r"next (week|month|year)|recently|the other day|this (week|month|year)|"
                            r"\d+ (days|weeks|months|years) ago)\b", re.I)
_MONTHS = ("january", "february", "march", "april", "may", "june", "july", "august", "september", "october",
           "november", "december")
_DATE_LIKE = re.compile(r"\b(\d{4}-\d{2}-\d{2}|\d{1,2}(st|nd|rd|th)? (" + "|".join(_MONTHS) + r")|(" +
                        "|".join(_MONTHS) + r")( \d{1,2})?,? \d{4}|monday|tuesday|wednesday|thursday|friday|"
                        r"saturday|sunday|\d{4})\b", re.I)


# ---- the user's history, as plain data --------------------------------------------------------
class CorpusTurn(BaseModel):
    source_id: str
    session_id: str
    speaker: str
    text: str
    session_date: str = ""
    seq: int = 0


class CorpusMemory(BaseModel):
    memory_id: str
    text: str
    event_date: date | None = None
    source_ids: list[str] = Field(default_factory=list)
    updated_at: datetime | None = None

    @property
    def shown(self) -> str:
        """Exactly as the retriever shows it to the answering model ("[7 May 2023] ..."): the teacher's
        context and the student's grounding must match what serving retrieves."""
        return grounding_dated(self.text, self.event_date)


class UserCorpus(BaseModel):
    """One user's raw turns (in session order) and current memories."""

    tenant_id: str
    user_id: str
    turns: list[CorpusTurn] = Field(default_factory=list)
    memories: list[CorpusMemory] = Field(default_factory=list)

    @classmethod
    def from_store(cls, store, tenant_id: str, user_id: str) -> UserCorpus:
        """Snapshot a user from a MemoryStore (`list_turns`, `list_memories`)."""
        turns = sorted(store.list_turns(tenant_id, user_id), key=lambda t: (t.timestamp, t.seq))
        mems = store.list_memories(tenant_id, user_id)
        return cls(
            tenant_id=tenant_id, user_id=user_id,
            turns=[CorpusTurn(source_id=t.source_id, session_id=t.session_id, speaker=t.speaker, text=t.text,
                              session_date=t.session_date or t.timestamp.date().isoformat(), seq=t.seq)
                   for t in turns],
            memories=[CorpusMemory(memory_id=m.memory_id, text=m.text, event_date=m.event_date,
                                   source_ids=list(m.source_ids), updated_at=m.updated_at) for m in mems])

    def sessions(self) -> dict[str, list[CorpusTurn]]:
        out: dict[str, list[CorpusTurn]] = {}
        for t in self.turns:
            out.setdefault(t.session_id, []).append(t)
        return out

    def session_of(self) -> dict[str, str]:
        return {t.source_id: t.session_id for t in self.turns}

    @property
    def content_hash(self) -> str:
        return hashlib.sha256(self.model_dump_json(exclude={"memories": {"__all__": {"updated_at"}}})
                              .encode()).hexdigest()[:16]

    @property
    def memory_watermark(self) -> datetime | None:
        stamps = [m.updated_at for m in self.memories if m.updated_at]
        return max(stamps) if stamps else None


class Fact(BaseModel):
    """One thing the user's history says, with provenance (what a QA pair is written from)."""

    text: str
    memory_ids: list[str] = Field(default_factory=list)
    source_ids: list[str] = Field(default_factory=list)
    session_id: str = ""
    event_date: date | None = None


def corpus_facts(corpus: UserCorpus, min_words: int = 5) -> list[Fact]:
    """Memories (dated) if the user has any, else the longer speaker turns."""
    session_of = corpus.session_of()
    if corpus.memories:
        facts = []
        for m in corpus.memories:
            sessions = [session_of[s] for s in m.source_ids if s in session_of]
            facts.append(Fact(text=iso_dated(m.text, m.event_date), memory_ids=[m.memory_id],
                              source_ids=list(m.source_ids), session_id=sessions[0] if sessions else "",
                              event_date=m.event_date))
        return facts
    return [Fact(text=f"{t.speaker} ({t.session_date}): {t.text}", source_ids=[t.source_id], session_id=t.session_id)
            for t in corpus.turns if len(t.text.split()) >= min_words]


# ---- parsing and filters ----------------------------------------------------------------------
def parse_qa(text: str) -> tuple[str, str] | None:
    """`Question: ... Answer: ...` -> (question, answer); None if the reply has no such pair."""
    m = _QA_RE.search(text or "")
    if not m:
        return None
    q = m.group("q").strip().strip('"').strip()
    a = m.group("a").strip().strip('"').strip().rstrip(".").strip()
    if not q or not a:
        return None
    if not q.endswith("?"):
        q = q.rstrip(".") + "?"
    return q, a


def content_words(text: str) -> list[str]:
    return [w for w in _WORD_RE.findall(text.lower()) if w not in _STOP]


def normalise_answer(text: str) -> str:
    """Lowercase, no punctuation or articles (how answers are compared for agreement)."""
    words = [w for w in _WORD_RE.findall(text.lower()) if w not in {"a", "an", "the"}]
    return " ".join(words)


def trivially_dated(question: str, answer: str) -> bool:
    """A relative date (unresolvable out of context), or a date answer the question already states."""
    if _RELATIVE_DATE.search(answer):
        return True
    dates = [m.group(0).lower() for m in _DATE_LIKE.finditer(answer)]
    if not dates:
        return False
    q = question.lower()
    return all(d in q for d in dates)


_PERSONAL = re.compile(r"\b(i|i'm|i've|me|my|mine|you|you're|you've|your|yours|we|us|our)\b", re.I)
_QUOTED = re.compile(r'"[^"]*"')
_ECHO = re.compile(r"^\s*(\[\d{4}-\d{2}-\d{2}\]|[A-Z][\w .'-]{0,40}:)")


def not_factoid(question: str, answer: str) -> bool:
    """Chat rather than a fact about the user: a question in first/second person (outside quotes),
    an answer that is a question, repeats the question, or echoes a memory line ('[date] Name: ...')."""
    if _PERSONAL.search(_QUOTED.sub("", question)):
        return True
    a, q = normalise_answer(answer), normalise_answer(question)
    return "?" in answer or bool(q and q in a) or bool(_ECHO.match(answer))


def _spell_dates(text: str) -> str:
    """Append each ISO date's spelled forms ('7 May 2023'), so answers in either form count as supported."""
    extra = []
    for y, m, d in re.findall(r"(\d{4})-(\d{2})-(\d{2})", text):
        if 1 <= int(m) <= 12:
            extra.append(f"{int(d)} {_MONTHS[int(m) - 1]} {y}")
    return f"{text} {' '.join(extra)}" if extra else text


class SynthStats(BaseModel):
    facts_tried: int = 0
    generated: int = 0
    kept: int = 0
    templates: int = 0
    dropped: dict[str, int] = Field(default_factory=dict)


class QAFilter:
    """Drop reasons: unparseable, unanswerable, not_factoid, trivial_date, too_long, duplicate."""

    def __init__(self, cfg: DistillConfig, embedder: Embedder | None = None) -> None:
        self.cfg = cfg
        self.embedder = embedder
        self.kept_vecs: list[np.ndarray] = []
        self.kept_words: list[set[str]] = []
        self.dropped: Counter[str] = Counter()

    def reason(self, question: str, answer: str, fact: str) -> str | None:
        cfg = self.cfg
        if len(question.split()) > cfg.max_question_words or len(answer.split()) > cfg.max_answer_words:
            return "too_long"
        if (not content_words(answer) and not re.search(r"\d", answer)) or _UNANSWERABLE.search(answer):
            return "unanswerable"
        words = content_words(answer) or _WORD_RE.findall(answer.lower())
        fact_words = set(_WORD_RE.findall(_spell_dates(fact).lower()))
        support = sum(w in fact_words for w in words) / max(1, len(words))
        if support < cfg.min_answer_support:
            return "unanswerable"
        if not_factoid(question, answer):
            return "not_factoid"
        if trivially_dated(question, answer):
            return "trivial_date"
        if normalise_answer(answer) and normalise_answer(answer) in normalise_answer(question):
            return "unanswerable"  # the question gives its answer away
        return None

    def accept(self, question: str, answer: str, fact: str) -> bool:
        why = self.reason(question, answer, fact)
        if why is None and self._duplicate(question):
            why = "duplicate"
        if why is not None:
            self.dropped[why] += 1
            return False
        return True

    def _duplicate(self, question: str) -> bool:
        if self.embedder is not None:
            vec = self.embedder.embed([question])[0]
            if self.kept_vecs and float(np.max(np.stack(self.kept_vecs) @ vec)) >= self.cfg.dedup_similarity:
                return True
            self.kept_vecs.append(vec)
            return False
        words = set(content_words(question))
        for other in self.kept_words:
            if words and len(words & other) / len(words | other) >= self.cfg.dedup_similarity:
                return True
        self.kept_words.append(words)
        return False


def template_qa(fact: Fact, max_answer_words: int) -> list[tuple[str, str]]:
    """Deterministic QA from a fact: a cloze on its last words, and its date when it has one."""
    body = re.sub(r"^\[\d{4}-\d{2}-\d{2}\]\s*", "", fact.text).strip().rstrip(".")
    words = body.split()
    out: list[tuple[str, str]] = []
    if len(words) >= 5:
        n_ans = max(2, min(max_answer_words, len(words) // 3))
        prefix, answer = " ".join(words[:-n_ans]), " ".join(words[-n_ans:])
        out.append((f'How does this fact end: "{prefix} ..."?', answer.strip(",;:")))
    if fact.event_date is not None and len(words) >= 3:
        d = fact.event_date
        out.append((f'When did this happen: "{body}"?', f"{d.day} {_MONTHS[d.month - 1].title()} {d.year}"))
    return out


# ---- the synthesizer --------------------------------------------------------------------------
class QASynthesizer:
    """Writes filtered, deduplicated factoid QA pairs about one user."""

    def __init__(self, engine: Engine | None, cfg: DistillConfig, embedder: Embedder | None = None,
                 batch_size: int = 8) -> None:
        self.engine = engine
        self.cfg = cfg
        self.embedder = embedder
        self.batch_size = batch_size

    def synthesize(self, corpus: UserCorpus, n: int | None = None,
                   on_progress: Callable[[int, int], None] | None = None) -> tuple[list[QAPair], SynthStats]:
        """Up to `n` (default `qa_per_user`) QA pairs, in a deterministic order."""
        n = n or self.cfg.qa_per_user
        facts = corpus_facts(corpus)
        random.Random(f"{self.cfg.seed}:{corpus.tenant_id}:{corpus.user_id}").shuffle(facts)
        filt = QAFilter(self.cfg, self.embedder)
        stats = SynthStats()
        kept: list[QAPair] = []
        mode = self.cfg.synth_mode
        if mode in ("llm", "auto") and self.engine is None:
            raise ValueError(f"distill.synth_mode={mode} needs an LLM engine")
        budget = facts[: max(n * 3, n + 8)]  # each fact may fail the filters
        if mode in ("llm", "auto"):
            params = SamplingParams(max_new_tokens=self.cfg.synth_max_new_tokens, temperature=0.0)
            for start in range(0, len(budget), self.batch_size):
                if len(kept) >= n:
                    break
                batch = budget[start:start + self.batch_size]
                gens = self.engine.generate([synth_messages(f.text) for f in batch], params)  # type: ignore[union-attr]
                stats.facts_tried += len(batch)
                for fact, gen in zip(batch, gens, strict=True):
                    stats.generated += 1
                    qa = parse_qa(gen.text)
                    if qa is None:
                        filt.dropped["unparseable"] += 1
                        continue
                    if len(kept) < n and filt.accept(qa[0], qa[1], fact.text):
                        kept.append(self._pair(corpus, fact, *qa))
                if on_progress:
                    on_progress(min(len(kept), n), n)
        if mode == "template" or (mode == "auto" and len(kept) < n):
            for fact in facts:
                if len(kept) >= n:
                    break
                for q, a in template_qa(fact, self.cfg.max_answer_words):
                    if len(kept) < n and filt.accept(q, a, fact.text):
                        kept.append(self._pair(corpus, fact, q, a))
                        stats.templates += 1
            if on_progress:
                on_progress(len(kept), n)
        stats.kept = len(kept)
        stats.dropped = dict(filt.dropped)
        return kept, stats

    @staticmethod
    def _pair(corpus: UserCorpus, fact: Fact, question: str, answer: str) -> QAPair:
        return QAPair(qa_id=stable_id(corpus.tenant_id, corpus.user_id, question, answer, prefix="q"),
                      tenant_id=corpus.tenant_id, user_id=corpus.user_id, question=question, answer=answer,
                      source_ids=fact.source_ids, memory_ids=fact.memory_ids, session_id=fact.session_id)


def split_heldout(qas: Sequence[QAPair], fraction: float) -> tuple[list[QAPair], list[QAPair]]:
    """Deterministic (train, held-out) split by hashed QA id; at least one held out when fraction > 0."""
    if fraction <= 0 or len(qas) < 2:
        return list(qas), []
    ranked = sorted(qas, key=lambda q: hashlib.sha256(q.qa_id.encode()).hexdigest())
    k = max(1, round(len(qas) * fraction))
    held = {q.qa_id for q in ranked[:k]}
    return [q for q in qas if q.qa_id not in held], [q for q in qas if q.qa_id in held]


# ---- cache ------------------------------------------------------------------------------------
def synth_cache_key(corpus: UserCorpus, model_name: str, cfg: DistillConfig, n: int) -> str:
    fields = cfg.model_dump(include={"synth_mode", "synth_max_new_tokens", "max_question_words",
                                     "max_answer_words", "min_answer_support", "dedup_similarity", "seed"})
    return stable_id(corpus.content_hash, model_name, json.dumps(fields, sort_keys=True), str(n),
                     str(PROMPT_VERSION), str(FILTER_VERSION))[:20]


class JsonCache:
    """Small JSON documents under `<root>/<kind>/<tenant>/<user>/<key>.json` (written atomically)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, kind: str, tenant_id: str, user_id: str, key: str) -> Path:
        return self.root / kind / tenant_id / user_id / f"{key}.json"

    def get(self, kind: str, tenant_id: str, user_id: str, key: str) -> dict | None:
        p = self.path(kind, tenant_id, user_id, key)
        try:
            return json.loads(p.read_text())
        except (FileNotFoundError, ValueError):
            return None

    def put(self, kind: str, tenant_id: str, user_id: str, key: str, doc: dict) -> None:
        p = self.path(kind, tenant_id, user_id, key)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(f".tmp{random.getrandbits(32):08x}")
        tmp.write_text(json.dumps(doc))
        tmp.replace(p)

    def delete(self, kind: str, tenant_id: str, user_id: str, key: str) -> None:
        self.path(kind, tenant_id, user_id, key).unlink(missing_ok=True)
