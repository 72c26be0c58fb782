/* Causal grouped-query attention over one layer's F32 KV cache, in llama.cpp's CPU order
 * (see offload/kernels/attention.py for the derivation; this is its compiled twin):
 *   score[p] = vec_dot_f32(K[p], q) * scale   for p <= start + t, else -inf
 *   probs    = ggml softmax: exp in chunks of 8 (ggml_v_expf), each chunk's hsum added
 *              in double, then times (float)(1 / sum)
 *   out[d]   = sum_p V[p, d] * probs[p], lanes over positions: 8 lanes + hsum_float_8
 *              (tinyBLAS) when `gemm8` (2+ new tokens), else 32 lanes folded as vec_dot_f32.
 * Positions past the end weigh exactly 0 in all three, so no padding is needed. Nor are the
 * masked positions after a query's own visited: their probabilities are exactly +0, whose
 * exp chunks add +0.0 to the double sum and whose products add +0 to V lanes that start at
 * +0 (a sum with +0 never becomes -0), so leaving them out changes no bit and halves the
 * work of a causal prompt.
 *
 * An F16 cache (llama.cpp's default) changes the two matmuls as ggml's mul_mat does when its
 * first operand is F16: the other one is rounded to F16 first (q; the probabilities), and
 * K.q takes tinyBLAS's 8 lanes + hsum_float_8 for 2+ new tokens (the converted q is
 * contiguous), else ggml_vec_dot_f16 (32 lanes folded as vec_dot_f32's, a tail in double).
 * The products are of exact F16 values in F32, so V sums as above.
 *
 * Sliding-window layers keep a ring of cells (llama.cpp's SWA cache: position p in cell
 * p % n_cells, once the positions outgrow it); the sums run over cells in cell order, as
 * llama.cpp's do, with the cells outside a query's window masked. After a context shift the
 * cells hold positions in another order (cell_pos, offload/kv_cells.py): the same sums over
 * the used cells, masked by each cell's position. A sink (gpt-oss) joins
 * the softmax's max, and its exp (libm's, as ggml's) is added after the chunked sum.
 *
 * Scheduling, which changes no sum: a decoding token's query heads are items (one head's
 * score rows taken several at a time, its V lanes kept in registers); a prompt's items are
 * tiles of queries (attend_tile_avx2: one KV head's query heads for a few tokens, as a
 * matrix product with register tiles), the work llama.cpp's tinyBLAS does there.
 */
#include <math.h>
#include <stdlib.h>

#include "kernels.h"
#include "attention.h"
#include "ggml_exp.h"
#include "quantize.h"

/* ggml_vec_dot_f32's reduction of its four 8-lane accumulators acc[8*a + i]. */
static inline float fold32(const float acc[32]) {
    float l[8];
    for (int i = 0; i < 8; i++) l[i] = (acc[i] + acc[16 + i]) + (acc[8 + i] + acc[24 + i]);
    const float t0 = l[0] + l[4], t1 = l[1] + l[5], t2 = l[2] + l[6], t3 = l[3] + l[7];
    return (t0 + t1) + (t2 + t3);
}

static inline cell_view view_of(const attention_args *a, int t) {
    return cells_of(a->start, a->n, t, a->n_cells, a->window, a->cell_pos, a->n_used);
}

/* -- portable -------------------------------------------------------------------------- */

static float dot_f32_portable(const float *x, const float *y, int n) {
    float acc[32] = {0};
    const int main = n - n % 32;
    for (int c = 0; c < main; c++) acc[c % 32] = fmaf(x[c], y[c], acc[c % 32]);
    float s = fold32(acc);
    for (int c = main; c < n; c++) s += x[c] * y[c];
    return s;
}

/* ggml's K.q on an F16 key row and an F16-rounded q: tinyBLAS's one 8-lane accumulator, or
 * vec_dot_f16's 32 lanes with the tail added in double. */
static float dot_f16_portable(const uint16_t *x, const float *y, int n, int gemm8) {
    float acc[32] = {0};
    if (gemm8) {
        for (int c = 0; c < n; c++) acc[c % 8] = fmaf(fp16_to_fp32(x[c]), y[c], acc[c % 8]);
        return hsum8_portable(acc);
    }
    const int main = n - n % 32;
    for (int c = 0; c < main; c++) acc[c % 32] = fmaf(fp16_to_fp32(x[c]), y[c], acc[c % 32]);
    double s = fold32(acc);
    for (int c = main; c < n; c++) s += (double)(fp16_to_fp32(x[c]) * y[c]);
    return (float)s;
}


