"""GGUF weight formats: what the bytes of each block mean, in plain numpy.

Weights stay in their GGUF block encoding in memory; the kernels decode them inside the
dot product. This module is the reference they are checked against:

* one `BlockFormat` per ggml type, declaring its block layout as a numpy structured dtype
  and a pure-numpy `dequantize` (bit-exact with ggml's `dequantize_row_*`),
* the activation conversions llama.cpp's CPU matmul applies before the dot product
  (`vec_dot_type`: the activations are rounded to F16/BF16 or quantized to Q8_0 blocks),
* `QMatrix`, a weight matrix as a view of its encoded rows.

Adding a format (k-quants come next) means: a subclass here with its layout and
`_dequantize_blocks`, an entry in `FORMATS`, and a kernel in `dispatch.KERNELS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
from gguf import GGMLQuantizationType

QK8_0 = 32  # elements per Q8_0 (and Q4_0) block


class UnsupportedQuantType(ValueError):
    """A tensor's ggml type has no format (or no kernel) in offload yet."""

    def __init__(self, ggml_type: GGMLQuantizationType | int, why: str = "is not supported"):
        self.ggml_type = ggml_type
        name = ggml_type.name if isinstance(ggml_type, GGMLQuantizationType) else str(ggml_type)
        supported = ", ".join(f.name for f in FORMATS.values())
        super().__init__(f"quant type {name} {why} (supported: {supported})")


