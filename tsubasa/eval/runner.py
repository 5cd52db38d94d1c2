"""The LoCoMo runner: (system, k) x question -> one JSONL row each, resumable.

A run directory holds `run.json` (what was asked; a resume must agree on everything that changes
answers), `rows.jsonl` (one row per answered question, appended and flushed after every batch, so a
killed run loses at most the batch in flight) and, at the end, the report (`report.md`,
`results.json`, `pareto.png`, `categories.png`). Re-running the same command skips every
(system, k, question) already in `rows.jsonl`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol

from pydantic import BaseModel, Field

from tsubasa.eval.judge import Judge, JudgeItem
from tsubasa.eval.locomo import CATEGORY_NAMES, LocomoConversation, LocomoQA, session_events
from tsubasa.eval.metrics import answer_scores
from tsubasa.eval.systems import AnswerSystem, PromptStyle, Question, SystemContext, build_system, system_spec
from tsubasa.llm.base import Engine
from tsubasa.memory.retrieve import Retriever
from tsubasa.memory.store import MemoryStore
from tsubasa.memory.writer import DONE, MemoryWriter

log = logging.getLogger(__name__)

ROWS_FILE, SPEC_FILE, JUDGEMENTS_FILE = "rows.jsonl", "run.json", "judgements.jsonl"
MAX_GROUNDING_CHARS = 4000  # rows keep what the model saw, bounded so the JSONL stays readable


class RunSpec(BaseModel):
    """What a run evaluates. Fields in `ANSWER_FIELDS` must match when a run directory is resumed."""

    systems: list[str]
    ks: list[int] = Field(default_factory=lambda: [3])
    conversations: list[str]
    categories: list[int] = Field(default_factory=lambda: [1, 2, 3, 4])
    limit: int | None = None
    """At most this many questions per conversation (the first ones in file order)."""
    model: str
    prompt_style: PromptStyle = "concise"
    max_new_tokens: int = 24
    context_tokens: int = 4096
    tenant: str = "eval"
    judge: str = "none"
    """Name of the judge that produced J (`local:<model>`, `openai:<model>@<url>`) or `none`."""
    memory_model: str = ""
    """Model that wrote the memory (extraction/evolution); may differ from the answering model."""
    milvus_uri: str = ""

    ANSWER_FIELDS: ClassVar[tuple[str, ...]] = ("model", "prompt_style", "max_new_tokens", "context_tokens",
                                                "tenant", "judge")


class MemoryBackend(Protocol):
    """What the runner needs from the memory side (`tsubasa.memory.runtime.MemorySystem` is one)."""

    @property
    def store(self) -> MemoryStore: ...

    @property
    def retriever(self) -> Retriever: ...

    @property
    def writer(self) -> MemoryWriter: ...


class MemoryModeError(ValueError):
    """The memory mode cannot serve the systems asked for."""


class RunSpecMismatchError(ValueError):
    """The run directory was made with different answer-affecting options."""


def _label(system: str, k: int | None) -> str:
    return system if k is None else f"{system}@k={k}"


def row_key(system: str, k: int | None, qa_id: str) -> str:
    return f"{system}|k={'-' if k is None else k}|{qa_id}"


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    with open(path) as fh:
        for n, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("%s line %d is incomplete (killed mid-write?); ignored", path, n)
    return out


def read_rows(run_dir: str | Path, with_judgements: bool = True) -> list[dict[str, Any]]:
    """Rows of a run (a torn last line, from a kill mid-write, is ignored). Rows answered without a
    judge take their verdict from `judgements.jsonl` (written by `judge_run`) when it has one."""
    rows = _read_jsonl(Path(run_dir) / ROWS_FILE)
    if with_judgements:
        verdicts = {v["key"]: v for v in _read_jsonl(Path(run_dir) / JUDGEMENTS_FILE)}
        for r in rows:
            v = verdicts.get(r["key"])
            if v is not None and not r.get("judge"):
                r.update(judge=v["judge"], judge_label=v["judge_label"], judge_raw=v["judge_raw"],
                         judge_error=v["judge_error"])
    return rows


def _repair_tail(path: Path) -> None:
    """Cut a torn last line so the next append starts on a fresh line."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as fh:
        data = fh.read()
        if data.endswith(b"\n"):
            return
        fh.truncate(data.rfind(b"\n") + 1)


