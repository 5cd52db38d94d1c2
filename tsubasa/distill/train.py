"""Student and trainer: the base model plus a LoRA adapter, trained on one user's examples.

Variants:
- `tsubasa`: the student sees the top-k memories and the question; loss top-d KL from the
  teacher (or `ce_gold`: cross-entropy on the synthetic gold answer).
- `no_grounding`: the same targets, the student sees only the question.
- `vanilla`: LM fine-tuning on the raw conversation (the naive baseline), no QA at all.

Training is resumable at epoch granularity: `UserTrainer.state_dict()` holds the adapter weights,
the optimizer and the epoch; the data order of epoch e depends only on (seed, e). `LoraStudent` and
`UserTrainer` (peft) are the sharded `fsdp` strategy's; every other path trains with
`tsubasa.distill.batched` (`train_user` there), which follows the same trajectory.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field, model_validator

from tsubasa.config import DistillConfig, ModelConfig
from tsubasa.distill.prompts import student_messages
from tsubasa.distill.teacher import UserDataset

log = logging.getLogger(__name__)

Variant = Literal["tsubasa", "no_grounding", "vanilla"]
LossKind = Literal["topd_kl", "ce_gold", "lm"]


class TrainSpec(BaseModel):
    """What one adapter is trained for (one row of the ablation table)."""

    variant: Variant = "tsubasa"
    loss: LossKind = "topd_kl"
    d: int = Field(5, ge=1)
    grounding_k: int = Field(3, ge=0)
    renormalize_student: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> TrainSpec:
        if self.variant == "vanilla" and self.loss != "lm":
            raise ValueError("variant=vanilla trains with loss=lm")
        if self.variant != "vanilla" and self.loss == "lm":
            raise ValueError(f"loss=lm is the vanilla baseline, not variant={self.variant}")
        return self

    @classmethod
    def from_config(cls, cfg: DistillConfig, variant: Variant = "tsubasa", d: int | None = None) -> TrainSpec:
        k = 0 if variant == "no_grounding" else cfg.grounding_k
        loss: LossKind = "lm" if variant == "vanilla" else cfg.loss
        return cls(variant=variant, loss=loss, d=d or cfg.top_d, grounding_k=k,
                   renormalize_student=cfg.renormalize_student)

    @property
    def tag(self) -> str:
        """Short label: `tsubasa-kl-d5-k3`, `no_grounding-kl-d5-k0`, `tsubasa-ce_gold-k3`, `vanilla-lm`."""
        if self.variant == "vanilla":
            return "vanilla-lm"
        loss = f"kl-d{self.d}" if self.loss == "topd_kl" else self.loss
        return f"{self.variant}-{loss}-k{self.grounding_k}"


@dataclass
class Example:
    prompt_ids: list[int]
    answer_ids: list[int]
    """Tokens the loss is computed on (each predicted from everything before it)."""
    topd_ids: list[list[int]] | None = None
    topd_logprobs: list[list[float]] | None = None


def chat_ids(tokenizer: Any, messages, enable_thinking: bool = False) -> list[int]:
    """Token ids of a chat prompt with the generation prompt (same as HFEngine.prompt_ids)."""
    text = tokenizer.apply_chat_template([m.model_dump() for m in messages], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=enable_thinking)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def make_examples(dataset: UserDataset, spec: TrainSpec, tokenizer: Any, enable_thinking: bool = False,
                  chunk_tokens: int = 256, heldout: bool = False) -> list[Example]:
    """Training examples of one user for `spec` (the held-out items only if `heldout`)."""
    if spec.variant == "vanilla":
        out = []
        for text in dataset.vanilla_texts:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            for s in range(0, len(ids), chunk_tokens):
                chunk = ids[s:s + chunk_tokens + 1]
                if len(chunk) >= 2:
                    out.append(Example(prompt_ids=chunk[:1], answer_ids=chunk[1:]))
        return out
    if spec.d > dataset.d and spec.loss == "topd_kl":
        raise ValueError(f"d={spec.d} exceeds the teacher targets' d={dataset.d}: rebuild them with d>={spec.d}")
    items = dataset.heldout if heldout else dataset.train
    out = []
    for it in items:
        prompt = chat_ids(tokenizer, student_messages(it.qa.question, it.grounding[:spec.grounding_k]),
                          enable_thinking)
        if spec.loss == "topd_kl":
            out.append(Example(prompt, list(it.answer_ids), [r[:spec.d] for r in it.topd_ids],
                               [r[:spec.d] for r in it.topd_logprobs]))
        else:
            out.append(Example(prompt, list(it.gold_ids)))
    return out


def collate(batch: Sequence[Example], pad_id: int) -> dict[str, Any]:
    """Left-padded inputs; targets right-aligned to the last `A` logits (`logits_to_keep = A + 1`)."""
    import torch

    seqs = [e.prompt_ids + e.answer_ids for e in batch]
    width = max(len(s) for s in seqs)
    a_max = max(len(e.answer_ids) for e in batch)
    n = len(batch)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attn = torch.zeros((n, width), dtype=torch.long)
    targets = torch.zeros((n, a_max), dtype=torch.long)
    mask = torch.zeros((n, a_max), dtype=torch.bool)
    d = len(batch[0].topd_ids[0]) if batch[0].topd_ids else 0
    topd_ids = torch.zeros((n, a_max, max(d, 1)), dtype=torch.long)
    topd_lp = torch.zeros((n, a_max, max(d, 1)), dtype=torch.float32)
    for i, (e, s) in enumerate(zip(batch, seqs, strict=True)):
        input_ids[i, width - len(s):] = torch.tensor(s)
        attn[i, width - len(s):] = 1
        a = len(e.answer_ids)
        targets[i, a_max - a:] = torch.tensor(e.answer_ids)
        mask[i, a_max - a:] = True
        if d:
            topd_ids[i, a_max - a:] = torch.tensor(e.topd_ids)
            topd_lp[i, a_max - a:] = torch.tensor(e.topd_logprobs)
    position_ids = (attn.cumsum(-1) - 1).clamp_min(0)
    return {"input_ids": input_ids, "attention_mask": attn, "position_ids": position_ids,
            "logits_to_keep": a_max + 1, "targets": targets, "mask": mask,
            "topd_ids": topd_ids if d else None, "topd_logprobs": topd_lp if d else None}


def answer_logits(model: Any, batch: dict[str, Any]) -> Any:
    """Student logits (B, A, V) at the positions that predict the (right-aligned) answer tokens."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], logits_to_keep=batch["logits_to_keep"])
    return out.logits[:, :-1]


