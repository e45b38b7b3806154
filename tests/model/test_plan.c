/* The deployment plan (src/model/plan.c, `dsinfer plan`):
 *   - DeepSeek-V3's released config: the weights of every scheme equal a count made here by hand
 *     from the tensor list (and bf16 is twice the model card's 671B parameters within 0.5%); on
 *     2 nodes rank 0 holds exactly the replicated projections (q_a, kv_a, the router) plus half
 *     of the rest; the KV cache is 61 x (512 + 64) x 4 (or 2) bytes per token;
 *   - the fixture checkpoints, and tiny-a quantized to w8a8 / w4a8 (with and without lm_head):
 *     the plan's weights for one node equal what the loaded model binds (ds_model_weight_bytes);
 *   - the command: its JSON, the smallest node count, exit 3 when it does not fit, errors. */
#include "model/model.h"
#include "testutil.h"

#include <jansson.h>
#include <stdlib.h>
#include <string.h>

#define V3 DSINFER_SOURCE_DIR "/tests/data/deepseek-v3/config.json"

/* ---- by hand ---- */

/* A [r, c] projection's bytes as the scheme stores it (q: quantized by it; else BF16). */
static double mat(const char *scheme, int q, double r, double c) {
    if (!q || !strcmp(scheme, "bf16")) return 2 * r * c;
    if (!strcmp(scheme, "fp8")) return r * c + ceil(r / 128) * ceil(c / 128) * 4;
    if (!strcmp(scheme, "w8a8")) return r * c + r * 4;
    return r * c / 2 + r * (c / 128) * 4; /* w4a8, group 128 */
}

/* DeepSeek-V3: vocab 129280, hidden 7168, 61 layers (3 dense), 128 heads. */
static double v3_attn(const char *s) {
    return mat(s, 1, 1536, 7168) + mat(s, 1, 128 * 192, 1536) + mat(s, 1, 576, 7168) +
           mat(s, 1, 128 * 256, 512) + mat(s, 1, 7168, 128 * 128);
}
static double v3_mlp(const char *s, double inter) {
    return 2 * mat(s, 1, inter, 7168) + mat(s, 1, 7168, inter);
}
static double v3_weights(const char *s) {
    return 2 * mat(s, 0, 129280, 7168) + 61 * v3_attn(s) + 3 * v3_mlp(s, 18432) +
           58 * (mat(s, 0, 256, 7168) + 257 * v3_mlp(s, 2048));
}
static double v3_replicated(const char *s) {
    return 61 * (mat(s, 1, 1536, 7168) + mat(s, 1, 576, 7168)) + 58 * mat(s, 0, 256, 7168);
}

static void test_v3(void) {
    ds_config c;
    CHECK(ds_config_load(V3, &c) == DS_OK);
    CHECK(ds_plan_params_of(&c).scheme == DS_PLAN_FP8);
    const char *names[] = {"bf16", "fp8", "w8a8", "w4a8"};
    for (int i = 0; i < 4; i++) {
        ds_plan_params p = ds_plan_params_of(&c);
        CHECK(ds_plan_scheme_parse(names[i], &p.scheme) == DS_OK);
        p.mem_per_node = 4ull << 40;
        ds_plan r;
        CHECK(ds_plan_run(&c, &p, &r) == DS_OK);
        const double want = v3_weights(names[i]);
        CHECK_MSG((double)r.weights_all == want, "%s: %llu bytes, by hand %.0f", names[i],
                  (unsigned long long)r.weights_all, want);
        CHECK(fabs((double)r.rank0.weights - want) / want < 0.005);
        if (i == 0) /* the model card: 671,026,419,200 parameters (norms included, 0.0002%) */
            CHECK(fabs((double)r.weights_all / 2 - 671026419200.0) / 671026419200.0 < 0.005);
        p.nodes = 2;
        CHECK(ds_plan_run(&c, &p, &r) == DS_OK);
        const double rep = v3_replicated(names[i]);
        CHECK_MSG((double)r.rank0.weights_whole == rep, "%s: replicated %llu, by hand %.0f",
                  names[i], (unsigned long long)r.rank0.weights_whole, rep);
        CHECK_MSG((double)r.rank0.weights == rep + (want - rep) / 2,
                  "%s: rank 0 of 2 holds %llu, by hand %.0f", names[i],
                  (unsigned long long)r.rank0.weights, rep + (want - rep) / 2);
        CHECK(r.weights_all == (uint64_t)want);
    }
    ds_plan_params p = ds_plan_params_of(&c); /* fp8, as released */
    p.mem_per_node = 1ull << 40;
    ds_plan r;
    CHECK(ds_plan_run(&c, &p, &r) == DS_OK && r.kv_per_token == 61 * 576 * 4);
    p.kv_dtype = DS_KV_BF16;
    CHECK(ds_plan_run(&c, &p, &r) == DS_OK && r.kv_per_token == 61 * 576 * 2);
    /* the KV cache: 90% of 1 TiB less rank 0's fp8 weights, in blocks of 16 tokens */
    const double blocks = floor((0.9 * 1099511627776.0 - v3_weights("fp8")) / (61 * 576 * 2 * 16));
    CHECK_MSG((double)r.kv_blocks_fit == blocks, "%lld blocks, by hand %.0f",
              (long long)r.kv_blocks_fit, blocks);
    CHECK(r.seqs_at_len == (int64_t)(blocks / (163840 / 16)) && r.fits && !r.full);
    p.max_model_len = 4096;
    CHECK(ds_plan_run(&c, &p, &r) == DS_OK && r.full && r.kv_blocks == 256 * 4096 / 16);
    /* too many nodes: a rank without a head */
    p.nodes = 129;
    CHECK(ds_plan_run(&c, &p, &r) == DS_ERR_ARG);
    CHECK_ERR_CONTAINS("128 attention heads");
}

