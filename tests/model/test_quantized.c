/* Quantized checkpoints through the whole model.
 *
 * 1. Channel-int8 layout (SGLang/vLLM "w8a8_int8": I8 weight + F32 weight_scale [out, 1]),
 *    written here by an independent generator from a make-tiny BF16 checkpoint, loads and
 *    reproduces the engine on the dequantized weights (q * scale stored as F32) up to the
 *    per-token activation quantization: top-1 identical where the reference margin is clear,
 *    small KL.
 * 2. Fidelity: the BF16 golden fixture, quantized by `dsinfer quantize` to W8A8 and W4A8,
 *    against the golden logits of DeepSeek's reference: top-1 agreement and mean KL divergence
 *    per position over all prompts, with thresholds set from measured values with a margin
 *    (docs/formats.md records them).
 * 3. make-tiny --dtype fp8 -> `dsinfer quantize` -> `dsinfer generate`, end to end. */
#include "cli/cli.h"
#include "kernels/kernels.h"
#include "formats/fmtgen.h"
#include "model/model.h"
#include "testutil.h"

#include <stdlib.h>
#include <sys/stat.h>

/* ---- helpers ---- */

static int is_projection(const ds_st_tensor *t) {
    size_t n = strlen(t->name);
    return t->ndim == 2 && strncmp(t->name, "model.layers.", 13) == 0 &&
           (strstr(t->name, ".self_attn.") || strstr(t->name, ".mlp.")) &&
           !strstr(t->name, ".mlp.gate.weight") && n > 7 && !strcmp(t->name + n - 7, ".weight");
}

/* Writes DIR/config.json = SRC/config.json with quantization_config set (NULL: removed). */
static void write_config(const char *src, const char *dir, const char *qc) {
    char p[4096];
    snprintf(p, sizeof p, "%.4000s/config.json", src);
    json_t *cfg = json_load_file(p, 0, NULL);
    CHECK(cfg != NULL);
    if (!cfg) return;
    if (qc)
        json_object_set_new(cfg, "quantization_config", json_loads(qc, 0, NULL));
    else
        json_object_del(cfg, "quantization_config");
    snprintf(p, sizeof p, "%.4000s/config.json", dir);
    CHECK(json_dump_file(cfg, p, JSON_INDENT(1)) == 0);
    json_decref(cfg);
}

/* From the BF16 checkpoint SRC, writes Q in the channel-int8 layout with the test's own
 * quantizer (q = rint(w / s), s = max|w_row| / 127), independent of `dsinfer quantize`. */
static void make_channel_int8(const char *src, const char *q) {
    ds_st_set *s;
    CHECK_MSG(ds_st_open_dir(src, &s) == DS_OK, "%s", ds_err_msg());
    if (!s) return;
    char p[4096];
    ds_st_writer *w;
    snprintf(p, sizeof p, "%.4000s/model.safetensors", q);
    CHECK(mkdir(q, 0755) == 0 && ds_st_writer_open(p, &w) == DS_OK);
    for (int pass = 0; pass < 2; pass++) {
        if (pass == 1) CHECK(ds_st_writer_begin_data(w) == DS_OK);
        for (size_t i = 0; i < ds_st_count(s); i++) {
            const ds_st_tensor *t = ds_st_at(s, i);
            int64_t R = t->shape[0], C = t->ndim == 2 ? t->shape[1] : 0;
            char sname[300];
            snprintf(sname, sizeof sname, "%s_scale", t->name);
            if (!is_projection(t)) {
                if (pass == 0)
                    ds_st_writer_add(w, t->name, t->dtype, t->ndim, t->shape);
                else
                    ds_st_writer_data(w, t->data, t->nbytes);
                continue;
            }
            if (pass == 0) {
                int64_t sshape[2] = {R, 1};
                ds_st_writer_add(w, t->name, DS_I8, 2, t->shape);
                ds_st_writer_add(w, sname, DS_F32, 2, sshape);
                continue;
            }
            ds_mat m = {.dtype = t->dtype, .rows = R, .cols = C, .data = t->data};
            int8_t *qv = malloc((size_t)(R * C));
            float *row = malloc((size_t)C * sizeof *row), *sc = malloc((size_t)R * sizeof *sc);
            for (int64_t a = 0; a < R; a++) {
                ds_mat_row_f32(&m, a, row);
                float mx = 0;
                for (int64_t b = 0; b < C; b++) mx = fmaxf(mx, fabsf(row[b]));
                sc[a] = mx > 0 ? mx / 127.0f : 1.0f;
                for (int64_t b = 0; b < C; b++) {
                    long v = lrintf(row[b] / sc[a]);
                    qv[a * C + b] = (int8_t)(v > 127 ? 127 : v < -127 ? -127 : v);
                }
            }
            ds_st_writer_data(w, qv, (uint64_t)(R * C));
            ds_st_writer_data(w, sc, (uint64_t)R * sizeof(float));
            free(qv);
            free(row);
            free(sc);
        }
    }
    CHECK(ds_st_writer_close(w) == DS_OK);
    ds_st_close(s);
    write_config(src, q, "{\"quant_method\": \"w8a8_int8\", \"activation_scheme\": \"dynamic\"}");
}

