/* dsinfer bench-model --batch 1,8,...: aggregate decode speed of B sequences decoding together,
 * each batch size set against its own limit measured in the same run.
 *
 * A decode step of B sequences reads every weight it touches once (attention and dense layers,
 * the router, lm_head, and only the experts the B tokens were routed to), reads each sequence's
 * KV cache, and does B tokens' worth of multiply-adds. So its time is at least the larger of
 *   memory:  (weight bytes + KV bytes the step read) / the read bandwidth measured here
 *   compute: int8 MACs / the int8 matmul rate + float-weight MACs / that dtype's matmul rate
 *            + attention MACs / the f32 matmul rate
 * and the figure is limit / actual per step. The byte and MAC counts come from the forward pass
 * itself (ds_model_last_cost), so they follow the real routing of the real tokens.
 *
 * Each rate is this machine's best: the read bandwidth and ds_matmul's multiply-add rates (best
 * over a large and a cache-resident shape, see matmul_rate) are measured again before every batch
 * size and once after the last, and every row is set against the best of all of them, printed
 * at the end. The VM this is measured on moves by a third between minutes; one measurement at the
 * start made the batch sizes that ran in a slow minute look closer to their limit than they were,
 * and a rate measured only at 256 tokens on 4096 x 4096 (BF16 93 - 121 GMAC/s) was below what the
 * medium model's lm_head reached at 32 tokens (~148), so the compute limit was not a bound.
 *
 * The best of a whole run is a quiet moment's rate, and on a VM whose neighbours come and go the
 * median step is not measured in one (2-core Zen 3: thirty probes a second apart read 0.67 - 0.71
 * of their best at the median). So a second figure, "paired", sets each step against rates taken
 * beside it: a quick probe (one pass over the bandwidth buffer, each dtype's fastest shape of
 * matmul_rate only) runs before the first step and after every step, a step's limit is the larger
 * bound at the better of the probes on either side of it, and the column is the median over the
 * steps of limit / step. It reads the code's efficiency through a neighbour's noise; the limit
 * column stays the strict figure. The probes also count towards the run's best rates. Between
 * steps they leave the caches holding their own buffers, which only matters to a model whose
 * weights would otherwise stay in the last-level cache from step to step (the demo model).
 *
 * Method: the largest batch's sequences are prefilled once (random prompts of --context tokens,
 * their own blocks), then for each batch size the first B sequences decode --decode-tokens steps
 * from position --context on (overwriting the same positions each time), greedy as the engine
 * samples plain greedy requests (the argmax lm_head returns); each step is timed alone and the
 * median is reported. */
#include "cli/cli.h"
#include "kernels/kernels.h"

#include <stdlib.h>
#include <string.h>

/* A timed ds_matmul: an R x C matrix of dtype dt (I8: per-channel W8A8) laid out as loaded
 * weights are, against T tokens. */
typedef struct {
    ds_mat m;
    unsigned char *w; /* m's data and scales, owned */
    float *scale, *x, *y;
    int64_t T;
} mm_probe;

static void mm_probe_close(mm_probe *p) {
    free(p->w);
    free(p->scale);
    free(p->x);
    free(p->y);
    *p = (mm_probe){0};
}

static int mm_probe_open(mm_probe *p, ds_dtype dt, int64_t R, int64_t C, int64_t T) {
    size_t esz = dt == DS_I8 ? 1 : ds_dtype_size(dt);
    unsigned char *w = malloc((size_t)(R * C) * esz);
    float *scale = malloc((size_t)R * (size_t)(C / 128) * sizeof(float));
    *p = (mm_probe){{.dtype = dt,
                     .rows = R,
                     .cols = C,
                     .data = w,
                     .scale = scale,
                     .block_rows = dt == DS_I8 ? 1 : 128,
                     .block_cols = dt == DS_I8 ? C : 128},
                    w,
                    scale,
                    malloc((size_t)(T * C) * sizeof(float)),
                    malloc((size_t)(T * R) * sizeof(float)),
                    T};
    if (!w || !scale || !p->x || !p->y) {
        mm_probe_close(p);
        return 0;
    }
    uint64_t s = 7;
    for (size_t i = 0; i < (size_t)(R * C) * esz; i++) {
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        w[i] = (unsigned char)((s >> 40) & (dt == DS_BF16 || dt == DS_F16 ? 0x3b : 0x77));
    }
    for (int64_t i = 0; i < R * (C / 128); i++) scale[i] = 1e-3f;
    for (int64_t i = 0; i < T * C; i++) p->x[i] = (float)((i * 7919) % 200 - 100) / 100;
    ds_mat_interleave(&p->m); /* as the model lays out its loaded weights */
    return 1;
}

