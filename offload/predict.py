"""Expert prediction: which routed experts the next layers will pick, known early enough to
read them from disk while the current layer computes.

The residual stream changes slowly from layer to layer, so the router of layer L+d applied
to the residual stream of layer L (after its attention) mostly picks what layer L+d will
pick. A predictor turns that (or anything else it knows) into predictions

    predict(layer, x) -> [Prediction(target_layer, experts, confidence), ...]

for the next MoE layers up to its depth, experts most likely first; `observe(layer,
chosen)` shows it each real routing decision as it happens (to learn from, or to ignore).

    lookahead   router of L+d on rms_norm(x_L, ffn_norm of L+d): top-k plus a margin of
                extra experts whose probability comes close to the k-th one (at depth 1,
                corrected online where that guess is poor: offload.lookahead_learning)
    transition  P(expert e' at the next MoE layer | e at this one), counted online from the
                routing as it happens (or fitted on a recorded trace), chained for d > 1
    combined    lookahead's probabilities mixed with transition's

Predictions never change results: the forward pass computes with the experts its routers
pick, wherever their bytes come from; a wrong prediction costs a wasted read, no more.
So predictors compute in plain numpy float32. `Prefetcher` glues a predictor to a tiered
store (`TieredExperts.prefetch_predicted`) and measures, per layer and distance, precision
and recall of the predictions against the routing that happened.
"""

from __future__ import annotations

from typing import Iterable, NamedTuple, Protocol

import numpy as np

from .kernels import cext, dequantize_rows
from .kernels.jit import njit
from .lookahead_learning import NEXT_TOKEN, LookaheadLearning
from .prefetch_gate import PrefetchGate


class Prediction(NamedTuple):
    target_layer: int
    experts: np.ndarray  # int64 expert ids, most likely first
    confidence: float  # in [0, 1]: the predicted share of the target's routing probability


class Predictor(Protocol):
    depth: int

    def predict(self, layer: int, x: np.ndarray) -> list[Prediction]:
        """Predictions for the MoE layers after `layer` (up to `depth` of them), from the
        residual stream `x` (n_tokens, n_embd) after `layer`'s attention."""
        ...

    def observe(self, layer: int, chosen: np.ndarray) -> None:
        """The experts `layer` routed each token to, (n_tokens, k), as they were chosen."""
        ...


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=-1, keepdims=True)
    return z


def select(probs: np.ndarray, k: int, margin: int, margin_ratio: float) -> tuple[np.ndarray, float]:
    """Experts to prefetch from per-token probabilities (n, E): each token's top-k, plus up to
    `margin` more whose probability is at least margin_ratio x the k-th one (the choice is
    close there), union over tokens, ordered by their best probability; and the confidence:
    the mean over tokens of the probability the top-k holds."""
    probs = np.atleast_2d(probs)
    n_e = probs.shape[1]
    k = min(k, n_e)
    m = min(margin, n_e - k)
    order = np.argsort(-probs, axis=1, kind="stable")[:, : k + m]
    top = np.take_along_axis(probs, order, axis=1)
    keep = np.ones_like(top, dtype=bool)
    if m:
        keep[:, k:] = top[:, k:] >= margin_ratio * top[:, k - 1 : k]
    best = np.zeros(n_e, dtype=np.float32)
    np.maximum.at(best, order[keep], top[keep])
    experts = np.flatnonzero(best > 0) if len(probs) > 1 else order[0][keep[0]]
    if len(probs) > 1:
        experts = experts[np.argsort(-best[experts], kind="stable")]
    confidence = float(top[:, :k].sum(axis=1).mean())
    return experts.astype(np.int64), min(1.0, confidence)


