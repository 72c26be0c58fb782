"""`deepseek2`: DeepSeek-V2 / V2-Lite / V2.5 / V3 / R1, Kimi-K2 (and files converted like them).

Conventions, as llama.cpp runs this arch (src/models/deepseek2.cpp, build_moe_ffn):
- attention is MLA: each token caches one latent (kv_lora_rank floats, RMS-normed) and one
  RoPE key (rope.dimension_count floats, NORM-style pairs) for all heads; queries (plain,
  or through q_a -> q_a_norm -> q_b when q_lora_rank > 0) split per head into a "nope" part,
  absorbed into the latent space through attn_k_b, and a RoPE part; attention runs over
  [latent, rope key] as one KV head, the latent doubling as the values, and attn_v_b maps
  each head's result back out. Head sizes come from key_length_mla / value_length_mla.
  With YaRN the score scale carries mscale^2 (rope.scaling.yarn_log_multiplier). Older
  conversions (one attn_kv_b, no *_mla keys) decompress the latent into per-head keys
  (+ the shared rope key) and values, and cache those (llama.cpp's non-MLA path).
- the first leading_dense_block_count layers have a dense FFN; the others route over the
  experts and add expert_shared_count shared experts (one FFN of that many times the width).
- routing: softmax or sigmoid scores (expert_gating_func), `exp_probs_b` added for choosing
  only, optionally within the best expert groups; the chosen scores, renormalized if
  expert_weights_norm, times expert_weights_scale.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..gguf_file import GGUFFile
from .base import ModelArgs, common_fields, gated_routing, hparam, moe_fields



def model_args(gguf: GGUFFile) -> ModelArgs:
    common = common_fields(gguf)
    k_mla = int(gguf.get(f"{gguf.architecture}.attention.key_length_mla", 0) or 0)
    v_mla = int(gguf.get(f"{gguf.architecture}.attention.value_length_mla", 0) or 0)
    if k_mla and v_mla:  # MLA, absorbed: one KV "head" of [latent, rope key]
        attention, head_dim, v_head_dim, n_head_kv = "mla", k_mla, v_mla, 1
    else:  # an older conversion (attn_kv_b): per-head keys and values, as llama.cpp runs it
        attention, head_dim, n_head_kv = "mla_decompressed", common["head_dim"], common["n_head"]
        v_head_dim = int(hparam(gguf, "attention.value_length"))
    yarn = common.get("yarn")
    if yarn is not None:
        log_mul = float(gguf.get(f"{gguf.architecture}.rope.scaling.yarn_log_multiplier", 0.0) or 0.0)
        # llama.cpp divides the converter's factor back out (TAG_DEEPSEEK2_YARN_LOG_MUL_FIX)
        log_mul = float(np.float32(log_mul) / np.float32(0.1))
        # llama_context: "special-case DEEPSEEK v2": mscale = mscale_all_dims when it is not 1
        common["yarn"] = dataclasses.replace(yarn, log_mul=log_mul, mscale=log_mul if log_mul not in (0.0, 1.0) else 1.0)
    common.update(head_dim=head_dim, n_head_kv=n_head_kv)
    return ModelArgs(**common, **moe_fields(gguf), rope_style="normal",
                     routing=gated_routing(gguf, unset="softmax"),
                     attention=attention, q_lora_rank=int(hparam(gguf, "attention.q_lora_rank", 0)),
                     kv_lora_rank=int(hparam(gguf, "attention.kv_lora_rank")), v_head_dim=v_head_dim,
                     shared_expert=int(hparam(gguf, "expert_shared_count", 0)) > 0,
                     n_dense_lead=int(hparam(gguf, "leading_dense_block_count", 0)),
                     expert_selection_bias=any(n.endswith("exp_probs_b.bias") for n in gguf.tensors),
                     expert_groups=int(hparam(gguf, "expert_group_count", 0)),
                     expert_groups_used=int(hparam(gguf, "expert_group_used_count", 0)),
                     expert_weights_scale=float(hparam(gguf, "expert_weights_scale", 0.0)))
