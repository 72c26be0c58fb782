"""Small random-weight models and the llama.cpp oracle, for tests, benchmarks and the demo.

    path = write_model(tmp / "m.gguf", TinyConfig(n_expert=8), weight_type="Q8_0")
    quantize_model(path_f32, tmp / "q4km.gguf", "Q4_K_M")        # llama.cpp's own quantizer
    ref = llama_cpp_logits(path, ids)                               # llama.cpp's logits

Models carry a real tokenizer (a vocab-only GGUF from llama.cpp: the bundled
SentencePiece vocabulary of Llama 2 / Mixtral, or one from ../shared/data/vocab) and
llama.cpp's tensor names and metadata, so llama.cpp loads them as it would a converted
Mixtral. Weights are written the way llama.cpp's quantizer leaves them: norms and the
router in F32, every other matrix in the chosen type.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import ExpertGatingFuncType, GGMLQuantizationType, GGUFReader, GGUFWriter, LlamaFileType, RopeScalingType
from gguf.quants import quantize

from .cache_types import DEFAULT_CACHE_TYPE

_BUNDLED_VOCAB = Path(__file__).parent / "data" / "ggml-vocab-llama-spm.gguf"


def shared_data_dir() -> Path | None:
    """The project's shared real data (`../shared/data` from the repo root), if present."""
    env = os.environ.get("OFFLOAD_SHARED_DATA")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "data")
    return next((p for p in candidates if p.is_dir()), None)


def vocab_path(name: str = "llama-spm") -> Path:
    """A vocab-only GGUF by family name: llama-spm (bundled), qwen2, llama-bpe, deepseek-llm, phi-3."""
    if name == "llama-spm":
        return _BUNDLED_VOCAB
    shared = shared_data_dir()
    path = shared / "vocab" / f"ggml-vocab-{name}.gguf" if shared else None
    if path is None or not path.exists():
        raise FileNotFoundError(f"vocabulary {name!r} needs ../shared/data/vocab (not found)")
    return path


@dataclass(frozen=True)
class TinyConfig:
    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    n_head_kv: int = 2
    head_dim: int | None = None  # default n_embd // n_head
    n_ff: int = 128  # expert (or dense FFN) hidden size
    n_expert: int = 4  # 0: a dense llama
    n_expert_used: int = 2
    n_ctx: int = 512
    rope_base: float = 10000.0
    rms_eps: float = 1e-5
    vocab: str = "llama-spm"
    arch: str = "llama"  # also qwen2moe, qwen3moe, olmoe, gpt-oss (MoE only; see write_model)
    n_ff_shexp: int = 0  # qwen2moe's shared expert hidden size (default: n_ff)
    sliding_window: int = 16  # gpt-oss: the window of its sliding layers (the even ones)
    yarn_factor: float = 32.0  # gpt-oss, deepseek2: YaRN RoPE scaling (0: none)
    yarn_orig_ctx: int = 64
    # deepseek2 (MLA): head_dim is the query/key head (nope + rope_dim), the cache holds
    # kv_lora_rank + rope_dim per token; q_lora_rank 0: a plain query (V2-Lite)
    kv_lora_rank: int = 32
    q_lora_rank: int = 0
    rope_dim: int = 16
    v_head_dim: int = 16
    n_dense_lead: int = 1
    n_ff_dense: int = 96
    n_expert_shared: int = 1
    gating: str = "softmax"  # or "sigmoid", or "none" (no expert_gating_func key)
    selection_bias: bool = False  # exp_probs_b
    expert_groups: int = 0
    expert_groups_used: int = 0
    weights_norm: bool = False
    weights_scale: float = 0.0
    yarn_log_mul: float = 0.0
    mla_legacy: bool = False  # deepseek2 as converted before llama.cpp split attn_kv_b (no *_mla keys)
    # glm4moe: partial NEOX RoPE on rope_dim of head_dim, leading dense layers (n_dense_lead,
    # n_ff_dense), n_expert_shared, gating / weights_norm / weights_scale as deepseek2, always
    # an exp_probs_b; per-head q/k norms (GLM-4.5 355B) when qk_norm; n_nextn trailing
    # next-token-prediction layers in block_count (which llama.cpp and offload skip)
    qk_norm: bool = False
    n_nextn: int = 0
    attn_bias: bool = True  # qwen2moe, glm4moe: attn_q/k/v biases (llama.cpp loads them where present)


_FILE_TYPES = {"F32": LlamaFileType.ALL_F32, "F16": LlamaFileType.MOSTLY_F16, "BF16": LlamaFileType.MOSTLY_BF16,
               "Q8_0": LlamaFileType.MOSTLY_Q8_0, "Q4_0": LlamaFileType.MOSTLY_Q4_0}


