/* offload._cext: quantized matmuls over GGUF rows in place, GIL released, OpenMP over rows.
 *
 *   matmul(fmt, w, xq, xd, bsums, out, n_rows, n_cols, n_tokens)
 *       out[t, r] = dot(row r of w, activations of token t); every buffer C-contiguous,
 *       out preallocated float32 (n_tokens, n_rows); bsums None unless fmt dots with Q8_K
 *       (Q8_1: bsums is s, float32 (n_tokens, n_cols/32)).
 *   matmul_tiled(fmt, w, xq, xd, bsums, out, n_rows, n_cols, n_tokens)
 *       the same for Q2_K..Q6_K (and IQ4_XS) in the order of ggml's tiled GEMM (8+ tokens, see tiled.c)
 *   matmul_x(x, n_tokens, n_cols, specs)
 *       x float32 (n_tokens, n_cols), specs a tuple of (fmt, w, out, n_rows): quantizes x once
 *       per activation type (as ggml converts it) and runs each matmul (the row-dot kernels,
 *       not the tiled ones): one call per group of matrices sharing an input (Q/K/V, gate/up)
 *   moe_ffn(x, out, shared_out, workspace, n_embd, n_routed, jobs, weights)
 *       one token through a MoE layer's experts in one parallel region (moe.c); jobs a tuple
 *       of (gate fmt, gate address, up fmt, up address, down fmt, down address, n_ff), the
 *       n_routed routed experts first (scaled by float32 weights, summed into out), then shared
 *       experts (each into its n_embd row of shared_out); addresses of weight rows the caller
 *       keeps alive
 *   moe_workspace_bytes(n_embd, (n_ff, ...))   the workspace moe_ffn needs for those jobs
 *   attention_token(dims, n_ctx, mats, x, scratch, norm, bq, bk, bv, q_norm, k_norm, cos, sin, k_cache, v_cache)
 *       a decoding token's attention block (layer.c): x += wo . attention(...) of rms_norm(x);
 *       dims (n_embd, n_head, n_head_kv, head_dim, rope_dim, neox, qk_norm 0/1/2, pos, eps),
 *       mats ((fmt, address, n_rows) of wq, wk, wv, wo); biases and q/k norms None when absent
 *   moe_batch(x, per_slot, weights, n_tokens, n_embd, k, jobs, counts, pairs)
 *       a micro-batch's experts in one call (moe.c): job j (as moe_ffn's) runs on the counts[j]
 *       (token, slot) int32 pairs after the previous jobs' and writes weight * output into
 *       per_slot (n_tokens, k, n_embd)
 *   quantize(kind, x, qs, d, bsums, n_tokens, n_cols)
 *       the activation conversion alone ("Q8_0": bsums None, "Q8_K", or "Q8_1": bsums is s), for tests
 *   swiglu_oai(g, u, out, n_rows, n) / sigmoid(x, out, n_rows, n)
 *       gpt-oss's clamped SwiGLU, routers' sigmoid (ops.c)
 *   silu_mul(x, g, out, n_rows, n)
 *       SwiGLU as ggml computes it (swiglu.c); out may be x
 *   attention(q, k, v, out, n, start, n_head, n_head_kv, head_dim, n_cells, window[, sinks, v_dim, v_stride, scale,
 *             k_f16, v_f16, cell_pos, n_used])
 *       causal GQA of n new queries over one layer's F32 cache of n_cells rows, a sliding
 *       window and sink logits optional, values narrower than keys (MLA: v is k) and a
 *       scale other than 1/sqrt(head_dim) too (see attention.c)
 *   formats() -> {name: (vec_dot_type, [isa, ...])}
 *   isa() / set_isa(name)   the SIMD level in use ("avx512", "avx2" or "portable")
 *   set_num_threads(n)
 *   matmul_float(fmt, w, x, out, n_rows, n_cols, n_tokens, order)
 *       F32/F16/BF16 weights (floats.c) in one of ggml's float orders (0 GEMM8, 1 VECDOT,
 *       2 VECDOT_BF16), x float32 already rounded to the weight type
 *   rms_norm(x, w, eps, out, n_rows, n) / softmax(x, out, n_rows, n) / expf(x, out, n) /
 *   silu(x, out, n_rows, n) / rope(x, cos, sin, n_tokens, n_heads, head_dim, rope_dim, neox) /
 *   top_k(probs, n_rows, n, k, normalize, chosen, weights) /
 *   lookahead(x, n, w, n_targets, e, eps, k, m, ratio, experts, counts, conf)
 *       the step's small ops in ggml's order (ops.c), twins of the Numba ones
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <omp.h>
#include <stdlib.h>

#include "attention.h"
#include "flash.h"
#include "floats.h"
#include "kernels.h"
#include "layer.h"
#include "moe.h"
#include "ops.h"
#include "quantize.h"
#include "step.h"
#include "swiglu.h"
#include "tiled.h"

/* Format tables are defined in their own files; weak, so a format whose file is absent
 * from a build is simply not offered. */
/* the grid I-quants (iq_grid.c) */
#define IQ_GRID_FORMATS(X) X(IQ2_XXS) X(IQ2_XS) X(IQ2_S) X(IQ3_XXS) X(IQ3_S) X(IQ1_S) X(IQ1_M)
#define FORMATS(X) X(Q8_0) X(Q4_0) X(Q4_1) X(Q5_0) X(Q5_1) X(Q2_K) X(Q3_K) X(Q4_K) X(Q5_K) X(Q6_K) X(MXFP4) \
    X(IQ4_NL) X(IQ4_XS) X(TQ1_0) X(TQ2_0) IQ_GRID_FORMATS(X)
#define DECLARE(name) extern const format_kernels KERNELS_##name __attribute__((weak));
FORMATS(DECLARE)
#define ENTRY(name) &KERNELS_##name,
static const format_kernels *const all_formats[] = {FORMATS(ENTRY)};
#define N_FORMATS ((int)(sizeof(all_formats) / sizeof(all_formats[0])))
/* Another summation order of a format, run by name but not listed by formats(): IQ4_NL's
 * llamafile sgemm order (a plain matmul of 2+ tokens, see iq4.c). */
#define VARIANTS(X) X(IQ4_NL_SGEMM)
VARIANTS(DECLARE)
static const format_kernels *const all_variants[] = {VARIANTS(ENTRY)};

enum isa_level { ISA_PORTABLE = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };
static const char *const isa_names[] = {"portable", "avx2", "avx512"};
static int best_isa = ISA_PORTABLE; /* what this CPU supports */
static int isa = ISA_PORTABLE;      /* what we use (tests may lower it) */

static void detect_isa(void) {
#ifdef OFFLOAD_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
        best_isa = ISA_AVX2;
        if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
            __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni"))
            best_isa = ISA_AVX512;
    }
#endif
    isa = best_isa;
}

/* The kernel for `f` at the chosen level, falling back level by level. */
static row_dot_fn pick(const format_kernels *f) {
    if (isa >= ISA_AVX512 && f->avx512) return f->avx512;
    if (isa >= ISA_AVX2 && f->avx2) return f->avx2;
    return f->portable;
}

static const format_kernels *find_format(const char *name) {
    for (int i = 0; i < N_FORMATS; i++)
        if (all_formats[i] && strcmp(all_formats[i]->name, name) == 0) return all_formats[i];
    for (size_t i = 0; i < sizeof(all_variants) / sizeof(all_variants[0]); i++)
        if (all_variants[i] && strcmp(all_variants[i]->name, name) == 0) return all_variants[i];
    return NULL;
}

static size_t row_bytes_of(const format_kernels *f, int n_cols) {
    return (size_t)(n_cols / f->block_size) * (size_t)f->block_bytes;
}

/* Below this many weight bytes x tokens a matmul runs on the calling thread: waking the
 * OpenMP team costs more than the work (tiny matrices, e.g. small experts). */
#define PARALLEL_BYTES (128 * 1024)

void run_matmul(row_dot_fn dot, const format_kernels *f, const uint8_t *w, const int8_t *xq, const float *xd,
                const int16_t *bsums, float *out, ptrdiff_t n_rows, int n_cols, ptrdiff_t n_tokens) {
    const size_t row_bytes = (size_t)(n_cols / f->block_size) * f->block_bytes;
    const Py_ssize_t d_per_token = n_cols / act_block(f->act), bsums_per_token = n_cols / 16; /* Q8_1's s too */
    if (f->avx2_tokens && dot == f->avx2 && n_tokens >= (f->tokens_min ? f->tokens_min : ROW_TOKENS_MIN)) {
        /* the row decoded once for all the tokens; same bits as the row dot */
#pragma omp parallel for schedule(static) if ((size_t)n_rows * row_bytes * (size_t)n_tokens >= PARALLEL_BYTES)
        for (Py_ssize_t r = 0; r < n_rows; r++)
            f->avx2_tokens(w + (size_t)r * row_bytes, xq, xd, bsums, n_cols, n_tokens, out + r, n_rows);
        return;
    }
    /* rows outside, tokens inside: a row's blocks stay in L1 across the tokens of a batch */
#pragma omp parallel for schedule(static) if ((size_t)n_rows * row_bytes * (size_t)n_tokens >= PARALLEL_BYTES)
    for (Py_ssize_t r = 0; r < n_rows; r++) {
        const uint8_t *wr = w + (size_t)r * row_bytes;
        for (Py_ssize_t t = 0; t < n_tokens; t++) {
            act_row x = {xq + t * n_cols, xd + t * d_per_token, {bsums ? bsums + t * bsums_per_token : NULL}};
            out[t * n_rows + r] = dot(wr, &x, n_cols);
        }
    }
}

static PyObject *py_matmul(PyObject *self, PyObject *args) {
    const char *name;
    Py_buffer w = {0}, xq = {0}, xd = {0}, bs = {0}, out = {0};
    PyObject *bsums_obj;
    Py_ssize_t n_rows, n_cols, n_tokens;
    if (!PyArg_ParseTuple(args, "sy*y*y*Ow*nnn", &name, &w, &xq, &xd, &bsums_obj, &out, &n_rows, &n_cols,
                          &n_tokens))
        return NULL;
    PyObject *result = NULL;
    const format_kernels *f = find_format(name);
    if (!f) {
        PyErr_Format(PyExc_ValueError, "no C kernel for %s", name);
        goto done;
    }
    if (bsums_obj != Py_None && PyObject_GetBuffer(bsums_obj, &bs, PyBUF_SIMPLE) < 0) goto done;
    if (n_rows < 0 || n_tokens < 0 || n_cols <= 0 || n_cols % f->block_size || n_cols % act_block(f->act) ||
        n_cols > INT32_MAX) {
        PyErr_Format(PyExc_ValueError, "%s matmul: bad shape rows=%zd cols=%zd tokens=%zd", name, n_rows, n_cols, n_tokens);
        goto done;
    }
    const Py_ssize_t row_bytes = n_cols / f->block_size * f->block_bytes;
    if (w.len < n_rows * row_bytes || xq.len < n_tokens * n_cols ||
        xd.len < n_tokens * (n_cols / act_block(f->act)) * (Py_ssize_t)sizeof(float) ||
        out.len < n_rows * n_tokens * (Py_ssize_t)sizeof(float) ||
        (f->act != ACT_Q8_0 && (bsums_obj == Py_None || bs.len < n_tokens * (n_cols / 16) * 2))) { /* Q8_1: s */
        PyErr_Format(PyExc_ValueError, "%s matmul: a buffer is smaller than its shape says", name);
        goto done;
    }
    row_dot_fn dot = pick(f);
    Py_BEGIN_ALLOW_THREADS
    run_matmul(dot, f, w.buf, xq.buf, xd.buf, bsums_obj != Py_None ? bs.buf : NULL, out.buf, n_rows, (int)n_cols,
               n_tokens);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&w);
    PyBuffer_Release(&xq);
    PyBuffer_Release(&xd);
    if (bs.obj) PyBuffer_Release(&bs);
    PyBuffer_Release(&out);
    return result;
}

