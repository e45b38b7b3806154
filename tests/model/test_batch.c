/* ds_model_forward_batch: several sequences in one ragged batch over a paged cache give each
 * sequence's own logits.
 *   - Four prompts (1 to 29 tokens) run alone through ds_model_forward are the reference.
 *   - Batched: the same prompts in two steps (first chunks of three of them, then the rest, the
 *     sequences in a different order), every sequence's blocks scattered over a shuffled pool,
 *     block sizes 1, 16 and 64, an internal chunk size (max_batch 7) that cuts through
 *     sequences. Every token's logits must match its reference within the round-off the matmul
 *     paths allow for different token counts (1e-4, as test_forward's chunked prefill).
 *   - bf16 / f16 caches agree with f32 within a tolerance measured for their rounding, and pick
 *     the same greedy token (on the tiny model only: the small FP8 one is chaotic enough that
 *     the summation order alone, on identical bf16-rounded cache values, moves some logits by
 *     4e-4 and a bf16 rounding by up to 1.0, so it has no useful tolerance).
 *   - The argmax the batch returns beside the logits is each row's argmax_f32.
 *   - Bad indices are refused with DS_ERR_RANGE and a message naming them. */
#include "cli/cli.h"
#include "kernels/kernels.h"
#include "model/model.h"
#include "testutil.h"

#include <stdlib.h>

#define NSEQ 4
static const int lens[NSEQ] = {13, 5, 29, 1};
static int32_t ids[NSEQ][29];

static uint64_t rng = 0x853c49e6748fea9bull;
static uint32_t rnd(void) {
    rng = rng * 6364136223846793005ull + 1442695040888963407ull;
    return (uint32_t)(rng >> 33);
}

static double max_diff(const float *a, const float *b, size_t n) {
    double w = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - b[i]);
        w = d > w || d != d ? d : w;
    }
    return w;
}

static size_t argmax(const float *x, int64_t n) {
    size_t b = 0;
    for (int64_t i = 1; i < n; i++)
        if (x[i] > x[b]) b = (size_t)i;
    return b;
}

/* Runs the four prompts as two batched steps; out[s] gets all-position logits of sequence s. */
static int run_batched(ds_model *m, int64_t bs, ds_kv_dtype dt, float *out[NSEQ]) {
    const ds_config *c = ds_model_config(m);
    int64_t V = c->vocab_size, maxb = (29 + bs - 1) / bs, nblk = NSEQ * maxb + 3;
    ds_kv_cache *kv;
    if (ds_kv_open_paged(c, nblk, bs, dt, &kv) != DS_OK) return -1;
    /* a shuffled pool of block ids, dealt to the sequences */
    int32_t *pool = malloc((size_t)nblk * sizeof(int32_t)),
            *tables = malloc((size_t)(NSEQ * maxb) * sizeof(int32_t));
    for (int64_t i = 0; i < nblk; i++) pool[i] = (int32_t)i;
    for (int64_t i = nblk - 1; i > 0; i--) {
        int64_t j = rnd() % (uint64_t)(i + 1);
        int32_t t = pool[i];
        pool[i] = pool[j];
        pool[j] = t;
    }
    for (int64_t i = 0; i < NSEQ * maxb; i++) tables[i] = pool[i];
    /* step 1: seq 0 [0, 7), seq 1 all, seq 2 [0, 10), seq 3 all; step 2: seq 2 [10, 29), seq 0 [7,
     * 13) */
    const int cut[NSEQ] = {7, 5, 10, 1};
    const int order[2][NSEQ] = {{0, 1, 2, 3}, {2, 0, -1, -1}};
    int rc = DS_OK;
    for (int step = 0; step < 2 && rc == DS_OK; step++) {
        int32_t tok[64], pos[64], seq[64], lidx[64], map_s[64], map_p[64];
        int32_t n = 0;
        for (int k = 0; k < NSEQ; k++) {
            int s = order[step][k];
            if (s < 0) continue;
            int p0 = step ? cut[s] : 0, p1 = step ? lens[s] : cut[s];
            for (int p = p0; p < p1; p++) {
                tok[n] = ids[s][p];
                pos[n] = p;
                seq[n] = s;
                lidx[n] = n;
                map_s[n] = s;
                map_p[n] = p;
                n++;
            }
        }
        float *lg = malloc((size_t)n * (size_t)V * sizeof(float));
        int32_t am[64];
        ds_batch b = {n, tok, pos, seq, NSEQ, (int32_t)maxb, tables, n, lidx};
        rc = ds_model_forward_batch(m, kv, &b, lg, am);
        for (int32_t i = 0; rc == DS_OK && i < n; i++) /* taken in lm_head, chunk by chunk */
            CHECK_MSG(am[i] == ds_kernels_get()->argmax_f32(lg + (size_t)i * (size_t)V, (size_t)V),
                      "block size %lld: token %d's argmax %d is not its logits'", (long long)bs, i,
                      am[i]);
        for (int32_t i = 0; rc == DS_OK && i < n; i++)
            memcpy(out[map_s[i]] + (size_t)map_p[i] * (size_t)V, lg + (size_t)i * (size_t)V,
                   (size_t)V * sizeof(float));
        free(lg);
    }
    free(pool);
    free(tables);
    ds_kv_close(kv);
    return rc;
}