def write_model(path: str | os.PathLike[str], config: TinyConfig = TinyConfig(), weight_type: str = "F32",
                seed: int = 0) -> Path:
    """Write a random-weight model as GGUF: a llama-arch model (MoE when n_expert > 0), or with
    `config.arch` one of llama.cpp's qwen2moe (q/k/v biases, a sigmoid-gated shared expert),
    qwen3moe (per-head q/k RMSNorm, expert_feed_forward_length), olmoe (q/k RMSNorm over the
    whole projection), gpt-oss (biases everywhere, attention sinks, sliding-window layers,
    YaRN, a router bias, swiglu_oai experts with biases), deepseek2 (MLA) or glm4moe (partial
    RoPE, leading dense layers, sigmoid routing with exp_probs_b, shared experts, nextn
    layers), with the metadata keys and tensors llama.cpp's loader asks of each."""
    c, path = config, Path(path)
    qtype = GGMLQuantizationType[weight_type]
    rng = np.random.default_rng(seed)
    head_dim = c.head_dim or c.n_embd // c.n_head
    vocab = GGUFReader(vocab_path(c.vocab))
    n_vocab = len(vocab.fields["tokenizer.ggml.tokens"].data)

    arch = c.arch
    if arch not in ("llama", "qwen2moe", "qwen3moe", "olmoe", "gpt-oss", "deepseek2", "glm4moe"):
        raise ValueError(f"write_model does not write arch {arch!r}")
    if arch != "llama" and not c.n_expert:
        raise ValueError(f"{arch} is an MoE arch: n_expert must be > 0")
    if arch in ("qwen2moe", "olmoe") and head_dim * c.n_head != c.n_embd:
        raise ValueError(f"{arch} needs head_dim * n_head == n_embd")
    if arch == "olmoe" and c.n_head_kv != c.n_head:
        raise ValueError("olmoe's k norm spans n_embd: n_head_kv must equal n_head")
    n_ff_shexp = c.n_ff_shexp or c.n_ff

    w = GGUFWriter(path, arch)
    w.add_name(f"offload-tiny-{arch}-{'moe' if c.n_expert else 'dense'}")
    w.add_file_type(_FILE_TYPES[weight_type])
    w.add_context_length(c.n_ctx)
    w.add_embedding_length(c.n_embd)
    n_nextn = c.n_nextn if arch == "glm4moe" else 0
    w.add_block_count(c.n_layer + n_nextn)
    if n_nextn:
        w.add_nextn_predict_layers(n_nextn)
    w.add_feed_forward_length(c.n_ff_dense if arch in ("deepseek2", "glm4moe") else c.n_ff)
    w.add_head_count(c.n_head)
    w.add_head_count_kv(c.n_head_kv)
    if arch == "deepseek2" and c.mla_legacy:  # per-head keys (nope + rope) and values (n_head_kv = n_head)
        w.add_key_length(head_dim)
        w.add_value_length(c.v_head_dim)
        w.add_rope_dimension_count(c.rope_dim)
    elif arch == "deepseek2":  # MLA: the cached latent and rope key are "the" key and value
        w.add_key_length(c.kv_lora_rank + c.rope_dim)
        w.add_value_length(c.kv_lora_rank)
        w.add_key_length_mla(head_dim)
        w.add_value_length_mla(c.v_head_dim)
        w.add_rope_dimension_count(c.rope_dim)
    elif arch == "glm4moe":  # RoPE on the first rope_dim dims of each head
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_rope_dimension_count(c.rope_dim)
    else:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(c.rope_base)
    w.add_layer_norm_rms_eps(c.rms_eps)
    w.add_vocab_size(n_vocab)
    if c.n_expert:
        w.add_expert_count(c.n_expert)
        w.add_expert_used_count(c.n_expert_used)
        if arch in ("qwen2moe", "qwen3moe", "gpt-oss", "deepseek2", "glm4moe"):
            w.add_expert_feed_forward_length(c.n_ff)
        if arch == "qwen2moe":
            w.add_expert_shared_feed_forward_length(n_ff_shexp)
    if arch in ("deepseek2", "glm4moe"):
        w.add_leading_dense_block_count(c.n_dense_lead)
        if arch == "deepseek2":
            w.add_q_lora_rank(c.q_lora_rank)
            w.add_kv_lora_rank(c.kv_lora_rank)
        w.add_expert_shared_count(c.n_expert_shared)
        w.add_expert_weights_scale(c.weights_scale)
        w.add_expert_weights_norm(c.weights_norm)
        if c.gating != "none":  # no key: deepseek2 reads softmax, glm4moe sigmoid
            w.add_expert_gating_func(ExpertGatingFuncType.SIGMOID if c.gating == "sigmoid" else ExpertGatingFuncType.SOFTMAX)
        if c.expert_groups:
            w.add_expert_group_count(c.expert_groups)
            w.add_expert_group_used_count(c.expert_groups_used)
    if arch in ("gpt-oss", "deepseek2") and c.yarn_factor:
        w.add_rope_scaling_type(RopeScalingType.YARN)
        w.add_rope_scaling_factor(c.yarn_factor)
        w.add_rope_scaling_orig_ctx_len(c.yarn_orig_ctx)
        if c.yarn_log_mul:
            w.add_rope_scaling_yarn_log_mul(c.yarn_log_mul)
    if arch == "gpt-oss":
        w.add_sliding_window(c.sliding_window)
    for key, f in vocab.fields.items():
        if key.startswith("tokenizer."):
            sub = f.types[-1] if len(f.types) > 1 else None
            w.add_key_value(key, f.contents(), f.types[0], sub)

    def matrix(name: str, *shape: int, keep_f32: bool = False) -> None:
        """A weight of numpy shape (..., n_out, n_in), scaled so activations stay O(1)."""
        data = (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)
        _add(w, name, data, GGMLQuantizationType.F32 if keep_f32 else qtype)

    def norm(name: str, n: int) -> None:
        w.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32))

    def bias(name: str, n: int) -> None:
        w.add_tensor(name, (0.5 * rng.standard_normal(n)).astype(np.float32))

    _add(w, "token_embd.weight", rng.standard_normal((n_vocab, c.n_embd)).astype(np.float32), qtype)
    for i in range(c.n_layer + n_nextn):
        p = f"blk.{i}."
        norm(p + "attn_norm.weight", c.n_embd)
        if arch == "deepseek2":
            _mla_tensors(w, c, p, head_dim, matrix, norm)
        else:
            matrix(p + "attn_q.weight", c.n_head * head_dim, c.n_embd)
            matrix(p + "attn_k.weight", c.n_head_kv * head_dim, c.n_embd)
            matrix(p + "attn_v.weight", c.n_head_kv * head_dim, c.n_embd)
            matrix(p + "attn_output.weight", c.n_embd, c.n_head * head_dim)
        if arch in ("qwen2moe", "glm4moe") and c.attn_bias:
            bias(p + "attn_q.bias", c.n_head * head_dim)
            bias(p + "attn_k.bias", c.n_head_kv * head_dim)
            bias(p + "attn_v.bias", c.n_head_kv * head_dim)
        if arch == "glm4moe" and c.qk_norm:
            norm(p + "attn_q_norm.weight", head_dim)
            norm(p + "attn_k_norm.weight", head_dim)
        elif arch == "qwen3moe":
            norm(p + "attn_q_norm.weight", head_dim)
            norm(p + "attn_k_norm.weight", head_dim)
        elif arch == "olmoe":
            norm(p + "attn_q_norm.weight", c.n_head * head_dim)
            norm(p + "attn_k_norm.weight", c.n_head_kv * head_dim)
        elif arch == "gpt-oss":
            bias(p + "attn_q.bias", c.n_head * head_dim)
            bias(p + "attn_k.bias", c.n_head_kv * head_dim)
            bias(p + "attn_v.bias", c.n_head_kv * head_dim)
            bias(p + "attn_output.bias", c.n_embd)
            w.add_tensor(p + "attn_sinks.weight", rng.standard_normal(c.n_head).astype(np.float32))
        norm(p + ("post_attention_norm.weight" if arch in ("gpt-oss", "glm4moe") else "ffn_norm.weight"), c.n_embd)
        if arch in ("deepseek2", "glm4moe") and i < c.n_dense_lead:
            matrix(p + "ffn_gate.weight", c.n_ff_dense, c.n_embd)
            matrix(p + "ffn_up.weight", c.n_ff_dense, c.n_embd)
            matrix(p + "ffn_down.weight", c.n_embd, c.n_ff_dense)
        elif c.n_expert:
            matrix(p + "ffn_gate_inp.weight", c.n_expert, c.n_embd, keep_f32=True)
            matrix(p + "ffn_gate_exps.weight", c.n_expert, c.n_ff, c.n_embd)
            matrix(p + "ffn_up_exps.weight", c.n_expert, c.n_ff, c.n_embd)
            matrix(p + "ffn_down_exps.weight", c.n_expert, c.n_embd, c.n_ff)
            if arch in ("deepseek2", "glm4moe"):
                if c.selection_bias or arch == "glm4moe":
                    bias(p + "exp_probs_b.bias", c.n_expert)
                shexp = c.n_ff * c.n_expert_shared
                matrix(p + "ffn_gate_shexp.weight", shexp, c.n_embd)
                matrix(p + "ffn_up_shexp.weight", shexp, c.n_embd)
                matrix(p + "ffn_down_shexp.weight", c.n_embd, shexp)
            if arch == "gpt-oss":
                bias(p + "ffn_gate_inp.bias", c.n_expert)
                for part, n in (("gate", c.n_ff), ("up", c.n_ff), ("down", c.n_embd)):
                    w.add_tensor(p + f"ffn_{part}_exps.bias", (0.5 * rng.standard_normal((c.n_expert, n))).astype(np.float32))
            if arch == "qwen2moe":
                w.add_tensor(p + "ffn_gate_inp_shexp.weight",  # one row, stored 1-D as in converted files
                             (rng.standard_normal(c.n_embd) / np.sqrt(c.n_embd)).astype(np.float32))
                matrix(p + "ffn_gate_shexp.weight", n_ff_shexp, c.n_embd)
                matrix(p + "ffn_up_shexp.weight", n_ff_shexp, c.n_embd)
                matrix(p + "ffn_down_shexp.weight", c.n_embd, n_ff_shexp)
        else:
            matrix(p + "ffn_gate.weight", c.n_ff, c.n_embd)
            matrix(p + "ffn_up.weight", c.n_ff, c.n_embd)
            matrix(p + "ffn_down.weight", c.n_embd, c.n_ff)
        if i >= c.n_layer:  # glm4moe's next-token-prediction layer: its own head pieces too
            matrix(p + "nextn.eh_proj.weight", c.n_embd, 2 * c.n_embd)
            norm(p + "nextn.enorm.weight", c.n_embd)
            norm(p + "nextn.hnorm.weight", c.n_embd)
            norm(p + "nextn.shared_head_norm.weight", c.n_embd)
    norm("output_norm.weight", c.n_embd)
    matrix("output.weight", n_vocab, c.n_embd)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _mla_tensors(w: GGUFWriter, c: TinyConfig, p: str, head_dim: int, matrix, norm) -> None:
    """deepseek2's attention tensors (MLA form: k_b and v_b stacked per head)."""
    if c.q_lora_rank:
        matrix(p + "attn_q_a.weight", c.q_lora_rank, c.n_embd)
        norm(p + "attn_q_a_norm.weight", c.q_lora_rank)
        matrix(p + "attn_q_b.weight", c.n_head * head_dim, c.q_lora_rank)
    else:
        matrix(p + "attn_q.weight", c.n_head * head_dim, c.n_embd)
    matrix(p + "attn_kv_a_mqa.weight", c.kv_lora_rank + c.rope_dim, c.n_embd)
    norm(p + "attn_kv_a_norm.weight", c.kv_lora_rank)
    if c.mla_legacy:
        matrix(p + "attn_kv_b.weight", c.n_head * (head_dim - c.rope_dim + c.v_head_dim), c.kv_lora_rank)
    else:
        matrix(p + "attn_k_b.weight", c.n_head, c.kv_lora_rank, head_dim - c.rope_dim)
        matrix(p + "attn_v_b.weight", c.n_head, c.v_head_dim, c.kv_lora_rank)
    matrix(p + "attn_output.weight", c.n_embd, c.n_head * c.v_head_dim)


