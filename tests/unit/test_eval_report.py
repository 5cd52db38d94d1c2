"""Report arithmetic on hand-made rows: micro-averages, per-category scores, J with unparsed replies,
latency percentiles, the memory/full-context token ratio, the Pareto frontier and the anchors file."""

from __future__ import annotations

import pytest

from tsubasa.eval.plots import pareto_front
from tsubasa.eval.report import markdown, published_anchors, summarize, token_ratio


def _row(system, k, cat, f1, label, tokens, latency, judge="local:m", extra=None, recall=None):
    return {"key": f"{system}|{k}|{cat}-{f1}-{latency}", "system": system, "k": k, "category": cat, "f1": f1,
            "f1_locomo": f1 / 2, "bleu1": f1 / 4, "judge_label": label, "judge": judge, "judge_error": None,
            "grounding_tokens": tokens, "prompt_tokens": tokens + 50, "latency_s": latency,
            "evidence_recall": recall, "extra": extra or {}}


def test_summaries_are_micro_averages_with_categories_and_judge_counts():
    rows = [
        _row("memory-evolving", 3, 1, 1.0, "CORRECT", 60, 1.0, recall=1.0),
        _row("memory-evolving", 3, 4, 0.5, "WRONG", 70, 2.0, recall=0.0),
        _row("memory-evolving", 3, 4, 0.0, None, 50, 3.0),  # judge reply without a label
        _row("full-context", None, 4, 0.3, "CORRECT", 6000, 4.0,
             extra={"truncated": True, "full_tokens": 18000}),
    ]
    mem, full = summarize(rows)
    assert (mem.system, mem.k, mem.label) == ("memory-evolving", 3, "memory-evolving@k=3")
    assert mem.overall.n == 3
    assert mem.overall.f1 == pytest.approx(50.0)
    assert mem.overall.f1_locomo == pytest.approx(25.0) and mem.overall.bleu1 == pytest.approx(12.5)
    assert mem.overall.j == pytest.approx(100 / 3)  # the unlabelled reply counts as WRONG
    assert mem.judge_unparsed == 1 and mem.judges == ["local:m"]
    assert mem.categories[1].f1 == pytest.approx(100.0) and mem.categories[4].f1 == pytest.approx(25.0)
    assert mem.grounding_tokens == pytest.approx(60.0)
    assert mem.latency_p50_s == pytest.approx(2.0) and mem.latency_p95_s == pytest.approx(2.9)
    assert mem.evidence_recall == pytest.approx(50.0)  # rows without evidence are left out
    assert full.truncated == pytest.approx(100.0) and full.full_history_tokens == 18000
    ratio = token_ratio([mem, full])
    assert ratio.ratio == pytest.approx(100.0) and ratio.history_ratio == pytest.approx(300.0)
    assert "100.0x fewer" in ratio.sentence()


def test_unjudged_rows_have_no_j_and_the_report_says_so():
    rows = [_row("rag-turns", 3, 2, 0.2, None, 90, 1.0, judge=None)]
    (s,) = summarize(rows)
    assert s.overall.j is None
    text = markdown([s])
    assert "J: not computed" in text and "### J by category" not in text
    assert token_ratio([s]) is None


def test_pareto_front_keeps_only_points_nothing_cheaper_beats():
    pts = [(60, 6.0), (70, 5.5), (120, 8.2), (8000, 6.1), (8000, 9.0)]
    assert pareto_front(pts) == [(60, 6.0), (120, 8.2), (8000, 9.0)]


def test_published_anchors_name_source_backbone_and_provenance():
    anchors = published_anchors()
    assert any(a["system"].startswith("TSUBASA") and a["overall"]["f1"] == 45.24 for a in anchors)
    assert any(a["system"] == "Memory-R1" and a["overall"]["f1"] == 45.02 for a in anchors)
    for a in anchors:
        assert a["source"] and a["backbone"] and a["provenance"]
