"""Prefetch only while it pays, as measured on this machine, this model and this budget.

A prediction read ahead saves a layer's wait when it is right and arrives in time; when it
is wrong it costs a read of the disk that the layers' own reads then wait behind, and it
evicts an expert that may be wanted. Which wins depends on the disk, the compute time per
layer, the predictor's precision and how much of the model the budget holds: issue 20's
runs saw prefetch give +40% at the minimum budget and cost 10-13% at 25-75% budgets.
No static rule tells these apart, so the gate measures them: decoding tokens run in windows
of WINDOW tokens, each window with prefetching on or off, and it keeps a moving average of
a token's seconds in each mode. After both modes are measured (twice each, alternating,
so neither gets all of the cold start) the faster one runs, and the slower one gets one
window in every EXPLORE_EVERY to notice when that changes (a budget filling up, another
prompt's routing, a disk that got busy).

Switching never changes results: prefetching only moves when bytes are read.
"""

from __future__ import annotations

import time


class PrefetchGate:
    WINDOW = 8  # decoding tokens per measurement
    FIRST_WINDOWS = 4  # after a warm-up window: on, off, on, off
    EXPLORE_EVERY = 8  # windows of the faster mode per window of the slower one
    SMOOTHING = 0.3  # weight of a new window in the moving averages

    def __init__(self, adaptive: bool = True):
        self.adaptive = adaptive
        self.on = True
        self.seconds: dict[bool, float] = {}  # mode -> moving average of a decoding token's seconds
        self.tokens = {True: 0, False: 0}  # decoding tokens run in each mode
        self._windows = 0  # windows completed (the warm-up one included)
        self._since_explore = 0
        self._in_window = 0
        self._window_seconds = 0.0
        self._t0 = 0.0

    def start_token(self) -> None:
        self._t0 = time.perf_counter()

    def end_token(self) -> None:
        """A decoding token ran in the current mode: count it, and at a window's end pick the next mode."""
        self.tokens[self.on] += 1
        if not self.adaptive:
            return
        self._window_seconds += time.perf_counter() - self._t0
        self._in_window += 1
        if self._in_window < self.WINDOW:
            return
        per_token = self._window_seconds / self._in_window
        self._in_window, self._window_seconds = 0, 0.0
        self._windows += 1
        if self._windows > 1:  # the first window fills the slots from cold: it says little of either mode
            before = self.seconds.get(self.on)
            a = self.SMOOTHING
            self.seconds[self.on] = per_token if before is None else (1 - a) * before + a * per_token
        self.on = self._next_mode()

    def _next_mode(self) -> bool:
        if self._windows <= self.FIRST_WINDOWS:
            return self._windows % 2 == 1  # window 1 on (warm-up), 2 on, 3 off, 4 on, 5 off
        faster = self.seconds.get(True, 0.0) <= self.seconds.get(False, 0.0)
        self._since_explore += 1
        if self._since_explore > self.EXPLORE_EVERY:
            self._since_explore = 0
            return not faster
        return faster

    def stats(self) -> dict:
        out = {"prefetch_on_tokens": self.tokens[True], "prefetch_off_tokens": self.tokens[False],
               "prefetch_adaptive": self.adaptive}
        for mode, name in ((True, "on"), (False, "off")):
            if mode in self.seconds:
                out[f"prefetch_{name}_seconds_per_token"] = self.seconds[mode]
        return out
