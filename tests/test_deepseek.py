"""DeepSeek (llama.cpp's deepseek2 arch) against llama.cpp: tiny random-weight models of its
variants, MLA in the absorbed form llama.cpp runs (a cache of one latent and one RoPE key
per token), leading dense layers, shared experts:

- V2-Lite-like: a plain query, softmax routing, no YaRN;
- V3-like: a low-rank query (q_a, q_a_norm, q_b), sigmoid scores with a selection bias
  (exp_probs_b), group-limited choice, renormalized and scaled weights, YaRN with
  DeepSeek's log multiplier (which also scales the scores);
- legacy: a file converted before llama.cpp split attn_kv_b into k_b and v_b (no *_mla
  keys), which llama.cpp runs decompressed: per-head keys and values in the cache.

Logits per position and greedy tokens must be llama.cpp's to the bit, on F32, F16, Q8_0 and
a K-quant mix (whose short k_b/v_b rows fall back to Q5_0/Q8_0, as llama-quantize decides),
under tiered budgets with prefetch, on the Numba kernels, and with a decoding token as one C
call (kernels.step).
"""

from __future__ import annotations

import numpy as np
import pytest

from offload import Model
from offload.arch import model_args
from offload.gguf_file import GGUFFile
from offload.kernels import cext, step
from offload.kernels.attention import attention, attention_numba, attention_ref
from offload.sampling import SamplingParams
from offload.store.plan import make_plan
from offload.testing import TinyConfig, decode_path, llama_cpp_greedy, llama_cpp_logits, llama_cpp_model, write_model
from offload.testing import float_bits as bits
from offload.testing import random_prompt as prompt

from invariance import assert_same_under_budgets_and_kernels

_BASE = dict(arch="deepseek2", n_layer=3, n_embd=64, n_head=4, n_head_kv=1, head_dim=48, n_ff=32, n_expert=16,
             n_expert_used=4, kv_lora_rank=32, rope_dim=16, v_head_dim=32, n_dense_lead=1, n_ff_dense=96,
             yarn_factor=0.0)
LITE = TinyConfig(**_BASE)
V3 = TinyConfig(**{**_BASE, "q_lora_rank": 64, "gating": "sigmoid", "selection_bias": True, "expert_groups": 4,
                   "expert_groups_used": 2, "weights_norm": True, "weights_scale": 2.5, "yarn_factor": 40.0,
                   "yarn_orig_ctx": 64, "yarn_log_mul": 0.1, "n_expert_shared": 2})
LEGACY = TinyConfig(**{**_BASE, "mla_legacy": True, "n_head_kv": 4, "q_lora_rank": 64, "yarn_factor": 40.0,
                       "yarn_orig_ctx": 64, "yarn_log_mul": 0.1})
# rows of 256 where llama-quantize keeps K-quants
WIDE = TinyConfig(**{**_BASE, "n_embd": 256, "n_ff": 256, "n_ff_dense": 256, "kv_lora_rank": 256, "head_dim": 96,
                     "rope_dim": 32, "v_head_dim": 64, "n_expert": 8, "q_lora_rank": 256, "gating": "sigmoid",
                     "selection_bias": True, "weights_norm": True, "weights_scale": 2.5})


@pytest.fixture(scope="module")
def models(quantized_factory):
    """(config, file type) -> path (see conftest.quantized_factory)."""
    return lambda config, ftype: quantized_factory(config, ftype, seed=5)


@pytest.mark.parametrize("config,ftype", [(LITE, "F32"), (LITE, "Q8_0"), (V3, "F32"), (V3, "F16"), (V3, "Q8_0"),
                                          (WIDE, "Q4_K_M"), (LEGACY, "F32"), (LEGACY, "Q8_0")])
def test_logits_are_llama_cpps_to_the_bit(models, config, ftype):
    path = models(config, ftype)
    ids = prompt(30)
    with Model.load(path, n_ctx=256) as m:
        assert m.args.attention == ("mla_decompressed" if config.mla_legacy else "mla")
        ours = m.logits(ids)
    ref = llama_cpp_logits(path, ids, n_ctx=256)
    np.testing.assert_array_equal(bits(ours), bits(ref))


