"""One C call for a layer's experts (kernels.moe, cext/moe.c: a decoding token's, a prompt's)
and for a decoding token's attention block (kernels.block, cext/layer.c) against the
per-matrix path they replace, bit for bit: every C format, shared experts, thread counts and
SIMD levels; then whole models of every attention kind, whose tokens and logits must not
depend on the path (nor on the budget)."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from offload import Model, arch
from offload.gguf_file import GGUFFile
from offload.sampling import SamplingParams
from offload.store import make_plan
from offload.kernels import QMatrix, cext, select_kernels
from offload.kernels.moe import can_fuse, moe_batch, moe_batch_ref, moe_ffn, moe_ffn_ref
from offload.testing import TinyConfig, decode_path, ggml_quantize, quantize_model, ran_as_asked

pytestmark = pytest.mark.skipif(not cext.has_moe_ffn(), reason="C extension not built")


from offload.weights import FFN


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def matrix(t: T, n_rows: int, n_cols: int, rng) -> QMatrix:
    values = (rng.standard_normal((n_rows, n_cols)) * np.exp(rng.uniform(-3, 1, size=(n_rows, 1)))).astype(np.float32)
    return QMatrix.from_raw(t, ggml_quantize(values, t), n_rows, n_cols)


def ffns(types: tuple[T, T, T], n: int, n_embd: int, n_ff: int, seed: int) -> list[FFN]:
    rng = np.random.default_rng(seed)
    return [FFN(matrix(types[0], n_ff, n_embd, rng), matrix(types[1], n_ff, n_embd, rng),
                matrix(types[2], n_embd, n_ff, rng)) for _ in range(n)]


@pytest.fixture
def restore():
    yield
    cext.set_isa(None)
    cext.set_num_threads(2)
    select_kernels()


MIXES = [
    (T.Q8_0, T.Q8_0, T.Q8_0),
    (T.Q4_0, T.Q4_0, T.Q8_0),
    (T.Q4_K, T.Q4_K, T.Q6_K),  # Q4_K_M's experts
    (T.Q2_K, T.Q3_K, T.Q5_K),
    (T.MXFP4, T.MXFP4, T.MXFP4),  # gpt-oss's
    (T.Q4_K, T.Q8_0, T.Q4_0),  # Q8_K and Q8_0 activations in one call
    (T.IQ2_XXS, T.IQ2_XS, T.IQ3_XXS),  # the grid I-quants of "dynamic" low-bit files
    (T.IQ3_S, T.IQ1_S, T.IQ2_S),
    (T.IQ1_M, T.IQ1_M, T.Q4_K),
]


@pytest.mark.parametrize("types", MIXES, ids=lambda m: "-".join(t.name for t in m))
@pytest.mark.parametrize("level", cext.levels())
def test_one_call_equals_one_call_per_matrix(types, level, restore):
    cext.set_isa(level)
    n_embd, n_ff, k = 512, 256, 8
    routed = ffns(types, k, n_embd, n_ff, seed=1)
    shared = ffns((types[1], types[0], types[2]), 1, n_embd, 2 * n_ff, seed=2)
    x = (np.random.default_rng(3).standard_normal((1, n_embd)) * 4).astype(np.float32)
    weights = np.random.default_rng(4).dirichlet(np.ones(k)).astype(np.float32)
    want, want_shared = moe_ffn_ref(x, routed, weights, shared)
    assert can_fuse(routed + shared)
    for threads in (1, 2):
        cext.set_num_threads(threads)
        out = np.full((1, n_embd), np.nan, np.float32)
        shared_out = np.full((1, n_embd), np.nan, np.float32)
        moe_ffn(x, routed, weights, out, shared, shared_out)
        np.testing.assert_array_equal(bits(out), bits(want))
        np.testing.assert_array_equal(bits(shared_out), bits(want_shared))
        out2 = np.full((1, n_embd), np.nan, np.float32)
        moe_ffn(x, routed[:3], weights[:3], out2)  # fewer experts, no shared, same workspace cache
        np.testing.assert_array_equal(bits(out2), bits(moe_ffn_ref(x, routed[:3], weights[:3])[0]))


@pytest.mark.parametrize("types", MIXES, ids=lambda m: "-".join(t.name for t in m))
@pytest.mark.parametrize("level", cext.levels())
def test_batch_call_equals_one_call_per_expert(types, level, restore):
    """A prompt's experts: some get fewer than 8 tokens (row dots), some more (the tiled GEMM
    for K-quants); the threads take whole experts (12 of them) or split each matmul (2)."""
    cext.set_isa(level)
    n_embd, n_ff, k, n_tokens = 256, 256, 4, 40
    experts = ffns(types, 12, n_embd, n_ff, seed=8)
    rng = np.random.default_rng(9)
    chosen = np.stack([rng.choice(12, size=k, replace=False, p=np.linspace(3, 1, 12) / 24) for _ in range(n_tokens)])
    weights = rng.dirichlet(np.ones(k), size=n_tokens).astype(np.float32)
    x = (rng.standard_normal((n_tokens, n_embd)) * 3).astype(np.float32)
    want = moe_batch_ref(x, experts, chosen, weights)
    counts = np.bincount(chosen.ravel(), minlength=12)
    assert counts.min() < 8 <= counts.max()
    pairs = np.stack(np.divmod(np.argsort(chosen, axis=None, kind="stable"), k), axis=1)
    for threads, per_call in ((1, 12), (2, 12), (2, 2)):
        cext.set_num_threads(threads)
        per_slot = np.zeros_like(want)
        done = 0
        for i in range(0, 12, per_call):
            n = int(counts[i : i + per_call].sum())
            moe_batch(x, experts[i : i + per_call], counts[i : i + per_call], pairs[done : done + n], weights, per_slot)
            done += n
        np.testing.assert_array_equal(bits(per_slot), bits(want), err_msg=f"{threads} threads, {per_call} a call")


def biases_for(experts: list[FFN], seed: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(gate, up, down) bias rows per expert, as weights.ExpertBiases.of gives them: rows of
    stacked arrays."""
    rng = np.random.default_rng(seed)
    n_ff, n_embd = experts[0].gate.n_rows, experts[0].down.n_rows
    stacks = [(rng.standard_normal((len(experts), n)) * 2).astype(np.float32) for n in (n_ff, n_ff, n_embd)]
    return [tuple(s[e] for s in stacks) for e in range(len(experts))]


