"""The slot arena: one anonymous mapping, allocated once at load, cut into expert slots.

Page-aligned (an anonymous mmap), so every slot can take O_DIRECT reads; pages become
resident only when a slot is first filled, so the arena costs what is used of it.
"""

from __future__ import annotations

import mmap

import numpy as np

EMPTY, LOADING, READY = 0, 1, 2


class Slot:
    __slots__ = ("index", "pool", "buf", "key", "state", "pins", "ffn", "prefetched", "nread")

    def __init__(self, index: int, pool: int, buf: np.ndarray):
        self.index = index
        self.pool = pool
        self.buf = buf  # uint8 view of the slot's bytes
        self.key: tuple[int, int] | None = None  # (layer, expert) it holds or is loading
        self.state = EMPTY
        self.pins = 0
        self.ffn = None  # FFN of views into buf, set when READY
        self.prefetched = False  # loaded ahead and not used yet
        self.nread = 0  # bytes its last read took

    def __repr__(self) -> str:
        return f"Slot({self.index}, key={self.key}, state={self.state}, pins={self.pins})"


class Arena:
    def __init__(self, pool_sizes: list[tuple[int, int]]):
        """pool_sizes: (slot_bytes, n_slots) per pool; slot_bytes are multiples of the page size."""
        total = sum(b * n for b, n in pool_sizes)
        self._map = mmap.mmap(-1, max(total, mmap.PAGESIZE), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.data = np.frombuffer(self._map, dtype=np.uint8)
        self.nbytes = total
        self.slots: list[Slot] = []
        self.pools: list[list[Slot]] = []
        pos = 0
        for p, (size, n) in enumerate(pool_sizes):
            pool = []
            for _ in range(n):
                slot = Slot(len(self.slots), p, self.data[pos : pos + size])
                pos += size
                self.slots.append(slot)
                pool.append(slot)
            self.pools.append(pool)

    def close(self) -> None:
        """Drop the mapping; slot views must not be used afterwards."""
        for s in self.slots:
            s.buf = s.ffn = None
        self.data = None
        try:
            self._map.close()
        except BufferError:  # views still alive elsewhere: the mapping goes when they do
            pass
