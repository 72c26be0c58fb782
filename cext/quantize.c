/* Activation quantization in C, the twin of numba_kernels._quantize_q8_0 / _quantize_q8_k and
 * q4_1_q5._quantize_q8_1
 * (and of formats.quantize_q8_0_ref / quantize_q8_k_ref): the same float32 operations in the
 * same order, so the bits are the same. It lets one C call convert a token's activations and
 * run the matmuls that share them (module.c: matmul_x), instead of a Numba call per matrix. */
#include <math.h>
#include <string.h>

#include "quantize.h"
#include "kernels.h" /* enum act_kind */

/* Compiled for AVX2 (rounding in one instruction, 8 lanes) and for any x86-64, picked at load. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__GLIBC__) /* ifunc */
#define MULTIVERSION __attribute__((target_clones("avx2", "default")))
#else
#define MULTIVERSION
#endif

static inline uint32_t f32_bits(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    return u;
}

static inline float bits_f32(uint32_t u) {
    float x;
    memcpy(&x, &u, 4);
    return x;
}

/* float -> int8 as the Numba twin's np.int8(v) does on x86: in range, truncation; NaN and
 * infinities (only from a block whose largest value is below ~4e-37) give 0, the low byte of
 * the conversion's INT_MIN. */
static inline int8_t to_int8(float v) { return v >= -128.0f && v <= 127.0f ? (int8_t)v : 0; }

float round_f16(float x) {
    const uint32_t u = f32_bits(x), sign = u & 0x80000000u;
    uint32_t a = u & 0x7FFFFFFFu;
    if (a >= 0x7F800000u) return x;                                  /* inf, nan */
    if (a >= 0x477FF000u) return bits_f32(sign | 0x7F800000u);        /* >= 65520: past the largest half */
    if (a < 0x38800000u) {                                            /* a half subnormal: a multiple of 2^-24 */
        const float r = rintf(bits_f32(a) * 16777216.0f) * 5.9604644775390625e-08f;
        return bits_f32(sign | f32_bits(r));
    }
    a = (a + 0xFFFu + ((a >> 13) & 1u)) & 0xFFFFE000u;                /* 10 mantissa bits, ties to even */
    return bits_f32(sign | a);
}

MULTIVERSION void quantize_row_q8_0(const float *x, int8_t *qs, float *d, int k) {
    for (int b = 0; b < k / 32; b++) {
        const float *xb = x + b * 32;
        float amax = 0.0f;
        for (int j = 0; j < 32; j++) {
            const float a = fabsf(xb[j]);
            if (a > amax) amax = a;
        }
        d[b] = round_f16(amax / 127.0f);
        const float inv = amax != 0.0f ? 127.0f / amax : 0.0f;
        for (int j = 0; j < 32; j++) qs[b * 32 + j] = to_int8(rintf(xb[j] * inv));
    }
}

MULTIVERSION void quantize_row_q8_k(const float *x, int8_t *qs, float *d, int16_t *bsums, int k) {
    for (int b = 0; b < k / 256; b++) {
        const float *xb = x + b * 256;
        int8_t *q = qs + b * 256;
        float amax = 0.0f, vmax = 0.0f;
        for (int j = 0; j < 256; j++) {
            const float a = fabsf(xb[j]);
            if (a > amax) {
                amax = a;
                vmax = xb[j];
            }
        }
        if (amax == 0.0f) {
            d[b] = 0.0f;
            memset(q, 0, 256);
            memset(bsums + b * 16, 0, 16 * sizeof(int16_t));
            continue;
        }
        const float iscale = -127.0f / vmax;
        for (int j = 0; j < 256; j++) {
            const float v = rintf(iscale * xb[j]);
            q[j] = to_int8(127.0f < v ? 127.0f : v); /* Python's min(v, 127.0): NaN stays NaN */
        }
        for (int g = 0; g < 16; g++) {
            int s = 0;
            for (int j = 0; j < 16; j++) s += q[g * 16 + j];
            bsums[b * 16 + g] = (int16_t)s;
        }
        d[b] = 1.0f / iscale;
    }
}

MULTIVERSION void quantize_row_q8_1(const float *x, int8_t *qs, float *d, float *s, int k) {
    for (int b = 0; b < k / 32; b++) {
        const float *xb = x + b * 32;
        float amax = 0.0f;
        for (int j = 0; j < 32; j++) {
            const float a = fabsf(xb[j]);
            if (a > amax) amax = a;
        }
        const float scale = amax / 127.0f; /* s uses it before its fp16 rounding */
        const float inv = amax != 0.0f ? 127.0f / amax : 0.0f;
        int total = 0;
        for (int j = 0; j < 32; j++) {
            qs[b * 32 + j] = to_int8(rintf(xb[j] * inv));
            total += qs[b * 32 + j];
        }
        d[b] = round_f16(scale);
        s[b] = round_f16(scale * (float)total);
    }
}

void quantize_row_kind(int kind, const float *x, int8_t *qs, float *d, void *sums, int k) {
    if (kind == ACT_Q8_K)
        quantize_row_q8_k(x, qs, d, sums, k);
    else if (kind == ACT_Q8_1)
        quantize_row_q8_1(x, qs, d, sums, k);
    else
        quantize_row_q8_0(x, qs, d, k);
}
