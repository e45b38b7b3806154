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
 * Method: the largest batch's sequences are prefilled once (random prompts of --context tokens,
 * their own blocks), then for each batch size the first B sequences decode --decode-tokens steps
 * from position --context on (overwriting the same positions each time), greedy as the engine
 * samples plain greedy requests (the argmax lm_head returns); each step is timed alone and the
 * median is reported. */
#include "cli/cli.h"
#include "kernels/kernels.h"

#include <stdlib.h>
#include <string.h>

/* Multiply-adds per second of ds_matmul on an R x C matrix of dtype dt (I8: per-channel W8A8)
 * at T tokens, laid out as loaded weights are, best of `reps`: the path that dtype takes there
 * (BF16: the fused kernels, the others a GEMM at these token counts). */
static double shape_rate(ds_pool *pool, ds_dtype dt, int64_t R, int64_t C, int64_t T, int reps) {
    size_t esz = dt == DS_I8 ? 1 : ds_dtype_size(dt);
    unsigned char *w = malloc((size_t)(R * C) * esz);
    float *scale = malloc((size_t)R * (size_t)(C / 128) * sizeof(float));
    float *x = malloc((size_t)(T * C) * sizeof(float)),
          *y = malloc((size_t)(T * R) * sizeof(float));
    double best = 0;
    if (w && scale && x && y) {
        uint64_t s = 7;
        for (size_t i = 0; i < (size_t)(R * C) * esz; i++) {
            s = s * 6364136223846793005ull + 1442695040888963407ull;
            w[i] = (unsigned char)((s >> 40) & (dt == DS_BF16 || dt == DS_F16 ? 0x3b : 0x77));
        }
        for (int64_t i = 0; i < R * (C / 128); i++) scale[i] = 1e-3f;
        for (int64_t i = 0; i < T * C; i++) x[i] = (float)((i * 7919) % 200 - 100) / 100;
        ds_mat m = {.dtype = dt,
                    .rows = R,
                    .cols = C,
                    .data = w,
                    .scale = scale,
                    .block_rows = dt == DS_I8 ? 1 : 128,
                    .block_cols = dt == DS_I8 ? C : 128};
        ds_mat_interleave(&m); /* as the model lays out its loaded weights */
        for (int it = 0; it < reps; it++) {
            double t0 = ds_now();
            ds_matmul(pool, y, x, T, &m);
            double r = (double)(R * C * T) / (ds_now() - t0);
            if (r > best) best = r;
        }
    }
    free(w);
    free(scale);
    free(x);
    free(y);
    return best;
}

/* The best rate of dtype dt over 4096 x 4096 at 256 tokens and 2048 x 1024 (in cache after its
 * first call) at 32 and 256: the compute bound must be the fastest the kernels go, and which
 * shape that is differs by dtype (int8's GEMM is fastest on the large one, BF16's fused kernel
 * on the small one). */
static double matmul_rate(ds_pool *pool, ds_dtype dt) {
    static const int64_t shapes[3][3] = {{4096, 4096, 256}, {2048, 1024, 32}, {2048, 1024, 256}};
    double best = 0;
    for (int i = 0; i < 3; i++) {
        double r = shape_rate(pool, dt, shapes[i][0], shapes[i][1], shapes[i][2], 3);
        if (r > best) best = r;
    }
    return best;
}

/* The machine's rates: read bandwidth (bytes/s) and multiply-adds/s of the int8, float-weight
 * and f32 matmuls. */
typedef struct {
    double bw, r_int, r_float, r_f32;
} rates;

/* Measures the rates again and keeps in *best the higher of each. */
static void measure_rates(ds_pool *pool, ds_dtype fdt, size_t bw_bytes, rates *best) {
    const rates now = {ds_measure_read_bandwidth(pool, bw_bytes), matmul_rate(pool, DS_I8),
                       matmul_rate(pool, fdt), matmul_rate(pool, DS_F32)};
    best->bw = now.bw > best->bw ? now.bw : best->bw;
    best->r_int = now.r_int > best->r_int ? now.r_int : best->r_int;
    best->r_float = now.r_float > best->r_float ? now.r_float : best->r_float;
    best->r_f32 = now.r_f32 > best->r_f32 ? now.r_f32 : best->r_f32;
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
    double *times = malloc((size_t)steps * sizeof(double));
    struct {
        double med; /* median step, seconds */
        ds_forward_cost sum;
    } *rows = calloc((size_t)n_batches, sizeof *rows);
    int rc = DS_ERR_NOMEM;
    if (!tables || !tok || !pos || !seq || !lidx || !next || !logits || !times || !rows) {
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
    rates best = {bw, 0, 0, 0};
    for (int bi = 0; bi < n_batches; bi++) {
        int32_t b = batches[bi];
        measure_rates(pool, fdt, bw_bytes, &best);
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
        }
        qsort(times, (size_t)steps, sizeof *times, cmp_double);
        rows[bi].med = times[steps / 2];
    }
    /* a run of one batch size had one probe, and a Zen 4 VM whose reads moved between 35 and 70
     * GB/s put it in a slow minute: 35.9 GB/s against steps that read at 43 (121% of the limit) */
    measure_rates(pool, fdt, bw_bytes, &best);
    printf("batch decode     context %ld + %ld steps, 16-token blocks, f32 KV, greedy\n", context,
           steps);
    printf("rates (best of all measured) read %.1f GB/s; matmul: int8 %.0f, %s %.0f, f32 %.0f "
           "GMAC/s\n",
           best.bw / 1e9, best.r_int / 1e9, ds_dtype_name(fdt), best.r_float / 1e9,
           best.r_f32 / 1e9);
    printf("%6s %10s %9s %10s %9s %9s %9s %9s %7s\n", "batch", "tok/s", "step ms", "weights", "KV",
           "GMAC", "mem ms", "comp ms", "limit");
    for (int bi = 0; bi < n_batches; bi++) {
        const ds_forward_cost *sum = &rows[bi].sum;
        const double med = rows[bi].med, k = 1.0 / (double)steps;
        double mem = ((double)sum->weight_bytes + (double)sum->kv_bytes) * k / best.bw;
        double comp = (double)sum->macs_int * k / best.r_int +
                      (double)sum->macs_float * k / best.r_float +
                      (double)sum->macs_attn * k / best.r_f32;
        double limit = mem > comp ? mem : comp;
        printf("%6d %10.1f %9.2f %8.1fMB %7.1fMB %9.2f %9.2f %9.2f %6.0f%%\n", batches[bi],
               (double)batches[bi] / med, med * 1e3, (double)sum->weight_bytes * k / 1e6,
               (double)sum->kv_bytes * k / 1e6,
               (double)(sum->macs_int + sum->macs_float + sum->macs_attn) * k / 1e9, mem * 1e3,
               comp * 1e3, 100 * limit / med);
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
    free(rows);
    return rc;
}
