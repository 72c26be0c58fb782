"""Attention kernels (C at each SIMD level, Numba) against the numpy reference, bit for bit.
The reference follows llama.cpp's attention op by op over padded copies; tests/test_oracle.py
checks whole models against llama.cpp itself."""

from __future__ import annotations

import numpy as np
import pytest

from offload.kernels import cext
from offload.kernels.attention import attention, attention_numba, attention_ref

SHAPES = [(4, 2, 16), (8, 2, 32), (4, 4, 64), (3, 3, 32), (4, 2, 48), (8, 2, 128), (4, 4, 20), (6, 2, 36)]
STEPS = [(0, 1), (0, 27), (5, 1), (40, 3), (100, 1), (3, 40)]  # (start, new tokens)


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


@pytest.mark.parametrize("impl", ["numba"] + [f"c/{level}" for level in cext.levels()])
@pytest.mark.parametrize("n_head,n_head_kv,head_dim", SHAPES)
def test_attention_matches_reference(impl, n_head, n_head_kv, head_dim):
    rng = np.random.default_rng(n_head * 100 + head_dim)
    kv_dim = n_head_kv * head_dim
    try:
        for start, n in STEPS:
            k = (rng.standard_normal((160, kv_dim)) * 3).astype(np.float32)
            v = rng.standard_normal((160, kv_dim)).astype(np.float32)
            q = (rng.standard_normal((n, n_head * head_dim)) * 3).astype(np.float32)
            want = attention_ref(q, k, v, start, n_head, n_head_kv, head_dim)
            if impl == "numba":
                got = attention_numba(q, k, v, start, n_head, n_head_kv, head_dim)
            else:
                cext.set_isa(impl.split("/")[1])
                got = attention(q, k, v, start, n_head, n_head_kv, head_dim)
            np.testing.assert_array_equal(bits(got), bits(want), err_msg=f"start={start} n={n}")
    finally:
        if cext.available():
            cext.set_isa(None)


def test_attention_ignores_cache_rows_past_the_end():
    """Rows after start + n (stale keys and values of an earlier, longer generation) weigh nothing."""
    rng = np.random.default_rng(1)
    k = rng.standard_normal((64, 64)).astype(np.float32)
    v = rng.standard_normal((64, 64)).astype(np.float32)
    q = rng.standard_normal((2, 128)).astype(np.float32)
    before = attention(q, k, v, 10, 4, 2, 32)
    k[12:], v[12:] = 1e30, np.nan
    np.testing.assert_array_equal(bits(attention(q, k, v, 10, 4, 2, 32)), bits(before))
    np.testing.assert_array_equal(bits(attention_numba(q, k, v, 10, 4, 2, 32)), bits(before))
