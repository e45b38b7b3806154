/* AVX2 + FMA + F16C table (compiled with -mavx2 -mfma -mf16c, chosen only when CPUID and XCR0
 * say the CPU and the OS support them).
 *
 * Conversions are bit-identical to scalar:
 *   - BF16: widen to 32 bits and shift left by 16.
 *   - F16: vcvtph2ps is exact for every code (subnormals included); it quiets a signalling NaN,
 *     so NaN inputs give *a* NaN, not the same bits.
 *   - FP8 E4M3FN: the byte's sign moved to bit 15 and its 7 exponent+mantissa bits to bits
 *     7..13 form an IEEE half whose value is exactly e4m3(b) * 2^-8, normals (bias 15 vs 7) and
 *     subnormals (m * 2^-3 * 2^-14 = m * 2^-9 * 2^-8) alike; vcvtph2ps widens it exactly to a
 *     *normal* f32, and one multiply by scale * 2^8 (exact) rounds the exact product
 *     e4m3(b) * scale once, as the reference does. (Going through an f32 directly, bits << 20, also
 * works but makes the FP8 subnormals f32 subnormals, and multiplying those measured 2x slower.) The
 * NaN codes 0x7f / 0xff are NOT special-cased: they come out as +-480 * scale. Checkpoints never
 * store them, and a branch per byte would cost more than it is worth. Dot products use FMA with
 * several independent accumulators (FMA latency is 4 cycles, two issue per cycle), and finish odd
 * tails with masked loads so no element is read twice and nothing past the end is touched.
 *
 * The row ops (absmax, argmax, exp, SwiGLU, softmax16, rmsnorm, quantize), the axpy over rows
 * and the float GEMMs are the AVX-512 table's algorithms in 8 lanes, so the two tables give the
 * same floats. Until they were here an AVX2 machine took them from the scalar table, and
 * attention ran the per-head dot / axpy path: medium W8A8 on a 2-core Zen 3 VM, attention's
 * absorptions and weighted sums 49 - 51 -> 20 - 21 ms a step at 64 sequences. */
#include "kernels/kernels_isa.h"

#include <immintrin.h>
#include <math.h>

/* mask_tab + 8 - r yields a load mask whose first r lanes are set */
static const int32_t mask_tab[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};

static inline __m256i tail_mask(size_t r) {
    return _mm256_loadu_si256((const __m256i *)(mask_tab + 8 - r));
}

/* the first min(r, 8) lanes: a whole vector, or the tail of r */
static inline __m256i lanes_mask(size_t r) {
    return tail_mask(r < 8 ? r : 8);
}

static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* v kept in a register. With 16 registers GCC folds a load that several FMAs (or a shift and a
 * mask) use into each of them as a memory operand, loading it again per use: the BF16 kernels
 * then issued 20 loads per 16 FMAs, more than the load ports serve in the FMAs' cycles. Pinned
 * (2-core Zen 3 VM, one thread, in L1, the two alternating in one process, medians): dot4xn_bf16
 * one token 9.7 - 11.1 -> 11.9 - 13.8 GMAC/s, two 20.3 - 23.2 -> 22.6 - 27.1, four 23.9 - 26.2
 * -> 25.4 - 31.2; medium models alternating step by step, BF16 steps 4 - 17% faster (1 - 64
 * sequences), W8A8 2 - 9%. */
static inline __m256 in_reg(__m256 v) {
    __asm__("" : "+x"(v));
    return v;
}

static inline __m256i in_reg_i(__m256i v) {
    __asm__("" : "+x"(v));
    return v;
}

static void bf16_to_f32_avx2(float *dst, const uint16_t *src, size_t n) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(src + i)));
        _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)));
    }
    for (; i < n; i++) {
        uint16_t h;
        memcpy(&h, src + i, sizeof h);
        float f = ds_bf16_decode(h);
        memcpy(dst + i, &f, sizeof f);
    }
}

static void f16_to_f32_avx2(float *dst, const uint16_t *src, size_t n) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
    for (; i < n; i++) {
        uint16_t h;
        memcpy(&h, src + i, sizeof h);
        float f = ds_f16_decode(h);
        memcpy(dst + i, &f, sizeof f);
    }
}

static void fp8_to_f32_avx2(float *dst, const uint8_t *src, size_t n, float scale) {
    size_t i = 0;
    /* e4m3 * 2^-8 times (scale * 2^8) is e4m3 * scale rounded once, as long as scale * 2^8 is
     * itself exact: true for every finite |scale| <= 2^119, i.e. every real weight_scale_inv */
    if (fabsf(scale) <= 0x1p119f) {
        const __m128i sign_m = _mm_set1_epi16(0x80), mag_m = _mm_set1_epi16(0x7f);
        const __m256 vs = _mm256_set1_ps(scale * 256.0f);
        for (; i + 8 <= n; i += 8) {
            __m128i b = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)(src + i)));
            __m128i h = _mm_or_si128(_mm_slli_epi16(_mm_and_si128(b, sign_m), 8),
                                     _mm_slli_epi16(_mm_and_si128(b, mag_m), 7));
            _mm256_storeu_ps(dst + i, _mm256_mul_ps(_mm256_cvtph_ps(h), vs));
        }
    }
    for (; i < n; i++) {
        float f = ds_e4m3_decode(src[i]) * scale;
        memcpy(dst + i, &f, sizeof f);
    }
}

static float dot_f32_avx2(const float *a, const float *b, size_t n) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    __m256 s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps();
    size_t i = 0;
    for (; i + 32 <= n; i += 32) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
        s2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), _mm256_loadu_ps(b + i + 16), s2);
        s3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), _mm256_loadu_ps(b + i + 24), s3);
    }
    for (; i + 8 <= n; i += 8)
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    if (i < n) {
        __m256i m = tail_mask(n - i);
        s1 = _mm256_fmadd_ps(_mm256_maskload_ps(a + i, m), _mm256_maskload_ps(b + i, m), s1);
    }
    return hsum256(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
}

static void dot4_f32_avx2(const float *x, const float *const w[4], size_t n, float out[4]) {
    const float *w0 = w[0], *w1 = w[1], *w2 = w[2], *w3 = w[3];
    /* two accumulators per row: eight independent FMA chains cover the latency */
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(),
           a3 = _mm256_setzero_ps(), b0 = _mm256_setzero_ps(), b1 = _mm256_setzero_ps(),
           b2 = _mm256_setzero_ps(), b3 = _mm256_setzero_ps();
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m256 xa = _mm256_loadu_ps(x + i), xb = _mm256_loadu_ps(x + i + 8);
        a0 = _mm256_fmadd_ps(xa, _mm256_loadu_ps(w0 + i), a0);
        a1 = _mm256_fmadd_ps(xa, _mm256_loadu_ps(w1 + i), a1);
        a2 = _mm256_fmadd_ps(xa, _mm256_loadu_ps(w2 + i), a2);
        a3 = _mm256_fmadd_ps(xa, _mm256_loadu_ps(w3 + i), a3);
        b0 = _mm256_fmadd_ps(xb, _mm256_loadu_ps(w0 + i + 8), b0);
        b1 = _mm256_fmadd_ps(xb, _mm256_loadu_ps(w1 + i + 8), b1);
        b2 = _mm256_fmadd_ps(xb, _mm256_loadu_ps(w2 + i + 8), b2);
        b3 = _mm256_fmadd_ps(xb, _mm256_loadu_ps(w3 + i + 8), b3);
    }
    if (i + 8 <= n) {
        __m256 xa = _mm256_loadu_ps(x + i);
        a0 = _mm256_fmadd_ps(xa, _mm256_loadu_ps(w0 + i), a0);
        a1 = _mm256_fmadd_ps(xa, _mm256_loadu_ps(w1 + i), a1);
        a2 = _mm256_fmadd_ps(xa, _mm256_loadu_ps(w2 + i), a2);
        a3 = _mm256_fmadd_ps(xa, _mm256_loadu_ps(w3 + i), a3);
        i += 8;
    }
    if (i < n) {
        __m256i m = tail_mask(n - i);
        __m256 xb = _mm256_maskload_ps(x + i, m);
        b0 = _mm256_fmadd_ps(xb, _mm256_maskload_ps(w0 + i, m), b0);
        b1 = _mm256_fmadd_ps(xb, _mm256_maskload_ps(w1 + i, m), b1);
        b2 = _mm256_fmadd_ps(xb, _mm256_maskload_ps(w2 + i, m), b2);
        b3 = _mm256_fmadd_ps(xb, _mm256_maskload_ps(w3 + i, m), b3);
    }
    out[0] = hsum256(_mm256_add_ps(a0, b0));
    out[1] = hsum256(_mm256_add_ps(a1, b1));
    out[2] = hsum256(_mm256_add_ps(a2, b2));
    out[3] = hsum256(_mm256_add_ps(a3, b3));
}

/* ---- fused decode + dot4 ----
 * The loops of dot4_f32_avx2 with each weight load replaced by a decode in registers: 8 stored
 * elements -> one __m256. AVX2 has no 8- or 16-bit masked loads, so a tail of fewer than 8
 * elements is copied into a zeroed 8-element buffer first (x is loaded with a float mask, so
 * the padding lanes multiply 0 by 0). */
/* 8 int8 weights from p (cnt < 8: only those, zeros after) times the scales sc, rounded once */
static inline __m256 ld_i8x8(const int8_t *p, size_t cnt, __m256 sc) {
    __m128i b;
    if (cnt >= 8) {
        b = _mm_loadl_epi64((const __m128i *)(const void *)p);
    } else {
        int8_t t[8] = {0};
        memcpy(t, p, cnt);
        b = _mm_loadl_epi64((const __m128i *)(const void *)t);
    }
    return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)), sc);
}

static inline __m256 ld_bf16x8(const uint16_t *p) {
    __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}
