/* The DeepSeek-V3 forward pass for one sequence, f32 activations.
 *
 * MLA with weight absorption, for prefill and decode alike (the official reference's
 * attn_impl="absorb"). Per token and layer the cache holds only
 *   c_kv = kv_a_layernorm(kv_a(x)[:kv_lora_rank])            (kv_lora_rank)
 *   k_pe = rope(kv_a(x)[kv_lora_rank:])                       (qk_rope_head_dim, all heads)
 * and attention never decompresses per-head keys or values. kv_b_proj holds, per head h,
 * qk_nope rows W_UK[h] followed by v rows W_UV[h], each kv_lora_rank wide, so
 *   score(t, h, s) = (q_nope[t,h] W_UK[h]) . c_kv[s] + q_pe[t,h] . k_pe[s]     (x softmax_scale)
 *   out(t, h)      = W_UV[h] (sum_s p(t,h,s) c_kv[s])
 * q_nope W_UK is formed once per token and head ("q_abs", kv_lora_rank wide). For prefill this
 * costs kv_lora_rank + rope multiply-adds per (query, key) pair instead of qk_nope + rope for
 * the decompressed form; in exchange prefill and decode share one code path and one cache
 * layout, and the numbers match the reference's absorb mode term by term.
 *
 * MoE: sigmoid router scores in f32; e_score_correction_bias is added for selection only;
 * with n_group > 1 a group scores the sum of its two best biased scores and only the topk_group
 * best groups stay eligible; the top-k experts by biased score are weighted by their unbiased
 * scores (normalised when norm_topk_prob) times routed_scaling_factor. Tokens are gathered per
 * expert so each expert runs one matmul over all its tokens; experts are accumulated in index
 * order and the shared experts added last, the reference's summation order.
 *
 * Across ranks (shard.c) each rank runs its heads, experts, vocabulary and MLP rows; the
 * collectives in between put together exactly the numbers one rank would have computed. */
#include "dist/dist.h"
#include "model/model_internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Chunk-sized activations; offsets into m->scratch, computed per chunk. */
typedef struct {
    float *x, *h, *a;     /* (B, hidden) residual, normed input, block output */
    float *qa;            /* (B, q_lora_rank) */
    float *q;             /* (B, heads, nope + rope) */
    float *rope;          /* (B, rope) each token's cos / sin table (ds_rope_table) */
    float *kv;            /* (B, kv_lora_rank + rope) */
    float *q_abs, *o_lat; /* (B, heads, kv_lora_rank) */
    float *o;             /* (B, heads * v) */
    float *router;        /* (B, n_routed_experts) */
    /* (G, hidden); (G, moe inter) + (B, shared inter) or (B, inter) x2; (G + B, hidden): the
     * routed experts' rows, then the shared experts' when they run beside them (moe_pipe) */
    float *xs, *g, *u, *d;
    float *topw;        /* (B, k) routing weights */
    int32_t *tope;      /* (B, k) routed experts, by descending biased score */
    int32_t *by_expert; /* (B * k) token indices grouped by expert */
    float *thread_buf;  /* per thread: scores (max context) + one dequantised row */
    size_t thread_floats;
} fwd_bufs;

static int64_t imax(int64_t a, int64_t b) {
    return a > b ? a : b;
}

enum { N_BUFS = 19 };

/* Most (token, expert) pairs in one group of experts (moe) for a chunk of B tokens: at least B,
 * as every token may choose one expert. The pairs of a few tokens make one group, whose gate and
 * up, then down, matmuls run as one pool run each (ds_matmul_jobs), or all in one at a few tokens
 * an expert (moe_pipe_task). Groups of B pairs cost pool runs and waits for the slowest thread:
 * 5 - 21% of the experts' time at 1 - 64 tokens (medium preset). Capped because the buffers grow
 * with it; 512 pairs keep the threads busy. */
#define MOE_GROUP_PAIRS 512

static int64_t group_pairs(const ds_config *c, int64_t B) {
    int64_t pairs = B * imax(1, c->n_experts_per_tok);
    return imax(B, pairs < MOE_GROUP_PAIRS ? pairs : MOE_GROUP_PAIRS);
}

/* Positions per pass of attention's weighted sum (attend_task): rows of a cache narrower than
 * f32 are converted this many at a time. */
#define ATTEND_CHUNK 64

/* A worker's scores: 16 heads (one GEMM panel) of max_ctx positions, 16-float aligned. */
static int64_t scores_floats(int64_t max_ctx) {
    return 16 * ((max_ctx + 15) & ~(int64_t)15);
}

/* Groups of 16 heads whose scores a worker keeps at once (attend_task): all of the rank's while
 * their scores fit ATTEND_SCORES_BYTES at max_ctx, fewer at longer contexts, at least one. */
#define ATTEND_SCORES_BYTES ((int64_t)4 << 20)

static int64_t attend_groups(int64_t heads, int64_t max_ctx) {
    const int64_t G = (heads + 15) / 16;
    const int64_t fit = ATTEND_SCORES_BYTES / (scores_floats(max_ctx) * (int64_t)sizeof(float));
    return imax(1, G < fit ? G : fit);
}

/* The parts of fwd_bufs in floats, in its order, for B tokens per chunk attending over at most
 * max_ctx positions, `heads` of them this rank's, `threads` workers; *thread_floats is one
 * worker's part. Their sum (64-byte aligned) is the scratch's size. */
static size_t buf_sizes(const ds_config *c, int64_t heads, int64_t max_ctx, int64_t B, int threads,
                        size_t sizes[N_BUFS], size_t *thread_floats) {
    int64_t D = c->hidden_size, qk = c->qk_nope_head_dim + c->qk_rope_head_dim;
    int64_t H = heads, H_all = c->n_heads;
    int64_t inter =
        imax(c->intermediate_size, c->moe_intermediate_size * imax(1, c->n_shared_experts));
    int64_t k = imax(1, c->n_experts_per_tok), E = imax(1, c->n_routed_experts);
    int64_t G = group_pairs(c, B), shared = c->moe_intermediate_size * c->n_shared_experts;
    int64_t gu = imax(B * inter, G * c->moe_intermediate_size + B * shared);
    /* scores of attend_groups' heads, then (attention's row_off) a dequantised latent row,
     * W_UK[h]'s rows (absorb_q_task), absorb_o_task's rows and a head's panels (absorb_o_t_task:
     * W_UV[h]'s converted rows, its scales and a row), or attend_task's panels and rows */
    int64_t R16 = (c->kv_lora_rank + 15) & ~(int64_t)15;
    int64_t lat_rope = c->kv_lora_rank + c->qk_rope_head_dim;
    int64_t wuv = imax(R16 * (16 + ((c->v_head_dim + 15) & ~(int64_t)15)),
                       (c->kv_lora_rank + 2) * c->v_head_dim);
    int64_t groups = attend_groups(H, max_ctx);
    *thread_floats = (size_t)(groups * scores_floats(max_ctx) +
                              imax(imax(R16 * imax(c->qk_nope_head_dim + 1, 32), wuv),
                                   (16 * groups + ATTEND_CHUNK) * lat_rope));
    const size_t v[N_BUFS] = {(size_t)(B * D),
                              (size_t)(B * D),
                              (size_t)(B * D),
                              (size_t)(B * c->q_lora_rank),
                              (size_t)(B * H * qk),
                              (size_t)(B * c->qk_rope_head_dim),
                              (size_t)(B * (c->kv_lora_rank + c->qk_rope_head_dim)),
                              (size_t)(B * H * c->kv_lora_rank),
                              (size_t)(B * H * c->kv_lora_rank),
                              (size_t)(B * H_all * c->v_head_dim),
                              (size_t)(B * E),
                              (size_t)(G * D),
                              (size_t)gu,
                              (size_t)gu,
                              (size_t)((G + B) * D),
                              (size_t)(B * k),
                              (size_t)(B * k),
                              (size_t)(B * k),
                              *thread_floats * (size_t)threads};
    size_t total = 0;
    for (int i = 0; i < N_BUFS; i++) {
        sizes[i] = v[i];
        total += (v[i] + 15) & ~(size_t)15; /* 64-byte aligned parts */
    }
    return total;
}

uint64_t ds_model_scratch_bytes(const ds_config *c, int64_t heads, int64_t max_ctx, int64_t B,
                                int threads) {
    size_t sizes[N_BUFS], tf;
    return (uint64_t)buf_sizes(c, heads, max_ctx, B, threads, sizes, &tf) * sizeof(float);
}

/* B tokens per chunk, attention over at most max_ctx positions per token. */
static int setup_bufs(ds_model *m, int64_t max_ctx, int64_t B, fwd_bufs *b) {
    size_t sizes[N_BUFS];
    const size_t total = buf_sizes(&m->cfg, m->shard.heads.hi - m->shard.heads.lo, max_ctx, B,
                                   ds_pool_size(m->pool), sizes, &b->thread_floats);
    if (total > m->scratch_floats) {
        ds_free(m->scratch);
        m->scratch = ds_alloc(total * sizeof(float));
        m->scratch_floats = m->scratch ? total : 0;
        if (!m->scratch)
            return ds_err_set(DS_ERR_NOMEM, "out of memory: %zu MiB of activations",
                              total * sizeof(float) >> 20);
    }
    float *p = m->scratch, **dst[] = {&b->x,
                                      &b->h,
                                      &b->a,
                                      &b->qa,
                                      &b->q,
                                      &b->rope,
                                      &b->kv,
                                      &b->q_abs,
                                      &b->o_lat,
                                      &b->o,
                                      &b->router,
                                      &b->xs,
                                      &b->g,
                                      &b->u,
                                      &b->d,
                                      &b->topw,
                                      (float **)&b->tope,
                                      (float **)&b->by_expert,
                                      &b->thread_buf};
    for (int i = 0; i < N_BUFS; i++) {
        *dst[i] = p;
        p += (sizes[i] + 15) & ~(size_t)15;
    }
    return DS_OK;
}

static void trace(ds_model *m, const char *fmt, int64_t l, const float *data, int64_t rows,
                  int64_t cols) {
    if (!m->trace) return;
    char name[96];
    snprintf(name, sizeof name, fmt, (long long)l);
    m->trace(m->trace_ctx, name, data, rows, cols);
}

/* ---- row-wise work ----
 * The element-wise steps between the matmuls (norms, residual adds, SwiGLU, the experts' gather
 * and weighted sum) run on the pool once a batch is large enough: on the caller's thread alone
 * they kept the other workers idle for ~9% of a 192-sequence decode step. Every row (or column
 * range) is computed as the serial loop would, so results do not depend on the split. */
typedef struct rows_op rows_op;
struct rows_op {
    void (*fn)(const rows_op *op, int64_t r0, int64_t r1); /* rows (or columns) [r0, r1) */
    float *out, *res;
    const float *in, *w, *bias, *topw;
    const int32_t *idx;
    int64_t width, k, count;
    float eps;
};

