"""offload.kernels: block formats against gguf-py, activation conversions against ggml's
formulas, and the matmul kernels against a float64 reference and an exact float32 model of
their summation order."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from offload.testing import llama_cpp_is_avx512_build
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T
from gguf import quants as gq

from offload.kernels import (
    ACTIVATION_CONVERTERS,
    FORMATS,
    KERNELS,
    QMatrix,
    UnsupportedQuantType,
    activation_ref,
    dequantize_rows,
    f32_to_bf16,
    format_for,
    matmul,
    matmul_ref,
    quantize_q8_0,
    quantize_q8_0_ref,
    round_bf16,
    round_f16,
)

ALL = [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0]  # the other formats have their own test files
QUANTIZED = [T.Q8_0, T.Q4_0]
FLOATS = [T.F32, T.F16, T.BF16]


def bits(a: np.ndarray) -> np.ndarray:
    """float32 bit patterns, so that comparisons see -0.0 and inf exactly."""
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def encode(values: np.ndarray, t: T) -> np.ndarray:
    """float32 (..., n) -> uint8 GGUF bytes via gguf-py's quantizer (independent of ours)."""
    return np.ascontiguousarray(gq.quantize(values.astype(np.float32), t)).view(np.uint8)


def random_weights(rng: np.random.Generator, n_rows: int, n_cols: int) -> np.ndarray:
    """Realistic weights: gaussian, with a row scale spread over a few orders of magnitude."""
    scale = np.exp(rng.uniform(-3, 1, size=(n_rows, 1)))
    return (rng.standard_normal((n_rows, n_cols)) * scale).astype(np.float32)


# Edge-case f16 scales for quantized blocks: zeros, negatives, the largest finite value,
# subnormals (2**-24 is the smallest), the smallest normal.
F16_SCALES = np.array(
    [0.0, -0.0, 1.0, -1.0, 0.5, -3.25, 65504.0, -65504.0, 2.0**-24, -(2.0**-20), 2.0**-15, 2.0**-14],
    dtype=np.float16,
)


def random_raw(rng: np.random.Generator, t: T, n_rows: int, n_blocks: int) -> np.ndarray:
    """Random bytes in t's layout, NaN-free: scale fields set to finite values (edge cases
    first), float formats with NaN patterns replaced."""
    fmt = FORMATS[t]
    raw = rng.integers(0, 256, size=(n_rows, n_blocks * fmt.type_size), dtype=np.uint8)
    if t in QUANTIZED:
        d = rng.standard_normal(n_rows * n_blocks).astype(np.float16)
        d[: len(F16_SCALES)] = F16_SCALES
        raw.view(fmt.layout)["d"] = d.reshape(n_rows, n_blocks)
    elif t == T.F32:
        u = raw.view(np.uint32)
        u[(u & 0x7FFFFFFF) > 0x7F800000] = 0
    elif t == T.F16:
        u = raw.view(np.uint16)
        u[(u & 0x7FFF) > 0x7C00] = 0
    elif t == T.BF16:
        u = raw.view(np.uint16)
        u[(u & 0x7FFF) > 0x7F80] = 0
    return raw


# -- the format table ---------------------------------------------------------------------

@pytest.mark.parametrize("t", ALL, ids=lambda t: t.name)
def test_format_table_matches_ggml(t):
    fmt = FORMATS[t]
    assert fmt.name == t.name and fmt.ggml_type == t
    assert (fmt.block_size, fmt.type_size) == GGML_QUANT_SIZES[t]
    assert fmt.row_bytes(256) == 256 // fmt.block_size * fmt.type_size
    assert format_for(t) is fmt and format_for(int(t)) is fmt
    assert t in KERNELS and fmt.vec_dot_type in ACTIVATION_CONVERTERS


def test_row_bytes_rejects_partial_blocks():
    with pytest.raises(ValueError, match="multiple of 32"):
        FORMATS[T.Q4_0].row_bytes(48)


def test_unsupported_type_is_named():
    with pytest.raises(UnsupportedQuantType, match="I8") as e:
        format_for(T.I8)
    assert isinstance(e.value, ValueError)
    assert "Q4_0" in str(e.value)  # the message lists what is supported
    with pytest.raises(UnsupportedQuantType, match="I8"):
        format_for(int(T.I8))
    with pytest.raises(UnsupportedQuantType, match="12345"):
        format_for(12345)


