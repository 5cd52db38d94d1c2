"""Raw turns are embedded on demand, on real Milvus Lite with the real embedder: the ingest path
stores them without a vector (`memory.embed_turns_on_ingest` off), turn search embeds a user's missing
vectors in one batch first, and an unembedded turn never comes back from a dense search."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tsubasa.config import MemoryConfig
from tsubasa.schema import Event

pytestmark = pytest.mark.integration

T0 = datetime(2023, 5, 8, 14, 0, tzinfo=UTC)
LINES = ["I adopted a grey cat named Pixel.", "We moved to Denver in June.", "My sister plays the violin."]


class CountingEmbedder:
    """The real embedder, counting the texts it is asked to embed."""

    def __init__(self, real) -> None:
        self.real, self.dim, self.texts = real, real.dim, 0

    def embed(self, texts):
        self.texts += len(texts)
        return self.real.embed(texts)


def _events(user: str, lines: list[str]) -> list[Event]:
    return [Event(event_id=f"{user}-{i}", tenant_id="acme", user_id=user, session_id="s1",
                  timestamp=T0 + timedelta(seconds=i), speaker="Caroline", text=line) for i, line in enumerate(lines)]


def test_ingest_stores_turns_unembedded_and_turn_search_embeds_them_once(store, embedder):
    from tsubasa.memory.retrieve import Retriever
    from tsubasa.memory.writer import MemoryWriter

    counting = CountingEmbedder(embedder)
    writer = MemoryWriter(store, counting, None, MemoryConfig())
    assert writer.append(_events("caro", LINES)).new_turns == 3
    assert writer.append(_events("caro", LINES)).new_turns == 0  # a replay
    assert counting.texts == 0  # nothing embedded on the ingest path
    rows = store._query_all("turns", 'tenant_id == "acme" and user_id == "caro"', ["event_id", "embedded"])
    assert sorted((r["event_id"], r["embedded"]) for r in rows) == [(f"caro-{i}", False) for i in range(3)]

    q = embedder.embed(["What is the cat called?"])[0]
    assert store.search_turns("acme", "caro", q, 3) == []  # placeholders are never dense hits
    hybrid = store.search_turns("acme", "caro", q, 3, text="cat named Pixel")  # BM25 needs no vector
    assert [t.event_id for t, _ in hybrid] == ["caro-0"]

    retriever = Retriever(store, counting)
    g = retriever.retrieve("acme", "caro", "What is the cat called?", k=1, source="turns")
    assert [it.id for it in g.items] == ["caro-0"] and g.items[0].score > 0.3
    assert counting.texts == 1 + 3  # the query, then the user's three turns in one batch
    retriever.retrieve("acme", "caro", "Where did they move?", k=1, source="turns")
    assert counting.texts == 1 + 3 + 1  # filled once: only the next query is embedded
    assert store.embed_missing_turns("acme", "caro", counting.embed) == 0

    # vectors filled on demand are the ones ingest would have written
    eager = MemoryWriter(store, embedder, None, MemoryConfig(embed_turns_on_ingest=True))
    eager.append(_events("dora", LINES))
    rows = store._query_all("turns", 'tenant_id == "acme"', ["user_id", "event_id", "embedded", "vec"])
    vec = {(r["user_id"], r["event_id"][-1]): r["vec"] for r in rows}
    assert all(r["embedded"] for r in rows)
    for i in range(3):
        assert sum(a * b for a, b in zip(vec[("caro", str(i))], vec[("dora", str(i))], strict=True)) > 0.999
