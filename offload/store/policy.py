"""Cache policies: which unpinned expert slot to give up when a new expert needs one.

A policy sees every access, insertion and eviction of its pool's keys ((layer, expert))
and, on a miss, picks the victim: the cheapest key to lose that the store says may go.

    lru    least recently used
    lfu    least frequently used; counts survive eviction (routing frequencies are stable
           properties of a model, so history is what tells a hot expert from a cold one)
    lrfu   frequency with recency: each key's score decays by half every `half_life`
           accesses of its pool and gains 1 per access; the lowest score goes (LRFU)

Each policy gives its keys a priority that does not change while the key is not accessed
(for LRFU: log(score) + decay * t_last, which orders keys as their decayed scores do), so
the keys sit in a heap and a victim costs O(log n), not a scan of the pool: a pool can
hold thousands of slots, and the pick runs on every miss, under the store's lock.
"""

from __future__ import annotations

import heapq
import itertools
import math
from typing import Callable, Hashable, Iterable

Key = Hashable


class Policy:
    name = "base"

    def __init__(self, **_) -> None:
        self._tick = 0
        self._prio: dict[Key, tuple] = {}  # current priority of every resident key
        self._heap: list[tuple] = []  # (priority, seq, key), stale entries skipped lazily
        self._seq = itertools.count()

    def _priority(self, key: Key) -> tuple:
        raise NotImplementedError

    def _touched(self, key: Key) -> None:
        """Record an access in the policy's own state (counts, scores)."""

    def access(self, key: Key) -> None:
        self._tick += 1
        self._touched(key)
        entry = (self._priority(key), next(self._seq), key)
        self._prio[key] = entry[:2]
        heapq.heappush(self._heap, entry)
        if len(self._heap) > 4 * len(self._prio) + 64:  # drop the stale entries
            self._heap = [(p, s, k) for k, (p, s) in self._prio.items()]
            heapq.heapify(self._heap)

    def insert(self, key: Key) -> None:
        self.access(key)

    def remove(self, key: Key) -> None:
        self._prio.pop(key, None)

    def pick(self, evictable: Callable[[Key], bool]) -> Key | None:
        """The lowest-priority resident key for which evictable(key) holds, or None."""
        skipped = []
        found = None
        while self._heap:
            p, s, key = heapq.heappop(self._heap)
            if self._prio.get(key) != (p, s):
                continue  # stale: accessed again since, or removed
            skipped.append((p, s, key))
            if evictable(key):
                found = key
                break
        for entry in skipped:  # the victim's entry too: it stays until remove()
            heapq.heappush(self._heap, entry)
        return found

    def victim(self, candidates: Iterable[Key]) -> Key:
        """The key among `candidates` to evict (keys never accessed go first)."""
        candidates = list(candidates)
        for key in candidates:
            if key not in self._prio:
                return key
        wanted = set(candidates)
        return self.pick(wanted.__contains__)


class LRU(Policy):
    name = "lru"

    def _priority(self, key: Key) -> tuple:
        return (self._tick,)


class LFU(Policy):
    """Ties go to the least recently used."""

    name = "lfu"

    def __init__(self, **_):
        super().__init__()
        self._count: dict[Key, int] = {}

    def _touched(self, key: Key) -> None:
        self._count[key] = self._count.get(key, 0) + 1

    def _priority(self, key: Key) -> tuple:
        return (self._count[key], self._tick)


class LRFU(Policy):
    """score(k) = sum over past accesses of 2^(-(now - t) / half_life); kept as (score, t_last)."""

    name = "lrfu"

    def __init__(self, half_life: float = 256.0, **_):
        super().__init__()
        self._decay = math.log(2) / max(half_life, 1e-9)
        self._score: dict[Key, tuple[float, int]] = {}

    def _touched(self, key: Key) -> None:
        s, t = self._score.get(key, (0.0, self._tick))
        self._score[key] = (s * math.exp(-self._decay * (self._tick - t)) + 1.0, self._tick)

    def _priority(self, key: Key) -> tuple:
        # s * exp(-decay * (now - t)) orders as log(s) + decay * t, which does not change with now
        s, t = self._score[key]
        return (math.log(s) + self._decay * t,)


POLICIES = {p.name: p for p in (LRU, LFU, LRFU)}


def make_policy(name: str, **kwargs) -> Policy:
    from ..errors import OffloadError

    try:
        return POLICIES[name.lower()](**kwargs)
    except KeyError:
        raise OffloadError(f"cache policy {name!r} is not one of {', '.join(POLICIES)}") from None
