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
#define TOKEN_TILE 16

typedef struct {
    int8_t q[QK_K];     /* quants, signed as they enter the value: Q6_K q - 32, Q3_K low - 4*!high, ... */
    int16_t sc[16];     /* scale of each 16 values (formats with 32-value sub-blocks repeat it) */
    int16_t mn[16];     /* min of each 16 values; zero for formats without mins */
    float d, dmin;
} decoded_block;

/* What the integer kernels read: the quants made unsigned (q + bias, 0..63) so that they
 * enter maddubs as they are, with the bias taken back through the activations' sums:
 *   s1 = sum_g sc[g] * (u . q8)_g - sum_g bias * sc[g] * bsum_g,   s2 = sum_g mn[g] * bsum_g.
 * corr[g] is mn[g] for formats with mins (bias 0), else bias * sc[g]; `lanes` holds the
 * scales as maddubs' int16 lanes of each 32-value chunk c: sc[2c] x 8, then sc[2c+1] x 8. */
typedef struct {
    uint8_t u[QK_K];
    int16_t lanes[8][16];
    int16_t corr[16];
    float d, dmin;
} packed_block;

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
    int bias;  /* added to the signed quants to make them unsigned (0 for formats with mins) */
    decode_fn decode;
} tiled_format;

static const tiled_format tiled_formats[] = {
    {"Q2_K", 84, 1, 0, decode_q2_k},  {"Q3_K", 110, 0, 4, decode_q3_k}, {"Q4_K", 144, 1, 0, decode_q4_k},
    {"Q5_K", 176, 1, 0, decode_q5_k}, {"Q6_K", 210, 0, 32, decode_q6_k},
};

static const tiled_format *find_tiled(const char *name) {
    for (size_t i = 0; i < sizeof(tiled_formats) / sizeof(tiled_formats[0]); i++)
        if (strcmp(tiled_formats[i].name, name) == 0) return &tiled_formats[i];
    return NULL;
}

int tiled_block_bytes(const char *name, int *has_min) {
    const tiled_format *f = find_tiled(name);
    if (f && has_min) *has_min = f->has_min;
    return f ? f->block_bytes : 0;
}

static void pack_block(const tiled_format *f, const uint8_t *blk, packed_block *o) {
    decoded_block b;
    f->decode(blk, &b);
    for (int e = 0; e < QK_K; e++) o->u[e] = (uint8_t)(b.q[e] + f->bias);
    for (int c = 0; c < 8; c++)
        for (int i = 0; i < 8; i++) o->lanes[c][i] = b.sc[2 * c], o->lanes[c][8 + i] = b.sc[2 * c + 1];
    for (int g = 0; g < 16; g++) o->corr[g] = (int16_t)(f->has_min ? b.mn[g] : f->bias * b.sc[g]);
    o->d = b.d;
    o->dmin = b.dmin;
}

/* Rows r0 .. r1 - 1 of w, every block packed, into rows[(r - r0) * nb + b]. */
static void pack_rows(const tiled_format *f, const uint8_t *w, size_t row_bytes, ptrdiff_t r0, ptrdiff_t r1, int nb,
                      packed_block *rows) {
    for (ptrdiff_t r = r0; r < r1; r++)
        for (int b = 0; b < nb; b++)
            pack_block(f, w + (size_t)r * row_bytes + (size_t)b * f->block_bytes, rows + (r - r0) * nb + b);
}

/* ggml's float steps for one block's integers (see the top of the file). */
#define BLOCK_FLOATS(has_min, b, raw, corr, xd, acc)                            \
    do {                                                                       \
        float res_ = (b)->d * (float)((has_min) ? (raw) : (raw) - (corr));      \
        if (has_min) res_ = fmaf(-(b)->dmin, (float)(corr), res_);              \
        (acc) = fmaf(res_, (xd), (acc));                                       \
    } while (0)

