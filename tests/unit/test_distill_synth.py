"""Self-learning data: parsing, filters, templates, determinism, cache keys, held-out split.

LLM-mode synthesis runs the real synthesizer with a scripted *model* (tests/support/scripted.py):
the replies are fixed, the parser and the filters are the code under test."""

from __future__ import annotations

from datetime import UTC, date, datetime

import pytest

from tsubasa.config import DistillConfig
from tsubasa.distill.synth import (
    CorpusMemory,
    CorpusTurn,
    JsonCache,
    QAFilter,
    QASynthesizer,
    UserCorpus,
    corpus_facts,
    parse_qa,
    split_heldout,
    synth_cache_key,
    template_qa,
    trivially_dated,
)
from tsubasa.distill.teacher import target_bytes_per_token


def _corpus() -> UserCorpus:
    facts = ["Ann adopted a grey cat named Milo from the city shelter",
             "Ann runs a bakery called Sweet Rolls in Denver",
             "Ann is training for the Boston marathon next spring"]
    return UserCorpus(
        tenant_id="t", user_id="ann",
        turns=[CorpusTurn(source_id=f"D1:{i}", session_id="session_1", speaker="Ann", text=f"Guess what: {f}",
                          session_date="2023-05-08", seq=i) for i, f in enumerate(facts)],
        memories=[CorpusMemory(memory_id=f"m{i}", text=f, event_date=date(2023, 5, 7 + i), source_ids=[f"D1:{i}"],
                               updated_at=datetime(2023, 5, 9, tzinfo=UTC)) for i, f in enumerate(facts)])


def test_parse_qa():
    assert parse_qa("Question: What is Ann's cat called?\nAnswer: Milo.") == ("What is Ann's cat called?", "Milo")
    assert parse_qa("question: where is the bakery Answer: Denver") == ("where is the bakery?", "Denver")
    assert parse_qa("I think the cat is grey") is None
    assert parse_qa("Question: ?\nAnswer: ") is None


@pytest.mark.parametrize(("q", "a", "fact", "why"), [
    ("What is Ann's cat called?", "Milo", "Ann adopted a cat named Milo", None),
    ("What does Ann run?", "a bakery in Denver", "Ann runs a bakery in Denver", None),
    ("What is the cat called?", "unknown", "Ann adopted a cat named Milo", "unanswerable"),
    ("What is the cat called?", "Felix the Great", "Ann adopted a cat named Milo", "unanswerable"),
    ("When did Ann adopt Milo?", "yesterday", "Yesterday Ann adopted Milo", "trivial_date"),
    ("What did Ann do on 7 May 2023?", "7 May 2023", "[2023-05-07] Ann adopted Milo", "trivial_date"),
    ("When did Ann adopt Milo?", "7 May 2023", "[2023-05-07] Ann adopted Milo", None),
    ("Who is Milo?", " ".join(["cat"] * 20), "cat " * 20, "too_long"),
    ("Is the cat named Milo?", "Milo", "Ann adopted a cat named Milo", "unanswerable"),
    ("How have you been?", "I'm so excited to meet you! How have you been?",
     "Ann: I'm so excited to meet you! How have you been?", "not_factoid"),
    ("What is Ann's hobby?", "[2023-05-08] Ann: I'm glad to hear that", "[2023-05-08] Ann: I'm glad to hear that",
     "not_factoid"),
    ('How does this fact end: "Ann: I adopted ..."?', "a cat named Milo", "Ann: I adopted a cat named Milo", None),
])
def test_filter_reasons(q, a, fact, why):
    assert QAFilter(DistillConfig()).reason(q, a, fact) == why


def test_trivially_dated():
    assert trivially_dated("When?", "last week")
    assert not trivially_dated("When did she move?", "June 2023")


def test_near_duplicates_dropped(embedder):
    f = QAFilter(DistillConfig(dedup_similarity=0.9), embedder)
    fact = "Ann adopted a cat named Milo"
    assert f.accept("What is the name of Ann's cat?", "Milo", fact)
    assert not f.accept("What's the name of Ann's cat?", "Milo", fact)
    assert f.accept("Where does Ann live?", "Milo", fact + " she lives in Milo")
    assert f.dropped == {"duplicate": 1}


def test_templates_and_facts():
    c = _corpus()
    facts = corpus_facts(c)
    assert [f.memory_ids for f in facts] == [["m0"], ["m1"], ["m2"]]
    assert facts[0].session_id == "session_1" and facts[0].text.startswith("[2023-05-07] ")
    qa = template_qa(facts[0], max_answer_words=12)
    assert qa[0][1] == "the city shelter" and qa[1] == (
        'When did this happen: "Ann adopted a grey cat named Milo from the city shelter"?', "7 May 2023")


def test_template_synthesis_is_deterministic_with_provenance():
    cfg = DistillConfig(synth_mode="template", qa_per_user=4)
    a, stats = QASynthesizer(None, cfg).synthesize(_corpus())
    b, _ = QASynthesizer(None, cfg).synthesize(_corpus())
    assert [q.qa_id for q in a] == [q.qa_id for q in b] and len(a) == 4 and stats.templates == 4
    assert all(q.memory_ids and q.source_ids and q.session_id == "session_1" for q in a)
    c, _ = QASynthesizer(None, cfg.model_copy(update={"seed": 7})).synthesize(_corpus())
    assert {q.qa_id for q in c} != {q.qa_id for q in a} or [q.qa_id for q in c] != [q.qa_id for q in a]


def test_llm_synthesis_parses_filters_and_tops_up(tiny_engine):
    from scripted import ScriptedEngine

    replies = {"Milo": "Question: What is the name of Ann's cat?\nAnswer: Milo",
               "bakery": "Question: Where is Ann's bakery?\nAnswer: the moon",  # unsupported: dropped
               "marathon": "Sure! Here is a question."}  # unparseable: dropped

    def reply(prompt):
        text = prompt[-1].content
        return next(v for k, v in replies.items() if k in text)

    eng = ScriptedEngine(reply, real=tiny_engine)
    qas, stats = QASynthesizer(eng, DistillConfig(synth_mode="llm", qa_per_user=3)).synthesize(_corpus())
    assert [q.answer for q in qas] == ["Milo"]
    assert stats.dropped == {"unanswerable": 1, "unparseable": 1}
    auto, st2 = QASynthesizer(ScriptedEngine(reply, real=tiny_engine),
                              DistillConfig(synth_mode="auto", qa_per_user=3)).synthesize(_corpus())
    assert len(auto) == 3 and st2.templates == 2 and auto[0].answer == "Milo"


def test_heldout_split_and_cache(tmp_path):
    cfg = DistillConfig(synth_mode="template", qa_per_user=6)
    qas, _ = QASynthesizer(None, cfg).synthesize(_corpus())
    train, held = split_heldout(qas, 0.2)
    assert len(held) == 1 and len(train) == 5 and split_heldout(qas, 0.2)[1] == held
    key = synth_cache_key(_corpus(), "m", cfg, 6)
    assert key == synth_cache_key(_corpus(), "m", cfg, 6) != synth_cache_key(_corpus(), "other", cfg, 6)
    cache = JsonCache(tmp_path)
    assert cache.get("qa", "t", "ann", key) is None
    cache.put("qa", "t", "ann", key, {"qa": [q.model_dump() for q in qas]})
    assert len(cache.get("qa", "t", "ann", key)["qa"]) == 6


def test_target_bytes():
    b = target_bytes_per_token(5, 151_936)
    assert b["topd_bytes"] == 40 and b["full_bytes"] == 607_744 and round(b["ratio"]) == 15194
