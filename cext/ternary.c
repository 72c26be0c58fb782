/* TQ1_0 and TQ2_0 (ternary) weights dotted with Q8_K activations, as ggml's x86 AVX2
 * ggml_vec_dot_tq1_0_q8_K / ggml_vec_dot_tq2_0_q8_K (every batch size: ggml has no tiled or
 * sgemm path for them, and no AVX-512 variant). Layouts and order: offload/kernels/ternary.py.
 * Per super-block eight exact int32 lanes, lane i = sum over the 32-value chunks c of the
 * products digit * x of elements 32c+4i..32c+4i+3, minus bsums[2i] + bsums[2i+1]; then
 * acc = fma(float(lane), d_x * fp16(d_w), acc) (GCC's contraction of ggml's add(mul)), and
 * hsum_float_8(acc).
 */
#include <math.h>

#include "kernels.h"

#define QK_K 256
#define TQ1_0_BYTES 54
#define TQ2_0_BYTES 66

/* Digit n (0..2) of a TQ1_0 byte, as ggml extracts it. */
static inline uint8_t tq1_digit(uint8_t q, int n) {
    static const uint8_t pow3[5] = {1, 3, 9, 27, 81};
    return (uint8_t)(((uint16_t)(uint8_t)(q * pow3[n]) * 3) >> 8);
}

static void tq1_0_decode(const uint8_t *blk, uint8_t t[QK_K]) {
    for (int n = 0; n < 5; n++)
        for (int m = 0; m < 32; m++) t[32 * n + m] = tq1_digit(blk[m], n);
    for (int n = 0; n < 5; n++)
        for (int m = 0; m < 16; m++) t[160 + 16 * n + m] = tq1_digit(blk[32 + m], n);
    for (int n = 0; n < 4; n++)
        for (int m = 0; m < 4; m++) t[240 + 4 * n + m] = tq1_digit(blk[48 + m], n);
}

static void tq2_0_decode(const uint8_t *blk, uint8_t t[QK_K]) {
    for (int h = 0; h < 2; h++)
        for (int l = 0; l < 4; l++)
            for (int m = 0; m < 32; m++) t[128 * h + 32 * l + m] = (blk[32 * h + m] >> (2 * l)) & 3;
}

static inline float ternary_portable(const uint8_t *w, const act_row *x, int n_cols, int block_bytes, int d_offset,
                                     void (*decode)(const uint8_t *, uint8_t *)) {
    const int nb = n_cols / QK_K;
    float acc[8] = {0};
    uint8_t t[QK_K];
    for (int ib = 0; ib < nb; ib++) {
        const uint8_t *blk = w + (size_t)ib * block_bytes;
        const int8_t *q8 = x->qs + ib * QK_K;
        const int16_t *bs = x->bsums + ib * (QK_K / 16);
        decode(blk, t);
        const float d = x->d[ib] * fp16_to_fp32(read_u16(blk + d_offset));
        for (int i = 0; i < 8; i++) {
            int32_t lane = 0;
            for (int c = 0; c < 8; c++)
                for (int k = 0; k < 4; k++) lane += (int32_t)t[32 * c + 4 * i + k] * q8[32 * c + 4 * i + k];
            lane -= (int32_t)bs[2 * i] + bs[2 * i + 1];
            acc[i] = fmaf((float)lane, d, acc[i]);
        }
    }
    return hsum8_portable(acc);
}

static float dot_tq1_0_portable(const uint8_t *w, const act_row *x, int n_cols) {
    return ternary_portable(w, x, n_cols, TQ1_0_BYTES, 52, tq1_0_decode);
}

static float dot_tq2_0_portable(const uint8_t *w, const act_row *x, int n_cols) {
    return ternary_portable(w, x, n_cols, TQ2_0_BYTES, 64, tq2_0_decode);
}

#ifdef OFFLOAD_X86
/* Digits of 32 bytes already multiplied by 3^n (mod 256): ggml's (q * 3) >> 8 by averages. */
static inline TARGET_AVX2 __m256i top_digit(__m256i q) {
    q = _mm256_subs_epu8(q, _mm256_set1_epi8(1));
    q = _mm256_avg_epu8(q, _mm256_avg_epu8(q, _mm256_setzero_si256()));
    return _mm256_and_si256(_mm256_srli_epi16(q, 6), _mm256_set1_epi8(3));
}

/* q * 3 and q * 9 per byte (mod 256), as ggml: shifts and masks on 16-bit lanes. */
static inline TARGET_AVX2 __m256i times3(__m256i q) { return _mm256_add_epi8(q, _mm256_add_epi8(q, q)); }
static inline TARGET_AVX2 __m256i times9(__m256i q) {
    return _mm256_add_epi8(_mm256_and_si256(_mm256_slli_epi16(q, 3), _mm256_set1_epi8(-8)), q);
}

/* The eight int32 lanes of (digits . q8) over a super-block, digits unsigned; the int16
 * sums are exact (|each| <= 8 * 2 * 3 * 127), so their grouping does not matter. */
static inline TARGET_AVX2 __m256i lanes_of(__m256i sumi16, const int16_t *bsums) {
    const __m256i ysum = _mm256_loadu_si256((const __m256i *)bsums);
    return _mm256_madd_epi16(_mm256_sub_epi16(sumi16, ysum), _mm256_set1_epi16(1));
}

