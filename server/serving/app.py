"""The FastAPI application of ``fedtune serve``: routes, the API key, errors in OpenAI's shape.

``/openapi.json`` is FastAPI's own document of these routes and the models in
:mod:`server.serving.schemas`, trimmed to what is served: the 422 FastAPI would list is never sent
(validation errors are OpenAI's 400) and the bearer scheme appears only when a key is required.
Two pure ASGI middlewares sit in front: :class:`server.serving.guard.BodyGuard` (size and read-time
limits on bodies) inside :class:`server.serving.guard.RequestMetrics` (count and time every answer).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from common import __version__
from server.serving.batching import Handle
from server.serving.engine import Engine
from server.serving.generation import ApiError, GenRequest, GenResult, Kind
from server.serving.guard import MAX_BODY_BYTES, BodyGuard, RequestMetrics
from server.serving.metrics import CONTENT_TYPE, Metrics
from server.serving.schemas import (
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    ErrorResponse,
    Health,
    ModelCard,
    ModelList,
    request_models,
    sse_event_schema,
)

logger = logging.getLogger(__name__)

_ERR = {"model": ErrorResponse}
_SSE_DOC: dict[str, Any] = {"schema": {}}  # the event schemas are filled in by `_openapi`
_CHUNKS = {"/v1/chat/completions": ChatCompletionChunk, "/v1/completions": Completion}


def create_app(
    engine: Engine,
    api_key: str | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    body_timeout_s: float = 30.0,
) -> FastAPI:
    """The ASGI app over ``engine``; with ``api_key`` every route but ``/health`` needs it."""
    metrics = Metrics(lambda: engine.batcher.depth, lambda: engine.batcher.in_flight)
    for served in engine.served:
        metrics.model_info.labels(served.model_id).info(
            {"source": served.source, "adapter": served.adapter or ""}
        )
    engine.on_batch = metrics.batch_size.observe
    app = FastAPI(title="fedtune serve", version=__version__, docs_url=None, redoc_url=None,
                  strict_content_type=False,  # a body without Content-Type is read as JSON
                  description="OpenAI-compatible API over a verified fedtune model.")  # fmt: skip
    app.state.engine, app.state.metrics = engine, metrics
    _add_error_handlers(app)
    guarded = [Depends(_key_checker(api_key))] if api_key else []
    _add_routes(app, engine, metrics, guarded, bool(api_key))
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    app.add_middleware(BodyGuard, max_bytes=max_body_bytes, timeout_s=body_timeout_s)
    app.add_middleware(RequestMetrics, metrics=metrics)
    return app


# ---------------------------------------------------------------------------------------- auth


def _key_checker(api_key: str) -> Any:
    bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer <API key>`")
    expected = api_key.encode()

    async def check(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        given = credentials.credentials.encode() if credentials else b""
        # compare_digest: the time taken does not reveal how much of the key matched
        if not hmac.compare_digest(given, expected):
            raise ApiError(401, "Incorrect or missing API key", code="invalid_api_key")

    return check


# -------------------------------------------------------------------------------------- routes


def _add_routes(
    app: FastAPI, engine: Engine, metrics: Metrics, guarded: list[Any], keyed: bool
) -> None:
    errors: dict[int | str, dict[str, Any]] = {400: _ERR, 408: _ERR, 413: _ERR}
    if keyed:
        errors[401] = _ERR
    generation = {**errors, 404: _ERR, 429: _ERR, 503: _ERR}
    streams: dict[int | str, dict[str, Any]] = {200: {"content": {"text/event-stream": _SSE_DOC}}}
    chat_model, completion_model = request_models(engine.model_ids, engine.prompter.max_tokens)

    @app.get("/health", response_model=Health, tags=["ops"])
    async def health() -> Health:
        """Liveness: the model is loaded and verified (no API key needed)."""
        return Health(status="ok", models=engine.model_ids)

    text: dict[int | str, dict[str, Any]] = {
        200: {"content": {CONTENT_TYPE: {"schema": {"type": "string"}}}}
    }

    @app.get("/metrics", tags=["ops"], dependencies=guarded, response_class=Response,
             responses={**errors, **text})  # fmt: skip
    async def prometheus() -> Response:
        """Prometheus text format (requests, latency, tokens, queue depth, batch sizes, models)."""
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models", response_model=ModelList, dependencies=guarded, responses=errors)
    async def list_models() -> ModelList:
        """The model ids this server answers to."""
        return ModelList(data=[_card(engine, m) for m in engine.model_ids])

    @app.get("/v1/models/{model}", response_model=ModelCard, dependencies=guarded,
             responses={**errors, 404: _ERR})  # fmt: skip
    async def get_model(model: str) -> ModelCard:
        """One model id, or 404."""
        engine.prompter.check_model(model)
        return _card(engine, model)

    async def completions(body: Any) -> Response:
        """Continue a prompt (``stream: true`` sends server-sent events)."""
        return await _generate(engine, metrics, engine.prompter.completion(body))

    async def chat_completions(body: Any) -> Response:
        """Answer a conversation through the model's chat template (``stream`` sends events)."""
        return await _generate(engine, metrics, engine.prompter.chat(body))

    # The body models carry this server's `max_tokens` bound, so they are made here; FastAPI
    # reads a parameter's model from the annotation, which is set to the class itself.
    for path, endpoint, body_model, reply in (
        ("/v1/completions", completions, completion_model, Completion),
        ("/v1/chat/completions", chat_completions, chat_model, ChatCompletion),
    ):
        endpoint.__annotations__ = {"body": body_model, "return": Response}
        app.add_api_route(path, endpoint, methods=["POST"], response_model=reply,
                          dependencies=guarded, responses={**generation, **streams})  # fmt: skip


