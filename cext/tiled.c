/* K-quant matmuls of 8 or more tokens, in the order of ggml's "tiled" path (ggml-cpu/tiled/).
 *
 * llama.cpp computes a matmul whose right side has at least 8 rows (a prompt's tokens, or
 * the tokens routed to one expert in mul_mat_id) with Q2_K..Q6_K weights not through
 * vec_dot but through its tiled GEMM, which rounds differently. Per output (row r, token t)
 * and 256-value super-block b, with exact integers
 *     s1 = sum over sub-blocks s of scale[s] * (q . q8) over s      (q signed, as dequantized)
 *     s2 = sum over sub-blocks s of min[s] * (sum of q8 over s)     (formats with mins)
 * its floats are (AVX2 build, FMA on):
 *     res = w.d * float(s1);  res = fma(-w.dmin, float(s2), res)  (formats with mins)
 *     acc = fma(res, x.d, acc)                                     (blocks in order, acc = 0)
 * and out[t, r] = acc.
 *
 * Here each weight block is first decoded into a uniform layout (`decoded_block`): 256
 * signed int8 quants, a scale and a min per 16 values, d and dmin. Then one integer kernel
 * serves every format. A thread decodes ROW_TILE rows once and runs them against the
 * tokens TOKEN_TILE at a time, so the decoded rows and the tokens' activations stay in cache.
 */
#include <math.h>
#include <omp.h>
#include <stdlib.h>

#include "kernels.h"
#include "tiled.h"

#define QK_K 256
#define ROW_TILE 16
#define TOKEN_TILE 8

typedef struct {
    int8_t q[QK_K];     /* quants, signed as they enter the value: Q6_K q - 32, Q3_K low - 4*!high, ... */
    int16_t sc[16];     /* scale of each 16 values (formats with 32-value sub-blocks repeat it) */
    int16_t mn[16];     /* min of each 16 values; zero for formats without mins */
    float d, dmin;
} decoded_block;

typedef void (*decode_fn)(const uint8_t *blk, decoded_block *o);

/* get_scale_min_k4 (Q4_K, Q5_K): 8 six-bit scales and mins packed in 12 bytes. */
static void scales_mins_k4(const uint8_t *b, decoded_block *o) {
    for (int j = 0; j < 8; j++) {
        int sc, mn;
        if (j < 4) {
            sc = b[j] & 63;
            mn = b[j + 4] & 63;
        } else {
            sc = (b[j + 4] & 15) | ((b[j - 4] >> 6) << 4);
            mn = (b[j + 4] >> 4) | ((b[j] >> 6) << 4);
        }
        o->sc[2 * j] = o->sc[2 * j + 1] = (int16_t)sc;
        o->mn[2 * j] = o->mn[2 * j + 1] = (int16_t)mn;
    }
}

/* Q4_K (144 bytes): f16 d, f16 dmin, scales[12], qs[128]; qs bytes 32j.. hold sub-block 2j
 * (low nibbles) and 2j+1 (high nibbles). */
static void decode_q4_k(const uint8_t *blk, decoded_block *o) {
    o->d = fp16_to_fp32(read_u16(blk));
    o->dmin = fp16_to_fp32(read_u16(blk + 2));
    scales_mins_k4(blk + 4, o);
    const uint8_t *qs = blk + 16;
    for (int j = 0; j < 4; j++)
        for (int e = 0; e < 32; e++) {
            o->q[64 * j + e] = (int8_t)(qs[32 * j + e] & 15);
            o->q[64 * j + 32 + e] = (int8_t)(qs[32 * j + e] >> 4);
        }
}

/* Q5_K (176 bytes): f16 d, f16 dmin, scales[12], qh[32], qs[128]; bit s of qh[e] is the
 * fifth bit of value e of sub-block s. */
static void decode_q5_k(const uint8_t *blk, decoded_block *o) {
    o->d = fp16_to_fp32(read_u16(blk));
    o->dmin = fp16_to_fp32(read_u16(blk + 2));
    scales_mins_k4(blk + 4, o);
    const uint8_t *qh = blk + 16, *qs = blk + 48;
    for (int j = 0; j < 4; j++)
        for (int e = 0; e < 32; e++) {
            o->q[64 * j + e] = (int8_t)((qs[32 * j + e] & 15) | (((qh[e] >> (2 * j)) & 1) << 4));
            o->q[64 * j + 32 + e] = (int8_t)((qs[32 * j + e] >> 4) | (((qh[e] >> (2 * j + 1)) & 1) << 4));
        }
}

