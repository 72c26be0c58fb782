/* MXFP4 weights dotted with Q8_0 activations, as ggml_vec_dot_mxfp4_q8_0 (AVX2).
 *
 * Block (17 bytes, 32 values): e (E8M0 scale byte), qs[16] 4-bit E2M1 codes; element
 * j < 16 is the low nibble of qs[j], element j + 16 its high nibble. Values are ggml's
 * doubled E2M1 table (below) times 2^(e - 128) (the "half" E8M0 scale).
 *
 * Order (see offload/kernels/mxfp4.py): blocks in pairs; per block eight int32 lanes, lane
 * i the exact sum of the products of elements 4i..4i+3; the block scale s = fp16(d_x) *
 * e8m0_half(e) (one float product); even blocks accumulate fma(s, float(lane), acc1),
 * odd blocks fma(s, float(lane), acc2); result hsum_float_8(acc1 + acc2), then an odd last
 * block is added as ggml's scalar `sumf += d * sumi`, contracted by GCC into one FMA in the
 * AVX2 build: fma(float(its int sum), s, result).
 */
#include <math.h>

#include "kernels.h"

#define QK 32
#define MXFP4_BYTES 17

/* E2M1 code -> twice its value, as int8 (ggml's kvalues_mxfp4). */
static const int8_t mxfp4_values[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};

/* 2^(e - 128) as float32: (e - 1) << 23 for e >= 2, the subnormals 2^-128 and 2^-127 below
 * (e = 255 reads as 2^127, not NaN), exactly as ggml's E8M0_TO_FP32_HALF. */
static inline float e8m0_half(uint8_t e) {
    uint32_t bits = e < 2 ? (uint32_t)0x00200000u << e : (uint32_t)(e - 1) << 23;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* The exact int dot of one block's 32 values with 32 activation quants, lane by lane
 * (decoded to int8 first: simple loops the compiler vectorizes). */
static inline void block_lanes(const uint8_t *qs, const int8_t *qx, int32_t lanes[8]) {
    int8_t q[QK];
    for (int j = 0; j < QK / 2; j++) {
        q[j] = mxfp4_values[qs[j] & 0x0F];
        q[j + QK / 2] = mxfp4_values[qs[j] >> 4];
    }
    for (int lane = 0; lane < 8; lane++) {
        const int j = 4 * lane;
        lanes[lane] = ((int32_t)q[j] * qx[j] + (int32_t)q[j + 1] * qx[j + 1]) +
                      ((int32_t)q[j + 2] * qx[j + 2] + (int32_t)q[j + 3] * qx[j + 3]);
    }
}

static float dot_mxfp4_portable(const uint8_t *w, const act_row *x, int n_cols) {
    const int nb = n_cols / QK;
    float acc1[8] = {0}, acc2[8] = {0};
    int32_t lanes[8];
    int ib = 0;
    for (; ib + 1 < nb; ib += 2) {
        const uint8_t *b0 = w + (size_t)ib * MXFP4_BYTES, *b1 = b0 + MXFP4_BYTES;
        const float s0 = x->d[ib] * e8m0_half(b0[0]);
        const float s1 = x->d[ib + 1] * e8m0_half(b1[0]);
        block_lanes(b0 + 1, x->qs + ib * QK, lanes);
        for (int i = 0; i < 8; i++) acc1[i] = fmaf(s0, (float)lanes[i], acc1[i]);
        block_lanes(b1 + 1, x->qs + (ib + 1) * QK, lanes);
        for (int i = 0; i < 8; i++) acc2[i] = fmaf(s1, (float)lanes[i], acc2[i]);
    }
    for (int i = 0; i < 8; i++) acc1[i] += acc2[i];
    float sum = hsum8_portable(acc1);
    for (; ib < nb; ib++) { /* at most one block */
        const uint8_t *blk = w + (size_t)ib * MXFP4_BYTES;
        const float s = x->d[ib] * e8m0_half(blk[0]);
        block_lanes(blk + 1, x->qs + ib * QK, lanes);
        int32_t sumi = 0;
        for (int i = 0; i < 8; i++) sumi += lanes[i];
        sum = fmaf((float)sumi, s, sum); /* ggml's `sumf += d * sumi`, contracted */
    }
    return sum;
}

#ifdef OFFLOAD_X86
/* One block's values as 32 int8 (element order): table lookup of the low nibbles into
 * the low 128 bits, of the high nibbles into the high 128 bits. */
static inline TARGET_AVX2 __m256i mxfp4_decode(const uint8_t *qs, __m128i table, __m128i low_mask) {
    const __m128i packed = _mm_loadu_si128((const __m128i *)qs);
    const __m128i lo = _mm_shuffle_epi8(table, _mm_and_si128(packed, low_mask));
    const __m128i hi = _mm_shuffle_epi8(table, _mm_and_si128(_mm_srli_epi16(packed, 4), low_mask));
    return _mm256_set_m128i(hi, lo);
}

/* Eight int32 lanes of four int8 x int8 products each, as float: maddubs wants an unsigned
 * left side, so |w| there and w's signs moved onto x (|w| <= 12: no saturation). */
static inline TARGET_AVX2 __m256 lane_sums(__m256i qw, __m256i qx, __m256i ones) {
    const __m256i pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(qw, qw), _mm256_sign_epi8(qx, qw));
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones));
}

