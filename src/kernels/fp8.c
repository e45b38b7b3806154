/* Encoders from f32 to the narrow storage formats: FP8 E4M3FN, BF16 and F16.
 *
 * E4M3FN (the "fn" = finite, no infinities) as the official DeepSeek-V3 release stores it:
 * 1 sign bit, 4 exponent bits (bias 7), 3 mantissa bits. Codes 0x01..0x07 are subnormals
 * m * 2^-9, 0x08..0x7E are normals (1 + m/8) * 2^(e-7) up to 448, 0x7F / 0xFF are NaN and there
 * is no infinity. Quantising a block (scale = max|w| / 448) must therefore saturate instead of
 * overflowing into the NaN code, which is what PyTorch's `.to(torch.float8_e4m3fn)` of a clamped
 * value gives too.
 *
 * Both encoders round to nearest, ties to even, on the exact f32 input (one rounding), using the
 * classic integer trick on the IEEE bits: add (half ulp - 1) plus the lowest kept bit, then
 * truncate; a carry out of the mantissa bumps the exponent, which is again the right answer. */
#include "kernels/kernels.h"

#include <math.h>
#include <string.h>

static uint32_t f32_bits(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    return u;
}

uint8_t ds_f32_to_e4m3(float x) {
    uint32_t u = f32_bits(x);
    uint8_t sign = (uint8_t)((u >> 24) & 0x80);
    uint32_t a = u & 0x7FFFFFFFu;             /* |x| bits */
    if (a > 0x7F800000u) return 0;            /* NaN: no NaN code is ever produced */
    if (a >= 0x43E00000u) return sign | 0x7E; /* |x| >= 448 (inf included): saturate */
    if (a < 0x3C800000u) {                    /* |x| < 2^-6: subnormal range, step 2^-9 */
        float q = rintf(fabsf(x) * 512.0f);   /* exact scaling; rint rounds ties to even */
        return sign | (uint8_t)q;             /* q in [0, 8]; 8 is the smallest normal code */
    }
    /* normal: keep 3 of the 23 mantissa bits with round-to-nearest-even */
    uint32_t r = a + 0x7FFFFu + ((a >> 20) & 1u);
    uint32_t code = (r >> 20) - ((127u - 7u) << 3); /* rebias the exponent from 127 to 7 */
    /* a < 448 rounds at most to 448 = 0x7E, never to 0x7F */
    return sign | (uint8_t)code;
}

uint16_t ds_f32_to_bf16(float x) {
    uint32_t u = f32_bits(x);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((u >> 16) | 0x0040u); /* quiet NaN */
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

uint16_t ds_f32_to_f16(float x) {
    uint32_t u = f32_bits(x);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    uint32_t a = u & 0x7FFFFFFFu;
    if (a > 0x7F800000u) return sign | 0x7E00u;  /* NaN: a quiet NaN */
    if (a >= 0x477FF000u) return sign | 0x7C00u; /* >= 65520 (half way above 65504): inf */
    if (a < 0x38800000u) {                       /* |x| < 2^-14: subnormal, step 2^-24 */
        float q = rintf(fabsf(x) * 16777216.0f); /* exact scaling; ties to even */
        return sign | (uint16_t)q;               /* q <= 1024, the smallest normal's code */
    }
    uint32_t r = a + 0xFFFu + ((a >> 13) & 1u); /* keep 10 of 23 mantissa bits, RNE */
    return sign | (uint16_t)((r >> 13) - ((127u - 15u) << 10));
}
