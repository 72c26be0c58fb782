"""What an architecture module provides: a `ModelArgs` read from GGUF metadata.

The forward pass (`offload.forward`) is one generic transformer step. An architecture
differs from another only in the values of these fields: hyperparameters, the RoPE
pairing, how the router turns logits into expert weights, and which optional pieces
(q/k norms, attention biases, a shared expert) its layers carry. Tensor names are
llama.cpp's, which are the same across these families.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..errors import UnsupportedModelError
from ..gguf_file import GGUFFile

RopeStyle = Literal["normal", "neox"]  # pairs (x0,x1),(x2,x3)... or halves (x_i, x_{i+d/2})
# softmax over all experts then the top k (renormalized or not), or (gpt-oss) the top k of the
# raw logits, then softmax over those k only
# (DeepSeek V3, GLM-4.5: sigmoid scores then the top k, renormalized or not)
Routing = Literal["softmax_topk_norm", "softmax_topk", "topk_softmax", "sigmoid_topk_norm", "sigmoid_topk"]
# grouped-query attention, or DeepSeek's multi-head latent attention: one compressed
# latent (+ one RoPE key) cached per token, queries absorbed into the latent space; or
# (older DeepSeek files, one attn_kv_b) the latent decompressed into per-head keys and
# values, cached as such
AttentionKind = Literal["gqa", "mla", "mla_decompressed"]
QKNorm = Literal["head", "full"]  # RMSNorm per head (Qwen3) or over the whole projection (OLMoE)
# down(silu(gate) * up), or gpt-oss's clamped variant: a = min(gate, 7), b = clamp(up, -7, 7),
# a * sigmoid(1.702 a) * (b + 1)
ExpertActivation = Literal["swiglu", "swiglu_oai"]


@dataclass(frozen=True)
class Yarn:
    """YaRN RoPE scaling (llama.cpp's rope_yarn): frequencies interpolated by 1/factor outside a
    ramp of dims between the beta_fast and beta_slow corrections, cos/sin scaled by mscale."""

    factor: float
    orig_ctx: int  # the context the model was trained at before scaling
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    ext_factor: float = 1.0
    log_mul: float = 0.0  # DeepSeek's mscale_all_dim (rope.scaling.yarn_log_multiplier / 0.1)
    mscale: float = 1.0  # the numerator's mscale where log_mul is set (DeepSeek: log_mul too)


@dataclass(frozen=True)
class ModelArgs:
    arch: str
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ctx_train: int
    rms_eps: float
    rope_base: float
    rope_dim: int
    rope_style: RopeStyle
    rope_freq_scale: float = 1.0
    yarn: Yarn | None = None
    rope_base_swa: float | None = None  # sliding-window layers' RoPE base, when it differs
    sliding_window: int = 0  # keys at most this many positions back, on the layers swa_layers marks
    swa_layers: tuple[bool, ...] = ()
    attn_sinks: bool = False  # one learned logit per head joins each softmax (gpt-oss)
    attn_out_bias: bool = False
    attention: AttentionKind = "gqa"
    q_lora_rank: int = 0  # MLA: queries through a low-rank bottleneck (0: one plain matrix)
    kv_lora_rank: int = 0  # MLA: the latent's width; the cache holds it plus rope_dim per token
    v_head_dim: int = 0  # MLA: a value head's width (after v_b); 0: head_dim
    n_ff: int = 0  # hidden size of a dense FFN
    n_expert: int = 0  # 0: a dense model
    n_expert_used: int = 0
    n_ff_exp: int = 0  # hidden size of one expert
    routing: Routing = "softmax_topk_norm"
    router_bias: bool = False  # added to the router logits before the choice
    expert_act: ExpertActivation = "swiglu"
    expert_bias: bool = False  # each expert's gate, up and down add a bias
    expert_selection_bias: bool = False  # exp_probs_b: added to the scores for choosing only
    expert_groups: int = 0  # experts in groups; only the expert_groups_used best groups compete
    expert_groups_used: int = 0
    expert_weights_scale: float = 0.0  # the chosen weights times this (0 or 1: unscaled)
    ffn_norm: str = "ffn_norm"  # the FFN's norm tensor (gpt-oss: post_attention_norm)
    # rows whose logits are not wanted leave after the last layer's attention, as most of
    # llama.cpp's graphs drop them; gpt-oss's graph drops them after the last layer (which
    # changes the last layer's matmul shapes, and so their sums)
    early_row_drop: bool = True
    qk_norm: QKNorm | None = None
    attn_bias: bool = False  # the files carry q/k/v biases (informative: each is loaded where present)
    shared_expert: bool = False
    n_dense_lead: int = 0  # leading layers with a dense FFN in an MoE model (DeepSeek)

    @property
    def is_moe(self) -> bool:
        return self.n_expert > 0

    def is_moe_layer(self, layer: int) -> bool:
        return self.is_moe and layer >= self.n_dense_lead

    @property
    def kv_dim(self) -> int:
        """Floats a layer's cache keeps per token for keys (MLA: the latent and the RoPE key,
        whose first kv_lora_rank floats are also the values)."""
        return self.kv_lora_rank + self.rope_dim if self.attention == "mla" else self.n_head_kv * self.head_dim

    @property
    def v_dim(self) -> int:
        """A value head's width (its query/key head may be wider: DeepSeek)."""
        return self.v_head_dim or self.head_dim

    @property
    def v_cache_dim(self) -> int:
        """Floats a layer's cache keeps per token for values: 0 for MLA, whose values are the
        first kv_lora_rank floats of its keys."""
        return 0 if self.attention == "mla" else self.n_head_kv * self.v_dim

    def window(self, layer: int) -> int:
        """How many positions back this layer's attention reaches (0: all of them)."""
        return self.sliding_window if self.swa_layers and self.swa_layers[layer] else 0

    def rope_base_of(self, layer: int) -> float:
        return self.rope_base_swa if self.rope_base_swa is not None and self.window(layer) else self.rope_base


