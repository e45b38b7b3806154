/* kernels: the arithmetic the forward pass spends its time in. Knows only arrays.
 *
 * A table of primitive kernels per ISA (scalar reference, AVX2, AVX-512, NEON) is chosen once at
 * run time from CPUID + OS state (or DS_ISA=scalar|avx2|avx512|neon); a missing slot is filled
 * from the scalar table, which is complete and is the test oracle. On top of the table sit the
 * drivers that the model calls: a threaded matmul over weight matrices in their stored dtype,
 * and a few row ops. */
#ifndef DS_KERNELS_H
#define DS_KERNELS_H

#include "core/core.h"

#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* Primitive kernels. All pointers may be unaligned; n may be any size (odd tails included).
 * Kernels never fail: preconditions are the caller's job. */
typedef struct ds_kernels {
    const char *name; /* "scalar", "avx2", "avx512", "neon" */
    /* dst[i] = (float)src[i] for BF16 / F16 bit patterns */
    void (*bf16_to_f32)(float *dst, const uint16_t *src, size_t n);
    void (*f16_to_f32)(float *dst, const uint16_t *src, size_t n);
    /* dst[i] = e4m3fn(src[i]) * scale, the product rounded once in f32 (exactly what the
     * official reference's fp8 x weight_scale_inv dequantisation computes) */
    void (*fp8_to_f32)(float *dst, const uint8_t *src, size_t n, float scale);
    /* dst[i] = (float)q[i] * scale, the product rounded once: the dequantisation of a W8A8 row
     * segment (int8) and of a W4A8 one (int4 packed as in ds_mat.int4, src at the byte of an
     * even column, n logical columns) */
    void (*i8_to_f32)(float *dst, const int8_t *src, size_t n, float scale);
    void (*i4_to_f32)(float *dst, const uint8_t *src, size_t n, float scale);
    /* dst[i] = (float)q[i] * scale[i]: i8_to_f32 with a scale per element, for int8 rows stored
     * transposed (a column's scale is its output row's) */
    void (*i8_to_f32_lanes)(float *dst, const int8_t *src, size_t n, const float *scale);
    /* max_i |x[i]|, NaNs skipped (0 for n = 0) */
    float (*absmax_f32)(const float *x, size_t n);
    /* the lowest i with x[i] = max_i x[i] over the values above -inf, a NaN counting above
     * every number (numpy's and torch's order), -1 when there is none: greedy sampling's pick
     * over the vocabulary. x[i] is finite unless x holds a NaN or +inf. */
    int64_t (*argmax_f32)(const float *x, size_t n);
    /* a[i] = a[i] / (1 + exp(-a[i])) * b[i]: SwiGLU, silu of the gate times the up projection.
     * The SIMD tables evaluate exp as a polynomial (the scalar table calls expf): the result is
     * within 2.1e-7 relative of a double evaluation (measured over gates in [-88, 88]), so
     * tables may differ in the last bits; a -inf gate gives NaN and a +inf one inf * b, as the
     * formula does. */
    void (*swiglu_f32)(float *a, const float *b, size_t n);
    /* dst[i] = e^x[i] (dst may be x): softmax and the sampler's weights. The SIMD tables use
     * swiglu's polynomial (within 2.1e-7 relative of a double evaluation where the result is a
     * normal float), the scalar table expf; every table gives exactly 0 below -104 (-inf included,
     * so a masked token keeps weight 0), inf above 88.8 and NaN for NaN. */
    void (*exp_f32)(float *dst, const float *x, size_t n);
    /* Attention's scores of 16 heads, x [n][16] (head l's i-th at x[16 i + l]), n > 0: each
     * head's n scores become ds_softmax's floats for them with this table's exp_f32: the
     * first-wins max, e^(x - max), the double sum in order, each times (float)(1 / sum). */
    void (*softmax16_f32)(float *x, size_t n);
    /* ds_rmsnorm's row, out may be x, n > 0: the squares summed in double in eight chains
     * (element i in chain i mod 8), merged ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7));
     * r = 1 / sqrtf((float)(sum / n) + eps); out[i] = (x[i] * r) * w[i]. Every table gives the
     * same floats: a float's square is exact in double, so a fused add of it is the plain add. */
    void (*rmsnorm_f32)(float *out, const float *x, const float *w, size_t n, float eps);
    /* ds_bf16_split (a permutation: every table gives the same floats) */
    void (*bf16_split)(const float *x, size_t n, float *xs);
    /* q[i] = round-half-even(x[i] / s) clamped to [-127, 127], NaN -> 0 (the IEEE division, so
     * every table gives the same bytes): ds_quantize_row_i8's second pass */
    void (*quantize_i8)(const float *x, size_t n, float s, int8_t *q);
    /* sum_i q[i], exact (the int8 matmuls' activation offsets, per block of quantized x) */
    int64_t (*sum_i8)(const int8_t *q, size_t n);
    /* sum_i a[i] * b[i] */
    float (*dot_f32)(const float *a, const float *b, size_t n);
    /* out[r] = sum_i x[i] * w[r][i] for r in 0..3: one pass over x feeds four rows */
    void (*dot4_f32)(const float *x, const float *const w[4], size_t n, float out[4]);
    /* y[i] += a * x[i], a fused multiply-add (fmaf) in the scalar, AVX2 and AVX-512 tables */
    void (*axpy_f32)(float *y, float a, const float *x, size_t n);
    /* axpy over a weight row converted on the fly, never written out: y[i] = fmaf(a, w[i], y[i])
     * with w[i] = (float)q[i] * scale rounded first (i8_to_f32's value), resp. the BF16 value, so
     * each y[i] is what axpy_f32 gives over the converted row (the absorptions' one-token path) */
    void (*axpy_i8)(float *y, float a, const int8_t *q, float scale, size_t n);
    void (*axpy_bf16)(float *y, float a, const uint16_t *w, size_t n);
    /* The same over m rows of n columns at once (row j at q + j n): y[i] = the fmaf chain from 0
     * over j < m of x[j] * w[j][i], w[j][i] as above: (float)q * scale rounded first, with a
     * scale per column (rows stored transposed, as i8_to_f32_lanes reads them) or per row, resp.
     * the BF16 value. Each y[i] is what axpy_f32 gives over the converted rows in order; the sums
     * stay in registers over the rows instead of going through y for every row. */
    void (*axpy_rows_i8_lanes)(float *y, const float *x, const int8_t *q, size_t m, size_t n,
                               const float *scale);
    void (*axpy_rows_i8)(float *y, const float *x, const int8_t *q, size_t m, size_t n,
                         const float *row_scale);
    void (*axpy_rows_bf16)(float *y, const float *x, const uint16_t *w, size_t m, size_t n);
    /* Fused decode + dot4 for the memory-bound matmuls of decoding (few tokens): the weights are
     * read in their stored dtype and widened in registers, never written to a scratch.
     * out[r] = sum_i x[i] * bf16(w[r][i]) (resp. f16) for r in 0..3, the decode exact. */
    void (*dot4_bf16)(const float *x, const uint16_t *const w[4], size_t n, float out[4]);
    void (*dot4_f16)(const float *x, const uint16_t *const w[4], size_t n, float out[4]);
    /* FP8 E4M3FN with the scale factored out per block: the columns are cut into blocks of
     * `block` (> 0) starting at column 0 of w[r], the last one partial, and
     *   out[r] = sum_b scale[r][b] * (sum_{i in block b} x[i] * e4m3(w[r][i])).
     * Within f32 round-off of the dot with the dequantised weights (fp8 * scale rounded once):
     * e4m3 values are exact, so only where the one rounding happens differs. scale[r] points at
     * the scales of row r's blocks (the row's entry of weight_scale_inv), possibly unaligned. */
    void (*dot4_fp8)(const float *x, const uint8_t *const w[4], const float *const scale[4],
                     size_t n, size_t block, float out[4]);
    /* The same for two tokens against the same four rows, so each weight is decoded once for
     * both: out[r] is the dot with x0, out[4 + r] the dot with x1. */
    void (*dot4x2_f16)(const float *x0, const float *x1, const uint16_t *const w[4], size_t n,
                       float out[8]);
    void (*dot4x2_fp8)(const float *x0, const float *x1, const uint8_t *const w[4],
                       const float *const scale[4], size_t n, size_t block, float out[8]);
    /* BF16 weights against nx (1, 2 or 4) tokens: out[4 t + r] = sum_i x[t][i] * bf16(w[r][i]),
     * x[t] in the pair-split layout of ds_bf16_split. A BF16 pair is one 32-bit word: the even
     * column's f32 is the word shifted left 16, the odd one's the word with its low half cleared,
     * so the weights need two bit operations per 32 columns and no widening shuffle. Each sum is
     * kept in 16 lanes: for every whole 32-column step, lane l adds x_even[l] * w[2l], then
     * x_odd[l] * w[2l + 1] (fmaf); tail columns (fewer than 32) add to lane (i - tail) % 16 in
     * order, 16 at a time (a missing lane adds fmaf(0, 0, lane)); the lanes then add as
     * l + (l + 8), that + 4, + 2, + 1. So every table and every nx give the same floats: a
     * token's result does not depend on the tokens beside it. The kernel also prefetches the
     * n_pf 64-byte lines from pf on, spread over its steps (the caller's stream ahead: issued at
     * once they stall on the miss queue while the arithmetic waits). With nx = 1 and pf NULL the
     * AVX-512 and AVX2 kernels read the four rows one after another rather than side by side (the
     * same sums), so that a caller streaming rows in order reads memory as one sequential stream.
     * Row r's columns are read in pieces of 32 (the last may be shorter), piece s at w[r] + s *
     * step: step 32 for a row in one piece of memory, 128 for the rows of a ds_mat interleaved
     * by fours (ds_mat_interleave), whose four rows are then one stream side by side (the rows
     * walk needs step 32).
     */
    void (*dot4xn_bf16)(const float *const x[4], int nx, const uint16_t *const w[4], size_t n,
                        size_t step, const char *pf, size_t n_pf, float out[16]);
    /* Integer dots of W8A8, exact in int32, for nx (1 - 4) tokens against the same four rows:
     * the columns are cut into blocks of `block` (> 0) starting at column 0, the last one
     * partial, and for every block b, token t and row r
     *   out[4 * (nx * b + t) + r] = sum_{i in block b} x[t][i] * w[r][i]
     * (out holds 4 * nx * ceil(n / block) int32; at nx = 1, out[4 * b + r]). x is quantized
     * activations: |x[i]| <= 127 (-128 never appears; the AVX2 sign trick relies on it).
     * Weights may be any int8, -128 included. xoff[t][b] = 128 * sum_{i in block b} x[t][i],
     * made once per token by the caller (the kernels that add w + 128 take it back out; int32
     * arithmetic wraps). Every table gives the same integers (the SIMD ones reorder an exact
     * sum); the caller keeps block * 127 * 128 < 2^31 (block <= 131072). The AVX-512 kernel
     * loads each weight once for all nx tokens, the AVX2 one once for each pair of them. The
     * kernel also prefetches the n_pf 64-byte lines from pf on. Row r's columns are read in
     * pieces of 64 (the last may be shorter), piece s at w[r] + s * step: step 64 for a row in
     * one piece of memory, 256 for the rows of a ds_mat interleaved by fours (ds_mat_interleave;
     * then block is a multiple of 64 or >= n). */
    void (*dot4_i8)(const int8_t *const x[4], const int32_t *const xoff[4], int nx,
                    const int8_t *const w[4], size_t n, size_t block, size_t step, const char *pf,
                    size_t n_pf, int32_t *out);
    /* 1 when this table's dot4_i8 needs x > -128 (AVX2's sign trick): a call whose static
     * activations (ds_mat.act_n) reach -128 then takes the scalar kernel. */
    int dot4_i8_no_min;
    /* The same with int4 weights packed two per byte (ds_mat.int4): w[r] points at the byte of
     * an even column, byte j holding logical column 2j in its low nibble and 2j + 1 in its high
     * one, two's complement in [-8, 7]; n logical columns (ceil(n / 2) bytes are read; when n is
     * odd the last high nibble is ignored). block is even unless block >= n. The activation work
     * is done once per token by the caller, not once per four rows: xs is x in the split layout
     * of ds_i4_split (within every 128-column step of every block the even columns first, then
     * the odd ones, matching the low and the high nibbles of the step's 64 bytes), and
     * xoff[b] = 8 * sum_{i in block b} x[i] (the kernels that add w + 8 take it back out). */
    void (*dot4_i4)(const int8_t *xs, const int32_t *xoff, const uint8_t *const w[4], size_t n,
                    size_t block, int32_t *out);
    /* The integer GEMM of prefill (many tokens), W8A8 and W4A8 alike. Sixteen weight rows are
     * first packed into a panel of ceil(n / 4) groups of 64 bytes; group g holds, for row r,
     * columns 4g .. 4g + 3 at bytes 4r .. 4r + 3, each stored as the unsigned w + off (off = 128
     * for int8, 8 for int4; bytes past column n are 0), so one 64-byte load gives the 16 rows'
     * 4-column slices and one VNNI/SDOT step per token adds 16 rows' partial dots in 16 lanes.
     * w[r] as in dot4_i8 / dot4_i4 (int4: pointing at the byte of column 0; int8 read in pieces
     * of 64 columns at w[r] + s * step, as dot4_i8 reads them). */
    void (*pack16_i8)(uint8_t *panel, const int8_t *const w[16], size_t n, size_t step);
    void (*pack16_i4)(uint8_t *panel, const uint8_t *const w[16], size_t n);
    /* nt (1 - 8) tokens against one panel. x[t] are quantized activations (|x| <= 127)
     * readable for 4 * ceil(n / 4) bytes, zero past n (-128 allowed: static activations reach
     * it); x[t] and xoff[t] are readable for every t < 8, and a kernel may read those past nt
     * (callers repeat a token there). The columns are cut into blocks of `block` (a multiple of
     * 4, or >= n: one block); for each block b the
     * exact sum is isum[t][r] = sum_{i in b} x[t][i] * panel(r, i) - xoff[t][b] where the caller
     * passes xoff[t][b] = off * sum_{i in b} x[t][i] (int32 arithmetic wraps: the raw sums may
     * exceed 2^31 for long blocks, the difference, a true int8 dot, does not). Then, blocks in
     * order from acc = 0: acc[t][r] = fma((float)isum[t][r], sw[16 b + r], acc) (sw: [blocks][16]
     * row scales), and out[16 t + r] = acc for t < nt. Every table gives the same floats. The
     * kernel also prefetches the n_pf 64-byte lines from pf on (the next panel's rows), spread over
     * its steps as dot4xn_bf16 does. */
    void (*gemm16x8_i8)(const uint8_t *panel, size_t n, size_t block, int nt,
                        const int8_t *const x[8], const int32_t *const xoff[8], const float *sw,
                        const char *pf, size_t n_pf, float out[128]);
    /* Two panels (32 rows) against eight tokens: out[16 t + r] is gemm16x8_i8's with nt = 8 for
     * panel0 and its scales sw0, out[128 + 16 t + r] for panel1 and sw1, the same floats (pf and
     * n_pf as there, for the whole call). Each token's broadcast then feeds both panels (10 loads
     * per 16 VNNI steps instead of 9 per 8), and a call's fixed cost is spread over twice the
     * work. */
    void (*gemm32x8_i8)(const uint8_t *panel0, const uint8_t *panel1, size_t n, size_t block,
                        const int8_t *const x[8], const int32_t *const xoff[8], const float *sw0,
                        const float *sw1, const char *pf, size_t n_pf, float out[256]);
    /* The float GEMM of prefill and batched decode (F32 / BF16 / F16 / FP8 weights, converted
     * to f32 rows first): pack16_f32 lays 16 rows of n floats out as a panel [n][16] (column i
     * of row r at panel[16 i + r]); gemm16x8_f32 gives, for eight tokens x[t] (n floats each),
     *   out[16 t + r] = sum_i panel[16 i + r] * x[t][i]
     * accumulated in column order from 0 with one fused multiply-add per term (fmaf), so every
     * table gives the same floats. */
    void (*pack16_f32)(float *panel, const float *const rows[16], size_t n);
    /* The panel pack16_f32 makes of 16 BF16 rows widened to f32 (panel[16 i + r] is row r's
     * column i), in one pass: BF16 weights need no scratch of f32 rows first. */
    void (*pack16_bf16)(float *panel, const uint16_t *const rows[16], size_t n);
    /* The same from 16 int8 rows, row r converted as i8_to_f32 does with scale[r]. */
    void (*pack16_i8_f32)(float *panel, const int8_t *const rows[16], const float scale[16],
                          size_t n);
    void (*gemm16x8_f32)(const float *panel, size_t n, const float *const x[8], float out[128]);
    /* The same with the panel's row i read in place at rows[i] + off, 32 columns wide, its
     * first m (<= 32) lanes (out is 0 in the others), each half of 16 laid out as gemm16x8_f32's
     * out: attention's absorption and weighted sum over rows left unpacked. 32 columns a call
     * load each token's x[t][i * ldx] once for two vectors of chains (ldx 16: softmax16_f32's
     * scores, a head a token).
     *   out[128 (r / 16) + 16 t + r % 16] = sum_i rows[i][off + r] * x[t][i * ldx]   (r < m),
     * same order and fmaf */
    void (*gemm32x8_f32_rows)(const float *const *rows, size_t off, size_t m, size_t n,
                              const float *const x[8], size_t ldx, float out[256]);
    /* One token against eight panels, the same order and fmaf, so each panel's sums are
     * gemm16x8_f32's for that token: out[16 j + r] = sum_i panel[j][16 i + r] * x[i]. */
    void (*gemm128x1_f32)(const float *const panel[8], size_t n, const float *x, float out[128]);
} ds_kernels;

