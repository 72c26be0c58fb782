/* Flash attention as llama.cpp's CPU backend computes it (ggml-cpu/ops.cpp,
 * ggml_compute_forward_flash_attn_ext_f16), which is three kernels picked by the shape:
 *
 * - one chunk (the reference; every quantized K or V, or K and V of different types): per
 *   query, cells in order, the online softmax: s = vec_dot(K row, q converted to K's
 *   vec_dot_type) * scale; a new maximum rescales the sum S and the accumulator by
 *   expf(old - new), else the cell weighs expf(s - M); the accumulator is F16 for an F16 V
 *   (each step rounded: ggml_vec_mad_f16 / ggml_vec_scale_f16), else F32 over the
 *   dequantized row; S = S * ms + vs; a sink joins at the end; out = acc * (1 / S).
 * - tiled (K and V both F16, 64+ new tokens): cells in tiles of 64; a tile's scores are
 *   F32 dot products of the unrounded query with the F16 keys (one FMA chain over the head
 *   size: simd_gemm), the maximum taken per tile, the tile's exps ggml_v_expf with their sum
 *   in double (ggml_vec_soft_max_f32), the values added as FMA chains over the tile's cells.
 * - split (K and V both F16, one new token, a KV view of 512+ cells): the view cut into one
 *   chunk per thread, each a one-chunk pass (the sink in the first), then merged in chunk
 *   order (ggml_flash_attn_ext_reduce_partials).
 *
 * llama.cpp casts an F32 cache to F16 before its flash attention, so F32 rows are read
 * rounded to F16. Masked cells are skipped (one chunk, split) or weigh exp(-inf) = 0 (tiled),
 * as llama.cpp's F16 mask of 0 / -inf does. Scalar C: the exact orders first; the tiled
 * kernel's FMA chains vectorize across cells.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "attention.h"
#include "flash.h"
#include "floats.h"
#include "ggml_exp.h"
#include "quantize.h"

#define TILE_Q 64   /* GGML_FA_TILE_Q: from this many new tokens, the tiled kernel */
#define TILE_KV 64  /* GGML_FA_TILE_KV */
#define SPLIT_MIN 512

/* llama.cpp's C compiled with contraction: a*b + c as one FMA (checked against it by the tests) */
#define MUL_ADD(a, b, c) fmaf(a, b, c)

static inline float half_value(const uint8_t *row, int store, int d) {
    if (store == FLASH_F16) {
        uint16_t h;
        memcpy(&h, row + 2 * (size_t)d, 2);
        return fp16_to_fp32(h);
    }
    float f;
    memcpy(&f, row + 4 * (size_t)d, 4);
    return round_f16(f);
}

static inline float f16_at(const uint8_t *p) { return fp16_to_fp32(read_u16(p)); }

