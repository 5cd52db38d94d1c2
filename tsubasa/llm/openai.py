"""OpenAI-compatible endpoint engine: vLLM's or llama.cpp's server, Ollama, OpenAI itself.

For the memory writer and the LLM judge, as Mem0 users expect. `model.base_url` names the endpoint
(`http://host:8000/v1`), `model.name` the served model, the key comes from `model.api_key` (env
`TSUBASA_MODEL__API_KEY`, `TSUBASA_WRITER__API_KEY`, from a Kubernetes Secret) or `OPENAI_API_KEY`.
It generates only (adapters and top-d scores are EngineCapabilityError). Token counts come from
the endpoint's `usage`; `count_tokens` uses the model's local tokenizer where one is known, else a
word count (stated in `token_counting`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tsubasa.config import ModelConfig
from tsubasa.llm.base import ChatMessage, Generation, GenerationOnlyMixin, Messages, SamplingParams

log = logging.getLogger(__name__)


class OpenAIEngine(GenerationOnlyMixin):
    """Chat completions against `model.base_url`; a batch is sent as `model.parallel` concurrent requests."""

    engine_label = "openai"

    def __init__(self, cfg: ModelConfig) -> None:
        try:
            import openai
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise RuntimeError("model.engine=openai needs the openai SDK: pip install 'tsubasa[serving]'") from exc
        if not cfg.base_url:
            raise ValueError("model.engine=openai needs model.base_url (e.g. http://127.0.0.1:8000/v1)")
        self.cfg = cfg
        self.model_name = cfg.name
        key = cfg.api_key.get_secret_value() if cfg.api_key else os.environ.get("OPENAI_API_KEY", "none")
        self.client = openai.OpenAI(base_url=cfg.base_url, api_key=key, timeout=cfg.request_timeout_s,
                                    max_retries=2)
        self._pool = ThreadPoolExecutor(max_workers=cfg.parallel, thread_name_prefix="openai-engine")
        self._tokenizer = self._local_tokenizer(cfg)
        self.token_counting = "tokenizer" if self._tokenizer is not None else "words"

    @staticmethod
    def _local_tokenizer(cfg: ModelConfig) -> Any | None:
        from tsubasa.llm.models import BUILTIN_MODELS, load_tokenizer

        if cfg.name not in BUILTIN_MODELS:
            return None
        try:
            return load_tokenizer(cfg.name, cfg.cache_dir)
        except Exception as exc:  # counting falls back to words, stated in token_counting
            log.warning("no local tokenizer for %s (%s): counting words", cfg.name, exc)
            return None

    def count_tokens(self, text: str) -> int:
        if self._tokenizer is None:
            return len(text.split())
        return len(self._tokenizer(text, add_special_tokens=False)["input_ids"])

    def _one(self, messages: Messages, params: SamplingParams) -> Generation:
        kwargs: dict[str, Any] = {"model": self.cfg.name, "max_tokens": params.max_new_tokens,
                                  "temperature": params.temperature, "top_p": params.top_p}
        if params.stop:
            kwargs["stop"] = list(params.stop)[:4]  # OpenAI accepts at most four
        if params.seed is not None:
            kwargs["seed"] = params.seed
        if params.json_schema is not None:
            kwargs["response_format"] = {"type": "json_schema",
                                         "json_schema": {"name": "output", "schema": params.json_schema}}
        resp = self.client.chat.completions.create(
            messages=[m.model_dump() if isinstance(m, ChatMessage) else dict(m) for m in messages], **kwargs)
        choice = resp.choices[0]
        text = choice.message.content or ""
        usage = resp.usage
        completion = usage.completion_tokens if usage else self.count_tokens(text)
        return Generation(text=text.strip(), token_ids=[], prompt_tokens=usage.prompt_tokens if usage else 0,
                          completion_tokens=completion,
                          finish_reason="length" if choice.finish_reason == "length" else "stop")

    def generate(
        self,
        prompts: Sequence[Messages],
        params: SamplingParams | None = None,
        adapters: Sequence[str | None] | None = None,
    ) -> list[Generation]:
        params = params or SamplingParams()
        self._check_adapters(adapters)
        return list(self._pool.map(lambda p: self._one(p, params), prompts))
