"""Routing traces: which experts every token chose at every MoE layer, saved as `.npz`.

Record one with `offload generate MODEL --record-trace run.npz` (or
`Model.generate(..., record_trace="run.npz")`), replay it offline with
`offload simulate run.npz --capacity 25%` or `offload.simulate` (any cache capacity and
policy, and Belady's optimum).

One *step* is one token that went through the model (the prompt's tokens, then every
generated token that was fed back; the last sampled token never runs, so it is not in the
trace). Steps that ran in the same forward micro-batch (a prompt, up to 512 tokens) share
a `batch` number: the expert store sees a batch's experts once per layer, not per token.

File format (numpy `.npz`, written by `RoutingTrace.save`, read by `RoutingTrace.load`;
`np.load(path)` reads it too, no pickles):

    format_version  int64 scalar      FORMAT_VERSION (1); readers refuse a newer one
    metadata        str scalar        JSON object: {"model": file name of the GGUF,
                                      "n_expert": experts per MoE layer, "k": experts
                                      chosen per token (n_expert_used), "prompt_tokens":
                                      how many of the first steps were the prompt, plus any
                                      extra keys the recorder was given (e.g. "cache_policy")}
    experts         int16 (S, L, k)   expert ids chosen by step s at MoE layer l, in the
                                      router's order (highest weight first); -1 where that
                                      layer did not run for that token: a prompt's last
                                      layer only runs for the prompt's last token (as in
                                      llama.cpp, only the rows whose logits are wanted), and
                                      for none of a piece of a prompt over 512 tokens
                                      that is not its last
    weights         float32 (S, L, k) their mixing weights (after normalization, if the
                                      model normalizes); 0 where experts is -1
    layers          int32 (L,)        the model's layer index of each MoE layer, in order
                                      (L counts MoE layers only: dense layers are left out)
    tokens          int32 (S,)        the token id of each step
    batch           int32 (S,)        the forward micro-batch each step ran in (0, 1, ...;
                                      non-decreasing); a decode step is a batch of one
    predicted       int16 (S, L, D, m) optional: experts a routing predictor announced for
                                      step s's MoE layer l, d+1 layers ahead of it (the
                                      prediction made at layer id layers[l] - (d+1)), most
                                      likely first as the predictor gave them; one set for a
                                      whole batch (a prompt) is repeated on each of its steps;
                                      -1 pads a shorter (or missing) prediction

S steps, L MoE layers, k experts per token, D the largest prediction distance, m the
largest prediction size. Version 1 is the first; fields may be added without a version
change (readers ignore unknown ones), a changed meaning bumps it.
"""

from __future__ import annotations

import json
import os
import struct
import zipfile
import zlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

FORMAT_VERSION = 1