static inline float bf16_value(const uint8_t *row, int d) {
    const uint32_t u = (uint32_t)read_u16(row + 2 * (size_t)d) << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* GGML_FP32_TO_BF16 and back: nearest even, a NaN kept quiet */
static inline float round_bf16(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    u = (u & 0x7FFFFFFFu) > 0x7F800000u ? (u | 0x00400000u) & 0xFFFF0000u
                                        : ((u + (0x7FFFu + ((u >> 16) & 1u))) >> 16) << 16;
    memcpy(&x, &u, 4);
    return x;
}

/* the quantized V formats, resolved once per call */
enum value_kind { V_NONE = 0, V_Q8_0, V_Q4_0, V_Q4_1, V_Q5_0, V_Q5_1, V_IQ4_NL };

static int value_kind(const format_kernels *f) {
    static const char *const names[] = {"", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "IQ4_NL"};
    for (int k = 1; f && k < (int)(sizeof(names) / sizeof(names[0])); k++)
        if (!strcmp(f->name, names[k])) return k;
    return V_NONE;
}

/* ggml's dequantize_row_* of n values (whole blocks of 32) */
static inline __attribute__((always_inline)) void dequantize_body(int kind, size_t block_bytes, const uint8_t *b,
                                                                   float *y, int n) {
    static const int8_t kvalues[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};
    for (int i = 0; i < n / 32; i++, b += block_bytes, y += 32) {
        const float d = f16_at(b);
        switch (kind) {
        case V_Q8_0:
            for (int j = 0; j < 32; j++) y[j] = (float)(int8_t)b[2 + j] * d;
            break;
        case V_Q4_0:
            for (int j = 0; j < 16; j++) {
                y[j] = (float)((b[2 + j] & 0x0F) - 8) * d;
                y[j + 16] = (float)((b[2 + j] >> 4) - 8) * d;
            }
            break;
        case V_Q4_1: {
            const float m = f16_at(b + 2);
            for (int j = 0; j < 16; j++) {
                y[j] = MUL_ADD((float)(b[4 + j] & 0x0F), d, m);
                y[j + 16] = MUL_ADD((float)(b[4 + j] >> 4), d, m);
            }
            break;
        }
        case V_Q5_0:
        case V_Q5_1: {
            const int with_min = kind == V_Q5_1;
            const uint8_t *qh_at = b + (with_min ? 4 : 2), *qs = qh_at + 4;
            uint32_t qh;
            memcpy(&qh, qh_at, 4);
            const float m = with_min ? f16_at(b + 2) : 0.0f;
            for (int j = 0; j < 16; j++) {
                const int h0 = ((qh >> j) << 4) & 0x10, h1 = (qh >> (j + 12)) & 0x10;
                const int x0 = (qs[j] & 0x0F) | h0, x1 = (qs[j] >> 4) | h1;
                if (with_min) {
                    y[j] = MUL_ADD((float)x0, d, m);
                    y[j + 16] = MUL_ADD((float)x1, d, m);
                } else {
                    y[j] = (float)(x0 - 16) * d;
                    y[j + 16] = (float)(x1 - 16) * d;
                }
            }
            break;
        }
        default: /* V_IQ4_NL */
            for (int j = 0; j < 16; j++) {
                y[j] = d * (float)kvalues[b[2 + j] & 0x0F];
                y[j + 16] = d * (float)kvalues[b[2 + j] >> 4];
            }
        }
    }
}

static void dequantize_portable(int kind, size_t block_bytes, const uint8_t *b, float *y, int n) {
    dequantize_body(kind, block_bytes, b, y, n);
}

#ifdef OFFLOAD_X86
static TARGET_AVX2 void dequantize_avx2(int kind, size_t block_bytes, const uint8_t *b, float *y, int n) {
    dequantize_body(kind, block_bytes, b, y, n); /* the same C, with FMA for MUL_ADD and vectorized */
}
#endif

static void dequantize_values(const flash_args *a, const uint8_t *b, float *y, int n) {
#ifdef OFFLOAD_X86
    if (a->use_avx2) {
        dequantize_avx2(a->v_kind, (size_t)a->v_format->block_bytes, b, y, n);
        return;
    }
#endif
    dequantize_portable(a->v_kind, (size_t)a->v_format->block_bytes, b, y, n);
}

#ifdef OFFLOAD_X86
static inline TARGET_AVX2 __m256 round_f16_8(__m256 x) {
    return _mm256_cvtph_ps(_mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
}

/* eight values of a row as F16: halves, or floats rounded to halves */
static inline TARGET_AVX2 __m256 halves8(const uint8_t *row, int store, int d) {
    if (store == FLASH_F16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(row + 2 * (size_t)d)));
    return round_f16_8(_mm256_loadu_ps((const float *)row + d));
}

static TARGET_AVX2 int scale_acc_avx2(float *acc, float ms, int n, int half) {
    const __m256 m = _mm256_set1_ps(ms);
    int d = 0;
    for (; d + 8 <= n; d += 8) {
        const __m256 y = _mm256_mul_ps(_mm256_loadu_ps(acc + d), m);
        _mm256_storeu_ps(acc + d, half ? round_f16_8(y) : y);
    }
    return d;
}

static TARGET_AVX2 void tile_scores_avx2(const float *kt, const float *q, int hd, float *kq) {
    for (int tk = 0; tk < 64; tk += 16) { /* two chains side by side */
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        for (int c = 0; c < hd; c++) {
            const __m256 qc = _mm256_set1_ps(q[c]);
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(kt + (size_t)c * 64 + tk), qc, a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(kt + (size_t)c * 64 + tk + 8), qc, a1);
        }
        _mm256_storeu_ps(kq + tk, a0);
        _mm256_storeu_ps(kq + tk + 8, a1);
    }
}

