/* `dsinfer generate` end to end, through the binary:
 *   - --prompt TEXT tokenizes with BOS and reproduces the golden greedy continuation of the
 *     official reference for every fixture prompt given as text;
 *   - --chat renders + tokenizes exactly like `chat-template` piped into `tokenize --no-bos`;
 *   - the text output is the detokenized id output;
 *   - stdout carries nothing but the result;
 *   - --batch-file runs every line through the engine at once: each golden prompt's greedy
 *     continuation, a chat line equal to --chat, a seeded sampling line that repeats, and bad
 *     lines that fail alone (with their message) and make the exit status 1;
 *   - a model whose lm_head holds a NaN (row 5) fails by name, alone and through the engine (whose
 *     greedy steps take the argmax from lm_head and leave such a row to the sampler). */
#include "testutil.h"
#include "io/io.h"

#include <stdlib.h>

/* make-tiny into dir with lm_head.weight[5][0] a BF16 NaN, patched in the safetensors file. */
static int make_nan_model(const char *dir) {
    char cmd[4300], path[4200];
    int st = 0;
    snprintf(cmd, sizeof cmd, "'%s' make-tiny '%s' --no-tokenizer --force 2>&1", DSINFER_BIN, dir);
    free(ds_test_run(cmd, &st));
    if (st) return -1;
    snprintf(path, sizeof path, "%s/model-00001-of-00001.safetensors", dir);
    FILE *f = fopen(path, "r+b");
    if (!f) return -1;
    unsigned char len8[8];
    uint64_t n = 0;
    if (fread(len8, 1, 8, f) == 8)
        for (int i = 7; i >= 0; i--) n = n << 8 | len8[i];
    char *hdr = n && n < (1u << 24) ? calloc(1, (size_t)n + 1) : NULL;
    json_t *h = hdr && fread(hdr, 1, (size_t)n, f) == n ? json_loads(hdr, 0, NULL) : NULL;
    json_t *t = json_object_get(h, "lm_head.weight");
    const char *dt = json_string_value(json_object_get(t, "dtype"));
    const json_int_t at = json_integer_value(json_array_get(json_object_get(t, "data_offsets"), 0)),
                     cols = json_integer_value(json_array_get(json_object_get(t, "shape"), 1));
    /* row 5, column 0 := 0x7fc0, little-endian */
    const int ok = dt && !strcmp(dt, "BF16") &&
                   !fseek(f, (long)(8 + n + at + 2 * 5 * cols), SEEK_SET) &&
                   fwrite("\xc0\x7f", 1, 2, f) == 2;
    json_decref(h);
    free(hdr);
    return fclose(f) == 0 && ok ? 0 : -1;
}

static void chomp(char *s) {
    size_t n = strlen(s);
    while (n && (s[n - 1] == '\n' || s[n - 1] == '\r')) s[--n] = 0;
}

