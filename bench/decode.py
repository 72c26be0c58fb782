"""Decode and prefill speed of offload against llama.cpp, on the same file and threads.

    .venv/bin/python bench/decode.py [--threads 2] [--quants Q4_K_M,Q4_0] [--decode 128] [--prefill 512]
                                     [--model FILE.gguf]   # race this file instead (e.g. the demo model)

Makes (once, cached in ~/.cache/offload/bench) a Mixtral-shaped MoE model with random
weights: written as F16 with gguf, then quantized by llama.cpp's own quantizer. Then, per
quantization, in one process, same file, same thread count:

* decode tok/s: greedy, --decode tokens after a 16-token prompt (EOS ignored, so both
  engines do the same work),
* prefill tok/s: one --prefill-token prompt (logits of the last position only),
* the roofline: weight bytes one decode token must read (attention, router, output, and
  top-k experts per layer) / the streaming-read bandwidth measured in the same run,
* offload's Python overhead per token, two ways: (a) the same model with the C kernels
  (matmuls, attention) replaced by no-ops, so what is left is the interpreter, Numba's small
  ops and the router: the share of a real token that is not kernel time; (b) the same model
  shape with tiny matrices (kernels cheap but not free: the 32000-row output matrix alone
  is 4.6 MB), an upper bound kept for comparison with earlier runs.

llama.cpp runs with `use_extra_bufts = False` (its repacked weight buffers crash on Xeons
with AMX) and an F32 KV cache like offload's; on a laptop with the repacked buffers it is
somewhat faster than here. The README's install builds llama.cpp for AVX2 (the tests'
oracle); to race a build for this machine's own instruction set, build llama-cpp-python
natively elsewhere and point LLAMA_CPP_LIB_PATH at its lib/ folder. The table says which
build ran. Writes bench/out/decode.json.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, print_table, read_bandwidth, write_json  # noqa: E402

from offload import Model  # noqa: E402
from offload.gguf_file import GGUFFile  # noqa: E402
from offload.kernels import kernels_in_use  # noqa: E402
from offload.testing import TinyConfig, llama_cpp_model, quantize_model, write_model  # noqa: E402

CACHE = Path.home() / ".cache" / "offload" / "bench"
# Mixtral's layout (8 experts, top-2, GQA 4:1, head dim 128, 3.5x FFN) at 1/4 of its width
# and 20 layers: 1.8 G parameters, about 1 GB as Q4_K_M.
SHAPE = TinyConfig(n_layer=20, n_embd=1024, n_head=8, n_head_kv=2, head_dim=128, n_ff=3584, n_expert=8,
                   n_expert_used=2, n_ctx=2048)
# The same layer structure with small matrices (256 wide, the smallest k-quants take): the
# kernels take ~0 but for the 32000-row output, so what is left is mostly Python.
TINY = TinyConfig(n_layer=20, n_embd=256, n_head=8, n_head_kv=2, head_dim=32, n_ff=256, n_expert=8, n_expert_used=2,
                  n_ctx=2048)


def model_file(config: TinyConfig, quant: str, tag: str) -> Path:
    CACHE.mkdir(parents=True, exist_ok=True)
    f16 = CACHE / f"{tag}-F16.gguf"
    if not f16.exists():
        print(f"writing {f16} ...", file=sys.stderr)
        write_model(str(f16) + ".part", config, "F16", seed=0)
        Path(str(f16) + ".part").rename(f16)
    if quant == "F16":
        return f16
    out = CACHE / f"{tag}-{quant}.gguf"
    if not out.exists():
        print(f"quantizing to {quant} with llama.cpp ...", file=sys.stderr)
        quantize_model(f16, str(out) + ".part", quant)
        Path(str(out) + ".part").rename(out)
    return out


def active_bytes_per_token(path: Path) -> int:
    """Weight bytes one decode token reads: everything but the token embeddings and the
    experts, plus n_expert_used of each layer's experts."""
    g = GGUFFile(path)
    try:
        n_expert = int(g.require("llama.expert_count"))
        n_used = int(g.require("llama.expert_used_count"))
        total = 0
        for t in g.tensors.values():
            if t.name == "token_embd.weight":
                continue
            total += t.n_bytes * n_used // n_expert if "_exps." in t.name else t.n_bytes
        return total
    finally:
        g.close()


