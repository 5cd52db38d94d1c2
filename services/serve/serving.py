"""The gateway's logic, free of HTTP and Ray: who may touch what, which adapter and memories a
request gets, the grounded prompt, events in, users forgotten. `gateway.py` routes to it; tests and
benchmarks can drive it with any `LLMClient`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from services.serve import metrics
from services.serve.errors import APIError
from services.serve.llm import GenerateRequest
from services.serve.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    EventError,
    EventsRequest,
    EventsResponse,
    ForgetResponse,
    MemoryRef,
    ModelCard,
    ModelList,
    Personalisation,
    TsubasaOptions,
    Usage,
    UserStatus,
)
from services.serve.sessions import QueueFullError, SessionQueue
from services.serve.streaming import ChatStream, Overloaded, next_step
from tsubasa.config import Settings
from tsubasa.distill.adapters import AdapterNotFoundError, AdapterVersion, parse_adapter_name
from tsubasa.distill.prompts import student_messages
from tsubasa.llm.base import ChatMessage, GenerationStep, SamplingParams
from tsubasa.memory.retrieve import Grounding
from tsubasa.schema import InvalidEventError, InvalidIdentifierError, parse_event, validate_identifier

log = logging.getLogger(__name__)


class LLMClient(Protocol):
    def stream(self, req: GenerateRequest) -> AsyncIterator[GenerationStep]:
        """The request's tokens per engine step, the last step with the Generation; closing the
        iterator early aborts the generation. Raises Overloaded when the replicas refuse it."""
        ...


class HandleLLMClient:
    """The LLM deployment through a Serve handle, routed by adapter version (multiplexed model id),
    streamed: each engine step arrives as Serve yields it."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    async def stream(self, req: GenerateRequest) -> AsyncIterator[GenerationStep]:
        from ray.serve.exceptions import BackPressureError

        resp = self.handle.options(stream=True, multiplexed_model_id=req.adapter or "").generate.remote(req)
        done = False
        try:
            async for step in resp:
                yield step
                done = step.final is not None
        except BackPressureError as exc:
            raise Overloaded(str(exc)) from None
        finally:
            if not done:  # the client went away or the deadline passed: abort in the replica
                resp.cancel()


class Admission:
    """At most `limit` chat requests run in this replica, at most `queue` more wait; beyond: 429."""

    def __init__(self, limit: int, queue: int, retry_after_s: int) -> None:
        self.limit, self.queue, self.retry_after_s = limit, queue, retry_after_s
        self._sem: asyncio.Semaphore | None = None
        self.waiting = 0
        self.running = 0

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.limit)
        if self.running >= self.limit and self.waiting >= self.queue:
            metrics.REJECTED.labels("queue_full").inc()
            raise APIError(429, f"too many requests: {self.running} running and {self.waiting} queued in this "
                           "replica; retry later", "rate_limited", retry_after=self.retry_after_s)
        self.waiting += 1
        metrics.WAITING.set(self.waiting)
        try:
            await self._sem.acquire()
        finally:
            self.waiting -= 1
            metrics.WAITING.set(self.waiting)
        self.running += 1
        metrics.INFLIGHT.set(self.running)
        try:
            yield
        finally:
            self.running -= 1
            metrics.INFLIGHT.set(self.running)
            self._sem.release()


