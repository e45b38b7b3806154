/* The engine: one thread that owns the model, the KV cache and the scheduler, and the request
 * handles other threads talk to it through.
 *
 * Threads. Submitters (HTTP threads, the batch CLI) and readers only touch a request's handle
 * under the engine mutex: submit appends to an incoming list, abort sets a flag, next pops the
 * request's event queue (waiting on its own condition variable). The engine thread takes the
 * incoming requests and the abort flags under the mutex, then runs a whole step without it:
 * schedule, build the batch, forward, sample, detokenize, check stops; it takes the mutex again
 * only to append the step's events and wake their readers. So a reader never waits for a
 * forward pass to finish to get the events already made, and a slow reader never slows the
 * engine: events queue up (a handful of bytes each plus the text).
 *
 * Lifetime. A handle has two owners, the caller and the engine, and is freed when both let go:
 * the engine after the final event, the caller with ds_req_release (which also aborts a
 * request still going). The final event carries the finish reason; after it is taken next
 * returns DS_ERR_CLOSED. Every accepted request gets exactly one final event, whatever
 * happens: finished, stopped, aborted, failed, or the engine closed.
 *
 * Text. When the engine has a tokenizer, each event carries the text its token added, made by
 * an incremental detokenizer (only whole UTF-8 characters). Stop strings are searched in the
 * text: the text that could still be the start of a stop string is held back until it cannot
 * (or the output ends), a match ends the request and the text from the match on is dropped
 * (vLLM's behaviour, include_stop_str keeps the string). EOS and stop tokens end the request
 * without text. Stop checks start once min_tokens tokens exist, as in vLLM.
 *
 * Sampling runs on the model's thread pool, one sampler per pool slice, sequences split across
 * slices; the draws do not depend on the split (ds_sampler_uniform is keyed by seed and step).
 * A plain greedy step (ds_sampling_plain_greedy) takes the argmax the forward pass returns. */
#include "engine/engine_internal.h"
#include "model/model.h"
#include "tokenizer/tokenizer.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

struct ds_req {
    uint64_t id;
    ds_engine *e;
    int refs; /* owners: the caller and the engine (under e->mu) */
    /* the request, copied at submit */
    int32_t max_tokens;
    ds_sampling_params sp;
    ds_logit_bias *bias;
    int32_t *stop_ids; /* EOS (unless ignore_eos) + stop_token_ids: min_tokens holds them back */
    int32_t n_stop_ids, n_user_stop_ids; /* the user's are stop_ids[n_stop_ids - n_user ..] */
    char **stop;
    int32_t n_stop;
    size_t max_stop_len;
    int include_stop_str, ignore_eos;
    void (*notify)(void *ctx);
    void *notify_ctx;
    /* engine thread */
    ds_seq *seq;
    int has_detok;
    ds_detok detok;
    ds_buf held; /* text not yet emitted: it may begin a stop string */
    int32_t n_output;
    double t_submit, t_sched, t_first;
    ds_sample_result sample; /* this step's draw */
    int sample_rc;
    char sample_err[256];
    /* shared, under e->mu */
    int abort_flag;
    int abort_seen;  /* engine thread: abort_flag as read at the start of the step */
    int done;        /* the engine queued the final event */
    int final_taken; /* the reader took it */
    ds_engine_event *evq;
    size_t ev_head, ev_len, ev_cap;
    pthread_cond_t cond;
    ds_req *next_incoming;
    ds_req *prev_active, *next_active; /* engine thread's list of requests it holds */
};

struct ds_engine {
    ds_model *m;
    const ds_config *c;
    ds_engine_params p;
    ds_kv_cache *kv;
    ds_blocks *blocks;
    ds_sched sched;
    ds_sampler **samplers;
    int n_samplers;
    int32_t *eos;
    int n_eos;
    /* step buffers, sized for max_num_batched_tokens tokens and max_num_seqs sequences */
    ds_seq **plan;
    int32_t *tokens, *positions, *seqidx, *tables, *logits_idx;
    ds_req **sampled;
    float *logits;
    int32_t *argmax;    /* of each logits row, from the forward pass (greedy without the sampler) */
    int32_t max_blocks; /* block table width: blocks of max_model_len */
    /* shared */
    pthread_t thread;
    int thread_started;
    pthread_mutex_t mu;
    pthread_cond_t wake;
    int stopping;
    int closed;   /* ds_engine_close ran; the struct lives on until live == 0 */
    int64_t live; /* request handles not freed yet */
    ds_req *in_head, *in_tail;
    ds_req *active; /* engine thread only */
    uint64_t next_id;
    ds_engine_stats stats; /* under mu */
};

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

ds_engine_params ds_engine_default_params(void) {
    ds_engine_params p;
    memset(&p, 0, sizeof p);
    p.max_num_seqs = 256;
    p.max_num_batched_tokens = 2048;
    p.block_size = 16;
    p.memory_utilization = 0.9;
    p.kv_dtype = DS_KV_F32;
    p.prefix_caching = 1;
    return p;
}

/* ---- requests ---- */

