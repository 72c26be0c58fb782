/* Flash attention (flash.c): llama.cpp's CPU kernel, which a quantized V cache needs. */
#ifndef OFFLOAD_FLASH_H
#define OFFLOAD_FLASH_H

#include <stddef.h>
#include <stdint.h>

#include "kernels.h"

/* how a cache row's values are stored; F32 is read as F16, as llama.cpp casts an F32 cache
 * to F16 for its flash attention */
enum flash_store { FLASH_F32 = 0, FLASH_F16 = 1, FLASH_QUANT = 2, FLASH_BF16 = 3 };

typedef struct {
    const float *q;         /* (n, n_head * head_dim): queries of the new tokens */
    float *out;             /* (n, n_head * v_dim) */
    const uint8_t *k, *v;   /* this layer's cache rows; v may be k (MLA: values are the keys' prefix) */
    size_t k_row, v_row;    /* bytes of one cell's row, every KV head */
    size_t k_head, v_head;  /* bytes of one KV head's slice of a row */
    int k_store, v_store;   /* enum flash_store */
    row_dot_fn k_dot;       /* a quantized K: its vec_dot with ... */
    int k_act;              /* ... the activations of this kind (enum act_kind) */
    const format_kernels *v_format; /* a quantized V: its block layout (name, block bytes) */
    const float *sinks;     /* NULL, or one logit per head */
    int n, start, n_head, n_head_kv, head_dim, v_dim;
    int n_cells, window;
    const int32_t *cell_pos; /* as attention_args */
    int n_used;
    float scale;
    int n_kv;               /* llama.cpp's KV view (used cells padded to 256): its decode splits it */
    int n_chunks;           /* into this many chunks (its thread count) once n_kv >= 512 */
    int use_avx2;           /* the AVX2 loops (the same sums) */
    int v_kind;             /* (set by flash_attention_run) */
} flash_args;

/* 0 on success, -1 when scratch memory could not be allocated, -2 for a V format it cannot read */
int flash_attention_run(const flash_args *a);

#endif
