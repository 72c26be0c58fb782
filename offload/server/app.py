"""The HTTP side of `offload serve`: an ASGI app (Starlette) with OpenAI's routes.

    GET  /                      the chat page (static files shipped in offload/server/static)
    GET  /health                200 once the model is loaded, 503 while it loads
    GET  /metrics               Prometheus text
    GET  /v1/models             the one model served
    POST /v1/chat/completions   chat, streamed as server-sent events or not
    POST /v1/completions        plain continuation, streamed or not
    GET  /v1/offload/experts    the expert cache per MoE layer and the running reply's figures

Every error is OpenAI-shaped JSON ({"error": {"message", "type", "param", "code"}}) with a
4xx status for the client's mistakes; a bug in offload answers 500 with one line (its
traceback goes to the server's log only). With an API key, every /v1 route wants
`Authorization: Bearer KEY`. Request bodies above `max_body_bytes` get 413.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..sampling import SamplingParams
from .engine import Engine, Job
from .experts import ExpertActivity
from .generate import READY, chat_work, completion_work
from .metrics import Metrics
from .schemas import APIError, chat_request, completion_request, parse_json

log = logging.getLogger("offload.server")

STATIC = Path(__file__).resolve().parent / "static"
DEFAULT_MAX_BODY = 4 * 2**20


@dataclass
class ServerConfig:
    model_name: str  # what /v1/models lists and responses carry
    sampling: SamplingParams = field(default_factory=SamplingParams)  # for fields a request leaves out
    max_tokens: int | None = None  # a chat reply's default limit (None: end of turn or full context)
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()
    max_body_bytes: int = DEFAULT_MAX_BODY
    parallel: int = 1  # slots: requests generating at once, the context split between them (-np)
    cont_batching: bool = True  # the slots' decoding tokens as one batch (-cb), else in turns


class State:
    """What the routes share: the engine, its model once loaded, the counters."""

    def __init__(self, config: ServerConfig, engine: Engine):
        self.config = config
        self.engine = engine
        self.metrics = Metrics()
        self.activity: ExpertActivity | None = None
        self.started = int(time.time())

    def model_ready(self, model) -> None:  # in the worker thread, right after loading
        self.activity = ExpertActivity(model)


def error_response(e: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


class BodyLimit:
    """ASGI middleware: a request body above `limit` bytes gets 413 (Content-Length or counted)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await error_response(BodyTooLarge(self.limit))(scope, receive, send)
        seen = 0

        async def counted():  # a body sent in chunks, without a length
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge(self.limit)  # an APIError: the route answers 413
            return message

        await self.app(scope, counted, send)


class BodyTooLarge(APIError):
    def __init__(self, limit: int):
        super().__init__(413, f"the request body is larger than {limit} bytes", code="request_too_large")


