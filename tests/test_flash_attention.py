"""Flash attention (-fa on, cext/flash.c) against llama.cpp run with flash_attn=True and the
same cache types: prompt logits and every decode step's logits equal to the bit, through each
of its three kernels (one chunk: short prompts, decodes, quantized caches; tiled: 64+ new
tokens over F16 keys and values; split: a decoding token over a KV view of 512+ cells), with
sinks and sliding windows (gpt-oss-like), DeepSeek's MLA, quantized V caches and their Hadamard
rotation.
"""

from __future__ import annotations

import numpy as np
import pytest

from offload import Model
from offload.errors import OffloadError
from offload.testing import TinyConfig, greedy_steps, llama_cpp_greedy, llama_cpp_logits, llama_cpp_model, random_prompt

N_CTX = 1024

MODELS = {
    "llama": TinyConfig(n_layer=2, n_embd=128, n_head=4, n_head_kv=2, head_dim=32, n_ff=64, n_expert=4,
                        n_expert_used=2, n_ctx=N_CTX),
    # heads of 128: llama.cpp rotates keys (128) and values (64) before quantized caches store them
    "llama-hd128": TinyConfig(n_layer=2, n_embd=128, n_head=2, n_head_kv=1, head_dim=128, n_ff=64, n_expert=4,
                              n_expert_used=2, n_ctx=N_CTX),
    # MLA: the cache's latent (64) and RoPE key (32), the latent as the values; v_b after
    "deepseek2": TinyConfig(arch="deepseek2", n_layer=2, n_embd=64, n_head=4, n_head_kv=1, head_dim=64, n_ff=32,
                            n_expert=8, n_expert_used=2, kv_lora_rank=64, rope_dim=32, v_head_dim=32, n_dense_lead=1,
                            n_ff_dense=96, yarn_factor=0.0, n_ctx=N_CTX),
    # an older DeepSeek file (one attn_kv_b): llama.cpp's flash attention asserts on its heads
    "deepseek2-legacy": TinyConfig(arch="deepseek2", n_layer=2, n_embd=64, n_head=4, n_head_kv=1, head_dim=64,
                                   n_ff=32, n_expert=8, n_expert_used=2, kv_lora_rank=64, rope_dim=32, v_head_dim=32,
                                   n_dense_lead=1, n_ff_dense=96, yarn_factor=0.0, n_ctx=N_CTX, mla_legacy=True),
    # sinks, a window of 16 on the even layers
    "gpt-oss": TinyConfig(arch="gpt-oss", n_layer=2, n_embd=64, n_head=4, n_head_kv=2, head_dim=32, n_ff=64,
                          n_expert=8, n_expert_used=4, sliding_window=16, n_ctx=N_CTX),
}

# (model, -ctk, -ctv, prompt tokens): under 64 new tokens, or K and V not both F16 (F32 is
# cast to F16), llama.cpp runs its one-chunk kernel; 64+ over F16 ones, its tiled kernel.
# MLA keeps one cache (the values are its rows' first kv_lora_rank values), not rotated.
PROMPTS = [("llama", "f16", "f16", 40), ("llama", "f16", "f16", 100), ("llama", "f32", "f32", 100),
           ("llama", "q8_0", "q8_0", 40), ("llama", "q4_0", "q4_1", 100), ("llama", "q5_0", "q5_1", 40),
           ("llama", "iq4_nl", "q4_0", 100), ("llama", "f16", "q8_0", 100), ("llama-hd128", "q8_0", "q8_0", 40),
           ("gpt-oss", "f16", "f16", 40), ("gpt-oss", "f16", "f16", 100), ("gpt-oss", "q8_0", "q8_0", 40),
           ("llama", "bf16", "bf16", 40), ("llama", "bf16", "f16", 100), ("llama", "q8_0", "bf16", 100),
           ("deepseek2", "f16", "f16", 40), ("deepseek2", "f32", "f32", 100), ("deepseek2", "q8_0", "q8_0", 40),
           ("deepseek2", "bf16", "bf16", 100)]


@pytest.fixture(scope="module")
def paths(model_factory):
    return {name: model_factory(config, "F32", 3) for name, config in MODELS.items()}


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


@pytest.mark.parametrize("name,type_k,type_v,n", PROMPTS)
def test_prompt_logits_equal_llama_cpp(paths, name, type_k, type_v, n):
    prompt = random_prompt(n, seed=5)
    with Model.load(paths[name], n_ctx=N_CTX, n_threads=2, cache_type_k=type_k, cache_type_v=type_v,
                    flash_attn="on") as m:
        assert m.transformer.cache.flash_attn
        ours = m.logits(prompt)
    ref = llama_cpp_logits(paths[name], prompt, n_ctx=N_CTX, type_k=type_k, type_v=type_v, flash_attn=True)
    assert np.array_equal(bits(ours), bits(ref)), f"max |diff| {np.abs(ours - ref).max():.3g}"


