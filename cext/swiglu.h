/* SwiGLU in ggml's order (swiglu.c). */
#ifndef OFFLOAD_SWIGLU_H
#define OFFLOAD_SWIGLU_H

#include <stddef.h>

/* out = silu(x) * g over n_rows rows of n values; out may be x (in place) */
void silu_mul_rows(const float *x, const float *g, float *out, ptrdiff_t n_rows, int n, int use_avx2);

#endif