/* Writes R: the quantized checkpoint Q with every int8/int4 weight replaced by its F32
 * dequantization (q * scale, element-exact) and no quantization_config. The engine on R computes
 * the same weights in f32 without activation quantization: engine(Q) vs engine(R) isolates the
 * int8 arithmetic from the weight rounding. */
static void dequantized_copy(const char *q, const char *r) {
    ds_config cfg;
    ds_st_set *s = NULL;
    CHECK_MSG(ds_config_load(q, &cfg) == DS_OK && ds_st_open_dir(q, &s) == DS_OK, "%s",
              ds_err_msg());
    if (!s) return;
    char p[4096];
    ds_st_writer *w;
    snprintf(p, sizeof p, "%.4000s/model.safetensors", r);
    CHECK(mkdir(r, 0755) == 0 && ds_st_writer_open(p, &w) == DS_OK);
    for (int pass = 0; pass < 2; pass++) {
        if (pass == 1) CHECK(ds_st_writer_begin_data(w) == DS_OK);
        for (size_t i = 0; i < ds_st_count(s); i++) {
            const ds_st_tensor *t = ds_st_at(s, i);
            size_t n = strlen(t->name);
            if (n > 13 && !strcmp(t->name + n - 13, ".weight_scale")) continue;
            if (t->dtype != DS_I8) {
                if (pass == 0)
                    ds_st_writer_add(w, t->name, t->dtype, t->ndim, t->shape);
                else
                    ds_st_writer_data(w, t->data, t->nbytes);
                continue;
            }
            int w4 = cfg.quant == DS_QUANT_W4A8;
            int64_t R = t->shape[0], C = w4 ? 2 * t->shape[1] : t->shape[1];
            int64_t shape[2] = {R, C};
            if (pass == 0) {
                ds_st_writer_add(w, t->name, DS_F32, 2, shape);
                continue;
            }
            char sname[300];
            snprintf(sname, sizeof sname, "%s_scale", t->name);
            const ds_st_tensor *st = ds_st_find(s, sname);
            CHECK(st != NULL);
            if (!st) continue;
            ds_mat m = {.dtype = DS_I8,
                        .rows = R,
                        .cols = C,
                        .data = t->data,
                        .scale = st->data,
                        .block_rows = 1,
                        .block_cols = w4 ? cfg.quant_group : C,
                        .int4 = w4};
            float *deq = malloc((size_t)(R * C) * sizeof *deq);
            for (int64_t a = 0; a < R; a++) ds_mat_row_f32(&m, a, deq + a * C);
            ds_st_writer_data(w, deq, (uint64_t)(R * C) * sizeof(float));
            free(deq);
        }
    }
    CHECK(ds_st_writer_close(w) == DS_OK);
    ds_st_close(s);
    write_config(q, r, NULL);
}

static float *all_logits(const char *dir, const int32_t *ids, int64_t n) {
    ds_model *m;
    if (ds_model_open(dir, NULL, &m) != DS_OK) {
        CHECK_MSG(0, "%s: %s", dir, ds_err_msg());
        return NULL;
    }
    int64_t V = ds_model_config(m)->vocab_size;
    float *out = malloc((size_t)(n * V) * sizeof *out);
    ds_kv_cache *kv;
    CHECK(ds_kv_open(ds_model_config(m), n, &kv) == DS_OK);
    CHECK_MSG(ds_model_forward(m, kv, ids, n, 0, out, 1) == DS_OK, "%s", ds_err_msg());
    ds_kv_close(kv);
    ds_model_close(m);
    return out;
}

