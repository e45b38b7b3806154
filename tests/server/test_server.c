/* `dsinfer serve` end to end: the real binary on a free loopback port with the tiny-a fixture,
 * driven over raw HTTP and with curl exactly as a user would.
 *   - curl .../v1/completions -d '{"model": ..., "prompt": "Mindspore is", "max_tokens": 120,
 *     "temperature": 0}' gives the text and tokens of `generate --batch-file` for that line;
 *   - every golden prompt (text, and as token ids) gives the official reference's 24 greedy
 *     tokens (return_token_ids), streamed deltas concatenate to the non-streamed text, the
 *     usage counts match;
 *   - chat (system/user/assistant/tool messages) equals the tokens of the rendered template;
 *   - n > 1 with a seed: choice i equals choice 0 of seed + i, and repeats;
 *   - stop strings, stop token ids, logprobs (completions and chat), echo, a token that is not
 *     UTF-8 on its own (U+FFFD, never an error), R1 reasoning_content streamed and whole;
 *   - /v1/models, /version, /health, /tokenize, /detokenize, /metrics (vLLM names).
 * Shutdown is test_server_shutdown's. */
#include "serverutil.h"
#include "io/io.h"
#include "tokenizer/tokenizer.h"

#include <jansson.h>

static char g_model[4096];

static json_t *parse(const srv_resp *r) {
    json_error_t e;
    return r->body ? json_loads(r->body, JSON_ALLOW_NUL, &e) : NULL;
}

/* POST path json; the parsed body (new reference) and the status. */
static json_t *post_json(int port, const char *path, const char *body, int *status) {
    srv_resp r = srv_post(port, path, body);
    *status = r.status;
    json_t *o = parse(&r);
    if (!o) fprintf(stderr, "not JSON (%d): %.300s\n", r.status, r.body ? r.body : "(none)");
    srv_resp_free(&r);
    return o;
}

static json_t *post_pack(int port, const char *path, json_t *req, int *status) {
    char *s = req ? json_dumps(req, JSON_COMPACT) : NULL;
    json_t *o = post_json(port, path, s ? s : "", status);
    free(s);
    json_decref(req);
    return o;
}

/* The SSE events of a streamed body: an array of the parsed "data: {...}" objects; *done when
 * "data: [DONE]" ended it. */
static json_t *sse_events(const char *body, int *done) {
    json_t *a = json_array();
    *done = 0;
    for (const char *p = body; p && *p;) {
        const char *end = strstr(p, "\n\n");
        if (!end) break;
        if (!strncmp(p, "data: ", 6)) {
            if (!strncmp(p + 6, "[DONE]", 6)) {
                *done = 1;
            } else {
                json_error_t e;
                json_t *o = json_loadb(p + 6, (size_t)(end - p - 6), JSON_ALLOW_NUL, &e);
                if (o) json_array_append_new(a, o);
            }
        }
        p = end + 2;
    }
    return a;
}

static const char *str_of(json_t *o, const char *k) {
    const char *s = json_string_value(json_object_get(o, k));
    return s ? s : "";
}

/* Streams req (stream: true forced) and returns the per-choice concatenated text (an array of
 * strings indexed by choice index), the finish reasons, the usage chunk and the token ids. */
typedef struct {
    json_t *text, *finish, *ids, *reasoning;
    json_t *usage;
    int done, status, n_events;
} stream_out;

static void stream_free(stream_out *s) {
    json_decref(s->text);
    json_decref(s->finish);
    json_decref(s->ids);
    json_decref(s->reasoning);
    json_decref(s->usage);
}

static stream_out stream_req(int port, const char *path, json_t *req, int nch) {
    stream_out so;
    memset(&so, 0, sizeof so);
    json_object_set_new(req, "stream", json_true());
    char *body = json_dumps(req, JSON_COMPACT);
    json_decref(req);
    srv_resp r = srv_post(port, path, body);
    free(body);
    so.status = r.status;
    so.text = json_array();
    so.finish = json_array();
    so.ids = json_array();
    so.reasoning = json_array();
    for (int i = 0; i < nch; i++) {
        json_array_append_new(so.text, json_string(""));
        json_array_append_new(so.reasoning, json_string(""));
        json_array_append_new(so.finish, json_null());
        json_array_append_new(so.ids, json_array());
    }
    json_t *ev = sse_events(r.body, &so.done);
    so.n_events = (int)json_array_size(ev);
    size_t i;
    json_t *e;
    json_array_foreach(ev, i, e) {
        json_t *u = json_object_get(e, "usage");
        if (json_is_object(u)) so.usage = json_incref(u);
        size_t j;
        json_t *c;
        json_array_foreach(json_object_get(e, "choices"), j, c) {
            int idx = (int)json_integer_value(json_object_get(c, "index"));
            if (idx < 0 || idx >= nch) continue;
            json_t *d = json_object_get(c, "delta");
            const char *t = d ? str_of(d, "content") : str_of(c, "text");
            char *cat =
                malloc(strlen(json_string_value(json_array_get(so.text, idx))) + strlen(t) + 1);
            strcpy(cat, json_string_value(json_array_get(so.text, idx)));
            strcat(cat, t);
            json_array_set_new(so.text, idx, json_string(cat));
            free(cat);
            if (d) {
                const char *rs = str_of(d, "reasoning_content");
                const char *prev = json_string_value(json_array_get(so.reasoning, idx));
                char *rc = malloc(strlen(prev) + strlen(rs) + 1);
                strcpy(rc, prev);
                strcat(rc, rs);
                json_array_set_new(so.reasoning, idx, json_string(rc));
                free(rc);
            }
            json_t *fr = json_object_get(c, "finish_reason");
            if (json_is_string(fr)) json_array_set(so.finish, idx, fr);
            json_array_extend(json_array_get(so.ids, idx), json_object_get(c, "token_ids"));
        }
    }
    json_decref(ev);
    srv_resp_free(&r);
    return so;
}

