"""Student batching, prompts and specs: the student's answer positions line up with the engine's
scoring, the student prompt is the evaluation harness's prompt, and training lowers the loss."""

from __future__ import annotations

import numpy as np
import pytest

from tsubasa.config import DistillConfig
from tsubasa.distill.prompts import student_messages
from tsubasa.distill.teacher import QATargets, UserDataset
from tsubasa.distill.train import Example, LoraStudent, TrainSpec, UserTrainer, answer_logits, collate, make_examples
from tsubasa.schema import QAPair


def test_student_prompt_is_the_harness_prompt():
    from tsubasa.eval.systems import CONTEXT_LABELS, answer_messages

    lines = ["[2023-05-07] Ann adopted Milo", "[2023-05-08] Ann runs a bakery"]
    ours = student_messages("What is the cat called?", lines)
    theirs = answer_messages("What is the cat called?", "\n".join(f"- {x}" for x in lines), CONTEXT_LABELS["memories"])
    assert [m.model_dump() for m in ours] == [m.model_dump() for m in theirs]
    assert [m.model_dump() for m in student_messages("Q?", [])] == [
        m.model_dump() for m in answer_messages("Q?", None, "Memories")]


def test_spec_validation_and_tags():
    cfg = DistillConfig()
    assert TrainSpec.from_config(cfg).tag == "tsubasa-kl-d5-k3"
    assert TrainSpec.from_config(cfg, "no_grounding").grounding_k == 0
    assert TrainSpec.from_config(cfg, "vanilla").loss == "lm"
    with pytest.raises(ValueError, match="variant=vanilla"):
        TrainSpec(variant="vanilla", loss="topd_kl")
    with pytest.raises(ValueError, match="renormalize_student"):
        DistillConfig(loss="ce_gold", renormalize_student=True)


def _dataset(engine, n: int = 6) -> UserDataset:
    from tsubasa.distill.prompts import teacher_messages

    qas = [QAPair(qa_id=f"q{i}", tenant_id="t", user_id="u", question=f"What is fact {i}?",
                  answer=f"answer number {i}") for i in range(n)]
    prompts = [teacher_messages(q.question, "Ann: a long chat", ["m one", "m two"]) for q in qas]
    scores = engine.score_topd(prompts, [q.answer for q in qas], d=5)
    items = [QATargets(qa=q, heldout=i == 0, grounding=["m one", "m two"], answer=q.answer,
                       answer_ids=s.token_ids.tolist(), gold_ids=s.token_ids.tolist(), topd_ids=s.topd_ids.tolist(),
                       topd_logprobs=s.topd_logprobs.tolist())
             for i, (q, s) in enumerate(zip(qas, scores, strict=True))]
    return UserDataset(tenant_id="t", user_id="u", base_model="tiny-qwen3", d=5, items=items, corpus_hash="x",
                       vanilla_texts=["Ann: hello there\nBob: hi Ann, how is Milo the cat?"])


def test_collate_aligns_with_engine_scoring(tiny_engine, tiny_cfg):
    import torch

    cfg = DistillConfig(lora_rank=4, lora_alpha=8)
    student = LoraStudent(tiny_cfg, cfg)
    student.reset(0)  # B = 0: the adapter is the identity, the student equals the base model
    ds = _dataset(tiny_engine)
    spec = TrainSpec.from_config(cfg)
    ex = make_examples(ds, spec, student.tokenizer)
    assert len(ex) == 5 and len(make_examples(ds, spec, student.tokenizer, heldout=True)) == 1
    batch = collate(ex, student.pad_id)
    with torch.no_grad():
        logits = answer_logits(student.model.eval(), batch)
    ref = tiny_engine.score_topd([student_messages(it.qa.question, it.grounding[:3]) for it in ds.train],
                                 [it.answer for it in ds.train], d=5)
    for i, s in enumerate(ref):
        a = len(s.token_ids)
        assert batch["mask"][i].sum() == a
        lp = torch.log_softmax(logits[i, -a:], -1)
        top = lp.topk(5, -1)
        assert np.array_equal(top.indices.numpy(), s.topd_ids)
        assert np.allclose(top.values.numpy(), s.topd_logprobs, atol=1e-4)


def test_training_lowers_loss_and_resumes_exactly(tiny_engine, tiny_cfg):
    cfg = DistillConfig(lora_rank=4, lora_alpha=8, learning_rate=5e-3, batch_size=2)
    student = LoraStudent(tiny_cfg, cfg)
    ds = _dataset(tiny_engine)
    spec = TrainSpec.from_config(cfg)
    ex = make_examples(ds, spec, student.tokenizer)
    t = UserTrainer(student, spec, ex, cfg, seed=1)
    losses = [t.run_epoch()["loss"] for _ in range(4)]
    assert losses[-1] < losses[0]
    # Resume: 2 epochs, state, 2 more == 4 straight (same data order, same optimizer state).
    t2 = UserTrainer(student, spec, ex, cfg, seed=1)
    t2.run_epoch()
    t2.run_epoch()
    state = t2.state_dict()
    t3 = UserTrainer(student, spec, ex, cfg, seed=1)
    t3.load_state_dict(state)
    resumed = [t3.run_epoch()["loss"] for _ in range(2)]
    assert resumed == pytest.approx(losses[2:], rel=1e-4)


def test_vanilla_examples_cover_the_conversation(tiny_engine, tiny_cfg):
    cfg = DistillConfig(lora_rank=4, lora_alpha=8)
    student = LoraStudent(tiny_cfg, cfg)
    ex = make_examples(_dataset(tiny_engine), TrainSpec.from_config(cfg, "vanilla"), student.tokenizer,
                       chunk_tokens=8)
    text = "Ann: hello there\nBob: hi Ann, how is Milo the cat?"
    ids = student.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ex[0].prompt_ids == ids[:1] and all(isinstance(e, Example) and e.topd_ids is None for e in ex)
    assert sum(len(e.answer_ids) for e in ex) >= len(ids) - 1


def test_adapter_saved_from_parameters_equals_peft_save(tiny_cfg, tmp_path):
    """The FSDP path saves from (gathered) parameters; the result must be what peft itself writes."""
    import json

    import torch
    from safetensors.torch import load_file

    student = LoraStudent(tiny_cfg, DistillConfig(lora_rank=4, lora_alpha=8))
    student.reset(0)
    for p in student.trainable_parameters():
        p.data.normal_()
    student.save(tmp_path / "peft")
    student.save_state(tmp_path / "ours", {k: v.detach() for k, v in student.lora_parameters().items()})
    a = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    b = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert (json.loads((tmp_path / "peft" / "adapter_config.json").read_text()) ==
            json.loads((tmp_path / "ours" / "adapter_config.json").read_text()))
