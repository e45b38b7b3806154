/* The threaded matmul over stored weights: y[n_tok, rows] = x[n_tok, cols] . W^T.
 *
 * Workload. Decoding runs n_tok = 1 (or a handful of sequences batched together); prefill runs
 * tens to thousands of tokens. A DeepSeek-V3 weight is read from a multi-gigabyte mmap that does
 * not fit in any cache, so at decode time the matmul is a stream over W and its speed is the
 * memory bandwidth: every weight byte must be read exactly once per call and used by every token
 * of the batch while it is hot.
 *
 * Split. Each thread owns a contiguous range of rows (a contiguous slice of the mmap) and walks
 * it four rows at a time, so four FMA chains share each load of x. Two paths, chosen per call:
 *
 * Fused path (BF16 at any token count, F16 up to 32 tokens, FP8 up to 16; the float
 * GEMM path further down takes over beyond, and F32 beyond 8 tokens). The dot kernels read the
 * stored dtype and widen it in registers (dot4_<dtype>, and dot4x2_<dtype> for two tokens against
 * the same rows, so a weight is decoded once per token pair; BF16 runs dot4xn_bf16, four tokens a
 * call, see "BF16" below). Nothing is written: the earlier
 * convert-to-scratch-then-dot4 did a store and a reload per weight, and `perf` on the decode of a
 * BF16 model showed 52% of the time in the conversion and ~30% of the read bandwidth reached.
 * The rows are cut into chunks of MM_FUSED_CHUNK (1024) columns, and software prefetches run a
 * fixed 32 KiB ahead through the thread's slice of W (see MM_FUSED_PF_AHEAD), which measured
 * ~5-20% over leaving it to the hardware prefetcher. Measured on a 2-core Zen 5 VM (the
 * kernel benchmark of the time, now dsinfer bench-kernels; 16384 x 4096, n_tok = 1), before ->
 * after: one thread BF16 13-16 -> 25-27 GB/s and FP8 7-9 -> 21 GB/s (read bandwidth 28-37); two
 * threads BF16 25-26 -> 38-54 and FP8 13 -> 36-42 GB/s (read bandwidth 35-61; the VM is shared and
 * noisy). FP8 stays compute-bound (~26 GB/s in L2 on one core: 3 integer ops + a vcvtph2ps per 16
 * weights), BF16 / F16 are memory-bound. Tables without their own fused kernels (NEON today)
 * keep the tiled path rather than run the scalar fallbacks.
 *
 * Tiled path (F32 up to 8 tokens; every dtype beyond the fused limits on tables without the
 * float GEMM kernels: NEON). The four rows are processed in column
 * tiles of MM_TILE (512) columns:
 *   1. the 4 x MM_TILE tile is dequantised to f32 into an 8 KiB scratch on the stack, once per
 *      tile whatever n_tok is, while the next tile is software-prefetched;
 *   2. for every token, dot4 makes one pass over the tile of x[t] that feeds four rows, and the
 *      partial sums are added into y[t, r0..r0+3].
 * The conversion is paid once per weight and reused by all n_tok tokens, which is what wins for
 * prefill; at 16 tokens the two paths measured even. Why tiles rather than whole rows: a
 * whole-row scratch (4 x 7168 floats = 112 KiB) lives in L2, and converting from DRAM into L2
 * measured ~16 GB/s on one Zen core against ~23 GB/s into an L1-sized tile; the tile of x is
 * L1-resident too. Tiles of 256..2048 columns were measured; 512 with prefetching was best, by
 * less than the noise of the shared machine it was measured on. F32 weights are read in place,
 * in the same tiles. Both paths add one f32 partial sum per tile / chunk per output, a rounding
 * far below the dot's own.
 *
 * FP8 weights carry one scale per block_rows x block_cols block (128 x 128 in DeepSeek-V3).
 * The tiled path converts each row tile segment by segment, each segment with the scale of its
 * block: element-exact, fp8 * scale rounded once in f32, the same value the official
 * dequantisation produces. The fused path factors the scale out instead: per block the kernel
 * sums x * e4m3 (exact e4m3 values) and multiplies the block's vector sums by its scale, one
 * FMA per row per block. Mathematically the same product; the roundings differ by f32 round-off
 * (~1e-7 relative), well inside what the golden tests allow. Chunks hold whole blocks.
 *
 * BF16. dot4xn_bf16 reads a pair of BF16 columns as one 32-bit word: shifted left 16 it is the
 * even column's f32, masked to its high half the odd one's, two bit operations per 32 columns
 * where a widening load costs a shuffle per 16. x is laid out to match once per call
 * (ds_bf16_split: even columns of each 32-column step, then odd). Four tokens a call share each
 * decoded weight (16 accumulators), and the call issues its share of the stream's prefetches
 * between its steps: issued in one burst before the call they stalled the core on the full miss
 * queue, so the weight stream stopped while the arithmetic ran. Measured on 129280 x 1024 (the
 * medium model's lm_head), 2 threads, alone, against dot4 / dot4x2 with the burst: 1 token
 * 8.1 -> 7.4 ms, 4 tokens 10.3 -> 6.5, 8 tokens 14.6 -> 10.2, 32 tokens 30.7 -> 27.6; 18432 x
 * 7168 at 8 tokens 16.9 -> 13.8 ms. Every token's sums are the same floats whatever the other
 * tokens of the call (kernels.h), so BF16 runs dot4xn_bf16 at every token count (from a few
 * tokens on in blocks: matmul_bf16_blocks_thread) and a BF16 matrix's output for a token does not
 * depend on its batch. F16 and FP8 (up to their fused limits) and F32 switch to the float GEMM
 * beyond MM_FUSED_MAX_TOK_16 / _FP8 / MM_FUSED_MAX_TOK tokens, whose sums are in another order.
 *
 * Rows are computed identically whatever the thread count (the split is by whole 4-row blocks
 * and the tile / chunk order is fixed), so results do not depend on the pool size; except for
 * BF16 and per-channel int8 they do depend on n_tok (path, and pairing in the F16 / FP8 fused
 * path), by round-off. No state outlives a call but each thread's own scratch (on its stack, or
 * ds_thread_scratch's buffers, reused by its next call), so any number of pools (models) may run
 * matmuls concurrently. */
#include "kernels/kernels_isa.h"

#include <math.h>
#include <stdlib.h>

int ds_mat_dtype_ok(ds_dtype t) {
    return t == DS_F32 || t == DS_F16 || t == DS_BF16 || t == DS_F8_E4M3 || t == DS_I8;
}

/* Bytes of one stored row: int4 packs two columns per byte. */
static size_t row_bytes(const ds_mat *w) {
    if (w->dtype == DS_I8 && w->int4) return (size_t)(w->cols + 1) / 2;
    return (size_t)w->cols * ds_dtype_size(w->dtype);
}

/* Row r's row of the scale grid, n_col_blocks scales long. Per-channel scales (block_rows 1) take
 * no division: one per row cost the int8 GEMM's packing a tenth of its time at 8 tokens. */
static const float *scale_row(const ds_mat *w, size_t r, size_t n_col_blocks) {
    const size_t sr = (size_t)w->row0 + r, br = (size_t)w->block_rows;
    return w->scale + (br == 1 ? sr : sr / br) * n_col_blocks;
}

uint64_t ds_mat_bytes(const ds_mat *w) {
    if (w->rows <= 0) return 0;
    uint64_t n = (uint64_t)w->rows * (uint64_t)row_bytes(w);
    if ((w->dtype == DS_F8_E4M3 || w->dtype == DS_I8) && w->block_rows > 0 && w->block_cols > 0) {
        uint64_t rb = (uint64_t)((w->row0 + w->rows - 1) / w->block_rows - w->row0 / w->block_rows +
                                 1); /* scale rows this (possibly sliced) matrix reads */
        uint64_t cb = (uint64_t)((w->cols + w->block_cols - 1) / w->block_cols);
        n += rb * cb * sizeof(float);
    }
    return n;
}

static void check_mat(const ds_mat *w) {
    DS_ASSERT(ds_mat_dtype_ok(w->dtype));
    DS_ASSERT(w->rows >= 0 && w->cols >= 0 && w->data);
    if (w->dtype == DS_F8_E4M3 || w->dtype == DS_I8)
        DS_ASSERT(w->scale && w->block_rows > 0 && w->block_cols > 0);
    if (w->dtype == DS_I8) {
        int64_t bc = w->block_cols < w->cols ? w->block_cols : w->cols;
        DS_ASSERT(bc <= 131072); /* a block's int32 sum: bc * 127 * 128 < 2^31 */
        /* int4 blocks start on a byte: an even group size, or one block per row */
        if (w->int4) DS_ASSERT(w->block_cols % 2 == 0 || w->block_cols >= w->cols);
    }
    if (w->act_n) /* static activations: int8 per output channel, a step per tensor or column */
        DS_ASSERT(w->dtype == DS_I8 && !w->int4 && w->block_cols >= w->cols && w->act_scale &&
                  w->act_zp && (w->act_n == 1 || w->act_n == w->cols));
}

/* Row r of interleaved w (ds_mat.ilv; by fours, r in a whole block) gathered into tmp
 * (row_bytes(w)): from its 64-byte pieces, or from its panel's 4-byte slices (w + 128 there). */
static void ilv_gather(const ds_mat *w, int64_t r, unsigned char *tmp) {
    const size_t rb = row_bytes(w);
    if (w->ilv == DS_ILV_PANELS) {
        const unsigned char *p = (const unsigned char *)w->data + (size_t)(r - r % 16) * rb;
        for (size_t i = 0; i < rb; i++)
            tmp[i] = p[64 * (i / 4) + 4 * (size_t)(r % 16) + i % 4] ^ 0x80;
        return;
    }
    const size_t j = (size_t)r % 4;
    const unsigned char *blk = (const unsigned char *)w->data + (size_t)(r - r % 4) * rb;
    for (size_t s = 0; s < rb / 64; s++) memcpy(tmp + 64 * s, blk + (4 * s + j) * 64, 64);
}

/* Int8 with one scale a row (per output channel), not int4, no static activations: a row is
 * i8_to_f32 of its bytes by its scale. */
static int i8_rowwise(const ds_mat *w) {
    return w->dtype == DS_I8 && w->block_rows == 1 && w->block_cols >= w->cols && !w->int4 &&
           !w->act_n;
}

/* Columns [c0, c0 + n) of row r to f32 with table k. Assumes check_mat(w) passed. */
static void row_part(const ds_kernels *k, const ds_mat *w, int64_t r, int64_t c0, int64_t n,
                     float *dst) {
    const unsigned char *row = (const unsigned char *)w->data + (size_t)r * row_bytes(w);
    unsigned char *tmp = NULL;
    if (w->ilv && r < w->rows / 4 * 4) { /* the row's pieces, one after another */
        tmp = malloc(row_bytes(w));
        DS_ASSERT(tmp);
        ilv_gather(w, r, tmp);
        row = tmp;
    }
    const size_t off = (size_t)c0; /* in elements, from the row's start */
    switch (w->dtype) {
    case DS_F32:
        memcpy(dst, row + off * 4, (size_t)n * 4);
        break;
    case DS_BF16:
        k->bf16_to_f32(dst, (const uint16_t *)(const void *)(row + off * 2), (size_t)n);
        break;
    case DS_F16:
        k->f16_to_f32(dst, (const uint16_t *)(const void *)(row + off * 2), (size_t)n);
        break;
    case DS_F8_E4M3: {
        int64_t n_col_blocks = (w->cols + w->block_cols - 1) / w->block_cols;
        const float *srow = scale_row(w, (size_t)r, (size_t)n_col_blocks);
        for (int64_t c = c0, end = c0 + n; c < end;) {
            int64_t cb = c / w->block_cols;
            int64_t seg_end = (cb + 1) * w->block_cols;
            if (seg_end > end) seg_end = end;
            float s;
            memcpy(&s, srow + cb, sizeof s); /* the scale tensor may sit unaligned in an mmap */
            k->fp8_to_f32(dst + (c - c0), row + off + (size_t)(c - c0), (size_t)(seg_end - c), s);
            c = seg_end;
        }
        break;
    }
    case DS_I8: { /* q * scale, rounded once in f32 (q is exact in f32), block by block */
        if (i8_rowwise(w)) {
            /* per output channel (W8A8): one scale, one call, without the general path's three
             * 64-bit divisions: ds_mat_row_f32 of a 256-column row (the absorptions convert
             * 32768 a step in the medium model) 32 -> 26 ns, one core in a loop */
            float s;
            memcpy(&s, w->scale + w->row0 + r, sizeof s);
            k->i8_to_f32(dst, (const int8_t *)row + c0, (size_t)n, s);
            break;
        }
        int64_t n_col_blocks = (w->cols + w->block_cols - 1) / w->block_cols;
        const float *srow = scale_row(w, (size_t)r, (size_t)n_col_blocks);
        for (int64_t c = c0, end = c0 + n; c < end;) {
            int64_t cb = c / w->block_cols, seg_end = (cb + 1) * w->block_cols;
            if (seg_end > end) seg_end = end;
            float s;
            memcpy(&s, srow + cb, sizeof s);
            float *d = dst + (c - c0);
            if (!w->int4) {
                k->i8_to_f32(d, (const int8_t *)row + c, (size_t)(seg_end - c), s);
                for (int64_t i = 0; w->act_n && i < seg_end - c; i++)
                    d[i] /= w->act_scale[w->act_n == 1 ? 0 : c + i];
            } else {
                int64_t i = c;
                if (i % 2) { /* the kernel starts on a byte: an odd first column alone */
                    *d++ = (float)ds_i4_get(row, (size_t)i) * s;
                    i++;
                }
                if (i < seg_end) k->i4_to_f32(d, row + i / 2, (size_t)(seg_end - i), s);
            }
            c = seg_end;
        }
        break;
    }
    default:
        DS_ASSERT(!"unsupported weight dtype");
    }
    free(tmp);
}

