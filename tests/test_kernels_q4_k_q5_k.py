"""Q4_K and Q5_K: block layouts and dequantization against gguf-py, the matmul kernels
against ggml's own AVX2 dot products (bit for bit) and a float64 reference."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

from offload.testing import llama_cpp_is_avx512_build
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf import quants as gq

from offload.kernels.formats import QK_K, activation_ref, quantize_q8_k_ref
from offload.kernels.numba_kernels import quantize_q8_k
from offload.kernels.q4_k_q5_k import Q4_KFormat, Q5_KFormat, matmul_q4_k, matmul_q5_k, scale_min_k4

FORMATS = {T.Q4_K: Q4_KFormat(), T.Q5_K: Q5_KFormat()}
KERNELS = {T.Q4_K: matmul_q4_k, T.Q5_K: matmul_q5_k}
TYPES = list(FORMATS)
Q8_K_BLOCK = np.dtype([("d", "<f4"), ("qs", "i1", QK_K), ("bsums", "<i2", QK_K // 16)])  # block_q8_K


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def _lib(name: str) -> ctypes.CDLL:
    import llama_cpp

    return ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / name))


def ggml_quantize(t: T, values: np.ndarray) -> np.ndarray:
    """float32 (n, k) -> uint8 (n, row_bytes): real blocks, made by llama.cpp's own quantizer."""
    base = _lib("libggml-base.so")
    base.ggml_quantize_chunk.restype = ctypes.c_size_t
    base.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                         ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    base.ggml_quantize_init(int(t))
    x = np.ascontiguousarray(values, dtype=np.float32)
    n, k = x.shape
    dst = np.zeros((n, FORMATS[t].row_bytes(k)), dtype=np.uint8)
    written = base.ggml_quantize_chunk(int(t), x.ctypes.data, dst.ctypes.data, 0, n, k, None)
    assert written == dst.nbytes
    return dst


def random_weights(rng: np.random.Generator, n_rows: int, n_cols: int) -> np.ndarray:
    """Gaussian rows with scales spread over a few orders of magnitude, some edge rows."""
    w = (rng.standard_normal((n_rows, n_cols)) * np.exp(rng.uniform(-5, 2, size=(n_rows, 1)))).astype(np.float32)
    w[1] = 0.0  # all-zero row
    w[2, :QK_K] = 0.0  # an all-zero super-block
    w[3] = np.abs(w[3])  # no negative values: dmin 0
    w[4] = -np.abs(w[4]) - 1.0  # all negative, offset
    w[5, ::2] += 100.0  # a big offset in half of the values
    return w


def make_matrix(t: T, n_rows: int, n_cols: int, seed: int) -> np.ndarray:
    return ggml_quantize(t, random_weights(np.random.default_rng(seed), n_rows, n_cols))


# Edge-case f16 scales: zeros, negatives, the largest finite, subnormals, the smallest normal.
F16_SCALES = np.array(
    [0.0, -0.0, 1.0, -1.0, 0.5, -3.25, 65504.0, -65504.0, 2.0**-24, -(2.0**-20), 2.0**-15, 2.0**-14],
    dtype=np.float16,
)


def random_raw(rng: np.random.Generator, t: T, n_rows: int, n_blocks: int) -> np.ndarray:
    """Random bytes in t's layout, with d and dmin set to finite values (edge cases first)."""
    fmt = FORMATS[t]
    raw = rng.integers(0, 256, size=(n_rows, n_blocks * fmt.type_size), dtype=np.uint8)
    blocks = raw.view(fmt.layout)
    for i, field in enumerate(("d", "dmin")):
        v = (rng.standard_normal(n_rows * n_blocks) * 1e-2).astype(np.float16)
        v[: len(F16_SCALES)] = np.roll(F16_SCALES, 5 * i)
        blocks[field] = v.reshape(n_rows, n_blocks)
    return raw


def make_tokens(n_tokens: int, n_cols: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n_tokens, n_cols)) * np.exp(rng.uniform(-2, 2, size=(n_tokens, 1)))).astype(np.float32)
    if n_tokens > 1:
        x[1, :QK_K] = 0.0  # an all-zero activation block (d = 0)
        x[1, QK_K - 1] = 0.0
    if n_tokens > 2:
        x[2] *= np.float32(1e-20)
    return x


# -- layout and dequantization ---------------------------------------------------------------

