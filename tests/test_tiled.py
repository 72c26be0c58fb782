"""ggml's tiled K-quant order (kernels/tiled.py, cext/tiled.c): the uniform block decoding
against the format references, C against Numba bit for bit at every SIMD level, both
against the float64 reference, and the dispatch rule (8+ tokens). That the order is ggml's
own is checked end to end: tests/test_quant_mixes.py compares K-quant models with llama.cpp."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from offload.kernels import FORMATS, KERNELS, QMatrix, TILED_KERNELS, cext, matmul, matmul_ref
from offload.kernels.dispatch import _numba_tiled, convert_activations
from offload.kernels.iq_grid import IQ_GRID_TYPES
from offload.kernels.tiled import TILED_MIN_TOKENS, TILED_TYPES, decode_blocks

from test_cext import bits, random_bytes, realistic, tokens

TYPES = sorted(TILED_TYPES, key=lambda t: t.name)
LEVELS = cext.levels()


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_decoded_blocks_give_the_reference_values(t):
    fmt = FORMATS[t]
    raw = random_bytes(t, 8, 1024, seed=5)
    b = decode_blocks(fmt, raw)
    bound = 127 if t == T.IQ4_XS else 62 if t in IQ_GRID_TYPES else 32  # tiled.c's maddubs bound (IQ4_XS: its own kernel, iq4.c; grid I-quants after their bias: <= 126)
    assert b.q.dtype == np.int8 and np.abs(b.q.astype(int)).max() <= bound
    groups = b.q.reshape(*b.q.shape[:-1], 16, 16).astype(np.float64)
    values = b.d[..., None, None] * (b.sc[..., None] * groups) - b.dmin[..., None, None] * b.mn[..., None]
    np.testing.assert_allclose(values.reshape(8, -1), fmt.dequantize(raw), rtol=1e-6, atol=0)


@pytest.mark.skipif(not cext.available(), reason="C extension not built")
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("make", [realistic, random_bytes], ids=["quantized", "random-bytes"])
def test_c_tiled_equals_numba_tiled(t, level, make):
    raw = make(t, 37, 768, 11)
    act = convert_activations("Q8_K", tokens(21, 768, seed=2))
    want = np.full((21, 37), np.nan, dtype=np.float32)
    got = want.copy()
    _numba_tiled(t)(raw, act, want)
    try:
        cext.set_isa(level)
        cext.c_tiled_kernel(t.name)(raw, act, got)
    finally:
        cext.set_isa(None)
    np.testing.assert_array_equal(bits(got), bits(want))


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_tiled_is_close_to_the_exact_product(t):
    w = QMatrix(FORMATS[t], 24, 512, realistic(t, 24, 512, 3))
    x = tokens(12, 512, seed=4)
    out = np.empty((12, 24), dtype=np.float32)
    _numba_tiled(t)(w.data, convert_activations("Q8_K", x), out)
    ref = matmul_ref(w, x)
    assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max()


@pytest.mark.parametrize("t", [T.Q4_K, T.Q6_K], ids=lambda t: t.name)
def test_matmul_takes_the_tiled_order_from_8_tokens(t):
    w = QMatrix(FORMATS[t], 40, 512, realistic(t, 40, 512, 6))
    x = tokens(TILED_MIN_TOKENS, 512, seed=7)
    for n, kernels in ((TILED_MIN_TOKENS - 1, KERNELS), (TILED_MIN_TOKENS, TILED_KERNELS)):
        want = np.empty((n, 40), dtype=np.float32)
        kernels[t](w.data, convert_activations("Q8_K", x[:n]), want, False)
        np.testing.assert_array_equal(bits(matmul(w, x[:n])), bits(want))
    # and the two orders do differ somewhere, or this test would prove nothing
    vec_dot = np.empty((TILED_MIN_TOKENS, 40), dtype=np.float32)
    KERNELS[t](w.data, convert_activations("Q8_K", x), vec_dot, False)
    assert not np.array_equal(bits(vec_dot), bits(matmul(w, x)))
