/* bench: a load-generating client for any OpenAI-compatible server (`dsinfer bench`,
 * docs/bench.md).
 *
 * What it measures and how (the definitions are vLLM's benchmark_serving / `vllm bench serve`):
 *   - every request is streamed (SSE); a "token chunk" is an event whose first choice carries
 *     non-empty text (completions: choices[0].text; chat: choices[0].delta.content or
 *     .reasoning_content). Role-only, finish-only and usage-only events carry no token.
 *   - TTFT: send -> first token chunk. ITL: the gaps between consecutive token chunks.
 *     E2EL (latency): send -> last token chunk. TPOT: (E2EL - TTFT) / (output tokens - 1), for
 *     requests with more than one output token.
 *   - output tokens: usage.completion_tokens when the server reports it (stream_options
 *     include_usage is always asked for), else the tokenizer's count of the generated text;
 *     input tokens: usage.prompt_tokens, else the client's count.
 *   - throughputs divide by the run's duration (first send -> last answer).
 *
 * Four parts, one concern each:
 *   - sse.c: an incremental Server-Sent Events parser (pure; no I/O).
 *   - prompts.c: prompts of an exact token length (random ids decoded to text, re-encoded and
 *     adjusted until the server's count is exact) or read from a JSONL file.
 *   - client.c: one thread drives every stream through libcurl's multi interface (closed loop
 *     with N clients, or Poisson arrivals with an optional cap); timestamps are taken in the
 *     write callback, as bytes arrive.
 *   - report.c: the figures (mean, median, std, percentiles as numpy computes them), the
 *     printed summary in vLLM's layout and the result JSON with every per-request figure.
 * Nothing here knows about dsinfer's server or engine: it talks HTTP to whatever listens. */
#ifndef DS_BENCH_H
#define DS_BENCH_H

#include "core/core.h"
#include "tokenizer/tokenizer.h"

#include <jansson.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

/* ---- SSE ------------------------------------------------------------------------------------
 * The event stream format of the HTML standard: lines end in LF, CRLF or CR; "data:" lines
 * (one optional space after the colon) accumulate, joined by LF; a blank line dispatches the
 * event; lines starting with ':' are comments; other fields (event, id, retry) are ignored. */
typedef struct {
    ds_buf line;      /* the line being read (no terminator) */
    ds_buf data;      /* data of the event being read */
    int has_data;     /* a data line was seen since the last dispatch */
    int cr;           /* the previous byte was CR: a following LF belongs to it */
    size_t max_bytes; /* longest line / event accepted */
} ds_sse;

/* Called with each event's data (NUL-terminated, len bytes); non-zero stops the feed and is
 * returned by ds_sse_feed / ds_sse_finish. */
typedef int (*ds_sse_fn)(void *ctx, const char *data, size_t len);

/* max_bytes: the longest line or event accepted (0: 16 MiB). */
void ds_sse_init(ds_sse *s, size_t max_bytes);
/* Feeds p[0, n). 0, fn's non-zero result, DS_ERR_FORMAT when a line or event exceeds
 * max_bytes, or DS_ERR_NOMEM (message set for both). */
int ds_sse_feed(ds_sse *s, const char *p, size_t n, ds_sse_fn fn, void *ctx);
/* End of stream: an unterminated last line and an event without its blank line are
 * dispatched (lenient, as common clients are). Returns as ds_sse_feed. */
int ds_sse_finish(ds_sse *s, ds_sse_fn fn, void *ctx);
void ds_sse_free(ds_sse *s); /* accepts a zeroed struct */

/* ---- prompts -------------------------------------------------------------------------------- */
typedef enum {
    DS_BENCH_COMPLETIONS, /* --backend openai: POST /v1/completions with "prompt" */
    DS_BENCH_CHAT         /* --backend openai-chat: POST /v1/chat/completions with "messages" */
} ds_bench_backend;

typedef struct {
    char *text;            /* completions: the prompt; chat: the user message (owned) */
    json_t *messages;      /* chat from a dataset file: the messages (owned reference) or NULL */
    int32_t prompt_tokens; /* tokens the server will count (client-side: BOS / chat template) */
    int32_t max_tokens;    /* sent as max_tokens (chat: max_completion_tokens) */
} ds_bench_prompt;

