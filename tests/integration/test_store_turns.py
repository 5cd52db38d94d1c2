"""Raw turns are embedded on demand, on real Milvus Lite with the real embedder: the ingest path
stores them without a vector (`memory.embed_turns_on_ingest` off), turn search embeds a user's missing
vectors in one batch first, and an unembedded turn never comes back from a dense search. In both
layouts that store turns unembedded: `split` (the default: no vector in the log, `turn_vectors`
beside it) and `flagged` (a placeholder vector and a flag: stores without BM25, or made before)."""

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


def _rows(store, user: str) -> dict[str, bool]:
    """event id -> whether the turn has its vector, read from the collections themselves."""
    flt = f'tenant_id == "acme" and user_id == "{user}"'
    if store.turn_layout == "split":
        assert all("vec" not in r for r in store._query_all("turns", flt, ["*"]))  # the log holds no vector
        have = {r["id"] for r in store._query_all("turn_vectors", flt, ["id"])}
        return {r["event_id"]: r["id"] in have for r in store._query_all("turns", flt, ["id", "event_id"])}
    return {r["event_id"]: r["embedded"] for r in store._query_all("turns", flt, ["event_id", "embedded"])}


def _vectors(store) -> dict[tuple[str, str], list[float]]:
    key = "turn_vectors" if store.turn_layout == "split" else "turns"
    ev = {r["id"]: (r["user_id"], r["event_id"]) for r in store._query_all("turns", 'tenant_id == "acme"',
                                                                             ["id", "user_id", "event_id"])}
    return {ev[r["id"]]: r["vec"] for r in store._query_all(key, 'tenant_id == "acme"', ["id", "vec"])}


@pytest.fixture(params=["split", "flagged"])
def layout_store(request, settings, tmp_path):
    """A fresh store of each layout: `flagged` is what a store without BM25 gets."""
    from tsubasa.memory.store import MilvusStore

    cfg = settings.milvus.model_copy(update={"bm25": request.param == "split",
                                             "collection_prefix": f"turns_{request.param}"})
    s = MilvusStore(cfg, uri=str(tmp_path / "turns.db"))
    assert s.turn_layout == request.param and s.turn_flags
    yield s
    s.close()


def test_ingest_stores_turns_unembedded_and_turn_search_embeds_them_once(layout_store, embedder):
    from tsubasa.memory.retrieve import Retriever
    from tsubasa.memory.writer import MemoryWriter

    store = layout_store
    counting = CountingEmbedder(embedder)
    writer = MemoryWriter(store, counting, None, MemoryConfig())
    assert writer.append(_events("caro", LINES)).new_turns == 3
    assert writer.append(_events("caro", LINES)).new_turns == 0  # a replay
    assert counting.texts == 0  # nothing embedded on the ingest path
    assert _rows(store, "caro") == {f"caro-{i}": False for i in range(3)}

    q = embedder.embed(["What is the cat called?"])[0]
    assert store.search_turns("acme", "caro", q, 3) == []  # unembedded turns are never dense hits
    if store.bm25["turns"]:
        hybrid = store.search_turns("acme", "caro", q, 3, text="cat named Pixel")  # BM25 needs no vector
        assert [t.event_id for t, _ in hybrid] == ["caro-0"]

    retriever = Retriever(store, counting)
    g = retriever.retrieve("acme", "caro", "What is the cat called?", k=1, source="turns")
    assert [it.id for it in g.items] == ["caro-0"] and g.items[0].score > 0.3
    assert counting.texts == 1 + 3  # the query, then the user's three turns in one batch
    assert _rows(store, "caro") == {f"caro-{i}": True for i in range(3)}
    retriever.retrieve("acme", "caro", "Where did they move?", k=1, source="turns")
    assert counting.texts == 1 + 3 + 1  # filled once: only the next query is embedded
    assert store.embed_missing_turns("acme", "caro", counting.embed) == 0

    # vectors filled on demand are the ones ingest would have written
    eager = MemoryWriter(store, embedder, None, MemoryConfig(embed_turns_on_ingest=True))
    eager.append(_events("dora", LINES))
    assert _rows(store, "dora") == {f"dora-{i}": True for i in range(3)}
    vec = _vectors(store)
    for i in range(3):
        a, b = vec[("caro", f"caro-{i}")], vec[("dora", f"dora-{i}")]
        assert sum(x * y for x, y in zip(a, b, strict=True)) > 0.999

    deleted = store.forget_user("acme", "caro")
    assert deleted["turns"] == 3 and deleted.get("turn_vectors", 3) == 3
    assert _rows(store, "caro") == {} and len(_vectors(store)) == 3  # dora's stay


def test_a_store_keeps_the_layout_it_was_made_with(settings, tmp_path, embedder):
    """Reopening a `flagged` store with BM25 on keeps its turns where they are (no migration)."""
    from tsubasa.memory.store import MilvusStore

    uri = str(tmp_path / "old.db")
    old = MilvusStore(settings.milvus.model_copy(update={"bm25": False}), uri=uri)
    old.upsert_turns([e.to_turn(seq=i) for i, e in enumerate(_events("caro", LINES))])
    old.close()
    reopened = MilvusStore(settings.milvus, uri=uri)
    try:
        assert reopened.turn_layout == "flagged" and "turn_vectors" not in reopened.names
        assert reopened.embed_missing_turns("acme", "caro", embedder.embed) == 3
        q = embedder.embed(["We moved to Denver"])[0]
        assert reopened.search_turns("acme", "caro", q, 1)[0][0].event_id == "caro-1"
    finally:
        reopened.close()


def test_client_side_fusion_ranks_as_milvus_hybrid_search(store, embedder):
    """The split layout fuses dense and BM25 hits itself: on one collection that has both, its
    fusion gives Milvus' own hybrid_search (RRFRanker) scores, hence its ranking up to the order of
    ties (which Milvus does not define: Lite and the server break them differently)."""
    from tsubasa.schema import EvolutionOp, MemoryRecord

    texts = ["Ann is researching adoption agencies.", "Ann loves painting sunsets by the lake.",
             "Ann went camping with her kids in June.", "Ann ran a charity race for mental health.",
             "Ann's cat Pixel is grey.", "Ann painted a lake at sunrise.", "Ann's kids love camping trips."]
    for i, t in enumerate(texts):
        rec = MemoryRecord(memory_id=f"m-{i}", tenant_id="fuse", user_id="u1", text=t, created_at=T0, updated_at=T0)
        store.write_memory(rec, embedder.embed([t])[0], EvolutionOp.ADD, f"o-{i}")
    flt = 'tenant_id == "fuse" and user_id == "u1"'
    for q in ("adoption agencies", "painting the lake", "camping with kids"):
        vec = embedder.embed([q])[0]
        ours = store._fused_search("memories", "memories", vec, q, flt, 3, ["text"])
        theirs = store._search("memories", vec, flt, 3, ["text"], text=q)
        assert {h["id"]: round(h["_score"], 6) for h in ours} == {h["id"]: round(h["_score"], 6) for h in theirs}
        assert [h["_score"] for h in ours] == sorted((h["_score"] for h in ours), reverse=True)
