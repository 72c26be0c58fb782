"""Architecture registry, keyed by the GGUF's `general.architecture`.

To add a family: write a module with `model_args(gguf) -> ModelArgs` and register it here.
"""

from __future__ import annotations

import math
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
    try:
        args = ARCHITECTURES[arch](gguf)
    except (ArithmeticError, ValueError, TypeError) as e:  # a count of 0, a value of the wrong kind
        raise UnsupportedModelError(f"{gguf.path}: bad {arch} hyperparameters in the metadata ({e})") from None
    _check_sizes(gguf, args)
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


def _check_sizes(gguf: GGUFFile, args: ModelArgs) -> None:
    """Sizes every later step divides by or loops over: positive, and RoPE within a head.
    (Whether they fit the tensors is weights.check_shapes's part.)"""
    for name in ("n_layer", "n_embd", "n_head", "n_head_kv", "head_dim", "n_vocab", "n_ctx_train"):
        if getattr(args, name) <= 0:
            raise UnsupportedModelError(f"{gguf.path}: {name} is {getattr(args, name)} in the metadata (must be positive)")
    if args.n_expert < 0 or args.n_expert_used < 0:
        raise UnsupportedModelError(f"{gguf.path}: expert counts {args.n_expert} / {args.n_expert_used} in the metadata")
    # every later loop runs over the layers: a block count beyond the file's blocks is refused here
    blocks = {name.split(".", 2)[1] for name in gguf.tensors if name.startswith("blk.")}
    if args.n_layer > len(blocks) or any(f"{i}" not in blocks for i in range(args.n_layer)):
        raise UnsupportedModelError(f"{gguf.path}: block_count is {args.n_layer} but the file holds tensors for "
                                    f"{len(blocks)} blocks")
    if not 0 < args.rope_dim <= args.head_dim or args.rope_dim % 2:
        raise UnsupportedModelError(f"{gguf.path}: rope dimension {args.rope_dim} does not fit a head of {args.head_dim} "
                                    "(an even number, at most the head)")
    if not (math.isfinite(args.rms_eps) and args.rms_eps >= 0) or not (math.isfinite(args.rope_base) and args.rope_base > 0):
        raise UnsupportedModelError(f"{gguf.path}: norm epsilon {args.rms_eps} or RoPE base {args.rope_base} is not a "
                                    "usable number")


__all__ = ["ARCHITECTURES", "ModelArgs", "model_args"]
