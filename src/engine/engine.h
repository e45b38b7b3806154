/* engine: the serving engine that sits between the HTTP threads and the model: paged KV cache,
 * scheduler, sampler, step loop and request lifecycle (docs/sampling.md for the sampler).
 *
 * Nothing here knows about HTTP; the server maps OpenAI request fields onto these structs and
 * ds_err codes onto HTTP statuses. Each section below is one concern; they share only core/. */
#ifndef DS_ENGINE_H
#define DS_ENGINE_H

#include "core/core.h"

#include <stddef.h>
#include <stdint.h>

/* ---- sampler ----------------------------------------------------------------------------------
 * Turns one sequence's logits into its next token, with vLLM V1's semantics for the OpenAI
 * sampling fields. Processing order (docs/sampling.md):
 *   logit_bias -> min_tokens mask -> repetition, frequency, presence penalties
 *   -> greedy argmax when temperature < DS_SAMPLER_GREEDY_EPS, else:
 *   temperature -> min_p -> top_k -> top_p -> one draw by inverse CDF.
 * The random draw for output token i of a request is a pure function of (seed, i, the processed
 * distribution): it does not depend on the batch, on other requests or on any global state. */

#define DS_SAMPLER_MAX_LOGPROBS 20  /* most top logprobs a request may ask for (vLLM's default) */
#define DS_SAMPLER_MAX_BIAS 100.0f  /* |logit_bias| limit (OpenAI's) */
#define DS_SAMPLER_GREEDY_EPS 1e-5f /* lower temperatures are greedy (vLLM's _SAMPLING_EPS) */

/* One logit_bias entry: bias is added to the token's logit. */
typedef struct {
    int32_t token;
    float bias; /* in [-100, 100] */
} ds_logit_bias;

/* Per-request sampling parameters. Every field has an "off" value, which is its default.
 * The arrays are borrowed: they must stay valid across each call that is given the struct. */
typedef struct {
    float temperature;        /* >= 0; < DS_SAMPLER_GREEDY_EPS: greedy argmax, ties to the lowest
                                 id, and top_k / top_p / min_p / seed are ignored. Default 1 */
    int32_t top_k;            /* keep tokens whose logit >= the k-th largest (ties kept);
                                 <= 0 or >= vocab: off. Default 0 */
    float top_p;              /* in (0, 1]: keep the smallest most-probable prefix holding
                                 >= top_p of the mass; 1: off. Default 1 */
    float min_p;              /* in [0, 1]: keep tokens with prob >= min_p * max prob; 0: off */
    float repetition_penalty; /* > 0; tokens seen in the prompt or the output: a positive logit
                                 is divided by it, a negative one multiplied. 1: off */
    float frequency_penalty;  /* in [-2, 2]; logit -= frequency_penalty * count in the output */
    float presence_penalty;   /* in [-2, 2]; logit -= presence_penalty if in the output at all */
    const ds_logit_bias *logit_bias; /* (n_logit_bias) added to the raw logits; duplicates add */
    int32_t n_logit_bias;
    int32_t min_tokens;      /* while fewer output tokens exist, stop_ids get -inf. 0: off */
    const int32_t *stop_ids; /* (n_stop_ids) EOS + the request's stop_token_ids: the tokens
                                min_tokens holds back (always validated) */
    int32_t n_stop_ids;
    uint64_t seed;    /* the request's random key; any value. A request that sets no
                         seed gets a fresh random key from the caller (e.g. getrandom).
                         An OpenAI signed seed maps by cast: -1 -> 0xffff...ff */
    int32_t logprobs; /* -1: none; 0: the sampled token's logprob and rank only;
                         1..20: also that many top (token, logprob) pairs. Default -1 */
} ds_sampling_params;

/* The defaults above: temperature 1, everything else off, seed 0, logprobs -1. */
ds_sampling_params ds_sampling_default_params(void);

/* Checks p against a vocabulary of `vocab` tokens. DS_OK, or DS_ERR_ARG with a message naming
 * the field and the bad value ("top_p = 0: must be in (0, 1]", "logit_bias[2].token = 129280:
 * outside the vocabulary [0, 129280)"). NaN and infinities are refused everywhere. Pure; any
 * thread. ds_sampler_sample runs it too, so bad params can never crash the sampler. */
int ds_sampling_params_validate(const ds_sampling_params *p, int32_t vocab);

/* Whether p makes output step n_output a plain argmax of the raw logits: greedy, with nothing
 * that changes a logit first (logit_bias, min_tokens' mask in force, a penalty) and no logprobs.
 * ds_sampler_sample then returns only the token, the logits' argmax_f32 (kernels.h) whenever that
 * token's logit is finite (else its error), so a caller that has the argmax (the model gives it
 * with the logits) may skip the sampler and its passes over the vocabulary. p must be valid. */
int ds_sampling_plain_greedy(const ds_sampling_params *p, int64_t n_output);

/* The uniform draw in [0, 1) for output step `step` of a request keyed `seed`: a counter-based
 * generator (two 64-bit finalizers over seed and step; the top 53 bits). Pure; any thread. */
