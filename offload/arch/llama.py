"""`llama`: Llama and Mistral (dense), Mixtral and its kin (`llama.expert_count` > 0).

Conventions, as llama.cpp runs this arch: RoPE on adjacent pairs ("normal"; the GGUF
converter permutes Q/K rows so that this is right), router = softmax over all experts,
top-k, then the k weights renormalized to sum to 1. No biases, no q/k norms.
"""

from __future__ import annotations

from ..gguf_file import GGUFFile
from .base import ModelArgs, hparam, per_layer_constant, rope_freq_scale


def model_args(gguf: GGUFFile) -> ModelArgs:
    n_embd = int(hparam(gguf, "embedding_length"))
    n_head = per_layer_constant(gguf, "attention.head_count")
    head_dim = int(hparam(gguf, "attention.key_length", n_embd // n_head))
    n_expert = int(hparam(gguf, "expert_count", 0))
    n_ff = int(hparam(gguf, "feed_forward_length", 0))
    return ModelArgs(
        arch="llama",
        n_vocab=int(gguf.tensor("token_embd.weight").shape[1]),
        n_embd=n_embd,
        n_layer=int(hparam(gguf, "block_count")),
        n_head=n_head,
        n_head_kv=per_layer_constant(gguf, "attention.head_count_kv", n_head),
        head_dim=head_dim,
        n_ctx_train=int(hparam(gguf, "context_length", 4096)),
        rms_eps=float(hparam(gguf, "attention.layer_norm_rms_epsilon", 1e-5)),
        rope_base=float(hparam(gguf, "rope.freq_base", 10000.0)),
        rope_dim=int(hparam(gguf, "rope.dimension_count", head_dim)),
        rope_style="normal",
        rope_freq_scale=rope_freq_scale(gguf),
        n_ff=n_ff,
        n_expert=n_expert,
        n_expert_used=int(hparam(gguf, "expert_used_count", 0)) if n_expert else 0,
        n_ff_exp=int(hparam(gguf, "expert_feed_forward_length", n_ff)) if n_expert else 0,
        routing="softmax_topk_norm",
    )
