"""Copy or compute: where an expert that is not in VRAM should run.

An expert in host RAM can be copied to VRAM and run there (the copy pays off if the
expert is used again while it stays in VRAM), or run on the CPU from RAM (only the
activation vector moves). Per use, with B the expert's bytes:

    cpu    = B / cpu_bytes_per_s
    gpu    = launch_s + B / gpu_bytes_per_s
    copy   = copy_latency_s + B / copy_bytes_per_s

Copy when copy + (1 + r) * gpu < (1 + r) * cpu, r being the uses expected before it would
be evicted. The numbers are measured at start (device.calibrate) or injected (tests).
"""

from __future__ import annotations

from dataclasses import dataclass

COPY, CPU = "copy", "cpu"


@dataclass(frozen=True)
class Calibration:
    copy_bytes_per_s: float  # host (pinned) -> device
    copy_latency_s: float  # fixed cost of one copy
    gpu_bytes_per_s: float  # GEMV on device, weight bytes per second
    cpu_bytes_per_s: float  # GEMV on the CPU (our kernels), weight bytes per second
    launch_s: float = 20e-6  # fixed cost of a GPU matmul (launch, activation copies, sync)

    @classmethod
    def nominal(cls) -> "Calibration":
        """A laptop: PCIe 4 x8 (~12 GB/s), a consumer GPU (~300 GB/s), 4 CPU cores (~20 GB/s)."""
        return cls(copy_bytes_per_s=12e9, copy_latency_s=10e-6, gpu_bytes_per_s=300e9, cpu_bytes_per_s=20e9)

    def cpu_seconds(self, nbytes: int) -> float:
        return nbytes / self.cpu_bytes_per_s

    def gpu_seconds(self, nbytes: int) -> float:
        return self.launch_s + nbytes / self.gpu_bytes_per_s

    def copy_seconds(self, nbytes: int) -> float:
        return self.copy_latency_s + nbytes / self.copy_bytes_per_s


def choose(cal: Calibration, nbytes: int, expected_reuse: float) -> str:
    """COPY or CPU for an expert of `nbytes` not in VRAM, used now and `expected_reuse` more
    times while it would stay in VRAM."""
    uses = 1.0 + max(expected_reuse, 0.0)
    if cal.copy_seconds(nbytes) + uses * cal.gpu_seconds(nbytes) < uses * cal.cpu_seconds(nbytes):
        return COPY
    return CPU


def break_even_reuse(cal: Calibration, nbytes: int) -> float:
    """The fewest expected reuses for which copying wins (inf if never: the GPU is not faster)."""
    saved = cal.cpu_seconds(nbytes) - cal.gpu_seconds(nbytes)
    if saved <= 0:
        return float("inf")
    return max(cal.copy_seconds(nbytes) / saved - 1.0, 0.0)
