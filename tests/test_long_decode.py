"""Long greedy decodes against llama.cpp: the same tokens, and the same logits bit for bit at
every decoded position, on either decode path (the fused C block, and one call per op).

llama.cpp sums a decoding token's attention differently from a prompt's: ggml's mul_mat
hands llamafile's tinyBLAS only batches of 2+ tokens, so for one token V . softmax runs as
ggml_vec_dot_f32 (32 lanes), however many query heads share the KV head. offload once summed
it in tinyBLAS's 8 lanes for GQA models: its logits were an ulp off from the first decoded
token on, and its greedy tokens parted from llama.cpp's after a few dozen (here at step 44
of the qwen3moe model). test_oracle's decodes compare tokens only, over shorter runs.
"""

from __future__ import annotations

import numpy as np
import pytest

from offload import Model
from offload.sampling import SamplingParams
from offload.testing import (DECODE_PATHS, TinyConfig, decode_path, llama_cpp_greedy, llama_cpp_model, quantize_model,
                             ran_as_asked)

N_DECODE = 80
N_CTX = 128
PROMPT = [1] + np.random.default_rng(23).integers(100, 31999, 15).tolist()

SHAPES = {
    # the bench model's attention (GQA 4:1 here, 8:1 there; per-head q/k norms), Q4_K_M by llama-quantize;
    # before the fix its greedy tokens parted from llama.cpp's at decode step 44
    "qwen3moe-Q4_K_M": (TinyConfig(arch="qwen3moe", n_layer=2, n_embd=256, n_head=8, n_head_kv=2, head_dim=64,
                                   n_ff=256, n_expert=8, n_expert_used=2, n_ctx=N_CTX), "Q4_K_M"),
    # Mixtral's: llama arch, GQA 4:1, head_dim 128; F32, whose matmuls take the attention output
    # unquantized (a Q8_0 or Q8_K input would round most one-ulp differences away), so before the
    # fix its logits differed at every decode step
    "llama-gqa-F32": (TinyConfig(n_layer=2, n_embd=128, n_head=8, n_head_kv=2, head_dim=128, n_ff=256, n_expert=4,
                                 n_expert_used=2, n_ctx=N_CTX), "F32"),
}

def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


@pytest.fixture(scope="module", params=list(SHAPES))
def model(request, model_factory, tmp_path_factory):
    config, ftype = SHAPES[request.param]
    if ftype == "F32":
        return model_factory(config, "F32", 0), ftype
    f16 = model_factory(config, "F16", 0)
    return quantize_model(f16, tmp_path_factory.mktemp("long") / f"{ftype}.gguf", ftype), ftype


@pytest.fixture(scope="module")
def reference(model):
    """llama.cpp's greedy tokens (llama_cpp_greedy), and its logits before each of them, got by
    feeding it those tokens one at a time (row i: the logits of position len(PROMPT) - 1 + i)."""
    path, _ = model
    tokens = llama_cpp_greedy(path, PROMPT, N_DECODE, n_ctx=N_CTX)
    assert len(tokens) == N_DECODE, "llama.cpp stopped early: the check would be short"
    llm = llama_cpp_model(path, n_ctx=N_CTX, logits_all=False)
    try:
        llm.eval(PROMPT)
        logits = []
        for token in tokens:
            logits.append(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).copy())
            llm.eval([token])
    finally:
        llm.close()
    return tokens, np.stack(logits)


@pytest.mark.parametrize("kind", list(DECODE_PATHS))
def test_long_greedy_decode_equals_llama_cpp_bit_for_bit(model, reference, kind):
    """offload's greedy decode, one forward step a token, on each decode path (the whole step
    in one C call, one call per block, one per op): llama_cpp_greedy's tokens, and at each
    step llama.cpp's logits to the bit."""
    path, ftype = model
    if kind != "per-op" and ftype == "F32":
        pytest.skip("F32 weights never take the fused C paths")
    with decode_path(kind) as ran, Model.load(path, n_ctx=N_CTX) as m:
        t = m.transformer
        logits = [t.forward(np.array(PROMPT, dtype=np.int64))[-1]]
        tokens = [int(np.argmax(logits[-1]))]
        for _ in range(N_DECODE - 1):
            logits.append(t.forward(np.array(tokens[-1:], dtype=np.int64))[-1])
            tokens.append(int(np.argmax(logits[-1])))
        assert list(m.generate_tokens(PROMPT, N_DECODE, SamplingParams(temperature=0.0))) == tokens
    assert ran_as_asked(kind, ran)  # the path asked for is the one that ran

    ref_tokens, ref_logits = reference
    parted = next((i for i, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b), N_DECODE)
    # up to the step where the tokens part (if they do), both ran the same sequence
    same = [np.array_equal(bits(logits[i]), bits(ref_logits[i])) for i in range(min(parted + 1, N_DECODE))]
    first = same.index(False) if False in same else None
    assert first is None, (f"logits differ at {same.count(False)} of {len(same)} decode steps, first at step {first} "
                           f"(position {len(PROMPT) - 1 + first}), max |diff| "
                           f"{np.abs(logits[first] - ref_logits[first]).max():.3g}")
    assert tokens == ref_tokens, f"greedy tokens part at decode step {parted}"
