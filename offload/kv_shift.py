"""The K-shift: after a context shift has moved cached positions (forward.KVCache.shift),
their keys are rotated by the move before the next step, as llama.cpp's build_graph_shift
does: ggml_rope_ext over each layer's cached keys with every cell's accumulated shift as its
position (0 for the cells not moved, which RoPE leaves as they are up to YaRN's magnitude,
which it applies to all of them alike), only the RoPE'd part of each head (the first
rope_dim values; MLA's last rope_dim). F32 keys are rotated in place; F16 ones converted to
float32, rotated and rounded back, as ggml's F16 RoPE does.

Other K types llama.cpp cannot shift: its CPU RoPE has no BF16 kernel (it aborts), and its
dequantize-rope-requantize path for a quantized K crashes (llama-cpp-python 0.3.36, CPU), so
there is nothing to be equal to: refused in one line.
"""

from __future__ import annotations

import numpy as np

from .arch import ModelArgs
from .cache_types import cache_format, encode_rows
from .errors import UnsupportedModelError
from .kernels.ggml_math import apply_rope
from .rope import rope_tables


def check_can_shift(args: ModelArgs, type_k: str) -> None:
    """Refuse in one line a context shift this K cache cannot do as llama.cpp does."""
    fmt = cache_format(type_k)
    if fmt.name not in ("F32", "F16"):
        raise UnsupportedModelError(f"a context shift rotates the cached keys, which llama.cpp cannot do in a "
                                    f"{type_k} K cache: use -ctk f16 or f32 with --context-shift")


def rotate_keys(args: ModelArgs, k_rows: np.ndarray, fmt, shift: np.ndarray, base: float) -> None:
    """Rotate one layer's cached keys k_rows (n_cells, row), F32 or F16, in place by each cell's shift."""
    offset = 0 if args.attention == "gqa" else args.head_dim - args.rope_dim  # MLA: [nope, rope] per head
    rope, n_cells = args.rope_dim, len(k_rows)
    moves, which = np.unique(shift, return_inverse=True)
    cos, sin = rope_tables(args, 0, base, positions=moves)
    cos, sin = np.ascontiguousarray(cos[which]), np.ascontiguousarray(sin[which])
    f16 = fmt.name == "F16"
    heads = (k_rows.view(np.float16) if f16 else k_rows).reshape(n_cells, -1, args.head_dim)
    part = np.ascontiguousarray(heads[:, :, offset:offset + rope], dtype=np.float32)
    apply_rope(part, cos, sin, rope, args.rope_style)
    heads[:, :, offset:offset + rope] = encode_rows(fmt, part.reshape(n_cells, -1)).view(heads.dtype).reshape(part.shape)
