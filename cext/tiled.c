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
 * The integer sums are exact, so any order and width gives them; only the float steps
 * above are kept as they are, in every path. A weight block is decoded once per call and
 * run against all tokens. Three paths:
 *   AVX2 (tiled_matmul_avx2): rows decoded in pairs with AVX2 into `pair_block`; a 2-row x
 *     4-token micro-kernel (maddubs/maddwd, the block's eight sums transposed into one
 *     vector, the float steps on eight lanes at once); tiles of row pairs shared out
 *     dynamically across threads.
 *   AVX-512 VNNI (tiled_matmul_vnni): 16 tokens in the lanes (vpdpbusd), rows decoded by
 *     the AVX2 decoders into `packed_block`.
 *   portable: `decoded_block` (plain C decoders) -> `packed_block`, one row x one token.
 * Buffers are kept per thread from call to call.
 */
#include <math.h>
#include <omp.h>
#include <stdlib.h>

#include "iq_grid.h"
#include "kernels.h"
#include "tiled.h"

#define QK_K 256
#define ROW_TILE 16
#define TOKEN_TILE 16
#define INLINE static inline __attribute__((always_inline))

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
INLINE void scales_mins_k4(const uint8_t *b, decoded_block *o) {
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
INLINE void decode_q4_k(const uint8_t *blk, decoded_block *o) {
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
INLINE void decode_q5_k(const uint8_t *blk, decoded_block *o) {
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
INLINE void decode_q6_k(const uint8_t *blk, decoded_block *o) {
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
INLINE void decode_q3_k(const uint8_t *blk, decoded_block *o) {
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
INLINE void decode_q2_k(const uint8_t *blk, decoded_block *o) {
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

/* The grid I-quants (iq_grid.c): signed values -62..62 (IQ1: -9..9), 2 ls + 1 per 16 values, no mins. */
#define DEFINE_DECODE_IQ(NAME, name, scale)                 \
    INLINE void decode_##name(const uint8_t *blk, decoded_block *o) { \
        iq_tiled_##name(blk, o->q, o->sc, &o->d);           \
        memset(o->mn, 0, sizeof(o->mn));                    \
        o->dmin = 0.0f;                                     \
    }
IQ_GRID_TILED(DEFINE_DECODE_IQ)

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
    /* the grid I-quants, made unsigned by + 64 (<= 126: maddubs still cannot saturate) */
    {"IQ2_XXS", 66, 0, 64, decode_iq2_xxs}, {"IQ2_XS", 74, 0, 64, decode_iq2_xs}, {"IQ2_S", 82, 0, 64, decode_iq2_s},
    {"IQ3_XXS", 98, 0, 64, decode_iq3_xxs}, {"IQ3_S", 110, 0, 64, decode_iq3_s}, {"IQ1_S", 50, 0, 64, decode_iq1_s},
    {"IQ1_M", 56, 0, 64, decode_iq1_m},
};

static const tiled_format *find_tiled(const char *name) {
    for (size_t i = 0; i < sizeof(tiled_formats) / sizeof(tiled_formats[0]); i++)
        if (strcmp(tiled_formats[i].name, name) == 0) return &tiled_formats[i];
    return NULL;
}

int tiled_block_bytes(const char *name, int *has_min) {
    if (strcmp(name, "IQ4_XS") == 0) return iq4_xs_tiled_bytes(has_min); /* its own kernel: iq4.c */
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

/* A buffer per thread kept from call to call (OpenMP's threads persist), grown when short:
 * no allocation and no fresh pages in the calls of a prompt. */
static void *thread_buffer(int which, size_t bytes) {
    static _Thread_local struct {
        void *p;
        size_t n;
    } held[2];
    if (held[which].n < bytes) {
        free(held[which].p);
        held[which].p = aligned_alloc(64, (bytes + 63) / 64 * 64);
        held[which].n = held[which].p ? bytes : 0;
    }
    return held[which].p;
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
/* AVX2: two weight rows x four tokens per micro-kernel, the per-block steps after the
 * integer dot products done on all eight (row, token) pairs at once.
 *
 * A row pair's block is decoded once per call into `pair_block`: the quants unsigned (the
 * formats without mins biased as in packed_block: Q3_K + 4, Q6_K + 32), so maddubs(u, x)
 * multiplies them by the signed activations (at most 2 * 63 * 128 < 32768: it cannot
 * saturate). Per 32-value chunk maddwd scales its int16 pair sums into int32 by a
 * broadcast dword of two scales, the first in the even int16 lanes and the second in the
 * odd ones; so the formats with a scale per 16 values (Q2_K, Q3_K, Q6_K) hold each chunk
 * interleaved, its two groups' values alternating in pairs (A0 A1 B0 B1 A2 A3 ...), quants
 * and activations alike. The 8 lane sums of each (row, token) are transposed into one
 * vector, row 0 x tokens 0..3 then row 1. The per-token correction
 *     s2 = sum_s mn[s] * bsum[s]          (formats with mins: per 32-value sub-block for
 *                                          Q4_K/Q5_K, per 16 values for Q2_K)
 *     s2 = sum_g bias * sc[g] * bsum[g]   (Q3_K, Q6_K: what the bias added to s1)
 * is one maddwd per pair of sub-blocks against the four tokens' bsums, laid out as int16
 * pairs ([block][pair][token][2]) once per call. */
typedef struct {
    uint8_t q[2][QK_K];
    int32_t sc[2][8];        /* chunk c: sc[2c] | sc[2c+1] << 16 (a 32-value sub-block's scale twice) */
    int32_t mn[8][8];        /* pair p of row i in lanes 4i..4i+3: corr[first] | corr[second] << 16 */
    float d[8], dmin[8];     /* row i in lanes 4i..4i+3 */
} pair_block;

/* The correction comes in pairs of 32-value sub-blocks (Q4_K, Q5_K) or of 16-value groups. */
#define PAIRS_32 4
#define PAIRS_16 8

/* Decoding into row i of a pair block: bytes are split with 16-bit shifts and byte masks
 * (the bits a shift moves across a byte boundary are masked off). */

/* sc[c] = sc | sc << 16 from eight scales (bytes) of 32-value sub-blocks. */
static inline TARGET_AVX2 void scales_32(__m128i sc8, int32_t sc[8]) {
    const __m128i words = _mm_cvtepu8_epi16(sc8);
    _mm_storeu_si128((__m128i *)sc, _mm_unpacklo_epi16(words, words));
    _mm_storeu_si128((__m128i *)(sc + 4), _mm_unpackhi_epi16(words, words));
}

/* A 32-value chunk of two 16-value groups A, B interleaved: A0 A1 B0 B1 A2 A3 B2 B3 ... */
static inline TARGET_AVX2 __m256i interleave(__m256i v) {
    const __m256i pairs = _mm256_setr_epi8(0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15, 0, 1, 8, 9, 2, 3, 10, 11,
                                           4, 5, 12, 13, 6, 7, 14, 15);
    return _mm256_shuffle_epi8(_mm256_permute4x64_epi64(v, 0xd8), pairs);
}

/* Chunk c of row i's quants, interleaved if ilv (for the AVX2 kernel), else in order. */
static inline TARGET_AVX2 void put_chunk(pair_block *o, int i, int c, __m256i v, int ilv) {
    _mm256_storeu_si256((__m256i *)(o->q[i] + 32 * c), ilv ? interleave(v) : v);
}

/* Four pairs of corrections, int16 pairs in the dwords of v, into mn[0..3] for row i. */
static inline TARGET_AVX2 void put_pairs4(int32_t (*mn)[8], int i, __m128i v) {
    _mm_storeu_si128((__m128i *)(mn[0] + 4 * i), _mm_shuffle_epi32(v, 0x00));
    _mm_storeu_si128((__m128i *)(mn[1] + 4 * i), _mm_shuffle_epi32(v, 0x55));
    _mm_storeu_si128((__m128i *)(mn[2] + 4 * i), _mm_shuffle_epi32(v, 0xaa));
    _mm_storeu_si128((__m128i *)(mn[3] + 4 * i), _mm_shuffle_epi32(v, 0xff));
}

/* Eight pairs: sixteen int16 corrections of 16-value groups. */
static inline TARGET_AVX2 void put_pairs8(int32_t (*mn)[8], int i, __m256i words) {
    put_pairs4(mn, i, _mm256_castsi256_si128(words));
    put_pairs4(mn + 4, i, _mm256_extracti128_si256(words, 1));
}

/* d (and dmin) from their f16 (F16C's conversion: exact, as ggml's AVX2 build converts). */
static inline TARGET_AVX2 void put_d(pair_block *o, int i, const uint8_t *d, const uint8_t *dmin) {
    _mm_storeu_ps(o->d + 4 * i, _mm_set1_ps(_cvtsh_ss(read_u16(d))));
    _mm_storeu_ps(o->dmin + 4 * i, dmin ? _mm_set1_ps(_cvtsh_ss(read_u16(dmin))) : _mm_setzero_ps());
}

/* get_scale_min_k4 on all eight sub-blocks at once: scales in bytes 0..7, mins in 8..15. */
static inline __m128i scales_mins_k4_v(const uint8_t *b) {
    uint32_t u[4];
    memcpy(u, b, 12);
    u[3] = ((u[2] >> 4) & 0x0f0f0f0f) | (((u[1] >> 6) & 0x03030303) << 4);
    const uint32_t mins_lo = u[1] & 0x3f3f3f3f;
    u[1] = (u[2] & 0x0f0f0f0f) | (((u[0] >> 6) & 0x03030303) << 4);
    u[2] = mins_lo;
    u[0] &= 0x3f3f3f3f;
    return _mm_loadu_si128((const __m128i *)u);
}

static inline TARGET_AVX2 void put_k4_scales(const uint8_t *blk, pair_block *o, int i) {
    const __m128i sm = scales_mins_k4_v(blk + 4);
    scales_32(sm, o->sc[i]);
    put_pairs4(o->mn, i, _mm_cvtepu8_epi16(_mm_srli_si128(sm, 8)));
    put_d(o, i, blk, blk + 2);
}

static inline TARGET_AVX2 void put_q4_k(const uint8_t *blk, pair_block *o, int i, int ilv) {
    (void)ilv; /* one scale per chunk: nothing to interleave */
    const __m256i m4 = _mm256_set1_epi8(15);
    for (int j = 0; j < 4; j++) {
        const __m256i v = _mm256_loadu_si256((const __m256i *)(blk + 16 + 32 * j));
        _mm256_storeu_si256((__m256i *)(o->q[i] + 64 * j), _mm256_and_si256(v, m4));
        _mm256_storeu_si256((__m256i *)(o->q[i] + 64 * j + 32), _mm256_and_si256(_mm256_srli_epi16(v, 4), m4));
    }
    put_k4_scales(blk, o, i);
}

static inline TARGET_AVX2 void put_q5_k(const uint8_t *blk, pair_block *o, int i, int ilv) {
    (void)ilv;
    const __m256i m4 = _mm256_set1_epi8(15), one = _mm256_set1_epi8(1);
    __m256i h = _mm256_loadu_si256((const __m256i *)(blk + 16)); /* bit 2j (2j+1) of each byte: sub-block 2j (2j+1) */
    for (int j = 0; j < 4; j++) {
        const __m256i v = _mm256_loadu_si256((const __m256i *)(blk + 48 + 32 * j));
        const __m256i h0 = _mm256_slli_epi16(_mm256_and_si256(h, one), 4);
        const __m256i h1 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 1), one), 4);
        _mm256_storeu_si256((__m256i *)(o->q[i] + 64 * j), _mm256_or_si256(_mm256_and_si256(v, m4), h0));
        _mm256_storeu_si256((__m256i *)(o->q[i] + 64 * j + 32),
                            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(v, 4), m4), h1));
        h = _mm256_srli_epi16(h, 2);
    }
    put_k4_scales(blk, o, i);
}

/* Q6_K: the 6-bit codes as they are (q + 32); correction 32 * sc[g]. */
static inline TARGET_AVX2 void put_q6_k(const uint8_t *blk, pair_block *o, int i, int ilv) {
    const __m256i m4 = _mm256_set1_epi8(15), m2 = _mm256_set1_epi8(3 << 4);
    for (int half = 0; half < 2; half++) {
        const __m256i l0 = _mm256_loadu_si256((const __m256i *)(blk + 64 * half));
        const __m256i l1 = _mm256_loadu_si256((const __m256i *)(blk + 64 * half + 32));
        const __m256i qh = _mm256_loadu_si256((const __m256i *)(blk + 128 + 32 * half));
        /* bits 2k, 2k+1 of qh to bits 4, 5 */
        const __m256i h0 = _mm256_and_si256(_mm256_slli_epi16(qh, 4), m2), h1 = _mm256_and_si256(_mm256_slli_epi16(qh, 2), m2);
        const __m256i h2 = _mm256_and_si256(qh, m2), h3 = _mm256_and_si256(_mm256_srli_epi16(qh, 2), m2);
        put_chunk(o, i, 4 * half, _mm256_or_si256(_mm256_and_si256(l0, m4), h0), ilv);
        put_chunk(o, i, 4 * half + 1, _mm256_or_si256(_mm256_and_si256(l1, m4), h1), ilv);
        put_chunk(o, i, 4 * half + 2, _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4), h2), ilv);
        put_chunk(o, i, 4 * half + 3, _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4), h3), ilv);
    }
    const __m256i sc = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(blk + 192)));
    _mm256_storeu_si256((__m256i *)o->sc[i], sc); /* dword c: sc[2c], sc[2c+1] */
    put_pairs8(o->mn, i, _mm256_slli_epi16(sc, 5));
    put_d(o, i, blk + 208, NULL);
}

