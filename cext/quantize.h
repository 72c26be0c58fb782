/* Activation rows quantized as ggml's x86 CPU matmul converts them (quantize.c). */
#ifndef OFFLOAD_QUANTIZE_H
#define OFFLOAD_QUANTIZE_H

#include <stdint.h>

/* float -> the float value of the nearest IEEE half (ties to even, overflow to inf), as vcvtps2ph */
float round_f16(float x);
/* k values -> qs (k int8), d (k/32 scales, fp16-rounded): ggml's quantize_row_q8_0 */
void quantize_row_q8_0(const float *x, int8_t *qs, float *d, int k);
/* k values -> qs (k int8), d (k/256 scales), bsums (k/16 sums of 16 qs): ggml's quantize_row_q8_K */
void quantize_row_q8_k(const float *x, int8_t *qs, float *d, int16_t *bsums, int k);
/* k values -> qs, d as quantize_row_q8_0, and s (k/32 floats): the fp16 of d * sum(qs) per
 * block, d the float32 scale before its fp16 rounding: ggml's x86 quantize_row_q8_1 */
void quantize_row_q8_1(const float *x, int8_t *qs, float *d, float *s, int k);
/* One of the three by kind (kernels.h's enum act_kind); sums: Q8_K's int16 block sums or
 * Q8_1's float s (the same bytes, see act_row), unused for Q8_0. */
void quantize_row_kind(int kind, const float *x, int8_t *qs, float *d, void *sums, int k);

#endif
