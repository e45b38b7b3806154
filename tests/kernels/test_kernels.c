/* Kernels against references.
 *
 *  1. The scalar table against independent formulas (ldexp in double) over every bit pattern:
 *     scalar is the oracle for the rest, so it is checked against something that is not itself.
 *  2. Every table this machine can run (scalar, avx2, avx512, neon) against scalar: conversions
 *     bit-exact over all 65536 / 256 patterns and on odd lengths with unaligned pointers and a
 *     canary past the end; dot / dot4 / axpy within a tolerance scaled by sum |a*b|; the fused
 *     decode + dot kernels (one and two tokens, FP8 with per-block scales) against a double dot
 *     of the decoded weights and against scalar, rows in exact-size allocations.
 *  3. ds_matmul for F32 / BF16 / F16 / F8_E4M3 against a double-precision product with the
 *     dequantised matrix, on shapes that are not multiples of 4 or of the FP8 block and with a
 *     different scale in every block (so a wrong block index changes the answer), for pools of
 *     1 and 3 threads, at n_tok 1..5 (the fused path) and 17 (the tiled one). ds_matmul always
 *     uses ds_kernels_get(), which is fixed once per process,
 *     so this part runs in one forked child per table with DS_ISA forcing it.
 *  4. Row ops against double references; the bandwidth probe returns something sane.
 *
 * Speed is not tested here: `dsinfer bench-kernels` measures it against this machine's limits. */
#include "kernels/kernels.h"
#include "testutil.h"

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static const size_t sizes[] = {1, 3, 7, 15, 16, 17, 31, 33, 63, 127, 129, 1000, 4097};
#define N_SIZES (sizeof sizes / sizeof sizes[0])
static const char *const isas[] = {"scalar", "avx2", "avx512", "neon"};
#define N_ISAS (sizeof isas / sizeof isas[0])