/* The query head as ggml hands it to an F16 K: rounded to F16 (kept as floats in qr). */
static const float *query_of(const attention_args *a, int h, int t, float *qr) {
    const float *q = a->q + (size_t)t * a->q_stride + (size_t)h * a->head_dim;
    if (!a->k16) return q;
    for (int c = 0; c < a->head_dim; c++) qr[c] = round_f16(q[c]);
    return qr;
}

/* probs[0..end) = softmax of probs[0..end) in place (masked entries are -inf), with the
 * head's sink logit if `sink`. */
static void softmax_portable(float *probs, int end, const float *sink) {
    float m = -INFINITY;
    for (int p = 0; p < end; p++) m = probs[p] > m ? probs[p] : m;
    if (sink) m = m > *sink ? m : *sink;
    double total = 0.0;
    for (int c = 0; c < end; c += 8) {
        float lanes[8] = {0};
        for (int p = c; p < c + 8 && p < end; p++) lanes[p - c] = probs[p] = expf_ggml(probs[p] - m);
        total += (double)hsum8_portable(lanes);
    }
    if (sink) total += (double)expf(*sink - m);
    const float inv = (float)(1.0 / total);
    for (int p = 0; p < end; p++) probs[p] *= inv;
}

static void attend_portable(const attention_args *a, int h, int t, float *probs, float *vacc, float *qr) {
    const cell_view cells = view_of(a, t);
    const int hd = a->head_dim, live = cells.n_visit, g = h / (a->n_head / a->n_head_kv);
    const int vd = a->v_dim ? a->v_dim : hd, vs = a->v_stride ? a->v_stride : a->kv_stride;
    const int kv0 = g * hd, v0 = g * vd;
    const float *q = query_of(a, h, t, qr);
    for (int p = 0; p < live; p++) {
        const size_t row = (size_t)p * a->kv_stride + kv0;
        probs[p] = !sees(&cells, p) ? -INFINITY
                   : (a->k16 ? dot_f16_portable(a->k16 + row, q, hd, a->kq_gemm8) : dot_f32_portable(a->k + row, q, hd))
                         * a->scale;
    }
    softmax_portable(probs, live, a->sinks ? a->sinks + h : NULL);
    const int width = a->gemm8 ? 8 : 32;
    memset(vacc, 0, sizeof(float) * 32 * vd);
    for (int p = 0; p < live; p++) {
        const float w = a->v16 ? round_f16(probs[p]) : probs[p];
        if (w == 0.0f) continue; /* masked: adds exactly +0 */
        float *lane = vacc + (p % width) * vd;
        if (a->v16) {
            const uint16_t *v = a->v16 + (size_t)p * vs + v0;
            for (int d = 0; d < vd; d++) lane[d] = fmaf(fp16_to_fp32(v[d]), w, lane[d]);
        } else {
            const float *v = a->v + (size_t)p * vs + v0;
            for (int d = 0; d < vd; d++) lane[d] = fmaf(v[d], w, lane[d]);
        }
    }
    float *o = a->out + ((size_t)t * a->n_head + h) * vd;
    for (int d = 0; d < vd; d++) {
        float col[32];
        for (int l = 0; l < width; l++) col[l] = vacc[l * vd + d];
        o[d] = a->gemm8 ? hsum8_portable(col) : fold32(col);
    }
}

/* -- AVX2 ------------------------------------------------------------------------------- */
#ifdef OFFLOAD_X86

static TARGET_AVX2 float dot_f32_avx2(const float *x, const float *y, int n) {
    __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    const int main = n - n % 32;
    for (int c = 0; c < main; c += 32) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + c), _mm256_loadu_ps(y + c), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + c + 8), _mm256_loadu_ps(y + c + 8), s1);
        s2 = _mm256_fmadd_ps(_mm256_loadu_ps(x + c + 16), _mm256_loadu_ps(y + c + 16), s2);
        s3 = _mm256_fmadd_ps(_mm256_loadu_ps(x + c + 24), _mm256_loadu_ps(y + c + 24), s3);
    }
    s0 = _mm256_add_ps(_mm256_add_ps(s0, s2), _mm256_add_ps(s1, s3));
    const __m128 t0 = _mm_add_ps(_mm256_castps256_ps128(s0), _mm256_extractf128_ps(s0, 1));
    const __m128 t1 = _mm_hadd_ps(t0, t0);
    float s = _mm_cvtss_f32(_mm_hadd_ps(t1, t1));
    for (int c = main; c < n; c++) s += x[c] * y[c];
    return s;
}