/* One packed row against one token, plain C: (u . q8) per 16 values and the correction. */
static float row_token_portable(int has_min, const packed_block *row, int nb, const int8_t *q8, const float *xd,
                                const int16_t *bsums) {
    float acc = 0.0f;
    for (int b = 0; b < nb; b++) {
        const packed_block *p = row + b;
        int32_t raw = 0, corr = 0;
        for (int g = 0; g < 16; g++) {
            int32_t dot = 0;
            for (int e = 0; e < 16; e++) dot += (int32_t)p->u[16 * g + e] * q8[QK_K * b + 16 * g + e];
            raw += p->lanes[g / 2][8 * (g % 2)] * dot;
            corr += p->corr[g] * bsums[16 * b + g];
        }
        BLOCK_FLOATS(has_min, p, raw, corr, xd[b], acc);
    }
    return acc;
}

#ifdef OFFLOAD_X86
/* Four int32 lanes of v's eight, summed pairwise across halves (an exact partial sum). */
static inline TARGET_AVX2 __m128i fold(__m256i v) {
    return _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
}

/* The exact sums of four folded vectors, one per int32 lane. */
static inline TARGET_AVX2 __m128i hsum4(__m128i a, __m128i b, __m128i c, __m128i d) {
    return _mm_hadd_epi32(_mm_hadd_epi32(a, b), _mm_hadd_epi32(c, d));
}

/* ROWS packed rows (1 or 2) against four tokens t..t+3, every block; out[(t+k)*n_rows + r+i].
 * maddubs(u, q8) cannot saturate: 2 * 63 * 128 < 32768. */
#define DEFINE_MICRO(ROWS)                                                                                 \
    static TARGET_AVX2 void micro_##ROWS##x4(int has_min, const packed_block *const *rows, int nb,          \
                                             const int8_t *xq, const float *xd, const int16_t *bsums,      \
                                             float *out, ptrdiff_t r, ptrdiff_t n_rows, int n_cols,        \
                                             ptrdiff_t t) {                                                \
        float acc[ROWS][4] = {{0.0f}};                                                                     \
        const int nb16 = n_cols / 16;                                                                      \
        for (int b = 0; b < nb; b++) {                                                                     \
            __m256i sum[ROWS][4];                                                                          \
            for (int i = 0; i < ROWS; i++)                                                                 \
                for (int k = 0; k < 4; k++) sum[i][k] = _mm256_setzero_si256();                            \
            const int8_t *x = xq + t * n_cols + b * QK_K;                                                  \
            for (int c = 0; c < 8; c++) {                                                                  \
                __m256i w[ROWS], sc[ROWS];                                                                 \
                for (int i = 0; i < ROWS; i++) {                                                           \
                    w[i] = _mm256_loadu_si256((const __m256i *)(rows[i][b].u + 32 * c));                   \
                    sc[i] = _mm256_loadu_si256((const __m256i *)rows[i][b].lanes[c]);                      \
                }                                                                                          \
                for (int k = 0; k < 4; k++) {                                                              \
                    const __m256i xk = _mm256_loadu_si256((const __m256i *)(x + k * n_cols + 32 * c));     \
                    for (int i = 0; i < ROWS; i++)                                                         \
                        sum[i][k] = _mm256_add_epi32(sum[i][k],                                            \
                                                     _mm256_madd_epi16(_mm256_maddubs_epi16(w[i], xk), sc[i])); \
                }                                                                                          \
            }                                                                                              \
            for (int i = 0; i < ROWS; i++) {                                                               \
                const packed_block *p = rows[i] + b;                                                       \
                const __m256i corr = _mm256_loadu_si256((const __m256i *)p->corr);                         \
                __m128i m[4];                                                                              \
                for (int k = 0; k < 4; k++)                                                                \
                    m[k] = fold(_mm256_madd_epi16(corr, _mm256_loadu_si256(                                \
                        (const __m256i *)(bsums + (t + k) * nb16 + 16 * b))));                             \
                int32_t raw[4], cor[4];                                                                    \
                _mm_storeu_si128((__m128i *)raw, hsum4(fold(sum[i][0]), fold(sum[i][1]), fold(sum[i][2]),  \
                                                       fold(sum[i][3])));                                  \
                _mm_storeu_si128((__m128i *)cor, hsum4(m[0], m[1], m[2], m[3]));                           \
                for (int k = 0; k < 4; k++) BLOCK_FLOATS(has_min, p, raw[k], cor[k], xd[(t + k) * nb + b], acc[i][k]); \
            }                                                                                              \
        }                                                                                                  \
        for (int i = 0; i < ROWS; i++)                                                                     \
            for (int k = 0; k < 4; k++) out[(t + k) * n_rows + r + i] = acc[i][k];                        \
    }
