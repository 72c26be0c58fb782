/* Q4_K and Q5_K weights dotted with Q8_K activations, as ggml_vec_dot_q{4,5}_K_q8_K (AVX2).
 *
 * Super-block of 256 values = 8 sub-blocks of 32; value e of sub-block s is
 * d * sc[s] * q - dmin * m[s] (sc, m 6-bit, packed in 12 bytes as get_scale_min_k4).
 *   Q4_K block (144 bytes): f16 d, f16 dmin, scales[12], qs[128].
 *   Q5_K block (176 bytes): f16 d, f16 dmin, scales[12], qh[32], qs[128].
 * qs bytes 32j .. 32j+31 hold sub-block 2j (low nibbles) and 2j+1 (high nibbles); in Q5_K
 * bit s of qh[e] is the fifth bit of value e of sub-block s.
 *
 * Float operations per super-block, in ggml's order (all integer sums are exact, so only
 * these matter; see offload/kernels/q4_k_q5_k.py):
 *   d = x.d * w.d, dmin = -x.d * w.dmin;
 *   prod[k] = m[2k] * (bsums[4k] + bsums[4k+1]) + m[2k+1] * (bsums[4k+2] + bsums[4k+3]);
 *     Q4_K: acc_m[k] = fma(dmin, float(prod[k]), acc_m[k])  (four lanes)
 *     Q5_K: summs = fma(dmin, float((p0 + p1) + (p2 + p3)), summs)
 *   isum[L] = sum over sub-blocks s of sc[s] * (q . x) over elements 4L .. 4L+3 of s;
 *   acc[L] = fma(d, float(isum[L]), acc[L]).
 * Result: Q4_K hsum_float_8(acc) + ((acc_m0 + acc_m2) + (acc_m1 + acc_m3)),
 *         Q5_K hsum_float_8(acc) + summs.
 */
#include <math.h>

#include "kernels.h"

#define QK_K 256
#define Q4_K_BYTES 144
#define Q5_K_BYTES 176

/* get_scale_min_k4 for the 12 packed bytes: sc[8], mn[8]. */
static inline void scales_mins(const uint8_t *b, int32_t sc[8], int32_t mn[8]) {
    for (int j = 0; j < 4; j++) {
        sc[j] = b[j] & 63;
        mn[j] = b[j + 4] & 63;
        sc[j + 4] = (b[j + 8] & 15) | ((b[j] >> 6) << 4);
        mn[j + 4] = (b[j + 8] >> 4) | ((b[j + 4] >> 6) << 4);
    }
}

/* The four exact min products of one super-block (_mm_hadd_epi16 + _mm_madd_epi16). */
static inline void min_products(const int32_t mn[8], const int16_t *bs, int32_t p[4]) {
    for (int k = 0; k < 4; k++)
        p[k] = mn[2 * k] * ((int32_t)bs[4 * k] + bs[4 * k + 1]) + mn[2 * k + 1] * ((int32_t)bs[4 * k + 2] + bs[4 * k + 3]);
}

/* acc[L] = fma(d, float(isum[L]), acc[L]), isum[L] = tmp[4L] + .. + tmp[4L+3] (exact). */
static inline void add_lanes(const int32_t tmp[32], float d, float acc[8]) {
    for (int l = 0; l < 8; l++) {
        const int32_t isum = (tmp[4 * l] + tmp[4 * l + 1]) + (tmp[4 * l + 2] + tmp[4 * l + 3]);
        acc[l] = fmaf(d, (float)isum, acc[l]);
    }
}