static TARGET_AVX2 float dot_f16_avx2(const uint16_t *x, const float *y, int n, int gemm8) {
    if (gemm8) { /* n % 8 == 0 */
        __m256 s = _mm256_setzero_ps();
        for (int c = 0; c < n; c += 8)
            s = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(x + c))), _mm256_loadu_ps(y + c), s);
        return hsum_float_8(s);
    }
    __m256 s[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    const int main = n - n % 32;
    for (int c = 0; c < main; c += 32)
        for (int j = 0; j < 4; j++)
            s[j] = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(x + c + 8 * j))),
                                   _mm256_loadu_ps(y + c + 8 * j), s[j]);
    const __m256 r = _mm256_add_ps(_mm256_add_ps(s[0], s[2]), _mm256_add_ps(s[1], s[3]));
    const __m128 t0 = _mm_add_ps(_mm256_castps256_ps128(r), _mm256_extractf128_ps(r, 1));
    const __m128 t1 = _mm_hadd_ps(t0, t0);
    double sum = _mm_cvtss_f32(_mm_hadd_ps(t1, t1));
    for (int c = main; c < n; c++) sum += (double)(fp16_to_fp32(x[c]) * y[c]);
    return (float)sum;
}

static TARGET_AVX2 void softmax_avx2(float *probs, int end, const float *sink) {
    float m = -INFINITY;
    for (int p = 0; p < end; p++) m = probs[p] > m ? probs[p] : m;
    if (sink) m = m > *sink ? m : *sink;
    const int padded = (end + 7) / 8 * 8;  /* the caller leaves room: -inf weighs 0 */
    for (int p = end; p < padded; p++) probs[p] = -INFINITY;
    const __m256 vm = _mm256_set1_ps(m);
    double total = 0.0;
    for (int c = 0; c < padded; c += 8) {
        const __m256 e = expf_ggml_avx2(_mm256_sub_ps(_mm256_loadu_ps(probs + c), vm));
        _mm256_storeu_ps(probs + c, e);
        total += (double)hsum_float_8(e);
    }
    if (sink) total += (double)expf(*sink - m);
    const __m256 inv = _mm256_set1_ps((float)(1.0 / total));
    for (int c = 0; c < padded; c += 8) _mm256_storeu_ps(probs + c, _mm256_mul_ps(_mm256_loadu_ps(probs + c), inv));
}

/* The scores of one query against cells [0, live): each row's sum exactly as the one-row dots
 * above, but rows taken several at a time so that their FMA chains run side by side (one
 * row's chain alone waits on the FMA latency) and each chunk of q is loaded once for all. */
#define SCORE_ROWS 8 /* tinyBLAS's one-accumulator dots (F16 keys, 2+ tokens) */
#define SCORE_ROWS32 3 /* the four-accumulator dots (vec_dot_f32 / vec_dot_f16) */

static TARGET_AVX2 float fold4_avx2(__m256 s0, __m256 s1, __m256 s2, __m256 s3) {
    const __m256 r = _mm256_add_ps(_mm256_add_ps(s0, s2), _mm256_add_ps(s1, s3));
    const __m128 t0 = _mm_add_ps(_mm256_castps256_ps128(r), _mm256_extractf128_ps(r, 1));
    const __m128 t1 = _mm_hadd_ps(t0, t0);
    return _mm_cvtss_f32(_mm_hadd_ps(t1, t1));
}

static TARGET_AVX2 __m256 load8_avx2(const float *f32, const uint16_t *f16, size_t at) {
    return f16 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(f16 + at))) : _mm256_loadu_ps(f32 + at);
}

