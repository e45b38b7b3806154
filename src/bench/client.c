/* client: one thread, libcurl's multi interface, every request a stream.
 *
 * The loop (as redis-benchmark runs its clients on one event loop):
 *   launch what may start -> wait for sockets or the next arrival (curl_multi_poll) ->
 *   curl_multi_perform (reads every ready socket, calling on_write with the bytes) ->
 *   finish the transfers that ended -> launch again.
 * A request may start when there is a free slot (max_concurrency; 0 = unlimited) and it has
 * "arrived": with request_rate inf every request has arrived at time 0, so max_concurrency
 * clients run a closed loop (a finished request is replaced at once); with a finite rate the
 * arrivals are a Poisson process (exponential gaps, seeded) and a request that arrives while
 * every slot is busy waits (its queue time is recorded, not counted in its latency).
 *
 * Timing: a request's clock starts just before its handle joins the multi handle; every SSE
 * event is stamped with the time its bytes were handed to on_write, which runs right after the
 * socket read. So TTFT and ITL include the network and HTTP parsing, as a client sees them,
 * and nothing of this loop's own bookkeeping except the time to walk the ready sockets.
 *
 * Failures: whatever goes wrong with one request (HTTP status, transport error, a cut or
 * malformed stream, an error event, a stream without [DONE]) is recorded as its reason and the
 * run goes on. A refused connection means the server is gone: nothing more is sent, requests
 * in flight finish, and the rest are recorded as not sent, so the report says what completed. */
#include "bench/bench.h"

#include <curl/curl.h>
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define ERR_BODY_MAX 4096 /* bytes of a non-2xx answer kept for its message */

typedef struct run run;

/* One request in flight. */
typedef struct req {
    run *run;
    int32_t idx;
    CURL *h;
    char *body;                 /* the JSON request body (owned) */
    struct curl_slist *headers; /* the run's headers + X-Request-Id (owned) */
    ds_sse sse;
    ds_buf err_body; /* the start of a non-2xx answer */
    long status;     /* HTTP status once known */
    int done;        /* data: [DONE] seen */
    char *fail;      /* a failure found while reading (owned) */
    double t_send;   /* absolute (ds_now) */
    double now;      /* the time of the bytes being parsed */
    struct req *prev, *next;
    char errbuf[CURL_ERROR_SIZE];
} req;

struct run {
    const ds_bench_params *p;
    const ds_bench_prompt *prompts;
    ds_bench_result *res;
    CURLM *multi;
    struct curl_slist *headers;
    double t0; /* the run's start (ds_now) */
    req *live; /* requests in flight */
    int32_t in_flight, peak;
    char *stop; /* set: launch nothing more (owned reason) */
};

ds_bench_params ds_bench_default_params(void) {
    ds_bench_params p;
    memset(&p, 0, sizeof p);
    p.model = "";
    p.backend = DS_BENCH_COMPLETIONS;
    p.max_concurrency = 1;
    p.request_rate = INFINITY;
    p.timeout_s = 6 * 3600; /* vLLM's aiohttp timeout */
    p.ignore_eos = 1;
    return p;
}

void ds_bench_result_free(ds_bench_result *r) {
    if (!r) return;
    free(r->error);
    free(r->itl);
    free(r->chunk_times);
    free(r->finish_reason);
    ds_buf_free(&r->text);
    memset(r, 0, sizeof *r);
}

void ds_bench_run_info_free(ds_bench_run_info *info) {
    if (!info) return;
    free(info->abort_reason);
    info->abort_reason = NULL;
}

static char *dupf(const char *fmt, ...) DS_PRINTF(1, 2);
static char *dupf(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    char *s = NULL;
    if (vasprintf(&s, fmt, ap) < 0) s = NULL;
    va_end(ap);
    return s;
}

/* Records the first failure of q (later ones are consequences of it). */
static void set_fail(req *q, char *msg) {
    if (q->fail || !msg) {
        free(msg);
        return;
    }
    q->fail = msg;
}

