"""Choosing the next token from logits, in llama.cpp's order and with its defaults.

Chain: repeat penalty -> top-k -> top-p -> min-p -> temperature -> draw.
temperature <= 0 means greedy (argmax), which ignores the rest.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8
    top_k: int = 40  # 0: off
    top_p: float = 0.95  # 1.0: off
    min_p: float = 0.05  # 0.0: off
    repeat_penalty: float = 1.0  # 1.0: off
    repeat_last_n: int = 64
    seed: int | None = None


class Sampler:
    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)
        self.recent: deque[int] = deque(maxlen=max(params.repeat_last_n, 0))

    def accept(self, token: int) -> None:
        """Remember a token (prompt or generated) for the repeat penalty."""
        if self.recent.maxlen:
            self.recent.append(token)

    def sample(self, logits: np.ndarray) -> int:
        p = self.params
        logits = np.asarray(logits, dtype=np.float32)
        if p.repeat_penalty != 1.0 and self.recent:
            logits = logits.copy()
            seen = np.fromiter(set(self.recent), dtype=np.int64)
            vals = logits[seen]
            logits[seen] = np.where(vals > 0, vals / p.repeat_penalty, vals * p.repeat_penalty)
        if p.temperature <= 0:
            return int(np.argmax(logits))

        # Candidates sorted by logit, best first; each filter keeps a prefix.
        order = np.argsort(-logits, kind="stable")
        if p.top_k > 0:
            order = order[: p.top_k]
        cand = logits[order].astype(np.float64)
        probs = np.exp(cand - cand[0])
        probs /= probs.sum()
        if p.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(probs), p.top_p)) + 1
            order, cand, probs = order[:keep], cand[:keep], probs[:keep]
        if p.min_p > 0.0:
            keep = max(1, int(np.sum(probs >= p.min_p * probs[0])))
            order, cand = order[:keep], cand[:keep]

        scaled = cand / p.temperature
        probs = np.exp(scaled - scaled[0])
        probs /= probs.sum()
        return int(order[self.rng.choice(len(order), p=probs)])
