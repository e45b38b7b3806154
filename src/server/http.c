/* http: the HTTP/1.1 server of `dsinfer serve` on libmicrohttpd.
 *
 * Threads. libmicrohttpd runs one listening thread and one thread per connection
 * (MHD_USE_THREAD_PER_CONNECTION): a connection's thread reads the request, calls the access
 * handler below, and writes the response; for a stream it calls the content reader, which may
 * block. So a generation request simply waits in its connection's thread: it submits its
 * choices to the engine, then sleeps in poll() on two descriptors,
 *   - an eventfd that the engine's notify hook writes after it queued events for the request,
 *   - the client's socket, for POLLRDHUP: the client went away,
 * takes the queued events without blocking (ds_req_next with timeout 0), and either renders SSE
 * chunks or, at the end, the whole response. A client that disconnects is noticed at once, even
 * while its request is still waiting for the engine, and its requests are aborted (their KV
 * blocks are freed at the engine's next step). One thread per connection costs a stack each,
 * which is fine for the few thousand connections one inference node serves; it buys blocking
 * code that is easy to follow and disconnect detection without libmicrohttpd's suspend/resume
 * (which stops watching a suspended connection's socket).
 *
 * The engine's notify hook may run after a request's final event was taken, even after its
 * handle was released (engine.h): its context is a wake object from a pool that lives until
 * ds_server_close, so a late notify only makes a spurious wakeup of a later request.
 *
 * Limits against hostile clients: the body (Content-Length checked before reading; a chunked
 * body is counted and discarded past the limit), headers (libmicrohttpd's per-connection memory
 * limit), idle connections (libmicrohttpd's timeout, lifted while a request is generating), and a
 * watchdog thread that closes connections whose request has not fully arrived within
 * request_read_timeout_s (slow headers or a trickled body: idle timeouts alone do not catch a
 * client that sends one byte every few seconds). Everything else a request can do is bounded by
 * the mapping's limits (openai.c) and the queue limit here.
 *
 * Shutdown (serve.c): drain (close the listening socket, answer 503 to new requests on open
 * connections), wait for in-flight requests, detach (no more calls into the engine), close the
 * engine (the rest end with abort events), close the server (joins the threads). */
#include "dist/dist.h"
#include "server/server.h"

#include <errno.h>
#include <microhttpd.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/eventfd.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* The engine's notify target: an eventfd. Pooled; freed only by ds_server_close. */
typedef struct wake {
    int fd;
    struct wake *next_free, *next_all;
} wake;

/* A TCP connection, for the watchdog. */
typedef struct conn_rec {
    int fd;
    int reading;  /* a request is being read (or awaited): the read deadline runs */
    double since; /* when the current read began */
    int killed;
    struct conn_rec *prev, *next;
} conn_rec;

struct ds_server {
    ds_server_params p;
    char *host, *api_key, *model_path, *version;
    struct MHD_Daemon *d;
    int port;
    ds_metrics *metrics;
    pthread_rwlock_t engine_lock; /* readers call into the engine; attach/detach write */
    ds_engine *e;
    ds_oai_ctx ctx;
    atomic_int ready, draining;
    pthread_mutex_t mu; /* everything below */
    wake *free_wakes, *all_wakes;
    int64_t in_flight; /* generation HTTP requests */
    int64_t seqs;      /* engine requests submitted here and not finished */
    conn_rec conns;    /* list head */
    pthread_t watchdog;
    int watchdog_started, stopping;
    pthread_cond_t wd_cond;
    double last_log;
    uint64_t last_prompt, last_gen;
};

enum {
    R_NONE,
    R_HEALTH,
    R_PING,
    R_VERSION,
    R_MODELS,
    R_MODEL,
    R_METRICS,
    R_TOKENIZE,
    R_DETOKENIZE,
    R_COMPLETIONS,
    R_CHAT
};

typedef struct gen gen;

/* One HTTP request (libmicrohttpd's per-request context). */
typedef struct {
    ds_server *s;
    int started, route;
    char method[16], path[160], version[16], remote[64];
    ds_buf body;
    int too_big;
    double t0;
    int status; /* what was answered, for the log */
    gen *g;
    conn_rec *cr;
} req_ctx;

/* A completion or chat request in progress. Owned by its req_ctx and, for a stream, by the
 * response too (refs). */
struct gen {
    ds_server *s;
    atomic_int refs;
    ds_oai_request rq;
    ds_oai_choice *ch;
    ds_req **reqs;
    int32_t n, n_done, n_submitted;
    wake *w;
    int sock;
    char id[48];
    ds_oai_meta meta;
    ds_buf out;
    size_t out_off;
    int ended, hung_up, failed_status;
    struct MHD_Connection *conn;
    unsigned idle_timeout; /* restored on the connection when the stream ends */
};

static double now_s(void) {
    return ds_now();
}

/* ---- wake pool ---- */

static wake *wake_get(ds_server *s) {
    pthread_mutex_lock(&s->mu);
    wake *w = s->free_wakes;
    if (w) s->free_wakes = w->next_free;
    pthread_mutex_unlock(&s->mu);
    if (w) {
        uint64_t v;
        while (read(w->fd, &v, sizeof v) > 0) { /* drop a late notify of a previous request */
        }
        return w;
    }
    w = calloc(1, sizeof *w);
    if (!w) return NULL;
    w->fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (w->fd < 0) {
        free(w);
        return NULL;
    }
    pthread_mutex_lock(&s->mu);
    w->next_all = s->all_wakes;
    s->all_wakes = w;
    pthread_mutex_unlock(&s->mu);
    return w;
}

