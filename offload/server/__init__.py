"""`offload serve`: an OpenAI-compatible HTTP server and a chat page for one model.

    app.py       routes, API key, CORS, body limit, SSE
    schemas.py   OpenAI request bodies checked into requests (or a 4xx APIError)
    engine.py    the FIFO queue, the slots and the worker thread that owns the model
    generate.py  one request's work: chat (the model's template) or completion
    metrics.py   counters for /metrics and the page's live figures
    experts.py   the expert cache per layer (resident, hit, miss, prefetched) for the page
    static/      the chat page (plain HTML, CSS and JavaScript; no build step, no CDN)

Requests are taken in arrival order: one generation at a time, or with -np N that many at
once in slots whose decoding tokens run as one batch (offload.batching).
"""

from __future__ import annotations

import logging
import socket
from typing import Any, Callable

from ..errors import OffloadError

from .app import DEFAULT_MAX_BODY, ServerConfig, create_app

__all__ = ["ServerConfig", "create_app", "listen", "serve", "DEFAULT_MAX_BODY"]


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound before anything loads: a port in use is one line of error."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        raise OffloadError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def serve(config: ServerConfig, load: Callable[[], Any], sock: socket.socket, log_level: str = "info") \
        -> BaseException | None:
    """Run the server on `sock` (see listen()) until Ctrl-C / SIGTERM (uvicorn handles both: it
    stops accepting, lets replies end for a few seconds, then cancels them, which stops their
    generation). Returns the model's load error, if loading failed (the server then stops at once)."""
    import uvicorn

    server: uvicorn.Server | None = None

    def load_failed(e: BaseException) -> None:
        if server is not None:
            server.should_exit = True

    app = create_app(config, load, on_load_error=load_failed)
    uv_config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=3, lifespan="on",
                               access_log=log_level == "debug")
    server = uvicorn.Server(uv_config)
    logging.getLogger("offload.server").setLevel(log_level.upper())
    server.run(sockets=[sock])
    return app.state.offload.engine.load_error
