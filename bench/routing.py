"""Cache policies against Belady's optimum on a recorded routing trace.

    .venv/bin/python bench/routing.py [--model M.gguf] [--tokens 300] [--capacities 10%,25%,50%]
                                      [--scope global] [--trace run.npz] [--temp 1.0] [--seed 0]
                                      [--prompt TEXT] [--lookahead-depth 2] [--oracle-layers 1,2,4]

Records a routing trace (`Model.generate(record_trace=...)`) of `--tokens` tokens from the
prompt, or replays `--trace`, then replays it in the offline simulator (offload.simulate)
for each policy and capacity, beside Belady's optimum (evict the expert needed furthest in
the future). Capacity is a share of all the model's routed experts. Hit rates count the
decode steps only (the prompt warms the cache); cold misses count.

The trace is recorded with a tiered store (the plan's minimum budget) and prefetch depth
`--lookahead-depth`, so it carries the predictor's predictions (routing and tokens do not
depend on either); each policy is then also replayed with the store's look-ahead eviction
("<policy>+pred": the experts predicted for the next layers are not the victim while one
predicted nowhere can go). `--lookahead-depth 0` records without predictions.
"lfu+oracleN" is LFU that knows the routing of the next N MoE-layer runs for certain, across
tokens, and spares those experts: how far ahead a perfect predictor would have to see for a
policy to come near Belady's.

Without --model: bench/tiering.py's random-weight MoE (12 layers x 64 experts, top-4, Q8_0)
with skewed routers, cached in ~/.cache/offload/bench. Its routing is random, not a real
model's: no topic locality, no token-to-token correlation beyond what random weights give,
so these numbers say how the policies rank on a skewed-frequency stream, not what a real
model would get. Record a real model's trace (offload generate MODEL --record-trace F) and
replay it with `offload simulate F` for that. "static top" is the hit rate of a cache
holding the most-used experts for good (in hindsight): on routing that is independent from
token to token no online policy does much better, while Belady's sees the future.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT_DIR, machine, print_table, write_json  # noqa: E402

PROMPT = "Once upon a time, in a land far away, there lived a"


def static_top(trace, slots: int, scope: str) -> float:
    """Hit rate of a cache that holds, from the start and for good, the `slots` experts the
    decode steps use most (known in hindsight; per layer in layer scope): the best a
    frequency-only policy can do when routing is independent from token to token."""
    import numpy as np

    ex = trace.experts[trace.prompt_tokens:].astype(np.int64)  # (S, L, k)
    counts = np.stack([np.bincount(ex[:, l][ex[:, l] >= 0], minlength=trace.n_expert) for l in range(trace.n_layers)])
    total = counts.sum()
    if scope == "global":
        kept = np.sort(counts.reshape(-1))[::-1][:slots].sum()
    else:
        per = [slots // trace.n_layers + (1 if i < slots % trace.n_layers else 0) for i in range(trace.n_layers)]
        kept = sum(np.sort(c)[::-1][:n].sum() for c, n in zip(counts, per))
    return float(kept / total) if total else 1.0


def oracle_lookahead(trace, capacity: int, layers: int) -> float:
    """Hit rate of LFU that knows the routing of the next `layers` MoE-layer runs for certain
    (across tokens) and spares those experts as the store spares predicted ones: the ceiling
    of a predictor that far ahead (global scope, decode steps counted)."""
    from offload.simulate import accesses, simulate

    a = accesses(trace)
    layer_ids = [int(x) for x in trace.layers]
    keys = [(layer_ids[l], e) for l, e in zip(a.layer.tolist(), a.expert.tolist())]
    starts = a.call_start.tolist()
    n_calls = len(starts) - 1
    spared = [frozenset(keys[starts[c + 1] : starts[min(c + 1 + layers, n_calls)]]) for c in range(n_calls)]
    return simulate(trace, capacity, "lfu", stream=a, from_step=trace.prompt_tokens, spared=spared).hit_rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--trace", type=Path, default=None, help="replay this trace instead of recording one")
    ap.add_argument("--tokens", type=int, default=300)
    ap.add_argument("--capacities", default="10%,25%,50%")
    ap.add_argument("--scope", choices=["global", "layer"], default="global")
    ap.add_argument("--temp", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompt", default=PROMPT, help="the prompt (the demo model: a chapter heading, e.g. 'Psalms 119')")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--lookahead-depth", type=int, default=2, help="prefetch depth while recording (0: no predictions)")
    ap.add_argument("--oracle-layers", default="1,2,4",
                    help="LFU that knows the next N MoE-layer runs' routing for certain (a ceiling for a "
                         "predictor N layers ahead), per N; empty: none")
    a = ap.parse_args()

    from offload import Model
    from offload.sampling import SamplingParams
    from offload.simulate import POLICY_NAMES, compare
    from offload.trace import RoutingTrace

    if a.trace is None:
        if a.model is None:
            from tiering import default_model

            a.model = default_model(4.0)
        OUT_DIR.mkdir(exist_ok=True)
        a.trace = OUT_DIR / f"routing-{a.model.stem}-{a.tokens}.npz"
        t0 = time.perf_counter()
        n_ctx = min(4096, a.tokens + 64)
        tiered = {}
        if a.lookahead_depth > 0:  # the predictor runs only beside a tiered store: the smallest one
            from offload import arch
            from offload.gguf_file import GGUFFile
            from offload.store import make_plan

            g = GGUFFile(a.model)
            tiered = dict(memory_budget=make_plan(g, arch.model_args(g), n_ctx, 0).minimum,
                          prefetch_depth=a.lookahead_depth)
            g.close()
        with Model.load(a.model, n_ctx=n_ctx, n_threads=a.threads, **tiered) as m:
            ids = m.tokenize(a.prompt.replace("\\n", "\n"))
            params = SamplingParams(temperature=a.temp, seed=a.seed)
            n = sum(1 for _ in m.generate_tokens(ids, a.tokens, params, record_trace=a.trace))
        print(f"recorded {n} tokens in {time.perf_counter() - t0:.1f} s -> {a.trace}", file=sys.stderr)
    trace = RoutingTrace.load(a.trace)
    caps = a.capacities.split(",")
    t0 = time.perf_counter()
    lookahead = trace.predicted is not None
    rows = compare(trace, caps, POLICY_NAMES, a.scope, from_step=trace.prompt_tokens, lookahead=lookahead)
    names = list(POLICY_NAMES) + ([f"{p}+pred" for p in POLICY_NAMES] if lookahead else [])
    seconds = time.perf_counter() - t0
    oracle = [int(n) for n in a.oracle_layers.split(",") if n] if a.scope == "global" else []
    for r in rows:
        r["static_top"] = static_top(trace, r["capacity"], a.scope)
        for n in oracle:
            r[f"lfu+oracle{n}"] = oracle_lookahead(trace, r["capacity"], n)
            r[f"lfu+oracle{n}_vs_belady"] = r[f"lfu+oracle{n}"] / r["belady"] if r["belady"] else 0.0
    names += [f"lfu+oracle{n}" for n in oracle]
    print(f"{trace.model}: {trace.n_steps} steps ({trace.prompt_tokens} prompt), {trace.n_layers} MoE layers x "
          f"{trace.n_expert} experts, top-{trace.k}, {a.scope} capacity; replayed in {seconds:.1f} s "
          f"({len(caps)} capacities x {len(POLICY_NAMES) + 1} runs)")
    print_table(["capacity", "slots"] + names + ["static top", "belady"] + [f"{p}/belady" for p in names],
                [[f"{r['share']:.0%}", r["capacity"]] + [f"{r[p]:.1%}" for p in names]
                 + [f"{r['static_top']:.1%}", f"{r['belady']:.1%}"]
                 + [f"{r[p + '_vs_belady']:.1%}" for p in names] for r in rows])
    path = write_json(f"routing-{trace.model.rsplit('.', 1)[0]}-{trace.n_steps}-{a.scope}", {
        "machine": machine(), "trace": str(a.trace), "model": trace.model, "steps": trace.n_steps,
        "prompt_tokens": trace.prompt_tokens, "scope": a.scope, "rows": rows, "replay_seconds": seconds,
    })
    print(f"-> {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