/* Below this many elements a step stays on the caller's thread (a pool run costs microseconds). */
#define ROWS_PAR_MIN 32768

static void rows_op_task(void *arg, int slice, int n_slices) {
    const rows_op *op = arg;
    size_t r0, r1;
    ds_split_range((size_t)op->count, slice, n_slices, &r0, &r1);
    if (r0 < r1) op->fn(op, (int64_t)r0, (int64_t)r1);
}

/* op->fn over [0, count), each unit op->width elements of work. */
static void run_rows(ds_model *m, rows_op *op, int64_t count) {
    op->count = count;
    if (count * op->width < ROWS_PAR_MIN || ds_pool_size(m->pool) == 1 || count < 2)
        op->fn(op, 0, count);
    else
        ds_pool_run(m->pool, rows_op_task, op);
}

/* out = RMSNorm(in) * w, plus the norm's anti-outlier bias when it has one (out may be in).
 * With res: res += in first, and the norm is of res (a residual add and the norm after it, one
 * pass and one pool run: a row is normed while its sum is in L1). Medium W8A8, against the add
 * and the norm apart, alternating step by step (medians of 48 steps), the adds and norms in ms a
 * step: 0.17 -> 0.14 at 8 sequences, 0.55 -> 0.46 at 64, 2.34 -> 1.68 at 192. */
static void norm_fn(const rows_op *op, int64_t r0, int64_t r1) {
    const ds_kernels *k = ds_kernels_get();
    for (int64_t t = r0; t < r1; t++) {
        const float *x = op->in + t * op->width;
        if (op->res) {
            k->axpy_f32(op->res + t * op->width, 1.0f, x, (size_t)op->width); /* exactly x + r */
            x = op->res + t * op->width;
        }
        float *o = op->out + t * op->width;
        ds_rmsnorm(o, x, op->w, op->width, op->eps);
        for (int64_t i = 0; op->bias && i < op->width; i++) o[i] += op->bias[i];
    }
}

static void rmsnorm_rows(ds_model *m, float *out, const float *in, const float *w,
                         const float *bias, int64_t rows, int64_t n) {
    rows_op op = {norm_fn, out, NULL, in, w, bias, NULL, NULL, n, 0, 0, m->cfg.rms_norm_eps};
    run_rows(m, &op, rows);
}

/* res += in, then out = the norm (w, bias) of res */
static void add_rmsnorm_rows(ds_model *m, float *res, const float *in, float *out, const float *w,
                             const float *bias, int64_t rows, int64_t n) {
    rows_op op = {norm_fn, out, res, in, w, bias, NULL, NULL, n, 0, 0, m->cfg.rms_norm_eps};
    run_rows(m, &op, rows);
}

/* out += in: a multiply-add by 1 is exactly the add */
static void add_fn(const rows_op *op, int64_t r0, int64_t r1) {
    ds_kernels_get()->axpy_f32(op->out + r0 * op->width, 1.0f, op->in + r0 * op->width,
                               (size_t)((r1 - r0) * op->width));
}

static void add_rows(ds_model *m, float *out, const float *in, int64_t rows, int64_t n) {
    rows_op op = {add_fn, out, NULL, in, NULL, NULL, NULL, NULL, n, 0, 0, 0};
    run_rows(m, &op, rows);
}

/* out = silu(out) * in */
static void swiglu_fn(const rows_op *op, int64_t r0, int64_t r1) {
    ds_swiglu(op->out + r0 * op->width, op->in + r0 * op->width, (r1 - r0) * op->width);
}

static void swiglu_rows(ds_model *m, float *g, const float *u, int64_t rows, int64_t n) {
    rows_op op = {swiglu_fn, g, NULL, u, NULL, NULL, NULL, NULL, n, 0, 0, 0};
    run_rows(m, &op, rows);
}

/* This rank's attention heads. */
static int64_t local_heads(const ds_model *m) {
    return m->shard.heads.hi - m->shard.heads.lo;
}

/* The step's cost of matmul jobs: the matrix's bytes (read once per call, whatever the token
 * count) and its multiply-adds, by weight kind. */
static void count_jobs(ds_model *m, const ds_mm_job *jobs, int n_jobs) {
    for (int i = 0; i < n_jobs; i++) {
        const ds_mat *w = jobs[i].w;
        m->cost.weight_bytes += ds_mat_bytes(w);
        uint64_t macs = (uint64_t)w->rows * (uint64_t)w->cols * (uint64_t)jobs[i].n_tok;
        if (w->dtype == DS_I8)
            m->cost.macs_int += macs;
        else
            m->cost.macs_float += macs;
    }
}

/* ds_matmul_jobs with the step's cost counted. */
static void mm_jobs(ds_model *m, const ds_mm_job *jobs, int n_jobs) {
    ds_matmul_jobs(m->pool, jobs, n_jobs);
    count_jobs(m, jobs, n_jobs);
}

static void mm(ds_model *m, float *y, const float *x, int64_t n, const ds_mat *w) {
    const ds_mm_job j = {y, x, n, w, NULL};
    mm_jobs(m, &j, 1);
}

/* y[n, units] = x W^T for a W whose rows are split across ranks (units rows in all): each
 * rank computes its rows, the pieces are gathered. */
static int mm_split(ds_model *m, float *y, const float *x, int64_t n, const ds_mat *w,
                    int64_t units) {
    if (m->shard.size == 1) {
        mm(m, y, x, n, w);
        return DS_OK;
    }
    float *part = ds_shard_buf(&m->part, &m->part_floats, (size_t)(n * w->rows));
    if (!part) return DS_ERR_NOMEM;
    mm(m, part, x, n, w);
    return ds_shard_gather_cols(m, part, n, units, 1, y);
}

/* ---- MLA ---- */

typedef struct {
    ds_model *m;
    const ds_layer *L;
    ds_kv_cache *kv;
    fwd_bufs *b;
    const ds_batch *bt; /* the step; this chunk is its tokens [i0, i0 + n) */
    int64_t i0, n, layer;
    int64_t row_off;    /* per-thread buffer: offset of the dequantised row after the scores */
    int64_t ld, groups; /* attend_task's scores: positions a head's row holds, groups at once */
    float *o;           /* (n, this rank's heads x v): absorb_o_task's output */
} attn_ctx;

/* The cache slot of position pos of the sequence of batch token i. */
static int64_t slot_of(const ds_kv_cache *kv, const ds_batch *bt, int64_t i, int64_t pos) {
    int64_t bs = kv->block_size;
    return (int64_t)bt->block_tables[(int64_t)bt->seq[i] * bt->max_blocks + pos / bs] * bs +
           pos % bs;
}

/* The absorptions are small GEMMs per head (sixteen outputs a vector, eight tokens a pass), the
 * head's kv_b rows dequantised once per call. A token's result must not depend on how many
 * tokens share its step (a seeded request samples the same tokens under load as alone), and a
 * GEMM column is the same fmaf chain however many tokens share the pass:
 *  - q_abs: W_UK[h]'s rows dequantised into the thread's buffer and read there in place, 32 latent
 *    columns a call (gemm32x8_f32_rows, rows_gemm). Below ABSORB_GEMM_MIN_TOK tokens, one row at a
 *    time through axpy instead: the same fmaf chain over the rows in the same order (axpy is a
 *    fused multiply-add), and cheaper there. Packing the head's rows into panels first, as this was
 *    written, scattered each row over sixteen panels 8 KiB apart; without it the phase went 2.0 ->
 *    0.9 - 1.1 ms a step at 8 sequences, 4.2 - 4.3 -> 3.0 - 3.4 at 64 and 9.3 - 10.4 -> 8.6 - 8.7
 *    at 192 (medium, BF16 and W8A8, medians). At 4 tokens axpy and the GEMM measured even; at 1
 *    token axpy took 0.5 ms, the GEMM 0.7 - 1.0. Per-channel int8 and BF16 rows go to axpy_i8 /
 *    axpy_bf16 as stored, converted in registers (the same floats): at 1 sequence 0.48 -> 0.28 ms a
 *    step (W8A8) and 0.47 -> 0.30 (BF16); at 4 tokens it measured even with the GEMM for W8A8 and
 *    faster for BF16 (0.64 against 0.83 ms), at 8 1.2 - 1.5x slower (old and new alternating step
 *    by step, medians).
 *  - o: always the GEMM (gemm16x8_f32 over packed W_UV rows: its lanes are rows; BF16 rows
 *    packed straight from the weights by pack16_bf16, not dequantised first: 1.03 -> 0.73 ms a
 *    step at 1 sequence, 7.6 -> 7.0 at 192, medium BF16, medians; per-channel int8 rows likewise
 *    by pack16_i8_f32: W8A8 0.74 -> 0.50 ms at 1 sequence, 0.81 -> 0.67 at 8). A dot product
 *    per row below 8 tokens, as first written, summed W_UV's rows in another order, and one
 *    seeded request of the soak test then drew another token under load than alone. At 1 token
 *    the head's panels are all packed first and gemm128x1_f32 runs the token over eight at
 *    once, the same chains without gemm16x8_f32's seven repeats of the token. Loaded models
 *    store W_UV transposed and take absorb_o_t_task instead, the same floats.
 *  - Below ABSORB_GEMM_MIN_TOK tokens, where the table has its own axpy_rows kernels, both take
 *    them: per token, a head's sums stay in registers over its rows as stored (the same chains
 *    again), instead of going through memory for every row (axpy) or through a dequantised copy
 *    and a GEMM pass of eight tokens. Medium models, the two alternating step by step (medians of
 *    24 steps), absorb_q + absorb_o in ms a step, W8A8: 0.74 -> 0.45 at 1 sequence, 0.93 -> 0.53
 *    at 2, 1.24 -> 0.64 at 3, 1.10 -> 0.72 at 4 (the GEMM before), 1.12 -> 0.94 at 6; BF16: 0.62
 *    -> 0.43, 0.64 -> 0.49, 0.81 -> 0.57, 1.38 -> 0.69, 1.17 -> 0.81. At 8 tokens they and the
 *    GEMM measured even (absorb_q 0.72 -> 0.67 and 0.48 -> 0.58 in two W8A8 runs), at 12 absorb_q
 *    was slower: the GEMM from 8 on.
 * Tables without the float GEMM kernels keep axpy / dot at every size. */
#define ABSORB_GEMM_MIN_TOK 8

static int absorb_gemm_ok(const ds_kernels *k) {
    return ds_kernels_fgemm_native(k);
}

/* The x of eight of the chunk's n tokens from token t0 on, token t's at x0 + t * ldx (a tail
 * group repeats token t0; its outputs are dropped). */
static void token_group(const float *x0, int64_t ldx, int64_t t0, int64_t n, const float *xs[8]) {
    for (int64_t j = 0; j < 8; j++) xs[j] = x0 + (t0 + (t0 + j < n ? j : 0)) * ldx;
}

