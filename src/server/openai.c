/* openai: OpenAI request JSON -> engine requests, and engine events -> OpenAI response JSON.
 *
 * What it assumes. Every byte of a request body is hostile until proven otherwise: the body
 * is checked for nesting depth before jansson sees it (jansson's parser recurses), every field
 * is type- and range-checked here with a message that names it (the engine validates again, so
 * nothing that slips through can crash it), and every list has a length limit (server.h). The
 * semantics follow vLLM's OpenAI server, which is what users of these fields expect:
 *   - unknown fields are ignored, null means "not given";
 *   - prompt: a string, a list of strings, a list of token ids or a list of token-id lists;
 *     strings get a BOS when add_special_tokens (default true for completions) and the
 *     tokenizer says add_bos_token; chat prompts come from the model's chat template (which
 *     writes the BOS itself);
 *   - n > 1 makes n engine requests per prompt; with a seed, choice i gets seed + i (vLLM V1's
 *     parallel sampling); choice indexes are prompt * n + i;
 *   - max_tokens defaults to 16 for completions and to what is left of max_model_len for chat;
 *   - logprobs are the engine's raw logprobs; completions report them per token string (the
 *     sampled token is merged into top_logprobs, as vLLM does), chat per token with its raw
 *     bytes, so a token that is not valid UTF-8 on its own is still reported exactly.
 * Text always comes from the engine's incremental detokenizer, which emits only whole UTF-8
 * characters (and U+FFFD where bytes can never become one), so responses are always valid
 * JSON strings; per-token strings are decoded lossily the same way. */
#include "server/server.h"

#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

/* ---- errors ---- */

int ds_oai_err(ds_oai_error *e, int status, const char *code, const char *param, const char *fmt,
               ...) {
    e->status = status;
    e->type = status >= 500 ? "server_error" : "invalid_request_error";
    e->code = code;
    snprintf(e->param, sizeof e->param, "%s", param ? param : "");
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->message, sizeof e->message, fmt, ap);
    va_end(ap);
    return -1;
}

/* The length of the valid UTF-8 sequence at p[0, n) (1..4), 0 when it is not one: no
 * overlong forms, no surrogates, nothing above U+10FFFF (what jansson accepts). */
static size_t utf8_seq(const unsigned char *p, size_t n) {
    const unsigned c = p[0];
    size_t len;
    unsigned cp;
    if (c < 0x80) return 1;
    if ((c & 0xE0) == 0xC0)
        len = 2, cp = c & 0x1F;
    else if ((c & 0xF0) == 0xE0)
        len = 3, cp = c & 0x0F;
    else if ((c & 0xF8) == 0xF0)
        len = 4, cp = c & 0x07;
    else
        return 0;
    if (len > n) return 0;
    for (size_t k = 1; k < len; k++) {
        if ((p[k] & 0xC0) != 0x80) return 0;
        cp = cp << 6 | (p[k] & 0x3F);
    }
    static const unsigned min[5] = {0, 0, 0x80, 0x800, 0x10000};
    if (cp < min[len] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return 0;
    return len;
}

/* A JSON string of n bytes that may (in theory) not be valid UTF-8: each byte that does not
 * start a valid sequence becomes U+FFFD. */
static json_t *jstr(const char *s, size_t n) {
    json_t *j = json_stringn(s ? s : "", s ? n : 0);
    if (j) return j;
    ds_buf b = {0};
    const unsigned char *p = (const unsigned char *)s;
    for (size_t i = 0; i < n;) {
        size_t len = utf8_seq(p + i, n - i);
        if (len) {
            ds_buf_append(&b, p + i, len);
            i += len;
        } else {
            ds_buf_append(&b, "\xEF\xBF\xBD", 3);
            i++;
        }
    }
    j = json_stringn(b.data ? b.data : "", b.len);
    ds_buf_free(&b);
    return j ? j : json_string("");
}

json_t *ds_oai_error_json(const ds_oai_error *e) {
    json_t *in = json_object();
    json_object_set_new(in, "message", jstr(e->message, strlen(e->message)));
    json_object_set_new(in, "type", json_string(e->type ? e->type : "invalid_request_error"));
    json_object_set_new(in, "param", e->param[0] ? jstr(e->param, strlen(e->param)) : json_null());
    json_object_set_new(in, "code", e->code ? json_string(e->code) : json_null());
    json_t *o = json_object();
    json_object_set_new(o, "error", in);
    return o;
}

/* ---- reading the body ---- */

/* 1 when no array/object nests deeper than max (strings are skipped, escapes respected). */
static int depth_ok(const char *s, size_t n, int max) {
    int d = 0, in_str = 0;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (in_str) {
            if (c == '\\')
                i++;
            else if (c == '"')
                in_str = 0;
        } else if (c == '"') {
            in_str = 1;
        } else if (c == '[' || c == '{') {
            if (++d > max) return 0;
        } else if (c == ']' || c == '}') {
            d--;
        }
    }
    return 1;
}

/* The key of the innermost "key": before byte offset pos (for errors inside a value). */
static void key_before(const char *s, size_t pos, char *key, size_t cap) {
    key[0] = 0;
    if (pos > 4096) s += pos - 4096, pos = 4096; /* look back a little only */
    for (size_t i = pos; i-- > 0;) {
        if (s[i] != ':') continue;
        size_t j = i;
        while (j > 0 &&
               (s[j - 1] == ' ' || s[j - 1] == '\t' || s[j - 1] == '\n' || s[j - 1] == '\r'))
            j--;
        if (j == 0 || s[j - 1] != '"') continue;
        size_t end = j - 1, k = end;
        while (k > 0 && s[k - 1] != '"') k--;
        if (k == 0) return;
        size_t n = end - k < cap - 1 ? end - k : cap - 1;
        memcpy(key, s + k, n);
        key[n] = 0;
        for (size_t t = 0; t < n; t++)
            if ((unsigned char)key[t] < 0x20 || (unsigned char)key[t] >= 0x7f) key[t] = '?';
        return;
    }
}

static json_t *load_object(const char *body, size_t len, ds_oai_error *err) {
    if (!depth_ok(body, len, DS_OAI_MAX_JSON_DEPTH)) {
        ds_oai_err(err, 400, "invalid_json", NULL,
                   "the request body nests arrays/objects deeper than %d levels",
                   DS_OAI_MAX_JSON_DEPTH);
        return NULL;
    }
    json_error_t je;
    json_t *o = json_loadb(body, len, JSON_ALLOW_NUL, &je);
    if (!o) {
        if (strstr(je.text, "too big")) { /* "too big (negative) integer" */
            char key[64];
            key_before(body, (size_t)je.position, key, sizeof key);
            ds_oai_err(err, 400, "invalid_value", key[0] ? key : NULL,
                       "%s%s%san integer at line %d column %d is outside the signed 64-bit range "
                       "[-9223372036854775808, 9223372036854775807]",
                       key[0] ? "'" : "", key, key[0] ? "': " : "", je.line, je.column);
        } else {
            ds_oai_err(err, 400, "invalid_json", NULL,
                       "the request body is not valid JSON: %s (line %d, column %d)", je.text,
                       je.line, je.column);
        }
        return NULL;
    }
    if (!json_is_object(o)) {
        json_decref(o);
        ds_oai_err(err, 400, "invalid_json", NULL, "the request body must be a JSON object");
        return NULL;
    }
    return o;
}

/* ---- fields ---- */

/* The value of key, NULL when absent or null. */
static json_t *field(const json_t *o, const char *key) {
    json_t *v = json_object_get(o, key);
    return json_is_null(v) ? NULL : v;
}

