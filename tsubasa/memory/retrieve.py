"""Retriever: the top-k grounding for (tenant, user, query) and its size in serving-model tokens."""

from __future__ import annotations

from collections.abc import Callable
from datetime import date
from typing import Literal

from pydantic import BaseModel, Field

from tsubasa.embed import Embedder
from tsubasa.memory.dates import human_date
from tsubasa.memory.store import MemoryStore

Source = Literal["memories", "observations", "turns"]


class GroundingItem(BaseModel):
    id: str
    text: str
    """As shown to the model (dated)."""
    score: float
    source_ids: list[str] = Field(default_factory=list)


class Grounding(BaseModel):
    source: Source
    items: list[GroundingItem]
    text: str
    """The lines put into the prompt."""
    tokens: int
    """Size of `text` under the serving model's tokenizer."""

    @property
    def source_ids(self) -> set[str]:
        return {s for it in self.items for s in it.source_ids}

    def top(self, k: int, count_tokens: Callable[[str], int]) -> Grounding:
        """The first k items as their own grounding (for sweeping k with one search)."""
        items = self.items[:k]
        text = format_grounding(items)
        return Grounding(source=self.source, items=items, text=text, tokens=count_tokens(text) if text else 0)


def grounding_dated(text: str, when: date | None) -> str:
    """A memory as the answering model sees it: "[7 May 2023] Caroline ...". Dates are written the way
    people (and LoCoMo's sessions and gold answers) write them; with ISO dates answerers copy
    "2023-05-07", which a reader has to translate and token F1 scores as wrong against "7 May 2023"."""
    return f"[{human_date(when)}] {text}" if when else text


def format_grounding(items: list[GroundingItem]) -> str:
    return "\n".join(f"- {it.text}" for it in items)


def _words(text: str) -> int:
    return len(text.split())


class Retriever:
    """Top-k retrieval over a user's memories (default), extracted observations or raw turns."""

    def __init__(self, store: MemoryStore, embedder: Embedder,
                 count_tokens: Callable[[str], int] | None = None,
                 mode: Literal["dense", "hybrid"] = "dense") -> None:
        self.store = store
        self.embedder = embedder
        self.count_tokens = count_tokens or _words
        self.mode = mode
        """`hybrid`: dense + BM25 fused (where the store's collections have BM25); `dense`: cosine only."""

    def retrieve(self, tenant_id: str, user_id: str, query: str, k: int = 3,
                 source: Source = "memories") -> Grounding:
        vec = self.embedder.embed([query])[0]
        text = query if self.mode == "hybrid" else None
        items: list[GroundingItem] = []
        # Grounding reads at the serving level (stale_ok): a write of the last seconds may be missed,
        # and the search never waits for the newest writes to be searchable.
        if k > 0 and source == "memories":
            items = [GroundingItem(id=m.memory_id, text=grounding_dated(m.text, m.event_date), score=m.score or 0.0,
                                   source_ids=m.source_ids)
                     for m in self.store.search_memories(tenant_id, user_id, vec, k, text, stale_ok=True)]
        elif k > 0 and source == "observations":
            items = [GroundingItem(id=o.observation_id, text=grounding_dated(o.text, o.event_date), score=s,
                                   source_ids=o.source_ids)
                     for o, s in self.store.search_observations(tenant_id, user_id, vec, k, text, stale_ok=True)]
        elif k > 0 and source == "turns":
            self.store.embed_missing_turns(tenant_id, user_id, self.embedder.embed)  # raw turns: on demand
            items = [GroundingItem(id=t.event_id, score=s, source_ids=[t.source_id], text=t.rendered())
                     for t, s in self.store.search_turns(tenant_id, user_id, vec, k, text, stale_ok=True)]
        text = format_grounding(items)
        return Grounding(source=source, items=items, text=text, tokens=self.count_tokens(text) if text else 0)
