/* AVX-512 table (compiled with -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512vnni plus the
 * AVX2 set; chosen only when CPUID and XCR0 report all of them, opmask and ZMM state included).
 *
 * Same arithmetic as the AVX2 file, sixteen lanes wide; see kernels_avx2.c for why the FP8
 * half-precision detour is exact. Here every tail is a masked load / store (AVX512BW gives byte and
 * word masks), so a whole vector path runs for every n and the NaN codes of FP8 (0x7f / 0xff) come
 * out as +-480 * scale everywhere instead of NaN. F16 NaNs come out quieted. */
#include "kernels/kernels_isa.h"

#include <immintrin.h>
#include <math.h>

static inline __mmask16 tail16(size_t r) {
    return (__mmask16)((1u << r) - 1u);
}

static void bf16_to_f32_avx512(float *dst, const uint16_t *src, size_t n) {
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(src + i)));
        _mm512_storeu_ps(dst + i, _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)));
    }
    if (i < n) {
        __mmask16 m = tail16(n - i);
        __m512i v = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, src + i));
        _mm512_mask_storeu_ps(dst + i, m, _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)));
    }
}

static void f16_to_f32_avx512(float *dst, const uint16_t *src, size_t n) {
    size_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(src + i))));
    if (i < n) {
        __mmask16 m = tail16(n - i);
        _mm512_mask_storeu_ps(dst + i, m, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, src + i)));
    }
}

/* 16 FP8 bytes -> f32 * scale, with vs = scale * 2^8; see kernels_avx2.c for why this is exact */
static inline __m512 fp8x16(__m128i bytes, __m512 vs) {
    __m256i b = _mm256_cvtepu8_epi16(bytes);
    __m256i h = _mm256_or_si256(_mm256_slli_epi16(_mm256_and_si256(b, _mm256_set1_epi16(0x80)), 8),
                                _mm256_slli_epi16(_mm256_and_si256(b, _mm256_set1_epi16(0x7f)), 7));
    return _mm512_mul_ps(_mm512_cvtph_ps(h), vs);
}

static void fp8_to_f32_avx512(float *dst, const uint8_t *src, size_t n, float scale) {
    size_t i = 0;
    if (fabsf(scale) <= 0x1p119f) { /* scale * 2^8 exact: every real weight_scale_inv */
        const __m512 vs = _mm512_set1_ps(scale * 256.0f);
        for (; i + 16 <= n; i += 16)
            _mm512_storeu_ps(dst + i, fp8x16(_mm_loadu_si128((const __m128i *)(src + i)), vs));
        if (i < n) {
            __mmask16 m = tail16(n - i);
            _mm512_mask_storeu_ps(dst + i, m, fp8x16(_mm_maskz_loadu_epi8(m, src + i), vs));
            i = n;
        }
    }
    for (; i < n; i++) {
        float f = ds_e4m3_decode(src[i]) * scale;
        memcpy(dst + i, &f, sizeof f);
    }
}

static float dot_f32_avx512(const float *a, const float *b, size_t n) {
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
    __m512 s2 = _mm512_setzero_ps(), s3 = _mm512_setzero_ps();
    size_t i = 0;
    for (; i + 64 <= n; i += 64) {
        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
        s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), s1);
        s2 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 32), _mm512_loadu_ps(b + i + 32), s2);
        s3 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 48), _mm512_loadu_ps(b + i + 48), s3);
    }
    for (; i + 16 <= n; i += 16)
        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
    if (i < n) {
        __mmask16 m = tail16(n - i);
        s1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), s1);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
}

static void dot4_f32_avx512(const float *x, const float *const w[4], size_t n, float out[4]) {
    const float *w0 = w[0], *w1 = w[1], *w2 = w[2], *w3 = w[3];
    /* two accumulators per row: eight independent FMA chains cover the latency */
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(),
           a3 = _mm512_setzero_ps(), b0 = _mm512_setzero_ps(), b1 = _mm512_setzero_ps(),
           b2 = _mm512_setzero_ps(), b3 = _mm512_setzero_ps();
    size_t i = 0;
    for (; i + 32 <= n; i += 32) {
        __m512 xa = _mm512_loadu_ps(x + i), xb = _mm512_loadu_ps(x + i + 16);
        a0 = _mm512_fmadd_ps(xa, _mm512_loadu_ps(w0 + i), a0);
        a1 = _mm512_fmadd_ps(xa, _mm512_loadu_ps(w1 + i), a1);
        a2 = _mm512_fmadd_ps(xa, _mm512_loadu_ps(w2 + i), a2);
        a3 = _mm512_fmadd_ps(xa, _mm512_loadu_ps(w3 + i), a3);
        b0 = _mm512_fmadd_ps(xb, _mm512_loadu_ps(w0 + i + 16), b0);
        b1 = _mm512_fmadd_ps(xb, _mm512_loadu_ps(w1 + i + 16), b1);
        b2 = _mm512_fmadd_ps(xb, _mm512_loadu_ps(w2 + i + 16), b2);
        b3 = _mm512_fmadd_ps(xb, _mm512_loadu_ps(w3 + i + 16), b3);
    }
    if (i + 16 <= n) {
        __m512 xa = _mm512_loadu_ps(x + i);
        a0 = _mm512_fmadd_ps(xa, _mm512_loadu_ps(w0 + i), a0);
        a1 = _mm512_fmadd_ps(xa, _mm512_loadu_ps(w1 + i), a1);
        a2 = _mm512_fmadd_ps(xa, _mm512_loadu_ps(w2 + i), a2);
        a3 = _mm512_fmadd_ps(xa, _mm512_loadu_ps(w3 + i), a3);
        i += 16;
    }
    if (i < n) {
        __mmask16 m = tail16(n - i);
        __m512 xb = _mm512_maskz_loadu_ps(m, x + i);
        b0 = _mm512_fmadd_ps(xb, _mm512_maskz_loadu_ps(m, w0 + i), b0);
        b1 = _mm512_fmadd_ps(xb, _mm512_maskz_loadu_ps(m, w1 + i), b1);
        b2 = _mm512_fmadd_ps(xb, _mm512_maskz_loadu_ps(m, w2 + i), b2);
        b3 = _mm512_fmadd_ps(xb, _mm512_maskz_loadu_ps(m, w3 + i), b3);
    }
    out[0] = _mm512_reduce_add_ps(_mm512_add_ps(a0, b0));
    out[1] = _mm512_reduce_add_ps(_mm512_add_ps(a1, b1));
    out[2] = _mm512_reduce_add_ps(_mm512_add_ps(a2, b2));
    out[3] = _mm512_reduce_add_ps(_mm512_add_ps(a3, b3));
}

/* ---- fused decode + dot4 ----
 * The loops of dot4_f32_avx512 with each weight load replaced by a decode in registers: 16
 * stored elements -> one __m512. Full loads in the main loop, masked loads in the tail (masked-off
 * lanes are not read, so nothing past the end is touched and no mask faults). */
static inline __m512 ld_bf16x16(const uint16_t *p) {
    __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
}
static inline __m512 ld_bf16x16_m(const uint16_t *p, __mmask16 m) {
    __m512i v = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
}
static inline __m512 ld_f16x16(const uint16_t *p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
}
static inline __m512 ld_f16x16_m(const uint16_t *p, __mmask16 m) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
}
/* FP8 -> e4m3 * 2^-8 exactly, via the IEEE half with the byte's 7 low bits at bits 7..13 and its
 * sign at bit 15: the byte sign-extended to 16 bits and shifted left by 7 has the sign in both
 * bit 15 and bit 14, and clearing bit 14 leaves that half (two ops fewer than masking and
 * shifting sign and magnitude apart). */
static inline __m512 fp8_half16(__m128i bytes) {
    __m256i u = _mm256_slli_epi16(_mm256_cvtepi8_epi16(bytes), 7);
    return _mm512_cvtph_ps(_mm256_and_si256(u, _mm256_set1_epi16((short)0xbfff)));
}
static inline __m512 ld_fp8x16(const uint8_t *p) {
    return fp8_half16(_mm_loadu_si128((const __m128i *)p));
}
static inline __m512 ld_fp8x16_m(const uint8_t *p, __mmask16 m) {
    return fp8_half16(_mm_maskz_loadu_epi8(m, p));
}

/* Accumulates sum_i x[i] * LD(w_r + i) over i < n into a0..a3 (even steps) and b0..b3 (odd
 * steps), the same chain layout as dot4_f32_avx512. */
#define DOT4_BODY(LD, LDM, x, w0, w1, w2, w3, n)                                                   \
    do {                                                                                           \
        size_t i = 0;                                                                              \
        for (; i + 32 <= (n); i += 32) {                                                           \
            __m512 xa = _mm512_loadu_ps((x) + i), xb = _mm512_loadu_ps((x) + i + 16);              \
            a0 = _mm512_fmadd_ps(xa, LD((w0) + i), a0);                                            \
            a1 = _mm512_fmadd_ps(xa, LD((w1) + i), a1);                                            \
            a2 = _mm512_fmadd_ps(xa, LD((w2) + i), a2);                                            \
            a3 = _mm512_fmadd_ps(xa, LD((w3) + i), a3);                                            \
            b0 = _mm512_fmadd_ps(xb, LD((w0) + i + 16), b0);                                       \
            b1 = _mm512_fmadd_ps(xb, LD((w1) + i + 16), b1);                                       \
            b2 = _mm512_fmadd_ps(xb, LD((w2) + i + 16), b2);                                       \
            b3 = _mm512_fmadd_ps(xb, LD((w3) + i + 16), b3);                                       \
        }                                                                                          \
        if (i + 16 <= (n)) {                                                                       \
            __m512 xa = _mm512_loadu_ps((x) + i);                                                  \
            a0 = _mm512_fmadd_ps(xa, LD((w0) + i), a0);                                            \
            a1 = _mm512_fmadd_ps(xa, LD((w1) + i), a1);                                            \
            a2 = _mm512_fmadd_ps(xa, LD((w2) + i), a2);                                            \
            a3 = _mm512_fmadd_ps(xa, LD((w3) + i), a3);                                            \
            i += 16;                                                                               \
        }                                                                                          \
        if (i < (n)) {                                                                             \
            __mmask16 m = tail16((n)-i);                                                           \
            __m512 xb = _mm512_maskz_loadu_ps(m, (x) + i);                                         \
            b0 = _mm512_fmadd_ps(xb, LDM((w0) + i, m), b0);                                        \
            b1 = _mm512_fmadd_ps(xb, LDM((w1) + i, m), b1);                                        \
            b2 = _mm512_fmadd_ps(xb, LDM((w2) + i, m), b2);                                        \
            b3 = _mm512_fmadd_ps(xb, LDM((w3) + i, m), b3);                                        \
        }                                                                                          \
    } while (0)