def _add(w: GGUFWriter, name: str, data: np.ndarray, qtype: GGMLQuantizationType) -> None:
    if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        w.add_tensor(name, quantize(data, qtype))
    else:
        w.add_tensor(name, quantize(data, qtype), raw_dtype=qtype)


def quantize_model(src: str | os.PathLike[str], dst: str | os.PathLike[str], ftype: str, n_threads: int = 2,
                   imatrix: str | dict[str, np.ndarray] | None = None,
                   tensor_types: dict[str, str] | None = None) -> Path:
    """Quantize with llama.cpp's own quantizer (`llama-quantize`), e.g. ftype="Q4_K_M".

    imatrix: an importance matrix, which llama-quantize needs for IQ1_S, IQ1_M, IQ2_XXS,
    IQ2_XS, IQ2_S and IQ3_XXS tensors: {tensor name: ne0 * ne2 positive floats}, or "random"
    for seeded random positive values for every tensor of `src` (enough for tests).
    tensor_types: {regex: ggml type name} overrides, as llama-quantize's --tensor-type, to
    make a "dynamic" mix (a different type per tensor), e.g. {"ffn_down_exps": "Q4_K"}."""
    import ctypes

    from .tokenizer import load_llama_cpp

    llama_cpp = load_llama_cpp()

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(LlamaFileType[f"MOSTLY_{ftype}"])
    params.nthread = n_threads
    keep = []  # the ctypes arrays the params point into, alive until the call returns
    if imatrix is not None:
        if isinstance(imatrix, str):
            imatrix = random_imatrix(src, seed=0 if imatrix == "random" else int(imatrix.removeprefix("random:")))
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for entry, (name, values) in zip(entries, imatrix.items()):
            values = np.ascontiguousarray(values, dtype=np.float32)
            keep.append(values)
            entry.name = name.encode()
            entry.data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entry.size = values.size
        params.imatrix = entries  # ended by the zeroed entry: name NULL
        keep.append(entries)
    if tensor_types:
        overrides = (llama_cpp.llama_model_tensor_override * (len(tensor_types) + 1))()
        for entry, (pattern, type_name) in zip(overrides, tensor_types.items()):
            entry.pattern = pattern.encode()
            entry.type = int(GGMLQuantizationType[type_name])
        params.tt_overrides = overrides
        keep.append(overrides)
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src} -> {ftype}) failed with {rc}")
    return Path(dst)