/* Lane j's m (<= 32) sums of a gemm32x8_f32_rows call into dst, copied or added. A whole half is
 * copied by a memcpy of constant size, which gcc inlines as four 16-byte moves; of a variable
 * size it became `rep movsq`, a third of attend_task's own time at 192 sequences (perf). Medium
 * models, old and new alternating step by step (medians of 32 steps), absorb_q / attend /
 * absorb_o in ms a step, W8A8: 1.35 / 2.00 / 1.15 -> 1.05 / 1.69 / 0.99 at 32 sequences, 7.38 /
 * 14.07 / 6.26 -> 5.56 / 11.94 / 5.35 at 192; BF16 at 192 6.64 / 12.91 / 5.81 -> 5.24 / 11.13 /
 * 5.12. */
static void rows32_out(float *dst, const float out[256], int64_t j, int64_t m, int add) {
    for (int64_t half = 0; half * 16 < m; half++) {
        const float *src = out + 128 * half + 16 * j;
        float *d = dst + 16 * half;
        const int64_t w = m - 16 * half < 16 ? m - 16 * half : 16;
        if (add)
            for (int64_t r = 0; r < w; r++) d[r] += src[r];
        else if (w == 16)
            memcpy(d, src, 16 * sizeof(float));
        else
            memcpy(d, src, (size_t)w * sizeof(float));
    }
}

/* out[t, :width] = sum_i x[t, i] * rows[i][:width] for the n tokens (x of token t at x0 + t *
 * ldx, its out at out0 + t * ldo): eight tokens and 32 columns a gemm32x8_f32_rows call. */
static void rows_gemm(const ds_kernels *k, const float *const *rows, int64_t n_rows, int64_t width,
                      const float *x0, int64_t ldx, int64_t n, float *out0, int64_t ldo) {
    for (int64_t t0 = 0; t0 < n; t0 += 8) {
        const float *xs[8];
        token_group(x0, ldx, t0, n, xs);
        for (int64_t r0 = 0; r0 < width; r0 += 32) {
            const int64_t m = width - r0 < 32 ? width - r0 : 32;
            float out[256];
            k->gemm32x8_f32_rows(rows, (size_t)r0, (size_t)m, (size_t)n_rows, xs, 1, out);
            for (int64_t j = 0; j < 8 && t0 + j < n; j++)
                rows32_out(out0 + (t0 + j) * ldo + r0, out, j, m, 0);
        }
    }
}

/* q_abs[t, h] = sum_d q_nope[t, h, d] * W_UK[h][d, :]. Threads split the heads. */
static void absorb_q_task(void *arg, int thread, int n_threads) {
    attn_ctx *a = arg;
    const ds_config *c = &a->m->cfg;
    const ds_kernels *k = ds_kernels_get();
    int64_t H = local_heads(a->m), R = c->kv_lora_rank, dn = c->qk_nope_head_dim;
    int64_t qk = dn + c->qk_rope_head_dim, rows_per_head = dn + c->v_head_dim;
    float *wuk = a->b->thread_buf + (size_t)thread * a->b->thread_floats + a->row_off; /* [dn][R] */
    const ds_mat *wb = &a->L->kv_b;
    const int gemm = absorb_gemm_ok(k) && a->n >= ABSORB_GEMM_MIN_TOK;
    const int bf16 = wb->dtype == DS_BF16; /* kv_b is never interleaved (weights.c) */
    float s0; /* in_regs: per-channel int8 rows (one scale a row) or BF16 */
    const int in_regs =
        !gemm && (bf16 ? DS_KERNELS_OWN(k, axpy_rows_bf16)
                       : ds_mat_i8_row(wb, 0, &s0) && DS_KERNELS_OWN(k, axpy_rows_i8));
    const float **rows = gemm ? malloc((size_t)dn * sizeof *rows) : NULL;
    DS_ASSERT(rows || !gemm);
    size_t h0, h1;
    ds_split_range((size_t)H, thread, n_threads, &h0, &h1);
    for (int64_t h = (int64_t)h0; h < (int64_t)h1; h++) {
        if (in_regs) { /* W_UK[h]'s rows one after another; the row scales in wuk */
            const int64_t r0 = h * rows_per_head;
            const int8_t *q8 = bf16 ? NULL : ds_mat_i8_row(wb, r0, &wuk[0]);
            for (int64_t d = 1; !bf16 && d < dn; d++) ds_mat_i8_row(wb, r0 + d, &wuk[d]);
            for (int64_t t = 0; t < a->n; t++) {
                const float *x = a->b->q + (t * H + h) * qk;
                float *y = a->b->q_abs + (t * H + h) * R;
                if (bf16)
                    k->axpy_rows_bf16(y, x, (const uint16_t *)wb->data + r0 * R, (size_t)dn,
                                      (size_t)R);
                else
                    k->axpy_rows_i8(y, x, q8, (size_t)dn, (size_t)R, wuk);
            }
            continue;
        }
        /* axpy adds the rows to zeros, as the GEMM's chains start */
        for (int64_t t = 0; !gemm && t < a->n; t++)
            memset(a->b->q_abs + (t * H + h) * R, 0, (size_t)R * sizeof(float));
        for (int64_t d = 0; d < dn; d++) {
            const int64_t r = h * rows_per_head + d;
            float s;
            const int8_t *q8 = ds_mat_i8_row(wb, r, &s);
            const uint16_t *b16 = bf16 ? (const uint16_t *)wb->data + r * R : NULL;
            float *row = wuk + (gemm ? d * R : 0); /* axpy consumes a row at a time */
            if (gemm && q8) /* ds_mat_row_f32's conversions without its checks per row */
                k->i8_to_f32(row, q8, (size_t)R, s);
            else if (gemm && b16)
                k->bf16_to_f32(row, b16, (size_t)R);
            else if (gemm || (!q8 && !b16))
                ds_mat_row_f32(wb, r, row);
            if (gemm) {
                rows[d] = row;
                continue;
            }
            for (int64_t t = 0; t < a->n; t++) {
                float *qa = a->b->q_abs + (t * H + h) * R, qd = a->b->q[(t * H + h) * qk + d];
                if (q8)
                    k->axpy_i8(qa, qd, q8, s, (size_t)R);
                else if (b16)
                    k->axpy_bf16(qa, qd, b16, (size_t)R);
                else
                    k->axpy_f32(qa, qd, row, (size_t)R);
            }
        }
        if (gemm)
            rows_gemm(k, rows, dn, R, a->b->q + h * qk, H * qk, a->n, a->b->q_abs + h * R, H * R);
    }
    free(rows);
}

/* out[j] = x . rows[j] for four cached rows of n elements in the cache's dtype. */
static void dot4_cached(const ds_kernels *k, const ds_kv_cache *kv, const float *x,
                        const void *const rows[4], int64_t n, float out[4]) {
    switch (kv->dtype) {
    case DS_KV_F32:
        k->dot4_f32(x, (const float *const *)rows, (size_t)n, out);
        break;
    case DS_KV_BF16:
        k->dot4_bf16(x, (const uint16_t *const *)rows, (size_t)n, out);
        break;
    case DS_KV_F16:
        k->dot4_f16(x, (const uint16_t *const *)rows, (size_t)n, out);
        break;
    }
}

/* The f32 rows of the cache for positions s0 .. s0 + n - 1 of batch token bi (past S - 1: the
 * last position again): latent in lat[j], rope key in pe[j], in place for an f32 cache, else
 * converted into conv (n rows of kv_lora_rank + rope). */
static void cached_rows(const attn_ctx *a, int64_t bi, int64_t s0, int64_t n, int64_t S,
                        float *conv, const float **lat, const float **pe) {
    const ds_kv_cache *kv = a->kv;
    const int64_t R = kv->kv_lora_rank, dr = kv->rope_dim;
    for (int64_t j = 0; j < n; j++) {
        int64_t slot = slot_of(kv, a->bt, bi, s0 + j < S ? s0 + j : S - 1);
        const void *l = ds_kv_latent_at(kv, a->layer, slot), *p = ds_kv_pe_at(kv, a->layer, slot);
        if (kv->dtype == DS_KV_F32) {
            lat[j] = l;
            pe[j] = p;
            continue;
        }
        float *row = conv + j * (R + dr);
        ds_kv_load(kv, row, l, R);
        ds_kv_load(kv, row + R, p, dr);
        lat[j] = row;
        pe[j] = row + R;
    }
}

/* Prefetches a cached position's latent and rope rows (n and dr floats). */
static void prefetch_row(const float *lat, const float *pe, int64_t n, int64_t dr) {
    for (int64_t o = 0; o < n; o += 16) __builtin_prefetch(lat + o);
    for (int64_t o = 0; o < dr; o += 16) __builtin_prefetch(pe + o);
}

/* The cached rows of batch token bi's sequence, from position 0 on and up to ATTEND_NEXT_BYTES of
 * them, prefetched into L2: attend_task asks for the next token's while it works on one, so that
 * the next token's first pass does not start from memory (the scores GEMM stalled on its broadcasts
 * of the cached rows). Medium models, old and new alternating step by step (medians of 32 steps),
 * attend W8A8 / BF16 in ms a step: 15.1 -> 13.9 / 16.4 -> 13.4 at 192 sequences of ~40 positions,
 * 5.2 -> 4.7 / 4.8 -> 4.7 at 64, 0.72 -> 0.67 / even at 8, even / 2.42 -> 2.34 at 32; at 32
 * sequences of 1024 positions (1.3 MB a token, capped) 47.0 -> 45.7 / 48.5 -> 49.8. */
#define ATTEND_NEXT_BYTES (512 * 1024)

static void prefetch_seq_rows(const attn_ctx *a, int64_t bi) {
    const ds_kv_cache *kv = a->kv;
    const size_t esz = kv->dtype == DS_KV_F32 ? 4 : 2;
    const size_t lat = (size_t)kv->kv_lora_rank * esz, pe = (size_t)kv->rope_dim * esz;
    const int64_t S = a->bt->positions[bi] + 1;
    for (int64_t j = 0, bytes = 0; j < S && bytes < ATTEND_NEXT_BYTES;
         j++, bytes += (int64_t)(lat + pe)) {
        const int64_t slot = slot_of(kv, a->bt, bi, j);
        const char *l = ds_kv_latent_at(kv, a->layer, slot), *p = ds_kv_pe_at(kv, a->layer, slot);
        for (size_t o = 0; o < lat; o += 64) __builtin_prefetch(l + o, 0, 2);
        for (size_t o = 0; o < pe; o += 64) __builtin_prefetch(p + o, 0, 2);
    }
}

/* Heads of group g (16 a group) of H. */
static int64_t group_heads(int64_t H, int64_t g) {
    return H - 16 * g < 16 ? H - 16 * g : 16;
}

