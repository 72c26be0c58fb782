"""Without a GPU nothing changes: a CPU run never imports numba.cuda (nor offload's GPU
kernels), and --vram-budget without a CUDA GPU is one clear line, exit 1."""

import os
import subprocess
import sys

from offload.testing import TinyConfig, write_model

SMALL = TinyConfig(n_layer=2, n_embd=64, n_ff=64, n_expert=4, n_expert_used=2)


def _clean_env() -> dict:
    env = dict(os.environ)
    for name in ("OFFLOAD_GPU_SIMULATOR", "NUMBA_ENABLE_CUDASIM"):  # other test modules set these
        env.pop(name, None)
    return env


def test_cpu_run_imports_no_gpu_code(tmp_path):
    path = write_model(tmp_path / "m.gguf", SMALL, weight_type="Q8_0")
    code = (
        "import sys, offload\n"
        "from offload.model import Model\n"
        "from offload.cli import main\n"
        f"m = Model.load({str(path)!r}, n_ctx=64)\n"
        "m.logits([1, 2, 3]); m.close()\n"
        "bad = [k for k in sys.modules if k.startswith('numba.cuda') or k.startswith('offload.gpu.')]\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_clean_env(), timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_vram_budget_without_gpu_is_one_line(tmp_path):
    path = write_model(tmp_path / "m.gguf", SMALL, weight_type="Q8_0")
    probe = subprocess.run([sys.executable, "-c", "from numba import cuda; print(cuda.is_available())"],
                           capture_output=True, text=True, env=_clean_env(), timeout=120)
    if probe.stdout.strip() == "True":
        import pytest

        pytest.skip("a CUDA GPU is present")
    r = subprocess.run([sys.executable, "-m", "offload", "generate", str(path), "-p", "hi", "-n", "2",
                        "--vram-budget", "auto"], capture_output=True, text=True, env=_clean_env(), timeout=300,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("offload: error: ") and "CUDA" in lines[0], r.stderr
