/* Forward-pass self-consistency on make-tiny checkpoints (no fixtures needed):
 *   - prefill of a prompt then token-by-token decode through the KV cache gives the logits of
 *     a whole-sequence prefill at the same positions;
 *   - internal chunking (max_batch) and the thread count do not change the result;
 *   - weights mapped from the files (row-major) give the logits of loaded ones (BF16 interleaved
 *     by fours where the kernels read it fused, ds_mat_interleave; kv_b's W_UV transposed) to
 *     the last bit, in a prefill and token by token.
 * Agreement with the official reference itself is test_golden's job. */
#include "cli/cli.h"
#include "model/model.h"
#include "testutil.h"

#include <stdlib.h>
#include <string.h>

#define T 13

static double max_diff(const float *a, const float *b, size_t n) {
    double w = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - b[i]);
        w = d > w ? d : w;
    }
    return w;
}

/* Logits of `ids` with the given params: split == T, every position of one prefill ([T][V]);
 * else the last of a prefill of the first `split`, then one token at a time ([T - split + 1][V]).
 */
static float *logits_of(const char *dir, int threads, int max_batch, int map, int split,
                        const int32_t *ids) {
    ds_model_params mp = ds_model_default_params();
    mp.n_threads = threads;
    mp.max_batch = max_batch;
    mp.map_weights = map;
    ds_model *m;
    if (ds_model_open(dir, &mp, &m) != DS_OK) {
        CHECK_MSG(0, "%s", ds_err_msg());
        return NULL;
    }
    int64_t V = ds_model_config(m)->vocab_size;
    const int all = split == T;
    float *out = malloc((size_t)((all ? T : T - split + 1) * V) * sizeof *out);
    ds_kv_cache *kv;
    CHECK(ds_kv_open(ds_model_config(m), T, &kv) == DS_OK);
    CHECK(ds_model_forward(m, kv, ids, split, 0, out, all) == DS_OK);
    for (int t = split; t < T; t++)
        CHECK(ds_model_forward(m, kv, ids + t, 1, t, out + (t - split + 1) * V, 0) == DS_OK);
    ds_kv_close(kv);
    ds_model_close(m);
    return out;
}

static void check_model(const char *dir) {
    int32_t ids[T];
    for (int i = 0; i < T; i++) ids[i] = (int32_t)((i * 7919 + 11) % 129280);
    ds_model *m;
    CHECK_MSG(ds_model_open(dir, NULL, &m) == DS_OK, "%s", ds_err_msg());
    if (!m) return;
    int64_t V = ds_model_config(m)->vocab_size;
    float *full = logits_of(dir, 0, 512, 0, T, ids);
    /* Prefill the first 5, then decode the rest one at a time, loaded and mapped. */
    const int split = 5;
    float *step = logits_of(dir, 0, 512, 0, split, ids);
    float *step_mapped = logits_of(dir, 0, 512, 1, split, ids);
    double worst = 0;
    for (int t = split - 1; full && step && t < T; t++) {
        double d = max_diff(step + (t - split + 1) * V, full + (size_t)t * (size_t)V, (size_t)V);
        worst = d > worst ? d : worst;
    }
    if (step && step_mapped)
        CHECK_MSG(memcmp(step, step_mapped, (size_t)((T - split + 1) * V) * sizeof *step) == 0,
                  "%s: mapped weights decode other logits than loaded ones", dir);
    printf("%s: prefill-then-decode vs prefill max |diff| %.2e\n", dir, worst);
    CHECK_MSG(worst <= 1e-4, "prefill-then-decode differs by %.3g", worst);

    float *chunked = logits_of(dir, 0, 3, 0, T, ids);
    float *single = logits_of(dir, 1, 512, 0, T, ids);
    float *three = logits_of(dir, 3, 512, 0, T, ids);
    float *mapped = logits_of(dir, 0, 512, 1, T, ids);
    if (full && mapped)
        CHECK_MSG(memcmp(full, mapped, (size_t)(T * V) * sizeof *full) == 0,
                  "%s: mapped weights give other logits than loaded ones", dir);
    if (full && chunked && single && three) {
        double dc = max_diff(full, chunked, (size_t)(T * V));
        double ds = max_diff(full, single, (size_t)(T * V));
        double d3 = max_diff(full, three, (size_t)(T * V));
        printf("%s: chunked %.2e, 1 thread %.2e, 3 threads %.2e\n", dir, dc, ds, d3);
        CHECK_MSG(dc <= 1e-4, "chunked prefill differs by %.3g", dc);
        CHECK_MSG(ds <= 1e-5 && d3 <= 1e-5, "thread count changes logits: %.3g / %.3g", ds, d3);
        /* The logits are not degenerate (a constant output would pass the comparisons). */
        double spread = 0;
        for (int64_t i = 1; i < V; i++) spread = fmax(spread, fabs(full[i] - full[0]));
        CHECK(spread > 0.1);
    }
    free(full);
    free(chunked);
    free(single);
    free(three);
    free(mapped);
    free(step);
    free(step_mapped);
    ds_model_close(m);
}

int main(void) {
    char *tmp = ds_test_tmpdir();
    CHECK(tmp != NULL);
    if (!tmp) return ds_test_finish("test_forward");
    static const char *variants[][6] = {
        {"tiny", "--preset", "tiny", "--dtype", "bf16", NULL},
        {"tinyfp8", "--preset", "tiny", "--dtype", "fp8", NULL},
        {"small", "--preset", "small", "--dtype", "bf16", NULL},
        {"noqlora", "--preset", "tiny", "--no-q-lora", NULL, NULL},
        {"tinyw8a8", "--preset", "tiny", "--dtype", "w8a8", NULL},
    };
    for (size_t v = 0; v < sizeof variants / sizeof variants[0]; v++) {
        char dir[4096];
        snprintf(dir, sizeof dir, "%.3000s/%s", tmp, variants[v][0]);
        char *argv[10] = {"make-tiny", dir, "--no-tokenizer"};
        int argc = 3;
        for (int i = 1; i < 6 && variants[v][i]; i++) argv[argc++] = (char *)variants[v][i];
        CHECK_MSG(ds_cmd_make_tiny(argc, argv) == 0, "make-tiny %s", variants[v][0]);
        check_model(dir);
    }
    ds_test_rmtree(tmp);
    free(tmp);
    return ds_test_finish("test_forward");
}
