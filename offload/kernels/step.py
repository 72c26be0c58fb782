"""A whole decoding step in one C call (cext/step.c): every layer of one token, then the logits.

On a small or fine-grained MoE model a decoding token is dozens of small matmuls. The
per-layer path (forward.Transformer with kernels.block and kernels.moe) makes a few C calls
per layer, each with its argument handling and its own fork/join of the thread team, and
runs the router and the routing in between from Python; on the demo model that was a fifth
of a token. `DecodeStep` hands the C code a plan of the whole model once (addresses of the
weights in the memory map, of the norms, biases, RoPE tables and KV cache rows), then runs
each token in one call and one parallel region.

It serves the models whose every piece the C step has: grouped-query attention (windows,
sinks, biases, q/k norms) or DeepSeek's latent attention in its absorbed form (a plain or
low-rank query, k_b and v_b per head) over an F32 or F16 cache; dense SwiGLU layers; MoE
layers with an F32 router, routing of the kinds in ROUTINGS (with a router bias or a
selection bias, expert groups, a weights scale), experts and shared expert in C formats, all
resident (the memory map, or a tiered store holding every expert). Anything else (a budget
that tiers the experts, prefetch, the GPU tier, flash attention, a legacy DeepSeek file's
decompressed MLA) takes the per-layer path, which computes the same bits.
"""

from __future__ import annotations

import numpy as np

from . import cext
from .dispatch import C_FORMATS, head_stack, step_enabled
from .moe import can_fuse, types_fuse

# forward.route's kinds that cext/step.c runs (its ROUTE_* numbers)
ROUTINGS = {"softmax_topk": 0, "softmax_topk_norm": 1, "topk_softmax": 2, "sigmoid_topk": 3, "sigmoid_topk_norm": 4}
_QK_NORM = {None: 0, "head": 1, "full": 2}
_ACT = {"swiglu": 0, "swiglu_oai": 1}
MAX_JOBS = getattr(cext._cext, "MOE_MAX_JOBS", 0)


def _address(a: np.ndarray | None) -> int:
    """An array's data address for the plan (0: none); float32 C-contiguous, kept alive by the caller."""
    if a is None:
        return 0
    if a.dtype != np.float32 or not a.flags.c_contiguous:
        raise ValueError("the decode step takes float32 C-contiguous arrays")
    return a.ctypes.data


def _float_vector(a: np.ndarray | None, n: int) -> np.ndarray | None:
    if a is None:
        return None
    a = np.ascontiguousarray(a, dtype=np.float32)
    if a.size != n:
        raise ValueError(f"a vector of {a.size} values where {n} belong")
    return a.reshape(n)


def why_not(t) -> str | None:
    """Why the decode step cannot serve this forward.Transformer now; None when it can."""
    a, w, c = t.args, t.weights, t.cache
    if not step_enabled():
        return "the C step is off (OFFLOAD_STEP=0, OFFLOAD_FUSED=0, Numba kernels) or not built"
    if t.gpu is not None or t.prefetcher is not None:
        return "a GPU tier or prefetching runs per layer"
    if a.attention not in ("gqa", "mla"):
        return f"{a.attention} attention"
    if c.flash_attn:
        return "flash attention runs per layer"
    if c.k_fmt.name not in ("F32", "F16") or c.v_fmt.name not in ("F32", "F16"):
        return f"a {c.k_fmt.name}/{c.v_fmt.name} KV cache"
    if a.routing not in ROUTINGS or a.expert_act not in _ACT:
        return f"routing {a.routing}, activation {a.expert_act}"
    if a.n_expert_used + 1 > MAX_JOBS:
        return f"{a.n_expert_used} experts per token"
    from .block import attention_fits  # noqa: PLC0415 (block imports dispatch too)

    for i, layer in enumerate(w.layers):
        if not (latent_fits(layer.attn) if a.attention == "mla" else attention_fits(layer.attn)):
            return f"layer {i}'s attention matrices"
        if layer.moe is None:
            if not can_fuse([layer.dense]):
                return f"layer {i}'s FFN formats"
            continue
        m = layer.moe
        if (m.router.fmt.name != "F32" or (m.router.n_rows, m.router.n_cols) != (a.n_expert, a.n_embd)
                or not types_fuse(m.expert_types)):
            return f"layer {i}'s router or expert formats"
        if m.shared is not None and not can_fuse([m.shared]):
            return f"layer {i}'s shared expert formats"
        if m.shared_gate is not None and (m.shared_gate.fmt.name != "F32" or m.shared_gate.n_rows != 1):
            return f"layer {i}'s shared expert gate"
        if _resident(t.experts, i) is None:
            return "experts move through the tiered store"
    return None


