"""Replay a routing trace against an expert cache offline: hit rates of the store's policies
for any capacity, and Belady's optimum, the yardstick they are measured against.

    trace = RoutingTrace.load("run.npz")
    simulate(trace, capacity=192, policy="lrfu")    # SimResult(hits, misses, hit_rate)
    belady(trace, capacity=192)                     # the best any policy could do

The replay follows what `TieredExperts` (offload/store/tiered.py) sees without prefetch,
with the runtime's own policy classes (`offload.store.policy.make_policy`, the same LRFU
half-life), so that `simulate` counts the hits the store counts:

- for each micro-batch (`trace.batch`), for each MoE layer in order, the store is asked for
  the layer's experts: a single token's k experts in router order, or the sorted distinct
  experts of a batch's tokens (a layer that ran for no token of the batch asks for none);
- an expert asked for is pinned until another layer is asked for, or until k newer experts
  of the same layer have been (pinned experts are never evicted: the running layer's k
  experts cannot evict each other);
- on a miss with the pool full, the victim is the policy's pick among unpinned residents,
  sparing the experts the running layer still wants when another can go (the store's
  `prefetch()` announcement, made even with no prefetch reserve);
- capacity counts expert slots: in "global" scope one pool for every layer; in "layer"
  scope a pool per MoE layer (an int is the total, split evenly; or give one per layer).

`lookahead=True` replays the eviction the store does with a predictor (prefetch on): the
experts the trace's recorded predictions (`trace.predicted`, made while a layer ran, for
the next layers) name are spared while an expert predicted nowhere can go. The prefetch
reads themselves are not replayed: the hit rate is the eviction's, as if no read came early.

`belady` evicts, among the unpinned residents, the one whose next use is furthest in the
future (never used again first): with demand fetching and the pinning constraint this is
the optimum (checked against exhaustive search in tests/test_trace.py).

Cold misses count: an empty cache misses every expert's first use. `from_step` leaves the
first steps (e.g. the prompt) out of the counts while still replaying them.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from .store.policy import Policy, make_policy
from .trace import RoutingTrace

NEVER = np.iinfo(np.int64).max


@dataclass(frozen=True)
class SimResult:
    hits: int
    misses: int

    @property
    def accesses(self) -> int:
        return self.hits + self.misses

    @property
    def hit_rate(self) -> float:
        return self.hits / self.accesses if self.accesses else 1.0


@dataclass
class Accesses:
    """The store's request stream for a trace: one row per get(layer, expert)."""

    layer: np.ndarray  # int64: MoE layer index (into trace.layers)
    expert: np.ndarray  # int64
    call: np.ndarray  # int64: which (batch, layer) request group it belongs to
    step: np.ndarray  # int64: the first step of its batch
    call_start: np.ndarray  # int64 (n_calls + 1,): each call's first access

    def __len__(self) -> int:
        return len(self.layer)


