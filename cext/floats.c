/* F32, F16 and BF16 weights dotted with float activations, in the summation orders of
 * llama.cpp's x86 AVX2 build (see numba_kernels.py, whose kernels these equal bit for bit):
 *
 *   GEMM8        llamafile's tinyBLAS (2+ tokens, rows % 4 == 0, n_cols % 8 == 0): lane i
 *                accumulates elements 8m+i with FMA, reduced as hsum_float_8
 *   VECDOT       ggml_vec_dot_f32 / _f16: four 8-lane FMA accumulators over chunks of 32,
 *                folded (0+2)+(1+3), then across lanes as two hadds; the tail one by one
 *                (F16 in a double, F32 in a float rounding each product)
 *   VECDOT_BF16  ggml_vec_dot_bf16: the same, folded across lanes as hsum_float_8
 *
 * The weights are decoded exactly to float32 (a half or a bfloat16 is a float32 with fewer
 * bits), a row at a time, then dotted with every token. Routers and shared-expert gates are
 * F32 in most quantized files, and some models keep F16 embeddings or output. */
#include <math.h>
#include <stdlib.h>

#include "floats.h"
#include "kernels.h"

/* The lanes' reduction and the tail, after the main loop filled acc[0..7] (GEMM8) or the
 * four accumulators' fold (acc[0..7] = (a0 + a2) + (a1 + a3) lane-wise). */
static inline __attribute__((always_inline)) float finish(const float *acc, const float *w, const float *x, int main,
                                                          int n, int order, int double_tail) {
    if (order == ORDER_GEMM8) return hsum8_portable(acc);
    double total;
    if (order == ORDER_VECDOT_BF16) {
        total = (double)hsum8_portable(acc);
    } else {
        const float t0 = acc[0] + acc[4], t1 = acc[1] + acc[5], t2 = acc[2] + acc[6], t3 = acc[3] + acc[7];
        total = (double)((t0 + t1) + (t2 + t3));
    }
    if (double_tail) { /* vec_dot_f16 / _bf16 keep the sum in double */
        for (int c = main; c < n; c++) total += (double)(w[c] * x[c]);
        return (float)total;
    }
    float tail = (float)total; /* vec_dot_f32 keeps a float and rounds each tail product */
    for (int c = main; c < n; c++) tail += w[c] * x[c];
    return tail;
}

static float dot_portable(const float *w, const float *x, int n, int order, int double_tail) {
    float acc[32] = {0};
    if (order == ORDER_GEMM8) {
        for (int c = 0; c < n; c++) acc[c % 8] = fmaf(w[c], x[c], acc[c % 8]);
        return finish(acc, w, x, n, n, order, double_tail);
    }
    const int main = n - n % 32;
    for (int c = 0; c < main; c++) acc[c % 32] = fmaf(w[c], x[c], acc[c % 32]);
    for (int i = 0; i < 8; i++) acc[i] = (acc[i] + acc[16 + i]) + (acc[8 + i] + acc[24 + i]);
    return finish(acc, w, x, main, n, order, double_tail);
}

static void decode_portable(int type, const void *row, float *out, int n) {
    const uint16_t *h = row;
    if (type == FLOAT_F16)
        for (int c = 0; c < n; c++) out[c] = fp16_to_fp32(h[c]);
    else
        for (int c = 0; c < n; c++) {
            const uint32_t u = (uint32_t)h[c] << 16;
            memcpy(out + c, &u, 4);
        }
}

#ifdef OFFLOAD_X86
static TARGET_AVX2 float dot_avx2(const float *w, const float *x, int n, int order, int double_tail) {
    float acc[8];
    if (order == ORDER_GEMM8) {
        __m256 a = _mm256_setzero_ps();
        int c = 0;
        for (; c + 8 <= n; c += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(w + c), _mm256_loadu_ps(x + c), a);
        _mm256_storeu_ps(acc, a);
        for (; c < n; c++) acc[c % 8] = fmaf(w[c], x[c], acc[c % 8]);
        return finish(acc, w, x, n, n, order, double_tail);
    }
    const int main = n - n % 32;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int c = 0; c < main; c += 32) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + c), _mm256_loadu_ps(x + c), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + c + 8), _mm256_loadu_ps(x + c + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + c + 16), _mm256_loadu_ps(x + c + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + c + 24), _mm256_loadu_ps(x + c + 24), a3);
    }
    _mm256_storeu_ps(acc, _mm256_add_ps(_mm256_add_ps(a0, a2), _mm256_add_ps(a1, a3)));
    return finish(acc, w, x, main, n, order, double_tail);
}

static TARGET_AVX2 void decode_avx2(int type, const void *row, float *out, int n) {
    const uint16_t *h = row;
    int c = 0;
    if (type == FLOAT_F16)
        for (; c + 8 <= n; c += 8) _mm256_storeu_ps(out + c, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + c))));
    else
        for (; c + 8 <= n; c += 8) {
            const __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(h + c)));
            _mm256_storeu_ps(out + c, _mm256_castsi256_ps(_mm256_slli_epi32(u, 16)));
        }
    decode_portable(type, h + c, out + c, n - c);
}
#endif

int matmul_float(int type, const void *w, const float *x, float *out, ptrdiff_t n_rows, int n_cols,
                 ptrdiff_t n_tokens, int order, int use_avx2, int parallel) {
    const size_t row_bytes = (size_t)n_cols * (type == FLOAT_F32 ? 4 : 2);
    const int double_tail = type != FLOAT_F32;
    int failed = 0;
#pragma omp parallel if (parallel)
    {
        float *buf = type == FLOAT_F32 ? NULL : malloc((size_t)n_cols * sizeof(float));
        const int ok = type == FLOAT_F32 || buf;
        if (!ok) {
#pragma omp atomic write
            failed = 1;
        }
        /* rows outside, tokens inside: a row is decoded once for every token of a batch */
#pragma omp for schedule(static)
        for (ptrdiff_t r = 0; r < n_rows; r++) {
            if (!ok) continue;
            const uint8_t *row = (const uint8_t *)w + (size_t)r * row_bytes;
            const float *wr = (const float *)row;
#ifdef OFFLOAD_X86
            if (use_avx2) {
                if (buf) {
                    decode_avx2(type, row, buf, n_cols);
                    wr = buf;
                }
                for (ptrdiff_t t = 0; t < n_tokens; t++)
                    out[t * n_rows + r] = dot_avx2(wr, x + t * n_cols, n_cols, order, double_tail);
                continue;
            }
#endif
            if (buf) {
                decode_portable(type, row, buf, n_cols);
                wr = buf;
            }
            for (ptrdiff_t t = 0; t < n_tokens; t++)
                out[t * n_rows + r] = dot_portable(wr, x + t * n_cols, n_cols, order, double_tail);
        }
        free(buf);
    }
    (void)use_avx2;
    return failed ? -1 : 0;
}

float dot_f32_vecdot(const float *w, const float *x, int n, int use_avx2) {
#ifdef OFFLOAD_X86
    if (use_avx2) return dot_avx2(w, x, n, ORDER_VECDOT, 0);
#endif
    (void)use_avx2;
    return dot_portable(w, x, n, ORDER_VECDOT, 0);
}

float dot_bf16_vecdot(const float *w, const float *x, int n, int use_avx2) {
#ifdef OFFLOAD_X86
    if (use_avx2) return dot_avx2(w, x, n, ORDER_VECDOT_BF16, 1);
#endif
    (void)use_avx2;
    return dot_portable(w, x, n, ORDER_VECDOT_BF16, 1);
}
