"""The device tier: a VRAM plan, an arena of expert slots in VRAM, and `GpuTier`, which the
forward pass asks to run matmuls and experts.

    device (VRAM)   the always-needed matrices (attention, routers, shared experts, dense
                    FFNs), the output matrix if it fits, then expert slots (hot experts)
    host (RAM)      the host store (TieredExperts: slots pinned, fed from disk; or the file's
                    memory map), unchanged
    disk            the GGUF file

An expert that is not in VRAM runs where the cost model says (costmodel.choose): copied
into a VRAM slot (evicting the least recently used one not needed by the running layer)
and run there, or run on the CPU from RAM. Predictions (prefetch_predicted) also move
experts RAM -> VRAM ahead of need on the copy stream, overlapping compute. Every matmul
on the device sums in the CPU kernels' order (see kernels.py), and calls the device
kernels cannot serve in that order stay on the CPU, so placement never changes results.

Not on the device (yet): the KV cache and attention itself, norms, RoPE, the embeddings;
they run on the CPU as before, and activations cross PCIe per matmul (a few KB).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import asdict, dataclass, field

import numpy as np
from gguf import GGMLQuantizationType as T

from ..errors import BudgetError
from ..kernels import QMatrix, ggml_math, matmul
from ..kernels.tiled import TILED_MIN_TOKENS, TILED_TYPES
from ..weights import FFN, ExpertLayout, Weights
from . import costmodel
from .costmodel import Calibration

# the formats kernels.py has GPU kernels for (this module imports no CUDA code: plans and
# tests of placement run without it)
GPU_TYPES = frozenset({T.Q8_0, T.Q4_0, T.Q4_K, T.Q6_K, T.F32, T.F16})


def serves(ggml_type, n_tokens: int, n_rows: int, n_cols: int, expert: bool) -> bool:
    """Whether the GPU computes this matmul in the CPU path's summation order (so the result
    is the same): k-quant batches of 8+ take ggml's tiled order on the CPU, and float
    batches of 2+ (non-expert) its tinyBLAS order, which the GPU kernels do not reproduce."""
    if ggml_type not in GPU_TYPES:
        return False
    if ggml_type in TILED_TYPES and n_tokens >= TILED_MIN_TOKENS:
        return False
    if ggml_type in (T.F32, T.F16):
        gemm8 = n_tokens >= 2 and not expert and n_rows % 4 == 0 and n_cols % 8 == 0
        return not gemm8
    return True


SLOT_ALIGN = 256  # each matrix of a VRAM slot starts here
SCRATCH_BYTES = 8 << 20  # device activations and outputs


def _up(n: int, a: int) -> int:
    return -(-n // a) * a


@dataclass
class VramPlan:
    budget: int
    budget_source: str
    always: list = field(default_factory=list)  # QMatrix placed on the device
    always_bytes: int = 0
    output_on_device: bool = False
    output_bytes: int = 0
    slot_bytes: int = 0
    n_slots: int = 0
    n_experts: int = 0  # routed experts the device could run
    expert_bytes_total: int = 0

    @property
    def minimum(self) -> int:
        return self.always_bytes + SCRATCH_BYTES

    @property
    def used(self) -> int:
        return self.minimum + self.output_bytes * self.output_on_device + self.n_slots * self.slot_bytes

    def describe(self) -> str:
        from ..summary import human_bytes as hb

        share = self.n_slots / self.n_experts if self.n_experts else 0.0
        return (f"VRAM budget {hb(self.budget)} ({self.budget_source}): {hb(self.always_bytes)} always-needed weights"
                f"{', output' if self.output_on_device else ''}; {self.n_slots} expert slots ({share:.0%} of experts)")


def _gpu_ok(w: QMatrix | None) -> bool:
    return w is not None and w.fmt.ggml_type in GPU_TYPES


def slot_regions(layout: ExpertLayout) -> tuple[int, list[int]]:
    starts, pos = [], 0
    for part in layout.parts:
        pos = _up(pos, SLOT_ALIGN)
        starts.append(pos)
        pos += part.n_bytes
    return _up(pos, SLOT_ALIGN), starts


def plan_vram(weights: Weights, layouts: dict[int, ExpertLayout], budget: int, source: str = "given",
              output: bool = True, dense: bool = True) -> VramPlan:
    """What `budget` bytes of VRAM hold: always-needed matrices (refused below them), the
    output matrix if it fits, then as many expert slots as fit (at most one per expert)."""
    plan = VramPlan(budget, source)
    for layer in weights.layers:
        a = layer.attn
        mats = [a.wq, a.wk, a.wv, a.wo]
        if layer.moe is not None:
            mats.append(layer.moe.router)
            if layer.moe.shared is not None:
                mats += [layer.moe.shared.gate, layer.moe.shared.up, layer.moe.shared.down]
            mats.append(layer.moe.shared_gate)
        if layer.dense is not None:
            mats += [layer.dense.gate, layer.dense.up, layer.dense.down]
        plan.always += [w for w in mats if dense and _gpu_ok(w)]
    plan.always_bytes = sum(w.data.nbytes for w in plan.always)
    if budget < plan.minimum:
        from ..summary import human_bytes as hb

        raise BudgetError(f"VRAM budget {hb(budget)} is below this model's minimum of {hb(plan.minimum)} "
                          f"({plan.minimum} bytes: the always-needed weights and device scratch)")
    left = budget - plan.minimum
    out = weights.output
    if output and dense and _gpu_ok(out) and out.data.nbytes <= left:
        plan.output_on_device, plan.output_bytes = True, out.data.nbytes
        left -= out.data.nbytes
    runnable = [l for l in layouts.values() if all(p.ggml_type in GPU_TYPES for p in l.parts)]
    plan.n_experts = sum(l.n_expert for l in runnable)
    plan.expert_bytes_total = sum(l.expert_bytes * l.n_expert for l in runnable)
    if runnable:
        plan.slot_bytes = max(slot_regions(l)[0] for l in runnable)
        plan.n_slots = min(left // plan.slot_bytes, plan.n_experts)
    return plan


def vram_budget_for(weights: Weights, layouts: dict[int, ExpertLayout], expert_share: float, *,
                    output: bool = True, dense: bool = True) -> int:
    """The VRAM budget whose plan holds `expert_share` (0..1) of the experts the device can run,
    beside the always-needed matrices (and the output matrix, with `output`)."""
    plan = plan_vram(weights, layouts, 1 << 62, output=output, dense=dense)
    n_slots = math.ceil(expert_share * plan.n_experts)
    return plan.minimum + plan.output_bytes * plan.output_on_device + n_slots * plan.slot_bytes


@dataclass
class GpuStats:
    gpu_hits: int = 0  # expert uses served from a VRAM slot
    copies: int = 0  # experts copied RAM -> VRAM on demand
    prefetch_copies: int = 0  # ... ahead of need (predicted)
    prefetch_copy_hits: int = 0  # first uses of an expert copied ahead
    cpu_computes: int = 0  # expert uses run on the CPU (the cost model's choice, or no slot free)
    cpu_fallbacks: int = 0  # ... because the device cannot sum that call in the CPU's order
    bytes_copied: int = 0
    evictions: int = 0
    dense_gpu: int = 0  # non-expert matmuls on the device
    dense_cpu: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


class _VSlot:
    __slots__ = ("index", "key", "ffn", "event", "prefetched")

    def __init__(self, index: int):
        self.index = index
        self.key = None
        self.ffn = None  # (gate, up, down) DeviceMatrix views into the arena
        self.event = None  # the copy's event while it may be in flight
        self.prefetched = False


class GpuTier:
    """Runs matmuls and experts on the device where placed there; the rest on the CPU."""

    def __init__(self, device, plan: VramPlan, weights: Weights, host, layouts: dict[int, ExpertLayout],
                 calibration: Calibration, n_expert_used: int):
        from .device import DeviceMatrix

        self._DeviceMatrix = DeviceMatrix
        self.device = device
        self.plan = plan
        self.host = host  # the host tier's ExpertStore (TieredExperts or ResidentExperts)
        self.layouts = layouts
        self.calibration = calibration
        self.k = max(1, n_expert_used)
        self.stats = GpuStats()
        self._dense = {id(w): device.upload(w) for w in plan.always}
        if plan.output_on_device:
            self._dense[id(weights.output)] = device.upload(weights.output)
        self._regions = {l: slot_regions(lay)[1] for l, lay in layouts.items()}
        self._runnable = {l for l, lay in layouts.items() if all(p.ggml_type in GPU_TYPES for p in lay.parts)}
        self.arena = device.alloc(plan.n_slots * plan.slot_bytes)
        self._slots = [_VSlot(i) for i in range(plan.n_slots)]
        self._free = list(reversed(self._slots))
        self._index: OrderedDict = OrderedDict()  # key -> _VSlot, least recently used first
        self._layer = None
        self._protected: set = set()  # keys the running layer uses or the prediction staged: not evicted
        self._holds: list = []  # host slots held until their copies complete
        self._freq: dict = {}  # key -> decayed use count (uses per token, roughly)
        n_moe = max(1, len(layouts))
        # tokens an expert stays in VRAM if every use missed: the arena cycles in this many tokens
        self.horizon = max(1.0, plan.n_slots / (self.k * n_moe))
        self._pinned = device.pin(getattr(getattr(host, "arena", None), "data", None))

    # -- the ExpertStore protocol, and the host store's prefetch calls, passed through ------
    def get(self, layer: int, expert: int) -> FFN:
        return self.host.get(layer, expert)

    def prefetch(self, layer: int, experts) -> int:
        """The running layer's routed experts: the host reads those not already in VRAM."""
        fn = getattr(self.host, "prefetch", None)
        if fn is None:
            return 0
        return fn(layer, [e for e in experts if (layer, int(e)) not in self._index])

    def prefetch_predicted(self, layer: int, predictions) -> int:
        """Predictions for the next layers: the host reads them from disk; those already in RAM
        are copied into VRAM now (copy stream) where the cost model says a copy pays."""
        fn = getattr(self.host, "prefetch_predicted", None)
        started = fn(layer, predictions) if fn is not None else 0
        for target, experts, _ in predictions:
            for e in experts:
                self._stage((int(target), int(e)))
        return started

    def __getattr__(self, name):  # set_prefetch_depth, stall_by_layer, ... of the host store
        if name == "host":
            raise AttributeError(name)
        return getattr(self.host, name)

    # -- matmuls -----------------------------------------------------------------------------
    def matmul(self, w: QMatrix, x: np.ndarray, out: np.ndarray | None = None, expert: bool = False) -> np.ndarray:
        dev = self._dense.get(id(w))
        if dev is not None and serves(dev.ggml_type, len(x), w.n_rows, w.n_cols, expert):
            self.stats.dense_gpu += 1
            return self.device.matmul(dev, w.fmt.vec_dot_type, np.ascontiguousarray(x), out)
        self.stats.dense_cpu += 1
        return matmul(w, x, out=out, expert=expert)

    def matmuls(self, ws, x: np.ndarray, expert: bool = False, outs=None) -> list[np.ndarray]:
        return [self.matmul(w, x, outs[i] if outs else None, expert) for i, w in enumerate(ws)]

    def expert_ffn(self, layer: int, expert: int, x: np.ndarray, cpu_ffn) -> np.ndarray:
        """The expert's SwiGLU output for x: on the device if it is (or is now copied) there,
        else `cpu_ffn(host FFN, x)` on the CPU."""
        self._begin(layer)
        key = (layer, expert)
        self._protected.add(key)
        self._note_use(key)
        n = len(x)
        lay = self.layouts[layer]
        if layer not in self._runnable or not all(serves(p.ggml_type, n, p.n_rows, p.n_cols, True) for p in lay.parts):
            self.stats.cpu_fallbacks += 1
            return cpu_ffn(self.host.get(layer, expert), x)
        slot = self._index.get(key)
        if slot is not None:
            self._index.move_to_end(key)
            self.stats.gpu_hits += 1
            if slot.prefetched:
                slot.prefetched = False
                self.stats.prefetch_copy_hits += 1
            return self._run_on_device(slot, x)
        ffn = self.host.get(layer, expert)  # RAM, read from disk if needed; held for this layer
        if self.plan.n_slots and costmodel.choose(self.calibration, lay.expert_bytes, self.expected_reuse(key)) \
                == costmodel.COPY:
            slot = self._claim()
            if slot is not None:
                self._copy_in(slot, key, ffn)
                self.stats.copies += 1
                return self._run_on_device(slot, x)
        self.stats.cpu_computes += 1
        return cpu_ffn(ffn, x)

    def expected_reuse(self, key) -> float:
        """Uses expected while it would stay in VRAM: its recent uses per token times how
        many tokens the arena keeps an expert."""
        return self._freq.get(key, 0.0) * self.horizon

    # -- internals -----------------------------------------------------------------------------
    def _begin(self, layer: int) -> None:
        """A new layer. Copies staged for it (or for layers passed) are waited for, so their host
        slots can be let go; copies for layers ahead keep running beside this layer's compute."""
        if layer == self._layer:
            return
        new_token = self._layer is not None and layer < self._layer
        if new_token:
            self._new_token()
        self._layer = layer
        self._protected = {k for k in self._protected if k[0] >= layer and not new_token}  # staged ahead
        due = [k for k in self._holds if new_token or k[0] <= layer]
        if due:
            self.device.copies.synchronize()
            for key in due:
                self.host.release(*key)
            self._holds = [k for k in self._holds if k not in due]

    def _new_token(self) -> None:
        for key in list(self._freq):
            self._freq[key] *= 0.5
            if self._freq[key] < 1e-3:
                del self._freq[key]

    def _note_use(self, key) -> None:
        self._freq[key] = self._freq.get(key, 0.0) + 0.5  # with halving per token: ~1 at one use per token

    def _claim(self) -> _VSlot | None:
        """An empty slot, else the least recently used one that no running or staged need holds."""
        if self._free:
            return self._free.pop()
        for key, slot in self._index.items():
            if key not in self._protected:
                del self._index[key]
                slot.key, slot.ffn, slot.event, slot.prefetched = None, None, None, False
                self.stats.evictions += 1
                return slot
        return None

    def _copy_in(self, slot: _VSlot, key, ffn: FFN) -> None:
        """Queue the copy of the expert's three matrices into the slot on the copy stream."""
        layer = key[0]
        base = slot.index * self.plan.slot_bytes
        mats = []
        stream = self.device.copies
        for w, start in zip((ffn.gate, ffn.up, ffn.down), self._regions[layer]):
            n = w.data.nbytes
            view = self.arena[base + start : base + start + n].reshape(w.data.shape)
            view.copy_to_device(w.data, stream=stream)
            mats.append(self._DeviceMatrix(w.fmt.ggml_type, w.n_rows, w.n_cols, view, n))
            self.stats.bytes_copied += n
        slot.event = self.device.cuda.event()
        slot.event.record(stream)
        slot.key, slot.ffn = key, FFN(*mats)
        self._index[key] = slot

    def _stage(self, key) -> None:
        """Copy a predicted expert RAM -> VRAM ahead of need, if it is in RAM now, a slot can be
        had without evicting what the running layer or nearer predictions need, and a copy pays."""
        layer = key[0]
        if key in self._index:
            self._protected.add(key)  # kept for the layer it was predicted for
            return
        if layer not in self._runnable or not self.plan.n_slots or len(self._holds) >= self.k:
            return  # (host slots held for copies: at most top-k, so the host pool never runs dry)
        reuse = 1.0 + self.expected_reuse(key)  # predicted: used soon, then as often as before
        if costmodel.choose(self.calibration, self.layouts[layer].expert_bytes, reuse) != costmodel.COPY:
            return
        hold = getattr(self.host, "hold", None)
        ffn = hold(*key) if hold is not None else self.host.get(*key)
        if ffn is None:  # not in RAM yet (its disk read is queued): copied on demand instead
            return
        slot = self._claim()
        if slot is None:
            if hold is not None:
                self.host.release(*key)
            return
        self._copy_in(slot, key, ffn)
        slot.prefetched = True
        self._protected.add(key)
        if hold is not None:
            self._holds.append(key)
        self.stats.prefetch_copies += 1

    def _run_on_device(self, slot: _VSlot, x: np.ndarray) -> np.ndarray:
        """SwiGLU with the three GEMVs on the device; the activations converted and the SiLU
        taken on the host exactly as the CPU path does (forward._ffn)."""
        dev = self.device
        if slot.event is not None:
            slot.event.wait(dev.compute)  # its copy first
            slot.event = None
        g, u, d = slot.ffn.gate, slot.ffn.up, slot.ffn.down
        x = np.ascontiguousarray(x)
        from ..kernels.dispatch import convert_activations

        gate = dev.matmul(g, None, x, act=convert_activations(self._vdt(g), x))
        up = dev.matmul(u, None, x, act=convert_activations(self._vdt(u), x))
        h = ggml_math.silu_mul(gate, up, out=gate)
        return dev.matmul(d, self._vdt(d), h)

    @staticmethod
    def _vdt(w) -> str:
        from ..kernels import format_for

        return format_for(w.ggml_type).vec_dot_type

    def close(self) -> None:
        if self._holds:
            self.device.copies.synchronize()
            for key in self._holds:
                self.host.release(*key)
            self._holds.clear()
        self._dense.clear()
        self._index.clear()
        self.arena = None
        self._pinned = None
        self.device.close()