/* Q3_K: low 2 bits | high bit << 2 (q + 4); correction 4 * sc[g]. */
static inline TARGET_AVX2 void put_q3_k(const uint8_t *blk, pair_block *o, int i, int ilv) {
    const __m256i m2 = _mm256_set1_epi8(3), one = _mm256_set1_epi8(1);
    __m256i h = _mm256_loadu_si256((const __m256i *)blk); /* bit 4j+k: values 32k.. of half j */
    for (int j = 0; j < 2; j++) {
        __m256i v = _mm256_loadu_si256((const __m256i *)(blk + 32 + 32 * j));
        for (int k = 0; k < 4; k++) {
            const __m256i high = _mm256_slli_epi16(_mm256_and_si256(h, one), 2);
            put_chunk(o, i, 4 * j + k, _mm256_or_si256(_mm256_and_si256(v, m2), high), ilv);
            v = _mm256_srli_epi16(v, 2);
            h = _mm256_srli_epi16(h, 1);
        }
    }
    /* sixteen 6-bit scales - 32: low nibbles in bytes 0..7 (two each), high pairs in 8..11 */
    uint32_t a[3], s[4];
    memcpy(a, blk + 96, 12);
    s[0] = (a[0] & 0x0f0f0f0f) | ((a[2] & 0x03030303) << 4);
    s[1] = (a[1] & 0x0f0f0f0f) | (((a[2] >> 2) & 0x03030303) << 4);
    s[2] = ((a[0] >> 4) & 0x0f0f0f0f) | (((a[2] >> 4) & 0x03030303) << 4);
    s[3] = ((a[1] >> 4) & 0x0f0f0f0f) | (((a[2] >> 6) & 0x03030303) << 4);
    const __m256i sc = _mm256_cvtepi8_epi16(_mm_sub_epi8(_mm_loadu_si128((const __m128i *)s), _mm_set1_epi8(32)));
    _mm256_storeu_si256((__m256i *)o->sc[i], sc);
    put_pairs8(o->mn, i, _mm256_slli_epi16(sc, 2));
    put_d(o, i, blk + 108, NULL);
}

