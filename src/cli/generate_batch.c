/* dsinfer generate --batch-file FILE: many prompts through the serving engine at once.
 *
 * FILE holds one JSON object per line (blank lines skipped). The prompt is one of
 *   "prompt": "text"          tokenized as generate --prompt does (BOS per tokenizer_config)
 *   "prompt_ids": [0, 1, ...] used exactly
 *   "messages": [{...}, ...]  rendered with the model's chat template (as generate --chat)
 * and the OpenAI sampling fields apply per line: max_tokens (default 16), temperature (default 0:
 * greedy, like generate), top_p, top_k, min_p, seed (any 64-bit integer; without one a random
 * key), presence_penalty, frequency_penalty, repetition_penalty, stop (string or list),
 * stop_token_ids, min_tokens, ignore_eos, logit_bias ({"token id": bias}), logprobs (a count:
 * the chosen token's and that many top logprobs). Every line is submitted before the first result
 * is read, so the engine batches them as it would concurrent HTTP requests.
 *
 * stdout gets one JSON object per input line, in input order: index, prompt_tokens,
 * cached_tokens, token_ids, text (when the model has a tokenizer and --output text, the
 * default), finish_reason (stop | length | abort | error), stop_reason (the stop token or
 * string, when one ended it), logprobs (when asked), error (when the line failed). A bad line
 * fails alone, with its error; the exit status is 1 when any line failed. */
#include "cli/cli.h"
#include "dist/dist.h"
#include "tokenizer/tokenizer.h"

#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

typedef struct {
    ds_req *req;
    char *error;     /* the line failed before submission */
    int32_t *prompt; /* owned */
    int64_t n_prompt;
    ds_logit_bias *bias;
    int32_t *stop_ids;
    char **stop;
    int32_t n_stop;
    int logprobs;
} line_job;

static const char *finish_name(ds_finish_reason f) {
    static const char *names[] = {"", "stop", "length", "abort", "error"};
    return names[f];
}

static int num_field(json_t *o, const char *key, double lo, double hi, double *out) {
    json_t *v = json_object_get(o, key);
    if (!v || json_is_null(v)) return 0;
    if (!json_is_number(v)) return ds_err_set(DS_ERR_ARG, "'%s' must be a number", key);
    double d = json_number_value(v);
    if (!(d >= lo && d <= hi))
        return ds_err_set(DS_ERR_ARG, "'%s' = %g: must be in [%g, %g]", key, d, lo, hi);
    *out = d;
    return 0;
}

static int int_field(json_t *o, const char *key, long long lo, long long hi, long long *out) {
    json_t *v = json_object_get(o, key);
    if (!v || json_is_null(v)) return 0;
    if (!json_is_integer(v)) return ds_err_set(DS_ERR_ARG, "'%s' must be an integer", key);
    long long x = json_integer_value(v);
    if (x < lo || x > hi)
        return ds_err_set(DS_ERR_ARG, "'%s' = %lld: must be in [%lld, %lld]", key, x, lo, hi);
    *out = x;
    return 0;
}

/* The prompt ids of a line. */
static int line_prompt(json_t *o, const ds_tokenizer *tok, int32_t **ids, int64_t *n) {
    json_t *p = json_object_get(o, "prompt"), *pi = json_object_get(o, "prompt_ids"),
           *msgs = json_object_get(o, "messages");
    if (!!p + !!pi + !!msgs != 1)
        return ds_err_set(DS_ERR_ARG, "give exactly one of prompt, prompt_ids, messages");
    if (pi) {
        if (!json_is_array(pi) || json_array_size(pi) == 0)
            return ds_err_set(DS_ERR_ARG, "'prompt_ids' must be a non-empty array of token ids");
        *n = (int64_t)json_array_size(pi);
        *ids = malloc((size_t)*n * sizeof(int32_t));
        if (!*ids) return ds_err_set(DS_ERR_NOMEM, "out of memory");
        for (int64_t i = 0; i < *n; i++) {
            json_t *v = json_array_get(pi, (size_t)i);
            if (!json_is_integer(v) || json_integer_value(v) < 0 ||
                json_integer_value(v) > INT32_MAX)
                return ds_err_set(DS_ERR_ARG, "prompt_ids[%lld] is not a token id", (long long)i);
            (*ids)[i] = (int32_t)json_integer_value(v);
        }
        return DS_OK;
    }
    if (!tok) return ds_err_set(DS_ERR_ARG, "text prompts need the model's tokenizer.json");
    ds_buf text = {0};
    int rc = DS_OK, add_bos = 0;
    if (msgs) {
        ds_chat_format f;
        rc = ds_chat_detect(ds_tok_chat_template(tok), &f);
        if (!rc) rc = ds_chat_render(f, ds_tok_bos_token(tok), msgs, 1, &text);
    } else if (!json_is_string(p)) {
        rc = ds_err_set(DS_ERR_ARG, "'prompt' must be a string");
    } else {
        rc = ds_buf_append(&text, json_string_value(p), json_string_length(p));
        add_bos = ds_tok_add_bos(tok);
    }
    size_t cnt = 0;
    if (!rc) rc = ds_tok_encode(tok, text.data ? text.data : "", text.len, add_bos, ids, &cnt);
    ds_buf_free(&text);
    *n = (int64_t)cnt;
    if (!rc && cnt == 0) rc = ds_err_set(DS_ERR_ARG, "the prompt is empty");
    return rc;
}

