"""Expert prediction and prefetch: lookahead is exact on a model built for it, prefetch never
changes results, replaced predictions are cancelled, and the metrics count what they say."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from offload import Model, arch
from offload.gguf_file import GGUFFile
from offload.predict import CombinedPredictor, LookaheadPredictor, PredictionMetrics, TransitionPredictor, select
from offload.sampling import SamplingParams
from offload.store import loader as loader_module
from offload.store import make_plan
from offload.store.arena import LOADING, READY
from offload.testing import TinyConfig

PROMPT = "Once upon a time there was a little"
MANY = TinyConfig(n_layer=4, n_embd=64, n_head=4, n_head_kv=2, n_ff=256, n_expert=32, n_expert_used=2, n_ctx=128)
# 8 experts read only residual dims 0..7, which no layer writes: every router sees the same
# values (up to rms_norm's positive scale), so each layer's choice is known from any earlier one.
EXACT = TinyConfig(n_layer=4, n_embd=64, n_head=4, n_head_kv=2, n_ff=64, n_expert=8, n_expert_used=2, n_ctx=128)


def plan_for(path, budget=0, **kw):
    g = GGUFFile(path)
    try:
        return make_plan(g, arch.model_args(g), MANY.n_ctx, budget, **kw)
    finally:
        g.close()


def share_budget(plan, share):
    """The minimum plus `share` of the remaining experts' slots."""
    pool = plan.pools[0]
    return plan.minimum + int((pool.n_experts - pool.min_slots) * share) * pool.slot_bytes


@pytest.fixture(scope="module")
def many(model_factory):
    return str(model_factory(MANY, "Q8_0", 3))


@pytest.fixture(scope="module")
def exact(model_factory, tmp_path_factory):
    """EXACT's F32 model, edited: attention outputs and expert down-projections write
    nothing to dims 0..E-1; layer L's router row e reads dim perm_L(e) only."""
    import shutil

    src = model_factory(EXACT, "F32", 7)
    path = tmp_path_factory.mktemp("exact") / "exact.gguf"
    shutil.copy(src, path)
    g = GGUFFile(path)
    tensors = {t.name: (t.offset, tuple(reversed(t.shape))) for t in g.tensors.values()}
    g.close()
    e = EXACT.n_expert
    rng = np.random.default_rng(0)
    mm = np.memmap(path, dtype=np.uint8, mode="r+")

    def view(name):
        off, shape = tensors[name]
        return mm[off : off + int(np.prod(shape)) * 4].view(np.float32).reshape(shape)

    for i in range(EXACT.n_layer):
        view(f"blk.{i}.attn_output.weight")[:e, :] = 0
        view(f"blk.{i}.ffn_down_exps.weight")[:, :e, :] = 0
        router = view(f"blk.{i}.ffn_gate_inp.weight")
        router[:] = 0
        router[np.arange(e), rng.permutation(e)] = 4.0
    mm.flush()
    del mm
    return str(path)


@pytest.fixture(scope="module")
def reference(many):
    with Model.load(many) as m:
        ids = m.tokenize(PROMPT)
        return ids, m.logits(ids), list(m.generate_tokens(ids, 8, SamplingParams(temperature=0.0)))


# -- the predictor -------------------------------------------------------------------------

def test_lookahead_recall_is_exact_where_the_next_router_is_known(exact):
    p = plan_for(exact)
    with Model.load(exact, memory_budget=share_budget(p, 0.25), prefetch_depth=3) as m:
        ids = m.tokenize(PROMPT)
        list(m.generate_tokens(ids, 12, SamplingParams(temperature=0.0)))
        s = m.stats()
        assert s["prefetch_depth"] == 3
        for d in (1, 2, 3):
            assert s[f"prediction_recall_d{d}"] == 1.0, d
            assert 0 < s[f"prediction_precision_d{d}"] <= 1.0
        by_layer = s["prediction_by_layer"]
        assert by_layer[1]["by_distance"][1]["recall"] == 1.0 and 3 in by_layer[3]["by_distance"]
        assert s["prefetch_hits"] > 0
    with Model.load(exact) as m:  # the predictor alone, on a hidden state of our own
        pred = LookaheadPredictor(m.transformer.weights, m.args, depth=1, margin=0)
        x = np.random.default_rng(1).standard_normal((3, EXACT.n_embd)).astype(np.float32)
        from offload.forward import route

        w = m.transformer.weights.layers[1]
        from offload.kernels import matmul
        from offload.kernels.ggml_math import rms_norm

        h = rms_norm(x, w.ffn_norm, m.args.rms_eps)
        chosen, _ = route(matmul(w.moe.router, h), EXACT.n_expert_used, m.args.routing)
        [(target, experts, conf)] = pred.predict(0, x)
        assert target == 1 and set(experts) == set(chosen.ravel()) and 0 < conf <= 1
        assert pred.predict(EXACT.n_layer - 1, x) == []  # nothing after the last layer


