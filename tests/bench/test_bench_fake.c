/* `dsinfer bench` against a small fake OpenAI server in this process (plain sockets, a pool of
 * worker threads each serving one connection at a time, chunked SSE with delays it injects):
 *   - timing: the measured TTFT, every inter-token gap, E2EL and TPOT match the injected delays
 *     within a few milliseconds, for completions and for chat (whose role chunk, sent at once,
 *     is not a token); the requests carry what they should (model, max_tokens, stream,
 *     include_usage, ignore_eos, the API key); token counts come from usage, or from the
 *     tokenizer when the server sends no usage;
 *   - error paths, each counted as a failure with its reason: HTTP 400 and 503 (the OpenAI
 *     error message is quoted), a stream cut mid-way, malformed SSE, an error event, a stream
 *     without [DONE], a non-streamed answer, a timeout, connection refused;
 *   - a server that goes away mid-run: the run ends, the report says what completed and what
 *     was not sent; Poisson arrivals; usage errors. */
#include "testutil.h"
#include "cli/cli.h"
#include "tokenizer/tokenizer.h"

#include <arpa/inet.h>
#include <errno.h>
#include <math.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* ---- the fake server ------------------------------------------------------------------------ */
typedef enum {
    B_OK,       /* tokens with the injected delays, a finish chunk, usage, [DONE] */
    B_NOUSAGE,  /* the same without the usage chunk */
    B_400,      /* HTTP 400 with an OpenAI error body */
    B_503,      /* HTTP 503 with a plain text body */
    B_CUT,      /* two tokens, then the connection closes mid-stream */
    B_BADJSON,  /* one token, then an event that is not JSON */
    B_ERREVENT, /* one token, then data: {"error": ...} */
    B_NODONE,   /* tokens, then a clean end of the body without [DONE] */
    B_NOTSSE,   /* 200 with a whole JSON completion (ignores "stream") */
    B_STALL,    /* headers, then nothing for 3 s */
    B_DIE       /* one token, then the server closes its listener and the connection */
} behaviour;

#define N_TOK 6
static const double GAPS_MS[N_TOK - 1] = {20, 35, 20, 35, 20};
/* token texts as they appear in the JSON: one carries a NUL (a model may generate U+0000) */
static const char *WORDS[N_TOK] = {" alpha",        " beta",    " gamma",
                                   " del\\u0000ta", " epsilon", " zeta"};
static const char TEXT[] = " alpha beta gamma del\0ta epsilon zeta"; /* what they decode to */

static struct {
    int lfd, port;
    double ttft_ms, gap_scale; /* gaps are GAPS_MS x gap_scale */
    behaviour script[32];
    int n_script;
    behaviour dflt;
    atomic_int next;        /* requests seen */
    atomic_int bad_request; /* requests that did not carry what they should */
    atomic_int died;
    int expect_max_tokens;
    const char *expect_key; /* NULL: no Authorization header expected */
    /* what the server did for the request with X-Request-Id bench-<i>: when it had read it,
     * and when each token's send() returned (CLOCK_MONOTONIC, the client's clock too) */
    double t_read[64], t_sent[64][N_TOK];
} F;

