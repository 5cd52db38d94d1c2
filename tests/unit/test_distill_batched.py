"""Batched training (N users' adapters in one forward/backward) against each user trained alone by
the peft `UserTrainer`: same initialisation, data order and optimizer, so the same adapters up to
fp32 summation order; users joining later and leaving early; resume from a user's state; and the
saved adapter is the PEFT directory peft writes."""

from __future__ import annotations

import json

import pytest
import torch

from tsubasa.config import DistillConfig
from tsubasa.distill.batched import BatchedStudent, BatchedTrainer
from tsubasa.distill.teacher import QATargets, UserDataset
from tsubasa.distill.train import LoraStudent, TrainSpec, UserTrainer, make_examples
from tsubasa.schema import QAPair

# fp32: max |batched - alone| over every LoRA weight; measured at most 3.5e-6 (tiny-qwen3, lr 5e-3)
# and 1.0e-5 (SmolLM2-135M, lr 2e-4)
TOL = {"tiny-qwen3": 2e-5, "smollm2-135m-instruct": 5e-5}


def _dataset(engine, user: str, n: int) -> UserDataset:
    from tsubasa.distill.prompts import teacher_messages

    qas = [QAPair(qa_id=f"{user}{i}", tenant_id="t", user_id=user, question=f"What did {user} do on day {i}?",
                  answer=f"{user} went to place {i * 7} with a friend") for i in range(n)]
    prompts = [teacher_messages(q.question, f"{user}: a long chat about day", [f"{user} memory"]) for q in qas]
    scores = engine.score_topd(prompts, [q.answer for q in qas], d=5)
    items = [QATargets(qa=q, heldout=False, grounding=[f"{user} memory", "other"], answer=q.answer,
                       answer_ids=s.token_ids.tolist(), gold_ids=s.token_ids.tolist(), topd_ids=s.topd_ids.tolist(),
                       topd_logprobs=s.topd_logprobs.tolist()) for q, s in zip(qas, scores, strict=True)]
    return UserDataset(tenant_id="t", user_id=user, base_model="tiny-qwen3", d=5, items=items, corpus_hash=user)


def _cfg(**kw) -> DistillConfig:
    return DistillConfig(**{"lora_rank": 4, "lora_alpha": 8, "learning_rate": 5e-3, "batch_size": 2,
                            "max_grad_norm": 0.5, "weight_decay": 0.01, **kw})


def _alone(tiny_cfg, cfg, spec, examples, epochs: int) -> tuple[dict, list[float]]:
    student = LoraStudent(tiny_cfg, cfg)
    t = UserTrainer(student, spec, examples, cfg, seed=cfg.seed)
    losses = [t.run_epoch()["loss"] for _ in range(epochs)]
    return student.adapter_state(), losses


def _max_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize(("model", "loss"), [("tiny-qwen3", "topd_kl"), ("tiny-qwen3", "ce_gold"),
                                           pytest.param("smollm2-135m-instruct", "topd_kl", marks=pytest.mark.slow)])
def test_batched_users_match_each_user_trained_alone(tiny_engine, tiny_cfg, model, loss):
    """Targets come from tiny-qwen3, which shares SmolLM2's tokenizer, so both students train on them.
    SmolLM2 trains at the default learning rate (2e-4): at 5e-3, Adam turns fp32 summation noise in
    the few near-zero gradient entries into whole steps (measured: at most 4.7e-3 after 4 epochs;
    one user, 2 epochs: 1.6e-6 of the weights off by more than 1e-4, losses equal to 6 digits)."""
    tiny_cfg = tiny_cfg.model_copy(update={"name": model})
    cfg = _cfg(loss=loss, **({} if model == "tiny-qwen3" else {"learning_rate": 2e-4}))
    spec = TrainSpec.from_config(cfg)
    student = BatchedStudent(tiny_cfg, cfg, slots=3)
    ex = {u: make_examples(_dataset(tiny_engine, u, n), spec, student.tokenizer)
          for u, n in (("ann", 5), ("bob", 3), ("cy", 7))}  # 3, 2 and 4 steps per epoch
    trainer = BatchedTrainer(student, spec, cfg, seed=cfg.seed)
    trainer.add("ann", ex["ann"])
    trainer.add("bob", ex["bob"])
    got: dict[str, list[float]] = {"ann": [], "bob": [], "cy": []}
    for m in trainer.run_epoch().items():
        got[m[0]].append(m[1]["loss"])
    bob_state = trainer.user_state("bob")
    trainer.remove("bob")  # bob leaves after one epoch, cy joins: its adapter starts fresh
    trainer.add("cy", ex["cy"])
    for _ in range(2):
        for k, m in trainer.run_epoch().items():
            got[k].append(m["loss"])
    cy_state = trainer.user_state("cy")
    trainer.remove("cy")
    trainer.add("cy2", ex["cy"], state=cy_state)  # resume from a checkpointed state, another slot
    for k, m in trainer.run_epoch().items():
        got["cy" if k == "cy2" else k].append(m["loss"])

    for user, epochs, state in (("ann", 4, trainer.user_state("ann")), ("bob", 1, bob_state),
                                ("cy", 3, trainer.user_state("cy2"))):
        want, want_losses = _alone(tiny_cfg, cfg, spec, ex[user], epochs)
        diff = _max_diff(state["adapter"], want)
        print(f"{user}: max |batched - alone| = {diff:.2e}")
        assert diff < TOL[model], user
        assert got[user] == pytest.approx(want_losses, rel=1e-5, abs=1e-6), user
        assert state["epoch"] == epochs
    assert _max_diff(trainer.user_state("ann")["adapter"], want) > 1e-3  # users differ


