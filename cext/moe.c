/* A MoE layer's experts for one decoding token, in one OpenMP parallel region.
 *
 * Fine-grained MoE models (Qwen3-30B-A3B: 128 experts of 768, top-8) run many small
 * matrices per layer: one call, and one fork/join, per matrix costs more than the matrices
 * take to stream. Here every selected expert of the layer (and the shared experts) runs in
 * three phases of one region, the threads splitting the rows of all of them together, as
 * llama.cpp's mul_mat_id spreads its threads over the rows of every selected expert:
 *
 *   1. gate and up rows of every job (the token's activations quantized once per type)
 *   2. per job: SwiGLU, then its hidden row quantized for the down matrix
 *   3. down rows of every job
 *   4. the routed outputs weighted and summed in slot order, per column
 *
 * Only the schedule differs from one matmul call per matrix: each output value is the same
 * row dot (kernels.h), SwiGLU and the quantizers are the same functions, and the weighted
 * sum adds in llama.cpp's order, so the bits equal the per-matrix path's.
 */
#include "moe.h"

#include <omp.h>

#include "quantize.h"
#include "swiglu.h"

#define ALIGN 64

static size_t up_to(size_t n) { return (n + ALIGN - 1) / ALIGN * ALIGN; }

/* One row of n values quantized for either activation kind: int8 values, scales, block sums. */
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
    if (kind == ACT_Q8_K)
        quantize_row_q8_k(x, (int8_t *)a.qs, (float *)a.d, (int16_t *)a.bsums, n);
    else
        quantize_row_q8_0(x, (int8_t *)a.qs, (float *)a.d, n);
}

/* Per job: gate and up outputs (n_ff floats each), the quantized hidden row, the output. */
static size_t job_bytes(const moe_ffn_job *j, int n_embd) {
    return 2 * up_to((size_t)j->n_ff * sizeof(float)) + act_bytes((size_t)j->n_ff) +
           up_to((size_t)n_embd * sizeof(float));
}

size_t moe_workspace_bytes(const moe_ffn_job *jobs, int n_jobs, int n_embd) {
    size_t total = 2 * act_bytes((size_t)n_embd) + ALIGN; /* x as Q8_0 and as Q8_K, alignment slack */
    for (int j = 0; j < n_jobs; j++) total += job_bytes(&jobs[j], n_embd);
    return total;
}

typedef struct {
    float *gate, *up, *y;
    uint8_t *h; /* the quantized hidden row */
} job_buffers;

/* This thread's share [lo, hi) of n items: contiguous, as OpenMP's static schedule. */
static void share(size_t n, int ith, int nth, size_t *lo, size_t *hi) {
    const size_t per = (n + (size_t)nth - 1) / (size_t)nth;
    *lo = per * (size_t)ith < n ? per * (size_t)ith : n;
    *hi = *lo + per < n ? *lo + per : n;
}

static size_t row_bytes(const moe_matrix *m, int n_cols) {
    return (size_t)(n_cols / m->f->block_size) * (size_t)m->f->block_bytes;
}

void moe_ffn_run(const float *x, int n_embd, const moe_ffn_job *jobs, int n_jobs, int n_routed, float *out,
                 float *shared_out, void *workspace, int use_avx2, int parallel) {
    uint8_t *p = (uint8_t *)(((uintptr_t)workspace + ALIGN - 1) / ALIGN * ALIGN);
    uint8_t *x_act[2];
    x_act[ACT_Q8_0] = p;
    x_act[ACT_Q8_K] = p + act_bytes((size_t)n_embd);
    p += 2 * act_bytes((size_t)n_embd);
    job_buffers buf[n_jobs];
    size_t n_ff_total = 0;
    int need[2] = {0, 0};
    for (int j = 0; j < n_jobs; j++) {
        const size_t n_ff = (size_t)jobs[j].n_ff;
        buf[j].gate = (float *)p;
        buf[j].up = (float *)(p + up_to(n_ff * sizeof(float)));
        buf[j].h = p + 2 * up_to(n_ff * sizeof(float));
        buf[j].y = (float *)(buf[j].h + act_bytes(n_ff));
        p += job_bytes(&jobs[j], n_embd);
        n_ff_total += n_ff;
        need[jobs[j].gate.f->act] = need[jobs[j].up.f->act] = 1;
    }
    for (int kind = 0; kind < 2; kind++)
        if (need[kind]) quantize_act(kind, x, x_act[kind], n_embd);
    const size_t n_down_rows = (size_t)n_jobs * (size_t)n_embd;

#pragma omp parallel if (parallel)
    {
        const int ith = omp_get_thread_num(), nth = omp_get_num_threads();
        size_t lo, hi;

        /* 1. gate and up: this thread's rows of the jobs' hidden rows laid end to end */
        share(n_ff_total, ith, nth, &lo, &hi);
        size_t first = 0; /* the flat index of job j's row 0 */
        for (int j = 0; j < n_jobs && lo < hi; first += (size_t)jobs[j].n_ff, j++) {
            const size_t end = first + (size_t)jobs[j].n_ff;
            if (lo >= end) continue;
            const moe_ffn_job *job = &jobs[j];
            const act_row xg = act_at(x_act[job->gate.f->act], (size_t)n_embd);
            const act_row xu = act_at(x_act[job->up.f->act], (size_t)n_embd);
            const size_t gb = row_bytes(&job->gate, n_embd), ub = row_bytes(&job->up, n_embd);
            for (; lo < hi && lo < end; lo++) {
                const size_t r = lo - first;
                buf[j].gate[r] = job->gate.dot(job->gate.w + r * gb, &xg, n_embd);
                buf[j].up[r] = job->up.dot(job->up.w + r * ub, &xu, n_embd);
            }
        }
#pragma omp barrier

        /* 2. SwiGLU and the down matrix's quantization of each job's hidden row */
        share((size_t)n_jobs, ith, nth, &lo, &hi);
        for (size_t j = lo; j < hi; j++) {
            silu_mul_rows(buf[j].gate, buf[j].up, buf[j].gate, 1, jobs[j].n_ff, use_avx2);
            quantize_act(jobs[j].down.f->act, buf[j].gate, buf[j].h, jobs[j].n_ff);
        }
#pragma omp barrier

        /* 3. down: this thread's rows of the jobs' outputs laid end to end */
        share(n_down_rows, ith, nth, &lo, &hi);
        for (; lo < hi; lo++) {
            const size_t j = lo / (size_t)n_embd, r = lo % (size_t)n_embd;
            const moe_ffn_job *job = &jobs[j];
            const act_row h = act_at(buf[j].h, (size_t)job->n_ff);
            buf[j].y[r] = job->down.dot(job->down.w + r * row_bytes(&job->down, job->n_ff), &h, job->n_ff);
        }
#pragma omp barrier

        /* 4. weighted sum of the routed outputs in slot order (float32: y0*w0 + y1*w1 + ...) */
        share((size_t)n_embd, ith, nth, &lo, &hi);
        for (size_t i = lo; i < hi; i++) {
            float s = n_routed > 0 ? buf[0].y[i] * jobs[0].weight : 0.0f;
            for (int j = 1; j < n_routed; j++) s = s + buf[j].y[i] * jobs[j].weight;
            out[i] = s;
            for (int j = n_routed; j < n_jobs; j++) shared_out[(size_t)(j - n_routed) * n_embd + i] = buf[j].y[i];
        }
    }
}