/* A short, printable excerpt of untrusted bytes for a message. */
static void excerpt(const char *s, size_t n, char *out, size_t cap) {
    size_t k = 0;
    for (size_t i = 0; i < n && k + 4 < cap; i++) {
        unsigned char c = (unsigned char)s[i];
        out[k++] = c < 0x20 || c == 0x7f ? ' ' : (char)c;
    }
    if (n && k + 4 >= cap) memcpy(out + k, "...", 3), k += 3;
    out[k] = 0;
}

static int grow(double **a, int32_t n, int32_t *cap) {
    if (n < *cap) return 0;
    int32_t nc = *cap ? *cap * 2 : 64;
    double *g = realloc(*a, (size_t)nc * sizeof *g);
    if (!g) return -1;
    *a = g, *cap = nc;
    return 0;
}

/* One SSE event of a 2xx stream. Non-zero stops the transfer (the failure is in q->fail). */
static int on_event(void *ctx, const char *data, size_t len) {
    req *q = ctx;
    ds_bench_result *r = &q->run->res[q->idx];
    if (q->done) return 0; /* after [DONE]: nothing counts */
    if (len == 6 && !memcmp(data, "[DONE]", 6)) {
        q->done = 1;
        return 0;
    }
    char ex[96];
    json_error_t je;
    json_t *o = json_loadb(data, len, JSON_ALLOW_NUL, &je); /* a model may generate U+0000 */
    if (!o || !json_is_object(o)) {
        excerpt(data, len, ex, sizeof ex);
        set_fail(q, o ? dupf("malformed SSE event: not a JSON object: '%s'", ex)
                      : dupf("malformed SSE event: invalid JSON (%s): '%s'", je.text, ex));
        json_decref(o);
        return -1;
    }
    json_t *err = json_object_get(o, "error");
    if (err && !json_is_null(err)) {
        const char *m = json_string_value(json_object_get(err, "message"));
        if (!m) m = json_string_value(err);
        excerpt(m ? m : data, m ? strlen(m) : len, ex, sizeof ex);
        set_fail(q, dupf("error event in the stream: %s", ex));
        json_decref(o);
        return -1;
    }
    json_t *choices = json_object_get(o, "choices");
    json_t *c0 = json_is_array(choices) ? json_array_get(choices, 0) : NULL;
    if (c0) {
        /* completions carry "text"; chat a "delta" with content and/or reasoning_content */
        const json_t *parts[3] = {json_object_get(c0, "text"), NULL, NULL};
        json_t *delta = json_object_get(c0, "delta");
        if (json_is_object(delta)) {
            parts[1] = json_object_get(delta, "reasoning_content");
            parts[2] = json_object_get(delta, "content");
        }
        size_t got = 0;
        for (int k = 0; k < 3; k++) {
            size_t pl = json_string_length(parts[k]); /* 0 unless a non-empty string */
            if (!pl) continue;
            if (ds_buf_append(&r->text, json_string_value(parts[k]), pl)) {
                set_fail(q, dupf("out of memory"));
                json_decref(o);
                return -1;
            }
            got += pl;
        }
        if (got) { /* a token chunk */
            if (grow(&r->chunk_times, r->chunks, &r->cap_chunks)) {
                set_fail(q, dupf("out of memory"));
                json_decref(o);
                return -1;
            }
            r->chunk_times[r->chunks++] = q->now - q->run->t0;
        }
        const char *fr = json_string_value(json_object_get(c0, "finish_reason"));
        if (fr) {
            free(r->finish_reason);
            r->finish_reason = strdup(fr);
        }
    }
    json_t *u = json_object_get(o, "usage");
    if (json_is_object(u)) {
        json_t *pt = json_object_get(u, "prompt_tokens"),
               *ct = json_object_get(u, "completion_tokens");
        if (json_is_integer(pt)) r->usage_prompt_tokens = (int32_t)json_integer_value(pt);
        if (json_is_integer(ct)) r->usage_completion_tokens = (int32_t)json_integer_value(ct);
    }
    json_decref(o);
    return 0;
}