def hparam(gguf: GGUFFile, key: str, default=None):
    """`{arch}.{key}` from the metadata; required when no default is given."""
    full = f"{gguf.architecture}.{key}"
    value = gguf.get(full, default)
    if value is None:
        raise UnsupportedModelError(f"{gguf.path}: required metadata key {full} is missing")
    if isinstance(value, (str, bytes)):  # every hyperparameter read here is a number (or a list of them)
        raise UnsupportedModelError(f"{gguf.path}: metadata key {full} is the text {value[:40]!r}, expected a number")
    if isinstance(value, list) and not all(isinstance(v, (int, float)) for v in value):
        raise UnsupportedModelError(f"{gguf.path}: metadata key {full} holds non-numbers, expected numbers")
    return value


def per_layer_constant(gguf: GGUFFile, key: str, default=None) -> int:
    """Some files store head counts per layer (an array); we need them all equal."""
    value = hparam(gguf, key, default)
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise UnsupportedModelError(f"{gguf.path}: per-layer {key} values {sorted(set(value))} are not supported")
        value = value[0]
    return int(value)


def rope_scaling(gguf: GGUFFile) -> dict:
    """rope_freq_scale and yarn from the file: linear scaling is a frequency scale; YaRN also
    changes the frequencies near its ramp and the magnitude of cos/sin."""
    kind = gguf.get(f"{gguf.architecture}.rope.scaling.type", "none")
    factor = float(gguf.get(f"{gguf.architecture}.rope.scaling.factor", 0.0) or 0.0)
    scale = 1.0 / factor if factor else 1.0
    if kind in ("none", None):
        return dict(rope_freq_scale=1.0)
    if kind == "linear":
        return dict(rope_freq_scale=scale)
    if kind == "yarn":
        orig = int(gguf.get(f"{gguf.architecture}.rope.scaling.original_context_length",
                            hparam(gguf, "context_length", 4096)))
        return dict(rope_freq_scale=scale, yarn=Yarn(factor=factor or 1.0, orig_ctx=orig))
    raise UnsupportedModelError(f"{gguf.path}: RoPE scaling type '{kind}' is not supported yet")


def common_fields(gguf: GGUFFile, rms_eps_default: float = 1e-6) -> dict:
    """The hyperparameters every llama.cpp-style decoder stores under the same keys."""
    n_embd = int(hparam(gguf, "embedding_length"))
    n_head = per_layer_constant(gguf, "attention.head_count")
    head_dim = int(hparam(gguf, "attention.key_length", n_embd // n_head))
    return dict(
        arch=gguf.architecture,
        n_vocab=int(gguf.tensor("token_embd.weight").shape[1]),
        n_embd=n_embd,
        n_layer=int(hparam(gguf, "block_count")),
        n_head=n_head,
        n_head_kv=per_layer_constant(gguf, "attention.head_count_kv", n_head),
        head_dim=head_dim,
        n_ctx_train=int(hparam(gguf, "context_length", 4096)),
        rms_eps=float(hparam(gguf, "attention.layer_norm_rms_epsilon", rms_eps_default)),
        rope_base=float(hparam(gguf, "rope.freq_base", 10000.0)),
        rope_dim=int(hparam(gguf, "rope.dimension_count", head_dim)),
        **rope_scaling(gguf),
    )


# llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE: 1 softmax, 2 sigmoid (0, unset: the arch's default)
_GATING = {1: "softmax", 2: "sigmoid"}


def gated_routing(gguf: GGUFFile, unset: str) -> str:
    """The Routing kind of a file with expert_gating_func and expert_weights_norm keys
    (deepseek2, glm4moe): their scores, top-k, renormalized or not."""
    code = int(hparam(gguf, "expert_gating_func", 0))
    if code not in (0, *_GATING):
        raise UnsupportedModelError(f"{gguf.path}: expert_gating_func {code} is not supported")
    norm = bool(hparam(gguf, "expert_weights_norm", False))
    return f"{_GATING.get(code, unset)}_topk{'_norm' if norm else ''}"


def moe_fields(gguf: GGUFFile, n_ff_exp_key: str = "expert_feed_forward_length") -> dict:
    """Expert count, top-k and expert hidden size (llama.cpp: n_ff / top-k when the key is absent)."""
    n_expert = int(hparam(gguf, "expert_count"))
    n_used = int(hparam(gguf, "expert_used_count"))
    n_ff = int(hparam(gguf, "feed_forward_length", 0))
    if n_ff_exp_key == "feed_forward_length":
        n_ff_exp = n_ff
    else:
        n_ff_exp = per_layer_constant(gguf, n_ff_exp_key, 0) or (n_ff // n_used if n_used else 0)
    return dict(n_ff=n_ff, n_expert=n_expert, n_expert_used=n_used, n_ff_exp=n_ff_exp)
