"""Every llama-quantize mix, made by llama.cpp's own quantizer, against llama.cpp's logits, to the bit.

llama-quantize picks per-tensor types (e.g. Q4_K_M: Q4_K with Q6_K for the output and
half of ffn_down, Q8_0 attn_k/attn_v for 8-expert models), so each mix exercises several
kernels at once, in the combination real files have.
"""

from __future__ import annotations

import numpy as np
import pytest

from offload import Model
from offload.gguf_file import GGUFFile
from offload.sampling import SamplingParams
from offload.testing import TinyConfig, float_bits, llama_cpp_greedy, llama_cpp_logits, quantize_model

# Row lengths must be multiples of 256 for k-quants (else llama-quantize falls back).
SHAPE = TinyConfig(n_layer=2, n_embd=256, n_head=4, n_head_kv=2, n_ff=256, n_expert=8, n_expert_used=2)
PROMPT = "The old lighthouse keeper climbed the stairs every evening, counting each of the 117 steps twice."
# Every mix, k-quant ones included: prompts of 8+ tokens run ggml's tiled order (kernels/tiled.py).
MIXES = ["Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q4_K_M", "Q4_K_S", "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K",
         "Q5_1", "Q5_0", "Q4_1", "Q4_0"]


@pytest.fixture(scope="module")
def quantized(model_factory, tmp_path_factory):
    src = model_factory(SHAPE, "F32", 3)
    root = tmp_path_factory.mktemp("mixes")
    made: dict[str, object] = {}

    def get(ftype: str):
        if ftype not in made:
            made[ftype] = quantize_model(src, root / f"{ftype}.gguf", ftype)
        return made[ftype]

    return get


@pytest.mark.parametrize("ftype", MIXES)
def test_mix_logits_match_llama_cpp(quantized, ftype):
    path = quantized(ftype)
    types = sorted({t.type_name for t in GGUFFile(path).tensors.values()})
    with Model.load(path, n_ctx=128) as m:
        ids = m.tokenize(PROMPT)
        ours = m.logits(ids)
    ref = llama_cpp_logits(path, ids, n_ctx=128)
    differ = int(np.sum(float_bits(ours) != float_bits(ref)))  # to the bit: offload follows ggml's orders
    err = float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))
    assert differ == 0, f"{ftype} ({', '.join(types)}): {differ} logits differ, relative L2 error {err:.2e}"


@pytest.mark.parametrize("ftype", ["Q4_K_M", "Q3_K_M", "Q5_1"])
def test_mix_greedy_matches_llama_cpp(quantized, ftype):
    """A prompt of 8+ tokens (tiled prefill) then one-token steps (vec_dot), last logits only."""
    path = quantized(ftype)
    with Model.load(path, n_ctx=128) as m:
        ids = m.tokenize(PROMPT)
        assert len(ids) >= 16
        ours = list(m.generate_tokens(ids, 48, SamplingParams(temperature=0.0)))
    assert ours == llama_cpp_greedy(path, ids, 48, n_ctx=128)