static const char *type_name(const json_t *v) {
    switch (json_typeof(v)) {
    case JSON_OBJECT:
        return "an object";
    case JSON_ARRAY:
        return "an array";
    case JSON_STRING:
        return "a string";
    case JSON_INTEGER:
        return "an integer";
    case JSON_REAL:
        return "a number";
    case JSON_TRUE:
    case JSON_FALSE:
        return "a boolean";
    default:
        return "null";
    }
}

static int bad_type(ds_oai_error *e, const char *key, const json_t *v, const char *want) {
    return ds_oai_err(e, 400, "invalid_type", key, "'%s' must be %s, not %s", key, want,
                      type_name(v));
}

static int get_bool(const json_t *o, const char *key, int *out, ds_oai_error *e) {
    json_t *v = field(o, key);
    if (!v) return 0;
    if (!json_is_boolean(v)) return bad_type(e, key, v, "a boolean");
    *out = json_is_true(v);
    return 0;
}

/* An integer (a number with an integral value counts, as in pydantic's lax mode). */
static int as_int(const json_t *v, int64_t *out) {
    if (json_is_integer(v)) {
        *out = (int64_t)json_integer_value(v);
        return 1;
    }
    if (json_is_real(v)) {
        double d = json_real_value(v);
        if (d == floor(d) && fabs(d) <= 9007199254740992.0) {
            *out = (int64_t)d;
            return 1;
        }
    }
    return 0;
}

static int range_err(ds_oai_error *e, const char *key, const char *val, double lo, double hi) {
    if (hi >= 2147483647.0)
        return ds_oai_err(e, 400, "invalid_value", key, "'%s' = %s: must be at least %.17g", key,
                          val, lo);
    return ds_oai_err(e, 400, "invalid_value", key, "'%s' = %s: must be in [%.17g, %.17g]", key,
                      val, lo, hi);
}

static int get_int(const json_t *o, const char *key, int64_t lo, int64_t hi, int64_t *out,
                   ds_oai_error *e) {
    json_t *v = field(o, key);
    if (!v) return 0;
    int64_t x;
    if (!as_int(v, &x)) return bad_type(e, key, v, "an integer");
    if (x < lo || x > hi) {
        char s[32];
        snprintf(s, sizeof s, "%lld", (long long)x);
        return range_err(e, key, s, (double)lo, (double)hi);
    }
    *out = x;
    return 0;
}

/* A finite number in [lo, hi] (lo excluded when lo_open). */
static int get_num(const json_t *o, const char *key, double lo, int lo_open, double hi, float *out,
                   ds_oai_error *e) {
    json_t *v = field(o, key);
    if (!v) return 0;
    if (!json_is_number(v)) return bad_type(e, key, v, "a number");
    double d = json_number_value(v);
    if (!isfinite(d) || d < lo || (lo_open && d == lo) || d > hi) {
        if (lo_open)
            return ds_oai_err(e, 400, "invalid_value", key, "'%s' = %g: must be in (%g, %g]", key,
                              d, lo, hi);
        if (hi > 1e30)
            return ds_oai_err(e, 400, "invalid_value", key, "'%s' = %g: must be at least %g", key,
                              d, lo);
        return ds_oai_err(e, 400, "invalid_value", key, "'%s' = %g: must be in [%g, %g]", key, d,
                          lo, hi);
    }
    *out = (float)d;
    return 0;
}

/* A field that must be absent, null or the neutral value: else "not supported". */
static int unsupported(const json_t *o, const char *key, ds_oai_error *e) {
    json_t *v = field(o, key);
    if (!v || json_is_false(v) || (json_is_string(v) && json_string_length(v) == 0) ||
        (json_is_array(v) && json_array_size(v) == 0) ||
        (json_is_object(v) && json_object_size(v) == 0))
        return 0;
    return ds_oai_err(e, 400, "unsupported_parameter", key, "'%s' is not supported by this server",
                      key);
}

static int check_model(const ds_oai_ctx *c, const json_t *o, ds_oai_error *e) {
    json_t *v = field(o, "model");
    if (!v) return 0; /* vLLM: optional, the served model */
    if (!json_is_string(v)) return bad_type(e, "model", v, "a string");
    for (int i = 0; i < c->n_names; i++)
        if (c->names[i] && !strcmp(json_string_value(v), c->names[i])) return 0;
    char shown[200];
    snprintf(shown, sizeof shown, "%s", json_string_value(v));
    return ds_oai_err(e, 404, "model_not_found", "model", "The model `%s` does not exist.", shown);
}

ds_oai_ctx ds_oai_default_ctx(void) {
    ds_oai_ctx c;
    memset(&c, 0, sizeof c);
    c.chat_format = -1;
    c.temperature = 1.0f;
    c.top_p = 1.0f;
    c.repetition_penalty = 1.0f;
    return c;
}

/* ---- prompts ---- */

static int token_list(const ds_oai_ctx *c, const json_t *a, const char *what, ds_oai_prompt *p,
                      ds_oai_error *e) {
    size_t n = json_array_size(a);
    if (n == 0) return ds_oai_err(e, 400, "invalid_value", "prompt", "%s is an empty list", what);
    if (n > (size_t)INT32_MAX / 2)
        return ds_oai_err(e, 400, "invalid_value", "prompt", "%s is too long", what);
    p->ids = malloc(n * sizeof(int32_t));
    if (!p->ids) return ds_oai_err(e, 500, NULL, NULL, "out of memory");
    p->n = (int32_t)n;
    for (size_t i = 0; i < n; i++) {
        int64_t x;
        json_t *v = json_array_get(a, i);
        if (!as_int(v, &x))
            return ds_oai_err(e, 400, "invalid_type", "prompt",
                              "%s[%zu] must be a token id, not %s", what, i, type_name(v));
        if (x < 0 || x >= c->vocab)
            return ds_oai_err(e, 400, "invalid_value", "prompt",
                              "%s[%zu] = %lld is not a token id in [0, %d)", what, i, (long long)x,
                              c->vocab);
        p->ids[i] = (int32_t)x;
    }
    return 0;
}

static int encode(const ds_oai_ctx *c, const char *text, size_t len, int add_bos, const char *param,
                  ds_oai_prompt *p, ds_oai_error *e) {
    if (!c->tok)
        return ds_oai_err(e, 400, "invalid_value", param,
                          "this model has no tokenizer.json: give the prompt as token ids");
    size_t n = 0;
    int rc = ds_tok_encode(c->tok, text, len, add_bos, &p->ids, &n);
    if (rc) return ds_oai_err(e, 500, NULL, param, "tokenization failed: %s", ds_err_msg());
    if (n == 0)
        return ds_oai_err(e, 400, "invalid_value", param, "the prompt is empty (no tokens)");
    if (n > (size_t)INT32_MAX / 2)
        return ds_oai_err(e, 400, "context_length_exceeded", param, "the prompt is too long");
    p->n = (int32_t)n;
    return 0;
}

static int add_prompt(ds_oai_request *r, ds_oai_error *e) {
    ds_oai_prompt *np = realloc(r->prompts, ((size_t)r->n_prompts + 1) * sizeof *np);
    if (!np) return ds_oai_err(e, 500, NULL, NULL, "out of memory");
    r->prompts = np;
    memset(&np[r->n_prompts++], 0, sizeof *np);
    return 0;
}

static char *dup_n(const char *s, size_t n) {
    char *d = malloc(n + 1);
    if (d) {
        memcpy(d, s, n);
        d[n] = 0;
    }
    return d;
}

