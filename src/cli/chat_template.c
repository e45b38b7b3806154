/* `dsinfer chat-template`: renders an OpenAI-style messages array with a DeepSeek chat template.
 *
 *   dsinfer chat-template [--model DIR] [--chat-template-format v3|r1|r1-0528]
 *                         [--add-generation-prompt] [--batch]
 *
 * The template and bos_token come from DIR/tokenizer_config.json (read here with jansson, not
 * through the BPE loader); the format is recognised from the template unless
 * --chat-template-format names it. Without --batch, stdin holds one JSON messages array and
 * stdout gets the rendered prompt, raw bytes, no newline added. With --batch, every non-empty
 * stdin line is {"messages": [...], "add_generation_prompt": true|false} and stdout gets one
 * line per input line: the prompt as a JSON string, or `null` when that line failed (the error
 * goes to stderr, naming the line, and the exit status becomes 1). The conformance test against
 * @huggingface/jinja drives this contract; keep it exactly. */
#include "cli/cli.h"
#include "core/core.h"
#include "tokenizer/tokenizer.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void usage(FILE *f) {
    fprintf(f,
            "usage: dsinfer chat-template [--model DIR] [--chat-template-format v3|r1|r1-0528]\n"
            "                             [--add-generation-prompt] [--batch]\n"
            "Reads a JSON messages array on stdin and writes the rendered prompt to stdout.\n"
            "  --model DIR      where tokenizer_config.json is (default: $DSINFER_TOKENIZER_DIR\n"
            "                   or the tokenizer fetched by scripts/setup.sh)\n"
            "  --chat-template-format F   use format F instead of recognising the template\n"
            "  --add-generation-prompt    end with the assistant prompt\n"
            "  --batch          stdin: JSON lines {\"messages\": [...], \"add_generation_prompt\":"
            " bool};\n"
            "                   stdout: one JSON string (or null on error) per line\n");
}

/* Reads all of f into a malloc'd NUL-terminated buffer (caller frees); NULL on failure. */
static char *slurp(FILE *f, size_t *len) {
    ds_buf b = {0};
    char chunk[65536];
    size_t n;
    while ((n = fread(chunk, 1, sizeof chunk, f)) > 0)
        if (ds_buf_append(&b, chunk, n)) {
            ds_buf_free(&b);
            return NULL;
        }
    if (ferror(f) || (!b.data && ds_buf_append(&b, "", 0))) {
        ds_buf_free(&b);
        return NULL;
    }
    *len = b.len;
    return b.data;
}

/* DIR/tokenizer_config.json -> chat_template (NULL when absent) and bos_token ("" when absent).
 * bos_token may be a string or an AddedToken object {"content": ...}. *cfg owns both strings. */
static int load_config(const char *dir, json_t **cfg, const char **tpl, const char **bos) {
    char path[4096];
    if (snprintf(path, sizeof path, "%s/tokenizer_config.json", dir) >= (int)sizeof path)
        return ds_err_set(DS_ERR_ARG, "--model: path too long");
    json_error_t e;
    json_t *c = json_load_file(path, 0, &e);
    if (!c)
        return ds_err_set(DS_ERR_IO, "%s: %s (line %d, column %d)", path, e.text, e.line, e.column);
    if (!json_is_object(c)) {
        json_decref(c);
        return ds_err_set(DS_ERR_FORMAT, "%s: expected a JSON object", path);
    }
    const json_t *t = json_object_get(c, "chat_template");
    *tpl = NULL;
    if (json_is_string(t)) {
        *tpl = json_string_value(t);
    } else if (json_is_array(t)) { /* [{"name": "default", "template": "..."}, ...] */
        size_t i;
        const json_t *x;
        json_array_foreach(t, i, x) {
            const json_t *nm = json_object_get(x, "name"), *tx = json_object_get(x, "template");
            if (json_is_string(nm) && !strcmp(json_string_value(nm), "default") &&
                json_is_string(tx))
                *tpl = json_string_value(tx);
        }
    } else if (t && !json_is_null(t)) {
        json_decref(c);
        return ds_err_set(DS_ERR_FORMAT, "%s: chat_template: expected a string", path);
    }
    const json_t *b = json_object_get(c, "bos_token");
    if (json_is_object(b)) b = json_object_get(b, "content");
    if (b && !json_is_null(b) && !json_is_string(b)) {
        json_decref(c);
        return ds_err_set(DS_ERR_FORMAT,
                          "%s: bos_token: expected a string or {\"content\": string}", path);
    }
    *bos = json_is_string(b) ? json_string_value(b) : "";
    *cfg = c;
    return DS_OK;
}