static inline __m256 ld_f16x8(const uint16_t *p) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
}
/* FP8 -> e4m3 * 2^-8 exactly (the half-precision detour above): u = b << 7 puts the 7 low bits
 * at bits 7..13 and the sign at bit 14; u + (u & 0x4000) carries the sign to bit 15. */
static inline __m256 ld_fp8x8(const uint8_t *p) {
    __m128i u = _mm_slli_epi16(_mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)p)), 7);
    return _mm256_cvtph_ps(_mm_add_epi16(u, _mm_and_si128(u, _mm_set1_epi16(0x4000))));
}

/* The last r < 8 elements of a row, zero-padded to a full vector. */
static inline __m256 ld_bf16_tail(const uint16_t *p, size_t r) {
    uint16_t buf[8] = {0};
    memcpy(buf, p, r * sizeof *p);
    return ld_bf16x8(buf);
}
static inline __m256 ld_f16_tail(const uint16_t *p, size_t r) {
    uint16_t buf[8] = {0};
    memcpy(buf, p, r * sizeof *p);
    return ld_f16x8(buf);
}
static inline __m256 ld_fp8_tail(const uint8_t *p, size_t r) {
    uint8_t buf[8] = {0};
    memcpy(buf, p, r);
    return ld_fp8x8(buf);
}

#define DOT4_BODY(LD, LDT, x, w0, w1, w2, w3, n)                                                   \
    do {                                                                                           \
        size_t i = 0;                                                                              \
        for (; i + 16 <= (n); i += 16) {                                                           \
            __m256 xa = _mm256_loadu_ps((x) + i), xb = _mm256_loadu_ps((x) + i + 8);               \
            a0 = _mm256_fmadd_ps(xa, LD((w0) + i), a0);                                            \
            a1 = _mm256_fmadd_ps(xa, LD((w1) + i), a1);                                            \
            a2 = _mm256_fmadd_ps(xa, LD((w2) + i), a2);                                            \
            a3 = _mm256_fmadd_ps(xa, LD((w3) + i), a3);                                            \
            b0 = _mm256_fmadd_ps(xb, LD((w0) + i + 8), b0);                                        \
            b1 = _mm256_fmadd_ps(xb, LD((w1) + i + 8), b1);                                        \
            b2 = _mm256_fmadd_ps(xb, LD((w2) + i + 8), b2);                                        \
            b3 = _mm256_fmadd_ps(xb, LD((w3) + i + 8), b3);                                        \
        }                                                                                          \
        if (i + 8 <= (n)) {                                                                        \
            __m256 xa = _mm256_loadu_ps((x) + i);                                                  \
            a0 = _mm256_fmadd_ps(xa, LD((w0) + i), a0);                                            \
            a1 = _mm256_fmadd_ps(xa, LD((w1) + i), a1);                                            \
            a2 = _mm256_fmadd_ps(xa, LD((w2) + i), a2);                                            \
            a3 = _mm256_fmadd_ps(xa, LD((w3) + i), a3);                                            \
            i += 8;                                                                                \
        }                                                                                          \
        if (i < (n)) {                                                                             \
            size_t r_ = (n)-i;                                                                     \
            __m256 xb = _mm256_maskload_ps((x) + i, tail_mask(r_));                                \
            b0 = _mm256_fmadd_ps(xb, LDT((w0) + i, r_), b0);                                       \
            b1 = _mm256_fmadd_ps(xb, LDT((w1) + i, r_), b1);                                       \
            b2 = _mm256_fmadd_ps(xb, LDT((w2) + i, r_), b2);                                       \
            b3 = _mm256_fmadd_ps(xb, LDT((w3) + i, r_), b3);                                       \
        }                                                                                          \
    } while (0)

#define ZERO8()                                                                                    \
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(),           \
           a3 = _mm256_setzero_ps(), b0 = _mm256_setzero_ps(), b1 = _mm256_setzero_ps(),           \
           b2 = _mm256_setzero_ps(), b3 = _mm256_setzero_ps()

static void dot4_bf16_avx2(const float *x, const uint16_t *const w[4], size_t n, float out[4]) {
    ZERO8();
    DOT4_BODY(ld_bf16x8, ld_bf16_tail, x, w[0], w[1], w[2], w[3], n);
    out[0] = hsum256(_mm256_add_ps(a0, b0));
    out[1] = hsum256(_mm256_add_ps(a1, b1));
    out[2] = hsum256(_mm256_add_ps(a2, b2));
    out[3] = hsum256(_mm256_add_ps(a3, b3));
}

static void dot4_f16_avx2(const float *x, const uint16_t *const w[4], size_t n, float out[4]) {
    ZERO8();
    DOT4_BODY(ld_f16x8, ld_f16_tail, x, w[0], w[1], w[2], w[3], n);
    out[0] = hsum256(_mm256_add_ps(a0, b0));
    out[1] = hsum256(_mm256_add_ps(a1, b1));
    out[2] = hsum256(_mm256_add_ps(a2, b2));
    out[3] = hsum256(_mm256_add_ps(a3, b3));
}

static inline float ld_scale(const float *p, size_t i) {
    float v;
    memcpy(&v, (const unsigned char *)p + i * sizeof v, sizeof v);
    return v;
}

/* Per block: fresh accumulators, then one FMA per row adds the block's vector sums times its
 * scale into the row totals; the decoded weights are e4m3 * 2^-8, so the totals are multiplied by
 * 2^8 at the end (exact). */
static void dot4_fp8_avx2(const float *x, const uint8_t *const w[4], const float *const scale[4],
                          size_t n, size_t block, float out[4]) {
    __m256 t0 = _mm256_setzero_ps(), t1 = _mm256_setzero_ps(), t2 = _mm256_setzero_ps(),
           t3 = _mm256_setzero_ps();
    for (size_t c0 = 0, b = 0; c0 < n; c0 += block, b++) {
        size_t len = n - c0 < block ? n - c0 : block;
        ZERO8();
        DOT4_BODY(ld_fp8x8, ld_fp8_tail, x + c0, w[0] + c0, w[1] + c0, w[2] + c0, w[3] + c0, len);
        t0 = _mm256_fmadd_ps(_mm256_add_ps(a0, b0), _mm256_set1_ps(ld_scale(scale[0], b)), t0);
        t1 = _mm256_fmadd_ps(_mm256_add_ps(a1, b1), _mm256_set1_ps(ld_scale(scale[1], b)), t1);
        t2 = _mm256_fmadd_ps(_mm256_add_ps(a2, b2), _mm256_set1_ps(ld_scale(scale[2], b)), t2);
        t3 = _mm256_fmadd_ps(_mm256_add_ps(a3, b3), _mm256_set1_ps(ld_scale(scale[3], b)), t3);
    }
    out[0] = hsum256(t0) * 256.0f;
    out[1] = hsum256(t1) * 256.0f;
    out[2] = hsum256(t2) * 256.0f;
    out[3] = hsum256(t3) * 256.0f;
}

/* a##t += p v, b##t += q v: two chains sharing v (here two tokens' x against a row's weights; in
 * the float GEMMs below a panel's two halves against a token) */
#define FMA2(t, v)                                                                                 \
    do {                                                                                           \
        const __m256 v_ = (v);                                                                     \
        a##t = _mm256_fmadd_ps(p, v_, a##t);                                                       \
        b##t = _mm256_fmadd_ps(q, v_, b##t);                                                       \
    } while (0)

/* Two tokens: each decoded vector feeds two FMAs, one per token; a0..a3 (ZERO8) collect x0 and
 * b0..b3 x1 (eight independent chains, one step of 8 columns per iteration). wv[r] points at row
 * r. Named accumulators: in an array indexed by a loop over the rows GCC kept them in memory,
 * and the two-token kernels ran below the one-token rate. With them and x in registers (in_reg;
 * 2-core Zen 3 VM, one thread, in L1, old and new alternating in one process, medians): F16
 * 9.0 - 9.1 -> 34.8 - 38.7 GMAC/s, FP8 7.1 - 7.3 -> 12.0 - 12.6; 2 threads, 16384 x 4096 cold,
 * three runs: FP8 at 2 tokens 8.2 - 12.1 -> 4.9 - 6.2 ms, at 8 tokens 32 - 46 -> 18 - 21, F16 at
 * 8 tokens 22 - 32 -> 11 - 13. */
#define DOT4X2_BODY(LD, LDT, x0, x1, wv, n)                                                        \
    do {                                                                                           \
        size_t i = 0;                                                                              \
        for (; i + 8 <= (n); i += 8) {                                                             \
            const __m256 p = in_reg(_mm256_loadu_ps((x0) + i)),                                    \
                         q = in_reg(_mm256_loadu_ps((x1) + i));                                    \
            FMA2(0, LD((wv)[0] + i));                                                              \
            FMA2(1, LD((wv)[1] + i));                                                              \
            FMA2(2, LD((wv)[2] + i));                                                              \
            FMA2(3, LD((wv)[3] + i));                                                              \
        }                                                                                          \
        if (i < (n)) {                                                                             \
            size_t r_ = (n)-i;                                                                     \
            __m256i m_ = tail_mask(r_);                                                            \
            const __m256 p = _mm256_maskload_ps((x0) + i, m_),                                     \
                         q = _mm256_maskload_ps((x1) + i, m_);                                     \
            FMA2(0, LDT((wv)[0] + i, r_));                                                         \
            FMA2(1, LDT((wv)[1] + i, r_));                                                         \
            FMA2(2, LDT((wv)[2] + i, r_));                                                         \
            FMA2(3, LDT((wv)[3] + i, r_));                                                         \
        }                                                                                          \
    } while (0)

/* One row of dot4xn_bf16_avx2 for one token: the same lanes and order (the rows walk of
 * kernels.h: one token without prefetches). */
