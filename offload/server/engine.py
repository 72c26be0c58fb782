"""The request queue: one model, one generation at a time, in arrival order.

A `Model` is not thread-safe (one KV cache, one set of scratch buffers), so every request
becomes a `Job` in a FIFO queue and one worker thread runs them one after the other: fair
(first come, first served), and each answer is exactly what the request gets alone (its
own sampler and seed; the KV cache reused only where the tokens are the same, which gives
the same logits). The event loop never computes: it awaits the job's events, so /health,
/metrics and the queue stay responsive while a reply is generated.

The worker thread also loads the model (the server answers 503 until it is ready) and is
the only thread that ever touches it. A job's `work` is a generator run in the worker; its
items reach the event loop through an asyncio queue. `cancel()` (a client gone, shutdown)
makes the worker close the generator before its next token, which ends the generation at
once (a finally in the chat code keeps the KV cache consistent).

Decoding several requests as one batch (reading each expert once for all of them) is not
done yet: requests take turns.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import traceback
from typing import Any, Callable, Iterator

from ..errors import ContextOverflowError, OffloadError
from .schemas import APIError

log = logging.getLogger("offload.server")

_END = object()


class Job:
    """One request's generation: `work(model)` yields events; the handler reads them with `events()`."""

    def __init__(self, work: Callable[[Any], Iterator[Any]], loop: asyncio.AbstractEventLoop):
        self.work = work
        self.loop = loop
        self.events_queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.submitted = time.monotonic()

    def _put(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events_queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.cancelled.set()

    def cancel(self) -> None:
        self.cancelled.set()

    async def events(self):
        """The work's items as they come; an APIError raised by the work is raised here."""
        while True:
            item = await self.events_queue.get()
            if item is _END:
                return
            if isinstance(item, APIError):
                raise item
            yield item

    def run(self, model: Any) -> None:
        """In the worker thread: run the work to its end, or until cancelled."""
        gen = None
        try:
            if self.cancelled.is_set():
                return
            gen = self.work(model)
            for item in gen:
                self._put(item)
                if self.cancelled.is_set():
                    break
        except APIError as e:
            self._put(e)
        except ContextOverflowError as e:
            self._put(APIError(400, str(e), code="context_length_exceeded"))
        except OffloadError as e:  # the user's input (a template that refuses the messages, a bad token id)
            self._put(APIError(400, str(e)))
        except Exception as e:  # a bug in offload: logged in full, the client gets one line
            log.error("generation failed:\n%s", traceback.format_exc())
            self._put(APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error",
                               code="internal_error"))
        finally:
            if gen is not None:
                gen.close()  # stops the generation now if it was cut short
            self._put(_END)


class Engine:
    """Loads the model in its worker thread, then runs submitted jobs one at a time, FIFO."""

    def __init__(self, load: Callable[[], Any], on_ready: Callable[[Any], None] | None = None,
                 on_load_error: Callable[[BaseException], None] | None = None):
        self._load = load
        self._on_ready = on_ready
        self._on_load_error = on_load_error
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="offload-engine", daemon=True)
        self.model: Any = None
        self.load_error: BaseException | None = None
        self.ready = threading.Event()  # set once loading ended, well or not
        self.running: Job | None = None
        self._waiting: list[Job] = []  # submitted, not started (for cancel-all and the queue depth)
        self._lock = threading.Lock()
        self._closed = False
        self.rss_before_load = 0

    # -- the event loop's side -------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    @property
    def loaded(self) -> bool:
        return self.model is not None

    @property
    def queue_depth(self) -> int:
        """Requests waiting for their turn (not counting the one running)."""
        with self._lock:
            return len(self._waiting)

    def require_model(self) -> Any:
        """The loaded model, or the 503 to answer while it loads (or when it could not)."""
        if self._closed:
            raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
        if not self.loaded:
            if self.load_error is not None:
                raise APIError(503, f"the model failed to load: {self.load_error}", type="server_error",
                               code="model_load_failed")
            raise APIError(503, "the model is loading; try again shortly", type="server_error", code="model_loading")
        return self.model

    def submit(self, work: Callable[[Any], Iterator[Any]]) -> Job:
        self.require_model()
        job = Job(work, asyncio.get_running_loop())
        with self._lock:
            self._waiting.append(job)
        self._queue.put(job)
        return job

    def close(self, timeout: float = 10.0) -> None:
        """Cancel what is queued and running, stop the worker and wait for it."""
        self._closed = True
        with self._lock:
            for job in self._waiting:
                job.cancel()
            if self.running is not None:
                self.running.cancel()
        self._queue.put(None)
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # -- the worker thread -------------------------------------------------------------
    def _run(self) -> None:
        import psutil

        self.rss_before_load = psutil.Process().memory_info().rss  # the budget counts what loading adds
        try:
            self.model = self._load()
            if self._on_ready is not None:
                self._on_ready(self.model)
        except BaseException as e:  # noqa: BLE001 (reported by the CLI, which then stops the server)
            self.model = None
            self.load_error = e
            if not isinstance(e, OffloadError):
                log.error("loading the model failed:\n%s", traceback.format_exc())
            if self._on_load_error is not None:
                self._on_load_error(e)
            return
        finally:
            self.ready.set()
        try:
            while True:
                job = self._queue.get()
                if job is None:
                    return
                with self._lock:
                    self._waiting.remove(job)
                    self.running = job
                try:
                    job.run(self.model)
                finally:
                    with self._lock:
                        self.running = None
        finally:
            self.model.close()  # the worker is the only thread that touches the model