/* Quantize n_tokens rows of x for activation type `act` into the given buffers. */
static void quantize_rows(int act, const float *x, int8_t *qs, float *d, int16_t *bsums, Py_ssize_t n_tokens,
                          int n_cols) {
    for (Py_ssize_t t = 0; t < n_tokens; t++)
        quantize_row_kind(act, x + t * n_cols, qs + t * n_cols, d + t * (n_cols / act_block(act)),
                          bsums ? bsums + t * (n_cols / 16) : NULL, n_cols); /* Q8_1's s in bsums' bytes */
}

static PyObject *py_quantize(PyObject *self, PyObject *args) {
    const char *kind;
    Py_buffer x = {0}, qs = {0}, d = {0}, bs = {0};
    PyObject *bsums_obj;
    Py_ssize_t n_tokens, n_cols;
    if (!PyArg_ParseTuple(args, "sy*w*w*Onn", &kind, &x, &qs, &d, &bsums_obj, &n_tokens, &n_cols)) return NULL;
    PyObject *result = NULL;
    int act = -1;
    for (int k = 0; k < ACT_KINDS; k++)
        if (strcmp(kind, act_names[k]) == 0) act = k;
    const Py_ssize_t block = act == ACT_Q8_K ? 256 : 32;
    if (act < 0 || n_tokens < 0 || n_cols <= 0 || n_cols % block || n_cols > INT32_MAX) {
        PyErr_Format(PyExc_ValueError, "quantize %s: bad kind or shape (%zd, %zd)", kind, n_tokens, n_cols);
        goto done;
    }
    if (act != ACT_Q8_0 && (bsums_obj == Py_None || PyObject_GetBuffer(bsums_obj, &bs, PyBUF_WRITABLE) < 0)) {
        if (!PyErr_Occurred()) PyErr_Format(PyExc_ValueError, "quantize %s needs a bsums (Q8_1: s) buffer", kind);
        goto done;
    }
    if (x.len < n_tokens * n_cols * 4 || qs.len < n_tokens * n_cols || d.len < n_tokens * (n_cols / block) * 4 ||
        (act != ACT_Q8_0 && bs.len < n_tokens * (n_cols / 16) * 2)) {
        PyErr_Format(PyExc_ValueError, "quantize %s: a buffer is smaller than its shape says", kind);
        goto done;
    }
    quantize_rows(act, x.buf, qs.buf, d.buf, bs.obj ? bs.buf : NULL, n_tokens, (int)n_cols);
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&x);
    PyBuffer_Release(&qs);
    PyBuffer_Release(&d);
    if (bs.obj) PyBuffer_Release(&bs);
    return result;
}

#define MATMUL_X_MAX 8          /* matrices sharing one input in one call (Q, K, V; gate, up) */
#define MATMUL_X_STACK 16384    /* activation values quantized on the stack; more go to the heap */

/* One token batch's activations in each quantized form the call needs. */
typedef struct {
    int8_t *qs[ACT_KINDS];
    float *d[ACT_KINDS];
    int16_t *sums[ACT_KINDS]; /* Q8_K's block sums, Q8_1's s (the same bytes) */
} act_buffers;

/* matmul_heads(x, n_heads, n_cols, fmt, w, out, n_rows): one token's per-head matmuls in one
 * call (MLA's k_b and v_b): head h's rows w[h] (n_rows, n_cols of fmt, the heads one after
 * another) dotted with x[h] (float32, converted per head as matmul_x converts a token) into
 * out[h] (n_rows floats): what n_heads matmul_x calls of one token each give, bit for bit. */
static PyObject *py_matmul_heads(PyObject *self, PyObject *args) {
    Py_buffer x = {0}, w = {0}, out = {0};
    Py_ssize_t n_heads, n_cols, n_rows;
    const char *name;
    if (!PyArg_ParseTuple(args, "y*nnsy*w*n", &x, &n_heads, &n_cols, &name, &w, &out, &n_rows)) return NULL;
    PyObject *result = NULL;
    void *heap = NULL;
    const format_kernels *f = find_format(name);
    if (!f) {
        PyErr_Format(PyExc_ValueError, "no C kernel for %s", name);
        goto done;
    }
    const Py_ssize_t row_bytes = n_cols / f->block_size * f->block_bytes;
    if (n_heads < 1 || n_rows < 1 || n_cols <= 0 || n_cols % 32 || n_cols % f->block_size ||
        (f->act == ACT_Q8_K && n_cols % 256) || n_cols > INT32_MAX || x.len < n_heads * n_cols * 4 ||
        w.len < n_heads * n_rows * row_bytes || out.len < n_heads * n_rows * (Py_ssize_t)sizeof(float)) {
        PyErr_Format(PyExc_ValueError, "%s matmul_heads: a buffer or shape does not fit", name);
        goto done;
    }
    /* scales (n_vals/32 floats at most: Q8_K's head h at h * n_cols/256), block sums or s
     * (n_vals/16 int16), int8 values: on the stack up to MATMUL_X_STACK values, as matmul_x */
    const Py_ssize_t n_vals = n_heads * n_cols;
    const size_t bytes = (size_t)(n_vals / 32) * sizeof(float) + (size_t)(n_vals / 16) * sizeof(int16_t) + (size_t)n_vals;
    _Alignas(64) uint8_t stack[MATMUL_X_STACK / 32 * 4 + MATMUL_X_STACK / 16 * 2 + MATMUL_X_STACK];
    void *buffer = stack;
    if (bytes > sizeof(stack)) {
        buffer = heap = malloc(bytes);
        if (!heap) {
            PyErr_NoMemory();
            goto done;
        }
    }
    float *d = buffer;
    int16_t *sums = (int16_t *)(d + n_vals / 32);
    int8_t *qs = (int8_t *)(sums + n_vals / 16);
    const int kind = f->act;
    Py_BEGIN_ALLOW_THREADS
    quantize_rows(kind, x.buf, qs, d, sums, n_heads, (int)n_cols);
    for (Py_ssize_t h = 0; h < n_heads; h++)
        run_matmul(pick(f), f, (const uint8_t *)w.buf + h * n_rows * row_bytes, qs + h * n_cols,
                   d + h * (n_cols / act_block(kind)),
                   kind != ACT_Q8_0 ? sums + h * (n_cols / 16) : NULL, (float *)out.buf + h * n_rows, n_rows,
                   (int)n_cols, 1);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    free(heap);
    PyBuffer_Release(&x);
    PyBuffer_Release(&w);
    PyBuffer_Release(&out);
    return result;
}

static PyObject *py_matmul_x(PyObject *self, PyObject *args) {
    Py_buffer x = {0};
    Py_ssize_t n_tokens, n_cols;
    PyObject *specs;
    if (!PyArg_ParseTuple(args, "y*nnO!", &x, &n_tokens, &n_cols, &PyTuple_Type, &specs)) return NULL;
    const Py_ssize_t n_mats = PyTuple_GET_SIZE(specs);
    const format_kernels *f[MATMUL_X_MAX];
    Py_buffer w[MATMUL_X_MAX] = {{0}}, out[MATMUL_X_MAX] = {{0}};
    Py_ssize_t n_rows[MATMUL_X_MAX];
    Py_ssize_t got = 0;
    PyObject *result = NULL;
    void *heap = NULL;
    int need[ACT_KINDS] = {0};
    if (n_mats < 1 || n_mats > MATMUL_X_MAX || n_tokens < 0 || n_cols <= 0 || n_cols % 32 || n_cols > INT32_MAX ||
        x.len < n_tokens * n_cols * 4) {
        PyErr_Format(PyExc_ValueError, "matmul_x: bad call (%zd matrices, tokens=%zd, cols=%zd)", n_mats, n_tokens,
                     n_cols);
        goto done;
    }
    for (; got < n_mats; got++) {
        const char *name;
        if (!PyArg_ParseTuple(PyTuple_GET_ITEM(specs, got), "sy*w*n", &name, &w[got], &out[got], &n_rows[got]))
            goto done;
        f[got] = find_format(name);
        if (!f[got]) {
            PyErr_Format(PyExc_ValueError, "no C kernel for %s", name);
            got++;
            goto done;
        }
        const Py_ssize_t row_bytes = n_cols / f[got]->block_size * f[got]->block_bytes;
        if (n_rows[got] < 0 || n_cols % f[got]->block_size || (f[got]->act == ACT_Q8_K && n_cols % 256) ||
            w[got].len < n_rows[got] * row_bytes || out[got].len < n_rows[got] * n_tokens * (Py_ssize_t)sizeof(float)) {
            PyErr_Format(PyExc_ValueError, "%s matmul_x: a buffer or shape does not fit (rows=%zd cols=%zd tokens=%zd)",
                         name, n_rows[got], n_cols, n_tokens);
            got++;
            goto done;
        }
        need[f[got]->act] = 1;
    }
    /* per needed kind: scales (n_vals/32 floats at most), block sums or s (n_vals/16 int16),
     * int8 values; on the stack for up to two kinds of MATMUL_X_STACK values */
    const Py_ssize_t n_vals = n_tokens * n_cols;
    const size_t kind_bytes = (size_t)(n_vals / 32) * sizeof(float) + (size_t)(n_vals / 16) * sizeof(int16_t) + (size_t)n_vals;
    int n_kinds = 0;
    for (int kind = 0; kind < ACT_KINDS; kind++) n_kinds += need[kind];
    _Alignas(64) uint8_t stack[2 * (MATMUL_X_STACK / 32 * 4 + MATMUL_X_STACK / 16 * 2 + MATMUL_X_STACK)];
    uint8_t *p = (uint8_t *)stack;
    if (n_kinds * kind_bytes > sizeof(stack)) {
        p = heap = malloc(n_kinds * kind_bytes);
        if (!heap) {
            PyErr_NoMemory();
            goto done;
        }
    }
    act_buffers a = {{0}};
    for (int kind = 0; kind < ACT_KINDS; kind++) {
        if (!need[kind]) continue;
        a.d[kind] = (float *)p;
        a.sums[kind] = (int16_t *)(a.d[kind] + n_vals / 32);
        a.qs[kind] = (int8_t *)(a.sums[kind] + n_vals / 16);
        p += kind_bytes;
    }
    Py_BEGIN_ALLOW_THREADS
    for (int kind = 0; kind < ACT_KINDS; kind++)
        if (need[kind]) quantize_rows(kind, x.buf, a.qs[kind], a.d[kind], a.sums[kind], n_tokens, (int)n_cols);
    for (Py_ssize_t i = 0; i < n_mats; i++) {
        const int kind = f[i]->act;
        run_matmul(pick(f[i]), f[i], w[i].buf, a.qs[kind], a.d[kind], kind != ACT_Q8_0 ? a.sums[kind] : NULL,
                   out[i].buf, n_rows[i], (int)n_cols, n_tokens);
    }
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    free(heap);
    for (Py_ssize_t i = 0; i < got; i++) {
        PyBuffer_Release(&w[i]);
        PyBuffer_Release(&out[i]);
    }
    PyBuffer_Release(&x);
    return result;
}


