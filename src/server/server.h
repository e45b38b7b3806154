/* server: the OpenAI-compatible HTTP front end of `dsinfer serve` (docs/server.md).
 *
 * Three parts, one concern each:
 *   - openai (openai.c): request JSON -> engine requests (types, ranges, limits, model name,
 *     chat template, tokenization) and engine events -> OpenAI response JSON, whole or as SSE
 *     chunks. Pure: no sockets, no threads; the fuzz target drives it directly.
 *   - metrics (metrics.c): counters and histograms, rendered in Prometheus text format with
 *     vLLM's metric names so that existing dashboards work.
 *   - server (http.c): HTTP/1.1 with keep-alive on libmicrohttpd, one thread per connection;
 *     routes, API-key check, body/header/time limits, streaming, client disconnects, logs.
 * HTTP statuses and OpenAI's error JSON are made here and nowhere else. */
#ifndef DS_SERVER_H
#define DS_SERVER_H

#include "core/core.h"
#include "engine/engine.h"
#include "tokenizer/tokenizer.h"

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

/* ---- limits on one request (documented in docs/server.md) ----------------------------------- */
#define DS_OAI_MAX_JSON_DEPTH 64 /* nesting of arrays/objects in a request body */
#define DS_OAI_MAX_N 128         /* choices per prompt (n) */
#define DS_OAI_MAX_PROMPTS 256   /* prompts in one /v1/completions request */
#define DS_OAI_MAX_CHOICES 1024  /* prompts x n */
#define DS_OAI_MAX_STOP 64       /* stop strings */
#define DS_OAI_MAX_STOP_LEN 1024 /* bytes per stop string */
#define DS_OAI_MAX_STOP_TOKEN_IDS 1024
#define DS_OAI_MAX_LOGIT_BIAS 1024 /* logit_bias entries */
#define DS_OAI_MAX_MESSAGES 100000 /* chat messages */

/* ---- errors --------------------------------------------------------------------------------- */

/* An error answer: the HTTP status and OpenAI's {"error": {message, type, param, code}}. */
typedef struct {
    int status;        /* 400, 401, 404, 405, 413, 500, 503 */
    const char *type;  /* "invalid_request_error" (4xx) or "server_error" (5xx); static */
    const char *code;  /* OpenAI-style code ("invalid_value", "model_not_found", ...) or NULL */
    char param[64];    /* the request field at fault, "" when none */
    char message[768]; /* names the field and the bad value */
} ds_oai_error;

/* Fills e (type from the status) and returns -1, so `return ds_oai_err(...)`. param may be
 * NULL; code may be NULL. */
int ds_oai_err(ds_oai_error *e, int status, const char *code, const char *param, const char *fmt,
               ...) DS_PRINTF(5, 6);
/* {"error": {"message", "type", "param", "code"}}; new reference. */
json_t *ds_oai_error_json(const ds_oai_error *e);

/* ---- request mapping ------------------------------------------------------------------------ */

/* What the mapping needs to know about the served model. Borrowed pointers. */
typedef struct {
    const ds_tokenizer *tok;  /* NULL: token-id prompts only (no text, stop strings, chat) */
    int chat_format;          /* ds_chat_format of the tokenizer's template, -1: none */
    int reasoning;            /* split R1 reasoning into reasoning_content */
    int32_t vocab;            /* the model's vocabulary (config vocab_size) */
    int32_t max_model_len;    /* prompt + output limit (the engine's) */
    const char *const *names; /* (n_names >= 1) served model names; [0] is reported */
    int n_names;
    /* defaults of the sampling fields a request leaves out (a generation_config.json's) */
    float temperature, top_p, min_p, repetition_penalty;
    int32_t top_k;
} ds_oai_ctx;

/* A ds_oai_ctx with the OpenAI defaults (temperature 1, top_p 1, top_k 0, min_p 0,
 * repetition_penalty 1); the caller fills tok, vocab, max_model_len and names. */
ds_oai_ctx ds_oai_default_ctx(void);

typedef enum { DS_OAI_COMPLETION, DS_OAI_CHAT } ds_oai_kind;

typedef struct {
    int32_t *ids; /* (n) token ids, owned */
    int32_t n;
    int32_t max_tokens; /* for this prompt (chat's default: what is left of max_model_len) */
    char *text;         /* the prompt as text for echo (owned; NULL unless echo) */
} ds_oai_prompt;

