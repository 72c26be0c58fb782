"""Corrections to the lookahead predictor, learned online where its guess is poor.

The lookahead predictor (offload.predict) applies the router of the next MoE layer T to the
residual stream after layer S's attention. That works where the stream changes little
between the two; it fails where a layer rewrites it. On the demo model, layer 0 -> 1
guesses at chance (recall 0.31, chance 0.25: the embedding still dominates x after layer
0's attention and layer 0's MoE moves it far), while 1 -> 2 and 2 -> 3 reach 0.79 and 0.75.

What T's router will see is known once T runs, so every token (a prompt's, or decoding) is
a training example: z = rms(x_S) (the predictor's input) and y = rms(x_T) @ F_T (T's router logits,
F_T its router with ffn_norm folded in). A ridge regression learns the residual,

    logits(z) = z @ F_T + (z @ P) @ D,    D = argmin |Z P D - (Y - Z F_T)|^2 + lambda |D|^2

P a fixed projection onto FEATURES dimensions (the identity where n_embd is that small).
The correction folds into the matrix the predictor already multiplies by, F_T + P D, so a
learned pair costs a prediction nothing more.

One more pair guesses the next token's first MoE layer from the residual stream at the end
of this token (the source NEXT_TOKEN), where no plain guess exists: the next token is not
sampled yet, and the first layer's router on the last layer's stream recalls at chance (0.22
on the demo, chance 0.25). Learned, in the same demo run: 0.75 over the 63 tokens after it
recalled NEXT_TOKEN_MIN_RECALL. It is used only once a fit beats the plain guess and recalls
that much, and its reads start while the token is sampled and the next one's first attention
runs.

Which pairs: every one where a model has at most PAIRS; else, after SELECT_AFTER tokens,
the PAIRS distance-1 pairs whose plain guess has the lowest recall (their state is what
the memory plan counts). Per pair, the plain guess and one fit per lambda in LAMBDAS are
scored on each token before it is learned from (so on tokens none has seen), and the pair
predicts with the best moving-average recall: never worse than the plain guess by more than
that average's noise; a pair none of whose fits wins after RETIRE_AFTER tokens stops learning.
Tokens are learned from BATCH at a time, numpy's BLAS on one thread, within SHARE of the
time since learning began (a batch beyond it is dropped: learning slows, decoding does not). On the demo model
(tests/test_demo_model.py's 128 greedy tokens after a 64-token held-out prompt, minimum
budget) recall at distance 1 rose from 0.69 to 0.84 and precision from 0.48 to 0.61,
counting the tokens before the fits are in use.
"""

from __future__ import annotations

import time

import numpy as np
from threadpoolctl import ThreadpoolController

FEATURES = 256  # dimensions of z the correction reads (a random projection above that)
PAIRS = 4  # predictor pairs (S -> next MoE layer) that learn
SELECT_AFTER = 32  # tokens of plain guesses scored before choosing the pairs
BATCH = 16  # tokens a pair learns from at once; it refits after each batch (every 4th after
REFIT_SLOWER_AFTER = 256  # this many tokens)
RETIRE_AFTER = 256  # tokens after which a pair whose fits do not beat the plain guess stops learning
LAMBDAS = (1.0, 10.0, 100.0)  # ridge strengths tried, relative to 256 examples
SMOOTHING = 0.05  # weight of a token in the moving-average recalls
MIN_SCORED = 8  # tokens a fit is scored on before it may be used
CG_STEPS = 8  # conjugate-gradient steps of a refit after the first (a solve)
SHARE = 0.1  # of the time since learning began, the most it may spend (a batch over it is dropped)


def state_bytes(n_embd: int, n_expert: int, k: int) -> int:
    """What learning keeps, at most: PAIRS pairs' sums, fits, folded matrices and buffers, and P."""
    r = min(n_embd, FEATURES)
    per_pair = 4 * (r * r + r * n_expert * (1 + len(LAMBDAS)) + n_embd * n_expert) + BATCH * (8 * n_embd + 8 * k)
    return PAIRS * per_pair + (4 * n_embd * r if n_embd > FEATURES else 0)


