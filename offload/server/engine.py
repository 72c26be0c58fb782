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

With parallel slots (`serve -np N`, llama-server's slots) the context is split into N
KV caches (Model.parallel_slots) and N slot threads each take the next job from the same
FIFO queue; the worker thread then only computes: it runs every slot's steps
(offload.batching.Batcher), decoding the tokens of the slots that are generating as one
batch, so that each expert a token routes to is read once for all of them. Each answer is
still, to the bit, what the request gets alone.
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
    """Loads the model in its worker thread, then runs submitted jobs FIFO: one at a time, or
    `parallel` at once in slots whose decoding tokens run as one batch (cont_batching) or in turns."""

    def __init__(self, load: Callable[[], Any], on_ready: Callable[[Any], None] | None = None,
                 on_load_error: Callable[[BaseException], None] | None = None, parallel: int = 1,
                 cont_batching: bool = True):
        self._load = load
        self._on_ready = on_ready
        self._on_load_error = on_load_error
        self.parallel = parallel
        self.cont_batching = cont_batching
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="offload-engine", daemon=True)
        self.model: Any = None  # the first slot's Model where there are several
        self.load_error: BaseException | None = None
        self.ready = threading.Event()  # set once loading ended, well or not
        self.running: set[Job] = set()
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
        """Requests waiting for their turn (not counting those running)."""
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
            for job in list(self._waiting) + list(self.running):
                job.cancel()
        for _ in range(max(self.parallel, 1)):
            self._queue.put(None)  # one end for each thread taking jobs
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # -- the worker thread -------------------------------------------------------------
    def _run(self) -> None:
        import psutil

        self.rss_before_load = psutil.Process().memory_info().rss  # the budget counts what loading adds
        try:
            model = self._load()
            if self._on_ready is not None:
                self._on_ready(model)
            slots = model.parallel_slots(self.parallel, batch=self.cont_batching) if self.parallel > 1 else [model]
            self.model = model
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
            if len(slots) == 1:
                self._take_jobs(model)
                return
            # the slot threads take the jobs; this thread runs their steps until the last slot ends
            left = [len(slots)]

            def slot_thread(slot) -> None:
                try:
                    self._take_jobs(slot, slot.batcher)
                finally:
                    with self._lock:
                        left[0] -= 1
                        last = left[0] == 0
                    if last:
                        slot.batcher.stop()

            for i, slot in enumerate(slots):
                threading.Thread(target=slot_thread, args=(slot,), name=f"offload-slot-{i}", daemon=True).start()
            model.batcher.run()
        finally:
            model.close()  # the other slots share its weights

    def _take_jobs(self, model: Any, batcher: Any = None) -> None:
        """Run jobs from the queue on `model` (one slot) until the end marker."""
        while True:
            job = self._queue.get()
            if job is None:
                return
            with self._lock:
                self._waiting.remove(job)
                self.running.add(job)
            if batcher is not None:
                batcher.begin()  # its decoding tokens will be waited for, to join a batch
            try:
                job.run(model)
            finally:
                if batcher is not None:
                    batcher.end()
                with self._lock:
                    self.running.discard(job)
