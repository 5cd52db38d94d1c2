"""Teacher targets: the frozen base model sees the rich context (the QA's source session and many
of the user's memories, within a token budget) and the question; for every answer token only the
top-d token ids and log-probs are kept (d_max of the run; any smaller d is a prefix, because the
candidates are sorted). The student's grounding (top-k memories for the question) is retrieved here
too, so one `UserDataset` holds everything a training worker needs, as plain JSON-able data.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from datetime import datetime

import numpy as np
from pydantic import BaseModel, Field

from tsubasa.config import DistillConfig
from tsubasa.distill.prompts import PROMPT_VERSION, teacher_messages
from tsubasa.distill.synth import CorpusMemory, UserCorpus, split_heldout
from tsubasa.embed import Embedder
from tsubasa.llm.base import ChatMessage, Engine, SamplingParams
from tsubasa.schema import QAPair

log = logging.getLogger(__name__)

ID_BYTES = 4  # int32 token id
VALUE_BYTES = 4  # float32 log-prob


def target_bytes_per_token(d: int, vocab_size: int, id_bytes: int = ID_BYTES,
                           value_bytes: int = VALUE_BYTES) -> dict[str, float]:
    """Storage per answer token: top-d (ids + log-probs) vs a full float32 distribution."""
    topd = d * (id_bytes + value_bytes)
    full = vocab_size * value_bytes
    return {"topd_bytes": float(topd), "full_bytes": float(full), "ratio": full / topd}


class MemoryIndex:
    """Exact cosine top-k over one user's memories (the vectors Milvus holds: embed(memory.text)),
    so grounding can be computed away from the database, in a Ray actor."""

    def __init__(self, memories: Sequence[CorpusMemory], embedder: Embedder) -> None:
        self.memories = list(memories)
        self.embedder = embedder
        self.vecs = embedder.embed([m.text for m in self.memories]) if self.memories else None

    def top(self, query: str, k: int) -> list[CorpusMemory]:
        if k <= 0 or self.vecs is None:
            return []
        scores = self.vecs @ self.embedder.embed([query])[0]
        order = np.argsort(-scores, kind="stable")[:k]
        return [self.memories[i] for i in order]


class QATargets(BaseModel):
    """One QA pair with the student's grounding and the teacher's top-d targets on its answer."""

    qa: QAPair
    heldout: bool = False
    grounding: list[str] = Field(default_factory=list)
    """Top-k memories retrieved for the question, as shown to the student (k = distill.grounding_k)."""
    answer: str
    """The continuation the teacher scored (gold answer or the teacher's own greedy answer)."""
    answer_ids: list[int]
    """Its tokens, EOS included; the student is trained on exactly these positions."""
    gold_ids: list[int]
    topd_ids: list[list[int]]
    topd_logprobs: list[list[float]]
    teacher_tokens: int = 0
    """Prompt size the teacher saw."""
    teacher_prompt: list[ChatMessage] | None = None
    """The teacher's rich prompt, kept for held-out items (internalisation measure)."""


class UserDataset(BaseModel):
    tenant_id: str
    user_id: str
    base_model: str
    d: int
    items: list[QATargets]
    corpus_hash: str
    memory_watermark: datetime | None = None
    stats: dict[str, float] = Field(default_factory=dict)
    vanilla_texts: list[str] = Field(default_factory=list)
    """Raw conversation, one string per session (vanilla fine-tuning baseline)."""

    @property
    def train(self) -> list[QATargets]:
        return [x for x in self.items if not x.heldout]

    @property
    def heldout(self) -> list[QATargets]:
        return [x for x in self.items if x.heldout]

    @property
    def data_hash(self) -> str:
        return hashlib.sha256(self.model_dump_json(exclude={"stats"}).encode()).hexdigest()[:16]

    @property
    def split_hash(self) -> str:
        """Hash of the QA pairs and which are held out, independent of the teacher's top-d: two
        datasets of one user with the same split_hash train on the same questions (an adapter
        trained on one may be measured on the other's held-out questions)."""
        pairs = sorted((x.qa.model_dump_json(), x.heldout) for x in self.items)
        return hashlib.sha256(repr(pairs).encode()).hexdigest()[:16]


def _fit_lines(lines: Sequence[str], count: Callable[[str], int], budget: int,
               anchors: Sequence[int] = ()) -> list[str]:
    """Keep lines within `budget` tokens: the anchors first, then growing outward from them."""
    if not lines:
        return []
    sizes = [count(line) + 1 for line in lines]
    if sum(sizes) <= budget:
        return list(lines)
    order: list[int] = []
    seeds = sorted({a for a in anchors if 0 <= a < len(lines)}) or [0]
    for radius in range(len(lines)):
        for a in seeds:
            for i in (a - radius, a + radius):
                if 0 <= i < len(lines) and i not in order:
                    order.append(i)
    picked, used = set(), 0
    for i in order:
        if used + sizes[i] > budget:
            continue
        picked.add(i)
        used += sizes[i]
    return [lines[i] for i in sorted(picked)]


class TeacherContext:
    """Builds the teacher's rich prompt for a QA pair of one user."""

    def __init__(self, corpus: UserCorpus, index: MemoryIndex, cfg: DistillConfig,
                 count_tokens: Callable[[str], int]) -> None:
        self.corpus = corpus
        self.index = index
        self.cfg = cfg
        self.count = count_tokens
        self.sessions = corpus.sessions()
        self.session_of = corpus.session_of()

    def messages(self, qa: QAPair) -> list[ChatMessage]:
        budget = self.cfg.teacher_context_tokens
        mems = [m.shown for m in self.index.top(qa.question, self.cfg.teacher_memories)]
        mems = _fit_lines(mems, self.count, budget // 3)
        used = sum(self.count(m) + 3 for m in mems)
        session_ids = list(dict.fromkeys(([qa.session_id] if qa.session_id else []) +
                                         [self.session_of[s] for s in qa.source_ids if s in self.session_of]))
        lines: list[str] = []
        anchors: list[int] = []
        for sid in session_ids:
            for t in self.sessions.get(sid, []):
                if t.source_id in qa.source_ids:
                    anchors.append(len(lines))
                lines.append(f"[{t.session_date}] {t.speaker}: {t.text}")
        transcript = "\n".join(_fit_lines(lines, self.count, max(0, budget - used), anchors))
        return teacher_messages(qa.question, transcript, mems)


def build_user_dataset(
    engine: Engine,
    embedder: Embedder,
    corpus: UserCorpus,
    qas: Sequence[QAPair],
    cfg: DistillConfig,
    d: int,
    on_progress: Callable[[int, int], None] | None = None,
    batch_size: int = 8,
    done: Sequence[QATargets] = (),
    on_batch: Callable[[list[QATargets]], None] | None = None,
) -> UserDataset:
    """Teacher top-`d` targets, student grounding and the held-out split for a user's QA pairs.

    `done`: the items an interrupted run of the same call finished (`on_batch` is handed the items so
    far after every batch, to save them); the longest prefix of them that matches the QA pairs in
    order is kept and the teacher goes on from there."""
    index = MemoryIndex(corpus.memories, embedder)
    ctx = TeacherContext(corpus, index, cfg, engine.count_tokens)
    train, held = split_heldout(qas, cfg.heldout_fraction)
    held_ids = {q.qa_id for q in held}
    ordered = list(qas)
    items: list[QATargets] = []
    for it, q in zip(done, ordered, strict=False):
        if it.qa.qa_id != q.qa_id or it.heldout != (q.qa_id in held_ids):
            break
        items.append(it)
    for start in range(len(items), len(ordered), batch_size):
        batch = ordered[start:start + batch_size]
        prompts = [ctx.messages(q) for q in batch]
        if cfg.teacher_answer == "teacher":
            gens = engine.generate(prompts, SamplingParams(max_new_tokens=cfg.max_answer_words * 3))
            answers = [g.text or q.answer for g, q in zip(gens, batch, strict=True)]
        else:
            answers = [q.answer for q in batch]
        scores = engine.score_topd(prompts, answers, d=d, append_eos=True)
        gold = (scores if cfg.teacher_answer == "gold"
                else engine.score_topd(prompts, [q.answer for q in batch], d=1, append_eos=True))
        for q, prompt, ans, s, g in zip(batch, prompts, answers, scores, gold, strict=True):
            items.append(QATargets(
                qa=q, heldout=q.qa_id in held_ids,
                grounding=[m.shown for m in index.top(q.question, cfg.grounding_k)],
                answer=ans, answer_ids=s.token_ids.tolist(), gold_ids=g.token_ids.tolist(),
                topd_ids=s.topd_ids.tolist(), topd_logprobs=np.round(s.topd_logprobs, 6).tolist(),
                teacher_tokens=sum(engine.count_tokens(m.content) for m in prompt),
                teacher_prompt=prompt if q.qa_id in held_ids else None))
        if on_batch:
            on_batch(items)
        if on_progress:
            on_progress(len(items), len(ordered))
    n_tok = sum(len(x.answer_ids) for x in items)
    stats = {"qa": float(len(items)), "train": float(len(train)), "heldout": float(len(held)),
             "answer_tokens": float(n_tok),
             "teacher_prompt_tokens_mean": float(np.mean([x.teacher_tokens for x in items])) if items else 0.0}
    vanilla = ["\n".join(f"[{t.session_date}] {t.speaker}: {t.text}" for t in turns)
               for turns in corpus.sessions().values()]
    return UserDataset(tenant_id=corpus.tenant_id, user_id=corpus.user_id, base_model=engine.model_name, d=d,
                       items=items, corpus_hash=corpus.content_hash, memory_watermark=corpus.memory_watermark,
                       stats=stats, vanilla_texts=vanilla)


def dataset_cache_key(corpus: UserCorpus, qas: Sequence[QAPair], model_name: str, cfg: DistillConfig,
                      d: int) -> str:
    from tsubasa.schema import stable_id

    fields = cfg.model_dump_json(include={"teacher_answer", "teacher_context_tokens", "teacher_memories",
                                          "grounding_k", "heldout_fraction"})
    return stable_id(corpus.content_hash, model_name, fields, str(d), str(PROMPT_VERSION),
                     *[q.qa_id for q in qas])[:20]
