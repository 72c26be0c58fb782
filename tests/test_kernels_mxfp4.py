"""MXFP4 weights: the block layout and dequantization against gguf-py and ggml, the kernel
bit for bit against ggml's own ggml_vec_dot_mxfp4_q8_0 and against a float64 reference,
and a whole MXFP4_MOE model (llama.cpp's quantizer) against llama.cpp's logits."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T
from gguf import quants as gq

from offload.kernels import select_kernels
from offload.kernels.formats import activation_ref
from offload.kernels.mxfp4 import E8M0_HALF, KVALUES, MXFP4Format, e8m0_to_fp32_half, matmul_mxfp4
from offload.kernels.numba_kernels import quantize_q8_0
from offload.testing import llama_cpp_is_avx512_build, _ggml_lib, ggml_quantize

FMT = MXFP4Format()
Q8_0_BLOCK = np.dtype([("d", "<f2"), ("qs", "i1", 32)])
EDGE_EXPONENTS = [0, 1, 2, 3, 100, 126, 127, 128, 129, 200, 252, 253, 254, 255]


def bits(a: np.ndarray) -> np.ndarray:
    """float32 bit patterns, so that comparisons see -0.0 and rounding exactly."""
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def assert_same(ours: np.ndarray, theirs: np.ndarray) -> None:
    """Bit for bit, except that any NaN equals any NaN (overflowing scales meet inf - inf)."""
    ours, theirs = np.asarray(ours, dtype=np.float32), np.asarray(theirs, dtype=np.float32)
    both_nan = np.isnan(ours) & np.isnan(theirs)
    np.testing.assert_array_equal(np.where(both_nan, 0, bits(ours)), np.where(both_nan, 0, bits(theirs)))


def random_weights(rng: np.random.Generator, n_rows: int, n_cols: int) -> np.ndarray:
    """Gaussian weights with row scales over a few orders of magnitude, some all-zero rows."""
    scale = np.exp(rng.uniform(-6, 3, size=(n_rows, 1)))
    values = (rng.standard_normal((n_rows, n_cols)) * scale).astype(np.float32)
    values[::7] = 0.0
    return values


def random_raw(rng: np.random.Generator, n_rows: int, n_blocks: int, e_range: tuple[int, int] = (0, 256)) -> np.ndarray:
    """Random MXFP4 bytes: every code, exponents drawn from e_range, the edge exponents first."""
    raw = rng.integers(0, 256, size=(n_rows, n_blocks * FMT.type_size), dtype=np.uint8)
    e = rng.integers(*e_range, size=n_rows * n_blocks).astype(np.uint8)
    edge = [x for x in EDGE_EXPONENTS if e_range[0] <= x < e_range[1]]
    e[: len(edge)] = edge[: len(e)]
    raw.view(FMT.layout)["e"] = e.reshape(n_rows, n_blocks)
    return raw


def make_tokens(n_tokens: int, n_cols: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n_tokens, n_cols)) * np.exp(rng.uniform(-2, 2, size=(n_tokens, 1)))).astype(np.float32)


def run_kernel(raw: np.ndarray, x: np.ndarray) -> np.ndarray:
    out = np.full((x.shape[0], raw.shape[0]), np.nan, dtype=np.float32)
    matmul_mxfp4(raw, quantize_q8_0(x), out)
    return out


# -- layout, scales and dequantization -----------------------------------------------------------

def test_layout_matches_ggml():
    assert (FMT.name, FMT.ggml_type, FMT.vec_dot_type) == ("MXFP4", T.MXFP4, "Q8_0")
    assert (FMT.block_size, FMT.type_size) == GGML_QUANT_SIZES[T.MXFP4] == (32, 17)
    assert {name: FMT.layout.fields[name][1] for name in FMT.layout.names} == {"e": 0, "qs": 1}
    assert KVALUES.tolist() == list(gq.MXFP4.kvalues)


def test_e8m0_half_scales():
    """2**(e - 128): subnormal for e = 0, 1; e = 255 (E8M0's NaN code) is 2**127 in ggml, no NaN."""
    e = np.arange(256)
    ours = e8m0_to_fp32_half(e)
    assert ours.dtype == np.float32 and not np.isnan(ours).any() and np.isfinite(ours).all()
    np.testing.assert_array_equal(bits(ours), bits(np.ldexp(1.0, e - 128)))
    np.testing.assert_array_equal(bits(ours), bits(gq.MXFP4.e8m0_to_fp32_half(e.astype(np.uint8))))
    assert bits(ours[[0, 1, 2, 127, 128, 255]]).tolist() == [0x00200000, 0x00400000, 0x00800000,
                                                             0x3F000000, 0x3F800000, 0x7F000000]
    np.testing.assert_array_equal(bits(E8M0_HALF), bits(ours))


def test_e8m0_table_matches_ggml():
    """The table ggml's CPU backend reads its scales from (filled by ggml_cpu_init)."""
    lib = _ggml_cpu()
    table = np.ctypeslib.as_array((ctypes.c_float * 256).in_dll(lib, "ggml_table_f32_e8m0_half"))
    np.testing.assert_array_equal(bits(table), bits(E8M0_HALF))


def test_dequantize_matches_gguf_on_real_blocks():
    rng = np.random.default_rng(1)
    values = random_weights(rng, 24, 512)
    values[3, :32] = 0.0  # an all-zero block next to normal ones
    values[5] *= 1e-38  # scales near and below float32's normal range
    values[6] = -np.abs(values[6])
    values[8] *= 1e30
    raw = ggml_quantize(values, T.MXFP4)
    ours = FMT.dequantize(raw)
    assert ours.dtype == np.float32 and ours.shape == values.shape
    np.testing.assert_array_equal(bits(ours), bits(gq.dequantize(raw, T.MXFP4)))
    assert not ours[0].any() and not ours[3, :32].any()
    # the quantizer did its job: E2M1 under a power-of-two scale is within a quarter of the row's max
    normal = np.arange(len(values)) != 5
    err = np.abs(ours - values)[normal]
    assert np.all(err <= 0.25 * np.abs(values[normal]).max(axis=1, keepdims=True))


def test_dequantize_matches_gguf_and_ggml_on_random_bytes():
    raw = random_raw(np.random.default_rng(2), 8, 6)
    with np.errstate(over="ignore"):
        ours = FMT.dequantize(raw)
        theirs = gq.dequantize(raw, T.MXFP4)
    np.testing.assert_array_equal(bits(ours), bits(theirs))
    np.testing.assert_array_equal(bits(ours), bits(ggml_dequantize(raw)))
    # no NaN for any exponent; inf exactly where |value| * 2**(e - 128) passes float32's max
    assert not np.isnan(ours).any()
    e = np.repeat(raw.view(FMT.layout)["e"], 32, axis=-1).astype(np.int64)
    qs = raw.view(FMT.layout)["qs"]
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(8, -1)
    exact = np.ldexp(KVALUES[codes].astype(np.float64), e - 128)
    np.testing.assert_array_equal(np.isinf(ours), np.abs(exact) > np.finfo(np.float32).max)
    assert np.isinf(ours).any() and (e[np.isinf(ours)] >= 253).all()
    finite = ~np.isinf(ours)
    np.testing.assert_array_equal(ours[finite], exact[finite])  # every value is exact
    stacked = FMT.dequantize(raw[:, : 2 * 17].reshape(2, 4, -1))  # leading dims are kept
    np.testing.assert_array_equal(bits(stacked.reshape(8, -1)), bits(ours[:, :64]))


def test_dequantize_value_order():
    """One block written by hand from ggml's dequantize_row_mxfp4 loop."""
    raw = random_raw(np.random.default_rng(3), 1, 1, e_range=(100, 150))[0]
    raw[0] = 130
    want = np.zeros(32, dtype=np.float32)
    d = np.float32(4.0)  # 2**(130 - 128)
    for j in range(16):
        want[j] = np.float32(KVALUES[raw[1 + j] & 0xF]) * d
        want[j + 16] = np.float32(KVALUES[raw[1 + j] >> 4]) * d
    np.testing.assert_array_equal(bits(FMT.dequantize(raw[None])[0]), bits(want))


# -- bit-exact against ggml_vec_dot_mxfp4_q8_0 -------------------------------------------------

_LIB = None


def _ggml_cpu():
    global _LIB
    if llama_cpp_is_avx512_build():
        pytest.skip("llama.cpp was built for AVX-512 here; offload follows its AVX2 build (install it as the README says)")
    if _LIB is None:
        lib = _ggml_lib("ggml-cpu")
        lib.ggml_vec_dot_mxfp4_q8_0.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p,
                                                ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        lib.ggml_cpu_init()  # fills ggml's f16 and e8m0 -> f32 tables, which the dot product reads
        _LIB = lib
    return _LIB


def ggml_dequantize(raw: np.ndarray) -> np.ndarray:
    lib = _ggml_lib("ggml-base")
    lib.dequantize_row_mxfp4.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    raw = np.ascontiguousarray(raw)
    out = np.zeros((raw.shape[0], raw.shape[1] // 17 * 32), dtype=np.float32)
    lib.dequantize_row_mxfp4(raw.ctypes.data, out.ctypes.data, out.size)
    return out


def ggml_matmul(lib, raw: np.ndarray, x: np.ndarray) -> np.ndarray:
    """ggml's vec_dot for every (token, row), on the same Q8_0 activations the kernel gets."""
    qs, d = quantize_q8_0(x)
    n_tokens, n_cols = x.shape
    out = np.zeros((n_tokens, raw.shape[0]), dtype=np.float32)
    s = np.zeros(1, dtype=np.float32)
    for t in range(n_tokens):
        y = np.zeros(n_cols // 32, dtype=Q8_0_BLOCK)
        y["d"], y["qs"] = d[t], qs[t].reshape(-1, 32)
        for r in range(raw.shape[0]):
            row = np.ascontiguousarray(raw[r])
            lib.ggml_vec_dot_mxfp4_q8_0(n_cols, s.ctypes.data, 0, row.ctypes.data, 0, y.ctypes.data, 0, 1)
            out[t, r] = s[0]
    return out


# block counts 1, 2, 3 (pairs and ggml's scalar tail), 90 (gpt-oss's 2880), 128
@pytest.mark.parametrize("n_cols", [32, 64, 96, 2880, 4096])
@pytest.mark.parametrize("n_tokens", [1, 5])
def test_kernel_is_bit_exact_with_ggml(n_cols, n_tokens):
    lib = _ggml_cpu()
    raw = ggml_quantize(random_weights(np.random.default_rng(n_cols), 32, n_cols), T.MXFP4)
    x = make_tokens(n_tokens, n_cols, seed=n_tokens)
    np.testing.assert_array_equal(bits(run_kernel(raw, x)), bits(ggml_matmul(lib, raw, x)))


@pytest.mark.parametrize("n_blocks", [5, 24])
def test_kernel_is_bit_exact_with_ggml_on_random_bytes(n_blocks):
    """Every code and scale: the edge exponents first, then everywhere; scales that overflow
    give inf (or NaN from inf - inf) in ggml and here alike."""
    lib = _ggml_cpu()
    rng = np.random.default_rng(5)
    x = make_tokens(4, 32 * n_blocks, seed=6)
    x[1, :32] = 0.0  # a zero activation block (d_x = 0)
    for e_range in ((0, 256), (80, 180)):
        raw = random_raw(rng, 24, n_blocks, e_range)
        ours, theirs = run_kernel(raw, x), ggml_matmul(lib, raw, x)
        assert_same(ours, theirs)
        if e_range == (80, 180):
            assert np.isfinite(theirs).all()
            np.testing.assert_array_equal(bits(ours), bits(theirs))


def rounding_tail_case(n_rows: int = 64, n_blocks: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Weights and activations whose odd last block's product float(sumi) * s rounds: sumi
    takes ~15 significant bits (large codes, activations near their block max) and d_x a
    full fp16 mantissa. (With ordinary data that product is exact, so fused or not would
    give the same bits and a test could not tell.)"""
    rng = np.random.default_rng(12)
    raw = random_raw(rng, n_rows, n_blocks, e_range=(120, 135))
    codes = rng.choice(np.array([1, 3, 5, 7], dtype=np.uint8), size=(n_rows, n_blocks, 32))
    raw.view(FMT.layout)["qs"] = codes[..., :16] | (codes[..., 16:] << 4)
    x = (rng.uniform(0.9, 1.0, size=(6, 32 * n_blocks)) * rng.uniform(0.5, 3, size=(6, 1))).astype(np.float32)
    return raw, x


def tail_orders(raw: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For an odd block count: the result with the last block added unfused (ggml's
    sum + float(sumi) * s, two roundings) and fused (one rounding). The sum of the other
    blocks, an even count, is the kernel's own result on them."""
    head = run_kernel(np.ascontiguousarray(raw[:, :-FMT.type_size]), np.ascontiguousarray(x[:, :-32]))
    blocks = raw.view(FMT.layout)
    codes = np.concatenate([blocks["qs"][:, -1] & 0x0F, blocks["qs"][:, -1] >> 4], axis=-1)
    qs, d = quantize_q8_0(x)
    sumi = (KVALUES[codes].astype(np.int64)[None] * qs[:, None, -32:]).sum(-1)
    s = d[:, -1:] * E8M0_HALF[blocks["e"][:, -1]][None]  # float32, as ggml
    unfused = head + (sumi.astype(np.float32) * s)
    fused = (head.astype(np.float64) + sumi * s.astype(np.float64)).astype(np.float32)
    return unfused, fused


def test_kernel_tail_block_is_fused_as_in_ggml():
    """An odd last block is added as fma(float(sumi), s, sum): ggml's scalar `sumf += d * sumi`,
    which GCC contracts into one FMA in the AVX2 build (-mfma)."""
    lib = _ggml_cpu()
    raw, x = rounding_tail_case()
    ours, theirs = run_kernel(raw, x), ggml_matmul(lib, raw, x)
    np.testing.assert_array_equal(bits(ours), bits(theirs))
    unfused, fused = tail_orders(raw, x)
    np.testing.assert_array_equal(bits(ours), bits(fused))
    assert (bits(fused) != bits(unfused)).any()  # the case tells the two apart


# -- against a float64 reference ---------------------------------------------------------------

@pytest.mark.parametrize("n_rows,n_cols,n_tokens", [(1, 32, 1), (40, 1024, 3), (17, 2880, 8), (9, 96, 2)])
def test_kernel_matches_float64_reference(n_rows, n_cols, n_tokens):
    raw = ggml_quantize(random_weights(np.random.default_rng(7 + n_rows), n_rows, n_cols), T.MXFP4)
    x = make_tokens(n_tokens, n_cols, seed=8 + n_tokens)
    w = FMT.dequantize(raw).astype(np.float64)
    a = activation_ref("Q8_0", x).astype(np.float64)
    ref = a @ w.T
    magnitude = np.abs(a) @ np.abs(w).T
    got = run_kernel(raw, x)
    assert got.dtype == np.float32 and got.shape == (n_tokens, n_rows)
    assert np.all(np.abs(got - ref) <= 1e-6 * magnitude + 1e-30)


def test_kernel_reads_read_only_views():
    """Memory-mapped GGUF tensors are read-only: same result, no copy needed."""
    raw = ggml_quantize(random_weights(np.random.default_rng(9), 6, 512), T.MXFP4)
    view = raw.view()
    view.flags.writeable = False
    x = make_tokens(2, 512, seed=10)
    np.testing.assert_array_equal(bits(run_kernel(view, x)), bits(run_kernel(raw, x)))


# -- the C kernels on odd block counts (tests/test_cext.py checks even ones) -------------------------

@pytest.mark.parametrize("n_cols", [32, 96, 224, 2848])
def test_c_kernel_equals_numba_kernel_on_odd_block_counts(n_cols):
    from offload.kernels import cext

    if "MXFP4" not in cext.formats():
        pytest.skip("C extension not built")
    cases = [(ggml_quantize(random_weights(np.random.default_rng(n_cols), 20, n_cols), T.MXFP4),
              make_tokens(3, n_cols, seed=11)), rounding_tail_case(n_blocks=n_cols // 32)]
    if n_cols > 32:  # (one block: the sum starts at 0, fused or not is the same)
        unfused, fused = tail_orders(*cases[1])
        assert (bits(fused) != bits(unfused)).any()
    try:
        for raw, x in cases:
            want = run_kernel(raw, x)
            for level in cext.levels():
                cext.set_isa(level)
                got = np.full_like(want, np.nan)
                cext.c_kernel("MXFP4")(raw, quantize_q8_0(x), got, False)
                np.testing.assert_array_equal(bits(got), bits(want), err_msg=level)
    finally:
        cext.set_isa(None)


# -- the C kernel on several tokens at once (a row decoded once, run against 4 tokens) -------------

def c_matmul(raw: np.ndarray, x: np.ndarray, one_token_at_a_time: bool = False) -> np.ndarray:
    """The C kernel at the current level; with one_token_at_a_time, one call per token (the
    row dot), else one call for all of them (from 4 tokens, the multi-token path at AVX2)."""
    from offload.kernels import cext

    act = quantize_q8_0(x)
    out = np.full((x.shape[0], raw.shape[0]), np.nan, dtype=np.float32)
    if not one_token_at_a_time:
        cext.c_kernel("MXFP4")(raw, act, out, False)
        return out
    for t in range(x.shape[0]):
        row = np.full((1, raw.shape[0]), np.nan, dtype=np.float32)
        cext.c_kernel("MXFP4")(raw, (act[0][t : t + 1], act[1][t : t + 1]), row, False)
        out[t] = row[0]
    return out


def _c_levels() -> list[str]:
    from offload.kernels import cext

    if "MXFP4" not in cext.formats():
        pytest.skip("C extension not built")
    return cext.levels()


# block counts: 1, 2, 3, 5, 89, 90 (gpt-oss's 2880), 128; 513 is past the multi-token
# path's stack buffer (the row dot serves it); token counts around the tile of 4
@pytest.mark.parametrize("n_cols", [32, 64, 96, 160, 2848, 2880, 4096, 16416])
@pytest.mark.parametrize("n_tokens", [4, 7, 9, 32])
def test_c_multi_token_path_equals_row_dot(n_cols, n_tokens):
    from offload.kernels import cext

    levels = _c_levels()
    raw = ggml_quantize(random_weights(np.random.default_rng(n_cols + 1), 11, n_cols), T.MXFP4)
    x = make_tokens(n_tokens, n_cols, seed=n_tokens + 3)
    x[1, :32] = 0.0  # a zero activation block
    try:
        for level in levels:
            cext.set_isa(level)
            np.testing.assert_array_equal(bits(c_matmul(raw, x)), bits(c_matmul(raw, x, one_token_at_a_time=True)),
                                          err_msg=level)
    finally:
        cext.set_isa(None)


@pytest.mark.parametrize("n_cols", [32, 96, 2880])
def test_c_multi_token_path_is_bit_exact_with_ggml(n_cols):
    from offload.kernels import cext

    lib = _ggml_cpu()
    levels = _c_levels()
    rng = np.random.default_rng(n_cols)
    raw = ggml_quantize(random_weights(rng, 16, n_cols), T.MXFP4)
    x = make_tokens(9, n_cols, seed=4)
    cases = [(raw, x, True), (random_raw(rng, 16, n_cols // 32), x, False), (random_raw(rng, 16, n_cols // 32, (80, 180)), x, True)]
    if n_cols > 32:
        cases.append((*rounding_tail_case(n_rows=16, n_blocks=n_cols // 32), True))
    try:
        for raw, x, finite in cases:
            theirs = ggml_matmul(lib, raw, x)
            for level in levels:
                cext.set_isa(level)
                ours = c_matmul(raw, x)
                if finite:
                    np.testing.assert_array_equal(bits(ours), bits(theirs), err_msg=level)
                else:  # overflowing scales: inf, or NaN from inf - inf, in both
                    assert_same(ours, theirs)
    finally:
        cext.set_isa(None)


# -- a whole model, quantized by llama.cpp ----------------------------------------------------------

PROMPT = "The old lighthouse keeper climbed the stairs every evening, counting each of the 117 steps twice."


@pytest.fixture(scope="module")
def mxfp4_moe(model_factory, tmp_path_factory):
    """MXFP4_MOE: the expert tensors MXFP4, the other matrices Q8_0 (llama-quantize's rule).
    n_ff = 224 gives ffn_down rows of 7 blocks, so ggml's odd-block tail runs too."""
    from offload.testing import TinyConfig, quantize_model

    shape = TinyConfig(n_layer=2, n_embd=256, n_head=4, n_head_kv=2, n_ff=224, n_expert=8, n_expert_used=2)
    src = model_factory(shape, "F16", 3)
    return quantize_model(src, tmp_path_factory.mktemp("mxfp4") / "MXFP4_MOE.gguf", "MXFP4_MOE")


@pytest.mark.parametrize("kernels", ["c", "numba"])
def test_mxfp4_moe_logits_match_llama_cpp(mxfp4_moe, kernels):
    from offload import Model
    from offload.gguf_file import GGUFFile
    from offload.testing import llama_cpp_logits

    types = {name: t.type_name for name, t in GGUFFile(mxfp4_moe).tensors.items()}
    assert {t for n, t in types.items() if "_exps" in n} == {"MXFP4"}
    select_kernels(kernels)
    try:
        with Model.load(mxfp4_moe, n_ctx=128) as m:
            ids = m.tokenize(PROMPT)
            ours = m.logits(ids)
    finally:
        select_kernels()
    ref = llama_cpp_logits(mxfp4_moe, ids, n_ctx=128)
    err = float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))
    assert err == 0.0, f"MXFP4_MOE ({', '.join(sorted(set(types.values())))}): relative L2 error {err:.2e}"
    np.testing.assert_array_equal(bits(ours), bits(ref))
