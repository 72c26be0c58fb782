"""The grid I-quants: IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ1_S, IQ1_M, dotted with Q8_K.

Every one of them stores a 256-value super-block as groups of 8 (or 4) values, each group an
index into a fixed grid of magnitudes (llama.cpp's iq2xxs_grid, ..., iq1s_grid, taken here
from gguf-py, which carries the same tables), a sign per value (IQ2/IQ3; IQ1's grid is signed
-1/0/1 and has a +-1/8 shift per group instead), a small scale ls per 32 or 16 values and an
f16 d per super-block. Block layouts (ggml-common.h, little-endian):

* IQ2_XXS (66 bytes): d, qs as 8 pairs of uint32: the first holds 4 grid indices (one byte
  per 8 values), the second 4 x 7 sign bits (ksigns: the 8th sign makes the count even) and
  ls in its top 4 bits.  value = d * (0.5 + ls) / 4 * grid * sign.
* IQ2_XS (74): d, qs uint16[32] (9-bit index | 7 sign bits << 9), scales[8] (ls per 16
  values: low nibble, high nibble).
* IQ2_S (82): d, qs[64] (32 low index bytes, then 32 sign bytes), qh[8] (2 high index bits
  per group of 8), scales[8] (per 16).
* IQ3_XXS (98): d, qs[64] (an index per 4 values), 8 uint32 of 4 x 7 sign bits | ls << 28.
  value = d * (0.5 + ls) / 2 * grid * sign.
* IQ3_S (110): d, qs[64], qh[8] (9th index bits), signs[32], scales[4] (ls per 32, two per
  byte).  value = d * (1 + 2 ls) * grid * sign.
* IQ1_S (50): d, qs[32] (low index bytes), qh uint16[8] (per 32 values: 3 high index bits per
  8, ls at bits 12..14, the shift's sign at bit 15).  value = d * (2 ls + 1) * (grid +- 1/8).
* IQ1_M (56): qs[32], qh[16] (per 8 values: 3 high index bits, the shift's sign at bit 3),
  scales[8] as uint16[4]: twelve bits of 3-bit ls per 16 values each, and d's 16 bits in
  their top nibbles.

Summation order (ggml's x86 AVX2 `ggml_vec_dot_iq*_q8_K`, arch/x86/quants.c). Per super-block
eight int32 lanes, lane i = sum over the eight 32-value groups c of ls'[2c + (i >= 4)] times
the four products of values 32c + 4i .. 32c + 4i + 3 (maddubs, then madd with the scales),
ls' = 2 ls + 1 for the scale of those 16 values. A product is magnitude * sign(q8): ggml flips
the activation's sign (_mm256_sign_epi8, or xor/sub), which leaves q8 = -128 at -128, so a
negative weight times q8 = -128 gives -128 * magnitude, not +128 * magnitude. Q8_K's
quantizer (scale -127 / max) never makes a -128, but the kernels take any int8 as ggml does.
The floats, per super-block b, d = f16(w.d) * x.d:

* IQ2_*, IQ3_*: acc[i] = fma(d, float(lane[i]), acc[i]); out = post * hsum_float_8(acc),
  post 1/8 (IQ2), 1/4 (IQ3_XXS), 1 (IQ3_S, whose scale is 1 + 2 ls outright).
* IQ1_S: the same lanes (grid in -1..1) and one scalar sum of the shifts,
  s1 = sum over 32-value groups of (2 ls + 1) * (+-1) * (sum of their q8, from bsums), taken
  as acc1 = fma(d, float(s1), acc1) (GCC contracts ggml's `accum1 += d * sumi1`);
  out = hsum_float_8(acc) + 1/8 * acc1.
* IQ1_M: lanes of the grid, and lanes of the shifts (maddubs(1, sign(q8, shift)), the -128
  rule again), each into its own fma accumulator; out = hsum(acc1) + 1/8 * hsum(acc2).

From 8 tokens on ggml takes its tiled GEMM for all of these (ggml-cpu/tiled/, see `tiled`):
exact signed values there (no -128 quirk), q = grid * sign (IQ1: 8 * grid +- 1), scale
2 ls + 1 per 16 values and d scaled by 1/8, 1/4 or 1 (`tiled_blocks`).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants as gq

from .formats import QK_K, BlockFormat
from .jit import njit, prange
from .numba_kernels import _fma, _hsum8, _readonly


def _grid(cls, dtype) -> np.ndarray:
    """gguf-py's copy of a ggml grid, one row per entry (8 or 4 values)."""
    cls.init_grid()
    return _readonly(np.ascontiguousarray(cls.grid.reshape(cls.grid_shape).astype(dtype)))


