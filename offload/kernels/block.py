"""A decoding token's attention block in one C call (cext/layer.c).

For one token each step of the attention block is small, and the Python between the steps
(the norm, the Q/K/V matmuls, biases, q/k norms, two RoPE calls, the cache writes,
attention, the output matmul, the residual add) cost as much as the steps themselves on
the models people run on laptops. `attention_token` runs them back to back in C (with
gpt-oss's sliding window over a ring of cells, sinks and output bias too); each step
is computed as forward.Transformer._attention computes it (the reference, and the path for
prompts, float weights and the GPU tier), so the bits are the same.
"""

from __future__ import annotations

import numpy as np

from . import cext
from .dispatch import C_FORMATS, fused_enabled

_QK_NORM = {None: 0, "head": 1, "full": 2}


def attention_fits(w) -> bool:
    """Whether attention_token serves this layer's weights (weights.Attention): the C call is
    built, the C kernels serve its four matrices and it has all three q/k/v biases or none
    (OFFLOAD_FUSED=0 turns it off too)."""
    return (fused_enabled() and w.wq.fmt.ggml_type in C_FORMATS and w.wk.fmt.ggml_type in C_FORMATS
            and w.wv.fmt.ggml_type in C_FORMATS and w.wo.fmt.ggml_type in C_FORMATS
            and (w.bq is None) == (w.bk is None) == (w.bv is None))


def attention_scratch(args) -> np.ndarray:
    """The working memory of attention_token for this model (ModelArgs), allocated once."""
    n = cext.attention_token_scratch_bytes(args.n_embd, args.n_head, args.n_head_kv, args.head_dim)
    return np.empty((n + 3) // 4, dtype=np.float32)


# the KV cache types attention_token stores and reads (offload.cache_types)
CACHE_TYPES = ("F32", "F16")


def attention_token(args, w, x: np.ndarray, pos: int, cos: np.ndarray, sin: np.ndarray, k_cache: np.ndarray,
                    v_cache: np.ndarray, scratch: np.ndarray, window: int = 0, k_f16: bool = False,
                    v_f16: bool = False) -> None:
    """x (1, n_embd) float32 += the attention block's output for the token at `pos` (ModelArgs
    args, weights.Attention w: its biases, q/k norms, sinks and output bias if any), whose key
    and value are written into cell pos % n_cells of this layer's k_cache / v_cache (n_cells,
    n_head_kv * head_dim), as forward.KVCache.write does; `window`: the layer's sliding window
    (0: none); cos/sin: the position's RoPE row; k_f16 / v_f16: that cache holds F16 rows
    (uint8 (n_cells, 2 * n_head_kv * head_dim)), converted and read as llama.cpp does."""
    a = args
    dims = (a.n_embd, a.n_head, a.n_head_kv, a.head_dim, a.rope_dim, int(a.rope_style == "neox"), _QK_NORM[a.qk_norm],
            pos, a.rms_eps, window)
    cext.attention_token(dims, k_cache.shape[0], w.kernel_spec, x, scratch, w.norm, w.bq, w.bk, w.bv, w.q_norm, w.k_norm,
                         cos, sin, k_cache, v_cache, w.bo, w.sinks, k_f16, v_f16)