double ds_sampler_uniform(uint64_t seed, uint64_t step);

typedef struct {
    int32_t token;
    float logprob;
} ds_token_logprob;

/* What one draw returns. The logprobs are "raw" (vLLM V1's default): the log-softmax of the
 * model's logits as given, before bias, penalties, temperature or truncation. */
typedef struct {
    int32_t token; /* the sampled token */
    float logprob; /* its raw logprob; 0 when p->logprobs < 0 */
    int64_t rank;  /* 1-based: how many tokens have a raw logit >= its own (vLLM's rank);
                      0 when p->logprobs < 0 */
    int32_t n_top; /* min(max(p->logprobs, 0), vocab) */
    ds_token_logprob top[DS_SAMPLER_MAX_LOGPROBS]; /* (n_top) by logprob descending, ties by
                                                      lower token id */
} ds_sample_result;

/* A sampler: scratch for one vocabulary size (about 33 bytes per token). Not thread-safe: open
 * one per thread that samples (the engine thread, or each worker of a parallel sampling loop).
 * Between calls it holds no request state, so any request may use any sampler. */
typedef struct ds_sampler ds_sampler;

/* vocab > 0 (129280 for DeepSeek-V3). DS_ERR_ARG / DS_ERR_NOMEM with a message on failure. */
int ds_sampler_open(int32_t vocab, ds_sampler **out);
void ds_sampler_close(ds_sampler *s); /* accepts NULL */
int32_t ds_sampler_vocab(const ds_sampler *s);

/* Samples output token number n_output of a request.
 * logits: (vocab) the model's raw logits for this position; read, never modified. -inf is a
 *   masked token; NaN or +inf gives DS_ERR_RANGE naming the token.
 * prompt: (n_prompt) the prompt's token ids; read only when repetition_penalty != 1.
 * output: (n_output) the tokens generated so far; read only when a penalty is on. n_output is
 *   also the step counter of the random draw, so it must count every generated token.
 * Ids read from prompt/output outside [0, vocab) give DS_ERR_RANGE.
 * Returns DS_OK and fills *out; DS_ERR_ARG for bad params (message names the field); DS_ERR_RANGE
 * when no token can be drawn because every logit is -inf after masking (e.g. min_tokens holds
 * back the only tokens left): the caller should fail the request with that message.
 * Cost: a few passes over the vocab, O(n_prompt + n_output) for the penalties, and a sort of
 * only the tokens whose logits lie within T/4 of the drawn one (and of the top_p cut); the
 * vocabulary is never sorted. No allocation. */
int ds_sampler_sample(ds_sampler *s, const float *logits, const ds_sampling_params *p,
                      const int32_t *prompt, int64_t n_prompt, const int32_t *output,
                      int64_t n_output, ds_sample_result *out);

/* The distribution ds_sampler_sample draws from for the same arguments: probs (vocab) receives
 * each token's probability after all processing (0 outside the kept set, and where a kept
 * token's weight underflows float; one-hot at the argmax when greedy). For tests, debugging and
 * verification of speculative tokens. Same errors. */
int ds_sampler_probs(ds_sampler *s, const float *logits, const ds_sampling_params *p,
                     const int32_t *prompt, int64_t n_prompt, const int32_t *output,
                     int64_t n_output, double *probs);

/* ---- engine -----------------------------------------------------------------------------------
 * One engine thread runs the model for every request: it takes submitted requests, schedules a
 * step (continuous batching, chunked prefill, preemption; scheduler.c), runs one batched
 * forward pass, samples each sequence that completed its tokens, and appends an event to that
 * request's queue. Any number of other threads submit requests, read their events and abort
 * them. The engine owns the paged KV cache (sized from kv_cache_memory or memory_utilization),
 * the block manager with its prefix cache, and one sampler per pool thread. */

typedef struct ds_model ds_model;         /* model/model.h */
typedef struct ds_tokenizer ds_tokenizer; /* tokenizer/tokenizer.h */
typedef struct ds_engine ds_engine;
typedef struct ds_req ds_req;

typedef struct {
    int32_t max_num_seqs;           /* running sequences at once; default 256 (vLLM's) */
    int32_t max_num_batched_tokens; /* tokens per step; default 2048 */
    int32_t max_model_len;          /* prompt + output per request; 0: the model's
                                       max_position_embeddings, capped to the KV capacity */
    int32_t block_size;             /* tokens per KV block; default 16 */
    uint64_t kv_cache_memory;       /* bytes of KV cache; 0: memory_utilization decides */
    double memory_utilization;      /* fraction of MemAvailable after the weights; default 0.9 */
    int kv_dtype;                   /* ds_kv_dtype (model.h); default f32 */
    int prefix_caching;             /* default 1 */
    const ds_tokenizer *tokenizer;  /* borrowed, may be NULL: then no text and no stop strings */
} ds_engine_params;

ds_engine_params ds_engine_default_params(void);

/* Sizes the cache, starts the engine thread. The model (borrowed) must outlive the engine; the
 * engine runs it from its own thread only. Prints (ds_info) the blocks, the tokens they hold and
 * the maximum concurrency at max_model_len. DS_ERR_ARG for bad params (message names the
 * field), DS_ERR_NOMEM when the cache cannot be had, DS_ERR_RANGE when an explicit max_model_len
 * does not fit the cache. */