def batch_loss(model: Any, batch: dict[str, Any], spec: TrainSpec) -> Any:
    from tsubasa.distill.loss import CrossEntropyLoss, TopDKLLoss

    logits = answer_logits(model, batch)
    if spec.loss == "topd_kl":
        return TopDKLLoss(spec.renormalize_student)(logits, batch["topd_ids"], batch["topd_logprobs"], batch["mask"])
    return CrossEntropyLoss()(logits, batch["targets"], batch["mask"])


def _to(batch: dict[str, Any], device: Any) -> dict[str, Any]:
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}


def enable_gradient_checkpointing(model: Any) -> None:
    """Recompute each layer's activations in backward instead of keeping them (before any FSDP
    wrapping); the LoRA layers need the inputs to require grad for it."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()


def load_student_base(model_cfg: ModelConfig, model: Any = None, tokenizer: Any = None) -> tuple[Any, Any, Any]:
    """(base model on its device, tokenizer with a pad token, device) for a student."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tsubasa.llm.models import contiguous_lm_head, resolve_model, torch_dtype

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    want_cuda = model_cfg.device == "cuda" or (model_cfg.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if want_cuda else "cpu")
    path = resolve_model(model_cfg.name, model_cfg.cache_dir)
    dtype = torch_dtype(model_cfg.dtype, path, want_cuda)
    tokenizer = tokenizer or AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    base = contiguous_lm_head(model or AutoModelForCausalLM.from_pretrained(path, dtype=dtype))
    base.to(device)
    return base, tokenizer, device


def lora_targets(base: Any, cfg: DistillConfig, model_name: str) -> list[str]:
    """The configured target modules that exist in `base` (an error when none does)."""
    names = {n.rsplit(".", 1)[-1] for n, _ in base.named_modules()}
    targets = [t for t in cfg.target_modules if t in names]
    if not targets:
        raise ValueError(f"distill.target_modules {cfg.target_modules} match no module of {model_name}")
    return targets


def student_lora_config(cfg: DistillConfig, targets: list[str]) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, task_type="CAUSAL_LM")