/* n_ffs: a tuple of each job's hidden size; fills jobs[].n_ff. */
static int parse_n_ffs(PyObject *n_ffs, moe_ffn_job *jobs) {
    const Py_ssize_t n = PyTuple_GET_SIZE(n_ffs);
    for (Py_ssize_t j = 0; j < n; j++) {
        const long v = PyLong_AsLong(PyTuple_GET_ITEM(n_ffs, j));
        if (v == -1 && PyErr_Occurred()) return -1;
        if (v <= 0 || v > INT32_MAX) {
            PyErr_Format(PyExc_ValueError, "moe: bad hidden size %ld", v);
            return -1;
        }
        jobs[j].n_ff = (int)v;
    }
    return 0;
}

static PyObject *py_moe_workspace_bytes(PyObject *self, PyObject *args) {
    int n_embd;
    PyObject *n_ffs;
    if (!PyArg_ParseTuple(args, "iO!", &n_embd, &PyTuple_Type, &n_ffs)) return NULL;
    moe_ffn_job jobs[MOE_MAX_JOBS];
    if (n_embd <= 0 || PyTuple_GET_SIZE(n_ffs) > MOE_MAX_JOBS)
        return PyErr_Format(PyExc_ValueError, "moe: bad width %d or too many jobs", n_embd);
    if (parse_n_ffs(n_ffs, jobs) < 0) return NULL;
    return PyLong_FromSize_t(moe_workspace_bytes(jobs, (int)PyTuple_GET_SIZE(n_ffs), n_embd));
}

/* A matrix of a job: its format must dot with activations of n_cols values. */
static int moe_matrix_of(const char *name, unsigned long long address, int n_cols, moe_matrix *m) {
    m->f = find_format(name);
    if (!m->f) {
        PyErr_Format(PyExc_ValueError, "no C kernel for %s", name);
        return -1;
    }
    if (!address || n_cols % m->f->block_size || n_cols % act_block(m->f->act)) {
        PyErr_Format(PyExc_ValueError, "moe: a %s matrix cannot take %d columns", name, n_cols);
        return -1;
    }
    m->dot = pick(m->f);
    m->w = (const uint8_t *)(uintptr_t)address;
    return 0;
}

/* A job from its spec (gate fmt, address, up fmt, address, down fmt, address, n_ff), the
 * FFN.kernel_spec tuple moe_ffn and moe_batch both take. */
static int moe_job_of(PyObject *spec, int n_embd, moe_ffn_job *job) {
    const char *fg, *fu, *fd;
    unsigned long long ag, au, ad;
    if (!PyArg_ParseTuple(spec, "sKsKsKi", &fg, &ag, &fu, &au, &fd, &ad, &job->n_ff)) return -1;
    if (job->n_ff <= 0) {
        PyErr_Format(PyExc_ValueError, "moe: bad hidden size %d", job->n_ff);
        return -1;
    }
    return moe_matrix_of(fg, ag, n_embd, &job->gate) < 0 || moe_matrix_of(fu, au, n_embd, &job->up) < 0 ||
                   moe_matrix_of(fd, ad, job->n_ff, &job->down) < 0
               ? -1
               : 0;
}

/* The first n_biased jobs' activation (act: MOE_ACT_*) and biases: `biases` None, or a tuple
 * of n_biased entries, each None or (gate, up, down) float32 vectors of n_ff, n_ff and n_embd
 * values (held in views[3 j ..] until the call ends). The other jobs (shared experts):
 * SwiGLU without biases. */
static int moe_biases_of(PyObject *biases, int act, moe_ffn_job *jobs, Py_ssize_t n_jobs, Py_ssize_t n_biased,
                         int n_embd, Py_buffer *views) {
    if (act != MOE_ACT_SWIGLU && act != MOE_ACT_SWIGLU_OAI) {
        PyErr_Format(PyExc_ValueError, "moe: unknown activation %d", act);
        return -1;
    }
    for (Py_ssize_t j = 0; j < n_jobs; j++) {
        jobs[j].act = j < n_biased ? act : MOE_ACT_SWIGLU;
        jobs[j].bg = jobs[j].bu = jobs[j].bd = NULL;
    }
    if (biases == Py_None) return 0;
    if (!PyTuple_Check(biases) || PyTuple_GET_SIZE(biases) != n_biased) {
        PyErr_Format(PyExc_ValueError, "moe: biases must be None or a tuple of %zd entries", n_biased);
        return -1;
    }
    for (Py_ssize_t j = 0; j < n_biased; j++) {
        PyObject *entry = PyTuple_GET_ITEM(biases, j);
        if (entry == Py_None) continue;
        if (!PyTuple_Check(entry) || PyTuple_GET_SIZE(entry) != 3) {
            PyErr_SetString(PyExc_ValueError, "moe: a job's biases are None or (gate, up, down)");
            return -1;
        }
        const float **dst[3] = {&jobs[j].bg, &jobs[j].bu, &jobs[j].bd};
        const Py_ssize_t n[3] = {jobs[j].n_ff, jobs[j].n_ff, n_embd};
        for (int i = 0; i < 3; i++) {
            Py_buffer *v = &views[3 * j + i];
            if (PyObject_GetBuffer(PyTuple_GET_ITEM(entry, i), v, PyBUF_SIMPLE) < 0) return -1;
            if (v->len < n[i] * (Py_ssize_t)sizeof(float)) {
                PyErr_Format(PyExc_ValueError, "moe: a bias holds %zd bytes, %zd floats expected", v->len, n[i]);
                return -1;
            }
            *dst[i] = v->buf;
        }
    }
    return 0;
}

static void release_views(Py_buffer *views, int n) {
    for (int i = 0; i < n; i++)
        if (views[i].obj) PyBuffer_Release(&views[i]);
}

static PyObject *py_moe_ffn(PyObject *self, PyObject *args) {
    Py_buffer x = {0}, out = {0}, shared = {0}, ws = {0}, wts = {0};
    PyObject *shared_obj, *job_specs, *biases = Py_None;
    int n_embd, n_routed, act = MOE_ACT_SWIGLU;
    if (!PyArg_ParseTuple(args, "y*w*Ow*iiO!y*|iO", &x, &out, &shared_obj, &ws, &n_embd, &n_routed, &PyTuple_Type,
                          &job_specs, &wts, &act, &biases))
        return NULL;
    PyObject *result = NULL;
    moe_ffn_job jobs[MOE_MAX_JOBS];
    Py_buffer bias_views[3 * MOE_MAX_JOBS];
    memset(bias_views, 0, sizeof(bias_views));
    const Py_ssize_t n_jobs = PyTuple_GET_SIZE(job_specs);
    if (n_embd <= 0 || n_jobs > MOE_MAX_JOBS || n_routed < 0 || n_routed > n_jobs ||
        wts.len < n_routed * (Py_ssize_t)sizeof(float)) {
        PyErr_Format(PyExc_ValueError, "moe_ffn: bad call (width %d, %zd jobs, %d routed)", n_embd, n_jobs, n_routed);
        goto done;
    }
    size_t weight_bytes = 0;
    for (Py_ssize_t j = 0; j < n_jobs; j++) {
        moe_ffn_job *job = &jobs[j];
        if (moe_job_of(PyTuple_GET_ITEM(job_specs, j), n_embd, job) < 0) goto done;
        job->weight = j < n_routed ? ((const float *)wts.buf)[j] : 0.0f;
        weight_bytes += (size_t)job->n_ff * (row_bytes_of(job->gate.f, n_embd) + row_bytes_of(job->up.f, n_embd)) +
                        (size_t)n_embd * row_bytes_of(job->down.f, job->n_ff);
    }
    if (moe_biases_of(biases, act, jobs, n_jobs, n_routed, n_embd, bias_views) < 0) goto done;
    if (shared_obj != Py_None && PyObject_GetBuffer(shared_obj, &shared, PyBUF_WRITABLE) < 0) goto done;
    const Py_ssize_t row = (Py_ssize_t)n_embd * (Py_ssize_t)sizeof(float);
    if (x.len < row || out.len < row || (n_jobs > n_routed && shared.len < (n_jobs - n_routed) * row) ||
        (size_t)ws.len < moe_workspace_bytes(jobs, (int)n_jobs, n_embd)) {
        PyErr_SetString(PyExc_ValueError, "moe_ffn: a buffer is smaller than its shape says");
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    moe_ffn_run(x.buf, n_embd, jobs, (int)n_jobs, n_routed, out.buf, shared.obj ? shared.buf : NULL, ws.buf,
                isa >= ISA_AVX2, weight_bytes >= PARALLEL_BYTES);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&x);
    PyBuffer_Release(&out);
    if (shared.obj) PyBuffer_Release(&shared);
    PyBuffer_Release(&ws);
    PyBuffer_Release(&wts);
    release_views(bias_views, 3 * MOE_MAX_JOBS);
    return result;
}

