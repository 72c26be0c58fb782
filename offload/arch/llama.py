"""`llama`: Llama and Mistral (dense), Mixtral and its kin (`llama.expert_count` > 0).

Conventions, as llama.cpp runs this arch: RoPE on adjacent pairs ("normal"; the GGUF
converter permutes Q/K rows so that this is right), router = softmax over all experts,
top-k, then the k weights renormalized to sum to 1. No biases, no q/k norms.
"""

from __future__ import annotations

from ..gguf_file import GGUFFile
from .base import ModelArgs, common_fields, hparam


def model_args(gguf: GGUFFile) -> ModelArgs:
    n_expert = int(hparam(gguf, "expert_count", 0))
    n_ff = int(hparam(gguf, "feed_forward_length", 0))
    return ModelArgs(
        **common_fields(gguf, rms_eps_default=1e-5),
        rope_style="normal",
        n_ff=n_ff,
        n_expert=n_expert,
        n_expert_used=int(hparam(gguf, "expert_used_count", 0)) if n_expert else 0,
        n_ff_exp=int(hparam(gguf, "expert_feed_forward_length", n_ff)) if n_expert else 0,
        routing="softmax_topk_norm",
    )
