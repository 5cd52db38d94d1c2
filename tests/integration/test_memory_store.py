"""Real Milvus Lite: tenant isolation, idempotent turn log, versioned memories, injection refusal."""

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from tsubasa.schema import EvolutionOp, InvalidIdentifierError, MemoryRecord, Turn

pytestmark = pytest.mark.integration


def _turns(tenant, user, texts, session="s1"):
    t0 = datetime(2023, 5, 8, tzinfo=UTC)
    return [Turn(event_id=f"{session}-e{i}", tenant_id=tenant, user_id=user, session_id=session, speaker="Ann",
                 text=tx, timestamp=t0 + timedelta(seconds=i), source_id=f"D1:{i}", seq=i)
            for i, tx in enumerate(texts)]


def _mem(tenant, user, mid, text, version=1):
    now = datetime.now(UTC)
    return MemoryRecord(memory_id=mid, tenant_id=tenant, user_id=user, text=text, version=version,
                        created_at=now, updated_at=now)


def test_turn_log_is_idempotent_by_event_id(store, embedder):
    turns = _turns("acme", "u1", ["I adopted a dog named Max.", "We went hiking in Colorado."])
    vecs = embedder.embed([t.text for t in turns])
    assert store.upsert_turns(turns, vecs) == 2
    assert store.upsert_turns(turns, vecs) == 0  # replay stores nothing new
    assert len(store.session_turns("acme", "u1", "s1")) == 2
    assert [t.source_id for t in store.session_turns("acme", "u1", "s1")] == ["D1:0", "D1:1"]


def test_two_tenants_with_the_same_user_id_never_see_each_other(store, embedder):
    a = _turns("acme", "u1", ["Acme secret: my password hint is blue whale."])
    b = _turns("globex", "u1", ["Globex fact: I collect vintage stamps."])
    store.upsert_turns(a, embedder.embed([t.text for t in a]))
    store.upsert_turns(b, embedder.embed([t.text for t in b]))
    q = embedder.embed(["What is the password hint?"])[0]
    for tenant, other_word in (("acme", "Globex"), ("globex", "Acme")):
        hits = store.search_turns(tenant, "u1", q, 10)
        assert hits and all(t.tenant_id == tenant and other_word not in t.text for t, _ in hits)
        assert all(t.tenant_id == tenant for t in store.list_turns(tenant, "u1"))
    vec = embedder.embed(["Acme memory"])[0]
    store.write_memory(_mem("acme", "u1", "m-acme", "Acme memory about u1"), vec, EvolutionOp.ADD, "o1")
    store.write_memory(_mem("globex", "u1", "m-globex", "Globex memory about u1"), vec, EvolutionOp.ADD, "o2")
    assert [m.memory_id for m in store.search_memories("acme", "u1", vec, 10)] == ["m-acme"]
    assert store.get_memory("acme", "u1", "m-globex") is None  # knowing the id is not enough
    assert store.memory_history("acme", "u1", "m-globex") == []
    deleted = store.forget_user("acme", "u1")
    assert deleted["turns"] == 1 and deleted["memories"] == 1
    assert store.list_turns("acme", "u1") == [] and store.list_memories("acme", "u1") == []
    assert len(store.list_turns("globex", "u1")) == 1 and len(store.list_memories("globex", "u1")) == 1
    assert store.counts() == {("globex", "u1"): {"turns": 1, "observations": 0, "memories": 1, "history": 1}}