static float bf16_row_avx2(const float *x, const uint16_t *w, size_t n) {
    const __m256i high = _mm256_set1_epi32((int)0xffff0000u);
    __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();
    size_t i = 0;
    for (; i + 32 <= n; i += 32) {
        const __m256i v0 = in_reg_i(_mm256_loadu_si256((const __m256i *)(w + i))),
                      v1 = in_reg_i(_mm256_loadu_si256((const __m256i *)(w + i + 16)));
        lo = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), _mm256_castsi256_ps(_mm256_slli_epi32(v0, 16)),
                             lo);
        lo = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 16),
                             _mm256_castsi256_ps(_mm256_and_si256(v0, high)), lo);
        hi = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 8),
                             _mm256_castsi256_ps(_mm256_slli_epi32(v1, 16)), hi);
        hi = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 24),
                             _mm256_castsi256_ps(_mm256_and_si256(v1, high)), hi);
    }
    for (; i < n; i += 16) {
        const size_t rl = n - i < 8 ? n - i : 8, rh = n - i < 16 ? n - i - rl : 8;
        lo = _mm256_fmadd_ps(_mm256_maskload_ps(x + i, tail_mask(rl)), ld_bf16_tail(w + i, rl), lo);
        hi = _mm256_fmadd_ps(_mm256_maskload_ps(x + i + 8, tail_mask(rh)),
                             ld_bf16_tail(w + i + 8, rh), hi);
    }
    return hsum256(_mm256_add_ps(lo, hi));
}

/* Lanes 0..7 (lo) or 8..15 (hi) of one 32-column step for rows a, b x tokens p, q: the even
 * columns' words v shifted, the odd ones' masked, each decoded word feeding both tokens. */
#define BF16_2X2(acc, va, vb, xp, xq, e, od)                                                       \
    do {                                                                                           \
        const __m256 wa_ = _mm256_castsi256_ps(_mm256_slli_epi32(va, 16)),                         \
                     wb_ = _mm256_castsi256_ps(_mm256_slli_epi32(vb, 16));                         \
        const __m256 xe_ = in_reg(_mm256_loadu_ps((xp) + (e))),                                    \
                     ye_ = in_reg(_mm256_loadu_ps((xq) + (e)));                                    \
        acc##ap = _mm256_fmadd_ps(xe_, wa_, acc##ap);                                              \
        acc##aq = _mm256_fmadd_ps(ye_, wa_, acc##aq);                                              \
        acc##bp = _mm256_fmadd_ps(xe_, wb_, acc##bp);                                              \
        acc##bq = _mm256_fmadd_ps(ye_, wb_, acc##bq);                                              \
        const __m256 oa_ = _mm256_castsi256_ps(_mm256_and_si256(va, high)),                        \
                     ob_ = _mm256_castsi256_ps(_mm256_and_si256(vb, high));                        \
        const __m256 xo_ = in_reg(_mm256_loadu_ps((xp) + (od))),                                   \
                     yo_ = in_reg(_mm256_loadu_ps((xq) + (od)));                                   \
        acc##ap = _mm256_fmadd_ps(xo_, oa_, acc##ap);                                              \
        acc##aq = _mm256_fmadd_ps(yo_, oa_, acc##aq);                                              \
        acc##bp = _mm256_fmadd_ps(xo_, ob_, acc##bp);                                              \
        acc##bq = _mm256_fmadd_ps(yo_, ob_, acc##bq);                                              \
    } while (0)

/* Half h of the 16 lanes (0: lanes 0..7, 1: 8..15) of rows wa, wb x four tokens: acc[t] row a's,
 * acc[4 + t] row b's. Eight chains, each decoded word feeding four FMAs. */
static inline __attribute__((always_inline)) void
bf16_half_2x4(const float *const x[4], const uint16_t *wa, const uint16_t *wb, size_t n,
              size_t step, size_t h, const char **pf, size_t *n_pf, size_t per, __m256 acc[8]) {
    const __m256i high = _mm256_set1_epi32((int)0xffff0000u);
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    const size_t e = 8 * h; /* the half's x within a step; its words are 16 h further */
#define HALF_TOKEN(t, xv, ua, ub)                                                                  \
    do {                                                                                           \
        const __m256 v_ = in_reg(xv);                                                              \
        a##t = _mm256_fmadd_ps(v_, ua, a##t);                                                      \
        b##t = _mm256_fmadd_ps(v_, ub, b##t);                                                      \
    } while (0)
    size_t i = 0, o = 0;
    for (; i + 32 <= n; i += 32, o += step) {
        for (size_t k = 0; k < per && *n_pf; k++, (*n_pf)--, *pf += 64) __builtin_prefetch(*pf);
        const __m256i va = in_reg_i(_mm256_loadu_si256((const __m256i *)(wa + o + 2 * e))),
                      vb = in_reg_i(_mm256_loadu_si256((const __m256i *)(wb + o + 2 * e)));
        const __m256 ea = _mm256_castsi256_ps(_mm256_slli_epi32(va, 16)),
                     eb = _mm256_castsi256_ps(_mm256_slli_epi32(vb, 16));
        HALF_TOKEN(0, _mm256_loadu_ps(x[0] + i + e), ea, eb);
        HALF_TOKEN(1, _mm256_loadu_ps(x[1] + i + e), ea, eb);
        HALF_TOKEN(2, _mm256_loadu_ps(x[2] + i + e), ea, eb);
        HALF_TOKEN(3, _mm256_loadu_ps(x[3] + i + e), ea, eb);
        const __m256 oa = _mm256_castsi256_ps(_mm256_and_si256(va, high)),
                     ob = _mm256_castsi256_ps(_mm256_and_si256(vb, high));
        HALF_TOKEN(0, _mm256_loadu_ps(x[0] + i + 16 + e), oa, ob);
        HALF_TOKEN(1, _mm256_loadu_ps(x[1] + i + 16 + e), oa, ob);
        HALF_TOKEN(2, _mm256_loadu_ps(x[2] + i + 16 + e), oa, ob);
        HALF_TOKEN(3, _mm256_loadu_ps(x[3] + i + 16 + e), oa, ob);
    }
    for (const size_t i0 = i; i < n; i += 16) { /* the last piece, at offset o */
        const size_t rl = n - i < 8 ? n - i : 8, rh = n - i < 16 ? n - i - rl : 8;
        const size_t cnt = h ? rh : rl;
        const __m256i m = tail_mask(cnt);
        const __m256 ua = ld_bf16_tail(wa + o + (i - i0) + e, cnt),
                     ub = ld_bf16_tail(wb + o + (i - i0) + e, cnt);
        HALF_TOKEN(0, _mm256_maskload_ps(x[0] + i + e, m), ua, ub);
        HALF_TOKEN(1, _mm256_maskload_ps(x[1] + i + e, m), ua, ub);
        HALF_TOKEN(2, _mm256_maskload_ps(x[2] + i + e, m), ua, ub);
        HALF_TOKEN(3, _mm256_maskload_ps(x[3] + i + e, m), ua, ub);
    }
#undef HALF_TOKEN
    acc[0] = a0, acc[1] = a1, acc[2] = a2, acc[3] = a3;
    acc[4] = b0, acc[5] = b1, acc[6] = b2, acc[7] = b3;
}

/* The 16 lanes of kernels.h's order as two registers per row and token, lo (lanes 0..7) and hi
 * (8..15): their sum is the first step of that order, hsum256 the rest. Eight chains in registers
 * a pass: one token against the four rows; two tokens against a row pair, each decoded word
 * feeding two FMAs; four tokens against a row pair, lo then hi, each word feeding four. With one
 * token a pass at every nx, the shifts and masks of the words took as many issue slots as the
 * FMAs. */