static void wake_put(ds_server *s, wake *w) {
    if (!w) return;
    pthread_mutex_lock(&s->mu);
    w->next_free = s->free_wakes;
    s->free_wakes = w;
    pthread_mutex_unlock(&s->mu);
}

/* The engine's notify hook (engine thread). */
static void wake_notify(void *ctx) {
    wake *w = ctx;
    uint64_t one = 1;
    ssize_t r = write(w->fd, &one, sizeof one);
    (void)r; /* a full counter still wakes the reader */
}

/* ---- responses ---- */

static enum MHD_Result send_body(req_ctx *c, struct MHD_Connection *conn, int status,
                                 const char *type, char *body, size_t len, int must_free) {
    struct MHD_Response *r = MHD_create_response_from_buffer(
        len, body, must_free ? MHD_RESPMEM_MUST_FREE : MHD_RESPMEM_MUST_COPY);
    if (!r) {
        if (must_free) free(body);
        return MHD_NO;
    }
    MHD_add_response_header(r, "Content-Type", type);
    if (atomic_load(&c->s->draining)) MHD_add_response_header(r, "Connection", "close");
    if (status == 503) MHD_add_response_header(r, "Retry-After", "1");
    if (status == 401) MHD_add_response_header(r, "WWW-Authenticate", "Bearer");
    if (status == 405) {
        const char *allow = "POST";
        if (c->route == R_HEALTH || c->route == R_VERSION || c->route == R_MODELS ||
            c->route == R_MODEL || c->route == R_METRICS)
            allow = "GET, HEAD";
        else if (c->route == R_PING)
            allow = "GET, HEAD, POST";
        MHD_add_response_header(r, "Allow", allow);
    }
    enum MHD_Result ret = MHD_queue_response(conn, (unsigned)status, r);
    MHD_destroy_response(r);
    c->status = status;
    return ret;
}

static enum MHD_Result send_json(req_ctx *c, struct MHD_Connection *conn, int status, json_t *o) {
    char *s = o ? json_dumps(o, JSON_COMPACT) : NULL;
    json_decref(o);
    if (!s) return MHD_NO;
    return send_body(c, conn, status, "application/json", s, strlen(s), 1);
}

static enum MHD_Result send_error(req_ctx *c, struct MHD_Connection *conn, const ds_oai_error *e) {
    return send_json(c, conn, e->status, ds_oai_error_json(e));
}

static enum MHD_Result send_err(req_ctx *c, struct MHD_Connection *conn, int status,
                                const char *code, const char *msg) {
    ds_oai_error e;
    memset(&e, 0, sizeof e);
    ds_oai_err(&e, status, code, NULL, "%s", msg);
    return send_error(c, conn, &e);
}

/* ---- generation ---- */

static void gen_unref(gen *g) {
    if (atomic_fetch_sub(&g->refs, 1) != 1) return;
    ds_server *s = g->s;
    int64_t unfinished = 0;
    for (int32_t i = 0; i < g->n_submitted; i++) {
        const ds_oai_choice *ch = &g->ch[i];
        if (!ch->done) { /* the client went away (or the stream failed): aborted here */
            unfinished++;
            ds_metrics_request m = {DS_FINISH_ABORT, ch->n_prompt, ch->n_output,
                                    ch->t_sched,     ch->t_first,  -1};
            ds_metrics_request_done(s->metrics, &m);
        }
        ds_req_release(g->reqs[i]); /* aborts what still runs */
    }
    for (int32_t i = 0; i < g->n; i++) ds_oai_choice_free(&g->ch[i]);
    pthread_mutex_lock(&s->mu);
    s->seqs -= unfinished;
    s->in_flight--;
    pthread_mutex_unlock(&s->mu);
    wake_put(s, g->w);
    ds_oai_request_free(&g->rq);
    ds_buf_free(&g->out);
    free(g->ch);
    free(g->reqs);
    free(g);
}

/* Takes every queued event of the unfinished choices; the number taken. */
static int gen_drain(gen *g) {
    ds_server *s = g->s;
    int taken = 0;
    for (int32_t i = 0; i < g->n_submitted; i++) {
        ds_oai_choice *ch = &g->ch[i];
        ds_engine_event ev;
        while (!ch->done && ds_req_next(g->reqs[i], &ev, 0) == DS_OK) {
            taken++;
            if (ev.token >= 0 && ch->t_prev >= 0)
                ds_metrics_inter_token(s->metrics, ev.t_now - ch->t_prev);
            ds_oai_choice_event(&s->ctx, &g->rq, ch, &ev);
            if (ch->done) {
                g->n_done++;
                ds_metrics_request m = {ch->finish,  ch->n_prompt, ch->n_output,
                                        ch->t_sched, ch->t_first,  ch->t_end};
                ds_metrics_request_done(s->metrics, &m);
                pthread_mutex_lock(&s->mu);
                s->seqs--;
                pthread_mutex_unlock(&s->mu);
            }
            ds_engine_event_free(&ev);
        }
    }
    return taken;
}