static void req_free(ds_req *r) {
    for (size_t i = 0; i < r->ev_len; i++)
        ds_engine_event_free(&r->evq[(r->ev_head + i) % r->ev_cap]);
    free(r->evq);
    free(r->bias);
    free(r->stop_ids);
    for (int32_t i = 0; i < r->n_stop; i++) free(r->stop[i]);
    free(r->stop);
    ds_buf_free(&r->held);
    ds_seq_free(r->seq);
    pthread_cond_destroy(&r->cond);
    free(r);
}

/* Drops one owner; frees at zero. Under e->mu. Returns 1 when that was the last handle of a
 * closed engine: the caller frees the engine's shell once it has unlocked (engine_free_shell). */
static int req_unref(ds_req *r) {
    ds_engine *e = r->e;
    if (--r->refs) return 0;
    req_free(r);
    return --e->live == 0 && e->closed;
}

/* The engine's struct outlives ds_engine_close while handles remain (they use its mutex). */
static void engine_free_shell(ds_engine *e) {
    pthread_cond_destroy(&e->wake);
    pthread_mutex_destroy(&e->mu);
    free(e);
}

void ds_engine_event_free(ds_engine_event *ev) {
    if (!ev) return;
    free(ev->text);
    free(ev->stop_str);
    free(ev->error);
    ev->text = ev->stop_str = ev->error = NULL;
}

/* Appends ev to r's queue (takes its strings). Under e->mu. DS_ERR_NOMEM leaves ev untouched. */
static int push_event(ds_req *r, ds_engine_event *ev) {
    if (r->ev_len == r->ev_cap) {
        size_t cap = r->ev_cap ? 2 * r->ev_cap : 8;
        ds_engine_event *q = malloc(cap * sizeof *q);
        if (!q) return DS_ERR_NOMEM;
        for (size_t i = 0; i < r->ev_len; i++) q[i] = r->evq[(r->ev_head + i) % r->ev_cap];
        free(r->evq);
        r->evq = q;
        r->ev_head = 0;
        r->ev_cap = cap;
    }
    r->evq[(r->ev_head + r->ev_len) % r->ev_cap] = *ev;
    r->ev_len++;
    pthread_cond_signal(&r->cond);
    return DS_OK;
}

static char *dup_str(const char *s, size_t n) {
    char *d = malloc(n + 1);
    if (d) {
        memcpy(d, s, n);
        d[n] = 0;
    }
    return d;
}

int ds_engine_submit(ds_engine *e, const ds_request *q, ds_req **out) {
    *out = NULL;
    const int32_t V = (int32_t)e->c->vocab_size, L = e->p.max_model_len;
    if (!q->prompt || q->n_prompt < 1) return ds_err_set(DS_ERR_ARG, "the prompt is empty");
    if (q->max_tokens < 1)
        return ds_err_set(DS_ERR_ARG, "max_tokens = %d: must be at least 1", q->max_tokens);
    if (q->n_prompt > L || q->max_tokens > L - q->n_prompt)
        return ds_err_set(DS_ERR_RANGE,
                          "this model's maximum context length is %d tokens, but %lld were "
                          "requested (%d in the prompt, %d for the output)",
                          L, (long long)q->n_prompt + q->max_tokens, q->n_prompt, q->max_tokens);
    for (int32_t i = 0; i < q->n_prompt; i++)
        if (q->prompt[i] < 0 || q->prompt[i] >= V)
            return ds_err_set(DS_ERR_ARG,
                              "prompt token %d at index %d is outside the vocabulary "
                              "[0, %d)",
                              q->prompt[i], i, V);
    if (q->n_stop_token_ids < 0 || q->n_stop < 0 || (q->n_stop_token_ids && !q->stop_token_ids) ||
        (q->n_stop && !q->stop))
        return ds_err_set(DS_ERR_ARG, "stop lists: bad count");
    if (q->n_stop && !e->p.tokenizer)
        return ds_err_set(DS_ERR_ARG, "stop strings need a tokenizer, and this engine has none");
    ds_req *r = calloc(1, sizeof *r);
    if (!r) return ds_err_set(DS_ERR_NOMEM, "out of memory (request)");
    pthread_cond_init(&r->cond, NULL);
    r->e = e;
    r->max_tokens = q->max_tokens;
    r->sp = q->sampling;
    r->include_stop_str = q->include_stop_str;
    r->ignore_eos = q->ignore_eos;
    r->notify = q->notify;
    r->notify_ctx = q->notify_ctx;
    int nomem = 0;
    if (q->sampling.n_logit_bias > 0) {
        if (!q->sampling.logit_bias) {
            req_free(r);
            return ds_err_set(DS_ERR_ARG, "logit_bias: %d entries but no array",
                              q->sampling.n_logit_bias);
        }
        r->bias = malloc((size_t)q->sampling.n_logit_bias * sizeof *r->bias);
        if (r->bias)
            memcpy(r->bias, q->sampling.logit_bias,
                   (size_t)q->sampling.n_logit_bias * sizeof *r->bias);
        nomem |= !r->bias;
    }
    r->sp.logit_bias = r->bias;
    int32_t n_eos = q->ignore_eos ? 0 : e->n_eos;
    r->stop_ids = malloc(((size_t)n_eos + (size_t)q->n_stop_token_ids + 1) * sizeof(int32_t));
    nomem |= !r->stop_ids;
    if (r->stop_ids) {
        memcpy(r->stop_ids, e->eos, (size_t)n_eos * sizeof(int32_t));
        if (q->n_stop_token_ids)
            memcpy(r->stop_ids + n_eos, q->stop_token_ids,
                   (size_t)q->n_stop_token_ids * sizeof(int32_t));
        r->n_stop_ids = n_eos + q->n_stop_token_ids;
        r->n_user_stop_ids = q->n_stop_token_ids;
    }
    r->sp.stop_ids = r->stop_ids;
    r->sp.n_stop_ids = r->n_stop_ids;
    if (q->n_stop) {
        r->stop = calloc((size_t)q->n_stop, sizeof(char *));
        nomem |= !r->stop;
        for (int32_t i = 0; r->stop && i < q->n_stop; i++) {
            size_t n = q->stop[i] ? strlen(q->stop[i]) : 0;
            if (n == 0) {
                req_free(r);
                return ds_err_set(DS_ERR_ARG, "stop[%d] is empty", i);
            }
            r->stop[i] = dup_str(q->stop[i], n);
            nomem |= !r->stop[i];
            r->n_stop = i + 1;
            if (n > r->max_stop_len) r->max_stop_len = n;
        }
    }
    if (!nomem) r->seq = ds_seq_new(q->prompt, q->n_prompt, q->max_tokens, r);
    if (nomem || !r->seq) {
        req_free(r);
        return ds_err_set(DS_ERR_NOMEM, "out of memory (request)");
    }
    int rc = ds_sampling_params_validate(&r->sp, V);
    if (rc) {
        req_free(r);
        return rc;
    }
    if (e->p.tokenizer) {
        ds_detok_init(&r->detok, e->p.tokenizer, q->skip_special_tokens);
        r->has_detok = 1;
    }
    r->refs = 2;
    r->t_submit = now();
    pthread_mutex_lock(&e->mu);
    if (e->stopping) {
        pthread_mutex_unlock(&e->mu);
        req_free(r);
        return ds_err_set(DS_ERR_CLOSED, "the engine is shutting down");
    }
    r->id = ++e->next_id;
    e->live++;
    if (e->in_tail)
        e->in_tail->next_incoming = r;
    else
        e->in_head = r;
    e->in_tail = r;
    e->stats.n_waiting++;
    pthread_cond_signal(&e->wake);
    pthread_mutex_unlock(&e->mu);
    *out = r;
    return DS_OK;
}