# gpt-oss's experts (MXFP4_MOE), its Q8_0 file's, and a K-quant mix (the tiled GEMM in a batch)
OAI_MIXES = [(T.MXFP4, T.MXFP4, T.MXFP4), (T.Q8_0, T.Q8_0, T.Q8_0), (T.Q4_K, T.Q4_K, T.Q6_K)]


@pytest.mark.parametrize("types", OAI_MIXES, ids=lambda m: "-".join(t.name for t in m))
@pytest.mark.parametrize("act", ["swiglu", "swiglu_oai"])
@pytest.mark.parametrize("level", cext.levels())
def test_experts_with_biases_and_swiglu_oai_equal_the_per_matrix_path(types, act, level, restore):
    """gpt-oss's experts: biases after each matmul and the clamped swiglu_oai, in one call for
    a decoding token (with a plain shared expert beside them) and for a prompt's batch."""
    cext.set_isa(level)
    n_embd, n_ff, k = 256, 256, 4
    routed = ffns(types, k, n_embd, n_ff, seed=11)
    biases = biases_for(routed, seed=12)
    shared = ffns(types, 1, n_embd, n_ff, seed=13)
    x = (np.random.default_rng(14).standard_normal((1, n_embd)) * 4).astype(np.float32)
    weights = np.random.default_rng(15).dirichlet(np.ones(k)).astype(np.float32)
    want, want_shared = moe_ffn_ref(x, routed, weights, shared, act=act, biases=biases)
    plain, _ = moe_ffn_ref(x, routed, weights, act="swiglu")
    assert not np.array_equal(want, plain)  # the biases or the activation change the result
    for threads in (1, 2):
        cext.set_num_threads(threads)
        out = np.full((1, n_embd), np.nan, np.float32)
        shared_out = np.full((1, n_embd), np.nan, np.float32)
        moe_ffn(x, routed, weights, out, shared, shared_out, act=act, biases=biases)
        np.testing.assert_array_equal(bits(out), bits(want))
        np.testing.assert_array_equal(bits(shared_out), bits(want_shared))
        moe_ffn(x, routed, weights, out, act=act)  # no biases
        np.testing.assert_array_equal(bits(out), bits(moe_ffn_ref(x, routed, weights, act=act)[0]))

    n_tokens, n_exp = 40, 12
    experts = ffns(types, n_exp, n_embd, n_ff, seed=16)
    biases = biases_for(experts, seed=17)
    rng = np.random.default_rng(18)
    chosen = np.stack([rng.choice(n_exp, size=k, replace=False, p=np.linspace(3, 1, n_exp) / 24)
                       for _ in range(n_tokens)])
    weights = rng.dirichlet(np.ones(k), size=n_tokens).astype(np.float32)
    x = (rng.standard_normal((n_tokens, n_embd)) * 3).astype(np.float32)
    want = moe_batch_ref(x, experts, chosen, weights, act=act, biases=biases)
    counts = np.bincount(chosen.ravel(), minlength=n_exp)
    assert counts.min() < 8 <= counts.max()
    pairs = np.stack(np.divmod(np.argsort(chosen, axis=None, kind="stable"), k), axis=1)
    for threads, per_call in ((1, n_exp), (2, n_exp), (2, 2)):
        cext.set_num_threads(threads)
        per_slot = np.zeros_like(want)
        done = 0
        for i in range(0, n_exp, per_call):
            n = int(counts[i : i + per_call].sum())
            moe_batch(x, experts[i : i + per_call], counts[i : i + per_call], pairs[done : done + n], weights, per_slot,
                      act=act, biases=biases[i : i + per_call])
            done += n
        np.testing.assert_array_equal(bits(per_slot), bits(want), err_msg=f"{threads} threads, {per_call} a call")


