"""Serving pieces that need no Ray: key parsing and lookup, adapter pinning against LRU eviction,
mixed-adapter batching with per-step streaming, incremental stream deltas, the grounded prompt."""

from __future__ import annotations

import asyncio

import pytest

from services.serve.auth import APIKeyAuth, AuthError, hash_key, parse_key_spec
from services.serve.llm import AdapterPool, LoadedAdapter, MixedBatcher
from services.serve.serving import build_messages
from services.serve.streaming import TextDeltas
from tsubasa.llm.base import ChatMessage, Generation, SamplingParams
from tsubasa.memory.retrieve import Grounding, GroundingItem


def test_api_keys_map_to_tenants_and_refuse_the_rest():
    spec = f"acme:{hash_key('k1')}, globex:{hash_key('k2')},acme:{hash_key('k3')}"
    auth = APIKeyAuth(parse_key_spec(spec))
    assert auth.tenant_for("Bearer k1") == auth.tenant_for(None, "k3") == "acme"
    assert auth.tenant_for("Bearer k2") == "globex"
    for header in (None, "", "Bearer ", "Basic k1", "Bearer k4"):
        with pytest.raises(AuthError):
            auth.tenant_for(header)
    for bad in ("acme", "acme:xyz", f"bad tenant:{hash_key('k')}", f"a:{hash_key('k')},b:{hash_key('k')}"):
        with pytest.raises(ValueError):
            parse_key_spec(bad)
    assert parse_key_spec("") == {}


class _Engine:
    """Records load/unload calls; generates text naming the adapter of each row."""

    model_name = "fake"

    def __init__(self) -> None:
        self.loaded: dict[str, str] = {}
        self.calls: list[list[str | None]] = []

    def load_adapter(self, name, path):
        self.loaded[name] = path

    def unload_adapter(self, name):
        del self.loaded[name]

    def loaded_adapters(self):
        return list(self.loaded)

    def generate(self, prompts, params=None, adapters=None, on_tokens=None):
        adapters = list(adapters or [None] * len(prompts))
        self.calls.append(adapters)
        for a in adapters:
            assert a is None or a in self.loaded, f"{a} used after unload"
        for step in range(2):  # two generation steps, one token per row each
            for i in range(len(prompts)):
                if on_tokens is not None:
                    on_tokens(i, [10 * i + step])
        return [Generation(text=str(a), token_ids=[10 * i, 10 * i + 1], prompt_tokens=1, completion_tokens=2,
                           finish_reason="stop", adapter=a) for i, a in enumerate(adapters)]


def test_pool_defers_eviction_while_a_request_holds_the_adapter():
    eng = _Engine()
    pool = AdapterPool(eng)
    loaded = LoadedAdapter(pool, "t/u/v0001", "/p1", pool.load("t/u/v0001", "/p1"))
    pool.acquire("t/u/v0001")
    loaded.__del__()  # Serve's LRU evicts it while a request is in flight
    assert "t/u/v0001" in eng.loaded
    pool.release("t/u/v0001")
    assert "t/u/v0001" not in eng.loaded
    loaded.__del__()  # the GC calling it again is harmless


def test_stale_eviction_does_not_unload_a_reloaded_adapter():
    eng = _Engine()
    pool = AdapterPool(eng)
    old = LoadedAdapter(pool, "a", "/p", pool.load("a", "/p"))
    new = LoadedAdapter(pool, "a", "/p", pool.load("a", "/p"))  # reloaded before the old eviction ran
    old.__del__()
    assert "a" in eng.loaded
    new.__del__()
    assert "a" not in eng.loaded


def test_batcher_mixes_adapters_in_one_engine_call():
    eng = _Engine()
    pool = AdapterPool(eng)
    for name in ("a", "b"):
        pool.load(name, f"/{name}")
    batcher = MixedBatcher(eng, max_batch=8, wait_s=0.05)
    msgs = [ChatMessage(role="user", content="q")]

    async def collect(adapter):
        return [step async for step in batcher.stream(msgs, SamplingParams(), adapter)]

    async def go():
        return await asyncio.gather(*(collect(a) for a in ("a", None, "b", "a")))

    streams = asyncio.run(go())
    assert [s[-1].final.text for s in streams] == ["a", "None", "b", "a"]
    assert eng.calls == [["a", None, "b", "a"]]  # one call, four rows, three adapters
    # Each request got its own tokens step by step, then the final step.
    for i, steps in enumerate(streams):
        assert [st.token_ids for st in steps[:-1]] == [[10 * i], [10 * i + 1]] and steps[-1].token_ids == []


def test_text_deltas_arrive_per_step_and_concatenate_to_the_answer():
    pieces = {1: " Hel", 2: "lo", 3: " wor", 4: "ld", 5: "!  ", 6: "\ufffd", 7: "STOP", 8: " more"}

    def decode(ids):
        return "".join(pieces[i] for i in ids).replace("\ufffd!", "\u00e9!")

    d = TextDeltas(decode, [])
    out = [d.push([i]) for i in (1, 2, 3, 4, 5)]
    assert out == ["Hel", "lo", " wor", "ld", "!"]  # trailing spaces are held back: the answer is stripped
    assert d.finish("Hello world!") == ""
    d = TextDeltas(decode, ["STOP"])  # a stop string: held back while it may be starting, cut when seen
    out = [d.push([i]) for i in (1, 2, 7, 8)]
    assert "STOP" not in "".join(out) and "".join(out) + d.finish("Hello") == "Hello"
    d = TextDeltas(decode, [])
    assert d.push([1]) == "Hel" and d.push([6]) == "" and d.push([5]) == "\u00e9!"  # incomplete character


def test_grounded_prompt_is_the_student_prompt_plus_client_context():
    g = Grounding(source="memories", text="", tokens=3,
                  items=[GroundingItem(id="m1", text="On 2023-05-08, Alice adopted a cat.", score=0.9)])
    msgs = build_messages([ChatMessage(role="system", content="Be brief."),
                           ChatMessage(role="user", content="earlier"),
                           ChatMessage(role="assistant", content="ok"),
                           ChatMessage(role="user", content="Which pet?")], g)
    assert [m.role for m in msgs] == ["system", "user", "assistant", "user"]
    assert msgs[0].content.endswith("Be brief.")
    assert "- On 2023-05-08, Alice adopted a cat." in msgs[-1].content and "Which pet?" in msgs[-1].content


def test_deployment_options_follow_the_serve_config():
    from services.serve.app import gateway_deployment_options, llm_deployment_options
    from tsubasa.config import ConfigError, load_settings

    s = load_settings(serve={"autoscaling": True, "min_replicas": 1, "llm_replicas": 2, "max_replicas": 6,
                             "llm_max_queued_requests": 10}, model={"engine": "vllm", "device": "cuda"})
    llm = llm_deployment_options(s)
    assert llm["autoscaling_config"]["max_replicas"] == 6 and "num_replicas" not in llm
    assert llm["ray_actor_options"]["num_gpus"] == 1 and llm["max_queued_requests"] == 10
    gw = gateway_deployment_options(s)
    assert gw["max_ongoing_requests"] > s.serve.max_ongoing_requests + s.serve.max_queued_requests
    assert llm_deployment_options(load_settings())["num_replicas"] == 1
    with pytest.raises(ConfigError, match="min_replicas"):
        load_settings(serve={"autoscaling": True, "llm_replicas": 9, "max_replicas": 4})