int ds_engine_open(ds_model *m, const ds_engine_params *p, ds_engine **out);
/* Stops the thread; requests still queued or running end with DS_FINISH_ABORT events. Handles
 * not yet released stay valid until ds_req_release. Accepts NULL. */
void ds_engine_close(ds_engine *e);
int32_t ds_engine_max_model_len(const ds_engine *e);

typedef struct {
    const int32_t *prompt; /* (n_prompt >= 1) token ids, copied */
    int32_t n_prompt;
    int32_t max_tokens;            /* >= 1; n_prompt + max_tokens <= max_model_len */
    ds_sampling_params sampling;   /* arrays copied; min_tokens holds back EOS and stop_token_ids */
    int ignore_eos;                /* do not stop at the model's EOS tokens */
    const int32_t *stop_token_ids; /* (n_stop_token_ids) extra tokens that end the output */
    int32_t n_stop_token_ids;
    const char *const *stop; /* (n_stop) strings that end the output, found in the text and
                                not emitted; needs a tokenizer */
    int32_t n_stop;
    int include_stop_str;    /* emit the matched stop string (vLLM include_stop_str_in_output) */
    int skip_special_tokens; /* text leaves special tokens out (default in OpenAI servers: 1) */
    /* Called from the engine thread after events were queued for this request (e.g. to resume a
     * suspended connection). Must not call back into the engine with its lock held. It may run
     * after the reader took the final event, even after ds_req_release: notify_ctx must stay
     * valid until ds_engine_close returns (e.g. an object of a pool the caller recycles). */
    void (*notify)(void *ctx);
    void *notify_ctx;
} ds_request;

typedef enum {
    DS_FINISH_NONE = 0, /* more events follow */
    DS_FINISH_STOP,     /* EOS, a stop token or a stop string */
    DS_FINISH_LENGTH,   /* max_tokens reached */
    DS_FINISH_ABORT,    /* aborted (ds_req_abort, release, or the engine closed) */
    DS_FINISH_ERROR,    /* failed; error holds the message */
} ds_finish_reason;

/* One event of a request, in order: usually one generated token and its text delta. */
typedef struct {
    int32_t token;           /* the generated token; -1 when the event carries none */
    ds_sample_result sample; /* its logprobs, when the request asked for them */
    char *text;              /* (text_len) UTF-8 delta, owned; NULL without a tokenizer */
    size_t text_len;
    ds_finish_reason finish;
    int32_t stop_token; /* DS_FINISH_STOP by a token: that token, else -1 */
    char *stop_str;     /* DS_FINISH_STOP by a string: a copy of it, else NULL */
    char *error;        /* DS_FINISH_ERROR: the message */
    /* counts and timings, current as of this event (seconds since submit) */
    int32_t n_prompt, n_output, n_cached; /* n_cached: prompt tokens served by the prefix cache */
    double t_scheduled, t_first_token, t_now;
} ds_engine_event;

/* Frees the event's strings (the struct itself is the caller's). */
void ds_engine_event_free(ds_engine_event *ev);

/* Queues a request. DS_OK and a handle (owned by the caller until ds_req_release); DS_ERR_ARG
 * for bad fields (message names the field), DS_ERR_RANGE when it cannot fit max_model_len,
 * DS_ERR_CLOSED when the engine is shutting down. Thread-safe. */
int ds_engine_submit(ds_engine *e, const ds_request *r, ds_req **out);
/* Takes the next event, waiting up to timeout_s (< 0: forever). DS_OK with *ev filled;
 * DS_ERR_TIMEOUT when none came; DS_ERR_CLOSED after the final event was taken (or, only when
 * the engine ran out of memory queueing it, once the request ended without one). Thread-safe,
 * one reader per request. */
int ds_req_next(ds_req *r, ds_engine_event *ev, double timeout_s);
/* Asks the engine to stop the request; its blocks are freed at the next step and a final
 * DS_FINISH_ABORT event follows (unless it finished first). Thread-safe, idempotent. */
void ds_req_abort(ds_req *r);
/* The caller is done with the handle: aborts the request if it is still going, and frees it
 * once the engine is done with it too. Accepts NULL. */
void ds_req_release(ds_req *r);
uint64_t ds_req_id(const ds_req *r);

/* Engine statistics (for /metrics); a consistent snapshot. */
typedef struct {
    int32_t n_running, n_waiting;
    int32_t kv_blocks_total, kv_blocks_free, block_size;
    uint64_t kv_bytes_per_token;
    uint64_t prefix_queries, prefix_hits;      /* in prompt tokens at admission */
    uint64_t prompt_tokens, generation_tokens; /* tokens run through prefill / generated */
    uint64_t steps, preemptions;
    uint64_t requests_finished[5]; /* by ds_finish_reason */
    double busy_seconds;           /* in forward + sampling */
} ds_engine_stats;
void ds_engine_get_stats(ds_engine *e, ds_engine_stats *out);

#endif
