"""The write path on real Milvus Lite and the real embedder; the model's replies are scripted where
a test needs a specific decision (RECONCILE, malformed output), never the code under test."""

from datetime import UTC, datetime, timedelta

import pytest
from scripted import ScriptedEngine

from tsubasa.config import MemoryConfig
from tsubasa.memory.writer import MemoryWriter
from tsubasa.schema import Event, EventKind, EvolutionOp

pytestmark = pytest.mark.integration

T0 = datetime(2023, 5, 8, 14, 0, tzinfo=UTC)


def session(tenant, user, sid, day, lines):
    evs = [Event(event_id=f"{sid}-{i}", tenant_id=tenant, user_id=user, session_id=sid,
                 timestamp=T0 + timedelta(days=day, seconds=i), speaker="Caroline", text=text,
                 source_id=f"{sid}:{i}") for i, text in enumerate(lines)]
    evs.append(Event(event_id=f"{sid}-end", tenant_id=tenant, user_id=user, session_id=sid,
                     timestamp=T0 + timedelta(days=day, seconds=99), kind=EventKind.SESSION_END))
    return evs


def is_extraction(prompt) -> bool:
    return any(k in prompt[-1].content for k in ("this conversation tells about", "List facts about"))


class Replies:
    """Extraction replies by session, decision replies in order."""

    def __init__(self, extractions: dict[str, str], decisions: list[str]):
        self.extractions, self.decisions = extractions, list(decisions)
        self.n_extract = self.n_decide = 0

    def __call__(self, prompt):
        text = prompt[-1].content
        if is_extraction(prompt):
            self.n_extract += 1
            return next(v for k, v in self.extractions.items() if k in text)
        self.n_decide += 1
        return self.decisions.pop(0)


def forced_llm_cfg(**kw):
    # Route every observation with a neighbour to the LLM (no similarity shortcuts). These tests are
    # about evolution mechanics with scripted replies; the guards have their own tests below.
    kw.setdefault("guards", False)
    return MemoryConfig(add_below_similarity=-1.0, ignore_above_similarity=0.999, **kw)


def test_reconcile_keeps_both_states_and_history(store, embedder):
    replies = Replies(
        {"Boston": "- [2023-05-08] Caroline lives in Boston with her partner. (turns: s1:0)",
         "Denver": "- [2023-06-01] Caroline moved to Denver for a new job as a counselor. (turns: s2:0)"},
        ["OPERATION: RECONCILE 1\nMEMORY: On 2023-05-08 Caroline lived in Boston with her partner; "
         "on 2023-06-01 Caroline moved to Denver for a new counseling job."])
    w = MemoryWriter(store, embedder, ScriptedEngine(replies), forced_llm_cfg())
    w.ingest(session("acme", "caro", "s1", 0, ["I live in Boston with my partner."]))
    w.ingest(session("acme", "caro", "s2", 24, ["Big news: I moved to Denver for a counseling job!"]))
    mems = store.list_memories("acme", "caro")
    assert len(mems) == 1
    m = mems[0]
    assert m.version == 2 and m.last_op == EvolutionOp.RECONCILE
    assert "Boston" in m.text and "Denver" in m.text
    assert m.source_ids == ["s1:0", "s2:0"]
    hist = store.memory_history("acme", "caro", m.memory_id)
    assert [(v.version, v.op) for v in hist] == [(1, EvolutionOp.ADD), (2, EvolutionOp.RECONCILE)]
    assert hist[0].text == "Caroline lives in Boston with her partner."


BAD_DECISIONS = [
    "",
    "The new memory is: something vague",
    "UPDATE 7\nMEMORY: index out of range here",
    "RECONCILE\nMEMORY: no index at all given",
    '{"operation": "MERGE", "index": 1}',
    "UPDATE 1\nMEMORY:",  # UPDATE without the merged text
    "\x00\x00",
    "ADD ADD ADD IGNORE?",  # parseable: first op wins (ADD)
]


SEED = "- [2023-05-01] Caroline lives in Boston with her partner and two cats. (turns: s0:0)"


