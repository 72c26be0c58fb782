"""Decode and prefill speed of offload against llama.cpp, on the MoE shapes people run.

    .venv/bin/python bench/decode.py [--shapes mixtral,qwen3moe,olmoe,qwen2moe,gptoss,deepseek] [--quants Q4_K_M,Q4_0]
                                     [--threads 2] [--decode 128] [--prefill 512]
                                     [-ctk f16 -ctv f16 -fa off]   # the KV cache and flash attention, both engines
    .venv/bin/python bench/decode.py --model FILE.gguf   # race this file instead (e.g. the demo model)

Each shape of SHAPES (below) is a random-weight MoE model in a real model's proportions,
scaled to a small machine: written once as F16 by offload.testing.write_model, quantized by
llama.cpp's own quantizer, cached in ~/.cache/offload/bench. Then, per shape and quant, in
one process, same file, same thread count:

* decode tok/s: greedy, --decode tokens after a 16-token prompt (EOS ignored, so every
  engine does the same work); prefill tok/s: one --prefill-token prompt (logits of the last
  position only);
* llama.cpp two ways: as users get it (its default: weights repacked into its extra buffer
  types, `use_extra_bufts` on) and as the tests' oracle runs it (`use_extra_bufts = False`,
  offload.testing.llama_cpp_model); both with the same KV cache types and flash attention
  setting (offload's default: F16, off; -ctk / -ctv / -fa). Its greedy
  token is the argmax of its own last logits row (llama_get_logits_ith(ctx, -1)), and its
  greedy tokens are checked against offload's (the oracle's way gives the same ones; the
  repacked buffers sum in another order, so near-ties may go the other way);
* the roofline: the weight bytes one decode token reads (everything but the token
  embeddings; routed experts * top-k / n_expert; shared experts and routers whole) / the
  streaming-read bandwidth measured in the same run, and offload's share of it;
* offload's Python share of a decode token: the same model with every C kernel entry point
  (kernel_entry_points: offload._cext's functions named matmul*, moe*, attention*, silu_mul)
  made a no-op, so what is left is the interpreter, Numba's small ops and the router.

llama.cpp's repacked buffers crash on Xeons with AMX (README), so there only the oracle's
way runs. The README's install builds llama.cpp for AVX2 (the tests' oracle); to race a
build for this machine's own instruction set, build llama-cpp-python natively elsewhere
and point LLAMA_CPP_LIB_PATH at its lib/ folder. The output says which build ran. Prints
one table; writes bench/out/decode.json. The offload it races is the one the interpreter
imports (bench/ is first on sys.path): to race another checkout's (a git worktree), run
with PYTHONPATH=that checkout, its C kernels built in place (setup.py build_ext --inplace).
"""

from __future__ import annotations

import os

os.environ.setdefault("OFFLOAD_VRAM_BUDGET", "off")  # CPU against CPU (read when a model loads)

import argparse  # noqa: E402
import gc  # noqa: E402
import hashlib  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, print_table, read_bandwidth, write_json  # noqa: E402

from offload import Model  # noqa: E402
from offload.arch.base import hparam  # noqa: E402
from offload.cache_types import DEFAULT_CACHE_TYPE  # noqa: E402
from offload.gguf_file import GGUFFile  # noqa: E402
from offload.kernels import kernels_in_use  # noqa: E402
from offload.testing import GGML_CACHE_TYPES, TinyConfig, llama_cpp_model, quantize_model, write_model  # noqa: E402

CACHE = Path.home() / ".cache" / "offload" / "bench"
# the KV cache both engines run with (--cache-type-k / --cache-type-v / --flash-attn)
KV = {"type_k": DEFAULT_CACHE_TYPE, "type_v": DEFAULT_CACHE_TYPE, "flash_attn": False}


@dataclass(frozen=True)
class Shape:
    name: str
    config: TinyConfig
    mirrors: str


