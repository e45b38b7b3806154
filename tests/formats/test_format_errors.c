/* Foreign checkpoints that do not fit their detected format are refused with a message naming
 * the tensor and the field, never guessed at, never a crash (docs/formats.md, "Refused").
 *
 * fmtgen writes a good msModelSlim W8A8 checkpoint (static attention, anti-outlier norm biases)
 * and a Block-INT8 one from a make-tiny model; each case copies one, breaks one thing (a
 * description entry, a config key, one tensor's dtype, shape or values, a second index), and
 * checks that ds_model_open fails with the expected words and `dsinfer info` exits 1. The good
 * copies open, so every refusal is the mutation's doing. */
#include "formats/fmtgen.h"
#include "io/io.h"
#include "model/model.h"
#include "testutil.h"

#include <stdlib.h>
#include <string.h>

#define MS_SHARD1 "quant_model_weight_w8a8_dynamic-00001-of-00002.safetensors"
#define MS_SHARD2 "quant_model_weight_w8a8_dynamic-00002-of-00002.safetensors"
#define MS_INDEX "quant_model_weight_w8a8_dynamic.safetensors.index.json"
#define QA "model.layers.0.self_attn.q_a_proj"

static char *tmp;

static void copy_dir(const char *from, const char *to) {
    char cmd[9000];
    snprintf(cmd, sizeof cmd, "rm -rf '%s' && cp -r '%s' '%s'", to, from, to);
    int st;
    free(ds_test_run(cmd, &st));
    CHECK_MSG(st == 0, "%s", cmd);
}

/* Opens dir: DS_OK or the error, whose message must hold every one of the words. */
static void expect_open(const char *dir, const char *what, const char *w1, const char *w2) {
    ds_model *m = NULL;
    int rc = ds_model_open(dir, NULL, &m);
    ds_model_close(m);
    if (!w1) {
        CHECK_MSG(rc == DS_OK, "%s: the good copy does not open: %s", what, ds_err_msg());
        return;
    }
    CHECK_MSG(rc != DS_OK, "%s: opened", what);
    CHECK_MSG(strstr(ds_err_msg(), w1) && (!w2 || strstr(ds_err_msg(), w2)),
              "%s: message '%s' lacks '%s' / '%s'", what, ds_err_msg(), w1, w2 ? w2 : "");
    printf("  %-44s -> %s\n", what, ds_err_msg());
}

/* `dsinfer info dir` fails (status 1) naming `word`: it tells each projection's scheme, so what
 * makes the scheme unknowable fails it too (shapes and values it does not bind). */
static void expect_info_fails(const char *dir, const char *word) {
    char cmd[9000];
    snprintf(cmd, sizeof cmd, "'%s' info '%s' 2>&1 >/dev/null", DSINFER_BIN, dir);
    int st;
    char *o = ds_test_run(cmd, &st);
    CHECK_MSG(st != 0 && o && strstr(o, word), "dsinfer info %s: status %d, '%s'", dir, st,
              o ? o : "");
    free(o);
}

/* Edits dir/name (JSON) by setting key of the object at path (NULL: the root) to v (NULL:
 * deletes it). */
static void edit_json(const char *dir, const char *name, const char *key, json_t *v) {
    char p[4400];
    snprintf(p, sizeof p, "%.4200s/%.150s", dir, name);
    json_t *j = json_load_file(p, 0, NULL);
    CHECK_MSG(j != NULL, "%s", p);
    if (!j) return;
    if (v)
        json_object_set_new(j, key, v);
    else
        json_object_del(j, key);
    CHECK(json_dump_file(j, p, JSON_INDENT(1)) == 0);
    json_decref(j);
}