void ds_mat_row_part_f32(const ds_mat *w, int64_t r, int64_t c0, int64_t n, float *dst) {
    check_mat(w);
    DS_ASSERT(r >= 0 && r < w->rows && c0 >= 0 && n >= 0 && c0 + n <= w->cols);
    row_part(ds_kernels_get(), w, r, c0, n, dst);
}

const int8_t *ds_mat_i8_row(const ds_mat *w, int64_t r, float *scale) {
    if (!i8_rowwise(w) || w->ilv) return NULL;
    DS_ASSERT(r >= 0 && r < w->rows && w->data && w->scale);
    memcpy(scale, w->scale + w->row0 + r, sizeof *scale);
    return (const int8_t *)w->data + (size_t)r * (size_t)w->cols;
}

void ds_mat_slice_rows(ds_mat *w, int64_t r0, int64_t r1) {
    DS_ASSERT(r0 >= 0 && r0 <= r1 && r1 <= w->rows);
    DS_ASSERT(w->ilv != DS_ILV_FOURS || (r0 % 4 == 0 && (r1 % 4 == 0 || r1 == w->rows)));
    DS_ASSERT(w->ilv != DS_ILV_PANELS || (r0 % 16 == 0 && r1 % 16 == 0));
    w->data = (const unsigned char *)w->data + (size_t)r0 * row_bytes(w);
    w->row0 += r0;
    w->rows = r1 - r0;
}

void ds_mat_row_f32(const ds_mat *w, int64_t r, float *dst) {
    ds_mat_row_part_f32(w, r, 0, w->cols, dst);
}

static int fused_native(const ds_kernels *k, ds_dtype t);

/* Whether w, int8, can be stored as panels the table's own (SIMD) GEMM reads in place. */
static int panels_ok(const ds_mat *w, const ds_kernels *k) {
    const int64_t bc = w->block_cols;
    return w->dtype == DS_I8 && !w->int4 && w->rows >= 16 && w->rows % 16 == 0 &&
           w->cols % 4 == 0 && (bc >= w->cols || bc % 4 == 0) &&
           k->gemm16x8_i8 != ds_kernels_scalar()->gemm16x8_i8;
}

int ds_mat_interleave(ds_mat *w) {
    check_mat(w);
    const size_t rb = row_bytes(w);
    unsigned char *data = (unsigned char *)(uintptr_t)w->data; /* writable: the caller's promise */
    const ds_kernels *k = ds_kernels_get();
    if (!w->ilv && panels_ok(w, k)) { /* each 16 rows' bytes become their panel */
        unsigned char *blk = malloc(16 * rb);
        DS_ASSERT(blk);
        const int8_t *src[16];
        for (size_t j = 0; j < 16; j++) src[j] = (const int8_t *)blk + j * rb;
        for (size_t p = 0; p < (size_t)w->rows / 16; p++) {
            memcpy(blk, data + 16 * p * rb, 16 * rb);
            k->pack16_i8(data + 16 * p * rb, src, rb, 64);
        }
        free(blk);
        return w->ilv = DS_ILV_PANELS;
    }
    const int bf16 = w->dtype == DS_BF16 && fused_native(k, DS_BF16);
    /* int8 (not int4): every table's dot4_i8 and the GEMM's packing read pieces; a scale block
     * must not end inside one */
    const int i8 =
        w->dtype == DS_I8 && !w->int4 && (w->block_cols >= w->cols || w->block_cols % 64 == 0);
    if (w->ilv || !(bf16 || i8) || rb % 64 || w->rows < 4) return 0;
    unsigned char *block = malloc(4 * rb);
    DS_ASSERT(block);
    for (size_t b = 0; b < (size_t)w->rows / 4; b++) {
        unsigned char *d = data + 4 * b * rb;
        memcpy(block, d, 4 * rb);
        for (size_t s = 0; s < rb / 64; s++)
            for (size_t j = 0; j < 4; j++)
                memcpy(d + (4 * s + j) * 64, block + j * rb + 64 * s, 64);
    }
    free(block);
    return w->ilv = DS_ILV_FOURS;
}

/* ---- the matmul ---- */
/* A token's best row among those seen (argmax_f32's order: a NaN above every number, then the
 * larger value, then the lower row); i = -1 before any row above -inf. */
typedef struct {
    float v;
    int32_t i;
} row_best;

/* Whether value v at a later row than b's replaces it. */
static int beats(float v, row_best b) {
    return b.i < 0 || (!isnan(b.v) && (isnan(v) || v > b.v));
}

typedef struct {
    const ds_kernels *k;
    const ds_mat *w;
    float *y;       /* [n_tok, rows] */
    const float *x; /* [n_tok, cols] */
    int64_t n_tok;
    const int8_t *q;      /* DS_I8: [n_tok, ldq] the quantized activations, zero past cols */
    size_t ldq;           /* DS_I8: cols rounded up to 4 (the GEMM reads whole 4-column groups) */
    const float *sx;      /* DS_I8: [n_tok] their scales */
    const int32_t *xoff;  /* GEMM: [n_tok, blocks]; dot4: [n_tok, n_pieces] (see below) */
    const int8_t *xs;     /* dot4 int4: [n_tok, ldq] q in the split layout (ds_i4_split) */
    size_t n_pieces;      /* dot4: kernel blocks per row (i8_plan), each with its xoff */
    const ds_kernels *k8; /* DS_I8: the table whose dot4_i8 runs (k, or scalar for a -128) */
    const float *xb;      /* DS_BF16 fused: x in ds_bf16_split's layout, [n_tok, ldb] */
    size_t ldb;           /* cols rounded up to 16: every row of xb starts on a cache line */
    int tapered;          /* its slices shrink (slice_range) */
    row_best *best;       /* argmax jobs: [slices][n_tok], each slice's best row so far */
} matmul_ctx;

/* Slice `sub` of `n` of a call's `total` row units (groups of rows) as [lo, hi). A tapered call's
 * slices shrink, each MM_TAPER of the one before (ds_split_tapered): the threads claim the large
 * ones first and finish on small ones, with few slice starts in all (each reads its first rows
 * at memory latency). */
#define MM_TAPER 0.85
static void slice_range(const matmul_ctx *c, size_t total, int sub, int n, size_t *lo, size_t *hi) {
    if (c->tapered)
        ds_split_tapered(total, sub, n, MM_TAPER, lo, hi);
    else
        ds_split_range(total, sub, n, lo, hi);
}

/* Rows [r0, r1) of tokens [t0, t1) are final: the bias is added and, for an argmax job, each
 * token's best row in slice `sub` updated, while the tile is in cache. A pass over the finished
 * y read it back from memory: 64 tokens' logits (129280 each) took ~0.8 ms of a 73 ms step on
 * the Zen 5 VM. A slice's tiles come in row order for every token, so ties keep the lower row. */
static void tile_done(const matmul_ctx *c, int sub, size_t t0, size_t t1, size_t r0, size_t r1) {
    const ds_mat *w = c->w;
    const size_t rows = (size_t)w->rows;
    if (r0 >= r1) return;
    for (size_t t = t0; w->bias && t < t1; t++)
        for (size_t r = r0; r < r1; r++) c->y[t * rows + r] += w->bias[w->row0 + r];
    for (size_t t = t0; c->best && t < t1; t++) {
        const float *yt = c->y + t * rows;
        const int64_t i = c->k->argmax_f32(yt + r0, r1 - r0);
        row_best *b = &c->best[(size_t)sub * (size_t)c->n_tok + t];
        if (i >= 0 && beats(yt[r0 + (size_t)i], *b))
            *b = (row_best){yt[r0 + (size_t)i], (int32_t)(r0 + (size_t)i)};
    }
}

/* Columns per tile. 4 x MM_TILE f32 is 8 KiB of scratch, well inside L1D with the tile of x. A
 * multiple of 128, so DeepSeek's FP8 blocks never straddle a tile (other block sizes still
 * work). The scratch rows are MM_STRIDE floats apart, not MM_TILE: rows exactly 2 KiB apart
 * would map the four loads of each dot4 step to the same L1 sets (4K aliasing). */
#define MM_TILE 512
#define MM_STRIDE (MM_TILE + 16)

/* Asks for the stored bytes of tile (block b, column c0) ahead of time. While the current tile
 * runs through dot4 no load misses, so without this the memory system idles during that phase
 * and the hardware prefetcher, which only follows misses, does not run far enough ahead.
 * It measured 10-40% faster on BF16 / FP8 at n_tok = 1 (a noisy shared VM, so a range); F32,
 * read in place by dot4, is left to the hardware prefetcher: explicit prefetches were slower. */
static void prefetch_tile(const ds_mat *w, size_t b, size_t c0) {
    const size_t cols = (size_t)w->cols, rows = (size_t)w->rows, esz = ds_dtype_size(w->dtype);
    size_t bytes = (cols - c0 < MM_TILE ? cols - c0 : MM_TILE) * esz;
    for (size_t r = 4 * b; r < 4 * b + 4 && r < rows; r++) {
        const char *p = (const char *)w->data + (r * cols + c0) * esz;
        for (size_t o = 0; o < bytes; o += 64) __builtin_prefetch(p + o);
    }
}

static void matmul_thread(void *arg, int thread, int n_threads) {
    const matmul_ctx *c = arg;
    const ds_mat *w = c->w;
    const ds_kernels *k = c->k;
    const size_t cols = (size_t)w->cols, rows = (size_t)w->rows, n_tok = (size_t)c->n_tok;
    _Alignas(64) float scratch[4 * MM_STRIDE]; /* [4, MM_STRIDE], MM_TILE used per row */
    size_t b_lo, b_hi;                         /* in blocks of 4 rows */
    slice_range(c, (rows + 3) / 4, thread, n_threads, &b_lo, &b_hi);

    for (size_t b = b_lo; b < b_hi; b++) {
        size_t r0 = 4 * b, nr = rows - r0 < 4 ? rows - r0 : 4;
        for (size_t c0 = 0; c0 < cols; c0 += MM_TILE) {
            size_t nc = cols - c0 < MM_TILE ? cols - c0 : MM_TILE;
            const float *wr[4];
            for (size_t j = 0; j < nr; j++) {
                if (w->dtype == DS_F32) {
                    wr[j] = (const float *)w->data + (r0 + j) * cols + c0;
                } else {
                    float *dst = scratch + j * MM_STRIDE;
                    row_part(k, w, (int64_t)(r0 + j), (int64_t)c0, (int64_t)nc, dst);
                    wr[j] = dst;
                }
            }
            if (w->dtype != DS_F32) {
                if (c0 + MM_TILE < cols)
                    prefetch_tile(w, b, c0 + MM_TILE);
                else if (b + 1 < b_hi)
                    prefetch_tile(w, b + 1, 0);
            }
            for (size_t t = 0; t < n_tok; t++) {
                const float *xt = c->x + t * cols + c0;
                float *yt = c->y + t * rows + r0;
                float out[4];
                if (nr == 4)
                    k->dot4_f32(xt, wr, nc, out);
                else
                    for (size_t j = 0; j < nr; j++) out[j] = k->dot_f32(xt, wr[j], nc);
                for (size_t j = 0; j < nr; j++) yt[j] = c0 == 0 ? out[j] : yt[j] + out[j];
            }
        }
    }
    tile_done(c, thread, 0, n_tok, 4 * b_lo, 4 * b_hi < rows ? 4 * b_hi : rows);
}

/* ---- the fused path (few tokens) ---- */

/* Few tokens: the int8 path streams its weights (4-row tiles with prefetch) up to this many,
 * and F32 weights run the tiled path up to it, the float GEMM beyond. (Before the float GEMM,
 * the fused kernels were measured against the tiled path: 1.3-1.6x faster at 1..4 tokens, 1.2x
 * at 6 and 8, even at 16; the fused kernels' own limits are MM_FUSED_MAX_TOK_16 / _FP8.) */
#define MM_FUSED_MAX_TOK 8
/* Columns per fused call (rounded to a whole number of FP8 blocks): 4 rows x 1024 BF16 is 8 KiB,
 * so the later token groups re-read the weights from L1; the tile of each x[t]
 * (4 KiB) stays in L1 as well. 512 / 2048 / whole rows measured no better at n_tok = 1, and FP8
 * with one call per 128-column block was ~25% slower (per-call and reduction overhead). */
