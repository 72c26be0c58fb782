/* Q6_K weights dotted with Q8_K activations, as ggml_vec_dot_q6_K_q8_K (AVX2).
 *
 * Q6_K block (210 bytes): ql[128], qh[64], int8 scales[16], f16 d. A 256-value super-block
 * is two 128-value halves h; value 128h + 32g + l (g = 0..3, l = 0..31) has
 *   low 4 bits:  g = 0: ql[64h + l] & 15      g = 1: ql[64h + 32 + l] & 15
 *                g = 2: ql[64h + l] >> 4      g = 3: ql[64h + 32 + l] >> 4
 *   high 2 bits: bits 2g, 2g + 1 of qh[32h + l]
 * and q (0..63) - 32 is the quant; sub-block s = value / 16 has scale scales[s].
 *
 * ggml's order (see offload/kernels/q6_k.py): the unsigned q enter the products and the
 * -32 comes back once per super-block through the activations' bsums. Per super-block:
 *   lane[k] = sum over the eight 32-value groups c of scale * q * q8 over values
 *             32c + 4k .. 32c + 4k + 3                                  (exact int32)
 *           - 32 * (bsums[2k] * scales[2k] + bsums[2k+1] * scales[2k+1])
 *   d = x.d * f16(w.d);  acc[k] = fma(d, float(lane[k]), acc[k])
 * and the result is hsum_float_8(acc). Everything before the float conversion is exact
 * integer arithmetic, so any exact way of forming lane[k] gives ggml's bits.
 */
#include <math.h>

#include "kernels.h"

#define QK_K 256
#define Q6_K_BYTES 210

