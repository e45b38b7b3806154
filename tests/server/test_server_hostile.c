/* `dsinfer serve` against hostile and broken clients. One server (tiny-a, an API key, tight
 * limits: 4 running + 4 queued sequences, 2 s to send a request, 2 s keep-alive) gets:
 *   - every malformed case of the OpenAI API with its status and error JSON ({"error":
 *     {"message", "type", "param", "code"}}, param naming the field): broken and non-object
 *     JSON, wrong types, out-of-range values, unknown model (404), unknown path (404), wrong
 *     method (405 + Allow), a prompt beyond max_model_len, missing/wrong API key (401), a full
 *     queue (503 + Retry-After), a 10 MB body (413, announced and chunked), invalid UTF-8, JSON
 *     nested 100000 deep, huge n, negative max_tokens, every seed edge value, too many stop
 *     strings / logit_bias entries;
 *   - truncated bodies, slowloris headers (closed by the read deadline while other requests are
 *     served), oversized headers;
 *   - 500 requests from 4 threads that disconnect at random points (before the body, mid-body,
 *     right after the request, mid-stream, mid-response);
 * then it must still be up: /health 200, no running or waiting request, every KV block free,
 * aborts and disconnects counted in /metrics, and SIGTERM exits 0. */
#include "serverutil.h"
#include "tokenizer/tokenizer.h"

#include <jansson.h>
#include <pthread.h>

static const char *KEY_HDR = "Authorization: Bearer sekrit-key\r\n";

/* POST with the key; checks the status and, for errors, the error shape and param. */
static void expect(int port, const char *path, const char *body, int want, const char *param) {
    srv_resp r = srv_http(port, "POST", path, KEY_HDR, body, strlen(body));
    CHECK_MSG(r.status == want, "%s %.200s: status %d, want %d (%.300s)", path, body, r.status,
              want, r.body ? r.body : "");
    if (want >= 400 && r.body) {
        json_error_t je;
        json_t *o = json_loads(r.body, JSON_ALLOW_NUL, &je), *e = json_object_get(o, "error");
        CHECK_MSG(json_is_object(e) && json_is_string(json_object_get(e, "message")) &&
                      json_is_string(json_object_get(e, "type")) && json_object_get(e, "param") &&
                      json_object_get(e, "code"),
                  "not an OpenAI error: %.300s", r.body);
        if (param)
            CHECK_MSG(json_is_string(json_object_get(e, "param")) &&
                          !strcmp(json_string_value(json_object_get(e, "param")), param),
                      "%.200s: param %s, want %s", body,
                      json_string_value(json_object_get(e, "param")), param);
        json_decref(o);
    }
    srv_resp_free(&r);
}