class LoraStudent:
    """The base model (frozen) with one trainable peft LoRA adapter, re-initialised per user (the
    sharded `fsdp` strategy's student; `tsubasa.distill.batched` trains many adapters at once)."""

    def __init__(self, model_cfg: ModelConfig, cfg: DistillConfig, model: Any = None, tokenizer: Any = None) -> None:
        from peft import get_peft_model

        self.model_cfg, self.cfg = model_cfg, cfg
        base, self.tokenizer, self.device = load_student_base(model_cfg, model, tokenizer)
        targets = lora_targets(base, cfg, model_cfg.name)
        self.lora_config = student_lora_config(cfg, targets)
        self.model = get_peft_model(base, self.lora_config)
        self.target_modules = targets

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    def reset(self, seed: int) -> None:
        """Fresh LoRA weights (A random, B zero: the adapter starts as the identity)."""
        import torch
        from peft.tuners.lora import LoraLayer

        torch.manual_seed(seed)
        for module in self.model.modules():
            if isinstance(module, LoraLayer):
                module.reset_lora_parameters("default", True)

    def trainable_parameters(self) -> list[Any]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def adapter_state(self) -> dict[str, Any]:
        from peft import get_peft_model_state_dict

        return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(self.model).items()}

    def load_adapter_state(self, state: dict[str, Any]) -> None:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(self.model, state)

    def save(self, out_dir: str | Path) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(str(out))
        return out

    @staticmethod
    def peft_key(param_name: str) -> str:
        """Parameter name (also under FSDP wrappers) -> the key peft saves it under."""
        name = param_name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")
        return re.sub(r"\.(lora_[A-Za-z_]+)\.default\.", r".\1.", name)

    def lora_parameters(self, module: Any = None) -> dict[str, Any]:
        """LoRA parameters by peft key, read through `module` (e.g. an FSDP wrapper inside
        `summon_full_params`), where state_dict hooks would not give the full tensors."""
        return {self.peft_key(n): p for n, p in (module or self.model).named_parameters() if "lora_" in n}

    def save_state(self, out_dir: str | Path, state: dict[str, Any]) -> Path:
        """Write an adapter from a state dict (peft keys) in peft's format."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        config = copy.copy(self.model.peft_config["default"])
        config.inference_mode = True  # as PeftModel.save_pretrained writes it
        config.save_pretrained(str(out))
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(out / "adapter_model.safetensors"),
                  metadata={"format": "pt"})
        return out


class UserTrainer:
    """Trains the student's adapter on one user's examples, one epoch at a time."""

    def __init__(self, student: LoraStudent, spec: TrainSpec, examples: Sequence[Example], cfg: DistillConfig,
                 seed: int = 0, module: Any = None, reset: Callable[[int], None] | None = None,
                 clip: Callable[[float], Any] | None = None) -> None:
        """`module`, `reset` and `clip` let a sharded (FSDP) wrapper of the student train instead of
        the plain peft model: forward through the wrapper, re-initialise and clip through it."""
        import torch

        if not examples:
            raise ValueError("no training examples for this user (did synthesis keep any QA?)")
        self.student, self.spec, self.examples, self.cfg, self.seed = student, spec, list(examples), cfg, seed
        self.module = module if module is not None else student.model
        (reset or student.reset)(seed)
        self.module.train()
        params = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        self._clip = clip or (lambda max_norm: torch.nn.utils.clip_grad_norm_(params, max_norm))
        self.epoch = 0
        self.history: list[dict[str, float]] = []

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.examples) / self.cfg.batch_size)

    def run_epoch(self, on_step: Callable[[int, int, float], None] | None = None) -> dict[str, float]:
        """One pass over the examples in the order fixed by (seed, epoch); returns mean loss and timing."""
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.examples))
        bs = self.cfg.batch_size
        losses, tokens, t0 = [], 0, time.perf_counter()
        self.module.train()
        for step, start in enumerate(range(0, len(order), bs)):
            batch = _to(collate([self.examples[i] for i in order[start:start + bs]], self.student.pad_id),
                        self.student.device)
            loss = batch_loss(self.module, batch, self.spec)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self._clip(self.cfg.max_grad_norm)
            self.optimizer.step()
            losses.append(float(loss.detach()))
            tokens += int(batch["mask"].sum())
            if on_step:
                on_step(step + 1, self.steps_per_epoch, losses[-1])
        self.epoch += 1
        metrics = {"epoch": float(self.epoch), "loss": float(np.mean(losses)), "answer_tokens": float(tokens),
                   "seconds": time.perf_counter() - t0}
        self.history.append(metrics)
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {"adapter": self.student.adapter_state(), "optimizer": self.optimizer.state_dict(),
                "epoch": self.epoch, "history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.student.load_adapter_state(state["adapter"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch = int(state["epoch"])
        self.history = list(state.get("history", []))


def final_metrics(history: Sequence[dict[str, float]], n_examples: int) -> dict[str, float]:
    """Manifest metrics of a finished adapter from its per-epoch history."""
    h = history
    return {"epochs": float(len(h)), "loss_first_epoch": h[0]["loss"] if h else float("nan"),
            "loss_last_epoch": h[-1]["loss"] if h else float("nan"),
            "train_seconds": float(sum(x["seconds"] for x in h)), "n_examples": float(n_examples)}
