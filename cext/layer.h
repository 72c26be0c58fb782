/* A decoding token's attention block in one call (layer.c). */
#ifndef OFFLOAD_LAYER_H
#define OFFLOAD_LAYER_H

#include <stddef.h>
#include <stdint.h>

#include "kernels.h"

typedef struct {
    const format_kernels *f;
    row_dot_fn dot;
    const uint8_t *w;
    int n_rows;
} layer_matrix;

/* One input quantized per activation kind, reused by the matmuls that share it. */
typedef struct {
    int8_t *qs[ACT_KINDS];
    float *d[ACT_KINDS];
    int16_t *sums[ACT_KINDS];     /* Q8_K's block sums, Q8_1's s (the same bytes) */
    const float *done[ACT_KINDS]; /* the input each kind holds now */
} act_scratch;

enum { QK_NORM_NONE = 0, QK_NORM_HEAD = 1, QK_NORM_FULL = 2 };

typedef struct {
    int n_embd, n_head, n_head_kv, head_dim, rope_dim, neox, qk_norm, pos;
    int window;                          /* keys fewer than this many positions back; 0: all */
    float eps;
    const float *norm;                   /* attn_norm (n_embd) */
    layer_matrix wq, wk, wv, wo;
    const float *bq, *bk, *bv;           /* or NULL */
    const float *q_norm, *k_norm;        /* per head (head_dim) or whole (n_head * head_dim ...), or NULL */
    const float *bo;                     /* or NULL: the output projection's bias (n_embd) */
    const float *sinks;                  /* or NULL: one sink logit per head (n_head) */
    const float *cos, *sin;              /* this position's RoPE table row (rope_dim / 2) */
    float *k_cache, *v_cache;            /* this layer's (n_cells, n_head_kv * head_dim): position p in
                                          * cell p % n_cells (a ring for a sliding-window layer) */
    int n_cells;
    int k_f16, v_f16;                    /* the cache holds F16 halves (uint16_t) instead of floats */
} attention_block;

/* x (n_embd) += the block's output for the token at position pos, whose k and v are written
 * into cell pos % n_cells of the cache, in one parallel region (parallel: on the OpenMP
 * team, else on this thread). scratch: attention_token_scratch_bytes. 0, or -1 if out of memory. */
int attention_token(const attention_block *b, float *x, float *scratch, int use_avx2, int parallel);

/* The same as phases for thread ith of a team of nth inside the caller's parallel region
 * (barriers between them; x is complete once every thread has returned and passed a
 * barrier). thread_scratch: this thread's attention_token_thread_floats(b) floats. */
void attention_token_phases(const attention_block *b, float *x, float *scratch, float *thread_scratch, int ith,
                            int nth, int use_avx2);
size_t attention_token_thread_floats(const attention_block *b);
size_t attention_token_scratch_bytes(int n_embd, int n_head, int n_head_kv, int head_dim);

/* DeepSeek's multi-head latent attention in llama.cpp's absorbed form (forward.Transformer.
 * _latent_attention): the cache holds [latent (kv_lora_rank), rope key (rope_dim)] per token;
 * each head's query is [k_b . q_nope, rope(q_pe)], attention runs over the cache as one KV
 * head whose first kv_lora_rank floats are the values, v_b maps each head's result back out. */
typedef struct {
    int n_embd, n_head, head_dim, rope_dim, neox, pos; /* head_dim: a query head's nope + rope dims */
    int kv_lora_rank, v_head_dim, q_lora_rank;          /* q_lora_rank 0: one plain wq */
    float eps, scale;                                   /* scale: of the scores (forward's _mla_scale) */
    const float *norm;                                  /* attn_norm (n_embd) */
    const float *q_a_norm, *kv_a_norm;                  /* (q_lora_rank) or NULL, (kv_lora_rank) */
    layer_matrix wq;           /* x (or the normed q_a) -> n_head * head_dim: wq, or wq_b */
    layer_matrix wq_a;         /* x -> q_lora_rank, when q_lora_rank > 0 */
    layer_matrix wkv_a;        /* x -> kv_lora_rank + rope_dim */
    layer_matrix wk_b, wv_b;   /* one head's rows (n_rows: kv_lora_rank; v_head_dim), the heads one after another */
    layer_matrix wo;           /* n_head * v_head_dim -> n_embd */
    const float *cos, *sin;    /* this position's RoPE table row (rope_dim / 2) */
    float *cache;              /* (n_cells, kv_lora_rank + rope_dim): position p in cell p */
    int n_cells, f16;          /* f16: the cache holds F16 halves */
} latent_block;

/* x (n_embd) += the MLA block's output for the token at pos, as attention_token_phases: thread
 * ith of nth inside the caller's parallel region, barriers between the phases. */
void latent_token_phases(const latent_block *b, float *x, float *scratch, float *thread_scratch, int ith, int nth,
                         int use_avx2);
size_t latent_token_thread_floats(const latent_block *b);
size_t latent_token_scratch_bytes(const latent_block *b);

#endif