def test_hybrid_search_finds_rare_words_and_keeps_tenants_apart(store, embedder):
    texts = ["Ann is researching adoption agencies for her future family.", "Ann loves painting sunsets.",
             "Ann went camping with her kids.", "Ann ran a charity race for mental health."]
    for tenant in ("acme", "globex"):
        turns = _turns(tenant, "u1", [f"{tenant}: {t}" for t in texts])
        store.upsert_turns(turns, embedder.embed([t.text for t in turns]))
        for i, t in enumerate(texts):
            store.write_memory(_mem(tenant, "u1", f"m-{tenant}-{i}", f"{tenant}: {t}"), embedder.embed([t])[0],
                               EvolutionOp.ADD, f"o-{tenant}-{i}")
    assert store.bm25 == {"turns": True, "observations": True, "memories": True, "history": False,
                          "sessions": False, "turn_vectors": False}
    q = "adoption agencies"
    vec = embedder.embed([q])[0]
    for tenant in ("acme", "globex"):
        mems = store.search_memories(tenant, "u1", vec, 4, text=q)
        assert "adoption agencies" in mems[0].text and all(m.tenant_id == tenant for m in mems)
        turns = store.search_turns(tenant, "u1", vec, 4, text=q)
        assert all(t.tenant_id == tenant and t.text.startswith(tenant) for t, _ in turns)
    dense = store.search_memories("acme", "u1", vec, 4)  # no text: dense cosine scores
    assert all(0.0 < (m.score or 0) <= 1.0 for m in dense)


def test_retriever_modes(store, embedder):
    from tsubasa.memory.retrieve import Retriever

    texts = ["Ann is researching adoption agencies.", "Ann loves painting sunsets by the lake."]
    for i, t in enumerate(texts):
        store.write_memory(_mem("acme", "u1", f"m{i}", t), embedder.embed([t])[0], EvolutionOp.ADD, f"o{i}")
    for mode in ("dense", "hybrid"):
        g = Retriever(store, embedder, mode=mode).retrieve("acme", "u1", "Which agencies is Ann looking at?", k=1)
        assert [it.id for it in g.items] == ["m0"] and g.tokens > 0


def test_versions_are_kept(store, embedder):
    vec = embedder.embed(["x"])[0]
    store.write_memory(_mem("acme", "u1", "m1", "Ann lives in Boston."), vec, EvolutionOp.ADD, "o1")
    store.write_memory(_mem("acme", "u1", "m1", "On 2023-05-01 Ann lived in Boston; on 2023-07-01 Ann lives "
                            "in Denver.", version=2), vec, EvolutionOp.RECONCILE, "o2")
    hist = store.memory_history("acme", "u1", "m1")
    assert [(v.version, v.op) for v in hist] == [(1, EvolutionOp.ADD), (2, EvolutionOp.RECONCILE)]
    assert hist[0].text == "Ann lives in Boston."
    assert store.get_memory("acme", "u1", "m1")[0].version == 2
    assert len(store.list_memories("acme", "u1")) == 1


def test_filter_injection_is_rejected_before_milvus(store):
    q = np.zeros(384, dtype=np.float32)
    q[0] = 1
    for bad in ('u1" or tenant_id != "x', "u1' || 1==1", "../../x", 'a" and id > "'):
        with pytest.raises(InvalidIdentifierError, match="not a valid identifier"):
            store.search_memories("acme", bad, q, 3)
        with pytest.raises(InvalidIdentifierError):
            store.list_turns(bad, "u1")
        with pytest.raises(InvalidIdentifierError):
            store.forget_user("acme", bad)
        with pytest.raises(InvalidIdentifierError):
            store.memory_history("acme", "u1", bad)


def test_store_survives_reopen(settings, embedder):
    from tsubasa.memory.store import MilvusStore

    s1 = MilvusStore(settings.milvus, uri=settings.milvus_uri)
    turns = _turns("acme", "u9", ["Persistent turn about sailing."])
    s1.upsert_turns(turns, embedder.embed([t.text for t in turns]))
    s1.close()
    s2 = MilvusStore(settings.milvus, uri=settings.milvus_uri)
    try:
        assert [t.text for t in s2.list_turns("acme", "u9")] == ["Persistent turn about sailing."]
    finally:
        s2.close()


