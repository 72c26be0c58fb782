"""A long decode under a tight budget: no leak, the same tokens, the same expert bytes.

Greedy decode of N tokens (through end-of-text tokens) with the demo model, or --model,
first with everything resident, then from the file under the plan's minimum budget (or
--memory-budget) with prefetch on. Prints and writes (bench/out/long_run.json):
tokens/s of both runs, whether the tokens agree, RSS after warm-up and at the end (and the
part of the growth the KV cache's rows explain), hits/misses/bytes read, and a final check
that every expert resident in the store equals the file's bytes.

    python bench/long_run.py --tokens 20000 [--model M.gguf] [--memory-budget 60MB]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_json  # noqa: E402

from offload import Model  # noqa: E402
from offload.demo import demo_model_path  # noqa: E402


def greedy(m: Model, n: int, rss_at: dict) -> tuple[list[int], float]:
    m.transformer.reset()
    token, out = 1, []
    t0 = time.perf_counter()
    for i in range(n):
        token = int(np.argmax(m.transformer.forward(np.array([token]))[-1]))
        out.append(token)
        if i in rss_at:
            rss_at[i] = psutil.Process().memory_info().rss
    return out, n / (time.perf_counter() - t0)


def experts_equal_the_file(m: Model) -> tuple[int, int]:
    """(experts checked, experts equal to the file's bytes) over every expert resident now."""
    from offload.weights import expert_layouts

    store, layouts = m.experts, expert_layouts(m.gguf, m.args)
    checked = equal = 0
    with open(m.path, "rb") as f:
        for (layer, expert) in list(store.resident_keys()):
            ffn = store.get(layer, expert)
            ok = True
            for part, matrix in zip(layouts[layer].parts, (ffn.gate, ffn.up, ffn.down)):
                offset, n = part.range(expert)
                f.seek(offset)
                ok &= f.read(n) == np.asarray(matrix.data).tobytes()
            checked += 1
            equal += ok
    return checked, equal


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(demo_model_path()))
    ap.add_argument("--tokens", type=int, default=20000)
    ap.add_argument("--memory-budget", default=None, help="default: the plan's minimum")
    a = ap.parse_args()
    n_ctx = a.tokens + 1
    with Model.load(a.model, n_ctx=n_ctx) as m:
        resident, resident_tok_s = greedy(m, a.tokens, {})
        budget = a.memory_budget or m.plan.minimum
    marks = {min(300, a.tokens - 1): 0, a.tokens - 1: 0}
    with Model.load(a.model, n_ctx=n_ctx, memory_budget=budget, prefetch=True) as m:
        tiered, tiered_tok_s = greedy(m, a.tokens, marks)
        stats = m.store_stats()
        kv_rows = m.transformer.cache.nbytes * (a.tokens - 1 - min(300, a.tokens - 1)) // m.n_ctx
        checked, equal = experts_equal_the_file(m) if hasattr(m.experts, "resident_keys") else (0, 0)
    first, last = marks.values()
    row = dict(tokens=a.tokens, budget=int(budget) if str(budget).isdigit() else budget,
               resident_tok_s=round(resident_tok_s, 1), tiered_tok_s=round(tiered_tok_s, 1),
               same_tokens=resident == tiered, rss_after_warmup_mib=round(first / 2**20, 1),
               rss_end_mib=round(last / 2**20, 1), growth_beyond_kv_mib=round((last - first - kv_rows) / 2**20, 2),
               hits=stats["hits"], misses=stats["misses"], read_mib=round(stats["bytes_read"] / 2**20, 1),
               experts_checked=checked, experts_equal_file=equal)
    print_table([row], list(row))
    write_json("long_run", row)
    if not row["same_tokens"] or equal != checked:
        sys.exit(1)


if __name__ == "__main__":
    main()
