/* ggml_vec_swiglu_f32: out = x / (1 + exp(-x)) * g, with ggml_v_expf in chunks of 8 and
 * libm's expf for the tail (n % 8), as ggml's x86 CPU backend computes it. The compiled twin
 * of ggml_math._silu_mul_rows (Numba), which the tests hold it to bit for bit. */
#include <math.h>

#include "ggml_exp.h"
#include "swiglu.h"

static void row_portable(const float *x, const float *g, float *out, int main) {
    for (int i = 0; i < main; i++) out[i] = (x[i] / (1.0f + expf_ggml(0.0f - x[i]))) * g[i];
}

#ifdef OFFLOAD_X86
static TARGET_AVX2 void row_avx2(const float *x, const float *g, float *out, int main) {
    const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f);
    for (int i = 0; i < main; i += 8) {
        const __m256 xv = _mm256_loadu_ps(x + i);
        const __m256 e = expf_ggml_avx2(_mm256_sub_ps(zero, xv));
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_div_ps(xv, _mm256_add_ps(one, e)), _mm256_loadu_ps(g + i)));
    }
}
#endif

void silu_mul_rows(const float *x, const float *g, float *out, ptrdiff_t n_rows, int n, int use_avx2) {
    const int main = n - n % 8;
    for (ptrdiff_t r = 0; r < n_rows; r++) {
        const float *xr = x + r * n, *gr = g + r * n;
        float *o = out + r * n;
#ifdef OFFLOAD_X86
        if (use_avx2)
            row_avx2(xr, gr, o, main);
        else
#endif
            row_portable(xr, gr, o, main);
        for (int i = main; i < n; i++) o[i] = (xr[i] / (1.0f + expf(-xr[i]))) * gr[i];
    }
}