def load_or_create_spec(run_dir: Path, spec: RunSpec) -> RunSpec:
    """Write `run.json` on first use; on resume check the answer-affecting fields agree and merge
    the new systems / ks / conversations into the stored spec."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / SPEC_FILE
    if not path.is_file():
        path.write_text(spec.model_dump_json(indent=2))
        return spec
    old = RunSpec.model_validate_json(path.read_text())
    diffs = [f"{f}: run has {getattr(old, f)!r}, asked {getattr(spec, f)!r}" for f in RunSpec.ANSWER_FIELDS
             if getattr(old, f) != getattr(spec, f)]
    if diffs:
        raise RunSpecMismatchError(f"{run_dir} was started with other options ({'; '.join(diffs)}); "
                                   "use another --run-dir or the original options")
    merged = old.model_copy(update={
        "systems": list(dict.fromkeys(old.systems + spec.systems)),
        "ks": sorted(set(old.ks) | set(spec.ks)),
        "conversations": list(dict.fromkeys(old.conversations + spec.conversations)),
        "categories": sorted(set(old.categories) | set(spec.categories)),
        "limit": spec.limit if old.limit is None or spec.limit is None else max(old.limit, spec.limit),
    })
    path.write_text(merged.model_dump_json(indent=2))
    return merged


def select_questions(conv: LocomoConversation, categories: Iterable[int], limit: int | None) -> list[LocomoQA]:
    """Scored questions of the chosen categories (category 5 never counts), first `limit` in file order."""
    cats = set(categories)
    picked = [q for q in conv.qa if q.scored and q.category in cats]
    return picked[:limit] if limit is not None else picked


@dataclass
class WorkItem:
    system: str
    k: int | None
    conv: LocomoConversation
    qa: LocomoQA

    @property
    def key(self) -> str:
        return row_key(self.system, self.k, self.qa.qa_id)


@dataclass
class RunResult:
    run_dir: Path
    total: int
    skipped: int
    answered: int
    seconds: float
    systems: dict[str, dict[str, Any]] = field(default_factory=dict)


ProgressFn = Callable[[str, int, int], None]
"""(description, done, total) after every batch."""


MemoryMode = Literal["build", "turns", "existing"]
TURN_ONLY_SOURCES = ("full-context", "rag-turns")
"""Systems that read only the raw turn log (they can run before any extraction)."""


def ensure_memory(memory: MemoryBackend, conv: LocomoConversation, tenant: str, user: str,
                  on_session: Callable[[str], None] | None = None, mode: MemoryMode = "build") -> dict[str, int]:
    """Bring the user's store up to date with `conv` through the idempotent writer path.

    `build`: ingest every session not yet processed (turns, observations, evolved memory);
    `turns`: append the raw turns only (no LLM; enough for full-context and rag-turns);
    `existing`: leave the store as it is."""
    done, built = 0, 0
    if mode == "existing":
        return {"sessions_done_before": 0, "sessions_built": 0}
    for sess in conv.sessions:
        state = memory.store.session_state(tenant, user, sess.session_id)
        if (state is not None and state.state == DONE) or (
                mode == "turns" and len(memory.store.session_turns(tenant, user, sess.session_id)) == len(sess.turns)):
            done += 1
            continue
        if on_session:
            on_session(f"{conv.sample_id} {sess.session_id}")
        events = session_events(conv, sess, tenant, user, close=mode == "build")
        if mode == "build":
            memory.writer.ingest(events)
        else:
            memory.writer.append(events)
        built += 1
    return {"sessions_done_before": done, "sessions_built": built}


class LocomoRunner:
    """Evaluate systems on LoCoMo questions into a run directory."""

    def __init__(self, spec: RunSpec, run_dir: str | Path, conversations: list[LocomoConversation],
                 memory: MemoryBackend, judge: Judge | None, *, engine: Engine, batch_size: int = 8,
                 adapter_for: Callable[[str, str], str | None] | None = None) -> None:
        """`engine` answers; `memory.writer` (its own LLM: llama.cpp on a laptop) builds the memory."""
        self.run_dir = Path(run_dir)
        self.spec = load_or_create_spec(self.run_dir, spec)
        self.asked = spec
        self.conversations = conversations
        self.memory = memory
        self.engine = engine
        self.judge = judge
        self.batch_size = batch_size
        self.adapter_for = adapter_for

    def work(self) -> list[WorkItem]:
        """Every (system, k, question) asked for, in the order they run: system by system."""
        items = []
        for name in self.asked.systems:
            ks: list[int | None] = list(self.asked.ks) if system_spec(name).uses_k else [None]
            for k in ks:
                for conv in self.conversations:
                    for qa in select_questions(conv, self.asked.categories, self.asked.limit):
                        items.append(WorkItem(name, k, conv, qa))
        return items

    def _system(self, name: str, k: int | None, cache: dict) -> AnswerSystem:
        key = (name, k)
        if key not in cache:
            ctx = SystemContext(engine=self.engine, store=self.memory.store, retriever=self.memory.retriever,
                                k=k if k is not None else 0, prompt_style=self.asked.prompt_style,
                                max_new_tokens=self.asked.max_new_tokens, context_tokens=self.asked.context_tokens,
                                adapter_for=self.adapter_for)
            cache[key] = build_system(name, ctx)
        return cache[key]

    def run(self, progress: ProgressFn | None = None, memory_mode: MemoryMode = "build",
            on_build: Callable[[str], None] | None = None) -> RunResult:
        """Answer, score and judge every (system, k, question) not yet in rows.jsonl."""
        t_start = time.perf_counter()
        rows_path = self.run_dir / ROWS_FILE
        _repair_tail(rows_path)
        done = {r["key"] for r in read_rows(self.run_dir)}
        items = self.work()
        todo = [it for it in items if it.key not in done]
        skipped = len(items) - len(todo)
        if memory_mode == "turns":
            needy = sorted({it.system for it in todo if it.system not in TURN_ONLY_SOURCES})
            if needy:
                raise MemoryModeError(f"memory mode 'turns' stores raw turns only; {', '.join(needy)} need extracted "
                                 "observations/memories (use 'build' or 'existing')")
        if todo:
            for conv in {it.conv.sample_id: it.conv for it in todo}.values():
                ensure_memory(self.memory, conv, self.asked.tenant, conv.sample_id, on_build, memory_mode)
        systems: dict[tuple[str, int | None], AnswerSystem] = {}
        answered = 0
        if progress:
            progress("resume" if skipped else "start", skipped, len(items))
        with open(rows_path, "a") as fh:
            groups: dict[tuple[str, int | None], list[WorkItem]] = {}
            for it in todo:
                groups.setdefault((it.system, it.k), []).append(it)
            for (name, k), group in groups.items():
                system = self._system(name, k, systems)
                bs = system.batch_size or self.batch_size
                for start in range(0, len(group), bs):
                    batch = group[start:start + bs]
                    rows = self._answer(system, batch)
                    for row in rows:
                        fh.write(json.dumps(row, ensure_ascii=False) + "\n")
                    fh.flush()
                    os.fsync(fh.fileno())
                    answered += len(batch)
                    if progress:
                        progress(_label(name, k), skipped + answered, len(items))
                # After each system, so a run killed later still keeps its facts (prefill, truncation).
                self._record_systems({_label(name, k): system.describe()})
        described = {_label(n, k): s.describe() for (n, k), s in systems.items()}
        return RunResult(self.run_dir, len(items), skipped, answered, time.perf_counter() - t_start, described)

    def _record_systems(self, described: dict[str, dict[str, Any]]) -> None:
        """Keep each system's facts (truncation, prefix cache) from the latest session that ran it."""
        path = self.run_dir / "systems.json"
        data = json.loads(path.read_text()) if path.is_file() else {}
        data.update(described)
        path.write_text(json.dumps(data, indent=2))

    def _answer(self, system: AnswerSystem, batch: list[WorkItem]) -> list[dict[str, Any]]:
        questions = [Question(tenant_id=self.asked.tenant, user_id=it.conv.sample_id, question=it.qa.question,
                              qa_id=it.qa.qa_id) for it in batch]
        answers = system.answer(questions)
        verdicts = (self.judge.judge([JudgeItem(question=it.qa.question, gold=str(it.qa.answer),
                                                prediction=a.prediction) for it, a in zip(batch, answers, strict=True)])
                    if self.judge else [None] * len(batch))
        rows = []
        now = datetime.now(UTC).isoformat(timespec="seconds")
        for it, ans, v in zip(batch, answers, verdicts, strict=True):
            ev = it.qa.evidence
            rows.append({
                "key": it.key, "system": it.system, "k": it.k, "qa_id": it.qa.qa_id,
                "conversation": it.conv.sample_id, "category": it.qa.category,
                "category_name": CATEGORY_NAMES[it.qa.category], "question": it.qa.question,
                "gold": it.qa.answer, "prediction": ans.prediction,
                **answer_scores(ans.prediction, it.qa.answer, it.qa.category),
                "judge_label": v.label if v else None, "judge": v.judge if v else None,
                "judge_raw": v.raw[:500] if v else None, "judge_error": v.error if v else None,
                "grounding_tokens": ans.grounding_tokens, "prompt_tokens": ans.prompt_tokens,
                "completion_tokens": ans.completion_tokens, "latency_s": round(ans.latency_s, 4),
                "evidence": ev,
                "evidence_recall": (sum(e in set(ans.source_ids) for e in ev) / len(ev)) if ev else None,
                "grounding": ans.grounding[:MAX_GROUNDING_CHARS], "grounding_ids": ans.grounding_ids,
                "adapter": ans.adapter, "extra": ans.extra, "model": self.asked.model,
                "store": self.asked.milvus_uri, "at": now,
            })
        return rows