@dataclass
class RoutingTrace:
    experts: np.ndarray  # int16 (n_steps, n_layers, k), -1: layer not run for that token
    weights: np.ndarray  # float32 (n_steps, n_layers, k)
    layers: np.ndarray  # int32 (n_layers,) model layer ids of the MoE layers
    tokens: np.ndarray  # int32 (n_steps,)
    n_expert: int
    k: int
    prompt_tokens: int = 0
    batch: np.ndarray | None = None  # int32 (n_steps,); None: every step its own batch
    predicted: np.ndarray | None = None  # int16 (n_steps, n_layers, depth, m), -1 padded
    model: str = ""
    meta: dict = field(default_factory=dict)  # extra metadata, saved in the JSON entry

    def __post_init__(self) -> None:
        self.experts = np.asarray(self.experts, dtype=np.int16)
        if self.experts.ndim != 3:
            raise ValueError(f"experts must be (n_steps, n_layers, k), got shape {self.experts.shape}")
        s, l, k = self.experts.shape
        self.weights = np.asarray(self.weights, dtype=np.float32)
        if self.weights.shape != self.experts.shape:
            raise ValueError(f"weights {self.weights.shape} and experts {self.experts.shape} differ in shape")
        self.layers = np.asarray(self.layers, dtype=np.int32)
        if self.layers.shape != (l,):
            raise ValueError(f"layers must be ({l},), got {self.layers.shape}")
        self.tokens = np.asarray(self.tokens, dtype=np.int32)
        if self.tokens.shape != (s,):
            raise ValueError(f"tokens must be ({s},), got {self.tokens.shape}")
        self.batch = np.arange(s, dtype=np.int32) if self.batch is None else np.asarray(self.batch, dtype=np.int32)
        if self.batch.shape != (s,) or (s and np.any(np.diff(self.batch) < 0)):
            raise ValueError("batch must be (n_steps,) and non-decreasing")
        if self.predicted is not None:
            self.predicted = np.asarray(self.predicted, dtype=np.int16)
            if self.predicted.ndim != 4 or self.predicted.shape[:2] != (s, l):
                raise ValueError(f"predicted must be ({s}, {l}, depth, m), got {self.predicted.shape}")
        if k != self.k:
            raise ValueError(f"experts has {k} per token, k is {self.k}")
        if s and (self.experts.max(initial=-1) >= self.n_expert or self.experts.min(initial=-1) < -1):
            raise ValueError(f"an expert id is outside -1..{self.n_expert - 1}")

    @property
    def n_steps(self) -> int:
        return self.experts.shape[0]

    @property
    def n_layers(self) -> int:
        return self.experts.shape[1]

    @property
    def n_accesses(self) -> int:
        """Expert uses (token, layer, slot) in the trace: what the store would see with batches of one."""
        return int(np.count_nonzero(self.experts >= 0))

    def metadata(self) -> dict:
        return {**self.meta, "model": self.model, "n_expert": int(self.n_expert), "k": int(self.k),
                "prompt_tokens": int(self.prompt_tokens)}

    # -- files ---------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the trace to `path` (exactly that name; .npz by convention), compressed."""
        arrays = dict(format_version=np.int64(FORMAT_VERSION), metadata=np.array(json.dumps(self.metadata())),
                      experts=self.experts, weights=self.weights, layers=self.layers, tokens=self.tokens,
                      batch=self.batch)
        if self.predicted is not None:
            arrays["predicted"] = self.predicted
        from .atomic import atomic_write

        with atomic_write(path) as f:  # a full disk leaves no half-written trace
            np.savez_compressed(f, **arrays)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "RoutingTrace":
        from .errors import OffloadError

        try:
            with np.load(path, allow_pickle=False) as z:
                version = int(z["format_version"])
                if version > FORMAT_VERSION:
                    raise OffloadError(f"{path}: routing trace format {version} is newer than this offload reads "
                                       f"({FORMAT_VERSION})")
                meta = json.loads(str(z["metadata"]))
                data = {name: z[name] for name in z.files}
            if not isinstance(meta, dict):
                raise ValueError("its metadata is not a JSON object")
            known = {"model", "n_expert", "k", "prompt_tokens"}
            # __post_init__ checks the arrays' shapes and ids against each other
            return cls(experts=data["experts"], weights=data["weights"], layers=data["layers"], tokens=data["tokens"],
                       n_expert=int(meta["n_expert"]), k=int(meta["k"]), prompt_tokens=int(meta.get("prompt_tokens", 0)),
                       batch=data.get("batch"), predicted=data.get("predicted"), model=str(meta.get("model", "")),
                       meta={key: v for key, v in meta.items() if key not in known})
        except OffloadError:
            raise
        except (OSError, KeyError, ValueError, TypeError, EOFError, ArithmeticError, MemoryError, NotImplementedError,
                struct.error, zipfile.BadZipFile, zlib.error) as e:
            # whatever a damaged or foreign file makes numpy, zipfile or json raise: one line
            raise OffloadError(f"{path}: not a routing trace ({type(e).__name__}: {e})") from None

    def equals(self, other: "RoutingTrace") -> bool:
        """Same fields and metadata (arrays compared exactly)."""
        def same(a, b):
            return (a is None and b is None) or (a is not None and b is not None and a.shape == b.shape
                                                 and a.dtype == b.dtype and np.array_equal(a, b))

        return (same(self.experts, other.experts) and same(self.weights, other.weights)
                and same(self.layers, other.layers) and same(self.tokens, other.tokens)
                and same(self.batch, other.batch) and same(self.predicted, other.predicted)
                and self.metadata() == other.metadata())


