/* A MoE layer's experts for one decoding token, in one OpenMP parallel region.
 *
 * Fine-grained MoE models (Qwen3-30B-A3B: 128 experts of 768, top-8) run many small
 * matrices per layer: one call, and one fork/join, per matrix costs more than the matrices
 * take to stream. Here every selected expert of the layer (and the shared experts) runs in
 * three phases of one region, the threads splitting the rows of all of them together, as
 * llama.cpp's mul_mat_id spreads its threads over the rows of every selected expert:
 *
 *   1. gate and up rows of every job (the token's activations quantized once per type)
 *   2. per job: its gate and up biases if any, SwiGLU (or gpt-oss's swiglu_oai), then its
 *      hidden row quantized for the down matrix
 *   3. down rows of every job (plus the down bias if any)
 *   4. the routed outputs weighted and summed in slot order, per column
 *
 * Only the schedule differs from one matmul call per matrix: each output value is the same
 * row dot (kernels.h), SwiGLU and the quantizers are the same functions, the biases are
 * float32 adds in the places forward._ffn adds them, and the weighted sum adds in llama.cpp's
 * order, so the bits equal the per-matrix path's.
 */
#include "moe.h"

#include <omp.h>

#include "ops.h"
#include "quantize.h"
#include "swiglu.h"

#define ALIGN 64

static size_t up_to(size_t n) { return (n + ALIGN - 1) / ALIGN * ALIGN; }

/* One row of n values quantized for any activation kind: int8 values, scales, block sums
 * (Q8_K) or s (Q8_1, the same bytes). */
static size_t act_bytes(size_t n) { return up_to(n) + up_to(n / 32 * sizeof(float)) + up_to(n / 16 * sizeof(int16_t)); }

static act_row act_at(uint8_t *p, size_t n) {
    act_row a;
    a.qs = (const int8_t *)p;
    a.d = (const float *)(p + up_to(n));
    a.bsums = (const int16_t *)(p + up_to(n) + up_to(n / 32 * sizeof(float)));
    return a;
}

static void quantize_act(int kind, const float *x, uint8_t *p, int n) {
    act_row a = act_at(p, (size_t)n);
    quantize_row_kind(kind, x, (int8_t *)a.qs, (float *)a.d, (int16_t *)a.bsums, n);
}

/* Per job: gate and up outputs (n_ff floats each), the quantized hidden row, the output. */
static size_t job_bytes(const moe_ffn_job *j, int n_embd) {
    return 2 * up_to((size_t)j->n_ff * sizeof(float)) + act_bytes((size_t)j->n_ff) +
           up_to((size_t)n_embd * sizeof(float));
}

size_t moe_workspace_bytes(const moe_ffn_job *jobs, int n_jobs, int n_embd) {
    size_t total = ACT_KINDS * act_bytes((size_t)n_embd) + ALIGN; /* x in each kind, alignment slack */
    for (int j = 0; j < n_jobs; j++) total += job_bytes(&jobs[j], n_embd);
    return total;
}

/* This thread's share [lo, hi) of n items: contiguous, as OpenMP's static schedule. */
void thread_share(size_t n, int ith, int nth, size_t *lo, size_t *hi) {
    const size_t per = (n + (size_t)nth - 1) / (size_t)nth;
    *lo = per * (size_t)ith < n ? per * (size_t)ith : n;
    *hi = *lo + per < n ? *lo + per : n;
}

/* n_rows hidden rows of a job (gate and up, n_ff each) in place: gate += bg and up += bu per
 * row (forward._ffn's adds), then the activation into gate. */
static void activate(const moe_ffn_job *job, float *gate, float *up, int n_rows, int use_avx2) {
    const int n_ff = job->n_ff;
    for (int r = 0; r < n_rows; r++) {
        float *g = gate + (size_t)r * n_ff, *u = up + (size_t)r * n_ff;
        if (job->bg)
            for (int i = 0; i < n_ff; i++) g[i] = g[i] + job->bg[i];
        if (job->bu)
            for (int i = 0; i < n_ff; i++) u[i] = u[i] + job->bu[i];
    }
    if (job->act == MOE_ACT_SWIGLU_OAI)
        swiglu_oai_rows(gate, up, gate, n_rows, n_ff, use_avx2);
    else
        silu_mul_rows(gate, up, gate, n_rows, n_ff, use_avx2);
}

static size_t row_bytes(const moe_matrix *m, int n_cols) {
    return (size_t)(n_cols / m->f->block_size) * (size_t)m->f->block_bytes;
}