#define MM_FUSED_CHUNK 1024
/* Software prefetch distance of the fused path, in bytes of the thread's slice of W. While
 * the kernel runs, the hardware prefetcher alone let the miss queue run dry at chunk and block
 * boundaries. Measured against prefetching "the next chunk" (2 threads): equal on 4096- and
 * 7168-column matrices, ~20% faster on 1024-column ones (129280 x 1024, the medium test model's
 * lm_head), where the next block is only 8 KiB ahead. 16..64 KiB were alike; 8 KiB was worse.
 * With several tokens the prefetches of a chunk are issued a share with each token group (BF16:
 * spread over its kernel's steps; each token in the integer path), not in one burst: a burst of 128
 * stalled on the full miss queue, and the weight stream stopped overlapping the arithmetic. BF16
 * 129280 x 1024, 8 tokens, 2 threads: 13.6 - 13.9 -> 9.9 - 11.6 ms alone, 14.0 -> 10.0 ms as the
 * medium model's lm_head. */
#define MM_FUSED_PF_AHEAD (32 * 1024)
/* The prefetch distance for one token against an interleaved BF16 matrix (matmul_fused_thread)
 * or int8 rows of at most MM_I8_CHUNK columns (matmul_i8_rows_thread, whose kernel issues a
 * call's share at once). 32 KiB ahead, the first call of each slice (often a whole expert matrix)
 * asked for ~570 prefetches at once and its own loads queued behind them; BF16 then ran faster on
 * the hardware prefetcher alone (as it did until this), except lm_head. Medium models (matrices
 * interleaved, as loaded), 4 KiB against the old way alternating step by step, medians of 64
 * steps. W8A8 (two runs) at 1 sequence: q_a / kv_a / q_b 0.43 - 0.49 -> 0.40 - 0.45 ms, o_proj
 * 0.40 - 0.47 -> 0.36 - 0.41, the shared expert 0.30 - 0.37 -> 0.27 - 0.32; the step outside
 * lm_head 1 - 12% faster in five runs, whole steps 0.4 - 6%; at 8 sequences (experts of 1 - 2
 * tokens) the experts' gate and up 3.41 - 3.65 -> 3.28 - 3.60; 1, 2 and 8 KiB measured alike, 16
 * KiB between, and no software prefetch at all was 7% slower at 1 sequence. BF16 (seven runs) at
 * 1 sequence: q_a / kv_a / q_b and the shared expert 4 - 8% faster, experts' down 1 - 8%, their
 * gate and up from 4% faster to 9% slower, o_proj from 2% faster to 3% slower, lm_head 0 - 4%
 * faster, steps 1 - 5% faster; at 4 and 8 sequences -3 to +1%; 2 KiB was 3% slower than the
 * hardware alone, 8 KiB between. Alone (weights cold, 2 threads), DeepSeek-R1's int8 shapes:
 * experts' down (7168 x 2048) 55 -> 61 GB/s, q_b (24576 x 1536) 60 -> 66. Rows of 7168 columns
 * (an int8 group of four is 28 KiB) streamed 2 - 7% slower with less than 32 KiB ahead, so wider
 * int8 rows keep it; BF16 2048 x 7168 and 16384 x 7168 measured alike either way. */
#define MM_ONE_PF_AHEAD (4 * 1024)
/* One token against BF16 rows of this many columns up to one chunk: the kernel walks each call's
 * rows one after another (dot4xn_bf16 with pf NULL), so the thread's slice is read as one
 * sequential stream, which the hardware prefetcher follows, instead of four rows side by side
 * with software prefetches. Medium model, the two walks alternating step by step in one process
 * (2-vCPU Zen 5 VM, 48 steps each, medians): lm_head (129280 x 1024) 7.6 -> 6.7 ms a step (BF16
 * model) and 6.9 -> 6.2 (W8A8), whole steps 4% and 9% faster; the BF16 model's 1024-column
 * projections moved within +-4%. The AVX2 table on the same VM: lm_head 8.6 -> 7.8 and 8.1 ->
 * 7.1 ms, steps 6% and 1% faster. Slower: software prefetches on top of the walk, rows of
 * 384 columns, and rows of several chunks walked a chunk of each row at a time (o_proj, 2048
 * columns, 2x). A whole wide row in one call would sum differently from the chunks that more
 * tokens take, and a token's result must not depend on its batch; so rows wider than a chunk
 * (DeepSeek-V3's) keep the side-by-side walk for now. Only row-major matrices walk (`--mmap`):
 * loaded ones are interleaved by fours (ds_mat_interleave), whose four rows side by side are one
 * stream already: medium models, loaded with and without it, alternating processes (three each,
 * medians of 16 steps): BF16 o_proj 0.88 -> 0.79 ms a step at 1 sequence, experts' down 0.95 ->
 * 0.85, at 8 sequences 4.3 -> 3.8; W8A8 experts' gate + up at 8 sequences 4.3 -> 3.9. */
#define MM_BF16_WALK_MIN 1024
/* BF16 against several tokens (matmul_bf16_blocks_thread, bf16_blocks_min): blocks of tokens whose
 * x (n x cols floats) fits MM_FUSED_BF16_X floats, and within each, blocks of rows of about
 * MM_FUSED_ROWS_BYTES of weights, both held in L2 while every group of four tokens passes over
 * the row block. It replaced the float GEMM for BF16 beyond 32 tokens (or beyond this much x),
 * whose sums are in another order: a prompt prefilled beside others got other floats than alone,
 * and greedy outputs of the medium W8A8 model batched by four differed from those alone (the
 * BF16 router and lm_head). Alone, 2 threads, weights cold, ms, against the GEMM: 129280 x 1024
 * at 192 tokens 207 vs 231; 16384 x 2048 at 128 / 512 tokens 41 / 160 vs 38 / 148; 8192 x 7168
 * at 128 / 512 tokens 86 / 332 vs 68 / 292 (each token block re-reads the weights: the price on
 * wide matrices). In the medium BF16 model, alternating with the GEMM step by step, 8 - 192
 * sequences: steps 0 - 5% slower, the VM's noise in the same test without a change is +-4%. */
#define MM_FUSED_BF16_X (128 * 1024)
#define MM_FUSED_ROWS_BYTES (256 * 1024)
/* The row block: MM_FUSED_ROWS_BYTES, or a quarter of a smaller L2. The block and the next one,
 * prefetched while it is computed, are both meant to sit in L2, and in a 512 KiB L2 two 256 KiB
 * blocks pushed each other out. 2-core Zen 3 VM (512 KiB L2), 2 threads, BF16 129280 x 1024
 * (medium lm_head, weights cold), 256 and 128 KiB alternating in one process, medians of 40
 * calls: 8 tokens 49.0 / 47.8 / 49.5 -> 52.1 / 50.9 / 53.2 GMAC/s (three runs), 16 tokens
 * 52.3 -> 55.8, 32 tokens 51.5 -> 54.8; 64 KiB measured as 128. */
static size_t bf16_rows_bytes(void) {
    const size_t l2 = ds_kernels_l2_bytes();
    return l2 && l2 / 4 < MM_FUSED_ROWS_BYTES ? l2 / 4 : MM_FUSED_ROWS_BYTES;
}

/* Tokens from which BF16 runs matmul_bf16_blocks_thread: 5, and for an interleaved matrix under
 * MM_BF16_FUSED_BIG bytes MM_FUSED_MAX_TOK + 1. The fused path keeps the weight stream going with
 * software prefetches while each group of four rows is still in L1 for every token; the blocked
 * one streams a row block with the first group of tokens and reads it from L2 for the rest, which
 * paid at 2 - 4 tokens only while interleaved matrices ran fused on the hardware prefetcher alone
 * (it fell behind the arithmetic of a few tokens). 2 threads, weights cold, medians of 60 calls
 * (ms), blocked vs fused: 4096 x 4096 at 6 / 8 tokens 1.25 / 1.43 vs 1.14 / 1.38, 2048 x 7168
 * 1.05 / 1.24 vs 1.00 / 1.19, 8192 x 1024 at 4 / 8 0.39 / 0.50 vs 0.37 / 0.49. In the medium BF16
 * model, the two alternating step by step (two runs, medians of 32 steps): at 8 sequences q_a /
 * kv_a / q_b 1.26 - 1.28 -> 1.12 - 1.14 ms, o_proj 1.43 - 1.44 -> 1.34 - 1.35, the shared expert
 * 0.91 - 0.94 -> 0.78 - 0.82; at 64 (about 8 tokens an expert) the experts 25.7 - 26.1 -> 25.0.
 * lm_head (129280 x 1024, 265 MB) at 8 tokens was 5% slower fused (8.7 - 9.0 -> 9.1 - 9.5 ms,
 * three W8A8 runs) and 2 - 4% faster at 4, hence the size limit. */
#define MM_BF16_FUSED_BIG ((size_t)64 << 20)
static int64_t bf16_blocks_min(const ds_mat *w) {
    const size_t bytes = (size_t)w->rows * (size_t)w->cols * 2;
    return w->ilv && bytes < MM_BF16_FUSED_BIG ? MM_FUSED_MAX_TOK + 1 : 5;
}

/* Tokens [t, t + nt)'s sums of rows [r0, r0 + nr) over the chunk at column c0 (out[4 u + j])
 * into y: a row's first chunk sets it and the later ones add, so every token sums a row's chunks
 * in the same order whatever the path or its batch. The common case, a whole block's first
 * chunk, is one 16-byte copy per token (the general loop was ~3.5% of a BF16 step at 64
 * sequences). */
static void store_chunk(const matmul_ctx *c, size_t t, size_t nt, size_t r0, size_t nr, size_t c0,
                        const float out[16]) {
    const size_t rows = (size_t)c->w->rows;
    for (size_t u = 0; u < nt; u++) {
        float *yt = c->y + (t + u) * rows + r0;
        if (c0 == 0 && nr == 4)
            memcpy(yt, out + 4 * u, 4 * sizeof(float));
        else
            for (size_t j = 0; j < nr; j++)
                yt[j] = c0 == 0 ? out[4 * u + j] : yt[j] + out[4 * u + j];
    }
}

/* One BF16 kernel call, tokens [t, t + nt) x rows [r0, r0 + nr) x columns [c0, c0 + nc), into y.
 * A tail block repeats row r0 in its missing slots; those sums are dropped. pfp NULL: the kernel
 * walks the rows one after another, without software prefetches (MM_BF16_WALK_MIN). In an
 * interleaved matrix (ds_mat.ilv) a whole block's rows are read side by side as one stream;
 * chunks start at multiples of 32 columns, so at a piece. */
static void bf16_chunk(const matmul_ctx *c, size_t t, size_t nt, size_t r0, size_t nr, size_t c0,
                       size_t nc, const char *pfp, size_t n_pf) {
    const size_t cols = (size_t)c->w->cols;
    const uint16_t *data = c->w->data;
    const float *xs[4] = {NULL, NULL, NULL, NULL};
    const uint16_t *w16[4];
    const int ilv = c->w->ilv && nr == 4;
    for (size_t u = 0; u < nt; u++) xs[u] = c->xb + (t + u) * c->ldb + c0;
    for (size_t j = 0; j < 4; j++)
        w16[j] =
            ilv ? data + r0 * cols + c0 * 4 + 32 * j : data + (r0 + (j < nr ? j : 0)) * cols + c0;
    float out[16];
    c->k->dot4xn_bf16(xs, (int)nt, w16, nc, ilv ? 128 : 32, pfp, n_pf, out);
    store_chunk(c, t, nt, r0, nr, c0, out);
}

/* Tokens of the next BF16 kernel call when `left` remain: fours, then a pair, a single. */
static size_t group_tokens(size_t left) {
    return left >= 4 ? 4 : left >= 2 ? 2 : 1;
}

/* Byte offset into BF16 matrix w where its block b of 4 rows ends. */
static size_t rows_end(const ds_mat *w, size_t b) {
    const size_t rows = (size_t)w->rows;
    return (4 * b < rows ? 4 * b : rows) * (size_t)w->cols * 2;
}

/* BF16 from bf16_blocks_min tokens on: the calls of matmul_fused_thread (four rows x a chunk x a
 * group of tokens, the chunks of a row in order), so each token's sums are those it gets alone,
 * in another order of calls: token blocks, row blocks, token groups, rows, chunks. Each weight
 * comes from memory once per token block and from L2 for the block's other token groups, and a
 * token group's x from L2. While a row block is computed, every call prefetches a share of the
 * next one into L2, so the weights stream during the arithmetic (the slice's first block is
 * streamed in by its first token group, as the fused path does). When only the first token group
 * streamed its block and the others ran from L2 without prefetching, memory idled through those
 * and the two alternated: medium models, 2-vCPU Zen 5 VM, the two alternating step by step in
 * one process (32 steps, medians), lm_head at 8 tokens 9.0 -> 7.7 ms (BF16 model) and 9.9 -> 8.0
 * (W8A8), at 32 tokens 28.7 -> 27.0 and 29.4 -> 27.4, at 192 tokens (W8A8) 172 -> 157; whole
 * steps at 8 sequences 7% and 9% faster. */
