"""Q6_K weights: the block layout and dequantization against gguf-py, the kernel bit for bit
against ggml's own ggml_vec_dot_q6_K_q8_K, and against a float64 reference."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

from offload.testing import llama_cpp_is_avx512_build
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T
from gguf import quants as gq

from offload.kernels.formats import activation_ref
from offload.kernels.numba_kernels import quantize_q8_k
from offload.kernels.q6_k import Q6_KFormat, matmul_q6_k

FMT = Q6_KFormat()
Q8_K_BLOCK = np.dtype([("d", "<f4"), ("qs", "i1", 256), ("bsums", "<i2", 16)])


def bits(a: np.ndarray) -> np.ndarray:
    """float32 bit patterns, so that comparisons see -0.0 and rounding exactly."""
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def _lib_dir() -> Path:
    import llama_cpp

    return Path(llama_cpp.__file__).parent / "lib"


_BASE = None


def quantize_ggml(values: np.ndarray) -> np.ndarray:
    """float32 (n_rows, n_cols) -> Q6_K rows exactly as llama.cpp's quantizer makes them."""
    global _BASE
    if _BASE is None:
        _BASE = ctypes.CDLL(str(_lib_dir() / "libggml-base.so"))
        _BASE.ggml_quantize_chunk.restype = ctypes.c_size_t
        _BASE.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                              ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        _BASE.ggml_quantize_init.argtypes = [ctypes.c_int]
        _BASE.ggml_quantize_init(int(T.Q6_K))
    values = np.ascontiguousarray(values, dtype=np.float32)
    n_rows, n_cols = values.shape
    raw = np.zeros((n_rows, FMT.row_bytes(n_cols)), dtype=np.uint8)
    size = _BASE.ggml_quantize_chunk(int(T.Q6_K), values.ctypes.data, raw.ctypes.data, 0, n_rows, n_cols, None)
    assert size == raw.nbytes
    return raw


def random_weights(rng: np.random.Generator, n_rows: int, n_cols: int) -> np.ndarray:
    """Gaussian weights with row scales over a few orders of magnitude, some all-zero rows."""
    scale = np.exp(rng.uniform(-6, 3, size=(n_rows, 1)))
    values = (rng.standard_normal((n_rows, n_cols)) * scale).astype(np.float32)
    values[::7] = 0.0
    return values


def random_raw(rng: np.random.Generator, n_rows: int, n_blocks: int) -> np.ndarray:
    """Random Q6_K bytes with finite f16 super-scales (edge cases first)."""
    raw = rng.integers(0, 256, size=(n_rows, n_blocks * FMT.type_size), dtype=np.uint8)
    d = rng.standard_normal(n_rows * n_blocks).astype(np.float16)
    edge = [0.0, -0.0, 1.0, -1.0, 65504.0, -65504.0, 2.0**-24, -(2.0**-20), 2.0**-14]
    d[: len(edge)] = edge[: len(d)]
    raw.view(FMT.layout)["d"] = d.reshape(n_rows, n_blocks)
    return raw


def make_tokens(n_tokens: int, n_cols: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n_tokens, n_cols)) * np.exp(rng.uniform(-2, 2, size=(n_tokens, 1)))).astype(np.float32)


def run_kernel(raw: np.ndarray, x: np.ndarray) -> np.ndarray:
    out = np.full((x.shape[0], raw.shape[0]), np.nan, dtype=np.float32)
    matmul_q6_k(raw, quantize_q8_k(x), out)
    return out


# -- layout and dequantization -----------------------------------------------------------------

def test_layout_matches_ggml():
    assert (FMT.name, FMT.ggml_type, FMT.vec_dot_type) == ("Q6_K", T.Q6_K, "Q8_K")
    assert (FMT.block_size, FMT.type_size) == GGML_QUANT_SIZES[T.Q6_K] == (256, 210)
    offsets = {name: FMT.layout.fields[name][1] for name in FMT.layout.names}
    assert offsets == {"ql": 0, "qh": 128, "scales": 192, "d": 208}


