/* The scalar reference table: complete, portable C, and the oracle every SIMD table is tested
 * against. Conversions are exact by construction (see the decoders in kernels_isa.h); the dot
 * products use eight independent accumulators, which both lets the CPU overlap the additions
 * and keeps the rounding error of long sums smaller than one serial chain would.
 *
 * Every load goes through memcpy: the kernels promise to accept unaligned pointers (weights are
 * views into a safetensors mmap whose data offset need not be aligned), and memcpy is the only
 * portable way to read a misaligned float or uint16_t. Compilers turn it into a plain load. */
#include "kernels/kernels_isa.h"

#include <math.h>

static inline float ld_f32(const float *p, size_t i) {
    float v;
    memcpy(&v, (const unsigned char *)p + i * sizeof v, sizeof v);
    return v;
}

static inline uint16_t ld_u16(const uint16_t *p, size_t i) {
    uint16_t v;
    memcpy(&v, (const unsigned char *)p + i * sizeof v, sizeof v);
    return v;
}

static inline void st_f32(float *p, size_t i, float v) {
    memcpy((unsigned char *)p + i * sizeof v, &v, sizeof v);
}

static void bf16_to_f32_scalar(float *dst, const uint16_t *src, size_t n) {
    for (size_t i = 0; i < n; i++) st_f32(dst, i, ds_bf16_decode(ld_u16(src, i)));
}

static void f16_to_f32_scalar(float *dst, const uint16_t *src, size_t n) {
    for (size_t i = 0; i < n; i++) st_f32(dst, i, ds_f16_decode(ld_u16(src, i)));
}

static void fp8_to_f32_scalar(float *dst, const uint8_t *src, size_t n, float scale) {
    for (size_t i = 0; i < n; i++) st_f32(dst, i, ds_e4m3_decode(src[i]) * scale);
}

static float dot_f32_scalar(const float *a, const float *b, size_t n) {
    float acc[8] = {0};
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; k++) acc[k] += ld_f32(a, i + k) * ld_f32(b, i + k);
    for (int k = 0; i < n; i++, k++) acc[k] += ld_f32(a, i) * ld_f32(b, i);
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

static void dot4_f32_scalar(const float *x, const float *const w[4], size_t n, float out[4]) {
    /* two partial sums per row: enough independent chains to hide the add latency */
    float acc[4][2] = {{0}};
    size_t i = 0;
    for (; i + 2 <= n; i += 2) {
        float x0 = ld_f32(x, i), x1 = ld_f32(x, i + 1);
        for (int r = 0; r < 4; r++) {
            acc[r][0] += x0 * ld_f32(w[r], i);
            acc[r][1] += x1 * ld_f32(w[r], i + 1);
        }
    }
    if (i < n) {
        float x0 = ld_f32(x, i);
        for (int r = 0; r < 4; r++) acc[r][0] += x0 * ld_f32(w[r], i);
    }
    for (int r = 0; r < 4; r++) out[r] = acc[r][0] + acc[r][1];
}

/* The fused kernels below decode each weight on the fly, in the order and with the two-chain
 * accumulation of dot4_f32_scalar: on the same data they give the same sums as decoding a row
 * with bf16_to_f32 / f16_to_f32 first and calling dot4_f32. */
#define DOT4_DECODED(DECODE)                                                                       \
    do {                                                                                           \
        float acc[4][2] = {{0}};                                                                   \
        size_t i = 0;                                                                              \
        for (; i + 2 <= n; i += 2) {                                                               \
            float x0 = ld_f32(x, i), x1 = ld_f32(x, i + 1);                                        \
            for (int r = 0; r < 4; r++) {                                                          \
                acc[r][0] += x0 * DECODE(w[r], i);                                                 \
                acc[r][1] += x1 * DECODE(w[r], i + 1);                                             \
            }                                                                                      \
        }                                                                                          \
        if (i < n) {                                                                               \
            float x0 = ld_f32(x, i);                                                               \
            for (int r = 0; r < 4; r++) acc[r][0] += x0 * DECODE(w[r], i);                         \
        }                                                                                          \
        for (int r = 0; r < 4; r++) out[r] = acc[r][0] + acc[r][1];                                \
    } while (0)