/* ---- helpers ---- */
static uint64_t rng = 0x9e3779b97f4a7c15ull;
static uint64_t rnd64(void) { /* splitmix64 */
    uint64_t z = (rng += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
static float rnd_uniform(float lo, float hi) {
    return lo + (hi - lo) * (float)((double)(rnd64() >> 11) * 0x1p-53);
}

static uint32_t fbits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

/* Same value and, for zeros, same sign; any NaN matches any NaN when nan_ok. */
static int same_float(float a, float b, int nan_ok) {
    if (isnan(a) || isnan(b)) return nan_ok && isnan(a) && isnan(b);
    return fbits(a) == fbits(b);
}

/* Independent decoders: the textbook formulas, in double. */
static double ref_f16(uint16_t h) {
    int s = h >> 15, e = (h >> 10) & 0x1f, m = h & 0x3ff;
    double v;
    if (e == 31)
        v = m ? NAN : INFINITY;
    else if (e == 0)
        v = ldexp(m, -24);
    else
        v = ldexp(1024 + m, e - 25);
    return s ? -v : v;
}
static double ref_bf16(uint16_t h) {
    int s = h >> 15, e = (h >> 7) & 0xff, m = h & 0x7f;
    double v;
    if (e == 255)
        v = m ? NAN : INFINITY;
    else if (e == 0)
        v = ldexp(m, -133);
    else
        v = ldexp(128 + m, e - 134);
    return s ? -v : v;
}
static int e4m3_is_nan(uint8_t b) {
    return (b & 0x7f) == 0x7f;
}
static double ref_e4m3(uint8_t b) {
    int s = b >> 7, e = (b >> 3) & 0xf, m = b & 7;
    double v;
    if (e == 15 && m == 7)
        v = NAN;
    else if (e == 0)
        v = ldexp(m, -9);
    else
        v = ldexp(8 + m, e - 10);
    return s ? -v : v;
}

/* ---- 1. the scalar oracle against the formulas ---- */
static void test_scalar_formulas(void) {
    const ds_kernels *s = ds_kernels_scalar();
    CHECK(strcmp(s->name, "scalar") == 0);
    static uint16_t src[65536];
    static float dst[65536];
    for (int i = 0; i < 65536; i++) src[i] = (uint16_t)i;

    int bad = 0;
    s->f16_to_f32(dst, src, 65536);
    for (int i = 0; i < 65536; i++) bad += !same_float(dst[i], (float)ref_f16(src[i]), 1);
    CHECK_MSG(bad == 0, "%d f16 codes decode wrongly", bad);
    bad = 0;
    s->bf16_to_f32(dst, src, 65536);
    for (int i = 0; i < 65536; i++) bad += !same_float(dst[i], (float)ref_bf16(src[i]), 1);
    CHECK_MSG(bad == 0, "%d bf16 codes decode wrongly", bad);

    uint8_t b8[256];
    for (int i = 0; i < 256; i++) b8[i] = (uint8_t)i;
    const float scales[] = {1.0f, 0.0123f, 3.7e-5f, 1e-38f, -2.5f, 448.0f};
    for (size_t k = 0; k < sizeof scales / sizeof scales[0]; k++) {
        s->fp8_to_f32(dst, b8, 256, scales[k]);
        bad = 0;
        for (int i = 0; i < 256; i++) {
            if (e4m3_is_nan((uint8_t)i)) {
                bad += !isnan(dst[i]);
                continue;
            }
            float want = (float)ref_e4m3((uint8_t)i) * scales[k]; /* exact value, one rounding */
            bad += !same_float(dst[i], want, 0);
        }
        CHECK_MSG(bad == 0, "%d fp8 codes wrong at scale %g", bad, (double)scales[k]);
    }
    /* landmarks, in case the reference formula and the kernel share a mistake */
    uint8_t lm[] = {0x38, 0x7e, 0x01, 0x08, 0x80, 0xb8};
    float lv[6];
    s->fp8_to_f32(lv, lm, 6, 1.0f);
    CHECK(lv[0] == 1.0f && lv[1] == 448.0f && lv[2] == 0x1p-9f && lv[3] == 0x1p-6f);
    CHECK(lv[4] == 0.0f && signbit(lv[4]) && lv[5] == -1.0f);
    uint16_t hm[] = {0x3c00, 0x0001, 0x7c00, 0xfc00, 0x7bff, 0x3f80};
    s->f16_to_f32(lv, hm, 5);
    CHECK(lv[0] == 1.0f && lv[1] == 0x1p-24f && isinf(lv[2]) && lv[3] < 0 && isinf(lv[3]));
    CHECK(lv[4] == 65504.0f);
    s->bf16_to_f32(lv, hm + 5, 1);
    CHECK(lv[0] == 1.0f);
}

/* ---- 2. every table against scalar ---- */
static void test_conversions(const ds_kernels *k) {
    const ds_kernels *s = ds_kernels_scalar();
    static uint16_t src[65536 + 1];
    static float got[65536 + 32], want[65536 + 32];
    for (int i = 0; i < 65536; i++) src[i] = (uint16_t)i;

    /* every bit pattern */
    int bad = 0;
    k->bf16_to_f32(got, src, 65536);
    s->bf16_to_f32(want, src, 65536);
    for (int i = 0; i < 65536; i++) bad += !same_float(got[i], want[i], 1);
    CHECK_MSG(bad == 0, "%s: %d bf16 codes differ from scalar", k->name, bad);
    bad = 0;
    k->f16_to_f32(got, src, 65536);
    s->f16_to_f32(want, src, 65536);
    for (int i = 0; i < 65536; i++) bad += !same_float(got[i], want[i], 1);
    CHECK_MSG(bad == 0, "%s: %d f16 codes differ from scalar", k->name, bad);

    static uint8_t b8[4097 + 2]; /* all 256 codes first, then the odd-length runs */
    for (int i = 0; i < 256; i++) b8[i] = (uint8_t)i;
    const float scales[] = {1.0f, 0.0123f, 3.7e-5f, 1e-38f, 1e-44f, -2.5f, 7.1e4f, 1e37f, -3e38f};
    for (size_t j = 0; j < sizeof scales / sizeof scales[0]; j++) {
        k->fp8_to_f32(got, b8, 256, scales[j]);
        s->fp8_to_f32(want, b8, 256, scales[j]);
        bad = 0;
        for (int i = 0; i < 256; i++)
            if (!e4m3_is_nan((uint8_t)i)) bad += !same_float(got[i], want[i], 0);
        CHECK_MSG(bad == 0, "%s: %d fp8 codes differ from scalar at scale %g", k->name, bad,
                  (double)scales[j]);
    }

    /* odd lengths, source and destination both off a 64-byte boundary, canary past the end */
    const float canary = -12345.678f;
    DS_ASSERT(sizes[N_SIZES - 1] + 2 <= sizeof b8);
    for (size_t si = 0; si < N_SIZES; si++) {
        size_t n = sizes[si];
        for (size_t i = 0; i < n; i++) src[1 + i] = (uint16_t)rnd64();
        for (size_t i = 0; i < n; i++) {
            b8[1 + i] = (uint8_t)rnd64();
            if (e4m3_is_nan(b8[1 + i])) b8[1 + i] ^= 1; /* SIMD tables need not keep NaN codes */
        }
        int bad_bf = 0, bad_h = 0, bad_8 = 0, bad_canary = 0;
        for (int conv = 0; conv < 3; conv++) {
            for (int i = 0; i < 16; i++) got[1 + n + i] = canary;
            if (conv == 0) {
                k->bf16_to_f32(got + 1, src + 1, n);
                s->bf16_to_f32(want + 1, src + 1, n);
            } else if (conv == 1) {
                k->f16_to_f32(got + 1, src + 1, n);
                s->f16_to_f32(want + 1, src + 1, n);
            } else {
                k->fp8_to_f32(got + 1, b8 + 1, n, 0.37f);
                s->fp8_to_f32(want + 1, b8 + 1, n, 0.37f);
            }
            int *b = conv == 0 ? &bad_bf : conv == 1 ? &bad_h : &bad_8;
            for (size_t i = 1; i <= n; i++) *b += !same_float(got[i], want[i], 1);
            for (int i = 0; i < 16; i++) bad_canary += fbits(got[1 + n + i]) != fbits(canary);
        }
        CHECK_MSG(bad_bf + bad_h + bad_8 == 0, "%s n=%zu: bf16 %d, f16 %d, fp8 %d wrong", k->name,
                  n, bad_bf, bad_h, bad_8);
        CHECK_MSG(bad_canary == 0, "%s n=%zu: a conversion wrote past the end", k->name, n);
    }
}

/* Fills a[0..n) with uniform values in [-1, 1]. */
static void fill(float *a, size_t n) {
    for (size_t i = 0; i < n; i++) a[i] = rnd_uniform(-1.0f, 1.0f);
}

/* The tolerance of an n-long f32 dot product relative to sum |a*b|. Real summation error is
 * ~1e-7 * sqrt(n) relative here; a single lost or doubled element costs ~1/n of the sum, which
 * is above this for every n we test. */
#define DOT_RTOL 2e-6

static void test_dot(const ds_kernels *k) {
    const ds_kernels *s = ds_kernels_scalar();
    size_t maxn = sizes[N_SIZES - 1];
    float *buf = malloc((6 * maxn + 16) * sizeof(float));
    float *a = buf + 1, *b = a + maxn + 1, *w[4];
    for (int r = 0; r < 4; r++) w[r] = b + (size_t)(r + 1) * (maxn + 1) + (size_t)r;
    fill(buf, 6 * maxn + 16);

    for (size_t si = 0; si < N_SIZES; si++) {
        size_t n = sizes[si];
        double ref = 0, sabs = 0;
        for (size_t i = 0; i < n; i++) {
            ref += (double)a[i] * b[i];
            sabs += fabs((double)a[i] * b[i]);
        }
        float d = k->dot_f32(a, b, n), ds = s->dot_f32(a, b, n);
        CHECK_MSG(fabs(d - ref) <= DOT_RTOL * sabs, "%s dot n=%zu: %.9g vs %.9g", k->name, n,
                  (double)d, ref);
        CHECK_MSG(fabs(d - ds) <= 2 * DOT_RTOL * sabs, "%s dot n=%zu: %.9g vs scalar %.9g", k->name,
                  n, (double)d, (double)ds);

        float out[4], outs[4];
        const float *const wc[4] = {w[0], w[1], w[2], w[3]};
        k->dot4_f32(a, wc, n, out);
        s->dot4_f32(a, wc, n, outs);
        for (int r = 0; r < 4; r++) {
            double rr = 0, ra = 0;
            for (size_t i = 0; i < n; i++) {
                rr += (double)a[i] * w[r][i];
                ra += fabs((double)a[i] * w[r][i]);
            }
            CHECK_MSG(fabs(out[r] - rr) <= DOT_RTOL * ra, "%s dot4 n=%zu row %d: %.9g vs %.9g",
                      k->name, n, r, (double)out[r], rr);
            CHECK_MSG(fabs(out[r] - outs[r]) <= 2 * DOT_RTOL * ra,
                      "%s dot4 n=%zu row %d: %.9g vs scalar %.9g", k->name, n, r, (double)out[r],
                      (double)outs[r]);
        }

        /* axpy on an unaligned y with canaries either side: one rounding (FMA) or two */
        enum { PAD = 16 }; /* a full vector of canaries past the end */
        float *y = malloc((n + 1 + PAD) * sizeof(float)), *y0 = malloc(n * sizeof(float));
        float *ys = malloc(n * sizeof(float));
        fill(y + 1, n);
        memcpy(y0, y + 1, n * sizeof(float));
        memcpy(ys, y + 1, n * sizeof(float));
        y[0] = 777.0f;
        for (int i = 0; i < PAD; i++) y[n + 1 + i] = 777.0f;
        const float alpha = -0.8125f;
        k->axpy_f32(y + 1, alpha, a, n);
        s->axpy_f32(ys, alpha, a, n);
        int bad = 0;
        for (size_t i = 0; i < n; i++) {
            double want = (double)y0[i] + (double)alpha * a[i];
            double tol = 2 * FLT_EPSILON * (fabs(y0[i]) + fabs(alpha * a[i]));
            bad += fabs(y[1 + i] - want) > tol || fabs(y[1 + i] - ys[i]) > 2 * tol;
        }
        CHECK_MSG(bad == 0, "%s axpy n=%zu: %d elements wrong", k->name, n, bad);
        int oob = y[0] != 777.0f;
        for (int i = 0; i < PAD; i++) oob += y[n + 1 + i] != 777.0f;
        CHECK_MSG(oob == 0, "%s axpy n=%zu wrote out of bounds", k->name, n);
        free(y);
        free(y0);
        free(ys);
    }
    free(buf);
}

/* The fused decode + dot kernels (dot4_<dtype>, dot4x2_<dtype>; BF16 has no dot4x2, see
 * test_dot4xn_bf16) against a double-precision dot with the decoded weights and against scalar,
 * on odd lengths. Every row and x lives in its own
 * allocation of exactly the bytes it needs, at an offset off any SIMD boundary, so a read past
 * the end is caught by ASan and an alignment assumption by a fault. FP8 runs several block
 * widths with a different scale per block and row, and rows that sit in different row-blocks. */
static uint16_t rnd_f16_bits(void);

typedef struct {
    void *raw[4];
    const void *w[4]; /* the rows, at raw + one element */
} fused_rows;

static void fused_rows_make(fused_rows *f, size_t n, size_t esz, int dtype_kind) {
    for (int r = 0; r < 4; r++) {
        unsigned char *p = malloc((n + 1) * esz);
        f->raw[r] = p;
        f->w[r] = p + esz;
        for (size_t i = 0; i < n; i++) {
            if (dtype_kind == 0) { /* bf16 of a value in [-1, 1] */
                uint16_t h = (uint16_t)(fbits(rnd_uniform(-1, 1)) >> 16);
                memcpy(p + esz * (1 + i), &h, 2);
            } else if (dtype_kind == 1) {
                uint16_t h = rnd_f16_bits();
                memcpy(p + esz * (1 + i), &h, 2);
            } else {
                uint8_t b = (uint8_t)rnd64();
                if (e4m3_is_nan(b)) b ^= 1; /* SIMD tables need not keep NaN codes */
                p[1 + i] = b;
            }
        }
    }
}

static void fused_rows_free(fused_rows *f) {
    for (int r = 0; r < 4; r++) free(f->raw[r]);
}

/* Decoded element i of row r as a double. */
static double fused_elem(const fused_rows *f, int kind, int r, size_t i) {
    if (kind == 2) return ref_e4m3(((const uint8_t *)f->w[r])[i]);
    uint16_t h;
    memcpy(&h, (const unsigned char *)f->w[r] + 2 * i, 2);
    return kind == 0 ? ref_bf16(h) : ref_f16(h);
}

static void test_fused(const ds_kernels *k) {
    const ds_kernels *s = ds_kernels_scalar();
    static const char *const kind_name[3] = {"bf16", "f16", "fp8"};
    for (size_t si = 0; si < N_SIZES; si++) {
        size_t n = sizes[si];
        float *xraw0 = malloc((n + 1) * sizeof(float)), *xraw1 = malloc((n + 1) * sizeof(float));
        const float *x[2] = {xraw0 + 1, xraw1 + 1};
        fill(xraw0 + 1, n);
        fill(xraw1 + 1, n);
        for (int kind = 0; kind < 3; kind++) {
            fused_rows f;
            fused_rows_make(&f, n, kind == 2 ? 1 : 2, kind);
            /* FP8: block widths that cut n into several full blocks and a partial one, or one */
            const size_t blocks[] = {128, 7, 1, n + 5};
            size_t n_blocks_try = kind == 2 ? 4 : 1;
            for (size_t bi = 0; bi < n_blocks_try; bi++) {
                size_t block = blocks[bi], nb = (n + block - 1) / block;
                float *sraw[4];
                const float *sc[4];
                for (int r = 0; r < 4; r++) {
                    sraw[r] = malloc((nb + 1) * sizeof(float));
                    for (size_t j = 0; j < nb; j++)
                        sraw[r][1 + j] = 1e-3f * (float)(1 + r + 4 * j) * (j % 2 ? -1.75f : 1.0f);
                    sc[r] = sraw[r] + 1;
                }
                float got[8], want[8], got1[8], want1[8];
                if (kind == 2) {
                    const uint8_t *const w8[4] = {f.w[0], f.w[1], f.w[2], f.w[3]};
                    k->dot4x2_fp8(x[0], x[1], w8, sc, n, block, got);
                    s->dot4x2_fp8(x[0], x[1], w8, sc, n, block, want);
                    k->dot4_fp8(x[0], w8, sc, n, block, got1);
                    k->dot4_fp8(x[1], w8, sc, n, block, got1 + 4);
                    s->dot4_fp8(x[0], w8, sc, n, block, want1);
                    s->dot4_fp8(x[1], w8, sc, n, block, want1 + 4);
                } else {
                    const uint16_t *const w16[4] = {f.w[0], f.w[1], f.w[2], f.w[3]};
                    void (*k1)(const float *, const uint16_t *const[4], size_t, float[4]) =
                        kind == 0 ? k->dot4_bf16 : k->dot4_f16;
                    void (*s1)(const float *, const uint16_t *const[4], size_t, float[4]) =
                        kind == 0 ? s->dot4_bf16 : s->dot4_f16;
                    k1(x[0], w16, n, got1);
                    k1(x[1], w16, n, got1 + 4);
                    s1(x[0], w16, n, want1);
                    s1(x[1], w16, n, want1 + 4);
                    if (kind == 1) {
                        k->dot4x2_f16(x[0], x[1], w16, n, got);
                        s->dot4x2_f16(x[0], x[1], w16, n, want);
                    }
                }
                const int pair = kind != 0; /* BF16 has no pair kernel */
                int bad = 0;
                double worst = 0;
                for (int o = 0; o < 8; o++) {
                    int t = o / 4, r = o % 4;
                    double ref = 0, sabs = 0;
                    for (size_t i = 0; i < n; i++) {
                        double sv = kind == 2 ? sc[r][i / block] : 1.0;
                        double pr = (double)x[t][i] * fused_elem(&f, kind, r, i) * sv;
                        ref += pr;
                        sabs += fabs(pr);
                    }
                    double tol = DOT_RTOL * (sabs > 0 ? sabs : 1);
                    const float *vals[4] = {got1, want1, got, want};
                    for (int v = 0; v < (pair ? 4 : 2); v++) {
                        double e = fabs(vals[v][o] - ref);
                        if (e / (sabs > 0 ? sabs : 1) > worst) worst = e / (sabs > 0 ? sabs : 1);
                        bad += !(e <= tol);
                    }
                    if (!pair) continue;
                    bad += !(fabs(got[o] - want[o]) <= 2 * tol);
                    /* scalar's pair kernel is the one-token kernel run twice, bit for bit */
                    bad += fbits(want[o]) != fbits(want1[o]);
                }
                CHECK_MSG(bad == 0, "%s fused %s n=%zu block=%zu: %d wrong (worst rel err %.3g)",
                          k->name, kind_name[kind], n, block, bad, worst);
                for (int r = 0; r < 4; r++) free(sraw[r]);
            }
            fused_rows_free(&f);
        }
        free(xraw0);
        free(xraw1);
    }
}

/* ---- 3. matmul ---- */
typedef struct {
    int64_t rows, cols, block_rows, block_cols;
} shape;

/* Weights of one dtype in a byte buffer at an awkward offset, plus their exact f32 values. */
typedef struct {
    ds_mat m;
    unsigned char *raw; /* owns m.data */
    float *scale;       /* owns m.scale */
    float *deq;         /* [rows, cols] the reference dequantisation */
    int8_t *qv;         /* DS_I8: [rows, cols] the stored integers (int4 unpacked) */
    float *act;         /* static DS_I8: owns m.act_scale, m.act_zp and m.bias */
} test_mat;

static uint16_t rnd_f16_bits(void) { /* finite: no inf / NaN */
    uint16_t sign = (uint16_t)((rnd64() & 1) << 15), m = (uint16_t)(rnd64() & 0x3ff);
    /* exponents 0 (subnormals) and 5..16: values up to ~4, no inf / NaN */
    uint16_t e = (rnd64() % 8 == 0) ? 0 : (uint16_t)(5 + rnd64() % 12);
    return (uint16_t)(sign | (e << 10) | m);
}

static void make_mat(test_mat *t, ds_dtype dt, shape sh) {
    memset(t, 0, sizeof *t);
    size_t n = (size_t)(sh.rows * sh.cols), esz = ds_dtype_size(dt);
    size_t off = dt == DS_F32 ? 4 : dt == DS_F8_E4M3 ? 1 : 2; /* naturally but not SIMD aligned */
    t->raw = malloc(n * esz + off + 1);
    t->deq = malloc((n ? n : 1) * sizeof(float));
    unsigned char *p = t->raw + off;
    int64_t nrb = (sh.rows + sh.block_rows - 1) / sh.block_rows;
    int64_t ncb = (sh.cols + sh.block_cols - 1) / sh.block_cols;
    if (dt == DS_F8_E4M3) {
        t->scale = malloc((size_t)(nrb * ncb) * sizeof(float));
        /* a different scale in every block, in a pattern no row- or column-only index recovers */
        for (int64_t i = 0; i < nrb * ncb; i++)
            t->scale[i] = 1e-3f * (float)(1 + i) * (i % 2 ? 1.75f : 1.0f);
    }
    for (size_t i = 0; i < n; i++) {
        size_t r = i / (size_t)sh.cols, c = i % (size_t)sh.cols;
        float v;
        if (dt == DS_F32) {
            v = rnd_uniform(-1, 1);
            memcpy(p + 4 * i, &v, 4);
        } else if (dt == DS_BF16) {
            uint16_t h = (uint16_t)(fbits(rnd_uniform(-1, 1)) >> 16);
            memcpy(p + 2 * i, &h, 2);
            v = (float)ref_bf16(h);
        } else if (dt == DS_F16) {
            uint16_t h = rnd_f16_bits();
            memcpy(p + 2 * i, &h, 2);
            v = (float)ref_f16(h);
        } else {
            uint8_t b = (uint8_t)rnd64();
            if (e4m3_is_nan(b)) b ^= 1;
            p[i] = b;
            float sc = t->scale[(int64_t)r / sh.block_rows * ncb + (int64_t)c / sh.block_cols];
            v = (float)ref_e4m3(b) * sc; /* exact value times scale, rounded once in f32 */
        }
        t->deq[i] = v;
    }
    t->m = (ds_mat){.dtype = dt,
                    .rows = sh.rows,
                    .cols = sh.cols,
                    .data = p,
                    .scale = t->scale,
                    .block_rows = sh.block_rows,
                    .block_cols = sh.block_cols};
}

static void free_mat(test_mat *t) {
    free(t->raw);
    free(t->scale);
    free(t->deq);
    free(t->qv);
    free(t->act);
}

/* Makes an int8 per-channel matrix static (ds_mat.act_n): a step and zero point per tensor or
 * per column, chosen so that x in [-1, 1] overflows both ends of int8 (the clamp and -128,
 * which AVX2's dot4_i8 cannot take, occur), and a per-row bias. */
static void make_static(test_mat *t, int per_channel) {
    int64_t cols = t->m.cols, rows = t->m.rows, n = per_channel ? cols : 1;
    t->act = malloc((size_t)(2 * n + rows) * sizeof(float));
    float *sc = t->act, *zp = sc + n, *bias = zp + n;
    for (int64_t i = 0; i < n; i++) {
        sc[i] = (1.0f + (float)(i % 5)) / 600.0f;
        zp[i] = (float)((i * 37) % 41) - 20.0f;
    }
    for (int64_t r = 0; r < rows; r++) bias[r] = rnd_uniform(-2, 2);
    for (int64_t r = 0; r < rows; r++)
        for (int64_t c = 0; c < cols; c++)
            t->deq[r * cols + c] =
                (float)t->qv[r * cols + c] * t->scale[r] / sc[per_channel ? c : 0];
    t->m.act_n = n;
    t->m.act_scale = sc;
    t->m.act_zp = zp;
    t->m.bias = bias;
}

/* DS_I8 weights: int8 over the whole range (-128 included) or int4 packed (int4 = 1), a
 * different scale per block, at an odd byte offset. */
static void make_mat_i8(test_mat *t, shape sh, int int4) {
    memset(t, 0, sizeof *t);
    size_t rows = (size_t)sh.rows, cols = (size_t)sh.cols, rowb = int4 ? (cols + 1) / 2 : cols;
    int64_t nrb = (sh.rows + sh.block_rows - 1) / sh.block_rows;
    int64_t ncb = (sh.cols + sh.block_cols - 1) / sh.block_cols;
    t->raw = calloc(rows * rowb + 2, 1);
    t->deq = malloc((rows * cols > 0 ? rows * cols : 1) * sizeof(float));
    t->qv = malloc(rows * cols > 0 ? rows * cols : 1);
    t->scale = malloc((size_t)(nrb * ncb) * sizeof(float));
    for (int64_t i = 0; i < nrb * ncb; i++)
        t->scale[i] = 1e-3f * (float)(1 + i) * (i % 2 ? 1.75f : 1.0f);
    unsigned char *p = t->raw + 1;
    for (size_t r = 0; r < rows; r++)
        for (size_t c = 0; c < cols; c++) {
            int v = int4 ? (int)(rnd64() % 16) - 8 : (int)(rnd64() % 256) - 128;
            if (int4)
                p[r * rowb + c / 2] |= (uint8_t)((v & 15) << (c % 2 ? 4 : 0));
            else
                p[r * rowb + c] = (uint8_t)v;
            t->qv[r * cols + c] = (int8_t)v;
            float sc = t->scale[(int64_t)r / sh.block_rows * ncb + (int64_t)c / sh.block_cols];
            t->deq[r * cols + c] = (float)v * sc;
        }
    t->m = (ds_mat){.dtype = DS_I8,
                    .rows = sh.rows,
                    .cols = sh.cols,
                    .data = p,
                    .scale = t->scale,
                    .block_rows = sh.block_rows,
                    .block_cols = sh.block_cols,
                    .int4 = int4};
}

/* A matmul big enough that 2 threads cut it into tapered slices (matmul.c, MM_SLICE_WORK): BF16
 * (the blocked path lm_head takes) and per-channel int8 (the GEMM), 128 tokens, bit for bit the
 * one-thread result, every output written once (y starts as NaN), nothing past y. */
static void check_tapered(ds_pool *p1) {
    ds_pool *p2 = ds_pool_open(2);
    CHECK(p2 != NULL);
    if (!p2) return;
    const int64_t rows = 1024, cols = 2048, nt = 128;
    for (int i8 = 0; i8 < 2; i8++) {
        test_mat t;
        if (i8)
            make_mat_i8(&t, (shape){rows, cols, 1, cols}, 0);
        else
            make_mat(&t, DS_BF16, (shape){rows, cols, 128, 128});
        float *x = malloc((size_t)(nt * cols) * sizeof(float));
        float *y1 = malloc((size_t)(nt * rows + 1) * sizeof(float));
        float *y2 = malloc((size_t)(nt * rows + 1) * sizeof(float));
        fill(x, (size_t)(nt * cols));
        for (int64_t i = 0; i < nt * rows; i++) y1[i] = y2[i] = NAN;
        y1[nt * rows] = y2[nt * rows] = 999.0f;
        ds_matmul(p1, y1, x, nt, &t.m);
        ds_matmul(p2, y2, x, nt, &t.m);
        int unset = 0;
        for (int64_t i = 0; i < nt * rows; i++) unset += isnan(y1[i]);
        CHECK_MSG(unset == 0 && memcmp(y1, y2, (size_t)(nt * rows) * sizeof(float)) == 0,
                  "%s: tapered slices on 2 threads differ from 1 thread", i8 ? "I8" : "BF16");
        CHECK_MSG(y2[nt * rows] == 999.0f, "%s: tapered slices wrote past y", i8 ? "I8" : "BF16");
        free(x);
        free(y1);
        free(y2);
        free_mat(&t);
    }
    ds_pool_close(p2);
}

/* A job's argmax across tapered slices (BF16's blocked path, tile by tile; the int8 GEMM, slice
 * by slice), 128 tokens on 2 threads, against a pass over its y: rows 600 and 900 are equal and
 * every token's largest (the lower must win, from another slice), and row 800 is infinite (a
 * BF16 weight of column 0 / an int8 row's scale), so tokens get +inf, -inf or NaN there. */
static void check_tapered_argmax(void) {
    ds_pool *p2 = ds_pool_open(2);
    CHECK(p2 != NULL);
    if (!p2) return;
    const int64_t rows = 1024, cols = 2048, nt = 128;
    float *x = malloc((size_t)(nt * cols) * sizeof(float));
    float *y = malloc((size_t)(nt * rows) * sizeof(float));
    int32_t am[128];
    for (int64_t t = 0; t < nt; t++)
        for (int64_t c = 0; c < cols; c++) /* column 0 positive, negative or 0 by token */
            x[t * cols + c] = c ? rnd_uniform(0.25f, 1.0f) : (float)(t % 3) - 1.0f;
    for (int i8 = 0; i8 < 2; i8++) {
        test_mat t;
        if (i8) {
            make_mat_i8(&t, (shape){rows, cols, 1, cols}, 0);
            memset((int8_t *)t.m.data + 600 * cols, 127, (size_t)cols);
            memset((int8_t *)t.m.data + 900 * cols, 127, (size_t)cols);
            t.scale[900] = t.scale[600];
            t.scale[800] = INFINITY;
        } else {
            make_mat(&t, DS_BF16, (shape){rows, cols, 128, 128});
            uint16_t *w = (uint16_t *)t.m.data; /* 2-byte aligned (make_mat) */
            for (int64_t c = 0; c < cols; c++) w[600 * cols + c] = w[900 * cols + c] = 0x3f80;
            w[800 * cols] = 0x7f80;
        }
        ds_mm_job j = {y, x, nt, &t.m, am};
        ds_matmul_jobs(p2, &j, 1);
        int bad = 0, tie = 0, inf = 0, nan = 0;
        for (int64_t k = 0; k < nt; k++) {
            const float *yt = y + k * rows;
            bad += am[k] != ds_kernels_scalar()->argmax_f32(yt, (size_t)rows);
            tie += am[k] == 600 && yt[900] == yt[600];
            inf += am[k] == 800 && yt[800] == INFINITY;
            nan += am[k] == 800 && isnan(yt[800]);
        }
        CHECK_MSG(bad == 0, "%s: argmax over tapered slices wrong in %d tokens", i8 ? "I8" : "BF16",
                  bad);
        CHECK_MSG(tie > 0 && inf > 0 && (i8 || nan > 0),
                  "%s: the argmax cases did not occur (%d ties, %d inf, %d NaN)",
                  i8 ? "I8" : "BF16", tie, inf, nan);
        free_mat(&t);
    }
    free(x);
    free(y);
    ds_pool_close(p2);
}

/* ds_matmul_jobs: jobs of every dtype and path (fused, float GEMM, int8 dot and GEMM, int4,
 * static activations), token counts from 0 to 40, and jobs reading the x of the job before, as a
 * MoE's gate and up read theirs: the same quantization shared (jobs 4, 12, 14) or not shareable,
 * each for one reason against the jobs before it (block width; another width of as many blocks;
 * int4; static scales; another zero point; more tokens; fewer tokens on another path: jobs
 * 5 - 11); each equal bit for bit to its own ds_matmul, on pools of 1 and 3 threads. */
static void check_matmul_jobs(ds_pool *p1, ds_pool *p3) {
    enum { NJ = 17 };
    test_mat t[NJ];
    make_mat(&t[0], DS_BF16, (shape){37, 300, 128, 128});
    make_mat(&t[1], DS_F32, (shape){20, 64, 128, 128});
    make_mat(&t[2], DS_F8_E4M3, (shape){130, 257, 128, 128});
    make_mat_i8(&t[3], (shape){45, 300, 1, 300}, 0);
    make_mat_i8(&t[4], (shape){29, 300, 1, 300}, 0);
    make_mat_i8(&t[5], (shape){21, 300, 1, 100}, 0);
    make_mat_i8(&t[6], (shape){25, 300, 1, 128}, 0);
    make_mat_i8(&t[7], (shape){18, 300, 1, 300}, 1);
    make_mat_i8(&t[8], (shape){33, 300, 1, 300}, 0);
    make_static(&t[8], 0);
    make_mat_i8(&t[9], (shape){27, 300, 1, 300}, 0);
    make_static(&t[9], 0);
    t[9].m.act_scale = t[8].m.act_scale; /* job 8's scale, its own zero point */
    t[9].act[1] += 3.0f;
    make_mat_i8(&t[10], (shape){19, 300, 1, 300}, 0);
    make_mat_i8(&t[11], (shape){129, 300, 1, 300}, 0);
    make_mat_i8(&t[12], (shape){15, 300, 1, 300}, 0);
    make_mat_i8(&t[13], (shape){70, 257, 1, 64}, 1);
    make_mat_i8(&t[14], (shape){70, 257, 1, 64}, 1);
    make_mat_i8(&t[15], (shape){33, 300, 1, 300}, 0);
    make_static(&t[15], 1);
    make_mat(&t[16], DS_BF16, (shape){16, 300, 128, 128});
    const int64_t toks[NJ] = {40, 9, 17, 4, 4, 4, 4, 4, 4, 4, 6, 1, 1, 3, 3, 5, 0};
    const int from[NJ] = {-1, -1, -1, -1, 3, 3, 3, 3, 3, 3, 3, 3, 3, -1, 13, -1, -1};
    float *x[NJ], *want[NJ], *got[NJ];
    int32_t am[NJ][41];
    ds_mm_job jobs[NJ];
    for (int i = 0; i < NJ; i++) {
        size_t nx = (size_t)(toks[i] * t[i].m.cols), ny = (size_t)(toks[i] * t[i].m.rows);
        if (from[i] < 0) { /* room for 8 tokens at least: a reader may take more */
            size_t room = nx > (size_t)(8 * t[i].m.cols) ? nx : (size_t)(8 * t[i].m.cols);
            x[i] = malloc((room ? room : 1) * sizeof(float));
            fill(x[i], room);
        } else {
            x[i] = x[from[i]];
        }
        want[i] = malloc((ny + 1) * sizeof(float));
        got[i] = malloc((ny + 1) * sizeof(float));
        ds_matmul(p1, want[i], x[i], toks[i], &t[i].m);
    }
    for (int pi = 0; pi < 2; pi++) {
        for (int i = 0; i < NJ; i++) {
            size_t ny = (size_t)(toks[i] * t[i].m.rows);
            for (size_t j = 0; j <= ny; j++) got[i][j] = 999.0f;
            /* every other job asks for argmax too: up to 40 tokens, one slot past */
            for (int j = 0; j < 41; j++) am[i][j] = -2;
            jobs[i] = (ds_mm_job){got[i], x[i], toks[i], &t[i].m, i % 2 == pi ? am[i] : NULL};
        }
        ds_matmul_jobs(pi ? p3 : p1, jobs, NJ);
        for (int i = 0; i < NJ; i++) {
            size_t ny = (size_t)(toks[i] * t[i].m.rows);
            CHECK_MSG(memcmp(got[i], want[i], ny * sizeof(float)) == 0,
                      "ds_matmul_jobs (%d threads): job %d differs from its ds_matmul", pi ? 3 : 1,
                      i);
            CHECK_MSG(got[i][ny] == 999.0f, "ds_matmul_jobs: job %d wrote past its y", i);
            int bad = 0;
            for (int64_t j = 0; j < toks[i]; j++)
                bad += jobs[i].argmax &&
                       am[i][j] != ds_kernels_scalar()->argmax_f32(got[i] + j * t[i].m.rows,
                                                                   (size_t)t[i].m.rows);
            bad += am[i][toks[i]] != -2; /* nothing past its tokens */
            CHECK_MSG(bad == 0, "ds_matmul_jobs (%d threads): job %d's argmax wrong in %d tokens",
                      pi ? 3 : 1, i, bad);
        }
    }
    ds_matmul_jobs(p3, jobs, 0); /* no jobs: nothing to do */
    for (int i = 0; i < NJ; i++) {
        if (from[i] < 0) free(x[i]);
        free(want[i]);
        free(got[i]);
        free_mat(&t[i]);
    }
}

/* Each token's rows of y (one call over nt tokens of x) equal the rows it gets alone. */
static void check_alone(ds_pool *p, const ds_mat *m, const float *x, const float *y, int64_t nt,
                        const char *what) {
    float *yt = malloc((size_t)m->rows * sizeof(float));
    int differ = 0;
    for (int64_t tk = 0; tk < nt; tk++) {
        ds_matmul(p, yt, x + tk * m->cols, 1, m);
        differ += memcmp(yt, y + tk * m->rows, (size_t)m->rows * sizeof(float)) != 0;
    }
    CHECK_MSG(differ == 0, "%s n_tok=%lld: %d tokens differ from their one-token rows", what,
              (long long)nt, differ);
    free(yt);
}

/* ds_matmul on DS_I8 against a double product computed from the same quantized activations
 * (ds_quantize_row_i8 / _static are checked on their own) and the stored integers: exact integer
 * sums per block, so only the f32 conversion and accumulation differ, ~1e-7 relative. */
static void check_matmul_i8(const test_mat *t, ds_pool *p1, ds_pool *p3, const char *what) {
    int64_t rows = t->m.rows, cols = t->m.cols, bc = t->m.block_cols, br = t->m.block_rows;
    int64_t ncb = (cols + bc - 1) / bc;
    const int64_t toks[] = {1, 2, 3, 4, 5, 7, 8, 17, 40};
    for (size_t ti = 0; ti < sizeof toks / sizeof toks[0]; ti++) {
        int64_t nt = toks[ti];
        float *x = malloc((size_t)(nt * cols) * sizeof(float));
        float *y1 = malloc((size_t)(nt * rows + 1) * sizeof(float));
        float *y3 = malloc((size_t)(nt * rows + 1) * sizeof(float));
        int8_t *q = malloc((size_t)cols);
        fill(x, (size_t)(nt * cols));
        y1[nt * rows] = y3[nt * rows] = 999.0f;
        ds_matmul(p1, y1, x, nt, &t->m);
        ds_matmul(p3, y3, x, nt, &t->m);
        int bad = 0;
        double worst = 0;
        for (int64_t tk = 0; tk < nt; tk++) {
            float sx = 1;
            if (t->m.act_n)
                ds_quantize_row_static(x + tk * cols, cols, t->m.act_scale, t->m.act_zp,
                                       t->m.act_n > 1, q);
            else
                ds_quantize_row_i8(x + tk * cols, cols, q, &sx);
            for (int64_t r = 0; r < rows; r++) {
                double ref = t->m.bias ? t->m.bias[r] : 0, sabs = fabs(ref);
                for (int64_t b = 0; b < ncb; b++) {
                    int64_t is = 0;
                    for (int64_t cc = b * bc; cc < cols && cc < (b + 1) * bc; cc++)
                        is += (int64_t)q[cc] * t->qv[r * cols + cc];
                    double term = (double)sx * t->scale[(r / br) * ncb + b] * (double)is;
                    ref += term;
                    sabs += fabs(term);
                }
                double err = fabs(y1[tk * rows + r] - ref) / (sabs > 0 ? sabs : 1);
                if (err > worst) worst = err;
                bad += !(err <= 1e-5) || (sabs == 0 && y1[tk * rows + r] != 0);
            }
        }
        CHECK_MSG(bad == 0, "%s n_tok=%lld: %d outputs wrong (worst rel err %.3g)", what,
                  (long long)nt, bad, worst);
        CHECK_MSG(memcmp(y1, y3, (size_t)(nt * rows) * sizeof(float)) == 0,
                  "%s n_tok=%lld: 1 and 3 threads disagree", what, (long long)nt);
        CHECK_MSG(y1[nt * rows] == 999.0f && y3[nt * rows] == 999.0f, "%s n_tok=%lld: wrote past y",
                  what, (long long)nt);
        /* per-channel int8: every path rounds s_w * isum, then times s_x, so a token's rows do
         * not depend on the tokens beside it (docs/sampling.md) */
        if (!t->m.int4 && bc >= cols) check_alone(p1, &t->m, x, y1, nt, what);
        free(x);
        free(y1);
        free(y3);
        free(q);
    }
}

static void check_rows(const test_mat *t, const char *what) {
    int64_t rows = t->m.rows, cols = t->m.cols;
    float *buf = malloc((size_t)(cols + 1) * sizeof(float));
    const int64_t rsel[] = {0, rows / 2, rows - 1};
    int bad = 0;
    for (int i = 0; i < 3; i++) {
        int64_t r = rsel[i];
        buf[cols] = 555.0f;
        ds_mat_row_f32(&t->m, r, buf);
        for (int64_t c = 0; c < cols; c++) bad += !same_float(buf[c], t->deq[r * cols + c], 0);
        bad += buf[cols] != 555.0f;
        /* pieces that start and end inside blocks and cross block boundaries */
        const int64_t parts[][2] = {{0, 1},    {1, cols - 1}, {cols / 2, cols - cols / 2},
                                    {100, 60}, {127, 2},      {130, 70},
                                    {63, 66},  {cols - 1, 1}, {5, 0}};
        for (size_t j = 0; j < sizeof parts / sizeof parts[0]; j++) {
            int64_t c0 = parts[j][0], n = parts[j][1];
            if (c0 + n > cols) continue;
            buf[n] = 555.0f;
            ds_mat_row_part_f32(&t->m, r, c0, n, buf);
            for (int64_t c = 0; c < n; c++)
                bad += !same_float(buf[c], t->deq[r * cols + c0 + c], 0);
            bad += buf[n] != 555.0f;
        }
    }
    CHECK_MSG(bad == 0, "%s: %d row elements differ from the reference dequantisation", what, bad);
    free(buf);
}

static void check_matmul(const test_mat *t, ds_pool *p1, ds_pool *p3, const char *what) {
    int64_t rows = t->m.rows, cols = t->m.cols;
    /* 1..5: the fused path for BF16 / F16 / FP8 (single tokens, pairs, BF16 fours) and the tiled
     * one for F32; 17: fused for BF16 / F16, the float GEMM for F32 / FP8; 33: the float GEMM for
     * all (the tiled path on tables without it) but BF16, fused at any count (4097 columns: in
     * two blocks of tokens) */
    const int64_t toks[] = {1, 2, 3, 4, 5, 17, 33};
    for (size_t ti = 0; ti < sizeof toks / sizeof toks[0]; ti++) {
        int64_t nt = toks[ti];
        float *x = malloc((size_t)(nt * cols) * sizeof(float));
        float *y1 = malloc((size_t)(nt * rows + 1) * sizeof(float));
        float *y3 = malloc((size_t)(nt * rows + 1) * sizeof(float));
        fill(x, (size_t)(nt * cols));
        y1[nt * rows] = y3[nt * rows] = 999.0f;
        ds_matmul(p1, y1, x, nt, &t->m);
        ds_matmul(p3, y3, x, nt, &t->m);
        int bad = 0;
        double worst = 0;
        for (int64_t tk = 0; tk < nt; tk++)
            for (int64_t r = 0; r < rows; r++) {
                double ref = 0, sabs = 0;
                for (int64_t c = 0; c < cols; c++) {
                    double pr = (double)x[tk * cols + c] * t->deq[r * cols + c];
                    ref += pr;
                    sabs += fabs(pr);
                }
                double err = fabs(y1[tk * rows + r] - ref) / (sabs > 0 ? sabs : 1);
                if (err > worst) worst = err;
                bad += !(err <= DOT_RTOL) || (sabs == 0 && y1[tk * rows + r] != 0);
            }
        CHECK_MSG(bad == 0, "%s n_tok=%lld: %d outputs wrong (worst rel err %.3g)", what,
                  (long long)nt, bad, worst);
        /* a row's arithmetic does not depend on which thread computes it */
        CHECK_MSG(memcmp(y1, y3, (size_t)(nt * rows) * sizeof(float)) == 0,
                  "%s n_tok=%lld: 1 and 3 threads disagree", what, (long long)nt);
        CHECK_MSG(y1[nt * rows] == 999.0f && y3[nt * rows] == 999.0f, "%s n_tok=%lld: wrote past y",
                  what, (long long)nt);
        /* BF16 (the fused path at every count): each token's row is the one it gets alone */
        if (t->m.dtype == DS_BF16) check_alone(p3, &t->m, x, y1, nt, what);
        free(x);
        free(y1);
        free(y3);
    }
}

/* ds_mat_interleave on a copy of t (BF16 or int8): where the shape allows it lays the rows out
 * as expected (int8 panels: rows of 16, columns and scale blocks of whole 4-column groups, a
 * table with its own GEMM; else by fours: rows of whole 64-byte pieces, 4 rows or more, BF16
 * where the table reads it fused, int8 with scale blocks of whole pieces), and then rows, every
 * token count's matmul (BF16's fused and blocked paths, int8's dot4 and GEMM ones, every width of
 * the GEMM kernel on panels) and a slice at a block boundary give exactly the floats of the
 * row-major matrix. */
static void check_interleaved(const test_mat *t, ds_pool *p1, ds_pool *p3, const char *what) {
    const int64_t rows = t->m.rows, cols = t->m.cols, bc = t->m.block_cols;
    const size_t bytes = (size_t)rows * (t->m.int4 ? (size_t)(cols + 1) / 2
                                                   : (size_t)cols * ds_dtype_size(t->m.dtype));
    test_mat c = *t;
    c.raw = malloc(bytes + 1); /* off a 4-byte boundary, as make_mat's */
    memcpy(c.raw + 1, t->m.data, bytes);
    c.m.data = c.raw + 1;
    const int ok = ds_mat_interleave(&c.m);
    const int i8 = t->m.dtype == DS_I8 && !t->m.int4;
    const int panels = i8 && rows % 16 == 0 && cols % 4 == 0 && (bc >= cols || bc % 4 == 0) &&
                       ds_kernels_get()->gemm16x8_i8 != ds_kernels_scalar()->gemm16x8_i8;
    const int fours = rows >= 4 && (t->m.dtype == DS_BF16
                                        ? cols % 32 == 0 && strcmp(ds_kernels_get()->name, "neon")
                                        : i8 && cols % 64 == 0 && (bc >= cols || bc % 64 == 0));
    const int can = panels ? DS_ILV_PANELS : fours ? DS_ILV_FOURS : DS_ILV_NONE;
    CHECK_MSG(ok == can && c.m.ilv == ok, "%s: interleaved %d, expected %d", what, ok, can);
    if (ok) {
        CHECK_MSG(memcmp(c.m.data, t->m.data, bytes) != 0, "%s: interleaving moved nothing", what);
        char w2[128];
        snprintf(w2, sizeof w2, "%s interleaved", what);
        check_rows(&c, w2);
        const int64_t toks[] = {1, 2, 3, 4, 5, 8, 33, 130};
        for (size_t ti = 0; ti < sizeof toks / sizeof toks[0]; ti++) {
            /* panels run the GEMM at every count: the row-major reference runs it too, on the
             * tokens and more (the dot4 path sums blocks of scales in another order) */
            const int64_t nt = toks[ti], nr = ok == DS_ILV_PANELS && nt < 8 ? 8 : nt;
            float *x = malloc((size_t)(nr * cols) * sizeof(float));
            float *y = malloc((size_t)(nr * rows) * sizeof(float));
            float *yi = malloc((size_t)(nt * rows) * sizeof(float));
            fill(x, (size_t)(nr * cols));
            ds_matmul(p1, y, x, nr, &t->m);
            ds_matmul(p3, yi, x, nt, &c.m);
            CHECK_MSG(memcmp(y, yi, (size_t)(nt * rows) * sizeof(float)) == 0,
                      "%s n_tok=%lld: differs from the row-major matrix", w2, (long long)nt);
            const int64_t cut = ok == DS_ILV_PANELS ? 16 : 4; /* from the second block on */
            ds_mat a = t->m, b = c.m;
            ds_mat_slice_rows(&a, cut, rows);
            ds_mat_slice_rows(&b, cut, rows);
            ds_matmul(p1, y, x, nr, &a);
            ds_matmul(p3, yi, x, nt, &b);
            CHECK_MSG(memcmp(y, yi, (size_t)(nt * (rows - cut)) * sizeof(float)) == 0,
                      "%s n_tok=%lld: a slice differs from the row-major one", w2, (long long)nt);
            free(x);
            free(y);
            free(yi);
        }
    }
    free(c.raw);
}

/* Rows and matmuls of every dtype and shape with the table ds_kernels_get() chose. */
static void matmul_suite(void) {
    ds_pool *p1 = ds_pool_open(1), *p3 = ds_pool_open(3);
    CHECK(p1 && p3);
    if (!p1 || !p3) return;
    const shape shapes[] = {
        {300, 200, 128, 128}, /* scale grid [3, 2], partial edge blocks */
        {301, 203, 128, 128}, /* plus a tail row block of 1 */
        {7, 129, 4, 64},      /* blocks that are not square: row and column indices differ */
        {130, 70, 64, 32},    /* grid [3, 3] */
        {1, 1, 128, 128},      {6, 4097, 128, 1000},
        {301, 1024, 128, 128}, /* BF16 rows of one chunk: a token alone walks them one by one;
                                  more tokens on one thread take several row blocks */
        {37, 96, 128, 128},    /* BF16 interleaved: three pieces a row, a tail row */
        {12, 4096, 128, 128},  /* BF16 interleaved: rows of four chunks */
    };
    const ds_dtype dts[] = {DS_F32, DS_BF16, DS_F16, DS_F8_E4M3};
    for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++)
        for (size_t di = 0; di < 4; di++) {
            test_mat t;
            make_mat(&t, dts[di], shapes[si]);
            char what[96];
            snprintf(what, sizeof what, "%s %s %lldx%lld", ds_kernels_get()->name,
                     ds_dtype_name(dts[di]), (long long)shapes[si].rows,
                     (long long)shapes[si].cols);
            check_rows(&t, what);
            check_matmul(&t, p1, p3, what);
            if (dts[di] == DS_BF16) check_interleaved(&t, p1, p3, what);
            free_mat(&t);
        }
    /* DS_I8: per-channel W8A8 (one block per row, also wider than a kernel chunk; at 40 tokens
     * 100 x 14000 takes the GEMM's multi-panel groups), 128 x 128 blocks, int4 with groups of 128
     * and 64 on odd column counts, blocks straddling chunks */
    const struct {
        shape sh;
        int int4;
    } i8s[] = {
        {{37, 200, 1, 200}, 0},
        {{33, 4097, 1, 4097}, 0},
        {{301, 203, 128, 128}, 0},
        {{7, 129, 4, 64}, 0},
        {{35, 5000, 1, 3000}, 0},
        {{45, 301, 1, 128}, 1},
        {{70, 257, 1, 64}, 1},
        {{9, 4097, 1, 4097}, 1},
        {{13, 131, 1, 131}, 1},
        {{1, 1, 1, 1}, 1},
        {{1, 1, 1, 128}, 0},
        {{21, 50, 1, 6}, 1},
        {{19, 45, 1, 10}, 0},
        {{40, 1030, 1, 132}, 1},
        {{100, 14000, 1, 14000}, 0},
        /* interleaved by fours too (check_interleaved): per channel, 128 x 128 blocks */
        {{37, 1024, 1, 1024}, 0},
        {{24, 2048, 128, 128}, 0},
        {{130, 384, 1, 384}, 0},
        {{12, 4096, 1, 4096}, 0},
        {{8, 4352, 128, 128}, 0},
        /* in panels where the table has its own GEMM: per channel, columns not whole 64-byte
         * pieces, 128 x 128 blocks, blocks of 36 columns */
        {{32, 1024, 1, 1024}, 0},
        {{48, 200, 1, 200}, 0},
        {{16, 2048, 128, 128}, 0},
        {{32, 144, 1, 36}, 0},
    };
    for (size_t i = 0; i < sizeof i8s / sizeof i8s[0]; i++) {
        test_mat t;
        make_mat_i8(&t, i8s[i].sh, i8s[i].int4);
        char what[96];
        snprintf(what, sizeof what, "%s %s %lldx%lld block %lldx%lld", ds_kernels_get()->name,
                 i8s[i].int4 ? "I4" : "I8", (long long)i8s[i].sh.rows, (long long)i8s[i].sh.cols,
                 (long long)i8s[i].sh.block_rows, (long long)i8s[i].sh.block_cols);
        if (i8s[i].sh.cols >= 200) check_rows(&t, what);
        check_matmul_i8(&t, p1, p3, what);
        check_interleaved(&t, p1, p3, what);
        free_mat(&t);
    }
    /* static activations (Ascend W8A8): per tensor and per channel, one kernel chunk and a row
     * wider than a chunk (the int32 partials summed over chunks before the bias) */
    const shape sts[] = {{37, 200, 1, 200},
                         {33, 4097, 1, 4097},
                         {20, 300, 1, 300},
                         {20, 512, 1, 512},
                         {32, 512, 1, 512}};
    for (size_t i = 0; i < sizeof sts / sizeof sts[0]; i++)
        for (int pc = 0; pc < 2; pc++) {
            test_mat t;
            make_mat_i8(&t, sts[i], 0);
            make_static(&t, pc);
            char what[96];
            snprintf(what, sizeof what, "%s static I8 %lldx%lld per %s", ds_kernels_get()->name,
                     (long long)sts[i].rows, (long long)sts[i].cols, pc ? "channel" : "tensor");
            check_rows(&t, what);
            check_matmul_i8(&t, p1, p3, what);
            check_interleaved(&t, p1, p3, what);
            free_mat(&t);
        }
    check_matmul_jobs(p1, p3);
    check_tapered(p1);
    check_tapered_argmax();
    ds_pool_close(p1);
    ds_pool_close(p3);
}

/* The integer dots against scalar, bit-exact, and scalar against an int64 sum: odd lengths,
 * several block widths, rows and x in exact-size allocations at odd offsets (ASan catches a
 * read past the end), random data over the whole range and the extremes (x = +-127 against
 * w = -128 everywhere: the largest pair sums the AVX2 int16 step sees). dot4_i8 runs 1 - 4
 * tokens (the others x reversed and negated), each token's sums equal to its one-token call. */
static void test_int_dots(const ds_kernels *k) {
    const ds_kernels *s = ds_kernels_scalar();
    const size_t blocks[] = {0 /* = n */, 2, 32, 64, 128, 130, 1000};
    for (size_t si = 0; si < N_SIZES; si++) {
        size_t n = sizes[si], nb4 = (n + 1) / 2;
        for (int pat = 0; pat < 3; pat++) {
            unsigned char *xb[4], *wb[4], *pb[4];
            int8_t *xm[4];
            for (int t = 0; t < 4; t++) {
                xb[t] = malloc(n + 1);
                xm[t] = (int8_t *)xb[t] + 1;
            }
            int8_t *x = xm[0];
            for (size_t i = 0; i < n; i++) {
                x[i] = pat == 0 ? (int8_t)((int)(rnd64() % 255) - 127)
                                : (int8_t)(pat == 1 ? 127 : (i % 2 ? 127 : -127));
                xm[2][i] = (int8_t)((int)(rnd64() % 255) - 127);
            }
            for (size_t i = 0; i < n; i++) {
                xm[1][i] = (int8_t)-x[n - 1 - i];
                xm[3][i] = (int8_t)-x[i];
            }
            const int8_t *const xt[4] = {xm[0], xm[1], xm[2], xm[3]};
            for (int r = 0; r < 4; r++) {
                wb[r] = malloc(n + 3);
                pb[r] = malloc(nb4 + 3);
                for (size_t i = 0; i < n; i++) wb[r][r % 3 + i] = pat ? 0x80 : (uint8_t)rnd64();
                for (size_t i = 0; i < nb4; i++) pb[r][r % 3 + i] = pat ? 0x88 : (uint8_t)rnd64();
            }
            const int8_t *const w8[4] = {(int8_t *)wb[0], (int8_t *)wb[1] + 1, (int8_t *)wb[2] + 2,
                                         (int8_t *)wb[3]};
            const uint8_t *const w4[4] = {pb[0], pb[1] + 1, pb[2] + 2, pb[3]};
            for (size_t bi = 0; bi < sizeof blocks / sizeof blocks[0]; bi++) {
                size_t blk = blocks[bi] ? blocks[bi] : n, nb = (n + blk - 1) / blk;
                int32_t *o = malloc(nb * 16 * sizeof(int32_t)),
                        *os = malloc(nb * 16 * sizeof(int32_t)),
                        *o1 = malloc(nb * 16 * sizeof(int32_t)),
                        *x8off = malloc(4 * nb * sizeof(int32_t));
                int bad8 = 0, bad4 = 0, badref = 0;
                for (size_t t = 0; t < 4; t++)
                    for (size_t b = 0; b < nb; b++) {
                        int32_t sum = 0;
                        for (size_t i = b * blk; i < n && i < (b + 1) * blk; i++) sum += xt[t][i];
                        x8off[t * nb + b] = 128 * sum;
                    }
                const int32_t *const xo8[4] = {x8off, x8off + nb, x8off + 2 * nb, x8off + 3 * nb};
                for (int nx = 1; nx <= 4; nx++) {
                    /* the prefetched lines: the rows themselves, a harmless hint */
                    k->dot4_i8(xt, xo8, nx, w8, n, blk, 64, (const char *)w8[0], n / 64, o);
                    s->dot4_i8(xt, xo8, nx, w8, n, blk, 64, NULL, 0, os);
                    for (size_t b = 0; b < nb; b++)
                        for (int t = 0; t < nx; t++)
                            for (int r = 0; r < 4; r++) {
                                const size_t at = 4 * ((size_t)nx * b + (size_t)t) + (size_t)r;
                                int64_t ref = 0;
                                for (size_t i = b * blk; i < n && i < (b + 1) * blk; i++)
                                    ref += (int64_t)xt[t][i] * w8[r][i];
                                badref += os[at] != ref;
                                bad8 += o[at] != os[at];
                            }
                    if (blk % 64 == 0 || blk >= n) { /* the rows interleaved by fours, as a
                                                      * ds_mat's (ds_mat.ilv): exact size */
                        const size_t last = (n - 1) / 64 * 256 + 192 + (n - 1) % 64 + 1;
                        int8_t *il = malloc(last);
                        for (size_t j = 0; j < 4; j++)
                            for (size_t i = 0; i < n; i++)
                                il[i / 64 * 256 + 64 * j + i % 64] = w8[j][i];
                        const int8_t *const wi[4] = {il, il + 64, il + 128, il + 192};
                        k->dot4_i8(xt, xo8, nx, wi, n, blk, 256, NULL, 0, o1);
                        for (size_t i = 0; i < 4 * (size_t)nx * nb; i++) bad8 += o1[i] != os[i];
                        s->dot4_i8(xt, xo8, nx, wi, n, blk, 256, NULL, 0, o1);
                        for (size_t i = 0; i < 4 * (size_t)nx * nb; i++) bad8 += o1[i] != os[i];
                        free(il);
                    }
                    for (int t = 0; nx == 4 && t < 4; t++) { /* alone: the same sums */
                        k->dot4_i8(xt + t, xo8 + t, 1, w8, n, blk, 64, NULL, 0, o1);
                        for (size_t b = 0; b < nb; b++)
                            for (int r = 0; r < 4; r++)
                                bad8 +=
                                    o1[4 * b + (size_t)r] != o[4 * (4 * b + (size_t)t) + (size_t)r];
                    }
                }
                free(o1);
                free(x8off);
                /* int4: x split per block, the offsets of the unsigned nibbles per block */
                int8_t *xs = malloc(n);
                int32_t *xoff = malloc(nb * sizeof(int32_t));
                ds_i4_split(x, n, blk, xs);
                for (size_t b = 0; b < nb; b++) {
                    int32_t sum = 0;
                    for (size_t i = b * blk; i < n && i < (b + 1) * blk; i++) sum += x[i];
                    xoff[b] = 8 * sum;
                }
                k->dot4_i4(xs, xoff, w4, n, blk, o);
                s->dot4_i4(xs, xoff, w4, n, blk, os);
                free(xs);
                free(xoff);
                for (size_t b = 0; b < nb; b++)
                    for (int r = 0; r < 4; r++) {
                        int64_t ref = 0;
                        for (size_t i = b * blk; i < n && i < (b + 1) * blk; i++) {
                            int v = (w4[r][i / 2] >> (i % 2 ? 4 : 0)) & 15;
                            ref += (int64_t)x[i] * (v >= 8 ? v - 16 : v);
                        }
                        badref += os[4 * b + (size_t)r] != ref;
                        bad4 += o[4 * b + (size_t)r] != os[4 * b + (size_t)r];
                    }
                CHECK_MSG(badref == 0, "scalar integer dots n=%zu block=%zu: %d sums wrong", n, blk,
                          badref);
                CHECK_MSG(bad8 == 0 && bad4 == 0,
                          "%s dot4_i8 / dot4_i4 n=%zu block=%zu pattern %d: %d / %d differ from "
                          "scalar",
                          k->name, n, blk, pat, bad8, bad4);
                free(o);
                free(os);
            }
            for (int t = 0; t < 4; t++) free(xb[t]);
            for (int r = 0; r < 4; r++) {
                free(wb[r]);
                free(pb[r]);
            }
        }
    }
}

/* i8_to_f32 / _lanes / i4_to_f32 against scalar bit-exact, and scalar against q * scale computed
 * here, on every length up to 70 and 1000 (tails), rows at odd offsets, all byte values. */
static void test_int_dequant(const ds_kernels *k) {
    const ds_kernels *s = ds_kernels_scalar();
    unsigned char buf[1002];
    for (size_t i = 0; i < sizeof buf; i++) buf[i] = (uint8_t)(i * 37 + 11);
    float a[2001], b[2001], lane[1000];
    const float sc = 0.0371f;
    for (size_t i = 0; i < 1000; i++) lane[i] = 0.0013f * (float)(i % 97) - 0.05f;
    int bad = 0, badref = 0;
    for (size_t n = 0; n <= 1000; n = n < 70 ? n + 1 : 1000) {
        const int8_t *q = (const int8_t *)buf + 1;
        k->i8_to_f32(a, q, n, sc);
        s->i8_to_f32(b, q, n, sc);
        for (size_t i = 0; i < n; i++) badref += b[i] != (float)q[i] * sc;
        bad += memcmp(a, b, n * sizeof(float)) != 0;
        k->i8_to_f32_lanes(a, q, n, lane);
        s->i8_to_f32_lanes(b, q, n, lane);
        for (size_t i = 0; i < n; i++) badref += b[i] != (float)q[i] * lane[i];
        bad += memcmp(a, b, n * sizeof(float)) != 0;
        k->i4_to_f32(a, buf + 1, n, sc);
        s->i4_to_f32(b, buf + 1, n, sc);
        for (size_t i = 0; i < n; i++) {
            int v = (buf[1 + i / 2] >> (i % 2 ? 4 : 0)) & 15;
            badref += b[i] != (float)(v >= 8 ? v - 16 : v) * sc;
        }
        bad += memcmp(a, b, n * sizeof(float)) != 0;
        if (n == 1000) break;
    }
    CHECK_MSG(badref == 0, "scalar i8_to_f32 / _lanes / i4_to_f32: %d values wrong", badref);
    CHECK_MSG(bad == 0, "%s i8_to_f32 / _lanes / i4_to_f32 differ from scalar at %d lengths",
              k->name, bad);
}

/* axpy_i8 / axpy_bf16 against scalar bit-exact, and scalar against fmaf over the row converted
 * here (the product q * scale rounded first, as i8_to_f32 does): every byte value, finite BF16
 * patterns of every exponent (subnormals included), lengths with tails, y and the weights at odd
 * offsets, canaries either side of y. */
static void test_axpy_rows(const ds_kernels *k) {
    const ds_kernels *s = ds_kernels_scalar();
    enum { MAXN = 1000, PAD = 16 };
    unsigned char qb[MAXN + 1];
    uint16_t hb[MAXN + 1];
    for (size_t i = 0; i <= MAXN; i++) {
        qb[i] = (uint8_t)(i * 37 + 11);
        do hb[i] = (uint16_t)rnd64();
        while ((hb[i] & 0x7f80) == 0x7f80); /* no infinity or NaN: payloads may differ */
    }
    const int8_t *q = (const int8_t *)qb + 1;
    const uint16_t *h = hb + 1;
    float y0[MAXN], yk[MAXN + 2 + PAD], ys[MAXN];
    const float alpha = -0.8125f, sc = 0.0371f;
    int bad = 0, badref = 0, oob = 0;
    for (size_t n = 0; n <= MAXN; n = n < 70 ? n + 1 : MAXN) {
        for (int kind = 0; kind < 2; kind++) {
            fill(y0, n);
            for (size_t i = 0; i < n + 2 + PAD; i++) yk[i] = 777.0f;
            memcpy(yk + 1, y0, n * sizeof(float));
            memcpy(ys, y0, n * sizeof(float));
            if (kind == 0) {
                k->axpy_i8(yk + 1, alpha, q, sc, n);
                s->axpy_i8(ys, alpha, q, sc, n);
            } else {
                k->axpy_bf16(yk + 1, alpha, h, n);
                s->axpy_bf16(ys, alpha, h, n);
            }
            for (size_t i = 0; i < n; i++) {
                uint16_t hv;
                memcpy(&hv, h + i, sizeof hv);
                const uint32_t bits = (uint32_t)hv << 16;
                float w = (float)q[i] * sc;
                if (kind) memcpy(&w, &bits, sizeof w);
                const float want = fmaf(alpha, w, y0[i]);
                badref += !same_float(ys[i], want, 0);
                bad += !same_float(yk[1 + i], ys[i], 0);
            }
            oob += yk[0] != 777.0f;
            for (size_t i = n + 1; i < n + 2 + PAD; i++) oob += yk[i] != 777.0f;
        }
        if (n == MAXN) break;
    }
    CHECK_MSG(badref == 0, "scalar axpy_i8 / axpy_bf16: %d values differ from fmaf", badref);
    CHECK_MSG(bad == 0, "%s axpy_i8 / axpy_bf16: %d values differ from scalar", k->name, bad);
    CHECK_MSG(oob == 0, "%s axpy_i8 / axpy_bf16 wrote out of bounds", k->name);
}

/* axpy_rows_i8_lanes / axpy_rows_i8 / axpy_rows_bf16 against scalar bit-exact, and scalar
 * against the fmaf chain over rows converted here (q * scale rounded first, the BF16 value):
 * every byte value, finite BF16 patterns of every exponent, widths with tails below, at and past
 * the 128 and 256 columns a pass holds, 0 - 300 rows, x at an odd offset, canaries past y. */
static void test_axpy_rows_many(const ds_kernels *k) {
    const ds_kernels *s = ds_kernels_scalar();
    enum { MAXN = 300, MAXM = 300, PAD = 16 };
    static int8_t q[MAXM * MAXN];
    static uint16_t h[MAXM * MAXN];
    static float x[MAXM + 1], sc[MAXN > MAXM ? MAXN : MAXM], ys[MAXN], yk[MAXN + PAD];
    for (size_t i = 0; i < sizeof q; i++) {
        q[i] = (int8_t)(uint8_t)(i * 37 + 11);
        do h[i] = (uint16_t)rnd64();
        while ((h[i] & 0x7f80) == 0x7f80); /* no infinity or NaN: payloads may differ */
    }
    fill(x, MAXM + 1);
    for (size_t i = 0; i < sizeof sc / sizeof *sc; i++) sc[i] = 0.001f + 0.0007f * (float)i;
    static const size_t ns[] = {0, 1, 7, 16, 17, 100, 127, 128, 129, 256, 300};
    static const size_t ms[] = {0, 1, 3, 64, 300};
    int bad = 0, badref = 0, oob = 0;
    for (int kind = 0; kind < 3; kind++)
        for (size_t a = 0; a < sizeof ns / sizeof *ns; a++)
            for (size_t b = 0; b < sizeof ms / sizeof *ms; b++) {
                const size_t n = ns[a], m = ms[b];
                for (size_t i = 0; i < MAXN + PAD; i++) yk[i] = 777.0f;
                if (kind == 0) {
                    k->axpy_rows_i8_lanes(yk, x + 1, q, m, n, sc);
                    s->axpy_rows_i8_lanes(ys, x + 1, q, m, n, sc);
                } else if (kind == 1) {
                    k->axpy_rows_i8(yk, x + 1, q, m, n, sc);
                    s->axpy_rows_i8(ys, x + 1, q, m, n, sc);
                } else {
                    k->axpy_rows_bf16(yk, x + 1, h, m, n);
                    s->axpy_rows_bf16(ys, x + 1, h, m, n);
                }
                for (size_t i = 0; i < n; i++) {
                    float want = 0.0f;
                    for (size_t j = 0; j < m; j++) {
                        const uint32_t bits = (uint32_t)h[j * n + i] << 16;
                        float w = (float)q[j * n + i] * sc[kind ? j : i];
                        if (kind == 2) memcpy(&w, &bits, sizeof w);
                        want = fmaf(x[1 + j], w, want);
                    }
                    badref += !same_float(ys[i], want, 0);
                    bad += !same_float(yk[i], ys[i], 0);
                }
                for (size_t i = n; i < MAXN + PAD; i++) oob += yk[i] != 777.0f;
            }
    CHECK_MSG(badref == 0, "scalar axpy_rows kernels: %d values differ from fmaf", badref);
    CHECK_MSG(bad == 0, "%s axpy_rows kernels: %d values differ from scalar", k->name, bad);
    CHECK_MSG(oob == 0, "%s axpy_rows kernels wrote out of bounds", k->name);
}

/* absmax_f32 / quantize_i8 against scalar, bit-exact: lengths with tails, ties (x / s exactly
 * k + 0.5), values past the clamp, NaN and infinities, an unaligned start. */
static void test_quant_kernels(const ds_kernels *k) {
    const ds_kernels *s = ds_kernels_scalar();
    float buf[1001];
    int8_t qa[1000], qb[1000];
    int bad = 0;
    for (size_t n = 0; n <= 1000; n = n < 40 ? n + 1 : n * 5) {
        float *x = buf + 1;
        for (size_t i = 0; i < n; i++) {
            uint64_t r = rnd64();
            x[i] = (float)((int)(r % 255) - 127) + (r & 256 ? 0.5f : 0.25f);
            if (r % 97 == 0) x[i] = NAN;
            if (r % 89 == 0) x[i] = 300.0f;
        }
        float ma = k->absmax_f32(x, n), mb = s->absmax_f32(x, n);
        bad += memcmp(&ma, &mb, sizeof ma) != 0;
        const float sc[] = {1.0f, mb > 0 ? mb / 127.0f : 1.0f, 0.37f, INFINITY};
        for (size_t j = 0; j < 4; j++) {
            memset(qa, 0x55, sizeof qa);
            memset(qb, 0x55, sizeof qb);
            k->quantize_i8(x, n, sc[j], qa);
            s->quantize_i8(x, n, sc[j], qb);
            bad += memcmp(qa, qb, sizeof qa) != 0; /* bytes past n untouched too */
        }
        if (n == 1000) break;
    }
    CHECK_MSG(bad == 0, "%s absmax_f32 / quantize_i8: %d cases differ from scalar", k->name, bad);
    float t[3] = {2.5f, -3.5f, 127.0f};
    int8_t qt[3];
    s->quantize_i8(t, 3, 1.0f, qt);
    CHECK(qt[0] == 2 && qt[1] == -4 && qt[2] == 127); /* ties to even */
    /* sum_i8 against a plain sum: every tail length, unaligned starts, all -128 and all 127 */
    static int8_t q[4099];
    for (size_t n = 0; n <= 4096; n = n < 200 ? n + 1 : n * 2 + 1) {
        for (int kind = 0; kind < 3; kind++) {
            int8_t *p = q + n % 3;
            int64_t want = 0;
            for (size_t i = 0; i < n; i++) {
                p[i] = kind == 0 ? (int8_t)(rnd64() & 0xff) : kind == 1 ? -128 : 127;
                want += p[i];
            }
            const int64_t got = k->sum_i8(p, n);
            CHECK_MSG(got == want, "%s sum_i8 n=%zu kind %d: %lld, want %lld", k->name, n, kind,
                      (long long)got, (long long)want);
        }
    }
}

/* argmax_f32 against scalar and by hand: lengths with tails, ties (the lowest index wins), the
 * first NaN above every number, -inf never picked, nothing to pick (-1), signed zeros equal, an
 * unaligned start. */
static void test_argmax(const ds_kernels *k) {
    const ds_kernels *s = ds_kernels_scalar();
    float buf[1001];
    int bad = 0;
    for (size_t n = 0; n <= 1000; n = n < 40 ? n + 1 : n * 5) {
        float *x = buf + 1;
        for (int mode = 0; mode < 5; mode++) {
            for (size_t i = 0; i < n; i++) {
                uint64_t r = rnd64();
                x[i] = mode == 3 ? -(float)(r % 5) : (float)((int)(r % 2001) - 1000) * 0.25f;
                if ((mode == 0 && r % 997 == 0) || mode == 1) x[i] = NAN;
                if (r % 41 == 0 || mode == 2) x[i] = -INFINITY;
                if (mode == 3 && x[i] == 0.0f && r % 2) x[i] = -0.0f;
            }
            if (mode == 4 && n) x[rnd64() % n] = NAN; /* one NaN anywhere, tails included */
            int64_t a = k->argmax_f32(x, n), b = s->argmax_f32(x, n);
            bad += a != b;
            int64_t want = -1; /* the first NaN, else the first strict maximum: a second loop */
            for (size_t i = 0; i < n && !(want >= 0 && isnan(x[want])); i++)
                if (isnan(x[i]) || (x[i] > -INFINITY && (want < 0 || x[i] > x[want])))
                    want = (int64_t)i;
            bad += b != want;
        }
        if (n == 1000) break;
    }
    CHECK_MSG(bad == 0, "%s argmax_f32: %d cases wrong", k->name, bad);
    const float h[] = {-INFINITY, 3.0f, 5.0f, 1.0f, 5.0f, INFINITY, INFINITY, NAN, 9.0f, NAN};
    CHECK(k->argmax_f32(h, 5) == 2 && k->argmax_f32(h, 7) == 5 && k->argmax_f32(h, 10) == 7);
    CHECK(k->argmax_f32(h, 1) == -1 && k->argmax_f32(h, 0) == -1 && k->argmax_f32(h + 8, 2) == 1);
}

/* rmsnorm_f32 against scalar bit for bit, and scalar against the formula of kernels.h worked out
 * here: lengths with tails of every size, magnitudes from 1e-20 to 1e18 (squares past the float
 * range, which the double sums keep), in place, an unaligned start. */
static void test_rmsnorm(const ds_kernels *k) {
    const ds_kernels *s = ds_kernels_scalar();
    enum { MAXN = 7169 };
    float *x = malloc((MAXN + 1) * sizeof(float)), *w = malloc(MAXN * sizeof(float));
    float *a = malloc(MAXN * sizeof(float)), *b = malloc(MAXN * sizeof(float));
    int bad = 0, off = 0;
    for (size_t n = 1; n <= MAXN; n = n < 70 ? n + 1 : n * 3 + 1) {
        float *xs = x + n % 2; /* unaligned for odd n */
        const float scale = n % 3 == 0 ? 1e-20f : n % 3 == 1 ? 1.0f : 1e18f;
        for (size_t i = 0; i < n; i++) {
            xs[i] = rnd_uniform(-3, 3) * scale;
            w[i] = rnd_uniform(0.5f, 1.5f);
        }
        const float eps = 1e-6f;
        k->rmsnorm_f32(a, xs, w, n, eps);
        s->rmsnorm_f32(b, xs, w, n, eps);
        bad += memcmp(a, b, n * sizeof(float)) != 0;
        double c[8] = {0};
        for (size_t i = 0; i < n; i++) c[i % 8] += (double)xs[i] * (double)xs[i];
        const float r =
            1.0f /
            sqrtf((float)((((c[0] + c[1]) + (c[2] + c[3])) + ((c[4] + c[5]) + (c[6] + c[7]))) /
                          (double)n) +
                  eps);
        for (size_t i = 0; i < n; i++) off += b[i] != (xs[i] * r) * w[i];
        memcpy(b, xs, n * sizeof(float));
        k->rmsnorm_f32(b, b, w, n, eps);
        bad += memcmp(a, b, n * sizeof(float)) != 0;
    }
    CHECK_MSG(bad == 0, "%s rmsnorm_f32: %d cases differ from scalar or in place", k->name, bad);
    CHECK_MSG(off == 0, "scalar rmsnorm_f32: %d elements off the formula", off);
    free(x);
    free(w);
    free(a);
    free(b);
}

/* swiglu_f32 against a double evaluation of the formula: gates over the whole range that matters
 * (and past it, where exp over- or underflows), lengths with tails, an unaligned start; then the
 * special values by hand: signed zeros, +-inf, NaN, gates beyond +-100. */
static void test_swiglu(const ds_kernels *k) {
    float abuf[301] = {0}, b[300] = {0};
    float *a = abuf + 1;
    int bad = 0;
    for (size_t n = 0; n <= 300; n = n < 40 ? n + 1 : n + 130) {
        float g[300] = {0};
        for (size_t i = 0; i < n; i++) {
            g[i] = i % 7 ? rnd_uniform(-20, 20) : rnd_uniform(-120, 120);
            b[i] = rnd_uniform(-2, 2);
            a[i] = g[i];
        }
        k->swiglu_f32(a, b, n);
        for (size_t i = 0; i < n; i++) {
            double want = (double)g[i] / (1.0 + exp(-(double)g[i])) * b[i];
            /* past -88.7 exp(-g) overflows f32: the result is -0 where double keeps ~1e-37 */
            bad += !(fabs(a[i] - want) <= 1e-6 * fabs(want) + 1e-36);
        }
    }
    CHECK_MSG(bad == 0, "%s swiglu_f32: %d elements off", k->name, bad);
    float v[] = {0.0f,    -0.0f, INFINITY, -INFINITY, NAN,   100.5f,
                 -100.5f, 1e30f, -1e30f,   89.0f,     -89.0f};
    const float one[11] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1};
    k->swiglu_f32(v, one, 11);
    CHECK(v[0] == 0.0f && !signbit(v[0]) && v[1] == 0.0f && signbit(v[1]));
    CHECK(v[2] == INFINITY && isnan(v[3]) && isnan(v[4]));
    CHECK(v[5] == 100.5f && v[6] == 0.0f && signbit(v[6]) && v[7] == 1e30f);
    CHECK(v[8] == 0.0f && signbit(v[8]) && v[9] == 89.0f && v[10] == 0.0f && signbit(v[10]));
}

