"""The Engine protocol: what every LLM backend (transformers+peft, vLLM) offers the library."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

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
    json_schema: dict[str, Any] | None = None
    """Constrain the output to this JSON schema (engines with grammar support: llamacpp, openai
    endpoints that accept `response_format`); the others raise EngineCapabilityError."""


class Generation(BaseModel):
    text: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: Literal["stop", "length"]
    adapter: str | None = None


class GenerationStep(BaseModel):
    """One step of a streamed generation: the token ids generated since the previous step (EOS
    excluded); the last step also carries the finished Generation (text cut at EOS and stop strings)."""

    token_ids: list[int] = Field(default_factory=list)
    final: Generation | None = None


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


class EngineCapabilityError(NotImplementedError):
    """The engine cannot do what was asked (adapters, top-d scores, constrained output); the message
    names the engines that can."""


@runtime_checkable
class Engine(Protocol):
    """A chat LLM with named LoRA adapters. Implementations: HFEngine (transformers+peft), VLLMEngine,
    LlamaCppEngine (GGUF on the CPU: generation only) and OpenAIEngine (any OpenAI-compatible endpoint:
    generation only)."""

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


@runtime_checkable
class StreamingEngine(Protocol):
    """An engine that schedules each request on arrival, joining the running batch at the next step
    (continuous batching), and yields its tokens as they are generated: VLLMEngine on vLLM's AsyncLLM.
    Closing the iterator early aborts the request."""

    def stream(self, messages: Messages, params: SamplingParams,
               adapter: str | None = None) -> AsyncIterator[GenerationStep]: ...


class ChatTokenizerMixin:
    """Tokenisation both engines share, so HFEngine and VLLMEngine agree token for token: the
    chat template, continuation ids, the stop-token set and the trimming of a finished generation.
    The engine sets `tokenizer` (a transformers tokenizer) and `cfg` (a ModelConfig)."""

    tokenizer: Any
    cfg: Any

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt_ids(self, messages: Messages) -> list[int]:
        """Token ids of a chat prompt with the generation prompt appended."""
        text = self.tokenizer.apply_chat_template(
            [m.model_dump() if isinstance(m, ChatMessage) else dict(m) for m in messages],
            tokenize=False, add_generation_prompt=True, enable_thinking=self.cfg.enable_thinking,
        )
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def continuation_ids(self, continuation: str, append_eos: bool = True) -> list[int]:
        ids = self.tokenizer(continuation, add_special_tokens=False)["input_ids"]
        if append_eos and self.tokenizer.eos_token_id is not None:
            ids = [*ids, self.tokenizer.eos_token_id]
        return ids

    def merged_eos_ids(self, generation_eos: int | list[int] | None) -> list[int]:
        """The generation config's EOS id(s) plus the tokenizer's (chat models end turns on either)."""
        ids = generation_eos if isinstance(generation_eos, list) else [generation_eos]
        if self.tokenizer.eos_token_id is not None:
            ids = [*ids, self.tokenizer.eos_token_id]
        return sorted({int(i) for i in ids if i is not None})

    def finish_generation(self, new: list[int], finish: str, eos: set[int], params: SamplingParams,
                          prompt_tokens: int, adapter: str | None) -> Generation:
        """Cut at the first EOS (not part of the text) and at the first stop string."""
        for j, t in enumerate(new):
            if t in eos:
                new, finish = new[:j], "stop"
                break
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        for s in params.stop:
            if s and s in text:
                text, finish = text[: text.index(s)], "stop"
        return Generation(text=text.strip(), token_ids=new, prompt_tokens=prompt_tokens,
                          completion_tokens=len(new), finish_reason=finish,  # type: ignore[arg-type]
                          adapter=adapter)


class GenerationOnlyMixin:
    """Engines that generate but expose neither LoRA adapters nor full next-token distributions
    (llama.cpp, remote OpenAI-compatible endpoints): asking for either is a clear error."""

    model_name: str
    engine_label: str = "this engine"

    def _cannot(self, what: str) -> EngineCapabilityError:
        return EngineCapabilityError(
            f"{what} needs an engine that runs LoRA adapters and exposes next-token distributions: "
            f"model.engine=hf or model.engine=vllm ({self.engine_label} generates only)")

    def score_topd(self, prompts: Sequence[Messages], continuations: Sequence[str], d: int = 5,
                   adapters: Sequence[str | None] | None = None, append_eos: bool = True) -> list[TopDScores]:
        raise self._cannot("top-d scoring (distillation teacher/student)")

    def load_adapter(self, name: str, path: str) -> None:
        raise self._cannot(f"loading LoRA adapter {name!r}")

    def unload_adapter(self, name: str) -> None:
        return None  # nothing is ever loaded

    def loaded_adapters(self) -> list[str]:
        return []

    def _check_adapters(self, adapters: Sequence[str | None] | None) -> None:
        if adapters is not None and any(a is not None for a in adapters):
            raise self._cannot("generation with a LoRA adapter")


def reject_json_schema(params: SamplingParams, engine: str) -> None:
    """For engines without grammar-constrained decoding."""
    if params.json_schema is not None:
        raise EngineCapabilityError(f"JSON-schema constrained output is not supported by the {engine} engine: "
                                    "use model.engine=llamacpp or an openai endpoint that accepts response_format")
