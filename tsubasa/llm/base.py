"""The Engine protocol: what every LLM backend (transformers+peft, vLLM) offers the library."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import numpy as np
from pydantic import BaseModel, Field


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


Messages = Sequence[ChatMessage]


def msgs(*pairs: tuple[str, str]) -> list[ChatMessage]:
    """`msgs(("system", s), ("user", u))` -> list of ChatMessage."""
    return [ChatMessage(role=r, content=c) for r, c in pairs]  # type: ignore[arg-type]


class SamplingParams(BaseModel):
    max_new_tokens: int = Field(128, ge=1, le=32768)
    temperature: float = Field(0.0, ge=0.0, le=5.0)
    """0 = greedy (deterministic)."""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: list[str] = Field(default_factory=list)
    seed: int | None = None


class Generation(BaseModel):
    text: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: Literal["stop", "length"]
    adapter: str | None = None


@dataclass
class TopDScores:
    """Teacher/student scores of one continuation: at each continuation position t, the top-d
    next-token ids and their log-probabilities (natural log, under the full vocabulary)."""

    token_ids: np.ndarray  # (T,) int64: the continuation's own tokens
    topd_ids: np.ndarray  # (T, d) int64
    topd_logprobs: np.ndarray  # (T, d) float32, sorted descending
    token_logprobs: np.ndarray  # (T,) float32: log-prob of the continuation's own tokens

    @property
    def d(self) -> int:
        return int(self.topd_ids.shape[1])


class AdapterNotLoadedError(KeyError):
    """A request named an adapter the engine has not loaded."""


@runtime_checkable
class Engine(Protocol):
    """A chat LLM with named LoRA adapters. Implementations: HFEngine (transformers+peft), VLLMEngine."""

    model_name: str

    def count_tokens(self, text: str) -> int:
        """Tokens of `text` under the model's tokenizer (no special tokens)."""
        ...

    def generate(
        self,
        prompts: Sequence[Messages],
        params: SamplingParams | None = None,
        adapters: Sequence[str | None] | None = None,
    ) -> list[Generation]:
        """Batched chat generation; `adapters[i]` names the LoRA for prompt i (None = base model)."""
        ...

    def score_topd(
        self,
        prompts: Sequence[Messages],
        continuations: Sequence[str],
        d: int = 5,
        adapters: Sequence[str | None] | None = None,
        append_eos: bool = True,
    ) -> list[TopDScores]:
        """Top-d next-token ids/log-probs at every position of each continuation after its prompt."""
        ...

    def load_adapter(self, name: str, path: str) -> None: ...

    def unload_adapter(self, name: str) -> None: ...

    def loaded_adapters(self) -> list[str]: ...