# (model, -ctk, -ctv, prompt tokens, decode steps): a prompt of 300 puts the decode's KV view
# at 512 cells, where llama.cpp splits it among its 2 threads
DECODES = [("llama", "f16", "f16", 300, 12), ("llama", "q8_0", "q8_0", 40, 24), ("gpt-oss", "f16", "f16", 40, 24),
           ("deepseek2", "f16", "f16", 300, 8)]


@pytest.mark.parametrize("name,type_k,type_v,n,steps", DECODES)
def test_decode_steps_equal_llama_cpp(paths, name, type_k, type_v, n, steps):
    prompt = random_prompt(n, seed=6)
    cache = dict(type_k=type_k, type_v=type_v, flash_attn=True)
    with Model.load(paths[name], n_ctx=N_CTX, n_threads=2, cache_type_k=type_k, cache_type_v=type_v,
                    flash_attn="on") as m:
        tokens, logits = greedy_steps(m.transformer, prompt, steps)
    ref_tokens = llama_cpp_greedy(paths[name], prompt, steps, n_ctx=N_CTX, **cache)
    llm = llama_cpp_model(paths[name], n_ctx=N_CTX, logits_all=False, **cache)
    try:
        llm.eval(prompt)
        for i, token in enumerate(ref_tokens):
            ref = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
            diff = np.abs(logits[i] - ref).max()
            assert np.array_equal(bits(logits[i]), bits(ref)), f"step {i}: max |diff| {diff:.3g}"
            llm.eval([token])
    finally:
        llm.close()
    assert tokens[:len(ref_tokens)] == ref_tokens


def test_flash_attention_changes_the_logits(paths):
    """A check that cannot fail is no check: its sums (online softmax, F16 accumulation) are not
    the ones without it."""
    prompt = random_prompt(40, seed=5)
    logits = {}
    for mode in ("on", "off"):
        with Model.load(paths["llama"], n_ctx=N_CTX, flash_attn=mode) as m:
            logits[mode] = m.logits(prompt)
    assert not np.array_equal(logits["on"], logits["off"])


def test_auto_is_on_for_a_quantized_v_cache_only(paths):
    for type_v, wanted in (("f16", False), ("q8_0", True)):
        with Model.load(paths["llama"], n_ctx=256, cache_type_v=type_v) as m:
            assert m.transformer.cache.flash_attn is wanted


@pytest.mark.parametrize("options,message", [
    (dict(cache_type_v="q8_0", flash_attn="off"), "needs flash attention"),
    (dict(flash_attn="on", model="deepseek2-legacy"), "decompressed heads"),
    (dict(flash_attn="sometimes"), "takes on, off or auto"),
])
def test_refused_in_one_line(paths, options, message):
    name = options.pop("model", "llama")
    with pytest.raises(OffloadError, match=message) as e:
        Model.load(paths[name], n_ctx=256, **options)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("type_k,type_v,start,n", [("f16", "f16", 0, 80), ("f16", "f16", 600, 1), ("f32", "f16", 5, 10),
                                                    ("q8_0", "q4_1", 30, 3), ("f16", "iq4_nl", 0, 70),
                                                    ("bf16", "bf16", 3, 20)])
def test_simd_levels_give_the_same_bits(type_k, type_v, start, n):
    """The kernels' AVX2 loops against their plain C, on each of the three kernels (tiled: 70-80
    new tokens over F16; split: one token over 601 cells; one chunk: the rest)."""
    from offload.cache_types import cache_format, encode_rows
    from offload.kernels import cext
    from offload.kernels.attention import flash_attention

    levels = cext.levels()
    if len(levels) < 2:
        pytest.skip("one SIMD level on this machine")
    rng = np.random.default_rng(start + n)
    n_head, n_head_kv, hd, n_cells = 4, 2, 64, 1024
    k_fmt, v_fmt = cache_format(type_k), cache_format(type_v)
    k = encode_rows(k_fmt, (rng.standard_normal((n_cells, n_head_kv * hd)) * 2).astype(np.float32))
    v = encode_rows(v_fmt, rng.standard_normal((n_cells, n_head_kv * hd)).astype(np.float32))
    q = (rng.standard_normal((n, n_head * hd)) * 2).astype(np.float32)
    sinks = rng.standard_normal(n_head).astype(np.float32)
    out = {}
    try:
        for level in levels:
            cext.set_isa(level)
            out[level] = flash_attention(q, k, k_fmt, v, v_fmt, start, n_head, n_head_kv, hd, sinks=sinks, n_chunks=2)
    finally:
        cext.set_isa(None)
    assert np.isfinite(out[levels[0]]).all()
    for level in levels[1:]:
        assert np.array_equal(bits(out[level]), bits(out[levels[0]])), level
