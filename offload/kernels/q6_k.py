"""Q6_K: 6-bit k-quant weights, dotted with Q8_K activations.

A 256-value super-block holds sixteen 16-value sub-blocks, each with an int8 scale, under
one f16 super-scale d: value = d * scales[s] * (q - 32), q in 0..63 split into 4 low bits
(`ql`) and 2 high bits (`qh`). Its byte order (ggml-common.h block_q6_K, 210 bytes):

    ql[128]      low nibbles. Half h (values 128h .. 128h+127) uses ql[64h .. 64h+63]:
                 value 128h + l      <- low nibble of ql[64h + l]       (l < 32)
                 value 128h + 32 + l <- low nibble of ql[64h + 32 + l]
                 value 128h + 64 + l <- high nibble of ql[64h + l]
                 value 128h + 96 + l <- high nibble of ql[64h + 32 + l]
    qh[64]       high bit pairs: value 128h + 32g + l takes bits 2g, 2g+1 of qh[32h + l]
    scales[16]   int8, sub-block s covers values 16s .. 16s+15
    d            f16

Q6_K is the most used k-quant (output layers and half of the ffn_down tensors of Q4_K_M
files), and llama.cpp computes it with ggml_vec_dot_q6_K_q8_K for any number of tokens
(no tinyBLAS path; the repacked Q6_K layouts are ARM-only), so the kernel below follows
that function's AVX2 branch exactly; see `_matmul_q6_k`.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from .formats import QK_K, BlockFormat
from .jit import njit, prange
from .numba_kernels import F16_TO_F32, _fma, _hsum8, _readonly

Q6_K_BYTES = 210
_QL, _QH, _SCALES, _D = 0, 128, 192, 208  # field offsets in a block


class Q6_KFormat(BlockFormat):
    """value 16s + i = d * scales[s] * (q - 32), computed as (d * scales[s]) * (q - 32) in float32."""

    name, ggml_type, block_size = "Q6_K", GGMLQuantizationType.Q6_K, QK_K
    layout = np.dtype([
        ("ql", "u1", QK_K // 2),  # 4 low bits of each q
        ("qh", "u1", QK_K // 4),  # 2 high bits of each q
        ("scales", "i1", QK_K // 16),  # one per 16 values
        ("d", "<f2"),  # super-block scale
    ])  # 210 bytes
    vec_dot_type = "Q8_K"

    def _dequantize_blocks(self, blocks: np.ndarray) -> np.ndarray:
        lead = blocks.shape
        # (d * scale) per sub-block, float32, as ggml's `d * sc[is]`
        d = blocks["d"].astype(np.float32)[..., None]
        sub_scale = d * blocks["scales"].astype(np.float32)  # (..., 16)
        # low 4 bits: per half, ql[0:32] low, ql[32:64] low, ql[0:32] high, ql[32:64] high
        ql = blocks["ql"].reshape(*lead, 2, 64)
        low4 = np.concatenate([ql & 0x0F, ql >> 4], axis=-1)  # (..., 2, 128)
        # high 2 bits: per half, bits 0-1, 2-3, 4-5, 6-7 of qh[0:32] for the four 32-value groups
        qh = blocks["qh"].reshape(*lead, 2, 1, 32)
        high2 = ((qh >> np.array([0, 2, 4, 6], dtype=np.uint8)[:, None]) & 0x03).reshape(*lead, 2, 128)
        q = (low4 | (high2 << 4)).astype(np.int8) - np.int8(32)  # -32 .. 31
        q = q.reshape(*lead, QK_K // 16, 16).astype(np.float32)
        return (sub_scale[..., None] * q).reshape(*lead, QK_K)


# -- the kernel -------------------------------------------------------------------------------
#
# ggml_vec_dot_q6_K_q8_K, AVX2 branch, per super-block i (Q8_K block: d, qs, bsums):
#   * the weights' q stay unsigned (0..63) in the products; the -32 is applied once per block
#     through the activations' bsums: q8sclsub lane k = 32 * (bsums[2k] * sc[2k] + bsums[2k+1] * sc[2k+1]).
#   * for each 128-value half and each of its four 32-value groups, maddubs + madd with the
#     group's scales leave int32 lane k = sum of scale * q * q8 over the group's values 4k .. 4k+3
#     (lanes 0-3 in the group's first sub-block, 4-7 in its second). sumi lane k sums these over
#     all eight groups, so lane k holds values 32c + 4k .. 32c + 4k + 3, c = 0..7, minus q8sclsub
#     lane k (which covers sub-blocks 2k, 2k+1: other values; the split matters for the float).
#   * all of that is exact int32; then acc[k] = fma(d, float(sumi[k]), acc[k]) with
#     d = y.d * f16(x.d) (a float32 product), i.e. eight float lanes across super-blocks,
#     and the result is hsum_float_8(acc). float(sumi[k]) is cvtepi32_ps: round to nearest,
#     which can round for |sumi[k]| > 2**24 (reachable with large scales and activations).
# Each row is decoded once into scale * q (int16, -8064..8001, value order) and reused by every
# token; per token and block the 256 exact products go to a scratch array, from which the
# eight lane sums are taken (the fastest arrangement Numba vectorizes that was tried).

@njit(inline="always")
def _decode_row(w, w_i8, f16, r, n_blocks, wq, sc, dw):
    """Row r: wq[v] = scales[v // 16] * q[v] (q unsigned, 0..63), sc = scales, dw = f16(d)."""
    for b in range(n_blocks):
        o = b * Q6_K_BYTES
        dw[b] = f16[np.int32(w[r, o + _D]) | (np.int32(w[r, o + _D + 1]) << 8)]
        for s in range(16):
            sc[b * 16 + s] = w_i8[r, o + _SCALES + s]
        for h in range(2):  # 128-value halves
            e = b * QK_K + 128 * h
            for half in range(2):  # l < 16 and l >= 16: sub-blocks 8h + 2g + half for group g
                s0 = b * 16 + 8 * h + half
                c0, c1 = np.int16(sc[s0]), np.int16(sc[s0 + 2])
                c2, c3 = np.int16(sc[s0 + 4]), np.int16(sc[s0 + 6])
                for l in range(16 * half, 16 * half + 16):
                    lo_a = np.int16(w[r, o + _QL + 64 * h + l])
                    lo_b = np.int16(w[r, o + _QL + 64 * h + 32 + l])
                    hb = np.int16(w[r, o + _QH + 32 * h + l])
                    wq[e + l] = ((lo_a & 0xF) | ((hb & 3) << 4)) * c0
                    wq[e + 32 + l] = ((lo_b & 0xF) | (((hb >> 2) & 3) << 4)) * c1
                    wq[e + 64 + l] = ((lo_a >> 4) | (((hb >> 4) & 3) << 4)) * c2
                    wq[e + 96 + l] = ((lo_b >> 4) | (((hb >> 6) & 3) << 4)) * c3


@njit(parallel=True, cache=True, nogil=True)
def _matmul_q6_k(w, w_i8, f16, xq, xd, xbs, out):
    """w and w_i8: the same row bytes as uint8 (ql, qh, d) and int8 (scales)."""
    n_rows = w.shape[0]
    n_blocks = xd.shape[1]
    n_tokens = xq.shape[0]
    for r in prange(n_rows):
        wq = np.empty(n_blocks * QK_K, dtype=np.int16)
        sc = np.empty(n_blocks * 16, dtype=np.int32)
        dw = np.empty(n_blocks, dtype=np.float32)
        _decode_row(w, w_i8, f16, r, n_blocks, wq, sc, dw)
        prod = np.empty(QK_K, dtype=np.int32)
        lanes = np.empty(8, dtype=np.int32)
        acc = np.empty(8, dtype=np.float32)
        for t in range(n_tokens):
            acc[:] = 0.0
            for b in range(n_blocks):
                e0 = b * QK_K
                for i in range(QK_K):
                    prod[i] = np.int32(wq[e0 + i]) * np.int32(xq[t, e0 + i])
                lanes[:] = 0
                for c in range(8):  # 32-value groups; lane k takes values 32c + 4k .. 32c + 4k + 3
                    for k in range(8):
                        o4 = 32 * c + 4 * k
                        lanes[k] += prod[o4] + prod[o4 + 1] + prod[o4 + 2] + prod[o4 + 3]
                d = xd[t, b] * dw[b]  # y.d * f16(x.d), float32
                for k in range(8):
                    sub = 32 * (np.int32(xbs[t, b * 16 + 2 * k]) * sc[b * 16 + 2 * k]
                                + np.int32(xbs[t, b * 16 + 2 * k + 1]) * sc[b * 16 + 2 * k + 1])
                    acc[k] = _fma(d, np.float32(lanes[k] - sub), acc[k])  # cvtepi32_ps, fmadd
            out[t, r] = _hsum8(acc[0], acc[1], acc[2], acc[3], acc[4], acc[5], acc[6], acc[7])


def matmul_q6_k(w: np.ndarray, act: tuple[np.ndarray, ...], out: np.ndarray, vec_dot: bool = False) -> None:
    """out[t, r] = ggml_vec_dot_q6_K_q8_K(row r, token t). act = (qs int8 (n, k), d float32
    (n, k/256), bsums int16 (n, k/16)) from quantize_q8_k. vec_dot is ignored: k-quants
    always take the vec_dot order."""
    xq, xd, xbs = act
    _matmul_q6_k(_readonly(w), _readonly(w, np.int8), F16_TO_F32, _readonly(xq), _readonly(xd), _readonly(xbs), out)
