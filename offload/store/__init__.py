"""The tiered expert store: a memory budget, a plan within it, a slot arena fed from the
GGUF file by a background loader, and pluggable cache policies. See `tiered.TieredExperts`."""

from .budget import check_within_limit, default_budget, memory, memory_cap, parse_budget
from .plan import MemoryPlan, make_plan
from .policy import POLICIES, make_policy
from .tiered import StoreStats, TieredExperts

__all__ = ["MemoryPlan", "POLICIES", "StoreStats", "TieredExperts", "check_within_limit", "default_budget", "make_plan",
           "make_policy", "memory", "memory_cap", "parse_budget"]
