"""The predictor's look-ahead in the store: eviction spares the experts predicted for the
next layers (and the simulator replays exactly that), and the prefetch read budget reads a
prediction only when its read is expected to arrive before its layer runs (measured read
rate, measured layer time). Tokens never change."""

from __future__ import annotations

import time

import pytest

from offload import Model, arch
from offload.gguf_file import GGUFFile
from offload.sampling import SamplingParams
from offload.store import loader as loader_module
from offload.store import make_plan
from offload.simulate import simulate
from offload.testing import TinyConfig
from offload.trace import RoutingTrace

MANY = TinyConfig(n_layer=4, n_embd=64, n_head=4, n_head_kv=2, n_ff=256, n_expert=32, n_expert_used=2, n_ctx=128)
PROMPT = [1, 300, 500, 700, 900]


@pytest.fixture(scope="module")
def many(model_factory):
    return str(model_factory(MANY, "Q8_0", 3))


@pytest.fixture(scope="module")
def half(many):
    g = GGUFFile(many)
    try:
        p = make_plan(g, arch.model_args(g), MANY.n_ctx, 0)
    finally:
        g.close()
    pool = p.pools[0]
    return p.minimum + (pool.n_experts - pool.min_slots) // 2 * pool.slot_bytes


@pytest.mark.parametrize("budgeted", [True, False])
def test_only_reads_expected_in_time_are_issued(many, half, budgeted):
    with Model.load(many, n_ctx=MANY.n_ctx, memory_budget=half, prefetch_depth=2) as m:
        store = m.experts
        store.read_budget = budgeted
        e = store.layouts[1].expert_bytes
        store.read_rate, store.layer_seconds = e / 1.0, 1.5  # one expert a second; a layer in 1.5 s
        # distance 1 (1.5 s): one read arrives in time (1 s), a second would not (2 s);
        # distance 2 (3 s): two more behind the first (2 s, 3 s)
        started = store.prefetch_predicted(0, [(1, [5, 6], 0.9), (2, [7, 8], 0.8)])
        assert started == (3 if budgeted else 4)
        assert store.stats.prefetch_skipped_late == (1 if budgeted else 0)
        assert (store.slot_of(1, 6) is None) == budgeted and store.slot_of(2, 8) is not None
        assert (1, 6) in store._predicted  # not read, still spared by eviction as predicted


def test_rates_are_measured_while_decoding(many, half):
    with Model.load(many, n_ctx=MANY.n_ctx, memory_budget=half, prefetch_depth=1) as m:
        list(m.generate_tokens(PROMPT, 12, SamplingParams(temperature=0.0)))
        assert m.experts.read_rate > 0 and m.experts.layer_seconds > 0


def test_a_slow_disk_skips_late_prefetches_and_tokens_stay(many, half, monkeypatch):
    with Model.load(many, n_ctx=MANY.n_ctx, memory_budget=half, prefetch=False) as m:
        want = list(m.generate_tokens(PROMPT, 12, SamplingParams(temperature=0.0)))
    real = loader_module.read_ranges

    def slow(fd, buf, ranges):  # a disk far slower than a tiny layer's compute
        time.sleep(0.005)
        return real(fd, buf, ranges)

    monkeypatch.setattr(loader_module, "read_ranges", slow)
    with Model.load(many, n_ctx=MANY.n_ctx, memory_budget=half, prefetch_depth=2) as m:
        got = list(m.generate_tokens(PROMPT, 12, SamplingParams(temperature=0.0)))
        s = m.experts.stats
        assert s.prefetch_skipped_late > 0
        assert m.experts.read_rate < m.experts.layouts[0].expert_bytes / 0.004
    assert got == want


def test_the_simulator_replays_the_stores_look_ahead_eviction(many, half, tmp_path):
    """With predictions but no prefetch reads (no read may start), the store's hits and misses
    are the simulator's with lookahead=True, from the predictions the trace recorded; and
    sparing predicted experts changes the hits of some policy (the check can fail)."""
    changed = False
    for policy in ("lru", "lfu", "lrfu"):
        path = tmp_path / f"{policy}.npz"
        with Model.load(many, n_ctx=MANY.n_ctx, memory_budget=half, cache_policy=policy, prefetch_depth=2,
                        prefetch_slots=0) as m:
            m.experts.max_prefetch = 0  # predictions reach the store, reads never start
            list(m.generate_tokens([1], 40, SamplingParams(temperature=1.0, seed=3), record_trace=path))
            store = m.experts.stats
            slots = m.plan.slots
            assert store.prefetches == 0 and store.reads == store.misses
        t = RoutingTrace.load(path)
        assert t.predicted is not None
        with_pred = simulate(t, slots, policy, lookahead=True)
        assert (with_pred.hits, with_pred.misses) == (store.hits, store.misses), policy
        changed |= simulate(t, slots, policy).hits != with_pred.hits
    assert changed
