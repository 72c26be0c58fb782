"""gpt-oss against llama.cpp: tiny random-weight models with its every convention (head_dim
!= n_embd / n_head, biases on q/k/v/o, the router and the experts, attention sinks, sliding
window layers with a window shorter than the prompts, YaRN RoPE, swiglu_oai), written with
llama.cpp's tensor names and quantized with its own quantizer (MXFP4_MOE as the real files,
a K-quant mix, Q8_0, F16, F32). Logits per position and greedy tokens must be llama.cpp's to
the bit, also once the sliding layers' ring of cells wraps, under tiered budgets with
prefetch, and on the Numba kernels.
"""

from __future__ import annotations

import numpy as np
import pytest

from offload import Model
from offload.arch import model_args
from offload.forward import kv_cells
from offload.gguf_file import GGUFFile
from offload.kernels import ggml_math
from offload.kernels.attention import attention, attention_numba, attention_ref
from offload.kernels.dispatch import select_kernels
from offload.sampling import SamplingParams
from offload.testing import TinyConfig, llama_cpp_greedy, llama_cpp_logits
from offload.testing import float_bits as bits
from offload.testing import random_prompt as prompt

from invariance import assert_same_under_budgets_and_kernels

# gpt-oss-20b in miniature: head_dim 32 with 4 heads of width 64 (real: 64 x 64 over 2880),
# GQA 2:1 (real 8:1), 8 experts top-4 (real 32 top-4), a window of 16 (real 128) on the even
# layers, YaRN x32 over an original context of 64 (real 4096)
SMALL = TinyConfig(arch="gpt-oss", n_layer=2, n_embd=64, n_head=4, n_head_kv=2, head_dim=32, n_ff=64, n_expert=8,
                   n_expert_used=4, sliding_window=16)
# rows of 256 so that llama-quantize's K-quant mixes keep their K-quants
WIDE = TinyConfig(arch="gpt-oss", n_layer=2, n_embd=256, n_head=4, n_head_kv=1, head_dim=64, n_ff=256, n_expert=8,
                  n_expert_used=4, sliding_window=16)


@pytest.fixture(scope="module")
def models(quantized_factory):
    """(config, file type) -> path (see conftest.quantized_factory)."""
    return lambda config, ftype: quantized_factory(config, ftype, seed=3)


@pytest.mark.parametrize("config,ftype", [(SMALL, "F32"), (SMALL, "F16"), (SMALL, "Q8_0"), (SMALL, "MXFP4_MOE"),
                                          (WIDE, "MXFP4_MOE"), (WIDE, "Q4_K_M")])
def test_logits_are_llama_cpps_to_the_bit(models, config, ftype):
    path = models(config, ftype)
    ids = prompt(40)  # longer than the window (16)
    with Model.load(path, n_ctx=256) as m:
        assert m.args.arch == "gpt-oss"
        ours = m.logits(ids)
    ref = llama_cpp_logits(path, ids, n_ctx=256)
    np.testing.assert_array_equal(bits(ours), bits(ref))


def test_the_quantized_files_hold_the_formats_they_test(models):
    """MXFP4_MOE puts the experts in MXFP4; Q4_K_M at width 256 keeps K-quants (else the
    checks above would test fallback types only)."""
    types = {t.name: t.ggml_type.name for t in GGUFFile(models(WIDE, "MXFP4_MOE")).tensors.values()}
    assert types["blk.0.ffn_gate_exps.weight"] == "MXFP4" and types["blk.0.ffn_down_exps.weight"] == "MXFP4"
    types = {t.name: t.ggml_type.name for t in GGUFFile(models(WIDE, "Q4_K_M")).tensors.values()}
    assert {"Q4_K", "Q6_K"} <= set(types.values())


def test_model_args_follow_llama_cpp_conventions(models):
    a = model_args(GGUFFile(models(SMALL, "F32")))
    assert (a.head_dim, a.n_expert, a.n_expert_used, a.n_ff_exp) == (32, 8, 4, 64)
    assert a.routing == "topk_softmax" and a.expert_act == "swiglu_oai" and a.rope_style == "neox"
    assert a.attn_sinks and a.attn_bias and a.attn_out_bias and a.router_bias and a.expert_bias
    assert a.ffn_norm == "post_attention_norm"
    assert a.swa_layers == (True, False) and a.window(0) == 16 and a.window(1) == 0
    assert a.yarn is not None and a.yarn.factor == 32.0 and a.yarn.orig_ctx == 64