static void test_malformed(int port) {
    const char *C = "/v1/completions", *H = "/v1/chat/completions";
    /* JSON itself */
    expect(port, C, "{\"prompt\": \"x\",", 400, NULL);
    expect(port, C, "", 400, NULL);
    expect(port, C, "[]", 400, NULL);
    expect(port, C, "\"x\"", 400, NULL);
    expect(port, C, "{\"prompt\": \"\xff\xfe\"}", 400, NULL); /* invalid UTF-8 */
    expect(port, C, "{\"prompt\": \"\\udc80\"}", 400, NULL);  /* lone surrogate */
    expect(port, C, "{\"prompt\": \"a\\u0000b\", \"max_tokens\": 1}", 200, NULL); /* NUL: text */
    expect(port, C, "{\"prompt\": \"a\", \"stop\": \"\\u0000\"}", 400, "stop");
    /* types */
    expect(port, C, "{\"prompt\": 5}", 400, "prompt");
    expect(port, C, "{\"prompt\": [\"a\", 5]}", 400, "prompt");
    expect(port, C, "{\"prompt\": [[1, 2], [\"a\"]]}", 400, "prompt");
    expect(port, C, "{\"prompt\": [1, 2.5]}", 400, "prompt");
    expect(port, C, "{}", 400, "prompt");
    expect(port, C, "{\"prompt\": \"x\", \"max_tokens\": \"10\"}", 400, "max_tokens");
    expect(port, C, "{\"prompt\": \"x\", \"temperature\": \"hot\"}", 400, "temperature");
    expect(port, C, "{\"prompt\": \"x\", \"stream\": \"yes\"}", 400, "stream");
    expect(port, C, "{\"prompt\": \"x\", \"stop\": 5}", 400, "stop");
    expect(port, C, "{\"prompt\": \"x\", \"stop\": [\"a\", 1]}", 400, "stop");
    expect(port, C, "{\"prompt\": \"x\", \"logit_bias\": []}", 400, "logit_bias");
    expect(port, C, "{\"prompt\": \"x\", \"n\": 1.5}", 400, "n");
    expect(port, C, "{\"prompt\": \"x\", \"model\": 7}", 400, "model");
    expect(port, C, "{\"prompt\": \"x\", \"stream_options\": {\"include_usage\": true}}", 400,
           "stream_options");
    expect(port, H, "{\"messages\": \"hi\"}", 400, "messages");
    expect(port, H, "{\"messages\": []}", 400, "messages");
    expect(port, H, "{\"messages\": [5]}", 400, "messages");
    expect(port, H, "{\"messages\": [{\"role\": \"wizard\", \"content\": \"x\"}]}", 400,
           "messages");
    expect(port, H, "{\"messages\": [{\"role\": \"user\", \"content\": 5}]}", 400, "messages");
    expect(port, H,
           "{\"messages\": [{\"role\": \"user\", \"content\": [{\"type\": \"image_url\"}]}]}", 400,
           "messages");
    expect(port, H, "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"logprobs\": 3}",
           400, "logprobs");
    expect(port, H,
           "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"top_logprobs\": 2}", 400,
           "top_logprobs");
    expect(port, C, "{\"prompt\": \"x\", \"seed\": \"7\"}", 400, "seed");
    expect(port, C, "{\"prompt\": \"x\", \"seed\": true}", 400, "seed");
    /* unknown model */
    expect(port, C, "{\"prompt\": \"x\", \"model\": \"gpt-4\"}", 404, "model");
    /* a path is a name like any other: compared with the served names, never opened */
    expect(port, C, "{\"prompt\": \"x\", \"model\": \"/etc/passwd\"}", 404, "model");
    expect(port, C, "{\"prompt\": \"x\", \"model\": \"../../../../etc/shadow\"}", 404, "model");
    expect(port, H, "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"model\": \"m\"}",
           404, "model");
    /* ranges */
    expect(port, C, "{\"prompt\": \"x\", \"temperature\": -1}", 400, "temperature");
    expect(port, C, "{\"prompt\": \"x\", \"top_p\": 0}", 400, "top_p");
    expect(port, C, "{\"prompt\": \"x\", \"top_p\": 1.5}", 400, "top_p");
    expect(port, C, "{\"prompt\": \"x\", \"top_k\": -2}", 400, "top_k");
    expect(port, C, "{\"prompt\": \"x\", \"min_p\": 2}", 400, "min_p");
    expect(port, C, "{\"prompt\": \"x\", \"presence_penalty\": 3}", 400, "presence_penalty");
    expect(port, C, "{\"prompt\": \"x\", \"frequency_penalty\": -2.5}", 400, "frequency_penalty");
    expect(port, C, "{\"prompt\": \"x\", \"repetition_penalty\": 0}", 400, "repetition_penalty");
    expect(port, C, "{\"prompt\": \"x\", \"n\": 0}", 400, "n");
    expect(port, C, "{\"prompt\": \"x\", \"n\": 1000000}", 400, "n");
    expect(port, C, "{\"prompt\": \"x\", \"n\": 99999999999999999999999}", 400, "n");
    expect(port, C, "{\"prompt\": \"x\", \"max_tokens\": -1}", 400, "max_tokens");
    expect(port, C, "{\"prompt\": \"x\", \"max_tokens\": 0}", 400, "max_tokens");
    expect(port, C, "{\"prompt\": \"x\", \"max_tokens\": -9223372036854775808}", 400, "max_tokens");
    expect(port, C, "{\"prompt\": \"x\", \"min_tokens\": 20, \"max_tokens\": 10}", 400,
           "min_tokens");
    expect(port, C, "{\"prompt\": \"x\", \"logprobs\": 21}", 400, "logprobs");
    expect(port, H,
           "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"logprobs\": true, "
           "\"top_logprobs\": 21}",
           400, "top_logprobs");
    expect(port, C, "{\"prompt\": \"x\", \"logit_bias\": {\"5\": 200}}", 400, "logit_bias");
    expect(port, C, "{\"prompt\": \"x\", \"logit_bias\": {\"abc\": 1}}", 400, "logit_bias");
    expect(port, C, "{\"prompt\": \"x\", \"logit_bias\": {\"999999\": 1}}", 400, "logit_bias");
    expect(port, C, "{\"prompt\": [999999]}", 400, "prompt");
    expect(port, C, "{\"prompt\": [-1]}", 400, "prompt");
    expect(port, C, "{\"prompt\": []}", 400, "prompt");
    expect(port, C, "{\"prompt\": [[]]}", 400, "prompt");
    expect(port, C, "{\"prompt\": \"x\", \"stop\": \"\"}", 400, "stop");
    expect(port, C, "{\"prompt\": \"x\", \"stop_token_ids\": [129280]}", 400, "stop_token_ids");
    expect(port, C, "{\"prompt\": \"x\", \"best_of\": 3}", 400, "best_of");
    expect(port, C, "{\"prompt\": \"x\", \"suffix\": \"y\"}", 400, "suffix");
    expect(port, H,
           "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"response_format\": "
           "{\"type\": \"json_object\"}}",
           400, "response_format");
    expect(port, H,
           "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"tools\": [{\"type\": "
           "\"function\", \"function\": {\"name\": \"f\"}}]}",
           400, "tools");
    /* lists beyond their limits */
    ds_buf b = {0};
    ds_buf_append(&b, "{\"prompt\": \"x\", \"stop\": [", strlen("{\"prompt\": \"x\", \"stop\": ["));
    for (int i = 0; i < 65; i++) ds_buf_append(&b, i ? ",\"s\"" : "\"s\"", i ? 4 : 3);
    ds_buf_append(&b, "]}", 2);
    expect(port, C, b.data, 400, "stop");
    ds_buf_free(&b);
    ds_buf_append(&b, "{\"prompt\": \"x\", \"logit_bias\": {",
                  strlen("{\"prompt\": \"x\", \"logit_bias\": {"));
    for (int i = 0; i < 1025; i++) {
        char e[32];
        int n = snprintf(e, sizeof e, "%s\"%d\": 1", i ? "," : "", i);
        ds_buf_append(&b, e, (size_t)n);
    }
    ds_buf_append(&b, "}}", 2);
    expect(port, C, b.data, 400, "logit_bias");
    ds_buf_free(&b);
    /* beyond max_model_len (256) */
    ds_buf_append(&b, "{\"prompt\": [0", strlen("{\"prompt\": [0"));
    for (int i = 0; i < 300; i++) ds_buf_append(&b, ",5", 2);
    ds_buf_append(&b, "]}", 2);
    expect(port, C, b.data, 400, "prompt");
    ds_buf_free(&b);
    expect(port, C, "{\"prompt\": \"x\", \"max_tokens\": 300}", 400, "max_tokens");
    /* seeds: every signed 64-bit value works; anything else is refused, naming the field */
    const char *ok_seeds[] = {"-9223372036854775808", "-1",   "0",  "1",
                              "9223372036854775807",  "null", "4.0"};
    for (size_t i = 0; i < sizeof ok_seeds / sizeof ok_seeds[0]; i++) {
        char body[256];
        snprintf(body, sizeof body, "{\"prompt\": \"x\", \"max_tokens\": 2, \"seed\": %s}",
                 ok_seeds[i]);
        expect(port, C, body, 200, NULL);
    }
    const char *bad_seeds[] = {"9223372036854775808",
                               "18446744073709551615",
                               "-9223372036854775809",
                               "1.5",
                               "1e20",
                               "-1e300",
                               "123456789012345678901234567890"};
    for (size_t i = 0; i < sizeof bad_seeds / sizeof bad_seeds[0]; i++) {
        char body[256];
        snprintf(body, sizeof body, "{\"prompt\": \"x\", \"max_tokens\": 2, \"seed\": %s}",
                 bad_seeds[i]);
        expect(port, C, body, 400, "seed");
    }
    /* nesting: 100000 deep is refused before parsing; 50 deep in an ignored field is fine */
    ds_buf_append(&b, "{\"prompt\": ", strlen("{\"prompt\": "));
    for (int i = 0; i < 100000; i++) ds_buf_append(&b, "[", 1);
    expect(port, C, b.data, 400, NULL);
    ds_buf_free(&b);
    ds_buf_append(&b, "{\"prompt\": \"x\", \"max_tokens\": 1, \"extra\": ",
                  strlen("{\"prompt\": \"x\", \"max_tokens\": 1, \"extra\": "));
    for (int i = 0; i < 50; i++) ds_buf_append(&b, "[", 1);
    for (int i = 0; i < 50; i++) ds_buf_append(&b, "]", 1);
    ds_buf_append(&b, "}", 1);
    expect(port, C, b.data, 200, NULL);
    ds_buf_free(&b);
}

