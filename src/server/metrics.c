/* metrics: what /metrics reports, in Prometheus text format 0.0.4.
 *
 * Names, types and histogram buckets are vLLM V1's wherever vLLM has the metric, so a Grafana
 * dashboard made for vLLM works unchanged (label model_name on every series). What vLLM does not
 * have is under the dsinfer: prefix (KV blocks, HTTP statuses, rejected requests, client
 * disconnects). Counting is per engine request, i.e. per choice: a request with n = 4 finishes
 * four times, as vLLM V1's child requests do. One mutex guards everything; an observation is a
 * few adds, rendering is a few kilobytes of text. */
#include "server/server.h"

#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#define MAX_BUCKETS 32

typedef struct {
    const char *name, *help;
    const double *le; /* (n) upper bounds, ascending; +Inf is implied */
    int n;
    uint64_t count[MAX_BUCKETS + 1]; /* per bucket (not cumulative); [n] = above the last */
    double sum;
    uint64_t total;
} histogram;

/* vLLM V1's buckets (vllm/v1/metrics/loggers.py) */
static const double TTFT_LE[] = {0.001, 0.005, 0.01, 0.02,  0.04,  0.06,  0.08, 0.1,
                                 0.25,  0.5,   0.75, 1.0,   2.5,   5.0,   7.5,  10.0,
                                 20.0,  40.0,  80.0, 160.0, 640.0, 2560.0};
static const double TPOT_LE[] = {0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2,  0.3,  0.4, 0.5,
                                 0.75, 1.0,   2.5,  5.0,   7.5, 10.0, 20.0, 40.0, 80.0};
static const double E2E_LE[] = {0.3,  0.5,   0.8,   1.0,   1.5,   2.0,    2.5,
                                5.0,  10.0,  15.0,  20.0,  30.0,  40.0,   50.0,
                                60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0};
static const double TOKENS_LE[] = {1,    2,    5,    10,    20,    50,    100,    200,   500,
                                   1000, 2000, 5000, 10000, 20000, 50000, 100000, 200000};

enum { H_TTFT, H_TPOT, H_ITL, H_E2E, H_QUEUE, H_PROMPT, H_GEN, H_COUNT };

typedef struct {
    histogram h[H_COUNT];
    uint64_t finished[5];   /* by ds_finish_reason */
    uint64_t prompt_tokens; /* of finished requests */
    uint64_t generation_tokens;
    uint64_t http[6]; /* by status class: [1..5]xx; [0] other */
    uint64_t http_by_code[600];
    uint64_t disconnects, rejected;
} metrics_data;

struct ds_metrics {
    pthread_mutex_t mu;
    metrics_data d;
};

static void hist_init(histogram *h, const char *name, const char *help, const double *le, int n) {
    memset(h, 0, sizeof *h);
    h->name = name;
    h->help = help;
    h->le = le;
    h->n = n;
}

static void hist_add(histogram *h, double v) {
    if (!(v >= 0) || !isfinite(v)) return;
    int i = 0;
    while (i < h->n && v > h->le[i]) i++;
    h->count[i]++;
    h->sum += v;
    h->total++;
}

int ds_metrics_open(ds_metrics **out) {
    ds_metrics *m = calloc(1, sizeof *m);
    if (!m) return ds_err_set(DS_ERR_NOMEM, "out of memory (metrics)");
    pthread_mutex_init(&m->mu, NULL);
#define N(a) (int)(sizeof a / sizeof a[0])
    hist_init(&m->d.h[H_TTFT], "vllm:time_to_first_token_seconds",
              "Histogram of time to first token in seconds.", TTFT_LE, N(TTFT_LE));
    hist_init(&m->d.h[H_TPOT], "vllm:time_per_output_token_seconds",
              "Histogram of time per output token in seconds.", TPOT_LE, N(TPOT_LE));
    hist_init(&m->d.h[H_ITL], "vllm:inter_token_latency_seconds",
              "Histogram of inter-token latency in seconds.", TPOT_LE, N(TPOT_LE));
    hist_init(&m->d.h[H_E2E], "vllm:e2e_request_latency_seconds",
              "Histogram of e2e request latency in seconds.", E2E_LE, N(E2E_LE));
    hist_init(&m->d.h[H_QUEUE], "vllm:request_queue_time_seconds",
              "Histogram of time spent in WAITING phase for request.", E2E_LE, N(E2E_LE));
    hist_init(&m->d.h[H_PROMPT], "vllm:request_prompt_tokens",
              "Number of prefill tokens processed.", TOKENS_LE, N(TOKENS_LE));
    hist_init(&m->d.h[H_GEN], "vllm:request_generation_tokens",
              "Number of generation tokens processed.", TOKENS_LE, N(TOKENS_LE));
#undef N
    *out = m;
    return DS_OK;
}