static void matmul_bf16_blocks_thread(void *arg, int thread, int n_threads) {
    const matmul_ctx *c = arg;
    const ds_mat *w = c->w;
    const size_t cols = (size_t)w->cols, rows = (size_t)w->rows, n_tok = (size_t)c->n_tok;
    const size_t chunk = cols < MM_FUSED_CHUNK ? cols : MM_FUSED_CHUNK;
    const size_t n_chunks = (cols + chunk - 1) / chunk;
    size_t b_lo, b_hi; /* in blocks of 4 rows */
    slice_range(c, (rows + 3) / 4, thread, n_threads, &b_lo, &b_hi);
    size_t tblk = MM_FUSED_BF16_X / c->ldb / 4 * 4, rblk = bf16_rows_bytes() / (8 * cols);
    if (tblk < 4) tblk = 4;
    if (rblk < 1) rblk = 1;
    const uint16_t *data = w->data;
    for (size_t t_lo = 0; t_lo < n_tok; t_lo += tblk) {
        const size_t t_hi = n_tok - t_lo < tblk ? n_tok : t_lo + tblk;
        size_t groups = 0; /* token groups of this token block: fours, then a pair, a single */
        for (size_t t = t_lo; t < t_hi; groups++) t += group_tokens(t_hi - t);
        size_t pf = 4 * b_lo * cols * 2; /* prefetch cursor: byte offset into W */
        for (size_t b0 = b_lo; b0 < b_hi; b0 += rblk) {
            const size_t b1 = b_hi - b0 < rblk ? b_hi : b0 + rblk;
            const size_t b2 = b_hi - b1 < rblk ? b_hi : b1 + rblk;
            const size_t end1 = rows_end(w, b1), end2 = rows_end(w, b2);
            /* the calls over which the next row block is prefetched: all of this block's, or
             * in the slice's first block, those after the first token group, which streams that
             * block in (a lone token has nothing to stream it for) */
            const size_t g0 = b0 == b_lo && groups > 1,
                         calls = (groups - g0) * (b1 - b0) * n_chunks;
            size_t g = 0, call = 0;
            for (size_t t = t_lo, nt; t < t_hi; t += nt, g++) {
                nt = group_tokens(t_hi - t);
                for (size_t b = b0; b < b1; b++) {
                    const size_t r0 = 4 * b, nr = rows - r0 < 4 ? rows - r0 : 4;
                    for (size_t c0 = 0; c0 < cols; c0 += chunk) {
                        const size_t nc = cols - c0 < chunk ? cols - c0 : chunk;
                        size_t target;
                        if (g < g0) { /* the slice's first block: streamed in ahead of use */
                            target = (r0 * cols + 4 * (c0 + nc)) * 2 + MM_FUSED_PF_AHEAD;
                            if (target > end1) target = end1;
                        } else { /* the next block, a share with each call, while this one
                                    is computed from L2 */
                            target = end1 + (end2 - end1) * ++call / calls;
                        }
                        const size_t n_pf = target > pf ? (target - pf + 63) / 64 : 0;
                        const char *pfp = (const char *)data + pf; /* never NULL: no rows walk */
                        pf += 64 * n_pf;
                        bf16_chunk(c, t, nt, r0, nr, c0, nc, pfp, n_pf);
                    }
                }
            }
            tile_done(c, thread, t_lo, t_hi, 4 * b0, 4 * b1 < rows ? 4 * b1 : rows);
        }
    }
}

/* Whether table k has its own fused kernels for this dtype. The scalar fallbacks that complete a
 * partial SIMD table (NEON today) would be far slower than that table's conversion + dot4 tiles,
 * so such a table keeps the tiled path. The scalar table itself may run either; fused is used. */
static int fused_native(const ds_kernels *k, ds_dtype t) {
    const ds_kernels *s = ds_kernels_scalar();
    if (strcmp(k->name, s->name) == 0) return 1;
    switch (t) {
    case DS_BF16:
        return k->dot4xn_bf16 != s->dot4xn_bf16;
    case DS_F16:
        return k->dot4_f16 != s->dot4_f16 && k->dot4x2_f16 != s->dot4x2_f16;
    case DS_F8_E4M3:
        return k->dot4_fp8 != s->dot4_fp8 && k->dot4x2_fp8 != s->dot4x2_fp8;
    default:
        return 0;
    }
}

/* One fused call of F16 / FP8: the partial sums of columns [c0, c0 + nc) of the four rows wp
 * (stored bytes, already offset to c0) for tokens t (and t + 1 when pair), into out[0..3] (and
 * out[4..7]). */
static void fused_call(const ds_kernels *k, ds_dtype dt, const float *x0, const float *x1,
                       const unsigned char *const wp[4], const float *const sp[4], size_t nc,
                       size_t bc, float out[8]) {
    const uint16_t *w16[4];
    const uint8_t *w8[4];
    for (int j = 0; j < 4; j++) {
        w16[j] = (const uint16_t *)(const void *)wp[j]; /* kernels accept unaligned pointers */
        w8[j] = wp[j];
    }
    switch (dt) {
    case DS_F16:
        if (x1)
            k->dot4x2_f16(x0, x1, w16, nc, out);
        else
            k->dot4_f16(x0, w16, nc, out);
        break;
    default: /* DS_F8_E4M3 */
        if (x1)
            k->dot4x2_fp8(x0, x1, w8, sp, nc, bc, out);
        else
            k->dot4_fp8(x0, w8, sp, nc, bc, out);
        break;
    }
}

static void matmul_fused_thread(void *arg, int thread, int n_threads) {
    const matmul_ctx *c = arg;
    const ds_mat *w = c->w;
    const ds_kernels *k = c->k;
    const size_t cols = (size_t)w->cols, rows = (size_t)w->rows, n_tok = (size_t)c->n_tok;
    const size_t esz = ds_dtype_size(w->dtype);
    size_t chunk = MM_FUSED_CHUNK, bc = 0, n_col_blocks = 0;
    if (w->dtype == DS_F8_E4M3) { /* chunks of whole scale blocks: the kernel starts a block at 0 */
        bc = (size_t)w->block_cols;
        n_col_blocks = (cols + bc - 1) / bc;
        chunk = chunk < bc ? bc : chunk / bc * bc;
    }
    /* BF16, one token, each row one chunk: rows walked one after another (MM_BF16_WALK_MIN) */
    const int walk = c->xb && !w->ilv && n_tok == 1 && cols >= MM_BF16_WALK_MIN && cols <= chunk;
    /* the walk is one stream, which the hardware prefetcher follows alone; the others prefetch
     * `ahead` bytes ahead, MM_ONE_PF_AHEAD for one token against an interleaved matrix */
    const size_t ahead = w->ilv && n_tok == 1 ? MM_ONE_PF_AHEAD : MM_FUSED_PF_AHEAD;
    if (chunk > cols) chunk = cols;
    size_t b_lo, b_hi; /* in blocks of 4 rows */
    slice_range(c, (rows + 3) / 4, thread, n_threads, &b_lo, &b_hi);

    /* byte offsets into W: this thread's slice is [4 b_lo cols esz, end); prefetched up to pf */
    size_t pf = 4 * b_lo * cols * esz, end = (4 * b_hi < rows ? 4 * b_hi : rows) * cols * esz;
    for (size_t b = b_lo; b < b_hi; b++) {
        size_t r0 = 4 * b, nr = rows - r0 < 4 ? rows - r0 : 4;
        size_t rr[4]; /* a tail block repeats row r0 in the missing slots; those sums are dropped */
        for (size_t j = 0; j < 4; j++) rr[j] = r0 + (j < nr ? j : 0);
        for (size_t c0 = 0; c0 < cols; c0 += chunk) {
            size_t nc = cols - c0 < chunk ? cols - c0 : chunk;
            /* the thread's rows are one contiguous byte range, walked block by block: keep the
             * prefetches `ahead` bytes ahead of the end of this chunk's share of it */
            size_t target = (r0 * cols + 4 * (c0 + nc)) * esz + ahead;
            if (target > end) target = end;
            if (target < pf) target = pf;
            const size_t pf0 = pf;
            const unsigned char *wp[4];
            const float *sp[4] = {NULL, NULL, NULL, NULL};
            for (size_t j = 0; j < 4; j++) {
                wp[j] = (const unsigned char *)w->data + (rr[j] * cols + c0) * esz;
                if (bc) sp[j] = scale_row(w, rr[j], n_col_blocks) + c0 / bc;
            }
            /* each weight decoded once per group of tokens: BF16 fours (then a pair, a single),
             * the others pairs; each group issues its tokens' share of the prefetches (a burst
             * of them all stalls on the miss queue), BF16's kernel spread over its steps */
            for (size_t t = 0, nt; t < n_tok; t += nt) {
                const size_t left = n_tok - t;
                nt = left >= 4 && c->xb ? 4 : left >= 2 ? 2 : 1;
                const size_t pt = pf0 + (target - pf0) * (t + nt) / n_tok;
                const size_t n_pf = pt > pf ? (pt - pf + 63) / 64 : 0;
                const char *pfp = (const char *)w->data + pf;
                pf += 64 * n_pf;
                if (c->xb) {
                    bf16_chunk(c, t, nt, r0, nr, c0, nc, walk ? NULL : pfp, walk ? 0 : n_pf);
                    continue;
                }
                for (size_t l = 0; l < n_pf; l++) __builtin_prefetch(pfp + 64 * l);
                const float *x0 = c->x + t * cols + c0, *x1 = nt == 2 ? x0 + cols : NULL;
                float out[16];
                fused_call(k, w->dtype, x0, x1, wp, sp, nc, bc, out);
                store_chunk(c, t, nt, r0, nr, c0, out);
            }
        }
    }
    tile_done(c, thread, 0, n_tok, 4 * b_lo, 4 * b_hi < rows ? 4 * b_hi : rows);
}

/* ---- the integer path (DS_I8: W8A8, W4A8) ----
 *
 * ds_matmul quantizes every token's activations once per call (ds_quantize_row_i8, into a heap
 * scratch [n_tok, cols rounded up to 4] owned by the call), then each thread walks its rows four at
 * a time through dot4_i8 (up to four tokens a call; AVX-512 loads each weight once for them) /
 * dot4_i4 (one token), which return exact int32 sums per scale block. The call also makes each
 * token's block sums once (the offset of the unsigned weights, or of int4's unsigned nibbles) and,
 * for int4, lays its activations out in the split order the nibbles need (ds_i4_split): done per
 * row group inside the kernel, that work cost about as much as the weights' own. The sums become
 * f32 per row as acc += scale(r, block) * (float)isum, blocks in column order, in four named
 * accumulators (an array here lived in memory, and its store-to-load chain per block cost more
 * than the int4 kernel), and s_x[t], common to every block, multiplies y once per row at the end
 * (at once when one kernel call covers the row).
 * Kernel calls cover MM_I8_CHUNK columns (whole blocks when blocks are smaller; a block larger
 * than a chunk, e.g. per-channel W8A8 whose one block is the whole row, is summed in int32 over
 * its chunks before the conversion), so the four weight rows of a chunk stay in L1 while every
 * token of the batch passes over them.
 *
 * This path runs below MM_GEMM_MIN_TOK_I8 / _I4 tokens, and for any count on tables without GEMM
 * kernels or with blocks that are not whole 4-column groups (the GEMM path below covers the rest).
 * Decode (n_tok <= MM_FUSED_MAX_TOK): a tile is 4 rows; the weights stream once through the
 * thread's contiguous slice with software prefetch MM_FUSED_PF_AHEAD bytes ahead, as in the
 * fused path. Prefill (more tokens): a tile is MM_I8_TILE_ROWS rows x MM_I8_CHUNK columns
 * (64 KiB of int8 weights: L2) and all tokens pass over it before the next chunk, so each weight
 * is loaded from memory once and from cache n_tok times, and each token's chunk of x (2 KiB)
 * serves MM_I8_TILE_ROWS rows from L1. As everywhere, a row's arithmetic does not depend on the
 * thread count.
 *
 * At n_tok = 1 a block wider than a chunk (per-channel W8A8) is summed by one kernel call over
 * the whole block (up to MM_I8_DECODE_BLOCK_MAX columns, where int32 cannot overflow), so no
 * int32 partials are stored and re-added per chunk; with more tokens the 2048-column chunks stay
 * (their weights are reused from L1 by every token). Figures: docs/benchmarks.md. */
#define MM_I8_CHUNK 2048
#define MM_I8_TILE_ROWS 32
/* Decode: a block wider than a chunk (per-channel W8A8) is summed by one kernel call over the
 * whole block, up to this many columns (block * 127 * 128 stays < 2^31), so no int32 partials
 * are stored and re-added per chunk. */
#define MM_I8_DECODE_BLOCK_MAX 131072

/* How a call cuts the columns: kernel calls over chunks of `seg` columns (whole blocks), or, when
 * a block spans several chunks (`big`), over pieces of one block; a kernel sums blocks of
 * `kblock` columns from the start of its call. */
typedef struct {
    size_t bc;     /* effective block width (per-channel: the whole row) */
    size_t seg;    /* columns per kernel call (at most) */
    size_t kblock; /* the kernel's block argument */
    int big;       /* blocks span several calls */
    int decode;    /* few tokens: 4-row tiles streamed with prefetch */
} i8_plan;

