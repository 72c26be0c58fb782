"""Which position each KV cache cell holds, once a context shift has moved them (llama.cpp's
llama_kv_cells and the parts of llama_kv_cache that place tokens: find_slot, apply_ubatch,
seq_rm, seq_add), for one sequence.

Until a shift, offload needs none of this: a full-attention layer keeps position p in cell
p, a sliding-window layer in cell p % n_cells (its ring), and forward.KVCache computes that.
A context shift (llama.cpp's --context-shift) drops a range of positions and moves the later
ones down, without moving their rows: the cells keep their place and get new positions, the
freed cells take the next tokens, and attention sums over cells in cell order with a mask by
position. To give llama.cpp's sums to the bit, offload places tokens in the cells llama.cpp
picks, which `Cells` reproduces step by step.
"""

from __future__ import annotations

import numpy as np

from .errors import ContextOverflowError


class Cells:
    """The positions of one cache's cells (-1: empty) and the shift each has been moved by
    since its keys were last rotated; `head`, where llama.cpp's search for free cells starts;
    `window`: a sliding-window cache's (0: none), whose cells out of the window are reused."""

    def __init__(self, n_cells: int, window: int = 0) -> None:
        self.pos = np.full(n_cells, -1, dtype=np.int32)
        self.shift = np.zeros(n_cells, dtype=np.int32)
        self.head = 0
        self.window = window
        self.has_shift = False

    @classmethod
    def filled(cls, n_cells: int, window: int, n_past: int) -> "Cells":
        """The cells as positions 0 .. n_past-1 written in order from an empty cache leave them:
        position p in cell p % n_cells, the head after the last one."""
        cells = cls(n_cells, window)
        if n_past:
            c = np.arange(n_cells)
            cells.pos[:] = np.where(c < n_past, c, -1) if n_past <= n_cells else (n_past - 1) - ((n_past - 1) - c) % n_cells
            cells.head = (n_past - 1) % n_cells + 1
        return cells

    @property
    def n_used(self) -> int:
        """The last used cell + 1 (used_max_p1): attention visits cells 0 .. n_used-1."""
        used = np.flatnonzero(self.pos >= 0)
        return int(used[-1]) + 1 if len(used) else 0

    def positions(self) -> set[int]:
        return set(self.pos[self.pos >= 0].tolist())

    def find_slot(self, n: int) -> np.ndarray:
        """The cells the next n tokens go to (find_slot, not contiguous): the first usable cells
        from the head on, wrapping around; usable: empty, or out of a sliding window."""
        size = len(self.pos)
        head = self.head
        used = int((self.pos >= 0).sum())
        if head > used + 2 * n:  # enough free cells before the head: search from the start
            head = 0
        order = np.concatenate([np.arange(head, size), np.arange(0, head)])
        usable = self.pos < 0
        if self.window and used:
            seq_end = int(self.pos.max()) + 1
            usable |= (self.pos >= 0) & (seq_end - self.pos >= self.window)
        picked = order[usable[order]][:n]
        if len(picked) < n:
            raise ContextOverflowError(f"no free KV cells for {n} tokens (the cache has {size})")
        return picked

    def apply(self, cells: np.ndarray, positions: np.ndarray) -> None:
        """Write positions into the cells find_slot picked (apply_ubatch): reused cells are
        cleared first, and every position up to the largest one overwritten is dropped (the
        sequence stays contiguous), then the head moves past the last cell."""
        old = self.pos[cells]
        overwritten = int(old.max()) if (old >= 0).any() else -1
        self.shift[cells[old >= 0]] = 0
        self.pos[cells] = positions
        if overwritten >= 0:
            first = int(self.pos[self.pos >= 0].min())
            if first <= overwritten:
                self.seq_rm(first, overwritten + 1)
        self.head = int(cells[-1]) + 1

    def seq_rm(self, p0: int, p1: int) -> None:
        """Empty the cells holding positions p0 .. p1-1 (p1 < 0: all after p0); the head moves
        back to the first one freed if that is before it."""
        p1 = np.iinfo(np.int32).max if p1 < 0 else p1
        freed = np.flatnonzero((self.pos >= max(p0, 0)) & (self.pos < p1))
        if len(freed):
            self.pos[freed] = -1
            self.shift[freed] = 0
            self.head = min(self.head, int(freed[0]))

    def seq_add(self, p0: int, p1: int, delta: int) -> None:
        """Move the positions p0 .. p1-1 by delta (their keys to be rotated before the next step);
        a position moved below 0 empties its cell. The head goes to the first cell so emptied,
        else to the start."""
        if delta == 0 or p0 == p1:
            return
        moved = np.flatnonzero((self.pos >= max(p0, 0)) & (self.pos < p1))
        self.pos[moved] += delta
        self.shift[moved] += delta
        self.has_shift |= len(moved) > 0
        gone = moved[self.pos[moved] < 0]
        self.pos[gone] = -1
        self.shift[gone] = 0
        self.head = int(gone[0]) if len(gone) else 0

    def reset_shift(self) -> None:
        self.shift[:] = 0
        self.has_shift = False
