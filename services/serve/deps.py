"""What every gateway route needs from a request: its service and the API key's tenant. One auth
path: every route (the OpenAI ones, the inspector's JSON and its page) calls `request_tenant`."""

from __future__ import annotations

from fastapi import Request

from services.serve import metrics
from services.serve.auth import AuthError
from services.serve.errors import APIError
from services.serve.serving import GatewayService


def gateway_service(request: Request) -> GatewayService:
    return request.app.state.service


def request_tenant(request: Request, authorization: str | None, x_api_key: str | None) -> str:
    """The tenant of the request's API key (`Authorization: Bearer` or `X-API-Key`); 401 otherwise."""
    try:
        return request.app.state.auth.tenant_for(authorization, x_api_key)
    except AuthError as exc:
        metrics.REJECTED.labels("auth").inc()
        raise APIError(401, str(exc), "invalid_api_key") from None