_blas: ThreadpoolController | None = None


def _one_blas_thread():
    """A context in which numpy's BLAS runs on the calling thread only: its own thread team
    would fight the kernels' OpenMP team for the cores (measured on 2 cores: a batch's
    learning took 8 ms that way against 1 ms on one thread)."""
    global _blas
    if _blas is None:
        _blas = ThreadpoolController()
    return _blas.limit(limits=1, user_api="blas")


def _recalls(logits: np.ndarray, chosen: np.ndarray) -> np.ndarray:
    """Per row, the share of `chosen` (n, k) among the k largest logits (n, E)."""
    k = chosen.shape[1]
    top = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    return (top[:, :, None] == chosen[:, None, :]).any(axis=2).sum(axis=1) / k


def _conjugate_gradients(a: np.ndarray, b: np.ndarray, x: np.ndarray) -> np.ndarray:
    """CG_STEPS of conjugate gradients on a x = b (a symmetric positive definite), every
    column of b at once, from x."""
    r = b - a @ x
    p = r.copy()
    rs = np.einsum("ij,ij->j", r, r)
    for _ in range(CG_STEPS):
        ap = a @ p
        alpha = rs / np.maximum(np.einsum("ij,ij->j", p, ap), 1e-30)
        x = x + p * alpha
        r -= ap * alpha
        rs_new = np.einsum("ij,ij->j", r, r)
        p = r + p * (rs_new / np.maximum(rs, 1e-30))
        rs = rs_new
    return x


class _Pair:
    """Learning for one (source, target) pair. Tokens wait in a buffer of BATCH rows and are
    learned from a batch at a time (a few matrix products, not a dozen numpy calls a token):
    each batch is first scored with the fits as they were, so on tokens none has seen."""

    def __init__(self, folded: np.ndarray, proj: np.ndarray | None, k: int):
        n_embd, n_expert = folded.shape
        r = n_embd if proj is None else proj.shape[1]
        self.folded, self.proj = folded, proj
        self.gram = np.zeros((r, r), dtype=np.float32)  # sum of phi phi^T
        self.cross = np.zeros((r, n_expert), dtype=np.float32)  # sum of phi (y - z F)^T
        self.n = 0
        self.fits: list[np.ndarray | None] = [None] * len(LAMBDAS)
        self.recall = np.zeros(1 + len(LAMBDAS))  # moving averages: plain, then each lambda's fit
        self.scored = np.zeros(1 + len(LAMBDAS), dtype=np.int64)  # tokens each was scored on
        self.matrix: np.ndarray | None = None  # F + P D of the best fit, when it beats the plain guess
        self.best = 0
        self._z = np.zeros((BATCH, n_embd), dtype=np.float32)  # the source's rms(x), a row per token
        self._zt = np.zeros((BATCH, n_embd), dtype=np.float32)  # the target's
        self._chosen = np.zeros((BATCH, k), dtype=np.int64)
        self._rows = 0
        self.dropped = 0  # batches dropped to keep within SHARE

    def add(self, z: np.ndarray, z_target: np.ndarray, chosen: np.ndarray, afford: bool = True) -> None:
        """Tokens (rows): the source's and the target's rms(x), and the experts the target chose.
        A batch that fills while not `afford` is dropped unlearned."""
        done = 0
        while done < len(z):
            n = min(BATCH - self._rows, len(z) - done)
            rows, part = slice(self._rows, self._rows + n), slice(done, done + n)
            self._z[rows], self._zt[rows], self._chosen[rows] = z[part], z_target[part], chosen[part]
            self._rows, done = self._rows + n, done + n
            if self._rows == BATCH:
                if afford:
                    self._learn()
                else:
                    self.dropped += 1
                self._rows = 0

    def _learn(self) -> None:
        with _one_blas_thread():
            self._learn_batch()

    def _learn_batch(self) -> None:
        z, chosen = self._z, self._chosen
        phi = z if self.proj is None else z @ self.proj
        plain = z @ self.folded
        guesses = [plain] + [None if d is None else plain + phi @ d for d in self.fits]
        for i, logits in enumerate(guesses):
            if logits is None:
                continue
            for score in _recalls(logits, chosen):
                a = max(SMOOTHING, 1.0 / (self.scored[i] + 1))  # a plain mean at first
                self.recall[i] = (1 - a) * self.recall[i] + a * score
                self.scored[i] += 1
        self.gram += phi.T @ phi
        self.cross += phi.T @ (self._zt @ self.folded - plain)
        self.n += len(z)
        if self.n < REFIT_SLOWER_AFTER or self.n % (4 * BATCH) == 0:  # the fits settle: refit less
            self._refit()
        self._choose()

    @property
    def retired(self) -> bool:
        """Learned RETIRE_AFTER tokens, and no fit beats the plain guess."""
        return self.n >= RETIRE_AFTER and self.best == 0

    def _refit(self) -> None:
        """Each lambda's fit: solved the first time, then CG_STEPS of conjugate gradients from
        the last fit (the sums change by one batch: a few steps stay close to the solution, at
        a fraction of a solve's cost)."""
        eye = np.eye(len(self.gram), dtype=np.float32)
        for i, lam in enumerate(LAMBDAS):
            a = self.gram + np.float32(lam * self.n / 256.0) * eye
            d = self.fits[i]
            self.fits[i] = np.linalg.solve(a, self.cross) if d is None else _conjugate_gradients(a, self.cross, d)
        if self.best:  # the fit in use moved
            self.best = -1

    def _choose(self) -> None:
        ready = np.where(self.scored >= MIN_SCORED, self.recall, -1.0)
        ready[0] = self.recall[0]
        best = int(np.argmax(ready))
        if best == self.best:
            return
        self.best = best
        if best == 0:
            self.matrix = None
            return
        d = self.fits[best - 1]
        corr = d if self.proj is None else self.proj @ d
        self.matrix = np.ascontiguousarray(self.folded + corr, dtype=np.float32)


