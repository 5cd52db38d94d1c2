"""Distillation losses over answer tokens: top-d forward KL (teacher -> student) and cross-entropy.

Shapes: `B` examples, `T` answer positions (right-aligned, padded on the left; `mask` marks the
real ones), `V` vocabulary, `d` teacher candidates per position. All losses are the mean over the
masked answer tokens of the batch, in nats.

Top-d KL. The teacher's top-d log-probs are renormalised over its d tokens,
    p_j = exp(l_j) / sum_i exp(l_i),   j = 1..d,
and the loss is KL(p || q) = sum_j p_j (log p_j - log q_j), where q is the student's distribution
(over the full vocabulary, or renormalised over the same d ids with `renormalize_student`).
For d = 1, p = 1 on the teacher's argmax and the loss is the cross-entropy on that token.
Student log-probs are `logit - logsumexp(logits)`: never a softmax followed by a log.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _masked_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp_min(1.0)


def topd_kl_per_token(
    student_logits: torch.Tensor,
    topd_ids: torch.Tensor,
    topd_logprobs: torch.Tensor,
    renormalize_student: bool = False,
) -> torch.Tensor:
    """(B, T, V), (B, T, d) long, (B, T, d) -> (B, T) forward KL per position.

    Teacher entries with log-prob -inf (padding of shorter candidate lists) get weight 0."""
    logits = student_logits.float()
    picked = logits.gather(-1, topd_ids)  # (B, T, d)
    if renormalize_student:
        log_q = picked - torch.logsumexp(picked, dim=-1, keepdim=True)
    else:
        log_q = picked - torch.logsumexp(logits, dim=-1, keepdim=True)
    t = topd_logprobs.float()
    log_p = t - torch.logsumexp(t, dim=-1, keepdim=True)
    p = log_p.exp()
    # p * (log p - log q) with 0 * anything = 0 where the teacher gives no weight (or -inf padding).
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
    return terms.sum(-1)


def cross_entropy_per_token(student_logits: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
    """(B, T, V), (B, T) long -> (B, T) negative log-likelihood of the targets."""
    logits = student_logits.float()
    return torch.logsumexp(logits, dim=-1) - logits.gather(-1, target_ids[..., None])[..., 0]


@dataclass(frozen=True)
class TopDKLLoss:
    """Forward KL from the teacher's renormalised top-d distribution to the student's."""

    renormalize_student: bool = False

    def __call__(self, student_logits: torch.Tensor, topd_ids: torch.Tensor, topd_logprobs: torch.Tensor,
                 mask: torch.Tensor) -> torch.Tensor:
        per = topd_kl_per_token(student_logits, topd_ids, topd_logprobs, self.renormalize_student)
        return _masked_mean(per, mask)


@dataclass(frozen=True)
class CrossEntropyLoss:
    """Cross-entropy on given target tokens (the gold answer, or the raw conversation for vanilla FT)."""

    def __call__(self, student_logits: torch.Tensor, target_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return _masked_mean(cross_entropy_per_token(student_logits, target_ids), mask)


def full_kl_per_token(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """(..., V), (..., V) -> (...) exact KL(teacher || student) over the full vocabulary (nats)."""
    log_p = torch.log_softmax(teacher_logits.float(), dim=-1)
    log_q = torch.log_softmax(student_logits.float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)