static void test_http_level(int port) {
    /* auth: /v1/ needs the key; the scheme is case-insensitive; other paths do not */
    const char *body = "{\"prompt\": \"x\", \"max_tokens\": 1}";
    srv_resp r = srv_http(port, "POST", "/v1/completions", NULL, body, strlen(body));
    char h[128];
    CHECK(r.status == 401);
    CHECK(srv_header(&r, "WWW-Authenticate", h, sizeof h) != NULL);
    srv_resp_free(&r);
    r = srv_http(port, "POST", "/v1/completions", "Authorization: Bearer sekrit-kez\r\n", body,
                 strlen(body));
    CHECK(r.status == 401);
    srv_resp_free(&r);
    r = srv_http(port, "POST", "/v1/completions", "Authorization: Bearer sekrit-ke\r\n", body,
                 strlen(body));
    CHECK(r.status == 401);
    srv_resp_free(&r);
    r = srv_http(port, "POST", "/v1/completions", "Authorization: Bearer sekrit-keyy\r\n", body,
                 strlen(body));
    CHECK(r.status == 401);
    srv_resp_free(&r);
    r = srv_http(port, "POST", "/v1/completions", "Authorization: bearer sekrit-key\r\n", body,
                 strlen(body));
    CHECK(r.status == 200);
    srv_resp_free(&r);
    r = srv_http(port, "GET", "/v1/models", NULL, NULL, 0);
    CHECK(r.status == 401);
    srv_resp_free(&r);
    r = srv_get(port, "/health");
    CHECK(r.status == 200);
    srv_resp_free(&r);
    /* 405 with Allow, 404 */
    r = srv_http(port, "GET", "/v1/completions", KEY_HDR, NULL, 0);
    CHECK(r.status == 405 && srv_header(&r, "Allow", h, sizeof h) && !strcmp(h, "POST"));
    srv_resp_free(&r);
    r = srv_http(port, "POST", "/health", NULL, "{}", 2);
    CHECK(r.status == 405);
    srv_resp_free(&r);
    r = srv_http(port, "DELETE", "/v1/models", KEY_HDR, NULL, 0);
    CHECK(r.status == 405);
    srv_resp_free(&r);
    r = srv_http(port, "GET", "/v2/foo", KEY_HDR, NULL, 0);
    CHECK(r.status == 404 && r.body && strstr(r.body, "\"error\""));
    srv_resp_free(&r);
    r = srv_http(port, "POST", "/v1/completion", KEY_HDR, body, strlen(body));
    CHECK(r.status == 404);
    srv_resp_free(&r);
    r = srv_http(port, "GET", "/v1/models/nope", KEY_HDR, NULL, 0);
    CHECK(r.status == 404);
    srv_resp_free(&r);
    /* queue full: 4 running + 4 queued sequences at most, so n = 9 cannot be admitted */
    const char *big = "{\"prompt\": \"x\", \"n\": 9, \"max_tokens\": 1}";
    r = srv_http(port, "POST", "/v1/completions", KEY_HDR, big, strlen(big));
    CHECK(r.status == 503 && srv_header(&r, "Retry-After", h, sizeof h));
    CHECK(r.body && strstr(r.body, "overloaded"));
    srv_resp_free(&r);
    /* 10 MB: announced (413 before the body is read) ... */
    int fd = srv_connect(port);
    char head[512];
    int hl = snprintf(head, sizeof head,
                      "POST /v1/completions HTTP/1.1\r\nHost: x\r\n%sContent-Length: %d\r\n\r\n",
                      KEY_HDR, 10 * 1000 * 1000);
    srv_send_all(fd, head, (size_t)hl);
    size_t n;
    char *raw = srv_read_all(fd, &n);
    close(fd);
    srv_parse(raw, n, &r);
    CHECK_MSG(r.status == 413, "10 MB announced: %d", r.status);
    srv_resp_free(&r);
    /* ... sent whole (the server may answer early and close) ... */
    char *ten = malloc(10 * 1000 * 1000);
    memset(ten, ' ', 10 * 1000 * 1000);
    memcpy(ten, "{\"prompt\": \"x\"", 14);
    r = srv_http(port, "POST", "/v1/completions", KEY_HDR, ten, 10 * 1000 * 1000);
    CHECK_MSG(r.status == 413 || r.status == 0, "10 MB sent: %d", r.status);
    srv_resp_free(&r);
    /* ... and chunked, without a length */
    fd = srv_connect(port);
    hl = snprintf(head, sizeof head,
                  "POST /v1/completions HTTP/1.1\r\nHost: x\r\n%sTransfer-Encoding: chunked\r\n"
                  "Connection: close\r\n\r\n",
                  KEY_HDR);
    srv_send_all(fd, head, (size_t)hl);
    int sent_ok = 1;
    for (int i = 0; i < 10 && sent_ok; i++) {
        char ch[32];
        int cl = snprintf(ch, sizeof ch, "%x\r\n", 1000 * 1000);
        sent_ok = srv_send_all(fd, ch, (size_t)cl) == 0 &&
                  srv_send_all(fd, ten, 1000 * 1000) == 0 && srv_send_all(fd, "\r\n", 2) == 0;
    }
    if (sent_ok) srv_send_all(fd, "0\r\n\r\n", 5);
    raw = srv_read_all(fd, &n);
    close(fd);
    srv_parse(raw, n, &r);
    CHECK_MSG(r.status == 413 || (!sent_ok && r.status == 0), "10 MB chunked: %d", r.status);
    srv_resp_free(&r);
    free(ten);
    /* a header section beyond the per-connection memory limit */
    char *hdr = malloc(200 * 1024 + 64);
    strcpy(hdr, "X-Big: ");
    memset(hdr + 7, 'a', 200 * 1024);
    strcpy(hdr + 7 + 200 * 1024, "\r\n");
    r = srv_http(port, "GET", "/health", hdr, NULL, 0);
    CHECK_MSG(r.status == 431 || r.status == 413 || r.status == 0, "200 KB header: %d", r.status);
    srv_resp_free(&r);
    free(hdr);
    /* truncated body: 100 announced, 10 sent, then the client goes */
    fd = srv_connect(port);
    hl = snprintf(head, sizeof head,
                  "POST /v1/completions HTTP/1.1\r\nHost: x\r\n%sContent-Length: 100\r\n\r\n"
                  "{\"prompt\":",
                  KEY_HDR);
    srv_send_all(fd, head, (size_t)hl);
    close(fd);
    /* truncated body, client stays: closed by the read deadline (2 s) */
    fd = srv_connect(port);
    srv_send_all(fd, head, (size_t)hl);
    double t0 = srv_now();
    raw = srv_read_all(fd, &n);
    double waited = srv_now() - t0;
    close(fd);
    CHECK_MSG(waited < 10, "a truncated body held the connection %.1fs", waited);
    free(raw);
}