int ds_req_next(ds_req *r, ds_engine_event *ev, double timeout_s) {
    ds_engine *e = r->e;
    memset(ev, 0, sizeof *ev);
    pthread_mutex_lock(&e->mu);
    struct timespec until;
    if (timeout_s >= 0) {
        clock_gettime(CLOCK_REALTIME, &until);
        double t = (double)until.tv_sec + 1e-9 * (double)until.tv_nsec + timeout_s;
        until.tv_sec = (time_t)t;
        until.tv_nsec = (long)((t - (double)until.tv_sec) * 1e9);
    }
    while (r->ev_len == 0 && !r->final_taken) {
        if (timeout_s < 0) {
            pthread_cond_wait(&r->cond, &e->mu);
        } else if (pthread_cond_timedwait(&r->cond, &e->mu, &until) != 0 && r->ev_len == 0) {
            pthread_mutex_unlock(&e->mu);
            return DS_ERR_TIMEOUT;
        }
    }
    if (r->ev_len == 0) { /* the final event was taken before */
        pthread_mutex_unlock(&e->mu);
        return DS_ERR_CLOSED;
    }
    *ev = r->evq[r->ev_head];
    r->ev_head = (r->ev_head + 1) % r->ev_cap;
    r->ev_len--;
    if (ev->finish != DS_FINISH_NONE) r->final_taken = 1;
    pthread_mutex_unlock(&e->mu);
    return DS_OK;
}

void ds_req_abort(ds_req *r) {
    if (!r) return;
    pthread_mutex_lock(&r->e->mu);
    if (!r->done) {
        r->abort_flag = 1;
        pthread_cond_signal(&r->e->wake);
    }
    pthread_mutex_unlock(&r->e->mu);
}

void ds_req_release(ds_req *r) {
    if (!r) return;
    ds_engine *e = r->e;
    pthread_mutex_lock(&e->mu);
    if (!r->done) {
        r->abort_flag = 1;
        if (!e->closed) pthread_cond_signal(&e->wake);
    }
    int last = req_unref(r);
    pthread_mutex_unlock(&e->mu);
    if (last) engine_free_shell(e);
}

uint64_t ds_req_id(const ds_req *r) {
    return r->id;
}

/* ---- the engine thread: events ---- */

/* The notify hooks to call after a step. They are copied out of the requests because a request
 * that got its final event may be released (and freed) by its reader before the hooks run. */
