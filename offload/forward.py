"""The transformer step, generic over architectures.

One call runs a batch of new tokens (a prompt, or one token while decoding) through
every layer, appending their keys and values to the KV cache:

    x = embed(tokens)
    for each layer:
        x += attention(rms_norm(x))          # RoPE, grouped-query, causal over the cache
                                             # (or its sliding window), sinks if any
        x += ffn(rms_norm(x))                # dense SwiGLU, or routed experts (+ shared)
    logits = output(rms_norm(x))

What differs between architectures are small named pieces that ModelArgs picks: the RoPE
pairing and scaling (YaRN), the window per layer, the routing kind (softmax then top-k, or
top-k then softmax), the experts' activation and biases, the optional norms and biases.

Numerics follow llama.cpp's CPU backend (float32 activations; each matmul converts its
input the way ggml does for the weight's type, see `offload.kernels`), because MoE
routing is discontinuous: a small drift in activations flips expert choices.

This file is the reference step, and the one prompts, tiered stores, prefetching and the
GPU tier run. A decoding token on a model the C kernels serve whole (every expert resident)
runs the same step as one C call instead (`kernels.step`, `_step_token` below), and each
block of a decoding token has its own C call too (`kernels.block`, `kernels.moe`): the same
bits, fewer trips between Python and C.
"""

from __future__ import annotations

import copy
import math

import numpy as np

from .arch import ModelArgs
from .cache_types import (DEFAULT_CACHE_TYPE, check_cache_types, check_flash_heads, encode_rows, key_rotation,
                          value_rotation)
from .errors import ContextOverflowError, NonFiniteError
from .kv_cells import Cells
from .kv_shift import check_can_shift, rotate_keys
from .kernels import block, cext, ggml_math, jit, matmul, matmuls, step
from .kernels.attention import attention, attention_typed, flash_attention
from .kernels.dispatch import matmul_heads, rows_as_alone, step_enabled
from .kernels.ggml_math import apply_rope, hadamard_rows, rms_norm
from .kernels.jit import njit
from .kernels.moe import can_fuse, moe_batch, moe_ffn, types_fuse
from .rope import mla_score_scale, rope_tables
from .weights import FFN, Attention, ExpertStore, LatentAttention, MoE, Weights


# Every op rounds where ggml rounds (sums of squares in double, then one float32 scale;
# ggml's own exp in softmax and SiLU; dot products in its summation order), so that
# activations agree with llama.cpp's to the bit: a one-ulp difference can flip a
# rounding to F16 or Q8_0 in the next matmul, and an MoE router amplifies such flips.

# the router's scores per routing kind: its logits as they are, or their softmax or sigmoid
_SCORES = {"topk": lambda x: x, "softmax": ggml_math.softmax, "sigmoid": ggml_math.sigmoid}