def test_dequantize_matches_gguf_on_real_blocks():
    rng = np.random.default_rng(1)
    values = random_weights(rng, 24, 512)
    values[3, :256] = 0.0  # an all-zero block next to a normal one
    values[5] *= 1e-3  # super-scales that are f16 subnormals
    values[6] = -np.abs(values[6])
    raw = quantize_ggml(values)
    ours = FMT.dequantize(raw)
    assert ours.dtype == np.float32 and ours.shape == values.shape
    np.testing.assert_array_equal(bits(ours), bits(gq.dequantize(raw, T.Q6_K)))
    assert not ours[0].any()
    # the quantizer did its job: close to the input (except where d is an f16 subnormal)
    normal = np.arange(len(values)) != 5
    err = np.abs(ours - values)[normal]
    assert np.all(err <= 0.05 * np.abs(values[normal]).max(axis=1, keepdims=True))


def test_dequantize_matches_gguf_on_random_bytes():
    raw = random_raw(np.random.default_rng(2), 8, 4)
    ours = FMT.dequantize(raw)
    assert not np.isnan(ours).any()
    np.testing.assert_array_equal(bits(ours), bits(gq.dequantize(raw, T.Q6_K)))
    stacked = FMT.dequantize(raw.reshape(2, 4, -1))  # leading dims are kept
    np.testing.assert_array_equal(bits(stacked.reshape(8, -1)), bits(ours))


def test_dequantize_value_order():
    """One block written by hand from ggml's dequantize_row_q6_K loop."""
    raw = random_raw(np.random.default_rng(3), 1, 1)[0]
    b = raw.view(FMT.layout)[0]
    want = np.zeros(256, dtype=np.float32)
    d = np.float32(b["d"])
    for h in range(2):
        ql, qh, sc = b["ql"][64 * h :], b["qh"][32 * h :], b["scales"][8 * h :]
        for l in range(32):
            i = l // 16
            q1 = ((int(ql[l]) & 0xF) | (((int(qh[l]) >> 0) & 3) << 4)) - 32
            q2 = ((int(ql[l + 32]) & 0xF) | (((int(qh[l]) >> 2) & 3) << 4)) - 32
            q3 = ((int(ql[l]) >> 4) | (((int(qh[l]) >> 4) & 3) << 4)) - 32
            q4 = ((int(ql[l + 32]) >> 4) | (((int(qh[l]) >> 6) & 3) << 4)) - 32
            for off, s, q in ((0, 0, q1), (32, 2, q2), (64, 4, q3), (96, 6, q4)):
                want[128 * h + l + off] = d * np.float32(sc[i + s]) * np.float32(q)
    np.testing.assert_array_equal(bits(FMT.dequantize(raw[None])[0]), bits(want))


# -- bit-exact against ggml_vec_dot_q6_K_q8_K ----------------------------------------------

def _ggml_cpu():
    if llama_cpp_is_avx512_build():
        pytest.skip("llama.cpp was built for AVX-512 here; offload follows its AVX2 build (install it as the README says)")
    lib = ctypes.CDLL(str(_lib_dir() / "libggml-cpu.so"))
    lib.ggml_vec_dot_q6_K_q8_K.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p,
                                           ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    lib.ggml_cpu_init()  # fills ggml's f16 -> f32 table, which the dot product reads
    return lib