static TARGET_AVX2 float dot_tq1_0_avx2(const uint8_t *w, const act_row *x, int n_cols) {
    const int nb = n_cols / QK_K;
    __m256 acc = _mm256_setzero_ps();
    for (int ib = 0; ib < nb; ib++) {
        const uint8_t *blk = w + (size_t)ib * TQ1_0_BYTES;
        const int8_t *y = x->qs + ib * QK_K;
        __m256i sumi = _mm256_setzero_si256();
        { /* qs[0..31]: five digits each, elements 32n + m */
            const __m256i q0 = _mm256_loadu_si256((const __m256i *)blk);
            const __m256i q1 = times3(q0), q2 = times9(q0), q3 = times9(q1), q4 = times9(q2);
            const __m256i qn[5] = {q0, q1, q2, q3, q4};
            for (int n = 0; n < 5; n++)
                sumi = _mm256_add_epi16(sumi, _mm256_maddubs_epi16(top_digit(qn[n]), _mm256_loadu_si256((const __m256i *)(y + 32 * n))));
        }
        { /* qs[32..47] (five digits) and qh (four), elements 160.. */
            const __m128i q0 = _mm_loadu_si128((const __m128i *)(blk + 32));
            const __m256i q0w = _mm256_set_m128i(q0, q0);
            const __m256i q1w = times3(q0w), q2w = times9(q0w), q3w = times9(q1w), q4w = times9(q2w);
            uint32_t qh;
            memcpy(&qh, blk + 48, 4);
            __m256i q5 = _mm256_cvtepu8_epi16(_mm_set1_epi32((int)qh));
            q5 = _mm256_mullo_epi16(q5, _mm256_set_epi16(27, 27, 27, 27, 9, 9, 9, 9, 3, 3, 3, 3, 1, 1, 1, 1));
            q5 = _mm256_and_si256(q5, _mm256_set1_epi16(0xFF));
            const __m128i q5b = _mm_packus_epi16(_mm256_castsi256_si128(q5), _mm256_extracti128_si256(q5, 1));
            const __m256i q01 = _mm256_set_m128i(_mm256_castsi256_si128(q1w), q0);
            const __m256i q23 = _mm256_set_m128i(_mm256_castsi256_si128(q3w), _mm256_castsi256_si128(q2w));
            const __m256i q45 = _mm256_set_m128i(q5b, _mm256_castsi256_si128(q4w));
            sumi = _mm256_add_epi16(sumi, _mm256_maddubs_epi16(top_digit(q01), _mm256_loadu_si256((const __m256i *)(y + 160))));
            sumi = _mm256_add_epi16(sumi, _mm256_maddubs_epi16(top_digit(q23), _mm256_loadu_si256((const __m256i *)(y + 192))));
            sumi = _mm256_add_epi16(sumi, _mm256_maddubs_epi16(top_digit(q45), _mm256_loadu_si256((const __m256i *)(y + 224))));
        }
        const __m256i lanes = lanes_of(sumi, x->bsums + ib * (QK_K / 16));
        const float d = x->d[ib] * _cvtsh_ss(read_u16(blk + 52));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lanes), _mm256_set1_ps(d), acc);
    }
    return hsum_float_8(acc);
}

static TARGET_AVX2 float dot_tq2_0_avx2(const uint8_t *w, const act_row *x, int n_cols) {
    const int nb = n_cols / QK_K;
    const __m256i m3 = _mm256_set1_epi8(3);
    __m256 acc = _mm256_setzero_ps();
    for (int ib = 0; ib < nb; ib++) {
        const uint8_t *blk = w + (size_t)ib * TQ2_0_BYTES;
        const int8_t *y = x->qs + ib * QK_K;
        __m256i sumi = _mm256_setzero_si256();
        for (int j = 0; j < 64; j += 32) {
            const __m256i q = _mm256_loadu_si256((const __m256i *)(blk + j));
            for (int l = 0; l < 4; l++) {
                const __m256i t = _mm256_and_si256(_mm256_srli_epi16(q, 2 * l), m3);
                sumi = _mm256_add_epi16(sumi, _mm256_maddubs_epi16(t, _mm256_loadu_si256((const __m256i *)(y + 4 * j + 32 * l))));
            }
        }
        const __m256i lanes = lanes_of(sumi, x->bsums + ib * (QK_K / 16));
        const float d = x->d[ib] * _cvtsh_ss(read_u16(blk + 64));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lanes), _mm256_set1_ps(d), acc);
    }
    return hsum_float_8(acc);
}
#define AVX2(fn) fn
#else
#define AVX2(fn) NULL
#endif

const format_kernels KERNELS_TQ1_0 = {"TQ1_0", ACT_Q8_K, QK_K, TQ1_0_BYTES, dot_tq1_0_portable, AVX2(dot_tq1_0_avx2),
                                      NULL, NULL};
const format_kernels KERNELS_TQ2_0 = {"TQ2_0", ACT_Q8_K, QK_K, TQ2_0_BYTES, dot_tq2_0_portable, AVX2(dot_tq2_0_avx2),
                                      NULL, NULL};
