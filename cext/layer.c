/* A decoding token's attention block in one call: x += wo . attention(rope(qkv(rms_norm(x)))).
 *
 * For one token every step of the block is small (a model of width 1024 reads ~3 MB of
 * attention weights per layer), so the Python between the steps (a norm, a matmul group,
 * biases, q/k norms, two RoPE calls, the cache writes, attention, the output matmul, the
 * residual add) costs as much as the steps. Here they run back to back in C, each as
 * offload computes it step by step (ggml_math, dispatch, attention), so the bits are the
 * same (the small ops are ops.c's, the twins of ggml_math's):
 *
 *   rms_norm     squares summed in double in order; scale = 1 / sqrtf(float(sum / n) + eps)
 *   q, k, v      the activations quantized once per kind, the row dots (run_matmul)
 *   biases       q + bq, k + bk, v + bv in float32
 *   q/k norms    rms_norm per head (qk_norm 1) or over the whole projection (qk_norm 2)
 *   RoPE         (a, b) -> (fma(a, cos, -(b sin)), fma(a, sin, b cos)), NORM or NEOX pairs
 *   attention    attention.c over the cache, after writing this token's k and v into cell
 *                pos % n_cells (a sliding-window layer's ring), with the window and sinks
 *   wo           the row dots again; out += bo if any; then x += out in float32
 *
 * The steps run as phases over a team of threads (attention_token_phases), the row dots
 * and the attention heads shared among them, the small steps on thread 0, a barrier between
 * phases: inside one parallel region per call (attention_token) or inside the caller's
 * region for a whole decode step (step.c). How the work is shared never changes a value.
 */
#include "layer.h"

#include <math.h>
#include <omp.h>
#include <stdlib.h>

#include "attention.h"
#include "moe.h"
#include "ops.h"
#include "quantize.h"

/* The block's buffers in its scratch: the normed input, q, k, v, the heads' outputs, the
 * output projection, then per activation kind the quantized input of the matmuls. */
typedef struct {
    float *h, *q, *k, *v, *att, *o;
    act_row act[ACT_KINDS];
} block_buffers;

static block_buffers buffers_of(const attention_block *b, float *scratch) {
    const int n_embd = b->n_embd, q_dim = b->n_head * b->head_dim, kv_dim = b->n_head_kv * b->head_dim;
    const int widest = n_embd > q_dim ? n_embd : q_dim;
    block_buffers buf;
    buf.h = scratch, buf.q = buf.h + n_embd, buf.k = buf.q + q_dim, buf.v = buf.k + kv_dim;
    buf.att = buf.v + kv_dim, buf.o = buf.att + q_dim;
    uint8_t *p = (uint8_t *)(buf.o + n_embd);
    for (int kind = 0; kind < ACT_KINDS; kind++) { /* scales, sums (Q8_K's or Q8_1's), int8 values */
        buf.act[kind].d = (float *)p;
        buf.act[kind].bsums = (int16_t *)(buf.act[kind].d + widest / 32);
        buf.act[kind].qs = (int8_t *)(buf.act[kind].bsums + widest / 16);
        p = (uint8_t *)(buf.act[kind].qs + widest);
    }
    return buf;
}

static void quantize_for(const block_buffers *buf, int kind, const float *x, int n) {
    const act_row *a = &buf->act[kind];
    quantize_row_kind(kind, x, (int8_t *)a->qs, (float *)a->d, (int16_t *)a->bsums, n);
}

/* This thread's rows of matrices laid end to end (all taking the same n_cols input). */
static void rows_of(const layer_matrix *const *m, float *const *out, int n_mats, const block_buffers *buf, int n_cols,
                    int ith, int nth) {
    size_t total = 0, lo, hi, first = 0;
    for (int i = 0; i < n_mats; i++) total += (size_t)m[i]->n_rows;
    thread_share(total, ith, nth, &lo, &hi);
    for (int i = 0; i < n_mats && lo < hi; first += (size_t)m[i]->n_rows, i++) {
        const size_t end = first + (size_t)m[i]->n_rows;
        if (lo >= end) continue;
        const format_kernels *f = m[i]->f;
        const size_t row_bytes = (size_t)(n_cols / f->block_size) * (size_t)f->block_bytes;
        for (; lo < hi && lo < end; lo++)
            out[i][lo - first] = m[i]->dot(m[i]->w + (lo - first) * row_bytes, &buf->act[f->act], n_cols);
    }
}

static void add_bias(float *x, const float *b, int n) {
    if (b)
        for (int i = 0; i < n; i++) x[i] = x[i] + b[i];
}

