"""KV cache types (offload.cache_types) against llama.cpp with the same -ctk / -ctv, flash
attention off (tests/test_flash_attention.py: on): per-position logits of a prompt and a greedy decode past 64 tokens, equal to
the bit, on a llama-like, a gpt-oss-like (sinks, sliding window ring) and a DeepSeek (MLA:
one latent row per token, K and V one cache) tiny model.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType

from offload import Model
from offload.cache_types import cache_format, encode_rows
from offload.errors import OffloadError
from offload.kernels.formats import quantize_q8_0_ref
from offload.sampling import SamplingParams
from offload.store.plan import kv_bytes_per_cell
from offload.testing import (TinyConfig, decode_path, ggml_quantize, llama_cpp_greedy, llama_cpp_logits, random_prompt,
                             ran_as_asked)

N_CTX = 256
N_DECODE = 30  # after a prompt of 40: positions past 64

MODELS = {
    # head_dim 32 (a Q8_0 / Q4_0 block per head), GQA 2:1
    "llama": TinyConfig(n_layer=2, n_embd=128, n_head=4, n_head_kv=2, head_dim=32, n_ff=64, n_expert=4,
                        n_expert_used=2, n_ctx=N_CTX),
    # sinks, a window of 16 on the even layers, YaRN
    "gpt-oss": TinyConfig(arch="gpt-oss", n_layer=2, n_embd=64, n_head=4, n_head_kv=2, head_dim=32, n_ff=64,
                          n_expert=8, n_expert_used=4, sliding_window=16, n_ctx=N_CTX),
    # heads of 128 and 64: llama.cpp rotates queries and keys (Hadamard) before a quantized K cache
    "llama-hd128": TinyConfig(n_layer=2, n_embd=128, n_head=2, n_head_kv=1, head_dim=128, n_ff=64, n_expert=4,
                              n_expert_used=2, n_ctx=N_CTX),
    "gpt-oss-hd64": TinyConfig(arch="gpt-oss", n_layer=2, n_embd=64, n_head=4, n_head_kv=2, head_dim=64, n_ff=64,
                               n_expert=8, n_expert_used=4, sliding_window=16, n_ctx=N_CTX),
    # MLA: kv_lora_rank 32 + rope 16 per token
    "deepseek2": TinyConfig(arch="deepseek2", n_layer=2, n_embd=64, n_head=4, n_head_kv=1, head_dim=48, n_ff=32,
                            n_expert=8, n_expert_used=2, kv_lora_rank=32, rope_dim=16, v_head_dim=32, n_dense_lead=1,
                            n_ff_dense=96, yarn_factor=0.0, n_ctx=N_CTX),
}
CASES = [("llama", k, v) for k, v in [("f16", "f16"), ("bf16", "bf16"), ("f32", "f16"), ("q8_0", "f16"),
                                      ("q4_0", "f32"), ("q4_1", "f16"), ("q5_0", "bf16"), ("q5_1", "f16"),
                                      ("iq4_nl", "f16")]] + \
        [("gpt-oss", "f16", "f16"), ("gpt-oss", "q8_0", "bf16"), ("deepseek2", "f16", "f16"),
         ("deepseek2", "bf16", "bf16"), ("llama-hd128", "q4_0", "f16"), ("llama-hd128", "iq4_nl", "f32"),
         ("gpt-oss-hd64", "q8_0", "f16")]


@pytest.fixture(scope="module")
def paths(model_factory):
    return {name: model_factory(config, "F32", 3) for name, config in MODELS.items()}


@pytest.mark.parametrize("name,type_k,type_v", CASES)
def test_prompt_logits_and_greedy_decode_equal_llama_cpp(paths, name, type_k, type_v):
    path = paths[name]
    prompt = random_prompt(40, seed=5)
    with Model.load(path, n_ctx=N_CTX, cache_type_k=type_k, cache_type_v=type_v) as m:
        assert m.transformer.cache.type_k == type_k
        ours = m.logits(prompt)
        tokens = list(m.generate_tokens(prompt, N_DECODE, SamplingParams(temperature=0.0)))
    ref = llama_cpp_logits(path, prompt, n_ctx=N_CTX, type_k=type_k, type_v=type_v)
    assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32)), f"max |diff| {np.abs(ours - ref).max():.3g}"
    ref_tokens = llama_cpp_greedy(path, prompt, N_DECODE, n_ctx=N_CTX, type_k=type_k, type_v=type_v)
    assert len(ref_tokens) == N_DECODE
    assert tokens == ref_tokens


def test_the_cache_type_changes_the_logits(paths):
    """A check that cannot fail is no check: F16 keys and values do round the logits."""
    prompt = random_prompt(40, seed=5)
    with Model.load(paths["llama"], n_ctx=N_CTX, cache_type_k="f32", cache_type_v="f32") as m:
        f32 = m.logits(prompt)
    with Model.load(paths["llama"], n_ctx=N_CTX, cache_type_k="q8_0", cache_type_v="f16") as m:
        q8 = m.logits(prompt)
    assert not np.array_equal(f32, q8)


def test_quantized_keys_are_rotated_as_llama_cpp_rotates_them(paths):
    """The Hadamard rotation (attn_rot_k) of heads whose size 64 divides: ggml's fast transform
    is the normalized Sylvester matrix; without it the logits differ from the rotated ones."""
    from offload.kernels.ggml_math import hadamard_rows

    x = np.random.default_rng(1).standard_normal((3, 256)).astype(np.float32)
    h = np.ones((1, 1))
    while len(h) < 128:
        h = np.block([[h, h], [h, -h]])
    want = (x.reshape(-1, 128).astype(np.float64) @ h.T / np.sqrt(128)).reshape(x.shape)
    assert np.allclose(hadamard_rows(x, 128), want, atol=1e-5)
    with Model.load(paths["llama-hd128"], n_ctx=N_CTX, cache_type_k="q8_0", cache_type_v="f16") as m:
        assert m.transformer.cache.k_rotation == 128
        rotated = m.logits(random_prompt(20, seed=2))
        m.transformer.cache.k_rotation = 0
        plain = m.logits(random_prompt(20, seed=2))
    assert not np.array_equal(rotated, plain)


def test_rows_are_stored_as_ggml_converts_them():
    x = np.random.default_rng(0).standard_normal((5, 64)).astype(np.float32) * 3
    assert np.array_equal(encode_rows(cache_format("f16"), x).view(np.float16).astype(np.float32),
                          x.astype(np.float16).astype(np.float32))
    # Q4_0, Q4_1, Q5_0, Q5_1: set_rows's from_float is quantize_row_q*_ref, the quantizer's own
    for name in ("q4_0", "q4_1", "q5_0", "q5_1"):
        got = encode_rows(cache_format(name), x)
        assert np.array_equal(got, ggml_quantize(x, GGMLQuantizationType[name.upper()])), name
    # Q8_0: the x86 quantize_row_q8_0 (ties to even, unlike the reference), as activations are
    qs, d = quantize_q8_0_ref(x)
    blocks = encode_rows(cache_format("q8_0"), x).view(cache_format("q8_0").layout)
    assert np.array_equal(blocks["qs"].reshape(5, -1), qs) and np.array_equal(blocks["d"].astype(np.float32), d)


def test_iq4_nl_rows_are_ggml_s_reference_quantizer_s():
    """set_rows's from_float for IQ4_NL is quantize_row_iq4_nl_ref (no scale search, unlike the
    file quantizer's quantize_iq4_nl): its bytes, from libggml-base itself, for rows of many
    scales, with repeated magnitudes (the first one wins) and values on the table's midpoints."""
    import ctypes

    from offload.testing import _ggml_lib

    ref = _ggml_lib("ggml-base").quantize_row_iq4_nl_ref
    ref.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    rng = np.random.default_rng(4)
    x = rng.standard_normal((64, 128)).astype(np.float32) * np.exp(rng.uniform(-8, 8, (64, 1))).astype(np.float32)
    x[1, :32] = np.float32(2.5) * np.sign(rng.standard_normal(32)).astype(np.float32)
    x[2, 32:64] = (np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113] * 2,
                            dtype=np.float32) + np.float32(0.5)) / np.float32(-127 / 113)
    x[3, 64:96] = np.float32(-3.0)
    fmt = cache_format("iq4_nl")
    got = encode_rows(fmt, x)
    want = np.zeros_like(got)
    for row in range(len(x)):
        ref(x[row].ctypes.data, want[row].ctypes.data, x.shape[1])
    assert np.array_equal(got, want)
    # a block too small to scale gets d = 0 (ggml leaves its codes as whatever its buffer held)
    tiny = np.full((1, 32), 1e-20, dtype=np.float32)
    assert encode_rows(fmt, tiny).view(fmt.layout)["d"].astype(np.float32).item() == 0.0


