/* The threaded matmul over stored weights: y[n_tok, rows] = x[n_tok, cols] . W^T.
 *
 * Workload. Decoding runs n_tok = 1 (or a handful of sequences batched together); prefill runs
 * tens to thousands of tokens. A DeepSeek-V3 weight is read from a multi-gigabyte mmap that does
 * not fit in any cache, so at decode time the matmul is a stream over W and its speed is the
 * memory bandwidth: every weight byte must be read exactly once per call and used by every token
 * of the batch while it is hot.
 *
 * Blocking. Each thread owns a contiguous range of rows (a contiguous slice of the mmap, so the
 * hardware prefetcher sees one stream per thread) and walks it four rows at a time. The four
 * rows are processed in column tiles of MM_TILE (512) columns:
 *   1. the 4 x MM_TILE tile is dequantised to f32 into an 8 KiB scratch on the stack, once per
 *      tile whatever n_tok is, while the next tile is software-prefetched;
 *   2. for every token, dot4 makes one pass over the tile of x[t] that feeds four rows (x is
 *      loaded once per four rows, and four FMA chains run side by side), and the partial sums
 *      are added into y[t, r0..r0+3].
 * Why tiles rather than whole rows: a whole-row scratch (4 x 7168 floats = 112 KiB) lives in L2,
 * and converting from DRAM into L2 measured ~16 GB/s on one Zen core against ~23 GB/s into an
 * L1-sized tile; the tile of x is L1-resident too, which matters once n_tok > 1. Tiles of
 * 256..2048 columns were measured; 512 with prefetching was best, by less than the noise of
 * the shared machine it was measured on. The cost is
 * one extra f32 addition per tile per output, a rounding far below the dot's own.
 * F32 weights are read in place, in the same tiles. Converting to f32 first instead of fusing
 * the decode into the dot product keeps one dot kernel per ISA rather than one per
 * (ISA, dtype) pair; the conversion is paid once per weight and reused by all n_tok tokens. A
 * fused bf16/fp8 dot would save the round trip through L1 (the remaining gap to the read
 * bandwidth at n_tok = 1) and is the next step if decode needs it.
 *
 * FP8 weights carry one scale per block_rows x block_cols block (128 x 128 in DeepSeek-V3);
 * each row tile is converted segment by segment, each segment with the scale of its block,
 * edge blocks partial. The result is element-exact: fp8 * scale rounded once in f32, the same
 * value the official dequantisation produces.
 *
 * Rows are computed identically whatever the thread count (the split is by whole 4-row blocks
 * and the tile order is fixed), so results do not depend on the pool size. No state outlives a
 * call and the scratch is on each thread's stack, so any number of pools (models) may run
 * matmuls concurrently. */
#include "kernels/kernels_isa.h"

int ds_mat_dtype_ok(ds_dtype t) {
    return t == DS_F32 || t == DS_F16 || t == DS_BF16 || t == DS_F8_E4M3;
}

uint64_t ds_mat_bytes(const ds_mat *w) {
    uint64_t n = (uint64_t)w->rows * (uint64_t)w->cols * ds_dtype_size(w->dtype);
    if (w->dtype == DS_F8_E4M3 && w->block_rows > 0 && w->block_cols > 0) {
        uint64_t rb = (uint64_t)((w->rows + w->block_rows - 1) / w->block_rows);
        uint64_t cb = (uint64_t)((w->cols + w->block_cols - 1) / w->block_cols);
        n += rb * cb * sizeof(float);
    }
    return n;
}

static void check_mat(const ds_mat *w) {
    DS_ASSERT(ds_mat_dtype_ok(w->dtype));
    DS_ASSERT(w->rows >= 0 && w->cols >= 0 && w->data);
    if (w->dtype == DS_F8_E4M3) DS_ASSERT(w->scale && w->block_rows > 0 && w->block_cols > 0);
}

/* Columns [c0, c0 + n) of row r to f32 with table k. Assumes check_mat(w) passed. */
static void row_part(const ds_kernels *k, const ds_mat *w, int64_t r, int64_t c0, int64_t n,
                     float *dst) {
    const unsigned char *base = w->data;
    size_t off = (size_t)r * (size_t)w->cols + (size_t)c0; /* in elements */
    switch (w->dtype) {
    case DS_F32:
        memcpy(dst, base + off * 4, (size_t)n * 4);
        break;
    case DS_BF16:
        k->bf16_to_f32(dst, (const uint16_t *)(const void *)(base + off * 2), (size_t)n);
        break;
    case DS_F16:
        k->f16_to_f32(dst, (const uint16_t *)(const void *)(base + off * 2), (size_t)n);
        break;
    case DS_F8_E4M3: {
        int64_t n_col_blocks = (w->cols + w->block_cols - 1) / w->block_cols;
        const float *srow = w->scale + (r / w->block_rows) * n_col_blocks;
        for (int64_t c = c0, end = c0 + n; c < end;) {
            int64_t cb = c / w->block_cols;
            int64_t seg_end = (cb + 1) * w->block_cols;
            if (seg_end > end) seg_end = end;
            float s;
            memcpy(&s, srow + cb, sizeof s); /* the scale tensor may sit unaligned in an mmap */
            k->fp8_to_f32(dst + (c - c0), base + off + (size_t)(c - c0), (size_t)(seg_end - c), s);
            c = seg_end;
        }
        break;
    }
    default:
        DS_ASSERT(!"unsupported weight dtype");
    }
}

void ds_mat_row_part_f32(const ds_mat *w, int64_t r, int64_t c0, int64_t n, float *dst) {
    check_mat(w);
    DS_ASSERT(r >= 0 && r < w->rows && c0 >= 0 && n >= 0 && c0 + n <= w->cols);
    row_part(ds_kernels_get(), w, r, c0, n, dst);
}

