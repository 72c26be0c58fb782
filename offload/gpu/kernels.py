"""CUDA GEMV kernels (Numba) that decode GGUF blocks inside the dot product.

Each kernel is a line-by-line port of the CPU kernel of its format (offload/kernels/), in
the same summation order: the CPU kernels reproduce ggml's AVX2 order, eight float lanes
per row (lane L takes elements 4L..4L+3 of every 32-value group, accumulated block after
block with an FMA computed in float64 and rounded once), reduced as hsum_float_8. Here
the eight lanes of a row are eight threads, each running its lane's sequence exactly as
the CPU does, and lane 0 reduces them in hsum_float_8's order. The integer block sums
are exact, so the order within them does not matter. Hence the GPU result equals the
CPU path's bit for bit, given the same quantized activations (the caller converts them
on the host with the CPU converters and copies those few bytes over).

Float multiply-adds are written as float64 products rounded to float32 (as the CPU
kernels' `_fma` does) so that the compiler has no float32 a*b+c to contract into an FMA
of its own.

Served: F32, F16 (ggml's vec_dot order), Q8_0, Q4_0 (any batch: ggml's batched path
sums in the same order), Q4_K and Q6_K (vec_dot order: batches under 8 tokens). Which
calls may run here is `vram.serves()`; the rest stay on the CPU. References: each kernel is
checked against its CPU twin and against `offload.kernels.matmul_ref` (numpy, float64).

Layout of a launch: block = (8 lanes, up to ROWS rows), grid = (row blocks, n_tokens).
"""

from __future__ import annotations

import math

import numpy as np
from gguf import GGMLQuantizationType as T
from numba import cuda, float32, float64, int32

from ..kernels.numba_kernels import F16_TO_F32
from .vram import GPU_TYPES

ROWS = 16  # rows per thread block (x 8 lanes = 128 threads)
LANES = 8


@cuda.jit(device=True, inline=True)
def _fma(a, b, c):
    return float32(float64(a) * float64(b) + float64(c))


@cuda.jit(device=True, inline=True)
def _hsum8(l0, l1, l2, l3, l4, l5, l6, l7):
    a0, a1, a2, a3 = l4 + l0, l5 + l1, l6 + l2, l7 + l3
    return (a0 + a2) + (a1 + a3)


@cuda.jit(device=True, inline=True)
def _f16(table, lo, hi):
    return table[int32(lo) | (int32(hi) << 8)]


@cuda.jit(device=True, inline=True)
def _i8(byte):
    v = int32(byte)
    return v - 256 if v >= 128 else v


@cuda.jit(device=True, inline=True)
def _reduce_lanes(acc, ty, row, n_rows, lane_value, out, t):
    """Every thread stores its lane; lane 0 of each row writes hsum_float_8 of the eight."""
    acc[ty, cuda.threadIdx.x] = lane_value
    cuda.syncthreads()
    if cuda.threadIdx.x == 0 and row < n_rows:
        out[t, row] = _hsum8(acc[ty, 0], acc[ty, 1], acc[ty, 2], acc[ty, 3],
                             acc[ty, 4], acc[ty, 5], acc[ty, 6], acc[ty, 7])


# -- Q8_0 / Q4_0 x Q8_0 (numba_kernels._matmul_q8_0 / _matmul_q4_0) -----------------------

@cuda.jit
def gemv_q8_0(w, f16, xq, xd, out):
    lane, ty = cuda.threadIdx.x, cuda.threadIdx.y
    row, t = cuda.blockIdx.x * cuda.blockDim.y + ty, cuda.blockIdx.y
    acc = cuda.shared.array((ROWS, LANES), float32)
    value = float32(0.0)
    if row < w.shape[0]:
        for b in range(xd.shape[1]):
            o = b * 34 + 2
            base = b * 32
            d = _f16(f16, w[row, o - 2], w[row, o - 1]) * xd[t, b]
            s = 0
            for j in range(4 * lane, 4 * lane + 4):
                s += _i8(w[row, o + j]) * int32(xq[t, base + j])
            value = _fma(d, float32(s), value)
    _reduce_lanes(acc, ty, row, w.shape[0], value, out, t)


@cuda.jit
def gemv_q4_0(w, f16, xq, xd, out):
    """Lanes 0-3: low nibbles of bytes 4L..4L+3 (elements 4L..); lanes 4-7: high nibbles
    of bytes 4(L-4).. (elements 16 + 4(L-4)..)."""
    lane, ty = cuda.threadIdx.x, cuda.threadIdx.y
    row, t = cuda.blockIdx.x * cuda.blockDim.y + ty, cuda.blockIdx.y
    acc = cuda.shared.array((ROWS, LANES), float32)
    value = float32(0.0)
    if row < w.shape[0]:
        quarter = lane % 4
        for b in range(xd.shape[1]):
            o = b * 18 + 2
            base = b * 32
            d = _f16(f16, w[row, o - 2], w[row, o - 1]) * xd[t, b]
            s = 0
            for j in range(4 * quarter, 4 * quarter + 4):
                byte = int32(w[row, o + j])
                if lane >= 4:
                    s += ((byte >> 4) - 8) * int32(xq[t, base + j + 16])
                else:
                    s += ((byte & 15) - 8) * int32(xq[t, base + j])
            value = _fma(d, float32(s), value)
    _reduce_lanes(acc, ty, row, w.shape[0], value, out, t)


