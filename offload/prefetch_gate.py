"""Prefetch only while it pays, as measured on this machine, this model and this budget.

A prediction read ahead saves a layer's wait when it is right and arrives in time; when it
is wrong it costs a read of the disk that the layers' own reads then wait behind, and it
evicts an expert that may be wanted. Which wins depends on the disk, the compute time per
layer, the predictor's precision and how much of the model the budget holds: issue 20's
runs saw prefetch give +40% at the minimum budget and cost 5-15% at 25-75% budgets. No
static rule tells these apart, so the gate measures them: decoding tokens run in windows of
WINDOW tokens, each window with prefetching on or off.

A token's time drifts while the expert slots fill (the first windows of a generation can
take twice as long as the later ones), so windows are compared in orders that cancel a
steady drift: after a warm-up window, on, off, off, on (two comparisons: each off window
against the on window beside it); later, every EXPLORE_EVERY windows one window runs in the
mode not chosen and is compared with the mean of the windows just before and just after it.
Prefetching runs while the mean of the last RECENT comparisons (seconds a token saves) is
above its standard error: a saving within the noise of the measurements is not worth the
reads, and machines like this one vary by 20% from minute to minute.

Switching never changes results: prefetching only moves when bytes are read.
"""

from __future__ import annotations

import time


class PrefetchGate:
    WINDOW = 8  # decoding tokens per measurement
    FIRST = (True, False, False, True)  # the modes of the first compared windows (after the warm-up one)
    EXPLORE_EVERY = 8  # windows in the chosen mode per window in the other
    RECENT = 8  # comparisons the decision weighs (older ones describe another state of the slots)

    def __init__(self, adaptive: bool = True):
        self.adaptive = adaptive
        self.on = True
        self.advantage: float | None = None  # seconds a token saves with prefetching (mean of the recent comparisons)
        self._saved: list[float] = []  # the recent comparisons
        self.seconds: dict[bool, float] = {}  # mode -> its last window's seconds per token (for display)
        self.tokens = {True: 0, False: 0}  # decoding tokens run in each mode
        self._windows = 0  # windows completed (the warm-up one included)
        self._history: list[tuple[bool, float]] = []  # (mode, seconds per token) of the compared windows
        self._since_explore = 0
        self._explored = -1  # the compared-window number of the last explored window
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
            self.seconds[self.on] = per_token
            self._history = (self._history + [(self.on, per_token)])[-len(self.FIRST):]
        self.on = self._next_mode()

    def _next_mode(self) -> bool:
        n = self._windows - 1  # compared windows so far
        if n < len(self.FIRST):
            return self.FIRST[n]
        if n == len(self.FIRST):  # on, off, off, on: a steady drift cancels out of the pairs' mean
            (_, on1), (_, off1), (_, off2), (_, on2) = self._history
            self._learn(off1 - on1)
            self._learn(off2 - on2)
        elif self._explored == n - 1:  # the explored window, and the one after it, are done
            (m0, s0), (m1, s1), (m2, s2) = self._history[-3:]
            if m1 != m0 and m2 == m0:  # the chosen mode on both sides of it
                other = s1 - (s0 + s2) / 2  # seconds the other mode costs more
                self._learn(other if m1 is False else -other)
        chosen = self._pays()
        self._since_explore += 1
        if self._since_explore > self.EXPLORE_EVERY:
            self._since_explore = 0
            self._explored = n + 1  # the window about to run
            return not chosen
        return chosen

    def _learn(self, saved: float) -> None:
        """One comparison: seconds a token saved with prefetching (negative: it cost)."""
        self._saved = (self._saved + [saved])[-self.RECENT:]
        self.advantage = sum(self._saved) / len(self._saved)

    def _pays(self) -> bool:
        """Whether the recent comparisons say prefetching saves time by more than their standard
        error: a saving within the noise of the measurements is not worth its reads."""
        n = len(self._saved)
        if n < 2:
            return True  # not compared yet
        mean = self.advantage
        var = sum((x - mean) ** 2 for x in self._saved) / (n - 1)
        return mean > (var / n) ** 0.5

    def stats(self) -> dict:
        out = {"prefetch_on_tokens": self.tokens[True], "prefetch_off_tokens": self.tokens[False],
               "prefetch_adaptive": self.adaptive}
        if self.advantage is not None:
            out["prefetch_saves_seconds_per_token"] = self.advantage
        for mode, name in ((True, "on"), (False, "off")):
            if mode in self.seconds:
                out[f"prefetch_{name}_seconds_per_token"] = self.seconds[mode]
        return out