void moe_token_prepare(moe_token *t, const float *x, int n_embd, const moe_ffn_job *jobs, int n_jobs, int n_routed,
                       float *out, float *shared_out, void *workspace, int use_avx2) {
    uint8_t *p = (uint8_t *)(((uintptr_t)workspace + ALIGN - 1) / ALIGN * ALIGN);
    t->jobs = jobs, t->n_jobs = n_jobs, t->n_routed = n_routed, t->n_embd = n_embd;
    t->out = out, t->shared_out = shared_out, t->use_avx2 = use_avx2;
    for (int kind = 0; kind < ACT_KINDS; kind++, p += act_bytes((size_t)n_embd)) t->x_act[kind] = p;
    t->n_ff_total = 0;
    int need[ACT_KINDS] = {0};
    for (int j = 0; j < n_jobs; j++) {
        const size_t n_ff = (size_t)jobs[j].n_ff;
        t->buf[j].gate = (float *)p;
        t->buf[j].up = (float *)(p + up_to(n_ff * sizeof(float)));
        t->buf[j].h = p + 2 * up_to(n_ff * sizeof(float));
        t->buf[j].y = (float *)(t->buf[j].h + act_bytes(n_ff));
        p += job_bytes(&jobs[j], n_embd);
        t->n_ff_total += n_ff;
        need[jobs[j].gate.f->act] = need[jobs[j].up.f->act] = 1;
    }
    for (int kind = 0; kind < ACT_KINDS; kind++)
        if (need[kind]) quantize_act(kind, x, t->x_act[kind], n_embd);
}

void moe_token_phases(const moe_token *t, int ith, int nth) {
    const moe_ffn_job *jobs = t->jobs;
    const moe_job_buffers *buf = t->buf;
    const int n_jobs = t->n_jobs, n_routed = t->n_routed, n_embd = t->n_embd;
    size_t lo, hi;

    /* 1. gate and up: this thread's rows of the jobs' hidden rows laid end to end */
    thread_share(t->n_ff_total, ith, nth, &lo, &hi);
    size_t first = 0; /* the flat index of job j's row 0 */
    for (int j = 0; j < n_jobs && lo < hi; first += (size_t)jobs[j].n_ff, j++) {
        const size_t end = first + (size_t)jobs[j].n_ff;
        if (lo >= end) continue;
        const moe_ffn_job *job = &jobs[j];
        const act_row xg = act_at(t->x_act[job->gate.f->act], (size_t)n_embd);
        const act_row xu = act_at(t->x_act[job->up.f->act], (size_t)n_embd);
        const size_t gb = row_bytes(&job->gate, n_embd), ub = row_bytes(&job->up, n_embd);
        for (; lo < hi && lo < end; lo++) {
            const size_t r = lo - first;
            buf[j].gate[r] = job->gate.dot(job->gate.w + r * gb, &xg, n_embd);
            buf[j].up[r] = job->up.dot(job->up.w + r * ub, &xu, n_embd);
        }
    }
#pragma omp barrier

    /* 2. SwiGLU and the down matrix's quantization of each job's hidden row */
    thread_share((size_t)n_jobs, ith, nth, &lo, &hi);
    for (size_t j = lo; j < hi; j++) {
        activate(&jobs[j], buf[j].gate, buf[j].up, 1, t->use_avx2);
        quantize_act(jobs[j].down.f->act, buf[j].gate, buf[j].h, jobs[j].n_ff);
    }
#pragma omp barrier

    /* 3. down: this thread's rows of the jobs' outputs laid end to end */
    thread_share((size_t)n_jobs * (size_t)n_embd, ith, nth, &lo, &hi);
    for (; lo < hi; lo++) {
        const size_t j = lo / (size_t)n_embd, r = lo % (size_t)n_embd;
        const moe_ffn_job *job = &jobs[j];
        const act_row h = act_at(buf[j].h, (size_t)job->n_ff);
        const float y = job->down.dot(job->down.w + r * row_bytes(&job->down, job->n_ff), &h, job->n_ff);
        buf[j].y[r] = job->bd ? y + job->bd[r] : y;
    }
#pragma omp barrier

    /* 4. weighted sum of the routed outputs in slot order (float32: y0*w0 + y1*w1 + ...) */
    thread_share((size_t)n_embd, ith, nth, &lo, &hi);
    for (size_t i = lo; i < hi; i++) {
        float s = n_routed > 0 ? buf[0].y[i] * jobs[0].weight : 0.0f;
        for (int j = 1; j < n_routed; j++) s = s + buf[j].y[i] * jobs[j].weight;
        t->out[i] = s;
        for (int j = n_routed; j < n_jobs; j++) t->shared_out[(size_t)(j - n_routed) * n_embd + i] = buf[j].y[i];
    }
}

void moe_ffn_run(const float *x, int n_embd, const moe_ffn_job *jobs, int n_jobs, int n_routed, float *out,
                 float *shared_out, void *workspace, int use_avx2, int parallel) {
    moe_token t;
    moe_token_prepare(&t, x, n_embd, jobs, n_jobs, n_routed, out, shared_out, workspace, use_avx2);
#pragma omp parallel if (parallel)
    moe_token_phases(&t, omp_get_thread_num(), omp_get_num_threads());
}

