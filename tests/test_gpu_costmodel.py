"""The copy-or-compute choice and the VRAM budget syntax: pure Python, no GPU, no numba.cuda."""

import pytest

from offload.errors import BudgetError
from offload.gpu import parse_vram_budget
from offload.gpu.costmodel import COPY, CPU, Calibration, break_even_reuse, choose

MB = 1 << 20


def test_slow_copy_computes_on_cpu():
    cal = Calibration(copy_bytes_per_s=0.5e9, copy_latency_s=50e-6, gpu_bytes_per_s=300e9, cpu_bytes_per_s=20e9)
    assert choose(cal, 10 * MB, expected_reuse=0) == CPU
    assert choose(cal, 10 * MB, expected_reuse=10) == CPU  # copying costs 40 CPU runs: 10 reuses do not pay


def test_reuse_soon_copies():
    cal = Calibration.nominal()  # copy ~ 2 CPU runs of the same expert
    assert choose(cal, 10 * MB, expected_reuse=0) == CPU
    assert choose(cal, 10 * MB, expected_reuse=4) == COPY


def test_fast_copy_always_copies():
    cal = Calibration(copy_bytes_per_s=50e9, copy_latency_s=1e-6, gpu_bytes_per_s=1000e9, cpu_bytes_per_s=10e9)
    assert choose(cal, 10 * MB, expected_reuse=0) == COPY


def test_tiny_experts_stay_on_cpu():
    # a few KB: the fixed costs (copy latency, launches) dominate, the CPU is faster
    assert choose(Calibration.nominal(), 8192, expected_reuse=100) == CPU


def test_break_even_matches_choose():
    cal = Calibration.nominal()
    r = break_even_reuse(cal, 10 * MB)
    assert choose(cal, 10 * MB, r * 0.9) == CPU and choose(cal, 10 * MB, r * 1.1 + 0.01) == COPY
    slow_gpu = Calibration(copy_bytes_per_s=12e9, copy_latency_s=1e-5, gpu_bytes_per_s=1e9, cpu_bytes_per_s=20e9)
    assert break_even_reuse(slow_gpu, 10 * MB) == float("inf")


def test_parse_vram_budget():
    assert parse_vram_budget("auto", 10_000) == (9000, "90% of free GPU memory")
    assert parse_vram_budget("50%", 10_000)[0] == 5000
    assert parse_vram_budget("2GiB", 0) == (2 << 30, "given")
    with pytest.raises(BudgetError):
        parse_vram_budget("150%", 10_000)
    with pytest.raises(BudgetError):
        parse_vram_budget("lots", 10_000)


def _weights_and_layouts(tmp_path):
    from offload import arch
    from offload.gguf_file import GGUFFile
    from offload.testing import TinyConfig, write_model
    from offload.weights import expert_layouts, load_weights

    path = write_model(tmp_path / "m.gguf", TinyConfig(n_layer=2, n_embd=64, n_ff=64, n_expert=4), weight_type="Q8_0")
    g = GGUFFile(path)
    args = arch.model_args(g)
    return g, load_weights(g, args), expert_layouts(g, args)


def test_vram_plan_shares_and_minimum(tmp_path):
    from offload.gpu.vram import plan_vram, vram_budget_for

    g, w, lay = _weights_and_layouts(tmp_path)
    try:
        full = plan_vram(w, lay, 1 << 40)
        assert full.output_on_device and full.n_slots == full.n_experts == 8
        assert full.always_bytes > 0  # attention and routers are always on the device
        for share, slots in ((0.0, 0), (0.25, 2), (0.5, 4), (1.0, 8)):
            assert plan_vram(w, lay, vram_budget_for(w, lay, share)).n_slots == slots
        no_output = plan_vram(w, lay, vram_budget_for(w, lay, 0.5, output=False), output=False)
        assert not no_output.output_on_device and no_output.n_slots == 4
        with pytest.raises(BudgetError, match="below this model's minimum"):
            plan_vram(w, lay, full.minimum - 1)
    finally:
        g.close()