def rewrite_gguf(src: str | os.PathLike[str], dst: str | os.PathLike[str], changes: dict | None = None) -> Path:
    """A copy of a GGUF with some metadata changed: `changes` maps a key to (value, GGUFValueType)
    to set or add it (arrays: (list, GGUFValueType.ARRAY, element type)), or to None to drop it.
    Tensors are copied as they are. For tests of hostile or unusual metadata."""
    changes = dict(changes or {})
    fields, tensors = _gguf_contents(str(src), os.stat(src).st_mtime_ns)
    w = GGUFWriter(dst, None)  # the architecture is one of the keys copied below
    for key, (value, vtype, sub) in fields.items():
        if key in changes:
            change = changes.pop(key)
            if change is not None:
                w.add_key_value(key, *change)
            continue
        w.add_key_value(key, value, vtype, sub_type=sub)
    for key, change in changes.items():
        if change is not None:
            w.add_key_value(key, *change)
    for name, data, shape, qtype in tensors:
        w.add_tensor(name, data, raw_shape=shape, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(dst)


@functools.lru_cache(maxsize=4)
def _gguf_contents(path: str, mtime_ns: int):
    """A GGUF's metadata {key: (value, type, element type)} and tensors [(name, data, shape,
    type)], read once (gguf-py's reader takes a while on a vocabulary)."""
    from gguf import GGUFValueType

    reader = GGUFReader(path)
    fields = {key: (f.contents(), f.types[0], f.types[1] if f.types[0] == GGUFValueType.ARRAY else None)
              for key, f in reader.fields.items() if not key.startswith("GGUF.")}
    tensors = [(t.name, np.array(t.data), tuple(int(d) for d in reversed(t.shape)), t.tensor_type) for t in reader.tensors]
    return fields, tensors


def random_imatrix(src: str | os.PathLike[str], seed: int = 0) -> dict[str, np.ndarray]:
    """Random positive importances (0.1 .. 2) for every matrix of a GGUF file: ne0 * ne2
    values per tensor (a row's columns, per expert for stacked experts), as llama-quantize reads them."""
    rng = np.random.default_rng(seed)
    out = {}
    for tensor in GGUFReader(src).tensors:
        shape = [int(n) for n in tensor.shape]  # ggml order: ne0 first
        if len(shape) >= 2:
            out[tensor.name] = rng.uniform(0.1, 2.0, shape[0] * (shape[2] if len(shape) > 2 else 1)).astype(np.float32)
    return out


def greedy_steps(transformer, prompt: list[int], n: int) -> tuple[list[int], list[np.ndarray]]:
    """n greedy tokens after `prompt` (one batch), each decoded as a one-token step, and the
    logits each step gave: the prefill's last row, then every decode step's (through
    end-of-text tokens, which generate_tokens would stop at)."""
    steps = [transformer.forward(np.asarray(prompt, dtype=np.int64))[-1]]
    tokens = [int(np.argmax(steps[-1]))]
    for _ in range(n - 1):
        steps.append(transformer.forward(np.array(tokens[-1:], dtype=np.int64))[-1])
        tokens.append(int(np.argmax(steps[-1])))
    return tokens, steps


# The decode paths of a one-token step, each giving the same bits: the whole step in one C
# call (kernels.step), one C call per block (kernels.block, kernels.moe), one call per op.
DECODE_PATHS = {"step": {}, "layer": {"OFFLOAD_STEP": "0"}, "per-op": {"OFFLOAD_FUSED": "0"}}


@contextlib.contextmanager
def decode_path(kind: str):
    """Run the block with the decode path `kind` of DECODE_PATHS selected; yields a set that
    receives the C paths that ran ("step": kernels.step, "layer": kernels.block or kernels.moe's
    one-token call, which a prompt's last row takes in its last layer on any fused path), so
    that a test can check the path it asked for is the one that ran (ran_as_asked)."""
    from . import forward
    from .kernels import block, select_kernels, step

    saved_env = {k: os.environ.get(k) for k in ("OFFLOAD_STEP", "OFFLOAD_FUSED")}
    ran: set[str] = set()
    real = (forward.moe_ffn, block.attention_token, step.DecodeStep.run)

    def seen(name, fn):
        return lambda *a, **k: ran.add(name) or fn(*a, **k)

    for k in saved_env:
        os.environ.pop(k, None)
    os.environ.update(DECODE_PATHS[kind])
    forward.moe_ffn, block.attention_token = seen("layer", real[0]), seen("layer", real[1])
    step.DecodeStep.run = seen("step", real[2])
    select_kernels()
    try:
        yield ran
    finally:
        forward.moe_ffn, block.attention_token, step.DecodeStep.run = real
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        select_kernels()


def make_memory_cgroup(limit: int, name: str) -> Path | None:
    """A cgroup v1 memory group `name` (made unique per process) with this limit, where this
    machine lets us make one (root in a container or VM with a writable cgroup tree); None
    where it does not. The caller moves a child into it and removes it."""
    base = Path("/sys/fs/cgroup/memory")
    if not (base / "memory.limit_in_bytes").exists():
        return None
    group = base / f"{name}-{os.getpid()}"
    try:
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(limit))
    except OSError:
        return None
    return group


