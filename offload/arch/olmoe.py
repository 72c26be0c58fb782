"""`olmoe`: OLMoE-1B-7B (64 experts, top-8).

Conventions, as llama.cpp runs this arch (src/models/olmoe.cpp): RoPE on halves ("neox"),
RMSNorm over the whole q and k projections (before splitting into heads and RoPE), no
biases, no shared expert. The router is softmax over all experts then top-k without
renormalization (norm_w = false). The expert hidden size is `feed_forward_length`.
"""

from __future__ import annotations

from ..gguf_file import GGUFFile
from .base import ModelArgs, common_fields, moe_fields


def model_args(gguf: GGUFFile) -> ModelArgs:
    return ModelArgs(**common_fields(gguf), **moe_fields(gguf, "feed_forward_length"), rope_style="neox",
                     routing="softmax_topk", qk_norm="full")
