"""Systems under test: each answers LoCoMo questions for a (tenant, user) and reports the grounding it
used and its size in serving-model tokens.

Built in (names as the CLI takes them):

| name | grounding |
| --- | --- |
| `full-context` | the user's whole raw turn log, oldest turns dropped to fit the model window (reported) |
| `rag-turns` | top-k raw utterances (`Retriever` source `turns`) |
| `rag-observations` | top-k extracted observations, never evolved (source `observations`) |
| `memory-static` | TSUBASA memory, static accumulation (see below) |
| `memory-evolving` | TSUBASA evolving memory (ADD/UPDATE/RECONCILE/IGNORE), source `memories` |

Static accumulation appends every observation without evolution, which is exactly the observations
collection; so `memory-static` reads source `observations` but with the memory prompt (context labelled
"Memories", as `memory-evolving`): static vs evolving then differ only in the store, which is the
ablation the paper reports. (With a small answerer the label alone moves answers: on conv-26 with
SmolLM2-135M, half the predictions changed between the two labels over identical grounding.)

Other wings add systems by name with `register_system` (the distillation issue: adapter + grounding,
adapter without grounding, vanilla fine-tuning). A system's LoRA adapter goes through the engine's
`adapters=[name]` argument; `RetrievalSystem(adapter=...)` and `k=0` (no grounding) cover those
variants. Modules listed in `PLUGIN_MODULES` (if installed) and entry points in the group
`tsubasa.eval_systems` are imported on first lookup so they can register themselves. For example,
in `tsubasa/eval/distilled.py`:

    def adapter_for(engine):            # load the user's current adapter once, return its name
        def pick(tenant, user):
            name = f"{tenant}/{user}"
            if name not in engine.loaded_adapters():
                engine.load_adapter(name, registry.current_path(tenant, user))
            return name
        return pick

    register_system("tsubasa-distilled", lambda ctx: RetrievalSystem(
        ctx, "tsubasa-distilled", "memories", adapter=adapter_for(ctx.engine)))      # adapter + k memories
    register_system("adapter-only", lambda ctx: RetrievalSystem(
        ctx, "adapter-only", "memories", k=0, adapter=adapter_for(ctx.engine)), uses_k=False)
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from pydantic import BaseModel, Field

from tsubasa.llm.base import Engine, Messages, SamplingParams, msgs
from tsubasa.memory.retrieve import Retriever, Source
from tsubasa.memory.store import MemoryStore

log = logging.getLogger(__name__)

PromptStyle = Literal["concise", "free"]

ANSWER_SYSTEM_PROMPTS: dict[str, str] = {
    # The reference works' concise answer style ("answer in under 6 words"), our wording.
    "concise": ("You answer questions about people from their past conversations, using only the context "
                "given. Answer in under 6 words. For a question about time, answer with the date or "
                "period. Do not explain."),
    "free": ("You answer questions about people from their past conversations, using only the context "
             "given. Answer briefly and precisely."),
}
CONTEXT_LABELS: dict[str, str] = {
    "turns": "Conversation excerpts", "observations": "Observations", "memories": "Memories",
    "transcript": "Conversation",
}


def answer_messages(question: str, context: str | None, label: str, style: PromptStyle = "concise") -> Messages:
    """The answer prompt: the style's system prompt, then the context (if any) and the question."""
    if style not in ANSWER_SYSTEM_PROMPTS:
        raise ValueError(f"unknown prompt style {style!r}: use {', '.join(ANSWER_SYSTEM_PROMPTS)}")
    body = f"{label}:\n{context}\n\n" if context else ""
    return msgs(("system", ANSWER_SYSTEM_PROMPTS[style]), ("user", f"{body}Question: {question}\nAnswer:"))


class Question(BaseModel):
    """One question for one user."""

    tenant_id: str
    user_id: str
    question: str
    qa_id: str = ""


