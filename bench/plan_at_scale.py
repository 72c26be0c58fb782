"""The memory plan of DeepSeek-sized models no test machine holds, on paper: a GGUF with the
real metadata and tensor table of DeepSeek-V3/R1 (671B) and V2-Lite (16B) in a Q4_K_M-like
mix, its data a hole (a sparse file), planned by `offload inspect` for the RAM of common
machines. Prints what stays resident, the expert slots, what a token reads from disk at a
few hit rates and the decode speed that the disk's bandwidth alone allows; writes JSON.

    .venv/bin/python bench/plan_at_scale.py [--disk-bandwidth 3GB]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from offload.arch import model_args
from offload.gguf_file import GGUFFile
from offload.store import parse_budget
from offload.store.plan import make_plan
from offload.summary import human_bytes, summarize
from offload.testing import deepseek_table

OUT = Path(__file__).resolve().parent / "out" / "plan_at_scale.json"
CASES = {"V3": ("64GB", "128GB", "256GB"), "V2-Lite": ("4GB", "8GB", "16GB")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--disk-bandwidth", default="3GB", help="bytes per second of the model's disk (default 3GB)")
    ap.add_argument("--ctx-size", type=int, default=4096)
    opts = ap.parse_args()
    bandwidth = parse_budget(opts.disk_bandwidth)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size, budgets in CASES.items():
            g = GGUFFile(deepseek_table(Path(tmp) / f"{size}.gguf", size))
            args = model_args(g)
            s = summarize(g, args, opts.ctx_size)
            for budget in budgets:
                p = make_plan(g, args, opts.ctx_size, parse_budget(budget))
                per_token = p.expert_bytes_per_token
                rows.append(dict(
                    model=f"DeepSeek-{size}", file_bytes=g.file_size, budget=budget, resident=p.fixed,
                    kv_cache=p.kv_cache, slots=p.slots, experts=p.n_experts, slot_share=p.share,
                    expert_bytes_per_token=per_token, params_total=s.params_total, params_active=s.params_active,
                    **{f"tok_s_at_hit_{int(h * 100)}": bandwidth / ((1 - h) * per_token) for h in p.HIT_RATES}))
            g.close()
    print(f"{'model':<16}{'budget':>8}{'resident':>11}{'slots (share)':>20}{'per token':>11}"
          + "".join(f"{'tok/s @' + str(int(h * 100)) + '%':>12}" for h in (0.5, 0.8, 0.95)))
    for r in rows:
        slots = f"{r['slots']}/{r['experts']} ({r['slot_share']:.0%})"
        print(f"{r['model']:<16}{r['budget']:>8}{human_bytes(r['resident']):>11}{slots:>20}"
              f"{human_bytes(r['expert_bytes_per_token']):>11}"
              + "".join(f"{r[f'tok_s_at_hit_{h}']:>12.2f}" for h in (50, 80, 95)))
    print(f"(disk {bandwidth / 1e9:.1f} GB/s; decode bound by expert reads alone; a cache's hit rate depends on "
          "the routing, see bench/routing.py)")
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(dict(disk_bandwidth=bandwidth, ctx_size=opts.ctx_size, rows=rows), indent=1))


if __name__ == "__main__":
    main()
