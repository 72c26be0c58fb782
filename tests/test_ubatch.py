"""The micro-batch (llama.cpp's n_ubatch): logits equal llama.cpp's run with the same one,
and the memory plan's rule that shrinks it when a budget does not hold every expert."""

from __future__ import annotations

import numpy as np
import pytest

from offload import Model, arch
from offload.gguf_file import GGUFFile
from offload.sampling import SamplingParams
from offload.store import make_plan
from offload.store.plan import MIN_AUTO_UBATCH, UBATCH_SCRATCH_SHARE
from offload.testing import TinyConfig, llama_cpp_logits, random_prompt

MOE = TinyConfig(n_layer=2, n_embd=64, n_head=4, n_head_kv=2, n_ff=128, n_expert=4, n_expert_used=2)
WIDE = TinyConfig(n_layer=2, n_embd=256, n_head=4, n_head_kv=2, n_ff=256, n_expert=8, n_expert_used=2)
SWA = TinyConfig(arch="gpt-oss", n_layer=2, n_embd=64, n_head=4, n_head_kv=2, head_dim=32, n_ff=64, n_expert=8,
                 n_expert_used=4, sliding_window=16)
# experts are most of the file, and a context long enough for the default micro-batch
PLANNED = TinyConfig(n_layer=4, n_embd=256, n_head=4, n_head_kv=2, n_ff=256, n_expert=32, n_expert_used=2, n_ctx=1024)


@pytest.mark.parametrize("config,ftype,n_ubatch,n_ctx,n_tokens", [
    (MOE, "F16", 5, 256, 151),  # F16 below 8 tokens: llama.cpp's own logits differ from 512's
    (MOE, "Q8_0", 16, 256, 100),
    (WIDE, "Q4_K_M", 7, 256, 60),  # K-quants: the tiled GEMM from 8 tokens up, a GEMV below
    (SWA, "F32", 16, 1024, 250),  # sliding-window layers: a ring of window + micro-batch cells (not wrapped here)
])
def test_logits_equal_llama_cpps_with_the_same_micro_batch(quantized_factory, config, ftype, n_ubatch, n_ctx,
                                                            n_tokens):
    path = quantized_factory(config, ftype)
    ids = [1] + random_prompt(n_tokens - 1, seed=3)
    with Model.load(path, n_ctx=n_ctx, n_ubatch=n_ubatch) as m:
        assert m.transformer.n_ubatch == n_ubatch and m.plan.ubatch_source == "given"
        ours = m.logits(ids)
    ref = llama_cpp_logits(path, ids, n_ctx=n_ctx, n_ubatch=n_ubatch)
    assert np.array_equal(ours, ref)


def test_the_micro_batch_changes_llama_cpps_logits_for_f16(quantized_factory):
    """The check above can fail: llama.cpp itself rounds differently with 5-token micro-batches."""
    path = quantized_factory(MOE, "F16")
    ids = [1] + random_prompt(150, seed=3)
    assert not np.array_equal(llama_cpp_logits(path, ids, n_ctx=256, n_ubatch=5), llama_cpp_logits(path, ids, n_ctx=256))


@pytest.fixture(scope="module")
def planned(model_factory):
    return str(model_factory(PLANNED, "Q8_0", 2))


def _plan(path, budget, **kw):
    g = GGUFFile(path)
    try:
        return make_plan(g, arch.model_args(g), PLANNED.n_ctx, budget, **kw)
    finally:
        g.close()


def test_a_tight_budget_trades_scratch_for_expert_slots(planned):
    low = _plan(planned, 0)
    ample = _plan(planned, 10**10)
    assert ample.all_resident and ample.n_ubatch == 512 and ample.ubatch_source == "default"
    # every expert resident from `full`: the smallest such budget, with the micro-batch the rule picks there
    assert _plan(planned, low.full).all_resident and not _plan(planned, low.full - 1).all_resident
    # every budget between the minimum and the full model: a micro-batch the rule allows,
    # never fewer slots than the default micro-batch would leave
    for budget in np.linspace(low.minimum, low.full - 1, 7).astype(int):
        p = _plan(planned, int(budget))
        p.check()
        assert MIN_AUTO_UBATCH <= p.n_ubatch <= 512
        assert p.scratch <= budget * UBATCH_SCRATCH_SHARE or p.n_ubatch == MIN_AUTO_UBATCH or p.all_resident
        assert p.slots >= p.slots_at_default_ubatch
        if p.n_ubatch < 512:
            assert p.ubatch_source == "budget"
            bigger = _plan(planned, int(budget), n_ubatch=2 * p.n_ubatch)  # the rule stopped for a reason
            assert bigger.budget < bigger.minimum or bigger.scratch > budget * UBATCH_SCRATCH_SHARE
    at_512 = _plan(planned, 0, n_ubatch=512)
    mid = _plan(planned, at_512.minimum + 8 * at_512.pools[0].slot_bytes)
    assert mid.n_ubatch == 64 and mid.slots > mid.slots_at_default_ubatch > 0
    assert mid.scratch < _plan(planned, mid.budget, n_ubatch=512).scratch
    text = "\n".join(mid.describe())
    assert "micro-batch       64 tokens (sized from the budget" in text
    assert f"+{mid.slots - mid.slots_at_default_ubatch} expert slots vs 512 tokens" in text
    # the smallest budget accepted is the one at the smallest micro-batch; -ub raises it
    assert low.n_ubatch == 64 and _plan(planned, 0, n_ubatch=512).minimum > low.minimum


def test_a_given_micro_batch_is_kept(planned):
    p = _plan(planned, 10**9, n_ubatch=32)
    assert (p.n_ubatch, p.ubatch_source) == (32, "given")
    assert "micro-batch       32 tokens (-ub" in "\n".join(p.describe())


def test_the_budget_rule_never_changes_tokens(planned):
    """A long prompt under a tight budget (64-token micro-batches) gives the tokens and
    logits of a run with every expert resident in 512-token ones."""
    ids = [1] + random_prompt(200, seed=9)
    low = _plan(planned, 0)
    runs = []
    for budget in (low.minimum, 10**9):
        with Model.load(planned, n_ctx=PLANNED.n_ctx, memory_budget=budget) as m:
            runs.append((m.transformer.n_ubatch, m.logits(ids)[-3:],
                         list(m.generate_tokens(ids, 6, SamplingParams(temperature=0.0)))))
    assert runs[0][0] == 64 and runs[1][0] == 512
    assert np.array_equal(runs[0][1], runs[1][1]) and runs[0][2] == runs[1][2]


def test_cli_shows_the_micro_batch(planned):
    from tests.test_cli import offload_cli

    low = _plan(planned, 0)
    at_512 = _plan(planned, 0, n_ubatch=512)
    r = offload_cli("inspect", planned, "-c", PLANNED.n_ctx, "--memory-budget", at_512.minimum + 8 * at_512.pools[0].slot_bytes)
    assert r.returncode == 0, r.stderr
    assert "micro-batch       64 tokens (sized from the budget" in r.stdout and "expert slots vs 512" in r.stdout
    r = offload_cli("inspect", planned, "-c", PLANNED.n_ctx, "--memory-budget", low.full, "-ub", 128)
    assert r.returncode == 0, r.stderr
    assert "micro-batch       128 tokens (-ub" in r.stdout
    r = offload_cli("generate", planned, "-c", 256, "-n", 2, "--temp", 0, "-ub", 0)
    assert r.returncode == 2 and "ubatch" in r.stderr
