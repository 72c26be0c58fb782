/* A whole decoding step in one call and one parallel region: every layer of one token
 * (attention block, FFN norm, router, routing, the selected experts and shared expert, the
 * residual adds), then the output norm and the logits.
 *
 * On the small and fine-grained MoE models people run on laptops, a decoding token is
 * dozens of small matmuls; run from Python, each layer costs a few calls, each with its
 * argument handling and its own fork/join of the thread team, and the interpreter between
 * them. Here the team is formed once per token and the phases of every layer are separated
 * by barriers only, as llama.cpp's graph runs its ops on one thread pool:
 *
 *   attention block     layer.c's phases (rows of Q/K/V, heads, rows of the output; or MLA's:
 *                       q and the latent, k_b per head, heads over the latent cache, v_b, wo)
 *   FFN norm            thread 0
 *   router              rows shared (F32, vec_dot_f32's order)
 *   routing             thread 0: forward.route for the kinds it serves (step.h)
 *   experts             moe.c's phases (gate/up rows, activations, down rows, weighted sum)
 *   residual            thread 0: x += routed (+ shared * its gate), then a NaN/Inf check
 *
 * Every value is computed by the same function, in the same order, as the per-layer path
 * (forward.Transformer with kernels.block and kernels.moe): only the schedule changes.
 * kernels/step.py builds the plan, and decides when a step can take this path.
 */
#include "step.h"

#include <math.h>
#include <omp.h>
#include <stdlib.h>

#include "floats.h"
#include "ops.h"
#include "quantize.h"

static int is_normalized(int routing) { return routing == ROUTE_SOFTMAX_TOPK_NORM || routing == ROUTE_SIGMOID_TOPK_NORM; }

/* forward._best_groups: each group scored by the sum of its two best scores (in double), the
 * groups_used best keep their scores in p->masked, the others' are -inf. */
static void best_groups(const step_plan *p, const float *choose, int n) {
    const int n_groups = p->n_groups, per = n / n_groups;
    for (int g = 0; g < n_groups; g++) {
        int64_t best2[2];
        float w2[2];
        const float *group = choose + (size_t)g * per;
        top_k_rows(group, 1, per, 2, 0, best2, w2);
        p->group_scores[g] = (float)((double)group[best2[0]] + (double)group[best2[1]]);
    }
    top_k_rows(p->group_scores, 1, n_groups, p->groups_used, 0, p->groups, p->group_scores + n_groups);
    for (int e = 0; e < n; e++) p->masked[e] = -INFINITY;
    for (int j = 0; j < p->groups_used; j++) {
        const size_t first = (size_t)p->groups[j] * per;
        for (int i = 0; i < per; i++) p->masked[first + i] = choose[first + i];
    }
}

/* forward.route for one token: logits (n_expert, router bias added) -> k experts, weights. */
static void route(const step_plan *p, const step_layer *L, int64_t *chosen, float *weights, int use_avx2) {
    const int n = L->n_expert, k = p->k, normalize = is_normalized(p->routing);
    const float *scores = p->logits;
    if (p->routing == ROUTE_SOFTMAX_TOPK || p->routing == ROUTE_SOFTMAX_TOPK_NORM) {
        softmax_rows(p->logits, p->scores, 1, n, use_avx2);
        scores = p->scores;
    } else if (p->routing == ROUTE_SIGMOID_TOPK || p->routing == ROUTE_SIGMOID_TOPK_NORM) {
        sigmoid_rows(p->logits, p->scores, 1, n, use_avx2);
        scores = p->scores;
    }
    if (!L->selection_bias && p->n_groups <= 1) {
        top_k_rows(scores, 1, n, k, normalize, chosen, weights);
    } else { /* chosen by the biased scores (of the best groups), weighted by the unbiased ones */
        const float *choose = scores;
        if (L->selection_bias) {
            for (int e = 0; e < n; e++) p->choose[e] = scores[e] + L->selection_bias[e];
            choose = p->choose;
        }
        if (p->n_groups > 1) {
            best_groups(p, choose, n);
            choose = p->masked;
        }
        top_k_rows(choose, 1, n, k, 0, chosen, weights);
        for (int j = 0; j < k; j++) weights[j] = scores[chosen[j]];
        if (normalize) { /* ggml_sum_rows in double, clamped, ggml_div */
            double total = 0.0;
            for (int j = 0; j < k; j++) total += (double)weights[j];
            float total32 = (float)total;
            if (total32 < 6.103515625e-5f) total32 = 6.103515625e-5f;
            for (int j = 0; j < k; j++) weights[j] = weights[j] / total32;
        }
    }
    if (p->routing == ROUTE_TOPK_SOFTMAX) softmax_rows(weights, weights, 1, k, use_avx2);
    if (p->weights_scale != 0.0f && p->weights_scale != 1.0f)
        for (int j = 0; j < k; j++) weights[j] = weights[j] * p->weights_scale;
}