static i8_plan i8_plan_for(const ds_mat *w, size_t n_tok) {
    const size_t cols = (size_t)w->cols, bco = (size_t)w->block_cols;
    i8_plan p;
    p.bc = bco < cols ? bco : cols;
    p.decode = n_tok <= MM_FUSED_MAX_TOK;
    const size_t chunk =
        p.decode && n_tok == 1 && p.bc > MM_I8_CHUNK && p.bc <= MM_I8_DECODE_BLOCK_MAX
            ? p.bc
            : MM_I8_CHUNK;
    p.big = p.bc > chunk;
    p.seg = p.big ? chunk : chunk / p.bc * p.bc;
    p.kblock = p.big ? chunk : p.bc;
    return p;
}

/* Columns of the kernel call starting at c0 (the calls walk the row in order). */
static size_t i8_call_cols(const ds_mat *w, const i8_plan *p, size_t c0) {
    const size_t cols = (size_t)w->cols, bco = (size_t)w->block_cols;
    size_t nc = cols - c0 < p->seg ? cols - c0 : p->seg;
    if (p->big) { /* stop at the end of the block holding c0 */
        size_t bend = (c0 / bco + 1) * bco;
        if (bend > cols) bend = cols;
        if (c0 + nc > bend) nc = bend - c0;
    }
    return nc;
}

static void matmul_i8_thread(void *arg, int thread, int n_threads) {
    const matmul_ctx *c = arg;
    const ds_mat *w = c->w;
    const ds_kernels *k = c->k;
    const size_t cols = (size_t)w->cols, rows = (size_t)w->rows, n_tok = (size_t)c->n_tok;
    const size_t rowb = row_bytes(w), bco = (size_t)w->block_cols;
    const size_t ncb = (cols + bco - 1) / bco; /* scale columns */
    const i8_plan pl = i8_plan_for(w, n_tok);
    const int decode = pl.decode, big = pl.big;
    const size_t seg = pl.seg, kblock = pl.kblock;
    const size_t gpt = decode ? 1 : MM_I8_TILE_ROWS / 4; /* groups per tile */
    size_t g_lo, g_hi;                                   /* in groups of 4 rows */
    slice_range(c, (rows + 3) / 4, thread, n_threads, &g_lo, &g_hi);
    if (g_lo >= g_hi) return;
    const size_t r_lo = 4 * g_lo, r_hi = 4 * g_hi < rows ? 4 * g_hi : rows;
    /* one kernel call per row: y is written once, already times the activation scale (as
     * 0 + a, then times sx, would round); else the calls add into y, scaled at the end */
    const int one_call = i8_call_cols(w, &pl, 0) == cols;
    for (size_t t = 0; t < n_tok && !one_call; t++)
        memset(c->y + t * rows + r_lo, 0, (r_hi - r_lo) * sizeof(float));
    const size_t tx = w->int4 ? 1 : 4; /* tokens per kernel call */
    const size_t n_isum = (seg / kblock + 1) * 4 * tx, n_part = big ? n_tok * gpt * 4 : 0;
    int32_t *isum = ds_thread_scratch(DS_SCRATCH_TASK, (n_isum + n_part) * sizeof(int32_t));
    DS_ASSERT(isum);
    int32_t *part = big ? isum + n_isum : NULL; /* [n_tok, tile rows] after isum [blocks][tx][4] */
    if (big) memset(part, 0, n_part * sizeof(int32_t));
    const unsigned char *data = w->data;
    size_t pf = r_lo * rowb, end = r_hi * rowb; /* prefetch cursor (decode), byte offsets */

    for (size_t g0 = g_lo; g0 < g_hi; g0 += gpt) {
        size_t gn = g_hi - g0 < gpt ? g_hi - g0 : gpt;
        for (size_t c0 = 0, piece0 = 0; c0 < cols;) {
            const size_t nc = i8_call_cols(w, &pl, c0);
            size_t bend = (c0 / bco + 1) * bco; /* end of the block holding c0 (big) */
            if (bend > cols) bend = cols;
            const size_t cbase = c0 / bco;      /* scale column of the chunk's first block */
            size_t cb0 = w->int4 ? c0 / 2 : c0; /* byte offset of c0 in a row */
            /* decode: keep the prefetches ahead of this chunk's bytes, a share per token (as in
             * the fused path) */
            const size_t pf0 = pf;
            size_t target = pf;
            if (gpt == 1) {
                target =
                    4 * g0 * rowb + 4 * (w->int4 ? (c0 + nc + 1) / 2 : c0 + nc) + MM_FUSED_PF_AHEAD;
                if (target > end) target = end;
                if (target < pf0) target = pf0;
            }
            const size_t nb = (nc + kblock - 1) / kblock;
            for (size_t t0 = 0; t0 < n_tok; t0 += tx) {
                const size_t nx = n_tok - t0 < tx ? n_tok - t0 : tx;
                /* this call's share of the prefetches, which the kernel issues */
                const size_t pt = pf0 + (target - pf0) * (t0 + nx) / n_tok;
                const char *pfp = (const char *)data + pf;
                size_t n_pf = pt > pf ? (pt - pf + 63) / 64 : 0;
                pf += 64 * n_pf;
                for (size_t gi = 0; gi < gn; gi++, n_pf = 0) {
                    size_t r0 = 4 * (g0 + gi), nr = rows - r0 < 4 ? rows - r0 : 4;
                    const unsigned char *wp[4];
                    const float *srow[4]; /* the scale row of each row, at this chunk */
                    const int ilv = w->ilv && nr == 4; /* a block of 64-byte pieces */
                    for (size_t j = 0; j < 4; j++) {   /* a tail group repeats row r0; dropped */
                        size_t r = r0 + (j < nr ? j : 0);
                        wp[j] = ilv ? data + r0 * rowb + 4 * cb0 + 64 * j : data + r * rowb + cb0;
                        srow[j] = scale_row(w, r, ncb) + cbase;
                    }
                    if (w->int4) { /* one token */
                        const uint8_t *const w4[4] = {wp[0], wp[1], wp[2], wp[3]};
                        for (; n_pf; n_pf--, pfp += 64) __builtin_prefetch(pfp);
                        k->dot4_i4(c->xs + t0 * c->ldq + c0, c->xoff + t0 * c->n_pieces + piece0,
                                   w4, nc, kblock, isum);
                    } else {
                        const int8_t *const w8[4] = {(const int8_t *)wp[0], (const int8_t *)wp[1],
                                                     (const int8_t *)wp[2], (const int8_t *)wp[3]};
                        const int8_t *xq[4];
                        const int32_t *xo[4];
                        for (size_t j = 0; j < 4; j++) { /* past nx: token t0 again, unread */
                            const size_t t = t0 + (j < nx ? j : 0);
                            xq[j] = c->q + t * c->ldq + c0;
                            xo[j] = c->xoff + t * c->n_pieces + piece0;
                        }
                        c->k8->dot4_i8(xq, xo, (int)nx, w8, nc, kblock, ilv ? 256 : 64, pfp, n_pf,
                                       isum);
                    }
                    for (size_t j = 0; j < nx; j++) {
                        const size_t t = t0 + j;
                        float *yr = c->y + t * rows + r0;
                        if (big) { /* one kernel block: isum[4 j + r] */
                            int32_t *pp = part + (t * gpt + gi) * 4;
                            for (size_t r = 0; r < nr; r++) pp[r] += isum[4 * j + r];
                            if (c0 + nc < bend) continue; /* the block goes on */
                            for (size_t r = 0; r < nr; r++) {
                                float sw;
                                memcpy(&sw, srow[r], sizeof sw);
                                yr[r] += sw * (float)pp[r];
                                pp[r] = 0;
                            }
                            continue;
                        }
                        /* four named accumulators: an array here lived in memory, and its
                         * store-to-load chain per block cost more than the int4 kernel itself */
                        float a0 = 0, a1 = 0, a2 = 0, a3 = 0;
                        for (size_t b = 0; b < nb; b++) { /* scale columns cbase + b, in order */
                            const int32_t *is = isum + 4 * (nx * b + j);
                            float s0, s1, s2, s3;
                            memcpy(&s0, srow[0] + b, sizeof s0);
                            memcpy(&s1, srow[1] + b, sizeof s1);
                            memcpy(&s2, srow[2] + b, sizeof s2);
                            memcpy(&s3, srow[3] + b, sizeof s3);
                            a0 += s0 * (float)is[0];
                            a1 += s1 * (float)is[1];
                            a2 += s2 * (float)is[2];
                            a3 += s3 * (float)is[3];
                        }
                        const float acc[4] = {a0, a1, a2, a3};
                        if (one_call)
                            for (size_t r = 0; r < nr; r++) yr[r] = acc[r] * c->sx[t];
                        else
                            for (size_t r = 0; r < nr; r++) yr[r] += acc[r];
                    }
                }
            }
            c0 += nc;
            piece0 += nb;
        }
        /* the activation scale, common to every block of a row, applied once */
        size_t g_r0 = 4 * g0, g_r1 = 4 * (g0 + gn) < rows ? 4 * (g0 + gn) : rows;
        for (size_t t = 0; t < n_tok && !one_call; t++)
            for (size_t r = g_r0; r < g_r1; r++) c->y[t * rows + r] *= c->sx[t];
    }
    tile_done(c, thread, 0, n_tok, r_lo, r_hi);
}

/* The decode path's common case, per-channel int8 rows that one kernel call covers: the
 * arithmetic of matmul_i8_thread, y = (scale_r * isum) * s_x, without its per-group chunk, block
 * and scale-row bookkeeping (several 64-bit divisions a 4-row group). 3072 x 384 (q_b), one token,
 * one thread, in cache: 58 -> 35 us a call, against 20 for the kernel calls alone. Medium W8A8,
 * the two drivers alternating step by step (2-vCPU Zen 5 VM, 48 steps each, medians): q_b
 * 0.60 -> 0.34 ms a step, experts' down 0.75 -> 0.64, the step 2.6% faster at 1 sequence and 4%
 * at 4 and 8. */
static void matmul_i8_rows_thread(void *arg, int thread, int n_threads) {
    const matmul_ctx *c = arg;
    const ds_mat *w = c->w;
    const size_t cols = (size_t)w->cols, rows = (size_t)w->rows, n_tok = (size_t)c->n_tok;
    const int8_t *data = (const int8_t *)w->data;
    const float *scale = w->scale + w->row0;
    size_t g_lo, g_hi; /* in groups of 4 rows */
    slice_range(c, (rows + 3) / 4, thread, n_threads, &g_lo, &g_hi);
    const size_t end = (4 * g_hi < rows ? 4 * g_hi : rows) * cols;
    size_t pf = 4 * g_lo * cols; /* prefetch cursor, as in matmul_i8_thread */
    const size_t ahead = n_tok == 1 && cols <= MM_I8_CHUNK ? MM_ONE_PF_AHEAD : MM_FUSED_PF_AHEAD;
    for (size_t g = g_lo; g < g_hi; g++) {
        const size_t r0 = 4 * g, nr = rows - r0 < 4 ? rows - r0 : 4;
        const int8_t *w8[4];
        const int ilv = w->ilv && nr == 4; /* a block of 64-byte pieces */
        for (size_t j = 0; j < 4; j++)
            w8[j] = ilv ? data + r0 * cols + 64 * j : data + (r0 + (j < nr ? j : 0)) * cols;
        size_t target = (r0 + 4) * cols + ahead;
        if (target > end) target = end;
        if (target < pf) target = pf;
        const size_t pf0 = pf;
        for (size_t t0 = 0, nx; t0 < n_tok; t0 += nx) {
            nx = n_tok - t0 < 4 ? n_tok - t0 : 4;
            const size_t pt = n_tok == 1 ? target : pf0 + (target - pf0) * (t0 + nx) / n_tok;
            const size_t n_pf = pt > pf ? (pt - pf + 63) / 64 : 0;
            const char *pfp = (const char *)data + pf;
            pf += 64 * n_pf;
            const int8_t *xq[4];
            const int32_t *xo[4];
            for (size_t j = 0; j < 4; j++) { /* past nx: token t0 again, unread */
                const size_t t = t0 + (j < nx ? j : 0);
                xq[j] = c->q + t * c->ldq;
                xo[j] = c->xoff + t;
            }
            int32_t isum[16];
            c->k8->dot4_i8(xq, xo, (int)nx, w8, cols, cols, ilv ? 256 : 64, pfp, n_pf, isum);
            for (size_t j = 0; j < nx; j++) {
                float *yr = c->y + (t0 + j) * rows + r0;
                const float sx = c->sx[t0 + j];
                for (size_t r = 0; r < nr; r++) yr[r] = scale[r0 + r] * (float)isum[4 * j + r] * sx;
            }
        }
    }
    tile_done(c, thread, 0, n_tok, 4 * g_lo, 4 * g_hi < rows ? 4 * g_hi : rows);
}

