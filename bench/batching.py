"""Several clients at once: what decoding their tokens as one batch gives (serve -np N).

    .venv/bin/python bench/batching.py [--shape qwen3moe] [--quant Q4_K_M] [--clients 1,2,4]
                                       [--decode 48] [--budgets resident,25%] [--threads 2]

On one of bench/decode.py's shapes (a random-weight model in a real model's proportions),
N clients each send a 16-token prompt (a different one each) and take --decode greedy
tokens, all at once, through Model.parallel_slots: the server's -np N slots without HTTP.
Three ways, same file, threads and tokens, in one run:

* batched: offload's slots with continuous batching (-np N, the default -cb): the slots'
  decoding tokens run as one batch, each expert read once for all the tokens routed to it,
  where that measures faster than their turns (offload.batching; "batches" in the JSON
  counts the steps run by size);
* turns: offload's slots without it (-np N -nocb): each token a step of its own;
* llama.cpp: its own batched decode of N sequences (one llama_batch of N tokens a step, one
  sequence id each, as llama-server -np N runs them), its weights as users get them
  (repacked buffers on); the whole file in memory, so resident only.

Per budget ("resident": the whole file in memory; "25%": the minimum plus a quarter of the
other experts' slots, the rest read from the file with O_DIRECT, not from the page cache;
prefetching off, so that what the batch itself reads shows), it reports the aggregate
decode tok/s of all clients (their tokens after the first / the time from the last client's
first token to the last token), the ratio to one client, the experts' MiB read from the file
per generated token, and llama.cpp's aggregate at the same N. The physical limit column is
the batch's: N tokens / (the bytes a step reads besides the routed experts + the distinct
experts the batch's tokens routed to, as measured, x an expert's bytes) / read bandwidth.
The shape's routers are skewed (--skew, bench/tiering.py's skew_routers) as real models'
routing is: with uniform routing, N tokens of top-8 of 128 would share almost no expert.

Every client's tokens are checked against its tokens alone (offload's bit-exact batching).
Prints a table; writes bench/out/batching-SHAPE.json.
"""

from __future__ import annotations

import os

os.environ.setdefault("OFFLOAD_VRAM_BUDGET", "off")

import argparse  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, print_table, read_bandwidth, write_json  # noqa: E402
from decode import _ROUTED_EXPERT, SHAPES, model_file, prompt_tokens, touch_pages  # noqa: E402
from tiering import skew_routers  # noqa: E402

import offload.forward  # noqa: E402
from offload import Model  # noqa: E402
from offload.arch.base import hparam  # noqa: E402
from offload.gguf_file import GGUFFile  # noqa: E402
from offload.sampling import SamplingParams  # noqa: E402

N_PROMPT = 16
GREEDY = SamplingParams(temperature=0)


def skewed(path: Path, skew: float) -> Path:
    """A copy of path whose routers prefer some experts, as real models' do (bench/tiering.py's
    skew_routers): with uniform routing a batch's tokens would share almost no expert."""
    if not skew:
        return path
    out = path.with_name(f"{path.stem}-skew{skew:g}.gguf")
    if not out.exists():
        part = Path(str(out) + ".part")
        part.write_bytes(path.read_bytes())
        skew_routers(part, skew)
        part.rename(out)
    return out


def weight_bytes(path: Path) -> tuple[int, int, int]:
    """(bytes a decoding step reads besides the routed experts, bytes of one routed expert
    summed over the MoE layers, n_expert_used): the roofline of a batch is
    (the first + the distinct experts its tokens route to x the second / n_layers) / bandwidth."""
    g = GGUFFile(path)
    try:
        n_expert, n_used = int(hparam(g, "expert_count")), int(hparam(g, "expert_used_count"))
        tied = "output.weight" not in g.tensors
        other = expert = 0
        for t in g.tensors.values():
            if t.name == "token_embd.weight" and not tied:
                continue
            if _ROUTED_EXPERT.search(t.name):
                expert += t.n_bytes // n_expert
            else:
                other += t.n_bytes
        return other, expert, n_used
    finally:
        g.close()