GRID_IQ2XXS = _grid(gq.IQ2_XXS, np.uint8)  # (256, 8)
GRID_IQ2XS = _grid(gq.IQ2_XS, np.uint8)  # (512, 8)
GRID_IQ2S = _grid(gq.IQ2_S, np.uint8)  # (1024, 8)
GRID_IQ3XXS = _grid(gq.IQ3_XXS, np.uint8)  # (256, 4)
GRID_IQ3S = _grid(gq.IQ3_S, np.uint8)  # (512, 4)
GRID_IQ1S = _grid(gq.IQ1_S, np.int8)  # (2048, 8), values -1, 0, 1
KSIGNS = _readonly(np.frombuffer(gq.IQ2_XXS.ksigns, dtype=np.uint8).copy())  # 7 sign bits -> 8 (even parity)
_BIT = np.arange(8, dtype=np.uint8)


class Decoded(NamedTuple):
    """Super-blocks spelt out (leading dims = the blocks'): what every kernel here reads."""

    mag: np.ndarray  # uint8 (..., 256): grid magnitude of each value (IQ1: |grid|)
    neg: np.ndarray  # bool (..., 256): the value's sign is minus (IQ1: grid == -1)
    ls: np.ndarray  # uint8 (..., 16): the stored scale of each 16 values
    d: np.ndarray  # float32 (...): the f16 super-block scale
    shift_neg: np.ndarray  # bool (..., 32): IQ1's shift is -1/8 for these 8 values (else +1/8)


def _bits(byte: np.ndarray) -> np.ndarray:
    """uint8 (...) -> bool (..., 8): bit j of each byte."""
    return ((byte[..., None] >> _BIT) & 1).astype(bool)


def _per16(ls32: np.ndarray) -> np.ndarray:
    """A scale per 32 values (..., 8) -> per 16 (..., 16)."""
    return np.repeat(ls32, 2, axis=-1)


def _no_shift(lead) -> np.ndarray:
    return np.zeros((*lead, 32), dtype=bool)


class IQGridFormat(BlockFormat):
    """A grid I-quant: `decode` spells its blocks out; the values follow from that."""

    block_size = QK_K
    vec_dot_type = "Q8_K"
    post = np.float32(1.0)  # ggml's factor on the vec_dot sum
    tiled_scale = np.float32(1.0)  # ggml's tiled path scales d by this (see tiled_blocks)
    kind = 0  # 0: grid lanes only; 1: IQ1_S's shift sum; 2: IQ1_M's shift lanes

    def decode(self, blocks: np.ndarray) -> Decoded:
        raise NotImplementedError

    def _block_scales(self, dec: Decoded) -> np.ndarray:
        """float32 (..., 16): the scale of each 16 values, as ggml's dequantize computes it."""
        ls = dec.ls.astype(np.float32)
        return dec.d[..., None] * (np.float32(0.5) + ls) * np.float32(0.25)

    def _dequantize_blocks(self, blocks: np.ndarray) -> np.ndarray:
        dec = self.decode(blocks)
        lead = blocks.shape
        db = np.repeat(self._block_scales(dec), 16, axis=-1)  # (..., 256)
        sign = np.where(dec.neg, np.float32(-1), np.float32(1))
        return (db * dec.mag.astype(np.float32)) * sign.reshape(*lead, QK_K)

    def signed_values(self, dec: Decoded) -> np.ndarray:
        """int8 (..., 256): the integer each value is d * tiled_scale * (2 ls + 1) times."""
        return np.where(dec.neg, -dec.mag.astype(np.int8), dec.mag.astype(np.int8))


class IQ2_XXSFormat(IQGridFormat):
    name, ggml_type = "IQ2_XXS", T.IQ2_XXS
    layout = np.dtype([("d", "<f2"), ("qs", "<u4", 16)])  # 66 bytes
    post = tiled_scale = np.float32(0.125)

    def decode(self, blocks):
        lead = blocks.shape
        qs = blocks["qs"].reshape(*lead, 8, 2)
        idx = (qs[..., 0, None] >> np.array([0, 8, 16, 24], np.uint32)) & 255  # (..., 8, 4)
        signs = KSIGNS[(qs[..., 1, None] >> np.array([0, 7, 14, 21], np.uint32)) & 127]
        return Decoded(GRID_IQ2XXS[idx].reshape(*lead, QK_K), _bits(signs).reshape(*lead, QK_K),
                       _per16((qs[..., 1] >> 28).astype(np.uint8)), blocks["d"].astype(np.float32), _no_shift(lead))


