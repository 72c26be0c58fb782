"""Q2_K and Q3_K: block layouts and dequantization against gguf-py, the Numba kernels bit for
bit against ggml's own AVX2 `ggml_vec_dot_q{2,3}_K_q8_K`, and against a float64 reference."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

from offload.testing import llama_cpp_is_avx512_build
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T
from gguf import quants as gq

from offload.kernels.formats import QK_K, activation_ref
from offload.kernels.numba_kernels import quantize_q8_k
from offload.kernels.q2_k_q3_k import Q2_KFormat, Q3_KFormat, matmul_q2_k, matmul_q3_k

FORMATS = {T.Q3_K: Q3_KFormat(), T.Q2_K: Q2_KFormat()}
KERNELS = {T.Q3_K: matmul_q3_k, T.Q2_K: matmul_q2_k}
TYPES = list(FORMATS)
Q8_K_BLOCK = np.dtype([("d", "<f4"), ("qs", "i1", QK_K), ("bsums", "<i2", QK_K // 16)])


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def _lib_dir() -> Path:
    import llama_cpp

    return Path(llama_cpp.__file__).parent / "lib"


_BASE = None


def ggml_quantize(t: T, values: np.ndarray) -> np.ndarray:
    """float32 (n_rows, n_cols) -> uint8 rows, quantized by llama.cpp's own quantizer (real blocks)."""
    global _BASE
    if _BASE is None:
        _BASE = ctypes.CDLL(str(_lib_dir() / "libggml-base.so"))
        _BASE.ggml_quantize_chunk.restype = ctypes.c_size_t
        _BASE.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                              ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        _BASE.ggml_quantize_init.argtypes = [ctypes.c_int]
    _BASE.ggml_quantize_init(int(t))
    values = np.ascontiguousarray(values, dtype=np.float32)
    n_rows, n_cols = values.shape
    out = np.zeros((n_rows, FORMATS[t].row_bytes(n_cols)), dtype=np.uint8)
    size = _BASE.ggml_quantize_chunk(int(t), values.ctypes.data, out.ctypes.data, 0, n_rows, n_cols, None)
    assert size == out.nbytes
    return out


def random_weights(rng: np.random.Generator, n_rows: int, n_cols: int) -> np.ndarray:
    """Gaussian, with row scales over a few orders of magnitude, and some all-zero rows."""
    values = rng.standard_normal((n_rows, n_cols)) * np.exp(rng.uniform(-5, 2, size=(n_rows, 1)))
    values[1::7] = 0.0
    values[2::7, :QK_K] = 0.0  # an all-zero super-block in a nonzero row
    return values.astype(np.float32)


def random_raw(rng: np.random.Generator, t: T, n_rows: int, n_blocks: int) -> np.ndarray:
    """Random bytes in t's layout, with finite f16 scales (edge values first)."""
    fmt = FORMATS[t]
    raw = rng.integers(0, 256, size=(n_rows, n_blocks * fmt.type_size), dtype=np.uint8)
    blocks = raw.view(fmt.layout)
    edge = np.array([0.0, -0.0, 1.0, -1.0, 65504.0, -65504.0, 2.0**-24, 2.0**-14, -3.25], dtype=np.float16)
    for field in ("d", "dmin") if t == T.Q2_K else ("d",):
        v = (rng.standard_normal(n_rows * n_blocks) * np.exp(rng.uniform(-8, 2, n_rows * n_blocks))).astype(np.float16)
        v[: len(edge)] = np.roll(edge, len(field))
        blocks[field] = v.reshape(n_rows, n_blocks)
    return raw


def make_tokens(n_tokens: int, n_cols: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n_tokens, n_cols)) * np.exp(rng.uniform(-2, 2, size=(n_tokens, 1)))
    x = x.astype(np.float32)
    if n_cols >= 2 * QK_K:
        x[0, QK_K : 2 * QK_K] = 0.0  # an all-zero Q8_K block
    return x


def run_kernel(t: T, raw: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, tuple]:
    act = quantize_q8_k(x)
    out = np.full((x.shape[0], raw.shape[0]), np.nan, dtype=np.float32)
    ro = raw.view()
    ro.flags.writeable = False  # as a memmapped GGUF tensor
    KERNELS[t](ro, act, out)
    return out, act


# -- layout and dequantization ----------------------------------------------------------------

