"""Parallel sequences decoded as one batch (offload.batching, Transformer.decode_together,
Model.parallel_slots): every sequence's logits are, to the bit, the ones it gets alone, in
every weight format, attention kind, tier and thread; the server's -np slots give each
request its solo answer."""

from __future__ import annotations

import contextlib
import threading

import httpx
import numpy as np
import pytest

from offload import Model, forward
from offload.batching import Batcher
from offload.demo import demo_model_path
from offload.errors import ContextOverflowError, OffloadError
from offload.sampling import SamplingParams
from offload.server import ServerConfig
from offload.testing import TinyConfig, greedy_steps, random_prompt
from offload.testing import float_bits as bits

from test_serve import PROMPTS, RunningServer, ask, oracle_chat, oracle_completion

QWEN2 = TinyConfig(arch="qwen2moe", n_layer=2, n_embd=128, n_head=4, n_head_kv=2, n_ff=128, n_expert=16,
                   n_expert_used=6, n_ctx=256, n_ff_shexp=256)
# rows of 256 where llama-quantize keeps K-quants
QWEN3 = TinyConfig(arch="qwen3moe", n_layer=2, n_embd=256, n_head=4, n_head_kv=2, n_ff=256, n_expert=16,
                   n_expert_used=4, n_ctx=512)
DEEPSEEK_V3 = TinyConfig(arch="deepseek2", n_layer=3, n_embd=64, n_head=4, n_head_kv=1, head_dim=48, n_ff=32,
                         n_expert=16, n_expert_used=4, kv_lora_rank=32, rope_dim=16, v_head_dim=32, n_dense_lead=1,
                         n_ff_dense=96, q_lora_rank=64, gating="sigmoid", selection_bias=True, expert_groups=4,
                         expert_groups_used=2, weights_norm=True, weights_scale=2.5, yarn_factor=40.0,
                         yarn_orig_ctx=64, yarn_log_mul=0.1, n_expert_shared=2, n_ctx=512)
GPT_OSS = TinyConfig(arch="gpt-oss", n_layer=2, n_embd=64, n_head=4, n_head_kv=2, head_dim=32, n_ff=64, n_expert=8,
                     n_expert_used=4, sliding_window=16, n_ctx=256)

PROMPT_LENGTHS = (5, 11, 3)  # the sequences sit at different positions of their caches


def solo_and_batched(path, budget=None, n_steps: int = 6, alone_rows: bool = True):
    """Each of three prompts decoded alone (greedy), then the same three decoded together,
    each fed its solo tokens: (solo logits, batched logits), [sequence][step]."""
    with Model.load(path, n_ctx=128, memory_budget=budget) as m:
        t = m.transformer
        prompts = [random_prompt(n, seed=20 + n, n_vocab=m.args.n_vocab) for n in PROMPT_LENGTHS]
        solo = []
        for p in prompts:
            t.reset()
            solo.append(greedy_steps(t, p, n_steps + 1))
        members = [t.fork(128) for _ in prompts]
        firsts = [member.forward(np.asarray(p))[-1] for member, p in zip(members, prompts)]
        together = [[f] for f in firsts]
        plain = contextlib.nullcontext
        with contextlib.ExitStack() as stack:
            if not alone_rows:  # the batch's matmuls free to take the batched order
                stack.enter_context(pytest.MonkeyPatch.context()).setattr(forward, "rows_as_alone", plain)
            for s in range(n_steps):
                tokens = np.array([toks[s] for toks, _ in solo])
                logits = t.decode_together(members, tokens)
                for r in range(len(members)):
                    together[r].append(logits[r])
        return [steps for _, steps in solo], together


@pytest.mark.parametrize("config,ftype,budget", [
    (QWEN2, "Q8_0", None), (QWEN2, "Q8_0", "minimum"), (QWEN3, "F32", None), (QWEN3, "Q4_K_M", None),
    (QWEN3, "Q4_K_M", "minimum"), (QWEN3, "IQ4_NL", None), (DEEPSEEK_V3, "Q8_0", None), (GPT_OSS, "F32", None)])
