"""Numba, loaded on first use.

The C kernels (cext/) serve a whole run when the extension is built; importing Numba then
would only cost memory and time (about 110 MiB of RSS with its LLVM and a few tenths of a
second per process, more on the first run after an install, which compiles). So the Numba
kernels are declared with this module's `njit`, `intrinsic` and `prange`, which record the
function and do nothing else until one of them is first called (the Numba fallback:
OFFLOAD_KERNELS=numba, no C compiler at install, a format without a C kernel). That call
imports Numba, makes every recorded function a Numba dispatcher and puts the dispatcher
where the placeholder was (compilation itself stays lazy, per function, as Numba's always
is), so jitted code calling other jitted code finds real dispatchers.
"""

from __future__ import annotations

import os
import sys
import threading
import types
from typing import Any, Callable

_lock = threading.RLock()
_pending: list[_Lazy] = []
_numba = None  # the numba module once loaded
_threads: int | None = None  # set_num_threads before Numba was loaded


class _Lazy:
    """A Numba function not made yet: calls (and attribute reads) load Numba first."""

    def __init__(self, py_func: Callable, make: Callable[[Any], Any]):
        self.py_func = py_func
        self._make = make  # numba module -> the dispatcher (or intrinsic)
        self.compiled = None
        self.__name__ = py_func.__name__
        self.__qualname__ = py_func.__qualname__
        self.__module__ = py_func.__module__
        self.__doc__ = py_func.__doc__

    def __call__(self, *args, **kwargs):
        if self.compiled is None:
            load()
        return self.compiled(*args, **kwargs)

    def __getattr__(self, name: str):  # e.g. .signatures, .py_func of the dispatcher
        if name.startswith("__"):
            raise AttributeError(name)
        load()
        return getattr(self.compiled, name)

    def __repr__(self) -> str:
        return f"<lazy Numba function {self.__qualname__}>"


def _declare(py_func: Callable, make: Callable[[Any], Any]):
    with _lock:
        if _numba is not None:
            return make(_numba)
        lazy = _Lazy(py_func, make)
        _pending.append(lazy)
        return lazy


def njit(*args, **options):
    """numba.njit, deferred: `@njit` or `@njit(cache=True, ...)`."""
    if len(args) == 1 and callable(args[0]) and not options:
        return _declare(args[0], lambda numba: numba.njit(args[0]))
    if args:
        raise TypeError("njit takes keyword options only (signatures are inferred at the first call)")
    return lambda fn: _declare(fn, lambda numba: numba.njit(**options)(fn))


def intrinsic(fn: Callable):
    """numba.extending.intrinsic, deferred (its body imports numba.types and llvmlite itself)."""
    def make(numba):
        from numba.extending import intrinsic as numba_intrinsic

        return numba_intrinsic(fn)

    return _declare(fn, make)


def prange(*args):
    """numba.prange inside jitted code (put in its place at load); range when called from Python."""
    return range(*args)


def loaded() -> bool:
    """Whether this process has imported Numba through here (tests: a C run must not)."""
    return _numba is not None


def load():
    """Import Numba and turn every declared function into its dispatcher; returns numba."""
    global _numba
    with _lock:
        if _numba is not None:
            return _numba
        import numba

        placeholder = prange  # this module's own name is replaced too
        for lazy in _pending:
            lazy.compiled = lazy._make(numba)
        # Jitted code resolves the functions it calls through its module's globals, where
        # `from .x import f` may have copied a placeholder: replace them all, in every module.
        for module in list(sys.modules.values()):
            if not isinstance(module, types.ModuleType):
                continue
            names = vars(module)
            for key, value in list(names.items()):
                if value is placeholder:
                    names[key] = numba.prange
                elif type(value) is _Lazy:
                    names[key] = value.compiled
        _pending.clear()
        if _threads is not None:
            numba.set_num_threads(_threads)
        _numba = numba
        return numba


def max_threads() -> int:
    """Numba's thread pool size (NUMBA_NUM_THREADS, else the CPUs this process may use), known
    without importing Numba."""
    env = os.environ.get("NUMBA_NUM_THREADS")
    if env:
        return int(env)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def set_num_threads(n: int) -> None:
    """Threads for Numba's parallel kernels: now if Numba is loaded, else when it is."""
    global _threads
    with _lock:
        _threads = n
        if _numba is not None:
            _numba.set_num_threads(n)