# Real models' proportions (expert width / model width, top-k / n_expert, heads) at half
# their width (Mixtral's: a quarter) and fewer layers, so that each file is 0.7-1 GB as
# Q4_K_M; expert hidden sizes are multiples of 256 so the K-quants apply. The vocabulary is
# Llama 2's 32000 tokens for all: the output matrix is a larger share of a token than in the
# real models (Qwen's 152k-token output is about an eighth of Qwen3-30B-A3B's active bytes;
# here 20-30%).
# write_model's limits: qwen2moe and olmoe need head_dim * n_head == n_embd, olmoe no GQA.
SHAPES = [
    Shape("mixtral", TinyConfig(n_layer=20, n_embd=1024, n_head=8, n_head_kv=2, head_dim=128, n_ff=3584,
                                n_expert=8, n_expert_used=2, n_ctx=2048),
          "Mixtral-8x7B (4096 wide, 32 layers; here 1/4 wide, 20 layers): 8 experts of 3.5x the width, top-2, "
          "GQA 4:1, head dim 128"),
    Shape("qwen3moe", TinyConfig(arch="qwen3moe", n_layer=6, n_embd=1024, n_head=16, n_head_kv=2, head_dim=128,
                                 n_ff=512, n_expert=128, n_expert_used=8, n_ctx=2048),
          "Qwen3-30B-A3B (2048 wide, 48 layers; here 1/2 wide, 6 layers): 128 experts of 0.375x the width "
          "(here 0.5x: 384 is no K-quant width), top-8, GQA 8:1, head dim 128, q 2x the width, q/k norms per head"),
    Shape("olmoe", TinyConfig(arch="olmoe", n_layer=10, n_embd=1024, n_head=8, n_head_kv=8, head_dim=128,
                              n_ff=512, n_expert=64, n_expert_used=8, n_ctx=2048),
          "OLMoE-1B-7B (2048 wide, 16 layers; here 1/2 wide, 10 layers): 64 experts of 0.5x the width, top-8, "
          "no GQA, head dim 128, q/k norms over the whole projection"),
    Shape("qwen2moe", TinyConfig(arch="qwen2moe", n_layer=7, n_embd=1024, n_head=8, n_head_kv=8, head_dim=128,
                                 n_ff=768, n_ff_shexp=3072, n_expert=60, n_expert_used=4, n_ctx=2048),
          "Qwen1.5-MoE-A2.7B (2048 wide, 24 layers; here 1/2 wide, 7 layers): 60 experts of 0.69x the width "
          "(here 0.75x), top-4, a gated shared expert 4x an expert, no GQA, head dim 128, q/k/v biases"),
    Shape("gptoss", TinyConfig(arch="gpt-oss", n_layer=8, n_embd=1024, n_head=16, n_head_kv=2, head_dim=64,
                               n_ff=1024, n_expert=32, n_expert_used=4, n_ctx=2048, sliding_window=128,
                               yarn_factor=32.0, yarn_orig_ctx=4096),
          "gpt-oss-20b (2880 wide, 24 layers; here 1024 wide, 8 layers): 32 experts as wide as the model, top-4, "
          "swiglu_oai with biases, GQA 8:1, head dim 64 (q 1x the width; real 64 heads, 1.4x), biases on q/k/v/o, "
          "a sink per head, a window of 128 on every other layer, YaRN x32 over 4096; its real files' quant is "
          "MXFP4_MOE (--quants MXFP4_MOE: MXFP4 experts, Q8_0 elsewhere)"),
    Shape("deepseek", TinyConfig(arch="deepseek2", n_layer=8, n_embd=1024, n_head=8, n_head_kv=1, head_dim=192,
                                 rope_dim=64, kv_lora_rank=512, v_head_dim=128, n_ff=768, n_ff_dense=5376,
                                 n_expert=64, n_expert_used=6, n_expert_shared=2, n_dense_lead=1, n_ctx=2048,
                                 yarn_factor=40.0, yarn_orig_ctx=4096, yarn_log_mul=0.0707),
          "DeepSeek-V2-Lite (2048 wide, 27 layers; here 1/2 wide, 8 layers): MLA (a plain query, 16 heads of "
          "128 + 64 RoPE dims; here 8), a cache of a 512-wide latent and one 64-wide RoPE key per token, "
          "64 experts of 0.69x the width (here 0.75x), top-6, softmax routing, 2 shared experts, one dense "
          "leading layer, YaRN x40 with DeepSeek's log multiplier"),
]
N_PROMPT = 16  # the decode runs' prompt

# "Dynamic" low-bit files as people download them for big MoE models (unsloth's UD quants and
# the like): the experts in a 2-bit I-quant, the rest kept higher. --quants takes these names
# beside llama-quantize's file types (Q4_K_M, IQ3_M, ...).
MIXES = {
    "IQ2_XXS_MIX": ("IQ2_XXS", {r"attn_.*": "Q4_K", r"ffn_down_exps": "IQ3_S", r"token_embd": "Q4_K",
                                r"output\.weight": "Q6_K"}),
}