/* -- several tokens: the experts of a micro-batch (a prompt) ---------------------------------
 *
 * Each expert runs once on the tokens routed to it (llama.cpp's mul_mat_id): their rows of
 * the batch's activations, quantized once for the whole batch (quantizing is per row, so a
 * gathered row equals a row quantized alone), then gate and up (+ their biases), the
 * activation, down (+ its bias), each matmul
 * through the row dots or, from 8 tokens on for K-quants, the tiled GEMM (tiled.c), as
 * dispatch.matmul picks for the same token count. Each (token, slot) result is scaled by its
 * routing weight into per_slot; the caller sums the slots in order. With enough experts (and
 * per-thread buffers of at most MOE_THREAD_SCRATCH_MAX) the threads take whole experts
 * (dynamic: token counts differ); otherwise each matmul spreads its rows over the threads.
 */
#include <stdlib.h>
#include <string.h>

#include "tiled.h"

#define MOE_THREAD_SCRATCH_MAX (8u << 20)

/* An expert's share of the batch: its (token, slot) pairs. */
typedef struct {
    const int32_t *pairs; /* 2 * n: token, slot */
    int n;
} expert_rows;

/* out (n_tokens, n_rows) = m times the gathered activations, by the path ggml takes. */
static int matmul_by_count(const moe_matrix *m, const act_row *a, float *out, int n_rows, int n_cols, int n_tokens,
                           int isa_level) {
    if (n_tokens >= MOE_TILED_MIN_TOKENS && tiled_block_bytes(m->f->name, NULL) != 0)
        return tiled_matmul(m->f->name, m->w, a->qs, a->d, a->bsums, out, n_rows, n_cols, n_tokens, isa_level);
    run_matmul(m->dot, m->f, m->w, a->qs, a->d, a->bsums, out, n_rows, n_cols, n_tokens);
    return 0;
}

/* Rows of a batch quantized for one activation kind: n_tokens rows of n values. */
typedef struct {
    int8_t *qs;
    float *d;
    int16_t *bsums;
} act_rows;

static int act_rows_alloc(act_rows *a, size_t n_tokens, size_t n) {
    a->qs = malloc(n_tokens * n + 1);
    a->d = malloc(n_tokens * (n / 32) * sizeof(float) + 4);
    a->bsums = malloc(n_tokens * (n / 16) * sizeof(int16_t) + 2);
    return a->qs && a->d && a->bsums ? 0 : -1;
}

static void act_rows_free(act_rows *a) {
    free(a->qs);
    free(a->d);
    free(a->bsums);
}

/* Row t of kind `kind` (Q8_0: n/32 scales a row; Q8_K: n/256 scales and n/16 block sums;
 * Q8_1: n/32 scales and n/32 s, in the block sums' bytes). */
static act_row act_rows_at(const act_rows *a, int kind, size_t t, size_t n) {
    act_row r = {a->qs + t * n, a->d + t * (n / act_block(kind)), {a->bsums + t * (n / 16)}};
    return r;
}

static void quantize_into(int kind, const float *x, const act_rows *a, size_t t, int n) {
    act_row r = act_rows_at(a, kind, t, (size_t)n);
    quantize_row_kind(kind, x, (int8_t *)r.qs, (float *)r.d, (int16_t *)r.bsums, n);
}

/* Copy the rows of `pairs`' tokens from the batch's activations into dst (rows 0..n-1). */
static void gather(int kind, const act_rows *src, const act_rows *dst, const int32_t *pairs, int n, size_t n_cols) {
    const size_t n_d = n_cols / act_block(kind);
    for (int i = 0; i < n; i++) {
        const size_t t = (size_t)pairs[2 * i];
        memcpy(dst->qs + i * n_cols, src->qs + t * n_cols, n_cols);
        memcpy(dst->d + i * n_d, src->d + t * n_d, n_d * sizeof(float));
        if (kind != ACT_Q8_0) memcpy(dst->bsums + i * (n_cols / 16), src->bsums + t * (n_cols / 16), n_cols / 16 * 2);
    }
}

