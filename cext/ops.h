/* The transformer step's elementwise and per-row ops in ggml's order (ops.c): C twins of the
 * Numba functions in offload/kernels/ggml_math.py, forward.py (_top_k) and predict.py
 * (_lookahead_one), so that a run with the C extension never needs Numba. */
#ifndef OFFLOAD_OPS_H
#define OFFLOAD_OPS_H

#include <stddef.h>
#include <stdint.h>

/* out = (x * 1/sqrt(mean(x^2) + eps)) * w per row of n: squares summed in double, in order */
void rms_norm_rows(const float *x, const float *w, float eps, float *out, ptrdiff_t n_rows, int n);

/* ggml_vec_soft_max_f32 + the scale by 1/sum, per row of n (out may be x) */
void softmax_rows(const float *x, float *out, ptrdiff_t n_rows, int n, int use_avx2);

/* ggml_v_expf over n floats (out may be x) */
void expf_ggml_array(const float *x, float *out, ptrdiff_t n, int use_avx2);

/* ggml_compute_forward_swiglu_oai_f32 per row of n (gpt-oss's experts; the signature of
 * swiglu.h's silu_mul_rows): a = min(g, 7), b = clamp(u, -7, 7),
 * out = a / (1 + expf(1.702 * -a)) * (b + 1), libm's expf, the constants build_moe_ffn's.
 * out may be g. Scalar: use_avx2 is not used. */
#define SWIGLU_OAI_ALPHA 1.702f
#define SWIGLU_OAI_LIMIT 7.0f
void swiglu_oai_rows(const float *g, const float *u, float *out, ptrdiff_t n_rows, int n, int use_avx2);

/* op_sigmoid per row of n (MoE routers): 1 / (1 + expf(-x)), libm's expf. Scalar. */
void sigmoid_rows(const float *x, float *out, ptrdiff_t n_rows, int n, int use_avx2);

/* ggml_vec_silu_f32 per row of n: x / (1 + exp(-x)), ggml_v_expf in chunks of 8, libm's expf
 * for the n % 8 values left over (out may be x) */
void silu_rows(const float *x, float *out, ptrdiff_t n_rows, int n, int use_avx2);

/* RoPE in place on x (n_tokens, n_heads, head_dim); cos/sin (n_tokens, rope_dim/2); neox pairs
 * (i, i + rope_dim/2), else (2i, 2i + 1). use_fma: fmaf as an instruction (same bits as libm's). */
void rope_rows(float *x, const float *cos_t, const float *sin_t, ptrdiff_t n_tokens, int n_heads, int head_dim,
               int rope_dim, int neox, int use_fma);

/* The k largest of each row of probs (n_rows, n), largest first, ties to the lower index, as
 * ggml_argsort_top_k; weights normalized by their double sum when `normalize`. k <= n. */
void top_k_rows(const float *probs, ptrdiff_t n_rows, int n, int k, int normalize, int64_t *chosen, float *weights);

/* The lookahead predictor for one token (predict.py): rms scale of x (n), logits = (x * scale)
 * @ w (n, n_targets * e), per target softmax (libm's expf), top-k then up to m extras while
 * their probability is >= ratio x the k-th one. Fills experts (n_targets, k + m), counts,
 * conf. logits: scratch of n_targets * e floats. */
void lookahead_one(const float *x, int n, const float *w, int n_targets, int e, double eps, int k, int m,
                   float ratio, float *logits, int64_t *experts, int64_t *counts, float *conf);

#endif