@pytest.mark.skipif(not cext.has_step(), reason="C extension not built")
@pytest.mark.parametrize("config,ftype,cache", [(LITE, "Q8_0", "f16"), (V3, "Q8_0", "f16"), (V3, "Q8_0", "f32"),
                                                (WIDE, "Q4_K_M", "f16")])
def test_a_decoding_token_is_one_c_call_with_llama_cpps_logits(models, config, ftype, cache):
    """MLA in the one-call decode step (kernels.step; cext/layer.c's latent phases, step.c's
    routing with V3's sigmoid scores, selection bias, groups and scale): nothing refuses the
    model, every decoded token runs as DecodeStep.run and nothing per layer (no kernels.moe
    call, which the per-layer path makes in every MoE layer), and the logits before each
    greedy token are llama.cpp's to the bit (fed the same tokens one at a time)."""
    path = models(config, ftype)
    ids, n = prompt(12, seed=3), 16
    with decode_path("step") as ran, Model.load(path, n_ctx=256, cache_type_k=cache, cache_type_v=cache) as m:
        t = m.transformer
        assert step.why_not(t) is None
        logits = [t.forward(np.array(ids))[-1].copy()]
        tokens = [int(np.argmax(logits[-1]))]
        for i in range(n - 1):
            ran.clear()
            logits.append(t.forward(np.array(tokens[-1:]))[-1].copy())
            tokens.append(int(np.argmax(logits[-1])))
            assert ran == {"step"}, f"decode step {i} ran {ran or 'per op'}"
    llm = llama_cpp_model(path, n_ctx=256, logits_all=False, type_k=cache, type_v=cache)
    try:
        llm.eval(ids)
        ref = []
        for token in tokens:
            ref.append(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).copy())
            llm.eval([token])
    finally:
        llm.close()
    for i, (ours, theirs) in enumerate(zip(logits, ref)):
        np.testing.assert_array_equal(bits(ours), bits(theirs), err_msg=f"decode step {i}")


def test_model_args_follow_llama_cpp_conventions(models):
    lite = model_args(GGUFFile(models(LITE, "F32")))
    assert (lite.attention, lite.q_lora_rank, lite.kv_lora_rank, lite.head_dim, lite.rope_dim, lite.v_head_dim) == \
        ("mla", 0, 32, 48, 16, 32)
    assert lite.routing == "softmax_topk" and lite.rope_style == "normal" and lite.n_dense_lead == 1
    assert lite.shared_expert and not lite.expert_selection_bias and lite.yarn is None
    v3 = model_args(GGUFFile(models(V3, "F32")))
    assert v3.routing == "sigmoid_topk_norm" and v3.expert_selection_bias and v3.q_lora_rank == 64
    assert (v3.expert_groups, v3.expert_groups_used, v3.expert_weights_scale) == (4, 2, 2.5)
    assert v3.yarn is not None and v3.yarn.factor == 40.0 and v3.yarn.log_mul == pytest.approx(1.0)


@pytest.mark.parametrize("config", [LITE, V3, LEGACY])
def test_greedy_decode_matches_llama_cpp(models, config):
    path = models(config, "Q8_0")
    ids = prompt(10, seed=1)
    with Model.load(path, n_ctx=256) as m:
        ours = list(m.generate_tokens(ids, 40, SamplingParams(temperature=0.0)))
    ref = llama_cpp_greedy(path, ids, 40, n_ctx=256)
    assert len(ref) >= 30, "llama.cpp stopped early: the check would be weak"
    assert ours == ref


def test_the_cache_holds_the_latent_and_one_rope_key_per_token(models):
    """MLA's promise: kv_lora_rank + rope_dim values per token and layer (V3: 576), where
    the decompressed form of the same heads (a legacy file) holds n_head * (head_dim +
    v_head_dim); the memory plan counts what the cache allocates, in its type (F16: 2 bytes)."""
    from offload.store.plan import kv_cache_bytes

    for c, per_token_layer in ((V3, (V3.kv_lora_rank + V3.rope_dim) * 2),
                               (LEGACY, LEGACY.n_head * (LEGACY.head_dim + LEGACY.v_head_dim) * 2)):
        with Model.load(models(c, "F32"), n_ctx=128, cache_type_k="f16", cache_type_v="f16") as m:
            assert m.transformer.cache.nbytes == 128 * c.n_layer * per_token_layer
            planned = kv_cache_bytes(m.args, 128, "f16", "f16")
            assert planned == m.transformer.cache.nbytes == m.stats()["kv_cache_bytes"]
    assert (V3.kv_lora_rank + V3.rope_dim) < LEGACY.n_head * (LEGACY.head_dim + LEGACY.v_head_dim) / 4