/* /v1/completions' prompt field. */
static int completion_prompts(const ds_oai_ctx *c, const json_t *o, int add_special, int echo,
                              ds_oai_request *r, ds_oai_error *e) {
    json_t *p = field(o, "prompt");
    if (!p)
        return ds_oai_err(e, 400, "missing_required_parameter", "prompt", "'prompt' is required");
    const int add_bos = add_special && c->tok && ds_tok_add_bos(c->tok);
    const char *shape = "'prompt' must be a string, an array of strings, an array of token ids or "
                        "an array of token-id arrays";
    if (json_is_string(p)) {
        if (add_prompt(r, e)) return -1;
        ds_oai_prompt *q = &r->prompts[0];
        if (echo && !(q->text = dup_n(json_string_value(p), json_string_length(p))))
            return ds_oai_err(e, 500, NULL, NULL, "out of memory");
        return encode(c, json_string_value(p), json_string_length(p), add_bos, "prompt", q, e);
    }
    if (!json_is_array(p)) return ds_oai_err(e, 400, "invalid_type", "prompt", "%s", shape);
    size_t n = json_array_size(p);
    if (n == 0) return ds_oai_err(e, 400, "invalid_value", "prompt", "'prompt' is an empty list");
    json_t *first = json_array_get(p, 0);
    int64_t dummy;
    if (as_int(first, &dummy)) { /* one prompt of token ids */
        if (add_prompt(r, e)) return -1;
        return token_list(c, p, "prompt", &r->prompts[0], e);
    }
    if (n > DS_OAI_MAX_PROMPTS)
        return ds_oai_err(e, 400, "invalid_value", "prompt",
                          "'prompt' lists %zu prompts; at most %d per request", n,
                          DS_OAI_MAX_PROMPTS);
    for (size_t i = 0; i < n; i++) {
        json_t *v = json_array_get(p, i);
        char what[48];
        snprintf(what, sizeof what, "prompt[%zu]", i);
        if (add_prompt(r, e)) return -1;
        ds_oai_prompt *q = &r->prompts[r->n_prompts - 1];
        if (json_is_string(v) && json_is_string(first)) {
            if (echo && !(q->text = dup_n(json_string_value(v), json_string_length(v))))
                return ds_oai_err(e, 500, NULL, NULL, "out of memory");
            if (encode(c, json_string_value(v), json_string_length(v), add_bos, "prompt", q, e))
                return -1;
        } else if (json_is_array(v) && json_is_array(first)) {
            if (token_list(c, v, what, q, e)) return -1;
        } else {
            return ds_oai_err(e, 400, "invalid_type", "prompt", "%s (%s is %s)", shape, what,
                              type_name(v));
        }
    }
    return 0;
}

/* A copy of messages with OpenAI content-part arrays flattened to strings (text parts joined by
 * "\n", as vLLM's "string" content format does) and "developer" read as "system". */
static json_t *flatten_messages(const json_t *msgs, ds_oai_error *e) {
    if (!json_is_array(msgs)) {
        bad_type(e, "messages", msgs, "an array");
        return NULL;
    }
    size_t n = json_array_size(msgs);
    if (n == 0) {
        ds_oai_err(e, 400, "invalid_value", "messages", "'messages' is an empty list");
        return NULL;
    }
    if (n > DS_OAI_MAX_MESSAGES) {
        ds_oai_err(e, 400, "invalid_value", "messages", "more than %d messages",
                   DS_OAI_MAX_MESSAGES);
        return NULL;
    }
    json_t *out = json_array();
    for (size_t i = 0; i < n; i++) {
        json_t *m = json_array_get(msgs, i);
        if (!json_is_object(m)) {
            ds_oai_err(e, 400, "invalid_type", "messages",
                       "messages[%zu] must be an object, not %s", i, type_name(m));
            json_decref(out);
            return NULL;
        }
        json_t *c = json_copy(m); /* shallow: values are shared, replaced below */
        json_t *role = json_object_get(c, "role");
        if (json_is_string(role) && !strcmp(json_string_value(role), "developer"))
            json_object_set_new(c, "role", json_string("system"));
        json_t *content = json_object_get(c, "content");
        if (json_is_array(content)) {
            ds_buf text = {0};
            size_t k;
            json_t *part;
            json_array_foreach(content, k, part) {
                json_t *type = json_object_get(part, "type"), *t = json_object_get(part, "text");
                if (json_is_string(part)) {
                    t = part;
                } else if (!json_is_object(part) || !json_is_string(type) ||
                           strcmp(json_string_value(type), "text") || !json_is_string(t)) {
                    ds_buf_free(&text);
                    json_decref(c);
                    json_decref(out);
                    ds_oai_err(e, 400, "invalid_value", "messages",
                               "messages[%zu].content[%zu]: only text parts ({\"type\": \"text\", "
                               "\"text\": ...}) are supported",
                               i, k);
                    return NULL;
                }
                if (k) ds_buf_append(&text, "\n", 1);
                ds_buf_append(&text, json_string_value(t), json_string_length(t));
            }
            json_object_set_new(c, "content", jstr(text.data, text.len));
            ds_buf_free(&text);
        }
        json_array_append_new(out, c);
    }
    return out;
}

static int chat_prompt(const ds_oai_ctx *c, const json_t *o, int add_special, ds_oai_request *r,
                       ds_oai_error *e) {
    json_t *msgs = json_object_get(o, "messages");
    if (!msgs || json_is_null(msgs))
        return ds_oai_err(e, 400, "missing_required_parameter", "messages",
                          "'messages' is required");
    if (!c->tok)
        return ds_oai_err(e, 400, "invalid_value", "messages",
                          "this model has no tokenizer.json: chat is not available");
    if (c->chat_format < 0)
        return ds_oai_err(e, 400, "invalid_value", "messages",
                          "this model's tokenizer_config.json has no DeepSeek chat template "
                          "(start the server with --chat-template-format)");
    int agp = 1, cont = 0;
    if (get_bool(o, "add_generation_prompt", &agp, e) ||
        get_bool(o, "continue_final_message", &cont, e))
        return -1;
    if (cont)
        return ds_oai_err(e, 400, "unsupported_parameter", "continue_final_message",
                          "'continue_final_message' is not supported by this server");
    json_t *flat = flatten_messages(msgs, e);
    if (!flat) return -1;
    ds_buf text = {0};
    int rc =
        ds_chat_render((ds_chat_format)c->chat_format, ds_tok_bos_token(c->tok), flat, agp, &text);
    json_decref(flat);
    if (rc) {
        ds_buf_free(&text);
        return ds_oai_err(e, 400, "invalid_value", "messages", "%s", ds_err_msg());
    }
    if (add_prompt(r, e)) {
        ds_buf_free(&text);
        return -1;
    }
    rc = encode(c, text.data ? text.data : "", text.len, add_special && ds_tok_add_bos(c->tok),
                "messages", &r->prompts[0], e);
    ds_buf_free(&text);
    return rc;
}

/* ---- sampling fields ---- */