static size_t on_write(char *ptr, size_t size, size_t nmemb, void *ud) {
    req *q = ud;
    size_t n = size * nmemb;
    q->now = ds_now();
    if (!q->status) curl_easy_getinfo(q->h, CURLINFO_RESPONSE_CODE, &q->status);
    if (q->status < 200 || q->status > 299) { /* keep the start of the error body */
        size_t room = ERR_BODY_MAX - q->err_body.len;
        if (room && ds_buf_append(&q->err_body, ptr, n < room ? n : room)) return 0;
        return n;
    }
    int rc = ds_sse_feed(&q->sse, ptr, n, on_event, q);
    if (rc) {
        if (!q->fail) set_fail(q, dupf("malformed SSE stream: %s", ds_err_msg()));
        return 0; /* aborts the transfer (CURLE_WRITE_ERROR); the reason is q->fail */
    }
    return n;
}

/* The message of a non-2xx answer: OpenAI's error.message, FastAPI's detail, or the text. */
static char *http_error(req *q) {
    const char *b = q->err_body.data ? q->err_body.data : "";
    size_t n = q->err_body.len;
    char ex[160];
    json_t *o = json_loadb(b, n, 0, NULL);
    const char *m = NULL;
    if (json_is_object(o)) {
        json_t *e = json_object_get(o, "error");
        m = json_string_value(json_object_get(e, "message"));
        if (!m) m = json_string_value(e);
        if (!m) m = json_string_value(json_object_get(o, "message"));
        if (!m) m = json_string_value(json_object_get(o, "detail"));
    }
    while (!m && n && (*b == ' ' || *b == '\n' || *b == '\r' || *b == '\t')) b++, n--;
    while (!m && n && (b[n - 1] == ' ' || b[n - 1] == '\n' || b[n - 1] == '\r')) n--;
    if (m)
        excerpt(m, strlen(m), ex, sizeof ex);
    else if (n)
        excerpt(b, n, ex, sizeof ex);
    else
        snprintf(ex, sizeof ex, "(empty body)");
    json_decref(o);
    return dupf("HTTP %ld: %s", q->status, ex);
}

/* The request body of prompt i; malloc'd JSON or NULL. */
static char *make_body(const run *R, int32_t i) {
    const ds_bench_params *p = R->p;
    const ds_bench_prompt *pr = &R->prompts[i];
    json_t *o = json_object();
    if (!o) return NULL;
    json_object_set_new(o, "model", json_string(p->model ? p->model : ""));
    if (p->backend == DS_BENCH_CHAT) {
        json_t *msgs =
            pr->messages ? json_incref(pr->messages) : json_pack("[{s:s}]", "role", "user");
        if (!pr->messages && msgs)
            json_object_set_new(json_array_get(msgs, 0), "content",
                                json_string(pr->text ? pr->text : ""));
        json_object_set_new(o, "messages", msgs);
        json_object_set_new(o, "max_completion_tokens", json_integer(pr->max_tokens));
    } else {
        json_object_set_new(o, "prompt", json_string(pr->text ? pr->text : ""));
        json_object_set_new(o, "max_tokens", json_integer(pr->max_tokens));
    }
    json_object_set_new(o, "temperature", json_real(0.0));
    json_object_set_new(o, "stream", json_true());
    json_object_set_new(o, "stream_options", json_pack("{s:b}", "include_usage", 1));
    if (p->ignore_eos) json_object_set_new(o, "ignore_eos", json_true());
    char *s = json_dumps(o, JSON_COMPACT);
    json_decref(o);
    return s;
}

static void req_free(req *q) {
    if (!q) return;
    if (q->h) curl_easy_cleanup(q->h);
    curl_slist_free_all(q->headers);
    free(q->body);
    ds_sse_free(&q->sse);
    ds_buf_free(&q->err_body);
    free(q->fail);
    free(q);
}

static void stop_run(run *R, char *why) {
    if (R->stop || !why) {
        free(why);
        return;
    }
    R->stop = why;
}

/* Starts request i at time `arrived` (seconds since t0). Failures to even build the request are
 * recorded as its failure. */
