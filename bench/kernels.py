"""GEMV speed of every weight format and implementation, next to the machine's read bandwidth.

    .venv/bin/python bench/kernels.py [--threads 2] [--mb 1024] [--formats Q4_K,Q8_0]

For each format: one weight matrix of about --mb MB (bigger than the last-level cache, so
it streams from DRAM as in decode), one token (GEMV), timed as the best of --repeats
runs, per implementation (C at each SIMD level this CPU runs, and Numba). Reported as GB/s
of weight bytes and as a share of the streaming-read bandwidth measured in the same run.
The activation conversion (to Q8_0 / Q8_K, once per matmul) is timed apart. Writes
bench/out/kernels.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import best_time, machine, print_table, read_bandwidth, write_json  # noqa: E402

from offload.kernels import ACTIVATION_CONVERTERS, FORMATS, NUMBA_KERNELS, cext  # noqa: E402
from offload.model import set_threads  # noqa: E402

N_COLS = 4096


def random_matrix(t: T, target_bytes: int, rng: np.random.Generator) -> np.ndarray:
    """Random blocks of format t with finite f16 scales (speed does not depend on values)."""
    fmt = FORMATS[t]
    row_bytes = fmt.row_bytes(N_COLS)
    n_rows = max(256, target_bytes // row_bytes // 256 * 256)
    raw = rng.integers(0, 256, size=(n_rows, row_bytes), dtype=np.uint8)
    if fmt.layout.names:
        blocks = raw.view(fmt.layout)
        for name in fmt.layout.names:
            if fmt.layout[name] == np.dtype("<f2"):
                blocks[name] = rng.uniform(-1e-2, 1e-2, size=blocks.shape).astype(np.float16)
    else:  # F32, F16, BF16: plain gaussian numbers
        values = rng.standard_normal((n_rows, N_COLS)).astype(np.float32)
        if t == T.F32:
            raw[:] = values.view(np.uint8)
        elif t == T.F16:
            raw[:] = values.astype(np.float16).view(np.uint8)
        else:
            raw[:] = (values.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    return raw


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mb", type=int, default=1024,
                    help="weight matrix size in MB (well above the last-level cache: see common.read_bandwidth)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--formats", default="", help="comma-separated subset, e.g. Q4_K,Q8_0")
    opts = ap.parse_args()
    set_threads(opts.threads)

    bandwidth = read_bandwidth(opts.threads)
    print(f"{machine()['cpu']}, {opts.threads} threads: streaming read {bandwidth / 1e9:.1f} GB/s "
          f"(parallel read of 2 GiB)\n")
    wanted = [T[name] for name in opts.formats.split(",") if name] or sorted(NUMBA_KERNELS, key=lambda t: t.name)
    c_formats = cext.formats()
    rng = np.random.default_rng(0)
    rows, results = [], []
    for t in wanted:
        w = random_matrix(t, opts.mb << 20, rng)
        x = rng.standard_normal((1, N_COLS)).astype(np.float32)
        convert = ACTIVATION_CONVERTERS[FORMATS[t].vec_dot_type]
        act = convert(x)
        out = np.empty((1, w.shape[0]), dtype=np.float32)
        convert_us = best_time(lambda: convert(x), opts.repeats) * 1e6
        impls = [(f"c/{level}", level, cext.c_kernel(t.name)) for level in c_formats.get(t.name, (None, []))[1]]
        impls.append(("numba", None, NUMBA_KERNELS[t]))
        for name, level, kernel in impls:
            if level:
                cext.set_isa(level)
            seconds = best_time(lambda: kernel(w, act, out, False), opts.repeats)
            cext.set_isa(None) if level else None
            gbs = w.nbytes / seconds / 1e9
            rows.append([t.name, name, f"{w.shape[0]}x{N_COLS}", w.nbytes / 1e6, seconds * 1e3, gbs,
                         f"{100 * gbs * 1e9 / bandwidth:.0f}%", convert_us])
            results.append({"format": t.name, "impl": name, "shape": [int(w.shape[0]), N_COLS],
                            "weight_bytes": int(w.nbytes), "seconds": seconds, "gb_per_s": gbs,
                            "share_of_bandwidth": gbs * 1e9 / bandwidth, "act_convert_us": convert_us})
            print(f"  {t.name:5} {name:11} {gbs:6.2f} GB/s", file=sys.stderr)
    print()
    print_table(["format", "impl", "shape", "MB", "ms", "GB/s", "of bw", "act us"], rows)
    path = write_json("kernels", {"machine": machine(), "threads": opts.threads, "read_bandwidth_gb_per_s": bandwidth / 1e9,
                                  "n_cols": N_COLS, "results": results})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
