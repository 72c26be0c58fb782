"""The C kernels (cext/, built by setup.py into offload._cext) behind the matmul signature.

`c_kernel(fmt_name)` returns `kernel(w, act, out, vec_dot)` like the Numba ones, or None
when the extension was not built or has no kernel for the format. The C kernels sum in
the same ggml order as the Numba ones, so either gives the same bits.

The step's small ops (RMS norm, softmax, SiLU, RoPE, top-k routing, the lookahead
predictor) have C twins too: `selected()` says whether this run uses them, which is when it
uses the C matmuls (`dispatch.select_kernels`). Then Numba is never imported, unless the
model has a format without a C kernel.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .numba_kernels import float_order

try:
    from .. import _cext
except ImportError:  # built without a compiler: Numba only
    _cext = None

Kernel = Callable[[np.ndarray, tuple, np.ndarray, bool], None]
_selected = False  # select(): the C kernels and ops serve this run


def select(on: bool) -> None:
    """Use the C ops (when built: a build from before them keeps the Numba ones)."""
    global _selected
    _selected = on and _cext is not None and hasattr(_cext, "rms_norm")


def selected() -> bool:
    """Whether the small ops take their C twins (the C kernels were built and chosen)."""
    return _selected


def available() -> bool:
    return _cext is not None


def formats() -> dict[str, tuple[str, list[str]]]:
    """{format name: (vec_dot_type, SIMD levels built and runnable here)}; empty without the extension."""
    return _cext.formats() if _cext is not None else {}


def isa() -> str | None:
    """The SIMD level the C kernels use ("avx512", "avx2", "portable"), None without them."""
    return _cext.isa() if _cext is not None else None


def levels() -> list[str]:
    """The SIMD levels this CPU can run the C kernels at, lowest first; empty without them."""
    if _cext is None:
        return []
    order = ["portable", "avx2", "avx512"]
    return order[: order.index(_cext.best_isa()) + 1]


def set_isa(name: str | None) -> None:
    """Use a lower SIMD level (tests run every level); None restores the best one."""
    _cext.set_isa(_cext.best_isa() if name is None else name)


def set_num_threads(n: int) -> None:
    if _cext is not None:
        _cext.set_num_threads(n)


MATMUL_X_MAX = getattr(_cext, "MATMUL_X_MAX", 0)  # matrices one matmul_x call takes (cext/module.c)


def has_matmul_x() -> bool:
    return _cext is not None and hasattr(_cext, "matmul_x")


def matmul_x(x: np.ndarray, n_tokens: int, specs: tuple) -> None:
    """Quantize x (float32, C-contiguous) once per activation type and run each (fmt name, w,
    out, n_rows) of `specs` on it: a whole matmul group in one C call."""
    _cext.matmul_x(x, n_tokens, x.shape[1], specs)


def has_moe_ffn() -> bool:
    return _cext is not None and hasattr(_cext, "moe_ffn")


def moe_workspace_bytes(n_embd: int, n_ffs: tuple[int, ...]) -> int:
    return _cext.moe_workspace_bytes(n_embd, n_ffs)


MOE_ACTS = {"swiglu": 0, "swiglu_oai": 1}  # cext/moe.h's MOE_ACT_*


def moe_ffn(x, out, shared_out, workspace, n_routed: int, specs: tuple, weights: np.ndarray, act: str = "swiglu",
            biases: tuple | None = None) -> None:
    """One token through a MoE layer's experts in one parallel region (cext/moe.c): specs are
    (gate fmt, gate address, up fmt, up address, down fmt, down address, n_ff), the n_routed
    routed experts first (scaled by weights, float32, and summed into out), then the shared
    ones (rows of shared_out). The routed experts' activation is `act` ("swiglu" or
    "swiglu_oai"); `biases`: None or, per routed expert, None or its (gate, up, down) float32
    bias rows. Shared experts are SwiGLU without biases."""
    _cext.moe_ffn(x, out, shared_out, workspace, x.shape[1], n_routed, specs, weights, MOE_ACTS[act], biases)


MOE_MAX_JOBS = getattr(_cext, "MOE_MAX_JOBS", 0)  # experts one moe_ffn / moe_batch call takes


def moe_batch(x, per_slot, weights, specs: tuple, counts: np.ndarray, pairs: np.ndarray, act: str = "swiglu",
              biases: tuple | None = None) -> None:
    """A micro-batch's experts in one call (cext/moe.c): spec j runs on the counts[j] (token,
    slot) pairs after the previous specs' (int32) and writes weights[token, slot] * its output
    into per_slot[token, slot]. `act` and `biases` (one entry per spec) as in moe_ffn."""
    _cext.moe_batch(x, per_slot, weights, x.shape[0], x.shape[1], weights.shape[1], specs, counts, pairs,
                    MOE_ACTS[act], biases)


def has_step() -> bool:
    return _cext is not None and hasattr(_cext, "step_plan")


def has_attention_token() -> bool:
    return _cext is not None and hasattr(_cext, "attention_token")


def attention_token_scratch_bytes(n_embd: int, n_head: int, n_head_kv: int, head_dim: int) -> int:
    return _cext.attention_token_scratch_bytes(n_embd, n_head, n_head_kv, head_dim)


def attention_token(dims: tuple, n_cells: int, mats: tuple, x, scratch, norm, bq, bk, bv, q_norm, k_norm, cos, sin,
                    k_cache, v_cache, bo=None, sinks=None, k_f16: bool = False, v_f16: bool = False) -> None:
    """A decoding token's attention block (cext/layer.c): x += wo . attention of rms_norm(x)
    (+ bo); dims end with the layer's window (0: none); the caches hold n_cells rows, position
    p in cell p % n_cells, in F32 or (k_f16 / v_f16) F16; sinks: one logit per head, or None."""
    _cext.attention_token(dims, n_cells, mats, x, scratch, norm, bq, bk, bv, q_norm, k_norm, cos, sin, k_cache, v_cache,
                          bo, sinks, int(k_f16), int(v_f16))


def has_silu_mul() -> bool:
    return _cext is not None and hasattr(_cext, "silu_mul")


def sigmoid(x: np.ndarray, out: np.ndarray, n_rows: int, n: int) -> None:
    """1 / (1 + expf(-x)) (cext/ops.c); float32, C-contiguous."""
    _cext.sigmoid(x, out, n_rows, n)


def swiglu_oai(g: np.ndarray, u: np.ndarray, out: np.ndarray, n_rows: int, n: int) -> None:
    """gpt-oss's clamped SwiGLU (cext/ops.c); every array float32, C-contiguous; out may be g."""
    _cext.swiglu_oai(g, u, out, n_rows, n)


