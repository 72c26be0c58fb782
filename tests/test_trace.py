"""Routing traces: the .npz format, recording through a real model, and the offline simulator
(policies as the store runs them, Belady's optimum against exhaustive search)."""

from __future__ import annotations

import functools
import inspect
import json

import numpy as np
import pytest

from offload import Model, forward, simulate as sim, trace as trace_module
from offload.gguf_file import GGUFFile
from offload.sampling import SamplingParams
from offload.simulate import POLICY_NAMES, accesses, belady, compare, simulate
from offload.store import make_plan
from offload.testing import TinyConfig
from offload.trace import FORMAT_VERSION, RoutingTrace, TraceRecorder

MOE = TinyConfig(n_layer=4, n_embd=64, n_head=4, n_head_kv=2, n_ff=256, n_expert=16, n_expert_used=2, n_ctx=128)
PROMPT = "Once upon a time there was a little"
# the store with no reads ahead: only the running layer's announcement (which the simulator follows)
NO_PREFETCH = {"prefetch_slots": 0}
if "prefetch" in inspect.signature(Model.load).parameters:
    NO_PREFETCH["prefetch"] = False


def random_trace(rng, n_steps=20, n_layers=3, n_expert=6, k=2, batches=False, predicted=False) -> RoutingTrace:
    experts = np.stack([np.stack([rng.choice(n_expert, k, replace=False) for _ in range(n_layers)])
                        for _ in range(n_steps)]).astype(np.int16)
    weights = rng.random(experts.shape).astype(np.float32)
    batch = None
    if batches:  # a prompt batch of 5, whose last layer only ran for its last token, then decode steps
        batch = np.concatenate([[0] * 5, np.arange(1, n_steps - 4)]).astype(np.int32)
        experts[:4, -1] = -1
        weights[:4, -1] = 0
    pred = None
    if predicted:
        pred = np.full((n_steps, n_layers, 2, 3), -1, dtype=np.int16)
        pred[:, 1:, 0, :2] = experts[:, 1:]
    return RoutingTrace(experts, weights, np.arange(n_layers) * 2 + 1, rng.integers(0, 100, n_steps), n_expert, k,
                        prompt_tokens=5, batch=batch, predicted=pred, model="m.gguf", meta={"cache_policy": "lru"})


# -- the format --------------------------------------------------------------------------

@pytest.mark.parametrize("predicted", [False, True])
def test_round_trip(tmp_path, predicted):
    t = random_trace(np.random.default_rng(0), batches=True, predicted=predicted)
    path = tmp_path / "t.npz"
    t.save(path)
    back = RoutingTrace.load(path)
    assert back.equals(t) and back.meta == {"cache_policy": "lru"} and back.model == "m.gguf"
    with np.load(path, allow_pickle=False) as z:  # readable without offload, no pickles
        fields = set(z.files)
        assert int(z["format_version"]) == FORMAT_VERSION
        meta = json.loads(str(z["metadata"]))
        assert z["experts"].dtype == np.int16 and z["weights"].dtype == np.float32
    assert {"format_version", "metadata", "experts", "weights", "layers", "tokens", "batch"} <= fields
    assert ("predicted" in fields) == predicted
    assert meta["n_expert"] == 6 and meta["k"] == 2 and meta["model"] == "m.gguf" and meta["prompt_tokens"] == 5
    for name in fields | {"model", "n_expert", "prompt_tokens"}:  # every field is documented
        assert name in trace_module.__doc__


def test_newer_format_and_garbage_are_refused(tmp_path):
    from offload.errors import OffloadError

    t = random_trace(np.random.default_rng(1))
    path = tmp_path / "t.npz"
    t.save(path)
    with np.load(path) as z:
        data = dict(z)
    data["format_version"] = np.int64(FORMAT_VERSION + 1)
    np.savez(tmp_path / "new.npz", **data)
    with pytest.raises(OffloadError, match="newer"):
        RoutingTrace.load(tmp_path / "new.npz")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(OffloadError, match="not a routing trace"):
        RoutingTrace.load(tmp_path / "bad.npz")