@pytest.mark.parametrize("type_k,type_v,flash_attn,message", [
    ("f16", "q8_0", "off", "needs flash attention"),  # (tests/test_flash_attention.py: with it)
    ("q3_k", "f16", "auto", "unknown KV cache type"),
])
def test_refused_in_one_line(paths, type_k, type_v, flash_attn, message):
    with pytest.raises(OffloadError, match=message) as e:
        Model.load(paths["llama"], n_ctx=N_CTX, cache_type_k=type_k, cache_type_v=type_v, flash_attn=flash_attn)
    assert "\n" not in str(e.value)


def test_mla_needs_one_type_for_k_and_v(paths):
    with pytest.raises(OffloadError, match="must be the same type"):
        Model.load(paths["deepseek2"], n_ctx=N_CTX, cache_type_k="f16", cache_type_v="f32")


def test_bytes_per_token_by_type():
    """The memory plan counts a position's key and value rows in their types."""
    class Shape:  # the two ModelArgs fields the count reads
        kv_dim, v_cache_dim = 1024, 1024
    assert kv_bytes_per_cell(Shape, "f32", "f32") == 8192
    assert kv_bytes_per_cell(Shape, "f16", "f16") == 4096
    assert kv_bytes_per_cell(Shape, "q8_0", "f16") == 1088 + 2048
    assert kv_bytes_per_cell(Shape, "q4_0", "bf16") == 576 + 2048