void ds_metrics_close(ds_metrics *m) {
    if (!m) return;
    pthread_mutex_destroy(&m->mu);
    free(m);
}

void ds_metrics_request_done(ds_metrics *m, const ds_metrics_request *r) {
    pthread_mutex_lock(&m->mu);
    if (r->finish >= 0 && r->finish < 5) m->d.finished[r->finish]++;
    m->d.prompt_tokens += (uint64_t)(r->prompt_tokens > 0 ? r->prompt_tokens : 0);
    m->d.generation_tokens += (uint64_t)(r->generation_tokens > 0 ? r->generation_tokens : 0);
    if (r->ttft_s >= 0) hist_add(&m->d.h[H_TTFT], r->ttft_s);
    if (r->e2e_s >= 0) hist_add(&m->d.h[H_E2E], r->e2e_s);
    if (r->queue_s >= 0) hist_add(&m->d.h[H_QUEUE], r->queue_s);
    hist_add(&m->d.h[H_PROMPT], r->prompt_tokens);
    hist_add(&m->d.h[H_GEN], r->generation_tokens);
    pthread_mutex_unlock(&m->mu);
}

void ds_metrics_inter_token(ds_metrics *m, double seconds) {
    pthread_mutex_lock(&m->mu);
    hist_add(&m->d.h[H_TPOT], seconds);
    hist_add(&m->d.h[H_ITL], seconds);
    pthread_mutex_unlock(&m->mu);
}

void ds_metrics_http(ds_metrics *m, int status) {
    pthread_mutex_lock(&m->mu);
    int cls = status / 100;
    m->d.http[cls >= 1 && cls <= 5 ? cls : 0]++;
    if (status >= 0 && status < 600) m->d.http_by_code[status]++;
    pthread_mutex_unlock(&m->mu);
}

void ds_metrics_count(ds_metrics *m, const char *what) {
    pthread_mutex_lock(&m->mu);
    if (!strcmp(what, "disconnect")) m->d.disconnects++;
    if (!strcmp(what, "rejected_queue_full")) m->d.rejected++;
    pthread_mutex_unlock(&m->mu);
}

/* ---- rendering ---- */