static void dot4xn_bf16_avx2(const float *const x[4], int nx, const uint16_t *const w[4], size_t n,
                             size_t step, const char *pf, size_t n_pf, float out[16]) {
    if (nx == 1 && !pf && step == 32) { /* one row after another */
        for (int r = 0; r < 4; r++) out[r] = bf16_row_avx2(x[0], w[r], n);
        return;
    }
    const __m256i high = _mm256_set1_epi32((int)0xffff0000u);
    const size_t steps = n / 32, passes = nx == 1 ? 1 : (size_t)nx;
    const size_t per = steps ? (n_pf + steps * passes - 1) / (steps * passes) : 0;
    if (nx == 1) {
        /* named chains: in arrays indexed by a loop over the rows they lived in memory, a store
         * and a load between FMAs (in L1, one thread, alternating in one process: 12.0 - 12.5 ->
         * 18.1 - 20.0 GMAC/s; medium models at 1 sequence, alternating step by step: 1 - 7%
         * faster) */
        __m256 l0 = _mm256_setzero_ps(), l1 = l0, l2 = l0, l3 = l0, h0 = l0, h1 = l0, h2 = l0,
               h3 = l0;
#define ROW_STEP(l, h, wr)                                                                         \
    do {                                                                                           \
        const __m256i v0 = in_reg_i(_mm256_loadu_si256((const __m256i *)((wr) + o))),              \
                      v1 = in_reg_i(_mm256_loadu_si256((const __m256i *)((wr) + o + 16)));         \
        l = _mm256_fmadd_ps(xel, _mm256_castsi256_ps(_mm256_slli_epi32(v0, 16)), l);               \
        l = _mm256_fmadd_ps(xol, _mm256_castsi256_ps(_mm256_and_si256(v0, high)), l);              \
        h = _mm256_fmadd_ps(xeh, _mm256_castsi256_ps(_mm256_slli_epi32(v1, 16)), h);               \
        h = _mm256_fmadd_ps(xoh, _mm256_castsi256_ps(_mm256_and_si256(v1, high)), h);              \
    } while (0)
#define ROW_TAIL(l, h, wr)                                                                         \
    do {                                                                                           \
        const uint16_t *wt = (wr) + o + (i - i0);                                                  \
        l = _mm256_fmadd_ps(xl, ld_bf16_tail(wt, rl), l);                                          \
        h = _mm256_fmadd_ps(xh, ld_bf16_tail(wt + 8, rh), h);                                      \
    } while (0)
        size_t i = 0, o = 0; /* o: the piece's offset from w[r] */
        for (; i + 32 <= n; i += 32, o += step) {
            for (size_t q = 0; q < per && n_pf; q++, n_pf--, pf += 64) __builtin_prefetch(pf);
            const __m256 xel = in_reg(_mm256_loadu_ps(x[0] + i)),
                         xeh = in_reg(_mm256_loadu_ps(x[0] + i + 8)),
                         xol = in_reg(_mm256_loadu_ps(x[0] + i + 16)),
                         xoh = in_reg(_mm256_loadu_ps(x[0] + i + 24));
            ROW_STEP(l0, h0, w[0]);
            ROW_STEP(l1, h1, w[1]);
            ROW_STEP(l2, h2, w[2]);
            ROW_STEP(l3, h3, w[3]);
        }
        for (; n_pf; n_pf--, pf += 64) __builtin_prefetch(pf);
        for (const size_t i0 = i; i < n; i += 16) { /* the last piece, at offset o */
            const size_t rl = n - i < 8 ? n - i : 8, rh = n - i < 16 ? n - i - rl : 8;
            const __m256 xl = _mm256_maskload_ps(x[0] + i, tail_mask(rl)),
                         xh = _mm256_maskload_ps(x[0] + i + 8, tail_mask(rh));
            ROW_TAIL(l0, h0, w[0]);
            ROW_TAIL(l1, h1, w[1]);
            ROW_TAIL(l2, h2, w[2]);
            ROW_TAIL(l3, h3, w[3]);
        }
#undef ROW_STEP
#undef ROW_TAIL
        out[0] = hsum256(_mm256_add_ps(l0, h0)), out[1] = hsum256(_mm256_add_ps(l1, h1));
        out[2] = hsum256(_mm256_add_ps(l2, h2)), out[3] = hsum256(_mm256_add_ps(l3, h3));
        return;
    }
    if (nx == 4) { /* a row pair's halves one after another, its words in L1 for the second */
        for (int r = 0; r < 4; r += 2) {
            __m256 lo[8], hi[8];
            bf16_half_2x4(x, w[r], w[r + 1], n, step, 0, &pf, &n_pf, per, lo);
            bf16_half_2x4(x, w[r], w[r + 1], n, step, 1, &pf, &n_pf, per, hi);
            for (int t = 0; t < 4; t++) {
                out[4 * t + r] = hsum256(_mm256_add_ps(lo[t], hi[t]));
                out[4 * t + r + 1] = hsum256(_mm256_add_ps(lo[4 + t], hi[4 + t]));
            }
        }
        for (; n_pf; n_pf--, pf += 64) __builtin_prefetch(pf);
        return;
    }
    for (int r = 0; r < 4; r += 2) { /* two tokens */
        const float *xp = x[0], *xq = x[1];
        const uint16_t *wa = w[r], *wb = w[r + 1];
        __m256 loap = _mm256_setzero_ps(), loaq = loap, lobp = loap, lobq = loap;
        __m256 hiap = loap, hiaq = loap, hibp = loap, hibq = loap;
        size_t i = 0, o = 0;
        for (; i + 32 <= n; i += 32, o += step) {
            for (size_t k = 0; k < per && n_pf; k++, n_pf--, pf += 64) __builtin_prefetch(pf);
            const __m256i a0 = in_reg_i(_mm256_loadu_si256((const __m256i *)(wa + o))),
                          b0 = in_reg_i(_mm256_loadu_si256((const __m256i *)(wb + o)));
            BF16_2X2(lo, a0, b0, xp + i, xq + i, 0, 16);
            const __m256i a1 = in_reg_i(_mm256_loadu_si256((const __m256i *)(wa + o + 16))),
                          b1 = in_reg_i(_mm256_loadu_si256((const __m256i *)(wb + o + 16)));
            BF16_2X2(hi, a1, b1, xp + i, xq + i, 8, 24);
        }
        for (const size_t i0 = i; i < n; i += 16) { /* the last piece, at offset o */
            const size_t rl = n - i < 8 ? n - i : 8, rh = n - i < 16 ? n - i - rl : 8;
            const __m256i ml = tail_mask(rl), mh = tail_mask(rh);
            const __m256 pl = _mm256_maskload_ps(xp + i, ml),
                         ph = _mm256_maskload_ps(xp + i + 8, mh);
            const __m256 ql = _mm256_maskload_ps(xq + i, ml),
                         qh = _mm256_maskload_ps(xq + i + 8, mh);
            const uint16_t *ta = wa + o + (i - i0), *tb = wb + o + (i - i0);
            const __m256 al = ld_bf16_tail(ta, rl), ah = ld_bf16_tail(ta + 8, rh);
            const __m256 bl = ld_bf16_tail(tb, rl), bh = ld_bf16_tail(tb + 8, rh);
            loap = _mm256_fmadd_ps(pl, al, loap), hiap = _mm256_fmadd_ps(ph, ah, hiap);
            loaq = _mm256_fmadd_ps(ql, al, loaq), hiaq = _mm256_fmadd_ps(qh, ah, hiaq);
            lobp = _mm256_fmadd_ps(pl, bl, lobp), hibp = _mm256_fmadd_ps(ph, bh, hibp);
            lobq = _mm256_fmadd_ps(ql, bl, lobq), hibq = _mm256_fmadd_ps(qh, bh, hibq);
        }
        out[r] = hsum256(_mm256_add_ps(loap, hiap));
        out[r + 1] = hsum256(_mm256_add_ps(lobp, hibp));
        out[4 + r] = hsum256(_mm256_add_ps(loaq, hiaq));
        out[4 + r + 1] = hsum256(_mm256_add_ps(lobq, hibq));
    }
    for (; n_pf; n_pf--, pf += 64) __builtin_prefetch(pf);
}
#undef BF16_2X2

static void dot4x2_f16_avx2(const float *x0, const float *x1, const uint16_t *const w[4], size_t n,
                            float out[8]) {
    ZERO8();
    DOT4X2_BODY(ld_f16x8, ld_f16_tail, x0, x1, w, n);
    out[0] = hsum256(a0), out[1] = hsum256(a1), out[2] = hsum256(a2), out[3] = hsum256(a3);
    out[4] = hsum256(b0), out[5] = hsum256(b1), out[6] = hsum256(b2), out[7] = hsum256(b3);
}

static void dot4x2_fp8_avx2(const float *x0, const float *x1, const uint8_t *const w[4],
                            const float *const scale[4], size_t n, size_t block, float out[8]) {
    __m256 t0 = _mm256_setzero_ps(), t1 = t0, t2 = t0, t3 = t0, t4 = t0, t5 = t0, t6 = t0, t7 = t0;
    for (size_t k0 = 0, b = 0; k0 < n; k0 += block, b++) {
        size_t len = n - k0 < block ? n - k0 : block;
        const uint8_t *const wb[4] = {w[0] + k0, w[1] + k0, w[2] + k0, w[3] + k0};
        ZERO8();
        DOT4X2_BODY(ld_fp8x8, ld_fp8_tail, x0 + k0, x1 + k0, wb, len);
        const __m256 s0 = _mm256_set1_ps(ld_scale(scale[0], b)),
                     s1 = _mm256_set1_ps(ld_scale(scale[1], b)),
                     s2 = _mm256_set1_ps(ld_scale(scale[2], b)),
                     s3 = _mm256_set1_ps(ld_scale(scale[3], b));
        t0 = _mm256_fmadd_ps(a0, s0, t0), t4 = _mm256_fmadd_ps(b0, s0, t4);
        t1 = _mm256_fmadd_ps(a1, s1, t1), t5 = _mm256_fmadd_ps(b1, s1, t5);
        t2 = _mm256_fmadd_ps(a2, s2, t2), t6 = _mm256_fmadd_ps(b2, s2, t6);
        t3 = _mm256_fmadd_ps(a3, s3, t3), t7 = _mm256_fmadd_ps(b3, s3, t7);
    }
    out[0] = hsum256(t0) * 256.0f, out[1] = hsum256(t1) * 256.0f;
    out[2] = hsum256(t2) * 256.0f, out[3] = hsum256(t3) * 256.0f;
    out[4] = hsum256(t4) * 256.0f, out[5] = hsum256(t5) * 256.0f;
    out[6] = hsum256(t6) * 256.0f, out[7] = hsum256(t7) * 256.0f;
}

static void axpy_f32_avx2(float *y, float a, const float *x, size_t n) {
    const __m256 va = _mm256_set1_ps(a);
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i,
                         _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    if (i < n) {
        __m256i m = tail_mask(n - i);
        __m256 r = _mm256_fmadd_ps(va, _mm256_maskload_ps(x + i, m), _mm256_maskload_ps(y + i, m));
        _mm256_maskstore_ps(y + i, m, r);
    }
}

/* The tails one element at a time: fmaf, as the vector steps fuse. */
static void axpy_i8_avx2(float *y, float a, const int8_t *q, float scale, size_t n) {
    const __m256 va = _mm256_set1_ps(a), vs = _mm256_set1_ps(scale);
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, ld_i8x8(q + i, 8, vs), _mm256_loadu_ps(y + i)));
    }
    for (; i < n; i++) y[i] = fmaf(a, (float)q[i] * scale, y[i]);
}

static void axpy_bf16_avx2(float *y, float a, const uint16_t *w, size_t n) {
    const __m256 va = _mm256_set1_ps(a);
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256i v =
            _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(const void *)(w + i)));
        const __m256 f = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, f, _mm256_loadu_ps(y + i)));
    }
    for (; i < n; i++) {
        uint16_t h; /* rows in an mmap may sit at odd addresses */
        memcpy(&h, w + i, sizeof h);
        y[i] = fmaf(a, ds_bf16_decode(h), y[i]);
    }
}