def test_cli_takes_cache_types_and_inspect_shows_bytes_per_token(paths):
    from click.testing import CliRunner

    from offload.cli import main

    run = CliRunner().invoke
    shown = run(main, ["inspect", str(paths["llama"]), "-c", "256", "-ctk", "q8_0", "-ctv", "f16"])
    assert shown.exit_code == 0, shown.output
    # 2 layers x (64 keys in Q8_0: 68 B + 64 values in F16: 128 B)
    assert "K q8_0, V f16: 392 B per token" in shown.output
    refused = run(main, ["generate", str(paths["llama"]), "-n", "1", "-ctv", "q4_0", "-fa", "off"])
    assert refused.exit_code == 1 and "needs flash attention" in refused.stderr
    flash = run(main, ["generate", str(paths["llama"]), "-n", "2", "--temp", "0", "-ctv", "q4_0"])  # -fa auto: on
    assert flash.exit_code == 0, flash.output
    ran = run(main, ["generate", str(paths["llama"]), "-n", "2", "--temp", "0", "--cache-type-k", "bf16"])
    assert ran.exit_code == 0, ran.output


@pytest.mark.parametrize("kind", ["step", "layer"])
@pytest.mark.parametrize("type_k,type_v", [("f16", "f16"), ("f32", "f16"), ("f16", "f32")])
def test_fused_decode_on_an_f16_cache_equals_llama_cpp(model_factory, type_k, type_v, kind):
    """Q8_0 weights: a decoding token runs in one C call (kernels.step), or its attention
    block does (kernels.block); either writes and reads the F16 rows itself."""
    path = model_factory(MODELS["llama"], "Q8_0", 3)
    prompt = random_prompt(40, seed=6)
    with decode_path(kind) as ran, Model.load(path, n_ctx=N_CTX, cache_type_k=type_k, cache_type_v=type_v) as m:
        tokens = list(m.generate_tokens(prompt, N_DECODE, SamplingParams(temperature=0.0)))
    assert ran_as_asked(kind, ran), ran
    assert tokens == llama_cpp_greedy(path, prompt, N_DECODE, n_ctx=N_CTX, type_k=type_k, type_v=type_v)


@pytest.mark.parametrize("n,head_dim,window,sinks", [(1, 32, 0, False), (5, 32, 0, True), (3, 48, 0, False),
                                                     (4, 20, 0, False), (1, 20, 6, True), (6, 64, 8, False)])
def test_c_attention_on_f16_rows_equals_its_reference(n, head_dim, window, sinks):
    """cext/attention.c and its Numba twin over F16 rows, against attention_typed's matmul path
    (same bits), including head sizes that take vec_dot_f16's tail (48) or no tinyBLAS (20),
    a ring of cells and sinks."""
    from offload.kernels import cext
    from offload.kernels.attention import attention_numba, attention_typed

    if not cext.selected():
        pytest.skip("the C extension is not built")
    rng = np.random.default_rng(n * head_dim)
    n_head, n_head_kv, n_cells = 4, 2, 24 if window else 64
    start = 30 if window else 17
    f16 = cache_format("f16")
    k = encode_rows(f16, rng.standard_normal((n_cells, n_head_kv * head_dim)).astype(np.float32))
    v = encode_rows(f16, rng.standard_normal((n_cells, n_head_kv * head_dim)).astype(np.float32))
    q = rng.standard_normal((n, n_head * head_dim)).astype(np.float32)
    s = rng.standard_normal(n_head).astype(np.float32) if sinks else None
    k32 = k.view(np.float16).astype(np.float32)
    for k_fmt, v_fmt, kk, vv in ((f16, f16, k, v), (cache_format("f32"), f16, k32, v)):
        args = (q, kk, k_fmt, vv, v_fmt, start, n_head, n_head_kv, head_dim, window, s)
        fast, ref = attention_typed(*args), attention_typed(*args, compiled=False)
        assert np.array_equal(fast.view(np.uint32), ref.view(np.uint32)), np.abs(fast - ref).max()
        halves = [r.view(np.float16) if f.name == "F16" else r for r, f in ((kk, k_fmt), (vv, v_fmt))]
        numba = attention_numba(q, *halves, start, n_head, n_head_kv, head_dim, None, window, s)
        assert np.array_equal(numba.view(np.uint32), ref.view(np.uint32)), np.abs(numba - ref).max()


