/* bench's pure parts:
 *   - the SSE parser: fields, comments, LF / CRLF / CR line ends (also split between feeds),
 *     multi-line data, the bounds, the end-of-stream flush, a callback that stops the feed, and
 *     2000 random streams that give the same events however they are split;
 *   - the figures: percentiles, median, std as numpy computes them, the summary of a set of
 *     hand-made results (TPOT, pooled ITL, throughputs, failure reasons grouped and sorted), and
 *     the printed summary and the JSON saying the same numbers;
 *   - prompts: random prompts whose token count, checked independently with the tokenizer (and
 *     the chat template), is exactly what was asked for, over many lengths and seeds; JSONL
 *     datasets and their errors. */
#include "testutil.h"
#include "bench/bench.h"
#include "cli/cli.h"

#include <stdlib.h>
#include <unistd.h>

/* ---- SSE ---------------------------------------------------------------------------------- */
typedef struct {
    char ev[16][64];
    int n;
    int stop_at; /* return non-zero on this event (-1: never) */
} events;

static int collect(void *ctx, const char *data, size_t len) {
    events *e = ctx;
    if (e->n < 16) {
        snprintf(e->ev[e->n], sizeof e->ev[0], "%.*s", (int)len, data);
        CHECK(strlen(data) == len); /* NUL-terminated */
    }
    e->n++;
    return e->n - 1 == e->stop_at ? 42 : 0;
}

static void sse_feed_split(const char *s, size_t step, events *e) {
    ds_sse p;
    ds_sse_init(&p, 0);
    memset(e, 0, sizeof *e);
    e->stop_at = -1;
    size_t n = strlen(s);
    for (size_t i = 0; i < n; i += step)
        CHECK(ds_sse_feed(&p, s + i, i + step <= n ? step : n - i, collect, e) == 0);
    CHECK(ds_sse_finish(&p, collect, e) == 0);
    ds_sse_free(&p);
}

static void test_sse(void) {
    const char *s = "data: a\n\n"
                    "data: b\r\n\r\n"
                    ": a comment, then an event with no data\n\n"
                    "event: message\nid: 7\nretry: 10\ndata:c\ndata:  d\r\r"
                    "data\n\n"
                    "data: {\"x\": 1}\n\n"
                    "data: [DONE]\n\n";
    const char *want[] = {"a", "b", "c\n d", "", "{\"x\": 1}", "[DONE]"};
    size_t steps[] = {1, 2, 3, 7, 1000};
    for (size_t k = 0; k < sizeof steps / sizeof steps[0]; k++) {
        events e;
        sse_feed_split(s, steps[k], &e);
        CHECK_MSG(e.n == 6, "step %zu: %d events", steps[k], e.n);
        for (int i = 0; i < 6 && i < e.n; i++)
            CHECK_MSG(!strcmp(e.ev[i], want[i]), "step %zu event %d: '%s'", steps[k], i, e.ev[i]);
    }
    /* CR then LF in the next feed is one line end, not two (no empty event in between) */
    events e;
    sse_feed_split("data: x\r\ndata: y\r\n\r\n", 8, &e); /* splits after "data: x\r" */
    CHECK(e.n == 1 && !strcmp(e.ev[0], "x\ny"));
    /* the end of the stream flushes an unterminated line and event */
    sse_feed_split("data: one\n\ndata: tail", 4, &e);
    CHECK(e.n == 2 && !strcmp(e.ev[1], "tail"));
    sse_feed_split("data: [DONE]\n", 100, &e);
    CHECK(e.n == 1 && !strcmp(e.ev[0], "[DONE]"));
    /* a callback's non-zero stops the feed and is returned */
    ds_sse p;
    ds_sse_init(&p, 0);
    memset(&e, 0, sizeof e);
    e.stop_at = 1;
    CHECK(ds_sse_feed(&p, "data: 1\n\ndata: 2\n\ndata: 3\n\n", 27, collect, &e) == 42);
    CHECK(e.n == 2);
    ds_sse_free(&p);
    /* bounds: a line or an event longer than max_bytes is refused */
    ds_sse_init(&p, 16);
    memset(&e, 0, sizeof e);
    e.stop_at = -1;
    CHECK(ds_sse_feed(&p, "data: 0123456789abcdef\n", 23, collect, &e) == DS_ERR_FORMAT);
    CHECK_ERR_CONTAINS("longer than 16 bytes");
    ds_sse_free(&p);
    ds_sse_init(&p, 16);
    CHECK(ds_sse_feed(&p, "data: 0123456789\ndata: 0123456789\n", 34, collect, &e) ==
          DS_ERR_FORMAT); /* each line fits, the event does not */
    CHECK_ERR_CONTAINS("SSE event longer");
    ds_sse_free(&p);
    CHECK(e.n == 0);
}