def accesses(trace: RoutingTrace) -> Accesses:
    """The order in which the store is asked for experts when the trace's batches run."""
    ex = trace.experts.astype(np.int64)
    k = trace.k
    layers, experts, steps, sizes = [], [], [], []

    def singles(lo: int, hi: int) -> None:  # batches of one step, in bulk: each row in router order
        if hi <= lo:
            return
        block = ex[lo:hi]
        s_idx, l_idx = np.nonzero(block[:, :, 0] >= 0)  # (step, layer) order
        layers.append(np.repeat(l_idx, k))
        experts.append(block[s_idx, l_idx].reshape(-1))
        steps.append(np.repeat(lo + s_idx, k))
        sizes.append(np.full(len(s_idx), k, dtype=np.int64))

    bounds = np.flatnonzero(np.diff(trace.batch)) + 1
    starts = np.concatenate([[0], bounds]).astype(np.int64)
    ends = np.concatenate([bounds, [trace.n_steps]]).astype(np.int64)
    run = 0  # first step of the pending run of one-step batches
    for lo, hi in zip(starts.tolist(), ends.tolist()):
        if hi - lo == 1:
            continue
        singles(run, lo)
        run = hi
        block = ex[lo:hi]
        for li in range(trace.n_layers):
            rows = block[:, li]
            rows = rows[rows[:, 0] >= 0]
            if len(rows) == 0:
                continue
            keys = rows[0] if len(rows) == 1 else np.unique(rows)  # one token: router order; more: sorted
            layers.append(np.full(len(keys), li, dtype=np.int64))
            experts.append(keys)
            steps.append(np.full(len(keys), lo, dtype=np.int64))
            sizes.append(np.array([len(keys)], dtype=np.int64))
    singles(run, trace.n_steps)
    if not sizes:
        z = np.zeros(0, dtype=np.int64)
        return Accesses(z, z, z, z, np.zeros(1, dtype=np.int64))
    sizes = np.concatenate(sizes)
    call = np.repeat(np.arange(len(sizes), dtype=np.int64), sizes)
    return Accesses(np.concatenate(layers).astype(np.int64), np.concatenate(experts).astype(np.int64), call,
                    np.concatenate(steps).astype(np.int64), np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64))