DEFINE_MICRO(1)
DEFINE_MICRO(2)
#endif


#ifdef OFFLOAD_X86
/* AVX-512 VNNI: sixteen tokens in the lanes of one register, as ggml's own tiled kernel.
 * Activations of a 16-token tile are packed so that one 64-byte load holds four
 * consecutive int8 values of each token ([block][4-value group][token][4]); vpdpbusd
 * multiplies them by four unsigned weights broadcast from a row and adds each token's four
 * products into its int32 lane. Per 16 values the lane sums are scaled (vpmulld) into s1;
 * the correction sum_g corr[g] * bsum_g comes from vpdpwssd on bsums packed as int16
 * pairs ([block][pair][token][2]). The float steps then run on 16 tokens at once, lane by
 * lane the same operations as the scalar code, so the bits are the same. */
typedef struct {
    int8_t *q;     /* [nb][64][16][4] */
    int16_t *bs;   /* [nb][8][16][2] */
    float *d;      /* [nb][16] */
} packed_tokens;

static void pack_tokens(const int8_t *xq, const float *xd, const int16_t *bsums, int n_cols, ptrdiff_t t0,
                        ptrdiff_t n_tokens, packed_tokens *p) {
    const int nb = n_cols / QK_K;
    for (int b = 0; b < nb; b++)
        for (int t = 0; t < 16; t++) {
            const ptrdiff_t tt = t0 + t;
            const int live = tt < n_tokens;
            for (int g4 = 0; g4 < 64; g4++)
                for (int j = 0; j < 4; j++)
                    p->q[((size_t)(b * 64 + g4) * 16 + t) * 4 + j] = live ? xq[tt * n_cols + b * QK_K + 4 * g4 + j] : 0;
            for (int gp = 0; gp < 8; gp++)
                for (int j = 0; j < 2; j++)
                    p->bs[((size_t)(b * 8 + gp) * 16 + t) * 2 + j] = live ? bsums[tt * (n_cols / 16) + 16 * b + 2 * gp + j] : 0;
            p->d[b * 16 + t] = live ? xd[tt * nb + b] : 0.0f;
        }
}

#define VNNI_ROWS 4