/* One expert on its tokens; the scratch is this thread's, sized for max_tokens. */
static int run_expert(const moe_ffn_job *job, const expert_rows *rows, const act_rows x_rows[ACT_KINDS], int n_embd, int k,
                      const float *weights, float *per_slot, act_rows *xg, act_rows *hq, float *gate, float *up,
                      float *y, int isa_level) {
    const int n = rows->n, n_ff = job->n_ff;
    const int kg = job->gate.f->act, ku = job->up.f->act, kd = job->down.f->act;
    gather(kg, &x_rows[kg], &xg[kg], rows->pairs, n, (size_t)n_embd);
    if (ku != kg) gather(ku, &x_rows[ku], &xg[ku], rows->pairs, n, (size_t)n_embd);
    const act_row ag = act_rows_at(&xg[kg], kg, 0, (size_t)n_embd), au = act_rows_at(&xg[ku], ku, 0, (size_t)n_embd);
    if (matmul_by_count(&job->gate, &ag, gate, n_ff, n_embd, n, isa_level) < 0 ||
        matmul_by_count(&job->up, &au, up, n_ff, n_embd, n, isa_level) < 0)
        return -1;
    activate(job, gate, up, n, isa_level >= 1);
    for (int i = 0; i < n; i++) quantize_into(kd, gate + (size_t)i * n_ff, hq, (size_t)i, n_ff);
    const act_row ah = act_rows_at(hq, kd, 0, (size_t)n_ff);
    if (matmul_by_count(&job->down, &ah, y, n_embd, n_ff, n, isa_level) < 0) return -1;
    for (int i = 0; i < n; i++) {
        const size_t t = (size_t)rows->pairs[2 * i], s = (size_t)rows->pairs[2 * i + 1];
        const float w = weights[t * (size_t)k + s];
        float *dst = per_slot + (t * (size_t)k + s) * (size_t)n_embd;
        const float *src = y + (size_t)i * n_embd;
        if (job->bd)
            for (int c = 0; c < n_embd; c++) dst[c] = (src[c] + job->bd[c]) * w; /* two roundings: no FMA here */
        else
            for (int c = 0; c < n_embd; c++) dst[c] = src[c] * w;
    }
    return 0;
}

int moe_batch_run(const float *x, int n_tokens, int n_embd, int k, const float *weights, const moe_ffn_job *jobs,
                  const int32_t *counts, const int32_t *pairs, int n_jobs, float *per_slot, int isa_level) {
    int need[ACT_KINDS] = {0}, max_n = 0, max_ff = 0, failed = 0;
    expert_rows rows[n_jobs];
    for (int j = 0, at = 0; j < n_jobs; at += counts[j], j++) {
        rows[j].pairs = pairs + 2 * (size_t)at;
        rows[j].n = counts[j];
        need[jobs[j].gate.f->act] = need[jobs[j].up.f->act] = 1;
        if (counts[j] > max_n) max_n = counts[j];
        if (jobs[j].n_ff > max_ff) max_ff = jobs[j].n_ff;
    }
    act_rows x_rows[ACT_KINDS] = {{0}};
    for (int kind = 0; kind < ACT_KINDS; kind++) {
        if (!need[kind]) continue;
        if (act_rows_alloc(&x_rows[kind], (size_t)n_tokens, (size_t)n_embd) < 0) {
            failed = 1;
            continue;
        }
#pragma omp parallel for schedule(static) if (n_tokens >= 16)
        for (int t = 0; t < n_tokens; t++) quantize_into(kind, x + (size_t)t * n_embd, &x_rows[kind], (size_t)t, n_embd);
    }
    /* whole experts per thread when there are enough of them and each thread's buffers stay
     * small (a 512-token prompt of Mixtral-sized experts would need ~60 MB a thread) */
    const size_t thread_bytes = (size_t)max_n * (2 * (size_t)max_ff + (size_t)n_embd) * sizeof(float);
    const int by_expert = n_jobs >= 2 * omp_get_max_threads() && thread_bytes <= MOE_THREAD_SCRATCH_MAX;
#pragma omp parallel if (by_expert && !failed)
    {
        act_rows xg[ACT_KINDS] = {{0}}, hq = {0};
        float *gate = malloc((size_t)max_n * max_ff * sizeof(float) + 4);
        float *up = malloc((size_t)max_n * max_ff * sizeof(float) + 4);
        float *y = malloc((size_t)max_n * n_embd * sizeof(float) + 4);
        int ok = !failed && gate && up && y && act_rows_alloc(&hq, (size_t)max_n, (size_t)max_ff) == 0;
        for (int kind = 0; kind < ACT_KINDS; kind++)
            if (need[kind] && act_rows_alloc(&xg[kind], (size_t)max_n, (size_t)n_embd) < 0) ok = 0;
        if (!ok) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int j = 0; j < n_jobs; j++) {
            if (!ok || rows[j].n == 0) continue;
            if (run_expert(&jobs[j], &rows[j], x_rows, n_embd, k, weights, per_slot, xg, &hq, gate, up, y, isa_level) < 0) {
#pragma omp atomic write
                failed = 1;
            }
        }
        for (int kind = 0; kind < ACT_KINDS; kind++) act_rows_free(&xg[kind]);
        act_rows_free(&hq);
        free(gate);
        free(up);
        free(y);
    }
    for (int kind = 0; kind < ACT_KINDS; kind++) act_rows_free(&x_rows[kind]);
    return failed ? -1 : 0;
}
