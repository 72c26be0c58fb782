"""Is one read per expert worth a repacked file? Three reads per expert (gate, up, down: how
the store reads a GGUF today) against one read of the same bytes, with O_DIRECT.

    .venv/bin/python bench/expert_reads.py [--model M.gguf] [--experts 150] [--threads 1,2,4] [--repeats 2]

Issue 20 asked for `offload repack`: a GGUF whose tensors are ordered so that each expert's
gate, up and down rows sit together, read with one request. Two things stand in the way:

* llama.cpp (0.3.36) loads routed experts only as ffn_{gate,up,down}_exps (and, for some
  archs, ffn_gate_up_exps): three 3-D tensors, each one contiguous run of every expert. No
  tensor layout puts expert e's three slices next to each other and stays loadable by it.
* what one request saves is one request's latency per part, which this bench measures.

Per thread count (reads in flight), it reads the same random sample of experts twice, the
page cache dropped before each pass (root; otherwise the passes after the first hit the
cache and the table says so): "three" reads each part's aligned span, as the store does;
"one" reads one aligned span of the expert's total size starting at its gate part (the
same bytes a repacked file would hold in one place). Prints ms per expert and MB/s, writes
bench/out/expert_reads.json.

Without --model: bench/tiering.py's large model (16 layers x 64 experts of 2.4 MiB, Q8_0),
made once in ~/.cache/offload/bench.
"""

from __future__ import annotations

import argparse
import mmap
import os
import random
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import machine, print_table, write_json  # noqa: E402

ALIGN = 4096


def spans(layout, expert: int, one: bool) -> list[tuple[int, int]]:
    """(aligned offset, aligned length) of each read of one expert."""
    parts = [p.range(expert) for p in layout.parts]
    if one:
        parts = [(parts[0][0], sum(n for _, n in parts))]
    out = []
    for off, n in parts:
        start = off // ALIGN * ALIGN
        out.append((start, (off + n + ALIGN - 1) // ALIGN * ALIGN - start))
    return out


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def read_pass(path: str, jobs: list[list[tuple[int, int]]], threads: int) -> tuple[float, int]:
    """Read every job's spans with `threads` readers; (seconds, bytes)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    total = [0] * threads
    biggest = max(n for job in jobs for _, n in job)

    def reader(i: int) -> None:
        buf = mmap.mmap(-1, biggest)
        view = memoryview(buf)
        for job in jobs[i::threads]:
            for off, n in job:
                got = 0
                while got < n:
                    k = os.preadv(fd, [view[got:n]], off + got)
                    if k == 0:
                        break
                    got += k
                total[i] += got
        view.release()
        buf.close()

    t0 = time.perf_counter()
    workers = [threading.Thread(target=reader, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    seconds = time.perf_counter() - t0
    os.close(fd)
    return seconds, sum(total)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--experts", type=int, default=150)
    ap.add_argument("--threads", default="1,2,4")
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()

    from offload import arch
    from offload.gguf_file import GGUFFile
    from offload.weights import expert_layouts

    if a.model is None:
        from tiering import default_model  # noqa: PLC0415

        a.model = default_model(4.0, "large")
    g = GGUFFile(a.model)
    layouts = expert_layouts(g, arch.model_args(g))
    g.close()
    keys = [(l, e) for l, lay in layouts.items() for e in range(lay.n_expert)]
    sample = random.Random(0).sample(keys, min(a.experts, len(keys)))
    cold = True
    rows = []
    for threads in (int(t) for t in a.threads.split(",")):
        for repeat in range(a.repeats):
            for one in (False, True):
                cold = drop_caches() and cold
                jobs = [spans(layouts[l], e, one) for l, e in sample]
                seconds, n = read_pass(str(a.model), jobs, threads)
                rows.append({"threads": threads, "repeat": repeat, "reads_per_expert": 1 if one else 3,
                             "ms_per_expert": 1e3 * seconds / len(jobs), "mb_s": n / seconds / 1e6, "bytes": n})
    table = []
    for threads in sorted({r["threads"] for r in rows}):
        best = {k: min((r for r in rows if r["threads"] == threads and r["reads_per_expert"] == k),
                       key=lambda r: r["ms_per_expert"]) for k in (3, 1)}
        table.append([str(threads), f"{best[3]['ms_per_expert']:.2f}", f"{best[1]['ms_per_expert']:.2f}",
                      f"{best[3]['ms_per_expert'] / best[1]['ms_per_expert']:.2f}x",
                      f"{best[3]['mb_s']:.0f}", f"{best[1]['mb_s']:.0f}"])
    print_table(["reads in flight", "3 reads: ms/expert", "1 read: ms/expert", "1 read faster by",
                 "3 reads: MB/s", "1 read: MB/s"], table)
    print(f"{a.model.name}: {len(sample)} random experts of {sum(p.n_bytes for p in layouts[sample[0][0]].parts) / 2**20:.2f} "
          f"MiB, O_DIRECT, fastest of {a.repeats} passes"
          + ("; page cache dropped before each pass" if cold else "; page cache NOT dropped (not root)"))
    write_json("expert_reads.json", {"machine": machine(), "model": str(a.model), "rows": rows, "cold": cold})


if __name__ == "__main__":
    main()
