"""Batched per-tenant LoRA training: many users' adapters over one frozen base model, trained in
one forward and backward per step (the `batched` strategy of services/train).

Each user has a slot of the student's multi-LoRA layers (`tsubasa.llm.multilora`). A step takes
every member's next mini-batch (`distill.batch_size` of its own examples, in the order fixed by
(seed, the user's epoch), exactly as `UserTrainer` does), routes each row to its user's slot and
minimises the sum of the members' losses, each a mean over that user's own answer tokens. The
adapters share no parameter, so each slot's gradient is its own user's gradient. Gradients are
clipped per slot, and `SlotAdamW` is AdamW with per-slot moments and step counts that updates only
the slots that had data in the step: each user follows the trajectory it would follow alone (same
initialisation, data order, optimizer), up to floating-point summation order.

Members join (`add`) and leave (`remove`) between epochs; a member whose epoch has fewer steps than
the others leaves the step batch when its epoch ends, and its slot is not updated after that.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tsubasa.config import DistillConfig, ModelConfig
from tsubasa.distill.teacher import UserDataset
from tsubasa.distill.train import (
    Example,
    TrainSpec,
    _to,
    answer_logits,
    collate,
    enable_gradient_checkpointing,
    final_metrics,
    load_student_base,
    lora_targets,
    make_examples,
    student_lora_config,
)


class BatchedStudent:
    """The frozen base model with `slots` trainable LoRA adapters in multi-LoRA layers."""

    def __init__(self, model_cfg: ModelConfig, cfg: DistillConfig, slots: int, model: Any = None,
                 tokenizer: Any = None) -> None:
        from tsubasa.llm.multilora import MultiLoraModel

        self.model_cfg, self.cfg = model_cfg, cfg
        self.model, self.tokenizer, self.device = load_student_base(model_cfg, model, tokenizer)
        for p in self.model.parameters():
            p.requires_grad_(False)
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(self.model)
        self.target_modules = lora_targets(self.model, cfg, model_cfg.name)
        self.lora = MultiLoraModel(self.model, slots, cfg.lora_rank, self.target_modules, trainable=True)
        for layer in self.lora.layers.values():
            layer.dropout = cfg.lora_dropout
        self.lora_config = student_lora_config(cfg, self.target_modules)
        self.lora_config.base_model_name_or_path = self.model.__dict__.get("name_or_path") or None

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    @property
    def slots(self) -> int:
        return self.lora.slots

    def parameters(self) -> dict[str, Any]:
        """The stacked LoRA tensors by name (`<module>.lora_A` / `.lora_B`), slot first."""
        return {f"{n}.{k}": getattr(layer, k) for n, layer in self.lora.layers.items() for k in ("lora_A", "lora_B")}

    def reset(self, slot: int, seed: int) -> None:
        """Fresh adapter in `slot`, drawn exactly as peft initialises one after `torch.manual_seed(seed)`
        (modules in model order, A Kaiming-uniform as nn.Linear, B zero: the identity)."""
        import torch
        from torch import nn

        torch.manual_seed(seed)
        scale = self.cfg.lora_alpha / self.cfg.lora_rank
        with torch.no_grad():
            for layer in self.lora.layers.values():
                a = torch.empty(layer.rank, layer.lora_A.shape[1])
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                layer.lora_A[slot] = a.t().to(layer.lora_A.device)
                layer.lora_B[slot].zero_()
                layer.scaling[slot] = scale

    def save(self, slot: int, out_dir: str | Path) -> Path:
        """Write `slot` as a PEFT adapter directory (what `PeftModel.save_pretrained` writes)."""
        import copy

        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        config = copy.copy(self.lora_config)
        config.inference_mode = True
        config.save_pretrained(str(out))
        save_file(self.lora.slot_state(slot), str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
        return out


class SlotAdamW:
    """AdamW (torch's update rule, decoupled weight decay) over slot-stacked tensors, with moments and
    a step count per slot; `step(slots)` updates only those slots, so each is its own optimizer."""

    def __init__(self, params: dict[str, Any], slots: int, lr: float, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        import torch

        self.params, self.lr, self.wd, self.betas, self.eps = params, lr, weight_decay, betas, eps
        self.exp_avg = {k: torch.zeros_like(p) for k, p in params.items()}
        self.exp_avg_sq = {k: torch.zeros_like(p) for k, p in params.items()}
        self.steps = [0] * slots

    def zero_grad(self) -> None:
        for p in self.params.values():
            p.grad = None

    def reset(self, slot: int) -> None:
        for k in self.params:
            self.exp_avg[k][slot].zero_()
            self.exp_avg_sq[k][slot].zero_()
        self.steps[slot] = 0

    def step(self, slots: Sequence[int]) -> None:
        import torch

        b1, b2 = self.betas
        for s in slots:
            self.steps[s] += 1
        n = torch.tensor([self.steps[s] for s in slots], dtype=torch.float64)
        every = list(slots) == list(range(len(self.steps)))  # all slots: update in place, no gather
        with torch.no_grad():
            for k, p in self.params.items():
                idx = torch.tensor(list(slots), device=p.device)
                shape = (-1,) + (1,) * (p.dim() - 1)
                step_size = (self.lr / (1 - b1 ** n)).to(p.dtype).to(p.device).view(shape)
                bc2_sqrt = torch.sqrt(1 - b2 ** n).to(p.dtype).to(p.device).view(shape)
                if every:
                    g, w, m, v = p.grad, p.data, self.exp_avg[k], self.exp_avg_sq[k]
                else:
                    g, w = p.grad.index_select(0, idx), p.index_select(0, idx)
                    m, v = self.exp_avg[k].index_select(0, idx), self.exp_avg_sq[k].index_select(0, idx)
                if self.wd:
                    w.mul_(1 - self.lr * self.wd)
                m.lerp_(g, 1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                w.sub_(step_size * (m / (v.sqrt() / bc2_sqrt).add_(self.eps)))
                if not every:
                    p.index_copy_(0, idx, w)
                    self.exp_avg[k].index_copy_(0, idx, m)
                    self.exp_avg_sq[k].index_copy_(0, idx, v)

    def slot_state(self, slot: int) -> dict[str, Any]:
        return {"exp_avg": {k: t[slot].detach().cpu().clone() for k, t in self.exp_avg.items()},
                "exp_avg_sq": {k: t[slot].detach().cpu().clone() for k, t in self.exp_avg_sq.items()},
                "step": self.steps[slot]}

    def load_slot_state(self, slot: int, state: dict[str, Any]) -> None:
        for k in self.params:
            self.exp_avg[k][slot] = state["exp_avg"][k]
            self.exp_avg_sq[k][slot] = state["exp_avg_sq"][k]
        self.steps[slot] = int(state["step"])


def clip_per_slot(params: dict[str, Any], slots: Sequence[int], max_norm: float) -> Any:
    """`clip_grad_norm_` for each slot on its own: the norm over that slot of every tensor."""
    import torch

    g0 = next(iter(params.values()))
    idx = torch.tensor(list(slots), device=g0.device)
    norms = torch.stack([torch.linalg.vector_norm(p.grad.index_select(0, idx).flatten(1), 2, dim=1)
                         for p in params.values()])  # (tensors, slots)
    total = torch.linalg.vector_norm(norms, 2, dim=0)
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for p in params.values():
        p.grad.index_copy_(0, idx, p.grad.index_select(0, idx) * coef.view((-1,) + (1,) * (p.dim() - 1)))
    return total


def per_token_loss(logits: Any, batch: dict[str, Any], spec: TrainSpec) -> Any:
    """(B, A) loss per answer position: top-d KL, or cross-entropy on the targets."""
    from tsubasa.distill.loss import cross_entropy_per_token, topd_kl_per_token

    if spec.loss == "topd_kl":
        return topd_kl_per_token(logits, batch["topd_ids"], batch["topd_logprobs"], spec.renormalize_student)
    return cross_entropy_per_token(logits, batch["targets"])


@dataclass
class Member:
    key: str
    slot: int
    examples: list[Example]
    epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


class BatchedTrainer:
    """Trains the adapters of up to `student.slots` users together, one epoch of each per `run_epoch`."""

    def __init__(self, student: BatchedStudent, spec: TrainSpec, cfg: DistillConfig, seed: int = 0) -> None:
        self.student, self.spec, self.cfg, self.seed = student, spec, cfg, seed
        self.params = student.parameters()
        self.optimizer = SlotAdamW(self.params, student.slots, cfg.learning_rate, cfg.weight_decay)
        self.members: dict[str, Member] = {}

    @property
    def free_slots(self) -> int:
        return self.student.slots - len(self.members)

    def add(self, key: str, examples: Sequence[Example], state: dict[str, Any] | None = None) -> Member:
        """A user joins with a fresh adapter (or the one in `state`, from `user_state`)."""
        if not examples:
            raise ValueError(f"{key}: no training examples (did synthesis keep any QA?)")
        used = {m.slot for m in self.members.values()}
        slot = next(s for s in range(self.student.slots) if s not in used)
        self.student.reset(slot, self.seed)
        self.optimizer.reset(slot)
        m = self.members[key] = Member(key, slot, list(examples))
        if state is not None:
            self.student.lora.load_slot_state(slot, state["adapter"])
            self.optimizer.load_slot_state(slot, state["optimizer"])
            m.epoch, m.history = int(state["epoch"]), list(state.get("history", []))
        return m

    def remove(self, key: str) -> None:
        self.members.pop(key)

    def user_state(self, key: str) -> dict[str, Any]:
        """The user's adapter, optimizer moments, epoch and history (a checkpoint's trainer.pt)."""
        m = self.members[key]
        return {"adapter": self.student.lora.slot_state(m.slot), "optimizer": self.optimizer.slot_state(m.slot),
                "epoch": m.epoch, "history": m.history}

    def steps_of(self, m: Member) -> int:
        return math.ceil(len(m.examples) / self.cfg.batch_size)

    def run_epoch(self, on_step: Callable[[int, int, float], None] | None = None) -> dict[str, dict[str, float]]:
        """One epoch of every member, in lockstep; returns each member's epoch metrics (`seconds` is
        the wall time of the shared epoch)."""
        import torch

        bs, members = self.cfg.batch_size, list(self.members.values())
        plans = {m.key: np.random.default_rng([self.seed, m.epoch]).permutation(len(m.examples)) for m in members}
        n_steps = max((self.steps_of(m) for m in members), default=0)
        losses: dict[str, list[float]] = {m.key: [] for m in members}
        tokens = dict.fromkeys(losses, 0)
        t0 = time.perf_counter()
        self.student.model.train()
        for step in range(n_steps):
            active = [m for m in members if step < self.steps_of(m)]
            rows, owner = [], []
            for j, m in enumerate(active):
                chunk = [m.examples[i] for i in plans[m.key][step * bs:(step + 1) * bs]]
                rows += chunk
                owner += [j] * len(chunk)
            batch = _to(collate(rows, self.student.pad_id), self.student.device)
            # The routing stays set through backward: checkpointed layers re-run their forward there.
            with self.student.lora.route([active[j].slot for j in owner]):
                per = per_token_loss(answer_logits(self.student.model, batch), batch, self.spec)
                mask = batch["mask"].to(per.dtype)
                own = torch.tensor(owner, device=per.device)
                num = per.new_zeros(len(active)).index_add(0, own, (per * mask).sum(1))
                den = per.new_zeros(len(active)).index_add(0, own, mask.sum(1))
                user_loss = num / den.clamp_min(1.0)  # each user's mean over its own answer tokens
                self.optimizer.zero_grad()
                user_loss.sum().backward()
            slots = [m.slot for m in active]
            clip_per_slot(self.params, slots, self.cfg.max_grad_norm)
            self.optimizer.step(slots)
            for m, loss, n in zip(active, user_loss.detach().tolist(), den.tolist(), strict=True):
                losses[m.key].append(loss)
                tokens[m.key] += int(n)
            if on_step:
                on_step(step + 1, n_steps, float(user_loss.detach().mean()))
        seconds = time.perf_counter() - t0
        out = {}
        for m in members:
            m.epoch += 1
            out[m.key] = {"epoch": float(m.epoch), "loss": float(np.mean(losses[m.key])),
                          "answer_tokens": float(tokens[m.key]), "seconds": seconds}
            m.history.append(out[m.key])
        return out


@dataclass
class TrainedAdapter:
    out_dir: Path
    metrics: dict[str, float]
    n_examples: int


def train_user(student: BatchedStudent, dataset: UserDataset, spec: TrainSpec, cfg: DistillConfig,
               out_dir: str | Path, epochs: int | None = None,
               on_epoch: Callable[[dict[str, float]], None] | None = None,
               on_step: Callable[[int, int, float], None] | None = None,
               resume_dir: str | Path | None = None) -> TrainedAdapter:
    """Train one user's adapter from scratch in a free slot of `student` and save it (PEFT format)
    into `out_dir` (the in-process path: `tsubasa distill --local`, the internalisation measure).

    With `resume_dir`, the user's state (adapter, optimizer moments, epoch) is saved there after each
    epoch, and a rerun on the same data and settings goes on from the last finished epoch (an epoch
    of a 1.5B student is 17 min on a laptop); the state is removed once the adapter is saved."""
    import torch

    examples = make_examples(dataset, spec, student.tokenizer, student.model_cfg.enable_thinking,
                             cfg.vanilla_chunk_tokens)
    trainer = BatchedTrainer(student, spec, cfg, seed=cfg.seed)
    key = f"{dataset.tenant_id}/{dataset.user_id}"
    total = epochs or cfg.epochs
    ckpt = Path(resume_dir) / "trainer.pt" if resume_dir is not None else None
    # what the saved state must have been trained as to be taken up again
    ident = {"data": dataset.data_hash, "tag": spec.tag, "base": dataset.base_model, "epochs": total,
             **cfg.model_dump(include={"lora_rank", "lora_alpha", "lora_dropout", "learning_rate", "batch_size",
                                       "seed", "weight_decay", "max_grad_norm", "target_modules"})}
    state = None
    if ckpt is not None and ckpt.exists():
        saved = torch.load(ckpt, weights_only=False)
        state = saved["state"] if saved.get("ident") == ident else None
    member = trainer.add(key, examples, state)
    while member.epoch < total:
        m = trainer.run_epoch(on_step)[key]
        if ckpt is not None and member.epoch < total:
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            tmp = ckpt.with_suffix(".tmp")
            torch.save({"ident": ident, "state": trainer.user_state(key)}, tmp)
            tmp.replace(ckpt)  # atomic: a kill mid-save leaves the previous epoch's state
        if on_epoch:
            on_epoch(m)
    student.save(member.slot, out_dir)
    if ckpt is not None:
        ckpt.unlink(missing_ok=True)
    return TrainedAdapter(Path(out_dir), final_metrics(member.history, len(examples)), len(examples))
