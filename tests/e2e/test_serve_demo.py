"""`tsubasa demo` end to end on tiny-qwen3 (the README's main job, made small): local Milvus and
Ray Serve, LoCoMo events through /v1/events, a brief distillation, questions through the openai
client, the answers table."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.integration, pytest.mark.slow]


def test_demo_runs_the_main_job(tmp_path, locomo_path, tiny_cfg):
    env = {**os.environ, "TSUBASA_DATA_DIR": str(tmp_path / "data"), "TSUBASA_MODEL__NAME": "tiny-qwen3",
           "TSUBASA_MODEL__CACHE_DIR": str(tiny_cfg.cache_dir), "TSUBASA_MODEL__MAX_NEW_TOKENS": "16",
           "TSUBASA_LOCOMO": str(locomo_path), "TSUBASA_SERVE__LLM_NUM_CPUS": "1", "TSUBASA_SERVE__RAY_NUM_CPUS": "2",
           "TSUBASA_MEMORY__EXTRACT_MAX_NEW_TOKENS": "32", "COLUMNS": "200"}
    env.pop("TSUBASA_API_KEYS", None)
    proc = subprocess.run([sys.executable, "-m", "tsubasa.cli", "demo", "--sessions", "1", "--questions", "2",
                           "--qa", "2", "--epochs", "1"], env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout
    assert proc.returncode == 0, (out[-3000:], proc.stderr[-3000:])
    assert "LoCoMo questions for demo/conv-26" in out and "memory tokens" in out and "mean F1" in out
    assert "distilling:" in out
    assert "demo/conv-26/v0001" in out, out[-3000:]  # the distilled adapter answered (hot-swapped in)