/* For each token and group of up to 16 of its heads, which read the same cached rows: the
 * heads' q_abs and q_pe packed once into a panel (pack16_f32, heads as lanes), then scores over
 * the sequence's positions 0 .. p, eight positions a GEMM pass with their cached rows read in
 * place as the GEMM's x (gemm16x8_f32), softmax, then the weighted latent sum, sixteen latent
 * columns a pass over the rows in place (gemm16x8_f32_rows), eight heads at a time. A score is
 * the same fmaf chain over the latent, then the rope, as a dot per head would be. Packing the
 * cached rows instead (sixteen positions a panel, once per eight heads) cost a pack per 16
 * positions; this costs one per token whatever the context: 16 - 20 -> 14 - 18 ms a step at
 * 192 sequences of 40 positions (W8A8, medium), no difference measured at 1024 positions. One
 * cached row serves 16 heads per load; a head at a time through dot4 / axpy read it once per
 * head, and this phase took ~5x its multiply-adds' time at the f32 GEMM rate.
 * The cached rows come from memory (a step streams the weights between two reads of them) in
 * runs too short for the hardware prefetcher, so each scores pass prefetches the next pass's
 * rows, and the weighted sum takes the rows' columns sixteen at a time for every head group
 * together (before, each group swept them in turn, and at 64 rows a chunk the second sweep
 * found them gone from L1), prefetching the next sixteen; with the heads' softmax chains side by
 * side, medium W8A8, old and new alternating step by step (medians of 16 steps): 50.7 -> 36.7
 * ms a step at 32 sequences of 1024 positions (the step 98 -> 81), 13.7 ->
 * 10.5 at 192 of ~40 positions, 4.5 -> 3.4 at 64. Against the shared sweep alone, the
 * prefetches and the softmax: 38 - 40 -> 36 - 37 at 1024 positions, BF16 and W8A8.
 * A token's groups (DeepSeek-R1's 128 heads on a rank are eight) share each pass over its rows,
 * up to attend_groups of them: every group's scores for eight positions while those rows are in
 * L1, then every group's weighted sums over the rows' same sixteen columns. One group at a time
 * read the rows twice per group. R1's width (bench-layer, 2 layers), old and new alternating
 * step by step: attention 24.0 -> 21.9 ms a step at 8 sequences of 1024 positions, 49.8 -> 44.5
 * at 4 of 4096. With fewer tokens than threads, a token's groups are cut into parts so that no
 * thread idles. Each head's sums are the same chains in the same order either way.
 * The scores stay as the GEMM gives them, a position's 16 heads side by side: the softmax takes
 * the heads as lanes (softmax16_f32) and the weighted sum reads a head's scores 16 floats apart.
 * Stored a row per head, a pass cost 128 scalar stores and each head's softmax a serial scan;
 * medium W8A8, the two alternating step by step (medians of 48 steps), attend 3.65 -> 3.43 ms a
 * step at 64 sequences, 14.21 -> 13.51 at 192, 0.79 -> 0.69 at 8. */
static void attend_task(void *arg, int thread, int n_threads) {
    attn_ctx *a = arg;
    const ds_config *c = &a->m->cfg;
    const ds_kernels *k = ds_kernels_get();
    int64_t H = local_heads(a->m), R = c->kv_lora_rank, dr = c->qk_rope_head_dim;
    int64_t qk = c->qk_nope_head_dim + dr, G = (H + 15) / 16, ld = a->ld;
    float *scores = a->b->thread_buf + (size_t)thread * a->b->thread_floats; /* [groups][ld][16] */
    float *pan = scores + a->row_off; /* [groups][R + dr][16]: q_abs then q_pe, packed */
    float *conv = pan + a->groups * 16 * (R + dr); /* [ATTEND_CHUNK][R + dr]: converted rows */
    const float *lat[ATTEND_CHUNK], *pe[ATTEND_CHUNK];
    float scale = a->m->softmax_scale;
    /* a token's groups in parts of at most a->groups; more parts when there are fewer tokens
     * than threads */
    int64_t parts = (G + a->groups - 1) / a->groups;
    if (a->n * parts < n_threads) {
        const int64_t want = (n_threads + a->n - 1) / a->n;
        parts = want < G ? want : G;
    }
    const int64_t gp = (G + parts - 1) / parts;
    parts = (G + gp - 1) / gp;
    size_t i0, i1;
    ds_split_range((size_t)(a->n * parts), thread, n_threads, &i0, &i1);
    for (size_t i = i0; i < i1; i++) {
        int64_t t = (int64_t)i / parts, g0 = gp * ((int64_t)i % parts), bi = a->i0 + t;
        int64_t gn = G - g0 < gp ? G - g0 : gp;
        int64_t S = a->bt->positions[bi] + 1; /* causal: positions 0 .. p */
        if (i + 1 < i1 && (int64_t)(i + 1) / parts != t)
            prefetch_seq_rows(a, a->i0 + (int64_t)(i + 1) / parts);
        for (int64_t g = 0; g < gn; g++) {
            const int64_t h0 = 16 * (g0 + g), nh = group_heads(H, g0 + g);
            const float *qa[16], *qp[16];
            for (int64_t j = 0; j < 16; j++) { /* past nh: head h0 again, dropped */
                int64_t h = h0 + (j < nh ? j : 0);
                qa[j] = a->b->q_abs + (t * H + h) * R;
                qp[j] = a->b->q + (t * H + h) * qk + c->qk_nope_head_dim;
            }
            k->pack16_f32(pan + g * 16 * (R + dr), qa, (size_t)R);
            k->pack16_f32(pan + g * 16 * (R + dr) + 16 * R, qp, (size_t)dr);
        }
        for (int64_t c0 = 0; c0 < S; c0 += ATTEND_CHUNK) {
            int64_t cn = S - c0 < ATTEND_CHUNK ? S - c0 : ATTEND_CHUNK;
            cached_rows(a, bi, c0, cn, S, conv, lat, pe);
            for (int64_t s0 = 0; s0 < cn; s0 += 8) {
                for (int64_t j = s0 + 8; j < s0 + 16 && j < cn; j++) /* the next pass's rows */
                    prefetch_row(lat[j], pe[j], R, dr);
                const float *xl[8], *xp[8];
                for (int64_t j = 0; j < 8; j++) { /* past cn: position s0 again, dropped */
                    int64_t r = s0 + (s0 + j < cn ? j : 0);
                    xl[j] = lat[r];
                    xp[j] = pe[r];
                }
                for (int64_t g = 0; g < gn; g++) { /* every group while the rows are in L1 */
                    const float *pg = pan + g * 16 * (R + dr);
                    float o1[128], o2[128], *sg = scores + (g * ld + c0 + s0) * 16;
                    k->gemm16x8_f32(pg, (size_t)R, xl, o1);
                    k->gemm16x8_f32(pg + 16 * R, (size_t)dr, xp, o2);
                    /* all eight positions (a row holds ld >= s0 + 8 of them), so that the
                     * compiler vectorises the loop; those past cn are never read */
                    for (int64_t e = 0; e < 128; e++) sg[e] = (o1[e] + o2[e]) * scale;
                }
            }
        }
        for (int64_t g = 0; g < gn; g++) k->softmax16_f32(scores + g * 16 * ld, (size_t)S);
        for (int64_t c0 = 0; c0 < S; c0 += ATTEND_CHUNK) {
            int64_t cn = S - c0 < ATTEND_CHUNK ? S - c0 : ATTEND_CHUNK;
            if (c0 || S > ATTEND_CHUNK) /* one chunk: its rows are still in lat / pe */
                cached_rows(a, bi, c0, cn, S, conv, lat, pe);
            for (int64_t j = 0; j < cn; j++) __builtin_prefetch(lat[j]);
            for (int64_t r0 = 0; r0 < R; r0 += 32) {
                /* every group's heads read the rows' same 32 columns while they are in L1; the
                 * next 32 are prefetched, two lines a row */
                for (int64_t j = 0; r0 + 32 < R && j < cn; j++) {
                    __builtin_prefetch(lat[j] + r0 + 32);
                    __builtin_prefetch(lat[j] + r0 + 48);
                }
                for (int64_t g = 0; g < gn; g++) {
                    const int64_t nh = group_heads(H, g0 + g);
                    for (int64_t e0 = 0; e0 < nh; e0 += 8) { /* eight heads a pass */
                        int64_t ne = nh - e0 < 8 ? nh - e0 : 8;
                        const float *xs[8];
                        for (int64_t j = 0; j < 8; j++) /* past ne: head e0 again, dropped */
                            xs[j] = scores + (g * ld + c0) * 16 + e0 + (j < ne ? j : 0);
                        float out[256];
                        const int64_t m = R - r0 < 32 ? R - r0 : 32;
                        k->gemm32x8_f32_rows(lat, (size_t)r0, (size_t)m, (size_t)cn, xs, 16, out);
                        for (int64_t j = 0; j < ne; j++) { /* the first chunk copies, later add */
                            int64_t h = 16 * (g0 + g) + e0 + j;
                            rows32_out(a->b->o_lat + (t * H + h) * R + r0, out, j, m, c0 > 0);
                        }
                    }
                }
            }
        }
    }
}

/* attend_task for tables without their own float GEMM kernels (NEON): for each (token,
 * head), scores over the cached positions four at a time through the dot4 kernels (reading the
 * cache's dtype in place), softmax, then the weighted latent sum row by row (axpy). */
static void attend_head_task(void *arg, int thread, int n_threads) {
    attn_ctx *a = arg;
    const ds_config *c = &a->m->cfg;
    const ds_kernels *k = ds_kernels_get();
    const ds_kv_cache *kv = a->kv;
    int64_t H = local_heads(a->m), R = c->kv_lora_rank, dr = c->qk_rope_head_dim;
    int64_t qk = c->qk_nope_head_dim + dr;
    float *scores = a->b->thread_buf + (size_t)thread * a->b->thread_floats;
    float *row = scores + a->row_off; /* a latent row in f32 when the cache is narrower */
    float scale = a->m->softmax_scale;
    size_t i0, i1;
    ds_split_range((size_t)(a->n * H), thread, n_threads, &i0, &i1);
    for (size_t i = i0; i < i1; i++) {
        int64_t t = (int64_t)i / H, h = (int64_t)i % H, bi = a->i0 + t;
        int64_t S = a->bt->positions[bi] + 1; /* causal: positions 0 .. p */
        const float *qa = a->b->q_abs + (t * H + h) * R;
        const float *qpe = a->b->q + (t * H + h) * qk + c->qk_nope_head_dim;
        for (int64_t s0 = 0; s0 < S; s0 += 4) {
            const void *lat[4], *pe[4];
            for (int64_t j = 0; j < 4; j++) { /* past S: repeat the last position, dropped */
                int64_t slot = slot_of(kv, a->bt, bi, s0 + j < S ? s0 + j : S - 1);
                lat[j] = ds_kv_latent_at(kv, a->layer, slot);
                pe[j] = ds_kv_pe_at(kv, a->layer, slot);
            }
            float sl[4], sp[4];
            dot4_cached(k, kv, qa, lat, R, sl);
            dot4_cached(k, kv, qpe, pe, dr, sp);
            for (int64_t j = 0; j < 4 && s0 + j < S; j++) scores[s0 + j] = (sl[j] + sp[j]) * scale;
        }
        ds_softmax(scores, S);
        float *ol = a->b->o_lat + (t * H + h) * R;
        memset(ol, 0, (size_t)R * sizeof(float));
        for (int64_t s = 0; s < S; s++) {
            const void *lat = ds_kv_latent_at(kv, a->layer, slot_of(kv, a->bt, bi, s));
            if (kv->dtype != DS_KV_F32) {
                ds_kv_load(kv, row, lat, R);
                lat = row;
            }
            k->axpy_f32(ol, scores[s], lat, (size_t)R);
        }
    }
}

