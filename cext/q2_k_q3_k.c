/* Q2_K and Q3_K weights dotted with Q8_K activations, as ggml_vec_dot_q{2,3}_K_q8_K (AVX2).
 *
 *   Q2_K block (84 bytes): scales[16] (low nibble: sub-block scale, high nibble: min),
 *       qs[64], f16 d, f16 dmin.  value = d * scale * q - dmin * min, q in 0..3.
 *   Q3_K block (110 bytes): hmask[32], qs[64], scales[12] (sixteen 6-bit scales, stored
 *       + 32), f16 d.  value = d * (scale - 32) * q, q = low - 4 where the hmask bit is clear.
 * Value e = 128j + 32k + l of a super-block (half j, group k, l = 0..31) has its low 2 bits
 * at bits 2k of qs[32j + l], its Q3_K high bit at bit 4j + k of hmask[l], and belongs to
 * sub-block e / 16 = 8j + 2k + (l >= 16).
 *
 * ggml's order (see offload/kernels/q2_k_q3_k.py): per super-block, eight exact int32 lanes
 *   lane[i] = sum over the eight 32-value groups c of scale[2c + (i >= 4)] * (the four
 *             products of values 32c + 4i .. 32c + 4i + 3)
 * and one float accumulator of eight lanes:
 *   Q2_K: acc[i] = fma(-x.d * f16(w.dmin), float(min[2i] * bsums[2i] + min[2i+1] * bsums[2i+1]), acc[i]);
 *         acc[i] = fma(x.d * f16(w.d), float(lane[i]), acc[i])
 *   Q3_K: acc[i] = fma(x.d * f16(w.d), float(lane[i]), acc[i])
 * then hsum_float_8(acc). All integer steps are exact, so only the float steps need this order.
 */
#include <math.h>

#include "kernels.h"

#define QK_K 256
#define Q2_K_BYTES 84
#define Q3_K_BYTES 110

/* pos[e] = sum over the eight 32-value groups c of ws * q8 at value 32c + e; then the
 * eight lanes of four consecutive positions each. */
static inline void lane_sums(const int16_t ws[QK_K], const int8_t *q8, int32_t lane[8]) {
    int32_t pos[32] = {0};
    for (int c = 0; c < 8; c++)
        for (int e = 0; e < 32; e++) pos[e] += (int32_t)ws[32 * c + e] * q8[32 * c + e];
    for (int i = 0; i < 8; i++) lane[i] = (pos[4 * i] + pos[4 * i + 1]) + (pos[4 * i + 2] + pos[4 * i + 3]);
}

/* The sixteen Q3_K scales (-32 .. 31) from their 12 packed bytes: scale s has its low 4 bits
 * in byte s % 8 (s < 8: low nibble, else high nibble) and its high 2 bits at bits
 * 2 (s / 4) .. 2 (s / 4) + 1 of byte 8 + s % 4. */
static inline void q3_k_scales(const uint8_t *p, int16_t sc[16]) {
    for (int s = 0; s < 16; s++) {
        const int low = s < 8 ? p[s] & 15 : p[s - 8] >> 4;
        const int high = (p[8 + s % 4] >> (2 * (s / 4))) & 3;
        sc[s] = (int16_t)((low | (high << 4)) - 32);
    }
}

static float dot_q3_k_portable(const uint8_t *w, const act_row *x, int n_cols) {
    float acc[8] = {0};
    for (int b = 0; b < n_cols / QK_K; b++) {
        const uint8_t *blk = w + (size_t)b * Q3_K_BYTES, *hm = blk;
        const float d = x->d[b] * fp16_to_fp32(read_u16(blk + 108));
        int16_t sc[16], ws[QK_K];
        q3_k_scales(blk + 96, sc);
        for (int j = 0; j < 2; j++) {
            const uint8_t *qs = blk + 32 + 32 * j;
            for (int k = 0; k < 4; k++) {
                const int shift = 2 * k, hbit = 4 * j + k;
                int16_t *o = ws + 128 * j + 32 * k;
                for (int half = 0; half < 2; half++) {
                    const int16_t s = sc[8 * j + 2 * k + half];
                    for (int l = 16 * half; l < 16 * half + 16; l++) {
                        const int q = ((qs[l] >> shift) & 3) - 4 + (((hm[l] >> hbit) & 1) << 2);
                        o[l] = (int16_t)(s * q);
                    }
                }
            }
        }
        int32_t lane[8];
        lane_sums(ws, x->qs + (size_t)b * QK_K, lane);
        for (int i = 0; i < 8; i++) acc[i] = fmaf(d, (float)lane[i], acc[i]);
    }
    return hsum8_portable(acc);
}