static TARGET_AVX512 void rows_x16_vnni(int has_min, const packed_block *const *rows, int n_r, int nb,
                                        const packed_tokens *p, float acc_out[VNNI_ROWS][16]) {
    __m512 acc[VNNI_ROWS];
    for (int i = 0; i < VNNI_ROWS; i++) acc[i] = _mm512_setzero_ps();
    for (int b = 0; b < nb; b++) {
        __m512i s1[VNNI_ROWS], corr[VNNI_ROWS];
        for (int i = 0; i < VNNI_ROWS; i++) s1[i] = corr[i] = _mm512_setzero_si512();
        for (int g = 0; g < 16; g++) {
            __m512i raw[VNNI_ROWS];
            for (int i = 0; i < VNNI_ROWS; i++) raw[i] = _mm512_setzero_si512();
            for (int j = 0; j < 4; j++) {
                const __m512i a = _mm512_loadu_si512(p->q + ((size_t)(b * 64 + 4 * g + j) * 64));
                for (int i = 0; i < VNNI_ROWS; i++) {
                    if (i >= n_r) break;
                    int32_t w4;
                    memcpy(&w4, rows[i][b].u + 16 * g + 4 * j, 4);
                    raw[i] = _mm512_dpbusd_epi32(raw[i], _mm512_set1_epi32(w4), a);
                }
            }
            for (int i = 0; i < VNNI_ROWS && i < n_r; i++)
                s1[i] = _mm512_add_epi32(s1[i], _mm512_mullo_epi32(raw[i], _mm512_set1_epi32(rows[i][b].lanes[g / 2][8 * (g % 2)])));
        }
        for (int gp = 0; gp < 8; gp++) {
            const __m512i bs = _mm512_loadu_si512(p->bs + (size_t)(b * 8 + gp) * 32);
            for (int i = 0; i < VNNI_ROWS && i < n_r; i++) {
                int32_t pair;
                memcpy(&pair, rows[i][b].corr + 2 * gp, 4);
                corr[i] = _mm512_dpwssd_epi32(corr[i], _mm512_set1_epi32(pair), bs);
            }
        }
        const __m512 xd = _mm512_loadu_ps(p->d + b * 16);
        for (int i = 0; i < VNNI_ROWS && i < n_r; i++) {
            const packed_block *pb = rows[i] + b;
            __m512 res;
            if (has_min) {
                res = _mm512_mul_ps(_mm512_set1_ps(pb->d), _mm512_cvtepi32_ps(s1[i]));
                res = _mm512_fnmadd_ps(_mm512_set1_ps(pb->dmin), _mm512_cvtepi32_ps(corr[i]), res);
            } else {
                res = _mm512_mul_ps(_mm512_set1_ps(pb->d), _mm512_cvtepi32_ps(_mm512_sub_epi32(s1[i], corr[i])));
            }
            acc[i] = _mm512_fmadd_ps(res, xd, acc[i]);
        }
    }
    for (int i = 0; i < VNNI_ROWS && i < n_r; i++) _mm512_storeu_ps(acc_out[i], acc[i]);
}

static int tiled_matmul_vnni(const tiled_format *f, const uint8_t *w, const int8_t *xq, const float *xd,
                             const int16_t *bsums, float *out, ptrdiff_t n_rows, int n_cols, ptrdiff_t n_tokens) {
    const int nb = n_cols / QK_K;
    const size_t row_bytes = (size_t)nb * f->block_bytes;
    const ptrdiff_t n_ttiles = (n_tokens + 15) / 16, n_rtiles = (n_rows + ROW_TILE - 1) / ROW_TILE;
    /* every token tile packed once, up front (both threads read all of them) */
    int8_t *q = aligned_alloc(64, (size_t)n_ttiles * nb * 64 * 64);
    int16_t *bs = aligned_alloc(64, (size_t)n_ttiles * nb * 8 * 64);
    float *d = aligned_alloc(64, (size_t)n_ttiles * nb * 64);
    int failed = !q || !bs || !d;
    if (!failed) {
#pragma omp parallel for schedule(static)
        for (ptrdiff_t tt = 0; tt < n_ttiles; tt++) {
            packed_tokens p = {q + (size_t)tt * nb * 4096, bs + (size_t)tt * nb * 256, d + (size_t)tt * nb * 16};
            pack_tokens(xq, xd, bsums, n_cols, 16 * tt, n_tokens, &p);
        }
#pragma omp parallel
        {
            packed_block *rows = malloc(sizeof(packed_block) * ROW_TILE * (size_t)nb);
            if (!rows) {
#pragma omp atomic write
                failed = 1;
            }
#pragma omp for schedule(static)
            for (ptrdiff_t tile = 0; tile < n_rtiles; tile++) {
                if (!rows) continue;
                const ptrdiff_t r0 = tile * ROW_TILE, r1 = r0 + ROW_TILE < n_rows ? r0 + ROW_TILE : n_rows;
                pack_rows(f, w, row_bytes, r0, r1, nb, rows);
                for (ptrdiff_t tt = 0; tt < n_ttiles; tt++) {
                    const packed_tokens p = {q + (size_t)tt * nb * 4096, bs + (size_t)tt * nb * 256, d + (size_t)tt * nb * 16};
                    for (ptrdiff_t r = r0; r < r1; r += VNNI_ROWS) {
                        const int n_r = r1 - r < VNNI_ROWS ? (int)(r1 - r) : VNNI_ROWS;
                        const packed_block *group[VNNI_ROWS];
                        for (int i = 0; i < VNNI_ROWS; i++) group[i] = rows + (r + (i < n_r ? i : 0) - r0) * nb;
                        float acc[VNNI_ROWS][16];
                        rows_x16_vnni(f->has_min, group, n_r, nb, &p, acc);
                        for (int i = 0; i < n_r; i++)
                            for (int t = 0; t < 16 && 16 * tt + t < n_tokens; t++) out[(16 * tt + t) * n_rows + r + i] = acc[i][t];
                    }
                }
            }
            free(rows);
        }
    }
    free(q);
    free(bs);
    free(d);
    return failed ? -2 : 0;
}
#endif

