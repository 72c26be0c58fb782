"""Peak RSS of parallel slots (serve -np N) against the memory budget, each in a fresh process.

    .venv/bin/python bench/slots_memory.py [--model M.gguf] [--budget 54MB] [--slots 1,2,3] [--tokens 64]

Per slot count, a child process imports offload, notes its RSS, loads the model under the
budget, splits it into N slots (Model.parallel_slots) and runs N sampled generations at once
(one thread each, their steps on the batcher's thread, as the server does); it reports the
growth of its peak RSS over the RSS before loading (what the budget bounds: the plan
counts the weights, the expert slots, the KV cache and the kernels' working memory), and
the expert store's hits and misses. Prints a table; writes bench/out/slots_memory.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, print_table, write_json  # noqa: E402

CHILD = r"""
import json, sys, threading
import psutil
from offload import Model
from offload.sampling import SamplingParams
from offload.store import parse_budget

path, budget, n, tokens = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
before = psutil.Process().memory_info().rss
m = Model.load(path, memory_budget=budget)
slots = m.parallel_slots(n)
batcher = slots[0].batcher
prompts = ["In the beginning", "And the LORD said unto Moses", "Blessed are the meek", "The LORD is my shepherd"]

def generate(slot, prompt):
    batcher.begin()
    try:
        list(slot.generate_tokens(prompt, tokens, SamplingParams(temperature=0.8, seed=1)))
    finally:
        batcher.end()

threads = [threading.Thread(target=generate, args=(s, prompts[i % len(prompts)])) for i, s in enumerate(slots)]
for t in threads:
    t.start()
threading.Thread(target=lambda: ([t.join() for t in threads], batcher.stop())).start()
batcher.run()
peak = m.stats()["peak_rss_bytes"]  # this process's (ru_maxrss would count the parent's too: kept across exec)
s = m.store_stats()
print(json.dumps({"slots": n, "budget_bytes": parse_budget(budget), "peak_growth_bytes": peak - before,
                  "hits": s["hits"], "misses": s["misses"], "batches": dict(batcher.batches)}))
"""


def main() -> None:
    from offload.demo import demo_model_path

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--budget", default="54MB")
    ap.add_argument("--slots", default="1,2,3")
    ap.add_argument("--tokens", type=int, default=64)
    opts = ap.parse_args()
    path = opts.model or str(demo_model_path())
    results, rows = [], []
    for n in (int(s) for s in opts.slots.split(",")):
        out = subprocess.run([sys.executable, "-c", CHILD, path, opts.budget, str(n), str(opts.tokens)],
                             capture_output=True, text=True, check=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        results.append(r)
        rows.append([n, r["budget_bytes"] / 2**20, r["peak_growth_bytes"] / 2**20,
                     f"{r['peak_growth_bytes'] / r['budget_bytes']:.0%}", r["hits"], r["misses"]])
    print_table(["slots", "budget MiB", "peak RSS growth MiB", "of budget", "expert hits", "misses"], rows)
    print(f"wrote {write_json('slots_memory', {'machine': machine(), 'model': path, 'results': results})}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