static TARGET_AVX2 void scores_avx2(const attention_args *a, const float *q, size_t kv0, int live, float *out) {
    const int hd = a->head_dim, main = hd - hd % 32;
    const size_t ks = (size_t)a->kv_stride;
    int p = 0;
    if (a->k16 && a->kq_gemm8) { /* head_dim % 8 == 0 */
        for (; p + SCORE_ROWS <= live; p += SCORE_ROWS) {
            __m256 acc[SCORE_ROWS];
            for (int r = 0; r < SCORE_ROWS; r++) acc[r] = _mm256_setzero_ps();
            const uint16_t *k = a->k16 + (size_t)p * ks + kv0;
            for (int c = 0; c < hd; c += 8) {
                const __m256 qv = _mm256_loadu_ps(q + c);
                for (int r = 0; r < SCORE_ROWS; r++)
                    acc[r] = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(k + r * ks + c))), qv, acc[r]);
            }
            for (int r = 0; r < SCORE_ROWS; r++) out[p + r] = hsum_float_8(acc[r]);
        }
    } else {
        for (; p + SCORE_ROWS32 <= live; p += SCORE_ROWS32) {
            __m256 acc[SCORE_ROWS32][4];
            for (int r = 0; r < SCORE_ROWS32; r++)
                for (int j = 0; j < 4; j++) acc[r][j] = _mm256_setzero_ps();
            const size_t row = (size_t)p * ks + kv0;
            for (int c = 0; c < main; c += 32)
                for (int j = 0; j < 4; j++) {
                    const __m256 qv = _mm256_loadu_ps(q + c + 8 * j);
                    for (int r = 0; r < SCORE_ROWS32; r++)
                        acc[r][j] = _mm256_fmadd_ps(load8_avx2(a->k, a->k16, row + r * ks + c + 8 * j), qv, acc[r][j]);
                }
            for (int r = 0; r < SCORE_ROWS32; r++) {
                const float s = fold4_avx2(acc[r][0], acc[r][1], acc[r][2], acc[r][3]);
                const size_t at = row + r * ks;
                if (a->k16) { /* vec_dot_f16: the tail in double */
                    double sum = s;
                    for (int c = main; c < hd; c++) sum += (double)(fp16_to_fp32(a->k16[at + c]) * q[c]);
                    out[p + r] = (float)sum;
                } else {
                    float sum = s;
                    for (int c = main; c < hd; c++) sum += a->k[at + c] * q[c];
                    out[p + r] = sum;
                }
            }
        }
    }
    for (; p < live; p++) {
        const size_t row = (size_t)p * ks + kv0;
        out[p] = a->k16 ? dot_f16_avx2(a->k16 + row, q, hd, a->kq_gemm8) : dot_f32_avx2(a->k + row, q, hd);
    }
}

/* lanes[l * vd + d] += V[p, d] * w[p] for the positions p of lane l = p % width, in increasing
 * p. Eight lanes at a time live in registers for a stretch of positions and eight d's, so a
 * sum is loaded and stored once per stretch instead of once per position. */
#define VALUE_STRETCH 128 /* positions: a multiple of 32, V rows that stay in L1 across the d's */

static TARGET_AVX2 void sum_values_avx2(const attention_args *a, const float *w, int live, size_t v0, int vd,
                                        int width, float *lanes) {
    const size_t vs = (size_t)(a->v_stride ? a->v_stride : a->kv_stride);
    const int vd8 = vd - vd % 8;
    memset(lanes, 0, sizeof(float) * width * vd);
    for (int p0 = 0; p0 < live; p0 += VALUE_STRETCH) {
        const int p1 = p0 + VALUE_STRETCH < live ? p0 + VALUE_STRETCH : live;
        const int full = p0 + (p1 - p0) / width * width; /* positions in whole rounds of the lanes */
        for (int d = 0; d < vd8; d += 8)
            for (int l0 = 0; l0 < width; l0 += 8) {
                __m256 acc[8];
                for (int l = 0; l < 8; l++) acc[l] = _mm256_loadu_ps(lanes + (size_t)(l0 + l) * vd + d);
                for (int p = p0 + l0; p < full; p += width)
                    for (int l = 0; l < 8; l++)
                        acc[l] = _mm256_fmadd_ps(load8_avx2(a->v, a->v16, (size_t)(p + l) * vs + v0 + d),
                                                 _mm256_broadcast_ss(w + p + l), acc[l]);
                for (int p = full + l0, l = 0; l < 8 && p < p1; p++, l++)
                    acc[l] = _mm256_fmadd_ps(load8_avx2(a->v, a->v16, (size_t)p * vs + v0 + d),
                                             _mm256_broadcast_ss(w + p), acc[l]);
                for (int l = 0; l < 8; l++) _mm256_storeu_ps(lanes + (size_t)(l0 + l) * vd + d, acc[l]);
            }
        for (int p = p0; p < p1; p++) { /* the last vd % 8 d's */
            float *lane = lanes + (size_t)(p % width) * vd;
            for (int d = vd8; d < vd; d++) {
                const size_t at = (size_t)p * vs + v0 + d;
                lane[d] = fmaf(a->v16 ? fp16_to_fp32(a->v16[at]) : a->v[at], w[p], lane[d]);
            }
        }
    }
}

