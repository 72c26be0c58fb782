"""Elementwise math as llama.cpp's CPU backend computes it (ggml's x86 AVX2 code).

ggml's exp is its own polynomial (`ggml_v_expf`), not libm's, and its softmax sums in
chunks of eight. Results differ from numpy's by an ulp here and there, and an ulp is
enough to flip a later rounding of the activations to F16 or Q8_0, which an MoE
router can amplify into a different expert. So softmax and SiLU follow ggml step by
step; each fused multiply-add is computed in float64 and rounded once to float32,
which is exact for these operands.
"""

from __future__ import annotations

import numpy as np

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


def expf(x: np.ndarray) -> np.ndarray:
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


def silu_mul(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """ggml_vec_swiglu_f32: silu(x) * g, rows of x in chunks of 8 (a tail uses libm's expf)."""
    x = np.asarray(x, dtype=np.float32)
    n = x.shape[-1]
    main = n - n % 8
    out = np.empty_like(x)
    with np.errstate(over="ignore"):
        out[..., :main] = (x[..., :main] / (_F32(1.0) + expf(_F32(0.0) - x[..., :main]))) * g[..., :main]
        tail = x[..., main:]
        out[..., main:] = (tail / (_F32(1.0) + np.exp(-tail))) * g[..., main:]
    return out


def softmax(x: np.ndarray) -> np.ndarray:
    """ggml_vec_soft_max_f32 over the last axis: exp(x - max) in chunks of 8, each chunk's
    sum folded as hsum_float_8 and added in double; then multiplied by float(1 / sum).
    Rows are padded with -inf to whole chunks (ggml pads its KV length the same way)."""
    x = np.asarray(x, dtype=np.float32)
    n = x.shape[-1]
    pad = (-n) % 8
    if pad:
        x = np.concatenate([x, np.full(x.shape[:-1] + (pad,), -np.inf, dtype=np.float32)], axis=-1)
    e = expf(x - x.max(axis=-1, keepdims=True))
    chunks = e.reshape(e.shape[:-1] + (-1, 8))
    a = chunks[..., 4:] + chunks[..., :4]
    partial = (a[..., 0] + a[..., 2]) + (a[..., 1] + a[..., 3])  # float32, per chunk
    total = np.zeros(partial.shape[:-1], dtype=np.float64)
    for i in range(partial.shape[-1]):  # added to a double one chunk at a time, in order
        total += partial[..., i]
    inv = (1.0 / total).astype(np.float32)[..., None]
    return (e * inv)[..., :n]


# -- libm, as ggml calls it ------------------------------------------------------------
# ggml's RoPE takes cosf, sinf and powf from the C library, whose float results are not
# always correctly rounded; numpy's differ from them in about 1% of arguments. These run
# once per model load (the RoPE tables), so a call per element is affordable.

def _libm():
    import ctypes
    import ctypes.util

    lib = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
    for name, n_args in (("cosf", 1), ("sinf", 1), ("powf", 2)):
        fn = getattr(lib, name)
        fn.restype = ctypes.c_float
        fn.argtypes = [ctypes.c_float] * n_args
    return lib


_LIBM = None


def libm(name: str, *args: np.ndarray) -> np.ndarray:
    """Elementwise C-library float function `name` (cosf, sinf, powf) over float32 arrays."""
    global _LIBM
    if _LIBM is None:
        _LIBM = _libm()
    fn = np.frompyfunc(getattr(_LIBM, name), len(args), 1)
    return np.asarray(fn(*[np.asarray(a, dtype=np.float32) for a in args]), dtype=np.float32)
