"""KV cache types: how the keys and values of past positions are stored, as llama.cpp does.

llama.cpp stores each new key and value row by converting it from float32 to the cache's
type (ggml_set_rows with the type's `from_float`: F16 and BF16 round to nearest even, Q8_0
quantizes as its activation quantizer, Q4_0, Q4_1, Q5_0, Q5_1 and IQ4_NL as ggml's
reference quantizers quantize_row_*_ref). Attention then
reads the rows in that type: its matmuls convert the other operand to the type's
vec_dot_type (kernels.attention.attention_typed).

Before a quantized K cache stores them, llama.cpp rotates queries and keys by a Hadamard
matrix when 64 divides the head size (attn_rot_k: rounding errors spread over the head),
which offload does too (key_rotation, kernels.ggml_math.hadamard_rows).

Without flash attention llama.cpp refuses a quantized V cache (with it, values are rotated
too: value_rotation), and an MLA model (DeepSeek) keeps one cache for both, so K and V must
be the same type there. Flash attention (-fa, flash_attention_wanted) changes the attention's
sums, not the cache: kernels.attention.flash_attention follows llama.cpp's kernel for it.
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
    "q4_1": GGMLQuantizationType.Q4_1,
    "q5_0": GGMLQuantizationType.Q5_0,
    "q5_1": GGMLQuantizationType.Q5_1,
    "iq4_nl": GGMLQuantizationType.IQ4_NL,
}
# llama.cpp's default; attention reads F16 rows directly in the C kernel and in its Numba
# twin (kernels.attention), so an F16 cache needs no other kernels than an F32 one
DEFAULT_CACHE_TYPE = "f16"


def cache_format(name: str) -> BlockFormat:
    """The block format of a cache type name; a one-line error for an unknown one."""
    t = CACHE_TYPES.get(str(name).lower())
    if t is None:
        raise UnsupportedModelError(f"unknown KV cache type {name!r} (choose from {', '.join(CACHE_TYPES)})")
    return format_for(t)


# llama.cpp's -fa values
FLASH_ATTN_MODES = ("on", "off", "auto")


def flash_attention_wanted(mode: str | bool, type_v: str) -> bool:
    """Whether attention runs as flash attention (kernels.attention.flash_attention): -fa on or
    off, or auto: only where the V cache needs it (a quantized V), since offload's attention
    without it is the faster one. (llama.cpp's auto turns it on wherever the backend has it.)"""
    if isinstance(mode, bool):
        return mode
    mode = str(mode).lower()
    if mode not in FLASH_ATTN_MODES:
        raise UnsupportedModelError(f"--flash-attn takes on, off or auto, not {mode!r}")
    return cache_format(type_v).block_size > 1 if mode == "auto" else mode == "on"


def check_cache_types(type_k: str, type_v: str, attention: str, head_dim: int,
                      flash_attn: bool = False) -> tuple[BlockFormat, BlockFormat]:
    """The formats of K and V, refused in one line where llama.cpp refuses them (a quantized V
    without flash attention; different K and V for MLA; a block longer than a head; flash
    attention over a legacy DeepSeek file's decompressed heads; see also check_flash_heads)."""
    k, v = cache_format(type_k), cache_format(type_v)
    if v.block_size > 1 and not flash_attn:
        raise UnsupportedModelError(f"a quantized V cache ({type_v}) needs flash attention: add -fa on (or use "
                                    "-ctv f16 or f32)")
    if attention != "gqa" and k.name != v.name:
        raise UnsupportedModelError(f"this model (MLA) keeps K and V in one cache: -ctk {type_k} and -ctv {type_v} "
                                    "must be the same type")
    if head_dim % k.block_size:
        raise UnsupportedModelError(f"K cache type {type_k} has blocks of {k.block_size} values, which do not divide "
                                    f"the head size {head_dim}")
    if flash_attn:
        if attention == "mla_decompressed":  # (llama.cpp's flash attention asserts on these keys and values)
            raise UnsupportedModelError("flash attention over a legacy DeepSeek file's decompressed heads (keys wider "
                                        "than values) is not supported, as in llama.cpp: use -fa off")
    return k, v


def check_flash_heads(args) -> None:
    """Refuse, in one line, heads offload's flash attention kernel has no code for (sizes of
    32s, as every released model's; MLA's: the latent and RoPE key, and the latent)."""
    if args.attention == "mla":
        dk, dv = args.kv_lora_rank + args.rope_dim, args.kv_lora_rank
    else:
        dk, dv = args.head_dim, args.v_dim
    if dk % 32 or dv % 32:
        raise UnsupportedModelError(f"offload's flash attention needs heads of multiples of 32 values, not {dk}/{dv}: "
                                    "use -fa off")


def value_rotation(fmt: BlockFormat, args) -> int:
    """The Hadamard rotation llama.cpp applies to values before a quantized V cache stores them,
    undone on the attention's output (llama_kv_cache's attn_rot_v: 64 x 64, for value heads
    whose size 64 divides), or 0 for none."""
    if fmt.block_size == 1 or args.v_dim % 64 or args.attention != "gqa":
        return 0
    return 64


def key_rotation(fmt: BlockFormat, args) -> int:
    """The size of the Hadamard rotation llama.cpp applies to queries and keys before a
    quantized K cache stores them (llama_kv_cache's attn_rot_k, for heads whose size 64
    divides; the largest power of two dividing the head, from 64), or 0 for none. (MLA keeps
    K and V in one cache, and offload refuses a quantized V, so only GQA gets here.)"""
    if fmt.block_size == 1 or args.head_dim % 64 or args.attention != "gqa":
        return 0
    n = 64
    while args.head_dim % (2 * n) == 0:
        n *= 2
    return n


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
    if name in ("Q4_0", "Q5_0"):
        return _quantize_symmetric(fmt, x, bits=4 if name == "Q4_0" else 5)
    if name in ("Q4_1", "Q5_1"):
        return _quantize_with_min(fmt, x, bits=4 if name == "Q4_1" else 5)
    if name == "IQ4_NL":
        return _quantize_iq4_nl(fmt, x)
    raise UnsupportedModelError(f"no KV cache encoding for {name}")


def _blocks(fmt: BlockFormat, d: np.ndarray, q: np.ndarray, m: np.ndarray | None = None) -> np.ndarray:
    """Blocks of this format as uint8 rows, from the fp16 scale d (and min m) and the 32
    quants of each block: low nibbles of values j and j + 16 share byte j, fifth bits in qh."""
    blocks = np.empty(d.shape, dtype=fmt.layout)
    with np.errstate(over="ignore"):
        blocks["d"] = d.astype(np.float16)
        if m is not None:
            blocks["m"] = m.astype(np.float16)
    if fmt.name == "Q8_0":
        blocks["qs"] = q
    else:
        q = q.astype(np.uint8)
        blocks["qs"] = (q[..., :16] & 0x0F) | ((q[..., 16:] & 0x0F) << 4)
        if "qh" in fmt.layout.names:
            fifth = ((q >> 4) & 1).astype(np.uint32) << np.arange(32, dtype=np.uint32)
            blocks["qh"] = np.bitwise_or.reduce(fifth, axis=-1).astype("<u4")[..., None].view(np.uint8)
    return blocks.view(np.uint8).reshape(len(d), -1)


def _div_or_zero(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)


def _quantize_symmetric(fmt: BlockFormat, x: np.ndarray, bits: int) -> np.ndarray:
    """quantize_row_q4_0_ref / q5_0_ref: d = the signed absmax / -2^(bits-1),
    q = min(2^bits - 1, trunc(x / d + 2^(bits-1) + 0.5))."""
    b = x.reshape(len(x), -1, 32)
    pick = np.argmax(np.abs(b), axis=-1)  # the first of equal magnitudes, as `amax < |v|`
    signed_max = np.take_along_axis(b, pick[..., None], axis=-1)[..., 0]
    half = 1 << (bits - 1)
    d = signed_max / np.float32(-half)
    q = np.minimum(2 * half - 1, (b * _div_or_zero(d)[..., None] + np.float32(half + 0.5)).astype(np.int8))
    return _blocks(fmt, d, q)


def _quantize_with_min(fmt: BlockFormat, x: np.ndarray, bits: int) -> np.ndarray:
    """quantize_row_q4_1_ref / q5_1_ref: d = (max - min) / (2^bits - 1), m = min,
    q = trunc((x - min) / d + 0.5) (at most 15 for Q4_1)."""
    b = x.reshape(len(x), -1, 32)
    lo, hi = b.min(axis=-1), b.max(axis=-1)
    d = (hi - lo) / np.float32((1 << bits) - 1)
    q = ((b - lo[..., None]) * _div_or_zero(d)[..., None] + np.float32(0.5)).astype(np.int8)
    if bits == 4:
        q = np.minimum(15, q)
    return _blocks(fmt, d, q, lo)


def _quantize_iq4_nl(fmt: BlockFormat, x: np.ndarray) -> np.ndarray:
    """quantize_row_iq4_nl_ref (quantize_row_iq4_nl_impl with no importance weights and ntry
    -1, so no scale search): max = the value of largest magnitude (the first of equals),
    codes = the nearest table value to x * (1 / (max / -127)), then the scale refit by least
    squares with weights x^2, summed in float32 in value order: d = sum(w q x) / sum(w q q).
    A block below GROUP_MAX_EPS gets d = 0 (its codes do not matter then)."""
    from .kernels.iq4 import KVALUES

    values = KVALUES.astype(np.float32)
    b = x.reshape(len(x), -1, 32)
    pick = np.argmax(np.abs(b), axis=-1)
    signed_max = np.take_along_axis(b, pick[..., None], axis=-1)[..., 0]
    tiny = np.abs(signed_max) < np.float32(1e-15)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        d0 = signed_max / values[0]
        inv = (np.float32(1) / d0).astype(np.float32)
        scaled = (b * inv[..., None]).astype(np.float32)
    # best_index_int8: the upper neighbour unless the lower one is strictly nearer
    upper = np.clip(np.searchsorted(values, scaled, side="right"), 1, 15)
    with np.errstate(invalid="ignore"):
        nearer_lower = (scaled - values[upper - 1]) < (values[upper] - scaled)
    codes = np.where(scaled <= values[0], 0, np.where(scaled >= values[15], 15, upper - nearer_lower))
    codes = np.where(tiny[..., None], 0, codes)
    q = values[codes]
    sum_qx = np.zeros(b.shape[:2], dtype=np.float32)
    sum_q2 = np.zeros(b.shape[:2], dtype=np.float32)
    for j in range(32):
        xj, qj = b[..., j], q[..., j]
        wq = (xj * xj) * qj
        sum_qx = sum_qx + wq * xj
        sum_q2 = sum_q2 + wq * qj
    with np.errstate(divide="ignore", invalid="ignore"):
        d = np.where(sum_q2 > 0, sum_qx / np.where(sum_q2 > 0, sum_q2, 1), 0).astype(np.float32)
    d = np.where(tiny, np.float32(0), d)
    return _blocks(fmt, d, codes.astype(np.uint8))
