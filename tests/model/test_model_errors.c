/* Malformed checkpoints at the model level: each produces its own clear error naming the
 * tensor/field, through the library and through the `dsinfer` binary (non-zero exit, message on
 * stderr, no crash). Checkpoints come from make-tiny and are then broken on purpose. */
#include "cli/cli.h"
#include "model/model.h"
#include "testutil.h"

#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

static char *tmp;

static void make(const char *name, const char *dtype) {
    char out[4096];
    snprintf(out, sizeof out, "%.3000s/%.100s", tmp, name);
    char *argv[] = {"make-tiny", out,           "--preset",       "tiny",
                    "--dtype",   (char *)dtype, "--no-tokenizer", NULL};
    CHECK_MSG(ds_cmd_make_tiny(7, argv) == 0, "make-tiny %s failed", name);
}

/* Sets (or with value NULL deletes) a top-level field of NAME/config.json. */
static void edit_config(const char *name, const char *field, const char *value) {
    char path[4096];
    snprintf(path, sizeof path, "%.3000s/%.100s/config.json", tmp, name);
    json_t *root = json_load_file(path, 0, NULL);
    CHECK(root != NULL);
    if (!root) return;
    if (value)
        json_object_set_new(root, field, json_loads(value, JSON_DECODE_ANY, NULL));
    else
        json_object_del(root, field);
    CHECK(json_dump_file(root, path, JSON_INDENT(2)) == 0);
    json_decref(root);
}

static void expect_open_error(const char *name, int code, const char *needle) {
    char dir[4096];
    snprintf(dir, sizeof dir, "%.3000s/%.100s", tmp, name);
    ds_model *m = NULL;
    int rc = ds_model_open(dir, NULL, &m);
    CHECK_MSG(rc == code, "%s: rc %d, expected %d (%s)", name, rc, code, ds_err_msg());
    CHECK(m == NULL);
    CHECK_ERR_CONTAINS(needle);
    ds_model_close(m);
}

/* Runs the binary's generate on NAME; expects exit 1 and `needle` on stderr. */
static void expect_cli_error(const char *name, const char *needle) {
    char cmd[8192], out[8192] = {0};
    snprintf(cmd, sizeof cmd, "'%s' generate --model '%.3000s/%.100s' --prompt-ids 0,1 2>&1",
             DSINFER_BIN, tmp, name);
    FILE *p = popen(cmd, "r");
    CHECK(p != NULL);
    if (!p) return;
    size_t n = fread(out, 1, sizeof out - 1, p);
    out[n] = 0;
    int st = pclose(p);
    CHECK_MSG(WIFEXITED(st) && WEXITSTATUS(st) == 1, "%s: exit status %d, output: %s", name, st,
              out);
    CHECK_MSG(strstr(out, needle) != NULL, "%s: output '%s' lacks '%s'", name, out, needle);
}