/* Waits up to timeout_ms for events: 1 some were taken, 0 none, -1 the client hung up. */
static int gen_wait(gen *g, int timeout_ms) {
    if (gen_drain(g) || !g->w) return 1;
    struct pollfd pf[2] = {{g->w->fd, POLLIN, 0}, {g->sock, POLLRDHUP, 0}};
    int k = poll(pf, g->sock >= 0 ? 2 : 1, timeout_ms);
    if (k > 0 && (pf[0].revents & POLLIN)) {
        uint64_t v;
        ssize_t r = read(g->w->fd, &v, sizeof v);
        (void)r;
    }
    if (k > 0 && g->sock >= 0 && (pf[1].revents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL))) {
        g->hung_up = 1;
        for (int32_t i = 0; i < g->n_submitted; i++) ds_req_abort(g->reqs[i]);
        ds_metrics_count(g->s->metrics, "disconnect");
        return -1;
    }
    return gen_drain(g) > 0;
}

/* The first choice that failed, as an error answer; 0 when none did. */
static int gen_failure(gen *g, ds_oai_error *e) {
    for (int32_t i = 0; i < g->n; i++) {
        if (!g->ch[i].done) continue;
        if (g->ch[i].finish == DS_FINISH_ERROR) {
            /* a multi-rank run whose ranks lost each other will not come back: 503 */
            int lost = ds_dist_broken();
            ds_oai_err(e, lost ? 503 : 500, lost ? "service_unavailable" : "engine_error", NULL,
                       "the engine failed the request: %s",
                       g->ch[i].error ? g->ch[i].error : "unknown error");
            return 1;
        }
        if (g->ch[i].finish == DS_FINISH_ABORT) {
            ds_oai_err(e, 503, "server_shutting_down", NULL,
                       "the request was aborted: the server is shutting down");
            return 1;
        }
    }
    return 0;
}

/* Renders what is new in a stream into g->out. */
static void gen_render(gen *g) {
    ds_server *s = g->s;
    ds_oai_error e;
    if (gen_failure(g, &e)) {
        for (int32_t i = 0; i < g->n_submitted; i++) ds_req_abort(g->reqs[i]);
        ds_oai_stream_error(&e, &g->out);
        g->failed_status = e.status;
        g->ended = 1;
        return;
    }
    for (int32_t i = 0; i < g->n; i++)
        ds_oai_stream_choice(&s->ctx, &g->rq, &g->meta, &g->ch[i], g->ch, g->n, &g->out);
    if (g->n_done == g->n) {
        ds_oai_stream_end(&g->rq, &g->meta, g->ch, g->n, &g->out);
        g->ended = 1;
    }
}

static ssize_t stream_read(void *cls, uint64_t pos, char *buf, size_t max) {
    (void)pos;
    gen *g = cls;
    for (;;) {
        if (g->out_off < g->out.len) {
            size_t n = g->out.len - g->out_off;
            if (n > max) n = max;
            memcpy(buf, g->out.data + g->out_off, n);
            g->out_off += n;
            if (g->out_off == g->out.len) g->out.len = g->out_off = 0;
            return (ssize_t)n;
        }
        if (g->ended) {
            MHD_set_connection_option(g->conn, MHD_CONNECTION_OPTION_TIMEOUT, g->idle_timeout);
            return MHD_CONTENT_READER_END_OF_STREAM;
        }
        if (g->hung_up) return MHD_CONTENT_READER_END_WITH_ERROR;
        int w = gen_wait(g, 1000);
        if (w < 0) return MHD_CONTENT_READER_END_WITH_ERROR;
        if (w > 0 || g->n_done == g->n) gen_render(g);
    }
}

static void stream_free(void *cls) {
    gen_unref(cls);
}

/* A random id: prefix + 32 hex digits. */
static void make_id(char *out, size_t cap, const char *prefix) {
    unsigned char b[16];
    if (getrandom(b, sizeof b, 0) != (ssize_t)sizeof b) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        uint64_t x = (uint64_t)ts.tv_nsec ^ (uint64_t)ts.tv_sec << 30 ^ (uint64_t)(uintptr_t)out;
        for (int i = 0; i < 16; i++) b[i] = (unsigned char)(x >> (8 * (i % 8)) ^ (uint64_t)i * 131);
    }
    size_t k = (size_t)snprintf(out, cap, "%s", prefix);
    for (int i = 0; i < 16 && k + 3 <= cap; i++)
        k += (size_t)snprintf(out + k, cap - k, "%02x", b[i]);
}