def test_tiered_budgets_and_the_numba_kernels_give_the_same_tokens(models):
    assert_same_under_budgets_and_kernels(models(V3, "Q8_0"), prompt(16, seed=2), 20)


@pytest.mark.parametrize("n,start", [(1, 40), (6, 0), (3, 20)])
def test_latent_attention_kernel_matches_its_reference(n, start):
    """One KV head of width r + rope whose first r floats are the values, a given scale:
    the C and Numba kernels against the numpy reference."""
    rng = np.random.default_rng(n + start)
    n_head, r, rope = 4, 32, 16
    q = rng.standard_normal((n, n_head * (r + rope))).astype(np.float32)
    k = rng.standard_normal((64, r + rope)).astype(np.float32)
    scale = np.float32(0.0873)
    ref = attention_ref(q, k, None, start, n_head, 1, r + rope, v_dim=r, scale=scale)
    assert ref.shape == (n, n_head * r)
    np.testing.assert_array_equal(bits(attention(q, k, None, start, n_head, 1, r + rope, v_dim=r, scale=scale)), bits(ref))
    np.testing.assert_array_equal(bits(attention_numba(q, k, None, start, n_head, 1, r + rope, v_dim=r, scale=scale)),
                                  bits(ref))


def test_groups_that_do_not_divide_the_experts_are_refused_in_one_line(tmp_path):
    import subprocess
    import sys

    path = write_model(tmp_path / "bad.gguf", TinyConfig(**{**_BASE, "expert_groups": 3, "expert_groups_used": 2}))
    r = subprocess.run([sys.executable, "-m", "offload", "inspect", str(path)], capture_output=True, text=True,
                       timeout=120, stdin=subprocess.DEVNULL)
    assert r.returncode != 0
    assert "groups" in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_inspect_plans_a_deepseek_sized_file_it_could_not_hold(tmp_path):
    """A V2-Lite-sized file (real metadata and tensor table, its data a sparse hole): the plan
    for a 4 GB budget keeps the attention and shared parts resident, caches some experts,
    and says what a token reads from disk and the speed the disk allows."""
    import subprocess
    import sys

    from offload.testing import deepseek_table

    path = deepseek_table(tmp_path / "v2-lite.gguf", "V2-Lite")
    r = subprocess.run([sys.executable, "-m", "offload", "inspect", str(path), "--memory-budget", "4GB",
                        "--disk-bandwidth", "2GB"], capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "architecture  deepseek2 (MoE)" in out and "experts       64 per layer, 6 used per token" in out
    assert "cold experts are read from the file on demand" in out
    g = GGUFFile(path)
    p = make_plan(g, model_args(g), 4096, 4 * 10**9)
    per_token = p.expert_bytes_per_token
    gate_up = 2 * 1408 * (2048 // 256) * 144  # Q4_K rows of 2048: 144 bytes per 256
    down = 2048 * (1408 // 32) * 34  # Q8_0 rows of 1408 (not a multiple of 256): 34 bytes per 32
    assert per_token == 26 * 6 * (gate_up + down)  # 26 MoE layers (one dense lead), top-6
    # MLA: the latent and one rope key per token and layer (F16: the default cache type)
    assert p.kv_cache == 27 * 4096 * (512 + 64) * 2
    assert f"at most {2e9 / (0.5 * per_token):.1f} / {2e9 / (0.2 * per_token):.1f} / {2e9 / (0.05 * per_token):.1f} tok/s at 2.0 GB/s" in out
    bad = subprocess.run([sys.executable, "-m", "offload", "inspect", str(path), "--disk-bandwidth", "fast"],
                         capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "--disk-bandwidth" in bad.stderr
