/* `dsinfer bench` against a real `dsinfer serve` of the tiny-a fixture on loopback:
 *   - completions and chat: every request succeeds; the server's usage says each prompt has
 *     exactly --prompt-tokens tokens (BOS and chat template included) and each answer exactly
 *     --output-tokens; the report's token counts are the usage's; TTFT <= E2EL for every
 *     request; the figures in the JSON follow from its per-request columns; the printed summary
 *     and the JSON agree figure by figure;
 *   - the server killed in the middle of a run: the run ends, exit status 1, every request is
 *     accounted for (completed + failed = all) and the report says the run ended early.
 * Skipped (exit 77; a failure under CI=true) when the binary has no `serve` command. */
#include "testutil.h"

#include <arpa/inet.h>
#include <curl/curl.h>
#include <jansson.h>
#include <math.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static int free_port(void) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t al = sizeof a;
    int port = -1;
    if (!bind(fd, (struct sockaddr *)&a, sizeof a) && !getsockname(fd, (struct sockaddr *)&a, &al))
        port = ntohs(a.sin_port);
    close(fd);
    return port;
}

static size_t discard(char *p, size_t s, size_t n, void *ud) {
    (void)p, (void)ud;
    return s * n;
}

/* GET url -> HTTP status, 0 when nothing answers. */
static long http_get(const char *url) {
    CURL *c = curl_easy_init();
    long status = 0;
    if (!c) return 0;
    curl_easy_setopt(c, CURLOPT_URL, url);
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, discard);
    curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, 2000L);
    curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
    if (curl_easy_perform(c) == CURLE_OK) curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &status);
    curl_easy_cleanup(c);
    return status;
}

/* Starts dsinfer serve on port; its output goes to log. The pid, or -1. */
static pid_t start_server(const char *model, int port, const char *log) {
    pid_t pid = fork();
    if (pid == 0) {
        FILE *f = freopen(log, "w", stderr);
        if (!f || !freopen("/dev/null", "w", stdout)) _exit(127);
        char p[16];
        snprintf(p, sizeof p, "%d", port);
        execl(DSINFER_BIN, DSINFER_BIN, "serve", model, "--port", p, "--kv-cache-memory", "64M",
              "--threads", "1", "--disable-log-requests", "--disable-log-stats", (char *)NULL);
        _exit(127);
    }
    return pid;
}

static void dump_log(const char *log) {
    char cmd[4300];
    snprintf(cmd, sizeof cmd, "tail -n 30 '%s' >&2", log);
    if (system(cmd)) return;
}

static double jnum(const json_t *o, const char *k) {
    const json_t *v = json_object_get(o, k);
    return json_is_number(v) ? json_number_value(v) : NAN;
}
static double jat(const json_t *o, const char *k, size_t i) {
    const json_t *v = json_array_get(json_object_get(o, k), i);
    return json_is_number(v) ? json_number_value(v) : NAN;
}