static enum MHD_Result handle_generate(req_ctx *c, struct MHD_Connection *conn) {
    ds_server *s = c->s;
    const ds_oai_kind kind = c->route == R_CHAT ? DS_OAI_CHAT : DS_OAI_COMPLETION;
    gen *g = calloc(1, sizeof *g);
    if (!g) return send_err(c, conn, 500, NULL, "out of memory");
    g->s = s;
    atomic_init(&g->refs, 1);
    g->sock = -1;
    pthread_mutex_lock(&s->mu);
    s->in_flight++;
    pthread_mutex_unlock(&s->mu);
    c->g = g;
    ds_oai_error e;
    if (ds_oai_parse(&s->ctx, kind, c->body.data ? c->body.data : "", c->body.len, &g->rq, &e))
        return send_error(c, conn, &e);
    ds_buf_free(&c->body);
    g->n = ds_oai_n_choices(&g->rq);
    g->ch = calloc((size_t)g->n, sizeof *g->ch);
    g->reqs = calloc((size_t)g->n, sizeof *g->reqs);
    if (!g->ch || !g->reqs) return send_err(c, conn, 500, NULL, "out of memory");
    for (int32_t k = 0; k < g->n; k++) ds_oai_choice_init(&g->rq, k, &g->ch[k]);
    make_id(g->id, sizeof g->id, kind == DS_OAI_CHAT ? "chatcmpl-" : "cmpl-");
    g->meta.id = g->id;
    g->meta.created = (int64_t)time(NULL);
    g->meta.model = s->ctx.names[0];
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CONNECTION_FD);
    g->sock = ci ? ci->connect_fd : -1;

    if (kind == DS_OAI_COMPLETION && g->rq.echo && g->rq.prompts[0].max_tokens == 0) {
        /* echo with max_tokens 0: the prompt back, nothing to generate */
        for (int32_t k = 0; k < g->n; k++) {
            g->ch[k].done = 1;
            g->ch[k].finish = DS_FINISH_LENGTH;
            g->ch[k].n_prompt = g->rq.prompts[g->ch[k].prompt].n;
        }
        g->n_done = g->n;
        if (!g->rq.stream)
            return send_json(c, conn, 200, ds_oai_response(&s->ctx, &g->rq, &g->meta, g->ch, g->n));
    } else {
        /* admission: the queue limit, then the engine */
        pthread_mutex_lock(&s->mu);
        int full = s->p.max_queued_requests >= 0 &&
                   s->seqs + g->n > (int64_t)s->p.max_num_seqs + s->p.max_queued_requests;
        if (!full) s->seqs += g->n;
        pthread_mutex_unlock(&s->mu);
        if (full) {
            ds_metrics_count(s->metrics, "rejected_queue_full");
            return send_err(c, conn, 503, "server_overloaded",
                            "the server is overloaded: too many requests are waiting; retry later");
        }
        g->w = wake_get(s);
        if (!g->w) {
            pthread_mutex_lock(&s->mu);
            s->seqs -= g->n;
            pthread_mutex_unlock(&s->mu);
            return send_err(c, conn, 500, NULL, "out of file descriptors");
        }
        int rc = DS_OK;
        pthread_rwlock_rdlock(&s->engine_lock);
        for (int32_t k = 0; k < g->n && rc == DS_OK; k++) {
            if (!s->e) {
                rc = ds_err_set(DS_ERR_CLOSED, "the server is shutting down");
                break;
            }
            ds_request q;
            ds_oai_choice_request(&g->rq, k, &q);
            q.notify = wake_notify;
            q.notify_ctx = g->w;
            rc = ds_engine_submit(s->e, &q, &g->reqs[k]);
            if (rc == DS_OK) g->n_submitted++;
        }
        pthread_rwlock_unlock(&s->engine_lock);
        if (rc != DS_OK) {
            pthread_mutex_lock(&s->mu);
            s->seqs -= g->n - g->n_submitted; /* gen_unref settles the submitted ones */
            pthread_mutex_unlock(&s->mu);
            for (int32_t i = 0; i < g->n_submitted; i++) ds_req_abort(g->reqs[i]);
            if (rc == DS_ERR_CLOSED)
                ds_oai_err(&e, 503, "server_shutting_down", NULL, "%s", ds_err_msg());
            else if (rc == DS_ERR_ARG || rc == DS_ERR_RANGE)
                ds_oai_err(&e, 400, "invalid_value", NULL, "%s", ds_err_msg());
            else
                ds_oai_err(&e, 500, NULL, NULL, "%s", ds_err_msg());
            return send_error(c, conn, &e);
        }
    }

    /* no idle timeout while generating: the engine may take its time before the first token */
    g->conn = conn;
    g->idle_timeout = (unsigned)s->p.timeout_keep_alive_s;
    MHD_set_connection_option(conn, MHD_CONNECTION_OPTION_TIMEOUT, 0u);
    if (g->rq.stream) {
        ds_oai_stream_start(&g->rq, &g->meta, g->ch, g->n, &g->out);
        if (g->n_done == g->n) gen_render(g);
        struct MHD_Response *r =
            MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 16384, stream_read, g, stream_free);
        if (!r) return MHD_NO;
        atomic_fetch_add(&g->refs, 1); /* the response's */
        MHD_add_response_header(r, "Content-Type", "text/event-stream; charset=utf-8");
        MHD_add_response_header(r, "Cache-Control", "no-cache");
        MHD_add_response_header(r, "X-Accel-Buffering", "no");
        if (atomic_load(&s->draining)) MHD_add_response_header(r, "Connection", "close");
        enum MHD_Result ret = MHD_queue_response(conn, 200, r);
        MHD_destroy_response(r);
        c->status = 200;
        return ret;
    }
    /* not streamed: wait here for every choice to finish */
    while (g->n_done < g->n)
        if (gen_wait(g, 1000) < 0) return MHD_NO; /* the client is gone: close */
    MHD_set_connection_option(conn, MHD_CONNECTION_OPTION_TIMEOUT, g->idle_timeout);
    if (gen_failure(g, &e)) return send_error(c, conn, &e);
    return send_json(c, conn, 200, ds_oai_response(&s->ctx, &g->rq, &g->meta, g->ch, g->n));
}

/* ---- the other endpoints ---- */

static enum MHD_Result handle_models(req_ctx *c, struct MHD_Connection *conn, const char *one) {
    ds_server *s = c->s;
    json_t *data = json_array();
    for (int i = 0; i < s->ctx.n_names; i++) {
        if (one && strcmp(one, s->ctx.names[i])) continue;
        json_t *m = json_pack("{s:s,s:s,s:I,s:s,s:s,s:n,s:i,s:[]}", "id", s->ctx.names[i], "object",
                              "model", "created", (json_int_t)time(NULL), "owned_by", "dsinfer",
                              "root", s->model_path ? s->model_path : s->ctx.names[0], "parent",
                              "max_model_len", (int)s->ctx.max_model_len, "permission");
        if (one) {
            json_decref(data);
            return send_json(c, conn, 200, m);
        }
        json_array_append_new(data, m);
    }
    if (one) {
        json_decref(data);
        char msg[300];
        snprintf(msg, sizeof msg, "The model `%.200s` does not exist.", one);
        return send_err(c, conn, 404, "model_not_found", msg);
    }
    return send_json(c, conn, 200, json_pack("{s:s,s:o}", "object", "list", "data", data));
}

