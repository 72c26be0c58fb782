"""The C kernels (cext/) against the Numba kernels, bit for bit, at every SIMD level this
CPU runs (the portable C path included). The Numba kernels are themselves checked bit for
bit against ggml's dot products in the per-format test files, so equality here means the C
kernels follow llama.cpp's numerics too."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from offload.kernels import ACTIVATION_CONVERTERS, C_FORMATS, FORMATS, KERNELS, NUMBA_KERNELS, cext, select_kernels
from offload.testing import ggml_quantize

pytestmark = pytest.mark.skipif(not cext.available(), reason="C extension not built")

CASES = [(t, level) for name, (_, levels) in sorted(cext.formats().items()) for t in [T[name]] for level in levels]


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


@pytest.fixture
def isa_level(request):
    yield
    cext.set_isa(None)


def realistic(t: T, n_rows: int, n_cols: int, seed: int) -> np.ndarray:
    """Weights with row scales over several orders of magnitude and some zero rows, quantized by ggml."""
    rng = np.random.default_rng(seed)
    values = (rng.standard_normal((n_rows, n_cols)) * np.exp(rng.uniform(-6, 3, size=(n_rows, 1)))).astype(np.float32)
    values[::7] = 0.0
    return ggml_quantize(values, t)


def random_bytes(t: T, n_rows: int, n_cols: int, seed: int) -> np.ndarray:
    """Every bit pattern, with the format's f16 scale fields set to finite values (edges first)."""
    rng = np.random.default_rng(seed)
    fmt = FORMATS[t]
    raw = rng.integers(0, 256, size=(n_rows, fmt.row_bytes(n_cols)), dtype=np.uint8)
    blocks = raw.view(fmt.layout)
    edge = np.array([0.0, -0.0, 1.0, -1.0, 65504.0, -65504.0, 2.0**-24, -(2.0**-20), 2.0**-14], dtype=np.float16)
    for name in fmt.layout.names:
        if fmt.layout[name] == np.dtype("<f2"):
            d = rng.standard_normal(blocks.shape).astype(np.float16)
            d.flat[: len(edge)] = edge[: d.size]
            blocks[name] = d
    return raw


def tokens(n_tokens: int, n_cols: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n_tokens, n_cols)) * np.exp(rng.uniform(-2, 2, size=(n_tokens, 1)))).astype(np.float32)


def both(t: T, raw: np.ndarray, x: np.ndarray, level: str) -> tuple[np.ndarray, np.ndarray]:
    act = ACTIVATION_CONVERTERS[FORMATS[t].vec_dot_type](x)
    want = np.full((x.shape[0], raw.shape[0]), np.nan, dtype=np.float32)
    got = want.copy()
    NUMBA_KERNELS[t](raw, act, want, False)
    cext.set_isa(level)
    cext.c_kernel(t.name)(raw, act, got, False)
    return got, want


def test_hot_formats_are_built():
    """The formats that carry most bytes in real files have C kernels, with SIMD on x86."""
    built = cext.formats()
    for name in ("Q8_0", "Q4_0"):
        assert name in built
        if cext.isa() in ("avx2", "avx512"):
            assert "avx2" in built[name][1]


@pytest.mark.parametrize("t,level", CASES, ids=lambda c: c.name if isinstance(c, T) else c)
@pytest.mark.parametrize("n_rows,n_cols,n_tokens", [(1, 256, 1), (37, 512, 1), (64, 2304, 3), (130, 1024, 9)])
def test_c_kernel_equals_numba_kernel(t, level, n_rows, n_cols, n_tokens, isa_level):
    raw = realistic(t, n_rows, n_cols, seed=n_cols + n_rows)
    got, want = both(t, raw, tokens(n_tokens, n_cols, seed=n_tokens), level)
    np.testing.assert_array_equal(bits(got), bits(want))


@pytest.mark.parametrize("t,level", CASES, ids=lambda c: c.name if isinstance(c, T) else c)
def test_c_kernel_equals_numba_kernel_on_random_bytes(t, level, isa_level):
    raw = random_bytes(t, 48, 768, seed=3)
    got, want = both(t, raw, tokens(4, 768, seed=4), level)
    np.testing.assert_array_equal(bits(got), bits(want))


@pytest.mark.parametrize("t", [T[name] for name in sorted(cext.formats())], ids=lambda t: t.name)
def test_c_kernel_reads_views_in_place(t):
    """Read-only views (memory-mapped GGUF tensors) and one expert's rows out of a 3-D tensor."""
    experts = realistic(t, 3 * 16, 512, seed=1).reshape(3, 16, -1)
    one = experts[1]
    one.flags.writeable = False
    x = tokens(2, 512, seed=2)
    act = ACTIVATION_CONVERTERS[FORMATS[t].vec_dot_type](x)
    got = np.empty((2, 16), dtype=np.float32)
    want = np.empty_like(got)
    cext.c_kernel(t.name)(one, act, got, False)
    NUMBA_KERNELS[t](np.ascontiguousarray(one), act, want, False)
    np.testing.assert_array_equal(bits(got), bits(want))