def seeded(store, embedder, cfg):
    """A user whose memory already holds one fact, so later observations go to the LLM."""
    w = MemoryWriter(store, embedder, ScriptedEngine(Replies({"Conversation between": SEED}, [])), cfg)
    w.ingest(session("acme", "caro", "s0", -7, ["I live in Boston with my partner and our cats."]))


def test_malformed_decisions_never_lose_an_observation(store, embedder):
    seeded(store, embedder, forced_llm_cfg())
    facts = [f"Caroline {w} on day {i}." for i, w in enumerate(
        ["adopted a grey cat named Pixel", "ran a charity race for mental health", "painted a lake sunrise",
         "joined a pottery class downtown", "visited her grandmother in Ohio", "started learning the violin",
         "signed up for a counseling course", "bought a used camper van"])]
    extraction = "\n".join(f"- [2023-05-08] {f} (turns: s1:0)" for f in facts)
    replies = Replies({"Conversation between": extraction}, list(BAD_DECISIONS))
    w = MemoryWriter(store, embedder, ScriptedEngine(replies), forced_llm_cfg())
    _, results = w.ingest(session("acme", "caro", "s1", 0, ["Lots happened lately, let me tell you."]))
    mems = store.list_memories("acme", "caro")
    assert len(mems) == 1 + len(facts)  # every malformed reply falls back to ADD
    assert set(facts) <= {m.text for m in mems}
    assert results[0].fallbacks == len(BAD_DECISIONS) - 1  # "ADD ADD ADD IGNORE?" is a plain ADD
    assert replies.n_decide == len(BAD_DECISIONS)


def test_two_decisions_on_one_memory_in_a_batch_are_applied_in_order(store, embedder):
    seeded(store, embedder, forced_llm_cfg())
    extraction = ("- [2023-05-08] Caroline adopted a third cat named Pixel. (turns: s1:0)\n"
                  "- [2023-05-08] Caroline moved from Boston to Denver with her partner. (turns: s1:1)")
    replies = Replies({"Conversation between": extraction}, [
        "OPERATION: UPDATE 1\nMEMORY: Caroline lives in Boston with her partner and three cats.",
        "OPERATION: RECONCILE 1\nMEMORY: stale text based on the old version of memory one",
        # asked again after the UPDATE changed memory 1:
        "OPERATION: RECONCILE 1\nMEMORY: On 2023-05-01 Caroline lived in Boston with her partner and three "
        "cats; on 2023-05-08 Caroline moved to Denver with them."])
    w = MemoryWriter(store, embedder, ScriptedEngine(replies), forced_llm_cfg())
    w.ingest(session("acme", "caro", "s1", 0, ["Pixel joined us!", "And we moved to Denver."]))
    (m,) = store.list_memories("acme", "caro")
    assert replies.n_decide == 3 and m.version == 3
    assert "Denver" in m.text and "three cats" in m.text
    assert [v.op for v in store.memory_history("acme", "caro", m.memory_id)] == [
        EvolutionOp.ADD, EvolutionOp.UPDATE, EvolutionOp.RECONCILE]

def test_replay_is_a_no_op_and_never_asks_the_llm_again(store, embedder):
    replies = Replies({"Conversation between": "- [2023-05-08] Caroline joined a choir in Boston. (turns: s1:0)"}, [])
    w = MemoryWriter(store, embedder, ScriptedEngine(replies), MemoryConfig())
    evs = session("acme", "caro", "s1", 0, ["I joined a choir!"])
    w.ingest(evs)
    before = store.counts("acme")
    appended, results = w.ingest(evs)
    assert appended.new_turns == 0 and results[0].skipped
    assert store.counts("acme") == before and replies.n_extract == 1


class FailingEmbedder:
    """The real embedder, except that the Nth call raises (a worker killed mid-session)."""

    def __init__(self, real, fail_on: str):
        self.real, self.fail_on, self.dim = real, fail_on, real.dim

    def embed(self, texts):
        if any(self.fail_on in t for t in texts):
            raise RuntimeError("worker killed")
        return self.real.embed(texts)