/* Slow headers: one byte every 250 ms. Other clients are served meanwhile; the read deadline
 * (2 s) closes the slow connection. */
static void test_slowloris(int port) {
    int fd = srv_connect(port);
    const char *req =
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaa"
        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n";
    double t0 = srv_now();
    int closed = 0, served = 0;
    for (size_t i = 0; req[i] && srv_now() - t0 < 10; i++) {
        if (send(fd, req + i, 1, MSG_NOSIGNAL) != 1) {
            closed = 1;
            break;
        }
        if (i % 4 == 0) { /* someone else is served meanwhile */
            srv_resp r = srv_http(port, "POST", "/v1/completions", KEY_HDR,
                                  "{\"prompt\": \"x\", \"max_tokens\": 2}", 32);
            served += r.status == 200;
            srv_resp_free(&r);
        }
        struct pollfd pf = {fd, POLLIN, 0};
        if (poll(&pf, 1, 250) > 0) {
            char c;
            if (recv(fd, &c, 1, 0) <= 0) {
                closed = 1;
                break;
            }
        }
    }
    const double dt = srv_now() - t0;
    close(fd);
    CHECK_MSG(closed && dt < 8, "slow headers: closed %d after %.1fs", closed, dt);
    CHECK(served >= 2);
}

/* 500 requests from 4 threads, most of which disconnect at a random point. */
typedef struct {
    int port, id, answered, aborted;
    int bad_status; /* a well-behaved request got neither 200 nor 503 (checked by main) */
} storm_arg;

