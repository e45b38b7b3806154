/* Row ops (RMSNorm, softmax, SwiGLU) and the bandwidth probe.
 *
 * The row ops are single-threaded and run on vectors of a few thousand floats, tiny next to
 * the matmuls, so they are written for accuracy first: they must track the PyTorch f32
 * reference to ~1e-6 relative, since their outputs feed every following layer. Sums that span a
 * whole row (sum of squares, softmax denominator) are accumulated in double, which makes them
 * at least as accurate as PyTorch's own (pairwise, vectorised) f32 reductions; everything
 * element-wise is done in f32 in the reference's order. */
#include "kernels/kernels.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

void ds_rmsnorm(float *out, const float *x, const float *w, int64_t n, float eps) {
    DS_ASSERT(n > 0);
    ds_kernels_get()->rmsnorm_f32(out, x, w, (size_t)n, eps);
}

/* max_i x[i] by the first-wins scan `if (x[i] > m) m = x[i]` from m = x[0], in eight chains (i
 * mod 8) merged in order: the same value (NaN iff x[0] is, later NaNs skipped; only the sign of a
 * zero maximum may differ, which x - max does not see after exp), without a compare's latency
 * per element. */
static float row_max(const float *x, int64_t n) {
    float m[8];
    for (int j = 0; j < 8; j++) m[j] = x[0];
    int64_t i = 1;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++)
            if (x[i + j] > m[j]) m[j] = x[i + j];
    for (; i < n; i++)
        if (x[i] > m[0]) m[0] = x[i];
    float mx = m[0];
    for (int j = 1; j < 8; j++)
        if (m[j] > mx) mx = m[j];
    return mx;
}

void ds_softmax(float *x, int64_t n) {
    if (n <= 0) return;
    const float mx = row_max(x, n);
    for (int64_t i = 0; i < n; i++) x[i] -= mx;
    /* exp through the table's kernel: scalar expf took most of attention's time at long contexts
     * (a score per cached position and head) */
    ds_kernels_get()->exp_f32(x, x, (size_t)n);
    double sum = 0.0;
    for (int64_t i = 0; i < n; i++) sum += x[i];
    /* sum >= 1 (the max contributes exp(0)) unless the row holds NaN or is all -inf, in which
     * case the NaNs propagate as they do in torch */
    const float inv = (float)(1.0 / sum);
    for (int64_t i = 0; i < n; i++) x[i] *= inv;
}

void ds_swiglu(float *a, const float *b, int64_t n) {
    if (n > 0) ds_kernels_get()->swiglu_f32(a, b, (size_t)n);
}

/* SGLang's per_token_quant_int8: scale = max|x| / 127, q = round(x / scale), torch.round being
 * half-to-even, which nearbyintf is under the default rounding mode (never changed here). The
 * division (not a multiply by 127 / max) is what the reference does; x / scale of the largest
 * element may come out a hair above 127, and the clamp keeps every q in [-127, 127]. */
void ds_quantize_row_i8(const float *x, int64_t n, int8_t *q, float *scale) {
    DS_ASSERT(n >= 0 && (n == 0 || (x && q)) && scale);
    const ds_kernels *k = ds_kernels_get();
    float amax = k->absmax_f32(x, (size_t)n);
    float s = amax > 0.0f ? amax / 127.0f : 1.0f;
    *scale = s;
    k->quantize_i8(x, (size_t)n, s, q);
}

/* The Ascend quantize of the static W8A8 scheme (FORMATS-SPEC §0): x / scale + zp, rounded
 * half to even, clamped to the full int8 range (-128 included, unlike the symmetric dynamic
 * scheme). MindSpore's kernel divides; vllm-ascend multiplies by the reciprocal: they differ
 * only where x / scale lands within an ulp of a rounding boundary. */
void ds_quantize_row_static(const float *x, int64_t n, const float *scale, const float *zp,
                            int per_channel, int8_t *q) {
    for (int64_t i = 0; i < n; i++) {
        int64_t c = per_channel ? i : 0;
        float v = x[i] == x[i] ? nearbyintf(x[i] / scale[c] + zp[c]) : nearbyintf(zp[c]);
        q[i] = (int8_t)(v > 127.0f ? 127 : v < -128.0f ? -128 : (int)v);
    }
}

