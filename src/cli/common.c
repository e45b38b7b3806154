/* Helpers shared by the dsinfer subcommands: default locations and token-id lists. */
#include "cli/cli.h"
#include "core/core.h"

#include <errno.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>

#ifndef DSINFER_DEFAULT_MODEL_DIR
#define DSINFER_DEFAULT_MODEL_DIR "demo-model"
#endif
#ifndef DSINFER_DEFAULT_TOKENIZER_DIR
#define DSINFER_DEFAULT_TOKENIZER_DIR "tokenizer"
#endif

static const char *env_or(const char *var, const char *dflt) {
    const char *s = getenv(var);
    return s && *s ? s : dflt;
}

const char *ds_cli_default_model(void) {
    return env_or("DSINFER_MODEL", DSINFER_DEFAULT_MODEL_DIR);
}

const char *ds_cli_default_tokenizer_dir(void) {
    return env_or("DSINFER_TOKENIZER_DIR", DSINFER_DEFAULT_TOKENIZER_DIR);
}

static int is_sep(char c) {
    return c == ',' || c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

/* Accepts "1,2,3", "1 2 3", "1, 2, 3" and a JSON-style "[1, 2, 3]". Ids are 0..INT32_MAX.
 * On success *ids (malloc'd, caller frees) holds *n >= 1 ids; on failure returns -1, leaves
 * *ids NULL and sets a message naming the offending token and its position. */
int ds_cli_parse_ids(const char *s, int32_t **ids, int64_t *n) {
    *ids = NULL;
    *n = 0;
    if (!s) {
        ds_err_set(DS_ERR_ARG, "no token ids given");
        return -1;
    }
    const char *p = s, *end = s + strlen(s);
    while (p < end && is_sep(*p)) p++;
    if (p < end && *p == '[') {
        /* strip one pair of brackets */
        const char *q = end;
        while (q > p && is_sep(q[-1])) q--;
        if (q == p + 1 || q[-1] != ']') {
            ds_err_set(DS_ERR_ARG, "token ids '%s': '[' without a closing ']'", s);
            return -1;
        }
        p++;
        end = q - 1;
    }
    size_t cap = 16, cnt = 0;
    int32_t *v = malloc(cap * sizeof *v);
    if (!v) {
        ds_err_set(DS_ERR_NOMEM, "out of memory");
        return -1;
    }
    while (p < end) {
        while (p < end && is_sep(*p)) p++;
        if (p >= end) break;
        const char *tok = p;
        while (p < end && !is_sep(*p)) p++;
        int len = (int)(p - tok);
        char buf[32];
        if (len >= (int)sizeof buf) len = (int)sizeof buf - 1;
        memcpy(buf, tok, (size_t)len);
        buf[len] = 0;
        char *e = NULL;
        errno = 0;
        long long x = strtoll(buf, &e, 10);
        if (e == buf || *e || errno || buf[0] == '+' || x < 0 || x > INT32_MAX ||
            (size_t)(p - tok) >= sizeof buf) {
            ds_err_set(DS_ERR_ARG, "token ids: '%.*s' (position %zu) is not an id in 0..%d",
                       (int)(p - tok), tok, cnt + 1, INT32_MAX);
            free(v);
            return -1;
        }
        if (cnt == cap) {
            int32_t *nv = realloc(v, 2 * cap * sizeof *nv);
            if (!nv) {
                free(v);
                ds_err_set(DS_ERR_NOMEM, "out of memory");
                return -1;
            }
            v = nv;
            cap *= 2;
        }
        v[cnt++] = (int32_t)x;
    }
    if (cnt == 0) {
        free(v);
        ds_err_set(DS_ERR_ARG, "no token ids in '%s'", s);
        return -1;
    }
    *ids = v;
    *n = (int64_t)cnt;
    return 0;
}