def ran_as_asked(kind: str, ran: set[str]) -> bool:
    """Whether the C paths decode_path(kind) saw are those of `kind` (see decode_path)."""
    return {"step": "step" in ran, "layer": ran == {"layer"}, "per-op": not ran}[kind]


def random_prompt(n: int, seed: int = 0, n_vocab: int = 32000) -> list[int]:
    """BOS and n - 1 random ordinary token ids (above the byte tokens of Llama 2's vocabulary)."""
    return [1] + [int(t) for t in np.random.default_rng(seed).integers(100, n_vocab - 1, n - 1)]


def float_bits(x: np.ndarray) -> np.ndarray:
    """float32 values as their bit patterns, to compare results to the bit (NaNs included)."""
    return np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)


# -- the oracle -----------------------------------------------------------------------

@contextlib.contextmanager
def _without_repacked_buffers():
    """llama.cpp's repacked (AMX / extra buffer type) weights crash on quantized models on
    Xeons with AMX; `use_extra_bufts = False` on the model params avoids them. Llama()
    builds its params from llama_model_default_params(), so we wrap that function."""
    import llama_cpp.llama_cpp as lib

    original = lib.llama_model_default_params

    def patched():
        params = original()
        params.use_extra_bufts = False
        return params

    lib.llama_model_default_params = patched
    try:
        yield
    finally:
        lib.llama_model_default_params = original