def ggml_matmul(lib, raw: np.ndarray, x: np.ndarray) -> np.ndarray:
    """ggml's vec_dot for every (token, row), on the same Q8_K activations the kernel gets."""
    qs, d, bsums = quantize_q8_k(x)
    n_tokens, n_cols = x.shape
    out = np.zeros((n_tokens, raw.shape[0]), dtype=np.float32)
    s = np.zeros(1, dtype=np.float32)
    for t in range(n_tokens):
        y = np.zeros(n_cols // 256, dtype=Q8_K_BLOCK)
        y["d"], y["qs"], y["bsums"] = d[t], qs[t].reshape(-1, 256), bsums[t].reshape(-1, 16)
        for r in range(raw.shape[0]):
            row = np.ascontiguousarray(raw[r])
            lib.ggml_vec_dot_q6_K_q8_K(n_cols, s.ctypes.data, 0, row.ctypes.data, 0, y.ctypes.data, 0, 1)
            out[t, r] = s[0]
    return out


@pytest.mark.parametrize("n_cols", [256, 512, 2304])
@pytest.mark.parametrize("n_tokens", [1, 5])
def test_kernel_is_bit_exact_with_ggml(n_cols, n_tokens):
    lib = _ggml_cpu()
    raw = quantize_ggml(random_weights(np.random.default_rng(n_cols), 32, n_cols))
    x = make_tokens(n_tokens, n_cols, seed=n_tokens)
    np.testing.assert_array_equal(bits(run_kernel(raw, x)), bits(ggml_matmul(lib, raw, x)))


def test_kernel_is_bit_exact_with_ggml_on_random_bytes():
    """Every q and scale pattern, plus crafted lanes above 2**24 (cvtepi32_ps rounds there)."""
    lib = _ggml_cpu()
    rng = np.random.default_rng(5)
    raw = random_raw(rng, 24, 3)
    x = make_tokens(4, 768, seed=6)
    # row 0, block 0: every q = 63 and scale 127; token 0 has +max on lane-0 values
    # (32c + 0..3) and -max on the rest of sub-blocks 0 and 1, so that lane 0 is
    # 127*(63*q8sum - 32*127*24) ~ -4.5e7, far past 2**24.
    blk = raw[0].view(FMT.layout)
    blk["ql"][0], blk["qh"][0], blk["scales"][0], blk["d"][0] = 0xFF, 0xFF, 127, 1.0
    x[0, :256] = 0.5
    x[0, :32] = -1.0
    x[0, :256][np.arange(256) % 32 < 4] = 1.0
    x[0, 32] = 0.95  # q8 -121: an odd lane sum, which float32 cannot hold above 2**25
    x[1, :256] = 1.0  # all q8 = -127
    blk = raw[1].view(FMT.layout)
    blk["ql"][0], blk["qh"][0], blk["scales"][0] = 0xFF, 0xFF, -128
    ours, theirs = run_kernel(raw, x), ggml_matmul(lib, raw, x)
    np.testing.assert_array_equal(bits(ours), bits(theirs))


# -- against a float64 reference ---------------------------------------------------------------

@pytest.mark.parametrize("n_rows,n_cols,n_tokens", [(1, 256, 1), (40, 1024, 3), (17, 2304, 8)])
def test_kernel_matches_float64_reference(n_rows, n_cols, n_tokens):
    raw = quantize_ggml(random_weights(np.random.default_rng(7 + n_rows), n_rows, n_cols))
    x = make_tokens(n_tokens, n_cols, seed=8 + n_tokens)
    w = FMT.dequantize(raw).astype(np.float64)
    a = activation_ref("Q8_K", x).astype(np.float64)
    ref = a @ w.T
    magnitude = np.abs(a) @ np.abs(w).T
    got = run_kernel(raw, x)
    assert got.dtype == np.float32 and got.shape == (n_tokens, n_rows)
    assert np.all(np.abs(got - ref) <= 1e-6 * magnitude + 1e-30)


def test_kernel_reads_read_only_views():
    """Memory-mapped GGUF tensors are read-only: same result, no copy needed."""
    raw = quantize_ggml(random_weights(np.random.default_rng(9), 6, 512))
    view = raw.view()
    view.flags.writeable = False
    x = make_tokens(2, 512, seed=10)
    np.testing.assert_array_equal(bits(run_kernel(view, x)), bits(run_kernel(raw, x)))
