"""A whole decoding step in one C call (kernels.step, cext/step.c): when it runs, and that it
gives what the per-layer path gives around the logits (the routing a trace records, store
statistics, thread counts, NaN reports). Its logits against llama.cpp and the other paths, on
every arch and format it serves: tests/test_long_decode.py, test_moe_fused.py,
test_kv_cache_types.py and the oracle suites (which decode on it by default)."""

from __future__ import annotations

import numpy as np
import pytest

from offload import Model
from offload.errors import NonFiniteError
from offload.gguf_file import GGUFFile
from offload.kernels import cext, jit, step
from offload.model import set_threads
from offload.sampling import SamplingParams
from offload.testing import TinyConfig, decode_path, float_bits, random_prompt, ran_as_asked
from offload.trace import RoutingTrace

pytestmark = pytest.mark.skipif(not cext.has_step(), reason="C extension not built")

# a qwen2moe-like model: shared expert with its sigmoid gate, q/k/v biases, 6 of 16 experts
SHARED = TinyConfig(arch="qwen2moe", n_layer=2, n_embd=128, n_head=4, n_head_kv=2, n_ff=128, n_expert=16,
                    n_expert_used=6, n_ctx=128, n_ff_shexp=256)


@pytest.fixture(scope="module")
def path(quantized_factory):
    return quantized_factory(SHARED, "Q8_0", 5)


def greedy(m: Model, prompt: list[int], n: int) -> tuple[list[int], list[np.ndarray]]:
    t = m.transformer
    t.reset()
    logits = t.forward(np.array(prompt))[-1:]
    tokens, steps = [], []
    for _ in range(n):
        tokens.append(int(np.argmax(logits[-1])))
        logits = t.forward(np.array(tokens[-1:]))
        steps.append(logits.copy())
    return tokens, steps


def test_the_step_serves_a_resident_model_and_says_why_not_otherwise(path):
    with Model.load(path, n_ctx=128) as m:
        assert step.why_not(m.transformer) is None
        minimum = m.plan.minimum
    with Model.load(path, n_ctx=128, memory_budget=minimum) as m:
        assert step.why_not(m.transformer) in ("a GPU tier or prefetching runs per layer",
                                              "experts move through the tiered store")
    with decode_path("per-op"), Model.load(path, n_ctx=128) as m:
        assert "off" in step.why_not(m.transformer)


def test_traces_and_thread_counts_agree_with_the_per_layer_path(path, tmp_path):
    """The routing the step reports to a trace, and the logits at 1 and 2 threads, are the
    per-layer path's."""
    prompt = random_prompt(12, seed=3, n_vocab=1000)
    seen = {}
    try:
        for kind in ("step", "layer"):
            for threads in (1, 2):
                with decode_path(kind) as ran, Model.load(path, n_ctx=128, n_threads=threads) as m:
                    tokens, steps = greedy(m, prompt, 12)
                    generated = list(m.generate_tokens(prompt, 12, SamplingParams(temperature=0.0),
                                                       record_trace=tmp_path / f"{kind}{threads}.npz"))
                    assert generated == tokens
                    trace = RoutingTrace.load(tmp_path / f"{kind}{threads}.npz")
                    seen[kind, threads] = (tokens, [float_bits(s) for s in steps], trace.experts, trace.weights)
                assert ran_as_asked(kind, ran)
    finally:
        set_threads(jit.max_threads())
    first = seen["step", 2]
    for key, (tokens, steps, experts, weights) in seen.items():
        assert tokens == first[0], key
        for a, b in zip(steps, first[1]):
            np.testing.assert_array_equal(a, b, err_msg=str(key))
        np.testing.assert_array_equal(experts, first[2], err_msg=str(key))
        np.testing.assert_array_equal(float_bits(weights), float_bits(first[3]), err_msg=str(key))
    assert (first[2] >= 0).sum() > 12 * SHARED.n_layer * SHARED.n_expert_used  # the decode steps were recorded


def test_store_hits_are_counted_on_the_step(path):
    """The step's expert uses reach the store's statistics (and the server's expert panel, tested in test_serve)."""
    with Model.load(path, n_ctx=128) as probe:
        full = probe.plan.full
    with Model.load(path, n_ctx=128, memory_budget=full + (1 << 20), prefetch=False) as m:
        assert step.why_not(m.transformer) is None  # a tiered store that holds every expert
        before = m.store_stats()["hits"]
        m.transformer.forward(np.array([1, 5, 9]))
        after_prompt = m.store_stats()["hits"]
        m.transformer.forward(np.array([7]))
        assert m.store_stats()["hits"] - after_prompt == SHARED.n_layer * SHARED.n_expert_used
        assert after_prompt > before


def test_a_nan_in_a_layer_is_named_on_the_step(path, tmp_path):
    bad = tmp_path / "nan.gguf"
    bad.write_bytes(path.read_bytes())
    g = GGUFFile(bad)
    offset = g.tensor("blk.1.ffn_norm.weight").offset
    g.close()
    with open(bad, "r+b") as f:  # layer 1's FFN norm: the prompt's last row and every decoded one
        f.seek(offset)
        f.write(np.array([np.inf], dtype=np.float32).tobytes())
    with decode_path("step") as ran, Model.load(bad, n_ctx=128) as m:
        m.transformer.cache.n_past = 3  # as if a prompt had run: the next token decodes alone
        with pytest.raises(NonFiniteError, match="layer 1 produced NaN or Inf"):
            m.transformer.forward(np.array([7]))
        assert m.transformer.cache.n_past == 3  # the failed step did not count
    assert ran == {"step"}