static PyObject *py_moe_batch(PyObject *self, PyObject *args) {
    Py_buffer x = {0}, per_slot = {0}, wts = {0}, counts = {0}, pairs = {0};
    PyObject *job_specs, *biases = Py_None;
    int n_tokens, n_embd, k, act = MOE_ACT_SWIGLU;
    if (!PyArg_ParseTuple(args, "y*w*y*iiiO!y*y*|iO", &x, &per_slot, &wts, &n_tokens, &n_embd, &k, &PyTuple_Type,
                          &job_specs, &counts, &pairs, &act, &biases))
        return NULL;
    PyObject *result = NULL;
    moe_ffn_job jobs[MOE_MAX_JOBS];
    Py_buffer bias_views[3 * MOE_MAX_JOBS];
    memset(bias_views, 0, sizeof(bias_views));
    const Py_ssize_t n_jobs = PyTuple_GET_SIZE(job_specs);
    const int32_t *cnt = counts.buf, *pr = pairs.buf;
    const size_t nk = (size_t)n_tokens * (size_t)k;
    if (n_tokens < 0 || n_embd <= 0 || k <= 0 || n_jobs > MOE_MAX_JOBS || counts.len < n_jobs * 4 ||
        (size_t)x.len < (size_t)n_tokens * n_embd * 4 || (size_t)per_slot.len < nk * n_embd * 4 ||
        (size_t)wts.len < nk * 4) {
        PyErr_Format(PyExc_ValueError, "moe_batch: bad call (%d tokens, width %d, k %d, %zd jobs)", n_tokens, n_embd, k,
                     n_jobs);
        goto done;
    }
    Py_ssize_t n_pairs = 0;
    for (Py_ssize_t j = 0; j < n_jobs; j++) {
        if (cnt[j] < 0) break;
        n_pairs += cnt[j];
    }
    if (pairs.len < n_pairs * 8) {
        PyErr_SetString(PyExc_ValueError, "moe_batch: fewer (token, slot) pairs than the counts say");
        goto done;
    }
    for (Py_ssize_t i = 0; i < n_pairs; i++)
        if (pr[2 * i] < 0 || pr[2 * i] >= n_tokens || pr[2 * i + 1] < 0 || pr[2 * i + 1] >= k) {
            PyErr_Format(PyExc_ValueError, "moe_batch: pair %zd (%d, %d) is outside %d tokens x %d slots", i, pr[2 * i],
                         pr[2 * i + 1], n_tokens, k);
            goto done;
        }
    for (Py_ssize_t j = 0; j < n_jobs; j++) {
        if (cnt[j] < 0) {
            PyErr_SetString(PyExc_ValueError, "moe_batch: a negative count");
            goto done;
        }
        if (moe_job_of(PyTuple_GET_ITEM(job_specs, j), n_embd, &jobs[j]) < 0) goto done;
        jobs[j].weight = 0.0f;
    }
    if (moe_biases_of(biases, act, jobs, n_jobs, n_jobs, n_embd, bias_views) < 0) goto done;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = moe_batch_run(x.buf, n_tokens, n_embd, k, wts.buf, jobs, cnt, pr, (int)n_jobs, per_slot.buf, isa);
    Py_END_ALLOW_THREADS
    if (rc < 0) PyErr_NoMemory();
    else result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&x);
    PyBuffer_Release(&per_slot);
    PyBuffer_Release(&wts);
    PyBuffer_Release(&counts);
    PyBuffer_Release(&pairs);
    release_views(bias_views, 3 * MOE_MAX_JOBS);
    return result;
}

/* A float32 vector argument of at least n values, or NULL for None when optional. */
static int float_arg(PyObject *obj, Py_buffer *view, Py_ssize_t n, int writable, int optional, const float **out) {
    *out = NULL;
    if (obj == Py_None && optional) return 0;
    if (PyObject_GetBuffer(obj, view, writable ? PyBUF_WRITABLE : PyBUF_SIMPLE) < 0) return -1;
    if (view->len < n * (Py_ssize_t)sizeof(float)) {
        PyErr_Format(PyExc_ValueError, "attention_token: a vector holds %zd bytes, %zd floats expected", view->len, n);
        return -1;
    }
    *out = view->buf;
    return 0;
}

static int layer_matrix_of(PyObject *spec, int n_cols, layer_matrix *m) {
    const char *name;
    unsigned long long address;
    moe_matrix mm;
    if (!PyArg_ParseTuple(spec, "sKi", &name, &address, &m->n_rows)) return -1;
    if (m->n_rows <= 0 || moe_matrix_of(name, address, n_cols, &mm) < 0) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "attention_token: a matrix has no rows");
        return -1;
    }
    m->f = mm.f, m->dot = mm.dot, m->w = mm.w;
    return 0;
}

/* The weight bytes of an attention block's four matrices (whether its team pays off). */
static size_t attention_bytes(const attention_block *b) {
    const layer_matrix *m[4] = {&b->wq, &b->wk, &b->wv, &b->wo};
    const int n_cols[4] = {b->n_embd, b->n_embd, b->n_embd, b->n_head * b->head_dim};
    size_t total = 0;
    for (int i = 0; i < 4; i++) total += (size_t)m[i]->n_rows * row_bytes_of(m[i]->f, n_cols[i]);
    return total;
}

static PyObject *py_attention_token(PyObject *self, PyObject *args) {
    /* x, scratch, norm, bq, bk, bv, q_norm, k_norm, cos, sin, k_cache, v_cache, bo, sinks */
    PyObject *objs[14] = {NULL};
    objs[12] = objs[13] = Py_None;
    PyObject *mats;
    attention_block b = {0};
    int n_cells;
    if (!PyArg_ParseTuple(args, "(iiiiiiiifi)iO!OOOOOOOOOOOO|OOii", &b.n_embd, &b.n_head, &b.n_head_kv, &b.head_dim,
                          &b.rope_dim, &b.neox, &b.qk_norm, &b.pos, &b.eps, &b.window, &n_cells, &PyTuple_Type, &mats,
                          &objs[0], &objs[1], &objs[2], &objs[3], &objs[4], &objs[5], &objs[6], &objs[7], &objs[8],
                          &objs[9], &objs[10], &objs[11], &objs[12], &objs[13], &b.k_f16, &b.v_f16))
        return NULL;
    Py_buffer views[14];
    memset(views, 0, sizeof(views));
    PyObject *result = NULL;
    const int hd = b.head_dim, q_dim = b.n_head * hd, kv_dim = b.n_head_kv * hd;
    if (b.n_embd <= 0 || hd <= 0 || b.n_head <= 0 || b.n_head_kv <= 0 || b.n_head % b.n_head_kv || b.rope_dim < 0 ||
        b.rope_dim > hd || b.rope_dim % 2 || b.pos < 0 || b.window < 0 || n_cells <= 0 ||
        (b.pos >= n_cells && (b.window == 0 || n_cells < b.window + 1)) || b.qk_norm < 0 || b.qk_norm > 2 ||
        PyTuple_GET_SIZE(mats) != 4) {
        PyErr_SetString(PyExc_ValueError, "attention_token: bad shape (or a ring of cells too small for its window)");
        goto done;
    }
    if (layer_matrix_of(PyTuple_GET_ITEM(mats, 0), b.n_embd, &b.wq) < 0 ||
        layer_matrix_of(PyTuple_GET_ITEM(mats, 1), b.n_embd, &b.wk) < 0 ||
        layer_matrix_of(PyTuple_GET_ITEM(mats, 2), b.n_embd, &b.wv) < 0 ||
        layer_matrix_of(PyTuple_GET_ITEM(mats, 3), q_dim, &b.wo) < 0)
        goto done;
    if (b.wq.n_rows != q_dim || b.wk.n_rows != kv_dim || b.wv.n_rows != kv_dim || b.wo.n_rows != b.n_embd) {
        PyErr_SetString(PyExc_ValueError, "attention_token: matrix sizes do not fit the heads");
        goto done;
    }
    const Py_ssize_t norm_q = b.qk_norm == QK_NORM_FULL ? q_dim : hd, norm_k = b.qk_norm == QK_NORM_FULL ? kv_dim : hd;
    const Py_ssize_t scratch_floats = (Py_ssize_t)(attention_token_scratch_bytes(b.n_embd, b.n_head, b.n_head_kv, hd) / 4);
    const float *x, *scratch, *k_cache, *v_cache;
    if (float_arg(objs[0], &views[0], b.n_embd, 1, 0, &x) < 0 ||
        float_arg(objs[1], &views[1], scratch_floats, 1, 0, &scratch) < 0 ||
        float_arg(objs[2], &views[2], b.n_embd, 0, 0, &b.norm) < 0 ||
        float_arg(objs[3], &views[3], q_dim, 0, 1, &b.bq) < 0 || float_arg(objs[4], &views[4], kv_dim, 0, 1, &b.bk) < 0 ||
        float_arg(objs[5], &views[5], kv_dim, 0, 1, &b.bv) < 0 ||
        float_arg(objs[6], &views[6], norm_q, 0, b.qk_norm == QK_NORM_NONE, &b.q_norm) < 0 ||
        float_arg(objs[7], &views[7], norm_k, 0, b.qk_norm == QK_NORM_NONE, &b.k_norm) < 0 ||
        float_arg(objs[8], &views[8], b.rope_dim / 2, 0, 0, &b.cos) < 0 ||
        float_arg(objs[9], &views[9], b.rope_dim / 2, 0, 0, &b.sin) < 0 ||
        /* an F16 cache: as many bytes as half as many floats */
        float_arg(objs[10], &views[10], (Py_ssize_t)n_cells * kv_dim / (b.k_f16 ? 2 : 1), 1, 0, &k_cache) < 0 ||
        float_arg(objs[11], &views[11], (Py_ssize_t)n_cells * kv_dim / (b.v_f16 ? 2 : 1), 1, 0, &v_cache) < 0 ||
        float_arg(objs[12], &views[12], b.n_embd, 0, 1, &b.bo) < 0 ||
        float_arg(objs[13], &views[13], b.n_head, 0, 1, &b.sinks) < 0)
        goto done;
    if ((b.bq == NULL) != (b.bk == NULL) || (b.bq == NULL) != (b.bv == NULL)) {
        PyErr_SetString(PyExc_ValueError, "attention_token: q, k and v biases come together");
        goto done;
    }
    b.k_cache = (float *)k_cache, b.v_cache = (float *)v_cache, b.n_cells = n_cells;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = attention_token(&b, (float *)x, (float *)scratch, isa >= ISA_AVX2, attention_bytes(&b) >= PARALLEL_BYTES);
    Py_END_ALLOW_THREADS
    if (rc < 0) PyErr_NoMemory();
    else result = Py_NewRef(Py_None);
done:
    for (int i = 0; i < 14; i++)
        if (views[i].obj) PyBuffer_Release(&views[i]);
    return result;
}

static PyObject *py_attention_token_scratch_bytes(PyObject *self, PyObject *args) {
    int n_embd, n_head, n_head_kv, head_dim;
    if (!PyArg_ParseTuple(args, "iiii", &n_embd, &n_head, &n_head_kv, &head_dim)) return NULL;
    return PyLong_FromSize_t(attention_token_scratch_bytes(n_embd, n_head, n_head_kv, head_dim));
}

/* -- a whole decoding step (step.c): the plan built once, then one call per token ---------
 * The plan holds addresses (weights in the memory map, norms, biases, the KV cache, RoPE
 * tables): kernels/step.py checks every array's shape and keeps them alive with the plan. */

static const char *const STEP_CAPSULE = "offload.step_plan";

static void step_capsule_free(PyObject *capsule) {
    step_plan *p = PyCapsule_GetPointer(capsule, STEP_CAPSULE);
    if (p) {
        step_free(p);
        free(p);
    }
}

static const float *address_of(unsigned long long a) { return (const float *)(uintptr_t)a; }

