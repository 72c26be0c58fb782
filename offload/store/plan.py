"""The memory plan: what a budget buys, decided once at load.

    always resident  non-expert weights (file pages of the memory map, counted with the
                     kernel's fault-around windows), norms decoded to float32, KV cache,
                     RoPE tables, activation scratch, tokenizer, and the libraries the
                     runtime loads at first use (llama.cpp's; Numba's LLVM only where Numba
                     serves a kernel), paid by the first model a process loads
    expert slots     the rest of the budget, as a fixed arena of slots (one expert each)

A budget below the minimum (resident + the slots one layer's top-k needs + the prefetch
reserve, per slot pool) is refused; a budget that holds every expert loads them all.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..arch import ModelArgs
from ..cache_types import DEFAULT_CACHE_TYPE
from ..errors import BudgetError
from ..gguf_file import GGUFFile
from .. import lookahead_learning
from ..kernels import dispatch
from ..weights import ExpertLayout, expert_layouts

PAGE = 4096
DIRECT_ALIGN = 4096  # O_DIRECT: file offsets, lengths and buffers aligned to this
SLOT_ALIGN = 64  # each matrix of a buffered slot starts on a cache line
FAULT_AROUND = 65536  # Linux maps up to this window of cached file pages around each fault
# The micro-batch (llama.cpp's n_ubatch: the most tokens the forward pass runs at once) sets
# the activation scratch. Its default is forward.N_UBATCH (512). A smaller one frees scratch
# for expert slots: decoding runs one token at a time and does not care; a long prompt runs
# in more passes, each reading the experts its tokens route to. But the logits follow the
# micro-batch (as llama.cpp's follow n_ubatch: an expert that gets fewer than 8 of a
# micro-batch's tokens takes another kernel), and results must not depend on the budget; so
# the plan halves it by itself (down to MIN_AUTO_UBATCH) only for a budget the default
# cannot run at all, and otherwise suggests it (`offload inspect`): the micro-batch at which
# the scratch takes at most UBATCH_SCRATCH_SHARE of the budget, or every expert fits; -ub
# sets it.
UBATCH_SCRATCH_SHARE = 1 / 16
MIN_AUTO_UBATCH = 64
LOGITS_ROWS = 32  # rows of logits planned for (a generation needs one; `logits` returns one per token)
TOKENIZER_BYTES_PER_TOKEN = 256  # llama.cpp's vocabulary tables, measured (~7 MiB at 32k)
BASE_OVERHEAD = 2 << 20  # Python objects of the model, thread stack, file tables
# the lookahead predictor (offload.predict) keeps each MoE layer's router, ffn_norm folded in,
# as float32 beside the file's: n_embd x n_expert x 4 bytes a layer (48 MiB on a Qwen3-30B-A3B),
# and what its learned corrections keep (lookahead_learning.state_bytes: 10 MiB there)
PREDICTOR_BYTES_PER_ROUTER_VALUE = 4
# Libraries a process loads with its first model, counted in every plan (a second model in
# the same process does not pay them again: the plan is then conservative by this much);
# tests/test_store.py checks both in a fresh process. Always: llama.cpp's library for the
# tokenizer (11 MiB of RSS) and the C kernels' OpenMP team (0.1-0.5 MiB for 2-32 threads).
RUNTIME_BYTES = 16 << 20
# And where Numba serves any kernel (OFFLOAD_KERNELS=numba, no C compiler at install, a
# format without a C kernel, the GPU tier): importing it (59 MiB), its LLVM code generator
# at the first kernel (50 MiB, 29 MiB of it llvmlite's library), then about 1 MiB per kernel
# loaded from its on-disk cache (a first run after an install compiles them: more).
NUMBA_RUNTIME_BYTES = 120 << 20


def _up(n: int, a: int) -> int:
    return -(-n // a) * a


def _down(n: int, a: int) -> int:
    return n // a * a


@dataclass
class SlotPool:
    """Slots of one size serving some layers' experts (all MoE layers of one slot size in
    "global" scope, one layer in "layer" scope)."""

    layers: tuple[int, ...]
    slot_bytes: int
    n_experts: int  # (layer, expert) pairs this pool serves
    min_slots: int
    n_slots: int = 0

    @property
    def nbytes(self) -> int:
        return self.n_slots * self.slot_bytes


@dataclass
class MemoryPlan:
    budget: int
    budget_source: str  # how the budget was chosen, for the user
    resident_weights: int
    kv_cache: int
    scratch: int
    overhead: int
    runtime: int = RUNTIME_BYTES
    pools: list[SlotPool] = field(default_factory=list)
    o_direct: bool = False
    o_direct_reason: str = ""  # why O_DIRECT was chosen where nobody asked for it
    scope: str = "global"
    expert_bytes_total: int = 0  # routed experts in the file
    n_expert_used: int = 0
    prefetch_slots: int = 0
    expert_bytes_per_token: int = 0  # the routed experts one token runs through, every MoE layer
    disk_bandwidth: float = 3e9  # bytes/s: for the decode bound the plan prints (inspect --disk-bandwidth)
    n_ubatch: int = 512  # tokens per micro-batch the scratch is sized for
    ubatch_source: str = "default"  # "default", "given" (-ub) or "budget" (halved: the default does not fit)
    default_ubatch: int = 512  # what the micro-batch is without -ub where the budget allows it
    slots_at_default_ubatch: int = 0  # expert slots the plan would have at default_ubatch (0: below its minimum)
    suggested_ubatch: int = 0  # a smaller micro-batch that buys expert slots (UBATCH_SCRATCH_SHARE), or 0
    slots_at_suggested_ubatch: int = 0
    minimum_at_smallest_ubatch: int = 0  # the minimum with MIN_AUTO_UBATCH (for the refusal)
    full_budget: int = 0  # the budget that holds every expert at the default micro-batch (0: `full`)

    @property
    def fixed(self) -> int:
        return self.resident_weights + self.kv_cache + self.scratch + self.overhead + self.runtime

    @property
    def minimum(self) -> int:
        return self.fixed + sum(p.min_slots * p.slot_bytes for p in self.pools)

    @property
    def full(self) -> int:
        """The budget that holds every expert (no I/O after load), with the default micro-batch
        (or the one -ub gave)."""
        return self.full_budget or self.fixed + sum(p.n_experts * p.slot_bytes for p in self.pools)

    @property
    def slots(self) -> int:
        return sum(p.n_slots for p in self.pools)

    @property
    def n_experts(self) -> int:
        return sum(p.n_experts for p in self.pools)

    @property
    def slot_bytes_total(self) -> int:
        return sum(p.nbytes for p in self.pools)

    @property
    def all_resident(self) -> bool:
        return all(p.n_slots >= p.n_experts for p in self.pools)

    @property
    def share(self) -> float:
        return self.slots / self.n_experts if self.n_experts else 1.0

    @property
    def planned(self) -> int:
        return self.fixed + self.slot_bytes_total

    def check(self) -> None:
        if self.budget < self.minimum:
            raise BudgetError(
                f"memory budget {_h(self.budget)} is below this model's minimum of {_h(self.minimum)} "
                f"({self.minimum} bytes: resident {_h(self.fixed)} + {sum(p.min_slots for p in self.pools)} expert "
                f"slots for top-{self.n_expert_used} and prefetch)"
                + (f"; with micro-batches of {MIN_AUTO_UBATCH} tokens, {_h(self.minimum_at_smallest_ubatch)}"
                   if 0 < self.minimum_at_smallest_ubatch < self.minimum else "")
            )

    def describe(self) -> list[str]:
        lines = [
            f"memory budget     {_h(self.budget)} ({self.budget_source})",
            f"resident          {_h(self.fixed)}: weights {_h(self.resident_weights)}, KV cache {_h(self.kv_cache)}, "
            f"scratch {_h(self.scratch)}, libraries {_h(self.runtime)}, other {_h(self.overhead)}",
        ]
        if self.pools:
            sizes = sorted({p.slot_bytes for p in self.pools})
            size = _h(sizes[0]) if len(sizes) == 1 else f"{_h(sizes[0])}..{_h(sizes[-1])}"
            lines += [
                f"expert slots      {self.slots} of {size} = {_h(self.slot_bytes_total)} "
                f"({self.share:.0%} of {self.n_experts} experts; {self.scope} capacity"
                f"{', O_DIRECT' if self.o_direct else ''}"
                f"{f' ({self.o_direct_reason})' if self.o_direct_reason else ''})",
                f"                  " + ("every expert fits: all loaded at start, no I/O after load"
                                         if self.all_resident else "cold experts are read from the file on demand"),
            ]
        lines += self._ubatch_lines()
        if self.pools and not self.all_resident and self.expert_bytes_per_token:
            lines += self._disk_lines()
        smallest = (f" ({_h(self.minimum_at_smallest_ubatch)} with {MIN_AUTO_UBATCH}-token micro-batches)"
                    if 0 < self.minimum_at_smallest_ubatch < self.minimum else "")
        lines.append(f"minimum budget    {_h(self.minimum)}{smallest}; every expert resident from {_h(self.full)}")
        return lines

    def _ubatch_lines(self) -> list[str]:
        """The micro-batch, and what it trades: expert slots for prompt passes."""
        how = {"default": "the default", "given": "-ub",
               "budget": f"sized from the budget: {self.default_ubatch} tokens do not fit it"}[self.ubatch_source]
        line = f"micro-batch       {self.n_ubatch} tokens ({how}; scratch {_h(self.scratch)})"
        if not self.pools:
            return [line]
        if self.suggested_ubatch:
            gained = self.slots_at_suggested_ubatch - self.slots
            return [line, f"                  -ub {self.suggested_ubatch}: {gained:+d} expert slots ({self.slots} -> "
                          f"{self.slots_at_suggested_ubatch}); a long prompt runs in "
                          f"{self.n_ubatch / self.suggested_ubatch:.0f}x the passes, each reading the experts its "
                          f"tokens route to (slower prefill, decoding unchanged; logits as llama.cpp's with that -ub)"]
        if self.n_ubatch == self.default_ubatch or not self.slots_at_default_ubatch:
            return [line]
        before = self.slots_at_default_ubatch
        return [line, f"                  {self.slots - before:+d} expert slots vs {self.default_ubatch} tokens "
                      f"({before} slots); a long prompt runs in {self.default_ubatch / self.n_ubatch:.0f}x the passes"]

    HIT_RATES = (0.5, 0.8, 0.95)

    def _disk_lines(self) -> list[str]:
        """What a token reads from the file at a few cache hit rates, and the decode speed that
        reading alone allows at the disk's bandwidth (compute and the resident weights' memory
        traffic come on top)."""
        per_token = self.expert_bytes_per_token
        reads = [(1 - h) * per_token for h in self.HIT_RATES]
        rates = " / ".join(f"{h:.0%}" for h in self.HIT_RATES)
        return [
            f"per token         {_h(per_token)} of routed experts (top-{self.n_expert_used} in every MoE layer)",
            f"from disk         at hit rates {rates}: " + " / ".join(_h(r) for r in reads) + " per token,",
            f"                  at most " + " / ".join(f"{self.disk_bandwidth / r:.1f}" for r in reads)
            + f" tok/s at {self.disk_bandwidth / 1e9:.1f} GB/s (--disk-bandwidth)",
        ]


def _h(n: float) -> str:
    from ..summary import human_bytes

    return human_bytes(n)


def slot_layout(layout: ExpertLayout, o_direct: bool) -> tuple[int, list[int]]:
    """Bytes a slot needs for this layer's experts, and where each part's region starts.
    With O_DIRECT each part is read as the aligned span around it, which may start up to
    DIRECT_ALIGN - 1 bytes before the part: regions are sized for the worst expert."""
    starts, pos = [], 0
    for part in layout.parts:
        if o_direct:
            span = max(_up(off + n, DIRECT_ALIGN) - _down(off, DIRECT_ALIGN)
                       for off, n in (part.range(e) for e in range(layout.n_expert)))
            pos = _up(pos, DIRECT_ALIGN)
        else:
            span = part.n_bytes
            pos = _up(pos, SLOT_ALIGN)
        starts.append(pos)
        pos += span
    return _up(pos, PAGE), starts


def resident_weight_bytes(gguf: GGUFFile) -> int:
    """File-backed bytes the non-expert weights (and the header the parser reads) can put in
    RSS: each tensor's span widened to the kernel's fault-around windows, the union."""
    spans = [(0, min(t.offset for t in gguf.tensors.values()))] if gguf.tensors else []
    for t in gguf.tensors.values():
        if "_exps.weight" not in t.name:  # (gpt-oss's expert biases stay resident)
            spans.append((_down(t.offset, FAULT_AROUND), _up(t.offset + t.n_bytes, FAULT_AROUND)))
    total, end = 0, 0
    for a, b in sorted(spans):
        b = min(b, _up(gguf.file_size, PAGE))
        a = max(a, end)
        if b > a:
            total += b - a
            end = b
    # norms and biases are decoded to float32 copies
    total += sum(t.n_elements * 4 for t in gguf.tensors.values() if len(t.shape) == 1)
    return total


def default_ubatch(n_ctx: int) -> int:
    from ..forward import N_UBATCH

    return min(n_ctx, N_UBATCH)


def scratch_bytes(args: ModelArgs, n_ctx: int, n_ubatch: int | None = None) -> int:
    """Activations of the largest micro-batch (min(n_ctx, n_ubatch) tokens), twice over for
    the temporaries numpy makes, LOGITS_ROWS rows of logits, and the RoPE tables."""
    tokens = min(n_ctx, n_ubatch or default_ubatch(n_ctx))
    k = max(1, args.n_expert_used)
    width = (6 * args.n_embd + 3 * args.n_head * args.head_dim + k * (args.n_embd + 2 * args.n_ff_exp)
             + args.n_expert + 2 * args.n_ff)
    rope = 2 * n_ctx * (args.rope_dim // 2) * 4 * len({args.rope_base_of(i) for i in range(args.n_layer)})
    return 2 * tokens * width * 4 + LOGITS_ROWS * args.n_vocab * 4 + rope


def kv_bytes_per_cell(args: ModelArgs, type_k: str = DEFAULT_CACHE_TYPE, type_v: str = DEFAULT_CACHE_TYPE) -> int:
    """Bytes one cached position takes on one layer: its key row and value row in their
    cache types (cache_types); MLA caches only its latent and rope key."""
    from ..cache_types import cache_format

    k_fmt, v_fmt = cache_format(type_k), cache_format(type_v)
    return k_fmt.row_bytes(args.kv_dim) + (v_fmt.row_bytes(args.v_cache_dim) if args.v_cache_dim else 0)


def kv_cache_bytes(args: ModelArgs, n_ctx: int, type_k: str = DEFAULT_CACHE_TYPE,
                   type_v: str = DEFAULT_CACHE_TYPE, n_ubatch: int | None = None) -> int:
    """Keys and values in their cache types: every position on full-attention layers, a ring
    of the last ones on sliding-window layers (forward.kv_cells: the window + a micro-batch)."""
    from ..forward import kv_cells

    per_cell = kv_bytes_per_cell(args, type_k, type_v)
    return sum(kv_cells(args, i, n_ctx, n_ubatch) * per_cell for i in range(args.n_layer))


def runtime_bytes(gguf: GGUFFile, gpu: bool = False) -> int:
    """The libraries' share of the plan: Numba's only where it will serve a kernel (the GPU
    tier's numba.cuda brings it too)."""
    numba = gpu or dispatch.uses_numba({t.ggml_type for t in gguf.tensors.values()})
    return RUNTIME_BYTES + (NUMBA_RUNTIME_BYTES if numba else 0)


def make_plan(gguf: GGUFFile, args: ModelArgs, n_ctx: int, budget: int, budget_source: str = "given", *,
              o_direct: bool = False, scope: str = "global", prefetch_slots: int | None = None,
              gpu: bool = False, type_k: str = DEFAULT_CACHE_TYPE, type_v: str = DEFAULT_CACHE_TYPE,
              n_ubatch: int | None = None) -> MemoryPlan:
    """Split `budget` into the resident set and slot pools (not checked: call .check()); `gpu`:
    the GPU tier will be tried; type_k / type_v: the KV cache types; `n_ubatch`: the
    micro-batch (None: the default, or smaller where the budget is tight: see
    UBATCH_SCRATCH_SHARE)."""
    if scope not in ("global", "layer"):
        raise BudgetError(f"cache scope {scope!r} is not 'global' or 'layer'")
    if n_ubatch is not None and n_ubatch < 1:
        raise BudgetError(f"micro-batch size {n_ubatch} must be at least 1")
    layouts = expert_layouts(gguf, args)
    common = dict(resident_weights=resident_weight_bytes(gguf), runtime=runtime_bytes(gguf, gpu))

    def plan_at(ubatch: int, budget: int = budget) -> MemoryPlan:
        return _plan(gguf, args, layouts, n_ctx, budget, budget_source, ubatch, o_direct, scope, prefetch_slots,
                     type_k, type_v, **common)

    first = default_ubatch(n_ctx)
    choices = ubatch_choices(first)

    def fits(p: MemoryPlan) -> bool:
        return p.budget >= p.minimum

    at_default = plan_at(first)
    smallest = plan_at(choices[-1]) if len(choices) > 1 else at_default
    if n_ubatch is not None:
        plan = plan_at(min(n_ctx, n_ubatch))
        plan.ubatch_source = "given"
    elif fits(at_default):
        plan = at_default
        if not plan.all_resident:  # what a smaller micro-batch would buy
            for ubatch in choices[1:]:  # (the smallest, if none gets the scratch under its share)
                p = plan_at(ubatch)
                plan.suggested_ubatch, plan.slots_at_suggested_ubatch = ubatch, p.slots
                if p.all_resident or p.scratch <= budget * UBATCH_SCRATCH_SHARE:
                    break
    else:  # the default does not fit: the largest micro-batch that does
        plan = next((p for p in map(plan_at, choices[1:]) if fits(p)), at_default)
        if plan is not at_default:
            plan.ubatch_source = "budget"
    plan.default_ubatch = first
    plan.slots_at_default_ubatch = at_default.slots if fits(at_default) else 0
    plan.minimum_at_smallest_ubatch = smallest.minimum
    plan.full_budget = at_default.full if n_ubatch is None else plan.full
    return plan


def ubatch_choices(first: int) -> list[int]:
    """The micro-batches the budget rule tries, largest first: halving down to MIN_AUTO_UBATCH."""
    out = [first]
    while out[-1] // 2 >= MIN_AUTO_UBATCH:
        out.append(out[-1] // 2)
    return out


def _plan(gguf, args, layouts, n_ctx, budget, budget_source, n_ubatch, o_direct, scope, prefetch_slots,
          type_k, type_v, *, resident_weights: int, runtime: int) -> MemoryPlan:
    k = args.n_expert_used
    reserve = k if prefetch_slots is None else prefetch_slots
    plan = MemoryPlan(
        budget=budget, budget_source=budget_source,
        resident_weights=resident_weights,
        kv_cache=kv_cache_bytes(args, n_ctx, type_k, type_v, n_ubatch),
        scratch=scratch_bytes(args, n_ctx, n_ubatch),
        overhead=(BASE_OVERHEAD + TOKENIZER_BYTES_PER_TOKEN * args.n_vocab
                  + PREDICTOR_BYTES_PER_ROUTER_VALUE * args.n_embd * args.n_expert * len(layouts)
                  + (lookahead_learning.state_bytes(args.n_embd, args.n_expert, args.n_expert_used) if len(layouts) > 1 else 0)),
        runtime=runtime,
        o_direct=o_direct, scope=scope,
        expert_bytes_total=sum(l.expert_bytes * l.n_expert for l in layouts.values()),
        n_expert_used=k, prefetch_slots=reserve,
        expert_bytes_per_token=sum(k * l.expert_bytes for l in layouts.values()),
        n_ubatch=n_ubatch, default_ubatch=n_ubatch,
    )
    groups: dict = {}
    for layer, layout in layouts.items():
        size = slot_layout(layout, o_direct)[0]
        groups.setdefault(size if scope == "global" else layer, []).append((layer, size))
    for members in groups.values():
        layers = tuple(l for l, _ in members)
        n_exp = sum(layouts[l].n_expert for l in layers)
        plan.pools.append(SlotPool(layers, members[0][1], n_exp, min(n_exp, k + reserve)))
    _fill(plan, budget - plan.fixed)
    return plan


def largest_context(gguf: GGUFFile, args: ModelArgs, budget: int, n_max: int, **plan_options) -> int:
    """The longest context (at most n_max) whose plan fits `budget` with the minimum expert
    slots (0: none does); `plan_options` as make_plan's. The minimum grows with the context
    (KV cache, RoPE tables, scratch), so a binary search finds it."""
    def fits(n: int) -> bool:
        return make_plan(gguf, args, n, budget, **plan_options).minimum <= budget

    if n_max < 1 or not fits(1):
        return 0
    lo, hi = 1, n_max
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def default_context(gguf: GGUFFile, args: ModelArgs, budget: int, **plan_options) -> tuple[int, str]:
    """-c 0: the model's training context where it fits the budget beside the minimum expert
    slots, else the longest that does (at least 1, for the budget error to name the
    minimum); and a line that says which. Planned at the default micro-batch unless one is
    given: a tight budget keeps llama.cpp's micro-batch and gets a shorter context (a context
    asked for runs with a smaller micro-batch where that is what fits, see make_plan)."""
    if plan_options.get("n_ubatch") is None:
        plan_options = dict(plan_options, n_ubatch=default_ubatch(args.n_ctx_train))
    fit = largest_context(gguf, args, budget, args.n_ctx_train, **plan_options)
    if fit >= args.n_ctx_train:
        return args.n_ctx_train, f"context {args.n_ctx_train} tokens (the model's training context)"
    n = max(fit, 1)
    return n, (f"context {n} tokens: the most that fits the memory budget {_h(budget)} beside the minimum "
               f"expert slots (the model was trained for {args.n_ctx_train}; -c sets it)")


def context_error(gguf: GGUFFile, args: ModelArgs, n_ctx: int, plan: MemoryPlan, **plan_options) -> BudgetError | None:
    """The one-line refusal of a context too long for the budget, naming the longest that
    fits (None: the context is not what keeps the plan over its budget)."""
    if plan.minimum <= plan.budget:
        return None
    fit = largest_context(gguf, args, plan.budget, n_ctx - 1, **plan_options)
    if fit == 0:
        return None
    return BudgetError(f"memory budget {_h(plan.budget)} is below this model's minimum of {_h(plan.minimum)} "
                       f"({plan.minimum} bytes) with a context of {n_ctx} tokens (KV cache {_h(plan.kv_cache)}): the "
                       f"longest context that fits beside the minimum expert slots is {fit} (-c {fit}), or raise the "
                       "budget")


def _fill(plan: MemoryPlan, free: int) -> None:
    """Give each pool its minimum, then share what is left by bytes each pool could use."""
    pools = plan.pools
    if not pools:
        return
    for p in pools:
        p.n_slots = p.min_slots
    left = free - sum(p.nbytes for p in pools)
    if left <= 0:
        return
    want = {id(p): (p.n_experts - p.n_slots) * p.slot_bytes for p in pools}
    if sum(want.values()) <= left:
        for p in pools:
            p.n_slots = p.n_experts
        return
    # proportional share, then hand out the rounding remainder slot by slot
    total_want = sum(want.values())
    for p in pools:
        extra = int(left * want[id(p)] / total_want) // p.slot_bytes
        p.n_slots += min(extra, p.n_experts - p.n_slots)
    left = free - sum(p.nbytes for p in pools)
    for p in sorted(pools, key=lambda p: p.slot_bytes):
        while p.n_slots < p.n_experts and p.slot_bytes <= left:
            p.n_slots += 1
            left -= p.slot_bytes