typedef struct {
    void (*fn)(void *ctx);
    void *ctx;
} notify_hook;

typedef struct {
    notify_hook *h;
    size_t n, cap;
} notify_list;

static void notify_add(notify_list *l, ds_req *r) {
    if (!r->notify) return;
    for (size_t i = 0; i < l->n; i++)
        if (l->h[i].fn == r->notify && l->h[i].ctx == r->notify_ctx) return;
    if (l->n == l->cap) {
        size_t cap = l->cap ? 2 * l->cap : 64;
        notify_hook *p = realloc(l->h, cap * sizeof *p);
        if (!p) return; /* the reader still wakes on its condition variable */
        l->h = p;
        l->cap = cap;
    }
    l->h[l->n].fn = r->notify;
    l->h[l->n++].ctx = r->notify_ctx;
}

static void notify_run(notify_list *l) {
    for (size_t i = 0; i < l->n; i++) l->h[i].fn(l->h[i].ctx);
    l->n = 0;
}

/* Queues an event under the lock; on the final one the engine lets go of the request. */
static void deliver(ds_engine *e, ds_req *r, ds_engine_event *ev, notify_list *nl) {
    ev->n_prompt = r->seq->n_prompt;
    ev->n_output = r->n_output;
    ev->n_cached = r->seq->n_cached;
    double t = now();
    ev->t_scheduled = r->t_sched > 0 ? r->t_sched - r->t_submit : -1;
    ev->t_first_token = r->t_first > 0 ? r->t_first - r->t_submit : -1;
    ev->t_now = t - r->t_submit;
    const ds_finish_reason fin = ev->finish;
    pthread_mutex_lock(&e->mu);
    if (push_event(r, ev) != DS_OK) {
        /* no memory to queue it: the event is lost; if it was the final one, the reader's next
         * call reports DS_ERR_CLOSED instead of waiting for it forever */
        ds_engine_event_free(ev);
        if (fin != DS_FINISH_NONE) r->final_taken = 1;
    }
    if (fin != DS_FINISH_NONE) {
        r->done = 1;
        e->stats.requests_finished[fin]++;
        pthread_cond_signal(&r->cond);
    }
    notify_add(nl, r);
    pthread_mutex_unlock(&e->mu);
}

static void active_unlink(ds_engine *e, ds_req *r) {
    if (r->prev_active)
        r->prev_active->next_active = r->next_active;
    else
        e->active = r->next_active;
    if (r->next_active) r->next_active->prev_active = r->prev_active;
    r->prev_active = r->next_active = NULL;
}

/* Ends r: the remaining text (flushed detokenizer, held-back text) rides on the final event,
 * which ev already describes; r leaves the scheduler and the engine's hands. */
static void finish(ds_engine *e, ds_req *r, ds_engine_event *ev, int flush, notify_list *nl) {
    if (r->has_detok && flush) {
        ds_buf tail = {0};
        if (ds_detok_finish(&r->detok, &tail) == DS_OK && tail.len)
            ds_buf_append(&r->held, tail.data, tail.len);
        ds_buf_free(&tail);
        if (r->held.len) {
            size_t n = ev->text_len + r->held.len;
            char *t = malloc(n + 1);
            if (t) {
                if (ev->text_len) memcpy(t, ev->text, ev->text_len);
                memcpy(t + ev->text_len, r->held.data, r->held.len);
                t[n] = 0;
                free(ev->text);
                ev->text = t;
                ev->text_len = n;
            }
        }
        ds_buf_free(&r->held);
    }
    if (r->has_detok && !ev->text) {
        ev->text = dup_str("", 0);
        ev->text_len = 0;
    }
    ds_sched_remove(&e->sched, r->seq);
    active_unlink(e, r);
    deliver(e, r, ev, nl);
    pthread_mutex_lock(&e->mu);
    (void)req_unref(r); /* the engine is open: never its last handle */
    pthread_mutex_unlock(&e->mu);
}

static void fail(ds_engine *e, ds_req *r, ds_finish_reason why, const char *msg, notify_list *nl) {
    ds_engine_event ev = {0};
    ev.token = -1;
    ev.stop_token = -1;
    ev.finish = why;
    if (msg) ev.error = dup_str(msg, strlen(msg));
    finish(e, r, &ev, why != DS_FINISH_ERROR, nl);
}

static int is_user_stop(const ds_req *r, int32_t tok) {
    for (int32_t i = r->n_stop_ids - r->n_user_stop_ids; i < r->n_stop_ids; i++)
        if (r->stop_ids[i] == tok) return 1;
    return 0;
}

static int is_eos(const ds_engine *e, const ds_req *r, int32_t tok) {
    if (r->ignore_eos) return 0;
    for (int i = 0; i < e->n_eos; i++)
        if (e->eos[i] == tok) return 1;
    return 0;
}

/* Text handling of a new token: appends its text to held, then finds a stop string in held or
 * releases what can no longer begin one. *emit / *n_emit is the text to send now (pointing into
 * held, valid until held changes); returns the index of the matched stop string or -1. */
