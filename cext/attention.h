/* Attention over one layer's F32 or F16 KV cache (attention.c). */
#ifndef OFFLOAD_ATTENTION_H
#define OFFLOAD_ATTENTION_H

#include <stdint.h>

/* Which cells the query of new token t (of n, from position start) visits (0 .. n_visit) and
 * which of them it sees: while the positions fit the cells, cell c holds position c and the
 * causal tail is not visited; once they wrap, cell c holds the latest position written there;
 * after a context shift (cell_pos) each used cell says its position. */
typedef struct {
    int pos, last, n_visit, n_cells, window, wrapped;
    const int32_t *cell_pos; /* after a context shift: each cell's position (-1: empty) */
} cell_view;

static inline cell_view cells_of(int start, int n, int t, int n_cells, int window, const int32_t *cell_pos, int n_used) {
    cell_view w;
    w.pos = start + t;
    w.last = start + n - 1;
    w.n_cells = n_cells;
    w.window = window;
    w.wrapped = w.last >= n_cells;
    w.n_visit = w.wrapped ? n_cells : w.pos + 1;
    w.cell_pos = cell_pos;
    if (cell_pos) w.n_visit = n_used;
    return w;
}

static inline int sees(const cell_view *w, int c) {
    const int p = w->cell_pos ? w->cell_pos[c] : w->wrapped ? w->last - (w->last - c) % w->n_cells : c;
    return p >= 0 && p <= w->pos && (w->window == 0 || w->pos - p < w->window);
}

typedef struct {
    const float *q;      /* (n, q_stride): queries of the new tokens, head h at h*head_dim;
                          * out is (n, n_head * v_dim), head h at h*v_dim */
    const float *k, *v;  /* (n_cells, kv_stride): this layer's cache, position p in cell p % n_cells */
    float *out;
    const float *sinks;  /* NULL, or one logit per head that joins its softmax (no value) */
    int n, start, n_head, n_head_kv, head_dim, q_stride, kv_stride;
    int n_cells;         /* rows of the cache: >= start + n, or a ring of >= window + n rows */
    int window;          /* a query sees keys < window positions back; 0: all */
    int v_dim, v_stride; /* a value head's width and the V rows' stride (0: head_dim, kv_stride);
                          * MLA passes v = k, v_dim < head_dim: values are a prefix of the keys */
    int gemm8;           /* V sums in tinyBLAS's 8-lane order (else vec_dot_f32's 32) */
    const uint16_t *k16, *v16; /* or NULL: an F16 cache instead of k / v (same strides, in halves) */
    int kq_gemm8;        /* with k16: K.q in tinyBLAS's 8-lane order (2+ tokens, head_dim % 8 == 0) */
    float scale;
    const int32_t *cell_pos; /* NULL: position p in cell p % n_cells; else after a context shift the
                              * position of cells 0 .. n_used-1 (-1: empty), which are visited */
    int n_used;
} attention_args;

/* float -> IEEE half bits, rounded to nearest even (ggml's fp32_to_fp16, F16C's): how an
 * F16 cache stores a key or value (ggml_set_rows). */
uint16_t fp32_to_fp16_bits(float x);

/* ggml_vec_dot_f16 (32 lanes folded as vec_dot_f32's, the tail in double) of an F16 row and
 * floats already rounded to F16. */
float vec_dot_f16_ggml(const uint16_t *x, const float *y, int n, int use_avx2);

/* 0 on success, -1 when scratch memory could not be allocated */
int attention_run(const attention_args *a, int use_avx2);

/* One item (query head h of token t: i = h * n + t) of attention_run, for a caller that
 * shares the items among its own threads; scratch: attention_item_floats(a) floats. */
void attention_item(const attention_args *a, int i, float *scratch, int use_avx2);
size_t attention_item_floats(const attention_args *a);

#endif