static void launch(run *R, int32_t i, double arrived) {
    ds_bench_result *r = &R->res[i];
    r->sent = 1;
    r->ttft = r->latency = -1;
    r->usage_prompt_tokens = r->usage_completion_tokens = -1;
    r->prompt_tokens = R->prompts[i].prompt_tokens;
    req *q = calloc(1, sizeof *q);
    if (q) {
        q->run = R;
        q->idx = i;
        ds_sse_init(&q->sse, 0);
        q->body = make_body(R, i);
        q->h = curl_easy_init();
        /* the run's headers, then an id that server logs can be matched with (as vLLM's) */
        char id[64];
        snprintf(id, sizeof id, "X-Request-Id: bench-%d", (int)i);
        int ok = 1;
        for (struct curl_slist *h = R->headers; h && ok; h = h->next) {
            struct curl_slist *g = curl_slist_append(q->headers, h->data);
            ok = g != NULL;
            if (g) q->headers = g;
        }
        struct curl_slist *g = ok ? curl_slist_append(q->headers, id) : NULL;
        if (g) {
            q->headers = g;
        } else {
            curl_slist_free_all(q->headers);
            q->headers = NULL;
        }
    }
    if (!q || !q->body || !q->h || !q->headers) {
        req_free(q);
        r->error = dupf("could not build the request (out of memory)");
        r->start = ds_now() - R->t0;
        return;
    }
    CURL *h = q->h;
    curl_easy_setopt(h, CURLOPT_URL, R->p->url);
    curl_easy_setopt(h, CURLOPT_HTTPHEADER, q->headers);
    curl_easy_setopt(h, CURLOPT_POSTFIELDS, q->body);
    curl_easy_setopt(h, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)strlen(q->body));
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, on_write);
    curl_easy_setopt(h, CURLOPT_WRITEDATA, q);
    curl_easy_setopt(h, CURLOPT_PRIVATE, q);
    curl_easy_setopt(h, CURLOPT_ERRORBUFFER, q->errbuf);
    curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(h, CURLOPT_TCP_NODELAY, 1L);
    curl_easy_setopt(h, CURLOPT_HTTP_VERSION, (long)CURL_HTTP_VERSION_1_1);
    if (R->p->timeout_s > 0)
        curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, (long)fmin(R->p->timeout_s * 1000.0, 2e9));
    q->t_send = ds_now();
    r->start = q->t_send - R->t0;
    r->queue = arrived >= 0 && r->start > arrived ? r->start - arrived : 0;
    if (curl_multi_add_handle(R->multi, h) != CURLM_OK) {
        r->error = dupf("could not start the transfer (curl_multi_add_handle)");
        req_free(q);
        return;
    }
    q->next = R->live;
    if (R->live) R->live->prev = q;
    R->live = q;
    if (++R->in_flight > R->peak) R->peak = R->in_flight;
}

