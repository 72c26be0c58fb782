"""Cache policies: which unpinned expert slot to give up when a new expert needs one.

A policy sees every access, insertion and eviction of its pool's keys ((layer, expert))
and, on a miss, picks the victim among the evictable keys. Victim choice scans the
candidates: pools hold at most thousands of slots, and a miss costs a disk read anyway.

    lru    least recently used
    lfu    least frequently used; counts survive eviction (routing frequencies are stable
           properties of a model, so history is what tells a hot expert from a cold one)
    lrfu   frequency with recency: each key's score decays by half every `half_life`
           accesses of its pool and gains 1 per access; the lowest score goes (LRFU)
"""

from __future__ import annotations

import math
from typing import Hashable, Iterable

Key = Hashable


class Policy:
    name = "base"

    def access(self, key: Key) -> None: ...

    def insert(self, key: Key) -> None:
        self.access(key)

    def remove(self, key: Key) -> None: ...

    def victim(self, candidates: Iterable[Key]) -> Key:
        raise NotImplementedError


class LRU(Policy):
    name = "lru"

    def __init__(self, **_):
        self._tick = 0
        self._last: dict[Key, int] = {}

    def access(self, key: Key) -> None:
        self._tick += 1
        self._last[key] = self._tick

    def remove(self, key: Key) -> None:
        self._last.pop(key, None)

    def victim(self, candidates: Iterable[Key]) -> Key:
        return min(candidates, key=lambda k: self._last.get(k, 0))


class LFU(Policy):
    """Ties go to the least recently used."""

    name = "lfu"

    def __init__(self, **_):
        self._tick = 0
        self._count: dict[Key, int] = {}
        self._last: dict[Key, int] = {}

    def access(self, key: Key) -> None:
        self._tick += 1
        self._count[key] = self._count.get(key, 0) + 1
        self._last[key] = self._tick

    def victim(self, candidates: Iterable[Key]) -> Key:
        return min(candidates, key=lambda k: (self._count.get(k, 0), self._last.get(k, 0)))


class LRFU(Policy):
    """score(k) = sum over past accesses of 2^(-(now - t) / half_life); kept as (score, t_last)."""

    name = "lrfu"

    def __init__(self, half_life: float = 256.0, **_):
        self._tick = 0
        self._decay = math.log(2) / max(half_life, 1e-9)
        self._score: dict[Key, tuple[float, int]] = {}

    def _now(self, key: Key) -> float:
        s, t = self._score.get(key, (0.0, self._tick))
        return s * math.exp(-self._decay * (self._tick - t))

    def access(self, key: Key) -> None:
        self._tick += 1
        self._score[key] = (self._now(key) + 1.0, self._tick)

    def victim(self, candidates: Iterable[Key]) -> Key:
        return min(candidates, key=self._now)


POLICIES = {p.name: p for p in (LRU, LFU, LRFU)}


def make_policy(name: str, **kwargs) -> Policy:
    from ..errors import OffloadError

    try:
        return POLICIES[name.lower()](**kwargs)
    except KeyError:
        raise OffloadError(f"cache policy {name!r} is not one of {', '.join(POLICIES)}") from None
