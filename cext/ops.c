/* The transformer step's small ops as ggml's x86 CPU backend computes them (RMS norm, softmax,
 * SiLU, exp, RoPE) and the routing around them (top-k, the lookahead predictor): C twins of
 * the Numba functions in offload/kernels/ggml_math.py, forward.py and predict.py, which the
 * tests hold them to bit for bit. Each is a few microseconds per token; what they save is
 * Numba itself (its LLVM, ~50 MiB per process) on a run that has the C kernels. */
#include <math.h>

#include "ggml_exp.h"
#include "ops.h"

void rms_norm_rows(const float *x, const float *w, float eps, float *out, ptrdiff_t n_rows, int n) {
    for (ptrdiff_t r = 0; r < n_rows; r++) {
        const float *xr = x + r * n;
        float *o = out + r * n;
        double total = 0.0; /* ggml sums the float32 squares in double, in order */
        for (int i = 0; i < n; i++) total += (double)(xr[i] * xr[i]);
        const float scale = 1.0f / sqrtf((float)(total / n) + eps);
        for (int i = 0; i < n; i++) o[i] = (xr[i] * scale) * w[i];
    }
}

/* exp(x - m) of one chunk of 8 into out, and the chunk's sum as hsum_float_8 folds it. */
static float exp_chunk8(const float *x, float m, float *out) {
    for (int i = 0; i < 8; i++) out[i] = expf_ggml(x[i] - m);
    return hsum8_portable(out);
}

#ifdef OFFLOAD_X86
static TARGET_AVX2 float exp_chunk8_avx2(const float *x, float m, float *out) {
    const __m256 e = expf_ggml_avx2(_mm256_sub_ps(_mm256_loadu_ps(x), _mm256_set1_ps(m)));
    _mm256_storeu_ps(out, e);
    return hsum_float_8(e);
}
#endif

void softmax_rows(const float *x, float *out, ptrdiff_t n_rows, int n, int use_avx2) {
    const int main = n - n % 8;
    for (ptrdiff_t r = 0; r < n_rows; r++) {
        const float *xr = x + r * n;
        float *o = out + r * n;
        float m = -INFINITY;
        for (int i = 0; i < n; i++)
            if (xr[i] > m) m = xr[i];
        double total = 0.0; /* chunks of 8: ggml_v_expf, hsum_float_8, added in double */
        for (int c = 0; c < main; c += 8) {
#ifdef OFFLOAD_X86
            if (use_avx2) {
                total += (double)exp_chunk8_avx2(xr + c, m, o + c);
                continue;
            }
#else
            (void)use_avx2;
#endif
            total += (double)exp_chunk8(xr + c, m, o + c);
        }
        for (int i = main; i < n; i++) { /* the rest: libm's expf, added one by one */
            o[i] = expf(xr[i] - m);
            total += (double)o[i];
        }
        const float inv = (float)(1.0 / total);
        for (int i = 0; i < n; i++) o[i] *= inv;
    }
}

#ifdef OFFLOAD_X86
/* The 8 lanes compute what the scalar code does, value by value; both return how far they got. */
static TARGET_AVX2 ptrdiff_t expf_avx2(const float *x, float *out, ptrdiff_t n) {
    ptrdiff_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, expf_ggml_avx2(_mm256_loadu_ps(x + i)));
    return i;
}

static TARGET_AVX2 int silu_avx2(const float *x, float *out, int main) {
    const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f);
    for (int i = 0; i < main; i += 8) {
        const __m256 xv = _mm256_loadu_ps(x + i);
        _mm256_storeu_ps(out + i, _mm256_div_ps(xv, _mm256_add_ps(one, expf_ggml_avx2(_mm256_sub_ps(zero, xv)))));
    }
    return main;
}
#endif

void expf_ggml_array(const float *x, float *out, ptrdiff_t n, int use_avx2) {
    ptrdiff_t i = 0;
#ifdef OFFLOAD_X86
    if (use_avx2) i = expf_avx2(x, out, n);
#else
    (void)use_avx2;
#endif
    for (; i < n; i++) out[i] = expf_ggml(x[i]);
}

void swiglu_oai_rows(const float *g, const float *u, float *out, ptrdiff_t n_rows, int n, int use_avx2) {
    const float limit = SWIGLU_OAI_LIMIT;
    (void)use_avx2;
    for (ptrdiff_t i = 0; i < n_rows * n; i++) {
        const float a = limit < g[i] ? limit : g[i];                         /* std::min(g, limit) */
        const float b = u[i] < -limit ? -limit : (limit < u[i] ? limit : u[i]); /* std::clamp */
        out[i] = a / (1.0f + expf(SWIGLU_OAI_ALPHA * -a)) * (b + 1.0f);
    }
}

void sigmoid_rows(const float *x, float *out, ptrdiff_t n_rows, int n, int use_avx2) {
    (void)use_avx2;
    for (ptrdiff_t i = 0; i < n_rows * n; i++) out[i] = 1.0f / (1.0f + expf(-x[i]));
}

void silu_rows(const float *x, float *out, ptrdiff_t n_rows, int n, int use_avx2) {
    const int main = n - n % 8;
    for (ptrdiff_t r = 0; r < n_rows; r++) {
        const float *xr = x + r * n;
        float *o = out + r * n;
        int i = 0;
#ifdef OFFLOAD_X86
        if (use_avx2) i = silu_avx2(xr, o, main);
#else
        (void)use_avx2;
#endif
        for (; i < main; i++) o[i] = xr[i] / (1.0f + expf_ggml(0.0f - xr[i]));
        for (; i < n; i++) o[i] = xr[i] / (1.0f + expf(0.0f - xr[i])); /* ggml's scalar tail: libm */
    }
}