static float dot_q4_k_portable(const uint8_t *w, const act_row *x, int n_cols) {
    float acc[8] = {0}, acc_m[4] = {0};
    for (int b = 0; b < n_cols / QK_K; b++) {
        const uint8_t *blk = w + (size_t)b * Q4_K_BYTES, *qs = blk + 16;
        const int8_t *q8 = x->qs + (size_t)b * QK_K;
        const float d = x->d[b] * fp16_to_fp32(read_u16(blk));
        const float dmin = -x->d[b] * fp16_to_fp32(read_u16(blk + 2));
        int32_t sc[8], mn[8], p[4];
        scales_mins(blk + 4, sc, mn);
        min_products(mn, x->bsums + (size_t)b * 16, p);
        for (int k = 0; k < 4; k++) acc_m[k] = fmaf(dmin, (float)p[k], acc_m[k]);
        int32_t tmp[32] = {0}; /* per position e; lane L sums positions 4L .. 4L+3 (exact) */
        for (int j = 0; j < 4; j++) {
            int16_t lo[32], hi[32]; /* q * x fits int16; computed apart so it vectorizes narrow */
            for (int e = 0; e < 32; e++) {
                lo[e] = (int16_t)((qs[32 * j + e] & 15) * q8[64 * j + e]);
                hi[e] = (int16_t)((qs[32 * j + e] >> 4) * q8[64 * j + 32 + e]);
            }
            const int16_t s_lo = (int16_t)sc[2 * j], s_hi = (int16_t)sc[2 * j + 1];
            for (int e = 0; e < 32; e++) tmp[e] += (int32_t)s_lo * lo[e] + (int32_t)s_hi * hi[e];
        }
        add_lanes(tmp, d, acc);
    }
    return hsum8_portable(acc) + ((acc_m[0] + acc_m[2]) + (acc_m[1] + acc_m[3]));
}

static float dot_q5_k_portable(const uint8_t *w, const act_row *x, int n_cols) {
    float acc[8] = {0}, summs = 0.0f;
    for (int b = 0; b < n_cols / QK_K; b++) {
        const uint8_t *blk = w + (size_t)b * Q5_K_BYTES, *qh = blk + 16, *qs = blk + 48;
        const int8_t *q8 = x->qs + (size_t)b * QK_K;
        const float d = x->d[b] * fp16_to_fp32(read_u16(blk));
        const float dmin = -x->d[b] * fp16_to_fp32(read_u16(blk + 2));
        int32_t sc[8], mn[8], p[4];
        scales_mins(blk + 4, sc, mn);
        min_products(mn, x->bsums + (size_t)b * 16, p);
        summs = fmaf(dmin, (float)((p[0] + p[1]) + (p[2] + p[3])), summs);
        int32_t tmp[32] = {0};
        for (int j = 0; j < 4; j++) {
            int16_t lo[32], hi[32];
            for (int e = 0; e < 32; e++) {
                const int32_t byte = qs[32 * j + e], h = qh[e] >> (2 * j);
                lo[e] = (int16_t)(((byte & 15) | ((h & 1) << 4)) * q8[64 * j + e]);
                hi[e] = (int16_t)(((byte >> 4) | ((h & 2) << 3)) * q8[64 * j + 32 + e]);
            }
            const int16_t s_lo = (int16_t)sc[2 * j], s_hi = (int16_t)sc[2 * j + 1];
            for (int e = 0; e < 32; e++) tmp[e] += (int32_t)s_lo * lo[e] + (int32_t)s_hi * hi[e];
        }
        add_lanes(tmp, d, acc);
    }
    return hsum8_portable(acc) + summs;
}

#ifdef OFFLOAD_X86
/* The 12 packed bytes -> sixteen int16: scales sc[0..7] in the low 128 bits, mins m[0..7]
 * in the high 128 bits (get_scale_min_k4 on four 32-bit words at once). */