/* ---- bandwidth probe ----
 * The probe reads with the selected table's dot_f32(a, a): one memory stream through the same
 * wide loads the matmul uses. A plain C loop is bounded by load issue width instead (about 19
 * GB/s against 32 GB/s on one Zen core), which would make the matmul look faster than memory. */
typedef struct {
    const ds_kernels *k;
    float *buf; /* [n] */
    size_t n;
    int touch;   /* 1: write the slice (first touch); 0: read it */
    float *sums; /* [n_threads] */
} bw_ctx;

static void bw_thread(void *arg, int thread, int n_threads) {
    bw_ctx *c = arg;
    size_t lo, hi;
    ds_split_range(c->n, thread, n_threads, &lo, &hi);
    if (c->touch) /* the first write places each page on this thread's NUMA node */
        memset(c->buf + lo, 0, (hi - lo) * sizeof(float));
    else
        c->sums[thread] = c->k->dot_f32(c->buf + lo, c->buf + lo, hi - lo);
}

static void bw_run(ds_pool *pool, bw_ctx *c) {
    if (pool)
        ds_pool_run(pool, bw_thread, c);
    else
        bw_thread(c, 0, 1);
}

struct ds_bw_probe {
    ds_pool *pool;
    int nt; /* the pool's threads: c.sums' length */
    bw_ctx c;
};

ds_bw_probe *ds_bw_probe_open(ds_pool *pool, size_t bytes) {
    size_t n = bytes / sizeof(float);
    int nt = pool ? ds_pool_size(pool) : 1;
    ds_bw_probe *p = n ? calloc(1, sizeof *p) : NULL;
    float *sums = p ? calloc((size_t)nt, sizeof *sums) : NULL;
    /* not ds_alloc: it zeroes the buffer on this thread, which would defeat the parallel first
     * touch (fresh pages are only placed when first written); on 2 MiB pages where the kernel
     * allows, as the weights whose reads this rate bounds (ds_st_load_used) */
    void *mem = sums ? ds_map_aligned(n * sizeof(float), -1) : NULL;
    if (!mem) {
        ds_warn("bandwidth probe: cannot allocate %zu bytes", bytes);
        free(sums);
        free(p);
        return NULL;
    }
    *p = (ds_bw_probe){pool, nt, {ds_kernels_get(), mem, n, 1, sums}};
    bw_run(pool, &p->c);
    p->c.touch = 0;
    return p;
}

double ds_bw_probe_run(ds_bw_probe *p, int passes) {
    if (!p) return 0.0;
    volatile float sink = 0; /* consumes the sums so the passes cannot be optimised away */
    double best = 0.0;
    for (int pass = 0; pass < passes; pass++) {
        double t0 = ds_now();
        bw_run(p->pool, &p->c);
        double dt = ds_now() - t0;
        for (int i = 0; i < p->nt; i++) sink += p->c.sums[i];
        if (dt > 0 && (best == 0.0 || dt < best)) best = dt;
    }
    (void)sink;
    return best > 0 ? (double)(p->c.n * sizeof(float)) / best : 0.0;
}

void ds_bw_probe_close(ds_bw_probe *p) {
    if (!p) return;
    munmap(p->c.buf, p->c.n * sizeof(float));
    free(p->c.sums);
    free(p);
}

double ds_measure_read_bandwidth(ds_pool *pool, size_t bytes) {
    ds_bw_probe *p = ds_bw_probe_open(pool, bytes);
    double bw = ds_bw_probe_run(p, 5);
    ds_bw_probe_close(p);
    return bw;
}

void ds_bf16_split(const float *x, size_t n, float *xs) {
    ds_kernels_get()->bf16_split(x, n, xs);
}

void ds_i4_split(const int8_t *x, size_t n, size_t block, int8_t *xs) {
    DS_ASSERT(block > 0);
    for (size_t c0 = 0; c0 < n; c0 += block) {
        size_t end = n - c0 < block ? n : c0 + block;
        for (size_t i0 = c0; i0 < end; i0 += 128) {
            size_t len = end - i0 < 128 ? end - i0 : 128, ne = (len + 1) / 2;
            for (size_t j = 0; j < len; j++) xs[i0 + (j % 2 ? ne + j / 2 : j / 2)] = x[i0 + j];
        }
    }
}