# -- the model files --------------------------------------------------------------------

def model_file(shape: Shape, quant: str) -> Path:
    """The shape's model as `quant`, made once: F16 by write_model, then llama.cpp's quantizer.
    The file name carries a hash of the config, so a changed shape is written anew."""
    CACHE.mkdir(parents=True, exist_ok=True)
    tag = f"{shape.name}-{hashlib.sha1(repr(shape.config).encode()).hexdigest()[:8]}"
    f16 = CACHE / f"{tag}-F16.gguf"
    if not f16.exists():
        print(f"writing {f16} ...", file=sys.stderr)
        write_model(str(f16) + ".part", shape.config, "F16", seed=0)
        Path(str(f16) + ".part").rename(f16)
    if quant == "F16":
        return f16
    out = CACHE / f"{tag}-{quant}.gguf"
    if not out.exists():
        print(f"quantizing {f16.name} to {quant} with llama.cpp ...", file=sys.stderr)
        ftype, overrides = MIXES.get(quant, (quant, None))
        # llama-quantize wants an importance matrix for the lowest-bit I-quants: a random one
        # does for speed (the values do not change the kernels' work)
        imatrix = "random" if ftype.startswith(("IQ1", "IQ2")) or ftype == "IQ3_XXS" else None
        quantize_model(f16, str(out) + ".part", ftype, imatrix=imatrix, tensor_types=overrides)
        Path(str(out) + ".part").rename(out)
    return out


_ROUTED_EXPERT = re.compile(r"_exps\.|\.ffn_(gate|up|down)\.\d+\.")  # stacked, or one tensor per expert


def active_bytes_per_token(path: Path) -> int:
    """Weight bytes one decode token reads: every tensor but the token embeddings (it reads
    one row of them), routed experts top-k / n_expert of them; shared experts (`_shexp`) and
    routers whole. The expert counts are the arch's own keys (`qwen3moe.expert_count`, ...).
    Without output.weight the embeddings are the output matrix too, read whole."""
    g = GGUFFile(path)
    try:
        n_expert = int(hparam(g, "expert_count", 0))
        n_used = int(hparam(g, "expert_used_count", 0))
        tied = "output.weight" not in g.tensors
        total = 0
        for t in g.tensors.values():
            if t.name == "token_embd.weight" and not tied:
                continue
            total += t.n_bytes * n_used // n_expert if n_expert and _ROUTED_EXPERT.search(t.name) else t.n_bytes
        return total
    finally:
        g.close()


def prompt_tokens(n: int, n_vocab: int, seed: int = 1) -> list[int]:
    return [1] + np.random.default_rng(seed).integers(100, n_vocab - 1, size=n - 1).tolist()


def _speeds(n_decode: int, decode_s: float, n_prefill: int, prefill_s: float, tokens: list[int]) -> dict:
    return {"decode_tok_s": n_decode / decode_s, "prefill_tok_s": n_prefill / prefill_s,
            "ms_per_token": 1e3 * decode_s / n_decode, "tokens": tokens}


# -- offload ----------------------------------------------------------------------------

def touch_pages(model: Model) -> None:
    """Map every page of the model file into the process, as llama.cpp's load does (its mmap
    is MAP_POPULATE): the timed decode then measures the steady state, not the first touch of
    each expert's pages (~10% of the first 64 tokens of a 0.7 GB model)."""
    data = model.gguf._bytes
    int(data[:: 4096].sum())  # one byte a page


def _offload_kv() -> dict:
    return {"cache_type_k": KV["type_k"], "cache_type_v": KV["type_v"],
            "flash_attn": "on" if KV["flash_attn"] else "off"}


