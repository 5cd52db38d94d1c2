"""The inspector's routes (thin: authenticate, resolve the user, delegate to `MemoryInspector`).

    GET  /inspect                               the page (static; asks for the key)
    GET  /inspect/users/{user_id}               the page opened on one user
    GET  /v1/users                              the key's tenant's users, with counts
    GET  /v1/users/{user_id}/memories           current memories (text, event date, last op, versions)
    GET  /v1/users/{user_id}/memories/{id}      one memory: every version with its observation, provenance
    GET  /v1/users/{user_id}/sessions           sessions (date, turns, observations, state)
    GET  /v1/users/{user_id}/sessions/{id}      one session's turns beside its observations
    GET  /v1/users/{user_id}/adapters           adapter versions and the current one
    POST /v1/users/{user_id}/search             top-k retrieval for a question and its token cost

Every route authenticates with `deps.request_tenant` and resolves the user with
`GatewayService.resolve_user`, exactly as the chat and user routes do: 401 without a valid key,
403 for another tenant's user, 400 naming the field for a bad identifier or parameter."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import HTMLResponse

from services.serve.deps import gateway_service, request_tenant
from services.serve.inspector.page import INSPECTOR_PAGE
from services.serve.inspector.protocol import (
    MAX_LIMIT,
    AdapterPage,
    MemoryDetail,
    MemoryPage,
    SearchRequest,
    SearchResponse,
    SessionDetail,
    SessionPage,
    UserPage,
)
from services.serve.inspector.service import MemoryInspector
from services.serve.protocol import ErrorResponse

router = APIRouter(tags=["inspector"])
_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 403)}
_LIMIT = "Items per page (1-500)."
_OFFSET = "Items to skip (the previous page's next_offset)."


def _inspector(request: Request) -> MemoryInspector:
    return request.app.state.inspector


def _user(request: Request, user_id: str, authorization: str | None, x_api_key: str | None) -> tuple[str, str]:
    tenant = request_tenant(request, authorization, x_api_key)
    return tenant, gateway_service(request).resolve_user(tenant, user_id, "user_id")


# ---- the page ---------------------------------------------------------------------------------
def _page(request: Request, user_id: str | None, authorization: str | None, x_api_key: str | None) -> HTMLResponse:
    """The same static shell for everyone, behind the same key check as the JSON: 200 with a valid
    key (and, for a user's page, a user of its tenant), the JSON 401/403/400 otherwise. A browser
    navigation carries no key: it gets 401 with the shell as the body, which asks for the key and
    sends it on every JSON request; the shell itself holds no data."""
    if authorization is None and x_api_key is None:  # a navigation, not a refused key (kept out of the metric)
        return INSPECTOR_PAGE.response(401)
    tenant = request_tenant(request, authorization, x_api_key)
    if user_id is not None:
        gateway_service(request).resolve_user(tenant, user_id, "user_id")
    return INSPECTOR_PAGE.response(200)


_PAGE_DOC = {"response_class": HTMLResponse, "responses": {**_ERRORS, 401: {
    "description": "No key (the page itself, which asks for one) or an invalid key (an error body)"}}}


@router.get("/inspect", summary="The memory inspector page", **_PAGE_DOC)
async def inspector_page(request: Request, authorization: str | None = Header(None),
                         x_api_key: str | None = Header(None)):
    return _page(request, None, authorization, x_api_key)


@router.get("/inspect/users/{user_id}", summary="The memory inspector page, opened on one user", **_PAGE_DOC)
async def inspector_user_page(user_id: str, request: Request, authorization: str | None = Header(None),
                              x_api_key: str | None = Header(None)):
    return _page(request, user_id, authorization, x_api_key)


# ---- JSON -------------------------------------------------------------------------------------
@router.get("/v1/users", response_model=UserPage, responses=_ERRORS, summary="The key's tenant's users")
async def list_users(request: Request, limit: int = Query(50, ge=1, le=MAX_LIMIT, description=_LIMIT),
                     offset: int = Query(0, ge=0, description=_OFFSET),
                     authorization: str | None = Header(None), x_api_key: str | None = Header(None)):
    tenant = request_tenant(request, authorization, x_api_key)
    return await asyncio.to_thread(_inspector(request).users, tenant, limit, offset)


@router.get("/v1/users/{user_id}/memories", response_model=MemoryPage, responses=_ERRORS,
            summary="A user's current memories")
async def list_memories(user_id: str, request: Request,
                        limit: int = Query(50, ge=1, le=MAX_LIMIT, description=_LIMIT),
                        offset: int = Query(0, ge=0, description=_OFFSET),
                        authorization: str | None = Header(None), x_api_key: str | None = Header(None)):
    tenant, user = _user(request, user_id, authorization, x_api_key)
    return await asyncio.to_thread(_inspector(request).memories, tenant, user, limit, offset)


@router.get("/v1/users/{user_id}/memories/{memory_id}", response_model=MemoryDetail,
            responses={**_ERRORS, 404: {"model": ErrorResponse}},
            summary="One memory: its history (every version and the observation behind it) and provenance")
async def get_memory(user_id: str, memory_id: str, request: Request, authorization: str | None = Header(None),
                     x_api_key: str | None = Header(None)):
    tenant, user = _user(request, user_id, authorization, x_api_key)
    return await asyncio.to_thread(_inspector(request).memory, tenant, user, memory_id)


@router.get("/v1/users/{user_id}/sessions", response_model=SessionPage, responses=_ERRORS,
            summary="A user's sessions")
async def list_sessions(user_id: str, request: Request,
                        limit: int = Query(50, ge=1, le=MAX_LIMIT, description=_LIMIT),
                        offset: int = Query(0, ge=0, description=_OFFSET),
                        authorization: str | None = Header(None), x_api_key: str | None = Header(None)):
    tenant, user = _user(request, user_id, authorization, x_api_key)
    return await asyncio.to_thread(_inspector(request).sessions, tenant, user, limit, offset)


@router.get("/v1/users/{user_id}/sessions/{session_id}", response_model=SessionDetail,
            responses={**_ERRORS, 404: {"model": ErrorResponse}},
            summary="One session's turns (paginated) beside the observations written from it")
async def get_session(user_id: str, session_id: str, request: Request,
                      limit: int = Query(200, ge=1, le=MAX_LIMIT, description=_LIMIT),
                      offset: int = Query(0, ge=0, description=_OFFSET),
                      authorization: str | None = Header(None), x_api_key: str | None = Header(None)):
    tenant, user = _user(request, user_id, authorization, x_api_key)
    return await asyncio.to_thread(_inspector(request).session, tenant, user, session_id, limit, offset)


@router.get("/v1/users/{user_id}/adapters", response_model=AdapterPage, responses=_ERRORS,
            summary="A user's adapter versions (newest first) and the current one")
async def list_adapters(user_id: str, request: Request,
                        limit: int = Query(50, ge=1, le=MAX_LIMIT, description=_LIMIT),
                        offset: int = Query(0, ge=0, description=_OFFSET),
                        authorization: str | None = Header(None), x_api_key: str | None = Header(None)):
    tenant, user = _user(request, user_id, authorization, x_api_key)
    return await asyncio.to_thread(_inspector(request).adapters, tenant, user, limit, offset)


@router.post("/v1/users/{user_id}/search", response_model=SearchResponse, responses=_ERRORS,
             summary="What top-k retrieval returns for a question (the chat path's grounding) and its tokens")
async def search(user_id: str, body: SearchRequest, request: Request, authorization: str | None = Header(None),
                 x_api_key: str | None = Header(None)):
    # POST, though it changes nothing: the question stays out of URLs and access logs.
    tenant, user = _user(request, user_id, authorization, x_api_key)
    return await asyncio.to_thread(_inspector(request).search, tenant, user, body)
