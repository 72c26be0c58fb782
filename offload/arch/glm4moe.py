"""`glm4moe`: GLM-4.5 / 4.6 / 4.7 (355B-A32B), GLM-4.5-Air (106B-A12B) and files converted like them.

Conventions, as llama.cpp runs this arch (src/models/glm4-moe.cpp, build_moe_ffn):
- attention: GQA with head_dim from `attention.key_length` (128; n_head * head_dim need not
  be n_embd), q/k/v biases where the file has them (each optional), per-head RMSNorm of q and
  k where the file has attn_q_norm / attn_k_norm (GLM-4.5 355B; not Air), NEOX RoPE on the
  first `rope.dimension_count` dims of each head only (partial RoPE: 64 of 128), scale
  1/sqrt(head_dim). llama.cpp asks for F32 accumulators on wo and the FFNs' down
  projections, which the CPU backend always uses: nothing to follow there.
- the FFN's norm is `post_attention_norm`; the first `leading_dense_block_count` layers have
  a dense FFN (`feed_forward_length` wide), the others route over the experts
  (`expert_feed_forward_length` wide) and add `expert_shared_count` shared experts (one FFN
  of that many times an expert's width, ungated).
- routing: sigmoid scores unless `expert_gating_func` says softmax (an absent or 0 key means
  sigmoid here, not softmax as in deepseek2), `exp_probs_b` (required in every MoE layer)
  added for choosing only, the chosen scores renormalized if `expert_weights_norm` and times
  `expert_weights_scale`. No expert groups (llama.cpp does not read them for this arch).
- `nextn_predict_layers` trailing blocks (counted in `block_count`) are the multi-token
  prediction head, which llama.cpp skips unless asked to draft with it: offload runs the
  first block_count - nextn_predict_layers layers and never touches the others' tensors.
- the rows whose logits are not wanted leave after the last layer's attention.
"""

from __future__ import annotations

from ..errors import UnsupportedModelError
from ..gguf_file import GGUFFile
from .base import ModelArgs, common_fields, gated_routing, hparam, moe_fields



def model_args(gguf: GGUFFile) -> ModelArgs:
    common = common_fields(gguf)
    n_nextn = int(hparam(gguf, "nextn_predict_layers", 0))
    n_layer = common["n_layer"] - n_nextn
    if n_layer <= 0 or "blk.0.attn_norm.weight" not in gguf.tensors:
        raise UnsupportedModelError(f"{gguf.path}: holds only the next-token-prediction layers (no trunk to run)")
    common["n_layer"] = n_layer
    value_length = int(hparam(gguf, "attention.value_length", common["head_dim"]))
    if value_length != common["head_dim"]:
        raise UnsupportedModelError(f"{gguf.path}: key_length {common['head_dim']} != value_length {value_length}")
    sections = gguf.get(f"{gguf.architecture}.rope.dimension_sections")
    if isinstance(sections, list) and len(sections) >= 2 and sections[0] > 0 and sections[1] > 0:
        raise UnsupportedModelError(f"{gguf.path}: multimodal RoPE (rope.dimension_sections) is not supported")
    if int(hparam(gguf, "expert_shared_count")) < 1:
        # llama.cpp's graph would add silu(x) in place of the missing shared expert
        raise UnsupportedModelError(f"{gguf.path}: glm4moe without a shared expert is not supported")
    n_dense_lead = int(hparam(gguf, "leading_dense_block_count", 0))
    missing = [i for i in range(n_dense_lead, n_layer) if f"blk.{i}.exp_probs_b.bias" not in gguf.tensors]
    if missing:
        raise UnsupportedModelError(f"{gguf.path}: tensor blk.{missing[0]}.exp_probs_b.bias is missing "
                                    f"(llama.cpp requires it in every MoE layer)")
    has = [f"blk.0.attn_{x}_norm.weight" in gguf.tensors for x in "qk"]
    if any(has) and not all(has):
        raise UnsupportedModelError(f"{gguf.path}: only one of attn_q_norm / attn_k_norm is not supported")
    return ModelArgs(**common, **moe_fields(gguf), rope_style="neox",
                     routing=gated_routing(gguf, unset="sigmoid"),
                     qk_norm="head" if all(has) else None,
                     attn_bias="blk.0.attn_q.bias" in gguf.tensors,
                     shared_expert=True, n_dense_lead=n_dense_lead, expert_selection_bias=True,
                     expert_weights_scale=float(hparam(gguf, "expert_weights_scale", 0.0)),
                     ffn_norm="post_attention_norm")