# -- saved sessions ----------------------------------------------------------------------

@pytest.mark.parametrize("name,type_k,type_v", [("llama", "f16", "f16"), ("gpt-oss", "q8_0", "f32"),
                                                ("deepseek2", "f16", "f16")])
def test_a_saved_and_reloaded_session_continues_with_the_same_tokens(paths, tmp_path, name, type_k, type_v):
    path, prompt, first, then = paths[name], random_prompt(30, seed=8), 12, 20
    greedy = SamplingParams(temperature=0.0)
    load = dict(n_ctx=N_CTX, cache_type_k=type_k, cache_type_v=type_v)
    with Model.load(path, **load) as m:
        uninterrupted = list(m.generate_tokens(prompt, first + then, greedy))
    with Model.load(path, **load) as m:
        head = list(m.generate_tokens(prompt, first, greedy))
        m.save_state(tmp_path / "s.npz", extra={"note": "x"})
    assert head == uninterrupted[:first]
    with Model.load(path, **load) as m:
        held = m.load_state(tmp_path / "s.npz")
        assert held == prompt + head[:-1] and m.loaded_state_extra == {"note": "x"}
        assert m.transformer.cache.n_past == len(held)
        tail = list(m.generate_tokens(prompt + head, then, greedy, reuse_cache=True))
        assert m.last_generation.cached_tokens == len(held)  # only the last token ran
    assert tail == uninterrupted[first:]


def test_a_state_from_another_model_cache_type_or_damaged_is_refused(paths, tmp_path):
    from offload.session import StateError

    saved = tmp_path / "s.npz"
    f16 = dict(cache_type_k="f16", cache_type_v="f16")
    with Model.load(paths["llama"], n_ctx=N_CTX, **f16) as m:
        list(m.generate_tokens(random_prompt(10, seed=1), 3, SamplingParams(temperature=0.0)))
        m.save_state(saved)
    assert not [p for p in tmp_path.iterdir() if p.name != "s.npz"]  # the temporary file was renamed
    with Model.load(paths["llama"], n_ctx=N_CTX, cache_type_k="f32") as m, pytest.raises(StateError, match="cache types"):
        m.load_state(saved)
    with Model.load(paths["gpt-oss"], n_ctx=N_CTX, **f16) as m, pytest.raises(StateError, match="another model"):
        m.load_state(saved)
    with Model.load(paths["llama"], n_ctx=2 * N_CTX, **f16) as m, pytest.raises(StateError, match="context size"):
        m.load_state(saved)
    data = bytearray(saved.read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "bad.npz").write_bytes(bytes(data))
    (tmp_path / "short.npz").write_bytes(bytes(data[: len(data) // 3]))
    with Model.load(paths["llama"], n_ctx=N_CTX, **f16) as m:
        for bad in ("bad.npz", "short.npz"):
            with pytest.raises(StateError) as e:
                m.load_state(tmp_path / bad)
            assert "\n" not in str(e.value)
        assert m.transformer.cache.n_past == 0


def test_chat_save_and_load_continue_the_conversation(paths, tmp_path):
    """ChatSession.save (chat's /save) keeps the KV cache beside the transcript; load (/load)
    restores both, and the next reply is the one the uninterrupted conversation gives, with
    the conversation taken from the cache instead of run again."""
    from offload.chat import ChatSession
    from test_chat import CHATML

    def session(m):
        return ChatSession(model=m, template=m.chat_template, params=SamplingParams(temperature=0.0), max_tokens=6)

    def reply(s, text):
        return "".join(d.text for d in s.send(text))

    load = dict(n_ctx=N_CTX, chat_template=CHATML)
    with Model.load(paths["llama"], **load) as m:
        s = session(m)
        reply(s, "Hello there")
        uninterrupted = reply(s, "Tell me more")
    with Model.load(paths["llama"], **load) as m:
        s = session(m)
        reply(s, "Hello there")
        s.save(str(tmp_path / "c.json"))
    with Model.load(paths["llama"], **load) as m:
        s = session(m)
        assert s.load(str(tmp_path / "c.json")) > 0
        assert reply(s, "Tell me more") == uninterrupted
        assert s.last.cached_tokens > 0