#define ZERO8()                                                                                    \
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(),           \
           a3 = _mm512_setzero_ps(), b0 = _mm512_setzero_ps(), b1 = _mm512_setzero_ps(),           \
           b2 = _mm512_setzero_ps(), b3 = _mm512_setzero_ps()

static void dot4_bf16_avx512(const float *x, const uint16_t *const w[4], size_t n, float out[4]) {
    ZERO8();
    DOT4_BODY(ld_bf16x16, ld_bf16x16_m, x, w[0], w[1], w[2], w[3], n);
    out[0] = _mm512_reduce_add_ps(_mm512_add_ps(a0, b0));
    out[1] = _mm512_reduce_add_ps(_mm512_add_ps(a1, b1));
    out[2] = _mm512_reduce_add_ps(_mm512_add_ps(a2, b2));
    out[3] = _mm512_reduce_add_ps(_mm512_add_ps(a3, b3));
}

static void dot4_f16_avx512(const float *x, const uint16_t *const w[4], size_t n, float out[4]) {
    ZERO8();
    DOT4_BODY(ld_f16x16, ld_f16x16_m, x, w[0], w[1], w[2], w[3], n);
    out[0] = _mm512_reduce_add_ps(_mm512_add_ps(a0, b0));
    out[1] = _mm512_reduce_add_ps(_mm512_add_ps(a1, b1));
    out[2] = _mm512_reduce_add_ps(_mm512_add_ps(a2, b2));
    out[3] = _mm512_reduce_add_ps(_mm512_add_ps(a3, b3));
}

static inline float ld_scale(const float *p, size_t i) {
    float v;
    memcpy(&v, (const unsigned char *)p + i * sizeof v, sizeof v);
    return v;
}

/* Per block: fresh accumulators, then the block's vector sums times its scale are added into the
 * row totals t0..t3 (one FMA per row per block, no horizontal sums until the end). The decoded
 * weights are e4m3 * 2^-8, so the totals are multiplied by 2^8 at the end (exact). */
static void dot4_fp8_avx512(const float *x, const uint8_t *const w[4], const float *const scale[4],
                            size_t n, size_t block, float out[4]) {
    __m512 t0 = _mm512_setzero_ps(), t1 = _mm512_setzero_ps(), t2 = _mm512_setzero_ps(),
           t3 = _mm512_setzero_ps();
    for (size_t c0 = 0, b = 0; c0 < n; c0 += block, b++) {
        size_t len = n - c0 < block ? n - c0 : block;
        ZERO8();
        DOT4_BODY(ld_fp8x16, ld_fp8x16_m, x + c0, w[0] + c0, w[1] + c0, w[2] + c0, w[3] + c0, len);
        t0 = _mm512_fmadd_ps(_mm512_add_ps(a0, b0), _mm512_set1_ps(ld_scale(scale[0], b)), t0);
        t1 = _mm512_fmadd_ps(_mm512_add_ps(a1, b1), _mm512_set1_ps(ld_scale(scale[1], b)), t1);
        t2 = _mm512_fmadd_ps(_mm512_add_ps(a2, b2), _mm512_set1_ps(ld_scale(scale[2], b)), t2);
        t3 = _mm512_fmadd_ps(_mm512_add_ps(a3, b3), _mm512_set1_ps(ld_scale(scale[3], b)), t3);
    }
    out[0] = _mm512_reduce_add_ps(t0) * 256.0f;
    out[1] = _mm512_reduce_add_ps(t1) * 256.0f;
    out[2] = _mm512_reduce_add_ps(t2) * 256.0f;
    out[3] = _mm512_reduce_add_ps(t3) * 256.0f;
}

/* Two tokens: each decoded vector feeds two FMAs, one per token; a0..a3 collect x0, c0..c3 x1
 * (eight independent chains, one step of 16 columns per iteration). */
#define DOT4X2_BODY(LD, LDM, x0, x1, w0, w1, w2, w3, n)                                            \
    do {                                                                                           \
        size_t i = 0;                                                                              \
        for (; i + 16 <= (n); i += 16) {                                                           \
            __m512 p = _mm512_loadu_ps((x0) + i), q = _mm512_loadu_ps((x1) + i), v;                \
            v = LD((w0) + i);                                                                      \
            a0 = _mm512_fmadd_ps(p, v, a0);                                                        \
            c0 = _mm512_fmadd_ps(q, v, c0);                                                        \
            v = LD((w1) + i);                                                                      \
            a1 = _mm512_fmadd_ps(p, v, a1);                                                        \
            c1 = _mm512_fmadd_ps(q, v, c1);                                                        \
            v = LD((w2) + i);                                                                      \
            a2 = _mm512_fmadd_ps(p, v, a2);                                                        \
            c2 = _mm512_fmadd_ps(q, v, c2);                                                        \
            v = LD((w3) + i);                                                                      \
            a3 = _mm512_fmadd_ps(p, v, a3);                                                        \
            c3 = _mm512_fmadd_ps(q, v, c3);                                                        \
        }                                                                                          \
        if (i < (n)) {                                                                             \
            __mmask16 m = tail16((n)-i);                                                           \
            __m512 p = _mm512_maskz_loadu_ps(m, (x0) + i), q = _mm512_maskz_loadu_ps(m, (x1) + i); \
            __m512 v;                                                                              \
            v = LDM((w0) + i, m);                                                                  \
            a0 = _mm512_fmadd_ps(p, v, a0);                                                        \
            c0 = _mm512_fmadd_ps(q, v, c0);                                                        \
            v = LDM((w1) + i, m);                                                                  \
            a1 = _mm512_fmadd_ps(p, v, a1);                                                        \
            c1 = _mm512_fmadd_ps(q, v, c1);                                                        \
            v = LDM((w2) + i, m);                                                                  \
            a2 = _mm512_fmadd_ps(p, v, a2);                                                        \
            c2 = _mm512_fmadd_ps(q, v, c2);                                                        \
            v = LDM((w3) + i, m);                                                                  \
            a3 = _mm512_fmadd_ps(p, v, a3);                                                        \
            c3 = _mm512_fmadd_ps(q, v, c3);                                                        \
        }                                                                                          \
    } while (0)

#define ZERO8X2()                                                                                  \
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(),           \
           a3 = _mm512_setzero_ps(), c0 = _mm512_setzero_ps(), c1 = _mm512_setzero_ps(),           \
           c2 = _mm512_setzero_ps(), c3 = _mm512_setzero_ps()

/* ---- dot4xn_bf16: pairs of BF16 columns as 32-bit words (kernels.h) ---- */

/* l + (l + 8), + 4, + 2, + 1: the lane order of every table */
static inline float sum16(__m512 a) {
    __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1));
    __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    return _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)));
}

/* nx tokens (a constant once inlined) x 4 rows, one accumulator each: 4 x 4 is 16 accumulators,
 * 8 decoded weight vectors and the token's two x vectors, within the 32 registers. */
static inline __attribute__((always_inline)) void
dot4xn_bf16_body(const float *const x[4], const int nx, const uint16_t *const w[4], size_t n,
                 size_t step, const char *pf, size_t n_pf, float out[16]) {
    __m512 acc[4][4];
#pragma GCC unroll 4
    for (int t = 0; t < nx; t++)
#pragma GCC unroll 4
        for (int r = 0; r < 4; r++) acc[t][r] = _mm512_setzero_ps();
    const __m512i high = _mm512_set1_epi32((int)0xffff0000u);
    const size_t steps = n / 32, per = steps ? (n_pf + steps - 1) / steps : 0;
    size_t i = 0, o = 0; /* o: the piece's offset from w[r] */
    for (; i + 32 <= n; i += 32, o += step) {
        for (size_t q = 0; q < per && n_pf; q++, n_pf--, pf += 64) __builtin_prefetch(pf);
        __m512 we[4], wo[4];
#pragma GCC unroll 4
        for (int r = 0; r < 4; r++) {
            /* two 32-byte loads: checkpoints place tensors 8-byte aligned at best, and 64-byte
             * loads split across cache lines made the stream ~1.6x slower (129280 x 1024, 8
             * tokens, rows 8 - 40 bytes off a line: 13 - 17 vs 7 - 9 ms aligned); a 32-byte
             * load is split only at odd 32-byte offsets, and then it measured as fast */
            const __m512i v = _mm512_inserti64x4(
                _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(w[r] + o))),
                _mm256_loadu_si256((const __m256i *)(w[r] + o + 16)), 1);
            we[r] = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
            wo[r] = _mm512_castsi512_ps(_mm512_and_si512(v, high));
        }
#pragma GCC unroll 4
        for (int t = 0; t < nx; t++) {
            __m512 xe = _mm512_loadu_ps(x[t] + i), xo = _mm512_loadu_ps(x[t] + i + 16);
            /* kept in registers: gcc otherwise folds the loads into every FMA, four loads of
             * each vector instead of one (L1 in 4 x 4: 76 -> 91 GMAC/s on one Zen 5 core) */
            __asm__("" : "+v"(xe), "+v"(xo));
#pragma GCC unroll 4
            for (int r = 0; r < 4; r++) {
                acc[t][r] = _mm512_fmadd_ps(xe, we[r], acc[t][r]);
                acc[t][r] = _mm512_fmadd_ps(xo, wo[r], acc[t][r]);
            }
        }
    }
    for (; n_pf; n_pf--, pf += 64) __builtin_prefetch(pf);
    for (const size_t i0 = i; i < n; i += 16) { /* the last piece, at offset o */
        const __mmask16 m = tail16(n - i < 16 ? n - i : 16);
        __m512 wv[4];
#pragma GCC unroll 4
        for (int r = 0; r < 4; r++) wv[r] = ld_bf16x16_m(w[r] + o + (i - i0), m);
#pragma GCC unroll 4
        for (int t = 0; t < nx; t++) {
            const __m512 xv = _mm512_maskz_loadu_ps(m, x[t] + i);
#pragma GCC unroll 4
            for (int r = 0; r < 4; r++) acc[t][r] = _mm512_fmadd_ps(xv, wv[r], acc[t][r]);
        }
    }
#pragma GCC unroll 4
    for (int t = 0; t < nx; t++)
#pragma GCC unroll 4
        for (int r = 0; r < 4; r++) out[4 * t + r] = sum16(acc[t][r]);
}

