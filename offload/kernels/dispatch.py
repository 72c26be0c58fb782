"""matmul with llama.cpp's CPU numerics: convert the activations as ggml does, pick the kernel.

ggml's CPU matmul first converts each activation row to the weight type's `vec_dot_type`
(F16, BF16, Q8_0, Q8_1 or Q8_K blocks; F32 stays as is), then takes dot products in that type. Both
steps are tables here, so a new format or a faster kernel is one entry:

* `ACTIVATION_CONVERTERS[vec_dot_type](x) -> act`, a tuple of arrays,
* `KERNELS[ggml_type](w.data, act, out, expert)`, filling out in place. `expert` says the
  matrix is a routed expert (ggml's mul_mat_id), whose float kernels sum in another order.

Every format has a Numba kernel (`NUMBA_KERNELS`); most also have C kernels (cext/, SIMD),
which sum in the same order and so give the same bits. `select_kernels` fills `KERNELS`
with the C kernel where the extension was built, else the Numba one, and the Q8_0/Q8_K
converters likewise (Q8_0, Q8_K, Q8_1): a run with the C kernels never loads Numba (see `jit`).

One more rule of ggml's: a K-quant matmul of 8 or more tokens goes through its tiled GEMM,
which rounds in another order (see `tiled`); `TILED_KERNELS` serve those calls.
IQ4_NL has a rule of its own: a plain matmul (not a routed expert's) of 2 or more tokens
goes through llamafile's sgemm, another order again (see `iq4`); `SGEMM_KERNELS` serve it.

Where the C kernels serve every matrix of a call (`C_FORMATS`), one C call converts the
activations and runs the matrices that share them (`cext.matmul_x`): the same bits as the
two steps above, without a Numba call and the Python between them for every matrix.
"""

from __future__ import annotations

import os
import threading
import warnings
import weakref
from contextlib import contextmanager
from typing import Callable, Iterator

import numpy as np
from gguf import GGMLQuantizationType

from . import cext
from . import numba_kernels as nk
from .formats import QMatrix, UnsupportedQuantType, activation_ref, round_bf16, round_f16
from .tiled import TILED_MIN_TOKENS, TILED_TYPES, matmul_tiled_numba
from . import iq4, q4_1_q5

Activations = tuple[np.ndarray, ...]
Converter = Callable[[np.ndarray], Activations]
Kernel = Callable[[np.ndarray, Activations, np.ndarray, bool], None]

_NUMBA_QUANTIZERS: dict[str, Converter] = {"Q8_0": nk.quantize_q8_0, "Q8_K": nk.quantize_q8_k,
                                            "Q8_1": q4_1_q5.quantize_q8_1}
ACTIVATION_CONVERTERS: dict[str, Converter] = {
    "F32": lambda x: (x,),
    "F16": lambda x: (round_f16(x),),
    "BF16": lambda x: (round_bf16(x),),
    **_NUMBA_QUANTIZERS,  # or their C twins (select_kernels)
}

NUMBA_KERNELS: dict[GGMLQuantizationType, Kernel] = {
    GGMLQuantizationType.F32: nk.matmul_f32,
    GGMLQuantizationType.F16: nk.matmul_f16,
    GGMLQuantizationType.BF16: nk.matmul_bf16,
    GGMLQuantizationType.Q8_0: nk.matmul_q8_0,
    GGMLQuantizationType.Q4_0: nk.matmul_q4_0,
}

FLOAT_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)

# The kernels `matmul` uses, per format: filled by select_kernels().
KERNELS: dict[GGMLQuantizationType, Kernel] = {}
TILED_KERNELS: dict[GGMLQuantizationType, Kernel] = {}  # K-quants with >= TILED_MIN_TOKENS tokens
C_FORMATS: set[GGMLQuantizationType] = set()  # those served by the C extension now
# IQ4_NL: a plain matmul (not a routed expert) of SGEMM_MIN_TOKENS+ tokens goes through
# llamafile's sgemm in ggml, which sums in its own order (see iq4); these kernels serve it.
SGEMM_MIN_TOKENS = 2
SGEMM_KERNELS: dict[GGMLQuantizationType, Kernel] = {}
_ONE_CALL = False  # cext.matmul_x serves the C formats (select_kernels)
_FUSED = False  # whole blocks in one C call: a layer's experts (kernels.moe), a token's attention (kernels.block)
_STEP = False  # a whole decoding step in one C call (kernels.step)


