"""Decode speed with the GPU tier under VRAM budgets, against static placement.

    .venv/bin/python bench/gpu.py [--model M.gguf] [--decode 64] [--shares 25,50,100] [--threads N]
                                  [--no-llama-cpp]

Rows, all on the same model, prompt token ids and greedy decode (tokens must be equal):

* cpu: no GPU (the reference tokens),
* static: llama.cpp-style placement: every non-expert matrix on the GPU, every expert
  computed on the CPU (a VRAM budget with no expert slots),
* vram S%: the always-needed matrices plus slots for S% of the expert bytes; experts not
  in VRAM are copied or computed on the CPU as the calibrated cost model says,
* llama.cpp (when its CUDA build is installed): every layer offloaded (n_gpu_layers=-1),
  the upper bound when the whole model fits the GPU.

Without --model it uses bench/tiering.py's cached random-weight MoE (Q8_0). Needs a CUDA GPU
and numba-cuda (pip install -e '.[gpu]'); without one it says so in one line and exits.
Prints a table and writes bench/out/gpu.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, print_table, write_json  # noqa: E402

N_CTX = 1024
PROMPT = [1] + list(range(1000, 1031))


def _gpu_or_exit() -> str:
    from offload.errors import OffloadError

    try:
        from offload.gpu.device import Device

        device = Device()
    except OffloadError as e:
        sys.exit(f"bench/gpu.py: {e}")
    name = device.name
    if device.simulated:
        sys.exit("bench/gpu.py: OFFLOAD_GPU_SIMULATOR=1 is set: the simulator's speed means nothing; unset it")
    return name


def _budgets(path: Path, shares: list[float]) -> list[tuple[str, int]]:
    from offload import arch
    from offload.gguf_file import GGUFFile
    from offload.gpu.vram import vram_budget_for
    from offload.weights import expert_layouts, load_weights

    g = GGUFFile(path)
    try:
        args = arch.model_args(g)
        w, lay = load_weights(g, args), expert_layouts(g, args)
        return [("static", vram_budget_for(w, lay, 0.0))] + [(f"vram {s:g}%", vram_budget_for(w, lay, s / 100))
                                                              for s in shares]
    finally:
        g.close()


def run_offload(path: Path, n_decode: int, threads: int | None, vram_budget) -> dict:
    from offload.model import Model
    from offload.sampling import SamplingParams

    with Model.load(path, n_ctx=N_CTX, n_threads=threads, vram_budget=vram_budget) as m:
        params = SamplingParams(temperature=0)
        list(m.generate_tokens(PROMPT, 4, params))  # warm: compile kernels, fill VRAM slots
        tokens = list(m.generate_tokens(PROMPT, n_decode, params))
        st = m.stats()
        gpu = st.get("gpu") or {}
        n = max(len(tokens), 1)
        return {"tokens": tokens, "decode_tok_s": st["decode_tok_s"], "prompt_tok_s": st["prompt_tok_s"],
                "gpu_hits_per_token": gpu.get("gpu_hits", 0) / n, "copies_per_token": gpu.get("copies", 0) / n,
                "cpu_experts_per_token": gpu.get("cpu_computes", 0) / n,
                "copied_mib_per_token": gpu.get("bytes_copied", 0) / n / 2**20,
                "vram_expert_slots": gpu.get("vram_expert_slots", 0), "gpu_stats": gpu}


def run_llama_cpp(path: Path, n_decode: int) -> dict | None:
    try:
        import llama_cpp
    except ImportError:
        return None
    if not llama_cpp.llama_supports_gpu_offload():
        return None
    llm = llama_cpp.Llama(str(path), n_ctx=N_CTX, n_gpu_layers=-1, verbose=False)
    llm.eval(PROMPT)
    tokens, t0 = [], time.perf_counter()
    for _ in range(n_decode):
        tok = llm.sample(temp=0.0)
        tokens.append(int(tok))
        llm.eval([tok])
    return {"tokens": tokens, "decode_tok_s": n_decode / (time.perf_counter() - t0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--shares", default="25,50,100", help="VRAM budgets as % of expert bytes")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-llama-cpp", action="store_true")
    a = ap.parse_args()
    device = _gpu_or_exit()
    if a.model is None:
        from tiering import default_model

        a.model = default_model(4.0)
    shares = [float(s) for s in a.shares.split(",")]
    rows, results = [], {}
    cpu = run_offload(a.model, a.decode, a.threads, None)
    results["cpu"] = cpu
    for name, budget in _budgets(a.model, shares):
        results[name] = dict(run_offload(a.model, a.decode, a.threads, budget), vram_budget=budget)
    if not a.no_llama_cpp:
        ll = run_llama_cpp(a.model, a.decode)
        if ll is not None:
            results["llama.cpp all-GPU"] = ll
    for name, r in results.items():
        same = r["tokens"] == cpu["tokens"]
        rows.append([name, r["decode_tok_s"], r.get("vram_budget", 0) / 2**20, r.get("gpu_hits_per_token", 0.0),
                     r.get("copies_per_token", 0.0), r.get("cpu_experts_per_token", 0.0), "yes" if same else "NO"])
    print(f"{a.model.name} on {device}, {a.decode} decode tokens")
    print_table(["run", "decode tok/s", "VRAM MiB", "GPU hits/tok", "copies/tok", "CPU experts/tok", "same tokens"],
                rows)
    path = write_json("gpu", {"model": str(a.model), "device": device, "machine": machine(), "runs": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