/* bf16_split against its definition: within each whole 32-column step the even columns, then
 * the odd ones; a tail in order (lengths with and without one). */
static void test_bf16_split(const ds_kernels *k) {
    float x[200], xs[200];
    int bad = 0;
    for (size_t i = 0; i < 200; i++) x[i] = (float)i + 0.5f;
    for (size_t n = 0; n <= 200; n += n < 70 ? 1 : 65) {
        memset(xs, 0, sizeof xs);
        k->bf16_split(x, n, xs);
        for (size_t i = 0; i < n; i++) {
            size_t s0 = i / 32 * 32, l = i - s0;
            float want = s0 + 32 <= n ? x[s0 + (l < 16 ? 2 * l : 2 * (l - 16) + 1)] : x[i];
            bad += xs[i] != want;
        }
        for (size_t i = n; i < 200; i++) bad += xs[i] != 0.0f; /* nothing past n */
    }
    CHECK_MSG(bad == 0, "%s bf16_split: %d elements misplaced", k->name, bad);
}

/* exp_f32 against a double evaluation over the sampler's whole range (its x are <= 0, down to
 * -inf) and past overflow, with tails, in place; 0 below -104, and the special values. */
static void test_exp(const ds_kernels *k) {
    float xbuf[301] = {0}, y[300] = {0};
    int bad = 0, bad_zero = 0;
    for (size_t n = 0; n <= 300; n = n < 40 ? n + 1 : n + 130) {
        float *x = xbuf + 1;
        for (size_t i = 0; i < n; i++) x[i] = i % 5 ? rnd_uniform(-20, 5) : rnd_uniform(-115, 95);
        k->exp_f32(y, x, n);
        for (size_t i = 0; i < n; i++) {
            double want = exp((double)x[i]);
            if (x[i] < -104.0f)
                bad_zero += y[i] != 0.0f;
            else if (want >= FLT_MIN) /* normal: relative; subnormal: half an ulp of 2^-149 */
                bad +=
                    !(fabs(y[i] - want) <= 2.1e-7 * want || (want > FLT_MAX && y[i] == INFINITY));
            else
                bad += !(fabs(y[i] - want) <= 1.5e-45);
        }
        memcpy(y, x, n * sizeof(float));
        k->exp_f32(x, x, n);
        for (size_t i = 0; i < n; i++) {
            float one;
            k->exp_f32(&one, &y[i], 1);
            bad += memcmp(&one, &x[i], sizeof one) != 0; /* in place = out of place, and tails */
        }
    }
    CHECK_MSG(bad == 0, "%s exp_f32: %d elements off", k->name, bad);
    CHECK_MSG(bad_zero == 0, "%s exp_f32: %d elements below -104 not 0", k->name, bad_zero);
    const float v[] = {0.0f, -0.0f, -INFINITY, INFINITY, NAN, -104.5f, 89.0f, -1e30f, 1.0f, -87.0f};
    float e[10];
    k->exp_f32(e, v, 10);
    CHECK(e[0] == 1.0f && e[1] == 1.0f && e[2] == 0.0f && !signbit(e[2]) && e[3] == INFINITY);
    CHECK(isnan(e[4]) && e[5] == 0.0f && e[6] == INFINITY && e[7] == 0.0f);
    CHECK(fabs(e[8] - exp(1.0)) <= 2.1e-7 * exp(1.0) &&
          fabs(e[9] - exp(-87.0)) <= 2.1e-7 * exp(-87.0));
}