#define LD_BF16(p, i) ds_bf16_decode(ld_u16((p), (i)))
#define LD_F16(p, i) ds_f16_decode(ld_u16((p), (i)))

static void dot4_bf16_scalar(const float *x, const uint16_t *const w[4], size_t n, float out[4]) {
    DOT4_DECODED(LD_BF16);
}

static void dot4_f16_scalar(const float *x, const uint16_t *const w[4], size_t n, float out[4]) {
    DOT4_DECODED(LD_F16);
}

/* Per block of `block` columns: the unscaled partial sums of x * e4m3(w), then times the block's
 * scale, added to the row total. */
static void dot4_fp8_scalar(const float *x, const uint8_t *const w[4], const float *const scale[4],
                            size_t n, size_t block, float out[4]) {
    float tot[4] = {0};
    for (size_t c0 = 0, b = 0; c0 < n; c0 += block, b++) {
        size_t len = n - c0 < block ? n - c0 : block;
        float acc[4][2] = {{0}};
        size_t i = 0;
        for (; i + 2 <= len; i += 2) {
            float x0 = ld_f32(x, c0 + i), x1 = ld_f32(x, c0 + i + 1);
            for (int r = 0; r < 4; r++) {
                acc[r][0] += x0 * ds_e4m3_decode(w[r][c0 + i]);
                acc[r][1] += x1 * ds_e4m3_decode(w[r][c0 + i + 1]);
            }
        }
        if (i < len) {
            float x0 = ld_f32(x, c0 + i);
            for (int r = 0; r < 4; r++) acc[r][0] += x0 * ds_e4m3_decode(w[r][c0 + i]);
        }
        for (int r = 0; r < 4; r++) tot[r] += (acc[r][0] + acc[r][1]) * ld_f32(scale[r], b);
    }
    for (int r = 0; r < 4; r++) out[r] = tot[r];
}

/* Two tokens: the one-token loops above run for x0 and x1 side by side on each decoded weight,
 * so out[r] and out[4 + r] equal what dot4_<dtype>_scalar gives for x0 and x1 separately. */
#define DOT4X2_DECODED(DECODE)                                                                     \
    do {                                                                                           \
        float acc[8][2] = {{0}};                                                                   \
        size_t i = 0;                                                                              \
        for (; i + 2 <= n; i += 2) {                                                               \
            float p0 = ld_f32(x0, i), p1 = ld_f32(x0, i + 1);                                      \
            float q0 = ld_f32(x1, i), q1 = ld_f32(x1, i + 1);                                      \
            for (int r = 0; r < 4; r++) {                                                          \
                float v0 = DECODE(w[r], i), v1 = DECODE(w[r], i + 1);                              \
                acc[r][0] += p0 * v0;                                                              \
                acc[r][1] += p1 * v1;                                                              \
                acc[4 + r][0] += q0 * v0;                                                          \
                acc[4 + r][1] += q1 * v1;                                                          \
            }                                                                                      \
        }                                                                                          \
        if (i < n) {                                                                               \
            float p0 = ld_f32(x0, i), q0 = ld_f32(x1, i);                                          \
            for (int r = 0; r < 4; r++) {                                                          \
                float v0 = DECODE(w[r], i);                                                        \
                acc[r][0] += p0 * v0;                                                              \
                acc[4 + r][0] += q0 * v0;                                                          \
            }                                                                                      \
        }                                                                                          \
        for (int r = 0; r < 8; r++) out[r] = acc[r][0] + acc[r][1];                                \
    } while (0)

#define LD_E4M3(p, i) ds_e4m3_decode((p)[i])

/* The unscaled sums of one FP8 block for two tokens. */
static void dot4x2_fp8_block(const float *x0, const float *x1, const uint8_t *const w[4], size_t n,
                             float out[8]) {
    DOT4X2_DECODED(LD_E4M3);
}