static json_t *choice(json_t *resp, size_t i) {
    return json_array_get(json_object_get(resp, "choices"), i);
}

/* An id whose bytes are the single byte b (a byte-level token), or -1. */
static int32_t byte_token(const ds_tokenizer *t, unsigned char b) {
    for (int32_t id = 0; id < (int32_t)ds_tok_vocab_size(t); id++) {
        ds_buf s = {0};
        int ok = ds_tok_decode_bytes(t, &id, 1, 0, &s) == DS_OK && s.len == 1 &&
                 (unsigned char)s.data[0] == b;
        ds_buf_free(&s);
        if (ok) return id;
    }
    return -1;
}

static void test_curl_as_a_user(int port) {
    /* exactly the deployment guide's command, then generate --batch-file for the same line */
    char cmd[16384];
    snprintf(cmd, sizeof cmd,
             "curl -s http://127.0.0.1:%d/v1/completions -d '{\"model\": \"%s\", \"prompt\": "
             "\"Mindspore is\", \"max_tokens\": 120, \"temperature\": 0}'",
             port, g_model);
    int st;
    char *out = ds_test_run(cmd, &st);
    CHECK_MSG(st == 0 && out, "curl failed (%d)", st);
    json_error_t je;
    json_t *o = out ? json_loads(out, JSON_ALLOW_NUL, &je) : NULL;
    CHECK_MSG(o != NULL, "curl's answer is not JSON: %.300s", out ? out : "");
    char *tmp = ds_test_tmpdir(), path[4200];
    snprintf(path, sizeof path, "%s/line.jsonl", tmp);
    FILE *f = fopen(path, "w");
    if (f) {
        fprintf(f, "{\"prompt\": \"Mindspore is\", \"max_tokens\": 120, \"temperature\": 0}\n");
        fclose(f);
    }
    snprintf(cmd, sizeof cmd, "'%s' generate --model '%s' --batch-file '%s' 2>/dev/null",
             DSINFER_BIN, g_model, path);
    char *bout = ds_test_run(cmd, &st);
    json_t *b = bout ? json_loads(bout, JSON_ALLOW_NUL, &je) : NULL;
    CHECK_MSG(b != NULL && st == 0, "generate --batch-file failed");
    if (o && b) {
        json_t *c = choice(o, 0);
        CHECK(!strcmp(str_of(o, "object"), "text_completion"));
        CHECK(!strcmp(str_of(o, "model"), g_model));
        CHECK(!strncmp(str_of(o, "id"), "cmpl-", 5));
        CHECK_MSG(!strcmp(str_of(c, "text"), str_of(b, "text")),
                  "server text '%s' != engine text '%s'", str_of(c, "text"), str_of(b, "text"));
        CHECK(!strcmp(str_of(c, "finish_reason"), str_of(b, "finish_reason")));
        json_t *u = json_object_get(o, "usage");
        CHECK(json_integer_value(json_object_get(u, "completion_tokens")) ==
              (json_int_t)json_array_size(json_object_get(b, "token_ids")));
        CHECK(json_integer_value(json_object_get(u, "prompt_tokens")) ==
              json_integer_value(json_object_get(b, "prompt_tokens")));
        CHECK(json_integer_value(json_object_get(u, "total_tokens")) ==
              json_integer_value(json_object_get(u, "prompt_tokens")) +
                  json_integer_value(json_object_get(u, "completion_tokens")));
    }
    json_decref(o);
    json_decref(b);
    free(out);
    free(bout);
    ds_test_rmtree(tmp);
    free(tmp);
}

static void test_golden(int port, json_t *golden) {
    size_t i;
    json_t *p;
    int checked = 0;
    json_array_foreach(json_object_get(golden, "prompts"), i, p) {
        if (!json_is_true(json_object_get(p, "add_bos"))) continue;
        json_t *want = json_object_get(json_object_get(p, "greedy"), "tokens");
        const char *name = str_of(p, "name");
        for (int as_ids = 0; as_ids < 2; as_ids++) {
            json_t *req = json_pack("{s:O,s:i,s:f,s:b,s:b}", "prompt",
                                    as_ids ? json_object_get(p, "ids") : json_object_get(p, "text"),
                                    "max_tokens", 24, "temperature", 0.0, "ignore_eos", 1,
                                    "return_token_ids", 1);
            json_t *req2 = json_deep_copy(req);
            int st;
            json_t *o = post_pack(port, "/v1/completions", req, &st);
            CHECK_MSG(st == 200, "%s: status %d", name, st);
            json_t *c = choice(o, 0);
            CHECK_MSG(json_equal(json_object_get(c, "token_ids"), want),
                      "%s (%s): the server's greedy tokens differ from the golden ones", name,
                      as_ids ? "ids" : "text");
            CHECK(json_equal(json_object_get(c, "prompt_token_ids"), json_object_get(p, "ids")));
            CHECK(!strcmp(str_of(c, "finish_reason"), "length"));
            CHECK(
                json_integer_value(json_object_get(json_object_get(o, "usage"), "prompt_tokens")) ==
                (json_int_t)json_array_size(json_object_get(p, "ids")));
            /* the same request streamed: deltas concatenate to the text */
            stream_out so = stream_req(port, "/v1/completions", req2, 1);
            CHECK(so.status == 200 && so.done);
            CHECK_MSG(!strcmp(json_string_value(json_array_get(so.text, 0)), str_of(c, "text")),
                      "%s: streamed '%s' vs whole '%s'", name,
                      json_string_value(json_array_get(so.text, 0)), str_of(c, "text"));
            CHECK(json_equal(json_array_get(so.ids, 0), want));
            CHECK(!strcmp(json_string_value(json_array_get(so.finish, 0)), "length"));
            CHECK(so.usage == NULL); /* include_usage not asked */
            stream_free(&so);
            json_decref(o);
            checked++;
        }
    }
    CHECK(checked >= 6);
}

