/* NEON table for aarch64 (compiled with -march=armv8.2-a+dotprod+fp16 on aarch64 builds only).
 *
 * Only base AArch64 Advanced SIMD intrinsics are used, so the code itself would run on any
 * ARMv8-A core; kernels.c still checks the hwcaps the compile flags allow.
 *
 * Conversions are exact: BF16 is a 16-bit left shift; FCVTL (vcvt_f32_f16) converts every F16
 * code exactly, subnormals included, and quiets signalling NaNs; FP8 goes through the same
 * half-precision detour as kernels_avx2.c (the byte re-packed as an IEEE half equal to
 * e4m3 * 2^-8, widened exactly, times scale * 2^8: one rounding). The FP8 NaN codes 0x7f / 0xff
 * come out as +-480 * scale in the vector part. Tails use the scalar element decoders. */
#include "kernels/kernels_isa.h"

#include <arm_neon.h>
#include <math.h>

static void bf16_to_f32_neon(float *dst, const uint16_t *src, size_t n) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint16x8_t v = vld1q_u16(src + i);
        vst1q_f32(dst + i, vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(v), 16)));
        vst1q_f32(dst + i + 4, vreinterpretq_f32_u32(vshll_n_u16(vget_high_u16(v), 16)));
    }
    for (; i < n; i++) {
        uint16_t h;
        memcpy(&h, src + i, sizeof h);
        float f = ds_bf16_decode(h);
        memcpy(dst + i, &f, sizeof f);
    }
}

static void f16_to_f32_neon(float *dst, const uint16_t *src, size_t n) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint16x8_t v = vld1q_u16(src + i);
        vst1q_f32(dst + i, vcvt_f32_f16(vreinterpret_f16_u16(vget_low_u16(v))));
        vst1q_f32(dst + i + 4, vcvt_f32_f16(vreinterpret_f16_u16(vget_high_u16(v))));
    }
    for (; i < n; i++) {
        uint16_t h;
        memcpy(&h, src + i, sizeof h);
        float f = ds_f16_decode(h);
        memcpy(dst + i, &f, sizeof f);
    }
}

static void fp8_to_f32_neon(float *dst, const uint8_t *src, size_t n, float scale) {
    size_t i = 0;
    if (fabsf(scale) <= 0x1p119f) { /* scale * 2^8 exact: every real weight_scale_inv */
        const uint16x8_t sign_m = vdupq_n_u16(0x80), mag_m = vdupq_n_u16(0x7f);
        const float32x4_t vs = vdupq_n_f32(scale * 256.0f);
        for (; i + 8 <= n; i += 8) {
            uint16x8_t b = vmovl_u8(vld1_u8(src + i));
            uint16x8_t h = vorrq_u16(vshlq_n_u16(vandq_u16(b, sign_m), 8),
                                     vshlq_n_u16(vandq_u16(b, mag_m), 7));
            float32x4_t lo = vcvt_f32_f16(vreinterpret_f16_u16(vget_low_u16(h)));
            float32x4_t hi = vcvt_f32_f16(vreinterpret_f16_u16(vget_high_u16(h)));
            vst1q_f32(dst + i, vmulq_f32(lo, vs));
            vst1q_f32(dst + i + 4, vmulq_f32(hi, vs));
        }
    }
    for (; i < n; i++) {
        float f = ds_e4m3_decode(src[i]) * scale;
        memcpy(dst + i, &f, sizeof f);
    }
}

static float dot_f32_neon(const float *a, const float *b, size_t n) {
    float32x4_t s0 = vdupq_n_f32(0), s1 = vdupq_n_f32(0), s2 = vdupq_n_f32(0), s3 = vdupq_n_f32(0);
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = vfmaq_f32(s0, vld1q_f32(a + i), vld1q_f32(b + i));
        s1 = vfmaq_f32(s1, vld1q_f32(a + i + 4), vld1q_f32(b + i + 4));
        s2 = vfmaq_f32(s2, vld1q_f32(a + i + 8), vld1q_f32(b + i + 8));
        s3 = vfmaq_f32(s3, vld1q_f32(a + i + 12), vld1q_f32(b + i + 12));
    }
    for (; i + 4 <= n; i += 4) s0 = vfmaq_f32(s0, vld1q_f32(a + i), vld1q_f32(b + i));
    float sum = vaddvq_f32(vaddq_f32(vaddq_f32(s0, s1), vaddq_f32(s2, s3)));
    for (; i < n; i++) sum += a[i] * b[i];
    return sum;
}