/* The shared expert's gate for this token: sigmoid as qwen2moe's graph spells it, silu(g) / g. */
static float shared_gate(const step_layer *L, const float *h, int n_embd, int use_avx2) {
    const float g = dot_f32_vecdot(L->shared_gate, h, n_embd, use_avx2);
    float s;
    silu_rows(&g, &s, 1, 1, use_avx2);
    return s / g;
}

static int all_finite(const float *x, int n) {
    for (int i = 0; i < n; i++)
        if (!isfinite(x[i])) return 0;
    return 1;
}

int step_run(step_plan *p, float *x, int pos, float *logits, int64_t *chosen, float *weights, int use_avx2) {
    const int n_embd = p->n_embd, k = p->k;
    for (int l = 0; l < p->n_layer; l++) {
        step_layer *L = &p->layers[l];
        if (L->mla) {
            latent_block *b = &L->latent;
            b->pos = pos;
            b->cos = L->cos + (size_t)pos * (size_t)(b->rope_dim / 2);
            b->sin = L->sin + (size_t)pos * (size_t)(b->rope_dim / 2);
        } else {
            attention_block *b = &L->attn;
            b->pos = pos;
            b->cos = L->cos + (size_t)pos * (size_t)(b->rope_dim / 2);
            b->sin = L->sin + (size_t)pos * (size_t)(b->rope_dim / 2);
        }
    }
    int bad_layer = -1;
    float gate = 0.0f;
    moe_token t; /* shared by the team: laid out by thread 0 */

    /* the team offload's thread setting asks for (omp_set_num_threads), within the plan's scratch */
    const int n_threads = omp_get_max_threads() < p->n_threads ? omp_get_max_threads() : p->n_threads;
#pragma omp parallel num_threads(n_threads) if (n_threads > 1)
    {
        const int ith = omp_get_thread_num(), nth = omp_get_num_threads();
        float *thread_scratch = p->thread_scratch + p->thread_floats * (size_t)ith;
        for (int l = 0; l < p->n_layer; l++) {
            const step_layer *L = &p->layers[l];
            if (L->mla) latent_token_phases(&L->latent, x, p->attn_scratch, thread_scratch, ith, nth, use_avx2);
            else attention_token_phases(&L->attn, x, p->attn_scratch, thread_scratch, ith, nth, use_avx2);
#pragma omp barrier
            if (L->n_expert) {
                if (ith == 0) rms_norm_rows(x, L->ffn_norm, p->eps, p->h, 1, n_embd);
#pragma omp barrier
                size_t lo, hi; /* the router's rows */
                thread_share((size_t)L->n_expert, ith, nth, &lo, &hi);
                for (size_t r = lo; r < hi; r++)
                    p->logits[r] = dot_f32_vecdot(L->router + r * (size_t)n_embd, p->h, n_embd, use_avx2);
#pragma omp barrier
                if (ith == 0) {
                    if (L->router_bias)
                        for (int e = 0; e < L->n_expert; e++) p->logits[e] = p->logits[e] + L->router_bias[e];
                    int64_t *ch = chosen + (size_t)l * k;
                    float *w = weights + (size_t)l * k;
                    route(p, L, ch, w, use_avx2);
                    for (int j = 0; j < k; j++) {
                        p->jobs[j] = L->experts[ch[j]];
                        p->jobs[j].weight = w[j];
                    }
                    if (L->has_shared) p->jobs[k] = L->shared;
                    if (L->shared_gate) gate = shared_gate(L, p->h, n_embd, use_avx2);
                    moe_token_prepare(&t, p->h, n_embd, p->jobs, k + L->has_shared, k, p->moe_out, p->shared_out,
                                      p->moe_workspace, use_avx2);
                }
            } else if (ith == 0) { /* a dense layer: its FFN as the one shared job */
                rms_norm_rows(x, L->ffn_norm, p->eps, p->h, 1, n_embd);
                moe_token_prepare(&t, p->h, n_embd, &L->dense, 1, 0, p->moe_out, p->shared_out, p->moe_workspace,
                                  use_avx2);
            }
#pragma omp barrier
            moe_token_phases(&t, ith, nth);
#pragma omp barrier
            if (ith == 0) { /* forward: out = routed (+ shared, times its gate); x += out */
                for (int i = 0; i < n_embd; i++) {
                    float o;
                    if (!L->n_expert) {
                        o = p->shared_out[i];
                    } else if (L->has_shared) {
                        const float s = L->shared_gate ? p->shared_out[i] * gate : p->shared_out[i];
                        o = p->moe_out[i] + s;
                    } else {
                        o = p->moe_out[i];
                    }
                    x[i] = x[i] + o;
                }
                if (!all_finite(x, n_embd)) bad_layer = l;
            }
#pragma omp barrier
            if (bad_layer >= 0) break;
        }
        if (bad_layer < 0 && p->output.w && logits) {
            const format_kernels *f = p->output.f;
            const int kind = f->act;
            act_row a;
            a.qs = (const int8_t *)p->act;
            a.d = (const float *)(p->act + n_embd);
            a.bsums = (const int16_t *)(a.d + n_embd / 32);
            if (ith == 0) {
                rms_norm_rows(x, p->output_norm, p->eps, p->h, 1, n_embd);
                quantize_row_kind(kind, p->h, (int8_t *)a.qs, (float *)a.d, (int16_t *)a.bsums, n_embd);
            }
#pragma omp barrier
            size_t lo, hi;
            const size_t row_bytes = (size_t)(n_embd / f->block_size) * (size_t)f->block_bytes;
            thread_share((size_t)p->output.n_rows, ith, nth, &lo, &hi);
            for (size_t r = lo; r < hi; r++) logits[r] = p->output.dot(p->output.w + r * row_bytes, &a, n_embd);
        }
    }
    return bad_layer;
}

