"""Causal grouped-query attention over the KV cache, summed as llama.cpp's CPU backend does.

llama.cpp computes, per KV head g and its group of query heads:
  scores = K_g . Q   ggml_vec_dot_f32 per (position, query) (Q is a permuted, non-contiguous
                     view, so tinyBLAS is not used), times 1/sqrt(head_dim), future masked
  probs  = softmax   ggml's, over the KV length padded to 256 (n_kv; padding weighs exactly 0)
  out    = V_g^T . probs   one mul_mat per query head over the batch's n tokens: tinyBLAS
                     (8 lanes over positions, hsum_float_8) when n >= 2 and head_dim % 4 == 0,
                     else ggml_vec_dot_f32 (32 lanes). A decoding token (n = 1) is always
                     vec_dot: llamafile_sgemm declines n < 2 however many heads share a KV head.
Padding adds exact zeros in every one of these orders, so the kernel runs to the real
length and needs no padded copies. `attention_ref` is the same in numpy, step by step.

Sliding-window layers (gpt-oss) keep their keys in a ring, as llama.cpp's SWA cache does:
position p in cell p % n_cells once the positions outgrow the cells; the sums above run
over cells in cell order, the cells outside a query's window masked (weighing exactly 0).
A sink logit per head (gpt-oss) joins the softmax's max, and its exp (libm's expf, as in
ggml_compute_forward_soft_max_f32) is added to the sum after the chunks.
"""

from __future__ import annotations

import math

import numpy as np

from . import cext, ggml_math
from .dispatch import matmul_f32_arrays
from .ggml_math import _expf1
from .jit import njit, prange
from .numba_intrinsics import fma32, round_f16
from .numba_kernels import F16_TO_F32


@njit(inline="always")
def _fold32(acc):
    """ggml_vec_dot_f32's reduction of its four 8-lane accumulators (acc[8*a + i])."""
    for i in range(8):
        acc[i] = (acc[i] + acc[16 + i]) + (acc[8 + i] + acc[24 + i])
    t0, t1, t2, t3 = acc[0] + acc[4], acc[1] + acc[5], acc[2] + acc[6], acc[3] + acc[7]
    return (t0 + t1) + (t2 + t3)


@njit(inline="always")
def _hsum8(acc):
    a0, a1, a2, a3 = acc[4] + acc[0], acc[5] + acc[1], acc[6] + acc[2], acc[7] + acc[3]
    return (a0 + a2) + (a1 + a3)


@njit(inline="always")
def _cell_position(c, last, n_cells, wrapped, cell_pos):
    """The position cell c holds once positions up to `last` are written (-1: empty)."""
    if len(cell_pos):
        return cell_pos[c]
    return last - (last - c) % n_cells if wrapped else c


