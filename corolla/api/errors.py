"""Errors in the OpenAI error shape (`{"error": {message, type, param, code}}`) with their HTTP status codes.

What maps where:
  400 invalid_request_error  bad JSON, a field out of range, an unsupported parameter, too many tokens
  404 invalid_request_error  unknown model (code model_not_found), unknown path
  503 server_error           the swarm cannot serve some blocks (code blocks_unavailable)
  502 server_error           a server failed and no retry helped (code swarm_error)
  504 server_error           no token within the API's token_timeout (code timeout)
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from corolla.api.schemas import ErrorBody, ErrorResponse
from corolla.errors import CorollaError, MissingBlocksError

logger = logging.getLogger(__name__)


class ApiError(Exception):
    """An error to answer with: HTTP status + OpenAI error body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.body = status, ErrorBody(message=message, type=type, param=param, code=code)

    def response(self) -> JSONResponse:
        return JSONResponse(ErrorResponse(error=self.body).model_dump(), status_code=self.status)

    def sse_data(self) -> str:
        """The error as the data of a server-sent event (how OpenAI reports a failure after a stream began)."""
        return json.dumps(ErrorResponse(error=self.body).model_dump())


class GenerationTimeout(CorollaError):
    """No token arrived within the API's token_timeout."""


def api_error(error: BaseException) -> ApiError:
    """The ApiError to answer with for an exception raised while serving a request."""
    if isinstance(error, ApiError):
        return error
    if isinstance(error, MissingBlocksError):
        return ApiError(503, f"the swarm cannot serve this model now: {error}", type="server_error",
                        code="blocks_unavailable")
    if isinstance(error, GenerationTimeout):
        return ApiError(504, str(error), type="server_error", code="timeout")
    if isinstance(error, CorollaError):
        return ApiError(502, f"the swarm failed to serve the request: {error}", type="server_error",
                        code="swarm_error")
    logger.error("unexpected error while serving a request", exc_info=error)
    return ApiError(500, f"internal error: {type(error).__name__}: {error}", type="server_error",
                    code="internal_error")


def _validation_error(error: RequestValidationError) -> ApiError:
    problems = error.errors()
    first = problems[0] if problems else {"type": "", "loc": (), "msg": "invalid request"}
    if first["type"] == "json_invalid":
        position = first["loc"][-1] if first["loc"] else "?"
        detail = first.get("ctx", {}).get("error", first["msg"])
        return ApiError(400, f"the request body is not valid JSON: {detail} (at character {position})",
                        code="invalid_json")
    if tuple(first["loc"]) == ("body",) and first["type"] != "missing":
        if isinstance(first.get("input"), bytes):
            message = "the request body is not JSON: send a JSON object with Content-Type: application/json"
        else:
            message = f"the request body must be a JSON object, got {_short(first.get('input'))}"
        return ApiError(400, message, code="invalid_json")
    by_field: dict[str, list[str]] = {}
    for problem in problems:
        field = _field(problem["loc"])
        if problem["type"] == "extra_forbidden":
            text = f"unsupported parameter {field!r}"
        elif problem["type"] == "missing":
            text = f"missing required parameter {field!r}" if field else "missing request body"
        else:
            text = f"{field or 'body'}: {problem['msg']} (got {_short(problem.get('input'))})"
        by_field.setdefault(field, [])
        if text not in by_field[field]:
            by_field[field].append(text)
    message = "; ".join(" or ".join(texts) for texts in by_field.values())
    return ApiError(400, message, param=next(iter(by_field)) or None, code="invalid_value")


def _field(loc) -> str:
    """`body.messages.0.role` -> `messages.0.role`, without pydantic's union-member tags (`str`, `list[str]`)."""
    parts = []
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        text = str(part)
        if isinstance(part, str) and ("[" in text or text[:1].isupper() or text in _TYPE_TAGS):
            continue
        parts.append(text)
    return ".".join(parts)


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _short(value, limit: int = 80) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[:limit] + "..."


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, error: ApiError) -> JSONResponse:
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return _validation_error(error).response()

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        message = f"{request.method} {request.url.path}: {error.detail}"
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        return ApiError(error.status_code, message, code=code).response()

    @app.exception_handler(CorollaError)
    async def on_corolla_error(request: Request, error: CorollaError) -> JSONResponse:
        return api_error(error).response()