/* Rewrites dir/shard with tensor `name` replaced by (dtype, shape, data); the others kept. */
static void replace_tensor(const char *dir, const char *shard, const char *name, ds_dtype dt,
                           int ndim, const int64_t *shape, const void *data) {
    char src[4200], dst[4300];
    snprintf(src, sizeof src, "%s/%s", dir, shard);
    snprintf(dst, sizeof dst, "%s.new", src);
    ds_st_set *s = NULL;
    ds_st_writer *w = NULL;
    CHECK(ds_st_open_file(src, &s) == DS_OK && ds_st_writer_open(dst, &w) == DS_OK);
    if (!s || !w) return;
    int found = 0;
    for (size_t i = 0; i < ds_st_count(s); i++) {
        const ds_st_tensor *t = ds_st_at(s, i);
        int me = !strcmp(t->name, name);
        found |= me;
        ds_st_writer_add(w, t->name, me ? dt : t->dtype, me ? ndim : t->ndim,
                         me ? shape : t->shape);
    }
    CHECK_MSG(found, "%s not in %s", name, shard);
    ds_st_writer_begin_data(w);
    for (size_t i = 0; i < ds_st_count(s); i++) {
        const ds_st_tensor *t = ds_st_at(s, i);
        if (strcmp(t->name, name)) {
            ds_st_writer_data(w, t->data, t->nbytes);
            continue;
        }
        uint64_t n = ds_dtype_size(dt);
        for (int d = 0; d < ndim; d++) n *= (uint64_t)shape[d];
        ds_st_writer_data(w, data, n);
    }
    CHECK(ds_st_writer_close(w) == DS_OK);
    ds_st_close(s);
    CHECK(rename(dst, src) == 0);
}

/* The shard of the msModelSlim copy holding tensor name (from its index). */
static const char *shard_of(const char *dir, const char *name) {
    char p[4400];
    snprintf(p, sizeof p, "%.4200s/%s", dir, MS_INDEX);
    json_t *j = json_load_file(p, 0, NULL);
    const char *f = json_string_value(json_object_get(json_object_get(j, "weight_map"), name));
    const char *r = f && !strcmp(f, MS_SHARD2) ? MS_SHARD2 : MS_SHARD1;
    json_decref(j);
    return r;
}