def test_selection_margin_and_confidence():
    experts, conf = select(np.array([[0.1, 0.4, 0.2, 0.3]], np.float32), k=2, margin=1, margin_ratio=0.5)
    assert list(experts) == [1, 3, 2] and conf == pytest.approx(0.7)  # 0.2 >= 0.5 * 0.3: close, kept
    experts, conf = select(np.array([[0.05, 0.5, 0.1, 0.35]], np.float32), k=2, margin=1, margin_ratio=0.5)
    assert list(experts) == [1, 3] and conf == pytest.approx(0.85)  # 0.1 < 0.175: not close
    experts, _ = select(np.array([[0.6, 0.3, 0.05, 0.05], [0.05, 0.05, 0.3, 0.6]], np.float32), 2, 0, 0.5)
    assert list(experts) == [0, 3, 1, 2]  # a batch: the union, by best probability


def test_transition_predictor_learns_the_chain():
    t = TransitionPredictor([0, 1, 2], n_expert=4, k=1, depth=2, margin=0)
    for _ in range(3):
        for e in range(4):
            t.observe(0, [[e]])
            t.observe(1, [[(e + 1) % 4]])
            t.observe(2, [[(e + 2) % 4]])
    t.observe(0, [[2]])  # a new token: layer 0 picked 2
    preds = {target: list(experts) for target, experts, _ in t.predict(1, None)}
    assert preds == {2: [0]}  # 2 -> 3 (layer 1) -> 0 (layer 2)
    assert t.predict(0, None) == []  # before layer 0 routes, this token has no source yet
    fitted = TransitionPredictor([0, 1, 2], 4, 1, depth=2, margin=0, learn=False).fit(
        [{0: [e], 1: [(e + 1) % 4], 2: [(e + 2) % 4]} for e in range(4)])
    assert np.array_equal(fitted.counts[1], t.counts[1] / 3)


def test_metrics_by_hand():
    m = PredictionMetrics()
    m.record(0, [(1, [1, 2, 3], 0.9), (2, [4, 5], 0.5)])
    m.observe(1, np.array([[1, 2]]))  # d1: 2 of 3 predicted were chosen, both chosen were predicted
    m.record(1, [(2, [4, 6], 0.8)])
    m.observe(2, np.array([[4, 7]]))  # d2: {4,5} vs {4,7}; d1: {4,6} vs {4,7}
    m.observe(3, np.array([[0, 1]]))  # nothing was predicted for layer 3: not counted
    d = m.by_distance()
    assert d[1]["predictions"] == 2 and d[1]["precision"] == pytest.approx(3 / 5) and d[1]["recall"] == 0.75
    assert d[2]["predictions"] == 1 and d[2]["precision"] == 0.5 and d[2]["recall"] == 0.5
    assert m.by_layer()[1][1]["precision"] == pytest.approx(2 / 3) and m.by_layer()[1][1]["recall"] == 1.0


# -- prefetch never changes results ------------------------------------------------------

@pytest.mark.parametrize("o_direct", [False, True])
def test_prefetch_never_changes_outputs(many, reference, o_direct):
    ids, logits, tokens = reference
    p = plan_for(many, o_direct=o_direct)
    for budget in (p.minimum, share_budget(p, 0.25)):
        for prefetch, depth in ((False, 1), (True, 1), (True, 3)):
            with Model.load(many, memory_budget=budget, o_direct=o_direct, prefetch=prefetch,
                            prefetch_depth=depth) as m:
                assert np.array_equal(m.logits(ids), logits), (budget, prefetch, depth)
                assert list(m.generate_tokens(ids, 8, SamplingParams(temperature=0.0))) == tokens
                s = m.stats()
                assert s["read_errors"] == 0
                assert (m.transformer.prefetcher is not None) == prefetch
                if prefetch:
                    assert s["prediction_recall_d1"] > 0 and s["prefetches"] > 0


@pytest.mark.parametrize("predictor", ["transition", "combined"])
def test_other_predictors_keep_outputs(many, reference, predictor):
    ids, logits, tokens = reference
    p = plan_for(many)
    with Model.load(many, memory_budget=share_budget(p, 0.25), predictor=predictor, prefetch_depth=2) as m:
        assert np.array_equal(m.logits(ids), logits)
        assert list(m.generate_tokens(ids, 8, SamplingParams(temperature=0.0))) == tokens
        assert m.stats()["predictor"] == predictor
        assert isinstance(m.transformer.prefetcher.predictor, CombinedPredictor) == (predictor == "combined")


