"""MXFP4 (gpt-oss's expert weights): 4-bit E2M1 values under a shared power-of-two scale,
dotted with Q8_0 activations.

Block (ggml-common.h block_mxfp4, 17 bytes, 32 values):

    e        one E8M0 byte: the block scale is 2**(e - 127)
    qs[16]   4-bit E2M1 codes. Element j < 16 is the low nibble of qs[j], element j + 16
             its high nibble (the Q4_0 order).

ggml stores the E2M1 values doubled, as int8 (`kvalues_mxfp4`):

    code  0..7:   0, 1, 2, 3, 4, 6,  8,  12     (E2M1 0, 0.5, 1, 1.5, 2, 3, 4, 6, times 2)
    code  8..15:  0, -1, -2, -3, -4, -6, -8, -12 (the same with the sign bit; code 8 is -0 -> 0)

and halves the scale to make up for it: GGML_E8M0_TO_FP32_HALF(e) = 2**(e - 128), as the
float32 bit pattern (e - 1) << 23 for e >= 2, and the subnormals 2**-128 (0x00200000) and
2**-127 (0x00400000) for e = 0 and 1. E8M0's NaN code (e = 255) is not special-cased by
ggml (nor by gguf-py): it reads as 2**127. So value j = kvalues[code_j] * 2**(e - 128) in
float32 — exact for every e (powers of two times small ints), never NaN; but for e >= 253
the values 8 and 12 (and for e = 255 also 4 and 6) overflow to +-inf, in ggml as here.

Summation order: ggml's x86 AVX2 `ggml_vec_dot_mxfp4_q8_0` (llama.cpp uses it for every
batch size: tinyBLAS has no MXFP4 path, and the repacked MXFP4 layouts are switched off in
the oracle, like all repacks). Blocks go in pairs. Per block, eight int32 lanes each sum
four consecutive products (lane i = elements 4i..4i+3: shuffle-table lookup of the codes,
maddubs + madd); the block's scale is one float32 product, fp16(d_x) * e8m0_half(e); the
even block of each pair accumulates into one set of eight FMA lanes, the odd block into a
second set: acc1[i] = fma(s_even, float(lane_even[i]), acc1[i]), the same for acc2. Then
sumf = hsum_float_8(acc1 + acc2). An odd last block is added by ggml's scalar tail,
`sumf += d * sumi`, which GCC contracts into one FMA in the AVX2 build (-mfma):
sumf = fma(float(sum of its 32 products), s, sumf). Every int sum is exact (|lane| <= 4 * 12 * 127) and fits a float exactly.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from .formats import QK8_0, BlockFormat
from .jit import njit, prange
from .numba_intrinsics import fma32
from .numba_kernels import _fma, _hsum8, _readonly

QK = QK8_0  # values per MXFP4 block, and per Q8_0 block
MXFP4_BYTES = 17  # e, 16 bytes of codes

# ggml's kvalues_mxfp4: E2M1 codes -> doubled values.
KVALUES = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], dtype=np.int8)


def e8m0_to_fp32_half(e: np.ndarray) -> np.ndarray:
    """E8M0 bytes -> 2**(e - 128) as float32, bit for bit as ggml's GGML_E8M0_TO_FP32_HALF."""
    e = np.asarray(e, dtype=np.uint32)
    bits = np.where(e < 2, np.uint32(0x00200000) << e, (e - np.uint32(1)) << np.uint32(23))
    return bits.astype(np.uint32).view(np.float32)


# All 256 scales, as ggml's ggml_table_f32_e8m0_half.
E8M0_HALF = _readonly(e8m0_to_fp32_half(np.arange(256)))
_KVALUES = _readonly(KVALUES)