/* (fmt, address, ..., n_ff) -> a job of activation `act` with optional (bg, bu, bd) addresses. */
static int step_job_of(PyObject *spec, PyObject *biases, int n_embd, int act, moe_ffn_job *job) {
    if (moe_job_of(spec, n_embd, job) < 0) return -1;
    job->act = act, job->weight = 0.0f;
    job->bg = job->bu = job->bd = NULL;
    if (biases && biases != Py_None) {
        unsigned long long bg, bu, bd;
        if (!PyArg_ParseTuple(biases, "KKK", &bg, &bu, &bd)) return -1;
        job->bg = address_of(bg), job->bu = address_of(bu), job->bd = address_of(bd);
    }
    return 0;
}

static int step_ffn_of(PyObject *ffn, int n_embd, int k, int act, step_layer *L) {
    if (!PyTuple_Check(ffn) || PyTuple_GET_SIZE(ffn) < 2) {
        PyErr_SetString(PyExc_ValueError, "step_plan: a layer's FFN is a tuple");
        return -1;
    }
    if (PyUnicode_Check(PyTuple_GET_ITEM(ffn, 0))) { /* ("dense", spec) */
        L->n_expert = 0;
        return step_job_of(PyTuple_GET_ITEM(ffn, 1), NULL, n_embd, MOE_ACT_SWIGLU, &L->dense);
    }
    unsigned long long router, router_bias, selection_bias, gate;
    PyObject *experts, *biases, *shared;
    if (!PyArg_ParseTuple(ffn, "iKKKO!OOK", &L->n_expert, &router, &router_bias, &selection_bias, &PyTuple_Type,
                          &experts, &biases, &shared, &gate))
        return -1;
    if (L->n_expert < k || k < 1 || k + 1 > MOE_MAX_JOBS || PyTuple_GET_SIZE(experts) != L->n_expert ||
        (biases != Py_None && (!PyTuple_Check(biases) || PyTuple_GET_SIZE(biases) != L->n_expert)) || !router) {
        PyErr_Format(PyExc_ValueError, "step_plan: %d experts, %d used, or their specs, do not fit", L->n_expert, k);
        return -1;
    }
    L->router = address_of(router), L->router_bias = address_of(router_bias);
    L->selection_bias = address_of(selection_bias), L->shared_gate = address_of(gate);
    L->experts = calloc((size_t)L->n_expert, sizeof(moe_ffn_job));
    if (!L->experts) {
        PyErr_NoMemory();
        return -1;
    }
    for (int e = 0; e < L->n_expert; e++)
        if (step_job_of(PyTuple_GET_ITEM(experts, e), biases == Py_None ? NULL : PyTuple_GET_ITEM(biases, e), n_embd,
                        act, &L->experts[e]) < 0)
            return -1;
    L->has_shared = shared != Py_None;
    if (L->has_shared && step_job_of(shared, NULL, n_embd, MOE_ACT_SWIGLU, &L->shared) < 0) return -1;
    return 0;
}

/* ("mla", (q_lora_rank, kv_lora_rank, v_head_dim, scale), n_cells, cache, norm, q_a_norm, kv_a_norm,
 *  (wq or wq_b, wq_a or None, wkv_a, wk_b, wv_b, wo), cos, sin, ffn_norm, ffn): a DeepSeek layer
 * (wk_b / wv_b: one head's rows, the heads one after another). */
static int step_latent_of(PyObject *spec, const step_plan *p, const attention_block *dims, int act, step_layer *L) {
    const char *kind;
    unsigned long long cache, norm, q_a_norm, kv_a_norm, cos, sin, ffn_norm;
    PyObject *mats, *ffn;
    latent_block *b = &L->latent;
    L->mla = 1;
    b->n_embd = dims->n_embd, b->n_head = dims->n_head, b->head_dim = dims->head_dim, b->rope_dim = dims->rope_dim;
    b->neox = dims->neox, b->eps = dims->eps, b->f16 = dims->k_f16;
    if (!PyArg_ParseTuple(spec, "s(iiif)iKKKKO!KKKO", &kind, &b->q_lora_rank, &b->kv_lora_rank, &b->v_head_dim,
                          &b->scale, &b->n_cells, &cache, &norm, &q_a_norm, &kv_a_norm, &PyTuple_Type, &mats, &cos, &sin,
                          &ffn_norm, &ffn))
        return -1;
    const int r = b->kv_lora_rank, nope = b->head_dim - b->rope_dim;
    if (strcmp(kind, "mla") != 0 || PyTuple_GET_SIZE(mats) != 6 || dims->n_head_kv != 1 || dims->k_f16 != dims->v_f16 ||
        dims->qk_norm != QK_NORM_NONE || nope <= 0 || r <= 0 || b->v_head_dim <= 0 || b->q_lora_rank < 0 ||
        b->n_cells < p->n_ctx || !cache || !norm || !kv_a_norm || !cos || !sin || !ffn_norm ||
        (b->q_lora_rank > 0) != (q_a_norm != 0) || (b->q_lora_rank > 0) != (PyTuple_GET_ITEM(mats, 1) != Py_None)) {
        PyErr_SetString(PyExc_ValueError, "step_plan: a latent attention layer does not fit");
        return -1;
    }
    if (layer_matrix_of(PyTuple_GET_ITEM(mats, 0), b->q_lora_rank ? b->q_lora_rank : b->n_embd, &b->wq) < 0 ||
        (b->q_lora_rank && layer_matrix_of(PyTuple_GET_ITEM(mats, 1), b->n_embd, &b->wq_a) < 0) ||
        layer_matrix_of(PyTuple_GET_ITEM(mats, 2), b->n_embd, &b->wkv_a) < 0 ||
        layer_matrix_of(PyTuple_GET_ITEM(mats, 3), nope, &b->wk_b) < 0 ||
        layer_matrix_of(PyTuple_GET_ITEM(mats, 4), r, &b->wv_b) < 0 ||
        layer_matrix_of(PyTuple_GET_ITEM(mats, 5), b->n_head * b->v_head_dim, &b->wo) < 0)
        return -1;
    if (b->wq.n_rows != b->n_head * b->head_dim || (b->q_lora_rank && b->wq_a.n_rows != b->q_lora_rank) ||
        b->wkv_a.n_rows != r + b->rope_dim || b->wk_b.n_rows != r || b->wv_b.n_rows != b->v_head_dim ||
        b->wo.n_rows != b->n_embd) {
        PyErr_SetString(PyExc_ValueError, "step_plan: latent attention matrix sizes do not fit the heads");
        return -1;
    }
    b->cache = (float *)(uintptr_t)cache, b->norm = address_of(norm);
    b->q_a_norm = address_of(q_a_norm), b->kv_a_norm = address_of(kv_a_norm);
    L->cos = address_of(cos), L->sin = address_of(sin), L->ffn_norm = address_of(ffn_norm);
    return step_ffn_of(ffn, b->n_embd, p->k, act, L);
}

static int step_layer_of(PyObject *spec, const step_plan *p, const attention_block *dims, int act, step_layer *L) {
    unsigned long long k_cache, v_cache, norm, bq, bk, bv, q_norm, k_norm, bo, sinks, cos, sin, ffn_norm;
    PyObject *mats, *ffn;
    attention_block *b = &L->attn;
    if (PyTuple_Check(spec) && PyTuple_GET_SIZE(spec) > 0 && PyUnicode_Check(PyTuple_GET_ITEM(spec, 0)))
        return step_latent_of(spec, p, dims, act, L);
    *b = *dims;
    if (!PyArg_ParseTuple(spec, "iiKKKO!KKKKKKKKKKO", &b->window, &b->n_cells, &k_cache, &v_cache, &norm, &PyTuple_Type,
                          &mats, &bq, &bk, &bv, &q_norm, &k_norm, &bo, &sinks, &cos, &sin, &ffn_norm, &ffn))
        return -1;
    const int q_dim = b->n_head * b->head_dim, kv_dim = b->n_head_kv * b->head_dim;
    if (PyTuple_GET_SIZE(mats) != 4 || b->n_cells <= 0 || b->window < 0 ||
        (b->n_cells < p->n_ctx && (b->window == 0 || b->n_cells < b->window + 1)) || !k_cache || !v_cache || !norm ||
        !cos || !sin || !ffn_norm || (!bq) != (!bk) || (!bq) != (!bv) || ((b->qk_norm != 0) && (!q_norm || !k_norm))) {
        PyErr_SetString(PyExc_ValueError, "step_plan: a layer's attention does not fit");
        return -1;
    }
    if (layer_matrix_of(PyTuple_GET_ITEM(mats, 0), b->n_embd, &b->wq) < 0 ||
        layer_matrix_of(PyTuple_GET_ITEM(mats, 1), b->n_embd, &b->wk) < 0 ||
        layer_matrix_of(PyTuple_GET_ITEM(mats, 2), b->n_embd, &b->wv) < 0 ||
        layer_matrix_of(PyTuple_GET_ITEM(mats, 3), q_dim, &b->wo) < 0)
        return -1;
    if (b->wq.n_rows != q_dim || b->wk.n_rows != kv_dim || b->wv.n_rows != kv_dim || b->wo.n_rows != b->n_embd) {
        PyErr_SetString(PyExc_ValueError, "step_plan: matrix sizes do not fit the heads");
        return -1;
    }
    b->k_cache = (float *)(uintptr_t)k_cache, b->v_cache = (float *)(uintptr_t)v_cache;
    b->norm = address_of(norm), b->bq = address_of(bq), b->bk = address_of(bk), b->bv = address_of(bv);
    b->q_norm = address_of(q_norm), b->k_norm = address_of(k_norm), b->bo = address_of(bo), b->sinks = address_of(sinks);
    L->cos = address_of(cos), L->sin = address_of(sin), L->ffn_norm = address_of(ffn_norm);
    return step_ffn_of(ffn, b->n_embd, p->k, act, L);
}