/* Every event of a stream, joined with '|' (data with '|' cannot be told apart, never mind). */
static int join_events(void *ctx, const char *data, size_t len) {
    ds_buf *b = ctx;
    if (ds_buf_append(b, data, len) || ds_buf_append(b, "|", 1)) return -1;
    return 0;
}

/* Model-based: random streams of SSE pieces give the same events whether fed at once, byte by
 * byte, or split at random points (the parser keeps no state that depends on the split). */
static void test_sse_splits(void) {
    static const char *pieces[] = {"data:", "data: ",   " ",         "\r",     "\n",
                                   "\r\n",  ":",        "x",         "[DONE]", "event: e",
                                   "id: 1", "\xc3\xa9", "{\"a\":1}", "dat"};
    const int n_pieces = (int)(sizeof pieces / sizeof pieces[0]);
    uint64_t s = 7;
    int mismatches = 0;
    for (int round = 0; round < 2000; round++) {
        char in[512];
        size_t n = 0;
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        int k = (int)((s >> 33) % 40);
        for (int i = 0; i < k; i++) {
            s = s * 6364136223846793005ull + 1442695040888963407ull;
            const char *p = pieces[(s >> 33) % (uint64_t)n_pieces];
            size_t l = strlen(p);
            if (n + l < sizeof in) memcpy(in + n, p, l), n += l;
        }
        ds_buf whole = {0}, split = {0};
        ds_sse a, b;
        ds_sse_init(&a, 0);
        ds_sse_init(&b, 0);
        ds_buf_append(&whole, "", 0);
        ds_buf_append(&split, "", 0);
        CHECK(ds_sse_feed(&a, in, n, join_events, &whole) == 0);
        CHECK(ds_sse_finish(&a, join_events, &whole) == 0);
        for (size_t i = 0; i < n;) {
            s = s * 6364136223846793005ull + 1442695040888963407ull;
            size_t step = round % 3 == 0 ? 1 : 1 + (size_t)((s >> 33) % 9);
            if (step > n - i) step = n - i;
            CHECK(ds_sse_feed(&b, in + i, step, join_events, &split) == 0);
            i += step;
        }
        CHECK(ds_sse_finish(&b, join_events, &split) == 0);
        if (whole.len != split.len || memcmp(whole.data, split.data, whole.len)) mismatches++;
        ds_sse_free(&a);
        ds_sse_free(&b);
        ds_buf_free(&whole);
        ds_buf_free(&split);
    }
    CHECK_MSG(mismatches == 0, "%d of 2000 random streams gave other events when split",
              mismatches);
}

/* ---- figures -------------------------------------------------------------------------------- */
static void test_percentiles(void) {
    double x[] = {10, 2, 4, 1, 3};
    ds_bench_dist d;
    ds_bench_dist_of(x, 5, 1, &d);  /* numpy: mean 4, median 3, std 3.16228, p90 7.6, p99 9.76 */
    CHECK(x[0] == 1 && x[4] == 10); /* sorted in place */
    CHECK_NEAR(d.mean, 4, 1e-12);
    CHECK_NEAR(d.median, 3, 1e-12);
    CHECK_NEAR(d.std, sqrt(10.0), 1e-12);
    CHECK_NEAR(d.p90, 7.6, 1e-12);
    CHECK_NEAR(d.p99, 9.76, 1e-12);
    CHECK_NEAR(d.max, 10, 1e-12);
    double y[] = {0.004, 0.001, 0.003, 0.002};
    ds_bench_dist_of(y, 4, 1000, &d); /* ms; even count: median between the middle two */
    CHECK_NEAR(d.median, 2.5, 1e-9);
    CHECK_NEAR(d.p90, 3.7, 1e-9);
    double one = 0.5;
    ds_bench_dist_of(&one, 1, 1000, &d);
    CHECK(d.mean == 500 && d.median == 500 && d.p99 == 500 && d.std == 0);
    ds_bench_dist_of(NULL, 0, 1000, &d);
    CHECK(d.n == 0 && d.mean == 0 && d.p99 == 0);
    CHECK(ds_bench_percentile(NULL, 0, 50) == 0);
}

