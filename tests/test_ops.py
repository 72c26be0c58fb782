"""The C twins of the step's small ops and float matmuls (cext/ops.c, floats.c) against their
Numba versions, bit for bit, at every SIMD level this CPU runs: random rows with magnitudes
from subnormal to near overflow, negative zero, infinities where the op meets them, widths
that are not multiples of 8 (ggml's scalar tails). The Numba versions are held to numpy
references and to ggml elsewhere (test_kernels.py), so equality carries that over."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from offload import forward, predict
from offload.kernels import NUMBA_KERNELS, cext, ggml_math, select_kernels
from offload.kernels.formats import f32_to_bf16

pytestmark = pytest.mark.skipif(not cext.selected(), reason="C extension (with its ops) not built")

WIDTHS = [1, 5, 8, 13, 64, 131, 4096]


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


@pytest.fixture(params=cext.levels())
def level(request):
    cext.set_isa(request.param)
    yield request.param
    cext.set_isa(None)


def rows(n_rows: int, n: int, seed: int, lo: float = -30, hi: float = 30) -> np.ndarray:
    """Rows whose scales span 10**lo .. 10**hi, with zeros of both signs and a subnormal."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n_rows, n)) * 10.0 ** rng.uniform(lo, hi, size=(n_rows, 1))).astype(np.float32)
    flat = x.reshape(-1)
    flat[:: 11] = -0.0
    flat[5:: 13] = 0.0
    flat[3:: 17] = 1e-42
    return x


@pytest.mark.parametrize("n", WIDTHS)
def test_rms_norm(n, level):
    x = rows(7, n, seed=n)
    x[1] = 0.0  # a zero row
    w = rows(1, n, seed=n + 1, lo=-3, hi=3)[0]
    for eps in (1e-5, 1e-6):
        want = np.empty_like(x)
        ggml_math._rms_norm_rows(x, w, np.float32(eps), want)
        got = np.empty_like(x)
        cext.rms_norm(x, w, np.float32(eps), got, len(x), n)
        np.testing.assert_array_equal(bits(got), bits(want))