static enum MHD_Result handle_metrics(req_ctx *c, struct MHD_Connection *conn) {
    ds_server *s = c->s;
    ds_engine_stats st;
    int have = 0;
    pthread_rwlock_rdlock(&s->engine_lock);
    if (s->e) {
        ds_engine_get_stats(s->e, &st);
        have = 1;
    }
    pthread_rwlock_unlock(&s->engine_lock);
    pthread_mutex_lock(&s->mu);
    int64_t inflight = s->in_flight;
    pthread_mutex_unlock(&s->mu);
    ds_buf out = {0};
    ds_metrics_render(s->metrics, have ? &st : NULL,
                      s->ctx.n_names ? s->ctx.names[0] : (s->model_path ? s->model_path : ""),
                      inflight, &out);
    enum MHD_Result r = send_body(c, conn, 200, "text/plain; version=0.0.4; charset=utf-8",
                                  out.data ? out.data : "", out.len, 0);
    ds_buf_free(&out);
    return r;
}

/* ---- routing ---- */

static int route_of(const char *path, const char **model_id) {
    static const struct {
        const char *path;
        int route;
    } routes[] = {{"/health", R_HEALTH},           {"/ping", R_PING},
                  {"/version", R_VERSION},         {"/v1/models", R_MODELS},
                  {"/metrics", R_METRICS},         {"/tokenize", R_TOKENIZE},
                  {"/detokenize", R_DETOKENIZE},   {"/v1/completions", R_COMPLETIONS},
                  {"/v1/chat/completions", R_CHAT}};
    for (size_t i = 0; i < sizeof routes / sizeof routes[0]; i++)
        if (!strcmp(path, routes[i].path)) return routes[i].route;
    if (!strncmp(path, "/v1/models/", 11) && path[11]) {
        *model_id = path + 11;
        return R_MODEL;
    }
    return R_NONE;
}

static int method_ok(int route, const char *m) {
    const int get = !strcmp(m, "GET") || !strcmp(m, "HEAD"), post = !strcmp(m, "POST");
    switch (route) {
    case R_HEALTH:
    case R_VERSION:
    case R_MODELS:
    case R_MODEL:
    case R_METRICS:
        return get;
    case R_PING:
        return get || post;
    default:
        return post;
    }
}

/* Constant-time comparison of the bearer token with the key: the time depends only on the key's
 * length, never on where the first difference is. */
static int auth_ok(const ds_server *s, struct MHD_Connection *conn) {
    const char *h = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "Authorization");
    const char *key = s->api_key;
    const size_t kn = strlen(key);
    const char *tok = "";
    if (h && !strncasecmp(h, "Bearer ", 7)) {
        tok = h + 7;
        while (*tok == ' ') tok++;
    }
    const size_t tn = strlen(tok);
    unsigned char diff = tn != kn;
    for (size_t i = 0; i < kn; i++) diff |= (unsigned char)(key[i] ^ (i < tn ? tok[i] : 0));
    return diff == 0;
}

static enum MHD_Result dispatch(req_ctx *c, struct MHD_Connection *conn) {
    ds_server *s = c->s;
    const char *model_id = NULL;
    route_of(c->path, &model_id);
    if (c->too_big) {
        char msg[160];
        snprintf(msg, sizeof msg, "the request body is larger than the limit of %zu bytes",
                 s->p.max_body_bytes);
        return send_err(c, conn, 413, "request_too_large", msg);
    }
    const int ready = atomic_load(&s->ready);
    switch (c->route) {
    case R_VERSION:
        return send_json(c, conn, 200, json_pack("{s:s}", "version", s->version ? s->version : ""));
    case R_METRICS:
        return handle_metrics(c, conn);
    case R_HEALTH:
    case R_PING:
        if (!ready || atomic_load(&s->draining))
            return send_err(c, conn, 503, "not_ready",
                            ready ? "the server is shutting down" : "the model is still loading");
        return send_body(c, conn, 200, "application/json", "{}", 2, 0);
    default:
        break;
    }
    if (!ready) return send_err(c, conn, 503, "not_ready", "the model is still loading");
    if (atomic_load(&s->draining))
        return send_err(c, conn, 503, "server_shutting_down", "the server is shutting down");
    ds_oai_error e;
    json_t *out = NULL;
    switch (c->route) {
    case R_MODELS:
        return handle_models(c, conn, NULL);
    case R_MODEL:
        return handle_models(c, conn, model_id);
    case R_TOKENIZE:
    case R_DETOKENIZE: {
        int rc =
            c->route == R_TOKENIZE
                ? ds_oai_tokenize(&s->ctx, c->body.data ? c->body.data : "", c->body.len, &out, &e)
                : ds_oai_detokenize(&s->ctx, c->body.data ? c->body.data : "", c->body.len, &out,
                                    &e);
        return rc ? send_error(c, conn, &e) : send_json(c, conn, 200, out);
    }
    case R_COMPLETIONS:
    case R_CHAT:
        return handle_generate(c, conn);
    default:
        return send_err(c, conn, 404, "not_found", "Not Found");
    }
}