static int parse_stop(const ds_oai_ctx *c, const json_t *o, ds_oai_request *r, ds_oai_error *e) {
    json_t *v = field(o, "stop");
    if (v) {
        size_t n = json_is_string(v) ? 1 : json_array_size(v);
        if (!json_is_string(v) && !json_is_array(v))
            return bad_type(e, "stop", v, "a string or an array of strings");
        if (n > DS_OAI_MAX_STOP)
            return ds_oai_err(e, 400, "invalid_value", "stop", "'stop' has %zu strings; at most %d",
                              n, DS_OAI_MAX_STOP);
        if (n && !c->tok)
            return ds_oai_err(e, 400, "invalid_value", "stop",
                              "stop strings need the model's tokenizer.json");
        r->stop = calloc(n + 1, sizeof(char *));
        if (!r->stop) return ds_oai_err(e, 500, NULL, NULL, "out of memory");
        for (size_t i = 0; i < n; i++) {
            json_t *s = json_is_string(v) ? v : json_array_get(v, i);
            if (!json_is_string(s))
                return ds_oai_err(e, 400, "invalid_type", "stop",
                                  "stop[%zu] must be a string, not %s", i, type_name(s));
            size_t len = json_string_length(s);
            if (len == 0)
                return ds_oai_err(e, 400, "invalid_value", "stop", "stop[%zu] is an empty string",
                                  i);
            if (len > DS_OAI_MAX_STOP_LEN)
                return ds_oai_err(e, 400, "invalid_value", "stop",
                                  "stop[%zu] is longer than %d bytes", i, DS_OAI_MAX_STOP_LEN);
            if (memchr(json_string_value(s), 0, len))
                return ds_oai_err(e, 400, "invalid_value", "stop",
                                  "stop[%zu] contains U+0000, which stop strings cannot", i);
            if (!(r->stop[i] = dup_n(json_string_value(s), len)))
                return ds_oai_err(e, 500, NULL, NULL, "out of memory");
            r->base.n_stop = (int32_t)i + 1;
        }
        r->base.stop = (const char *const *)r->stop;
    }
    v = field(o, "stop_token_ids");
    if (v) {
        if (!json_is_array(v)) return bad_type(e, "stop_token_ids", v, "an array of token ids");
        size_t n = json_array_size(v);
        if (n > DS_OAI_MAX_STOP_TOKEN_IDS)
            return ds_oai_err(e, 400, "invalid_value", "stop_token_ids",
                              "'stop_token_ids' has %zu ids; at most %d", n,
                              DS_OAI_MAX_STOP_TOKEN_IDS);
        r->stop_ids = malloc((n + 1) * sizeof(int32_t));
        if (!r->stop_ids) return ds_oai_err(e, 500, NULL, NULL, "out of memory");
        for (size_t i = 0; i < n; i++) {
            int64_t x;
            json_t *t = json_array_get(v, i);
            if (!as_int(t, &x) || x < 0 || x >= c->vocab)
                return ds_oai_err(e, 400, "invalid_value", "stop_token_ids",
                                  "stop_token_ids[%zu] is not a token id in [0, %d)", i, c->vocab);
            r->stop_ids[i] = (int32_t)x;
        }
        r->base.stop_token_ids = r->stop_ids;
        r->base.n_stop_token_ids = (int32_t)n;
    }
    return 0;
}

static int parse_logit_bias(const ds_oai_ctx *c, const json_t *o, ds_oai_request *r,
                            ds_oai_error *e) {
    json_t *v = field(o, "logit_bias");
    if (!v) return 0;
    if (!json_is_object(v)) return bad_type(e, "logit_bias", v, "an object {\"token id\": bias}");
    size_t n = json_object_size(v);
    if (n > DS_OAI_MAX_LOGIT_BIAS)
        return ds_oai_err(e, 400, "invalid_value", "logit_bias",
                          "'logit_bias' has %zu entries; at most %d", n, DS_OAI_MAX_LOGIT_BIAS);
    r->bias = malloc((n + 1) * sizeof *r->bias);
    if (!r->bias) return ds_oai_err(e, 500, NULL, NULL, "out of memory");
    const char *key;
    json_t *val;
    int32_t k = 0;
    json_object_foreach(v, key, val) {
        char *end;
        long long id = strtoll(key, &end, 10);
        char shown[40];
        snprintf(shown, sizeof shown, "%.32s", key);
        for (char *s = shown; *s; s++)
            if ((unsigned char)*s < 0x20 || (unsigned char)*s >= 0x7f) *s = '?';
        if (!*key || *end || key[0] == ' ' || id < 0 || id >= c->vocab)
            return ds_oai_err(e, 400, "invalid_value", "logit_bias",
                              "logit_bias key '%s' is not a token id in [0, %d)", shown, c->vocab);
        if (!json_is_number(val))
            return ds_oai_err(e, 400, "invalid_type", "logit_bias",
                              "logit_bias['%s'] must be a number, not %s", shown, type_name(val));
        double b = json_number_value(val);
        if (!(b >= -DS_SAMPLER_MAX_BIAS && b <= DS_SAMPLER_MAX_BIAS))
            return ds_oai_err(e, 400, "invalid_value", "logit_bias",
                              "logit_bias['%s'] = %g: must be in [-100, 100]", shown, b);
        r->bias[k].token = (int32_t)id;
        r->bias[k++].bias = (float)b;
    }
    r->base.sampling.logit_bias = r->bias;
    r->base.sampling.n_logit_bias = k;
    return 0;
}

/* The name at the start of an engine validation message ("top_p = 0: ..."), for param. */
static void message_field(const char *msg, char *out, size_t cap) {
    size_t n = 0;
    while (msg[n] && (msg[n] == '_' || (msg[n] >= 'a' && msg[n] <= 'z')) && n + 1 < cap) n++;
    memcpy(out, msg, n);
    out[n] = 0;
}

