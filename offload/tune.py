"""`offload tune MODEL`: which memory budget and cache settings to use on this machine.

It runs a short real workload per setting: the same prompt, then greedy decoding of a few
tokens, with the page cache bypassed (O_DIRECT) so that disk costs what it costs when the
model does not fit in RAM. The sweep covers budgets from the model's minimum to the one
that holds every expert, and for each budget the cache policies and prefetch depths asked
for. Per budget the best setting is kept; the table shows tok/s, hit rate and the share of
decode time stalled on I/O. The knee is the smallest budget that reaches `KNEE_SHARE` of
the best tok/s: past it, more memory buys little. Where the knee reads experts from disk,
its setting runs once more reading through the page cache instead, and the faster of the
two read paths (pread + O_DIRECT, or the page cache: it depends on the machine's disk, its
free RAM and any memory cap) goes into the flags. The report ends with the flags to use.

With `--trace FILE` (a recorded routing trace) nothing runs: the trace is replayed through
the simulator for each policy and capacity, next to Belady's optimum, and the knee is taken
on hit rate instead of tok/s; with the model file too, the knee's slots become the memory
budget that buys them (`budget_for_slots`) and the report ends with the flags to use.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from .cache_types import DEFAULT_CACHE_TYPE
from .errors import OffloadError

KNEE_SHARE = 0.9  # the knee: the smallest budget reaching this share of the best result
DEFAULT_SHARES = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)  # of the expert slots between minimum and full


@dataclass
class Run:
    budget: int
    share: float  # of all experts that fit in slots
    # decode only (after the prompt): tok/s, hit rate, stall share, bytes read per token
    policy: str
    prefetch_depth: int  # 0: prefetch off
    tok_s: float
    hit_rate: float
    stall_share: float  # of decode time
    bytes_read_per_token: float
    o_direct: bool = True  # how the experts were read


@dataclass
class TuneResult:
    runs: list[Run] = field(default_factory=list)
    best: list[Run] = field(default_factory=list)  # the best run per budget, by budget
    knee: Run | None = None
    metric: str = "tok_s"  # what the knee is taken on
    other_io: Run | None = None  # the knee's setting with the other read path (None: not compared)

    @property
    def o_direct(self) -> bool:
        """The read path to use: the faster one at the knee where both ran."""
        if self.knee is None or self.other_io is None:
            return self.knee.o_direct if self.knee else True
        return max((self.knee, self.other_io), key=lambda r: r.tok_s).o_direct


def budgets_to_try(path: str, shares: Sequence[float], n_ctx: int, o_direct: bool = True,
                   cache_types: dict | None = None) -> tuple[list[int], int, int]:
    """Budgets at `shares` of the way from the minimum to the full model (capped by the RAM
    available now), and the minimum and full budgets themselves."""
    from . import arch
    from .gguf_file import GGUFFile
    from .store import make_plan, memory

    gguf = GGUFFile(path)
    try:
        args = arch.model_args(gguf)
        types = cache_types or {}
        plan = make_plan(gguf, args, n_ctx, 1, "tune", o_direct=o_direct,
                         type_k=types.get("cache_type_k", DEFAULT_CACHE_TYPE),
                         type_v=types.get("cache_type_v", DEFAULT_CACHE_TYPE))
    finally:
        gguf.close()
    low, high = plan.minimum, plan.full
    cap = int(memory().available * 0.9)  # within a cgroup's limit too
    if low > cap:
        raise OffloadError(f"this model needs at least {low / 2**20:.0f} MiB and only {cap / 2**20:.0f} MiB are free")
    budgets = sorted({min(cap, int(low + s * (high - low))) for s in shares})
    return budgets, low, high


def run_one(path: str, budget: int, policy: str, depth: int, prompt: list[int] | str, n_tokens: int, n_ctx: int,
            n_threads: int | None, o_direct: bool, cache_types: dict | None = None) -> Run:
    from .model import Model
    from .sampling import SamplingParams

    # a depth's every token prefetches: the sweep says what prefetching at that depth does (a run
    # with the recommended flags then prefetches only while it measures faster: offload.prefetch_gate)
    with Model.load(path, n_ctx=n_ctx, n_threads=n_threads, memory_budget=budget, cache_policy=policy,
                    o_direct=o_direct, prefetch="always" if depth > 0 else False, prefetch_depth=max(depth, 1),
                    **(cache_types or {})) as m:
        tokens = m.generate_tokens(prompt, n_tokens + 1, SamplingParams(temperature=0.0))
        next(tokens)  # the prompt has run: decode counters start here
        before, t0 = m.store_stats(), time.perf_counter()
        n = sum(1 for _ in tokens)
        decode_s = time.perf_counter() - t0
        after, s = m.store_stats(), m.stats()
        hits, misses = after["hits"] - before["hits"], after["misses"] - before["misses"]
        return Run(budget=budget, share=s["expert_slots"] / max(m.plan.n_experts, 1) if m.plan else 1.0,
                   policy=policy, prefetch_depth=depth, tok_s=n / decode_s if decode_s else 0.0,
                   hit_rate=hits / (hits + misses) if hits + misses else 1.0,
                   stall_share=min(1.0, (after["stall_seconds"] - before["stall_seconds"]) / decode_s) if decode_s else 0.0,
                   bytes_read_per_token=(after["bytes_read"] - before["bytes_read"]) / max(n, 1), o_direct=o_direct)


def knee(best: list[Run], metric: str) -> Run | None:
    if not best:
        return None
    top = max(getattr(r, metric) for r in best)
    return next(r for r in best if getattr(r, metric) >= KNEE_SHARE * top)


def tune(path: str, *, shares: Sequence[float] = DEFAULT_SHARES, policies: Sequence[str] = ("lrfu",),
         depths: Sequence[int] = (0, 1, 2), prompt: list[int] | str = "Once upon a time, in a land far away,",
         n_tokens: int = 32, n_ctx: int = 512, n_threads: int | None = None, o_direct: bool = True,
         progress: Callable[[str], None] | None = None, cache_types: dict | None = None,
         compare_io: bool = True) -> TuneResult:
    """Sweep budgets x policies x prefetch depths with real runs; see the module docstring.
    `cache_types`: Model.load's cache_type_k / cache_type_v; `compare_io`: run the knee's
    setting with the other read path too."""
    budgets, _, _ = budgets_to_try(path, shares, n_ctx, o_direct, cache_types)
    result = TuneResult(metric="tok_s")
    total = len(budgets) * len(policies) * len(depths)
    for budget in budgets:
        here = []
        for policy in policies:
            for depth in depths:
                if progress:
                    progress(f"[{len(result.runs) + 1}/{total}] budget {budget / 2**20:.0f} MiB, {policy}, "
                             f"prefetch depth {depth}")
                run = run_one(path, budget, policy, depth, prompt, n_tokens, n_ctx, n_threads, o_direct, cache_types)
                result.runs.append(run)
                here.append(run)
        result.best.append(max(here, key=lambda r: r.tok_s))
    result.knee = k = knee(result.best, "tok_s")
    if compare_io and k is not None and k.share < 1.0:
        if progress:
            progress(f"[knee] budget {k.budget / 2**20:.0f} MiB, {'page cache' if o_direct else 'O_DIRECT'} reads")
        result.other_io = run_one(path, k.budget, k.policy, k.prefetch_depth, prompt, n_tokens, n_ctx, n_threads,
                                  not o_direct, cache_types)
    return result


def tune_trace(trace_path: str, *, shares: Sequence[float] = (0.0, 0.1, 0.25, 0.5, 0.75),
               policies: Sequence[str] = ("lru", "lfu", "lrfu"), scope: str = "global") -> tuple[list[dict], dict | None]:
    """Hit rates per capacity (share of all experts; 0 is the store's minimum, 2 x top-k
    slots) and policy over the decode steps of a recorded trace, with Belady's optimum;
    the knee on the best policy's hit rate."""
    from .simulate import compare
    from .trace import RoutingTrace

    trace = RoutingTrace.load(trace_path)
    total = trace.n_layers * trace.n_expert
    least = 2 * trace.k * (trace.n_layers if scope == "layer" else 1)  # the store's minimum: top-k + reserve
    slots = sorted({min(total, max(least, round(s * total))) for s in shares})
    rows = compare(trace, slots, policies, scope, from_step=int(trace.prompt_tokens))
    for row in rows:
        row["best_policy"] = max(policies, key=lambda p: row[p])
        row["best"] = row[row["best_policy"]]
    top = max((r["best"] for r in rows), default=0.0)
    k = next((r for r in rows if r["best"] >= KNEE_SHARE * top), None)
    return rows, k


