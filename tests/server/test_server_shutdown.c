/* `dsinfer serve` shutting down on SIGTERM, on the tiny-a fixture, checked request by request:
 *   - a stream in flight finishes, /health stops answering 200, exit status 0, the stats line;
 *   - --shutdown-timeout 0: running requests are aborted and say so (a 503, or a stream's error
 *     event and [DONE]);
 *   - a burst of three times --max-num-seqs, running and waiting, streamed and not: given time,
 *     every request is answered in full; given 1 s, each is either whole or ends in that clear
 *     error, none is lost, hung or cut short without a word;
 *   - after the signal a new connection is refused and a request on a connection accepted before
 *     it gets a 503: nothing waits on a server that is going away. */
#include "serverutil.h"

#include <jansson.h>

static char g_model[4096];

/* SIGTERM with --shutdown-timeout 0: running requests are aborted, and say so: a stream ends with
 * an error event and [DONE], a whole answer is a 503; exit 0. */
static void test_shutdown_abort(void) {
    srv_proc s;
    const char *args[] = {"--shutdown-timeout", "0", "--disable-log-requests", NULL};
    CHECK(srv_start(&s, g_model, args) == 0);
    int a = srv_send_completion(s.port, "{\"prompt\": \"x\", \"max_tokens\": 250, \"n\": 16, "
                                        "\"ignore_eos\": true}");
    int b = srv_send_completion(s.port, "{\"prompt\": \"y\", \"max_tokens\": 250, \"n\": 16, "
                                        "\"ignore_eos\": true, \"stream\": true}");
    char first[64];
    ssize_t got = recv(b, first, sizeof first, 0); /* the stream runs */
    CHECK(got > 0);
    kill(s.pid, SIGTERM);
    size_t n;
    srv_resp ra, rb;
    char *raw = srv_read_all(a, &n);
    srv_parse(raw, n, &ra);
    raw = srv_read_all(b, &n);
    if (raw && got > 0) { /* put back what was read before */
        char *all = malloc(n + (size_t)got + 1);
        memcpy(all, first, (size_t)got);
        memcpy(all + got, raw, n + 1);
        free(raw);
        raw = all;
        n += (size_t)got;
    }
    srv_parse(raw, n, &rb);
    close(a);
    close(b);
    CHECK_MSG(ra.status == 503 && ra.body && strstr(ra.body, "shutting down"),
              "aborted whole answer: %d %.200s", ra.status, ra.body ? ra.body : "");
    CHECK_MSG(rb.status == 200 && rb.body && strstr(rb.body, "data: {\"error\"") &&
                  strstr(rb.body, "data: [DONE]"),
              "aborted stream: %.200s",
              rb.body ? rb.body + (rb.body_len > 200 ? rb.body_len - 200 : 0) : "");
    srv_resp_free(&ra);
    srv_resp_free(&rb);
    int code = srv_stop_sig(&s, SIGTERM, 60);
    CHECK_MSG(code == 0, "exit status %d after SIGTERM", code);
    unlink(s.log);
}

/* SIGTERM while a stream runs: the stream is finished, /health stops answering 200, exit 0. */
static void test_graceful_shutdown(void) {
    srv_proc s;
    const char *args[] = {"--max-num-seqs", "4", "--log-stats-interval", "1", NULL};
    CHECK(srv_start(&s, g_model, args) == 0);
    int fd = srv_send_completion(
        s.port, "{\"prompt\": \"Mindspore is\", \"max_tokens\": 200, \"ignore_eos\": true, "
                "\"stream\": true, \"stream_options\": {\"include_usage\": true}}");
    char first[256];
    ssize_t got = recv(fd, first, sizeof first, 0); /* the stream has begun */
    CHECK(got > 0);
    kill(s.pid, SIGTERM);
    size_t n;
    char *rest = srv_read_all(fd, &n);
    close(fd);
    CHECK_MSG(rest && strstr(rest, "\"completion_tokens\":200") && strstr(rest, "[DONE]"),
              "the stream in flight did not finish");
    free(rest);
    srv_resp r = srv_get(s.port, "/health");
    CHECK(r.status != 200);
    srv_resp_free(&r);
    int code = srv_stop_sig(&s, SIGTERM, 60);
    CHECK_MSG(code == 0, "exit status %d after SIGTERM", code);
    char *log = srv_read_file(s.log);
    CHECK(log && strstr(log, "shut down cleanly"));
    CHECK_MSG(log && strstr(log, "Avg prompt throughput: ") &&
                  strstr(log, " tokens/s, Avg generation throughput: ") && strstr(log, "Running: "),
              "no throughput line in the log");
    free(log);
    unlink(s.log);
}

enum { BURST = 12 }; /* three times --max-num-seqs 4 */

/* How a burst request ended: 1 whole (every token asked for, finish_reason "length"), 0 the clear
 * shutdown error, -1 anything else (said on stderr). */