static double mono(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void sleep_until(double t) {
    for (;;) {
        double d = t - mono();
        if (d <= 0) return;
        struct timespec ts = {(time_t)d, (long)((d - floor(d)) * 1e9)};
        nanosleep(&ts, NULL);
    }
}

static int send_all(int fd, const char *p, size_t n) {
    while (n) {
        ssize_t k = send(fd, p, n, MSG_NOSIGNAL);
        if (k <= 0) return -1;
        p += k, n -= (size_t)k;
    }
    return 0;
}

/* One SSE event as one HTTP chunk. */
static int chunk(int fd, const char *event) {
    char buf[2048];
    int n = snprintf(buf, sizeof buf, "%zx\r\n%s\r\n", strlen(event), event);
    return send_all(fd, buf, (size_t)n);
}

static void event_token(int fd, int chat, const char *text) {
    char ev[512];
    if (chat)
        snprintf(
            ev, sizeof ev,
            "data: {\"id\":\"x\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,"
            "\"delta\":{\"content\":\"%s\"},\"finish_reason\":null}]}\n\n",
            text);
    else
        snprintf(ev, sizeof ev,
                 "data: {\"id\":\"x\",\"object\":\"text_completion\",\"choices\":[{\"index\":0,"
                 "\"text\":\"%s\",\"finish_reason\":null}]}\n\n",
                 text);
    chunk(fd, ev);
}

/* Checks what a request carries; counts a bad one. */
static void check_request(const char *head, const char *body, size_t len, int *chat) {
    json_t *o = json_loadb(body, len, 0, NULL);
    json_t *ms = json_object_get(o, "messages");
    *chat = ms != NULL;
    const char *mk = *chat ? "max_completion_tokens" : "max_tokens";
    int ok = json_is_object(o) && json_is_true(json_object_get(o, "stream")) &&
             json_is_true(json_object_get(json_object_get(o, "stream_options"), "include_usage")) &&
             json_is_true(json_object_get(o, "ignore_eos")) &&
             json_string_value(json_object_get(o, "model")) &&
             !strcmp(json_string_value(json_object_get(o, "model")), "fake-model") &&
             json_integer_value(json_object_get(o, mk)) == F.expect_max_tokens &&
             (*chat ? json_is_string(json_object_get(json_array_get(ms, 0), "content"))
                    : json_is_string(json_object_get(o, "prompt")));
    if (F.expect_key) {
        char want[256];
        snprintf(want, sizeof want, "Authorization: Bearer %s\r\n", F.expect_key);
        ok &= strstr(head, want) != NULL;
    }
    if (!ok) {
        fprintf(stderr, "fake server: unexpected request: %.*s\n", (int)len, body);
        atomic_fetch_add(&F.bad_request, 1);
    }
    json_decref(o);
}

static void *serve_conn(void *arg) {
    int fd = (int)(intptr_t)arg;
    char buf[65536];
    size_t n = 0;
    char *end = NULL;
    while (!end && n < sizeof buf - 1) { /* headers */
        ssize_t k = recv(fd, buf + n, sizeof buf - 1 - n, 0);
        if (k <= 0) goto out;
        n += (size_t)k;
        buf[n] = 0;
        end = strstr(buf, "\r\n\r\n");
    }
    if (!end) goto out;
    size_t head = (size_t)(end - buf) + 4, clen = 0;
    for (char *h = buf; h < end; h = strstr(h, "\r\n") + 2)
        if (!strncasecmp(h, "Content-Length:", 15)) clen = strtoul(h + 15, NULL, 10);
    while (n < head + clen && n < sizeof buf - 1) { /* body */
        ssize_t k = recv(fd, buf + n, sizeof buf - 1 - n, 0);
        if (k <= 0) goto out;
        n += (size_t)k;
    }
    buf[n] = 0;
    double t0 = mono();
    int chat = 0, id = -1;
    const char *rid = strcasestr(buf, "\r\nX-Request-Id: bench-");
    if (rid && rid < end) id = atoi(rid + 22);
    if (id < 0 || id >= 64) id = -1;
    if (id >= 0) F.t_read[id] = t0;
    check_request(buf, buf + head, clen, &chat);
    int k = atomic_fetch_add(&F.next, 1);
    behaviour b = k < F.n_script ? F.script[k] : F.dflt;
    const char *sse_head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                           "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
    if (b == B_400) {
        const char *body = "{\"error\":{\"message\":\"bad prompt from fake\",\"type\":"
                           "\"invalid_request_error\",\"param\":null,\"code\":400}}";
        char r[512];
        int m = snprintf(r, sizeof r,
                         "HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n"
                         "Content-Length: %zu\r\nConnection: close\r\n\r\n%s",
                         strlen(body), body);
        send_all(fd, r, (size_t)m);
        goto out;
    }
    if (b == B_503) {
        const char *r = "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
                        "Content-Length: 11\r\nConnection: close\r\n\r\noverloaded\n";
        send_all(fd, r, strlen(r));
        goto out;
    }
    if (b == B_NOTSSE) {
        const char *body = "{\"id\":\"x\",\"object\":\"text_completion\",\"choices\":[{\"index\":0,"
                           "\"text\":\" whole\",\"finish_reason\":\"length\"}]}";
        char r[512];
        int m = snprintf(r, sizeof r,
                         "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         "Content-Length: %zu\r\nConnection: close\r\n\r\n%s",
                         strlen(body), body);
        send_all(fd, r, (size_t)m);
        goto out;
    }
    send_all(fd, sse_head, strlen(sse_head));
    if (b == B_STALL) {
        sleep_until(t0 + 3.0);
        goto out;
    }
    if (chat) /* the role chunk goes at once, as dsinfer serve and vLLM send it: not a token */
        chunk(fd,
              "data: {\"id\":\"x\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,"
              "\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}]}\n\n");
    int n_tok = b == B_CUT ? 2 : b == B_BADJSON || b == B_ERREVENT || b == B_DIE ? 1 : N_TOK;
    double due = t0 + F.ttft_ms / 1000.0; /* an absolute schedule: no drift */
    for (int i = 0; i < n_tok; i++) {
        if (i) due += GAPS_MS[i - 1] * F.gap_scale / 1000.0;
        sleep_until(due);
        event_token(fd, chat, WORDS[i]);
        if (id >= 0) F.t_sent[id][i] = mono();
    }
    if (b == B_CUT) goto out; /* no terminating chunk: the stream is cut */
    if (b == B_DIE) {
        atomic_store(&F.died, 1);
        shutdown(F.lfd, SHUT_RDWR); /* new connections are refused from now on */
        close(F.lfd);
        goto out;
    }
    if (b == B_BADJSON) {
        chunk(fd, "data: {\"choices\": [{\"text\": \"oops\"\n\n");
    } else if (b == B_ERREVENT) {
        chunk(fd,
              "data: {\"error\":{\"message\":\"engine exploded\",\"type\":\"server_error\"}}\n\n");
    } else {
        chunk(fd,
              chat
                  ? "data: "
                    "{\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"length\"}]}\n\n"
                  : "data: "
                    "{\"choices\":[{\"index\":0,\"text\":\"\",\"finish_reason\":\"length\"}]}\n\n");
        if (b != B_NOUSAGE) {
            char ev[256];
            snprintf(
                ev, sizeof ev,
                "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":%d,\"completion_tokens\":%d,"
                "\"total_tokens\":%d}}\n\n",
                1000 + k, N_TOK, 1000 + k + N_TOK);
            chunk(fd, ev);
        }
        if (b != B_NODONE) chunk(fd, ": a comment\n\ndata: [DONE]\n\n");
    }
    send_all(fd, "0\r\n\r\n", 5);
out:
    close(fd);
    return NULL;
}

/* A worker: accepts on the listener it was started for and serves each connection itself, so
 * no thread is started between a client's connect and its answer. Ends when the listener is
 * closed (accept fails). */
static void *worker(void *arg) {
    int lfd = (int)(intptr_t)arg;
    for (;;) {
        int fd = accept(lfd, NULL, NULL);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED) continue;
            return NULL;
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        serve_conn((void *)(intptr_t)fd);
    }
}