def test_crash_mid_evolution_resumes_without_reasking(store, embedder):
    seeded(store, embedder, forced_llm_cfg())
    facts = ["Caroline adopted a dog named Max.", "Caroline started pottery classes.", "Caroline bought a camper."]
    extraction = "\n".join(f"- [2023-05-08] {f} (turns: s1:0)" for f in facts)
    replies = Replies({"Conversation between": extraction}, [
        "OPERATION: ADD\nMEMORY:",
        "OPERATION: UPDATE 1\nMEMORY: Caroline lives in Boston with her partner, two cats and a pottery wheel.",
        "OPERATION: ADD\nMEMORY:"])
    evs = session("acme", "caro", "s1", 0, ["Dogs, pottery and a camper."])
    w1 = MemoryWriter(store, FailingEmbedder(embedder, "pottery wheel"), ScriptedEngine(replies), forced_llm_cfg())
    with pytest.raises(RuntimeError, match="worker killed"):
        w1.ingest(evs)
    assert store.session_state("acme", "caro", "s1").state == "extracted"
    again = Replies({}, [])
    MemoryWriter(store, embedder, ScriptedEngine(again), forced_llm_cfg()).ingest(evs)
    assert again.n_extract == 0 and again.n_decide == 0  # nothing is asked twice
    texts = sorted(m.text for m in store.list_memories("acme", "caro"))
    assert texts == sorted([facts[0], facts[2],
                            "Caroline lives in Boston with her partner, two cats and a pottery wheel."])
    assert store.session_state("acme", "caro", "s1").state == "done"
    versions = sorted(len(store.memory_history("acme", "caro", m.memory_id))
                      for m in store.list_memories("acme", "caro"))
    assert versions == [1, 1, 2]


def test_static_mode_appends_every_observation(store, embedder):
    facts = ["Caroline joined a choir in Boston.", "Caroline joined the Boston choir."]
    replies = Replies({"Conversation between": "\n".join(f"- [2023-05-08] {f}" for f in facts)}, [])
    w = MemoryWriter(store, embedder, ScriptedEngine(replies), MemoryConfig(mode="static", guards=False))
    w.ingest(session("acme", "caro", "s1", 0, ["I joined a choir in Boston!"]))
    assert len(store.list_memories("acme", "caro")) == 2 and replies.n_decide == 0
    obs = store.list_observations("acme", "caro")
    assert all(o.source_ids == ["s1:0"] and o.attributed for o in obs)  # provenance inferred


def test_tiny_qwen3_end_to_end(store, embedder, tiny_engine):
    """Real tiny random Qwen3 output (garbage) flows through without errors or lost turns."""
    w = MemoryWriter(store, embedder, tiny_engine, MemoryConfig(extract_max_new_tokens=24))
    appended, results = w.ingest(session("acme", "caro", "s1", 0, ["I adopted a dog.", "His name is Max."]))
    assert appended.new_turns == 2 and results[0].observations >= 0
    assert store.session_state("acme", "caro", "s1").state == "done"


def test_guards_refuse_unsupported_lines_and_merges_that_splice_or_drop(store, embedder):
    seeded(store, embedder, forced_llm_cfg())
    extraction = ("- Caroline adopted a third cat named Pixel.\n"
                  "- Caroline won the lottery in Paris and bought a castle.\n"  # nothing in the turns says so
                  "- Caroline took Pixel to the vet in Boston.")
    replies = Replies({"Conversation between": extraction}, [
        # drops the observation: the new cat and its name are gone
        "OPERATION: UPDATE 1\nMEMORY: Caroline lives in Boston with her partner and her cats.",
        # splices in what neither text says
        "OPERATION: UPDATE 1\nMEMORY: Caroline lives in Boston with her partner, two cats and Pixel; "
        "Melanie paints sunsets at the lake every weekend."])
    w = MemoryWriter(store, embedder, ScriptedEngine(replies), forced_llm_cfg(guards=True))
    _, results = w.ingest(session("acme", "caro", "s1", 0, ["We adopted a third cat, her name is Pixel!",
                                                            "Took Pixel to the vet in Boston today."]))
    texts = {m.text for m in store.list_memories("acme", "caro")}
    assert not any("lottery" in t for t in texts)  # the invented line never became a memory
    assert {"Caroline adopted a third cat named Pixel.", "Caroline took Pixel to the vet in Boston."} <= texts
    assert "Caroline lives in Boston with her partner and two cats." in texts  # nothing destroyed
    assert results[0].fallbacks == 2 and replies.n_decide == 2