static void test_chat(int port) {
    const char *msgs = "[{\"role\":\"system\",\"content\":\"Be brief.\"},"
                       "{\"role\":\"user\",\"content\":\"Hello, who are you?\"},"
                       "{\"role\":\"assistant\",\"content\":\"A model.\"},"
                       "{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":\"More?\"}]}]";
    json_error_t je;
    json_t *m = json_loads(msgs, JSON_ALLOW_NUL, &je);
    int st;
    json_t *o = post_pack(port, "/v1/chat/completions",
                          json_pack("{s:O,s:i,s:f,s:b,s:b}", "messages", m, "max_tokens", 12,
                                    "temperature", 0.0, "ignore_eos", 1, "return_token_ids", 1),
                          &st);
    CHECK(st == 200);
    CHECK(!strcmp(str_of(o, "object"), "chat.completion"));
    CHECK(!strncmp(str_of(o, "id"), "chatcmpl-", 9));
    json_t *c = choice(o, 0), *msg = json_object_get(c, "message");
    CHECK(!strcmp(str_of(msg, "role"), "assistant"));
    CHECK(json_is_string(json_object_get(msg, "content")));
    CHECK(json_is_null(json_object_get(msg, "reasoning_content")));
    CHECK(json_array_size(json_object_get(c, "token_ids")) == 12);
    /* the prompt is the rendered template, tokenized without an extra BOS */
    json_t *tk = post_pack(port, "/tokenize", json_pack("{s:O}", "messages", m), &st);
    CHECK(st == 200);
    CHECK(json_equal(json_object_get(tk, "tokens"), json_object_get(o, "prompt_token_ids")));
    CHECK(json_integer_value(json_array_get(json_object_get(tk, "tokens"), 0)) == 0);
    /* the same ids through /v1/completions give the same tokens */
    json_t *o2 = post_pack(port, "/v1/completions",
                           json_pack("{s:O,s:i,s:f,s:b,s:b}", "prompt",
                                     json_object_get(tk, "tokens"), "max_tokens", 12, "temperature",
                                     0.0, "ignore_eos", 1, "return_token_ids", 1),
                           &st);
    CHECK(json_equal(json_object_get(choice(o2, 0), "token_ids"), json_object_get(c, "token_ids")));
    CHECK(!strcmp(str_of(choice(o2, 0), "text"), str_of(msg, "content")));
    /* streamed: the role chunk, then the content, concatenating to the same text */
    stream_out so = stream_req(port, "/v1/chat/completions",
                               json_pack("{s:O,s:i,s:f,s:b,s:{s:b}}", "messages", m, "max_tokens",
                                         12, "temperature", 0.0, "ignore_eos", 1, "stream_options",
                                         "include_usage", 1),
                               1);
    CHECK(so.status == 200 && so.done);
    CHECK(!strcmp(json_string_value(json_array_get(so.text, 0)), str_of(msg, "content")));
    CHECK(so.usage && json_integer_value(json_object_get(so.usage, "completion_tokens")) == 12);
    stream_free(&so);
    /* tool messages render too */
    json_t *tool = json_loads(
        "[{\"role\":\"user\",\"content\":\"weather?\"},{\"role\":\"assistant\",\"content\":null,"
        "\"tool_calls\":[{\"type\":\"function\",\"function\":{\"name\":\"get\",\"arguments\":"
        "\"{}\"}}]},{\"role\":\"tool\",\"content\":\"sunny\"}]",
        0, &je);
    json_t *o3 = post_pack(port, "/v1/chat/completions",
                           json_pack("{s:o,s:i}", "messages", tool, "max_tokens", 2), &st);
    CHECK_MSG(st == 200, "tool roles: %d", st);
    json_decref(o3);
    json_decref(m);
    json_decref(o);
    json_decref(o2);
    json_decref(tk);
}