static TARGET_AVX2 void attend_avx2(const attention_args *a, int h, int t, float *probs, float *vacc, float *qr) {
    const cell_view cells = view_of(a, t);
    const int hd = a->head_dim, live = cells.n_visit, g = h / (a->n_head / a->n_head_kv);
    const int vd = a->v_dim ? a->v_dim : hd;
    const float *q = query_of(a, h, t, qr);
    scores_avx2(a, q, (size_t)g * hd, live, probs);
    const __m256 scale = _mm256_set1_ps(a->scale);
    int p = 0;
    for (; p + 8 <= live; p += 8) _mm256_storeu_ps(probs + p, _mm256_mul_ps(_mm256_loadu_ps(probs + p), scale));
    for (; p < live; p++) probs[p] *= a->scale;
    if (cells.cell_pos || cells.wrapped || (cells.window && cells.pos >= cells.window))
        for (p = 0; p < live; p++)
            if (!sees(&cells, p)) probs[p] = -INFINITY;
    softmax_avx2(probs, live, a->sinks ? a->sinks + h : NULL);
    if (a->v16) /* ggml rounds the probabilities to F16 for an F16 V (padded: the softmax wrote to a multiple of 8) */
        for (p = 0; p < live; p += 8)
            _mm256_storeu_ps(probs + p, _mm256_cvtph_ps(_mm256_cvtps_ph(_mm256_loadu_ps(probs + p), _MM_FROUND_TO_NEAREST_INT)));
    /* Masked positions weigh exactly 0 and add +-0 to the lanes, as in llama.cpp's sums over its whole view. */
    const int width = a->gemm8 ? 8 : 32;
    sum_values_avx2(a, probs, live, (size_t)g * vd, vd, width, vacc);
    float *o = a->out + ((size_t)t * a->n_head + h) * vd;
    for (int d = 0; d < vd; d++) {
        float col[32];
        for (int l = 0; l < width; l++) col[l] = vacc[l * vd + d];
        o[d] = a->gemm8 ? hsum8_portable(col) : fold32(col);
    }
}

/* -- AVX2, a prompt's queries in tiles ------------------------------------------------------
 * With 2+ new tokens llama.cpp computes K.q and the V sums as matrix products (tinyBLAS): every
 * score one 8-lane dot, every output value 8 lanes over the positions p % 8. The same sums,
 * scheduled as a matrix product: one work item takes the query heads of one KV head (they read
 * the same keys and values) for a few tokens, and loads each key and value chunk once for a
 * tile of queries, their accumulators side by side in registers. */
#define TILE_ROWS 4    /* K rows, or V columns (d), of a register tile */
#define TILE_QUERIES 3 /* queries of a register tile: 12 accumulators + 4 loads in 16 ymm */
#define STRETCH 64     /* positions of V transposed at a time (vd * 64 floats: L1) */

static inline __attribute__((always_inline)) TARGET_AVX2 void
kq_tile(const uint16_t *k, size_t ks, const float *q, int hd, int rows, int queries, float scale, float *s, size_t ss) {
    __m256 acc[TILE_ROWS][TILE_QUERIES];
    for (int r = 0; r < rows; r++)
        for (int j = 0; j < queries; j++) acc[r][j] = _mm256_setzero_ps();
    for (int c = 0; c < hd; c += 8) { /* 12 sums + 3 queries + 1 key chunk: the 16 ymm registers */
        __m256 qv[TILE_QUERIES];
        for (int j = 0; j < queries; j++) qv[j] = _mm256_loadu_ps(q + (size_t)j * hd + c);
        for (int r = 0; r < rows; r++) {
            const __m256 kv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(k + r * ks + c)));
            for (int j = 0; j < queries; j++) acc[r][j] = _mm256_fmadd_ps(kv, qv[j], acc[r][j]);
        }
    }
    for (int r = 0; r < rows; r++)
        for (int j = 0; j < queries; j++) s[j * ss + r] = hsum_float_8(acc[r][j]) * scale;
}