def test_a_lite_file_held_by_another_process_is_a_clear_error(tmp_path, settings):
    """Milvus Lite admits one process per file: a second process gets StoreLockedError naming the
    file (and the CLI prints it without a traceback), not pymilvus' 'Open local milvus failed'."""
    import subprocess
    import sys

    from tsubasa.memory.milvus import StoreLockedError
    from tsubasa.memory.store import MilvusStore

    uri = str(tmp_path / "held.db")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom pymilvus import MilvusClient\n"
         f"MilvusClient(uri={uri!r}); print('ready', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        with pytest.raises(StoreLockedError, match=r"held\.db is in use by another process"):
            MilvusStore(settings.milvus, uri=uri)
    finally:
        holder.kill()
        holder.wait()
    s = MilvusStore(settings.milvus, uri=uri)  # the lock goes with the process that held it
    try:
        assert s.counts() == {}
    finally:
        s.close()


def test_inspection_reads_stay_inside_one_user(store, embedder):
    """The inspector's reads: turns by source id (a filter literal for plain ids, a Python match for
    ids a literal cannot carry), a user's history, session summaries; never another tenant's rows."""
    from tsubasa.schema import Observation

    mine = _turns("acme", "u1", ["I adopted a dog named Max.", "We went hiking.", 'He said "hi" \\ bye.'])
    mine[2] = mine[2].model_copy(update={"source_id": 'D1:"2"\\'})
    theirs = _turns("globex", "u1", ["I collect stamps."])
    for ts in (mine, theirs):
        store.upsert_turns(ts, embedder.embed([t.text for t in ts]))
    assert [t.text for t in store.turns_by_source("acme", "u1", ["D1:1", "D1:0", "D1:9"])] == [
        "I adopted a dog named Max.", "We went hiking."]
    assert [t.event_id for t in store.turns_by_source("acme", "u1", ['D1:"2"\\', "D1:0"])] == ["s1-e0", "s1-e2"]
    assert store.turns_by_source("globex", "u1", ["D1:1"]) == []
    assert [(s.session_id, s.turns, s.state) for s in store.sessions("acme", "u1")] == [("s1", 3, "open")]
    store.set_session_state("acme", "u1", "s1", "done", 1)
    assert [(s.state, s.observations) for s in store.sessions("acme", "u1")] == [("done", 1)]

    obs = Observation(observation_id="o1", tenant_id="acme", user_id="u1", session_id="s1", speaker="Ann",
                      text="Ann adopted a dog named Max.", source_ids=["D1:0"])
    store.upsert_observations([obs], embedder.embed([obs.text]))
    assert [s.observation.text for s in store.get_observations("acme", "u1", ["o1", "o-none"])] == [obs.text]
    assert store.get_observations("globex", "u1", ["o1"]) == []  # an id alone reaches nothing
    vec = embedder.embed([obs.text])[0]
    store.write_memory(_mem("acme", "u1", "m1", obs.text), vec, EvolutionOp.ADD, "o1")
    store.write_memory(_mem("acme", "u1", "m1", obs.text + " He is a beagle.", version=2), vec,
                       EvolutionOp.UPDATE, "o2")
    assert [(v.version, v.op, v.observation_id) for v in store.user_history("acme", "u1")] == [
        (1, EvolutionOp.ADD, "o1"), (2, EvolutionOp.UPDATE, "o2")]
    assert store.user_history("globex", "u1") == []


def test_session_markers_are_read_in_one_batch_per_tenant_and_user(store):
    """The ingest consumer reads the markers of every session a poll may open at once; each key is
    its own (tenant, user, session): the same session id of another user or tenant is another marker."""
    store.set_session_state("acme", "u1", "s1", "done", 3)
    store.set_session_state("acme", "u2", "s1", "extracted", 2)
    keys = [("acme", "u1", "s1"), ("acme", "u2", "s1"), ("globex", "u1", "s1"), ("acme", "u1", "s2")]
    states = store.session_states(keys)
    assert {k: (v.state, v.n_observations) for k, v in states.items()} == {
        ("acme", "u1", "s1"): ("done", 3), ("acme", "u2", "s1"): ("extracted", 2)}
    assert store.session_states([]) == {}
    assert store.session_state("globex", "u1", "s1") is None
    assert store.session_state("acme", "u1", "s1").state == "done"