static int32_t text_step(ds_req *r, int32_t tok, int check_stops, size_t *n_emit) {
    ds_buf piece = {0};
    int rc = ds_detok_push(&r->detok, tok, &piece);
    if (rc == DS_OK && piece.len) ds_buf_append(&r->held, piece.data, piece.len);
    ds_buf_free(&piece);
    *n_emit = r->held.len;
    if (!check_stops || !r->n_stop) return -1;
    /* the earliest match of any stop string */
    size_t best = (size_t)-1;
    int32_t which = -1;
    for (int32_t i = 0; i < r->n_stop; i++) {
        const char *hit =
            r->held.len ? memmem(r->held.data, r->held.len, r->stop[i], strlen(r->stop[i])) : NULL;
        if (hit && (size_t)(hit - r->held.data) < best) {
            best = (size_t)(hit - r->held.data);
            which = i;
        }
    }
    if (which >= 0) {
        *n_emit = best + (r->include_stop_str ? strlen(r->stop[which]) : 0);
        return which;
    }
    /* hold back the longest tail that is a proper prefix of some stop string */
    size_t keep = 0;
    for (int32_t i = 0; i < r->n_stop; i++) {
        size_t sl = strlen(r->stop[i]);
        for (size_t k = sl - 1 < r->held.len ? sl - 1 : r->held.len; k > keep; k--)
            if (!memcmp(r->held.data + r->held.len - k, r->stop[i], k)) {
                keep = k;
                break;
            }
    }
    *n_emit = r->held.len - keep;
    return -1;
}

/* The step's sampled token of r: append, text, stops, event. */
static void on_token(ds_engine *e, ds_req *r, notify_list *nl) {
    if (r->sample_rc != DS_OK) {
        fail(e, r, DS_FINISH_ERROR, r->sample_err, nl);
        return;
    }
    int32_t tok = r->sample.token;
    if (ds_seq_append(r->seq, tok) != DS_OK) {
        fail(e, r, DS_FINISH_ERROR, "out of memory (sequence)", nl);
        return;
    }
    r->n_output++;
    if (r->n_output == 1) r->t_first = now();
    pthread_mutex_lock(&e->mu);
    e->stats.generation_tokens++;
    pthread_mutex_unlock(&e->mu);
    ds_engine_event ev = {0};
    ev.token = tok;
    ev.stop_token = -1;
    if (r->sp.logprobs >= 0) ev.sample = r->sample;
    const int checks = r->n_output >= r->sp.min_tokens;
    int stop_tok = checks && (is_eos(e, r, tok) || is_user_stop(r, tok));
    if (stop_tok) { /* no text for the stop token itself */
        ev.finish = DS_FINISH_STOP;
        ev.stop_token = tok;
        finish(e, r, &ev, 1, nl);
        return;
    }
    if (r->has_detok) {
        size_t n_emit;
        int32_t which = text_step(r, tok, checks, &n_emit);
        ev.text = dup_str(r->held.data ? r->held.data : "", n_emit);
        ev.text_len = ev.text ? n_emit : 0;
        if (which >= 0) {
            ev.finish = DS_FINISH_STOP;
            ev.stop_str = dup_str(r->stop[which], strlen(r->stop[which]));
            ds_buf_free(&r->held); /* what follows the stop string is dropped */
            finish(e, r, &ev, 0, nl);
            return;
        }
        /* drop the emitted prefix of held */
        if (n_emit) memmove(r->held.data, r->held.data + n_emit, r->held.len - n_emit);
        r->held.len -= n_emit;
        if (r->held.data) r->held.data[r->held.len] = 0;
    }
    if (r->n_output >= r->max_tokens) {
        ev.finish = DS_FINISH_LENGTH;
        finish(e, r, &ev, 1, nl);
        return;
    }
    deliver(e, r, &ev, nl);
}

/* ---- the engine thread: steps ---- */

typedef struct {
    ds_engine *e;
    int32_t n;
} sample_ctx;

static void sample_task(void *arg, int slice, int n_slices) {
    sample_ctx *c = arg;
    ds_engine *e = c->e;
    size_t i0, i1;
    ds_split_range((size_t)c->n, slice, n_slices, &i0, &i1);
    ds_sampler *s = e->samplers[slice % e->n_samplers];
    for (size_t i = i0; i < i1; i++) {
        ds_req *r = e->sampled[i];
        const ds_seq *q = r->seq;
        const float *logits = e->logits + i * (size_t)e->c->vocab_size;
        const int32_t am = e->argmax[i];
        if (am >= 0 && isfinite(logits[am]) &&
            ds_sampling_plain_greedy(&r->sp, q->n_tokens - q->n_prompt)) {
            /* the sampler's result for these params (engine.h), without its three passes over
             * the logits (copy, check, argmax): 2.5 ms for 64 rows on two Zen 4 threads */
            memset(&r->sample, 0, sizeof r->sample);
            r->sample.token = am;
            r->sample_rc = DS_OK;
            continue;
        }
        r->sample_rc =
            ds_sampler_sample(s, logits, &r->sp, q->tokens, q->n_prompt, q->tokens + q->n_prompt,
                              q->n_tokens - q->n_prompt, &r->sample);
        if (r->sample_rc) snprintf(r->sample_err, sizeof r->sample_err, "%s", ds_err_msg());
    }
}

