"""The device tier: hot experts (and the always-needed matrices) in VRAM, on a CUDA GPU.

Nothing here imports numba.cuda until a GPU run is asked for (`attach`, from
Model.load(vram_budget=...)): a CPU run never loads it. Modules:

    device.py     detection, streams, uploads, GEMV calls, calibration at start
    kernels.py    Numba CUDA GEMV kernels (Q8_0, Q4_0, Q4_K, Q6_K, F16, F32), CPU order
    costmodel.py  copy an expert to VRAM, or compute it on the CPU from RAM
    vram.py       the VRAM plan, the expert slot arena, GpuTier (what forward.py calls)

OFFLOAD_GPU_SIMULATOR=1 runs it all on Numba's CUDA simulator (tests, tiny models).
"""

from __future__ import annotations

import os
import re

from ..errors import BudgetError, OffloadError

AUTO_SHARE_OF_FREE = 0.9  # --vram-budget auto: this share of the free GPU memory


OFF = ("0", "off", "none", "cpu")  # --vram-budget values that keep the GPU out


DEFAULT_ENV = "OFFLOAD_VRAM_BUDGET"  # the budget when none is given (the tests set "off")


def gpu_present() -> bool:
    """Whether an NVIDIA GPU is likely here, asked without loading any CUDA code."""
    return os.path.exists("/proc/driver/nvidia/version")


def parse_vram_budget(value: str | int, free_bytes: int) -> tuple[int, str]:
    """Bytes of a VRAM budget and how it was chosen: "auto" (90% of free VRAM), "50%" (of
    free VRAM), or a size as --memory-budget takes it (6GB, 6GiB, 512MB, bytes)."""
    from ..store import parse_budget

    text = str(value).strip().lower()
    if text == "auto":
        return int(free_bytes * AUTO_SHARE_OF_FREE), f"{AUTO_SHARE_OF_FREE:.0%} of free GPU memory"
    m = re.fullmatch(r"(\d+(?:\.\d*)?)\s*%", text)
    if m:
        share = float(m.group(1))
        if not 0 < share <= 100:
            raise BudgetError(f"VRAM budget {value!r}: a share of GPU memory must be in (0, 100]%")
        return int(free_bytes * share / 100), f"{share:g}% of free GPU memory"
    return parse_budget(value), "given"


def attach(transformer, weights, host_store, layouts, n_expert_used: int, vram_budget, calibration=None,
           output: bool = True, dense: bool = True):
    """Open the GPU, plan `vram_budget` of it, upload, calibrate (unless `calibration` is
    given), and make `transformer` run through the GPU tier. Returns the GpuTier. `output`:
    place the output matrix on the device when it fits (after the always-needed ones);
    `dense`: False leaves every non-expert matrix on the CPU (only experts use VRAM)."""
    from .device import Device, calibrate

    a = transformer.args
    if a.expert_act != "swiglu" or a.expert_bias:
        # its device kernels run plain SwiGLU experts; gpt-oss's would need their biases and clamp
        raise OffloadError(f"the GPU tier does not run {a.arch}'s experts yet ({a.expert_act}, biases)")
    device = Device()  # first: it chooses the simulator or the GPU before numba.cuda is imported
    from .vram import GpuTier, plan_vram

    budget, source = parse_vram_budget(vram_budget, device.free_bytes)
    plan = plan_vram(weights, layouts, budget, source, output=output, dense=dense)
    if calibration is None:
        probe = next(iter(layouts.values()), None)
        calibration = calibrate(device, _probe_matrix(host_store, probe)) if probe is not None else None
    if calibration is None:
        from .costmodel import Calibration

        calibration = Calibration.nominal()
    tier = GpuTier(device, plan, weights, host_store, layouts, calibration, n_expert_used)
    transformer.gpu = tier
    transformer.experts = tier
    return tier


def _probe_matrix(host_store, layout):
    """One expert's gate matrix, to time GEMVs on (read through the host store)."""
    return host_store.get(layout.layer, 0).gate