def _select_rows(targets: list[int], probs: np.ndarray, k: int, margin: int, margin_ratio: float) -> list[Prediction]:
    """`select` for one token and several targets, one row of `probs` each, in a few numpy calls."""
    n_e = probs.shape[1]
    k = min(k, n_e)
    m = min(margin, n_e - k)
    order = np.argsort(-probs, axis=1, kind="stable")[:, : k + m]
    top = np.take_along_axis(probs, order, axis=1)
    conf = top[:, :k].sum(axis=1)
    if m:
        keep = top[:, k:] >= margin_ratio * top[:, k - 1 : k]
        n_keep = k + np.minimum(np.cumprod(keep, axis=1).sum(axis=1), m)  # extras while close, in order
    else:
        n_keep = np.full(len(targets), k)
    return [Prediction(t, order[j, : n_keep[j]], min(1.0, float(conf[j]))) for j, t in enumerate(targets)]


@njit(cache=True)
def _lookahead_one(x, w, eps, n_targets, k, m, ratio, experts, counts, conf):
    """One token's lookahead for every target in one pass: rms scale, the folded routers
    (w: n_embd x n_targets*E), softmax per target, top-k, then up to m extras while their
    probability is >= ratio x the k-th one. Fills experts (T, k+m), counts (T,), conf (T,).
    (C twin: cext.lookahead, used with the C kernels.)"""
    n = x.shape[0]
    n_out = w.shape[1]
    e = n_out // n_targets
    ss = 0.0
    for i in range(n):
        ss += np.float64(x[i]) * np.float64(x[i])
    scale = np.float32(1.0 / np.sqrt(ss / n + eps))
    logits = np.zeros(n_out, dtype=np.float32)
    for i in range(n):
        xi = x[i] * scale
        for j in range(n_out):
            logits[j] += xi * w[i, j]
    for t in range(n_targets):
        p = logits[t * e : (t + 1) * e]
        mx = p.max()
        total = 0.0
        for j in range(e):
            p[j] = np.exp(p[j] - mx)
            total += p[j]
        for j in range(e):
            p[j] = p[j] / total
        got = 0
        kth = 0.0
        c = 0.0
        for r in range(k + m):
            best = -1
            for j in range(e):
                if p[j] >= 0 and (best < 0 or p[j] > p[best]):
                    best = j
            if best < 0:
                break
            if r >= k and p[best] < ratio * kth:
                break
            if r < k:
                c += p[best]
                kth = p[best]
            experts[t, r] = best
            got += 1
            p[best] = -1.0
        counts[t] = got
        conf[t] = min(1.0, c)