static inline TARGET_AVX2 __m256i scales_mins_avx2(const uint8_t *b) {
    uint32_t u[3];
    memcpy(u, b, 12);
    const uint32_t m6 = 0x3f3f3f3fu, m4 = 0x0f0f0f0fu, m2 = 0x03030303u;
    const uint32_t sc_lo = u[0] & m6, sc_hi = (u[2] & m4) | (((u[0] >> 6) & m2) << 4);
    const uint32_t mn_lo = u[1] & m6, mn_hi = ((u[2] >> 4) & m4) | (((u[1] >> 6) & m2) << 4);
    return _mm256_cvtepu8_epi16(_mm_set_epi32((int)mn_hi, (int)mn_lo, (int)sc_hi, (int)sc_lo));
}

/* The four exact min products (int32) from the mins (high half of ms) and 16 bsums. */
static inline TARGET_AVX2 __m128i min_products_avx2(__m256i ms, const int16_t *bsums) {
    const __m256i bs = _mm256_loadu_si256((const __m256i *)bsums);
    const __m128i pairs = _mm_hadd_epi16(_mm256_castsi256_si128(bs), _mm256_extracti128_si256(bs, 1));
    return _mm_madd_epi16(_mm256_extracti128_si256(ms, 1), pairs);
}

/* Software prefetch of the three cache lines ~1.5 KB ahead (10 Q4_K / 8 Q5_K blocks; past a
 * row's end it runs into the next row of the same thread). Measured on Zen 3, one thread
 * out of cache: Q4_K 12.9 -> 15.2 GB/s, Q5_K 12.3 -> 14.0 GB/s; the float order is untouched. */
#define PF_DIST 1536
#define PREFETCH_BLOCK(p)                                                  \
    do {                                                                   \
        _mm_prefetch((const char *)(p) + PF_DIST, _MM_HINT_T0);            \
        _mm_prefetch((const char *)(p) + PF_DIST + 64, _MM_HINT_T0);       \
        _mm_prefetch((const char *)(p) + PF_DIST + 128, _MM_HINT_T0);      \
    } while (0)

/* Broadcast int16 scale i of the eight in the low half of ms (duplicated to both lanes). */
#define SCALE(sc2, i) _mm256_shuffle_epi8(sc2, _mm256_set1_epi16((short)((2 * (i) + 1) << 8 | 2 * (i))))

/* 64 quants of a K-quant block (32 low, 32 high, as unsigned bytes) times the 64 activations
 * at q8, each half weighted by its int16 scale broadcast: the int32 lanes the block's sumi adds. */
static inline __attribute__((always_inline)) TARGET_AVX2 __m256i pair_sums(__m256i lo, __m256i hi, __m256i s_lo,
                                                                           __m256i s_hi, const int8_t *q8) {
    const __m256i x_lo = _mm256_loadu_si256((const __m256i *)q8);
    const __m256i x_hi = _mm256_loadu_si256((const __m256i *)(q8 + 32));
    const __m256i p_lo = _mm256_madd_epi16(s_lo, _mm256_maddubs_epi16(lo, x_lo));
    const __m256i p_hi = _mm256_madd_epi16(s_hi, _mm256_maddubs_epi16(hi, x_hi));
    return _mm256_add_epi32(p_lo, p_hi);
}

/* The Q4_K row dot, for a tile of up to four tokens (dot_q4_k_avx2 is the tile at one token;
 * run_matmul hands a row to tokens_q4_k_avx2 from TILE_TOKENS_MIN tokens). Each weight block
 * is decoded once per tile (the nibbles masked and shifted, the scale broadcasts, the packed
 * scales and mins, the fp16 d and dmin as floats) and kept in registers while every token
 * runs the same steps on it: each token its own sumi, acc and acc_m, so each result is, to
 * the bit, the one it gets alone. */
