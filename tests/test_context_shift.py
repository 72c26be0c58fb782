"""Context shift (llama.cpp's --context-shift) against llama.cpp driven through its own API
with the same shifts: llama_memory_seq_rm + llama_memory_seq_add, then its K-shift at the
next decode. The cells keep their place and get new positions, new tokens go into the freed
cells, and attention sums over cells in cell order with a mask by position: the logits of
every step through two shifts (and a batch of tokens right after the first) are equal to
the bit, on GQA models with an F16 cache (llama.cpp's default) and F32, gpt-oss (sliding
window layers, whose out-of-window cells take new tokens) and DeepSeek's MLA.
"""

from __future__ import annotations

import numpy as np
import pytest

from offload import Model
from offload.cache_types import cache_format, encode_rows
from offload.errors import OffloadError
from offload.kernels import cext
from offload.kernels.attention import attention, attention_numba, attention_ref, attention_typed
from offload.kv_cells import Cells
from offload.sampling import SamplingParams
from offload.testing import TinyConfig, llama_cpp_shifted_greedy, random_prompt, shifted_greedy

N_CTX = 128  # llama.cpp pads its cells to 256; the shifts keep new tokens in the first 128 (see shifted_greedy)
N_KEEP = 7
N_PROMPT, N_STEPS = 90, 100  # shifts at 127 tokens, twice
BATCH = [500, 501, 502, 503, 504]  # after the first shift: a batch landing in the freed cells

MODELS = {
    # GQA 2:1, head_dim 32
    "llama": TinyConfig(n_layer=2, n_embd=128, n_head=4, n_head_kv=2, head_dim=32, n_ff=64, n_expert=4,
                        n_expert_used=2, n_ctx=N_CTX),
    # sinks, a window of 16 on the even layers, YaRN: cells out of the window take new tokens
    "gpt-oss": TinyConfig(arch="gpt-oss", n_layer=2, n_embd=64, n_head=4, n_head_kv=2, head_dim=32, n_ff=64,
                          n_expert=8, n_expert_used=4, sliding_window=16, n_ctx=N_CTX),
    # MLA: the cached [latent, rope key] rows rotated in their last 16 values
    "deepseek2": TinyConfig(arch="deepseek2", n_layer=2, n_embd=64, n_head=4, n_head_kv=1, head_dim=48, n_ff=32,
                            n_expert=8, n_expert_used=2, kv_lora_rank=32, rope_dim=16, v_head_dim=32, n_dense_lead=1,
                            n_ff_dense=96, yarn_factor=0.0, n_ctx=N_CTX),
}
GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def paths(model_factory):
    return {name: model_factory(config, "F32", 3) for name, config in MODELS.items()}


def offload_shifted_greedy(m: Model, prompt, n, batch=BATCH):
    def step(tokens):
        logits = m.transformer.forward(np.asarray(tokens, dtype=np.int64))[-1]
        m._kv_ids.extend(tokens)
        return logits

    def shift(n_keep, n_discard):
        assert m.shift_context(n_keep, n_discard) == n_discard

    return shifted_greedy(step, shift, prompt, n, N_CTX, N_KEEP, batch)


@pytest.mark.parametrize("name,type_k,type_v,flash", [
    ("llama", "f16", "f16", "off"), ("llama", "f32", "f32", "off"), ("gpt-oss", "f16", "f16", "off"),
    ("deepseek2", "f16", "f16", "off"), ("llama", "f16", "f16", "on"), ("llama", "f16", "q8_0", "on"),
    ("gpt-oss", "f16", "f16", "on")])
def test_two_shifts_give_llama_cpp_logits(paths, name, type_k, type_v, flash):
    """(flash: llama.cpp's flash attention over the shifted cells, tests/test_flash_attention.py)"""
    prompt = random_prompt(N_PROMPT, seed=3)
    with Model.load(paths[name], n_ctx=N_CTX, cache_type_k=type_k, cache_type_v=type_v, context_shift=True,
                    flash_attn=flash) as m:
        tokens, steps, shifts = offload_shifted_greedy(m, prompt, N_STEPS)
        assert m.transformer.cache.layout is not None
    assert len(shifts) == 2, shifts  # the check covers two shifts
    ref_tokens, ref_steps, ref_shifts = llama_cpp_shifted_greedy(paths[name], prompt, N_STEPS, N_CTX, N_KEEP, BATCH,
                                                                 type_k=type_k, type_v=type_v,
                                                                 flash_attn=flash == "on")
    assert shifts == ref_shifts
    for i, (ours, ref) in enumerate(zip(steps, ref_steps)):
        assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32)), f"step {i}: max |diff| {np.abs(ours - ref).max():.3g}"
    assert tokens == ref_tokens