static void test_seeds_and_n(int port) {
    int st;
    json_t *a = post_pack(port, "/v1/completions",
                          json_pack("{s:s,s:i,s:i,s:I,s:f,s:b}", "prompt", "Once upon a time", "n",
                                    3, "max_tokens", 10, "seed", (json_int_t)-1, "temperature", 1.0,
                                    "ignore_eos", 1),
                          &st);
    CHECK(st == 200);
    CHECK(json_array_size(json_object_get(a, "choices")) == 3);
    json_t *b = post_pack(port, "/v1/completions",
                          json_pack("{s:s,s:i,s:i,s:I,s:f,s:b}", "prompt", "Once upon a time", "n",
                                    3, "max_tokens", 10, "seed", (json_int_t)-1, "temperature", 1.0,
                                    "ignore_eos", 1),
                          &st);
    CHECK_MSG(json_equal(json_object_get(a, "choices"), json_object_get(b, "choices")),
              "the same seed gave different choices");
    /* choice i of seed s == choice 0 of seed s + i (vLLM's parallel sampling); -1 + 1 = 0 */
    json_t *c =
        post_pack(port, "/v1/completions",
                  json_pack("{s:s,s:i,s:I,s:f,s:b}", "prompt", "Once upon a time", "max_tokens", 10,
                            "seed", (json_int_t)0, "temperature", 1.0, "ignore_eos", 1),
                  &st);
    CHECK_MSG(!strcmp(str_of(choice(c, 0), "text"), str_of(choice(a, 1), "text")),
              "seed 0 '%s' vs seed -1 choice 1 '%s'", str_of(choice(c, 0), "text"),
              str_of(choice(a, 1), "text"));
    CHECK(json_integer_value(json_object_get(json_object_get(a, "usage"), "completion_tokens")) ==
          30);
    int differ = strcmp(str_of(choice(a, 0), "text"), str_of(choice(a, 1), "text")) != 0 ||
                 strcmp(str_of(choice(a, 1), "text"), str_of(choice(a, 2), "text")) != 0;
    CHECK_MSG(differ, "three sampled choices are identical");
    /* a list of prompts x n: indexes prompt * n + i */
    json_t *d = post_pack(port, "/v1/completions",
                          json_pack("{s:[s,s],s:i,s:i,s:i,s:b}", "prompt", "a", "b", "n", 2,
                                    "max_tokens", 3, "seed", 7, "ignore_eos", 1),
                          &st);
    CHECK(st == 200 && json_array_size(json_object_get(d, "choices")) == 4);
    for (size_t i = 0; i < 4; i++)
        CHECK(json_integer_value(json_object_get(choice(d, i), "index")) == (json_int_t)i);
    /* streamed n > 1 equals the whole answer per choice */
    stream_out so = stream_req(port, "/v1/completions",
                               json_pack("{s:s,s:i,s:i,s:I,s:f,s:b}", "prompt", "Once upon a time",
                                         "n", 3, "max_tokens", 10, "seed", (json_int_t)-1,
                                         "temperature", 1.0, "ignore_eos", 1),
                               3);
    for (size_t i = 0; i < 3; i++)
        CHECK_MSG(
            !strcmp(json_string_value(json_array_get(so.text, i)), str_of(choice(a, i), "text")),
            "stream choice %zu differs", i);
    stream_free(&so);
    json_decref(a);
    json_decref(b);
    json_decref(c);
    json_decref(d);
}

