"""Memory manager: for each new observation, retrieve the user's most similar memories, ask the LLM
for one operation (ADD / UPDATE i / RECONCILE i / IGNORE) and apply it as a new version.

Nothing is destroyed: every version goes to the history collection. A decision that cannot be
parsed never loses the observation: it is ADDed and counted as a fallback.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np

from tsubasa.config import MemoryConfig
from tsubasa.embed import Embedder
from tsubasa.llm.base import Engine, SamplingParams, msgs
from tsubasa.memory import prompts
from tsubasa.memory.dates import human_date
from tsubasa.memory.guards import content_words
from tsubasa.memory.store import MemoryStore
from tsubasa.schema import EvolutionDecision, EvolutionOp, MemoryRecord, Observation, stable_id

log = logging.getLogger(__name__)

_OP = re.compile(r"\b(ADD|UPDATE|RECONCILE|IGNORE)\b(?:\s*(?:memory|entry|#|\(|:|=|n)?\s*(\d+))?", re.I)
_MEMORY = re.compile(r"^\s*(?:MEMORY|TEXT|MERGED|RECONCILED)\s*[:=]\s*(.*)$", re.I | re.S | re.M)


def dated(text: str, when) -> str:
    """A memory or observation as the manager LLM sees it; dates written as people write them, so
    merged and reconciled texts carry "7 May 2023", not "2023-05-07"."""
    return f"[{human_date(when)}] {text}" if when else text


def _norm(text: str) -> str:
    return re.sub(r"\W+", " ", text.lower()).strip()


_DATES = re.compile(r"\b\d{1,2} (?:January|February|March|April|May|June|July|August|September|October|November|"
                    r"December) \d{4}\b|\b\d{4}-\d{2}-\d{2}\b|\b(?:19|20)\d{2}\b")
_DATE_TAG = re.compile(r"\[(?:\d{1,2} [A-Z][a-z]+ \d{4}|\d{4}-\d{2}-\d{2})\]\s*")


def merge_problem(merged: str, old: str, new: str, keep: float = 0.5, support: float = 0.8) -> str | None:
    """Why an UPDATE/RECONCILE text is unusable, or None. It must keep most of the old memory
    (nothing destroyed), carry most of the observation (nothing ignored) and add nothing that is in
    neither (a small manager invents or splices in other memories)."""
    m, o, n = (content_words(_DATES.sub(" ", t)) for t in (merged, old, new))
    if not m:
        return "empty merge"
    if o and len(m & o) / len(o) < keep:
        return "drops the old memory"
    if n and len(m & n) / len(n) < keep:
        return "drops the observation"
    if len(m & (o | n)) / len(m) < support:
        return "adds what neither says"
    return None


def parse_decision(raw: str, n_candidates: int) -> EvolutionDecision | None:
    """Parse an evolution reply (text format or JSON); None if no usable operation is found."""
    if not isinstance(raw, str) or not raw.strip():
        return None
    op_s, target, text = None, None, ""
    start, end = raw.find("{"), raw.rfind("}")
    if start >= 0 and end > start:
        try:
            obj = json.loads(raw[start:end + 1])
            if isinstance(obj, dict):
                op_s = str(obj.get("operation") or obj.get("op") or obj.get("event") or "")
                t = obj.get("index", obj.get("target", obj.get("id")))
                target = int(t) if t not in (None, "") and str(t).strip().isdigit() else None
                text = str(obj.get("memory") or obj.get("text") or "")
        except (ValueError, TypeError):
            op_s = None
    if not op_s:
        head = raw
        if (m := re.search(r"OPERATION\s*[:=]\s*(.*)", raw, re.I)) is not None:
            head = m.group(1)
        m = _OP.search(head) or _OP.search(raw)
        if not m:
            return None
        op_s, target = m.group(1), int(m.group(2)) if m.group(2) else None
        if (mm := _MEMORY.search(raw)) is not None:
            text = mm.group(1).strip().splitlines()[0].strip() if mm.group(1).strip() else ""
    else:
        m = _OP.search(op_s)
        if not m:
            return None
        op_s = m.group(1)
        if target is None and m.group(2):
            target = int(m.group(2))
    op = EvolutionOp(op_s.upper())
    text = text.strip().strip('"').strip()
    if op in (EvolutionOp.UPDATE, EvolutionOp.RECONCILE):
        if target is None or not 1 <= target <= n_candidates:
            return None
    else:
        target = None
    return EvolutionDecision(op=op, target=target, text=text)


@dataclass
class EvolutionStats:
    ops: Counter = field(default_factory=Counter)
    fallbacks: int = 0
    auto: int = 0
    llm_calls: int = 0


class MemoryManager:
    """Applies one evolution operation per observation to a user's memory store."""

    def __init__(self, store: MemoryStore, embedder: Embedder, engine: Engine | None,
                 cfg: MemoryConfig | None = None) -> None:
        self.store = store
        self.embedder = embedder
        self.engine = engine
        self.cfg = cfg or MemoryConfig()
        self.stats = EvolutionStats()

    # ---- deciding -----------------------------------------------------------------------------
    def candidates(self, obs: Observation, vector: np.ndarray) -> list[MemoryRecord]:
        """The nearest memories the manager may change. When the observation names its speaker, only
        memories naming that speaker: a conversation's user holds memories about several people, and
        a 1.5B manager merged one person's fact into another's memory (measured on LoCoMo conv-26)."""
        cands = self.store.search_memories(obs.tenant_id, obs.user_id, vector, self.cfg.evolve_candidates)
        name = obs.speaker.split()[0].lower() if obs.speaker.strip() else ""
        if name and re.search(rf"\b{re.escape(name)}\b", obs.text.lower()):
            cands = [m for m in cands if re.search(rf"\b{re.escape(name)}\b", m.text.lower())]
        return cands

    def _shortcut(self, cands: Sequence[MemoryRecord]) -> EvolutionDecision | None:
        """Decisions that need no LLM: static mode, empty memory, clearly new or clearly known."""
        if self.cfg.mode == "static" or not cands:
            return EvolutionDecision(op=EvolutionOp.ADD, auto=True, reason="static" if cands else "empty")
        best = cands[0].score or 0.0
        if best < self.cfg.add_below_similarity:
            return EvolutionDecision(op=EvolutionOp.ADD, auto=True, reason=f"nearest {best:.2f}")
        if best >= self.cfg.ignore_above_similarity:
            return EvolutionDecision(op=EvolutionOp.IGNORE, auto=True, reason=f"nearest {best:.2f}")
        if self.engine is None:
            return EvolutionDecision(op=EvolutionOp.ADD, fallback=True, reason="no engine")
        return None

    def decide(self, obs: Observation, vector: np.ndarray) -> tuple[EvolutionDecision, list[MemoryRecord]]:
        return self.decide_many([(obs, vector)])[0]

    def decide_many(self, items: Sequence[tuple[Observation, np.ndarray]],
                    ) -> list[tuple[EvolutionDecision, list[MemoryRecord]]]:
        """Decide several observations against the memory as it is now, with one batched LLM call.

        The caller applies them in order and re-decides one whose target an earlier one changed."""
        out: list[tuple[EvolutionDecision, list[MemoryRecord]] | None] = [None] * len(items)
        asks: list[tuple[int, Observation, list[MemoryRecord]]] = []
        for i, (obs, vector) in enumerate(items):
            cands = self.candidates(obs, vector)
            d = self._shortcut(cands)
            if d is None:
                asks.append((i, obs, cands))
            else:
                out[i] = (d, cands)
        if asks:
            last = self.cfg.candidate_order == "nearest_last"
            prompts_ = [msgs(("system", prompts.DECIDE_SYSTEM), ("user", prompts.DECIDE_USER.format(
                candidates="\n".join(f"{j}. {dated(m.text, m.event_date)}"
                                     for j, m in enumerate(cands[::-1] if last else cands, 1)),
                observation=dated(obs.text, obs.event_date)))) for _, obs, cands in asks]
            self.stats.llm_calls += len(asks)
            replies = self.engine.generate(prompts_, SamplingParams(max_new_tokens=self.cfg.decide_max_new_tokens))
            for (i, obs, cands), reply in zip(asks, replies, strict=True):
                d = parse_decision(reply.text, len(cands))
                if last and d is not None and d.target is not None:  # the number as listed -> nearest-first
                    d.target = len(cands) + 1 - d.target
                d = self._checked(d, obs, cands, reply.text)
                if d.target is not None:
                    d.target_memory_id = cands[d.target - 1].memory_id
                out[i] = (d, cands)
        return [o for o in out if o is not None]

    def _checked(self, d: EvolutionDecision | None, obs: Observation, cands: Sequence[MemoryRecord],
                 raw: str) -> EvolutionDecision:
        if d is None:
            log.warning("unparseable evolution reply, observation ADDed: %r", raw[:200])
            return EvolutionDecision(op=EvolutionOp.ADD, fallback=True, reason="unparseable")
        if d.op == EvolutionOp.RECONCILE and len(d.text.split()) < 4:
            old = cands[d.target - 1]  # type: ignore[operator]
            before = human_date(old.event_date) if old.event_date else "an earlier date"
            after = human_date(obs.event_date) if obs.event_date else "a later date"
            d.text = f"On {before} {old.text.rstrip('.')}; on {after} {obs.text}"
            d.reason = "narrative composed from both states"
        if d.op == EvolutionOp.UPDATE and len(d.text.split()) < 4:
            return EvolutionDecision(op=EvolutionOp.ADD, fallback=True, reason="UPDATE without text")
        if d.target is not None:
            d.text = _DATE_TAG.sub("", d.text).strip()
            near = cands[d.target - 1].score
            if self.cfg.guards and near is not None and near < self.cfg.merge_min_similarity:
                return EvolutionDecision(op=EvolutionOp.ADD, fallback=True,
                                         reason=f"{d.op.value}: target similarity {near:.2f}")
            if self.cfg.guards and (why := merge_problem(d.text, cands[d.target - 1].text, obs.text)) is not None:
                return EvolutionDecision(op=EvolutionOp.ADD, fallback=True, reason=f"{d.op.value}: {why}")
        if d.target is not None and any(_norm(d.text) == _norm(m.text)
                                        for j, m in enumerate(cands, 1) if j != d.target):
            # the merged text already is another memory: two memories would say the same thing
            return EvolutionDecision(op=EvolutionOp.IGNORE, reason=f"{d.op.value} text equals another memory")
        return d

    # ---- applying -----------------------------------------------------------------------------
    def apply(self, obs: Observation, vector: np.ndarray, decision: EvolutionDecision,
              cands: Sequence[MemoryRecord] | None = None) -> MemoryRecord | None:
        """Apply `decision` (idempotent: an observation already in history is not applied twice)."""
        self.stats.ops[decision.op.value] += 1
        self.stats.fallbacks += int(decision.fallback)
        self.stats.auto += int(decision.auto)
        if decision.op == EvolutionOp.IGNORE:
            return None
        done = self.store.history_for_observation(obs.tenant_id, obs.user_id, obs.observation_id)
        if done is not None:
            return self._repair(obs, done)
        now = datetime.now(UTC)
        if decision.op == EvolutionOp.ADD:
            rec = MemoryRecord(
                memory_id=stable_id(obs.tenant_id, obs.user_id, obs.observation_id, prefix="m"),
                tenant_id=obs.tenant_id, user_id=obs.user_id, text=obs.text, version=1, created_at=now,
                updated_at=now, last_op=EvolutionOp.ADD, source_ids=list(obs.source_ids),
                observation_ids=[obs.observation_id], event_date=obs.event_date)
            self.store.write_memory(rec, vector, EvolutionOp.ADD, obs.observation_id)
            return rec
        target_id = decision.target_memory_id
        if target_id is None:
            cands = cands if cands is not None else self.candidates(obs, vector)
            target_id = cands[decision.target - 1].memory_id  # type: ignore[operator]
        current = self.store.get_memory(obs.tenant_id, obs.user_id, target_id)
        if current is None:  # the target vanished (forgotten meanwhile): keep the observation
            return self.apply(obs, vector, EvolutionDecision(op=EvolutionOp.ADD, fallback=True,
                                                             reason="target missing"))
        base = current[0]
        dates = [d for d in (base.event_date, obs.event_date) if d]
        rec = base.model_copy(update={
            "text": decision.text, "version": base.version + 1, "updated_at": now, "last_op": decision.op,
            "source_ids": list(dict.fromkeys([*base.source_ids, *obs.source_ids])),
            "observation_ids": [*base.observation_ids, obs.observation_id],
            "event_date": max(dates) if dates else None, "score": None})
        self.store.write_memory(rec, self.embedder.embed([rec.text])[0], decision.op, obs.observation_id)
        return rec

    def _repair(self, obs: Observation, version) -> MemoryRecord | None:
        """A replay found this observation in history: make sure the current row caught up."""
        current = self.store.get_memory(obs.tenant_id, obs.user_id, version.memory_id)
        if current and current[0].version >= version.version:
            return current[0]
        vec = self.embedder.embed([version.text])[0]
        if current is None:
            rec = MemoryRecord(memory_id=version.memory_id, tenant_id=obs.tenant_id, user_id=obs.user_id,
                               text=version.text, version=version.version, created_at=version.at,
                               updated_at=version.at, last_op=version.op, source_ids=list(obs.source_ids),
                               observation_ids=[obs.observation_id], event_date=obs.event_date)
        else:
            base = current[0]
            rec = base.model_copy(update={
                "text": version.text, "version": version.version, "updated_at": version.at,
                "last_op": version.op, "source_ids": list(dict.fromkeys([*base.source_ids, *obs.source_ids])),
                "observation_ids": [*base.observation_ids, obs.observation_id]})
        self.store.write_memory(rec, vec, version.op, obs.observation_id)
        return rec

    def evolve(self, obs: Observation, vector: np.ndarray) -> EvolutionDecision:
        decision, cands = self.decide(obs, vector)
        self.apply(obs, vector, decision, cands)
        return decision