/* Builds and submits line o as job j. */
static int line_submit(ds_engine *e, json_t *o, const ds_tokenizer *tok, line_job *j) {
    if (!json_is_object(o)) return ds_err_set(DS_ERR_ARG, "the line is not a JSON object");
    int rc = line_prompt(o, tok, &j->prompt, &j->n_prompt);
    if (rc) return rc;
    ds_request q = {0};
    q.prompt = j->prompt;
    q.n_prompt = (int32_t)(j->n_prompt < INT32_MAX ? j->n_prompt : INT32_MAX);
    q.sampling = ds_sampling_default_params();
    q.sampling.temperature = 0;
    q.skip_special_tokens = 1;
    double d;
    long long v = 16;
    if ((rc = int_field(o, "max_tokens", 1, INT32_MAX, &v))) return rc;
    q.max_tokens = (int32_t)v;
    d = q.sampling.temperature;
    if ((rc = num_field(o, "temperature", 0, 1e6, &d))) return rc;
    q.sampling.temperature = (float)d;
    d = 1;
    if ((rc = num_field(o, "top_p", 0, 1, &d))) return rc;
    q.sampling.top_p = (float)d;
    d = 0;
    if ((rc = num_field(o, "min_p", 0, 1, &d))) return rc;
    q.sampling.min_p = (float)d;
    d = 0;
    if ((rc = num_field(o, "presence_penalty", -2, 2, &d))) return rc;
    q.sampling.presence_penalty = (float)d;
    d = 0;
    if ((rc = num_field(o, "frequency_penalty", -2, 2, &d))) return rc;
    q.sampling.frequency_penalty = (float)d;
    d = 1;
    if ((rc = num_field(o, "repetition_penalty", 1e-6, 1e6, &d))) return rc;
    q.sampling.repetition_penalty = (float)d;
    v = 0;
    if ((rc = int_field(o, "top_k", -1, INT32_MAX, &v))) return rc;
    q.sampling.top_k = (int32_t)v;
    v = 0;
    if ((rc = int_field(o, "min_tokens", 0, INT32_MAX, &v))) return rc;
    q.sampling.min_tokens = (int32_t)v;
    v = -1;
    if ((rc = int_field(o, "logprobs", 0, DS_SAMPLER_MAX_LOGPROBS, &v))) return rc;
    q.sampling.logprobs = j->logprobs = (int32_t)v;
    json_t *seed = json_object_get(o, "seed");
    if (seed && !json_is_null(seed)) {
        if (!json_is_integer(seed)) return ds_err_set(DS_ERR_ARG, "'seed' must be an integer");
        q.sampling.seed = (uint64_t)json_integer_value(seed); /* signed seeds map by cast */
    } else if (getrandom(&q.sampling.seed, sizeof q.sampling.seed, 0) != sizeof q.sampling.seed) {
        q.sampling.seed = (uint64_t)(ds_now() * 1e9);
    }
    json_t *lb = json_object_get(o, "logit_bias"); /* OpenAI: {"token id": bias} */
    if (lb && !json_is_null(lb)) {
        if (!json_is_object(lb)) return ds_err_set(DS_ERR_ARG, "'logit_bias' must be an object");
        j->bias = malloc((json_object_size(lb) + 1) * sizeof *j->bias);
        if (!j->bias) return ds_err_set(DS_ERR_NOMEM, "out of memory");
        const char *key;
        json_t *val;
        int32_t n = 0;
        json_object_foreach(lb, key, val) {
            char *end;
            long id = strtol(key, &end, 10);
            if (!*key || *end || id < 0 || id > INT32_MAX || !json_is_number(val))
                return ds_err_set(DS_ERR_ARG,
                                  "logit_bias entry '%s' is not a token id with a number", key);
            j->bias[n].token = (int32_t)id;
            j->bias[n++].bias = (float)json_number_value(val);
        }
        q.sampling.logit_bias = j->bias;
        q.sampling.n_logit_bias = n;
    }
    json_t *ie = json_object_get(o, "ignore_eos");
    q.ignore_eos = json_is_true(ie);
    json_t *sti = json_object_get(o, "stop_token_ids");
    if (sti && !json_is_null(sti)) {
        if (!json_is_array(sti)) return ds_err_set(DS_ERR_ARG, "'stop_token_ids' must be an array");
        size_t n = json_array_size(sti);
        j->stop_ids = malloc((n + 1) * sizeof(int32_t));
        if (!j->stop_ids) return ds_err_set(DS_ERR_NOMEM, "out of memory");
        for (size_t i = 0; i < n; i++) {
            json_t *x = json_array_get(sti, i);
            if (!json_is_integer(x) || json_integer_value(x) < 0 ||
                json_integer_value(x) > INT32_MAX)
                return ds_err_set(DS_ERR_ARG, "stop_token_ids[%zu] is not a token id", i);
            j->stop_ids[i] = (int32_t)json_integer_value(x);
        }
        q.stop_token_ids = j->stop_ids;
        q.n_stop_token_ids = (int32_t)n;
    }
    json_t *stop = json_object_get(o, "stop");
    if (stop && !json_is_null(stop)) {
        size_t n = json_is_string(stop) ? 1 : json_array_size(stop);
        if (!json_is_string(stop) && !json_is_array(stop))
            return ds_err_set(DS_ERR_ARG, "'stop' must be a string or an array of strings");
        j->stop = calloc(n + 1, sizeof(char *));
        if (!j->stop) return ds_err_set(DS_ERR_NOMEM, "out of memory");
        for (size_t i = 0; i < n; i++) {
            json_t *x = json_is_string(stop) ? stop : json_array_get(stop, i);
            if (!json_is_string(x)) return ds_err_set(DS_ERR_ARG, "stop[%zu] is not a string", i);
            j->stop[i] = strdup(json_string_value(x));
            j->n_stop = (int32_t)i + 1;
        }
        q.stop = (const char *const *)j->stop;
        q.n_stop = j->n_stop;
    }
    return ds_engine_submit(e, &q, &j->req);
}

