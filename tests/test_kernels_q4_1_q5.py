"""Q4_1, Q5_0, Q5_1 and the Q8_1 activation quantizer: formats against gguf-py, kernels and
quantizer bit for bit against ggml's exported functions, kernels against a float64 reference."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

from offload.testing import llama_cpp_is_avx512_build
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T
from gguf import quants as gq

from offload.kernels import quantize_q8_0, quantize_q8_0_ref
from offload.kernels.q4_1_q5 import (
    Q4_1Format,
    Q5_0Format,
    Q5_1Format,
    activation_q8_1_ref,
    matmul_q4_1,
    matmul_q5_0,
    matmul_q5_1,
    quantize_q8_1,
    quantize_q8_1_ref,
)

FORMATS = {T.Q4_1: Q4_1Format(), T.Q5_0: Q5_0Format(), T.Q5_1: Q5_1Format()}
KERNELS = {T.Q4_1: matmul_q4_1, T.Q5_0: matmul_q5_0, T.Q5_1: matmul_q5_1}
TYPES = list(FORMATS)
Q8_0_BLOCK = np.dtype([("d", "<f2"), ("qs", "i1", 32)])
Q8_1_BLOCK = np.dtype([("d", "<f2"), ("s", "<f2"), ("qs", "i1", 32)])


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def _libdir() -> Path:
    import llama_cpp

    return Path(llama_cpp.__file__).parent / "lib"


def _ggml_cpu():
    if llama_cpp_is_avx512_build():
        pytest.skip("llama.cpp was built for AVX-512 here; offload follows its AVX2 build (install it as the README says)")
    lib = ctypes.CDLL(str(_libdir() / "libggml-cpu.so"))
    sig = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t,
           ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    for name in ("ggml_vec_dot_q4_1_q8_1", "ggml_vec_dot_q5_0_q8_0", "ggml_vec_dot_q5_1_q8_1"):
        getattr(lib, name).argtypes = sig
    for name in ("quantize_row_q8_0", "quantize_row_q8_1"):
        getattr(lib, name).argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    lib.llamafile_sgemm.restype = ctypes.c_bool
    lib.llamafile_sgemm.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                    ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                                    ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.ggml_cpu_init()  # fills ggml's f16 -> f32 table, which the dot products read
    return lib


def ggml_quantize(t: T, values: np.ndarray) -> np.ndarray:
    """float32 (n_rows, n_cols) -> uint8 rows, made by llama.cpp's own quantizer."""
    lib = ctypes.CDLL(str(_libdir() / "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_init(int(t))
    values = np.ascontiguousarray(values, dtype=np.float32)
    n_rows, n_cols = values.shape
    block, size = GGML_QUANT_SIZES[t]
    out = np.zeros((n_rows, n_cols // block * size), dtype=np.uint8)
    written = lib.ggml_quantize_chunk(int(t), values.ctypes.data, out.ctypes.data, 0, n_rows, n_cols, None)
    assert written == out.nbytes
    return out


def random_weights(rng: np.random.Generator, n_rows: int, n_cols: int) -> np.ndarray:
    """Gaussian rows with a scale spread over a few orders of magnitude, a shifted row
    (all-positive blocks: mins matter), a row of zeros."""
    scale = np.exp(rng.uniform(-4, 2, size=(n_rows, 1)))
    values = (rng.standard_normal((n_rows, n_cols)) * scale).astype(np.float32)
    values[0] = 0.0
    if n_rows > 2:
        values[1] = np.abs(values[1]) + np.float32(0.5)
        values[2, :32] = 0.0
    return values


def random_raw(rng: np.random.Generator, t: T, n_rows: int, n_blocks: int) -> np.ndarray:
    """Random bytes in t's layout with finite fp16 d (and m) fields, edge cases included."""
    fmt = FORMATS[t]
    raw = rng.integers(0, 256, size=(n_rows, n_blocks * fmt.type_size), dtype=np.uint8)
    blocks = raw.view(fmt.layout)
    edge = np.array([0.0, -0.0, 1.0, -1.0, 65504.0, -65504.0, 2.0**-24, -(2.0**-20), 2.0**-14], dtype=np.float16)
    for field in ("d", "m"):
        if field in fmt.layout.names:
            v = rng.standard_normal(n_rows * n_blocks).astype(np.float16)
            v[: len(edge)] = edge
            blocks[field] = rng.permutation(v).reshape(n_rows, n_blocks)
    return raw


def make_tokens(n_tokens: int, n_cols: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n_tokens, n_cols)) * np.exp(rng.uniform(-2, 2, size=(n_tokens, 1)))
    return x.astype(np.float32)


def activations(t: T, x: np.ndarray) -> tuple[np.ndarray, ...]:
    return quantize_q8_0(x) if FORMATS[t].vec_dot_type == "Q8_0" else quantize_q8_1(x)


def ggml_dot(lib, t: T, w_row: np.ndarray, act: tuple[np.ndarray, ...], tok: int) -> np.float32:
    """ggml's vec_dot of one weight row with token tok of the converted activations."""
    n = act[0].shape[1]
    if t == T.Q5_0:
        qs, d = act
        y = np.zeros(n // 32, dtype=Q8_0_BLOCK)
        fn = lib.ggml_vec_dot_q5_0_q8_0
    else:
        qs, d, s = act
        y = np.zeros(n // 32, dtype=Q8_1_BLOCK)
        y["s"] = s[tok].astype(np.float16)
        fn = lib.ggml_vec_dot_q4_1_q8_1 if t == T.Q4_1 else lib.ggml_vec_dot_q5_1_q8_1
    y["d"], y["qs"] = d[tok].astype(np.float16), qs[tok].reshape(-1, 32)
    w = np.ascontiguousarray(w_row)
    out = np.zeros(1, dtype=np.float32)
    fn(n, out.ctypes.data, 0, w.ctypes.data, 0, y.ctypes.data, 0, 1)
    return out[0]


# -- formats ----------------------------------------------------------------------------------

@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_format_table(t):
    fmt = FORMATS[t]
    assert fmt.name == t.name and fmt.ggml_type == t
    assert (fmt.block_size, fmt.type_size) == GGML_QUANT_SIZES[t]
    assert fmt.vec_dot_type == ("Q8_0" if t == T.Q5_0 else "Q8_1")


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_dequantize_matches_gguf_on_ggml_blocks(t):
    values = random_weights(np.random.default_rng(1), 24, 512)
    values[3] *= 1e-6  # scales that are f16 subnormals
    values[4] = -np.abs(values[4])
    raw = ggml_quantize(t, values)
    ours = FORMATS[t].dequantize(raw)
    assert ours.dtype == np.float32 and ours.shape == values.shape
    np.testing.assert_array_equal(bits(ours), bits(gq.dequantize(raw, t)))
    assert not ours[0].any()  # a zero row stays zero
    np.testing.assert_allclose(ours[5:], values[5:], atol=0.2 * np.abs(values[5:]).max())  # a sanity check


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_dequantize_matches_gguf_on_random_bytes(t):
    raw = random_raw(np.random.default_rng(2), t, 8, 16)
    ours = FORMATS[t].dequantize(raw)
    assert not np.isnan(ours).any()
    np.testing.assert_array_equal(bits(ours), bits(gq.dequantize(raw, t)))
    stacked = FORMATS[t].dequantize(raw.reshape(2, 4, -1))
    np.testing.assert_array_equal(bits(stacked.reshape(8, -1)), bits(ours))


# -- Q8_1 activations -------------------------------------------------------------------------

def q8_1_inputs() -> np.ndarray:
    x = make_tokens(6, 512, seed=3)
    x[0, :32] = 0.0  # all-zero block: d = s = 0
    x[0, 32:64] = np.float32(0.5) + np.arange(32, dtype=np.float32) - 16  # exact ties (id = 1)
    x[0, 63] = 127.0
    x[0, 64:96] = np.arange(-31, 33, 2, dtype=np.float32)  # ties at id = 0.5
    x[0, 95] = -254.0
    x[1, :32] = 0.0
    x[1, 7] = -3.0  # one negative value: s = -d * 127
    x[2] *= 1e-7  # d underflows to an f16 subnormal
    x[3] *= 1e7  # d overflows f16 to inf
    x[4] *= 1e-30
    return x


def test_quantize_q8_1_matches_q8_0_and_its_twin():
    x = q8_1_inputs()
    qs, d, s = quantize_q8_1_ref(x)
    q0, d0 = quantize_q8_0_ref(x)
    np.testing.assert_array_equal(qs, q0)  # the same quants and scale as Q8_0
    np.testing.assert_array_equal(bits(d), bits(d0))
    assert list(qs[0, 32:40]) == [-16, -14, -14, -12, -12, -10, -10, -8]  # ties to even
    assert d[0, 0] == 0 and s[0, 0] == 0
    for a, b in zip(quantize_q8_1(x), (qs, d, s)):
        np.testing.assert_array_equal(a.view(np.uint8) if a.dtype == np.int8 else bits(a),
                                      b.view(np.uint8) if b.dtype == np.int8 else bits(b))


def test_q8_1_activation_quantizer_is_bit_exact_with_ggml():
    lib = _ggml_cpu()
    x = q8_1_inputs()
    blocks = np.zeros((len(x), x.shape[1] // 32), dtype=Q8_1_BLOCK)
    for t in range(len(x)):
        row = np.ascontiguousarray(x[t])
        lib.quantize_row_q8_1(row.ctypes.data, blocks[t].ctypes.data, x.shape[1])
    for qs, d, s in (quantize_q8_1(x), quantize_q8_1_ref(x)):
        np.testing.assert_array_equal(blocks["qs"].reshape(len(x), -1), qs)
        np.testing.assert_array_equal(bits(blocks["d"].astype(np.float32)), bits(d))
        np.testing.assert_array_equal(bits(blocks["s"].astype(np.float32)), bits(s))


# -- kernels -------------------------------------------------------------------------------------

@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("n_cols", [256, 512, 2304])
@pytest.mark.parametrize("n_tokens", [1, 5])
def test_matmul_is_bit_exact_with_ggml_vec_dot(t, n_cols, n_tokens):
    lib = _ggml_cpu()
    n_rows = 12
    w = ggml_quantize(t, random_weights(np.random.default_rng(n_cols), n_rows, n_cols))
    w[-4:] = random_raw(np.random.default_rng(n_cols + 1), t, 4, n_cols // 32)  # any bit pattern
    x = make_tokens(n_tokens, n_cols, seed=n_tokens)
    act = activations(t, x)
    for vec_dot in (False, True):
        ours = np.full((n_tokens, n_rows), np.nan, dtype=np.float32)
        KERNELS[t](w, act, ours, vec_dot)
        theirs = np.array([[ggml_dot(lib, t, w[r], act, tok) for r in range(n_rows)] for tok in range(n_tokens)],
                          dtype=np.float32)
        np.testing.assert_array_equal(bits(ours), bits(theirs))


class ComputeParams(ctypes.Structure):
    """ggml's struct ggml_compute_params (ggml-cpu-impl.h)."""

    _fields_ = [("ith", ctypes.c_int), ("nth", ctypes.c_int), ("wsize", ctypes.c_size_t),
                ("wdata", ctypes.c_void_p), ("threadpool", ctypes.c_void_p), ("use_ref", ctypes.c_bool)]


@pytest.mark.parametrize("n_rows,n_tokens", [(12, 5), (7, 2), (16, 9)])
def test_q5_0_batch_is_bit_exact_with_tinyblas(n_rows, n_tokens):
    """A batch of 2+ tokens goes through llamafile_sgemm's tinyBLAS_Q0_AVX in ggml's mul_mat:
    its per-output order is vec_dot's, so the same kernel must match it too."""
    lib = _ggml_cpu()
    n_cols = 512
    w = ggml_quantize(T.Q5_0, random_weights(np.random.default_rng(40 + n_rows), n_rows, n_cols))
    x = make_tokens(n_tokens, n_cols, seed=41)
    qs, d = quantize_q8_0(x)
    y = np.zeros((n_tokens, n_cols // 32), dtype=Q8_0_BLOCK)
    y["d"], y["qs"] = d.astype(np.float16), qs.reshape(n_tokens, -1, 32)
    theirs = np.full((n_tokens, n_rows), np.nan, dtype=np.float32)
    params = ComputeParams(0, 1, 0, None, None, False)
    nb = n_cols // 32
    assert lib.llamafile_sgemm(ctypes.byref(params), n_rows, n_tokens, nb, w.ctypes.data, nb, y.ctypes.data, nb,
                               theirs.ctypes.data, n_rows, int(T.Q5_0), int(T.Q8_0), int(T.F32))
    ours = np.empty_like(theirs)
    matmul_q5_0(w, (qs, d), ours)
    np.testing.assert_array_equal(bits(ours), bits(theirs))


def reference(t: T, w: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 dequantize(W) @ act(x), and the sum of |terms| per output.

    For Q8_1 the weights' mins multiply s = fp16(d * sum(qs)) in ggml, not fp16(d) * sum(qs):
    the reference adds m * (s - d * sum(qs)) per block, so it differs from the plain
    dequantized product only by that (documented) term.
    """
    fmt = FORMATS[t]
    wd = fmt.dequantize(w).astype(np.float64)
    if fmt.vec_dot_type == "Q8_0":
        qs, d = quantize_q8_0_ref(x)
        a = (qs.reshape(len(x), -1, 32) * d[..., None]).reshape(x.shape).astype(np.float64)
        return a @ wd.T, np.abs(a) @ np.abs(wd).T
    qs, d, s = quantize_q8_1_ref(x)
    a = activation_q8_1_ref(x).astype(np.float64)
    m = w.view(fmt.layout)["m"].astype(np.float64)  # (n_rows, n_blocks)
    delta = s.astype(np.float64) - d.astype(np.float64) * qs.reshape(len(x), -1, 32).sum(axis=-1)
    return a @ wd.T + delta @ m.T, np.abs(a) @ np.abs(wd).T + np.abs(s).astype(np.float64) @ np.abs(m).T


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("n_rows,n_cols,n_tokens", [(1, 32, 1), (9, 256, 3), (64, 2304, 4)])
def test_matmul_matches_float64_reference(t, n_rows, n_cols, n_tokens):
    rng = np.random.default_rng(n_rows)
    w = ggml_quantize(t, random_weights(rng, n_rows, n_cols))
    x = make_tokens(n_tokens, n_cols, seed=n_cols)
    got = np.empty((n_tokens, n_rows), dtype=np.float32)
    KERNELS[t](w, activations(t, x), got)
    want, magnitude = reference(t, w, x)
    assert np.all(np.abs(got - want) <= 1e-6 * magnitude + 1e-30)


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_matmul_on_random_bytes_and_readonly_views(t):
    raw = random_raw(np.random.default_rng(7), t, 10, 8)
    raw.flags.writeable = False  # as a memmapped GGUF tensor
    x = make_tokens(3, 256, seed=8)
    got = np.empty((3, 10), dtype=np.float32)
    KERNELS[t](raw, activations(t, x), got)
    want, magnitude = reference(t, raw, x)
    assert np.all(np.abs(got - want) <= 1e-6 * magnitude + 1e-30)
