/* The grid I-quants (IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ1_S, IQ1_M) dotted with Q8_K,
 * as ggml_vec_dot_iq*_q8_K (x86 AVX2, arch/x86/quants.c). Layouts and the order of the sums:
 * offload/kernels/iq_grid.py. In short (the portable path spells a super-block out in an
 * `iq_block`; the AVX2 path builds each 32-value group in registers): per value a grid
 * magnitude and a sign (+1/-1), per 16 values the scale 2 ls + 1; then
 *   lane[i] = sum over the eight 32-value groups c of sc[2c + (i >= 4)] * (the four products
 *             mag * sign(q8) of values 32c + 4i .. 32c + 4i + 3)
 * where sign(q8) is _mm256_sign_epi8's: a flipped -128 stays -128 (Q8_K's quantizer never
 * makes one; any int8 gives ggml's bits). Floats, d = f16(w.d) * x.d:
 *   IQ2_*, IQ3_*: acc[i] = fma(d, float(lane[i]), acc[i]); out = post * hsum_float_8(acc)
 *   IQ1_S: + acc1 = fma(d, float(s1), acc1), s1 the shifts through bsums; out = hsum + acc1 / 8
 *   IQ1_M: + the shifts' own lanes into acc2; out = hsum(acc) + hsum(acc2) / 8
 * The integer sums are exact (|pair| <= 2 * 62 * 128 < 32768), so the portable path and the
 * AVX2 one (maddubs / madd, as ggml) give the same bits.
 */
#include <math.h>

#include "iq_grid.h"
#include "iq_grids.h"
#include "kernels.h"

#define QK_K 256

typedef struct {
    uint8_t mag[QK_K]; /* grid magnitude of each value (IQ1: |grid|, 0 or 1) */
    int8_t sgn[QK_K];  /* its sign: +1 or -1 */
    int8_t shift[QK_K]; /* IQ1: the sign of its +-1/8 shift */
    int16_t sc[16];    /* 2 ls + 1, per 16 values */
    float d;
} iq_block;

typedef void (*iq_decode_fn)(const uint8_t *blk, iq_block *o);