static TARGET_AVX2 int tile_values_avx2(const float *v, const float *w, int t0, int t1, int vd, float *acc) {
    int d = 0;
    for (; d + 8 <= vd; d += 8) {
        __m256 y = _mm256_loadu_ps(acc + d);
        for (int tk = t0; tk < t1; tk++)
            y = _mm256_fmadd_ps(_mm256_loadu_ps(v + (size_t)tk * vd + d), _mm256_set1_ps(w[tk]), y);
        _mm256_storeu_ps(acc + d, y);
    }
    return d;
}

/* Four rows at once, each row's chains as tile_scores_avx2's / tile_values_avx2's: the key and
 * value chunks loaded once for the four (llama.cpp's simd_gemm shares them the same way). */
static TARGET_AVX2 void tile_scores4_avx2(const float *kt, const float *const q[4], int hd, float *const kq[4]) {
    for (int tk = 0; tk < 64; tk += 16) {
        __m256 acc[4][2];
        for (int r = 0; r < 4; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
        for (int c = 0; c < hd; c++) {
            const float *kc = kt + (size_t)c * 64 + tk;
            const __m256 k0 = _mm256_loadu_ps(kc), k1 = _mm256_loadu_ps(kc + 8);
            for (int r = 0; r < 4; r++) {
                const __m256 qc = _mm256_set1_ps(q[r][c]);
                acc[r][0] = _mm256_fmadd_ps(k0, qc, acc[r][0]);
                acc[r][1] = _mm256_fmadd_ps(k1, qc, acc[r][1]);
            }
        }
        for (int r = 0; r < 4; r++) {
            _mm256_storeu_ps(kq[r] + tk, acc[r][0]);
            _mm256_storeu_ps(kq[r] + tk + 8, acc[r][1]);
        }
    }
}

static TARGET_AVX2 int tile_values4_avx2(const float *v, const float *const w[4], int t1, int vd, float *const acc[4]) {
    int d = 0;
    for (; d + 8 <= vd; d += 8) {
        __m256 y[4];
        for (int r = 0; r < 4; r++) y[r] = _mm256_loadu_ps(acc[r] + d);
        for (int tk = 0; tk < t1; tk++) {
            const __m256 vv = _mm256_loadu_ps(v + (size_t)tk * vd + d);
            for (int r = 0; r < 4; r++) y[r] = _mm256_fmadd_ps(vv, _mm256_set1_ps(w[r][tk]), y[r]);
        }
        for (int r = 0; r < 4; r++) _mm256_storeu_ps(acc[r] + d, y[r]);
    }
    return d;
}

static TARGET_AVX2 double tile_exps_avx2(float *kq, float m) {
    double sum = 0.0;
    for (int c = 0; c < 64; c += 8) {
        const __m256 e = expf_ggml_avx2(_mm256_sub_ps(_mm256_loadu_ps(kq + c), _mm256_set1_ps(m)));
        _mm256_storeu_ps(kq + c, e);
        sum += (double)hsum_float_8(e);
    }
    return sum;
}

static TARGET_AVX2 int mad_acc_avx2(float *acc, const uint8_t *row, int store, const float *v32, float vs, int n) {
    const __m256 w = _mm256_set1_ps(vs);
    int d = 0;
    for (; d + 8 <= n; d += 8) {
        const __m256 v = v32 ? _mm256_loadu_ps(v32 + d) : halves8(row, store, d);
        const __m256 y = _mm256_fmadd_ps(v, w, _mm256_loadu_ps(acc + d));
        _mm256_storeu_ps(acc + d, v32 ? y : round_f16_8(y));
    }
    return d;
}
#endif

/* The accumulator's steps, elementwise: acc = acc * ms and acc += v * vs (one FMA), each
 * result rounded to F16 for an F16 accumulator (ggml_vec_scale_f16 / ggml_vec_mad_f16), the
 * values read as F16 from an F16 or F32 row; or over float values (ggml_vec_*_f32). */
static void scale_acc(float *acc, float ms, int n, int half, int use_avx2) {
    int d = 0;
#ifdef OFFLOAD_X86
    if (use_avx2) {
        d = scale_acc_avx2(acc, ms, n, half);
    }
#endif
    (void)use_avx2;
    for (; d < n; d++) acc[d] = half ? round_f16(acc[d] * ms) : acc[d] * ms;
}

static void mad_acc(float *acc, const uint8_t *row, int store, const float *v32, float vs, int n, int use_avx2) {
    int d = 0;
#ifdef OFFLOAD_X86
    if (use_avx2) {
        d = mad_acc_avx2(acc, row, store, v32, vs, n);
    }
#endif
    (void)use_avx2;
    if (v32)
        for (; d < n; d++) acc[d] = fmaf(v32[d], vs, acc[d]);
    else
        for (; d < n; d++) acc[d] = round_f16(fmaf(half_value(row, store, d), vs, acc[d]));
}

/* -- one chunk ----------------------------------------------------------------------------- */

typedef struct {
    float *k32;       /* head_dim: a BF16 key row decoded */
    float *q;         /* head_dim: the query rounded to F16 (an F16 K) or BF16 (a BF16 K) */
    uint16_t *k16;    /* head_dim: an F32 key row as halves */
    uint8_t *act;     /* the query as K's activations (a quantized K) */
    float *acc, *v32; /* v_dim each */
} chunk_scratch;

static size_t act_size(int n) {
    return (size_t)n + (size_t)n / 32 * sizeof(float) + (size_t)n / 16 * sizeof(int16_t) + 64;
}

static size_t chunk_floats(const flash_args *a) {
    const size_t hd = (size_t)a->head_dim, vd = (size_t)a->v_dim;
    return 2 * hd + (hd + 1) / 2 + (act_size(a->head_dim) + 3) / 4 + 2 * vd + 16;
}

static chunk_scratch chunk_scratch_at(const flash_args *a, float *p) {
    chunk_scratch s;
    const size_t hd = (size_t)a->head_dim;
    s.k32 = p;
    p += hd;
    s.q = p;
    s.k16 = (uint16_t *)(p + hd);
    s.act = (uint8_t *)(p + hd + (hd + 1) / 2);
    s.acc = p + hd + (hd + 1) / 2 + (act_size(a->head_dim) + 3) / 4;
    s.v32 = s.acc + a->v_dim;
    return s;
}

/* Cells [ic0, ic1) of query head h of new token t, into s->acc (unnormalized, F32), *M, *S. */
static int one_chunk(const flash_args *a, int h, int t, int ic0, int ic1, int with_sink, const chunk_scratch *s,
                     float *M_out, float *S_out) {
    const int hd = a->head_dim, vd = a->v_dim, g = h / (a->n_head / a->n_head_kv);
    const cell_view cells = cells_of(a->start, a->n, t, a->n_cells, a->window, a->cell_pos, a->n_used);
    const float *q = a->q + ((size_t)t * a->n_head + h) * hd;
    act_row act = {0};
    if (a->k_store == FLASH_QUANT) {
        act.qs = (const int8_t *)s->act;
        act.d = (const float *)(s->act + hd);
        act.bsums = (const int16_t *)(s->act + hd + hd / 32 * sizeof(float));
        quantize_row_kind(a->k_act, q, (int8_t *)act.qs, (float *)act.d, (void *)act.bsums, hd);
    } else if (a->k_store == FLASH_BF16) {
        for (int c = 0; c < hd; c++) s->q[c] = round_bf16(q[c]);
    } else {
        for (int c = 0; c < hd; c++) s->q[c] = round_f16(q[c]);
    }
    const int v_half = a->v_store == FLASH_F16 || a->v_store == FLASH_F32; /* (F32 read as F16): an F16 accumulator */
    float *acc = s->acc;
    memset(acc, 0, sizeof(float) * vd);
    float M = -INFINITY, S = 0.0f;
    const int end = ic1 < cells.n_visit ? ic1 : cells.n_visit;
    for (int ic = ic0; ic < end; ic++) {
        if (!sees(&cells, ic)) continue;
        const uint8_t *krow = a->k + (size_t)ic * a->k_row + (size_t)g * a->k_head;
        float score;
        if (a->k_store == FLASH_QUANT) {
            score = a->k_dot(krow, &act, hd);
        } else if (a->k_store == FLASH_F16) {
            score = vec_dot_f16_ggml((const uint16_t *)krow, s->q, hd, a->use_avx2);
        } else if (a->k_store == FLASH_BF16) {
            for (int c = 0; c < hd; c++) s->k32[c] = bf16_value(krow, c);
            score = dot_bf16_vecdot(s->k32, s->q, hd, a->use_avx2);
        } else {
            for (int c = 0; c < hd; c++) s->k16[c] = fp32_to_fp16_bits(((const float *)krow)[c]);
            score = vec_dot_f16_ggml(s->k16, s->q, hd, a->use_avx2);
        }
        score = score * a->scale;
        const float Mold = M;
        float ms = 1.0f, vs = 1.0f;
        if (score > M) {
            M = score;
            ms = expf(Mold - M);
            scale_acc(acc, ms, vd, v_half, a->use_avx2);
        } else {
            vs = expf(score - M);
        }
        const uint8_t *vrow = a->v + (size_t)ic * a->v_row + (size_t)g * a->v_head;
        if (a->v_store == FLASH_BF16)
            for (int d = 0; d < vd; d++) s->v32[d] = bf16_value(vrow, d);
        else if (!v_half)
            dequantize_values(a, vrow, s->v32, vd);
        mad_acc(acc, vrow, a->v_store, v_half ? NULL : s->v32, vs, vd, a->use_avx2);
        S = MUL_ADD(S, ms, vs);
    }
    if (with_sink && a->sinks) {
        const float sink = a->sinks[h];
        float ms = 1.0f, vs = 1.0f;
        if (sink > M) {
            ms = expf(M - sink);
            scale_acc(acc, ms, vd, 0, a->use_avx2);
        } else {
            vs = expf(sink - M);
        }
        S = S * ms + vs; /* not fused (as llama.cpp was compiled) */
        /* A split decode's chunk that sees no cell but has the sink: llama.cpp leaves M at -inf
         * and its merge then takes expf(-inf - -inf) = NaN; the sink's own logit is the scale S
         * and the (zero) accumulator are at, so the merge stays finite (and equal elsewhere). */
        if (M == -INFINITY) M = sink;
    }
    *M_out = M;
    *S_out = S;
    return 0;
}

static void write_out(const flash_args *a, int h, int t, const float *acc, float S) {
    const float inv = S == 0.0f ? 0.0f : 1.0f / S;
    float *o = a->out + ((size_t)t * a->n_head + h) * a->v_dim;
    for (int d = 0; d < a->v_dim; d++) o[d] = acc[d] * inv;
}

/* -- tiled --------------------------------------------------------------------------------- */

/* per item: TILE_Q rows' accumulators, maxima, sums and scores; one KV tile's keys
 * (transposed) and values as F32 */
static size_t tiled_floats(const flash_args *a) {
    return (size_t)TILE_Q * (a->v_dim + 2 + TILE_KV) + (size_t)TILE_KV * a->head_dim + (size_t)TILE_KV * a->v_dim + 16;
}

/* kq[tk] = sum over c of kt[c][tk] * q[c], one FMA chain per cell in c's order (simd_gemm's) */
static void tile_scores(const float *kt, const float *q, int hd, float *kq, int use_avx2) {
#ifdef OFFLOAD_X86
    if (use_avx2) {
        tile_scores_avx2(kt, q, hd, kq);
        return;
    }
#endif
    (void)use_avx2;
    for (int tk = 0; tk < TILE_KV; tk++) {
        float dot = 0.0f;
        for (int c = 0; c < hd; c++) dot = fmaf(kt[(size_t)c * TILE_KV + tk], q[c], dot);
        kq[tk] = dot;
    }
}

/* acc[d] += sum over tk in [t0, t1) of v[tk][d] * w[tk], one FMA chain per d in tk's order */
static void tile_values(const float *v, const float *w, int t0, int t1, int vd, float *acc, int use_avx2) {
    int d = 0;
#ifdef OFFLOAD_X86
    if (use_avx2) d = tile_values_avx2(v, w, t0, t1, vd, acc);
#endif
    (void)use_avx2;
    for (; d < vd; d++)
        for (int tk = t0; tk < t1; tk++) acc[d] = fmaf(v[(size_t)tk * vd + d], w[tk], acc[d]);
}

/* sum of exp(kq - m) in double, a chunk of eight at a time (ggml_vec_soft_max_f32); kq := the exps */
static double tile_exps(float *kq, float m, int use_avx2) {
    double sum = 0.0;
#ifdef OFFLOAD_X86
    if (use_avx2) return tile_exps_avx2(kq, m);
#endif
    (void)use_avx2;
    for (int c = 0; c < TILE_KV; c += 8) {
        float lanes[8];
        for (int l = 0; l < 8; l++) lanes[l] = kq[c + l] = expf_ggml(kq[c + l] - m);
        sum += (double)hsum8_portable(lanes);
    }
    return sum;
}

/* Item: query head h of new tokens [t0, t0 + nq), nq <= TILE_Q. Each row's sums are its own
 * (a KV tile a row does not see changes nothing of it), so rows are tiled as llama.cpp tiles
 * them only to convert each key and value tile once for all of them. */
static void tiled_rows(const flash_args *a, int h, int t0, int nq, float *scratch) {
    const int hd = a->head_dim, vd = a->v_dim, g = h / (a->n_head / a->n_head_kv);
    float *acc = scratch, *M = acc + (size_t)TILE_Q * vd, *S = M + TILE_Q, *kq = S + TILE_Q;
    float *kt = kq + (size_t)TILE_Q * TILE_KV, *v32 = kt + (size_t)TILE_KV * hd;
    cell_view cells[TILE_Q];
    int live = 0; /* cells any row visits */
    for (int r = 0; r < nq; r++) {
        cells[r] = cells_of(a->start, a->n, t0 + r, a->n_cells, a->window, a->cell_pos, a->n_used);
        live = cells[r].n_visit > live ? cells[r].n_visit : live;
        M[r] = -INFINITY, S[r] = 0.0f;
    }
    memset(acc, 0, sizeof(float) * (size_t)nq * vd);
    for (int ic = 0; ic < live; ic += TILE_KV) {
        const int nt = live - ic < TILE_KV ? live - ic : TILE_KV;
        int rows[TILE_Q], ends[TILE_Q], n_rows = 0; /* the rows that see a cell of this tile, and how far */
        for (int r = 0; r < nq; r++) {
            const int end = cells[r].n_visit - ic < nt ? cells[r].n_visit - ic : nt;
            int any = 0;
            for (int tk = 0; tk < end && !any; tk++) any = sees(&cells[r], ic + tk);
            if (any) rows[n_rows] = r, ends[n_rows++] = end;
        }
        if (!n_rows) continue; /* a tile every cell of which is masked: skipped */
        for (int tk = 0; tk < TILE_KV; tk++) { /* the keys transposed, as F32 (zeros past the cells) */
            const uint8_t *krow = a->k + (size_t)(ic + tk) * a->k_row + (size_t)g * a->k_head;
            for (int c = 0; c < hd; c++)
                kt[(size_t)c * TILE_KV + tk] = tk < nt ? half_value(krow, a->k_store, c) : 0.0f;
        }
        int i = 0;
#ifdef OFFLOAD_X86
        for (; a->use_avx2 && i + 4 <= n_rows; i += 4) {
            const float *q4[4];
            float *kq4[4];
            for (int j = 0; j < 4; j++) {
                q4[j] = a->q + ((size_t)(t0 + rows[i + j]) * a->n_head + h) * hd;
                kq4[j] = kq + (size_t)rows[i + j] * TILE_KV;
            }
            tile_scores4_avx2(kt, q4, hd, kq4);
        }
#endif
        for (; i < n_rows; i++)
            tile_scores(kt, a->q + ((size_t)(t0 + rows[i]) * a->n_head + h) * hd, hd, kq + (size_t)rows[i] * TILE_KV,
                        a->use_avx2);
        for (i = 0; i < n_rows; i++) {
            const int r = rows[i];
            float *row = kq + (size_t)r * TILE_KV, *row_acc = acc + (size_t)r * vd;
            float tile_max = -INFINITY;
            for (int tk = 0; tk < TILE_KV; tk++) {
                row[tk] = tk < ends[i] && sees(&cells[r], ic + tk) ? row[tk] * a->scale : -INFINITY;
                tile_max = row[tk] > tile_max ? row[tk] : tile_max;
            }
            const float Mnew = fmaxf(M[r], tile_max);
            if (Mnew > M[r]) {
                const float ms = expf(M[r] - Mnew);
                scale_acc(row_acc, ms, vd, 0, a->use_avx2);
                S[r] *= ms;
            }
            M[r] = Mnew;
            S[r] = (float)((double)S[r] + tile_exps(row, Mnew, a->use_avx2));
        }
        for (int tk = 0; tk < nt; tk++) {
            const uint8_t *vrow = a->v + (size_t)(ic + tk) * a->v_row + (size_t)g * a->v_head;
            for (int d = 0; d < vd; d++) v32[(size_t)tk * vd + d] = half_value(vrow, a->v_store, d);
        }
        /* the values, past a row's own cells weighing exactly 0: four rows at once over the cells
         * all four visit, then each row on to its own end (the same order per value) */
        i = 0;
#ifdef OFFLOAD_X86
        for (; a->use_avx2 && i + 4 <= n_rows; i += 4) {
            const float *w4[4];
            float *acc4[4];
            int common = nt;
            for (int j = 0; j < 4; j++) {
                w4[j] = kq + (size_t)rows[i + j] * TILE_KV, acc4[j] = acc + (size_t)rows[i + j] * vd;
                common = ends[i + j] < common ? ends[i + j] : common;
            }
            tile_values4_avx2(v32, w4, common, vd, acc4); /* (v_dim % 32 == 0: no tail) */
            for (int j = 0; j < 4; j++) tile_values(v32, w4[j], common, ends[i + j], vd, acc4[j], a->use_avx2);
        }
#endif
        for (; i < n_rows; i++)
            tile_values(v32, kq + (size_t)rows[i] * TILE_KV, 0, ends[i], vd, acc + (size_t)rows[i] * vd, a->use_avx2);
    }
    for (int r = 0; r < nq; r++) {
        float *row_acc = acc + (size_t)r * vd;
        if (a->sinks) {
            const float sink = a->sinks[h];
            float ms = 1.0f, vs = 1.0f;
            if (sink > M[r]) {
                ms = expf(M[r] - sink);
                scale_acc(row_acc, ms, vd, 0, a->use_avx2);
            } else {
                vs = expf(sink - M[r]);
            }
            S[r] = MUL_ADD(S[r], ms, vs); /* fused here, not in one_chunk: as llama.cpp was compiled */
        }
        write_out(a, h, t0 + r, row_acc, S[r]);
    }
}

/* -- split --------------------------------------------------------------------------------- */

static int split_decode(const flash_args *a) {
    const int chunks = a->n_chunks, size = (a->n_kv + chunks - 1) / chunks, vd = a->v_dim;
    const size_t part = 2 + (size_t)vd; /* M, S, acc */
    float *partials = malloc(sizeof(float) * part * (size_t)chunks * a->n_head);
    if (!partials) return -1;
    int failed = 0;
#pragma omp parallel
    {
        float *scratch = malloc(sizeof(float) * chunk_floats(a));
        const chunk_scratch s = chunk_scratch_at(a, scratch ? scratch : partials);
#pragma omp for schedule(dynamic, 1)
        for (int i = 0; i < a->n_head * chunks; i++) {
            const int h = i / chunks, c = i % chunks, ic0 = c * size;
            float *p = partials + part * (size_t)i;
            if (!scratch) {
                failed = -1;
                continue;
            }
            p[0] = -INFINITY, p[1] = 0.0f;
            if (ic0 >= a->n_kv) continue;
            const int ic1 = ic0 + size < a->n_kv ? ic0 + size : a->n_kv;
            const int rc = one_chunk(a, h, 0, ic0, ic1, ic0 == 0, &s, &p[0], &p[1]);
            if (rc) failed = rc;
            memcpy(p + 2, s.acc, sizeof(float) * vd);
        }
        free(scratch);
#pragma omp barrier
#pragma omp for
        for (int h = 0; h < a->n_head; h++) {
            float *acc = a->out + (size_t)h * vd; /* merged in place, then normalized */
            float M = -INFINITY, S = 0.0f;
            memset(acc, 0, sizeof(float) * vd);
            for (int c = 0; c < chunks; c++) {
                const float *p = partials + part * ((size_t)h * chunks + c);
                if (c * size >= a->n_kv || p[1] == 0.0f) continue;
                const float Mnew = fmaxf(M, p[0]);
                const float old = expf(M - Mnew), now = expf(p[0] - Mnew);
                for (int d = 0; d < vd; d++) acc[d] = MUL_ADD(acc[d], old, p[2 + d] * now);
                S = MUL_ADD(S, old, p[1] * now);
                M = Mnew;
            }
            if (S != 0.0f) {
                const float inv = 1.0f / S;
                for (int d = 0; d < vd; d++) acc[d] *= inv;
            }
        }
    }
    free(partials);
    return failed;
}

int flash_attention_run(const flash_args *args) {
    flash_args call = *args;
    const flash_args *a = &call;
    call.v_kind = value_kind(args->v_format);
    if (args->v_store == FLASH_QUANT && call.v_kind == V_NONE) return -2;
    const int halves = a->k_store <= FLASH_F16 && a->v_store <= FLASH_F16; /* both F16 once cast */
    if (halves && a->n == 1 && a->n_kv >= SPLIT_MIN && a->n_chunks > 1) return split_decode(a);
    const int tiled = halves && a->n >= TILE_Q;
    const int tiles = (a->n + TILE_Q - 1) / TILE_Q; /* a tiled item: one head's tokens of a tile */
    const int items = tiled ? a->n_head * tiles : a->n_head * a->n;
    int failed = 0;
#pragma omp parallel if (items > 1)
    {
        float *scratch = malloc(sizeof(float) * (tiled ? tiled_floats(a) : chunk_floats(a)));
        const chunk_scratch s = chunk_scratch_at(a, scratch);
#pragma omp for schedule(dynamic, 1)
        for (int i = 0; i < items; i++) {
            if (!scratch) {
                failed = -1;
                continue;
            }
            if (tiled) {
                const int h = i / tiles, t0 = i % tiles * TILE_Q;
                tiled_rows(a, h, t0, a->n - t0 < TILE_Q ? a->n - t0 : TILE_Q, scratch);
            } else {
                const int h = i / a->n, t = i % a->n;
                float M, S;
                one_chunk(a, h, t, 0, a->n_cells, 1, &s, &M, &S);
                write_out(a, h, t, s.acc, S);
            }
        }
        free(scratch);
    }
    return failed;
}
