"""The tiered expert store: budgets, the memory plan, identical results under any budget,
policy and O_DIRECT setting, slot contents under concurrency, read errors, and RSS."""

from __future__ import annotations

import errno
import json
import random
import subprocess
import sys
import threading
import time

import numpy as np
import psutil
import pytest

from offload import Model
from offload.errors import BudgetError, ExpertReadError, OffloadError
from offload.gguf_file import GGUFFile
from offload.sampling import SamplingParams
from offload.store import loader as loader_module
from offload.store import make_plan, parse_budget
from offload.store.arena import READY
from offload.store.policy import LFU, LRFU, LRU
from offload.testing import TinyConfig
from offload.weights import expert_layouts

# Experts are most of the file: 4 layers x 32 experts of 52 KiB (Q8_0).
MANY = TinyConfig(n_layer=4, n_embd=64, n_head=4, n_head_kv=2, n_ff=256, n_expert=32, n_expert_used=2, n_ctx=128)
PROMPT = "Once upon a time there was a little"


@pytest.fixture(scope="module")
def many(model_factory):
    return str(model_factory(MANY, "Q8_0", 3))


@pytest.fixture(scope="module")
def reference(many):
    """Logits and greedy tokens with every expert in the file's memory map (no budget)."""
    with Model.load(many) as m:
        ids = m.tokenize(PROMPT)
        assert type(m.experts).__name__ == "ResidentExperts"
        logits = m.logits(ids)
        tokens = list(m.generate_tokens(ids, 8, SamplingParams(temperature=0.0)))
        sampled = list(m.generate_tokens(ids, 8, SamplingParams(temperature=1.0, seed=5)))
        return ids, logits, tokens, sampled


def plan_for(path, budget=0, **kw):
    g = GGUFFile(path)
    try:
        from offload import arch

        return make_plan(g, arch.model_args(g), MANY.n_ctx, budget, **kw)
    finally:
        g.close()


def file_bytes(path, layer, expert):
    """The three matrices of (layer, expert), read straight from the file."""
    g = GGUFFile(path)
    try:
        from offload import arch

        lay = expert_layouts(g, arch.model_args(g))[layer]
        with open(path, "rb") as f:
            out = []
            for part in lay.parts:
                off, n = part.range(expert)
                f.seek(off)
                out.append(f.read(n))
        return out
    finally:
        g.close()


# -- budgets and plans -------------------------------------------------------------------

def test_parse_budget():
    assert parse_budget("6GB") == 6 * 10**9
    assert parse_budget("6GiB") == 6 * 2**30
    assert parse_budget("512MB") == 512 * 10**6
    assert parse_budget("512 MiB") == 512 * 2**20
    assert parse_budget("1.5G") == int(1.5 * 2**30)
    assert parse_budget("4096") == 4096 and parse_budget(4096) == 4096
    assert parse_budget("60%") == int(psutil.virtual_memory().total * 0.6)
    for bad in ("", "GB", "6XB", "-1GB", "0", "150%", "0%", "six"):
        with pytest.raises(BudgetError):
            parse_budget(bad)