/* Q6_K (210 bytes): ql[128], qh[64], int8 scales[16], f16 d; see q6_k.c for the bit layout. */
static void decode_q6_k(const uint8_t *blk, decoded_block *o) {
    o->d = fp16_to_fp32(read_u16(blk + 208));
    o->dmin = 0.0f;
    for (int s = 0; s < 16; s++) {
        o->sc[s] = (int8_t)blk[192 + s];
        o->mn[s] = 0;
    }
    for (int h = 0; h < 2; h++) {
        const uint8_t *ql = blk + 64 * h, *qh = blk + 128 + 32 * h;
        int8_t *q = o->q + 128 * h;
        for (int l = 0; l < 32; l++) {
            q[l] = (int8_t)(((ql[l] & 15) | ((qh[l] & 3) << 4)) - 32);
            q[32 + l] = (int8_t)(((ql[32 + l] & 15) | (((qh[l] >> 2) & 3) << 4)) - 32);
            q[64 + l] = (int8_t)(((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32);
            q[96 + l] = (int8_t)(((ql[32 + l] >> 4) | ((qh[l] >> 6) << 4)) - 32);
        }
    }
}

/* Q3_K (110 bytes): hmask[32], qs[64], scales[12] (6-bit, + 32), f16 d; see q2_k_q3_k.c. */
static void decode_q3_k(const uint8_t *blk, decoded_block *o) {
    const uint8_t *hm = blk, *p = blk + 96;
    o->d = fp16_to_fp32(read_u16(blk + 108));
    o->dmin = 0.0f;
    for (int s = 0; s < 16; s++) {
        const int low = s < 8 ? p[s] & 15 : p[s - 8] >> 4;
        const int high = (p[8 + s % 4] >> (2 * (s / 4))) & 3;
        o->sc[s] = (int16_t)((low | (high << 4)) - 32);
        o->mn[s] = 0;
    }
    for (int j = 0; j < 2; j++)
        for (int k = 0; k < 4; k++)
            for (int l = 0; l < 32; l++) {
                const uint8_t qs = blk[32 + 32 * j + l];
                o->q[128 * j + 32 * k + l] = (int8_t)(((qs >> (2 * k)) & 3) - 4 + (((hm[l] >> (4 * j + k)) & 1) << 2));
            }
}

/* Q2_K (84 bytes): scales[16] (low nibble scale, high nibble min), qs[64], f16 d, f16 dmin. */
static void decode_q2_k(const uint8_t *blk, decoded_block *o) {
    o->d = fp16_to_fp32(read_u16(blk + 80));
    o->dmin = fp16_to_fp32(read_u16(blk + 82));
    for (int s = 0; s < 16; s++) {
        o->sc[s] = blk[s] & 15;
        o->mn[s] = blk[s] >> 4;
    }
    for (int j = 0; j < 2; j++)
        for (int k = 0; k < 4; k++)
            for (int l = 0; l < 32; l++) o->q[128 * j + 32 * k + l] = (int8_t)((blk[16 + 32 * j + l] >> (2 * k)) & 3);
}

typedef struct {
    const char *name;
    int block_bytes;
    int has_min;
    decode_fn decode;
} tiled_format;

static const tiled_format tiled_formats[] = {
    {"Q2_K", 84, 1, decode_q2_k},  {"Q3_K", 110, 0, decode_q3_k}, {"Q4_K", 144, 1, decode_q4_k},
    {"Q5_K", 176, 1, decode_q5_k}, {"Q6_K", 210, 0, decode_q6_k},
};

int tiled_block_bytes(const char *name, int *has_min) {
    for (size_t i = 0; i < sizeof(tiled_formats) / sizeof(tiled_formats[0]); i++)
        if (strcmp(tiled_formats[i].name, name) == 0) {
            if (has_min) *has_min = tiled_formats[i].has_min;
            return tiled_formats[i].block_bytes;
        }
    return 0;
}

/* The exact integers of one block against one token's block: s1 and s2 above. */
static void block_ints_portable(const decoded_block *b, const int8_t *q8, const int16_t *bsums, int32_t *s1,
                                int32_t *s2) {
    int32_t a = 0, m = 0;
    for (int g = 0; g < 16; g++) {
        int32_t dot = 0;
        for (int e = 0; e < 16; e++) dot += (int32_t)b->q[16 * g + e] * q8[16 * g + e];
        a += b->sc[g] * dot;
        m += b->mn[g] * bsums[g];
    }
    *s1 = a;
    *s2 = m;
}

#ifdef OFFLOAD_X86
static inline TARGET_AVX2 int32_t hsum_epi32_avx2(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm_cvtsi128_si32(s);
}

static TARGET_AVX2 void block_ints_avx2(const decoded_block *b, const int8_t *q8, const int16_t *bsums, int32_t *s1,
                                        int32_t *s2) {
    /* |q| <= 32, so maddubs(|q|, sign(q8, q)) cannot saturate (2 * 32 * 128 < 32768). */
    const __m256i scales = _mm256_loadu_si256((const __m256i *)b->sc);
    __m256i acc = _mm256_setzero_si256();
    for (int c = 0; c < 8; c++) {
        const __m256i w = _mm256_loadu_si256((const __m256i *)(b->q + 32 * c));
        const __m256i x = _mm256_loadu_si256((const __m256i *)(q8 + 32 * c));
        const __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
        /* int16 lanes 0..7 are values 0..15 of the chunk (scale sc[2c]), 8..15 values 16..31 */
        const __m256i s = _mm256_permutevar8x32_epi32(scales, _mm256_setr_epi32(c, c, c, c, c, c, c, c));
        const __m256i sc = _mm256_shuffle_epi8(s, _mm256_setr_epi8(0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1,
                                                                   2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3));
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(p, sc));
    }
    *s1 = hsum_epi32_avx2(acc);
    *s2 = hsum_epi32_avx2(_mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)b->mn),
                                            _mm256_loadu_si256((const __m256i *)bsums)));
}
#endif

