"""What each KV cache type costs and buys: bytes per token, and the longest context a memory
budget holds beside the minimum expert slots, for the bundled demo model and a Qwen3-30B-A3B
(48 layers, 4 KV heads of 128; its real tensor table in a Q4_K_M-like mix, the data a hole:
a sparse file, planned as `offload inspect` plans it). On paper: no model runs.

    .venv/bin/python bench/kv_context.py [--budget 2GB] [--max-ctx 1048576]

Writes bench/out/kv_context.json. The longest context is store.plan.largest_context (the plan
at llama.cpp's default micro-batch of 512, the training context not a cap); a quantized V
cache runs with flash attention (-fa), as in llama.cpp.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from gguf import GGMLQuantizationType, GGUFWriter

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table  # noqa: E402

from offload.arch import model_args  # noqa: E402
from offload.demo import demo_model_path  # noqa: E402
from offload.gguf_file import GGUFFile  # noqa: E402
from offload.store import parse_budget  # noqa: E402
from offload.store.plan import kv_bytes_per_cell, largest_context  # noqa: E402
from offload.summary import human_bytes  # noqa: E402
from offload.testing import write_tensor_table  # noqa: E402

OUT = Path(__file__).resolve().parent / "out" / "kv_context.json"
TYPES = [("f32", "f32"), ("f16", "f16"), ("bf16", "bf16"), ("q8_0", "f16"), ("q8_0", "q8_0"), ("q5_1", "q5_1"),
         ("q5_0", "q5_0"), ("q4_1", "q4_1"), ("q4_0", "q4_0"), ("iq4_nl", "iq4_nl")]


def qwen3_30b_a3b_table(path: Path) -> Path:
    """Qwen3-30B-A3B as llama.cpp's converter writes it, Q4_K_M-like (experts Q4_K, their down
    projections Q6_K, attention Q4_K / Q6_K V, embeddings Q4_K, output Q6_K)."""
    T = GGMLQuantizationType
    n_embd, n_layer, n_head, n_head_kv, hd, n_vocab, n_expert, n_ff = 2048, 48, 32, 4, 128, 151936, 128, 768

    def configure(w: GGUFWriter) -> None:
        w.add_name("Qwen3-30B-A3B (tensor table only)")
        w.add_context_length(262144)
        w.add_embedding_length(n_embd)
        w.add_block_count(n_layer)
        w.add_feed_forward_length(6144)
        w.add_head_count(n_head)
        w.add_head_count_kv(n_head_kv)
        w.add_key_length(hd)
        w.add_value_length(hd)
        w.add_rope_freq_base(1e6)
        w.add_layer_norm_rms_eps(1e-6)
        w.add_vocab_size(n_vocab)
        w.add_expert_count(n_expert)
        w.add_expert_used_count(8)
        w.add_expert_feed_forward_length(n_ff)

    tensors = [("token_embd.weight", (n_vocab, n_embd), T.Q4_K), ("output_norm.weight", (n_embd,), T.F32),
               ("output.weight", (n_vocab, n_embd), T.Q6_K)]
    for i in range(n_layer):
        p = f"blk.{i}."
        tensors += [(p + "attn_norm.weight", (n_embd,), T.F32), (p + "ffn_norm.weight", (n_embd,), T.F32),
                    (p + "attn_q_norm.weight", (hd,), T.F32), (p + "attn_k_norm.weight", (hd,), T.F32),
                    (p + "attn_q.weight", (n_head * hd, n_embd), T.Q4_K),
                    (p + "attn_k.weight", (n_head_kv * hd, n_embd), T.Q4_K),
                    (p + "attn_v.weight", (n_head_kv * hd, n_embd), T.Q6_K),
                    (p + "attn_output.weight", (n_embd, n_head * hd), T.Q4_K),
                    (p + "ffn_gate_inp.weight", (n_expert, n_embd), T.F32),
                    (p + "ffn_gate_exps.weight", (n_expert, n_ff, n_embd), T.Q4_K),
                    (p + "ffn_up_exps.weight", (n_expert, n_ff, n_embd), T.Q4_K),
                    (p + "ffn_down_exps.weight", (n_expert, n_embd, n_ff), T.Q6_K)]
    return write_tensor_table(path, "qwen3moe", configure, tensors)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", default="2GB")
    ap.add_argument("--max-ctx", type=int, default=1 << 20, help="the longest context searched")
    opts = ap.parse_args()
    budget = parse_budget(opts.budget)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        models = {"demo": demo_model_path(), "Qwen3-30B-A3B": qwen3_30b_a3b_table(Path(tmp) / "qwen3.gguf")}
        for name, path in models.items():
            g = GGUFFile(path)
            try:
                args = model_args(g)
                for type_k, type_v in TYPES:
                    per_token = kv_bytes_per_cell(args, type_k, type_v) * args.n_layer
                    fit = largest_context(g, args, budget, opts.max_ctx, type_k=type_k, type_v=type_v, n_ubatch=512)
                    rows.append({"model": name, "cache": f"{type_k}/{type_v}", "kv_bytes_per_token": per_token,
                                 "longest_context": fit, "flash_attention": type_v not in ("f32", "f16", "bf16"),
                                 "trained_context": args.n_ctx_train})
            finally:
                g.close()
    print_table(["model", "-ctk/-ctv", "KV per token", f"longest context in {opts.budget}", "-fa"],
                [[r["model"], r["cache"], human_bytes(r["kv_bytes_per_token"]), r["longest_context"],
                  "on" if r["flash_attention"] else "off/auto"] for r in rows])
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps({"budget": budget, "rows": rows}, indent=1))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
