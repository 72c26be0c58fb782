"""The command line: `inspect` and `generate`, and one clear line for every bad input."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFWriter

from offload.testing import TinyConfig

SMALL = TinyConfig(n_layer=2, n_embd=64, n_head=4, n_head_kv=2, n_ff=128, n_expert=4, n_expert_used=2, n_ctx=128)


def offload_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "offload", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("offload: error: ")
    for fragment in fragments:
        assert fragment in lines[0]


def set_tensor_type(path: Path, name: str, type_id: int) -> None:
    """Overwrite the quant type of one tensor-table entry in place."""
    data = bytearray(path.read_bytes())
    at = data.find(name.encode() + struct.pack("<I", 2))  # name, then n_dims == 2
    assert at > 0
    type_at = at + len(name) + 4 + 8 * 2
    data[type_at:type_at + 4] = struct.pack("<I", type_id)
    path.write_bytes(bytes(data))


@pytest.fixture
def small_model(model_factory):
    return model_factory(SMALL, "Q8_0")


def test_generate_prints_text_and_speed(small_model):
    r = offload_cli("generate", small_model, "-p", "Once upon a time", "-n", "12", "--temp", "0", "-t", "1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Once upon a time")
    assert len(r.stdout.strip()) > len("Once upon a time")
    assert "generated 12 tokens" in r.stderr and "tok/s" in r.stderr


def test_generate_is_reproducible_with_a_seed(small_model):
    a = offload_cli("generate", small_model, "-n", "16", "--seed", "7", "--temp", "1.0")
    b = offload_cli("generate", small_model, "-n", "16", "--seed", "7", "--temp", "1.0")
    assert a.returncode == b.returncode == 0
    assert a.stdout == b.stdout


def test_inspect_reports_params_bytes_and_minimum(small_model):
    r = offload_cli("inspect", small_model)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "architecture  llama (MoE)" in out
    assert "experts       4 per layer, 2 used per token" in out
    # counted here from the config, independently of the file
    c = SMALL
    kv_dim = c.n_head_kv * (c.n_embd // c.n_head)
    per_layer_attn = 2 * c.n_embd * c.n_embd + 2 * kv_dim * c.n_embd
    per_layer_experts = 3 * c.n_expert * c.n_ff * c.n_embd
    other = 2 * 32000 * c.n_embd + c.n_embd + c.n_layer * (2 * c.n_embd + c.n_expert * c.n_embd + per_layer_attn)
    total = other + c.n_layer * per_layer_experts
    active = other + c.n_layer * per_layer_experts // 2
    assert f"{total / 1e6:.2f}M total, {active / 1e6:.2f}M active per token" in out
    assert "experts         Q8_0" in out and "router          F32" in out
    assert "minimum budget" in out and "runs in offload   yes" in out


def test_missing_file():
    assert_one_line_error(offload_cli("generate", "/nonexistent/model.gguf"), "no such file")


def test_not_a_gguf(tmp_path):
    p = tmp_path / "notes.gguf"
    p.write_text("this is not a model\n" * 10)
    assert_one_line_error(offload_cli("inspect", p), "not a GGUF file")


@pytest.mark.parametrize("keep", [6, 20, 3000, 200_000])
def test_truncated_file(small_model, tmp_path, keep):
    """Cut inside the header, the metadata, the tensor table region, and the tensor data."""
    p = tmp_path / "cut.gguf"
    p.write_bytes(small_model.read_bytes()[:keep])
    assert_one_line_error(offload_cli("generate", p, "-n", "1"), str(p))


def test_tensor_data_past_end_of_file(small_model, tmp_path):
    data = small_model.read_bytes()
    p = tmp_path / "short.gguf"
    p.write_bytes(data[: len(data) - 1000])
    assert_one_line_error(offload_cli("inspect", p), "truncated")


def test_absurd_counts_in_header(small_model, tmp_path):
    data = bytearray(small_model.read_bytes())
    data[16:24] = struct.pack("<Q", 2**62)  # kv_count
    p = tmp_path / "counts.gguf"
    p.write_bytes(bytes(data))
    assert_one_line_error(offload_cli("inspect", p), "corrupt")


def test_unknown_architecture(tmp_path):
    p = tmp_path / "arch.gguf"
    w = GGUFWriter(p, "frobnicator")
    w.add_tensor("token_embd.weight", np.zeros((8, 32), dtype=np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    assert_one_line_error(offload_cli("generate", p), "architecture 'frobnicator' is not supported")


def test_unknown_quant_type_id(small_model, tmp_path):
    p = tmp_path / "qtype.gguf"
    p.write_bytes(small_model.read_bytes())
    set_tensor_type(p, "blk.0.attn_q.weight", 99)
    assert_one_line_error(offload_cli("generate", p), "unknown quant type id 99")


def test_unsupported_quant_type(model_factory, tmp_path):
    """A type llama.cpp knows but offload does not run: named, with the tensor."""
    src = model_factory(TinyConfig(n_embd=256, n_head=4, n_head_kv=2, n_ff=256, n_expert=4, n_expert_used=2), "F32")
    p = tmp_path / "iq.gguf"
    p.write_bytes(src.read_bytes())
    set_tensor_type(p, "blk.0.attn_q.weight", int(GGMLQuantizationType.I8))  # fewer bytes: still in the file
    assert_one_line_error(offload_cli("generate", p), "blk.0.attn_q.weight", "I8")
    r = offload_cli("inspect", p)
    assert r.returncode == 0 and "runs in offload   no: tensor blk.0.attn_q.weight" in r.stdout


def test_prompt_longer_than_context(small_model):
    r = offload_cli("generate", small_model, "-c", "16", "-p", "word " * 40)
    assert_one_line_error(r, "more than the context of 16")


def test_bad_thread_count(small_model):
    assert_one_line_error(offload_cli("generate", small_model, "-t", "100000"), "thread count")


def test_python_module_entry_point_has_help():
    r = offload_cli("--help")
    assert r.returncode == 0 and "generate" in r.stdout and "inspect" in r.stdout


def test_generation_stops_when_the_context_is_full(small_model):
    r = offload_cli("generate", small_model, "-c", "32", "-n", "100", "--temp", "0", "-p", "Once upon a time")
    assert r.returncode == 0, r.stderr
    assert "(stop: context)" in r.stderr
    prompt_tokens = int(r.stderr.split("prompt ")[1].split(" tokens")[0])
    generated = int(r.stderr.split("generated ")[1].split(" tokens")[0])
    assert prompt_tokens + generated == 32 + 1  # the last token is sampled from the full context
