"""The legacy 32-value formats Q4_1, Q5_0 and Q5_1, and the Q8_1 activations they pair with.

Formats (one block = 32 values; layouts as ggml-common.h):

* Q4_1 `{d f16, m f16, qs[16]}`:          value j = d * q_j + m, q_j a 4-bit nibble (0..15)
* Q5_0 `{d f16, qh[4], qs[16]}`:          value j = d * (q_j - 16), q_j = nibble | bit j of qh << 4
* Q5_1 `{d f16, m f16, qh[4], qs[16]}`:   value j = d * q_j + m,    q_j = nibble | bit j of qh << 4

Nibbles: element j < 16 is the low nibble of qs[j], element j + 16 its high nibble; qh is
a little-endian uint32 whose bit j is the fifth bit of element j.

Activations: ggml converts them to Q8_0 blocks for Q5_0 and to Q8_1 blocks for Q4_1/Q5_1.
Q8_1 is Q8_0 plus `s`, the fp16 of d * sum(qs) (d the float32 scale before its own fp16
rounding), which the dot product multiplies by the weight block's min m.

Summation orders (ggml's x86 AVX2 `ggml_vec_dot_*`; no AVX-512/VNNI on the target):

* Q5_0 x Q8_0: as Q4_0: per block, eight int32 lanes each sum four consecutive products
  (lane i = elements 4i..4i+3), lane[i] = fma(d_w * d_x, float(lane_sum[i]), lane[i]); the
  result is hsum_float_8(lanes). llamafile's tinyBLAS_Q0_AVX (ggml's mul_mat for 2+ tokens,
  no size conditions for Q5_0 besides n_tokens >= 2) computes every output in exactly the
  same order (same lanes, same d_w * d_x product, fmadd, the same hsum), so one order serves
  both paths and `vec_dot` changes nothing.
* Q4_1 x Q8_1 and Q5_1 x Q8_1: the same eight FMA lanes with (d_w * d_x) and the unsigned
  weight quants, plus a scalar summs = fma(m_w, s_x, summs) per block (the C source says
  `summs += m * s`; the shipped build contracts it into vfmadd231ss, which gives the same
  result here: m and s are fp16 values, so m * s is exact in float32), and the result is
  hsum_float_8(lanes) + summs. Neither format goes through tinyBLAS (llamafile_sgemm has no
  Q4_1/Q5_1 case): ggml uses vec_dot for every batch size. cext/q4_1_q5_1.c has the C twins.

Integer parts are exact in any order (ggml's maddubs never saturates here: |pair sums| <=
2 * 31 * 128), so the kernels first take every block's eight lane sums, then run the float
lanes.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from .formats import QK8_0, BlockFormat
from .jit import njit, prange
from .numba_kernels import F16_TO_F32, _fma, _hsum8, _readonly

QK = QK8_0  # values per block, in all three formats and in Q8_0/Q8_1
Q4_1_BYTES = 20  # d, m, 16 bytes of nibbles
Q5_0_BYTES = 22  # d, qh[4], 16 bytes of nibbles
Q5_1_BYTES = 24  # d, m, qh[4], 16 bytes of nibbles


# -- formats (numpy references) ----------------------------------------------------------------

def _nibbles(qs: np.ndarray) -> np.ndarray:
    """uint8 (..., 16) -> (..., 32): low nibbles (elements 0..15), then high nibbles (16..31)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """uint8 (..., 4), a little-endian uint32 -> (..., 32) of its bits, bit j for element j."""
    return np.unpackbits(qh, axis=-1, bitorder="little")


class Q4_1Format(BlockFormat):
    """value j = d * q_j + m, q_j the 4-bit nibble of element j."""

    name, ggml_type, block_size = "Q4_1", GGMLQuantizationType.Q4_1, QK
    layout = np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", QK // 2)])  # 20 bytes
    vec_dot_type = "Q8_1"

    def _dequantize_blocks(self, blocks: np.ndarray) -> np.ndarray:
        d = blocks["d"].astype(np.float32)[..., None]
        m = blocks["m"].astype(np.float32)[..., None]
        q = _nibbles(blocks["qs"]).astype(np.float32)
        return d * q + m  # two roundings, as ggml's dequantize_row_q4_1 and gguf-py


