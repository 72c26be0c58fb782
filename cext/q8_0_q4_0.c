/* Q8_0 and Q4_0 weights dotted with Q8_0 activations, as ggml_vec_dot_q{8,4}_0_q8_0 (AVX2).
 *
 * Per 32-value block: eight int32 lanes, lane i the exact sum of the products of elements
 * 4i..4i+3 (maddubs + madd); then lane[i] = fma(d_w * d_x, float(lane_sum[i]), lane[i])
 * across blocks, and hsum_float_8 at the end.
 *   Q8_0 block (34 bytes): f16 d, int8 qs[32].
 *   Q4_0 block (18 bytes): f16 d, qs[16]: element j < 16 = low nibble of qs[j] - 8,
 *                          element j + 16 = high nibble of qs[j] - 8.
 */
#include <math.h>

#include "kernels.h"

#define QK 32

static float dot_q8_0_portable(const uint8_t *w, const act_row *x, int n_cols) {
    float acc[8] = {0};
    for (int b = 0; b < n_cols / QK; b++) {
        const uint8_t *blk = w + b * 34;
        const int8_t *qw = (const int8_t *)(blk + 2), *qx = x->qs + b * QK;
        const float d = fp16_to_fp32(read_u16(blk)) * x->d[b];
        for (int lane = 0; lane < 8; lane++) {
            int32_t s = 0;
            for (int j = 4 * lane; j < 4 * lane + 4; j++) s += (int32_t)qw[j] * qx[j];
            acc[lane] = fmaf(d, (float)s, acc[lane]);
        }
    }
    return hsum8_portable(acc);
}

static float dot_q4_0_portable(const uint8_t *w, const act_row *x, int n_cols) {
    float acc[8] = {0};
    for (int b = 0; b < n_cols / QK; b++) {
        const uint8_t *blk = w + b * 18, *qs = blk + 2;
        const int8_t *qx = x->qs + b * QK;
        const float d = fp16_to_fp32(read_u16(blk)) * x->d[b];
        for (int lane = 0; lane < 8; lane++) {
            int32_t s = 0;
            for (int j = 4 * lane; j < 4 * lane + 4; j++) {
                /* elements 0..15: low nibbles of qs[0..15]; 16..31: high nibbles */
                int q = j < 16 ? (qs[j] & 0x0F) : (qs[j - 16] >> 4);
                s += (q - 8) * qx[j];
            }
            acc[lane] = fmaf(d, (float)s, acc[lane]);
        }
    }
    return hsum8_portable(acc);
}

#ifdef OFFLOAD_X86
static TARGET_AVX2 float dot_q4_0_avx2(const uint8_t *w, const act_row *x, int n_cols) {
    const __m256i low_mask = _mm256_set1_epi8(0x0F), eight = _mm256_set1_epi8(8);
    __m256 acc = _mm256_setzero_ps();
    for (int b = 0; b < n_cols / QK; b++) {
        const uint8_t *blk = w + b * 18;
        const __m256 d = _mm256_set1_ps(_cvtsh_ss(read_u16(blk)) * x->d[b]);
        /* 16 bytes -> 32 nibbles: low nibbles in the low 128 bits, high nibbles above */
        const __m128i packed = _mm_loadu_si128((const __m128i *)(blk + 2));
        const __m256i both = _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed);
        const __m256i qw = _mm256_sub_epi8(_mm256_and_si256(both, low_mask), eight);
        const __m256i qx = _mm256_loadu_si256((const __m256i *)(x->qs + b * QK));
        acc = _mm256_fmadd_ps(d, mul_sum_i8_pairs_float(qw, qx), acc);
    }
    return hsum_float_8(acc);
}

/* The Q8_0 row dot, for a tile of up to four tokens (dot_q8_0_avx2 is the tile at one token;
 * run_matmul hands a row to tokens_q8_0_avx2 from TILE_TOKENS_MIN tokens): each weight
 * block's |w|, w (the signs) and fp16 d decoded once per tile and kept in registers while
 * every token runs mul_sum_i8_pairs_float's integer lanes, the scale product and the FMA into
 * its own acc, so each result is, to the bit, the one it gets alone. */
