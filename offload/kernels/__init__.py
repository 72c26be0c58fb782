"""Weight formats and matmul kernels: GGUF blocks stay encoded, kernels decode inside the dot.

`formats` says what the bytes mean (numpy references), `numba_kernels` computes with them,
`dispatch` glues the two with llama.cpp's CPU numerics (activations converted to the weight
type's vec_dot_type before the dot product).
"""

from .dispatch import (
    ACTIVATION_CONVERTERS,
    C_FORMATS,
    TILED_KERNELS,
    KERNELS,
    NUMBA_KERNELS,
    dequantize_rows,
    kernels_in_use,
    matmul,
    matmul_f32_arrays,
    matmul_ref,
    matmuls,
    select_kernels,
)
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
from . import mxfp4, q2_k_q3_k, q4_1_q5, q4_k_q5_k, q6_k
from . import iq4, ternary
from . import iq_grid

# Formats that live in their own modules: registered here, with their kernels.
for _fmt, _kernel in (
    (q4_1_q5.Q4_1Format(), q4_1_q5.matmul_q4_1),
    (q4_1_q5.Q5_0Format(), q4_1_q5.matmul_q5_0),
    (q4_1_q5.Q5_1Format(), q4_1_q5.matmul_q5_1),
    (q2_k_q3_k.Q2_KFormat(), q2_k_q3_k.matmul_q2_k),
    (q2_k_q3_k.Q3_KFormat(), q2_k_q3_k.matmul_q3_k),
    (q4_k_q5_k.Q4_KFormat(), q4_k_q5_k.matmul_q4_k),
    (q4_k_q5_k.Q5_KFormat(), q4_k_q5_k.matmul_q5_k),
    (q6_k.Q6_KFormat(), q6_k.matmul_q6_k),
    (mxfp4.MXFP4Format(), mxfp4.matmul_mxfp4),
    (iq4.IQ4_NLFormat(), iq4.matmul_iq4_nl),
    (iq4.IQ4_XSFormat(), iq4.matmul_iq4_xs),
    (ternary.TQ1_0Format(), ternary.matmul_tq1_0),
    (ternary.TQ2_0Format(), ternary.matmul_tq2_0),
):
    FORMATS[_fmt.ggml_type] = _fmt
    NUMBA_KERNELS[_fmt.ggml_type] = _kernel
for _fmt in iq_grid.FORMATS:  # IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ1_S, IQ1_M
    FORMATS[_fmt.ggml_type] = _fmt
    NUMBA_KERNELS[_fmt.ggml_type] = iq_grid.kernel_for(_fmt)
select_kernels()

__all__ = [
    "ACTIVATION_CONVERTERS",
    "C_FORMATS",
    "TILED_KERNELS",
    "NUMBA_KERNELS",
    "kernels_in_use",
    "select_kernels",
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
    "matmuls",
    "quantize_q8_0",
    "quantize_q8_0_ref",
    "quantize_q8_k",
    "quantize_q8_k_ref",
    "round_bf16",
    "round_f16",
]
