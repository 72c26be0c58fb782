"""Architecture registry, keyed by the GGUF's `general.architecture`.

To add a family: write a module with `model_args(gguf) -> ModelArgs` and register it here.
"""

from __future__ import annotations

from typing import Callable

from ..errors import UnsupportedModelError
from ..gguf_file import GGUFFile
from . import deepseek2, glm4moe, gpt_oss, llama, olmoe, qwen2moe, qwen3moe
from .base import ModelArgs

ARCHITECTURES: dict[str, Callable[[GGUFFile], ModelArgs]] = {
    "llama": llama.model_args,
    "qwen2moe": qwen2moe.model_args,
    "qwen3moe": qwen3moe.model_args,
    "olmoe": olmoe.model_args,
    "gpt-oss": gpt_oss.model_args,
    "deepseek2": deepseek2.model_args,
    "glm4moe": glm4moe.model_args,
}


def model_args(gguf: GGUFFile) -> ModelArgs:
    arch = gguf.architecture
    if arch not in ARCHITECTURES:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise UnsupportedModelError(f"{gguf.path}: architecture '{arch}' is not supported (supported: {supported})")
    args = ARCHITECTURES[arch](gguf)
    if args.expert_groups > 1 and (args.n_expert % args.expert_groups or not 0 < args.expert_groups_used <= args.expert_groups):
        raise UnsupportedModelError(f"{gguf.path}: {args.n_expert} experts do not split into {args.expert_groups} groups "
                                    f"of which {args.expert_groups_used} are used")
    if args.n_head % args.n_head_kv:
        raise UnsupportedModelError(f"{gguf.path}: {args.n_head} heads do not group over {args.n_head_kv} KV heads")
    if args.is_moe and not 0 < args.n_expert_used <= args.n_expert:
        raise UnsupportedModelError(
            f"{gguf.path}: expert_used_count {args.n_expert_used} does not fit expert_count {args.n_expert}"
        )
    if args.sliding_window < 0 or (args.swa_layers and len(args.swa_layers) != args.n_layer):
        raise UnsupportedModelError(f"{gguf.path}: bad sliding window settings")
    return args


__all__ = ["ARCHITECTURES", "ModelArgs", "model_args"]
