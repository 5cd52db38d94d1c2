"""transformers+peft engine on the real tiny random Qwen3: batching, adapters, top-d scoring."""

import numpy as np
import pytest
import torch
from lora import make_random_lora

from tsubasa.llm import AdapterNotLoadedError, SamplingParams, load_engine, msgs
from tsubasa.llm.models import TINY_QWEN3, resolve_model

pytestmark = pytest.mark.integration

PROMPTS = [msgs(("user", "Where does Caroline live?")),
           msgs(("system", "Be brief."), ("user", "Name a dog.")),
           msgs(("user", "A much longer question about the support group Caroline attended in May?"))]


@pytest.fixture(scope="module")
def engine(tiny_cfg):
    return load_engine(tiny_cfg.model_copy(update={"max_loaded_adapters": 2}), shared=False)


@pytest.fixture(scope="module")
def adapters(tiny_cfg, tmp_path_factory):
    base = resolve_model(TINY_QWEN3, tiny_cfg.cache_dir)
    root = tmp_path_factory.mktemp("loras")
    return [make_random_lora(base, root / f"a{i}", seed=i) for i in range(3)]


def test_tiny_qwen3_is_a_qwen3_with_a_real_tokenizer(engine):
    assert engine.base_model.config.model_type == "qwen3"
    assert engine.base_model.config.head_dim in (32, 64)
    assert engine.count_tokens("Caroline joined an LGBTQ support group") > 3
    assert "<|im_start|>" in engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)


def test_batched_greedy_generation_equals_one_by_one(engine):
    params = SamplingParams(max_new_tokens=8)
    batched = engine.generate(PROMPTS, params)
    single = [engine.generate([p], params)[0] for p in PROMPTS]
    assert [g.token_ids for g in batched] == [g.token_ids for g in single]
    assert all(g.prompt_tokens > 0 and g.completion_tokens <= 8 for g in batched)


def test_score_topd_matches_a_full_forward(engine):
    cont = "Caroline lives in Boston"
    s = engine.score_topd([PROMPTS[0]], [cont], d=5)[0]
    ids = engine.prompt_ids(PROMPTS[0]) + engine.continuation_ids(cont)
    with torch.no_grad():
        logp = torch.log_softmax(engine.base_model(torch.tensor([ids])).logits[0].float(), -1)
    n = len(engine.continuation_ids(cont))
    ref = logp[len(ids) - n - 1: len(ids) - 1]
    top = ref.topk(5, dim=-1)
    assert s.topd_ids.shape == (n, 5) and s.d == 5
    np.testing.assert_array_equal(s.topd_ids, top.indices.numpy())
    np.testing.assert_allclose(s.topd_logprobs, top.values.numpy(), atol=1e-4)
    np.testing.assert_allclose(s.token_logprobs, ref.gather(1, torch.tensor(ids[-n:])[:, None])[:, 0].numpy(),
                               atol=1e-4)
    # batching with a different-length neighbour changes nothing
    s2 = engine.score_topd([PROMPTS[2], PROMPTS[0]], ["yes", cont], d=5)[1]
    np.testing.assert_allclose(s2.topd_logprobs, s.topd_logprobs, atol=1e-4)


def test_lm_head_gets_a_contiguous_slice_and_the_same_logits(engine):
    """`logits_to_keep` hands the head a strided slice of a batch; the pre-hook makes it contiguous
    (so matmul folds it into one mm instead of copying the weight per row) without changing logits,
    and installing it twice leaves one hook."""
    from tsubasa.llm.models import contiguous_lm_head

    model = engine.base_model
    head = model.get_output_embeddings()
    n_hooks = len(head._forward_pre_hooks)
    assert n_hooks >= 1 and contiguous_lm_head(model) is model and len(head._forward_pre_hooks) == n_hooks
    enc = engine.tokenizer.pad({"input_ids": [[5, 6, 7, 8, 9, 10], [11, 12, 13], [14, 15, 16, 17]]},
                               return_tensors="pt", padding=True)
    seen = []
    probe = head.register_forward_pre_hook(lambda _m, args: seen.append(args[0].is_contiguous()))
    try:
        with torch.inference_mode():
            kept = model(**enc, logits_to_keep=3).logits
            full = model(**enc).logits[:, -3:]
    finally:
        probe.remove()
    assert seen == [True, True]
    assert torch.allclose(kept, full, atol=1e-5)


def test_mixed_adapter_batches_equal_single_adapter_runs(engine, adapters):
    engine.load_adapter("t1/u1/v0001", adapters[0])
    engine.load_adapter("t2/u1/v0001", adapters[1])
    names = ["t1/u1/v0001", None, "t2/u1/v0001"]
    conts = ["Boston", "Boston", "Boston"]
    p = [PROMPTS[0]] * 3
    mixed = engine.score_topd(p, conts, d=3, adapters=names)
    alone = [engine.score_topd([p[0]], [conts[0]], d=3, adapters=[n])[0] for n in names]
    for m, a in zip(mixed, alone, strict=True):
        np.testing.assert_allclose(m.topd_logprobs, a.topd_logprobs, atol=1e-4)
    assert not np.allclose(mixed[0].token_logprobs, mixed[1].token_logprobs)  # the adapter matters
    assert not np.allclose(mixed[0].token_logprobs, mixed[2].token_logprobs)  # and differs per user
    gens = engine.generate(p, SamplingParams(max_new_tokens=6), adapters=names)
    solo = [engine.generate([p[0]], SamplingParams(max_new_tokens=6), adapters=[n])[0] for n in names]
    assert [g.token_ids for g in gens] == [g.token_ids for g in solo]
    assert [g.adapter for g in gens] == names


def test_adapter_lru_and_unknown_adapter(engine, adapters):
    for i, path in enumerate(adapters):
        engine.load_adapter(f"lru/{i}", path)
    assert engine.loaded_adapters() == ["lru/1", "lru/2"]  # capacity 2: the oldest was evicted
    with pytest.raises(AdapterNotLoadedError):
        engine.generate([PROMPTS[0]], adapters=["lru/0"])
    engine.unload_adapter("lru/1")
    assert engine.loaded_adapters() == ["lru/2"]
    base = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=4))
    assert base[0].adapter is None


def test_provisioning_is_cached_and_local_paths_work(tiny_cfg, tmp_path):
    from tsubasa.llm.models import ModelNotFoundError

    p1 = resolve_model(TINY_QWEN3, tiny_cfg.cache_dir)
    assert resolve_model(TINY_QWEN3, tiny_cfg.cache_dir) == p1
    assert resolve_model(p1, tmp_path) == p1  # a local directory is used as is
    assert resolve_model("Qwen/Qwen3-4B", tmp_path) == "Qwen/Qwen3-4B"  # a hub id is passed through
    with pytest.raises(ModelNotFoundError, match=r"no config\.json"):
        resolve_model(str(tmp_path), tmp_path)
    with pytest.raises(ModelNotFoundError, match="neither a built-in"):
        resolve_model("not a model", tmp_path)