/* The transfer of q ended with `code` (or was abandoned when interrupted): fills its result. */
static void finish(run *R, req *q, CURLcode code, int interrupted) {
    ds_bench_result *r = &R->res[q->idx];
    if (!q->status) curl_easy_getinfo(q->h, CURLINFO_RESPONSE_CODE, &q->status);
    r->http_status = (int)q->status;
    const int ok_status = q->status >= 200 && q->status <= 299;
    if (interrupted) {
        set_fail(q, dupf("interrupted before the answer was complete"));
    } else if (q->fail) {
        /* found while reading; the transport error that may follow is our own abort */
    } else if (code == CURLE_OPERATION_TIMEDOUT) {
        set_fail(q, dupf("timed out after %g s", R->p->timeout_s));
    } else if (code == CURLE_COULDNT_CONNECT || code == CURLE_COULDNT_RESOLVE_HOST) {
        long os = 0;
        curl_easy_getinfo(q->h, CURLINFO_OS_ERRNO, &os);
        const char *why = code == CURLE_COULDNT_RESOLVE_HOST ? q->errbuf
                          : os                               ? strerror((int)os)
                                                             : curl_easy_strerror(code);
        set_fail(q, dupf("cannot connect: %s", why));
        stop_run(R, dupf("the server stopped accepting connections (%s)", why));
    } else if (code != CURLE_OK) {
        const char *why = q->errbuf[0] ? q->errbuf : curl_easy_strerror(code);
        if (ok_status)
            set_fail(q, dupf("stream cut: %s", why));
        else if (q->status)
            set_fail(q, http_error(q));
        else
            set_fail(q, dupf("no answer: %s", why));
    } else if (!ok_status) {
        set_fail(q, http_error(q));
    } else if (ds_sse_finish(&q->sse, on_event, q) && !q->fail) {
        set_fail(q, dupf("malformed SSE stream: %s", ds_err_msg()));
    }
    if (!q->fail && !q->done) {
        char *ct = NULL;
        curl_easy_getinfo(q->h, CURLINFO_CONTENT_TYPE, &ct);
        if (r->chunks == 0 && ct && !strstr(ct, "text/event-stream"))
            set_fail(q, dupf("not an SSE stream: the answer is %s (does the server stream?)", ct));
        else
            set_fail(q, dupf("stream ended without data: [DONE]"));
    }
    if (!q->fail && r->chunks == 0) set_fail(q, dupf("no token received"));
    /* timings of whatever arrived, for failures too */
    if (r->chunks > 0) {
        r->ttft = r->chunk_times[0] - r->start;
        r->latency = r->chunk_times[r->chunks - 1] - r->start;
        if (r->chunks > 1) {
            r->itl = malloc((size_t)(r->chunks - 1) * sizeof *r->itl);
            if (r->itl) {
                r->n_itl = r->chunks - 1;
                for (int32_t k = 1; k < r->chunks; k++)
                    r->itl[k - 1] = r->chunk_times[k] - r->chunk_times[k - 1];
            }
        }
    }
    if (q->fail) {
        r->success = 0;
        r->error = q->fail;
        q->fail = NULL;
    } else {
        r->success = 1;
    }
    if (q->prev)
        q->prev->next = q->next;
    else
        R->live = q->next;
    if (q->next) q->next->prev = q->prev;
    R->in_flight--;
    curl_multi_remove_handle(R->multi, q->h);
    req_free(q);
}

/* Output tokens of a request the server gave no usage for: the tokenizer's count of the
 * generated text (vLLM's fallback), else the token chunks. */
static void count_output(const ds_bench_params *p, ds_bench_result *r) {
    if (r->usage_prompt_tokens >= 0) r->prompt_tokens = r->usage_prompt_tokens;
    if (r->usage_completion_tokens >= 0) {
        r->output_tokens = r->usage_completion_tokens;
        return;
    }
    r->output_tokens = r->chunks;
    if (!p->tok || !r->text.len) return;
    int32_t *ids = NULL;
    size_t n = 0;
    if (ds_tok_encode(p->tok, r->text.data, r->text.len, 0, &ids, &n) == DS_OK && n <= INT32_MAX)
        r->output_tokens = (int32_t)n;
    free(ids);
}