static inline uint32_t read_u32(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* Eight sign bits -> eight bytes, -1 (0xff) where the bit is set, else +1: each bit moved
 * into its own byte, a nonzero byte's top bit set by adding 0x7f, then spread. Branchless. */
static inline uint64_t sign_bytes(unsigned bits) {
    const uint64_t ones = 0x0101010101010101ULL;
    const uint64_t spread = ((uint64_t)(bits & 0xff) * ones) & 0x8040201008040201ULL;
    const uint64_t top = ((spread + 0x7f7f7f7f7f7f7f7fULL) | spread) & 0x8080808080808080ULL;
    return ((top >> 7) * 0xff) | ones;
}

/* n values (8 or 4) of a grid entry (value j in byte j) with their sign bits, at o[pos]. */
static inline void put_grid(iq_block *o, int pos, uint64_t grid, unsigned signs, int n) {
    const uint64_t sg = sign_bytes(signs);
    memcpy(o->mag + pos, &grid, (size_t)n); /* little-endian: byte j is value j */
    memcpy(o->sgn + pos, &sg, (size_t)n);
}

static inline void scale32(iq_block *o, int ib32, int ls) { o->sc[2 * ib32] = o->sc[2 * ib32 + 1] = (int16_t)(2 * ls + 1); }

/* IQ2_XXS (66 bytes): f16 d; per 32 values two uint32: 4 grid indices; 4 x 7 sign bits | ls << 28. */
static void decode_iq2_xxs(const uint8_t *blk, iq_block *o) {
    o->d = fp16_to_fp32(read_u16(blk));
    for (int ib = 0; ib < 8; ib++) {
        const uint32_t idx = read_u32(blk + 2 + 8 * ib), aux = read_u32(blk + 6 + 8 * ib);
        scale32(o, ib, (int)(aux >> 28));
        for (int l = 0; l < 4; l++)
            put_grid(o, 32 * ib + 8 * l, iq2xxs_grid[(idx >> (8 * l)) & 255], ksigns_iq2xs[(aux >> (7 * l)) & 127], 8);
    }
}

/* IQ2_XS (74): f16 d; uint16 qs[32] (9-bit index | 7 sign bits << 9); scales[8] (per 16). */
static void decode_iq2_xs(const uint8_t *blk, iq_block *o) {
    o->d = fp16_to_fp32(read_u16(blk));
    for (int g = 0; g < 32; g++) {
        const uint16_t q = read_u16(blk + 2 + 2 * g);
        put_grid(o, 8 * g, iq2xs_grid[q & 511], ksigns_iq2xs[q >> 9], 8);
    }
    for (int ib = 0; ib < 8; ib++) {
        o->sc[2 * ib] = (int16_t)(2 * (blk[66 + ib] & 15) + 1);
        o->sc[2 * ib + 1] = (int16_t)(2 * (blk[66 + ib] >> 4) + 1);
    }
}

/* IQ2_S (82): f16 d; qs[32] low index bytes; signs[32]; qh[8] (2 high bits per 8); scales[8]. */
static void decode_iq2_s(const uint8_t *blk, iq_block *o) {
    o->d = fp16_to_fp32(read_u16(blk));
    const uint8_t *qs = blk + 2, *signs = blk + 34, *qh = blk + 66, *scales = blk + 74;
    for (int ib = 0; ib < 8; ib++) {
        for (int l = 0; l < 4; l++)
            put_grid(o, 32 * ib + 8 * l, iq2s_grid[qs[4 * ib + l] | (((qh[ib] >> (2 * l)) & 3) << 8)], signs[4 * ib + l], 8);
        o->sc[2 * ib] = (int16_t)(2 * (scales[ib] & 15) + 1);
        o->sc[2 * ib + 1] = (int16_t)(2 * (scales[ib] >> 4) + 1);
    }
}

/* IQ3_XXS (98): f16 d; qs[64] (an index per 4 values); per 32 values a uint32 of 4 x 7 sign bits | ls << 28. */
static void decode_iq3_xxs(const uint8_t *blk, iq_block *o) {
    o->d = fp16_to_fp32(read_u16(blk));
    const uint8_t *qs = blk + 2;
    for (int ib = 0; ib < 8; ib++) {
        const uint32_t aux = read_u32(blk + 66 + 4 * ib);
        scale32(o, ib, (int)(aux >> 28));
        for (int l = 0; l < 4; l++) {
            const unsigned signs = ksigns_iq2xs[(aux >> (7 * l)) & 127];
            put_grid(o, 32 * ib + 8 * l, iq3xxs_grid[qs[8 * ib + 2 * l]], signs, 4);
            put_grid(o, 32 * ib + 8 * l + 4, iq3xxs_grid[qs[8 * ib + 2 * l + 1]], signs >> 4, 4);
        }
    }
}

/* IQ3_S (110): f16 d; qs[64]; qh[8] (9th index bit of each of the 8 indices of 32 values); signs[32]; scales[4]. */
static void decode_iq3_s(const uint8_t *blk, iq_block *o) {
    o->d = fp16_to_fp32(read_u16(blk));
    const uint8_t *qs = blk + 2, *qh = blk + 66, *signs = blk + 74, *scales = blk + 106;
    for (int ib = 0; ib < 8; ib++) {
        scale32(o, ib, ib % 2 ? scales[ib / 2] >> 4 : scales[ib / 2] & 15);
        for (int k = 0; k < 8; k++)
            put_grid(o, 32 * ib + 4 * k, iq3s_grid[qs[8 * ib + k] | (((qh[ib] >> k) & 1) << 8)], signs[4 * ib + k / 2] >> (4 * (k % 2)), 4);
    }
}

/* An IQ1 grid entry: int8 values -1 (0xff), 0, 1 -> magnitude (the low bit) and sign (0xff
 * stays -1, 0 and 1 give +1); the group's shift sign. */
static inline void put_iq1(iq_block *o, int pos, uint64_t grid, int shift_neg) {
    const uint64_t ones = 0x0101010101010101ULL, mag = grid & ones, sgn = grid | ones;
    const uint64_t shift = shift_neg ? ~0ULL : ones;
    memcpy(o->mag + pos, &mag, 8);
    memcpy(o->sgn + pos, &sgn, 8);
    memcpy(o->shift + pos, &shift, 8);
}

/* IQ1_S (50): f16 d; qs[32]; uint16 qh[8]: per 32 values 3 high index bits per 8, ls at bit 12, shift sign at 15. */
static void decode_iq1_s(const uint8_t *blk, iq_block *o) {
    o->d = fp16_to_fp32(read_u16(blk));
    const uint8_t *qs = blk + 2;
    for (int ib = 0; ib < 8; ib++) {
        const uint16_t qh = read_u16(blk + 34 + 2 * ib);
        scale32(o, ib, (qh >> 12) & 7);
        for (int l = 0; l < 4; l++)
            put_iq1(o, 32 * ib + 8 * l, iq1s_grid[qs[4 * ib + l] | (((qh >> (3 * l)) & 7) << 8)], qh & 0x8000);
    }
}

/* IQ1_M (56): qs[32]; qh[16] (per 8 values: 3 high index bits, shift sign at bit 3); uint16
 * scales[4]: four 3-bit ls per 16 values each, d's bits in their top nibbles. */
static void decode_iq1_m(const uint8_t *blk, iq_block *o) {
    const uint8_t *qs = blk, *qh = blk + 32;
    uint16_t sc[4];
    for (int k = 0; k < 4; k++) sc[k] = read_u16(blk + 48 + 2 * k);
    o->d = fp16_to_fp32((uint16_t)((sc[0] >> 12) | ((sc[1] >> 8) & 0x00f0) | ((sc[2] >> 4) & 0x0f00) | (sc[3] & 0xf000)));
    for (int s = 0; s < 16; s++) o->sc[s] = (int16_t)(2 * ((sc[s / 4] >> (3 * (s % 4))) & 7) + 1);
    for (int g = 0; g < 32; g++) {
        const int h = g % 2 ? qh[g / 2] >> 4 : qh[g / 2] & 15;
        put_iq1(o, 8 * g, iq1s_grid[qs[g] | ((h & 7) << 8)], h & 8);
    }
}

/* -- the sums ------------------------------------------------------------------------------- */

enum iq_kind { IQ_PLAIN = 0, IQ_SHIFT_SUM = 1, IQ_SHIFT_LANES = 2 };

typedef struct {
    int bytes;
    iq_decode_fn decode;
    float post; /* IQ_PLAIN: the factor on the sum */
    int kind;
} iq_format;

static const iq_format IQ2_XXS = {66, decode_iq2_xxs, 0.125f, IQ_PLAIN};
static const iq_format IQ2_XS = {74, decode_iq2_xs, 0.125f, IQ_PLAIN};
static const iq_format IQ2_S = {82, decode_iq2_s, 0.125f, IQ_PLAIN};
static const iq_format IQ3_XXS = {98, decode_iq3_xxs, 0.25f, IQ_PLAIN};
static const iq_format IQ3_S = {110, decode_iq3_s, 1.0f, IQ_PLAIN};
static const iq_format IQ1_S = {50, decode_iq1_s, 1.0f, IQ_SHIFT_SUM};
static const iq_format IQ1_M = {56, decode_iq1_m, 1.0f, IQ_SHIFT_LANES};

static const uint8_t ONES[QK_K] = {[0 ... QK_K - 1] = 1};

/* _mm256_sign_epi8(q, s) for one byte: -q where s < 0, except that -128 stays -128. */
static inline int32_t flip(int8_t q, int8_t s) { return s < 0 && q != -128 ? -(int32_t)q : q; }

static inline void lanes_portable(const uint8_t *mag, const int8_t *sgn, const int16_t *sc, const int8_t *q8,
                                  int32_t lane[8]) {
    for (int i = 0; i < 8; i++) lane[i] = 0;
    for (int c = 0; c < 8; c++)
        for (int i = 0; i < 8; i++) {
            int32_t p = 0;
            for (int e = 32 * c + 4 * i; e < 32 * c + 4 * i + 4; e++) p += (int32_t)mag[e] * flip(q8[e], sgn[e]);
            lane[i] += sc[2 * c + (i >= 4)] * p;
        }
}

/* IQ1_S's shifts: per 32 values (2 ls + 1) * (+-1) * (the sum of its q8, from two bsums). */
static inline int32_t shift_sum(const iq_block *b, const int16_t *bsums) {
    int32_t s = 0;
    for (int g = 0; g < 8; g++) s += (bsums[2 * g] + bsums[2 * g + 1]) * b->shift[32 * g] * b->sc[2 * g];
    return s;
}

static float dot_iq_portable(const iq_format *f, const uint8_t *w, const act_row *x, int n_cols) {
    float acc[8] = {0}, acc2[8] = {0}, acc1 = 0.0f;
    iq_block b;
    for (int ib = 0; ib < n_cols / QK_K; ib++) {
        f->decode(w + (size_t)ib * f->bytes, &b);
        const int8_t *q8 = x->qs + (size_t)ib * QK_K;
        const float d = b.d * x->d[ib];
        int32_t lane[8];
        lanes_portable(b.mag, b.sgn, b.sc, q8, lane);
        for (int i = 0; i < 8; i++) acc[i] = fmaf(d, (float)lane[i], acc[i]);
        if (f->kind == IQ_SHIFT_SUM) {
            acc1 = fmaf(d, (float)shift_sum(&b, x->bsums + (size_t)ib * 16), acc1);
        } else if (f->kind == IQ_SHIFT_LANES) {
            lanes_portable(ONES, b.shift, b.sc, q8, lane);
            for (int i = 0; i < 8; i++) acc2[i] = fmaf(d, (float)lane[i], acc2[i]);
        }
    }
    if (f->kind == IQ_SHIFT_SUM) return hsum8_portable(acc) + 0.125f * acc1;
    if (f->kind == IQ_SHIFT_LANES) return hsum8_portable(acc) + 0.125f * hsum8_portable(acc2);
    return f->post * hsum8_portable(acc);
}

#ifdef OFFLOAD_X86
/* The AVX2 row dots, shaped like ggml's: each 32-value group built in registers (grid
 * entries by _mm256_set_epi64x / _epi32, signs as 0x01 / 0xff bytes), then maddubs on the
 * magnitudes and the sign-flipped q8 (_mm256_sign_epi8: the -128 rule), madd with the
 * scales. The integers are the portable path's, so are the bits. */
static uint64_t SIGN8[256]; /* sign_bytes(k), filled when the library loads */

__attribute__((constructor)) static void init_sign8(void) {
    for (int k = 0; k < 256; k++) SIGN8[k] = sign_bytes((unsigned)k);
}

#define S8(bits) ((long long)SIGN8[(bits) & 255])
#define SCALE_PAIR(lo, hi) _mm256_set_m128i(_mm_set1_epi16((int16_t)(hi)), _mm_set1_epi16((int16_t)(lo)))

static inline TARGET_AVX2 void group_iq2_xxs(const uint8_t *blk, int c, __m256i *g, __m256i *s, __m256i *sc) {
    const uint32_t idx = read_u32(blk + 2 + 8 * c), aux = read_u32(blk + 6 + 8 * c);
    *g = _mm256_set_epi64x((long long)iq2xxs_grid[idx >> 24], (long long)iq2xxs_grid[(idx >> 16) & 255],
                           (long long)iq2xxs_grid[(idx >> 8) & 255], (long long)iq2xxs_grid[idx & 255]);
    *s = _mm256_set_epi64x(S8(ksigns_iq2xs[(aux >> 21) & 127]), S8(ksigns_iq2xs[(aux >> 14) & 127]),
                           S8(ksigns_iq2xs[(aux >> 7) & 127]), S8(ksigns_iq2xs[aux & 127]));
    *sc = _mm256_set1_epi16((int16_t)(2 * (aux >> 28) + 1));
}

static inline TARGET_AVX2 void group_iq2_xs(const uint8_t *blk, int c, __m256i *g, __m256i *s, __m256i *sc) {
    uint16_t q[4];
    memcpy(q, blk + 2 + 8 * c, 8);
    *g = _mm256_set_epi64x((long long)iq2xs_grid[q[3] & 511], (long long)iq2xs_grid[q[2] & 511],
                           (long long)iq2xs_grid[q[1] & 511], (long long)iq2xs_grid[q[0] & 511]);
    *s = _mm256_set_epi64x(S8(ksigns_iq2xs[q[3] >> 9]), S8(ksigns_iq2xs[q[2] >> 9]), S8(ksigns_iq2xs[q[1] >> 9]),
                           S8(ksigns_iq2xs[q[0] >> 9]));
    *sc = SCALE_PAIR(2 * (blk[66 + c] & 15) + 1, 2 * (blk[66 + c] >> 4) + 1);
}

static inline TARGET_AVX2 void group_iq2_s(const uint8_t *blk, int c, __m256i *g, __m256i *s, __m256i *sc) {
    const uint8_t *qs = blk + 2 + 4 * c, *signs = blk + 34 + 4 * c;
    const int qh = blk[66 + c];
    *g = _mm256_set_epi64x((long long)iq2s_grid[qs[3] | ((qh << 2) & 0x300)], (long long)iq2s_grid[qs[2] | ((qh << 4) & 0x300)],
                           (long long)iq2s_grid[qs[1] | ((qh << 6) & 0x300)], (long long)iq2s_grid[qs[0] | ((qh << 8) & 0x300)]);
    *s = _mm256_set_epi64x(S8(signs[3]), S8(signs[2]), S8(signs[1]), S8(signs[0]));
    *sc = SCALE_PAIR(2 * (blk[74 + c] & 15) + 1, 2 * (blk[74 + c] >> 4) + 1);
}

static inline TARGET_AVX2 void group_iq3_xxs(const uint8_t *blk, int c, __m256i *g, __m256i *s, __m256i *sc) {
    const uint8_t *q = blk + 2 + 8 * c;
    const uint32_t aux = read_u32(blk + 66 + 4 * c);
    *g = _mm256_set_epi32((int)iq3xxs_grid[q[7]], (int)iq3xxs_grid[q[6]], (int)iq3xxs_grid[q[5]], (int)iq3xxs_grid[q[4]],
                          (int)iq3xxs_grid[q[3]], (int)iq3xxs_grid[q[2]], (int)iq3xxs_grid[q[1]], (int)iq3xxs_grid[q[0]]);
    *s = _mm256_set_epi64x(S8(ksigns_iq2xs[(aux >> 21) & 127]), S8(ksigns_iq2xs[(aux >> 14) & 127]),
                           S8(ksigns_iq2xs[(aux >> 7) & 127]), S8(ksigns_iq2xs[aux & 127]));
    *sc = _mm256_set1_epi16((int16_t)(2 * (aux >> 28) + 1));
}

static inline TARGET_AVX2 void group_iq3_s(const uint8_t *blk, int c, __m256i *g, __m256i *s, __m256i *sc) {
    const uint8_t *q = blk + 2 + 8 * c, *signs = blk + 74 + 4 * c;
    const int qh = blk[66 + c];
#define IQ3S(k) (int)iq3s_grid[q[k] | ((qh << (8 - (k))) & 256)]
    *g = _mm256_set_epi32(IQ3S(7), IQ3S(6), IQ3S(5), IQ3S(4), IQ3S(3), IQ3S(2), IQ3S(1), IQ3S(0));
#undef IQ3S
    *s = _mm256_set_epi64x(S8(signs[3]), S8(signs[2]), S8(signs[1]), S8(signs[0]));
    const int ls = c % 2 ? blk[106 + c / 2] >> 4 : blk[106 + c / 2] & 15;
    *sc = _mm256_set1_epi16((int16_t)(2 * ls + 1));
}

#define DEFINE_FAST(name, bytes, post)                                                                           \
    static TARGET_AVX2 float dot_##name##_avx2(const uint8_t *w, const act_row *x, int n_cols) {                \
        __m256 acc = _mm256_setzero_ps();                                                                        \
        for (int ib = 0; ib < n_cols / QK_K; ib++) {                                                             \
            const uint8_t *blk = w + (size_t)ib * (bytes);                                                       \
            const int8_t *q8 = x->qs + (size_t)ib * QK_K;                                                        \
            const float d = fp16_to_fp32(read_u16(blk)) * x->d[ib];                                              \
            __m256i sum = _mm256_setzero_si256();                                                                \
            for (int c = 0; c < 8; c++) {                                                                        \
                __m256i g, s, sc;                                                                                \
                group_##name(blk, c, &g, &s, &sc);                                                               \
                const __m256i y = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(q8 + 32 * c)), s);       \
                sum = _mm256_add_epi32(sum, _mm256_madd_epi16(_mm256_maddubs_epi16(g, y), sc));                  \
            }                                                                                                    \
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sum), acc);                              \
        }                                                                                                        \
        return (post) * hsum_float_8(acc);                                                                       \
    }