def run_offload(path: Path, threads: int, n_decode: int, n_prefill: int) -> dict:
    model = Model.load(path, n_ctx=max(n_prefill, N_PROMPT + n_decode) + 32, n_threads=threads, **_offload_kv())
    t = model.transformer
    n_vocab = model.args.n_vocab
    try:
        touch_pages(model)
        t.reset()
        t.forward(np.array(prompt_tokens(8, n_vocab), dtype=np.int64))  # warm up (page cache)
        t.forward(np.array(prompt_tokens(2, n_vocab, seed=3)[:1], dtype=np.int64))  # and the decode step's plan
        t.reset()
        logits = t.forward(np.array(prompt_tokens(N_PROMPT, n_vocab), dtype=np.int64))
        tokens = []
        start = time.perf_counter()
        for _ in range(n_decode):
            tokens.append(int(np.argmax(logits[-1])))
            logits = t.forward(np.array(tokens[-1:], dtype=np.int64))
        decode_s = time.perf_counter() - start
        t.reset()
        prompt = np.array(prompt_tokens(n_prefill, n_vocab, seed=2), dtype=np.int64)
        start = time.perf_counter()
        t.forward(prompt)
        prefill_s = time.perf_counter() - start
    finally:
        model.close()
    return _speeds(n_decode, decode_s, n_prefill, prefill_s, tokens)


def kernel_entry_points(module) -> list[str]:
    """The functions of offload._cext that do a token's arithmetic: matmul*, moe*, attention*
    (attention, and a whole attention block in one call), silu_mul, step_run (a whole decoding
    step). A kernel added later under such a name is found here without a change."""
    return sorted(n for n in dir(module) if (n.startswith(("matmul", "moe", "attention")) or n in ("silu_mul", "step_run"))
                  and callable(getattr(module, n)))


# entry points that do a token's arithmetic and also return a value: what their stub returns
# (step_run: the index of a layer whose output is not finite, -1 for none)
KERNEL_RESULTS = {"step_run": -1}


class _NoKernels:
    """Stands in for offload._cext: each kernel entry point does nothing (its outputs keep
    whatever the reused buffers held), everything else is the real module. An entry point
    that returns a value is a query, not a kernel (moe_workspace_bytes sizes a buffer), so each
    stub runs the real function at its first call and, if that returned something, keeps
    passing through to it. `stubbed` / `passed_through` say which were which."""

    def __init__(self, real):
        self._real = real
        self.stubbed: list[str] = []
        self.passed_through: list[str] = []
        for name in kernel_entry_points(real):
            setattr(self, name, self._stub(name, getattr(real, name)))

    def _stub(self, name: str, real):
        mode = None  # decided at the first call: "kernel" (a no-op from then on) or "query"

        if name in KERNEL_RESULTS:
            def fixed(*args):
                if name not in self.stubbed:
                    self.stubbed.append(name)
                return KERNEL_RESULTS[name]

            return fixed

        def call(*args):
            nonlocal mode
            if mode == "kernel":
                return None
            if mode == "query":
                return real(*args)
            result = real(*args)
            mode = "kernel" if result is None else "query"
            (self.stubbed if result is None else self.passed_through).append(name)
            return result

        return call

    def __getattr__(self, name):  # everything that is not a kernel entry point
        return getattr(self._real, name)


def python_overhead(path: Path, threads: int, n_decode: int) -> dict:
    """ms per decode token with the C kernels stubbed out: the time that is not kernel time.
    The prompt runs on the real kernels; only the decode steps run on the stubs (the first
    four, untimed, also settle which entry points are kernels)."""
    import math
    import types

    from offload import forward
    from offload.kernels import cext, select_kernels

    model = Model.load(path, n_ctx=N_PROMPT + n_decode + 32, n_threads=threads, **_offload_kv())
    t = model.transformer
    prompt = np.array(prompt_tokens(N_PROMPT, model.args.n_vocab), dtype=np.int64)
    real = cext._cext
    try:
        t.forward(prompt)
        cext._cext = stubs = _NoKernels(real)
        select_kernels()  # the kernel table binds the module's functions when it is made
        # nor are they finite: the per-layer path's NaN check is told so (the whole step in C has none to skip)
        forward.math = types.SimpleNamespace(**{**vars(math), "isfinite": lambda value: True})
        with np.errstate(all="ignore"):  # the stubbed outputs are not numbers anyone reads
            for token in prompt[:4]:  # warm up
                t.forward(np.array([token]))
            start = time.perf_counter()
            for i in range(n_decode):
                t.forward(np.array([prompt[i % N_PROMPT]]))
            ms = 1e3 * (time.perf_counter() - start) / n_decode
        return {"ms_per_token": ms, "stubbed": sorted(stubs.stubbed), "passed_through": sorted(stubs.passed_through),
                "never_called": sorted(set(kernel_entry_points(real)) - set(stubs.stubbed) - set(stubs.passed_through))}
    finally:
        cext._cext = real
        forward.math = math
        select_kernels()
        model.close()