/* lanes[(j * vd + d) * 8 + l] += sum over p = l (mod 8) of vt[d][p] * w[j][p], p in [0, np) */
static inline __attribute__((always_inline)) TARGET_AVX2 void
v_tile(const float *vt, const float *w, size_t ws, int np, int dims, int queries, float *lanes, size_t lq) {
    __m256 acc[TILE_ROWS][TILE_QUERIES];
    for (int d = 0; d < dims; d++)
        for (int j = 0; j < queries; j++) acc[d][j] = _mm256_loadu_ps(lanes + j * lq + d * 8);
    for (int p = 0; p < np; p += 8) {
        __m256 wv[TILE_QUERIES];
        for (int j = 0; j < queries; j++) wv[j] = _mm256_loadu_ps(w + j * ws + p);
        for (int d = 0; d < dims; d++) {
            const __m256 v = _mm256_loadu_ps(vt + d * STRETCH + p);
            for (int j = 0; j < queries; j++) acc[d][j] = _mm256_fmadd_ps(v, wv[j], acc[d][j]);
        }
    }
    for (int d = 0; d < dims; d++)
        for (int j = 0; j < queries; j++) _mm256_storeu_ps(lanes + j * lq + d * 8, acc[d][j]);
}

/* vt[d][p - p0] = V[p, d] for p in [p0, p0 + STRETCH), 0 past `live`: the stretch transposed,
 * eight positions by eight d's at a time in registers */
static TARGET_AVX2 void transpose_values(const attention_args *a, size_t v0, int vd, int p0, int live, float *vt) {
    const size_t vs = (size_t)(a->v_stride ? a->v_stride : a->kv_stride);
    const int np = live - p0 < STRETCH ? live - p0 : STRETCH, vd8 = vd - vd % 8;
    for (int p = 0; p < STRETCH; p += 8) {
        for (int d = 0; d < vd8; d += 8) {
            __m256 r[8];
            for (int i = 0; i < 8; i++)
                r[i] = p + i < np ? load8_avx2(a->v, a->v16, (size_t)(p0 + p + i) * vs + v0 + d) : _mm256_setzero_ps();
            const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
            const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
            const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
            const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
            const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
            const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
            const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
            const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
            float *o = vt + (size_t)d * STRETCH + p;
            _mm256_storeu_ps(o + 0 * STRETCH, _mm256_permute2f128_ps(u0, u4, 0x20));
            _mm256_storeu_ps(o + 1 * STRETCH, _mm256_permute2f128_ps(u1, u5, 0x20));
            _mm256_storeu_ps(o + 2 * STRETCH, _mm256_permute2f128_ps(u2, u6, 0x20));
            _mm256_storeu_ps(o + 3 * STRETCH, _mm256_permute2f128_ps(u3, u7, 0x20));
            _mm256_storeu_ps(o + 4 * STRETCH, _mm256_permute2f128_ps(u0, u4, 0x31));
            _mm256_storeu_ps(o + 5 * STRETCH, _mm256_permute2f128_ps(u1, u5, 0x31));
            _mm256_storeu_ps(o + 6 * STRETCH, _mm256_permute2f128_ps(u2, u6, 0x31));
            _mm256_storeu_ps(o + 7 * STRETCH, _mm256_permute2f128_ps(u3, u7, 0x31));
        }
        for (int d = vd8; d < vd; d++)
            for (int i = 0; i < 8; i++) {
                const size_t at = (size_t)(p0 + p + i) * vs + v0 + d;
                vt[(size_t)d * STRETCH + p + i] = p + i >= np ? 0.0f : a->v16 ? fp16_to_fp32(a->v16[at]) : a->v[at];
            }
    }
}

static int tile_tokens(const attention_args *a) {
    const int group = a->n_head / a->n_head_kv;
    const int t = 32 / group;
    return t < 2 ? 2 : t > 16 ? 16 : t;
}

static size_t tile_floats(const attention_args *a, int live) {
    const size_t queries = (size_t)(a->n_head / a->n_head_kv) * tile_tokens(a);
    const size_t hd = a->head_dim, vd = a->v_dim ? a->v_dim : a->head_dim;
    return queries * hd + queries * ((size_t)live + 8) + vd * STRETCH + queries * vd * 8;
}