int ds_oai_parse(const ds_oai_ctx *c, ds_oai_kind kind, const char *body, size_t len,
                 ds_oai_request *r, ds_oai_error *e) {
    memset(r, 0, sizeof *r);
    memset(e, 0, sizeof *e);
    r->kind = kind;
    r->n = 1;
    r->logprobs = -1;
    json_t *o = load_object(body, len, e);
    if (!o) return -1;
    int rc = -1;
    ds_request *q = &r->base;
    ds_sampling_params *sp = &q->sampling;
    *sp = ds_sampling_default_params();
    sp->temperature = c->temperature;
    sp->top_p = c->top_p;
    sp->top_k = c->top_k;
    sp->min_p = c->min_p;
    sp->repetition_penalty = c->repetition_penalty;
    q->skip_special_tokens = 1;
    const int chat = kind == DS_OAI_CHAT;
    int add_special = !chat, ignore_eos = 0, include_stop = 0, skip_special = 1;
    int64_t n = 1, max_tokens = -1, min_tokens = 0, top_k = sp->top_k, seed = 0;
    if (check_model(c, o, e)) goto out;
    /* the features this server does not have */
    static const char *const unsup[] = {
        "suffix",        "prompt_logprobs",   "use_beam_search", "guided_json",
        "guided_regex",  "guided_choice",     "guided_grammar",  "functions",
        "function_call", "structured_outputs"};
    for (size_t i = 0; i < sizeof unsup / sizeof unsup[0]; i++)
        if (unsupported(o, unsup[i], e)) goto out;
    json_t *bo = field(o, "best_of");
    if (bo) {
        int64_t b;
        if (!as_int(bo, &b)) {
            bad_type(e, "best_of", bo, "an integer");
            goto out;
        }
        if (b > 1) {
            ds_oai_err(e, 400, "unsupported_parameter", "best_of",
                       "'best_of' > 1 is not supported by this server");
            goto out;
        }
    }
    json_t *rf = field(o, "response_format");
    if (rf) {
        json_t *t = json_is_object(rf) ? json_object_get(rf, "type") : NULL;
        if (!json_is_string(t)) {
            bad_type(e, "response_format", rf, "an object {\"type\": ...}");
            goto out;
        }
        if (strcmp(json_string_value(t), "text")) {
            ds_oai_err(e, 400, "unsupported_parameter", "response_format",
                       "response_format type '%.40s' is not supported by this server (only "
                       "'text')",
                       json_string_value(t));
            goto out;
        }
    }
    json_t *tools = field(o, "tools"), *tc = field(o, "tool_choice");
    if (tools && !json_is_array(tools)) {
        bad_type(e, "tools", tools, "an array");
        goto out;
    }
    if (tc && !json_is_string(tc) && !json_is_object(tc)) {
        bad_type(e, "tool_choice", tc, "a string or an object");
        goto out;
    }
    if (((tools && json_array_size(tools)) || tc) &&
        !(tc && json_is_string(tc) && !strcmp(json_string_value(tc), "none"))) {
        ds_oai_err(e, 400, "unsupported_parameter", tc ? "tool_choice" : "tools",
                   "tool calling is not supported by this server (tool_choice \"none\" is: the "
                   "tools are then ignored)");
        goto out;
    }
    if (get_int(o, "n", 1, DS_OAI_MAX_N, &n, e)) goto out;
    r->n = (int32_t)n;
    if (get_num(o, "temperature", 0, 0, 1e30, &sp->temperature, e) ||
        get_num(o, "top_p", 0, 1, 1, &sp->top_p, e) ||
        get_num(o, "min_p", 0, 0, 1, &sp->min_p, e) ||
        get_num(o, "presence_penalty", -2, 0, 2, &sp->presence_penalty, e) ||
        get_num(o, "frequency_penalty", -2, 0, 2, &sp->frequency_penalty, e) ||
        get_num(o, "repetition_penalty", 0, 1, 1e30, &sp->repetition_penalty, e) ||
        get_int(o, "top_k", -1, INT32_MAX, &top_k, e))
        goto out;
    sp->top_k = top_k < 0 ? 0 : (int32_t)top_k;
    json_t *sv = field(o, "seed");
    if (sv) {
        if (!as_int(sv, &seed)) {
            if (json_is_real(sv))
                ds_oai_err(e, 400, "invalid_type", "seed",
                           "'seed' = %g must be an integer in [-9223372036854775808, "
                           "9223372036854775807]",
                           json_real_value(sv));
            else
                bad_type(e, "seed", sv, "an integer");
            goto out;
        }
        r->has_seed = 1;
        r->seed = (uint64_t)seed; /* signed seeds map by cast: -1 -> 2^64 - 1 */
    }
    int mt_given = 0;
    {
        const char *mk =
            chat && field(o, "max_completion_tokens") ? "max_completion_tokens" : "max_tokens";
        json_t *mv = field(o, mk);
        if (mv) {
            mt_given = 1;
            int echo0 = 0;
            if (!chat && get_bool(o, "echo", &echo0, e)) goto out;
            if (get_int(o, mk, echo0 ? 0 : 1, INT32_MAX, &max_tokens, e)) goto out;
        }
    }
    if (get_int(o, "min_tokens", 0, INT32_MAX, &min_tokens, e)) goto out;
    sp->min_tokens = (int32_t)min_tokens;
    if (get_bool(o, "ignore_eos", &ignore_eos, e) ||
        get_bool(o, "include_stop_str_in_output", &include_stop, e) ||
        get_bool(o, "skip_special_tokens", &skip_special, e) ||
        get_bool(o, "add_special_tokens", &add_special, e) || get_bool(o, "stream", &r->stream, e))
        goto out;
    q->ignore_eos = ignore_eos;
    q->include_stop_str = include_stop;
    q->skip_special_tokens = skip_special;
    json_t *so = field(o, "stream_options");
    if (so) {
        if (!json_is_object(so)) {
            bad_type(e, "stream_options", so, "an object");
            goto out;
        }
        if (!r->stream) {
            ds_oai_err(e, 400, "invalid_value", "stream_options",
                       "'stream_options' can only be given when 'stream' is true");
            goto out;
        }
        if (get_bool(so, "include_usage", &r->include_usage, e) ||
            get_bool(so, "continuous_usage_stats", &r->continuous_usage, e))
            goto out;
    }
    if (chat) {
        int lp = 0;
        int64_t top = -1;
        if (get_bool(o, "logprobs", &lp, e)) goto out;
        if (get_int(o, "top_logprobs", 0, DS_SAMPLER_MAX_LOGPROBS, &top, e)) goto out;
        if (top > 0 && !lp) {
            ds_oai_err(e, 400, "invalid_value", "top_logprobs",
                       "'top_logprobs' needs 'logprobs' to be true");
            goto out;
        }
        r->logprobs = lp ? (int)(top < 0 ? 0 : top) : -1;
    } else {
        int64_t lp = -1;
        json_t *lv = field(o, "logprobs");
        if (lv && json_is_boolean(lv)) { /* tolerated: true = the sampled token only */
            lp = json_is_true(lv) ? 0 : -1;
        } else if (get_int(o, "logprobs", 0, DS_SAMPLER_MAX_LOGPROBS, &lp, e)) {
            goto out;
        }
        r->logprobs = (int)lp;
        if (get_bool(o, "echo", &r->echo, e)) goto out;
    }
    if (get_bool(o, "return_token_ids", &r->return_token_ids, e)) goto out;
    sp->logprobs = r->logprobs;
    if (parse_stop(c, o, r, e) || parse_logit_bias(c, o, r, e)) goto out;
    json_t *user = field(o, "user");
    if (user && !json_is_string(user)) {
        bad_type(e, "user", user, "a string");
        goto out;
    }
    /* the prompt(s): last, since tokenizing is the expensive part */
    if (chat ? chat_prompt(c, o, add_special, r, e)
             : completion_prompts(c, o, add_special, r->echo, r, e))
        goto out;
    if ((int64_t)r->n_prompts * r->n > DS_OAI_MAX_CHOICES) {
        ds_oai_err(e, 400, "invalid_value", "n",
                   "%d prompts x n = %d is %lld choices; at most %d per request", r->n_prompts,
                   r->n, (long long)r->n_prompts * r->n, DS_OAI_MAX_CHOICES);
        goto out;
    }
    const int32_t L = c->max_model_len;
    const char *pp = chat ? "messages" : "prompt";
    for (int32_t i = 0; i < r->n_prompts; i++) {
        ds_oai_prompt *p = &r->prompts[i];
        if (p->n > L || (p->n == L && !(r->echo && max_tokens == 0))) {
            ds_oai_err(e, 400, "context_length_exceeded", pp,
                       "This model's maximum context length is %d tokens. However, your request "
                       "has %d input tokens%s. Please reduce the length of the input.",
                       L, p->n, p->n == L ? ", which leaves no room for the output" : "");
            goto out;
        }
        if (!mt_given)
            p->max_tokens = chat ? L - p->n : (16 < L - p->n ? 16 : L - p->n);
        else if (max_tokens > (int64_t)(L - p->n)) {
            ds_oai_err(e, 400, "context_length_exceeded", chat ? "max_tokens" : "max_tokens",
                       "This model's maximum context length is %d tokens. However, you requested "
                       "%lld tokens (%d in the %s, %lld for the completion). Please reduce the "
                       "length of the %s or the completion.",
                       L, (long long)p->n + max_tokens, p->n, chat ? "messages" : "prompt",
                       (long long)max_tokens, chat ? "messages" : "prompt");
            goto out;
        } else {
            p->max_tokens = (int32_t)max_tokens;
        }
        if (min_tokens > p->max_tokens) {
            ds_oai_err(e, 400, "invalid_value", "min_tokens",
                       "'min_tokens' = %lld: must not exceed max_tokens (%d)",
                       (long long)min_tokens, p->max_tokens);
            goto out;
        }
        if (r->echo && !p->text) { /* token-id prompt: its text, lossy, special tokens kept */
            ds_buf t = {0};
            if (c->tok && ds_tok_decode(c->tok, p->ids, (size_t)p->n, 0, &t) != DS_OK)
                ds_buf_free(&t);
            p->text = dup_n(t.data ? t.data : "", t.len);
            ds_buf_free(&t);
            if (!p->text) {
                ds_oai_err(e, 500, NULL, NULL, "out of memory");
                goto out;
            }
        }
    }
    /* the engine's own check, so that nothing it would refuse reaches it */
    if (ds_sampling_params_validate(sp, c->vocab) != DS_OK) {
        char f[64];
        message_field(ds_err_msg(), f, sizeof f);
        ds_oai_err(e, 400, "invalid_value", f[0] ? f : NULL, "%s", ds_err_msg());
        goto out;
    }
    rc = 0;
out:
    json_decref(o);
    if (rc) ds_oai_request_free(r);
    return rc;
}