/* The table for this machine, selected on first call (thread-safe). */
const ds_kernels *ds_kernels_get(void);
/* A specific table, completed from scalar; NULL when this build or CPU cannot run it. */
const ds_kernels *ds_kernels_for(const char *isa);
/* The scalar reference table. */
const ds_kernels *ds_kernels_scalar(void);
/* Whether table k has its own kernel `fn` (not the scalar one filled in), or is the scalar table,
 * the kernels' oracle (whose gemm32x8_i8, say, is two gemm16x8_i8 calls). */
#define DS_KERNELS_OWN(k, fn)                                                                      \
    (strcmp((k)->name, ds_kernels_scalar()->name) == 0 || (k)->fn != ds_kernels_scalar()->fn)
/* True when table k has its own float GEMM kernels (gemm16x8_f32, gemm32x8_f32_rows,
 * gemm128x1_f32; or is the scalar table, their oracle): the others fill those slots from scalar,
 * slower than their dot / axpy kernels. */
int ds_kernels_fgemm_native(const ds_kernels *k);
/* This CPU's L2 cache per core in bytes (sysconf), 0 where the C library does not know it. */
size_t ds_kernels_l2_bytes(void);

/* A weight matrix W [rows, cols] (PyTorch's Linear layout: y = x W^T) in its stored form. The
 * data is not owned: it usually points into a safetensors mmap. */