/* One --batch line: renders and prints it (JSON string, or null plus a message). */
static int batch_line(ds_chat_format f, const char *bos, const char *line, size_t len,
                      size_t lineno) {
    json_error_t e;
    json_t *req = json_loadb(line, len, JSON_ALLOW_NUL, &e);
    int rc = DS_OK;
    ds_buf out = {0};
    if (!req) {
        rc = ds_err_set(DS_ERR_FORMAT, "%s (column %d)", e.text, e.column);
    } else if (!json_is_object(req)) {
        rc = ds_err_set(DS_ERR_FORMAT, "expected an object {\"messages\": [...], ...}");
    } else {
        const json_t *agp = json_object_get(req, "add_generation_prompt");
        if (agp && !json_is_boolean(agp) && !json_is_null(agp))
            rc = ds_err_set(DS_ERR_ARG, "add_generation_prompt: expected true or false");
        else
            rc = ds_chat_render(f, bos, json_object_get(req, "messages"), json_is_true(agp), &out);
    }
    if (!rc) {
        json_t *s = json_stringn(out.data ? out.data : "", out.len);
        char *enc = s ? json_dumps(s, JSON_ENCODE_ANY) : NULL;
        if (enc)
            printf("%s\n", enc);
        else
            rc = ds_err_set(DS_ERR_NOMEM, "cannot JSON-encode the rendered prompt");
        free(enc);
        json_decref(s);
    }
    if (rc) {
        printf("null\n");
        fprintf(stderr, "dsinfer chat-template: stdin line %zu: %s\n", lineno, ds_err_msg());
    }
    json_decref(req);
    ds_buf_free(&out);
    return rc;
}

int ds_cmd_chat_template(int argc, char **argv) {
    const char *dir = NULL, *fmt = NULL;
    int agp = 0, batch = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(a, "--model") && i + 1 < argc) {
            dir = argv[++i];
        } else if (!strcmp(a, "--chat-template-format") && i + 1 < argc) {
            fmt = argv[++i];
        } else if (!strcmp(a, "--add-generation-prompt")) {
            agp = 1;
        } else if (!strcmp(a, "--batch")) {
            batch = 1;
        } else {
            fprintf(stderr, "dsinfer chat-template: unknown or incomplete option '%s'\n", a);
            usage(stderr);
            return 2;
        }
    }
    ds_chat_format f = DS_CHAT_V3;
    if (fmt && ds_chat_format_parse(fmt, &f)) {
        fprintf(stderr, "dsinfer chat-template: %s\n", ds_err_msg());
        return 2;
    }
    if (!dir) dir = ds_cli_default_tokenizer_dir();
    json_t *cfg = NULL;
    const char *tpl = NULL, *bos = "";
    if (load_config(dir, &cfg, &tpl, &bos) || (!fmt && ds_chat_detect(tpl, &f))) {
        fprintf(stderr, "dsinfer chat-template: %s\n", ds_err_msg());
        json_decref(cfg);
        return 1;
    }
    size_t len = 0;
    char *in = slurp(stdin, &len);
    if (!in) {
        fprintf(stderr, "dsinfer chat-template: cannot read stdin\n");
        json_decref(cfg);
        return 1;
    }
    int status = 0;
    if (batch) {
        size_t lineno = 0;
        for (char *p = in, *end = in + len; p < end;) {
            char *nl = memchr(p, '\n', (size_t)(end - p));
            size_t n = nl ? (size_t)(nl - p) : (size_t)(end - p);
            lineno++;
            size_t k = 0;
            while (k < n && (p[k] == ' ' || p[k] == '\t' || p[k] == '\r')) k++;
            if (k < n && batch_line(f, bos, p, n, lineno)) status = 1;
            p += n + (nl ? 1 : 0);
        }
    } else {
        json_error_t e;
        json_t *msgs = json_loadb(in, len, JSON_ALLOW_NUL, &e);
        ds_buf out = {0};
        if (!msgs) {
            fprintf(stderr, "dsinfer chat-template: stdin: %s (line %d, column %d)\n", e.text,
                    e.line, e.column);
            status = 1;
        } else if (ds_chat_render(f, bos, msgs, agp, &out)) {
            fprintf(stderr, "dsinfer chat-template: %s\n", ds_err_msg());
            status = 1;
        } else if (out.len && fwrite(out.data, 1, out.len, stdout) != out.len) {
            fprintf(stderr, "dsinfer chat-template: cannot write stdout\n");
            status = 1;
        }
        json_decref(msgs);
        ds_buf_free(&out);
    }
    free(in);
    json_decref(cfg);
    if (fflush(stdout)) status = 1;
    return status;
}
