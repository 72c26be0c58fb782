"""The CUDA device: detection, memory, streams, uploads, GEMV on device matrices, calibration.

Imported only when a GPU run was asked for (Model.load(vram_budget=...)): it imports
numba.cuda, which a CPU-only run never does. With OFFLOAD_GPU_SIMULATOR=1 it runs on
Numba's CUDA simulator (kernels interpreted in Python: for tests on tiny models).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as T

from ..errors import OffloadError
from ..kernels import QMatrix, matmul
from ..kernels.dispatch import convert_activations
from .costmodel import Calibration

SIMULATOR_ENV = "OFFLOAD_GPU_SIMULATOR"
SIMULATED_MEMORY = 1 << 30  # what the simulator says it has (it reports infinity)


def simulator_requested() -> bool:
    return os.environ.get(SIMULATOR_ENV, "") == "1"


def _cuda():
    """numba.cuda, on the simulator when asked (the variable must be set before its first import)."""
    if simulator_requested():
        import sys

        from numba.core import config

        if "numba.cuda" in sys.modules and not config.ENABLE_CUDASIM:
            raise OffloadError(f"{SIMULATOR_ENV}=1: numba.cuda was imported before, without the simulator")
        os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
        config.ENABLE_CUDASIM = True  # numba read its environment at import: tell it directly
    try:
        from numba import cuda
    except ImportError as e:  # numba without its CUDA part (numba-cuda not installed)
        raise OffloadError(f"--vram-budget: numba's CUDA support is missing ({e}); "
                           "pip install 'offload[gpu]'") from None
    return cuda


@dataclass
class DeviceMatrix:
    """A QMatrix's rows on the device (uint8 blocks; float32 rows for F32)."""

    ggml_type: T
    n_rows: int
    n_cols: int
    data: object  # numba DeviceNDArray
    nbytes: int


class Device:
    """One CUDA device: two streams (compute, copies), device scratch reused per shape."""

    def __init__(self):
        cuda = _cuda()
        self.simulated = simulator_requested()
        if not cuda.is_available():
            raise OffloadError("--vram-budget: no CUDA GPU was found (set OFFLOAD_GPU_SIMULATOR=1 to run the "
                               "GPU path on Numba's CUDA simulator)")
        self.cuda = cuda
        from . import kernels  # compiles nothing yet: kernels compile at first launch

        self.kernels = kernels
        self.compute = cuda.stream()
        self.copies = cuda.stream()
        self._scratch: dict = {}
        free, total = cuda.current_context().get_memory_info()
        self.free_bytes = SIMULATED_MEMORY if self.simulated else int(free)
        self.total_bytes = SIMULATED_MEMORY if self.simulated else int(total)
        self.name = "CUDA simulator" if self.simulated else _device_name(cuda)

    # -- memory ------------------------------------------------------------------------------
    def alloc(self, nbytes: int):
        return self.cuda.device_array(max(nbytes, 1), dtype=np.uint8)

    def upload(self, w: QMatrix) -> DeviceMatrix:
        """A copy of w on the device (synchronous: at load)."""
        t = w.fmt.ggml_type
        host = w.data.view(np.float32) if t == T.F32 else w.data
        dev = self.cuda.to_device(np.ascontiguousarray(host))
        return DeviceMatrix(t, w.n_rows, w.n_cols, dev, w.data.nbytes)

    def pin(self, array: np.ndarray):
        """Page-lock a host array (the RAM slot arena) so copies from it are asynchronous.
        Returns a handle to keep alive, or None (simulator: nothing to pin)."""
        if self.simulated or array is None or array.nbytes == 0:
            return None
        ctx = self.cuda.current_context()
        return ctx.mempin(array, array.ctypes.data, array.nbytes, mapped=False)

    def _buffer(self, name: str, shape: tuple, dtype):
        key = (name, shape, np.dtype(dtype).str)
        buf = self._scratch.get(key)
        if buf is None:
            buf = self._scratch[key] = self.cuda.device_array(shape, dtype=dtype)
        return buf

    # -- compute -----------------------------------------------------------------------------
    def matmul(self, w: DeviceMatrix, fmt_vec_dot_type: str, x: np.ndarray, out: np.ndarray | None = None,
               act=None) -> np.ndarray:
        """out = W x as the CPU path computes it: the activations converted on the host by the
        CPU converter (given as `act`, or converted here), copied over, the GEMV on device."""
        n = x.shape[0]
        if act is None:
            act = convert_activations(fmt_vec_dot_type, x)
        s = self.compute
        act_dev = []
        for i, a in enumerate(act):
            buf = self._buffer(f"act{i}", a.shape, a.dtype)
            buf.copy_to_device(np.ascontiguousarray(a), stream=s)
            act_dev.append(buf)
        out_dev = self._buffer("out", (n, w.n_rows), np.float32)
        self.kernels.launch(w.ggml_type, w.data, tuple(act_dev), out_dev, s)
        if out is None:
            out = np.empty((n, w.n_rows), dtype=np.float32)
        out_dev.copy_to_host(out, stream=s)
        s.synchronize()
        return out

    def close(self) -> None:
        self._scratch.clear()


def _device_name(cuda) -> str:
    try:
        name = cuda.get_current_device().name
        return name.decode() if isinstance(name, bytes) else str(name)
    except Exception:  # noqa: BLE001 - a name is only for display
        return "CUDA GPU"


def calibrate(device: Device, probe: QMatrix, seconds: float = 0.2) -> Calibration:
    """Measure what the copy-or-compute choice needs, at start: host->device copy bandwidth
    and latency, GPU and CPU GEMV speed (bytes of weights per second) on `probe` (one expert
    matrix of the model). On the simulator nothing is measured (its speeds mean nothing):
    nominal laptop numbers are used, so the logic still runs."""
    if device.simulated:
        return Calibration.nominal()
    cuda = device.cuda
    nbytes = max(probe.data.nbytes, 1 << 20)
    host = cuda.pinned_array(nbytes, dtype=np.uint8)
    dev = device.alloc(nbytes)
    small = cuda.pinned_array(64, dtype=np.uint8)
    copy_s = _best(lambda: (dev.copy_to_device(host, stream=device.copies), device.copies.synchronize()), seconds)
    latency = _best(lambda: (dev[:64].copy_to_device(small, stream=device.copies), device.copies.synchronize()),
                    seconds / 4)
    x = np.random.default_rng(0).standard_normal((1, probe.n_cols)).astype(np.float32)
    on_device = device.upload(probe)
    vdt = probe.fmt.vec_dot_type
    gpu_s = _best(lambda: device.matmul(on_device, vdt, x), seconds)
    cpu_s = _best(lambda: matmul(probe, x, expert=True), seconds)
    one_row = device.upload(QMatrix(probe.fmt, 1, probe.n_cols, probe.data[:1]))
    launch = _best(lambda: device.matmul(one_row, vdt, x), seconds / 4)  # the fixed cost of a call
    return Calibration(
        copy_bytes_per_s=nbytes / max(copy_s - latency, 1e-9),
        copy_latency_s=latency,
        gpu_bytes_per_s=probe.data.nbytes / max(gpu_s, 1e-9),
        cpu_bytes_per_s=probe.data.nbytes / max(cpu_s, 1e-9),
        launch_s=min(launch, gpu_s),
    )


def _best(fn, seconds: float) -> float:
    """Fastest of repeated runs within `seconds` (at least 3)."""
    best, start, runs = float("inf"), time.perf_counter(), 0
    while runs < 3 or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        runs += 1
    return best