class IQ2_XSFormat(IQGridFormat):
    name, ggml_type = "IQ2_XS", T.IQ2_XS
    layout = np.dtype([("d", "<f2"), ("qs", "<u2", 32), ("scales", "u1", 8)])  # 74 bytes
    post = tiled_scale = np.float32(0.125)

    def decode(self, blocks):
        lead = blocks.shape
        qs = blocks["qs"]  # (..., 32): one per 8 values
        ls = np.stack([blocks["scales"] & 15, blocks["scales"] >> 4], axis=-1).reshape(*lead, 16)
        return Decoded(GRID_IQ2XS[qs & 511].reshape(*lead, QK_K), _bits(KSIGNS[qs >> 9]).reshape(*lead, QK_K),
                       ls, blocks["d"].astype(np.float32), _no_shift(lead))


class IQ2_SFormat(IQGridFormat):
    name, ggml_type = "IQ2_S", T.IQ2_S
    layout = np.dtype([("d", "<f2"), ("qs", "u1", 32), ("signs", "u1", 32), ("qh", "u1", 8), ("scales", "u1", 8)])
    post = tiled_scale = np.float32(0.125)

    def decode(self, blocks):
        lead = blocks.shape
        qh = blocks["qh"].astype(np.uint16)[..., None]  # (..., 8, 1): 2 bits per group l of 8
        high = (qh >> (2 * np.arange(4, dtype=np.uint16))) & 3  # (..., 8, 4)
        idx = blocks["qs"].reshape(*lead, 8, 4).astype(np.uint16) | (high << 8)
        ls = np.stack([blocks["scales"] & 15, blocks["scales"] >> 4], axis=-1).reshape(*lead, 16)
        return Decoded(GRID_IQ2S[idx].reshape(*lead, QK_K), _bits(blocks["signs"]).reshape(*lead, QK_K),
                       ls, blocks["d"].astype(np.float32), _no_shift(lead))


class IQ3_XXSFormat(IQGridFormat):
    name, ggml_type = "IQ3_XXS", T.IQ3_XXS
    layout = np.dtype([("d", "<f2"), ("qs", "u1", 64), ("aux", "<u4", 8)])  # 98 bytes
    post = tiled_scale = np.float32(0.25)

    def _block_scales(self, dec):
        return dec.d[..., None] * (np.float32(0.5) + dec.ls.astype(np.float32)) * np.float32(0.5)

    def decode(self, blocks):
        lead = blocks.shape
        aux = blocks["aux"]  # (..., 8): one per 32 values
        signs = KSIGNS[(aux[..., None] >> np.array([0, 7, 14, 21], np.uint32)) & 127]  # (..., 8, 4)
        return Decoded(GRID_IQ3XXS[blocks["qs"]].reshape(*lead, QK_K), _bits(signs).reshape(*lead, QK_K),
                       _per16((aux >> 28).astype(np.uint8)), blocks["d"].astype(np.float32), _no_shift(lead))


class IQ3_SFormat(IQGridFormat):
    name, ggml_type = "IQ3_S", T.IQ3_S
    layout = np.dtype([("d", "<f2"), ("qs", "u1", 64), ("qh", "u1", 8), ("signs", "u1", 32), ("scales", "u1", 4)])

    def _block_scales(self, dec):
        return dec.d[..., None] * (np.float32(1) + np.float32(2) * dec.ls.astype(np.float32))

    def decode(self, blocks):
        lead = blocks.shape
        qh = blocks["qh"].astype(np.uint16)[..., None]  # (..., 8, 1): bit k = 9th bit of index k
        high = (qh >> np.arange(8, dtype=np.uint16)) & 1  # (..., 8, 8)
        idx = blocks["qs"].reshape(*lead, 8, 8).astype(np.uint16) | (high << 8)
        ls = _per16(np.stack([blocks["scales"] & 15, blocks["scales"] >> 4], axis=-1).reshape(*lead, 8))
        return Decoded(GRID_IQ3S[idx].reshape(*lead, QK_K), _bits(blocks["signs"]).reshape(*lead, QK_K),
                       ls, blocks["d"].astype(np.float32), _no_shift(lead))


