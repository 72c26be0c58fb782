"""The grid I-quants (IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ1_S, IQ1_M): block layouts
and dequantization against gguf-py, and the Numba and C kernels (every SIMD level) bit for
bit against ggml's own `ggml_vec_dot_iq*_q8_K` (the AVX2 build's, called through ctypes) on
blocks from ggml's quantizer (with an importance matrix) and on random bytes. The tiled path
(8+ tokens) is checked by tests/test_tiled.py (C == Numba, close to the exact product) and
end to end by tests/test_iq_grid_models.py."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import quants as gq

from offload.kernels import FORMATS, NUMBA_KERNELS, cext
from offload.kernels.formats import QK_K, activation_ref
from offload.kernels.iq_grid import FORMATS as IQ_FORMATS
from offload.kernels.numba_kernels import quantize_q8_k
from offload.testing import _ggml_lib, ggml_quantize, llama_cpp_is_avx512_build
from offload.testing import float_bits as bits

TYPES = [f.ggml_type for f in IQ_FORMATS]
Q8_K_BLOCK = np.dtype([("d", "<f4"), ("qs", "i1", QK_K), ("bsums", "<i2", QK_K // 16)])


def weights(seed: int, n_rows: int, n_cols: int) -> np.ndarray:
    """Gaussian rows over several orders of magnitude, an all-zero row and an all-zero block."""
    rng = np.random.default_rng(seed)
    values = (rng.standard_normal((n_rows, n_cols)) * np.exp(rng.uniform(-5, 2, size=(n_rows, 1)))).astype(np.float32)
    values[1] = 0.0
    values[2, :QK_K] = 0.0
    values[3] = -np.abs(values[3])
    return values


def random_raw(t, seed: int, n_rows: int, n_blocks: int) -> np.ndarray:
    """Every bit pattern, with a finite f16 d (edge values first; IQ1_M's d is spread over
    the top nibbles of its scales)."""
    rng = np.random.default_rng(seed)
    fmt = FORMATS[t]
    raw = rng.integers(0, 256, size=(n_rows, n_blocks * fmt.type_size), dtype=np.uint8)
    d = (rng.standard_normal(n_rows * n_blocks) * np.exp(rng.uniform(-8, 2, n_rows * n_blocks))).astype(np.float16)
    d[:6] = [0.0, -0.0, 65504.0, -65504.0, 2.0**-24, 2.0**-14]
    blocks = raw.view(fmt.layout)
    if "d" in fmt.layout.names:
        blocks["d"] = d.reshape(n_rows, n_blocks)
    else:  # IQ1_M: bits 12..15 of sc[k] hold bits 4k..4k+3 of d
        u = d.view(np.uint16).reshape(n_rows, n_blocks)
        for k in range(4):
            blocks["sc"][..., k] = (blocks["sc"][..., k] & 0x0FFF) | (((u >> (4 * k)) & 0xF) << 12)
    return raw


def tokens(n_tokens: int, n_cols: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n_tokens, n_cols)) * np.exp(rng.uniform(-2, 2, size=(n_tokens, 1)))).astype(np.float32)
    if n_cols >= 2 * QK_K:
        x[0, QK_K : 2 * QK_K] = 0.0  # an all-zero Q8_K block
    return x


_CPU = None


def ggml_dots(t, raw: np.ndarray, act: tuple) -> np.ndarray:
    """ggml's vec_dot for every (token, row), on exactly the Q8_K blocks our kernels see."""
    global _CPU
    if llama_cpp_is_avx512_build():
        pytest.skip("llama.cpp was built for AVX-512 here; offload follows its AVX2 build (install it as the README says)")
    if _CPU is None:
        _CPU = _ggml_lib("ggml-cpu")
        _CPU.ggml_cpu_init()
    fn = getattr(_CPU, f"ggml_vec_dot_{t.name.lower()}_q8_K")
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p,
                   ctypes.c_size_t, ctypes.c_int]
    qs, d, bsums = act
    n_tokens, n_cols = qs.shape
    out = np.zeros((n_tokens, raw.shape[0]), dtype=np.float32)
    s = np.zeros(1, dtype=np.float32)
    for tok in range(n_tokens):
        y = np.zeros(n_cols // QK_K, dtype=Q8_K_BLOCK)
        y["d"], y["qs"], y["bsums"] = d[tok], qs[tok].reshape(-1, QK_K), bsums[tok].reshape(-1, 16)
        for r in range(raw.shape[0]):
            row = np.ascontiguousarray(raw[r])
            fn(n_cols, s.ctypes.data, 0, row.ctypes.data, 0, y.ctypes.data, 0, 1)
            out[tok, r] = s[0]
    return out


def ours(t, raw: np.ndarray, act: tuple, level: str | None) -> np.ndarray:
    """Our kernel on read-only rows (as a memmapped file): Numba (level None) or C at a SIMD level."""
    out = np.full((act[0].shape[0], raw.shape[0]), np.nan, dtype=np.float32)
    ro = raw.view()
    ro.flags.writeable = False
    if level is None:
        NUMBA_KERNELS[t](ro, act, out, False)
    else:
        try:
            cext.set_isa(level)
            cext.c_kernel(t.name)(ro, act, out, False)
        finally:
            cext.set_isa(None)
    return out


IMPLS = [None] + (cext.levels() if cext.available() else [])
IMPL_IDS = ["numba"] + (cext.levels() if cext.available() else [])


# -- layout and dequantization ------------------------------------------------------------------

@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_layout_matches_ggml(t):
    fmt = FORMATS[t]
    assert fmt.name == t.name and fmt.vec_dot_type == "Q8_K"
    assert (fmt.block_size, fmt.type_size) == GGML_QUANT_SIZES[t]


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_dequantize_matches_gguf(t):
    values = weights(1, 9, 2 * QK_K)
    raw = ggml_quantize(values, t)
    got = FORMATS[t].dequantize(raw)
    np.testing.assert_array_equal(bits(got), bits(gq.dequantize(raw, t)))
    assert not got[1].any()
    # lossy but not wild: the layout was read right
    err = np.abs(got - values).mean(axis=1) / (np.abs(values).mean(axis=1) + 1e-30)
    assert np.all(err[np.abs(values).max(axis=1) > 0] < 0.9)
    raw = random_raw(t, 2, 6, 3)
    np.testing.assert_array_equal(bits(FORMATS[t].dequantize(raw)), bits(gq.dequantize(raw, t)))


# -- the row dots, bit for bit with ggml's ----------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS, ids=IMPL_IDS)
@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_kernels_equal_ggml_vec_dot(t, impl):
    raw = ggml_quantize(weights(3, 12, 3 * QK_K), t)
    act = quantize_q8_k(tokens(3, 3 * QK_K, seed=4))
    np.testing.assert_array_equal(bits(ours(t, raw, act, impl)), bits(ggml_dots(t, raw, act)))


@pytest.mark.parametrize("impl", IMPLS, ids=IMPL_IDS)
@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_kernels_equal_ggml_vec_dot_on_random_bytes(t, impl):
    """Every grid index, sign and scale pattern, extreme d."""
    raw = random_raw(t, 5, 16, 2)
    act = quantize_q8_k(tokens(2, 2 * QK_K, seed=6) * np.float32(1e-3))
    np.testing.assert_array_equal(bits(ours(t, raw, act, impl)), bits(ggml_dots(t, raw, act)))


@pytest.mark.parametrize("impl", IMPLS, ids=IMPL_IDS)
@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_kernels_equal_ggml_vec_dot_with_minus_128(t, impl):
    """ggml flips an activation's sign with _mm256_sign_epi8, which leaves -128 at -128.
    Q8_K's quantizer (scale -127 / max) never makes -128, but the kernels take any int8:
    hand-made activations full of -128 give ggml's bits too."""
    rng = np.random.default_rng(9)
    n_cols = 2 * QK_K
    qs = rng.integers(-128, 128, size=(2, n_cols)).astype(np.int8)
    qs[rng.random(qs.shape) < 0.3] = -128
    bsums = qs.reshape(2, -1, 16).sum(axis=-1, dtype=np.int32).astype(np.int16)
    act = (qs, rng.uniform(1e-4, 1e-2, size=(2, n_cols // QK_K)).astype(np.float32), bsums)
    raw = random_raw(t, 10, 8, 2)
    np.testing.assert_array_equal(bits(ours(t, raw, act, impl)), bits(ggml_dots(t, raw, act)))


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_kernel_is_close_to_the_float64_product(t):
    raw = ggml_quantize(weights(7, 16, 2 * QK_K), t)
    x = tokens(2, 2 * QK_K, seed=8)
    got = ours(t, raw, quantize_q8_k(x), None)
    ref = activation_ref("Q8_K", x).astype(np.float64) @ FORMATS[t].dequantize(raw).astype(np.float64).T
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()