static inline TARGET_AVX2 void put_q2_k(const uint8_t *blk, pair_block *o, int i, int ilv) {
    const __m256i m2 = _mm256_set1_epi8(3);
    for (int j = 0; j < 2; j++) {
        __m256i v = _mm256_loadu_si256((const __m256i *)(blk + 16 + 32 * j));
        for (int k = 0; k < 4; k++) {
            put_chunk(o, i, 4 * j + k, _mm256_and_si256(v, m2), ilv);
            v = _mm256_srli_epi16(v, 2);
        }
    }
    const __m128i sm = _mm_loadu_si128((const __m128i *)blk), m4 = _mm_set1_epi8(15);
    _mm256_storeu_si256((__m256i *)o->sc[i], _mm256_cvtepu8_epi16(_mm_and_si128(sm, m4)));
    put_pairs8(o->mn, i, _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(sm, 4), m4)));
    put_d(o, i, blk + 80, blk + 82);
}

/* The grid I-quants through their plain decoding: the values + 64, scales per 16 values,
 * correction 64 * sc[g]. */
static inline TARGET_AVX2 void put_decoded(const decoded_block *b, pair_block *o, int i, int ilv) {
    const __m256i bias = _mm256_set1_epi8(64);
    for (int c = 0; c < 8; c++)
        put_chunk(o, i, c, _mm256_add_epi8(_mm256_loadu_si256((const __m256i *)(b->q + 32 * c)), bias), ilv);
    const __m256i sc = _mm256_loadu_si256((const __m256i *)b->sc);
    _mm256_storeu_si256((__m256i *)o->sc[i], sc); /* dword c: sc[2c], sc[2c+1] */
    put_pairs8(o->mn, i, _mm256_slli_epi16(sc, 6));
    _mm_storeu_ps(o->d + 4 * i, _mm_set1_ps(b->d));
    _mm_storeu_ps(o->dmin + 4 * i, _mm_setzero_ps());
}