static PyObject *py_step_plan(PyObject *self, PyObject *args) {
    attention_block dims = {0};
    int k, routing, n_ctx, act, n_threads, n_groups, groups_used;
    float weights_scale;
    PyObject *layers, *output;
    if (!PyArg_ParseTuple(args, "(iiiiiiifiifiiiiiii)O!O", &dims.n_embd, &dims.n_head, &dims.n_head_kv, &dims.head_dim,
                          &dims.rope_dim, &dims.neox, &dims.qk_norm, &dims.eps, &k, &routing, &weights_scale, &n_ctx,
                          &dims.k_f16, &dims.v_f16, &act, &n_threads, &n_groups, &groups_used, &PyTuple_Type, &layers,
                          &output))
        return NULL;
    const Py_ssize_t n_layer = PyTuple_GET_SIZE(layers);
    if (dims.n_embd <= 0 || dims.n_embd % 32 || dims.head_dim <= 0 || dims.n_head <= 0 || dims.n_head_kv <= 0 ||
        dims.n_head % dims.n_head_kv || dims.rope_dim < 0 || dims.rope_dim > dims.head_dim || dims.rope_dim % 2 ||
        dims.qk_norm < 0 || dims.qk_norm > 2 || routing < ROUTE_SOFTMAX_TOPK || routing > ROUTE_SIGMOID_TOPK_NORM ||
        (act != MOE_ACT_SWIGLU && act != MOE_ACT_SWIGLU_OAI) || n_ctx <= 0 || n_threads < 1 || n_layer < 1 ||
        n_layer > INT32_MAX || k < 0 || k + 1 > MOE_MAX_JOBS || /* k 0: a dense model */
        (n_groups > 1 && (groups_used < 1 || groups_used > n_groups)))
        return PyErr_Format(PyExc_ValueError, "step_plan: bad dimensions");
    step_plan *p = calloc(1, sizeof(step_plan));
    if (!p) return PyErr_NoMemory();
    p->n_layer = (int)n_layer, p->n_embd = dims.n_embd, p->k = k, p->routing = routing, p->n_ctx = n_ctx;
    p->n_threads = n_threads, p->eps = dims.eps, p->weights_scale = weights_scale;
    p->n_groups = n_groups > 1 ? n_groups : 0, p->groups_used = groups_used;
    p->layers = calloc((size_t)n_layer, sizeof(step_layer));
    if (!p->layers) {
        free(p);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t l = 0; l < n_layer; l++) {
        step_layer *L = &p->layers[l];
        if (step_layer_of(PyTuple_GET_ITEM(layers, l), p, &dims, act, L) < 0) goto fail;
        if (L->n_expert && p->n_groups && (L->n_expert % p->n_groups || L->n_expert / p->n_groups < 2)) {
            PyErr_Format(PyExc_ValueError, "step_plan: %d experts do not make %d groups", L->n_expert, p->n_groups);
            goto fail;
        }
    }
    if (output != Py_None) {
        unsigned long long norm;
        PyObject *mat;
        if (!PyArg_ParseTuple(output, "KO!", &norm, &PyTuple_Type, &mat) || layer_matrix_of(mat, dims.n_embd, &p->output) < 0)
            goto fail;
        if (!norm) {
            PyErr_SetString(PyExc_ValueError, "step_plan: the output norm is missing");
            goto fail;
        }
        p->output_norm = address_of(norm);
    }
    if (step_alloc(p) < 0) {
        PyErr_NoMemory();
        goto fail;
    }
    PyObject *capsule = PyCapsule_New(p, STEP_CAPSULE, step_capsule_free);
    if (capsule) return capsule;
fail:
    step_free(p);
    free(p);
    return NULL;
}

static PyObject *py_step_run(PyObject *self, PyObject *args) {
    PyObject *capsule, *logits_obj;
    Py_buffer x = {0}, logits = {0}, chosen = {0}, weights = {0};
    int pos;
    if (!PyArg_ParseTuple(args, "Ow*iOw*w*", &capsule, &x, &pos, &logits_obj, &chosen, &weights)) return NULL;
    PyObject *result = NULL;
    step_plan *p = PyCapsule_GetPointer(capsule, STEP_CAPSULE);
    if (!p) goto done;
    if (logits_obj != Py_None && PyObject_GetBuffer(logits_obj, &logits, PyBUF_WRITABLE) < 0) goto done;
    const Py_ssize_t nk = (Py_ssize_t)p->n_layer * p->k;
    if (pos < 0 || pos >= p->n_ctx || x.len < p->n_embd * 4 || chosen.len < nk * 8 || weights.len < nk * 4 ||
        (logits.obj && (!p->output.w || logits.len < (Py_ssize_t)p->output.n_rows * 4))) {
        PyErr_Format(PyExc_ValueError, "step_run: position %d outside the context, or a buffer too small", pos);
        goto done;
    }
    int bad;
    Py_BEGIN_ALLOW_THREADS
    bad = step_run(p, x.buf, pos, logits.obj ? logits.buf : NULL, chosen.buf, weights.buf, isa >= ISA_AVX2);
    Py_END_ALLOW_THREADS
    result = PyLong_FromLong(bad);
done:
    PyBuffer_Release(&x);
    if (logits.obj) PyBuffer_Release(&logits);
    PyBuffer_Release(&chosen);
    PyBuffer_Release(&weights);
    return result;
}

/* A gated activation of two (n_rows, n) float32 buffers into out: (x, g, out, n_rows, n). */
static PyObject *glu_op(PyObject *args, const char *op,
                        void (*fn)(const float *, const float *, float *, ptrdiff_t, int, int)) {
    Py_buffer x = {0}, g = {0}, out = {0};
    Py_ssize_t n_rows, n;
    if (!PyArg_ParseTuple(args, "y*y*w*nn", &x, &g, &out, &n_rows, &n)) return NULL;
    PyObject *result = NULL;
    const Py_ssize_t bytes = n_rows * n * (Py_ssize_t)sizeof(float);
    if (n_rows < 0 || n < 0 || n > INT32_MAX || x.len < bytes || g.len < bytes || out.len < bytes) {
        PyErr_Format(PyExc_ValueError, "%s: a buffer is smaller than (%zd, %zd) float32", op, n_rows, n);
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    fn(x.buf, g.buf, out.buf, n_rows, (int)n, isa >= ISA_AVX2);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&x);
    PyBuffer_Release(&g);
    PyBuffer_Release(&out);
    return result;
}

static PyObject *py_silu_mul(PyObject *self, PyObject *args) { return glu_op(args, "silu_mul", silu_mul_rows); }

static PyObject *py_swiglu_oai(PyObject *self, PyObject *args) { return glu_op(args, "swiglu_oai", swiglu_oai_rows); }

static PyObject *py_matmul_tiled(PyObject *self, PyObject *args) {
    const char *name;
    Py_buffer w = {0}, xq = {0}, xd = {0}, bs = {0}, out = {0};
    Py_ssize_t n_rows, n_cols, n_tokens;
    if (!PyArg_ParseTuple(args, "sy*y*y*y*w*nnn", &name, &w, &xq, &xd, &bs, &out, &n_rows, &n_cols, &n_tokens))
        return NULL;
    PyObject *result = NULL;
    const int block_bytes = tiled_block_bytes(name, NULL);
    if (!block_bytes) {
        PyErr_Format(PyExc_ValueError, "no tiled C kernel for %s", name);
        goto done;
    }
    if (n_rows < 0 || n_tokens < 0 || n_cols <= 0 || n_cols % 256 || n_cols > INT32_MAX) {
        PyErr_Format(PyExc_ValueError, "%s tiled matmul: bad shape rows=%zd cols=%zd tokens=%zd", name, n_rows, n_cols,
                     n_tokens);
        goto done;
    }
    if (w.len < n_rows * (n_cols / 256) * block_bytes || xq.len < n_tokens * n_cols ||
        xd.len < n_tokens * (n_cols / 256) * (Py_ssize_t)sizeof(float) || bs.len < n_tokens * (n_cols / 16) * 2 ||
        out.len < n_rows * n_tokens * (Py_ssize_t)sizeof(float)) {
        PyErr_Format(PyExc_ValueError, "%s tiled matmul: a buffer is smaller than its shape says", name);
        goto done;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = tiled_matmul(name, w.buf, xq.buf, xd.buf, bs.buf, out.buf, n_rows, (int)n_cols, n_tokens, isa);
    Py_END_ALLOW_THREADS
    if (rc < 0) PyErr_NoMemory();
    else result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&w);
    PyBuffer_Release(&xq);
    PyBuffer_Release(&xd);
    PyBuffer_Release(&bs);
    PyBuffer_Release(&out);
    return result;
}

/* A per-head float buffer (sinks) or None: 0 with *out set (or left NULL), -1 with the error set. */
static int sinks_buffer(PyObject *obj, int n_head, Py_buffer *buf, const float **out, const char *who) {
    if (obj == Py_None) return 0;
    if (PyObject_GetBuffer(obj, buf, PyBUF_SIMPLE) < 0) return -1;
    if (buf->len < (Py_ssize_t)n_head * 4) {
        PyErr_Format(PyExc_ValueError, "%s: one sink per head expected", who);
        return -1;
    }
    *out = buf->buf;
    return 0;
}

/* flash_attention(q, k, v, out, n, start, n_head, n_head_kv, head_dim, v_dim, n_cells, window, sinks, scale,
 *                 k_type, v_type, k_row, v_row, k_head, v_head, cell_pos, n_used, n_kv, n_chunks) */
static int flash_store_of(const char *name, const format_kernels **f) {
    *f = NULL;
    if (!strcmp(name, "F32")) return FLASH_F32;
    if (!strcmp(name, "F16")) return FLASH_F16;
    if (!strcmp(name, "BF16")) return FLASH_BF16;
    *f = find_format(name);
    return *f && (*f)->block_size == 32 ? FLASH_QUANT : -1;
}

static PyObject *py_flash_attention(PyObject *self, PyObject *args) {
    Py_buffer q = {0}, k = {0}, v = {0}, out = {0}, sinks = {0}, cells = {0};
    PyObject *sinks_obj = Py_None, *cells_obj = Py_None;
    const char *k_type, *v_type;
    Py_ssize_t k_row, v_row, k_head, v_head;
    flash_args a = {0};
    if (!PyArg_ParseTuple(args, "y*y*y*w*iiiiiiiiOfssnnnnOiii", &q, &k, &v, &out, &a.n, &a.start, &a.n_head,
                          &a.n_head_kv, &a.head_dim, &a.v_dim, &a.n_cells, &a.window, &sinks_obj, &a.scale, &k_type,
                          &v_type, &k_row, &v_row, &k_head, &v_head, &cells_obj, &a.n_used, &a.n_kv, &a.n_chunks))
        return NULL;
    PyObject *result = NULL;
    const format_kernels *kf, *vf;
    a.k_store = flash_store_of(k_type, &kf);
    a.v_store = flash_store_of(v_type, &vf);
    if (a.k_store < 0 || a.v_store < 0) {
        PyErr_Format(PyExc_ValueError, "flash attention: no kernel for a %s/%s cache", k_type, v_type);
        goto done;
    }
    if (kf) a.k_dot = pick(kf), a.k_act = kf->act;
    a.v_format = vf;
    a.k_row = (size_t)k_row, a.v_row = (size_t)v_row, a.k_head = (size_t)k_head, a.v_head = (size_t)v_head;
    if (a.n < 0 || a.start < 0 || a.head_dim <= 0 || a.v_dim <= 0 || a.n_head_kv <= 0 || a.n_head % a.n_head_kv ||
        a.n_cells <= 0 || a.window < 0 || a.head_dim % 32 || a.v_dim % 32 || a.n_chunks < 0) {
        PyErr_SetString(PyExc_ValueError, "flash attention: bad shape");
        goto done;
    }
    if (cells_obj != Py_None) {
        if (PyObject_GetBuffer(cells_obj, &cells, PyBUF_SIMPLE) < 0) goto done;
        if (a.n_used < 0 || a.n_used > a.n_cells || cells.len < (Py_ssize_t)a.n_used * 4) {
            PyErr_SetString(PyExc_ValueError, "flash attention: bad cell positions");
            goto done;
        }
        a.cell_pos = cells.buf;
    } else if (a.start + a.n > a.n_cells && (a.window == 0 || a.n_cells < a.window + a.n)) {
        PyErr_SetString(PyExc_ValueError, "flash attention: more positions than cells");
        goto done;
    }
    if (q.len < (Py_ssize_t)a.n * a.n_head * a.head_dim * 4 || out.len < (Py_ssize_t)a.n * a.n_head * a.v_dim * 4 ||
        k.len < (Py_ssize_t)a.n_cells * k_row || v.len < (Py_ssize_t)a.n_cells * v_row) {
        PyErr_SetString(PyExc_ValueError, "flash attention: a buffer is smaller than its shape says");
        goto done;
    }
    if (sinks_buffer(sinks_obj, a.n_head, &sinks, &a.sinks, "flash attention") < 0) goto done;
    a.q = q.buf, a.out = out.buf, a.k = k.buf, a.v = v.buf;
    if (a.n_chunks == 0) a.n_chunks = omp_get_max_threads(); /* llama.cpp splits among its threads */
    a.use_avx2 = isa >= ISA_AVX2;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = flash_attention_run(&a);
    Py_END_ALLOW_THREADS
    if (rc == -1) PyErr_NoMemory();
    else if (rc == -2) PyErr_Format(PyExc_ValueError, "flash attention: cannot read a %s V cache", v_type);
    else result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&q);
    PyBuffer_Release(&k);
    PyBuffer_Release(&v);
    PyBuffer_Release(&out);
    if (sinks.obj) PyBuffer_Release(&sinks);
    if (cells.obj) PyBuffer_Release(&cells);
    return result;
}

