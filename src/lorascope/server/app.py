"""The FastAPI app: OpenAI-compatible routes over one AsyncLLMEngine, vLLM's adapter routes,
/health and /metrics. Every error leaves as OpenAI's body {"error": {message, type, code}}; a
validation error is a 400 naming the field (not FastAPI's 422)."""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from jinja2.sandbox import ImmutableSandboxedEnvironment
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from lorascope.adapters.source import DirectorySource
from lorascope.engine.async_engine import AsyncLLMEngine
from lorascope.server import generate, runtime_lora
from lorascope.server import protocol as p
from lorascope.server.metrics import ServerMetrics
from lorascope.server.state import ApiError, ServerState

OPEN_PATHS = frozenset({"/health"})


def build_app(
    engine: AsyncLLMEngine,
    served_model_name: str,
    api_key: str | None = None,
    allowed_adapter_root: Path | None = None,
    enable_runtime_lora: bool = False,
    manage_engine: bool = True,
) -> FastAPI:
    """The app for one engine. With `manage_engine`, the engine thread starts with the app and stops
    with it (lifespan); without, the caller owns the engine's life."""
    metrics = ServerMetrics(engine, served_model_name)
    state = ServerState(engine, served_model_name, api_key, allowed_adapter_root, enable_runtime_lora, metrics,
                        int(time.time()), _chat_template(engine))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        metrics.install()
        if manage_engine:
            engine.start()
        try:
            yield
        finally:
            metrics.uninstall()
            if manage_engine:
                engine.shutdown()

    app = FastAPI(title="lorascope", version="0.1.0", lifespan=lifespan)
    app.state.lorascope = state
    _install_errors(app)
    if api_key is not None:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)
    _install_routes(app, state)
    return app


def _chat_template(engine: AsyncLLMEngine) -> Any:
    tok = engine.engine.tokenizer
    source = getattr(tok, "chat_template", None) if tok is not None else None
    if not source:
        return None
    # the template comes with the model directory: render it sandboxed, as transformers does
    return ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(source)


def _error(status: int, message: str, kind: str, param: str | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(p.error_body(status, message, kind, param), status_code=status, headers=headers)


def _install_errors(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError) -> JSONResponse:
        return _error(e.status, e.message, e.kind, e.param, e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        message, field = p.validation_message(list(e.errors()))
        return _error(400, message, "BadRequestError", field)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return _error(e.status_code, str(e.detail), "HTTPError", headers=dict(e.headers or {}))

    @app.exception_handler(Exception)
    async def crash(_: Request, e: Exception) -> JSONResponse:
        return _error(500, f"internal error: {e!r}", "InternalServerError")


class ApiKeyMiddleware:
    """Plain ASGI (not BaseHTTPMiddleware): it leaves streams and disconnect detection untouched."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                response = _error(401, "missing or wrong API key: send 'Authorization: Bearer KEY'", "Unauthorized")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _install_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/health")
    async def health() -> Response:
        if not state.engine.alive:
            return _error(503, f"the engine is not running: {state.engine.error!r}", "ServiceUnavailable")
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(await state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=p.ModelList)
    async def models() -> dict[str, Any]:
        return _model_list(state).model_dump()

    @app.post("/v1/completions")
    async def completions(req: p.CompletionRequest) -> Any:
        return await generate.completions(state, req)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: p.ChatCompletionRequest) -> Any:
        return await generate.chat_completions(state, req)

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(req: p.LoadLoRARequest) -> Response:
        return Response(await runtime_lora.load(state, req), media_type="text/plain")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(req: p.UnloadLoRARequest) -> Response:
        return Response(await runtime_lora.unload(state, req), media_type="text/plain")


def _model_list(state: ServerState) -> p.ModelList:
    eng = state.engine.engine
    base = p.ModelCard(id=state.served_model_name, created=state.created, root=str(eng.cfg.model),
                       max_model_len=eng.max_model_len)
    source = eng.source
    cards = [base]
    for name in source.names():
        try:
            root = str(source.path(name)) if isinstance(source, DirectorySource) else name
        except KeyError:  # unloaded since names() was read
            continue
        cards.append(p.ModelCard(id=name, created=state.created, root=root, parent=state.served_model_name,
                                 max_model_len=eng.max_model_len))
    return p.ModelList(data=cards)