def budget_for_slots(path: str, slots: int, n_ctx: int, scope: str = "global", o_direct: bool = True,
                     cache_types: dict | None = None) -> int:
    """The smallest memory budget whose plan has at least `slots` expert slots (or every
    expert), found by bisection over make_plan (the plan's micro-batch rule makes slots a
    step function of the budget). O_DIRECT slots by default: they are the larger, so the
    budget buys the slots with or without it."""
    from . import arch
    from .gguf_file import GGUFFile
    from .store import make_plan

    types = cache_types or {}
    gguf = GGUFFile(path)
    try:
        args = arch.model_args(gguf)

        def plan(budget: int):
            return make_plan(gguf, args, n_ctx, budget, o_direct=o_direct, scope=scope,
                             type_k=types.get("cache_type_k", DEFAULT_CACHE_TYPE),
                             type_v=types.get("cache_type_v", DEFAULT_CACHE_TYPE))

        first = plan(1)
        if not first.pools:
            return first.minimum
        want = min(slots, first.n_experts)
        low, high = first.minimum, first.full
        while high - low > 2**20:  # to a MiB
            mid = (low + high) // 2
            p = plan(mid)
            if p.budget >= p.minimum and (p.slots >= want or p.all_resident):
                high = mid
            else:
                low = mid
        return high
    finally:
        gguf.close()