static void *storm(void *p) {
    storm_arg *a = p;
    uint64_t x = 0x9E3779B97F4A7C15ull * (uint64_t)(a->id + 1);
    for (int i = 0; i < 125; i++) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        const int kind = (int)(x % 6), stream = (x >> 8) & 1;
        char body[256];
        int bl = snprintf(body, sizeof body,
                          "{\"prompt\": \"Once upon a time %d\", \"max_tokens\": %d, "
                          "\"ignore_eos\": true, \"stream\": %s}",
                          i, 4 + (int)((x >> 16) % 32), stream ? "true" : "false");
        char head[512];
        int hl = snprintf(head, sizeof head,
                          "POST /v1/%scompletions HTTP/1.1\r\nHost: x\r\n%sContent-Length: %d\r\n"
                          "Connection: close\r\n\r\n",
                          (x >> 24) & 1 ? "chat/" : "", KEY_HDR, bl);
        if ((x >> 24) & 1)
            bl = snprintf(body, sizeof body,
                          "{\"messages\": [{\"role\": \"user\", \"content\": \"tell %d\"}], "
                          "\"max_tokens\": %d, \"ignore_eos\": true, \"stream\": %s}",
                          i, 4 + (int)((x >> 16) % 32), stream ? "true" : "false"),
            hl = snprintf(head, sizeof head,
                          "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n%sContent-Length: "
                          "%d\r\nConnection: close\r\n\r\n",
                          KEY_HDR, bl);
        int fd = srv_connect(a->port);
        if (fd < 0) continue;
        switch (kind) {
        case 0:
            break; /* connect, leave */
        case 1:
            srv_send_all(fd, head, (size_t)(hl / 2));
            break; /* half the headers */
        case 2:    /* headers and half the body */
            srv_send_all(fd, head, (size_t)hl);
            srv_send_all(fd, body, (size_t)bl / 2);
            break;
        case 3: /* the whole request, then gone before any answer */
            srv_send_all(fd, head, (size_t)hl);
            srv_send_all(fd, body, (size_t)bl);
            break;
        case 4: { /* gone after a random part of the answer */
            srv_send_all(fd, head, (size_t)hl);
            srv_send_all(fd, body, (size_t)bl);
            char buf[512];
            size_t want = 1 + (size_t)((x >> 32) % 1500), got = 0;
            while (got < want) {
                ssize_t k = recv(fd, buf, sizeof buf, 0);
                if (k <= 0) break;
                got += (size_t)k;
            }
            a->aborted++;
            break;
        }
        default: { /* a well-behaved client */
            srv_send_all(fd, head, (size_t)hl);
            srv_send_all(fd, body, (size_t)bl);
            size_t n;
            char *raw = srv_read_all(fd, &n);
            srv_resp r;
            srv_parse(raw, n, &r);
            a->answered += r.status == 200 || r.status == 503;
            if (r.status != 200 && r.status != 503) a->bad_status = r.status ? r.status : -1;
            srv_resp_free(&r);
        }
        }
        if ((x >> 40) & 1) { /* reset instead of a clean close */
            struct linger lg = {1, 0};
            setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
        }
        close(fd);
    }
    return NULL;
}