/* ---- the float GEMM path (F32 weights beyond MM_FUSED_MAX_TOK tokens, F16 / FP8 beyond the fused
 * kernels' limits below; BF16 stays fused, see matmul_bf16_blocks_thread)
 *
 * The tiled path's dot4 keeps one row x token dot per register and reduces it per tile; here, as
 * in the int8 GEMM below, sixteen rows share a register: each thread takes whole 16-row panels,
 * converts MM_FGEMM_K columns of them to f32 (row_part, exactly the tiled path's conversion:
 * fp8 x scale rounded once), transposes them into a panel [column][16 rows], and every eight
 * tokens pass over it with one FMA per column and token (gemm16x8_f32): 8 FMAs
 * per 64-byte load instead of dot4's 4 FMAs per 4 loads. Partial sums of the column chunks add
 * into y in order. Tables without this kernel (NEON) keep the tiled path. On a 2-core AMD Zen 3
 * VM (AVX2), 4096 x 4096, best of 5 calls, the tiled path against this one: FP8 27.2 -> 19.2 ms
 * at 64 tokens and 117 -> 67 at 256, F16 26.9 -> 21.5 and 110 -> 66, F32 31.9 -> 16.4 and 134
 * -> 68. */
#define MM_FGEMM_K 1024
/* Up to these token counts the fused kernels beat the float GEMM, or tie with it, whose packing
 * (conversion to f32 and transposition) is paid per panel. Measured on the 2-vCPU Zen 5 VM,
 * 2 threads, fused vs GEMM ms (F16's limit is the one measured for BF16 when it still took the
 * GEMM: 129280 x 1024 at 16 / 24 / 32 tokens 20.7 / 28.9 / 32.1 vs 22.4 / 26.9 / 36.7); FP8 (its
 * fused kernel decodes e4m3 per token pair) 16384 x 4096 at 16 / 24 / 32 tokens 14.6 / 21.7 / 27.4
 * vs 14.8 / 18.7 / 23.3. */
#define MM_FUSED_MAX_TOK_16 32
#define MM_FUSED_MAX_TOK_FP8 16

static void matmul_fgemm_thread(void *arg, int thread, int n_threads) {
    const matmul_ctx *c = arg;
    const ds_mat *w = c->w;
    const ds_kernels *k = c->k;
    const size_t cols = (size_t)w->cols, rows = (size_t)w->rows, n_tok = (size_t)c->n_tok;
    size_t p_lo, p_hi;
    slice_range(c, (rows + 15) / 16, thread, n_threads, &p_lo, &p_hi);
    if (p_lo >= p_hi) return;
    /* the panel [MM_FGEMM_K][16], then [16][MM_FGEMM_K]: the rows converted to f32 first, but
     * F32 packed in place */
    const int scratch = w->dtype != DS_F32;
    float *pan = ds_thread_scratch(DS_SCRATCH_TASK, 2 * 16 * MM_FGEMM_K * sizeof(float));
    DS_ASSERT(pan);
    float *rowbuf = scratch ? pan + 16 * MM_FGEMM_K : NULL;
    for (size_t p = p_lo; p < p_hi; p++) {
        const size_t r0 = 16 * p, nr = rows - r0 < 16 ? rows - r0 : 16;
        for (size_t k0 = 0; k0 < cols; k0 += MM_FGEMM_K) {
            const size_t nc = cols - k0 < MM_FGEMM_K ? cols - k0 : MM_FGEMM_K;
            const float *rp[16];
            for (size_t j = 0; j < 16; j++) {
                size_t r = r0 + (j < nr ? j : 0);
                if (w->dtype == DS_F32) {
                    rp[j] = (const float *)w->data + r * cols + k0;
                } else if (j < nr) {
                    row_part(k, w, (int64_t)r, (int64_t)k0, (int64_t)nc, rowbuf + j * MM_FGEMM_K);
                    rp[j] = rowbuf + j * MM_FGEMM_K;
                } else {
                    rp[j] = rp[0];
                }
            }
            k->pack16_f32(pan, rp, nc);
            /* the next chunk's stored bytes (this panel's next columns, or the next panel's
             * first) fetched while the tokens run over this one, a share of its rows before each
             * pass: issued at once they filled the miss queue and stalled (perf, 129280 x 1024
             * at 64 tokens: this function's own time 16% -> 6% of the GEMM kernel's) */
            const char *next = NULL;
            size_t next_rows = 0, next_bytes = 0;
            const size_t esz = ds_dtype_size(w->dtype);
            if (w->dtype != DS_F32) {
                size_t nk = k0 + MM_FGEMM_K < cols ? k0 + MM_FGEMM_K : 0, np = nk ? p : p + 1;
                if (np < p_hi) {
                    next = (const char *)w->data + (16 * np * cols + nk) * esz;
                    next_rows = rows - 16 * np < 16 ? rows - 16 * np : 16;
                    next_bytes = (cols - nk < MM_FGEMM_K ? cols - nk : MM_FGEMM_K) * esz;
                }
            }
            const size_t passes = (n_tok + 7) / 8;
            for (size_t t0 = 0, pass = 0; t0 < n_tok; t0 += 8, pass++) {
                for (size_t r = next_rows * pass / passes; r < next_rows * (pass + 1) / passes; r++)
                    for (size_t o = 0; o < next_bytes; o += 64)
                        __builtin_prefetch(next + r * cols * esz + o);
                const size_t nt = n_tok - t0 < 8 ? n_tok - t0 : 8;
                const float *xs[8];
                for (size_t j = 0; j < 8; j++) xs[j] = c->x + (t0 + (j < nt ? j : 0)) * cols + k0;
                float out[128];
                k->gemm16x8_f32(pan, nc, xs, out);
                for (size_t j = 0; j < nt; j++) {
                    float *yr = c->y + (t0 + j) * rows + r0;
                    if (k0)
                        for (size_t r = 0; r < nr; r++) yr[r] += out[16 * j + r];
                    else
                        memcpy(yr, out + 16 * j, nr * sizeof(float));
                }
            }
        }
    }
    tile_done(c, thread, 0, n_tok, 16 * p_lo, 16 * p_hi < rows ? 16 * p_hi : rows);
}

/* ---- the GEMM path (DS_I8 in panels, or from MM_GEMM_MIN_TOK_I8 / _I4 tokens on) ----
 *
 * Prefill and batched decode multiply many tokens by the same weights, so the work is compute
 * bound and the layout of the products matters more than the bytes. The dot4 kernels keep one
 * row x token dot per register and must reduce its 16 lanes at every block end; here sixteen
 * rows are packed once into a panel (pack16_*: [4-column group][16 rows][4 bytes], unsigned
 * w + off) so that a lane is a row: one 64-byte panel load and one VNNI step per token add four
 * columns of 16 rows, eight tokens per pass (gemm16x8_i8), and a block end costs one convert and
 * one FMA per 16 outputs instead of a horizontal reduction. Eight tokens take two panels a call
 * (gemm32x8_i8) where two are left: each broadcast then feeds 32 rows, and a call's fixed cost
 * (~38 ns; a call of q_b's 384 columns spent a fifth of its time outside the column loop, alone
 * on one core) covers twice the work. int4 weights are widened to bytes while packing, so W4A8
 * prefill runs the same inner loop as W8A8 and pays its unpacking once per weight, not once per
 * token.
 *
 * Each thread owns whole panels (16-row groups) and takes up to MM_GEMM_L2 bytes of them at a
 * time: packs them (weights read from memory once), then walks the tokens eight at a time over
 * every panel of the group, so a token group's activations serve several panels from cache and
 * each panel is re-read from L2. The offset of the unsigned weights comes back out through
 * xoff = off * the block sums of each token's activations, computed once per call. Rows do not
 * depend on the thread count (whole panels per thread, fixed order). Tables without their own
 * GEMM kernels (AVX2, NEON) and blocks that are not whole 4-column groups keep the dot4 path.
 *
 * Loaded int8 weights are stored as these panels (ds_mat_interleave, DS_ILV_PANELS) where the
 * table has its own GEMM: nothing is packed, the scales of a per-channel panel are read in place
 * too, and every token count runs here, the kernel narrowed to 1, 2 or 4 tokens below eight.
 * The medium model's experts (7 layers x 32, all three matrices, 2 threads, weights cold, GB/s
 * against the dot4 path and packing on interleaved rows, two processes each way): 1 token 37 ->
 * 48, 4 tokens 38 -> 42, 8 tokens 29 -> 33 - 39, 24 tokens 13 - 16 -> 13 - 17. */
#define MM_GEMM_L2 (512 * 1024)
/* From this many tokens on the GEMM path runs. Packing costs about one streaming pass over the
 * weights, so below these counts the dot4 kernels, which stream without it, win. Measured on the
 * 2-vCPU Zen 5 VM, 2 threads, best of 15 (ms), 16384 x 7168: W4A8 group 128 (one token per
 * dot4_i4 call), 2 tokens 4.4 vs GEMM 5.0, 4 tokens 7.7 vs 5.1; W8A8 (four tokens per dot4_i8
 * call), 4 tokens 3.6 vs 3.9, 6 tokens 4.1 vs 4.3, 8 tokens 4.5 vs 4.1. The medium model's
 * experts (7 layers x 32, gate + up 512 x 1024, weights cold) at 4 tokens each: 7.0 vs 8.6. */
#define MM_GEMM_MIN_TOK_I8 8
#define MM_GEMM_MIN_TOK_I4 4

/* Effective block width: per-channel scales (one block per row) give the whole row. */
static size_t i8_block(const ds_mat *w) {
    return (size_t)(w->block_cols < w->cols ? w->block_cols : w->cols);
}

/* Tokens from which DS_I8 runs the GEMM. Per-channel rows that one dot4 call covers (at most
 * MM_I8_CHUNK columns: matmul_i8_rows_thread) keep the dot4 path through MM_FUSED_MAX_TOK
 * tokens: four rows and four tokens' activations stay in L1 for the second call, and no panel
 * is packed. 2048 rows, interleaved, cold, 2 threads, at 8 tokens (us, GEMM vs dot4): 1024
 * columns 61 vs 52, 2048 columns 118 vs 94, but 4096 columns 215 vs 275 (the general dot4
 * driver, chunked); the W8A8 model's q_a + kv_a 0.22 vs 0.18 ms a step, o_proj 0.50 vs 0.41. */
static int64_t gemm_min_tok(const ds_mat *w) {
    if (w->int4) return MM_GEMM_MIN_TOK_I4;
    const int rows_path =
        w->block_rows == 1 && i8_block(w) == (size_t)w->cols && (size_t)w->cols <= MM_I8_CHUNK;
    return rows_path ? MM_FUSED_MAX_TOK + 1 : MM_GEMM_MIN_TOK_I8;
}

static int gemm_native(const ds_kernels *k) {
    return DS_KERNELS_OWN(k, gemm16x8_i8);
}

/* y[r] = o[r] * s for r < n <= 16. A memcpy call per token cost a sixth of the GEMM's time at
 * 8 tokens; the fixed count of 16 is vectorised, which gcc does only with the pointers restrict
 * (the kernel saw o's address, so y might have aliased it). */
static void scale_rows(float *restrict y, const float *restrict o, float s, size_t n) {
    if (n == 16)
        for (size_t r = 0; r < 16; r++) y[r] = o[r] * s;
    else
        for (size_t r = 0; r < n; r++) y[r] = o[r] * s;
}

/* Tokens from which the GEMM prefetches stored panels ahead. Below, the kernel's few steps a
 * byte leave the stream to the hardware prefetcher, and the software prefetches only took miss
 * buffers: the one-token kernel over cold stored panels, 2 threads, 1024 columns (medians of 400
 * matrices, GB/s, none vs the next panel): 2048 rows 63 vs 55, 8192 rows 66 - 72 vs 56 - 59
 * (dot_f32 reading the same bytes 62 - 68), 2 / 4 tokens at 2048 rows 61 - 71 vs 52 - 75 / 59 - 63
 * vs 55 - 56, 512 rows even. From 8 tokens on they are needed: a MoE layer's gate and up, 32
 * experts cold, 8 tokens each, 272 GMAC/s with them, 180 without. In the medium W8A8 model, old
 * and new alternating step by step (two runs, medians of 48 steps): the experts at 8 sequences
 * (1 - 2 tokens each) 4.80 -> 4.60 and 4.88 -> 4.65 ms a step, even at 1; with 4 tokens too, the
 * experts at 32 sequences (4 each) were 3 - 4% slower, hence 3. */
#define MM_GEMM_PF_MIN_TOK 3