/* One token without prefetches: the rows one after another, each the same chain as in the body
 * (four rows side by side are four interleaved streams, which the hardware prefetcher followed
 * worse than one; see MM_BF16_WALK_MIN). */
static void dot4_bf16_rows(const float *x, const uint16_t *const w[4], size_t n, float out[4]) {
    const __m512i high = _mm512_set1_epi32((int)0xffff0000u);
    for (int r = 0; r < 4; r++) {
        const uint16_t *wr = w[r];
        __m512 acc = _mm512_setzero_ps();
        size_t i = 0;
        for (; i + 32 <= n; i += 32) { /* two 32-byte loads, as in the body */
            const __m512i v = _mm512_inserti64x4(
                _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(wr + i))),
                _mm256_loadu_si256((const __m256i *)(wr + i + 16)), 1);
            acc = _mm512_fmadd_ps(_mm512_loadu_ps(x + i),
                                  _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)), acc);
            acc = _mm512_fmadd_ps(_mm512_loadu_ps(x + i + 16),
                                  _mm512_castsi512_ps(_mm512_and_si512(v, high)), acc);
        }
        for (; i < n; i += 16) {
            const __mmask16 m = tail16(n - i < 16 ? n - i : 16);
            acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, x + i), ld_bf16x16_m(wr + i, m), acc);
        }
        out[r] = sum16(acc);
    }
}

static void dot4xn_bf16_avx512(const float *const x[4], int nx, const uint16_t *const w[4],
                               size_t n, size_t step, const char *pf, size_t n_pf, float out[16]) {
    if (nx == 4)
        dot4xn_bf16_body(x, 4, w, n, step, pf, n_pf, out);
    else if (nx == 2)
        dot4xn_bf16_body(x, 2, w, n, step, pf, n_pf, out);
    else if (!pf && step == 32)
        dot4_bf16_rows(x[0], w, n, out);
    else
        dot4xn_bf16_body(x, 1, w, n, step, pf, n_pf, out);
}

static void dot4x2_f16_avx512(const float *x0, const float *x1, const uint16_t *const w[4],
                              size_t n, float out[8]) {
    ZERO8X2();
    DOT4X2_BODY(ld_f16x16, ld_f16x16_m, x0, x1, w[0], w[1], w[2], w[3], n);
    const __m512 acc[8] = {a0, a1, a2, a3, c0, c1, c2, c3};
    for (int r = 0; r < 8; r++) out[r] = _mm512_reduce_add_ps(acc[r]);
}

static void dot4x2_fp8_avx512(const float *x0, const float *x1, const uint8_t *const w[4],
                              const float *const scale[4], size_t n, size_t block, float out[8]) {
    __m512 t[8];
    for (int r = 0; r < 8; r++) t[r] = _mm512_setzero_ps();
    for (size_t k0 = 0, b = 0; k0 < n; k0 += block, b++) {
        size_t len = n - k0 < block ? n - k0 : block;
        ZERO8X2();
        DOT4X2_BODY(ld_fp8x16, ld_fp8x16_m, x0 + k0, x1 + k0, w[0] + k0, w[1] + k0, w[2] + k0,
                    w[3] + k0, len);
        const __m512 s0 = _mm512_set1_ps(ld_scale(scale[0], b)),
                     s1 = _mm512_set1_ps(ld_scale(scale[1], b)),
                     s2 = _mm512_set1_ps(ld_scale(scale[2], b)),
                     s3 = _mm512_set1_ps(ld_scale(scale[3], b));
        t[0] = _mm512_fmadd_ps(a0, s0, t[0]);
        t[1] = _mm512_fmadd_ps(a1, s1, t[1]);
        t[2] = _mm512_fmadd_ps(a2, s2, t[2]);
        t[3] = _mm512_fmadd_ps(a3, s3, t[3]);
        t[4] = _mm512_fmadd_ps(c0, s0, t[4]);
        t[5] = _mm512_fmadd_ps(c1, s1, t[5]);
        t[6] = _mm512_fmadd_ps(c2, s2, t[6]);
        t[7] = _mm512_fmadd_ps(c3, s3, t[7]);
    }
    for (int r = 0; r < 8; r++) out[r] = _mm512_reduce_add_ps(t[r]) * 256.0f;
}

static void axpy_f32_avx512(float *y, float a, const float *x, size_t n) {
    const __m512 va = _mm512_set1_ps(a);
    size_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(y + i,
                         _mm512_fmadd_ps(va, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
    if (i < n) {
        __mmask16 m = tail16(n - i);
        __m512 r =
            _mm512_fmadd_ps(va, _mm512_maskz_loadu_ps(m, x + i), _mm512_maskz_loadu_ps(m, y + i));
        _mm512_mask_storeu_ps(y + i, m, r);
    }
}

/* 16 int8 values converted as i8_to_f32_avx512 converts them (the product rounded once) */
static inline __m512 ld_i8x16(const int8_t *p, __m512 scale) {
    const __m128i v = _mm_loadu_si128((const __m128i *)(const void *)p);
    return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v)), scale);
}

static void axpy_i8_avx512(float *y, float a, const int8_t *q, float scale, size_t n) {
    const __m512 va = _mm512_set1_ps(a), vs = _mm512_set1_ps(scale);
    size_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(y + i, _mm512_fmadd_ps(va, ld_i8x16(q + i, vs), _mm512_loadu_ps(y + i)));
    if (i < n) {
        const __mmask16 m = tail16(n - i);
        const __m512 w = _mm512_mul_ps(
            _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, q + i))), vs);
        _mm512_mask_storeu_ps(y + i, m, _mm512_fmadd_ps(va, w, _mm512_maskz_loadu_ps(m, y + i)));
    }
}

/* The axpy_rows kernels (kernels.h), kind as in the scalar table's rows_w: the sums of columns
 * [c0, c0 + 16 nv) stay in registers over the rows. `full` and nv (constants once inlined): all
 * those columns, unmasked. Masked like a tail, the one-token absorption through W_UV's 128
 * columns got slower than the axpy it replaced (medium W8A8, 0.28 -> 0.37 ms a step); unmasked
 * it is faster (forward.c, absorb_o_t_task). nv 16 (256 columns, without column scales, which
 * would take another 16 registers) reads a row's 256 bytes in one pass instead of two halves
 * 128 apart: absorb_q (W_UK's 256 latent columns), old and new alternating step by step, W8A8 /
 * BF16 medium, ms a step: 0.23 / 0.23 -> 0.19 / 0.17 at 1 sequence, 0.32 / 0.28 -> 0.28 / 0.23
 * at 3, 0.47 / 0.43 -> 0.42 / 0.35 at 6. */
static inline __attribute__((always_inline)) void
axpy_rows_body(float *y, const float *x, const void *w, size_t m, size_t n, size_t c0,
               const float *scale, const int kind, const int full, const int nv) {
    __m512 acc[16], cs[8];
    __mmask16 mk[16];
#pragma GCC unroll 16
    for (int v = 0; v < nv; v++) {
        const size_t i = c0 + 16 * (size_t)v;
        mk[v] = full          ? (__mmask16)0xffff
                : i >= n      ? 0
                : n - i >= 16 ? (__mmask16)0xffff
                              : tail16(n - i);
        acc[v] = _mm512_setzero_ps();
        if (kind == 0)
            cs[v & 7] = full ? _mm512_loadu_ps(scale + i) : _mm512_maskz_loadu_ps(mk[v], scale + i);
    }
    for (size_t j = 0; j < m; j++) {
        const __m512 xj = _mm512_set1_ps(x[j]);
        const __m512 rs = kind == 1 ? _mm512_set1_ps(scale[j]) : xj;
#pragma GCC unroll 16
        for (int v = 0; v < nv; v++) {
            const size_t i = j * n + c0 + 16 * (size_t)v;
            __m512 wv;
            if (kind == 2) {
                const uint16_t *p = (const uint16_t *)w + i;
                wv = full ? ld_bf16x16(p) : ld_bf16x16_m(p, mk[v]);
            } else {
                const int8_t *p = (const int8_t *)w + i;
                const __m128i b = full ? _mm_loadu_si128((const __m128i *)(const void *)p)
                                       : _mm_maskz_loadu_epi8(mk[v], p);
                wv = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)),
                                   kind == 0 ? cs[v & 7] : rs);
            }
            acc[v] = _mm512_fmadd_ps(xj, wv, acc[v]);
        }
    }
#pragma GCC unroll 16
    for (int v = 0; v < nv; v++) _mm512_mask_storeu_ps(y + c0 + 16 * (size_t)v, mk[v], acc[v]);
}

/* 256 columns a pass where nv 16 may (no column scales), then 128 */
#define AXPY_ROWS(KIND)                                                                            \
    size_t c0 = 0;                                                                                 \
    for (; KIND != 0 && n - c0 >= 256; c0 += 256)                                                  \
        axpy_rows_body(y, x, w, m, n, c0, scale, KIND, 1, 16);                                     \
    for (; c0 < n; c0 += 128) {                                                                    \
        if (n - c0 >= 128)                                                                         \
            axpy_rows_body(y, x, w, m, n, c0, scale, KIND, 1, 8);                                  \
        else                                                                                       \
            axpy_rows_body(y, x, w, m, n, c0, scale, KIND, 0, 8);                                  \
    }

static void axpy_rows_i8_lanes_avx512(float *y, const float *x, const int8_t *w, size_t m, size_t n,
                                      const float *scale) {
    AXPY_ROWS(0)
}

static void axpy_rows_i8_avx512(float *y, const float *x, const int8_t *w, size_t m, size_t n,
                                const float *scale) {
    AXPY_ROWS(1)
}

static void axpy_rows_bf16_avx512(float *y, const float *x, const uint16_t *w, size_t m, size_t n) {
    const float *scale = NULL;
    AXPY_ROWS(2)
}
#undef AXPY_ROWS

static void axpy_bf16_avx512(float *y, float a, const uint16_t *w, size_t n) {
    const __m512 va = _mm512_set1_ps(a);
    size_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(y + i, _mm512_fmadd_ps(va, ld_bf16x16(w + i), _mm512_loadu_ps(y + i)));
    if (i < n) {
        const __mmask16 m = tail16(n - i);
        const __m512 r =
            _mm512_fmadd_ps(va, ld_bf16x16_m(w + i, m), _mm512_maskz_loadu_ps(m, y + i));
        _mm512_mask_storeu_ps(y + i, m, r);
    }
}

