"""Several sequences on one model, their decoding tokens run as one batch.

A server with parallel slots (`offload serve -np N`, llama-server's slots) keeps one KV
cache per slot (Model.parallel_slots, Transformer.fork) and runs each slot's request in a
thread of its own. Their steps all run here, on one compute thread (the engine's, which
loaded the model: one OpenMP team, one set of per-thread buffers):

* a prompt runs alone, in arrival order, one micro-batch (n_ubatch tokens) at a time while
  other slots are generating, their decoding tokens run between its micro-batches (a long
  prompt does not stall the others' replies);
* the decoding tokens of the slots waiting for a step run together as one batch
  (Transformer.decode_together): an expert that two sequences route to is read once, from
  RAM or from disk, for both; so is every other weight. Where it pays: a batch runs layer
  by layer, while a lone token of a resident model is one C call (kernels.step), and on a
  small machine a batch's row dots can cost as much as reading the weights saves. So the
  batcher keeps the seconds a step takes, alone and as a batch of each size (a moving
  average, the batch tried again now and then), and runs a batch only while it beats its
  tokens one after the other. With batching off (--no-cont-batching) they always run one
  after the other.

Each sequence gets, to the bit, the logits it would get alone, so neither the batching nor
the other requests change an answer.
"""

from __future__ import annotations

import collections
import queue
import threading
import time

import numpy as np

from .forward import Transformer


class _Step:
    """One sequence's request to run tokens: filled in by the compute thread."""

    def __init__(self, member: Transformer, tokens: np.ndarray, all_logits: bool):
        self.member, self.tokens, self.all_logits = member, tokens, all_logits
        self.done = threading.Event()
        self.result: np.ndarray | None = None
        self.error: BaseException | None = None

    @property
    def decoding(self) -> bool:
        return len(self.tokens) == 1 and not self.all_logits

    def finish(self, result: np.ndarray | None = None, error: BaseException | None = None) -> None:
        self.result, self.error = result, error
        self.done.set()


class ShuttingDown(RuntimeError):
    """A step asked for after the batcher stopped."""