static void dot4_f32_neon(const float *x, const float *const w[4], size_t n, float out[4]) {
    const float *w0 = w[0], *w1 = w[1], *w2 = w[2], *w3 = w[3];
    float32x4_t a0 = vdupq_n_f32(0), a1 = vdupq_n_f32(0), a2 = vdupq_n_f32(0), a3 = vdupq_n_f32(0),
                b0 = vdupq_n_f32(0), b1 = vdupq_n_f32(0), b2 = vdupq_n_f32(0), b3 = vdupq_n_f32(0);
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        float32x4_t xa = vld1q_f32(x + i), xb = vld1q_f32(x + i + 4);
        a0 = vfmaq_f32(a0, xa, vld1q_f32(w0 + i));
        a1 = vfmaq_f32(a1, xa, vld1q_f32(w1 + i));
        a2 = vfmaq_f32(a2, xa, vld1q_f32(w2 + i));
        a3 = vfmaq_f32(a3, xa, vld1q_f32(w3 + i));
        b0 = vfmaq_f32(b0, xb, vld1q_f32(w0 + i + 4));
        b1 = vfmaq_f32(b1, xb, vld1q_f32(w1 + i + 4));
        b2 = vfmaq_f32(b2, xb, vld1q_f32(w2 + i + 4));
        b3 = vfmaq_f32(b3, xb, vld1q_f32(w3 + i + 4));
    }
    if (i + 4 <= n) {
        float32x4_t xa = vld1q_f32(x + i);
        a0 = vfmaq_f32(a0, xa, vld1q_f32(w0 + i));
        a1 = vfmaq_f32(a1, xa, vld1q_f32(w1 + i));
        a2 = vfmaq_f32(a2, xa, vld1q_f32(w2 + i));
        a3 = vfmaq_f32(a3, xa, vld1q_f32(w3 + i));
        i += 4;
    }
    float r0 = vaddvq_f32(vaddq_f32(a0, b0)), r1 = vaddvq_f32(vaddq_f32(a1, b1));
    float r2 = vaddvq_f32(vaddq_f32(a2, b2)), r3 = vaddvq_f32(vaddq_f32(a3, b3));
    for (; i < n; i++) {
        r0 += x[i] * w0[i];
        r1 += x[i] * w1[i];
        r2 += x[i] * w2[i];
        r3 += x[i] * w3[i];
    }
    out[0] = r0;
    out[1] = r1;
    out[2] = r2;
    out[3] = r3;
}

static void axpy_f32_neon(float *y, float a, const float *x, size_t n) {
    float32x4_t va = vdupq_n_f32(a);
    size_t i = 0;
    for (; i + 4 <= n; i += 4) vst1q_f32(y + i, vfmaq_f32(vld1q_f32(y + i), va, vld1q_f32(x + i)));
    for (; i < n; i++) y[i] += a * x[i];
}

/* The tails one element at a time: fmaf, as vfmaq fuses. */
static void axpy_i8_neon(float *y, float a, const int8_t *q, float scale, size_t n) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const int16x8_t h = vmovl_s8(vld1_s8(q + i));
        const float32x4_t w0 = vmulq_n_f32(vcvtq_f32_s32(vmovl_s16(vget_low_s16(h))), scale);
        const float32x4_t w1 = vmulq_n_f32(vcvtq_f32_s32(vmovl_s16(vget_high_s16(h))), scale);
        vst1q_f32(y + i, vfmaq_n_f32(vld1q_f32(y + i), w0, a));
        vst1q_f32(y + i + 4, vfmaq_n_f32(vld1q_f32(y + i + 4), w1, a));
    }
    for (; i < n; i++) y[i] = fmaf(a, (float)q[i] * scale, y[i]);
}

static void axpy_bf16_neon(float *y, float a, const uint16_t *w, size_t n) {
    size_t i = 0;
    for (; i + 4 <= n; i += 4) {
        const float32x4_t f = vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(w + i), 16));
        vst1q_f32(y + i, vfmaq_n_f32(vld1q_f32(y + i), f, a));
    }
    for (; i < n; i++) {
        uint16_t h; /* rows in an mmap may sit at odd addresses */
        memcpy(&h, w + i, sizeof h);
        y[i] = fmaf(a, ds_bf16_decode(h), y[i]);
    }
}

/* ---- integer dots (dot-product extension: SDOT, signed x signed bytes into int32) ----
 * int8 is one SDOT per 16 columns and row; int4 below. Tails go through zero-padded copies.
 * Exact: equals the scalar sums. */