# -- Q4_K x Q8_K (q4_k_q5_k._matmul_q4_k) ----------------------------------------------------

@cuda.jit(device=True, inline=True)
def _scale_min_k4(w, row, o, j):
    """get_scale_min_k4(j) for the 12 scale bytes at w[row, o + 4 ..]."""
    s = o + 4
    if j < 4:
        return int32(w[row, s + j]) & 63, int32(w[row, s + j + 4]) & 63
    j -= 4
    sc = (int32(w[row, s + j + 8]) & 15) | ((int32(w[row, s + j]) >> 6) << 4)
    mn = (int32(w[row, s + j + 8]) >> 4) | ((int32(w[row, s + j + 4]) >> 6) << 4)
    return sc, mn


@cuda.jit
def gemv_q4_k(w, f16, xq, xd, bsums, out):
    """Lane L: the scaled quants of elements 4L..4L+3 of every 32-group (acc[L]); lanes
    0-3 also carry the four min accumulators (acc_m[L] over bsums 4L..4L+3)."""
    lane, ty = cuda.threadIdx.x, cuda.threadIdx.y
    row, t = cuda.blockIdx.x * cuda.blockDim.y + ty, cuda.blockIdx.y
    acc = cuda.shared.array((ROWS, LANES), float32)
    mins = cuda.shared.array((ROWS, 4), float32)
    value = float32(0.0)
    m = float32(0.0)
    if row < w.shape[0]:
        for b in range(xd.shape[1]):
            o = b * 144
            d = xd[t, b] * _f16(f16, w[row, o], w[row, o + 1])
            if lane < 4:
                dmin = -xd[t, b] * _f16(f16, w[row, o + 2], w[row, o + 3])
                g = b * 16 + 4 * lane
                _, m0 = _scale_min_k4(w, row, o, 2 * lane)
                _, m1 = _scale_min_k4(w, row, o, 2 * lane + 1)
                p = m0 * (int32(bsums[t, g]) + int32(bsums[t, g + 1])) + \
                    m1 * (int32(bsums[t, g + 2]) + int32(bsums[t, g + 3]))
                m = _fma(dmin, float32(p), m)
            qs = o + 16
            xo = b * 256
            s = 0
            for j in range(4):  # 32 bytes: sub-block 2j (low nibbles), 2j+1 (high)
                s_lo, _ = _scale_min_k4(w, row, o, 2 * j)
                s_hi, _ = _scale_min_k4(w, row, o, 2 * j + 1)
                for e in range(4 * lane, 4 * lane + 4):
                    byte = int32(w[row, qs + 32 * j + e])
                    s += s_lo * ((byte & 15) * int32(xq[t, xo + 64 * j + e])) + \
                        s_hi * ((byte >> 4) * int32(xq[t, xo + 64 * j + 32 + e]))
            value = _fma(d, float32(s), value)
    if lane < 4:
        mins[ty, lane] = m
    acc[ty, lane] = value
    cuda.syncthreads()
    if lane == 0 and row < w.shape[0]:
        total = _hsum8(acc[ty, 0], acc[ty, 1], acc[ty, 2], acc[ty, 3], acc[ty, 4], acc[ty, 5], acc[ty, 6], acc[ty, 7])
        out[t, row] = total + ((mins[ty, 0] + mins[ty, 2]) + (mins[ty, 1] + mins[ty, 3]))


# -- Q6_K x Q8_K (q6_k._matmul_q6_k) ---------------------------------------------------------