static float dot_q2_k_portable(const uint8_t *w, const act_row *x, int n_cols) {
    float acc[8] = {0};
    for (int b = 0; b < n_cols / QK_K; b++) {
        const uint8_t *blk = w + (size_t)b * Q2_K_BYTES, *scales = blk;
        const int16_t *bs = x->bsums + (size_t)b * 16;
        const float d = x->d[b] * fp16_to_fp32(read_u16(blk + 80));
        const float dmin = -x->d[b] * fp16_to_fp32(read_u16(blk + 82));
        int32_t lane[8];
        /* the mins first: min[2i] * bsums[2i] + min[2i+1] * bsums[2i+1] (madd_epi16) */
        for (int i = 0; i < 8; i++)
            lane[i] = (scales[2 * i] >> 4) * bs[2 * i] + (scales[2 * i + 1] >> 4) * bs[2 * i + 1];
        for (int i = 0; i < 8; i++) acc[i] = fmaf(dmin, (float)lane[i], acc[i]);
        int16_t ws[QK_K];
        for (int j = 0; j < 2; j++) {
            const uint8_t *qs = blk + 16 + 32 * j;
            for (int k = 0; k < 4; k++) {
                const int shift = 2 * k;
                int16_t *o = ws + 128 * j + 32 * k;
                for (int half = 0; half < 2; half++) {
                    const int16_t s = scales[8 * j + 2 * k + half] & 15;
                    for (int l = 16 * half; l < 16 * half + 16; l++) o[l] = (int16_t)(s * ((qs[l] >> shift) & 3));
                }
            }
        }
        lane_sums(ws, x->qs + (size_t)b * QK_K, lane);
        for (int i = 0; i < 8; i++) acc[i] = fmaf(d, (float)lane[i], acc[i]);
    }
    return hsum8_portable(acc);
}

#ifdef OFFLOAD_X86
/* pshufb masks that pick group k's two sub-block scales out of a register holding a
 * super-block's sixteen scale bytes in both 128-bit lanes, as int16 matching maddubs'
 * output (low lane: values 0..15 of the group, sub-block s; high lane: 16..31, s + 1),
 * s = 8j + 2k. `zext`: the scale byte in the low byte of each int16 (unsigned scales);
 * `high`: in the high byte, i.e. scale * 256 (signed scales, exact). Mask bytes >= 0x80
 * give zero; adding s to them keeps them >= 0x80. */
static inline TARGET_AVX2 __m256i scale_pick(int s, int high) {
    const __m256i zext = _mm256_setr_epi8(0, -128, 0, -128, 0, -128, 0, -128, 0, -128, 0, -128, 0, -128, 0, -128,
                                          1, -128, 1, -128, 1, -128, 1, -128, 1, -128, 1, -128, 1, -128, 1, -128);
    const __m256i hi = _mm256_setr_epi8(-128, 0, -128, 0, -128, 0, -128, 0, -128, 0, -128, 0, -128, 0, -128, 0,
                                        -128, 1, -128, 1, -128, 1, -128, 1, -128, 1, -128, 1, -128, 1, -128, 1);
    return _mm256_add_epi8(high ? hi : zext, _mm256_set1_epi8((char)s));
}

/* scale (as picked) times a group's int16 pair sums: four-value sums as int32 lanes */
#define SCALED(scales, pick, p16) _mm256_madd_epi16(_mm256_shuffle_epi8(scales, pick), p16)