NEXT_TOKEN = -1  # the source of the pair that guesses the next token's first MoE layer
# its guesses are read only where they recall this much (its moving average): a guess a
# little above chance (a random-weight model's next token: 0.17, chance 0.06) read 1.7-2.8
# MiB a token for nothing; the demo's reaches 0.67
NEXT_TOKEN_MIN_RECALL = 0.4


class LookaheadLearning:
    """Learned corrections for a lookahead predictor's distance-1 pairs (see the module docstring).
    `pairs`: source MoE layer -> the next MoE layer, and NEXT_TOKEN -> the first MoE layer
    (the source then is the residual stream at the end of the previous token: saw(NEXT_TOKEN,
    z) after the last layer); `folded`: target -> F_T, (n_embd, E)."""

    def __init__(self, pairs: dict[int, int], folded: dict[int, np.ndarray], k: int, seed: int = 0):
        self.pairs, self.folded, self.k = dict(pairs), folded, k
        n_embd = next(iter(folded.values())).shape[0] if folded else 0
        self.proj = None
        if n_embd > FEATURES:  # a fixed random projection, scaled to keep |z P| ~ |z|
            rng = np.random.default_rng(seed)
            self.proj = (rng.standard_normal((n_embd, FEATURES)) / np.sqrt(FEATURES)).astype(np.float32)
        self._z: dict[int, np.ndarray] = {}  # this token's rms(x) per layer
        self._first = min([s for s in self.pairs if s != NEXT_TOKEN] + list(self.pairs.values()), default=-2)
        self._end: np.ndarray | None = None  # saw(NEXT_TOKEN): the end of this token, for the next one
        self._source = {t: s for s, t in self.pairs.items()}
        self._plain = {s: 0.0 for s in self.pairs}  # summed recall of the plain guess, while selecting
        self.tokens = 0  # seen by the first pair
        self.learning: dict[int, _Pair] = {}  # source -> its pair, once selected
        self.retired: dict[int, float] = {}  # source -> the plain recall of a pair that stopped learning
        self._began: float | None = None  # when the first pair began learning
        self._spent = 0.0  # seconds spent learning since
        self._wanted: set[int] | None = None  # layers whose rms(x) learning needs (None: all, while choosing)
        if len(self.pairs) <= PAIRS:  # no choice to make: every pair learns from the first token
            self._select()

    def matrix(self, source: int) -> np.ndarray | None:
        """The corrected matrix for source's target, where a fit beats the plain guess (for the
        next token: and recalls at least NEXT_TOKEN_MIN_RECALL); else None."""
        pair = self.learning.get(source)
        if pair is None or pair.matrix is None:
            return None
        if source == NEXT_TOKEN and pair.recall[pair.best] < NEXT_TOKEN_MIN_RECALL:
            return None
        return pair.matrix

    def forget_token(self) -> None:
        """A token runs without predictions (the prefetch gate's off mode): what saw() kept of
        the last one must not pair with this one's routing."""
        self._z.clear()
        self._end = None

    def wants(self, layer: int) -> bool:
        """Whether saw() needs `layer`'s rms(x): while choosing, every layer's; then the learning pairs'."""
        return layer in self._wanted if self._wanted is not None else layer in self.pairs or layer in self._source

    def saw(self, layer: int, z: np.ndarray) -> None:
        """rms(x) after `layer`'s attention, a row per token (float32, (n, n_embd))."""
        if layer == NEXT_TOKEN:  # the end of a token: its pair's target is the next token's
            self._end = z
            return
        if layer == self._first:  # new tokens (a token run without predictions leaves no state)
            self._z.clear()
            if self._end is not None:
                self._z[NEXT_TOKEN], self._end = self._end, None
            if self.tokens >= SELECT_AFTER and not self.learning:
                self._select()
        self._z[layer] = z

    def routed(self, target: int, chosen: np.ndarray) -> None:
        """`target` chose these experts for the token whose rms(x) saw() was given."""
        source = self._source.get(target)
        if source is None or source not in self._z or target not in self._z:
            return
        z, chosen = self._z[source], np.atleast_2d(chosen)
        if len(z) != len(chosen) or len(self._z[target]) != len(chosen):
            return  # rows dropped on the way (a prompt's last layer keeps its last row only)
        pair = self.learning.get(source)
        if pair is not None:
            t0 = time.perf_counter()
            if self._began is None:
                self._began = t0
            pair.add(z, self._z[target], chosen, afford=self._spent <= SHARE * (t0 - self._began))
            self._spent += time.perf_counter() - t0
            if pair.retired:  # no fit beat the plain guess: stop paying for it
                self._retire(source)
        elif self.tokens < SELECT_AFTER:
            self._plain[source] += _recalls(z @ self.folded[target], chosen).sum()
        if source == self._first:
            self.tokens += len(chosen)

    def _select(self) -> None:
        worst = sorted(self._plain, key=self._plain.get)[:PAIRS]
        self.learning = {s: _Pair(self.folded[self.pairs[s]], self.proj, self.k) for s in worst}
        self._update_wanted()

    def _retire(self, source: int) -> None:
        self.retired[source] = self.learning.pop(source).recall[0]
        self._update_wanted()

    def _update_wanted(self) -> None:
        self._wanted = set(self.learning) | {self.pairs[s] for s in self.learning} | {self._first}

    def stats(self) -> dict:
        def name(s: int) -> str:
            return f"lookahead_learned_{'next_token' if s == NEXT_TOKEN else s}_to_{self.pairs[s]}"

        out = {name(s): {
                   "recall_plain": float(p.recall[0]), "recall_best": float(p.recall.max()),
                   "using": "plain" if p.matrix is None else f"lambda {LAMBDAS[p.best - 1]:g}", "tokens": p.n,
                   "batches_dropped": p.dropped}
               for s, p in self.learning.items()}
        for s, plain in self.retired.items():
            out[name(s)] = {"recall_plain": float(plain), "using": "plain (retired)"}
        return out