typedef struct {
    ds_dtype dtype;     /* DS_F32, DS_F16, DS_BF16, DS_F8_E4M3 or DS_I8 */
    int64_t rows, cols; /* out, in (logical elements, also when int4-packed) */
    const void *data;   /* rows x cols, row-major, possibly unaligned */
    /* DS_F8_E4M3 and DS_I8: scale[ceil(rows/block_rows)][ceil(cols/block_cols)]; the real
     * weight is the stored value * the scale of its block, edge blocks partial. FP8: the
     * official weight_scale_inv (128 x 128). I8 per output channel (W8A8, weight_scale [out, 1]):
     * block_rows 1, block_cols = cols. I8 blockwise: 128 x 128. W4A8: block_rows 1, block_cols =
     * the group size along the input. */
    const float *scale;
    int64_t block_rows, block_cols;
    /* DS_I8 only: 1 when two signed 4-bit values are packed per byte along a row (W4A8): byte j
     * of a row holds column 2j in its low nibble and 2j+1 in its high nibble, two's complement
     * in [-8, 7]; a row takes ceil(cols / 2) bytes. 0: one int8 per element. */
    int int4;
    /* Rows of the scale grid's matrix above row 0: a row slice (one rank's heads, experts or
     * vocabulary, src/model/shard.c) keeps the whole grid and reads scale rows (row0 + r) /
     * block_rows, so it may start inside a block (and bias[row0 + r]). 0 for a whole matrix. */
    int64_t row0;
    /* DS_I8 (not int4) with STATIC activation quantization (the Ascend / MindSpore W8A8
     * "static" scheme, docs/formats.md): act_n is 1 (per tensor) or cols (per input channel)
     * and the activations are quantized with the stored step and zero point, not per token:
     *   q_x[c] = clamp(rint(x[c] / act_scale[c'] + act_zp[c']), -128, 127), c' = c or 0,
     * so y[t, r] = scale(r) * sum_c q_x[c] q_w[r, c] + bias[row0 + r]: `scale` is the file's
     * deq_scale (one block per row) and bias its int32 quant_bias times deq_scale, in f32. The
     * real weight is q_w * scale(r) / act_scale[c'] (ds_mat_row_f32). act_n 0: dynamic. */
    int64_t act_n;
    const float *act_scale, *act_zp;
    const float *bias; /* NULL or one f32 per row, added to y (any dtype) */
    /* The layout of the rows (ds_mat_interleave): DS_ILV_NONE row-major; DS_ILV_FOURS rows
     * interleaved by fours: the bytes of rows 4b .. 4b + 3 (b < rows / 4) hold, for each 64-byte
     * piece s of a row in order (32 BF16 columns, 64 int8 ones), the four rows' piece s one after
     * another; rows past 4 * (rows / 4) stay row-major after them. DS_ILV_PANELS (int8, rows a
     * multiple of 16): the bytes of rows 16p .. 16p + 15 are the panel pack16_i8 makes of them,
     * which gemm16x8_i8 reads in place. */
    int ilv;
} ds_mat;