def test_bad_biases_are_errors_not_crashes():
    f = ffns((T.Q8_0,) * 3, 2, 256, 256, seed=19)
    x, out, w = np.ones((1, 256), np.float32), np.empty((1, 256), np.float32), np.ones(2, np.float32)
    ok = biases_for(f, seed=20)
    with pytest.raises(ValueError, match="floats expected"):
        moe_ffn(x, f, w, out, biases=[ok[0], (ok[1][0], ok[1][1], ok[1][2][:10])])
    with pytest.raises(ValueError, match="entries"):
        moe_ffn(x, f, w, out, biases=ok[:1])
    with pytest.raises(ValueError, match="unknown activation"):
        cext._cext.moe_ffn(x, out, None, np.empty(cext.moe_workspace_bytes(256, (256, 256)), np.uint8), 256, 2,
                           tuple(e.kernel_spec for e in f), w, 5, None)


def test_batch_pairs_outside_the_batch_are_refused():
    f = ffns((T.Q8_0,) * 3, 1, 256, 256, seed=10)
    x, w = np.ones((2, 256), np.float32), np.ones((2, 2), np.float32)
    per_slot = np.zeros((2, 2, 256), np.float32)
    with pytest.raises(ValueError, match="outside"):
        moe_batch(x, f, np.array([1]), np.array([[2, 0]]), w, per_slot)
    with pytest.raises(ValueError, match="fewer"):
        moe_batch(x, f, np.array([3]), np.array([[0, 0]]), w, per_slot)