static float dot_q6_k_portable(const uint8_t *w, const act_row *x, int n_cols) {
    float acc[8] = {0};
    for (int b = 0; b < n_cols / QK_K; b++) {
        const uint8_t *blk = w + (size_t)b * Q6_K_BYTES;
        const int8_t *sc = (const int8_t *)(blk + 192);
        const int8_t *q8 = x->qs + (size_t)b * QK_K;
        const int16_t *bs = x->bsums + (size_t)b * 16;
        const float d = x->d[b] * fp16_to_fp32(read_u16(blk + 208));
        /* ws[v] = scale * q (q unsigned, 0..63; |ws| <= 8064) in value order */
        int16_t ws[QK_K];
        for (int h = 0; h < 2; h++) {
            const uint8_t *ql = blk + 64 * h, *qh = blk + 128 + 32 * h;
            int16_t *o = ws + 128 * h;
            for (int half = 0; half < 2; half++) { /* l < 16: sub-blocks 8h + 2g; l >= 16: 8h + 2g + 1 */
                const int16_t c0 = sc[8 * h + half], c1 = sc[8 * h + half + 2];
                const int16_t c2 = sc[8 * h + half + 4], c3 = sc[8 * h + half + 6];
                for (int l = 16 * half; l < 16 * half + 16; l++) {
                    o[l] = (int16_t)(((ql[l] & 15) | ((qh[l] & 3) << 4)) * c0);
                    o[32 + l] = (int16_t)(((ql[32 + l] & 15) | (((qh[l] >> 2) & 3) << 4)) * c1);
                    o[64 + l] = (int16_t)(((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) * c2);
                    o[96 + l] = (int16_t)(((ql[32 + l] >> 4) | ((qh[l] >> 6) << 4)) * c3);
                }
            }
        }
        /* pos[e] = sum over the eight 32-value groups c of ws * q8 at value 32c + e */
        int32_t pos[32] = {0};
        for (int c = 0; c < 8; c++)
            for (int e = 0; e < 32; e++) pos[e] += (int32_t)ws[32 * c + e] * q8[32 * c + e];
        for (int k = 0; k < 8; k++) {
            const int32_t lane = (pos[4 * k] + pos[4 * k + 1]) + (pos[4 * k + 2] + pos[4 * k + 3]);
            const int32_t sub = 32 * (bs[2 * k] * sc[2 * k] + bs[2 * k + 1] * sc[2 * k + 1]);
            acc[k] = fmaf(d, (float)(lane - sub), acc[k]);
        }
    }
    return hsum8_portable(acc);
}

#ifdef OFFLOAD_X86
/* The Q6_K row dot, for a tile of up to four tokens (dot_q6_k_avx2 is the tile at one token;
 * run_matmul hands a row to tokens_q6_k_avx2 from TILE_TOKENS_MIN tokens). Each weight block
 * is decoded once per tile (the 6-bit quants, the scales as int16 and their per-group
 * broadcasts, the fp16 d as float) and kept in registers while every token runs the same
 * steps on it: each token its own sumi and acc, so each result is, to the bit, the one it
 * gets alone. */
static inline __attribute__((always_inline)) TARGET_AVX2 void q6_k_tile(const uint8_t *w, int nb, const int8_t *xq,
                                                                        const float *xd, const int16_t *bsums, int n_cols,
                                                                        ptrdiff_t t0, const int n, float *out,
                                                                        ptrdiff_t out_stride) {
    const __m256i m4 = _mm256_set1_epi8(0x0F), m30 = _mm256_set1_epi8(0x30);
    /* per 128-bit lane, pick int16 element 2g (low lane) / 2g + 1 (high lane) of a
     * register holding the half's eight scales in both lanes */
    const __m256i pick0 = _mm256_setr_epi8(0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1,
                                           2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3);
    const __m256i step = _mm256_set1_epi8(4); /* two int16 elements further */
    const __m256i pick1 = _mm256_add_epi8(pick0, step), pick2 = _mm256_add_epi8(pick1, step),
                  pick3 = _mm256_add_epi8(pick2, step);
    const tile_rows r = tile_rows_at(xq, xd, bsums, n_cols, nb, t0, n);
    __m256 acc[4];
    for (int k = 0; k < n; k++) acc[k] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const uint8_t *blk = w + (size_t)b * Q6_K_BYTES;
        const float wd = _cvtsh_ss(read_u16(blk + 208));
        const __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(blk + 192)));
        __m256i sumi[4];
        for (int k = 0; k < n; k++) sumi[k] = _mm256_setzero_si256();
        for (int h = 0; h < 2; h++) {
            const __m256i ql0 = _mm256_loadu_si256((const __m256i *)(blk + 64 * h));
            const __m256i ql1 = _mm256_loadu_si256((const __m256i *)(blk + 64 * h + 32));
            const __m256i qh = _mm256_loadu_si256((const __m256i *)(blk + 128 + 32 * h));
            const __m256i q0 = _mm256_or_si256(_mm256_and_si256(ql0, m4), _mm256_and_si256(_mm256_slli_epi16(qh, 4), m30));
            const __m256i q1 = _mm256_or_si256(_mm256_and_si256(ql1, m4), _mm256_and_si256(_mm256_slli_epi16(qh, 2), m30));
            const __m256i q2 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4), _mm256_and_si256(qh, m30));
            const __m256i q3 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4),
                                               _mm256_and_si256(_mm256_srli_epi16(qh, 2), m30));
            const __m256i sch = h ? _mm256_permute2x128_si256(sc16, sc16, 0x11) : _mm256_permute2x128_si256(sc16, sc16, 0x00);
            const __m256i c0 = _mm256_shuffle_epi8(sch, pick0), c1 = _mm256_shuffle_epi8(sch, pick1);
            const __m256i c2 = _mm256_shuffle_epi8(sch, pick2), c3 = _mm256_shuffle_epi8(sch, pick3);
            for (int k = 0; k < n; k++) {
                const int8_t *y = r.x[k] + (size_t)b * QK_K + 128 * h;
                /* q (0..63) times q8 (-128..127), pairs: |.| <= 16128, no saturation */
                const __m256i p0 = _mm256_maddubs_epi16(q0, _mm256_loadu_si256((const __m256i *)y));
                const __m256i p1 = _mm256_maddubs_epi16(q1, _mm256_loadu_si256((const __m256i *)(y + 32)));
                const __m256i p2 = _mm256_maddubs_epi16(q2, _mm256_loadu_si256((const __m256i *)(y + 64)));
                const __m256i p3 = _mm256_maddubs_epi16(q3, _mm256_loadu_si256((const __m256i *)(y + 96)));
                const __m256i s0 = _mm256_madd_epi16(c0, p0);
                const __m256i s1 = _mm256_madd_epi16(c1, p1);
                const __m256i s2 = _mm256_madd_epi16(c2, p2);
                const __m256i s3 = _mm256_madd_epi16(c3, p3);
                sumi[k] = _mm256_add_epi32(sumi[k], _mm256_add_epi32(_mm256_add_epi32(s0, s1), _mm256_add_epi32(s2, s3)));
            }
        }
        for (int k = 0; k < n; k++) {
            const __m256 d = _mm256_set1_ps(r.d[k][b] * wd);
            const __m256i bs = _mm256_loadu_si256((const __m256i *)(r.bsums[k] + (size_t)b * 16));
            const __m256i sub = _mm256_slli_epi32(_mm256_madd_epi16(bs, sc16), 5);
            acc[k] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_sub_epi32(sumi[k], sub)), acc[k]);
        }
    }
    for (int k = 0; k < n; k++) out[(t0 + k) * out_stride] = hsum_float_8(acc[k]);
}

TOKENS_IN_TILES_OF_4(tokens_q6_k_avx2, q6_k_tile, QK_K)

static TARGET_AVX2 float dot_q6_k_avx2(const uint8_t *w, const act_row *x, int n_cols) {
    float out;
    q6_k_tile(w, n_cols / QK_K, x->qs, x->d, x->bsums, n_cols, 0, 1, &out, 0);
    return out;
}
#define AVX2(fn) fn
#else
#define AVX2(fn) NULL
#endif

const format_kernels KERNELS_Q6_K = {"Q6_K", ACT_Q8_K, QK_K, Q6_K_BYTES, dot_q6_k_portable, AVX2(dot_q6_k_avx2), NULL,
                                     AVX2(tokens_q6_k_avx2), TILE_TOKENS_MIN};