/* ---- integer dots (VNNI) ----
 * vpdpbusd multiplies unsigned by signed bytes, so one side is made unsigned and the offset is
 * taken back out exactly: for int8, u = w + 128 (w ^ 0x80, any int8 w) against s = x, and
 *   sum x * w = sum x * u - 128 * sum x,
 * with 128 * sum x made once per token and block by the caller (xoff). For int4, u = nibble ^ 8 =
 * w + 8 in [0, 15] and the correction is 8 * sum x. Products and sums are exact
 * in int32 (vpdpbusd does not saturate), so the results equal the scalar sums bit for bit. */

/* [sum a0, sum a1, sum a2, sum a3] */
static inline __m128i reduce4_epi32(__m512i a0, __m512i a1, __m512i a2, __m512i a3) {
    __m512i t0 = _mm512_add_epi32(_mm512_unpacklo_epi32(a0, a1), _mm512_unpackhi_epi32(a0, a1));
    __m512i t1 = _mm512_add_epi32(_mm512_unpacklo_epi32(a2, a3), _mm512_unpackhi_epi32(a2, a3));
    __m512i s = _mm512_add_epi32(_mm512_unpacklo_epi64(t0, t1), _mm512_unpackhi_epi64(t0, t1));
    __m256i h = _mm256_add_epi32(_mm512_castsi512_si256(s), _mm512_extracti64x4_epi64(s, 1));
    return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

static inline __mmask64 tail64(size_t r) {
    return r >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << r) - 1);
}

/* *acc += the VNNI dot of u8 a and s8 b, with *acc tied to its register: through the intrinsic,
 * gcc 12 copied the accumulators of the kernel below between registers and the stack at every
 * step (4 tokens x 4 rows in L1 on one Zen 5 core: 280 -> 440 GMAC/s with this). */
static inline void dpbusd_acc(__m512i *acc, __m512i a, __m512i b) {
    __asm__("vpdpbusd %2, %1, %0" : "+v"(*acc) : "v"(a), "v"(b));
}

/* nx tokens against four rows: each 64-column step loads and flips the four rows' weights once
 * (w + 128, the unsigned operand) and adds them into every token's four sums, 16 accumulators at
 * most; 128 * sum(x), the caller's xoff, comes out after the reduction. Computed here per call,
 * that sum (a serial chain per token) cost a third of the kernel at 1024 columns. */
static inline __attribute__((always_inline)) void
dot4_i8_body(const int8_t *const x[4], const int32_t *const xoff[4], const int nx,
             const int8_t *const w[4], size_t n, size_t block, size_t step, const char *pf,
             size_t n_pf, int32_t *out) {
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    const size_t steps = (n + 63) / 64, per = steps ? (n_pf + steps - 1) / steps : 0;
    for (size_t c0 = 0, b = 0; c0 < n; c0 += block, b++) {
        const size_t end = c0 + (n - c0 < block ? n - c0 : block);
        __m512i acc[4][4];
#pragma GCC unroll 4
        for (int t = 0; t < nx; t++)
#pragma GCC unroll 4
            for (int r = 0; r < 4; r++) acc[t][r] = _mm512_setzero_si512();
        size_t i = c0;
        for (; i + 64 <= end; i += 64) {
            for (size_t q = 0; q < per && n_pf; q++, n_pf--, pf += 64) __builtin_prefetch(pf);
            __m512i wv[4];
#pragma GCC unroll 4
            for (int r = 0; r < 4; r++)
                wv[r] = _mm512_xor_si512(_mm512_loadu_si512(w[r] + ds_i8_at(i, step)), flip);
#pragma GCC unroll 4
            for (int t = 0; t < nx; t++) {
                const __m512i xv = _mm512_loadu_si512(x[t] + i);
#pragma GCC unroll 4
                for (int r = 0; r < 4; r++) dpbusd_acc(&acc[t][r], wv[r], xv);
            }
        }
        if (i < end) { /* masked: x = 0 past the end, so w + 128 there adds nothing */
            const __mmask64 m = tail64(end - i);
            __m512i wv[4];
#pragma GCC unroll 4
            for (int r = 0; r < 4; r++)
                wv[r] =
                    _mm512_xor_si512(_mm512_maskz_loadu_epi8(m, w[r] + ds_i8_at(i, step)), flip);
#pragma GCC unroll 4
            for (int t = 0; t < nx; t++) {
                const __m512i xv = _mm512_maskz_loadu_epi8(m, x[t] + i);
#pragma GCC unroll 4
                for (int r = 0; r < 4; r++) dpbusd_acc(&acc[t][r], wv[r], xv);
            }
        }
#pragma GCC unroll 4
        for (int t = 0; t < nx; t++) {
            const __m128i v = reduce4_epi32(acc[t][0], acc[t][1], acc[t][2], acc[t][3]);
            _mm_storeu_si128((__m128i *)(void *)(out + 4 * (nx * b + (size_t)t)),
                             _mm_sub_epi32(v, _mm_set1_epi32(xoff[t][b])));
        }
    }
    for (; n_pf; n_pf--, pf += 64) __builtin_prefetch(pf);
}

/* One token: two chains of 64 columns (one chain waited on the VNNI latency). */
static void dot4_i8_one(const int8_t *x, const int32_t *xoff, const int8_t *const w[4], size_t n,
                        size_t block, size_t step, int32_t *out) {
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    for (size_t c0 = 0, b = 0; c0 < n; c0 += block, b++) {
        const size_t end = c0 + (n - c0 < block ? n - c0 : block);
        __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
        __m512i e0 = a0, e1 = a0, e2 = a0, e3 = a0;
        size_t i = c0;
        for (; i + 128 <= end; i += 128) {
            const size_t o = ds_i8_at(i, step), p = ds_i8_at(i + 64, step);
            const __m512i xv = _mm512_loadu_si512(x + i), yv = _mm512_loadu_si512(x + i + 64);
            dpbusd_acc(&a0, _mm512_xor_si512(_mm512_loadu_si512(w[0] + o), flip), xv);
            dpbusd_acc(&a1, _mm512_xor_si512(_mm512_loadu_si512(w[1] + o), flip), xv);
            dpbusd_acc(&a2, _mm512_xor_si512(_mm512_loadu_si512(w[2] + o), flip), xv);
            dpbusd_acc(&a3, _mm512_xor_si512(_mm512_loadu_si512(w[3] + o), flip), xv);
            dpbusd_acc(&e0, _mm512_xor_si512(_mm512_loadu_si512(w[0] + p), flip), yv);
            dpbusd_acc(&e1, _mm512_xor_si512(_mm512_loadu_si512(w[1] + p), flip), yv);
            dpbusd_acc(&e2, _mm512_xor_si512(_mm512_loadu_si512(w[2] + p), flip), yv);
            dpbusd_acc(&e3, _mm512_xor_si512(_mm512_loadu_si512(w[3] + p), flip), yv);
        }
        for (; i < end; i += 64) { /* masked: x = 0 past the end */
            const __mmask64 m = tail64(end - i);
            const size_t o = ds_i8_at(i, step);
            const __m512i xv = _mm512_maskz_loadu_epi8(m, x + i);
            dpbusd_acc(&a0, _mm512_xor_si512(_mm512_maskz_loadu_epi8(m, w[0] + o), flip), xv);
            dpbusd_acc(&a1, _mm512_xor_si512(_mm512_maskz_loadu_epi8(m, w[1] + o), flip), xv);
            dpbusd_acc(&a2, _mm512_xor_si512(_mm512_maskz_loadu_epi8(m, w[2] + o), flip), xv);
            dpbusd_acc(&a3, _mm512_xor_si512(_mm512_maskz_loadu_epi8(m, w[3] + o), flip), xv);
        }
        const __m128i v = reduce4_epi32(_mm512_add_epi32(a0, e0), _mm512_add_epi32(a1, e1),
                                        _mm512_add_epi32(a2, e2), _mm512_add_epi32(a3, e3));
        _mm_storeu_si128((__m128i *)(void *)(out + 4 * b),
                         _mm_sub_epi32(v, _mm_set1_epi32(xoff[b])));
    }
}

static void dot4_i8_avx512(const int8_t *const x[4], const int32_t *const xoff[4], int nx,
                           const int8_t *const w[4], size_t n, size_t block, size_t step,
                           const char *pf, size_t n_pf, int32_t *out) {
    if (nx == 4)
        dot4_i8_body(x, xoff, 4, w, n, block, step, pf, n_pf, out);
    else if (nx == 3)
        dot4_i8_body(x, xoff, 3, w, n, block, step, pf, n_pf, out);
    else if (nx == 2)
        dot4_i8_body(x, xoff, 2, w, n, block, step, pf, n_pf, out);
    else { /* one token: the share asked for at once, which streamed rows of 7168 columns
            * faster than spread (36 vs 30 GB/s, 2 threads), rows of 1024 a little slower */
        for (; n_pf; n_pf--, pf += 64) __builtin_prefetch(pf);
        dot4_i8_one(x[0], xoff[0], w, n, block, step, out);
    }
}

/* Per 128 columns and row: one load, one xor (to w + 8), two nibble masks (one shift) and two
 * VNNI steps; x costs two loads per four rows (already split) and its offset one subtraction per
 * block after the reduction. On the 2-vCPU Zen 5 VM, 64 x 7168 in L2, group 128, one core: 60 GB/s
 * of packed weights, against 47 when the kernel split x and summed it per four rows itself. */
