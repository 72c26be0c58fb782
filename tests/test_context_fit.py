"""-c 0 (the default): the training context where it fits the memory budget beside the
minimum expert slots, else the longest that does, said so; a context given that does not fit
is refused in one line naming the longest that does."""

from __future__ import annotations

import pytest

from offload import Model
from offload.errors import BudgetError
from offload.gguf_file import GGUFFile
from offload.store.plan import largest_context, make_plan
from offload.testing import TinyConfig

LONG = TinyConfig(n_layer=2, n_embd=64, n_head=4, n_head_kv=2, head_dim=16, n_ff=64, n_expert=4, n_expert_used=2,
                  n_ctx=16384)


@pytest.fixture(scope="module")
def long_model(model_factory):
    return str(model_factory(LONG, "F32", 0))


def _minimum(path, n_ctx, **types):
    from offload import arch

    g = GGUFFile(path)
    try:
        return make_plan(g, arch.model_args(g), n_ctx, 0, **types).minimum
    finally:
        g.close()


def test_the_default_context_is_the_longest_that_fits(long_model):
    budget = _minimum(long_model, 3000) + 1000  # room for a little more than 3000 tokens
    with Model.load(long_model, memory_budget=budget) as m:
        n = m.n_ctx
        assert 3000 <= n < 3100 and f"context {n} tokens: the most that fits" in m.context_note
        assert m.plan.minimum <= budget < _minimum(long_model, n + 1)
    with Model.load(long_model, memory_budget=_minimum(long_model, 16384) + 1) as m:
        assert m.n_ctx == 16384 and "training context" in m.context_note
    # F32 keys and values take twice the bytes: about half the context
    with Model.load(long_model, memory_budget=budget, cache_type_k="f32", cache_type_v="f32") as m:
        assert n // 2 - 200 < m.n_ctx < n // 2 + 200


def test_a_context_that_does_not_fit_is_refused_naming_the_longest(long_model):
    """A context asked for runs with a smaller micro-batch where that fits (store.plan); one
    that fits no micro-batch is refused, naming the longest that does."""
    budget = _minimum(long_model, 3000) + 1000
    with Model.load(long_model, memory_budget=budget, n_ctx=8000) as m:
        assert m.n_ctx == 8000 and m.plan.n_ubatch < 512
    g = GGUFFile(long_model)
    from offload import arch

    fit = largest_context(g, arch.model_args(g), budget, 16384)
    g.close()
    assert 8000 < fit < 16384
    with pytest.raises(BudgetError) as e:
        Model.load(long_model, memory_budget=budget, n_ctx=16384)
    assert f"the longest context that fits beside the minimum expert slots is {fit} (-c {fit})" in str(e.value)
    assert "\n" not in str(e.value)
    with Model.load(long_model, memory_budget=budget, n_ctx=fit) as m:
        assert m.n_ctx == fit and m.context_note == ""


def test_cli_says_which_context_it_chose(long_model):
    from click.testing import CliRunner

    from offload.cli import main

    budget = str(_minimum(long_model, 3000) + 1000)
    shown = CliRunner().invoke(main, ["inspect", long_model, "--memory-budget", budget])
    assert shown.exit_code == 0 and "the most that fits the memory budget" in shown.output
    ran = CliRunner().invoke(main, ["generate", long_model, "--memory-budget", budget, "-n", "2", "--temp", "0"])
    assert ran.exit_code == 0 and "the most that fits the memory budget" in ran.stderr
    refused = CliRunner().invoke(main, ["generate", long_model, "--memory-budget", budget, "-c", "16384", "-n", "1"])
    assert refused.exit_code != 0 and "(-c " in refused.stderr
