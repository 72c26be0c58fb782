"""The background loader: one thread that reads experts from the GGUF file into slots.

Each (layer, expert) is three contiguous byte ranges of the file (gate, up, down); each is
read with `os.preadv` straight into its slot (no intermediate buffer). With O_DIRECT the
file is opened so that reads bypass the page cache (which would otherwise hide the cost
of the disk and hold a second copy of every expert read): each range is widened to the
aligned span around it, and the slot regions are aligned to match.

`os.preadv` releases the GIL, so reads overlap the Numba / C kernels of the running layer.
Requests are served by priority: demand misses (a layer is waiting) before prefetches.
"""

from __future__ import annotations

import errno
import itertools
import os
import queue
import threading
from dataclasses import dataclass
from typing import Callable

from ..errors import OffloadError

DEMAND, PREFETCH = 0, 1


@dataclass
class ReadJob:
    """Read `ranges` (file offset, slot offset, length, bytes needed) into `buf`, then call done(error)."""

    buf: object  # writable buffer (the slot)
    ranges: list[tuple[int, int, int, int]]
    done: Callable[[BaseException | None, int], None]


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
    """`n_threads` reader threads on one queue: more than one keeps several reads in flight
    (an SSD serves a queue of reads much faster than one read at a time)."""

    def __init__(self, fd: int, n_threads: int = 1, name: str = "offload-loader"):
        self.fd = fd
        self._queue: queue.PriorityQueue = queue.PriorityQueue()
        self._seq = itertools.count()
        self._threads = [threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True)
                         for i in range(max(1, n_threads))]
        for t in self._threads:
            t.start()

    def submit(self, job: ReadJob, priority: int = DEMAND) -> None:
        self._queue.put((priority, next(self._seq), job))

    def _run(self) -> None:
        while True:
            _, _, job = self._queue.get()
            if job is None:
                return
            try:
                n = read_ranges(self.fd, job.buf, job.ranges)
            except BaseException as e:  # reported to whoever waits for the slot
                job.done(e, 0)
            else:
                job.done(None, n)

    def close(self) -> None:
        for _ in self._threads:
            self._queue.put((-1, next(self._seq) - 2**62, None))
        for t in self._threads:
            t.join()
        self._threads = []
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