static void dot4_i4_avx512(const int8_t *xs, const int32_t *xoff, const uint8_t *const w[4],
                           size_t n, size_t block, int32_t *out) {
    const __m512i flip = _mm512_set1_epi8((char)0x88), lo4 = _mm512_set1_epi8(0x0f);
    for (size_t c0 = 0, b = 0; c0 < n; c0 += block, b++) {
        size_t end = n - c0 < block ? n : c0 + block;
        __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
        size_t i = c0;
#define I4S_ROW(acc, load)                                                                         \
    do {                                                                                           \
        __m512i p = _mm512_xor_si512(load, flip);                                                  \
        acc = _mm512_dpbusd_epi32(acc, _mm512_and_si512(p, lo4), xe);                              \
        acc = _mm512_dpbusd_epi32(acc, _mm512_and_si512(_mm512_srli_epi16(p, 4), lo4), xo);        \
    } while (0)
        for (; i + 128 <= end; i += 128) {
            const __m512i xe = _mm512_loadu_si512(xs + i), xo = _mm512_loadu_si512(xs + i + 64);
            const size_t o = i / 2;
            I4S_ROW(a0, _mm512_loadu_si512(w[0] + o));
            I4S_ROW(a1, _mm512_loadu_si512(w[1] + o));
            I4S_ROW(a2, _mm512_loadu_si512(w[2] + o));
            I4S_ROW(a3, _mm512_loadu_si512(w[3] + o));
        }
        if (i < end) { /* a partial step: ceil(L/2) even then floor(L/2) odd values */
            size_t len = end - i, ne = (len + 1) / 2;
            const __mmask64 me = tail64(ne), mo = tail64(len / 2);
            const __m512i xe = _mm512_maskz_loadu_epi8(me, xs + i);
            const __m512i xo = _mm512_maskz_loadu_epi8(mo, xs + i + ne);
            const size_t o = i / 2; /* i is even: block even, or a single block from 0 */
            I4S_ROW(a0, _mm512_maskz_loadu_epi8(me, w[0] + o));
            I4S_ROW(a1, _mm512_maskz_loadu_epi8(me, w[1] + o));
            I4S_ROW(a2, _mm512_maskz_loadu_epi8(me, w[2] + o));
            I4S_ROW(a3, _mm512_maskz_loadu_epi8(me, w[3] + o));
        }
#undef I4S_ROW
        __m128i sum = _mm_sub_epi32(reduce4_epi32(a0, a1, a2, a3), _mm_set1_epi32(xoff[b]));
        _mm_storeu_si128((__m128i *)(void *)(out + 4 * b), sum);
    }
}

/* ---- prefill GEMM: panel packing and the 16-row x 8-token micro-kernel ---- */

/* r[i] holds dwords (4-column slices) j = 0..15 of row i; afterwards r[j] holds slice j of rows
 * 0..15 in lanes 0..15 (a 16 x 16 dword transpose: unpack 32, unpack 64, two 128-bit shuffles).
 * Written out in named registers: with arrays and loops gcc 12 kept every stage on the stack and
 * packing ran at ~6 bytes per cycle. */
static inline __attribute__((always_inline)) void transpose16_epi32(__m512i r[16]) {
    const __m512i r0 = r[0], r1 = r[1], r2 = r[2], r3 = r[3], r4 = r[4], r5 = r[5], r6 = r[6],
                  r7 = r[7], r8 = r[8], r9 = r[9], r10 = r[10], r11 = r[11], r12 = r[12],
                  r13 = r[13], r14 = r[14], r15 = r[15];
    const __m512i a0 = _mm512_unpacklo_epi32(r0, r1), a1 = _mm512_unpackhi_epi32(r0, r1);
    const __m512i a2 = _mm512_unpacklo_epi32(r2, r3), a3 = _mm512_unpackhi_epi32(r2, r3);
    const __m512i a4 = _mm512_unpacklo_epi32(r4, r5), a5 = _mm512_unpackhi_epi32(r4, r5);
    const __m512i a6 = _mm512_unpacklo_epi32(r6, r7), a7 = _mm512_unpackhi_epi32(r6, r7);
    const __m512i a8 = _mm512_unpacklo_epi32(r8, r9), a9 = _mm512_unpackhi_epi32(r8, r9);
    const __m512i a10 = _mm512_unpacklo_epi32(r10, r11), a11 = _mm512_unpackhi_epi32(r10, r11);
    const __m512i a12 = _mm512_unpacklo_epi32(r12, r13), a13 = _mm512_unpackhi_epi32(r12, r13);
    const __m512i a14 = _mm512_unpacklo_epi32(r14, r15), a15 = _mm512_unpackhi_epi32(r14, r15);
    /* c<4k + m>: 128-bit lane L holds rows 4k .. 4k + 3 of slice 4L + m */
    const __m512i c0 = _mm512_unpacklo_epi64(a0, a2), c1 = _mm512_unpackhi_epi64(a0, a2);
    const __m512i c2 = _mm512_unpacklo_epi64(a1, a3), c3 = _mm512_unpackhi_epi64(a1, a3);
    const __m512i c4 = _mm512_unpacklo_epi64(a4, a6), c5 = _mm512_unpackhi_epi64(a4, a6);
    const __m512i c6 = _mm512_unpacklo_epi64(a5, a7), c7 = _mm512_unpackhi_epi64(a5, a7);
    const __m512i c8 = _mm512_unpacklo_epi64(a8, a10), c9 = _mm512_unpackhi_epi64(a8, a10);
    const __m512i c10 = _mm512_unpacklo_epi64(a9, a11), c11 = _mm512_unpackhi_epi64(a9, a11);
    const __m512i c12 = _mm512_unpacklo_epi64(a12, a14), c13 = _mm512_unpackhi_epi64(a12, a14);
    const __m512i c14 = _mm512_unpacklo_epi64(a13, a15), c15 = _mm512_unpackhi_epi64(a13, a15);
#define DS_T16_OUT(m, cm, c4m, c8m, c12m)                                                          \
    do {                                                                                           \
        __m512i lo01 = _mm512_shuffle_i32x4(cm, c4m, 0x88); /* lanes 0, 2 of each */               \
        __m512i hi01 = _mm512_shuffle_i32x4(cm, c4m, 0xdd); /* lanes 1, 3 */                       \
        __m512i lo23 = _mm512_shuffle_i32x4(c8m, c12m, 0x88);                                      \
        __m512i hi23 = _mm512_shuffle_i32x4(c8m, c12m, 0xdd);                                      \
        r[m] = _mm512_shuffle_i32x4(lo01, lo23, 0x88);      /* slice m */                          \
        r[4 + m] = _mm512_shuffle_i32x4(hi01, hi23, 0x88);  /* slice 4 + m */                      \
        r[8 + m] = _mm512_shuffle_i32x4(lo01, lo23, 0xdd);  /* slice 8 + m */                      \
        r[12 + m] = _mm512_shuffle_i32x4(hi01, hi23, 0xdd); /* slice 12 + m */                     \
    } while (0)
    DS_T16_OUT(0, c0, c4, c8, c12);
    DS_T16_OUT(1, c1, c5, c9, c13);
    DS_T16_OUT(2, c2, c6, c10, c14);
    DS_T16_OUT(3, c3, c7, c11, c15);
#undef DS_T16_OUT
}

/* 64 columns at a time through the transpose; the tail (n % 64) element by element, as scalar */
static void pack16_i8_avx512(uint8_t *panel, const int8_t *const w[16], size_t n, size_t step) {
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    size_t c0 = 0;
    for (; c0 + 64 <= n; c0 += 64) {
        __m512i r[16];
#pragma GCC unroll 16
        for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_si512(w[i] + c0 / 64 * step);
        transpose16_epi32(r);
#pragma GCC unroll 16
        for (int j = 0; j < 16; j++)
            _mm512_storeu_si512(panel + 64 * (c0 / 4 + (size_t)j), _mm512_xor_si512(r[j], flip));
    }
    for (size_t g = c0 / 4; g < (n + 3) / 4; g++)
        for (size_t i = 0; i < 16; i++)
            for (size_t j = 0; j < 4; j++) {
                size_t c = 4 * g + j;
                panel[64 * g + 4 * i + j] = c < n ? (uint8_t)(w[i][ds_i8_at(c, step)] + 128) : 0;
            }
}

static void pack16_i4_avx512(uint8_t *panel, const uint8_t *const w[16], size_t n) {
    const __m512i lo = _mm512_set1_epi16(0x000f), hi = _mm512_set1_epi16(0x0f00);
    const __m512i flip = _mm512_set1_epi8(0x08);
    size_t c0 = 0;
    for (; c0 + 64 <= n; c0 += 64) {
        __m512i r[16];
#pragma GCC unroll 16
        for (int i = 0; i < 16; i++) { /* 32 packed bytes -> 64 nibbles, column order */
            __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const void *)(w[i] + c0 / 2)));
            v = _mm512_or_si512(_mm512_and_si512(v, lo),
                                _mm512_and_si512(_mm512_slli_epi16(v, 4), hi));
            r[i] = _mm512_xor_si512(v, flip); /* two's complement nibble ^ 8 = w + 8 */
        }
        transpose16_epi32(r);
#pragma GCC unroll 16
        for (int j = 0; j < 16; j++) _mm512_storeu_si512(panel + 64 * (c0 / 4 + (size_t)j), r[j]);
    }
    for (size_t g = c0 / 4; g < (n + 3) / 4; g++)
        for (size_t i = 0; i < 16; i++)
            for (size_t j = 0; j < 4; j++) {
                size_t c = 4 * g + j;
                panel[64 * g + 4 * i + j] = c < n ? (uint8_t)(ds_i4_get(w[i], c) + 8) : 0;
            }
}

static inline __m512i bcast4(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, sizeof v);
    return _mm512_set1_epi32(v);
}

/* The exact int32 sums of 4-column groups [g0, g1) for nt (1, 2, 4 or 8) tokens, in eight
 * chains: a token owns 8 / nt of them, over alternate groups (integer sums are exact, so their
 * order is free), and one panel load feeds nt VNNI steps whose token operand is a 4-byte
 * broadcast. Fewer chains waited on the VNNI latency. With np = 2 (nt = 8) a second panel's
 * load shares each broadcast, its sums in acc[8 + t]. One noinline function per form (below):
 * inlined into the block loop, gcc 12 copied every accumulator between registers twice per step
 * (16 extra moves per 8 dot steps, ~40% slower); dpbusd_acc keeps each chain in its register. */
static inline __attribute__((always_inline)) void
gemm_block_body(const uint8_t *panel, const uint8_t *panel1, size_t g0, size_t g1,
                const int8_t *const x[8], const int nt, const int np, const char **pfp,
                size_t *n_pfp, size_t per, __m512i acc[16]) {
    const int ch = 8 / nt; /* chains per token */
    const char *pf = *pfp;
    size_t n_pf = *n_pfp;
    __m512i a[16];
#pragma GCC unroll 16
    for (int i = 0; i < 8 * np; i++) a[i] = _mm512_setzero_si512();
    size_t g = g0;
    for (; g + (size_t)ch <= g1; g += (size_t)ch) {
#pragma GCC unroll 8
        for (int j = 0; j < ch; j++) {
            for (size_t q = 0; q < per && n_pf; q++, n_pf--, pf += 64) __builtin_prefetch(pf);
            const __m512i p = _mm512_loadu_si512(panel + 64 * (g + (size_t)j));
            const __m512i p1 = np == 2 ? _mm512_loadu_si512(panel1 + 64 * (g + (size_t)j)) : p;
#pragma GCC unroll 8
            for (int t = 0; t < nt; t++) {
                const __m512i b = bcast4(x[t] + 4 * (g + j));
                dpbusd_acc(&a[j * nt + t], p, b);
                if (np == 2) dpbusd_acc(&a[8 + t], p1, b);
            }
        }
    }
    for (; g < g1; g++) { /* np = 2 has one chain a token: it never gets here */
        for (size_t q = 0; q < per && n_pf; q++, n_pf--, pf += 64) __builtin_prefetch(pf);
        const __m512i p = _mm512_loadu_si512(panel + 64 * g);
#pragma GCC unroll 8
        for (int t = 0; t < nt; t++) dpbusd_acc(&a[t], p, bcast4(x[t] + 4 * g));
    }
#pragma GCC unroll 8
    for (int t = 0; t < nt; t++) {
        __m512i s = a[t];
#pragma GCC unroll 8
        for (int j = 1; j < ch; j++) s = _mm512_add_epi32(s, a[j * nt + t]);
        acc[t] = s;
        if (np == 2) acc[8 + t] = a[8 + t];
    }
    *pfp = pf;
    *n_pfp = n_pf;
}

