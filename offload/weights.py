"""The model's weights as the forward pass sees them, read out of a GGUF file.

Every matrix is a `QMatrix`: a view of its GGUF blocks in the memory map, never
dequantized as a whole. Routed experts are not held here but behind an `ExpertStore`,
so the tiered store (RAM slots fed from disk) can stand in for the resident one
without the forward pass knowing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cached_property
from typing import Protocol

import numpy as np

from .arch import ModelArgs
from .errors import UnsupportedModelError
from .gguf_file import GGUFFile, TensorInfo
from .kernels import QMatrix, UnsupportedQuantType, dequantize_rows, format_for


@dataclass
class FFN:
    """SwiGLU feed-forward: down(silu(gate·x) * up·x)."""

    gate: QMatrix
    up: QMatrix
    down: QMatrix

    @cached_property
    def kernel_spec(self) -> tuple:
        """(gate format, address, up format, address, down format, address, hidden size): the
        FFN as kernels.moe hands it to one C call with the layer's other experts."""
        g, u, d = self.gate, self.up, self.down
        return (g.fmt.name, g.address, u.fmt.name, u.address, d.fmt.name, d.address, g.n_rows)


@dataclass
class Attention:
    norm: np.ndarray
    wq: QMatrix
    wk: QMatrix
    wv: QMatrix
    wo: QMatrix
    bq: np.ndarray | None = None
    bk: np.ndarray | None = None
    bv: np.ndarray | None = None
    q_norm: np.ndarray | None = None
    k_norm: np.ndarray | None = None
    bo: np.ndarray | None = None  # the output projection's bias
    sinks: np.ndarray | None = None  # (n_head,) one extra softmax logit per head, with no value

    @cached_property
    def kernel_spec(self) -> tuple:
        """((format, address, rows) of wq, wk, wv, wo): the matrices as kernels.block hands them
        to one C call."""
        return tuple((m.fmt.name, m.address, m.n_rows) for m in (self.wq, self.wk, self.wv, self.wo))


@dataclass
class LatentAttention:
    """DeepSeek's multi-head latent attention (MLA), in llama.cpp's absorbed form: per head,
    k_b maps the query's non-RoPE part into the latent space and v_b maps the attention
    output back out of it (both one matrix per head, from the stacked tensors)."""

    norm: np.ndarray
    wkv_a: QMatrix  # x -> [latent (kv_lora_rank), rope key (rope_dim)]
    kv_a_norm: np.ndarray
    wk_b: list[QMatrix] | None  # per head: (kv_lora_rank, head_dim - rope_dim)
    wv_b: list[QMatrix] | None  # per head: (v_head_dim, kv_lora_rank)
    wo: QMatrix
    wkv_b: QMatrix | None = None  # older files instead: latent -> per head [k_nope, v]
    wq: QMatrix | None = None  # a plain query (V2-Lite), or:
    wq_a: QMatrix | None = None  # x -> q_lora_rank
    q_a_norm: np.ndarray | None = None
    wq_b: QMatrix | None = None  # q_lora_rank -> n_head * head_dim