/* Reads job j's events and prints its result line. 0 ok, 1 the line failed. */
static int line_result(size_t index, line_job *j, int text_out, const ds_tokenizer *tok) {
    json_t *out = json_object(), *ids = json_array(), *lps = j->logprobs >= 0 ? json_array() : NULL;
    json_object_set_new(out, "index", json_integer((json_int_t)index));
    ds_buf text = {0};
    const char *finish = "error";
    int failed = 1;
    if (j->error) {
        json_object_set_new(out, "error", json_string(j->error));
    } else {
        for (;;) {
            ds_engine_event ev;
            if (ds_req_next(j->req, &ev, -1) != DS_OK) break;
            if (ev.token >= 0) {
                json_array_append_new(ids, json_integer(ev.token));
                if (lps) {
                    json_t *top = json_array();
                    for (int32_t k = 0; k < ev.sample.n_top; k++)
                        json_array_append_new(top, json_pack("{s:i,s:f}", "token_id",
                                                             ev.sample.top[k].token, "logprob",
                                                             (double)ev.sample.top[k].logprob));
                    json_array_append_new(lps, json_pack("{s:i,s:f,s:I,s:o}", "token_id", ev.token,
                                                         "logprob", (double)ev.sample.logprob,
                                                         "rank", (json_int_t)ev.sample.rank,
                                                         "top_logprobs", top));
                }
            }
            if (ev.text) ds_buf_append(&text, ev.text, ev.text_len);
            if (ev.finish != DS_FINISH_NONE) {
                finish = finish_name(ev.finish);
                failed = ev.finish == DS_FINISH_ERROR || ev.finish == DS_FINISH_ABORT;
                json_object_set_new(out, "prompt_tokens", json_integer(ev.n_prompt));
                json_object_set_new(out, "cached_tokens", json_integer(ev.n_cached));
                if (ev.stop_str)
                    json_object_set_new(out, "stop_reason", json_string(ev.stop_str));
                else if (ev.stop_token >= 0)
                    json_object_set_new(out, "stop_reason", json_integer(ev.stop_token));
                if (ev.error) json_object_set_new(out, "error", json_string(ev.error));
            }
            ds_engine_event_free(&ev);
        }
    }
    json_object_set_new(out, "token_ids", ids);
    if (tok && text_out)
        json_object_set_new(out, "text", json_stringn(text.data ? text.data : "", text.len));
    json_object_set_new(out, "finish_reason", json_string(finish));
    if (lps) json_object_set_new(out, "logprobs", lps);
    char *s = json_dumps(out, JSON_COMPACT | JSON_ENSURE_ASCII);
    if (s) printf("%s\n", s);
    free(s);
    json_decref(out);
    ds_buf_free(&text);
    fflush(stdout);
    return failed;
}