/* The softmax as first written, one serial scan of row x (n floats, stride ld): the first-wins
 * max from x[0], x - max, table k's exp, the double sum in order, the product by (float)(1 / sum).
 */
static void softmax_serial(const ds_kernels *k, float *x, int64_t n, int64_t ld) {
    float mx = x[0];
    for (int64_t i = 1; i < n; i++)
        if (x[i * ld] > mx) mx = x[i * ld];
    double sum = 0.0;
    for (int64_t i = 0; i < n; i++) {
        float e = x[i * ld] - mx;
        k->exp_f32(&e, &e, 1);
        x[i * ld] = e;
        sum += e;
    }
    const float inv = (float)(1.0 / sum);
    for (int64_t i = 0; i < n; i++) x[i * ld] *= inv;
}

/* softmax16_f32: each of the 16 lanes gets exactly the serial scan's floats, lanes being heads of
 * different magnitudes (an unsubtracted max would overflow), a NaN score late and first (NaN
 * stays), an all -inf head (NaN), equal scores and -0 / +0 maxima, at an unaligned start. */
static void test_softmax16(const ds_kernels *k) {
    const size_t ns[] = {1, 2, 3, 4, 5, 7, 9, 40, 133};
    for (size_t ni = 0; ni < sizeof ns / sizeof ns[0]; ni++) {
        const size_t n = ns[ni];
        float *buf = malloc((16 * n + 1) * sizeof(float)), *x = buf + 1;
        float *y = malloc(16 * n * sizeof(float));
        for (size_t i = 0; i < 16 * n; i++)
            x[i] = rnd_uniform(-30, 30) + (float)(i % 16) * (i % 3 ? 40.0f : -60.0f);
        for (size_t i = 0; i < n; i++) {
            x[16 * i + 5] = -INFINITY;
            x[16 * i + 9] = 2.5f;
            x[16 * i + 10] = i % 2 ? -0.0f : 0.0f;
        }
        x[16 * (n / 2) + 3] = NAN;
        x[7] = NAN;
        memcpy(y, x, 16 * n * sizeof(float));
        k->softmax16_f32(x, n);
        int bad = 0;
        for (size_t l = 0; l < 16; l++) {
            softmax_serial(k, y + l, (int64_t)n, 16);
            for (size_t i = 0; i < n; i++) bad += memcmp(&x[16 * i + l], &y[16 * i + l], 4) != 0;
        }
        CHECK_MSG(bad == 0, "%s softmax16_f32 n=%zu: %d scores differ from the serial scan",
                  k->name, n, bad);
        CHECK_MSG(isnan(x[3 + 16 * (n / 2)]) && isnan(x[7]) && isnan(x[5]),
                  "%s softmax16_f32 n=%zu: a NaN head came out finite", k->name, n);
        CHECK_MSG(fabsf(x[9] * (float)n - 1.0f) < 1e-5f, "%s softmax16_f32 n=%zu: equal scores",
                  k->name, n);
        free(buf);
        free(y);
    }
}