int ds_bench_run(const ds_bench_params *p, const ds_bench_prompt *prompts, int32_t n,
                 ds_bench_result *results, ds_bench_run_info *info) {
    memset(info, 0, sizeof *info);
    run R;
    memset(&R, 0, sizeof R);
    R.p = p;
    R.prompts = prompts;
    R.res = results;
    const int open_loop = p->request_rate > 0 && isfinite(p->request_rate);
    double *arrive = NULL;
    int rc = DS_OK;
    R.multi = curl_multi_init();
    if (!R.multi) return ds_err_set(DS_ERR_NOMEM, "curl_multi_init failed");
    struct curl_slist *hl = curl_slist_append(NULL, "Content-Type: application/json");
    if (hl) hl = curl_slist_append(hl, "Expect:"); /* no 100-continue round trip */
    if (hl && p->api_key) {
        char *a = dupf("Authorization: Bearer %s", p->api_key);
        struct curl_slist *g = a ? curl_slist_append(hl, a) : NULL;
        free(a);
        if (!g) curl_slist_free_all(hl);
        hl = g;
    }
    R.headers = hl;
    if (!hl) {
        rc = ds_err_set(DS_ERR_NOMEM, "out of memory");
        goto out;
    }
    if (open_loop) { /* arrival times: request 0 at once, then exponential gaps */
        arrive = malloc((n > 0 ? (size_t)n : 1) * sizeof *arrive);
        if (!arrive) {
            rc = ds_err_set(DS_ERR_NOMEM, "out of memory");
            goto out;
        }
        uint64_t s = p->seed * 0x9e3779b97f4a7c15ull + 0x2545f4914f6cdd1dull;
        double t = 0;
        for (int32_t i = 0; i < n; i++) {
            arrive[i] = t;
            s ^= s << 13, s ^= s >> 7, s ^= s << 17;                   /* xorshift64 */
            double u = ((double)(s >> 11) + 0.5) / 9007199254740992.0; /* (0, 1) */
            t += -log(u) / p->request_rate;
        }
    }
    ds_progress pb;
    memset(&pb, 0, sizeof pb); /* inactive: every call a no-op */
    if (p->progress) ds_progress_begin(&pb, "bench", (uint64_t)n);
    R.t0 = ds_now();
    int32_t next = 0;
    for (;;) {
        /* launch everything that may start now */
        double now = ds_now() - R.t0;
        while (!R.stop && next < n &&
               (p->max_concurrency <= 0 || R.in_flight < p->max_concurrency) &&
               (!open_loop || arrive[next] <= now)) {
            launch(&R, next, open_loop ? arrive[next] : -1);
            if (!results[next].sent || results[next].error) ds_progress_add(&pb, 1);
            next++;
        }
        if (p->interrupt && *p->interrupt) stop_run(&R, dupf("interrupted"));
        if (R.in_flight == 0 && (R.stop || next == n)) break;
        if (R.stop && p->interrupt && *p->interrupt) { /* abandon what is in flight */
            while (R.live) {
                finish(&R, R.live, CURLE_OK, 1);
                ds_progress_add(&pb, 1);
            }
            break;
        }
        /* wait for sockets, curl's own timers, the next arrival, or at most 100 ms */
        long wait = 100, to = -1;
        curl_multi_timeout(R.multi, &to);
        if (to >= 0 && to < wait) wait = to;
        if (open_loop && !R.stop && next < n &&
            (p->max_concurrency <= 0 || R.in_flight < p->max_concurrency)) {
            double ms = (arrive[next] - (ds_now() - R.t0)) * 1000.0;
            long w = ms <= 0 ? 0 : (long)ceil(ms);
            if (w < wait) wait = w;
        }
        if (wait > 0) curl_multi_poll(R.multi, NULL, 0, (int)wait, NULL);
        int running = 0;
        curl_multi_perform(R.multi, &running);
        CURLMsg *m;
        int left;
        while ((m = curl_multi_info_read(R.multi, &left))) {
            if (m->msg != CURLMSG_DONE) continue;
            req *q = NULL;
            curl_easy_getinfo(m->easy_handle, CURLINFO_PRIVATE, (char **)&q);
            finish(&R, q, m->data.result, 0);
            ds_progress_add(&pb, 1);
        }
    }
    info->duration = ds_now() - R.t0;
    ds_progress_end(&pb);
    for (int32_t i = next; i < n; i++) {
        ds_bench_result *r = &results[i];
        r->sent = 0;
        r->ttft = r->latency = -1;
        r->usage_prompt_tokens = r->usage_completion_tokens = -1;
        r->prompt_tokens = prompts[i].prompt_tokens;
        r->error = dupf("not sent: %s", R.stop ? R.stop : "the run ended");
    }
    info->not_sent = n - next;
    info->peak_in_flight = R.peak;
    info->abort_reason = R.stop;
    R.stop = NULL;
    for (int32_t i = 0; i < n; i++)
        if (results[i].sent) count_output(p, &results[i]);
out:
    free(arrive);
    free(R.stop);
    while (R.live) { /* only on an early error */
        req *q = R.live;
        R.live = q->next;
        curl_multi_remove_handle(R.multi, q->h);
        req_free(q);
    }
    curl_slist_free_all(R.headers);
    curl_multi_cleanup(R.multi);
    return rc;
}
