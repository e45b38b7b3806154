/* kernels_isa: what the per-ISA kernel files share with the selector (kernels.c). Internal.
 *
 * Each kernels_<isa>.c is compiled with only its own -m flags and exports one getter that returns
 * its (possibly partial) table; NULL slots are filled from scalar by kernels.c. The getters are
 * declared only where the build compiles the file (CMakeLists.txt drops *_avx2.c / *_avx512.c
 * off x86-64 and *_neon.c off aarch64), so the other builds never reference a missing symbol.
 *
 * The element decoders below are `static inline` on purpose: every file that uses them gets its
 * own copy compiled with its own flags. A non-static inline shared between an AVX-512 file and a
 * plain one could be merged by the linker into the AVX-512 copy and crash an older CPU. */
#ifndef DS_KERNELS_ISA_H
#define DS_KERNELS_ISA_H

#include "kernels/kernels.h"

#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) || defined(_M_X64)
#define DS_KERNELS_X86 1
/* Tables of kernels_avx2.c / kernels_avx512.c: static storage, never NULL. Only call them after
 * the CPU and OS checks in kernels.c: the tables point at code that uses those instructions. */
const ds_kernels *ds_kernels_avx2_table(void);
const ds_kernels *ds_kernels_avx512_table(void);
#endif

#if defined(__aarch64__)
#define DS_KERNELS_NEON 1
const ds_kernels *ds_kernels_neon_table(void);
#endif

static inline float ds_f32_from_bits(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint32_t ds_f32_to_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

/* Offset of column i of an int8 row read in pieces of 64 columns, piece s at s * step (64: a
 * row in one piece of memory; see dot4_i8). */
static inline size_t ds_i8_at(size_t i, size_t step) {
    return i / 64 * step + i % 64;
}

/* BF16 is the top half of an f32: exact, NaN payloads included. */
static inline float ds_bf16_decode(uint16_t h) {
    return ds_f32_from_bits((uint32_t)h << 16);
}

/* IEEE binary16 -> f32, exact: subnormals are m * 2^-24 (exact in f32), inf stays inf, a NaN
 * keeps its payload (F16C / FCVTL would quiet a signalling NaN; only NaN-ness is promised). */
static inline float ds_f16_decode(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0) {
        float v = (float)m * 0x1p-24f; /* m < 2^10: exact */
        return sign ? -v : v;
    }
    if (e == 31) return ds_f32_from_bits(sign | 0x7f800000u | (m << 13));
    return ds_f32_from_bits(sign | ((e + 112u) << 23) | (m << 13)); /* rebias 15 -> 127 */
}

/* FP8 E4M3FN -> f32, exact: bias 7, codes with e == 0 are subnormals m * 2^-9, no infinities,
 * and S.1111.111 (0x7f / 0xff) is the only NaN. */
static inline float ds_e4m3_decode(uint8_t b) {
    uint32_t sign = (uint32_t)(b & 0x80u) << 24;
    uint32_t e = (b >> 3) & 0xfu, m = b & 7u;
    if (e == 15 && m == 7) return ds_f32_from_bits(sign | 0x7fc00000u);
    if (e == 0) {
        float v = (float)m * 0x1p-9f; /* exact */
        return sign ? -v : v;
    }
    return ds_f32_from_bits(sign | ((e + 120u) << 23) | (m << 20)); /* rebias 7 -> 127 */
}

/* Logical column c of an int4-packed row (ds_mat.int4): low nibble for even c, high for odd,
 * two's complement in [-8, 7]. */
static inline int ds_i4_get(const uint8_t *row, size_t c) {
    unsigned v = (c & 1) ? (unsigned)(row[c >> 1] >> 4) : (unsigned)(row[c >> 1] & 0xfu);
    return (int)(v ^ 8u) - 8;
}

/* One 128-column step of dot4_i4 from column i of a block ending at `end`: *xe / *xo point at
 * its 64 even / 64 odd activations (split layout, ds_i4_split) and wr[r] at row r's 64 packed
 * bytes. A partial last step (fewer than 128 columns left) is copied into the zero-padded bx and
 * bw, so kernels that read whole 64-byte steps (AVX2, NEON) see zeros past the end. */
static inline void ds_i4_step(const int8_t *xs, const uint8_t *const w[4], size_t i, size_t end,
                              int8_t bx[128], uint8_t bw[4][64], const int8_t **xe,
                              const int8_t **xo, const uint8_t *wr[4]) {
    const size_t o = i / 2; /* i is even: block even, or a single block from 0 */
    *xe = xs + i;
    *xo = xs + i + 64;
    for (int r = 0; r < 4; r++) wr[r] = w[r] + o;
    if (i + 128 <= end) return;
    size_t len = end - i, ne = (len + 1) / 2;
    memset(bx, 0, 128);
    memcpy(bx, xs + i, ne);
    memcpy(bx + 64, xs + i + ne, len / 2);
    *xe = bx;
    *xo = bx + 64;
    for (int r = 0; r < 4; r++) {
        memset(bw[r], 0, 64);
        memcpy(bw[r], wr[r], ne);
        wr[r] = bw[r];
    }
}

#endif