def test_speaker_check_vetoes_another_target_speakers_fact_not_an_assistants_echo(embedder):
    """A fact closer to another *target* speaker's turns is that speaker's and is dropped; an assistant
    paraphrasing the user's fact back has no life of its own to misattribute and vetoes nothing."""
    from tsubasa.memory.observe import ObservationExtractor
    from tsubasa.schema import Turn

    def turns(lines):
        return [Turn(event_id=f"e{i}", tenant_id="acme", user_id="u", session_id="s1", speaker=sp, text=tx,
                     timestamp=T0 + timedelta(seconds=i), source_id=f"s1:{i}", seq=i)
                for i, (sp, tx) in enumerate(lines)]

    chat = turns([("Caroline", "ugh so tired lol. we finally repaired the old canoe w my brother this weekend"),
                  ("assistant", "Caroline, you repaired the old canoe with your brother over the weekend? Lovely!")])
    fact = "- Caroline repaired the old canoe with her brother over the weekend."
    ex = ObservationExtractor(ScriptedEngine(lambda p: fact), embedder, MemoryConfig())
    obs, stats = ex.extract(chat)
    assert [o.text for o in obs] == [fact[2:]] and not stats.dropped.get("other_speakers_turns")
    # Declared a target speaker, the assistant's echo would veto the fact: the rule, not luck, keeps it.
    ex = ObservationExtractor(ScriptedEngine(lambda p: fact if "about Caroline" in p[-1].content else ""),
                              embedder, MemoryConfig(target_speakers=["Caroline", "assistant"]))
    obs, stats = ex.extract(chat)
    assert obs == [] and stats.dropped["other_speakers_turns"] == 1


def two_speaker_session(tenant, user, sid, lines):
    """A session whose turns alternate Caroline / Melanie (lines given in order)."""
    evs = [Event(event_id=f"{sid}-{i}", tenant_id=tenant, user_id=user, session_id=sid,
                 timestamp=T0 + timedelta(seconds=i), speaker=("Caroline", "Melanie")[i % 2], text=text,
                 source_id=f"{sid}:{i}") for i, text in enumerate(lines)]
    evs.append(Event(event_id=f"{sid}-end", tenant_id=tenant, user_id=user, session_id=sid,
                     timestamp=T0 + timedelta(seconds=99), kind=EventKind.SESSION_END))
    return evs


def test_windowed_extraction_asks_per_window_and_keeps_provenance_near(store, embedder):
    lines = ["I adopted a puppy named Max last week.", "Lovely! Dogs are great company.",
             "Max loves chasing squirrels in the park.", "Haha, squirrels are fast.",
             "I started learning the violin yesterday.", "Music is such a joy.",
             "My violin teacher is called Anna.", "She sounds kind."]

    def reply(prompt):
        text = prompt[-1].content
        if "Existing memories:" in text:
            return "OPERATION: ADD\nMEMORY:"
        if "tells about Caroline" not in text:
            return ""
        if "violin" in text.split("List what")[0]:
            return ("- Caroline started learning the violin.\n- Caroline adopted a puppy named Max.\n"
                    "- Caroline's violin teacher is called Anna.")
        return "- Caroline adopted a puppy named Max.\n- Caroline's dog Max loves chasing squirrels in the park."

    engine = ScriptedEngine(reply)
    cfg = MemoryConfig(extract_window_turns=4, mode="static")
    w = MemoryWriter(store, embedder, engine, cfg)
    w.ingest(two_speaker_session("acme", "caro", "s1", lines))
    asks = [p for p in engine.prompts if is_extraction(p)]
    assert len(asks) == 4  # two windows x two speakers, each prompt holding only its window's turns
    assert all(sum(line in p[-1].content for line in lines) == 4 for p in asks)
    obs = {o.text: o.source_ids for o in store.list_observations("acme", "caro")}
    # the second window repeats the puppy: dropped as a repeat across windows of one session
    assert sorted(obs) == sorted(["Caroline adopted a puppy named Max.",
                                  "Caroline's dog Max loves chasing squirrels in the park.",
                                  "Caroline started learning the violin.",
                                  "Caroline's violin teacher is called Anna."])
    # provenance is sought inside the window the line came from
    assert set(obs["Caroline started learning the violin."]) <= {"s1:4", "s1:5", "s1:6", "s1:7"}
    assert set(obs["Caroline adopted a puppy named Max."]) <= {"s1:0", "s1:1", "s1:2", "s1:3"}


