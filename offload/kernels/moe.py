"""A MoE layer's experts in one C call instead of one per matrix: for a decoding token, and
for a prompt's micro-batch.

A fine-grained MoE layer (Qwen3-30B-A3B: top-8 of 128 experts of 768) is 24 small matmuls
per token; called one by one, each pays a fork/join of the thread team and the Python
around it, which cost more than the matrices take to stream. `moe_ffn` runs them all in one
parallel region (cext/moe.c): gate and up of every selected expert and shared expert, the
threads splitting all their rows together; SwiGLU (or gpt-oss's swiglu_oai); every down; the
routed outputs weighted and summed in slot order. Routed experts may carry biases (gpt-oss):
gate and up biases added right after their matmuls, the down bias after down, before the
routing weight, as forward._ffn adds them.

`moe_batch` does the same for a micro-batch: each expert runs once on the tokens routed to
it, through the row dots or the tiled GEMM as dispatch.matmul would for that many tokens,
the threads taking whole experts when there are enough of them.

`moe_ffn_ref` and `moe_batch_ref` are the same computations as the per-matrix calls they
replace (dispatch.matmuls, silu_mul or swiglu_oai, numpy's bias adds; llama.cpp's
build_moe_ffn order): the references the C paths equal bit for bit.
"""

from __future__ import annotations

import threading
from typing import Iterable, Protocol, Sequence

import numpy as np

from . import cext
from .dispatch import C_FORMATS, fused_enabled, matmul, matmuls
from .formats import QMatrix
from .ggml_math import silu_mul, swiglu_oai

Biases = tuple  # (gate (n_ff,), up (n_ff,), down (n_embd,)) float32: weights.ExpertBiases.of(expert)


class SwiGLU(Protocol):  # weights.FFN
    gate: QMatrix
    up: QMatrix
    down: QMatrix
    kernel_spec: tuple  # (gate fmt, address, up fmt, address, down fmt, address, n_ff)


def can_fuse(ffns: Sequence[SwiGLU]) -> bool:
    """Whether moe_ffn / moe_batch serve these FFNs: the C extension has them and C kernels
    serve every matrix."""
    return types_fuse(t for f in ffns for t in (f.gate.fmt.ggml_type, f.up.fmt.ggml_type, f.down.fmt.ggml_type))


def types_fuse(ggml_types: Iterable) -> bool:
    """can_fuse for matrices of these types."""
    return fused_enabled() and all(t in C_FORMATS for t in ggml_types)


_workspace = threading.local()  # {(n_embd, n_ffs): uint8 array}, reused every token


def _workspace_for(n_embd: int, n_ffs: tuple[int, ...]) -> np.ndarray:
    held = _workspace.__dict__.setdefault("buffers", {})
    buf = held.get((n_embd, n_ffs))
    if buf is None:
        buf = held[(n_embd, n_ffs)] = np.empty(cext.moe_workspace_bytes(n_embd, n_ffs), dtype=np.uint8)
    return buf


def moe_ffn(x: np.ndarray, routed: Sequence[SwiGLU], weights: np.ndarray, out: np.ndarray,
            shared: Sequence[SwiGLU] = (), shared_out: np.ndarray | None = None, act: str = "swiglu",
            biases: Sequence[Biases] | None = None) -> np.ndarray:
    """out (1, n_embd) = sum over slots s of weights[s] * routed[s](x), added in slot order;
    shared_out (len(shared), n_embd): each shared FFN's output, unweighted. x float32 (1, n_embd),
    weights float32 (len(routed),). The routed experts' activation is `act` ("swiglu" or
    "swiglu_oai"), and biases[s] (float32 rows) their biases if given; shared FFNs are plain
    SwiGLU. Every FFN must pass can_fuse, and its matrices stay alive (pinned) during the call."""
    specs = tuple(f.kernel_spec for f in routed) + tuple(f.kernel_spec for f in shared)
    n_ffs = tuple(s[6] for s in specs)
    cext.moe_ffn(x, out, shared_out, _workspace_for(x.shape[1], n_ffs), len(routed), specs,
                 np.ascontiguousarray(weights, dtype=np.float32), act, None if biases is None else tuple(biases))
    return out


def moe_batch(x: np.ndarray, experts: Sequence[SwiGLU], counts: np.ndarray, pairs: np.ndarray, weights: np.ndarray,
              per_slot: np.ndarray, act: str = "swiglu", biases: Sequence[Biases] | None = None) -> None:
    """Several tokens (a prompt's micro-batch), each routed to k experts: experts[j] runs once
    on the counts[j] (token, slot) pairs that follow the previous experts' in `pairs` (int32
    (n, 2)), and per_slot[token, slot] (float32 (n_tokens, k, n_embd)) receives its output
    times weights[token, slot]. `act` and biases[j] (experts[j]'s) as in moe_ffn. At most
    cext.MOE_MAX_JOBS experts a call, all pinned during it."""
    cext.moe_batch(x, per_slot, np.ascontiguousarray(weights, dtype=np.float32), tuple(f.kernel_spec for f in experts),
                   np.ascontiguousarray(counts, dtype=np.int32), np.ascontiguousarray(pairs, dtype=np.int32), act,
                   None if biases is None else tuple(biases))


def _ffn_ref(f: SwiGLU, x: np.ndarray, expert: bool, act: str = "swiglu", bias: Biases | None = None) -> np.ndarray:
    """One FFN as forward._ffn computes it: matmuls, gate += bg, up += bu, the activation,
    down, += bd."""
    gate, up = matmuls((f.gate, f.up), x, expert=expert)
    if bias is not None:
        gate += bias[0]
        up += bias[1]
    out = matmul(f.down, silu_mul(gate, up) if act == "swiglu" else swiglu_oai(gate, up), expert=expert)
    if bias is not None:
        out += bias[2]
    return out


def moe_ffn_ref(x: np.ndarray, routed: Sequence[SwiGLU], weights: Sequence[float], shared: Sequence[SwiGLU] = (),
                act: str = "swiglu", biases: Sequence[Biases] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """moe_ffn as one matmul call per matrix (the path it replaces): (out, shared_out)."""
    out = None
    for s, (f, w) in enumerate(zip(routed, weights)):
        y = _ffn_ref(f, x, True, act, None if biases is None else biases[s]) * np.float32(w)
        out = y if out is None else out + y
    if out is None:
        out = np.zeros_like(x)
    shared_out = (np.concatenate([_ffn_ref(f, x, False) for f in shared]) if shared
                  else np.empty((0, x.shape[1]), np.float32))
    return out, shared_out


def moe_batch_ref(x: np.ndarray, experts: Sequence[SwiGLU], chosen: np.ndarray, weights: np.ndarray,
                  act: str = "swiglu", biases: Sequence[Biases] | None = None) -> np.ndarray:
    """moe_batch as one matmul call per matrix, per expert: per_slot (n_tokens, k, n_embd) for
    `chosen` (n_tokens, k) indices into `experts` (biases[e]: experts[e]'s); slots of no expert
    stay zero."""
    per_slot = np.zeros((len(x), chosen.shape[1], x.shape[1]), dtype=np.float32)
    for e, f in enumerate(experts):
        tokens, slots = np.nonzero(chosen == e)
        if len(tokens):
            y = _ffn_ref(f, np.ascontiguousarray(x[tokens]), True, act, None if biases is None else biases[e])
            per_slot[tokens, slots] = y * weights[tokens, slots][:, None]
    return per_slot