void ds_oai_request_free(ds_oai_request *r) {
    if (!r) return;
    for (int32_t i = 0; r->prompts && i < r->n_prompts; i++) {
        free(r->prompts[i].ids);
        free(r->prompts[i].text);
    }
    free(r->prompts);
    free(r->stop_ids);
    free(r->bias);
    for (int32_t i = 0; r->stop && r->stop[i]; i++) free(r->stop[i]);
    free(r->stop);
    memset(r, 0, sizeof *r);
}

int32_t ds_oai_n_choices(const ds_oai_request *r) {
    return r->n_prompts * r->n;
}

void ds_oai_choice_request(const ds_oai_request *r, int32_t k, ds_request *q) {
    const ds_oai_prompt *p = &r->prompts[k / r->n];
    *q = r->base;
    q->prompt = p->ids;
    q->n_prompt = p->n;
    q->max_tokens = p->max_tokens;
    if (r->has_seed) {
        q->sampling.seed = r->seed + (uint64_t)(k % r->n); /* vLLM V1: seed + child index */
    } else if (getrandom(&q->sampling.seed, sizeof q->sampling.seed, 0) !=
               (ssize_t)sizeof q->sampling.seed) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        q->sampling.seed =
            (uint64_t)ts.tv_nsec * 0x9E3779B97F4A7C15ull ^ (uint64_t)ts.tv_sec ^ (uint64_t)k << 32;
    }
}

/* ---- /tokenize, /detokenize ---- */

int ds_oai_tokenize(const ds_oai_ctx *c, const char *body, size_t len, json_t **out,
                    ds_oai_error *e) {
    *out = NULL;
    memset(e, 0, sizeof *e);
    json_t *o = load_object(body, len, e);
    if (!o) return -1;
    ds_oai_request r;
    memset(&r, 0, sizeof r);
    int rc = -1, strs = 0;
    json_t *msgs = field(o, "messages");
    int add_special = !msgs;
    if (check_model(c, o, e) || get_bool(o, "add_special_tokens", &add_special, e) ||
        get_bool(o, "return_token_strs", &strs, e))
        goto done;
    if (msgs) {
        if (chat_prompt(c, o, add_special, &r, e)) goto done;
    } else {
        json_t *p = field(o, "prompt");
        if (!p || !json_is_string(p)) {
            ds_oai_err(e, 400, p ? "invalid_type" : "missing_required_parameter", "prompt",
                       "'prompt' (a string) or 'messages' is required");
            goto done;
        }
        if (!c->tok) {
            ds_oai_err(e, 400, "invalid_value", "prompt", "this model has no tokenizer.json");
            goto done;
        }
        if (add_prompt(&r, e)) goto done;
        size_t n = 0;
        if (ds_tok_encode(c->tok, json_string_value(p), json_string_length(p),
                          add_special && ds_tok_add_bos(c->tok), &r.prompts[0].ids, &n)) {
            ds_oai_err(e, 500, NULL, NULL, "tokenization failed: %s", ds_err_msg());
            goto done;
        }
        r.prompts[0].n = (int32_t)n;
    }
    json_t *ids = json_array(), *ts = strs ? json_array() : json_null();
    for (int32_t i = 0; i < r.prompts[0].n; i++) {
        int32_t id = r.prompts[0].ids[i];
        json_array_append_new(ids, json_integer(id));
        if (strs) {
            ds_buf b = {0};
            ds_tok_decode(c->tok, &id, 1, 0, &b);
            json_array_append_new(ts, jstr(b.data, b.len));
            ds_buf_free(&b);
        }
    }
    *out = json_pack("{s:i,s:i,s:o,s:o}", "count", (int)r.prompts[0].n, "max_model_len",
                     (int)c->max_model_len, "tokens", ids, "token_strs", ts);
    rc = *out ? 0 : ds_oai_err(e, 500, NULL, NULL, "out of memory");
done:
    ds_oai_request_free(&r);
    json_decref(o);
    return rc;
}

int ds_oai_detokenize(const ds_oai_ctx *c, const char *body, size_t len, json_t **out,
                      ds_oai_error *e) {
    *out = NULL;
    memset(e, 0, sizeof *e);
    json_t *o = load_object(body, len, e);
    if (!o) return -1;
    int rc = -1;
    ds_oai_prompt p;
    memset(&p, 0, sizeof p);
    json_t *t = field(o, "tokens");
    if (check_model(c, o, e)) goto done;
    if (!t || !json_is_array(t)) {
        ds_oai_err(e, 400, t ? "invalid_type" : "missing_required_parameter", "tokens",
                   "'tokens' (an array of token ids) is required");
        goto done;
    }
    if (!c->tok) {
        ds_oai_err(e, 400, "invalid_value", "tokens", "this model has no tokenizer.json");
        goto done;
    }
    ds_buf b = {0};
    if (json_array_size(t) && token_list(c, t, "tokens", &p, e)) goto done;
    if (ds_tok_decode(c->tok, p.ids, (size_t)p.n, 0, &b) != DS_OK) {
        ds_oai_err(e, 400, "invalid_value", "tokens", "%s", ds_err_msg());
        ds_buf_free(&b);
        goto done;
    }
    *out = json_pack("{s:o}", "prompt", jstr(b.data, b.len));
    ds_buf_free(&b);
    rc = *out ? 0 : ds_oai_err(e, 500, NULL, NULL, "out of memory");
done:
    free(p.ids);
    json_decref(o);
    return rc;
}

/* ---- responses ---- */

void ds_oai_choice_init(const ds_oai_request *r, int32_t k, ds_oai_choice *ch) {
    memset(ch, 0, sizeof *ch);
    ch->index = k;
    ch->prompt = k / r->n;
    ch->stop_token = -1;
    ch->t_sched = ch->t_first = ch->t_end = ch->t_prev = -1;
    ch->echo_pending = r->echo;
    ds_reasoning_init(&ch->rs);
}

void ds_oai_choice_free(ds_oai_choice *ch) {
    if (!ch) return;
    free(ch->stop_str);
    free(ch->error);
    ds_buf_free(&ch->text);
    json_decref(ch->lp);
    json_decref(ch->ids);
    ch->lp = ch->ids = NULL;
    ch->stop_str = ch->error = NULL;
}

static double finite_lp(float x) {
    return isfinite(x) ? (double)x : -9999.0; /* vLLM's stand-in for -inf */
}

/* The token's string (lossy) and, when bytes, its raw bytes as a JSON array. */
static json_t *token_str(const ds_oai_ctx *c, int32_t id, json_t **bytes) {
    ds_buf b = {0};
    json_t *s;
    if (c->tok && ds_tok_decode_bytes(c->tok, &id, 1, 0, &b) == DS_OK) {
        if (bytes) {
            *bytes = json_array();
            for (size_t i = 0; i < b.len; i++)
                json_array_append_new(*bytes, json_integer((unsigned char)b.data[i]));
        }
        ds_buf t = {0};
        ds_tok_decode(c->tok, &id, 1, 0, &t);
        s = jstr(t.data, t.len);
        ds_buf_free(&t);
    } else {
        char tmp[32];
        snprintf(tmp, sizeof tmp, "token_id:%d", (int)id); /* vLLM's return_tokens_as_token_ids */
        s = json_string(tmp);
        if (bytes) *bytes = json_null();
    }
    ds_buf_free(&b);
    return s;
}