# -- llama.cpp --------------------------------------------------------------------------

def llama_cpp_llm(path: Path, n_ctx: int, threads: int, repacked: bool):
    """llama-cpp-python's Llama with offload's KV cache type and the oracle's batch sizes: with its
    default weight buffers (repacked: True) or the oracle itself (use_extra_bufts = False)."""
    if not repacked:
        return llama_cpp_model(path, n_ctx=n_ctx, n_threads=threads, logits_all=False, **KV)
    import llama_cpp

    from offload.forward import N_UBATCH

    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=min(n_ctx, N_UBATCH),
                           n_threads=threads, n_threads_batch=threads, logits_all=False,
                           type_k=GGML_CACHE_TYPES[KV["type_k"]], type_v=GGML_CACHE_TYPES[KV["type_v"]],
                           flash_attn=KV["flash_attn"], swa_full=False, verbose=False)


def run_llama_cpp(path: Path, threads: int, n_decode: int, n_prefill: int, repacked: bool) -> dict:
    llm = llama_cpp_llm(path, max(n_prefill, N_PROMPT + n_decode) + 32, threads, repacked)
    n_vocab = llm.n_vocab()
    try:
        llm.eval(prompt_tokens(8, n_vocab))  # warm up
        llm.reset()
        llm.eval(prompt_tokens(N_PROMPT, n_vocab))
        tokens = []
        start = time.perf_counter()
        for _ in range(n_decode):
            last = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,))  # llm.scores stays 0
            tokens.append(int(np.argmax(last)))
            llm.eval(tokens[-1:])
        decode_s = time.perf_counter() - start
        llm.reset()
        prompt = prompt_tokens(n_prefill, n_vocab, seed=2)
        start = time.perf_counter()
        llm.eval(prompt)
        prefill_s = time.perf_counter() - start
    finally:
        llm.close()
    return _speeds(n_decode, decode_s, n_prefill, prefill_s, tokens)


# -- one shape and quant, and the report ------------------------------------------------

def race(name: str, quant: str, path: Path, opts, bandwidth: float, repacked_ok: bool) -> dict:
    """Every measure of one model file."""
    active = active_bytes_per_token(path)
    ours = run_offload(path, opts.threads, opts.decode, opts.prefill)
    gc.collect()
    host = python_overhead(path, opts.threads, opts.decode)
    gc.collect()
    theirs = {}
    for way, repacked in (("llama_cpp", True), ("llama_cpp_no_repack", False)):
        if repacked and not repacked_ok:
            theirs[way] = None
            continue
        theirs[way] = run_llama_cpp(path, opts.threads, opts.decode, opts.prefill, repacked)
        theirs[way]["same_tokens_as_offload"] = theirs[way]["tokens"] == ours["tokens"]
        gc.collect()
    roofline = bandwidth / active
    ratios = {f"offload_vs_{way}": {p: ours[f"{p}_tok_s"] / r[f"{p}_tok_s"] for p in ("decode", "prefill")}
              for way, r in theirs.items() if r}
    return {"shape": name, "quant": quant, "file": str(path), "file_bytes": path.stat().st_size,
            "active_bytes_per_token": active, "roofline_tok_s": roofline,
            "offload": ours, **theirs, **ratios,
            "offload_share_of_roofline": ours["decode_tok_s"] / roofline,
            "python_overhead_ms_per_token": host["ms_per_token"],
            "python_overhead_share": host["ms_per_token"] / ours["ms_per_token"],
            "stubbed_kernels": {k: v for k, v in host.items() if k != "ms_per_token"}}


def table_rows(r: dict) -> list[list[object]]:
    rows = []
    for phase in ("decode", "prefill"):
        key, ours = f"{phase}_tok_s", r["offload"][f"{phase}_tok_s"]
        row = [r["shape"], r["quant"], f"{r['file_bytes'] / 1e9:.2f}", f"{r['active_bytes_per_token'] / 1e6:.0f}",
               phase, ours]
        for way in ("llama_cpp", "llama_cpp_no_repack"):
            theirs = r[way][key] if r[way] else None
            row += ["-", "-"] if theirs is None else [theirs, f"{ours / theirs:.2f}x"]
        decode = phase == "decode"
        row += [f"{r['roofline_tok_s']:.1f}" if decode else "",
                f"{100 * r['offload_share_of_roofline']:.0f}%" if decode else "",
                f"{100 * r['python_overhead_share']:.0f}%" if decode else ""]
        rows.append(row)
    return rows