/* o[t, h, v] = W_UV[h][v, :] . o_lat[t, h]; threads split the heads. */
static void absorb_o_task(void *arg, int thread, int n_threads) {
    attn_ctx *a = arg;
    const ds_config *c = &a->m->cfg;
    const ds_kernels *k = ds_kernels_get();
    int64_t H = local_heads(a->m), R = c->kv_lora_rank, dn = c->qk_nope_head_dim;
    int64_t dv = c->v_head_dim, R16 = (R + 15) & ~(int64_t)15;
    float *row = a->b->thread_buf + (size_t)thread * a->b->thread_floats + a->row_off;
    /* after 16 dequantised rows: panels [R][16] of 16 rows of W_UV[h], one at a time or, for one
     * token, all P of the head */
    float *pan = row + 16 * R16;
    const ds_mat *wb = &a->L->kv_b;
    float s0;
    const int gemm = absorb_gemm_ok(k), bf16 = wb->dtype == DS_BF16, one = a->n == 1;
    const int i8 = ds_mat_i8_row(wb, 0, &s0) != NULL;
    const int64_t P = (dv + 15) / 16;
    size_t h0, h1;
    ds_split_range((size_t)H, thread, n_threads, &h0, &h1);
    for (int64_t h = (int64_t)h0; h < (int64_t)h1; h++) {
        if (!gemm) {
            for (int64_t v = 0; v < dv; v++) {
                ds_mat_row_f32(wb, h * (dn + dv) + dn + v, row);
                for (int64_t t = 0; t < a->n; t++)
                    a->o[(t * H + h) * dv + v] =
                        k->dot_f32(a->b->o_lat + (t * H + h) * R, row, (size_t)R);
            }
            continue;
        }
        for (int64_t v0 = 0; v0 < dv; v0 += 16) {
            const int64_t r0 = h * (dn + dv) + dn + v0; /* kv_b's row of W_UV[h]'s row v0 */
            float *pv = pan + (one ? v0 * R16 : 0);
            if (bf16) { /* widened and transposed in one pass, as the float GEMM packs BF16 */
                const uint16_t *bp[16];
                for (int64_t j = 0; j < 16; j++) /* a tail panel repeats row v0; dropped */
                    bp[j] = (const uint16_t *)wb->data + (r0 + (v0 + j < dv ? j : 0)) * R;
                k->pack16_bf16(pv, bp, (size_t)R);
            } else if (i8) { /* likewise converted by their scales */
                const int8_t *qp[16];
                float sc[16];
                for (int64_t j = 0; j < 16; j++) /* a tail panel repeats row v0; dropped */
                    qp[j] = ds_mat_i8_row(wb, r0 + (v0 + j < dv ? j : 0), &sc[j]);
                k->pack16_i8_f32(pv, qp, sc, (size_t)R);
            } else {
                const float *rp[16];
                for (int64_t j = 0; j < 16; j++) { /* a tail panel repeats row v0; dropped */
                    rp[j] = row + (v0 + j < dv ? j : 0) * R16;
                    if (v0 + j < dv) ds_mat_row_f32(wb, r0 + j, row + j * R16);
                }
                k->pack16_f32(pv, rp, (size_t)R);
            }
            for (int64_t t0 = 0; !one && t0 < a->n; t0 += 8) {
                const float *xs[8];
                float out[128];
                token_group(a->b->o_lat + h * R, H * R, t0, a->n, xs);
                k->gemm16x8_f32(pv, (size_t)R, xs, out);
                for (int64_t j = 0; j < 8 && t0 + j < a->n; j++)
                    for (int64_t v = 0; v < 16 && v0 + v < dv; v++)
                        a->o[((t0 + j) * H + h) * dv + v0 + v] = out[16 * j + v];
            }
        }
        for (int64_t p0 = 0; one && p0 < P; p0 += 8) {
            const float *pj[8];
            float out[128];
            for (int64_t j = 0; j < 8; j++) /* past P: panel p0 again, dropped */
                pj[j] = pan + (p0 + (p0 + j < P ? j : 0)) * 16 * R16;
            k->gemm128x1_f32(pj, (size_t)R, a->b->o_lat + h * R, out);
            for (int64_t i = 0; i < 128 && 16 * p0 + i < dv; i++)
                a->o[h * dv + 16 * p0 + i] = out[i];
        }
    }
}

/* absorb_o_task where W_UV is stored transposed (ds_layer.uv_t): row j of a head's (R, dv)
 * block holds latent column j's weights of every output, so o[t, h] = sum_j o_lat[t, h, j] * row
 * j is absorb_q's form, and computed as it is: the rows converted once per head and read in
 * place by the GEMM (rows_gemm), or below ABSORB_GEMM_MIN_TOK tokens added one at a time
 * (axpy). Each output is the fmaf chain over j in order that the panels of the row-major rows
 * give (absorb_o_task), the same floats. The head's weights are one stream read once; packing
 * read the row-major rows sixteen side by side, a stream the hardware prefetcher did not follow.
 * Medium models, old and new alternating step by step (medians of 32 steps), ms a step: W8A8
 * 0.38 -> 0.28 at 1 sequence, 2.04 -> 1.82 at 64, 5.46 -> 4.75 at 192 (even at 8); BF16 0.49 ->
 * 0.24, 0.65 -> 0.58 at 8, 2.32 -> 1.92, 6.11 -> 5.07. */
static void absorb_o_t_task(void *arg, int thread, int n_threads) {
    attn_ctx *a = arg;
    const ds_config *c = &a->m->cfg;
    const ds_kernels *k = ds_kernels_get();
    const int64_t H = local_heads(a->m), R = c->kv_lora_rank, dn = c->qk_nope_head_dim;
    const int64_t dv = c->v_head_dim;
    float *conv =
        a->b->thread_buf + (size_t)thread * a->b->thread_floats + a->row_off; /* [R][dv] */
    float *sc = conv + R * dv, *tmp = sc + dv; /* W_UV's row scales (int8), a converted row */
    const ds_mat *wb = &a->L->kv_b;
    const int bf16 = wb->dtype == DS_BF16, gemm = a->n >= ABSORB_GEMM_MIN_TOK;
    const int in_regs =
        !gemm && (bf16 ? DS_KERNELS_OWN(k, axpy_rows_bf16) : DS_KERNELS_OWN(k, axpy_rows_i8_lanes));
    const float **rows = gemm ? malloc((size_t)R * sizeof *rows) : NULL;
    DS_ASSERT(rows || !gemm);
    size_t h0, h1;
    ds_split_range((size_t)H, thread, n_threads, &h0, &h1);
    for (int64_t h = (int64_t)h0; h < (int64_t)h1; h++) {
        const int64_t r0 = h * (dn + dv) + dn; /* kv_b's row of W_UV[h]'s row 0 */
        const uint16_t *u16 = (const uint16_t *)wb->data + r0 * R;
        const int8_t *u8 = (const int8_t *)wb->data + r0 * R;
        for (int64_t d = 0; !bf16 && d < dv; d++) /* the row's scale; its bytes moved */
            ds_mat_i8_row(wb, r0 + d, &sc[d]);
        const float *x0 = a->b->o_lat + h * R;
        float *o0 = a->o + h * dv;
        if (in_regs) { /* W_UV[h]'s rows one after another; the column scales in sc */
            for (int64_t t = 0; t < a->n; t++) {
                float *o = o0 + t * H * dv;
                if (bf16)
                    k->axpy_rows_bf16(o, x0 + t * H * R, u16, (size_t)R, (size_t)dv);
                else
                    k->axpy_rows_i8_lanes(o, x0 + t * H * R, u8, (size_t)R, (size_t)dv, sc);
            }
            continue;
        }
        for (int64_t t = 0; !gemm && t < a->n; t++) /* axpy adds the rows to zeros */
            memset(o0 + t * H * dv, 0, (size_t)dv * sizeof(float));
        for (int64_t j = 0; j < R; j++) {
            float *row = gemm ? conv + j * dv : tmp;
            if (bf16 && gemm)
                k->bf16_to_f32(row, u16 + j * dv, (size_t)dv);
            else if (!bf16)
                k->i8_to_f32_lanes(row, u8 + j * dv, (size_t)dv, sc);
            if (gemm) {
                rows[j] = row;
                continue;
            }
            for (int64_t t = 0; t < a->n; t++) {
                const float xj = x0[t * H * R + j];
                if (bf16)
                    k->axpy_bf16(o0 + t * H * dv, xj, u16 + j * dv, (size_t)dv);
                else
                    k->axpy_f32(o0 + t * H * dv, xj, row, (size_t)dv);
            }
        }
        if (gemm) rows_gemm(k, rows, R, dv, x0, H * R, a->n, o0, H * dv);
    }
    free(rows);
}

/* MindSpore checkpoints store the rope rows of q_b and kv_a per head as the even dimensions
 * then the odd ones (ds_format_rope_split): x[0, dr) back to interleaved pairs. */
static void rope_unsplit(float *x, int64_t dr) {
    float t[DS_MAX_ROPE_DIM];
    memcpy(t, x, (size_t)dr * sizeof(float));
    for (int64_t i = 0; i < dr / 2; i++) {
        x[2 * i] = t[i];
        x[2 * i + 1] = t[dr / 2 + i];
    }
}

/* Per token of the chunk: its latent normed and its rope key rotated into its cache slot, and the
 * rope part of each head's query rotated. Threads split the tokens: on the caller's thread alone,
 * with the rope table made per layer, this took 10 - 11 ms of a ~400 ms W8A8 step at 192
 * sequences (medium), now 2 - 5 ms. Distinct tokens of a step have distinct slots. */
