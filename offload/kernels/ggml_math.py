"""Elementwise math as llama.cpp's CPU backend computes it (ggml's x86 AVX2 code).

ggml's exp is its own polynomial (`ggml_v_expf`), not libm's, and its softmax sums in
chunks of eight. Results differ from numpy's by an ulp here and there, and an ulp is
enough to flip a later rounding of the activations to F16 or Q8_0, which an MoE
router can amplify into a different expert. So softmax and SiLU follow ggml step by
step. The public functions (`expf`, `softmax`, `silu_mul`, `rms_norm`, `apply_rope`, ...)
are what the forward pass calls: each runs its C twin (cext/ops.c, swiglu.c) when the C
kernels serve the run (`cext.selected()`), else its Numba one here, with the same bits; the
numpy ones (`*_ref`, each fused multiply-add computed in float64 and rounded once, exact
for these operands) spell the same steps for reading and testing.
"""

from __future__ import annotations

import math

import numpy as np

from . import cext
from .jit import njit
from .numba_intrinsics import bits_f32, f32_bits, fma32

_F32 = np.float32


def _hex(h: str) -> np.float32:
    return np.float32(float.fromhex(h))


def _fma(a, b, c) -> np.ndarray:
    """float32 fused multiply-add: the float64 product of two float32 is exact."""
    return np.asarray(np.float64(a) * np.float64(b) + np.float64(c)).astype(np.float32)


def _bits(x: np.ndarray) -> np.ndarray:
    return x.view(np.uint32)


def _float(u: np.ndarray) -> np.ndarray:
    return u.astype(np.uint32).view(np.float32)


def expf_ref(x: np.ndarray) -> np.ndarray:
    """ggml_v_expf: exp(x) for float32 x, as ggml's vector code computes it."""
    x = np.asarray(x, dtype=np.float32)
    with np.errstate(invalid="ignore", over="ignore", under="ignore"):
        r = _hex("0x1.8p23")
        z = _fma(x, _hex("0x1.715476p+0"), r)
        n = z - r
        b = _fma(-n, _hex("0x1.7f7d1cp-20"),
                 _fma(-n, _hex("0x1.62e4p-1"), x))
        e = _bits(z) << np.uint32(23)
        k = _float(e + _bits(np.array(1.0, dtype=np.float32)))
        c = np.abs(n) > _F32(126)
        u = b * b
        j = _fma(_fma(_fma(_hex("0x1.0e4020p-7"), b, _hex("0x1.573e2ep-5")), u,
                      _fma(_hex("0x1.555e66p-3"), b, _hex("0x1.fffdb6p-2"))),
                 u, _hex("0x1.ffffecp-1") * b)
        normal = _fma(j, k, k)
        if not c.any():
            return normal
        g = np.where(n <= 0, np.uint32(0x82000000), np.uint32(0))
        s1 = _float(g + np.uint32(0x7F000000))
        s2 = _float(e - g)
        huge = np.abs(n) > _F32(192)
        return np.where(huge, s1 * s1, np.where(c, _fma(s2, j, s2) * s1, normal)).astype(np.float32)