static void matmul_gemm_thread(void *arg, int thread, int n_threads) {
    const matmul_ctx *c = arg;
    const ds_mat *w = c->w;
    const ds_kernels *k = c->k;
    const size_t cols = (size_t)w->cols, rows = (size_t)w->rows, n_tok = (size_t)c->n_tok;
    const size_t rowb = row_bytes(w), blk = i8_block(w);
    const size_t nb = (cols + blk - 1) / blk, pbytes = 64 * ((cols + 3) / 4);
    /* While every token's activations fit in MM_GEMM_L2 (n_tok x cols bytes), a group is one
     * panel, or from eight tokens on the pair gemm32x8_i8 takes: packing (which reads the weights
     * from memory) and the GEMM then alternate every 16 or 32 rows, and the next group's rows are
     * prefetched while the GEMM runs, instead of one whole L2 group packed at memory latency
     * before any arithmetic; each group re-reads the activations from L2. Beyond, the L2 group's
     * panels share each pass over them. Measured (one-panel groups against L2 groups) on
     * the 2-vCPU Zen 5 VM, 2 threads, weights cold, alternating in one process (mean GB/s of
     * weights, one panel vs L2 groups): the medium model's experts (512 x 1024) at 64 / 96
     * tokens each 4.8 / 2.9 vs 4.4 / 2.6, o_proj (1024 x 2048) at 64 / 192 tokens 6.5 / 2.4 vs
     * 5.1 / 2.0, q_b (3072 x 384) at 64 tokens 4.4 vs 3.1; 2048 x 7168 at 96 tokens 4.7 vs 4.7,
     * at 256 tokens 1.8 vs 2.0. (Before the GEMM spread its prefetches, the L2 groups won at 96
     * tokens an expert, and 6- or 12-panel groups were twice as slow at 192, not understood.) */
    const int pairs = DS_KERNELS_OWN(k, gemm32x8_i8);
    size_t gp = n_tok * c->ldq > MM_GEMM_L2 ? MM_GEMM_L2 / pbytes : n_tok >= 8 && pairs ? 2 : 1;
    if (gp < 1) gp = 1; /* panels per group */
    size_t p_lo, p_hi;
    slice_range(c, (rows + 15) / 16, thread, n_threads, &p_lo, &p_hi);
    if (p_lo >= p_hi) return;
    if (gp > p_hi - p_lo) gp = p_hi - p_lo;
    /* [gp][groups][16][4] unless stored as panels, then the scales [gp][nb][16] */
    const int stored = w->ilv == DS_ILV_PANELS;
    const size_t packed = stored ? 0 : gp * pbytes;
    uint8_t *pan = ds_thread_scratch(DS_SCRATCH_TASK, packed + gp * nb * 16 * sizeof(float));
    DS_ASSERT(pan);
    float *sw = (float *)(void *)(pan + packed); /* pbytes: whole 64-byte groups */
    const unsigned char *data = w->data;
    /* stored panels of one scale a row read their 16 scales in place (whole panels: rows % 16 is
     * 0), as they read their weights */
    const int sw_stored = stored && nb == 1 && w->block_rows == 1;
    for (size_t p0 = p_lo; p0 < p_hi; p0 += gp) {
        size_t pn = p_hi - p0 < gp ? p_hi - p0 : gp;
        for (size_t pi = 0; pi < pn && !sw_stored; pi++) {
            size_t r0 = 16 * (p0 + pi), nr = rows - r0 < 16 ? rows - r0 : 16;
            const uint8_t *w4[16];
            const int8_t *w8[16];
            for (size_t j = 0; j < 16; j++) { /* a tail panel repeats row r0; dropped */
                size_t r = r0 + (j < nr ? j : 0);
                w4[j] = data + r * rowb;
                w8[j] = (const int8_t *)w4[j];
                const float *srow = scale_row(w, r, nb);
                for (size_t b = 0; b < nb; b++)
                    memcpy(sw + (pi * nb + b) * 16 + j, srow + b, sizeof(float));
            }
            if (stored) continue; /* read in place */
            /* interleaved: whole blocks of rows as dot4_i8 reads them; a panel reaching the
             * row-major tail rows piece by piece (64 columns are 16 whole groups of it) */
            const int ilv = w->ilv && r0 + 16 <= (size_t)rows / 4 * 4;
            if (w->int4) {
                k->pack16_i4(pan + pi * pbytes, w4, cols);
            } else if (ilv) {
                for (size_t j = 0; j < 16; j++)
                    w8[j] = (const int8_t *)data + (r0 + j - j % 4) * cols + 64 * (j % 4);
                k->pack16_i8(pan + pi * pbytes, w8, cols, 256);
            } else if (!w->ilv) {
                k->pack16_i8(pan + pi * pbytes, w8, cols, 64);
            } else {
                for (size_t s = 0; s < cols / 64; s++) {
                    const int8_t *ws[16];
                    for (size_t j = 0; j < 16; j++) {
                        const size_t r = r0 + (j < nr ? j : 0), q = r % 4;
                        ws[j] = r < (size_t)rows / 4 * 4
                                    ? (const int8_t *)data + (r - q) * cols + 256 * s + 64 * q
                                    : w8[j] + 64 * s;
                    }
                    k->pack16_i8(pan + pi * pbytes + 1024 * s, ws, 64, 64);
                }
            }
        }
        /* the next group's stored rows, a share prefetched by each kernel call (none where the
         * hardware prefetcher alone keeps up: MM_GEMM_PF_MIN_TOK) */
        const size_t next = p0 + pn, next_end = next + gp < p_hi ? next + gp : p_hi;
        const size_t pf0 = (16 * next < rows ? 16 * next : rows) * rowb;
        const size_t pf_end = stored && n_tok < MM_GEMM_PF_MIN_TOK
                                  ? pf0
                                  : (16 * next_end < rows ? 16 * next_end : rows) * rowb;
        const size_t calls = (n_tok + 7) / 8 * pn;
        size_t pf = pf0, call = 0;
        for (size_t t0 = 0; t0 < n_tok; t0 += 8) {
            size_t nt = n_tok - t0 < 8 ? n_tok - t0 : 8;
            const int8_t *xs[8];
            const int32_t *xo[8];
            for (size_t j = 0; j < 8; j++) { /* a tail group repeats token t0; dropped */
                size_t t = t0 + (j < nt ? j : 0);
                xs[j] = c->q + t * c->ldq;
                xo[j] = c->xoff + t * nb;
            }
            for (size_t pi = 0, np; pi < pn; pi += np) {
                /* eight tokens take two panels a call where two are left */
                np = nt == 8 && pi + 1 < pn && pairs ? 2 : 1;
                const size_t r0 = 16 * (p0 + pi), nr = rows - r0 < 16 * np ? rows - r0 : 16 * np;
                float out[256];
                call += np;
                const size_t pt = pf0 + (pf_end - pf0) * call / calls;
                const size_t n_pf = pt > pf ? (pt - pf + 63) / 64 : 0;
                const uint8_t *panel = stored ? data + r0 * rowb : pan + pi * pbytes;
                const float *s16 = sw_stored ? w->scale + w->row0 + r0 : sw + pi * nb * 16;
                if (np == 2)
                    k->gemm32x8_i8(panel, stored ? panel + 16 * rowb : panel + pbytes, cols, blk,
                                   xs, xo, s16, sw_stored ? s16 + 16 : s16 + nb * 16,
                                   (const char *)data + pf, n_pf, out);
                else
                    k->gemm16x8_i8(panel, cols, blk, (int)nt, xs, xo, s16, (const char *)data + pf,
                                   n_pf, out);
                pf += 64 * n_pf;
                for (size_t q = 0; q < np; q++) /* the second panel's rows: out + 128 */
                    for (size_t j = 0; j < nt; j++)
                        scale_rows(c->y + (t0 + j) * rows + r0 + 16 * q, out + 128 * q + 16 * j,
                                   c->sx[t0 + j], nr - 16 * q < 16 ? nr - 16 * q : 16);
            }
        }
    }
    tile_done(c, thread, 0, n_tok, 16 * p_lo, 16 * p_hi < rows ? 16 * p_hi : rows);
}

/* off * the sum of q over each block of kblock columns in [c0, c0 + len), into dst; returns the
 * number of blocks. The products wrap in int32 as the kernels' lanes do (see gemm16x8_i8). */
static size_t block_offsets(const ds_kernels *k, const int8_t *q, size_t c0, size_t len,
                            size_t kblock, int64_t off, int32_t *dst) {
    size_t nb = 0;
    for (size_t b0 = c0; b0 < c0 + len; b0 += kblock, nb++) {
        const size_t end = c0 + len < b0 + kblock ? c0 + len : b0 + kblock;
        /* modulo 2^32, like the product it enters */
        const uint32_t sum = (uint32_t)k->sum_i8(q + b0, end - b0);
        dst[nb] = (int32_t)(sum * (uint32_t)off);
    }
    return nb;
}

enum { PREP_DOT, PREP_GEMM };

/* What ds_matmul prepares per token before the DS_I8 matmul proper. */
typedef struct {
    matmul_ctx *c;
    int mode;   /* PREP_*: the dot4 kernels' piece offsets (and int4's split x), or GEMM blocks' */
    i8_plan pl; /* PREP_DOT */
    size_t np;  /* offsets per token: dot4 pieces or GEMM blocks */
} prep_ctx;

/* Quantizes tokens of this slice (zero padding to ldq) and adds what the path needs. */
static void prep_task(void *arg, int slice, int n_slices) {
    prep_ctx *pc = arg;
    matmul_ctx *c = pc->c;
    const ds_mat *w = c->w;
    const size_t cols = (size_t)w->cols, ldq = c->ldq;
    size_t t0, t1;
    ds_split_range((size_t)c->n_tok, slice, n_slices, &t0, &t1);
    int8_t *q = (int8_t *)c->q;
    for (size_t t = t0; t < t1; t++) {
        int8_t *qt = q + t * ldq;
        if (w->act_n) {
            ds_quantize_row_static(c->x + t * cols, w->cols, w->act_scale, w->act_zp, w->act_n > 1,
                                   qt);
            ((float *)c->sx)[t] = 1.0f;
        } else {
            ds_quantize_row_i8(c->x + t * cols, w->cols, qt, (float *)c->sx + t);
        }
        memset(qt + cols, 0, ldq - cols);
    }
    /* the offsets in a second pass: read back at once in wide loads, a token's bytes waited for
     * the quantizer's narrow stores still in flight (no store forwarding); with the portable sum
     * (SSE2) that was a quarter of a 32 x 1024 matmul at 192 tokens (54.4 -> 49.4 us a call).
     * Medium W8A8, alternating step by step (medians of 48 steps), ms a step: 8.53 -> 8.37 at 1
     * sequence, 18.36 -> 18.14 at 8, 79.25 -> 79.11 at 64, 250.4 -> 249.4 at 192. */
    for (size_t t = t0; t < t1; t++) {
        const int8_t *qt = q + t * ldq;
        int32_t *xo = (int32_t *)c->xoff + t * pc->np;
        const int64_t off = w->int4 ? 8 : 128;
        if (pc->mode == PREP_GEMM) {
            block_offsets(c->k, qt, 0, cols, i8_block(w), off, xo);
            continue;
        }
        if (w->int4) ds_i4_split(qt, cols, pc->pl.bc, (int8_t *)c->xs + t * ldq);
        for (size_t c0 = 0, nc, i = 0; c0 < cols; c0 += nc) {
            nc = i8_call_cols(w, &pc->pl, c0);
            i += block_offsets(c->k, qt, c0, nc, pc->pl.kblock, off, xo + i);
        }
    }
}

/* ---- the driver ----
 *
 * ds_matmul_jobs runs independent matmuls (a MoE layer's experts, each over its own tokens) as
 * if one: every job's per-token preparation shares one pool run, and every job's row slices
 * another, claimed dynamically across jobs. A matmul per call cost two pool runs (and a wait
 * for the slowest thread) per expert matrix, most of a MoE layer's time at a few tokens per
 * expert. Each job is computed exactly as ds_matmul alone would compute it. */

/* Slices of rows per thread and job: a thread that finishes early, or runs while the other is
 * descheduled (a shared VM), takes the rest. */
#define MM_SLICES_PER_THREAD 4
/* Most work (job_work's units) in a slice of its share, or else in a job's last slice, tapered
 * (slice_range). The threads finish a call apart by up to a slice, and lm_head's eighths were
 * long: ~0.7 ms at 1 token, ~7 ms at 32 (medium preset). Medium models, old and new alternating
 * step by step on the 2-vCPU VM (medians of 32 steps, ms), lm_head: at 1 token 4.35 -> 4.23,
 * 5.46 -> 5.32, 4.50 -> 4.35 (W8A8); where the VM was busy 8.95 -> 8.00 at 8 tokens, 30.9 ->
 * 27.9 and 30.4 -> 27.1 at 32, 173 -> 168 and 171 -> 161 at 192; quiet, even (24.1 -> 24.0 at
 * 32, 147.1 -> 146.9 at 192). Uniform slices of this much cost 2% when quiet (24.5 -> 24.9 at 32
 * tokens): every slice streams its first rows in without prefetching ahead. */
#define MM_SLICE_WORK ((double)(32 << 20))

/* One pool slice: sub-slice `sub` of `n_sub` of a job's task. */
typedef struct {
    ds_pool_fn fn;
    void *ctx;
    int sub, n_sub;
} mm_unit;

static void units_task(void *arg, int slice, int n_slices) {
    (void)n_slices;
    const mm_unit *u = (const mm_unit *)arg + slice;
    u->fn(u->ctx, u->sub, u->n_sub);
}

/* Runs the n units' slices on the pool (inline without one). */
static void run_units(ds_pool *pool, mm_unit *u, int n) {
    if (!n) return;
    if (!pool || ds_pool_size(pool) == 1 || n == 1)
        for (int i = 0; i < n; i++) u[i].fn(u[i].ctx, u[i].sub, u[i].n_sub);
    else
        ds_pool_run_slices(pool, units_task, u, n);
}

/* Appends fn(ctx, i, n_sub) for i < n_sub to u at *n. */
static void add_units(mm_unit *u, int *n, ds_pool_fn fn, void *ctx, int n_sub) {
    for (int i = 0; i < n_sub; i++) u[(*n)++] = (mm_unit){fn, ctx, i, n_sub};
}