/* dot4xn_bf16 on odd lengths, rows and x in allocations of exactly their bytes at an offset
 * off any SIMD boundary (ASan catches a read past the end): bit-exact against scalar, every nx
 * giving each token the same floats as nx = 4, and scalar against a double-precision dot. The
 * prefetch range (the rows themselves), or none (one token: another walk), must change nothing. */
static void test_dot4xn_bf16(const ds_kernels *k) {
    const ds_kernels *s = ds_kernels_scalar();
    for (size_t si = 0; si < N_SIZES; si++) {
        const size_t n = sizes[si];
        fused_rows f;
        fused_rows_make(&f, n, 2, 0);
        const uint16_t *const w16[4] = {f.w[0], f.w[1], f.w[2], f.w[3]};
        float *xraw[4], *sraw[4], x[4][4097];
        const float *xs[4];
        for (int t = 0; t < 4; t++) {
            xraw[t] = malloc(n * sizeof(float));
            sraw[t] = malloc((n + 1) * sizeof(float));
            fill(xraw[t], n);
            memcpy(x[t], xraw[t], n * sizeof(float));
            ds_bf16_split(xraw[t], n, sraw[t] + 1);
            xs[t] = sraw[t] + 1;
        }
        /* one token both ways: rows side by side with prefetches, one after another without */
        const char *pf = (const char *)f.w[0];
        const size_t n_pf = (2 * n + 63) / 64;
        float got[8][16], want[16];
        s->dot4xn_bf16(xs, 4, w16, n, 32, NULL, 0, want);
        k->dot4xn_bf16(xs, 4, w16, n, 32, pf, n_pf, got[0]);
        k->dot4xn_bf16(xs, 2, w16, n, 32, NULL, 0, got[1]);
        k->dot4xn_bf16(xs + 2, 2, w16, n, 32, NULL, 0, got[1] + 8);
        for (int t = 0; t < 4; t++) {
            k->dot4xn_bf16(xs + t, 1, w16, n, 32, NULL, 0, got[2] + 4 * t);
            k->dot4xn_bf16(xs + t, 1, w16, n, 32, pf, n_pf, got[3] + 4 * t);
        }
        /* the same rows interleaved by fours (ds_mat.ilv): piece s of row j at 128 s + 32 j, the
         * last (partial) piece too, in an allocation of exactly its bytes */
        const size_t last = (n - 1) / 32 * 128 + 96 + (n - 1) % 32 + 1; /* row 3's last + 1 */
        uint16_t *il = malloc(last * sizeof *il);
        for (size_t j = 0; j < 4; j++)
            for (size_t i = 0; i < n; i++)
                memcpy(il + i / 32 * 128 + 32 * j + i % 32, w16[j] + i, 2);
        const uint16_t *const wi[4] = {il, il + 32, il + 64, il + 96};
        k->dot4xn_bf16(xs, 4, wi, n, 128, pf, n_pf, got[4]);
        k->dot4xn_bf16(xs, 2, wi, n, 128, NULL, 0, got[5]);
        k->dot4xn_bf16(xs + 2, 2, wi, n, 128, NULL, 0, got[5] + 8);
        for (int t = 0; t < 4; t++) {
            k->dot4xn_bf16(xs + t, 1, wi, n, 128, NULL, 0, got[6] + 4 * t);
            s->dot4xn_bf16(xs + t, 1, wi, n, 128, NULL, 0, got[7] + 4 * t);
        }
        free(il);
        int bad = 0;
        double worst = 0;
        for (int o = 0; o < 16; o++) {
            const int t = o / 4, r = o % 4;
            for (int v = 0; v < 8; v++) bad += fbits(got[v][o]) != fbits(want[o]);
            double ref = 0, sabs = 0;
            for (size_t i = 0; i < n; i++) {
                double pr = (double)x[t][i] * fused_elem(&f, 0, r, i);
                ref += pr;
                sabs += fabs(pr);
            }
            double e = fabs(want[o] - ref) / (sabs > 0 ? sabs : 1);
            worst = e > worst ? e : worst;
            bad += !(e <= DOT_RTOL);
        }
        CHECK_MSG(bad == 0, "%s dot4xn_bf16 n=%zu: %d wrong (worst rel err %.3g)", k->name, n, bad,
                  worst);
        for (int t = 0; t < 4; t++) {
            free(xraw[t]);
            free(sraw[t]);
        }
        fused_rows_free(&f);
    }
}