/* A successful result: sent at `start`, token chunks at times t[0, k). */
static void mk_ok(ds_bench_result *r, double start, const double *t, int k, int in, int out) {
    memset(r, 0, sizeof *r);
    r->sent = r->success = 1;
    r->http_status = 200;
    r->start = start;
    r->prompt_tokens = in;
    r->output_tokens = out;
    r->usage_prompt_tokens = in;
    r->usage_completion_tokens = out;
    r->chunks = k;
    r->chunk_times = malloc((size_t)k * sizeof(double));
    r->itl = malloc((size_t)k * sizeof(double));
    for (int i = 0; i < k; i++) r->chunk_times[i] = t[i];
    for (int i = 1; i < k; i++) r->itl[i - 1] = t[i] - t[i - 1];
    r->n_itl = k - 1;
    r->ttft = t[0] - start;
    r->latency = t[k - 1] - start;
}

static void mk_fail(ds_bench_result *r, const char *why, int sent) {
    memset(r, 0, sizeof *r);
    r->sent = sent;
    r->error = strdup(why);
    r->ttft = r->latency = -1;
    r->usage_prompt_tokens = r->usage_completion_tokens = -1;
    r->prompt_tokens = 7;
}

/* The number after `key` in printed text, or NAN. */
static double printed(const char *text, const char *key) {
    const char *p = strstr(text, key);
    return p ? strtod(p + strlen(key), NULL) : NAN;
}

