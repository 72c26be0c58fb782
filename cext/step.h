/* A whole decoding step (every layer of one token, and the logits) in one call (step.c). */
#ifndef OFFLOAD_STEP_H
#define OFFLOAD_STEP_H

#include <stddef.h>
#include <stdint.h>

#include "layer.h"
#include "moe.h"

/* How a MoE layer turns its router's logits into k experts and their weights (forward.route):
 * scores = softmax / sigmoid / the logits themselves; a selection bias and expert groups
 * (DeepSeek-V3) for choosing; the k best; weights renormalized or a softmax over the k. */
enum {
    ROUTE_SOFTMAX_TOPK = 0,
    ROUTE_SOFTMAX_TOPK_NORM = 1,
    ROUTE_TOPK_SOFTMAX = 2,
    ROUTE_SIGMOID_TOPK = 3,
    ROUTE_SIGMOID_TOPK_NORM = 4,
};

typedef struct {
    int mla;                   /* 0: attn (grouped-query), 1: latent (DeepSeek's MLA) */
    attention_block attn;      /* pos, cos and sin are filled per token */
    latent_block latent;       /* likewise */
    const float *cos, *sin;    /* the layer's RoPE tables: (n_ctx, rope_dim / 2) */
    const float *ffn_norm;     /* (n_embd) */
    /* a dense layer: dense (one SwiGLU FFN); a MoE layer: everything below */
    int n_expert;              /* 0: dense */
    moe_ffn_job dense;
    const float *router;       /* F32 (n_expert, n_embd) */
    const float *router_bias;  /* or NULL: added to the logits */
    const float *selection_bias; /* or NULL: added to the scores for choosing only */
    moe_ffn_job *experts;      /* n_expert jobs (their weight set per token) */
    int has_shared;
    moe_ffn_job shared;
    const float *shared_gate;  /* or NULL: F32 (n_embd): sigmoid(shared_gate . x) scales the shared expert */
} step_layer;

typedef struct {
    int n_layer, n_embd, k, routing, n_ctx, n_threads;
    int n_groups, groups_used; /* expert groups (n_groups > 1): only the best groups_used compete */
    float eps, weights_scale;  /* weights_scale 0 or 1: none */
    step_layer *layers;
    const float *output_norm;  /* (n_embd) */
    layer_matrix output;       /* w NULL: the caller computes the logits */
    /* working memory, allocated with the plan */
    float *attn_scratch;       /* attention_token_scratch_bytes */
    float *thread_scratch;     /* n_threads x attention_token_thread_floats (the longest layer's) */
    size_t thread_floats;
    float *logits, *scores, *choose, *masked, *group_scores, *moe_out, *shared_out, *h;
    int64_t *groups;           /* the kept groups (n_groups) */
    int64_t *chosen;
    float *weights;
    uint8_t *act;              /* the output matmul's quantized input (any kind) */
    void *moe_workspace;
    moe_ffn_job jobs[MOE_MAX_JOBS];
} step_plan;

/* Run the token whose embedding is x (n_embd, float32; overwritten by the last layer's
 * output) at position pos through every layer: chosen / weights (n_layer x k) receive
 * each MoE layer's routing; logits (the output's rows) the logits when the plan has an
 * output matrix. Returns -1 when every layer ran, else the first layer whose output holds a
 * NaN or an infinity (the step stops there). */
int step_run(step_plan *p, float *x, int pos, float *logits, int64_t *chosen, float *weights, int use_avx2);

/* The working memory of a plan whose fields above `attn_scratch` are set: 0, or -1. */
int step_alloc(step_plan *p);
void step_free(step_plan *p);

#endif