static int outf(ds_buf *o, const char *fmt, ...) DS_PRINTF(2, 3);
static int outf(ds_buf *o, const char *fmt, ...) {
    char tmp[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (n < 0) return DS_ERR_FORMAT;
    return ds_buf_append(o, tmp, (size_t)n < sizeof tmp ? (size_t)n : sizeof tmp - 1);
}

static void head(ds_buf *o, const char *name, const char *type, const char *help) {
    outf(o, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

static void sample(ds_buf *o, const char *name, const char *lbl, double v) {
    if (v == floor(v) && fabs(v) < 1e15)
        outf(o, "%s{%s} %.1f\n", name, lbl, v);
    else
        outf(o, "%s{%s} %.9g\n", name, lbl, v);
}

static void gauge(ds_buf *o, const char *name, const char *help, const char *lbl, double v) {
    head(o, name, "gauge", help);
    sample(o, name, lbl, v);
}

static void counter(ds_buf *o, const char *name, const char *help, const char *lbl, double v) {
    /* the family name is the series name without _total (OpenMetrics style, as prometheus_client
     * writes it) */
    char fam[128];
    snprintf(fam, sizeof fam, "%s", name);
    size_t n = strlen(fam);
    if (n > 6 && !strcmp(fam + n - 6, "_total")) fam[n - 6] = 0;
    head(o, fam, "counter", help);
    sample(o, name, lbl, v);
}

static void hist_render(ds_buf *o, const histogram *h, const char *lbl) {
    head(o, h->name, "histogram", h->help);
    uint64_t cum = 0;
    for (int i = 0; i < h->n; i++) {
        cum += h->count[i];
        outf(o, "%s_bucket{%s,le=\"%g\"} %llu\n", h->name, lbl, h->le[i], (unsigned long long)cum);
    }
    cum += h->count[h->n];
    outf(o, "%s_bucket{%s,le=\"+Inf\"} %llu\n", h->name, lbl, (unsigned long long)cum);
    outf(o, "%s_count{%s} %llu\n", h->name, lbl, (unsigned long long)h->total);
    outf(o, "%s_sum{%s} %.9g\n", h->name, lbl, h->sum);
}

int ds_metrics_render(ds_metrics *m, const ds_engine_stats *st, const char *model,
                      int64_t http_in_flight, ds_buf *out) {
    /* label value escaping: backslash, double quote, newline */
    char esc[512];
    size_t k = 0;
    for (const char *p = model ? model : ""; *p && k + 3 < sizeof esc; p++) {
        if (*p == '\\' || *p == '"') esc[k++] = '\\';
        if (*p == '\n') {
            esc[k++] = '\\';
            esc[k++] = 'n';
            continue;
        }
        esc[k++] = *p;
    }
    esc[k] = 0;
    char lbl[600];
    snprintf(lbl, sizeof lbl, "model_name=\"%s\"", esc);
    metrics_data c;
    pthread_mutex_lock(&m->mu);
    c = m->d;
    pthread_mutex_unlock(&m->mu);
    ds_buf *o = out;
    if (st) {
        const double total = st->kv_blocks_total > 0 ? st->kv_blocks_total : 1;
        const double usage = 1.0 - (double)st->kv_blocks_free / total;
        gauge(o, "vllm:num_requests_running", "Number of requests in model execution batches.", lbl,
              st->n_running);
        gauge(o, "vllm:num_requests_waiting", "Number of requests waiting to be processed.", lbl,
              st->n_waiting);
        gauge(o, "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", lbl,
              usage);
        gauge(o, "vllm:gpu_cache_usage_perc",
              "KV-cache usage. 1 means 100 percent usage (older name of vllm:kv_cache_usage_perc).",
              lbl, usage);
        counter(o, "vllm:prefix_cache_queries_total",
                "Prefix cache queries, in terms of number of queried tokens.", lbl,
                (double)st->prefix_queries);
        counter(o, "vllm:prefix_cache_hits_total",
                "Prefix cache hits, in terms of number of cached tokens.", lbl,
                (double)st->prefix_hits);
        counter(o, "vllm:gpu_prefix_cache_queries_total",
                "Prefix cache queries in tokens (older name of vllm:prefix_cache_queries).", lbl,
                (double)st->prefix_queries);
        counter(o, "vllm:gpu_prefix_cache_hits_total",
                "Prefix cache hits in tokens (older name of vllm:prefix_cache_hits).", lbl,
                (double)st->prefix_hits);
        counter(o, "vllm:num_preemptions_total", "Cumulative number of preemption from the engine.",
                lbl, (double)st->preemptions);
        counter(o, "vllm:prompt_tokens_total",
                "Number of prefill tokens processed (prompt tokens of admitted requests, cached "
                "ones included).",
                lbl, (double)st->prefix_queries);
        counter(o, "vllm:generation_tokens_total", "Number of generation tokens processed.", lbl,
                (double)st->generation_tokens);
        head(o, "vllm:cache_config_info", "gauge", "Information of the LLMEngine CacheConfig");
        outf(o,
             "vllm:cache_config_info{%s,block_size=\"%d\",num_gpu_blocks=\"%d\","
             "cache_dtype_bytes_per_token=\"%llu\"} 1.0\n",
             lbl, st->block_size, st->kv_blocks_total, (unsigned long long)st->kv_bytes_per_token);
        gauge(o, "dsinfer:kv_cache_blocks_total", "KV cache blocks.", lbl, st->kv_blocks_total);
        gauge(o, "dsinfer:kv_cache_blocks_free",
              "KV cache blocks free (unused or holding only evictable cached prefixes).", lbl,
              st->kv_blocks_free);
        counter(o, "dsinfer:engine_steps_total", "Engine steps (batched forward passes).", lbl,
                (double)st->steps);
        counter(o, "dsinfer:engine_busy_seconds_total",
                "Seconds the engine spent in forward passes and sampling.", lbl, st->busy_seconds);
        counter(o, "dsinfer:prefill_tokens_computed_total",
                "Prompt tokens run through the model (prefix cache hits excluded).", lbl,
                (double)st->prompt_tokens);
    }
    head(o, "vllm:request_success", "counter", "Count of successfully processed requests.");
    static const char *const reasons[5] = {NULL, "stop", "length", "abort", "error"};
    for (int f = 1; f < 5; f++)
        outf(o, "vllm:request_success_total{%s,finished_reason=\"%s\"} %llu\n", lbl, reasons[f],
             (unsigned long long)c.finished[f]);
    for (int i = 0; i < H_COUNT; i++) hist_render(o, &c.h[i], lbl);
    head(o, "dsinfer:http_requests", "counter", "HTTP requests answered, by status code.");
    for (int code = 100; code < 600; code++)
        if (c.http_by_code[code])
            outf(o, "dsinfer:http_requests_total{%s,code=\"%d\"} %llu\n", lbl, code,
                 (unsigned long long)c.http_by_code[code]);
    gauge(o, "dsinfer:http_generation_requests_in_flight",
          "Completion and chat requests being served.", lbl, (double)http_in_flight);
    counter(o, "dsinfer:requests_rejected_total",
            "Requests refused with 503 because the queue was full.", lbl, (double)c.rejected);
    counter(o, "dsinfer:client_disconnects_total",
            "Generation requests aborted because the client went away.", lbl,
            (double)c.disconnects);
    gauge(o, "dsinfer:ready", "1 when the engine is serving.", lbl, st ? 1 : 0);
    return DS_OK;
}