def test_the_keys_must_be_rotated(paths, monkeypatch):
    """A check that cannot fail is no check: without the K-shift the steps after a shift differ."""
    import offload.forward as forward

    prompt = random_prompt(N_PROMPT, seed=3)
    runs = []
    for rotate in (True, False):
        if not rotate:
            monkeypatch.setattr(forward, "rotate_keys", lambda *a: None)
        with Model.load(paths["llama"], n_ctx=N_CTX, context_shift=True, cache_type_k="f16", cache_type_v="f16") as m:
            runs.append(offload_shifted_greedy(m, prompt, 45, batch=()))
    (_, rotated, shifts), (_, unrotated, _) = runs
    first = 127 - N_PROMPT + 1  # the step right after the first shift
    assert shifts and all(np.array_equal(a, b) for a, b in zip(rotated[:first], unrotated[:first]))
    assert not np.array_equal(rotated[first], unrotated[first])


def test_generate_shifts_as_llama_completion(paths):
    """Model.generate_tokens with context_shift: --keep counts after BOS, half of the rest goes."""
    prompt = random_prompt(N_PROMPT, seed=4)
    with Model.load(paths["llama"], n_ctx=N_CTX) as m:
        stopped = list(m.generate_tokens(prompt, N_STEPS, GREEDY))
        assert m.last_generation.stop_reason == "context" and len(stopped) == N_CTX - N_PROMPT + 1
    with Model.load(paths["llama"], n_ctx=N_CTX, context_shift=True, n_keep=N_KEEP - 1) as m:
        tokens = list(m.generate_tokens(prompt, N_STEPS, GREEDY))
        assert m.last_generation.context_shifts == 2
        assert m._kv_ids[:N_KEEP] == prompt[:N_KEEP]
    ref, _, _ = llama_cpp_shifted_greedy(paths["llama"], prompt, N_STEPS, N_CTX, N_KEEP)
    assert tokens == ref and tokens[: len(stopped)] == stopped


def test_a_chat_reply_shifts_keeping_the_system_prompt(paths):
    """A reply longer than the context goes on (ChatSession with context_shift): the rendered
    system prompt stays at the start of the cache, and the reply is llama.cpp's with the same
    shifts; the next turn, which no longer fits, drops the oldest exchange and runs."""
    from offload.chat import ChatSession, prompt_ids, system_prompt_tokens
    from test_chat import CHATML

    system, message, n_reply = "You are a terse assistant. " * 6, "Hello there " * 10, 70
    with Model.load(paths["llama"], n_ctx=N_CTX, chat_template=CHATML, context_shift=True) as m:
        s = ChatSession(model=m, template=m.chat_template, params=GREEDY, max_tokens=n_reply, system=system,
                        context_shift=True)
        ids = prompt_ids(m, m.chat_template, s.messages + [{"role": "user", "content": message}])
        keep = system_prompt_tokens(m, m.chat_template, s.messages)
        assert len(ids) + n_reply > N_CTX and keep > 30
        reply = "".join(d.text for d in s.send(message))
        assert m.last_generation.context_shifts >= 1 and s.last.completion_tokens == n_reply
        assert m._kv_ids[:keep] == ids[:keep]
        ref, _, shifts = llama_cpp_shifted_greedy(paths["llama"], ids, n_reply, N_CTX, keep)
        assert len(shifts) == m.last_generation.context_shifts and reply == m.detokenize(ref)
        "".join(d.text for d in s.send("And then?"))
        assert s.shifted >= 2 and s.last.completion_tokens > 0


def test_a_shifted_session_saves_and_continues(paths, tmp_path):
    prompt = random_prompt(30, seed=5)
    load = dict(n_ctx=N_CTX, context_shift=True, cache_type_k="f16", cache_type_v="f16")
    with Model.load(paths["gpt-oss"], **load) as m:
        whole = list(m.generate_tokens(prompt, 140, GREEDY))
    with Model.load(paths["gpt-oss"], **load) as m:
        head = list(m.generate_tokens(prompt, 120, GREEDY))
        assert m.last_generation.context_shifts == 1
        m.save_state(tmp_path / "s.npz")
        held = list(m._kv_ids)
    with Model.load(paths["gpt-oss"], **load) as m:
        assert m.load_state(tmp_path / "s.npz") == held
        tail = list(m.generate_tokens(held + head[-1:], 20, GREEDY, reuse_cache=True))
    assert head + tail[:-1] == whole[:139]  # the continuation is the uninterrupted run's