/* Multiply-adds per second, best of `reps` calls: the path that dtype takes at these token
 * counts (BF16: the fused kernels, the others a GEMM); 0 for a probe that could not be had. */
static double mm_probe_rate(ds_pool *pool, const mm_probe *p, int reps) {
    double best = 0;
    for (int it = 0; p->y && it < reps; it++) {
        double t0 = ds_now();
        ds_matmul(pool, p->y, p->x, p->T, &p->m);
        double r = (double)(p->m.rows * p->m.cols * p->T) / (ds_now() - t0);
        if (r > best) best = r;
    }
    return best;
}

/* The shapes whose best rate is a dtype's rate: 4096 x 4096 at 256 tokens and 2048 x 1024 (in
 * cache after its first call) at 32 and 256. The compute bound must be the fastest the kernels
 * go, and which shape that is differs by dtype (int8's GEMM is fastest on the large one, BF16's
 * fused kernel on the small one). */
static const int64_t shapes[3][3] = {{4096, 4096, 256}, {2048, 1024, 32}, {2048, 1024, 256}};

/* The best rate of dtype dt over the shapes; *fastest is that shape's index. */
static double matmul_rate(ds_pool *pool, ds_dtype dt, int *fastest) {
    double best = 0;
    for (int i = 0; i < 3; i++) {
        mm_probe p;
        double r = 0;
        if (mm_probe_open(&p, dt, shapes[i][0], shapes[i][1], shapes[i][2]))
            r = mm_probe_rate(pool, &p, 3);
        mm_probe_close(&p);
        if (r > best) {
            best = r;
            *fastest = i;
        }
    }
    return best;
}

/* The machine's rates: read bandwidth (bytes/s) and multiply-adds/s of the int8, float-weight
 * and f32 matmuls. */
typedef struct {
    double bw, r_int, r_float, r_f32;
} rates;

/* Keeps in *best the higher of each rate. */
static void keep_best(rates *best, const rates *now) {
    best->bw = now->bw > best->bw ? now->bw : best->bw;
    best->r_int = now->r_int > best->r_int ? now->r_int : best->r_int;
    best->r_float = now->r_float > best->r_float ? now->r_float : best->r_float;
    best->r_f32 = now->r_f32 > best->r_f32 ? now->r_f32 : best->r_f32;
}

/* The dtypes whose rates bound a step, in rates' order after bw. */
typedef struct {
    ds_dtype dt[3];
    int fastest[3]; /* each one's fastest shape (matmul_rate), for the probes beside the steps */
} rate_dtypes;

/* Measures every rate again on every shape and keeps in *best the higher of each. */
static void measure_rates(ds_pool *pool, rate_dtypes *d, size_t bw_bytes, rates *best) {
    const rates now = {
        ds_measure_read_bandwidth(pool, bw_bytes), matmul_rate(pool, d->dt[0], &d->fastest[0]),
        matmul_rate(pool, d->dt[1], &d->fastest[1]), matmul_rate(pool, d->dt[2], &d->fastest[2])};
    keep_best(best, &now);
}

/* The rates again in a fraction of the time, beside every step: one pass over the bandwidth
 * buffer, and each dtype's fastest shape only, kept allocated. */
typedef struct {
    ds_bw_probe *bw;
    mm_probe mm[3];
} quick_probe;

static int quick_open(ds_pool *pool, const rate_dtypes *d, size_t bw_bytes, quick_probe *q) {
    int ok = (q->bw = ds_bw_probe_open(pool, bw_bytes)) != NULL;
    for (int i = 0; i < 3; i++) {
        const int64_t *sh = shapes[d->fastest[i]];
        ok &= mm_probe_open(&q->mm[i], d->dt[i], sh[0], sh[1], sh[2]);
    }
    return ok;
}

static void quick_close(quick_probe *q) {
    ds_bw_probe_close(q->bw);
    for (int i = 0; i < 3; i++) mm_probe_close(&q->mm[i]);
}

