/* Concurrency: 192 parallel streaming /v1/completions requests of 256 prompt tokens and 256
 * output tokens (ignore_eos) against `dsinfer serve` on the tiny-a fixture (--max-model-len 512:
 * the fixture's own limit is 256). Every stream must end with finish_reason "length", exactly
 * 256 token ids, a usage chunk saying 256 + 256, and [DONE]; the requests must all have been
 * admitted together (max running sequences seen in /metrics >= 96). The throughput is printed,
 * not asserted (docs/server.md reports it). Under ASan/TSan the output is cut to 16 tokens per
 * request so that the suite stays quick (the ASan build took 228 s alone at 48 tokens, past its
 * 300 s limit beside the other tests on a slow day; 40 s at 16); the shape of the test is the
 * same. By hand, DSINFER_LOAD_PORT=P runs the same load against a server already listening on
 * port P. */
#include "serverutil.h"

#include <jansson.h>
#include <pthread.h>
#include <stdatomic.h>

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define SANITIZED 1
#endif
#endif
#ifndef SANITIZED
#define SANITIZED 0
#endif

#define N_REQ 192
#define PROMPT 256
static const int OUTPUT = SANITIZED ? 16 : 256;

typedef struct {
    int port, idx;
    int status, done, tokens, finish_length, usage_ok, events;
    double ttft, total;
} job;

static void *run_job(void *p) {
    job *j = p;
    char *body = malloc(8 * PROMPT + 256);
    size_t k = (size_t)sprintf(body, "{\"prompt\": [0");
    uint64_t x = 0x243F6A8885A308D3ull ^ (uint64_t)(j->idx + 1) * 0x9E3779B97F4A7C15ull;
    for (int i = 1; i < PROMPT; i++) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        k += (size_t)sprintf(body + k, ",%d", 1000 + (int)(x % 99000));
    }
    k += (size_t)sprintf(body + k,
                         "], \"max_tokens\": %d, \"ignore_eos\": true, \"temperature\": 0, "
                         "\"stream\": true, \"stream_options\": {\"include_usage\": true}, "
                         "\"return_token_ids\": true}",
                         OUTPUT);
    const double t0 = srv_now();
    int fd = srv_send_completion(j->port, body);
    free(body);
    if (fd < 0) return NULL;
    /* read the stream; note when the first token arrives */
    size_t cap = 1 << 16, len = 0;
    char *buf = malloc(cap);
    for (;;) {
        if (len + 4096 > cap) buf = realloc(buf, cap *= 2);
        ssize_t n = recv(fd, buf + len, cap - len - 1, 0);
        if (n <= 0) break;
        len += (size_t)n;
        buf[len] = 0;
        if (j->ttft == 0 && strstr(buf, "\"token_ids\":[")) j->ttft = srv_now() - t0;
    }
    buf[len] = 0;
    close(fd);
    j->total = srv_now() - t0;
    srv_resp r;
    srv_parse(buf, len, &r);
    j->status = r.status;
    for (const char *p2 = r.body; p2 && *p2;) {
        const char *end = strstr(p2, "\n\n");
        if (!end) break;
        if (!strncmp(p2, "data: [DONE]", 12)) {
            j->done = 1;
        } else if (!strncmp(p2, "data: ", 6)) {
            json_error_t e;
            json_t *o = json_loadb(p2 + 6, (size_t)(end - p2 - 6), JSON_ALLOW_NUL, &e);
            json_t *c = json_array_get(json_object_get(o, "choices"), 0);
            j->events++;
            j->tokens += (int)json_array_size(json_object_get(c, "token_ids"));
            json_t *fr = json_object_get(c, "finish_reason");
            if (json_is_string(fr)) j->finish_length = !strcmp(json_string_value(fr), "length");
            json_t *u = json_object_get(o, "usage");
            if (json_is_object(u))
                j->usage_ok = json_integer_value(json_object_get(u, "prompt_tokens")) == PROMPT &&
                              json_integer_value(json_object_get(u, "completion_tokens")) == OUTPUT;
            json_decref(o);
        }
        p2 = end + 2;
    }
    srv_resp_free(&r);
    return NULL;
}

static double max_running = 0; /* written by the watcher, read after it is joined */
static atomic_int watching = 1;

static void *watch(void *p) {
    int port = *(int *)p;
    while (atomic_load(&watching)) {
        srv_resp r = srv_get(port, "/metrics");
        double v = r.body ? srv_metric(r.body, "vllm:num_requests_running") : -1;
        if (v > max_running) max_running = v;
        srv_resp_free(&r);
        srv_sleep_ms(200);
    }
    return NULL;
}

int main(void) {
    const char *fx = ds_test_fixtures();
    if (!fx) return ds_test_skip_or_fail("golden fixtures missing");
    char model[4096];
    snprintf(model, sizeof model, "%.4000s/tiny-a", fx);
    srv_proc s;
    const char *args[] = {"--max-model-len",     "512",  "--disable-log-requests",
                          "--limit-concurrency", "1024", NULL};
    const char *ext = getenv("DSINFER_LOAD_PORT"); /* by hand: a server started elsewhere */
    if (ext) {
        memset(&s, 0, sizeof s);
        s.port = atoi(ext);
    } else if (srv_start(&s, model, args) != 0) {
        CHECK_MSG(0, "the server did not start");
        return ds_test_finish("test_server_load");
    }
    static job jobs[N_REQ];
    pthread_t th[N_REQ], wt;
    pthread_create(&wt, NULL, watch, &s.port);
    const double t0 = srv_now();
    for (int i = 0; i < N_REQ; i++) {
        jobs[i] = (job){.port = s.port, .idx = i};
        pthread_create(&th[i], NULL, run_job, &jobs[i]);
    }
    for (int i = 0; i < N_REQ; i++) pthread_join(th[i], NULL);
    const double dt = srv_now() - t0;
    atomic_store(&watching, 0);
    pthread_join(wt, NULL);
    int ok = 0;
    double ttft_max = 0, ttft_sum = 0;
    for (int i = 0; i < N_REQ; i++) {
        job *j = &jobs[i];
        const int good =
            j->status == 200 && j->done && j->tokens == OUTPUT && j->finish_length && j->usage_ok;
        CHECK_MSG(good, "request %d: status %d, %d tokens, done %d, length %d, usage %d", i,
                  j->status, j->tokens, j->done, j->finish_length, j->usage_ok);
        ok += good;
        ttft_sum += j->ttft;
        if (j->ttft > ttft_max) ttft_max = j->ttft;
    }
    CHECK_MSG(max_running >= N_REQ / 2, "at most %g requests ran at once", max_running);
    const double tokens = (double)N_REQ * OUTPUT;
    fprintf(
        stderr,
        "%d/%d streams of %d prompt + %d output tokens complete in %.1fs: %.0f output tokens/s "
        "(%.0f total tokens/s), mean TTFT %.2fs, max TTFT %.2fs, up to %.0f running at once%s\n",
        ok, N_REQ, PROMPT, OUTPUT, dt, tokens / dt, (tokens + (double)N_REQ * PROMPT) / dt,
        ttft_sum / N_REQ, ttft_max, max_running, SANITIZED ? " (sanitizer build)" : "");
    if (!ext) {
        int code = srv_stop(&s);
        CHECK_MSG(code == 0, "exit status %d after SIGTERM", code);
        unlink(s.log);
    }
    return ds_test_finish("test_server_load");
}