def test_decode_together_gives_each_sequence_its_solo_logits(quantized_factory, config, ftype, budget):
    path = quantized_factory(config, ftype, seed=3)
    if budget == "minimum":
        with Model.load(path, n_ctx=128) as m:
            budget = m.plan.minimum
    solo, together = solo_and_batched(path, budget)
    for r in range(len(PROMPT_LENGTHS)):
        for s, (a, b) in enumerate(zip(solo[r], together[r])):
            assert np.array_equal(bits(a), bits(b)), (r, s)


def test_without_rows_as_alone_a_batch_sums_otherwise(quantized_factory):
    """The check above has teeth: F32 weights in a batch of rows take the blocked GEMM's order,
    which rows_as_alone turns off."""
    path = quantized_factory(QWEN3, "F32", seed=3)
    solo, together = solo_and_batched(path, n_steps=3, alone_rows=False)
    assert any(not np.array_equal(bits(a), bits(b)) for r in range(3) for a, b in zip(solo[r][1:], together[r][1:]))


def test_a_full_context_in_one_sequence_is_its_own_error(quantized_factory):
    path = quantized_factory(QWEN2, "Q8_0", seed=3)
    with Model.load(path, n_ctx=64) as m:
        t = m.transformer
        short, full = t.fork(64), t.fork(16)
        short.forward(np.arange(1, 5))
        full.forward(np.arange(1, 17))
        with pytest.raises(ContextOverflowError):
            t.decode_together([short, full], np.array([7, 8]))
        assert short.cache.n_past == 4  # nothing ran


# -- slots in threads, as the server runs them ----------------------------------------------

def run_slots(slots, jobs, batcher_threads: int = 1):
    """jobs[i](slot) run in a thread per slot, while this thread's batcher runs their steps."""
    batcher = slots[0].batcher
    results, errors = {}, []

    def slot_thread(i):
        batcher.begin()
        try:
            results[i] = jobs[i](slots[i])
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)
        finally:
            batcher.end()

    threads = [threading.Thread(target=slot_thread, args=(i,)) for i in range(len(jobs))]
    for th in threads:
        th.start()
    stopper = threading.Thread(target=lambda: ([th.join() for th in threads], batcher.stop()))
    stopper.start()
    batcher.run()
    stopper.join()
    assert not errors, errors
    return [results[i] for i in range(len(jobs))]


@pytest.mark.parametrize("config,ftype,budget", [(QWEN3, "Q4_K_M", None), (QWEN3, "F32", "minimum"),
                                                 (DEEPSEEK_V3, "Q8_0", None)])
def test_slots_in_threads_give_each_generation_its_solo_tokens(quantized_factory, config, ftype, budget):
    """Four generations at once on two threads' worth of slots (greedy and seeded, prompts of
    different lengths, one longer than a micro-batch): each is the one a lone model with the
    slot's context gives; some steps did run as batches, and the long prompt ran in parts
    between the others' tokens."""
    path = quantized_factory(config, ftype, seed=3)
    if budget == "minimum":
        with Model.load(path, n_ctx=400, n_ubatch=32) as m:
            budget = m.plan.minimum
    lengths, kw = (5, 70, 9, 3), [dict(temperature=0), dict(temperature=0.9, seed=4), dict(temperature=0),
                                  dict(temperature=1.0, top_k=5, seed=9)]
    with Model.load(path, n_ctx=256, n_ubatch=32, memory_budget=budget) as lone:
        prompts = [random_prompt(n, seed=n, n_vocab=lone.args.n_vocab) for n in lengths]
    with Model.load(path, n_ctx=4 * 100, n_ubatch=32, memory_budget=budget) as m:
        n_ctx = 100
        slots = m.parallel_slots(4)
        assert all(s.n_ctx == n_ctx for s in slots) and len({id(s.transformer.cache) for s in slots}) == 4
        jobs = [lambda slot, p=p, k=k: list(slot.generate_tokens(p, 24, SamplingParams(**k))) for p, k in zip(prompts, kw)]
        got = run_slots(slots, jobs)
        batcher = slots[0].batcher
        assert sum(n for size, n in batcher.batches.items() if size > 1) > 0
        assert batcher.prompt_parts > 0
    with Model.load(path, n_ctx=n_ctx, n_ubatch=32, memory_budget=budget) as lone:
        for p, k, tokens in zip(prompts, kw, got):
            lone._kv_ids.clear()
            lone.transformer.reset()
            assert tokens == list(lone.generate_tokens(p, 24, SamplingParams(**k))) and tokens


