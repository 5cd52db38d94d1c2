"""Top-d KL: brute-force reference, zero at the renormalised teacher, CE at d=1, stability, and
gradients reaching only the LoRA parameters of a real (tiny-qwen3) student."""

from __future__ import annotations

import math

import pytest
import torch

from tsubasa.distill.loss import CrossEntropyLoss, TopDKLLoss, full_kl_per_token, topd_kl_per_token


def _random_case(seed: int = 0, b: int = 2, t: int = 3, v: int = 7, d: int = 3):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(b, t, v, generator=g) * 2
    teacher_full = torch.log_softmax(torch.randn(b, t, v, generator=g) * 2, dim=-1)
    top = teacher_full.topk(d, dim=-1)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[0, 0] = False  # a padded position must not count
    return student, top.indices, top.values, mask


def _brute_force(student, ids, lps, mask, renorm_student: bool) -> float:
    total, count = 0.0, 0
    b, t, v = student.shape
    for i in range(b):
        for j in range(t):
            if not mask[i, j]:
                continue
            z_t = sum(math.exp(float(x)) for x in lps[i, j])
            p = [math.exp(float(x)) / z_t for x in lps[i, j]]
            if renorm_student:
                z_s = sum(math.exp(float(student[i, j, k])) for k in ids[i, j])
            else:
                z_s = sum(math.exp(float(student[i, j, k])) for k in range(v))
            q = [math.exp(float(student[i, j, k])) / z_s for k in ids[i, j]]
            total += sum(pk * (math.log(pk) - math.log(qk)) for pk, qk in zip(p, q, strict=True))
            count += 1
    return total / count


@pytest.mark.parametrize("renorm", [False, True])
@pytest.mark.parametrize("d", [1, 3, 7])
def test_topd_kl_matches_brute_force(renorm, d):
    student, ids, lps, mask = _random_case(d=d)
    got = float(TopDKLLoss(renormalize_student=renorm)(student, ids, lps, mask))
    assert got == pytest.approx(_brute_force(student, ids, lps, mask, renorm), rel=1e-5, abs=1e-6)


def test_full_vocab_d_equals_exact_kl():
    student, ids, lps, _ = _random_case(d=7)  # d = V: the renormalised teacher is the teacher
    teacher = torch.full_like(student, -1e9).scatter(-1, ids, lps)
    exact = full_kl_per_token(teacher, student)
    assert torch.allclose(topd_kl_per_token(student, ids, lps), exact, atol=1e-5)


def test_zero_when_student_matches_renormalised_teacher():
    _, ids, lps, mask = _random_case(d=3)
    log_p = lps - torch.logsumexp(lps, dim=-1, keepdim=True)
    # Full-vocabulary student: all its mass on the teacher's d ids, in the teacher's proportions.
    student = torch.full((2, 3, 7), -1e4).scatter(-1, ids, log_p)
    assert float(TopDKLLoss()(student, ids, lps, mask)) == pytest.approx(0.0, abs=1e-6)
    # Renormalised student: only the ratios at the d ids matter, whatever the other logits are.
    student2 = torch.randn(2, 3, 7).scatter(-1, ids, log_p + 3.0)
    assert float(TopDKLLoss(renormalize_student=True)(student2, ids, lps, mask)) == pytest.approx(0.0, abs=1e-6)
    # ...and it is positive otherwise.
    assert float(TopDKLLoss()(torch.randn(2, 3, 7), ids, lps, mask)) > 0


def test_d1_is_cross_entropy_on_teacher_argmax():
    student, ids, lps, mask = _random_case(d=1)
    kl = TopDKLLoss()(student, ids, lps, mask)
    ce = torch.nn.functional.cross_entropy(student[mask], ids[..., 0][mask])
    assert float(kl) == pytest.approx(float(ce), rel=1e-6)
    assert float(CrossEntropyLoss()(student, ids[..., 0], mask)) == pytest.approx(float(ce), rel=1e-6)


def test_numerically_stable_and_padding_candidates():
    student, ids, lps, mask = _random_case(d=3)
    big = student * 1e4  # a naive softmax-then-log overflows/underflows here
    lps_big = lps * 1e3
    loss = TopDKLLoss()(big, ids, lps_big, mask)
    assert torch.isfinite(loss)
    # A -inf candidate (shorter list padded) gets weight zero: same as dropping it.
    lps_pad = lps.clone()
    lps_pad[..., -1] = float("-inf")
    with_pad = TopDKLLoss()(student, ids, lps_pad, mask)
    without = TopDKLLoss()(student, ids[..., :2], lps[..., :2], mask)
    assert torch.isfinite(with_pad) and float(with_pad) == pytest.approx(float(without), rel=1e-6)
    g = torch.zeros_like(student, requires_grad=True)
    TopDKLLoss()(student + g, ids, lps_pad, mask).backward()
    assert torch.isfinite(g.grad).all()


def test_batched_equals_per_example_mean_over_tokens():
    student, ids, lps, mask = _random_case(b=3, t=4, d=3)
    mask[1, :2] = False
    per = topd_kl_per_token(student, ids, lps)
    assert float(TopDKLLoss()(student, ids, lps, mask)) == pytest.approx(float(per[mask].mean()), rel=1e-6)


def test_gradients_flow_only_into_lora(tiny_cfg):
    from tsubasa.config import DistillConfig
    from tsubasa.distill.train import Example, LoraStudent, TrainSpec, batch_loss, collate

    cfg = DistillConfig(lora_rank=4, lora_alpha=8)
    student = LoraStudent(tiny_cfg, cfg)
    student.reset(0)
    # B starts at zero, so step once to make A's gradient non-zero as well.
    g = torch.Generator().manual_seed(0)
    ex = [Example(prompt_ids=[5, 6, 7, 8], answer_ids=[9, 10, 11],
                  topd_ids=torch.randint(0, 100, (3, 5), generator=g).tolist(),
                  topd_logprobs=torch.log_softmax(torch.randn(3, 5, generator=g), -1).tolist()),
          Example(prompt_ids=[5, 6], answer_ids=[12, 13],
                  topd_ids=torch.randint(0, 100, (2, 5), generator=g).tolist(),
                  topd_logprobs=torch.log_softmax(torch.randn(2, 5, generator=g), -1).tolist())]
    batch = collate(ex, student.pad_id)
    spec = TrainSpec(d=5)
    opt = torch.optim.SGD(student.trainable_parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        loss = batch_loss(student.model, batch, spec)
        loss.backward()
        opt.step()
    named = dict(student.model.named_parameters())
    with_grad = {n for n, p in named.items() if p.grad is not None}
    assert with_grad and all("lora_" in n for n in with_grad)
    assert all(not p.requires_grad for n, p in named.items() if "lora_" not in n)
    assert {n for n, p in named.items() if p.requires_grad} == with_grad
    assert any(float(named[n].grad.abs().sum()) > 0 for n in with_grad if "lora_A" in n)
    assert any(float(named[n].grad.abs().sum()) > 0 for n in with_grad if "lora_B" in n)
