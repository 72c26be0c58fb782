"""The C kernels of Q4_1 and Q5_1 (cext/q4_1_q5_1.c) and their Q8_1 activations (cext/quantize.c):
the quantizer bit for bit against ggml's and the Numba twin, the kernels at every SIMD level
against ggml's vec_dot and the Numba kernels, Q5_0's C kernel against llamafile's sgemm (the
path ggml takes for 2+ tokens; Q4_1 and Q5_1 have none), one C call (matmul_x) serving every
activation kind at once, and whole tiny models quantized by llama.cpp to Q4_1, Q5_0 and Q5_1:
every prompt position and decode step equal to llama.cpp's logits with the C kernels (the
Numba ones made to fail), in a process that never imports Numba."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from offload import Model
from offload.gguf_file import GGUFFile
from offload.kernels import FORMATS, cext, dispatch, q4_1_q5
from offload.kernels.q4_1_q5 import quantize_q8_1
from offload.testing import TinyConfig, greedy_steps, llama_cpp_logits
from test_kernels_iq4 import llama_cpp_decode
from test_kernels_q4_1_q5 import (Q8_0_BLOCK, Q8_1_BLOCK, ComputeParams, _ggml_cpu, bits, ggml_dot, ggml_quantize,
                                  make_tokens, q8_1_inputs, random_raw, random_weights)

pytestmark = pytest.mark.skipif(not {"Q4_1", "Q5_0", "Q5_1"} <= set(cext.formats()), reason="C kernels not built")

NUMBA = {T.Q4_1: q4_1_q5.matmul_q4_1, T.Q5_0: q4_1_q5.matmul_q5_0, T.Q5_1: q4_1_q5.matmul_q5_1}
ids = pytest.mark.parametrize("t", [T.Q4_1, T.Q5_1], ids=lambda t: t.name)


def c_quantize(kind: str, x: np.ndarray) -> tuple[np.ndarray, ...]:
    return dispatch._c_quantizer(kind)(x)


def c_levels(t: T, w: np.ndarray, act: tuple, n_tokens: int):
    """(level, result) of the C kernel at every SIMD level built here."""
    kernel = cext.c_kernel(t.name)
    try:
        for level in cext.levels():
            cext.set_isa(level)
            out = np.full((n_tokens, len(w)), np.nan, dtype=np.float32)
            kernel(w, act, out, False)
            yield level, out
    finally:
        cext.set_isa(None)


def test_formats_table_names_q8_1():
    for name in ("Q4_1", "Q5_1"):
        assert cext.formats()[name][0] == "Q8_1"
        assert "avx2" in cext.formats()[name][1] or cext.levels() == ["portable"]
    assert cext.formats()["Q5_0"][0] == "Q8_0"


def test_c_q8_1_quantizer_equals_numba_and_ggml():
    x = q8_1_inputs()
    ours = c_quantize("Q8_1", x)
    assert ours[2].dtype == np.float32 and ours[2].shape == (len(x), x.shape[1] // 32)
    numba = quantize_q8_1(x)
    np.testing.assert_array_equal(ours[0], numba[0])
    for a, b in zip(ours[1:], numba[1:]):
        np.testing.assert_array_equal(bits(a), bits(b))
    assert np.isinf(ours[1][3]).any()  # the overflowing row really overflows, as ggml's
    lib = _ggml_cpu()
    blocks = np.zeros((len(x), x.shape[1] // 32), dtype=Q8_1_BLOCK)
    for t in range(len(x)):
        lib.quantize_row_q8_1(np.ascontiguousarray(x[t]).ctypes.data, blocks[t].ctypes.data, x.shape[1])
    np.testing.assert_array_equal(blocks["qs"].reshape(len(x), -1), ours[0])
    np.testing.assert_array_equal(bits(blocks["d"].astype(np.float32)), bits(ours[1]))
    np.testing.assert_array_equal(bits(blocks["s"].astype(np.float32)), bits(ours[2]))
    # the dispatcher's reused buffers hold it too
    got = dispatch.convert_activations("Q8_1", x)
    np.testing.assert_array_equal(bits(got[2]), bits(ours[2]))


@ids
@pytest.mark.parametrize("n_cols", [96, 256, 2304])
@pytest.mark.parametrize("n_tokens", [1, 5])
def test_c_kernels_are_bit_exact_with_ggml_vec_dot_and_numba(t, n_cols, n_tokens):
    lib = _ggml_cpu()
    n_rows = 12
    w = ggml_quantize(t, random_weights(np.random.default_rng(n_cols), n_rows, n_cols))
    w[-4:] = random_raw(np.random.default_rng(n_cols + 1), t, 4, n_cols // 32)  # any bit pattern
    x = make_tokens(n_tokens, n_cols, seed=n_tokens)
    act = c_quantize("Q8_1", x)
    theirs = np.array([[ggml_dot(lib, t, w[r], act, tok) for r in range(n_rows)] for tok in range(n_tokens)],
                      dtype=np.float32)
    numba = np.empty_like(theirs)
    NUMBA[t](w, act, numba)
    np.testing.assert_array_equal(bits(numba), bits(theirs))
    results = dict(c_levels(t, w, act, n_tokens))
    assert len(results) == len(cext.levels())
    for level, ours in results.items():
        np.testing.assert_array_equal(bits(ours), bits(theirs), err_msg=level)


@pytest.mark.parametrize("n_rows,n_tokens", [(12, 5), (7, 2), (16, 9)])
def test_c_q5_0_batch_is_bit_exact_with_tinyblas(n_rows, n_tokens):
    """ggml's mul_mat sends a Q5_0 batch of 2+ tokens to tinyBLAS_Q0_AVX (Q8_0 activations),
    whose per-output order is vec_dot's: the C row kernel serves both."""
    lib = _ggml_cpu()
    n_cols = 512
    w = ggml_quantize(T.Q5_0, random_weights(np.random.default_rng(50 + n_rows), n_rows, n_cols))
    x = make_tokens(n_tokens, n_cols, seed=51)
    qs, d = c_quantize("Q8_0", x)
    y = np.zeros((n_tokens, n_cols // 32), dtype=Q8_0_BLOCK)
    y["d"], y["qs"] = d.astype(np.float16), qs.reshape(n_tokens, -1, 32)
    theirs = np.full((n_tokens, n_rows), np.nan, dtype=np.float32)
    nb = n_cols // 32
    assert lib.llamafile_sgemm(ctypes.byref(ComputeParams(0, 1, 0, None, None, False)), n_rows, n_tokens, nb,
                               w.ctypes.data, nb, y.ctypes.data, nb, theirs.ctypes.data, n_rows, int(T.Q5_0),
                               int(T.Q8_0), int(T.F32))
    for level, ours in c_levels(T.Q5_0, w, (qs, d), n_tokens):
        np.testing.assert_array_equal(bits(ours), bits(theirs), err_msg=level)


def test_llamafile_sgemm_takes_no_q4_1_or_q5_1():
    """ggml falls back to vec_dot for them at every batch size (llamafile_sgemm returns false)."""
    lib = _ggml_cpu()
    n_cols, n_rows, n_tokens = 256, 8, 4
    x = make_tokens(n_tokens, n_cols, seed=52)
    qs, d, s = quantize_q8_1(x)
    y = np.zeros((n_tokens, n_cols // 32), dtype=Q8_1_BLOCK)
    y["d"], y["s"], y["qs"] = d.astype(np.float16), s.astype(np.float16), qs.reshape(n_tokens, -1, 32)
    out = np.zeros((n_tokens, n_rows), dtype=np.float32)
    nb = n_cols // 32
    for t in (T.Q4_1, T.Q5_1):
        w = ggml_quantize(t, random_weights(np.random.default_rng(53), n_rows, n_cols))
        assert not lib.llamafile_sgemm(ctypes.byref(ComputeParams(0, 1, 0, None, None, False)), n_rows, n_tokens, nb,
                                       w.ctypes.data, nb, y.ctypes.data, nb, out.ctypes.data, n_rows, int(t),
                                       int(T.Q8_1), int(T.F32))


def test_matmul_x_serves_every_activation_kind_in_one_call():
    """Q4_1 and Q5_1 (Q8_1), Q5_0 (Q8_0) and Q4_K (Q8_K) sharing one input: one C call equals
    each matrix's own conversion and kernel."""
    n_cols = 512
    x = make_tokens(3, n_cols, seed=54)
    ws = [(t, ggml_quantize(t, random_weights(np.random.default_rng(55 + i), 9 + i, n_cols)))
          for i, t in enumerate((T.Q4_1, T.Q5_0, T.Q5_1, T.Q4_K))]
    outs = [np.full((len(x), len(w)), np.nan, dtype=np.float32) for _, w in ws]
    cext.matmul_x(x, len(x), tuple((t.name, w, out, len(w)) for (t, w), out in zip(ws, outs)))
    for (t, w), out in zip(ws, outs):
        want = np.empty_like(out)
        kind = FORMATS[t].vec_dot_type
        cext.c_kernel(t.name)(w, c_quantize(kind, x), want, False)
        np.testing.assert_array_equal(bits(out), bits(want), err_msg=t.name)
    for t in (T.Q4_1, T.Q5_0, T.Q5_1):
        assert t in dispatch.C_FORMATS and dispatch.KERNELS[t] is not dispatch.NUMBA_KERNELS[t]
    assert not dispatch.uses_numba({T.Q4_1, T.Q5_0, T.Q5_1})


# -- whole models quantized by llama.cpp ------------------------------------------------------------

SHAPE = TinyConfig(n_layer=2, n_embd=256, n_head=4, n_head_kv=2, n_ff=256, n_expert=8, n_expert_used=2)
PROMPT = "The old lighthouse keeper climbed the stairs every evening, counting each of the 117 steps twice."
N_DECODE = 5


@pytest.fixture
def no_numba_kernels(monkeypatch):
    """The Numba kernels and Q8_1 quantizer of these formats fail if anything calls them."""
    def fail(*args, **kwargs):
        raise AssertionError("a Numba kernel ran")

    for name in ("_matmul_q4_1", "_matmul_q5_0", "_matmul_q5_1", "_quantize_q8_1"):
        monkeypatch.setattr(q4_1_q5, name, fail)


@pytest.mark.parametrize("ftype", ["Q4_1", "Q5_0", "Q5_1"])
def test_model_logits_equal_llama_cpp_with_the_c_kernels(quantized_factory, no_numba_kernels, ftype):
    """Every prompt position, then one-token decode steps (the fused C layer calls)."""
    path = quantized_factory(SHAPE, ftype, 3)
    types = {n: t.type_name for n, t in GGUFFile(path).tensors.items()}
    assert types["blk.0.ffn_gate_exps.weight"] == types["blk.1.attn_q.weight"] == ftype, types
    assert dispatch.fused_enabled()
    with Model.load(path, n_ctx=128) as m:
        ids = m.tokenize(PROMPT)
        assert len(ids) >= 16
        prefill = m.logits(ids)
    with Model.load(path, n_ctx=128) as m:  # a fresh KV cache
        tokens, steps = greedy_steps(m.transformer, ids, N_DECODE)
    np.testing.assert_array_equal(bits(prefill), bits(llama_cpp_logits(path, ids, n_ctx=128)))
    ref_tokens, ref_steps = llama_cpp_decode(path, ids, N_DECODE)
    assert tokens == ref_tokens
    np.testing.assert_array_equal(bits(np.stack(steps)), bits(ref_steps))


_RUN = r"""
import json, sys
import numpy as np
from offload import Model
with Model.load(sys.argv[1], n_ctx=128) as m:
    logits = m.logits(m.tokenize("The old lighthouse keeper climbed the stairs"))
print(json.dumps({"numba": sorted(k for k in sys.modules if k.split(".")[0] in ("numba", "llvmlite")),
                  "argmax": logits.argmax(-1).tolist()}))
"""


def test_a_q4_1_q5_1_run_never_imports_numba(quantized_factory):
    env = {k: v for k, v in os.environ.items() if k not in ("OFFLOAD_GPU_SIMULATOR", "NUMBA_ENABLE_CUDASIM")}
    env.update(OFFLOAD_KERNELS="c", OFFLOAD_VRAM_BUDGET="off")
    for ftype in ("Q4_1", "Q5_1"):
        r = subprocess.run([sys.executable, "-c", _RUN, str(quantized_factory(SHAPE, ftype, 3))], capture_output=True,
                           text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout.strip().splitlines()[-1])
        assert out["numba"] == [] and len(out["argmax"]) >= 8, out
