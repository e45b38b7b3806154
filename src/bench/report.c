/* report: the benchmark's figures, printed and as JSON.
 *
 * Every definition is vLLM's (benchmarks/benchmark_serving.py, `vllm bench serve`), so numbers
 * can be set side by side with runs of that tool:
 *   - completed / failed count requests; totals and latency figures use successful ones only;
 *   - request, output and total token throughputs divide by the run's duration;
 *   - TTFT, E2EL per request; TPOT = (E2EL - TTFT) / (output tokens - 1) for requests with
 *     more than one output token; ITL pools every gap of every successful request;
 *   - mean, median, std (population) and percentiles with linear interpolation (numpy's);
 *   - peak output token throughput: token chunks per one-second bucket from the first send.
 * Figures are exact: every sample is kept (a 192 x 256 run is 49k gaps, 400 KB). */
#include "bench/bench.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

double ds_bench_percentile(const double *x, size_t n, double p) {
    if (n == 0) return 0;
    double rank = p / 100.0 * (double)(n - 1);
    if (rank <= 0) return x[0];
    if (rank >= (double)(n - 1)) return x[n - 1];
    size_t lo = (size_t)floor(rank);
    double f = rank - (double)lo;
    return x[lo] + (x[lo + 1] - x[lo]) * f;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

void ds_bench_dist_of(double *x, size_t n, double scale, ds_bench_dist *d) {
    memset(d, 0, sizeof *d);
    d->n = (int64_t)n;
    if (n == 0) return;
    qsort(x, n, sizeof *x, cmp_double);
    double sum = 0;
    for (size_t i = 0; i < n; i++) sum += x[i];
    double mean = sum / (double)n, ss = 0;
    for (size_t i = 0; i < n; i++) ss += (x[i] - mean) * (x[i] - mean);
    d->mean = mean * scale;
    d->std = sqrt(ss / (double)n) * scale;
    d->median = ds_bench_percentile(x, n, 50) * scale;
    d->p90 = ds_bench_percentile(x, n, 90) * scale;
    d->p99 = ds_bench_percentile(x, n, 99) * scale;
    d->max = x[n - 1] * scale;
}

/* TPOT of a successful request, or -1 when it has at most one output token. */
static double tpot_of(const ds_bench_result *r) {
    if (!r->success || r->output_tokens <= 1 || r->ttft < 0 || r->latency < 0) return -1;
    return (r->latency - r->ttft) / (double)(r->output_tokens - 1);
}

int ds_bench_summarize(const ds_bench_result *r, int32_t n, const ds_bench_run_info *info,
                       int32_t max_concurrency, double request_rate, ds_bench_summary *s) {
    memset(s, 0, sizeof *s);
    s->total = n;
    s->duration = info->duration;
    s->max_concurrency = max_concurrency;
    s->peak_in_flight = info->peak_in_flight;
    s->request_rate = request_rate > 0 && isfinite(request_rate) ? request_rate : 0;
    s->not_sent = info->not_sent;
    s->abort_reason = info->abort_reason;
    size_t n_itl = 0;
    for (int32_t i = 0; i < n; i++)
        if (r[i].success) n_itl += (size_t)r[i].n_itl;
    size_t nn = n > 0 ? (size_t)n : 1;
    double *ttft = malloc(nn * sizeof *ttft), *tpot = malloc(nn * sizeof *tpot),
           *e2el = malloc(nn * sizeof *e2el), *itl = malloc((n_itl ? n_itl : 1) * sizeof *itl);
    ds_bench_error_count *errs = calloc(nn, sizeof *errs);
    if (!ttft || !tpot || !e2el || !itl || !errs) {
        free(ttft), free(tpot), free(e2el), free(itl), free(errs);
        return ds_err_set(DS_ERR_NOMEM, "out of memory");
    }
    size_t k_ttft = 0, k_tpot = 0, k_e2el = 0, k_itl = 0;
    double t_first = INFINITY, t_last = 0;
    for (int32_t i = 0; i < n; i++) {
        const ds_bench_result *q = &r[i];
        if (!q->success) {
            s->failed++;
            const char *why = q->error ? q->error : "unknown";
            int32_t e = 0;
            while (e < s->n_errors && strcmp(errs[e].reason, why)) e++;
            if (e == s->n_errors) {
                errs[e].reason = strdup(why);
                if (!errs[e].reason) continue; /* counted as failed; its reason is lost */
                s->n_errors++;
            }
            errs[e].count++;
            continue;
        }
        s->completed++;
        s->total_input += q->prompt_tokens;
        s->total_output += q->output_tokens;
        ttft[k_ttft++] = q->ttft;
        e2el[k_e2el++] = q->latency;
        double t = tpot_of(q);
        if (t >= 0) tpot[k_tpot++] = t;
        for (int32_t k = 0; k < q->n_itl; k++) itl[k_itl++] = q->itl[k];
        if (q->start < t_first) t_first = q->start;
        if (q->chunks && q->chunk_times[q->chunks - 1] > t_last)
            t_last = q->chunk_times[q->chunks - 1];
    }
    /* most frequent reasons first; ties keep their first appearance (stable insertion) */
    for (int32_t a = 1; a < s->n_errors; a++) {
        ds_bench_error_count e = errs[a];
        int32_t b = a;
        while (b > 0 && errs[b - 1].count < e.count) errs[b] = errs[b - 1], b--;
        errs[b] = e;
    }
    s->errors = errs;
    if (s->duration > 0) {
        s->request_throughput = s->completed / s->duration;
        s->output_throughput = (double)s->total_output / s->duration;
        s->total_token_throughput = (double)(s->total_input + s->total_output) / s->duration;
    }
    ds_bench_dist_of(ttft, k_ttft, 1000, &s->ttft);
    ds_bench_dist_of(tpot, k_tpot, 1000, &s->tpot);
    ds_bench_dist_of(itl, k_itl, 1000, &s->itl);
    ds_bench_dist_of(e2el, k_e2el, 1000, &s->e2el);
    if (s->completed && t_last >= t_first) { /* token chunks per second bucket */
        size_t nb = (size_t)ceil(t_last - t_first) + 1;
        int64_t *b = calloc(nb, sizeof *b);
        if (b) {
            for (int32_t i = 0; i < n; i++) {
                if (!r[i].success) continue;
                for (int32_t k = 0; k < r[i].chunks; k++) {
                    double t = r[i].chunk_times[k] - t_first;
                    size_t j = t <= 0 ? 0 : (size_t)t;
                    if (j < nb) b[j]++;
                }
            }
            for (size_t j = 0; j < nb; j++)
                if ((double)b[j] > s->max_output_tokens_per_s)
                    s->max_output_tokens_per_s = (double)b[j];
            free(b);
        }
    }
    free(ttft), free(tpot), free(e2el), free(itl);
    return DS_OK;
}

void ds_bench_summary_free(ds_bench_summary *s) {
    if (!s) return;
    for (int32_t i = 0; i < s->n_errors; i++) free(s->errors[i].reason);
    free(s->errors);
    s->errors = NULL;
    s->n_errors = 0;
}

/* Python's "{s:{c}^{n}}": s centred in n columns of c, the odd column on the right. */
static void centred(FILE *f, const char *s, char c, int n) {
    int len = (int)strlen(s), pad = n > len ? n - len : 0;
    for (int i = 0; i < pad / 2; i++) fputc(c, f);
    fputs(s, f);
    for (int i = 0; i < pad - pad / 2; i++) fputc(c, f);
    fputc('\n', f);
}

static void row_i(FILE *f, const char *k, long long v) {
    fprintf(f, "%-40s %lld\n", k, v);
}
static void row_f(FILE *f, const char *k, double v) {
    fprintf(f, "%-40s %.2f\n", k, v);
}

static void dist_rows(FILE *f, const char *header, const char *name, const ds_bench_dist *d) {
    char k[64];
    centred(f, header, '-', 50);
    snprintf(k, sizeof k, "Mean %s (ms):", name);
    row_f(f, k, d->mean);
    snprintf(k, sizeof k, "Median %s (ms):", name);
    row_f(f, k, d->median);
    snprintf(k, sizeof k, "P90 %s (ms):", name);
    row_f(f, k, d->p90);
    snprintf(k, sizeof k, "P99 %s (ms):", name);
    row_f(f, k, d->p99);
}

void ds_bench_print(FILE *f, const ds_bench_summary *s) {
    centred(f, " Serving Benchmark Result ", '=', 50);
    row_i(f, "Successful requests:", s->completed);
    row_i(f, "Failed requests:", s->failed);
    if (s->not_sent) row_i(f, "Requests not sent:", s->not_sent);
    if (s->max_concurrency > 0) row_i(f, "Maximum request concurrency:", s->max_concurrency);
    if (s->request_rate > 0) row_f(f, "Request rate configured (RPS):", s->request_rate);
    row_f(f, "Benchmark duration (s):", s->duration);
    row_i(f, "Total input tokens:", s->total_input);
    row_i(f, "Total generated tokens:", s->total_output);
    row_f(f, "Request throughput (req/s):", s->request_throughput);
    row_f(f, "Output token throughput (tok/s):", s->output_throughput);
    row_f(f, "Peak output token throughput (tok/s):", s->max_output_tokens_per_s);
    row_i(f, "Peak concurrent requests:", s->peak_in_flight);
    row_f(f, "Total Token throughput (tok/s):", s->total_token_throughput);
    dist_rows(f, "Time to First Token", "TTFT", &s->ttft);
    dist_rows(f, "Time per Output Token (excl. 1st token)", "TPOT", &s->tpot);
    dist_rows(f, "Inter-token Latency", "ITL", &s->itl);
    dist_rows(f, "End-to-end Latency", "E2EL", &s->e2el);
    centred(f, "", '=', 50);
    if (s->n_errors) {
        fprintf(f, "Failed requests by reason:\n");
        for (int32_t i = 0; i < s->n_errors && i < 20; i++)
            fprintf(f, "  %6d x %s\n", (int)s->errors[i].count, s->errors[i].reason);
        if (s->n_errors > 20)
            fprintf(f, "  ... and %d other reasons (every request's error is in the result JSON)\n",
                    (int)(s->n_errors - 20));
    }
    if (s->abort_reason)
        fprintf(f, "Run ended early: %s; %d of %d requests completed, %d not sent\n",
                s->abort_reason, (int)s->completed, (int)s->total, (int)s->not_sent);
}

static json_t *num_or_null(double v) {
    return v < 0 ? json_null() : json_real(v);
}

static void put_dist(json_t *o, const char *name, const ds_bench_dist *d) {
    char k[64];
    const struct {
        const char *stat;
        double v;
    } st[] = {{"mean", d->mean}, {"median", d->median}, {"std", d->std},
              {"p90", d->p90},   {"p99", d->p99},       {"max", d->max}};
    for (size_t i = 0; i < sizeof st / sizeof st[0]; i++) {
        snprintf(k, sizeof k, "%s_%s_ms", st[i].stat, name);
        json_object_set_new(o, k, json_real(st[i].v));
    }
}

json_t *ds_bench_json(const ds_bench_summary *s, const ds_bench_result *r, int32_t n,
                      const json_t *config) {
    json_t *o = json_object();
    if (!o) return NULL;
    if (config) json_object_update(o, (json_t *)config);
    json_object_set_new(o, "duration", json_real(s->duration));
    json_object_set_new(o, "completed", json_integer(s->completed));
    json_object_set_new(o, "failed", json_integer(s->failed));
    json_object_set_new(o, "not_sent", json_integer(s->not_sent));
    json_object_set_new(o, "total_input_tokens", json_integer(s->total_input));
    json_object_set_new(o, "total_output_tokens", json_integer(s->total_output));
    json_object_set_new(o, "request_throughput", json_real(s->request_throughput));
    json_object_set_new(o, "output_throughput", json_real(s->output_throughput));
    json_object_set_new(o, "total_token_throughput", json_real(s->total_token_throughput));
    json_object_set_new(o, "max_output_tokens_per_s", json_real(s->max_output_tokens_per_s));
    json_object_set_new(o, "max_concurrency",
                        s->max_concurrency > 0 ? json_integer(s->max_concurrency) : json_null());
    json_object_set_new(o, "max_concurrent_requests", json_integer(s->peak_in_flight));
    json_object_set_new(o, "request_rate",
                        s->request_rate > 0 ? json_real(s->request_rate) : json_string("inf"));
    json_object_set_new(o, "burstiness", json_real(1.0));
    put_dist(o, "ttft", &s->ttft);
    put_dist(o, "tpot", &s->tpot);
    put_dist(o, "itl", &s->itl);
    put_dist(o, "e2el", &s->e2el);
    json_t *reasons = json_array();
    for (int32_t i = 0; i < s->n_errors; i++)
        json_array_append_new(reasons, json_pack("{s:s,s:i}", "reason", s->errors[i].reason,
                                                 "count", (int)s->errors[i].count));
    json_object_set_new(o, "failure_reasons", reasons);
    json_object_set_new(o, "abort_reason",
                        s->abort_reason ? json_string(s->abort_reason) : json_null());
    /* per request, one column each (vLLM's layout) */
    json_t *in = json_array(), *out = json_array(), *ttfts = json_array(), *itls = json_array(),
           *lat = json_array(), *starts = json_array(), *queue = json_array(),
           *texts = json_array(), *errors = json_array(), *status = json_array(),
           *upt = json_array(), *uct = json_array(), *tpots = json_array(), *chunks = json_array(),
           *finish = json_array(), *sent = json_array();
    for (int32_t i = 0; i < n; i++) {
        const ds_bench_result *q = &r[i];
        json_array_append_new(in, json_integer(q->prompt_tokens));
        json_array_append_new(out, json_integer(q->success ? q->output_tokens : 0));
        json_array_append_new(ttfts, num_or_null(q->ttft));
        json_t *g = json_array();
        for (int32_t k = 0; k < q->n_itl; k++) json_array_append_new(g, json_real(q->itl[k]));
        json_array_append_new(itls, g);
        json_array_append_new(lat, num_or_null(q->latency));
        json_array_append_new(starts, q->sent ? json_real(q->start) : json_null());
        json_array_append_new(queue, q->sent ? json_real(q->queue) : json_null());
        json_array_append_new(texts, json_stringn(q->text.data ? q->text.data : "", q->text.len));
        json_array_append_new(errors, json_string(q->error ? q->error : ""));
        json_array_append_new(status, json_integer(q->http_status));
        json_array_append_new(
            upt, q->usage_prompt_tokens >= 0 ? json_integer(q->usage_prompt_tokens) : json_null());
        json_array_append_new(uct, q->usage_completion_tokens >= 0
                                       ? json_integer(q->usage_completion_tokens)
                                       : json_null());
        json_array_append_new(tpots, num_or_null(tpot_of(q)));
        json_array_append_new(chunks, json_integer(q->chunks));
        json_array_append_new(finish,
                              q->finish_reason ? json_string(q->finish_reason) : json_null());
        json_array_append_new(sent, json_boolean(q->sent));
    }
    json_object_set_new(o, "input_lens", in);
    json_object_set_new(o, "output_lens", out);
    json_object_set_new(o, "ttfts", ttfts);
    json_object_set_new(o, "itls", itls);
    json_object_set_new(o, "latencies", lat);
    json_object_set_new(o, "tpots", tpots);
    json_object_set_new(o, "start_times", starts);
    json_object_set_new(o, "queue_times", queue);
    json_object_set_new(o, "generated_texts", texts);
    json_object_set_new(o, "errors", errors);
    json_object_set_new(o, "http_statuses", status);
    json_object_set_new(o, "usage_prompt_tokens", upt);
    json_object_set_new(o, "usage_completion_tokens", uct);
    json_object_set_new(o, "chunk_counts", chunks);
    json_object_set_new(o, "finish_reasons", finish);
    json_object_set_new(o, "sent", sent);
    return o;
}
