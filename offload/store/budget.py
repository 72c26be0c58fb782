"""Memory budgets: "6GB", "6GiB", "512MB", "60%" (of total RAM), or a number of bytes."""

from __future__ import annotations

import re

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
        return int(psutil.virtual_memory().total * number / 100)
    if unit not in _UNITS:
        raise BudgetError(f"memory budget {value!r}: unknown unit {m.group(2)!r} (use B, KB, MB, GB, KiB, MiB, GiB, %)")
    n = int(number * _UNITS[unit])
    if n <= 0:
        raise BudgetError(f"memory budget {value!r} must be positive")
    return n


def default_budget() -> tuple[int, str]:
    """A safe share of the RAM available now, and how it was chosen (for the user)."""
    avail = psutil.virtual_memory().available
    return int(avail * DEFAULT_SHARE_OF_AVAILABLE), f"{DEFAULT_SHARE_OF_AVAILABLE:.0%} of available RAM"