static inline __attribute__((always_inline)) TARGET_AVX2 void q8_0_tile(const uint8_t *w, int nb, const int8_t *xq,
                                                                        const float *xd, const int16_t *bsums, int n_cols,
                                                                        ptrdiff_t t0, const int n, float *out,
                                                                        ptrdiff_t out_stride) {
    const __m256i ones = _mm256_set1_epi16(1);
    const tile_rows r = tile_rows_at(xq, xd, bsums, n_cols, nb, t0, n); /* (Q8_0 activations: bsums NULL) */
    __m256 acc[4];
    for (int k = 0; k < n; k++) acc[k] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const uint8_t *blk = w + b * 34;
        const float wd = _cvtsh_ss(read_u16(blk));
        const __m256i qw = _mm256_loadu_si256((const __m256i *)(blk + 2));
        const __m256i aw = _mm256_sign_epi8(qw, qw);
        for (int k = 0; k < n; k++) {
            const __m256 d = _mm256_set1_ps(wd * r.d[k][b]);
            const __m256i qx = _mm256_loadu_si256((const __m256i *)(r.x[k] + b * QK));
            const __m256i dot = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(qx, qw));
            acc[k] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_madd_epi16(ones, dot)), acc[k]);
        }
    }
    for (int k = 0; k < n; k++) out[(t0 + k) * out_stride] = hsum_float_8(acc[k]);
}

TOKENS_IN_TILES_OF_4(tokens_q8_0_avx2, q8_0_tile, QK)

static TARGET_AVX2 float dot_q8_0_avx2(const uint8_t *w, const act_row *x, int n_cols) {
    float out;
    q8_0_tile(w, n_cols / QK, x->qs, x->d, NULL, n_cols, 0, 1, &out, 0);
    return out;
}

/* AVX-512 VNNI (on 256-bit registers): the same int32 lanes, each the exact sum of four
 * consecutive products, from vpdpbusd on the unsigned nibbles minus vpdpbusd on 8s; the
 * float steps are the AVX2 kernel's, so the bits are the same, in fewer instructions. */
static TARGET_AVX512 float dot_q4_0_avx512(const uint8_t *w, const act_row *x, int n_cols) {
    const __m256i low_mask = _mm256_set1_epi8(0x0F), eight = _mm256_set1_epi8(8), zero = _mm256_setzero_si256();
    __m256 acc = _mm256_setzero_ps();
    for (int b = 0; b < n_cols / QK; b++) {
        const uint8_t *blk = w + b * 18;
        const __m256 d = _mm256_set1_ps(_cvtsh_ss(read_u16(blk)) * x->d[b]);
        const __m128i packed = _mm_loadu_si128((const __m128i *)(blk + 2));
        const __m256i q = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(packed, 4), packed), low_mask);
        const __m256i qx = _mm256_loadu_si256((const __m256i *)(x->qs + b * QK));
        const __m256i dot = _mm256_sub_epi32(_mm256_dpbusd_epi32(zero, q, qx), _mm256_dpbusd_epi32(zero, eight, qx));
        acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(dot), acc);
    }
    return hsum_float_8(acc);
}

#define AVX2(fn) fn
#define AVX512(fn) fn
#else
#define AVX2(fn) NULL
#define AVX512(fn) NULL
#endif

const format_kernels KERNELS_Q8_0 = {"Q8_0", ACT_Q8_0, QK, 34, dot_q8_0_portable, AVX2(dot_q8_0_avx2), NULL,
                                     AVX2(tokens_q8_0_avx2), TILE_TOKENS_MIN};
const format_kernels KERNELS_Q4_0 = {"Q4_0", ACT_Q8_0, QK, 18, dot_q4_0_portable, AVX2(dot_q4_0_avx2),
                                     AVX512(dot_q4_0_avx512)};
