"""TQ1_0 and TQ2_0: ternary weights (-1, 0, +1) times one fp16 scale per 256 values.

Blocks (ggml-common.h), value = (t - 1) * d with t in {0, 1, 2}:

* TQ2_0 `{qs[64], d f16}` (66 bytes): 2 bits per value. Element 128 h + 32 l + m is bits
  2l..2l+1 of qs[32 h + m] (h < 2, l < 4, m < 32).
* TQ1_0 `{qs[48], qh[4], d f16}` (54 bytes): base-3 digits, five per byte (four in qh).
  Digit n of a byte q is t = ((q * 3^n mod 256) * 3) >> 8. Elements 32 n + m: digit n of
  qs[m] (m < 32); 160 + 16 n + m: digit n of qs[32 + m] (m < 16); 240 + 4 n + m: digit n
  of qh[m] (n, m < 4).

Both pair with Q8_K activations and have no tiled or sgemm path in ggml: every batch size
takes `ggml_vec_dot_tq{1,2}_0_q8_K` (x86 AVX2). Per super-block its eight int32 lanes are
exact integers; lane i = sum over the eight 32-value chunks c of the products t * x of
elements 32c + 4i .. 32c + 4i + 3 (the digits unsigned, as maddubs takes them), minus
bsums[2i] + bsums[2i + 1] (the -1 of every value, subtracted per 16 activations: lane i
takes elements 32i..32i+31). The floats: acc = fma(float(lane), d_x * fp16(d_w), acc)
(ggml writes add(mul(...)), which GCC contracts into vfmadd231ps in the shipped AVX2
build: checked in its disassembly), then hsum_float_8(acc).
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from .formats import QK_K, BlockFormat
from .jit import njit, prange
from .numba_kernels import F16_TO_F32, _fma, _hsum8, _readonly

TQ1_0_BYTES = 54
TQ2_0_BYTES = 66

# DIGITS[n, q]: base-3 digit n of a TQ1_0 byte q, as ggml extracts it.
DIGITS = _readonly(np.array([[((q * 3 ** n % 256) * 3) >> 8 for q in range(256)] for n in range(5)], dtype=np.uint8))


def tq1_0_digits(blocks: np.ndarray) -> np.ndarray:
    """The 256 digits t (0..2) of each TQ1_0 block, uint8 (..., 256), in element order."""
    a = DIGITS[:, blocks["qs"][..., :32]]  # (5, ..., 32)
    b = DIGITS[:, blocks["qs"][..., 32:]]  # (5, ..., 16)
    c = DIGITS[:4, blocks["qh"]]  # (4, ..., 4)
    parts = [np.moveaxis(p, 0, -2).reshape(*blocks.shape, -1) for p in (a, b, c)]
    return np.concatenate(parts, axis=-1)


def tq2_0_digits(blocks: np.ndarray) -> np.ndarray:
    """The 256 digits t (0..2; 3 is never written) of each TQ2_0 block, uint8 (..., 256)."""
    qs = blocks["qs"].reshape(*blocks.shape, 2, 1, 32)
    shifts = (2 * np.arange(4, dtype=np.uint8)).reshape(4, 1)
    return ((qs >> shifts) & 3).reshape(*blocks.shape, QK_K)


class TQ1_0Format(BlockFormat):
    """value = (t - 1) * d, t a base-3 digit (five per byte)."""

    name, ggml_type, block_size = "TQ1_0", GGMLQuantizationType.TQ1_0, QK_K
    layout = np.dtype([("qs", "u1", 48), ("qh", "u1", 4), ("d", "<f2")])  # 54 bytes
    vec_dot_type = "Q8_K"

    def _dequantize_blocks(self, blocks: np.ndarray) -> np.ndarray:
        t = tq1_0_digits(blocks).astype(np.float32) - np.float32(1)
        return t * blocks["d"].astype(np.float32)[..., None]


class TQ2_0Format(BlockFormat):
    """value = (t - 1) * d, t two bits."""

    name, ggml_type, block_size = "TQ2_0", GGMLQuantizationType.TQ2_0, QK_K
    layout = np.dtype([("qs", "u1", 64), ("d", "<f2")])  # 66 bytes
    vec_dot_type = "Q8_K"

    def _dequantize_blocks(self, blocks: np.ndarray) -> np.ndarray:
        t = tq2_0_digits(blocks).astype(np.float32) - np.float32(1)
        return t * blocks["d"].astype(np.float32)[..., None]


# -- kernels: a row's digits decoded once into a per-thread buffer, then dotted with every token --

@njit(inline="always")
def _decode_tq1_0(w, r, o, digits, t, base):
    for n in range(5):
        for m in range(32):
            t[base + 32 * n + m] = digits[n, w[r, o + m]]
        for m in range(16):
            t[base + 160 + 16 * n + m] = digits[n, w[r, o + 32 + m]]
    for n in range(4):
        for m in range(4):
            t[base + 240 + 4 * n + m] = digits[n, w[r, o + 48 + m]]


@njit(inline="always")
def _decode_tq2_0(w, r, o, t, base):
    for h in range(2):
        for l in range(4):
            for m in range(32):
                t[base + 128 * h + 32 * l + m] = (w[r, o + 32 * h + m] >> (2 * l)) & 3


@njit(parallel=True, cache=True, nogil=True)
def _matmul_ternary(w, tq1, digits, f16, xq, xd, bsums, out):
    n_rows = w.shape[0]
    n_blocks = xd.shape[1]
    block_bytes = TQ1_0_BYTES if tq1 else TQ2_0_BYTES
    for r in prange(n_rows):
        t = np.empty(n_blocks * QK_K, dtype=np.uint8)
        dw = np.empty(n_blocks, dtype=np.float32)
        prod = np.empty(n_blocks * QK_K, dtype=np.int32)
        for b in range(n_blocks):
            o = b * block_bytes
            d_at = o + block_bytes - 2  # d is the last field of both layouts
            dw[b] = f16[np.int32(w[r, d_at]) | (np.int32(w[r, d_at + 1]) << 8)]
            if tq1:
                _decode_tq1_0(w, r, o, digits, t, b * QK_K)
            else:
                _decode_tq2_0(w, r, o, t, b * QK_K)
        for tok in range(xq.shape[0]):
            x = xq[tok]
            for e in range(prod.shape[0]):  # exact products first: a loop LLVM vectorizes
                prod[e] = np.int32(t[e]) * np.int32(x[e])
            a = np.zeros(8, dtype=np.float32)
            for b in range(n_blocks):
                s = xd[tok, b] * dw[b]
                o = b * QK_K
                for i in range(8):
                    lane = np.int32(0)
                    for c in range(8):
                        e = o + 32 * c + 4 * i
                        lane += (prod[e] + prod[e + 1]) + (prod[e + 2] + prod[e + 3])
                    lane -= np.int32(bsums[tok, 16 * b + 2 * i]) + np.int32(bsums[tok, 16 * b + 2 * i + 1])
                    a[i] = _fma(np.float32(lane), s, a[i])
            out[tok, r] = _hsum8(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7])


def matmul_tq1_0(w: np.ndarray, act: tuple[np.ndarray, ...], out: np.ndarray, vec_dot: bool = False) -> None:
    """out[t, r] = ggml_vec_dot_tq1_0_q8_K(row r, token t); act = Q8_K (qs, d, bsums)."""
    xq, xd, bsums = act
    _matmul_ternary(_readonly(w), True, DIGITS, F16_TO_F32, _readonly(xq), _readonly(xd), _readonly(bsums), out)


def matmul_tq2_0(w: np.ndarray, act: tuple[np.ndarray, ...], out: np.ndarray, vec_dot: bool = False) -> None:
    """out[t, r] = ggml_vec_dot_tq2_0_q8_K(row r, token t); act = Q8_K (qs, d, bsums)."""
    xq, xd, bsums = act
    _matmul_ternary(_readonly(w), False, DIGITS, F16_TO_F32, _readonly(xq), _readonly(xd), _readonly(bsums), out)