class DistinctExperts:
    """Counts, per decoding step of the batch (router calls of at most 7 rows), the distinct
    experts its tokens route to, averaged over the MoE layers."""

    def __init__(self):
        self.sums, self.calls, self._route = 0, 0, offload.forward.route

    def __enter__(self):
        def counting(logits, *args, **kwargs):
            chosen, weights = self._route(logits, *args, **kwargs)
            if len(chosen) <= 7:
                self.sums += len(np.unique(chosen))
                self.calls += 1
            return chosen, weights

        offload.forward.route = counting
        return self

    def __exit__(self, *exc):
        offload.forward.route = self._route

    @property
    def mean(self) -> float:
        return self.sums / max(self.calls, 1)


def budget_for(path: Path, spec: str, n_ctx: int) -> str | int | None:
    """None for "resident"; "min": the plan's minimum; "P%": the minimum plus P% of the other
    expert slots."""
    if spec == "resident":
        return None
    share = 0.0 if spec == "min" else float(spec.rstrip("%")) / 100
    with Model.load(path, n_ctx=n_ctx) as m:
        p = m.plan
        extra = sum(int((pool.n_experts - pool.min_slots) * share) * pool.slot_bytes for pool in p.pools)
        return min(p.full, p.minimum + extra)


def run_offload(path: Path, n_clients: int, batch: bool, budget, n_ctx_slot: int, threads: int,
                n_decode: int) -> dict:
    """n_clients generations at once in as many slots: aggregate decode tok/s, MiB read per token."""
    model = Model.load(path, n_ctx=n_ctx_slot * n_clients, n_threads=threads, memory_budget=budget,
                       o_direct=budget is not None, prefetch=False)  # under a budget, experts come from the disk
    try:
        if budget is None:
            touch_pages(model)
        n_vocab = model.args.n_vocab
        list(model.generate_tokens(prompt_tokens(8, n_vocab, seed=99), 4, GREEDY))  # warm up: plans, pages
        slots = model.parallel_slots(n_clients, batch=batch)
        batcher = slots[0].batcher
        prompts = [prompt_tokens(N_PROMPT, n_vocab, seed=10 + c) for c in range(n_clients)]
        started = threading.Barrier(n_clients + 1)
        tokens: list[list[int]] = [[] for _ in range(n_clients)]
        ends = [0.0] * n_clients

        def client(c: int) -> None:
            batcher.begin()
            try:
                gen = slots[c].generate_tokens(prompts[c], n_decode + 1, GREEDY)
                tokens[c].append(next(gen))  # the prompt and the first token
                started.wait()
                tokens[c].extend(gen)
                ends[c] = time.perf_counter()
            finally:
                batcher.end()

        threads_ = [threading.Thread(target=client, args=(c,)) for c in range(n_clients)]
        for t in threads_:
            t.start()
        stats0 = {}

        def timer() -> None:
            started.wait()
            stats0.update(model.store_stats(), t0=time.perf_counter())
            for t in threads_:
                t.join()
            batcher.stop()

        watcher = threading.Thread(target=timer)
        watcher.start()
        batcher.run()
        watcher.join()
        stats1 = model.store_stats()
        wall = max(ends) - stats0["t0"]
        n_tokens = sum(len(t) - 1 for t in tokens)
        return {"tok_s": n_tokens / wall, "tokens": tokens,
                "mib_read_per_token": (stats1["bytes_read"] - stats0["bytes_read"]) / n_tokens / 2**20,
                "batches": dict(batcher.batches)}
    finally:
        model.close()