def route(router_logits: np.ndarray, k: int, kind: str, selection_bias: np.ndarray | None = None,
          groups: tuple[int, int] = (0, 0), scale: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Pick each token's experts and their weights: (n, k) expert ids, (n, k) weights, as
    llama.cpp's build_moe_ffn does.

    kind: softmax_topk[_norm] / sigmoid_topk[_norm]: scores over every expert, the k largest
    (their weights renormalized or not); topk_softmax: the k largest logits, softmax over
    those k. `selection_bias` is added to the scores for choosing only; `groups` (count,
    used): only the `used` groups whose two best scores sum highest compete; `scale`
    multiplies the weights (0 or 1: not)."""
    scores = np.ascontiguousarray(_SCORES[kind.split("_")[0]](router_logits), dtype=np.float32)
    normalize = kind.endswith("_norm")
    chosen = np.empty((len(scores), k), dtype=np.int64)
    weights = np.empty((len(scores), k), dtype=np.float32)
    top_k = cext.top_k if cext.selected() else _top_k
    if selection_bias is None and groups[0] <= 1:
        top_k(scores, k, normalize, chosen, weights)
    else:
        choose = scores if selection_bias is None else scores + selection_bias
        if groups[0] > 1:
            choose = _best_groups(choose, *groups, top_k)
        top_k(np.ascontiguousarray(choose), k, False, chosen, weights)
        weights = np.take_along_axis(scores, chosen, axis=1)  # the unbiased scores
        if normalize:  # ggml_sum_rows (in double), clamped, ggml_div
            total = np.maximum(weights.astype(np.float64).sum(axis=1).astype(np.float32), np.float32(6.103515625e-5))
            weights = weights / total[:, None]
    if kind == "topk_softmax":
        weights = ggml_math.softmax(weights)
    if scale not in (0.0, 1.0):
        weights = weights * np.float32(scale)
    return chosen, weights


def _best_groups(scores: np.ndarray, n_groups: int, n_used: int, top_k) -> np.ndarray:
    """DeepSeek-V3's group-limited choice: each group scored by the sum of its two best
    scores (ggml_argsort_top_k, get_rows, sum_rows in double); the n_used best groups keep
    their scores, the others become -inf."""
    n, n_expert = scores.shape
    per_group = scores.reshape(n * n_groups, n_expert // n_groups)
    best2 = np.empty((len(per_group), 2), dtype=np.int64)
    top_k(np.ascontiguousarray(per_group), 2, False, best2, np.empty((len(per_group), 2), dtype=np.float32))
    pair = np.take_along_axis(per_group, best2, axis=1).astype(np.float64)
    group_scores = (pair[:, 0] + pair[:, 1]).astype(np.float32).reshape(n, n_groups)
    keep = np.empty((n, n_used), dtype=np.int64)
    top_k(group_scores, n_used, False, keep, np.empty((n, n_used), dtype=np.float32))
    masked = np.full((n, n_groups, n_expert // n_groups), -np.inf, dtype=np.float32)
    rows = np.arange(n)[:, None]
    masked[rows, keep] = scores.reshape(n, n_groups, -1)[rows, keep]
    return masked.reshape(n, n_expert)


@njit(cache=True, nogil=True)
def _top_k(probs, k, normalize, chosen, weights):
    """The k largest of each row, largest first, ties to the lower index (ggml_argsort_top_k's
    order, as a stable argsort of -probs); normalized as ggml_sum_rows does, summed in double.
    (C twin: cext.top_k.)"""
    for r in range(probs.shape[0]):
        for j in range(k):
            best = -1
            for e in range(probs.shape[1]):
                taken = False
                for i in range(j):
                    if chosen[r, i] == e:
                        taken = True
                if not taken and (best < 0 or probs[r, e] > probs[r, best]):
                    best = e
            chosen[r, j] = best
            weights[r, j] = probs[r, best]
        if normalize:
            total = 0.0
            for j in range(k):
                total += np.float64(weights[r, j])
            total32 = np.float32(total)
            for j in range(k):
                weights[r, j] = weights[r, j] / total32


# llama.cpp's default micro-batch (n_ubatch): longer batches run in pieces of this size.
N_UBATCH = 512


def kv_cells(args: ModelArgs, layer: int, n_ctx: int, n_ubatch: int | None = None) -> int:
    """Rows of a layer's KV cache: the whole context, or for a sliding-window layer a ring as
    large as llama.cpp's SWA cache (the window plus a micro-batch, padded to 256), so that
    position p lands in cell p % rows there and here alike and attention sums in its order."""
    window = args.window(layer)
    if not window:
        return n_ctx
    return min(n_ctx, -(-min(n_ctx, window + (n_ubatch or N_UBATCH)) // 256) * 256)


class KVCache:
    """Keys and values of past positions, per layer, allocated once for the context: every
    position for full-attention layers, a ring of the last ones for sliding-window layers.
    Rows are kept in the cache types' encodings (cache_types): float32 arrays for F32, else
    uint8 rows of the type's blocks, converted on write as llama.cpp's set_rows does.

    Position p is in cell p (or p % n_cells in a ring) until a context shift (`shift`); from
    then on `layout` holds a kv_cells.Cells per group of layers with the same cells (the
    full-attention ones, the sliding ones), which places tokens where llama.cpp does and tells
    attention each cell's position; clearing the cache (n_past = 0) goes back to the plain way."""

    def __init__(self, args: ModelArgs, n_ctx: int, type_k: str = DEFAULT_CACHE_TYPE, type_v: str = DEFAULT_CACHE_TYPE,
                 n_ubatch: int | None = None, flash_attn: bool = False):
        self.type_k, self.type_v = type_k, type_v
        self.flash_attn = flash_attn  # attention over this cache is llama.cpp's flash attention
        self.k_fmt, self.v_fmt = check_cache_types(type_k, type_v, args.attention, args.head_dim, flash_attn)
        if flash_attn:
            check_flash_heads(args)
        self.k_rotation = key_rotation(self.k_fmt, args)  # llama.cpp's Hadamard rotation before a quantized K
        self.v_rotation = value_rotation(self.v_fmt, args)  # and before a quantized V, undone on the output
        self.k = [_cache_rows(self.k_fmt, kv_cells(args, i, n_ctx, n_ubatch), args.kv_dim) for i in range(args.n_layer)]
        self.v = [_cache_rows(self.v_fmt, len(k), args.v_cache_dim) if args.v_cache_dim else None for k in self.k]
        self.n_ctx = n_ctx
        self._n_past = 0
        self.groups = [(len(k), args.window(i)) for i, k in enumerate(self.k)]  # (cells, window) per layer
        self.layout: dict[tuple[int, int], Cells] | None = None
        self._slots: dict[tuple[int, int], np.ndarray] = {}  # the cells of the micro-batch being run
        self._visited: dict[tuple[int, int], np.ndarray] = {}  # cell_positions per group, until cells change

    @property
    def n_past(self) -> int:
        """Positions held (0 .. n_past-1), and the next one."""
        return self._n_past

    @n_past.setter
    def n_past(self, n: int) -> None:
        """Forget the positions from n on (llama.cpp's seq_rm(n, -1)); 0 clears the cache."""
        if n == 0:
            self.layout = None
        elif self.layout is not None and n < self._n_past:
            for cells in self.layout.values():
                cells.seq_rm(n, -1)
        self._visited = {}
        self._n_past = n

    def can_truncate(self, n: int) -> bool:
        """Whether the positions before n are all still there to continue from n: a sliding
        window's ring may have overwritten those that a query at n would see."""
        if n >= self._n_past:
            return True
        if self.layout is None:
            return all(self._n_past <= cells for cells, _ in self.groups)
        need = lambda window: set(range(max(0, n - window) if window else 0, n))  # noqa: E731
        return all(need(key[1]) <= cells.positions() for key, cells in self.layout.items())

    @property
    def float32(self) -> bool:
        """Whether both caches are F32 (the float32 kernels, C and Numba, serve those)."""
        return self.k_fmt.name == "F32" and self.v_fmt.name == "F32"

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + (0 if v is None else v.nbytes) for k, v in zip(self.k, self.v))

    def shift(self, n_keep: int, n_discard: int) -> None:
        """Drop positions n_keep .. n_keep+n_discard-1 and move the later ones down by n_discard,
        as llama.cpp's context shift does (seq_rm, then seq_add): the cells keep their rows
        and get the new positions; the keys are rotated to them before the next step
        (Transformer.forward, llama.cpp's K-shift)."""
        if n_discard <= 0:
            return
        if self.layout is None:
            self.layout = {g: Cells.filled(g[0], g[1], self._n_past) for g in dict.fromkeys(self.groups)}
        for cells in self.layout.values():
            cells.seq_rm(n_keep, n_keep + n_discard)
            cells.seq_add(n_keep + n_discard, self._n_past, -n_discard)
        self._visited = {}
        self._n_past -= n_discard

    def place(self, start: int, n: int) -> None:
        """Pick the cells of positions start .. start+n-1 before a micro-batch runs (with a layout)."""
        if self.layout is None:
            return
        positions = np.arange(start, start + n, dtype=np.int32)
        for key, cells in self.layout.items():
            self._slots[key] = slots = cells.find_slot(n)
            cells.apply(slots, positions)
        self._visited = {}

    def cell_positions(self, layer: int) -> np.ndarray | None:
        """The position of each cell attention visits (-1: empty), or None while position p is
        in cell p (or p % n_cells)."""
        if self.layout is None:
            return None
        key = self.groups[layer]
        visited = self._visited.get(key)
        if visited is None:
            cells = self.layout[key]
            visited = self._visited[key] = cells.pos[: cells.n_used]
        return visited

    def write(self, layer: int, start: int, k: np.ndarray, v: np.ndarray | None) -> None:
        """Keys and values (n, kv_dim) of positions start.. into their cells (v None: MLA)."""
        rows = len(self.k[layer])
        if self.layout is not None:
            cells = self._slots[self.groups[layer]]
        elif start + len(k) <= rows:
            cells = slice(start, start + len(k))
        else:
            cells = np.arange(start, start + len(k)) % rows
        self.k[layer][cells] = encode_rows(self.k_fmt, k)
        if v is not None:
            self.v[layer][cells] = encode_rows(self.v_fmt, v)