/* One step: schedule, forward, sample, events. 0 when nothing could run. */
static int step(ds_engine *e, notify_list *nl) {
    int32_t n_seq = ds_sched_step(&e->sched, e->plan);
    if (n_seq == 0) return 0;
    double t0 = now();
    int32_t n_tok = 0, n_logits = 0;
    const int32_t maxb = e->max_blocks;
    uint64_t prefill = 0;
    for (int32_t s = 0; s < n_seq; s++) {
        ds_seq *q = e->plan[s];
        ds_req *r = q->owner;
        if (r->t_sched == 0) r->t_sched = t0;
        for (int32_t j = 0; j < q->sched_n; j++) {
            int32_t p = q->n_computed + j;
            e->tokens[n_tok] = q->tokens[p];
            e->positions[n_tok] = p;
            e->seqidx[n_tok] = s;
            n_tok++;
        }
        if (q->n_computed < q->n_prompt)
            prefill +=
                (uint64_t)(q->sched_n < q->n_prompt - q->n_computed ? q->sched_n
                                                                    : q->n_prompt - q->n_computed);
        memcpy(e->tables + (size_t)s * (size_t)maxb, q->blocks,
               (size_t)q->n_blocks * sizeof(int32_t));
        if (q->n_computed + q->sched_n == q->n_tokens) {
            e->logits_idx[n_logits] = n_tok - 1;
            e->sampled[n_logits++] = r;
        }
    }
    ds_batch b = {n_tok, e->tokens, e->positions, e->seqidx,    n_seq,
                  maxb,  e->tables, n_logits,     e->logits_idx};
    int rc = ds_model_forward_batch(e->m, e->kv, &b, e->logits, e->argmax);
    /* a weight file written to during the step may have fed it: none of its tokens go out (every
     * later step fails the same way until the server is restarted) */
    const char *what = "forward pass failed";
    if (!rc && (rc = ds_model_check_files(e->m)))
        what = "the weights are no longer the ones loaded (restart to load the new ones)";
    if (rc) { /* a broken invariant of the batch, or the weights: fail what was in it */
        char msg[1024];
        snprintf(msg, sizeof msg, "%s: %s", what, ds_err_msg());
        ds_warn("%s", msg);
        for (int32_t s = 0; s < n_seq; s++) fail(e, e->plan[s]->owner, DS_FINISH_ERROR, msg, nl);
        return 1;
    }
    for (int32_t s = 0; s < n_seq; s++) ds_sched_computed(&e->sched, e->plan[s]);
    sample_ctx sc = {e, n_logits};
    if (n_logits > 1)
        ds_pool_run(ds_model_pool(e->m), sample_task, &sc);
    else if (n_logits == 1)
        sample_task(&sc, 0, 1);
    for (int32_t i = 0; i < n_logits; i++) on_token(e, e->sampled[i], nl);
    pthread_mutex_lock(&e->mu);
    e->stats.steps++;
    e->stats.prompt_tokens += prefill;
    e->stats.busy_seconds += now() - t0;
    pthread_mutex_unlock(&e->mu);
    return 1;
}

static void update_stats(ds_engine *e) {
    ds_blocks_stats bs;
    ds_blocks_get_stats(e->blocks, &bs);
    pthread_mutex_lock(&e->mu);
    e->stats.n_running = e->sched.running.n;
    int32_t incoming = 0;
    for (ds_req *r = e->in_head; r; r = r->next_incoming) incoming++;
    e->stats.n_waiting = e->sched.waiting.n + incoming;
    e->stats.kv_blocks_free = bs.n_free;
    e->stats.prefix_queries = e->sched.prompt_tokens_total;
    e->stats.prefix_hits = e->sched.prompt_tokens_cached;
    e->stats.preemptions = e->sched.preemptions;
    pthread_mutex_unlock(&e->mu);
}

static void *engine_main(void *arg) {
    ds_engine *e = arg;
    notify_list nl = {0};
    for (;;) {
        pthread_mutex_lock(&e->mu);
        while (!e->stopping && !e->in_head && !e->active) pthread_cond_wait(&e->wake, &e->mu);
        int stopping = e->stopping;
        ds_req *in = e->in_head;
        e->in_head = e->in_tail = NULL;
        /* the abort flags, read once per step */
        for (ds_req *r = e->active; r; r = r->next_active) r->abort_seen = r->abort_flag;
        for (ds_req *r = in; r; r = r->next_incoming) r->abort_seen = r->abort_flag;
        pthread_mutex_unlock(&e->mu);
        for (ds_req *r = in, *next; r; r = next) {
            next = r->next_incoming;
            r->next_incoming = NULL;
            r->next_active = e->active;
            if (e->active) e->active->prev_active = r;
            e->active = r;
            ds_sched_add(&e->sched, r->seq);
        }
        for (ds_req *r = e->active, *next; r; r = next) {
            next = r->next_active;
            if (stopping || r->abort_seen) fail(e, r, DS_FINISH_ABORT, NULL, &nl);
        }
        if (stopping) break;
        int ran = step(e, &nl);
        if (!ran && e->sched.waiting.n && !e->sched.running.n) {
            /* cannot happen when one request always fits (see ds_engine_open); never spin */
            ds_req *r = e->sched.waiting.head->owner;
            fail(e, r, DS_FINISH_ERROR, "the KV cache cannot hold this request", &nl);
        }
        update_stats(e);
        notify_run(&nl);
    }
    update_stats(e);
    notify_run(&nl);
    free(nl.h);
    return NULL;
}