int main(void) {
    const char *fx = ds_test_fixtures();
    if (!fx) return ds_test_skip_or_fail("golden fixtures missing");
    char model[4096], path[4200], cmd[16384];
    snprintf(model, sizeof model, "%.4000s/tiny-a", fx);
    snprintf(path, sizeof path, "%s/golden.json", model);
    json_t *g;
    CHECK_MSG(ds_json_load_file(path, &g) == DS_OK, "%s", ds_err_msg());
    if (!g) return ds_test_finish("test_generate");

    /* --prompt TEXT == the golden greedy tokens (the prompts' texts are tokenized with BOS). */
    size_t i;
    json_t *p;
    int checked = 0;
    json_array_foreach(json_object_get(g, "prompts"), i, p) {
        const char *text = json_string_value(json_object_get(p, "text"));
        if (!text || strchr(text, '\'') || !json_is_true(json_object_get(p, "add_bos"))) continue;
        json_t *gt = json_object_get(json_object_get(p, "greedy"), "tokens");
        char want[4096] = "";
        size_t j;
        json_t *v;
        json_array_foreach(gt, j, v) {
            size_t l = strlen(want);
            snprintf(want + l, sizeof want - l, "%s%lld", j ? "," : "",
                     (long long)json_integer_value(v));
        }
        snprintf(cmd, sizeof cmd,
                 "'%s' generate --model '%s' --prompt '%s' --max-tokens %zu --ignore-eos "
                 "--output ids 2>/dev/null",
                 DSINFER_BIN, model, text, json_array_size(gt));
        int st;
        char *out = ds_test_run(cmd, &st);
        CHECK(out != NULL && st == 0);
        if (out) {
            chomp(out);
            CHECK_MSG(strcmp(out, want) == 0, "prompt '%s': got %s, golden %s", text, out, want);
            free(out);
        }
        checked++;
    }
    CHECK(checked >= 3);

    /* --chat == chat-template | tokenize --no-bos, then the same greedy tokens. */
    int st;
    snprintf(cmd, sizeof cmd,
             "printf '%%s' '[{\"role\":\"system\",\"content\":\"Be brief.\"},{\"role\":\"user\","
             "\"content\":\"Hello, who are you?\"}]' | '%s' chat-template --model '%s' "
             "--add-generation-prompt | '%s' tokenize --model '%s' --no-bos",
             DSINFER_BIN, model, DSINFER_BIN, model);
    char *ids = ds_test_run(cmd, &st);
    CHECK(ids != NULL && st == 0);
    if (ids) {
        chomp(ids);
        CHECK(strncmp(ids, "0,", 2) == 0); /* the template writes the BOS token itself */
        snprintf(cmd, sizeof cmd,
                 "'%s' generate --model '%s' --prompt-ids '%s' --max-tokens 6 --ignore-eos",
                 DSINFER_BIN, model, ids);
        char *a = ds_test_run(cmd, &st);
        snprintf(cmd, sizeof cmd,
                 "'%s' generate --model '%s' --chat 'Hello, who are you?' --system 'Be brief.' "
                 "--max-tokens 6 --ignore-eos --output ids 2>/dev/null",
                 DSINFER_BIN, model);
        char *b = ds_test_run(cmd, &st);
        CHECK(a && b && st == 0);
        if (a && b) CHECK_MSG(strcmp(a, b) == 0, "--chat ids %s vs piped %s", b, a);
        /* Text output == detokenize of the id output (special tokens skipped). */
        if (b) {
            chomp(b);
            snprintf(cmd, sizeof cmd,
                     "'%s' generate --model '%s' --chat 'Hello, who are you?' --system "
                     "'Be brief.' --max-tokens 6 --ignore-eos 2>/dev/null",
                     DSINFER_BIN, model);
            char *text = ds_test_run(cmd, &st);
            snprintf(cmd, sizeof cmd, "'%s' detokenize --model '%s' --skip-special --ids '%s'",
                     DSINFER_BIN, model, b);
            char *want = ds_test_run(cmd, &st);
            CHECK(text && want);
            if (text && want) {
                chomp(text);
                CHECK_MSG(strcmp(text, want) == 0, "text '%s' vs detokenized '%s'", text, want);
                CHECK(strlen(text) > 0);
            }
            free(text);
            free(want);
        }
        free(a);
        free(b);
        free(ids);
    }

    /* --batch-file: the golden prompts plus chat, seeded and bad lines, all at once */
    char *tmp = ds_test_tmpdir();
    char bpath[4200];
    snprintf(bpath, sizeof bpath, "%s/batch.jsonl", tmp ? tmp : "/tmp");
    FILE *bf = fopen(bpath, "w");
    CHECK(bf != NULL);
    json_t *want_lines = json_array(); /* golden token arrays, or null for the extra lines */
    json_array_foreach(json_object_get(g, "prompts"), i, p) {
        if (!json_is_true(json_object_get(p, "add_bos"))) continue;
        json_t *line = json_pack("{s:O,s:i,s:b}", "prompt", json_object_get(p, "text"),
                                 "max_tokens", 24, "ignore_eos", 1);
        char *s1 = json_dumps(line, JSON_COMPACT);
        if (bf && s1) fprintf(bf, "%s\n\n", s1); /* blank lines are skipped */
        free(s1);
        json_decref(line);
        json_array_append(want_lines, json_object_get(json_object_get(p, "greedy"), "tokens"));
    }
    const size_t n_golden = json_array_size(want_lines);
    if (bf) {
        fprintf(bf, "{\"messages\": [{\"role\": \"system\", \"content\": \"Be brief.\"}, "
                    "{\"role\": \"user\", \"content\": \"Hello, who are you?\"}], "
                    "\"max_tokens\": 6, \"ignore_eos\": true}\n");
        for (int k = 0; k < 2; k++)
            fprintf(bf,
                    "{\"prompt_ids\": [0, 671, 4787], \"max_tokens\": 12, \"temperature\": 1.3, "
                    "\"seed\": -9223372036854775808, \"ignore_eos\": true}\n");
        fprintf(bf, "{\"prompt\": \"x\", \"top_p\": 0}\nnot json\n");
        fclose(bf);
    }
    snprintf(cmd, sizeof cmd,
             "'%s' generate --model '%s' --batch-file '%s' --max-num-seqs 3 "
             "--block-size 4 --max-num-batched-tokens 16 2>/dev/null",
             DSINFER_BIN, model, bpath);
    char *bout = ds_test_run(cmd, &st);
    CHECK_MSG(st == 1, "a batch with bad lines exits %d, want 1", st);
    json_t *res = json_array();
    for (char *l = bout ? strtok(bout, "\n") : NULL; l; l = strtok(NULL, "\n")) {
        json_error_t err;
        json_t *o = json_loads(l, 0, &err);
        CHECK_MSG(o != NULL, "result line is not JSON: %s", l);
        if (o) json_array_append_new(res, o);
    }
    CHECK_MSG(json_array_size(res) == n_golden + 5, "%zu result lines, want %zu",
              json_array_size(res), n_golden + 5);
    if (json_array_size(res) == n_golden + 5) {
        for (size_t k = 0; k < n_golden; k++) {
            json_t *o = json_array_get(res, k);
            CHECK(json_integer_value(json_object_get(o, "index")) == (json_int_t)k);
            CHECK_MSG(json_equal(json_object_get(o, "token_ids"), json_array_get(want_lines, k)),
                      "batch line %zu differs from the golden greedy tokens", k);
            CHECK(!strcmp(json_string_value(json_object_get(o, "finish_reason")), "length"));
        }
        json_t *chat = json_array_get(res, n_golden), *s1 = json_array_get(res, n_golden + 1),
               *s2 = json_array_get(res, n_golden + 2);
        snprintf(cmd, sizeof cmd,
                 "'%s' generate --model '%s' --chat 'Hello, who are you?' --system 'Be brief.' "
                 "--max-tokens 6 --ignore-eos --output ids 2>/dev/null",
                 DSINFER_BIN, model);
        char *chat_ids = ds_test_run(cmd, &st);
        char got[512] = "";
        size_t k;
        json_t *v;
        json_array_foreach(json_object_get(chat, "token_ids"), k, v) {
            size_t l = strlen(got);
            snprintf(got + l, sizeof got - l, "%s%lld", k ? "," : "",
                     (long long)json_integer_value(v));
        }
        if (chat_ids) chomp(chat_ids);
        CHECK_MSG(chat_ids && !strcmp(chat_ids, got), "batch chat %s vs --chat %s", got, chat_ids);
        free(chat_ids);
        CHECK(json_array_size(json_object_get(s1, "token_ids")) == 12);
        CHECK_MSG(json_equal(json_object_get(s1, "token_ids"), json_object_get(s2, "token_ids")),
                  "the same seed gave different tokens");
        json_t *bad1 = json_array_get(res, n_golden + 3), *bad2 = json_array_get(res, n_golden + 4);
        CHECK(!strcmp(json_string_value(json_object_get(bad1, "finish_reason")), "error"));
        CHECK(strstr(json_string_value(json_object_get(bad1, "error")), "top_p") != NULL);
        CHECK(strstr(json_string_value(json_object_get(bad2, "error")), "invalid JSON") != NULL);
    }
    json_decref(res);
    json_decref(want_lines);
    free(bout);
    if (tmp) ds_test_rmtree(tmp);
    free(tmp);

    /* A NaN logit: a clear error, never a token chosen past it. */
    char *nan_dir = ds_test_tmpdir();
    CHECK(nan_dir && make_nan_model(nan_dir) == 0);
    if (nan_dir) {
        snprintf(cmd, sizeof cmd, "'%s' generate --model '%s' --prompt-ids 1,2,3 2>&1", DSINFER_BIN,
                 nan_dir);
        char *o = ds_test_run(cmd, &st);
        CHECK_MSG(st == 1 && o && strstr(o, "logits[5] = nan: logits must be finite or -inf"),
                  "NaN logit alone: status %d, %s", st, o ? o : "");
        free(o);
        snprintf(path, sizeof path, "%s/b.jsonl", nan_dir);
        FILE *f = fopen(path, "w");
        CHECK(f && fputs("{\"prompt_ids\":[1,2,3],\"max_tokens\":3,\"temperature\":0}\n", f) >= 0);
        if (f) fclose(f);
        snprintf(cmd, sizeof cmd, "'%s' generate --model '%s' --batch-file '%s' 2>/dev/null",
                 DSINFER_BIN, nan_dir, path);
        o = ds_test_run(cmd, &st);
        CHECK_MSG(st == 1 && o && strstr(o, "\"error\":\"logits[5] = nan"),
                  "NaN logit through the engine: status %d, %s", st, o ? o : "");
        free(o);
        ds_test_rmtree(nan_dir);
        free(nan_dir);
    }

    /* Usage errors exit 2 and print nothing on stdout. */
    snprintf(cmd, sizeof cmd, "'%s' generate --model '%s' --prompt x --chat y 2>/dev/null",
             DSINFER_BIN, model);
    char *out = ds_test_run(cmd, &st);
    CHECK(st == 2 && out && out[0] == 0);
    free(out);
    json_decref(g);
    return ds_test_finish("test_generate");
}