def test_recorder_batches_and_predictions():
    pos = {"n": 0}
    rec = TraceRecorder(8, 2, position=lambda: pos["n"], model="x")
    rec.add_tokens([5, 6, 7], prompt=True)
    # a prompt batch of 3 over layers 0 and 2; the last layer sees only the last row
    rec.record(0, np.array([[1, 2], [3, 4], [5, 6]]), np.full((3, 2), 0.5))
    rec.record_prediction(0, 2, [7, 1, 0])
    rec.record(2, np.array([[7, 0]]), np.array([[0.6, 0.4]]))
    pos["n"] = 3
    rec.add_tokens([9])
    rec.record(0, np.array([[2, 1]]), np.array([[0.7, 0.3]]))
    rec.record_prediction(0, 2, np.array([[3, 4]]))
    rec.record_prediction(0, 5, [1])  # not a MoE layer: dropped
    rec.record(2, np.array([[3, 5]]), np.array([[0.9, 0.1]]))
    pos["n"] = 4
    rec.add_tokens([11])  # sampled, never run
    t = rec.finish()
    assert t.n_steps == 4 and list(t.layers) == [0, 2] and list(t.tokens) == [5, 6, 7, 9]
    assert list(t.batch) == [0, 0, 0, 1] and t.prompt_tokens == 3
    assert t.experts[:, 0].tolist() == [[1, 2], [3, 4], [5, 6], [2, 1]]
    assert t.experts[:, 1].tolist() == [[-1, -1], [-1, -1], [7, 0], [3, 5]]
    assert t.weights[0, 1].tolist() == [0, 0] and t.weights[3, 1].tolist() == pytest.approx([0.9, 0.1])
    assert t.predicted.shape == (4, 2, 2, 3) and rec.dropped_predictions == 1
    assert t.predicted[:3, 1, 1].tolist() == [[7, 1, 0]] * 3 and t.predicted[3, 1, 1].tolist() == [3, 4, -1]
    assert (t.predicted[:, 0] == -1).all() and (t.predicted[:, :, 0] == -1).all()


# -- recording a real model ------------------------------------------------------------------

@pytest.fixture(scope="module")
def moe(model_factory):
    return str(model_factory(MOE, "Q8_0", 7))


def _plan(path, **kw):
    from offload import arch

    g = GGUFFile(path)
    try:
        return make_plan(g, arch.model_args(g), MOE.n_ctx, 0, **kw)
    finally:
        g.close()


@pytest.mark.parametrize("policy,scope,ubatch", [("lru", "global", 512), ("lrfu", "global", 4), ("lfu", "layer", 3)])
def test_recorded_trace_matches_routing_and_the_store(moe, tmp_path, monkeypatch, policy, scope, ubatch):
    """The trace holds exactly what route() returned, and replaying it in the simulator gives
    the store's own hit and miss counts (no prefetch). Small micro-batches exercise prompts
    split into pieces, whose last layer runs for no row or one."""
    routed = []
    real_route = forward.route

    def spy(logits, k, kind, *more):
        chosen, weights = real_route(logits, k, kind, *more)
        routed.append((chosen.copy(), weights.copy()))
        return chosen, weights

    monkeypatch.setattr(forward, "route", spy)
    monkeypatch.setattr(forward, "N_UBATCH", ubatch)
    p = _plan(moe, prefetch_slots=0, scope=scope)
    budget = p.minimum + (6 if scope == "global" else 4 * 2) * p.pools[0].slot_bytes
    path = tmp_path / "run.npz"
    with Model.load(moe, memory_budget=budget, cache_policy=policy, cache_scope=scope, **NO_PREFETCH) as m:
        assert type(m.experts).__name__ == "TieredExperts" and not m.plan.all_resident
        ids = m.tokenize(PROMPT)
        out = list(m.generate_tokens(ids, 12, SamplingParams(temperature=0.0), record_trace=path))
        store = m.experts.stats
        caps = [pool.n_slots for pool in m.plan.pools]
        assert m.transformer.recorder is None
    t = RoutingTrace.load(path)
    assert t.equals(m.last_trace)
    n_steps = len(ids) + len(out) - 1  # the last sampled token never runs
    assert t.n_steps == n_steps and t.prompt_tokens == len(ids) and list(t.tokens) == ids + out[:-1]
    assert list(t.layers) == list(range(MOE.n_layer)) and t.k == 2 and t.n_expert == 16 and t.model.endswith(".gguf")
    # every route() call, in order, is in the trace: row for row, the batch's last rows
    calls = iter(routed)
    for b in np.unique(t.batch):
        steps = np.flatnonzero(t.batch == b)
        for li in range(t.n_layers):
            rows = steps[t.experts[steps, li, 0] >= 0]
            if len(rows) == 0:
                continue
            chosen, weights = next(calls)
            assert np.array_equal(t.experts[rows, li], chosen) and np.array_equal(t.weights[rows, li], weights)
            assert rows[-1] == steps[-1]
    assert next(calls, None) is None
    # the simulator sees the store's requests and makes the store's choices
    r = simulate(t, caps if scope == "layer" else caps[0], policy, scope)
    assert (r.hits, r.misses) == (store.hits, store.misses)
    assert r.hits > 0 and r.misses > 0