def silu_mul_ref(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """ggml_vec_swiglu_f32: silu(x) * g, rows of x in chunks of 8 (a tail uses libm's expf)."""
    x = np.asarray(x, dtype=np.float32)
    n = x.shape[-1]
    main = n - n % 8
    out = np.empty_like(x)
    with np.errstate(over="ignore"):
        out[..., :main] = (x[..., :main] / (_F32(1.0) + expf_ref(_F32(0.0) - x[..., :main]))) * g[..., :main]
        tail = x[..., main:]
        out[..., main:] = (tail / (_F32(1.0) + libm("expf", -tail))) * g[..., main:]
    return out


def sigmoid_ref(x: np.ndarray) -> np.ndarray:
    """ggml's sigmoid (op_sigmoid): 1 / (1 + expf(-x)) with libm's expf (MoE routers)."""
    x = np.asarray(x, dtype=np.float32)
    with np.errstate(over="ignore"):
        return _F32(1.0) / (_F32(1.0) + libm("expf", -x))


SWIGLU_OAI_ALPHA, SWIGLU_OAI_LIMIT = np.float32(1.702), np.float32(7.0)  # build_moe_ffn's (C: ops.h's)


def swiglu_oai_ref(g: np.ndarray, u: np.ndarray) -> np.ndarray:
    """ggml_compute_forward_swiglu_oai_f32 (gpt-oss): a = min(g, 7), b = clamp(u, -7, 7),
    a / (1 + expf(1.702 * -a)) * (b + 1), with libm's expf; NaN stays NaN as in std::min."""
    g, u = np.asarray(g, dtype=np.float32), np.asarray(u, dtype=np.float32)
    a = np.where(SWIGLU_OAI_LIMIT < g, SWIGLU_OAI_LIMIT, g)
    b = np.where(u < -SWIGLU_OAI_LIMIT, -SWIGLU_OAI_LIMIT, np.where(SWIGLU_OAI_LIMIT < u, SWIGLU_OAI_LIMIT, u))
    with np.errstate(over="ignore", invalid="ignore"):
        return a / (_F32(1.0) + libm("expf", SWIGLU_OAI_ALPHA * -a)) * (b + _F32(1.0))


def softmax_ref(x: np.ndarray, sinks: np.ndarray | None = None) -> np.ndarray:
    """ggml_vec_soft_max_f32 over the last axis, then the scale by float(1 / sum): exp(x - max)
    in chunks of 8 (ggml_v_expf), each chunk's sum folded as hsum_float_8 and added to a
    double; the n % 8 values left over go through libm's expf and are added to the double
    one at a time. `sinks` (one per row: attention sinks) join the max, and their libm exp
    the sum, last (ggml_compute_forward_soft_max_f32)."""
    x = np.asarray(x, dtype=np.float32)
    n = x.shape[-1]
    main = n - n % 8
    m = x.max(axis=-1, keepdims=True)
    if sinks is not None:
        m = np.maximum(m, np.asarray(sinks, dtype=np.float32).reshape(m.shape))
    e = np.empty_like(x)
    e[..., :main] = expf_ref(x[..., :main] - m)
    chunks = e[..., :main].reshape(e.shape[:-1] + (-1, 8))
    a = chunks[..., 4:] + chunks[..., :4]
    partial = (a[..., 0] + a[..., 2]) + (a[..., 1] + a[..., 3])  # float32, per chunk
    total = np.zeros(x.shape[:-1], dtype=np.float64)
    for i in range(partial.shape[-1]):  # added to a double one chunk at a time, in order
        total += partial[..., i]
    for i in range(main, n):
        e[..., i] = libm("expf", x[..., i] - m[..., 0])
        total += e[..., i]
    if sinks is not None:
        total += libm("expf", np.asarray(sinks, dtype=np.float32).reshape(m.shape)[..., 0] - m[..., 0])
    inv = (1.0 / total).astype(np.float32)[..., None]
    return e * inv


def rms_norm_ref(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """numpy spelling of rms_norm (numpy sums the squares pairwise, ggml in order:
    the two agree but for rare last-bit cases)."""
    mean_sq = np.mean(np.square(x), axis=-1, keepdims=True, dtype=np.float64).astype(np.float32)
    scale = np.float32(1.0) / np.sqrt(mean_sq + np.float32(eps))
    return (x * scale) * weight


def apply_rope_ref(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, rope_dim: int, style: str) -> None:
    """Rotate x (n_tokens, n_heads, head_dim) in place; cos/sin are (n_tokens, rope_dim/2)."""
    if style == "normal":  # pairs (x0, x1), (x2, x3), ...
        a, b = x[..., 0:rope_dim:2], x[..., 1:rope_dim:2]
    else:  # neox: pairs (x_i, x_{i + rope_dim/2})
        a, b = x[..., : rope_dim // 2], x[..., rope_dim // 2 : rope_dim]
    # ggml's x0*cos - x1*sin and x0*sin + x1*cos, as GCC contracts them into FMAs
    # (the float64 product of two float32 is exact, so this rounds once, like an FMA).
    c, s = cos[:, None, :].astype(np.float64), sin[:, None, :].astype(np.float64)
    a_new = (a * c - (b * sin[:, None, :])).astype(np.float32)
    b[...] = (a * s + (b * cos[:, None, :])).astype(np.float32)
    a[...] = a_new


def hadamard_rows(x: np.ndarray, n: int) -> np.ndarray:
    """Each run of n values of x (C order) times the normalized n x n Hadamard matrix, as
    ggml's CPU backend computes a mul_mat hinted GGML_HINT_SRC0_IS_HADAMARD (its fast
    Walsh-Hadamard transform, ggml_compute_forward_fwht): x * (1 / sqrtf(n)), then butterflies
    (u + v, u - v) of spans 1, 2, 4, ... in float32. Returns a new float32 array shaped as x."""
    y = (np.ascontiguousarray(x, dtype=np.float32).reshape(-1, n) * (np.float32(1) / np.sqrt(np.float32(n))))
    span = 1
    while span < n:
        pairs = y.reshape(len(y), n // (2 * span), 2, span)
        u, v = pairs[:, :, 0].copy(), pairs[:, :, 1].copy()
        pairs[:, :, 0] = u + v
        pairs[:, :, 1] = u - v
        span *= 2
    return y.reshape(x.shape)


# -- libm, as ggml calls it ------------------------------------------------------------
# ggml's RoPE takes cosf, sinf and powf from the C library, whose float results are not
# always correctly rounded; numpy's differ from them in about 1% of arguments. These run
# once per model load (the RoPE tables), so a call per element is affordable.

def _libm():
    import ctypes
    import ctypes.util

    lib = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
    for name, n_args in (("cosf", 1), ("sinf", 1), ("powf", 2), ("expf", 1), ("logf", 1), ("fmaf", 3)):
        fn = getattr(lib, name)
        fn.restype = ctypes.c_float
        fn.argtypes = [ctypes.c_float] * n_args
    return lib


_LIBM = None


def libm(name: str, *args: np.ndarray) -> np.ndarray:
    """Elementwise C-library float function `name` (cosf, sinf, powf, expf, logf, fmaf) over float32 arrays."""
    global _LIBM
    if _LIBM is None:
        _LIBM = _libm()
    fn = np.frompyfunc(getattr(_LIBM, name), len(args), 1)
    return np.asarray(fn(*[np.asarray(a, dtype=np.float32) for a in args]), dtype=np.float32)


# -- the same, compiled (what the forward pass calls) ---------------------------------------

# ggml_v_expf's constants (globals are compile-time constants to Numba)
_R, _LOG2E = _hex("0x1.8p23"), _hex("0x1.715476p+0")
_LN2_HI, _LN2_LO = _hex("0x1.62e4p-1"), _hex("0x1.7f7d1cp-20")
_C5, _C4, _C3, _C2, _C1 = (_hex("0x1.0e4020p-7"), _hex("0x1.573e2ep-5"), _hex("0x1.555e66p-3"),
                           _hex("0x1.fffdb6p-2"), _hex("0x1.ffffecp-1"))


@njit(inline="always")
def _expf1(x):
    """One float32 through ggml_v_expf (same steps as expf_ref)."""
    z = fma32(x, _LOG2E, _R)
    n = z - _R
    b = fma32(-n, _LN2_LO, fma32(-n, _LN2_HI, x))
    e = f32_bits(z) << np.uint32(23)
    k = bits_f32(e + np.uint32(0x3F800000))
    u = b * b
    j = fma32(fma32(fma32(_C5, b, _C4), u, fma32(_C3, b, _C2)), u, _C1 * b)
    if not abs(n) > np.float32(126.0):
        return fma32(j, k, k)
    g = np.uint32(0x82000000) if n <= np.float32(0.0) else np.uint32(0)
    s1 = bits_f32(g + np.uint32(0x7F000000))
    if abs(n) > np.float32(192.0):
        return s1 * s1
    s2 = bits_f32(e - g)
    return fma32(s2, j, s2) * s1


@njit(cache=True, nogil=True)
def _expf(x, out):
    for i in range(x.size):
        out[i] = _expf1(x[i])


def expf(x: np.ndarray) -> np.ndarray:
    """ggml_v_expf over a float32 array (compiled twin of expf_ref)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty_like(x)
    if cext.selected():
        cext.expf(x, out)
    else:
        _expf(x.reshape(-1), out.reshape(-1))
    return out


@njit(cache=True, nogil=True)
def _softmax_rows(x, out):
    """ggml_vec_soft_max_f32 + the scale by 1/sum, per row of the 2-D x (see softmax_ref)."""
    n = x.shape[1]
    for r in range(x.shape[0]):
        m = np.float32(-np.inf)
        for i in range(n):
            if x[r, i] > m:
                m = x[r, i]
        total = 0.0
        main = n - n % 8
        for c in range(0, main, 8):  # chunks of 8: ggml_v_expf, hsum_float_8, added in double
            for i in range(c, c + 8):
                out[r, i] = _expf1(x[r, i] - m)
            a0, a1 = out[r, c + 4] + out[r, c], out[r, c + 5] + out[r, c + 1]
            a2, a3 = out[r, c + 6] + out[r, c + 2], out[r, c + 7] + out[r, c + 3]
            total += np.float64((a0 + a2) + (a1 + a3))
        for i in range(main, n):  # the rest: libm's expf, added one by one
            out[r, i] = np.float32(math.exp(x[r, i] - m))
            total += np.float64(out[r, i])
        inv = np.float32(1.0 / total)
        for i in range(n):
            out[r, i] *= inv


def softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis exactly as ggml (compiled twin of softmax_ref). Attention
    runs it over its KV length padded to 32 with -inf (see attention.py), routers over the
    expert count as is."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty_like(x)
    if x.size:
        n = x.shape[-1]
        if cext.selected():
            cext.softmax(x, out, x.size // n, n)
        else:
            _softmax_rows(x.reshape(-1, n), out.reshape(-1, n))
    return out


@njit(cache=True, nogil=True)
def _silu_mul_rows(x, g, out):
    n = x.shape[1]
    main = n - n % 8
    for r in range(x.shape[0]):
        for i in range(main):
            out[r, i] = (x[r, i] / (np.float32(1.0) + _expf1(np.float32(0.0) - x[r, i]))) * g[r, i]
        for i in range(main, n):  # ggml's scalar tail: libm's expf
            out[r, i] = (x[r, i] / (np.float32(1.0) + np.float32(math.exp(-x[r, i])))) * g[r, i]


def silu_mul(x: np.ndarray, g: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """ggml_vec_swiglu_f32: silu(x) * g (compiled twin of silu_mul_ref): the C kernel
    (cext/swiglu.c, 8 lanes) with the C kernels, else the Numba one; the same bits."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    g = np.ascontiguousarray(g, dtype=np.float32)
    if out is None:
        out = np.empty_like(x)
    if x.size:
        n = x.shape[-1]
        if cext.selected() and out.flags.c_contiguous:
            cext.silu_mul(x, g, out, x.size // n, n)
        else:
            _silu_mul_rows(x.reshape(-1, n), g.reshape(-1, n), out.reshape(-1, n))
    return out


@njit(cache=True, nogil=True)
def _sigmoid(x, out):
    for i in range(x.size):
        out[i] = np.float32(1.0) / (np.float32(1.0) + np.float32(math.exp(-x[i])))  # libm's expf


def sigmoid(x: np.ndarray) -> np.ndarray:
    """ggml's sigmoid (compiled twin of sigmoid_ref): C with the C kernels, else Numba."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty_like(x)
    if x.size:
        if cext.selected():
            cext.sigmoid(x, out, x.size // x.shape[-1], x.shape[-1])
        else:
            _sigmoid(x.reshape(-1), out.reshape(-1))
    return out


@njit(cache=True, nogil=True)
def _swiglu_oai(g, u, out, alpha, limit):
    for i in range(g.size):
        a = limit if limit < g[i] else g[i]
        b = -limit if u[i] < -limit else (limit if limit < u[i] else u[i])
        out[i] = a / (np.float32(1.0) + np.float32(math.exp(alpha * -a))) * (b + np.float32(1.0))  # libm's expf


def swiglu_oai(g: np.ndarray, u: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """gpt-oss's expert activation (compiled twin of swiglu_oai_ref): C with the C kernels,
    else Numba; the same bits. `out` may be g."""
    g = np.ascontiguousarray(g, dtype=np.float32)
    u = np.ascontiguousarray(u, dtype=np.float32)
    if out is None:
        out = np.empty_like(g)
    if g.size:
        if cext.selected() and out.flags.c_contiguous:
            cext.swiglu_oai(g, u, out, g.size // g.shape[-1], g.shape[-1])
        else:
            _swiglu_oai(g.reshape(-1), u.reshape(-1), out.reshape(-1), SWIGLU_OAI_ALPHA, SWIGLU_OAI_LIMIT)
    return out


@njit(cache=True, nogil=True)
def _rms_norm_rows(x, weight, eps, out):
    n = x.shape[1]
    for t in range(x.shape[0]):
        total = 0.0  # ggml sums the float32 squares in double, in order
        for i in range(n):
            total += np.float64(x[t, i] * x[t, i])
        scale = np.float32(1.0) / np.sqrt(np.float32(total / n) + eps)
        for i in range(n):
            out[t, i] = (x[t, i] * scale) * weight[i]


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float, out: np.ndarray | None = None) -> np.ndarray:
    """ggml_rms_norm then ggml_mul by `weight`, over the last axis (x float32, any leading dims)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if out is None:
        out = np.empty_like(x)
    if x.size:
        n = x.shape[-1]
        if cext.selected():
            cext.rms_norm(x, weight, np.float32(eps), out, x.size // n, n)
        else:
            _rms_norm_rows(x.reshape(-1, n), weight, np.float32(eps), out.reshape(-1, n))
    return out


@njit(cache=True, nogil=True)
def _rope(x, cos, sin, rope_dim, neox):
    half = rope_dim // 2
    for t in range(x.shape[0]):
        for h in range(x.shape[1]):
            for i in range(half):
                ia, ib = (i, i + half) if neox else (2 * i, 2 * i + 1)
                a, b, c, s = x[t, h, ia], x[t, h, ib], cos[t, i], sin[t, i]
                # x0*cos - x1*sin and x0*sin + x1*cos, as GCC contracts them in ggml's rope
                x[t, h, ia] = fma32(a, c, -(b * s))
                x[t, h, ib] = fma32(a, s, b * c)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, rope_dim: int, style: str) -> None:
    """Rotate x (n_tokens, n_heads, head_dim) float32 C-contiguous in place; cos/sin (n_tokens,
    rope_dim/2). style "normal" pairs (x0, x1), (x2, x3)...; "neox" pairs (x_i, x_{i+rope_dim/2})."""
    if cext.selected():
        cext.rope(x, cos, sin, rope_dim, style == "neox")
    else:
        _rope(x, cos, sin, rope_dim, style == "neox")


def silu(x: np.ndarray) -> np.ndarray:
    """ggml_vec_silu_f32 over the last axis: x / (1 + exp(-x)), chunks of 8 with ggml_v_expf,
    the n % 8 values left over with libm's expf (a row of one value takes only the latter)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = x.shape[-1]
    main = n - n % 8
    out = np.empty_like(x)
    if cext.selected():
        if x.size:
            cext.silu(x, out, x.size // n, n)
        return out
    with np.errstate(over="ignore"):
        if main:
            out[..., :main] = x[..., :main] / (_F32(1.0) + expf(_F32(0.0) - x[..., :main]))
        if main < n:
            tail = x[..., main:]
            out[..., main:] = tail / (_F32(1.0) + libm("expf", (_F32(0.0) - tail).astype(np.float32)))
    return out


def sigmoid_as_silu_div(x: np.ndarray) -> np.ndarray:
    """sigmoid as llama.cpp's qwen2moe graph spells it: ggml_div(ggml_silu(x), x), rows over
    the last axis (its shared-expert gate: one value per token)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (silu(x) / x).astype(np.float32)