enum { DS_ILV_NONE, DS_ILV_FOURS, DS_ILV_PANELS };

/* True when the dtype is one ds_matmul can read. */
int ds_mat_dtype_ok(ds_dtype t);
/* Element-exact f32 copy of row r (dst has cols floats), as the reference would dequantise it. */
void ds_mat_row_f32(const ds_mat *w, int64_t r, float *dst);
/* Same for columns [c0, c0 + n) of row r. */
void ds_mat_row_part_f32(const ds_mat *w, int64_t r, int64_t c0, int64_t n, float *dst);
/* Row r of w in place when w stores it as int8 times one scale (per output channel, row-major,
 * not int4, no static activations): its bytes, with *scale set; NULL for any other w. Its f32
 * row is i8_to_f32(q, cols, *scale), as ds_mat_row_f32 makes it. */
const int8_t *ds_mat_i8_row(const ds_mat *w, int64_t r, float *scale);
/* Narrows w to its rows [r0, r1) in place (data advanced, row0 for the scale grid). A w
 * interleaved by fours is cut at whole blocks of 4 rows only (r1 may be its end), one in panels
 * at whole panels. */
void ds_mat_slice_rows(ds_mat *w, int64_t r0, int64_t r1);
/* Lays w's rows out in place for the kernels that read it (ds_mat.ilv), and returns the layout
 * (DS_ILV_NONE: left as it is). Int8 (not int4) with rows a multiple of 16, columns of 4 and
 * scale blocks of whole 4-column groups becomes DS_ILV_PANELS where this machine's table has a
 * SIMD gemm16x8_i8: every token count then runs the GEMM on the stored panels, with no packing
 * and no horizontal sums. Otherwise rows of whole 64-byte pieces, 4 rows or more, that are BF16
 * read fused by the table (dot4xn_bf16) or int8 (not int4) whose scale blocks are whole pieces
 * become DS_ILV_FOURS: the four rows a kernel call reads side by side are then one stream in
 * memory, which the hardware prefetcher follows (four streams a row apart it did not). w->data
 * must be writable and seen through no other ds_mat. */
