/* K-quant matmuls of 8+ tokens in ggml's tiled order (see tiled.c). */
#ifndef OFFLOAD_TILED_H
#define OFFLOAD_TILED_H

#include <stddef.h>
#include <stdint.h>

/* Bytes per 256-value block of a format the tiled path serves, 0 if it serves none. */
int tiled_block_bytes(const char *name, int *has_min);

/* out[t, r] for t < n_tokens, r < n_rows from Q8_K activations, with the SIMD level
 * isa_level (0 portable, 1 AVX2, 2 AVX-512 VNNI); 0 on success, -1 unknown format, -2 out
 * of memory. */
int tiled_matmul(const char *name, const uint8_t *w, const int8_t *xq, const float *xd, const int16_t *bsums,
                 float *out, ptrdiff_t n_rows, int n_cols, ptrdiff_t n_tokens, int isa_level);

/* IQ4_XS in the tiled order (iq4.c): the same contract as tiled_matmul. */
int iq4_xs_tiled(const uint8_t *w, const int8_t *xq, const float *xd, float *out, ptrdiff_t n_rows, int n_cols,
                 ptrdiff_t n_tokens, int isa_level);
static inline int iq4_xs_tiled_bytes(int *has_min) {
    if (has_min) *has_min = 0;
    return 136;
}

#endif