HEADERS = ["shape", "quant", "GB", "active MB/tok", "phase", "offload tok/s", "llama.cpp tok/s", "vs",
           "no-repack tok/s", "vs", "roofline tok/s", "of roofline", "Python"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default=",".join(s.name for s in SHAPES),
                    help=f"comma-separated, of: {', '.join(s.name for s in SHAPES)}")
    ap.add_argument("--quants", default="Q4_K_M,Q4_0",
                    help="comma-separated llama-quantize file types: Q4_K_M, Q4_0, Q8_0, MXFP4_MOE (gpt-oss's), IQ3_M, "
                         f"F16, ..., or a dynamic mix: {', '.join(MIXES)}")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--model", type=Path, default=None, help="race this GGUF instead of the generated ones")
    ap.add_argument("-ctk", "--cache-type-k", default=DEFAULT_CACHE_TYPE,
                    help="KV cache type of the keys, both engines")
    ap.add_argument("-ctv", "--cache-type-v", default=DEFAULT_CACHE_TYPE, help="and of the values")
    ap.add_argument("-fa", "--flash-attn", choices=("on", "off"), default="off", help="flash attention, both engines")
    opts = ap.parse_args()
    KV.update(type_k=opts.cache_type_k.lower(), type_v=opts.cache_type_v.lower(), flash_attn=opts.flash_attn == "on")
    by_name = {s.name: s for s in SHAPES}
    unknown = set(opts.shapes.split(",")) - set(by_name)
    if unknown and not opts.model:
        ap.error(f"unknown shape(s) {', '.join(sorted(unknown))}; known: {', '.join(by_name)}")
    shapes = [] if opts.model else [by_name[n] for n in opts.shapes.split(",")]

    import llama_cpp

    llama_build = llama_cpp.llama_print_system_info().decode().strip()
    host = machine()
    repacked_ok = "amx_tile" not in host["simd"]
    bandwidth = read_bandwidth(opts.threads)
    print(f"{host['cpu']}, {opts.threads} threads, streaming read {bandwidth / 1e9:.1f} GB/s; "
          f"offload kernels: {kernels_in_use()}\n")

    files = ([(opts.model.stem, "file", opts.model)] if opts.model else
             [(s.name, q, model_file(s, q)) for s in shapes for q in opts.quants.split(",")])
    results = []
    for name, quant, path in files:
        results.append(race(name, quant, path, opts, bandwidth, repacked_ok))
        print(f"  {name} {quant}: done", file=sys.stderr)

    print_table(HEADERS, [row for r in results for row in table_rows(r)])
    print("\nllama.cpp: as users get it (repacked weight buffers"
          + ("" if repacked_ok else ": not run, they crash on CPUs with AMX") + "); no-repack: use_extra_bufts=False "
          "(the tests' oracle); both with offload's KV cache type. vs: offload / llama.cpp. Python: offload's decode token "
          "with the C kernels stubbed out, as a share of a real one.")
    stubbed, passed = ({n for r in results for n in r["stubbed_kernels"][k]} for k in ("stubbed", "passed_through"))
    print(f"Stubbed C entry points: {', '.join(sorted(stubbed))}; passed through (they return a value): "
          f"{', '.join(sorted(passed)) or 'none'}")
    differ = [f"{r['shape']} {r['quant']} ({way})" for r in results for way in ("llama_cpp", "llama_cpp_no_repack")
              if r[way] and not r[way]["same_tokens_as_offload"]]
    print("Greedy tokens equal to offload's: " + ("all" if not differ else "all but " + ", ".join(differ)))
    print(f"llama.cpp build: {llama_build}")
    path = write_json("decode", {
        "machine": host, "threads": opts.threads, "read_bandwidth_gb_per_s": bandwidth / 1e9,
        "kernels": kernels_in_use(), "llama_cpp_build": llama_build, "n_decode": opts.decode,
        "n_prefill": opts.prefill, "n_prompt": N_PROMPT, "kv_cache": dict(KV),
        "shapes": [{"name": s.name, "mirrors": s.mirrors, "config": asdict(s.config)} for s in shapes],
        "results": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