class _IQ1Format(IQGridFormat):
    tiled_scale = np.float32(0.125)

    def _grid_values(self, idx, lead):
        grid = GRID_IQ1S[idx].reshape(*lead, QK_K)
        return np.abs(grid).astype(np.uint8), grid < 0

    def _dequantize_blocks(self, blocks):
        dec = self.decode(blocks)
        lead = blocks.shape
        with np.errstate(invalid="ignore", over="ignore"):
            return self._values(dec, lead)

    def _values(self, dec, lead):
        dl = np.repeat(dec.d[..., None] * (np.float32(2) * dec.ls.astype(np.float32) + np.float32(1)), 16, axis=-1)
        grid = np.where(dec.neg, np.float32(-1), np.float32(1)) * dec.mag.astype(np.float32)
        shift = np.repeat(np.where(dec.shift_neg, np.float32(-0.125), np.float32(0.125)), 8, axis=-1)
        return dl * (grid + shift)

    def signed_values(self, dec):
        grid = np.where(dec.neg, -dec.mag.astype(np.int8), dec.mag.astype(np.int8))
        return 8 * grid + np.repeat(np.where(dec.shift_neg, np.int8(-1), np.int8(1)), 8, axis=-1)


class IQ1_SFormat(_IQ1Format):
    name, ggml_type = "IQ1_S", T.IQ1_S
    layout = np.dtype([("d", "<f2"), ("qs", "u1", 32), ("qh", "<u2", 8)])  # 50 bytes
    kind = 1

    def decode(self, blocks):
        lead = blocks.shape
        qh = blocks["qh"][..., None]  # (..., 8, 1)
        high = (qh >> (3 * np.arange(4, dtype=np.uint16))) & 7  # (..., 8, 4)
        idx = blocks["qs"].reshape(*lead, 8, 4).astype(np.uint16) | (high << 8)
        mag, neg = self._grid_values(idx, lead)
        ls = _per16(((blocks["qh"] >> 12) & 7).astype(np.uint8))
        shift_neg = np.repeat((blocks["qh"] & 0x8000) != 0, 4, axis=-1)
        return Decoded(mag, neg, ls, blocks["d"].astype(np.float32), shift_neg)


class IQ1_MFormat(_IQ1Format):
    name, ggml_type = "IQ1_M", T.IQ1_M
    layout = np.dtype([("qs", "u1", 32), ("qh", "u1", 16), ("sc", "<u2", 4)])  # 56 bytes
    kind = 2

    def decode(self, blocks):
        lead = blocks.shape
        qh = blocks["qh"].astype(np.uint16)[..., None]  # (..., 16, 1): per 8 values, two groups per byte
        high = np.concatenate([qh & 7, (qh >> 4) & 7], axis=-1).reshape(*lead, 32)
        idx = blocks["qs"].astype(np.uint16) | (high << 8)
        mag, neg = self._grid_values(idx, lead)
        shift_neg = np.concatenate([qh & 0x08, qh & 0x80], axis=-1).reshape(*lead, 32) != 0
        sc = blocks["sc"]  # (..., 4): 4 scales (bits 0..11) and a nibble of d (bits 12..15)
        ls = ((sc[..., None] >> (3 * np.arange(4, dtype=np.uint16))) & 7).reshape(*lead, 16).astype(np.uint8)
        d16 = (sc[..., 0] >> 12) | ((sc[..., 1] >> 8) & 0x00F0) | ((sc[..., 2] >> 4) & 0x0F00) | (sc[..., 3] & 0xF000)
        return Decoded(mag, neg, ls, d16.astype(np.uint16).view(np.float16).astype(np.float32), shift_neg)


FORMATS = (IQ2_XXSFormat(), IQ2_XSFormat(), IQ2_SFormat(), IQ3_XXSFormat(), IQ3_SFormat(), IQ1_SFormat(),
           IQ1_MFormat())
IQ_GRID_TYPES = frozenset(f.ggml_type for f in FORMATS)


def tiled_blocks(fmt: IQGridFormat, blocks: np.ndarray):
    """ggml's tiled-GEMM view of the blocks: signed int8 values, int16 scale 2 ls + 1 per 16,
    d * tiled_scale (exact: a power of two), no mins."""
    dec = fmt.decode(blocks)
    sc = (2 * dec.ls.astype(np.int16) + 1).astype(np.int16)
    with np.errstate(invalid="ignore", over="ignore"):  # any d (IQ1_M's may be inf / NaN), as ggml
        return fmt.signed_values(dec), sc, dec.d * fmt.tiled_scale


