"""Q4_K and Q5_K: k-quant super-blocks with 6-bit packed scales and mins, dotted with Q8_K.

A super-block holds 256 values as 8 sub-blocks of 32. Value e of sub-block s is

    d * sc[s] * q - dmin * m[s]

with d, dmin fp16, sc[s], m[s] 6-bit (packed into 12 bytes, ggml's get_scale_min_k4) and q
a 4-bit (Q4_K) or 5-bit (Q5_K: a 4-bit low part in `qs` plus one bit from `qh`) unsigned
quant. In `qs`, the 32 bytes 32*j .. 32*j+31 hold sub-block 2j in their low nibbles and
sub-block 2j+1 in their high nibbles; in Q5_K, bit s of qh[e] is the fifth bit of value e
of sub-block s.

The kernels reproduce ggml's AVX2 `ggml_vec_dot_q{4,5}_K_q8_K`, which llama.cpp uses for
matmuls of fewer than 8 tokens (decode; 8 or more go through its tiled GEMM, see tiled.py),
whose float operations per super-block are:

* d = x.d * w.d and dmin = -x.d * w.dmin (float32 products),
* the weights' offsets: prod[k] = m[2k] * (bsums[4k] + bsums[4k+1]) + m[2k+1] * (bsums[4k+2]
  + bsums[4k+3]) for k < 4 (exact integers: _mm_hadd_epi16 + _mm_madd_epi16), then
    Q4_K: four float lanes acc_m[k] = fma(dmin, float(prod[k]), acc_m[k]),
    Q5_K: one float summs = fma(dmin, float((prod0 + prod1) + (prod2 + prod3)), summs)
          (C's `summs += dmin * isum`, which the shipped libggml-cpu computes as one FMA:
          a product rounded apart disagrees with it on about half the rows),
* the scaled quants: eight int32 lanes, lane L summing sc[s] * (q . x) over elements
  4L .. 4L+3 of every sub-block s (maddubs, madd with the broadcast scale, exact), then
  acc[L] = fma(d, float(isum[L]), acc[L]).

At the end, Q4_K returns hsum_float_8(acc) + ((acc_m0 + acc_m2) + (acc_m1 + acc_m3)) and
Q5_K returns hsum_float_8(acc) + summs. (llama.cpp's repacked Q4_K buffers, q4_K_8x8,
sum in another order; offload compares against llama.cpp with them off.)
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from .formats import QK_K, BlockFormat
from .jit import njit, prange
from .numba_kernels import F16_TO_F32, _fma, _hsum8, _readonly

K_SCALE_SIZE = 12  # 8 six-bit scales + 8 six-bit mins
Q4_K_BYTES = 2 + 2 + K_SCALE_SIZE + QK_K // 2  # 144
Q5_K_BYTES = Q4_K_BYTES + QK_K // 8  # 176: plus the 32 bytes of fifth bits


def scale_min_k4(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 12 packed bytes (..., 12) -> 6-bit sub-block scales and mins, uint8 (..., 8) each,
    as ggml's get_scale_min_k4:
        j < 4:  sc = b[j] & 63,                          m = b[j+4] & 63
        j >= 4: sc = (b[j+4] & 15) | (b[j-4] >> 6) << 4,  m = (b[j+4] >> 4) | (b[j] >> 6) << 4
    """
    b = scales.astype(np.uint8)
    lo, mid, hi = b[..., 0:4], b[..., 4:8], b[..., 8:12]
    sc = np.concatenate([lo & 63, (hi & 15) | ((lo >> 6) << 4)], axis=-1)
    m = np.concatenate([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], axis=-1)
    return sc, m


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """qs uint8 (..., 128) -> uint8 (..., 8, 32): sub-block 2j = low nibbles of bytes 32j..,
    sub-block 2j+1 = their high nibbles."""
    q = qs.reshape(*qs.shape[:-1], 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(2, 1)
    return (q & np.uint8(0x0F)).reshape(*qs.shape[:-1], 8, 32)


class Q4_KFormat(BlockFormat):
    """value (s, e) = d * sc[s] * q[s, e] - dmin * m[s], q 4-bit."""

    name, ggml_type, block_size = "Q4_K", GGMLQuantizationType.Q4_K, QK_K
    layout = np.dtype([
        ("d", "<f2"),  # super-block scale of the sub-block scales
        ("dmin", "<f2"),  # super-block scale of the sub-block mins
        ("scales", "u1", K_SCALE_SIZE),  # 8 scales + 8 mins, 6 bits each
        ("qs", "u1", QK_K // 2),  # 4-bit quants
    ])  # 144 bytes
    vec_dot_type = "Q8_K"

    def _dequantize_blocks(self, blocks: np.ndarray) -> np.ndarray:
        d = blocks["d"].astype(np.float32)[..., None]
        dmin = blocks["dmin"].astype(np.float32)[..., None]
        sc, m = scale_min_k4(blocks["scales"])
        dl = (d * sc.astype(np.float32))[..., None]  # (..., 8, 1)
        ml = (dmin * m.astype(np.float32))[..., None]
        q = _nibbles(blocks["qs"]).astype(np.float32)  # (..., 8, 32)
        return (dl * q - ml).reshape(*blocks.shape, QK_K)


class Q5_KFormat(BlockFormat):
    """value (s, e) = d * sc[s] * (q[s, e] + 16 * bit s of qh[e]) - dmin * m[s], q 4-bit."""

    name, ggml_type, block_size = "Q5_K", GGMLQuantizationType.Q5_K, QK_K
    layout = np.dtype([
        ("d", "<f2"),
        ("dmin", "<f2"),
        ("scales", "u1", K_SCALE_SIZE),
        ("qh", "u1", QK_K // 8),  # bit s of byte e: fifth bit of value e of sub-block s
        ("qs", "u1", QK_K // 2),  # low 4 bits, as in Q4_K
    ])  # 176 bytes
    vec_dot_type = "Q8_K"

    def _dequantize_blocks(self, blocks: np.ndarray) -> np.ndarray:
        d = blocks["d"].astype(np.float32)[..., None]
        dmin = blocks["dmin"].astype(np.float32)[..., None]
        sc, m = scale_min_k4(blocks["scales"])
        dl = (d * sc.astype(np.float32))[..., None]
        ml = (dmin * m.astype(np.float32))[..., None]
        low = _nibbles(blocks["qs"])  # (..., 8, 32)
        qh = blocks["qh"][..., None, :] >> np.arange(8, dtype=np.uint8)[:, None]  # (..., 8, 32)
        q = (low | ((qh & np.uint8(1)) << np.uint8(4))).astype(np.float32)
        return (dl * q - ml).reshape(*blocks.shape, QK_K)


# -- kernels ---------------------------------------------------------------------------------
#
# Both kernels read the blocks in place, one row per prange iteration and the tokens inside
# (the row stays in L1/L2 across tokens). Decoding a row into a buffer once and reusing it
# per token measured slower than decoding on the fly: a super-block's 16 bytes of header
# are cheap, and the fused nibble loop below vectorizes (eight int32 lanes wide).


@njit(inline="always")
def _scales_mins(wr, o, sc, mn):
    """get_scale_min_k4 for the 12 bytes at wr[o + 4 ..]: sc, mn int32 (8)."""
    s = o + 4
    for j in range(4):
        sc[j] = np.int32(wr[s + j]) & 63
        mn[j] = np.int32(wr[s + j + 4]) & 63
        sc[4 + j] = (np.int32(wr[s + j + 8]) & 15) | ((np.int32(wr[s + j]) >> 6) << 4)
        mn[4 + j] = (np.int32(wr[s + j + 8]) >> 4) | ((np.int32(wr[s + j + 4]) >> 6) << 4)


@njit(inline="always")
def _min_products(mn, bsums, t, b):
    """_mm_hadd_epi16 of the 16 bsums, _mm_madd_epi16 with the 8 mins: four exact int sums."""
    g = b * 16
    p0 = mn[0] * (np.int32(bsums[t, g + 0]) + np.int32(bsums[t, g + 1])) + \
        mn[1] * (np.int32(bsums[t, g + 2]) + np.int32(bsums[t, g + 3]))
    p1 = mn[2] * (np.int32(bsums[t, g + 4]) + np.int32(bsums[t, g + 5])) + \
        mn[3] * (np.int32(bsums[t, g + 6]) + np.int32(bsums[t, g + 7]))
    p2 = mn[4] * (np.int32(bsums[t, g + 8]) + np.int32(bsums[t, g + 9])) + \
        mn[5] * (np.int32(bsums[t, g + 10]) + np.int32(bsums[t, g + 11]))
    p3 = mn[6] * (np.int32(bsums[t, g + 12]) + np.int32(bsums[t, g + 13])) + \
        mn[7] * (np.int32(bsums[t, g + 14]) + np.int32(bsums[t, g + 15]))
    return p0, p1, p2, p3


@njit(inline="always")
def _add_lanes(tmp, d, acc):
    """int32 lane L of sumi = the products of elements 4L .. 4L+3 of every sub-block (tmp
    holds them per position 0..31, already times the sub-block scale); then
    acc[L] = fma(d, float(sumi[L]), acc[L]) (_mm256_cvtepi32_ps, _mm256_fmadd_ps)."""
    for lane in range(8):
        isum = (tmp[4 * lane] + tmp[4 * lane + 1]) + (tmp[4 * lane + 2] + tmp[4 * lane + 3])
        acc[lane] = _fma(d, np.float32(isum), acc[lane])


@njit(parallel=True, cache=True, nogil=True)
def _matmul_q4_k(w, f16, xq, xd, bsums, out):
    n_rows = w.shape[0]
    n_tokens = xq.shape[0]
    n_blocks = xd.shape[1]
    for r in prange(n_rows):
        wr = w[r]
        sc = np.empty(8, dtype=np.int32)
        mn = np.empty(8, dtype=np.int32)
        tmp = np.empty(32, dtype=np.int32)
        acc = np.empty(8, dtype=np.float32)
        for t in range(n_tokens):
            x = xq[t]
            acc[:] = 0.0
            m0 = m1 = m2 = m3 = np.float32(0.0)  # acc_m, four lanes
            for b in range(n_blocks):
                o = b * Q4_K_BYTES
                d = xd[t, b] * f16[np.int32(wr[o]) | (np.int32(wr[o + 1]) << 8)]
                dmin = -xd[t, b] * f16[np.int32(wr[o + 2]) | (np.int32(wr[o + 3]) << 8)]
                _scales_mins(wr, o, sc, mn)
                p0, p1, p2, p3 = _min_products(mn, bsums, t, b)
                m0 = _fma(dmin, np.float32(p0), m0)
                m1 = _fma(dmin, np.float32(p1), m1)
                m2 = _fma(dmin, np.float32(p2), m2)
                m3 = _fma(dmin, np.float32(p3), m3)
                tmp[:] = 0
                qs = o + 4 + K_SCALE_SIZE
                xo = b * QK_K
                for j in range(4):  # 32 bytes: sub-block 2j (low nibbles), 2j+1 (high)
                    s_lo = sc[2 * j]
                    s_hi = sc[2 * j + 1]
                    for e in range(32):
                        byte = np.int32(wr[qs + 32 * j + e])
                        tmp[e] += s_lo * ((byte & 15) * np.int32(x[xo + 64 * j + e])) + \
                            s_hi * ((byte >> 4) * np.int32(x[xo + 64 * j + 32 + e]))
                _add_lanes(tmp, d, acc)
            total = _hsum8(acc[0], acc[1], acc[2], acc[3], acc[4], acc[5], acc[6], acc[7])
            out[t, r] = total + ((m0 + m2) + (m1 + m3))  # _mm_movehl_ps, _mm_movehdup_ps


@njit(parallel=True, cache=True, nogil=True)
def _matmul_q5_k(w, f16, xq, xd, bsums, out):
    n_rows = w.shape[0]
    n_tokens = xq.shape[0]
    n_blocks = xd.shape[1]
    for r in prange(n_rows):
        wr = w[r]
        sc = np.empty(8, dtype=np.int32)
        mn = np.empty(8, dtype=np.int32)
        tmp = np.empty(32, dtype=np.int32)
        acc = np.empty(8, dtype=np.float32)
        for t in range(n_tokens):
            x = xq[t]
            acc[:] = 0.0
            summs = np.float32(0.0)
            for b in range(n_blocks):
                o = b * Q5_K_BYTES
                d = xd[t, b] * f16[np.int32(wr[o]) | (np.int32(wr[o + 1]) << 8)]
                dmin = -xd[t, b] * f16[np.int32(wr[o + 2]) | (np.int32(wr[o + 3]) << 8)]
                _scales_mins(wr, o, sc, mn)
                p0, p1, p2, p3 = _min_products(mn, bsums, t, b)
                # _mm_hadd_epi32 twice, then `summs += dmin * isum`, contracted to an FMA
                summs = _fma(dmin, np.float32((p0 + p1) + (p2 + p3)), summs)
                tmp[:] = 0
                qh = o + 4 + K_SCALE_SIZE
                qs = qh + QK_K // 8
                xo = b * QK_K
                for j in range(4):
                    s_lo = sc[2 * j]
                    s_hi = sc[2 * j + 1]
                    for e in range(32):
                        byte = np.int32(wr[qs + 32 * j + e])
                        h = np.int32(wr[qh + e]) >> (2 * j)
                        q_lo = (byte & 15) | ((h & 1) << 4)
                        q_hi = (byte >> 4) | ((h & 2) << 3)
                        tmp[e] += s_lo * (q_lo * np.int32(x[xo + 64 * j + e])) + \
                            s_hi * (q_hi * np.int32(x[xo + 64 * j + 32 + e]))
                _add_lanes(tmp, d, acc)
            out[t, r] = _hsum8(acc[0], acc[1], acc[2], acc[3], acc[4], acc[5], acc[6], acc[7]) + summs


def matmul_q4_k(w: np.ndarray, act: tuple[np.ndarray, ...], out: np.ndarray, vec_dot: bool = False) -> None:
    """out[t, r] = ggml_vec_dot_q4_K_q8_K(row r, token t); act = (qs, d, bsums) of Q8_K.
    vec_dot is accepted for the common signature: k-quants always sum in vec_dot's order."""
    xq, xd, bsums = act
    _matmul_q4_k(_readonly(w), F16_TO_F32, _readonly(xq), _readonly(xd), _readonly(bsums), out)


def matmul_q5_k(w: np.ndarray, act: tuple[np.ndarray, ...], out: np.ndarray, vec_dot: bool = False) -> None:
    """out[t, r] = ggml_vec_dot_q5_K_q8_K(row r, token t); act = (qs, d, bsums) of Q8_K."""
    xq, xd, bsums = act
    _matmul_q5_k(_readonly(w), F16_TO_F32, _readonly(xq), _readonly(xd), _readonly(bsums), out)