@pytest.mark.skipif("prefetch" not in inspect.signature(Model.load).parameters, reason="no routing predictor yet")
def test_predictions_are_recorded_when_a_predictor_runs(moe, tmp_path):
    p = _plan(moe)
    with Model.load(moe, memory_budget=p.minimum + 8 * p.pools[0].slot_bytes) as m:
        if getattr(m.transformer, "prefetcher", None) is None:
            pytest.skip("the model runs without a predictor")
        ids = m.tokenize(PROMPT)
        list(m.generate_tokens(ids, 6, SamplingParams(temperature=0.0), record_trace=tmp_path / "p.npz"))
    t = RoutingTrace.load(tmp_path / "p.npz")
    assert t.predicted is not None and t.predicted.shape[:2] == (t.n_steps, t.n_layers)
    pred = t.predicted[t.prompt_tokens:]
    assert (pred[:, 0] == -1).all()  # nothing comes before the first layer
    assert ((pred >= -1) & (pred < t.n_expert)).all() and (pred[:, 1:, 0] >= 0).any()


def test_cli_records_a_trace(moe, tmp_path):
    from click.testing import CliRunner

    from offload.cli import main

    path = tmp_path / "cli.npz"
    res = CliRunner().invoke(main, ["generate", moe, "-p", "Hello", "-n", "4", "--temp", "0",
                                    "--record-trace", str(path)])
    assert res.exit_code == 0, res.output
    t = RoutingTrace.load(path)
    assert t.n_steps == t.prompt_tokens + 3 and (t.experts[t.prompt_tokens - 1 :] >= 0).all()
    res = CliRunner().invoke(main, ["simulate", str(path), "--capacity", "50%"])
    assert res.exit_code == 0, res.output
    assert "belady" in res.output.lower() and "lrfu" in res.output
    res = CliRunner().invoke(main, ["generate", moe, "-p", "Hello", "-n", "2", "--record-trace",
                                    str(tmp_path / "missing" / "t.npz")])
    assert res.exit_code == 1 and "cannot write the routing trace" in res.output
    res = CliRunner().invoke(main, ["simulate", str(path), "--capacity", "1"])
    assert res.exit_code == 1 and "cannot hold" in res.output


# -- the simulator ------------------------------------------------------------------------------

def brute_force(trace: RoutingTrace, capacity: int, scope: str = "global") -> int:
    """The most hits any sequence of eviction choices gets (each miss evicts any unpinned
    resident of the full pool), by exhaustive search."""
    a = accesses(trace)
    pinned_n = sim._pinned_before(a, trace.k)
    caps = sim._capacities(trace, capacity, scope)
    keys = list(zip(a.layer.tolist(), a.expert.tolist()))
    pool = [0 if scope == "global" else li for li, _ in keys]

    @functools.lru_cache(maxsize=None)
    def best(i: int, state: tuple) -> int:
        if i == len(keys):
            return 0
        key, p = keys[i], pool[i]
        res = state[p]
        if key in res:
            return 1 + best(i + 1, state)
        options = []
        if len(res) < caps[p]:
            options.append(res | {key})
        else:
            pinned = set(keys[i - pinned_n[i] : i])
            options += [(res - {v}) | {key} for v in res if v not in pinned]
        return max(best(i + 1, state[:p] + (frozenset(o),) + state[p + 1 :]) for o in options)

    return best(0, tuple(frozenset() for _ in caps))


@pytest.mark.parametrize("seed", range(12))
def test_belady_is_the_exhaustive_optimum_and_bounds_every_policy(seed):
    rng = np.random.default_rng(seed)
    n_layers = int(rng.integers(1, 3))
    k = int(rng.integers(1, 3))
    t = random_trace(rng, n_steps=int(rng.integers(6, 10)), n_layers=n_layers, n_expert=int(rng.integers(k + 2, 6)),
                     k=k, batches=seed % 3 == 0)
    for scope in ("global", "layer"):
        for capacity in sorted({k * n_layers, k * n_layers + 1, k * n_layers + 2}):
            opt = brute_force(t, capacity, scope)
            b = belady(t, capacity, scope)
            assert b.hits == opt, (scope, capacity)
            assert b.accesses == len(accesses(t))
            for name in POLICY_NAMES:
                assert simulate(t, capacity, name, scope).hits <= opt


