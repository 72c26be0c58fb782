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
static void rows_of(const layer_matrix *const *m, float *const *out, int n_mats, const act_row *act, int n_cols,
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
            out[i][lo - first] = m[i]->dot(m[i]->w + (lo - first) * row_bytes, &act[f->act], n_cols);
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
        rows_of(m, out, 3, buf.act, n_embd, ith, nth);
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
        rows_of(m, out, 1, buf.act, q_dim, ith, nth);
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

/* -- MLA, absorbed (latent_block) ------------------------------------------------------
 * forward.Transformer._latent_attention and _mla_inputs for one token, step by step:
 *
 *   h            rms_norm(x, attn_norm)
 *   q            wq . h, or wq_b . rms_norm(wq_a . h, q_a_norm)
 *   kv           wkv_a . h: [latent, k_pe]; k_pe roped (one head), latent rms_norm(kv_a_norm)
 *   queries      per head [k_b[h] . q_nope[h], rope(q_pe[h])]; k_b's input converted per head
 *                (dispatch.matmul_heads: what one matmul per head gives)
 *   cache        cell pos = [latent, k_pe] (F32, or F16 rounded as ggml's set_rows)
 *   attention    attention.c over the cache as one KV head of kv_lora_rank + rope_dim whose
 *                first kv_lora_rank values are the values, scaled by `scale`
 *   heads        v_b[h] . out[h] per head (converted per head), then wo . heads; x += that */

typedef struct {
    float *h, *qa, *q, *kv, *queries, *att, *heads, *o;
    act_row act[ACT_KINDS]; /* one input per kind, or per head: head h's at h times its share */
} latent_buffers;

static int latent_widest(const latent_block *b) {
    const int nope = b->head_dim - b->rope_dim;
    const int widths[5] = {b->n_embd, b->q_lora_rank, b->n_head * nope, b->n_head * b->kv_lora_rank,
                           b->n_head * b->v_head_dim};
    int widest = 0;
    for (int i = 0; i < 5; i++)
        if (widths[i] > widest) widest = widths[i];
    return widest;
}

static latent_buffers latent_buffers_of(const latent_block *b, float *scratch) {
    const int r = b->kv_lora_rank, rope = b->rope_dim, widest = latent_widest(b);
    latent_buffers buf;
    buf.h = scratch, buf.qa = buf.h + b->n_embd, buf.q = buf.qa + b->q_lora_rank;
    buf.kv = buf.q + b->n_head * b->head_dim, buf.queries = buf.kv + r + rope;
    buf.att = buf.queries + b->n_head * (r + rope), buf.heads = buf.att + b->n_head * r;
    buf.o = buf.heads + b->n_head * b->v_head_dim;
    uint8_t *p = (uint8_t *)(buf.o + b->n_embd);
    for (int kind = 0; kind < ACT_KINDS; kind++) {
        buf.act[kind].d = (float *)p;
        buf.act[kind].bsums = (int16_t *)(buf.act[kind].d + widest / 32);
        buf.act[kind].qs = (int8_t *)(buf.act[kind].bsums + widest / 16);
        p = (uint8_t *)(buf.act[kind].qs + widest);
    }
    return buf;
}

/* Head h's input (n_cols values) among the heads converted one after another for kind. */
static act_row head_act(const act_row *a, int kind, int h, int n_cols) {
    act_row x;
    x.qs = a->qs + (size_t)h * n_cols;
    x.d = a->d + (size_t)h * (n_cols / act_block(kind)); /* Q8_K: one scale per 256 */
    x.bsums = a->bsums + (size_t)h * (n_cols / 16);
    return x;
}

/* Each head's n_cols inputs (head h's at x + h * x_stride) converted for m's kind. */
static void quantize_heads(const latent_buffers *buf, const layer_matrix *m, const float *x, int x_stride, int n_heads,
                           int n_cols) {
    const int kind = m->f->act;
    for (int h = 0; h < n_heads; h++) {
        const act_row a = head_act(&buf->act[kind], kind, h, n_cols);
        quantize_row_kind(kind, x + (size_t)h * x_stride, (int8_t *)a.qs, (float *)a.d, (int16_t *)a.bsums, n_cols);
    }
}

/* This thread's rows of a per-head matrix (n_heads x m->n_rows rows), head h's into out + h * out_stride. */
static void head_rows_of(const layer_matrix *m, float *out, int out_stride, int n_heads, const latent_buffers *buf,
                         int n_cols, int ith, int nth) {
    const format_kernels *f = m->f;
    const size_t row_bytes = (size_t)(n_cols / f->block_size) * (size_t)f->block_bytes;
    size_t lo, hi;
    thread_share((size_t)n_heads * (size_t)m->n_rows, ith, nth, &lo, &hi);
    for (size_t i = lo; i < hi; i++) {
        const int h = (int)(i / (size_t)m->n_rows), r = (int)(i % (size_t)m->n_rows);
        const act_row a = head_act(&buf->act[f->act], f->act, h, n_cols);
        out[(size_t)h * out_stride + r] = m->dot(m->w + i * row_bytes, &a, n_cols);
    }
}

static attention_args latent_attention_of(const latent_block *b, const latent_buffers *buf) {
    const int width = b->kv_lora_rank + b->rope_dim;
    attention_args a = {0};
    if (b->f16) a.k16 = a.v16 = (const uint16_t *)b->cache;
    else a.k = a.v = b->cache;
    a.q = buf->queries, a.out = buf->att;
    a.n = 1, a.start = b->pos, a.n_head = b->n_head, a.n_head_kv = 1, a.head_dim = width;
    a.q_stride = b->n_head * width, a.kv_stride = width;
    a.v_dim = b->kv_lora_rank, a.v_stride = width; /* the values: each key row's first kv_lora_rank */
    a.n_cells = b->n_cells;
    a.gemm8 = 0; /* one token: vec_dot_f32's order */
    a.scale = b->scale;
    return a;
}

size_t latent_token_thread_floats(const latent_block *b) {
    const latent_buffers none = {0};
    const attention_args a = latent_attention_of(b, &none);
    return attention_item_floats(&a);
}

size_t latent_token_scratch_bytes(const latent_block *b) {
    const size_t r = (size_t)b->kv_lora_rank, rope = (size_t)b->rope_dim, n_head = (size_t)b->n_head;
    const size_t widest = (size_t)latent_widest(b);
    const size_t floats = 2 * (size_t)b->n_embd + (size_t)b->q_lora_rank + n_head * (size_t)b->head_dim + (r + rope) +
                          n_head * (r + rope) + n_head * r + n_head * (size_t)b->v_head_dim;
    return floats * sizeof(float) + ACT_KINDS * (widest + (widest / 32) * sizeof(float) + (widest / 16) * sizeof(int16_t)) +
           64;
}

/* k_pe and the latent, the cache row, the roped q_pe into the queries, q_nope converted for k_b (thread 0's phase). */
static void latent_position_and_store(const latent_block *b, const latent_buffers *buf, int use_avx2) {
    const int r = b->kv_lora_rank, rope = b->rope_dim, width = r + rope, hd = b->head_dim, nope = hd - rope;
    float *kv = buf->kv;
    rope_rows(kv + r, b->cos, b->sin, 1, 1, rope, rope, b->neox, use_avx2);
    rms_norm_rows(kv, b->kv_a_norm, b->eps, kv, 1, r);
    const size_t cell = (size_t)(b->pos % b->n_cells);
    if (b->f16) {
        uint16_t *row = (uint16_t *)b->cache + cell * width;
        for (int i = 0; i < width; i++) row[i] = fp32_to_fp16_bits(kv[i]);
    } else {
        float *row = b->cache + cell * width;
        for (int i = 0; i < width; i++) row[i] = kv[i];
    }
    for (int h = 0; h < b->n_head; h++)
        for (int i = 0; i < rope; i++) buf->queries[(size_t)h * width + r + i] = buf->q[(size_t)h * hd + nope + i];
    rope_rows(buf->queries + r, b->cos, b->sin, 1, b->n_head, width, rope, b->neox, use_avx2);
    quantize_heads(buf, &b->wk_b, buf->q, hd, b->n_head, nope);
}

void latent_token_phases(const latent_block *b, float *x, float *scratch, float *thread_scratch, int ith, int nth,
                         int use_avx2) {
    const int n_embd = b->n_embd, r = b->kv_lora_rank, width = r + b->rope_dim, nope = b->head_dim - b->rope_dim;
    const latent_buffers buf = latent_buffers_of(b, scratch);
    const layer_matrix *first = b->q_lora_rank ? &b->wq_a : &b->wq; /* what takes h beside wkv_a */

    if (ith == 0) {
        rms_norm_rows(x, b->norm, b->eps, buf.h, 1, n_embd);
        quantize_row_kind(first->f->act, buf.h, (int8_t *)buf.act[first->f->act].qs, (float *)buf.act[first->f->act].d,
                          (int16_t *)buf.act[first->f->act].bsums, n_embd);
        if (b->wkv_a.f->act != first->f->act) {
            const act_row *a = &buf.act[b->wkv_a.f->act];
            quantize_row_kind(b->wkv_a.f->act, buf.h, (int8_t *)a->qs, (float *)a->d, (int16_t *)a->bsums, n_embd);
        }
    }
#pragma omp barrier
    {
        const layer_matrix *m[2] = {first, &b->wkv_a};
        float *out[2] = {b->q_lora_rank ? buf.qa : buf.q, buf.kv};
        rows_of(m, out, 2, buf.act, n_embd, ith, nth);
    }
#pragma omp barrier
    if (b->q_lora_rank) {
        if (ith == 0) {
            rms_norm_rows(buf.qa, b->q_a_norm, b->eps, buf.qa, 1, b->q_lora_rank);
            const act_row *a = &buf.act[b->wq.f->act];
            quantize_row_kind(b->wq.f->act, buf.qa, (int8_t *)a->qs, (float *)a->d, (int16_t *)a->bsums, b->q_lora_rank);
        }
#pragma omp barrier
        const layer_matrix *m[1] = {&b->wq};
        float *out[1] = {buf.q};
        rows_of(m, out, 1, buf.act, b->q_lora_rank, ith, nth);
#pragma omp barrier
    }
    if (ith == 0) latent_position_and_store(b, &buf, use_avx2);
#pragma omp barrier
    head_rows_of(&b->wk_b, buf.queries, width, b->n_head, &buf, nope, ith, nth);
#pragma omp barrier
    {
        const attention_args a = latent_attention_of(b, &buf);
        for (int h = ith; h < b->n_head; h += nth) attention_item(&a, h, thread_scratch, use_avx2);
    }
#pragma omp barrier
    if (ith == 0) quantize_heads(&buf, &b->wv_b, buf.att, r, b->n_head, r);
#pragma omp barrier
    head_rows_of(&b->wv_b, buf.heads, b->v_head_dim, b->n_head, &buf, r, ith, nth);
#pragma omp barrier
    if (ith == 0) {
        const act_row *a = &buf.act[b->wo.f->act];
        quantize_row_kind(b->wo.f->act, buf.heads, (int8_t *)a->qs, (float *)a->d, (int16_t *)a->bsums,
                          b->n_head * b->v_head_dim);
    }
#pragma omp barrier
    {
        const layer_matrix *m[1] = {&b->wo};
        float *out[1] = {buf.o};
        rows_of(m, out, 1, buf.act, b->n_head * b->v_head_dim, ith, nth);
    }
#pragma omp barrier
    if (ith == 0)
        for (int i = 0; i < n_embd; i++) x[i] = x[i] + buf.o[i];
}
