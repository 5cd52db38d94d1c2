"""The multi-LoRA layer on real models (tiny-qwen3 and SmolLM2-135M): mixed-adapter batches give
the same greedy tokens as peft's `adapter_names` path for the same PEFT directories, adapters of
different ranks and scalings share one batch, and slots are written back to PEFT directories that
peft reads unchanged."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from lora import make_random_lora
from peft_engine import PeftEngine

from tsubasa.llm import SamplingParams, msgs
from tsubasa.llm.hf import HFEngine
from tsubasa.llm.multilora import MultiLoraModel

pytestmark = pytest.mark.integration

QUESTIONS = ["Where does Caroline live?", "Name a dog.", "What did Melanie paint last summer by the lake?",
             "Who is Jo?", "When is the marathon?", "Which instrument do I play?"]


def _adapters(base: str, root, n: int, scale: float) -> dict[str, str]:
    """n adapters of ranks 8 / 4 / 16 and different alphas and targets (rank padding + scaling)."""
    ranks = [8, 4, 16]
    out = {}
    for i in range(n):
        path = make_random_lora(base, root / f"a{i}", seed=i, rank=ranks[i % 3], scale=scale)
        if i % 3 == 1:  # a different alpha: scaling is per adapter
            cfg = json.loads((root / f"a{i}" / "adapter_config.json").read_text())
            cfg["lora_alpha"] = 3 * cfg["r"]
            (root / f"a{i}" / "adapter_config.json").write_text(json.dumps(cfg))
        out[f"t/u{i}/v0001"] = path
    return out


@pytest.mark.parametrize("model", ["tiny-qwen3", pytest.param("smollm2-135m-instruct", marks=pytest.mark.slow)])
def test_mixed_adapter_generation_is_token_identical_to_peft(model, tiny_cfg, tmp_path):
    cfg = tiny_cfg.model_copy(update={"name": model, "batch_size": 8, "max_loaded_adapters": 8})
    ours, ref = HFEngine(cfg), PeftEngine(cfg)
    tiny = model == "tiny-qwen3"
    adapters = _adapters(ours.path, tmp_path, 4 if tiny else 3, 0.5 if tiny else 0.1)
    for name, path in adapters.items():
        ours.load_adapter(name, path)
        ref.load_adapter(name, path)
    names = [*adapters, None]
    rows = [(q, names[i % len(names)]) for i, q in enumerate(QUESTIONS * 2)]
    prompts = [msgs(("user", q)) for q, _ in rows]
    which = [a for _, a in rows]
    params = SamplingParams(max_new_tokens=12 if tiny else 8)
    got, want = ours.generate(prompts, params, adapters=which), ref.generate(prompts, params, adapters=which)
    assert [g.token_ids for g in got] == [g.token_ids for g in want]
    # every adapter changes the base model's tokens for the same prompt
    same_q = [msgs(("user", QUESTIONS[0]))] * len(names)
    toks = [tuple(g.token_ids) for g in ours.generate(same_q, params, adapters=names)]
    assert len(set(toks)) == len(names)
    # and scoring agrees too (log-probs, fp32)
    conts = ["In Boston, near the river."] * len(rows)
    s_ours = ours.score_topd(prompts, conts, d=5, adapters=which)
    s_ref = ref.score_topd(prompts, conts, d=5, adapters=which)
    for a, b in zip(s_ours, s_ref, strict=True):
        np.testing.assert_allclose(a.token_logprobs, b.token_logprobs, atol=2e-4)


def test_slot_state_round_trips_through_a_peft_directory(tiny_cfg, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    engine = HFEngine(tiny_cfg)
    path = make_random_lora(engine.path, tmp_path / "a", seed=3, rank=4)
    lora = MultiLoraModel(engine.base_model, slots=2)
    lora.load_peft(1, path)
    saved = load_file(tmp_path / "a" / "adapter_model.safetensors")
    state = lora.slot_state(1)
    assert sorted(state) == sorted(saved) and all(torch.equal(state[k], saved[k]) for k in saved)
    x = torch.tensor([engine.prompt_ids(msgs(("user", QUESTIONS[2])))] * 2)
    with torch.no_grad(), lora.route([1, -1]):
        out = engine.base_model(input_ids=x).logits
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(engine.path), path).eval()
    with torch.no_grad():
        want = peft_model(input_ids=x[:1]).logits
        base = peft_model.get_base_model()
        with peft_model.disable_adapter():
            plain = base(input_ids=x[:1]).logits
    torch.testing.assert_close(out[:1], want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1:], plain, atol=1e-6, rtol=1e-6)


def test_unsupported_adapters_are_refused_with_the_reason(tiny_cfg, tmp_path):
    engine = HFEngine(tiny_cfg)
    path = make_random_lora(engine.path, tmp_path / "a", seed=1, rank=2)
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(ValueError, match="use_dora"):
        engine.load_adapter("t/u/v0001", path)
    assert engine.loaded_adapters() == []