@cuda.jit(device=True, inline=True)
def _q6_value(w, row, o, v):
    """scale * q of value v (0..255) of the super-block at byte o (see q6_k's layout)."""
    h = v // 128
    g = (v % 128) // 32
    l = v % 32
    lo = int32(w[row, o + 64 * h + 32 * (g % 2) + l])
    nib = (lo >> 4) if g >= 2 else (lo & 15)
    hb = (int32(w[row, o + 128 + 32 * h + l]) >> (2 * g)) & 3
    return (nib | (hb << 4)) * _i8(w[row, o + 192 + v // 16])


@cuda.jit
def gemv_q6_k(w, f16, xq, xd, xbs, out):
    lane, ty = cuda.threadIdx.x, cuda.threadIdx.y
    row, t = cuda.blockIdx.x * cuda.blockDim.y + ty, cuda.blockIdx.y
    acc = cuda.shared.array((ROWS, LANES), float32)
    value = float32(0.0)
    if row < w.shape[0]:
        for b in range(xd.shape[1]):
            o = b * 210
            e0 = b * 256
            s = 0
            for c in range(8):
                for i in range(32 * c + 4 * lane, 32 * c + 4 * lane + 4):
                    s += _q6_value(w, row, o, i) * int32(xq[t, e0 + i])
            k = 2 * lane
            sub = 32 * (int32(xbs[t, b * 16 + k]) * _i8(w[row, o + 192 + k])
                        + int32(xbs[t, b * 16 + k + 1]) * _i8(w[row, o + 192 + k + 1]))
            d = xd[t, b] * _f16(f16, w[row, o + 208], w[row, o + 209])
            value = _fma(d, float32(s - sub), value)
    _reduce_lanes(acc, ty, row, w.shape[0], value, out, t)


# -- F32 / F16 (numba_kernels._float_dot, VECDOT order) --------------------------------------

@cuda.jit(device=True, inline=True)
def _float_weight(w, row, c, is_f16, f16):
    if is_f16:
        return _f16(f16, w[row, 2 * c], w[row, 2 * c + 1])
    return w[row, c]


@cuda.jit
def gemv_float(w, is_f16, f16, x, out):
    """w: uint16 (F16) or float32 (F32) rows. Lane i holds ggml's accumulators i, 8+i, 16+i,
    24+i (four 8-wide FMA registers over chunks of 32) and folds them; lane 0 adds across
    lanes and the tail as vec_dot_f32 (float) or vec_dot_f16 (double) does."""
    lane, ty = cuda.threadIdx.x, cuda.threadIdx.y
    row, t = cuda.blockIdx.x * cuda.blockDim.y + ty, cuda.blockIdx.y
    acc = cuda.shared.array((ROWS, LANES), float32)
    n = x.shape[1]
    main = n - n % 32
    a0 = a1 = a2 = a3 = float32(0.0)
    if row < out.shape[1]:
        for c0 in range(0, main, 32):
            a0 = _fma(_float_weight(w, row, c0 + lane, is_f16, f16), x[t, c0 + lane], a0)
            a1 = _fma(_float_weight(w, row, c0 + 8 + lane, is_f16, f16), x[t, c0 + 8 + lane], a1)
            a2 = _fma(_float_weight(w, row, c0 + 16 + lane, is_f16, f16), x[t, c0 + 16 + lane], a2)
            a3 = _fma(_float_weight(w, row, c0 + 24 + lane, is_f16, f16), x[t, c0 + 24 + lane], a3)
    acc[ty, lane] = (a0 + a2) + (a1 + a3)
    cuda.syncthreads()
    if lane == 0 and row < out.shape[1]:
        t0, t1 = acc[ty, 0] + acc[ty, 4], acc[ty, 1] + acc[ty, 5]
        t2, t3 = acc[ty, 2] + acc[ty, 6], acc[ty, 3] + acc[ty, 7]
        total = float64((t0 + t1) + (t2 + t3))
        if is_f16:
            for c in range(main, n):
                total += float64(float32(float64(_float_weight(w, row, c, is_f16, f16)) * float64(x[t, c])))
            out[t, row] = float32(total)
        else:
            tail = float32(total)
            for c in range(main, n):
                tail += float32(float64(w[row, c]) * float64(x[t, c]))
            out[t, row] = tail


# -- which calls the GPU may take, and the launch -----------------------------------------------

QUANT_KERNELS = {T.Q8_0: gemv_q8_0, T.Q4_0: gemv_q4_0, T.Q4_K: gemv_q4_k, T.Q6_K: gemv_q6_k}
assert set(QUANT_KERNELS) | {T.F32, T.F16} == GPU_TYPES  # vram.serves() promises these


_F16_TABLE = {}  # device copy of the f16 -> f32 table, once per process


def f16_table():
    if "t" not in _F16_TABLE:
        _F16_TABLE["t"] = cuda.to_device(F16_TO_F32)
    return _F16_TABLE["t"]


def launch(ggml_type, w_dev, act_dev: tuple, out_dev, stream) -> None:
    """out_dev (n_tokens, n_rows) float32 = W (device uint8 rows) x activations (device copies
    of the CPU converter's arrays), queued on `stream`."""
    n_tokens, n_rows = out_dev.shape
    rows = min(ROWS, n_rows)  # small matrices (routers) take a smaller block
    grid = (math.ceil(n_rows / rows), n_tokens)
    block = (LANES, rows)
    table = f16_table()
    if ggml_type in QUANT_KERNELS:
        QUANT_KERNELS[ggml_type][grid, block, stream](w_dev, table, *act_dev, out_dev)
    elif ggml_type == T.F32:  # uploaded as float32 rows (see upload_matrix)
        gemv_float[grid, block, stream](w_dev, False, table, act_dev[0], out_dev)
    elif ggml_type == T.F16:
        gemv_float[grid, block, stream](w_dev, True, table, act_dev[0], out_dev)
    else:
        raise ValueError(f"no GPU kernel for {ggml_type}")