def _capacities(trace: RoutingTrace, capacity, scope: str) -> list[int]:
    if scope not in ("global", "layer"):
        raise ValueError(f"scope {scope!r} is not 'global' or 'layer'")
    if scope == "global":
        caps = [int(capacity)]
    elif isinstance(capacity, (int, np.integer)):
        n = max(trace.n_layers, 1)
        caps = [int(capacity) // n + (1 if i < int(capacity) % n else 0) for i in range(n)]
    else:
        caps = [int(c) for c in capacity]
        if len(caps) != trace.n_layers:
            raise ValueError(f"{len(caps)} capacities for {trace.n_layers} MoE layers")
    if any(c < trace.k for c in caps):
        raise ValueError(f"a pool of {min(caps)} slots cannot hold one layer's top-{trace.k}")
    return caps


def capacity_for(trace: RoutingTrace, spec: str | int | float) -> int:
    """Total expert slots for "25%" (a share of all experts), 0.25 (a share) or 192 (slots)."""
    total = trace.n_layers * trace.n_expert
    if isinstance(spec, str):
        spec = spec.strip()
        if spec.endswith("%"):
            return max(1, round(float(spec[:-1]) / 100 * total))
        spec = float(spec) if "." in spec else int(spec)
    if isinstance(spec, float) and spec <= 1.0:
        return max(1, round(spec * total))
    return int(spec)


def _pinned_before(a: Accesses, k: int) -> np.ndarray:
    """For each access, how many of the accesses just before it are pinned while it claims a
    slot: those since its layer's run began, at most k - 1 (the store unpins the oldest once
    k are pinned, and every pin when another layer is asked for)."""
    n = len(a)
    run_start = np.zeros(n, dtype=np.int64)
    if n:
        change = np.concatenate([[True], a.layer[1:] != a.layer[:-1]])
        run_start = np.maximum.accumulate(np.where(change, np.arange(n), 0))
    return np.minimum(np.arange(n) - run_start, k - 1)


def predicted_keys(trace: RoutingTrace, a: Accesses) -> list[frozenset]:
    """Per request group (a.call): the (layer id, expert) keys predicted while its layer ran,
    for the layers after it (the union over the batch's rows); empty without predictions."""
    n_calls = len(a.call_start) - 1
    if trace.predicted is None:
        return [frozenset()] * n_calls
    layer_ids = [int(x) for x in trace.layers]
    index = {l: i for i, l in enumerate(layer_ids)}
    batch = trace.batch
    starts = np.searchsorted(batch, np.arange(int(batch[-1]) + 2)) if len(batch) else np.zeros(1, np.int64)
    out = []
    for c in range(n_calls):
        first = a.call_start[c]
        if first == a.call_start[c + 1]:
            out.append(frozenset())
            continue
        li, step = int(a.layer[first]), int(a.step[first])
        b = int(batch[step])
        rows = trace.predicted[starts[b] : starts[b + 1]]
        keys = set()
        for d in range(1, rows.shape[2] + 1):
            t = index.get(layer_ids[li] + d)
            if t is not None:
                keys.update((layer_ids[t], int(e)) for e in np.unique(rows[:, t, d - 1]) if e >= 0)
        out.append(frozenset(keys))
    return out


def simulate(trace: RoutingTrace, capacity: int | Sequence[int], policy: str | Callable[..., Policy] = "lrfu",
             scope: str = "global", from_step: int = 0, stream: Accesses | None = None, lookahead: bool = False,
             spared: Sequence[frozenset] | None = None, **policy_kwargs) -> SimResult:
    """Hits and misses of `policy` ("lru", "lfu", "lrfu") with `capacity` expert slots;
    `lookahead`: sparing the experts the trace's predictions name (see the module docstring);
    `spared`: instead, per request group (`accesses(trace).call`), the keys to spare as the
    store spares predicted ones (an oracle's, say).

    `policy` may also be a Policy subclass (or any callable taking the keyword arguments and
    returning a Policy), to try a new one before it goes into offload.store.policy."""
    a = accesses(trace) if stream is None else stream
    if lookahead and trace.predicted is None:
        raise ValueError("this trace has no predictions (record it with a tiered store and prefetch on)")
    predicted_of = predicted_keys(trace, a) if lookahead else spared
    predicted: frozenset = frozenset()
    caps = _capacities(trace, capacity, scope)
    n_pools = len(caps)
    k = trace.k
    pool_of = (lambda li: 0) if scope == "global" else (lambda li: li)
    layers_per_pool = trace.n_layers if scope == "global" else 1
    if "half_life" not in policy_kwargs:  # as TieredExperts sets it
        policy_kwargs["half_life"] = max(16, 8 * layers_per_pool * max(1, k))
    policies = [make_policy(policy, **policy_kwargs) if isinstance(policy, str) else policy(**policy_kwargs)
                for _ in range(n_pools)]
    resident: list[set] = [set() for _ in range(n_pools)]
    layer_ids = [int(x) for x in trace.layers]
    layer_l, expert_l, call_l, step_l = a.layer.tolist(), a.expert.tolist(), a.call.tolist(), a.step.tolist()
    call_start = a.call_start.tolist()
    pins: list = []
    cur_layer = None
    cur_call = -1
    wanted: set = set()
    hits = misses = 0
    for i in range(len(layer_l)):
        li = layer_l[i]
        key = (layer_ids[li], expert_l[i])
        if li != cur_layer:
            pins = []
            cur_layer = li
        elif len(pins) >= k:
            pins.pop(0)
        if call_l[i] != cur_call:
            cur_call = call_l[i]
            wanted = {(layer_ids[li], e) for e in expert_l[call_start[cur_call] : call_start[cur_call + 1]]}
            if predicted_of is not None:
                predicted = predicted_of[cur_call]
        p = pool_of(li)
        res, pol = resident[p], policies[p]
        counted = step_l[i] >= from_step
        if key in res:
            hits += counted
            pol.access(key)
        else:
            misses += counted
            if len(res) >= caps[p]:
                def evictable(x, res=res, pins=pins):
                    return x in res and x not in pins

                victim = None
                if predicted:  # as the store: an expert predicted nowhere goes first
                    victim = pol.pick(lambda x: x not in wanted and x not in predicted and evictable(x))
                if victim is None and wanted:
                    victim = pol.pick(lambda x: x not in wanted and evictable(x))
                if victim is None:
                    victim = pol.pick(evictable)
                if victim is None:
                    raise RuntimeError(f"every slot of pool {p} is pinned")
                res.discard(victim)
                pol.remove(victim)
            res.add(key)
            pol.access(key)
        pins.append(key)
    return SimResult(int(hits), int(misses))


def next_use(a: Accesses, n_expert: int) -> np.ndarray:
    """For each access, the index of the next access of the same (layer, expert); NEVER if none."""
    keys = a.layer * max(n_expert, 1) + a.expert
    n = len(keys)
    out = np.full(n, NEVER, dtype=np.int64)
    if n == 0:
        return out
    order = np.argsort(keys, kind="stable")  # by key, then by time
    same = keys[order[1:]] == keys[order[:-1]]
    out[order[:-1][same]] = order[1:][same]
    return out


def belady(trace: RoutingTrace, capacity: int | Sequence[int], scope: str = "global", from_step: int = 0,
           stream: Accesses | None = None) -> SimResult:
    """Belady's optimum: on a miss with the pool full, evict the unpinned resident expert
    whose next use is furthest in the future."""
    a = accesses(trace) if stream is None else stream
    caps = _capacities(trace, capacity, scope)
    nxt = next_use(a, trace.n_expert).tolist()
    pinned_n = _pinned_before(a, trace.k).tolist()
    keys = (a.layer * max(trace.n_expert, 1) + a.expert).tolist()
    layer_l, step_l = a.layer.tolist(), a.step.tolist()
    n_pools = len(caps)
    global_scope = scope == "global"
    resident: list[dict[int, int]] = [{} for _ in range(n_pools)]  # key -> its next use
    heaps: list[list[tuple[int, int]]] = [[] for _ in range(n_pools)]  # (-next use, key), lazy
    hits = misses = 0
    for i in range(len(keys)):
        key = keys[i]
        p = 0 if global_scope else layer_l[i]
        res, heap = resident[p], heaps[p]
        counted = step_l[i] >= from_step
        if key in res:
            hits += counted
        else:
            misses += counted
            if len(res) >= caps[p]:
                pinned = set(keys[i - pinned_n[i] : i])
                held = []
                while True:
                    neg, victim = heapq.heappop(heap)
                    if res.get(victim) != -neg:
                        continue  # stale
                    if victim in pinned:
                        held.append((neg, victim))
                        continue
                    break
                for entry in held:
                    heapq.heappush(heap, entry)
                del res[victim]
        res[key] = nxt[i]
        heapq.heappush(heap, (-nxt[i], key))
    return SimResult(int(hits), int(misses))


POLICY_NAMES = ("lru", "lfu", "lrfu")


def compare(trace: RoutingTrace, capacities: Sequence[str | int | float], policies: Sequence[str] = POLICY_NAMES,
            scope: str = "global", from_step: int = 0, lookahead: bool = False) -> list[dict]:
    """One row per capacity: slots, share, each policy's hit rate, Belady's, and each
    policy's hit rate as a share of Belady's; with `lookahead` (a trace with predictions)
    also each policy's with the predictor's eviction ("<policy>+pred")."""
    stream = accesses(trace)
    total = trace.n_layers * trace.n_expert
    rows = []
    for spec in capacities:
        slots = capacity_for(trace, spec)
        opt = belady(trace, slots, scope, from_step, stream=stream)
        row = {"capacity": slots, "share": slots / total if total else 1.0, "belady": opt.hit_rate}
        for name in policies:
            r = simulate(trace, slots, name, scope, from_step, stream=stream)
            row[name] = r.hit_rate
            row[name + "_vs_belady"] = r.hit_rate / opt.hit_rate if opt.hit_rate else 1.0
            if lookahead:
                r = simulate(trace, slots, name, scope, from_step, stream=stream, lookahead=True)
                row[name + "+pred"] = r.hit_rate
                row[name + "+pred_vs_belady"] = r.hit_rate / opt.hit_rate if opt.hit_rate else 1.0
        rows.append(row)
    return rows