class JudgeMismatchError(ValueError):
    """The run already holds verdicts from another judge."""


def judge_run(run_dir: str | Path, judge: Judge, systems: Iterable[str] | None = None, limit: int | None = None,
              batch_size: int = 8, progress: ProgressFn | None = None) -> tuple[int, int]:
    """Judge the rows of a run that have no verdict yet, after the fact (resumable: verdicts are
    appended to `judgements.jsonl`, one per row key). `limit`: at most this many rows per (system, k).
    One run holds one judge's J; another judge is refused. Returns (judged now, already judged)."""
    run_dir = Path(run_dir)
    path = run_dir / JUDGEMENTS_FILE
    _repair_tail(path)
    rows = read_rows(run_dir)
    others = sorted({r["judge"] for r in rows if r.get("judge") and r["judge"] != judge.name})
    if others:
        raise JudgeMismatchError(f"{run_dir} already has J from {', '.join(others)}; judge it with the same judge "
                                 "or copy the rows to a new run directory")
    wanted = set(systems) if systems else None
    todo, per_group = [], {}
    for r in rows:
        if r.get("judge") or (wanted is not None and r["system"] not in wanted):
            continue
        group = (r["system"], r.get("k"))
        if limit is not None and per_group.get(group, 0) >= limit:
            continue
        per_group[group] = per_group.get(group, 0) + 1
        todo.append(r)
    already = sum(1 for r in rows if r.get("judge"))
    with open(path, "a") as fh:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            verdicts = judge.judge([JudgeItem(question=r["question"], gold=str(r["gold"]),
                                              prediction=r["prediction"]) for r in batch])
            for r, v in zip(batch, verdicts, strict=True):
                fh.write(json.dumps({"key": r["key"], "judge": v.judge, "judge_label": v.label,
                                     "judge_raw": v.raw[:500], "judge_error": v.error}, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
            if progress:
                progress("judge", start + len(batch), len(todo))
    return len(todo), already