static void cache_store_task(void *arg, int thread, int n_threads) {
    attn_ctx *a = arg;
    const ds_config *c = &a->m->cfg;
    const ds_layer *L = a->L;
    int64_t H = local_heads(a->m), R = c->kv_lora_rank, dr = c->qk_rope_head_dim;
    int64_t qk = c->qk_nope_head_dim + dr;
    float *lat = a->b->thread_buf + (size_t)thread * a->b->thread_floats + a->row_off;
    float pe[DS_MAX_ROPE_DIM];
    size_t t0, t1;
    ds_split_range((size_t)a->n, thread, n_threads, &t0, &t1);
    for (int64_t t = (int64_t)t0; t < (int64_t)t1; t++) {
        int64_t pos = a->bt->positions[a->i0 + t], slot = slot_of(a->kv, a->bt, a->i0 + t, pos);
        const float *kvt = a->b->kv + t * (R + dr), *cs = a->b->rope + t * dr;
        float *q = a->b->q + t * H * qk + c->qk_nope_head_dim;
        const rows_op norm = {.fn = norm_fn,
                              .out = lat,
                              .in = kvt,
                              .w = L->kv_a_norm,
                              .bias = L->kv_a_norm_bias,
                              .width = R,
                              .eps = c->rms_norm_eps};
        norm_fn(&norm, 0, 1);
        ds_kv_store(a->kv, ds_kv_latent_at(a->kv, a->layer, slot), lat, R);
        memcpy(pe, kvt + R, (size_t)dr * sizeof(float));
        if (a->m->rope_split) rope_unsplit(pe, dr);
        ds_rope_rotate(pe, cs, dr);
        ds_kv_store(a->kv, ds_kv_pe_at(a->kv, a->layer, slot), pe, dr);
        for (int64_t h = 0; h < H; h++) {
            if (a->m->rope_split) rope_unsplit(q + h * qk, dr);
            ds_rope_rotate(q + h * qk, cs, dr);
        }
    }
}

/* b->a = MLA(b->h) for the chunk's tokens; writes their latents to their cache slots first. */
static int attention(ds_model *m, const ds_layer *L, int64_t l, ds_kv_cache *kv, fwd_bufs *b,
                     const ds_batch *bt, int64_t i0, int64_t n, int64_t max_ctx) {
    const ds_config *c = &m->cfg;
    int64_t H = local_heads(m), R = c->kv_lora_rank, dr = c->qk_rope_head_dim;
    /* the projections of the normed input run together (one pool run, not two) */
    const ds_mm_job in[2] = {c->q_lora_rank ? (ds_mm_job){b->qa, b->h, n, &L->q_a, NULL}
                                            : (ds_mm_job){b->q, b->h, n, &L->q_b, NULL},
                             {b->kv, b->h, n, &L->kv_a, NULL}};
    mm_jobs(m, in, 2);
    if (c->q_lora_rank) {
        rmsnorm_rows(m, b->qa, b->qa, L->q_a_norm, L->q_a_norm_bias, n, c->q_lora_rank);
        trace(m, "layers.%lld.q_a_norm_out", l, b->qa, n, c->q_lora_rank);
        mm(m, b->q, b->qa, n, &L->q_b);
    }
    int split = m->shard.size > 1;
    float *o =
        split ? ds_shard_buf(&m->part, &m->part_floats, (size_t)(n * H * c->v_head_dim)) : b->o;
    if (!o) return DS_ERR_NOMEM;
    const int64_t groups = attend_groups(H, max_ctx), ld = scores_floats(max_ctx) / 16;
    attn_ctx a = {m, L, kv, b, bt, i0, n, l, groups * scores_floats(max_ctx), ld, groups, o};
    if (n > 1)
        ds_pool_run(m->pool, cache_store_task, &a);
    else
        cache_store_task(&a, 0, 1);
    /* cost: kv_b read once (rows dequantised per call), per token and head the absorptions
     * (nope + v rows of kv_lora_rank) and, per attended position, scores and weighted sums */
    m->cost.weight_bytes += ds_mat_bytes(&L->kv_b);
    for (int64_t t = 0; t < n; t++) {
        uint64_t S = (uint64_t)bt->positions[i0 + t] + 1;
        m->cost.kv_bytes += S * (uint64_t)(R + dr) * kv->esz;
        m->cost.macs_attn +=
            (uint64_t)H * ((uint64_t)(c->qk_nope_head_dim + c->v_head_dim) * (uint64_t)R +
                           S * (uint64_t)(2 * R + dr));
    }
    ds_pool_run(m->pool, absorb_q_task, &a);
    ds_pool_run(m->pool, ds_kernels_fgemm_native(ds_kernels_get()) ? attend_task : attend_head_task,
                &a);
    ds_pool_run(m->pool, L->uv_t ? absorb_o_t_task : absorb_o_task, &a);
    if (split) {
        int rc = ds_shard_gather_cols(m, o, n, c->n_heads, c->v_head_dim, b->o);
        if (rc) return rc;
    }
    trace(m, "layers.%lld.o_proj_in", l, b->o, n, c->n_heads * c->v_head_dim);
    return mm_split(m, b->a, b->o, n, &L->o, c->hidden_size);
}

/* ---- feed-forward ---- */

/* out[n, hidden] = down(silu(gate(x)) * up(x)), using b->g and b->u as temporaries. `width`
 * > 0: the MLP is split across ranks (shard.c) and is that wide in all; 0: whole (an expert). */
static int mlp(ds_model *m, const ds_mlp *p, const float *x, int64_t n, float *out, fwd_bufs *b,
               int64_t width) {
    const ds_mm_job gu[2] = {{b->g, x, n, &p->gate, NULL}, {b->u, x, n, &p->up, NULL}};
    mm_jobs(m, gu, 2);
    swiglu_rows(m, b->g, b->u, n, p->gate.rows);
    if (!width || m->shard.size == 1) {
        mm(m, out, b->g, n, &p->down);
        return DS_OK;
    }
    int rc = ds_shard_gather_cols(m, b->g, n, width, 1, b->u);
    return rc ? rc : mm_split(m, out, b->u, n, &p->down, m->cfg.hidden_size);
}

/* out[j] = in[idx[j] / k]: the rows of the tokens of (token, choice) pairs idx */
static void gather_fn(const rows_op *op, int64_t r0, int64_t r1) {
    for (int64_t j = r0; j < r1; j++)
        memcpy(op->out + j * op->width, op->in + (op->idx[j] / op->k) * op->width,
               (size_t)op->width * sizeof(float));
}

/* Columns [c0, c1) of out[idx[j] / k] += topw[idx[j]] * in[j] for the width rows j in order (the
 * experts' outputs, hidden wide, weighted into their tokens' sums). */
static void weigh_fn(const rows_op *op, int64_t c0, int64_t c1) {
    const int64_t D = op->count;
    for (int64_t j = 0; j < op->width; j++) {
        int32_t i = op->idx[j];
        ds_kernels_get()->axpy_f32(op->out + (i / op->k) * D + c0, op->topw[i], op->in + j * D + c0,
                                   (size_t)(c1 - c0));
    }
}

typedef struct {
    const ds_config *c;
    const ds_layer *L;
    fwd_bufs *b;
    int64_t n;
} route_ctx;

/* Chooses the experts and weights of tokens [t0, t1) (see the essay at the top). */
static void route_tokens(const route_ctx *r, int64_t t0, int64_t t1) {
    const ds_config *c = r->c;
    const ds_layer *L = r->L;
    fwd_bufs *b = r->b;
    int64_t E = c->n_routed_experts, K = c->n_experts_per_tok, G = c->n_group;
    int64_t per_group = E / G;
    for (int64_t t = t0; t < t1; t++) {
        float *sc = b->router + t * E; /* sigmoid scores, unbiased */
        float biased[DS_MAX_EXPERTS];
        int group_ok[DS_MAX_EXPERTS];
        for (int64_t e = 0; e < E; e++) {
            sc[e] = 1.0f / (1.0f + expf(-sc[e]));
            biased[e] = sc[e] + L->router_bias[e];
        }
        for (int64_t g = 0; g < G; g++) group_ok[g] = 1;
        if (G > 1) {
            float gscore[DS_MAX_EXPERTS];
            for (int64_t g = 0; g < G; g++) {
                float b1 = -INFINITY, b2 = -INFINITY;
                for (int64_t e = g * per_group; e < (g + 1) * per_group; e++) {
                    if (biased[e] > b1)
                        b2 = b1, b1 = biased[e];
                    else if (biased[e] > b2)
                        b2 = biased[e];
                }
                gscore[g] = b1 + b2;
                group_ok[g] = 0;
            }
            for (int64_t j = 0; j < c->topk_group; j++) {
                int64_t best = -1;
                for (int64_t g = 0; g < G; g++)
                    if (!group_ok[g] && (best < 0 || gscore[g] > gscore[best])) best = g;
                group_ok[best] = 1;
            }
        }
        /* K <= topk_group * per_group (checked in config), so an eligible expert always
         * remains; a NaN score can only lose comparisons, never leave best at -1. */
        unsigned char taken[DS_MAX_EXPERTS] = {0};
        float wsum = 0;
        for (int64_t j = 0; j < K; j++) {
            int64_t best = -1;
            for (int64_t e = 0; e < E; e++) {
                if (!group_ok[e / per_group] || taken[e]) continue;
                if (best < 0 || biased[e] > biased[best]) best = e;
            }
            taken[best] = 1;
            b->tope[t * K + j] = (int32_t)best;
            b->topw[t * K + j] = sc[best];
            wsum += sc[best];
        }
        for (int64_t j = 0; j < K; j++) {
            if (c->norm_topk_prob) b->topw[t * K + j] /= wsum;
            b->topw[t * K + j] *= c->routed_scaling_factor;
        }
    }
}

static void route_task(void *arg, int slice, int n_slices) {
    const route_ctx *r = arg;
    size_t t0, t1;
    ds_split_range((size_t)r->n, slice, n_slices, &t0, &t1);
    route_tokens(r, (int64_t)t0, (int64_t)t1);
}

/* Tokens route independently, so the pool splits them once there are experts x tokens enough
 * to pay for a pool run. On the caller's thread alone, routing took 0.79 ms of a 240 ms W8A8
 * step at 192 sequences (medium: 32 experts, 4 chosen); split, the router's phase (its matmul
 * included) went 2.22 -> 1.66 ms at 192 and 0.77 -> 0.60 at 64 (alternating step by step). A
 * DeepSeek-R1 token (256 experts, 8 chosen) scans 16 times as many. */
#define ROUTE_PAR_MIN 2048

static void route(ds_model *m, const ds_layer *L, fwd_bufs *b, int64_t n) {
    route_ctx r = {&m->cfg, L, b, n};
    if (n < 2 || n * m->cfg.n_routed_experts < ROUTE_PAR_MIN || ds_pool_size(m->pool) == 1)
        route_tokens(&r, 0, n);
    else
        ds_pool_run(m->pool, route_task, &r);
}

/* Ranks > 0 (shard.c): the routed sum so far arrives from the rank before, which holds the
 * lower-numbered experts; this rank's stored weighted outputs are added to it in expert order,
 * as one rank would have, and it goes on to the next rank. The last rank hands the sum to all. */
