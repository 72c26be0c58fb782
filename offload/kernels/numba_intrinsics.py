"""Float operations Numba does not spell: a float32 fused multiply-add, float32 <-> uint32 bit
casts (ggml's exp builds a power of two from the bits of a float), and rounding to half.
Declared lazily (see `jit`): Numba and llvmlite are imported only when a kernel needs them."""

from __future__ import annotations

import numpy as np

from .jit import intrinsic, njit


@intrinsic
def fma32(typingctx, a, b, c):
    """a * b + c in float32 with one rounding (llvm.fma.f32: an FMA instruction, or libm's
    fmaf where the CPU has none), as ggml's _mm256_fmadd_ps."""
    from llvmlite import ir
    from numba import types

    sig = types.float32(types.float32, types.float32, types.float32)

    def codegen(context, builder, signature, args):
        f32 = ir.FloatType()
        fn = builder.module.declare_intrinsic("llvm.fma", [f32], ir.FunctionType(f32, [f32, f32, f32]))
        return builder.call(fn, args)

    return sig, codegen


@intrinsic
def f32_bits(typingctx, x):
    """The IEEE bit pattern of a float32, as uint32."""
    from llvmlite import ir
    from numba import types

    sig = types.uint32(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return sig, codegen


@intrinsic
def bits_f32(typingctx, u):
    """The float32 whose bit pattern is the uint32 u."""
    from llvmlite import ir
    from numba import types

    sig = types.float32(types.uint32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@njit(inline="always")
def round_f16(x):
    """float32 -> the float32 value of the nearest IEEE half (ties to even, overflow to inf),
    as F16C's vcvtps2ph: GGML_FP32_TO_FP16 on x86."""
    u = f32_bits(x)
    sign = u & np.uint32(0x80000000)
    a = u & np.uint32(0x7FFFFFFF)
    if a >= np.uint32(0x7F800000):  # inf, nan
        return x
    if a >= np.uint32(0x477FF000):  # >= 65520 rounds past the largest half, 65504
        return bits_f32(sign | np.uint32(0x7F800000))
    if a < np.uint32(0x38800000):  # below 2**-14: a half subnormal, a multiple of 2**-24
        r = np.float32(np.rint(bits_f32(a) * np.float32(16777216.0))) * np.float32(5.9604644775390625e-08)
        return bits_f32(sign | f32_bits(r))
    a = (a + np.uint32(0xFFF) + ((a >> np.uint32(13)) & np.uint32(1))) & np.uint32(0xFFFFE000)
    return bits_f32(sign | a)