@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_layout_matches_ggml(t):
    fmt = FORMATS[t]
    assert fmt.name == t.name and fmt.ggml_type == t and fmt.vec_dot_type == "Q8_K"
    assert (fmt.block_size, fmt.type_size) == GGML_QUANT_SIZES[t]
    assert fmt.row_bytes(512) == 2 * fmt.type_size


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_dequantize_matches_gguf_on_real_blocks(t):
    rng = np.random.default_rng(1)
    values = random_weights(rng, 21, 3 * QK_K)
    values[3] *= 1e-6
    values[4] = -np.abs(values[4])
    raw = ggml_quantize(t, values)
    ours = FORMATS[t].dequantize(raw)
    assert ours.dtype == np.float32 and ours.shape == values.shape
    np.testing.assert_array_equal(bits(ours), bits(gq.dequantize(raw, t)))
    assert not ours[1].any()
    # the quantizer is lossy but not wild: a sanity check that the layout was read right
    err = np.abs(ours - values).mean(axis=1) / (np.abs(values).mean(axis=1) + 1e-30)
    assert np.all(err[np.abs(values).max(axis=1) > 0] < 0.5)


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_dequantize_matches_gguf_on_random_bytes(t):
    raw = random_raw(np.random.default_rng(2), t, 9, 4)
    ours = FORMATS[t].dequantize(raw)
    assert not np.isnan(ours).any()
    np.testing.assert_array_equal(bits(ours), bits(gq.dequantize(raw, t)))
    stacked = FORMATS[t].dequantize(raw.reshape(3, 3, -1))
    np.testing.assert_array_equal(bits(stacked.reshape(9, -1)), bits(ours))


# -- bit-exact against ggml's vec_dot -----------------------------------------------------------

_CPU = None


def _ggml_cpu():
    global _CPU
    if llama_cpp_is_avx512_build():
        pytest.skip("llama.cpp was built for AVX-512 here; offload follows its AVX2 build (install it as the README says)")
    if _CPU is None:
        lib = ctypes.CDLL(str(_lib_dir() / "libggml-cpu.so"))
        sig = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t,
               ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        lib.ggml_vec_dot_q2_K_q8_K.argtypes = sig
        lib.ggml_vec_dot_q3_K_q8_K.argtypes = sig
        lib.ggml_cpu_init()  # fills ggml's f16 -> f32 table, which the dot products read
        _CPU = lib
    return _CPU


def ggml_dots(t: T, raw: np.ndarray, act: tuple) -> np.ndarray:
    """ggml's vec_dot for every (token, row), on exactly the Q8_K blocks our kernel saw."""
    lib = _ggml_cpu()
    fn = lib.ggml_vec_dot_q2_K_q8_K if t == T.Q2_K else lib.ggml_vec_dot_q3_K_q8_K
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


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("n_cols", [256, 512, 2304])
@pytest.mark.parametrize("n_tokens", [1, 5])
def test_kernel_is_bit_exact_with_ggml(t, n_cols, n_tokens):
    _ggml_cpu()
    raw = ggml_quantize(t, random_weights(np.random.default_rng(n_cols), 24, n_cols))
    ours, act = run_kernel(t, raw, make_tokens(n_tokens, n_cols, seed=n_tokens))
    np.testing.assert_array_equal(bits(ours), bits(ggml_dots(t, raw, act)))


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_kernel_is_bit_exact_with_ggml_on_random_bytes(t):
    """Every quant and scale pattern (Q3_K scales -32..31, extreme f16 d and dmin)."""
    _ggml_cpu()
    raw = random_raw(np.random.default_rng(3), t, 40, 3)
    x = make_tokens(4, 3 * QK_K, seed=4) * np.float32(1e-3)
    ours, act = run_kernel(t, raw, x)
    np.testing.assert_array_equal(bits(ours), bits(ggml_dots(t, raw, act)))


# -- against a float64 reference ----------------------------------------------------------------

@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("n_rows,n_cols,n_tokens", [(1, 256, 1), (33, 1024, 3), (64, 2304, 7)])
def test_kernel_matches_float64_reference(t, n_rows, n_cols, n_tokens):
    raw = ggml_quantize(t, random_weights(np.random.default_rng(n_rows), n_rows, n_cols))
    x = make_tokens(n_tokens, n_cols, seed=n_tokens + 10)
    ours, _ = run_kernel(t, raw, x)
    w = FORMATS[t].dequantize(raw).astype(np.float64)
    a = activation_ref("Q8_K", x).astype(np.float64)
    ref = a @ w.T
    magnitude = np.abs(a) @ np.abs(w).T
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    assert np.all(np.abs(ours - ref) <= 1e-6 * magnitude + 1e-30)


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_kernel_handles_no_tokens_and_vec_dot_flag(t):
    raw = ggml_quantize(t, random_weights(np.random.default_rng(5), 6, 512))
    x = make_tokens(3, 512, seed=6)
    act = quantize_q8_k(x)
    a, b = np.empty((3, 6), np.float32), np.empty((3, 6), np.float32)
    KERNELS[t](raw, act, a)
    KERNELS[t](raw, act, b, vec_dot=True)  # k-quants have one order for any batch
    np.testing.assert_array_equal(bits(a), bits(b))
    empty = np.empty((0, 6), np.float32)
    KERNELS[t](raw, quantize_q8_k(x[:0]), empty)