/* A listening socket on 127.0.0.1 (port 0: any); its port in *port. */
static int listen_on(int *port) {
    int fd = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t al = sizeof a;
    if (bind(fd, (struct sockaddr *)&a, sizeof a) || listen(fd, 512) ||
        getsockname(fd, (struct sockaddr *)&a, &al)) {
        close(fd);
        return -1;
    }
    *port = ntohs(a.sin_port);
    return fd;
}

static int fake_start(double ttft_ms, const behaviour *script, int n, behaviour dflt,
                      int max_tokens, const char *key) {
    F.ttft_ms = ttft_ms;
    F.gap_scale = ttft_ms >= 60 ? 1 : 0.05; /* the timing runs, or quick ones */
    F.n_script = n;
    for (int i = 0; i < n; i++) F.script[i] = script[i];
    F.dflt = dflt;
    F.expect_max_tokens = max_tokens;
    F.expect_key = key;
    atomic_store(&F.next, 0);
    atomic_store(&F.died, 0);
    F.lfd = listen_on(&F.port);
    if (F.lfd < 0) return -1;
    for (int i = 0; i < 12; i++) { /* more than the connections any run here has open */
        pthread_t th;
        if (pthread_create(&th, NULL, worker, (void *)(intptr_t)F.lfd)) return -1;
        pthread_detach(th);
    }
    return 0;
}

static void fake_stop(void) {
    if (!atomic_load(&F.died)) {
        shutdown(F.lfd, SHUT_RDWR);
        close(F.lfd);
    }
    usleep(20000); /* let the workers see it */
}

/* ---- running the command -------------------------------------------------------------------- */
static char tok_dir[4096], tmp_json[4200];

/* Runs dsinfer bench against the fake server with extra args; returns the parsed result JSON
 * (NULL when none) and the stdout / status. */