class GatewayService:
    def __init__(self, settings: Settings, llm: LLMClient, memory: Any, registry: Any,
                 count_tokens: Callable[[str], int], decode: Callable[[list[int]], str],
                 sessions: SessionQueue | None = None) -> None:
        self.settings = settings
        self.llm = llm
        self.memory = memory
        self.registry = registry
        self.count_tokens = count_tokens
        self.decode = decode
        sc = settings.serve
        self.sessions = sessions or SessionQueue(self._evolve, sc.session_queue_size)
        self.admission = Admission(sc.max_ongoing_requests, sc.max_queued_requests, sc.retry_after_s)
        self._user_locks: dict[tuple[str, str], threading.Lock] = {}
        self._locks_guard = threading.Lock()

    @property
    def base_model(self) -> str:
        return self.settings.model.name

    # ---- identity -----------------------------------------------------------------------------
    def resolve_user(self, tenant: str, raw: str | None, param: str = "user") -> str:
        """`alice` (in the key's tenant) or `<tenant>:alice`; another tenant's user is refused."""
        if raw is None or not raw.strip():
            raise APIError(400, f"'{param}' is required: it names the user whose memories and adapter answer",
                           "missing_user", param)
        owner, sep, user = raw.strip().rpartition(":")
        if not sep:
            owner, user = tenant, raw.strip()
        try:
            validate_identifier(owner, f"{param} tenant")
            validate_identifier(user, param)
        except InvalidIdentifierError as exc:
            raise APIError(400, str(exc), "invalid_user", param) from None
        if owner != tenant:
            metrics.REJECTED.labels("cross_tenant_user").inc()
            raise APIError(403, f"user {raw!r} belongs to another tenant; this API key reaches tenant "
                           f"{tenant!r} only", "cross_tenant", param)
        return user

    def _user_lock(self, tenant: str, user: str) -> threading.Lock:
        with self._locks_guard:
            return self._user_locks.setdefault((tenant, user), threading.Lock())

    def resolve_adapter(self, tenant: str, user: str, model: str, mode: str) -> AdapterVersion | None:
        """The adapter version for this request, or None for the base model (blocking: registry I/O)."""
        if model == self.base_model:
            return self.registry.current(tenant, user) if mode == "auto" else None
        if "/" not in model:
            raise APIError(404, f"model {model!r} does not exist: use {self.base_model!r} or one of your "
                           "adapters (GET /v1/models)", "model_not_found", "model")
        try:
            owner, _, _ = parse_adapter_name(model)
        except (ValueError, InvalidIdentifierError) as exc:
            raise APIError(404, f"model {model!r} does not exist ({exc})", "model_not_found", "model") from None
        if owner != tenant:
            metrics.REJECTED.labels("cross_tenant_adapter").inc()
            raise APIError(403, f"adapter {model!r} belongs to another tenant", "cross_tenant", "model")
        try:
            return self.registry.get_by_name(model)
        except AdapterNotFoundError:
            raise APIError(404, f"adapter {model!r} does not exist (GET /v1/models lists yours)",
                           "model_not_found", "model") from None

    # ---- chat ---------------------------------------------------------------------------------
    def _prepare(self, tenant: str, user: str, req: ChatCompletionRequest,
                 ) -> tuple[AdapterVersion | None, Grounding, list[ChatMessage], float]:
        t0 = time.perf_counter()
        version = self.resolve_adapter(tenant, user, req.model, req.tsubasa.adapter)
        grounding = self.ground(tenant, user, req.messages[-1].content, self.grounding_k(version, req.tsubasa))
        messages = build_messages(req.messages, grounding)
        return version, grounding, messages, (time.perf_counter() - t0) * 1000

    def grounding_k(self, version: AdapterVersion | None, opts: TsubasaOptions) -> int:
        """Memories to ground on: none with memory off, else the request's top_k, else the adapter's
        training k (serve with the grounding it was trained with), else memory.top_k."""
        if not opts.memory:
            return 0
        if opts.top_k is not None:
            return opts.top_k
        return version.manifest.grounding_k if version is not None else self.settings.memory.top_k

    def ground(self, tenant: str, user: str, question: str, k: int, source: str = "memories") -> Grounding:
        """The top-k grounding of a question and its size in the serving model's tokens (blocking)."""
        if k <= 0:
            return Grounding(source=source, items=[], text="", tokens=0)  # type: ignore[arg-type]
        return self.memory.retriever.retrieve(tenant, user, question, k=k, source=source)

    def sampling(self, req: ChatCompletionRequest) -> SamplingParams:
        cap = self.settings.serve.max_completion_tokens
        want = req.max_completion_tokens or req.max_tokens or min(self.settings.model.max_new_tokens, cap)
        if want > cap:
            raise APIError(400, f"max_tokens {want} is over this server's limit of {cap}", "max_tokens_too_large",
                           "max_tokens")
        return SamplingParams(max_new_tokens=want, temperature=req.temperature, top_p=req.top_p, stop=req.stops,
                              seed=req.seed)

    async def chat(self, tenant: str, req: ChatCompletionRequest) -> ChatStream:
        """Validate, ground and admit the request, submit it and wait for its first step (4xx/429/
        503/504 are raised here, before any byte is sent); the rest streams from the result."""
        if req.messages[-1].role != "user":
            raise APIError(400, "the last message must have role 'user'", "invalid_messages", "messages")
        user = self.resolve_user(tenant, req.user)
        params = self.sampling(req)
        version, grounding, messages, prep_ms = await asyncio.to_thread(self._prepare, tenant, user, req)
        metrics.RETRIEVAL.observe(prep_ms / 1000)
        metrics.MEMORY_TOKENS.observe(grounding.tokens)
        adapter = version.name if version is not None else None
        metrics.ADAPTER_REQUESTS.labels("yes" if adapter else "no").inc()
        gen_req = GenerateRequest(messages=messages, params=params, adapter=adapter)
        head = ChatCompletionResponse(
            model=adapter or self.base_model, choices=[],
            usage=Usage(prompt_tokens=0, completion_tokens=0, total_tokens=0, memory_tokens=grounding.tokens),
            tsubasa=Personalisation(tenant=tenant, user=user, adapter=adapter, memory_tokens=grounding.tokens,
                                    retrieval_ms=round(prep_ms, 3),
                                    memories=[MemoryRef(id=it.id, text=it.text, score=round(it.score, 4))
                                              for it in grounding.items]))
        sc = self.settings.serve
        exit_stack = contextlib.AsyncExitStack()
        await exit_stack.enter_async_context(self.admission.slot())  # 429 past the bounds
        try:
            steps = self.llm.stream(gen_req)
            exit_stack.push_async_callback(steps.aclose)  # type: ignore[attr-defined]
            deadline = asyncio.get_running_loop().time() + sc.request_timeout_s
            first = await next_step(steps, deadline, sc.request_timeout_s, sc.retry_after_s)
        except BaseException:
            await exit_stack.aclose()
            raise
        return ChatStream(head, steps, first, deadline, sc.request_timeout_s, tenant, params.stop, self.decode,
                          exit_stack)

    # ---- models -------------------------------------------------------------------------------
    def models(self, tenant: str) -> ModelList:
        cards = [ModelCard(id=self.base_model, owned_by="tsubasa", root=self.base_model)]
        for v in self.registry.list(tenant):
            cards.append(ModelCard(id=v.name, owned_by=tenant, root=self.base_model, parent=self.base_model,
                                   created=int(v.manifest.created_at.timestamp())))
        return ModelList(data=cards)

    # ---- events -------------------------------------------------------------------------------
    def post_events(self, tenant: str, body: EventsRequest) -> EventsResponse:
        """Validate each event, store the valid turns durably, queue the sessions they close."""
        events, errors = [], []
        for i, raw in enumerate(body.events):
            raw = {**raw}
            owner = raw.setdefault("tenant_id", tenant)
            if owner != tenant:  # refuse the whole batch: nothing of it is stored
                metrics.REJECTED.labels("cross_tenant_event").inc()
                raise APIError(403, f"events[{i}].tenant_id {owner!r} is not this API key's tenant {tenant!r}; "
                               "nothing was stored", "cross_tenant", f"events[{i}].tenant_id")
            try:
                events.append(parse_event(raw))
            except InvalidEventError as exc:
                errors.append(EventError(index=i, event_id=str(raw.get("event_id"))[:128] if raw.get("event_id")
                                         else None, error=str(exc)))
        closing = [e for e in events if e.kind == "session_end"]
        if closing and self.sessions.free() < len(closing):
            metrics.REJECTED.labels("session_queue_full").inc()
            raise APIError(429, "memory evolution is behind: the session queue is full; retry later (nothing "
                           "was stored)", "session_queue_full", retry_after=self.settings.serve.retry_after_s)
        users = sorted({(e.tenant_id, e.user_id) for e in events})
        locks = [self._user_lock(*u) for u in users]
        with contextlib.ExitStack() as stack:
            for lock in locks:
                stack.enter_context(lock)
            appended = self.memory.writer.append(events) if events else None
            try:
                queued = self.sessions.put_many(appended.closed_sessions if appended else [])
            except QueueFullError as exc:  # raced with another batch; the turns are stored, retry closes
                raise APIError(429, f"{exc}; the turns were stored, re-send the session_end events later",
                               "session_queue_full", retry_after=self.settings.serve.retry_after_s) from None
        return EventsResponse(received=len(body.events), accepted=len(events),
                              new_turns=appended.new_turns if appended else 0, errors=errors,
                              queued_sessions=[f"{u}/{s}" for _, u, s in queued])

    def _evolve(self, tenant: str, user: str, session: str) -> None:
        with self._user_lock(tenant, user):
            self.memory.writer.process_session(tenant, user, session)

    # ---- users --------------------------------------------------------------------------------
    def user_status(self, tenant: str, user: str) -> UserStatus:
        counts = self.memory.store.counts(tenant).get((tenant, user), {})
        current = self.registry.current(tenant, user)
        return UserStatus(tenant=tenant, user=user, pending_sessions=self.sessions.pending(tenant, user),
                          turns=counts.get("turns", 0), observations=counts.get("observations", 0),
                          memories=counts.get("memories", 0), adapter=current.name if current else None,
                          failed_sessions=[f"{s}: {e}" for s, e in self.sessions.failed(tenant, user).items()])

    def forget(self, tenant: str, user: str) -> ForgetResponse:
        """Delete everything of one user: queued sessions, turns, observations, memories and their
        history, session markers, adapter versions. Idempotent."""
        queued = self.sessions.forget(tenant, user)
        with self._user_lock(tenant, user):
            deleted = dict(self.memory.store.forget_user(tenant, user))
            deleted["adapters"] = self.registry.delete_user(tenant, user)
            deleted["queued"] = queued
        log.info("forgot %s/%s: %s", tenant, user, deleted)
        return ForgetResponse(tenant=tenant, user=user, deleted=deleted)


def build_messages(messages: list[ChatMessage], grounding: Grounding) -> list[ChatMessage]:
    """The student prompt the adapters were trained on (`student_messages`) for the last user
    message; the client's own system text and earlier turns are kept around it."""
    core = student_messages(messages[-1].content, [it.text for it in grounding.items])
    system = core[0].content
    extra = [m.content for m in messages[:-1] if m.role == "system"]
    if extra:
        system = system + "\n" + "\n".join(extra)
    history = [m for m in messages[:-1] if m.role != "system"]
    return [ChatMessage(role="system", content=system), *history, core[-1]]
