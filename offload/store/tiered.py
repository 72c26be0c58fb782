"""TieredExperts: routed experts in a fixed arena of slots, fed from the GGUF file.

`get(layer, expert)` returns the expert's FFN, whose three QMatrix views point into its
slot. A hit costs a dictionary lookup; a miss claims a free slot (or evicts the policy's
victim among the unpinned ones), has the loader thread read the expert into it, and
waits (the wait is counted as I/O stall).

Pinning, without hooks in the forward pass: the FFNs handed out for the running layer
stay pinned (never evicted, never overwritten) until the store is asked for another
layer, or until `n_expert_used` newer experts of the same layer have been handed out
(a batch may touch every expert of a layer, one after the other; the forward pass uses
each expert's FFN before asking for the next, and never holds more than top-k at once).
So one layer needs `n_expert_used` slots, whatever the batch.

A budget that holds every expert loads them all at start: `get` is then a lookup and
there is no I/O after load.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import asdict, dataclass

import numpy as np

from ..errors import ExpertReadError
from ..gguf_file import GGUFFile
from ..kernels import QMatrix, format_for
from ..weights import FFN, ExpertLayout, expert_layouts
from .arena import EMPTY, LOADING, READY, Arena, Slot
from .loader import DEMAND, PREFETCH, Loader, ReadJob, open_model_file
from .plan import DIRECT_ALIGN, MemoryPlan, _down, _up, slot_layout
from .policy import make_policy


@dataclass
class StoreStats:
    hits: int = 0
    misses: int = 0  # demand reads (a layer waited)
    prefetches: int = 0  # reads issued ahead of use
    prefetch_hits: int = 0  # first uses of a prefetched expert
    evictions: int = 0
    reads: int = 0  # experts read after load
    bytes_read: int = 0  # after load
    stall_seconds: float = 0.0  # waiting for reads
    read_errors: int = 0
    load_bytes: int = 0  # read while loading (every expert, when they all fit)
    load_seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


class TieredExperts:
    """An ExpertStore within a MemoryPlan. Thread-safe; close() when done."""

    def __init__(self, gguf: GGUFFile, plan: MemoryPlan, args=None, *, policy: str = "lrfu",
                 layouts: dict[int, ExpertLayout] | None = None, io_threads: int = 1):
        self.path = str(gguf.path)
        self.plan = plan
        self.layouts = layouts if layouts is not None else expert_layouts(gguf, args)
        self.n_expert_used = plan.n_expert_used
        self.stats = StoreStats()
        self._o_direct = plan.o_direct
        self._cond = threading.Condition(threading.Lock())
        self._index: dict[tuple[int, int], Slot] = {}
        self._pins: deque[Slot] = deque()
        self._layer: int | None = None
        self._closed = False
        self._errors: dict[tuple[int, int], BaseException] = {}
        self._loading_prefetch = 0
        self._wanted: set[tuple[int, int]] = set()  # announced by prefetch() for the coming gets
        self._pool_of_layer = {l: i for i, p in enumerate(plan.pools) for l in p.layers}
        self._region = {l: slot_layout(lay, self._o_direct)[1] for l, lay in self.layouts.items()}
        self._fmt = {l: [format_for(p.ggml_type) for p in lay.parts] for l, lay in self.layouts.items()}
        k = max(1, self.n_expert_used)  # LRFU's half-life: about 8 tokens of a pool's accesses
        self._policies = [make_policy(policy, half_life=max(16, 8 * len(p.layers) * k)) for p in plan.pools]
        self.policy = self._policies[0].name if self._policies else policy
        self.arena = Arena([(p.slot_bytes, p.n_slots) for p in plan.pools])
        self._free = [list(reversed(pool)) for pool in self.arena.pools]  # EMPTY slots, per pool
        self._loader = Loader(open_model_file(self.path, self._o_direct), io_threads)
        self.all_resident = plan.all_resident
        self._static: dict[int, list[FFN]] = {}
        if self.all_resident:
            self._load_all()

    # -- the ExpertStore protocol --------------------------------------------------------
    def get(self, layer: int, expert: int) -> FFN:
        if self.all_resident:
            self.stats.hits += 1
            return self._static[layer][expert]
        key = (layer, expert)
        with self._cond:
            if self._closed:
                raise ExpertReadError("the expert store is closed")
            if layer != self._layer:
                self._unpin_all()
                self._layer = layer
                if self._wanted and next(iter(self._wanted))[0] != layer:
                    self._wanted = set()
            elif len(self._pins) >= self.n_expert_used:
                self._unpin(self._pins.popleft())
            slot = self._index.get(key)
            policy = self._policies[self._pool_of_layer[layer]]
            if slot is not None and slot.state == READY:
                self.stats.hits += 1
                if slot.prefetched:
                    slot.prefetched = False
                    self.stats.prefetch_hits += 1
                policy.access(key)
                self._pin(slot)
                return slot.ffn
            if slot is None:
                self.stats.misses += 1
                slot = self._claim(layer)
                self._start_read(slot, key, DEMAND)
            else:  # a prefetch of it is still in flight
                self.stats.misses += 1
                slot.prefetched = False
            policy.access(key)
            self._pin(slot)
            t0 = time.perf_counter()
            while slot.state == LOADING and slot.key == key:
                self._cond.wait()
            self.stats.stall_seconds += time.perf_counter() - t0
            if slot.key != key or slot.state != READY:
                self._pins.remove(slot)
                self._unpin(slot)
                err = self._errors.pop(key, None)
                raise ExpertReadError(
                    f"{self.path}: reading expert {expert} of layer {layer} failed: {_why(err)}"
                ) from err
            return slot.ffn

    def prefetch(self, layer: int, experts) -> int:
        """Start reading these experts of `layer` in the background, as far as the prefetch
        reserve allows; returns how many reads were started. Never waits. The experts named
        are also protected from eviction by each other's reads until another layer runs
        (call it with a layer's routed experts as soon as routing is known, so their reads
        overlap the computation of the first ones)."""
        if self.all_resident:
            return 0
        started = 0
        keys = [(layer, int(e)) for e in experts]
        with self._cond:
            self._wanted = set(keys)  # not evicted to make room for each other
            for key in keys:
                if key in self._index or self._closed:
                    continue
                if self._loading_prefetch >= max(self.plan.prefetch_slots, 0):
                    break
                slot = self._claim(layer, wait=False)
                if slot is None:
                    break
                self._start_read(slot, key, PREFETCH)
                slot.prefetched = True
                self._policies[self._pool_of_layer[layer]].insert(key)
                self.stats.prefetches += 1
                started += 1
        return started

    # -- internals (called with the lock held) --------------------------------------------
    def _pin(self, slot: Slot) -> None:
        slot.pins += 1
        self._pins.append(slot)

    def _unpin(self, slot: Slot) -> None:
        slot.pins -= 1

    def _unpin_all(self) -> None:
        while self._pins:
            self._unpin(self._pins.popleft())

    def _claim(self, layer: int, wait: bool = True) -> Slot | None:
        """A slot of the layer's pool that may be (re)filled: an empty one, else the policy's
        victim among the unpinned, loaded ones (sparing the experts prefetch() announced
        while others can go)."""
        pool_i = self._pool_of_layer[layer]
        free = self._free[pool_i]
        policy = self._policies[pool_i]

        def evictable(key) -> bool:
            slot = self._index.get(key)
            return slot is not None and not slot.pins and slot.state == READY

        while True:
            if free:
                return free.pop()
            key = None
            if self._wanted:
                key = policy.pick(lambda k: k not in self._wanted and evictable(k))
            if key is None:
                key = policy.pick(evictable)
            if key is not None:
                victim = self._index.pop(key)
                policy.remove(key)
                victim.key, victim.state, victim.ffn, victim.prefetched = None, EMPTY, None, False
                self.stats.evictions += 1
                return victim
            if not wait:
                return None
            if not any(s.state == LOADING for s in self.arena.pools[pool_i]):
                raise RuntimeError(f"expert store: every slot of layer {layer}'s pool is pinned (a bug)")
            self._cond.wait()  # a prefetch in flight will free up

    def _ranges(self, layer: int, expert: int) -> list[tuple[int, int, int, int]]:
        """(file offset, slot offset, length, bytes needed) per part, and each part's start in the slot."""
        out = []
        for part, start in zip(self.layouts[layer].parts, self._region[layer]):
            off, n = part.range(expert)
            if self._o_direct:
                a = _down(off, DIRECT_ALIGN)
                out.append((a, start, _up(off + n, DIRECT_ALIGN) - a, off + n - a))
            else:
                out.append((off, start, n, n))
        return out

    def _views(self, slot: Slot, layer: int, expert: int) -> FFN:
        mats = []
        for part, start, fmt in zip(self.layouts[layer].parts, self._region[layer], self._fmt[layer]):
            off, n = part.range(expert)
            begin = start + (off - _down(off, DIRECT_ALIGN) if self._o_direct else 0)
            data = slot.buf[begin : begin + n].reshape(part.n_rows, n // part.n_rows)
            mats.append(QMatrix(fmt, part.n_rows, part.n_cols, data))
        return FFN(*mats)

    def _start_read(self, slot: Slot, key: tuple[int, int], priority: int) -> None:
        layer, expert = key
        slot.key, slot.state, slot.ffn = key, LOADING, None
        self._index[key] = slot
        if priority == PREFETCH:
            self._loading_prefetch += 1

        def done(err: BaseException | None, n: int) -> None:
            with self._cond:
                if priority == PREFETCH:
                    self._loading_prefetch -= 1
                if err is None:
                    slot.ffn = self._views(slot, layer, expert)
                    slot.state = READY
                    self.stats.reads += 1
                    self.stats.bytes_read += n
                else:
                    self.stats.read_errors += 1
                    self._errors[key] = err
                    if self._index.get(key) is slot:
                        del self._index[key]
                    self._policies[self._pool_of_layer[layer]].remove(key)
                    slot.key, slot.state, slot.ffn, slot.prefetched = None, EMPTY, None, False
                    self._free[slot.pool].append(slot)
                self._cond.notify_all()

        self._loader.submit(ReadJob(slot.buf, self._ranges(layer, expert), done), priority)

    def _load_all(self) -> None:
        """Every expert into its slot, at load (the plan holds them all)."""
        t0 = time.perf_counter()
        with self._cond:
            for layer, lay in self.layouts.items():
                free = self._free[self._pool_of_layer[layer]]
                for e in range(lay.n_expert):
                    self._start_read(free.pop(), (layer, e), DEMAND)
            while any(s.state == LOADING for s in self.arena.slots):
                self._cond.wait()
            failed = next(iter(self._errors.items()), None)
            if failed is None:
                for layer, lay in self.layouts.items():
                    self._static[layer] = [self._index[(layer, e)].ffn for e in range(lay.n_expert)]
                self.stats.load_bytes, self.stats.reads, self.stats.bytes_read = self.stats.bytes_read, 0, 0
        if failed is not None:
            (layer, expert), err = failed
            self.close()
            raise ExpertReadError(f"{self.path}: reading expert {expert} of layer {layer} failed: {_why(err)}")
        self.stats.load_seconds = time.perf_counter() - t0

    # -- inspection and lifetime -------------------------------------------------------
    def resident_experts(self) -> int:
        with self._cond:
            return sum(1 for s in self.arena.slots if s.state == READY)

    def slot_of(self, layer: int, expert: int) -> Slot | None:
        with self._cond:
            return self._index.get((layer, expert))

    def close(self) -> None:
        with self._cond:
            self._closed = True
        self._loader.close()
        self._static.clear()
        self._index.clear()
        self.arena.close()


def _why(err: BaseException | None) -> str:
    if isinstance(err, OSError):
        return err.strerror or str(err)
    return str(err) if err else "the read did not complete"