def silu_mul(x: np.ndarray, g: np.ndarray, out: np.ndarray, n_rows: int, n: int) -> None:
    """SwiGLU in ggml's order (cext/swiglu.c); every array float32, C-contiguous; out may be x."""
    _cext.silu_mul(x, g, out, n_rows, n)


def quantize(kind: str, x: np.ndarray, out: tuple) -> tuple:
    """The C twin of numba_kernels.quantize_q8_0 / quantize_q8_k and q4_1_q5.quantize_q8_1, into
    `out` (qs, d[, bsums or Q8_1's s])."""
    _cext.quantize(kind, x, out[0], out[1], out[2] if len(out) > 2 else None, x.shape[0], x.shape[1])
    return out


def attention(q, k, v, out, n: int, start: int, n_head: int, n_head_kv: int, head_dim: int, window: int = 0,
              sinks=None, v_dim: int = 0, scale: float = 0.0, cell_pos=None) -> None:
    """v None: the values are the first v_dim floats of each key row (MLA). k and v: float32,
    or float16 (an F16 cache). cell_pos: None, or int32 positions of the cells to visit (-1:
    empty) after a context shift."""
    v_stride = k.shape[1] if v is None else 0
    v = k if v is None else v
    if cell_pos is None:
        _cext.attention(q, k, v, out, n, start, n_head, n_head_kv, head_dim, k.shape[0], window, sinks,
                        v_dim, v_stride, scale, int(k.dtype == np.float16), int(v.dtype == np.float16))
        return
    _cext.attention(q, k, v, out, n, start, n_head, n_head_kv, head_dim, k.shape[0], window, sinks,
                    v_dim, v_stride, scale, int(k.dtype == np.float16), int(v.dtype == np.float16),
                    np.ascontiguousarray(cell_pos, dtype=np.int32), len(cell_pos))


