"""Checks shared by the arch test files: tiering never changes results."""

from __future__ import annotations

import numpy as np

from offload import Model
from offload.arch import model_args
from offload.gguf_file import GGUFFile
from offload.kernels.dispatch import select_kernels
from offload.sampling import SamplingParams
from offload.store.plan import make_plan
from offload.testing import float_bits


def assert_same_under_budgets_and_kernels(path, ids: list[int], n_tokens: int, n_ctx: int = 128) -> None:
    """Greedy tokens at the minimum budget (with prefetch) and a middle one (without) equal an
    all-resident run's, and the Numba kernels give its logits to the bit."""
    params = SamplingParams(temperature=0.0)
    with Model.load(path, n_ctx=n_ctx) as m:
        tokens = list(m.generate_tokens(ids, n_tokens, params))
        logits = m.logits(ids)
    g = GGUFFile(path)
    p = make_plan(g, model_args(g), n_ctx, 0)
    g.close()
    for budget, prefetch in ((p.minimum, True), ((p.minimum + p.full) // 2, False)):
        with Model.load(path, n_ctx=n_ctx, memory_budget=budget, prefetch=prefetch) as m:
            assert not getattr(m.transformer.experts, "all_resident", True), "the budget should tier the experts"
            assert list(m.generate_tokens(ids, n_tokens, params)) == tokens, budget
    select_kernels("numba")
    try:
        with Model.load(path, n_ctx=n_ctx) as m:
            np.testing.assert_array_equal(float_bits(m.logits(ids)), float_bits(logits))
    finally:
        select_kernels()
