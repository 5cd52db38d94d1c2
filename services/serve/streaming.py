"""A chat completion in flight: the LLM deployment's per-step tokens turned into an OpenAI response,
whole (`complete`) or as SSE deltas sent as the tokens arrive (`sse`). Both read the same step stream
under the same deadline, and closing either releases the admission slot and aborts the generation."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from services.serve import metrics
from services.serve.errors import APIError
from services.serve.protocol import (
    ChatCompletionChunk,
    ChatCompletionResponse,
    Choice,
    ChunkChoice,
    DeltaMessage,
    ErrorBody,
    ErrorResponse,
    ResponseMessage,
    Usage,
)
from tsubasa.llm.base import Generation, GenerationStep

log = logging.getLogger(__name__)


class Overloaded(Exception):
    """The LLM replicas refused the request (Serve back-pressure)."""


async def next_step(steps: AsyncIterator[GenerationStep], deadline: float, timeout_s: float,
                    retry_after_s: int) -> GenerationStep:
    """The next step before `deadline` (event-loop time); 504 past it, 503 when the replicas refuse."""
    try:
        async with asyncio.timeout_at(deadline):
            return await anext(steps)
    except TimeoutError:
        metrics.REJECTED.labels("timeout").inc()
        raise APIError(504, f"generation took longer than {timeout_s:g} s", "timeout") from None
    except StopAsyncIteration:
        raise APIError(500, "the model stream ended without an answer", "engine_error") from None
    except Overloaded:
        metrics.REJECTED.labels("llm_overloaded").inc()
        raise APIError(503, "the model replicas are saturated; retry later", "overloaded",
                       retry_after=retry_after_s) from None


class TextDeltas:
    """Text pieces of a streamed answer whose concatenation is exactly its final text (decoded from
    all tokens, cut at the first stop string, stripped). Decodes the tokens so far and holds back
    what may still change: an incomplete character, trailing whitespace, a possible stop prefix."""

    def __init__(self, decode: Callable[[list[int]], str], stops: list[str]) -> None:
        self.decode, self.stops = decode, [s for s in stops if s]
        self._hold = max((len(s) for s in self.stops), default=1) - 1
        self._ids: list[int] = []
        self.emitted = ""

    def push(self, ids: list[int]) -> str:
        """The new piece after `ids` (may be empty)."""
        self._ids += ids
        text = self.decode(self._ids).lstrip()
        if not ids or text.endswith("\ufffd"):
            return ""
        cuts = [text.index(s) for s in self.stops if s in text]
        if cuts:
            text = text[: min(cuts)]
        elif self._hold:
            text = text[: max(0, len(text) - self._hold)]
        return self._emit(text.rstrip())

    def finish(self, final_text: str) -> str:
        """What is left of the final text."""
        if not final_text.startswith(self.emitted):  # a tokenizer that rewrites earlier text on decode
            log.warning("streamed text %r is not a prefix of the answer %r", self.emitted, final_text)
            return ""
        return self._emit(final_text)

    def _emit(self, text: str) -> str:
        if len(text) <= len(self.emitted) or not text.startswith(self.emitted):
            return ""
        piece, self.emitted = text[len(self.emitted):], text
        return piece


class ChatStream:
    """One admitted generation: the response head (id, model, personalisation) is known, the first
    step has arrived, the rest arrives from `steps` until `deadline` (event-loop time)."""

    def __init__(self, head: ChatCompletionResponse, steps: AsyncIterator[GenerationStep], first: GenerationStep,
                 deadline: float, timeout_s: float, tenant: str, stops: list[str],
                 decode: Callable[[list[int]], str], exit_stack: contextlib.AsyncExitStack) -> None:
        self.head, self._steps, self._first = head, steps, first
        self.deadline, self.timeout_s, self.tenant = deadline, timeout_s, tenant
        self.stops, self.decode, self._exit = stops, decode, exit_stack

    async def steps(self) -> AsyncIterator[GenerationStep]:
        """Every step up to the final one; always releases the slot and the generation."""
        try:
            step = self._first
            yield step
            while step.final is None:
                step = await next_step(self._steps, self.deadline, self.timeout_s, 1)
                yield step
        finally:
            await self._exit.aclose()

    async def aclose(self) -> None:
        """Release the admission slot and abort the generation if still running (idempotent)."""
        await self._exit.aclose()

    def finish(self, gen: Generation) -> ChatCompletionResponse:
        metrics.COMPLETION_TOKENS.labels(self.tenant).inc(gen.completion_tokens)
        mem = self.head.tsubasa.memory_tokens if self.head.tsubasa else 0
        return self.head.model_copy(update={
            "choices": [Choice(message=ResponseMessage(content=gen.text), finish_reason=gen.finish_reason)],
            "usage": Usage(prompt_tokens=gen.prompt_tokens, completion_tokens=gen.completion_tokens,
                           total_tokens=gen.prompt_tokens + gen.completion_tokens, memory_tokens=mem)})

    async def complete(self) -> ChatCompletionResponse:
        final = None
        async with contextlib.aclosing(self.steps()) as steps:
            async for step in steps:
                final = step.final or final
        assert final is not None
        return self.finish(final)

    async def sse(self, include_usage: bool) -> AsyncIterator[str]:
        """SSE lines: a role chunk, a content delta per step as it arrives, the finish chunk (with the
        `tsubasa` field), the usage chunk if asked, [DONE]; an error event if the deadline passes."""
        head = self.head

        def chunk(delta: DeltaMessage | None, finish: str | None = None, **extra: Any) -> str:
            c = ChatCompletionChunk(id=head.id, created=head.created, model=head.model,
                                    choices=[ChunkChoice(delta=delta, finish_reason=finish)] if delta is not None
                                    else [], **extra)
            return f"data: {c.model_dump_json(exclude_none=True)}\n\n"

        deltas = TextDeltas(self.decode, self.stops)
        yield chunk(DeltaMessage(role="assistant", content=""))
        async with contextlib.aclosing(self.steps()) as steps:
            try:
                async for step in steps:
                    piece = deltas.push(step.token_ids) if step.final is None else deltas.finish(step.final.text)
                    if piece:
                        yield chunk(DeltaMessage(content=piece))
                    if step.final is not None:
                        resp = self.finish(step.final)
                        yield chunk(DeltaMessage(), step.final.finish_reason, tsubasa=resp.tsubasa)
                        if include_usage:
                            yield chunk(None, usage=resp.usage)
                        yield "data: [DONE]\n\n"
            except APIError as exc:  # the status line is long gone: say it in the stream
                body = ErrorResponse(error=ErrorBody(message=exc.message, type="api_error", code=exc.code))
                yield f"data: {body.model_dump_json(exclude_none=True)}\n\n"