static void test_stop_and_logprobs(int port, const ds_tokenizer *tok) {
    int st;
    json_t *g = post_pack(port, "/v1/completions",
                          json_pack("{s:s,s:i,s:f,s:b,s:b,s:i}", "prompt", "Mindspore is",
                                    "max_tokens", 30, "temperature", 0.0, "ignore_eos", 1,
                                    "return_token_ids", 1, "logprobs", 3),
                          &st);
    CHECK(st == 200);
    const char *text = str_of(choice(g, 0), "text");
    json_t *lp = json_object_get(choice(g, 0), "logprobs");
    CHECK(json_array_size(json_object_get(lp, "tokens")) == 30);
    CHECK(json_array_size(json_object_get(lp, "token_logprobs")) == 30);
    CHECK(json_array_size(json_object_get(lp, "text_offset")) == 30);
    json_t *top0 = json_array_get(json_object_get(lp, "top_logprobs"), 0);
    CHECK(json_object_size(top0) >= 3 && json_object_size(top0) <= 4);
    CHECK(json_real_value(json_array_get(json_object_get(lp, "token_logprobs"), 0)) <= 0);
    /* greedy: the sampled token is the top one */
    const char *k0;
    json_t *v0;
    double best = -1e30;
    json_object_foreach(top0, k0, v0) if (json_real_value(v0) > best) best = json_real_value(v0);
    CHECK_NEAR(best, json_real_value(json_array_get(json_object_get(lp, "token_logprobs"), 0)),
               1e-6);
    /* a stop string from the middle of the greedy text */
    size_t tl = strlen(text);
    if (tl > 12) {
        char stop[8];
        size_t at = tl / 2;
        while (at < tl && ((unsigned char)text[at] & 0xC0) == 0x80) at++;
        size_t k = 0;
        while (k < 3 && at + k < tl) k++;
        while (at + k < tl && ((unsigned char)text[at + k] & 0xC0) == 0x80 && k < 7) k++;
        memcpy(stop, text + at, k);
        stop[k] = 0;
        const char *first = strstr(text, stop);
        json_t *s =
            post_pack(port, "/v1/completions",
                      json_pack("{s:s,s:i,s:f,s:b,s:s}", "prompt", "Mindspore is", "max_tokens", 30,
                                "temperature", 0.0, "ignore_eos", 1, "stop", stop),
                      &st);
        CHECK(st == 200);
        CHECK(!strcmp(str_of(choice(s, 0), "finish_reason"), "stop"));
        CHECK(!strcmp(str_of(choice(s, 0), "stop_reason"), stop));
        CHECK_MSG(strlen(str_of(choice(s, 0), "text")) == (size_t)(first - text) &&
                      !strncmp(str_of(choice(s, 0), "text"), text, (size_t)(first - text)),
                  "stop '%s': '%s' is not the greedy text up to it", stop,
                  str_of(choice(s, 0), "text"));
        stream_out so =
            stream_req(port, "/v1/completions",
                       json_pack("{s:s,s:i,s:f,s:b,s:[s]}", "prompt", "Mindspore is", "max_tokens",
                                 30, "temperature", 0.0, "ignore_eos", 1, "stop", stop),
                       1);
        CHECK(!strcmp(json_string_value(json_array_get(so.text, 0)), str_of(choice(s, 0), "text")));
        CHECK(!strcmp(json_string_value(json_array_get(so.finish, 0)), "stop"));
        stream_free(&so);
        json_decref(s);
    }
    /* a stop token: the fifth greedy token */
    json_t *ids = json_object_get(choice(g, 0), "token_ids");
    json_int_t t5 = json_integer_value(json_array_get(ids, 4));
    size_t first5 = 0;
    while (json_integer_value(json_array_get(ids, first5)) != t5) first5++;
    json_t *s2 = post_pack(port, "/v1/completions",
                           json_pack("{s:s,s:i,s:f,s:b,s:[I],s:b}", "prompt", "Mindspore is",
                                     "max_tokens", 30, "temperature", 0.0, "ignore_eos", 1,
                                     "stop_token_ids", t5, "return_token_ids", 1),
                           &st);
    CHECK(!strcmp(str_of(choice(s2, 0), "finish_reason"), "stop"));
    CHECK(json_integer_value(json_object_get(choice(s2, 0), "stop_reason")) == t5);
    CHECK(json_array_size(json_object_get(choice(s2, 0), "token_ids")) == first5 + 1);
    json_decref(s2);
    /* echo: the prompt first */
    json_t *e = post_pack(port, "/v1/completions",
                          json_pack("{s:s,s:i,s:f,s:b}", "prompt", "Mindspore is", "max_tokens", 30,
                                    "temperature", 0.0, "echo", 1),
                          &st);
    char want[4096];
    snprintf(want, sizeof want, "Mindspore is%s", text);
    CHECK(!strncmp(str_of(choice(e, 0), "text"), want, strlen(str_of(choice(e, 0), "text"))));
    CHECK(!strncmp(str_of(choice(e, 0), "text"), "Mindspore is", 12));
    json_decref(e);
    json_t *e0 = post_pack(
        port, "/v1/completions",
        json_pack("{s:s,s:i,s:b}", "prompt", "Mindspore is", "max_tokens", 0, "echo", 1), &st);
    CHECK(st == 200 && !strcmp(str_of(choice(e0, 0), "text"), "Mindspore is"));
    json_decref(e0);
    /* chat logprobs: tokens with their bytes and top_logprobs */
    json_t *c =
        post_pack(port, "/v1/chat/completions",
                  json_pack("{s:[{s:s,s:s}],s:i,s:b,s:i}", "messages", "role", "user", "content",
                            "hi", "max_tokens", 4, "logprobs", 1, "top_logprobs", 2),
                  &st);
    json_t *content = json_object_get(json_object_get(choice(c, 0), "logprobs"), "content");
    CHECK(json_array_size(content) == 4);
    json_t *t0 = json_array_get(content, 0);
    CHECK(json_is_string(json_object_get(t0, "token")) &&
          json_is_array(json_object_get(t0, "bytes")));
    CHECK(json_array_size(json_object_get(t0, "top_logprobs")) == 2);
    json_decref(c);
    /* a byte token that is not UTF-8 on its own, forced by logit_bias: U+FFFD, never an error */
    int32_t b = tok ? byte_token(tok, 0xE4) : -1;
    CHECK(b >= 0);
    if (b >= 0) {
        char key[16];
        snprintf(key, sizeof key, "%d", b);
        for (int stream = 0; stream < 2; stream++) {
            json_t *req = json_pack("{s:s,s:i,s:f,s:{s:i},s:b,s:b}", "prompt", "x", "max_tokens", 5,
                                    "temperature", 0.0, "logit_bias", key, 100, "ignore_eos", 1,
                                    "logprobs", 1);
            const char *want5 = "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD";
            if (stream) {
                stream_out so = stream_req(port, "/v1/completions", req, 1);
                CHECK(so.status == 200 && so.done);
                CHECK_MSG(!strcmp(json_string_value(json_array_get(so.text, 0)), want5),
                          "streamed byte tokens: '%s'",
                          json_string_value(json_array_get(so.text, 0)));
                stream_free(&so);
            } else {
                json_t *o = post_pack(port, "/v1/completions", req, &st);
                CHECK(st == 200);
                CHECK_MSG(!strcmp(str_of(choice(o, 0), "text"), want5), "byte tokens: '%s'",
                          str_of(choice(o, 0), "text"));
                json_decref(o);
            }
        }
        json_t *o = post_pack(port, "/v1/chat/completions",
                              json_pack("{s:[{s:s,s:s}],s:i,s:{s:i},s:b}", "messages", "role",
                                        "user", "content", "hi", "max_tokens", 2, "logit_bias", key,
                                        100, "logprobs", 1),
                              &st);
        json_t *t = json_array_get(
            json_object_get(json_object_get(choice(o, 0), "logprobs"), "content"), 0);
        CHECK(json_array_size(json_object_get(t, "bytes")) == 1 &&
              json_integer_value(json_array_get(json_object_get(t, "bytes"), 0)) == 0xE4);
        json_decref(o);
    }
    json_decref(g);
}

