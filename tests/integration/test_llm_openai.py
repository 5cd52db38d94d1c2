"""The openai engine against a real OpenAI-compatible endpoint: llama.cpp's own HTTP server (through
xllamacpp, SmolLM2-135M GGUF), with an API key."""

from __future__ import annotations

import pytest
from testenv import MODEL_CACHE

from tsubasa.config import ModelConfig
from tsubasa.llm import EngineCapabilityError, load_engine, msgs
from tsubasa.llm.base import SamplingParams

pytestmark = pytest.mark.integration
xllamacpp = pytest.importorskip("xllamacpp")
pytest.importorskip("openai")
KEY = "sk-test-endpoint-key"


@pytest.fixture(scope="module")
def endpoint():
    from tsubasa.llm.models import smollm2_gguf_path

    p = xllamacpp.CommonParams()
    p.model.path = str(smollm2_gguf_path())
    p.n_ctx = 1024
    p.cpuparams.n_threads = p.cpuparams_batch.n_threads = 1
    p.verbosity, p.warmup = -1, False
    p.api_keys = [KEY]
    server = xllamacpp.Server(p)
    yield server.listening_address + "/v1"
    del server


def test_generation_through_an_openai_compatible_endpoint(endpoint, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    eng = load_engine(ModelConfig(name="smollm2-135m-instruct", engine="openai", base_url=endpoint,
                                  cache_dir=MODEL_CACHE, parallel=2), shared=False)
    prompts = [msgs(("user", "Name three fruits.")), msgs(("user", "Say hello."))]
    gens = eng.generate(prompts, SamplingParams(max_new_tokens=8))
    assert all(g.text and 0 < g.completion_tokens <= 8 and g.prompt_tokens > 0 for g in gens)
    assert [g.text for g in gens] == [g.text for g in eng.generate(prompts, SamplingParams(max_new_tokens=8))]
    assert eng.token_counting == "tokenizer" and eng.count_tokens("hello world") == 2
    with pytest.raises(EngineCapabilityError, match="adapter"):
        eng.generate(prompts[:1], adapters=["acme/alice/v0001"])


def test_a_wrong_key_is_refused(endpoint):
    import openai

    from tsubasa.config import load_settings

    s = load_settings(model={"name": "smollm2-135m-instruct", "engine": "openai", "base_url": endpoint,
                             "api_key": "sk-wrong", "cache_dir": str(MODEL_CACHE)})
    eng = load_engine(s.model, shared=False)
    with pytest.raises(openai.AuthenticationError):
        eng.generate([msgs(("user", "hi"))], SamplingParams(max_new_tokens=2))