#define GEMM_BLOCK(NAME, NT, NP)                                                                   \
    static __attribute__((noinline)) void NAME(                                                    \
        const uint8_t *panel, const uint8_t *panel1, size_t g0, size_t g1,                         \
        const int8_t *const x[8], const char **pfp, size_t *n_pfp, size_t per, __m512i acc[16]) {  \
        gemm_block_body(panel, panel1, g0, g1, x, NT, NP, pfp, n_pfp, per, acc);                   \
    }
GEMM_BLOCK(gemm_block1_avx512, 1, 1)
GEMM_BLOCK(gemm_block2_avx512, 2, 1)
GEMM_BLOCK(gemm_block4_avx512, 4, 1)
GEMM_BLOCK(gemm_block8_avx512, 8, 1)
GEMM_BLOCK(gemm_block8x2_avx512, 8, 2)

/* np (1 or 2) panels against nt tokens (np = 2: nt = 8), the second panel's outputs from out +
 * 128 on, scaled by sw1. The prefetches go out a few per 4-column group: issued in one burst
 * before the call, they stalled on the full miss queue. Experts of the medium model's shapes,
 * weights cold, 2 threads, alternating in one process (mean GB/s): 8 tokens each 20.0 -> 22.8,
 * 16 tokens 13.6 -> 16.9. */
static inline __attribute__((always_inline)) void
gemm_i8_avx512(const uint8_t *panel, const uint8_t *panel1, const int np, size_t n, size_t block,
               int nt, const int8_t *const x[8], const int32_t *const xoff[8], const float *sw,
               const float *sw1, const char *pf, size_t n_pf, float *out) {
    const size_t ng = (n + 3) / 4, bg = block >= n ? ng : block / 4;
    const size_t per = ng ? (n_pf + ng - 1) / ng : 0;
    const int nv = nt <= 2 ? nt : nt <= 4 ? 4 : 8; /* tokens computed: x[nt..nv) are readable */
    /* the sums accumulate in out itself (written in full by the first block): an array of
     * sixteen vectors here lived in memory anyway and was zeroed by `rep stos` every call, 20%
     * of the kernel's time beside the block loop at 192 sequences (perf). Medium W8A8, old and
     * new alternating step by step (medians of 32 steps), ms a step at 192 sequences: q_a / kv_a
     * / q_b 7.04 -> 5.95, o_proj 5.62 -> 5.26, the experts 23.1 -> 21.1, the shared expert 4.57
     * -> 4.07; at 32, q_a / kv_a / q_b 1.50 -> 1.33; even at 1 and 8. */
    for (size_t g0 = 0, b = 0; g0 < ng; g0 += bg, b++) {
        const size_t g1 = g0 + bg < ng ? g0 + bg : ng;
        __m512i a[16];
        if (np == 2)
            gemm_block8x2_avx512(panel, panel1, g0, g1, x, &pf, &n_pf, per, a);
        else if (nv == 1)
            gemm_block1_avx512(panel, NULL, g0, g1, x, &pf, &n_pf, per, a);
        else if (nv == 2)
            gemm_block2_avx512(panel, NULL, g0, g1, x, &pf, &n_pf, per, a);
        else if (nv == 4)
            gemm_block4_avx512(panel, NULL, g0, g1, x, &pf, &n_pf, per, a);
        else
            gemm_block8_avx512(panel, NULL, g0, g1, x, &pf, &n_pf, per, a);
        for (int q = 0; q < np; q++) {
            const __m512 s = _mm512_loadu_ps((q ? sw1 : sw) + 16 * b);
            for (int t = 0; t < nt; t++) {
                float *o = out + 128 * q + 16 * t;
                __m512i isum = _mm512_sub_epi32(a[8 * q + t], _mm512_set1_epi32(xoff[t][b]));
                const __m512 f = b ? _mm512_loadu_ps(o) : _mm512_setzero_ps();
                _mm512_storeu_ps(o, _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), s, f));
            }
        }
    }
    for (; n_pf; n_pf--, pf += 64) __builtin_prefetch(pf);
}

static void gemm16x8_i8_avx512(const uint8_t *panel, size_t n, size_t block, int nt,
                               const int8_t *const x[8], const int32_t *const xoff[8],
                               const float *sw, const char *pf, size_t n_pf, float out[128]) {
    gemm_i8_avx512(panel, NULL, 1, n, block, nt, x, xoff, sw, NULL, pf, n_pf, out);
}

static void gemm32x8_i8_avx512(const uint8_t *panel0, const uint8_t *panel1, size_t n, size_t block,
                               const int8_t *const x[8], const int32_t *const xoff[8],
                               const float *sw0, const float *sw1, const char *pf, size_t n_pf,
                               float out[256]) {
    gemm_i8_avx512(panel0, panel1, 2, n, block, 8, x, xoff, sw0, sw1, pf, n_pf, out);
}

static float absmax_f32_avx512(const float *x, size_t n) {
    const __m512 abs = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
    __m512 m = _mm512_setzero_ps();
    size_t i = 0;
    for (; i + 16 <= n; i += 16) /* max_ps(a, m) returns m when a is NaN: NaNs are skipped */
        m = _mm512_max_ps(_mm512_and_ps(_mm512_loadu_ps(x + i), abs), m);
    if (i < n)
        m = _mm512_max_ps(_mm512_and_ps(_mm512_maskz_loadu_ps(tail16(n - i), x + i), abs), m);
    return _mm512_reduce_max_ps(m);
}

/* The maximum in 16 lanes (a compare per element, no loop-carried branch), then the first
 * position holding it. The scalar loop's strict > chain took 16 ms for 192 x 129280 logits on one
 * Zen 5 core, this 4.2 ms. NaNs are skipped by the max and noted in a mask; with one, the second
 * pass looks for the first NaN instead. */
static int64_t argmax_f32_avx512(const float *x, size_t n) {
    __m512 m = _mm512_set1_ps(-INFINITY);
    __mmask16 nan = 0;
    size_t i = 0;
    for (; i + 16 <= n; i += 16) { /* max_ps(a, m) returns m when a is NaN */
        const __m512 v = _mm512_loadu_ps(x + i);
        nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        m = _mm512_max_ps(v, m);
    }
    if (i < n) {
        const __m512 v = _mm512_maskz_loadu_ps(tail16(n - i), x + i);
        nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        m = _mm512_mask_max_ps(m, tail16(n - i), v, m);
    }
    const float best = _mm512_reduce_max_ps(m);
    if (best == -INFINITY && !nan) return -1;
    const __m512 b = _mm512_set1_ps(best);
    for (i = 0; i < n; i += 16) {
        __mmask16 t = n - i >= 16 ? (__mmask16)0xffff : tail16(n - i);
        const __m512 v = _mm512_maskz_loadu_ps(t, x + i);
        __mmask16 hit = nan ? _mm512_mask_cmp_ps_mask(t, v, v, _CMP_UNORD_Q)
                            : _mm512_mask_cmp_ps_mask(t, v, b, _CMP_EQ_OQ);
        if (hit) return (int64_t)(i + (size_t)__builtin_ctz(hit));
    }
    return -1; /* not reached: best or a NaN is one of the values */
}

/* exp(x) for x in [-100, 100] (the caller clamps): x = k ln2 + r with |r| <= ln2 / 2 (ln2 in two
 * parts, so r is nearly exact), e^r by a degree-7 polynomial (the Cephes expf coefficients,
 * ~1e-7 relative), times 2^k by scalef, which gives inf past the float range and 0 below it. */
static inline __m512 exp_ps(__m512 x) {
    const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, k);
}

/* libm's scalar expf took 3.7 ns an element, ~6 ms of a 192-sequence step (medium, 8 layers of
 * 768 x 512 expert gates). Clamping -a to [-100, 100] changes nothing after the division: 1 + e
 * is exactly 1 below -100 and inf above 88.8 either way; NaN passes through a. */
static void swiglu_f32_avx512(float *a, const float *b, size_t n) {
    const __m512 lo = _mm512_set1_ps(-100.0f), hi = _mm512_set1_ps(100.0f);
    const __m512 one = _mm512_set1_ps(1.0f);
    for (size_t i = 0; i < n; i += 16) {
        __mmask16 m = n - i >= 16 ? (__mmask16)0xffff : tail16(n - i);
        __m512 v = _mm512_maskz_loadu_ps(m, a + i);
        __m512 x = _mm512_min_ps(_mm512_max_ps(_mm512_sub_ps(_mm512_setzero_ps(), v), lo), hi);
        __m512 y = _mm512_div_ps(v, _mm512_add_ps(one, exp_ps(x)));
        _mm512_mask_storeu_ps(a + i, m, _mm512_mul_ps(y, _mm512_maskz_loadu_ps(m, b + i)));
    }
}

/* Two permutes per 32 floats: the scalar loop took ~3% of a BF16 step at 64 sequences (each
 * expert's x is split per call). */
static void bf16_split_avx512(const float *x, size_t n, float *xs) {
    const __m512i even =
        _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    size_t i = 0;
    for (; i + 32 <= n; i += 32) {
        const __m512 a = _mm512_loadu_ps(x + i), b = _mm512_loadu_ps(x + i + 16);
        _mm512_storeu_ps(xs + i, _mm512_permutex2var_ps(a, even, b));
        _mm512_storeu_ps(xs + i + 16, _mm512_permutex2var_ps(a, odd, b));
    }
    memcpy(xs + i, x + i, (n - i) * sizeof *x);
}

/* exp_f32's e^v: clamped to [-104, 100] for the polynomial (-inf would give NaN there); e^-104
 * rounds to 0 in f32, so -inf and everything below give exactly 0, as expf does. */
