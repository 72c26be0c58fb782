"""Our logits and greedy tokens against llama.cpp's on the same GGUF file.

llama.cpp runs with offload's KV cache type (F16 by default, as its own) and without its repacked
weight buffers (see offload.testing); we follow its numerics (activations converted to each weight type's
dot-product partner), so agreement is to float32 rounding, not just "close".
"""

from __future__ import annotations

import numpy as np
import pytest

from offload import Model
from offload.sampling import SamplingParams
from offload.testing import TinyConfig, llama_cpp_greedy, llama_cpp_logits

PROMPT = "The old lighthouse keeper climbed the stairs every evening, counting each of the 117 steps twice."

SHAPES = {
    # head_dim 16, GQA 2:1, 4 experts top-2
    "e4k2": TinyConfig(n_layer=2, n_embd=64, n_head=4, n_head_kv=2, n_ff=128, n_expert=4, n_expert_used=2),
    # head_dim 32, GQA 4:1, 8 experts top-2 (Mixtral's routing shape)
    "e8k2-gqa4": TinyConfig(n_layer=2, n_embd=128, n_head=4, n_head_kv=1, n_ff=96, n_expert=8, n_expert_used=2),
    # head_dim 64, no GQA, 16 experts top-4, 3 layers
    "e16k4-mha": TinyConfig(n_layer=3, n_embd=128, n_head=2, n_head_kv=2, n_ff=64, n_expert=16, n_expert_used=4),
    # head_dim 32 with 3 heads, 6 experts top-1
    "e6k1": TinyConfig(n_layer=2, n_embd=96, n_head=3, n_head_kv=1, n_ff=160, n_expert=6, n_expert_used=1),
    # explicit head_dim different from n_embd / n_head
    "e4k3-hd48": TinyConfig(n_layer=2, n_embd=64, n_head=4, n_head_kv=2, head_dim=48, n_ff=64, n_expert=4, n_expert_used=3),
    # dense llama
    "dense": TinyConfig(n_layer=2, n_embd=64, n_head=4, n_head_kv=4, n_ff=192, n_expert=0, n_expert_used=0),
}

# Relative L2 error allowed per weight type (what the foundation issue requires, or tighter
# where following llama.cpp's numerics gets us there).
TOLERANCE = {"F32": 1e-4, "F16": 1e-4, "BF16": 1e-4, "Q8_0": 1e-4, "Q4_0": 1e-4}


def relative_l2(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


@pytest.mark.parametrize("weight_type", list(TOLERANCE))
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("seed", [0, 1])
def test_logits_match_llama_cpp(model_factory, shape, weight_type, seed):
    path = model_factory(SHAPES[shape], weight_type, seed)
    with Model.load(path, n_ctx=256) as m:
        ids = m.tokenize(PROMPT)
        assert ids[0] == m.tokenizer.bos_id  # the SPM vocab asks for BOS
        ours = m.logits(ids)
    ref = llama_cpp_logits(path, ids, n_ctx=256)
    assert ours.shape == ref.shape == (len(ids), m.args.n_vocab)
    assert ours.dtype == np.float32
    err = relative_l2(ours, ref)
    assert err <= TOLERANCE[weight_type], f"relative L2 error {err:.2e}"
    assert np.array_equal(ours.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("weight_type", ["F32", "F16", "Q8_0", "Q4_0"])
@pytest.mark.parametrize("shape", ["e4k2", "e8k2-gqa4", "dense"])
def test_greedy_generation_matches_llama_cpp(model_factory, shape, weight_type):
    path = model_factory(SHAPES[shape], weight_type, 0)
    with Model.load(path, n_ctx=256) as m:
        ids = m.tokenize("Once upon a time")
        ours = list(m.generate_tokens(ids, 64, SamplingParams(temperature=0.0)))
    ref = llama_cpp_greedy(path, ids, 64, n_ctx=256)
    assert len(ref) >= 16, "llama.cpp stopped early: the check would be weak"
    assert ours == ref


def test_logits_is_a_fresh_context_each_call(model_factory):
    with Model.load(model_factory(SHAPES["e4k2"]), n_ctx=128) as m:
        ids = m.tokenize(PROMPT)
        first = m.logits(ids)
        m.logits(m.tokenize("something else entirely"))
        assert np.array_equal(m.logits(ids), first)


def test_decode_with_kv_cache_equals_one_prefill(model_factory):
    """Token-by-token decode reuses the cache and gives the logits of a single batched pass."""
    with Model.load(model_factory(SHAPES["e8k2-gqa4"], "Q8_0"), n_ctx=128) as m:
        ids = m.tokenize(PROMPT)
        batched = m.logits(ids)
        m.transformer.reset()
        m.transformer.forward(np.array(ids[:5]))
        stepwise = [m.transformer.forward(np.array([t]))[0] for t in ids[5:]]
        err = relative_l2(np.array(stepwise), batched[5:])
        assert err < 1e-5
        assert np.array_equal(np.array(stepwise).argmax(-1), batched[5:].argmax(-1))


def test_llama_quantizer_makes_k_quant_mixes(model_factory, tmp_path):
    """The helper the k-quant work builds on: llama.cpp's own quantizer, its own type mix."""
    from offload.gguf_file import GGUFFile
    from offload.testing import quantize_model

    src = model_factory(TinyConfig(n_layer=2, n_embd=256, n_head=4, n_head_kv=2, n_ff=256, n_expert=4,
                                   n_expert_used=2), "F32")
    dst = quantize_model(src, tmp_path / "q4km.gguf", "Q4_K_M")
    types = {t.name: t.type_name for t in GGUFFile(dst).tensors.values()}
    assert types["blk.0.ffn_gate_exps.weight"] == "Q4_K"
    assert types["output.weight"] == "Q6_K"
    assert types["blk.0.ffn_gate_inp.weight"] == "F32"  # routers stay F32
    with Model.load(src, n_ctx=64) as m:
        ids = m.tokenize(PROMPT)
    ref = llama_cpp_logits(dst, ids, n_ctx=64)
    assert np.isfinite(ref).all() and ref.std() > 0