#define DEFINE_PUT_IQ(NAME, name, scale)                                                      \
    static inline TARGET_AVX2 void put_##name(const uint8_t *blk, pair_block *o, int i, int ilv) { \
        decoded_block b;                                                                      \
        decode_##name(blk, &b);                                                               \
        put_decoded(&b, o, i, ilv);                                                           \
    }
IQ_GRID_TILED(DEFINE_PUT_IQ)

/* Every block of rows row0 and row1 (nb blocks of `bytes`) into o[0 .. nb-1]. */
#define DEFINE_PACK_PAIR(name, bytes)                                                                 \
    static TARGET_AVX2 void pack_pair_##name(const uint8_t *row0, const uint8_t *row1, int nb, pair_block *o) { \
        for (int b = 0; b < nb; b++) {                                                                \
            put_##name(row0 + (size_t)b * (bytes), o + b, 0, 1);                                      \
            put_##name(row1 + (size_t)b * (bytes), o + b, 1, 1);                                      \
        }                                                                                             \
    }
DEFINE_PACK_PAIR(q2_k, 84)
DEFINE_PACK_PAIR(q3_k, 110)
DEFINE_PACK_PAIR(q4_k, 144)
DEFINE_PACK_PAIR(q5_k, 176)
DEFINE_PACK_PAIR(q6_k, 210)
DEFINE_PACK_PAIR(iq2_xxs, 66)
DEFINE_PACK_PAIR(iq2_xs, 74)
DEFINE_PACK_PAIR(iq2_s, 82)
DEFINE_PACK_PAIR(iq3_xxs, 98)
DEFINE_PACK_PAIR(iq3_s, 110)
DEFINE_PACK_PAIR(iq1_s, 50)
DEFINE_PACK_PAIR(iq1_m, 56)