static int outcome(int i, const srv_resp *r, int stream, int want_tokens) {
    const char *b = r->body ? r->body : "";
    if (stream) {
        const int done = strstr(b, "data: [DONE]") != NULL;
        const int err = strstr(b, "data: {\"error\"") != NULL;
        char usage[64];
        snprintf(usage, sizeof usage, "\"completion_tokens\":%d", want_tokens);
        if (r->status == 200 && done && !err && strstr(b, usage)) return 1;
        if ((r->status == 200 && done && err && strstr(b, "shutting down")) ||
            (r->status == 503 && strstr(b, "shutting down")))
            return 0;
    } else {
        json_error_t e;
        json_t *o = r->status == 200 ? json_loads(b, JSON_ALLOW_NUL, &e) : NULL;
        json_t *ch = json_array_get(json_object_get(o, "choices"), 0);
        const int whole =
            json_integer_value(json_object_get(json_object_get(o, "usage"), "completion_tokens")) ==
                want_tokens &&
            json_is_string(json_object_get(ch, "finish_reason")) &&
            strcmp(json_string_value(json_object_get(ch, "finish_reason")), "length") == 0;
        json_decref(o);
        if (whole) return 1;
        if (r->status == 503 && strstr(b, "shutting down")) return 0;
    }
    fprintf(stderr, "burst request %d (%s): status %d, %zu bytes: %.300s\n", i,
            stream ? "stream" : "whole", r->status, r->body_len,
            r->body_len > 300 ? b + r->body_len - 300 : b);
    return -1;
}

/* Requests running + waiting, from /metrics; -1 when it cannot be read. */
static int in_flight(int port) {
    srv_resp r = srv_get(port, "/metrics");
    const double run = r.body ? srv_metric(r.body, "vllm:num_requests_running") : -1,
                 wait = r.body ? srv_metric(r.body, "vllm:num_requests_waiting") : -1;
    srv_resp_free(&r);
    return run < 0 || wait < 0 ? -1 : (int)(run + wait);
}

/* BURST requests (even ones streamed) against --max-num-seqs 4, each asking for
 * max_tokens x n tokens; SIGTERM once every one is running or waiting; then each must end whole or
 * in the clear error (graceful: whole). A connection accepted before the signal gets a 503 for
 * a request sent after it, a new connection is refused. */
static void test_shutdown_burst(const char *grace_s, int max_tokens, int n, int graceful) {
    srv_proc s;
    const char *args[] = {"--max-num-seqs",         "4", "--shutdown-timeout", grace_s,
                          "--disable-log-requests", NULL};
    CHECK(srv_start(&s, g_model, args) == 0);
    int idle = srv_connect(s.port); /* accepted now, used after the signal */
    int fds[BURST];
    for (int i = 0; i < BURST; i++) {
        char body[256];
        snprintf(
            body, sizeof body,
            "{\"prompt\": \"burst %d\", \"max_tokens\": %d, \"n\": %d, \"ignore_eos\": true%s}", i,
            max_tokens, n,
            i % 2 == 0 ? ", \"stream\": true, \"stream_options\": {\"include_usage\": true}" : "");
        fds[i] = srv_send_completion(s.port, body);
        CHECK(fds[i] >= 0);
    }
    int seen = 0;
    for (double t0 = srv_now(); srv_now() - t0 < 30 && (seen = in_flight(s.port)) < BURST * n;)
        srv_sleep_ms(20);
    CHECK_MSG(seen == BURST * n, "only %d of %d sequences reached the engine", seen, BURST * n);
    kill(s.pid, SIGTERM);
    srv_sleep_ms(300);

    /* a request on the connection accepted before it: 503, at once */
    const char *req = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                      "Content-Length: 29\r\n\r\n{\"prompt\": \"x\", \"max_tokens\": 2}";
    struct timeval tv = {10, 0};
    setsockopt(idle, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    CHECK(srv_send_all(idle, req, strlen(req)) == 0);
    size_t len;
    srv_resp r;
    char *raw = srv_read_all(idle, &len);
    srv_parse(raw, len, &r);
    close(idle);
    CHECK_MSG(r.status == 503 && r.body && strstr(r.body, "shutting down"),
              "a request after SIGTERM on an open connection: %d %.200s", r.status,
              r.body ? r.body : "");
    srv_resp_free(&r);
    /* no new connection once the signal is taken */
    int late = -1;
    for (double t0 = srv_now(); srv_now() - t0 < 5 && (late = srv_connect(s.port)) >= 0;) {
        close(late);
        srv_sleep_ms(50);
    }
    CHECK_MSG(late < 0, "a new connection was still accepted after SIGTERM");

    int whole = 0, aborted = 0;
    for (int i = 0; i < BURST; i++) {
        raw = srv_read_all(fds[i], &len);
        srv_parse(raw, len, &r);
        close(fds[i]);
        const int o = outcome(i, &r, i % 2 == 0, max_tokens * n);
        srv_resp_free(&r);
        CHECK(o >= 0);
        whole += o == 1;
        aborted += o == 0;
    }
    fprintf(stderr, "burst of %d, --shutdown-timeout %s: %d whole, %d ended by the shutdown\n",
            BURST, grace_s, whole, aborted);
    if (graceful)
        CHECK_MSG(whole == BURST, "%d of %d requests were not answered in full", BURST - whole,
                  BURST);
    else
        CHECK_MSG(aborted > 0, "nothing was still running after 1 s: the burst is too small");
    int code = srv_stop_sig(&s, SIGTERM, 60);
    CHECK_MSG(code == 0, "exit status %d after SIGTERM", code);
    unlink(s.log);
}

int main(void) {
    const char *fx = ds_test_fixtures();
    if (!fx) return ds_test_skip_or_fail("golden fixtures missing");
    snprintf(g_model, sizeof g_model, "%.4000s/tiny-a", fx);
    test_graceful_shutdown();
    test_shutdown_abort();
    test_shutdown_burst("60", 100, 4, 1);
    test_shutdown_burst("1", 240, 4, 0);
    return ds_test_finish("test_server_shutdown");
}
