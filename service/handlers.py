"""Exception handlers: every error, typed or not, leaves as `{"error": {"code", "message"}}`."""

from __future__ import annotations

import logging

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.routing import Match

from rvc_lora.errors import RVCLoraError
from service.errors import StorageError, retry_after_header, status_of
from service.schemas import ErrorBody, ErrorResponse

log = logging.getLogger(__name__)

HTTP_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}


def error_json(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorBody(code=code, message=message))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


async def rvc_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RVCLoraError)
    status = status_of(exc)
    if status in (500, 507):
        log.error("request failed", extra={"code": exc.code, "status": status, "error": str(exc)})
    return error_json(status, exc.code, str(exc), retry_after_header(exc))


async def validation_error(request: Request, exc: Exception) -> JSONResponse:
    """422 naming each offending field; the offending input itself is never echoed (it may be huge)."""
    assert isinstance(exc, RequestValidationError)
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path", "header"))
        parts.append(f"{loc or 'request'}: {err.get('msg', 'invalid')}")
    return error_json(422, "invalid_request", "; ".join(parts) or "invalid request")


async def http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 400 and isinstance(exc.__cause__, OSError):  # spooling a form part to disk failed
        storage = StorageError(f"cannot buffer the upload: {exc.__cause__.strerror or 'write error'}", retry_after=5)
        return await rvc_error(request, storage)
    code = HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
    headers = dict(exc.headers or {})
    if exc.status_code == 405:  # Starlette names the methods of the first route on this path only
        headers["Allow"] = ", ".join(allowed_methods(request))
    return error_json(exc.status_code, code, str(exc.detail), headers)


ROUTE_METHODS = ("DELETE", "GET", "HEAD", "PATCH", "POST", "PUT")


def allowed_methods(request: Request) -> list[str]:
    """Every method some route serves on this request's path (GET, POST and DELETE share `/adapters/...`): each
    method is tried against the router, included routers and all (their routes are not a flat list)."""
    routes = request.app.router.routes
    return [method for method in ROUTE_METHODS
            if any(route.matches({**request.scope, "method": method})[0] == Match.FULL for route in routes)]


async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    request_id = getattr(request.state, "request_id", None)
    log.error("unhandled exception", exc_info=exc, extra={"request_id": request_id})
    headers = {"X-Request-Id": request_id} if request_id else None
    return error_json(500, "internal", f"internal error (request id {request_id}); the server log has the details",
                      headers)
