"""Shared fixtures: small random-weight models, written once per test session."""

from __future__ import annotations

import pytest

from offload.testing import TinyConfig, shared_data_dir, write_model


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
def shared_data():
    path = shared_data_dir()
    if path is None:
        pytest.skip("../shared/data (real tokenizers and templates) is not beside this clone")
    return path