/* q/k norms, RoPE, and this token's key and value into the cache (thread 0's phase). */
static void position_and_store(const attention_block *b, const block_buffers *buf, int use_avx2) {
    const int hd = b->head_dim, q_dim = b->n_head * hd, kv_dim = b->n_head_kv * hd;
    float *q = buf->q, *k = buf->k, *v = buf->v;
    add_bias(q, b->bq, q_dim);
    add_bias(k, b->bk, kv_dim);
    add_bias(v, b->bv, kv_dim);
    if (b->qk_norm == QK_NORM_FULL) {
        rms_norm_rows(q, b->q_norm, b->eps, q, 1, q_dim);
        rms_norm_rows(k, b->k_norm, b->eps, k, 1, kv_dim);
    } else if (b->qk_norm == QK_NORM_HEAD) {
        rms_norm_rows(q, b->q_norm, b->eps, q, b->n_head, hd);
        rms_norm_rows(k, b->k_norm, b->eps, k, b->n_head_kv, hd);
    }
    rope_rows(q, b->cos, b->sin, 1, b->n_head, hd, b->rope_dim, b->neox, use_avx2);
    rope_rows(k, b->cos, b->sin, 1, b->n_head_kv, hd, b->rope_dim, b->neox, use_avx2);
    const size_t cell = (size_t)(b->pos % b->n_cells);
    if (b->k_f16) {
        uint16_t *row = (uint16_t *)b->k_cache + cell * kv_dim;
        for (int i = 0; i < kv_dim; i++) row[i] = fp32_to_fp16_bits(k[i]);
    } else {
        float *row = b->k_cache + cell * kv_dim;
        for (int i = 0; i < kv_dim; i++) row[i] = k[i];
    }
    if (b->v_f16) {
        uint16_t *row = (uint16_t *)b->v_cache + cell * kv_dim;
        for (int i = 0; i < kv_dim; i++) row[i] = fp32_to_fp16_bits(v[i]);
    } else {
        float *row = b->v_cache + cell * kv_dim;
        for (int i = 0; i < kv_dim; i++) row[i] = v[i];
    }
}

static attention_args attention_of(const attention_block *b, const block_buffers *buf) {
    const int hd = b->head_dim, q_dim = b->n_head * hd, kv_dim = b->n_head_kv * hd;
    attention_args a = {0};
    if (b->k_f16) a.k16 = (const uint16_t *)b->k_cache;
    else a.k = b->k_cache;
    if (b->v_f16) a.v16 = (const uint16_t *)b->v_cache;
    else a.v = b->v_cache;
    a.q = buf->q, a.out = buf->att;
    a.n = 1, a.start = b->pos, a.n_head = b->n_head, a.n_head_kv = b->n_head_kv, a.head_dim = hd;
    a.q_stride = q_dim, a.kv_stride = kv_dim;
    a.n_cells = b->n_cells, a.window = b->window, a.sinks = b->sinks;
    a.gemm8 = 0; /* one token: llama.cpp sums V by vec_dot_f32 (tinyBLAS wants 2+ columns) */
    a.scale = 1.0f / sqrtf((float)hd);
    return a;
}

size_t attention_token_thread_floats(const attention_block *b) {
    const block_buffers none = {0};
    const attention_args a = attention_of(b, &none);
    return attention_item_floats(&a);
}

void attention_token_phases(const attention_block *b, float *x, float *scratch, float *thread_scratch, int ith,
                            int nth, int use_avx2) {
    const int n_embd = b->n_embd, q_dim = b->n_head * b->head_dim;
    const block_buffers buf = buffers_of(b, scratch);

    if (ith == 0) { /* the normed input, quantized once per kind the projections take */
        rms_norm_rows(x, b->norm, b->eps, buf.h, 1, n_embd);
        int done[ACT_KINDS] = {0};
        const layer_matrix *in[3] = {&b->wq, &b->wk, &b->wv};
        for (int i = 0; i < 3; i++)
            if (!done[in[i]->f->act]++) quantize_for(&buf, in[i]->f->act, buf.h, n_embd);
    }
#pragma omp barrier
    {
        const layer_matrix *m[3] = {&b->wq, &b->wk, &b->wv};
        float *out[3] = {buf.q, buf.k, buf.v};
        rows_of(m, out, 3, &buf, n_embd, ith, nth);
    }
#pragma omp barrier
    if (ith == 0) position_and_store(b, &buf, use_avx2);
#pragma omp barrier
    {
        const attention_args a = attention_of(b, &buf);
        for (int h = ith; h < b->n_head; h += nth) attention_item(&a, h, thread_scratch, use_avx2);
    }
#pragma omp barrier
    if (ith == 0) quantize_for(&buf, b->wo.f->act, buf.att, q_dim);
#pragma omp barrier
    {
        const layer_matrix *m[1] = {&b->wo};
        float *out[1] = {buf.o};
        rows_of(m, out, 1, &buf, q_dim, ith, nth);
    }
#pragma omp barrier
    if (ith == 0) {
        add_bias(buf.o, b->bo, n_embd);
        for (int i = 0; i < n_embd; i++) x[i] = x[i] + buf.o[i];
    }
}

int attention_token(const attention_block *b, float *x, float *scratch, int use_avx2, int parallel) {
    const int n_threads = parallel ? omp_get_max_threads() : 1;
    const size_t per_thread = attention_token_thread_floats(b);
    float *thread_scratch = malloc(sizeof(float) * per_thread * (size_t)n_threads);
    if (!thread_scratch) return -1;
#pragma omp parallel num_threads(n_threads) if (n_threads > 1)
    {
        const int ith = omp_get_thread_num();
        attention_token_phases(b, x, scratch, thread_scratch + per_thread * (size_t)ith, ith, omp_get_num_threads(),
                               use_avx2);
    }
    free(thread_scratch);
    return 0;
}

size_t attention_token_scratch_bytes(int n_embd, int n_head, int n_head_kv, int head_dim) {
    const size_t q_dim = (size_t)n_head * head_dim, kv_dim = (size_t)n_head_kv * head_dim;
    const size_t widest = (size_t)n_embd > q_dim ? (size_t)n_embd : q_dim;
    return (2 * (size_t)n_embd + 2 * q_dim + 2 * kv_dim) * sizeof(float) +
           ACT_KINDS * (widest + (widest / 32) * sizeof(float) + (widest / 16) * sizeof(int16_t)) + 64;
}