# llama.cpp's ggml type ids of the KV cache types (offload.cache_types)
GGML_CACHE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "iq4_nl": 20, "bf16": 30}


def llama_cpp_model(path: str | os.PathLike[str], n_ctx: int = 512, n_threads: int = 2, logits_all: bool = True,
                    type_k: str = DEFAULT_CACHE_TYPE, type_v: str = DEFAULT_CACHE_TYPE, flash_attn: bool = False,
                    n_ubatch: int | None = None):
    """llama-cpp-python's Llama on `path`, with the KV cache types given (offload.cache_types
    names; by default offload's default, F16 as llama.cpp's) and flash attention off, as
    offload computes.
    A batch is evaluated at once (n_batch = n_ctx) in micro-batches of `n_ubatch` tokens (by
    default llama.cpp's default size, as offload's forward pass splits it: forward.N_UBATCH).
    Sliding-window layers keep a ring of cells (swa_full off), as llama.cpp's own tools and
    offload do: llama-cpp-python's default, a full-size SWA cache, orders the cells otherwise
    once the ring wraps (their sums then differ in the last bits, and more under flash attention)."""
    from .forward import N_UBATCH
    from .tokenizer import load_llama_cpp

    llama_cpp = load_llama_cpp()
    with _without_repacked_buffers():
        return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=min(n_ctx, n_ubatch or N_UBATCH),
                               n_threads=n_threads,
                               n_threads_batch=n_threads, logits_all=logits_all, type_k=GGML_CACHE_TYPES[type_k],
                               type_v=GGML_CACHE_TYPES[type_v], flash_attn=flash_attn, swa_full=False,
                               verbose=False)


def llama_cpp_logits(path: str | os.PathLike[str], tokens: list[int], n_ctx: int = 512, **cache) -> np.ndarray:
    """llama.cpp's logits (len(tokens), n_vocab) for one batched evaluation of `tokens`
    (`cache`: llama_cpp_model's type_k / type_v / n_ubatch)."""
    llm = llama_cpp_model(path, n_ctx=n_ctx, **cache)
    try:
        llm.eval(tokens)
        return np.array(llm.scores[: len(tokens)], dtype=np.float32)
    finally:
        llm.close()


def llama_cpp_greedy(path: str | os.PathLike[str], tokens: list[int], n: int, n_ctx: int = 512, **cache) -> list[int]:
    """The (up to) n tokens llama.cpp's greedy decoding appends to `tokens`, stopping before EOS.
    Only the last position's logits are computed (logits_all off, as when generating), which
    lets llama.cpp drop the other rows after the last layer's attention."""
    llm = llama_cpp_model(path, n_ctx=n_ctx, logits_all=False, **cache)
    try:
        out: list[int] = []
        llm.eval(tokens)
        for _ in range(n):
            last = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
            token = int(np.argmax(last))
            if token == llm.token_eos():
                break
            out.append(token)
            llm.eval([token])
        return out
    finally:
        llm.close()


def shifted_greedy(step, shift, prompt: list[int], n: int, n_ctx: int, n_keep: int,
                   batch_after_shift: list[int] = ()) -> tuple[list[int], list[np.ndarray], list[int]]:
    """n greedy tokens after `prompt` with context shifts, driven through two callables so that
    offload and llama.cpp run the very same steps: step(tokens) -> the last token's logits
    (tokens after the cached ones); shift(n_keep, n_discard) drops those positions. Whenever
    the next token would take the last cell (llama-completion's rule), half of the tokens after
    n_keep are dropped. After the first shift the sampled token goes in one batch with
    `batch_after_shift` (a prompt after a shift). Returns (tokens, every step's logits, the
    n_past at each shift)."""
    logits = step(list(prompt))
    n_past, steps, tokens, shifts = len(prompt), [logits], [], []
    for _ in range(n):
        token = int(np.argmax(logits))
        tokens.append(token)
        batch = [token]
        if n_past + 1 >= n_ctx:
            n_discard = (n_past - n_keep) // 2
            shifts.append(n_past)
            shift(n_keep, n_discard)
            n_past -= n_discard
            if len(shifts) == 1:
                batch += list(batch_after_shift)
        logits = step(batch)
        n_past += len(batch)
        steps.append(logits)
    return tokens, steps, shifts


