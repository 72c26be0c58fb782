"""GLM-4.5 / 4.6 / 4.7 and GLM-4.5-Air (llama.cpp's glm4moe arch) against llama.cpp: tiny
random-weight models of its variants, each with a trailing next-token-prediction (nextn)
layer counted in block_count, which llama.cpp skips and so must offload:

- AIR: GLM-4.5-Air-like: q/k/v biases, no q/k norms, partial NEOX RoPE (16 of 32 dims per
  head, n_head * head_dim != n_embd), GQA 2:1, one leading dense layer, sigmoid scores (no
  expert_gating_func key: glm4moe's default is sigmoid) with exp_probs_b, renormalized and
  scaled weights, a shared expert;
- FULL: GLM-4.5-like: per-head q/k norms too, two shared experts' width;
- PLAIN: no attention biases, softmax gating, weights neither renormalized nor scaled;
- WIDE: rows of 256 so that llama-quantize keeps K-quants (Q4_K_M).

Logits per position and greedy tokens must be llama.cpp's to the bit, on F32, F16, Q8_0 and
Q4_K_M, under tiered budgets with prefetch, and on the Numba kernels.
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
from offload.testing import TinyConfig, llama_cpp_greedy, llama_cpp_logits
from offload.testing import float_bits as bits
from offload.testing import random_prompt as prompt

from invariance import assert_same_under_budgets_and_kernels

AIR = TinyConfig(arch="glm4moe", n_layer=3, n_embd=64, n_head=4, n_head_kv=2, head_dim=32, rope_dim=16, n_ff=32,
                 n_expert=16, n_expert_used=4, n_dense_lead=1, n_ff_dense=96, n_expert_shared=1, gating="none",
                 weights_norm=True, weights_scale=2.5, n_nextn=1, rms_eps=1e-5)
FULL = dataclasses.replace(AIR, qk_norm=True, gating="sigmoid", n_expert_shared=2)
PLAIN = dataclasses.replace(AIR, attn_bias=False, gating="softmax", weights_norm=False, weights_scale=0.0)
WIDE = dataclasses.replace(FULL, n_embd=256, head_dim=64, rope_dim=32, n_ff=256, n_ff_dense=256, n_expert=8,
                           n_expert_used=2, n_expert_shared=1)


@pytest.fixture(scope="module")
def models(quantized_factory):
    """(config, file type) -> path (see conftest.quantized_factory)."""
    return lambda config, ftype: quantized_factory(config, ftype, seed=7)


@pytest.mark.parametrize("config,ftype", [(AIR, "F32"), (AIR, "Q8_0"), (FULL, "F32"), (FULL, "F16"), (FULL, "Q8_0"),
                                          (PLAIN, "F32"), (WIDE, "Q4_K_M")])
def test_logits_are_llama_cpps_to_the_bit(models, config, ftype):
    path = models(config, ftype)
    if ftype == "Q4_K_M":  # the experts stay K-quants at this width
        types = {t.type_name for t in GGUFFile(path).tensors.values() if "_exps." in t.name}
        assert types and types <= {"Q4_K", "Q5_K", "Q6_K"}, types
    ids = prompt(30)
    with Model.load(path, n_ctx=256) as m:
        ours = m.logits(ids)
    ref = llama_cpp_logits(path, ids, n_ctx=256)
    np.testing.assert_array_equal(bits(ours), bits(ref))


def test_model_args_follow_llama_cpp_conventions(models):
    air = model_args(GGUFFile(models(AIR, "F32")))
    assert (air.arch, air.n_layer, air.head_dim, air.rope_dim, air.rope_style) == ("glm4moe", 3, 32, 16, "neox")
    assert air.routing == "sigmoid_topk_norm" and air.expert_weights_scale == 2.5 and air.expert_selection_bias
    assert air.expert_groups == 0 and air.shared_expert and air.n_dense_lead == 1 and air.n_ff == 96
    assert air.n_ff_exp == 32 and air.ffn_norm == "post_attention_norm" and air.early_row_drop
    assert air.qk_norm is None and air.attn_bias and air.attention == "gqa" and air.yarn is None
    full = model_args(GGUFFile(models(FULL, "F32")))
    assert full.qk_norm == "head" and full.routing == "sigmoid_topk_norm"
    plain = model_args(GGUFFile(models(PLAIN, "F32")))
    assert plain.routing == "softmax_topk" and not plain.attn_bias and plain.expert_weights_scale == 0.0


def test_the_nextn_layer_is_in_the_file_but_never_loaded_or_counted(models):
    path = models(FULL, "F32")
    g = GGUFFile(path)
    assert g.get("glm4moe.block_count") == 4 and g.get("glm4moe.nextn_predict_layers") == 1
    assert "blk.3.nextn.eh_proj.weight" in g.tensors and "blk.3.ffn_gate_exps.weight" in g.tensors
    args = model_args(g)
    trunk = sum(t.n_elements for n, t in g.tensors.items() if not n.startswith("blk.3."))
    assert summarize(g, args, 64).params_total == trunk
    with Model.load(path, n_ctx=64) as m:
        assert len(m.transformer.weights.layers) == len(m.transformer.cache.k) == 3
        layers = m.transformer.weights.layers
        assert layers[0].dense is not None and layers[1].moe.shared.gate.n_rows == 2 * FULL.n_ff
        assert layers[1].attn.q_norm.shape == (FULL.head_dim,) and layers[1].moe.selection_bias.shape == (16,)


@pytest.mark.parametrize("config", [AIR, FULL])
def test_greedy_decode_matches_llama_cpp(models, config):
    path = models(config, "Q8_0")
    ids = prompt(10, seed=1)
    with Model.load(path, n_ctx=256) as m:
        ours = list(m.generate_tokens(ids, 40, SamplingParams(temperature=0.0)))
    ref = llama_cpp_greedy(path, ids, 40, n_ctx=256)
    assert len(ref) >= 30, "llama.cpp stopped early: the check would be weak"
    assert ours == ref


def test_tiered_budgets_and_the_numba_kernels_give_the_same_tokens(models):
    assert_same_under_budgets_and_kernels(models(FULL, "Q8_0"), prompt(16, seed=2), 20)


def test_a_file_without_exp_probs_b_is_refused_in_one_line_as_llama_cpp_refuses_it(models, tmp_path):
    from gguf import GGUFReader, GGUFWriter

    src = GGUFReader(models(AIR, "F32"))
    path = tmp_path / "no-bias.gguf"
    w = GGUFWriter(path, "glm4moe")
    for key, f in src.fields.items():
        if not key.startswith("GGUF.") and key != "general.architecture":
            w.add_key_value(key, f.contents(), f.types[0], f.types[-1] if len(f.types) > 1 else None)
    for t in src.tensors:
        if t.name != "blk.2.exp_probs_b.bias":
            w.add_tensor(t.name, t.data, raw_shape=list(reversed(t.shape.tolist())), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError):  # llama-cpp-python: "Failed to load model from file"
        llama_cpp_logits(path, [1, 2])
    r = subprocess.run([sys.executable, "-m", "offload", "inspect", str(path)], capture_output=True, text=True,
                       timeout=120, stdin=subprocess.DEVNULL)
    assert r.returncode != 0
    assert "blk.2.exp_probs_b.bias" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
