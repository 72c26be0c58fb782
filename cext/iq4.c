/* IQ4_NL (x Q8_0) and IQ4_XS (x Q8_K): 4-bit codes through ggml's kvalues_iq4nl table.
 * Layouts, value formulas and summation orders: offload/kernels/iq4.py. In short:
 *   IQ4_NL vec_dot: MXFP4's order (blocks in pairs, acc1/acc2 FMA lanes, an odd last block
 *     as one scalar FMA), the block scale fp16(d_x) * fp16(d_w).
 *   IQ4_NL sgemm (KERNELS_IQ4_NL_SGEMM, a plain matmul of 2+ tokens, llamafile's
 *     tinyBLAS_Q0_AVX): one set of eight FMA lanes over all blocks, then hsum.
 *   IQ4_XS vec_dot: per super-block eight int32 lanes, sum over sub-blocks of
 *     (ls - 32) * (4 consecutive products); acc = fma(fp16(d_w) * d_x, lane, acc); hsum.
 *   IQ4_XS tiled (8+ tokens, iq4_xs_tiled): per super-block s1 = exact int sum,
 *     res = d_w * float(s1), acc = fma(res, d_x, acc).
 * ggml has no AVX-512 variant of these dots (its AVX-512 build runs the AVX2 code), so there
 * is none here either: pick() falls back to AVX2.
 */
#include <math.h>
#include <omp.h>
#include <stdlib.h>

#include "kernels.h"

#define QK 32
#define QK_K 256
#define IQ4_NL_BYTES 18
#define IQ4_XS_BYTES 136

