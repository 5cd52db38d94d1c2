"""The gateway: FastAPI routes (thin: authenticate, parse, delegate to `GatewayService`) served by
a Ray Serve ingress deployment in front of the LLM deployment.

    POST   /v1/chat/completions   OpenAI chat completions (stream or not), personalised per `user`
    GET    /v1/models             the base model and this tenant's adapter versions
    POST   /v1/events             batch of user events (turns, session ends) -> the memory writer
    GET    /v1/users/{user_id}    what is stored and pending for a user
    DELETE /v1/users/{user_id}    forget a user (idempotent)
    GET    /inspect               the memory inspector page (+ its JSON routes: services/serve/inspector)
    GET    /healthz               liveness/readiness
    GET    /metrics               Prometheus
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from fastapi import APIRouter, FastAPI, Header, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from ray import serve
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.serve import metrics
from services.serve.auth import APIKeyAuth
from services.serve.deps import gateway_service, request_tenant
from services.serve.errors import error_response, install_error_handlers
from services.serve.inspector.router import router as inspector_router
from services.serve.inspector.service import MemoryInspector
from services.serve.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    EventsRequest,
    EventsResponse,
    ForgetResponse,
    ModelList,
    UserStatus,
)
from services.serve.serving import GatewayService
from services.serve.streaming import ChatStream

log = logging.getLogger(__name__)
router = APIRouter()


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse)
async def chat_completions(body: ChatCompletionRequest, request: Request,
                           authorization: str | None = Header(None), x_api_key: str | None = Header(None)):
    tenant = request_tenant(request, authorization, x_api_key)
    chat = await gateway_service(request).chat(tenant, body)  # errors are raised here, before the first byte
    if not body.stream:
        return await chat.complete()
    include_usage = bool((body.stream_options or {}).get("include_usage"))
    return ReleasingStream(chat, chat.sse(include_usage), media_type="text/event-stream",
                           headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class ReleasingStream(StreamingResponse):
    """A streamed chat answer that always releases its generation, even when the client goes away
    before the first chunk (the body generator then never starts, so its own cleanup never runs)."""

    def __init__(self, chat: ChatStream, content: Any, **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.chat = chat

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.chat.aclose()


@router.get("/v1/models", response_model=ModelList)
async def list_models(request: Request, authorization: str | None = Header(None),
                      x_api_key: str | None = Header(None)):
    tenant = request_tenant(request, authorization, x_api_key)
    return await asyncio.to_thread(gateway_service(request).models, tenant)


@router.post("/v1/events", response_model=EventsResponse)
async def post_events(body: EventsRequest, request: Request, authorization: str | None = Header(None),
                      x_api_key: str | None = Header(None)):
    tenant = request_tenant(request, authorization, x_api_key)
    return await asyncio.to_thread(gateway_service(request).post_events, tenant, body)


@router.get("/v1/users/{user_id}", response_model=UserStatus)
async def user_status(user_id: str, request: Request, authorization: str | None = Header(None),
                      x_api_key: str | None = Header(None)):
    tenant = request_tenant(request, authorization, x_api_key)
    svc = gateway_service(request)
    user = svc.resolve_user(tenant, user_id, "user_id")
    return await asyncio.to_thread(svc.user_status, tenant, user)


@router.delete("/v1/users/{user_id}", response_model=ForgetResponse)
async def forget_user(user_id: str, request: Request, authorization: str | None = Header(None),
                      x_api_key: str | None = Header(None)):
    tenant = request_tenant(request, authorization, x_api_key)
    svc = gateway_service(request)
    user = svc.resolve_user(tenant, user_id, "user_id")
    result = await asyncio.to_thread(svc.forget, tenant, user)
    hook = getattr(request.app.state, "on_forget", None)
    if hook is not None:
        await hook(tenant, user)
    return result


@router.get("/healthz")
async def healthz(request: Request):
    svc = gateway_service(request)
    return {"status": "ok", "model": svc.base_model, "engine": svc.settings.model.engine,
            "running": svc.admission.running, "waiting": svc.admission.waiting}


@router.get("/metrics")
async def prometheus_metrics():
    return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")


class BodyLimit:
    """413 for bodies over `limit` bytes, by Content-Length or by counting a chunked body."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                await self._reject(scope, receive, send)
                return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge()
            return msg

        try:
            await self.app(scope, counted, send)
        except _TooLarge:
            await self._reject(scope, receive, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        metrics.REJECTED.labels("too_large").inc()
        resp = error_response(413, f"request body is over the {self.limit}-byte limit", "request_too_large")
        await resp(scope, receive, send)


class _TooLarge(Exception):
    pass


def create_app(service: GatewayService, auth: APIKeyAuth, on_forget: Any = None) -> FastAPI:
    """The FastAPI app around a ready service (used by the Serve ingress and by plain uvicorn)."""
    app = FastAPI(title="TSUBASA gateway", version="1")
    app.state.service = service
    app.state.auth = auth
    app.state.on_forget = on_forget
    app.state.inspector = MemoryInspector(service)
    install_error_handlers(app)
    app.include_router(router)
    app.include_router(inspector_router)

    @app.middleware("http")
    async def _observe(request: Request, call_next):
        t0 = time.perf_counter()
        try:
            response = await call_next(request)
        except Exception:  # handlers turn everything into responses; this is the last guard
            log.exception("request failed")
            response = JSONResponse({"error": {"message": "internal error", "type": "api_error"}}, status_code=500)
        route = request.scope.get("route")
        path = getattr(route, "path", "other")
        metrics.REQUESTS.labels(path, str(response.status_code)).inc()
        metrics.LATENCY.labels(path).observe(time.perf_counter() - t0)
        return response

    app.add_middleware(BodyLimit, limit=service.settings.serve.max_request_bytes)
    return app


@serve.ingress()
class Gateway:
    """Serve ingress deployment: builds the service in the replica, then its app
    (`__serve_build_asgi_app__`, Serve's late-bound ingress)."""

    def __init__(self, llm: Any, settings: dict[str, Any]) -> None:
        from services.serve.remote import RemoteEngine
        from services.serve.serving import HandleLLMClient
        from services.serve.settings import settings_from_payload
        from tsubasa.distill.adapters import registry_from_settings
        from tsubasa.llm import load_engine, writer_model
        from tsubasa.llm.models import load_tokenizer
        from tsubasa.memory.runtime import MemorySystem

        s = settings_from_payload(settings)
        tok = load_tokenizer(s.model.name, s.model.cache_dir)

        def count(text: str) -> int:
            return len(tok(text, add_special_tokens=False)["input_ids"])

        def decode(ids: list[int]) -> str:
            return tok.decode(ids, skip_special_tokens=True)

        wcfg = writer_model(s.model, s.writer)
        if (wcfg.engine, wcfg.name) == (s.model.engine, s.model.name):
            # The writer shares the LLM deployment (same weights, batched with chat traffic). Memory
            # evolution is background work that queues behind chat: wait long, not forever.
            engine: Any = RemoteEngine(llm, s.model.name, count,
                                       timeout_s=max(3600.0, s.serve.request_timeout_s * 10))
        else:  # its own engine in this replica (llama.cpp on a laptop, an OpenAI-compatible endpoint)
            engine = load_engine(wcfg)
        memory = MemorySystem(s, engine=engine, count_tokens=count)
        memory.retriever  # noqa: B018 - open Milvus and load the embedder now, not on the first request
        self.llm = llm
        self.service = GatewayService(s, HandleLLMClient(llm), memory, registry_from_settings(s), count, decode)
        self.auth = APIKeyAuth.from_env(s.serve.api_keys_env)
        if not self.auth.tenants:
            log.warning("%s is empty: every request will get 401", s.serve.api_keys_env)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_app(self.service, self.auth, on_forget=self._unload_user_adapters)

    async def _unload_user_adapters(self, tenant: str, user: str) -> None:
        """Best effort: ask an LLM replica to drop the user's resident adapters now (others evict
        them by LRU; the registry no longer has them, so no request can name them again)."""
        try:
            await self.llm.forget.remote(f"{tenant}/{user}/")
        except Exception:  # the forget itself succeeded; a replica may be restarting
            log.warning("could not ask the LLM deployment to unload %s/%s's adapters", tenant, user)

    def check_health(self) -> None:
        thread = self.service.sessions._thread
        if thread is not None and not thread.is_alive() and not self.service.sessions._stop:
            raise RuntimeError("the session evolution thread died")