/* ds_i4_split against hand-made layouts: one partial step; blocks of 4 with a short last one;
 * and a full 128-column step followed by a partial one inside one block. */
static void test_i4_split(void) {
    int8_t x[300], xs[300];
    for (int i = 0; i < 300; i++) x[i] = (int8_t)i;
    ds_i4_split(x, 5, 128, xs);
    const int8_t a[] = {0, 2, 4, 1, 3};
    CHECK(memcmp(xs, a, sizeof a) == 0);
    ds_i4_split(x, 10, 4, xs);
    const int8_t b[] = {0, 2, 1, 3, 4, 6, 5, 7, 8, 9};
    CHECK(memcmp(xs, b, sizeof b) == 0);
    ds_i4_split(x, 133, 300, xs);
    int bad = 0;
    for (int j = 0; j < 64; j++) bad += xs[j] != 2 * j || xs[64 + j] != 2 * j + 1;
    const int8_t c[] = {(int8_t)128, (int8_t)130, (int8_t)132, (int8_t)129, (int8_t)131};
    CHECK(bad == 0 && memcmp(xs + 128, c, sizeof c) == 0);
}

/* The prefill GEMM kernels against scalar, bit-exact (panel bytes and output floats), and the
 * scalar ones against the definition: packed bytes from the element values, and every output
 * recomputed here from int64 block sums (exact, so the fma chain per block is the only rounding,
 * done the same way). Column counts with ragged 4-column groups and 64-column transposes, blocks
 * of 4 .. 132 and one whole-row block, and the extremes (w = -128 against x = +-127). */
static void test_gemm(const ds_kernels *k) {
    const ds_kernels *s = ds_kernels_scalar();
    const size_t ns[] = {1, 3, 4, 5, 63, 64, 65, 130, 257, 1000};
    const size_t blocks[] = {0 /* = n */, 4, 8, 128, 132};
    for (size_t ni = 0; ni < sizeof ns / sizeof ns[0]; ni++)
        for (int pat = 0; pat < 2; pat++) {
            size_t n = ns[ni], ng = (n + 3) / 4, pb = 64 * ng, rb4 = (n + 1) / 2;
            unsigned char *w8b[16], *w4b[16];
            const int8_t *w8[16];
            const uint8_t *w4[16];
            for (int r = 0; r < 16; r++) { /* exact-size rows at odd offsets */
                w8b[r] = malloc(n + 1);
                w4b[r] = malloc(rb4 + 1);
                for (size_t i = 0; i < n; i++) w8b[r][1 + i] = pat ? 0x80 : (uint8_t)rnd64();
                for (size_t i = 0; i < rb4; i++) w4b[r][1 + i] = pat ? 0x88 : (uint8_t)rnd64();
                w8[r] = (const int8_t *)w8b[r] + 1;
                w4[r] = w4b[r] + 1;
            }
            uint8_t *pk = malloc(pb), *ps = malloc(pb), *p4 = malloc(pb), *p4s = malloc(pb);
            k->pack16_i8(pk, w8, n, 64);
            s->pack16_i8(ps, w8, n, 64);
            /* rows read in pieces of 64 columns 256 bytes apart (an interleaved ds_mat's): the
             * same panel; each row in an allocation of exactly its last piece's end */
            uint8_t *pi = malloc(pb);
            unsigned char *wib[16];
            const int8_t *wi[16];
            for (int r = 0; r < 16; r++) {
                wib[r] = malloc((n - 1) / 64 * 256 + (n - 1) % 64 + 1);
                for (size_t i = 0; i < n; i++) wib[r][i / 64 * 256 + i % 64] = w8b[r][1 + i];
                wi[r] = (const int8_t *)wib[r];
            }
            k->pack16_i8(pi, wi, n, 256);
            int badi = memcmp(pi, ps, pb) != 0;
            s->pack16_i8(pi, wi, n, 256);
            badi += memcmp(pi, ps, pb) != 0;
            CHECK_MSG(!badi, "%s pack16_i8 n=%zu pattern %d: pieces 256 bytes apart differ",
                      k->name, n, pat);
            for (int r = 0; r < 16; r++) free(wib[r]);
            free(pi);
            k->pack16_i4(p4, w4, n);
            s->pack16_i4(p4s, w4, n);
            int badp = 0, badref = 0;
            for (size_t g = 0; g < ng; g++)
                for (size_t r = 0; r < 16; r++)
                    for (size_t j = 0; j < 4; j++) {
                        size_t c = 4 * g + j, o = 64 * g + 4 * r + j;
                        int v4 = c < n ? ((w4[r][c / 2] >> (c % 2 ? 4 : 0)) & 15) : 0;
                        int e8 = c < n ? w8[r][c] + 128 : 0,
                            e4 = c < n ? (v4 >= 8 ? v4 - 16 : v4) + 8 : 0;
                        badref += ps[o] != e8 || p4s[o] != e4;
                    }
            badp = memcmp(pk, ps, pb) != 0 || memcmp(p4, p4s, pb) != 0;
            CHECK_MSG(badref == 0, "scalar pack16 n=%zu pattern %d: %d bytes wrong", n, pat,
                      badref);
            CHECK_MSG(!badp, "%s pack16_i8 / pack16_i4 n=%zu pattern %d differ from scalar",
                      k->name, n, pat);
            /* eight tokens, each readable up to 4 * ng bytes with zeros past n */
            int8_t *xs[8];
            for (int t = 0; t < 8; t++) {
                xs[t] = calloc(4 * ng, 1);
                for (size_t i = 0; i < n; i++)
                    xs[t][i] =
                        pat ? (int8_t)(t % 2 ? 127 : -127) : (int8_t)((int)(rnd64() % 255) - 127);
            }
            const int8_t *const xc[8] = {xs[0], xs[1], xs[2], xs[3], xs[4], xs[5], xs[6], xs[7]};
            for (size_t bi = 0; bi < sizeof blocks / sizeof blocks[0]; bi++) {
                size_t blk = blocks[bi] ? blocks[bi] : n, nb = (n + blk - 1) / blk;
                float *sw = malloc(nb * 16 * sizeof(float));
                for (size_t i = 0; i < nb * 16; i++) sw[i] = 1e-3f * (float)(1 + rnd64() % 1000);
                for (int v = 0; v < 2; v++) { /* int8, int4 */
                    const uint8_t *pan = v ? p4s : ps;
                    const int64_t off = v ? 8 : 128;
                    int32_t *xo[8];
                    for (int t = 0; t < 8; t++) {
                        xo[t] = malloc(nb * sizeof(int32_t));
                        for (size_t b = 0; b < nb; b++) {
                            int64_t sum = 0;
                            for (size_t i = b * blk; i < n && i < (b + 1) * blk; i++)
                                sum += xs[t][i];
                            xo[t][b] = (int32_t)(uint32_t)(off * sum);
                        }
                    }
                    const int32_t *const xoc[8] = {xo[0], xo[1], xo[2], xo[3],
                                                   xo[4], xo[5], xo[6], xo[7]};
                    float ok_[128], os_[128];
                    /* the prefetched lines: the panel itself, a harmless hint */
                    k->gemm16x8_i8(v ? p4 : pk, n, blk, 8, xc, xoc, sw, (const char *)pan, n / 16,
                                   ok_);
                    s->gemm16x8_i8(pan, n, blk, 8, xc, xoc, sw, NULL, 0, os_);
                    int bad = 0, bads = 0;
                    for (int t = 0; t < 8; t++)
                        for (int r = 0; r < 16; r++) {
                            float acc = 0;
                            for (size_t b = 0; b < nb; b++) {
                                int64_t is = 0;
                                for (size_t i = b * blk; i < n && i < (b + 1) * blk; i++) {
                                    int wv =
                                        v ? ((w4[r][i / 2] >> (i % 2 ? 4 : 0)) & 15) : w8[r][i];
                                    if (v && wv >= 8) wv -= 16;
                                    is += (int64_t)xs[t][i] * wv;
                                }
                                acc = fmaf((float)is, sw[16 * b + (size_t)r], acc);
                            }
                            bads += memcmp(&acc, &os_[16 * t + r], sizeof acc) != 0;
                            bad += memcmp(&ok_[16 * t + r], &os_[16 * t + r], sizeof acc) != 0;
                        }
                    CHECK_MSG(bads == 0, "scalar gemm16x8 %s n=%zu block=%zu pattern %d: %d wrong",
                              v ? "int4" : "int8", n, blk, pat, bads);
                    CHECK_MSG(bad == 0, "%s gemm16x8 %s n=%zu block=%zu pattern %d: %d differ",
                              k->name, v ? "int4" : "int8", n, blk, pat, bad);
                    /* fewer tokens (each table's narrower kernels): the first nt of the eight */
                    for (int nt = 1; nt < 8; nt++) {
                        const ds_kernels *tab[2] = {k, s};
                        for (int ti = 0; ti < 2; ti++) {
                            float on[128];
                            tab[ti]->gemm16x8_i8(v ? p4 : pk, n, blk, nt, xc, xoc, sw, NULL, 0, on);
                            CHECK_MSG(memcmp(on, os_, (size_t)(16 * nt) * sizeof(float)) == 0,
                                      "%s gemm16x8 %s n=%zu block=%zu nt=%d differs from 8 tokens",
                                      tab[ti]->name, v ? "int4" : "int8", n, blk, nt);
                        }
                    }
                    /* two panels a call: the second is this one rotated by a 4-column group,
                     * with other scales; each half must be gemm16x8_i8's for its panel */
                    uint8_t *p2 = malloc(pb);
                    float *sw2 = malloc(nb * 16 * sizeof(float)), o2[128];
                    for (size_t i = 0; i < pb; i++) p2[i] = pan[(i + 64) % pb];
                    for (size_t i = 0; i < nb * 16; i++) sw2[i] = sw[nb * 16 - 1 - i] * 0.5f;
                    s->gemm16x8_i8(p2, n, blk, 8, xc, xoc, sw2, NULL, 0, o2);
                    for (int ti = 0; ti < 2; ti++) {
                        const ds_kernels *tk = ti ? s : k;
                        float op[256];
                        tk->gemm32x8_i8(pan, p2, n, blk, xc, xoc, sw, sw2, (const char *)pan,
                                        n / 16, op);
                        CHECK_MSG(memcmp(op, os_, sizeof os_) == 0 &&
                                      memcmp(op + 128, o2, sizeof o2) == 0,
                                  "%s gemm32x8 %s n=%zu block=%zu pattern %d differs from two "
                                  "gemm16x8 calls",
                                  tk->name, v ? "int4" : "int8", n, blk, pat);
                    }
                    free(p2);
                    free(sw2);
                    for (int t = 0; t < 8; t++) free(xo[t]);
                }
                free(sw);
            }
            for (int t = 0; t < 8; t++) free(xs[t]);
            for (int r = 0; r < 16; r++) {
                free(w8b[r]);
                free(w4b[r]);
            }
            free(pk);
            free(ps);
            free(p4);
            free(p4s);
        }
}