static int moe_chain(ds_model *m, fwd_bufs *b, int64_t n, size_t used) {
    const ds_shard *sh = &m->shard;
    int64_t D = m->cfg.hidden_size, K = m->cfg.n_experts_per_tok;
    size_t floats = (size_t)(n * D);
    int rc = DS_OK;
    if (sh->rank > 0) {
        rc = ds_dist_recv_f32(b->a, floats, sh->rank - 1);
        for (size_t s = 0; !rc && s < used; s++) {
            int32_t i = m->moe_slot[s];
            ds_kernels_get()->axpy_f32(b->a + (i / K) * D, b->topw[i], m->moe_out + s * D,
                                       (size_t)D);
        }
    }
    if (!rc && sh->rank < sh->size - 1) rc = ds_dist_send_f32(b->a, floats, sh->rank + 1);
    return rc ? rc : ds_dist_bcast(b->a, floats * sizeof(float), sh->size - 1, 0);
}

/* At a few tokens an expert (MOE_PIPE_MAX_TOK on average, at most) each expert's whole chain is
 * one pool slice: gather its tokens, gate and up, SwiGLU, down, on one thread (the matmuls
 * without the pool), the experts with the most tokens claimed first. The pooled form runs a
 * group as four ds_matmul_jobs pool runs, plus the gather's and SwiGLU's, each ending in a wait
 * for the slower thread with memory idle. The floats are the same: ds_matmul_jobs computes a job
 * as ds_matmul does, pool or not. Medium W8A8, pooled and pipelined alternating step by step
 * (medians of 48 steps, ms a step): 7.33 -> 7.09 at 1 sequence, 20.05 -> 19.32 at 8, 53.84 ->
 * 52.56 at 32 (4 tokens an expert), 94.77 -> 93.97 at 64 (8); BF16 10.34 -> 10.07, 24.73 ->
 * 24.08, 64.48 -> 63.40, 120.81 -> 120.54. At 12 and 16 tokens an expert even, at 24 slower
 * (242.2 -> 245.8 at 192 sequences): an expert's rows then keep both threads busy. */
#define MOE_PIPE_MAX_TOK 8

/* One group of experts: ex[j] the j-th with tokens in expert order, its gate and up jobs
 * gu[2j], gu[2j + 1], its down job down[j]; order[] those j by tokens, descending. shared: NULL,
 * or the shared experts' gate, up and down jobs over all the chunk's tokens, slice 0 (they have
 * the most tokens).
 *
 * Why the shared experts run among the routed ones: at a few tokens an expert the routed chains
 * are bound by their weights' reads and the shared experts' by their arithmetic (from
 * MOE_PIPE_MAX_TOK tokens), so one thread computes the shared experts while the other streams
 * routed experts. Run after the group as three pool runs, their arithmetic had the memory idle.
 * Below MOE_PIPE_MAX_TOK tokens they are read-bound too, and one more chain only unbalanced the
 * threads (BF16 at 1 sequence 2.4% slower, twice). Medium models, 2-vCPU Zen 3 VM, the two
 * alternating step by step (medians of 24 - 32 steps, both models), steps faster by: 32
 * sequences +1.5% on average over twelve runs (-6.5 to +6.6%), 64 sequences +1.7% over eight
 * (-3.0 to +4.6%), 8 sequences even (-4.9 to +10.4%, twelve runs). */
typedef struct {
    const rows_op *gather; /* the group's pairs' rows (row r: pair p0 + r) */
    const int32_t *start, *ex, *order;
    int64_t p0;
    const ds_mm_job *gu, *down, *shared;
} moe_pipe;

static void moe_pipe_task(void *arg, int slice, int n_slices) {
    (void)n_slices;
    const moe_pipe *mp = arg;
    const ds_mm_job *gate = mp->shared, *down = gate ? gate + 2 : NULL;
    if (!gate || slice > 0) {
        const int32_t j = mp->order[slice - !!gate], e = mp->ex[j];
        const int64_t o = mp->start[e] - mp->p0;
        gate = mp->gu + 2 * j, down = mp->down + j;
        mp->gather->fn(mp->gather, o, o + gate->n_tok);
    }
    ds_matmul_jobs(NULL, gate, 2);
    ds_swiglu(gate[0].y, gate[1].y, gate->n_tok * gate->w->rows);
    ds_matmul_jobs(NULL, down, 1);
}

/* b->a = MoE(b->h): routed experts over their gathered tokens, then the shared experts; these
 * computed beside the first group of routed experts that runs as a pipeline (moe_pipe). */
static int moe(ds_model *m, const ds_layer *L, int64_t l, fwd_bufs *b, int64_t n) {
    const ds_config *c = &m->cfg;
    const ds_shard *sh = &m->shard;
    int64_t D = c->hidden_size, K = c->n_experts_per_tok;
    int stash = sh->rank > 0; /* outputs wait for the earlier ranks' sum (moe_chain) */
    int rc;
    mm(m, b->router, b->h, n, &L->router);
    route(m, L, b, n);
    if (m->trace) {
        float *ids = b->xs; /* free until the experts run */
        for (int64_t i = 0; i < n * K; i++) ids[i] = (float)b->tope[i];
        trace(m, "layers.%lld.moe.gate_weights", l, b->topw, n, K);
        trace(m, "layers.%lld.moe.gate_experts", l, ids, n, K);
    }
    size_t used = 0;
    if (stash) {
        size_t mine = 0;
        for (int64_t i = 0; i < n * K; i++)
            mine += b->tope[i] >= sh->experts.lo && b->tope[i] < sh->experts.hi;
        mine += !mine; /* no token may choose this rank's experts: still a valid buffer */
        if (mine > m->moe_slots) {
            free(m->moe_slot);
            m->moe_slot = malloc(mine * sizeof(int32_t));
            m->moe_slots = m->moe_slot ? mine : 0;
        }
        if (!m->moe_slot || !ds_shard_buf(&m->moe_out, &m->moe_floats, mine * (size_t)D))
            return ds_err_set(DS_ERR_NOMEM, "out of memory (expert outputs)");
    } else {
        memset(b->a, 0, (size_t)(n * D) * sizeof(float));
    }
    /* the (token, choice) pairs i = t * K + j grouped by expert, in pair order within one */
    int64_t lo = sh->experts.lo, hi = sh->experts.hi;
    int32_t start[DS_MAX_EXPERTS + 1] = {0}, fill[DS_MAX_EXPERTS];
    for (int64_t i = 0; i < n * K; i++) start[b->tope[i] + 1]++;
    for (int64_t e = 0; e < c->n_routed_experts; e++) start[e + 1] += start[e];
    memcpy(fill, start, (size_t)c->n_routed_experts * sizeof(int32_t));
    for (int64_t i = 0; i < n * K; i++) b->by_expert[fill[b->tope[i]]++] = (int32_t)i;
    /* gate and up jobs, then down jobs, a group's experts each (never malloc(0)) */
    ds_mm_job *jobs = malloc((size_t)(3 * (hi - lo) + 1) * sizeof *jobs);
    if (!jobs) return ds_err_set(DS_ERR_NOMEM, "out of memory (expert jobs)");
    /* experts in groups of at most G pairs (the buffers' rows; one expert has at most n <= G),
     * each group's matmuls run together: each expert's chain a task (moe_pipe_task), or gate and
     * up, then down (ds_matmul_jobs) */
    const int64_t ie = c->moe_intermediate_size, G = group_pairs(c, n);
    /* the shared experts' jobs, their rows after the routed ones' (buf_sizes) */
    const ds_mm_job sj[3] = {{b->g + G * ie, b->h, n, &L->shared.gate, NULL},
                             {b->u + G * ie, b->h, n, &L->shared.up, NULL},
                             {b->d + G * D, b->g + G * ie, n, &L->shared.down, NULL}};
    int shared_done = !L->shared.gate.rows;
    for (int64_t e0 = lo, e1; e0 < hi; e0 = e1) {
        const int64_t p0 = start[e0];
        for (e1 = e0 + 1; e1 < hi && start[e1 + 1] - p0 <= G;) e1++;
        const int64_t rows = start[e1] - p0;
        if (!rows) continue;
        float *d = stash ? m->moe_out + used * (size_t)D : b->d;
        rows_op gather = {gather_fn,         b->xs, NULL, b->h, NULL, NULL, NULL,
                          b->by_expert + p0, D,     K,    0,    0};
        int32_t ex[DS_MAX_EXPERTS], order[DS_MAX_EXPERTS];
        int nx = 0;
        for (int64_t e = e0; e < e1; e++) {
            const int64_t o = start[e] - p0, cnt = start[e + 1] - start[e];
            if (!cnt) continue;
            jobs[2 * nx] =
                (ds_mm_job){b->g + o * ie, b->xs + o * D, cnt, &L->experts[e].gate, NULL};
            jobs[2 * nx + 1] =
                (ds_mm_job){b->u + o * ie, b->xs + o * D, cnt, &L->experts[e].up, NULL};
            ex[nx++] = (int32_t)e;
        }
        ds_mm_job *down = jobs + 2 * nx;
        for (int j = 0; j < nx; j++)
            down[j] = (ds_mm_job){d + (start[ex[j]] - p0) * D, jobs[2 * j].y, jobs[2 * j].n_tok,
                                  &L->experts[ex[j]].down, NULL};
        if (rows <= MOE_PIPE_MAX_TOK * nx) {
            for (int j = 0; j < nx; j++) { /* insertion: ties keep expert order */
                int i = j;
                for (; i > 0 && jobs[2 * order[i - 1]].n_tok < jobs[2 * j].n_tok; i--)
                    order[i] = order[i - 1];
                order[i] = j;
            }
            const int with_sh = !shared_done && sh->size == 1 && n >= MOE_PIPE_MAX_TOK;
            moe_pipe mp = {&gather, start, ex, order, p0, jobs, down, with_sh ? sj : NULL};
            ds_pool_run_slices(m->pool, moe_pipe_task, &mp, nx + with_sh);
            count_jobs(m, jobs, 3 * nx);
            if (with_sh) count_jobs(m, sj, 3);
            shared_done |= with_sh;
        } else {
            run_rows(m, &gather, rows);
            mm_jobs(m, jobs, 2 * nx);
            swiglu_rows(m, b->g, b->u, rows, ie);
            mm_jobs(m, down, nx);
        }
        if (stash) {
            for (int64_t j = 0; j < rows; j++) m->moe_slot[used++] = b->by_expert[p0 + j];
        } else { /* split by columns: each output keeps its experts' order */
            rows_op acc = {weigh_fn,          b->a, NULL, d, NULL, NULL, b->topw,
                           b->by_expert + p0, rows, K,    0, 0};
            run_rows(m, &acc, D);
        }
    }
    free(jobs);
    if (sh->size > 1 && (rc = moe_chain(m, b, n, used))) return rc;
    if (L->shared.gate.rows) {
        int64_t width = c->moe_intermediate_size * c->n_shared_experts;
        if (!shared_done && (rc = mlp(m, &L->shared, b->h, n, sj[2].y, b, width))) return rc;
        trace(m, "layers.%lld.moe.shared_out", l, sj[2].y, n, D);
        add_rows(m, b->a, sj[2].y, n, D);
    }
    return DS_OK;
}