/* ---- open / close ---- */

static int check_params(const ds_engine_params *p) {
    if (p->max_num_seqs < 1 || p->max_num_seqs > 65536)
        return ds_err_set(DS_ERR_ARG, "max_num_seqs = %d: must be 1..65536", p->max_num_seqs);
    if (p->max_num_batched_tokens < 1 || p->max_num_batched_tokens > (1 << 20))
        return ds_err_set(DS_ERR_ARG, "max_num_batched_tokens = %d: must be 1..1048576",
                          p->max_num_batched_tokens);
    if (p->block_size < 1 || p->block_size > 4096)
        return ds_err_set(DS_ERR_ARG, "block_size = %d: must be 1..4096", p->block_size);
    if (p->max_model_len < 0)
        return ds_err_set(DS_ERR_ARG, "max_model_len = %d: must be positive", p->max_model_len);
    if (!(p->memory_utilization > 0 && p->memory_utilization <= 1))
        return ds_err_set(DS_ERR_ARG, "memory_utilization = %g: must be in (0, 1]",
                          p->memory_utilization);
    if (p->kv_dtype != DS_KV_F32 && p->kv_dtype != DS_KV_BF16 && p->kv_dtype != DS_KV_F16)
        return ds_err_set(DS_ERR_ARG, "kv_dtype = %d: not a KV cache dtype", p->kv_dtype);
    return DS_OK;
}