static inline __attribute__((always_inline)) TARGET_AVX2 void q4_k_tile(const uint8_t *w, int nb, const int8_t *xq,
                                                                        const float *xd, const int16_t *bsums, int n_cols,
                                                                        ptrdiff_t t0, const int n, float *out,
                                                                        ptrdiff_t out_stride) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    const tile_rows r = tile_rows_at(xq, xd, bsums, n_cols, nb, t0, n);
    __m256 acc[4];
    __m128 acc_m[4];
    for (int k = 0; k < n; k++) {
        acc[k] = _mm256_setzero_ps();
        acc_m[k] = _mm_setzero_ps();
    }
    for (int b = 0; b < nb; b++) {
        const uint8_t *blk = w + (size_t)b * Q4_K_BYTES, *qs = blk + 16;
        PREFETCH_BLOCK(blk);
        const float wd = _cvtsh_ss(read_u16(blk)), wdmin = _cvtsh_ss(read_u16(blk + 2));
        const __m256i ms = scales_mins_avx2(blk + 4);
        const __m256i sc2 = _mm256_permute2x128_si256(ms, ms, 0x00);
        __m256i sumi[4];
        float d[4];
        for (int k = 0; k < n; k++) {
            const float x_d = r.d[k][b];
            d[k] = x_d * wd;
            const float dmin = -x_d * wdmin;
            const __m128i prod = min_products_avx2(ms, r.bsums[k] + (size_t)b * 16);
            acc_m[k] = _mm_fmadd_ps(_mm_set1_ps(dmin), _mm_cvtepi32_ps(prod), acc_m[k]);
            sumi[k] = _mm256_setzero_si256();
        }
        for (int j = 0; j < 4; j++) {
            const __m256i bits = _mm256_loadu_si256((const __m256i *)(qs + 32 * j));
            const __m256i lo = _mm256_and_si256(bits, m4);
            const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(bits, 4), m4);
            const __m256i s_lo = SCALE(sc2, 2 * j), s_hi = SCALE(sc2, 2 * j + 1);
            for (int k = 0; k < n; k++)
                sumi[k] = _mm256_add_epi32(sumi[k], pair_sums(lo, hi, s_lo, s_hi, r.x[k] + (size_t)b * QK_K + 64 * j));
        }
        for (int k = 0; k < n; k++) acc[k] = _mm256_fmadd_ps(_mm256_set1_ps(d[k]), _mm256_cvtepi32_ps(sumi[k]), acc[k]);
    }
    for (int k = 0; k < n; k++) {
        __m128 m = _mm_add_ps(acc_m[k], _mm_movehl_ps(acc_m[k], acc_m[k]));
        m = _mm_add_ss(m, _mm_movehdup_ps(m));
        out[(t0 + k) * out_stride] = hsum_float_8(acc[k]) + _mm_cvtss_f32(m);
    }
}

TOKENS_IN_TILES_OF_4(tokens_q4_k_avx2, q4_k_tile, QK_K)

static TARGET_AVX2 float dot_q4_k_avx2(const uint8_t *w, const act_row *x, int n_cols) {
    float out;
    q4_k_tile(w, n_cols / QK_K, x->qs, x->d, x->bsums, n_cols, 0, 1, &out, 0);
    return out;
}

/* The Q5_K row dot for a tile of up to four tokens, as q4_k_tile: the block's 5-bit quants,
 * scale broadcasts, scales and mins and fp16 d and dmin decoded once per tile; each token its
 * own sumi, acc and summs (dot_q5_k_avx2 is the tile at one token). */