def test_lookahead_decode_path_matches_the_numpy_one(many):
    """One token takes a compiled pass over every target; it must pick what select() picks."""
    from offload.predict import _Scoring

    with Model.load(many) as m:
        pred = LookaheadPredictor(m.transformer.weights, m.args, depth=3, margin=2, margin_ratio=0.3)
        rng = np.random.default_rng(2)
        for layer in range(MANY.n_layer):
            x = rng.standard_normal((1, MANY.n_embd)).astype(np.float32)
            fast, ref = pred.predict(layer, x), _Scoring.predict(pred, layer, x)
            assert [t for t, _, _ in fast] == [t for t, _, _ in ref] == list(range(layer + 1, min(layer + 4, 4)))
            for (_, e1, c1), (_, e2, c2) in zip(fast, ref):
                assert list(e1) == list(e2) and c1 == pytest.approx(c2, rel=1e-5)


def test_make_predictor_rejects_unknown(many):
    from offload.errors import OffloadError

    with pytest.raises(OffloadError, match="predictor"):
        Model.load(many, memory_budget=plan_for(many).minimum, predictor="oracle")


# -- the queue: cancellation, reserve, wasted bytes ------------------------------------------

def test_replaced_predictions_are_cancelled_and_slots_freed(many, monkeypatch):
    from test_store import file_bytes

    p = plan_for(many)
    gate = threading.Event()
    real = loader_module.read_ranges

    def blocked(fd, buf, ranges):
        gate.wait(10)
        return real(fd, buf, ranges)

    monkeypatch.setattr(loader_module, "read_ranges", blocked)
    with Model.load(many, memory_budget=share_budget(p, 0.5), io_threads=1, prefetch_depth=3) as m:
        store = m.experts
        cap = store.max_prefetch
        assert cap > store.plan.prefetch_slots  # room beside the running layer: more than the reserve

        def loading():
            return [s for s in store.arena.slots if s.state == LOADING]

        old = [(1, [0, 1, 2], 0.9), (2, [3, 4, 5], 0.8), (3, [6, 7], 0.7)]
        assert store.prefetch_predicted(0, old) == min(cap, 8)
        time.sleep(0.05)  # the loader takes one read and blocks in it
        started = [k for k, (job, _, _) in store._jobs.items() if job.started]
        assert len(started) <= 1
        rng = np.random.default_rng(0)
        for _ in range(50):  # newer predictions again and again, the loader stuck
            new = [(t, rng.choice(32, 3, replace=False), float(rng.random())) for t in (1, 2, 3)]
            store.prefetch_predicted(0, new)
            assert len(loading()) <= cap
            predicted = {(t, int(e)) for t, es, _ in new for e in es}
            for s in loading():  # only the predicted ones, and the one read under way, hold slots
                assert s.key in predicted or s.key in started, s
        assert store.stats.prefetch_cancelled > 0
        gate.set()
        deadline = time.time() + 10
        while loading() and time.time() < deadline:
            time.sleep(0.01)
        assert not loading()
        for s in store.arena.slots:  # every read that ran holds its expert's bytes
            if s.state == READY:
                ffn = s.ffn
                got = [ffn.gate.data.tobytes(), ffn.up.data.tobytes(), ffn.down.data.tobytes()]
                assert got == file_bytes(many, *s.key), s.key
        assert store.stats.read_errors == 0


def test_prefetch_never_evicts_pinned_or_nearer_and_counts_waste(many):
    p = plan_for(many)
    with Model.load(many, memory_budget=p.minimum, prefetch_depth=2) as m:
        store = m.experts
        k = MANY.n_expert_used
        assert store.plan.slots == 2 * k and store.max_prefetch == store.plan.prefetch_slots
        a, b = store.get(0, 0), store.get(0, 1)  # layer 0 runs: two slots pinned
        store.prefetch_predicted(0, [(1, [5, 6], 0.9), (2, [7, 8], 0.9)])
        deadline = time.time() + 10
        while store.stats.reads < 2 + 2 and time.time() < deadline:
            time.sleep(0.01)
        assert store.slot_of(0, 0).state == READY and store.slot_of(0, 1).state == READY  # pinned: kept
        assert store.slot_of(1, 5) is not None and store.slot_of(1, 6) is not None  # the nearer need
        assert store.slot_of(2, 7) is None and store.slot_of(2, 8) is None  # no room without evicting those
        assert a.gate.data.tobytes() and b.gate.data.tobytes()
        # layer 1 routes elsewhere: its prefetched experts go unused, and their bytes count as waste
        store.prefetch(1, [9, 10])
        for e in (9, 10):
            store.get(1, e)
        for layer in (2, 3):
            for e in range(3):
                store.get(layer, e)
        s = store.stats
        assert s.prefetch_wasted == 2 and s.prefetch_wasted_bytes == 2 * store.layouts[1].expert_bytes
