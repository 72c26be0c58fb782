"""Memory budgets: "6GB", "6GiB", "512MB", "60%" (of total RAM), or a number of bytes.

"RAM" is what this process may use: the machine's memory, or less where the process runs
under a memory cgroup (a container, a systemd slice, `docker run -m`): psutil reports the
host's memory there, and a budget sized from it would get the process OOM-killed.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import psutil

from ..errors import BudgetError

_UNITS = {
    "": 1, "B": 1,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}

# What `Model.load` takes when no budget is given: this share of the RAM available now.
DEFAULT_SHARE_OF_AVAILABLE = 0.75


@dataclass(frozen=True)
class Memory:
    """What this process may use: `total` (RAM, or the cgroup's limit if lower) and
    `available` now (psutil's, or what the cgroup has left if less); `limit_source` names
    the cgroup file that capped them, or is None."""

    total: int
    available: int
    limit_source: str | None = None


def cgroup_limit(root: str | os.PathLike[str] = "/sys/fs/cgroup",
                 proc_cgroup: str | os.PathLike[str] = "/proc/self/cgroup") -> tuple[int, int, str] | None:
    """(limit, usage, file) of the memory cgroup this process is in, or None without a
    limit. cgroup v2: <root>/<path>/memory.max and memory.current; v1: the memory
    controller's memory.limit_in_bytes and memory.usage_in_bytes. The nearest limited
    ancestor counts too (a container's limit sits on a parent of the process's group)."""
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None
    root = Path(root)
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":  # v2: the unified hierarchy
            found = _nearest_limit(root, path, "memory.max", "memory.current")
        elif "memory" in controllers.split(","):
            found = _nearest_limit(root / "memory", path, "memory.limit_in_bytes", "memory.usage_in_bytes")
        else:
            continue
        if found is not None:
            return found
    return None


def _nearest_limit(base: Path, path: str, limit_name: str, usage_name: str) -> tuple[int, int, str] | None:
    """The lowest limit from the process's group up to the root, with that group's usage."""
    best = None
    rel = Path(path.lstrip("/"))
    for group in [rel, *rel.parents]:
        limit_file = base / group / limit_name
        try:
            text = limit_file.read_text().strip()
        except OSError:
            continue
        # "max" (v2) or a page-rounded 2^63 (v1) mean no limit
        if not text.isdigit() or int(text) >= 1 << 60:
            continue
        try:
            usage = int((base / group / usage_name).read_text().strip())
        except (OSError, ValueError):
            usage = 0
        if best is None or int(text) < best[0]:
            best = (int(text), usage, str(limit_file))
    return best


def memory() -> Memory:
    """RAM this process may use: the machine's, capped by its memory cgroup."""
    vm = psutil.virtual_memory()
    found = cgroup_limit()
    if found is None or found[0] >= vm.total:
        return Memory(vm.total, vm.available)
    limit, usage, source = found
    return Memory(limit, max(0, min(vm.available, limit - usage)), source)


def memory_cap() -> str | None:
    """The cgroup file that limits this process's memory below the machine's RAM, or None.
    Under such a cap the page cache is charged to the same limit as the process: reads of
    experts through it compete with the expert slots (Model.load turns O_DIRECT on)."""
    return memory().limit_source


def parse_budget(value: str | int | float) -> int:
    """Bytes of a budget. Decimal units (KB, MB, GB, TB) are powers of 1000; binary ones
    (KiB, MiB, GiB, TiB, and the bare K, M, G, T) powers of 1024; "60%" is a share of total RAM."""
    if isinstance(value, bool):
        raise BudgetError(f"memory budget {value!r} is not a size")
    if isinstance(value, (int, float)):
        if value <= 0:
            raise BudgetError(f"memory budget {value} must be positive")
        return int(value)
    text = str(value).strip()
    m = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)\s*(%|[A-Za-z]*)", text)
    if not m:
        raise BudgetError(f"memory budget {value!r} is not a size (examples: 6GB, 6GiB, 512MB, 60%)")
    number, unit = float(m.group(1)), m.group(2).upper()
    if unit == "%":
        if not 0 < number <= 100:
            raise BudgetError(f"memory budget {value!r}: a share of RAM must be in (0, 100]%")
        return int(memory().total * number / 100)
    if unit not in _UNITS:
        raise BudgetError(f"memory budget {value!r}: unknown unit {m.group(2)!r} (use B, KB, MB, GB, KiB, MiB, GiB, %)")
    n = int(number * _UNITS[unit])
    if n <= 0:
        raise BudgetError(f"memory budget {value!r} must be positive")
    return n


def default_budget() -> tuple[int, str]:
    """A safe share of the RAM available now (within the cgroup's limit), and how it was
    chosen (for the user)."""
    mem = memory()
    where = "available RAM" if mem.limit_source is None else f"the memory left under the cgroup limit ({mem.limit_source})"
    return int(mem.available * DEFAULT_SHARE_OF_AVAILABLE), f"{DEFAULT_SHARE_OF_AVAILABLE:.0%} of {where}"


def check_within_limit(budget: int) -> None:
    """Refuse a budget larger than the memory cgroup lets this process have: it could only
    end in the kernel's OOM killer, not in offload's plan."""
    mem = memory()
    if mem.limit_source is not None and budget > mem.total:
        raise BudgetError(f"memory budget {budget / 2**20:.0f} MiB is above this process's memory limit of "
                          f"{mem.total / 2**20:.0f} MiB ({mem.limit_source}); give at most that")