@njit(cache=True, nogil=True, parallel=True)
def _attention(q, k_cache, v_cache, k16, v16, f16_table, start, n_head, n_head_kv, head_dim, v_dim, scale, window,
               sinks, cell_pos, out):
    """q (n, n_head*hd); k_cache (n_cells, n_head_kv*hd), v_cache (n_cells, >= n_head_kv*v_dim)
    of one layer, positions up to start + n written (position p in cell p % n_cells, or as
    cell_pos says when it is not empty); out (n, n_head*v_dim); window 0: none; sinks:
    (n_head,) or empty. An F16 cache comes as k16 / v16 (uint16 halves, f16_table their
    values) with an empty k_cache / v_cache, else k16 / v16 are empty: as cext/attention.c,
    q is rounded to F16 for F16 keys and K.q sums in tinyBLAS's 8 lanes for 2+ tokens (head_dim
    % 8 == 0) or vec_dot_f16's 32 with the tail in double; the probabilities are rounded to
    F16 for F16 values."""
    n = q.shape[0]
    key16, value16 = k16.shape[0] > 0, v16.shape[0] > 0
    n_cells = k16.shape[0] if key16 else k_cache.shape[0]
    last = start + n - 1
    wrapped = last >= n_cells or len(cell_pos) > 0
    hd, vd = head_dim, v_dim
    group = n_head // n_head_kv
    gemm8 = n >= 2 and vd % 4 == 0
    kq8 = key16 and n >= 2 and hd % 8 == 0
    main = hd - hd % 32
    for h in prange(n_head):
        acc = np.zeros(32, dtype=np.float32)
        probs = np.empty(len(cell_pos) if len(cell_pos) else min(start + n, n_cells), dtype=np.float32)
        vacc = np.zeros((32, vd), dtype=np.float32)  # (lane, d)
        qr = np.empty(hd, dtype=np.float32)
        g = h // group
        kv0 = g * hd
        v0 = g * vd
        for t in range(n):
            qrow = q[t, h * hd:(h + 1) * hd]
            if key16:  # ggml converts q to the keys' F16 first
                for c in range(hd):
                    qr[c] = round_f16(qrow[c])
                qrow = qr
            pos = start + t
            live = len(probs) if wrapped else pos + 1  # causal: later positions weigh exactly +0 and are skipped
            m = np.float32(-np.inf)
            for p in range(live):
                cp = _cell_position(p, last, n_cells, wrapped, cell_pos)
                if cp < 0 or cp > pos or (window > 0 and pos - cp >= window):
                    probs[p] = -np.inf
                    continue
                acc[:] = 0.0
                if kq8:
                    for c in range(hd):
                        acc[c % 8] = fma32(f16_table[k16[p, kv0 + c]], qrow[c], acc[c % 8])
                    s = _hsum8(acc)
                elif key16:
                    for c in range(0, main, 32):
                        for lane in range(32):
                            acc[lane] = fma32(f16_table[k16[p, kv0 + c + lane]], qrow[c + lane], acc[lane])
                    s64 = np.float64(_fold32(acc))
                    for c in range(main, hd):
                        s64 += np.float64(f16_table[k16[p, kv0 + c]] * qrow[c])
                    s = np.float32(s64)
                else:
                    for c in range(0, main, 32):
                        for lane in range(32):
                            acc[lane] = fma32(k_cache[p, kv0 + c + lane], qrow[c + lane], acc[lane])
                    s = _fold32(acc)
                    for c in range(main, hd):
                        s += k_cache[p, kv0 + c] * qrow[c]
                s = s * scale
                probs[p] = s
                if s > m:
                    m = s
            if len(sinks) and sinks[h] > m:
                m = sinks[h]
            # ggml's softmax: exp in chunks of 8, each chunk's hsum added in double
            total = 0.0
            for c in range(0, live, 8):
                lanes = acc[:8]
                lanes[:] = 0.0
                for p in range(c, min(c + 8, live)):
                    e = _expf1(probs[p] - m)
                    probs[p] = e
                    lanes[p - c] = e
                total += np.float64(_hsum8(lanes))
            if len(sinks):
                total += np.float64(np.float32(math.exp(sinks[h] - m)))  # libm's expf
            inv = np.float32(1.0 / total)
            for p in range(live):
                probs[p] = probs[p] * inv
            # V^T . probs, lanes over positions
            vacc[:, :] = 0.0
            width = 8 if gemm8 else 32
            for p in range(live):
                w = round_f16(probs[p]) if value16 else probs[p]
                if w == 0.0:
                    continue  # masked: adds exactly +0
                lane = vacc[p % width]
                if value16:
                    for d in range(vd):
                        lane[d] = fma32(f16_table[v16[p, v0 + d]], w, lane[d])
                else:
                    for d in range(vd):
                        lane[d] = fma32(v_cache[p, v0 + d], w, lane[d])
            for d in range(vd):
                col = acc  # this output's lanes, gathered
                for lane in range(width):
                    col[lane] = vacc[lane, d]
                out[t, h * vd + d] = _hsum8(col) if gemm8 else _fold32(col)


def attention(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray | None, start: int, n_head: int,
              n_head_kv: int, head_dim: int, out: np.ndarray | None = None, window: int = 0,
              sinks: np.ndarray | None = None, v_dim: int | None = None, scale: float | None = None,
              cell_pos: np.ndarray | None = None) -> np.ndarray:
    """Attention of the n new queries q (n, n_head*head_dim) at positions start.. over one
    layer's cache (n_cells rows, positions up to start + n written, position p in cell
    p % n_cells); returns (n, n_head*v_dim). `window`: keys fewer than this many positions
    back (0: all); `sinks`: (n_head,) sink logits; `v_dim`: a value head's width (default
    head_dim); v_cache None: the values are the first v_dim floats of each key row (MLA's
    latent); `scale`: of the scores (default 1/sqrt(head_dim)); `cell_pos`: after a context
    shift (offload.kv_cells), the position of each cell to visit, int32, -1 for an empty one
    (None: position p in cell p % n_cells). All arrays float32 and C-contiguous. The C kernel
    with the C kernels, else the Numba one (same bits)."""
    v_dim = head_dim if v_dim is None else v_dim
    if out is None:
        out = np.empty((q.shape[0], n_head * v_dim), dtype=np.float32)
    if cext.selected():
        cext.attention(q, k_cache, v_cache, out, q.shape[0], start, n_head, n_head_kv, head_dim, window, sinks, v_dim,
                       0.0 if scale is None else float(scale), cell_pos)
        return out
    return attention_numba(q, k_cache, v_cache, start, n_head, n_head_kv, head_dim, out, window, sinks, v_dim, scale,
                           cell_pos)