/* x0*cos - x1*sin and x0*sin + x1*cos, as GCC contracts them in ggml's rope. Inlined into a
 * plain and an FMA-enabled caller: fmaf is the same correctly rounded operation in both, a
 * libm call in one and an instruction in the other. */
static inline __attribute__((always_inline)) void rope_body(float *x, const float *cos_t, const float *sin_t,
                                                            ptrdiff_t n_tokens, int n_heads, int head_dim,
                                                            int rope_dim, int neox) {
    const int half = rope_dim / 2;
    for (ptrdiff_t t = 0; t < n_tokens; t++) {
        const float *c = cos_t + t * half, *s = sin_t + t * half;
        for (int h = 0; h < n_heads; h++) {
            float *xh = x + (t * n_heads + h) * head_dim;
            for (int i = 0; i < half; i++) {
                const int ia = neox ? i : 2 * i, ib = neox ? i + half : 2 * i + 1;
                const float a = xh[ia], b = xh[ib];
                xh[ia] = fmaf(a, c[i], -(b * s[i]));
                xh[ib] = fmaf(a, s[i], b * c[i]);
            }
        }
    }
}

static void rope_plain(float *x, const float *c, const float *s, ptrdiff_t n_tokens, int n_heads, int head_dim,
                       int rope_dim, int neox) {
    rope_body(x, c, s, n_tokens, n_heads, head_dim, rope_dim, neox);
}

#ifdef OFFLOAD_X86
static TARGET_AVX2 void rope_fma(float *x, const float *c, const float *s, ptrdiff_t n_tokens, int n_heads,
                                 int head_dim, int rope_dim, int neox) {
    rope_body(x, c, s, n_tokens, n_heads, head_dim, rope_dim, neox);
}
#endif

void rope_rows(float *x, const float *cos_t, const float *sin_t, ptrdiff_t n_tokens, int n_heads, int head_dim,
               int rope_dim, int neox, int use_fma) {
#ifdef OFFLOAD_X86
    if (use_fma) {
        rope_fma(x, cos_t, sin_t, n_tokens, n_heads, head_dim, rope_dim, neox);
        return;
    }
#else
    (void)use_fma;
#endif
    rope_plain(x, cos_t, sin_t, n_tokens, n_heads, head_dim, rope_dim, neox);
}

void top_k_rows(const float *probs, ptrdiff_t n_rows, int n, int k, int normalize, int64_t *chosen, float *weights) {
    for (ptrdiff_t r = 0; r < n_rows; r++) {
        const float *p = probs + r * n;
        int64_t *ch = chosen + r * k;
        float *wt = weights + r * k;
        for (int j = 0; j < k; j++) {
            int best = -1;
            for (int e = 0; e < n; e++) {
                int taken = 0;
                for (int i = 0; i < j; i++) taken |= ch[i] == e;
                if (!taken && (best < 0 || p[e] > p[best])) best = e;
            }
            ch[j] = best;
            wt[j] = p[best];
        }
        if (normalize) { /* ggml_sum_rows: in double */
            double total = 0.0;
            for (int j = 0; j < k; j++) total += (double)wt[j];
            const float total32 = (float)total;
            for (int j = 0; j < k; j++) wt[j] = wt[j] / total32;
        }
    }
}

void lookahead_one(const float *x, int n, const float *w, int n_targets, int e, double eps, int k, int m,
                   float ratio, float *logits, int64_t *experts, int64_t *counts, float *conf) {
    const int n_out = n_targets * e;
    double ss = 0.0;
    for (int i = 0; i < n; i++) ss += (double)x[i] * (double)x[i];
    const float scale = (float)(1.0 / sqrt(ss / n + eps));
    for (int j = 0; j < n_out; j++) logits[j] = 0.0f;
    for (int i = 0; i < n; i++) {
        const float xi = x[i] * scale;
        const float *wi = w + (size_t)i * n_out;
        for (int j = 0; j < n_out; j++) logits[j] += xi * wi[j];
    }
    for (int t = 0; t < n_targets; t++) {
        float *p = logits + t * e;
        float mx = p[0]; /* numpy's max: a NaN wins */
        for (int j = 1; j < e && !isnan(mx); j++)
            if (isnan(p[j]) || p[j] > mx) mx = p[j];
        double total = 0.0;
        for (int j = 0; j < e; j++) {
            p[j] = expf(p[j] - mx);
            total += p[j];
        }
        for (int j = 0; j < e; j++) p[j] = (float)(p[j] / total);
        int got = 0;
        double kth = 0.0, c = 0.0;
        for (int r = 0; r < k + m; r++) {
            int best = -1;
            for (int j = 0; j < e; j++)
                if (p[j] >= 0 && (best < 0 || p[j] > p[best])) best = j;
            if (best < 0) break;
            if (r >= k && p[best] < (double)ratio * kth) break;
            if (r < k) {
                c += p[best];
                kth = p[best];
            }
            experts[t * (k + m) + r] = best;
            got++;
            p[best] = -1.0f;
        }
        counts[t] = got;
        conf[t] = (float)(c < 1.0 ? c : 1.0); /* Python's min(1.0, c) */
    }
}