/* ---- 1. the channel-int8 layout ---- */
static void test_channel_int8(const char *tmp) {
    char src[4096], q[4096], r[4096];
    snprintf(src, sizeof src, "%.4000s/src", tmp);
    snprintf(q, sizeof q, "%.4000s/int8", tmp);
    snprintf(r, sizeof r, "%.4000s/deq", tmp);
    char *argv[] = {"make-tiny", src, "--preset", "tiny", "--no-tokenizer", NULL};
    CHECK(ds_cmd_make_tiny(5, argv) == 0);
    make_channel_int8(src, q);
    dequantized_copy(q, r);
    enum { N = 32 };
    int32_t ids[N];
    for (int i = 0; i < N; i++) ids[i] = (int32_t)((i * 9973 + 5) % 128000);
    float *ref = all_logits(r, ids, N), *got = all_logits(q, ids, N);
    if (ref && got) {
        fmtgen_agreement a = {0};
        fmtgen_compare(&a, ref, got, N, 129280);
        fmtgen_report("channel-int8 vs dequantized", &a);
        CHECK_MSG(a.top1_clear_same == a.top1_clear, "top-1 differs where the margin is clear");
        CHECK_MSG(a.kl_sum / a.positions < 2e-3, "mean KL %.3g", a.kl_sum / a.positions);
    }
    free(ref);
    free(got);
}

/* ---- 2. fidelity of `dsinfer quantize` on the golden fixtures ---- */

/* Thresholds, from values measured on tiny-a (docs/formats.md) with a margin. tiny-a's random
 * weights make its next-token distributions nearly flat (golden top1-top2 margins down to
 * 5e-3) and its routing decisions near ties (expert gaps down to 7e-4), so rounding the
 * weights, or only the activations, flips experts and reorders the top-1 far more easily than
 * in a trained model. The thresholds guard against regressions; the int8 arithmetic itself is
 * checked exactly in test_kernels and, above, on the make-tiny model. */
static const struct {
    const char *scheme;
    double max_kl_golden;   /* mean KL(BF16 reference || quantized) per position */
    double min_top1_golden; /* share of positions whose top-1 is the golden top-1 */
    double max_kl_deq;      /* mean KL(dequantized weights in f32 || int8 arithmetic) */
    double min_clear_deq;   /* same top-1 as the dequantized weights where their margin > 0.5 */
} schemes[] = {{"w8a8", 0.15, 0.65, 0.1, 0.9}, {"w4a8", 2.0, 0.05, 0.1, 0.9}};

