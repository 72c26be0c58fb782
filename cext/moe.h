/* A MoE layer's experts for one token in one parallel region (moe.c). */
#ifndef OFFLOAD_MOE_H
#define OFFLOAD_MOE_H

#include <stddef.h>
#include <stdint.h>

#include "kernels.h"

/* One weight matrix: its format, the row dot for the SIMD level in use, its rows. */
typedef struct {
    const format_kernels *f;
    row_dot_fn dot;
    const uint8_t *w;
} moe_matrix;

/* The activation between gate and up and the down matrix. */
enum { MOE_ACT_SWIGLU = 0, MOE_ACT_SWIGLU_OAI = 1 };

/* One FFN to run on the token: a routed expert (its routing weight) or a shared one. */
typedef struct {
    moe_matrix gate, up, down;
    int n_ff;
    int act;              /* MOE_ACT_SWIGLU: silu(gate) * up; MOE_ACT_SWIGLU_OAI: ops.c's swiglu_oai */
    const float *bg, *bu; /* or NULL: biases added to gate and up (n_ff each) right after their matmuls */
    const float *bd;      /* or NULL: added to the down matmul's output (n_embd), before the routing weight */
    float weight;         /* routed: the output is scaled by it and summed; shared: unused */
} moe_ffn_job;

#define MOE_MAX_JOBS 64 /* routed plus shared experts of one call */

/* Bytes of workspace moe_ffn_run needs for these jobs at width n_embd. */
size_t moe_workspace_bytes(const moe_ffn_job *jobs, int n_jobs, int n_embd);

/* The first n_routed jobs' outputs, weighted and summed in job order (llama.cpp's
 * build_moe_ffn: y0*w0 + y1*w1 + ...), into out (n_embd); the other jobs' outputs (shared
 * experts) one after another into shared_out (n_embd each), unweighted. x: the token's
 * n_embd float32 activations. parallel: run on the OpenMP team (else on this thread). */
void moe_ffn_run(const float *x, int n_embd, const moe_ffn_job *jobs, int n_jobs, int n_routed, float *out,
                 float *shared_out, void *workspace, int use_avx2, int parallel);

/* The same in pieces, for a caller that is already inside a parallel region (step.c):
 * moe_token_prepare on one thread (buffers laid out in the workspace, x quantized), then
 * moe_token_phases on every thread of the team (it synchronizes them with barriers; the
 * outputs are complete once every thread has returned and passed a barrier). */
typedef struct {
    float *gate, *up, *y;
    uint8_t *h; /* the quantized hidden row */
} moe_job_buffers;

typedef struct {
    const moe_ffn_job *jobs;
    int n_jobs, n_routed, n_embd, use_avx2;
    float *out, *shared_out;
    uint8_t *x_act[ACT_KINDS];
    moe_job_buffers buf[MOE_MAX_JOBS];
    size_t n_ff_total;
} moe_token;

void moe_token_prepare(moe_token *t, const float *x, int n_embd, const moe_ffn_job *jobs, int n_jobs, int n_routed,
                       float *out, float *shared_out, void *workspace, int use_avx2);
void moe_token_phases(const moe_token *t, int ith, int nth);

/* This thread's share [lo, hi) of n items: contiguous, as OpenMP's static schedule. */
void thread_share(size_t n, int ith, int nth, size_t *lo, size_t *hi);

/* ggml's tiled K-quant GEMM takes a matmul from this many tokens on (dispatch.TILED_MIN_TOKENS). */
#define MOE_TILED_MIN_TOKENS 8

/* A micro-batch of n_tokens tokens (x: n_tokens x n_embd), each routed to k experts: job j
 * runs on the counts[j] (token, slot) pairs that follow the previous jobs' in `pairs`, and
 * writes weights[token, slot] * its output into per_slot[token, slot] (n_tokens x k x n_embd);
 * rows of per_slot no job names are left as they are. isa_level: 0 portable, 1 AVX2, 2
 * AVX-512 (the row dots in jobs are already picked for it). 0, or -1 if out of memory. */
int moe_batch_run(const float *x, int n_tokens, int n_embd, int k, const float *weights, const moe_ffn_job *jobs,
                  const int32_t *counts, const int32_t *pairs, int n_jobs, float *per_slot, int isa_level);

#endif
