/* offload's C kernels: one quantized weight row dotted with one token's quantized
 * activations, in llama.cpp's x86 AVX2 summation order (so results equal ggml's to the bit).
 *
 * Each format file (q8_0_q4_0.c, q4_k.c, ...) defines one `format_kernels` table with a
 * portable C row-dot and, where written, SIMD ones; module.c runs them over the rows of a
 * matrix (OpenMP) with the GIL released and picks the SIMD level at run time.
 *
 * Numerics rule for every file: no implicit contraction (built with -ffp-contract=off);
 * where ggml fuses a multiply-add, write fmaf() / _mm256_fmadd_ps explicitly.
 */
#ifndef OFFLOAD_KERNELS_H
#define OFFLOAD_KERNELS_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#define OFFLOAD_X86 1
#include <immintrin.h>
#define TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))
#endif

/* One token's activations, converted once per matmul by the caller (Python side):
 * Q8_0: qs (n_cols int8), d (n_cols/32 float32, already fp16-rounded), bsums NULL.
 * Q8_K: qs (n_cols int8), d (n_cols/256 float32), bsums (n_cols/16 int16).
 * Q8_1: qs, d as Q8_0, and s (n_cols/32 float32, fp16-rounded d * sum(qs) of each block).
 * s takes bsums' place: n_cols/32 floats are exactly the bytes of n_cols/16 int16, so every
 * buffer sized and strided for Q8_K's block sums holds Q8_1's s as well. */
typedef struct {
    const int8_t *qs;
    const float *d;
    union {
        const int16_t *bsums; /* Q8_K */
        const float *s;       /* Q8_1 */
    };
} act_row;

/* dot(weight row w of n_cols values, activations x) in ggml's order. */
typedef float (*row_dot_fn)(const uint8_t *w, const act_row *x, int n_cols);

/* One weight row against n_tokens tokens (token t's quants at xq + t * n_cols, its scales at
 * xd + t * (n_cols / act_block), for Q8_K its bsums at bsums + t * (n_cols / 16); Q8_0 gets
 * bsums NULL): out[t * out_stride] = the row dot of token t, bit for bit, the row decoded
 * once for all the tokens. */
typedef void (*row_tokens_fn)(const uint8_t *w, const int8_t *xq, const float *xd, const int16_t *bsums, int n_cols,
                              ptrdiff_t n_tokens, float *out, ptrdiff_t out_stride);

enum act_kind { ACT_Q8_0 = 0, ACT_Q8_K = 1, ACT_Q8_1 = 2 };
#define ACT_KINDS 3
static const char *const act_names[ACT_KINDS] = {"Q8_0", "Q8_K", "Q8_1"};

/* Values per scale of an activation kind (Q8_K: 256, Q8_0 and Q8_1: 32). */
static inline int act_block(int kind) { return kind == ACT_Q8_K ? 256 : 32; }

typedef struct {
    const char *name;      /* ggml type name, e.g. "Q4_K" */
    int act;               /* enum act_kind: the vec_dot_type of the format */
    int block_size;        /* values per block */
    int block_bytes;       /* bytes per block */
    row_dot_fn portable;   /* required: plain C, same order as the SIMD paths */
    row_dot_fn avx2;       /* AVX2+FMA+F16C, or NULL */
    row_dot_fn avx512;     /* AVX-512 (+VNNI), or NULL */
    row_tokens_fn avx2_tokens; /* the avx2 row dot on many tokens at once (same bits), or NULL */
    int tokens_min;            /* tokens from which run_matmul takes avx2_tokens (0: ROW_TOKENS_MIN) */
} format_kernels;

/* From this many tokens (or the format's tokens_min) run_matmul hands a row to the format's
 * avx2_tokens (if it has one and the avx2 row dot is the one picked). */
#define ROW_TOKENS_MIN 4
/* The tokens_min of formats whose avx2_tokens decodes a block once per tile of up to four
 * tokens in registers (TOKENS_IN_TILES_OF_4): faster than the row dot from two tokens. */
#define TILE_TOKENS_MIN 2

/* Where a tile's tokens t0 .. t0+n-1 (n <= 4) keep their activations: quants (n_cols each),
 * block scales (nb each) and, for Q8_K activations (bsums not NULL), block sums. */
typedef struct {
    const int8_t *x[4];
    const float *d[4];
    const int16_t *bsums[4];
} tile_rows;