class Q5_0Format(BlockFormat):
    """value j = d * (q_j - 16), q_j = nibble | (bit j of qh) << 4."""

    name, ggml_type, block_size = "Q5_0", GGMLQuantizationType.Q5_0, QK
    layout = np.dtype([("d", "<f2"), ("qh", "u1", 4), ("qs", "u1", QK // 2)])  # 22 bytes
    vec_dot_type = "Q8_0"

    def _dequantize_blocks(self, blocks: np.ndarray) -> np.ndarray:
        d = blocks["d"].astype(np.float32)[..., None]
        q = _nibbles(blocks["qs"]) | (_high_bits(blocks["qh"]) << 4)
        return d * (q.astype(np.float32) - np.float32(16))


class Q5_1Format(BlockFormat):
    """value j = d * q_j + m, q_j = nibble | (bit j of qh) << 4."""

    name, ggml_type, block_size = "Q5_1", GGMLQuantizationType.Q5_1, QK
    layout = np.dtype([("d", "<f2"), ("m", "<f2"), ("qh", "u1", 4), ("qs", "u1", QK // 2)])  # 24 bytes
    vec_dot_type = "Q8_1"

    def _dequantize_blocks(self, blocks: np.ndarray) -> np.ndarray:
        d = blocks["d"].astype(np.float32)[..., None]
        m = blocks["m"].astype(np.float32)[..., None]
        q = _nibbles(blocks["qs"]) | (_high_bits(blocks["qh"]) << 4)
        return d * q.astype(np.float32) + m


# -- Q8_1 activations ------------------------------------------------------------------------------

def quantize_q8_1_ref(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Activations -> Q8_1 blocks, as ggml's x86 AVX2 `quantize_row_q8_1`.

    x: float32 (n, k), k a multiple of 32. Returns qs int8 (n, k), d float32 (n, k/32) and
    s float32 (n, k/32), d and s being the fp16 values stored in the blocks. As Q8_0:
    d = amax / 127, qs = round-half-even(x * (127 / amax)); then s = fp16(d * sum(qs)) with
    d the float32 scale (before fp16 rounding) and the sum taken over the rounded ints.
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] % QK:
        raise ValueError(f"expected float32 (n, k) with k a multiple of {QK}, got {x.shape}")
    blocks = x.reshape(x.shape[0], -1, QK)
    amax = np.abs(blocks).max(axis=-1)
    d = amax / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(amax != 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    qs = np.rint(blocks * inv[..., None]).astype(np.int8)
    total = qs.astype(np.int32).sum(axis=-1).astype(np.float32)
    with np.errstate(over="ignore"):
        s16 = (d * total).astype(np.float16).astype(np.float32)
        d16 = d.astype(np.float16).astype(np.float32)
    return qs.reshape(x.shape), d16, s16


@njit(cache=True, nogil=True)
def _quantize_q8_1(x, qs, d, s):
    """Fill qs, d and s (float32, before fp16 rounding) as ggml's x86 quantize_row_q8_1."""
    n, k = x.shape
    for t in range(n):
        for b in range(k // QK):
            base = b * QK
            amax = np.float32(0.0)
            for j in range(QK):
                a = abs(x[t, base + j])
                if a > amax:
                    amax = a
            db = amax / np.float32(127.0)
            inv = np.float32(127.0) / amax if amax != np.float32(0.0) else np.float32(0.0)
            total = 0
            for j in range(QK):
                q = np.int8(np.rint(x[t, base + j] * inv))
                qs[t, base + j] = q
                total += np.int32(q)
            d[t, b] = db
            s[t, b] = db * np.float32(total)


def quantize_q8_1(x: np.ndarray, out: tuple[np.ndarray, ...] | None = None) -> tuple[np.ndarray, ...]:
    """Fast twin of `quantize_q8_1_ref`: float32 (n, k) -> (qs int8 (n, k), d, s float32 (n, k/32)),
    into `out` when given (cext/quantize.c's quantize_row_q8_1 is the C twin)."""
    n, k = x.shape
    if out is None:
        out = np.empty((n, k), np.int8), np.empty((n, k // QK), np.float32), np.empty((n, k // QK), np.float32)
    qs, d, s = out
    _quantize_q8_1(_readonly(x), qs, d, s)
    with np.errstate(over="ignore"):  # the stored d and s are fp16
        d[...] = d.astype(np.float16)
        s[...] = s.astype(np.float16)
    return out


def activation_q8_1_ref(x: np.ndarray) -> np.ndarray:
    """The values a Q4_1/Q5_1 dot product sees for activations x: qs * d. (Its weight-offset
    term uses s instead of d * sum(qs), see `quantize_q8_1_ref`.)"""
    qs, d, _ = quantize_q8_1_ref(x)
    return (qs.reshape(len(qs), -1, QK) * d[..., None]).reshape(qs.shape)


# -- kernels -------------------------------------------------------------------------------------------
#
# Each row is decoded once (quants to int8, scales and mins to float32 through ggml's fp16
# table) into per-thread buffers, then dotted with every token in ggml's order.

@njit(inline="always")
def _lanes_dot(q, dw, x, xd, lanes):
    """sum over blocks of (dw * xd) * int dot of q and x (one token's quants), in ggml's
    eight FMA lanes (lane i: elements 4i..4i+3 of each block); returns their hsum_float_8.
    The exact int lane sums of all blocks go first into `lanes` (a loop LLVM vectorizes)."""
    for k in range(lanes.shape[0]):
        o = 4 * k
        lanes[k] = (np.int32(q[o]) * np.int32(x[o]) + np.int32(q[o + 1]) * np.int32(x[o + 1])) + (
            np.int32(q[o + 2]) * np.int32(x[o + 2]) + np.int32(q[o + 3]) * np.int32(x[o + 3])
        )
    l0 = l1 = l2 = l3 = l4 = l5 = l6 = l7 = np.float32(0.0)
    for b in range(dw.shape[0]):
        d = dw[b] * xd[b]
        o = 8 * b
        l0 = _fma(d, np.float32(lanes[o]), l0)
        l1 = _fma(d, np.float32(lanes[o + 1]), l1)
        l2 = _fma(d, np.float32(lanes[o + 2]), l2)
        l3 = _fma(d, np.float32(lanes[o + 3]), l3)
        l4 = _fma(d, np.float32(lanes[o + 4]), l4)
        l5 = _fma(d, np.float32(lanes[o + 5]), l5)
        l6 = _fma(d, np.float32(lanes[o + 6]), l6)
        l7 = _fma(d, np.float32(lanes[o + 7]), l7)
    return _hsum8(l0, l1, l2, l3, l4, l5, l6, l7)


@njit(inline="always")
def _f16(w, r, o, f16):
    return f16[np.int32(w[r, o]) | (np.int32(w[r, o + 1]) << 8)]


# Unpacking a block's quants 8 at a time in uint64 words (SWAR): byte i of a word is element i.
_U = np.uint64
_LOW_NIBBLES = _U(0x0F0F0F0F0F0F0F0F)
_SPREAD = _U(0x0101010101010101)
_BIT_I_OF_BYTE_I = _U(0x8040201008040201)
_SEVENS = _U(0x7F7F7F7F7F7F7F7F)
_HIGH_BITS = _U(0x8080808080808080)
Q4_1_KIND, Q5_0_KIND, Q5_1_KIND = 0, 1, 2


@njit(inline="always")
def _bits_to_bytes(hb):
    """One qh byte -> a word whose byte i is 0x80 if bit i of hb is set, else 0."""
    x = (_U(hb) * _SPREAD) & _BIT_I_OF_BYTE_I  # byte i keeps bit i only
    return (x + _SEVENS) & _HIGH_BITS  # 2**i + 0x7F sets bit 7 (and never carries out)


@njit(inline="always")
def _unpack(w, r, o_qs, o_qh, kind, q64, word):
    """The 32 quants of a block into q64[word:word + 4] (int8 bytes, element order):
    Q4_1 the nibble (0..15), Q5_1 nibble | bit << 4 (0..31), Q5_0 that minus 16 (-16..15,
    formed as ggml does: nibble | (bit ? 0 : 0xF0))."""
    lo = _U(0)
    hi = _U(0)
    for k in range(8):
        lo |= _U(w[r, o_qs + k]) << _U(8 * k)
        hi |= _U(w[r, o_qs + 8 + k]) << _U(8 * k)
    # elements 0-7, 8-15: low nibbles of bytes 0-7, 8-15; elements 16-23, 24-31: high nibbles
    nibbles = (lo & _LOW_NIBBLES, hi & _LOW_NIBBLES, (lo >> _U(4)) & _LOW_NIBBLES, (hi >> _U(4)) & _LOW_NIBBLES)
    for k in range(4):
        v = nibbles[k]
        if kind != Q4_1_KIND:
            set80 = _bits_to_bytes(w[r, o_qh + k])  # qh byte k holds the fifth bits of elements 8k..8k+7
            if kind == Q5_1_KIND:
                v |= set80 >> _U(3)  # 0x10 where the bit is set
            else:
                v |= ((set80 ^ _HIGH_BITS) >> _U(7)) * _U(0xF0)  # 0xF0 where it is clear
        q64[word + k] = v


@njit(parallel=True, cache=True, nogil=True)
def _matmul_q5_0(w, f16, xq, xd, out):
    n_rows = w.shape[0]
    n_blocks = xd.shape[1]
    for r in prange(n_rows):
        q64 = np.empty(n_blocks * 4, dtype=np.uint64)
        q = q64.view(np.int8)
        lanes = np.empty(n_blocks * 8, dtype=np.int32)
        dw = np.empty(n_blocks, dtype=np.float32)
        for b in range(n_blocks):  # d, qh[4], qs[16]
            o = b * Q5_0_BYTES
            dw[b] = _f16(w, r, o, f16)
            _unpack(w, r, o + 6, o + 2, Q5_0_KIND, q64, b * 4)
        for t in range(xq.shape[0]):
            out[t, r] = _lanes_dot(q, dw, xq[t], xd[t], lanes)


@njit(inline="always")
def _dot_with_mins(q, dw, mw, x, xd, xs, lanes):
    summs = np.float32(0.0)
    for b in range(dw.shape[0]):
        summs = _fma(mw[b], xs[b], summs)  # exact either way: m and s are fp16, so m * s is exact
    return _lanes_dot(q, dw, x, xd, lanes) + summs


@njit(parallel=True, cache=True, nogil=True)
def _matmul_q4_1(w, f16, xq, xd, xs, out):
    n_rows = w.shape[0]
    n_blocks = xd.shape[1]
    for r in prange(n_rows):
        q64 = np.empty(n_blocks * 4, dtype=np.uint64)
        q = q64.view(np.int8)
        lanes = np.empty(n_blocks * 8, dtype=np.int32)
        dw = np.empty(n_blocks, dtype=np.float32)
        mw = np.empty(n_blocks, dtype=np.float32)
        for b in range(n_blocks):  # d, m, qs[16]
            o = b * Q4_1_BYTES
            dw[b] = _f16(w, r, o, f16)
            mw[b] = _f16(w, r, o + 2, f16)
            _unpack(w, r, o + 4, 0, Q4_1_KIND, q64, b * 4)
        for t in range(xq.shape[0]):
            out[t, r] = _dot_with_mins(q, dw, mw, xq[t], xd[t], xs[t], lanes)


@njit(parallel=True, cache=True, nogil=True)
def _matmul_q5_1(w, f16, xq, xd, xs, out):
    n_rows = w.shape[0]
    n_blocks = xd.shape[1]
    for r in prange(n_rows):
        q64 = np.empty(n_blocks * 4, dtype=np.uint64)
        q = q64.view(np.int8)
        lanes = np.empty(n_blocks * 8, dtype=np.int32)
        dw = np.empty(n_blocks, dtype=np.float32)
        mw = np.empty(n_blocks, dtype=np.float32)
        for b in range(n_blocks):  # d, m, qh[4], qs[16]
            o = b * Q5_1_BYTES
            dw[b] = _f16(w, r, o, f16)
            mw[b] = _f16(w, r, o + 2, f16)
            _unpack(w, r, o + 8, o + 4, Q5_1_KIND, q64, b * 4)
        for t in range(xq.shape[0]):
            out[t, r] = _dot_with_mins(q, dw, mw, xq[t], xd[t], xs[t], lanes)


def matmul_q5_0(w: np.ndarray, act: tuple[np.ndarray, ...], out: np.ndarray, vec_dot: bool = False) -> None:
    """Q5_0 rows x Q8_0 activations (qs, d). vec_dot is accepted for the common signature:
    ggml's vec_dot and tinyBLAS sum each output in the same order."""
    xq, xd = act
    _matmul_q5_0(_readonly(w), F16_TO_F32, _readonly(xq), _readonly(xd), out)


def matmul_q4_1(w: np.ndarray, act: tuple[np.ndarray, ...], out: np.ndarray, vec_dot: bool = False) -> None:
    """Q4_1 rows x Q8_1 activations (qs, d, s); one order for every batch (ggml uses vec_dot)."""
    xq, xd, xs = act
    _matmul_q4_1(_readonly(w), F16_TO_F32, _readonly(xq), _readonly(xd), _readonly(xs), out)


def matmul_q5_1(w: np.ndarray, act: tuple[np.ndarray, ...], out: np.ndarray, vec_dot: bool = False) -> None:
    """Q5_1 rows x Q8_1 activations (qs, d, s); one order for every batch (ggml uses vec_dot)."""
    xq, xd, xs = act
    _matmul_q5_1(_readonly(w), F16_TO_F32, _readonly(xq), _readonly(xd), _readonly(xs), out)

