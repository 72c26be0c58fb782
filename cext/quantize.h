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

#endif