/* The number printed after `key` (which ends in ':'), or NAN. */
static double printed(const char *text, const char *key) {
    const char *p = text ? strstr(text, key) : NULL;
    return p ? strtod(p + strlen(key), NULL) : NAN;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* The printed summary and the JSON say the same; the JSON's figures follow from its columns. */
static void check_report(const char *out, const json_t *j, int n, int pt, int ot,
                         const char *what) {
    static const struct {
        const char *printed, *key;
    } rows[] = {{"Successful requests:", "completed"},
                {"Failed requests:", "failed"},
                {"Maximum request concurrency:", "max_concurrency"},
                {"Benchmark duration (s):", "duration"},
                {"Total input tokens:", "total_input_tokens"},
                {"Total generated tokens:", "total_output_tokens"},
                {"Request throughput (req/s):", "request_throughput"},
                {"Output token throughput (tok/s):", "output_throughput"},
                {"Peak output token throughput (tok/s):", "max_output_tokens_per_s"},
                {"Peak concurrent requests:", "max_concurrent_requests"},
                {"Total Token throughput (tok/s):", "total_token_throughput"}};
    for (size_t i = 0; i < sizeof rows / sizeof rows[0]; i++) {
        double a = printed(out, rows[i].printed), b = jnum(j, rows[i].key);
        CHECK_MSG(fabs(a - b) <= 0.005 + 1e-9, "%s: printed %s %.4f, JSON %s %.6f", what,
                  rows[i].printed, a, rows[i].key, b);
    }
    const char *names[] = {"TTFT", "TPOT", "ITL", "E2EL"},
               *keys[] = {"ttft", "tpot", "itl", "e2el"};
    const char *stats[] = {"Mean", "Median", "P90", "P99"},
               *skeys[] = {"mean", "median", "p90", "p99"};
    for (int m = 0; m < 4; m++)
        for (int s = 0; s < 4; s++) {
            char pk[64], jk[64];
            snprintf(pk, sizeof pk, "%s %s (ms):", stats[s], names[m]);
            snprintf(jk, sizeof jk, "%s_%s_ms", skeys[s], keys[m]);
            double a = printed(out, pk), b = jnum(j, jk);
            CHECK_MSG(fabs(a - b) <= 0.005 + 1e-9, "%s: printed %s %.4f, JSON %s %.6f", what, pk, a,
                      jk, b);
        }
    /* per request: the server's usage, exact lengths, TTFT <= E2EL */
    double ttft_sum = 0, e2el[256];
    long in_sum = 0, out_sum = 0;
    for (int i = 0; i < n && i < 256; i++) {
        double upt = jat(j, "usage_prompt_tokens", (size_t)i),
               uct = jat(j, "usage_completion_tokens", (size_t)i);
        CHECK_MSG(upt == pt, "%s: request %d: the server counted %.0f prompt tokens, %d asked",
                  what, i, upt, pt);
        CHECK_MSG(uct == ot, "%s: request %d: %.0f output tokens, %d asked", what, i, uct, ot);
        CHECK(jat(j, "input_lens", (size_t)i) == upt && jat(j, "output_lens", (size_t)i) == uct);
        double ttft = jat(j, "ttfts", (size_t)i), lat = jat(j, "latencies", (size_t)i);
        CHECK_MSG(ttft > 0 && ttft <= lat, "%s: request %d: TTFT %.6f, E2EL %.6f", what, i, ttft,
                  lat);
        double chunks = jat(j, "chunk_counts", (size_t)i);
        CHECK(chunks >= 1 && chunks <= ot);
        CHECK((double)json_array_size(json_array_get(json_object_get(j, "itls"), (size_t)i)) ==
              chunks - 1);
        const char *fr =
            json_string_value(json_array_get(json_object_get(j, "finish_reasons"), (size_t)i));
        CHECK(fr && !strcmp(fr, "length"));
        ttft_sum += ttft;
        e2el[i] = lat;
        in_sum += (long)upt;
        out_sum += (long)uct;
    }
    CHECK(jnum(j, "total_input_tokens") == in_sum && in_sum == (long)n * pt);
    CHECK(jnum(j, "total_output_tokens") == out_sum && out_sum == (long)n * ot);
    CHECK_NEAR(jnum(j, "mean_ttft_ms"), ttft_sum / n * 1e3, 1e-6);
    qsort(e2el, (size_t)n, sizeof e2el[0], cmp_double);
    double med = n % 2 ? e2el[n / 2] : (e2el[n / 2 - 1] + e2el[n / 2]) / 2;
    CHECK_NEAR(jnum(j, "median_e2el_ms"), med * 1e3, 1e-6);
    double dur = jnum(j, "duration");
    CHECK_NEAR(jnum(j, "request_throughput"), n / dur, 1e-9);
    CHECK_NEAR(jnum(j, "output_throughput"), out_sum / dur, 1e-6);
    CHECK_NEAR(jnum(j, "total_token_throughput"), (in_sum + out_sum) / dur, 1e-6);
}

int main(void) {
    const char *fx = ds_test_fixtures();
    if (!fx) return ds_test_skip_or_fail("golden fixtures missing");
    int st;
    char cmd[16384];
    snprintf(cmd, sizeof cmd, "'%s' serve --help >/dev/null 2>&1", DSINFER_BIN);
    free(ds_test_run(cmd, &st));
    if (st != 0) return ds_test_skip_or_fail("this dsinfer has no `serve` command");
    curl_global_init(CURL_GLOBAL_DEFAULT);
    char model[4096], log[4200], json[4200], url[128];
    snprintf(model, sizeof model, "%.4000s/tiny-a", fx);
    char *tmp = ds_test_tmpdir();
    if (!tmp) return 1;
    snprintf(log, sizeof log, "%s/serve.log", tmp);
    snprintf(json, sizeof json, "%s/result.json", tmp);

    int port = free_port();
    pid_t pid = start_server(model, port, log);
    CHECK(pid > 0);
    snprintf(url, sizeof url, "http://127.0.0.1:%d/health", port);
    int up = 0;
    for (int i = 0; i < 600 && !up; i++) { /* up to 60 s (sanitizer builds load slowly) */
        up = http_get(url) == 200;
        if (!up) usleep(100000);
        if (!up && waitpid(pid, &st, WNOHANG) == pid) break; /* it died */
    }
    CHECK_MSG(up, "dsinfer serve did not come up on port %d", port);
    if (!up) {
        dump_log(log);
        kill(pid, SIGKILL);
        waitpid(pid, &st, 0);
        ds_test_rmtree(tmp);
        return ds_test_finish("test_bench_serve");
    }

    const char *backends[] = {"openai", "openai-chat"};
    for (int b = 0; b < 2; b++) {
        unlink(json);
        /* no --model: the name comes from GET /v1/models */
        snprintf(cmd, sizeof cmd,
                 "'%s' bench --backend %s --port %d --tokenizer '%s' --parallel-num 4 "
                 "--num-prompts 8 --prompt-tokens 40 --output-tokens 12 --seed %d "
                 "--result-json '%s'",
                 DSINFER_BIN, backends[b], port, model, b, json);
        char *out = ds_test_run(cmd, &st);
        CHECK_MSG(st == 0, "%s: status %d\n%s", backends[b], st, out ? out : "");
        json_t *j = json_load_file(json, JSON_ALLOW_NUL, NULL);
        CHECK(j != NULL);
        if (j && out) {
            CHECK(jnum(j, "completed") == 8 && jnum(j, "failed") == 0);
            CHECK(!strcmp(json_string_value(json_object_get(j, "model_id")), model));
            check_report(out, j, 8, 40, 12, backends[b]);
        }
        if (st) dump_log(log);
        json_decref(j);
        free(out);
    }

    /* the server dies in the middle of a run */
    unlink(json);
    snprintf(cmd, sizeof cmd,
             "'%s' bench --port %d --tokenizer '%s' --parallel-num 4 --num-prompts 400 "
             "--prompt-tokens 40 --output-tokens 50 --result-json '%s' 2>/dev/null",
             DSINFER_BIN, port, model, json);
    FILE *p = popen(cmd, "r");
    CHECK(p != NULL);
    usleep(1200000); /* tokenizer, prompts, then a few requests */
    kill(pid, SIGKILL);
    waitpid(pid, &st, 0);
    char out[8192];
    size_t n = p ? fread(out, 1, sizeof out - 1, p) : 0;
    out[n] = 0;
    st = p ? pclose(p) : -1;
    CHECK_MSG(WIFEXITED(st) && WEXITSTATUS(st) == 1, "status %d", st);
    CHECK_MSG(strstr(out, "Run ended early: the server stopped accepting connections"), "%s", out);
    json_t *j = json_load_file(json, JSON_ALLOW_NUL, NULL);
    CHECK(j != NULL);
    if (j) {
        double ok = jnum(j, "completed"), failed = jnum(j, "failed"), ns = jnum(j, "not_sent");
        printf("server killed: %.0f completed, %.0f failed (%.0f not sent)\n", ok, failed, ns);
        CHECK(ok + failed == 400 && ns > 0 && ok < 400);
        CHECK(printed(out, "Successful requests:") == ok);
        CHECK(printed(out, "Requests not sent:") == ns);
    }
    json_decref(j);
    curl_global_cleanup();
    ds_test_rmtree(tmp);
    free(tmp);
    return ds_test_finish("test_bench_serve");
}
