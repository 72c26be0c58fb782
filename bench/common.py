"""Shared by the benchmarks: the machine's streaming-read bandwidth, timing, table + JSON output."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Callable

import numpy as np
from numba import njit, prange

OUT_DIR = Path(__file__).resolve().parent / "out"


@njit(parallel=True, fastmath=True, cache=True)
def _sum(a):
    s = 0.0
    for i in prange(a.shape[0]):
        s += a[i]
    return s


def read_bandwidth(n_threads: int, size_bytes: int = 2 << 30, repeats: int = 5) -> float:
    """Streaming-read bandwidth in bytes/s: the best of `repeats` parallel reads of
    `size_bytes` (the physical limit a GEMV can reach). 2 GiB: the EPYC hosts here have
    hundreds of MB of last-level cache. The read runs on the C kernels' OpenMP threads
    when the extension is built (a Numba probe competed with OpenMP threads still spinning
    after a kernel: it read 35 or 65 GB/s from run to run), else as a Numba sum."""
    a = np.ones(size_bytes // 4, dtype=np.float32)
    try:
        from offload import _cext

        _cext.set_num_threads(n_threads)
        probe = lambda: _cext.xor_words(a)  # noqa: E731
    except ImportError:
        import numba

        numba.set_num_threads(n_threads)
        _sum(a[:1024])  # compile
        probe = lambda: _sum(a)  # noqa: E731
    return a.nbytes / best_time(probe, repeats)


def best_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def machine() -> dict:
    cpu = "?"
    flags: set[str] = set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name") and cpu == "?":
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    simd = [f for f in ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "amx_tile") if f in flags]
    return {"cpu": cpu, "cores": os.cpu_count(), "simd": simd, "python": platform.python_version()}


def print_table(headers: list[str], rows: list[list[object]]) -> None:
    cells = [[h for h in headers]] + [[f"{c:.2f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for i, r in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def write_json(name: str, payload: dict) -> Path:
    OUT_DIR.mkdir(exist_ok=True)
    path = OUT_DIR / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2))
    return path