/* pack16_f32 / pack16_bf16 / gemm16x8_f32 / _rows / gemm128x1_f32 against scalar bit-exact, and
 * scalar against a chain of fmaf in column order computed here, on ragged column counts and rows at
 * odd offsets. */
static void test_fgemm(const ds_kernels *k) {
    const ds_kernels *s = ds_kernels_scalar();
    const size_t ns[] = {1, 5, 15, 16, 17, 33, 100, 1000};
    for (size_t ni = 0; ni < sizeof ns / sizeof ns[0]; ni++) {
        size_t n = ns[ni];
        float *rows[16], *xs[8];
        for (int r = 0; r < 16; r++) {
            rows[r] = malloc((n + 1) * sizeof(float));
            fill(rows[r] + 1, n);
        }
        for (int t = 0; t < 8; t++) {
            xs[t] = malloc((n + 1) * sizeof(float));
            fill(xs[t] + 1, n);
        }
        const float *const rc[16] = {rows[0] + 1,  rows[1] + 1,  rows[2] + 1,  rows[3] + 1,
                                     rows[4] + 1,  rows[5] + 1,  rows[6] + 1,  rows[7] + 1,
                                     rows[8] + 1,  rows[9] + 1,  rows[10] + 1, rows[11] + 1,
                                     rows[12] + 1, rows[13] + 1, rows[14] + 1, rows[15] + 1};
        const float *const xc[8] = {xs[0] + 1, xs[1] + 1, xs[2] + 1, xs[3] + 1,
                                    xs[4] + 1, xs[5] + 1, xs[6] + 1, xs[7] + 1};
        float *pk = malloc(16 * n * sizeof(float)), *ps = malloc(16 * n * sizeof(float));
        k->pack16_f32(pk, rc, n);
        s->pack16_f32(ps, rc, n);
        int badref = 0;
        for (size_t i = 0; i < n; i++)
            for (size_t r = 0; r < 16; r++) badref += memcmp(&ps[16 * i + r], &rc[r][i], 4) != 0;
        CHECK_MSG(badref == 0, "scalar pack16_f32 n=%zu: %d values misplaced", n, badref);
        CHECK_MSG(memcmp(pk, ps, 16 * n * sizeof(float)) == 0, "%s pack16_f32 n=%zu differs",
                  k->name, n);
        /* pack16_bf16 from every kind of bit pattern (NaN payloads, infinities, subnormals):
         * each value where pack16_f32 puts it, widened exactly */
        uint16_t *hb[16];
        for (int r = 0; r < 16; r++) {
            hb[r] = malloc(n * sizeof(uint16_t));
            for (size_t i = 0; i < n; i++) hb[r][i] = (uint16_t)rnd64();
        }
        const uint16_t *const hc[16] = {hb[0],  hb[1],  hb[2],  hb[3], hb[4],  hb[5],
                                        hb[6],  hb[7],  hb[8],  hb[9], hb[10], hb[11],
                                        hb[12], hb[13], hb[14], hb[15]};
        float *bk = malloc(16 * n * sizeof(float)), *bs = malloc(16 * n * sizeof(float));
        k->pack16_bf16(bk, hc, n);
        s->pack16_bf16(bs, hc, n);
        badref = 0;
        for (size_t i = 0; i < n; i++)
            for (size_t r = 0; r < 16; r++) {
                uint32_t want = (uint32_t)hc[r][i] << 16;
                badref += memcmp(&bs[16 * i + r], &want, 4) != 0;
            }
        CHECK_MSG(badref == 0, "scalar pack16_bf16 n=%zu: %d values wrong", n, badref);
        CHECK_MSG(memcmp(bk, bs, 16 * n * sizeof(float)) == 0, "%s pack16_bf16 n=%zu differs",
                  k->name, n);
        for (int r = 0; r < 16; r++) free(hb[r]);
        /* pack16_i8_f32 from every byte value, a different scale per row: each value where
         * pack16_f32 puts it, converted as i8_to_f32 converts it */
        int8_t *qr[16];
        float qs[16];
        for (int r = 0; r < 16; r++) {
            qr[r] = malloc(n + 1);
            for (size_t i = 0; i <= n; i++) qr[r][i] = (int8_t)(uint8_t)rnd64();
            qs[r] = 0.01f + 0.0037f * (float)r;
        }
        const int8_t *const qc[16] = {qr[0] + 1,  qr[1] + 1,  qr[2] + 1,  qr[3] + 1,
                                      qr[4] + 1,  qr[5] + 1,  qr[6] + 1,  qr[7] + 1,
                                      qr[8] + 1,  qr[9] + 1,  qr[10] + 1, qr[11] + 1,
                                      qr[12] + 1, qr[13] + 1, qr[14] + 1, qr[15] + 1};
        k->pack16_i8_f32(bk, qc, qs, n);
        s->pack16_i8_f32(bs, qc, qs, n);
        badref = 0;
        for (size_t i = 0; i < n; i++)
            for (size_t r = 0; r < 16; r++) {
                const float want = (float)qc[r][i] * qs[r];
                badref += !same_float(bs[16 * i + r], want, 0);
            }
        CHECK_MSG(badref == 0, "scalar pack16_i8_f32 n=%zu: %d values wrong", n, badref);
        CHECK_MSG(memcmp(bk, bs, 16 * n * sizeof(float)) == 0, "%s pack16_i8_f32 n=%zu differs",
                  k->name, n);
        for (int r = 0; r < 16; r++) free(qr[r]);
        free(bk);
        free(bs);
        float ok_[128], os_[128];
        k->gemm16x8_f32(ps, n, xc, ok_);
        s->gemm16x8_f32(ps, n, xc, os_);
        int bad = 0;
        badref = 0;
        for (size_t t = 0; t < 8; t++)
            for (size_t r = 0; r < 16; r++) {
                float acc = 0;
                for (size_t i = 0; i < n; i++) acc = fmaf(rc[r][i], xc[t][i], acc);
                badref += memcmp(&acc, &os_[16 * t + r], 4) != 0;
                bad += memcmp(&ok_[16 * t + r], &os_[16 * t + r], 4) != 0;
            }
        CHECK_MSG(badref == 0, "scalar gemm16x8_f32 n=%zu: %d sums differ from the fmaf chain", n,
                  badref);
        CHECK_MSG(bad == 0, "%s gemm16x8_f32 n=%zu: %d sums differ from scalar", k->name, n, bad);
        /* gemm128x1_f32: eight panels, one token (xc[3], at an odd offset), each lane the fmaf
         * chain gemm16x8_f32 makes for that token */
        float *pans = malloc(8 * 16 * n * sizeof(float));
        fill(pans, 8 * 16 * n);
        const float *const pj[8] = {pans,          pans + 16 * n, pans + 32 * n, pans + 48 * n,
                                    pans + 64 * n, pans + 80 * n, pans + 96 * n, pans + 112 * n};
        k->gemm128x1_f32(pj, n, xc[3], ok_);
        s->gemm128x1_f32(pj, n, xc[3], os_);
        bad = badref = 0;
        for (size_t j = 0; j < 8; j++)
            for (size_t r = 0; r < 16; r++) {
                float acc = 0;
                for (size_t i = 0; i < n; i++) acc = fmaf(pj[j][16 * i + r], xc[3][i], acc);
                badref += memcmp(&acc, &os_[16 * j + r], 4) != 0;
                bad += memcmp(&ok_[16 * j + r], &os_[16 * j + r], 4) != 0;
            }
        CHECK_MSG(badref == 0, "scalar gemm128x1_f32 n=%zu: %d sums differ from the fmaf chain", n,
                  badref);
        CHECK_MSG(bad == 0, "%s gemm128x1_f32 n=%zu: %d sums differ from scalar", k->name, n, bad);
        free(pans);
        /* _rows: panel row i read in place as the 32 columns at off of "cached" row i (n rows of
         * 40 floats, in reverse order), first m lanes only, against the fmaf chain; x as the
         * tokens' rows, or (odd m) as lanes of a [n][16] block (attention's scores) */
        float *cache = malloc(n * 40 * sizeof(float)),
              *lanes = malloc((16 * n + 1) * sizeof(float));
        const float **rp = malloc(n * sizeof *rp);
        fill(cache, n * 40);
        fill(lanes, 16 * n + 1);
        for (size_t i = 0; i < n; i++) rp[i] = cache + (n - 1 - i) * 40; /* any order */
        const size_t ms[] = {32, 21, 16, 5, 1};
        for (size_t mi = 0; mi < 5; mi++) {
            const size_t m = ms[mi], off = 3 + mi, ldx = m % 2 ? 16 : 1;
            const float *const xl[8] = {lanes + 1,  lanes + 3,  lanes + 4,  lanes + 8,
                                        lanes + 16, lanes + 12, lanes + 15, lanes + 2};
            const float *const *xr = ldx == 1 ? xc : xl;
            float o32k[256], o32s[256];
            k->gemm32x8_f32_rows(rp, off, m, n, xr, ldx, o32k);
            s->gemm32x8_f32_rows(rp, off, m, n, xr, ldx, o32s);
            bad = badref = 0;
            for (size_t t = 0; t < 8; t++)
                for (size_t r = 0; r < 32; r++) {
                    float acc = 0;
                    for (size_t i = 0; r < m && i < n; i++)
                        acc = fmaf(rp[i][off + r], xr[t][i * ldx], acc);
                    const size_t o = 128 * (r / 16) + 16 * t + r % 16;
                    badref += memcmp(&acc, &o32s[o], 4) != 0;
                    bad += memcmp(&o32k[o], &o32s[o], 4) != 0;
                }
            CHECK_MSG(badref == 0, "scalar gemm32x8_f32_rows n=%zu m=%zu: %d sums differ", n, m,
                      badref);
            CHECK_MSG(bad == 0, "%s gemm32x8_f32_rows n=%zu m=%zu: %d sums differ from scalar",
                      k->name, n, m, bad);
        }
        free(cache);
        free(lanes);
        free(rp);
        for (int r = 0; r < 16; r++) free(rows[r]);
        for (int t = 0; t < 8; t++) free(xs[t]);
        free(pk);
        free(ps);
    }
}

/* ds_quantize_row_i8 against the formula, with ties: max |x| = 127 makes scale exactly 1, so
 * x = k + 0.5 lands on a tie that must round to even. */
/* The static quantize against its formula: ties to even, both clamps (-128 included), a NaN
 * to the zero point, per tensor and per channel. */
static void test_quantize_static(void) {
    const float x[8] = {0.25f, 0.75f, -0.25f, 10.0f, -10.0f, NAN, 0.0f, 0.1f};
    const float s1 = 0.5f, z1 = -3.0f;
    int8_t q[9];
    q[8] = 55;
    ds_quantize_row_static(x, 8, &s1, &z1, 0, q);
    /* x / 0.5 - 3: -2.5 -> -2, -1.5 -> -2, -3.5 -> -4, 17, -23, NaN -> -3, -3, -2.8 -> -3 */
    const int8_t want1[8] = {-2, -2, -4, 17, -23, -3, -3, -3};
    CHECK(memcmp(q, want1, 8) == 0 && q[8] == 55);
    const float big[3] = {1e9f, -1e9f, -64.0f}, sc[3] = {1, 1, 0.25f}, zp[3] = {0, 0, 127};
    ds_quantize_row_static(big, 3, sc, zp, 1, q);
    CHECK(q[0] == 127 && q[1] == -128 && q[2] == -128); /* -256 + 127 = -129 clamps */
}

static void test_quantize_i8(void) {
    float x[16] = {127.0f, 2.5f,    3.5f, -2.5f,   -3.5f,      0.5f,   -0.5f,   1.5f,
                   126.5f, -126.5f, 0.0f, -127.0f, 4.4999995f, 100.5f, -101.5f, 7.0f};
    const int8_t want[16] = {127, 2, 4, -2, -4, 0, 0, 2, 126, -126, 0, -127, 4, 100, -102, 7};
    int8_t q[17];
    float sc = 0;
    q[16] = 55;
    ds_quantize_row_i8(x, 16, q, &sc);
    CHECK(sc == 1.0f && memcmp(q, want, 16) == 0 && q[16] == 55);
    float z[5] = {0, -0.0f, 0, 0, 0};
    ds_quantize_row_i8(z, 5, q, &sc);
    CHECK(sc == 1.0f);
    for (int i = 0; i < 5; i++) CHECK(q[i] == 0);
    /* random rows against the formula in double (x / scale is one f32 division) */
    for (size_t si = 0; si < N_SIZES; si++) {
        size_t n = sizes[si];
        float *v = malloc(n * sizeof(float));
        int8_t *qq = malloc(n);
        float amax = 0;
        for (size_t i = 0; i < n; i++) {
            v[i] = rnd_uniform(-3, 3) * (si % 3 ? 1.0f : 1e-20f);
            if (fabsf(v[i]) > amax) amax = fabsf(v[i]);
        }
        ds_quantize_row_i8(v, (int64_t)n, qq, &sc);
        float ws = amax / 127.0f;
        int bad = sc != ws;
        for (size_t i = 0; i < n; i++) {
            double d = (double)(v[i] / ws), f = floor(d), r = d - f;
            double k = r > 0.5 ? f + 1 : r < 0.5 ? f : (fmod(f, 2) == 0 ? f : f + 1);
            if (k > 127) k = 127;
            if (k < -127) k = -127;
            bad += qq[i] != (int8_t)k;
        }
        CHECK_MSG(bad == 0, "quantize_row_i8 n=%zu: %d wrong", n, bad);
        free(v);
        free(qq);
    }
}