# -- vec_dot kernel ---------------------------------------------------------------------------
#
# The weights are spelt out (Decoded) a chunk of rows at a time with numpy, then one Numba
# kernel serves all seven formats: the integer lanes are exact, only the float steps need
# ggml's order (see the top of the file).

_ROWS_PER_CHUNK = 256


@njit(inline="always")
def _flip(q, neg):
    """_mm256_sign_epi8(q8, -1) where neg: -q, except that -128 stays -128."""
    if neg and q != -128:
        return -q
    return q


@njit(parallel=True, cache=True, nogil=True)
def _matmul_iq(mag, neg, sc, d, shift_neg, kind, post, xq, xd, xbs, out, r0):
    n_rows, nb = d.shape
    n_tokens = xq.shape[0]
    for r in prange(n_rows):
        lanes = np.empty(8, dtype=np.int32)
        lanes2 = np.empty(8, dtype=np.int32)
        acc = np.empty(8, dtype=np.float32)
        acc2 = np.empty(8, dtype=np.float32)
        for t in range(n_tokens):
            acc[:] = 0.0
            acc2[:] = 0.0
            acc1 = np.float32(0.0)
            for b in range(nb):
                lanes[:] = 0
                lanes2[:] = 0
                for c in range(8):
                    for i in range(8):
                        s = np.int32(sc[r, b, 2 * c + (1 if i >= 4 else 0)])
                        p = np.int32(0)
                        p2 = np.int32(0)
                        for e in range(32 * c + 4 * i, 32 * c + 4 * i + 4):
                            q = np.int32(xq[t, QK_K * b + e])
                            p += np.int32(mag[r, b, e]) * _flip(q, neg[r, b, e])
                            p2 += _flip(q, shift_neg[r, b, e // 8])
                        lanes[i] += s * p
                        lanes2[i] += s * p2
                db = d[r, b] * xd[t, b]
                for i in range(8):
                    acc[i] = _fma(db, np.float32(lanes[i]), acc[i])
                if kind == 1:  # IQ1_S: the shifts through the activations' sums, per 32 values
                    s1 = np.int32(0)
                    for g in range(8):
                        sign = np.int32(-1) if shift_neg[r, b, 4 * g] else np.int32(1)
                        s1 += (np.int32(xbs[t, 16 * b + 2 * g]) + np.int32(xbs[t, 16 * b + 2 * g + 1])) * sign * np.int32(sc[r, b, 2 * g])
                    acc1 = _fma(db, np.float32(s1), acc1)
                elif kind == 2:  # IQ1_M: the shifts as lanes of their own
                    for i in range(8):
                        acc2[i] = _fma(db, np.float32(lanes2[i]), acc2[i])
            h = _hsum8(acc[0], acc[1], acc[2], acc[3], acc[4], acc[5], acc[6], acc[7])
            if kind == 1:
                out[t, r0 + r] = h + np.float32(0.125) * acc1
            elif kind == 2:
                out[t, r0 + r] = h + np.float32(0.125) * _hsum8(acc2[0], acc2[1], acc2[2], acc2[3], acc2[4], acc2[5],
                                                                 acc2[6], acc2[7])
            else:
                out[t, r0 + r] = post * h


def matmul_iq(fmt: IQGridFormat, w: np.ndarray, act: tuple[np.ndarray, ...], out: np.ndarray) -> None:
    """out[t, r] = ggml_vec_dot_<fmt>_q8_K(row r, token t); act = (qs, d, bsums) from quantize_q8_k."""
    xq, xd, xbs = (_readonly(a) for a in act)
    for r0 in range(0, w.shape[0], _ROWS_PER_CHUNK):
        dec = fmt.decode(np.ascontiguousarray(w[r0 : r0 + _ROWS_PER_CHUNK]).view(fmt.layout))
        sc = (2 * dec.ls.astype(np.int16) + 1).astype(np.int16)
        _matmul_iq(dec.mag, dec.neg, sc, dec.d, dec.shift_neg, fmt.kind, fmt.post, xq, xd, xbs, out, r0)


def kernel_for(fmt: IQGridFormat):
    """The format's Numba kernel in dispatch's signature."""

    def kernel(w: np.ndarray, act: tuple[np.ndarray, ...], out: np.ndarray, vec_dot: bool = False) -> None:
        matmul_iq(fmt, w, act, out)

    kernel.__name__ = f"matmul_{fmt.name.lower()}"
    return kernel
