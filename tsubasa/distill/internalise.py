"""Internalisation measure: how close the student (adapter + k memories) comes to the teacher (rich
context) on a user's held-out synthetic questions. Works with any model size, needs no judge.

For each held-out question the teacher answers greedily from its rich prompt; on the tokens of that
answer (EOS included) we take the exact full-vocabulary KL(teacher || student) per token, and compare
the student's own greedy answer with the teacher's (normalised text equality). Run it with the base
model (no adapter: "before") and with an adapter ("after"). Each row keeps its per-question values,
so means carry bootstrap intervals and two conditions compare pairwise on the same questions
(`compare`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from pydantic import BaseModel

from tsubasa.distill.loss import full_kl_per_token
from tsubasa.distill.prompts import student_messages
from tsubasa.distill.synth import normalise_answer
from tsubasa.distill.teacher import QATargets, UserDataset
from tsubasa.llm.base import Messages, SamplingParams
from tsubasa.stats import Interval, bootstrap_mean, paired_difference


class Condition(BaseModel):
    label: str
    adapter: str | None = None
    """Engine adapter name (None = base model, i.e. before distillation)."""
    grounding_k: int = 3


class InternalisationRow(BaseModel):
    label: str
    adapter: str | None
    grounding_k: int
    n_questions: int
    mean_kl: float
    """Mean over questions of the per-token KL(teacher || student), nats."""
    agreement: float
    """Share of questions where the student's greedy answer equals the teacher's."""
    kl_ci: Interval
    agreement_ci: Interval
    qa_ids: list[str]
    kl_per_question: list[float]
    agree_per_question: list[bool]


class Comparison(BaseModel):
    """`a` against `b` on the same held-out questions: mean(a - b) with a paired bootstrap interval.
    Lower KL is better, higher agreement is better."""

    a: str
    b: str
    kl_diff: Interval
    agreement_diff: Interval


def compare(rows: Sequence[InternalisationRow], pairs: Sequence[tuple[str, str]]) -> list[Comparison]:
    """Paired differences for (a label, b label) pairs; pairs naming a missing label are skipped."""
    by = {r.label: r for r in rows}
    out = []
    for a, b in pairs:
        if a not in by or b not in by:
            continue
        ra, rb = by[a], by[b]
        if ra.qa_ids != rb.qa_ids:
            raise ValueError(f"{a!r} and {b!r} were measured on different questions")
        out.append(Comparison(a=a, b=b, kl_diff=paired_difference(ra.kl_per_question, rb.kl_per_question),
                              agreement_diff=paired_difference([float(x) for x in ra.agree_per_question],
                                                               [float(x) for x in rb.agree_per_question])))
    return out


def _logprobs(engine: Any, messages: Messages, cont: Sequence[int], adapter: str | None) -> Any:
    """(T, V) log-probs predicting each continuation token after the chat prompt (HFEngine)."""
    import torch

    ids = engine.prompt_ids(messages) + list(cont)
    x = torch.tensor([ids], device=engine.device)
    with engine._lock, engine.routed([adapter], 1), torch.inference_mode():
        logits = engine.base_model(input_ids=x, attention_mask=torch.ones_like(x),
                                   logits_to_keep=len(cont) + 1).logits[0, :-1].float()
    return torch.log_softmax(logits, dim=-1)


class TeacherReference(BaseModel):
    qa_id: str
    answer: str
    answer_ids: list[int]


def teacher_reference(engine: Any, items: Sequence[QATargets], max_new_tokens: int = 32) -> list[TeacherReference]:
    """The teacher's greedy answers (rich prompt, base model) to the held-out questions."""
    prompts = [it.teacher_prompt for it in items]
    if any(p is None for p in prompts):
        raise ValueError("held-out items lack the teacher prompt (dataset built before this field existed)")
    gens = engine.generate(prompts, SamplingParams(max_new_tokens=max_new_tokens))
    return [TeacherReference(qa_id=it.qa.qa_id, answer=g.text, answer_ids=engine.continuation_ids(g.text, True))
            for it, g in zip(items, gens, strict=True)]


def measure(engine: Any, dataset: UserDataset, conditions: Sequence[Condition], max_new_tokens: int = 32,
            reference: Sequence[TeacherReference] | None = None,
            progress: Callable[[str, int, int], None] | None = None) -> list[InternalisationRow]:
    """One row per condition over the dataset's held-out items (adapters must be loaded in `engine`);
    the teacher's answers and distributions are computed once for all conditions. `progress(stage,
    done, total)` is called per question: a 1.5B teacher's pass over 50 rich prompts takes minutes."""
    items = dataset.heldout
    if not items:
        raise ValueError(f"{dataset.tenant_id}/{dataset.user_id} has no held-out questions "
                         "(raise distill.heldout_fraction or qa_per_user)")
    ref = list(reference) if reference is not None else teacher_reference(engine, items, max_new_tokens)
    tick = progress or (lambda stage, done, total: None)
    teacher_lp = []
    for j, (it, r) in enumerate(zip(items, ref, strict=True)):
        tick("teacher distributions", j, len(items))
        teacher_lp.append(_logprobs(engine, it.teacher_prompt, r.answer_ids, None))
    rows = []
    for i, cond in enumerate(conditions):
        stage = f"measure {cond.label} ({i + 1}/{len(conditions)})"
        tick(stage, 0, len(items))
        prompts = [student_messages(it.qa.question, it.grounding[:cond.grounding_k]) for it in items]
        gens = engine.generate(prompts, SamplingParams(max_new_tokens=max_new_tokens),
                               adapters=[cond.adapter] * len(items) if cond.adapter else None)
        kls, agree = [], []
        for j, (p, r, t_lp, g) in enumerate(zip(prompts, ref, teacher_lp, gens, strict=True)):
            tick(stage, j, len(items))
            s_lp = _logprobs(engine, p, r.answer_ids, cond.adapter)
            kls.append(float(full_kl_per_token(t_lp, s_lp).mean()))
            agree.append(normalise_answer(g.text) == normalise_answer(r.answer))
        rows.append(InternalisationRow(label=cond.label, adapter=cond.adapter, grounding_k=cond.grounding_k,
                                       n_questions=len(items), mean_kl=float(np.mean(kls)),
                                       agreement=float(np.mean(agree)), kl_ci=bootstrap_mean(kls),
                                       agreement_ci=bootstrap_mean([float(a) for a in agree]),
                                       qa_ids=[it.qa.qa_id for it in items], kl_per_question=kls,
                                       agree_per_question=agree))
    return rows