static void check_errors(ds_model *m) {
    ds_kv_cache *kv;
    CHECK(ds_kv_open_paged(ds_model_config(m), 4, 4, DS_KV_F32, &kv) == DS_OK);
    int32_t tok[2] = {1, 2}, pos[2] = {0, 1}, seq[2] = {0, 0}, table[2] = {3, 9}, lidx[2] = {1, 0};
    float *lg = malloc(2 * (size_t)ds_model_config(m)->vocab_size * sizeof(float));
    ds_batch b = {2, tok, pos, seq, 1, 2, table, 1, lidx};
    CHECK(ds_model_forward_batch(m, kv, &b, lg, NULL) == DS_OK); /* block 9 unused: positions < 4 */
    pos[1] = 4;                                                  /* now block 9 is used */
    CHECK(ds_model_forward_batch(m, kv, &b, lg, NULL) == DS_ERR_RANGE);
    CHECK_ERR_CONTAINS("block id 9");
    pos[1] = 8; /* past the table */
    CHECK(ds_model_forward_batch(m, kv, &b, lg, NULL) == DS_ERR_RANGE);
    CHECK_ERR_CONTAINS("position 8");
    pos[1] = 1;
    b.n_logits = 2; /* 1 then 0: out of order */
    CHECK(ds_model_forward_batch(m, kv, &b, lg, NULL) == DS_ERR_RANGE);
    CHECK_ERR_CONTAINS("logits index");
    b.n_logits = 1;
    seq[1] = 1;
    CHECK(ds_model_forward_batch(m, kv, &b, lg, NULL) == DS_ERR_RANGE);
    CHECK_ERR_CONTAINS("sequence 1");
    seq[1] = 0;
    tok[0] = -5;
    CHECK(ds_model_forward_batch(m, kv, &b, lg, NULL) == DS_ERR_RANGE);
    CHECK_ERR_CONTAINS("token id -5");
    ds_kv_dtype dt;
    CHECK(ds_kv_dtype_parse("bf16", &dt) == DS_OK && dt == DS_KV_BF16);
    CHECK(ds_kv_dtype_parse("fp8", &dt) == DS_ERR_ARG);
    CHECK(ds_kv_bytes_per_token(ds_model_config(m), DS_KV_F16) ==
          (uint64_t)ds_model_config(m)->n_layers *
              (uint64_t)(ds_model_config(m)->kv_lora_rank + ds_model_config(m)->qk_rope_head_dim) *
              2);
    free(lg);
    ds_kv_close(kv);
}