class BlockFormat:
    """One ggml type: its block layout and its reference dequantization.

    A row of `n_cols` values is `n_cols // block_size` blocks of `type_size` bytes each.
    `layout` is one block as a numpy structured dtype (little-endian, as in the file), so
    `raw.view(fmt.layout)` gives named fields without copying.
    """

    name: str
    ggml_type: GGMLQuantizationType
    block_size: int  # elements per block
    layout: np.dtype  # one block
    vec_dot_type: str  # what llama.cpp converts the activations to for this weight type

    @property
    def type_size(self) -> int:
        """Bytes per block."""
        return self.layout.itemsize

    def row_bytes(self, n_cols: int) -> int:
        if n_cols % self.block_size:
            raise ValueError(f"{self.name} rows hold a multiple of {self.block_size} values, got {n_cols}")
        return n_cols // self.block_size * self.type_size

    def dequantize(self, raw: np.ndarray) -> np.ndarray:
        """uint8 (..., n_blocks * type_size) -> float32 (..., n_blocks * block_size), exactly as ggml."""
        raw = np.ascontiguousarray(raw)
        if raw.dtype != np.uint8 or raw.ndim == 0 or raw.shape[-1] % self.type_size:
            raise ValueError(
                f"{self.name}: expected uint8 (..., n * {self.type_size}) bytes, got {raw.dtype} {raw.shape}"
            )
        blocks = raw.view(self.layout)  # (..., n_blocks)
        values = self._dequantize_blocks(blocks)  # (..., n_blocks, block_size)
        n_values = raw.shape[-1] // self.type_size * self.block_size
        return values.reshape(*raw.shape[:-1], n_values).astype(np.float32, copy=False)

    def _dequantize_blocks(self, blocks: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<BlockFormat {self.name}>"


# -- plain floats: one value per "block" ------------------------------------------------

class F32Format(BlockFormat):
    name, ggml_type, block_size = "F32", GGMLQuantizationType.F32, 1
    layout = np.dtype("<f4")
    vec_dot_type = "F32"  # activations used as they are

    def _dequantize_blocks(self, blocks: np.ndarray) -> np.ndarray:
        return blocks.astype(np.float32)[..., None]  # a copy: callers may write into it


class F16Format(BlockFormat):
    name, ggml_type, block_size = "F16", GGMLQuantizationType.F16, 1
    layout = np.dtype("<f2")  # IEEE half
    vec_dot_type = "F16"

    def _dequantize_blocks(self, blocks: np.ndarray) -> np.ndarray:
        return blocks.astype(np.float32)[..., None]


class BF16Format(BlockFormat):
    name, ggml_type, block_size = "BF16", GGMLQuantizationType.BF16, 1
    layout = np.dtype("<u2")  # the upper 16 bits of a float32
    vec_dot_type = "BF16"

    def _dequantize_blocks(self, blocks: np.ndarray) -> np.ndarray:
        return bf16_to_f32(blocks)[..., None]


# -- 32-value blocks with one f16 scale --------------------------------------------------

class Q8_0Format(BlockFormat):
    """value = d * qs[j]"""

    name, ggml_type, block_size = "Q8_0", GGMLQuantizationType.Q8_0, QK8_0
    layout = np.dtype([("d", "<f2"), ("qs", "i1", QK8_0)])  # 34 bytes
    vec_dot_type = "Q8_0"

    def _dequantize_blocks(self, blocks: np.ndarray) -> np.ndarray:
        d = blocks["d"].astype(np.float32)[..., None]
        return d * blocks["qs"].astype(np.float32)


class Q4_0Format(BlockFormat):
    """value j = d * ((qs[j] & 0xF) - 8), value j + 16 = d * ((qs[j] >> 4) - 8), j < 16."""

    name, ggml_type, block_size = "Q4_0", GGMLQuantizationType.Q4_0, QK8_0
    layout = np.dtype([("d", "<f2"), ("qs", "u1", QK8_0 // 2)])  # 18 bytes
    vec_dot_type = "Q8_0"

    def _dequantize_blocks(self, blocks: np.ndarray) -> np.ndarray:
        d = blocks["d"].astype(np.float32)[..., None]
        qs = blocks["qs"]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.int8) - np.int8(8)
        return d * q.astype(np.float32)


FORMATS: dict[GGMLQuantizationType, BlockFormat] = {
    f.ggml_type: f for f in (F32Format(), F16Format(), BF16Format(), Q8_0Format(), Q4_0Format())
}


def format_for(ggml_type: GGMLQuantizationType | int) -> BlockFormat:
    """The format of a ggml type (enum or its integer value); UnsupportedQuantType if none."""
    try:
        t = GGMLQuantizationType(int(ggml_type))
    except ValueError:
        raise UnsupportedQuantType(ggml_type, "is not a known ggml type") from None
    fmt = FORMATS.get(t)
    if fmt is None:
        raise UnsupportedQuantType(t)
    return fmt


# -- activation conversions (numpy references for ggml's from_float) ---------------------

def round_f16(x: np.ndarray) -> np.ndarray:
    """float32 -> nearest float16 (ties to even, overflow to inf, as F16C), returned as float32."""
    with np.errstate(over="ignore"):
        return np.asarray(x, dtype=np.float32).astype(np.float16).astype(np.float32)


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32: the bits become the float's upper half."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), as ggml_compute_fp32_to_bf16: NaN stays a quiet NaN,
    everything else rounds to nearest even (overflowing to inf)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    is_nan = (u & 0x7FFFFFFF) > 0x7F800000
    rounded = (u.astype(np.uint64) + (0x7FFF + ((u >> 16) & 1))) >> 16
    return np.where(is_nan, (u >> 16) | 64, rounded).astype(np.uint16)


def round_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> nearest bfloat16 (ggml's rounding), returned as float32."""
    return bf16_to_f32(f32_to_bf16(x))


def quantize_q8_0_ref(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Activations -> Q8_0 blocks, as ggml's x86 `quantize_row_q8_0`.

    x: float32 (n, k), k a multiple of 32. Returns qs int8 (n, k) and d float32 (n, k // 32),
    where d already holds the fp16-rounded scale the dot product uses. Note the quantizer
    multiplies by id = 127 / amax (not 1 / d) and rounds half to even.
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] % QK8_0:
        raise ValueError(f"expected float32 (n, k) with k a multiple of {QK8_0}, got {x.shape}")
    blocks = x.reshape(x.shape[0], -1, QK8_0)
    amax = np.abs(blocks).max(axis=-1)
    d = amax / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(amax != 0, np.float32(127) / amax, np.float32(0))
    qs = np.rint(blocks * inv[..., None]).astype(np.int8).reshape(x.shape)
    with np.errstate(over="ignore"):
        d16 = d.astype(np.float16).astype(np.float32)
    return qs, d16


QK_K = 256  # values per k-quant super-block (and per Q8_K block)


def quantize_q8_k_ref(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Activations -> Q8_K blocks, as ggml's `quantize_row_q8_K` (the k-quants' partner).

    x: float32 (n, k), k a multiple of 256. Returns qs int8 (n, k), d float32 (n, k // 256)
    and bsums int16 (n, k // 16) (sums of each 16 qs, which k-quant dots use for the
    weights' offsets). The scale comes from the signed value of largest magnitude (the
    first one on ties): iscale = -127 / max, q = min(127, round-half-even(iscale * x)),
    d = 1 / iscale, kept as float32.
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] % QK_K:
        raise ValueError(f"expected float32 (n, k) with k a multiple of {QK_K}, got {x.shape}")
    blocks = x.reshape(x.shape[0], -1, QK_K)
    signed_max = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=-1)[..., None], axis=-1)[..., 0]
    with np.errstate(divide="ignore"):
        iscale = np.where(signed_max != 0, np.float32(-127) / signed_max, np.float32(0)).astype(np.float32)
        d = np.where(iscale != 0, np.float32(1) / iscale, np.float32(0)).astype(np.float32)
    qs = np.minimum(np.rint(blocks * iscale[..., None]), 127).astype(np.int8)
    bsums = qs.reshape(x.shape[0], -1, 16).astype(np.int16).sum(axis=-1, dtype=np.int16)
    return qs.reshape(x.shape), d, bsums


def activation_ref(vec_dot_type: str, x: np.ndarray) -> np.ndarray:
    """The values a weight's dot product actually sees for activations x (float32 (n, k))."""
    x = np.asarray(x, dtype=np.float32)
    if vec_dot_type == "F32":
        return x.copy()
    if vec_dot_type == "F16":
        return round_f16(x)
    if vec_dot_type == "BF16":
        return round_bf16(x)
    if vec_dot_type == "Q8_0":
        qs, d = quantize_q8_0_ref(x)
        return (qs.reshape(len(x), -1, QK8_0) * d[..., None]).reshape(x.shape)
    if vec_dot_type == "Q8_1":
        from .q4_1_q5 import activation_q8_1_ref

        return activation_q8_1_ref(x)
    if vec_dot_type == "Q8_K":
        qs, d, _ = quantize_q8_k_ref(x)
        return (qs.reshape(len(x), -1, QK_K) * d[..., None]).reshape(x.shape)
    raise ValueError(f"no activation conversion for vec_dot_type {vec_dot_type!r}")


# -- a weight matrix in its encoding ------------------------------------------------------

@dataclass
class QMatrix:
    """n_rows outputs x n_cols inputs (ggml ne = [n_cols, n_rows]), as encoded rows.

    `data` is uint8 (n_rows, row_bytes), C-contiguous; typically a read-only view into
    the GGUF file's memory map, so building a QMatrix never copies or decodes weights.
    """

    fmt: BlockFormat
    n_rows: int
    n_cols: int
    data: np.ndarray

    def __post_init__(self) -> None:
        shape = (self.n_rows, self.fmt.row_bytes(self.n_cols))
        d = self.data
        if not isinstance(d, np.ndarray) or d.dtype != np.uint8 or d.shape != shape:
            got = f"{d.dtype} {d.shape}" if isinstance(d, np.ndarray) else type(d).__name__
            raise ValueError(f"{self.fmt.name} matrix {self.n_rows}x{self.n_cols} needs uint8 {shape}, got {got}")
        if not d.flags.c_contiguous:
            raise ValueError(f"{self.fmt.name} matrix data must be C-contiguous")

    @classmethod
    def from_raw(cls, ggml_type: GGMLQuantizationType | int, data: np.ndarray, n_rows: int, n_cols: int) -> QMatrix:
        """Wrap any C-contiguous view of exactly the matrix's bytes (e.g. gguf's ReaderTensor.data,
        float32/float16/uint8 by type) as uint8 rows, without copying."""
        fmt = format_for(ggml_type)
        row_bytes = fmt.row_bytes(n_cols)
        if not isinstance(data, np.ndarray) or not data.flags.c_contiguous:
            raise ValueError(f"{fmt.name} matrix data must be a C-contiguous array")
        if data.nbytes != n_rows * row_bytes:
            raise ValueError(
                f"{fmt.name} matrix {n_rows}x{n_cols} is {n_rows * row_bytes} bytes, the data is {data.nbytes}"
            )
        raw = np.asarray(data).reshape(-1).view(np.uint8).reshape(n_rows, row_bytes)
        return cls(fmt, n_rows, n_cols, raw)

    @cached_property
    def address(self) -> int:
        """Where the rows start in memory, for C calls that take many matrices at once
        (kernels.moe): the data array keeps the memory alive as long as this matrix."""
        return self.data.ctypes.data

    def dequantize(self) -> np.ndarray:
        """The whole matrix as float32 (n_rows, n_cols). For tests and small tensors only."""
        return self.fmt.dequantize(self.data)
