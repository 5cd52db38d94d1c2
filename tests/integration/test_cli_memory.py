"""The `tsubasa` CLI on real Milvus Lite with tiny-qwen3: idempotent LoCoMo ingest, clear errors."""

import re

import pytest
from typer.testing import CliRunner

from tsubasa.cli import app

pytestmark = pytest.mark.integration


@pytest.fixture()
def env(cli_env, monkeypatch):
    monkeypatch.setenv("TSUBASA_MEMORY__EXTRACT_MAX_NEW_TOKENS", "24")
    return cli_env


def _counts(output: str, title: str) -> str:
    block = output.split(title, 1)[1]
    return re.search(r"t1\s*│\s*conv-26\s*│([^\n]*)", block).group(1)


def test_ingest_twice_adds_nothing(env):
    runner = CliRunner()
    args = ["ingest", "locomo", "-C", "conv-26", "-s", "1", "-t", "t1"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    second = runner.invoke(app, args)
    assert second.exit_code == 0, second.output
    assert "sessions skipped (already processed) 1" in second.output
    assert _counts(second.output, "before") == _counts(second.output, "after") == _counts(first.output, "after")
    assert "new turns 0" in second.output
    search = runner.invoke(app, ["memory", "search", "-t", "t1", "-u", "conv-26", "--source", "turns",
                                 "support group"])
    assert search.exit_code == 0 and "D1:" in search.output
    stats = runner.invoke(app, ["memory", "stats", "-t", "t1"])
    assert stats.exit_code == 0 and "conv-26" in stats.output


def test_bad_input_gets_a_clear_message(env):
    runner = CliRunner()
    r = runner.invoke(app, ["memory", "search", "-t", "t1", "-u", 'x" or 1==1', "q"])
    assert r.exit_code == 2 and "user_id" in r.output and "not a valid identifier" in r.output
    r = runner.invoke(app, ["ingest", "locomo", "-C", "conv-999"])
    assert r.exit_code == 2 and "--conversation" in r.output
    r = runner.invoke(app, ["ingest", "locomo", "-s", "40-41"])
    assert r.exit_code == 2 and "--sessions" in r.output
    r = runner.invoke(app, ["memory", "history", "m0", "-u", "nobody"])
    assert r.exit_code == 1 and "no memory" in r.output


def test_bad_config_names_the_field(env, monkeypatch):
    monkeypatch.setenv("TSUBASA_MEMORY__TOP_K", "-3")
    r = CliRunner().invoke(app, ["memory", "stats"])
    assert r.exit_code == 2 and "memory.top_k" in r.output