def test_greedy_decode_across_the_window_matches_llama_cpp(models):
    path = models(SMALL, "MXFP4_MOE")
    ids = prompt(12, seed=1)
    with Model.load(path, n_ctx=256) as m:
        ours = list(m.generate_tokens(ids, 40, SamplingParams(temperature=0.0)))
    ref = llama_cpp_greedy(path, ids, 40, n_ctx=256)
    assert len(ref) >= 30, "llama.cpp stopped early: the check would be weak"
    assert ours == ref


def test_sliding_layers_keep_a_ring_that_wraps_as_llama_cpps(models):
    """With a context of 1024 the sliding layers keep 768 cells (llama.cpp's SWA cache: the
    window plus a micro-batch of 512, padded to 256); a prompt of 760 and 30 decoded tokens
    wrap the ring, and the sums, which run in cell order, must still be llama.cpp's."""
    path = models(SMALL, "Q8_0")
    with Model.load(path, n_ctx=1024) as m:
        assert [len(k) for k in m.transformer.cache.k] == [768, 1024]
        assert kv_cells(m.args, 0, 300) == 300
        ids = prompt(760, seed=2)
        ours = list(m.generate_tokens(ids, 30, SamplingParams(temperature=0.0)))
    ref = llama_cpp_greedy(path, ids, 30, n_ctx=1024)
    assert len(ref) >= 20
    assert ours == ref


def test_tiered_budgets_and_the_numba_kernels_give_the_same_tokens(models):
    assert_same_under_budgets_and_kernels(models(WIDE, "MXFP4_MOE"), prompt(20, seed=4), 24)


@pytest.mark.parametrize("n,start,n_cells,window", [(1, 40, 64, 0), (5, 0, 64, 16), (1, 100, 48, 16),
                                                    (7, 90, 40, 16), (3, 30, 64, 8)])
def test_attention_with_window_ring_and_sinks_matches_its_reference(n, start, n_cells, window):
    """The C and Numba kernels against the numpy reference, over plain caches and wrapped
    rings (position p in cell p % n_cells), with and without sinks."""
    rng = np.random.default_rng(n * 1000 + start)
    n_head, n_head_kv, hd = 4, 2, 32
    q = rng.standard_normal((n, n_head * hd)).astype(np.float32)
    k = rng.standard_normal((n_cells, n_head_kv * hd)).astype(np.float32)
    v = rng.standard_normal((n_cells, n_head_kv * hd)).astype(np.float32)
    for sinks in (None, (3 * rng.standard_normal(n_head)).astype(np.float32)):
        ref = attention_ref(q, k, v, start, n_head, n_head_kv, hd, window=window, sinks=sinks)
        ours = attention(q, k, v, start, n_head, n_head_kv, hd, window=window, sinks=sinks)
        np.testing.assert_array_equal(bits(ours), bits(ref))
        np.testing.assert_array_equal(bits(attention_numba(q, k, v, start, n_head, n_head_kv, hd, window=window,
                                                           sinks=sinks)), bits(ref))
    # a window or sinks change the result (the checks above could not pass by ignoring them)
    plain = attention_ref(q, k, v, start, n_head, n_head_kv, hd, window=0) if start + n <= n_cells else None
    if plain is not None and window:
        assert not np.array_equal(plain, ref)


