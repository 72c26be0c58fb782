"""A/B of C-extension builds on one matmul at a few token counts (the many-tokens kernels).

    PYTHONPATH=. .venv/bin/python bench/tokens_ab.py before.so after.so [--threads 2]
        [--tokens 1,2,3,4,7] [--cases Q6_K:32000x1024,Q4_K:2048x1024]

Each .so (a copy of offload/_cext*.so from a build) is loaded side by side and the calls
alternate between them round by round, so a machine shared with other work slows all of them
alike; ms per call as min / median over the rounds, tokens/s from the min. The builds'
outputs are checked equal to the bit.
"""

import argparse
import importlib.util
import time

import numpy as np
from gguf import GGMLQuantizationType as T

from offload.kernels import ACTIVATION_CONVERTERS, FORMATS

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("so", nargs="+")
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--tokens", default="1,2,3,4,7")
ap.add_argument("--cases", default="Q6_K:32000x1024,Q4_K:2048x1024")
ap.add_argument("--rounds", type=int, default=15)
ap.add_argument("--calls", type=int, default=20)
o = ap.parse_args()
mods = []
for path in o.so:
    spec = importlib.util.spec_from_file_location("offload._cext", path)
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    m.set_num_threads(o.threads)
    mods.append(m)
rng = np.random.default_rng(0)
print(f"threads {o.threads}; ms per call min/median, tok/s from min; columns: {' | '.join(o.so)}")
for case in o.cases.split(","):
    name, shape = case.split(":")
    n_rows, n_cols = map(int, shape.split("x"))
    fmt = FORMATS[T[name]]
    raw = rng.integers(0, 256, size=(n_rows, fmt.row_bytes(n_cols)), dtype=np.uint8)
    blocks = raw.view(fmt.layout)
    for f in fmt.layout.names:
        if fmt.layout[f] == np.dtype("<f2"):
            blocks[f] = rng.uniform(-1e-2, 1e-2, size=blocks.shape).astype(np.float16)
    for nt in map(int, o.tokens.split(",")):
        act = ACTIVATION_CONVERTERS[fmt.vec_dot_type](rng.standard_normal((nt, n_cols)).astype(np.float32))
        bsums = act[2] if len(act) > 2 else None
        outs = [np.empty((nt, n_rows), np.float32) for _ in mods]
        times = [[] for _ in mods]
        for _ in range(o.rounds):
            for i, m in enumerate(mods):
                t0 = time.perf_counter()
                for _ in range(o.calls):
                    m.matmul(name, raw, act[0], act[1], bsums, outs[i], n_rows, n_cols, nt)
                times[i].append((time.perf_counter() - t0) / o.calls * 1e3)
        assert all(np.array_equal(outs[0].view(np.uint32), z.view(np.uint32)) for z in outs), "builds differ"
        cells = [f"{min(ts):7.3f}/{sorted(ts)[len(ts) // 2]:7.3f} ms {nt / min(ts) * 1e3:7.0f} tok/s" for ts in times]
        print(f"{name} {n_rows}x{n_cols} t={nt}: " + " | ".join(cells), flush=True)
