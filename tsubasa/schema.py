"""Wire and storage schemas shared by every path (events, turns, observations, memories, QA).

Identifiers (tenant, user, session, event, memory ids) are validated here, before they can reach a
Milvus filter expression or a storage path.
"""

from __future__ import annotations

import hashlib
import re
from datetime import UTC, date, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

IDENTIFIER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}$")
MAX_TEXT_CHARS = 16_000
MAX_METADATA_BYTES = 4_096
MAX_EVENT_BYTES = 65_536
"""Largest encoded event accepted (bytes of JSON); text and metadata limits apply inside it."""
EVENT_SCHEMA_VERSION = 1
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]")
"""C0 control characters other than tab, LF and CR, DEL, and lone surrogates: they carry no text, a
NUL truncates strings in C consumers, and a lone surrogate cannot be stored as UTF-8."""


class InvalidIdentifierError(ValueError):
    """An identifier that could break out of a filter expression or a storage path."""


def validate_identifier(value: str, field: str = "identifier") -> str:
    """Return `value` if it is a safe identifier: 1-128 chars of [A-Za-z0-9_.@-], starting alphanumeric.

    Quotes, spaces, backslashes, slashes and operators are refused, so an identifier can be put
    inside a Milvus filter string literal or a path segment without escaping.
    """
    if not isinstance(value, str) or not IDENTIFIER_RE.fullmatch(value) or ".." in value:
        raise InvalidIdentifierError(
            f"{field} {value!r} is not a valid identifier: use 1-128 characters from "
            "[A-Za-z0-9_.@-], starting with a letter or digit"
        )
    return value


def refuse_control_characters(value: str, field: str | None = None) -> str:
    """Return `value` if it holds no control character (tab, LF and CR are text); else raise
    ValueError naming the first one and its position (and `field`, when the caller's error does not)."""
    if (m := _CONTROL.search(value)) is not None:
        where = f"{field}: " if field else ""
        raise ValueError(f"{where}control character U+{ord(m.group()):04X} at position {m.start()} is not "
                         "allowed (only tab, LF and CR)")
    return value


def _id(value: str) -> str:
    return validate_identifier(value)


Identifier = Annotated[str, AfterValidator(_id)]


def stable_id(*parts: str, prefix: str = "") -> str:
    """Deterministic 32-hex id from parts (replays produce the same primary keys)."""
    h = hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:32]
    return f"{prefix}{h}"


def utcnow() -> datetime:
    return datetime.now(UTC)


class EventKind(StrEnum):
    TURN = "turn"
    SESSION_END = "session_end"


class Event(BaseModel):
    """One user event as produced to Kafka (key `tenant:user`) or posted to `/v1/events`."""

    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = EVENT_SCHEMA_VERSION
    event_id: Identifier
    tenant_id: Identifier
    user_id: Identifier
    session_id: Identifier
    timestamp: datetime
    kind: EventKind = EventKind.TURN
    speaker: str = Field("", max_length=128)
    text: str = Field("", max_length=MAX_TEXT_CHARS)
    source_id: str = Field("", max_length=128)
    """Id in the source system (LoCoMo `dia_id`); default: the event id."""
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("metadata")
    @classmethod
    def _small_metadata(cls, v: dict[str, Any]) -> dict[str, Any]:
        import json

        if len(json.dumps(v, default=str)) > MAX_METADATA_BYTES:
            raise ValueError(f"metadata larger than {MAX_METADATA_BYTES} bytes")
        if isinstance(v.get("session_date"), str):  # stored and shown beside the turn's text
            refuse_control_characters(v["session_date"], "session_date")
        return v

    @field_validator("speaker", "text", "source_id")
    @classmethod
    def _no_control_characters(cls, v: str) -> str:
        return refuse_control_characters(v)

    @field_validator("timestamp")
    @classmethod
    def _aware(cls, v: datetime) -> datetime:
        return v if v.tzinfo else v.replace(tzinfo=UTC)

    @model_validator(mode="after")
    def _turn_has_text(self) -> Event:
        if self.kind == EventKind.TURN and not self.text.strip():
            raise ValueError("a turn event needs non-empty text")
        if self.kind == EventKind.TURN and not self.speaker.strip():
            raise ValueError("a turn event needs a speaker")
        return self

    @property
    def key(self) -> str:
        """Kafka message key: one partition owns each user."""
        return f"{self.tenant_id}:{self.user_id}"

    def to_turn(self, seq: int = 0) -> Turn:
        return Turn(
            event_id=self.event_id, tenant_id=self.tenant_id, user_id=self.user_id,
            session_id=self.session_id, speaker=self.speaker, text=self.text,
            timestamp=self.timestamp, source_id=self.source_id or self.event_id,
            seq=int(self.metadata.get("seq", seq)),
            session_date=str(self.metadata.get("session_date", "")),
        )