/* The portable and AVX-512 layout (packed_block) through the same decoding, for the AVX-512
 * path: row 0 of a pair block decoded without interleaving holds its quants as they are,
 * its scales give the lanes and its correction pairs corr per 16 values. Byte for byte what pack_block makes (the d and dmin of a
 * NaN f16 aside, whose quiet bit F16C sets). */
static inline TARGET_AVX2 void pair_to_packed(const pair_block *t, int pairs, packed_block *o) {
    for (int c = 0; c < 8; c++) {
        _mm256_storeu_si256((__m256i *)(o->u + 32 * c), _mm256_loadu_si256((const __m256i *)(t->q[0] + 32 * c)));
        const __m256i sc = _mm256_set1_epi32(t->sc[0][c]); /* lanes: sc[2c] x 8, sc[2c+1] x 8 */
        _mm256_storeu_si256((__m256i *)o->lanes[c], _mm256_permute4x64_epi64(_mm256_shuffle_epi8(sc, _mm256_setr_epi8(
            0, 1, 0, 1, 0, 1, 0, 1, 2, 3, 2, 3, 2, 3, 2, 3, 0, 1, 0, 1, 0, 1, 0, 1, 2, 3, 2, 3, 2, 3, 2, 3)), 0xd8));
    }
    for (int p = 0; p < pairs; p++) {
        const int16_t lo = (int16_t)(t->mn[p][0] & 0xffff), hi = (int16_t)((uint32_t)t->mn[p][0] >> 16);
        if (pairs == PAIRS_32) /* corr per 16 values: each sub-block's min twice */
            o->corr[4 * p] = o->corr[4 * p + 1] = lo, o->corr[4 * p + 2] = o->corr[4 * p + 3] = hi;
        else
            o->corr[2 * p] = lo, o->corr[2 * p + 1] = hi;
    }
    o->d = t->d[0];
    o->dmin = t->dmin[0];
}

/* Rows r0 .. r1 - 1 of w, every block, into rows[(r - r0) * nb + b] (as pack_rows). */
#define DEFINE_PACK_ROWS(name, bytes, pairs)                                                            \
    static TARGET_AVX2 void pack_rows_##name(const uint8_t *w, size_t row_bytes, ptrdiff_t r0, ptrdiff_t r1, \
                                             int nb, packed_block *rows) {                              \
        pair_block t;                                                                                   \
        for (ptrdiff_t r = r0; r < r1; r++)                                                             \
            for (int b = 0; b < nb; b++) {                                                              \
                put_##name(w + (size_t)r * row_bytes + (size_t)b * (bytes), &t, 0, 0);                  \
                pair_to_packed(&t, pairs, rows + (r - r0) * nb + b);                                    \
            }                                                                                           \
    }
DEFINE_PACK_ROWS(q2_k, 84, PAIRS_16)
DEFINE_PACK_ROWS(q3_k, 110, PAIRS_16)
DEFINE_PACK_ROWS(q4_k, 144, PAIRS_32)
DEFINE_PACK_ROWS(q5_k, 176, PAIRS_32)
DEFINE_PACK_ROWS(q6_k, 210, PAIRS_16)
DEFINE_PACK_ROWS(iq2_xxs, 66, PAIRS_16)
DEFINE_PACK_ROWS(iq2_xs, 74, PAIRS_16)
DEFINE_PACK_ROWS(iq2_s, 82, PAIRS_16)
DEFINE_PACK_ROWS(iq3_xxs, 98, PAIRS_16)
DEFINE_PACK_ROWS(iq3_s, 110, PAIRS_16)
DEFINE_PACK_ROWS(iq1_s, 50, PAIRS_16)
DEFINE_PACK_ROWS(iq1_m, 56, PAIRS_16)

typedef void (*pack_rows_fn)(const uint8_t *w, size_t row_bytes, ptrdiff_t r0, ptrdiff_t r1, int nb, packed_block *rows);

typedef void (*pack_pair_fn)(const uint8_t *row0, const uint8_t *row1, int nb, pair_block *o);

static const struct {
    const char *name;
    pack_pair_fn pair;
    pack_rows_fn rows;
    int pairs;
} avx2_packers[] = {
    {"Q2_K", pack_pair_q2_k, pack_rows_q2_k, PAIRS_16}, {"Q3_K", pack_pair_q3_k, pack_rows_q3_k, PAIRS_16},
    {"Q4_K", pack_pair_q4_k, pack_rows_q4_k, PAIRS_32}, {"Q5_K", pack_pair_q5_k, pack_rows_q5_k, PAIRS_32},
    {"Q6_K", pack_pair_q6_k, pack_rows_q6_k, PAIRS_16},
    {"IQ2_XXS", pack_pair_iq2_xxs, pack_rows_iq2_xxs, PAIRS_16}, {"IQ2_XS", pack_pair_iq2_xs, pack_rows_iq2_xs, PAIRS_16},
    {"IQ2_S", pack_pair_iq2_s, pack_rows_iq2_s, PAIRS_16}, {"IQ3_XXS", pack_pair_iq3_xxs, pack_rows_iq3_xxs, PAIRS_16},
    {"IQ3_S", pack_pair_iq3_s, pack_rows_iq3_s, PAIRS_16}, {"IQ1_S", pack_pair_iq1_s, pack_rows_iq1_s, PAIRS_16},
    {"IQ1_M", pack_pair_iq1_m, pack_rows_iq1_m, PAIRS_16},
};

