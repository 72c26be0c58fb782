/* The grid I-quants' blocks as ggml's tiled GEMM reads them (iq_grid.c, for tiled.c). */
#ifndef OFFLOAD_IQ_GRID_H
#define OFFLOAD_IQ_GRID_H

#include <stdint.h>

/* X(NAME, name, the tiled path's scale on d) for each format */
#define IQ_GRID_TILED(X)                                                                         \
    X(IQ2_XXS, iq2_xxs, 0.125f) X(IQ2_XS, iq2_xs, 0.125f) X(IQ2_S, iq2_s, 0.125f) X(IQ3_XXS, iq3_xxs, 0.25f) \
    X(IQ3_S, iq3_s, 1.0f) X(IQ1_S, iq1_s, 0.125f) X(IQ1_M, iq1_m, 0.125f)

/* q[256]: the signed values; sc[16]: 2 ls + 1 per 16 values; *d: the block's scale. */
#define DECLARE_IQ_TILED(NAME, name, scale) void iq_tiled_##name(const uint8_t *blk, int8_t *q, int16_t *sc, float *d);
IQ_GRID_TILED(DECLARE_IQ_TILED)

#endif