static TARGET_AVX2 float dot_mxfp4_avx2(const uint8_t *w, const act_row *x, int n_cols) {
    const int nb = n_cols / QK;
    const __m128i table = _mm_loadu_si128((const __m128i *)mxfp4_values);
    const __m128i low_mask = _mm_set1_epi8(0x0F);
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc1 = _mm256_setzero_ps(), acc2 = _mm256_setzero_ps();
    int ib = 0;
    for (; ib + 1 < nb; ib += 2) {
        const uint8_t *b0 = w + (size_t)ib * MXFP4_BYTES, *b1 = b0 + MXFP4_BYTES;
        const int8_t *q0 = x->qs + ib * QK;
        const __m256 p0 = lane_sums(mxfp4_decode(b0 + 1, table, low_mask), _mm256_loadu_si256((const __m256i *)q0), ones);
        const __m256 p1 = lane_sums(mxfp4_decode(b1 + 1, table, low_mask), _mm256_loadu_si256((const __m256i *)(q0 + QK)), ones);
        const __m256 s0 = _mm256_set1_ps(x->d[ib] * e8m0_half(b0[0]));
        const __m256 s1 = _mm256_set1_ps(x->d[ib + 1] * e8m0_half(b1[0]));
        acc1 = _mm256_fmadd_ps(s0, p0, acc1);
        acc2 = _mm256_fmadd_ps(s1, p1, acc2);
    }
    float sum = hsum_float_8(_mm256_add_ps(acc1, acc2));
    if (ib < nb) { /* odd last block: scalar, one FMA */
        const uint8_t *blk = w + (size_t)ib * MXFP4_BYTES;
        const float s = x->d[ib] * e8m0_half(blk[0]);
        int32_t lanes[8], sumi = 0;
        block_lanes(blk + 1, x->qs + ib * QK, lanes);
        for (int i = 0; i < 8; i++) sumi += lanes[i];
        sum = fmaf((float)sumi, s, sum);
    }
    return sum;
}
/* The row-dot above on many tokens at once: the row's blocks decoded once (|w|, w and the
 * E8M0 scale per block) into a buffer on the stack, then run against four tokens at a time,
 * each token with its own acc1/acc2 and exactly the row dot's steps in the row dot's order
 * (the integer lanes are exact; the float steps are the same operations on the same values),
 * so every result equals dot_mxfp4_avx2's to the bit. Rows longer than TOKENS_MAX_BLOCKS and
 * the last n_tokens % 4 tokens go through the row dot itself. */
#define TOKENS_MAX_BLOCKS 512
#define TOKENS_TILE 4