static rates quick_rates(ds_pool *pool, const quick_probe *q) {
    return (rates){ds_bw_probe_run(q->bw, 1), mm_probe_rate(pool, &q->mm[0], 2),
                   mm_probe_rate(pool, &q->mm[1], 2), mm_probe_rate(pool, &q->mm[2], 2)};
}

/* The bounds of a step of cost c x k at rates r, seconds: memory and compute. */
static void bounds(const ds_forward_cost *c, double k, const rates *r, double *mem, double *comp) {
    *mem = ((double)c->weight_bytes + (double)c->kv_bytes) * k / r->bw;
    *comp = (double)c->macs_int * k / r->r_int + (double)c->macs_float * k / r->r_float +
            (double)c->macs_attn * k / r->r_f32;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

int ds_cli_bench_batch(ds_model *m, const int32_t *batches, int n_batches, long context, long steps,
                       double bw, size_t bw_bytes) {
    const ds_config *c = ds_model_config(m);
    ds_pool *pool = ds_model_pool(m);
    int32_t B = 1;
    for (int i = 0; i < n_batches; i++) B = batches[i] > B ? batches[i] : B;
    const int32_t bs = 16, maxb = (int32_t)((context + steps + bs - 1) / bs);
    const int64_t V = c->vocab_size;
    ds_kv_cache *kv = NULL;
    int32_t *tables = malloc((size_t)B * (size_t)maxb * sizeof(int32_t));
    int32_t *tok = malloc((size_t)B * (size_t)context * sizeof(int32_t));
    int32_t *pos = malloc((size_t)B * (size_t)context * sizeof(int32_t));
    int32_t *seq = malloc((size_t)B * (size_t)context * sizeof(int32_t));
    int32_t *lidx = malloc((size_t)B * sizeof(int32_t)),
            *next = malloc((size_t)B * sizeof(int32_t));
    float *logits = malloc((size_t)B * (size_t)V * sizeof(float));
    double *times = malloc((size_t)steps * sizeof(double)),
           *paired = malloc((size_t)steps * sizeof(double));
    quick_probe qp = {0};
    struct {
        double med;    /* median step, seconds */
        double paired; /* median of the steps' paired fractions */
        ds_forward_cost sum;
    } *rows = calloc((size_t)n_batches, sizeof *rows);
    int rc = DS_ERR_NOMEM;
    if (!tables || !tok || !pos || !seq || !lidx || !next || !logits || !times || !paired ||
        !rows) {
        ds_err_set(DS_ERR_NOMEM, "out of memory for batch %d", B);
        goto out;
    }
    if ((rc = ds_kv_open_paged(c, (int64_t)B * maxb, bs, DS_KV_F32, &kv))) goto out;
    for (int64_t i = 0; i < (int64_t)B * maxb; i++) tables[i] = (int32_t)i;
    /* prefill every sequence once: random prompts, one batch (chunked inside) */
    uint64_t s = 12345;
    int32_t n = 0;
    for (int32_t q = 0; q < B; q++) {
        for (long p = 0; p < context; p++) {
            s = s * 6364136223846793005ull + 1442695040888963407ull;
            tok[n] = (int32_t)((s >> 33) % (uint64_t)V);
            pos[n] = (int32_t)p;
            seq[n++] = q;
        }
        lidx[q] = n - 1;
    }
    double t0 = ds_now();
    ds_batch pre = {n, tok, pos, seq, B, maxb, tables, B, lidx};
    if ((rc = ds_model_forward_batch(m, kv, &pre, logits, next))) goto out;
    ds_info("prefilled %d sequences of %ld tokens in %.1fs", B, context, ds_now() - t0);

    /* the float weights' dtype: FP8 in the official release, else BF16 (W8A8 / W4A8 keep
     * lm_head and the router in it) */
    const ds_dtype fdt = c->quant == DS_QUANT_FP8 ? DS_F8_E4M3 : DS_BF16;
    rate_dtypes d = {{DS_I8, fdt, DS_F32}, {0, 0, 0}};
    rates best = {bw, 0, 0, 0};
    for (int bi = 0; bi < n_batches; bi++) {
        int32_t b = batches[bi];
        measure_rates(pool, &d, bw_bytes, &best);
        if (!bi && !quick_open(pool, &d, bw_bytes, &qp)) {
            rc = ds_err_set(DS_ERR_NOMEM, "out of memory for the probes beside the steps");
            goto out;
        }
        rates before = quick_rates(pool, &qp);
        keep_best(&best, &before);
        ds_forward_cost cost = {0}, *sum = &rows[bi].sum;
        for (long st = 0; st < steps; st++) {
            for (int32_t q = 0; q < b; q++) {
                tok[q] = next[q] < 0 ? 0 : next[q]; /* -1: every logit -inf */
                pos[q] = (int32_t)(context + st);
                seq[q] = q;
                lidx[q] = q;
            }
            ds_batch dec = {b, tok, pos, seq, B, maxb, tables, b, lidx};
            double ts = ds_now();
            if ((rc = ds_model_forward_batch(m, kv, &dec, logits, next))) goto out;
            times[st] = ds_now() - ts;
            ds_model_last_cost(m, &cost);
            sum->weight_bytes += cost.weight_bytes;
            sum->kv_bytes += cost.kv_bytes;
            sum->macs_int += cost.macs_int;
            sum->macs_float += cost.macs_float;
            sum->macs_attn += cost.macs_attn;
            /* this step against the better of the rates just before and just after it */
            rates after = quick_rates(pool, &qp), pair = before;
            keep_best(&pair, &after);
            keep_best(&best, &after);
            double mem, comp;
            bounds(&cost, 1, &pair, &mem, &comp);
            paired[st] = (mem > comp ? mem : comp) / times[st];
            before = after;
        }
        qsort(times, (size_t)steps, sizeof *times, cmp_double);
        qsort(paired, (size_t)steps, sizeof *paired, cmp_double);
        rows[bi].med = times[steps / 2];
        rows[bi].paired = paired[steps / 2];
    }
    /* a run of one batch size had one probe, and a Zen 4 VM whose reads moved between 35 and 70
     * GB/s put it in a slow minute: 35.9 GB/s against steps that read at 43 (121% of the limit) */
    measure_rates(pool, &d, bw_bytes, &best);
    printf("batch decode     context %ld + %ld steps, 16-token blocks, f32 KV, greedy\n", context,
           steps);
    printf("rates (best of all measured) read %.1f GB/s; matmul: int8 %.0f, %s %.0f, f32 %.0f "
           "GMAC/s\n",
           best.bw / 1e9, best.r_int / 1e9, ds_dtype_name(fdt), best.r_float / 1e9,
           best.r_f32 / 1e9);
    printf("limit: the larger of mem and comp (at those rates) over the median step; paired: the "
           "median over the steps\n       of the same at the better of the rates measured just "
           "before and just after each step\n");
    printf("%6s %10s %9s %10s %9s %9s %9s %9s %7s %7s\n", "batch", "tok/s", "step ms", "weights",
           "KV", "GMAC", "mem ms", "comp ms", "limit", "paired");
    for (int bi = 0; bi < n_batches; bi++) {
        const ds_forward_cost *sum = &rows[bi].sum;
        const double med = rows[bi].med, k = 1.0 / (double)steps;
        double mem, comp;
        bounds(sum, k, &best, &mem, &comp);
        double limit = mem > comp ? mem : comp;
        printf("%6d %10.1f %9.2f %8.1fMB %7.1fMB %9.2f %9.2f %9.2f %6.0f%% %6.0f%%\n", batches[bi],
               (double)batches[bi] / med, med * 1e3, (double)sum->weight_bytes * k / 1e6,
               (double)sum->kv_bytes * k / 1e6,
               (double)(sum->macs_int + sum->macs_float + sum->macs_attn) * k / 1e9, mem * 1e3,
               comp * 1e3, 100 * limit / med, 100 * rows[bi].paired);
    }
    printf("KV bytes per token %llu = %lld layers x (%lld + %lld) x 4\n",
           (unsigned long long)ds_kv_bytes_per_token(c, DS_KV_F32), (long long)c->n_layers,
           (long long)c->kv_lora_rank, (long long)c->qk_rope_head_dim);
    rc = DS_OK;
out:
    ds_kv_close(kv);
    free(tables);
    free(tok);
    free(pos);
    free(seq);
    free(lidx);
    free(next);
    free(logits);
    free(times);
    free(paired);
    quick_close(&qp);
    free(rows);
    return rc;
}