static int64_t code_points(const char *s, size_t n) {
    int64_t k = 0;
    for (size_t i = 0; i < n; i++) k += ((unsigned char)s[i] & 0xC0) != 0x80;
    return k;
}

static json_t *completion_lp_new(void) {
    return json_pack("{s:[],s:[],s:[],s:[]}", "text_offset", "token_logprobs", "tokens",
                     "top_logprobs");
}

/* Completions: one token's entry; lp_val NULL for an echoed prompt token. */
static void completion_lp_add(const ds_oai_ctx *c, ds_oai_choice *ch, int32_t token,
                              const ds_sample_result *s) {
    if (!ch->lp) ch->lp = completion_lp_new();
    json_t *str = token_str(c, token, NULL);
    json_array_append_new(json_object_get(ch->lp, "text_offset"), json_integer(ch->text_offset));
    ch->text_offset += code_points(json_string_value(str), json_string_length(str));
    json_array_append_new(json_object_get(ch->lp, "token_logprobs"),
                          s ? json_real(finite_lp(s->logprob)) : json_null());
    json_t *top = json_null();
    if (s) {
        top = json_object();
        for (int32_t i = 0; i < s->n_top; i++) {
            json_t *ts = token_str(c, s->top[i].token, NULL);
            json_object_set_new(top, json_string_value(ts),
                                json_real(finite_lp(s->top[i].logprob)));
            json_decref(ts);
        }
        if (!json_object_get(top, json_string_value(str)))
            json_object_set_new(top, json_string_value(str), json_real(finite_lp(s->logprob)));
    }
    json_array_append_new(json_object_get(ch->lp, "top_logprobs"), top);
    json_array_append_new(json_object_get(ch->lp, "tokens"), str);
}

/* Chat: one token's entry {token, logprob, bytes, top_logprobs}. */
static void chat_lp_add(const ds_oai_ctx *c, ds_oai_choice *ch, int32_t token,
                        const ds_sample_result *s) {
    if (!ch->lp) ch->lp = json_array();
    json_t *bytes, *top = json_array();
    json_t *str = token_str(c, token, &bytes);
    for (int32_t i = 0; i < s->n_top; i++) {
        json_t *tb, *ts = token_str(c, s->top[i].token, &tb);
        json_array_append_new(top, json_pack("{s:o,s:f,s:o}", "token", ts, "logprob",
                                             finite_lp(s->top[i].logprob), "bytes", tb));
    }
    json_array_append_new(ch->lp,
                          json_pack("{s:o,s:f,s:o,s:o}", "token", str, "logprob",
                                    finite_lp(s->logprob), "bytes", bytes, "top_logprobs", top));
}

int ds_oai_choice_event(const ds_oai_ctx *c, const ds_oai_request *r, ds_oai_choice *ch,
                        const ds_engine_event *ev) {
    if (ch->echo_pending) { /* the prompt goes first, in text and in logprobs */
        const ds_oai_prompt *p = &r->prompts[ch->prompt];
        ch->echo_pending = 0;
        if (p->text && ds_buf_append(&ch->text, p->text, strlen(p->text))) return DS_ERR_NOMEM;
        if (r->logprobs >= 0)
            for (int32_t i = 0; i < p->n; i++) completion_lp_add(c, ch, p->ids[i], NULL);
    }
    if (!ev || ch->done) return DS_OK;
    if (ev->token >= 0 && r->logprobs >= 0) {
        if (r->kind == DS_OAI_CHAT)
            chat_lp_add(c, ch, ev->token, &ev->sample);
        else
            completion_lp_add(c, ch, ev->token, &ev->sample);
    }
    if (ev->token >= 0 && r->return_token_ids) {
        if (!ch->ids) ch->ids = json_array();
        json_array_append_new(ch->ids, json_integer(ev->token));
    }
    if (ev->text_len && ds_buf_append(&ch->text, ev->text, ev->text_len)) return DS_ERR_NOMEM;
    ch->n_prompt = ev->n_prompt;
    ch->n_output = ev->n_output;
    ch->n_cached = ev->n_cached;
    ch->t_sched = ev->t_scheduled;
    ch->t_first = ev->t_first_token;
    if (ev->token >= 0) ch->t_prev = ev->t_now;
    if (ev->finish != DS_FINISH_NONE) {
        ch->done = 1;
        ch->finish = ev->finish;
        ch->t_end = ev->t_now;
        if (ev->stop_str) ch->stop_str = dup_n(ev->stop_str, strlen(ev->stop_str));
        for (int32_t i = 0; ev->stop_token >= 0 && i < r->base.n_stop_token_ids; i++)
            if (r->base.stop_token_ids[i] == ev->stop_token) ch->stop_token = ev->stop_token;
        if (ev->error) ch->error = dup_n(ev->error, strlen(ev->error));
    }
    return DS_OK;
}

static const char *finish_name(ds_finish_reason f) {
    switch (f) {
    case DS_FINISH_STOP:
        return "stop";
    case DS_FINISH_LENGTH:
        return "length";
    case DS_FINISH_ABORT:
        return "abort";
    case DS_FINISH_ERROR:
        return "error";
    default:
        return NULL;
    }
}

static json_t *stop_reason(const ds_oai_choice *ch) {
    if (ch->stop_str) return jstr(ch->stop_str, strlen(ch->stop_str));
    if (ch->stop_token >= 0) return json_integer(ch->stop_token);
    return json_null();
}

json_t *ds_oai_usage(const ds_oai_request *r, const ds_oai_choice *ch, int32_t n_ch) {
    int64_t prompt = 0, completion = 0, cached = 0;
    for (int32_t i = 0; i < r->n_prompts; i++) prompt += r->prompts[i].n; /* once per prompt */
    for (int32_t i = 0; i < n_ch; i++) {
        completion += ch[i].n_output;
        if (ch[i].index % r->n == 0) cached += ch[i].n_cached;
    }
    return json_pack("{s:I,s:I,s:I,s:{s:I}}", "prompt_tokens", (json_int_t)prompt,
                     "completion_tokens", (json_int_t)completion, "total_tokens",
                     (json_int_t)(prompt + completion), "prompt_tokens_details", "cached_tokens",
                     (json_int_t)cached);
}

static json_t *envelope(const ds_oai_request *r, const ds_oai_meta *m, int chunk) {
    const char *object = r->kind == DS_OAI_CHAT
                             ? (chunk ? "chat.completion.chunk" : "chat.completion")
                             : "text_completion";
    return json_pack("{s:s,s:s,s:I,s:s}", "id", m->id, "object", object, "created",
                     (json_int_t)m->created, "model", m->model);
}

/* Splits text into (reasoning, content) for a whole, non-streamed output. */
static void split_whole(const char *t, size_t n, json_t **reasoning, json_t **content) {
    ds_reasoning rs;
    ds_buf a = {0}, b = {0};
    ds_reasoning_init(&rs);
    ds_reasoning_push(&rs, t ? t : "", n, &a, &b);
    ds_reasoning_finish(&rs, &a, &b);
    *reasoning = a.len ? jstr(a.data, a.len) : json_null();
    /* vLLM: content is null when there is none (no "</think>" seen) */
    *content = (rs.in_content && b.len) ? jstr(b.data, b.len) : json_null();
    ds_buf_free(&a);
    ds_buf_free(&b);
}

