"""`tsubasa eval locomo` as a user runs it: the real MemorySystem on Milvus Lite, tiny-qwen3 answering,
rows written, a report, and a second run that resumes without answering again."""

import json

import pytest
from typer.testing import CliRunner

from tsubasa.cli import app

pytestmark = pytest.mark.integration


def test_eval_locomo_answers_writes_a_report_and_resumes(cli_env):
    run_dir = cli_env / "run"
    args = ["eval", "locomo", "-S", "rag-turns,full-context", "-C", "conv-26", "--limit", "2", "--k", "3",
            "--judge", "none", "--memory", "turns", "--max-new-tokens", "4", "--context-tokens", "512",
            "-t", "ev", "-o", str(run_dir)]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    rows = [json.loads(line) for line in (run_dir / "rows.jsonl").read_text().splitlines()]
    assert sorted({r["system"] for r in rows}) == ["full-context", "rag-turns"]
    assert len(rows) == 4 and all(r["prediction"] is not None for r in rows)
    assert all(r["grounding_tokens"] > 0 for r in rows)  # both read the raw turns the run stored
    spec = json.loads((run_dir / "run.json").read_text())
    assert spec["model"] == "tiny-qwen3" and spec["memory_model"] == "tiny-qwen3 (hf)"

    second = CliRunner().invoke(app, args)
    assert second.exit_code == 0, second.output
    assert "4 already done" in second.output
    assert len((run_dir / "rows.jsonl").read_text().splitlines()) == 4