# -- the step's small ops (cext/ops.c); float32 C-contiguous arrays, as ggml_math's callers pass

def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float, out: np.ndarray, n_rows: int, n: int) -> None:
    _cext.rms_norm(x, np.ascontiguousarray(weight, dtype=np.float32), float(eps), out, n_rows, n)


def softmax(x: np.ndarray, out: np.ndarray, n_rows: int, n: int) -> None:
    _cext.softmax(x, out, n_rows, n)


def expf(x: np.ndarray, out: np.ndarray) -> None:
    _cext.expf(x, out, x.size)


def silu(x: np.ndarray, out: np.ndarray, n_rows: int, n: int) -> None:
    _cext.silu(x, out, n_rows, n)


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, rope_dim: int, neox: bool) -> None:
    """In place on x (n_tokens, n_heads, head_dim)."""
    n_tokens, n_heads, head_dim = x.shape
    _cext.rope(x, np.ascontiguousarray(cos, dtype=np.float32), np.ascontiguousarray(sin, dtype=np.float32), n_tokens,
               n_heads, head_dim, rope_dim, neox)


def top_k(probs: np.ndarray, k: int, normalize: bool, chosen: np.ndarray, weights: np.ndarray) -> None:
    """forward._top_k's twin: chosen int64 (n, k), weights float32 (n, k)."""
    _cext.top_k(probs, probs.shape[0], probs.shape[1], k, normalize, chosen, weights)


def lookahead(x: np.ndarray, w: np.ndarray, eps: float, n_targets: int, k: int, m: int, ratio: float,
              experts: np.ndarray, counts: np.ndarray, conf: np.ndarray) -> None:
    """predict._lookahead_one's twin (same arguments)."""
    _cext.lookahead(x, x.shape[0], w, n_targets, w.shape[1] // max(n_targets, 1), eps, k, m, ratio, experts, counts,
                    conf)


def c_float_kernel(fmt_name: str) -> Kernel | None:
    """The C kernel for F32, F16 or BF16 weights (cext/floats.c), or None."""
    if _cext is None or not hasattr(_cext, "matmul_float") or fmt_name not in ("F32", "F16", "BF16"):
        return None
    matmul_float, bf16 = _cext.matmul_float, fmt_name == "BF16"

    def kernel(w: np.ndarray, act: tuple, out: np.ndarray, vec_dot: bool = False) -> None:
        (x,) = act  # rounded to the weight type by the converter
        order = float_order(x, out.shape[1], vec_dot, bf16)
        matmul_float(fmt_name, w, x, out, out.shape[1], x.shape[1], out.shape[0], order)

    kernel.__name__ = f"c_matmul_{fmt_name.lower()}"
    return kernel


# Other summation orders of a format that cext/module.c runs by name (not in formats()).
VARIANTS = ("IQ4_NL_SGEMM",)


def c_kernel(fmt_name: str) -> Kernel | None:
    if fmt_name not in formats() and (fmt_name not in VARIANTS or _cext is None):
        return None
    matmul = _cext.matmul

    def kernel(w: np.ndarray, act: tuple, out: np.ndarray, vec_dot: bool = False) -> None:
        xq, xd = act[0], act[1]
        bsums = act[2] if len(act) > 2 else None
        matmul(fmt_name, w, xq, xd, bsums, out, out.shape[1], xq.shape[1], out.shape[0])

    kernel.__name__ = f"c_matmul_{fmt_name.lower()}"
    return kernel


def _tiled_names() -> set[str]:
    from .tiled import TILED_TYPES

    return {t.name for t in TILED_TYPES}


def c_tiled_kernel(fmt_name: str) -> Kernel | None:
    """The C kernel for 8+ tokens in ggml's tiled order (Q2_K..Q6_K, IQ4_XS, the grid I-quants), or None."""
    if _cext is None or not hasattr(_cext, "matmul_tiled") or fmt_name not in _tiled_names():
        return None
    matmul_tiled = _cext.matmul_tiled

    def kernel(w: np.ndarray, act: tuple, out: np.ndarray, vec_dot: bool = False) -> None:
        xq, xd, bsums = act
        matmul_tiled(fmt_name, w, xq, xd, bsums, out, out.shape[1], xq.shape[1], out.shape[0])

    kernel.__name__ = f"c_matmul_tiled_{fmt_name.lower()}"
    return kernel
