"""Numba matmul kernels that read the GGUF blocks in place.

Every kernel computes out[t, r] = dot(row r of W, activations of token t), in parallel
over output rows with the tokens inside, so a row's blocks are decoded while they are in
L1. The caller converts the activations once per call (to F16/BF16-rounded floats or
Q8_0 blocks, see `formats.activation_ref`) and passes the output.

Summation order is part of the numerics, so it is spelled out: each kernel sums in the
order of llama.cpp's x86 AVX2 build (eight FMA lanes and ggml's horizontal reductions;
see the comments above each family), with no fastmath, so that results equal llama.cpp's
bit for bit (tests/test_kernels.py checks against ggml's exported dot products). Each
FMA is computed in float64 and rounded once, which is exact for these operands.

The public wrappers share one signature, `kernel(w, act, out, vec_dot)`: w the uint8 rows
(n_rows, row_bytes), act the tuple from the activation converter, out float32
(n_tokens, n_rows), vec_dot forcing ggml's one-row order for a batch (expert matmuls).
A faster (C, SIMD) kernel with the same signature and order can replace any of them in
`dispatch.KERNELS`.
"""

from __future__ import annotations

import numpy as np

from .jit import njit, prange
from .numba_intrinsics import fma32, round_f16

QK = 32  # values per Q8_0/Q4_0 block
Q8_0_BYTES = 34  # f16 d + 32 int8
Q4_0_BYTES = 18  # f16 d + 16 bytes of nibbles


def _readonly(a: np.ndarray, dtype: type | None = None) -> np.ndarray:
    """A read-only plain-ndarray view (no copy). Numba compiles one specialization per
    array type, and writability is part of it: passing every input read-only means
    memmapped weights and freshly computed arrays share one compiled kernel."""
    v = np.asarray(a).view(dtype) if dtype is not None else np.asarray(a).view()
    v.flags.writeable = False
    return v


# Lookup tables from 16-bit patterns to float32, as ggml's ggml_table_f32_f16.
F16_TO_F32 = _readonly(np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32))
BF16_TO_F32 = _readonly((np.arange(1 << 16, dtype=np.uint32) << 16).view(np.float32))


# -- activation conversion --------------------------------------------------------------

@njit(inline="always")
def _to_int8(v):
    """float -> int8 as the C twins' to_int8 (cext/quantize.c): in range, truncation; NaN and
    infinities (from a block whose largest value is below ~4e-37) give 0. A bare np.int8(v)
    is LLVM's fptosi, undefined out of range: vectorized, it gives -128 instead."""
    return np.int8(v) if v >= np.float32(-128.0) and v <= np.float32(127.0) else np.int8(0)