/* ---- against the model as loaded ---- */

static void same_as_loaded(const char *dir, const char *what, int lm_head) {
    ds_model *m = NULL;
    int rc = ds_model_open(dir, NULL, &m);
    CHECK_MSG(rc == DS_OK, "%s: %s", what, ds_err_msg());
    if (rc) return;
    ds_plan_params p = ds_plan_params_of(ds_model_config(m));
    p.quantize_lm_head = lm_head;
    p.mem_per_node = 1ull << 30;
    ds_plan r;
    CHECK(ds_plan_run(ds_model_config(m), &p, &r) == DS_OK);
    CHECK_MSG(r.weights_all == ds_model_weight_bytes(m) && r.rank0.weights == r.weights_all,
              "%s (%s): the plan says %llu bytes, the loaded model binds %llu", what,
              ds_plan_scheme_name(p.scheme), (unsigned long long)r.weights_all,
              (unsigned long long)ds_model_weight_bytes(m));
    ds_model_close(m);
}

static void test_fixtures(const char *fx) {
    char a[4200], b[4200];
    snprintf(a, sizeof a, "%s/tiny-a", fx);
    snprintf(b, sizeof b, "%s/tiny-a-fp8", fx);
    same_as_loaded(a, "tiny-a", 0);
    same_as_loaded(b, "tiny-a-fp8", 0);
    char *tmp = ds_test_tmpdir();
    CHECK(tmp != NULL);
    if (!tmp) return;
    const struct {
        const char *scheme, *flags;
        int lm_head;
    } q[] = {{"w8a8", "", 0}, {"w4a8", "--group-size 32", 0}, {"w8a8", "--quantize-lm-head", 1}};
    for (size_t i = 0; i < sizeof q / sizeof *q; i++) {
        char out[4300], cmd[9000];
        snprintf(out, sizeof out, "%s/q%zu", tmp, i);
        snprintf(cmd, sizeof cmd, "'%s' quantize '%s' '%s' --scheme %s %s 2>&1", DSINFER_BIN, a,
                 out, q[i].scheme, q[i].flags);
        int st;
        char *msg = ds_test_run(cmd, &st);
        CHECK_MSG(st == 0, "%s: %s", cmd, msg ? msg : "");
        free(msg);
        same_as_loaded(out, cmd, q[i].lm_head);
    }
    ds_test_rmtree(tmp);
    free(tmp);
}

/* ---- the command ---- */

static void test_cli(void) {
    char cmd[8400];
    int st;
    snprintf(cmd, sizeof cmd,
             "'%s' plan --config '%s' --scheme w8a8 --nodes 2 --mem-per-node 384G "
             "--max-model-len 512 --max-num-seqs 192 --json",
             DSINFER_BIN, V3);
    char *out = ds_test_run(cmd, &st);
    json_error_t e;
    json_t *o = out ? json_loads(out, 0, &e) : NULL;
    CHECK_MSG(st == 0 && o, "%s: %d %s", cmd, st, out ? out : "");
    CHECK(json_integer_value(json_object_get(o, "weights_bytes")) ==
          (json_int_t)v3_weights("w8a8"));
    CHECK(json_is_true(json_object_get(o, "fits")) &&
          json_is_true(json_object_get(o, "fits_max_num_seqs")));
    CHECK(json_integer_value(json_object_get(o, "kv_bytes_per_token")) == 61 * 576 * 4);
    /* 673 GB of weights: one 384 GiB node cannot hold them, two can; the rule of thumb
     * (weights / N x 1.3) asks for three */
    CHECK(json_integer_value(json_object_get(o, "min_nodes")) == 2);
    CHECK(json_integer_value(json_object_get(o, "min_nodes_rule_of_thumb")) == 3);
    json_decref(o);
    free(out);
    snprintf(cmd, sizeof cmd, "'%s' plan --config '%s' --scheme bf16 --mem-per-node 384G",
             DSINFER_BIN, V3);
    out = ds_test_run(cmd, &st);
    CHECK_MSG(st == 3 && out && strstr(out, "does not fit: rank 0 needs"), "%d %s", st,
              out ? out : "");
    free(out);
    snprintf(cmd, sizeof cmd, "'%s' plan --config '%s' 2>&1", DSINFER_BIN, V3);
    out = ds_test_run(cmd, &st);
    CHECK(st == 2 && out && strstr(out, "--mem-per-node"));
    free(out);
    snprintf(cmd, sizeof cmd, "'%s' plan --config '%s' --mem-per-node 1T --nodes 300 2>&1",
             DSINFER_BIN, V3);
    out = ds_test_run(cmd, &st);
    CHECK(st == 1 && out && strstr(out, "300 nodes"));
    free(out);
    snprintf(cmd, sizeof cmd, "'%s' plan --config /nonexistent --mem-per-node 1T 2>&1",
             DSINFER_BIN);
    out = ds_test_run(cmd, &st);
    CHECK(st == 1 && out && strstr(out, "/nonexistent"));
    free(out);
}

int main(void) {
    test_v3();
    test_cli();
    const char *fx = ds_test_fixtures();
    if (!fx) return ds_test_skip_or_fail("golden fixtures missing");
    test_fixtures(fx);
    return ds_test_finish("test_plan");
}