static int avx2_packer(const tiled_format *f) {
    for (int i = 0; i < (int)(sizeof(avx2_packers) / sizeof(avx2_packers[0])); i++)
        if (strcmp(avx2_packers[i].name, f->name) == 0) return i;
    return 0; /* not reached: every tiled format has one */
}

/* Four tokens' activations as the micro-kernel reads them (rows past n_tokens are zero). */
typedef struct {
    const int8_t *x;     /* [4][n_cols] */
    const float *d;      /* [nb][4] */
    const int16_t *bs;   /* [nb][pairs][4][2]: each token's bsums of the pair of sub-blocks */
} token_group;

/* Tokens 4g .. 4g+3 into their group (x: 4 * n_cols bytes, d: 4 * nb, bs: 8 * pairs * nb). */
static TARGET_AVX2 void pack_group(const int8_t *xq, const float *xd, const int16_t *bsums, int n_cols,
                                   ptrdiff_t n_tokens, ptrdiff_t g, int pairs, int8_t *x, float *d, int16_t *bs) {
    const int nb = n_cols / QK_K, nb16 = n_cols / 16;
    for (int k = 0; k < 4; k++) {
        const ptrdiff_t t = 4 * g + k;
        int8_t *xo = x + (size_t)k * n_cols;
        if (t >= n_tokens)
            memset(xo, 0, (size_t)n_cols);
        else if (pairs == PAIRS_32)
            memcpy(xo, xq + t * n_cols, (size_t)n_cols);
        else /* in the quants' interleaved order */
            for (int c = 0; c < n_cols; c += 32)
                _mm256_storeu_si256((__m256i *)(xo + c), interleave(_mm256_loadu_si256((const __m256i *)(xq + t * n_cols + c))));
        for (int b = 0; b < nb; b++) {
            d[4 * b + k] = t < n_tokens ? xd[t * nb + b] : 0.0f;
            const int16_t *s = bsums + t * nb16 + 16 * b;
            for (int p = 0; p < pairs; p++) {
                int16_t *o = bs + ((size_t)(b * pairs + p) * 4 + k) * 2;
                if (t >= n_tokens)
                    o[0] = o[1] = 0;
                else if (pairs == PAIRS_32) /* sums of 32 int8: they fit int16 */
                    o[0] = (int16_t)(s[4 * p] + s[4 * p + 1]), o[1] = (int16_t)(s[4 * p + 2] + s[4 * p + 3]);
                else
                    o[0] = s[2 * p], o[1] = s[2 * p + 1];
            }
        }
    }
}

/* An empty asm that the accumulators pass through, so that the compiler keeps them in
 * registers in this order instead of re-associating the sums (which spilled them all). */
#define KEEP(v) __asm__("" : "+x"(v))

/* One row pair against four tokens over every block: the float accumulators, row 0 x
 * tokens 0..3 then row 1. The float steps are ggml's, lane by lane. */
INLINE TARGET_AVX2 __m256 micro_2x4(int has_min, int pairs, const pair_block *pb, int nb, const token_group *tg,
                                    int n_cols) {
    __m256 acc = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const pair_block *p = pb + b;
        const int8_t *x = tg->x + b * QK_K;
        __m256i sum[2][4];
        for (int i = 0; i < 2; i++)
            for (int k = 0; k < 4; k++) sum[i][k] = _mm256_setzero_si256();
#pragma GCC unroll 8
        for (int c = 0; c < 8; c++) {
            const __m256i w0 = _mm256_loadu_si256((const __m256i *)(p->q[0] + 32 * c));
            const __m256i w1 = _mm256_loadu_si256((const __m256i *)(p->q[1] + 32 * c));
            const __m256i s0 = _mm256_set1_epi32(p->sc[0][c]), s1 = _mm256_set1_epi32(p->sc[1][c]);
            for (int k = 0; k < 4; k++) {
                const __m256i xk = _mm256_loadu_si256((const __m256i *)(x + (size_t)k * n_cols + 32 * c));
                sum[0][k] = _mm256_add_epi32(sum[0][k], _mm256_madd_epi16(_mm256_maddubs_epi16(w0, xk), s0));
                sum[1][k] = _mm256_add_epi32(sum[1][k], _mm256_madd_epi16(_mm256_maddubs_epi16(w1, xk), s1));
                KEEP(sum[0][k]);
                KEEP(sum[1][k]);
            }
        }
        /* the eight sums, lane 4i + k for row i and token k (exact integers) */
        const __m256i g0 = _mm256_hadd_epi32(_mm256_hadd_epi32(sum[0][0], sum[0][1]), _mm256_hadd_epi32(sum[0][2], sum[0][3]));
        const __m256i g1 = _mm256_hadd_epi32(_mm256_hadd_epi32(sum[1][0], sum[1][1]), _mm256_hadd_epi32(sum[1][2], sum[1][3]));
        const __m256i s1 = _mm256_add_epi32(_mm256_permute2x128_si256(g0, g1, 0x20), _mm256_permute2x128_si256(g0, g1, 0x31));
        __m256i s2 = _mm256_setzero_si256();
        for (int q = 0; q < pairs; q++) {
            const __m256i bs = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(tg->bs + (b * pairs + q) * 8)));
            s2 = _mm256_add_epi32(s2, _mm256_madd_epi16(bs, _mm256_loadu_si256((const __m256i *)p->mn[q])));
        }
        __m256 res;
        if (has_min) { /* res = d * float(s1); res = fma(-dmin, float(s2), res) */
            res = _mm256_mul_ps(_mm256_loadu_ps(p->d), _mm256_cvtepi32_ps(s1));
            res = _mm256_fnmadd_ps(_mm256_loadu_ps(p->dmin), _mm256_cvtepi32_ps(s2), res);
        } else { /* res = d * float(s1 - bias correction) */
            res = _mm256_mul_ps(_mm256_loadu_ps(p->d), _mm256_cvtepi32_ps(_mm256_sub_epi32(s1, s2)));
        }
        acc = _mm256_fmadd_ps(res, _mm256_broadcast_ps((const __m128 *)(tg->d + 4 * b)), acc); /* acc = fma(res, x.d, acc) */
    }
    return acc;
}