@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_layout_matches_ggml(t):
    fmt = FORMATS[t]
    assert fmt.name == t.name and fmt.ggml_type == t and fmt.vec_dot_type == "Q8_K"
    assert (fmt.block_size, fmt.type_size) == GGML_QUANT_SIZES[t]
    assert fmt.layout.names[:3] == ("d", "dmin", "scales") and fmt.layout.fields["qs"][1] == fmt.type_size - 128
    assert fmt.row_bytes(2304) == 9 * fmt.type_size


def test_scale_min_k4_matches_ggml_formula():
    """get_scale_min_k4 from ggml-quants.c, one byte at a time, for every byte value in every slot."""
    rng = np.random.default_rng(0)
    packed = rng.integers(0, 256, size=(300, 12), dtype=np.uint8)
    packed[:256, :] = np.arange(256, dtype=np.uint8)[:, None]
    sc, m = scale_min_k4(packed)
    for q, got_sc, got_m in zip(packed.astype(int), sc, m):
        for j in range(8):
            if j < 4:
                want = (q[j] & 63, q[j + 4] & 63)
            else:
                want = ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
            assert (got_sc[j], got_m[j]) == want


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_dequantize_matches_gguf_on_real_blocks(t):
    raw = make_matrix(t, 24, 1024, seed=1)
    ours = FORMATS[t].dequantize(raw)
    assert ours.dtype == np.float32 and ours.shape == (24, 1024)
    np.testing.assert_array_equal(bits(ours), bits(gq.dequantize(raw, t)))
    assert not ours[1].any()
    # and the blocks are good quantizations of what went in
    values = random_weights(np.random.default_rng(1), 24, 1024)
    err = np.abs(ours - values).max(axis=1) / np.maximum(np.abs(values).max(axis=1), 1e-30)
    assert np.all(err < (0.1 if t == T.Q4_K else 0.05))


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_dequantize_matches_gguf_on_random_bytes(t):
    raw = random_raw(np.random.default_rng(2), t, 8, 6)
    ours = FORMATS[t].dequantize(raw)
    assert np.isfinite(ours).all()
    np.testing.assert_array_equal(bits(ours), bits(gq.dequantize(raw, t)))
    stacked = FORMATS[t].dequantize(raw.reshape(2, 4, -1))  # leading dims are kept
    np.testing.assert_array_equal(bits(stacked.reshape(8, -1)), bits(ours))


# -- matmul against a float64 reference ----------------------------------------------------

def run_kernel(t: T, raw: np.ndarray, x: np.ndarray, act=None) -> np.ndarray:
    out = np.full((len(x), len(raw)), np.nan, dtype=np.float32)
    KERNELS[t](raw, act if act is not None else quantize_q8_k(x), out)
    return out


