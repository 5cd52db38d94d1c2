"""transformers engine (CPU default, also GPU): batched chat generation, named LoRA adapters (PEFT
directories) with mixed-adapter batches, and top-d scoring of continuations.

Adapters live in the model's multi-LoRA layers (`tsubasa.llm.multilora`): each loaded adapter has a
slot, and a batch mixing adapters (and base-model rows) runs as one pass with a per-row slot index."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from tsubasa.config import ModelConfig
from tsubasa.llm.base import (
    AdapterNotLoadedError,
    ChatTokenizerMixin,
    Generation,
    Messages,
    SamplingParams,
    TopDScores,
    reject_json_schema,
)
from tsubasa.llm.models import contiguous_lm_head, resolve_model, torch_dtype
from tsubasa.llm.multilora import MultiLoraModel

log = logging.getLogger(__name__)


class HFEngine(ChatTokenizerMixin):
    """A causal LM from transformers; LoRA adapters in multi-LoRA layers, kept in an LRU of
    `max_loaded_adapters` slots."""

    def __init__(self, cfg: ModelConfig | None = None) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg = cfg = cfg or ModelConfig()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.path = resolve_model(cfg.name, cfg.cache_dir)
        self.model_name = cfg.name
        want_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
        self.device = torch.device("cuda" if want_cuda else "cpu")
        dtype = torch_dtype(cfg.dtype, self.path, want_cuda)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.base_model = contiguous_lm_head(AutoModelForCausalLM.from_pretrained(self.path, dtype=dtype))
        self.base_model.to(self.device)
        self.base_model.eval()
        self.lora: MultiLoraModel | None = None  # layers are put in at the first adapter
        self._adapters: OrderedDict[str, int] = OrderedDict()  # name -> slot
        self._lock = threading.RLock()
        torch.manual_seed(cfg.seed)

    @property
    def eos_ids(self) -> list[int]:
        return self.merged_eos_ids(self.base_model.generation_config.eos_token_id)

    # ---- adapters -----------------------------------------------------------------------------
    def load_adapter(self, name: str, path: str) -> None:
        """Load LoRA weights from the PEFT directory `path` under `name` (evicting the least
        recently used adapter if all slots are taken)."""
        with self._lock:
            if name in self._adapters:
                self._adapters.move_to_end(name)
                return
            while len(self._adapters) >= self.cfg.max_loaded_adapters:
                self.unload_adapter(next(iter(self._adapters)))
            if self.lora is None:
                self.lora = MultiLoraModel(self.base_model, slots=1)
            used = set(self._adapters.values())
            slot = next(s for s in range(self.cfg.max_loaded_adapters) if s not in used)
            self.lora.load_peft(slot, path)
            self._adapters[name] = slot
            log.info("loaded adapter %s from %s (slot %d)", name, path, slot)

    def unload_adapter(self, name: str) -> None:
        with self._lock:
            slot = self._adapters.pop(name, None)
            if slot is not None and self.lora is not None:
                self.lora.clear(slot)

    def loaded_adapters(self) -> list[str]:
        return list(self._adapters)

    def _slots(self, adapters: Sequence[str | None] | None, n: int) -> list[int] | None:
        """Slot per row (-1 = base model), or None when no row names an adapter."""
        if adapters is None or all(a is None for a in adapters):
            return None
        if len(adapters) != n:
            raise ValueError(f"adapters has {len(adapters)} entries for {n} prompts")
        slots = []
        for a in adapters:
            if a is not None and a not in self._adapters:
                raise AdapterNotLoadedError(a)
            if a is not None:
                self._adapters.move_to_end(a)
            slots.append(-1 if a is None else self._adapters[a])
        return slots

    def routed(self, adapters: Sequence[str | None] | None, n: int) -> contextlib.AbstractContextManager:
        """Context in which row i of a batch of `n` runs with adapter `adapters[i]` (None = base).
        Hold `self._lock` around it and the model calls inside."""
        slots = self._slots(adapters, n)
        if slots is None or self.lora is None:
            return contextlib.nullcontext()
        return self.lora.route(slots)

    # ---- generation ---------------------------------------------------------------------------
    def generate(
        self,
        prompts: Sequence[Messages],
        params: SamplingParams | None = None,
        adapters: Sequence[str | None] | None = None,
        on_tokens: Callable[[int, list[int]], None] | None = None,
    ) -> list[Generation]:
        """Batched chat generation; `on_tokens(i, ids)`, when given, receives prompt i's new token
        ids after every generation step (EOS excluded), so callers can stream them."""
        params = params or SamplingParams()
        reject_json_schema(params, "hf")
        encoded = [self.prompt_ids(p) for p in prompts]
        out: list[Generation | None] = [None] * len(prompts)
        order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))  # similar lengths pad less
        bs = self.cfg.batch_size
        for start in range(0, len(order), bs):
            idx = order[start:start + bs]
            sub_adapters = None if adapters is None else [adapters[i] for i in idx]
            streamer = None if on_tokens is None else _RowStreamer(idx, on_tokens, set(self.eos_ids))
            for i, gen in zip(idx, self._generate_batch([encoded[i] for i in idx], params, sub_adapters, streamer),
                              strict=True):
                out[i] = gen
        return [g for g in out if g is not None]

    def _generate_batch(self, batch: list[list[int]], params: SamplingParams,
                        adapters: Sequence[str | None] | None, streamer: Any = None) -> list[Generation]:
        import torch

        with self._lock, self.routed(adapters, len(batch)):
            enc = self.tokenizer.pad({"input_ids": batch}, return_tensors="pt", padding=True)
            enc = {k: v.to(self.device) for k, v in enc.items()}
            kwargs: dict[str, Any] = {
                "max_new_tokens": params.max_new_tokens,
                "pad_token_id": self.tokenizer.pad_token_id,
                "eos_token_id": self.eos_ids,
            }
            if params.temperature > 0:
                if params.seed is not None:
                    torch.manual_seed(params.seed)
                kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p)
            else:
                kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            if streamer is not None:
                kwargs["streamer"] = streamer
            with torch.inference_mode():
                seqs = self.base_model.generate(**enc, **kwargs)
        width = enc["input_ids"].shape[1]
        eos = set(self.eos_ids)
        gens = []
        for i, (row, prompt) in enumerate(zip(seqs.tolist(), batch, strict=True)):
            new = row[width:]
            if not eos.intersection(new):  # ran to the length limit: drop the batch's right padding
                while new and new[-1] == self.tokenizer.pad_token_id:
                    new = new[:-1]
            gens.append(self.finish_generation(new, "length", eos, params, len(prompt),
                                               None if adapters is None else adapters[i]))
        return gens

    # ---- scoring ------------------------------------------------------------------------------
    def score_topd(
        self,
        prompts: Sequence[Messages],
        continuations: Sequence[str],
        d: int = 5,
        adapters: Sequence[str | None] | None = None,
        append_eos: bool = True,
    ) -> list[TopDScores]:
        if len(prompts) != len(continuations):
            raise ValueError("prompts and continuations differ in length")
        rows = [(self.prompt_ids(p), self.continuation_ids(c, append_eos))
                for p, c in zip(prompts, continuations, strict=True)]
        out: list[TopDScores] = []
        bs = self.cfg.batch_size
        for start in range(0, len(rows), bs):
            sub = None if adapters is None else list(adapters[start:start + bs])
            out.extend(self._score_batch(rows[start:start + bs], d, sub))
        return out

    def _score_batch(self, rows: list[tuple[list[int], list[int]]], d: int,
                     adapters: Sequence[str | None] | None) -> list[TopDScores]:
        import torch

        # Left padding puts every continuation at the end, so only the last max_c+1 positions'
        # logits are needed (logits_to_keep) instead of a (B, L, V) tensor.
        seqs = [p + c for p, c in rows]
        max_c = max(len(c) for _, c in rows)
        with self._lock, self.routed(adapters, len(rows)):
            enc = self.tokenizer.pad({"input_ids": seqs}, return_tensors="pt", padding=True)
            enc = {k: v.to(self.device) for k, v in enc.items()}
            with torch.inference_mode():
                logits = self.base_model(**enc, logits_to_keep=max_c + 1).logits.float()
                logp = torch.log_softmax(logits, dim=-1)
        k = logp.shape[1]
        out = []
        for i, (_, cont) in enumerate(rows):
            c = len(cont)
            pos = logp[i, k - c - 1: k - 1]  # (c, V): distribution predicting each continuation token
            top = pos.topk(d, dim=-1)
            tok = torch.tensor(cont, device=pos.device)
            out.append(TopDScores(
                token_ids=np.asarray(cont, dtype=np.int64),
                topd_ids=top.indices.cpu().numpy().astype(np.int64),
                topd_logprobs=top.values.cpu().numpy().astype(np.float32),
                token_logprobs=pos.gather(1, tok[:, None])[:, 0].cpu().numpy().astype(np.float32),
            ))
        return out


class _RowStreamer:
    """A transformers streamer (`put` per generation step, `end`) for a batch: hands each row's new
    token to `on_tokens(rows[j], [token])` until the row emits an EOS (later steps only pad it)."""

    def __init__(self, rows: list[int], on_tokens: Callable[[int, list[int]], None], eos: set[int]) -> None:
        self.rows, self.on_tokens, self.eos = rows, on_tokens, eos
        self._prompt_seen = False
        self._done: set[int] = set()

    def put(self, value: Any) -> None:
        if not self._prompt_seen:  # generate() first puts the prompt ids
            self._prompt_seen = True
            return
        for j, tok in enumerate(value.reshape(-1).tolist()):
            if j in self._done:
                continue
            if tok in self.eos:
                self._done.add(j)
            else:
                self.on_tokens(self.rows[j], [int(tok)])

    def end(self) -> None:
        pass
