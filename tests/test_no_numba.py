"""With the C extension, a run never imports Numba (its LLVM costs ~110 MiB of RSS and a
fraction of a second per process): `import offload`, load, generate (a prompt long enough
for the K-quants' tiled path), chat, and the tiered store with prefetch, each in a fresh
process, on the demo model and on a small qwen2moe model (shared expert, its sigmoid gate,
F32 routers, Q4_K_M mix). OFFLOAD_KERNELS=numba gives the same tokens through Numba."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from offload.demo import demo_model_path
from offload.kernels import cext
from offload.testing import TinyConfig, quantize_model

pytestmark = pytest.mark.skipif(not cext.selected(), reason="C extension (with its ops) not built")

QWEN2MOE = TinyConfig(arch="qwen2moe", n_layer=2, n_embd=256, n_head=4, n_head_kv=4, n_ff=256, n_ff_shexp=512,
                      n_expert=8, n_expert_used=2, n_ctx=256)

_RUN = r"""
import json, sys
import offload, offload.cli  # the command's own imports too
from offload import Model, arch
from offload.gguf_file import GGUFFile
from offload.sampling import SamplingParams
from offload.store import make_plan

path = sys.argv[1]
greedy = SamplingParams(temperature=0.0)
out = {"import": sorted(k for k in sys.modules if k.split(".")[0] in ("numba", "llvmlite"))}
with Model.load(path, n_ctx=256) as m:
    ids = m.tokenize("In the beginning God created the heaven and the earth. And the earth was without form")
    out["generate"] = list(m.generate_tokens(ids, 12, greedy))
    out["chat"] = m.chat([{"role": "user", "content": "Who made the earth?"}], max_tokens=8, temperature=0.0,
                         stream=False)
g = GGUFFile(path)
minimum = make_plan(g, arch.model_args(g), 256, 0).minimum
g.close()
with Model.load(path, n_ctx=256, memory_budget=minimum) as m:  # tiered, lookahead prefetch
    out["tiered"] = list(m.generate_tokens(ids, 12, greedy))
    out["misses"] = m.stats()["misses"]
out["numba"] = sorted(k for k in sys.modules if k.split(".")[0] in ("numba", "llvmlite"))
print(json.dumps(out))
"""


def _run(path, kernels: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OFFLOAD_GPU_SIMULATOR", "NUMBA_ENABLE_CUDASIM")}
    env.update(OFFLOAD_KERNELS=kernels, OFFLOAD_VRAM_BUDGET="off")
    r = subprocess.run([sys.executable, "-c", _RUN, str(path)], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def qwen2moe(model_factory, tmp_path_factory):
    return quantize_model(model_factory(QWEN2MOE, "F32", 3), tmp_path_factory.mktemp("q") / "q4km.gguf", "Q4_K_M")


@pytest.mark.parametrize("which", ["demo", "qwen2moe"])
def test_a_c_run_never_imports_numba(which, request):
    path = demo_model_path() if which == "demo" else request.getfixturevalue("qwen2moe")
    c = _run(path, "c")
    assert c["import"] == [] and c["numba"] == [], c["numba"]
    assert c["misses"] > 0  # the tiered store really read experts (and predicted them)
    numba = _run(path, "numba")
    assert "numba" in numba["numba"]
    for key in ("generate", "chat", "tiered"):
        assert c[key] == numba[key], key
    assert c["tiered"] == c["generate"]


def test_the_plan_counts_numba_only_where_it_serves_a_kernel():
    from gguf import GGMLQuantizationType as T

    from offload import arch
    from offload.gguf_file import GGUFFile
    from offload.kernels import dispatch, select_kernels
    from offload.store.plan import NUMBA_RUNTIME_BYTES, RUNTIME_BYTES, make_plan

    assert not dispatch.uses_numba({T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q4_K, T.Q6_K,
                                    T.MXFP4})
    with pytest.MonkeyPatch.context() as mp:  # a format without a C kernel: Numba serves it
        mp.setitem(dispatch.KERNELS, T.Q5_1, dispatch.NUMBA_KERNELS[T.Q5_1])
        assert dispatch.uses_numba({T.F32, T.Q5_1})
    g = GGUFFile(demo_model_path())
    try:
        plan = lambda **kw: make_plan(g, arch.model_args(g), 512, 0, **kw)  # noqa: E731
        assert plan().runtime == RUNTIME_BYTES
        assert plan(gpu=True).runtime == RUNTIME_BYTES + NUMBA_RUNTIME_BYTES  # numba.cuda
        select_kernels("numba")
        try:
            assert dispatch.uses_numba({T.Q8_0}) and plan().runtime == RUNTIME_BYTES + NUMBA_RUNTIME_BYTES
        finally:
            select_kernels()
    finally:
        g.close()