static const int8_t kvalues_iq4nl[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

/* 16 code bytes -> 32 int8 values in element order (low nibbles, then high nibbles). */
static inline void decode32(const uint8_t *qs, int8_t q[QK]) {
    for (int j = 0; j < QK / 2; j++) {
        q[j] = kvalues_iq4nl[qs[j] & 0x0F];
        q[j + QK / 2] = kvalues_iq4nl[qs[j] >> 4];
    }
}

/* lanes[i] = exact sum of the products of elements 4i..4i+3 of 32 values. */
static inline void lanes8(const int8_t *q, const int8_t *x, int32_t lanes[8]) {
    for (int i = 0; i < 8; i++) {
        const int j = 4 * i;
        lanes[i] = ((int32_t)q[j] * x[j] + (int32_t)q[j + 1] * x[j + 1]) + ((int32_t)q[j + 2] * x[j + 2] + (int32_t)q[j + 3] * x[j + 3]);
    }
}

/* The 6-bit scale of sub-block s, minus 32. */
static inline int iq4_xs_scale(const uint8_t *blk, int s) {
    const int sh = read_u16(blk + 2);
    return (((blk[4 + s / 2] >> (4 * (s % 2))) & 0x0F) | (((sh >> (2 * s)) & 3) << 4)) - 32;
}

/* -- IQ4_NL ------------------------------------------------------------------------------------ */

static float dot_iq4_nl_portable(const uint8_t *w, const act_row *x, int n_cols) {
    const int nb = n_cols / QK;
    float acc1[8] = {0}, acc2[8] = {0};
    int32_t lanes[8];
    int8_t q[QK];
    int ib = 0;
    for (; ib + 1 < nb; ib += 2) {
        const uint8_t *b0 = w + (size_t)ib * IQ4_NL_BYTES, *b1 = b0 + IQ4_NL_BYTES;
        const float s0 = x->d[ib] * fp16_to_fp32(read_u16(b0));
        const float s1 = x->d[ib + 1] * fp16_to_fp32(read_u16(b1));
        decode32(b0 + 2, q);
        lanes8(q, x->qs + ib * QK, lanes);
        for (int i = 0; i < 8; i++) acc1[i] = fmaf(s0, (float)lanes[i], acc1[i]);
        decode32(b1 + 2, q);
        lanes8(q, x->qs + (ib + 1) * QK, lanes);
        for (int i = 0; i < 8; i++) acc2[i] = fmaf(s1, (float)lanes[i], acc2[i]);
    }
    for (int i = 0; i < 8; i++) acc1[i] += acc2[i];
    float sum = hsum8_portable(acc1);
    if (ib < nb) { /* odd last block: ggml's `sumf += d * sumi`, contracted */
        const uint8_t *blk = w + (size_t)ib * IQ4_NL_BYTES;
        decode32(blk + 2, q);
        lanes8(q, x->qs + ib * QK, lanes);
        int32_t sumi = 0;
        for (int i = 0; i < 8; i++) sumi += lanes[i];
        sum = fmaf(x->d[ib] * fp16_to_fp32(read_u16(blk)), (float)sumi, sum);
    }
    return sum;
}

static float dot_iq4_nl_sgemm_portable(const uint8_t *w, const act_row *x, int n_cols) {
    const int nb = n_cols / QK;
    float acc[8] = {0};
    int32_t lanes[8];
    int8_t q[QK];
    for (int ib = 0; ib < nb; ib++) {
        const uint8_t *blk = w + (size_t)ib * IQ4_NL_BYTES;
        const float s = fp16_to_fp32(read_u16(blk)) * x->d[ib];
        decode32(blk + 2, q);
        lanes8(q, x->qs + ib * QK, lanes);
        for (int i = 0; i < 8; i++) acc[i] = fmaf(s, (float)lanes[i], acc[i]);
    }
    return hsum8_portable(acc);
}

/* -- IQ4_XS ------------------------------------------------------------------------------------ */

/* The eight int lanes of one super-block (exact). */
static inline void iq4_xs_lanes(const uint8_t *blk, const int8_t *x, int32_t out[8]) {
    int32_t lanes[8];
    int8_t q[QK];
    for (int i = 0; i < 8; i++) out[i] = 0;
    for (int s = 0; s < 8; s++) {
        const int ls = iq4_xs_scale(blk, s);
        decode32(blk + 8 + 16 * s, q);
        lanes8(q, x + QK * s, lanes);
        for (int i = 0; i < 8; i++) out[i] += ls * lanes[i];
    }
}

static float dot_iq4_xs_portable(const uint8_t *w, const act_row *x, int n_cols) {
    const int nb = n_cols / QK_K;
    float acc[8] = {0};
    int32_t lanes[8];
    for (int ib = 0; ib < nb; ib++) {
        const uint8_t *blk = w + (size_t)ib * IQ4_XS_BYTES;
        iq4_xs_lanes(blk, x->qs + ib * QK_K, lanes);
        const float s = fp16_to_fp32(read_u16(blk)) * x->d[ib];
        for (int i = 0; i < 8; i++) acc[i] = fmaf(s, (float)lanes[i], acc[i]);
    }
    return hsum8_portable(acc);
}

#ifdef OFFLOAD_X86
/* 16 code bytes -> 32 int8 values (element order) by table lookup, as ggml. */
static inline TARGET_AVX2 __m256i iq4_decode(const uint8_t *qs, __m128i table, __m128i low_mask) {
    const __m128i packed = _mm_loadu_si128((const __m128i *)qs);
    const __m128i lo = _mm_shuffle_epi8(table, _mm_and_si128(packed, low_mask));
    const __m128i hi = _mm_shuffle_epi8(table, _mm_and_si128(_mm_srli_epi16(packed, 4), low_mask));
    return _mm256_set_m128i(hi, lo);
}

/* ggml's mul_add_epi8: int16 sums of adjacent int8 x int8 products (|w| <= 127: exact). */
static inline TARGET_AVX2 __m256i mul_add_epi8(__m256i w, __m256i x) {
    return _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
}

static TARGET_AVX2 float dot_iq4_nl_avx2(const uint8_t *w, const act_row *x, int n_cols) {
    const int nb = n_cols / QK;
    const __m128i table = _mm_loadu_si128((const __m128i *)kvalues_iq4nl);
    const __m128i low_mask = _mm_set1_epi8(0x0F);
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc1 = _mm256_setzero_ps(), acc2 = _mm256_setzero_ps();
    int ib = 0;
    for (; ib + 1 < nb; ib += 2) {
        const uint8_t *b0 = w + (size_t)ib * IQ4_NL_BYTES, *b1 = b0 + IQ4_NL_BYTES;
        const int8_t *q0 = x->qs + ib * QK;
        const __m256i p0 = _mm256_madd_epi16(mul_add_epi8(iq4_decode(b0 + 2, table, low_mask), _mm256_loadu_si256((const __m256i *)q0)), ones);
        const __m256i p1 = _mm256_madd_epi16(mul_add_epi8(iq4_decode(b1 + 2, table, low_mask), _mm256_loadu_si256((const __m256i *)(q0 + QK))), ones);
        acc1 = _mm256_fmadd_ps(_mm256_set1_ps(x->d[ib] * _cvtsh_ss(read_u16(b0))), _mm256_cvtepi32_ps(p0), acc1);
        acc2 = _mm256_fmadd_ps(_mm256_set1_ps(x->d[ib + 1] * _cvtsh_ss(read_u16(b1))), _mm256_cvtepi32_ps(p1), acc2);
    }
    float sum = hsum_float_8(_mm256_add_ps(acc1, acc2));
    if (ib < nb) {
        const uint8_t *blk = w + (size_t)ib * IQ4_NL_BYTES;
        int8_t q[QK];
        int32_t lanes[8], sumi = 0;
        decode32(blk + 2, q);
        lanes8(q, x->qs + ib * QK, lanes);
        for (int i = 0; i < 8; i++) sumi += lanes[i];
        sum = fmaf(x->d[ib] * _cvtsh_ss(read_u16(blk)), (float)sumi, sum);
    }
    return sum;
}

static TARGET_AVX2 float dot_iq4_nl_sgemm_avx2(const uint8_t *w, const act_row *x, int n_cols) {
    const int nb = n_cols / QK;
    const __m128i table = _mm_loadu_si128((const __m128i *)kvalues_iq4nl);
    const __m128i low_mask = _mm_set1_epi8(0x0F);
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc = _mm256_setzero_ps();
    for (int ib = 0; ib < nb; ib++) {
        const uint8_t *blk = w + (size_t)ib * IQ4_NL_BYTES;
        const __m256i p = _mm256_madd_epi16(mul_add_epi8(iq4_decode(blk + 2, table, low_mask),
                                                         _mm256_loadu_si256((const __m256i *)(x->qs + ib * QK))), ones);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(_cvtsh_ss(read_u16(blk)) * x->d[ib]), _mm256_cvtepi32_ps(p), acc);
    }
    return hsum_float_8(acc);
}