/* ---- integer dots ----
 * vpmaddubsw multiplies unsigned by signed bytes and adds pairs into int16, saturating. For
 * int8 the unsigned side is |w| (|-128| = 128 as a byte) and the sign moves onto x
 * (vpsignb: |x| <= 127, so -x never overflows): a pair is at most 2 * 128 * 127 = 32512, below
 * the int16 limit, so nothing saturates. For int4 the unsigned side is w + 8 in [0, 15]
 * (nibble ^ 8) and 8 * sum x is taken back out at the end. vpmaddwd with ones widens to int32.
 * Tails go through zero-padded copies (zero x adds nothing). Exact: equals the scalar sums. */

/* [sum a0, sum a1, sum a2, sum a3] */
static inline __m128i reduce4_epi32_avx2(__m256i a0, __m256i a1, __m256i a2, __m256i a3) {
    __m256i s = _mm256_hadd_epi32(_mm256_hadd_epi32(a0, a1), _mm256_hadd_epi32(a2, a3));
    return _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
}

/* acc + the pair sums of x times w, aw = |w| */
static inline __m256i i8_acc(__m256i acc, __m256i aw, __m256i xv, __m256i wv, __m256i ones16) {
    __m256i p = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(xv, wv));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(p, ones16));
}

/* Row r's 32 weights at p against token 0 (a##r) and, with two tokens, token 1 (b##r): |w|
 * once for both. */
#define I8_ROW(r, p)                                                                               \
    do {                                                                                           \
        const __m256i wv = _mm256_loadu_si256((const __m256i *)(const void *)(p));                 \
        const __m256i aw = _mm256_abs_epi8(wv);                                                    \
        a##r = i8_acc(a##r, aw, xa, wv, ones16);                                                   \
        if (nt == 2) b##r = i8_acc(b##r, aw, xb, wv, ones16);                                      \
    } while (0)

/* nt (1 or 2, a constant where inlined) tokens x0, x1 in one pass; token t's sums of block b go
 * to out[4 t + stride * b + r]. The prefetches are spread over the steps: issued at once before
 * the call, they stalled on the full miss queue while the arithmetic waited (2-core Zen 3 VM, one
 * thread, 16384 x 4096: 11 - 13 GB/s, spread 18 - 20, of the 19 - 20 one core reads; medium W8A8
 * at one sequence, MoE 2.7 - 3.3 -> 2.3 ms a step).
 * The steps walk 64-column pieces with the offset carried: ds_i8_at per 32 columns (a shift, a
 * mask and a multiply) took issue slots from the vector work (in L1, one thread, alternating in
 * one process, medians: 49.5 - 50.5 -> 55.9 - 57.0 GMAC/s, and 27.6 - 28.5 -> 38.2 - 40.8 while the
 * VM's other tenants were busy; medium W8A8 alternating step by step, three runs: even at 1
 * sequence, 2 - 5% faster at 8). */
static inline __attribute__((always_inline)) void
dot4_i8_pass(const int nt, const int8_t *x0, const int8_t *x1, const int8_t *const w[4], size_t n,
             size_t block, size_t step, const char *pf, size_t n_pf, int32_t *out, size_t stride) {
    const __m256i ones16 = _mm256_set1_epi16(1);
    const size_t steps = n / 32, per = steps ? (n_pf + steps - 1) / steps : 0;
    for (size_t c0 = 0, bk = 0; c0 < n; c0 += block, bk++) {
        size_t end = c0 + (n - c0 < block ? n - c0 : block);
        __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
        __m256i b0 = a0, b1 = a0, b2 = a0, b3 = a0;
        size_t i = c0;
#define STEP32(xi, o)                                                                              \
    do {                                                                                           \
        for (size_t q = 0; q < per && n_pf; q++, n_pf--, pf += 64) __builtin_prefetch(pf);         \
        const __m256i xa = _mm256_loadu_si256((const __m256i *)(const void *)(x0 + (xi)));         \
        const __m256i xb =                                                                         \
            nt == 2 ? _mm256_loadu_si256((const __m256i *)(const void *)(x1 + (xi))) : xa;         \
        I8_ROW(0, w[0] + (o));                                                                     \
        I8_ROW(1, w[1] + (o));                                                                     \
        I8_ROW(2, w[2] + (o));                                                                     \
        I8_ROW(3, w[3] + (o));                                                                     \
    } while (0)
        for (size_t o = ds_i8_at(i, step); i + 64 <= end; i += 64, o += step) {
            STEP32(i, o);
            STEP32(i + 32, o + 32);
        }
        if (i + 32 <= end) {
            STEP32(i, ds_i8_at(i, step));
            i += 32;
        }
#undef STEP32
        if (i < end) {
            _Alignas(32) int8_t bx[2][32] = {{0}}, bw[4][32] = {{0}};
            memcpy(bx[0], x0 + i, end - i);
            if (nt == 2) memcpy(bx[1], x1 + i, end - i);
            for (int r = 0; r < 4; r++) memcpy(bw[r], w[r] + ds_i8_at(i, step), end - i);
            const __m256i xa = _mm256_load_si256((const __m256i *)(const void *)bx[0]);
            const __m256i xb = _mm256_load_si256((const __m256i *)(const void *)bx[1]);
            I8_ROW(0, bw[0]);
            I8_ROW(1, bw[1]);
            I8_ROW(2, bw[2]);
            I8_ROW(3, bw[3]);
        }
        _mm_storeu_si128((__m128i *)(void *)(out + stride * bk),
                         reduce4_epi32_avx2(a0, a1, a2, a3));
        if (nt == 2)
            _mm_storeu_si128((__m128i *)(void *)(out + 4 + stride * bk),
                             reduce4_epi32_avx2(b0, b1, b2, b3));
    }
    for (; n_pf; n_pf--, pf += 64) __builtin_prefetch(pf);
}
#undef I8_ROW

/* Tokens two at a time, one pass each pair: every weight vector loaded and its |w| taken once for
 * both. A pass per token re-read the weights from L1 and redid |w| for each, and the arithmetic
 * of the later passes did not overlap the weights' reads (2-core Zen 3 VM, 2 threads, the medium
 * model's experts streamed as the MoE runs them, alternating in one process, medians, GB/s: 2
 * tokens an expert 21.4 -> 24.6, 3 tokens 16.3 -> 18.2, 4 tokens 12.4 -> 16.3). Each pass
 * issues its share of the prefetches; when the first carried them all, memory idled through the
 * others' (65536 x 1024 cold, GMAC/s: 2 tokens 49 - 52 -> 43 - 62, 4 tokens 55 - 65 -> 61 - 70,
 * 8 tokens 65 - 80 -> 73 - 77). */
static void dot4_i8_avx2(const int8_t *const x[4], const int32_t *const xoff[4], int nx,
                         const int8_t *const w[4], size_t n, size_t block, size_t step,
                         const char *pf, size_t n_pf, int32_t *out) {
    (void)xoff; /* signed products need no offset */
    const size_t stride = 4 * (size_t)nx;
    for (size_t t = 0, done = 0, k; t < (size_t)nx; t += k) {
        k = (size_t)nx - t >= 2 ? 2 : 1;
        const size_t share = n_pf * (t + k) / (size_t)nx - done;
        const char *p = share ? pf + 64 * done : NULL;
        if (k == 2)
            dot4_i8_pass(2, x[t], x[t + 1], w, n, block, step, p, share, out + 4 * t, stride);
        else
            dot4_i8_pass(1, x[t], NULL, w, n, block, step, p, share, out + 4 * t, stride);
        done += share;
    }
}

/* 64 columns of x split into even and odd ones in the order of the 32 packed bytes holding
 * their weights (see kernels_avx512.c: sign-extend the bytes of each word, pack, permute). */
static inline __m256i i4_row(__m256i acc, __m256i packed, __m256i xe, __m256i xo) {
    const __m256i flip = _mm256_set1_epi8((char)0x88), lo4 = _mm256_set1_epi8(0x0f);
    __m256i p = _mm256_xor_si256(packed, flip);
    /* each pair <= 2 * 15 * 127, the two sums <= 7620: int16 holds it */
    __m256i s =
        _mm256_add_epi16(_mm256_maddubs_epi16(_mm256_and_si256(p, lo4), xe),
                         _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(p, 4), lo4), xo));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(s, _mm256_set1_epi16(1)));
}

static inline __m256i ld256(const void *p) {
    return _mm256_loadu_si256((const __m256i *)p);
}

/* x arrives split (ds_i4_split): a 128-column step is 64 even then 64 odd values, and its 64
 * packed bytes are two halves of 32, each pairing with 32 of the even and 32 of the odd values.
 * A partial step (ceil(L/2) even, floor(L/2) odd) goes through zero-padded copies. */
static void dot4_i4_avx2(const int8_t *xs, const int32_t *xoff, const uint8_t *const w[4], size_t n,
                         size_t block, int32_t *out) {
    for (size_t c0 = 0, b = 0; c0 < n; c0 += block, b++) {
        size_t end = n - c0 < block ? n : c0 + block;
        __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
        for (size_t i = c0; i < end; i += 128) {
            _Alignas(32) int8_t bx[128];
            _Alignas(32) uint8_t bw[4][64];
            const int8_t *xe, *xo;
            const uint8_t *wr[4];
            ds_i4_step(xs, w, i, end, bx, bw, &xe, &xo, wr);
            for (size_t h = 0; h < 64; h += 32) {
                __m256i e = ld256(xe + h), od = ld256(xo + h);
                a0 = i4_row(a0, ld256(wr[0] + h), e, od);
                a1 = i4_row(a1, ld256(wr[1] + h), e, od);
                a2 = i4_row(a2, ld256(wr[2] + h), e, od);
                a3 = i4_row(a3, ld256(wr[3] + h), e, od);
            }
        }
        __m128i sum = _mm_sub_epi32(reduce4_epi32_avx2(a0, a1, a2, a3), _mm_set1_epi32(xoff[b]));
        _mm_storeu_si128((__m128i *)(void *)(out + 4 * b), sum);
    }
}