static json_t *bench(const char *args, char **out, int *status) {
    char cmd[16384];
    unlink(tmp_json);
    snprintf(cmd, sizeof cmd,
             "'%s' bench --port %d --model fake-model --tokenizer '%s' --result-json '%s' %s",
             DSINFER_BIN, F.port, tok_dir, tmp_json, args);
    *out = ds_test_run(cmd, status);
    return json_load_file(tmp_json, JSON_ALLOW_NUL, NULL);
}

static double jnum(const json_t *o, const char *k) {
    const json_t *v = json_object_get(o, k);
    return json_is_number(v) ? json_number_value(v) : NAN;
}
static double jat(const json_t *o, const char *k, size_t i) {
    const json_t *v = json_array_get(json_object_get(o, k), i);
    return json_is_number(v) ? json_number_value(v) : NAN;
}
static const char *jstr_at(const json_t *o, const char *k, size_t i) {
    const char *s = json_string_value(json_array_get(json_object_get(o, k), i));
    return s ? s : "";
}

/* The request's way to the server, on a loaded machine: a few ms, ~10 ms under ASan, whose
 * libc interceptors slow the connection setup of every request (sanitizer builds run the
 * client and this server instrumented, side by side with other tests). */
#if defined(__SANITIZE_ADDRESS__)
#define SLACK_MS 30.0
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define SLACK_MS 30.0
#endif
#endif
#ifndef SLACK_MS
#define SLACK_MS 8.0
#endif

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double *x, int n) {
    qsort(x, (size_t)n, sizeof *x, cmp_double);
    return n ? (n % 2 ? x[n / 2] : (x[n / 2 - 1] + x[n / 2]) / 2) : NAN;
}

/* The measured figures of requests 0..n-1 against
 *   - what the server did, on the same clock (its read of the request, each token's send()):
 *     the client's gaps are the server's to a fraction of a millisecond, and its TTFT exceeds the
 *     server's only by the request's way there (connect, send) and the token's way back;
 *   - the delays injected: TTFT 60 ms, the gaps GAPS_MS, E2EL their sum, within a few ms.
 * A loaded machine (ctest -j, a shared VM) delays some wake-ups, of the client and of the
 * server's threads (whose stamps are then late), by milliseconds, so the precision is asserted
 * on medians; single values must never be earlier than the injected delays allow and never be
 * off by more than a scheduling hiccup. */
static void check_timing(const json_t *j, int n, const char *what) {
    const double hiccup = 100;
    double ttfts[64], over[64], e_srv[64 * N_TOK], e_inj[64 * N_TOK];
    int n_gaps = 0;
    double e2el_want = 60;
    for (int k = 0; k < N_TOK - 1; k++) e2el_want += GAPS_MS[k];
    for (int i = 0; i < n && i < 64; i++) {
        double ttft = jat(j, "ttfts", (size_t)i) * 1e3, lat = jat(j, "latencies", (size_t)i) * 1e3;
        double srv_ttft = (F.t_sent[i][0] - F.t_read[i]) * 1e3;
        ttfts[i] = ttft;
        over[i] = ttft - srv_ttft;
        CHECK_MSG(fabs(over[i]) <= hiccup, /* the server's stamps can be late too */
                  "%s: request %d: TTFT %.3f ms, the server's %.3f", what, i, ttft, srv_ttft);
        CHECK_MSG(ttft >= 60 - 0.05 && ttft <= 60 + hiccup,
                  "%s: request %d TTFT %.3f ms, injected 60", what, i, ttft);
        CHECK_MSG(lat >= e2el_want - 0.05 && lat <= e2el_want + hiccup,
                  "%s: request %d E2EL %.3f ms, injected %.0f", what, i, lat, e2el_want);
        CHECK_NEAR(jat(j, "tpots", (size_t)i) * 1e3,
                   (lat - ttft) / (jat(j, "output_lens", (size_t)i) - 1), 1e-6);
        const json_t *g = json_array_get(json_object_get(j, "itls"), (size_t)i);
        CHECK_MSG(json_array_size(g) == N_TOK - 1, "%s: request %d has %zu gaps", what, i,
                  json_array_size(g));
        for (size_t k = 0; k < json_array_size(g) && k < N_TOK - 1; k++) {
            double gap = json_number_value(json_array_get(g, k)) * 1e3;
            double srv = (F.t_sent[i][k + 1] - F.t_sent[i][k]) * 1e3;
            e_srv[n_gaps] = fabs(gap - srv);
            e_inj[n_gaps] = fabs(gap - GAPS_MS[k]);
            CHECK_MSG(e_inj[n_gaps] <= hiccup, "%s: request %d gap %zu: %.3f ms, injected %.0f",
                      what, i, k, gap, GAPS_MS[k]);
            n_gaps++;
        }
    }
    double m_ttft = median(ttfts, n), m_over = median(over, n), max_over = over[n - 1];
    double m_srv = median(e_srv, n_gaps), max_srv = e_srv[n_gaps - 1];
    double m_inj = median(e_inj, n_gaps);
    printf("%s: TTFT median %.3f ms (injected 60; %.3f ms over the server's own, %.3f at most); "
           "gaps off the server's by %.3f ms (median; %.3f at most), off the injected by %.3f\n",
           what, m_ttft, m_over, max_over, m_srv, max_srv, m_inj);
    /* the way there: this server closes each connection after its answer, so every request
     * opens one, which costs libcurl 0.3-2 ms of CPU before the request leaves (0.05-0.5 ms on
     * a kept-alive connection to dsinfer serve); more on a loaded machine or under ASan */
    CHECK_MSG(m_over <= SLACK_MS, "%s: TTFT %.3f ms over the server's (median)", what, m_over);
    CHECK_MSG(m_ttft >= 60 && m_ttft <= 60 + SLACK_MS, "%s: median TTFT %.3f ms", what, m_ttft);
    CHECK_MSG(m_srv <= 1, "%s: gaps off the server's by %.3f ms (median)", what, m_srv);
    CHECK_MSG(m_inj <= 5, "%s: gaps off the injected by %.3f ms (median)", what, m_inj);
    CHECK_NEAR(jnum(j, "mean_itl_ms"), 26, 5); /* (20+35+20+35+20)/5 */
}