def run_llama_cpp(path: Path, n_clients: int, n_ctx_slot: int, threads: int, n_decode: int) -> dict:
    """llama.cpp's batched decode of n_clients sequences (llama_batch, one seq id each)."""
    import llama_cpp as L
    import llama_cpp.llama_cpp as low_level  # where Llama() takes its context parameters from

    from offload.testing import GGML_CACHE_TYPES

    defaults = low_level.llama_context_default_params

    def with_sequences():  # Llama() has no n_seq_max: its context is made from these
        params = defaults()
        params.n_seq_max, params.kv_unified = n_clients, False  # a KV cache of n_ctx / n each, as the slots
        return params

    low_level.llama_context_default_params = with_sequences
    try:
        llm = L.Llama(model_path=str(path), n_ctx=n_ctx_slot * n_clients, n_batch=512, n_ubatch=512,
                      n_threads=threads, n_threads_batch=threads, logits_all=False, type_k=GGML_CACHE_TYPES["f16"],
                      type_v=GGML_CACHE_TYPES["f16"], swa_full=False, verbose=False)
    finally:
        low_level.llama_context_default_params = defaults
    ctx, n_vocab = llm._ctx.ctx, llm.n_vocab()
    batch = L.llama_batch_init(512, 0, n_clients)

    def decode(entries) -> None:  # (token, position, sequence, wants logits)
        batch.n_tokens = len(entries)
        for i, (tok, pos, seq, logits) in enumerate(entries):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = tok, pos, 1, logits
            batch.seq_id[i][0] = seq
        if L.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")

    def last_logits(i: int) -> np.ndarray:
        return np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, i), shape=(n_vocab,))

    try:
        decode([(t, p, 0, p == 7) for p, t in enumerate(prompt_tokens(8, n_vocab, seed=99))])  # warm up
        L.llama_memory_clear(L.llama_get_memory(ctx), True)
        prompts = [prompt_tokens(N_PROMPT, n_vocab, seed=10 + c) for c in range(n_clients)]
        tokens = []
        for c, p in enumerate(prompts):  # each prompt alone, as the slots' prompts run one by one
            decode([(t, i, c, i == len(p) - 1) for i, t in enumerate(p)])
            tokens.append([int(np.argmax(last_logits(len(p) - 1)))])
        start = time.perf_counter()
        for step in range(n_decode):
            decode([(tokens[c][-1], N_PROMPT + step, c, True) for c in range(n_clients)])
            for c in range(n_clients):
                tokens[c].append(int(np.argmax(last_logits(c))))
        wall = time.perf_counter() - start
        return {"tok_s": n_clients * n_decode / wall, "tokens": tokens}
    finally:
        L.llama_batch_free(batch)
        llm.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="qwen3moe", choices=[s.name for s in SHAPES])
    ap.add_argument("--quant", default="Q4_K_M")
    ap.add_argument("--clients", default="1,2,4")
    ap.add_argument("--decode", type=int, default=48)
    ap.add_argument("--budgets", default="resident,25%")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skew", type=float, default=4.0, help="router skew (bench/tiering.py's; 0: uniform routing)")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each, interleaved; the fastest counts")
    ap.add_argument("--no-llama-cpp", action="store_true")
    opts = ap.parse_args()
    shape = next(s for s in SHAPES if s.name == opts.shape)
    path = skewed(model_file(shape, opts.quant), opts.skew)
    clients = [int(c) for c in opts.clients.split(",")]
    n_ctx_slot = N_PROMPT + opts.decode + 16
    bandwidth = read_bandwidth(opts.threads)
    other, expert, n_used = weight_bytes(path)
    roofline = bandwidth / (other + n_used * expert)
    print(f"{path.name}: {path.stat().st_size / 2**20:.0f} MiB; read bandwidth {bandwidth / 1e9:.1f} GB/s,"
          f" single-stream roofline {roofline:.0f} tok/s", file=sys.stderr)

    ways = [("batched", True), ("turns", False)] + ([] if opts.no_llama_cpp else [("llama_cpp", None)])
    rows, results = [], []
    for spec in opts.budgets.split(","):
        budget = budget_for(path, spec, n_ctx_slot * max(clients))
        runs: dict[tuple[int, str], dict] = {}  # the fastest of --repeats, the repeats interleaved
        for rep in range(opts.repeats):
            for n in clients:
                for way, batch in ways:
                    if (n == 1 and way == "turns") or (way == "llama_cpp" and spec != "resident"):
                        continue  # one client: the same run; llama.cpp reads the whole file, no budget
                    print(f"{spec}, {n} clients, {way}, run {rep + 1} of {opts.repeats} ...", file=sys.stderr)
                    if way == "llama_cpp":
                        run = run_llama_cpp(path, n, n_ctx_slot, opts.threads, opts.decode)
                    else:
                        with DistinctExperts() as distinct:
                            run = run_offload(path, n, batch, budget, n_ctx_slot, opts.threads, opts.decode)
                        run["distinct_experts_per_step"] = distinct.mean if distinct.calls else n_used  # (the C step)
                    best = runs.get((n, way))
                    run["runs_tok_s"] = (best["runs_tok_s"] if best else []) + [run["tok_s"]]
                    if best is None or run["tok_s"] > best["tok_s"]:
                        runs[(n, way)] = run
                    else:
                        best["runs_tok_s"] = run["runs_tok_s"]
        alone = {c: toks for c, toks in enumerate(runs[(max(clients), "batched")]["tokens"])}
        base = runs[(clients[0], "batched")]["tok_s"]
        for n in clients:
            r = {"budget": spec, "budget_bytes": budget, "clients": n, "batched": runs[(n, "batched")],
                 "turns": runs.get((n, "turns"), runs[(n, "batched")])}
            if (n, "llama_cpp") in runs:
                r["llama_cpp"] = runs[(n, "llama_cpp")]
            # client c's prompt is the same for every n: its tokens too, batched or not
            r["same_tokens_as_alone"] = all(toks == alone[c] for way in ("batched", "turns")
                                            for c, toks in enumerate(r[way]["tokens"]))
            # a batch of n tokens reads the other weights once, and each distinct expert once
            r["roofline_tok_s"] = n * bandwidth / (other + r["batched"]["distinct_experts_per_step"] * expert)
            results.append(r)
            lc = r.get("llama_cpp", {}).get("tok_s")
            rows.append([spec, n, r["batched"]["tok_s"], r["batched"]["tok_s"] / base, r["turns"]["tok_s"],
                         r["batched"]["tok_s"] / r["turns"]["tok_s"], r["batched"]["mib_read_per_token"],
                         r["turns"]["mib_read_per_token"], "-" if lc is None else lc,
                         "-" if lc is None else f"{r['batched']['tok_s'] / lc:.2f}x",
                         r["batched"]["distinct_experts_per_step"], r["roofline_tok_s"],
                         f"{r['batched']['tok_s'] / r['roofline_tok_s']:.0%}",
                         "yes" if r["same_tokens_as_alone"] else "NO"])
    print_table(["budget", "clients", "batched tok/s", "vs 1 client", "turns tok/s", "batched/turns",
                 "MiB read/tok batched", "MiB read/tok turns", "llama.cpp tok/s", "vs llama.cpp",
                 "experts/layer/step", "batch roofline", "of roofline", "tokens as alone"], rows)
    for r in results:
        for way in ("batched", "turns", "llama_cpp"):
            if way in r:
                r[way] = {k: v for k, v in r[way].items() if k != "tokens"}
    out = write_json(f"batching-{shape.name}", {"machine": machine(), "shape": shape.name, "quant": opts.quant,
                                  "threads": opts.threads, "decode": opts.decode, "repeats": opts.repeats,
                                  "skew": opts.skew, "bandwidth": bandwidth,
                                  "single_stream_roofline_tok_s": roofline, "results": results})
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