static void i8_to_f32_avx2(float *dst, const int8_t *src, size_t n, float scale) {
    const __m256 vs = _mm256_set1_ps(scale);
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        _mm256_storeu_ps(dst + i, ld_i8x8(src + i, 8, vs));
    }
    for (; i < n; i++) dst[i] = (float)src[i] * scale;
}

/* 8 packed bytes -> 16 columns: dwords, nibbles interleaved by unpack + 128-bit permute */
static void i4_to_f32_avx2(float *dst, const uint8_t *src, size_t n, float scale) {
    const __m256 vs = _mm256_set1_ps(scale);
    const __m256i lo4 = _mm256_set1_epi32(15), eight = _mm256_set1_epi32(8);
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m256i b =
            _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(const void *)(src + i / 2)));
        __m256i lo = _mm256_and_si256(b, lo4), hi = _mm256_srli_epi32(b, 4);
        __m256i u0 = _mm256_unpacklo_epi32(lo, hi), u1 = _mm256_unpackhi_epi32(lo, hi);
        __m256i c0 = _mm256_permute2x128_si256(u0, u1, 0x20);
        __m256i c1 = _mm256_permute2x128_si256(u0, u1, 0x31);
        c0 = _mm256_sub_epi32(_mm256_xor_si256(c0, eight), eight);
        c1 = _mm256_sub_epi32(_mm256_xor_si256(c1, eight), eight);
        _mm256_storeu_ps(dst + i, _mm256_mul_ps(_mm256_cvtepi32_ps(c0), vs));
        _mm256_storeu_ps(dst + i + 8, _mm256_mul_ps(_mm256_cvtepi32_ps(c1), vs));
    }
    for (; i < n; i++) dst[i] = (float)ds_i4_get(src, i) * scale;
}

/* ---- row ops: the AVX-512 table's algorithms in 8 lanes, so the two give the same floats ---- */

/* max over the 8 lanes of a vector holding no NaN */
static inline float hmax256(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static float absmax_f32_avx2(const float *x, size_t n) {
    const __m256 abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 m = _mm256_setzero_ps();
    size_t i = 0;
    for (; i + 8 <= n; i += 8) /* max_ps(a, m) returns m when a is NaN: NaNs are skipped */
        m = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(x + i), abs), m);
    if (i < n) /* the lanes past n load 0, which leaves a maximum >= 0 unchanged */
        m = _mm256_max_ps(_mm256_and_ps(_mm256_maskload_ps(x + i, tail_mask(n - i)), abs), m);
    return hmax256(m);
}

/* The maximum in 8 lanes with a NaN mask beside it, then the first position holding the maximum,
 * or the first NaN when there is one (argmax_f32_avx512's two passes). */
static int64_t argmax_f32_avx2(const float *x, size_t n) {
    const __m256 ninf = _mm256_set1_ps(-INFINITY);
    __m256 m = ninf, nan = _mm256_setzero_ps();
    size_t i = 0;
    for (; i + 8 <= n; i += 8) { /* max_ps(a, m) returns m when a is NaN */
        const __m256 v = _mm256_loadu_ps(x + i);
        nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        m = _mm256_max_ps(v, m);
    }
    if (i < n) { /* the lanes past n are -inf, which no maximum needs */
        const __m256i t = tail_mask(n - i);
        const __m256 v =
            _mm256_blendv_ps(ninf, _mm256_maskload_ps(x + i, t), _mm256_castsi256_ps(t));
        nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        m = _mm256_max_ps(v, m);
    }
    const float best = hmax256(m);
    const int any_nan = _mm256_movemask_ps(nan) != 0;
    if (best == -INFINITY && !any_nan) return -1;
    const __m256 b = _mm256_set1_ps(best);
    for (i = 0; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_loadu_ps(x + i);
        const int hit = _mm256_movemask_ps(any_nan ? _mm256_cmp_ps(v, v, _CMP_UNORD_Q)
                                                   : _mm256_cmp_ps(v, b, _CMP_EQ_OQ));
        if (hit) return (int64_t)(i + (size_t)__builtin_ctz((unsigned)hit));
    }
    for (; i < n; i++) {
        float v;
        memcpy(&v, x + i, sizeof v);
        if (any_nan ? isnan(v) : v == best) return (int64_t)i;
    }
    return -1; /* not reached: best or a NaN is one of the values */
}

/* exp_ps of the AVX-512 table: x = k ln2 + r, e^r by the degree-7 polynomial, then times 2^k.
 * AVX2 has no scalef: 2^k is applied as 2^k1 then 2^k2 (k1 = k >> 1, k2 = k - k1, both normal
 * powers for the clamped |k| <= 151). p in [0.7, 1.5] times 2^k1 is exact, so the one rounding
 * is the second product's, as scalef rounds once: the same floats, infinities and subnormals
 * included. */
static inline __m256 exp_ps(__m256 x) {
    const __m256 k = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(k, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i ki = _mm256_cvtps_epi32(k), k1 = _mm256_srai_epi32(ki, 1);
    const __m256i bias = _mm256_set1_epi32(127);
    const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(k1, bias), 23));
    const __m256 s2 = _mm256_castsi256_ps(
        _mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(ki, k1), bias), 23));
    return _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
}

/* swiglu_f32_avx512's steps (-a clamped to [-100, 100]; NaN passes through a) */
static void swiglu_f32_avx2(float *a, const float *b, size_t n) {
    const __m256 lo = _mm256_set1_ps(-100.0f), hi = _mm256_set1_ps(100.0f);
    const __m256 one = _mm256_set1_ps(1.0f);
    for (size_t i = 0; i < n; i += 8) {
        const __m256i m = lanes_mask(n - i);
        const __m256 v = _mm256_maskload_ps(a + i, m);
        const __m256 x =
            _mm256_min_ps(_mm256_max_ps(_mm256_sub_ps(_mm256_setzero_ps(), v), lo), hi);
        const __m256 y = _mm256_div_ps(v, _mm256_add_ps(one, exp_ps(x)));
        _mm256_maskstore_ps(a + i, m, _mm256_mul_ps(y, _mm256_maskload_ps(b + i, m)));
    }
}

/* exp_f32's e^v: clamped to [-104, 100] for the polynomial, a NaN kept */
static inline __m256 exp_clamped_ps(__m256 v) {
    const __m256 c =
        _mm256_min_ps(_mm256_max_ps(v, _mm256_set1_ps(-104.0f)), _mm256_set1_ps(100.0f));
    return exp_ps(_mm256_blendv_ps(c, v, _mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
}

static void exp_f32_avx2(float *dst, const float *x, size_t n) {
    for (size_t i = 0; i < n; i += 8) {
        const __m256i m = lanes_mask(n - i);
        _mm256_maskstore_ps(dst + i, m, exp_clamped_ps(_mm256_maskload_ps(x + i, m)));
    }
}

/* v where v > m, else m: the first-wins maximum's step */
static inline __m256 gt_max(__m256 m, __m256 v) {
    return _mm256_blendv_ps(m, v, _mm256_cmp_ps(v, m, _CMP_GT_OQ));
}

/* softmax16_f32_avx512 with each row of 16 heads in two vectors (heads 0-7, 8-15): four chains
 * of the first-wins compare merged in order, the sums in four vectors of double chains. */
static void softmax16_f32_avx2(float *x, size_t n) {
    __m256 l0 = _mm256_loadu_ps(x), h0 = _mm256_loadu_ps(x + 8);
    __m256 l1 = l0, h1 = h0, l2 = l0, h2 = h0, l3 = l0, h3 = h0;
    size_t i = 1;
    for (; i + 4 <= n; i += 4) {
        const float *p = x + 16 * i;
        l0 = gt_max(l0, _mm256_loadu_ps(p)), h0 = gt_max(h0, _mm256_loadu_ps(p + 8));
        l1 = gt_max(l1, _mm256_loadu_ps(p + 16)), h1 = gt_max(h1, _mm256_loadu_ps(p + 24));
        l2 = gt_max(l2, _mm256_loadu_ps(p + 32)), h2 = gt_max(h2, _mm256_loadu_ps(p + 40));
        l3 = gt_max(l3, _mm256_loadu_ps(p + 48)), h3 = gt_max(h3, _mm256_loadu_ps(p + 56));
    }
    for (; i < n; i++) {
        l0 = gt_max(l0, _mm256_loadu_ps(x + 16 * i));
        h0 = gt_max(h0, _mm256_loadu_ps(x + 16 * i + 8));
    }
    l0 = gt_max(gt_max(gt_max(l0, l1), l2), l3);
    h0 = gt_max(gt_max(gt_max(h0, h1), h2), h3);
    __m256d s0 = _mm256_setzero_pd(), s1 = s0, s2 = s0, s3 = s0;
    for (i = 0; i < n; i++) {
        const __m256 el = exp_clamped_ps(_mm256_sub_ps(_mm256_loadu_ps(x + 16 * i), l0));
        const __m256 eh = exp_clamped_ps(_mm256_sub_ps(_mm256_loadu_ps(x + 16 * i + 8), h0));
        _mm256_storeu_ps(x + 16 * i, el);
        _mm256_storeu_ps(x + 16 * i + 8, eh);
        s0 = _mm256_add_pd(s0, _mm256_cvtps_pd(_mm256_castps256_ps128(el)));
        s1 = _mm256_add_pd(s1, _mm256_cvtps_pd(_mm256_extractf128_ps(el, 1)));
        s2 = _mm256_add_pd(s2, _mm256_cvtps_pd(_mm256_castps256_ps128(eh)));
        s3 = _mm256_add_pd(s3, _mm256_cvtps_pd(_mm256_extractf128_ps(eh, 1)));
    }
    const __m256d one = _mm256_set1_pd(1.0);
    const __m256 il = _mm256_set_m128(_mm256_cvtpd_ps(_mm256_div_pd(one, s1)),
                                      _mm256_cvtpd_ps(_mm256_div_pd(one, s0)));
    const __m256 ih = _mm256_set_m128(_mm256_cvtpd_ps(_mm256_div_pd(one, s3)),
                                      _mm256_cvtpd_ps(_mm256_div_pd(one, s2)));
    for (i = 0; i < n; i++) {
        _mm256_storeu_ps(x + 16 * i, _mm256_mul_ps(_mm256_loadu_ps(x + 16 * i), il));
        _mm256_storeu_ps(x + 16 * i + 8, _mm256_mul_ps(_mm256_loadu_ps(x + 16 * i + 8), ih));
    }
}

/* The eight chains are two vectors of four double lanes; a tail adds +0 to the lanes past it. */
static void rmsnorm_f32_avx2(float *out, const float *x, const float *w, size_t n, float eps) {
    __m256d lo = _mm256_setzero_pd(), hi = lo;
    for (size_t i = 0; i < n; i += 8) {
        const __m256i m = lanes_mask(n - i);
        const __m256 v = _mm256_maskload_ps(x + i, m);
        const __m256d a = _mm256_cvtps_pd(_mm256_castps256_ps128(v)),
                      b = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
        lo = _mm256_fmadd_pd(a, a, lo);
        hi = _mm256_fmadd_pd(b, b, hi);
    }
    double c[8];
    _mm256_storeu_pd(c, lo);
    _mm256_storeu_pd(c + 4, hi);
    const double ss = ((c[0] + c[1]) + (c[2] + c[3])) + ((c[4] + c[5]) + (c[6] + c[7]));
    const __m256 r = _mm256_set1_ps(1.0f / sqrtf((float)(ss / (double)n) + eps));
    for (size_t i = 0; i < n; i += 8) {
        const __m256i m = lanes_mask(n - i);
        const __m256 v = _mm256_mul_ps(_mm256_maskload_ps(x + i, m), r);
        _mm256_maskstore_ps(out + i, m, _mm256_mul_ps(v, _mm256_maskload_ps(w + i, m)));
    }
}

/* The even (0x88) or odd (0xdd) floats of a, then of b: a shuffle leaves them in 64-bit pairs
 * a a b b per 128-bit half, one permute puts a's four before b's. */
#define SPLIT8(a, b, imm)                                                                          \
    _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, imm)), 0xd8))