static void test_summary(void) {
    ds_bench_result r[6];
    const double a[] = {0.100, 0.120, 0.150, 0.160}; /* TTFT 100 ms, E2EL 160 ms */
    const double b[] = {0.300, 0.340};               /* sent at 0.1: TTFT 200, E2EL 240 */
    const double c[] = {0.050};                      /* one token: no TPOT, no ITL */
    mk_ok(&r[0], 0.0, a, 4, 10, 4);
    mk_ok(&r[1], 0.1, b, 2, 20, 5); /* 5 tokens in 2 chunks (usage says 5) */
    mk_ok(&r[2], 0.0, c, 1, 30, 1);
    mk_fail(&r[3], "HTTP 503: busy", 1);
    mk_fail(&r[4], "stream cut: reset", 1);
    mk_fail(&r[5], "HTTP 503: busy", 1);
    ds_bench_run_info info = {.duration = 2.0, .peak_in_flight = 3, .not_sent = 0};
    ds_bench_summary s;
    CHECK(ds_bench_summarize(r, 6, &info, 4, INFINITY, &s) == 0);
    CHECK(s.total == 6 && s.completed == 3 && s.failed == 3 && s.not_sent == 0);
    CHECK(s.total_input == 60 && s.total_output == 10);
    CHECK_NEAR(s.request_throughput, 1.5, 1e-12);
    CHECK_NEAR(s.output_throughput, 5, 1e-12);
    CHECK_NEAR(s.total_token_throughput, 35, 1e-12);
    CHECK_NEAR(s.ttft.mean, (100 + 200 + 50) / 3.0, 1e-9);
    CHECK_NEAR(s.e2el.median, 160, 1e-9);
    /* TPOT: (160-100)/3 = 20 and (240-200)/4 = 10 */
    CHECK(s.tpot.n == 2);
    CHECK_NEAR(s.tpot.mean, 15, 1e-9);
    /* ITL pooled: 20, 30, 10, 40 */
    CHECK(s.itl.n == 4);
    CHECK_NEAR(s.itl.mean, 25, 1e-9);
    CHECK_NEAR(s.itl.median, 25, 1e-9);
    CHECK_NEAR(s.itl.p99, 39.7, 1e-9);
    /* chunk arrivals by second from the first send: all 7 in [0, 1) */
    CHECK_NEAR(s.max_output_tokens_per_s, 7, 1e-12);
    CHECK(s.n_errors == 2 && s.errors[0].count == 2 &&
          !strcmp(s.errors[0].reason, "HTTP 503: busy"));
    CHECK(s.errors[1].count == 1 && !strcmp(s.errors[1].reason, "stream cut: reset"));

    /* printed and JSON agree with the summary */
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    ds_bench_print(f, &s);
    fclose(f);
    CHECK(strstr(buf, "============ Serving Benchmark Result ============\n") != NULL);
    CHECK(strstr(buf, "---------------Time to First Token----------------\n") != NULL);
    CHECK(strstr(buf, "-----Time per Output Token (excl. 1st token)------\n") != NULL);
    CHECK(printed(buf, "Successful requests:") == 3);
    CHECK(printed(buf, "Failed requests:") == 3);
    CHECK(printed(buf, "Maximum request concurrency:") == 4);
    CHECK_NEAR(printed(buf, "Mean TTFT (ms):"), s.ttft.mean, 0.005);
    CHECK_NEAR(printed(buf, "P99 ITL (ms):"), 39.70, 1e-9);
    CHECK(strstr(buf, "2 x HTTP 503: busy") != NULL);
    CHECK(strstr(buf, "Request rate configured") == NULL); /* inf: not printed */
    json_t *cfg = json_pack("{s:s}", "backend", "openai");
    json_t *j = ds_bench_json(&s, r, 6, cfg);
    CHECK(j != NULL);
    CHECK(!strcmp(json_string_value(json_object_get(j, "backend")), "openai"));
    CHECK(json_integer_value(json_object_get(j, "completed")) == 3);
    CHECK(json_integer_value(json_object_get(j, "failed")) == 3);
    CHECK(json_integer_value(json_object_get(j, "total_output_tokens")) == 10);
    CHECK_NEAR(json_real_value(json_object_get(j, "mean_tpot_ms")), 15, 1e-9);
    CHECK_NEAR(json_real_value(json_object_get(j, "p99_itl_ms")), 39.7, 1e-9);
    CHECK(!strcmp(json_string_value(json_object_get(j, "request_rate")), "inf"));
    CHECK(json_integer_value(json_object_get(j, "max_concurrency")) == 4);
    CHECK(json_array_size(json_object_get(j, "ttfts")) == 6);
    CHECK(json_is_null(json_array_get(json_object_get(j, "ttfts"), 3)));
    CHECK(json_array_size(json_array_get(json_object_get(j, "itls"), 0)) == 3);
    CHECK(json_integer_value(json_array_get(json_object_get(j, "output_lens"), 3)) == 0);
    CHECK(!strcmp(json_string_value(json_array_get(json_object_get(j, "errors"), 4)),
                  "stream cut: reset"));
    CHECK(!strcmp(json_string_value(json_array_get(json_object_get(j, "errors"), 0)), ""));
    CHECK(json_is_null(json_array_get(json_object_get(j, "tpots"), 2)));
    CHECK(json_array_size(json_object_get(j, "failure_reasons")) == 2);
    json_decref(j);
    json_decref(cfg);
    free(buf);
    ds_bench_summary_free(&s);

    /* nothing succeeded: zeros, no crash */
    info.duration = 0.5;
    CHECK(ds_bench_summarize(r + 3, 3, &info, 0, 2.0, &s) == 0);
    CHECK(s.completed == 0 && s.ttft.mean == 0 && s.output_throughput == 0);
    f = open_memstream(&buf, &len);
    ds_bench_print(f, &s);
    fclose(f);
    CHECK(strstr(buf, "Request rate configured (RPS):           2.00") != NULL);
    CHECK(strstr(buf, "Maximum request concurrency") == NULL);
    free(buf);
    ds_bench_summary_free(&s);
    for (int i = 0; i < 6; i++) ds_bench_result_free(&r[i]);
}

/* ---- prompts -------------------------------------------------------------------------------- */
/* Token count of a prompt, computed here without ds_bench_count. */
static int32_t independent_count(const ds_tokenizer *t, ds_bench_backend b, const char *text) {
    int32_t *ids = NULL;
    size_t n = 0;
    if (b == DS_BENCH_COMPLETIONS) {
        CHECK(ds_tok_encode(t, text, strlen(text), 1, &ids, &n) == 0);
    } else {
        ds_chat_format f;
        CHECK(ds_chat_detect(ds_tok_chat_template(t), &f) == 0);
        json_t *m = json_pack("[{s:s,s:s}]", "role", "user", "content", text);
        ds_buf r = {0};
        CHECK(ds_chat_render(f, ds_tok_bos_token(t), m, 1, &r) == 0);
        CHECK(ds_tok_encode(t, r.data, r.len, 0, &ids, &n) == 0);
        ds_buf_free(&r);
        json_decref(m);
    }
    free(ids);
    return (int32_t)n;
}

