/* Q4_1 and Q5_1 weights dotted with Q8_1 activations, as ggml_vec_dot_q4_1_q8_1 and
 * ggml_vec_dot_q5_1_q8_1 (AVX2); q4_1_q5.py has the Numba twins and the layouts:
 *   Q4_1 block (20 bytes): f16 d, f16 m, qs[16];          value j = d * nibble_j + m
 *   Q5_1 block (24 bytes): f16 d, f16 m, qh[4], qs[16];   value j = d * (nibble_j | bit_j << 4) + m
 * (element j < 16 the low nibble of qs[j], j + 16 its high nibble; qh a little-endian uint32).
 * Q8_1 activations: qs, d as Q8_0 and s = fp16(d * sum(qs)) per block (act_row.s).
 *
 * Order: eight float lanes, lane i summing the exact int dot of elements 4i..4i+3 of each
 * block (maddubs: unsigned weight quants, no saturation as |pair| <= 2 * 31 * 128):
 * lane = fma(d_w * d_x, float(int lane), lane); beside them one scalar summs += m_w * s_x per
 * block (exact in float32: m and s are fp16 values, so a fused or a plain multiply-add gives
 * the same bits); the result is hsum_float_8(lanes) + summs.
 * Neither format goes through llamafile's sgemm (its switch has no Q4_1/Q5_1 case), so this
 * one order serves every batch size. */
#include <math.h>

#include "kernels.h"

#define QK 32
#define Q4_1_BYTES 20
#define Q5_1_BYTES 24

static inline uint32_t read_u32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* The portable order for both formats: bytes per block, and where qh is (0: none, Q4_1). */
static float dot_with_mins_portable(const uint8_t *w, const act_row *x, int n_cols, int block_bytes, int qh_at) {
    float acc[8] = {0}, summs = 0.0f;
    for (int b = 0; b < n_cols / QK; b++) {
        const uint8_t *blk = w + b * block_bytes, *qs = blk + block_bytes - 16;
        const uint32_t qh = qh_at ? read_u32(blk + qh_at) : 0;
        const int8_t *qx = x->qs + b * QK;
        summs += fp16_to_fp32(read_u16(blk + 2)) * x->s[b];
        const float d = fp16_to_fp32(read_u16(blk)) * x->d[b];
        for (int lane = 0; lane < 8; lane++) {
            int32_t s = 0;
            for (int j = 4 * lane; j < 4 * lane + 4; j++) {
                const int nibble = j < 16 ? (qs[j] & 0x0F) : (qs[j - 16] >> 4);
                s += (nibble | (int)((qh >> j) & 1) << 4) * qx[j];
            }
            acc[lane] = fmaf(d, (float)s, acc[lane]);
        }
    }
    return hsum8_portable(acc) + summs;
}

static float dot_q4_1_portable(const uint8_t *w, const act_row *x, int n_cols) {
    return dot_with_mins_portable(w, x, n_cols, Q4_1_BYTES, 0);
}

static float dot_q5_1_portable(const uint8_t *w, const act_row *x, int n_cols) {
    return dot_with_mins_portable(w, x, n_cols, Q5_1_BYTES, 4);
}

#ifdef OFFLOAD_X86
/* ggml's bytes_from_bits_32: byte j is 0xFF where bit j of the uint32 is set, else 0 */
static inline TARGET_AVX2 __m256i bytes_from_bits_32(uint32_t bits) {
    const __m256i shuf = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
    const __m256i bytes = _mm256_or_si256(_mm256_shuffle_epi8(_mm256_set1_epi32((int)bits), shuf),
                                          _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
    return _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1));
}

/* ggml's bytes_from_nibbles_32: elements 0..15 the low nibbles, 16..31 the high ones */
static inline TARGET_AVX2 __m256i bytes_from_nibbles_32(const uint8_t *qs) {
    const __m128i packed = _mm_loadu_si128((const __m128i *)qs);
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(packed, 4), packed), _mm256_set1_epi8(0x0F));
}

/* ggml's mul_sum_us8_pairs_float: unsigned x times signed y, four products per int32 lane */
static inline TARGET_AVX2 __m256 mul_sum_us8_pairs_float(__m256i ux, __m256i sy) {
    const __m256i dot = _mm256_maddubs_epi16(ux, sy);
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_set1_epi16(1), dot));
}

static TARGET_AVX2 float dot_q4_1_avx2(const uint8_t *w, const act_row *x, int n_cols) {
    __m256 acc = _mm256_setzero_ps();
    float summs = 0.0f;
    for (int b = 0; b < n_cols / QK; b++) {
        const uint8_t *blk = w + b * Q4_1_BYTES;
        summs += _cvtsh_ss(read_u16(blk + 2)) * x->s[b];
        const __m256 d = _mm256_mul_ps(_mm256_set1_ps(_cvtsh_ss(read_u16(blk))), _mm256_set1_ps(x->d[b]));
        const __m256i qx = _mm256_loadu_si256((const __m256i *)(x->qs + b * QK));
        acc = _mm256_fmadd_ps(d, mul_sum_us8_pairs_float(bytes_from_nibbles_32(blk + 4), qx), acc);
    }
    return hsum_float_8(acc) + summs;
}

static TARGET_AVX2 float dot_q5_1_avx2(const uint8_t *w, const act_row *x, int n_cols) {
    const __m256i fifth_bit = _mm256_set1_epi8(0x10);
    __m256 acc = _mm256_setzero_ps();
    float summs = 0.0f;
    for (int b = 0; b < n_cols / QK; b++) {
        const uint8_t *blk = w + b * Q5_1_BYTES;
        summs += _cvtsh_ss(read_u16(blk + 2)) * x->s[b];
        const __m256i qw = _mm256_or_si256(bytes_from_nibbles_32(blk + 8),
                                           _mm256_and_si256(bytes_from_bits_32(read_u32(blk + 4)), fifth_bit));
        const __m256i qx = _mm256_loadu_si256((const __m256i *)(x->qs + b * QK));
        const __m256 d = _mm256_mul_ps(_mm256_set1_ps(_cvtsh_ss(read_u16(blk))), _mm256_set1_ps(x->d[b]));
        acc = _mm256_fmadd_ps(mul_sum_us8_pairs_float(qw, qx), d, acc);
    }
    return hsum_float_8(acc) + summs;
}
#define AVX2(fn) fn
#else
#define AVX2(fn) NULL
#endif

const format_kernels KERNELS_Q4_1 = {"Q4_1", ACT_Q8_1, QK, Q4_1_BYTES, dot_q4_1_portable, AVX2(dot_q4_1_avx2), NULL};
const format_kernels KERNELS_Q5_1 = {"Q5_1", ACT_Q8_1, QK, Q5_1_BYTES, dot_q5_1_portable, AVX2(dot_q5_1_avx2), NULL};
