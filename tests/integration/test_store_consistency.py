"""Reads by what they need, on real Milvus Lite: the consistency level each read puts on the wire.

The gRPC requests the real MilvusClient sends are read back at its stub (recorded, then sent on
unchanged), so the levels below are what a Milvus server would receive. Grounding searches ask for
`milvus.search_consistency` (Bounded), never Strong; evolution reads ask for Strong and see their own
writes. Milvus Lite applies every write at once whatever the level, so the behaviour checks here
show the writer's logic; the levels are what make it hold on a cluster."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from scripted import ScriptedEngine

from tsubasa.config import MemoryConfig
from tsubasa.schema import Event, EventKind, EvolutionOp, MemoryRecord

pytestmark = pytest.mark.integration

T0 = datetime(2023, 5, 8, 14, 0, tzinfo=UTC)
RPCS = ("Search", "HybridSearch", "Query")


class WireLog:
    """Wraps the client's gRPC stub: records (rpc, consistency) of reads, forwards every call."""

    def __init__(self, client) -> None:
        from pymilvus.grpc_gen import common_pb2

        self._names = common_pb2.ConsistencyLevel.Name
        self.handler = client._get_connection()
        self.real = self.handler._stub
        self.calls: list[tuple[str, str]] = []
        self.handler._stub = self

    def __getattr__(self, name: str):
        rpc = getattr(self.real, name)
        if name not in RPCS:
            return rpc

        def call(request, *args, **kwargs):
            level = "collection default" if request.use_default_consistency else self._names(request.consistency_level)
            self.calls.append((name, level))
            return rpc(request, *args, **kwargs)

        return call

    def take(self) -> list[tuple[str, str]]:
        out, self.calls = self.calls, []
        return out

    def close(self) -> None:
        self.handler._stub = self.real


@pytest.fixture()
def wire(store):
    log = WireLog(store.client)
    yield log
    log.close()


def _memory(user: str, mid: str, text: str) -> MemoryRecord:
    return MemoryRecord(memory_id=mid, tenant_id="acme", user_id=user, text=text, created_at=T0, updated_at=T0)


def test_grounding_searches_do_not_ask_for_strong(store, embedder, wire):
    from tsubasa.memory.retrieve import Retriever
    from tsubasa.memory.store import MilvusStore

    text = "Caroline adopted a grey cat named Pixel."
    store.write_memory(_memory("caro", "m1", text), embedder.embed([text])[0], EvolutionOp.ADD, "o1")
    store.upsert_turns([Event(event_id="e1", tenant_id="acme", user_id="caro", session_id="s1", timestamp=T0,
                              speaker="Caroline", text="We adopted Pixel, a grey cat!").to_turn()])
    wire.take()
    for mode in ("dense", "hybrid"):
        g = Retriever(store, embedder, mode=mode).retrieve("acme", "caro", "What is Caroline's cat called?", k=3)
        assert [it.text for it in g.items] == [text]
        searches = wire.take()
        assert searches and {level for _, level in searches} == {"Bounded"}, (mode, searches)
    # raw turns: the missing vectors are filled first (a Strong read of the raw log), then searched
    g = Retriever(store, embedder).retrieve("acme", "caro", "Caroline's cat", k=3, source="turns")
    assert [it.id for it in g.items] == ["e1"]
    calls = wire.take()
    assert [c for c in calls if c[0] != "Query"] == [("Search", "Bounded")], calls

    other = MilvusStore(store.cfg.model_copy(update={"search_consistency": "Session"}), uri=store.uri)
    Retriever(other, embedder).retrieve("acme", "caro", "cat", k=3)
    assert wire.take() == [("Search", "Session")]  # the configured level, not the collection's


def _session(sid: str, day: int, lines: list[str]) -> list[Event]:
    evs = [Event(event_id=f"{sid}-{i}", tenant_id="acme", user_id="caro", session_id=sid,
                 timestamp=T0 + timedelta(days=day, seconds=i), speaker="Caroline", text=line, source_id=f"{sid}:{i}")
           for i, line in enumerate(lines)]
    return [*evs, Event(event_id=f"{sid}-end", tenant_id="acme", user_id="caro", session_id=sid,
                        timestamp=T0 + timedelta(days=day, seconds=99), kind=EventKind.SESSION_END)]


def test_evolution_reads_its_own_writes_at_strong(store, embedder, wire):
    from tsubasa.memory.writer import MemoryWriter

    v2 = "Caroline lives in Boston with her partner and three cats."
    v3 = ("On 1 May 2023 Caroline lived in Boston with her partner and three cats; on 8 May 2023 Caroline moved "
          "to Denver with them.")
    decisions = iter(["OPERATION: UPDATE 1\nMEMORY: " + v2,
                      "OPERATION: RECONCILE 1\nMEMORY: stale text written against memory one's first version",
                      "OPERATION: RECONCILE 1\nMEMORY: " + v3])
    extractions = {"two cats": "- [2023-05-01] Caroline lives in Boston with her partner and two cats. (turns: s0:0)",
                   "Pixel": "- [2023-05-08] Caroline adopted a third cat named Pixel. (turns: s1:0)\n"
                         "- [2023-05-08] Caroline moved from Boston to Denver with her partner. (turns: s1:1)"}
    decide_prompts: list[str] = []

    def reply(prompt) -> str:
        text = prompt[-1].content
        if "New observation:" not in text:
            return next(v for k, v in extractions.items() if k in text)
        decide_prompts.append(text)
        return next(decisions)

    cfg = MemoryConfig(add_below_similarity=-1.0, ignore_above_similarity=0.999, guards=False)
    w = MemoryWriter(store, embedder, ScriptedEngine(reply), cfg)
    w.ingest(_session("s0", -7, ["I live in Boston with my partner and our two cats."]))
    wire.take()
    w.ingest(_session("s1", 0, ["Pixel joined us!", "And we moved to Denver."]))
    reads = wire.take()
    assert reads and {level for _, level in reads} == {"Strong"}, reads

    # the session's second observation was decided again, against the version its first one wrote
    assert len(decide_prompts) == 3
    assert "two cats" in decide_prompts[1] and v2 in decide_prompts[2]
    (m,) = store.list_memories("acme", "caro")
    assert (m.version, m.text) == (3, v3)
    assert [v.op for v in store.memory_history("acme", "caro", m.memory_id)] == [
        EvolutionOp.ADD, EvolutionOp.UPDATE, EvolutionOp.RECONCILE]
