/* `dsinfer bench-model --batch` on the built-in demo model: its rows hold together.
 *   - one row per batch size, in order; tok/s is the batch over the step time;
 *   - mem ms is (weights + KV) / the printed read rate, and the limit column is the larger of
 *     mem and comp over the step (within the printed digits);
 *   - the paired column is positive, and for one sequence, whose steps all read the same weights
 *     (its token's top-k experts), no lower than the limit column: each step is set against rates
 *     no higher than the run's best, which count every probe;
 *   - no batch reads fewer weight bytes than one sequence (each token alone touches top-k
 *     distinct experts, the most one sequence's step can);
 *   - the KV bytes per token line is layers x (kv_lora_rank + qk_rope_head_dim) x 4, the demo's
 *     3 x (32 + 8) x 4;
 *   - bad --batch values are refused by name. */
#include "testutil.h"

#include <stdlib.h>
#include <string.h>

typedef struct {
    int batch;
    double tps, step, weights, kv, gmac, mem, comp, limit, paired;
} row;

/* Relative closeness, for figures printed to a few digits. */
static int near(double a, double b, double rel) {
    return fabs(a - b) <= rel * fabs(b) + 1e-9;
}

int main(void) {
    char cmd[1024];
    int st = 0;
    snprintf(cmd, sizeof cmd, "'%s' bench-model --batch 1,3,8 --decode-tokens 3 2>&1", DSINFER_BIN);
    char *out = ds_test_run(cmd, &st);
    CHECK_MSG(out && st == 0, "bench-model failed: %s", out ? out : "(no output)");
    if (!out) return ds_test_finish("test_bench_model");
    double bw = 0;
    const char *p = strstr(out, "read ");
    CHECK(p && sscanf(p, "read %lf GB/s", &bw) == 1 && bw > 0);
    row r[4];
    int n = 0;
    for (p = out; p && *p && n < 4; p = strchr(p, '\n'), p = p ? p + 1 : NULL) {
        row x;
        if (sscanf(p, "%d %lf %lf %lfMB %lfMB %lf %lf %lf %lf%% %lf%%", &x.batch, &x.tps, &x.step,
                   &x.weights, &x.kv, &x.gmac, &x.mem, &x.comp, &x.limit, &x.paired) == 10)
            r[n++] = x;
    }
    CHECK_MSG(n == 3 && r[0].batch == 1 && r[1].batch == 3 && r[2].batch == 8,
              "want rows for batches 1, 3, 8: %s", out);
    for (int i = 0; i < n; i++) {
        const row *x = &r[i];
        CHECK_MSG(x->step > 0 && near(x->tps, x->batch / (x->step / 1e3), 0.01),
                  "batch %d: %.1f tok/s is not %d over %.2f ms", x->batch, x->tps, x->batch,
                  x->step);
        /* weights and KV are printed to 0.1 MB, the read rate to 0.1 GB/s */
        const double mem = (x->weights + x->kv) / bw, slack = (0.1 / x->weights + 0.1 / bw) * mem;
        CHECK_MSG(fabs(x->mem - mem) <= slack + 0.01, "batch %d: mem %.2f ms, want %.2f", x->batch,
                  x->mem, mem);
        /* the limit is printed whole, mem, comp and the step to 0.01 ms */
        const double top = x->mem > x->comp ? x->mem : x->comp, lim = 100 * top / x->step;
        CHECK_MSG(fabs(x->limit - lim) <= 0.5 + lim * (0.005 / top + 0.005 / x->step),
                  "batch %d: limit %.0f%%, want %.1f%%", x->batch, x->limit, lim);
        CHECK_MSG(x->paired > 0 && (x->batch > 1 || x->paired >= x->limit - 1),
                  "batch %d: paired %.0f%% against a limit of %.0f%%", x->batch, x->paired,
                  x->limit);
        CHECK_MSG(x->weights >= r[0].weights,
                  "batch %d read %.1f MB of weights, fewer than one sequence's %.1f", x->batch,
                  x->weights, r[0].weights);
    }
    long per = 0, layers = 0, a = 0, b = 0;
    p = strstr(out, "KV bytes per token");
    CHECK(p && sscanf(p, "KV bytes per token %ld = %ld layers x (%ld + %ld) x 4", &per, &layers, &a,
                      &b) == 4);
    CHECK_MSG(per == 480 && per == layers * (a + b) * 4, "KV bytes per token: %s", p ? p : "");
    free(out);

    static const struct {
        const char *args, *says;
    } bad[] = {{"--batch 0", "--batch sizes must be 1..4096"},
               {"--batch 2,x", "'2,x' must be 1 to 64 batch sizes"},
               {"--batch 1 --decode-tokens 0", "--decode-tokens '0' must be"}};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        snprintf(cmd, sizeof cmd, "'%s' bench-model %s 2>&1", DSINFER_BIN, bad[i].args);
        out = ds_test_run(cmd, &st);
        CHECK_MSG(st != 0 && out && strstr(out, bad[i].says), "%s: status %d, %s", bad[i].args, st,
                  out ? out : "(no output)");
        free(out);
    }
    return ds_test_finish("test_bench_model");
}