@pytest.mark.parametrize("n", WIDTHS + [60, 128])
def test_softmax(n, level):
    x = rows(9, n, seed=n, lo=-3, hi=2)
    x[0, n // 2:] = -np.inf  # attention's masked tail
    x[1] = 3.0  # ties
    x[2, 0] = 1e30  # exp(x - max) underflows for every other value
    x[3] *= np.float32(1e3)  # ggml_v_expf's |n| > 126 and > 192 paths
    want = np.empty_like(x)
    ggml_math._softmax_rows(x, want)
    got = np.empty_like(x)
    cext.softmax(x, got, len(x), n)
    np.testing.assert_array_equal(bits(got), bits(want))
    cext.softmax(x, x, len(x), n)  # in place
    np.testing.assert_array_equal(bits(x), bits(want))


@pytest.mark.parametrize("n", [1, 7, 8, 9, 1001])
def test_expf_and_silu(n, level):
    x = rows(3, n, seed=n, lo=-2, hi=2.5)
    edges = np.array([0.0, -0.0, 88.0, -88.0, 100.0, -100.0, 1e-30, -1e-30, 126.5, -126.5, 200, -200, np.inf, -np.inf],
                     dtype=np.float32)
    x.reshape(-1)[: min(x.size, len(edges))] = edges[: x.size]
    want = np.empty_like(x)
    ggml_math._expf(x.reshape(-1), want.reshape(-1))
    got = np.empty_like(x)
    cext.expf(x, got)
    np.testing.assert_array_equal(bits(got), bits(want))
    np.testing.assert_array_equal(bits(got), bits(ggml_math.expf_ref(x)))
    # silu: the chunks of 8 through ggml_v_expf, the rest through libm (numpy + Numba's exp)
    select_kernels("numba")
    try:
        with np.errstate(invalid="ignore"):  # -inf / inf
            want_silu = ggml_math.silu(x)
            want_sigmoid = ggml_math.sigmoid_as_silu_div(x)
    finally:
        select_kernels()
    got = np.empty_like(x)
    cext.silu(x, got, len(x), n)
    np.testing.assert_array_equal(bits(got), bits(want_silu))
    with np.errstate(invalid="ignore"):
        np.testing.assert_array_equal(bits(ggml_math.sigmoid_as_silu_div(x)), bits(want_sigmoid))


@pytest.mark.parametrize("style", ["normal", "neox"])
@pytest.mark.parametrize("head_dim,rope_dim", [(64, 64), (64, 48), (6, 2), (128, 128)])
def test_rope(style, head_dim, rope_dim, level):
    x = rows(5 * 3, head_dim, seed=head_dim + rope_dim, lo=-20, hi=20).reshape(5, 3, head_dim)
    rng = np.random.default_rng(rope_dim)
    cos, sin = np.cos(rng.uniform(0, 1e4, size=(2, 5, rope_dim // 2))).astype(np.float32)
    want, got = x.copy(), x.copy()
    ggml_math._rope(want, cos, sin, rope_dim, style == "neox")
    cext.rope(got, cos, sin, rope_dim, style == "neox")
    np.testing.assert_array_equal(bits(got), bits(want))
    np.testing.assert_array_equal(bits(got[..., rope_dim:]), bits(x[..., rope_dim:]))


@pytest.mark.parametrize("n,k", [(8, 2), (60, 4), (64, 8), (128, 8), (3, 3), (1, 1)])
def test_top_k(n, k):
    rng = np.random.default_rng(n * k)
    logits = rng.standard_normal((17, n)).astype(np.float32)
    logits[0] = 0.5  # every value tied: the lowest indices win
    logits[1, 1::2] = logits[1, ::2][: n // 2]  # pairs of ties
    probs = ggml_math.softmax_ref(logits)
    if n > 3:
        probs[2, :3] = -0.0  # signed zeros rank like +0 (normalized rows of only zeros would divide by 0)
    for normalize in (False, True):
        want_c, want_w = np.empty((17, k), np.int64), np.empty((17, k), np.float32)
        forward._top_k(probs, k, normalize, want_c, want_w)
        got_c, got_w = np.empty((17, k), np.int64), np.empty((17, k), np.float32)
        cext.top_k(probs, k, normalize, got_c, got_w)
        np.testing.assert_array_equal(got_c, want_c)
        np.testing.assert_array_equal(bits(got_w), bits(want_w))
    with pytest.raises(ValueError, match="top_k"):
        cext.top_k(probs, n + 1, False, np.empty((17, n + 1), np.int64), np.empty((17, n + 1), np.float32))


@pytest.mark.parametrize("n_targets,e,k,m", [(1, 8, 2, 1), (2, 60, 4, 2), (3, 64, 8, 4), (1, 4, 2, 0)])
def test_lookahead(n_targets, e, k, m):
    rng = np.random.default_rng(e + k)
    n_embd = 96
    w = (rng.standard_normal((n_embd, n_targets * e)) * 0.3).astype(np.float32)
    for trial in range(20):
        x = (rng.standard_normal(n_embd) * 10.0 ** rng.uniform(-3, 3)).astype(np.float32)
        if trial == 0:
            w_t = np.zeros_like(w)  # every probability tied
        else:
            w_t = w
        out = []
        for fn in (predict._lookahead_one, cext.lookahead):
            experts = np.full((n_targets, k + m), -7, np.int64)
            counts = np.empty(n_targets, np.int64)
            conf = np.empty(n_targets, np.float32)
            fn(x, w_t, 1e-6, n_targets, k, m, np.float32(0.5), experts, counts, conf)
            out.append((experts, counts, conf))
        (we, wc, wf), (ge, gc, gf) = out
        np.testing.assert_array_equal(gc, wc)
        for t in range(n_targets):
            np.testing.assert_array_equal(ge[t, : wc[t]], we[t, : wc[t]])
        np.testing.assert_array_equal(bits(gf), bits(wf))


def float_weights(t: T, n_rows: int, n_cols: int, seed: int) -> np.ndarray:
    """Rows of t over many magnitudes (subnormal halves, -0.0, the largest half)."""
    x = rows(n_rows, n_cols, seed, lo=-5, hi=4 if t == T.F16 else 30)
    if t == T.F32:
        return x.view(np.uint8)
    if t == T.F16:
        h = x.astype(np.float16)
        h.reshape(-1)[:4] = [65504.0, -65504.0, 2.0**-24, -0.0]
        return h.view(np.uint8)
    return f32_to_bf16(x).view(np.uint8)


@pytest.mark.parametrize("t", [T.F32, T.F16, T.BF16])
@pytest.mark.parametrize("n_rows,n_cols", [(8, 64), (12, 256), (6, 40), (5, 100), (4, 8), (300, 512)])
@pytest.mark.parametrize("n_tokens,vec_dot", [(1, False), (3, False), (3, True), (9, False)])
def test_float_matmul(t, n_rows, n_cols, n_tokens, vec_dot, level):
    """Every order (GEMM8 for batches when rows % 4 == 0 and n_cols % 8 == 0, else vec_dot) and
    tail (n_cols % 32) of ggml's float dots; activations rounded to the weight type first."""
    w = float_weights(t, n_rows, n_cols, seed=n_rows * n_cols + n_tokens)
    x = rows(n_tokens, n_cols, seed=n_cols, lo=-3, hi=3)
    from offload.kernels.dispatch import ACTIVATION_CONVERTERS

    act = ACTIVATION_CONVERTERS[t.name](x)
    want = np.full((n_tokens, n_rows), np.nan, np.float32)
    NUMBA_KERNELS[t](w, act, want, vec_dot)
    got = np.full((n_tokens, n_rows), np.nan, np.float32)
    cext.c_float_kernel(t.name)(w, act, got, vec_dot)
    np.testing.assert_array_equal(bits(got), bits(want))


def test_selection_follows_select_kernels():
    """OFFLOAD_KERNELS=numba (select_kernels("numba")) puts every op on Numba; "c" back on C."""
    from offload.kernels import KERNELS, kernels_in_use

    try:
        select_kernels("numba")
        assert not cext.selected() and KERNELS[T.F32] is NUMBA_KERNELS[T.F32]
        assert "C/" not in kernels_in_use()
    finally:
        select_kernels()
    assert cext.selected() and KERNELS[T.F32] is not NUMBA_KERNELS[T.F32]
    assert "F32" in kernels_in_use().split(";")[0]