/* A tokenizer plus what the prompt builder needs from it. Build with ds_bench_tok_init. */
typedef struct {
    const ds_tokenizer *tok; /* borrowed */
    int chat_format;         /* ds_chat_format of its chat template; -1: none recognised */
    int add_bos;             /* tokenizer_config add_bos_token: the server prepends BOS */
    int32_t *pool;           /* (n_pool) ids that decode to valid UTF-8 text on their own and
                                are not special tokens: what random prompts draw from */
    int32_t n_pool;
} ds_bench_tok;

int ds_bench_tok_init(ds_bench_tok *bt, const ds_tokenizer *tok);
void ds_bench_tok_free(ds_bench_tok *bt); /* accepts a zeroed struct */

/* Tokens the server counts for a prompt: completions: encode(text) with BOS when add_bos;
 * chat: the rendered conversation (messages, else one user turn of text) with the generation
 * prompt, when the tokenizer has a recognised DeepSeek chat template, else the text alone. */
int ds_bench_count(const ds_bench_tok *bt, ds_bench_backend b, const char *text,
                   const json_t *messages, int32_t *n);

/* n prompts of exactly prompt_tokens tokens as ds_bench_count counts them (vLLM's random
 * dataset: random ids from bt->pool decoded to text, re-encoded, ids added or dropped until
 * the count is exact), each with max_tokens. Deterministic in seed. *out is calloc'd (free with
 * ds_bench_prompts_free). DS_ERR_ARG when prompt_tokens is below the fixed part (BOS, chat
 * template) or no exact text was found. */
int ds_bench_random_prompts(const ds_bench_tok *bt, ds_bench_backend b, int32_t n,
                            int32_t prompt_tokens, int32_t max_tokens, uint64_t seed,
                            ds_bench_prompt **out);
/* Prompts from a JSONL file: each non-blank line an object with "prompt" (a string) or, for
 * the chat backend, "messages" (an OpenAI messages array), and an optional "max_tokens"
 * (default max_tokens). Lines are used in order and repeated until n prompts are made.
 * Errors name the file and line. */
int ds_bench_file_prompts(const ds_bench_tok *bt, ds_bench_backend b, const char *path, int32_t n,
                          int32_t max_tokens, ds_bench_prompt **out);
void ds_bench_prompts_free(ds_bench_prompt *p, int32_t n); /* accepts NULL */

/* ---- running -------------------------------------------------------------------------------- */
typedef struct {
    const char *url;   /* the endpoint, e.g. http://127.0.0.1:8000/v1/completions */
    const char *model; /* "model" of every request */
    ds_bench_backend backend;
    const char *api_key;     /* "Authorization: Bearer KEY"; NULL: none */
    int32_t max_concurrency; /* requests in flight at most; 0: no limit */
    double request_rate;     /* requests/s, Poisson arrivals; <= 0 or inf: all at once (then
                                max_concurrency clients run a closed loop) */
    double timeout_s;        /* per request, whole transfer; 0: none */
    uint64_t seed;           /* arrival times */
    int ignore_eos;          /* send "ignore_eos": true */
    int progress;            /* a progress bar on stderr (when it is a terminal) */
    const ds_tokenizer *tok; /* counts output tokens the server does not report; may be NULL */
    volatile sig_atomic_t *interrupt; /* non-zero (e.g. set by SIGINT) ends the run; may be NULL */
} ds_bench_params;

ds_bench_params ds_bench_default_params(void);

/* One request's outcome. Times are seconds; "start" is relative to the run's start. */
typedef struct {
    int sent; /* 0: never sent (the run ended first) */
    int success;
    char *error;           /* why it failed (owned), NULL on success */
    int http_status;       /* 0: no HTTP answer */
    int32_t prompt_tokens; /* usage.prompt_tokens, else the prompt's client-side count */
    int32_t output_tokens; /* usage.completion_tokens, else the tokenizer's count */
    int32_t usage_prompt_tokens, usage_completion_tokens; /* -1: not reported */
    int32_t chunks;                                       /* token chunks received */
    double start;                                         /* when it was sent */
    double queue;         /* arrived -> sent (waiting for a free slot) */
    double ttft, latency; /* -1 when unknown */
    double *itl;          /* (n_itl = chunks - 1) gaps between token chunks (owned) */
    int32_t n_itl;
    double *chunk_times; /* (chunks) arrival of each token chunk since the run's start */
    int32_t cap_chunks;  /* (owned) */
    ds_buf text;         /* generated text (content and reasoning_content) */
    char *finish_reason; /* owned; NULL when none was seen */
} ds_bench_result;