class InvalidEventError(ValueError):
    """An event that cannot be accepted; the message names the field (`user_id: ...`)."""


def parse_event(raw: bytes | str | dict[str, Any], key: bytes | str | None = None) -> Event:
    """Decode and validate one event (Kafka message value, HTTP item or dict).

    Raises InvalidEventError with one line per problem, each naming the field. When `key` is given
    (a Kafka message key) it must equal `tenant:user`, so that one partition owns each user.
    """
    import json

    from pydantic import ValidationError

    if isinstance(raw, bytes | bytearray | str):
        size = len(raw.encode() if isinstance(raw, str) else raw)
        if size > MAX_EVENT_BYTES:
            raise InvalidEventError(f"event is {size} bytes, over the {MAX_EVENT_BYTES}-byte limit")
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, ValueError) as exc:
            raise InvalidEventError(f"not valid JSON: {exc}") from None
    else:
        data = raw
    if not isinstance(data, dict):
        raise InvalidEventError(f"event must be a JSON object, got {type(data).__name__}")
    try:
        event = Event.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "event"
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"{loc}: {msg}")
        raise InvalidEventError("; ".join(lines)) from None
    if key is not None:
        k = key.decode(errors="replace") if isinstance(key, bytes | bytearray) else key
        if k != event.key:
            raise InvalidEventError(f"key: message key {k!r} is not tenant_id:user_id {event.key!r}")
    return event


class Turn(BaseModel):
    """One stored utterance of the raw turn log."""

    event_id: Identifier
    tenant_id: Identifier
    user_id: Identifier
    session_id: Identifier
    speaker: str
    text: str
    timestamp: datetime
    source_id: str
    seq: int = 0
    session_date: str = ""
    """Human date of the session as the source gave it (LoCoMo: `1:56 pm on 8 May, 2023`)."""

    @property
    def pk(self) -> str:
        return stable_id(self.tenant_id, self.user_id, self.event_id, prefix="t")

    def rendered(self) -> str:
        """How a turn is embedded and shown as grounding: `[date] speaker: text` (the date and the
        speaker's name are what questions ask about; embedding them doubles utterance recall@1)."""
        return f"[{self.session_date or self.timestamp.date().isoformat()}] {self.speaker}: {self.text}"


class Observation(BaseModel):
    """A standalone, dated fact distilled from one session about one speaker."""

    observation_id: str
    tenant_id: Identifier
    user_id: Identifier
    session_id: Identifier
    speaker: str
    text: str
    event_date: date | None = None
    """When the thing happened (may differ from when it was told)."""
    report_date: date | None = None
    """When it was told (the session date)."""
    source_ids: list[str] = Field(default_factory=list)
    """Provenance: source ids of the turns it came from."""
    attributed: bool = False
    """True when provenance was inferred by similarity because the LLM cited no turn."""
    index: int = 0


class EvolutionOp(StrEnum):
    ADD = "ADD"
    UPDATE = "UPDATE"
    RECONCILE = "RECONCILE"
    IGNORE = "IGNORE"


class EvolutionDecision(BaseModel):
    op: EvolutionOp
    target: int | None = None
    """1-based index into the candidate list shown to the LLM (UPDATE / RECONCILE)."""
    target_memory_id: str | None = None
    """The memory that index named when the decision was made (replays apply to the same one)."""
    text: str = ""
    """New memory text for ADD / UPDATE / RECONCILE."""
    fallback: bool = False
    """The LLM output could not be used; the observation was ADDed as is."""
    auto: bool = False
    """Decided by similarity thresholds without asking the LLM."""
    reason: str = ""


class MemoryRecord(BaseModel):
    """The current version of one memory."""

    memory_id: str
    tenant_id: Identifier
    user_id: Identifier
    text: str
    version: int = 1
    created_at: datetime
    updated_at: datetime
    last_op: EvolutionOp = EvolutionOp.ADD
    source_ids: list[str] = Field(default_factory=list)
    observation_ids: list[str] = Field(default_factory=list)
    event_date: date | None = None
    score: float | None = None


class MemoryVersion(BaseModel):
    """One entry of a memory's history (every version is kept)."""

    memory_id: str
    version: int
    text: str
    op: EvolutionOp
    observation_id: str
    at: datetime


class QAPair(BaseModel):
    """A synthetic (self-learning) question/answer about a user, with provenance."""

    qa_id: str
    tenant_id: Identifier
    user_id: Identifier
    question: str
    answer: str
    source_ids: list[str] = Field(default_factory=list)
    memory_ids: list[str] = Field(default_factory=list)
    session_id: str = ""