static TARGET_AVX2 float dot_q3_k_avx2(const uint8_t *w, const act_row *x, int n_cols) {
    const __m256i m3 = _mm256_set1_epi8(3), four = _mm256_set1_epi8(4), m4 = _mm256_set1_epi8(0x0F);
    const __m256i m30 = _mm256_set1_epi8(0x30), b32 = _mm256_set1_epi8(32);
    /* the packed scales are loaded from blk + 94, so packed byte i sits at byte i + 2 */
    const __m256i low_idx = _mm256_setr_epi8(2, 3, 4, 5, 6, 7, 8, 9, 2, 3, 4, 5, 6, 7, 8, 9,
                                             2, 3, 4, 5, 6, 7, 8, 9, 2, 3, 4, 5, 6, 7, 8, 9);
    const __m256i high_idx = _mm256_setr_epi8(10, 11, 12, 13, 10, 11, 12, 13, 10, 11, 12, 13, 10, 11, 12, 13,
                                              10, 11, 12, 13, 10, 11, 12, 13, 10, 11, 12, 13, 10, 11, 12, 13);
    const __m256i nib_shift = _mm256_setr_epi64x(0, 4, 0, 4), pair_shift = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
    __m256 acc = _mm256_setzero_ps();
    for (int b = 0; b < n_cols / QK_K; b++) {
        const uint8_t *blk = w + (size_t)b * Q3_K_BYTES;
        const int8_t *q8 = x->qs + (size_t)b * QK_K;
        const __m256 d = _mm256_set1_ps(x->d[b] * _cvtsh_ss(read_u16(blk + 108)));
        /* the sixteen scales as signed bytes, in both lanes (q3_k_scales): low 4 bits of
         * scale s from byte s % 8 (s >= 8: its high nibble), high 2 bits from bits 2 (s / 4)
         * of byte 8 + s % 4 */
        const __m256i packed = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(blk + 94)));
        const __m256i low = _mm256_and_si256(_mm256_srlv_epi64(_mm256_shuffle_epi8(packed, low_idx), nib_shift), m4);
        const __m256i high = _mm256_and_si256(
            _mm256_slli_epi32(_mm256_srlv_epi32(_mm256_shuffle_epi8(packed, high_idx), pair_shift), 4), m30);
        const __m256i sc = _mm256_sub_epi8(_mm256_or_si256(low, high), b32);
        /* four where the high bit is clear: q = low - four */
        const __m256i nh = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)blk), _mm256_set1_epi8(-1));
        __m256i sumi = _mm256_setzero_si256();
        for (int j = 0; j < 2; j++) {
            const __m256i bits = _mm256_loadu_si256((const __m256i *)(blk + 32 + 32 * j));
            const __m256i l0 = _mm256_and_si256(bits, m3);
            const __m256i l1 = _mm256_and_si256(_mm256_srli_epi16(bits, 2), m3);
            const __m256i l2 = _mm256_and_si256(_mm256_srli_epi16(bits, 4), m3);
            const __m256i l3 = _mm256_and_si256(_mm256_srli_epi16(bits, 6), m3);
            /* bit 4j + k of nh moved to bit 2 */
            __m256i h0, h1, h2, h3;
            if (j == 0) {
                h0 = _mm256_and_si256(_mm256_slli_epi16(nh, 2), four);
                h1 = _mm256_and_si256(_mm256_slli_epi16(nh, 1), four);
                h2 = _mm256_and_si256(nh, four);
                h3 = _mm256_and_si256(_mm256_srli_epi16(nh, 1), four);
            } else {
                h0 = _mm256_and_si256(_mm256_srli_epi16(nh, 2), four);
                h1 = _mm256_and_si256(_mm256_srli_epi16(nh, 3), four);
                h2 = _mm256_and_si256(_mm256_srli_epi16(nh, 4), four);
                h3 = _mm256_and_si256(_mm256_srli_epi16(nh, 5), four);
            }
            const int8_t *y = q8 + 128 * j;
            const __m256i y0 = _mm256_loadu_si256((const __m256i *)y), y1 = _mm256_loadu_si256((const __m256i *)(y + 32));
            const __m256i y2 = _mm256_loadu_si256((const __m256i *)(y + 64)), y3 = _mm256_loadu_si256((const __m256i *)(y + 96));
            /* (low - four) . q8 per pair as two unsigned-by-signed products: |.| <= 1024 */
            const __m256i p0 = _mm256_sub_epi16(_mm256_maddubs_epi16(l0, y0), _mm256_maddubs_epi16(h0, y0));
            const __m256i p1 = _mm256_sub_epi16(_mm256_maddubs_epi16(l1, y1), _mm256_maddubs_epi16(h1, y1));
            const __m256i p2 = _mm256_sub_epi16(_mm256_maddubs_epi16(l2, y2), _mm256_maddubs_epi16(h2, y2));
            const __m256i p3 = _mm256_sub_epi16(_mm256_maddubs_epi16(l3, y3), _mm256_maddubs_epi16(h3, y3));
            /* 256 * scale * pairs: |.| <= 2 * 8192 * 1024 per group, 2**27 over all eight */
            const __m256i s01 = _mm256_add_epi32(SCALED(sc, scale_pick(8 * j + 0, 1), p0), SCALED(sc, scale_pick(8 * j + 2, 1), p1));
            const __m256i s23 = _mm256_add_epi32(SCALED(sc, scale_pick(8 * j + 4, 1), p2), SCALED(sc, scale_pick(8 * j + 6, 1), p3));
            sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(s01, s23));
        }
        acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_srai_epi32(sumi, 8)), acc); /* exact: a multiple of 256 */
    }
    return hsum_float_8(acc);
}

