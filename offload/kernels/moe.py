"""A MoE layer's experts for one decoding token: one C call instead of one per matrix.

A fine-grained MoE layer (Qwen3-30B-A3B: top-8 of 128 experts of 768) is 24 small matmuls
per token; called one by one, each pays a fork/join of the thread team and the Python
around it, which cost more than the matrices take to stream. `moe_ffn` runs them all in one
parallel region (cext/moe.c): gate and up of every selected expert and shared expert, the
threads splitting all their rows together; SwiGLU; every down; the routed outputs weighted
and summed in slot order.

`moe_ffn_ref` is the same computation as the per-matrix calls it replaces (dispatch.matmuls
and silu_mul, llama.cpp's build_moe_ffn order): the reference the C path equals bit for bit.
"""

from __future__ import annotations

import threading
from typing import Protocol, Sequence

import numpy as np

from . import cext
from .dispatch import C_FORMATS, fused_moe_enabled, matmul, matmuls
from .formats import QMatrix
from .ggml_math import silu_mul


class SwiGLU(Protocol):  # weights.FFN
    gate: QMatrix
    up: QMatrix
    down: QMatrix
    kernel_spec: tuple  # (gate fmt, address, up fmt, address, down fmt, address, n_ff)


def can_fuse(ffns: Sequence[SwiGLU]) -> bool:
    """Whether moe_ffn serves these FFNs: the C extension has it and C kernels serve every matrix."""
    if not fused_moe_enabled():
        return False
    for f in ffns:
        if (f.gate.fmt.ggml_type not in C_FORMATS or f.up.fmt.ggml_type not in C_FORMATS
                or f.down.fmt.ggml_type not in C_FORMATS):
            return False
    return True


_workspace = threading.local()  # {(n_embd, n_ffs): uint8 array}, reused every token


def _workspace_for(n_embd: int, n_ffs: tuple[int, ...]) -> np.ndarray:
    held = _workspace.__dict__.setdefault("buffers", {})
    buf = held.get((n_embd, n_ffs))
    if buf is None:
        buf = held[(n_embd, n_ffs)] = np.empty(cext.moe_workspace_bytes(n_embd, n_ffs), dtype=np.uint8)
    return buf


def moe_ffn(x: np.ndarray, routed: Sequence[SwiGLU], weights: np.ndarray, out: np.ndarray,
            shared: Sequence[SwiGLU] = (), shared_out: np.ndarray | None = None) -> np.ndarray:
    """out (1, n_embd) = sum over slots s of weights[s] * routed[s](x), added in slot order;
    shared_out (len(shared), n_embd): each shared FFN's output, unweighted. x float32 (1, n_embd),
    weights float32 (len(routed),). Every FFN must pass can_fuse, and its matrices stay alive
    (pinned) during the call."""
    specs = tuple(f.kernel_spec for f in routed) + tuple(f.kernel_spec for f in shared)
    n_ffs = tuple(s[6] for s in specs)
    cext.moe_ffn(x, out, shared_out, _workspace_for(x.shape[1], n_ffs), len(routed), specs,
                 np.ascontiguousarray(weights, dtype=np.float32))
    return out


def moe_ffn_ref(x: np.ndarray, routed: Sequence[SwiGLU], weights: Sequence[float], shared: Sequence[SwiGLU] = ()
                ) -> tuple[np.ndarray, np.ndarray]:
    """moe_ffn as one matmul call per matrix (the path it replaces): (out, shared_out)."""
    def ffn(f, expert):
        gate, up = matmuls((f.gate, f.up), x, expert=expert)
        return matmul(f.down, silu_mul(gate, up), expert=expert)

    out = None
    for f, w in zip(routed, weights):
        y = ffn(f, True) * np.float32(w)
        out = y if out is None else out + y
    if out is None:
        out = np.zeros_like(x)
    shared_out = np.concatenate([ffn(f, False) for f in shared]) if shared else np.empty((0, x.shape[1]), np.float32)
    return out, shared_out