static TARGET_AVX2 void tokens_mxfp4_avx2(const uint8_t *w, const int8_t *xq, const float *xd, const int16_t *bsums,
                                          int n_cols, ptrdiff_t n_tokens, float *out, ptrdiff_t out_stride) {
    (void)bsums; /* Q8_0 activations */
    const int nb = n_cols / QK;
    ptrdiff_t t = 0;
    if (nb <= TOKENS_MAX_BLOCKS && n_tokens >= TOKENS_TILE) {
        __m256i aw[TOKENS_MAX_BLOCKS], sw[TOKENS_MAX_BLOCKS];
        float ew[TOKENS_MAX_BLOCKS];
        __m256 ewv[TOKENS_MAX_BLOCKS]; /* ew broadcast: the scale product as one vector multiply */
        const __m128i table = _mm_loadu_si128((const __m128i *)mxfp4_values);
        const __m128i low_mask = _mm_set1_epi8(0x0F);
        const __m256i ones = _mm256_set1_epi16(1);
        for (int ib = 0; ib < nb; ib++) {
            const uint8_t *b = w + (size_t)ib * MXFP4_BYTES;
            const __m256i q = mxfp4_decode(b + 1, table, low_mask);
            aw[ib] = _mm256_sign_epi8(q, q);
            sw[ib] = q;
            ew[ib] = e8m0_half(b[0]);
            ewv[ib] = _mm256_set1_ps(ew[ib]);
        }
        const int n_pairs_end = nb & ~1;
        for (; t + TOKENS_TILE <= n_tokens; t += TOKENS_TILE) {
            const int8_t *x[TOKENS_TILE];
            const float *d[TOKENS_TILE];
            __m256 acc1[TOKENS_TILE], acc2[TOKENS_TILE];
            for (int j = 0; j < TOKENS_TILE; j++) {
                x[j] = xq + (t + j) * (ptrdiff_t)n_cols;
                d[j] = xd + (t + j) * (ptrdiff_t)nb;
                acc1[j] = _mm256_setzero_ps();
                acc2[j] = _mm256_setzero_ps();
            }
            for (int ib = 0; ib < n_pairs_end; ib += 2) {
                const __m256i a0 = aw[ib], a1 = aw[ib + 1], w0 = sw[ib], w1 = sw[ib + 1];
                const __m256 e0 = ewv[ib], e1 = ewv[ib + 1];
                for (int j = 0; j < TOKENS_TILE; j++) {
                    const int8_t *q0 = x[j] + ib * QK;
                    const __m256i x0 = _mm256_loadu_si256((const __m256i *)q0);
                    const __m256i x1 = _mm256_loadu_si256((const __m256i *)(q0 + QK));
                    const __m256 p0 = _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(a0, _mm256_sign_epi8(x0, w0)), ones));
                    const __m256 p1 = _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(a1, _mm256_sign_epi8(x1, w1)), ones));
                    acc1[j] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_broadcast_ss(d[j] + ib), e0), p0, acc1[j]);
                    acc2[j] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_broadcast_ss(d[j] + ib + 1), e1), p1, acc2[j]);
                }
            }
            for (int j = 0; j < TOKENS_TILE; j++) {
                float sum = hsum_float_8(_mm256_add_ps(acc1[j], acc2[j]));
                if (n_pairs_end < nb) { /* odd last block: its exact int sum, one FMA */
                    const int ib = n_pairs_end;
                    const __m256i x0 = _mm256_loadu_si256((const __m256i *)(x[j] + ib * QK));
                    int32_t lanes[8], sumi = 0;
                    _mm256_storeu_si256((__m256i *)lanes,
                                        _mm256_madd_epi16(_mm256_maddubs_epi16(aw[ib], _mm256_sign_epi8(x0, sw[ib])), ones));
                    for (int i = 0; i < 8; i++) sumi += lanes[i];
                    sum = fmaf((float)sumi, d[j][ib] * ew[ib], sum);
                }
                out[(t + j) * out_stride] = sum;
            }
        }
    }
    for (; t < n_tokens; t++) {
        const act_row x = {xq + t * (ptrdiff_t)n_cols, xd + t * (ptrdiff_t)nb, {NULL}};
        out[t * out_stride] = dot_mxfp4_avx2(w, &x, n_cols);
    }
}
#define AVX2(fn) fn
#else
#define AVX2(fn) NULL
#endif

const format_kernels KERNELS_MXFP4 = {"MXFP4",        ACT_Q8_0, QK, MXFP4_BYTES, dot_mxfp4_portable, AVX2(dot_mxfp4_avx2),
                                      NULL,           AVX2(tokens_mxfp4_avx2)};
