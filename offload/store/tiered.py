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

Prefetch, two kinds: `prefetch(layer, experts)` names the running layer's routed experts
(their reads overlap the first ones' compute); `prefetch_predicted(layer, predictions)`
hands over what a predictor (offload.predict) expects the next layers to pick. Prefetch
reads have their own loader queue and thread (so speculation never takes more than one
read's share of the disk from the reads a layer waits for), ordered by need: the running
layer's first, then by target layer (a prediction's rank among its layer's counting as one
layer further: a far layer's best guess goes before a near layer's long shot), then
confidence. A newer set of predictions replaces the older one: a queued read that is no
longer predicted is cancelled before it starts (its slot freed); one already read but not
used becomes the first victim. A prefetch never evicts a pinned slot, an expert the running
layer announced, or one a nearer prediction needs; a layer's get() of an expert still
queued moves its read to the demand queue. Prefetch reads queued or in flight are capped
(the plan's prefetch reserve, more when the budget leaves room beside the running layer).

A read budget per layer: a prediction is read only if the read is expected to arrive before
its layer runs. The store measures the prefetch reader's bytes per second (each read's
bytes over its time) and a layer's compute time (between predictions made at consecutive
layers, less the I/O stall in between); a read whose bytes, behind the prefetch reads still
pending, take longer than the layers until its target's compute is skipped (counted in
`prefetch_skipped_late`): on a disk that is the bottleneck it would come late, take the disk
from the reads layers wait for, and evict an expert for nothing. Until both are measured,
and with `read_budget` False, every prediction that finds a slot is read.

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
    prefetch_late: int = 0  # uses of a prefetched expert whose read had not finished (counted as misses too)
    prefetch_cancelled: int = 0  # queued prefetch reads dropped before they started (no longer predicted)
    prefetch_wasted: int = 0  # prefetched experts evicted before any use
    prefetch_wasted_bytes: int = 0  # ... and the bytes their reads cost
    prefetch_skipped_late: int = 0  # predictions not read: expected to arrive after their layer runs
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
        self._predicted: dict[tuple[int, int], tuple] = {}  # prefetch_predicted(): key -> need order
        self._stale: dict[tuple[int, int], None] = {}  # prefetched, unused, no longer predicted: evicted first
        self._jobs: dict[tuple[int, int], tuple] = {}  # key -> (ReadJob, priority, order) of reads not yet done
        self.max_prefetch = max(plan.prefetch_slots, 0)  # prefetch reads in flight at most (set_prefetch_depth)
        self.rank_weight = 1  # a prediction's rank among its layer's counts as this many layers of distance
        self.read_budget = True  # read a prediction only when expected in time (see the module docstring)
        self.read_rate = 0.0  # bytes/s of one prefetch read, measured (moving average; 0: not yet)
        self.layer_seconds = 0.0  # a layer's compute time, measured (moving average; 0: not yet)
        self._last_predicted_at: tuple[int, float, float] | None = None  # (layer, time, stall then)
        self._moe_index = {l: i for i, l in enumerate(sorted(self.layouts))}
        self.stall_by_layer: dict[int, float] = {}  # seconds waiting for reads, per layer
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
    def resident_ffns(self, layer: int) -> list[FFN] | None:
        """Every expert of a MoE layer, by id, when the budget holds them all in place (they never
        move then), else None."""
        return self._static[layer] if self.all_resident else None

    def note_uses(self, layers: list[int], chosen: np.ndarray) -> None:
        """Expert uses served without get() (kernels.step runs them from resident_ffns): chosen[layer]
        holds the experts each of these MoE layers ran for one token."""
        self.stats.hits += len(layers) * chosen.shape[1]

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
                    self._stale.pop(key, None)
                policy.access(key)
                self._pin(slot)
                return slot.ffn
            t0 = time.perf_counter()
            if slot is None:
                self.stats.misses += 1
                slot = self._claim(layer)  # may wait for a read in flight to free a slot
                self._start_read(slot, key, DEMAND)
            else:  # a prefetch of it is still in flight (or queued: it goes first now)
                self.stats.misses += 1
                self.stats.prefetch_late += slot.prefetched
                slot.prefetched = False
                self._promote(key)
            policy.access(key)
            self._pin(slot)
            while slot.state == LOADING and slot.key == key:
                self._cond.wait()
            waited = time.perf_counter() - t0
            self.stats.stall_seconds += waited
            self.stall_by_layer[layer] = self.stall_by_layer.get(layer, 0.0) + waited
            if slot.key != key or slot.state != READY:
                self._pins.remove(slot)
                self._unpin(slot)
                err = self._errors.pop(key, None)
                raise ExpertReadError(
                    f"{self.path}: reading expert {expert} of layer {layer} failed: {_why(err)}"
                ) from err
            return slot.ffn

    def hold(self, layer: int, expert: int) -> FFN | None:
        """The expert's FFN if it is in RAM now, pinned (never evicted nor overwritten) until
        release(): a device copy from its slot may be in flight. None if it is not loaded."""
        if self.all_resident:
            return self._static[layer][expert]
        with self._cond:
            slot = self._index.get((layer, expert))
            if slot is None or slot.state != READY:
                return None
            slot.pins += 1
            return slot.ffn

    def release(self, layer: int, expert: int) -> None:
        """Undo one hold()."""
        if self.all_resident:
            return
        with self._cond:
            slot = self._index.get((layer, expert))
            if slot is not None and slot.pins > 0:
                slot.pins -= 1
                self._cond.notify_all()

    def prefetch(self, layer: int, experts) -> int:
        """Start reading these experts of `layer` in the background, as far as the prefetch
        reserve allows; returns how many reads were started. Never waits. The experts named
        are also protected from eviction by each other's reads until another layer runs
        (call it with a layer's routed experts as soon as routing is known, so their reads
        overlap the computation of the first ones)."""
        if self.all_resident:
            return 0
        keys = [(layer, int(e)) for e in experts]
        with self._cond:
            self._wanted = set(keys)  # not evicted to make room for each other
            # the layer's routing is known: its predictions are settled
            for key in [k for k in self._predicted if k[0] <= layer]:
                del self._predicted[key]
                if key not in self._wanted and not self._cancel(key):
                    self._mark_stale(key)
            # before any prediction for this layer or later ones
            started = self._start_reads((key, (layer, layer, -2.0, i)) for i, key in enumerate(keys))
        return started

    def _start_reads(self, ordered) -> int:
        """Queue reads of (key, order) pairs, nearest need first (under the lock): promote
        those already in a slot, stop at the first that finds no room (none is left for
        the farther ones either). Returns how many reads started."""
        started = 0
        for key, order in ordered:
            if self._closed:
                break
            if key in self._index:
                self._promote(key, PREFETCH, order)
            elif self._issue(key, order):
                started += 1
            else:
                break
        return started

    def prefetch_predicted(self, layer: int, predictions) -> int:
        """Replace the predictions made so far with these, made while `layer` runs (-1: at the
        end of a token, for the next one's layers): (target layer, experts, confidence) each,
        experts most likely first. Predictions
        for `layer` itself stand until its routing is known (prefetch()); queued reads of
        experts no longer predicted are cancelled; then reads start, nearest need first
        and as far as the cap on reads in flight allows. Returns how many reads started."""
        if self.all_resident:
            return 0
        new: dict[tuple[int, int], tuple] = {}
        for target, experts, confidence in predictions:
            if target <= layer or target not in self._pool_of_layer:
                continue
            for rank, e in enumerate(experts):
                key = (int(target), int(e))
                # need: the target layer, later for the less likely ones (a rank counts as a layer
                # further), so a far layer's best guess goes before a near layer's long shot
                order = (int(target) + rank * self.rank_weight, int(target), -float(confidence), rank)
                if key not in new or order < new[key]:
                    new[key] = order
        with self._cond:
            if self._closed:
                return 0
            self._time_layer(layer)
            for key in list(self._predicted):
                if key[0] != layer and key not in new:
                    del self._predicted[key]
                    if key not in self._wanted and not self._cancel(key):
                        self._mark_stale(key)
            self._predicted.update(new)
            started = self._start_reads(self._in_time(layer, sorted(new.items(), key=lambda kv: kv[1])))
        return started

    SMOOTHING = 0.25  # weight of a new measurement in the moving averages

    def _time_layer(self, layer: int) -> None:
        """A layer's compute time, from predictions made at consecutive MoE layers of a step."""
        now, stall = time.perf_counter(), self.stats.stall_seconds
        last = self._last_predicted_at
        self._last_predicted_at = (layer, now, stall)
        if last is None or layer not in self._moe_index or last[0] not in self._moe_index:
            return
        layers = self._moe_index[layer] - self._moe_index[last[0]]
        if layers <= 0:  # the next token (or the same layer again)
            return
        seconds = max(0.0, (now - last[1]) - (stall - last[2])) / layers
        a = self.SMOOTHING
        self.layer_seconds = seconds if not self.layer_seconds else (1 - a) * self.layer_seconds + a * seconds

    def _in_time(self, layer: int, ordered: list) -> list:
        """The (key, order) pairs whose reads are expected to arrive before their layer runs:
        behind the prefetch reads pending, at the measured rate, within the layers between."""
        if not self.read_budget or not self.read_rate or not self.layer_seconds:
            return ordered
        here = self._moe_index.get(layer)
        ahead = sum(self.layouts[k[0]].expert_bytes for k, (job, prio, _) in self._jobs.items()
                    if prio == PREFETCH)
        kept = []
        for key, order in ordered:
            if key in self._index or here is None:
                kept.append((key, order))
                continue
            layers = self._moe_index[key[0]] - here
            arrive = (ahead + self.layouts[key[0]].expert_bytes) / self.read_rate
            if arrive <= layers * self.layer_seconds:
                ahead += self.layouts[key[0]].expert_bytes
                kept.append((key, order))
            else:
                self.stats.prefetch_skipped_late += 1
        return kept

    def set_prefetch_depth(self, depth: int, per_layer: int | None = None) -> None:
        """Allow up to depth x per_layer (default top-k) prefetch reads in flight, as far as
        each pool has slots beside the running layer's top-k; never below the plan's reserve."""
        k = max(1, self.n_expert_used)
        want = max(0, depth) * (per_layer or k) + k  # the running layer's own, too
        room = min((p.n_slots for p in self.plan.pools), default=0) - k
        with self._cond:
            self.max_prefetch = max(self.plan.prefetch_slots, min(want, room), 0)

    # -- internals (called with the lock held) --------------------------------------------
    def _pin(self, slot: Slot) -> None:
        slot.pins += 1
        self._pins.append(slot)

    def _unpin(self, slot: Slot) -> None:
        slot.pins -= 1

    def _unpin_all(self) -> None:
        while self._pins:
            self._unpin(self._pins.popleft())

    def _issue(self, key: tuple[int, int], order: tuple) -> bool:
        """Start a prefetch read of `key` (not in the index) with need `order`, if the cap
        on reads in flight (making room by cancelling a queued farther one) and a slot that
        may be taken allow; False if not."""
        if self._loading_prefetch >= self.max_prefetch:
            farther = [(o, k) for k, (job, prio, o) in self._jobs.items()
                       if prio == PREFETCH and not job.started and o > order]
            if not farther or not self._cancel(max(farther)[1]):
                return False
        layer = key[0]
        slot = self._claim(layer, wait=False, order=order)
        if slot is None:
            return False
        self._start_read(slot, key, PREFETCH, order)
        slot.prefetched = True
        self._policies[self._pool_of_layer[layer]].insert(key)
        self.stats.prefetches += 1
        return True

    def _mark_stale(self, key: tuple[int, int]) -> None:
        """A prefetched expert no longer predicted and not used: the first to give way (once read)."""
        slot = self._index.get(key)
        if slot is not None and slot.prefetched:
            self._stale[key] = None

    def _cancel(self, key: tuple[int, int]) -> bool:
        """Drop a queued prefetch read of `key` that has not started; its slot becomes free."""
        entry = self._jobs.get(key)
        if entry is None or entry[1] != PREFETCH or not entry[0].try_cancel():
            return False
        del self._jobs[key]
        self._loading_prefetch -= 1
        slot = self._index.pop(key)
        self._policies[self._pool_of_layer[key[0]]].remove(key)
        slot.key, slot.state, slot.ffn, slot.prefetched = None, EMPTY, None, False
        self._free[slot.pool].append(slot)
        self.stats.prefetch_cancelled += 1
        self.stats.prefetches -= 1  # it never read anything
        self._cond.notify_all()
        return True

    def _promote(self, key: tuple[int, int], priority: int = DEMAND, order: tuple = ()) -> None:
        """A queued (not started) read of `key` goes to `priority`/`order` if that is sooner."""
        entry = self._jobs.get(key)
        if entry is None or entry[1] != PREFETCH or entry[0].started:
            return
        if priority == PREFETCH and order >= entry[2]:
            return
        slot = self._index[key]
        prefetched = slot.prefetched
        if not self._cancel(key):
            return  # its read started meanwhile
        self.stats.prefetch_cancelled -= 1  # moved, not cancelled
        if priority == PREFETCH:
            self.stats.prefetches += 1
        self._free[slot.pool].remove(slot)
        self._start_read(slot, key, priority, order)
        slot.prefetched = prefetched and priority == PREFETCH
        self._policies[self._pool_of_layer[key[0]]].insert(key)

    def _claim(self, layer: int, wait: bool = True, order: tuple | None = None) -> Slot | None:
        """A slot of the layer's pool that may be (re)filled: an empty one, else the policy's
        victim among the unpinned, loaded ones. A demand read spares the experts prefetch()
        announced and the predicted ones while others can go; a prefetch (need `order`) never
        takes an announced expert nor one predicted for a need as near as its own."""
        pool_i = self._pool_of_layer[layer]
        free = self._free[pool_i]
        policy = self._policies[pool_i]
        wanted, predicted = self._wanted, self._predicted

        def evictable(key) -> bool:
            slot = self._index.get(key)
            return slot is not None and not slot.pins and slot.state == READY

        while True:
            if free:
                return free.pop()
            key = None
            for k in self._stale:  # wasted prefetches first (oldest first)
                if (k not in wanted and k not in predicted and evictable(k) and self._index[k].pool == pool_i
                        and self._index[k].prefetched):
                    key = k
                    break
            if key is not None:
                pass
            elif order is not None:
                key = policy.pick(lambda k: k not in wanted and predicted.get(k, (float("inf"),)) > order
                                  and evictable(k))
            else:
                if wanted or predicted:
                    key = policy.pick(lambda k: k not in wanted and k not in predicted and evictable(k))
                if key is None and wanted:
                    key = policy.pick(lambda k: k not in wanted and evictable(k))
                if key is None:
                    key = policy.pick(evictable)
            if key is not None:
                victim = self._index.pop(key)
                self._stale.pop(key, None)
                policy.remove(key)
                if victim.prefetched:
                    self.stats.prefetch_wasted += 1
                    self.stats.prefetch_wasted_bytes += victim.nread
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

    def _start_read(self, slot: Slot, key: tuple[int, int], priority: int, order: tuple = ()) -> None:
        layer, expert = key
        slot.key, slot.state, slot.ffn = key, LOADING, None
        self._stale.pop(key, None)
        self._index[key] = slot
        if priority == PREFETCH:
            self._loading_prefetch += 1

        def done(err: BaseException | None, n: int) -> None:
            with self._cond:
                if priority == PREFETCH:
                    self._loading_prefetch -= 1
                if self._jobs.get(key, (None,))[0] is job:
                    del self._jobs[key]
                if err is None:
                    slot.ffn = self._views(slot, layer, expert)
                    slot.state = READY
                    slot.nread = n
                    self.stats.reads += 1
                    self.stats.bytes_read += n
                    if job.seconds > 0:
                        rate, a = n / job.seconds, self.SMOOTHING
                        self.read_rate = rate if not self.read_rate else (1 - a) * self.read_rate + a * rate
                else:
                    self.stats.read_errors += 1
                    self._errors[key] = err
                    if self._index.get(key) is slot:
                        del self._index[key]
                    self._policies[self._pool_of_layer[layer]].remove(key)
                    slot.key, slot.state, slot.ffn, slot.prefetched = None, EMPTY, None, False
                    self._free[slot.pool].append(slot)
                self._cond.notify_all()

        job = ReadJob(slot.buf, self._ranges(layer, expert), done)
        self._jobs[key] = (job, priority, order)
        self._loader.submit(job, priority, order)

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

    def residency(self) -> dict[tuple[int, int], str]:
        """What each slot holds now, (layer, expert) -> "ready", "prefetched" (read ahead, not
        used yet) or "loading": a snapshot for displays (offload serve's expert panel)."""
        with self._cond:
            return {s.key: ("loading" if s.state == LOADING else "prefetched" if s.prefetched else "ready")
                    for s in self.arena.slots if s.key is not None and s.state in (LOADING, READY)}

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
