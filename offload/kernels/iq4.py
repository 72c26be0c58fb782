"""IQ4_NL and IQ4_XS: 4-bit codes through ggml's non-linear table `kvalues_iq4nl`.

Blocks (ggml-common.h):

* IQ4_NL `{d f16, qs[16]}`, 32 values (18 bytes): value j = d * kvalues[code j], one product.
  Element j < 16 is the low nibble of qs[j], element j + 16 its high nibble (Q4_0's order).
* IQ4_XS `{d f16, scales_h u16, scales_l[4], qs[128]}`, 256 values (136 bytes): eight
  sub-blocks of 32, each with a 6-bit scale ls_s = (low nibble s of scales_l) | (2 bits s
  of scales_h) << 4; value = (d * (ls_s - 32)) * kvalues[code] (two products, in this
  order, as dequantize_row_iq4_xs). Sub-block s's codes are qs[16s..16s+15], IQ4_NL's order.

Summation orders (llama.cpp's x86 AVX2 build; the oracle turns the repacked layouts off):

* IQ4_NL x Q8_0, vec_dot (one token, and every routed expert: mul_mat_id never goes through
  llamafile's sgemm): `ggml_vec_dot_iq4_nl_q8_0`, MXFP4's order with an fp16 scale. Blocks
  in pairs; per block eight int32 lanes, lane i the sum of the products of elements
  4i..4i+3; s = fp16(d_x) * fp16(d_w); even blocks acc1 = fma(s, lane, acc1), odd blocks
  acc2; hsum_float_8(acc1 + acc2); an odd last block is the scalar `sumf += d * sumi`, one
  FMA in the AVX2 build.
* IQ4_NL x Q8_0, sgemm (a plain matmul of 2+ tokens: ggml's mul_mat hands it to llamafile's
  tinyBLAS_Q0_AVX): the same lanes and scale, but one set of eight FMA lanes over all blocks
  in order, then hsum (the same reduction as hsum_float_8). `vec_dot=False` with 2+ tokens.
* IQ4_XS x Q8_K, vec_dot (fewer than 8 tokens): `ggml_vec_dot_iq4_xs_q8_K`. Per super-block
  eight int32 lanes, lane i = sum over sub-blocks s of (ls_s - 32) * (sum of the products of
  elements 32s+4i..32s+4i+3) (exact); acc = fma(fp16(d_w) * d_x, float(lane), acc) per
  super-block; hsum_float_8(acc).
* IQ4_XS with 8+ tokens: ggml's tiled GEMM, as the K-quants (see tiled.py: q = kvalues,
  a scale ls - 32 per 32 values, no min).

Every integer sum is exact (|pair| <= 2 * 127 * 127 < 32768: maddubs never saturates).
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from .formats import QK8_0, QK_K, BlockFormat
from .jit import njit, prange
from .mxfp4 import dot_block_pairs, lanes4  # IQ4_NL's vec_dot takes its blocks in pairs, as MXFP4's
from .numba_kernels import F16_TO_F32, _fma, _hsum8, _readonly

IQ4_NL_BYTES = 18  # d, 16 bytes of codes
IQ4_XS_BYTES = 136  # d, scales_h, scales_l[4], 128 bytes of codes

# ggml's kvalues_iq4nl: 4-bit code -> int8 value.
KVALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.int8)
_KVALUES = _readonly(KVALUES)


def _codes(qs: np.ndarray) -> np.ndarray:
    """uint8 (..., 16) -> (..., 32) codes in element order: low nibbles, then high nibbles."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def iq4_xs_scales(blocks: np.ndarray) -> np.ndarray:
    """The eight ls - 32 of each IQ4_XS block, int32 (..., 8)."""
    s = np.arange(8)
    low = (blocks["scales_l"][..., s // 2] >> (4 * (s % 2)).astype(np.uint8)) & 0x0F
    high = (blocks["scales_h"][..., None].astype(np.int32) >> (2 * s)) & 3
    return (low.astype(np.int32) | (high << 4)) - 32


class IQ4_NLFormat(BlockFormat):
    """value j = d * kvalues_iq4nl[code j]."""

    name, ggml_type, block_size = "IQ4_NL", GGMLQuantizationType.IQ4_NL, QK8_0
    layout = np.dtype([("d", "<f2"), ("qs", "u1", QK8_0 // 2)])  # 18 bytes
    vec_dot_type = "Q8_0"

    def _dequantize_blocks(self, blocks: np.ndarray) -> np.ndarray:
        d = blocks["d"].astype(np.float32)[..., None]
        return d * KVALUES[_codes(blocks["qs"])].astype(np.float32)


class IQ4_XSFormat(BlockFormat):
    """value = (d * (ls_s - 32)) * kvalues_iq4nl[code], s the value's 32-wide sub-block."""

    name, ggml_type, block_size = "IQ4_XS", GGMLQuantizationType.IQ4_XS, QK_K
    layout = np.dtype([("d", "<f2"), ("scales_h", "<u2"), ("scales_l", "u1", 4), ("qs", "u1", QK_K // 2)])  # 136
    vec_dot_type = "Q8_K"

    def _dequantize_blocks(self, blocks: np.ndarray) -> np.ndarray:
        dl = blocks["d"].astype(np.float32)[..., None] * iq4_xs_scales(blocks).astype(np.float32)  # (..., 8)
        codes = _codes(blocks["qs"].reshape(*blocks.shape, 8, 16))  # (..., 8, 32)
        values = dl[..., None] * KVALUES[codes].astype(np.float32)
        return values.reshape(*blocks.shape, QK_K)


# -- kernels ---------------------------------------------------------------------------------------
#
# A row is decoded once (codes -> int8 values, scales to float32 / int32) into per-thread
# buffers, then dotted with every token in ggml's order.

@njit(inline="always")
def _dot_nl_sgemm(sw, xd, lanes):
    """tinyBLAS_Q0_AVX's order: one set of eight FMA lanes over all blocks, then hsum."""
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = np.float32(0.0)
    for ib in range(sw.shape[0]):
        s = sw[ib] * xd[ib]
        o = 8 * ib
        a0 = _fma(s, np.float32(lanes[o]), a0)
        a1 = _fma(s, np.float32(lanes[o + 1]), a1)
        a2 = _fma(s, np.float32(lanes[o + 2]), a2)
        a3 = _fma(s, np.float32(lanes[o + 3]), a3)
        a4 = _fma(s, np.float32(lanes[o + 4]), a4)
        a5 = _fma(s, np.float32(lanes[o + 5]), a5)
        a6 = _fma(s, np.float32(lanes[o + 6]), a6)
        a7 = _fma(s, np.float32(lanes[o + 7]), a7)
    return _hsum8(a0, a1, a2, a3, a4, a5, a6, a7)


@njit(parallel=True, cache=True, nogil=True)
def _matmul_iq4_nl(w, kvalues, f16, xq, xd, sgemm, out):
    n_rows = w.shape[0]
    n_blocks = xd.shape[1]
    for r in prange(n_rows):
        q = np.empty(n_blocks * QK8_0, dtype=np.int8)
        sw = np.empty(n_blocks, dtype=np.float32)
        lanes = np.empty(n_blocks * 8, dtype=np.int32)
        for b in range(n_blocks):
            o = b * IQ4_NL_BYTES
            sw[b] = f16[np.int32(w[r, o]) | (np.int32(w[r, o + 1]) << 8)]
            for j in range(QK8_0 // 2):
                byte = w[r, o + 2 + j]
                q[b * QK8_0 + j] = kvalues[byte & 0x0F]
                q[b * QK8_0 + j + QK8_0 // 2] = kvalues[byte >> 4]
        for t in range(xq.shape[0]):
            lanes4(q, xq[t], lanes)
            out[t, r] = _dot_nl_sgemm(sw, xd[t], lanes) if sgemm else dot_block_pairs(sw, xd[t], lanes)


def matmul_iq4_nl(w: np.ndarray, act: tuple[np.ndarray, ...], out: np.ndarray, vec_dot: bool = False) -> None:
    """out[t, r] = row r . token t (act = Q8_0 (qs, d)) in ggml's vec_dot order."""
    xq, xd = act
    _matmul_iq4_nl(_readonly(w), _KVALUES, F16_TO_F32, _readonly(xq), _readonly(xd), False, out)


def matmul_iq4_nl_sgemm(w: np.ndarray, act: tuple[np.ndarray, ...], out: np.ndarray, vec_dot: bool = False) -> None:
    """The same in llamafile's tinyBLAS_Q0_AVX order (a plain matmul of 2+ tokens)."""
    xq, xd = act
    _matmul_iq4_nl(_readonly(w), _KVALUES, F16_TO_F32, _readonly(xq), _readonly(xd), True, out)


@njit(parallel=True, cache=True, nogil=True)
def _matmul_iq4_xs(w, kvalues, f16, xq, xd, out):
    n_rows = w.shape[0]
    n_blocks = xd.shape[1]
    for r in prange(n_rows):
        q = np.empty(n_blocks * QK_K, dtype=np.int8)
        ls = np.empty(n_blocks * 8, dtype=np.int32)
        dw = np.empty(n_blocks, dtype=np.float32)
        lanes = np.empty(n_blocks * 64, dtype=np.int32)
        for b in range(n_blocks):
            o = b * IQ4_XS_BYTES
            dw[b] = f16[np.int32(w[r, o]) | (np.int32(w[r, o + 1]) << 8)]
            sh = np.int32(w[r, o + 2]) | (np.int32(w[r, o + 3]) << 8)
            for s in range(8):
                low = (np.int32(w[r, o + 4 + s // 2]) >> (4 * (s % 2))) & 0x0F
                ls[b * 8 + s] = (low | (((sh >> (2 * s)) & 3) << 4)) - 32
                for j in range(16):
                    byte = w[r, o + 8 + 16 * s + j]
                    q[b * QK_K + 32 * s + j] = kvalues[byte & 0x0F]
                    q[b * QK_K + 32 * s + j + 16] = kvalues[byte >> 4]
        for t in range(xq.shape[0]):
            lanes4(q, xq[t], lanes)  # lanes[64 b + 8 s + i]
            a = np.zeros(8, dtype=np.float32)
            for b in range(n_blocks):
                s_f = dw[b] * xd[t, b]
                for i in range(8):
                    lane = np.int32(0)
                    for s in range(8):
                        lane += ls[b * 8 + s] * lanes[64 * b + 8 * s + i]
                    a[i] = _fma(s_f, np.float32(lane), a[i])
            out[t, r] = _hsum8(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7])


def matmul_iq4_xs(w: np.ndarray, act: tuple[np.ndarray, ...], out: np.ndarray, vec_dot: bool = False) -> None:
    """out[t, r] = ggml_vec_dot_iq4_xs_q8_K(row r, token t); act = Q8_K (qs, d, bsums).
    (8+ tokens go through the tiled kernels instead, as in ggml.)"""
    xq, xd = act[0], act[1]
    _matmul_iq4_xs(_readonly(w), _KVALUES, F16_TO_F32, _readonly(xq), _readonly(xd), out)
