"""Choosing the next token from logits, in llama.cpp's order and with its defaults.

Chain: penalties -> top-k -> top-p -> min-p -> temperature -> draw.
temperature <= 0 means greedy (argmax) after the penalties, which ignores the rest.

The penalties are llama.cpp's (llama_sampler_penalties) over the last repeat_last_n tokens
(the prompt's too, as llama-server feeds them): a token seen there has its logit divided by
repeat_penalty (multiplied when it is <= 0), then lowered by count * frequency_penalty +
presence_penalty (OpenAI's presence and frequency penalties, which llama.cpp maps the same).
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
    presence_penalty: float = 0.0  # 0.0: off
    frequency_penalty: float = 0.0  # 0.0: off

    @property
    def penalizes(self) -> bool:
        return self.repeat_last_n != 0 and (self.repeat_penalty != 1.0 or self.presence_penalty != 0.0
                                            or self.frequency_penalty != 0.0)


class Sampler:
    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)
        self.recent: deque[int] = deque(maxlen=max(params.repeat_last_n, 0))

    def accept(self, token: int) -> None:
        """Remember a token (prompt or generated) for the penalties."""
        if self.recent.maxlen:
            self.recent.append(token)

    def sample(self, logits: np.ndarray) -> int:
        p = self.params
        logits = np.asarray(logits, dtype=np.float32)
        if p.penalizes and self.recent:
            logits = self.penalized(logits)
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

    def penalized(self, logits: np.ndarray) -> np.ndarray:
        """The logits after llama.cpp's penalties for the tokens remembered (float32, as its sampler)."""
        p = self.params
        logits = np.array(logits, dtype=np.float32)
        seen, counts = np.unique(np.fromiter(self.recent, dtype=np.int64, count=len(self.recent)), return_counts=True)
        seen, counts = seen[(seen >= 0) & (seen < len(logits))], counts[(seen >= 0) & (seen < len(logits))]
        vals = logits[seen]
        if p.repeat_penalty != 1.0:
            vals = np.where(vals <= 0, vals * np.float32(p.repeat_penalty), vals / np.float32(p.repeat_penalty))
        if p.frequency_penalty or p.presence_penalty:
            vals = vals - (counts.astype(np.float32) * np.float32(p.frequency_penalty) + np.float32(p.presence_penalty))
        logits[seen] = vals
        return logits