/* A copy of the tokenizer with the vocabulary cut to its first 8000 ids (plus every
 * one-character token: the byte alphabet) and the merges among those: it loads in a few ms
 * instead of ~0.4 s, which every run of the command here would pay. */
static int small_tokenizer(const char *src, const char *dst) {
    char path[4300];
    snprintf(path, sizeof path, "%s/tokenizer.json", src);
    json_t *root = json_load_file(path, 0, NULL);
    json_t *model = json_object_get(root, "model");
    json_t *vocab = json_object_get(model, "vocab"), *merges = json_object_get(model, "merges");
    if (!json_is_object(vocab) || !json_is_array(merges)) {
        json_decref(root);
        return -1;
    }
    json_t *nv = json_object(), *nm = json_array();
    const char *key;
    json_t *val;
    json_object_foreach(vocab, key, val) {
        size_t chars = 0;
        for (const char *c = key; *c; c++) chars += ((unsigned char)*c & 0xc0) != 0x80;
        if (json_integer_value(val) < 8000 || chars == 1) json_object_set(nv, key, val);
    }
    size_t i;
    json_t *m;
    json_array_foreach(merges, i, m) {
        char a[512], b[512], cat[1024];
        if (json_is_string(m)) {
            const char *sp = strchr(json_string_value(m), ' ');
            if (!sp) continue;
            snprintf(a, sizeof a, "%.*s", (int)(sp - json_string_value(m)), json_string_value(m));
            snprintf(b, sizeof b, "%s", sp + 1);
        } else {
            snprintf(a, sizeof a, "%s", json_string_value(json_array_get(m, 0)));
            snprintf(b, sizeof b, "%s", json_string_value(json_array_get(m, 1)));
        }
        snprintf(cat, sizeof cat, "%s%s", a, b);
        if (json_object_get(nv, a) && json_object_get(nv, b) && json_object_get(nv, cat))
            json_array_append(nm, m);
    }
    json_object_set_new(model, "vocab", nv);
    json_object_set_new(model, "merges", nm);
    snprintf(path, sizeof path, "%s/tokenizer.json", dst);
    int rc = json_dump_file(root, path, JSON_COMPACT);
    json_decref(root);
    char cmd[9000];
    snprintf(cmd, sizeof cmd, "cp '%s/tokenizer_config.json' '%s/'", src, dst);
    if (!rc && system(cmd)) rc = -1;
    return rc;
}