static void bf16_split_avx2(const float *x, size_t n, float *xs) {
    size_t i = 0;
    for (; i + 32 <= n; i += 32) {
        const __m256 a = _mm256_loadu_ps(x + i), b = _mm256_loadu_ps(x + i + 8),
                     c = _mm256_loadu_ps(x + i + 16), d = _mm256_loadu_ps(x + i + 24);
        _mm256_storeu_ps(xs + i, SPLIT8(a, b, 0x88));
        _mm256_storeu_ps(xs + i + 8, SPLIT8(c, d, 0x88));
        _mm256_storeu_ps(xs + i + 16, SPLIT8(a, b, 0xdd));
        _mm256_storeu_ps(xs + i + 24, SPLIT8(c, d, 0xdd));
    }
    memcpy(xs + i, x + i, (n - i) * sizeof *x);
}
#undef SPLIT8

/* 8 quantized values as 8 bytes: the int32s narrowed with signed saturation (they are in
 * [-127, 127] already) */
static inline __m128i narrow8(__m256i v) {
    const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    return _mm_packs_epi16(w, w);
}

static void quantize_i8_avx2(const float *x, size_t n, float s, int8_t *q) {
    const __m256 vs = _mm256_set1_ps(s), hi = _mm256_set1_ps(127.0f), lo = _mm256_set1_ps(-127.0f);
    for (size_t i = 0; i < n; i += 8) {
        const __m256i m = lanes_mask(n - i);
        __m256 v = _mm256_div_ps(_mm256_maskload_ps(x + i, m), vs);
        v = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        const __m256 ok = _mm256_cmp_ps(v, v, _CMP_ORD_Q); /* NaN -> 0 */
        v = _mm256_and_ps(ok, _mm256_max_ps(_mm256_min_ps(v, hi), lo));
        const __m128i b = narrow8(_mm256_cvtps_epi32(v));
        if (n - i >= 8) {
            _mm_storel_epi64((__m128i *)(void *)(q + i), b);
        } else {
            int8_t t[16];
            _mm_storeu_si128((__m128i *)(void *)t, b);
            memcpy(q + i, t, n - i);
        }
    }
}

/* q ^ 0x80 is q + 128 as an unsigned byte: psadbw against zero sums eight of those into each
 * 64-bit lane; 128 a byte read comes off at the end. */
static int64_t sum_i8_avx2(const int8_t *q, size_t n) {
    const __m256i flip = _mm256_set1_epi8((char)0x80), zero = _mm256_setzero_si256();
    __m256i acc = zero;
    size_t i = 0;
    for (; i + 32 <= n; i += 32) {
        const __m256i v =
            _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(const void *)(q + i)), flip);
        acc = _mm256_add_epi64(acc, _mm256_sad_epu8(v, zero));
    }
    int64_t l[4], s = -128 * (int64_t)i;
    _mm256_storeu_si256((__m256i *)(void *)l, acc);
    s += l[0] + l[1] + l[2] + l[3];
    for (; i < n; i++) s += q[i];
    return s;
}

static void i8_to_f32_lanes_avx2(float *dst, const int8_t *src, size_t n, const float *scale) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        _mm256_storeu_ps(dst + i, ld_i8x8(src + i, 8, _mm256_loadu_ps(scale + i)));
    }
    for (; i < n; i++) dst[i] = (float)src[i] * ld_scale(scale, i);
}

/* ---- axpy over rows: the sums of 64 columns stay in 8 registers over the rows ---- */

/* Columns [c0, c0 + 64) of the axpy_rows kernels (kernels.h), kind 0: int8 with a scale per
 * column, 1: int8 with a scale per row, 2: BF16. `full` (a constant once inlined): all 64
 * columns are there, loaded and stored unmasked. */
static inline __attribute__((always_inline)) void axpy_rows_body(float *y, const float *x,
                                                                 const void *w, size_t m, size_t n,
                                                                 size_t c0, const float *scale,
                                                                 const int kind, const int full) {
    __m256 acc[8];
    size_t cnt[8];
#pragma GCC unroll 8
    for (int v = 0; v < 8; v++) {
        const size_t i = c0 + 8 * (size_t)v;
        cnt[v] = full ? 8 : i >= n ? 0 : n - i >= 8 ? 8 : n - i;
        acc[v] = _mm256_setzero_ps();
    }
    for (size_t j = 0; j < m; j++) {
        const __m256 xj = _mm256_set1_ps(x[j]);
        const __m256 rs = kind == 1 ? _mm256_set1_ps(ld_scale(scale, j)) : xj;
#pragma GCC unroll 8
        for (int v = 0; v < 8; v++) {
            if (!full && !cnt[v]) continue;
            const size_t i = j * n + c0 + 8 * (size_t)v;
            __m256 wv;
            if (kind == 2) {
                const uint16_t *p = (const uint16_t *)w + i;
                wv = full || cnt[v] == 8 ? ld_bf16x8(p) : ld_bf16_tail(p, cnt[v]);
            } else {
                const size_t col = c0 + 8 * (size_t)v;
                const __m256 sc = kind == 1 ? rs
                                  : full || cnt[v] == 8
                                      ? _mm256_loadu_ps(scale + col)
                                      : _mm256_maskload_ps(scale + col, tail_mask(cnt[v]));
                wv = ld_i8x8((const int8_t *)w + i, full ? 8 : cnt[v], sc);
            }
            acc[v] = _mm256_fmadd_ps(xj, wv, acc[v]);
        }
    }
#pragma GCC unroll 8
    for (int v = 0; v < 8; v++) {
        float *d = y + c0 + 8 * (size_t)v;
        if (full || cnt[v] == 8)
            _mm256_storeu_ps(d, acc[v]);
        else if (cnt[v])
            _mm256_maskstore_ps(d, tail_mask(cnt[v]), acc[v]);
    }
}

#define AXPY_ROWS(KIND)                                                                            \
    for (size_t c0 = 0; c0 < n; c0 += 64) {                                                        \
        if (n - c0 >= 64)                                                                          \
            axpy_rows_body(y, x, w, m, n, c0, scale, KIND, 1);                                     \
        else                                                                                       \
            axpy_rows_body(y, x, w, m, n, c0, scale, KIND, 0);                                     \
    }

static void axpy_rows_i8_lanes_avx2(float *y, const float *x, const int8_t *w, size_t m, size_t n,
                                    const float *scale) {
    AXPY_ROWS(0)
}

static void axpy_rows_i8_avx2(float *y, const float *x, const int8_t *w, size_t m, size_t n,
                              const float *scale) {
    AXPY_ROWS(1)
}

static void axpy_rows_bf16_avx2(float *y, const float *x, const uint16_t *w, size_t m, size_t n) {
    const float *scale = NULL;
    AXPY_ROWS(2)
}
#undef AXPY_ROWS

/* ---- the float GEMMs (kernels.h): each output the fmaf chain over the columns in order ----
 * Sixteen registers hold 64 sums with the loads beside them, half of a 16 x 8 block: each
 * kernel runs its block as passes of 16 outputs x 4 tokens (two panel loads and four broadcasts
 * feed eight FMAs), re-reading the panel from L1 for the next pass. */