/* The eight int lanes of one IQ4_XS super-block, as ggml's AVX2 loop (exact). */
static inline TARGET_AVX2 __m256i iq4_xs_lanes_avx2(const uint8_t *blk, const int8_t *x, __m128i table, __m128i low_mask) {
    __m256i sumi = _mm256_setzero_si256();
    for (int s = 0; s < 8; s++) {
        const __m256i p16 = mul_add_epi8(iq4_decode(blk + 8 + 16 * s, table, low_mask), _mm256_loadu_si256((const __m256i *)(x + QK * s)));
        sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p16, _mm256_set1_epi16((int16_t)iq4_xs_scale(blk, s))));
    }
    return sumi;
}

static TARGET_AVX2 float dot_iq4_xs_avx2(const uint8_t *w, const act_row *x, int n_cols) {
    const int nb = n_cols / QK_K;
    const __m128i table = _mm_loadu_si128((const __m128i *)kvalues_iq4nl);
    const __m128i low_mask = _mm_set1_epi8(0x0F);
    __m256 acc = _mm256_setzero_ps();
    for (int ib = 0; ib < nb; ib++) {
        const uint8_t *blk = w + (size_t)ib * IQ4_XS_BYTES;
        const __m256i lanes = iq4_xs_lanes_avx2(blk, x->qs + ib * QK_K, table, low_mask);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(_cvtsh_ss(read_u16(blk)) * x->d[ib]), _mm256_cvtepi32_ps(lanes), acc);
    }
    return hsum_float_8(acc);
}
/* The row dots above on many tokens at once: the row's blocks decoded once (|w|, w and the
 * fp16 scale) into a stack buffer, then every token runs the row dot's exact steps on them
 * (the integer lanes are exact, the float steps the same operations on the same values), so
 * each result equals the row dot's to the bit. Longer rows take the row dot itself. */
#define TOKENS_MAX_BLOCKS 256

typedef struct {
    __m256i aw, sw; /* |values|, values (maddubs' unsigned side and the signs for the tokens) */
} nl_block;

static inline TARGET_AVX2 __m256 nl_lanes(const nl_block *b, const int8_t *x, __m256i ones) {
    const __m256i xv = _mm256_loadu_si256((const __m256i *)x);
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(b->aw, _mm256_sign_epi8(xv, b->sw)), ones));
}