def attention_numba(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray | None, start: int, n_head: int,
                    n_head_kv: int, head_dim: int, out: np.ndarray | None = None, window: int = 0,
                    sinks: np.ndarray | None = None, v_dim: int | None = None,
                    scale: float | None = None, cell_pos: np.ndarray | None = None) -> np.ndarray:
    v_dim = head_dim if v_dim is None else v_dim
    if out is None:
        out = np.empty((q.shape[0], n_head * v_dim), dtype=np.float32)
    scale = np.float32(1.0) / np.sqrt(np.float32(head_dim)) if scale is None else np.float32(scale)
    sinks = np.zeros(0, dtype=np.float32) if sinks is None else np.ascontiguousarray(sinks, dtype=np.float32)
    cell_pos = _NO_CELLS if cell_pos is None else np.ascontiguousarray(cell_pos, dtype=np.int32)
    v_cache = k_cache if v_cache is None else v_cache
    k16, v16 = k_cache.dtype == np.float16, v_cache.dtype == np.float16  # an F16 cache's rows
    _attention(q, _NO_FLOATS if k16 else k_cache, _NO_FLOATS if v16 else v_cache,
               k_cache.view(np.uint16) if k16 else _NO_HALVES, v_cache.view(np.uint16) if v16 else _NO_HALVES,
               F16_TO_F32, start, n_head, n_head_kv, head_dim, v_dim, scale, window, sinks, cell_pos, out)
    return out


# stand-ins for the arrays a call does not use (one type each, so one compiled kernel serves all)
_NO_CELLS = np.zeros(0, dtype=np.int32)
_NO_FLOATS = np.zeros((0, 0), dtype=np.float32)
_NO_HALVES = np.zeros((0, 0), dtype=np.uint16)


def cell_positions(n_cells: int, end: int) -> np.ndarray:
    """The position each cell holds once positions 0 .. end-1 are written (-1: empty)."""
    cells = np.arange(n_cells)
    if end <= n_cells:
        return np.where(cells < end, cells, -1)
    return (end - 1) - ((end - 1) - cells) % n_cells