static PyObject *py_attention(PyObject *self, PyObject *args) {
    Py_buffer q = {0}, k = {0}, v = {0}, out = {0};
    PyObject *sinks_obj = Py_None;
    Py_buffer sinks = {0};
    attention_args a = {0};
    int k_f16 = 0, v_f16 = 0; /* an F16 cache (uint16 halves) instead of F32 */
    Py_buffer cells = {0};    /* after a context shift: int32 positions of the first n_used cells */
    if (!PyArg_ParseTuple(args, "y*y*y*w*iiiiiii|Oiifiiy*i", &q, &k, &v, &out, &a.n, &a.start, &a.n_head,
                          &a.n_head_kv, &a.head_dim, &a.n_cells, &a.window, &sinks_obj, &a.v_dim, &a.v_stride, &a.scale,
                          &k_f16, &v_f16, &cells, &a.n_used))
        return NULL;
    PyObject *result = NULL;
    if (a.n < 0 || a.start < 0 || a.head_dim <= 0 || a.n_head_kv <= 0 || a.n_head % a.n_head_kv || a.window < 0 ||
        a.n_cells <= 0 ||
        (cells.obj ? a.n_used < 0 || a.n_used > a.n_cells || cells.len < (Py_ssize_t)a.n_used * 4
                   : a.start + a.n > a.n_cells && (a.window == 0 || a.n_cells < a.window + a.n))) {
        PyErr_SetString(PyExc_ValueError, "attention: bad shape (or a ring of cells too small for its window)");
        goto done;
    }
    if (cells.obj) a.cell_pos = cells.buf;
    a.q_stride = a.n_head * a.head_dim;
    a.kv_stride = a.n_head_kv * a.head_dim;
    if (a.v_dim <= 0) a.v_dim = a.head_dim;
    if (a.v_stride <= 0) a.v_stride = a.n_head_kv * a.v_dim;
    const Py_ssize_t qbytes = (Py_ssize_t)a.n * a.q_stride * 4;
    const Py_ssize_t kvbytes = (Py_ssize_t)a.n_cells * a.kv_stride * (k_f16 ? 2 : 4);
    const Py_ssize_t vbytes =
        ((Py_ssize_t)(a.n_cells - 1) * a.v_stride + (Py_ssize_t)a.n_head_kv * a.v_dim) * (v_f16 ? 2 : 4);
    const Py_ssize_t obytes = (Py_ssize_t)a.n * a.n_head * a.v_dim * 4;
    if (q.len < qbytes || out.len < obytes || k.len < kvbytes || v.len < vbytes) {
        PyErr_SetString(PyExc_ValueError, "attention: a buffer is smaller than its shape says");
        goto done;
    }
    if (sinks_buffer(sinks_obj, a.n_head, &sinks, &a.sinks, "attention") < 0) goto done;
    a.q = q.buf, a.out = out.buf;
    if (k_f16) a.k16 = k.buf; else a.k = k.buf;
    if (v_f16) a.v16 = v.buf; else a.v = v.buf;
    a.gemm8 = a.n >= 2 && a.v_dim % 4 == 0; /* tinyBLAS per query head, over its n tokens: n >= 2 */
    a.kq_gemm8 = k_f16 && a.n >= 2 && a.head_dim % 8 == 0; /* F16 K: tinyBLAS takes the converted q */
    if (a.scale == 0.0f) a.scale = 1.0f / sqrtf((float)a.head_dim);
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = attention_run(&a, isa >= ISA_AVX2);
    Py_END_ALLOW_THREADS
    if (rc < 0) PyErr_NoMemory();
    else result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&q);
    PyBuffer_Release(&k);
    PyBuffer_Release(&v);
    PyBuffer_Release(&out);
    if (sinks.obj) PyBuffer_Release(&sinks);
    if (cells.obj) PyBuffer_Release(&cells);
    return result;
}

/* XOR of every 64-bit word of a buffer, OpenMP over chunks: the benchmarks' read-bandwidth
 * probe, on the same thread pool as the kernels (a Numba probe competes with OpenMP threads
 * still spinning after a kernel and measured anywhere between 35 and 65 GB/s here). */
static PyObject *py_xor_words(PyObject *self, PyObject *args) {
    Py_buffer b = {0};
    if (!PyArg_ParseTuple(args, "y*", &b)) return NULL;
    const uint64_t *p = b.buf;
    const Py_ssize_t n = b.len / 8;
    uint64_t x = 0;
    Py_BEGIN_ALLOW_THREADS
#pragma omp parallel for schedule(static) reduction(^ : x)
    for (Py_ssize_t i = 0; i < n; i++) x ^= p[i];
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&b);
    return PyLong_FromUnsignedLongLong(x);
}

static PyObject *py_formats(PyObject *self, PyObject *noargs) {
    PyObject *d = PyDict_New();
    for (int i = 0; d && i < N_FORMATS; i++) {
        const format_kernels *f = all_formats[i];
        if (!f) continue;
        const char *avx2 = f->avx2 && best_isa >= ISA_AVX2 ? "avx2" : NULL;
        const char *avx512 = f->avx512 && best_isa >= ISA_AVX512 ? "avx512" : NULL;
        const char *act = act_names[f->act];
        PyObject *item = avx512 && avx2 ? Py_BuildValue("(s[sss])", act, "portable", avx2, avx512)
                         : avx2 || avx512 ? Py_BuildValue("(s[ss])", act, "portable", avx2 ? avx2 : avx512)
                                          : Py_BuildValue("(s[s])", act, "portable");
        if (!item || PyDict_SetItemString(d, f->name, item) < 0) Py_CLEAR(d);
        Py_XDECREF(item);
    }
    return d;
}

static PyObject *py_isa(PyObject *self, PyObject *noargs) { return PyUnicode_FromString(isa_names[isa]); }

static PyObject *py_best_isa(PyObject *self, PyObject *noargs) { return PyUnicode_FromString(isa_names[best_isa]); }

static PyObject *py_set_isa(PyObject *self, PyObject *args) {
    const char *name;
    if (!PyArg_ParseTuple(args, "s", &name)) return NULL;
    for (int i = 0; i <= best_isa; i++)
        if (strcmp(isa_names[i], name) == 0) {
            isa = i;
            Py_RETURN_NONE;
        }
    return PyErr_Format(PyExc_ValueError, "this CPU runs %s at most, not %s", isa_names[best_isa], name);
}

static PyObject *py_set_num_threads(PyObject *self, PyObject *args) {
    int n;
    if (!PyArg_ParseTuple(args, "i", &n)) return NULL;
    if (n < 1) return PyErr_Format(PyExc_ValueError, "need at least one thread, got %d", n);
    omp_set_num_threads(n);
    Py_RETURN_NONE;
}

/* -- float matmuls and the small ops (floats.c, ops.c): arguments checked, GIL released -- */

static PyObject *py_matmul_float(PyObject *self, PyObject *args) {
    const char *name;
    Py_buffer w = {0}, x = {0}, out = {0};
    Py_ssize_t n_rows, n_cols, n_tokens;
    int order;
    if (!PyArg_ParseTuple(args, "sy*y*w*nnni", &name, &w, &x, &out, &n_rows, &n_cols, &n_tokens, &order)) return NULL;
    PyObject *result = NULL;
    const int type = !strcmp(name, "F32") ? FLOAT_F32 : !strcmp(name, "F16") ? FLOAT_F16 : !strcmp(name, "BF16") ? FLOAT_BF16 : -1;
    const Py_ssize_t row_bytes = n_cols * (type == FLOAT_F32 ? 4 : 2);
    if (type < 0 || order < ORDER_GEMM8 || order > ORDER_VECDOT_BF16 || n_rows < 0 || n_tokens < 0 || n_cols <= 0 ||
        n_cols > INT32_MAX || w.len < n_rows * row_bytes || x.len < n_tokens * n_cols * 4 ||
        out.len < n_rows * n_tokens * 4) {
        PyErr_Format(PyExc_ValueError, "matmul_float %s: bad call (order %d, rows=%zd cols=%zd tokens=%zd)", name, order,
                     n_rows, n_cols, n_tokens);
        goto done;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = matmul_float(type, w.buf, x.buf, out.buf, n_rows, (int)n_cols, n_tokens, order, isa >= ISA_AVX2,
                      (size_t)n_rows * (size_t)row_bytes * (size_t)n_tokens >= PARALLEL_BYTES);
    Py_END_ALLOW_THREADS
    if (rc < 0) PyErr_NoMemory();
    else result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&w);
    PyBuffer_Release(&x);
    PyBuffer_Release(&out);
    return result;
}

/* (n_rows, n) float32 buffers: each at least that long, n in int range. */
static int rows_fit(const char *op, Py_ssize_t n_rows, Py_ssize_t n, const Py_buffer *a, const Py_buffer *b) {
    if (n_rows >= 0 && n >= 0 && n <= INT32_MAX && a->len >= n_rows * n * 4 && b->len >= n_rows * n * 4) return 1;
    PyErr_Format(PyExc_ValueError, "%s: a buffer is smaller than (%zd, %zd) float32", op, n_rows, n);
    return 0;
}

