"""A scripted LLM for tests that need specific model replies (RECONCILE, malformed outputs).

It stands in for the *model*, never for the code under test: prompts go through the real
extractor/manager/parser code; only the reply text is fixed. It delegates tokenisation and
scoring to a real engine (tiny-qwen3)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from tsubasa.llm.base import Generation, Messages, SamplingParams


class ScriptedEngine:
    def __init__(self, replies: Sequence[str] | Callable[[Messages], str], real=None,
                 model_name: str = "scripted") -> None:
        self._replies = replies if callable(replies) else list(replies)
        self.real = real
        self.model_name = model_name
        self.prompts: list[Messages] = []

    def _next(self, prompt: Messages) -> str:
        self.prompts.append(prompt)
        if callable(self._replies):
            return self._replies(prompt)
        if not self._replies:
            raise AssertionError("ScriptedEngine ran out of replies")
        return self._replies.pop(0)

    def count_tokens(self, text: str) -> int:
        return self.real.count_tokens(text) if self.real else len(text.split())

    def generate(self, prompts, params: SamplingParams | None = None, adapters=None) -> list[Generation]:
        out = []
        for p in prompts:
            text = self._next(p)
            out.append(Generation(text=text, token_ids=[], prompt_tokens=0, completion_tokens=len(text.split()),
                                  finish_reason="stop"))
        return out

    def score_topd(self, *a, **kw):
        return self.real.score_topd(*a, **kw)

    def load_adapter(self, name: str, path: str) -> None:  # pragma: no cover
        raise NotImplementedError

    def unload_adapter(self, name: str) -> None:  # pragma: no cover
        raise NotImplementedError

    def loaded_adapters(self) -> list[str]:
        return []
