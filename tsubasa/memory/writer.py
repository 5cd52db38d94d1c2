"""The one write path: events -> raw turn log -> (on session close) observations -> evolved memory.

Used by the CLI, the gateway's `/v1/events` and the Kafka ingest actors alike. Every step is
idempotent: turns are keyed by event id, observations by (session, speaker, index), memory
versions by (memory, version); a session marked `done` is never sent to the LLM again, and a session
marked `extracted` resumes evolution from its stored observations and decisions.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from tsubasa.config import MemoryConfig
from tsubasa.embed import Embedder
from tsubasa.llm.base import Engine
from tsubasa.memory.evolve import MemoryManager
from tsubasa.memory.observe import ObservationExtractor
from tsubasa.memory.store import MemoryStore, StoredObservation
from tsubasa.schema import Event, EventKind, EvolutionDecision, EvolutionOp, Turn

log = logging.getLogger(__name__)

EXTRACTED, DONE = "extracted", "done"


@dataclass
class AppendResult:
    received: int = 0
    new_turns: int = 0
    closed_sessions: list[tuple[str, str, str]] = field(default_factory=list)
    """(tenant, user, session) named by session-end events."""


@dataclass
class SessionResult:
    tenant_id: str
    user_id: str
    session_id: str
    skipped: bool = False
    observations: int = 0
    ops: dict[str, int] = field(default_factory=dict)
    fallbacks: int = 0


class MemoryWriter:
    def __init__(self, store: MemoryStore, embedder: Embedder, engine: Engine | None,
                 cfg: MemoryConfig | None = None) -> None:
        self.store = store
        self.embedder = embedder
        self.cfg = cfg or MemoryConfig()
        self.extractor = ObservationExtractor(engine, embedder, self.cfg) if engine is not None else None
        self.manager = MemoryManager(store, embedder, engine, self.cfg)

    def append(self, events: Sequence[Event]) -> AppendResult:
        """Store turn events durably (idempotent by event id; embedded only with
        `memory.embed_turns_on_ingest`). Session-end events are reported, not processed: the caller
        decides when to run `process_session` (it may be slow)."""
        res = AppendResult(received=len(events))
        turns: list[Turn] = []
        for i, ev in enumerate(events):
            if ev.kind == EventKind.SESSION_END:
                res.closed_sessions.append((ev.tenant_id, ev.user_id, ev.session_id))
            else:
                turns.append(ev.to_turn(seq=i))
        if turns:
            # Raw turns are embedded on demand (turn search fills them); the memory path never reads them.
            embed = self.cfg.embed_turns_on_ingest or not self.store.turn_flags
            res.new_turns = self.store.upsert_turns(turns, embed=self.embedder.embed if embed else None)
        return res

    def process_session(self, tenant_id: str, user_id: str, session_id: str) -> SessionResult:
        """Extract and evolve one closed session; a no-op if it was already processed."""
        res = SessionResult(tenant_id, user_id, session_id)
        state = self.store.session_state(tenant_id, user_id, session_id)
        if state is not None and state.state == DONE:
            res.skipped = True
            return res
        if state is None:
            if self.extractor is None:
                raise RuntimeError("processing a session needs an LLM engine")
            turns = self.store.session_turns(tenant_id, user_id, session_id)
            obs, _ = self.extractor.extract(turns)
            if obs:
                self.store.upsert_observations(obs, self.embedder.embed([o.text for o in obs]))
            self.store.set_session_state(tenant_id, user_id, session_id, EXTRACTED, len(obs))
        before = self.manager.stats.ops.copy(), self.manager.stats.fallbacks
        stored = self.store.session_observations(tenant_id, user_id, session_id)
        self._evolve(stored)
        self.store.set_session_state(tenant_id, user_id, session_id, DONE, len(stored))
        res.observations = len(stored)
        res.ops = dict(self.manager.stats.ops - before[0])
        res.fallbacks = self.manager.stats.fallbacks - before[1]
        return res

    def _evolve(self, stored: list[StoredObservation]) -> None:
        """Decide a session's pending observations in one batch (decisions persisted before any is
        applied: a replay never asks the LLM again), then apply them in order."""
        pending = [so for so in stored if not so.applied]
        # memories changed by this session's already-applied observations (non-empty only on replay)
        touched = {v.memory_id for so in stored if so.applied
                   for v in [self.store.history_for_observation(so.observation.tenant_id, so.observation.user_id,
                                                                so.observation.observation_id)] if v}
        undecided = []
        for i, so in enumerate(pending):
            if so.decision is not None:
                continue
            dup = None if self.cfg.mode == "static" else next(
                (p for p in pending[:i] if float(p.vector @ so.vector) >= self.cfg.ignore_above_similarity), None)
            if dup is not None:  # a near-copy of an earlier observation of the same session
                so.decision = EvolutionDecision(op=EvolutionOp.IGNORE, auto=True, reason="duplicate in session")
                self.store.record_decision(so.observation, so.vector, so.decision, applied=False)
            else:
                undecided.append(so)
        for so, (decision, _) in zip(undecided, self.manager.decide_many(
                [(so.observation, so.vector) for so in undecided]), strict=True):
            so.decision = decision
            self.store.record_decision(so.observation, so.vector, decision, applied=False)
        for so in pending:
            decision = so.decision
            assert decision is not None
            if decision.target_memory_id in touched:  # an earlier observation changed it: decide afresh
                decision, _ = self.manager.decide(so.observation, so.vector)
                self.store.record_decision(so.observation, so.vector, decision, applied=False)
            rec = self.manager.apply(so.observation, so.vector, decision)
            if rec is not None:
                touched.add(rec.memory_id)
            self.store.record_decision(so.observation, so.vector, decision, applied=True)

    def process_open_sessions(self, tenant_id: str, user_id: str, keep_latest_open: bool = False,
                              ) -> list[SessionResult]:
        """Process every unprocessed session of a user in order (optionally leaving the newest open)."""
        sessions = self.store.open_sessions(tenant_id, user_id)
        if keep_latest_open:
            sessions = sessions[:-1]
        return [self.process_session(tenant_id, user_id, s) for s in sessions]

    def ingest(self, events: Iterable[Event]) -> tuple[AppendResult, list[SessionResult]]:
        """Append events, then process the sessions they closed, in order."""
        events = list(events)
        appended = self.append(events)
        results = [self.process_session(*key) for key in dict.fromkeys(appended.closed_sessions)]
        return appended, results