/* A parsed, validated request. Everything in it is owned and freed by ds_oai_request_free. */
typedef struct {
    ds_oai_kind kind;
    ds_oai_prompt *prompts; /* (n_prompts): one for chat, one or more for completions */
    int32_t n_prompts;
    int32_t n;       /* choices per prompt */
    ds_request base; /* the engine request of every choice, without prompt and seed */
    int has_seed;
    uint64_t seed; /* the signed OpenAI seed, cast; choice i of a prompt gets seed + i */
    int stream, include_usage, continuous_usage;
    int echo;             /* completions: prepend the prompt */
    int logprobs;         /* -1: none; completions: logprobs; chat: top_logprobs (>= 0) */
    int return_token_ids; /* vLLM's extension: token ids in the response */
    int32_t *stop_ids;    /* owned arrays behind base */
    ds_logit_bias *bias;
    char **stop;
} ds_oai_request;

/* Parses body[0, len) as a /v1/completions (DS_OAI_COMPLETION) or /v1/chat/completions request
 * against c. 0 and *r filled (free with ds_oai_request_free), or -1 with *err filled: 400 for
 * malformed JSON, wrong types, out-of-range values, unsupported features and prompts that do
 * not fit max_model_len; 404 for an unknown model. Never touches an engine. Thread-safe. */
int ds_oai_parse(const ds_oai_ctx *c, ds_oai_kind kind, const char *body, size_t len,
                 ds_oai_request *r, ds_oai_error *err);
void ds_oai_request_free(ds_oai_request *r); /* accepts a zeroed struct */

/* Total choices (n_prompts x n). */
int32_t ds_oai_n_choices(const ds_oai_request *r);
/* The engine request of choice k (prompt k / n, sample k % n): r->base with the prompt's ids
 * and max_tokens, and the seed (seed + sample, or a fresh random key without a seed). The
 * arrays stay owned by r. */
void ds_oai_choice_request(const ds_oai_request *r, int32_t k, ds_request *q);

/* POST /tokenize and POST /detokenize (vLLM's): 0 and *out (new reference) or -1 with *err. */
int ds_oai_tokenize(const ds_oai_ctx *c, const char *body, size_t len, json_t **out,
                    ds_oai_error *err);
int ds_oai_detokenize(const ds_oai_ctx *c, const char *body, size_t len, json_t **out,
                      ds_oai_error *err);

/* ---- responses ------------------------------------------------------------------------------ */

/* The output state of one choice, fed with its engine events in order. */
typedef struct {
    int32_t index, prompt; /* choice index in the response; which prompt */
    int done;              /* the final event was seen */
    ds_finish_reason finish;
    int32_t stop_token; /* a user stop token that ended it, else -1 */
    char *stop_str;     /* the stop string that ended it (owned), else NULL */
    char *error;        /* DS_FINISH_ERROR: the engine's message (owned) */
    int32_t n_prompt, n_output, n_cached;
    double t_sched, t_first, t_end, t_prev; /* seconds since submit; -1 before */
    ds_buf text;         /* text not yet rendered (all of it when not streaming) */
    int echo_pending;    /* the prompt text still goes first */
    ds_reasoning rs;     /* streaming reasoning split */
    json_t *lp;          /* logprobs not yet rendered: chat: the content array; completions:
                            an object of the four arrays */
    json_t *ids;         /* token ids not yet rendered (return_token_ids) */
    int64_t text_offset; /* completions logprobs: code points before the next token */
    int role_sent;       /* chat stream: the assistant role chunk went out */
    int final_sent;      /* stream: the chunk with finish_reason went out */
} ds_oai_choice;

void ds_oai_choice_init(const ds_oai_request *r, int32_t k, ds_oai_choice *ch);
void ds_oai_choice_free(ds_oai_choice *ch);
/* Takes one engine event of the choice (the event keeps its strings). */
int ds_oai_choice_event(const ds_oai_ctx *c, const ds_oai_request *r, ds_oai_choice *ch,
                        const ds_engine_event *ev);

/* What every response carries. */
typedef struct {
    const char *id;    /* "cmpl-..." / "chatcmpl-..." */
    int64_t created;   /* unix seconds */
    const char *model; /* the served name */
} ds_oai_meta;

/* The whole (non-streamed) response of finished choices ch (n_ch); new reference. */
json_t *ds_oai_response(const ds_oai_ctx *c, const ds_oai_request *r, const ds_oai_meta *m,
                        ds_oai_choice *ch, int32_t n_ch);
/* Streaming: appends "data: {...}\n\n" events to out. _stream_start: chat's assistant-role
 * chunks; _stream_choice: the choice's new text/logprobs and, once done, its finish_reason
 * (nothing when there is nothing new); _stream_end: the usage chunk (when asked) and
 * "data: [DONE]". usage counts all choices. */