# -- dequantization against gguf-py ------------------------------------------------------------

@pytest.mark.parametrize("t", ALL, ids=lambda t: t.name)
def test_dequantize_matches_gguf_on_quantized_data(t):
    rng = np.random.default_rng(1)
    values = random_weights(rng, 16, 256)
    values[3] = 0.0  # all-zero blocks
    values[4, :32] = 0.0
    values[5] *= 1e4
    values[6] *= 1e-6  # scales that are f16 subnormals
    values[7] = -np.abs(values[7])
    raw = encode(values, t)
    ours = FORMATS[t].dequantize(raw)
    assert ours.dtype == np.float32 and ours.shape == values.shape
    np.testing.assert_array_equal(bits(ours), bits(gq.dequantize(raw, t)))


@pytest.mark.parametrize("t", ALL, ids=lambda t: t.name)
def test_dequantize_matches_gguf_on_random_bytes(t):
    rng = np.random.default_rng(2)
    fmt = FORMATS[t]
    raw = random_raw(rng, t, 8, 64 // fmt.block_size * 4)
    ours = fmt.dequantize(raw)
    assert not np.isnan(ours).any()
    np.testing.assert_array_equal(bits(ours), bits(gq.dequantize(raw, t)))


@pytest.mark.parametrize("t", ALL, ids=lambda t: t.name)
def test_dequantize_keeps_leading_dims(t):
    fmt = FORMATS[t]
    raw = random_raw(np.random.default_rng(3), t, 6, 64 // fmt.block_size)
    flat = fmt.dequantize(raw)
    stacked = fmt.dequantize(raw.reshape(2, 3, -1))
    assert stacked.shape == (2, 3, 64)
    np.testing.assert_array_equal(bits(stacked.reshape(6, 64)), bits(flat))


# -- activation conversions ---------------------------------------------------------------

def q8_0_scalar(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml's x86 quantize_row_q8_0, one value at a time (Python's round() is half-to-even)."""
    n, k = x.shape
    qs = np.zeros((n, k), dtype=np.int8)
    d = np.zeros((n, k // 32), dtype=np.float32)
    for t in range(n):
        for b in range(k // 32):
            block = x[t, b * 32 : (b + 1) * 32]
            amax = np.float32(0)
            for v in block:
                amax = max(amax, np.float32(abs(v)))
            inv = np.float32(np.float32(127) / amax) if amax != 0 else np.float32(0)
            with np.errstate(over="ignore"):
                d[t, b] = np.float32(np.float16(np.float32(amax / np.float32(127))))
            for j, v in enumerate(block):
                qs[t, b * 32 + j] = round(float(np.float32(v * inv)))
    return qs, d


def q8_0_inputs() -> np.ndarray:
    rng = np.random.default_rng(4)
    x = rng.standard_normal((6, 256)).astype(np.float32)
    x[0, :32] = 0.0  # all-zero block
    # amax 127 makes id exactly 1, so these are exact ties; round-half-away would differ.
    x[0, 32:64] = np.float32(0.5) + np.arange(32, dtype=np.float32) - 16
    x[0, 63] = 127.0
    # amax 254 makes id exactly 0.5: odd integers land on ties.
    x[0, 64:96] = np.arange(-31, 33, 2, dtype=np.float32)
    x[0, 95] = -254.0
    x[1, :32] = 0.0
    x[1, 7] = -3.0  # a single (negative) nonzero value
    x[2] *= 1e-7  # scale underflows to an f16 subnormal or zero
    x[3] *= 1e7  # scale overflows f16 to inf, as in ggml
    x[4] *= 1e-30
    return x


def test_quantize_q8_0_ref_matches_the_formula():
    x = q8_0_inputs()
    qs, d = quantize_q8_0_ref(x)
    want_qs, want_d = q8_0_scalar(x)
    np.testing.assert_array_equal(qs, want_qs)
    np.testing.assert_array_equal(bits(d), bits(want_d))
    assert list(qs[0, 32:40]) == [-16, -14, -14, -12, -12, -10, -10, -8]  # ties to even
    assert not qs[0, :32].any() and d[0, 0] == 0


def test_quantize_q8_0_kernel_matches_ref():
    x = np.concatenate([q8_0_inputs(), np.random.default_rng(5).standard_normal((40, 256)).astype(np.float32)])
    qs, d = quantize_q8_0(x)
    want_qs, want_d = quantize_q8_0_ref(x)
    np.testing.assert_array_equal(qs, want_qs)
    np.testing.assert_array_equal(bits(d), bits(want_d))


def bf16_scalar(v: np.float32) -> int:
    """ggml_compute_fp32_to_bf16, with Python ints."""
    u = int(np.float32(v).view(np.uint32))
    if (u & 0x7FFFFFFF) > 0x7F800000:
        return (u >> 16) | 64
    return ((u + (0x7FFF + ((u >> 16) & 1))) >> 16) & 0xFFFF


def test_bf16_rounding_matches_ggml():
    rng = np.random.default_rng(6)
    u = rng.integers(0, 2**32, size=2000, dtype=np.uint64).astype(np.uint32)
    u[:8] = [0x3F808000, 0x3F818000, 0xBF808000, 0x7F7FFFFF, 0x7F800000, 0xFF800000, 0x00008000, 0x7FC00001]
    x = u.view(np.float32)
    got = f32_to_bf16(x)
    np.testing.assert_array_equal(got, [bf16_scalar(v) for v in x])
    assert list(got[:3]) == [0x3F80, 0x3F82, 0xBF80]  # ties go to even
    assert got[3] == 0x7F80  # the largest float rounds to inf
    finite = ~np.isnan(x)
    np.testing.assert_array_equal(bits(round_bf16(x)[finite]), got[finite].astype(np.uint32) << 16)


def test_f16_rounding():
    x = np.array([2049.0, 2051.0, 1e5, -1e-9, 0.1], dtype=np.float32)
    np.testing.assert_array_equal(round_f16(x), np.array([2048.0, 2052.0, np.inf, -0.0, np.float16(0.1)], np.float32))


# -- matmul ----------------------------------------------------------------------------------------

def make_matrix(t: T, n_rows: int, n_cols: int, seed: int) -> QMatrix:
    return QMatrix.from_raw(t, encode(random_weights(np.random.default_rng(seed), n_rows, n_cols), t), n_rows, n_cols)


def make_tokens(n_tokens: int, n_cols: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n_tokens, n_cols)) * np.exp(rng.uniform(-2, 2, size=(n_tokens, 1)))).astype(np.float32)


def assert_close_to_ref(w: QMatrix, x: np.ndarray, got: np.ndarray) -> None:
    """|got - ref| <= 1e-6 * sum_c |W[r, c] * act(x)[t, c]|: float32 against float64
    summation, measured against the size of the terms (not of a possibly cancelling sum)."""
    ref = matmul_ref(w, x)
    magnitude = np.abs(activation_ref(w.fmt.vec_dot_type, x)).astype(np.float64) @ np.abs(w.dequantize()).T.astype(np.float64)
    assert got.shape == ref.shape and got.dtype == np.float32
    assert np.all(np.abs(got - ref) <= 1e-6 * magnitude + 1e-30)


@pytest.mark.parametrize("t", ALL, ids=lambda t: t.name)
@pytest.mark.parametrize("n_rows,n_cols", [(1, 64), (7, 256), (96, 1024)])
@pytest.mark.parametrize("n_tokens", [1, 3, 17])
def test_matmul_matches_reference(t, n_rows, n_cols, n_tokens):
    w = make_matrix(t, n_rows, n_cols, seed=n_rows)
    x = make_tokens(n_tokens, n_cols, seed=n_tokens)
    assert_close_to_ref(w, x, matmul(w, x))


@pytest.mark.parametrize("t", ALL, ids=lambda t: t.name)
def test_matmul_on_random_bytes(t):
    """Every bit pattern the format allows (Q8_0 qs of -128, extreme scales)."""
    fmt = FORMATS[t]
    w = QMatrix(fmt, 12, 256, random_raw(np.random.default_rng(7), t, 12, 256 // fmt.block_size))
    x = make_tokens(5, 256, seed=8)
    if t in FLOATS:  # keep products of random floats finite
        w = QMatrix(fmt, 12, 256, encode(np.clip(w.dequantize(), -1e30, 1e30), t))
        x = x * np.float32(1e-10)
    assert_close_to_ref(w, x, matmul(w, x))


# -- bit-exact against ggml's own dot products ---------------------------------------------
#
# llama-cpp-python ships libggml-cpu, which exports ggml's CPU dot products. Our kernels
# follow their AVX2 summation order (see numba_kernels), so on an AVX2 machine they must
# agree to the bit. An AVX-512 build of ggml sums in 16 lanes instead: skip there.

def _ggml_cpu():
    import ctypes

    import llama_cpp

    if llama_cpp_is_avx512_build():
        pytest.skip("llama.cpp was built for AVX-512 here; offload follows its AVX2 build (install it as the README says)")
    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-cpu.so"))
    sig = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t,
           ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    for name in ("ggml_vec_dot_f32", "ggml_vec_dot_f16", "ggml_vec_dot_bf16", "ggml_vec_dot_q8_0_q8_0",
                 "ggml_vec_dot_q4_0_q8_0"):
        getattr(lib, name).argtypes = sig
    lib.quantize_row_q8_0.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    lib.ggml_cpu_init()  # fills ggml's f16 -> f32 table, which the dot products read
    return lib


def ggml_dot(lib, t, w_row: np.ndarray, act_row) -> np.float32:
    """ggml's vec_dot of one weight row (its GGUF bytes) with one converted activation row."""
    out = np.zeros(1, dtype=np.float32)
    if t == T.F32:
        x = np.ascontiguousarray(act_row, dtype=np.float32)
        fn, y = lib.ggml_vec_dot_f32, x
    elif t == T.F16:
        fn, y = lib.ggml_vec_dot_f16, np.ascontiguousarray(act_row).astype(np.float16)
    elif t == T.BF16:
        fn, y = lib.ggml_vec_dot_bf16, f32_to_bf16(np.ascontiguousarray(act_row))
    else:
        fn = lib.ggml_vec_dot_q8_0_q8_0 if t == T.Q8_0 else lib.ggml_vec_dot_q4_0_q8_0
        qs, d = act_row
        y = np.zeros(len(d), dtype=[("d", "<f2"), ("qs", "i1", 32)])
        y["d"], y["qs"] = d.astype(np.float16), qs.reshape(-1, 32)
    w = np.ascontiguousarray(w_row)
    fn(len(act_row) if t in FLOATS else len(act_row[0]), out.ctypes.data, 0, w.ctypes.data, 0, y.ctypes.data, 0, 1)
    return out[0]


@pytest.mark.parametrize("t", ALL, ids=lambda t: t.name)
@pytest.mark.parametrize("n_cols", [64, 256, 96 + 32 * 9, 1000])
def test_one_token_matmul_is_bit_exact_with_ggml(t, n_cols):
    """One token: ggml's vec_dot for every weight type (including the n % 32 tail)."""
    if n_cols % 32 and t not in FLOATS:
        pytest.skip("block formats need whole blocks")
    lib = _ggml_cpu()
    w = make_matrix(t, 16, n_cols, seed=21)
    x = make_tokens(1, n_cols, seed=22)
    ours = matmul(w, x)[0]
    if t in FLOATS:
        act = activation_ref(FORMATS[t].vec_dot_type, x)[0]
    else:
        qs, d = quantize_q8_0_ref(x)
        act = (qs[0], d[0])
    theirs = np.array([ggml_dot(lib, t, w.data[r], act) for r in range(w.n_rows)], dtype=np.float32)
    np.testing.assert_array_equal(bits(ours), bits(theirs))


def test_q8_0_activation_quantizer_is_bit_exact_with_ggml():
    lib = _ggml_cpu()
    x = make_tokens(3, 512, seed=23)
    qs, d = quantize_q8_0(x)
    for t in range(len(x)):
        blocks = np.zeros(512 // 32, dtype=[("d", "<f2"), ("qs", "i1", 32)])
        row = np.ascontiguousarray(x[t])
        lib.quantize_row_q8_0(row.ctypes.data, blocks.ctypes.data, 512)
        np.testing.assert_array_equal(blocks["qs"].reshape(-1), qs[t])
        np.testing.assert_array_equal(blocks["d"].astype(np.float32), d[t])


@pytest.mark.parametrize("t", ALL, ids=lambda t: t.name)
def test_expert_matmuls_sum_like_ggml_vec_dot(t):
    """Experts run through ggml's mul_mat_id, which uses vec_dot even for a batch of tokens."""
    lib = _ggml_cpu()
    w = make_matrix(t, 8, 256, seed=24)
    x = make_tokens(5, 256, seed=25)
    ours = matmul(w, x, expert=True)
    for tok in range(len(x)):
        if t in FLOATS:
            act = activation_ref(FORMATS[t].vec_dot_type, x[tok : tok + 1])[0]
        else:
            qs, d = quantize_q8_0_ref(x[tok : tok + 1])
            act = (qs[0], d[0])
        theirs = np.array([ggml_dot(lib, t, w.data[r], act) for r in range(w.n_rows)], dtype=np.float32)
        np.testing.assert_array_equal(bits(ours[tok]), bits(theirs))


def test_matmul_out_and_layouts():
    w = make_matrix(T.Q4_0, 7, 64, seed=13)
    x = make_tokens(3, 64, seed=14)
    want = matmul(w, x)
    out = np.full((3, 7), np.nan, dtype=np.float32)
    assert matmul(w, x, out=out) is out
    np.testing.assert_array_equal(out, want)
    np.testing.assert_array_equal(matmul(w, np.asfortranarray(x)), want)  # copied, same result
    assert matmul(w, x[:0]).shape == (0, 7)


def test_matmul_rejects_bad_inputs():
    w = make_matrix(T.Q8_0, 7, 64, seed=15)
    x = make_tokens(2, 64, seed=16)
    with pytest.raises(ValueError, match="float32"):
        matmul(w, x.astype(np.float64))
    with pytest.raises(ValueError, match=r"\(n_tokens, 64\)"):
        matmul(w, x[:, :32])
    with pytest.raises(ValueError):
        matmul(w, x[0])
    with pytest.raises(ValueError, match="out"):
        matmul(w, x, out=np.empty((7, 2), dtype=np.float32))


# -- rows, views, memory maps ----------------------------------------------------------------

@pytest.mark.parametrize("t", ALL, ids=lambda t: t.name)
def test_dequantize_rows(t):
    w = make_matrix(t, 10, 128, seed=17)
    rows = np.array([0, 5, 5, 9, 2])
    got = dequantize_rows(w, rows)
    assert got.dtype == np.float32 and got.shape == (5, 128)
    np.testing.assert_array_equal(bits(got), bits(gq.dequantize(w.data, t)[rows]))
    assert dequantize_rows(w, np.zeros(0, dtype=np.int64)).shape == (0, 128)
    with pytest.raises(ValueError, match="out of range"):
        dequantize_rows(w, np.array([10]))
    with pytest.raises(ValueError, match="out of range"):
        dequantize_rows(w, np.array([-1]))


def test_from_raw_does_not_copy():
    f32 = random_weights(np.random.default_rng(18), 6, 64)
    w = QMatrix.from_raw(T.F32, f32, 6, 64)
    assert w.data.dtype == np.uint8 and w.data.shape == (6, 256) and np.shares_memory(w.data, f32)
    f16 = f32.astype(np.float16)
    assert np.shares_memory(QMatrix.from_raw(int(T.F16), f16, 6, 64).data, f16)
    raw = encode(f32, T.Q4_0)
    w = QMatrix.from_raw(T.Q4_0, raw, 6, 64)
    assert w.data.shape == (6, 36) and np.shares_memory(w.data, raw)
    assert np.shares_memory(QMatrix.from_raw(T.Q4_0, raw.reshape(-1), 6, 64).data, raw)


def test_from_raw_rejects_bad_data():
    raw = encode(random_weights(np.random.default_rng(19), 6, 64), T.Q8_0)
    with pytest.raises(ValueError, match="bytes"):
        QMatrix.from_raw(T.Q8_0, raw[:5], 6, 64)
    with pytest.raises(ValueError, match="contiguous"):
        QMatrix.from_raw(T.Q8_0, np.zeros((6, 136), np.uint8)[:, ::2], 6, 64)
    with pytest.raises(UnsupportedQuantType):
        QMatrix.from_raw(T.I8, raw, 6, 256)
    with pytest.raises(ValueError, match="uint8"):
        QMatrix(FORMATS[T.Q8_0], 6, 64, raw[:, :-1])


def test_gguf_file_tensors_work_in_place(tmp_path):
    """Tensors read from a real GGUF file (read-only memmap views) multiply without copies."""
    import gguf

    rng = np.random.default_rng(20)
    path = tmp_path / "t.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    dense = {t: random_weights(rng, 5, 64) for t in ALL}
    for t, values in dense.items():
        if t == T.F32:
            writer.add_tensor(t.name, values)
        else:
            writer.add_tensor(t.name, encode(values, t), raw_dtype=t)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    reader = gguf.GGUFReader(str(path))
    x = make_tokens(3, 64, seed=21)
    for tensor in reader.tensors:
        t = T(tensor.tensor_type)
        n_cols, n_rows = (int(n) for n in tensor.shape)
        w = QMatrix.from_raw(t, tensor.data, n_rows, n_cols)
        assert not w.data.flags.writeable and np.shares_memory(w.data, reader.data)
        in_memory = QMatrix.from_raw(t, encode(dense[t], t), n_rows, n_cols)
        np.testing.assert_array_equal(matmul(w, x), matmul(in_memory, x))
        np.testing.assert_array_equal(dequantize_rows(w, np.array([4, 0])), in_memory.dequantize()[[4, 0]])


# -- elementwise math against ggml's own ---------------------------------------------------

def test_softmax_is_bit_exact_with_ggml():
    import ctypes

    from offload.kernels import ggml_math

    lib = _ggml_cpu()
    lib.ggml_vec_soft_max_f32.restype = ctypes.c_double
    lib.ggml_vec_soft_max_f32.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_float]
    rng = np.random.default_rng(31)
    for n in (1, 4, 7, 8, 60, 64, 256):  # routers have 4..160 experts: lengths with a tail too
        x = (rng.standard_normal((20, n)) * 4).astype(np.float32)
        x[:, rng.integers(0, n, max(1, n // 4))] = -np.inf  # masked positions, as in attention
        x[:, 0] = 0.0
        ours = ggml_math.softmax(x)
        np.testing.assert_array_equal(bits(ggml_math.softmax_ref(x)), bits(ours))
        for row, got in zip(x, ours):
            y = np.zeros(n, dtype=np.float32)
            total = lib.ggml_vec_soft_max_f32(n, y.ctypes.data, row.ctypes.data, ctypes.c_float(row.max()))
            y *= np.float32(1.0 / total)
            np.testing.assert_array_equal(bits(got), bits(y))


def test_swiglu_is_bit_exact_with_ggml():
    import ctypes

    from offload.kernels import ggml_math

    lib = _ggml_cpu()
    lib.ggml_vec_swiglu_f32.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    rng = np.random.default_rng(32)
    x = (rng.standard_normal((16, 128)) * 5).astype(np.float32)
    x[0, :8] = [0.0, -0.0, 88.0, -88.0, 100.0, -100.0, 1e-30, -1e-30]  # ggml_v_expf's edge paths
    g = rng.standard_normal((16, 128)).astype(np.float32)
    ours = ggml_math.silu_mul(x, g)  # the C kernel where built
    numba = np.empty_like(x)
    ggml_math._silu_mul_rows(x, g, numba)
    np.testing.assert_array_equal(bits(ggml_math.silu_mul_ref(x, g)), bits(ours))
    np.testing.assert_array_equal(bits(numba), bits(ours))
    for xr, gr, got in zip(x, g, ours):
        y = np.zeros(128, dtype=np.float32)
        lib.ggml_vec_swiglu_f32(128, y.ctypes.data, xr.ctypes.data, gr.ctypes.data)
        np.testing.assert_array_equal(bits(got), bits(y))


def test_expf_is_accurate():
    """ggml's exp polynomial: within 2 ulp of the true value over the float range it meets."""
    from offload.kernels import ggml_math

    x = np.linspace(-87, 88, 200_001, dtype=np.float32)
    np.testing.assert_array_equal(bits(ggml_math.expf(x)), bits(ggml_math.expf_ref(x)))
    edges = np.array([-np.inf, np.inf, -200, 200, -126.5, 126.5, -100, 100, 0.0, -0.0, 1e-30], dtype=np.float32)
    np.testing.assert_array_equal(bits(ggml_math.expf(edges)), bits(ggml_math.expf_ref(edges)))
    ours = ggml_math.expf(x).astype(np.float64)
    exact = np.exp(x.astype(np.float64))
    assert np.max(np.abs(ours - exact) / exact) < 2.5e-7
    assert ggml_math.expf(np.array([-np.inf], dtype=np.float32))[0] == 0.0


def test_q8_k_activation_quantizer_is_bit_exact_with_ggml():
    import ctypes

    from offload.kernels import quantize_q8_k, quantize_q8_k_ref

    lib = _ggml_cpu()
    lib.quantize_row_q8_K.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    block = np.dtype([("d", "<f4"), ("qs", "i1", 256), ("bsums", "<i2", 16)])
    x = make_tokens(4, 1024, seed=33)
    x[1, :256] = 0.0  # an all-zero block
    x[2, 256:512] = np.float32(0.5)  # ties: the first maximum wins
    x[3, 3] = -x[3, :256].__abs__().max() * 2  # a negative maximum
    ref, fast = quantize_q8_k_ref(x), quantize_q8_k(x)
    for a, b in zip(ref, fast):
        np.testing.assert_array_equal(a, b)
    for t in range(len(x)):
        blocks = np.zeros(4, dtype=block)
        row = np.ascontiguousarray(x[t])
        lib.quantize_row_q8_K(row.ctypes.data, blocks.ctypes.data, 1024)
        np.testing.assert_array_equal(blocks["qs"].reshape(-1), ref[0][t])
        np.testing.assert_array_equal(bits(blocks["d"]), bits(ref[1][t]))
        np.testing.assert_array_equal(blocks["bsums"].reshape(-1), ref[2][t])


def test_rms_norm_and_rope_compiled_match_numpy():
    from offload.kernels import ggml_math

    rng = np.random.default_rng(33)
    x = (rng.standard_normal((9, 4, 64)) * np.exp(rng.uniform(-4, 4, size=(9, 4, 1)))).astype(np.float32)
    w = rng.standard_normal(64).astype(np.float32)
    np.testing.assert_array_equal(bits(ggml_math.rms_norm(x, w, 1e-5)), bits(ggml_math.rms_norm_ref(x, w, 1e-5)))
    cos, sin = rng.standard_normal((2, 9, 24)).astype(np.float32)
    for style in ("normal", "neox"):
        a, b = x.copy(), x.copy()
        ggml_math.apply_rope(a, cos, sin, 48, style)
        ggml_math.apply_rope_ref(b, cos, sin, 48, style)
        np.testing.assert_array_equal(bits(a), bits(b))
        np.testing.assert_array_equal(bits(a[..., 48:]), bits(x[..., 48:]))  # past rope_dim: untouched


def test_round_f16_in_numba_matches_numpy():
    from offload.kernels import numba_intrinsics
    from offload.kernels.jit import njit

    @njit
    def run(x, out):
        for i in range(x.size):
            out[i] = numba_intrinsics.round_f16(x[i])

    rng = np.random.default_rng(34)
    x = np.concatenate([
        (rng.standard_normal(100_000) * np.exp(rng.uniform(-25, 12, 100_000))).astype(np.float32),
        np.array([65504, 65519.99, 65520, -65520, 2.0**-24, 2.0**-25, 1.5 * 2.0**-25, -0.0, np.inf], np.float32),
    ])
    out = np.empty_like(x)
    run(x, out)
    np.testing.assert_array_equal(bits(out), bits(round_f16(x)))


@pytest.mark.parametrize("qtype", ["Q8_0", "Q5_0", "Q4_1", "Q4_K", "Q6_K", "IQ4_NL"])
def test_matmul_heads_equals_a_matmul_per_head(qtype):
    """dispatch.matmul_heads (MLA's k_b / v_b of a decoding token in one C call) against one
    matmul per head, for activations of each kind (Q8_0, Q8_1: Q4_1, Q8_K: the K-quants)."""
    from offload.kernels.dispatch import matmul, matmul_heads
    from offload.kernels.formats import QMatrix, format_for
    from offload.testing import ggml_quantize

    rng = np.random.default_rng(7)
    n_heads, n_rows, n_cols = 4, 48, 512
    raw = ggml_quantize(rng.standard_normal((n_heads * n_rows, n_cols)).astype(np.float32), T[qtype])
    fmt = format_for(T[qtype])
    ws = [QMatrix(fmt, n_rows, n_cols, raw[h * n_rows:(h + 1) * n_rows]) for h in range(n_heads)]
    x = rng.standard_normal((n_heads, n_cols)).astype(np.float32)
    got = matmul_heads(ws, x)
    if got is None:
        pytest.skip("no C kernels (matmul_x) here")
    want = np.stack([matmul(w, x[h:h + 1])[0] for h, w in enumerate(ws)])
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    # heads that do not lie one after another are left to the caller
    assert matmul_heads(ws[::-1], x) is None