def _card(engine: Engine, model_id: str) -> ModelCard:
    return ModelCard(id=model_id, created=engine.created, owned_by="fedtune")


async def _generate(engine: Engine, metrics: Metrics, req: GenRequest) -> Response:
    handle = engine.submit(req, asyncio.get_running_loop())  # 429 here, before any byte is sent
    ids = {"id": _new_id(req.kind), "created": int(time.time()), "model": req.model}
    if req.stream:
        events = _events(handle, req, ids, metrics)
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})  # fmt: skip
    try:
        result = await handle.result()
    finally:
        handle.cancelled = True  # a no-op when finished; stops the row if this task was cancelled
    metrics.add_tokens(req.model, result.prompt_tokens, result.completion_tokens)
    return JSONResponse(_full_response(req.kind, ids, result))


async def _events(
    handle: Handle, req: GenRequest, ids: dict[str, Any], metrics: Metrics
) -> AsyncIterator[str]:
    """OpenAI's stream: role chunk (chat), one chunk per delta, finish chunk, usage, [DONE]."""
    chunk = _Chunks(req.kind, ids)
    try:
        if req.kind == "chat":
            yield _sse(chunk.make({"role": "assistant", "content": ""}, None))
        async for delta in handle.deltas():
            yield _sse(chunk.make(delta, None))
        try:
            result = handle.outcome()
        except ApiError as err:  # the status line is gone: tell the client in-band
            yield _sse(err.body())
            return
        metrics.add_tokens(req.model, result.prompt_tokens, result.completion_tokens)
        yield _sse(chunk.make(None, result.finish_reason))
        if req.include_usage:
            yield _sse({**chunk.make(None, None), "choices": [], "usage": _usage(result)})
        yield "data: [DONE]\n\n"
    finally:
        handle.cancelled = True  # the client hung up: the worker drops this row at the next step


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _new_id(kind: Kind) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def _usage(result: GenResult) -> dict[str, int]:
    total = result.prompt_tokens + result.completion_tokens
    return {"prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens, "total_tokens": total}  # fmt: skip


def _full_response(kind: Kind, ids: dict[str, Any], result: GenResult) -> dict[str, Any]:
    if kind == "chat":
        choice: dict[str, Any] = {"message": {"role": "assistant", "content": result.text}}
        obj = "chat.completion"
    else:
        choice, obj = {"text": result.text}, "text_completion"
    choice |= {"index": 0, "finish_reason": result.finish_reason, "logprobs": None}
    return {**ids, "object": obj, "choices": [choice], "usage": _usage(result)}


class _Chunks:
    """Chunks in OpenAI's streaming format; ``delta`` None means an empty delta."""

    def __init__(self, kind: Kind, ids: dict[str, Any]) -> None:
        self.kind, self.ids = kind, ids

    def make(self, delta: str | dict[str, str] | None, finish: str | None) -> dict[str, Any]:
        if self.kind == "chat":
            content = delta if isinstance(delta, dict) else ({"content": delta} if delta else {})
            choice: dict[str, Any] = {"delta": content}
            obj = "chat.completion.chunk"
        else:
            choice, obj = {"text": delta or ""}, "text_completion"
        choice |= {"index": 0, "finish_reason": finish, "logprobs": None}
        return {**self.ids, "object": obj, "choices": [choice]}


# -------------------------------------------------------------------------------------- errors


def error_response(err: ApiError, headers: dict[str, str] | None = None) -> JSONResponse:
    extra = dict(headers or {})
    if err.status == 401:
        extra["WWW-Authenticate"] = "Bearer"
    if err.status in (429, 503):
        extra["Retry-After"] = "1"
    return JSONResponse(err.body(), status_code=err.status, headers=extra)


def _add_error_handlers(app: FastAPI) -> None:
    async def api_error(_request: Request, exc: Exception) -> Response:
        return error_response(exc if isinstance(exc, ApiError) else _internal())

    async def invalid(_request: Request, exc: Exception) -> Response:
        errors = exc.errors() if isinstance(exc, RequestValidationError) else []
        return error_response(validation_error(list(errors)))

    async def http_error(_request: Request, exc: Exception) -> Response:
        if not isinstance(exc, StarletteHTTPException):
            return error_response(_internal())
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_request")
        err = ApiError(exc.status_code, str(exc.detail), None, code)
        return error_response(err, dict(exc.headers or {}))

    async def crash(_request: Request, exc: Exception) -> Response:
        logger.error("internal error", exc_info=exc)
        return error_response(_internal())

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, crash)


