"""GPU GEMV kernels on Numba's CUDA simulator (tiny matrices: the simulator interprets every
thread in Python). Each must equal its CPU twin bit for bit (same quantized activations,
same summation order) and agree with the float64 numpy reference to 1e-5 relative."""

import os

os.environ["OFFLOAD_GPU_SIMULATOR"] = "1"  # before numba.cuda is imported (offload.gpu.device)

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from offload.kernels import QMatrix, format_for, matmul, matmul_ref
from offload.testing import ggml_quantize


@pytest.fixture(scope="module")
def device():
    from offload.gpu.device import Device

    return Device()


def _matrix(rng, t, n_rows, n_cols) -> QMatrix:
    v = rng.standard_normal((n_rows, n_cols)).astype(np.float32)
    if t == T.F32:
        raw = v.view(np.uint8).reshape(n_rows, -1)
    elif t == T.F16:
        raw = v.astype(np.float16).view(np.uint8).reshape(n_rows, -1)
    else:
        raw = ggml_quantize(v, t)
    return QMatrix(format_for(t), n_rows, n_cols, raw)


@pytest.mark.parametrize("t, n_cols", [(T.Q8_0, 64), (T.Q4_0, 64), (T.Q4_K, 256), (T.Q6_K, 256), (T.F16, 80),
                                       (T.F32, 72)])
@pytest.mark.parametrize("n_tokens", [1, 3])
def test_gpu_gemv_equals_cpu(device, t, n_cols, n_tokens):
    rng = np.random.default_rng(int(t) * 10 + n_tokens)
    w = _matrix(rng, t, 20, n_cols)  # 20 rows: one full block of 16 rows and a partial one
    x = rng.standard_normal((n_tokens, n_cols)).astype(np.float32)
    got = device.matmul(device.upload(w), w.fmt.vec_dot_type, x)
    cpu = matmul(w, x, expert=True)  # the expert (vec_dot) order the GPU serves for any batch
    np.testing.assert_array_equal(got, cpu)
    ref = matmul_ref(w, x)
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()


def test_serves_only_the_cpu_order():
    from offload.gpu.vram import serves

    assert serves(T.Q8_0, 64, 32, 64, expert=False)  # ggml's batched Q8_0 path sums in the same order
    assert serves(T.Q4_K, 7, 32, 256, expert=True) and not serves(T.Q4_K, 8, 32, 256, expert=True)  # tiled GEMM
    assert serves(T.F32, 1, 32, 64, expert=False) and not serves(T.F32, 2, 32, 64, expert=False)  # tinyBLAS
    assert serves(T.F16, 5, 32, 64, expert=True)  # mul_mat_id: vec_dot order for any batch
    assert not serves(T.Q5_K, 1, 32, 256, expert=True)  # no GPU kernel: stays on the CPU
