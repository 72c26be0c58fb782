"""The model `offload generate` and `offload chat` run when given none.

A small Mixtral-style MoE (4 layers, 8 experts, top-2, 15.5 M parameters, Q8_0) trained from
scratch on the King James Bible, shipped inside the package (offload/data/). How it was
made, and what it can and cannot do: offload/data/MODEL_CARD.md; to remake it:
tools/train_demo.py. Its replies are KJV-flavoured English, a line at a time.
"""

from __future__ import annotations

from pathlib import Path

from .errors import OffloadError

DEMO_FILE = "offload-demo-kjv-moe-Q8_0.gguf"
DATA_DIR = Path(__file__).resolve().parent / "data"


def demo_model_path() -> Path:
    """The bundled demo model's path."""
    path = DATA_DIR / DEMO_FILE
    if not path.exists():
        raise OffloadError(f"the demo model {path} is missing from this install; "
                           "give a model file, or remake it with tools/train_demo.py --install")
    return path


def demo_heldout_text() -> str:
    """The held-out chapters (every 20th of the KJV) the demo model never trained on."""
    return (DATA_DIR / "demo-heldout.txt").read_text()