/* Item i: KV head g = i / tiles, tokens [t0, t0 + tile) */
static TARGET_AVX2 void attend_tile_avx2(const attention_args *a, int i, int live_max, float *scratch) {
    const int group = a->n_head / a->n_head_kv, tile = tile_tokens(a), tiles = (a->n + tile - 1) / tile;
    const int g = i / tiles, t0 = i % tiles * tile, nt = a->n - t0 < tile ? a->n - t0 : tile;
    const int hd = a->head_dim, vd = a->v_dim ? a->v_dim : hd, queries = group * nt;
    const int live = view_of(a, t0 + nt - 1).n_visit; /* the tile's last token sees the most cells */
    const size_t ss = (size_t)live_max + 8, lq = (size_t)vd * 8;
    float *qs = scratch, *scores = qs + (size_t)queries * hd, *vt = scores + (size_t)queries * ss, *lanes = vt + (size_t)vd * STRETCH;
    /* query j = head (g * group + j / nt) of token t0 + j % nt, rounded to F16 for an F16 K */
    for (int j = 0; j < queries; j++) {
        const float *q = a->q + (size_t)(t0 + j % nt) * a->q_stride + (size_t)(g * group + j / nt) * hd;
        for (int c = 0; c < hd; c++) qs[(size_t)j * hd + c] = a->k16 ? round_f16(q[c]) : q[c];
    }
    if (a->k16 && a->kq_gemm8) {
        const uint16_t *k = a->k16 + (size_t)g * hd;
        const size_t ks = (size_t)a->kv_stride;
        int p = 0;
        for (; p + TILE_ROWS <= live; p += TILE_ROWS) {
            int j = 0;
            for (; j + TILE_QUERIES <= queries; j += TILE_QUERIES)
                kq_tile(k + p * ks, ks, qs + (size_t)j * hd, hd, TILE_ROWS, TILE_QUERIES, a->scale, scores + j * ss + p, ss);
            for (; j < queries; j++) kq_tile(k + p * ks, ks, qs + (size_t)j * hd, hd, TILE_ROWS, 1, a->scale, scores + j * ss + p, ss);
        }
        for (; p < live; p++)
            for (int j = 0; j < queries; j++) kq_tile(k + p * ks, ks, qs + (size_t)j * hd, hd, 1, 1, a->scale, scores + j * ss + p, ss);
    } else {
        for (int j = 0; j < queries; j++) {
            float *s = scores + j * ss;
            scores_avx2(a, qs + (size_t)j * hd, (size_t)g * hd, live, s);
            for (int p = 0; p < live; p++) s[p] *= a->scale;
        }
    }
    for (int j = 0; j < queries; j++) {
        const cell_view cells = view_of(a, t0 + j % nt);
        float *s = scores + j * ss;
        for (int p = cells.n_visit; p < live; p++) s[p] = -INFINITY; /* after this token: causal */
        if (cells.cell_pos || cells.wrapped || (cells.window && cells.pos >= cells.window))
            for (int p = 0; p < cells.n_visit; p++)
                if (!sees(&cells, p)) s[p] = -INFINITY;
        softmax_avx2(s, live, a->sinks ? a->sinks + g * group + j / nt : NULL); /* zeros to a multiple of 8 */
        if (a->v16) /* ggml rounds the probabilities to F16 for an F16 V */
            for (int p = 0; p < live; p += 8)
                _mm256_storeu_ps(s + p, _mm256_cvtph_ps(_mm256_cvtps_ph(_mm256_loadu_ps(s + p), _MM_FROUND_TO_NEAREST_INT)));
    }
    memset(lanes, 0, sizeof(float) * queries * lq);
    for (int p0 = 0; p0 < live; p0 += STRETCH) {
        transpose_values(a, (size_t)g * vd, vd, p0, live, vt);
        const int np = live - p0 < STRETCH ? (live - p0 + 7) / 8 * 8 : STRETCH;
        for (int d = 0; d < vd; d += TILE_ROWS) { /* vd % 4 == 0 with gemm8 */
            int j = 0;
            for (; j + TILE_QUERIES <= queries; j += TILE_QUERIES)
                v_tile(vt + d * STRETCH, scores + j * ss + p0, ss, np, TILE_ROWS, TILE_QUERIES, lanes + j * lq + d * 8, lq);
            for (; j < queries; j++)
                v_tile(vt + d * STRETCH, scores + j * ss + p0, ss, np, TILE_ROWS, 1, lanes + j * lq + d * 8, lq);
        }
    }
    for (int j = 0; j < queries; j++) {
        float *o = a->out + ((size_t)(t0 + j % nt) * a->n_head + g * group + j / nt) * vd;
        for (int d = 0; d < vd; d++) o[d] = hsum8_portable(lanes + j * lq + d * 8);
    }
}
#endif