@pytest.mark.parametrize("type_k", ["bf16", "q8_0"])
def test_k_types_llama_cpp_cannot_shift_are_refused(paths, type_k):
    with pytest.raises(OffloadError, match="context shift") as e:
        Model.load(paths["llama"], n_ctx=N_CTX, cache_type_k=type_k, cache_type_v="f16", context_shift=True)
    assert "\n" not in str(e.value)


def test_cli_generate_goes_past_the_context(paths):
    from click.testing import CliRunner

    from offload.cli import main

    args = ["generate", str(paths["llama"]), "-c", "64", "-n", "100", "--temp", "0", "-p", "Hello"]
    stopped = CliRunner().invoke(main, args)
    shifted = CliRunner().invoke(main, args + ["--context-shift", "--keep", "2"])
    assert stopped.exit_code == 0 and "stop: context" in stopped.stderr
    assert shifted.exit_code == 0 and "generated 100 tokens" in shifted.stderr and "context shifted" in shifted.stderr


# -- the pieces ----------------------------------------------------------------------------

def test_cells_place_tokens_as_llama_cpp():
    """After a shift new tokens take the freed cells, from the head llama.cpp keeps."""
    cells = Cells.filled(16, 0, 15)  # positions 0..14 in cells 0..14, cell 15 empty
    assert cells.head == 15
    cells.seq_rm(3, 3 + 6)
    cells.seq_add(9, 15, -6)
    assert cells.head == 0 and cells.has_shift
    assert cells.pos.tolist() == [0, 1, 2] + [-1] * 6 + list(range(3, 9)) + [-1]
    assert cells.shift.tolist() == [0] * 9 + [-6] * 6 + [0]
    slots = cells.find_slot(2)
    cells.apply(slots, np.array([9, 10], dtype=np.int32))
    assert slots.tolist() == [3, 4] and cells.head == 5 and cells.n_used == 15
    cells.seq_rm(9, -1)  # truncated back: the head returns to the first cell freed
    assert cells.head == 3 and cells.positions() == set(range(9))
    ring = Cells.filled(8, 4, 10)  # a window of 4 in a ring of 8: positions 2..9
    slots = ring.find_slot(3)
    assert slots.tolist() == [2, 3, 4]  # from the head on, cells out of the window (positions 2, 3, 4) are reused


@pytest.mark.parametrize("n,window,sinks", [(1, 0, False), (4, 0, True), (3, 6, False), (1, 5, True)])
def test_attention_over_shifted_cells_agrees_in_every_kernel(n, window, sinks):
    """C, Numba and numpy attention over cells in any order, masked by position, give the same
    bits; with the cells in order they give what the plain layout gives."""
    rng = np.random.default_rng(n + window)
    n_head, n_head_kv, hd, n_cells = 4, 2, 32, 48
    k = rng.standard_normal((n_cells, n_head_kv * hd)).astype(np.float32)
    v = rng.standard_normal((n_cells, n_head_kv * hd)).astype(np.float32)
    q = rng.standard_normal((n, n_head * hd)).astype(np.float32)
    s = rng.standard_normal(n_head).astype(np.float32) if sinks else None
    pos = np.full(40, -1, dtype=np.int32)
    pos[rng.choice(40, 30, replace=False)] = rng.permutation(30)
    start = 30 - n
    args = (q, k, v, start, n_head, n_head_kv, hd)
    ref = attention_ref(*args, window=window, sinks=s, cell_pos=pos)
    assert np.array_equal(attention_numba(*args, window=window, sinks=s, cell_pos=pos), ref)
    if cext.selected():
        assert np.array_equal(attention(*args, window=window, sinks=s, cell_pos=pos), ref)
    plain = attention(*args, window=window, sinks=s)
    assert np.array_equal(attention(*args, window=window, sinks=s, cell_pos=np.arange(30, dtype=np.int32)), plain)
    assert not np.array_equal(plain, ref)
    f16 = cache_format("f16")
    k16, v16 = encode_rows(f16, k), encode_rows(f16, v)
    typed = (q, k16, f16, v16, f16, start, n_head, n_head_kv, hd, window, s)
    assert np.array_equal(attention_typed(*typed, cell_pos=pos), attention_typed(*typed, cell_pos=pos, compiled=False))