/* A job's cost in weight-token units: its weights' stream plus its multiply-adds. */
static double job_work(const ds_mm_job *j) {
    return (double)j->w->rows * (double)j->w->cols * (double)(j->n_tok + 8);
}

typedef struct {
    matmul_ctx c;
    prep_ctx pc;
    ds_pool_fn fn;
    int from;   /* -1: prepares its activations itself; else the job before it that does */
    int slices; /* of its row task */
} mm_job_state;

/* Picks job j's path and, for DS_I8, what its per-token preparation makes (prep_ctx). */
static void job_setup(const ds_mm_job *j, mm_job_state *st) {
    const ds_mat *w = j->w;
    memset(st, 0, sizeof *st);
    st->c = (matmul_ctx){.k = ds_kernels_get(), .w = w, .y = j->y, .x = j->x, .n_tok = j->n_tok};
    st->pc.c = &st->c;
    if (w->dtype != DS_I8) {
        /* few tokens: stream the stored weights through the fused kernels; more: tiles of f32 */
        const int64_t fused_max =
            w->dtype == DS_F8_E4M3 ? MM_FUSED_MAX_TOK_FP8 : MM_FUSED_MAX_TOK_16;
        st->fn = matmul_thread;
        const int fits = j->n_tok <= fused_max || w->dtype == DS_BF16;
        if (w->dtype != DS_F32 && fits && fused_native(st->c.k, w->dtype))
            st->fn = w->dtype == DS_BF16 && j->n_tok >= bf16_blocks_min(w)
                         ? matmul_bf16_blocks_thread
                         : matmul_fused_thread;
        else if (j->n_tok > MM_FUSED_MAX_TOK && ds_kernels_fgemm_native(st->c.k))
            st->fn = matmul_fgemm_thread;
        return;
    }
    /* the activations of each token quantized once per call, rows padded with zeros to whole
     * 4-column groups, with what the chosen path needs beside them */
    const size_t cols = (size_t)w->cols, blk = i8_block(w), n_tok = (size_t)j->n_tok;
    prep_ctx *pc = &st->pc;
    st->fn = matmul_i8_thread;
    st->c.ldq = (cols + 3) / 4 * 4;
    if (w->ilv == DS_ILV_PANELS ||
        (j->n_tok >= gemm_min_tok(w) && (blk == cols || blk % 4 == 0) && gemm_native(st->c.k))) {
        pc->mode = PREP_GEMM;
        pc->np = (cols + blk - 1) / blk;
        st->fn = matmul_gemm_thread;
    } else { /* the offsets of the dot4 kernels' blocks (and int4's split x) */
        pc->mode = PREP_DOT;
        pc->pl = i8_plan_for(w, n_tok);
        for (size_t c0 = 0, nc; c0 < cols; c0 += nc) {
            nc = i8_call_cols(w, &pc->pl, c0);
            pc->np += (nc + pc->pl.kblock - 1) / pc->pl.kblock;
        }
        /* per-channel rows in one decode call each (np: one block a row) */
        if (pc->pl.decode && !w->int4 && w->block_rows == 1 && pc->pl.bc == cols && pc->np == 1)
            st->fn = matmul_i8_rows_thread;
    }
    st->c.n_pieces = pc->np;
}

/* Whether job st runs BF16 through dot4xn_bf16, whose x is split first (split_bf16). */
static int bf16_split_job(const ds_mm_job *j, const mm_job_state *st) {
    return j->w->dtype == DS_BF16 &&
           (st->fn == matmul_fused_thread || st->fn == matmul_bf16_blocks_thread);
}

/* True when job a, set up and prepared, prepared the activations job b needs: the same x and
 * tokens, split for dot4xn_bf16 (BF16) or quantized alike with the same offsets beside them
 * (DS_I8): a layer's gate and up, q_a and kv_a. */
static int same_prep(const ds_mm_job *a, const mm_job_state *sa, const ds_mm_job *b,
                     const mm_job_state *sb) {
    const ds_mat *wa = a->w, *wb = b->w;
    const i8_plan *pa = &sa->pc.pl, *pb = &sb->pc.pl;
    if (a->x != b->x || a->n_tok != b->n_tok || wa->cols != wb->cols) return 0;
    if (bf16_split_job(b, sb)) return bf16_split_job(a, sa);
    return sa->fn && wa->dtype == DS_I8 && wa->act_n == wb->act_n &&
           wa->act_scale == wb->act_scale && wa->act_zp == wb->act_zp &&
           sa->pc.mode == sb->pc.mode && wa->int4 == wb->int4 &&
           (sa->pc.mode != PREP_GEMM || i8_block(wa) == i8_block(wb)) &&
           (sa->pc.mode != PREP_DOT ||
            (pa->bc == pb->bc && pa->seg == pb->seg && pa->kblock == pb->kblock &&
             pa->big == pb->big && pa->decode == pb->decode));
}

/* A BF16 fused job's x split for dot4xn_bf16, its tokens [t0, t1) of the slice's share. */
static void split_task(void *arg, int slice, int n_slices) {
    const matmul_ctx *c = ((prep_ctx *)arg)->c;
    const size_t cols = (size_t)c->w->cols;
    size_t t0, t1;
    ds_split_range((size_t)c->n_tok, slice, n_slices, &t0, &t1);
    float *xb = (float *)c->xb; /* the call's own buffer (job_place) */
    for (size_t t = t0; t < t1; t++) ds_bf16_split(c->x + t * cols, cols, xb + t * c->ldb);
}

static size_t lines(size_t bytes) {
    return (bytes + 63) & ~(size_t)63;
}

/* The activation buffers job st prepares, laid out from p on (NULL: nothing is written), each
 * part on whole cache lines (BF16's split rows too: x vectors split across two lines measured
 * 25% slower in L1); returns their bytes. */
static size_t job_place(mm_job_state *st, int bf16, unsigned char *p) {
    matmul_ctx *c = &st->c;
    const size_t n_tok = (size_t)c->n_tok, cols = (size_t)c->w->cols;
    if (bf16) {
        const size_t ldb = (cols + 15) / 16 * 16;
        if (p) {
            c->xb = (float *)(void *)p;
            c->ldb = ldb;
        }
        return lines(n_tok * ldb * sizeof(float));
    }
    const size_t q = lines(n_tok * c->ldq), sx = lines(n_tok * sizeof(float));
    const size_t xo = lines(n_tok * st->pc.np * sizeof(int32_t));
    const int split = st->pc.mode == PREP_DOT && c->w->int4; /* int4's split x */
    if (p) {
        c->q = (int8_t *)p;
        c->sx = (float *)(void *)(p + q);
        c->xoff = (int32_t *)(void *)(p + q + sx);
        c->xs = split ? (int8_t *)(p + q + sx + xo) : NULL;
    }
    return q + sx + xo + (split ? q : 0);
}

/* A job of no rows or no columns: its sums are empty, so y is the bias or 0. */
static void empty_job(const ds_mm_job *j) {
    const ds_mat *w = j->w;
    const size_t rows = (size_t)w->rows;
    DS_ASSERT(j->y || rows == 0);
    for (size_t t = 0; t < (size_t)j->n_tok; t++) {
        for (size_t r = 0; r < rows; r++) j->y[t * rows + r] = w->bias ? w->bias[w->row0 + r] : 0;
        if (j->argmax)
            j->argmax[t] = rows ? (int32_t)ds_kernels_get()->argmax_f32(j->y + t * rows, rows) : -1;
    }
}

void ds_matmul_jobs(ds_pool *pool, const ds_mm_job *jobs, int n_jobs) {
    if (n_jobs <= 0) return;
    const int threads = ds_pool_size(pool);
    mm_job_state *st = calloc((size_t)n_jobs, sizeof *st);
    DS_ASSERT(st);
    size_t bytes = 0; /* of the activations the jobs prepare */
    for (int i = 0; i < n_jobs; i++) {
        const ds_mm_job *j = &jobs[i];
        check_mat(j->w);
        DS_ASSERT(j->n_tok >= 0);
        st[i].fn = NULL;
        if (j->n_tok == 0) continue;
        if (j->w->rows == 0 || j->w->cols == 0) { /* no slice would write y */
            empty_job(j);
            continue;
        }
        DS_ASSERT(j->y && j->x);
        job_setup(j, &st[i]);
        const int bf16 = bf16_split_job(j, &st[i]);
        if (!bf16 && j->w->dtype != DS_I8) continue;
        /* an earlier job of the same x that prepares the same serves this one too; jobs of one
         * x come together (gate, up), so the search stops at the first other x */
        int k = i - 1;
        while (k >= 0 && jobs[k].x == j->x && !same_prep(&jobs[k], &st[k], j, &st[i])) k--;
        st[i].from = k >= 0 && jobs[k].x == j->x ? k : -1;
        if (st[i].from < 0) bytes += job_place(&st[i], bf16, NULL);
    }
    /* each job's slices: its share of the call's by its work, more (tapered) where those would
     * hold over MM_SLICE_WORK, at least one, none below a panel */
    double total = 0;
    for (int i = 0; i < n_jobs; i++)
        if (st[i].fn) total += job_work(&jobs[i]);
    size_t units = 0, n_best = 0;
    for (int i = 0; i < n_jobs; i++) {
        if (!st[i].fn) continue;
        const double work = job_work(&jobs[i]);
        double n = threads > 1 ? ceil(threads * MM_SLICES_PER_THREAD * work / total) : 1;
        if (threads > 1 && work / n > MM_SLICE_WORK) {
            /* the last of n tapered slices holds about work (1 - q) q^(n - 1) */
            n = fmax(n, ceil(1 + log(MM_SLICE_WORK / (work * (1 - MM_TAPER))) / log(MM_TAPER)));
            st[i].c.tapered = 1;
        }
        const double panels = (double)((jobs[i].w->rows + 15) / 16);
        st[i].slices = (int)(n < panels ? n : panels);
        units += (size_t)st[i].slices;
        if (jobs[i].argmax) n_best += (size_t)st[i].slices * (size_t)jobs[i].n_tok;
    }
    row_best *best = n_best ? malloc(n_best * sizeof *best) : NULL;
    DS_ASSERT(best || !n_best);
    for (size_t i = 0; i < n_best; i++) best[i] = (row_best){0, -1};
    for (size_t i = 0, at = 0; i < (size_t)n_jobs; i++) {
        if (!st[i].fn || !jobs[i].argmax) continue; /* best + at: a job that asked, best non-NULL */
        st[i].c.best = best + at;
        at += (size_t)st[i].slices * (size_t)jobs[i].n_tok;
    }
    /* the preparations' units (up to one a thread and job), then the rows' */
    const size_t prep_units = (size_t)n_jobs * (size_t)threads;
    mm_unit *u = malloc((units > prep_units ? units : prep_units) * sizeof *u);
    unsigned char *arena = ds_thread_scratch(DS_SCRATCH_CALL, bytes);
    DS_ASSERT(u && arena);
    int nu = 0;
    for (int i = 0; i < n_jobs; i++) {
        const ds_mm_job *j = &jobs[i];
        if (!st[i].fn) continue;
        const int bf16 = bf16_split_job(j, &st[i]), k = st[i].from;
        if (!bf16 && j->w->dtype != DS_I8) continue;
        if (k >= 0) {
            st[i].c.q = st[k].c.q;
            st[i].c.sx = st[k].c.sx;
            st[i].c.xoff = st[k].c.xoff;
            st[i].c.xs = st[k].c.xs;
            st[i].c.xb = st[k].c.xb;
            st[i].c.ldb = st[k].c.ldb;
            continue;
        }
        arena += job_place(&st[i], bf16, arena);
        /* per-token preparation split over the threads when there are tokens enough to share */
        add_units(u, &nu, bf16 ? split_task : prep_task, &st[i].pc,
                  j->n_tok >= 2 * threads ? threads : 1);
    }
    run_units(pool, u, nu);
    nu = 0;
    for (int i = 0; i < n_jobs; i++) {
        if (!st[i].fn) continue;
        const ds_mat *w = jobs[i].w;
        matmul_ctx *c = &st[i].c;
        c->k8 = c->k;
        if (w->act_n && c->k->dot4_i8_no_min && memchr(c->q, 0x80, (size_t)c->n_tok * c->ldq))
            c->k8 = ds_kernels_scalar();
        add_units(u, &nu, st[i].fn, c, st[i].slices);
    }
    run_units(pool, u, nu);
    /* each token's best over the slices, in row order */
    for (int i = 0; i < n_jobs; i++) {
        const ds_mm_job *j = &jobs[i];
        for (int64_t t = 0; st[i].c.best && t < j->n_tok; t++) {
            row_best b = {0, -1};
            for (int s = 0; s < st[i].slices; s++) {
                const row_best o = st[i].c.best[(size_t)s * (size_t)j->n_tok + (size_t)t];
                if (o.i >= 0 && beats(o.v, b)) b = o;
            }
            j->argmax[t] = b.i;
        }
    }
    free(best);
    free(st);
    free(u);
}

void ds_matmul(ds_pool *pool, float *y, const float *x, int64_t n_tok, const ds_mat *w) {
    const ds_mm_job j = {y, x, n_tok, w, NULL};
    ds_matmul_jobs(pool, &j, 1);
}
