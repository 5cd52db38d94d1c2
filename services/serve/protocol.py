"""Wire schemas of the gateway: the OpenAI chat-completions subset TSUBASA serves, plus its own
`/v1/events` and `/v1/users` bodies. Pydantic only; no transport or logic here."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tsubasa.llm.base import ChatMessage


class TsubasaOptions(BaseModel):
    """Non-OpenAI switches, sent as `extra_body={"tsubasa": {...}}` by the openai client."""

    model_config = ConfigDict(extra="forbid")

    memory: bool = True
    """Ground the answer on the user's top-k memories."""
    top_k: int | None = Field(None, ge=0, le=100)
    """Memories to retrieve (default: the adapter manifest's grounding_k, else memory.top_k)."""
    adapter: Literal["auto", "none"] = "auto"
    """`auto`: the user's current adapter when one exists; `none`: the base model."""


class ChatCompletionRequest(BaseModel):
    """`POST /v1/chat/completions` (OpenAI schema; unknown OpenAI fields are accepted and ignored)."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(..., min_length=1, max_length=256)
    """The base model's name, or an adapter this tenant owns (`<tenant>/<user>/vNNNN`)."""
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=256)
    user: str | None = Field(None, max_length=300)
    """The user whose memories and adapter personalise the answer (`alice`, or `<tenant>:alice`)."""
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    tsubasa: TsubasaOptions = Field(default_factory=TsubasaOptions)

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4 or any(len(s) > 64 for s in stops):
            raise ValueError("at most 4 stop sequences of up to 64 characters")
        return stops

    @property
    def stops(self) -> list[str]:
        return list(self.stop or [])  # type: ignore[arg-type]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    memory_tokens: int = 0
    """Tokens of the retrieved memories inside the prompt (the grounding's cost)."""


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: ResponseMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class MemoryRef(BaseModel):
    id: str
    text: str
    score: float


class Personalisation(BaseModel):
    """What personalised this answer (returned as the extra `tsubasa` field)."""

    tenant: str
    user: str
    adapter: str | None
    """The adapter version that generated the answer (None = base model)."""
    memories: list[MemoryRef]
    memory_tokens: int
    retrieval_ms: float


def _completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=_completion_id)
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage
    tsubasa: Personalisation


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    tsubasa: Personalisation | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str
    """`tsubasa` for the base model, the tenant for its adapters."""
    root: str
    """The base model every id here runs on."""
    parent: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class EventsRequest(BaseModel):
    """`POST /v1/events`: a batch of events; `tenant_id` may be omitted (it is the key's tenant)."""

    events: list[dict[str, Any]] = Field(..., min_length=1, max_length=1000)


class EventError(BaseModel):
    index: int
    event_id: str | None
    error: str


class EventsResponse(BaseModel):
    received: int
    accepted: int
    new_turns: int
    errors: list[EventError]
    queued_sessions: list[str]
    """`<user>/<session>` closed by this batch and queued for memory evolution."""


class UserStatus(BaseModel):
    tenant: str
    user: str
    pending_sessions: int
    """Closed sessions still waiting for (or in) memory evolution."""
    turns: int
    observations: int
    memories: int
    adapter: str | None
    failed_sessions: list[str] = Field(default_factory=list)


class ForgetResponse(BaseModel):
    tenant: str
    user: str
    deleted: dict[str, int]
    """Rows removed per collection, `adapters` = adapter versions, `queued` = dropped queued sessions."""


class ErrorBody(BaseModel):
    message: str
    type: str
    code: str | None = None
    param: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
