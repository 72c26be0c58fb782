"""The background loader: one thread that reads experts from the GGUF file into slots.

Each (layer, expert) is three contiguous byte ranges of the file (gate, up, down); each is
read with `os.preadv` straight into its slot (no intermediate buffer). With O_DIRECT the
file is opened so that reads bypass the page cache (which would otherwise hide the cost
of the disk and hold a second copy of every expert read): each range is widened to the
aligned span around it, and the slot regions are aligned to match.

`os.preadv` releases the GIL, so reads overlap the Numba / C kernels of the running layer.
Requests are served by priority: demand misses (a layer is waiting) before prefetches,
and prefetches by their order (the layer that needs them first, then the most confident).
A queued job can be cancelled (its prediction was replaced): `try_cancel` and the reader's
`try_start` race for the job's gate, and whichever comes first wins, so a job is either read
or dropped unread, never both.
"""

from __future__ import annotations

import errno
import itertools
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from ..errors import OffloadError

DEMAND, PREFETCH = 0, 1


@dataclass
class ReadJob:
    """Read `ranges` (file offset, slot offset, length, bytes needed) into `buf`, then call done(error)."""

    buf: object  # writable buffer (the slot)
    ranges: list[tuple[int, int, int, int]]
    done: Callable[[BaseException | None, int], None]
    started: bool = False
    cancelled: bool = False  # dropped before it started: done is not called
    seconds: float = 0.0  # how long the read took (set before done is called)
    _gate: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def try_start(self) -> bool:
        """The reader's claim: False if the job was cancelled first."""
        if not self._gate.acquire(blocking=False):
            return False
        self.started = True
        return True

    def try_cancel(self) -> bool:
        """The owner's claim: False if the read has started (it will complete and call done)."""
        if not self._gate.acquire(blocking=False):
            return False
        self.cancelled = True
        return True


def open_model_file(path: str, o_direct: bool) -> int:
    flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
    if o_direct:
        if not hasattr(os, "O_DIRECT"):
            raise OffloadError("O_DIRECT is not available on this platform")
        flags |= os.O_DIRECT
    try:
        return os.open(path, flags)
    except OSError as e:
        if o_direct and e.errno == errno.EINVAL:
            raise OffloadError(f"{path}: its filesystem does not support O_DIRECT (run without --o-direct)") from None
        raise OffloadError(f"{path}: cannot open for reading experts: {e.strerror}") from None


def supports_o_direct(path: str | os.PathLike[str]) -> bool:
    """Whether the file system holding `path` takes O_DIRECT opens (tmpfs, for one, does not)."""
    if not hasattr(os, "O_DIRECT"):
        return False
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT | getattr(os, "O_CLOEXEC", 0)))
    except OSError:
        return False
    return True


def read_ranges(fd: int, buf, ranges) -> int:
    """preadv each range fully (short reads continue; a read may stop early only past the
    bytes needed, at the end of the file). Returns the bytes read."""
    view = memoryview(buf)
    total = 0
    for file_off, slot_off, length, need in ranges:
        got = 0
        while got < length:
            n = os.preadv(fd, [view[slot_off + got : slot_off + length]], file_off + got)
            if n == 0:
                break
            got += n
        total += got
        if got < need:
            raise OSError(errno.EIO, f"short read: {got} of {need} bytes at offset {file_off}")
    return total


class Loader:
    """`n_threads` reader threads on the demand queue: more than one keeps several reads in
    flight (an SSD serves a queue of reads much faster than one read at a time); prefetches
    have a queue and `prefetch_threads` threads of their own, which start a read only while no
    demand read is queued or running: speculation uses the disk when it would be idle, and
    takes at most one read's time from a read a layer waits for."""

    def __init__(self, fd: int, n_threads: int = 1, name: str = "offload-loader", prefetch_threads: int = 1):
        self.fd = fd
        self._queue: queue.PriorityQueue = queue.PriorityQueue()
        self._prefetch_queue: queue.PriorityQueue = queue.PriorityQueue()
        self._seq = itertools.count()
        self._demand = 0  # demand reads queued or running
        self._idle = threading.Condition(threading.Lock())
        self._closing = False
        self._threads = [threading.Thread(target=self._run, args=(self._queue,), name=f"{name}-{i}", daemon=True)
                         for i in range(max(1, n_threads))]
        self._threads += [threading.Thread(target=self._run, args=(self._prefetch_queue,), name=f"{name}-prefetch-{i}",
                                           daemon=True) for i in range(max(1, prefetch_threads))]
        for t in self._threads:
            t.start()

    def submit(self, job: ReadJob, priority: int = DEMAND, order: tuple = ()) -> None:
        """Queue a read; lower (priority, *order) first, then first come first served."""
        if priority == DEMAND:
            with self._idle:
                self._demand += 1
            self._queue.put(((priority, *order), next(self._seq), job))
        else:
            self._prefetch_queue.put(((priority, *order), next(self._seq), job))

    def _run(self, q: queue.PriorityQueue) -> None:
        demand = q is self._queue
        while True:
            _, _, job = q.get()
            if job is None:
                return
            if not demand:
                with self._idle:  # the disk is the demand reads' first
                    while self._demand and not self._closing:
                        self._idle.wait(0.01)
            try:
                if job.try_start():
                    t0 = time.perf_counter()
                    try:
                        n = read_ranges(self.fd, job.buf, job.ranges)
                    except BaseException as e:  # reported to whoever waits for the slot
                        job.done(e, 0)
                    else:
                        job.seconds = time.perf_counter() - t0
                        job.done(None, n)
            finally:
                if demand:
                    with self._idle:
                        self._demand -= 1
                        if not self._demand:
                            self._idle.notify_all()

    def close(self) -> None:
        with self._idle:
            self._closing = True
            self._idle.notify_all()
        for _ in self._threads:  # one stop for each thread, on either queue (the extra ones are never read)
            self._queue.put(((-1,), next(self._seq) - 2**62, None))
            self._prefetch_queue.put(((-1,), next(self._seq) - 2**62, None))
        for t in self._threads:
            t.join()
        self._threads = []
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
