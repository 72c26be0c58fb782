"""Shared fixtures: small random-weight models, written once per test session."""

from __future__ import annotations

import os

import pytest

# Tests run on the CPU even where an NVIDIA GPU is present (Model.load would use it by
# default); the GPU tier's tests ask for it explicitly.
os.environ["OFFLOAD_VRAM_BUDGET"] = "off"

from offload.testing import TinyConfig, llama_cpp_is_avx512_build, quantize_model, shared_data_dir, write_model


def pytest_report_header(config):
    """The oracle's build decides whether bit-exact comparisons can hold: say it up front."""
    if llama_cpp_is_avx512_build():
        return ("llama.cpp: an AVX-512 build (GGML_NATIVE, or a cached wheel): offload follows the AVX2 build, so "
                "bit-exact oracle tests will fail; reinstall it as the README says (--no-cache-dir, GGML_NATIVE=OFF)")
    return "llama.cpp: AVX2 build (the order offload follows)"


@pytest.fixture(scope="session")
def model_factory(tmp_path_factory):
    """model_factory(config, weight_type, seed) -> path of a GGUF written once per session."""
    root = tmp_path_factory.mktemp("models")
    made: dict = {}

    def make(config: TinyConfig = TinyConfig(), weight_type: str = "F32", seed: int = 0):
        key = (config, weight_type, seed)
        if key not in made:
            made[key] = write_model(root / f"m{len(made)}-{weight_type}.gguf", config, weight_type, seed)
        return made[key]

    return make


@pytest.fixture(scope="session")
def quantized_factory(tmp_path_factory):
    """quantized_factory(config, file_type, seed) -> path, written once per session: F32, F16
    and Q8_0 by write_model, any other file type (MXFP4_MOE, Q4_K_M, ...) by llama.cpp's
    quantizer from the F32 model, as users' files are made."""
    root = tmp_path_factory.mktemp("quantized")
    made: dict = {}

    def make(config: TinyConfig, file_type: str, seed: int = 0):
        key = (config, file_type, seed)
        if key not in made:
            direct = file_type if file_type in ("F32", "F16", "Q8_0") else "F32"
            path = write_model(root / f"m{len(made)}-{direct}.gguf", config, direct, seed)
            if direct != file_type:
                path = quantize_model(path, root / f"m{len(made)}-{file_type}.gguf", file_type)
            made[key] = path
        return made[key]

    return make


@pytest.fixture(scope="session")
def shared_data():
    path = shared_data_dir()
    if path is None:
        pytest.skip("../shared/data (real tokenizers and templates) is not beside this clone")
    return path
