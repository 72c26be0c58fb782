"""KV cache types: how the keys and values of past positions are stored, as llama.cpp does.

llama.cpp stores each new key and value row by converting it from float32 to the cache's
type (ggml_set_rows with the type's `from_float`: F16 and BF16 round to nearest even, Q8_0
quantizes as its activation quantizer, Q4_0 as quantize_row_q4_0_ref). Attention then
reads the rows in that type: its matmuls convert the other operand to the type's
vec_dot_type (kernels.attention.attention_typed).

Without flash attention (offload has none yet) llama.cpp refuses a quantized V cache, and
an MLA model (DeepSeek) keeps one cache for both, so K and V must be the same type there.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from .errors import UnsupportedModelError
from .kernels.formats import BlockFormat, f32_to_bf16, format_for

# the names llama.cpp's -ctk / -ctv take
CACHE_TYPES: dict[str, GGMLQuantizationType] = {
    "f32": GGMLQuantizationType.F32,
    "f16": GGMLQuantizationType.F16,
    "bf16": GGMLQuantizationType.BF16,
    "q8_0": GGMLQuantizationType.Q8_0,
    "q4_0": GGMLQuantizationType.Q4_0,
}
DEFAULT_CACHE_TYPE = "f32"  # PENDING


def cache_format(name: str) -> BlockFormat:
    """The block format of a cache type name; a one-line error for an unknown one."""
    t = CACHE_TYPES.get(str(name).lower())
    if t is None:
        raise UnsupportedModelError(f"unknown KV cache type {name!r} (choose from {', '.join(CACHE_TYPES)})")
    return format_for(t)


def check_cache_types(type_k: str, type_v: str, attention: str, head_dim: int) -> tuple[BlockFormat, BlockFormat]:
    """The formats of K and V, refused in one line where llama.cpp refuses them without flash
    attention: a quantized V; different K and V for MLA; a block longer than a head."""
    k, v = cache_format(type_k), cache_format(type_v)
    if v.block_size > 1:
        raise UnsupportedModelError(f"a quantized V cache ({type_v}) needs flash attention, which offload does not "
                                    "have: use -ctv f16 or f32")
    if attention != "gqa" and k.name != v.name:
        raise UnsupportedModelError(f"this model (MLA) keeps K and V in one cache: -ctk {type_k} and -ctv {type_v} "
                                    "must be the same type")
    if head_dim % k.block_size:
        raise UnsupportedModelError(f"K cache type {type_k} has blocks of {k.block_size} values, which do not divide "
                                    f"the head size {head_dim}")
    return k, v


def row_bytes(fmt: BlockFormat, n: int) -> int:
    """Bytes of one cached row of n values in this format."""
    return fmt.row_bytes(n)


def encode_rows(fmt: BlockFormat, x: np.ndarray) -> np.ndarray:
    """float32 (n, width) rows in the cache's encoding: float32 for F32, else uint8 (n, bytes),
    converted as ggml_set_rows converts them."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    name = fmt.name
    if name == "F32":
        return x
    if name == "F16":
        with np.errstate(over="ignore"):
            return x.astype(np.float16).view(np.uint8)
    if name == "BF16":
        return f32_to_bf16(x).view(np.uint8)
    if name == "Q8_0":
        from .kernels.dispatch import ACTIVATION_CONVERTERS

        qs, d = ACTIVATION_CONVERTERS["Q8_0"](x)  # quantize_row_q8_0, as the activations
        return _blocks(fmt, d, qs.reshape(len(x), -1, 32))
    if name == "Q4_0":
        return _quantize_q4_0(fmt, x)
    raise UnsupportedModelError(f"no KV cache encoding for {name}")


def _blocks(fmt: BlockFormat, d: np.ndarray, qs: np.ndarray) -> np.ndarray:
    """Blocks (fp16 scale, quants) of this format as uint8 rows."""
    blocks = np.empty(d.shape, dtype=fmt.layout)
    with np.errstate(over="ignore"):
        blocks["d"] = d.astype(np.float16)
    blocks["qs"] = qs
    return blocks.view(np.uint8).reshape(len(d), -1)


def _quantize_q4_0(fmt: BlockFormat, x: np.ndarray) -> np.ndarray:
    """ggml's quantize_row_q4_0_ref: d = the signed absmax / -8, q = min(15, trunc(x/d + 8.5))."""
    b = x.reshape(len(x), -1, 32)
    pick = np.argmax(np.abs(b), axis=-1)  # the first of equal magnitudes, as `amax < |v|`
    signed_max = np.take_along_axis(b, pick[..., None], axis=-1)[..., 0]
    d = signed_max / np.float32(-8)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    q = np.minimum(15, (b * inv[..., None] + np.float32(8.5)).astype(np.int8)).astype(np.uint8)
    return _blocks(fmt, d, q[..., :16] | (q[..., 16:] << 4))
