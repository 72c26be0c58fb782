"""What a model file holds and what it needs: the facts `offload inspect` prints."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from .arch import ModelArgs
from .cache_types import DEFAULT_CACHE_TYPE
from .gguf_file import GGUFFile, TensorInfo

def tensor_class(name: str) -> str:
    """Which part of the model a tensor belongs to (llama.cpp tensor names)."""
    if "_exps.bias" in name:
        return "expert biases"  # small: resident beside the router (gpt-oss)
    if "_exps." in name:
        return "experts"
    if "_shexp." in name:
        return "shared expert"
    if "ffn_gate_inp" in name:
        return "router"
    if name.endswith("norm.weight") or "_norm." in name:
        return "norms"
    if name.startswith("token_embd"):
        return "embedding"
    if name.startswith("output"):
        return "output"
    if ".attn_" in name:
        return "attention"
    return "dense ffn"


@dataclass
class ModelSummary:
    args: ModelArgs
    n_ctx: int
    params_total: int = 0
    params_experts: int = 0
    bytes_by_class: dict[tuple[str, str], int] = field(default_factory=dict)  # (class, quant type) -> bytes
    elements_by_class: dict[tuple[str, str], int] = field(default_factory=dict)  # (class, quant type) -> weights
    expert_bytes_per_layer: dict[int, int] = field(default_factory=dict)  # bytes of ONE expert of layer L
    plan: object = None  # store.MemoryPlan for the budget asked about (or for none: its minimum)
    type_k: str = DEFAULT_CACHE_TYPE  # the KV cache types (cache_types)
    type_v: str = DEFAULT_CACHE_TYPE

    @property
    def params_active(self) -> int:
        a = self.args
        if not a.is_moe:
            return self.params_total
        return self.params_total - self.params_experts + self.params_experts * a.n_expert_used // a.n_expert

    @property
    def expert_bytes(self) -> int:
        return sum(b for (cls, _), b in self.bytes_by_class.items() if cls == "experts")

    @property
    def resident_bytes(self) -> int:
        """Weights that every token needs: everything but the routed experts."""
        return sum(self.bytes_by_class.values()) - self.expert_bytes

    @property
    def kv_cache_bytes(self) -> int:
        from .store.plan import kv_cache_bytes

        return kv_cache_bytes(self.args, self.n_ctx, self.type_k, self.type_v)

    @property
    def kv_bytes_per_token(self) -> int:
        """What one more position of context costs, over all layers (a sliding layer's ring
        stops growing at its size)."""
        from .store.plan import kv_bytes_per_cell

        return kv_bytes_per_cell(self.args, self.type_k, self.type_v) * self.args.n_layer

    @property
    def minimum_budget(self) -> int:
        """What the memory plan refuses to go below (resident set, KV cache, scratch, the slots
        of one layer's top-k and the prefetch reserve); without a plan, a rough floor."""
        if self.plan is not None:
            return self.plan.minimum
        top_k = max(self.expert_bytes_per_layer.values(), default=0) * self.args.n_expert_used
        return self.resident_bytes + self.kv_cache_bytes + top_k


def summarize(gguf: GGUFFile, args: ModelArgs, n_ctx: int, memory_budget: int | None = None,
              budget_source: str = "given", **plan_options) -> ModelSummary:
    """Facts about the file; with `memory_budget`, the memory plan for it (see store.plan)."""
    from .store.plan import make_plan

    s = ModelSummary(args, n_ctx, type_k=plan_options.get("type_k", DEFAULT_CACHE_TYPE),
                     type_v=plan_options.get("type_v", DEFAULT_CACHE_TYPE))
    s.plan = make_plan(gguf, args, n_ctx, memory_budget or 0, budget_source, **plan_options)
    by_class: dict[tuple[str, str], int] = defaultdict(int)
    elements: dict[tuple[str, str], int] = defaultdict(int)
    for t in gguf.tensors.values():
        if t.name.startswith("blk.") and _layer_of(t) >= args.n_layer:
            continue  # a next-token-prediction layer (glm4moe's nextn), which offload does not run
        cls = tensor_class(t.name)
        by_class[(cls, t.type_name)] += t.n_bytes
        elements[(cls, t.type_name)] += t.n_elements
        s.params_total += t.n_elements
        if cls in ("experts", "expert biases"):
            s.params_experts += t.n_elements
            layer = _layer_of(t)
            s.expert_bytes_per_layer[layer] = s.expert_bytes_per_layer.get(layer, 0) + t.n_bytes // args.n_expert
    s.bytes_by_class = dict(sorted(by_class.items()))
    s.elements_by_class = dict(elements)
    return s


def _layer_of(t: TensorInfo) -> int:
    return int(t.name.split(".")[1])


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def human_count(n: float) -> str:
    for unit in ("", "K", "M", "B"):
        if abs(n) < 1000 or unit == "B":
            return f"{n:.0f}" if unit == "" else f"{n:.2f}{unit}"
        n /= 1000
    return f"{n:.2f}B"


def format_summary(path: str, s: ModelSummary) -> str:
    a = s.args
    lines = [
        f"file          {path}",
        f"architecture  {a.arch}{' (MoE)' if a.is_moe else ' (dense)'}",
        f"layers        {a.n_layer}   hidden {a.n_embd}   heads {a.n_head} (kv {a.n_head_kv}, dim {a.head_dim})   vocab {a.n_vocab}",
    ]
    if a.is_moe:
        lines.append(f"experts       {a.n_expert} per layer, {a.n_expert_used} used per token, hidden {a.n_ff_exp}")
    else:
        lines.append(f"ffn           hidden {a.n_ff}")
    sliding = [i for i in range(a.n_layer) if a.window(i)]
    if sliding:
        which = "even" if sliding == list(range(0, a.n_layer, 2)) else ", ".join(map(str, sliding))
        lines.append(f"attention     sliding window {a.sliding_window} on {len(sliding)} of {a.n_layer} layers ({which}), "
                     f"full on the others" + ("; a sink logit per head" if a.attn_sinks else ""))
    lines += [
        f"context       {a.n_ctx_train} trained; {s.n_ctx} planned here",
        f"parameters    {human_count(s.params_total)} total, {human_count(s.params_active)} active per token",
        "",
        f"{'tensor class':<16}{'type':<8}{'bytes':>12}{'bits/weight':>14}",
    ]
    for (cls, qtype), n in s.bytes_by_class.items():
        elements = s.elements_by_class.get((cls, qtype), 0)
        bpw = f"{8 * n / elements:>14.2f}" if elements else ""
        lines.append(f"{cls:<16}{qtype:<8}{human_bytes(n):>12}{bpw}")
    lines += [
        "",
        f"always resident   {human_bytes(s.resident_bytes)} (all but the routed experts)",
        f"routed experts    {human_bytes(s.expert_bytes)}"
        + (f" ({human_bytes(max(s.expert_bytes_per_layer.values()))} per expert, largest layer)" if a.is_moe else ""),
        f"KV cache          {human_bytes(s.kv_cache_bytes)} for {s.n_ctx} tokens (K {s.type_k}, V {s.type_v}: "
        f"{human_bytes(s.kv_bytes_per_token)} per token"
        + ("; sliding layers keep only a ring of their last positions)" if sliding else ")"),
        f"minimum budget    {human_bytes(s.minimum_budget)} (resident + KV cache + scratch + one layer's "
        f"top-{a.n_expert_used or 0} experts + prefetch reserve)",
        f"whole model       {human_bytes(s.resident_bytes + s.expert_bytes + s.kv_cache_bytes)} with its KV cache"
        + (f"; every expert resident from a budget of {human_bytes(s.plan.full)}" if s.plan is not None and s.plan.pools
           else ""),
    ]
    if s.plan is not None and s.plan.budget:
        lines += ["", *s.plan.describe()]
        if s.plan.budget < s.plan.minimum:
            lines.append(f"                  this budget is below the minimum: load refuses it")
    return "\n".join(lines)