def latent_fits(w) -> bool:
    """Whether the C step serves this MLA layer's weights (weights.LatentAttention, absorbed
    form): its query, kv_a and output matrices in C formats, k_b's and v_b's heads one after
    another in one (dispatch.head_stack, as the per-layer path's matmul_heads takes them)."""
    if w.wk_b is None or w.wv_b is None:
        return False
    mats = [w.wkv_a, w.wo] + ([w.wq] if w.wq is not None else [w.wq_a, w.wq_b])
    return (all(m is not None and m.fmt.ggml_type in C_FORMATS for m in mats)
            and (w.wq is not None or w.q_a_norm is not None)
            and head_stack(w.wk_b) is not None and head_stack(w.wv_b) is not None)


def _resident(store, layer: int):
    """The layer's experts (weights.FFN, by id) when the store holds every one in place, else None."""
    of = getattr(store, "resident_ffns", None)
    return None if of is None else of(layer)


class DecodeStep:
    """The plan of a Transformer's decoding step (build it when why_not(t) is None) and its runs."""

    def __init__(self, t, n_threads: int):
        a, w, c = t.args, t.weights, t.cache
        self._keep: list = []  # every array the plan points into
        layers = tuple(self._layer(t, i) for i in range(a.n_layer))
        out = None
        if w.output.fmt.ggml_type in C_FORMATS:
            out = (self._vector(w.output_norm, a.n_embd), (w.output.fmt.name, w.output.address, w.output.n_rows))
        dims = (a.n_embd, a.n_head, a.n_head_kv, a.head_dim, a.rope_dim, int(a.rope_style == "neox"), _QK_NORM[a.qk_norm],
                a.rms_eps, a.n_expert_used, ROUTINGS[a.routing], float(a.expert_weights_scale), c.n_ctx,
                int(c.k_fmt.name == "F16"), int(c.v_fmt.name == "F16"), _ACT[a.expert_act], n_threads,
                a.expert_groups if a.expert_groups > 1 else 0, a.expert_groups_used)
        self._plan = cext._cext.step_plan(dims, layers, out)
        self.has_output = out is not None
        self.n_vocab = w.output.n_rows
        self.chosen = np.zeros((a.n_layer, a.n_expert_used), dtype=np.int64)
        self.weights = np.zeros((a.n_layer, a.n_expert_used), dtype=np.float32)
        self.moe_layers = [i for i, layer in enumerate(w.layers) if layer.moe is not None]

    def _vector(self, v: np.ndarray | None, n: int) -> int:
        v = _float_vector(v, n)
        if v is not None:
            self._keep.append(v)
        return _address(v)

    def _layer(self, t, i: int) -> tuple:
        a, c = t.args, t.cache
        layer = t.weights.layers[i]
        at = layer.attn
        # a forked context (Transformer.resize_context) is shorter than the tables: its first rows
        cos, sin = (np.ascontiguousarray(r[: c.n_ctx], dtype=np.float32) for r in t.rope[i])
        if cos.shape != (c.n_ctx, a.rope_dim // 2) or sin.shape != cos.shape:
            raise ValueError(f"layer {i}'s RoPE tables do not cover the context")
        self._keep += [cos, sin, c.k[i], c.v[i]]
        if a.attention == "mla":
            return self._latent(t, i, cos, sin) + (self._ffn(t, i),)
        q_dim, kv_dim = a.n_head * a.head_dim, a.n_head_kv * a.head_dim
        norm_q, norm_k = (q_dim, kv_dim) if a.qk_norm == "full" else (a.head_dim, a.head_dim)
        k_cache, v_cache = c.k[i], c.v[i]
        if not (k_cache.flags.c_contiguous and v_cache.flags.c_contiguous):
            raise ValueError("the KV cache rows are not contiguous")
        v = self._vector
        attention = (a.window(i) or 0, len(k_cache), k_cache.ctypes.data, v_cache.ctypes.data, v(at.norm, a.n_embd),
                     at.kernel_spec, v(at.bq, q_dim), v(at.bk, kv_dim), v(at.bv, kv_dim),
                     v(at.q_norm, norm_q), v(at.k_norm, norm_k), v(at.bo, a.n_embd), v(at.sinks, a.n_head),
                     _address(cos), _address(sin), v(layer.ffn_norm, a.n_embd))
        return attention + (self._ffn(t, i),)

    def _latent(self, t, i: int, cos: np.ndarray, sin: np.ndarray) -> tuple:
        """An MLA layer's attention spec (cext/module.c's step_latent_of), without its FFN."""
        a, c = t.args, t.cache
        layer = t.weights.layers[i]
        at = layer.attn
        cache = c.k[i]  # (n_cells, kv_lora_rank + rope_dim): the latent and the rope key, K and V at once
        if not cache.flags.c_contiguous or len(cache) != c.n_ctx:
            raise ValueError("the latent cache rows are not contiguous, or not one per position")
        v = self._vector
        spec = lambda m: (m.fmt.name, m.address, m.n_rows)  # noqa: E731
        k_b, v_b = head_stack(at.wk_b), head_stack(at.wv_b)
        self._keep += [k_b, v_b]
        q = spec(at.wq) if at.wq is not None else spec(at.wq_b)
        q_a = None if at.wq is not None else spec(at.wq_a)
        mats = (q, q_a, spec(at.wkv_a), k_b.kernel_spec, v_b.kernel_spec, spec(at.wo))
        dims = (a.q_lora_rank if at.wq is None else 0, a.kv_lora_rank, a.v_head_dim, float(t._mla_scale))
        return ("mla", dims, len(cache), cache.ctypes.data, v(at.norm, a.n_embd),
                v(at.q_a_norm, a.q_lora_rank) if at.wq is None else 0, v(at.kv_a_norm, a.kv_lora_rank), mats,
                _address(cos), _address(sin), v(layer.ffn_norm, a.n_embd))

    def _ffn(self, t, i: int) -> tuple:
        """A layer's FFN spec: ("dense", spec), or its router, routing biases, experts and shared expert."""
        a = t.args
        layer = t.weights.layers[i]
        v = self._vector
        if layer.moe is None:
            return ("dense", layer.dense.kernel_spec)
        m = layer.moe
        router = np.asarray(m.router.data).view(np.float32).reshape(a.n_expert, a.n_embd)
        self._keep.append(router)
        experts = _resident(t.experts, i)
        biases = None
        if m.expert_biases is not None:
            rows = [m.expert_biases.of(e) for e in range(a.n_expert)]
            biases = tuple((v(g, len(g)), v(u, len(u)), v(d, a.n_embd)) for g, u, d in rows)
        shared_gate = None
        if m.shared_gate is not None:
            shared_gate = np.asarray(m.shared_gate.data).view(np.float32).reshape(a.n_embd)
            self._keep.append(shared_gate)
        ffn = (a.n_expert, router.ctypes.data, v(m.router_bias, a.n_expert), v(m.selection_bias, a.n_expert),
               tuple(f.kernel_spec for f in experts), biases, None if m.shared is None else m.shared.kernel_spec,
               _address(shared_gate))
        return ffn

    def run(self, x: np.ndarray, pos: int, logits: np.ndarray | None) -> int:
        """x (1, n_embd) float32: the token's embedding, then the last layer's output; logits
        (1, n_vocab) when the plan has the output matrix. Returns the first layer whose output
        is not finite, or -1. self.chosen / self.weights hold each MoE layer's routing."""
        return cext._cext.step_run(self._plan, x, pos, logits, self.chosen, self.weights)