def test_no_cont_batching_takes_turns_with_the_same_tokens(quantized_factory):
    path = quantized_factory(QWEN2, "Q8_0", seed=3)
    prompts = [random_prompt(n, seed=n, n_vocab=1000) for n in (4, 7)]
    outs = {}
    for batch in (True, False):
        with Model.load(path, n_ctx=128) as m:
            slots = m.parallel_slots(2, batch=batch)
            jobs = [lambda slot, p=p: list(slot.generate_tokens(p, 16, SamplingParams(temperature=0))) for p in prompts]
            outs[batch] = run_slots(slots, jobs)
            sizes = set(slots[0].batcher.batches)
            assert (sizes == {1}) != batch
    assert outs[True] == outs[False]


def test_parallel_slots_refusals(quantized_factory):
    path = quantized_factory(QWEN2, "Q8_0", seed=3)
    with Model.load(path, n_ctx=64) as m:
        with pytest.raises(OffloadError, match="tokens each"):
            m.parallel_slots(8)
        with pytest.raises(OffloadError, match="1 or more"):
            m.parallel_slots(0)


def test_a_stopped_batcher_fails_the_steps_still_waiting(quantized_factory):
    path = quantized_factory(QWEN2, "Q8_0", seed=3)
    with Model.load(path, n_ctx=64) as m:
        slots = m.parallel_slots(2)
        batcher: Batcher = slots[0].batcher
        batcher.stop()
        batcher.run()  # returns at once: the stop was first in line
        errors = []

        def late_step():
            try:
                slots[1].transformer.forward(np.arange(1, 4))
            except RuntimeError as e:
                errors.append(e)

        th = threading.Thread(target=late_step)
        th.start()
        th.join(10)
        assert not th.is_alive() and "shutting down" in str(errors[0])


# -- the server's slots -------------------------------------------------------------------

@pytest.fixture(scope="module")
def parallel_server():
    """-np 3 on the demo model under a memory budget that holds a few experts."""
    s = RunningServer(ServerConfig(model_name="demo", parallel=3),
                      lambda: Model.load(demo_model_path(), memory_budget="54MB"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def slot_oracle():
    """The demo model with one slot's context (512 / 3)."""
    with Model.load(demo_model_path(), n_ctx=512 // 3) as m:
        yield m


def test_parallel_server_gives_each_request_its_solo_answer(parallel_server, slot_oracle):
    s = parallel_server
    jobs = [("chat", PROMPTS[0], True, dict(temperature=0)), ("completion", PROMPTS[1], False, dict(temperature=0.8,
            seed=3)), ("chat", PROMPTS[2], False, dict(temperature=0.7, seed=5)),
            ("completion", PROMPTS[0], True, dict(temperature=0))]
    answers, errors = {}, []
    start = threading.Barrier(len(jobs))

    def client_thread(j):
        kind, prompt, stream, kw = jobs[j]
        client = s.client()
        start.wait()
        try:
            answers[j] = ask(client, kind, prompt, stream, 48, **kw)
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=client_thread, args=(j,)) for j in range(len(jobs))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    for j, (kind, prompt, _, kw) in enumerate(jobs):
        if kind == "chat":
            expected = oracle_chat(slot_oracle, [{"role": "user", "content": prompt}], max_tokens=48, **kw)
        else:
            expected = oracle_completion(slot_oracle, prompt, 48, **kw)
        assert answers[j] == expected and expected, j
    text = httpx.get(s.url + "/metrics").text
    batched = [line for line in text.splitlines() if line.startswith("offload_decode_batches_total")
               and 'size="1"' not in line]
    assert batched, text  # some tokens did run as one batch
    assert s.metric("requests_running") == 0 and s.metric("queue_depth") == 0


def test_parallel_server_answers_a_too_long_prompt_with_400(parallel_server):
    r = httpx.post(parallel_server.url + "/v1/completions",
                   json={"prompt": "word " * 400, "max_tokens": 4}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    ok = parallel_server.client().completions.create(model="demo", prompt=PROMPTS[0], max_tokens=4, temperature=0)
    assert ok.choices[0].text
