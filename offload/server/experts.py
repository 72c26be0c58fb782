"""What the expert cache is doing, per MoE layer and expert, for the web page's panel.

`ExpertActivity` stands between the transformer and its expert store: every `get(layer,
expert)` passes through it to the store unchanged (results never change) and is counted as a
hit or a miss (a miss: the store's miss counter moved during the call). A decode step walks
the MoE layers in order, so a layer index below the previous one starts a new step;
`last` keeps the most recent step's choice in each layer (a prefill counts as one step).

`snapshot()` adds what the store holds right now (resident, prefetched and not yet used,
loading) and is what GET /v1/offload/experts returns.
"""

from __future__ import annotations

import threading

import numpy as np

from ..store import TieredExperts

NONE, HIT, MISS = 0, 1, 2


class ExpertActivity:
    def __init__(self, model) -> None:
        self.model = model
        self.store = model.transformer.experts  # what the forward pass calls: the GPU tier, when there is one
        self.tiered = model.experts if isinstance(model.experts, TieredExperts) else None
        args = model.args
        self.layers = [layer for layer in range(args.n_layer) if args.is_moe_layer(layer)]
        self.n_expert = args.n_expert
        self._row = {layer: i for i, layer in enumerate(self.layers)}
        shape = (len(self.layers), self.n_expert)
        self.hits = np.zeros(shape, dtype=np.int64)  # this request's
        self.misses = np.zeros(shape, dtype=np.int64)
        self.last = np.zeros(shape, dtype=np.int8)  # NONE / HIT / MISS in the latest step of each layer
        self._row_step = np.full(len(self.layers), -1, dtype=np.int64)
        self.step = 0
        self._prev_layer = -1
        self._lock = threading.Lock()
        model.transformer.experts = self

    def __getattr__(self, name):  # everything else is the store's (prefetch, all_resident, ...)
        return getattr(self.store, name)

    def get(self, layer: int, expert: int):
        before = self.tiered.stats.misses if self.tiered is not None else 0
        ffn = self.store.get(layer, expert)
        missed = self.tiered is not None and self.tiered.stats.misses != before
        self._count(layer, expert, missed)
        return ffn

    def note_uses(self, layers: list[int], chosen: np.ndarray) -> None:
        """A decoding token's experts run from the store's resident ones without get() (the
        whole step in C, kernels.step): hits, layer by layer."""
        for layer in layers:
            for expert in chosen[layer]:
                self._count(layer, int(expert), False)
        note_uses = getattr(self.store, "note_uses", None)
        if note_uses is not None:
            note_uses(layers, chosen)

    def _count(self, layer: int, expert: int, missed: bool) -> None:
        row = self._row.get(layer)
        if row is not None:
            with self._lock:
                if layer < self._prev_layer:
                    self.step += 1
                self._prev_layer = layer
                if self._row_step[row] != self.step:
                    self.last[row] = NONE
                    self._row_step[row] = self.step
                self.last[row, expert] = MISS if missed else HIT
                (self.misses if missed else self.hits)[row, expert] += 1

    def start_request(self) -> None:
        """A new request: its counts start at zero (what the store holds stays)."""
        with self._lock:
            self.hits[:] = 0
            self.misses[:] = 0

    def snapshot(self) -> dict:
        """Per MoE layer and expert: held (0 no, 1 resident, 2 prefetched and unused, 3 loading),
        this request's hits and misses, and the latest step's choice (0 none, 1 hit, 2 miss)."""
        held = np.zeros((len(self.layers), self.n_expert), dtype=np.int8)
        if self.tiered is None or self.tiered.all_resident:
            held[:] = 1
        else:
            code = {"ready": 1, "prefetched": 2, "loading": 3}
            for (layer, expert), state in self.tiered.residency().items():
                row = self._row.get(layer)
                if row is not None:
                    held[row, expert] = code[state]
        with self._lock:
            hits, misses, last = self.hits.copy(), self.misses.copy(), self.last.copy()
        return {
            "layers": self.layers,
            "n_expert": self.n_expert,
            "held": held.tolist(),
            "hits": hits.tolist(),
            "misses": misses.tolist(),
            "last": last.tolist(),
            "step": self.step,
        }