int ds_mat_interleave(ds_mat *w);
/* Bytes of the stored matrix (scales included). */
uint64_t ds_mat_bytes(const ds_mat *w);

/* y[t, r] = sum_c x[t, c] * W[r, c] for t < n_tok: y is [n_tok, rows], x is [n_tok, cols],
 * both f32 row-major. Rows are split over the pool's threads.
 * For DS_I8 weights (W8A8, W4A8) the activations are quantized per token on the fly (see
 * ds_quantize_row_i8) and the products accumulate exactly in int32 per scale block:
 *   y[t, r] = sum_blocks s_x[t] * scale(r, block) * sum_{c in block} q_x[t, c] * q_w[r, c]. */
void ds_matmul(ds_pool *pool, float *y, const float *x, int64_t n_tok, const ds_mat *w);
/* Independent matmuls (no job's y may alias another's x), each y[t, r] = x W^T exactly as
 * ds_matmul computes it, run together: their slices share the pool's runs. A job with argmax
 * also gets argmax[t] = argmax_f32 of y's row t, taken tile by tile while y is in cache. */
typedef struct {
    float *y;
    const float *x;
    int64_t n_tok;
    const ds_mat *w;
    int32_t *argmax; /* NULL, or [n_tok] */
} ds_mm_job;
void ds_matmul_jobs(ds_pool *pool, const ds_mm_job *jobs, int n_jobs);