def prompt_tokens(n: int, n_vocab: int, seed: int = 1) -> list[int]:
    return [1] + np.random.default_rng(seed).integers(100, n_vocab - 1, size=n - 1).tolist()


def run_offload(path: Path, threads: int, n_decode: int, n_prefill: int) -> dict:
    model = Model.load(path, n_ctx=max(n_prefill, 16 + n_decode) + 32, n_threads=threads)
    t = model.transformer
    n_vocab = model.args.n_vocab
    try:
        t.reset()
        t.forward(np.array(prompt_tokens(8, n_vocab), dtype=np.int64))  # warm up (JIT, page cache)
        t.reset()
        logits = t.forward(np.array(prompt_tokens(16, n_vocab), dtype=np.int64))
        start = time.perf_counter()
        for _ in range(n_decode):
            logits = t.forward(np.array([int(np.argmax(logits[-1]))], dtype=np.int64))
        decode_s = time.perf_counter() - start
        t.reset()
        prompt = np.array(prompt_tokens(n_prefill, n_vocab, seed=2), dtype=np.int64)
        start = time.perf_counter()
        t.forward(prompt)
        prefill_s = time.perf_counter() - start
    finally:
        model.close()
    return {"decode_tok_s": n_decode / decode_s, "prefill_tok_s": n_prefill / prefill_s,
            "ms_per_token": 1e3 * decode_s / n_decode}


class _NoKernels:
    """Stands in for offload._cext: the matmul, attention and SwiGLU entry points do nothing (their
    outputs keep whatever the reused buffers held), everything else is the real module."""

    def __init__(self, real):
        self._real = real

    def __getattr__(self, name):
        if name in ("matmul", "matmul_x", "matmul_tiled", "matmul_float", "attention", "silu_mul"):
            return lambda *args: None
        return getattr(self._real, name)


def python_overhead_ms(path: Path, threads: int, n_decode: int) -> float:
    """ms per decode token with the C kernels stubbed out: the time that is not kernel time.
    The prompt runs on the real kernels; only the timed decode steps run on the stubs."""
    from offload.kernels import cext, select_kernels

    model = Model.load(path, n_ctx=16 + n_decode + 32, n_threads=threads)
    t = model.transformer
    prompt = np.array(prompt_tokens(16, model.args.n_vocab), dtype=np.int64)
    real = cext._cext
    try:
        t.forward(prompt)
        cext._cext = _NoKernels(real)
        select_kernels()  # the kernel table binds the module's functions when it is made
        with np.errstate(all="ignore"):  # the stubbed outputs are not numbers anyone reads
            for token in prompt[:4]:  # warm up
                t.forward(np.array([token]))
            start = time.perf_counter()
            for i in range(n_decode):
                t.forward(np.array([prompt[i % 16]]))
            return 1e3 * (time.perf_counter() - start) / n_decode
    finally:
        cext._cext = real
        select_kernels()
        model.close()