static void test_prompts(const ds_tokenizer *t, const char *tmp) {
    ds_bench_tok bt;
    double t0 = ds_now();
    CHECK(ds_bench_tok_init(&bt, t) == 0);
    printf("token pool: %d of %lld ids (%.0f ms)\n", (int)bt.n_pool,
           (long long)ds_tok_vocab_size(t), (ds_now() - t0) * 1e3);
    CHECK(bt.add_bos == 1 && bt.chat_format >= 0 && bt.n_pool > 100000);
    int32_t chat_fixed;
    CHECK(ds_bench_count(&bt, DS_BENCH_CHAT, "", NULL, &chat_fixed) == 0);
    CHECK(chat_fixed >= 3); /* BOS, <｜User｜>, <｜Assistant｜> */

    const int32_t lens[] = {1, 2, 3, 5, 8, 17, 64, 255, 256, 1000, 3000};
    int total = 0, exact = 0;
    t0 = ds_now();
    for (int b = 0; b < 2; b++) {
        ds_bench_backend be = b ? DS_BENCH_CHAT : DS_BENCH_COMPLETIONS;
        for (size_t li = 0; li < sizeof lens / sizeof lens[0]; li++) {
            int32_t want = lens[li] + (b ? chat_fixed : 0);
            ds_bench_prompt *p = NULL;
            int n = lens[li] <= 256 ? 24 : 3;
            CHECK_MSG(ds_bench_random_prompts(&bt, be, n, want, 9, 1234 + (uint64_t)li, &p) == 0,
                      "%s", ds_err_msg());
            for (int i = 0; p && i < n; i++) {
                int32_t got = independent_count(t, be, p[i].text);
                total++;
                exact += got == want;
                CHECK_MSG(got == want, "backend %d: %d tokens asked, %d made", b, want, got);
                CHECK(p[i].prompt_tokens == want && p[i].max_tokens == 9);
            }
            if (p && lens[li] > 2) CHECK(strcmp(p[0].text, p[1].text) != 0); /* prompts differ */
            ds_bench_prompts_free(p, n);
        }
    }
    printf("random prompts: %d/%d exact (%.0f ms)\n", exact, total, (ds_now() - t0) * 1e3);
    /* random lengths 1..600 with many seeds: the adjustment always lands exactly */
    uint64_t s = 99;
    int bad = 0;
    for (int i = 0; i < 300; i++) {
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        int32_t want = 1 + (int32_t)((s >> 33) % 600);
        ds_bench_prompt *p = NULL;
        if (ds_bench_random_prompts(&bt, DS_BENCH_COMPLETIONS, 1, want, 1, s, &p) ||
            independent_count(t, DS_BENCH_COMPLETIONS, p[0].text) != want)
            bad++;
        ds_bench_prompts_free(p, 1);
    }
    CHECK_MSG(bad == 0, "%d of 300 random-length prompts not exact", bad);

    /* deterministic in the seed; prompt i does not depend on n */
    ds_bench_prompt *p1 = NULL, *p2 = NULL;
    CHECK(ds_bench_random_prompts(&bt, DS_BENCH_COMPLETIONS, 3, 50, 4, 7, &p1) == 0);
    CHECK(ds_bench_random_prompts(&bt, DS_BENCH_COMPLETIONS, 5, 50, 4, 7, &p2) == 0);
    if (p1 && p2) CHECK(!strcmp(p1[2].text, p2[2].text));
    ds_bench_prompts_free(p1, 3);
    ds_bench_prompts_free(p2, 5);
    /* below the fixed part */
    CHECK(ds_bench_random_prompts(&bt, DS_BENCH_CHAT, 1, chat_fixed - 1, 4, 7, &p1) == DS_ERR_ARG);
    CHECK_ERR_CONTAINS("chat template");
    CHECK(p1 == NULL);

    /* JSONL datasets */
    char path[4200];
    snprintf(path, sizeof path, "%s/d.jsonl", tmp);
    FILE *f = fopen(path, "w");
    fprintf(f, "{\"prompt\": \"Hello world\"}\n\n  \n{\"prompt\": \"a b c\", \"max_tokens\": 3}\r\n"
               "{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}], \"max_tokens\": 5}\n");
    fclose(f);
    ds_bench_prompt *d = NULL;
    CHECK(ds_bench_file_prompts(&bt, DS_BENCH_COMPLETIONS, path, 4, 11, &d) == DS_ERR_FORMAT);
    CHECK_ERR_CONTAINS("d.jsonl:5: \"messages\" needs --backend openai-chat");
    CHECK(ds_bench_file_prompts(&bt, DS_BENCH_CHAT, path, 7, 11, &d) == 0);
    if (d) {
        CHECK(!strcmp(d[0].text, "Hello world") && d[0].max_tokens == 11);
        CHECK(!strcmp(d[1].text, "a b c") && d[1].max_tokens == 3);
        CHECK(d[2].messages && !d[2].text && d[2].max_tokens == 5);
        CHECK(!strcmp(d[3].text, "Hello world") && !strcmp(d[6].text, "Hello world"));
        CHECK(d[0].prompt_tokens == independent_count(t, DS_BENCH_CHAT, "Hello world"));
        CHECK(d[2].prompt_tokens == independent_count(t, DS_BENCH_CHAT, "Hi"));
    }
    ds_bench_prompts_free(d, 7);
    CHECK(ds_bench_file_prompts(&bt, DS_BENCH_COMPLETIONS, path, 1, 11, &d) == DS_ERR_FORMAT);
    f = fopen(path, "w");
    fprintf(f, "{\"prompt\": \"ok\"}\n{\"prompt\": 5}\n");
    fclose(f);
    CHECK(ds_bench_file_prompts(&bt, DS_BENCH_COMPLETIONS, path, 1, 11, &d) == DS_ERR_FORMAT);
    CHECK_ERR_CONTAINS("d.jsonl:2: \"prompt\" must be a string");
    f = fopen(path, "w");
    fprintf(f, "{\"prompt\": \"ok\", \"max_tokens\": 0}\n");
    fclose(f);
    CHECK(ds_bench_file_prompts(&bt, DS_BENCH_COMPLETIONS, path, 1, 11, &d) == DS_ERR_FORMAT);
    CHECK_ERR_CONTAINS("d.jsonl:1: \"max_tokens\" must be a positive integer");
    f = fopen(path, "w");
    fprintf(f, "{\"prompt\": \"ok\"\n");
    fclose(f);
    CHECK(ds_bench_file_prompts(&bt, DS_BENCH_COMPLETIONS, path, 1, 11, &d) == DS_ERR_FORMAT);
    CHECK_ERR_CONTAINS("d.jsonl:1: not JSON");
    f = fopen(path, "w");
    fclose(f);
    CHECK(ds_bench_file_prompts(&bt, DS_BENCH_COMPLETIONS, path, 1, 11, &d) == DS_ERR_FORMAT);
    CHECK_ERR_CONTAINS("no prompts");
    snprintf(path, sizeof path, "%s/missing.jsonl", tmp);
    CHECK(ds_bench_file_prompts(&bt, DS_BENCH_COMPLETIONS, path, 1, 11, &d) == DS_ERR_IO);
    CHECK_ERR_CONTAINS("missing.jsonl");
    CHECK(d == NULL);
    ds_bench_tok_free(&bt);
}