def test_plan_minimum_and_share(many):
    p = plan_for(many)
    slot = p.pools[0].slot_bytes
    assert len(p.pools) == 1 and p.n_experts == MANY.n_layer * MANY.n_expert
    assert slot >= 3 * MANY.n_embd * MANY.n_ff * 34 // 32 and slot % 4096 == 0
    assert p.minimum == p.fixed + 2 * MANY.n_expert_used * slot  # top-k + a prefetch reserve of k
    q = plan_for(many, p.minimum + 10 * slot + slot // 2)
    assert q.slots == 2 * MANY.n_expert_used + 10 and q.planned <= q.budget and not q.all_resident
    assert plan_for(many, p.full).all_resident
    layer = plan_for(many, p.minimum, scope="layer")
    assert len(layer.pools) == MANY.n_layer and layer.minimum == layer.fixed + MANY.n_layer * 4 * slot
    direct = plan_for(many, 0, o_direct=True)
    assert direct.pools[0].slot_bytes >= slot


def test_budget_below_minimum_is_refused_with_the_minimum(many):
    """Below the default micro-batch's minimum a smaller micro-batch runs (store.plan); below
    the smallest one's a context given is refused, naming the longest that fits, and without
    one the longest that fits runs; a budget that fits no context at all is refused."""
    p = plan_for(many)
    low = p.minimum_at_smallest_ubatch - 1
    with pytest.raises(BudgetError) as e:  # a context given: refused, naming the longest that fits
        Model.load(many, memory_budget=low, n_ctx=MANY.n_ctx)
    msg = str(e.value)
    assert "\n" not in msg and "minimum" in msg and "(-c " in msg
    with Model.load(many, memory_budget=low) as m:  # by default, the context that fits
        assert m.n_ctx < MANY.n_ctx
    Model.load(many, memory_budget=p.minimum_at_smallest_ubatch, n_ctx=MANY.n_ctx).close()
    tiny = p.minimum_at_smallest_ubatch - p.kv_cache  # below the minimum with no context at all
    with pytest.raises(BudgetError) as e:
        Model.load(many, memory_budget=tiny - p.scratch)
    assert "minimum" in str(e.value)
    Model.load(many, memory_budget=p.minimum).close()


def _file_backed(a: np.ndarray) -> bool:
    """Whether an array's memory is the file's memory map (its bases end in an mmap)."""
    import mmap

    while a is not None:
        if isinstance(a, mmap.mmap):
            return True
        a = getattr(a, "base", None)
    return False


def test_weights_leave_the_memory_map_under_a_memory_cap(many, reference, monkeypatch):
    """Under a memory cap the page cache counts against the cap, and the kernel drops clean
    file pages first: the non-expert weights are copied out of the map (the same logits)."""
    from offload import model as model_module

    ids, logits, _, _ = reference
    p = plan_for(many)

    def weight_arrays(m):
        w = m.transformer.weights
        layer = w.layers[0]
        return [w.token_embd.data, w.output.data, layer.attn.wq.data, layer.attn.wo.data, layer.moe.router.data]

    with Model.load(many, memory_budget=p.minimum) as m:  # no cap: the weights stay in the map
        assert all(_file_backed(a) for a in weight_arrays(m))
    monkeypatch.setattr(model_module, "memory_cap", lambda: "/sys/fs/cgroup/memory/test/memory.limit_in_bytes")
    with Model.load(many, memory_budget=p.minimum) as m:
        assert not any(_file_backed(a) for a in weight_arrays(m))
        w = m.transformer.weights
        assert (w.output is w.token_embd) == (m.gguf.tensors.get("output.weight") is None)  # a tied output stays tied
        np.testing.assert_array_equal(m.logits(ids), logits)
    with Model.load(many, memory_budget=2 * p.full) as m:  # every expert resident: the map is read once, kept as is
        assert all(_file_backed(a) for a in weight_arrays(m))


def test_full_budget_loads_everything_and_reads_nothing_after(many, reference):
    ids, logits, tokens, _ = reference
    p = plan_for(many)
    with Model.load(many, memory_budget=p.full) as m:
        s = m.store_stats()
        assert m.experts.all_resident and s["load_bytes"] == p.expert_bytes_total
        assert np.array_equal(m.logits(ids), logits)
        assert list(m.generate_tokens(ids, 8, SamplingParams(temperature=0.0))) == tokens
        s = m.stats()
        assert s["bytes_read"] == 0 and s["misses"] == 0 and s["hits"] > 0 and s["bytes_read_per_token"] == 0


# -- results do not depend on where the bytes live ------------------------------------------

@pytest.mark.parametrize("o_direct", [False, True])
def test_identical_logits_and_tokens_across_budgets(many, reference, o_direct):
    ids, logits, tokens, sampled = reference
    p = plan_for(many, o_direct=o_direct)
    slot = p.pools[0].slot_bytes
    budgets = [p.minimum, p.minimum + 7 * slot, (p.minimum + p.full) // 2, p.full - slot, p.full]
    misses = []
    for b in budgets:
        with Model.load(many, memory_budget=b, o_direct=o_direct) as m:
            assert np.array_equal(m.logits(ids), logits), b
            assert list(m.generate_tokens(ids, 8, SamplingParams(temperature=0.0))) == tokens, b
            assert list(m.generate_tokens(ids, 8, SamplingParams(temperature=1.0, seed=5))) == sampled, b
            misses.append(m.stats()["misses"])
    assert misses[0] > misses[2] > 0 and misses[-1] == 0  # the budget changes the I/O, not the results


@pytest.mark.parametrize("policy", ["lru", "lfu", "lrfu"])
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_identical_logits_for_every_policy(many, reference, policy, scope):
    ids, logits, tokens, _ = reference
    p = plan_for(many, scope=scope)
    with Model.load(many, memory_budget=p.minimum + 3 * p.pools[0].slot_bytes, cache_policy=policy,
                    cache_scope=scope) as m:
        assert m.experts.policy == policy
        assert np.array_equal(m.logits(ids), logits)
        assert list(m.generate_tokens(ids, 8, SamplingParams(temperature=0.0))) == tokens
        s = m.stats()
        assert s["misses"] > 0 and s["evictions"] > 0 and s["bytes_read"] > 0 and s["stall_seconds"] > 0
        assert s["bytes_read_per_token"] > 0 and s["peak_rss_bytes"] >= s["resident_bytes"] > 0


def test_unknown_policy_is_an_error(many):
    with pytest.raises(OffloadError, match="cache policy"):
        Model.load(many, memory_budget="1GB", cache_policy="fifo")


def test_mixed_quant_layers_get_slot_pools_of_their_size(model_factory, tmp_path):
    """llama.cpp's Q4_K_M gives some layers Q6_K ffn_down: their experts are bigger, so the
    plan makes one pool per expert size; results stay identical."""
    from offload.testing import quantize_model

    cfg = TinyConfig(n_layer=4, n_embd=256, n_head=4, n_head_kv=2, n_ff=256, n_expert=8, n_expert_used=2, n_ctx=128)
    path = str(quantize_model(model_factory(cfg, "F32", 1), tmp_path / "q4km.gguf", "Q4_K_M", n_threads=1))
    with Model.load(path) as m:
        ids = m.tokenize(PROMPT)
        ref = m.logits(ids)
    for o_direct in (False, True):
        g = GGUFFile(path)
        from offload import arch

        p = make_plan(g, arch.model_args(g), MANY.n_ctx, 0, o_direct=o_direct)
        g.close()
        assert len({pool.slot_bytes for pool in p.pools}) == 2
        for b in (p.minimum, (p.minimum + p.full) // 2, p.full):
            with Model.load(path, memory_budget=b, o_direct=o_direct) as m:
                assert np.array_equal(m.logits(ids), ref)
                assert all(pool.n_slots >= pool.min_slots for pool in m.plan.pools)


# -- slots: content, pinning, concurrency --------------------------------------------------

def test_slots_hold_the_right_bytes_under_random_access_and_prefetch(many):
    """A tiny budget, random gets on one thread and random prefetches on another: every FFN
    handed out holds exactly its expert's bytes, and so do the pinned ones of its layer."""
    p = plan_for(many)
    truth = {(l, e): file_bytes(many, l, e) for l in range(MANY.n_layer) for e in range(MANY.n_expert)}
    for o_direct in (False, True):
        with Model.load(many, memory_budget=plan_for(many, o_direct=o_direct).minimum + p.pools[0].slot_bytes,
                        o_direct=o_direct) as m:
            store, k = m.experts, MANY.n_expert_used
            stop = threading.Event()

            def prefetcher():
                rng = random.Random(1)
                while not stop.is_set():
                    store.prefetch(rng.randrange(MANY.n_layer), rng.sample(range(MANY.n_expert), 3))
                    time.sleep(0.0001)

            t = threading.Thread(target=prefetcher)
            t.start()
            try:
                rng = random.Random(0)
                for _ in range(600):
                    layer = rng.randrange(MANY.n_layer)
                    held = []
                    for e in rng.sample(range(MANY.n_expert), k + rng.randrange(3)):
                        ffn = store.get(layer, e)
                        held.append((e, ffn))
                        for e2, f2 in held[-k:]:  # the last k handed out are pinned: still intact
                            got = [f2.gate.data.tobytes(), f2.up.data.tobytes(), f2.down.data.tobytes()]
                            assert got == truth[(layer, e2)], (layer, e2)
            finally:
                stop.set()
                t.join()
            s = store.stats
            assert s.misses > 100 and s.evictions > 100 and s.prefetches > 0 and s.read_errors == 0


def test_a_slot_in_use_is_not_evicted(many):
    p = plan_for(many, prefetch_slots=0)
    assert p.pools[0].min_slots == MANY.n_expert_used
    with Model.load(many, memory_budget=p.minimum, prefetch_slots=0) as m:
        store = m.experts
        assert store.plan.slots == 2
        a = store.get(0, 1)
        b = store.get(0, 2)  # both slots now pinned by layer 0
        assert store.slot_of(0, 1).pins == 1 and store.slot_of(0, 2).pins == 1
        assert a.gate.data.tobytes() == file_bytes(many, 0, 1)[0]
        store.get(1, 3)  # a new layer releases layer 0's pins; one of them gives way
        assert store.slot_of(1, 3).state == READY and (store.slot_of(0, 1) is None) != (store.slot_of(0, 2) is None)
        assert b is not None


# -- read errors -----------------------------------------------------------------------

def test_read_error_is_clean_and_the_model_continues(many, reference, monkeypatch):
    ids, logits, tokens, _ = reference
    p = plan_for(many)
    real = loader_module.read_ranges
    calls = {"n": 0}

    def flaky(fd, buf, ranges):
        calls["n"] += 1
        if calls["n"] == 20:
            raise OSError(errno.EIO, "Input/output error")
        return real(fd, buf, ranges)

    with Model.load(many, memory_budget=p.minimum + 2 * p.pools[0].slot_bytes) as m:
        monkeypatch.setattr(loader_module, "read_ranges", flaky)
        with pytest.raises(ExpertReadError) as e:
            list(m.generate_tokens(ids, 8, SamplingParams(temperature=0.0)))
        assert "Input/output error" in str(e.value) and "\n" not in str(e.value)
        assert m.experts.stats.read_errors == 1
        # the next run reads again and gets the same result as without the error
        assert np.array_equal(m.logits(ids), logits)
        assert list(m.generate_tokens(ids, 8, SamplingParams(temperature=0.0))) == tokens


def test_read_error_while_loading_everything(many, monkeypatch):
    def broken(fd, buf, ranges):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(loader_module, "read_ranges", broken)
    before = {t.ident for t in threading.enumerate()}
    with pytest.raises(ExpertReadError, match="Input/output error"):
        Model.load(many, memory_budget="1GB")
    assert not [t for t in threading.enumerate() if t.ident not in before]  # the loader thread is gone


# -- policies --------------------------------------------------------------------------

def test_policies_pick_their_victims():
    lru, lfu, lrfu = LRU(), LFU(), LRFU(half_life=4)
    for p in (lru, lfu, lrfu):
        for k in ["a", "a", "a", "b", "c", "b"]:
            p.access(k)
    assert lru.victim(["a", "b", "c"]) == "a"  # oldest use
    assert lfu.victim(["a", "b", "c"]) == "c"  # fewest uses
    assert lrfu.victim(["a", "b", "c"]) == "c"
    for _ in range(12):  # b is used again and again: a's old count decays away
        lrfu.access("b")
        lfu.access("b")
    lrfu.access("c")
    assert lrfu.victim(["a", "b", "c"]) == "a" and lfu.victim(["a", "c"]) == "c"


# -- the CLI ---------------------------------------------------------------------------

def cli(*args):
    return subprocess.run([sys.executable, "-m", "offload", *map(str, args)], capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)


def test_cli_inspect_plan_and_generate_counters(many):
    p = plan_for(many)
    r = cli("inspect", many, "-c", MANY.n_ctx, "--memory-budget", p.minimum + 10 * p.pools[0].slot_bytes)
    assert r.returncode == 0, r.stderr
    assert "expert slots      14 of 52.0 KiB" in r.stdout and "(11% of 128 experts" in r.stdout
    r = cli("generate", many, "-n", 6, "--temp", 0, "-c", MANY.n_ctx, "--memory-budget", p.minimum,
            "--cache-policy", "lru")
    assert r.returncode == 0, r.stderr
    assert "4 expert slots" in r.stderr and "misses" in r.stderr and "read per token" in r.stderr
    r = cli("generate", many, "-n", 6, "-c", MANY.n_ctx, "--memory-budget", "1MB")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "minimum" in r.stderr
    r = cli("generate", many, "-n", 6, "--memory-budget", "lots")
    assert r.returncode == 1 and r.stderr.startswith("offload: error: memory budget 'lots'")


# -- RSS stays within the budget -----------------------------------------------------------

# F32 experts, 6 layers x 64 of 384 KiB: 144 MiB of experts, several times the minimum budget.
BIG = TinyConfig(n_layer=6, n_embd=64, n_head=4, n_head_kv=2, n_ff=512, n_expert=64, n_expert_used=2, n_ctx=128)

_RSS_SCRIPT = r"""
import gc, json, sys
import psutil
from offload import Model
from offload.sampling import SamplingParams
warm, big, budgets = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

with Model.load(warm) as m:  # compile the kernels, load llama.cpp: the libraries' share
    ids = m.tokenize("Once upon a time there was a little")
    m.logits(ids)
    list(m.generate_tokens(ids, 3, SamplingParams(temperature=0.0)))
del m  # its memory map goes now, not inside the measurement
out = []
for b in budgets:
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = psutil.Process().memory_info().rss
    with Model.load(big, memory_budget=b) as m:
        m.logits(ids)
        long = (m.tokenize("Once upon a time there was a little fox who lived in the woods. " * 10))[:110]
        list(m.generate_tokens(long, 8, SamplingParams(temperature=0.0)))  # a prompt of most of the context
        s = m.stats()
        out.append({"budget": b, "growth": hwm() - base, "misses": s["misses"], "slots": m.plan.slots,
                    "model": m.plan.full})
    del m
print(json.dumps(out))
"""


def test_peak_rss_stays_within_the_budget(model_factory):
    warm = model_factory(TinyConfig(n_layer=1, n_embd=64, n_head=4, n_head_kv=2, n_ff=512, n_expert=4,
                                    n_expert_used=2, n_ctx=128), "F32", 0)
    big = str(model_factory(BIG, "F32", 0))
    g = GGUFFile(big)
    from offload import arch

    p = make_plan(g, arch.model_args(g), BIG.n_ctx, 0)
    g.close()
    assert p.full - p.runtime > 3 * (p.minimum - p.runtime)  # budgets well apart, for the model itself
    budgets = [p.minimum, 2 * p.minimum, (p.minimum + p.full) // 2, p.full]
    r = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(warm), big, json.dumps(budgets)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout.strip().splitlines()[-1])
    for row in rows:  # the compiled kernels were paid by the warm-up: the rest of the plan must hold
        assert row["growth"] <= (row["budget"] - p.runtime) * 1.05, row
    assert rows[0]["misses"] > rows[2]["misses"] > rows[3]["misses"] == 0
    assert rows[0]["growth"] > (p.fixed - p.runtime) / 3  # the measurement sees the model (not a no-op)
    # the arena really is used: the full budget grows the process by at least the experts
    assert rows[-1]["growth"] > p.expert_bytes_total


_COLD_RSS_SCRIPT = r"""
import json, sys
import psutil
from offload import Model
from offload.sampling import SamplingParams
path, budget, n_ctx = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
base = psutil.Process().memory_info().rss
with Model.load(path, memory_budget=budget, n_ctx=n_ctx) as m:
    ids = m.tokenize("And it came to pass that the fox lived in the woods. " * 200)[: n_ctx - 16]
    list(m.generate_tokens(ids, 16, SamplingParams(temperature=0.8, seed=1)))  # a prompt of the whole context
    s = m.stats()
    print(json.dumps({"growth": s["peak_rss_bytes"] - base, "misses": s["misses"], "runtime": m.plan.runtime,
                      "numba": "numba" in sys.modules}))
"""


@pytest.mark.parametrize("which,kernels", [("demo", "c"), ("demo", "numba"), ("big", "c")])
def test_a_fresh_process_stays_within_the_budget(which, kernels, model_factory):
    """The first model a process loads pays for the libraries it loads too (llama.cpp's; with
    the Numba kernels, Numba and its LLVM): the plan counts them, so peak RSS growth from
    `import offload` stays within the budget, at the minimum and with every expert resident,
    with a whole context of prompt. With the C kernels Numba is never loaded and the plan
    counts only the small allowance (RUNTIME_BYTES), so the bound is that much tighter."""
    import os

    from offload import arch
    from offload.demo import demo_model_path
    from offload.store.plan import NUMBA_RUNTIME_BYTES, RUNTIME_BYTES

    path = demo_model_path() if which == "demo" else str(model_factory(BIG, "F32", 0))
    env = dict(os.environ, OFFLOAD_KERNELS=kernels)
    g = GGUFFile(path)
    n_ctx = 512 if which == "demo" else BIG.n_ctx
    p = make_plan(g, arch.model_args(g), n_ctx, 0)
    g.close()
    runtime = RUNTIME_BYTES + (NUMBA_RUNTIME_BYTES if kernels == "numba" else 0)
    minimum = p.minimum - p.runtime + runtime  # this process plans for the C kernels
    full = p.full - p.runtime + runtime
    for budget in (minimum, full):
        r = subprocess.run([sys.executable, "-c", _COLD_RSS_SCRIPT, path, str(budget), str(n_ctx)],
                           capture_output=True, text=True, timeout=300, env=env)
        assert r.returncode == 0, r.stderr
        row = json.loads(r.stdout.strip().splitlines()[-1])
        assert row["runtime"] == runtime and row["numba"] == (kernels == "numba"), row
        assert row["growth"] <= budget, (budget, row)
        assert row["growth"] > runtime / 2  # the libraries' cost is in the measurement
        assert (row["misses"] > 0) == (budget < full)