def test_formats_without_c_kernels_are_not_fused(restore):
    f16 = FFN(*(QMatrix.from_raw(T.F16, np.zeros((r, c), np.float16), r, c) for r, c in ((64, 32), (64, 32), (32, 64))))
    q8 = ffns((T.Q8_0,) * 3, 1, 256, 256, seed=5)
    assert not can_fuse([f16]) and not can_fuse(q8 + [f16]) and can_fuse(q8)
    select_kernels("numba")
    assert not can_fuse(q8)


def test_bad_calls_are_errors_not_crashes():
    q8 = ffns((T.Q8_0,) * 3, 1, 256, 256, seed=6)
    x, out = np.ones((1, 256), np.float32), np.empty((1, 256), np.float32)
    job, w = q8[0].kernel_spec, np.ones(1, np.float32)
    ws = np.empty(cext.moe_workspace_bytes(256, (256,)), np.uint8)
    with pytest.raises(ValueError, match="no C kernel"):
        cext.moe_ffn(x, out, None, ws, 1, (("F16",) + job[1:],), w)
    with pytest.raises(ValueError, match="cannot take"):
        cext.moe_ffn(x, out, None, ws, 1, (job[:6] + (100,),), w)
    with pytest.raises(ValueError, match="smaller"):
        cext.moe_ffn(x, out, None, ws[:100], 1, (job,), w)
    with pytest.raises(ValueError, match="smaller"):
        cext.moe_ffn(x, out, None, ws, 0, (job,), w)  # a shared job without its output
    with pytest.raises(ValueError, match="bad call"):
        cext.moe_ffn(x, out, None, ws, 1, (job,), w[:0])  # no weight for the routed expert


# -- whole models ---------------------------------------------------------------------------

FINE = TinyConfig(arch="qwen3moe", n_layer=3, n_embd=256, n_head=4, n_head_kv=2, head_dim=64, n_ff=256, n_expert=16,
                  n_expert_used=6, n_ctx=256)
SHARED = TinyConfig(arch="qwen2moe", n_layer=2, n_embd=256, n_head=4, n_head_kv=2, n_ff=256, n_expert=8,
                    n_expert_used=4, n_ctx=256, n_ff_shexp=512)


MIXTRAL = TinyConfig(n_layer=2, n_embd=256, n_head=8, n_head_kv=2, n_ff=512, n_expert=4, n_expert_used=2, n_ctx=256)
OLMOE = TinyConfig(arch="olmoe", n_layer=2, n_embd=256, n_head=4, n_head_kv=4, n_ff=256, n_expert=8, n_expert_used=4,
                   n_ctx=256)
# gpt-oss: expert biases and swiglu_oai, q/k/v/o biases, sinks, a window of 16 on the even layers
GPT_OSS = TinyConfig(arch="gpt-oss", n_layer=2, n_embd=256, n_head=4, n_head_kv=1, head_dim=64, n_ff=256, n_expert=8,
                     n_expert_used=4, sliding_window=16)


# every attention kind of the block: GQA with NORM RoPE (llama), q/k/v biases (qwen2moe), per-head
# q/k norms (qwen3moe), whole-projection q/k norms (olmoe), sliding windows, sinks and an output
# bias (gpt-oss, whose prompts of ~60 tokens and 24 more decoded run past its window of 16)
@pytest.fixture(scope="module", params=[(FINE, "Q4_K_M"), (SHARED, "Q8_0"), (MIXTRAL, "Q4_0"), (OLMOE, "Q8_0"),
                                        (GPT_OSS, "MXFP4_MOE"), (GPT_OSS, "Q8_0")],
                ids=["qwen3moe-Q4_K_M", "qwen2moe-Q8_0", "llama-Q4_0", "olmoe-Q8_0", "gpt-oss-MXFP4_MOE", "gpt-oss-Q8_0"])
def quantized(request, model_factory, tmp_path_factory):
    config, ftype = request.param
    f16 = model_factory(config, "F16", seed=7)
    return quantize_model(f16, tmp_path_factory.mktemp("fused") / f"{ftype}.gguf", ftype)


