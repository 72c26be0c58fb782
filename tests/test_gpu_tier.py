"""The three tiers end to end on Numba's CUDA simulator, on a tiny model: tokens and logits
equal the CPU path's, bit for bit, under every VRAM budget and whichever way the
copy-or-compute choice goes (calibrations injected, so each way is forced or mixed)."""

import os

os.environ["OFFLOAD_GPU_SIMULATOR"] = "1"  # before numba.cuda is imported (offload.gpu.device)

import numpy as np
import pytest

from offload.gpu.costmodel import Calibration
from offload.model import Model
from offload.sampling import SamplingParams
from offload.testing import TinyConfig, write_model

PROMPT = [1, 450, 4996]
N_DECODE = 3
CONFIG = TinyConfig(n_layer=2, n_embd=64, n_ff=32, n_expert=4, n_expert_used=2)

ALWAYS_COPY = Calibration(copy_bytes_per_s=1e15, copy_latency_s=0.0, gpu_bytes_per_s=1e15, cpu_bytes_per_s=1e3,
                          launch_s=0.0)
NEVER_COPY = Calibration(copy_bytes_per_s=1e3, copy_latency_s=1.0, gpu_bytes_per_s=1e15, cpu_bytes_per_s=1e15)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("gpu") / "tiny-q8_0.gguf", CONFIG, weight_type="Q8_0")


def _run(path, logits=False, **load):
    """Greedy tokens, and (with `logits`: the simulator is slow) every prompt position's logits."""
    with Model.load(path, n_ctx=64, **load) as m:
        tokens = list(m.generate_tokens(PROMPT, N_DECODE, SamplingParams(temperature=0)))
        return tokens, m.logits(PROMPT) if logits else None, m.stats().get("gpu"), m


@pytest.fixture(scope="module")
def cpu_result(model_path):
    return _run(model_path, logits=True)[:2]


def _budget(path, share, dense=False):
    """A VRAM budget holding `share` of the experts (dense/output off the device: the simulator is slow)."""
    from offload.gguf_file import GGUFFile
    from offload import arch
    from offload.gpu.vram import vram_budget_for
    from offload.weights import expert_layouts, load_weights

    gguf = GGUFFile(path)
    try:
        args = arch.model_args(gguf)
        return vram_budget_for(load_weights(gguf, args), expert_layouts(gguf, args), share, output=False, dense=dense)
    finally:
        gguf.close()


@pytest.mark.parametrize("share", [0.0, 0.25, 0.5, 1.0])
def test_same_tokens_under_every_vram_budget(model_path, cpu_result, share):
    tokens, _, st, _ = _run(model_path, vram_budget=_budget(model_path, share),
                            gpu_options=dict(calibration=ALWAYS_COPY, output=False, dense=False))
    assert tokens == cpu_result[0]  # (logits, every position, bit for bit: test_dense_weights_on_device)
    if share == 0.0:  # the minimum: no expert slots, every expert on the CPU
        assert st["vram_expert_slots"] == 0 and st["copies"] == 0 and st["cpu_computes"] > 0
    elif share == 0.25:  # 2 slots for 4 experts used per token: copied, evicted, copied again
        assert st["copies"] > 0 and st["evictions"] > 0
    else:
        assert st["copies"] > 0 and st["gpu_hits"] > 0


def test_slow_copies_keep_experts_on_cpu(model_path, cpu_result):
    tokens, _, st, _ = _run(model_path, vram_budget=_budget(model_path, 1.0),
                            gpu_options=dict(calibration=NEVER_COPY, output=False, dense=False))
    assert tokens == cpu_result[0]
    assert st["copies"] == 0 and st["gpu_hits"] == 0 and st["cpu_computes"] > 0