static inline __attribute__((always_inline)) TARGET_AVX2 void q5_k_tile(const uint8_t *w, int nb, const int8_t *xq,
                                                                        const float *xd, const int16_t *bsums, int n_cols,
                                                                        ptrdiff_t t0, const int n, float *out,
                                                                        ptrdiff_t out_stride) {
    const __m256i m4 = _mm256_set1_epi8(0x0F), bit4 = _mm256_set1_epi8(0x10);
    const tile_rows r = tile_rows_at(xq, xd, bsums, n_cols, nb, t0, n);
    __m256 acc[4];
    float summs[4];
    for (int k = 0; k < n; k++) {
        acc[k] = _mm256_setzero_ps();
        summs[k] = 0.0f;
    }
    for (int b = 0; b < nb; b++) {
        const uint8_t *blk = w + (size_t)b * Q5_K_BYTES, *qs = blk + 48;
        PREFETCH_BLOCK(blk);
        const float wd = _cvtsh_ss(read_u16(blk)), wdmin = _cvtsh_ss(read_u16(blk + 2));
        const __m256i ms = scales_mins_avx2(blk + 4);
        const __m256i sc2 = _mm256_permute2x128_si256(ms, ms, 0x00);
        const __m256i hbits = _mm256_loadu_si256((const __m256i *)(blk + 16));
        __m256i sumi[4];
        float d[4];
        for (int k = 0; k < n; k++) {
            const float x_d = r.d[k][b];
            d[k] = x_d * wd;
            const float dmin = -x_d * wdmin;
            const __m128i prod = min_products_avx2(ms, r.bsums[k] + (size_t)b * 16);
            const __m128i hs = _mm_hadd_epi32(_mm_hadd_epi32(prod, prod), prod); /* lane 0: (p0+p1)+(p2+p3) */
            summs[k] = fmaf(dmin, (float)_mm_cvtsi128_si32(hs), summs[k]);
            sumi[k] = _mm256_setzero_si256();
        }
        for (int j = 0; j < 4; j++) {
            const __m256i bits = _mm256_loadu_si256((const __m256i *)(qs + 32 * j));
            /* bit s of each qh byte moved to bit 4 (16-bit shifts; the mask drops what crosses bytes) */
            const int s = 2 * j;
            const __m256i h_lo = _mm256_and_si256(s <= 4 ? _mm256_slli_epi16(hbits, 4 - s) : _mm256_srli_epi16(hbits, s - 4), bit4);
            const __m256i h_hi = _mm256_and_si256(s + 1 <= 4 ? _mm256_slli_epi16(hbits, 3 - s) : _mm256_srli_epi16(hbits, s - 3), bit4);
            const __m256i lo = _mm256_or_si256(_mm256_and_si256(bits, m4), h_lo);
            const __m256i hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(bits, 4), m4), h_hi);
            const __m256i s_lo = SCALE(sc2, 2 * j), s_hi = SCALE(sc2, 2 * j + 1);
            for (int k = 0; k < n; k++)
                sumi[k] = _mm256_add_epi32(sumi[k], pair_sums(lo, hi, s_lo, s_hi, r.x[k] + (size_t)b * QK_K + 64 * j));
        }
        for (int k = 0; k < n; k++) acc[k] = _mm256_fmadd_ps(_mm256_set1_ps(d[k]), _mm256_cvtepi32_ps(sumi[k]), acc[k]);
    }
    for (int k = 0; k < n; k++) out[(t0 + k) * out_stride] = hsum_float_8(acc[k]) + summs[k];
}

TOKENS_IN_TILES_OF_4(tokens_q5_k_avx2, q5_k_tile, QK_K)

static TARGET_AVX2 float dot_q5_k_avx2(const uint8_t *w, const act_row *x, int n_cols) {
    float out;
    q5_k_tile(w, n_cols / QK_K, x->qs, x->d, x->bsums, n_cols, 0, 1, &out, 0);
    return out;
}
#define AVX2(fn) fn
#else
#define AVX2(fn) NULL
#endif

const format_kernels KERNELS_Q4_K = {"Q4_K", ACT_Q8_K, QK_K, Q4_K_BYTES, dot_q4_k_portable, AVX2(dot_q4_k_avx2), NULL,
                                     AVX2(tokens_q4_k_avx2), TILE_TOKENS_MIN};
const format_kernels KERNELS_Q5_K = {"Q5_K", ACT_Q8_K, QK_K, Q5_K_BYTES, dot_q5_k_portable, AVX2(dot_q5_k_avx2), NULL,
                                     AVX2(tokens_q5_k_avx2), TILE_TOKENS_MIN};