int tiled_matmul(const char *name, const uint8_t *w, const int8_t *xq, const float *xd, const int16_t *bsums,
                 float *out, ptrdiff_t n_rows, int n_cols, ptrdiff_t n_tokens, int isa_level) {
    const tiled_format *f = find_tiled(name);
    if (!f) return -1;
#ifndef OFFLOAD_X86
    isa_level = 0;
#else
    if (isa_level >= 2) return tiled_matmul_vnni(f, w, xq, xd, bsums, out, n_rows, n_cols, n_tokens);
#endif
    const int use_avx2 = isa_level >= 1;
    const int nb = n_cols / QK_K, nb16 = n_cols / 16;
    const size_t row_bytes = (size_t)nb * f->block_bytes;
    const ptrdiff_t n_tiles = (n_rows + ROW_TILE - 1) / ROW_TILE;
    int failed = 0;
#pragma omp parallel
    {
        packed_block *rows = malloc(sizeof(packed_block) * ROW_TILE * (size_t)nb);
        if (!rows) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (ptrdiff_t tile = 0; tile < n_tiles; tile++) {
            if (!rows) continue;
            const ptrdiff_t r0 = tile * ROW_TILE, r1 = r0 + ROW_TILE < n_rows ? r0 + ROW_TILE : n_rows;
            pack_rows(f, w, row_bytes, r0, r1, nb, rows);
            for (ptrdiff_t t0 = 0; t0 < n_tokens; t0 += TOKEN_TILE) {
                const ptrdiff_t t1 = t0 + TOKEN_TILE < n_tokens ? t0 + TOKEN_TILE : n_tokens;
                ptrdiff_t t = t0;
#ifdef OFFLOAD_X86
                if (use_avx2) {
                    for (; t + 4 <= t1; t += 4) {
                        ptrdiff_t r = r0;
                        for (; r + 2 <= r1; r += 2) {
                            const packed_block *pair[2] = {rows + (r - r0) * nb, rows + (r + 1 - r0) * nb};
                            micro_2x4(f->has_min, pair, nb, xq, xd, bsums, out, r, n_rows, n_cols, t);
                        }
                        if (r < r1) {
                            const packed_block *one[1] = {rows + (r - r0) * nb};
                            micro_1x4(f->has_min, one, nb, xq, xd, bsums, out, r, n_rows, n_cols, t);
                        }
                    }
                }
#endif
                for (; t < t1; t++)
                    for (ptrdiff_t r = r0; r < r1; r++)
                        out[t * n_rows + r] = row_token_portable(f->has_min, rows + (r - r0) * nb, nb, xq + t * n_cols,
                                                                 xd + t * nb, bsums + t * nb16);
            }
        }
        free(rows);
    }
    return failed ? -2 : 0;
}