static void dot4_i8_one_neon(const int8_t *x, const int8_t *const w[4], size_t n, size_t block,
                             size_t step, int32_t *out, size_t stride) {
    for (size_t c0 = 0, b = 0; c0 < n; c0 += block, b++) {
        size_t end = c0 + (n - c0 < block ? n - c0 : block);
        int32x4_t a[4] = {vdupq_n_s32(0), vdupq_n_s32(0), vdupq_n_s32(0), vdupq_n_s32(0)};
        size_t i = c0;
        for (; i + 16 <= end; i += 16) {
            int8x16_t xv = vld1q_s8(x + i);
            for (int r = 0; r < 4; r++)
                a[r] = vdotq_s32(a[r], xv, vld1q_s8(w[r] + ds_i8_at(i, step)));
        }
        if (i < end) {
            int8_t bx[16] = {0}, bw[16];
            memcpy(bx, x + i, end - i);
            int8x16_t xv = vld1q_s8(bx);
            for (int r = 0; r < 4; r++) {
                memset(bw, 0, sizeof bw);
                memcpy(bw, w[r] + ds_i8_at(i, step), end - i);
                a[r] = vdotq_s32(a[r], xv, vld1q_s8(bw));
            }
        }
        for (int r = 0; r < 4; r++) out[stride * b + (size_t)r] = vaddvq_s32(a[r]);
    }
}

/* A token at a time: the weights come from L1 for the tokens after the first. */
static void dot4_i8_neon(const int8_t *const x[4], const int32_t *const xoff[4], int nx,
                         const int8_t *const w[4], size_t n, size_t block, size_t step,
                         const char *pf, size_t n_pf, int32_t *out) {
    (void)xoff; /* signed products need no offset */
    for (; n_pf; n_pf--, pf += 64) __builtin_prefetch(pf);
    for (int t = 0; t < nx; t++)
        dot4_i8_one_neon(x[t], w, n, block, step, out + 4 * t, 4 * (size_t)nx);
}

/* x arrives split (ds_i4_split): a 128-column step is 64 even then 64 odd values, matching the
 * low and the high nibbles of the step's 64 bytes, 16 at a time. SDOT is signed x signed, so the
 * nibbles are sign-extended in place and xoff is not needed. A partial step goes through
 * zero-padded copies. */
static void dot4_i4_neon(const int8_t *xs, const int32_t *xoff, const uint8_t *const w[4], size_t n,
                         size_t block, int32_t *out) {
    (void)xoff;
    for (size_t c0 = 0, b = 0; c0 < n; c0 += block, b++) {
        size_t end = n - c0 < block ? n : c0 + block;
        int32x4_t a[4] = {vdupq_n_s32(0), vdupq_n_s32(0), vdupq_n_s32(0), vdupq_n_s32(0)};
        for (size_t i = c0; i < end; i += 128) {
            int8_t bx[128];
            uint8_t bw[4][64];
            const int8_t *xe, *xo;
            const uint8_t *wr[4];
            ds_i4_step(xs, w, i, end, bx, bw, &xe, &xo, wr);
            for (size_t h = 0; h < 64; h += 16) {
                int8x16_t e = vld1q_s8(xe + h), od = vld1q_s8(xo + h);
                for (int r = 0; r < 4; r++) {
                    int8x16_t p = vreinterpretq_s8_u8(vld1q_u8(wr[r] + h));
                    int8x16_t lo = vshrq_n_s8(vshlq_n_s8(p, 4), 4), hi = vshrq_n_s8(p, 4);
                    a[r] = vdotq_s32(vdotq_s32(a[r], lo, e), hi, od);
                }
            }
        }
        for (int r = 0; r < 4; r++) out[4 * b + (size_t)r] = vaddvq_s32(a[r]);
    }
}

static const ds_kernels neon_table = {
    .name = "neon",
    .bf16_to_f32 = bf16_to_f32_neon,
    .f16_to_f32 = f16_to_f32_neon,
    .fp8_to_f32 = fp8_to_f32_neon,
    .dot_f32 = dot_f32_neon,
    .dot4_f32 = dot4_f32_neon,
    .axpy_f32 = axpy_f32_neon,
    .axpy_i8 = axpy_i8_neon,
    .axpy_bf16 = axpy_bf16_neon,
    .dot4_i8 = dot4_i8_neon,
    .dot4_i4 = dot4_i4_neon,
};

const ds_kernels *ds_kernels_neon_table(void) {
    return &neon_table;
}