def attention_ref(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray | None, start: int, n_head: int,
                  n_head_kv: int, head_dim: int, window: int = 0, sinks: np.ndarray | None = None,
                  v_dim: int | None = None, scale: float | None = None, cell_pos: np.ndarray | None = None) -> np.ndarray:
    """The same with numpy and the general matmul, over explicitly padded copies in cell order."""
    n, hd = q.shape[0], head_dim
    vd = hd if v_dim is None else v_dim
    if v_cache is None:
        v_cache = k_cache[:, :vd]
    end = start + n
    n_cells = k_cache.shape[0]
    live = min(end, n_cells) if cell_pos is None else len(cell_pos)
    q = q.reshape(n, n_head, hd)
    out = np.empty((n, n_head, vd), dtype=np.float32)
    scale = np.float32(1.0) / np.sqrt(np.float32(hd)) if scale is None else np.float32(scale)
    n_kv = -(-live // 32) * 32  # llama.cpp pads its KV length (to 256 now; any multiple of 32 sums alike)
    masked = _mask(start, n, n_cells, n_kv, window, cell_pos)
    group = n_head // n_head_kv  # query heads g*group .. share KV head g
    for g in range(n_head_kv):
        heads = slice(g * group, (g + 1) * group)
        keys = np.zeros((n_kv, hd), dtype=np.float32)
        keys[:live] = k_cache[:live, g * hd:(g + 1) * hd]
        queries = q[:, heads].transpose(1, 0, 2).reshape(group * n, hd)
        scores = matmul_f32_arrays(keys, queries, src1_contiguous=False).reshape(group, n, n_kv) * scale
        scores[:, masked] = -np.inf
        sink = None if sinks is None else np.repeat(sinks[heads], n)
        probs = ggml_math.softmax_ref(scores.reshape(group * n, n_kv), sinks=sink).reshape(group, n, n_kv)
        values_t = np.zeros((vd, n_kv), dtype=np.float32)  # llama.cpp keeps V transposed
        values_t[:, :live] = v_cache[:live, g * vd:(g + 1) * vd].T
        # ggml's mul_mat calls tinyBLAS once per query head, with that head's n tokens as its batch
        out[:, heads] = np.stack([matmul_f32_arrays(values_t, probs[j]) for j in range(group)], axis=1)
    return out.reshape(n, n_head * vd)


def _mask(start: int, n: int, n_cells: int, n_kv: int, window: int, visited: np.ndarray | None = None) -> np.ndarray:
    """(n, n_kv) True where query t (position start + t) may not look: an empty cell (the
    padding to n_kv too), a later position, or one out of the sliding window. `visited`: the
    positions of the first cells after a context shift (None: position p in cell p % n_cells)."""
    end = start + n
    cell_pos = np.full(n_kv, -1)
    if visited is None:
        live = min(end, n_cells)
        cell_pos[:live] = cell_positions(n_cells, end)[:live]
    else:
        cell_pos[: len(visited)] = visited
    query_pos = (start + np.arange(n))[:, None]
    masked = (cell_pos[None, :] < 0) | (cell_pos[None, :] > query_pos)
    if window:
        masked |= query_pos - cell_pos[None, :] >= window
    return masked


def attention_typed(q: np.ndarray, k_rows: np.ndarray, k_fmt, v_rows: np.ndarray | None, v_fmt, start: int,
                    n_head: int, n_head_kv: int, head_dim: int, window: int = 0, sinks: np.ndarray | None = None,
                    v_dim: int | None = None, scale: float | None = None, compiled: bool = True,
                    cell_pos: np.ndarray | None = None) -> np.ndarray:
    """`attention` over a cache kept in another type than F32 (offload.cache_types): k_rows /
    v_rows are the cache's encoded rows (n_cells, bytes) in formats k_fmt / v_fmt (v_rows
    None: the values are the first v_dim values of each key row, in K's format: MLA).

    llama.cpp's two mul_mats take the cache as their first operand, so the other one is
    converted to the cache's vec_dot_type: K . Q with each query head converted (F16, BF16
    or Q8_0 blocks), V^T . probs with the probabilities converted (F16, BF16). Each runs per
    query head over the batch's n tokens, through the weight kernels (kernels.dispatch): its
    vec_dot for one token, tinyBLAS for two or more. ggml's first try with the unconverted
    operand applies to F32 only, whose K . Q stays vec_dot (Q is a permuted view).

    F16 and F32 caches run in the C kernel where built, else in the Numba one (`compiled`),
    which sum in these orders directly over the cache (cext/attention.c, _attention); this
    path is their reference."""
    from .dispatch import matmul
    from .formats import QMatrix

    n, hd = q.shape[0], head_dim
    vd = hd if v_dim is None else v_dim
    if compiled and {k_fmt.name, v_fmt.name} <= {"F32", "F16"}:
        k = k_rows if k_fmt.name == "F32" else k_rows.view(np.float16)
        v = None if v_rows is None else v_rows if v_fmt.name == "F32" else v_rows.view(np.float16)
        if not cext.selected():
            return attention_numba(q, k, v, start, n_head, n_head_kv, head_dim, None, window, sinks, vd, scale,
                                   cell_pos)
        out = np.empty((n, n_head * vd), dtype=np.float32)
        cext.attention(q, k, v, out, n, start, n_head, n_head_kv, head_dim, window, sinks, vd,
                       0.0 if scale is None else float(scale), cell_pos)
        return out
    end = start + n
    n_cells = k_rows.shape[0]
    live = min(end, n_cells) if cell_pos is None else len(cell_pos)
    n_kv = max(256, -(-live // 256) * 256)  # llama.cpp's KV length: tinyBLAS needs its rows % 4
    masked = _mask(start, n, n_cells, n_kv, window, cell_pos)
    scale = np.float32(1.0) / np.sqrt(np.float32(hd)) if scale is None else np.float32(scale)
    q = q.reshape(n, n_head, hd)
    out = np.empty((n, n_head, vd), dtype=np.float32)
    group = n_head // n_head_kv
    k_float = k_fmt.name == "F32"
    for g in range(n_head_kv):
        keys = QMatrix(k_fmt, n_kv, hd, _head_rows(k_rows, k_fmt, g * hd, hd, live, n_kv))
        if v_rows is None:
            v_src, v_src_fmt, v0 = k_rows, k_fmt, 0
        else:
            v_src, v_src_fmt, v0 = v_rows, v_fmt, g * vd
        values_t = QMatrix(v_src_fmt, vd, n_kv, _head_columns(v_src, v_src_fmt, v0, vd, live, n_kv))
        for h in range(g * group, (g + 1) * group):
            scores = matmul(keys, np.ascontiguousarray(q[:, h]), expert=k_float) * scale
            scores[masked] = -np.inf
            sink = None if sinks is None else np.full(n, sinks[h], dtype=np.float32)
            probs = ggml_math.softmax(scores) if sink is None else ggml_math.softmax_ref(scores, sinks=sink)
            out[:, h] = matmul(values_t, np.ascontiguousarray(probs, dtype=np.float32))
    return out.reshape(n, n_head * vd)


def flash_attention(q: np.ndarray, k_rows: np.ndarray, k_fmt, v_rows: np.ndarray | None, v_fmt, start: int,
                    n_head: int, n_head_kv: int, head_dim: int, window: int = 0, sinks: np.ndarray | None = None,
                    v_dim: int | None = None, scale: float | None = None, cell_pos: np.ndarray | None = None,
                    n_chunks: int = 0) -> np.ndarray:
    """`attention_typed` as llama.cpp's flash attention computes it (cext/flash.c: its one-chunk,
    tiled and split kernels, picked by the shape as llama.cpp picks them; F32 rows read as F16,
    as llama.cpp casts them). `n_chunks`: the threads llama.cpp would split a long decode among
    (0: offload's thread count). C kernels only."""
    if not cext.available():
        from ..errors import UnsupportedModelError

        raise UnsupportedModelError("flash attention needs offload's C kernels (built at install with a C compiler): "
                                    "use -fa off")
    n = q.shape[0]
    vd = head_dim if v_dim is None else v_dim
    n_cells = k_rows.shape[0]
    if v_rows is None:  # MLA: the values are the first vd values of each key row
        v_rows, v_fmt, v_head = k_rows, k_fmt, 0
    else:
        v_head = v_fmt.row_bytes(vd)
    used = len(cell_pos) if cell_pos is not None else min(start + n, n_cells) if start + n <= n_cells else n_cells
    n_kv = min(-(-n_cells // 256) * 256, max(256, -(-used // 256) * 256))  # llama.cpp's KV view, padded
    out = np.empty((n, n_head * vd), dtype=np.float32)
    scale = np.float32(1) / np.sqrt(np.float32(head_dim)) if scale is None else np.float32(scale)
    cext._cext.flash_attention(np.ascontiguousarray(q, dtype=np.float32), k_rows, v_rows, out, n, start, n_head,
                               n_head_kv, head_dim, vd, n_cells, window,
                               None if sinks is None else np.ascontiguousarray(sinks, dtype=np.float32),
                               float(scale), k_fmt.name, v_fmt.name, k_rows.strides[0],
                               v_rows.strides[0], k_fmt.row_bytes(head_dim), v_head,
                               None if cell_pos is None else np.ascontiguousarray(cell_pos, dtype=np.int32),
                               0 if cell_pos is None else len(cell_pos), n_kv, n_chunks)
    return out


def _head_rows(rows: np.ndarray, fmt, first: int, width: int, live: int, n_kv: int) -> np.ndarray:
    """Values first..first+width of cells 0..live as contiguous encoded rows, zero rows up to n_kv."""
    lo, hi = fmt.row_bytes(first) if first else 0, fmt.row_bytes(first + width)
    raw = rows.view(np.uint8)
    out = np.zeros((n_kv, hi - lo), dtype=np.uint8)
    out[:live] = raw[:live, lo:hi]
    return out


def _head_columns(rows: np.ndarray, fmt, first: int, width: int, live: int, n_kv: int) -> np.ndarray:
    """The transposed view llama.cpp's V cache keeps without flash attention: for each value
    first..first+width, its n_kv cells (zeros past live) as one encoded row. Floats only."""
    size = fmt.row_bytes(1)
    vals = rows.view(np.uint8)[:live, first * size:(first + width) * size].view(f"<u{size}")
    out = np.zeros((width, n_kv), dtype=vals.dtype)
    out[:, :live] = vals.T
    return out.view(np.uint8)