static TARGET_AVX2 void iq4_nl_tokens(const uint8_t *w, const int8_t *xq, const float *xd, int n_cols, ptrdiff_t n_tokens,
                                      float *out, ptrdiff_t out_stride, int sgemm) {
    const int nb = n_cols / QK;
    if (nb > TOKENS_MAX_BLOCKS) {
        for (ptrdiff_t t = 0; t < n_tokens; t++) {
            const act_row x = {xq + t * (ptrdiff_t)n_cols, xd + t * (ptrdiff_t)nb, {NULL}};
            out[t * out_stride] = sgemm ? dot_iq4_nl_sgemm_avx2(w, &x, n_cols) : dot_iq4_nl_avx2(w, &x, n_cols);
        }
        return;
    }
    nl_block rows[TOKENS_MAX_BLOCKS];
    float dw[TOKENS_MAX_BLOCKS];
    const __m128i table = _mm_loadu_si128((const __m128i *)kvalues_iq4nl);
    const __m128i low_mask = _mm_set1_epi8(0x0F);
    const __m256i ones = _mm256_set1_epi16(1);
    for (int ib = 0; ib < nb; ib++) {
        const uint8_t *blk = w + (size_t)ib * IQ4_NL_BYTES;
        const __m256i q = iq4_decode(blk + 2, table, low_mask);
        rows[ib].aw = _mm256_sign_epi8(q, q);
        rows[ib].sw = q;
        dw[ib] = _cvtsh_ss(read_u16(blk));
    }
    for (ptrdiff_t t = 0; t < n_tokens; t++) {
        const int8_t *x = xq + t * (ptrdiff_t)n_cols;
        const float *d = xd + t * (ptrdiff_t)nb;
        float sum;
        if (sgemm) {
            __m256 acc = _mm256_setzero_ps();
            for (int ib = 0; ib < nb; ib++)
                acc = _mm256_fmadd_ps(_mm256_set1_ps(dw[ib] * d[ib]), nl_lanes(rows + ib, x + ib * QK, ones), acc);
            sum = hsum_float_8(acc);
        } else {
            __m256 acc1 = _mm256_setzero_ps(), acc2 = _mm256_setzero_ps();
            int ib = 0;
            for (; ib + 1 < nb; ib += 2) {
                acc1 = _mm256_fmadd_ps(_mm256_set1_ps(d[ib] * dw[ib]), nl_lanes(rows + ib, x + ib * QK, ones), acc1);
                acc2 = _mm256_fmadd_ps(_mm256_set1_ps(d[ib + 1] * dw[ib + 1]), nl_lanes(rows + ib + 1, x + (ib + 1) * QK, ones), acc2);
            }
            sum = hsum_float_8(_mm256_add_ps(acc1, acc2));
            if (ib < nb) { /* odd last block: its exact int sum, one FMA */
                int32_t lanes[8], sumi = 0;
                _mm256_storeu_si256((__m256i *)lanes, _mm256_cvttps_epi32(nl_lanes(rows + ib, x + ib * QK, ones)));
                for (int i = 0; i < 8; i++) sumi += lanes[i];
                sum = fmaf(d[ib] * dw[ib], (float)sumi, sum);
            }
        }
        out[t * out_stride] = sum;
    }
}

static TARGET_AVX2 void tokens_iq4_nl_avx2(const uint8_t *w, const int8_t *xq, const float *xd, const int16_t *bsums,
                                           int n_cols, ptrdiff_t n_tokens, float *out, ptrdiff_t out_stride) {
    (void)bsums; /* Q8_0 activations */
    iq4_nl_tokens(w, xq, xd, n_cols, n_tokens, out, out_stride, 0);
}

static TARGET_AVX2 void tokens_iq4_nl_sgemm_avx2(const uint8_t *w, const int8_t *xq, const float *xd,
                                                 const int16_t *bsums, int n_cols, ptrdiff_t n_tokens, float *out,
                                                 ptrdiff_t out_stride) {
    (void)bsums;
    iq4_nl_tokens(w, xq, xd, n_cols, n_tokens, out, out_stride, 1);
}
#define AVX2(fn) fn
#else
#define AVX2(fn) NULL
#endif

const format_kernels KERNELS_IQ4_NL = {"IQ4_NL", ACT_Q8_0, QK, IQ4_NL_BYTES, dot_iq4_nl_portable, AVX2(dot_iq4_nl_avx2),
                                       NULL, AVX2(tokens_iq4_nl_avx2)};
const format_kernels KERNELS_IQ4_NL_SGEMM = {"IQ4_NL_SGEMM", ACT_Q8_0, QK, IQ4_NL_BYTES, dot_iq4_nl_sgemm_portable,
                                             AVX2(dot_iq4_nl_sgemm_avx2), NULL, AVX2(tokens_iq4_nl_sgemm_avx2)};
const format_kernels KERNELS_IQ4_XS = {"IQ4_XS", ACT_Q8_K, QK_K, IQ4_XS_BYTES, dot_iq4_xs_portable, AVX2(dot_iq4_xs_avx2),
                                       NULL, NULL};

/* -- IQ4_XS in ggml's tiled order (8+ tokens; tiled.c hands these calls here) ------------------ */