static void conn_set_reading(req_ctx *c, struct MHD_Connection *conn, int reading) {
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(conn, MHD_CONNECTION_INFO_SOCKET_CONTEXT);
    conn_rec *cr = ci ? (conn_rec *)ci->socket_context : NULL;
    if (!cr) return;
    pthread_mutex_lock(&c->s->mu);
    cr->reading = reading;
    cr->since = now_s();
    pthread_mutex_unlock(&c->s->mu);
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *conn, const char *url,
                                  const char *method, const char *version, const char *upload,
                                  size_t *upload_size, void **con_cls) {
    ds_server *s = cls;
    req_ctx *c = *con_cls;
    if (!c) { /* the headers are in */
        c = calloc(1, sizeof *c);
        if (!c) return MHD_NO;
        *con_cls = c;
        c->s = s;
        c->t0 = now_s();
        snprintf(c->method, sizeof c->method, "%s", method);
        snprintf(c->path, sizeof c->path, "%s", url);
        snprintf(c->version, sizeof c->version, "%s", version);
        const union MHD_ConnectionInfo *ci =
            MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CLIENT_ADDRESS);
        if (ci && ci->client_addr) {
            char host[NI_MAXHOST], serv[NI_MAXSERV];
            socklen_t len = ci->client_addr->sa_family == AF_INET6 ? sizeof(struct sockaddr_in6)
                                                                   : sizeof(struct sockaddr_in);
            if (!getnameinfo(ci->client_addr, len, host, sizeof host, serv, sizeof serv,
                             NI_NUMERICHOST | NI_NUMERICSERV))
                snprintf(c->remote, sizeof c->remote, "%.46s:%.8s", host, serv);
        }
        const char *model_id = NULL;
        c->route = route_of(url, &model_id);
        if (c->route == R_NONE) return send_err(c, conn, 404, "not_found", "Not Found");
        if (!method_ok(c->route, method)) {
            char msg[96];
            snprintf(msg, sizeof msg, "Method %.16s is not allowed on %.40s", method, url);
            return send_err(c, conn, 405, "method_not_allowed", msg);
        }
        if (s->api_key && !strncmp(url, "/v1/", 4) && !auth_ok(s, conn))
            return send_err(c, conn, 401, "invalid_api_key",
                            "Incorrect or missing API key: send the header \"Authorization: "
                            "Bearer <key>\" with the key given to --api-key");
        const char *cl = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "Content-Length");
        if (cl) {
            char *end;
            unsigned long long n = strtoull(cl, &end, 10);
            if (n > s->p.max_body_bytes) {
                c->too_big = 1;
                return dispatch(c, conn); /* 413 before reading the body */
            }
        }
        return MHD_YES;
    }
    if (c->status) { /* answered already (an early error): drop the rest of the body */
        *upload_size = 0;
        return MHD_YES;
    }
    if (*upload_size) { /* a piece of the body */
        if (!c->too_big && c->body.len + *upload_size <= s->p.max_body_bytes) {
            if (ds_buf_append(&c->body, upload, *upload_size)) c->too_big = 1;
        } else {
            c->too_big = 1;
            ds_buf_free(&c->body);
        }
        *upload_size = 0;
        return MHD_YES;
    }
    if (c->started) return MHD_NO; /* cannot happen: dispatch always answers */
    c->started = 1;
    conn_set_reading(c, conn, 0);
    return dispatch(c, conn);
}

static void on_completed(void *cls, struct MHD_Connection *conn, void **con_cls,
                         enum MHD_RequestTerminationCode toe) {
    ds_server *s = cls;
    req_ctx *c = *con_cls;
    conn_set_reading(&(req_ctx){.s = s}, conn, 1); /* the next request's deadline starts */
    if (!c) return;
    *con_cls = NULL;
    gen *g = c->g;
    const int ok = toe == MHD_REQUEST_TERMINATED_COMPLETED_OK;
    if (c->status) ds_metrics_http(s->metrics, c->status);
    if (s->p.log_requests &&
        !(c->route == R_HEALTH || c->route == R_METRICS || c->route == R_PING)) {
        double dt = now_s() - c->t0;
        char status[64];
        if (g && g->hung_up)
            snprintf(status, sizeof status, "aborted (client disconnected)");
        else if (!ok)
            snprintf(status, sizeof status, "%d (connection closed before the end)", c->status);
        else
            snprintf(status, sizeof status, "%d",
                     g && g->failed_status ? g->failed_status : c->status);
        if (g && g->n) {
            int64_t out = 0;
            double ttft = -1;
            for (int32_t i = 0; i < g->n; i++) {
                out += g->ch[i].n_output;
                if (g->ch[i].t_first >= 0 && (ttft < 0 || g->ch[i].t_first < ttft))
                    ttft = g->ch[i].t_first;
            }
            int64_t in = 0;
            for (int32_t i = 0; i < g->rq.n_prompts; i++) in += g->rq.prompts[i].n;
            ds_info("%s \"%s %s %s\" %s id=%s prompt_tokens=%lld completion_tokens=%lld n=%d "
                    "ttft=%.3fs time=%.3fs%s",
                    c->remote, c->method, c->path, c->version, status, g->id, (long long)in,
                    (long long)out, (int)g->n, ttft, dt, g->rq.stream ? " stream" : "");
        } else {
            ds_info("%s \"%s %s %s\" %s time=%.3fs", c->remote, c->method, c->path, c->version,
                    status, dt);
        }
    }
    if (g) gen_unref(g);
    ds_buf_free(&c->body);
    free(c);
}