DEFINE_FAST(iq2_xxs, 66, 0.125f)
DEFINE_FAST(iq2_xs, 74, 0.125f)
DEFINE_FAST(iq2_s, 82, 0.125f)
DEFINE_FAST(iq3_xxs, 98, 0.25f)
DEFINE_FAST(iq3_s, 110, 1.0f)

/* IQ1_S and IQ1_M the same way: the int8 grid's magnitude is its low bit (and ones), its
 * sign is the entry itself (or ones: 0xff stays -1, 0 and 1 give +1). */
static TARGET_AVX2 float dot_iq1_s_avx2(const uint8_t *w, const act_row *x, int n_cols) {
    const __m256i ones = _mm256_set1_epi8(1);
    __m256 acc = _mm256_setzero_ps();
    float acc1 = 0.0f;
    for (int ib = 0; ib < n_cols / QK_K; ib++) {
        const uint8_t *blk = w + (size_t)ib * 50, *qs = blk + 2;
        const int8_t *q8 = x->qs + (size_t)ib * QK_K;
        const int16_t *bs = x->bsums + (size_t)ib * 16;
        const float d = fp16_to_fp32(read_u16(blk)) * x->d[ib];
        __m256i sum = _mm256_setzero_si256();
        int32_t s1 = 0;
        for (int c = 0; c < 8; c++) {
            const uint16_t qh = read_u16(blk + 34 + 2 * c);
            const uint8_t *q = qs + 4 * c;
            const __m256i g = _mm256_set_epi64x((long long)iq1s_grid[q[3] | (((qh >> 9) & 7) << 8)],
                                                (long long)iq1s_grid[q[2] | (((qh >> 6) & 7) << 8)],
                                                (long long)iq1s_grid[q[1] | (((qh >> 3) & 7) << 8)],
                                                (long long)iq1s_grid[q[0] | ((qh & 7) << 8)]);
            const int ls = 2 * ((qh >> 12) & 7) + 1;
            const __m256i y = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(q8 + 32 * c)), _mm256_or_si256(g, ones));
            sum = _mm256_add_epi32(sum, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_and_si256(g, ones), y),
                                                          _mm256_set1_epi16((int16_t)ls)));
            s1 += (bs[2 * c] + bs[2 * c + 1]) * (qh & 0x8000 ? -1 : 1) * ls;
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sum), acc);
        acc1 = fmaf(d, (float)s1, acc1);
    }
    return hsum_float_8(acc) + 0.125f * acc1;
}

