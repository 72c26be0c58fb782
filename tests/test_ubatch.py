"""The micro-batch (llama.cpp's n_ubatch): logits equal llama.cpp's run with the same one,
and the memory plan's rule that shrinks it when a budget does not hold every expert."""

from __future__ import annotations

import numpy as np
import pytest

from offload import Model, arch
from offload.gguf_file import GGUFFile
from offload.sampling import SamplingParams
from offload.store import make_plan
from offload.errors import BudgetError
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


def test_a_tight_budget_gets_the_trade_shown_and_a_smaller_micro_batch_only_where_512_cannot_run(planned):
    low = _plan(planned, 0)  # the minimum and the full model at the default micro-batch
    assert low.n_ubatch == 512 and low.minimum_at_smallest_ubatch < low.minimum
    ample = _plan(planned, low.full)
    assert ample.all_resident and ample.n_ubatch == 512 and not ample.suggested_ubatch
    # between the smallest micro-batch's minimum and 512's: it runs, with the largest micro-batch that fits
    for budget in np.linspace(low.minimum_at_smallest_ubatch, low.minimum - 1, 4).astype(int):
        p = _plan(planned, int(budget))
        p.check()
        assert MIN_AUTO_UBATCH <= p.n_ubatch < 512 and p.ubatch_source == "budget"
        assert _plan(planned, int(budget), n_ubatch=2 * p.n_ubatch).budget < _plan(
            planned, int(budget), n_ubatch=2 * p.n_ubatch).minimum  # the next larger one does not fit
        assert "512 tokens do not fit it" in "\n".join(p.describe())
    with pytest.raises(BudgetError, match=f"with micro-batches of {MIN_AUTO_UBATCH} tokens"):
        _plan(planned, low.minimum_at_smallest_ubatch - 1).check()
    # from 512's minimum up, 512 it is (results do not depend on the budget), and the plan shows
    # what -ub would buy: a micro-batch whose scratch is within its share, or the smallest
    for budget in np.linspace(low.minimum, low.full - 1, 5).astype(int):
        p = _plan(planned, int(budget))
        assert p.n_ubatch == 512 and p.ubatch_source == "default" and p.suggested_ubatch < 512
        other = _plan(planned, int(budget), n_ubatch=p.suggested_ubatch)
        assert other.slots == p.slots_at_suggested_ubatch > p.slots
        assert (other.scratch <= budget * UBATCH_SCRATCH_SHARE or other.all_resident
                or p.suggested_ubatch == MIN_AUTO_UBATCH)
        assert f"-ub {p.suggested_ubatch}: +{other.slots - p.slots} expert slots" in "\n".join(p.describe())


def test_a_given_micro_batch_is_kept(planned):
    p = _plan(planned, 10**9, n_ubatch=32)
    assert (p.n_ubatch, p.ubatch_source) == (32, "given")
    assert "micro-batch       32 tokens (-ub" in "\n".join(p.describe())


def test_a_budget_below_512s_minimum_runs_with_the_same_tokens(planned):
    """A long prompt under a budget only 64-token micro-batches fit gives (for this Q8_0
    model, whose kernels do not change with the micro-batch) the tokens and logits of a run
    with every expert resident in 512-token ones."""
    ids = [1] + random_prompt(200, seed=9)
    low = _plan(planned, 0)
    runs = []
    for budget in (low.minimum_at_smallest_ubatch, 10**9):
        with Model.load(planned, n_ctx=PLANNED.n_ctx, memory_budget=budget) as m:
            runs.append((m.transformer.n_ubatch, m.logits(ids)[-3:],
                         list(m.generate_tokens(ids, 6, SamplingParams(temperature=0.0)))))
    assert runs[0][0] == 64 and runs[1][0] == 512
    assert np.array_equal(runs[0][1], runs[1][1]) and runs[0][2] == runs[1][2]


def test_cli_shows_the_micro_batch(planned):
    from tests.test_cli import offload_cli

    low = _plan(planned, 0)
    r = offload_cli("inspect", planned, "-c", PLANNED.n_ctx, "--memory-budget", (low.minimum + low.full) // 2)
    assert r.returncode == 0, r.stderr
    assert "micro-batch       512 tokens (the default" in r.stdout and "expert slots (" in r.stdout
    r = offload_cli("inspect", planned, "-c", PLANNED.n_ctx, "--memory-budget", low.minimum_at_smallest_ubatch)
    assert r.returncode == 0, r.stderr
    assert "micro-batch       64 tokens (sized from the budget: 512 tokens do not fit it" in r.stdout
    r = offload_cli("inspect", planned, "-c", PLANNED.n_ctx, "--memory-budget", low.full, "-ub", 128)
    assert r.returncode == 0, r.stderr
    assert "micro-batch       128 tokens (-ub" in r.stdout
    r = offload_cli("generate", planned, "-c", 256, "-n", 2, "--temp", 0, "-ub", 0)
    assert r.returncode == 2 and "ubatch" in r.stderr
