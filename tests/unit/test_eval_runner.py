"""Run-directory mechanics without a model: torn rows, spec checks on resume, judging after the fact."""

from __future__ import annotations

import json

import pytest
from scripted import ScriptedEngine

from tsubasa.eval.judge import EngineJudge
from tsubasa.eval.runner import (
    JUDGEMENTS_FILE,
    ROWS_FILE,
    JudgeMismatchError,
    RunSpec,
    RunSpecMismatchError,
    judge_run,
    load_or_create_spec,
    read_rows,
    row_key,
)


def _spec(**kw) -> RunSpec:
    return RunSpec(**({"systems": ["rag-turns"], "conversations": ["conv-26"], "model": "m"} | kw))


def _write_rows(run_dir, n_per_system=2, systems=("rag-turns", "memory-evolving")):
    rows = []
    for system in systems:
        for i in range(n_per_system):
            rows.append({"key": row_key(system, 3, f"conv-26.q{i:03d}"), "system": system, "k": 3,
                         "qa_id": f"conv-26.q{i:03d}", "category": 4, "question": f"question {i}?",
                         "gold": "Sweden", "prediction": "Sweden", "f1": 1.0, "f1_locomo": 1.0, "bleu1": 1.0,
                         "judge": None, "judge_label": None, "judge_raw": None, "judge_error": None,
                         "grounding_tokens": 10, "prompt_tokens": 20, "latency_s": 0.1, "evidence_recall": None})
    (run_dir / ROWS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def test_row_key_marks_systems_without_k():
    assert row_key("full-context", None, "conv-26.q000") == "full-context|k=-|conv-26.q000"
    assert row_key("rag-turns", 3, "conv-26.q000") == "rag-turns|k=3|conv-26.q000"


def test_read_rows_ignores_a_torn_last_line(tmp_path):
    _write_rows(tmp_path, 1, ("rag-turns",))
    with open(tmp_path / ROWS_FILE, "a") as fh:
        fh.write('{"key": "rag-turns|k=3|conv-26.q0')
    assert len(read_rows(tmp_path)) == 1


def test_spec_resume_checks_answer_fields_and_merges_the_rest(tmp_path):
    load_or_create_spec(tmp_path, _spec())
    merged = load_or_create_spec(tmp_path, _spec(systems=["memory-evolving"], ks=[1]))
    assert merged.systems == ["rag-turns", "memory-evolving"] and merged.ks == [1, 3]
    for field, value in (("model", "other"), ("max_new_tokens", 99), ("prompt_style", "free"), ("tenant", "x"),
                         ("context_tokens", 8192), ("judge", "local:m")):
        with pytest.raises(RunSpecMismatchError, match=field):
            load_or_create_spec(tmp_path, _spec(**{field: value}))


def test_judge_run_after_the_fact_is_resumable_and_single_judge(tmp_path):
    _write_rows(tmp_path)
    judge = EngineJudge(ScriptedEngine(lambda m: '{"label": "CORRECT"}', model_name="j1"))
    assert judge_run(tmp_path, judge, limit=1, batch_size=1) == (2, 0)  # one row per (system, k)
    rows = read_rows(tmp_path)
    assert sum(r["judge"] == "local:j1" for r in rows) == 2
    assert {r["system"] for r in rows if r["judge"]} == {"rag-turns", "memory-evolving"}
    assert judge_run(tmp_path, judge, systems=["rag-turns"]) == (1, 2)
    assert judge_run(tmp_path, judge) == (1, 3)
    assert judge_run(tmp_path, judge) == (0, 4)
    assert all(r["judge_label"] == "CORRECT" for r in read_rows(tmp_path))
    assert len((tmp_path / JUDGEMENTS_FILE).read_text().splitlines()) == 4
    assert all(r["judge"] is None for r in read_rows(tmp_path, with_judgements=False))  # rows stay as answered
    other = EngineJudge(ScriptedEngine(lambda m: "WRONG", model_name="j2"))
    with pytest.raises(JudgeMismatchError, match="local:j1"):
        judge_run(tmp_path, other)