def _cache_rows(fmt, n_cells: int, width: int) -> np.ndarray:
    if fmt.name == "F32":
        return np.zeros((n_cells, width), dtype=np.float32)
    return np.zeros((n_cells, fmt.row_bytes(width)), dtype=np.uint8)


class Scratch:
    """Named float32 buffers for one-token steps, reused every step, so that decoding
    allocates no arrays once warm. Longer batches (prompts) get fresh arrays instead, so
    that a long prompt does not leave large buffers behind."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, int], np.ndarray] = {}

    def __call__(self, name: str, n: int, width: int) -> np.ndarray | None:
        if n != 1:
            return None  # the op allocates its own output
        buf = self._buffers.get((name, width))
        if buf is None:
            buf = self._buffers[(name, width)] = np.empty((1, width), dtype=np.float32)
        return buf


class Transformer:
    def __init__(self, args: ModelArgs, weights: Weights, experts: ExpertStore, n_ctx: int,
                 type_k: str = DEFAULT_CACHE_TYPE, type_v: str = DEFAULT_CACHE_TYPE, n_ubatch: int | None = None,
                 flash_attn: bool = False):
        self.args = args
        self.weights = weights
        self.experts = experts
        self.n_ubatch = n_ubatch or N_UBATCH  # tokens per micro-batch (llama.cpp's n_ubatch)
        self.cache = KVCache(args, n_ctx, type_k, type_v, self.n_ubatch, flash_attn)
        bases = {args.rope_base_of(i) for i in range(args.n_layer)}
        tables = {base: rope_tables(args, n_ctx, base) for base in bases}  # shared by the layers of a base
        self.rope = [tables[args.rope_base_of(i)] for i in range(args.n_layer)]  # (cos, sin) per layer
        self._mla_scale = mla_score_scale(args) if args.attention != "gqa" else None
        self.scratch = Scratch()
        self.recorder = None  # a TraceRecorder (offload.trace) sees every routing decision when set
        self.prefetcher = None  # offload.predict.Prefetcher: predicts the next layers' experts for a tiered store
        self.gpu = None  # offload.gpu.vram.GpuTier: runs the matmuls and experts placed in VRAM
        self._block_scratch = None  # kernels.block's buffer for a decoding token's attention block
        self._step = None  # kernels.step.DecodeStep (False: it does not serve this model), and the SIMD level it was planned at
        self._step_isa = None
        self.file_check = None  # run before every step: raises if the model file changed under us (Model.load sets it)
        self.batcher = None  # offload.batching.Batcher: runs this sequence's steps with other sequences' (a server's slots)

    def reset(self) -> None:
        self.cache.n_past = 0

    def fork(self, n_ctx: int) -> "Transformer":
        """Another sequence on the same weights, experts and tiers: its own KV cache of n_ctx
        cells and its own scratch buffers (a server's parallel slots)."""
        other = copy.copy(self)
        other.scratch = Scratch()
        other.recorder = other.batcher = None
        other.resize_context(n_ctx)
        return other

    def resize_context(self, n_ctx: int) -> None:
        """A new, empty KV cache of n_ctx cells (at most the context the RoPE tables cover), in
        the same cache types; the plans made on the old one are dropped."""
        c = self.cache
        if n_ctx > len(self.rope[0][0]):
            raise ValueError(f"a context of {n_ctx} is longer than this model was set up for ({len(self.rope[0][0])})")
        self.cache = KVCache(self.args, n_ctx, c.type_k, c.type_v, self.n_ubatch, c.flash_attn)
        self._block_scratch = self._step = self._step_isa = None

    def decode_together(self, members: list["Transformer"], tokens: np.ndarray) -> np.ndarray:
        """One decoding token for each of several sequences (forks of this one, each with its
        own cache; tokens[i] is members[i]'s) as one batch: each expert a token routes to is
        read once for all of them. Returns their logits (len(members), n_vocab), each row the
        bits that member's forward([token]) gives alone: the matmuls of the batch keep each
        row's order (dispatch.rows_as_alone), attention runs per sequence over its own cache."""
        if self.file_check is not None:  # one file for all of them
            self.file_check()
        for m in members:
            m._check_room(1)
            m.shift_keys()
        a = self.args
        starts = [m.cache.n_past for m in members]
        with rows_as_alone():
            x = self.weights.embed(np.asarray(tokens, dtype=np.int64))
            for m, start in zip(members, starts):
                m.cache.place(start, 1)
            for i, layer in enumerate(self.weights.layers):
                x += self._attention_rows(i, layer.attn, x, members, starts)
                if self.prefetcher is not None:
                    self._predict(i, x)
                h = rms_norm(x, layer.ffn_norm, a.rms_eps)
                x += self._moe(i, layer.moe, h) if layer.moe else _ffn(layer.dense, h, self.scratch, gpu=self.gpu)
                if not math.isfinite(x.sum()):
                    raise _non_finite(i, min(starts), max(starts))
            for m, start in zip(members, starts):
                m.cache.n_past = start + 1
            x = rms_norm(x, self.weights.output_norm, a.rms_eps)
            return self._matmul(self.weights.output, np.ascontiguousarray(x))

    def _attention_rows(self, layer: int, w: Attention | LatentAttention, x: np.ndarray, members: list["Transformer"],
                        starts: list[int]) -> np.ndarray:
        """decode_together's attention block: row r is members[r]'s token at starts[r]. The
        projections of grouped-query attention run on all rows at once (each weight read once
        for the batch), the rest per sequence over its own cache; other kinds run per sequence."""
        a = self.args
        h = rms_norm(x, w.norm, a.rms_eps)
        if a.attention != "gqa" or self.gpu is not None:
            return np.concatenate([m._attention(layer, w, h[r : r + 1], start)
                                   for r, (m, start) in enumerate(zip(members, starts))])
        q, k, v = self._qkv(w, h)
        heads = np.empty((len(x), a.n_head * a.head_dim), dtype=np.float32)
        for r, (m, start) in enumerate(zip(members, starts)):
            heads[r] = m._gqa_core(layer, w, q[r : r + 1], k[r : r + 1], v[r : r + 1], start)[0]
        return self._attention_output(w, heads)

    def forward(self, tokens: np.ndarray, all_logits: bool = False) -> np.ndarray:
        """Run new tokens after the cached ones; logits of every new token, or of the last.

        Tokens run in micro-batches of n_ubatch, as llama.cpp splits a batch: that bounds the
        activations a long prompt needs, and keeps the kernel choices (which depend on how
        many tokens a matmul gets) the same as llama.cpp's."""
        if self.batcher is not None and not self.batcher.on_compute_thread():
            return self.batcher.forward(self, tokens, all_logits)  # run there, perhaps with other sequences' tokens
        n = len(tokens)
        if self.file_check is not None:
            self.file_check()
        self._check_room(n)
        self.shift_keys()
        tokens = np.asarray(tokens, dtype=np.int64)
        size = self.n_ubatch
        chunks = [tokens[i : i + size] for i in range(0, n, size)]
        if all_logits:
            return np.concatenate([self._ubatch(c, "all") for c in chunks])
        if n == 1 and self.prefetcher is not None:  # a decoding token: the prefetch gate times it
            self.prefetcher.start_token()
            try:
                return self._ubatch(tokens, "last")
            finally:
                self.prefetcher.end_token()
        for c in chunks[:-1]:
            self._ubatch(c, "none")
        return self._ubatch(chunks[-1], "last")

    def _check_room(self, n: int) -> None:
        if self.cache.n_past + n > self.cache.n_ctx:
            raise ContextOverflowError(
                f"{self.cache.n_past + n} tokens do not fit the context of {self.cache.n_ctx} (raise -c / n_ctx)"
            )

    def _ubatch(self, tokens: np.ndarray, outputs: str) -> np.ndarray | None:
        """One micro-batch through every layer; `outputs` says whose logits are wanted: "all",
        "last" or "none". Like llama.cpp, the last layer keeps only those rows after its
        attention (whose keys and values every row still adds to the cache), or after the
        layer where the arch's graph drops them there (ModelArgs.early_row_drop)."""
        n = len(tokens)
        if n == 1 and (plan := self._decode_step()) is not None:
            return self._step_token(plan, tokens, outputs)
        start = self.cache.n_past
        a, buf = self.args, self.scratch
        x = self.weights.embed(tokens)
        self.cache.place(start, n)
        last = len(self.weights.layers) - 1
        for i, layer in enumerate(self.weights.layers):
            if n > 1 or not self._attention_token(i, layer.attn, x, start):  # (a decoding token: x += in one C call)
                h = rms_norm(x, layer.attn.norm, a.rms_eps, out=buf("norm", n, a.n_embd))
                attn = self._attention(i, layer.attn, h, start)
                if i == last and outputs != "all" and n > 1 and (a.early_row_drop or outputs == "none"):
                    keep = slice(n - 1, n) if outputs == "last" else slice(0, 0)
                    x, attn = x[keep].copy(), attn[keep]
                if len(x) == 0:
                    break
                x += attn
            if self.prefetcher is not None:  # the next layers' experts, read while this one computes
                self._predict(i, x)
            h = rms_norm(x, layer.ffn_norm, a.rms_eps, out=buf("norm", len(x), a.n_embd))
            x += self._moe(i, layer.moe, h) if layer.moe else _ffn(layer.dense, h, buf, gpu=self.gpu)
            if not math.isfinite(x[-1].sum()):  # one row's sum: cheap, and attention spreads a NaN to it
                raise _non_finite(i, start, start + n - 1)
        if self.prefetcher is not None:  # the next token's first experts, read while it is sampled
            self.prefetcher.end_of_token(x)
        self.cache.n_past = start + n
        if outputs == "none":
            return None
        if outputs == "last":
            x = x[-1:]
        x = rms_norm(x, self.weights.output_norm, a.rms_eps)
        return self._matmul(self.weights.output, np.ascontiguousarray(x))

    def _decode_step(self) -> step.DecodeStep | None:
        """The plan that runs a decoding token in one C call (kernels.step), when it serves this
        model as it runs now (no GPU tier, no prefetching, every expert resident...), else None."""
        if self.gpu is not None or self.prefetcher is not None or self.cache.layout is not None or not step_enabled():
            return None  # (a cache whose cells no longer follow positions, after a context shift: the layers below)
        isa = cext.isa()
        if self._step is None or self._step_isa != isa:  # the plan holds the row dots of a SIMD level
            self._step = step.DecodeStep(self, jit.max_threads()) if step.why_not(self) is None else False
            self._step_isa = isa
        return self._step or None

    def _step_token(self, plan: step.DecodeStep, token: np.ndarray, outputs: str) -> np.ndarray | None:
        """One decoding token through every layer in one C call; the same bits as the layers below."""
        start = self.cache.n_past
        x = np.ascontiguousarray(self.weights.embed(token), dtype=np.float32)
        logits = np.empty((1, plan.n_vocab), dtype=np.float32) if plan.has_output and outputs != "none" else None
        bad = plan.run(x, start, logits)
        if bad >= 0:
            raise _non_finite(bad, start, start)
        self.cache.n_past = start + 1
        if self.recorder is not None:
            for i in plan.moe_layers:
                self.recorder.record(i, plan.chosen[i : i + 1], plan.weights[i : i + 1])
        note_uses = getattr(self.experts, "note_uses", None)  # a store's (or a view of it's) counts of expert uses
        if note_uses is not None:
            note_uses(plan.moe_layers, plan.chosen)
        if outputs == "none":
            return None
        if logits is None:  # an output matrix the C step has no kernel for
            x = rms_norm(x, self.weights.output_norm, self.args.rms_eps)
            logits = self._matmul(self.weights.output, x)
        return logits

    def shift_context(self, n_keep: int, n_discard: int) -> None:
        """llama.cpp's context shift: forget positions n_keep .. n_keep+n_discard-1 and move the
        later ones down (KVCache.shift); their keys are rotated before the next step."""
        check_can_shift(self.args, self.cache.type_k)
        self.cache.shift(n_keep, n_discard)

    def shift_keys(self) -> None:
        """Rotate the cached keys of moved positions by their moves (llama.cpp's K-shift, which
        its next decode runs first), once per group of layers sharing cells."""
        c = self.cache
        if c.layout is None or not any(cells.has_shift for cells in c.layout.values()):
            return
        for i, group in enumerate(c.groups):
            cells = c.layout[group]
            if cells.has_shift:
                rotate_keys(self.args, c.k[i], c.k_fmt, cells.shift, self.args.rope_base_of(i))
        for cells in c.layout.values():
            cells.reset_shift()

    def _matmul(self, w, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        return matmul(w, x, out=out) if self.gpu is None else self.gpu.matmul(w, x, out=out)

    def _matmuls(self, ws, x: np.ndarray, outs) -> list[np.ndarray]:
        return matmuls(ws, x, outs=outs) if self.gpu is None else self.gpu.matmuls(ws, x, outs=outs)

    def _expert(self, layer: int, expert: int, x: np.ndarray, ffn: FFN | None = None) -> np.ndarray:
        """A routed expert's output (its activation, its biases if any): from the store on the
        CPU, or where the GPU tier runs it."""
        biases = self.weights.layers[layer].moe.expert_biases
        kind = dict(expert=True, act=self.args.expert_act, bias=None if biases is None else biases.of(expert))
        if self.gpu is None:
            return _ffn(ffn or self.experts.get(layer, expert), x, self.scratch, **kind)
        return self.gpu.expert_ffn(layer, expert, x, lambda w, x: _ffn(w, x, self.scratch, **kind))

    @staticmethod
    def _expert_biases(w: MoE, experts) -> list | None:
        """Each expert's (gate, up, down) bias rows, for kernels.moe; None without biases."""
        b = w.expert_biases
        return None if b is None else [b.of(int(e)) for e in experts]

    def _predict(self, layer: int, x: np.ndarray) -> None:
        """Hand the predictor's guesses for the next MoE layers to the store (and the recorder)."""
        preds = self.prefetcher.after_attention(layer, x)
        rec = self.recorder
        if rec is not None and hasattr(rec, "record_prediction"):
            for target, experts, _ in preds:
                rec.record_prediction(layer, target, experts)

    def _attention(self, layer: int, w: Attention | LatentAttention, x: np.ndarray, start: int) -> np.ndarray:
        """The attention block's output for x (its input, normed): grouped-query or latent."""
        kind = self.args.attention
        if kind == "gqa":
            return self._gqa_attention(layer, w, x, start)
        if kind == "mla":
            return self._latent_attention(layer, w, x, start)
        return self._decompressed_attention(layer, w, x, start)

    def _gqa_attention(self, layer: int, w: Attention, x: np.ndarray, start: int) -> np.ndarray:
        q, k, v = self._qkv(w, x)
        return self._attention_output(w, self._gqa_core(layer, w, q, k, v, start))

    def _qkv(self, w: Attention, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The projections of x's rows into query and key heads (n, heads, head_dim) and values,
        with their biases and norms: each row on its own, so a batch of sequences' tokens may
        share one call (decode_together)."""
        a, buf = self.args, self.scratch
        n, hd = len(x), a.head_dim
        q, k, v = self._matmuls((w.wq, w.wk, w.wv), x, outs=(buf("q", n, w.wq.n_rows), buf("k", n, w.wk.n_rows),
                                                            buf("v", n, w.wv.n_rows)))
        if w.bq is not None:  # each bias is optional on its own
            q = q + w.bq
        if w.bk is not None:
            k = k + w.bk
        if w.bv is not None:
            v = v + w.bv
        if a.qk_norm == "full":
            q, k = rms_norm(q, w.q_norm, a.rms_eps), rms_norm(k, w.k_norm, a.rms_eps)
        q = q.reshape(n, a.n_head, hd)
        k = k.reshape(n, a.n_head_kv, hd)
        if a.qk_norm == "head":
            q, k = rms_norm(q, w.q_norm, a.rms_eps), rms_norm(k, w.k_norm, a.rms_eps)
        return q, k, v

    def _gqa_core(self, layer: int, w: Attention, q: np.ndarray, k: np.ndarray, v: np.ndarray,
                  start: int) -> np.ndarray:
        """This sequence's part of the attention for tokens at start..: RoPE, the cache, the
        attention over it; q, k are rotated in place. Returns the heads' outputs (n, n_head * head_dim)."""
        a, buf = self.args, self.scratch
        n, hd = len(q), a.head_dim
        cos, sin = self.rope[layer]
        apply_rope(q, cos[start : start + n], sin[start : start + n], a.rope_dim, a.rope_style)
        apply_rope(k, cos[start : start + n], sin[start : start + n], a.rope_dim, a.rope_style)
        if self.cache.k_rotation:  # the same rotation of both leaves K.q as it is, up to rounding
            q, k = hadamard_rows(q, self.cache.k_rotation), hadamard_rows(k, self.cache.k_rotation)
        if self.cache.v_rotation:  # undone on the output: sum p (H v) = H sum p v
            v = hadamard_rows(v, self.cache.v_rotation)
        self.cache.write(layer, start, k.reshape(n, -1), v)
        out = self._attend(layer, q.reshape(n, -1), start, a.n_head, a.n_head_kv, hd,
                           out=buf("attn", n, a.n_head * hd), window=a.window(layer), sinks=w.sinks)
        if self.cache.v_rotation:
            out = hadamard_rows(out, self.cache.v_rotation)
        return out

    def _attention_output(self, w: Attention, heads: np.ndarray) -> np.ndarray:
        out = self._matmul(w.wo, heads, out=self.scratch("attn_out", len(heads), self.args.n_embd))
        if w.bo is not None:
            out += w.bo
        return out

    def _attend(self, layer: int, q: np.ndarray, start: int, n_head: int, n_head_kv: int, head_dim: int,
                out: np.ndarray | None = None, **kw) -> np.ndarray:
        """The attention of queries q over this layer's cache, in the cache's types."""
        c = self.cache
        kw["cell_pos"] = c.cell_positions(layer)
        if c.flash_attn:
            return flash_attention(q, c.k[layer], c.k_fmt, c.v[layer], c.v_fmt, start, n_head, n_head_kv, head_dim,
                                   **kw)
        if c.float32:
            return attention(q, c.k[layer], c.v[layer], start, n_head, n_head_kv, head_dim, out=out, **kw)
        return attention_typed(q, c.k[layer], c.k_fmt, c.v[layer], c.v_fmt, start, n_head, n_head_kv, head_dim, **kw)

    def _latent_attention(self, layer: int, w: LatentAttention, x: np.ndarray, start: int) -> np.ndarray:
        """DeepSeek's MLA in llama.cpp's absorbed form: the cache holds [latent, rope key] per
        token; each head's query is [k_b . q_nope, rope(q_pe)], the attention runs over the
        cache as one KV head whose first kv_lora_rank floats are the values, and v_b maps
        each head's result back out (deepseek2.cpp)."""
        a, n = self.args, len(x)
        r, rope, nope = a.kv_lora_rank, a.rope_dim, a.head_dim - a.rope_dim
        q, q_pe, latent, k_pe = self._mla_inputs(layer, w, x, start)
        queries = np.empty((n, a.n_head, r + rope), dtype=np.float32)
        queries[:, :, r:] = q_pe
        absorbed = matmul_heads(w.wk_b, q[0, :, :nope]) if n == 1 else None  # one C call for every head
        if absorbed is not None:
            queries[0, :, :r] = absorbed
        else:
            for h in range(a.n_head):  # q_nope through k_b (ggml reads q_nope as a permuted view)
                queries[:, h, :r] = _head_matmul(w.wk_b[h], q[:, h, :nope], src1_contiguous=False)
        self.cache.write(layer, start, np.concatenate([latent, k_pe[:, 0]], axis=1), None)
        out = self._attend(layer, queries.reshape(n, -1), start, a.n_head, 1, r + rope, v_dim=r, scale=self._mla_scale)
        heads = matmul_heads(w.wv_b, out.reshape(a.n_head, r)) if n == 1 else None
        if heads is None:
            heads = np.empty((n, a.n_head, a.v_head_dim), dtype=np.float32)
            contiguous = not self.cache.flash_attn  # flash attention's output reaches v_b as a permuted view
            for h in range(a.n_head):
                heads[:, h] = _head_matmul(w.wv_b[h], out[:, h * r : (h + 1) * r], src1_contiguous=contiguous)
        return self._matmul(w.wo, heads.reshape(n, -1))

    def _decompressed_attention(self, layer: int, w: LatentAttention, x: np.ndarray, start: int) -> np.ndarray:
        """MLA as older DeepSeek files run in llama.cpp (one attn_kv_b): the latent decompressed
        into per-head [k_nope, v], each head's key [k_nope, rope key], plain attention over
        a cache of those keys and values."""
        a, n = self.args, len(x)
        nope = a.head_dim - a.rope_dim
        q, q_pe, latent, k_pe = self._mla_inputs(layer, w, x, start)
        q[:, :, nope:] = q_pe
        kv = self._matmul(w.wkv_b, latent).reshape(n, a.n_head, nope + a.v_dim)
        keys = np.empty((n, a.n_head, a.head_dim), dtype=np.float32)
        keys[:, :, :nope] = kv[:, :, :nope]
        keys[:, :, nope:] = k_pe  # the one rope key, repeated for every head
        self.cache.write(layer, start, keys.reshape(n, -1), kv[:, :, nope:].reshape(n, -1))
        out = self._attend(layer, np.ascontiguousarray(q.reshape(n, -1)), start, a.n_head, a.n_head_kv, a.head_dim,
                           v_dim=a.v_dim, scale=self._mla_scale)
        return self._matmul(w.wo, out)

    def _mla_inputs(self, layer: int, w: LatentAttention, x: np.ndarray, start: int):
        """Both MLA forms' first steps: queries (n, n_head, head_dim) and their RoPE'd
        trailing part (n, n_head, rope_dim), the normed latent (n, kv_lora_rank) and the
        RoPE'd shared key (n, 1, rope_dim)."""
        a, n = self.args, len(x)
        r, rope, nope = a.kv_lora_rank, a.rope_dim, a.head_dim - a.rope_dim
        if w.wq is not None:
            q = self._matmul(w.wq, x)
        else:
            q = self._matmul(w.wq_b, rms_norm(self._matmul(w.wq_a, x), w.q_a_norm, a.rms_eps))
        q = q.reshape(n, a.n_head, a.head_dim)
        kv = self._matmul(w.wkv_a, x)  # (n, r + rope)
        cos, sin = self.rope[layer]
        cos, sin = cos[start : start + n], sin[start : start + n]
        k_pe = np.ascontiguousarray(kv[:, None, r:])
        apply_rope(k_pe, cos, sin, rope, a.rope_style)
        latent = rms_norm(np.ascontiguousarray(kv[:, :r]), w.kv_a_norm, a.rms_eps)
        q_pe = np.ascontiguousarray(q[:, :, nope:])
        apply_rope(q_pe, cos, sin, rope, a.rope_style)
        return q, q_pe, latent, k_pe

    def _attention_token(self, layer: int, w: Attention, x: np.ndarray, start: int) -> bool:
        """x += the attention block of one decoding token, in one C call (kernels.block) where
        the C kernels serve its matrices and no GPU tier runs them; False if not run."""
        a = self.args
        c = self.cache
        if (a.attention != "gqa" or self.gpu is not None or c.layout is not None or c.flash_attn
                or not block.attention_fits(w) or c.k_fmt.name not in block.CACHE_TYPES
                or c.v_fmt.name not in block.CACHE_TYPES):
            return False
        if self._block_scratch is None:
            self._block_scratch = block.attention_scratch(a)
        cos, sin = self.rope[layer]
        block.attention_token(a, w, x, start, cos[start], sin[start], c.k[layer], c.v[layer], self._block_scratch,
                              a.window(layer), c.k_fmt.name == "F16", c.v_fmt.name == "F16")
        return True

    def _moe(self, layer: int, w: MoE, x: np.ndarray) -> np.ndarray:
        """Route each token to its top-k experts; run each chosen expert once on its tokens.
        Each token's expert outputs, weighted, are summed in slot order as llama.cpp does."""
        a, buf = self.args, self.scratch
        logits = self._matmul(w.router, x, out=buf("router", len(x), w.router.n_rows))
        if w.router_bias is not None:
            logits += w.router_bias
        chosen, weights = route(logits, a.n_expert_used, a.routing, w.selection_bias,
                                (a.expert_groups, a.expert_groups_used), a.expert_weights_scale)
        if self.recorder is not None:
            self.recorder.record(layer, chosen, weights)
        prefetch = getattr(self.experts, "prefetch", None)
        if prefetch is not None:  # a tiered store starts reading the others while the first one computes
            prefetch(layer, np.unique(chosen) if len(x) > 1 else chosen[0])
        if self.prefetcher is not None:
            self.prefetcher.routed(layer, chosen)
        shared = None
        if len(x) == 1:
            out, shared = self._moe_token(layer, w, x, chosen[0], weights[0])
        else:
            out = self._moe_batch(layer, w, x, chosen, weights)
        if w.shared is not None:
            if shared is None:
                shared = _ffn(w.shared, x, buf, gpu=self.gpu)
            if w.shared_gate is not None:
                shared = shared * _sigmoid(self._matmul(w.shared_gate, x))
            out = out + shared
        return out

    def _moe_token(self, layer: int, w: MoE, x: np.ndarray, chosen: np.ndarray, weights: np.ndarray):
        """A decoding token's k experts, weighted and summed in slot order: all of them and the
        shared expert in one C call where the C kernels serve their formats (kernels.moe), else
        one expert at a time. Returns (out, the shared expert's output or None if not run)."""
        a, buf = self.args, self.scratch
        out = buf("moe", 1, a.n_embd)
        if self.gpu is not None:  # kernels.moe runs on the CPU only (formats checked below)
            routed = [lambda e=int(e): self._expert(layer, e, x) for e in chosen]
        else:
            ffns = [self.experts.get(layer, int(e)) for e in chosen]
            shared = () if w.shared is None else (w.shared,)
            if can_fuse(ffns[:1] + list(shared)):  # a layer's routed experts share their formats
                shared_out = buf("moe_shared", 1, a.n_embd) if shared else None
                moe_ffn(x, ffns, weights, out, shared, shared_out, act=a.expert_act,
                        biases=self._expert_biases(w, chosen))
                return out, shared_out
            routed = [lambda e=int(e), f=f: self._expert(layer, e, x, f) for e, f in zip(chosen, ffns)]
        for slot, expert_output in enumerate(routed):
            y = expert_output()
            if slot == 0:
                np.multiply(y, weights[slot], out=out)
            else:
                y *= weights[slot]
                out += y
        return out, None

    def _moe_batch(self, layer: int, w: MoE, x: np.ndarray, chosen: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """Several tokens: each chosen expert runs once on the tokens routed to it, in C calls
        of many experts where the C kernels serve their formats (kernels.moe), else one by one.
        Each token's weighted expert outputs are summed in slot order."""
        a = self.args
        per_slot = np.zeros((len(x), a.n_expert_used, a.n_embd), dtype=np.float32)
        experts, counts = np.unique(chosen, return_counts=True)
        if self.gpu is None and types_fuse(w.expert_types):
            pairs = np.stack(np.divmod(np.argsort(chosen, axis=None, kind="stable"), a.n_expert_used), axis=1)
            # a tiered store keeps n_expert_used experts of a layer pinned at most
            per_call = min(len(experts) if getattr(self.experts, "all_resident", True) else a.n_expert_used,
                           cext.MOE_MAX_JOBS)
            done = 0
            for i in range(0, len(experts), per_call):
                ffns = [self.experts.get(layer, int(e)) for e in experts[i : i + per_call]]
                n = int(counts[i : i + per_call].sum())
                moe_batch(x, ffns, counts[i : i + per_call], pairs[done : done + n], weights, per_slot,
                          act=a.expert_act, biases=self._expert_biases(w, experts[i : i + per_call]))
                done += n
        else:
            for expert in experts:
                tokens, slots = np.nonzero(chosen == expert)
                y = self._expert(layer, int(expert), np.ascontiguousarray(x[tokens]))
                per_slot[tokens, slots] = y * weights[tokens, slots][:, None]
        out = per_slot[:, 0]
        for s in range(1, a.n_expert_used):
            out = out + per_slot[:, s]
        return out


def _non_finite(layer: int, first: int, last: int) -> NonFiniteError:
    return NonFiniteError(f"layer {layer} produced NaN or Inf activations (positions {first}..{last}): "
                          "the file's weights are damaged or overflow float32")


def _ffn(w: FFN, x: np.ndarray, buf: Scratch, expert: bool = False, gpu=None, act: str = "swiglu",
         bias: tuple | None = None) -> np.ndarray:
    """down(act(gate·x, up·x)); `expert` marks a routed expert (llama.cpp's mul_mat_id sums in
    its own order); `act` "swiglu" or "swiglu_oai"; `bias`: (gate, up, down) biases added
    after each matmul. The result may live in `buf`: use it before the next _ffn with the
    same buffers. `gpu`: the GPU tier, for a dense or shared FFN whose matrices it placed in VRAM."""
    n = len(x)
    mm, mms = (matmul, matmuls) if gpu is None else (gpu.matmul, gpu.matmuls)
    gate, up = mms((w.gate, w.up), x, expert=expert,
                   outs=(buf("ffn_gate", n, w.gate.n_rows), buf("ffn_up", n, w.up.n_rows)))
    if bias is not None:
        gate += bias[0]
        up += bias[1]
    h = ggml_math.silu_mul(gate, up, out=gate) if act == "swiglu" else ggml_math.swiglu_oai(gate, up, out=gate)
    out = mm(w.down, h, expert=expert, out=buf("ffn_down", n, w.down.n_rows))
    if bias is not None:
        out += bias[2]
    return out


def _head_matmul(w, x: np.ndarray, src1_contiguous: bool) -> np.ndarray:
    """One head's slice of ggml's batched mul_mat: float32 weights on a non-contiguous
    operand (a permuted view) skip tinyBLAS, which `expert` order stands for; other types
    convert the operand into a contiguous buffer first, so they take the plain order."""
    float32 = w.fmt.name == "F32"
    return matmul(w, np.ascontiguousarray(x), expert=float32 and not src1_contiguous)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    """The shared-expert gate (n, 1): sigmoid as llama.cpp computes it, silu(x) / x."""
    return ggml_math.sigmoid_as_silu_div(x)