static inline __m512 exp_clamped_ps(__m512 v) {
    const __m512 c =
        _mm512_min_ps(_mm512_max_ps(v, _mm512_set1_ps(-104.0f)), _mm512_set1_ps(100.0f));
    return exp_ps(_mm512_mask_mov_ps(c, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), v)); /* NaN stays */
}

static void exp_f32_avx512(float *dst, const float *x, size_t n) {
    for (size_t i = 0; i < n; i += 16) {
        __mmask16 m = n - i >= 16 ? (__mmask16)0xffff : tail16(n - i);
        _mm512_mask_storeu_ps(dst + i, m, exp_clamped_ps(_mm512_maskz_loadu_ps(m, x + i)));
    }
}

/* The heads are the lanes: one pass for the max (four chains of the first-wins compare, merged in
 * order: the same value), one for the exp and the sums (two vectors of double chains), one for the
 * products. With the scores a row per head, each head's max scan and sum were serial chains (four
 * rows side by side): 16 heads of 48 scores took ~2.6k TSC cycles. */
static void softmax16_f32_avx512(float *x, size_t n) {
    __m512 m0 = _mm512_loadu_ps(x), m1 = m0, m2 = m0, m3 = m0;
    size_t i = 1;
    for (; i + 4 <= n; i += 4) {
        const __m512 v0 = _mm512_loadu_ps(x + 16 * i), v1 = _mm512_loadu_ps(x + 16 * i + 16);
        const __m512 v2 = _mm512_loadu_ps(x + 16 * i + 32), v3 = _mm512_loadu_ps(x + 16 * i + 48);
        m0 = _mm512_mask_mov_ps(m0, _mm512_cmp_ps_mask(v0, m0, _CMP_GT_OQ), v0);
        m1 = _mm512_mask_mov_ps(m1, _mm512_cmp_ps_mask(v1, m1, _CMP_GT_OQ), v1);
        m2 = _mm512_mask_mov_ps(m2, _mm512_cmp_ps_mask(v2, m2, _CMP_GT_OQ), v2);
        m3 = _mm512_mask_mov_ps(m3, _mm512_cmp_ps_mask(v3, m3, _CMP_GT_OQ), v3);
    }
    for (; i < n; i++) {
        const __m512 v = _mm512_loadu_ps(x + 16 * i);
        m0 = _mm512_mask_mov_ps(m0, _mm512_cmp_ps_mask(v, m0, _CMP_GT_OQ), v);
    }
    m0 = _mm512_mask_mov_ps(m0, _mm512_cmp_ps_mask(m1, m0, _CMP_GT_OQ), m1);
    m0 = _mm512_mask_mov_ps(m0, _mm512_cmp_ps_mask(m2, m0, _CMP_GT_OQ), m2);
    m0 = _mm512_mask_mov_ps(m0, _mm512_cmp_ps_mask(m3, m0, _CMP_GT_OQ), m3);
    __m512d lo = _mm512_setzero_pd(), hi = lo;
    for (i = 0; i < n; i++) {
        const __m512 e = exp_clamped_ps(_mm512_sub_ps(_mm512_loadu_ps(x + 16 * i), m0));
        _mm512_storeu_ps(x + 16 * i, e);
        lo = _mm512_add_pd(lo, _mm512_cvtps_pd(_mm512_castps512_ps256(e)));
        hi = _mm512_add_pd(hi, _mm512_cvtps_pd(_mm512_extractf32x8_ps(e, 1)));
    }
    const __m512d one = _mm512_set1_pd(1.0);
    const __m512 inv =
        _mm512_insertf32x8(_mm512_castps256_ps512(_mm512_cvtpd_ps(_mm512_div_pd(one, lo))),
                           _mm512_cvtpd_ps(_mm512_div_pd(one, hi)), 1);
    for (i = 0; i < n; i++)
        _mm512_storeu_ps(x + 16 * i, _mm512_mul_ps(_mm512_loadu_ps(x + 16 * i), inv));
}

/* The eight chains are a vector's eight double lanes; a tail adds +0 to the lanes past it. The
 * portable loop (SSE2 at -O2, two doubles a step) took ~0.8 us a 1024-float row. Medium models,
 * the two alternating step by step (medians of 48 - 64 steps, ms a step): W8A8 7.85 -> 7.72 and
 * 7.84 -> 7.68 at 1 sequence, 18.60 -> 18.41 at 8, 48.52 -> 47.82 at 32, 87.46 -> 87.20 at 64,
 * 233.4 -> 231.3 at 192; BF16 25.14 -> 24.66 at 8, 119.12 -> 119.01 at 64. */
static void rmsnorm_f32_avx512(float *out, const float *x, const float *w, size_t n, float eps) {
    __m512d s = _mm512_setzero_pd();
    for (size_t i = 0; i < n; i += 8) {
        const __mmask8 m = n - i >= 8 ? (__mmask8)0xff : (__mmask8)((1u << (n - i)) - 1);
        const __m512d v = _mm512_cvtps_pd(_mm256_maskz_loadu_ps(m, x + i));
        s = _mm512_fmadd_pd(v, v, s);
    }
    double c[8];
    _mm512_storeu_pd(c, s);
    const double ss = ((c[0] + c[1]) + (c[2] + c[3])) + ((c[4] + c[5]) + (c[6] + c[7]));
    const __m512 r = _mm512_set1_ps(1.0f / sqrtf((float)(ss / (double)n) + eps));
    for (size_t i = 0; i < n; i += 16) {
        const __mmask16 m = n - i >= 16 ? (__mmask16)0xffff : tail16(n - i);
        const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + i), r);
        _mm512_mask_storeu_ps(out + i, m, _mm512_mul_ps(v, _mm512_maskz_loadu_ps(m, w + i)));
    }
}

static void quantize_i8_avx512(const float *x, size_t n, float s, int8_t *q) {
    const __m512 vs = _mm512_set1_ps(s), hi = _mm512_set1_ps(127.0f), lo = _mm512_set1_ps(-127.0f);
    for (size_t i = 0; i < n; i += 16) {
        __mmask16 m = n - i >= 16 ? (__mmask16)0xffff : tail16(n - i);
        __m512 v = _mm512_div_ps(_mm512_maskz_loadu_ps(m, x + i), vs);
        v = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        __mmask16 ok = _mm512_cmp_ps_mask(v, v, _CMP_ORD_Q); /* NaN -> 0 */
        v = _mm512_maskz_mov_ps(ok, _mm512_max_ps(_mm512_min_ps(v, hi), lo));
        const __m128i b = _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(v));
        if (m == 0xffff)
            _mm_storeu_si128((__m128i *)(void *)(q + i), b);
        else
            _mm_mask_storeu_epi8(q + i, m, b);
    }
}

/* q ^ 0x80 is q + 128 as an unsigned byte: psadbw against zero sums eight of those into each
 * 64-bit lane; 128 a byte read comes off at the end. */
static int64_t sum_i8_avx512(const int8_t *q, size_t n) {
    const __m512i flip = _mm512_set1_epi8((char)0x80), zero = _mm512_setzero_si512();
    __m512i acc = zero;
    for (size_t i = 0; i < n; i += 64) {
        const __mmask64 m = n - i >= 64 ? ~(__mmask64)0 : ((__mmask64)1 << (n - i)) - 1;
        /* lanes past n read 0, which the flip makes 128 like every counted byte */
        const __m512i v = _mm512_xor_si512(_mm512_maskz_loadu_epi8(m, q + i), flip);
        acc = _mm512_add_epi64(acc, _mm512_sad_epu8(v, zero));
    }
    return _mm512_reduce_add_epi64(acc) - 128 * (int64_t)((n + 63) / 64 * 64);
}

static void i8_to_f32_avx512(float *dst, const int8_t *src, size_t n, float scale) {
    const __m512 vs = _mm512_set1_ps(scale);
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512i v = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(const void *)(src + i)));
        _mm512_storeu_ps(dst + i, _mm512_mul_ps(_mm512_cvtepi32_ps(v), vs));
    }
    if (i < n) {
        __mmask16 m = tail16(n - i);
        __m512i v = _mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, src + i));
        _mm512_mask_storeu_ps(dst + i, m, _mm512_mul_ps(_mm512_cvtepi32_ps(v), vs));
    }
}

static void i8_to_f32_lanes_avx512(float *dst, const int8_t *src, size_t n, const float *scale) {
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512i v = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(const void *)(src + i)));
        _mm512_storeu_ps(dst + i, _mm512_mul_ps(_mm512_cvtepi32_ps(v), _mm512_loadu_ps(scale + i)));
    }
    if (i < n) {
        __mmask16 m = tail16(n - i);
        __m512i v = _mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, src + i));
        _mm512_mask_storeu_ps(
            dst + i, m, _mm512_mul_ps(_mm512_cvtepi32_ps(v), _mm512_maskz_loadu_ps(m, scale + i)));
    }
}

/* 16 packed bytes -> 32 columns: the bytes widened to dwords, low and high nibbles interleaved
 * back into column order by two two-source permutes, sign-extended by (v ^ 8) - 8. */
static void i4_to_f32_avx512(float *dst, const uint8_t *src, size_t n, float scale) {
    const __m512 vs = _mm512_set1_ps(scale);
    const __m512i lo4 = _mm512_set1_epi32(15), eight = _mm512_set1_epi32(8);
    const __m512i i0 = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i i1 =
        _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    size_t i = 0;
    for (; i + 32 <= n; i += 32) {
        __m512i b =
            _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(const void *)(src + i / 2)));
        __m512i lo = _mm512_and_si512(b, lo4), hi = _mm512_srli_epi32(b, 4);
        __m512i c0 =
            _mm512_sub_epi32(_mm512_xor_si512(_mm512_permutex2var_epi32(lo, i0, hi), eight), eight);
        __m512i c1 =
            _mm512_sub_epi32(_mm512_xor_si512(_mm512_permutex2var_epi32(lo, i1, hi), eight), eight);
        _mm512_storeu_ps(dst + i, _mm512_mul_ps(_mm512_cvtepi32_ps(c0), vs));
        _mm512_storeu_ps(dst + i + 16, _mm512_mul_ps(_mm512_cvtepi32_ps(c1), vs));
    }
    for (; i < n; i++) dst[i] = (float)ds_i4_get(src, i) * scale;
}

/* 16 columns of 16 rows per step through the same dword transpose as the int8 panels; the
 * tail column by column. */