def test_saved_slot_is_the_peft_directory(tiny_engine, tiny_cfg, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    cfg = _cfg()
    spec = TrainSpec.from_config(cfg)
    student = BatchedStudent(tiny_cfg, cfg, slots=2)
    trainer = BatchedTrainer(student, spec, cfg)
    trainer.add("ann", make_examples(_dataset(tiny_engine, "ann", 4), spec, student.tokenizer))
    trainer.run_epoch()
    student.save(0, tmp_path / "ours")
    peft_student = LoraStudent(tiny_cfg, cfg)
    peft_student.load_adapter_state(trainer.user_state("ann")["adapter"])
    peft_student.save(tmp_path / "peft")
    a, b = load_file(tmp_path / "ours" / "adapter_model.safetensors"), load_file(tmp_path / "peft" /
                                                                                  "adapter_model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    ours, theirs = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("ours", "peft"))
    assert {**ours, "target_modules": sorted(ours["target_modules"])} == \
        {**theirs, "target_modules": sorted(theirs["target_modules"])}
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_engine.path), tmp_path / "ours")
    x = torch.tensor([[11, 220, 4581, 75, 9, 2]])
    with torch.no_grad(), student.lora.route([0]):
        mine = student.model.eval()(input_ids=x).logits
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(input_ids=x).logits, mine, atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_trains_the_same_adapters(tiny_engine, tiny_cfg):
    """`distill.gradient_checkpointing` (the laptop's memory knob) recomputes each layer in backward
    with the LoRA routing still set: two users trained together come out as without it."""
    spec = TrainSpec.from_config(_cfg())
    states = {}
    for ckpt in (False, True):
        cfg = _cfg(gradient_checkpointing=ckpt)
        student = BatchedStudent(tiny_cfg, cfg, slots=2)
        assert student.model.is_gradient_checkpointing == ckpt
        trainer = BatchedTrainer(student, spec, cfg, seed=cfg.seed)
        for u, n in (("ann", 5), ("bob", 3)):
            trainer.add(u, make_examples(_dataset(tiny_engine, u, n), spec, student.tokenizer))
        for _ in range(2):
            trainer.run_epoch()
        states[ckpt] = {u: trainer.user_state(u)["adapter"] for u in ("ann", "bob")}
    for u in ("ann", "bob"):
        assert _max_diff(states[True][u], states[False][u]) < TOL["tiny-qwen3"], u
    assert _max_diff(states[True]["ann"], states[True]["bob"]) > 1e-3  # each slot trained on its own user


class _Killed(Exception):
    pass


def test_train_user_goes_on_from_its_last_epoch_after_a_kill(tiny_engine, tiny_cfg, tmp_path):
    """`resume_dir` keeps the user's state after each epoch: a run killed after epoch 2 of 3 trains
    only the third on rerun and saves the adapter an uninterrupted run saves; other settings start over."""
    from safetensors.torch import load_file

    from tsubasa.distill.batched import train_user

    cfg = _cfg(epochs=3)
    spec = TrainSpec.from_config(cfg)
    ds = _dataset(tiny_engine, "ann", 5)  # 3 steps of 2 examples per epoch
    whole = train_user(BatchedStudent(tiny_cfg, cfg, slots=1), ds, spec, cfg, tmp_path / "whole")

    def die_after_two(m: dict) -> None:
        if m["epoch"] == 2:
            raise _Killed

    resume = tmp_path / "resume"
    with pytest.raises(_Killed):
        train_user(BatchedStudent(tiny_cfg, cfg, slots=1), ds, spec, cfg, tmp_path / "a", on_epoch=die_after_two,
                   resume_dir=resume)
    assert (resume / "trainer.pt").exists()
    steps: list[int] = []
    again = train_user(BatchedStudent(tiny_cfg, cfg, slots=1), ds, spec, cfg, tmp_path / "b", resume_dir=resume,
                       on_step=lambda s, n, loss: steps.append(s))
    assert steps == [1, 2, 3]  # one epoch left
    no_time = [{k: v for k, v in m.metrics.items() if k != "train_seconds"} for m in (again, whole)]
    assert no_time[0] == pytest.approx(no_time[1], rel=1e-5)  # losses of all three epochs kept
    got, want = (load_file(str(d / "adapter_model.safetensors")) for d in (tmp_path / "b", tmp_path / "whole"))
    assert _max_diff(got, want) < TOL["tiny-qwen3"]
    assert not (resume / "trainer.pt").exists()

    with pytest.raises(_Killed):
        train_user(BatchedStudent(tiny_cfg, cfg, slots=1), ds, spec, cfg, tmp_path / "c", on_epoch=die_after_two,
                   resume_dir=resume)
    other = cfg.model_copy(update={"learning_rate": cfg.learning_rate / 2})
    steps.clear()
    train_user(BatchedStudent(tiny_cfg, other, slots=1), ds, spec, other, tmp_path / "d", resume_dir=resume,
               on_step=lambda s, n, loss: steps.append(s))
    assert len(steps) == 9  # state saved under another learning rate: all three epochs