static int32_t count_tokens(const ds_tokenizer *t, const char *s, size_t len) {
    int32_t *ids = NULL;
    size_t n = 0;
    ds_tok_encode(t, s, len, 0, &ids, &n);
    free(ids);
    return (int32_t)n;
}

int main(void) {
    const char *fx = getenv("DSINFER_FIXTURES");
    snprintf(tok_dir, sizeof tok_dir, "%s/tiny-a", fx && *fx ? fx : DSINFER_FIXTURES_DEFAULT);
    char probe[4200];
    snprintf(probe, sizeof probe, "%s/tokenizer.json", tok_dir);
    if (access(probe, R_OK))
        snprintf(tok_dir, sizeof tok_dir, "%s", ds_cli_default_tokenizer_dir());
    char *tmp = ds_test_tmpdir();
    if (!tmp) return 1;
    if (small_tokenizer(tok_dir, tmp)) {
        ds_test_rmtree(tmp);
        return ds_test_skip_or_fail("the DeepSeek tokenizer is missing");
    }
    snprintf(tok_dir, sizeof tok_dir, "%s", tmp);
    ds_tokenizer *tok = NULL;
    CHECK_MSG(ds_tok_open(tok_dir, &tok) == 0, "the cut tokenizer: %s", ds_err_msg());
    if (!tok) return ds_test_finish("test_bench_fake");
    snprintf(tmp_json, sizeof tmp_json, "%s/result.json", tmp);
    char *out = NULL;
    int st;
    json_t *j;

    /* 1. timing, completions: 8 requests, 4 at a time; one without usage */
    behaviour s1[] = {B_OK, B_OK, B_NOUSAGE};
    CHECK(fake_start(60, s1, 3, B_OK, 7, "sekret") == 0);
    j = bench("--parallel-num 4 --num-prompts 8 --prompt-tokens 20 --output-tokens 7 "
              "--api-key sekret",
              &out, &st);
    CHECK_MSG(st == 0, "status %d, output:\n%s", st, out ? out : "");
    CHECK(j != NULL);
    if (j) {
        CHECK(jnum(j, "completed") == 8 && jnum(j, "failed") == 0);
        check_timing(j, 8, "completions");
        int no_usage = 0;
        for (int i = 0; i < 8; i++) {
            const json_t *gt = json_array_get(json_object_get(j, "generated_texts"), (size_t)i);
            CHECK(json_string_length(gt) == sizeof TEXT - 1 &&
                  !memcmp(json_string_value(gt), TEXT, sizeof TEXT - 1));
            if (json_is_null(
                    json_array_get(json_object_get(j, "usage_completion_tokens"), (size_t)i))) {
                no_usage++; /* counted by the tokenizer, input from the prompt */
                CHECK(jat(j, "output_lens", (size_t)i) == count_tokens(tok, TEXT, sizeof TEXT - 1));
                CHECK(jat(j, "input_lens", (size_t)i) == 20);
            } else {
                CHECK(jat(j, "output_lens", (size_t)i) == N_TOK);
                CHECK(jat(j, "input_lens", (size_t)i) >= 1000); /* the server's usage wins */
            }
            CHECK(jat(j, "chunk_counts", (size_t)i) == N_TOK);
            CHECK(!strcmp(jstr_at(j, "finish_reasons", (size_t)i), "length"));
        }
        CHECK(no_usage == 1);
        CHECK(jnum(j, "max_concurrent_requests") == 4);
        CHECK(jnum(j, "max_concurrency") == 4);
    }
    CHECK(atomic_load(&F.bad_request) == 0);
    json_decref(j);
    free(out);
    fake_stop();

    /* 2. timing, chat: the role chunk sent at once must not count as the first token */
    CHECK(fake_start(60, NULL, 0, B_OK, 5, NULL) == 0);
    j = bench("--backend openai-chat --parallel-num 3 --epochs 2 --prompt-tokens 30 "
              "--output-tokens 5",
              &out, &st);
    CHECK_MSG(st == 0, "status %d, output:\n%s", st, out ? out : "");
    if (j) {
        CHECK(jnum(j, "completed") == 6);
        check_timing(j, 6, "chat");
        CHECK(!strcmp(json_string_value(json_object_get(j, "backend")), "openai-chat"));
    }
    CHECK(atomic_load(&F.bad_request) == 0);
    json_decref(j);
    free(out);
    fake_stop();

    /* 3. error paths, one request at a time so each has its place */
    behaviour s3[] = {B_OK,       B_400,    B_503,    B_CUT,   B_BADJSON,
                      B_ERREVENT, B_NODONE, B_NOTSSE, B_STALL, B_OK};
    CHECK(fake_start(5, s3, 10, B_OK, 3, NULL) == 0);
    j = bench("--parallel-num 1 --num-prompts 10 --prompt-tokens 8 --output-tokens 3 "
              "--timeout 0.5",
              &out, &st);
    CHECK_MSG(st == 1, "status %d", st);
    const char *want[] = {"",
                          "HTTP 400: bad prompt from fake",
                          "HTTP 503: overloaded",
                          "stream cut: ",
                          "malformed SSE event: invalid JSON",
                          "error event in the stream: engine exploded",
                          "stream ended without data: [DONE]",
                          "not an SSE stream: the answer is application/json",
                          "timed out after 0.5 s",
                          ""};
    if (j) {
        CHECK(jnum(j, "completed") == 2 && jnum(j, "failed") == 8);
        for (int i = 0; i < 10; i++) {
            const char *e = jstr_at(j, "errors", (size_t)i);
            CHECK_MSG(want[i][0] ? strstr(e, want[i]) == e : !*e, "request %d: error '%s'", i, e);
            if (want[i][0] && out) /* and in the printed summary */
                CHECK_MSG(strstr(out, e) != NULL, "'%s' not in the summary", e);
        }
        CHECK(jat(j, "http_statuses", 1) == 400 && jat(j, "http_statuses", 2) == 503);
        CHECK(jat(j, "chunk_counts", 3) == 2); /* the cut stream's tokens are recorded */
        CHECK(jat(j, "ttfts", 3) > 0);
        CHECK(jat(j, "output_lens", 3) == 0); /* but a failure counts no output */
        CHECK(jnum(j, "total_output_tokens") == 2 * N_TOK);
        CHECK(json_array_size(json_object_get(j, "failure_reasons")) == 8);
    }
    CHECK(out && strstr(out, "Failed requests:                         8\n"));
    CHECK(out && strstr(out, "Failed requests by reason:"));
    json_decref(j);
    free(out);
    fake_stop();

    /* 4. connection refused: the first request fails, nothing more is sent */
    int dead_port, dfd = listen_on(&dead_port);
    close(dfd);
    F.port = dead_port;
    j = bench("--parallel-num 1 --num-prompts 3 --prompt-tokens 8 --output-tokens 3", &out, &st);
    CHECK(st == 1);
    if (j) {
        CHECK(jnum(j, "completed") == 0 && jnum(j, "failed") == 3 && jnum(j, "not_sent") == 2);
        CHECK_MSG(strstr(jstr_at(j, "errors", 0), "cannot connect: Connection refused"), "%s",
                  jstr_at(j, "errors", 0));
        CHECK(strstr(jstr_at(j, "errors", 1), "not sent: the server stopped accepting"));
        CHECK(json_is_string(json_object_get(j, "abort_reason")));
    }
    CHECK(out && strstr(out, "Run ended early: the server stopped accepting connections"));
    CHECK(out && strstr(out, "Requests not sent:                       2\n"));
    json_decref(j);
    free(out);

    /* 5. the server goes away in the middle of request 2 (one client, closed loop) */
    behaviour s5[] = {B_OK, B_OK, B_DIE};
    CHECK(fake_start(5, s5, 3, B_OK, 3, NULL) == 0);
    j = bench("--parallel-num 1 --num-prompts 7 --prompt-tokens 8 --output-tokens 3", &out, &st);
    CHECK(st == 1);
    if (j) {
        CHECK(jnum(j, "completed") == 2 && jnum(j, "failed") == 5 && jnum(j, "not_sent") == 3);
        CHECK(strstr(jstr_at(j, "errors", 2), "stream cut: ") == jstr_at(j, "errors", 2));
        CHECK(strstr(jstr_at(j, "errors", 3), "cannot connect: "));
        for (int i = 4; i < 7; i++) CHECK(strstr(jstr_at(j, "errors", (size_t)i), "not sent: "));
        CHECK(json_is_false(json_array_get(json_object_get(j, "sent"), 4)));
    }
    CHECK(out && strstr(out, "Run ended early:") &&
          strstr(out, "2 of 7 requests completed, 3 not sent"));
    json_decref(j);
    free(out);
    fake_stop();

    /* 6. Poisson arrivals at 40/s without a cap: sends spread over time, none queued */
    CHECK(fake_start(2, NULL, 0, B_OK, 2, NULL) == 0);
    j = bench("--request-rate 40 --num-prompts 12 --prompt-tokens 8 --output-tokens 2 --seed 3",
              &out, &st);
    CHECK(st == 0);
    if (j) {
        double last = jat(j, "start_times", 11), prev = -1;
        for (int i = 0; i < 12; i++) {
            double s = jat(j, "start_times", (size_t)i);
            CHECK(s >= prev);
            prev = s;
            CHECK(jat(j, "queue_times", (size_t)i) < 0.1); /* no limit: no wait but the loop's */
        }
        /* 11 exponential gaps of mean 25 ms: far from 0 and from 1 s */
        CHECK_MSG(last > 0.05 && last < 1.0, "last send at %.3f s", last);
        CHECK(jnum(j, "request_rate") == 40);
        CHECK(json_is_null(json_object_get(j, "max_concurrency")));
    }
    CHECK(out && strstr(out, "Request rate configured (RPS):           40.00"));
    json_decref(j);
    free(out);
    fake_stop();

    /* 7. Ctrl-C: requests in flight are abandoned, the rest not sent, the summary printed */
    CHECK(fake_start(5, NULL, 0, B_STALL, 3, NULL) == 0);
    {
        int fds[2];
        CHECK(pipe(fds) == 0);
        char port_s[16];
        snprintf(port_s, sizeof port_s, "%d", F.port);
        unlink(tmp_json);
        pid_t pid = fork();
        if (pid == 0) {
            dup2(fds[1], 1);
            close(fds[0]);
            execl(DSINFER_BIN, DSINFER_BIN, "bench", "--port", port_s, "--model", "fake-model",
                  "--tokenizer", tok_dir, "--result-json", tmp_json, "--parallel-num", "2",
                  "--num-prompts", "5", "--prompt-tokens", "8", "--output-tokens", "3",
                  (char *)NULL);
            _exit(127);
        }
        close(fds[1]);
        for (int i = 0; i < 100 && atomic_load(&F.next) < 2; i++) usleep(20000);
        usleep(50000);
        kill(pid, SIGINT);
        char buf[8192];
        size_t n = 0;
        ssize_t k;
        while (n < sizeof buf - 1 && (k = read(fds[0], buf + n, sizeof buf - 1 - n)) > 0)
            n += (size_t)k;
        buf[n] = 0;
        close(fds[0]);
        waitpid(pid, &st, 0);
        CHECK_MSG(WIFEXITED(st) && WEXITSTATUS(st) == 1, "status %d", st);
        CHECK(strstr(buf, "Run ended early: interrupted; 0 of 5 requests completed, 3 not sent"));
        j = json_load_file(tmp_json, JSON_ALLOW_NUL, NULL);
        CHECK(j != NULL);
        if (j) {
            CHECK(jnum(j, "failed") == 5 && jnum(j, "not_sent") == 3);
            for (int i = 0; i < 5; i++)
                CHECK(!strcmp(jstr_at(j, "errors", (size_t)i),
                              i < 2 ? "interrupted before the answer was complete"
                                    : "not sent: interrupted"));
        }
        json_decref(j);
    }
    fake_stop();

    /* 8. usage errors */
    const char *bad[] = {"--num-prompts 3 --epochs 2",
                         "--backend tgi",
                         "--parallel-num -1",
                         "--request-rate 0",
                         "--request-rate 2 --parallel-num 0 --epochs 2",
                         "--prompt-tokens x",
                         "stray"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char cmd[1024];
        snprintf(cmd, sizeof cmd, "'%s' bench %s 2>/dev/null", DSINFER_BIN, bad[i]);
        free(ds_test_run(cmd, &st));
        CHECK_MSG(st == 2, "'%s': status %d", bad[i], st);
    }
    /* the model name from GET /v1/models fails clearly when nothing listens */
    char cmd[8192];
    snprintf(cmd, sizeof cmd, "'%s' bench --port %d --tokenizer '%s' 2>&1", DSINFER_BIN, dead_port,
             tok_dir);
    out = ds_test_run(cmd, &st);
    CHECK(st == 1 && out && strstr(out, "cannot ask the server for its model name"));
    free(out);

    ds_tok_close(tok);
    ds_test_rmtree(tmp);
    free(tmp);
    return ds_test_finish("test_bench_fake");
}
