"""`offload tune`: the sweep runs real settings, keeps the best per budget, finds the knee,
and its recommended flags are ones `offload generate` accepts and that reproduce the
budget's plan; the trace mode replays a recorded trace."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from offload import Model
from offload.testing import TinyConfig
from offload.tune import KNEE_SHARE, Run, ascii_plot, flags_for, knee, tune, tune_trace

SHAPE = TinyConfig(n_layer=3, n_embd=256, n_head=4, n_head_kv=2, n_ff=256, n_expert=16, n_expert_used=2)


def cli(*args):
    return subprocess.run([sys.executable, "-m", "offload", *map(str, args)], capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def model(model_factory):
    return model_factory(SHAPE, "Q8_0", 4)


def run(budget, tok_s, depth=1, policy="lrfu"):
    return Run(budget=budget, share=0.5, policy=policy, prefetch_depth=depth, tok_s=tok_s, hit_rate=0.5,
               stall_share=0.1, bytes_read_per_token=0.0)


def test_knee_is_the_smallest_budget_near_the_best():
    best = [run(100, 10.0), run(200, 50.0), run(300, 95.0), run(400, 100.0)]
    assert knee(best, "tok_s").budget == 300  # 95 >= 0.9 * 100, 50 is not
    assert KNEE_SHARE == 0.9
    assert knee([], "tok_s") is None


def test_flags_round_up_the_budget_and_name_the_prefetch_setting():
    assert flags_for("m.gguf", run(3 * 2**20 + 1, 1.0, depth=0)) == \
        "offload chat m.gguf --memory-budget 4MiB --cache-policy lrfu --no-prefetch"
    assert flags_for("m.gguf", run(2**20, 1.0, depth=2, policy="lfu"), "generate").endswith(
        "--memory-budget 1MiB --cache-policy lfu --prefetch-depth 2")


def test_ascii_plot_puts_the_best_point_on_top():
    lines = ascii_plot([1, 2, 3], [1.0, 5.0, 2.0], width=10, height=4).splitlines()
    assert lines[0] == "tok/s" and lines[1].strip().startswith("5.0")
    assert lines[1].index("*") == lines[1].index("|") + 1 + round((2 - 1) / 2 * 9)


def test_sweep_runs_every_setting_and_keeps_the_best(model):
    result = tune(model, shares=(0.0, 1.0), policies=("lru", "lrfu"), depths=(0, 1), n_tokens=6, n_ctx=128)
    assert len(result.runs) == 2 * 2 * 2
    budgets = [r.budget for r in result.best]
    assert budgets == sorted(budgets) and len(set(budgets)) == 2
    for b in result.best:
        same_budget = [r for r in result.runs if r.budget == b.budget]
        assert b.tok_s == max(r.tok_s for r in same_budget)
    full = result.best[-1]
    assert full.share == 1.0 and full.hit_rate == 1.0 and full.bytes_read_per_token == 0.0
    low = result.best[0]
    assert low.share < 1.0 and low.bytes_read_per_token > 0  # the minimum reads experts while decoding
    assert result.knee in result.best


def test_cli_tune_recommends_flags_that_generate_accepts(model):
    out = cli("tune", model, "-n", "4", "--budgets", "0,100", "--prefetch-depth", "0,1", "--plot", "")
    assert out.returncode == 0, out.stderr
    use = re.search(r"^use: offload \w+ (\S+) (.*)$", out.stdout, re.M)
    assert use, out.stdout
    flags = use.group(2).split()
    budget = flags[flags.index("--memory-budget") + 1]
    gen = cli("generate", model, "-p", "Hi", "-n", "2", "--temp", "0", *flags)
    assert gen.returncode == 0, gen.stderr
    with Model.load(model, n_ctx=512, memory_budget=budget) as m:
        assert m.plan.budget >= m.plan.minimum


def test_cli_tune_replays_a_trace(model, tmp_path):
    trace = tmp_path / "t.npz"
    gen = cli("generate", model, "-p", "Once upon a time there was", "-n", "24", "--temp", "0",
              "--memory-budget", "1GB", "--record-trace", trace)
    assert gen.returncode == 0, gen.stderr
    out = cli("tune", "--trace", trace, "--cache-policy", "lru", "--cache-policy", "lfu", "--plot", "")
    assert out.returncode == 0, out.stderr
    rows = [l for l in out.stdout.splitlines() if re.match(r"^\s*\d+\.\d%\s+\d+\s", l)]
    assert len(rows) >= 4
    belady = [float(l.split()[-2].rstrip("%")) for l in rows]
    for l, b in zip(rows, belady):  # no policy beats the optimum
        assert all(float(c.rstrip("%")) <= b + 1e-9 for c in l.split()[2:4])
    assert "knee:" in out.stdout


def test_cli_tune_rejects_bad_sweeps(model):
    out = cli("tune", model, "--budgets", "0,150")
    assert out.returncode == 1 and out.stderr.startswith("offload: error:") and len(out.stderr.splitlines()) == 1


def test_cli_tune_with_a_trace_ends_with_the_budget_to_use(model, tmp_path):
    """MODEL --trace T: the knee's slots become a --memory-budget, and a model loaded with it
    has at least those slots (the smallest such budget, to a MiB)."""
    trace = tmp_path / "t.npz"
    gen = cli("generate", model, "-p", "Once upon a time there was", "-n", "24", "--temp", "0",
              "--memory-budget", "1GB", "--record-trace", trace)
    assert gen.returncode == 0, gen.stderr
    out = cli("tune", model, "--trace", trace, "--plot", "", "-c", 512)
    assert out.returncode == 0, out.stderr
    slots = tune_trace(str(trace))[1]["capacity"]
    use = re.search(r"^use: offload \w+ (\S+) --memory-budget (\d+)MiB --cache-policy (\w+) -c 512$", out.stdout, re.M)
    assert use and use.group(1) == str(model), out.stdout
    budget = int(use.group(2)) << 20
    with Model.load(model, n_ctx=512, memory_budget=budget, cache_policy=use.group(3)) as m:
        assert m.plan.slots >= slots or m.plan.all_resident
    with Model.load(model, n_ctx=512, memory_budget=budget - (2 << 20), o_direct=True) as m:
        assert m.plan.slots < slots and not m.plan.all_resident
    out = cli("tune", "--trace", trace, "--plot", "")  # a trace alone names its file, not where it is
    assert out.returncode == 0 and "give the model file too" in out.stdout


def test_the_knee_runs_both_read_paths_and_keeps_the_faster(model):
    result = tune(model, shares=(0.0,), depths=(0,), n_tokens=4, n_ctx=128)
    k, other = result.knee, result.other_io
    assert k.share < 1.0 and k.o_direct and other is not None and not other.o_direct
    assert (other.budget, other.policy, other.prefetch_depth) == (k.budget, k.policy, k.prefetch_depth)
    assert result.o_direct == (k.tok_s >= other.tok_s)
    out = cli("tune", model, "-n", "4", "--budgets", "0", "--prefetch-depth", "0", "--plot", "")
    assert out.returncode == 0, out.stderr
    assert "reads at the knee: pread + O_DIRECT" in out.stdout
    assert re.search(r"^use: .* --(no-)?o-direct$", out.stdout, re.M), out.stdout