static TARGET_AVX2 float dot_q2_k_avx2(const uint8_t *w, const act_row *x, int n_cols) {
    const __m256i m3 = _mm256_set1_epi8(3), m4 = _mm256_set1_epi8(0x0F);
    /* mins 0..7 (low lane) and 8..15 (high lane) zero-extended to int16 */
    const __m256i mins_idx = _mm256_setr_epi8(0, -128, 1, -128, 2, -128, 3, -128, 4, -128, 5, -128, 6, -128, 7, -128,
                                              8, -128, 9, -128, 10, -128, 11, -128, 12, -128, 13, -128, 14, -128, 15, -128);
    __m256 acc = _mm256_setzero_ps();
    for (int b = 0; b < n_cols / QK_K; b++) {
        const uint8_t *blk = w + (size_t)b * Q2_K_BYTES;
        const int8_t *q8 = x->qs + (size_t)b * QK_K;
        const float yd = x->d[b];
        const __m256 d = _mm256_set1_ps(yd * _cvtsh_ss(read_u16(blk + 80)));
        const __m256 dmin = _mm256_set1_ps(-yd * _cvtsh_ss(read_u16(blk + 82)));
        const __m256i packed = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)blk));
        const __m256i mins = _mm256_shuffle_epi8(_mm256_and_si256(_mm256_srli_epi16(packed, 4), m4), mins_idx);
        const __m256i bsums = _mm256_loadu_si256((const __m256i *)(x->bsums + (size_t)b * 16));
        acc = _mm256_fmadd_ps(dmin, _mm256_cvtepi32_ps(_mm256_madd_epi16(mins, bsums)), acc);
        const __m256i sc = _mm256_and_si256(packed, m4);
        __m256i sumi = _mm256_setzero_si256();
        for (int j = 0; j < 2; j++) {
            const __m256i bits = _mm256_loadu_si256((const __m256i *)(blk + 16 + 32 * j));
            const int8_t *y = q8 + 128 * j;
            /* q (0..3) times q8, pairs: |.| <= 768 */
            const __m256i p0 = _mm256_maddubs_epi16(_mm256_and_si256(bits, m3), _mm256_loadu_si256((const __m256i *)y));
            const __m256i p1 = _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(bits, 2), m3),
                                                    _mm256_loadu_si256((const __m256i *)(y + 32)));
            const __m256i p2 = _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(bits, 4), m3),
                                                    _mm256_loadu_si256((const __m256i *)(y + 64)));
            const __m256i p3 = _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(bits, 6), m3),
                                                    _mm256_loadu_si256((const __m256i *)(y + 96)));
            const __m256i s01 = _mm256_add_epi32(SCALED(sc, scale_pick(8 * j + 0, 0), p0), SCALED(sc, scale_pick(8 * j + 2, 0), p1));
            const __m256i s23 = _mm256_add_epi32(SCALED(sc, scale_pick(8 * j + 4, 0), p2), SCALED(sc, scale_pick(8 * j + 6, 0), p3));
            sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(s01, s23));
        }
        acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sumi), acc);
    }
    return hsum_float_8(acc);
}
#define AVX2(fn) fn
#else
#define AVX2(fn) NULL
#endif

const format_kernels KERNELS_Q2_K = {"Q2_K", ACT_Q8_K, QK_K, Q2_K_BYTES, dot_q2_k_portable, AVX2(dot_q2_k_avx2), NULL};
const format_kernels KERNELS_Q3_K = {"Q3_K", ACT_Q8_K, QK_K, Q3_K_BYTES, dot_q3_k_portable, AVX2(dot_q3_k_avx2), NULL};