def _internal() -> ApiError:
    return ApiError(500, "internal server error", None, "internal_error", "server_error")


_TAG = re.compile(r"[a-z_][a-z0-9_]*")
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def validation_error(errors: list[dict[str, Any]]) -> ApiError:
    """pydantic's errors as one OpenAI 400: the first field in ``param``, all in the message."""
    if not errors:
        return ApiError(400, "invalid request body")
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return ApiError(400, f"request body is not valid JSON: {detail}", None, "invalid_json")
    params = [_param(tuple(e.get("loc", ()))) for e in errors]
    if params[0] is None:
        kind = first.get("type")
        what = "is required" if kind == "missing" else "must be a JSON object"
        return ApiError(400, f"request body {what}", None, "invalid_json")
    parts = [f"`{p}`: {e.get('msg', 'invalid')}" for p, e in zip(params, errors, strict=True)]
    return ApiError(400, "; ".join(dict.fromkeys(parts)), params[0])


def _param(loc: tuple[Any, ...]) -> str | None:
    """``("body", "messages", 0, "role")`` -> ``messages[0].role``; union member tags dropped."""
    out = ""
    for part in loc[1:] if loc[:1] == ("body",) else loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and _TAG.fullmatch(part) and part not in _TYPE_TAGS:
            out += f".{part}" if out else part
        else:  # `str`, `list[str]`, `function-after[...]`, a model's name: which union member
            continue
    return out or None


# ------------------------------------------------------------------------------------- openapi


def _openapi(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema:
        return app.openapi_schema
    doc = get_openapi(title=app.title, version=app.version, description=app.description,
                      routes=app.routes)  # fmt: skip
    for path in doc.get("paths", {}).values():
        for operation in path.values():
            operation.get("responses", {}).pop("422", None)  # validation errors are 400 here
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    for path, chunk in _CHUNKS.items():
        _document_stream(doc["paths"][path]["post"], chunk, schemas)
    app.openapi_schema = doc
    return doc


def _document_stream(operation: dict[str, Any], chunk: Any, schemas: dict[str, Any]) -> None:
    """Each event of a stream (``schema`` of one event, as OpenAPI 3.1 reads an event stream):
    a chunk or an error as JSON, or ``[DONE]``."""
    ref = "#/components/schemas/{model}"
    found = chunk.model_json_schema(ref_template=ref)
    schemas.update(found.pop("$defs", {}))
    schemas[chunk.__name__] = found
    event = sse_event_schema(ref.format(model=chunk.__name__), ref.format(model="ErrorResponse"))
    content = operation["responses"]["200"]["content"]["text/event-stream"]
    content["schema"] = event