static void pack16_f32_avx512(float *panel, const float *const rows[16], size_t n) {
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512i r[16];
#pragma GCC unroll 16
        for (int k = 0; k < 16; k++) r[k] = _mm512_castps_si512(_mm512_loadu_ps(rows[k] + i));
        transpose16_epi32(r);
#pragma GCC unroll 16
        for (int k = 0; k < 16; k++) _mm512_storeu_si512(panel + 16 * (i + (size_t)k), r[k]);
    }
    for (; i < n; i++)
        for (size_t k = 0; k < 16; k++) panel[16 * i + k] = rows[k][i];
}

/* The same from BF16 rows, widened (a 16-bit load zero-extended and shifted into the high half)
 * before the transpose. */
static void pack16_bf16_avx512(float *panel, const uint16_t *const rows[16], size_t n) {
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512i r[16];
#pragma GCC unroll 16
        for (int k = 0; k < 16; k++)
            r[k] = _mm512_slli_epi32(
                _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(rows[k] + i))), 16);
        transpose16_epi32(r);
#pragma GCC unroll 16
        for (int k = 0; k < 16; k++) _mm512_storeu_si512(panel + 16 * (i + (size_t)k), r[k]);
    }
    for (; i < n; i++)
        for (size_t k = 0; k < 16; k++) {
            uint16_t h; /* rows in an mmap may sit at odd addresses */
            memcpy(&h, rows[k] + i, sizeof h);
            panel[16 * i + k] = ds_bf16_decode(h);
        }
}

/* The same from int8 rows, each converted by its scale (ld_i8x16) before the transpose. */
static void pack16_i8_f32_avx512(float *panel, const int8_t *const rows[16], const float scale[16],
                                 size_t n) {
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512i r[16];
#pragma GCC unroll 16
        for (int k = 0; k < 16; k++)
            r[k] = _mm512_castps_si512(ld_i8x16(rows[k] + i, _mm512_set1_ps(scale[k])));
        transpose16_epi32(r);
#pragma GCC unroll 16
        for (int k = 0; k < 16; k++) _mm512_storeu_si512(panel + 16 * (i + (size_t)k), r[k]);
    }
    for (; i < n; i++)
        for (size_t k = 0; k < 16; k++) panel[16 * i + k] = (float)rows[k][i] * scale[k];
}

/* The float GEMMs' eight accumulators v0 .. v7 stored as out's rows of 16 from dst on. */
#define STORE8_PS(dst, v)                                                                          \
    do {                                                                                           \
        _mm512_storeu_ps((dst), v##0);                                                             \
        _mm512_storeu_ps((dst) + 16, v##1);                                                        \
        _mm512_storeu_ps((dst) + 32, v##2);                                                        \
        _mm512_storeu_ps((dst) + 48, v##3);                                                        \
        _mm512_storeu_ps((dst) + 64, v##4);                                                        \
        _mm512_storeu_ps((dst) + 80, v##5);                                                        \
        _mm512_storeu_ps((dst) + 96, v##6);                                                        \
        _mm512_storeu_ps((dst) + 112, v##7);                                                       \
    } while (0)

/* The float GEMM over a packed panel: per column one load of 16 values and eight FMAs with the
 * tokens' values broadcast from memory; eight independent accumulators hide the FMA latency.
 * noinline for the same gcc register-allocation reason as gemm_block8_avx512. */
static __attribute__((noinline)) void gemm16x8_f32_avx512(const float *panel, size_t n,
                                                          const float *const x[8], float out[128]) {
    const float *x0 = x[0], *x1 = x[1], *x2 = x[2], *x3 = x[3];
    const float *x4 = x[4], *x5 = x[5], *x6 = x[6], *x7 = x[7];
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    for (size_t i = 0; i < n; i++) {
        const __m512 p = _mm512_loadu_ps(panel + 16 * i);
        a0 = _mm512_fmadd_ps(p, _mm512_set1_ps(x0[i]), a0);
        a1 = _mm512_fmadd_ps(p, _mm512_set1_ps(x1[i]), a1);
        a2 = _mm512_fmadd_ps(p, _mm512_set1_ps(x2[i]), a2);
        a3 = _mm512_fmadd_ps(p, _mm512_set1_ps(x3[i]), a3);
        a4 = _mm512_fmadd_ps(p, _mm512_set1_ps(x4[i]), a4);
        a5 = _mm512_fmadd_ps(p, _mm512_set1_ps(x5[i]), a5);
        a6 = _mm512_fmadd_ps(p, _mm512_set1_ps(x6[i]), a6);
        a7 = _mm512_fmadd_ps(p, _mm512_set1_ps(x7[i]), a7);
    }
    STORE8_PS(out, a);
}

/* Two vectors of chains, 16 in all (20 of the 32 registers with the loads and the broadcast). */
#define ROWS32_TOKEN(t)                                                                            \
    do {                                                                                           \
        const __m512 v = _mm512_set1_ps(x##t[i * ldx]);                                            \
        a##t = _mm512_fmadd_ps(p, v, a##t);                                                        \
        b##t = _mm512_fmadd_ps(q, v, b##t);                                                        \
    } while (0)

static __attribute__((noinline)) void gemm32x8_f32_rows_avx512(const float *const *rows, size_t off,
                                                               size_t m, size_t n,
                                                               const float *const x[8], size_t ldx,
                                                               float out[256]) {
    const __mmask16 k0 = m >= 16 ? (__mmask16)0xffff : tail16(m);
    const __mmask16 k1 = m >= 32 ? (__mmask16)0xffff : m > 16 ? tail16(m - 16) : 0;
    const float *x0 = x[0], *x1 = x[1], *x2 = x[2], *x3 = x[3];
    const float *x4 = x[4], *x5 = x[5], *x6 = x[6], *x7 = x[7];
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    __m512 b0 = a0, b1 = a0, b2 = a0, b3 = a0, b4 = a0, b5 = a0, b6 = a0, b7 = a0;
    for (size_t i = 0; i < n; i++) {
        const float *r = rows[i] + off;
        const __m512 p = _mm512_maskz_loadu_ps(k0, r), q = _mm512_maskz_loadu_ps(k1, r + 16);
        ROWS32_TOKEN(0);
        ROWS32_TOKEN(1);
        ROWS32_TOKEN(2);
        ROWS32_TOKEN(3);
        ROWS32_TOKEN(4);
        ROWS32_TOKEN(5);
        ROWS32_TOKEN(6);
        ROWS32_TOKEN(7);
    }
    STORE8_PS(out, a);
    STORE8_PS(out + 128, b);
}

/* Eight panels' chains side by side, one broadcast of x per column: at one token, gemm16x8_f32
 * would run seven repeats of it through every panel. */
static void gemm128x1_f32_avx512(const float *const panel[8], size_t n, const float *x,
                                 float out[128]) {
    const float *p0 = panel[0], *p1 = panel[1], *p2 = panel[2], *p3 = panel[3];
    const float *p4 = panel[4], *p5 = panel[5], *p6 = panel[6], *p7 = panel[7];
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    for (size_t i = 0; i < n; i++) {
        const __m512 v = _mm512_set1_ps(x[i]);
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(p0 + 16 * i), v, a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(p1 + 16 * i), v, a1);
        a2 = _mm512_fmadd_ps(_mm512_loadu_ps(p2 + 16 * i), v, a2);
        a3 = _mm512_fmadd_ps(_mm512_loadu_ps(p3 + 16 * i), v, a3);
        a4 = _mm512_fmadd_ps(_mm512_loadu_ps(p4 + 16 * i), v, a4);
        a5 = _mm512_fmadd_ps(_mm512_loadu_ps(p5 + 16 * i), v, a5);
        a6 = _mm512_fmadd_ps(_mm512_loadu_ps(p6 + 16 * i), v, a6);
        a7 = _mm512_fmadd_ps(_mm512_loadu_ps(p7 + 16 * i), v, a7);
    }
    STORE8_PS(out, a);
}

static const ds_kernels avx512_table = {
    .name = "avx512",
    .bf16_to_f32 = bf16_to_f32_avx512,
    .f16_to_f32 = f16_to_f32_avx512,
    .fp8_to_f32 = fp8_to_f32_avx512,
    .absmax_f32 = absmax_f32_avx512,
    .argmax_f32 = argmax_f32_avx512,
    .swiglu_f32 = swiglu_f32_avx512,
    .exp_f32 = exp_f32_avx512,
    .softmax16_f32 = softmax16_f32_avx512,
    .rmsnorm_f32 = rmsnorm_f32_avx512,
    .bf16_split = bf16_split_avx512,
    .quantize_i8 = quantize_i8_avx512,
    .sum_i8 = sum_i8_avx512,
    .i8_to_f32 = i8_to_f32_avx512,
    .i4_to_f32 = i4_to_f32_avx512,
    .i8_to_f32_lanes = i8_to_f32_lanes_avx512,
    .dot_f32 = dot_f32_avx512,
    .dot4_f32 = dot4_f32_avx512,
    .axpy_f32 = axpy_f32_avx512,
    .axpy_i8 = axpy_i8_avx512,
    .axpy_rows_i8_lanes = axpy_rows_i8_lanes_avx512,
    .axpy_rows_i8 = axpy_rows_i8_avx512,
    .axpy_rows_bf16 = axpy_rows_bf16_avx512,
    .axpy_bf16 = axpy_bf16_avx512,
    .dot4_bf16 = dot4_bf16_avx512,
    .dot4_f16 = dot4_f16_avx512,
    .dot4_fp8 = dot4_fp8_avx512,
    .dot4xn_bf16 = dot4xn_bf16_avx512,
    .dot4x2_f16 = dot4x2_f16_avx512,
    .dot4x2_fp8 = dot4x2_fp8_avx512,
    .dot4_i8 = dot4_i8_avx512,
    .dot4_i4 = dot4_i4_avx512,
    .pack16_i8 = pack16_i8_avx512,
    .pack16_i4 = pack16_i4_avx512,
    .gemm16x8_i8 = gemm16x8_i8_avx512,
    .gemm32x8_i8 = gemm32x8_i8_avx512,
    .pack16_f32 = pack16_f32_avx512,
    .pack16_bf16 = pack16_bf16_avx512,
    .pack16_i8_f32 = pack16_i8_f32_avx512,
    .gemm16x8_f32 = gemm16x8_f32_avx512,
    .gemm32x8_f32_rows = gemm32x8_f32_rows_avx512,
    .gemm128x1_f32 = gemm128x1_f32_avx512,
};

const ds_kernels *ds_kernels_avx512_table(void) {
    return &avx512_table;
}