static inline __attribute__((always_inline)) tile_rows tile_rows_at(const int8_t *xq, const float *xd,
                                                                    const int16_t *bsums, int n_cols, int nb,
                                                                    ptrdiff_t t0, int n) {
    tile_rows r;
    for (int k = 0; k < n; k++) {
        r.x[k] = xq + (t0 + k) * (ptrdiff_t)n_cols;
        r.d[k] = xd + (t0 + k) * (ptrdiff_t)nb;
        r.bsums[k] = bsums ? bsums + (t0 + k) * (ptrdiff_t)(n_cols / 16) : NULL;
    }
    return r;
}

/* An avx2_tokens function `name` from `tile(w, nb, xq, xd, bsums, n_cols, t0, n, out,
 * out_stride)`, an always_inline function running tokens t0 .. t0+n-1 (n <= 4) on each block
 * of the row decoded once: n is a constant at each call, so the tile's loops over its tokens
 * unroll. `block` is the format's values per block. */
#define TOKENS_IN_TILES_OF_4(name, tile, block)                                                                    \
    static TARGET_AVX2 void name(const uint8_t *w, const int8_t *xq, const float *xd, const int16_t *bsums,         \
                                 int n_cols, ptrdiff_t n_tokens, float *out, ptrdiff_t out_stride) {                 \
        const int nb = n_cols / (block);                                                                            \
        ptrdiff_t t = 0;                                                                                            \
        for (; t + 4 <= n_tokens; t += 4) tile(w, nb, xq, xd, bsums, n_cols, t, 4, out, out_stride);                \
        switch (n_tokens - t) {                                                                                     \
        case 3: tile(w, nb, xq, xd, bsums, n_cols, t, 3, out, out_stride); break;                                   \
        case 2: tile(w, nb, xq, xd, bsums, n_cols, t, 2, out, out_stride); break;                                   \
        case 1: tile(w, nb, xq, xd, bsums, n_cols, t, 1, out, out_stride); break;                                   \
        }                                                                                                           \
    }

/* out[t, r] = dot(row r of w, token t) for a whole matrix, OpenMP over rows when it is big
 * enough to pay for waking the team (module.c); xq/xd/bsums hold n_tokens activation rows. */
void run_matmul(row_dot_fn dot, const format_kernels *f, const uint8_t *w, const int8_t *xq, const float *xd,
                const int16_t *bsums, float *out, ptrdiff_t n_rows, int n_cols, ptrdiff_t n_tokens);

/* IEEE half -> float, exact (ggml's GGML_FP16_TO_FP32). */
static inline float fp16_to_fp32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
    if (exp == 0x1F) {
        bits = sign | 0x7F800000u | (man << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else { /* subnormal: normalise */
        int e = -1;
        do { man <<= 1; e++; } while (!(man & 0x400));
        bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3FF) << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t read_u16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }

/* ggml's hsum_float_8 on eight float lanes: fold high half onto low, then (0+2)+(1+3). */
static inline float hsum8_portable(const float l[8]) {
    float a0 = l[4] + l[0], a1 = l[5] + l[1], a2 = l[6] + l[2], a3 = l[7] + l[3];
    return (a0 + a2) + (a1 + a3);
}

#ifdef OFFLOAD_X86
/* The same reduction in AVX: ggml's hsum_float_8. */
static inline TARGET_AVX2 float hsum_float_8(__m256 x) {
    __m128 res = _mm256_extractf128_ps(x, 1);
    res = _mm_add_ps(res, _mm256_castps256_ps128(x));
    res = _mm_add_ps(res, _mm_movehl_ps(res, res));
    res = _mm_add_ss(res, _mm_movehdup_ps(res));
    return _mm_cvtss_f32(res);
}

/* sum of four consecutive int8 x int8 products per int32 lane, as float (ggml's
 * mul_sum_i8_pairs_float): maddubs needs an unsigned left side, so move x's signs onto y. */
static inline TARGET_AVX2 __m256 mul_sum_i8_pairs_float(__m256i x, __m256i y) {
    const __m256i ax = _mm256_sign_epi8(x, x);
    const __m256i sy = _mm256_sign_epi8(y, x);
    const __m256i dot = _mm256_maddubs_epi16(ax, sy);
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_set1_epi16(1), dot));
}
#endif

#endif