@njit(cache=True, nogil=True)
def _quantize_q8_0(x, qs, d):
    """Fill qs (n, k) int8 and d (n, k/32) float32 (scale before fp16 rounding) from x,
    as ggml's x86 quantize_row_q8_0: id = 127/amax, round half to even."""
    n, k = x.shape
    for t in range(n):
        for b in range(k // QK):
            base = b * QK
            amax = np.float32(0.0)
            for j in range(QK):
                a = abs(x[t, base + j])
                if a > amax:
                    amax = a
            d[t, b] = round_f16(amax / np.float32(127.0))  # stored as fp16
            inv = np.float32(127.0) / amax if amax != np.float32(0.0) else np.float32(0.0)
            for j in range(QK):
                qs[t, base + j] = _to_int8(np.rint(x[t, base + j] * inv))


def quantize_q8_0(x: np.ndarray, out: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fast twin of `formats.quantize_q8_0_ref`: float32 (n, k) -> (qs int8 (n, k), d float32 (n, k/32)),
    into `out` when given."""
    n, k = x.shape
    if out is None:
        out = np.empty((n, k), dtype=np.int8), np.empty((n, k // QK), dtype=np.float32)
    _quantize_q8_0(x, *out)
    return out


@njit(cache=True, nogil=True, error_model="numpy")  # an infinite activation gives d = -inf, as in C, not an exception
def _quantize_q8_k(x, qs, d, bsums):
    n, k = x.shape
    for t in range(n):
        for b in range(k // 256):
            base = b * 256
            amax = np.float32(0.0)
            vmax = np.float32(0.0)
            for j in range(256):
                a = abs(x[t, base + j])
                if a > amax:
                    amax = a
                    vmax = x[t, base + j]
            if amax == np.float32(0.0):
                d[t, b] = 0.0
                for j in range(256):
                    qs[t, base + j] = 0
                for g in range(16):
                    bsums[t, b * 16 + g] = 0
                continue
            iscale = np.float32(-127.0) / vmax
            for j in range(256):
                q = np.rint(iscale * x[t, base + j])
                qs[t, base + j] = _to_int8(min(q, 127.0))
            for g in range(16):
                s = 0
                for j in range(16):
                    s += qs[t, base + g * 16 + j]
                bsums[t, b * 16 + g] = s
            d[t, b] = np.float32(1.0) / iscale


def quantize_q8_k(x: np.ndarray, out: tuple | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fast twin of `formats.quantize_q8_k_ref`: (qs int8 (n, k), d float32 (n, k/256), bsums int16 (n, k/16)),
    into `out` when given."""
    n, k = x.shape
    if out is None:
        out = (np.empty((n, k), dtype=np.int8), np.empty((n, k // 256), dtype=np.float32),
               np.empty((n, k // 16), dtype=np.int16))
    _quantize_q8_k(x, *out)
    return out


# -- float weights -------------------------------------------------------------------------

# Summation orders of llama.cpp's x86 AVX2 float dot products (weights and activations
# decoded to float32 first; every product is exact for F16 and BF16):
#  GEMM8   llamafile's tinyBLAS, used by ggml's mul_mat for batches of 2+ tokens when the
#          row length is a multiple of 8: lane i accumulates elements 8m+i with FMA,
#          then the lanes are reduced as hsum_float_8.
#  VECDOT  ggml_vec_dot_f32 / _f16 (one token, and every expert matmul: mul_mat_id):
#          four 8-lane FMA accumulators over chunks of 32, reduced (0+2)+(1+3) lane-wise,
#          then across lanes with two hadds; the tail (n % 32) is added one by one.
#  VECDOT_BF16  ggml_vec_dot_bf16: the same accumulators, reduced across lanes as hsum_float_8.
GEMM8, VECDOT, VECDOT_BF16 = 0, 1, 2


@njit(inline="always")
def _fma(a, b, c):
    """float32 fused multiply-add (one rounding): exact in float64 for these operands."""
    return np.float32(np.float64(a) * np.float64(b) + np.float64(c))


@njit(inline="always")
def _hsum8(l0, l1, l2, l3, l4, l5, l6, l7):
    """ggml's hsum_float_8: fold the high 128 bits onto the low, then (0+2) + (1+3)."""
    a0, a1, a2, a3 = l4 + l0, l5 + l1, l6 + l2, l7 + l3
    return (a0 + a2) + (a1 + a3)


@njit(inline="always")
def _float_dot(wrow, x, t, mode, double_tail, acc):
    """Dot of a decoded weight row with activation row t in one of the orders above. A true
    FMA (fma32): float weights and activations are any floats, for which a float64 multiply-add
    rounded twice is not always ggml's one rounding."""
    n = x.shape[1]
    acc[:] = 0.0
    if mode == GEMM8:
        for c in range(n):
            acc[c % 8] = fma32(wrow[c], x[t, c], acc[c % 8])
        return _hsum8(acc[0], acc[1], acc[2], acc[3], acc[4], acc[5], acc[6], acc[7])
    main = n - n % 32
    for c in range(main):
        acc[c % 32] = fma32(wrow[c], x[t, c], acc[c % 32])
    for i in range(8):  # fold the four accumulators: lane i needs only lanes i, 8+i, 16+i, 24+i
        acc[i] = (acc[i] + acc[16 + i]) + (acc[8 + i] + acc[24 + i])
    if mode == VECDOT_BF16:
        total = np.float64(_hsum8(acc[0], acc[1], acc[2], acc[3], acc[4], acc[5], acc[6], acc[7]))
    else:
        t0, t1, t2, t3 = acc[0] + acc[4], acc[1] + acc[5], acc[2] + acc[6], acc[3] + acc[7]
        total = np.float64((t0 + t1) + (t2 + t3))
    if double_tail:  # vec_dot_f16 / _bf16 keep the sum in double
        for c in range(main, n):
            total += np.float64(wrow[c] * x[t, c])
        return np.float32(total)
    tail = np.float32(total)  # vec_dot_f32 keeps a float, and rounds each tail product
    for c in range(main, n):
        tail += wrow[c] * x[t, c]
    return tail


@njit(parallel=True, cache=True, nogil=True)
def _matmul_f32(w, x, out, mode):
    for r in prange(w.shape[0]):
        acc = np.empty(32, dtype=np.float32)
        for t in range(x.shape[0]):
            out[t, r] = _float_dot(w[r], x, t, mode, False, acc)


@njit(parallel=True, cache=True, nogil=True)
def _matmul_16bit(w_bits, table, x, out, mode):
    """F16 or BF16 weights (uint16 patterns decoded through `table`, a row at a time)."""
    n_rows, n_cols = w_bits.shape
    for r in prange(n_rows):
        acc = np.empty(32, dtype=np.float32)
        wrow = np.empty(n_cols, dtype=np.float32)
        for c in range(n_cols):
            wrow[c] = table[w_bits[r, c]]
        for t in range(x.shape[0]):
            out[t, r] = _float_dot(wrow, x, t, mode, True, acc)


# Small float matmuls (routers: n_expert rows) cost less than waking the thread pool:
# these run them on the calling thread. (Separate functions, not njit(py_func): Numba's
# on-disk cache tells functions apart by name and line.)
SERIAL_BELOW = 1 << 16  # multiply-adds


@njit(cache=True, nogil=True)
def _matmul_f32_serial(w, x, out, mode):
    acc = np.empty(32, dtype=np.float32)
    for r in range(w.shape[0]):
        for t in range(x.shape[0]):
            out[t, r] = _float_dot(w[r], x, t, mode, False, acc)


@njit(cache=True, nogil=True)
def _matmul_16bit_serial(w_bits, table, x, out, mode):
    n_rows, n_cols = w_bits.shape
    acc = np.empty(32, dtype=np.float32)
    wrow = np.empty(n_cols, dtype=np.float32)
    for r in range(n_rows):
        for c in range(n_cols):
            wrow[c] = table[w_bits[r, c]]
        for t in range(x.shape[0]):
            out[t, r] = _float_dot(wrow, x, t, mode, True, acc)


def float_order(x: np.ndarray, n_rows: int, vec_dot: bool, bf16: bool = False) -> int:
    """tinyBLAS takes batches of 2+ tokens when rows % 4 == 0 and the row length % 8 == 0."""
    if x.shape[0] >= 2 and not vec_dot and n_rows % 4 == 0 and x.shape[1] % 8 == 0:
        return GEMM8
    return VECDOT_BF16 if bf16 else VECDOT


def matmul_f32(w: np.ndarray, act: tuple[np.ndarray, ...], out: np.ndarray, vec_dot: bool = False) -> None:
    (x,) = act
    run = _matmul_f32_serial if out.size * x.shape[1] < SERIAL_BELOW else _matmul_f32
    run(_readonly(w, np.float32), _readonly(x), out, float_order(x, out.shape[1], vec_dot))


def matmul_f16(w: np.ndarray, act: tuple[np.ndarray, ...], out: np.ndarray, vec_dot: bool = False) -> None:
    (x,) = act  # F16-rounded float32
    run = _matmul_16bit_serial if out.size * x.shape[1] < SERIAL_BELOW else _matmul_16bit
    run(_readonly(w, np.uint16), F16_TO_F32, _readonly(x), out, float_order(x, out.shape[1], vec_dot))


def matmul_bf16(w: np.ndarray, act: tuple[np.ndarray, ...], out: np.ndarray, vec_dot: bool = False) -> None:
    (x,) = act  # BF16-rounded float32
    run = _matmul_16bit_serial if out.size * x.shape[1] < SERIAL_BELOW else _matmul_16bit
    run(_readonly(w, np.uint16), BF16_TO_F32, _readonly(x), out, float_order(x, out.shape[1], vec_dot, bf16=True))


# -- block-quantized weights x Q8_0 activations ------------------------------------------------
#
# Summation order as ggml's AVX2 `ggml_vec_dot_q{4,8}_0_q8_0` and llamafile's tinyBLAS_Q0_AVX
# (the batched path), which agree: per 32-value block, eight int32 lanes each sum four
# consecutive products (maddubs + madd), then lane[i] = fma(d_w * d_x, float(lane_sum[i]),
# lane[i]) across blocks, and the eight lanes are reduced as hsum_float_8 does. Matching
# it to the bit matters: the next matmul re-quantizes these outputs, and a one-ulp
# difference can flip a rounding and with it, in an MoE model, an expert choice.

@njit(inline="always")
def _q8_lane(w_i8, r, o, xq, t, base, lane):
    """Exact int sum of the four products of one lane (elements 4*lane .. 4*lane+3)."""
    acc = 0
    for j in range(4 * lane, 4 * lane + 4):
        acc += np.int32(w_i8[r, o + j]) * np.int32(xq[t, base + j])
    return np.float32(acc)


@njit(inline="always")
def _q4_lane(w, r, o, xq, t, base, lane, high):
    """Lanes 0-3: low nibbles of bytes 4*lane.., elements 4*lane..; lanes 4-7: high nibbles, elements 16+4*lane.."""
    acc = 0
    for j in range(4 * lane, 4 * lane + 4):
        byte = np.int32(w[r, o + j])
        if high:
            acc += ((byte >> 4) - 8) * np.int32(xq[t, base + j + QK // 2])
        else:
            acc += ((byte & 0x0F) - 8) * np.int32(xq[t, base + j])
    return np.float32(acc)


@njit(parallel=True, cache=True, nogil=True)
def _matmul_q8_0(w, w_i8, f16, xq, xd, out):
    """w and w_i8: the same bytes as uint8 (for the f16 scale) and int8 (for qs)."""
    n_rows = w.shape[0]
    n_blocks = xd.shape[1]
    for r in prange(n_rows):
        for t in range(xq.shape[0]):
            l0 = l1 = l2 = l3 = l4 = l5 = l6 = l7 = np.float32(0.0)
            for b in range(n_blocks):
                o = b * Q8_0_BYTES + 2
                base = b * QK
                d = f16[w[r, o - 2] | (w[r, o - 1] << 8)] * xd[t, b]
                l0 = _fma(d, _q8_lane(w_i8, r, o, xq, t, base, 0), l0)
                l1 = _fma(d, _q8_lane(w_i8, r, o, xq, t, base, 1), l1)
                l2 = _fma(d, _q8_lane(w_i8, r, o, xq, t, base, 2), l2)
                l3 = _fma(d, _q8_lane(w_i8, r, o, xq, t, base, 3), l3)
                l4 = _fma(d, _q8_lane(w_i8, r, o, xq, t, base, 4), l4)
                l5 = _fma(d, _q8_lane(w_i8, r, o, xq, t, base, 5), l5)
                l6 = _fma(d, _q8_lane(w_i8, r, o, xq, t, base, 6), l6)
                l7 = _fma(d, _q8_lane(w_i8, r, o, xq, t, base, 7), l7)
            out[t, r] = _hsum8(l0, l1, l2, l3, l4, l5, l6, l7)


@njit(parallel=True, cache=True, nogil=True)
def _matmul_q4_0(w, f16, xq, xd, out):
    """Q4_0 block: element j < 16 is the low nibble of byte j, element j + 16 its high nibble
    (minus 8), so lanes 0-3 read low nibbles and lanes 4-7 high nibbles, in element order."""
    n_rows = w.shape[0]
    n_blocks = xd.shape[1]
    for r in prange(n_rows):
        for t in range(xq.shape[0]):
            l0 = l1 = l2 = l3 = l4 = l5 = l6 = l7 = np.float32(0.0)
            for b in range(n_blocks):
                o = b * Q4_0_BYTES + 2
                base = b * QK
                d = f16[w[r, o - 2] | (w[r, o - 1] << 8)] * xd[t, b]
                l0 = _fma(d, _q4_lane(w, r, o, xq, t, base, 0, False), l0)
                l1 = _fma(d, _q4_lane(w, r, o, xq, t, base, 1, False), l1)
                l2 = _fma(d, _q4_lane(w, r, o, xq, t, base, 2, False), l2)
                l3 = _fma(d, _q4_lane(w, r, o, xq, t, base, 3, False), l3)
                l4 = _fma(d, _q4_lane(w, r, o, xq, t, base, 0, True), l4)
                l5 = _fma(d, _q4_lane(w, r, o, xq, t, base, 1, True), l5)
                l6 = _fma(d, _q4_lane(w, r, o, xq, t, base, 2, True), l6)
                l7 = _fma(d, _q4_lane(w, r, o, xq, t, base, 3, True), l7)
            out[t, r] = _hsum8(l0, l1, l2, l3, l4, l5, l6, l7)


def matmul_q8_0(w: np.ndarray, act: tuple[np.ndarray, ...], out: np.ndarray, vec_dot: bool = False) -> None:
    xq, xd = act
    _matmul_q8_0(_readonly(w), _readonly(w, np.int8), F16_TO_F32, _readonly(xq), _readonly(xd), out)


def matmul_q4_0(w: np.ndarray, act: tuple[np.ndarray, ...], out: np.ndarray, vec_dot: bool = False) -> None:
    xq, xd = act
    _matmul_q4_0(_readonly(w), F16_TO_F32, _readonly(xq), _readonly(xd), out)
