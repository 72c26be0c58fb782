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

/* Which cells query t visits (0 .. n_visit) and which of them it sees: while the positions
 * fit the cells, cell c holds position c and the causal tail is not visited; once they wrap,
 * cell c holds the latest position written there. */
typedef struct {
    int pos, last, n_visit, n_cells, window, wrapped;
    const int32_t *cell_pos; /* after a context shift: each cell's position (-1: empty) */
} cell_view;

static inline cell_view view_of(const attention_args *a, int t) {
    cell_view w;
    w.pos = a->start + t;
    w.last = a->start + a->n - 1;
    w.n_cells = a->n_cells;
    w.window = a->window;
    w.wrapped = w.last >= a->n_cells;
    w.n_visit = w.wrapped ? a->n_cells : w.pos + 1;
    w.cell_pos = a->cell_pos;
    if (a->cell_pos) w.n_visit = a->n_used;
    return w;
}

static inline int sees(const cell_view *w, int c) {
    const int p = w->cell_pos ? w->cell_pos[c] : w->wrapped ? w->last - (w->last - c) % w->n_cells : c;
    return p >= 0 && p <= w->pos && (w->window == 0 || w->pos - p < w->window);
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

static TARGET_AVX2 void attend_avx2(const attention_args *a, int h, int t, float *probs, float *vacc, float *qr) {
    const cell_view cells = view_of(a, t);
    const int hd = a->head_dim, live = cells.n_visit, g = h / (a->n_head / a->n_head_kv);
    const int vd = a->v_dim ? a->v_dim : hd, vs = a->v_stride ? a->v_stride : a->kv_stride;
    const int kv0 = g * hd, v0 = g * vd;
    const float *q = query_of(a, h, t, qr);
    for (int p = 0; p < live; p++) {
        const size_t row = (size_t)p * a->kv_stride + kv0;
        probs[p] = !sees(&cells, p) ? -INFINITY
                   : (a->k16 ? dot_f16_avx2(a->k16 + row, q, hd, a->kq_gemm8) : dot_f32_avx2(a->k + row, q, hd))
                         * a->scale;
    }
    softmax_avx2(probs, live, a->sinks ? a->sinks + h : NULL);
    const int width = a->gemm8 ? 8 : 32, vd8 = vd - vd % 8;
    memset(vacc, 0, sizeof(float) * 32 * vd);
    for (int p = 0; p < live; p++) {
        const float wp = a->v16 ? round_f16(probs[p]) : probs[p];
        if (wp == 0.0f) continue; /* masked: adds exactly +0 */
        float *lane = vacc + (p % width) * vd;
        const __m256 w = _mm256_set1_ps(wp);
        int d = 0;
        if (a->v16) {
            const uint16_t *v = a->v16 + (size_t)p * vs + v0;
            for (; d < vd8; d += 8) {
                const __m256 vv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(v + d)));
                _mm256_storeu_ps(lane + d, _mm256_fmadd_ps(vv, w, _mm256_loadu_ps(lane + d)));
            }
            for (; d < vd; d++) lane[d] = fmaf(fp16_to_fp32(v[d]), wp, lane[d]);
        } else {
            const float *v = a->v + (size_t)p * vs + v0;
            for (; d < vd8; d += 8)
                _mm256_storeu_ps(lane + d, _mm256_fmadd_ps(_mm256_loadu_ps(v + d), w, _mm256_loadu_ps(lane + d)));
            for (; d < vd; d++) lane[d] = fmaf(v[d], wp, lane[d]);
        }
    }
    float *o = a->out + ((size_t)t * a->n_head + h) * vd;
    for (int d = 0; d < vd; d++) {
        float col[32];
        for (int l = 0; l < width; l++) col[l] = vacc[l * vd + d];
        o[d] = a->gemm8 ? hsum8_portable(col) : fold32(col);
    }
}
#endif

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
    const int items = a->n_head * a->n;
    const int end = cells_visited(a);
    int failed = 0;
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