/* What happened to the run as a whole. */
typedef struct {
    double duration;        /* first send -> last answer (s) */
    int32_t peak_in_flight; /* most requests in flight at once */
    int32_t not_sent;
    char *abort_reason; /* why the run ended before every request was sent (owned) */
} ds_bench_run_info;

/* Sends the n prompts as p says and fills results[0, n) (zeroed by the caller; free each with
 * ds_bench_result_free). A request that fails is recorded with its reason and never ends the
 * run, except a refused connection (the server is gone: nothing more is sent, requests in
 * flight finish) and *p->interrupt (in-flight requests are abandoned). Requests not sent fail
 * with the reason. Returns 0, or an error (message set) when the run could not start at all
 * (libcurl setup). Not thread-safe with other users of curl_global_init. */
int ds_bench_run(const ds_bench_params *p, const ds_bench_prompt *prompts, int32_t n,
                 ds_bench_result *results, ds_bench_run_info *info);
void ds_bench_result_free(ds_bench_result *r);
void ds_bench_run_info_free(ds_bench_run_info *info);

/* ---- figures and reports -------------------------------------------------------------------- */
/* A distribution in milliseconds; all 0 when n == 0 (as vLLM reports an empty list). */
typedef struct {
    int64_t n;
    double mean, median, std, p90, p99, max;
} ds_bench_dist;

/* Percentile p (0..100) of sorted x[0, n) with linear interpolation between closest ranks
 * (numpy's default): rank p/100 * (n-1). 0 when n == 0. */
double ds_bench_percentile(const double *sorted, size_t n, double p);
/* Sorts x in place (ascending) and fills d, scaling by `scale` (1000 for seconds -> ms). */
void ds_bench_dist_of(double *x, size_t n, double scale, ds_bench_dist *d);

typedef struct {
    char *reason; /* owned */
    int32_t count;
} ds_bench_error_count;

typedef struct {
    int32_t total, completed, failed, not_sent;
    double duration;
    int64_t total_input, total_output;
    double request_throughput, output_throughput, total_token_throughput;
    double max_output_tokens_per_s; /* peak over one-second buckets of token chunk arrivals */
    int32_t max_concurrency;        /* the configured cap; 0: none */
    int32_t peak_in_flight;
    double request_rate;                 /* configured; <= 0: inf */
    ds_bench_dist ttft, tpot, itl, e2el; /* ms, over successful requests */
    ds_bench_error_count *errors;        /* (n_errors) distinct reasons, most frequent first */
    int32_t n_errors;
    const char *abort_reason; /* borrowed from the run info; NULL when none */
} ds_bench_summary;

/* Computes every figure from the results. 0 or DS_ERR_NOMEM. */
int ds_bench_summarize(const ds_bench_result *r, int32_t n, const ds_bench_run_info *info,
                       int32_t max_concurrency, double request_rate, ds_bench_summary *s);
void ds_bench_summary_free(ds_bench_summary *s);
/* The summary in vLLM's layout ("{:<40} {:<10.2f}"), then the failure reasons. */
void ds_bench_print(FILE *f, const ds_bench_summary *s);
/* The result JSON: vLLM's keys (duration, completed, failed, total_input_tokens, ...,
 * mean/median/std/p90/p99_{ttft,tpot,itl,e2el}_ms, input_lens, output_lens, ttfts, itls,
 * latencies, start_times, generated_texts, errors) plus per-request columns of our own
 * (http_statuses, usage_*, tpots, chunk_counts, finish_reasons, queue_times), the failure
 * summary and `config` (borrowed, may be NULL: its keys are copied in). New reference or NULL. */
json_t *ds_bench_json(const ds_bench_summary *s, const ds_bench_result *r, int32_t n,
                      const json_t *config);

#endif