static TARGET_AVX2 float dot_iq1_m_avx2(const uint8_t *w, const act_row *x, int n_cols) {
    const __m256i ones = _mm256_set1_epi8(1);
    __m256 acc = _mm256_setzero_ps(), acc2 = _mm256_setzero_ps();
    for (int ib = 0; ib < n_cols / QK_K; ib++) {
        const uint8_t *blk = w + (size_t)ib * 56, *qs = blk, *qh = blk + 32;
        const int8_t *q8 = x->qs + (size_t)ib * QK_K;
        uint16_t sw[4];
        memcpy(sw, blk + 48, 8);
        const float d = fp16_to_fp32((uint16_t)((sw[0] >> 12) | ((sw[1] >> 8) & 0x00f0) | ((sw[2] >> 4) & 0x0f00) |
                                                (sw[3] & 0xf000))) * x->d[ib];
        __m256i sum = _mm256_setzero_si256(), sum2 = _mm256_setzero_si256();
        for (int c = 0; c < 8; c++) {
            const uint8_t *q = qs + 4 * c;
            const int h0 = qh[2 * c] & 15, h1 = qh[2 * c] >> 4, h2 = qh[2 * c + 1] & 15, h3 = qh[2 * c + 1] >> 4;
            const __m256i g = _mm256_set_epi64x((long long)iq1s_grid[q[3] | ((h3 & 7) << 8)], (long long)iq1s_grid[q[2] | ((h2 & 7) << 8)],
                                                (long long)iq1s_grid[q[1] | ((h1 & 7) << 8)], (long long)iq1s_grid[q[0] | ((h0 & 7) << 8)]);
            const long long pos = 0x0101010101010101LL, neg = -1LL;
            const __m256i shift = _mm256_set_epi64x(h3 & 8 ? neg : pos, h2 & 8 ? neg : pos, h1 & 8 ? neg : pos, h0 & 8 ? neg : pos);
            const int sh = 6 * (c % 2);
            const __m256i sc = SCALE_PAIR(2 * ((sw[c / 2] >> sh) & 7) + 1, 2 * ((sw[c / 2] >> (sh + 3)) & 7) + 1);
            const __m256i x8 = _mm256_loadu_si256((const __m256i *)(q8 + 32 * c));
            const __m256i y = _mm256_sign_epi8(x8, _mm256_or_si256(g, ones));
            sum = _mm256_add_epi32(sum, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_and_si256(g, ones), y), sc));
            sum2 = _mm256_add_epi32(sum2, _mm256_madd_epi16(_mm256_maddubs_epi16(ones, _mm256_sign_epi8(x8, shift)), sc));
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sum), acc);
        acc2 = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sum2), acc2);
    }
    return hsum_float_8(acc) + 0.125f * hsum_float_8(acc2);
}
#endif

