"""Speed of the tiled K-quant matmul (cext/tiled.c) next to llama.cpp's own (ggml-cpu/tiled/).

    PYTHONPATH=. .venv/bin/python bench/tiled.py [--threads 1,2] [--formats Q4_K,Q6_K] [--base old_cext.so]

Shapes (rows, cols, tokens) are those of MoE prefill: an expert's few tokens on a small
matrix, and a dense matmul of a 512-token prompt. Weights are ggml-quantized gaussians,
activations Q8_K; both sides are timed without the activation conversion, hot in cache,
best of --repeats. ggml runs through its graph API (libggml-cpu of the installed
llama_cpp, Q8_K activations so it converts nothing), several copies of the matmul per
graph so that the graph's own overhead is spread; its outputs are checked bit for bit
against ours. --base times a second build of offload's extension (an A/B in one process).
Writes bench/out/tiled.json.

On a shared machine the 2-thread figures are only as good as the other core is free: a
call waits at its end for both threads, so one preempted thread costs a time slice (the
table then shows a few GFLOP/s for every implementation alike); trust the 1-thread rows.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import sys
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import best_time, machine, print_table, write_json  # noqa: E402

from offload.kernels import cext  # noqa: E402
from offload.kernels.dispatch import convert_activations  # noqa: E402
from offload.testing import _ggml_lib, ggml_quantize  # noqa: E402

SHAPES = [(512, 1024, 8), (512, 1024, 16), (512, 1024, 32), (512, 1024, 64), (1024, 512, 32), (4096, 1024, 512)]
FORMATS = ["Q4_K", "Q5_K", "Q6_K", "Q2_K", "Q3_K"]
Q8_K = np.dtype([("d", "<f4"), ("qs", "i1", 256), ("bsums", "<i2", 16)])  # ggml's block_q8_K


class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


class Ggml:
    """out = w @ act through ggml_mul_mat, `copies` times per graph."""

    def __init__(self):
        base, cpu = _ggml_lib("ggml-base"), _ggml_lib("ggml-cpu")
        p, i64 = ctypes.c_void_p, ctypes.c_int64
        for lib, name, res, args in [
            (base, "ggml_init", p, [_InitParams]), (base, "ggml_free", None, [p]),
            (base, "ggml_new_tensor_2d", p, [p, ctypes.c_int, i64, i64]), (base, "ggml_mul_mat", p, [p, p, p]),
            (base, "ggml_new_graph", p, [p]), (base, "ggml_build_forward_expand", None, [p, p]),
            (base, "ggml_get_data", p, [p]), (cpu, "ggml_graph_compute_with_ctx", ctypes.c_int, [p, p, ctypes.c_int]),
        ]:
            getattr(lib, name).restype, getattr(lib, name).argtypes = res, args
        self.base, self.cpu = base, cpu

    def run(self, fmt, w, act, n_rows, n_cols, n_tokens, threads, repeats, copies):
        """(seconds per matmul, output) for `repeats` graph runs."""
        b = self.base
        # each graph run takes a fresh work buffer (about 1 MB) from the context
        size = w.nbytes + n_tokens * n_cols * 2 + copies * (n_rows * n_tokens * 4 + 1024) + (repeats + 2) * (4 << 20)
        ctx = b.ggml_init(_InitParams(size + (8 << 20), None, False))
        try:
            tw = b.ggml_new_tensor_2d(ctx, int(T[fmt]), n_cols, n_rows)
            tx = b.ggml_new_tensor_2d(ctx, int(T.Q8_K), n_cols, n_tokens)
            ctypes.memmove(b.ggml_get_data(tw), w.ctypes.data, w.nbytes)
            blocks = np.zeros(n_tokens * n_cols // 256, Q8_K)
            xq, xd, bs = act
            blocks["qs"], blocks["d"], blocks["bsums"] = xq.reshape(-1, 256), xd.reshape(-1), bs.reshape(-1, 16)
            ctypes.memmove(b.ggml_get_data(tx), blocks.ctypes.data, blocks.nbytes)
            graph = b.ggml_new_graph(ctx)
            outs = [b.ggml_mul_mat(ctx, tw, tx) for _ in range(copies)]
            for o in outs:
                b.ggml_build_forward_expand(graph, o)
            seconds = best_time(lambda: self.cpu.ggml_graph_compute_with_ctx(ctx, graph, threads), repeats) / copies
            out = np.ctypeslib.as_array(ctypes.cast(b.ggml_get_data(outs[0]), ctypes.POINTER(ctypes.c_float)),
                                        shape=(n_tokens, n_rows)).copy()
            return seconds, out
        finally:
            b.ggml_free(ctx)


def load_extension(path: str):
    spec = importlib.util.spec_from_file_location("_cext", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--base", help="another build of offload's _cext .so to time beside this one")
    ap.add_argument("--no-ggml", action="store_true")
    opts = ap.parse_args()
    from offload import _cext

    impls = [("ours", _cext)] + ([("base", load_extension(opts.base))] if opts.base else [])
    ggml = None if opts.no_ggml else Ggml()
    rng = np.random.default_rng(0)
    rows, results = [], []
    for fmt in opts.formats.split(","):
        for n_rows, n_cols, n_tokens in SHAPES:
            w = ggml_quantize(rng.standard_normal((n_rows, n_cols)).astype(np.float32), T[fmt])
            act = tuple(a.copy() for a in convert_activations("Q8_K", rng.standard_normal((n_tokens, n_cols)).astype(np.float32)))
            flop = 2.0 * n_rows * n_cols * n_tokens
            for threads in map(int, opts.threads.split(",")):
                r = {"format": fmt, "shape": [n_rows, n_cols, n_tokens], "threads": threads}
                out = np.empty((n_tokens, n_rows), np.float32)
                for name, ext in impls:
                    ext.set_num_threads(threads)
                    call = lambda: ext.matmul_tiled(fmt, w, *act, out, n_rows, n_cols, n_tokens)  # noqa: E731
                    r[f"{name}_gflops"] = flop / best_time(call, opts.repeats) / 1e9
                ours = out.copy()
                _cext.matmul_tiled(fmt, w, *act, ours, n_rows, n_cols, n_tokens)
                if ggml:
                    copies = max(1, min(64, int(2e8 / flop)))
                    seconds, theirs = ggml.run(fmt, w, act, n_rows, n_cols, n_tokens, threads, opts.repeats, copies)
                    r["ggml_gflops"] = flop / seconds / 1e9
                    r["bits_equal_ggml"] = bool(np.array_equal(ours.view(np.uint32), theirs.view(np.uint32)))
                r["ours_gb_per_s"] = w.nbytes * r["ours_gflops"] * 1e9 / flop / 1e9
                results.append(r)
                rows.append([fmt, f"{n_rows}x{n_cols}x{n_tokens}", threads]
                            + [r[f"{name}_gflops"] for name, _ in impls] + [r["ours_gb_per_s"]]
                            + ([r["ggml_gflops"], r["ours_gflops"] / r["ggml_gflops"], r["bits_equal_ggml"]] if ggml else []))
                print(f"  {rows[-1]}", file=sys.stderr)
    print(f"\n{machine()['cpu']}, isa {cext.isa()}: GFLOP/s (2*rows*cols*tokens per second)\n")
    print_table(["format", "rows x cols x tokens", "threads"] + [name for name, _ in impls] + ["ours GB/s"]
                + (["ggml", "ours/ggml", "same bits"] if ggml else []), rows)
    path = write_json("tiled", {"machine": machine(), "isa": cext.isa(), "results": results})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