def split_dequantize(t: T, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 (d * sc * q, dmin * m) per value, the two terms the dot product sums apart."""
    fmt = FORMATS[t]
    blocks = raw.view(fmt.layout)
    d = blocks["d"].astype(np.float64)[..., None]
    dmin = blocks["dmin"].astype(np.float64)[..., None]
    sc, m = scale_min_k4(blocks["scales"])
    # q from the exact float32 dequantization of a block with d = 1 (sc = 1) and dmin = 0
    unit = blocks.copy()
    unit["d"], unit["dmin"] = 1.0, 0.0
    unit["scales"][..., :4] = 1
    unit["scales"][..., 4:8] = 0
    unit["scales"][..., 8:] = 1
    q = fmt.dequantize(unit.view(np.uint8).reshape(raw.shape)).astype(np.float64).reshape(*blocks.shape, 8, 32)
    scaled = (d * sc)[..., None] * q
    offset = np.broadcast_to((dmin * m)[..., None], q.shape)
    return scaled.reshape(raw.shape[0], -1), offset.reshape(raw.shape[0], -1)


def assert_close_to_ref(t: T, raw: np.ndarray, x: np.ndarray, got: np.ndarray) -> None:
    """|got - ref| <= 1e-6 * sum_c (|d sc q| + |dmin m|) |x_c|: float32 against float64
    summation, relative to the terms the kernel actually adds (the scaled quants and the
    offsets, which cancel where a weight is near zero)."""
    act = activation_ref("Q8_K", x).astype(np.float64)
    ref = act @ FORMATS[t].dequantize(raw).astype(np.float64).T
    scaled, offset = split_dequantize(t, raw)
    magnitude = np.abs(act) @ (np.abs(scaled) + np.abs(offset)).T
    assert got.shape == ref.shape and got.dtype == np.float32
    assert np.all(np.abs(got - ref) <= 1e-6 * magnitude + 1e-30)


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("n_rows,n_cols,n_tokens", [(7, 256, 1), (33, 512, 5), (16, 2304, 3)])
def test_matmul_matches_reference(t, n_rows, n_cols, n_tokens):
    raw = make_matrix(t, n_rows, n_cols, seed=n_cols)
    x = make_tokens(n_tokens, n_cols, seed=n_tokens)
    assert_close_to_ref(t, raw, x, run_kernel(t, raw, x))


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_matmul_on_random_bytes(t):
    raw = random_raw(np.random.default_rng(3), t, 12, 4)
    x = make_tokens(4, 4 * QK_K, seed=4)
    assert_close_to_ref(t, raw, x, run_kernel(t, raw, x))


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_matmul_reads_readonly_views_and_empty_batches(t):
    raw = make_matrix(t, 9, 512, seed=5)
    x = make_tokens(2, 512, seed=6)
    want = run_kernel(t, raw, x)
    ro = raw.copy()
    ro.flags.writeable = False
    np.testing.assert_array_equal(bits(run_kernel(t, ro, x)), bits(want))
    # the numpy reference quantizer gives the same activations as the numba one
    np.testing.assert_array_equal(bits(run_kernel(t, raw, x, act=quantize_q8_k_ref(x))), bits(want))
    assert run_kernel(t, raw, x[:0]).shape == (0, 9)


# -- bit-exact against ggml's own dot products ---------------------------------------------
#
# llama-cpp-python ships libggml-cpu, which exports ggml_vec_dot_q{4,5}_K_q8_K. The kernels
# follow their AVX2 summation order, so on an AVX2 machine they agree to the bit. An
# AVX-512 build of ggml sums differently: skip there.

def _ggml_cpu():
    if llama_cpp_is_avx512_build():
        pytest.skip("llama.cpp was built for AVX-512 here; offload follows its AVX2 build (install it as the README says)")
    lib = _lib("libggml-cpu.so")
    sig = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t,
           ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    for name in ("ggml_vec_dot_q4_K_q8_K", "ggml_vec_dot_q5_K_q8_K"):
        getattr(lib, name).argtypes = sig
    lib.ggml_cpu_init()  # fills ggml's f16 -> f32 table, which the dot products read
    return lib


def ggml_matmul(lib, t: T, raw: np.ndarray, x: np.ndarray) -> np.ndarray:
    """out[tok, r] = ggml's vec_dot of row r with token tok quantized to Q8_K."""
    fn = lib.ggml_vec_dot_q4_K_q8_K if t == T.Q4_K else lib.ggml_vec_dot_q5_K_q8_K
    qs, d, bsums = quantize_q8_k_ref(x)
    n_cols = x.shape[1]
    out = np.zeros((len(x), len(raw)), dtype=np.float32)
    s = np.zeros(1, dtype=np.float32)
    for tok in range(len(x)):
        y = np.zeros(n_cols // QK_K, dtype=Q8_K_BLOCK)
        y["d"], y["qs"], y["bsums"] = d[tok], qs[tok].reshape(-1, QK_K), bsums[tok].reshape(-1, 16)
        for r in range(len(raw)):
            row = np.ascontiguousarray(raw[r])
            fn(n_cols, s.ctypes.data, 0, row.ctypes.data, 0, y.ctypes.data, 0, 1)
            out[tok, r] = s[0]
    return out


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("n_cols", [256, 512, 2304])
@pytest.mark.parametrize("n_tokens", [1, 5])
def test_matmul_is_bit_exact_with_ggml(t, n_cols, n_tokens):
    lib = _ggml_cpu()
    raw = make_matrix(t, 40, n_cols, seed=10 + n_cols)
    x = make_tokens(n_tokens, n_cols, seed=11 + n_tokens)
    np.testing.assert_array_equal(bits(run_kernel(t, raw, x)), bits(ggml_matmul(lib, t, raw, x)))


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_matmul_on_random_bytes_is_bit_exact_with_ggml(t):
    """Every bit pattern: 6-bit scales and mins up to 63, all fifth bits, extreme d and dmin."""
    lib = _ggml_cpu()
    raw = random_raw(np.random.default_rng(12), t, 30, 4)
    x = make_tokens(3, 4 * QK_K, seed=13)
    np.testing.assert_array_equal(bits(run_kernel(t, raw, x)), bits(ggml_matmul(lib, t, raw, x)))
