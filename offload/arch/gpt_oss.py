"""`gpt-oss`: gpt-oss-20b and gpt-oss-120b (OpenAI; 32 / 128 experts, top-4, MXFP4 experts).

Conventions, as llama.cpp runs this arch (src/models/openai-moe.cpp, build_moe_ffn):
- attention: GQA with head_dim from `attention.key_length` (64, not n_embd / n_head), q, k,
  v and output biases, NEOX RoPE with YaRN (factor 32 over an original 4096 context), scale
  1/sqrt(head_dim), one learned sink logit per head (`attn_sinks`) in each softmax; the
  layers `attention.sliding_window_pattern` marks (by default the even ones) see only the
  last `attention.sliding_window` positions (128), the others all of them; sliding layers
  may have their own RoPE base (`rope.freq_base_swa`).
- the FFN's norm is `post_attention_norm`; the router adds a bias to its logits, takes the
  top-k of the raw logits and a softmax over those k; each expert's gate, up and down add a
  bias, and the activation is swiglu_oai (clamped at 7, sigmoid(1.702 a)).
- the rows whose logits are not wanted are dropped after the last layer, not after its
  attention (openai-moe.cpp without embeddings_nextn_masked).
"""

from __future__ import annotations

from ..errors import UnsupportedModelError
from ..gguf_file import GGUFFile
from .base import ModelArgs, common_fields, hparam, moe_fields


def swa_layers(gguf: GGUFFile, n_layer: int) -> tuple[bool, ...]:
    """Which layers slide: the file's per-layer pattern (an array of bools), or a period n
    where the last layer of each n is full (llama.cpp's set_swa_pattern; default 2)."""
    pattern = gguf.get(f"{gguf.architecture}.attention.sliding_window_pattern", 2)
    if isinstance(pattern, list):
        if len(pattern) < n_layer:
            raise UnsupportedModelError(f"{gguf.path}: sliding_window_pattern has {len(pattern)} entries "
                                        f"for {n_layer} layers")
        return tuple(bool(x) for x in pattern[:n_layer])
    n = int(pattern)
    return tuple(n == 0 or i % n < n - 1 for i in range(n_layer))


def model_args(gguf: GGUFFile) -> ModelArgs:
    common = common_fields(gguf)
    base_swa = gguf.get(f"{gguf.architecture}.rope.freq_base_swa")
    return ModelArgs(**common, **moe_fields(gguf), rope_style="neox", routing="topk_softmax",
                     attn_bias=True, attn_out_bias=True, attn_sinks=True,
                     sliding_window=int(hparam(gguf, "attention.sliding_window")),
                     swa_layers=swa_layers(gguf, common["n_layer"]),
                     rope_base_swa=float(base_swa) if base_swa is not None else None,
                     router_bias=True, expert_bias=True, expert_act="swiglu_oai", ffn_norm="post_attention_norm",
                     early_row_drop=False)