static void test_endpoints(int port) {
    int st;
    srv_resp r = srv_get(port, "/v1/models");
    json_t *o = parse(&r);
    CHECK(r.status == 200);
    CHECK(!strcmp(str_of(json_array_get(json_object_get(o, "data"), 0), "id"), g_model));
    CHECK(!strcmp(str_of(o, "object"), "list"));
    json_decref(o);
    srv_resp_free(&r);
    r = srv_get(port, "/version");
    o = parse(&r);
    CHECK(r.status == 200 && json_is_string(json_object_get(o, "version")));
    json_decref(o);
    srv_resp_free(&r);
    r = srv_get(port, "/health");
    CHECK(r.status == 200);
    srv_resp_free(&r);
    o = post_json(port, "/tokenize", "{\"prompt\": \"Hello world\"}", &st);
    CHECK(st == 200);
    CHECK(json_integer_value(json_object_get(o, "count")) == 3); /* BOS + 2 */
    CHECK(json_integer_value(json_array_get(json_object_get(o, "tokens"), 0)) == 0);
    CHECK(json_integer_value(json_object_get(o, "max_model_len")) == 256);
    json_t *d = post_pack(port, "/detokenize",
                          json_pack("{s:O}", "tokens", json_object_get(o, "tokens")), &st);
    CHECK(st == 200);
    CHECK_MSG(strstr(str_of(d, "prompt"), "Hello world") != NULL, "detokenize: '%s'",
              str_of(d, "prompt"));
    json_decref(o);
    json_decref(d);
    r = srv_get(port, "/metrics");
    CHECK(r.status == 200);
    static const char *names[] = {"vllm:num_requests_running",
                                  "vllm:num_requests_waiting",
                                  "vllm:kv_cache_usage_perc",
                                  "vllm:gpu_cache_usage_perc",
                                  "vllm:time_to_first_token_seconds_bucket",
                                  "vllm:time_per_output_token_seconds_count",
                                  "vllm:e2e_request_latency_seconds_sum",
                                  "vllm:prompt_tokens_total",
                                  "vllm:generation_tokens_total",
                                  "vllm:prefix_cache_queries_total",
                                  "vllm:prefix_cache_hits_total",
                                  "vllm:request_success_total",
                                  "dsinfer:kv_cache_blocks_free"};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        CHECK_MSG(r.body && srv_metric(r.body, names[i]) >= 0, "/metrics lacks %s", names[i]);
    CHECK(srv_metric(r.body, "vllm:generation_tokens_total") > 0);
    CHECK(strstr(r.body, "# TYPE vllm:time_to_first_token_seconds histogram") != NULL);
    char model_label[4300];
    snprintf(model_label, sizeof model_label, "model_name=\"%s\"", g_model);
    CHECK(strstr(r.body, model_label) != NULL);
    srv_resp_free(&r);
}

/* R1: a server told to parse reasoning (--reasoning-parser deepseek_r1). The V3 tokenizer of the
 * fixture spells "</think>" as "</" "think" ">", so the output is steered with logit_bias onto
 * those three tokens and "Hello", sampled with a seed; the first seeds whose raw text (the same
 * prompt ids and seed through /v1/completions) has "</think>" inside, and one without, are
 * checked: reasoning_content is the text before it, content the text after (null when none),
 * whole and streamed. */
static void test_reasoning(const ds_tokenizer *tok) {
    const char *words[] = {"</", "think", ">", "Hello"};
    char bias[256] = "{";
    for (int i = 0; i < 4; i++) {
        int32_t id = tok ? ds_tok_token_id(tok, words[i]) : -1;
        CHECK_MSG(id >= 0, "no token '%s'", words[i]);
        if (id < 0) return;
        size_t l = strlen(bias);
        snprintf(bias + l, sizeof bias - l, "%s\"%d\": 100", i ? ", " : "", id);
    }
    strcat(bias, "}");
    srv_proc s;
    const char *args[] = {"--reasoning-parser",
                          "deepseek_r1",
                          "--disable-log-requests",
                          "--served-model-name",
                          "deepseek-r1",
                          "r1",
                          NULL};
    CHECK(srv_start(&s, g_model, args) == 0);
    int st;
    /* several served names (vLLM's nargs="+"): all listed, the first reported */
    srv_resp mr = srv_get(s.port, "/v1/models");
    json_t *ml = parse(&mr);
    json_t *d = json_object_get(ml, "data");
    CHECK(json_array_size(d) == 2 && !strcmp(str_of(json_array_get(d, 0), "id"), "deepseek-r1") &&
          !strcmp(str_of(json_array_get(d, 1), "id"), "r1"));
    json_decref(ml);
    srv_resp_free(&mr);
    json_t *named = post_json(s.port, "/v1/completions",
                              "{\"model\": \"r1\", \"prompt\": \"x\", \"max_tokens\": 1}", &st);
    CHECK(st == 200 && !strcmp(str_of(named, "model"), "deepseek-r1"));
    json_decref(named);
    json_t *tk = post_json(s.port, "/tokenize",
                           "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}", &st);
    char *ids = json_dumps(json_object_get(tk, "tokens"), JSON_COMPACT);
    int split = 0, whole = 0, last_seed = 0;
    /* 64 samples per request: choice i of seed s is sampled with seed s + i */
    for (int base = 1; base <= 1 + 64 * 7 && (split < 2 || whole < 1); base += 64) {
        char body[4096];
        snprintf(body, sizeof body,
                 "{\"prompt\": %s, \"max_tokens\": 24, \"temperature\": 1, \"seed\": %d, "
                 "\"n\": 64, \"top_k\": 4, \"logit_bias\": %s, \"ignore_eos\": true}",
                 ids, base, bias);
        json_t *raw = post_json(s.port, "/v1/completions", body, &st);
        for (int i = 0; i < 64 && (split < 2 || whole < 1); i++) {
            const int seed = base + i;
            last_seed = seed;
            const char *text = str_of(choice(raw, (size_t)i), "text");
            const char *cut = strstr(text, "</think>");
            int is_split = cut && cut > text && cut[8];
            if ((is_split && split < 2) || (!cut && !whole)) {
                split += is_split;
                whole += !cut;
                snprintf(
                    body, sizeof body,
                    "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}], "
                    "\"max_tokens\": 24, \"temperature\": 1, \"seed\": %d, \"logit_bias\": %s, "
                    "\"top_k\": 4, \"ignore_eos\": true}",
                    seed, bias);
                json_error_t je;
                json_t *req = json_loads(body, JSON_ALLOW_NUL, &je);
                json_t *req2 = json_deep_copy(req);
                json_t *o = post_pack(s.port, "/v1/chat/completions", req, &st);
                CHECK(st == 200);
                json_t *msg = json_object_get(choice(o, 0), "message");
                json_t *rc = json_object_get(msg, "reasoning_content"),
                       *ct = json_object_get(msg, "content");
                if (cut) {
                    size_t nr = (size_t)(cut - text);
                    CHECK_MSG(json_is_string(rc) && strlen(json_string_value(rc)) == nr &&
                                  !strncmp(json_string_value(rc), text, nr),
                              "seed %d: reasoning_content of '%s'", seed, text);
                    CHECK_MSG(json_is_string(ct) && !strcmp(json_string_value(ct), cut + 8),
                              "seed %d: content of '%s'", seed, text);
                } else {
                    CHECK(json_is_string(rc) && !strcmp(json_string_value(rc), text));
                    CHECK(json_is_null(ct));
                }
                stream_out so = stream_req(s.port, "/v1/chat/completions", req2, 1);
                CHECK_MSG(!strcmp(json_string_value(json_array_get(so.reasoning, 0)),
                                  json_is_string(rc) ? json_string_value(rc) : ""),
                          "streamed reasoning '%s'",
                          json_string_value(json_array_get(so.reasoning, 0)));
                CHECK(!strcmp(json_string_value(json_array_get(so.text, 0)),
                              json_is_string(ct) ? json_string_value(ct) : ""));
                stream_free(&so);
                json_decref(o);
            }
        }
        json_decref(raw);
    }
    fprintf(stderr, "reasoning: %d seeds tried\n", last_seed);
    CHECK_MSG(split == 2 && whole == 1, "found %d split and %d unsplit outputs", split, whole);
    free(ids);
    json_decref(tk);
    CHECK(srv_stop(&s) == 0);
    unlink(s.log);
}