class _Scoring:
    """A predictor that scores every expert of each target layer; selection is shared."""

    def __init__(self, moe_layers: list[int], n_expert: int, k: int, depth: int, margin: int | None = None,
                 margin_ratio: float = 0.5):
        self.moe_layers = list(moe_layers)
        self.n_expert, self.k, self.depth = n_expert, k, max(0, depth)
        self.margin = max(1, k // 2) if margin is None else margin
        self.margin_ratio = margin_ratio
        self._next = {l: self.moe_layers[i + 1 : i + 1 + self.depth] for i, l in enumerate(self.moe_layers)}

    def targets(self, layer: int) -> list[int]:
        """The MoE layers after `layer`, up to depth of them."""
        nxt = self._next.get(layer)
        if nxt is None:
            nxt = [l for l in self.moe_layers if l > layer][: self.depth]
        return nxt

    def probs(self, layer: int, x: np.ndarray) -> dict[int, np.ndarray]:
        raise NotImplementedError

    def predict(self, layer: int, x: np.ndarray) -> list[Prediction]:
        probs = self.probs(layer, x)
        if not probs:
            return []
        if len(next(iter(probs.values()))) == 1:  # decode: every target at once
            return _select_rows(list(probs), np.concatenate(list(probs.values())), self.k, self.margin,
                                self.margin_ratio)
        out = []
        for target, p in probs.items():
            experts, conf = select(p, self.k, self.margin, self.margin_ratio)
            out.append(Prediction(target, experts, conf))
        return out

    def observe(self, layer: int, chosen: np.ndarray) -> None:
        pass


class LookaheadPredictor(_Scoring):
    """Router of each target layer T on rms_norm(x, ffn_norm of T), x the residual stream
    after the current layer's attention: rms_norm's scale is shared by every target and the
    norm weight folds into the router, so d targets cost one (n x n_embd) @ (n_embd x d*E)."""

    name = "lookahead"

    def __init__(self, weights, args, depth: int = 1, margin: int | None = None, margin_ratio: float = 0.5,
                 learn: bool = True):
        moe = [i for i, l in enumerate(weights.layers) if l.moe is not None]
        super().__init__(moe, args.n_expert, args.n_expert_used, depth, margin, margin_ratio)
        self.eps = np.float32(args.rms_eps)
        self._w = {}  # target layer -> its folded router, (n_embd, E): the plan counts one per MoE layer
        for i in moe:
            r = weights.layers[i].moe.router
            dense = dequantize_rows(r, np.arange(r.n_rows)).astype(np.float32)
            self._w[i] = np.ascontiguousarray((dense * weights.layers[i].ffn_norm.astype(np.float32)[None, :]).T)
        self._cat = {}  # depth > 1: targets -> their folded routers side by side, (n_embd, len(targets) * E)
        # at depth 1, corrections learned online where the plain guess is poor, and a learned guess
        # of the next token's first MoE layer (offload.lookahead_learning)
        self.learning = LookaheadLearning({NEXT_TOKEN: moe[0], **dict(zip(moe, moe[1:]))}, self._w,
                                          args.n_expert_used) if learn and self.depth == 1 and moe else None

    def predict_next_token(self, x: np.ndarray) -> list[Prediction]:
        """The next token's first MoE layer, from the residual stream at the end of this token
        (its last row): only once the learned guess beats the plain one (which is at chance)."""
        if self.learning is None or not self.learning.wants(NEXT_TOKEN):
            return []
        x = np.asarray(x[-1:], dtype=np.float32)
        self.learning.saw(NEXT_TOKEN, self._normed(x))
        w = self.learning.matrix(NEXT_TOKEN)
        return [] if w is None else self._compiled(x[0], w, [self.moe_layers[0]])

    def predict(self, layer: int, x: np.ndarray) -> list[Prediction]:
        learned = None
        if self.learning is not None:
            if self.learning.wants(layer):
                x = np.asarray(x, dtype=np.float32)
                self.learning.saw(layer, self._normed(x))
            learned = self.learning.matrix(layer)
        if len(x) != 1:
            return super().predict(layer, x)
        targets = self.targets(layer)  # decode: one compiled pass for every target
        if not targets:
            return []
        return self._compiled(x[0], self._folded(targets) if learned is None else learned, targets)

    def _normed(self, x: np.ndarray) -> np.ndarray:
        """rms_norm's scaling of each row (what every target's router sees, its norm folded in)."""
        return x / np.sqrt(np.einsum("ij,ij->i", x, x)[:, None] / x.shape[1] + self.eps)

    def _compiled(self, x0: np.ndarray, w: np.ndarray, targets: list[int]) -> list[Prediction]:
        """One token's predictions for `targets` (w: their matrices side by side) in one
        compiled pass: rms scale, the matmul, softmax, top-k and the near ties."""
        k, m = min(self.k, self.n_expert), min(self.margin, self.n_expert - min(self.k, self.n_expert))
        experts = np.empty((len(targets), k + m), dtype=np.int64)
        counts = np.empty(len(targets), dtype=np.int64)
        conf = np.empty(len(targets), dtype=np.float32)
        lookahead = cext.lookahead if cext.selected() else _lookahead_one
        lookahead(np.ascontiguousarray(x0, dtype=np.float32), w, float(self.eps), len(targets), k, m,
                  np.float32(self.margin_ratio), experts, counts, conf)
        return [Prediction(t, experts[j, : counts[j]], float(conf[j])) for j, t in enumerate(targets)]

    def observe(self, layer: int, chosen: np.ndarray) -> None:
        if self.learning is not None:
            self.learning.routed(layer, chosen)

    def forget_token(self) -> None:
        """This token runs without predictions: nothing seen of the last one pairs with it."""
        if self.learning is not None:
            self.learning.forget_token()

    def stats(self) -> dict:
        return self.learning.stats() if self.learning is not None else {}

    def _folded(self, targets: list[int]) -> np.ndarray:
        if len(targets) == 1:  # depth 1: no copy
            return self._w[targets[0]]
        key = tuple(targets)
        w = self._cat.get(key)
        if w is None:
            w = self._cat[key] = np.ascontiguousarray(np.concatenate([self._w[t] for t in targets], axis=1))
        return w

    def probs(self, layer: int, x: np.ndarray) -> dict[int, np.ndarray]:
        targets = self.targets(layer)
        if not targets:
            return {}
        learned = self.learning.matrix(layer) if self.learning is not None else None
        w = self._folded(targets) if learned is None else learned
        x = np.asarray(x, dtype=np.float32)
        scale = 1.0 / np.sqrt(np.mean(np.square(x), axis=-1, keepdims=True) + self.eps)
        logits = (x * scale.astype(np.float32)) @ w
        e = self.n_expert
        p = _softmax(logits.reshape(len(x), len(targets), e))
        return {t: p[:, j] for j, t in enumerate(targets)}


class TransitionPredictor(_Scoring):
    """Counts how often expert e' at the next MoE layer follows e at this one (for the same
    token), online from the routing it observes (`learn=False`: only from `fit`). A
    prediction made after layer L's attention knows the experts of the MoE layer before L:
    target T's distribution is that chain, one transition matrix per layer, row-normalized
    (with add-`alpha` smoothing)."""

    name = "transition"

    def __init__(self, moe_layers: list[int], n_expert: int, k: int, depth: int = 1, margin: int | None = None,
                 margin_ratio: float = 0.5, alpha: float = 0.1, learn: bool = True):
        super().__init__(moe_layers, n_expert, k, depth, margin, margin_ratio)
        self.alpha, self.learn = alpha, learn
        self.counts = {l: np.zeros((n_expert, n_expert), dtype=np.float64) for l in self.moe_layers[1:]}
        self._prev = {l: p for p, l in zip(self.moe_layers, self.moe_layers[1:])}
        self._last: dict[int, np.ndarray] = {}  # chosen (n, k) of each MoE layer, this micro-batch

    @classmethod
    def for_model(cls, weights, args, depth: int = 1, **kw) -> "TransitionPredictor":
        moe = [i for i, l in enumerate(weights.layers) if l.moe is not None]
        return cls(moe, args.n_expert, args.n_expert_used, depth, **kw)

    def _count(self, layer: int, prev: np.ndarray, cur: np.ndarray) -> None:
        c = self.counts[layer]
        for a, b in zip(prev, cur):  # every (e, e') pair of one token
            c[np.repeat(a, len(b)), np.tile(b, len(a))] += 1.0

    def observe(self, layer: int, chosen: np.ndarray) -> None:
        chosen = np.atleast_2d(np.asarray(chosen))
        if self.learn and layer in self._prev:
            prev = self._last.get(self._prev[layer])
            if prev is not None and prev.shape[0] == chosen.shape[0]:
                self._count(layer, prev, chosen)
        if layer == self.moe_layers[0]:
            self._last.clear()
        self._last[layer] = chosen

    def fit(self, trace: Iterable) -> "TransitionPredictor":
        """Count transitions in a recorded trace: per token, a mapping (or pairs) of layer ->
        chosen experts."""
        for token in trace:
            routed = dict(token.items() if hasattr(token, "items") else token)
            for layer, prev in self._prev.items():
                if layer in routed and prev in routed:
                    self._count(layer, np.atleast_2d(routed[prev]), np.atleast_2d(routed[layer]))
        return self

    def _matrix(self, layer: int) -> np.ndarray:
        c = self.counts[layer] + self.alpha
        return c / c.sum(axis=1, keepdims=True)

    def probs(self, layer: int, x: np.ndarray) -> dict[int, np.ndarray]:
        targets = self.targets(layer)
        # the last MoE layer routed before `layer`'s MoE (this token): layer itself is not yet
        known = [l for l in self.moe_layers if l < layer and l in self._last]
        if not targets or not known:
            return {}
        src = known[-1]
        chosen = self._last[src]
        p = np.zeros((len(chosen), self.n_expert), dtype=np.float64)
        np.put_along_axis(p, chosen, 1.0 / chosen.shape[1], axis=1)
        out = {}
        for l in self.moe_layers:
            if l <= src:
                continue
            p = p @ self._matrix(l)
            if l in targets:
                out[l] = p.astype(np.float32)
            if l >= targets[-1]:
                break
        return out


class CombinedPredictor(_Scoring):
    """A weighted mix of the members' probabilities (members that have none for a target
    are left out of its mix)."""

    name = "combined"

    def __init__(self, members: list[_Scoring], weights: list[float]):
        m0 = members[0]
        super().__init__(m0.moe_layers, m0.n_expert, m0.k, m0.depth, m0.margin, m0.margin_ratio)
        self.members, self.weights = members, weights

    def probs(self, layer: int, x: np.ndarray) -> dict[int, np.ndarray]:
        mix: dict[int, list] = {}
        for m, w in zip(self.members, self.weights):
            for t, p in m.probs(layer, x).items():
                mix.setdefault(t, []).append((w, p))
        return {t: sum(w * p for w, p in ps) / sum(w for w, _ in ps) for t, ps in mix.items()}

    def observe(self, layer: int, chosen: np.ndarray) -> None:
        for m in self.members:
            m.observe(layer, chosen)


PREDICTORS = ("lookahead", "transition", "combined")


def make_predictor(name: str, weights, args, depth: int, **kw) -> _Scoring:
    if name == "lookahead":
        return LookaheadPredictor(weights, args, depth, **kw)
    if name == "transition":
        return TransitionPredictor.for_model(weights, args, depth, **kw)
    if name == "combined":
        return CombinedPredictor([LookaheadPredictor(weights, args, depth, learn=False, **kw),
                                  TransitionPredictor.for_model(weights, args, depth, **kw)], [0.75, 0.25])
    from .errors import OffloadError

    raise OffloadError(f"predictor {name!r} is not one of {', '.join(PREDICTORS)}")


class PredictionMetrics:
    """Precision and recall of predictions against the routing that happened, per target
    layer and distance (target - predicting layer). For a micro-batch of several tokens, a
    prediction is the union of its tokens' sets and so is the routing."""

    def __init__(self) -> None:
        self._pending: dict[int, list[tuple[int, set]]] = {}
        # (target, distance) -> [predictions, experts predicted, experts chosen, predicted and chosen]
        self.counts: dict[tuple[int, int], list[int]] = {}

    def record(self, layer: int, predictions: Iterable) -> None:
        for target, experts, _ in predictions:
            self._pending.setdefault(int(target), []).append((int(target) - layer, {int(e) for e in experts}))

    def observe(self, layer: int, chosen: np.ndarray) -> None:
        pending = self._pending.pop(layer, None)
        if not pending:
            return
        actual = {int(e) for e in np.asarray(chosen).ravel()}
        for d, predicted in pending:
            c = self.counts.setdefault((layer, d), [0, 0, 0, 0])
            c[0] += 1
            c[1] += len(predicted)
            c[2] += len(actual)
            c[3] += len(predicted & actual)

    def reset(self) -> None:
        self._pending.clear()
        self.counts.clear()

    @staticmethod
    def _rates(c: list[int]) -> dict:
        return {"predictions": c[0], "precision": c[3] / c[1] if c[1] else 0.0, "recall": c[3] / c[2] if c[2] else 0.0,
                "predicted_per_layer": c[1] / c[0] if c[0] else 0.0}

    def by_distance(self) -> dict[int, dict]:
        tot: dict[int, list[int]] = {}
        for (_, d), c in self.counts.items():
            t = tot.setdefault(d, [0, 0, 0, 0])
            for i in range(4):
                t[i] += c[i]
        return {d: self._rates(c) for d, c in sorted(tot.items())}

    def by_layer(self) -> dict[int, dict[int, dict]]:
        out: dict[int, dict[int, dict]] = {}
        for (layer, d), c in sorted(self.counts.items()):
            out.setdefault(layer, {})[d] = self._rates(c)
        return out


class Prefetcher:
    """A predictor feeding a tiered store: after each layer's attention, its predictions go
    to `store.prefetch_predicted` (replacing the previous ones); each routing decision goes
    to the predictor and the metrics. Decoding tokens (start_token .. end_token) prefetch
    only while `gate` (offload.prefetch_gate) measures that it pays; prompts always do."""

    def __init__(self, predictor, store, issue: bool = True, adaptive: bool = True):
        self.predictor = predictor
        self.store = store
        self.issue = issue  # False: predict and measure only
        self.metrics = PredictionMetrics()
        self.next_token_metrics = PredictionMetrics()  # the guesses of the next token's first MoE layer
        self.gate = PrefetchGate(adaptive)
        self._resting = False  # this decoding token runs without predictions (the gate's off mode)

    def start_token(self) -> None:
        """A decoding token starts (forward's micro-batch of one)."""
        self._resting = not self.gate.on
        if self._resting and hasattr(self.predictor, "forget_token"):
            self.predictor.forget_token()
        self.gate.start_token()

    def end_token(self) -> None:
        self.gate.end_token()
        self._resting = False

    @property
    def depth(self) -> int:
        return self.predictor.depth

    def after_attention(self, layer: int, x: np.ndarray) -> list[Prediction]:
        if self._resting:
            return []
        preds = self.predictor.predict(layer, x)
        self.metrics.record(layer, preds)
        if self.issue and self.store is not None:
            self.store.prefetch_predicted(layer, preds)
        return preds

    def end_of_token(self, x: np.ndarray) -> list[Prediction]:
        """After the last layer: the next token's first MoE layer, guessed from the residual
        stream `x` (its last row) where the predictor can, read while the token is sampled."""
        guess = getattr(self.predictor, "predict_next_token", None)
        if self._resting or guess is None or len(x) != 1:  # (a prompt's inner micro-batch: its next rows follow)
            return []
        preds = guess(x)
        if preds:
            self.next_token_metrics.record(NEXT_TOKEN, preds)
            if self.issue and self.store is not None:
                self.store.prefetch_predicted(NEXT_TOKEN, preds)
        return preds

    def routed(self, layer: int, chosen: np.ndarray) -> None:
        self.predictor.observe(layer, chosen)
        self.metrics.observe(layer, chosen)
        self.next_token_metrics.observe(layer, chosen)

    def stats(self) -> dict:
        """Flat counters for Model.stats(): recall/precision per distance, and the nested
        per-layer table with each layer's I/O stall."""
        out = {"prefetch_depth": self.depth, "predictor": getattr(self.predictor, "name", "custom"),
               **self.gate.stats(), **(self.predictor.stats() if hasattr(self.predictor, "stats") else {})}
        for d, r in self.metrics.by_distance().items():
            out[f"prediction_recall_d{d}"] = r["recall"]
            out[f"prediction_precision_d{d}"] = r["precision"]
        for r in self.next_token_metrics.by_distance().values():
            out["prediction_recall_next_token"] = r["recall"]
            out["prediction_precision_next_token"] = r["precision"]
            out["predictions_next_token"] = r["predictions"]
        layers = self.metrics.by_layer()
        stall = getattr(self.store, "stall_by_layer", {})
        out["prediction_by_layer"] = {l: {"by_distance": layers.get(l, {}), "stall_seconds": stall.get(l, 0.0)}
                                      for l in sorted(set(layers) | set(stall))}
        return out