def test_swiglu_oai_matches_ggml_on_every_path():
    rng = np.random.default_rng(0)
    g = (rng.standard_normal(1000) * 6).astype(np.float32)
    u = (rng.standard_normal(1000) * 6).astype(np.float32)
    g[:6] = [np.nan, np.inf, -np.inf, 7.0, -100.0, 0.0]
    u[:6] = [1.0, 2.0, np.inf, -np.inf, np.nan, 7.5]
    ref = ggml_math.swiglu_oai_ref(g, u)
    assert np.isnan(ref[0]) and np.isnan(ref[4])
    assert np.isclose(ref[1], 21.0, rtol=1e-4) and np.isclose(ref[3], -42.0, rtol=1e-4)  # clamped at 7 and -7
    np.testing.assert_array_equal(bits(ggml_math.swiglu_oai(g, u)), bits(ref))
    select_kernels("numba")
    try:
        np.testing.assert_array_equal(bits(ggml_math.swiglu_oai(g, u)), bits(ref))
    finally:
        select_kernels()


def test_inspect_shows_the_window_and_counts_parameters(models):
    import subprocess
    import sys

    from offload.summary import human_count, summarize

    c = SMALL
    path = models(c, "F32")
    g = GGUFFile(path)
    args = model_args(g)
    s = summarize(g, args, 64)
    q, kv = c.n_head * c.head_dim, c.n_head_kv * c.head_dim
    attn = 2 * q * c.n_embd + 2 * kv * c.n_embd + q + 2 * kv + c.n_embd + c.n_head  # + biases, sinks
    expert = 3 * c.n_ff * c.n_embd + 2 * c.n_ff + c.n_embd  # with its biases
    per_layer = 2 * c.n_embd + attn + c.n_expert * c.n_embd + c.n_expert  # norms, router and its bias
    base = 2 * args.n_vocab * c.n_embd + c.n_embd + c.n_layer * per_layer
    assert (s.params_total, s.params_active) == (base + c.n_layer * c.n_expert * expert,
                                                 base + c.n_layer * c.n_expert_used * expert)
    r = subprocess.run([sys.executable, "-m", "offload", "inspect", str(path)], capture_output=True, text=True,
                       timeout=120, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    assert "sliding window 16 on 1 of 2 layers (even), full on the others; a sink logit per head" in r.stdout
    assert f"{human_count(s.params_total)} total, {human_count(s.params_active)} active per token" in r.stdout


@pytest.mark.parametrize("ftype", ["MXFP4_MOE", "F32"])
def test_a_prompts_last_logits_are_llama_cpps_when_only_they_are_computed(models, ftype):
    """Generation asks llama.cpp for the last row only; gpt-oss's graph drops the other rows
    after the last layer (not after its attention, as the other archs' graphs do), so the
    last layer's matmuls see every row: the logits must still be its bits."""
    from offload.testing import llama_cpp_model

    path = models(WIDE if ftype == "MXFP4_MOE" else SMALL, ftype)
    ids = prompt(33, seed=7)
    llm = llama_cpp_model(path, n_ctx=256, logits_all=False)
    try:
        llm.eval(ids)
        ref = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).copy()
    finally:
        llm.close()
    with Model.load(path, n_ctx=256) as m:
        ours = m.transformer.forward(np.array(ids))[-1]
    np.testing.assert_array_equal(bits(ours), bits(ref))


def test_a_chat_that_edits_history_after_the_ring_wrapped_runs_it_again(models):
    """A conversation past the ring's 768 cells, then the same conversation with its first user
    message changed: the cache's common prefix is short, and the cells it would need next were
    overwritten by the ring, so the turn must run from the start (and reply as a fresh model)."""
    path = models(SMALL, "Q8_0")
    words = " ".join(f"w{i}" for i in range(130))  # ~420 tokens
    long_talk = [{"role": "user", "content": "hello " + words}, {"role": "assistant", "content": words},
                 {"role": "user", "content": "go on"}]
    edited = [dict(long_talk[0], content="HELLO " + words), *long_talk[1:]]
    greedy = dict(max_tokens=6, temperature=0.0, top_k=1)
    with Model.load(path, n_ctx=1024) as m:
        m.create_chat_completion(long_talk, **greedy)
        assert m.transformer.cache.n_past > 768  # the sliding layers' ring has wrapped
        again = m.create_chat_completion(edited, **greedy)["choices"][0]["message"]
        assert m.last_generation.cached_tokens == 0
    with Model.load(path, n_ctx=1024) as fresh:
        assert fresh.create_chat_completion(edited, **greedy)["choices"][0]["message"] == again