#ifdef OFFLOAD_X86
/* (BMI2 is there on every CPU with AVX-512 VNNI) */
#undef TARGET_AVX512
#define TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c,bmi2")))
/* The AVX-512 row dots: the same int32 lanes as the AVX2 ones (exact integers, so the same
 * bits), built 64 values (a quarter-block) at a time. A quarter's grid entries come by
 * scalar loads (GRID8/GRID16, indices by BMI2 pdep as ggml's IQ1_M), its signs are a 64-bit mask (bit v:
 * value v negative) that negates q8 by a masked subtract (0 - (-128) wraps to -128:
 * _mm256_sign_epi8's rule), and its scales are 4 of a block's 16 (2 ls + 1, per 16 values)
 * spread over the int16 pairs by a permute. Then maddubs(grid, signed q8) -> madd(., scales)
 * -> sum; int32 lane m of a quarter holds values 4m..4m+3 of 64, so lanes m and m + 8 fold
 * into ggml's lane m % 8 of its 32-value group. On this Zen 4 (2 threads, L3-hot GEMV) they
 * run 1.05-1.5x ggml's AVX2 vec_dot. */
static inline TARGET_AVX512 __m512i quarter_scales(__m256i sc16, int z) {
    const __m512i pick = _mm512_set_epi16(3, 3, 3, 3, 3, 3, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0,
                                          0, 0, 0, 0, 0);
    return _mm512_permutexvar_epi16(_mm512_add_epi16(pick, _mm512_set1_epi16((short)(4 * z))), _mm512_castsi256_si512(sc16));
}

static inline TARGET_AVX512 __m512i quarter_dot(__m512i mag, uint64_t neg, const int8_t *q8, __m512i sc) {
    const __m512i q = _mm512_loadu_si512(q8);
    const __m512i y = _mm512_mask_sub_epi8(q, (__mmask64)neg, _mm512_setzero_si512(), q);
    return _mm512_madd_epi16(_mm512_maddubs_epi16(mag, y), sc);
}

static inline TARGET_AVX512 __m256 block_acc(__m512i sum, float d, __m256 acc) {
    const __m256i lanes = _mm256_add_epi32(_mm512_castsi512_si256(sum), _mm512_extracti64x4_epi64(sum, 1));
    return _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(lanes), acc);
}

/* Eight 64-bit (GRID8) or sixteen 32-bit (GRID16) grid entries t[IX(0)], ... by scalar loads,
 * the indices worked out in general registers: on this Zen 4 that beats vpgatherdd/dq (about
 * 1.25 cycles an entry) and a vector of indices stored and reloaded. */
#define GRID8(t, IX)                                                                                                   \
    _mm512_set_epi64((long long)(t)[IX(7)], (long long)(t)[IX(6)], (long long)(t)[IX(5)], (long long)(t)[IX(4)],       \
                     (long long)(t)[IX(3)], (long long)(t)[IX(2)], (long long)(t)[IX(1)], (long long)(t)[IX(0)])
#define GRID16(t, IX)                                                                                                  \
    _mm512_set_epi32((int)(t)[IX(15)], (int)(t)[IX(14)], (int)(t)[IX(13)], (int)(t)[IX(12)], (int)(t)[IX(11)],        \
                     (int)(t)[IX(10)], (int)(t)[IX(9)], (int)(t)[IX(8)], (int)(t)[IX(7)], (int)(t)[IX(6)], (int)(t)[IX(5)], \
                     (int)(t)[IX(4)], (int)(t)[IX(3)], (int)(t)[IX(2)], (int)(t)[IX(1)], (int)(t)[IX(0)])

/* Eight 16-bit grid indices: the low bytes q[0..7], the high bits already in place (bits 8..)
 * in hi0 (indices 0..3) and hi1 (4..7), as _pdep_u64 puts them (ggml's BMI2 trick). */
static inline TARGET_AVX512 void indices8(uint16_t ix[8], const uint8_t *q, uint64_t hi0, uint64_t hi1) {
    const uint64_t p0 = _pdep_u64(read_u32(q), 0x00ff00ff00ff00ffULL) | hi0;
    const uint64_t p1 = _pdep_u64(read_u32(q + 4), 0x00ff00ff00ff00ffULL) | hi1;
    memcpy(ix, &p0, 8);
    memcpy(ix + 4, &p1, 8);
}

/* 2 ls + 1 on 16 int16 lanes */
static inline TARGET_AVX512 __m256i odd_scales(__m256i ls) { return _mm256_add_epi16(_mm256_slli_epi16(ls, 1), _mm256_set1_epi16(1)); }

/* 16 nibbles of 8 bytes, low nibble first, as 16 int16 scales 2 ls + 1 */
static inline TARGET_AVX512 __m256i nibble_scales(const uint8_t *p) {
    const __m128i s = _mm_loadl_epi64((const __m128i *)p), m4 = _mm_set1_epi8(15);
    return odd_scales(_mm256_cvtepu8_epi16(_mm_unpacklo_epi8(_mm_and_si128(s, m4), _mm_and_si128(_mm_srli_epi16(s, 4), m4))));
}

/* 32 bytes of 7 sign bits each -> their ksigns_iq2xs bytes (bit 7: the parity of the 7) */
static inline TARGET_AVX512 __m256i with_parity(__m256i b7) {
    const __m256i par = _mm256_setr_epi8(0, -128, -128, 0, -128, 0, 0, -128, -128, 0, 0, -128, 0, -128, -128, 0, 0, -128, -128,
                                         0, -128, 0, 0, -128, -128, 0, 0, -128, 0, -128, -128, 0);
    const __m256i m4 = _mm256_set1_epi8(15);
    const __m256i p = _mm256_xor_si256(_mm256_shuffle_epi8(par, _mm256_and_si256(b7, m4)),
                                       _mm256_shuffle_epi8(par, _mm256_and_si256(_mm256_srli_epi16(b7, 4), m4)));
    return _mm256_or_si256(b7, p);
}

/* Per 32 values a uint32 of 4 x 7 sign bits | ls << 28 (IQ2_XXS, IQ3_XXS): the sign bytes of
 * the block's 256 values (byte g: values 8g..8g+7) and its 16 scales. */
