"""Qwen2-MoE, Qwen3-MoE and OLMoE against llama.cpp, as test_oracle checks llama-arch models.

Each arch gets a tiny random-weight model written with llama.cpp's metadata keys and tensor
names for it (offload.testing.write_model with `arch`), in shapes in the spirit of the real
ones (many small experts, top-k up to 8) and with the Qwen2 BPE tokenizer (151,936 tokens,
so n_embd stays at 64). llama.cpp loads them with its own graph for the arch; our generic
forward pass must give its logits (per position) and its greedy tokens.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest

from offload import Model
from offload.arch import model_args
from offload.gguf_file import GGUFFile
from offload.sampling import SamplingParams
from offload.summary import summarize
from offload.testing import TinyConfig, llama_cpp_greedy, llama_cpp_logits, shared_data_dir

pytestmark = pytest.mark.skipif(shared_data_dir() is None, reason="needs ../shared/data/vocab (the Qwen2 tokenizer)")

PROMPT = "The old lighthouse keeper climbed the stairs every evening, counting each of the 117 steps twice."

ARCHS = {
    # Qwen3-30B-A3B in miniature: 128 experts top-8, per-head q/k norm, head_dim (32) * n_head
    # != n_embd, GQA 2:1, expert size from expert_feed_forward_length
    "qwen3moe": TinyConfig(arch="qwen3moe", n_layer=2, n_embd=64, n_head=4, n_head_kv=2, head_dim=32, n_ff=32,
                           n_expert=128, n_expert_used=8, vocab="qwen2", rms_eps=1e-6),
    # Qwen1.5-MoE-A2.7B in miniature: 60 experts top-4 (no renormalization), q/k/v biases, a
    # shared expert 4x an expert's size behind a sigmoid gate
    "qwen2moe": TinyConfig(arch="qwen2moe", n_layer=2, n_embd=64, n_head=4, n_head_kv=4, n_ff=32, n_ff_shexp=128,
                           n_expert=60, n_expert_used=4, vocab="qwen2", rms_eps=1e-6),
    # OLMoE-1B-7B in miniature: 64 experts top-8 (no renormalization), q/k norm over the
    # whole projection
    "olmoe": TinyConfig(arch="olmoe", n_layer=2, n_embd=64, n_head=4, n_head_kv=4, n_ff=32, n_expert=64,
                        n_expert_used=8, vocab="qwen2", rms_eps=1e-5),
}

# The foundation's tolerances (tests/test_oracle.py); in practice these match to the bit.
TOLERANCE = {"F32": 1e-4, "F16": 1e-4, "Q8_0": 1e-4, "Q4_0": 1e-4}


def relative_l2(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


@pytest.mark.parametrize("weight_type", list(TOLERANCE))
@pytest.mark.parametrize("arch", list(ARCHS))
def test_logits_match_llama_cpp(model_factory, arch, weight_type):
    path = model_factory(ARCHS[arch], weight_type, 0)
    with Model.load(path, n_ctx=256) as m:
        assert m.args.arch == arch
        ids = m.tokenize(PROMPT)
        ours = m.logits(ids)
    ref = llama_cpp_logits(path, ids, n_ctx=256)
    assert ours.shape == ref.shape == (len(ids), m.args.n_vocab)
    err = relative_l2(ours, ref)
    assert err <= TOLERANCE[weight_type], f"relative L2 error {err:.2e}"
    assert np.array_equal(ours.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("weight_type", ["F32", "Q8_0"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_greedy_generation_matches_llama_cpp(model_factory, arch, weight_type):
    path = model_factory(ARCHS[arch], weight_type, 1)
    with Model.load(path, n_ctx=256) as m:
        ids = m.tokenize("Once upon a time")
        ours = list(m.generate_tokens(ids, 40, SamplingParams(temperature=0.0)))
    ref = llama_cpp_greedy(path, ids, 40, n_ctx=256)
    assert len(ref) >= 32, "llama.cpp stopped early: the check would be weak"
    assert ours == ref


def test_model_args_follow_llama_cpp_conventions(model_factory):
    expect = {
        "qwen3moe": dict(rope_style="neox", routing="softmax_topk_norm", qk_norm="head", attn_bias=False,
                         shared_expert=False, head_dim=32, n_ff_exp=32, n_expert=128, n_expert_used=8),
        "qwen2moe": dict(rope_style="neox", routing="softmax_topk", qk_norm=None, attn_bias=True,
                         shared_expert=True, head_dim=16, n_ff_exp=32, n_expert=60, n_expert_used=4),
        "olmoe": dict(rope_style="neox", routing="softmax_topk", qk_norm="full", attn_bias=False,
                      shared_expert=False, head_dim=16, n_ff_exp=32, n_expert=64, n_expert_used=8),
    }
    for arch, fields in expect.items():
        args = model_args(GGUFFile(model_factory(ARCHS[arch], "F32", 0)))
        assert args.arch == arch
        for key, value in fields.items():
            assert getattr(args, key) == value, (arch, key)


def test_qwen2moe_loads_its_shared_expert_and_gate(model_factory):
    with Model.load(model_factory(ARCHS["qwen2moe"], "F32", 0), n_ctx=32) as m:
        moe = m.transformer.weights.layers[0].moe
        assert moe.shared is not None and moe.shared_gate is not None
        assert moe.shared.gate.n_rows == 128 and moe.shared_gate.n_rows == 1
        assert m.transformer.weights.layers[0].attn.bq is not None


def test_qwen2moe_without_attention_biases_runs_as_llama_cpp_runs_it(model_factory, weight_type="Q8_0"):
    """llama.cpp loads attn_q/k/v biases where present (create_tensor_qkv): a qwen2moe file
    without them loads, runs without them, and gives llama.cpp's logits to the bit (the
    decoding steps too: the one-call attention block serves a layer without biases)."""
    c = dataclasses.replace(ARCHS["qwen2moe"], attn_bias=False)
    path = model_factory(c, weight_type, 0)
    assert not any(name.endswith(("attn_q.bias", "attn_k.bias", "attn_v.bias")) for name in GGUFFile(path).tensors)
    with Model.load(path, n_ctx=256) as m:
        attn = m.transformer.weights.layers[0].attn
        assert attn.bq is None and attn.bk is None and attn.bv is None
        ids = m.tokenize(PROMPT)
        ours = m.logits(ids)
        tokens = list(m.generate_tokens(ids[:6], 24, SamplingParams(temperature=0.0)))
    ref = llama_cpp_logits(path, ids, n_ctx=256)
    np.testing.assert_array_equal(ours.view(np.uint32), ref.view(np.uint32))
    assert tokens == llama_cpp_greedy(path, ids[:6], 24, n_ctx=256)


def _expected_params(c: TinyConfig, n_vocab: int) -> tuple[int, int]:
    """(total, active) counted from the config, independently of the file."""
    hd = c.head_dim or c.n_embd // c.n_head
    q, kv = c.n_head * hd, c.n_head_kv * hd
    attn = 2 * q * c.n_embd + 2 * kv * c.n_embd
    if c.arch == "qwen2moe":
        attn += q + 2 * kv  # biases
    elif c.arch == "qwen3moe":
        attn += 2 * hd  # per-head q/k norms
    elif c.arch == "olmoe":
        attn += q + kv  # whole-projection q/k norms
    expert = 3 * c.n_ff * c.n_embd
    shared = 3 * (c.n_ff_shexp or c.n_ff) * c.n_embd + c.n_embd if c.arch == "qwen2moe" else 0
    per_layer = 2 * c.n_embd + attn + c.n_expert * c.n_embd + shared
    base = 2 * n_vocab * c.n_embd + c.n_embd + c.n_layer * per_layer
    return base + c.n_layer * c.n_expert * expert, base + c.n_layer * c.n_expert_used * expert


@pytest.mark.parametrize("arch", list(ARCHS))
def test_inspect_counts_active_parameters(model_factory, arch):
    c = ARCHS[arch]
    path = model_factory(c, "F32", 0)
    gguf = GGUFFile(path)
    args = model_args(gguf)
    total, active = _expected_params(c, args.n_vocab)
    s = summarize(gguf, args, 64)
    assert (s.params_total, s.params_active) == (total, active)
    r = subprocess.run([sys.executable, "-m", "offload", "inspect", str(path)], capture_output=True, text=True,
                       timeout=120, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    assert f"architecture  {arch} (MoE)" in r.stdout
    assert f"experts       {c.n_expert} per layer, {c.n_expert_used} used per token, hidden {c.n_ff}" in r.stdout
    from offload.summary import human_count
    assert f"{human_count(total)} total, {human_count(active)} active per token" in r.stdout
