"""Weight formats and matmul kernels: GGUF blocks stay encoded, kernels decode inside the dot.

`formats` says what the bytes mean (numpy references), `numba_kernels` computes with them,
`dispatch` glues the two with llama.cpp's CPU numerics (activations converted to the weight
type's vec_dot_type before the dot product).
"""

from .dispatch import ACTIVATION_CONVERTERS, KERNELS, dequantize_rows, matmul, matmul_f32_arrays, matmul_ref
from .formats import (
    FORMATS,
    BlockFormat,
    QMatrix,
    UnsupportedQuantType,
    activation_ref,
    bf16_to_f32,
    f32_to_bf16,
    format_for,
    quantize_q8_0_ref,
    quantize_q8_k_ref,
    round_bf16,
    round_f16,
)
from .numba_kernels import quantize_q8_0, quantize_q8_k

__all__ = [
    "ACTIVATION_CONVERTERS",
    "BlockFormat",
    "FORMATS",
    "KERNELS",
    "QMatrix",
    "UnsupportedQuantType",
    "activation_ref",
    "bf16_to_f32",
    "dequantize_rows",
    "f32_to_bf16",
    "format_for",
    "matmul",
    "matmul_f32_arrays",
    "matmul_ref",
    "quantize_q8_0",
    "quantize_q8_0_ref",
    "quantize_q8_k",
    "quantize_q8_k_ref",
    "round_bf16",
    "round_f16",
]
