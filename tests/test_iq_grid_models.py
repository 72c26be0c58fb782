"""Whole models in the grid I-quants (IQ3_M, IQ3_S, IQ2_XXS, ... IQ1_M files), made by
llama.cpp's own quantizer with a random importance matrix, against llama.cpp: logits per
position to the bit (a prompt of 8+ tokens: ggml's tiled GEMM; single tokens: vec_dot),
the same greedy tokens, and the same under tight memory budgets and on the Numba kernels.

llama-quantize mixes types per tensor. On this qwen3moe-like model (4 experts, rows of 256):
IQ3_M puts IQ3_S on attn_q, the experts and token_embd, Q4_K on one ffn_down_exps, Q5_K on
attn_output, Q6_K on output, and attn_k / attn_v in K-quants or Q8_0; the IQ2/IQ1 files keep
attn_v (and some attn_k / attn_output) in K-quants, IQ1_S's attn_output in IQ2_XXS. `dynamic` is
what the low-bit "dynamic" files of big MoE models do: a different type per tensor
(--tensor-type), here five grid I-quants in one file.
"""

from __future__ import annotations

import numpy as np
import pytest

from offload import Model
from offload.gguf_file import GGUFFile
from offload.kernels.iq_grid import IQ_GRID_TYPES
from offload.sampling import SamplingParams
from offload.testing import TinyConfig, llama_cpp_greedy, llama_cpp_logits, quantize_model
from offload.testing import float_bits as bits
from offload.testing import random_prompt as prompt

from invariance import assert_same_under_budgets_and_kernels

SHAPE = TinyConfig(arch="qwen3moe", n_layer=2, n_embd=256, n_head=4, n_head_kv=2, n_ff=256, n_expert=4,
                   n_expert_used=2)
# Quantizing the 32000 x 256 token_embd and output into grid I-quants is most of the
# quantizer's time: the files below but IQ3_M (whose IQ3_S token_embd checks get_rows) keep
# them in Q8_0.
CHEAP = {"token_embd": "Q8_0", "^output\\.weight$": "Q8_0"}
# file -> (llama-quantize's ftype, --tensor-type overrides); ftype IQ2_M is the IQ2_S one
FILES = {
    "IQ3_M": ("IQ3_M", None),
    "IQ2_XXS": ("IQ2_XXS", CHEAP),
    "IQ3_S": ("IQ3_S", CHEAP),
    "IQ3_XXS": ("IQ3_XXS", CHEAP),
    "IQ2_XS": ("IQ2_XS", CHEAP),
    "IQ2_S": ("IQ2_M", CHEAP),
    "IQ1_S": ("IQ1_S", CHEAP),
    "IQ1_M": ("IQ1_M", CHEAP),
    "dynamic": ("IQ2_XXS", {**CHEAP, "ffn_gate_exps": "IQ2_XS", "ffn_up_exps": "IQ2_S", "ffn_down_exps": "IQ3_XXS",
                            "attn_q": "IQ1_M", "attn_output": "IQ1_S"}),
}


@pytest.fixture(scope="module")
def models(model_factory, tmp_path_factory):
    src = model_factory(SHAPE, "F32", 5)
    root = tmp_path_factory.mktemp("iq_grid")
    made: dict[str, object] = {}

    def get(name: str):
        if name not in made:
            ftype, overrides = FILES[name]
            made[name] = quantize_model(src, root / f"{name}.gguf", ftype, imatrix="random", tensor_types=overrides)
        return made[name]

    return get


def grid_types(path) -> set[str]:
    return {t.type_name for t in GGUFFile(path).tensors.values() if t.ggml_type in IQ_GRID_TYPES}


@pytest.mark.parametrize("name", list(FILES))
def test_logits_and_greedy_tokens_are_llama_cpps(models, name):
    path = models(name)
    want = {"IQ3_M": {"IQ3_S"}, "dynamic": {"IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ1_M", "IQ1_S"}}.get(name, {name})
    assert want <= grid_types(path)
    ids = prompt(20, seed=1)
    with Model.load(path, n_ctx=128) as m:
        logits = m.logits(ids)
        tokens = list(m.generate_tokens(ids, 12, SamplingParams(temperature=0.0)))
    np.testing.assert_array_equal(bits(logits), bits(llama_cpp_logits(path, ids, n_ctx=128)))
    assert tokens == llama_cpp_greedy(path, ids, 12, n_ctx=128)


@pytest.mark.parametrize("name", ["IQ3_M", "dynamic"])
def test_same_under_budgets_and_kernels(models, name):
    assert_same_under_budgets_and_kernels(models(name), prompt(12, seed=2), 8)