static inline TARGET_AVX512 void xxs_signs_scales(__m256i aux, uint64_t neg[4], __m256i *sc16) {
    const __m256i m7 = _mm256_set1_epi32(0x7f), t = aux;
    __m256i b = _mm256_and_si256(t, m7);
    b = _mm256_or_si256(b, _mm256_and_si256(_mm256_slli_epi32(t, 1), _mm256_slli_epi32(m7, 8)));
    b = _mm256_or_si256(b, _mm256_and_si256(_mm256_slli_epi32(t, 2), _mm256_slli_epi32(m7, 16)));
    b = _mm256_or_si256(b, _mm256_and_si256(_mm256_slli_epi32(t, 3), _mm256_slli_epi32(m7, 24)));
    _mm256_storeu_si256((__m256i *)neg, with_parity(b));
    const __m256i ls = _mm256_srli_epi32(aux, 28);
    *sc16 = odd_scales(_mm256_or_si256(ls, _mm256_slli_epi32(ls, 16)));
}

/* Each format's block as four 64-value quarters: grid magnitudes g[z], sign masks neg[z]
 * (bit v: value 64z + v negative), and the 16 scales; the row dot and the tiled decoding
 * (iq_tiled_*) both read them. */
static inline TARGET_AVX512 void unpack_iq3_s(const uint8_t *blk, __m512i g[4], uint64_t neg[4], __m256i *sc16) {
    const __m128i m4 = _mm_set1_epi8(15);
    const __m128i s = _mm_cvtsi32_si128((int)read_u32(blk + 106));
    const __m128i ls = _mm_unpacklo_epi8(_mm_and_si128(s, m4), _mm_and_si128(_mm_srli_epi16(s, 4), m4));
    *sc16 = odd_scales(_mm256_cvtepu8_epi16(_mm_unpacklo_epi8(ls, ls)));
    memcpy(neg, blk + 74, 32);
    for (int z = 0; z < 4; z++) {
        const uint64_t qh = read_u16(blk + 66 + 2 * z), bit8 = 0x0100010001000100ULL;
        uint16_t ix[16];
        indices8(ix, blk + 2 + 16 * z, _pdep_u64(qh & 15, bit8), _pdep_u64((qh >> 4) & 15, bit8));
        indices8(ix + 8, blk + 10 + 16 * z, _pdep_u64((qh >> 8) & 15, bit8), _pdep_u64(qh >> 12, bit8));
#define IX(k) ix[k]
        g[z] = GRID16(iq3s_grid, IX);
#undef IX
    }
}

static inline TARGET_AVX512 void unpack_iq3_xxs(const uint8_t *blk, __m512i g[4], uint64_t neg[4], __m256i *sc16) {
    xxs_signs_scales(_mm256_loadu_si256((const __m256i *)(blk + 66)), neg, sc16);
    for (int z = 0; z < 4; z++) {
        const uint8_t *q = blk + 2 + 16 * z;
#define IX(k) q[k]
        g[z] = GRID16(iq3xxs_grid, IX);
#undef IX
    }
}

static inline TARGET_AVX512 void unpack_iq2_xxs(const uint8_t *blk, __m512i g[4], uint64_t neg[4], __m256i *sc16) {
    const __m512i v = _mm512_loadu_si512(blk + 2); /* per 32 values: uint32 indices, uint32 aux */
    xxs_signs_scales(_mm512_cvtepi64_epi32(_mm512_srli_epi64(v, 32)), neg, sc16);
    for (int z = 0; z < 4; z++) {
        const uint8_t *q = blk + 2 + 16 * z; /* the indices of groups 2z, 2z + 1: bytes 0..3, 8..11 */
#define IX(k) q[(k) + 4 * ((k) >> 2)]
        g[z] = GRID8(iq2xxs_grid, IX);
#undef IX
    }
}

static inline TARGET_AVX512 void unpack_iq2_xs(const uint8_t *blk, __m512i g[4], uint64_t neg[4], __m256i *sc16) {
    const __m512i v = _mm512_loadu_si512(blk + 2); /* uint16: 9-bit index | 7 sign bits << 9 */
    _mm256_storeu_si256((__m256i *)neg, with_parity(_mm512_cvtepi16_epi8(_mm512_srli_epi16(v, 9))));
    *sc16 = nibble_scales(blk + 66);
    for (int z = 0; z < 4; z++) {
        const uint8_t *q = blk + 2 + 16 * z;
#define IX(k) (read_u16(q + 2 * (k)) & 511)
        g[z] = GRID8(iq2xs_grid, IX);
#undef IX
    }
}

static inline TARGET_AVX512 void unpack_iq2_s(const uint8_t *blk, __m512i g[4], uint64_t neg[4], __m256i *sc16) {
    *sc16 = nibble_scales(blk + 74);
    memcpy(neg, blk + 34, 32);
    for (int z = 0; z < 4; z++) {
        const unsigned qh = read_u16(blk + 66 + 2 * z); /* 2 high index bits per 8 values */
        uint16_t ix[8];
        indices8(ix, blk + 2 + 8 * z, _pdep_u64(qh & 0xff, 0x0300030003000300ULL), _pdep_u64(qh >> 8, 0x0300030003000300ULL));
#define IX(k) ix[k]
        g[z] = GRID8(iq2s_grid, IX);
#undef IX
    }
}

#define DEFINE_DOT512(name, bytes, post)                                                                    \
    static TARGET_AVX512 float dot_##name##_avx512(const uint8_t *w, const act_row *x, int n_cols) {        \
        __m256 acc = _mm256_setzero_ps();                                                                   \
        for (int ib = 0; ib < n_cols / QK_K; ib++) {                                                        \
            const uint8_t *blk = w + (size_t)ib * (bytes);                                                  \
            const int8_t *q8 = x->qs + (size_t)ib * QK_K;                                                   \
            __m512i g[4];                                                                                   \
            uint64_t neg[4];                                                                                \
            __m256i sc16;                                                                                   \
            unpack_##name(blk, g, neg, &sc16);                                                              \
            __m512i sum = _mm512_setzero_si512();                                                           \
            for (int z = 0; z < 4; z++)                                                                     \
                sum = _mm512_add_epi32(sum, quarter_dot(g[z], neg[z], q8 + 64 * z, quarter_scales(sc16, z))); \
            acc = block_acc(sum, fp16_to_fp32(read_u16(blk)) * x->d[ib], acc);                              \
        }                                                                                                   \
        return (post) * hsum_float_8(acc);                                                                  \
    }                                                                                                       \
    /* the tiled path's view: signed values, scales, d */                                                   \
    static TARGET_AVX512 float tiled_##name##_avx512(const uint8_t *blk, int8_t *q, int16_t *sc) {          \
        __m512i g[4];                                                                                       \
        uint64_t neg[4];                                                                                    \
        __m256i sc16;                                                                                       \
        unpack_##name(blk, g, neg, &sc16);                                                                  \
        for (int z = 0; z < 4; z++)                                                                         \
            _mm512_storeu_si512(q + 64 * z, _mm512_mask_sub_epi8(g[z], (__mmask64)neg[z], _mm512_setzero_si512(), g[z])); \
        _mm256_storeu_si256((__m256i *)sc, sc16);                                                           \
        return fp16_to_fp32(read_u16(blk));                                                                 \
    }
