"""The Engine protocol over the LLM deployment, for the memory writer inside the gateway: the
gateway loads no model of its own, and extraction/evolution share the replicas with chat traffic:
`generate_many` submits each prompt on its own through the same streamed path as chat requests
(`LLMServerCore.generate`), so on vLLM they join the running batch step by step instead of holding
a batch of their own. Blocking: call it from worker threads, never the event loop."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from tsubasa.llm.base import Generation, Messages, SamplingParams, TopDScores


class RemoteEngine:
    def __init__(self, handle: Any, model_name: str, count_tokens: Callable[[str], int],
                 timeout_s: float = 600.0) -> None:
        self.handle = handle
        self.model_name = model_name
        self._count = count_tokens
        self.timeout_s = timeout_s

    def count_tokens(self, text: str) -> int:
        return self._count(text)

    def generate(self, prompts: Sequence[Messages], params: SamplingParams | None = None,
                 adapters: Sequence[str | None] | None = None) -> list[Generation]:
        if adapters is not None and any(a is not None for a in adapters):
            raise NotImplementedError("the memory writer uses the base model only")
        resp = self.handle.generate_many.remote([list(p) for p in prompts], params or SamplingParams())
        return resp.result(timeout_s=self.timeout_s)

    def score_topd(self, *args: Any, **kwargs: Any) -> list[TopDScores]:
        raise NotImplementedError("scoring runs in the distillation job, not behind the gateway")

    def load_adapter(self, name: str, path: str) -> None:
        raise NotImplementedError("adapters are loaded by the LLM deployment")

    def unload_adapter(self, name: str) -> None:
        raise NotImplementedError("adapters are unloaded by the LLM deployment")

    def loaded_adapters(self) -> list[str]:
        return []