/* The 16-lane order every table follows (see kernels.h). */
static float lanes_sum16(const float l[16]) {
    float s8[8], s4[4];
    for (int i = 0; i < 8; i++) s8[i] = l[i] + l[i + 8];
    for (int i = 0; i < 4; i++) s4[i] = s8[i] + s8[i + 4];
    return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

static void dot4xn_bf16_scalar(const float *const x[4], int nx, const uint16_t *const w[4],
                               size_t n, size_t step, const char *pf, size_t n_pf, float out[16]) {
    (void)pf; /* the scalar table does not prefetch */
    (void)n_pf;
    for (int t = 0; t < nx; t++)
        for (int r = 0; r < 4; r++) {
            float l[16] = {0};
            size_t i = 0;
            for (; i + 32 <= n; i += 32) {
                const uint16_t *wp = w[r] + i / 32 * step; /* this piece of 32 columns */
                for (size_t j = 0; j < 16; j++) {
                    l[j] = fmaf(ld_f32(x[t], i + j), LD_BF16(wp, 2 * j), l[j]);
                    l[j] = fmaf(ld_f32(x[t], i + 16 + j), LD_BF16(wp, 2 * j + 1), l[j]);
                }
            }
            const uint16_t *wt = w[r] + i / 32 * step - i; /* the last piece, at column i */
            for (; i < n; i += 16)
                for (size_t j = 0; j < 16; j++)
                    l[j] = i + j < n ? fmaf(ld_f32(x[t], i + j), LD_BF16(wt, i + j), l[j])
                                     : fmaf(0.0f, 0.0f, l[j]);
            out[4 * t + r] = lanes_sum16(l);
        }
}

static void dot4x2_f16_scalar(const float *x0, const float *x1, const uint16_t *const w[4],
                              size_t n, float out[8]) {
    DOT4X2_DECODED(LD_F16);
}

static void dot4x2_fp8_scalar(const float *x0, const float *x1, const uint8_t *const w[4],
                              const float *const scale[4], size_t n, size_t block, float out[8]) {
    float tot[8] = {0};
    for (size_t c0 = 0, b = 0; c0 < n; c0 += block, b++) {
        size_t len = n - c0 < block ? n - c0 : block;
        const uint8_t *const wb[4] = {w[0] + c0, w[1] + c0, w[2] + c0, w[3] + c0};
        float part[8];
        dot4x2_fp8_block(x0 + c0, x1 + c0, wb, len, part);
        for (int r = 0; r < 8; r++) tot[r] += part[r] * ld_f32(scale[r % 4], b);
    }
    for (int r = 0; r < 8; r++) out[r] = tot[r];
}

static void axpy_f32_scalar(float *y, float a, const float *x, size_t n) {
    for (size_t i = 0; i < n; i++) st_f32(y, i, fmaf(a, ld_f32(x, i), ld_f32(y, i)));
}

static void axpy_i8_scalar(float *y, float a, const int8_t *q, float scale, size_t n) {
    for (size_t i = 0; i < n; i++) st_f32(y, i, fmaf(a, (float)q[i] * scale, ld_f32(y, i)));
}

static void axpy_bf16_scalar(float *y, float a, const uint16_t *w, size_t n) {
    for (size_t i = 0; i < n; i++)
        st_f32(y, i, fmaf(a, ds_bf16_decode(ld_u16(w, i)), ld_f32(y, i)));
}

/* w[j][i] of the axpy_rows kernels (kernels.h): kind 0 int8 x column scale, 1 int8 x row
 * scale, 2 BF16 */
static float rows_w(const void *w, size_t j, size_t n, size_t i, const float *scale, int kind) {
    if (kind == 2) return ds_bf16_decode(ld_u16(w, j * n + i));
    return (float)((const int8_t *)w)[j * n + i] * scale[kind ? j : i];
}

static void axpy_rows_scalar(float *y, const float *x, const void *w, size_t m, size_t n,
                             const float *scale, int kind) {
    for (size_t i = 0; i < n; i++) {
        float acc = 0.0f;
        for (size_t j = 0; j < m; j++)
            acc = fmaf(ld_f32(x, j), rows_w(w, j, n, i, scale, kind), acc);
        st_f32(y, i, acc);
    }
}

static void axpy_rows_i8_lanes_scalar(float *y, const float *x, const int8_t *q, size_t m, size_t n,
                                      const float *scale) {
    axpy_rows_scalar(y, x, q, m, n, scale, 0);
}

static void axpy_rows_i8_scalar(float *y, const float *x, const int8_t *q, size_t m, size_t n,
                                const float *row_scale) {
    axpy_rows_scalar(y, x, q, m, n, row_scale, 1);
}

static void axpy_rows_bf16_scalar(float *y, const float *x, const uint16_t *w, size_t m, size_t n) {
    axpy_rows_scalar(y, x, w, m, n, NULL, 2);
}

/* Integer dots: plain int32 sums per block and row, the oracle of the SIMD reorderings. */
static void dot4_i8_scalar(const int8_t *const x[4], const int32_t *const xoff[4], int nx,
                           const int8_t *const w[4], size_t n, size_t block, size_t step,
                           const char *pf, size_t n_pf, int32_t *out) {
    (void)xoff; /* signed products need no offset */
    (void)pf;   /* the scalar table does not prefetch */
    (void)n_pf;
    for (size_t c0 = 0, b = 0; c0 < n; c0 += block, b++) {
        size_t len = n - c0 < block ? n - c0 : block;
        for (int t = 0; t < nx; t++)
            for (int r = 0; r < 4; r++) {
                int32_t s = 0;
                for (size_t i = c0; i < c0 + len; i++)
                    s += (int32_t)x[t][i] * (int32_t)w[r][ds_i8_at(i, step)];
                out[4 * (nx * b + (size_t)t) + (size_t)r] = s;
            }
    }
}

/* Reads x back out of the split layout (ds_i4_split) step by step. */
static void dot4_i4_scalar(const int8_t *xs, const int32_t *xoff, const uint8_t *const w[4],
                           size_t n, size_t block, int32_t *out) {
    (void)xoff; /* the unsplit sum needs no offset */
    for (size_t c0 = 0, b = 0; c0 < n; c0 += block, b++) {
        size_t end = n - c0 < block ? n : c0 + block;
        int32_t s[4] = {0, 0, 0, 0};
        for (size_t i0 = c0; i0 < end; i0 += 128) {
            size_t len = end - i0 < 128 ? end - i0 : 128, ne = (len + 1) / 2;
            for (size_t j = 0; j < len; j++) {
                int32_t xv = xs[i0 + (j % 2 ? ne + j / 2 : j / 2)];
                for (int r = 0; r < 4; r++) s[r] += xv * ds_i4_get(w[r], i0 + j);
            }
        }
        memcpy(out + 4 * b, s, sizeof s);
    }
}

/* Panel byte of row r, column c: the unsigned w + off, 0 past n (see ds_kernels.pack16_i8). */
static void pack16_i8_scalar(uint8_t *panel, const int8_t *const w[16], size_t n, size_t step) {
    for (size_t g = 0; g < (n + 3) / 4; g++)
        for (size_t r = 0; r < 16; r++)
            for (size_t j = 0; j < 4; j++) {
                size_t c = 4 * g + j;
                panel[64 * g + 4 * r + j] = c < n ? (uint8_t)(w[r][ds_i8_at(c, step)] + 128) : 0;
            }
}

static void pack16_i4_scalar(uint8_t *panel, const uint8_t *const w[16], size_t n) {
    for (size_t g = 0; g < (n + 3) / 4; g++)
        for (size_t r = 0; r < 16; r++)
            for (size_t j = 0; j < 4; j++) {
                size_t c = 4 * g + j;
                panel[64 * g + 4 * r + j] = c < n ? (uint8_t)(ds_i4_get(w[r], c) + 8) : 0;
            }
}

static void gemm16x8_i8_scalar(const uint8_t *panel, size_t n, size_t block, int nt,
                               const int8_t *const x[8], const int32_t *const xoff[8],
                               const float *sw, const char *pf, size_t n_pf, float out[128]) {
    (void)pf; /* the scalar table does not prefetch */
    (void)n_pf;
    size_t ng = (n + 3) / 4, bg = block >= n ? ng : block / 4; /* groups per block */
    for (size_t t = 0; t < (size_t)nt; t++)
        for (size_t r = 0; r < 16; r++) {
            float acc = 0;
            for (size_t g0 = 0, b = 0; g0 < ng; g0 += bg, b++) {
                uint32_t s = 0; /* wraps like the SIMD lanes; the final difference is exact */
                for (size_t g = g0; g < g0 + bg && g < ng; g++)
                    for (size_t j = 0; j < 4; j++)
                        s += (uint32_t)((int32_t)x[t][4 * g + j] * panel[64 * g + 4 * r + j]);
                int32_t isum = (int32_t)(s - (uint32_t)xoff[t][b]);
                acc = fmaf((float)isum, sw[16 * b + r], acc);
            }
            out[16 * t + r] = acc;
        }
}

static void gemm32x8_i8_scalar(const uint8_t *panel0, const uint8_t *panel1, size_t n, size_t block,
                               const int8_t *const x[8], const int32_t *const xoff[8],
                               const float *sw0, const float *sw1, const char *pf, size_t n_pf,
                               float out[256]) {
    gemm16x8_i8_scalar(panel0, n, block, 8, x, xoff, sw0, pf, n_pf, out);
    gemm16x8_i8_scalar(panel1, n, block, 8, x, xoff, sw1, NULL, 0, out + 128);
}

static float absmax_f32_scalar(const float *x, size_t n) {
    float amax = 0.0f;
    for (size_t i = 0; i < n; i++) {
        float a = fabsf(ld_f32(x, i));
        if (a > amax) amax = a;
    }
    return amax;
}

static int64_t argmax_f32_scalar(const float *x, size_t n) {
    float m = -INFINITY;
    int64_t am = -1;
    for (size_t i = 0; i < n; i++) {
        float v = ld_f32(x, i);
        if (isnan(v)) return (int64_t)i;
        if (v > m) {
            m = v;
            am = (int64_t)i;
        }
    }
    return am;
}

static void exp_f32_scalar(float *dst, const float *x, size_t n) {
    for (size_t i = 0; i < n; i++) dst[i] = expf(x[i]);
}

static void softmax16_f32_scalar(float *x, size_t n) {
    float mx[16];
    double sum[16] = {0};
    for (size_t l = 0; l < 16; l++) {
        mx[l] = ld_f32(x, l);
        for (size_t i = 1; i < n; i++)
            if (ld_f32(x, 16 * i + l) > mx[l]) mx[l] = ld_f32(x, 16 * i + l);
    }
    for (size_t i = 0; i < n; i++)
        for (size_t l = 0; l < 16; l++) st_f32(x, 16 * i + l, ld_f32(x, 16 * i + l) - mx[l]);
    exp_f32_scalar(x, x, 16 * n);
    for (size_t i = 0; i < n; i++)
        for (size_t l = 0; l < 16; l++) sum[l] += ld_f32(x, 16 * i + l);
    for (size_t l = 0; l < 16; l++) {
        const float inv = (float)(1.0 / sum[l]);
        for (size_t i = 0; i < n; i++) st_f32(x, 16 * i + l, ld_f32(x, 16 * i + l) * inv);
    }
}

/* One chain waited an add's latency per element; the eight let the adds overlap. Medium W8A8, one
 * chain and eight alternating step by step (medians of 16 steps): the norms and residual adds
 * 3.47 -> 3.15 ms a step at 192 sequences, 0.69 -> 0.63 at 32. */
static void rmsnorm_f32_scalar(float *out, const float *x, const float *w, size_t n, float eps) {
    double s[8] = {0};
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (size_t j = 0; j < 8; j++) s[j] += (double)ld_f32(x, i + j) * (double)ld_f32(x, i + j);
    for (size_t j = 0; i < n; i++, j++) s[j] += (double)ld_f32(x, i) * (double)ld_f32(x, i);
    const double ss = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
    /* torch: x * rsqrt(mean(x^2) + eps) * w, with mean and rsqrt in f32 */
    const float r = 1.0f / sqrtf((float)(ss / (double)n) + eps);
    /* element i is read before it is written, so out may alias x */
    for (i = 0; i < n; i++) st_f32(out, i, (ld_f32(x, i) * r) * ld_f32(w, i));
}

static void bf16_split_scalar(const float *x, size_t n, float *xs) {
    size_t i = 0;
    for (; i + 32 <= n; i += 32)
        for (size_t l = 0; l < 16; l++) {
            xs[i + l] = x[i + 2 * l];
            xs[i + 16 + l] = x[i + 2 * l + 1];
        }
    memcpy(xs + i, x + i, (n - i) * sizeof *x);
}

static void swiglu_f32_scalar(float *a, const float *b, size_t n) {
    for (size_t i = 0; i < n; i++) {
        float v = a[i];
        a[i] = v / (1.0f + expf(-v)) * b[i];
    }
}

static void quantize_i8_scalar(const float *x, size_t n, float s, int8_t *q) {
    for (size_t i = 0; i < n; i++) {
        float v = nearbyintf(ld_f32(x, i) / s);
        if (v > 127.0f) v = 127.0f;
        if (v < -127.0f) v = -127.0f;
        if (v != v) v = 0.0f; /* NaN: converting it would be undefined */
        q[i] = (int8_t)v;
    }
}

/* 16 lanes of partial sums with a fixed count, which gcc -O2 vectorises (its cheap cost model
 * skips loops that need a tail); a lane holds at most n / 16 * 128 in magnitude */
static int64_t sum_i8_scalar(const int8_t *q, size_t n) {
    int64_t sum = 0, lane[16] = {0};
    size_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (size_t l = 0; l < 16; l++) lane[l] += q[i + l];
    for (size_t l = 0; l < 16; l++) sum += lane[l];
    for (; i < n; i++) sum += q[i];
    return sum;
}

static void i8_to_f32_scalar(float *dst, const int8_t *src, size_t n, float scale) {
    for (size_t i = 0; i < n; i++) dst[i] = (float)src[i] * scale;
}

static void i8_to_f32_lanes_scalar(float *dst, const int8_t *src, size_t n, const float *scale) {
    for (size_t i = 0; i < n; i++) dst[i] = (float)src[i] * scale[i];
}

static void i4_to_f32_scalar(float *dst, const uint8_t *src, size_t n, float scale) {
    for (size_t i = 0; i < n; i++) dst[i] = (float)ds_i4_get(src, i) * scale;
}

static void pack16_f32_scalar(float *panel, const float *const rows[16], size_t n) {
    for (size_t i = 0; i < n; i++)
        for (size_t r = 0; r < 16; r++) panel[16 * i + r] = ld_f32(rows[r], i);
}

static void pack16_i8_f32_scalar(float *panel, const int8_t *const rows[16], const float scale[16],
                                 size_t n) {
    for (size_t i = 0; i < n; i++)
        for (size_t r = 0; r < 16; r++) panel[16 * i + r] = (float)rows[r][i] * scale[r];
}

static void pack16_bf16_scalar(float *panel, const uint16_t *const rows[16], size_t n) {
    for (size_t i = 0; i < n; i++)
        for (size_t r = 0; r < 16; r++) panel[16 * i + r] = ds_bf16_decode(ld_u16(rows[r], i));
}

static void gemm16x8_f32_scalar(const float *panel, size_t n, const float *const x[8],
                                float out[128]) {
    for (size_t t = 0; t < 8; t++)
        for (size_t r = 0; r < 16; r++) {
            float acc = 0;
            for (size_t i = 0; i < n; i++) acc = fmaf(panel[16 * i + r], ld_f32(x[t], i), acc);
            out[16 * t + r] = acc;
        }
}

static void gemm32x8_f32_rows_scalar(const float *const *rows, size_t off, size_t m, size_t n,
                                     const float *const x[8], size_t ldx, float out[256]) {
    for (size_t t = 0; t < 8; t++)
        for (size_t r = 0; r < 32; r++) {
            float acc = 0;
            for (size_t i = 0; r < m && i < n; i++)
                acc = fmaf(ld_f32(rows[i], off + r), ld_f32(x[t], i * ldx), acc);
            out[128 * (r / 16) + 16 * t + r % 16] = acc;
        }
}

static void gemm128x1_f32_scalar(const float *const panel[8], size_t n, const float *x,
                                 float out[128]) {
    for (size_t j = 0; j < 8; j++)
        for (size_t r = 0; r < 16; r++) {
            float acc = 0;
            for (size_t i = 0; i < n; i++) acc = fmaf(panel[j][16 * i + r], ld_f32(x, i), acc);
            out[16 * j + r] = acc;
        }
}

static const ds_kernels scalar_table = {
    .name = "scalar",
    .bf16_to_f32 = bf16_to_f32_scalar,
    .f16_to_f32 = f16_to_f32_scalar,
    .fp8_to_f32 = fp8_to_f32_scalar,
    .absmax_f32 = absmax_f32_scalar,
    .argmax_f32 = argmax_f32_scalar,
    .swiglu_f32 = swiglu_f32_scalar,
    .exp_f32 = exp_f32_scalar,
    .softmax16_f32 = softmax16_f32_scalar,
    .rmsnorm_f32 = rmsnorm_f32_scalar,
    .bf16_split = bf16_split_scalar,
    .quantize_i8 = quantize_i8_scalar,
    .sum_i8 = sum_i8_scalar,
    .i8_to_f32 = i8_to_f32_scalar,
    .i4_to_f32 = i4_to_f32_scalar,
    .i8_to_f32_lanes = i8_to_f32_lanes_scalar,
    .dot_f32 = dot_f32_scalar,
    .dot4_f32 = dot4_f32_scalar,
    .axpy_f32 = axpy_f32_scalar,
    .axpy_i8 = axpy_i8_scalar,
    .axpy_rows_i8_lanes = axpy_rows_i8_lanes_scalar,
    .axpy_rows_i8 = axpy_rows_i8_scalar,
    .axpy_rows_bf16 = axpy_rows_bf16_scalar,
    .axpy_bf16 = axpy_bf16_scalar,
    .dot4_bf16 = dot4_bf16_scalar,
    .dot4_f16 = dot4_f16_scalar,
    .dot4_fp8 = dot4_fp8_scalar,
    .dot4xn_bf16 = dot4xn_bf16_scalar,
    .dot4x2_f16 = dot4x2_f16_scalar,
    .dot4x2_fp8 = dot4x2_fp8_scalar,
    .dot4_i8 = dot4_i8_scalar,
    .dot4_i4 = dot4_i4_scalar,
    .pack16_i8 = pack16_i8_scalar,
    .pack16_i4 = pack16_i4_scalar,
    .gemm16x8_i8 = gemm16x8_i8_scalar,
    .gemm32x8_i8 = gemm32x8_i8_scalar,
    .pack16_f32 = pack16_f32_scalar,
    .pack16_bf16 = pack16_bf16_scalar,
    .pack16_i8_f32 = pack16_i8_f32_scalar,
    .gemm16x8_f32 = gemm16x8_f32_scalar,
    .gemm32x8_f32_rows = gemm32x8_f32_rows_scalar,
    .gemm128x1_f32 = gemm128x1_f32_scalar,
};

const ds_kernels *ds_kernels_scalar(void) {
    return &scalar_table;
}