DEFINE_DOT512(iq3_s, 110, 1.0f)
DEFINE_DOT512(iq3_xxs, 98, 0.25f)
DEFINE_DOT512(iq2_xxs, 66, 0.125f)
DEFINE_DOT512(iq2_xs, 74, 0.125f)
DEFINE_DOT512(iq2_s, 82, 0.125f)

/* IQ1: the int8 grid entries (-1, 0, 1) give the magnitudes (low bit) and the signs (top bit) */
static inline TARGET_AVX512 __m512i iq1_quarter(__m512i g, const int8_t *q8, __m512i sc) {
    return quarter_dot(_mm512_and_si512(g, _mm512_set1_epi8(1)), _mm512_movepi8_mask(g), q8, sc);
}

static TARGET_AVX512 float dot_iq1_s_avx512(const uint8_t *w, const act_row *x, int n_cols) {
    __m256 acc = _mm256_setzero_ps();
    float acc1 = 0.0f;
    for (int ib = 0; ib < n_cols / QK_K; ib++) {
        const uint8_t *blk = w + (size_t)ib * 50;
        const int8_t *q8 = x->qs + (size_t)ib * QK_K;
        const float d = fp16_to_fp32(read_u16(blk)) * x->d[ib];
        const __m256i qh = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(blk + 34))); /* per 32 values */
        const __m256i qh2 = _mm256_or_si256(qh, _mm256_slli_epi32(qh, 16));
        const __m256i sc16 = odd_scales(_mm256_and_si256(_mm256_srli_epi16(qh2, 12), _mm256_set1_epi16(7)));
        __m512i sum = _mm512_setzero_si512();
        for (int z = 0; z < 4; z++) {
            const unsigned h0 = read_u16(blk + 34 + 4 * z), h1 = read_u16(blk + 36 + 4 * z);
            uint16_t ix[8];
            indices8(ix, blk + 2 + 8 * z, _pdep_u64(h0 & 0xfff, 0x0700070007000700ULL), _pdep_u64(h1 & 0xfff, 0x0700070007000700ULL));
#define IX(k) ix[k]
            const __m512i g = GRID8(iq1s_grid, IX);
#undef IX
            sum = _mm512_add_epi32(sum, iq1_quarter(g, q8 + 64 * z, quarter_scales(sc16, z)));
        }
        acc = block_acc(sum, d, acc);
        /* the shifts: per 32 values +-(2 ls + 1) times its two bsums */
        const __m256i coef = _mm256_mask_sub_epi16(sc16, _mm256_movepi16_mask(qh2), _mm256_setzero_si256(), sc16);
        const __m256i s = _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)(x->bsums + (size_t)ib * 16)), coef);
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
        s4 = _mm_add_epi32(s4, _mm_unpackhi_epi64(s4, s4));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 1));
        acc1 = fmaf(d, (float)_mm_cvtsi128_si32(s4), acc1);
    }
    return hsum_float_8(acc) + 0.125f * acc1;
}

static TARGET_AVX512 float dot_iq1_m_avx512(const uint8_t *w, const act_row *x, int n_cols) {
    const __m256i pick4 = _mm256_setr_epi16(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    const __m256i shift3 = _mm256_setr_epi16(0, 3, 6, 9, 0, 3, 6, 9, 0, 3, 6, 9, 0, 3, 6, 9);
    const __m512i ones = _mm512_set1_epi8(1);
    __m256 acc = _mm256_setzero_ps(), acc2 = _mm256_setzero_ps();
    for (int ib = 0; ib < n_cols / QK_K; ib++) {
        const uint8_t *blk = w + (size_t)ib * 56;
        const int8_t *q8 = x->qs + (size_t)ib * QK_K;
        uint16_t sw[4];
        memcpy(sw, blk + 48, 8);
        const float d = fp16_to_fp32((uint16_t)((sw[0] >> 12) | ((sw[1] >> 8) & 0x00f0) | ((sw[2] >> 4) & 0x0f00) |
                                                (sw[3] & 0xf000))) * x->d[ib];
        const __m256i sc16 = odd_scales(_mm256_and_si256(
            _mm256_srlv_epi16(_mm256_permutexvar_epi16(pick4, _mm256_castsi128_si256(_mm_loadl_epi64((const __m128i *)(blk + 48)))),
                              shift3), _mm256_set1_epi16(7)));
        __m512i sum = _mm512_setzero_si512(), sum2 = _mm512_setzero_si512();
        for (int z = 0; z < 4; z++) {
            const uint8_t *q = blk + 8 * z;
            const uint32_t h = read_u32(blk + 32 + 4 * z); /* 8 nibbles */
            uint16_t ix[8];
            indices8(ix, q, _pdep_u64(h & 0x7777, 0x0f000f000f000f00ULL), _pdep_u64((h >> 16) & 0x7777, 0x0f000f000f000f00ULL));
#define IX(k) ix[k]
            const __m512i g = GRID8(iq1s_grid, IX);
#undef IX
            const __m512i sc = quarter_scales(sc16, z);
            sum = _mm512_add_epi32(sum, iq1_quarter(g, q8 + 64 * z, sc));
            /* the shifts' signs (bit 3 of each nibble) spread over their 8 values each */
            const __mmask64 m = _pdep_u64(_pext_u32(h, 0x88888888u), 0x0101010101010101ULL) * 0xff;
            sum2 = _mm512_add_epi32(sum2, quarter_dot(ones, m, q8 + 64 * z, sc));
        }
        acc = block_acc(sum, d, acc);
        acc2 = block_acc(sum2, d, acc2);
    }
    return hsum_float_8(acc) + 0.125f * hsum_float_8(acc2);
}

/* IQ1 for the tiled path: 8 * grid + shift (+-1: per 32 values for IQ1_S, per 8 for IQ1_M) */
static inline TARGET_AVX512 __m512i iq1_tiled_values(__m512i g, __mmask64 shift_neg) {
    const __m512i g8 = _mm512_slli_epi16(g, 3); /* the low byte of each pair is right; fix the high ones */
    const __m512i g8b = _mm512_mask_blend_epi8(0xAAAAAAAAAAAAAAAAULL, g8, _mm512_slli_epi16(_mm512_srai_epi16(g, 8), 11));
    return _mm512_add_epi8(g8b, _mm512_mask_blend_epi8(shift_neg, _mm512_set1_epi8(1), _mm512_set1_epi8(-1)));
}

static TARGET_AVX512 float tiled_iq1_s_avx512(const uint8_t *blk, int8_t *out, int16_t *sc) {
    const __m256i qh = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(blk + 34)));
    const __m256i qh2 = _mm256_or_si256(qh, _mm256_slli_epi32(qh, 16));
    _mm256_storeu_si256((__m256i *)sc, odd_scales(_mm256_and_si256(_mm256_srli_epi16(qh2, 12), _mm256_set1_epi16(7))));
    for (int z = 0; z < 4; z++) {
        const unsigned h0 = read_u16(blk + 34 + 4 * z), h1 = read_u16(blk + 36 + 4 * z);
        uint16_t ix[8];
        indices8(ix, blk + 2 + 8 * z, _pdep_u64(h0 & 0xfff, 0x0700070007000700ULL), _pdep_u64(h1 & 0xfff, 0x0700070007000700ULL));
#define IX(k) ix[k]
        const __m512i g = GRID8(iq1s_grid, IX);
#undef IX
        const uint64_t m = (h0 & 0x8000 ? 0xffffffffULL : 0) | (h1 & 0x8000 ? 0xffffffff00000000ULL : 0);
        _mm512_storeu_si512(out + 64 * z, iq1_tiled_values(g, m));
    }
    return fp16_to_fp32(read_u16(blk));
}