/* 8 x 8 transpose: r[k] row k in, column k out */
static inline void transpose8_ps(__m256 r[8]) {
    __m256 t[8], s[8];
    for (int k = 0; k < 8; k += 2) {
        t[k] = _mm256_unpacklo_ps(r[k], r[k + 1]);
        t[k + 1] = _mm256_unpackhi_ps(r[k], r[k + 1]);
    }
    for (int k = 0; k < 8; k += 4) {
        s[k] = _mm256_shuffle_ps(t[k], t[k + 2], 0x44);
        s[k + 1] = _mm256_shuffle_ps(t[k], t[k + 2], 0xee);
        s[k + 2] = _mm256_shuffle_ps(t[k + 1], t[k + 3], 0x44);
        s[k + 3] = _mm256_shuffle_ps(t[k + 1], t[k + 3], 0xee);
    }
    for (int k = 0; k < 4; k++) {
        r[k] = _mm256_permute2f128_ps(s[k], s[k + 4], 0x20);
        r[k + 4] = _mm256_permute2f128_ps(s[k], s[k + 4], 0x31);
    }
}

/* The panel's columns [i, i + 8) from r[16] (r[k]: row k's 8 values), transposed in two halves */
static inline void store_panel8(float *panel, size_t i, __m256 r[16]) {
    transpose8_ps(r);
    transpose8_ps(r + 8);
    for (int k = 0; k < 8; k++) {
        _mm256_storeu_ps(panel + 16 * (i + (size_t)k), r[k]);
        _mm256_storeu_ps(panel + 16 * (i + (size_t)k) + 8, r[8 + k]);
    }
}

static void pack16_f32_avx2(float *panel, const float *const rows[16], size_t n) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 r[16];
        for (int k = 0; k < 16; k++) r[k] = _mm256_loadu_ps(rows[k] + i);
        store_panel8(panel, i, r);
    }
    for (; i < n; i++)
        for (size_t k = 0; k < 16; k++) panel[16 * i + k] = rows[k][i];
}

static void pack16_bf16_avx2(float *panel, const uint16_t *const rows[16], size_t n) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 r[16];
        for (int k = 0; k < 16; k++) r[k] = ld_bf16x8(rows[k] + i);
        store_panel8(panel, i, r);
    }
    for (; i < n; i++)
        for (size_t k = 0; k < 16; k++) {
            uint16_t h; /* rows in an mmap may sit at odd addresses */
            memcpy(&h, rows[k] + i, sizeof h);
            panel[16 * i + k] = ds_bf16_decode(h);
        }
}

static void pack16_i8_f32_avx2(float *panel, const int8_t *const rows[16], const float scale[16],
                               size_t n) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 r[16];
        for (int k = 0; k < 16; k++) r[k] = ld_i8x8(rows[k] + i, 8, _mm256_set1_ps(scale[k]));
        store_panel8(panel, i, r);
    }
    for (; i < n; i++)
        for (size_t k = 0; k < 16; k++) panel[16 * i + k] = (float)rows[k][i] * scale[k];
}

/* Four tokens' chains over 16 lanes: a (lanes 0-7) and b (8-15) per token, stored as rows of 16 */
#define ZERO4X2()                                                                                  \
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0
#define STORE4X2(dst)                                                                              \
    do {                                                                                           \
        _mm256_storeu_ps((dst), a0), _mm256_storeu_ps((dst) + 8, b0);                              \
        _mm256_storeu_ps((dst) + 16, a1), _mm256_storeu_ps((dst) + 24, b1);                        \
        _mm256_storeu_ps((dst) + 32, a2), _mm256_storeu_ps((dst) + 40, b2);                        \
        _mm256_storeu_ps((dst) + 48, a3), _mm256_storeu_ps((dst) + 56, b3);                        \
    } while (0)

static void gemm16x8_f32_avx2(const float *panel, size_t n, const float *const x[8],
                              float out[128]) {
    for (int g = 0; g < 8; g += 4) {
        const float *x0 = x[g], *x1 = x[g + 1], *x2 = x[g + 2], *x3 = x[g + 3];
        ZERO4X2();
        for (size_t i = 0; i < n; i++) {
            const __m256 p = _mm256_loadu_ps(panel + 16 * i),
                         q = _mm256_loadu_ps(panel + 16 * i + 8);
            FMA2(0, _mm256_broadcast_ss(x0 + i));
            FMA2(1, _mm256_broadcast_ss(x1 + i));
            FMA2(2, _mm256_broadcast_ss(x2 + i));
            FMA2(3, _mm256_broadcast_ss(x3 + i));
        }
        STORE4X2(out + 16 * g);
    }
}

/* Each half of 16 columns that holds any of the m, as passes of four tokens; the lanes past m
 * load 0 (out is 0 there), and a half past m is stored as zeros. */
static void gemm32x8_f32_rows_avx2(const float *const *rows, size_t off, size_t m, size_t n,
                                   const float *const x[8], size_t ldx, float out[256]) {
    for (size_t h = 0; h < 2; h++) {
        if (16 * h >= m) {
            memset(out + 128 * h, 0, 128 * sizeof(float));
            continue;
        }
        const size_t c = off + 16 * h, lm = m - 16 * h;
        const __m256i k0 = lm >= 8 ? _mm256_set1_epi32(-1) : tail_mask(lm);
        const __m256i k1 = lm >= 16 ? _mm256_set1_epi32(-1)
                           : lm > 8 ? tail_mask(lm - 8)
                                    : _mm256_setzero_si256();
        for (int g = 0; g < 8; g += 4) {
            const float *x0 = x[g], *x1 = x[g + 1], *x2 = x[g + 2], *x3 = x[g + 3];
            ZERO4X2();
            for (size_t i = 0; i < n; i++) {
                const float *r = rows[i] + c;
                const __m256 p = _mm256_maskload_ps(r, k0), q = _mm256_maskload_ps(r + 8, k1);
                FMA2(0, _mm256_broadcast_ss(x0 + i * ldx));
                FMA2(1, _mm256_broadcast_ss(x1 + i * ldx));
                FMA2(2, _mm256_broadcast_ss(x2 + i * ldx));
                FMA2(3, _mm256_broadcast_ss(x3 + i * ldx));
            }
            STORE4X2(out + 128 * h + 16 * g);
        }
    }
}

/* Four panels' chains a pass (a: lanes 0-7, b: 8-15 of each), one broadcast of x per column */
static void gemm128x1_f32_avx2(const float *const panel[8], size_t n, const float *x,
                               float out[128]) {
    for (int g = 0; g < 8; g += 4) {
        const float *p0 = panel[g], *p1 = panel[g + 1], *p2 = panel[g + 2], *p3 = panel[g + 3];
        ZERO4X2();
        for (size_t i = 0; i < n; i++) {
            const __m256 v = _mm256_broadcast_ss(x + i);
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(p0 + 16 * i), v, a0);
            b0 = _mm256_fmadd_ps(_mm256_loadu_ps(p0 + 16 * i + 8), v, b0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(p1 + 16 * i), v, a1);
            b1 = _mm256_fmadd_ps(_mm256_loadu_ps(p1 + 16 * i + 8), v, b1);
            a2 = _mm256_fmadd_ps(_mm256_loadu_ps(p2 + 16 * i), v, a2);
            b2 = _mm256_fmadd_ps(_mm256_loadu_ps(p2 + 16 * i + 8), v, b2);
            a3 = _mm256_fmadd_ps(_mm256_loadu_ps(p3 + 16 * i), v, a3);
            b3 = _mm256_fmadd_ps(_mm256_loadu_ps(p3 + 16 * i + 8), v, b3);
        }
        STORE4X2(out + 16 * g);
    }
}
#undef ZERO4X2
#undef FMA2
#undef STORE4X2

static const ds_kernels avx2_table = {
    .name = "avx2",
    .bf16_to_f32 = bf16_to_f32_avx2,
    .f16_to_f32 = f16_to_f32_avx2,
    .fp8_to_f32 = fp8_to_f32_avx2,
    .i8_to_f32 = i8_to_f32_avx2,
    .i4_to_f32 = i4_to_f32_avx2,
    .i8_to_f32_lanes = i8_to_f32_lanes_avx2,
    .absmax_f32 = absmax_f32_avx2,
    .argmax_f32 = argmax_f32_avx2,
    .swiglu_f32 = swiglu_f32_avx2,
    .exp_f32 = exp_f32_avx2,
    .softmax16_f32 = softmax16_f32_avx2,
    .rmsnorm_f32 = rmsnorm_f32_avx2,
    .bf16_split = bf16_split_avx2,
    .quantize_i8 = quantize_i8_avx2,
    .sum_i8 = sum_i8_avx2,
    .dot_f32 = dot_f32_avx2,
    .dot4_f32 = dot4_f32_avx2,
    .axpy_f32 = axpy_f32_avx2,
    .axpy_i8 = axpy_i8_avx2,
    .axpy_bf16 = axpy_bf16_avx2,
    .axpy_rows_i8_lanes = axpy_rows_i8_lanes_avx2,
    .axpy_rows_i8 = axpy_rows_i8_avx2,
    .axpy_rows_bf16 = axpy_rows_bf16_avx2,
    .dot4_bf16 = dot4_bf16_avx2,
    .dot4_f16 = dot4_f16_avx2,
    .dot4_fp8 = dot4_fp8_avx2,
    .dot4xn_bf16 = dot4xn_bf16_avx2,
    .dot4x2_f16 = dot4x2_f16_avx2,
    .dot4x2_fp8 = dot4x2_fp8_avx2,
    .dot4_i8 = dot4_i8_avx2,
    .dot4_i8_no_min = 1, /* _mm256_sign_epi8 cannot negate -128 */
    .dot4_i4 = dot4_i4_avx2,
    .pack16_f32 = pack16_f32_avx2,
    .pack16_bf16 = pack16_bf16_avx2,
    .pack16_i8_f32 = pack16_i8_f32_avx2,
    .gemm16x8_f32 = gemm16x8_f32_avx2,
    .gemm32x8_f32_rows = gemm32x8_f32_rows_avx2,
    .gemm128x1_f32 = gemm128x1_f32_avx2,
};

const ds_kernels *ds_kernels_avx2_table(void) {
    return &avx2_table;
}