float vec_dot_f16_ggml(const uint16_t *x, const float *y, int n, int use_avx2) {
#ifdef OFFLOAD_X86
    if (use_avx2) return dot_f16_avx2(x, y, n, 0);
#endif
    (void)use_avx2;
    return dot_f16_portable(x, y, n, 0);
}

uint16_t fp32_to_fp16_bits(float x) {
    const float r = round_f16(x); /* now exact in a half */
    uint32_t u;
    memcpy(&u, &r, 4);
    const uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    const uint32_t a = u & 0x7FFFFFFFu;
    if (a > 0x7F800000u) return sign | 0x7E00u;                                 /* nan */
    if (a >= 0x47800000u) return sign | 0x7C00u;                                /* inf */
    if (a < 0x38800000u) return sign | (uint16_t)(fabsf(r) * 16777216.0f);      /* subnormal: units of 2^-24 */
    return sign | (uint16_t)((((a >> 23) - 112) << 10) | ((a >> 13) & 0x3FFu));
}

/* Cells a query visits at most: the used ones after a context shift, else up to the last new position. */
static int cells_visited(const attention_args *a) {
    if (a->cell_pos) return a->n_used;
    return a->start + a->n < a->n_cells ? a->start + a->n : a->n_cells;
}

size_t attention_item_floats(const attention_args *a) {
    const int end = cells_visited(a);
    const size_t wide = (size_t)(a->v_dim > a->head_dim ? a->v_dim : a->head_dim);
    return (size_t)end + 8 + 33 * wide;
}

void attention_item(const attention_args *a, int i, float *scratch, int use_avx2) {
    const int end = cells_visited(a);
    const size_t wide = (size_t)(a->v_dim > a->head_dim ? a->v_dim : a->head_dim);
    /* probabilities (padded to 8), the 32 lanes of V sums, an F16-rounded query */
    float *probs = scratch, *vacc = scratch + end + 8, *qr = vacc + 32 * wide;
    const int h = i / a->n, t = i % a->n;
#ifdef OFFLOAD_X86
    if (use_avx2) {
        attend_avx2(a, h, t, probs, vacc, qr);
        return;
    }
#endif
    (void)use_avx2;
    attend_portable(a, h, t, probs, vacc, qr);
}

int attention_run(const attention_args *a, int use_avx2) {
    const int end = cells_visited(a);
    int failed = 0;
#ifdef OFFLOAD_X86
    if (use_avx2 && a->gemm8 && a->n >= 8) { /* a prompt: tiles of queries */
        const int tile = tile_tokens(a), items = a->n_head_kv * ((a->n + tile - 1) / tile);
#pragma omp parallel
        {
            float *scratch = malloc(sizeof(float) * tile_floats(a, end));
#pragma omp for schedule(dynamic, 1) /* a causal prompt's later tiles cost more */
            for (int i = 0; i < items; i++) {
                if (!scratch) {
                    failed = 1;
                    continue;
                }
                attend_tile_avx2(a, i, end, scratch);
            }
            free(scratch);
        }
        return failed ? -1 : 0;
    }
#endif
    const int items = a->n_head * a->n;
#pragma omp parallel if (items > 1 && (size_t)items * end * a->head_dim >= 16384)
    {
        float *scratch = malloc(sizeof(float) * attention_item_floats(a));
#pragma omp for schedule(static, 1) /* interleaved: a causal prompt's later queries cost more */
        for (int i = 0; i < items; i++) {
            if (!scratch) {
                failed = 1;  /* racy but monotonic: any thread that fails says so */
                continue;
            }
            attention_item(a, i, scratch, use_avx2);
        }
        free(scratch);
    }
    return failed ? -1 : 0;
}