static TARGET_AVX512 float tiled_iq1_m_avx512(const uint8_t *blk, int8_t *out, int16_t *sc) {
    uint16_t sw[4];
    memcpy(sw, blk + 48, 8);
    for (int s = 0; s < 16; s++) sc[s] = (int16_t)(2 * ((sw[s / 4] >> (3 * (s % 4))) & 7) + 1);
    for (int z = 0; z < 4; z++) {
        const uint32_t h = read_u32(blk + 32 + 4 * z); /* 8 nibbles */
        uint16_t ix[8];
        indices8(ix, blk + 8 * z, _pdep_u64(h & 0x7777, 0x0f000f000f000f00ULL), _pdep_u64((h >> 16) & 0x7777, 0x0f000f000f000f00ULL));
#define IX(k) ix[k]
        const __m512i g = GRID8(iq1s_grid, IX);
#undef IX
        const uint64_t m = _pdep_u64(_pext_u32(h, 0x88888888u), 0x0101010101010101ULL) * 0xff;
        _mm512_storeu_si512(out + 64 * z, iq1_tiled_values(g, m));
    }
    return fp16_to_fp32((uint16_t)((sw[0] >> 12) | ((sw[1] >> 8) & 0x00f0) | ((sw[2] >> 4) & 0x0f00) | (sw[3] & 0xf000)));
}
#define AVX512(fn) fn
#else
#define AVX512(fn) NULL
#endif

/* One portable and one AVX2 row dot per format, and its table for module.c. */
#ifdef OFFLOAD_X86
#define DEFINE_IQ(NAME, name, bytes)                                                                                    \
    static float dot_##name##_portable(const uint8_t *w, const act_row *x, int n) { return dot_iq_portable(&NAME, w, x, n); } \
    const format_kernels KERNELS_##NAME = {#NAME, ACT_Q8_K, QK_K, bytes, dot_##name##_portable, dot_##name##_avx2, dot_##name##_avx512, NULL};
#else
#define DEFINE_IQ(NAME, name, bytes)                                                                                    \
    static float dot_##name##_portable(const uint8_t *w, const act_row *x, int n) { return dot_iq_portable(&NAME, w, x, n); } \
    const format_kernels KERNELS_##NAME = {#NAME, ACT_Q8_K, QK_K, bytes, dot_##name##_portable, NULL, NULL, NULL};
#endif

DEFINE_IQ(IQ2_XXS, iq2_xxs, 66)
DEFINE_IQ(IQ2_XS, iq2_xs, 74)
DEFINE_IQ(IQ2_S, iq2_s, 82)
DEFINE_IQ(IQ3_XXS, iq3_xxs, 98)
DEFINE_IQ(IQ3_S, iq3_s, 110)
DEFINE_IQ(IQ1_S, iq1_s, 50)
DEFINE_IQ(IQ1_M, iq1_m, 56)

/* -- ggml's tiled GEMM (8+ tokens, tiled.c) ------------------------------------------------
 * It reads a block as exact signed values, grid * sign (IQ1: 8 * grid + shift, the shift's
 * 1/8 folded into d), a scale 2 ls + 1 per 16 values and d times 1/8 (IQ2, IQ1), 1/4
 * (IQ3_XXS) or 1 (IQ3_S): no -128 rule there. */
static void tiled_view(const iq_format *f, float scale, const uint8_t *blk, int8_t q[QK_K], int16_t sc[16], float *d) {
    iq_block b;
    f->decode(blk, &b);
    for (int e = 0; e < QK_K; e++)
        q[e] = (int8_t)(f->kind == IQ_PLAIN ? b.sgn[e] * b.mag[e] : 8 * b.sgn[e] * b.mag[e] + b.shift[e]);
    memcpy(sc, b.sc, sizeof(b.sc));
    *d = b.d * scale;
}

#ifdef OFFLOAD_X86
/* the AVX-512 unpacking where the CPU has it (the same values: tests/test_tiled.py) */
static int tiled_avx512;
__attribute__((constructor)) static void init_tiled_avx512(void) {
    tiled_avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                   __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
}
#define DEFINE_TILED(NAME, name, scale)                                                   \
    void iq_tiled_##name(const uint8_t *blk, int8_t *q, int16_t *sc, float *d) {          \
        if (tiled_avx512)                                                                 \
            *d = tiled_##name##_avx512(blk, q, sc) * (scale);                             \
        else                                                                              \
            tiled_view(&NAME, scale, blk, q, sc, d);                                      \
    }
#else
#define DEFINE_TILED(NAME, name, scale) \
    void iq_tiled_##name(const uint8_t *blk, int8_t *q, int16_t *sc, float *d) { tiled_view(&NAME, scale, blk, q, sc, d); }
#endif
IQ_GRID_TILED(DEFINE_TILED)
