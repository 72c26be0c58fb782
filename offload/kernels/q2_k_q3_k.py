"""Q2_K and Q3_K: 256-value super-blocks of sixteen 16-value sub-blocks, dotted with Q8_K.

Block layouts (ggml-common.h, little-endian):

* Q2_K (84 bytes): scales[16] (low nibble: sub-block scale, high nibble: sub-block min),
  qs[64] (2-bit quants), d and dmin (f16).  value = d * scale * q - dmin * min, q in 0..3.
* Q3_K (110 bytes): hmask[32] (high bits), qs[64] (low 2 bits), scales[12] (sixteen 6-bit
  scales), d (f16).  value = d * (scale - 32) * q, q = low - 4 where the hmask bit is clear.

Within a super-block, value e (0..255) sits in 128-value half j = e // 128, 32-value group
k = (e % 128) // 32, position l = e % 32: its low bits are (qs[32 j + l] >> 2 k) & 3, its
Q3_K high bit is bit 4 j + k of hmask[l], and its scale is sub-block e // 16.

Summation order (ggml's x86 AVX2 `ggml_vec_dot_q{2,3}_K_q8_K`, quants.c): the integer
work is exact; per super-block it leaves eight int32 lanes, lane i holding
sum over the eight 32-value groups c of scale[2 c + (i >= 4)] * (the four products of
values 32 c + 4 i .. 32 c + 4 i + 3). One float32 accumulator of 8 lanes then takes, per
super-block b (in order):

* Q2_K: acc[i] = fma(-d_x * dmin_w, float(min[2i] * bsum[2i] + min[2i+1] * bsum[2i+1]), acc[i])
        acc[i] = fma(d_x * d_w, float(lane[i]), acc[i])
* Q3_K: acc[i] = fma(d_x * d_w, float(lane[i]), acc[i])

and the result is hsum_float_8(acc). ggml takes this vec_dot for any number of tokens
(llamafile's tinyBLAS has no k-quants; ggml's repacked Q2_K path needs AVX-512), so the
`vec_dot` flag changes nothing here.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from .formats import QK_K, BlockFormat
from .jit import njit, prange
from .numba_kernels import F16_TO_F32, _fma, _hsum8, _readonly

Q2_K_BYTES = 84  # scales[16] qs[64] d dmin
Q3_K_BYTES = 110  # hmask[32] qs[64] scales[12] d


def _low_bits(qs: np.ndarray) -> np.ndarray:
    """qs (..., 64) -> the 2-bit quants (..., 256) in value order: byte 32 j + l holds values
    128 j + 32 k + l at bits 2k (k = 0..3)."""
    shift = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(4, 1)
    halves = qs.reshape(*qs.shape[:-1], 2, 1, 32) >> shift  # (..., j, k, l)
    return (halves & np.uint8(3)).reshape(*qs.shape[:-1], QK_K)


class Q2_KFormat(BlockFormat):
    """value = d * (scales[s] & 0xF) * q - dmin * (scales[s] >> 4), s = sub-block (16 values)."""

    name, ggml_type, block_size = "Q2_K", GGMLQuantizationType.Q2_K, QK_K
    layout = np.dtype([("scales", "u1", 16), ("qs", "u1", 64), ("d", "<f2"), ("dmin", "<f2")])  # 84 bytes
    vec_dot_type = "Q8_K"

    def _dequantize_blocks(self, blocks: np.ndarray) -> np.ndarray:
        lead = blocks.shape
        d = blocks["d"].astype(np.float32)[..., None]  # (..., 1)
        dmin = blocks["dmin"].astype(np.float32)[..., None]
        scales = blocks["scales"]  # (..., 16)
        dl = (d * (scales & 0x0F).astype(np.float32))[..., None]  # (..., 16, 1)
        ml = (dmin * (scales >> 4).astype(np.float32))[..., None]
        q = _low_bits(blocks["qs"]).reshape(*lead, 16, 16).astype(np.float32)
        return (dl * q - ml).reshape(*lead, QK_K)


def _q3_k_scales(packed: np.ndarray) -> np.ndarray:
    """scales (..., 12) -> the sixteen signed 6-bit scales (..., 16) as int8.

    Scale s has its low 4 bits in byte s (s < 8, low nibble) or byte s - 8 (high nibble),
    and its high 2 bits at bits 2 (s // 4) of byte 8 + s % 4."""
    low = packed[..., :8]
    low4 = np.concatenate([low & 0x0F, low >> 4], axis=-1)  # (..., 16)
    shift = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(4, 1)
    high2 = ((packed[..., None, 8:12] >> shift) & 0x03).reshape(*packed.shape[:-1], 16)
    return (low4 | (high2 << 4)).astype(np.int8) - np.int8(32)


class Q3_KFormat(BlockFormat):
    """value = d * scale[s] * (low - 4 * (1 - high)), scale a signed 6-bit value (stored + 32)."""

    name, ggml_type, block_size = "Q3_K", GGMLQuantizationType.Q3_K, QK_K
    layout = np.dtype([("hmask", "u1", 32), ("qs", "u1", 64), ("scales", "u1", 12), ("d", "<f2")])  # 110 bytes
    vec_dot_type = "Q8_K"

    def _dequantize_blocks(self, blocks: np.ndarray) -> np.ndarray:
        lead = blocks.shape
        d = blocks["d"].astype(np.float32)[..., None]  # (..., 1)
        dl = (d * _q3_k_scales(blocks["scales"]).astype(np.float32))[..., None]  # (..., 16, 1)
        low = _low_bits(blocks["qs"]).astype(np.int8)
        # bit 4 j + k of hmask[l] is value 128 j + 32 k + l's high bit; clear means "minus 4"
        bit = np.arange(8, dtype=np.uint8).reshape(8, 1)
        high = ((blocks["hmask"][..., None, :] >> bit) & np.uint8(1)).reshape(*lead, QK_K)
        q = (low - ((high ^ np.uint8(1)) << 2).astype(np.int8)).astype(np.float32)
        return (dl * q.reshape(*lead, 16, 16)).reshape(*lead, QK_K)


# -- kernels -----------------------------------------------------------------------------
#
# Each row is decoded once into `ws`, the int16 products scale[e // 16] * q[e] (|.| <= 128),
# plus its per-super-block f16 scales; then, for each token and super-block, lane i is the
# exact integer sum of ws[e] * xq[e] over the values e with (e % 32) // 4 == i. That is
# ggml's maddubs/madd lanes (integer addition is exact: only the float steps need ggml's
# order). The loops are written so that LLVM vectorizes them (slices, no scattered stores).


@njit(inline="always")
def _f16(blk, o):
    return F16_TO_F32[np.int32(blk[o]) | (np.int32(blk[o + 1]) << 8)]


@njit(inline="always")
def _lane_sums(wsb, xb, prod, lanes):
    """lanes[i] = sum of wsb[e] * xb[e] over the 256 values e with (e % 32) // 4 == i."""
    for e in range(QK_K):
        prod[e] = np.int32(wsb[e]) * np.int32(xb[e])
    for l in range(32):  # fold the eight 32-value groups (in place: prod[l] is read first)
        prod[l] = ((prod[l] + prod[32 + l]) + (prod[64 + l] + prod[96 + l])) + (
            (prod[128 + l] + prod[160 + l]) + (prod[192 + l] + prod[224 + l])
        )
    for i in range(8):
        lanes[i] = (prod[4 * i] + prod[4 * i + 1]) + (prod[4 * i + 2] + prod[4 * i + 3])


@njit(inline="always")
def _fma_lanes(d, lanes, acc):
    """acc[i] = fma(d, float(lanes[i]), acc[i]): one _mm256_fmadd_ps."""
    for i in range(8):
        acc[i] = _fma(d, np.float32(lanes[i]), acc[i])


@njit(parallel=True, cache=True, nogil=True)
def _matmul_q3_k(w, xq, xd, out):
    n_rows = w.shape[0]
    n_tokens = xq.shape[0]
    n_blocks = xd.shape[1]
    for r in prange(n_rows):
        ws = np.empty(n_blocks * QK_K, dtype=np.int16)
        dw = np.empty(n_blocks, dtype=np.float32)
        sc = np.empty(16, dtype=np.int16)
        hm = np.empty(32, dtype=np.uint8)
        prod = np.empty(QK_K, dtype=np.int32)
        lanes = np.empty(8, dtype=np.int32)
        acc = np.empty(8, dtype=np.float32)
        for b in range(n_blocks):
            blk = w[r, b * Q3_K_BYTES : (b + 1) * Q3_K_BYTES]
            dw[b] = _f16(blk, 108)
            for s in range(8):  # scale s: low 4 bits in byte 96 + s % 8, high 2 bits in byte 104 + s % 4
                hi = np.int32(blk[104 + s % 4]) >> (2 * (s // 4))
                sc[s] = np.int16((np.int32(blk[96 + s]) & 0x0F) | ((hi & 3) << 4)) - 32
                sc[s + 8] = np.int16((np.int32(blk[96 + s]) >> 4) | (((hi >> 4) & 3) << 4)) - 32
            for l in range(32):
                hm[l] = blk[l]
            for j in range(2):
                qs = blk[32 + 32 * j : 64 + 32 * j]
                for k in range(4):
                    shift, hbit = 2 * k, 4 * j + k
                    s0, s1 = sc[8 * j + 2 * k], sc[8 * j + 2 * k + 1]
                    dst = ws[b * QK_K + 128 * j + 32 * k : b * QK_K + 128 * j + 32 * k + 32]
                    for l in range(32):
                        q = np.int16((qs[l] >> shift) & 3) - np.int16(4) + np.int16(((hm[l] >> hbit) & 1) << 2)
                        dst[l] = (s0 if l < 16 else s1) * q
        for t in range(n_tokens):
            acc[:] = 0.0
            for b in range(n_blocks):
                _lane_sums(ws[b * QK_K : (b + 1) * QK_K], xq[t, b * QK_K : (b + 1) * QK_K], prod, lanes)
                _fma_lanes(xd[t, b] * dw[b], lanes, acc)
            out[t, r] = _hsum8(acc[0], acc[1], acc[2], acc[3], acc[4], acc[5], acc[6], acc[7])


@njit(parallel=True, cache=True, nogil=True)
def _matmul_q2_k(w, xq, xd, xbs, out):
    n_rows = w.shape[0]
    n_tokens = xq.shape[0]
    n_blocks = xd.shape[1]
    for r in prange(n_rows):
        ws = np.empty(n_blocks * QK_K, dtype=np.int16)
        mins = np.empty(n_blocks * 16, dtype=np.int32)
        dw = np.empty(n_blocks, dtype=np.float32)
        mw = np.empty(n_blocks, dtype=np.float32)
        prod = np.empty(QK_K, dtype=np.int32)
        lanes = np.empty(8, dtype=np.int32)
        acc = np.empty(8, dtype=np.float32)
        for b in range(n_blocks):
            blk = w[r, b * Q2_K_BYTES : (b + 1) * Q2_K_BYTES]
            dw[b] = _f16(blk, 80)
            mw[b] = _f16(blk, 82)
            for s in range(16):
                mins[b * 16 + s] = np.int32(blk[s]) >> 4
            for j in range(2):
                qs = blk[16 + 32 * j : 48 + 32 * j]
                for k in range(4):
                    shift = 2 * k
                    s0 = np.int16(blk[8 * j + 2 * k] & 0x0F)
                    s1 = np.int16(blk[8 * j + 2 * k + 1] & 0x0F)
                    dst = ws[b * QK_K + 128 * j + 32 * k : b * QK_K + 128 * j + 32 * k + 32]
                    for l in range(32):
                        dst[l] = (s0 if l < 16 else s1) * np.int16((qs[l] >> shift) & 3)
        for t in range(n_tokens):
            acc[:] = 0.0
            for b in range(n_blocks):
                # the mins first: lane i = min[2i] * bsum[2i] + min[2i+1] * bsum[2i+1] (madd_epi16)
                for i in range(8):
                    m = b * 16 + 2 * i
                    lanes[i] = mins[m] * np.int32(xbs[t, m]) + mins[m + 1] * np.int32(xbs[t, m + 1])
                _fma_lanes(-xd[t, b] * mw[b], lanes, acc)
                # then the scaled quants
                _lane_sums(ws[b * QK_K : (b + 1) * QK_K], xq[t, b * QK_K : (b + 1) * QK_K], prod, lanes)
                _fma_lanes(xd[t, b] * dw[b], lanes, acc)
            out[t, r] = _hsum8(acc[0], acc[1], acc[2], acc[3], acc[4], acc[5], acc[6], acc[7])


def matmul_q3_k(w: np.ndarray, act: tuple[np.ndarray, ...], out: np.ndarray, vec_dot: bool = False) -> None:
    """out[t, r] = ggml_vec_dot_q3_K_q8_K(row r, token t); act = (qs, d, bsums) from quantize_q8_k."""
    xq, xd, _ = act
    _matmul_q3_k(_readonly(w), _readonly(xq), _readonly(xd), out)


def matmul_q2_k(w: np.ndarray, act: tuple[np.ndarray, ...], out: np.ndarray, vec_dot: bool = False) -> None:
    """out[t, r] = ggml_vec_dot_q2_K_q8_K(row r, token t); act = (qs, d, bsums) from quantize_q8_k."""
    xq, xd, xbs = act
    _matmul_q2_k(_readonly(w), _readonly(xq), _readonly(xd), _readonly(xbs), out)