static void on_connection(void *cls, struct MHD_Connection *conn, void **socket_context,
                          enum MHD_ConnectionNotificationCode code) {
    ds_server *s = cls;
    if (code == MHD_CONNECTION_NOTIFY_STARTED) {
        conn_rec *cr = calloc(1, sizeof *cr);
        if (!cr) return;
        const union MHD_ConnectionInfo *ci =
            MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CONNECTION_FD);
        cr->fd = ci ? ci->connect_fd : -1;
        cr->reading = 1;
        cr->since = now_s();
        pthread_mutex_lock(&s->mu);
        cr->next = s->conns.next;
        cr->prev = &s->conns;
        if (s->conns.next) s->conns.next->prev = cr;
        s->conns.next = cr;
        pthread_mutex_unlock(&s->mu);
        *socket_context = cr;
    } else if (*socket_context) { /* closed: the socket is closed right after this returns */
        conn_rec *cr = *socket_context;
        pthread_mutex_lock(&s->mu);
        cr->prev->next = cr->next;
        if (cr->next) cr->next->prev = cr->prev;
        pthread_mutex_unlock(&s->mu);
        free(cr);
        *socket_context = NULL;
    }
}

/* Closes connections whose request has been arriving for longer than request_read_timeout_s. */
static void *watchdog_main(void *arg) {
    ds_server *s = arg;
    pthread_mutex_lock(&s->mu);
    while (!s->stopping) {
        struct timespec until;
        clock_gettime(CLOCK_REALTIME, &until);
        until.tv_sec += 1;
        pthread_cond_timedwait(&s->wd_cond, &s->mu, &until);
        const double t = now_s();
        for (conn_rec *cr = s->conns.next; cr; cr = cr->next)
            if (cr->reading && !cr->killed && cr->fd >= 0 &&
                t - cr->since > s->p.request_read_timeout_s) {
                /* the connection's thread sees the socket fail and closes it itself */
                shutdown(cr->fd, SHUT_RDWR);
                cr->killed = 1;
            }
    }
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

static void mhd_log(void *cls, const char *fmt, va_list ap) {
    (void)cls;
    char line[512];
    vsnprintf(line, sizeof line, fmt, ap);
    size_t n = strlen(line);
    while (n && line[n - 1] == '\n') line[--n] = 0;
    ds_debug("http: %s", line);
}

/* ---- lifecycle ---- */

ds_server_params ds_server_default_params(void) {
    ds_server_params p;
    memset(&p, 0, sizeof p);
    p.host = "127.0.0.1";
    p.port = 8000;
    p.max_body_bytes = 8u << 20;
    p.max_connections = 1024;
    p.timeout_keep_alive_s = 5;
    p.request_read_timeout_s = 30;
    p.max_queued_requests = 1024;
    p.max_num_seqs = 256;
    p.log_requests = 1;
    return p;
}

static char *dup_or_null(const char *s) {
    return s ? strdup(s) : NULL;
}

int ds_server_open(const ds_server_params *params, ds_server **out) {
    *out = NULL;
    ds_server_params p = params ? *params : ds_server_default_params();
    if (p.port < 0 || p.port > 65535)
        return ds_err_set(DS_ERR_ARG, "port %d: must be 0..65535", p.port);
    if (p.max_connections < 1 || p.timeout_keep_alive_s < 0 || p.request_read_timeout_s < 1 ||
        p.max_body_bytes < 1)
        return ds_err_set(DS_ERR_ARG, "server limits must be positive");
    if (p.api_key && !p.api_key[0]) p.api_key = NULL;
    /* the address */
    struct addrinfo hints, *ai = NULL;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE;
    char port[16];
    snprintf(port, sizeof port, "%d", p.port);
    const char *host = p.host && p.host[0] ? p.host : NULL;
    int gai = getaddrinfo(host, port, &hints, &ai);
    if (gai || !ai)
        return ds_err_set(DS_ERR_ARG, "--host %s: %s", host ? host : "(any)", gai_strerror(gai));
    struct sockaddr_storage addr;
    memset(&addr, 0, sizeof addr);
    memcpy(&addr, ai->ai_addr, ai->ai_addrlen);
    const int v6 = ai->ai_family == AF_INET6;
    freeaddrinfo(ai);

    ds_server *s = calloc(1, sizeof *s);
    if (!s) return ds_err_set(DS_ERR_NOMEM, "out of memory (server)");
    s->p = p;
    s->host = dup_or_null(p.host);
    s->api_key = dup_or_null(p.api_key);
    s->model_path = dup_or_null(p.model_path);
    s->version = dup_or_null(p.version);
    s->p.host = s->host;
    s->p.api_key = s->api_key;
    s->p.model_path = s->model_path;
    s->p.version = s->version;
    pthread_rwlock_init(&s->engine_lock, NULL);
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->wd_cond, NULL);
    s->last_log = now_s();
    int rc = ds_metrics_open(&s->metrics);
    if (rc) goto fail;
    unsigned flags = MHD_USE_THREAD_PER_CONNECTION | MHD_USE_INTERNAL_POLLING_THREAD |
                     MHD_USE_POLL | MHD_USE_ITC | MHD_USE_ERROR_LOG | (v6 ? MHD_USE_IPv6 : 0);
    s->d = MHD_start_daemon(
        flags, (uint16_t)p.port, NULL, NULL, on_request, s, MHD_OPTION_SOCK_ADDR,
        (struct sockaddr *)&addr, MHD_OPTION_CONNECTION_LIMIT, (unsigned)p.max_connections,
        MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)p.timeout_keep_alive_s,
        MHD_OPTION_CONNECTION_MEMORY_LIMIT, (size_t)(64 * 1024), MHD_OPTION_NOTIFY_COMPLETED,
        on_completed, s, MHD_OPTION_NOTIFY_CONNECTION, on_connection, s, MHD_OPTION_EXTERNAL_LOGGER,
        mhd_log, s, MHD_OPTION_LISTEN_BACKLOG_SIZE, 1024u, MHD_OPTION_END);
    if (!s->d) {
        rc = ds_err_set(DS_ERR_IO, "cannot listen on %s:%d (%s)", p.host ? p.host : "*", p.port,
                        errno ? strerror(errno) : "libmicrohttpd refused to start");
        goto fail;
    }
    const union MHD_DaemonInfo *di = MHD_get_daemon_info(s->d, MHD_DAEMON_INFO_BIND_PORT);
    s->port = di ? di->port : p.port;
    if (pthread_create(&s->watchdog, NULL, watchdog_main, s) != 0) {
        rc = ds_err_set(DS_ERR_NOMEM, "cannot start the server's watchdog thread");
        goto fail;
    }
    s->watchdog_started = 1;
    *out = s;
    return DS_OK;