int step_alloc(step_plan *p) {
    const int n_embd = p->n_embd;
    int max_expert = 1;
    size_t moe_bytes = 0, thread_floats = 0, attn_bytes = 0;
    moe_ffn_job jobs[MOE_MAX_JOBS];
    for (int l = 0; l < p->n_layer; l++) {
        const step_layer *L = &p->layers[l];
        size_t floats, bytes_attn;
        if (L->mla) {
            latent_block longest = L->latent;
            longest.pos = longest.n_cells; /* every cell visited */
            floats = latent_token_thread_floats(&longest);
            bytes_attn = latent_token_scratch_bytes(&L->latent);
        } else {
            const attention_block *b = &L->attn;
            attention_block longest = *b;
            longest.pos = longest.n_cells;
            floats = attention_token_thread_floats(&longest);
            bytes_attn = attention_token_scratch_bytes(n_embd, b->n_head, b->n_head_kv, b->head_dim);
        }
        if (floats > thread_floats) thread_floats = floats;
        if (bytes_attn > attn_bytes) attn_bytes = bytes_attn;
        int n_jobs = 0;
        if (L->n_expert) {
            if (L->n_expert > max_expert) max_expert = L->n_expert;
            for (int j = 0; j < p->k; j++) jobs[n_jobs++] = L->experts[0]; /* experts of a layer share their size */
            if (L->has_shared) jobs[n_jobs++] = L->shared;
        } else {
            jobs[n_jobs++] = L->dense;
        }
        const size_t bytes = moe_workspace_bytes(jobs, n_jobs, n_embd);
        if (bytes > moe_bytes) moe_bytes = bytes;
    }
    p->thread_floats = (thread_floats + 15) / 16 * 16; /* each thread's on its own cache lines */
    p->attn_scratch = malloc(attn_bytes);
    p->thread_scratch = malloc(sizeof(float) * p->thread_floats * (size_t)p->n_threads);
    /* logits, scores, choose, masked; the groups' scores and their top-k's weights */
    p->logits = malloc(sizeof(float) * 6 * (size_t)max_expert);
    p->groups = malloc(sizeof(int64_t) * (size_t)max_expert);
    p->moe_out = malloc(sizeof(float) * 3 * (size_t)n_embd);
    p->act = malloc((size_t)n_embd + (size_t)n_embd / 32 * sizeof(float) + (size_t)n_embd / 16 * sizeof(int16_t) + 64);
    p->moe_workspace = malloc(moe_bytes);
    if (!p->attn_scratch || !p->thread_scratch || !p->logits || !p->groups || !p->moe_out || !p->act ||
        !p->moe_workspace) {
        step_free(p);
        return -1;
    }
    p->scores = p->logits + max_expert, p->choose = p->scores + max_expert, p->masked = p->choose + max_expert;
    p->group_scores = p->masked + max_expert;
    p->shared_out = p->moe_out + n_embd, p->h = p->shared_out + n_embd;
    return 0;
}

void step_free(step_plan *p) {
    free(p->attn_scratch);
    free(p->thread_scratch);
    free(p->logits);
    free(p->groups);
    free(p->moe_out);
    free(p->act);
    free(p->moe_workspace);
    p->attn_scratch = p->thread_scratch = p->logits = p->moe_out = NULL;
    p->act = NULL;
    p->moe_workspace = NULL;
    p->groups = NULL;
    if (p->layers)
        for (int l = 0; l < p->n_layer; l++) free(p->layers[l].experts);
    free(p->layers);
    p->layers = NULL;
}