int main(void) {
    test_sse();
    test_sse_splits();
    test_percentiles();
    test_summary();

    /* the tokenizer: the fixtures' copy of the real one, else the one setup.sh fetched */
    const char *fx = getenv("DSINFER_FIXTURES");
    char dir[4096];
    snprintf(dir, sizeof dir, "%s/tiny-a", fx && *fx ? fx : DSINFER_FIXTURES_DEFAULT);
    char probe[4200];
    snprintf(probe, sizeof probe, "%s/tokenizer.json", dir);
    if (access(probe, R_OK)) snprintf(dir, sizeof dir, "%s", ds_cli_default_tokenizer_dir());
    ds_tokenizer *t = NULL;
    if (ds_tok_open(dir, &t)) {
        fprintf(stderr, "no tokenizer at %s: %s\n", dir, ds_err_msg());
        int rc = ds_test_finish("test_bench_units");
        return rc ? rc : ds_test_skip_or_fail("the DeepSeek tokenizer is missing (prompt tests)");
    }
    char *tmp = ds_test_tmpdir();
    CHECK(tmp != NULL);
    if (tmp) test_prompts(t, tmp);
    ds_test_rmtree(tmp);
    free(tmp);
    ds_tok_close(t);
    return ds_test_finish("test_bench_units");
}