def select_kernels(implementation: str | None = None) -> None:
    """Use the C kernels where built (default), or `implementation="numba"` for all formats.

    The environment variable OFFLOAD_KERNELS (c / numba) sets the default. Falling back to
    Numba because the C extension is missing is said once, as a warning.
    """
    implementation = (implementation or os.environ.get("OFFLOAD_KERNELS") or "c").lower()
    if implementation not in ("c", "numba"):
        raise ValueError(f"OFFLOAD_KERNELS must be 'c' or 'numba', got {implementation!r}")
    KERNELS.clear()
    KERNELS.update(NUMBA_KERNELS)
    TILED_KERNELS.clear()
    for t in TILED_TYPES:
        TILED_KERNELS[t] = _numba_tiled(t)
    SGEMM_KERNELS.clear()
    SGEMM_KERNELS[GGMLQuantizationType.IQ4_NL] = iq4.matmul_iq4_nl_sgemm
    ACTIVATION_CONVERTERS.update(_NUMBA_QUANTIZERS)
    cext.select(False)
    C_FORMATS.clear()
    global _ONE_CALL, _FUSED, _STEP
    _ONE_CALL = _FUSED = _STEP = False
    if implementation == "numba":
        return
    if not cext.available():
        warnings.warn("offload: the C kernels were not built (no C compiler at install?); using the slower "
                      "Numba kernels for every format", RuntimeWarning, stacklevel=2)
        return
    cext.select(True)
    ACTIVATION_CONVERTERS.update({kind: _c_quantizer(kind) for kind in _NUMBA_QUANTIZERS})
    for t in FLOAT_TYPES:  # float weights: their own C call (not matmul_x's), outside C_FORMATS
        kernel = cext.c_float_kernel(t.name)
        if kernel is not None:
            KERNELS[t] = kernel
    for t in NUMBA_KERNELS:
        kernel = cext.c_kernel(t.name)
        if kernel is not None:
            KERNELS[t] = kernel
            C_FORMATS.add(t)
    for t in TILED_TYPES:
        kernel = cext.c_tiled_kernel(t.name)
        if kernel is not None:
            TILED_KERNELS[t] = kernel
    kernel = cext.c_kernel("IQ4_NL_SGEMM")
    if kernel is not None:
        SGEMM_KERNELS[GGMLQuantizationType.IQ4_NL] = kernel
    _ONE_CALL = cext.has_matmul_x() and os.environ.get("OFFLOAD_ONE_CALL", "1") != "0"
    _FUSED = cext.has_moe_ffn() and cext.has_attention_token() and os.environ.get("OFFLOAD_FUSED", "1") != "0"
    _STEP = _FUSED and cext.has_step() and os.environ.get("OFFLOAD_STEP", "1") != "0"


def fused_enabled() -> bool:
    """Whether kernels.moe and kernels.block may run a layer's experts, or a decoding token's
    attention block, in one C call (OFFLOAD_FUSED=0: one call per matrix, for comparison)."""
    return _FUSED


def step_enabled() -> bool:
    """Whether a decoding token may run as one C call (kernels.step; OFFLOAD_STEP=0 turns it off)."""
    return _STEP


def uses_numba(ggml_types) -> bool:
    """Whether weights of these types run any Numba kernel (which loads Numba): every type
    without the C kernels, else those whose format has no C kernel."""
    if not cext.selected():
        return True
    return any(t in KERNELS and KERNELS[t] is NUMBA_KERNELS.get(t) for t in ggml_types)


def _c_quantizer(kind: str) -> Converter:
    """cext.quantize behind the Numba quantizers' signature: (x, out=None) -> out."""
    def convert(x: np.ndarray, out: tuple | None = None) -> Activations:
        return cext.quantize(kind, x, out if out is not None else _ACT_LAYOUTS[kind](*x.shape))

    return convert


def _numba_tiled(t: GGMLQuantizationType) -> Kernel:
    from .formats import FORMATS

    def kernel(w: np.ndarray, act: Activations, out: np.ndarray, expert: bool = False) -> None:
        matmul_tiled_numba(FORMATS[t], w, act, out)

    return kernel


def kernels_in_use() -> str:
    """One line for users: which implementation serves which format."""
    c = sorted(t.name for t in KERNELS if KERNELS[t] is not NUMBA_KERNELS.get(t))
    numba = sorted(t.name for t in KERNELS if KERNELS[t] is NUMBA_KERNELS.get(t))
    parts = [f"C/{cext.isa()}: {' '.join(c)}"] if c else []
    return "; ".join(parts + [f"Numba: {' '.join(numba)}"])


