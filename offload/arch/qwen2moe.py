"""`qwen2moe`: Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B.

Conventions, as llama.cpp runs this arch (src/models/qwen2moe.cpp): RoPE on halves
("neox"), biases on q, k and v (added after each projection), no q/k norm. The router is
softmax over all experts then top-k, without renormalization (llama.cpp passes
norm_w = false for this arch and reads no metadata for it; HF's norm_topk_prob is false on
the released models). Each layer adds a shared expert (`ffn_*_shexp`, hidden size
`expert_shared_feed_forward_length`) scaled by sigmoid(ffn_gate_inp_shexp · x).
"""

from __future__ import annotations

from ..gguf_file import GGUFFile
from .base import ModelArgs, common_fields, moe_fields


def model_args(gguf: GGUFFile) -> ModelArgs:
    return ModelArgs(**common_fields(gguf), **moe_fields(gguf), rope_style="neox", routing="softmax_topk",
                     attn_bias=True, shared_expert=True)
