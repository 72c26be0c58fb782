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
 */
#include "layer.h"

#include <math.h>
#include <stdlib.h>

#include "attention.h"
#include "ops.h"
#include "quantize.h"

/* out = m . x for one token: x quantized for m's kind into `act` (per kind n_cols int8 and
 * n_cols/32 floats; n_cols/16 int16 of Q8_K block sums, or n_cols/32 floats of Q8_1's s),
 * then the row dots. */
static void matvec(const layer_matrix *m, const float *x, int n_cols, float *out, act_scratch *act) {
    const int kind = m->f->act;
    if (act->done[kind] != x) { /* the same input quantized once per kind */
        quantize_row_kind(kind, x, act->qs[kind], act->d[kind], act->sums[kind], n_cols);
        act->done[kind] = x;
    }
    run_matmul(m->dot, m->f, m->w, act->qs[kind], act->d[kind], act->sums[kind], out, m->n_rows, n_cols, 1);
}

static void add_bias(float *x, const float *b, int n) {
    if (b)
        for (int i = 0; i < n; i++) x[i] = x[i] + b[i];
}

int attention_token(const attention_block *b, float *x, float *scratch, int use_avx2) {
    const int n_embd = b->n_embd, hd = b->head_dim;
    const int q_dim = b->n_head * hd, kv_dim = b->n_head_kv * hd;
    float *h = scratch, *q = h + n_embd, *k = q + q_dim, *v = k + kv_dim, *att = v + kv_dim, *o = att + q_dim;
    const int widest = n_embd > q_dim ? n_embd : q_dim;
    act_scratch act;
    uint8_t *p = (uint8_t *)(o + n_embd);
    for (int kind = 0; kind < ACT_KINDS; kind++) { /* scales, sums (Q8_K's or Q8_1's), int8 values */
        act.d[kind] = (float *)p;
        act.sums[kind] = (int16_t *)(act.d[kind] + widest / 32);
        act.qs[kind] = (int8_t *)(act.sums[kind] + widest / 16);
        act.done[kind] = NULL;
        p = (uint8_t *)(act.qs[kind] + widest);
    }

    rms_norm_rows(x, b->norm, b->eps, h, 1, n_embd);
    matvec(&b->wq, h, n_embd, q, &act);
    matvec(&b->wk, h, n_embd, k, &act);
    matvec(&b->wv, h, n_embd, v, &act);
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
    attention_args a = {0};
    if (b->k_f16) {
        uint16_t *row = (uint16_t *)b->k_cache + cell * kv_dim;
        for (int i = 0; i < kv_dim; i++) row[i] = fp32_to_fp16_bits(k[i]);
        a.k16 = (const uint16_t *)b->k_cache;
    } else {
        float *row = b->k_cache + cell * kv_dim;
        for (int i = 0; i < kv_dim; i++) row[i] = k[i];
        a.k = b->k_cache;
    }
    if (b->v_f16) {
        uint16_t *row = (uint16_t *)b->v_cache + cell * kv_dim;
        for (int i = 0; i < kv_dim; i++) row[i] = fp32_to_fp16_bits(v[i]);
        a.v16 = (const uint16_t *)b->v_cache;
    } else {
        float *row = b->v_cache + cell * kv_dim;
        for (int i = 0; i < kv_dim; i++) row[i] = v[i];
        a.v = b->v_cache;
    }
    a.q = q, a.out = att;
    a.n = 1, a.start = b->pos, a.n_head = b->n_head, a.n_head_kv = b->n_head_kv, a.head_dim = hd;
    a.q_stride = q_dim, a.kv_stride = kv_dim;
    a.n_cells = b->n_cells, a.window = b->window, a.sinks = b->sinks;
    a.gemm8 = 0; /* one token: llama.cpp sums V by vec_dot_f32 (tinyBLAS wants 2+ columns) */
    a.scale = 1.0f / sqrtf((float)hd);
    if (attention_run(&a, use_avx2) < 0) return -1;

    for (int kind = 0; kind < ACT_KINDS; kind++) act.done[kind] = NULL;
    matvec(&b->wo, att, q_dim, o, &act);
    add_bias(o, b->bo, n_embd);
    for (int i = 0; i < n_embd; i++) x[i] = x[i] + o[i];
    return 0;
}

size_t attention_token_scratch_bytes(int n_embd, int n_head, int n_head_kv, int head_dim) {
    const size_t q_dim = (size_t)n_head * head_dim, kv_dim = (size_t)n_head_kv * head_dim;
    const size_t widest = (size_t)n_embd > q_dim ? (size_t)n_embd : q_dim;
    return (2 * (size_t)n_embd + 2 * q_dim + 2 * kv_dim) * sizeof(float) +
           ACT_KINDS * (widest + (widest / 32) * sizeof(float) + (widest / 16) * sizeof(int16_t)) + 64;
}
