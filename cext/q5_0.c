/* Q5_0 weights dotted with Q8_0 activations, as ggml_vec_dot_q5_0_q8_0 (AVX2): Q4_0's lanes
 * and float steps (eight int32 lanes of four products, fma(d_w * d_x, lane, acc), then
 * hsum_float_8) with a fifth bit per value (q4_1_q5.py has the Numba twin and the layout).
 *   Q5_0 block (22 bytes): f16 d, qh[4] (a little-endian uint32, bit j the fifth bit of
 *   element j), qs[16] (element j < 16 the low nibble of qs[j], j + 16 its high nibble);
 *   value j = d * ((nibble | bit << 4) - 16).
 * llama-quantize writes it where a Q4_K tensor's rows are not a multiple of 256. */
#include <math.h>

#include "kernels.h"

#define QK 32

static inline uint32_t read_u32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static float dot_q5_0_portable(const uint8_t *w, const act_row *x, int n_cols) {
    float acc[8] = {0};
    for (int b = 0; b < n_cols / QK; b++) {
        const uint8_t *blk = w + b * 22, *qs = blk + 6;
        const uint32_t qh = read_u32(blk + 2);
        const int8_t *qx = x->qs + b * QK;
        const float d = fp16_to_fp32(read_u16(blk)) * x->d[b];
        for (int lane = 0; lane < 8; lane++) {
            int32_t s = 0;
            for (int j = 4 * lane; j < 4 * lane + 4; j++) {
                const int nibble = j < 16 ? (qs[j] & 0x0F) : (qs[j - 16] >> 4);
                s += ((nibble | (int)((qh >> j) & 1) << 4) - 16) * qx[j];
            }
            acc[lane] = fmaf(d, (float)s, acc[lane]);
        }
    }
    return hsum8_portable(acc);
}

#ifdef OFFLOAD_X86
/* ggml's bytes_from_bits_32: byte j is 0xFF where bit j of the uint32 is set, else 0 */
static inline TARGET_AVX2 __m256i bytes_from_bits_32(uint32_t bits) {
    const __m256i shuf = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
    const __m256i bytes = _mm256_or_si256(_mm256_shuffle_epi8(_mm256_set1_epi32((int)bits), shuf),
                                          _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
    return _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1));
}

static TARGET_AVX2 float dot_q5_0_avx2(const uint8_t *w, const act_row *x, int n_cols) {
    const __m256i low_mask = _mm256_set1_epi8(0x0F), high = _mm256_set1_epi8((char)0xF0);
    __m256 acc = _mm256_setzero_ps();
    for (int b = 0; b < n_cols / QK; b++) {
        const uint8_t *blk = w + b * 22;
        const __m256 d = _mm256_set1_ps(_cvtsh_ss(read_u16(blk)) * x->d[b]);
        const __m128i packed = _mm_loadu_si128((const __m128i *)(blk + 6));
        const __m256i nibbles = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(packed, 4), packed), low_mask);
        /* nibble - 16 where the fifth bit is clear: nibble | 0xF0 as int8 */
        const __m256i qw = _mm256_or_si256(nibbles, _mm256_andnot_si256(bytes_from_bits_32(read_u32(blk + 2)), high));
        const __m256i qx = _mm256_loadu_si256((const __m256i *)(x->qs + b * QK));
        acc = _mm256_fmadd_ps(d, mul_sum_i8_pairs_float(qw, qx), acc);
    }
    return hsum_float_8(acc);
}
#define AVX2(fn) fn
#else
#define AVX2(fn) NULL
#endif

const format_kernels KERNELS_Q5_0 = {"Q5_0", ACT_Q8_0, QK, 22, dot_q5_0_portable, AVX2(dot_q5_0_avx2), NULL};
