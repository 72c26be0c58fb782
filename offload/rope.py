"""RoPE's cos/sin tables and the scales that come with YaRN, as llama.cpp computes them.

Positions are rotated by tables made once per model load (per RoPE base: gpt-oss's sliding
layers may have their own). Every value is float32 step by step as ggml and llama_context
compute it (the C library's powf, cosf, sinf, logf; one FMA where GCC contracts one), since
a one-ulp difference in a table moves every query and key.
"""

from __future__ import annotations

import numpy as np

from .arch import ModelArgs
from .kernels import ggml_math


def rope_tables(args: ModelArgs, n_ctx: int, base: float | None = None,
                positions: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin of every (position, pair) as ggml computes them: theta *= powf(base, -2/d) in
    float32, then the C library's cosf/sinf; with YaRN, ggml's rope_yarn on each. Positions
    0 .. n_ctx-1, or those given (a context shift rotates keys by negative ones)."""
    f32 = np.float32
    n_pairs = args.rope_dim // 2
    base = args.rope_base if base is None else base
    theta_scale = ggml_math.libm("powf", f32(base), f32(-2.0) / f32(args.rope_dim))
    positions = np.arange(n_ctx) if positions is None else np.asarray(positions)
    theta = np.empty((len(positions), n_pairs), dtype=np.float32)
    theta[:, 0] = positions.astype(np.float32)
    for i in range(1, n_pairs):
        theta[:, i] = theta[:, i - 1] * theta_scale
    freq_scale = f32(args.rope_freq_scale)
    if args.yarn is None:
        theta *= freq_scale
        return ggml_math.libm("cosf", theta), ggml_math.libm("sinf", theta)
    ramp_mix, mscale = yarn_ramp_and_mscale(args, base)
    interp = freq_scale * theta
    # theta_interp * (1 - ramp_mix) + theta_extrap * ramp_mix, as GCC contracts it: one FMA
    # (exact where the ramp is 0 or 1, so only the ramp's pairs need the C library's fmaf)
    mixed = (ramp_mix > 0) & (ramp_mix < 1)
    extrap_part = theta[:, mixed] * ramp_mix[mixed]
    theta[:, ~mixed] = np.where(ramp_mix[~mixed] == 0, interp[:, ~mixed], theta[:, ~mixed])
    theta[:, mixed] = ggml_math.libm("fmaf", interp[:, mixed], np.broadcast_to(f32(1) - ramp_mix[mixed], extrap_part.shape),
                                     extrap_part)
    return ggml_math.libm("cosf", theta) * mscale, ggml_math.libm("sinf", theta) * mscale


def yarn_ramp_and_mscale(args: ModelArgs, base: float) -> tuple[np.ndarray, np.float32]:
    """YaRN's per-pair extrapolation mix and its cos/sin magnitude, in float32 step by step as
    llama.cpp computes them (ggml_rope_yarn_corr_dims, rope_yarn_ramp; the attention factor
    from llama_context's get_mscale, cancelled as it cancels it, times rope_yarn's own)."""
    f32, y, logf = np.float32, args.yarn, _logf
    n_dims = f32(args.rope_dim)

    def corr_dim(beta: float) -> np.float32:
        return n_dims * logf(f32(y.orig_ctx) / (f32(beta) * f32(2) * f32(np.pi))) / (f32(2) * logf(f32(base)))

    low = max(f32(0), f32(np.floor(corr_dim(y.beta_fast))))
    high = min(n_dims - f32(1), f32(np.ceil(corr_dim(y.beta_slow))))
    i = np.arange(args.rope_dim // 2, dtype=np.float32)  # i0 / 2
    ramp = f32(1) - np.minimum(f32(1), np.maximum(f32(0), (i - low) / max(f32(0.001), high - low)))
    ramp_mix = (ramp * f32(y.ext_factor)).astype(np.float32)
    mscale = f32(yarn_attn_factor(args) * (f32(1) + f32(0.1) * logf(f32(1) / f32(args.rope_freq_scale))))
    return ramp_mix, mscale


def _logf(v) -> np.float32:
    return ggml_math.libm("logf", np.asarray(v, dtype=np.float32))[()]


def yarn_attn_factor(args: ModelArgs) -> np.float32:
    """llama_context's yarn_attn_factor: with YaRN, get_mscale(factor, mscale) over
    get_mscale(factor, log_mul) (or get_mscale(factor, 1) without log_mul), cancelled by
    1 / (1 + 0.1 ln factor) (ggml's rope multiplies it back); 1 without YaRN."""
    f32, y = np.float32, args.yarn
    if y is None:
        return f32(1)
    factor = f32(1) / f32(args.rope_freq_scale)

    def get_mscale(m: float) -> np.float32:
        return f32(1) if factor <= 1 else f32(f32(f32(0.1) * f32(m)) * _logf(factor) + f32(1))

    attn = get_mscale(y.mscale) / get_mscale(y.log_mul) if y.log_mul else get_mscale(1.0)
    return f32(attn * (f32(1) / (f32(1) + f32(0.1) * _logf(factor))))


def mla_score_scale(args: ModelArgs) -> np.float32:
    """MLA's softmax scale as deepseek2.cpp computes it: mscale^2 / sqrt(head_dim), where
    mscale undoes the attention factor's cancellation and applies YaRN's log_mul."""
    f32 = np.float32
    inv_fs = f32(1) / f32(args.rope_freq_scale)
    log_mul = args.yarn.log_mul if args.yarn is not None else 0.0
    attn_factor_org = f32(yarn_attn_factor(args) * (f32(1) + f32(0.1) * _logf(inv_fs)))
    mscale = f32(attn_factor_org * (f32(1) + f32(f32(0.1) * f32(log_mul)) * _logf(inv_fs)))
    return f32(f32(f32(1) * mscale) * mscale) / np.sqrt(f32(args.head_dim))