static void test_fixture(const char *tmp, const char *fx, const char *name) {
    char dir[4096], path[4200];
    snprintf(dir, sizeof dir, "%.2000s/%.200s", fx, name);
    snprintf(path, sizeof path, "%s/golden.json", dir);
    json_t *g = json_load_file(path, 0, NULL);
    CHECK(g != NULL);
    if (!g) return;
    for (size_t k = 0; k < sizeof schemes / sizeof schemes[0]; k++) {
        char out[4096], deq[4200];
        snprintf(out, sizeof out, "%.3000s/%s-%s", tmp, name, schemes[k].scheme);
        snprintf(deq, sizeof deq, "%s-deq", out);
        char *argv[] = {"quantize", dir, out, "--scheme", (char *)schemes[k].scheme, NULL};
        CHECK_MSG(ds_cmd_quantize(5, argv) == 0, "quantize %s %s", name, schemes[k].scheme);
        dequantized_copy(out, deq);
        fmtgen_agreement vs_bf16 = {0}, vs_deq = {0};
        int golden_same = 0, golden_n = 0;
        size_t i;
        json_t *p;
        json_array_foreach(json_object_get(g, "prompts"), i, p) {
            json_t *ids_j = json_object_get(p, "ids");
            int64_t n = (int64_t)json_array_size(ids_j);
            int32_t *ids = malloc((size_t)n * sizeof *ids);
            for (int64_t t = 0; t < n; t++)
                ids[t] = (int32_t)json_integer_value(json_array_get(ids_j, t));
            float *ref = all_logits(dir, ids, n), *got = all_logits(out, ids, n),
                  *d = all_logits(deq, ids, n);
            if (ref && got) fmtgen_compare(&vs_bf16, ref, got, n, 129280);
            if (d && got) fmtgen_compare(&vs_deq, d, got, n, 129280);
            json_t *top = json_object_get(json_object_get(p, "prefill"), "top10_ids");
            for (int64_t t = 0; got && t < n; t++, golden_n++)
                golden_same +=
                    fmtgen_argmax(got + t * 129280, 129280) ==
                    json_integer_value(json_array_get(json_array_get(top, (size_t)t), 0));
            free(ref);
            free(got);
            free(d);
            free(ids);
        }
        char what[128];
        snprintf(what, sizeof what, "%s %s vs BF16", name, schemes[k].scheme);
        fmtgen_report(what, &vs_bf16);
        printf("%-28s top-1 = golden top-1 at %d/%d positions\n", "", golden_same, golden_n);
        snprintf(what, sizeof what, "%s %s vs dequantized", name, schemes[k].scheme);
        fmtgen_report(what, &vs_deq);
        CHECK_MSG(vs_bf16.kl_sum / vs_bf16.positions <= schemes[k].max_kl_golden,
                  "%s: mean KL %.3g", what, vs_bf16.kl_sum / vs_bf16.positions);
        CHECK_MSG((double)golden_same / golden_n >= schemes[k].min_top1_golden,
                  "%s: top-1 = golden at %d/%d", what, golden_same, golden_n);
        CHECK_MSG(vs_deq.kl_sum / vs_deq.positions <= schemes[k].max_kl_deq,
                  "%s: mean KL vs the dequantized weights %.3g", what,
                  vs_deq.kl_sum / vs_deq.positions);
        CHECK_MSG(vs_deq.top1_clear_same >= schemes[k].min_clear_deq * vs_deq.top1_clear,
                  "%s: top-1 as the dequantized weights' at %d of %d clear positions", what,
                  vs_deq.top1_clear_same, vs_deq.top1_clear);
    }
    json_decref(g);
}

/* ---- 3. make-tiny --dtype fp8 -> quantize -> generate, through the binaries ---- */
static void test_end_to_end(const char *tmp) {
    char src[4096];
    snprintf(src, sizeof src, "%.4000s/fp8", tmp);
    char *argv[] = {"make-tiny", src, "--dtype", "fp8", "--no-tokenizer", NULL};
    CHECK(ds_cmd_make_tiny(5, argv) == 0);
    static const char *const scheme[] = {"w8a8", "w4a8"};
    for (int k = 0; k < 2; k++) {
        char cmd[20000], out[4200];
        snprintf(out, sizeof out, "%.4000s-%s", src, scheme[k]);
        snprintf(cmd, sizeof cmd,
                 "'%s' quantize '%s' '%s' --scheme %s >/dev/null 2>&1 && "
                 "'%s' generate --model '%s' --prompt-ids 0,100,200 --max-tokens 8 --ignore-eos "
                 "2>/dev/null",
                 DSINFER_BIN, src, out, scheme[k], DSINFER_BIN, out);
        FILE *p = popen(cmd, "r");
        char line[512] = "";
        if (p && !fgets(line, sizeof line, p)) line[0] = 0;
        int st = p ? pclose(p) : -1;
        int commas = 0;
        for (char *c = line; *c; c++) commas += *c == ',';
        CHECK_MSG(st == 0 && commas == 7, "%s: status %d, output '%s'", scheme[k], st, line);
    }
}

int main(void) {
    char *tmp = ds_test_tmpdir();
    CHECK(tmp != NULL);
    if (!tmp) return ds_test_finish("test_quantized");
    test_channel_int8(tmp);
    test_end_to_end(tmp);
    const char *fx = ds_test_fixtures();
    if (fx) test_fixture(tmp, fx, "tiny-a");
    ds_test_rmtree(tmp);
    free(tmp);
    if (!fx) return ds_test_skip_or_fail("golden fixtures missing (the channel-int8 part ran)");
    return ds_test_finish("test_quantized");
}
