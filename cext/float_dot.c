/* F32 and F16 weights times float32 activations, in llama.cpp's x86 AVX2 summation orders
 * (offload/kernels/numba_kernels.py spells them and is the twin these are tested against):
 *
 *   GEMM8   tinyBLAS (ggml's mul_mat, batches of 2+ tokens, rows % 4 == 0, cols % 8 == 0):
 *           lane i accumulates elements 8m+i with FMA; hsum_float_8 at the end.
 *   VECDOT  ggml_vec_dot_f32 / _f16 (one token, and every expert: mul_mat_id): four 8-lane
 *           FMA accumulators over chunks of 32, reduced (0+2)+(1+3), then across lanes as two
 *           hadds; the tail (n % 32) added one product at a time: in float for F32, in
 *           double for F16 (whose whole sum is a double).
 *
 * Routers (ffn_gate_inp) stay F32 in every quantized file, so every MoE token runs one of
 * these per layer. F16 activations arrive already rounded to F16 values (dispatch does it).
 */
#include <omp.h>

#include "float_dot.h"

#define PARALLEL_BYTES (128 * 1024)

static inline float weight_at(const void *w, int f16, int c) {
    return f16 ? fp16_to_fp32(((const uint16_t *)w)[c]) : ((const float *)w)[c];
}

static float dot_portable(const void *w, const float *x, int n, int f16, int mode) {
    if (mode == FLOAT_GEMM8) {
        float acc[8] = {0};
        for (int c = 0; c < n; c++) acc[c % 8] = fmaf(weight_at(w, f16, c), x[c], acc[c % 8]);
        return hsum8_portable(acc);
    }
    float acc[32] = {0};
    const int main = n - n % 32;
    for (int c = 0; c < main; c++) acc[c % 32] = fmaf(weight_at(w, f16, c), x[c], acc[c % 32]);
    float l[8];
    for (int i = 0; i < 8; i++) l[i] = (acc[i] + acc[16 + i]) + (acc[8 + i] + acc[24 + i]);
    const float t0 = l[0] + l[4], t1 = l[1] + l[5], t2 = l[2] + l[6], t3 = l[3] + l[7];
    const float reduced = (t0 + t1) + (t2 + t3);
    if (f16) {
        double sum = reduced;
        for (int c = main; c < n; c++) sum += (double)(weight_at(w, 1, c) * x[c]);
        return (float)sum;
    }
    float sum = reduced;
    for (int c = main; c < n; c++) sum += weight_at(w, 0, c) * x[c];
    return sum;
}

#ifdef OFFLOAD_X86
static inline TARGET_AVX2 __m256 load8(const void *w, int f16, int c) {
    return f16 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)w + c)))
               : _mm256_loadu_ps((const float *)w + c);
}

static TARGET_AVX2 float dot_avx2(const void *w, const float *x, int n, int f16, int mode) {
    if (mode == FLOAT_GEMM8) { /* n % 8 == 0 (the caller checks) */
        __m256 acc = _mm256_setzero_ps();
        for (int c = 0; c < n; c += 8) acc = _mm256_fmadd_ps(load8(w, f16, c), _mm256_loadu_ps(x + c), acc);
        return hsum_float_8(acc);
    }
    __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    const int main = n - n % 32;
    for (int c = 0; c < main; c += 32) {
        s0 = _mm256_fmadd_ps(load8(w, f16, c), _mm256_loadu_ps(x + c), s0);
        s1 = _mm256_fmadd_ps(load8(w, f16, c + 8), _mm256_loadu_ps(x + c + 8), s1);
        s2 = _mm256_fmadd_ps(load8(w, f16, c + 16), _mm256_loadu_ps(x + c + 16), s2);
        s3 = _mm256_fmadd_ps(load8(w, f16, c + 24), _mm256_loadu_ps(x + c + 24), s3);
    }
    const __m256 r = _mm256_add_ps(_mm256_add_ps(s0, s2), _mm256_add_ps(s1, s3));
    __m128 t = _mm_add_ps(_mm256_extractf128_ps(r, 1), _mm256_castps256_ps128(r));
    t = _mm_hadd_ps(t, t);
    t = _mm_hadd_ps(t, t);
    const float reduced = _mm_cvtss_f32(t);
    if (f16) {
        double sum = reduced;
        for (int c = main; c < n; c++) sum += (double)(weight_at(w, 1, c) * x[c]);
        return (float)sum;
    }
    float sum = reduced;
    for (int c = main; c < n; c++) sum += weight_at(w, 0, c) * x[c];
    return sum;
}
#endif

void matmul_float(const void *w, int f16, const float *x, float *out, ptrdiff_t n_rows, int n_cols,
                  ptrdiff_t n_tokens, int mode, int use_avx2) {
    const size_t row_bytes = (size_t)n_cols * (f16 ? 2 : 4);
#pragma omp parallel for schedule(static) if ((size_t)n_rows * row_bytes * (size_t)n_tokens >= PARALLEL_BYTES)
    for (ptrdiff_t r = 0; r < n_rows; r++) {
        const uint8_t *wr = (const uint8_t *)w + (size_t)r * row_bytes;
        for (ptrdiff_t t = 0; t < n_tokens; t++) {
#ifdef OFFLOAD_X86
            if (use_avx2) {
                out[t * n_rows + r] = dot_avx2(wr, x + t * n_cols, n_cols, f16, mode);
                continue;
            }
#endif
            out[t * n_rows + r] = dot_portable(wr, x + t * n_cols, n_cols, f16, mode);
        }
    }
}