def llama_cpp_shifted_greedy(path: str | os.PathLike[str], prompt: list[int], n: int, n_ctx: int, n_keep: int,
                             batch_after_shift: list[int] = (), **cache):
    """shifted_greedy through llama.cpp's own API: llama_memory_seq_rm + llama_memory_seq_add
    (its K-shift runs at the next decode), logits of the last token (llama_get_logits)."""
    from .tokenizer import load_llama_cpp

    lib = load_llama_cpp()
    llm = llama_cpp_model(path, n_ctx=n_ctx, logits_all=False, **cache)
    try:
        def step(tokens):
            llm.eval(tokens)
            return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).copy()

        def shift(n_keep, n_discard):
            mem = lib.llama_get_memory(llm._ctx.ctx)
            lib.llama_memory_seq_rm(mem, 0, n_keep, n_keep + n_discard)
            lib.llama_memory_seq_add(mem, 0, n_keep + n_discard, llm.n_tokens, -n_discard)
            llm.n_tokens -= n_discard

        return shifted_greedy(step, shift, prompt, n, n_ctx, n_keep, batch_after_shift)
    finally:
        llm.close()


# -- ggml's own quantizer and dot products, for kernel tests ------------------------------

def llama_cpp_is_avx512_build() -> bool:
    """Whether the installed llama.cpp was compiled with AVX-512 (a native build on such a
    CPU), whose dot products sum in other lanes than the AVX2 build offload follows."""
    from .tokenizer import load_llama_cpp

    return "AVX512 = 1" in load_llama_cpp().llama_print_system_info().decode()


def _ggml_lib(name: str):
    import ctypes

    from .tokenizer import load_llama_cpp

    lib_dir = Path(load_llama_cpp().__file__).parent / "lib"
    return ctypes.CDLL(str(lib_dir / f"lib{name}.so"))


_GGML_BASE = None
# the types llama-quantize will not make without an importance matrix
_IMATRIX_TYPES = frozenset({"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS"})