/* The micro-kernel compiled for each kind of format. */
#define DEFINE_RUN(name, has_min, pairs)                                                               \
    static TARGET_AVX2 void run_##name(const pair_block *pb, int nb, const token_group *tg, int n_cols, \
                                       float out[8]) {                                                 \
        _mm256_storeu_ps(out, micro_2x4(has_min, pairs, pb, nb, tg, n_cols));                          \
    }
DEFINE_RUN(min32, 1, PAIRS_32) /* Q4_K, Q5_K */
DEFINE_RUN(min16, 1, PAIRS_16) /* Q2_K */
DEFINE_RUN(bias16, 0, PAIRS_16) /* Q3_K, Q6_K */

typedef void (*run_fn)(const pair_block *pb, int nb, const token_group *tg, int n_cols, float out[8]);


/* Threads take tiles of row pairs as they come (a late or preempted thread leaves its
 * share to the others); each packs its tile once and runs it against every group of four
 * tokens, the group's activations (a few KB) staying in L1 while the tile's pairs stream
 * through. The calling thread packs the activations first (a copy of the input, about
 * 1/rows of the matmul's work): one barrier per call, the one that ends it. */
static int tiled_matmul_avx2(const tiled_format *f, const uint8_t *w, const int8_t *xq, const float *xd,
                             const int16_t *bsums, float *out, ptrdiff_t n_rows, int n_cols, ptrdiff_t n_tokens) {
    const int pk = avx2_packer(f), pairs = avx2_packers[pk].pairs;
    const pack_pair_fn pack = avx2_packers[pk].pair;
    const run_fn run = pairs == PAIRS_32 ? run_min32 : f->has_min ? run_min16 : run_bias16;
    const int nb = n_cols / QK_K;
    const size_t row_bytes = (size_t)nb * f->block_bytes;
    const ptrdiff_t n_groups = (n_tokens + 3) / 4, n_pairs = (n_rows + 1) / 2;
    const int threads = omp_get_max_threads();
    /* tiles of up to ROW_TILE rows, at least one per thread when the matrix is small */
    ptrdiff_t tile_pairs = (n_pairs + threads - 1) / threads;
    if (tile_pairs > ROW_TILE / 2) tile_pairs = ROW_TILE / 2;
    if (tile_pairs < 1) tile_pairs = 1;
    const ptrdiff_t n_tiles = (n_pairs + tile_pairs - 1) / tile_pairs;
    const size_t x_bytes = (size_t)n_groups * 4 * n_cols, d_bytes = (size_t)n_groups * nb * 16,
                 bs_bytes = (size_t)n_groups * nb * pairs * 16;
    uint8_t *act = thread_buffer(0, x_bytes + d_bytes + bs_bytes);
    if (!act) return -2;
    int8_t *ax = (int8_t *)act;
    float *ad = (float *)(act + x_bytes);
    int16_t *abs_ = (int16_t *)(act + x_bytes + d_bytes);
    for (ptrdiff_t g = 0; g < n_groups; g++)
        pack_group(xq, xd, bsums, n_cols, n_tokens, g, pairs, ax + (size_t)g * 4 * n_cols, ad + (size_t)g * nb * 4,
                   abs_ + (size_t)g * nb * pairs * 8);
    int failed = 0;
#pragma omp parallel
    {
        pair_block *tile = thread_buffer(1, sizeof(pair_block) * (size_t)tile_pairs * nb);
        if (!tile) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (ptrdiff_t ti = 0; ti < n_tiles; ti++) {
            if (!tile) continue;
            const ptrdiff_t p0 = ti * tile_pairs, p1 = p0 + tile_pairs < n_pairs ? p0 + tile_pairs : n_pairs;
            for (ptrdiff_t p = p0; p < p1; p++) {
                const uint8_t *row0 = w + (size_t)(2 * p) * row_bytes;
                const uint8_t *row1 = 2 * p + 1 < n_rows ? row0 + row_bytes : row0; /* an odd last row is run twice */
                pack(row0, row1, nb, tile + (p - p0) * nb);
            }
            for (ptrdiff_t g = 0; g < n_groups; g++) {
                const token_group tg = {ax + (size_t)g * 4 * n_cols, ad + (size_t)g * nb * 4, abs_ + (size_t)g * nb * pairs * 8};
                const int live = n_tokens - 4 * g < 4 ? (int)(n_tokens - 4 * g) : 4;
                for (ptrdiff_t p = p0; p < p1; p++) {
                    float o[8];
                    run(tile + (p - p0) * nb, nb, &tg, n_cols, o);
                    const int rows = 2 * p + 1 < n_rows ? 2 : 1;
                    for (int i = 0; i < rows; i++)
                        for (int k = 0; k < live; k++) out[(4 * g + k) * n_rows + 2 * p + i] = o[4 * i + k];
                }
            }
        }
    }
    return failed ? -2 : 0;
}
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
    const int nb = n_cols / QK_K, pk = avx2_packer(f);
    const size_t row_bytes = (size_t)nb * f->block_bytes;
    const ptrdiff_t n_ttiles = (n_tokens + 15) / 16, n_rtiles = (n_rows + ROW_TILE - 1) / ROW_TILE;
    /* every token tile packed once, up front (all threads read all of them) */
    const size_t q_bytes = (size_t)n_ttiles * nb * 64 * 64, bs_bytes = (size_t)n_ttiles * nb * 8 * 64;
    uint8_t *buf = thread_buffer(0, q_bytes + bs_bytes + (size_t)n_ttiles * nb * 64);
    if (!buf) return -2;
    int8_t *q = (int8_t *)buf;
    int16_t *bs = (int16_t *)(buf + q_bytes);
    float *d = (float *)(buf + q_bytes + bs_bytes);
    int failed = 0;
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (ptrdiff_t tt = 0; tt < n_ttiles; tt++) {
            packed_tokens p = {q + (size_t)tt * nb * 4096, bs + (size_t)tt * nb * 256, d + (size_t)tt * nb * 16};
            pack_tokens(xq, xd, bsums, n_cols, 16 * tt, n_tokens, &p);
        }
        packed_block *rows = thread_buffer(1, sizeof(packed_block) * ROW_TILE * (size_t)nb);
        if (!rows) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (ptrdiff_t tile = 0; tile < n_rtiles; tile++) {
            if (!rows) continue;
            const ptrdiff_t r0 = tile * ROW_TILE, r1 = r0 + ROW_TILE < n_rows ? r0 + ROW_TILE : n_rows;
            avx2_packers[pk].rows(w, row_bytes, r0, r1, nb, rows); /* the AVX2 decoding: same bytes as pack_rows */
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
    }
    return failed ? -2 : 0;
}
#endif