def run_llama_cpp(path: Path, threads: int, n_decode: int, n_prefill: int) -> dict:
    llm = llama_cpp_model(path, n_ctx=max(n_prefill, 16 + n_decode) + 32, n_threads=threads, logits_all=False)
    n_vocab = llm.n_vocab()
    try:
        llm.eval(prompt_tokens(8, n_vocab))  # warm up
        llm.reset()
        llm.eval(prompt_tokens(16, n_vocab))
        start = time.perf_counter()
        for _ in range(n_decode):
            last = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))  # logits_all=False: the last row
            llm.eval([int(np.argmax(last))])
        decode_s = time.perf_counter() - start
        llm.reset()
        prompt = prompt_tokens(n_prefill, n_vocab, seed=2)
        start = time.perf_counter()
        llm.eval(prompt)
        prefill_s = time.perf_counter() - start
    finally:
        llm.close()
    return {"decode_tok_s": n_decode / decode_s, "prefill_tok_s": n_prefill / prefill_s,
            "ms_per_token": 1e3 * decode_s / n_decode}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quants", default="Q4_K_M,Q4_0")
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--model", type=Path, default=None, help="race this GGUF instead of the generated ones")
    opts = ap.parse_args()

    import llama_cpp

    llama_build = llama_cpp.llama_print_system_info().decode().strip()
    bandwidth = read_bandwidth(opts.threads)
    print(f"{machine()['cpu']}, {opts.threads} threads, streaming read {bandwidth / 1e9:.1f} GB/s; "
          f"offload kernels: {kernels_in_use()}\n")
    # The Python overhead is measured on the generated models' shape: a given model has another
    overhead = None if opts.model else run_offload(model_file(TINY, "Q4_K_M", "small-mixtral"), opts.threads,
                                                   opts.decode, 64)["ms_per_token"]
    rows, results = [], []
    files = ([(opts.model.stem, opts.model)] if opts.model else
             [(quant, model_file(SHAPE, quant, "mixtral-1g")) for quant in opts.quants.split(",")])
    for quant, path in files:
        active = active_bytes_per_token(path)
        roofline = bandwidth / active
        ours = run_offload(path, opts.threads, opts.decode, opts.prefill)
        gc.collect()
        host_ms = python_overhead_ms(path, opts.threads, opts.decode)
        gc.collect()
        theirs = run_llama_cpp(path, opts.threads, opts.decode, opts.prefill)
        gc.collect()
        size_gb = path.stat().st_size / 1e9
        for what in ("decode_tok_s", "prefill_tok_s"):
            ratio = ours[what] / theirs[what]
            rows.append([quant, f"{size_gb:.2f} GB", what.replace("_tok_s", ""), ours[what], theirs[what], f"{ratio:.2f}x",
                         f"{roofline:.1f}" if what == "decode_tok_s" else "",
                         f"{100 * ours[what] / roofline:.0f}%" if what == "decode_tok_s" else ""])
        results.append({"quant": quant, "file_bytes": path.stat().st_size, "active_bytes_per_token": active,
                        "roofline_tok_s": roofline, "offload": ours, "llama_cpp": theirs,
                        "python_overhead_ms_per_token": host_ms,
                        "python_overhead_share": host_ms / ours["ms_per_token"],
                        "tiny_model_ms_per_token": overhead,
                        "tiny_model_share": None if overhead is None else overhead / ours["ms_per_token"]})
    print_table(["quant", "file", "phase", "offload tok/s", "llama.cpp tok/s", "ratio", "roofline tok/s", "of roofline"],
                rows)
    print("\nPython overhead (decode with the C kernels stubbed out): "
          + ", ".join(f"{r['quant']}: {r['python_overhead_ms_per_token']:.2f} ms/token, "
                      f"{100 * r['python_overhead_share']:.0f}% of a token" for r in results))
    if overhead is not None:
        print(f"The same 20-layer shape with tiny matrices (kernels cheap, not free): {overhead:.2f} ms/token; "
              + ", ".join(f"{r['quant']}: {100 * r['tiny_model_share']:.0f}% of a token" for r in results))
    print("llama.cpp ran without its repacked weight buffers (use_extra_bufts=False) and with an F32 KV cache;"
          f" its build: {llama_build}")
    path = write_json("decode", {"machine": machine(), "threads": opts.threads,
                                 "read_bandwidth_gb_per_s": bandwidth / 1e9, "kernels": kernels_in_use(),
                                 "llama_cpp_build": llama_build,
                                 "n_decode": opts.decode, "n_prefill": opts.prefill, "results": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
