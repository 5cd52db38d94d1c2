"""The inspector's logic, free of HTTP: read-only views of what is stored about a tenant's users,
built from the memory store, the adapter registry and the chat path's own retrieval. Every method is
blocking (Milvus, registry I/O) and takes an already authorised tenant and validated user."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

from services.serve.errors import APIError
from services.serve.inspector.protocol import (
    AdapterPage,
    AdapterView,
    DecisionView,
    MemoryDetail,
    MemoryPage,
    MemorySummary,
    ObservationView,
    SearchHit,
    SearchRequest,
    SearchResponse,
    SessionDetail,
    SessionPage,
    SessionSummary,
    TurnView,
    UserPage,
    UserSummary,
    VersionView,
)
from services.serve.protocol import TsubasaOptions
from services.serve.serving import GatewayService
from tsubasa.memory.store import SessionInfo, StoredObservation
from tsubasa.schema import InvalidIdentifierError, MemoryRecord, MemoryVersion, Turn, validate_identifier


def page_of(items: Sequence[Any], limit: int, offset: int) -> tuple[list[Any], dict[str, int | None]]:
    """`items[offset:offset+limit]` and the Page fields describing it."""
    end = offset + limit
    return list(items[offset:end]), {"total": len(items), "limit": limit, "offset": offset,
                                     "next_offset": end if end < len(items) else None}


def checked_id(value: str, param: str) -> str:
    try:
        return validate_identifier(value, param)
    except InvalidIdentifierError as exc:
        raise APIError(400, str(exc), f"invalid_{param}", param) from None


def turn_view(t: Turn) -> TurnView:
    return TurnView(event_id=t.event_id, source_id=t.source_id, session_id=t.session_id, session_date=t.session_date,
                    speaker=t.speaker, text=t.text, timestamp=t.timestamp)


def observation_view(s: StoredObservation, written: dict[str, MemoryVersion]) -> ObservationView:
    o, d = s.observation, s.decision
    v = written.get(o.observation_id)
    return ObservationView(
        id=o.observation_id, session_id=o.session_id, speaker=o.speaker, text=o.text, event_date=o.event_date,
        report_date=o.report_date, source_ids=o.source_ids, attributed=o.attributed, applied=s.applied,
        decision=DecisionView(op=d.op, target_memory_id=d.target_memory_id, text=d.text, fallback=d.fallback,
                              auto=d.auto, reason=d.reason) if d else None,
        memory_id=v.memory_id if v else None, memory_version=v.version if v else None)


def session_summary(s: SessionInfo) -> SessionSummary:
    return SessionSummary(session_id=s.session_id, session_date=s.session_date, turns=s.turns,
                          observations=s.observations, state=s.state, first_at=s.first_at,  # type: ignore[arg-type]
                          last_at=s.last_at)


def memory_summary(m: MemoryRecord, versions: int) -> MemorySummary:
    return MemorySummary(id=m.memory_id, text=m.text, event_date=m.event_date, last_op=m.last_op,
                         versions=max(versions, 1), created_at=m.created_at, updated_at=m.updated_at,
                         sources=len(m.source_ids))


class MemoryInspector:
    """What TSUBASA keeps about a tenant's users, and why: memories with their history and
    provenance, sessions beside their observations, adapter versions, retrieval as chat sees it."""

    def __init__(self, gateway: GatewayService) -> None:
        self.gateway = gateway

    @property
    def store(self) -> Any:
        return self.gateway.memory.store

    @property
    def registry(self) -> Any:
        return self.gateway.registry

    def _written(self, tenant: str, user: str) -> dict[str, MemoryVersion]:
        """observation id -> the memory version it wrote."""
        return {v.observation_id: v for v in self.store.user_history(tenant, user)}

    # ---- users --------------------------------------------------------------------------------
    def users(self, tenant: str, limit: int, offset: int) -> UserPage:
        counts = self.store.counts(tenant)
        names = sorted({u for (_, u) in counts} | set(self.registry.users(tenant)))
        items, page = page_of(names, limit, offset)
        out = []
        for u in items:
            c = counts.get((tenant, u), {})
            current = self.registry.current(tenant, u)
            out.append(UserSummary(user=u, turns=c.get("turns", 0), observations=c.get("observations", 0),
                                   memories=c.get("memories", 0), versions=c.get("history", 0),
                                   adapter=current.name if current else None))
        return UserPage(tenant=tenant, items=out, **page)

    # ---- memories -----------------------------------------------------------------------------
    def memories(self, tenant: str, user: str, limit: int, offset: int) -> MemoryPage:
        records = self.store.list_memories(tenant, user)
        items, page = page_of(records, limit, offset)
        versions = Counter(v.memory_id for v in self.store.user_history(tenant, user)) if items else Counter()
        return MemoryPage(tenant=tenant, user=user, items=[memory_summary(m, versions[m.memory_id]) for m in items],
                          **page)

    def memory(self, tenant: str, user: str, memory_id: str) -> MemoryDetail:
        found = self.store.get_memory(tenant, user, checked_id(memory_id, "memory_id"))
        if found is None:
            raise APIError(404, f"memory {memory_id!r} does not exist for user {user!r} (GET "
                           f"/v1/users/{user}/memories lists them)", "memory_not_found", "memory_id")
        record = found[0]
        history = self.store.memory_history(tenant, user, record.memory_id)
        written = {v.observation_id: v for v in history}
        observations = {s.observation.observation_id: s
                        for s in self.store.get_observations(tenant, user, [v.observation_id for v in history])}
        turns = self.store.turns_by_source(tenant, user, record.source_ids)
        seen = {t.source_id for t in turns}
        return MemoryDetail(
            tenant=tenant, user=user, memory=memory_summary(record, len(history)),
            history=[VersionView(version=v.version, text=v.text, op=v.op, at=v.at, observation_id=v.observation_id,
                                 observation=observation_view(observations[v.observation_id], written)
                                 if v.observation_id in observations else None) for v in history],
            provenance=[turn_view(t) for t in turns],
            missing_sources=[s for s in record.source_ids if s not in seen])

    # ---- sessions -----------------------------------------------------------------------------
    def sessions(self, tenant: str, user: str, limit: int, offset: int) -> SessionPage:
        items, page = page_of(self.store.sessions(tenant, user), limit, offset)
        return SessionPage(tenant=tenant, user=user, items=[session_summary(s) for s in items], **page)

    def session(self, tenant: str, user: str, session_id: str, limit: int, offset: int) -> SessionDetail:
        session_id = checked_id(session_id, "session_id")
        info = next((s for s in self.store.sessions(tenant, user) if s.session_id == session_id), None)
        if info is None:
            raise APIError(404, f"session {session_id!r} does not exist for user {user!r} (GET "
                           f"/v1/users/{user}/sessions lists them)", "session_not_found", "session_id")
        turns, page = page_of(self.store.session_turns(tenant, user, session_id), limit, offset)
        stored = self.store.session_observations(tenant, user, session_id)
        written = self._written(tenant, user) if stored else {}
        return SessionDetail(tenant=tenant, user=user, session=session_summary(info),
                             turns=[turn_view(t) for t in turns],
                             observations=[observation_view(s, written) for s in stored], **page)

    # ---- adapters -----------------------------------------------------------------------------
    def adapters(self, tenant: str, user: str, limit: int, offset: int) -> AdapterPage:
        current = self.registry.current_version(tenant, user)
        versions = sorted(self.registry.list(tenant, user), key=lambda v: -v.version)
        items, page = page_of(versions, limit, offset)
        views = [AdapterView(name=v.name, version=v.version, current=v.version == current,
                             created_at=v.manifest.created_at, base_model=v.manifest.base_model, loss=v.manifest.loss,
                             d=v.manifest.d, rank=v.manifest.rank, alpha=v.manifest.alpha,
                             n_examples=v.manifest.n_examples, grounding_k=v.manifest.grounding_k,
                             variant=v.manifest.variant, metrics=v.manifest.metrics) for v in items]
        name = next((v.name for v in versions if v.version == current), None)
        return AdapterPage(tenant=tenant, user=user, current=name, items=views, **page)

    # ---- retrieval ----------------------------------------------------------------------------
    def search(self, tenant: str, user: str, body: SearchRequest) -> SearchResponse:
        """What a chat request's grounding would be for this question now: the same k rule and the
        same retrieval call as `GatewayService._prepare`, tokens under the serving tokenizer."""
        t0 = time.perf_counter()
        version = self.registry.current(tenant, user)
        k = self.gateway.grounding_k(version, TsubasaOptions(top_k=body.k))
        g = self.gateway.ground(tenant, user, body.query, k, body.source)
        return SearchResponse(
            tenant=tenant, user=user, query=body.query, source=body.source, k=k,
            adapter=version.name if version else None, text=g.text, tokens=g.tokens,
            items=[SearchHit(id=it.id, text=it.text, score=round(it.score, 4), source_ids=it.source_ids)
                   for it in g.items], retrieval_ms=round((time.perf_counter() - t0) * 1000, 3))