typedef void (*block_ints_fn)(const decoded_block *, const int8_t *, const int16_t *, int32_t *, int32_t *);

int tiled_matmul(const char *name, const uint8_t *w, const int8_t *xq, const float *xd, const int16_t *bsums,
                 float *out, ptrdiff_t n_rows, int n_cols, ptrdiff_t n_tokens, int use_avx2) {
    const tiled_format *f = NULL;
    for (size_t i = 0; i < sizeof(tiled_formats) / sizeof(tiled_formats[0]); i++)
        if (strcmp(tiled_formats[i].name, name) == 0) f = &tiled_formats[i];
    if (!f) return -1;
    block_ints_fn ints = block_ints_portable;
#ifdef OFFLOAD_X86
    if (use_avx2) ints = block_ints_avx2;
#else
    (void)use_avx2;
#endif
    const int nb = n_cols / QK_K;
    const size_t row_bytes = (size_t)nb * f->block_bytes;
    const ptrdiff_t n_tiles = (n_rows + ROW_TILE - 1) / ROW_TILE;
    int failed = 0;
#pragma omp parallel
    {
        decoded_block *rows = malloc(sizeof(decoded_block) * ROW_TILE * (size_t)nb);
        if (!rows) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (ptrdiff_t tile = 0; tile < n_tiles; tile++) {
            if (!rows) continue;
            const ptrdiff_t r0 = tile * ROW_TILE, r1 = r0 + ROW_TILE < n_rows ? r0 + ROW_TILE : n_rows;
            for (ptrdiff_t r = r0; r < r1; r++)
                for (int b = 0; b < nb; b++) f->decode(w + (size_t)r * row_bytes + (size_t)b * f->block_bytes, rows + (r - r0) * nb + b);
            for (ptrdiff_t t0 = 0; t0 < n_tokens; t0 += TOKEN_TILE) {
                const ptrdiff_t t1 = t0 + TOKEN_TILE < n_tokens ? t0 + TOKEN_TILE : n_tokens;
                for (ptrdiff_t r = r0; r < r1; r++) {
                    const decoded_block *row = rows + (r - r0) * nb;
                    for (ptrdiff_t t = t0; t < t1; t++) {
                        const int8_t *q8 = xq + t * n_cols;
                        const float *d8 = xd + t * nb;
                        const int16_t *bs = bsums + t * (n_cols / 16);
                        float acc = 0.0f;
                        for (int b = 0; b < nb; b++) {
                            int32_t s1, s2;
                            ints(row + b, q8 + b * QK_K, bs + b * 16, &s1, &s2);
                            float res = row[b].d * (float)s1;
                            if (f->has_min) res = fmaf(-row[b].dmin, (float)s2, res);
                            acc = fmaf(res, d8[b], acc);
                        }
                        out[t * n_rows + r] = acc;
                    }
                }
            }
        }
        free(rows);
    }
    return failed ? -2 : 0;
}