int ds_engine_open(ds_model *m, const ds_engine_params *params, ds_engine **out) {
    *out = NULL;
    ds_engine_params p = params ? *params : ds_engine_default_params();
    int rc = check_params(&p);
    if (rc) return rc;
    const ds_config *c = ds_model_config(m);
    /* the cache: the explicit size, else a fraction of the memory left beside the weights;
     * never more than max_num_seqs sequences of max_model_len could use */
    const uint64_t per_tok = ds_kv_bytes_per_token(c, (ds_kv_dtype)p.kv_dtype);
    const uint64_t per_block = per_tok * (uint64_t)p.block_size;
    uint64_t bytes = p.kv_cache_memory;
    if (!bytes) {
        /* loaded weights are already out of what is available; mapped ones are not yet */
        uint64_t avail = ds_mem_available() + ds_model_loaded_bytes(m),
                 w = ds_model_weight_bytes(m);
        double budget = p.memory_utilization * (double)avail - (double)w;
        if (budget < (double)per_block) budget = (double)per_block * 64; /* unknown or tight */
        bytes = (uint64_t)budget;
    }
    int64_t model_len = p.max_model_len ? p.max_model_len : c->max_position_embeddings;
    uint64_t n_blocks = bytes / per_block;
    uint64_t useful =
        (uint64_t)p.max_num_seqs * (uint64_t)((model_len + p.block_size - 1) / p.block_size);
    if (n_blocks > useful) n_blocks = useful;
    if (n_blocks > (uint64_t)(INT32_MAX / p.block_size - 2))
        n_blocks = (uint64_t)(INT32_MAX / p.block_size - 2);
    if (n_blocks < 1)
        return ds_err_set(DS_ERR_NOMEM,
                          "KV cache of %llu bytes holds no block of %d tokens "
                          "(%llu bytes each)",
                          (unsigned long long)bytes, p.block_size, (unsigned long long)per_block);
    int64_t capacity = (int64_t)n_blocks * p.block_size;
    if (model_len > capacity) {
        if (p.max_model_len)
            return ds_err_set(DS_ERR_RANGE,
                              "max_model_len %d needs %lld KV blocks but the cache "
                              "holds %llu; give more memory (--kv-cache-memory) or a smaller "
                              "--max-model-len",
                              p.max_model_len,
                              (long long)((model_len + p.block_size - 1) / p.block_size),
                              (unsigned long long)n_blocks);
        model_len = capacity; /* the default follows the cache */
    }
    p.max_model_len = (int32_t)(model_len < INT32_MAX ? model_len : INT32_MAX);

    ds_engine *e = calloc(1, sizeof *e);
    if (!e) return ds_err_set(DS_ERR_NOMEM, "out of memory (engine)");
    e->m = m;
    e->c = c;
    e->p = p;
    pthread_mutex_init(&e->mu, NULL);
    pthread_cond_init(&e->wake, NULL);
    e->max_blocks = (p.max_model_len + p.block_size - 1) / p.block_size;
    rc = ds_kv_open_paged(c, (int64_t)n_blocks, p.block_size, (ds_kv_dtype)p.kv_dtype, &e->kv);
    if (!rc) rc = ds_blocks_open((int32_t)n_blocks, p.block_size, p.prefix_caching, &e->blocks);
    if (rc) goto fail;
    ds_sched_init(&e->sched, e->blocks, p.max_num_seqs, p.max_num_batched_tokens);
    e->n_samplers = ds_pool_size(ds_model_pool(m));
    if (e->n_samplers < 1) e->n_samplers = 1;
    e->samplers = calloc((size_t)e->n_samplers, sizeof *e->samplers);
    if (!e->samplers) goto nomem;
    for (int i = 0; i < e->n_samplers; i++)
        if ((rc = ds_sampler_open((int32_t)c->vocab_size, &e->samplers[i]))) goto fail;
    e->n_eos = c->n_eos;
    e->eos = malloc(((size_t)c->n_eos + 1) * sizeof(int32_t));
    if (!e->eos) goto nomem;
    for (int i = 0; i < c->n_eos; i++) e->eos[i] = (int32_t)c->eos_token_ids[i];
    const size_t T = (size_t)p.max_num_batched_tokens, S = (size_t)p.max_num_seqs;
    e->plan = malloc(S * sizeof *e->plan);
    e->sampled = malloc(S * sizeof *e->sampled);
    e->tokens = malloc(T * sizeof(int32_t));
    e->positions = malloc(T * sizeof(int32_t));
    e->seqidx = malloc(T * sizeof(int32_t));
    e->logits_idx = malloc(S * sizeof(int32_t));
    e->tables = malloc(S * (size_t)e->max_blocks * sizeof(int32_t));
    e->logits = malloc(S * (size_t)c->vocab_size * sizeof(float));
    e->argmax = malloc(S * sizeof(int32_t));
    if (!e->plan || !e->sampled || !e->tokens || !e->positions || !e->seqidx || !e->logits_idx ||
        !e->tables || !e->logits || !e->argmax)
        goto nomem;
    e->stats.kv_blocks_total = (int32_t)n_blocks;
    e->stats.kv_blocks_free = (int32_t)n_blocks;
    e->stats.block_size = p.block_size;
    e->stats.kv_bytes_per_token = per_tok;
    if (pthread_create(&e->thread, NULL, engine_main, e) != 0) {
        rc = ds_err_set(DS_ERR_NOMEM, "cannot start the engine thread");
        goto fail;
    }
    e->thread_started = 1;
    ds_info(
        "KV cache: %llu blocks of %d tokens = %lld tokens (%s, %llu bytes per token, %.1f MiB); "
        "max_model_len %d, at most %lld sequences of that length at once",
        (unsigned long long)n_blocks, p.block_size, (long long)capacity,
        ds_kv_dtype_name((ds_kv_dtype)p.kv_dtype), (unsigned long long)per_tok,
        (double)(n_blocks * per_block) / (1 << 20), p.max_model_len,
        (long long)(capacity / p.max_model_len));
    *out = e;
    return DS_OK;
nomem:
    rc = ds_err_set(DS_ERR_NOMEM, "out of memory (engine buffers)");
fail:
    ds_engine_close(e);
    return rc;
}

void ds_engine_close(ds_engine *e) {
    if (!e) return;
    if (e->thread_started) {
        pthread_mutex_lock(&e->mu);
        e->stopping = 1;
        pthread_cond_signal(&e->wake);
        pthread_mutex_unlock(&e->mu);
        pthread_join(e->thread, NULL);
    }
    /* requests submitted after the thread's last look: aborted here */
    notify_list nl = {0};
    for (ds_req *r = e->in_head, *next; r; r = next) {
        next = r->next_incoming;
        ds_engine_event ev = {0};
        ev.token = ev.stop_token = -1;
        ev.finish = DS_FINISH_ABORT;
        deliver(e, r, &ev, &nl);
        pthread_mutex_lock(&e->mu);
        (void)req_unref(r); /* not closed yet: the caller's handle remains */
        pthread_mutex_unlock(&e->mu);
    }
    notify_run(&nl);
    free(nl.h);
    for (int i = 0; e->samplers && i < e->n_samplers; i++) ds_sampler_close(e->samplers[i]);
    free(e->samplers);
    ds_blocks_close(e->blocks);
    ds_kv_close(e->kv);
    free(e->eos);
    free(e->plan);
    free(e->sampled);
    free(e->tokens);
    free(e->positions);
    free(e->seqidx);
    free(e->logits_idx);
    free(e->tables);
    free(e->logits);
    free(e->argmax);
    pthread_mutex_lock(&e->mu);
    e->closed = 1;
    int last = e->live == 0;
    pthread_mutex_unlock(&e->mu);
    if (last) engine_free_shell(e);
}

int32_t ds_engine_max_model_len(const ds_engine *e) {
    return e->p.max_model_len;
}

void ds_engine_get_stats(ds_engine *e, ds_engine_stats *out) {
    pthread_mutex_lock(&e->mu);
    *out = e->stats;
    pthread_mutex_unlock(&e->mu);
}