def naive_lru(trace: RoutingTrace, capacity: int) -> int:
    """LRU written out plainly (global scope): the victim is the least recently used resident
    that is not pinned, sparing the running layer's other experts while another can go."""
    a = accesses(trace)
    pinned_n = sim._pinned_before(a, trace.k)
    keys = list(zip(a.layer.tolist(), a.expert.tolist()))
    last: dict = {}  # resident key -> time of its last use
    hits = 0
    for i, key in enumerate(keys):
        if key in last:
            hits += 1
        elif len(last) >= capacity:
            c = a.call[i]
            wanted = set(keys[a.call_start[c] : a.call_start[c + 1]])
            pinned = set(keys[i - pinned_n[i] : i])
            free = [x for x in last if x not in pinned]
            spare = [x for x in free if x not in wanted] or free
            del last[min(spare, key=last.get)]
        last[key] = i
    return hits


@pytest.mark.parametrize("seed", range(6))
def test_simulated_lru_equals_a_plain_lru(seed):
    rng = np.random.default_rng(100 + seed)
    t = random_trace(rng, n_steps=60, n_layers=3, n_expert=8, k=int(rng.integers(1, 4)), batches=seed % 2 == 0)
    for capacity in (t.k, 2 * t.k + 1, 10):
        assert simulate(t, capacity, "lru").hits == naive_lru(t, capacity)


def test_belady_by_hand():
    def one_layer(seq, k=1, batch=None):
        ex = np.array(seq, dtype=np.int16).reshape(len(seq), 1, k)
        return RoutingTrace(ex, np.ones(ex.shape), [0], np.zeros(len(seq)), 8, k, batch=batch)

    # the textbook case: capacity 3, a b c d a b e a b c d e -> Belady misses 7 (hits 5)
    a, b, c, d, e = range(5)
    t = one_layer([a, b, c, d, a, b, e, a, b, c, d, e])
    assert (belady(t, 3).hits, belady(t, 3).misses) == (5, 7)
    assert simulate(t, 3, "lru").hits == 2  # LRU: a b, then a b again, then nothing else
    # cyclic access over capacity + 1 keys: LRU never hits, Belady keeps all but one
    t = one_layer([0, 1, 2, 3] * 5)
    assert simulate(t, 3, "lru").hits == 0
    assert belady(t, 3).misses == 4 + 5  # 3 cold misses and the first 3; then one in every 3 (at 6, 9, ... 18)
    # pinning: with k = 2 the running layer's pair cannot evict each other; capacity 2 means
    # every new pair replaces the old one entirely
    t = one_layer([[0, 1], [2, 3], [0, 1]], k=2)
    assert belady(t, 2).hits == 0 and belady(t, 3).hits == 1 and belady(t, 4).hits == 2
    # a batch asks for its distinct experts once: two tokens on the same pair, then the pair again
    t = one_layer([[0, 1], [1, 0], [0, 1]], k=2, batch=np.array([0, 0, 1]))
    assert (belady(t, 2).hits, belady(t, 2).misses) == (2, 2)


def test_from_step_and_compare():
    t = random_trace(np.random.default_rng(3), n_steps=40, n_layers=2, n_expert=8, k=2, batches=True)
    full, decode = belady(t, 6), belady(t, 6, from_step=t.prompt_tokens)
    assert decode.accesses == len(accesses(t)) - np.count_nonzero(accesses(t).step < t.prompt_tokens)
    assert decode.accesses < full.accesses
    rows = compare(t, ["25%", 0.5, 16])
    assert [r["capacity"] for r in rows] == [4, 8, 16]
    assert rows[-1]["belady"] == rows[-1]["lru"] == rows[-1]["lrfu"]  # everything fits: cold misses only
    for r in rows:
        assert all(r[p] <= r["belady"] + 1e-12 for p in POLICY_NAMES)


def test_simulator_is_fast():
    import time

    rng = np.random.default_rng(0)
    n_steps, n_layers, n_expert, k = 4000, 16, 64, 4  # 256k accesses, skewed
    p = 1.0 / np.arange(1, n_expert + 1)
    p /= p.sum()
    gumbel = np.log(p) - np.log(-np.log(rng.random((n_steps, n_layers, n_expert))))
    experts = np.argsort(-gumbel, axis=2)[:, :, :k]  # k distinct draws per token and layer, without replacement
    t = RoutingTrace(experts, np.ones(experts.shape), np.arange(n_layers), np.zeros(n_steps), n_expert, k)
    t0 = time.perf_counter()
    stream = accesses(t)
    opt = belady(t, 256, stream=stream)
    lru = simulate(t, 256, "lru", stream=stream)
    elapsed = time.perf_counter() - t0
    assert opt.accesses == lru.accesses == n_steps * n_layers * k
    assert lru.hit_rate <= opt.hit_rate
    assert elapsed < 15, elapsed
