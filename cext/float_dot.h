/* F32 and F16 weights times float32 activations in llama.cpp's summation orders (float_dot.c). */
#ifndef OFFLOAD_FLOAT_DOT_H
#define OFFLOAD_FLOAT_DOT_H

#include <math.h>
#include <stddef.h>

#include "kernels.h"

enum float_order { FLOAT_GEMM8 = 0, FLOAT_VECDOT = 1 }; /* numba_kernels.GEMM8 / VECDOT */

/* out[t, r] = dot(row r of w, x[t]) for n_tokens tokens; w float32 or (f16) IEEE half rows. */
void matmul_float(const void *w, int f16, const float *x, float *out, ptrdiff_t n_rows, int n_cols,
                  ptrdiff_t n_tokens, int mode, int use_avx2);

#endif
