"""The model `offload generate` runs when given none.

Until a trained demo model ships, this is a small random-weight Mixtral-shaped model
(real Llama 2 / Mixtral tokenizer, 8 experts, top-2, Q8_0), written on first use to the
user's cache directory. Its text is noise; it shows the pipeline and the speed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .testing import TinyConfig, write_model

DEMO_CONFIG = TinyConfig(n_layer=4, n_embd=256, n_head=8, n_head_kv=4, n_ff=512, n_expert=8, n_expert_used=2, n_ctx=2048)
DEMO_NAME = "offload-demo-random-moe-q8_0.gguf"


def demo_model_path() -> Path:
    """The demo model's path, writing it first if it is not there yet."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "offload"
    path = cache / DEMO_NAME
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        print(f"offload: writing the demo model (random weights) to {path} ...", file=sys.stderr)
        tmp = path.with_suffix(".tmp")
        write_model(tmp, DEMO_CONFIG, weight_type="Q8_0", seed=1234)
        tmp.replace(path)
    return path
