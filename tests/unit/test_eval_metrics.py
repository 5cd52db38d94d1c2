"""F1 (Mem0/Memory-R1 and LoCoMo variants), BLEU-1, category mapping and splits against hand-computed cases."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from tsubasa.eval.locomo import (
    CATEGORY_NAMES,
    category_id,
    load_locomo,
    parse_categories,
    select_conversations,
)
from tsubasa.eval.metrics import answer_scores, bleu1, f1, f1_locomo, normalize_answer, percentile, simple_tokens


def test_simple_tokens_strip_only_four_punctuation_marks():
    assert simple_tokens("Hello, World! Is it 7 May? Yes.") == ["hello", "world", "is", "it", "7", "may", "yes"]
    assert simple_tokens("mother-in-law's") == ["mother-in-law's"]  # other punctuation stays, as in Mem0


@pytest.mark.parametrize(("pred", "gold", "expected"), [
    ("A shell necklace.", "a shell necklace", 1.0),
    # pred {she, bought, a, shell, necklace}, gold {a, shell, necklace}: P 3/5, R 1 -> 2*0.6/1.6
    ("She bought a shell necklace", "A shell necklace", 0.75),
    ("paris paris", "Paris", 1.0),  # sets: repeats do not count
    ("7 May, 2023", "7 May 2023", 1.0),
    ("Boston", "Sweden", 0.0),
    ("", "Sweden", 0.0),
    (2022, "2022", 1.0),  # LoCoMo has integer answers
    # pred {in, may}, gold {may, 2023}: P 1/2, R 1/2
    ("in May", "May 2023", 0.5),
])
def test_f1_token_sets(pred, gold, expected):
    assert f1(pred, gold) == pytest.approx(expected)


def test_normalize_answer_drops_commas_punctuation_and_articles():
    assert normalize_answer("The Beach, and a Lake!") == "beach lake"


@pytest.mark.parametrize(("pred", "gold", "cat", "expected"), [
    ("the beach", "beach", 4, 1.0),
    ("paris paris", "paris", 4, 2 / 3),  # multisets: P 1/2, R 1
    # stems: [run, marathon] vs [ran, marathon] (a removed): P 1/2, R 1/2
    ("running marathons", "ran a marathon", 2, 0.5),
    # multi-hop: gold parts Sweden | Boston, each takes its best predicted part: (0 + 1) / 2
    ("Boston", "Sweden, Boston", 1, 0.5),
    # same strings without the multi-hop split: commas dropped, P 1, R 1/2
    ("Boston", "Sweden, Boston", 4, 2 / 3),
    # multi-hop with two predicted parts covering both gold parts
    ("Boston, Sweden", "Sweden, Boston", 1, 1.0),
    # open-domain: only the gold part before the first ';' counts
    ("likely no", "Likely no; though she likes reading", 3, 1.0),
    ("likely no", "Likely no; though she likes reading", 4, 2 * (1.0 * (2 / 6)) / (1 + 2 / 6)),
])
def test_f1_locomo_variant(pred, gold, cat, expected):
    assert f1_locomo(pred, gold, cat) == pytest.approx(expected)


def test_bleu1_hand_computed():
    # unigram precision 2/3 (shell, necklace), equal lengths so no brevity penalty
    assert bleu1("the shell necklace", "A shell necklace") == pytest.approx(2 / 3)
    # precision 1, brevity penalty exp(1 - 3/1)
    assert bleu1("necklace", "a shell necklace") == pytest.approx(math.exp(-2))
    assert bleu1("Sweden", "sweden") == pytest.approx(1.0)
    assert bleu1("", "sweden") == 0.0
    assert bleu1("boston", "sweden") == pytest.approx(0.0, abs=1e-6)


def test_answer_scores_has_every_metric_in_unit_range():
    s = answer_scores("She moved from Sweden", "Sweden", 1)
    assert set(s) == {"f1", "f1_locomo", "bleu1"}
    assert all(0.0 <= v <= 1.0 for v in s.values())
    assert s["f1"] == pytest.approx(2 * 0.25 / 1.25)


def test_percentile_interpolates():
    assert percentile([], 50) == 0.0
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([1.0, 2.0], 95) == pytest.approx(1.95)


def test_category_mapping_by_id_and_name():
    assert CATEGORY_NAMES == {1: "multi-hop", 2: "temporal", 3: "open-domain", 4: "single-hop", 5: "adversarial"}
    assert category_id(2) == 2 and category_id("temporal") == 2 and category_id(" Single-Hop ") == 4
    assert parse_categories("1-4") == [1, 2, 3, 4]
    assert parse_categories("single-hop,1") == [1, 4]
    assert parse_categories("all") == [1, 2, 3, 4, 5]
    for bad in ("6", "hop", "4-2"):
        with pytest.raises(ValueError):
            parse_categories(bad)


def test_locomo_categories_and_splits_on_the_real_file(locomo_path):
    convs = load_locomo(locomo_path)
    qa = [q for c in convs for q in c.qa]
    assert Counter(q.category for q in qa) == {1: 282, 2: 321, 3: 96, 4: 841, 5: 446}
    scored = [q for q in qa if q.scored]
    assert len(scored) == 1540 and all(q.category != 5 for q in scored)
    assert all(isinstance(q.answer, str) for q in scored)  # the six integer answers arrive as strings
    assert len({q.qa_id for q in qa}) == len(qa)
    assert [c.sample_id for c in select_conversations(convs, "train")] == [convs[0].sample_id]
    assert [c.sample_id for c in select_conversations(convs, "validation")] == [convs[1].sample_id]
    assert len(select_conversations(convs, "test")) == 8
    assert [c.sample_id for c in select_conversations(convs, "conv-26,2")] == ["conv-26", convs[1].sample_id]
    assert len(select_conversations(convs, "all")) == 10
    for bad in ("conv-99", "11", "nope"):
        with pytest.raises(ValueError):
            select_conversations(convs, bad)