int main(void) {
    const char *fx = ds_test_fixtures();
    if (!fx) return ds_test_skip_or_fail("golden fixtures missing");
    char model[4096];
    snprintf(model, sizeof model, "%.4000s/tiny-a", fx);
    srv_proc s;
    const char *args[] = {"--api-key",
                          "sekrit-key",
                          "--max-num-seqs",
                          "4",
                          "--max-queued-requests",
                          "4",
                          "--request-read-timeout",
                          "2",
                          "--timeout-keep-alive",
                          "2",
                          "--disable-log-requests",
                          NULL};
    if (srv_start(&s, model, args) != 0) {
        CHECK_MSG(0, "the server did not start");
        return ds_test_finish("test_server_hostile");
    }
    double t0 = srv_now();
    test_malformed(s.port);
    fprintf(stderr, "malformed: %.1fs\n", srv_now() - t0);
    t0 = srv_now();
    test_http_level(s.port);
    fprintf(stderr, "http level: %.1fs\n", srv_now() - t0);
    t0 = srv_now();
    test_slowloris(s.port);
    fprintf(stderr, "slowloris: %.1fs\n", srv_now() - t0);
    t0 = srv_now();
    pthread_t th[4];
    storm_arg sa[4];
    for (int i = 0; i < 4; i++) {
        sa[i] = (storm_arg){s.port, i, 0, 0, 0};
        pthread_create(&th[i], NULL, storm, &sa[i]);
    }
    int answered = 0, aborted = 0;
    for (int i = 0; i < 4; i++) {
        pthread_join(th[i], NULL);
        answered += sa[i].answered;
        aborted += sa[i].aborted;
        CHECK_MSG(sa[i].bad_status == 0, "storm thread %d: a request got status %d", i,
                  sa[i].bad_status);
    }
    fprintf(stderr, "storm: 500 requests (%d answered in full, %d cut mid-answer) in %.1fs\n",
            answered, aborted, srv_now() - t0);
    CHECK(answered > 20 && aborted > 20);
    /* still up, and everything released */
    srv_resp r = srv_get(s.port, "/health");
    CHECK(r.status == 200);
    srv_resp_free(&r);
    double running = -1, waiting = -1, total = -1, free_b = -2, inflight = -1;
    char *m = NULL;
    for (double t1 = srv_now(); srv_now() - t1 < 20; srv_sleep_ms(100)) {
        r = srv_get(s.port, "/metrics");
        free(m);
        m = r.body;
        r.body = NULL;
        srv_resp_free(&r);
        if (!m) continue;
        running = srv_metric(m, "vllm:num_requests_running");
        waiting = srv_metric(m, "vllm:num_requests_waiting");
        total = srv_metric(m, "dsinfer:kv_cache_blocks_total");
        free_b = srv_metric(m, "dsinfer:kv_cache_blocks_free");
        inflight = srv_metric(m, "dsinfer:http_generation_requests_in_flight");
        if (running == 0 && waiting == 0 && total == free_b && inflight == 0) break;
    }
    CHECK_MSG(running == 0 && waiting == 0, "after the storm: %g running, %g waiting", running,
              waiting);
    CHECK_MSG(total > 0 && free_b == total, "after the storm: %g of %g KV blocks free", free_b,
              total);
    CHECK_MSG(inflight == 0, "after the storm: %g requests in flight", inflight);
    CHECK(m && srv_metric(m, "dsinfer:client_disconnects_total") > 0);
    CHECK(m && strstr(m, "finished_reason=\"abort\"} ") &&
          strstr(m, "finished_reason=\"abort\"} 0\n") == NULL);
    CHECK(m && srv_metric(m, "dsinfer:requests_rejected_total") >= 1);
    free(m);
    /* and still serving */
    const char *body = "{\"prompt\": \"x\", \"max_tokens\": 3}";
    r = srv_http(s.port, "POST", "/v1/completions", KEY_HDR, body, strlen(body));
    CHECK(r.status == 200);
    srv_resp_free(&r);
    int code = srv_stop(&s);
    CHECK_MSG(code == 0, "exit status %d after SIGTERM", code);
    unlink(s.log);
    return ds_test_finish("test_server_hostile");
}