# Formats whose avx2 row dot has a many-tokens kernel (format_kernels.avx2_tokens: the row decoded
# once for the tokens, run_matmul's path from 2 tokens for the K-quants and Q8_0, 4 for the others).
TOKENS_KERNELS = ["Q4_K", "Q5_K", "Q6_K", "Q8_0", "IQ4_NL", "MXFP4"]


@pytest.mark.parametrize("name", [n for n in TOKENS_KERNELS if n in cext.formats()])
@pytest.mark.parametrize("n_rows,n_cols", [(1, 256), (5, 1024), (33, 2816), (3, 16640)])  # 16640: past every stack bound
def test_many_tokens_give_each_token_its_bits_alone(name, n_rows, n_cols, isa_level):
    """A matmul of 1..9 tokens gives every token exactly the float bits of that token alone (a
    matmul of one token: the row dot), at every SIMD level, through cext's matmul (the Python-side
    activations) and matmul_x (the C quantizer); on AVX2 the 2+ token calls run the format's
    many-tokens kernel, which must keep the row dot's integer lanes and float order per token."""
    t = T[name]
    convert = ACTIVATION_CONVERTERS[FORMATS[t].vec_dot_type]
    kernel = cext.c_kernel(name)
    for raw in (realistic(t, n_rows, n_cols, seed=n_cols + n_rows), random_bytes(t, n_rows, n_cols, seed=n_rows)):
        for level in cext.levels():
            cext.set_isa(level)
            for n_tokens in range(1, 10):
                x = tokens(n_tokens, n_cols, seed=100 * n_tokens + n_rows)
                x[n_tokens // 2, : n_cols // 3] = 0.0  # a token with zero blocks
                got = np.full((n_tokens, n_rows), np.nan, dtype=np.float32)
                kernel(raw, convert(x), got, False)
                got_x = np.full_like(got, np.nan)
                cext.matmul_x(x, n_tokens, ((name, raw, got_x, n_rows),))
                for k in range(n_tokens):
                    alone = np.full((1, n_rows), np.nan, dtype=np.float32)
                    kernel(raw, convert(x[k : k + 1]), alone, False)
                    alone_x = np.full_like(alone, np.nan)
                    cext.matmul_x(np.ascontiguousarray(x[k : k + 1]), 1, ((name, raw, alone_x, n_rows),))
                    msg = f"{name} {level} tokens={n_tokens} token {k}"
                    np.testing.assert_array_equal(bits(got[k]), bits(alone[0]), err_msg=msg)
                    np.testing.assert_array_equal(bits(got_x[k]), bits(alone_x[0]), err_msg=msg + " (matmul_x)")


def test_c_kernel_rejects_short_buffers():
    raw = realistic(T.Q8_0, 4, 64, seed=0)
    xq, xd = ACTIVATION_CONVERTERS["Q8_0"](tokens(1, 64, seed=0))
    out = np.empty((1, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="smaller"):
        cext._cext.matmul("Q8_0", raw[:3], xq, xd, None, out, 4, 64, 1)
    with pytest.raises(ValueError, match="no C kernel"):
        cext._cext.matmul("I8", raw, xq, xd, None, out, 4, 64, 1)
    with pytest.raises(ValueError, match="bad shape"):
        cext._cext.matmul("Q8_0", raw, xq, xd, None, out, 4, 48, 1)


def test_select_kernels():
    try:
        select_kernels("numba")
        assert not C_FORMATS and KERNELS == NUMBA_KERNELS
        select_kernels("c")
        assert {t.name for t in C_FORMATS} == set(cext.formats()) & {t.name for t in NUMBA_KERNELS}
        assert all(KERNELS[t] is not NUMBA_KERNELS[t] for t in C_FORMATS)
        with pytest.raises(ValueError, match="OFFLOAD_KERNELS"):
            select_kernels("fortran")
    finally:
        select_kernels()


# -- one C call per matmul group: activations quantized in C ------------------------------

@pytest.mark.parametrize("kind,n_cols", [("Q8_0", 288), ("Q8_K", 512)])
def test_c_quantize_equals_numba(kind, n_cols):
    """The C activation quantizers give the Numba ones' bits: every magnitude from subnormal to
    past the largest half, zero blocks, ties."""
    from offload.kernels import dispatch, numba_kernels as nk

    rng = np.random.default_rng(5)
    for trial in range(60):
        n = 1 + trial % 3
        x = (rng.standard_normal((n, n_cols)) * 10.0 ** rng.uniform(-40, 5)).astype(np.float32)
        x[:, : 32 * (trial % 2)] = 0.0
        x[0, 3] = [7e4, 1e-42, 0.5, -127.5, np.inf, -np.inf][trial % 6]  # inf: numba must not raise
        want = (nk.quantize_q8_0 if kind == "Q8_0" else nk.quantize_q8_k)(x)
        got = cext.quantize(kind, x, dispatch._ACT_LAYOUTS[kind](n, n_cols))
        for w, g in zip(want, got):
            np.testing.assert_array_equal(w.view(np.uint8), g.view(np.uint8))


GROUPS = [("Q8_0",), ("Q4_0", "Q4_0", "Q4_0"), ("Q4_K", "Q6_K"), ("Q8_0", "Q4_K", "Q6_K"), ("Q2_K", "Q3_K", "Q5_K"),
          ("MXFP4", "Q8_0"), ("Q5_0", "Q4_K")]


@pytest.mark.parametrize("group", GROUPS, ids="+".join)
@pytest.mark.parametrize("n_tokens", [1, 3, 9])
def test_one_call_equals_two_steps(group, n_tokens, monkeypatch):
    """matmuls() through cext.matmul_x (one call: quantize once per activation type, run every
    matrix) gives the bits of the two-step path (Numba quantizer, a kernel call per matrix)."""
    from offload.kernels import dispatch, numba_kernels as nk
    from offload.kernels.formats import QMatrix

    if not set(group) <= set(cext.formats()):
        pytest.skip("a format of the group has no C kernel here")
    n_cols = 512
    ws = [QMatrix.from_raw(T[name], realistic(T[name], 24 + 8 * i, n_cols, seed=i), 24 + 8 * i, n_cols)
          for i, name in enumerate(group)]
    x = tokens(n_tokens, n_cols, seed=7)
    calls = []
    real = cext.matmul_x
    monkeypatch.setattr(cext, "matmul_x", lambda *a: (calls.append(a), real(*a))[1])
    got = dispatch.matmuls(tuple(ws), x)
    one = [dispatch.matmul(w, x) for w in ws]
    tiled = [n_tokens >= dispatch.TILED_MIN_TOKENS and T[name] in dispatch.TILED_TYPES for name in group]
    # the group in one call unless a matrix goes to a tiled kernel, then each matrix alone that does not
    assert len(calls) == (0 if any(tiled) else 1) + tiled.count(False)
    monkeypatch.setattr(dispatch, "_ONE_CALL", False)
    monkeypatch.setitem(dispatch.ACTIVATION_CONVERTERS, "Q8_0", nk.quantize_q8_0)  # the C path takes C ones
    monkeypatch.setitem(dispatch.ACTIVATION_CONVERTERS, "Q8_K", nk.quantize_q8_k)
    want = dispatch.matmuls(tuple(ws), x)
    for g, o, w in zip(got, one, want):
        np.testing.assert_array_equal(bits(g), bits(w))
        np.testing.assert_array_equal(bits(o), bits(w))


def test_one_call_rejects_bad_buffers():
    raw = realistic(T.Q8_0, 4, 64, seed=0)
    x = tokens(1, 64, seed=0)
    out = np.empty((1, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="does not fit"):
        cext.matmul_x(x, 1, (("Q8_0", raw[:3], out, 4),))
    with pytest.raises(ValueError, match="does not fit"):
        cext.matmul_x(x, 1, (("Q8_0", raw, out[:, :3], 4),))
    with pytest.raises(ValueError, match="no C kernel"):
        cext.matmul_x(x, 1, (("I8", raw, out, 4),))
    with pytest.raises(ValueError, match="bad call"):
        cext.matmul_x(x, 1, ())


@pytest.mark.parametrize("level", cext.levels())
@pytest.mark.parametrize("n", [8, 131, 3584, 5])
def test_c_silu_mul_equals_numba(level, n, isa_level):
    """SwiGLU in C (8 lanes of ggml_v_expf, libm's expf for the tail) gives the Numba twin's
    bits at every SIMD level, on ggml_v_expf's edge paths too, and in place."""
    from offload.kernels import ggml_math

    rng = np.random.default_rng(n)
    x = (rng.standard_normal((4, n)) * np.array([[1e-3], [1.0], [10.0], [100.0]])).astype(np.float32)
    x[0, : min(n, 8)] = [0.0, -0.0, 88.0, -88.0, 100.0, -100.0, 1e-30, -1e-30][: min(n, 8)]
    g = rng.standard_normal((4, n)).astype(np.float32)
    want = np.empty_like(x)
    ggml_math._silu_mul_rows(x, g, want)
    cext.set_isa(level)
    got = np.empty_like(x)
    cext.silu_mul(x, g, got, 4, n)
    np.testing.assert_array_equal(bits(got), bits(want))
    cext.silu_mul(x, g, x, 4, n)  # in place, as the forward pass calls it
    np.testing.assert_array_equal(bits(x), bits(want))
    with pytest.raises(ValueError, match="smaller"):
        cext.silu_mul(x, g[:2], got, 4, n)