void ds_mat_row_f32(const ds_mat *w, int64_t r, float *dst) {
    ds_mat_row_part_f32(w, r, 0, w->cols, dst);
}

/* ---- the matmul ---- */
typedef struct {
    const ds_kernels *k;
    const ds_mat *w;
    float *y;       /* [n_tok, rows] */
    const float *x; /* [n_tok, cols] */
    int64_t n_tok;
} matmul_ctx;

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
    ds_split_range((rows + 3) / 4, thread, n_threads, &b_lo, &b_hi);

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
}

/* ---- the fused path (few tokens) ---- */
#include <stdlib.h>
static int64_t xenv(const char *n, int64_t d) {
    const char *e = getenv(n);
    return e && *e ? atoll(e) : d;
}
static int64_t X_CHUNK = 1024, X_PF = 0, X_MAXTOK = 4;

static void matmul_fused_thread(void *arg, int thread, int n_threads) {
    const matmul_ctx *c = arg;
    const ds_mat *w = c->w;
    const ds_kernels *k = c->k;
    const size_t cols = (size_t)w->cols, rows = (size_t)w->rows, n_tok = (size_t)c->n_tok;
    const size_t esz = ds_dtype_size(w->dtype);
    size_t chunk = (size_t)X_CHUNK;
    size_t bc = 0, n_col_blocks = 0;
    if (w->dtype == DS_F8_E4M3) {
        bc = (size_t)w->block_cols;
        n_col_blocks = (cols + bc - 1) / bc;
        chunk = chunk < bc ? bc : chunk / bc * bc;
    }
    if (chunk == 0 || chunk > cols) chunk = cols;
    size_t b_lo, b_hi;
    ds_split_range((rows + 3) / 4, thread, n_threads, &b_lo, &b_hi);
    for (size_t b = b_lo; b < b_hi; b++) {
        size_t r0 = 4 * b, nr = rows - r0 < 4 ? rows - r0 : 4;
        size_t rr[4]; /* rows past the end repeat row r0; their outputs are dropped */
        for (size_t j = 0; j < 4; j++) rr[j] = r0 + (j < nr ? j : 0);
        for (size_t c0 = 0; c0 < cols; c0 += chunk) {
            size_t nc = cols - c0 < chunk ? cols - c0 : chunk;
            const unsigned char *wp[4];
            for (size_t j = 0; j < 4; j++)
                wp[j] = (const unsigned char *)w->data + (rr[j] * cols + c0) * esz;
            if (X_PF == 1) {
                size_t nb = c0 + chunk < cols ? b : b + 1, nc0 = c0 + chunk < cols ? c0 + chunk : 0;
                if (nb < b_hi) {
                    size_t nnc = cols - nc0 < chunk ? cols - nc0 : chunk;
                    for (size_t r = 4 * nb; r < 4 * nb + 4 && r < rows; r++) {
                        const char *p = (const char *)w->data + (r * cols + nc0) * esz;
                        for (size_t o = 0; o < nnc * esz; o += 64) __builtin_prefetch(p + o);
                    }
                }
            } else if (X_PF > 1) {
                for (size_t j = 0; j < 4; j++) {
                    const char *p = (const char *)wp[j] + (size_t)X_PF;
                    for (size_t o = 0; o < nc * esz; o += 64) __builtin_prefetch(p + o);
                }
            }
            const float *sp[4];
            if (bc)
                for (size_t j = 0; j < 4; j++)
                    sp[j] = w->scale + (rr[j] / (size_t)w->block_rows) * n_col_blocks + c0 / bc;
            for (size_t t = 0; t < n_tok; t++) {
                const float *xt = c->x + t * cols + c0;
                float *yt = c->y + t * rows + r0;
                float out[4];
                switch (w->dtype) {
                case DS_BF16:
                    k->dot4_bf16(xt, (const uint16_t *const *)(const void *)wp, nc, out);
                    break;
                case DS_F16:
                    k->dot4_f16(xt, (const uint16_t *const *)(const void *)wp, nc, out);
                    break;
                default:
                    k->dot4_fp8(xt, (const uint8_t *const *)wp, sp, nc, bc, out);
                    break;
                }
                for (size_t j = 0; j < nr; j++) yt[j] = c0 == 0 ? out[j] : yt[j] + out[j];
            }
        }
    }
}

void ds_matmul(ds_pool *pool, float *y, const float *x, int64_t n_tok, const ds_mat *w) {
    check_mat(w);
    DS_ASSERT(n_tok >= 0);
    if (n_tok == 0 || w->rows == 0) return;
    DS_ASSERT(y && x);
    if (w->cols == 0) { /* empty sums: the tile loop below would never write y */
        memset(y, 0, (size_t)n_tok * (size_t)w->rows * sizeof(float));
        return;
    }
    /* a NULL pool or a pool of one runs inline on the caller's thread */
    matmul_ctx c = {ds_kernels_get(), w, y, x, n_tok};
    static int once;
    if (!once) {
        once = 1;
        X_CHUNK = xenv("DSX_CHUNK", X_CHUNK);
        X_PF = xenv("DSX_PF", X_PF);
        X_MAXTOK = xenv("DSX_MAXTOK", X_MAXTOK);
    }
    void (*fn)(void *, int, int) =
        w->dtype != DS_F32 && n_tok <= X_MAXTOK ? matmul_fused_thread : matmul_thread;
    if (pool && ds_pool_size(pool) > 1)
        ds_pool_run(pool, fn, &c);
    else
        fn(&c, 0, 1);
}