static json_t *prompt_ids(const ds_oai_prompt *p) {
    json_t *a = json_array();
    for (int32_t i = 0; i < p->n; i++) json_array_append_new(a, json_integer(p->ids[i]));
    return a;
}

json_t *ds_oai_response(const ds_oai_ctx *c, const ds_oai_request *r, const ds_oai_meta *m,
                        ds_oai_choice *ch, int32_t n_ch) {
    json_t *o = envelope(r, m, 0), *choices = json_array();
    for (int32_t i = 0; i < n_ch; i++) {
        ds_oai_choice *x = &ch[i];
        ds_oai_choice_event(c, r, x, NULL); /* an echo of a request that never ran */
        const char *fr = finish_name(x->finish);
        json_t *lp = x->lp ? x->lp : json_null();
        if (r->kind == DS_OAI_CHAT && x->lp)
            lp = json_pack("{s:O}", "content", x->lp);
        else if (x->lp)
            json_incref(lp);
        json_t *cj;
        if (r->kind == DS_OAI_CHAT) {
            json_t *reasoning = json_null(), *content;
            if (c->reasoning)
                split_whole(x->text.data, x->text.len, &reasoning, &content);
            else
                content = jstr(x->text.data, x->text.len);
            json_t *msg = json_pack("{s:s,s:o,s:o,s:[]}", "role", "assistant", "content", content,
                                    "reasoning_content", reasoning, "tool_calls");
            cj = json_pack("{s:i,s:o,s:o,s:o,s:o}", "index", (int)x->index, "message", msg,
                           "logprobs", lp, "finish_reason", fr ? json_string(fr) : json_null(),
                           "stop_reason", stop_reason(x));
        } else {
            cj = json_pack("{s:i,s:o,s:o,s:o,s:o}", "index", (int)x->index, "text",
                           jstr(x->text.data, x->text.len), "logprobs", lp, "finish_reason",
                           fr ? json_string(fr) : json_null(), "stop_reason", stop_reason(x));
        }
        if (r->return_token_ids) {
            json_object_set_new(cj, "token_ids", x->ids ? json_incref(x->ids) : json_array());
            if (r->kind == DS_OAI_COMPLETION)
                json_object_set_new(cj, "prompt_token_ids", prompt_ids(&r->prompts[x->prompt]));
        }
        json_array_append_new(choices, cj);
    }
    json_object_set_new(o, "choices", choices);
    if (r->return_token_ids && r->kind == DS_OAI_CHAT)
        json_object_set_new(o, "prompt_token_ids", prompt_ids(&r->prompts[0]));
    json_object_set_new(o, "usage", ds_oai_usage(r, ch, n_ch));
    return o;
}

static int append_event(json_t *o, ds_buf *out) {
    char *s = json_dumps(o, JSON_COMPACT);
    json_decref(o);
    if (!s) return DS_ERR_NOMEM;
    int rc = ds_buf_append(out, "data: ", 6);
    if (!rc) rc = ds_buf_append(out, s, strlen(s));
    if (!rc) rc = ds_buf_append(out, "\n\n", 2);
    free(s);
    return rc;
}

int ds_oai_stream_start(const ds_oai_request *r, const ds_oai_meta *m, ds_oai_choice *ch,
                        int32_t n_ch, ds_buf *out) {
    if (r->kind != DS_OAI_CHAT) return DS_OK;
    for (int32_t i = 0; i < n_ch; i++) {
        if (ch[i].role_sent) continue;
        ch[i].role_sent = 1;
        json_t *o = envelope(r, m, 1);
        json_object_set_new(o, "choices",
                            json_pack("[{s:i,s:{s:s,s:s},s:n,s:n}]", "index", (int)ch[i].index,
                                      "delta", "role", "assistant", "content", "", "logprobs",
                                      "finish_reason"));
        if (r->include_usage) json_object_set_new(o, "usage", json_null());
        int rc = append_event(o, out);
        if (rc) return rc;
    }
    return DS_OK;
}

int ds_oai_stream_choice(const ds_oai_ctx *c, const ds_oai_request *r, const ds_oai_meta *m,
                         ds_oai_choice *ch, ds_oai_choice *all, int32_t n_all, ds_buf *out) {
    if (ch->final_sent) return DS_OK;
    ds_oai_choice_event(c, r, ch, NULL); /* echo */
    const int final = ch->done;
    json_t *delta = NULL, *text = NULL;
    if (r->kind == DS_OAI_CHAT) {
        ds_buf a = {0}, b = {0};
        if (c->reasoning) {
            ds_reasoning_push(&ch->rs, ch->text.data ? ch->text.data : "", ch->text.len, &a, &b);
            if (final) ds_reasoning_finish(&ch->rs, &a, &b);
        } else {
            ds_buf_append(&b, ch->text.data ? ch->text.data : "", ch->text.len);
        }
        if (a.len || b.len || final || ch->lp || ch->ids) {
            delta = json_object();
            if (a.len) json_object_set_new(delta, "reasoning_content", jstr(a.data, a.len));
            if (b.len) json_object_set_new(delta, "content", jstr(b.data, b.len));
        }
        ds_buf_free(&a);
        ds_buf_free(&b);
    } else if (ch->text.len || final || ch->lp || ch->ids) {
        text = jstr(ch->text.data, ch->text.len);
    }
    ch->text.len = 0;
    if (!delta && !text) return DS_OK;
    const char *fr = final ? finish_name(ch->finish) : NULL;
    json_t *lp = json_null();
    if (ch->lp) {
        lp = r->kind == DS_OAI_CHAT ? json_pack("{s:o}", "content", ch->lp) : ch->lp;
        ch->lp = NULL;
    }
    json_t *o = envelope(r, m, 1), *cj;
    if (r->kind == DS_OAI_CHAT)
        cj = json_pack("{s:i,s:o,s:o,s:o}", "index", (int)ch->index, "delta", delta, "logprobs", lp,
                       "finish_reason", fr ? json_string(fr) : json_null());
    else
        cj = json_pack("{s:i,s:o,s:o,s:o}", "index", (int)ch->index, "text", text, "logprobs", lp,
                       "finish_reason", fr ? json_string(fr) : json_null());
    if (final) json_object_set_new(cj, "stop_reason", stop_reason(ch));
    if (r->return_token_ids) {
        json_object_set_new(cj, "token_ids", ch->ids ? ch->ids : json_array());
        ch->ids = NULL;
    }
    json_object_set_new(o, "choices", json_pack("[o]", cj));
    if (r->continuous_usage)
        json_object_set_new(o, "usage", ds_oai_usage(r, all, n_all));
    else if (r->include_usage)
        json_object_set_new(o, "usage", json_null());
    if (final) ch->final_sent = 1;
    return append_event(o, out);
}

int ds_oai_stream_end(const ds_oai_request *r, const ds_oai_meta *m, ds_oai_choice *ch,
                      int32_t n_ch, ds_buf *out) {
    if (r->include_usage) {
        json_t *o = envelope(r, m, 1);
        json_object_set_new(o, "choices", json_array());
        json_object_set_new(o, "usage", ds_oai_usage(r, ch, n_ch));
        int rc = append_event(o, out);
        if (rc) return rc;
    }
    return ds_buf_append(out, "data: [DONE]\n\n", 14);
}

int ds_oai_stream_error(const ds_oai_error *e, ds_buf *out) {
    int rc = append_event(ds_oai_error_json(e), out);
    return rc ? rc : ds_buf_append(out, "data: [DONE]\n\n", 14);
}