class MXFP4Format(BlockFormat):
    """value j = kvalues_mxfp4[code j] * 2**(e - 128), one float32 product."""

    name, ggml_type, block_size = "MXFP4", GGMLQuantizationType.MXFP4, QK
    layout = np.dtype([("e", "u1"), ("qs", "u1", QK // 2)])  # 17 bytes
    vec_dot_type = "Q8_0"

    def _dequantize_blocks(self, blocks: np.ndarray) -> np.ndarray:
        d = e8m0_to_fp32_half(blocks["e"])[..., None]
        qs = blocks["qs"]
        codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # element order
        with np.errstate(over="ignore"):  # e >= 253: +-8 and +-12 (and more) overflow, as in ggml
            return d * KVALUES[codes].astype(np.float32)


# -- kernel ----------------------------------------------------------------------------------------
#
# A row is decoded once (codes -> int8 values through the table, e -> float32 scale) into
# per-thread buffers, then dotted with every token in ggml's order.

@njit(inline="always")
def lanes4(q, x, lanes):
    """lanes[k] = the exact int sum of four products q[4k..4k+3] * x[4k..4k+3] (a loop LLVM
    vectorizes): ggml's maddubs + madd lanes, eight per 32-value block."""
    for k in range(lanes.shape[0]):
        o = 4 * k
        lanes[k] = (np.int32(q[o]) * np.int32(x[o]) + np.int32(q[o + 1]) * np.int32(x[o + 1])) + (
            np.int32(q[o + 2]) * np.int32(x[o + 2]) + np.int32(q[o + 3]) * np.int32(x[o + 3])
        )


@njit(inline="always")
def dot_block_pairs(sw, xd, lanes):
    """The float part of ggml's AVX2 vec_dot for 32-value blocks taken two at a time
    (mxfp4_q8_0, iq4_nl_q8_0): even and odd blocks in two sets of eight FMA lanes, added,
    reduced; an odd last block as one scalar FMA. sw/xd: the blocks' weight and activation
    scales, lanes: lanes4's int sums."""
    n_blocks = sw.shape[0]
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = np.float32(0.0)  # even blocks (ggml's accum1)
    b0 = b1 = b2 = b3 = b4 = b5 = b6 = b7 = np.float32(0.0)  # odd blocks (accum2)
    for ib in range(0, n_blocks - 1, 2):
        s = xd[ib] * sw[ib]
        o = 8 * ib
        a0 = _fma(s, np.float32(lanes[o]), a0)
        a1 = _fma(s, np.float32(lanes[o + 1]), a1)
        a2 = _fma(s, np.float32(lanes[o + 2]), a2)
        a3 = _fma(s, np.float32(lanes[o + 3]), a3)
        a4 = _fma(s, np.float32(lanes[o + 4]), a4)
        a5 = _fma(s, np.float32(lanes[o + 5]), a5)
        a6 = _fma(s, np.float32(lanes[o + 6]), a6)
        a7 = _fma(s, np.float32(lanes[o + 7]), a7)
        s = xd[ib + 1] * sw[ib + 1]
        o += 8
        b0 = _fma(s, np.float32(lanes[o]), b0)
        b1 = _fma(s, np.float32(lanes[o + 1]), b1)
        b2 = _fma(s, np.float32(lanes[o + 2]), b2)
        b3 = _fma(s, np.float32(lanes[o + 3]), b3)
        b4 = _fma(s, np.float32(lanes[o + 4]), b4)
        b5 = _fma(s, np.float32(lanes[o + 5]), b5)
        b6 = _fma(s, np.float32(lanes[o + 6]), b6)
        b7 = _fma(s, np.float32(lanes[o + 7]), b7)
    total = _hsum8(a0 + b0, a1 + b1, a2 + b2, a3 + b3, a4 + b4, a5 + b5, a6 + b6, a7 + b7)
    if n_blocks % 2:  # ggml's scalar tail, contracted into one FMA
        ib = n_blocks - 1
        o = 8 * ib
        sumi = np.int32(0)
        for k in range(8):
            sumi += lanes[o + k]
        total = fma32(np.float32(sumi), xd[ib] * sw[ib], total)
    return total


@njit(inline="always")
def _dot(q, sw, x, xd, lanes):
    """ggml_vec_dot_mxfp4_q8_0 (AVX2) of one decoded row (q int8 values, sw float32 scales)
    with one token's Q8_0 quants x and fp16-rounded scales xd."""
    lanes4(q, x, lanes)
    return dot_block_pairs(sw, xd, lanes)


@njit(parallel=True, cache=True, nogil=True)
def _matmul_mxfp4(w, kvalues, e8m0, xq, xd, out):
    n_rows = w.shape[0]
    n_blocks = xd.shape[1]
    for r in prange(n_rows):
        q = np.empty(n_blocks * QK, dtype=np.int8)
        sw = np.empty(n_blocks, dtype=np.float32)
        lanes = np.empty(n_blocks * 8, dtype=np.int32)
        for b in range(n_blocks):
            o = b * MXFP4_BYTES
            sw[b] = e8m0[w[r, o]]
            for j in range(QK // 2):
                byte = w[r, o + 1 + j]
                q[b * QK + j] = kvalues[byte & 0x0F]
                q[b * QK + j + QK // 2] = kvalues[byte >> 4]
        for t in range(xq.shape[0]):
            out[t, r] = _dot(q, sw, xq[t], xd[t], lanes)


def matmul_mxfp4(w: np.ndarray, act: tuple[np.ndarray, ...], out: np.ndarray, vec_dot: bool = False) -> None:
    """out[t, r] = ggml_vec_dot_mxfp4_q8_0(row r, token t). act = (qs int8 (n, k), d float32
    (n, k/32)) from quantize_q8_0. vec_dot is accepted for the common signature: ggml takes
    the vec_dot order for every batch size."""
    xq, xd = act
    _matmul_mxfp4(_readonly(w), _KVALUES, E8M0_HALF, _readonly(xq), _readonly(xd), out)