/* x[0, n) to the split layout dot4_i4 reads: blocks of `block` columns from column 0 (the last
 * partial), each cut into steps of 128 columns from its start (the last partial), and a step of
 * L columns starting at i0 stores x[i0], x[i0 + 2], ... (ceil(L / 2) values) then x[i0 + 1],
 * x[i0 + 3], ... (floor(L / 2)) at xs[i0 ..]. A permutation within each step; xs has n bytes. */
void ds_i4_split(const int8_t *x, size_t n, size_t block, int8_t *xs);
/* x (n floats) in dot4xn_bf16's layout: within every whole 32-column step the 16 even columns,
 * then the 16 odd ones; a tail of fewer than 32 in order. */
void ds_bf16_split(const float *x, size_t n, float *xs);

/* Dynamic per-token activation quantization for W8A8/W4A8 (SGLang's per_token_quant_int8):
 * scale = max|x| / 127 (1 when x is all zeros), q[i] = round-half-even(x[i] / scale), which
 * stays within [-127, 127]. */
void ds_quantize_row_i8(const float *x, int64_t n, int8_t *q, float *scale);

/* Static activation quantization (ds_mat.act_n): q[c] = clamp(rint(x[c] / scale[c'] +
 * zp[c']), -128, 127) with c' = c when per_channel, else 0; NaN gives the zero point. */
