"""Numba matmul kernels that read the GGUF blocks in place.

Every kernel computes out[t, r] = dot(row r of W, activations of token t), in parallel
over output rows with the tokens inside, so a row's blocks are decoded while they are in
L1. No kernel allocates: the caller converts the activations once per call (to F16/BF16-
rounded floats or Q8_0 blocks, see `formats.activation_ref`) and passes the output.

Summation order is part of the numerics, so it is spelled out and kept sequential (no
fastmath, no reassociation, no FMA contraction): F32/F16/BF16 add the products column by
column in float32; Q8_0/Q4_0 take an exact integer dot per 32-value block and add
(d_w * d_x) * sumi block by block in float32, as ggml's scalar `ggml_vec_dot_q*_0_q8_0`.

The public wrappers share one signature, `kernel(w, act, out)`: w the uint8 rows
(n_rows, row_bytes), act the tuple from the activation converter, out float32
(n_tokens, n_rows). A faster (C, SIMD) kernel with the same signature can replace any
of them in `dispatch.KERNELS`.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

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
            d[t, b] = amax / np.float32(127.0)
            inv = np.float32(127.0) / amax if amax != np.float32(0.0) else np.float32(0.0)
            for j in range(QK):
                qs[t, base + j] = np.int8(np.rint(x[t, base + j] * inv))


def quantize_q8_0(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fast twin of `formats.quantize_q8_0_ref`: float32 (n, k) -> (qs int8 (n, k), d float32 (n, k/32))."""
    n, k = x.shape
    qs = np.empty((n, k), dtype=np.int8)
    d = np.empty((n, k // QK), dtype=np.float32)
    _quantize_q8_0(_readonly(x), qs, d)
    with np.errstate(over="ignore"):
        return qs, d.astype(np.float16).astype(np.float32)  # the stored scale is fp16


# -- float weights -------------------------------------------------------------------------

@njit(parallel=True, cache=True, nogil=True)
def _matmul_f32(w, x, out):
    n_rows, n_cols = w.shape
    for r in prange(n_rows):
        for t in range(x.shape[0]):
            acc = np.float32(0.0)
            for c in range(n_cols):
                acc += w[r, c] * x[t, c]
            out[t, r] = acc


@njit(parallel=True, cache=True, nogil=True)
def _matmul_16bit(w_bits, table, x, out):
    """F16 or BF16 weights (uint16 patterns decoded through `table`) times activations
    already rounded to the same type; each product is exact in float32."""
    n_rows, n_cols = w_bits.shape
    for r in prange(n_rows):
        for t in range(x.shape[0]):
            acc = np.float32(0.0)
            for c in range(n_cols):
                acc += table[w_bits[r, c]] * x[t, c]
            out[t, r] = acc


def matmul_f32(w: np.ndarray, act: tuple[np.ndarray, ...], out: np.ndarray) -> None:
    (x,) = act
    _matmul_f32(_readonly(w, np.float32), _readonly(x), out)


def matmul_f16(w: np.ndarray, act: tuple[np.ndarray, ...], out: np.ndarray) -> None:
    (x,) = act  # F16-rounded float32
    _matmul_16bit(_readonly(w, np.uint16), F16_TO_F32, _readonly(x), out)


def matmul_bf16(w: np.ndarray, act: tuple[np.ndarray, ...], out: np.ndarray) -> None:
    (x,) = act  # BF16-rounded float32
    _matmul_16bit(_readonly(w, np.uint16), BF16_TO_F32, _readonly(x), out)


# -- block-quantized weights x Q8_0 activations ------------------------------------------------

@njit(parallel=True, cache=True, nogil=True)
def _matmul_q8_0(w, w_i8, f16, xq, xd, out):
    """w and w_i8: the same bytes as uint8 (for the f16 scale) and int8 (for qs)."""
    n_rows = w.shape[0]
    n_blocks = xd.shape[1]
    for r in prange(n_rows):
        for t in range(xq.shape[0]):
            acc = np.float32(0.0)
            for b in range(n_blocks):
                o = b * Q8_0_BYTES
                d_w = f16[w[r, o] | (w[r, o + 1] << 8)]
                base = b * QK
                sumi = 0
                for j in range(QK):
                    sumi += np.int32(w_i8[r, o + 2 + j]) * np.int32(xq[t, base + j])
                acc += (d_w * xd[t, b]) * np.float32(sumi)
            out[t, r] = acc


@njit(parallel=True, cache=True, nogil=True)
def _matmul_q4_0(w, f16, xq, xd, out):
    n_rows = w.shape[0]
    n_blocks = xd.shape[1]
    for r in prange(n_rows):
        for t in range(xq.shape[0]):
            acc = np.float32(0.0)
            for b in range(n_blocks):
                o = b * Q4_0_BYTES
                d_w = f16[w[r, o] | (w[r, o + 1] << 8)]
                base = b * QK
                sumi = 0
                for j in range(QK // 2):
                    byte = np.int32(w[r, o + 2 + j])
                    sumi += ((byte & 0x0F) - 8) * np.int32(xq[t, base + j])
                    sumi += ((byte >> 4) - 8) * np.int32(xq[t, base + j + QK // 2])
                acc += (d_w * xd[t, b]) * np.float32(sumi)
            out[t, r] = acc


def matmul_q8_0(w: np.ndarray, act: tuple[np.ndarray, ...], out: np.ndarray) -> None:
    xq, xd = act
    _matmul_q8_0(_readonly(w), _readonly(w, np.int8), F16_TO_F32, _readonly(xq), _readonly(xd), out)


def matmul_q4_0(w: np.ndarray, act: tuple[np.ndarray, ...], out: np.ndarray) -> None:
    xq, xd = act
    _matmul_q4_0(_readonly(w), F16_TO_F32, _readonly(xq), _readonly(xd), out)