def decode(path, kind: str = "step", ids: list[int] | None = None, n_ctx: int = 128, n_new: int = 24,
           **load) -> tuple[list[int], np.ndarray, set[str], bool]:
    """n_new greedy tokens after a prompt, one forward step each, on the decode path `kind`
    (testing.DECODE_PATHS): the tokens, the logits of every step, the C paths that ran, and
    whether the store held every expert in place with no prefetching (what the step needs)."""
    with decode_path(kind) as ran, Model.load(path, n_ctx=n_ctx, **load) as m:
        if ids is None:
            ids = m.tokenize("The experts of a fine-grained layer " * 8)  # some get 8+ tokens: the tiled GEMM
        t = m.transformer
        logits = [t.forward(np.array(ids, dtype=np.int64))[-1]]
        tokens: list[int] = []
        for _ in range(n_new):
            tokens.append(int(np.argmax(logits[-1])))
            logits.append(t.forward(np.array([tokens[-1]], dtype=np.int64))[-1])
        assert list(m.generate_tokens(ids, n_new, SamplingParams(temperature=0.0))) == tokens
        in_place = getattr(m.transformer.experts, "all_resident", True) and m.transformer.prefetcher is None
        return tokens, np.stack(logits), set(ran), in_place


def test_models_decode_the_same_bits_on_every_path(quantized):
    tokens, logits, ran, _ = decode(quantized, "step")
    assert ran_as_asked("step", ran)  # the path asked for is the one that ran
    for kind in ("layer", "per-op"):
        tokens_ref, logits_ref, ran, _ = decode(quantized, kind)
        assert ran_as_asked(kind, ran)
        assert tokens == tokens_ref, kind
        np.testing.assert_array_equal(bits(logits), bits(logits_ref), err_msg=kind)


def test_fused_paths_under_tight_budgets_with_prefetch(quantized):
    """A tiered store that moves experts (or prefetch) takes the per-layer C path; a budget
    that holds every expert in the store's slots, the whole step: the same bits either way."""
    tokens, logits, _, _ = decode(quantized, "step")
    g = GGUFFile(quantized)
    try:
        p = make_plan(g, arch.model_args(g), 128, 0)
    finally:
        g.close()
    paths = set()
    for budget, prefetch in ((p.minimum, True), (p.minimum + 4 * p.pools[0].slot_bytes, True),
                             ((p.minimum + p.full) // 2, False), (p.full + (1 << 20), False)):
        t2, l2, ran, in_place = decode(quantized, "step", memory_budget=budget, prefetch=prefetch)
        paths.add("step" if in_place else "layer")
        assert ran_as_asked("step" if in_place else "layer", ran), (budget, prefetch, ran)
        assert t2 == tokens, budget
        np.testing.assert_array_equal(bits(l2), bits(logits))
    assert paths == {"step", "layer"}  # both ran


def test_gpt_oss_ring_of_cells_wraps_the_same_on_either_path(model_factory, tmp_path):
    """With a context of 1024 the sliding layers keep a ring of 768 cells: a prompt of 760 and
    20 decoded tokens write past its end, so the fused block's cell pos % n_cells and its
    window over the wrapped ring must be the step-by-step path's."""
    path = quantize_model(model_factory(GPT_OSS, "F16", seed=7), tmp_path / "MXFP4_MOE.gguf", "MXFP4_MOE")
    with Model.load(path, n_ctx=1024) as m:
        assert [len(k) for k in m.transformer.cache.k] == [768, 1024]
    ids = [1] + [int(t) for t in np.random.default_rng(2).integers(100, 31999, 759)]
    tokens, logits, _, _ = decode(path, "step", ids=ids, n_ctx=1024, n_new=20)
    tokens_ref, logits_ref, _, _ = decode(path, "per-op", ids=ids, n_ctx=1024, n_new=20)
    assert tokens == tokens_ref
    np.testing.assert_array_equal(bits(logits), bits(logits_ref))