class Batcher:
    """Runs the steps of several sequences (members: the first and its forks) on the thread
    that calls run().

    max_batch: tokens per batch at most (7: a batch of 8 rows would take the tiled K-quant
    GEMM's order in ggml, and a row must get its bits alone). gather_s: how long a decoding
    token waits for the other busy sequences' tokens to join its batch."""

    def __init__(self, members: list[Transformer], batch: bool = True, max_batch: int = 7,
                 gather_s: float = 0.002):
        self.lead = members[0]  # runs the batches (decode_together)
        self.members = members
        # each sequence gets its logits in a buffer of its own: what forward() returns may be
        # a view of buffers the next step on this thread writes, while the sequence's thread
        # is still sampling from it
        self._logits: dict[int, np.ndarray] = {}
        self.batch = batch
        self.max_batch = max_batch
        self.gather_s = gather_s
        self._requests: queue.Queue = queue.Queue()
        self._held: collections.deque = collections.deque()  # taken from the queue, not run yet
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._busy = 0  # sequences inside a generation (their next step is coming)
        self._stopped = False
        self.batches = collections.Counter()  # decoding steps run, by batch size
        self.seconds: dict[int, float] = {}  # batch size -> moving average of the seconds a step takes
        self._tries = collections.Counter()  # batches of each size run in turns since batching it was measured
        self.prompt_parts = 0  # prompt micro-batches run between other slots' decoding steps

    # -- the sequences' side ---------------------------------------------------------
    def on_compute_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def forward(self, member: Transformer, tokens, all_logits: bool = False) -> np.ndarray:
        """member.forward(tokens, all_logits), run on the compute thread; blocks until done."""
        step = _Step(member, np.asarray(tokens, dtype=np.int64), all_logits)
        with self._lock:  # not after run()'s last look at the queue: it would wait forever
            if self._stopped:
                raise ShuttingDown("the model is shutting down")
            self._requests.put(step)
        step.done.wait()
        if step.error is not None:
            raise step.error
        return step.result

    def begin(self) -> None:
        """A sequence starts a generation: its steps will come one after another."""
        with self._lock:
            self._busy += 1

    def end(self) -> None:
        with self._lock:
            self._busy -= 1

    # -- the compute thread -------------------------------------------------------------
    def run(self) -> None:
        """Run steps as they come until stop(); then fail those still waiting."""
        self._thread = threading.current_thread()
        try:
            while True:
                step = self._next()
                if step is None:
                    return
                if step.decoding:
                    self._decode(self._gather(step))
                else:
                    self._prompt_part(step)
        finally:
            with self._lock:
                self._stopped = True
                waiting = list(self._held) + _drain(self._requests)
            for step in waiting:
                if step is not None:
                    step.finish(error=ShuttingDown("the model is shutting down"))

    def stop(self) -> None:
        self._requests.put(None)

    def _next(self, timeout: float | None = None) -> _Step | None:
        if self._held:
            return self._held.popleft()
        return self._requests.get(timeout=timeout)

    def _gather(self, first: _Step) -> list[_Step]:
        """first, and the decoding tokens of other sequences that come within gather_s, up to
        the number of busy sequences; a prompt (or the stop) ends the gathering and runs next."""
        batch = [first]
        for step in list(self._held):  # tokens that came while a prompt's micro-batch ran
            if not self.batch or len(batch) >= self.max_batch or step is None:
                break
            if step.decoding:
                self._held.remove(step)
                batch.append(step)
        deadline = time.monotonic() + (self.gather_s if self._worth_waiting() else 0.0)  # else: those queued now
        while self.batch and len(batch) < min(self.max_batch, self._busy):
            wait = deadline - time.monotonic()
            try:
                step = self._requests.get(timeout=wait) if wait > 0 else self._requests.get_nowait()
            except queue.Empty:
                break
            if step is None or not step.decoding:
                self._held.append(step)
                break
            batch.append(step)
        return batch

    def _prompt_part(self, step: _Step) -> None:
        """A prompt's first micro-batch; the rest goes back in line behind the steps that came
        meanwhile. Alone (no other slot generating), or where every position's logits are
        wanted, it runs whole. forward splits a prompt into the same micro-batches either way,
        so the logits are the same."""
        n = self.lead.n_ubatch
        if step.all_logits or len(step.tokens) <= n or self._busy <= 1:
            self._run_alone(step)
            return
        head, step.tokens = step.tokens[:n], step.tokens[n:]
        self.prompt_parts += 1
        try:
            step.member.forward(head)
        except BaseException as e:  # noqa: BLE001 (the sequence's thread raises it)
            step.finish(error=e)
            return
        self._held.extend(_drain(self._requests))
        self._held.append(step)

    # a batch size that lost to turns is measured again after this many of its batches
    RETRY_EVERY = 32

    def _decode(self, batch: list[_Step]) -> None:
        n = len(batch)
        if n > 1 and not self._pays(n):
            for s in batch:
                self._decode([s])
            return
        self.batches[n] += 1
        start = time.perf_counter()
        if n == 1:
            self._run_alone(batch[0])
        else:
            try:
                logits = self.lead.decode_together([s.member for s in batch], np.concatenate([s.tokens for s in batch]))
            except Exception:  # noqa: BLE001 (a full context, NaN: run each alone, so each gets its own error)
                for s in batch:
                    self._run_alone(s)
                return
            for r, s in enumerate(batch):
                s.finish(self._own_copy(s.member, logits[r : r + 1]))
        seconds = time.perf_counter() - start
        before = self.seconds.get(n)
        self.seconds[n] = seconds if before is None else 0.75 * before + 0.25 * seconds

    def _worth_waiting(self) -> bool:
        """Whether waiting for the other busy sequences' tokens may pay: some batch size they
        could make is not known to lose to turns, or is due to be tried again."""
        alone = self.seconds.get(1)
        if alone is None:
            return True
        for n in range(2, min(self.max_batch, self._busy) + 1):
            together = self.seconds.get(n)
            if together is None or together < n * alone or self._tries[n] >= self.RETRY_EVERY:
                return True
        return False

    def _pays(self, n: int) -> bool:
        """Whether n tokens run faster as one batch than one after the other, as measured so
        far; a size not measured yet (or not for RETRY_EVERY of its batches) is tried."""
        alone, together = self.seconds.get(1), self.seconds.get(n)
        if alone is None:
            return False  # a lone step's time first
        if together is None or together < n * alone or self._tries[n] >= self.RETRY_EVERY:
            self._tries[n] = 0
            return True
        self._tries[n] += 1
        return False

    def _run_alone(self, step: _Step) -> None:
        try:
            logits = step.member.forward(step.tokens, step.all_logits)
            step.finish(logits.copy() if step.all_logits else self._own_copy(step.member, logits[-1:]))
        except BaseException as e:  # noqa: BLE001 (the sequence's thread raises it)
            step.finish(error=e)

    def _own_copy(self, member: Transformer, row: np.ndarray) -> np.ndarray:
        """row (1, n_vocab) copied into member's logits buffer (its thread asks for its next
        step only once done with the last one's)."""
        out = self._logits.get(id(member))
        if out is None or out.shape != row.shape or out.dtype != row.dtype:
            out = self._logits[id(member)] = np.empty_like(row)
        np.copyto(out, row)
        return out


def _drain(q: queue.Queue) -> list:
    items = []
    while True:
        try:
            items.append(q.get_nowait())
        except queue.Empty:
            return items
