"""O_DIRECT by default under a memory cap: in a cgroup with a memory limit, the page cache is
charged to the same limit as the expert slots, so reads through it thrash; Model.load reads
around it there unless told otherwise (and only where the budget leaves experts on disk)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

import offload.model
from offload import Model, arch
from offload.gguf_file import GGUFFile
from offload.sampling import SamplingParams
from offload.store import budget, make_plan
from offload.testing import TinyConfig, make_memory_cgroup

MANY = TinyConfig(n_layer=4, n_embd=64, n_head=4, n_head_kv=2, n_ff=256, n_expert=32, n_expert_used=2, n_ctx=128)
CAP_FILE = "/sys/fs/cgroup/memory/box/memory.limit_in_bytes"


@pytest.fixture(scope="module")
def many(model_factory):
    return str(model_factory(MANY, "Q8_0", 3))


@pytest.fixture(scope="module")
def budgets(many):
    g = GGUFFile(many)
    try:
        p = make_plan(g, arch.model_args(g), MANY.n_ctx, 0, o_direct=True)
    finally:
        g.close()
    return p.minimum + 8 * p.pools[0].slot_bytes, p.full + (1 << 20)


@pytest.fixture
def capped(monkeypatch):
    monkeypatch.setattr(budget, "cgroup_limit", lambda *a: (1 << 30, 200 << 20, CAP_FILE))


def test_a_memory_cap_turns_o_direct_on(capped, many, budgets):
    tight, _ = budgets
    with Model.load(many, n_ctx=MANY.n_ctx, memory_budget=tight) as m:
        assert m.plan.o_direct and not m.plan.all_resident
        assert m.experts._o_direct
        assert f"O_DIRECT (memory limit in {CAP_FILE})" in "\n".join(m.plan.describe())


def test_asked_for_or_against_it_wins(capped, many, budgets):
    tight, _ = budgets
    with Model.load(many, n_ctx=MANY.n_ctx, memory_budget=tight, o_direct=False) as m:
        assert not m.plan.o_direct


def test_no_o_direct_where_every_expert_fits_or_nothing_caps(monkeypatch, many, budgets):
    tight, whole = budgets
    monkeypatch.setattr(budget, "cgroup_limit", lambda *a: (1 << 30, 200 << 20, CAP_FILE))
    with Model.load(many, n_ctx=MANY.n_ctx, memory_budget=whole) as m:
        assert m.plan.all_resident and not m.plan.o_direct  # read once at load
    monkeypatch.setattr(offload.model, "supports_o_direct", lambda path: False)  # tmpfs, say
    with Model.load(many, n_ctx=MANY.n_ctx, memory_budget=tight) as m:
        assert not m.plan.o_direct
    monkeypatch.setattr(budget, "cgroup_limit", lambda *a: None)
    with Model.load(many, n_ctx=MANY.n_ctx, memory_budget=tight) as m:
        assert not m.plan.o_direct


def test_a_process_in_a_memory_cgroup_reads_experts_with_o_direct(many, budgets):
    """A real cgroup (v1, where this machine lets us make one): the child finds the cap, reads
    its experts with O_DIRECT, and decodes the tokens an uncapped run (page cache) decodes."""
    tight, _ = budgets
    run = (f"import sys; from offload import Model; from offload.sampling import SamplingParams\n"
           f"with Model.load({many!r}, n_ctx={MANY.n_ctx}, memory_budget={tight}) as m:\n"
           f"    out = list(m.generate_tokens([1, 300, 500, 700], 12, SamplingParams(temperature=0.0)))\n"
           f"    print(m.plan.o_direct, m.plan.o_direct_reason.replace(' ', '_'), m.experts.stats.reads, *out)\n")
    with Model.load(many, n_ctx=MANY.n_ctx, memory_budget=tight) as m:
        assert not m.plan.o_direct or budget.memory().limit_source is not None
        want = list(m.generate_tokens([1, 300, 500, 700], 12, SamplingParams(temperature=0.0)))
    group = make_memory_cgroup(1 << 30, "offload-direct")
    if group is None:
        pytest.skip("cannot make a memory cgroup here")
    try:
        enter = f"echo $$ > {group}/cgroup.procs && exec \"$@\""
        r = subprocess.run(["sh", "-c", enter, "sh", sys.executable, "-c", run], capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr
        direct, reason, reads, *tokens = r.stdout.split()
        assert direct == "True" and str(group) in reason and int(reads) > 0
        assert [int(t) for t in tokens] == want
    finally:
        for _ in range(50):  # the group empties when the child has gone
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.1)
