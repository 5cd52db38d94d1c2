"""Summing per-conversation recall files: each question counted once per method, held out apart."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from aggregate_retrieval import aggregate


def _file(tmp_path, conv, n, utter, scoped, memory):
    rec = lambda r: {"questions": n, "recall": {"3": r}, "mean_tokens": {"3": 100.0}}  # noqa: E731
    data = {"conversations": [conv], "summary": {
        "utterance-rag [dense]": rec(utter), "utterance-rag (same convs) [dense]": rec(scoped),
        "tsubasa-evolved (same convs) [dense]": rec(memory)}}
    path = tmp_path / f"{conv}.json"
    path.write_text(json.dumps(data))
    return path


def test_each_question_counts_once_and_the_scoped_figure_wins(tmp_path):
    files = [_file(tmp_path, "conv-26", 150, 0.2, 0.3, 0.4), _file(tmp_path, "conv-30", 50, 0.1, 0.5, 0.6)]
    agg = aggregate(files)
    u = agg["all"]["utterance-rag [dense]"]
    assert u["questions"] == 200 and u["conversations"] == ["conv-26", "conv-30"]
    assert u["recall"]["3"] == (45 + 25) / 200  # the "(same convs)" figures, not the unscoped ones
    held = agg["held_out"]["tsubasa-evolved [dense]"]
    assert held["questions"] == 50 and held["recall"]["3"] == 0.6
    assert "conv-41" in agg["missing"]
