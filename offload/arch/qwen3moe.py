"""`qwen3moe`: Qwen3-MoE (Qwen3-30B-A3B: 128 experts, top-8; Qwen3-235B-A22B).

Conventions, as llama.cpp runs this arch (src/models/qwen3moe.cpp): RoPE on halves
("neox"), RMSNorm per head on q and k before RoPE, no biases, no shared expert. The router
is softmax over all experts, top-k, and llama.cpp always renormalizes the k weights
(norm_w = true, whatever the metadata says). The expert hidden size is
`expert_feed_forward_length`; the head size (`attention.key_length`) may differ from
n_embd / n_head.
"""

from __future__ import annotations

from ..gguf_file import GGUFFile
from .base import ModelArgs, common_fields, moe_fields


def model_args(gguf: GGUFFile) -> ModelArgs:
    return ModelArgs(**common_fields(gguf), **moe_fields(gguf), rope_style="neox", routing="softmax_topk_norm",
                     qk_norm="head")