/* One (row, token): the super-blocks' exact sums s1, each rounded as the tiled GEMM does. */
static float iq4_xs_tiled_one(const uint8_t *w, const int8_t *x, const float *xd, int nb) {
    float acc = 0.0f;
    for (int ib = 0; ib < nb; ib++) {
        const uint8_t *blk = w + (size_t)ib * IQ4_XS_BYTES;
        int32_t lanes[8], s1 = 0;
        iq4_xs_lanes(blk, x + ib * QK_K, lanes);
        for (int i = 0; i < 8; i++) s1 += lanes[i];
        acc = fmaf(fp16_to_fp32(read_u16(blk)) * (float)s1, xd[ib], acc);
    }
    return acc;
}

#ifdef OFFLOAD_X86
/* AVX2: a row's super-blocks decoded once (|w|, w, the scales as int16 lanes, d) for all the
 * tokens; the same exact s1 per super-block, the same two float steps. */
typedef struct {
    __m256i aw[8], sw[8], ls[8];
    float d;
} xs_block;

static TARGET_AVX2 void iq4_xs_tiled_row_avx2(const uint8_t *w, const int8_t *xq, const float *xd, int nb, int n_cols,
                                             ptrdiff_t n_tokens, float *out, ptrdiff_t out_stride, xs_block *row) {
    const __m128i table = _mm_loadu_si128((const __m128i *)kvalues_iq4nl);
    const __m128i low_mask = _mm_set1_epi8(0x0F);
    for (int ib = 0; ib < nb; ib++) {
        const uint8_t *blk = w + (size_t)ib * IQ4_XS_BYTES;
        for (int s = 0; s < 8; s++) {
            const __m256i q = iq4_decode(blk + 8 + 16 * s, table, low_mask);
            row[ib].aw[s] = _mm256_sign_epi8(q, q);
            row[ib].sw[s] = q;
            row[ib].ls[s] = _mm256_set1_epi16((int16_t)iq4_xs_scale(blk, s));
        }
        row[ib].d = _cvtsh_ss(read_u16(blk));
    }
    for (ptrdiff_t t = 0; t < n_tokens; t++) {
        const int8_t *x = xq + t * (ptrdiff_t)n_cols;
        float acc = 0.0f;
        for (int ib = 0; ib < nb; ib++) {
            const xs_block *b = row + ib;
            __m256i sumi = _mm256_setzero_si256();
            for (int s = 0; s < 8; s++) {
                const __m256i xv = _mm256_loadu_si256((const __m256i *)(x + ib * QK_K + QK * s));
                sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(_mm256_maddubs_epi16(b->aw[s], _mm256_sign_epi8(xv, b->sw[s])), b->ls[s]));
            }
            int32_t lanes[8], s1 = 0;
            _mm256_storeu_si256((__m256i *)lanes, sumi);
            for (int i = 0; i < 8; i++) s1 += lanes[i];
            acc = fmaf(b->d * (float)s1, xd[t * (ptrdiff_t)nb + ib], acc);
        }
        out[t * out_stride] = acc;
    }
}
#endif

int iq4_xs_tiled(const uint8_t *w, const int8_t *xq, const float *xd, float *out, ptrdiff_t n_rows, int n_cols,
                 ptrdiff_t n_tokens, int isa_level) {
    const int nb = n_cols / QK_K;
    const size_t row_bytes = (size_t)nb * IQ4_XS_BYTES;
#ifdef OFFLOAD_X86
    if (isa_level >= 1) {
        int failed = 0;
#pragma omp parallel if (n_rows * n_tokens * nb > 64)
        {
            xs_block *row = aligned_alloc(32, sizeof(xs_block) * (size_t)nb);
            if (!row) {
#pragma omp atomic write
                failed = 1;
            }
#pragma omp for schedule(static)
            for (ptrdiff_t r = 0; r < n_rows; r++)
                if (row) iq4_xs_tiled_row_avx2(w + (size_t)r * row_bytes, xq, xd, nb, n_cols, n_tokens, out + r, n_rows, row);
            free(row);
        }
        return failed ? -2 : 0;
    }
#else
    (void)isa_level;
#endif
#pragma omp parallel for schedule(static) if (n_rows * n_tokens * nb > 64)
    for (ptrdiff_t r = 0; r < n_rows; r++)
        for (ptrdiff_t t = 0; t < n_tokens; t++)
            out[t * n_rows + r] = iq4_xs_tiled_one(w + (size_t)r * row_bytes, xq + t * n_cols, xd + t * nb, nb);
    return 0;
}
