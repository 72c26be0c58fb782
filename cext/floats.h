/* Matmuls with float weights (F32, F16, BF16) in ggml's summation orders (floats.c). */
#ifndef OFFLOAD_FLOATS_H
#define OFFLOAD_FLOATS_H

#include <stddef.h>

enum float_type { FLOAT_F32 = 0, FLOAT_F16 = 1, FLOAT_BF16 = 2 };

/* The orders of numba_kernels (GEMM8, VECDOT, VECDOT_BF16; the caller picks as ggml does). */
enum float_order { ORDER_GEMM8 = 0, ORDER_VECDOT = 1, ORDER_VECDOT_BF16 = 2 };

/* out[t, r] = row r of w (n_rows, n_cols of `type`) . x[t] (float32, already rounded to the
 * weight type as ggml converts it), over n_tokens; OpenMP over rows when `parallel`.
 * Returns -1 when a row buffer could not be allocated. */
int matmul_float(int type, const void *w, const float *x, float *out, ptrdiff_t n_rows, int n_cols,
                 ptrdiff_t n_tokens, int order, int use_avx2, int parallel);

/* One F32 row dot in vec_dot_f32's order: what matmul_float gives one token (a router row). */
float dot_f32_vecdot(const float *w, const float *x, int n, int use_avx2);

/* One BF16 row (decoded to floats) dot floats rounded to BF16, in ggml_vec_dot_bf16's order. */
float dot_bf16_vecdot(const float *w, const float *x, int n, int use_avx2);

#endif