static void test_mat_misc(void) {
    CHECK(ds_mat_dtype_ok(DS_F32) && ds_mat_dtype_ok(DS_BF16) && ds_mat_dtype_ok(DS_F16));
    CHECK(ds_mat_dtype_ok(DS_F8_E4M3));
    CHECK(!ds_mat_dtype_ok(DS_F8_E5M2) && !ds_mat_dtype_ok(DS_I32) && !ds_mat_dtype_ok(DS_F64));
    ds_mat m = {.dtype = DS_F8_E4M3,
                .rows = 300,
                .cols = 200,
                .data = "",
                .block_rows = 128,
                .block_cols = 128};
    CHECK(ds_mat_bytes(&m) == 300 * 200 + 3 * 2 * 4);
    m.dtype = DS_BF16;
    CHECK(ds_mat_bytes(&m) == 300 * 200 * 2);
    m.dtype = DS_F32;
    CHECK(ds_mat_bytes(&m) == 300 * 200 * 4);
    CHECK(ds_mat_dtype_ok(DS_I8));
    ds_mat i8 = {
        .dtype = DS_I8, .rows = 300, .cols = 201, .data = "", .block_rows = 1, .block_cols = 201};
    CHECK(ds_mat_bytes(&i8) == 300 * 201 + 300 * 4);
    i8.int4 = 1;
    i8.block_cols = 64;
    CHECK(ds_mat_bytes(&i8) == 300 * 101 + 300 * 4 * 4);

    /* ds_mat_i8_row: per-channel int8 rows in place, their scale found through row0 (a slice),
     * converting to ds_mat_row_f32's floats; NULL for every other layout */
    enum { R = 12, C = 70 };
    int8_t q[R * C];
    float sc[R], got[C], want[C], s = 0;
    for (int i = 0; i < R * C; i++) q[i] = (int8_t)(uint8_t)(i * 53 + 7);
    for (int r = 0; r < R; r++) sc[r] = 0.02f + 0.001f * (float)r;
    ds_mat pc = {.dtype = DS_I8,
                 .rows = R,
                 .cols = C,
                 .data = q,
                 .scale = sc,
                 .block_rows = 1,
                 .block_cols = C};
    ds_mat_slice_rows(&pc, 4, R);
    const int8_t *row = ds_mat_i8_row(&pc, 3, &s);
    CHECK(row == q + 7 * C && s == sc[7]);
    if (row) {
        ds_kernels_scalar()->i8_to_f32(got, row, C, s);
        ds_mat_row_f32(&pc, 3, want);
        CHECK(memcmp(got, want, sizeof got) == 0);
    }
    ds_mat other = pc;
    other.block_cols = 64; /* blockwise */
    CHECK(ds_mat_i8_row(&other, 0, &s) == NULL);
    other = pc;
    other.int4 = 1;
    CHECK(ds_mat_i8_row(&other, 0, &s) == NULL);
    other = pc;
    other.act_n = 1; /* static activations: the real weight is divided by their step */
    CHECK(ds_mat_i8_row(&other, 0, &s) == NULL);
    other = pc;
    other.ilv = 1;
    CHECK(ds_mat_i8_row(&other, 0, &s) == NULL);
    other = pc;
    other.dtype = DS_BF16;
    CHECK(ds_mat_i8_row(&other, 0, &s) == NULL);
}

/* Runs fn in a child with DS_ISA=isa; the child's exit status is its failure count. */
static int run_child(const char *isa, const char *want_name, void (*fn)(void)) {
    fflush(NULL);
    pid_t pid = fork();
    if (pid < 0) return -1;
    if (pid == 0) {
        ds_test_failures = ds_test_checks = 0;
        setenv("DS_ISA", isa, 1);
        const ds_kernels *k = ds_kernels_get();
        CHECK_MSG(strcmp(k->name, want_name) == 0, "DS_ISA=%s chose %s, not %s", isa, k->name,
                  want_name);
        if (fn) fn();
        char name[64];
        snprintf(name, sizeof name, "test_kernels[DS_ISA=%s]", isa);
        int rc = ds_test_finish(name);
        exit(rc); /* not _exit: LeakSanitizer checks the child at exit */
    }
    int st = 0;
    if (waitpid(pid, &st, 0) < 0) return -1;
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128;
}

/* ---- 4. row ops ---- */
static void test_row_ops(void) {
    size_t maxn = sizes[N_SIZES - 1];
    float *x = malloc(maxn * sizeof(float)), *w = malloc(maxn * sizeof(float));
    float *o = malloc(maxn * sizeof(float)), *o2 = malloc(maxn * sizeof(float));
    for (size_t si = 0; si < N_SIZES; si++) {
        size_t n = sizes[si];
        for (size_t i = 0; i < n; i++) {
            x[i] = rnd_uniform(-3, 3);
            w[i] = rnd_uniform(0.5f, 1.5f);
        }
        const float eps = 1e-6f;
        double ss = 0;
        for (size_t i = 0; i < n; i++) ss += (double)x[i] * x[i];
        double r = 1.0 / sqrt(ss / (double)n + eps);
        ds_rmsnorm(o, x, w, (int64_t)n, eps);
        int bad = 0;
        for (size_t i = 0; i < n; i++) {
            double want = x[i] * r * w[i];
            bad += fabs(o[i] - want) > 1e-6 * fabs(want) + 1e-30;
        }
        CHECK_MSG(bad == 0, "rmsnorm n=%zu: %d elements off", n, bad);
        memcpy(o2, x, n * sizeof(float));
        ds_rmsnorm(o2, o2, w, (int64_t)n, eps);
        CHECK_MSG(memcmp(o, o2, n * sizeof(float)) == 0, "rmsnorm n=%zu: in place differs", n);

        /* softmax: large magnitudes, so an unsubtracted max would overflow expf */
        double mx = -INFINITY, sum = 0;
        for (size_t i = 0; i < n; i++) {
            x[i] = rnd_uniform(-20, 20) + (si % 2 ? 500.0f : 0.0f);
            if (x[i] > mx) mx = x[i];
        }
        for (size_t i = 0; i < n; i++) sum += exp((double)x[i] - mx);
        memcpy(o, x, n * sizeof(float));
        ds_softmax(o, (int64_t)n);
        bad = 0;
        double total = 0;
        for (size_t i = 0; i < n; i++) {
            double want = exp((double)x[i] - mx) / sum;
            /* x - max is rounded to f32 first: up to ~40 * 2^-24 absolute in the exponent */
            bad += !(fabs(o[i] - want) <= 5e-6 * want + 1e-30);
            total += o[i];
        }
        CHECK_MSG(bad == 0, "softmax n=%zu: %d elements off", n, bad);
        CHECK_NEAR(total, 1.0, 1e-5);

        for (size_t i = 0; i < n; i++) {
            x[i] = rnd_uniform(-12, 12);
            w[i] = rnd_uniform(-2, 2);
        }
        memcpy(o, x, n * sizeof(float));
        ds_swiglu(o, w, (int64_t)n);
        bad = 0;
        for (size_t i = 0; i < n; i++) {
            double a = x[i], want = a / (1.0 + exp(-a)) * w[i];
            bad += !(fabs(o[i] - want) <= 1e-6 * fabs(want) + 1e-12);
        }
        CHECK_MSG(bad == 0, "swiglu n=%zu: %d elements off", n, bad);
    }
    free(x);
    free(w);
    free(o);
    free(o2);
}

/* ds_softmax: the serial scan's floats, for rows with a NaN (late or first), all -inf, and of
 * mixed magnitudes. */
static void test_softmax(void) {
    const int64_t ns[] = {1, 7, 8, 9, 40, 133};
    for (size_t ni = 0; ni < sizeof ns / sizeof ns[0]; ni++) {
        const int64_t n = ns[ni];
        float *x = malloc((size_t)n * sizeof(float)), *y = malloc((size_t)n * sizeof(float));
        for (int kind = 0; kind < 4; kind++) {
            for (int64_t i = 0; i < n; i++)
                x[i] = kind == 3 ? -INFINITY : rnd_uniform(-30, 30) + (i % 3 ? 0 : 200);
            if (kind == 1) x[n / 2] = NAN;
            if (kind == 2) x[0] = NAN;
            memcpy(y, x, (size_t)n * sizeof(float));
            ds_softmax(x, n);
            softmax_serial(ds_kernels_get(), y, n, 1);
            CHECK_MSG(memcmp(x, y, (size_t)n * sizeof(float)) == 0,
                      "softmax n=%lld kind %d: differs from the serial scan", (long long)n, kind);
            CHECK_MSG(kind == 0 || isnan(x[0]), "softmax n=%lld kind %d: came out finite",
                      (long long)n, kind);
        }
        free(x);
        free(y);
    }
}

/* The AVX2 and AVX-512 tables evaluate exp, SwiGLU and softmax16 by the same steps (AVX2 applies
 * 2^k in two exact halves where AVX-512 has scalef): where a machine runs both, the same floats
 * for every x from -110 to 100 in steps of 2^-9 (subnormal and infinite results included), the
 * special values, and softmax rows. */
static void test_simd_exp_agree(void) {
    const ds_kernels *a = ds_kernels_for("avx2"), *b = ds_kernels_for("avx512");
    if (!a || !b) {
        printf("note: no avx2 and avx512 tables side by side here; exp agreement not checked\n");
        return;
    }
    const size_t n = 210 * 512 + 8;
    float *x = malloc(n * sizeof(float)), *ya = malloc(n * sizeof(float)),
          *yb = malloc(n * sizeof(float)), *g = malloc(n * sizeof(float));
    for (size_t i = 0; i < n - 8; i++) x[i] = -110.0f + (float)i * 0x1p-9f;
    const float sp[8] = {NAN, INFINITY, -INFINITY, 0.0f, -0.0f, 1e30f, -1e30f, 88.72283f};
    memcpy(x + n - 8, sp, sizeof sp);
    a->exp_f32(ya, x, n);
    b->exp_f32(yb, x, n);
    int bad = 0;
    for (size_t i = 0; i < n; i++) bad += !same_float(ya[i], yb[i], 1);
    CHECK_MSG(bad == 0, "exp_f32: avx2 and avx512 differ at %d of %zu values", bad, n);
    for (size_t i = 0; i < n; i++) g[i] = rnd_uniform(-3, 3);
    memcpy(ya, x, n * sizeof(float));
    memcpy(yb, x, n * sizeof(float));
    a->swiglu_f32(ya, g, n);
    b->swiglu_f32(yb, g, n);
    bad = 0;
    for (size_t i = 0; i < n; i++) bad += !same_float(ya[i], yb[i], 1);
    CHECK_MSG(bad == 0, "swiglu_f32: avx2 and avx512 differ at %d of %zu values", bad, n);
    const size_t rows = n / 16;
    for (size_t i = 0; i < 16 * rows; i++) ya[i] = yb[i] = rnd_uniform(-90, 30);
    a->softmax16_f32(ya, rows);
    b->softmax16_f32(yb, rows);
    bad = 0;
    for (size_t i = 0; i < 16 * rows; i++) bad += !same_float(ya[i], yb[i], 1);
    CHECK_MSG(bad == 0, "softmax16_f32: avx2 and avx512 differ at %d of %zu values", bad,
              16 * rows);
    free(x);
    free(ya);
    free(yb);
    free(g);
}

/* One timed configuration: best of `iters` calls, reported against the read bandwidth bw. */
int main(void) {
    ds_log_set_level(DS_LOG_ERROR); /* the DS_ISA fallbacks below warn on purpose */

    /* The forks come first: once this process calls ds_kernels_get() its choice is fixed, and a
     * child would inherit it. */
    const char *best = "scalar";
    for (size_t i = 0; i < N_ISAS; i++)
        if (ds_kernels_for(isas[i]) && strcmp(isas[i], "neon") != 0) best = isas[i];
    if (ds_kernels_for("neon")) best = "neon";
    for (size_t i = 0; i < N_ISAS; i++) {
        if (!ds_kernels_for(isas[i])) {
            printf("note: no %s table on this machine/build; skipping it\n", isas[i]);
            continue;
        }
        int rc = run_child(isas[i], isas[i], matmul_suite);
        CHECK_MSG(rc == 0, "matmul suite under DS_ISA=%s failed (status %d)", isas[i], rc);
    }
    /* unknown and unavailable names fall back to the best table */
    CHECK(run_child("bogus", best, NULL) == 0);
    CHECK(run_child(strcmp(best, "neon") == 0 ? "avx512" : "neon", best, NULL) == 0);

    test_scalar_formulas();
    for (size_t i = 0; i < N_ISAS; i++) {
        const ds_kernels *k = ds_kernels_for(isas[i]);
        if (!k) continue;
        CHECK(strcmp(k->name, isas[i]) == 0);
        CHECK(k->bf16_to_f32 && k->f16_to_f32 && k->fp8_to_f32 && k->dot_f32 && k->dot4_f32 &&
              k->axpy_f32);
        CHECK(k->dot4_bf16 && k->dot4_f16 && k->dot4_fp8 && k->dot4xn_bf16 && k->dot4x2_f16 &&
              k->dot4x2_fp8);
        test_conversions(k);
        test_dot(k);
        test_fused(k);
        test_dot4xn_bf16(k);
        CHECK(k->argmax_f32 && k->swiglu_f32 && k->exp_f32 && k->dot4_i8 && k->dot4_i4 &&
              k->pack16_i8 && k->pack16_i4 && k->gemm16x8_i8 && k->gemm32x8_i8 && k->pack16_f32 &&
              k->pack16_bf16 && k->pack16_i8_f32 && k->gemm16x8_f32 && k->gemm32x8_f32_rows &&
              k->axpy_i8 && k->axpy_bf16 && k->axpy_rows_i8_lanes && k->axpy_rows_i8 &&
              k->axpy_rows_bf16 && k->rmsnorm_f32 && k->softmax16_f32 && k->sum_i8);
        test_int_dots(k);
        test_int_dequant(k);
        test_axpy_rows(k);
        test_axpy_rows_many(k);
        test_quant_kernels(k);
        test_argmax(k);
        test_swiglu(k);
        test_rmsnorm(k);
        test_exp(k);
        test_softmax16(k);
        test_bf16_split(k);
        test_gemm(k);
        test_fgemm(k);
        printf("table %s: conversions, dot, dot4, axpy, fused dot4 / dot4x2 / dot4xn, dot4_i8 / "
               "dot4_i4, "
               "argmax, swiglu, rmsnorm, int8 and f32 pack16 / gemm16x8 checked\n",
               k->name);
    }
    test_simd_exp_agree();
    CHECK(ds_kernels_for("bogus") == NULL && ds_kernels_for(NULL) == NULL);
    /* DS_ISA may be set for this run: then that table, when it exists here */
    const char *env = getenv("DS_ISA");
    const char *want = env && ds_kernels_for(env) ? env : best;
    CHECK_MSG(strcmp(ds_kernels_get()->name, want) == 0, "chose %s, expected %s",
              ds_kernels_get()->name, want);
    test_mat_misc();
    test_quantize_i8();
    test_quantize_static();
    test_i4_split();
    test_row_ops();
    test_softmax();

    ds_pool *p2 = ds_pool_open(2);
    double bw = ds_measure_read_bandwidth(p2, (size_t)32 << 20);
    CHECK_MSG(bw > 1e8 && bw < 1e13, "read bandwidth %g B/s", bw);
    printf("read bandwidth (32 MiB, 2 threads): %.2f GB/s\n", bw / 1e9);
    ds_pool_close(p2);

    return ds_test_finish("test_kernels");
}
