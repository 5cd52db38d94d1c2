"""Wire schemas of the memory inspector's JSON endpoints (`/v1/users/...`). Pydantic only."""

from __future__ import annotations

from datetime import date, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tsubasa.schema import EvolutionOp

MAX_LIMIT = 500


class Page(BaseModel):
    """Offset pagination: `items[offset : offset + limit]` of `total`; `next_offset` is None at the end."""

    total: int
    limit: int
    offset: int
    next_offset: int | None


class UserSummary(BaseModel):
    user: str
    turns: int
    observations: int
    memories: int
    versions: int
    """Rows in the memories' history (every version of every memory)."""
    adapter: str | None
    """The current adapter version (None: the base model answers)."""


class UserPage(Page):
    tenant: str
    items: list[UserSummary]


class MemorySummary(BaseModel):
    id: str
    text: str
    """The current text."""
    event_date: date | None
    last_op: EvolutionOp
    versions: int
    """Versions in its history (1 = never changed since it was added)."""
    created_at: datetime
    updated_at: datetime
    sources: int
    """Raw turns it came from (see the memory's provenance)."""


class MemoryPage(Page):
    tenant: str
    user: str
    items: list[MemorySummary]


class DecisionView(BaseModel):
    """What the memory manager decided for an observation."""

    op: EvolutionOp
    target_memory_id: str | None
    text: str
    fallback: bool
    """The model's reply was unusable and the observation was ADDed as it is."""
    auto: bool
    """Decided by similarity thresholds, without asking the model."""
    reason: str


class ObservationView(BaseModel):
    id: str
    session_id: str
    speaker: str
    text: str
    event_date: date | None
    report_date: date | None
    source_ids: list[str]
    attributed: bool
    """Provenance inferred by similarity (the writer cited no turn)."""
    decision: DecisionView | None
    applied: bool
    memory_id: str | None
    """The memory this observation wrote a version of (None: IGNOREd or not evolved yet)."""
    memory_version: int | None


class TurnView(BaseModel):
    event_id: str
    source_id: str
    session_id: str
    session_date: str
    """As the source gave it (LoCoMo: `1:56 pm on 8 May, 2023`)."""
    speaker: str
    text: str
    timestamp: datetime


class VersionView(BaseModel):
    version: int
    text: str
    op: EvolutionOp
    at: datetime
    observation_id: str
    observation: ObservationView | None
    """The observation that caused this version (None if it was deleted or never stored)."""


class MemoryDetail(BaseModel):
    tenant: str
    user: str
    memory: MemorySummary
    history: list[VersionView]
    """Every version, oldest first."""
    provenance: list[TurnView]
    """The raw turns the memory came from, in conversation order."""
    missing_sources: list[str]
    """Source ids the memory names that no stored turn has."""


class SessionSummary(BaseModel):
    session_id: str
    session_date: str
    turns: int
    observations: int
    state: Literal["open", "extracted", "done"]
    """`open`: no observations yet; `extracted`: being evolved; `done`: evolved into memory."""
    first_at: datetime
    last_at: datetime


class SessionPage(Page):
    tenant: str
    user: str
    items: list[SessionSummary]


class SessionDetail(Page):
    """One session's turns (paginated) beside every observation written from it."""

    tenant: str
    user: str
    session: SessionSummary
    turns: list[TurnView]
    observations: list[ObservationView]


class AdapterView(BaseModel):
    name: str
    version: int
    current: bool
    created_at: datetime
    base_model: str
    loss: str
    d: int
    rank: int
    alpha: int
    n_examples: int
    grounding_k: int
    variant: str
    metrics: dict[str, float]


class AdapterPage(Page):
    tenant: str
    user: str
    current: str | None
    items: list[AdapterView]
    """Newest first."""


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    query: str = Field(..., min_length=1, max_length=4000)
    """The question, as a chat request's last user message would carry it."""
    k: int | None = Field(None, ge=1, le=100)
    """Items to retrieve (default: what a chat request would use, the current adapter's grounding_k
    or memory.top_k)."""
    source: Literal["memories", "observations", "turns"] = "memories"


class SearchHit(BaseModel):
    id: str
    text: str
    """As the answering model sees it (dated)."""
    score: float
    source_ids: list[str]


class SearchResponse(BaseModel):
    tenant: str
    user: str
    query: str
    source: str
    k: int
    adapter: str | None
    """The adapter a chat request would use now (its grounding_k is the default k)."""
    items: list[SearchHit]
    text: str
    """The grounding lines exactly as the prompt would carry them."""
    tokens: int
    """Their size under the serving model's tokenizer (`usage.memory_tokens` of a chat answer)."""
    retrieval_ms: float