fail:
    ds_server_close(s);
    return rc;
}

int ds_server_port(const ds_server *s) {
    return s->port;
}

void ds_server_attach(ds_server *s, ds_engine *e, const ds_oai_ctx *c) {
    pthread_rwlock_wrlock(&s->engine_lock);
    s->e = e;
    s->ctx = *c;
    pthread_rwlock_unlock(&s->engine_lock);
    atomic_store(&s->ready, 1);
}

void ds_server_drain(ds_server *s) {
    if (atomic_exchange(&s->draining, 1)) return;
    /* closed now, not at exit: a client connecting during the drain is refused at once (and one
     * still in the backlog is reset) instead of waiting, unanswered, for the server to end */
    MHD_socket lfd = MHD_quiesce_daemon(s->d);
    if (lfd != MHD_INVALID_SOCKET) close(lfd);
}

int64_t ds_server_in_flight(ds_server *s) {
    pthread_mutex_lock(&s->mu);
    int64_t n = s->in_flight;
    pthread_mutex_unlock(&s->mu);
    return n;
}

void ds_server_detach(ds_server *s) {
    pthread_rwlock_wrlock(&s->engine_lock);
    s->e = NULL;
    pthread_rwlock_unlock(&s->engine_lock);
}

void ds_server_close(ds_server *s) {
    if (!s) return;
    if (s->watchdog_started) {
        pthread_mutex_lock(&s->mu);
        s->stopping = 1;
        pthread_cond_signal(&s->wd_cond);
        pthread_mutex_unlock(&s->mu);
        pthread_join(s->watchdog, NULL);
    }
    if (s->d) {
        MHD_socket lfd = atomic_load(&s->draining) ? MHD_INVALID_SOCKET : MHD_quiesce_daemon(s->d);
        MHD_stop_daemon(s->d);
        if (lfd != MHD_INVALID_SOCKET) close(lfd);
    }
    for (wake *w = s->all_wakes, *next; w; w = next) {
        next = w->next_all;
        close(w->fd);
        free(w);
    }
    for (conn_rec *cr = s->conns.next, *next; cr; cr = next) {
        next = cr->next;
        free(cr);
    }
    ds_metrics_close(s->metrics);
    pthread_cond_destroy(&s->wd_cond);
    pthread_mutex_destroy(&s->mu);
    pthread_rwlock_destroy(&s->engine_lock);
    free(s->host);
    free(s->api_key);
    free(s->model_path);
    free(s->version);
    free(s);
}

void ds_server_log_stats(ds_server *s, int force) {
    ds_engine_stats st;
    pthread_rwlock_rdlock(&s->engine_lock);
    int have = s->e != NULL;
    if (have) ds_engine_get_stats(s->e, &st);
    pthread_rwlock_unlock(&s->engine_lock);
    if (!have) return;
    const double t = now_s(), dt = t - s->last_log > 1e-6 ? t - s->last_log : 1e-6;
    const uint64_t prompt = st.prefix_queries, gen_tok = st.generation_tokens;
    const double pt = (double)(prompt - s->last_prompt) / dt,
                 gt = (double)(gen_tok - s->last_gen) / dt;
    const int active =
        prompt != s->last_prompt || gen_tok != s->last_gen || st.n_running || st.n_waiting;
    s->last_log = t;
    s->last_prompt = prompt;
    s->last_gen = gen_tok;
    if (!active && !force) return;
    const double usage =
        st.kv_blocks_total ? 100.0 * (1.0 - (double)st.kv_blocks_free / st.kv_blocks_total) : 0;
    const double hit =
        st.prefix_queries ? 100.0 * (double)st.prefix_hits / (double)st.prefix_queries : 0;
    ds_info("Avg prompt throughput: %.1f tokens/s, Avg generation throughput: %.1f tokens/s, "
            "Running: %d reqs, Waiting: %d reqs, KV cache usage: %.1f%%, Prefix cache hit rate: "
            "%.1f%%",
            pt, gt, st.n_running, st.n_waiting, usage, hit);
}