/* ---- the network ---- */

/* The norm ahead of layer l: its attention norm, or past the last layer the final norm. */
static const float *norm_ahead(const ds_model *m, int64_t l, const float **bias) {
    const int last = l == m->cfg.n_layers;
    *bias = last ? m->final_norm_bias : m->layers[l].attn_norm_bias;
    return last ? m->final_norm : m->layers[l].attn_norm;
}

typedef struct {
    const float *logits;
    int32_t *argmax;
    int64_t n, vocab;
} argmax_ctx;

static void argmax_task(void *arg, int slice, int n_slices) {
    const argmax_ctx *a = arg;
    size_t i0, i1;
    ds_split_range((size_t)a->n, slice, n_slices, &i0, &i1);
    for (size_t i = i0; i < i1; i++)
        a->argmax[i] = (int32_t)ds_kernels_get()->argmax_f32(a->logits + i * (size_t)a->vocab,
                                                             (size_t)a->vocab);
}

/* Tokens [i0, i0 + n) of a batch; logits (and argmax) for those of logits_idx[*li ..] in range,
 * advancing *li. */
static int forward_chunk(ds_model *m, ds_kv_cache *kv, const ds_batch *bt, int64_t i0, int64_t n,
                         int64_t max_ctx, float *logits, int32_t *argmax, int32_t *li) {
    const ds_config *c = &m->cfg;
    int64_t D = c->hidden_size;
    fwd_bufs b;
    int rc = setup_bufs(m, max_ctx, n, &b);
    if (rc) return rc;
    const ds_span vs = m->shard.vocab; /* the embedding rows this rank holds; others add zeros */
    for (int64_t t = 0; t < n; t++)    /* the same for every layer */
        ds_rope_table(m, bt->positions[i0 + t], b.rope + t * c->qk_rope_head_dim);
    for (int64_t t = 0; t < n; t++) {
        int32_t tok = bt->tokens[i0 + t];
        if (tok >= vs.lo && tok < vs.hi)
            ds_mat_row_f32(&m->embed, tok - vs.lo, b.x + t * D);
        else
            memset(b.x + t * D, 0, (size_t)D * sizeof(float));
    }
    if (m->shard.size > 1 && (rc = ds_dist_allreduce_sum_f32(b.x, (size_t)(n * D)))) return rc;
    trace(m, "embed", 0, b.x, n, D);
    /* each residual add runs with the norm after it (norm_ahead); b.h holds every norm's output */
    const float *nw, *nb;
    nw = norm_ahead(m, 0, &nb);
    rmsnorm_rows(m, b.h, b.x, nw, nb, n, D);
    for (int64_t l = 0; l < c->n_layers; l++) {
        const ds_layer *L = &m->layers[l];
        trace(m, "layers.%lld.attn_norm_out", l, b.h, n, D);
        if ((rc = attention(m, L, l, kv, &b, bt, i0, n, max_ctx))) return rc;
        trace(m, "layers.%lld.attn_out", l, b.a, n, D);
        add_rmsnorm_rows(m, b.x, b.a, b.h, L->ffn_norm, L->ffn_norm_bias, n, D);
        trace(m, "layers.%lld.ffn_norm_out", l, b.h, n, D);
        rc =
            L->moe ? moe(m, L, l, &b, n) : mlp(m, &L->dense, b.h, n, b.a, &b, c->intermediate_size);
        if (rc) return rc;
        trace(m, "layers.%lld.ffn_out", l, b.a, n, D);
        nw = norm_ahead(m, l + 1, &nb);
        add_rmsnorm_rows(m, b.x, b.a, b.h, nw, nb, n, D);
        trace(m, "layers.%lld.out", l, b.x, n, D);
    }
    trace(m, "final_norm_out", 0, b.h, n, D);
    /* the rows that want logits, packed in order within b.h (a row moves to one at or before
     * it), through lm_head at once */
    int32_t j0 = *li, nl = 0;
    while (j0 + nl < bt->n_logits && bt->logits_idx[j0 + nl] < i0 + n) {
        int64_t t = bt->logits_idx[j0 + nl] - i0;
        memmove(b.h + nl * D, b.h + t * D, (size_t)D * sizeof(float));
        nl++;
    }
    /* logits is NULL on ranks > 0: their vocabulary rows go to rank 0, whose argmax, when asked
     * for, is a pass over the gathered rows (one rank: taken tile by tile in lm_head) */
    float *out = logits ? logits + (size_t)j0 * (size_t)c->vocab_size : NULL;
    int32_t *am = argmax ? argmax + j0 : NULL;
    if (nl && m->shard.size == 1) {
        const ds_mm_job j = {out, b.h, nl, &m->lm_head, am};
        mm_jobs(m, &j, 1);
    } else if (nl) {
        float *part = ds_shard_buf(&m->part, &m->part_floats, (size_t)nl * (size_t)m->lm_head.rows);
        if (!part) return DS_ERR_NOMEM;
        mm(m, part, b.h, nl, &m->lm_head);
        if ((rc = ds_shard_gather_cols_root(m, part, nl, c->vocab_size, out))) return rc;
        argmax_ctx a = {out, am, nl, c->vocab_size};
        if (out && am) ds_pool_run(m->pool, argmax_task, &a);
    }
    *li = j0 + nl;
    return DS_OK;
}

/* Every index of the batch in range, so that nothing below can read or write out of bounds. */
static int check_batch(const ds_model *m, const ds_kv_cache *kv, const ds_batch *bt,
                       int64_t *max_ctx) {
    const ds_config *c = &m->cfg;
    if (kv->n_layers != c->n_layers || kv->kv_lora_rank != c->kv_lora_rank ||
        kv->rope_dim != c->qk_rope_head_dim)
        return ds_err_set(DS_ERR_ARG, "forward: KV cache was made for another model shape");
    if (bt->n_tokens < 1 || bt->n_seqs < 1 || bt->max_blocks < 1 || bt->n_logits < 0)
        return ds_err_set(DS_ERR_ARG, "forward: empty batch (%d tokens, %d sequences)",
                          bt->n_tokens, bt->n_seqs);
    *max_ctx = 0;
    for (int32_t i = 0; i < bt->n_tokens; i++) {
        int32_t tok = bt->tokens[i], pos = bt->positions[i], s = bt->seq[i];
        if (tok < 0 || tok >= c->vocab_size)
            return ds_err_set(DS_ERR_RANGE,
                              "token id %d at index %d is outside the vocabulary "
                              "[0, %lld)",
                              tok, i, (long long)c->vocab_size);
        if (s < 0 || s >= bt->n_seqs)
            return ds_err_set(DS_ERR_RANGE, "token %d names sequence %d of %d", i, s, bt->n_seqs);
        if (pos < 0 || pos / kv->block_size >= bt->max_blocks)
            return ds_err_set(DS_ERR_RANGE,
                              "position %d of token %d is outside its block table "
                              "(%d blocks of %lld)",
                              pos, i, bt->max_blocks, (long long)kv->block_size);
        for (int64_t blk = 0; blk <= pos / kv->block_size; blk++) {
            int32_t id = bt->block_tables[(int64_t)s * bt->max_blocks + blk];
            if (id < 0 || id >= kv->n_blocks)
                return ds_err_set(DS_ERR_RANGE,
                                  "block id %d of sequence %d is outside the KV "
                                  "cache's %lld blocks",
                                  id, s, (long long)kv->n_blocks);
        }
        if (pos + 1 > *max_ctx) *max_ctx = pos + 1;
    }
    for (int32_t j = 0; j < bt->n_logits; j++)
        if (bt->logits_idx[j] < 0 || bt->logits_idx[j] >= bt->n_tokens ||
            (j && bt->logits_idx[j] <= bt->logits_idx[j - 1]))
            return ds_err_set(DS_ERR_RANGE,
                              "logits index %d (entry %d) is out of range or out of "
                              "order",
                              bt->logits_idx[j], j);
    return DS_OK;
}

int ds_model_forward_batch(ds_model *m, ds_kv_cache *kv, const ds_batch *bt, float *logits,
                           int32_t *argmax) {
    int64_t max_ctx = 0;
    int rc = check_batch(m, kv, bt, &max_ctx);
    if (rc) return rc;
    int32_t li = 0;
    memset(&m->cost, 0, sizeof m->cost);
    m->cost.weight_bytes +=
        (uint64_t)bt->n_tokens * (ds_mat_bytes(&m->embed) / (uint64_t)m->embed.rows);
    /* rank 0 leads: the other ranks run the same step on their shards (shard.c) */
    if (m->shard.size > 1 && m->shard.rank == 0 && (rc = ds_shard_send_step(kv, bt))) return rc;
    for (int64_t done = 0; done < bt->n_tokens;) {
        int64_t len = bt->n_tokens - done < m->max_batch ? bt->n_tokens - done : m->max_batch;
        rc = forward_chunk(m, kv, bt, done, len, max_ctx, logits, argmax, &li);
        if (rc) return rc;
        done += len;
    }
    return DS_OK;
}

int ds_model_forward(ds_model *m, ds_kv_cache *kv, const int32_t *tokens, int64_t n,
                     int64_t start_pos, float *logits, int all_logits) {
    if (n < 1) return ds_err_set(DS_ERR_ARG, "forward: no tokens");
    if (start_pos < 0 || start_pos + n > kv->cap)
        return ds_err_set(DS_ERR_RANGE,
                          "forward: positions %lld..%lld exceed the KV cache of %lld tokens",
                          (long long)start_pos, (long long)(start_pos + n - 1), (long long)kv->cap);
    /* one sequence whose block table is the cache's blocks in order: slot = position */
    int32_t *pos = malloc((size_t)n * sizeof(int32_t)), *seq = calloc((size_t)n, sizeof(int32_t));
    int32_t *table = malloc((size_t)kv->n_blocks * sizeof(int32_t));
    int32_t *lidx = malloc((size_t)n * sizeof(int32_t));
    int rc;
    if (!pos || !seq || !table || !lidx) {
        rc = ds_err_set(DS_ERR_NOMEM, "out of memory (forward of %lld tokens)", (long long)n);
        goto out;
    }
    for (int64_t i = 0; i < n; i++) {
        pos[i] = (int32_t)(start_pos + i);
        lidx[i] = (int32_t)i;
    }
    for (int64_t i = 0; i < kv->n_blocks; i++) table[i] = (int32_t)i;
    ds_batch bt = {(int32_t)n,
                   tokens,
                   pos,
                   seq,
                   1,
                   (int32_t)kv->n_blocks,
                   table,
                   all_logits ? (int32_t)n : 1,
                   all_logits ? lidx : lidx + n - 1};
    rc = ds_model_forward_batch(m, kv, &bt, logits, NULL);
out:
    free(pos);
    free(seq);
    free(table);
    free(lidx);
    return rc;
}

void ds_model_last_cost(const ds_model *m, ds_forward_cost *out) {
    *out = m->cost;
}