int tiled_matmul(const char *name, const uint8_t *w, const int8_t *xq, const float *xd, const int16_t *bsums,
                 float *out, ptrdiff_t n_rows, int n_cols, ptrdiff_t n_tokens, int isa_level) {
    if (strcmp(name, "IQ4_XS") == 0) return iq4_xs_tiled(w, xq, xd, out, n_rows, n_cols, n_tokens, isa_level);
    const tiled_format *f = find_tiled(name);
    if (!f) return -1;
#ifdef OFFLOAD_X86
    if (isa_level >= 2) return tiled_matmul_vnni(f, w, xq, xd, bsums, out, n_rows, n_cols, n_tokens);
    if (isa_level == 1) return tiled_matmul_avx2(f, w, xq, xd, bsums, out, n_rows, n_cols, n_tokens);
#else
    (void)isa_level;
#endif
    const int nb = n_cols / QK_K, nb16 = n_cols / 16;
    const size_t row_bytes = (size_t)nb * f->block_bytes;
    const ptrdiff_t n_tiles = (n_rows + ROW_TILE - 1) / ROW_TILE;
    int failed = 0;
#pragma omp parallel
    {
        packed_block *rows = thread_buffer(1, sizeof(packed_block) * ROW_TILE * (size_t)nb);
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
                for (ptrdiff_t t = t0; t < t1; t++)
                    for (ptrdiff_t r = r0; r < r1; r++)
                        out[t * n_rows + r] = row_token_portable(f->has_min, rows + (r - r0) * nb, nb, xq + t * n_cols,
                                                                 xd + t * nb, bsums + t * nb16);
            }
        }
    }
    return failed ? -2 : 0;
}
