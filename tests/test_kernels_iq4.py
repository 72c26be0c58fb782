"""IQ4_NL, IQ4_XS (non-linear 4-bit) and TQ1_0, TQ2_0 (ternary) weights: block layouts and
dequantization against gguf-py, the kernels (Numba, C at every SIMD level) bit for bit
against ggml's own vec_dot, the orders ggml takes for many tokens (IQ4_NL's llamafile sgemm,
IQ4_XS's tiled GEMM) C against Numba, and whole models quantized by llama.cpp against its
logits: a prompt, one-token decode steps, greedy tokens, tight memory budgets."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T
from gguf import quants as gq

from offload import Model
from offload.gguf_file import GGUFFile
from offload.kernels import FORMATS, cext, dispatch, iq4, ternary
from offload.kernels.formats import QK_K, activation_ref
from offload.kernels.numba_kernels import quantize_q8_0, quantize_q8_k
from offload.kernels.tiled import matmul_tiled_numba
from offload.sampling import SamplingParams
from offload.testing import (TinyConfig, _ggml_lib, float_bits, ggml_quantize, greedy_steps, llama_cpp_is_avx512_build,
                             llama_cpp_logits, llama_cpp_model)

TYPES = [T.IQ4_NL, T.IQ4_XS, T.TQ1_0, T.TQ2_0]
NUMBA = {T.IQ4_NL: iq4.matmul_iq4_nl, T.IQ4_XS: iq4.matmul_iq4_xs, T.TQ1_0: ternary.matmul_tq1_0,
         T.TQ2_0: ternary.matmul_tq2_0}
VEC_DOT = {T.IQ4_NL: "ggml_vec_dot_iq4_nl_q8_0", T.IQ4_XS: "ggml_vec_dot_iq4_xs_q8_K",
           T.TQ1_0: "ggml_vec_dot_tq1_0_q8_K", T.TQ2_0: "ggml_vec_dot_tq2_0_q8_K"}
Q8_0_BLOCK = np.dtype([("d", "<f2"), ("qs", "i1", 32)])
Q8_K_BLOCK = np.dtype([("d", "<f4"), ("qs", "i1", QK_K), ("bsums", "<i2", QK_K // 16)])
# fp16 scales at the edges: 0, -0, the smallest subnormal, the largest normal, negative ones
EDGE_D = np.array([0.0, -0.0, 6e-8, 65504.0, -65504.0, -1.0, 1e-5], dtype=np.float16)

ids = pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)


def bits(a: np.ndarray) -> np.ndarray:
    return float_bits(a)


def make_tokens(n_tokens: int, n_cols: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n_tokens, n_cols)) * np.exp(rng.uniform(-2, 2, size=(n_tokens, 1)))).astype(np.float32)
    if n_tokens > 1:
        x[1, :32] = 0.0  # an all-zero activation block
    return x


def quantized_rows(t: T, n_rows: int, n_cols: int, seed: int) -> np.ndarray:
    """Rows made by ggml's own quantizer: Gaussian values over a few orders of magnitude, an
    all-zero row and an all-zero first block."""
    rng = np.random.default_rng(seed)
    values = (rng.standard_normal((n_rows, n_cols)) * np.exp(rng.uniform(-6, 3, size=(n_rows, 1)))).astype(np.float32)
    values[::7] = 0.0
    values[1, :QK_K] = 0.0
    return ggml_quantize(values, t)


def random_rows(t: T, n_rows: int, n_blocks: int, seed: int) -> np.ndarray:
    """Random bytes (every code, every scale bit) with finite fp16 scales, the edge ones first."""
    fmt = FORMATS[t]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(n_rows, n_blocks * fmt.type_size), dtype=np.uint8)
    d = (rng.standard_normal(n_rows * n_blocks) * np.exp(rng.uniform(-8, 4, n_rows * n_blocks))).astype(np.float16)
    d[: len(EDGE_D)] = EDGE_D[: len(d)]
    raw.view(fmt.layout)["d"] = d.reshape(n_rows, n_blocks)
    return raw


def activations(t: T, x: np.ndarray):
    return quantize_q8_0(x) if FORMATS[t].vec_dot_type == "Q8_0" else quantize_q8_k(x)


# -- layouts and dequantization --------------------------------------------------------------------

@ids
def test_layout_matches_ggml(t):
    fmt = FORMATS[t]
    assert (fmt.name, fmt.ggml_type) == (t.name, t)
    assert (fmt.block_size, fmt.type_size) == GGML_QUANT_SIZES[t]
    assert fmt.vec_dot_type == ("Q8_0" if t == T.IQ4_NL else "Q8_K")  # ggml-cpu.c's type_traits_cpu
    assert iq4.KVALUES.tolist() == list(gq.IQ4_NL.kvalues)


@ids
def test_dequantize_matches_gguf(t):
    fmt = FORMATS[t]
    for raw in (random_rows(t, 6, 4, seed=1), quantized_rows(t, 9, 512, seed=2)):
        ours = fmt.dequantize(raw)
        assert ours.dtype == np.float32 and ours.shape == (len(raw), raw.shape[1] // fmt.type_size * fmt.block_size)
        np.testing.assert_array_equal(bits(ours), bits(gq.dequantize(raw, t)))
    assert not ours[0].any() and not ours[1, :QK_K].any()  # the zero row and the zero block stay zero


def test_dequantize_value_order_by_hand():
    """One block of each layout written out from ggml's dequantize_row_* loops."""
    rng = np.random.default_rng(3)
    raw = random_rows(T.IQ4_XS, 1, 1, seed=4)[0]
    raw[:2] = np.array([2.0], dtype=np.float16).view(np.uint8)
    b = raw.view(iq4.IQ4_XSFormat.layout)[0]
    want = []
    for ib in range(8):
        ls = ((int(b["scales_l"][ib // 2]) >> 4 * (ib % 2)) & 0xF) | (((int(b["scales_h"]) >> 2 * ib) & 3) << 4)
        qs = b["qs"][16 * ib: 16 * ib + 16]
        want += [2.0 * (ls - 32) * int(iq4.KVALUES[q & 0xF]) for q in qs]
        want += [2.0 * (ls - 32) * int(iq4.KVALUES[q >> 4]) for q in qs]
    np.testing.assert_array_equal(FORMATS[T.IQ4_XS].dequantize(raw[None])[0], np.array(want, dtype=np.float32))

    raw = rng.integers(0, 256, 54, dtype=np.uint8)
    raw[52:] = np.array([1.0], dtype=np.float16).view(np.uint8)
    digit = lambda q, n: ((q * 3 ** n % 256) * 3) >> 8  # noqa: E731
    want = ([digit(int(raw[m]), n) for n in range(5) for m in range(32)]
            + [digit(int(raw[32 + m]), n) for n in range(5) for m in range(16)]
            + [digit(int(raw[48 + m]), n) for n in range(4) for m in range(4)])
    np.testing.assert_array_equal(FORMATS[T.TQ1_0].dequantize(raw[None])[0], np.array(want, dtype=np.float32) - 1)


# -- bit-exact against ggml's vec_dot ------------------------------------------------------------

_LIB = None


def _ggml_cpu():
    global _LIB
    if llama_cpp_is_avx512_build():
        pytest.skip("llama.cpp was built for AVX-512 here; offload follows its AVX2 build (install it as the README says)")
    if _LIB is None:
        lib = _ggml_lib("ggml-cpu")
        for name in VEC_DOT.values():
            getattr(lib, name).argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p,
                                           ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        lib.ggml_cpu_init()  # fills ggml's f16 -> f32 table, which the dot products read
        _LIB = lib
    return _LIB


def ggml_matmul(t: T, raw: np.ndarray, x: np.ndarray) -> np.ndarray:
    """ggml's vec_dot for every (token, row), on the activations the kernels get."""
    fn = getattr(_ggml_cpu(), VEC_DOT[t])
    act = activations(t, x)
    out = np.zeros((len(x), len(raw)), dtype=np.float32)
    s = np.zeros(1, dtype=np.float32)
    for tok in range(len(x)):
        if t == T.IQ4_NL:
            y = np.zeros(x.shape[1] // 32, dtype=Q8_0_BLOCK)
            y["d"], y["qs"] = act[1][tok], act[0][tok].reshape(-1, 32)
        else:
            y = np.zeros(x.shape[1] // QK_K, dtype=Q8_K_BLOCK)
            y["d"], y["qs"], y["bsums"] = act[1][tok], act[0][tok].reshape(-1, QK_K), act[2][tok].reshape(-1, 16)
        for r in range(len(raw)):
            row = np.ascontiguousarray(raw[r])
            fn(x.shape[1], s.ctypes.data, 0, row.ctypes.data, 0, y.ctypes.data, 0, 1)
            out[tok, r] = s[0]
    return out


def every_kernel(t: T, raw: np.ndarray, x: np.ndarray, order: str = "vec_dot"):
    """(name, result) of the Numba kernel and the C kernel at every SIMD level built here, in
    ggml's vec_dot order, or "sgemm" (IQ4_NL) or "tiled" (IQ4_XS)."""
    act = activations(t, x)
    out = np.full((len(x), len(raw)), np.nan, dtype=np.float32)
    numba = {"vec_dot": NUMBA, "sgemm": SGEMM, "tiled": TILED}[order][t]
    numba(raw, act, out)
    yield "numba", out
    c = {"vec_dot": cext.c_kernel(t.name), "sgemm": cext.c_kernel("IQ4_NL_SGEMM"),
         "tiled": cext.c_tiled_kernel(t.name)}[order]
    if c is None:
        return
    try:
        for level in cext.levels():
            cext.set_isa(level)
            out = np.full((len(x), len(raw)), np.nan, dtype=np.float32)
            c(raw, act, out, False)
            yield level, out
    finally:
        cext.set_isa(None)


@ids
@pytest.mark.parametrize("n_blocks", [1, 2, 3, 9])  # IQ4_NL: pairs and ggml's odd tail block
@pytest.mark.parametrize("n_tokens", [1, 5])  # C: the row dot, and a row decoded once for 4+ tokens
def test_kernels_are_bit_exact_with_ggml_vec_dot(t, n_blocks, n_tokens):
    n_cols = n_blocks * FORMATS[t].block_size
    x = make_tokens(n_tokens, n_cols, seed=n_blocks)
    for raw in (quantized_rows(t, 24, n_cols, seed=n_blocks), random_rows(t, 24, n_blocks, seed=n_blocks + 1)):
        theirs = ggml_matmul(t, raw, x)
        assert np.isfinite(theirs).all() and theirs.any()
        for name, ours in every_kernel(t, raw, x):
            np.testing.assert_array_equal(bits(ours), bits(theirs), err_msg=name)


@ids
def test_kernels_match_float64_reference(t):
    fmt = FORMATS[t]
    raw = quantized_rows(t, 17, 1024, seed=7)
    x = make_tokens(3, 1024, seed=8)
    a = activation_ref(fmt.vec_dot_type, x).astype(np.float64)
    w = fmt.dequantize(raw).astype(np.float64)
    magnitude = np.abs(a) @ np.abs(w).T
    for name, got in every_kernel(t, raw, x):
        assert np.all(np.abs(got - a @ w.T) <= 1e-5 * magnitude + 1e-30), name


# -- the orders for many tokens: IQ4_NL's llamafile sgemm, IQ4_XS's tiled GEMM -------------------------

SGEMM = {T.IQ4_NL: iq4.matmul_iq4_nl_sgemm}
TILED = {T.IQ4_XS: lambda w, act, out, vec_dot=False: matmul_tiled_numba(FORMATS[T.IQ4_XS], w, act, out)}


@pytest.mark.parametrize("t,order", [(T.IQ4_NL, "sgemm"), (T.IQ4_XS, "tiled")], ids=["IQ4_NL-sgemm", "IQ4_XS-tiled"])
def test_batch_orders_c_equal_numba_and_differ_from_vec_dot(t, order):
    """C (every level) equals Numba in the batch order; and that order is not vec_dot's (else
    the model tests could not tell whether dispatch picks it)."""
    n_cols = 4 * QK_K + (32 if t == T.IQ4_NL else 0)  # IQ4_NL: an odd block count
    for raw in (quantized_rows(t, 40, n_cols, seed=9), random_rows(t, 40, n_cols // FORMATS[t].block_size, seed=10)):
        x = make_tokens(9, n_cols, seed=11)
        results = dict(every_kernel(t, raw, x, order))
        assert len(results) == 1 + len(cext.levels())
        for name, got in results.items():
            np.testing.assert_array_equal(bits(got), bits(results["numba"]), err_msg=name)
        vec_dot = dict(every_kernel(t, raw, x))["numba"]
        assert (bits(vec_dot) != bits(results["numba"])).any()
        np.testing.assert_allclose(vec_dot, results["numba"], rtol=1e-4, atol=1e-6 * np.abs(vec_dot).max())


def test_dispatch_takes_ggml_paths(monkeypatch):
    """A plain IQ4_NL matmul of 2+ tokens runs the sgemm kernel, a routed expert's the vec_dot
    one; IQ4_XS from 8 tokens the tiled one; TQ types vec_dot always."""
    from offload.kernels.formats import QMatrix

    calls = []
    for table in (dispatch.KERNELS, dispatch.SGEMM_KERNELS, dispatch.TILED_KERNELS):
        for t in list(table):
            if t in TYPES:
                monkeypatch.setitem(table, t, lambda w, a, o, e=False, k=(table, t): calls.append(k))
    monkeypatch.setattr(dispatch, "_ONE_CALL", False)
    for t in TYPES:
        w = QMatrix(FORMATS[t], 4, FORMATS[t].block_size, random_rows(t, 4, 1, seed=12))
        for n, expert in ((1, False), (2, False), (2, True), (8, False), (8, True)):
            calls.clear()
            dispatch.matmul(w, make_tokens(n, w.n_cols, seed=n), expert=expert)
            table = calls[0][0]
            if t == T.IQ4_NL and n >= 2 and not expert:
                assert table is dispatch.SGEMM_KERNELS
            elif t == T.IQ4_XS and n >= 8:
                assert table is dispatch.TILED_KERNELS
            else:
                assert table is dispatch.KERNELS, (t, n, expert)


# -- whole models quantized by llama.cpp ------------------------------------------------------------

SHAPE = TinyConfig(n_layer=2, n_embd=256, n_head=4, n_head_kv=2, n_ff=256, n_expert=8, n_expert_used=2)
PROMPT = "The old lighthouse keeper climbed the stairs every evening, counting each of the 117 steps twice."
N_DECODE = 6


@pytest.fixture(scope="module")
def model(quantized_factory):
    def get(ftype: str):
        path = quantized_factory(SHAPE, ftype, 3)
        types = {n: t.type_name for n, t in GGUFFile(path).tensors.items()}
        # llama-quantize's choices for these rows of 256: the experts and attn_q in the type
        assert types["blk.0.ffn_gate_exps.weight"] == types["blk.1.attn_q.weight"] == ftype, types
        return path

    return get


def llama_cpp_decode(path, ids: list[int], n: int) -> tuple[list[int], np.ndarray]:
    """llama.cpp's greedy tokens after the prompt, fed one at a time, and the logits before each."""
    llm = llama_cpp_model(path, n_ctx=128, logits_all=False)
    try:
        llm.eval(ids)
        tokens, logits = [], []
        for _ in range(n):
            logits.append(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).copy())
            tokens.append(int(np.argmax(logits[-1])))
            llm.eval(tokens[-1:])
    finally:
        llm.close()
    return tokens, np.stack(logits)


@pytest.mark.parametrize("ftype", ["IQ4_NL", "IQ4_XS", "TQ1_0", "TQ2_0"])
def test_model_logits_equal_llama_cpp(model, ftype):
    """Every prompt position (prefill: the batch orders), then one-token decode steps."""
    path = model(ftype)
    with Model.load(path, n_ctx=128) as m:
        ids = m.tokenize(PROMPT)
        assert len(ids) >= 16  # experts get 8+ tokens (tiled) and fewer (vec_dot)
        prefill = m.logits(ids)
    with Model.load(path, n_ctx=128) as m:  # a fresh KV cache
        tokens, steps = greedy_steps(m.transformer, ids, N_DECODE)
    with Model.load(path, n_ctx=128) as m:
        assert list(m.generate_tokens(ids, N_DECODE, SamplingParams(temperature=0.0))) == tokens
    np.testing.assert_array_equal(bits(prefill), bits(llama_cpp_logits(path, ids, n_ctx=128)))
    ref_tokens, ref_steps = llama_cpp_decode(path, ids, N_DECODE)
    assert tokens == ref_tokens
    np.testing.assert_array_equal(bits(np.stack(steps)), bits(ref_steps))


@pytest.mark.parametrize("ftype", ["IQ4_NL", "IQ4_XS"])
def test_model_same_under_budgets_and_kernels(model, ftype):
    """Tiered experts (tight budgets) give the same greedy tokens; the Numba kernels the same logits."""
    from invariance import assert_same_under_budgets_and_kernels

    path = model(ftype)
    with Model.load(path, n_ctx=128) as m:
        ids = m.tokenize(PROMPT)
    assert_same_under_budgets_and_kernels(path, ids, 8)


@pytest.mark.parametrize("ftype,bpw", [("IQ4_NL", "4.50"), ("IQ4_XS", "4.25"), ("TQ1_0", "1.69"), ("TQ2_0", "2.06")])
def test_inspect_names_the_type_and_its_bits_per_weight(model, ftype, bpw):
    from offload.arch import model_args
    from offload.summary import format_summary, summarize

    path = model(ftype)
    g = GGUFFile(path)
    try:
        text = format_summary(str(path), summarize(g, model_args(g), 128))
    finally:
        g.close()
    experts = [line.split() for line in text.splitlines() if line.startswith("experts ") and "per layer" not in line]
    assert [(row[1], row[-1]) for row in experts] == [(ftype, bpw)], text