def create_app(config: ServerConfig, load: Callable[[], Any], on_load_error: Callable[[BaseException], None]
               | None = None) -> Starlette:
    """The app; `load()` builds the Model (in the engine's worker thread, started with the app)."""
    def ready(model) -> None:
        state.model_ready(model)

    engine = Engine(load, on_ready=ready, on_load_error=on_load_error, parallel=config.parallel,
                    cont_batching=config.cont_batching)
    state = State(config, engine)

    def authorized(request: Request) -> None:
        key = config.api_key
        if not key:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise APIError(401, "a valid API key is needed: send the header Authorization: Bearer KEY",
                           type="authentication_error", code="invalid_api_key")

    def api(route: str):
        """A /v1 route: the API key, OpenAI-shaped errors, the request counter."""

        def wrap(handler):
            async def endpoint(request: Request) -> Response:
                try:
                    authorized(request)
                    response = await handler(request)
                except APIError as e:
                    response = error_response(e)
                except ClientDisconnect:
                    response = Response(status_code=499)
                except Exception as e:  # a bug in offload: the traceback to the log, one line to the client
                    log.exception("%s failed", route)
                    response = error_response(APIError(500, f"internal error: {type(e).__name__}: {e}",
                                                       type="server_error", code="internal_error"))
                state.metrics.requests[(route, response.status_code)] += 1
                return response

            return endpoint

        return wrap

    async def read_json(request: Request) -> dict:
        return parse_json(await request.body())

    async def health(request: Request) -> Response:
        if engine.loaded:
            return JSONResponse({"status": "ok"})
        if engine.load_error is not None:
            return JSONResponse({"status": "error", "error": str(engine.load_error)}, status_code=503)
        return JSONResponse({"status": "loading"}, status_code=503)

    async def metrics(request: Request) -> Response:
        text = state.metrics.prometheus(engine.model, engine.queue_depth, len(engine.running), engine.loaded,
                                        engine.rss_before_load)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @api("/v1/models")
    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [_model_card(config.model_name, state.started)]})

    @api("/v1/models/{model}")
    async def model_card(request: Request) -> Response:
        name = request.path_params["model"]
        if name != config.model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {config.model_name!r}",
                           code="model_not_found", param="model")
        return JSONResponse(_model_card(config.model_name, state.started))

    @api("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await read_json(request)
        req = chat_request(body, config.sampling, engine.require_model().n_ctx)
        work = chat_work(req, config.model_name, state.metrics, state.activity, default_max_tokens=config.max_tokens)
        return await run(request, engine.submit(work), req.stream, req.include_usage)

    @api("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await read_json(request)
        req = completion_request(body, config.sampling, engine.require_model().n_ctx)
        return await run(request, engine.submit(completion_work(req, config.model_name, state.metrics,
                                                                state.activity)), req.stream, req.include_usage)

    @api("/v1/offload/experts")
    async def experts(request: Request) -> Response:
        model = engine.require_model()
        if state.activity is None:  # set right after loading, in the worker thread
            raise APIError(503, "the model is loading; try again shortly", type="server_error", code="model_loading")
        out = state.activity.snapshot()
        out["live"] = state.metrics.live(model, engine.rss_before_load)
        out["queue_depth"] = engine.queue_depth
        return JSONResponse(out)

    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html")

    async def not_found(request: Request, exc: HTTPException) -> Response:
        return error_response(APIError(exc.status_code, exc.detail or "not found", code="not_found"))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()  # loads the model in the worker thread: /health says 503 until it is done
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, engine.close)

    routes = [
        Route("/", index),
        Route("/health", health),
        Route("/metrics", metrics),
        Route("/v1/models", models),
        Route("/v1/models/{model:path}", model_card),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/offload/experts", experts),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    middleware = [Middleware(BodyLimit, limit=config.max_body_bytes)]
    if config.cors_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(config.cors_origins),
                                     allow_methods=["GET", "POST", "OPTIONS"],
                                     allow_headers=["Authorization", "Content-Type"]))
    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan,
                    exception_handlers={HTTPException: not_found})
    app.state.offload = state
    return app


def _model_card(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "offload"}


async def run(request: Request, job: Job, stream: bool, include_usage: bool) -> Response:
    """Wait for the job's checks (a 4xx still possible), then answer: SSE chunks or one JSON body."""
    events = job.events()
    watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
    try:
        first = await anext(events, None)  # READY, or the APIError raised by the checks
        if first is None:  # cancelled before its turn: the server is shutting down
            raise APIError(503, "the request was cancelled: the server is shutting down", type="server_error",
                           code="shutting_down")
        assert first == READY, first
    except BaseException:
        watcher.cancel()
        job.cancel()
        raise
    if not stream:
        try:
            async for kind, *rest in events:
                if kind == "done":
                    return JSONResponse(rest[0])
        finally:
            watcher.cancel()
            job.cancel()
        raise APIError(499, "the request was cancelled", code="cancelled")
    watcher.cancel()  # StreamingResponse listens for the disconnect itself and cancels sse()

    async def sse():
        last: dict = {}
        try:
            async for kind, *rest in events:
                if kind == "chunk":
                    last = rest[0]
                    yield _sse(last)
                elif kind == "done" and include_usage:  # OpenAI's usage chunk: no choices
                    yield _sse(dict(last, choices=[], usage=rest[1]))
            yield "data: [DONE]\n\n"
        except APIError as e:  # a failure after the first chunk: reported in the stream, as OpenAI does
            yield _sse(e.body())
        finally:
            job.cancel()  # a client gone mid-stream: the worker stops before its next token

    return StreamingResponse(sse(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def _cancel_on_disconnect(request: Request, job: Job) -> None:
    """Until cancelled: cancel the job when the client hangs up (the body was read already)."""
    try:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                job.cancel()
                return
    except asyncio.CancelledError:
        pass
