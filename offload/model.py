"""`offload.Model`: load a GGUF MoE model, tokenize, get logits, generate text."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from . import arch
from .errors import ContextOverflowError, OffloadError
from .forward import Transformer
from .gguf_file import GGUFFile
from .sampling import Sampler, SamplingParams
from .tokenizer import StreamDecoder, Tokenizer
from .weights import ResidentExperts, load_weights

DEFAULT_N_CTX = 4096


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    generated_tokens: int = 0
    generate_seconds: float = 0.0
    stop_reason: str = ""  # "eos", "length", "context"

    @property
    def prompt_tok_s(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds else 0.0

    @property
    def decode_tok_s(self) -> float:
        return self.generated_tokens / self.generate_seconds if self.generate_seconds else 0.0


@dataclass
class Model:
    """A loaded model. Build it with `Model.load(path)`."""

    path: str
    gguf: GGUFFile
    args: arch.ModelArgs
    transformer: Transformer
    tokenizer: Tokenizer
    n_ctx: int
    last_generation: GenerationStats = field(default_factory=GenerationStats)

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, n_ctx: int | None = None, n_threads: int | None = None) -> "Model":
        """Open `path`; `n_ctx` defaults to min(training context, 4096), `n_threads` to all cores."""
        gguf = GGUFFile(path)
        args = arch.model_args(gguf)
        if n_ctx is None or n_ctx <= 0:
            n_ctx = min(args.n_ctx_train, DEFAULT_N_CTX)
        if n_threads is not None:
            set_threads(n_threads)
        weights = load_weights(gguf, args)
        transformer = Transformer(args, weights, ResidentExperts(gguf, args), n_ctx)
        return cls(str(path), gguf, args, transformer, Tokenizer(path), n_ctx)

    # -- text <-> tokens ---------------------------------------------------------------
    def tokenize(self, text: str, add_bos: bool = True, special: bool = False) -> list[int]:
        """Token ids; with `add_bos`, BOS is added when the model's metadata asks for it."""
        return self.tokenizer.encode(text, add_special=add_bos, parse_special=special)

    def detokenize(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    # -- compute -------------------------------------------------------------------------
    def logits(self, tokens: list[int]) -> np.ndarray:
        """Logits (len(tokens), n_vocab) float32 of every position, in a fresh context."""
        ids = self._check_tokens(tokens)
        self.transformer.reset()
        return self.transformer.forward(ids, all_logits=True)

    def generate(
        self,
        prompt: str | list[int],
        max_tokens: int = 128,
        temperature: float = 0.8,
        top_k: int = 40,
        top_p: float = 0.95,
        min_p: float = 0.05,
        repeat_penalty: float = 1.0,
        seed: int | None = None,
    ) -> Iterator[str]:
        """Stream the continuation of `prompt` as text pieces (whole UTF-8 characters)."""
        params = SamplingParams(temperature, top_k, top_p, min_p, repeat_penalty, seed=seed)
        decoder = StreamDecoder(self.tokenizer)
        for token in self.generate_tokens(prompt, max_tokens, params):
            text = decoder.push(token)
            if text:
                yield text
        tail = decoder.flush()
        if tail:
            yield tail

    def generate_tokens(self, prompt: str | list[int], max_tokens: int, params: SamplingParams) -> Iterator[int]:
        """Token ids of the continuation; stops at end-of-generation, max_tokens or a full context."""
        ids = self._check_tokens(self.tokenize(prompt) if isinstance(prompt, str) else prompt)
        stats = self.last_generation = GenerationStats(prompt_tokens=len(ids))
        sampler = Sampler(params)
        for t in ids:
            sampler.accept(t)
        self.transformer.reset()
        t0 = time.perf_counter()
        logits = self.transformer.forward(ids)[-1]
        stats.prompt_seconds = time.perf_counter() - t0
        stats.stop_reason = "length"
        t0 = time.perf_counter()
        for i in range(max_tokens):
            token = sampler.sample(logits)
            if self.tokenizer.is_end_of_generation(token):
                stats.stop_reason = "eos"
                break
            sampler.accept(token)
            stats.generated_tokens += 1
            yield token
            if i + 1 == max_tokens:
                break
            if self.transformer.cache.n_past >= self.n_ctx:
                stats.stop_reason = "context"
                break
            logits = self.transformer.forward(np.array([token]))[-1]
        stats.generate_seconds = time.perf_counter() - t0

    def stats(self) -> dict:
        g = self.last_generation
        return {
            "prompt_tokens": g.prompt_tokens,
            "prompt_tok_s": g.prompt_tok_s,
            "generated_tokens": g.generated_tokens,
            "decode_tok_s": g.decode_tok_s,
            "stop_reason": g.stop_reason,
            "kv_cache_bytes": self.transformer.cache.nbytes,
        }

    def _check_tokens(self, tokens: list[int]) -> np.ndarray:
        ids = np.asarray(tokens, dtype=np.int64)
        if ids.ndim != 1 or len(ids) == 0:
            raise OffloadError("need at least one token")
        if len(ids) > self.n_ctx:
            raise ContextOverflowError(f"the prompt has {len(ids)} tokens, more than the context of {self.n_ctx} (raise -c / n_ctx)")
        bad = ids[(ids < 0) | (ids >= self.args.n_vocab)]
        if len(bad):
            raise OffloadError(f"token id {int(bad[0])} is outside the vocabulary of {self.args.n_vocab}")
        return ids

    # -- lifetime ------------------------------------------------------------------------
    def close(self) -> None:
        self.tokenizer.close()
        self.gguf.close()

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def set_threads(n: int) -> None:
    """Threads for every kernel, Numba's and the C extension's (OpenMP)."""
    import numba

    from .kernels import cext

    available = numba.config.NUMBA_NUM_THREADS
    if not 1 <= n <= available:
        raise OffloadError(f"thread count {n} is outside 1..{available}")
    numba.set_num_threads(n)
    cext.set_num_threads(n)