static void check_model(const char *dir, int lossy) {
    ds_model_params mp = ds_model_default_params();
    mp.max_batch = 7;
    ds_model *m;
    CHECK_MSG(ds_model_open(dir, &mp, &m) == DS_OK, "%s", ds_err_msg());
    if (!m) return;
    const ds_config *c = ds_model_config(m);
    int64_t V = c->vocab_size;
    for (int s = 0; s < NSEQ; s++)
        for (int p = 0; p < lens[s]; p++) ids[s][p] = (int32_t)(rnd() % (uint32_t)V);
    float *ref[NSEQ], *got[NSEQ];
    for (int s = 0; s < NSEQ; s++) {
        ref[s] = malloc((size_t)lens[s] * (size_t)V * sizeof(float));
        got[s] = malloc((size_t)lens[s] * (size_t)V * sizeof(float));
        ds_kv_cache *kv;
        CHECK(ds_kv_open(c, lens[s], &kv) == DS_OK);
        CHECK(ds_model_forward(m, kv, ids[s], lens[s], 0, ref[s], 1) == DS_OK);
        ds_kv_close(kv);
    }
    const int64_t bss[] = {1, 16, 64};
    for (size_t bi = 0; bi < 3; bi++) {
        CHECK_MSG(run_batched(m, bss[bi], DS_KV_F32, got) == DS_OK, "%s", ds_err_msg());
        double worst = 0;
        for (int s = 0; s < NSEQ; s++) {
            double d = max_diff(ref[s], got[s], (size_t)lens[s] * (size_t)V);
            worst = d > worst || d != d ? d : worst;
        }
        printf("%s: block size %lld, batched vs alone max |diff| %.2e\n", dir, (long long)bss[bi],
               worst);
        CHECK_MSG(worst <= 1e-4, "block size %lld: batched logits differ by %.3g",
                  (long long)bss[bi], worst);
    }
    const ds_kv_dtype dts[] = {DS_KV_BF16, DS_KV_F16};
    for (size_t di = 0; lossy && di < 2; di++) {
        CHECK_MSG(run_batched(m, 16, dts[di], got) == DS_OK, "%s", ds_err_msg());
        double worst = 0, spread = 0;
        int same = 0, total = 0;
        for (int s = 0; s < NSEQ; s++)
            for (int p = 0; p < lens[s]; p++) {
                const float *r = ref[s] + (size_t)p * (size_t)V,
                            *g = got[s] + (size_t)p * (size_t)V;
                double d = max_diff(r, g, (size_t)V);
                worst = d > worst || d != d ? d : worst;
                spread = fmax(spread, fabs(r[argmax(r, V)] - r[0]));
                same += argmax(r, V) == argmax(g, V);
                total++;
            }
        printf("%s: %s cache vs f32 max |diff| %.2e (logit spread %.2f), greedy %d/%d\n", dir,
               ds_kv_dtype_name(dts[di]), worst, spread, same, total);
        CHECK_MSG(worst <= 2e-2 * (spread > 1 ? spread : 1), "%s cache differs by %.3g",
                  ds_kv_dtype_name(dts[di]), worst);
        CHECK_MSG(worst > 0, "%s cache gave exactly the f32 logits: was it used?",
                  ds_kv_dtype_name(dts[di]));
        CHECK_MSG(same >= total - 1, "%s cache changes %d greedy tokens", ds_kv_dtype_name(dts[di]),
                  total - same);
    }
    check_errors(m);
    for (int s = 0; s < NSEQ; s++) {
        free(ref[s]);
        free(got[s]);
    }
    ds_model_close(m);
}

int main(void) {
    char *tmp = ds_test_tmpdir();
    CHECK(tmp != NULL);
    if (!tmp) return ds_test_finish("test_batch");
    static const char *variants[][3] = {{"tiny", "--preset", "tiny"},
                                        {"smallfp8", "--preset", "small"}};
    for (size_t v = 0; v < 2; v++) {
        char dir[4096];
        snprintf(dir, sizeof dir, "%.3000s/%s", tmp, variants[v][0]);
        char *argv[10] = {"make-tiny", dir, "--no-tokenizer", (char *)variants[v][1],
                          (char *)variants[v][2]};
        int argc = 5;
        if (v == 1) argv[argc++] = "--dtype", argv[argc++] = "fp8";
        CHECK_MSG(ds_cmd_make_tiny(argc, argv) == 0, "make-tiny %s", variants[v][0]);
        check_model(dir, v == 0);
    }
    ds_test_rmtree(tmp);
    free(tmp);
    return ds_test_finish("test_batch");
}