def test_copy_once_reuse_is_expected(model_path, cpu_result):
    """Break-even at 1.5 expected reuses: an expert's first uses run on the CPU, and once it
    has been used on a few tokens in a row it is copied; results unchanged."""
    from offload.gguf_file import GGUFFile
    from offload import arch
    from offload.weights import expert_layouts

    g = GGUFFile(model_path)
    try:
        nbytes = next(iter(expert_layouts(g, arch.model_args(g)).values())).expert_bytes
    finally:
        g.close()
    mixed = Calibration(copy_bytes_per_s=1e15, copy_latency_s=2.5e-3, gpu_bytes_per_s=1e15,
                        cpu_bytes_per_s=nbytes / 1e-3, launch_s=0.0)
    tokens, _, st, _ = _run(model_path, vram_budget=_budget(model_path, 1.0),
                            gpu_options=dict(calibration=mixed, output=False, dense=False))
    assert tokens == cpu_result[0]
    assert st["cpu_computes"] > 0 and st["copies"] > 0


def test_dense_weights_on_device(model_path, cpu_result):
    """Attention and routers on the device too (the default placement, but the output matrix:
    32000 rows are slow on the simulator); experts copied in; every prompt position's logits
    equal the CPU path's bit for bit."""
    tokens, logits, st, _ = _run(model_path, logits=True, vram_budget=_budget(model_path, 0.5, dense=True),
                                 gpu_options=dict(calibration=ALWAYS_COPY, output=False))
    assert tokens == cpu_result[0]
    np.testing.assert_array_equal(logits, cpu_result[1])
    assert st["dense_gpu"] > 0


def test_three_tiers_with_a_memory_budget(model_path, cpu_result):
    """Host slots fed from disk (TieredExperts, prefetch on) under the VRAM tier: predictions
    move experts RAM -> VRAM ahead of need."""
    from offload import arch
    from offload.gguf_file import GGUFFile
    from offload.store import make_plan

    g = GGUFFile(model_path)
    p = make_plan(g, arch.model_args(g), 64, 0, gpu=True)  # a GPU run's plan: it counts Numba (numba.cuda)
    g.close()
    full, slot = p.full, p.pools[0].slot_bytes
    tokens, _, st, m = _run(model_path, memory_budget=full - 2 * slot, vram_budget=_budget(model_path, 0.5),
                            gpu_options=dict(calibration=ALWAYS_COPY, output=False, dense=False))
    assert tokens == cpu_result[0]
    assert m.stats()["cache_policy"] != "resident"
    assert st["prefetch_copies"] > 0


def test_a_present_gpu_is_used_by_default(model_path, cpu_result, monkeypatch):
    import offload.gpu as gpu
    from offload.gpu.device import SIMULATED_MEMORY

    monkeypatch.delenv("OFFLOAD_VRAM_BUDGET")  # what conftest sets; a user has none
    monkeypatch.setattr(gpu, "gpu_present", lambda: True)
    tokens, _, stats, _ = _run(model_path, gpu_options={"output": False})  # the simulator's slowest matrix
    assert stats is not None and stats["vram_budget"] == int(SIMULATED_MEMORY * gpu.AUTO_SHARE_OF_FREE)
    assert tokens == cpu_result[0]
    monkeypatch.setenv("OFFLOAD_VRAM_BUDGET", "off")
    assert _run(model_path)[2] is None


def test_the_default_falls_back_to_the_cpu_when_the_gpu_cannot_be_used(model_path, cpu_result, monkeypatch):
    import offload.gpu as gpu
    from offload.errors import OffloadError

    def broken(*a, **k):
        raise OffloadError("numba's CUDA support is missing")

    monkeypatch.delenv("OFFLOAD_VRAM_BUDGET")
    monkeypatch.setattr(gpu, "gpu_present", lambda: True)
    monkeypatch.setattr(gpu, "attach", broken)
    with pytest.warns(RuntimeWarning, match="the GPU is not used .numba's CUDA support is missing"):
        tokens, _, stats, _ = _run(model_path)
    assert stats is None and tokens == cpu_result[0]
    with pytest.raises(OffloadError, match="CUDA support is missing"):  # asked for: an error, not a fallback
        _run(model_path, vram_budget="auto")