def ascii_plot(xs: Sequence[float], ys: Sequence[float], width: int = 50, height: int = 10,
               x_label: str = "budget (MiB)", y_label: str = "tok/s") -> str:
    """A small plot for the terminal: one '*' per point, axes labelled with min and max."""
    if not xs:
        return ""
    x0, x1 = min(xs), max(xs)
    y1 = max(max(ys), 1e-12)
    grid = [[" "] * width for _ in range(height)]
    for x, y in zip(xs, ys):
        col = 0 if x1 == x0 else round((x - x0) / (x1 - x0) * (width - 1))
        row = height - 1 - round(y / y1 * (height - 1))
        grid[row][col] = "*"
    lines = [f"{y1:8.1f} |" + "".join(grid[0])] + ["         |" + "".join(r) for r in grid[1:]]
    lines.append(f"{0:8.1f} +" + "-" * width)
    lines.append(f"          {x0:<10.0f}{x_label:^{max(width - 20, 0)}}{x1:>10.0f}")
    return f"{y_label}\n" + "\n".join(lines)


def save_plot(path: str, xs: Sequence[float], series: dict[str, Sequence[float]], knee_x: float | None,
              x_label: str, y_label: str) -> bool:
    """The curve as a PNG (matplotlib, the 'bench' extra); False when matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, ys in series.items():
        ax.plot(xs, ys, marker="o", label=name)
    if knee_x is not None:
        ax.axvline(knee_x, color="grey", linestyle="--", label="knee")
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def trace_flags_for(model: str, budget: int, policy: str, command: str = "chat") -> str:
    """The flags a trace replay recommends: the budget that buys the knee's slots, its policy."""
    return f"offload {command} {model} --memory-budget {-(-budget // 2**20)}MiB --cache-policy {policy}"


def flags_for(model: str, run: Run, command: str = "chat") -> str:
    parts = [f"offload {command} {model}", f"--memory-budget {-(-run.budget // 2**20)}MiB",
             f"--cache-policy {run.policy}"]
    parts.append("--no-prefetch" if run.prefetch_depth == 0 else f"--prefetch-depth {run.prefetch_depth}")
    return " ".join(parts)