/* Keep-alive: two requests on one connection, answered in order. */
static void test_keep_alive(int port) {
    int fd = srv_connect(port);
    const char *body = "{\"prompt\": \"Mindspore is\", \"max_tokens\": 4, \"temperature\": 0}";
    char req[512];
    int n = snprintf(req, sizeof req,
                     "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %zu\r\n\r\n%s",
                     strlen(body), body);
    srv_send_all(fd, req, (size_t)n);
    /* the first answer, by its Content-Length */
    char buf[8192];
    size_t len = 0;
    long clen = -1;
    char *hend = NULL;
    while (len < sizeof buf - 1) {
        ssize_t k = recv(fd, buf + len, sizeof buf - 1 - len, 0);
        if (k <= 0) break;
        len += (size_t)k;
        buf[len] = 0;
        hend = strstr(buf, "\r\n\r\n");
        const char *cl = strcasestr(buf, "Content-Length:");
        if (hend && cl) clen = atol(cl + 15);
        if (hend && clen >= 0 && len >= (size_t)(hend + 4 - buf) + (size_t)clen) break;
    }
    CHECK_MSG(!strncmp(buf, "HTTP/1.1 200", 12) && clen > 0, "keep-alive: first answer '%.80s'",
              buf);
    CHECK(strcasestr(buf, "Connection: close") == NULL);
    /* the second on the same connection */
    n = snprintf(req, sizeof req,
                 "POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                 "Content-Length: %zu\r\n\r\n%s",
                 strlen(body), body);
    CHECK(srv_send_all(fd, req, (size_t)n) == 0);
    size_t n2;
    char *raw = srv_read_all(fd, &n2);
    close(fd);
    srv_resp r;
    srv_parse(raw, n2, &r);
    CHECK_MSG(r.status == 200, "keep-alive: second answer %d", r.status);
    srv_resp_free(&r);
}

/* A client that goes away mid-stream has its request aborted at once: nothing runs a moment
 * later, every KV block is free again. */
static void test_disconnect_frees(int port) {
    int fd = srv_connect(port);
    const char *body = "{\"prompt\": \"Mindspore is\", \"max_tokens\": 240, \"ignore_eos\": true, "
                       "\"stream\": true, \"n\": 4}";
    char head[512];
    int hl = snprintf(head, sizeof head,
                      "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %zu\r\n\r\n%s",
                      strlen(body), body);
    srv_send_all(fd, head, (size_t)hl);
    char b[2048];
    size_t got = 0;
    while (got < 1500) { /* a few chunks in */
        ssize_t k = recv(fd, b, sizeof b, 0);
        if (k <= 0) break;
        got += (size_t)k;
    }
    srv_resp m0 = srv_get(port, "/metrics");
    CHECK_MSG(m0.body && srv_metric(m0.body, "vllm:num_requests_running") == 4,
              "4 sequences should be running, not %g",
              m0.body ? srv_metric(m0.body, "vllm:num_requests_running") : -1);
    srv_resp_free(&m0);
    close(fd);
    const double t0 = srv_now();
    double running = -1, freeb = -1, total = -2;
    while (srv_now() - t0 < 5) {
        srv_resp m = srv_get(port, "/metrics");
        running = m.body ? srv_metric(m.body, "vllm:num_requests_running") : -1;
        freeb = m.body ? srv_metric(m.body, "dsinfer:kv_cache_blocks_free") : -1;
        total = m.body ? srv_metric(m.body, "dsinfer:kv_cache_blocks_total") : -2;
        srv_resp_free(&m);
        if (running == 0 && freeb == total) break;
        srv_sleep_ms(10);
    }
    const double dt = srv_now() - t0;
    CHECK_MSG(running == 0 && freeb == total, "after the disconnect: %g running, %g/%g free",
              running, freeb, total);
    CHECK_MSG(dt < 1.0, "the aborted request held its KV blocks for %.2fs", dt);
}

/* The sampling fields reach the engine as generate --batch-file maps them: seeded sampling with
 * each field, the same tokens one line at a time. */