int ds_oai_stream_start(const ds_oai_request *r, const ds_oai_meta *m, ds_oai_choice *ch,
                        int32_t n_ch, ds_buf *out);
int ds_oai_stream_choice(const ds_oai_ctx *c, const ds_oai_request *r, const ds_oai_meta *m,
                         ds_oai_choice *ch, ds_oai_choice *all, int32_t n_all, ds_buf *out);
int ds_oai_stream_end(const ds_oai_request *r, const ds_oai_meta *m, ds_oai_choice *ch,
                      int32_t n_ch, ds_buf *out);
/* An error inside a stream: "data: {"error": ...}\n\n" then "data: [DONE]\n\n". */
int ds_oai_stream_error(const ds_oai_error *e, ds_buf *out);
/* {"prompt_tokens", "completion_tokens", "total_tokens", "prompt_tokens_details"}. */
json_t *ds_oai_usage(const ds_oai_request *r, const ds_oai_choice *ch, int32_t n_ch);

/* ---- metrics -------------------------------------------------------------------------------- */
typedef struct ds_metrics ds_metrics;

/* One finished engine request (a choice) as the metrics see it. */
typedef struct {
    ds_finish_reason finish;
    int32_t prompt_tokens, generation_tokens;
    double queue_s, ttft_s, e2e_s; /* < 0: unknown (never scheduled / no token) */
} ds_metrics_request;

int ds_metrics_open(ds_metrics **out);
void ds_metrics_close(ds_metrics *m); /* accepts NULL */
void ds_metrics_request_done(ds_metrics *m, const ds_metrics_request *r);
void ds_metrics_inter_token(ds_metrics *m, double seconds); /* one gap between two tokens */
void ds_metrics_http(ds_metrics *m, int status);            /* one answered HTTP request */
void ds_metrics_count(ds_metrics *m, const char *what); /* "disconnect", "rejected_queue_full" */
/* Prometheus text (version 0.0.4) of everything, engine gauges from st (NULL: not ready), with
 * the label model_name="model". Thread-safe. */
int ds_metrics_render(ds_metrics *m, const ds_engine_stats *st, const char *model,
                      int64_t http_in_flight, ds_buf *out);

/* ---- the server ----------------------------------------------------------------------------- */
typedef struct ds_server ds_server;

typedef struct {
    const char *host;           /* address to bind; default "127.0.0.1" */
    int port;                   /* default 8000; 0: any free port (ds_server_port) */
    const char *api_key;        /* NULL: no check; else "Authorization: Bearer KEY" on
                                   the /v1/ paths (constant-time compare) */
    size_t max_body_bytes;      /* larger bodies get 413; default 8 MiB */
    int max_connections;        /* default 1024 */
    int timeout_keep_alive_s;   /* idle connection timeout; default 5 */
    int request_read_timeout_s; /* headers + body must arrive within; default 30 */
    int max_queued_requests;    /* sequences waiting beyond max_num_seqs before 503;
                                   default 1024; < 0: unlimited */
    int32_t max_num_seqs;       /* the engine's (for the queue rule) */
    int log_requests;           /* one line per request; default 1 */
    const char *model_path;     /* reported as "root" by /v1/models */
    const char *version;        /* /version */
} ds_server_params;

ds_server_params ds_server_default_params(void);

/* Binds and starts answering: until ds_server_attach, /health and the API answer 503 (the
 * model is loading), /version and /metrics answer. DS_ERR_IO with a message when the address
 * cannot be bound, DS_ERR_ARG for bad params. */
int ds_server_open(const ds_server_params *p, ds_server **out);
int ds_server_port(const ds_server *s); /* the bound port */
/* The engine is ready: requests go to e with the mapping context c (copied; its pointers are
 * borrowed and must outlive ds_server_detach). */
void ds_server_attach(ds_server *s, ds_engine *e, const ds_oai_ctx *c);
/* Stops accepting connections (closes the listening socket); requests on open connections are
 * answered 503 with "Connection: close". Generation requests already running continue. */
void ds_server_drain(ds_server *s);
/* Generation requests in progress (HTTP requests, not choices). */
int64_t ds_server_in_flight(ds_server *s);
/* Stops using the engine (waits for calls into it to return): after this the engine may be
 * closed; handles of running requests stay valid and end with the engine's abort events. */
void ds_server_detach(ds_server *s);
/* Closes every connection and joins the server's threads. Accepts NULL. */
void ds_server_close(ds_server *s);
/* Logs one vLLM-style throughput line (prompt and generation tokens/s since the last call,
 * running, waiting, KV cache usage, prefix cache hit rate); quiet when idle unless force. */
void ds_server_log_stats(ds_server *s, int force);

#endif
