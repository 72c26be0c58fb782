"""One-token GEMV of offload's C kernels (each SIMD level) against ggml's own vec_dot, cache-hot.

    PYTHONPATH=. .venv/bin/python bench/vec_dot.py [--formats IQ3_S,IQ2_XXS] [--rows 512] [--rounds 100]

Kernel speed apart from DRAM: a ggml-quantized matrix of --rows x 4096 (a few MB, in L2/L3),
one Q8_K token, one thread. ggml runs through its graph API (libggml-cpu of the installed
llama_cpp, AVX2 build; the activations already Q8_K, so it converts nothing), offload through
its matmul entry point; their outputs are checked bit for bit. On a shared machine the
implementations alternate call by call and each keeps its least thread CPU time over
--rounds, so a time slice lost to another process counts for neither. Prints GB/s of weight
bytes and our best level's speed over ggml's.
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import time
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiled import Q8_K, Ggml, _InitParams  # noqa: E402

from offload import _cext  # noqa: E402
from offload.kernels.dispatch import convert_activations  # noqa: E402
from offload.testing import ggml_quantize  # noqa: E402

FORMATS = "IQ3_S,IQ3_XXS,IQ2_XXS,IQ2_XS,IQ2_S,IQ1_S,IQ1_M,TQ1_0,TQ2_0,Q4_K"
N_COLS = 4096
COPIES = 8  # matmuls per timed call (ggml: per graph)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--formats", default=FORMATS)
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=100)
    opts = ap.parse_args()
    ggml, rng = Ggml(), np.random.default_rng(0)
    b = ggml.base
    _cext.set_num_threads(1)
    x = rng.standard_normal((1, N_COLS)).astype(np.float32)
    act = tuple(a.copy() for a in convert_activations("Q8_K", x))
    from offload.kernels.formats import format_for

    other = [f for f in opts.formats.split(",") if format_for(T[f]).vec_dot_type != "Q8_K"]
    if other:  # the ggml graph below is built on a Q8_K token
        sys.exit(f"vec_dot.py: {', '.join(other)} take other activations than Q8_K (bench/kernels.py measures them)")
    for fmt in opts.formats.split(","):
        levels = [lvl for lvl in _cext.formats()[fmt][1] if lvl != "portable"] or ["portable"]
        w = ggml_quantize(rng.standard_normal((opts.rows, N_COLS)).astype(np.float32), T[fmt])
        out = np.empty((1, opts.rows), np.float32)
        # each graph run takes a small work buffer from the context: room for every round
        ctx = b.ggml_init(_InitParams(w.nbytes + (opts.rounds + 16) * (2 << 20), None, False))
        try:
            tw = b.ggml_new_tensor_2d(ctx, int(T[fmt]), N_COLS, opts.rows)
            tx = b.ggml_new_tensor_2d(ctx, int(T.Q8_K), N_COLS, 1)
            ctypes.memmove(b.ggml_get_data(tw), w.ctypes.data, w.nbytes)
            blocks = np.zeros(N_COLS // 256, Q8_K)
            blocks["qs"], blocks["d"], blocks["bsums"] = act[0].reshape(-1, 256), act[1].reshape(-1), act[2].reshape(-1, 16)
            ctypes.memmove(b.ggml_get_data(tx), blocks.ctypes.data, blocks.nbytes)
            graph = b.ggml_new_graph(ctx)
            outs = [b.ggml_mul_mat(ctx, tw, tx) for _ in range(COPIES)]
            for o in outs:
                b.ggml_build_forward_expand(graph, o)

            def ours(level):
                def call():
                    _cext.set_isa(level)
                    for _ in range(COPIES):
                        _cext.matmul(fmt, w, *act, out, opts.rows, N_COLS, 1)
                return call

            impls = {level: ours(level) for level in levels}
            impls["ggml"] = lambda: ggml.cpu.ggml_graph_compute_with_ctx(ctx, graph, 1)
            best = dict.fromkeys(impls, float("inf"))
            for _ in range(opts.rounds):
                for name, call in impls.items():
                    t = time.thread_time()
                    call()
                    best[name] = min(best[name], (time.thread_time() - t) / COPIES)
            _cext.set_isa(_cext.best_isa())
            _cext.matmul(fmt, w, *act, out, opts.rows, N_COLS, 1)
            theirs = np.ctypeslib.as_array(ctypes.cast(b.ggml_get_data(outs[0]), ctypes.POINTER(ctypes.c_float)),
                                           shape=(1, opts.rows))
            same = np.array_equal(out.view(np.uint32), theirs.view(np.uint32))
        finally:
            b.ggml_free(ctx)
        speeds = "  ".join(f"{name} {w.nbytes / s / 1e9:6.2f}" for name, s in best.items())
        print(f"{fmt:8} GB/s: {speeds}   ours/ggml {best['ggml'] / min(best[lvl] for lvl in levels):.2f}   same bits: {same}",
              flush=True)


if __name__ == "__main__":
    main()