static void test_sampling_fields(int port) {
    const char *lines[] = {
        "{\"prompt\": \"Once upon a time\", \"max_tokens\": 12, \"temperature\": 0.8, "
        "\"seed\": 11, \"ignore_eos\": true}",
        "{\"prompt\": \"Once upon a time\", \"max_tokens\": 12, \"temperature\": 1.0, "
        "\"top_k\": 20, \"top_p\": 0.9, \"seed\": 12, \"ignore_eos\": true}",
        "{\"prompt\": \"Once upon a time\", \"max_tokens\": 12, \"temperature\": 1.0, "
        "\"min_p\": 0.05, \"seed\": -3, \"ignore_eos\": true}",
        "{\"prompt\": \"Once upon a time\", \"max_tokens\": 12, \"temperature\": 0, "
        "\"repetition_penalty\": 1.3, \"presence_penalty\": 0.5, \"frequency_penalty\": 0.5, "
        "\"ignore_eos\": true}",
        "{\"prompt\": \"Once upon a time\", \"max_tokens\": 12, \"temperature\": 0, "
        "\"logit_bias\": {\"19923\": 5.5, \"100\": -100}, \"min_tokens\": 3, \"ignore_eos\": true}",
    };
    char *tmp = ds_test_tmpdir(), path[4200], cmd[16384];
    for (size_t i = 0; i < sizeof lines / sizeof *lines; i++) {
        snprintf(path, sizeof path, "%s/l%zu.jsonl", tmp, i);
        FILE *f = fopen(path, "w");
        if (f) {
            fprintf(f, "%s\n", lines[i]);
            fclose(f);
        }
        snprintf(cmd, sizeof cmd, "'%s' generate --model '%s' --batch-file '%s' 2>/dev/null",
                 DSINFER_BIN, g_model, path);
        int st;
        char *out = ds_test_run(cmd, &st);
        json_error_t je;
        json_t *want = out ? json_loads(out, JSON_ALLOW_NUL, &je) : NULL;
        json_t *req = json_loads(lines[i], 0, &je);
        json_object_set_new(req, "return_token_ids", json_true());
        json_t *got = post_pack(port, "/v1/completions", req, &st);
        CHECK_MSG(st == 200 && want &&
                      json_equal(json_object_get(choice(got, 0), "token_ids"),
                                 json_object_get(want, "token_ids")),
                  "line %zu: the server's tokens differ from generate --batch-file's", i);
        json_decref(want);
        json_decref(got);
        free(out);
    }
    ds_test_rmtree(tmp);
    free(tmp);
}

int main(void) {
    const char *fx = ds_test_fixtures();
    if (!fx) return ds_test_skip_or_fail("golden fixtures missing");
    if (access("/usr/bin/curl", X_OK) != 0 && system("command -v curl >/dev/null 2>&1") != 0)
        return ds_test_skip_or_fail("curl is not installed (scripts/setup.sh installs it)");
    snprintf(g_model, sizeof g_model, "%.4000s/tiny-a", fx);
    char path[4200];
    snprintf(path, sizeof path, "%s/golden.json", g_model);
    json_t *golden = NULL;
    CHECK_MSG(ds_json_load_file(path, &golden) == DS_OK, "%s", ds_err_msg());
    ds_tokenizer *tok = NULL;
    CHECK(ds_tok_open(g_model, &tok) == DS_OK);
    srv_proc s;
    const char *args[] = {"--max-num-seqs", "16", NULL};
    if (srv_start(&s, g_model, args) != 0) {
        CHECK_MSG(0, "the server did not start");
        return ds_test_finish("test_server");
    }
    double t0 = srv_now();
    test_curl_as_a_user(s.port);
    if (golden) test_golden(s.port, golden);
    test_chat(s.port);
    test_seeds_and_n(s.port);
    test_stop_and_logprobs(s.port, tok);
    test_endpoints(s.port);
    test_keep_alive(s.port);
    test_disconnect_frees(s.port);
    test_sampling_fields(s.port);
    fprintf(stderr, "main server checks: %.1fs\n", srv_now() - t0);
    /* usage and start-up errors: no model (2), more ranks (2), the port taken (1) */
    char cmd[8400];
    int st;
    snprintf(cmd, sizeof cmd, "'%s' serve 2>/dev/null", DSINFER_BIN);
    free(ds_test_run(cmd, &st));
    CHECK(st == 2);
    snprintf(cmd, sizeof cmd, "'%s' serve '%s' --tensor-parallel-size 2 2>&1", DSINFER_BIN,
             g_model);
    char *msg = ds_test_run(cmd, &st);
    CHECK(st == 2 && msg && strstr(msg, "tensor-parallel-size"));
    free(msg);
    snprintf(cmd, sizeof cmd, "'%s' serve '%s' --port %d 2>&1", DSINFER_BIN, g_model, s.port);
    msg = ds_test_run(cmd, &st);
    CHECK_MSG(st == 1 && msg && strstr(msg, "cannot listen"), "a taken port: %d", st);
    free(msg);
    int code = srv_stop(&s);
    CHECK_MSG(code == 0, "exit status %d after SIGTERM", code);
    char *log = srv_log(&s);
    CHECK(log && strstr(log, "\"POST /v1/completions HTTP/1.1\" 200 id=cmpl-"));
    CHECK(log && strstr(log, "ttft="));
    free(log);
    unlink(s.log);
    t0 = srv_now();
    test_reasoning(tok);
    fprintf(stderr, "reasoning checks: %.1fs\n", srv_now() - t0);
    ds_tok_close(tok);
    json_decref(golden);
    return ds_test_finish("test_server");
}