class Answer(BaseModel):
    """A system's answer and what it cost."""

    prediction: str
    grounding: str = ""
    """The grounding shown to the model (full-context: a one-line summary, not the transcript)."""
    grounding_tokens: int = 0
    """Tokens of grounding in the prompt (serving-model tokenizer)."""
    grounding_ids: list[str] = Field(default_factory=list)
    source_ids: list[str] = Field(default_factory=list)
    """Provenance of the grounding: the source turn ids (LoCoMo `dia_id`s) it covers."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    """Wall seconds to answer this question: retrieval plus its share of the batched generation."""
    adapter: str | None = None
    extra: dict[str, Any] = Field(default_factory=dict)


class AnswerSystem(Protocol):
    name: str
    k: int | None
    """Grounding items retrieved (None: not a top-k system)."""
    batch_size: int | None
    """Preferred questions per call (None: the runner's default)."""

    def answer(self, questions: Sequence[Question]) -> list[Answer]: ...

    def describe(self) -> dict[str, Any]:
        """Facts about the system for the report (source, truncation, prefix cache...)."""
        ...


@dataclass
class SystemContext:
    """What a system factory gets: the shared engine, store and retriever and the run's options."""

    engine: Engine
    store: MemoryStore
    retriever: Retriever
    k: int = 3
    prompt_style: PromptStyle = "concise"
    max_new_tokens: int = 24
    context_tokens: int = 4096
    """Model window for the full-context baseline (prompt plus answer, in tokens)."""
    adapter_for: Callable[[str, str], str | None] | None = None
    """(tenant, user) -> a loaded adapter name, for systems that serve a per-user adapter."""
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(max_new_tokens=self.max_new_tokens, temperature=0.0)


SystemFactory = Callable[[SystemContext], AnswerSystem]


@dataclass
class SystemSpec:
    name: str
    factory: SystemFactory
    description: str
    uses_k: bool = True


_REGISTRY: dict[str, SystemSpec] = {}
PLUGIN_MODULES = ("tsubasa.eval.distilled",)
"""Modules imported (when present) before a lookup, so other wings can register systems."""
_plugins_loaded = False


def register_system(name: str, factory: SystemFactory, *, description: str = "", uses_k: bool = True,
                    replace: bool = False) -> None:
    """Make `factory(ctx)` available as system `name` (the CLI's `--system name`)."""
    if not name or any(c in name for c in ",| \t"):
        raise ValueError(f"system name {name!r} must be non-empty without commas, bars or spaces")
    if name in _REGISTRY and not replace:
        raise ValueError(f"system {name!r} is already registered")
    _REGISTRY[name] = SystemSpec(name, factory, description, uses_k)


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for mod in PLUGIN_MODULES:
        try:
            if importlib.util.find_spec(mod) is not None:
                importlib.import_module(mod)
        except ImportError as exc:  # a broken plugin must not take the built-in systems down
            log.warning("could not import evaluation plugin %s: %s", mod, exc)
    try:
        from importlib.metadata import entry_points

        for ep in entry_points(group="tsubasa.eval_systems"):
            ep.load()
    except Exception as exc:
        log.warning("could not load tsubasa.eval_systems entry points: %s", exc)


def available_systems() -> dict[str, SystemSpec]:
    _load_plugins()
    return dict(_REGISTRY)


def system_spec(name: str) -> SystemSpec:
    specs = available_systems()
    if name not in specs:
        raise KeyError(f"unknown system {name!r}; available: {', '.join(specs)}")
    return specs[name]


def build_system(name: str, ctx: SystemContext) -> AnswerSystem:
    return system_spec(name).factory(ctx)


# ---- retrieval-grounded systems --------------------------------------------------------------


class RetrievalSystem:
    """Answer from the top-k items of one source; optionally through a per-user adapter; k=0 = no grounding."""

    def __init__(self, ctx: SystemContext, name: str, source: Source, k: int | None = None,
                 adapter: Callable[[str, str], str | None] | None = None, label: str | None = None) -> None:
        self.ctx, self.name, self.source = ctx, name, source
        self.label = label or CONTEXT_LABELS[source]
        """How the prompt names the grounding ("Memories", "Observations", ...)."""
        self.k = ctx.k if k is None else k
        self.adapter = adapter
        self.batch_size: int | None = None

    def answer(self, questions: Sequence[Question]) -> list[Answer]:
        prompts, partial = [], []
        for q in questions:
            t0 = time.perf_counter()
            g = (self.ctx.retriever.retrieve(q.tenant_id, q.user_id, q.question, k=self.k, source=self.source)
                 if self.k > 0 else None)
            took = time.perf_counter() - t0
            prompts.append(answer_messages(q.question, g.text if g else None, self.label, self.ctx.prompt_style))
            partial.append((g, took, self.adapter(q.tenant_id, q.user_id) if self.adapter else None))
        adapters = [a for _, _, a in partial]
        t0 = time.perf_counter()
        gens = self.ctx.engine.generate(prompts, self.ctx.sampling,
                                        adapters=adapters if any(adapters) else None)
        share = (time.perf_counter() - t0) / max(len(questions), 1)
        out = []
        for gen, (g, took, adapter) in zip(gens, partial, strict=True):
            out.append(Answer(
                prediction=gen.text, grounding=g.text if g else "", grounding_tokens=g.tokens if g else 0,
                grounding_ids=[it.id for it in g.items] if g else [],
                source_ids=sorted(g.source_ids) if g else [], prompt_tokens=gen.prompt_tokens,
                completion_tokens=gen.completion_tokens, latency_s=took + share, adapter=adapter))
        return out

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "label": self.label, "k": self.k, "adapter": bool(self.adapter)}


