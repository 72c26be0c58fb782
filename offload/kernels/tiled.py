"""K-quant matmuls of 8 or more tokens, in the order of llama.cpp's tiled GEMM.

ggml-cpu computes a matmul with Q2_K..Q6_K (or IQ4_XS) weights whose right side has at least 8 rows
(a prompt's tokens, or the tokens one expert gets in mul_mat_id) through its "tiled" path
(ggml-cpu/tiled/), not through vec_dot. Per output (row r, token t) and super-block b, with
exact integers

    s1 = sum over sub-blocks s of scale[s] * (q . q8 over s)     (q signed, as dequantized)
    s2 = sum over sub-blocks s of min[s] * (sum of q8 over s)    (Q2_K, Q4_K, Q5_K)

its float steps (x86 AVX2 build, FMA) are

    res = w.d * float(s1);   res = fma(-w.dmin, float(s2), res)   (formats with mins)
    acc = fma(res, x.d, acc)                                       (blocks in order from 0)

so the sum rounds once per super-block instead of in eight lanes: results differ from
vec_dot's in the last bits, and an MoE router amplifies that (Q4_K_M logits 5e-2 apart
before this path existed). `decode_blocks` turns any of these formats into one layout
(signed int8 quants, a scale and a min per 16 values, d and dmin): the C kernel
(cext/tiled.c) does the same per row tile; here a whole matrix is decoded with numpy and
one Numba kernel serves every format.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import numpy as np
from gguf import GGMLQuantizationType

from . import iq_grid
from .formats import QK_K
from .jit import njit, prange
from .numba_intrinsics import fma32
from .q2_k_q3_k import _low_bits, _q3_k_scales
from .iq4 import KVALUES as IQ4_KVALUES, iq4_xs_scales
from .q4_k_q5_k import _nibbles, scale_min_k4

# llama.cpp takes the tiled path from this many rows of activations on (ggml_tiled_min_batch).
TILED_MIN_TOKENS = 8


class DecodedBlocks(NamedTuple):
    q: np.ndarray  # int8 (..., 256): the quant of every value, signed as it enters the value
    sc: np.ndarray  # int16 (..., 16): scale of each 16 values
    mn: np.ndarray  # int16 (..., 16): min of each 16 values (0 without mins)
    d: np.ndarray  # float32 (...,)
    dmin: np.ndarray  # float32 (...,)


def _repeat2(x: np.ndarray) -> np.ndarray:
    """Per-32 values (..., 8) -> per-16 values (..., 16)."""
    return np.repeat(x.astype(np.int16), 2, axis=-1)


def _decode_q4_k(b: np.ndarray) -> DecodedBlocks:
    sc, mn = scale_min_k4(b["scales"])
    q = _nibbles(b["qs"]).reshape(*b.shape, QK_K).astype(np.int8)
    return DecodedBlocks(q, _repeat2(sc), _repeat2(mn), b["d"].astype(np.float32), b["dmin"].astype(np.float32))


def _decode_q5_k(b: np.ndarray) -> DecodedBlocks:
    sc, mn = scale_min_k4(b["scales"])
    qh = (b["qh"][..., None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & np.uint8(1)  # (..., 8, 32)
    q = (_nibbles(b["qs"]) | (qh << np.uint8(4))).reshape(*b.shape, QK_K).astype(np.int8)
    return DecodedBlocks(q, _repeat2(sc), _repeat2(mn), b["d"].astype(np.float32), b["dmin"].astype(np.float32))


def _decode_q6_k(b: np.ndarray) -> DecodedBlocks:
    ql = b["ql"].reshape(*b.shape, 2, 64)
    low4 = np.concatenate([ql & 0x0F, ql >> 4], axis=-1)  # (..., 2, 128)
    qh = b["qh"].reshape(*b.shape, 2, 1, 32)
    high2 = ((qh >> np.array([0, 2, 4, 6], dtype=np.uint8)[:, None]) & 0x03).reshape(*b.shape, 2, 128)
    q = ((low4 | (high2 << 4)).astype(np.int8) - np.int8(32)).reshape(*b.shape, QK_K)
    zeros = np.zeros((*b.shape, 16), np.int16)
    return DecodedBlocks(q, b["scales"].astype(np.int16), zeros, b["d"].astype(np.float32), np.zeros(b.shape, np.float32))


def _decode_q3_k(b: np.ndarray) -> DecodedBlocks:
    low = _low_bits(b["qs"]).astype(np.int8)
    high = ((b["hmask"][..., None, :] >> np.arange(8, dtype=np.uint8).reshape(8, 1)) & np.uint8(1)).reshape(*b.shape, QK_K)
    q = low - ((high ^ np.uint8(1)) << 2).astype(np.int8)
    zeros = np.zeros((*b.shape, 16), np.int16)
    return DecodedBlocks(q, _q3_k_scales(b["scales"]).astype(np.int16), zeros, b["d"].astype(np.float32),
                         np.zeros(b.shape, np.float32))


def _decode_q2_k(b: np.ndarray) -> DecodedBlocks:
    q = _low_bits(b["qs"]).astype(np.int8)
    return DecodedBlocks(q, (b["scales"] & 0x0F).astype(np.int16), (b["scales"] >> 4).astype(np.int16),
                         b["d"].astype(np.float32), b["dmin"].astype(np.float32))


def _decode_iq4_xs(b: np.ndarray) -> DecodedBlocks:
    """IQ4_XS (tiled.cpp's unpack: the table's values, ls - 32 per 32 values, no min)."""
    codes = np.concatenate([b["qs"].reshape(*b.shape, 8, 16) & 0x0F, b["qs"].reshape(*b.shape, 8, 16) >> 4], axis=-1)
    zeros = np.zeros((*b.shape, 16), np.int16)
    return DecodedBlocks(IQ4_KVALUES[codes].reshape(*b.shape, QK_K), _repeat2(iq4_xs_scales(b)), zeros,
                         b["d"].astype(np.float32), np.zeros(b.shape, np.float32))


_DECODERS = {
    GGMLQuantizationType.Q2_K: _decode_q2_k,
    GGMLQuantizationType.Q3_K: _decode_q3_k,
    GGMLQuantizationType.Q4_K: _decode_q4_k,
    GGMLQuantizationType.Q5_K: _decode_q5_k,
    GGMLQuantizationType.Q6_K: _decode_q6_k,
    GGMLQuantizationType.IQ4_XS: _decode_iq4_xs,
}


def _decode_iq(fmt, b: np.ndarray) -> DecodedBlocks:
    q, sc, d = iq_grid.tiled_blocks(fmt, b)
    return DecodedBlocks(q, sc, np.zeros_like(sc), d, np.zeros(b.shape, np.float32))


for _fmt in iq_grid.FORMATS:  # the grid I-quants (IQ2_XXS .. IQ1_M) take the tiled path too
    _DECODERS[_fmt.ggml_type] = partial(_decode_iq, _fmt)
TILED_TYPES = frozenset(_DECODERS)
HAS_MIN = {GGMLQuantizationType.Q2_K, GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q5_K}


def decode_blocks(fmt, raw: np.ndarray) -> DecodedBlocks:
    """Rows of `fmt` blocks (uint8 (..., row_bytes)) in the uniform layout, one entry per block:
    value e of a block = d * sc[e // 16] * q[e] - dmin * mn[e // 16]."""
    return _DECODERS[fmt.ggml_type](raw.view(fmt.layout))


@njit(parallel=True, cache=True, nogil=True)
def _matmul_tiled(q, sc, mn, d, dmin, has_min, xq, xd, xbs, out):
    n_rows, nb = d.shape
    n_tokens = xq.shape[0]
    for r in prange(n_rows):
        for t in range(n_tokens):
            acc = np.float32(0.0)
            for b in range(nb):
                s1 = 0
                s2 = 0
                for g in range(16):
                    dot = 0
                    for e in range(16):
                        dot += np.int32(q[r, b, 16 * g + e]) * np.int32(xq[t, QK_K * b + 16 * g + e])
                    s1 += np.int32(sc[r, b, g]) * dot
                    s2 += np.int32(mn[r, b, g]) * np.int32(xbs[t, 16 * b + g])
                res = d[r, b] * np.float32(s1)
                if has_min:
                    res = fma32(-dmin[r, b], np.float32(s2), res)
                acc = fma32(res, xd[t, b], acc)
            out[t, r] = acc


def matmul_tiled_numba(fmt, w: np.ndarray, act: tuple[np.ndarray, ...], out: np.ndarray) -> None:
    """out[t, r] in the tiled order, Numba. Decodes the whole matrix first (about 1.5-3x its
    bytes, freed on return): the fallback when the C extension is absent, not the fast path."""
    blocks = decode_blocks(fmt, w)
    xq, xd, xbs = act
    _matmul_tiled(blocks.q, blocks.sc, blocks.mn, blocks.d, blocks.dmin, fmt.ggml_type in HAS_MIN, xq, xd, xbs, out)
