"""Greedy generation for many prompts that share one long prefix (the full-context baseline: every
question about a user comes after the same ~8k-token transcript).

The prefix's key/value cache is computed once and cropped back after each answer, so each question
costs only its own tokens. This needs the transformers engine's model and tokenizer; with any
other engine (vLLM caches prefixes itself), with adapters loaded, or when a prompt does not start
with the cached prefix, it falls back to the engine's own `generate`, so answers never depend on
whether the cache was used.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from tsubasa.llm.base import Engine, Generation, Messages, SamplingParams

log = logging.getLogger(__name__)


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class PrefixCachedGenerator:
    """Generate greedy answers for prompts sharing a token prefix set with `set_prefix`."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._prefix: list[int] = []
        self._cache: Any = None
        self.prefill_s = 0.0
        """Wall seconds spent computing prefix caches (shared by every question after it)."""
        self.cached_calls = 0
        self.fallback_calls = 0

    @property
    def supported(self) -> bool:
        e = self.engine
        return (all(hasattr(e, a) for a in ("base_model", "tokenizer", "prompt_ids", "eos_ids"))
                and not e.loaded_adapters())

    def set_prefix(self, probe_a: Messages, probe_b: Messages) -> int:
        """Cache the tokens two probe prompts (same context, different questions) have in common.
        Returns the prefix length in tokens (0 when caching is unsupported)."""
        if not self.supported:
            self._prefix, self._cache = [], None
            return 0
        a, b = self.engine.prompt_ids(probe_a), self.engine.prompt_ids(probe_b)  # type: ignore[attr-defined]
        prefix = a[:common_prefix_len(a, b)]
        if prefix == self._prefix and self._cache is not None:
            return len(prefix)
        import torch

        t0 = time.perf_counter()
        model = self.engine.base_model  # type: ignore[attr-defined]
        with self._lock(), torch.inference_mode():
            ids = torch.tensor([prefix], device=model.device)
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
        self._prefix, self._cache = prefix, out.past_key_values
        self.prefill_s += time.perf_counter() - t0
        return len(prefix)

    def _lock(self):
        import contextlib

        return getattr(self.engine, "_lock", None) or contextlib.nullcontext()

    def generate(self, prompts: Sequence[Messages], params: SamplingParams) -> list[Generation]:
        """Like `engine.generate(prompts, params)` (greedy), reusing the cached prefix when it applies."""
        if self._cache is None or params.temperature > 0 or not self.supported:
            self.fallback_calls += len(prompts)
            return self.engine.generate(prompts, params)
        return [self._one(p, params) for p in prompts]

    def _one(self, prompt: Messages, params: SamplingParams) -> Generation:
        import torch

        ids = self.engine.prompt_ids(prompt)  # type: ignore[attr-defined]
        n = len(self._prefix)
        if len(ids) <= n or ids[:n] != self._prefix:
            self.fallback_calls += 1
            return self.engine.generate([prompt], params)[0]
        e: Any = self.engine
        model, tok = e.base_model, e.tokenizer
        with self._lock(), torch.inference_mode():
            inp = torch.tensor([ids], device=model.device)
            try:
                seqs = model.generate(
                    input_ids=inp, attention_mask=torch.ones_like(inp), past_key_values=self._cache,
                    max_new_tokens=params.max_new_tokens, do_sample=False, temperature=None, top_p=None,
                    top_k=None, pad_token_id=tok.pad_token_id, eos_token_id=e.eos_ids)
            finally:
                extra = self._cache.get_seq_length() - n
                if extra > 0:  # back to the shared prefix for the next question
                    self._cache.crop(-extra)
        self.cached_calls += 1
        new = seqs[0, len(ids):].tolist()
        eos, finish = set(e.eos_ids), "length"
        for j, t in enumerate(new):
            if t in eos:
                new, finish = new[:j], "stop"
                break
        text = tok.decode(new, skip_special_tokens=True)
        for s in params.stop:
            if s and s in text:
                text, finish = text[: text.index(s)], "stop"
        return Generation(text=text.strip(), token_ids=new, prompt_tokens=len(ids), completion_tokens=len(new),
                          finish_reason=finish)  # type: ignore[arg-type]