# ---- full context ----------------------------------------------------------------------------


@dataclass
class _Transcript:
    text: str
    tokens: int
    full_tokens: int
    turns_kept: int
    turns_total: int
    source_ids: set[str]
    first_session: str
    truncated: bool


class FullContextSystem:
    """The whole raw turn log in the prompt, oldest turns dropped to fit `ctx.context_tokens` (the model
    window, minus the prompt frame, a question allowance and the answer budget). Questions about one
    user share the transcript, so its key/value cache is computed once (`PrefixCachedGenerator`)."""

    QUESTION_ALLOWANCE = 64
    """Tokens kept free for the question (LoCoMo questions are under 40 tokens)."""

    def __init__(self, ctx: SystemContext, name: str = "full-context", prefix_cache: bool = True) -> None:
        from tsubasa.eval.prefix import PrefixCachedGenerator

        self.ctx, self.name, self.k = ctx, name, None
        self.batch_size: int | None = None
        self._cache: dict[tuple[str, str], _Transcript] = {}
        self.generator = PrefixCachedGenerator(ctx.engine) if prefix_cache else None
        self._frame_tokens: int | None = None

    def _budget(self) -> int:
        if self._frame_tokens is None:
            frame = answer_messages("", "", CONTEXT_LABELS["transcript"], self.ctx.prompt_style)
            ids = getattr(self.ctx.engine, "prompt_ids", None)
            self._frame_tokens = (len(ids(frame)) if ids else
                                  sum(self.ctx.engine.count_tokens(m.content) + 4 for m in frame))
        budget = self.ctx.context_tokens - self._frame_tokens - self.QUESTION_ALLOWANCE - self.ctx.max_new_tokens
        if budget < 32:
            raise ValueError(f"context window {self.ctx.context_tokens} tokens leaves no room for a transcript")
        return budget

    def transcript(self, tenant_id: str, user_id: str) -> _Transcript:
        """The newest turns that fit the window, grouped under their session's date."""
        key = (tenant_id, user_id)
        if key in self._cache:
            return self._cache[key]
        turns = self.ctx.store.list_turns(tenant_id, user_id)
        count = self.ctx.engine.count_tokens
        sessions: dict[str, list] = {}
        for t in turns:
            sessions.setdefault(t.session_id, []).append(t)
        # Per session: a header line, then one line per turn; +1 token per line for the newline.
        blocks = []
        for sid, ts in sessions.items():
            header = f"[{sid.replace('_', ' ')}, {ts[0].session_date or ts[0].timestamp.date()}]"
            lines = [(f"{t.speaker}: {t.text}", t.source_id) for t in ts]
            blocks.append((header, count(header) + 1, [(s, src, count(s) + 1) for s, src in lines]))
        full_tokens = sum(h + sum(n for _, _, n in ls) for _, h, ls in blocks)
        budget = self._budget()
        kept: list[tuple[str, list[tuple[str, str]]]] = []
        used, n_kept = 0, 0
        for header, htok, lines in reversed(blocks):
            taken: list[tuple[str, str]] = []
            if used + htok >= budget:
                break
            used += htok
            for text, src, n in reversed(lines):
                if used + n > budget:
                    break
                taken.append((text, src))
                used += n
            if taken:
                kept.append((header, list(reversed(taken))))
                n_kept += len(taken)
            if len(taken) < len(lines):
                break
        kept.reverse()
        text = "\n".join("\n".join([h] + [t for t, _ in ls]) for h, ls in kept)
        tr = _Transcript(text=text, tokens=count(text) if text else 0, full_tokens=full_tokens,
                         turns_kept=n_kept, turns_total=len(turns),
                         source_ids={s for _, ls in kept for _, s in ls},
                         first_session=kept[0][0] if kept else "", truncated=n_kept < len(turns))
        self._cache[key] = tr
        if tr.truncated:
            log.info("full context for %s/%s truncated: %d of %d turns (%d of %d tokens) from %s",
                     tenant_id, user_id, tr.turns_kept, tr.turns_total, tr.tokens, tr.full_tokens, tr.first_session)
        return tr

    def _prompt(self, tr: _Transcript, question: str) -> Messages:
        return answer_messages(question, tr.text or "(empty)", CONTEXT_LABELS["transcript"], self.ctx.prompt_style)

    def answer(self, questions: Sequence[Question]) -> list[Answer]:
        out = []
        for q in questions:
            tr = self.transcript(q.tenant_id, q.user_id)
            prompt = self._prompt(tr, q.question)
            t0 = time.perf_counter()
            if self.generator is not None:
                prefill = self.generator.prefill_s
                # The probes differ only in the question, so their common tokens are the shared prefix.
                self.generator.set_prefix(self._prompt(tr, "A?"), self._prompt(tr, "B?"))
                gen = self.generator.generate([prompt], self.ctx.sampling)[0]
                # The shared prefill is reported once per system (describe()), not in this answer's latency.
                took = time.perf_counter() - t0 - (self.generator.prefill_s - prefill)
            else:
                gen = self.ctx.engine.generate([prompt], self.ctx.sampling)[0]
                took = time.perf_counter() - t0
            summary = (f"transcript: {tr.turns_kept}/{tr.turns_total} turns from {tr.first_session}, "
                       f"{tr.tokens}/{tr.full_tokens} tokens")
            out.append(Answer(
                prediction=gen.text, grounding=summary, grounding_tokens=tr.tokens, source_ids=sorted(tr.source_ids),
                prompt_tokens=gen.prompt_tokens, completion_tokens=gen.completion_tokens, latency_s=took,
                extra={"truncated": tr.truncated, "full_tokens": tr.full_tokens, "turns_kept": tr.turns_kept,
                       "turns_total": tr.turns_total}))
        return out

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"source": "transcript", "context_tokens": self.ctx.context_tokens}
        if self.generator is not None:
            d.update(prefix_cache=self.generator.supported, shared_prefill_s=round(self.generator.prefill_s, 2),
                     cached_answers=self.generator.cached_calls, uncached_answers=self.generator.fallback_calls)
        return d


register_system("full-context", lambda ctx: FullContextSystem(ctx), uses_k=False,
                description="whole raw history, oldest turns dropped to fit the model window")
register_system("rag-turns", lambda ctx: RetrievalSystem(ctx, "rag-turns", "turns"),
                description="top-k raw utterances")
register_system("rag-observations", lambda ctx: RetrievalSystem(ctx, "rag-observations", "observations"),
                description="top-k extracted observations (no evolution)")
register_system("memory-static",
                lambda ctx: RetrievalSystem(ctx, "memory-static", "observations", label=CONTEXT_LABELS["memories"]),
                description="TSUBASA static accumulation (every observation appended; memory prompt)")
register_system("memory-evolving", lambda ctx: RetrievalSystem(ctx, "memory-evolving", "memories"),
                description="TSUBASA evolving memory (ADD/UPDATE/RECONCILE/IGNORE)")

BUILTIN_SYSTEMS = ("full-context", "rag-turns", "rag-observations", "memory-static", "memory-evolving")