static void modelslim_cases(const char *good) {
    char d[4200];
    snprintf(d, sizeof d, "%s/bad", tmp);
    const char *desc = "quant_model_description.json";
    expect_open(good, "good msModelSlim copy", NULL, NULL);

    copy_dir(good, d);
    edit_json(d, desc, QA ".weight", json_string("W4A4_DYNAMIC"));
    expect_open(d, "description: unknown scheme", QA ".weight", "W4A4_DYNAMIC");
    expect_info_fails(d, "W4A4_DYNAMIC");

    copy_dir(good, d);
    edit_json(d, desc, QA ".weight", NULL);
    expect_open(d, "description: no entry", "no entry", QA ".weight");

    copy_dir(good, d);
    edit_json(d, desc, "group_size", json_integer(256));
    expect_open(d, "description: per-group W4A8", "group_size", NULL);
    expect_info_fails(d, "group_size");

    copy_dir(good, d);
    edit_json(d, desc, "version", json_string("2.0.0"));
    expect_open(d, "description: unknown version", "version", NULL);

    copy_dir(good, d);
    edit_json(d, "config.json", "quantization_config",
              json_pack("{s:s}", "quant_method", "w8a8_int8"));
    expect_open(d, "config: a quantization_config as well", "ambiguous", NULL);

    copy_dir(good, d);
    char p[4300];
    snprintf(p, sizeof p, "%s/another_quant.index.json", d);
    FILE *f = fopen(p, "w");
    if (f) fputs("{\"weight_map\": {}}\n", f), fclose(f);
    expect_open(d, "two index files", "ambiguous", NULL);

    /* one tensor at a time */
    const int64_t one[1] = {1}, bad_rows[2] = {3, 5};
    const int32_t i32 = 1;
    const float zero = 0.0f, wide = 300.0f, ones[64] = {1, 1, 1};
    const char *cases[][3] = {
        {QA ".input_scale", "input_scale dtype I32", "I32"},
        {QA ".input_scale", "input_scale zero", "positive step"},
        {QA ".input_offset", "input_offset 300", "int8 zero point"},
        {QA ".weight", "weight shape", "shape"},
        {"model.layers.0.mlp.gate_proj.weight_offset", "non-zero weight_offset", "not all zero"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        copy_dir(good, d);
        const char *name = cases[i][0], *sh = shard_of(d, name);
        if (i == 0) replace_tensor(d, sh, name, DS_I32, 1, one, &i32);
        if (i == 1) replace_tensor(d, sh, name, DS_F32, 1, one, &zero);
        if (i == 2) replace_tensor(d, sh, name, DS_F32, 1, one, &wide);
        if (i == 3) replace_tensor(d, sh, name, DS_I8, 2, bad_rows, ones);
        if (i == 4) { /* the dense MLP's gate has as many rows as intermediate_size */
            ds_config c;
            CHECK(ds_config_load(d, &c) == DS_OK);
            float *o = calloc((size_t)c.intermediate_size, sizeof *o);
            o[c.intermediate_size - 1] = 1.0f;
            const int64_t shape[2] = {c.intermediate_size, 1};
            replace_tensor(d, sh, name, DS_F32, 2, shape, o);
            free(o);
        }
        char what[96];
        snprintf(what, sizeof what, "tensor: %s", cases[i][1]);
        expect_open(d, what, cases[i][2], strchr(name, '.') ? name : NULL);
    }
    ds_test_rmtree(d);
}

static void block_cases(const char *good) {
    char d[4200];
    snprintf(d, sizeof d, "%s/bad-block", tmp);
    expect_open(good, "good blockwise_int8 copy", NULL, NULL);
    copy_dir(good, d);
    const int64_t shape[2] = {2, 1}; /* make-tiny's q_a is one 128 x 128 block: [1, 1] */
    const float s[2] = {1.0f, 1.0f};
    replace_tensor(d, "model.safetensors", QA ".weight_scale_inv", DS_F32, 2, shape, s);
    expect_open(d, "block scale grid shape", QA ".weight_scale_inv", "shape");
    copy_dir(good, d);
    edit_json(d, "config.json", "quantization_config",
              json_pack("{s:s}", "quant_method", "gptq-pergroup"));
    expect_open(d, "config: gptq-pergroup", "gptq-pergroup", "unsupported");
    ds_test_rmtree(d);
}

int main(void) {
    tmp = ds_test_tmpdir();
    CHECK(tmp != NULL);
    if (!tmp) return ds_test_finish("test_format_errors");
    char src[4200], ms[4200], ref[4200], blk[4200], cmd[9000];
    snprintf(src, sizeof src, "%s/src", tmp);
    snprintf(cmd, sizeof cmd, "'%s' make-tiny '%s' --seed 3 >/dev/null 2>&1", DSINFER_BIN, src);
    int st;
    free(ds_test_run(cmd, &st));
    CHECK_MSG(st == 0, "%s", cmd);
    int32_t ids[16];
    for (int i = 0; i < 16; i++) ids[i] = (int32_t)(i * 7919 % 128000);
    const int32_t *pr[1] = {ids};
    const int64_t len[1] = {16};
    snprintf(ms, sizeof ms, "%s/ms", tmp);
    snprintf(ref, sizeof ref, "%s/ref", tmp);
    snprintf(blk, sizeof blk, "%s/block", tmp);
    CHECK(fmtgen_write(FMTGEN_MODELSLIM_W8A8, src, ms, ref, pr, len, 1) == 0);
    CHECK(fmtgen_write(FMTGEN_BLOCK_INT8, src, blk, ref, pr, len, 1) == 0);
    modelslim_cases(ms);
    block_cases(blk);
    ds_test_rmtree(tmp);
    free(tmp);
    return ds_test_finish("test_format_errors");
}