def test_merge_into_a_dissimilar_memory_is_added_instead(store, embedder):
    seeded(store, embedder, forced_llm_cfg())  # "Caroline lives in Boston with her partner and two cats."
    replies = Replies({"Conversation between": "- Caroline ran a charity marathon for mental health."}, [
        "OPERATION: UPDATE 1\nMEMORY: Caroline lives in Boston with her partner and two cats and ran a charity "
        "marathon for mental health."])
    w = MemoryWriter(store, embedder, ScriptedEngine(replies), forced_llm_cfg(guards=True, merge_min_similarity=0.5))
    _, results = w.ingest(session("acme", "caro", "s1", 0, ["I ran a charity marathon for mental health!"]))
    texts = sorted(m.text for m in store.list_memories("acme", "caro"))
    assert texts == ["Caroline lives in Boston with her partner and two cats.",
                     "Caroline ran a charity marathon for mental health."]
    assert results[0].fallbacks == 1 and replies.n_decide == 1
    (o,) = [o for o in store.session_observations("acme", "caro", "s1")]
    assert o.decision.op == EvolutionOp.ADD and "target similarity" in o.decision.reason


def test_candidates_listed_nearest_last_map_the_listed_number_back(store, embedder):
    """`memory.candidate_order: nearest_last` lists the nearest memory last; the number the manager
    answers is the number as listed, and the memory it names is the one changed."""
    cfg = forced_llm_cfg(candidate_order="nearest_last")
    first = Replies({"Conversation between": "\n".join([
        "- Caroline adopted a dog named Max.", "- Caroline started pottery classes.", "- Caroline bought a camper."])},
        ["OPERATION: ADD\nMEMORY:", "OPERATION: ADD\nMEMORY:"])
    MemoryWriter(store, embedder, ScriptedEngine(first), cfg).ingest(
        session("acme", "caro", "s1", 0, ["Dogs, pottery and a camper."]))
    assert len(store.list_memories("acme", "caro")) == 3
    shown: list[list[str]] = []

    def decide(prompt):
        text = prompt[-1].content
        if is_extraction(prompt):
            return "- Caroline's dog Max learned to fetch."
        listed = [ln for ln in text.split("Existing memories:\n", 1)[1].split("\n\n", 1)[0].splitlines()]
        shown.append(listed)
        n = next(ln.split(".", 1)[0] for ln in listed if "dog" in ln)
        return f"OPERATION: UPDATE {n}\nMEMORY: Caroline adopted a dog named Max, who learned to fetch."

    MemoryWriter(store, embedder, ScriptedEngine(decide), cfg).ingest(
        session("acme", "caro", "s2", 1, ["Max learned to fetch!"]))
    (listed,) = shown
    assert len(listed) == 3 and "dog" in listed[-1] and listed[-1].startswith("3. ")  # the nearest, last
    texts = sorted(m.text for m in store.list_memories("acme", "caro"))
    assert texts == ["Caroline adopted a dog named Max, who learned to fetch.", "Caroline bought a camper.",
                     "Caroline started pottery classes."]