def ggml_quantize(values: np.ndarray, qtype: GGMLQuantizationType, imatrix: np.ndarray | None = None) -> np.ndarray:
    """float32 (n_rows, n_cols) -> uint8 rows of `qtype` blocks, made by ggml_quantize_chunk
    (llama-quantize's own code path, k-quants and MXFP4 included). The grid I-quants get
    an importance matrix (n_cols positive floats): `imatrix`, else a seeded random one."""
    import ctypes

    from gguf import GGML_QUANT_SIZES

    global _GGML_BASE
    if _GGML_BASE is None:
        lib = _ggml_lib("ggml-base")
        lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                            ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        lib.ggml_quantize_init.argtypes = [ctypes.c_int]
        _GGML_BASE = lib
    values = np.ascontiguousarray(values, dtype=np.float32)
    n_rows, n_cols = values.shape
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    if n_cols % block_size:
        raise ValueError(f"{qtype.name} rows need a multiple of {block_size} values, got {n_cols}")
    _GGML_BASE.ggml_quantize_init(int(qtype))
    raw = np.zeros((n_rows, n_cols // block_size * type_size), dtype=np.uint8)
    if imatrix is None and qtype.name in _IMATRIX_TYPES:
        imatrix = np.random.default_rng(n_cols).uniform(0.1, 2.0, n_cols).astype(np.float32)
    if imatrix is not None:
        imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
        if imatrix.shape != (n_cols,):
            raise ValueError(f"imatrix needs {n_cols} values, got {imatrix.shape}")
    size = _GGML_BASE.ggml_quantize_chunk(int(qtype), values.ctypes.data, raw.ctypes.data, 0, n_rows, n_cols,
                                          None if imatrix is None else imatrix.ctypes.data)
    if size != raw.nbytes:
        raise RuntimeError(f"ggml_quantize_chunk wrote {size} bytes for {qtype.name}, expected {raw.nbytes}")
    return raw


# -- models too large for this machine, on paper ------------------------------------------

def write_tensor_table(path: str | os.PathLike[str], arch: str, configure, tensors) -> Path:
    """A GGUF with real metadata and a real tensor table whose data is a hole: a sparse file
    as large as the model, for planning (`offload inspect`) models no test machine holds.
    `configure(writer)` adds the metadata; `tensors` is [(name, numpy-order shape, type)]."""
    from gguf import GGML_QUANT_SIZES

    path = Path(path)
    w = GGUFWriter(path, arch)
    configure(w)
    total = 0
    for name, shape, qtype in tensors:
        block, size = GGML_QUANT_SIZES[qtype]
        n_bytes = int(np.prod(shape)) // block * size
        w.add_tensor_info(name, shape, np.dtype(np.float32), n_bytes, raw_dtype=qtype)
        total += GGUFWriter.ggml_pad(n_bytes, w.data_alignment)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    with open(path, "r+b") as f:
        f.truncate(GGUFWriter.ggml_pad(f.seek(0, os.SEEK_END), w.data_alignment) + total)
    return path


def deepseek_table(path: str | os.PathLike[str], size: str = "V3") -> Path:
    """DeepSeek-V3 / R1 (671B: 61 layers, 256 experts top-8, MLA) or V2-Lite (16B: 27 layers,
    64 experts top-6) as llama.cpp's converter writes them, in a Q4_K_M-like mix (experts
    Q4_K with Q6_K down projections, Q8_0 where rows are not a multiple of 256, the rest
    Q8_0, norms F32): real metadata and tensor table, no data."""
    T = GGMLQuantizationType
    v3 = size == "V3"
    n_embd, n_layer, n_head, n_vocab = (7168, 61, 128, 129280) if v3 else (2048, 27, 16, 102400)
    n_ff, n_ff_exp, n_expert, n_used, lead = (18432, 2048, 256, 8, 3) if v3 else (10944, 1408, 64, 6, 1)
    q_lora, kv_lora, rope, nope, v_dim = (1536 if v3 else 0), 512, 64, 128, 128
    down = T.Q6_K if n_ff_exp % 256 == 0 else T.Q8_0  # llama-quantize's fallback for rows of 1408

    def configure(w: GGUFWriter) -> None:
        w.add_name(f"DeepSeek-{size} (tensor table only)")
        w.add_context_length(163840)
        w.add_embedding_length(n_embd)
        w.add_block_count(n_layer)
        w.add_feed_forward_length(n_ff)
        w.add_head_count(n_head)
        w.add_head_count_kv(1)
        w.add_key_length(kv_lora + rope)
        w.add_value_length(kv_lora)
        w.add_key_length_mla(nope + rope)
        w.add_value_length_mla(v_dim)
        w.add_rope_dimension_count(rope)
        w.add_rope_freq_base(10000.0)
        w.add_layer_norm_rms_eps(1e-6)
        w.add_vocab_size(n_vocab)
        w.add_expert_count(n_expert)
        w.add_expert_used_count(n_used)
        w.add_expert_feed_forward_length(n_ff_exp)
        w.add_expert_shared_count(1 if v3 else 2)
        w.add_leading_dense_block_count(lead)
        w.add_q_lora_rank(q_lora)
        w.add_kv_lora_rank(kv_lora)
        w.add_expert_weights_scale(2.5 if v3 else 1.0)
        w.add_expert_weights_norm(v3)
        w.add_expert_gating_func(ExpertGatingFuncType.SIGMOID if v3 else ExpertGatingFuncType.SOFTMAX)
        if v3:
            w.add_expert_group_count(8)
            w.add_expert_group_used_count(4)
        w.add_rope_scaling_type(RopeScalingType.YARN)
        w.add_rope_scaling_factor(40.0)
        w.add_rope_scaling_orig_ctx_len(4096)
        w.add_rope_scaling_yarn_log_mul(0.1)

    tensors = [("token_embd.weight", (n_vocab, n_embd), T.Q4_K), ("output_norm.weight", (n_embd,), T.F32),
               ("output.weight", (n_vocab, n_embd), T.Q6_K)]
    for i in range(n_layer):
        p = f"blk.{i}."
        tensors += [(p + "attn_norm.weight", (n_embd,), T.F32), (p + "ffn_norm.weight", (n_embd,), T.F32),
                    (p + "attn_kv_a_norm.weight", (kv_lora,), T.F32),
                    (p + "attn_kv_a_mqa.weight", (kv_lora + rope, n_embd), T.Q8_0),
                    (p + "attn_k_b.weight", (n_head, kv_lora, nope), T.Q8_0),
                    (p + "attn_v_b.weight", (n_head, v_dim, kv_lora), T.Q8_0),
                    (p + "attn_output.weight", (n_embd, n_head * v_dim), T.Q8_0)]
        if q_lora:
            tensors += [(p + "attn_q_a.weight", (q_lora, n_embd), T.Q8_0), (p + "attn_q_a_norm.weight", (q_lora,), T.F32),
                        (p + "attn_q_b.weight", (n_head * (nope + rope), q_lora), T.Q8_0)]
        else:
            tensors.append((p + "attn_q.weight", (n_head * (nope + rope), n_embd), T.Q8_0))
        if i < lead:
            tensors += [(p + "ffn_gate.weight", (n_ff, n_embd), T.Q8_0), (p + "ffn_up.weight", (n_ff, n_embd), T.Q8_0),
                        (p + "ffn_down.weight", (n_embd, n_ff), T.Q8_0)]
            continue
        shexp = n_ff_exp * (1 if v3 else 2)
        tensors += [(p + "ffn_gate_inp.weight", (n_expert, n_embd), T.F32),
                    (p + "ffn_gate_exps.weight", (n_expert, n_ff_exp, n_embd), T.Q4_K),
                    (p + "ffn_up_exps.weight", (n_expert, n_ff_exp, n_embd), T.Q4_K),
                    (p + "ffn_down_exps.weight", (n_expert, n_embd, n_ff_exp), down),
                    (p + "ffn_gate_shexp.weight", (shexp, n_embd), T.Q8_0),
                    (p + "ffn_up_shexp.weight", (shexp, n_embd), T.Q8_0),
                    (p + "ffn_down_shexp.weight", (n_embd, shexp), T.Q8_0)]
        if v3:
            tensors.append((p + "exp_probs_b.bias", (n_expert,), T.F32))
    return write_tensor_table(path, "deepseek2", configure, tensors)
