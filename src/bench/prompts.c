/* prompts: what the benchmark sends.
 *
 * A benchmark of "256 prompt tokens" must send prompts the server counts as 256 tokens, or
 * prefill work and the input throughput are misreported. Text is what every OpenAI-compatible
 * server accepts, so prompts are text built the way vLLM's random dataset builds them: random
 * token ids decoded to text. Decoding and re-encoding is not an identity (neighbouring pieces
 * merge into other tokens, a piece splits), so the text is re-encoded with the server's rules
 * (a BOS when tokenizer_config says add_bos_token; the chat template around a chat message)
 * and ids are appended or dropped until the count is exact; a few rounds suffice.
 *
 * Random ids are drawn from a pool of "plain" tokens: not special, decoding to valid UTF-8 on
 * their own (a byte-level piece of a multi-byte character would turn into U+FFFD and re-encode
 * as something else) and free of control characters other than tab and newline (a NUL would
 * end the C string; a server may refuse the others). Each prompt has its own random stream derived
 * from the seed and its index, so prompt i is the same whatever n is. */
#include "bench/bench.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

/* ---- random numbers: splitmix64 (tiny, seedable, good enough to pick tokens) ----------------- */
static uint64_t splitmix(uint64_t *s) {
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* Whether p[0, n) is valid UTF-8 (no overlongs, surrogates or code points above U+10FFFF). */
static int utf8_valid(const unsigned char *p, size_t n) {
    size_t i = 0;
    while (i < n) {
        unsigned c = p[i];
        size_t len;
        unsigned min;
        if (c < 0x80) {
            i++;
            continue;
        } else if ((c & 0xe0) == 0xc0) {
            len = 2, min = 0x80, c &= 0x1f;
        } else if ((c & 0xf0) == 0xe0) {
            len = 3, min = 0x800, c &= 0x0f;
        } else if ((c & 0xf8) == 0xf0) {
            len = 4, min = 0x10000, c &= 0x07;
        } else {
            return 0;
        }
        if (n - i < len) return 0;
        for (size_t k = 1; k < len; k++) {
            if ((p[i + k] & 0xc0) != 0x80) return 0;
            c = (c << 6) | (p[i + k] & 0x3f);
        }
        if (c < min || c > 0x10ffff || (c >= 0xd800 && c <= 0xdfff)) return 0;
        i += len;
    }
    return 1;
}

int ds_bench_tok_init(ds_bench_tok *bt, const ds_tokenizer *tok) {
    memset(bt, 0, sizeof *bt);
    bt->tok = tok;
    bt->add_bos = ds_tok_add_bos(tok) && ds_tok_bos_id(tok) >= 0;
    ds_chat_format f;
    const char *tmpl = ds_tok_chat_template(tok);
    bt->chat_format = tmpl && ds_chat_detect(tmpl, &f) == DS_OK ? (int)f : -1;
    int64_t vocab = ds_tok_vocab_size(tok);
    if (vocab <= 0 || vocab > INT32_MAX)
        return ds_err_set(DS_ERR_ARG, "tokenizer has no vocabulary");
    bt->pool = malloc((size_t)vocab * sizeof *bt->pool);
    if (!bt->pool) return ds_err_set(DS_ERR_NOMEM, "out of memory");
    ds_buf plain = {0}, all = {0};
    for (int32_t id = 0; id < (int32_t)vocab; id++) {
        plain.len = all.len = 0;
        if (ds_tok_decode_bytes(tok, &id, 1, 1, &plain) || plain.len == 0) continue;
        if (ds_tok_decode_bytes(tok, &id, 1, 0, &all)) continue;
        if (all.len != plain.len || memcmp(all.data, plain.data, plain.len)) continue; /* special */
        if (!utf8_valid((const unsigned char *)plain.data, plain.len)) continue;
        int ctrl = 0; /* NUL and other C0 controls but tab and newline: texts are C strings */
        for (size_t k = 0; k < plain.len; k++) {
            unsigned char ch = (unsigned char)plain.data[k];
            ctrl |= (ch < 0x20 && ch != '\t' && ch != '\n') || ch == 0x7f;
        }
        if (ctrl) continue;
        bt->pool[bt->n_pool++] = id;
    }
    ds_buf_free(&plain);
    ds_buf_free(&all);
    if (bt->n_pool == 0) {
        ds_bench_tok_free(bt);
        return ds_err_set(DS_ERR_ARG, "tokenizer has no plain text tokens to build prompts from");
    }
    return DS_OK;
}

void ds_bench_tok_free(ds_bench_tok *bt) {
    if (!bt) return;
    free(bt->pool);
    bt->pool = NULL;
    bt->n_pool = 0;
}

int ds_bench_count(const ds_bench_tok *bt, ds_bench_backend b, const char *text,
                   const json_t *messages, int32_t *n) {
    int32_t *ids = NULL;
    size_t len = 0;
    int rc;
    if (b == DS_BENCH_CHAT && bt->chat_format >= 0) {
        ds_buf r = {0};
        json_t *own = NULL;
        if (!messages) {
            own = json_pack("[{s:s,s:s}]", "role", "user", "content", text ? text : "");
            if (!own) return ds_err_set(DS_ERR_NOMEM, "out of memory");
            messages = own;
        }
        rc = ds_chat_render((ds_chat_format)bt->chat_format, ds_tok_bos_token(bt->tok), messages, 1,
                            &r);
        json_decref(own);
        if (!rc) rc = ds_tok_encode(bt->tok, r.data ? r.data : "", r.len, 0, &ids, &len);
        ds_buf_free(&r);
    } else if (b == DS_BENCH_CHAT && messages) {
        /* no template to render with: count the contents */
        size_t i;
        json_t *m;
        int64_t total = 0;
        rc = 0;
        json_array_foreach(messages, i, m) {
            const char *c = json_string_value(json_object_get(m, "content"));
            if (!c) continue;
            free(ids);
            ids = NULL;
            rc = ds_tok_encode(bt->tok, c, strlen(c), 0, &ids, &len);
            if (rc) break;
            total += (int64_t)len;
        }
        len = (size_t)total;
    } else {
        rc = ds_tok_encode(bt->tok, text ? text : "", text ? strlen(text) : 0,
                           b == DS_BENCH_COMPLETIONS && bt->add_bos, &ids, &len);
    }
    free(ids);
    if (rc) return rc;
    if (len > INT32_MAX) return ds_err_set(DS_ERR_RANGE, "prompt of %zu tokens", len);
    *n = (int32_t)len;
    return DS_OK;
}

/* One prompt of exactly `target` tokens (ds_bench_count) into *text (malloc'd). */
static int exact_prompt(const ds_bench_tok *bt, ds_bench_backend b, int32_t target, uint64_t rng,
                        char **text) {
    int32_t fixed;
    int rc = ds_bench_count(bt, b, "", NULL, &fixed);
    if (rc) return rc;
    if (target < fixed)
        return ds_err_set(
            DS_ERR_ARG, "--prompt-tokens %d is below the %d tokens every prompt has (%s)",
            (int)target, (int)fixed,
            b == DS_BENCH_CHAT && bt->chat_format >= 0 ? "the chat template" : "the BOS token");
    int32_t want = target - fixed; /* text tokens to draw at first */
    int32_t *ids = malloc(((size_t)want + 16) * sizeof *ids);
    size_t n = 0, cap = (size_t)want + 16;
    ds_buf t = {0};
    if (!ids) return ds_err_set(DS_ERR_NOMEM, "out of memory");
    for (int32_t i = 0; i < want; i++) ids[n++] = bt->pool[splitmix(&rng) % (uint64_t)bt->n_pool];
    rc = DS_ERR_ARG;
    for (int round = 0; round < 64; round++) {
        t.len = 0;
        if (ds_buf_append(&t, "", 0) || (n && ds_tok_decode(bt->tok, ids, n, 0, &t))) {
            rc = DS_ERR_NOMEM;
            break;
        }
        int32_t c;
        if ((rc = ds_bench_count(bt, b, t.data, NULL, &c))) break;
        if (c == target) {
            rc = DS_OK;
            break;
        }
        rc = DS_ERR_ARG;
        if (c > target) { /* drop ids from the end (at least one, so the loop moves) */
            size_t drop = (size_t)(c - target);
            n = drop < n ? n - drop : 0;
        } else {
            size_t add = (size_t)(target - c);
            if (n + add > cap) {
                size_t nc = (n + add) * 2;
                int32_t *g = realloc(ids, nc * sizeof *ids);
                if (!g) {
                    rc = DS_ERR_NOMEM;
                    break;
                }
                ids = g, cap = nc;
            }
            for (size_t i = 0; i < add; i++)
                ids[n++] = bt->pool[splitmix(&rng) % (uint64_t)bt->n_pool];
        }
    }
    free(ids);
    if (rc == DS_OK) {
        *text = t.data; /* ownership moves to the caller */
        return DS_OK;
    }
    ds_buf_free(&t);
    if (rc == DS_ERR_NOMEM) return ds_err_set(DS_ERR_NOMEM, "out of memory building a prompt");
    if (rc == DS_ERR_ARG)
        return ds_err_set(DS_ERR_ARG, "no text of exactly %d tokens found in 64 rounds",
                          (int)target);
    return rc;
}

int ds_bench_random_prompts(const ds_bench_tok *bt, ds_bench_backend b, int32_t n,
                            int32_t prompt_tokens, int32_t max_tokens, uint64_t seed,
                            ds_bench_prompt **out) {
    *out = NULL;
    ds_bench_prompt *p = calloc(n > 0 ? (size_t)n : 1, sizeof *p);
    if (!p) return ds_err_set(DS_ERR_NOMEM, "out of memory");
    for (int32_t i = 0; i < n; i++) {
        uint64_t s = seed ^ (0x5851f42d4c957f2dull * (uint64_t)(i + 1));
        splitmix(&s);
        int rc = exact_prompt(bt, b, prompt_tokens, s, &p[i].text);
        if (rc) {
            ds_bench_prompts_free(p, n);
            return rc;
        }
        p[i].prompt_tokens = prompt_tokens;
        p[i].max_tokens = max_tokens;
    }
    *out = p;
    return DS_OK;
}

/* Parses one dataset line (a JSON object) into q. */
static int parse_line(const ds_bench_tok *bt, ds_bench_backend b, const char *path, size_t line_no,
                      const char *s, size_t len, int32_t max_tokens, ds_bench_prompt *q) {
    json_error_t je;
    json_t *o = json_loadb(s, len, JSON_REJECT_DUPLICATES, &je);
    int rc = DS_ERR_FORMAT;
    if (!o) return ds_err_set(rc, "%s:%zu: not JSON: %s", path, line_no, je.text);
    json_t *pr = json_object_get(o, "prompt"), *ms = json_object_get(o, "messages"),
           *mt = json_object_get(o, "max_tokens");
    if (!json_is_object(o)) {
        ds_err_set(rc, "%s:%zu: a line must be a JSON object", path, line_no);
    } else if (pr && !json_is_string(pr)) {
        ds_err_set(rc, "%s:%zu: \"prompt\" must be a string", path, line_no);
    } else if (ms && (!json_is_array(ms) || json_array_size(ms) == 0)) {
        ds_err_set(rc, "%s:%zu: \"messages\" must be a non-empty array", path, line_no);
    } else if (ms && b != DS_BENCH_CHAT) {
        ds_err_set(rc, "%s:%zu: \"messages\" needs --backend openai-chat", path, line_no);
    } else if (!pr && !ms) {
        ds_err_set(rc, "%s:%zu: a line needs \"prompt\"%s", path, line_no,
                   b == DS_BENCH_CHAT ? " or \"messages\"" : "");
    } else if (mt && (!json_is_integer(mt) || json_integer_value(mt) < 1 ||
                      json_integer_value(mt) > INT32_MAX)) {
        ds_err_set(rc, "%s:%zu: \"max_tokens\" must be a positive integer", path, line_no);
    } else {
        q->max_tokens = mt ? (int32_t)json_integer_value(mt) : max_tokens;
        if (ms) {
            q->messages = json_incref(ms);
        } else {
            q->text = strdup(json_string_value(pr));
            if (!q->text) {
                json_decref(o);
                return ds_err_set(DS_ERR_NOMEM, "out of memory");
            }
        }
        rc = ds_bench_count(bt, b, q->text, q->messages, &q->prompt_tokens);
        if (rc) ds_err_wrap(rc, "%s:%zu", path, line_no);
    }
    json_decref(o);
    return rc;
}

int ds_bench_file_prompts(const ds_bench_tok *bt, ds_bench_backend b, const char *path, int32_t n,
                          int32_t max_tokens, ds_bench_prompt **out) {
    *out = NULL;
    FILE *f = fopen(path, "rb");
    if (!f) return ds_err_set(DS_ERR_IO, "%s: %s", path, strerror(errno));
    ds_bench_prompt *lines = NULL, *p = NULL;
    size_t n_lines = 0, cap = 0, line_no = 0, lcap = 0;
    char *line = NULL;
    ssize_t len;
    int rc = DS_OK;
    while (!rc && (len = getline(&line, &lcap, f)) >= 0) {
        line_no++;
        size_t k = (size_t)len;
        while (k && (line[k - 1] == '\n' || line[k - 1] == '\r' || line[k - 1] == ' ')) k--;
        size_t s = 0;
        while (s < k && (line[s] == ' ' || line[s] == '\t')) s++;
        if (s == k) continue; /* blank line */
        if (n_lines == cap) {
            size_t nc = cap ? cap * 2 : 64;
            ds_bench_prompt *g = realloc(lines, nc * sizeof *g);
            if (!g) {
                rc = ds_err_set(DS_ERR_NOMEM, "out of memory");
                break;
            }
            lines = g, cap = nc;
        }
        memset(&lines[n_lines], 0, sizeof lines[n_lines]);
        rc = parse_line(bt, b, path, line_no, line + s, k - s, max_tokens, &lines[n_lines]);
        n_lines++;
    }
    if (!rc && ferror(f)) rc = ds_err_set(DS_ERR_IO, "%s: read error", path);
    if (!rc && n_lines == 0) rc = ds_err_set(DS_ERR_FORMAT, "%s: no prompts in the file", path);
    free(line);
    fclose(f);
    if (!rc) {
        p = calloc(n > 0 ? (size_t)n : 1, sizeof *p);
        if (!p) rc = ds_err_set(DS_ERR_NOMEM, "out of memory");
    }
    for (int32_t i = 0; !rc && i < n; i++) {
        const ds_bench_prompt *src = &lines[(size_t)i % n_lines];
        p[i] = *src;
        p[i].text = src->text ? strdup(src->text) : NULL;
        p[i].messages = src->messages ? json_incref(src->messages) : NULL;
        if (src->text && !p[i].text) rc = ds_err_set(DS_ERR_NOMEM, "out of memory");
    }
    ds_bench_prompts_free(lines, (int32_t)n_lines);
    if (rc) {
        ds_bench_prompts_free(p, n);
        return rc;
    }
    *out = p;
    return DS_OK;
}

void ds_bench_prompts_free(ds_bench_prompt *p, int32_t n) {
    if (!p) return;
    for (int32_t i = 0; i < n; i++) {
        free(p[i].text);
        json_decref(p[i].messages);
    }
    free(p);
}