void ds_quantize_row_static(const float *x, int64_t n, const float *scale, const float *zp,
                            int per_channel, int8_t *q);

/* ---- row ops (single-threaded; small next to the matmuls) ---- */
/* out = x / sqrt(mean(x^2) + eps) * w (out may alias x) */
void ds_rmsnorm(float *out, const float *x, const float *w, int64_t n, float eps);
/* in place: x = softmax(x) with the max subtracted, in f32 */
void ds_softmax(float *x, int64_t n);
/* a[i] = silu(a[i]) * b[i] */
void ds_swiglu(float *a, const float *b, int64_t n);

/* Measured sustained read bandwidth of this machine in bytes/s: the pool's threads sum a buffer
 * of `bytes` (well above the last-level cache) several times; the best pass counts. */
double ds_measure_read_bandwidth(ds_pool *pool, size_t bytes);
/* The same probe with its buffer kept between measurements, for a rate taken again and again
 * (bench-model --batch: beside every step). open: NULL, warned, when the buffer cannot be had;
 * run: the best of `passes` passes in bytes/s, 0 for a NULL probe. */
typedef struct ds_bw_probe ds_bw_probe;
ds_bw_probe *ds_bw_probe_open(ds_pool *pool, size_t bytes);
double ds_bw_probe_run(ds_bw_probe *p, int passes);
void ds_bw_probe_close(ds_bw_probe *p);

/* ---- quantize/encode helpers (src/kernels/fp8.c) ----
 * Scalar encoders used when writing checkpoints (make-tiny, quantize); not on any hot path. */
/* f32 -> FP8 E4M3FN bits, round-to-nearest-even; saturates to +-448 (0x7E / 0xFE) and never
 * returns the NaN codes 0x7F / 0xFF (a NaN input gives +0, an infinity +-448). */
uint8_t ds_f32_to_e4m3(float x);
/* f32 -> BF16 bits, round-to-nearest-even (overflow to +-inf as IEEE does; NaN stays a quiet NaN).
 */
uint16_t ds_f32_to_bf16(float x);
/* f32 -> IEEE binary16 bits, round-to-nearest-even, subnormals kept, overflow to +-inf, NaN stays
 * a quiet NaN. */
uint16_t ds_f32_to_f16(float x);

#endif