static void job_free(line_job *j) {
    ds_req_release(j->req);
    free(j->error);
    free(j->prompt);
    free(j->bias);
    free(j->stop_ids);
    for (int32_t i = 0; j->stop && i < j->n_stop; i++) free(j->stop[i]);
    free(j->stop);
}

int ds_cli_generate_batch(const char *model_dir, const char *file, int text_out,
                          const ds_model_params *mp, const ds_engine_params *ep) {
    if (ds_dist_rank() > 0) return ds_cli_follow("generate", model_dir, mp);
    FILE *f = strcmp(file, "-") ? fopen(file, "r") : stdin;
    if (!f) {
        fprintf(stderr, "dsinfer generate: cannot open --batch-file %s\n", file);
        return 1;
    }
    ds_model *m = NULL;
    ds_tokenizer *tok = NULL;
    ds_engine *e = NULL;
    line_job *jobs = NULL;
    size_t n_jobs = 0, cap = 0;
    int rc = ds_model_open(model_dir, mp, &m), failed = 0;
    if (!rc && ds_cli_file_exists(model_dir, "tokenizer.json")) rc = ds_tok_open(model_dir, &tok);
    ds_engine_params p = *ep;
    p.tokenizer = tok;
    if (!rc) rc = ds_engine_open(m, &p, &e);
    if (rc) {
        fprintf(stderr, "dsinfer generate: %s\n", ds_err_msg());
        goto out;
    }
    char *line = NULL;
    size_t lcap = 0;
    ssize_t len;
    size_t lineno = 0;
    double t0 = ds_now();
    while ((len = getline(&line, &lcap, f)) >= 0) {
        size_t k = 0;
        lineno++;
        while (k < (size_t)len &&
               (line[k] == ' ' || line[k] == '\t' || line[k] == '\r' || line[k] == '\n'))
            k++;
        if (k == (size_t)len) continue;
        if (n_jobs == cap) {
            cap = cap ? 2 * cap : 64;
            line_job *nj = realloc(jobs, cap * sizeof *nj);
            if (!nj) {
                fprintf(stderr, "dsinfer generate: out of memory\n");
                failed = 1;
                break;
            }
            jobs = nj;
        }
        line_job *j = &jobs[n_jobs++];
        memset(j, 0, sizeof *j);
        j->logprobs = -1;
        json_error_t err;
        json_t *o = json_loadb(line, (size_t)len, 0, &err);
        int lrc = o ? line_submit(e, o, tok, j)
                    : ds_err_set(DS_ERR_FORMAT, "line %zu: invalid JSON: %s", lineno, err.text);
        if (lrc) {
            j->error = strdup(ds_err_msg());
            j->req = NULL;
        }
        json_decref(o);
    }
    free(line);
    uint64_t n_out = 0;
    for (size_t i = 0; i < n_jobs; i++) {
        failed |= line_result(i, &jobs[i], text_out, tok);
    }
    ds_engine_stats st;
    ds_engine_get_stats(e, &st);
    n_out = st.generation_tokens;
    double dt = ds_now() - t0;
    ds_info("batch: %zu requests, %llu prompt tokens prefilled (%llu of %llu from the prefix "
            "cache), %llu generated in %.2fs (%.1f tok/s), %llu steps, %llu preemptions",
            n_jobs, (unsigned long long)st.prompt_tokens, (unsigned long long)st.prefix_hits,
            (unsigned long long)st.prefix_queries, (unsigned long long)n_out, dt,
            dt > 0 ? (double)n_out / dt : 0.0, (unsigned long long)st.steps,
            (unsigned long long)st.preemptions);
out:
    for (size_t i = 0; i < n_jobs; i++) job_free(&jobs[i]);
    free(jobs);
    ds_engine_close(e);
    ds_tok_close(tok);
    ds_model_close(m);
    if (f != stdin) fclose(f);
    return rc || failed ? 1 : 0;
}