# Quantized activations are written into buffers kept per thread and reused, so that a
# decode step allocates nothing for them once warm: {(vec_dot_type, n_cols): (rows, arrays)}.
_ACT_LAYOUTS: dict[str, Callable[[int, int], tuple[np.ndarray, ...]]] = {
    "Q8_0": lambda n, k: (np.empty((n, k), np.int8), np.empty((n, k // 32), np.float32)),
    "Q8_K": lambda n, k: (np.empty((n, k), np.int8), np.empty((n, k // 256), np.float32), np.empty((n, k // 16), np.int16)),
    "Q8_1": lambda n, k: (np.empty((n, k), np.int8), np.empty((n, k // 32), np.float32), np.empty((n, k // 32), np.float32)),
}
_workspace = threading.local()


def convert_activations(vec_dot_type: str, x: np.ndarray) -> Activations:
    """x converted as ggml converts a matmul's input for weights of this vec_dot_type. For
    the quantized types the result lives in a reused per-thread buffer: valid until the
    next conversion to the same type and width on this thread."""
    layout = _ACT_LAYOUTS.get(vec_dot_type)
    if layout is None:
        return ACTIVATION_CONVERTERS[vec_dot_type](x)
    buffers = _workspace.__dict__.setdefault("buffers", {})
    n, k = x.shape
    held = buffers.get((vec_dot_type, k))
    if held is None or held[0] < n:  # [capacity, arrays, n of the cached views, the views]
        cap = max(n, 1)
        held = buffers[(vec_dot_type, k)] = [cap, layout(cap, k), -1, None]
    if held[2] != n:
        held[2], held[3] = n, tuple(a[:n] for a in held[1])
    return ACTIVATION_CONVERTERS[vec_dot_type](x, held[3])


def _check(w: QMatrix, x: np.ndarray) -> np.ndarray:
    if not isinstance(w, QMatrix):
        raise TypeError(f"matmul expects a QMatrix, got {type(w).__name__}")
    if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 2 or x.shape[1] != w.n_cols:
        got = f"{x.dtype} {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
        raise ValueError(f"matmul with a {w.n_rows}x{w.n_cols} {w.fmt.name} matrix needs float32 (n_tokens, {w.n_cols}), got {got}")
    return np.ascontiguousarray(x)


def _output(w: QMatrix, n_tokens: int, out: np.ndarray | None) -> np.ndarray:
    shape = (n_tokens, w.n_rows)
    if out is None:
        return np.empty(shape, dtype=np.float32)
    if out.dtype != np.float32 or out.shape != shape or not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError(f"out must be a writable C-contiguous float32 {shape}, got {out.dtype} {out.shape}")
    return out


def _one_call(ws, n_tokens: int) -> bool:
    """Whether cext.matmul_x serves all of `ws` for this many tokens (row-dot kernels, not tiled)."""
    if not _ONE_CALL or n_tokens == 0 or len(ws) > cext.MATMUL_X_MAX:
        return False
    for w in ws:
        t = w.fmt.ggml_type
        if t not in C_FORMATS or (n_tokens >= TILED_MIN_TOKENS and t in TILED_TYPES):
            return False
        if n_tokens >= SGEMM_MIN_TOKENS and t in SGEMM_KERNELS:  # expert or not: _run picks the order
            return False
    return True


def _run(w: QMatrix, act: Activations, n_tokens: int, out: np.ndarray | None, expert: bool) -> np.ndarray:
    out = _output(w, n_tokens, out)
    if out.size == 0:
        return out
    if n_tokens >= TILED_MIN_TOKENS and w.fmt.ggml_type in TILED_TYPES:
        kernel = TILED_KERNELS[w.fmt.ggml_type]
    elif n_tokens >= SGEMM_MIN_TOKENS and not expert and w.fmt.ggml_type in SGEMM_KERNELS:
        kernel = SGEMM_KERNELS[w.fmt.ggml_type]
    else:
        kernel = KERNELS.get(w.fmt.ggml_type)
    if kernel is None:
        raise UnsupportedQuantType(w.fmt.ggml_type, "has no matmul kernel")
    kernel(w.data, act, out, expert)
    return out


# Rows of independent sequences (a batch of decoding tokens, one per sequence): each row must
# get the bits it gets alone, where ggml's batch would take another order (rows_as_alone).
_alone = threading.local()


@contextmanager
def rows_as_alone() -> Iterator[None]:
    """Within it, on this thread, every row of a matmul gets the bits that row gets as a batch
    of one: formats whose batches sum in another order than one token (float weights' tinyBLAS,
    IQ4_NL's sgemm, the tiled K-quant GEMM) run row by row; the others keep one pass over the
    weights for all rows, whose row dots do not depend on the batch."""
    before = getattr(_alone, "on", False)
    _alone.on = True
    try:
        yield
    finally:
        _alone.on = before


def _batch_order_is_alone(w: QMatrix, n_tokens: int, expert: bool) -> bool:
    """Whether a batch of n_tokens rows sums each row as a batch of one does."""
    t = w.fmt.ggml_type
    if t in FLOAT_TYPES:
        return False
    if n_tokens >= TILED_MIN_TOKENS and t in TILED_TYPES:
        return False
    return not (n_tokens >= SGEMM_MIN_TOKENS and not expert and t in SGEMM_KERNELS)


def _row_by_row(ws, x: np.ndarray, n: int, expert: bool, outs) -> list[np.ndarray] | None:
    """Under rows_as_alone, [matmul of each row alone] where the batch order of n (2 or more)
    rows would differ; else None."""
    if not getattr(_alone, "on", False) or all(_batch_order_is_alone(w, n, expert) for w in ws):
        return None
    results = [_output(w, n, outs[i] if outs else None) for i, w in enumerate(ws)]
    for r in range(n):
        for w, out in zip(ws, results):
            matmul(w, x[r : r + 1], out=out[r : r + 1], expert=expert)
    return results


def matmul(w: QMatrix, x: np.ndarray, out: np.ndarray | None = None, expert: bool = False) -> np.ndarray:
    """out[t, r] = sum_c W[r, c] * act(x)[t, c] for x float32 (n_tokens, n_cols).

    Returns `out` (float32 (n_tokens, n_rows)), allocated unless given. x is used in place
    if C-contiguous, else copied (layout only: its dtype must already be float32, since a
    silent float64 -> float32 cast would hide a numerics bug upstream).
    """
    x = _check(w, x)
    n = x.shape[0]
    if n > 1 and (alone := _row_by_row((w,), x, n, expert, (out,))) is not None:
        return alone[0]
    if _one_call((w,), n):
        out = _output(w, n, out)
        cext.matmul_x(x, n, ((w.fmt.name, w.data, out, w.n_rows),))
        return out
    return _run(w, convert_activations(w.fmt.vec_dot_type, x), n, out, expert)


class HeadStack:
    """Per-head matrices whose rows lie one after another in one quantized format, as one
    block of bytes (MLA's k_b and v_b): what cext.matmul_heads and the decode step take."""

    __slots__ = ("fmt", "n_heads", "n_rows", "n_cols", "data", "address", "__weakref__")

    def __init__(self, ws: list[QMatrix]):
        w0 = ws[0]
        size = w0.data.nbytes
        self.fmt, self.n_heads, self.n_rows, self.n_cols = w0.fmt, len(ws), w0.n_rows, w0.n_cols
        self.data = np.lib.stride_tricks.as_strided(w0.data, shape=(len(ws), size), strides=(size, 1), writeable=False)
        self.address = w0.data.ctypes.data

    @property
    def kernel_spec(self) -> tuple:
        """(format, address of head 0's rows, rows per head)."""
        return (self.fmt.name, self.address, self.n_rows)


# head_stack's answers, by the first head's id: (weak references to the heads, the stack or None)
_STACKS: dict[int, tuple[tuple, HeadStack | None]] = {}


def head_stack(ws: list[QMatrix]) -> HeadStack | None:
    """The heads `ws` as one HeadStack when their rows lie one after another in a quantized
    format the C kernels serve now (else None: the caller runs one matmul per head). The layout
    check runs once per list of heads; later calls only see that they are the same matrices."""
    if not ws or not _ONE_CALL or ws[0].fmt.ggml_type not in C_FORMATS or ws[0].fmt.block_size == 1:
        return None
    key = id(ws[0])
    held = _STACKS.get(key)
    if held is not None and len(held[0]) == len(ws) and all(r() is w for r, w in zip(held[0], ws)):
        return held[1]
    w0 = ws[0]
    base, size = w0.data.ctypes.data, w0.data.nbytes
    stack = None
    if all(w.fmt is w0.fmt and w.data.shape == w0.data.shape and w.data.ctypes.data == base + h * size
           for h, w in enumerate(ws)):
        stack = HeadStack(ws)
    if held is None:  # the stack views the first head's bytes: forgotten with it
        weakref.finalize(w0, _STACKS.pop, key, None)
    _STACKS[key] = (tuple(weakref.ref(w) for w in ws), stack)
    return stack


def matmul_heads(ws: list[QMatrix], x: np.ndarray) -> np.ndarray | None:
    """[matmul(w, x[h]) for h, w in enumerate(ws)] for one token per head (x float32 (n_heads,
    n_cols)), as (n_heads, n_rows), in one C call where the heads' rows lie one after another in
    a quantized format matmul_x serves (MLA's k_b and v_b); else None (the caller loops). The
    result lives in a buffer of this thread reused by the next call on the same heads."""
    stack = head_stack(ws)
    if stack is None:
        return None
    buffers = _workspace.__dict__.setdefault("heads", {})
    out = buffers.get(id(stack))
    if out is None or out.shape != (stack.n_heads, stack.n_rows):
        out = buffers[id(stack)] = np.empty((stack.n_heads, stack.n_rows), dtype=np.float32)
    if x.dtype != np.float32 or not x.flags.c_contiguous:
        x = np.ascontiguousarray(x, dtype=np.float32)
    cext._cext.matmul_heads(x, stack.n_heads, stack.n_cols, stack.fmt.name, stack.data, out, stack.n_rows)
    return out


def matmuls(ws: tuple[QMatrix, ...], x: np.ndarray, expert: bool = False,
            outs: tuple[np.ndarray | None, ...] | None = None) -> list[np.ndarray]:
    """[matmul(w, x, out) for w, out in zip(ws, outs)], converting x once per vec_dot_type
    (as Q, K and V, or an expert's gate and up, share their input)."""
    x = _check(ws[0], x)
    for w in ws[1:]:
        if not isinstance(w, QMatrix) or w.n_cols != x.shape[1]:
            _check(w, x)  # raises the error
    n = x.shape[0]
    if n > 1 and (alone := _row_by_row(ws, x, n, expert, outs)) is not None:
        return alone
    if _one_call(ws, n):
        results = [_output(w, n, outs[i] if outs else None) for i, w in enumerate(ws)]
        cext.matmul_x(x, n, tuple((w.fmt.name, w.data, out, w.n_rows) for w, out in zip(ws, results)))
        return results
    acts: dict[str, Activations] = {}
    results = []
    for i, w in enumerate(ws):
        t = w.fmt.vec_dot_type
        if t not in acts:
            acts[t] = convert_activations(t, x)
        results.append(_run(w, acts[t], x.shape[0], outs[i] if outs else None, expert))
    return results


def dequantize_rows(w: QMatrix, rows: np.ndarray) -> np.ndarray:
    """Rows of W as float32 (len(rows), n_cols), decoded exactly (ggml get_rows: token embeddings)."""
    rows = np.asarray(rows)
    if rows.ndim != 1 or (rows.size and not np.issubdtype(rows.dtype, np.integer)):
        raise ValueError(f"rows must be a 1-D array of integers, got {rows.dtype} {rows.shape}")
    if rows.size and (rows.min() < 0 or rows.max() >= w.n_rows):
        raise ValueError(f"row index out of range for a matrix of {w.n_rows} rows: {rows.min()}..{rows.max()}")
    return w.fmt.dequantize(w.data[rows.astype(np.intp)])


def matmul_ref(w: QMatrix, x: np.ndarray) -> np.ndarray:
    """float64 reference for `matmul`: dequantize(W) @ act(x), both exact, summed in float64."""
    act = activation_ref(w.fmt.vec_dot_type, np.asarray(x, dtype=np.float32))
    return act.astype(np.float64) @ w.dequantize().astype(np.float64).T


def matmul_f32_arrays(w: np.ndarray, x: np.ndarray, src1_contiguous: bool = True) -> np.ndarray:
    """out[t, r] = w[r] . x[t] for plain float32 arrays, summed as ggml's mul_mat does
    (attention's K.Q and V.softmax). ggml takes its batched (tinyBLAS) order only when
    its right operand is contiguous in memory, which Q (a permuted view) is not."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty((x.shape[0], w.shape[0]), dtype=np.float32)
    KERNELS[GGMLQuantizationType.F32](w.view(np.uint8), (x,), out, not src1_contiguous)
    return out