static PyObject *py_rms_norm(PyObject *self, PyObject *args) {
    Py_buffer x = {0}, w = {0}, out = {0};
    float eps;
    Py_ssize_t n_rows, n;
    if (!PyArg_ParseTuple(args, "y*y*fw*nn", &x, &w, &eps, &out, &n_rows, &n)) return NULL;
    PyObject *result = NULL;
    if (!rows_fit("rms_norm", n_rows, n, &x, &out)) goto done;
    if (w.len < n * 4) {
        PyErr_SetString(PyExc_ValueError, "rms_norm: the weight is shorter than a row");
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    rms_norm_rows(x.buf, w.buf, eps, out.buf, n_rows, (int)n);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&x);
    PyBuffer_Release(&w);
    PyBuffer_Release(&out);
    return result;
}

/* softmax and silu: (x, out, n_rows, n) */
static PyObject *row_op(PyObject *args, const char *op, void (*fn)(const float *, float *, ptrdiff_t, int, int)) {
    Py_buffer x = {0}, out = {0};
    Py_ssize_t n_rows, n;
    if (!PyArg_ParseTuple(args, "y*w*nn", &x, &out, &n_rows, &n)) return NULL;
    PyObject *result = NULL;
    if (!rows_fit(op, n_rows, n, &x, &out)) goto done;
    Py_BEGIN_ALLOW_THREADS
    fn(x.buf, out.buf, n_rows, (int)n, isa >= ISA_AVX2);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&x);
    PyBuffer_Release(&out);
    return result;
}

static PyObject *py_softmax(PyObject *self, PyObject *args) { return row_op(args, "softmax", softmax_rows); }

static PyObject *py_silu(PyObject *self, PyObject *args) { return row_op(args, "silu", silu_rows); }

static PyObject *py_sigmoid(PyObject *self, PyObject *args) { return row_op(args, "sigmoid", sigmoid_rows); }

static PyObject *py_expf(PyObject *self, PyObject *args) {
    Py_buffer x = {0}, out = {0};
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "y*w*n", &x, &out, &n)) return NULL;
    PyObject *result = NULL;
    if (n < 0 || x.len < n * 4 || out.len < n * 4) {
        PyErr_SetString(PyExc_ValueError, "expf: a buffer is shorter than n float32");
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    expf_ggml_array(x.buf, out.buf, n, isa >= ISA_AVX2);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&x);
    PyBuffer_Release(&out);
    return result;
}

static PyObject *py_rope(PyObject *self, PyObject *args) {
    Py_buffer x = {0}, c = {0}, s = {0};
    Py_ssize_t n_tokens;
    int n_heads, head_dim, rope_dim, neox;
    if (!PyArg_ParseTuple(args, "w*y*y*niiip", &x, &c, &s, &n_tokens, &n_heads, &head_dim, &rope_dim, &neox))
        return NULL;
    PyObject *result = NULL;
    const Py_ssize_t table = n_tokens * (rope_dim / 2) * 4;
    if (n_tokens < 0 || n_heads < 0 || rope_dim < 0 || rope_dim % 2 || rope_dim > head_dim ||
        x.len < n_tokens * n_heads * head_dim * 4 || c.len < table || s.len < table) {
        PyErr_SetString(PyExc_ValueError, "rope: bad shape or a buffer smaller than it says");
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    rope_rows(x.buf, c.buf, s.buf, n_tokens, n_heads, head_dim, rope_dim, neox, isa >= ISA_AVX2);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&x);
    PyBuffer_Release(&c);
    PyBuffer_Release(&s);
    return result;
}

static PyObject *py_top_k(PyObject *self, PyObject *args) {
    Py_buffer p = {0}, chosen = {0}, weights = {0};
    Py_ssize_t n_rows;
    int n, k, normalize;
    if (!PyArg_ParseTuple(args, "y*niipw*w*", &p, &n_rows, &n, &k, &normalize, &chosen, &weights)) return NULL;
    PyObject *result = NULL;
    if (n_rows < 0 || k < 0 || k > n || p.len < n_rows * n * 4 || chosen.len < n_rows * k * 8 ||
        weights.len < n_rows * k * 4) {
        PyErr_Format(PyExc_ValueError, "top_k: bad shape (rows=%zd n=%d k=%d) or a buffer smaller than it says", n_rows,
                     n, k);
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    top_k_rows(p.buf, n_rows, n, k, normalize, chosen.buf, weights.buf);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&p);
    PyBuffer_Release(&chosen);
    PyBuffer_Release(&weights);
    return result;
}

static PyObject *py_lookahead(PyObject *self, PyObject *args) {
    Py_buffer x = {0}, w = {0}, experts = {0}, counts = {0}, conf = {0};
    int n, n_targets, e, k, m;
    double eps;
    float ratio;
    if (!PyArg_ParseTuple(args, "y*iy*iidiifw*w*w*", &x, &n, &w, &n_targets, &e, &eps, &k, &m, &ratio, &experts,
                          &counts, &conf))
        return NULL;
    PyObject *result = NULL;
    float *logits = NULL;
    const Py_ssize_t n_out = (Py_ssize_t)n_targets * e;
    if (n <= 0 || n_targets < 0 || e <= 0 || k < 0 || m < 0 || k + m > e || x.len < (Py_ssize_t)n * 4 ||
        w.len < n * n_out * 4 || experts.len < n_targets * (k + m) * 8 || counts.len < n_targets * 8 ||
        conf.len < n_targets * 4) {
        PyErr_SetString(PyExc_ValueError, "lookahead: bad shape or a buffer smaller than it says");
        goto done;
    }
    if (!(logits = malloc((size_t)(n_out ? n_out : 1) * sizeof(float)))) {
        PyErr_NoMemory();
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    lookahead_one(x.buf, n, w.buf, n_targets, e, eps, k, m, ratio, logits, experts.buf, counts.buf, conf.buf);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    free(logits);
    PyBuffer_Release(&x);
    PyBuffer_Release(&w);
    PyBuffer_Release(&experts);
    PyBuffer_Release(&counts);
    PyBuffer_Release(&conf);
    return result;
}

static PyMethodDef methods[] = {
    {"matmul", py_matmul, METH_VARARGS, "matmul(fmt, w, xq, xd, bsums, out, n_rows, n_cols, n_tokens)"},
    {"moe_ffn", py_moe_ffn, METH_VARARGS, "moe_ffn(x, out, shared_out, workspace, n_embd, n_routed, jobs, weights, act=0, biases=None)"},
    {"attention_token", py_attention_token, METH_VARARGS,
     "attention_token(dims, n_cells, mats, x, scratch, norm, bq, bk, bv, q_norm, k_norm, cos, sin, k_cache, v_cache, "
     "bo=None, sinks=None)"},
    {"attention_token_scratch_bytes", py_attention_token_scratch_bytes, METH_VARARGS,
     "attention_token_scratch_bytes(n_embd, n_head, n_head_kv, head_dim)"},
    {"step_plan", py_step_plan, METH_VARARGS, "step_plan(dims, layers, output): a whole decoding step's plan (kernels/step.py)"},
    {"step_run", py_step_run, METH_VARARGS, "step_run(plan, x, pos, logits, chosen, weights) -> first bad layer or -1"},
    {"moe_batch", py_moe_batch, METH_VARARGS, "moe_batch(x, per_slot, weights, n_tokens, n_embd, k, jobs, counts, pairs, act=0, biases=None)"},
    {"moe_workspace_bytes", py_moe_workspace_bytes, METH_VARARGS, "moe_workspace_bytes(n_embd, (n_ff, ...))"},
    {"silu_mul", py_silu_mul, METH_VARARGS, "silu_mul(x, g, out, n_rows, n)"},
    {"swiglu_oai", py_swiglu_oai, METH_VARARGS, "swiglu_oai(g, u, out, n_rows, n)"},
    {"sigmoid", py_sigmoid, METH_VARARGS, "sigmoid(x, out, n_rows, n)"},
    {"matmul_x", py_matmul_x, METH_VARARGS, "matmul_x(x, n_tokens, n_cols, ((fmt, w, out, n_rows), ...))"},
    {"matmul_heads", py_matmul_heads, METH_VARARGS, "matmul_heads(x, n_heads, n_cols, fmt, w, out, n_rows)"},
    {"quantize", py_quantize, METH_VARARGS, "quantize(kind, x, qs, d, bsums, n_tokens, n_cols)"},
    {"matmul_tiled", py_matmul_tiled, METH_VARARGS, "matmul_tiled(fmt, w, xq, xd, bsums, out, n_rows, n_cols, n_tokens)"},
    {"attention", py_attention, METH_VARARGS, "attention(q, k, v, out, n, start, n_head, n_head_kv, head_dim)"},
    {"flash_attention", py_flash_attention, METH_VARARGS, "llama.cpp's CPU flash attention over a layer's cache"},
    {"formats", py_formats, METH_NOARGS, "{format: (vec_dot_type, [isa, ...])} of the kernels built in"},
    {"xor_words", py_xor_words, METH_VARARGS, "xor of every 64-bit word (read-bandwidth probe)"},
    {"isa", py_isa, METH_NOARGS, "SIMD level in use"},
    {"best_isa", py_best_isa, METH_NOARGS, "best SIMD level this CPU supports"},
    {"set_isa", py_set_isa, METH_VARARGS, "use a lower SIMD level (tests)"},
    {"set_num_threads", py_set_num_threads, METH_VARARGS, "threads for the row loop"},
    {"matmul_float", py_matmul_float, METH_VARARGS, "matmul_float(fmt, w, x, out, n_rows, n_cols, n_tokens, order)"},
    {"rms_norm", py_rms_norm, METH_VARARGS, "rms_norm(x, w, eps, out, n_rows, n)"},
    {"softmax", py_softmax, METH_VARARGS, "softmax(x, out, n_rows, n)"},
    {"expf", py_expf, METH_VARARGS, "expf(x, out, n): ggml_v_expf"},
    {"silu", py_silu, METH_VARARGS, "silu(x, out, n_rows, n)"},
    {"rope", py_rope, METH_VARARGS, "rope(x, cos, sin, n_tokens, n_heads, head_dim, rope_dim, neox)"},
    {"top_k", py_top_k, METH_VARARGS, "top_k(probs, n_rows, n, k, normalize, chosen, weights)"},
    {"lookahead", py_lookahead, METH_VARARGS, "lookahead(x, n, w, n_targets, e, eps, k, m, ratio, experts, counts, conf)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cext", "offload's SIMD kernels", -1, methods};

PyMODINIT_FUNC PyInit__cext(void) {
    detect_isa();
    PyObject *m = PyModule_Create(&module);
    if (m && (PyModule_AddIntConstant(m, "MATMUL_X_MAX", MATMUL_X_MAX) < 0 ||
              PyModule_AddIntConstant(m, "MOE_MAX_JOBS", MOE_MAX_JOBS) < 0))
        Py_CLEAR(m);
    return m;
}