class TraceRecorder:
    """Collects routing decisions while the model runs; `finish()` makes the RoutingTrace.

    The forward pass calls `record(layer, chosen, weights)` once per MoE layer per
    micro-batch, with the (n, k) arrays `route()` returned; a routing predictor may call
    `record_prediction(layer, target_layer, experts)`. The recorder tells micro-batches
    apart by `position()` (the context position of the running batch's first token, e.g.
    `lambda: transformer.cache.n_past`) or, without it, by the layer order starting over.
    A batch's last layer may see fewer rows than the others (only the rows whose logits
    are wanted): they are the batch's last tokens. Use one recorder per generation.
    """

    def __init__(self, n_expert: int, k: int, *, position: Callable[[], int] | None = None, model: str = "",
                 meta: dict | None = None) -> None:
        self.n_expert, self.k = int(n_expert), int(k)
        self.model = model
        self.meta = dict(meta or {})
        self.tokens: list[int] = []  # the caller's token ids (add_tokens); the steps run are the first ones
        self.prompt_tokens = 0
        self.dropped_predictions = 0  # predictions for a layer that is not a (later) MoE layer
        self._position = position
        self._starts: list[int | None] = []  # position of each batch's first token
        self._calls: list[tuple[int, int, np.ndarray, np.ndarray]] = []  # (batch, layer, chosen, weights)
        self._preds: list[tuple[int, int, int, np.ndarray]] = []  # (batch, layer, target, experts)
        self._last_layer: int | None = None

    def add_tokens(self, tokens, prompt: bool = False) -> None:
        """Token ids about to run (the prompt with prompt=True, then each fed-back token)."""
        tokens = [int(t) for t in np.asarray(tokens).reshape(-1)]
        self.tokens.extend(tokens)
        if prompt:
            self.prompt_tokens += len(tokens)

    def _batch(self, layer: int | None) -> int:
        """Index of the batch running now, opening a new one when this call starts one."""
        pos = self._position() if self._position is not None else None
        new = not self._starts
        if not new and pos is not None and self._starts[-1] is not None:
            new = pos != self._starts[-1]
        elif not new and layer is not None:
            new = self._last_layer is not None and layer <= self._last_layer
        if new:
            self._starts.append(pos)
            self._last_layer = None
        return len(self._starts) - 1

    def record(self, layer: int, chosen: np.ndarray, weights: np.ndarray) -> None:
        """This MoE layer's routing for the running batch: (n, k) expert ids and weights."""
        chosen = np.asarray(chosen)
        if chosen.ndim == 1:
            chosen = chosen[None]
        b = self._batch(int(layer))
        self._calls.append((b, int(layer), chosen.astype(np.int16, copy=True),
                            np.asarray(weights, dtype=np.float32).reshape(chosen.shape).copy()))
        self._last_layer = int(layer)

    def record_prediction(self, layer: int, target_layer: int, experts) -> None:
        """At MoE layer `layer`, a predictor announced `experts` for `target_layer` of the same
        tokens: (m,) ids for the whole batch, or (n, m) one row per token (the batch's last n)."""
        experts = np.asarray(experts, dtype=np.int64)
        self._preds.append((self._batch(None), int(layer), int(target_layer), experts.copy()))

    def finish(self, final_position: int | None = None) -> "RoutingTrace":
        """The trace of everything recorded. `final_position`: the context position after the
        last batch (default: position() now), which sizes the last batch."""
        n_batches = len(self._starts)
        rows = np.zeros(n_batches, dtype=np.int64)
        for b, _, chosen, _ in self._calls:
            rows[b] = max(rows[b], len(chosen))
        sizes = rows.copy()
        if self._position is not None and n_batches and all(s is not None for s in self._starts):
            end = self._position() if final_position is None else final_position
            bounds = list(self._starts) + [end]
            diffs = np.diff(np.asarray(bounds, dtype=np.int64))
            if np.all(diffs >= rows) and np.all(diffs > 0):  # positions are consistent: trust them
                sizes = diffs
        starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        n_steps = int(starts[-1])
        layer_ids = sorted({layer for _, layer, _, _ in self._calls})
        index = {layer: i for i, layer in enumerate(layer_ids)}
        experts = np.full((n_steps, len(layer_ids), self.k), -1, dtype=np.int16)
        weights = np.zeros((n_steps, len(layer_ids), self.k), dtype=np.float32)
        for b, layer, chosen, w in self._calls:
            end = starts[b + 1]
            experts[end - len(chosen) : end, index[layer]] = chosen
            weights[end - len(chosen) : end, index[layer]] = w
        batch = np.repeat(np.arange(n_batches, dtype=np.int32), sizes)
        tokens = np.asarray(self.tokens[:n_steps] + [-1] * max(0, n_steps - len(self.tokens)), dtype=np.int32)
        predicted = self._predictions(starts, index, n_steps) if self._preds else None
        return RoutingTrace(experts, weights, np.asarray(layer_ids, dtype=np.int32), tokens, self.n_expert, self.k,
                            prompt_tokens=min(self.prompt_tokens, n_steps), batch=batch, predicted=predicted,
                            model=self.model, meta=self.meta)

    def _predictions(self, starts: np.ndarray, index: dict[int, int], n_steps: int) -> np.ndarray | None:
        kept = []
        for b, layer, target, experts in self._preds:
            d = target - layer
            if d <= 0 or target not in index or b + 1 >= len(starts):
                self.dropped_predictions += 1
                continue
            kept.append((b, d, index[target], experts))
        if not kept:
            return None
        depth = max(d for _, d, _, _ in kept)
        m = max(e.shape[-1] if e.ndim else 1 for *_, e in kept)
        out = np.full((n_steps, len(index), depth, m), -1, dtype=np.int16)
        for b, d, li, experts in kept:
            lo, hi = starts[b], starts[b + 1]
            if experts.ndim <= 1:
                e = experts.reshape(-1)
                out[lo:hi, li, d - 1, : len(e)] = e
            else:
                e = experts[-(hi - lo):]
                out[hi - len(e) : hi, li, d - 1, : e.shape[1]] = e
        return out