int main(void) {
    tmp = ds_test_tmpdir();
    CHECK(tmp != NULL);
    if (!tmp) return ds_test_finish("test_model_errors");

    /* The untouched checkpoint opens and runs. */
    make("ok", "bf16");
    {
        char dir[4096];
        snprintf(dir, sizeof dir, "%.3000s/ok", tmp);
        ds_model *m = NULL;
        CHECK_MSG(ds_model_open(dir, NULL, &m) == DS_OK, "%s", ds_err_msg());
        if (m) {
            ds_kv_cache *kv;
            float *logits = malloc((size_t)ds_model_config(m)->vocab_size * sizeof *logits);
            CHECK(ds_kv_open(ds_model_config(m), 4, &kv) == DS_OK);
            int32_t bad[2] = {5, 129280};
            CHECK(ds_model_forward(m, kv, bad, 2, 0, logits, 0) == DS_ERR_RANGE);
            CHECK_ERR_CONTAINS("token id 129280 at index 1 is outside the vocabulary");
            int32_t neg = -3;
            CHECK(ds_model_forward(m, kv, &neg, 1, 0, logits, 0) == DS_ERR_RANGE);
            int32_t ok[3] = {0, 1, 2};
            CHECK(ds_model_forward(m, kv, ok, 3, 2, logits, 0) == DS_ERR_RANGE);
            CHECK_ERR_CONTAINS("positions 2..4 exceed the KV cache of 4 tokens");
            CHECK(ds_model_forward(m, kv, ok, 3, 0, logits, 0) == DS_OK);
            ds_kv_close(kv);
            free(logits);
            ds_model_close(m);
        }
    }

    /* Wrong shape: the config promises a wider model than the weights hold. */
    make("shape", "bf16");
    edit_config("shape", "hidden_size", "128");
    expect_open_error("shape", DS_ERR_SHAPE,
                      "tensor 'model.embed_tokens.weight' has shape [129280, 64], expected "
                      "[129280, 128]");
    expect_cli_error("shape", "expected [129280, 128]");

    /* Missing tensor: one layer more in the config than in the weights. */
    make("missing", "bf16");
    edit_config("missing", "num_hidden_layers", "4");
    expect_open_error("missing", DS_ERR_MISSING,
                      "missing tensor 'model.layers.3.input_layernorm.weight'");
    expect_cli_error("missing", "missing tensor 'model.layers.3.");

    /* Config with an unsupported field value. */
    make("scoring", "bf16");
    edit_config("scoring", "scoring_func", "\"softmax\"");
    expect_open_error("scoring", DS_ERR_UNSUPPORTED, "unsupported scoring_func = \"softmax\"");
    expect_cli_error("scoring", "unsupported scoring_func");

    /* FP8 weights without the quantization_config that gives their meaning. */
    make("fp8", "fp8");
    edit_config("fp8", "quantization_config", NULL);
    expect_open_error("fp8", DS_ERR_FORMAT,
                      "is F8_E4M3 but config.json has no fp8 quantization_config");

    /* Truncated shard. */
    make("trunc", "bf16");
    {
        char path[4096];
        snprintf(path, sizeof path, "%.3000s/trunc/model-00001-of-00001.safetensors", tmp);
        FILE *f = fopen(path, "rb");
        CHECK(f != NULL);
        if (f) {
            fseek(f, 0, SEEK_END);
            long size = ftell(f);
            fclose(f);
            CHECK(truncate(path, size / 2) == 0);
        }
    }
    expect_open_error("trunc", DS_ERR_FORMAT, "run past the end of the data section (");
    expect_cli_error("trunc", "file truncated?");

    /* The official release's multi-token-prediction layer (model.layers.N, N ==
     * num_hidden_layers) is recognised and skipped: the checkpoint loads and runs as without. */
    make("mtp", "bf16");
    edit_config("mtp", "num_nextn_predict_layers", "1");
    {
        char path[4096];
        snprintf(path, sizeof path, "%.3000s/mtp/model-mtp.safetensors", tmp);
        ds_st_writer *w;
        int64_t shape[2] = {64, 128};
        uint16_t zeros[64 * 128] = {0};
        CHECK(ds_st_writer_open(path, &w) == DS_OK);
        CHECK(ds_st_writer_add(w, "model.layers.3.eh_proj.weight", DS_BF16, 2, shape) == DS_OK);
        CHECK(ds_st_writer_begin_data(w) == DS_OK);
        CHECK(ds_st_writer_data(w, zeros, sizeof zeros) == DS_OK);
        CHECK(ds_st_writer_close(w) == DS_OK);
        snprintf(path, sizeof path, "%.3000s/mtp/model.safetensors.index.json", tmp);
        json_t *idx = json_load_file(path, 0, NULL);
        CHECK(idx != NULL);
        json_object_set_new(json_object_get(idx, "weight_map"), "model.layers.3.eh_proj.weight",
                            json_string("model-mtp.safetensors"));
        CHECK(json_dump_file(idx, path, 0) == 0);
        json_decref(idx);
        snprintf(path, sizeof path, "%.3000s/mtp", tmp);
        ds_model *m = NULL;
        CHECK_MSG(ds_model_open(path, NULL, &m) == DS_OK, "%s", ds_err_msg());
        if (m)
            CHECK(ds_model_config(m)->num_nextn_predict_layers == 1 &&
                  ds_model_config(m)->n_layers == 3);
        ds_model_close(m);
    }

    /* Not a checkpoint at all. */
    expect_cli_error("does-not-exist", "cannot open");

    ds_test_rmtree(tmp);
    free(tmp);
    return ds_test_finish("test_model_errors");
}