@dataclass(frozen=True)
class ExpertBiases:
    """The biases of a layer's routed experts, one row per expert. They are small (0.2% of
    gpt-oss's experts), so they stay resident beside the router while the matrices they go
    with move through the expert store."""

    gate: np.ndarray  # (n_expert, n_ff_exp) float32
    up: np.ndarray  # (n_expert, n_ff_exp)
    down: np.ndarray  # (n_expert, n_embd)

    def of(self, expert: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self._rows[expert]

    @cached_property
    def _rows(self) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Each expert's three rows as views, made once rather than per token and layer."""
        return list(zip(self.gate, self.up, self.down))


@dataclass
class MoE:
    router: QMatrix  # n_expert rows
    expert_types: tuple = ()  # ggml types of the routed experts' gate, up and down (the same for every expert)
    shared: FFN | None = None
    shared_gate: QMatrix | None = None  # one row: sigmoid(shared_gate·x) scales the shared expert
    router_bias: np.ndarray | None = None  # (n_expert,) added to the router logits
    selection_bias: np.ndarray | None = None  # (n_expert,) added to the scores for choosing only
    expert_biases: ExpertBiases | None = None


@dataclass
class Layer:
    attn: Attention | LatentAttention
    ffn_norm: np.ndarray
    dense: FFN | None  # exactly one of dense / moe is set
    moe: MoE | None


@dataclass
class Weights:
    token_embd: QMatrix
    layers: list[Layer]
    output_norm: np.ndarray
    output: QMatrix  # token_embd when the file ties them

    def embed(self, tokens: np.ndarray) -> np.ndarray:
        if len(tokens) == 1:  # a decoding token: the same rows, without dequantize_rows' array checks
            t = int(tokens[0])
            if not 0 <= t < self.token_embd.n_rows:
                raise ValueError(f"row index out of range for a matrix of {self.token_embd.n_rows} rows: {t}")
            return self.token_embd.fmt.dequantize(self.token_embd.data[t : t + 1])
        return dequantize_rows(self.token_embd, tokens)


def in_anonymous_memory(w: Weights) -> Weights:
    """The same weights with every array copied out of the file's memory map.

    Under a memory cap (a container's cgroup) the page cache is charged to the same limit
    as the expert slots, and the kernel reclaims clean file pages first: once the slots fill
    the cap, mapped weights (attention, norms, routers, embeddings) are dropped and read
    from disk again, token after token. Copies cannot be dropped. The plan counts these
    bytes as resident either way."""
    memo: dict[int, object] = {}

    def copied(obj):
        if id(obj) in memo:  # a tied output matrix stays the embedding's
            return memo[id(obj)]
        if isinstance(obj, np.ndarray):
            out = np.array(obj, copy=True)
        elif isinstance(obj, list):
            out = [copied(x) for x in obj]
        elif isinstance(obj, _WEIGHT_CLASSES):
            out = dataclasses.replace(obj, **{f.name: copied(getattr(obj, f.name)) for f in dataclasses.fields(obj)})
        else:
            out = obj
        memo[id(obj)] = out
        return out

    return copied(w)


_WEIGHT_CLASSES = (Weights, Layer, Attention, LatentAttention, FFN, MoE, ExpertBiases, QMatrix)


class ExpertStore(Protocol):
    """Where routed experts live. `get` returns the expert's three matrices, ready to use."""

    def get(self, layer: int, expert: int) -> FFN: ...


# -- reading ---------------------------------------------------------------------------

def unsupported_tensor(gguf: GGUFFile) -> str | None:
    """Why offload cannot compute with this file's tensors, or None if it can."""
    for t in gguf.tensors.values():
        try:
            format_for(t.ggml_type)
        except UnsupportedQuantType as e:
            return f"tensor {t.name}: {e}"
    return None


def _format(t: TensorInfo):
    try:
        return format_for(t.ggml_type)
    except UnsupportedQuantType as e:
        raise UnsupportedModelError(f"tensor {t.name}: {e}") from None


def _matrix(t: TensorInfo) -> QMatrix:
    if len(t.shape) == 1:  # one row stored as a vector (qwen2moe's ffn_gate_inp_shexp)
        _format(t)
        return QMatrix.from_raw(t.ggml_type, t.data, n_rows=1, n_cols=t.shape[0])
    if len(t.shape) != 2:
        raise UnsupportedModelError(f"tensor {t.name} has shape {t.shape}, expected a matrix")
    _format(t)
    return QMatrix.from_raw(t.ggml_type, t.data, n_rows=t.shape[1], n_cols=t.shape[0])


def _vector(t: TensorInfo) -> np.ndarray:
    """Norm weights and biases: small, so decoded once to float32."""
    _format(t)
    flat = QMatrix.from_raw(t.ggml_type, t.data, n_rows=1, n_cols=t.n_elements)
    return dequantize_rows(flat, np.zeros(1, dtype=np.int64))[0]


def _bias_rows(t: TensorInfo, n_rows: int) -> np.ndarray:
    """A stack of biases (n_rows, n) as float32: a view of the file when stored as F32."""
    fmt = _format(t)
    if t.n_elements % n_rows:
        raise UnsupportedModelError(f"tensor {t.name} has shape {t.shape}, expected {n_rows} rows")
    m = QMatrix.from_raw(t.ggml_type, t.data, n_rows=n_rows, n_cols=t.n_elements // n_rows)
    if fmt.name == "F32":
        return m.data.view(np.float32).reshape(n_rows, -1)
    return dequantize_rows(m, np.arange(n_rows))


def _expert_matrices(t: TensorInfo, n_expert: int, what: str = "experts") -> list[QMatrix]:
    """Split a stacked tensor (`ffn_*_exps`; MLA's per-head k_b, v_b) whose outermost index
    is the expert (head) into one view per expert."""
    if len(t.shape) != 3:
        raise UnsupportedModelError(f"tensor {t.name} has shape {t.shape}, expected a stack of matrices")
    n_cols, n_rows, n = t.shape
    if n != n_expert:
        raise UnsupportedModelError(f"tensor {t.name} holds {n} {what}, metadata says {n_expert}")
    fmt = _format(t)
    raw = t.data.view(np.uint8).reshape(n_expert, n_rows, fmt.row_bytes(n_cols))
    return [QMatrix(fmt, n_rows, n_cols, raw[e]) for e in range(n_expert)]


def _attention(gguf: GGUFFile, args: ModelArgs, p: str) -> Attention:
    attn = Attention(
        norm=_vector(gguf.tensor(p + "attn_norm.weight")),
        wq=_matrix(gguf.tensor(p + "attn_q.weight")),
        wk=_matrix(gguf.tensor(p + "attn_k.weight")),
        wv=_matrix(gguf.tensor(p + "attn_v.weight")),
        wo=_matrix(gguf.tensor(p + "attn_output.weight")),
    )
    # q, k and v biases wherever the file has them, each on its own (llama.cpp's
    # create_tensor_qkv loads every one as optional, for every GQA arch)
    attn.bq, attn.bk, attn.bv = (_vector(t) if (t := gguf.tensors.get(p + f"attn_{x}.bias")) is not None else None
                                 for x in "qkv")
    if args.qk_norm:
        attn.q_norm = _vector(gguf.tensor(p + "attn_q_norm.weight"))
        attn.k_norm = _vector(gguf.tensor(p + "attn_k_norm.weight"))
    if args.attn_out_bias:
        attn.bo = _vector(gguf.tensor(p + "attn_output.bias"))
    if args.attn_sinks:
        attn.sinks = _vector(gguf.tensor(p + "attn_sinks.weight"))
        if attn.sinks.shape != (args.n_head,):
            raise UnsupportedModelError(f"tensor {p}attn_sinks.weight holds {attn.sinks.size} values, "
                                        f"expected one per head ({args.n_head})")
    return attn


def _latent_attention(gguf: GGUFFile, args: ModelArgs, p: str) -> LatentAttention:
    attn = LatentAttention(
        norm=_vector(gguf.tensor(p + "attn_norm.weight")),
        wkv_a=_matrix(gguf.tensor(p + "attn_kv_a_mqa.weight")),
        kv_a_norm=_vector(gguf.tensor(p + "attn_kv_a_norm.weight")),
        wk_b=None, wv_b=None,
        wo=_matrix(gguf.tensor(p + "attn_output.weight")),
    )
    nope = args.head_dim - args.rope_dim
    if args.attention == "mla":
        attn.wk_b = _expert_matrices(gguf.tensor(p + "attn_k_b.weight"), args.n_head, "heads")
        attn.wv_b = _expert_matrices(gguf.tensor(p + "attn_v_b.weight"), args.n_head, "heads")
        shapes = [(attn.wk_b[0].n_rows, args.kv_lora_rank), (attn.wk_b[0].n_cols, nope),
                  (attn.wv_b[0].n_rows, args.v_dim), (attn.wv_b[0].n_cols, args.kv_lora_rank)]
    else:
        attn.wkv_b = _matrix(gguf.tensor(p + "attn_kv_b.weight"))
        shapes = [(attn.wkv_b.n_rows, args.n_head * (nope + args.v_dim)), (attn.wkv_b.n_cols, args.kv_lora_rank)]
    if args.q_lora_rank > 0:
        attn.wq_a = _matrix(gguf.tensor(p + "attn_q_a.weight"))
        attn.q_a_norm = _vector(gguf.tensor(p + "attn_q_a_norm.weight"))
        attn.wq_b = _matrix(gguf.tensor(p + "attn_q_b.weight"))
    else:
        attn.wq = _matrix(gguf.tensor(p + "attn_q.weight"))
    shapes += [(attn.wkv_a.n_rows, args.kv_lora_rank + args.rope_dim), (attn.wo.n_cols, args.n_head * args.v_dim)]
    if any(have != want for have, want in shapes):
        raise UnsupportedModelError(f"{p}attn_*: MLA tensor shapes do not fit the metadata's head sizes")
    return attn


@dataclass(frozen=True)
class ExpertPart:
    """One of an expert's three matrices (gate, up, down) where it lies in the file: expert `e`
    is the `n_bytes` bytes at `offset + e * n_bytes` (the expert index is outermost)."""

    name: str  # the stacked tensor's name
    ggml_type: int
    n_rows: int
    n_cols: int
    offset: int  # absolute file offset of expert 0
    n_bytes: int  # bytes of one expert

    def range(self, expert: int) -> tuple[int, int]:
        return self.offset + expert * self.n_bytes, self.n_bytes


@dataclass(frozen=True)
class ExpertLayout:
    """Where the routed experts of one layer lie in the file."""

    layer: int
    n_expert: int
    parts: tuple[ExpertPart, ExpertPart, ExpertPart]  # gate, up, down

    @property
    def expert_bytes(self) -> int:
        return sum(p.n_bytes for p in self.parts)


def expert_layouts(gguf: GGUFFile, args: ModelArgs) -> dict[int, ExpertLayout]:
    """Byte ranges of every MoE layer's experts, for stores that read them from the file."""
    out = {}
    for layer in range(args.n_layer):
        if not args.is_moe_layer(layer):
            continue
        parts = []
        for part in ("gate", "up", "down"):
            t = gguf.tensor(f"blk.{layer}.ffn_{part}_exps.weight")
            n_cols, n_rows, n = t.shape
            if n != args.n_expert:
                raise UnsupportedModelError(f"tensor {t.name} holds {n} experts, metadata says {args.n_expert}")
            fmt = _format(t)
            per = n_rows * fmt.row_bytes(n_cols)
            parts.append(ExpertPart(t.name, int(t.ggml_type), n_rows, n_cols, t.offset, per))
        out[layer] = ExpertLayout(layer, args.n_expert, tuple(parts))
    return out


class ResidentExperts:
    """Every expert straight from the memory-mapped file (no budget, no I/O accounting)."""

    def __init__(self, gguf: GGUFFile, args: ModelArgs):
        self._experts: dict[int, list[FFN]] = {}
        for layer in range(args.n_layer):
            if not args.is_moe_layer(layer):
                continue
            gates, ups, downs = (
                _expert_matrices(gguf.tensor(f"blk.{layer}.ffn_{part}_exps.weight"), args.n_expert)
                for part in ("gate", "up", "down")
            )
            self._experts[layer] = [FFN(g, u, d) for g, u, d in zip(gates, ups, downs)]

    def get(self, layer: int, expert: int) -> FFN:
        return self._experts[layer][expert]

    def resident_ffns(self, layer: int) -> list[FFN]:
        """Every expert of a MoE layer, by id (all stay in place: kernels.step plans with them)."""
        return self._experts[layer]


def load_weights(gguf: GGUFFile, args: ModelArgs) -> Weights:
    def opt(name: str) -> TensorInfo | None:
        return gguf.tensors.get(name)

    layers = []
    for i in range(args.n_layer):
        p = f"blk.{i}."
        if args.attention in ("mla", "mla_decompressed"):
            attn = _latent_attention(gguf, args, p)
        else:
            attn = _attention(gguf, args, p)
        dense = moe = None
        if args.is_moe_layer(i):
            if opt(p + "ffn_gate_exps.weight") is None and opt(p + "ffn_gate.0.weight") is not None:
                raise UnsupportedModelError(
                    "this GGUF stores experts as separate tensors (an old Mixtral conversion); "
                    "re-convert it with a current llama.cpp"
                )
            moe = MoE(router=_matrix(gguf.tensor(p + "ffn_gate_inp.weight")),
                      expert_types=tuple(gguf.tensor(p + f"ffn_{x}_exps.weight").ggml_type for x in ("gate", "up", "down")))
            if args.router_bias:
                moe.router_bias = _vector(gguf.tensor(p + "ffn_gate_inp.bias"))
            if opt(p + "exp_probs_b.bias") is not None:  # optional, as in llama.cpp
                moe.selection_bias = _vector(gguf.tensor(p + "exp_probs_b.bias"))
            if args.expert_bias:
                moe.expert_biases = ExpertBiases(*(_bias_rows(gguf.tensor(p + f"ffn_{x}_exps.bias"), args.n_expert)
                                                   for x in ("gate", "up", "down")))
            if args.shared_expert:
                moe.shared = FFN(*(_matrix(gguf.tensor(p + f"ffn_{x}_shexp.weight")) for x in ("gate", "up", "down")))
                if opt(p + "ffn_gate_inp_shexp.weight") is not None:
                    moe.shared_gate = _matrix(gguf.tensor(p + "ffn_gate_inp_shexp.weight"))
        else:
            dense = FFN(*(_matrix(gguf.tensor(p + f"ffn_{x}.weight")) for x in ("gate", "up", "down")))
        ffn_norm = _vector(gguf.tensor(p + args.ffn_norm + ".weight"))
        layers.append(Layer(attn=attn, ffn_norm=ffn_norm, dense=dense, moe=moe))

    token_embd = _matrix(gguf.tensor("token_embd.weight"))
    output = opt("output.weight")
    weights = Weights(
        token_embd=token_embd,
        layers=layers,
        output_norm=_vector(gguf.tensor("output_norm.weight")),
        output=_matrix(output) if output is not None else token_embd,
    )
    check_shapes(gguf, args, weights)
    return weights


def check_shapes(gguf: GGUFFile, args: ModelArgs, w: Weights) -> None:
    """Every tensor as large as the metadata says, as llama.cpp's create_tensor checks: a file
    whose hyperparameters and tensors disagree is refused here, in one line, instead of
    failing deep inside a matmul (or reading past a row) later."""
    e, v = args.n_embd, args.v_dim
    want: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []  # (what, found, expected)

    def matrix(what, m, rows, cols):
        want.append((what, (m.n_rows, m.n_cols), (rows, cols)))

    def vector(what, x, n):
        if x is not None:
            want.append((what, (x.size,), (n,)))

    matrix("token_embd", w.token_embd, args.n_vocab, e)
    matrix("output", w.output, args.n_vocab, e)
    vector("output_norm", w.output_norm, e)
    for i, layer in enumerate(w.layers):
        p, a = f"blk.{i}.", layer.attn
        vector(p + "attn_norm", a.norm, e)
        vector(p + "ffn_norm", layer.ffn_norm, e)
        matrix(p + "attn_output", a.wo, e, a.wo.n_cols)  # MLA's input width is checked with its heads
        if isinstance(a, Attention):
            q, kv = args.n_head * args.head_dim, args.n_head_kv * args.head_dim
            matrix(p + "attn_q", a.wq, q, e)
            matrix(p + "attn_k", a.wk, kv, e)
            matrix(p + "attn_v", a.wv, args.n_head_kv * v, e)
            matrix(p + "attn_output", a.wo, e, args.n_head * v)
            for what, x, n in (("attn_q.bias", a.bq, q), ("attn_k.bias", a.bk, kv), ("attn_v.bias", a.bv, args.n_head_kv * v),
                               ("attn_output.bias", a.bo, e)):
                vector(p + what, x, n)
            if a.q_norm is not None and a.q_norm.size != args.head_dim:  # per head, or over the whole projection
                vector(p + "attn_q_norm", a.q_norm, q)
            if a.k_norm is not None and a.k_norm.size != args.head_dim:
                vector(p + "attn_k_norm", a.k_norm, kv)
        if layer.dense is not None:
            f = layer.dense
            matrix(p + "ffn_gate", f.gate, f.gate.n_rows, e)
            matrix(p + "ffn_up", f.up, f.gate.n_rows, e)
            matrix(p + "ffn_down", f.down, e, f.gate.n_rows)
        if layer.moe is not None:
            m = layer.moe
            matrix(p + "ffn_gate_inp", m.router, args.n_expert, e)
            vector(p + "ffn_gate_inp.bias", m.router_bias, args.n_expert)
            vector(p + "exp_probs_b", m.selection_bias, args.n_expert)
            gate, up, down = (gguf.tensor(f"{p}ffn_{x}_exps.weight").shape for x in ("gate", "up", "down"))
            ff = gate[1] if len(gate) == 3 else 0
            want += [(p + "ffn_gate_exps", tuple(gate), (e, ff, args.n_expert)),
                     (p + "ffn_up_exps", tuple(up), (e, ff, args.n_expert)),
                     (p + "ffn_down_exps", tuple(down), (ff, e, args.n_expert))]
            if m.shared is not None:
                f = m.shared
                matrix(p + "ffn_gate_shexp", f.gate, f.gate.n_rows, e)
                matrix(p + "ffn_up_shexp", f.up, f.gate.n_rows, e)
                matrix(p + "ffn_down_shexp", f.down, e, f.gate.n_rows)
            if m.shared_gate is not None:
                matrix(p + "ffn_gate_inp_shexp", m.shared_gate, 1, e)
    for what, found, expected in want:
        if found != expected:
            raise UnsupportedModelError(f"{gguf.path}: tensor {what} has shape {found}, but the metadata's sizes "
                                        f"make it {expected} (a damaged file, or hyperparameters that do not "
                                        "belong to it)")
