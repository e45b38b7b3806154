/* The engine end to end on the golden fixtures (DeepSeek's reference outputs):
 *   - all prompts submitted at once, greedy, give the reference's 24 greedy tokens each, under
 *     block sizes 1 / 16 / 64, chunked prefill (7 tokens per step), max_num_seqs 2, and a KV
 *     cache small enough that sequences are preempted and recomputed;
 *   - seeded sampling: the same seed gives the same tokens alone or in a batch, other seeds give
 *     other tokens, seeds 0, -1, INT64_MAX and INT64_MIN all work;
 *   - prefix caching: a repeated prompt is served from the cache (the prefill counter proves it)
 *     with unchanged output;
 *   - stop strings and stop tokens end the output where they should, text and tokens agree;
 *   - refusals (too long, bad params), aborts while waiting, prefilling and decoding: every
 *     request ends with exactly one final event and all KV blocks are free afterwards.
 * Skips (77) without fixtures, fails under CI=true. */
#include "engine/engine.h"
#include "model/model.h"
#include "testutil.h"
#include "tokenizer/tokenizer.h"

#include <jansson.h>
#include <stdlib.h>
#include <unistd.h>

#define MAXP 16
#define GREEDY 24

typedef struct {
    int n;
    const char *name[MAXP];
    int32_t *ids[MAXP];
    int32_t n_ids[MAXP];
    int32_t greedy[MAXP][GREEDY];
} golden;

static int load_golden(const char *dir, golden *g) {
    char path[4096];
    snprintf(path, sizeof path, "%s/golden.json", dir);
    json_error_t err;
    json_t *root = json_load_file(path, 0, &err);
    if (!root) return -1;
    json_t *ps = json_object_get(root, "prompts");
    memset(g, 0, sizeof *g);
    for (size_t i = 0; i < json_array_size(ps) && g->n < MAXP; i++) {
        json_t *p = json_array_get(ps, i), *ids = json_object_get(p, "ids");
        json_t *gt = json_object_get(json_object_get(p, "greedy"), "tokens");
        int k = g->n++;
        g->name[k] = strdup(json_string_value(json_object_get(p, "name")));
        g->n_ids[k] = (int32_t)json_array_size(ids);
        g->ids[k] = malloc((size_t)g->n_ids[k] * sizeof(int32_t));
        for (int32_t j = 0; j < g->n_ids[k]; j++)
            g->ids[k][j] = (int32_t)json_integer_value(json_array_get(ids, (size_t)j));
        for (int j = 0; j < GREEDY; j++)
            g->greedy[k][j] = (int32_t)json_integer_value(json_array_get(gt, (size_t)j));
    }
    json_decref(root);
    return 0;
}

static void free_golden(golden *g) {
    for (int i = 0; i < g->n; i++) {
        free((void *)g->name[i]);
        free(g->ids[i]);
    }
}

/* What one request produced. */
typedef struct {
    int32_t tokens[256];
    int n_tokens, n_events, n_final;
    ds_finish_reason finish;
    int32_t stop_token;
    char stop_str[64];
    char text[4096];
    size_t text_len;
    int32_t n_cached;
} outcome;

/* Reads every event of r into o (until the final one). */
static void drain(ds_req *r, outcome *o) {
    memset(o, 0, sizeof *o);
    o->stop_token = -1;
    for (;;) {
        ds_engine_event ev;
        int rc = ds_req_next(r, &ev, 60);
        if (rc == DS_ERR_TIMEOUT) {
            CHECK_MSG(0, "request %llu: no event in 60 s", (unsigned long long)ds_req_id(r));
            return;
        }
        if (rc == DS_ERR_CLOSED) break;
        o->n_events++;
        if (ev.token >= 0 && o->n_tokens < 256) o->tokens[o->n_tokens++] = ev.token;
        if (ev.text && o->text_len + ev.text_len < sizeof o->text) {
            memcpy(o->text + o->text_len, ev.text, ev.text_len);
            o->text_len += ev.text_len;
        }
        if (ev.finish != DS_FINISH_NONE) {
            o->n_final++;
            o->finish = ev.finish;
            o->stop_token = ev.stop_token;
            o->n_cached = ev.n_cached;
            if (ev.stop_str) snprintf(o->stop_str, sizeof o->stop_str, "%s", ev.stop_str);
            CHECK_MSG(ev.n_output == o->n_tokens, "final event counts %d tokens, saw %d",
                      ev.n_output, o->n_tokens);
            CHECK(ev.t_first_token <= ev.t_now);
        }
        ds_engine_event_free(&ev);
    }
    CHECK_MSG(o->n_final == 1, "request %llu: %d final events", (unsigned long long)ds_req_id(r),
              o->n_final);
}

static ds_request greedy_req(const golden *g, int i) {
    ds_request q = {0};
    q.prompt = g->ids[i];
    q.n_prompt = g->n_ids[i];
    q.max_tokens = GREEDY;
    q.sampling = ds_sampling_default_params();
    q.sampling.temperature = 0;
    q.ignore_eos = 1;
    q.skip_special_tokens = 1;
    return q;
}

static void check_all_free(ds_engine *e, const char *what) {
    ds_engine_stats st;
    for (int i = 0; i < 100; i++) { /* the engine publishes its stats after the step */
        ds_engine_get_stats(e, &st);
        if (st.kv_blocks_free == st.kv_blocks_total && st.n_running == 0 && st.n_waiting == 0)
            break;
        usleep(10000);
    }
    CHECK_MSG(st.kv_blocks_free == st.kv_blocks_total, "%s: %d of %d KV blocks free at the end",
              what, st.kv_blocks_free, st.kv_blocks_total);
    CHECK_MSG(st.n_running == 0 && st.n_waiting == 0, "%s: %d running, %d waiting at the end", what,
              st.n_running, st.n_waiting);
}

/* All prompts at once under params p; every greedy continuation must be the reference's. */
static void check_greedy(ds_model *m, const golden *g, ds_engine_params p, const char *what) {
    ds_engine *e;
    int rc = ds_engine_open(m, &p, &e);
    CHECK_MSG(rc == DS_OK, "%s: %s", what, ds_err_msg());
    if (rc) return;
    ds_req *r[MAXP];
    for (int i = 0; i < g->n; i++) {
        ds_request q = greedy_req(g, i);
        CHECK_MSG(ds_engine_submit(e, &q, &r[i]) == DS_OK, "%s: %s", what, ds_err_msg());
    }
    int bad = 0;
    for (int i = 0; i < g->n; i++) {
        outcome o;
        drain(r[i], &o);
        int same = o.n_tokens == GREEDY && !memcmp(o.tokens, g->greedy[i], sizeof g->greedy[i]);
        CHECK_MSG(same && o.finish == DS_FINISH_LENGTH, "%s: prompt %s: %d tokens, finish %d, %s",
                  what, g->name[i], o.n_tokens, o.finish,
                  same ? "same" : "differ from the reference");
        bad += !same;
        ds_req_release(r[i]);
    }
    ds_engine_stats st;
    ds_engine_get_stats(e, &st);
    printf("%s: %d/%d prompts as the reference, %llu steps, %llu preemptions, %llu/%llu prompt "
           "tokens from the prefix cache\n",
           what, g->n - bad, g->n, (unsigned long long)st.steps, (unsigned long long)st.preemptions,
           (unsigned long long)st.prefix_hits, (unsigned long long)st.prefix_queries);
    if (strstr(what, "preempt")) CHECK_MSG(st.preemptions > 0, "%s: nothing was preempted", what);
    check_all_free(e, what);
    ds_engine_close(e);
}

static void run_one(ds_engine *e, const ds_request *q, outcome *o) {
    ds_req *r;
    int rc = ds_engine_submit(e, q, &r);
    CHECK_MSG(rc == DS_OK, "%s", ds_err_msg());
    if (rc) return;
    drain(r, o);
    ds_req_release(r);
}

static void check_seeds(ds_model *m, const golden *g) {
    ds_engine *e;
    CHECK(ds_engine_open(m, NULL, &e) == DS_OK);
    if (!e) return;
    const uint64_t seeds[] = {0, (uint64_t)-1, (uint64_t)INT64_MAX, (uint64_t)INT64_MIN, 12345};
    outcome alone[5], batched[5], other;
    for (int s = 0; s < 5; s++) {
        ds_request q = greedy_req(g, 2);
        q.sampling.temperature = 1.5f;
        q.sampling.seed = seeds[s];
        run_one(e, &q, &alone[s]);
        CHECK_MSG(alone[s].n_tokens == GREEDY, "seed %llu: %d tokens", (unsigned long long)seeds[s],
                  alone[s].n_tokens);
    }
    /* the same requests, all at once and among other prompts sampled with other seeds */
    ds_req *r[5], *noise[MAXP];
    for (int i = 0; i < g->n; i++) {
        ds_request q = greedy_req(g, i);
        q.sampling.temperature = 0.8f;
        q.sampling.seed = 1000 + (uint64_t)i;
        CHECK(ds_engine_submit(e, &q, &noise[i]) == DS_OK);
    }
    for (int s = 0; s < 5; s++) {
        ds_request q = greedy_req(g, 2);
        q.sampling.temperature = 1.5f;
        q.sampling.seed = seeds[s];
        CHECK(ds_engine_submit(e, &q, &r[s]) == DS_OK);
    }
    for (int s = 0; s < 5; s++) {
        drain(r[s], &batched[s]);
        ds_req_release(r[s]);
        CHECK_MSG(batched[s].n_tokens == alone[s].n_tokens &&
                      !memcmp(batched[s].tokens, alone[s].tokens,
                              sizeof(int32_t) * (size_t)alone[s].n_tokens),
                  "seed %llu: batched tokens differ from alone", (unsigned long long)seeds[s]);
    }
    for (int i = 0; i < g->n; i++) {
        drain(noise[i], &other);
        ds_req_release(noise[i]);
    }
    int distinct = 0;
    for (int s = 1; s < 5; s++)
        distinct += memcmp(alone[s].tokens, alone[0].tokens, sizeof alone[0].tokens) != 0;
    CHECK_MSG(distinct == 4, "only %d of 4 other seeds changed the tokens", distinct);
    int differs_from_greedy = memcmp(alone[0].tokens, g->greedy[2], sizeof g->greedy[2]) != 0;
    CHECK_MSG(differs_from_greedy, "temperature 1.5 gave the greedy tokens");
    check_all_free(e, "seeds");
    ds_engine_close(e);
}

static void check_prefix_cache(ds_model *m, const golden *g) {
    int li = 0; /* the longest prompt */
    for (int i = 1; i < g->n; i++)
        if (g->n_ids[i] > g->n_ids[li]) li = i;
    for (int on = 0; on < 2; on++) {
        ds_engine_params p = ds_engine_default_params();
        p.prefix_caching = on;
        ds_engine *e;
        CHECK(ds_engine_open(m, &p, &e) == DS_OK);
        if (!e) return;
        outcome a, b;
        ds_request q = greedy_req(g, li);
        run_one(e, &q, &a);
        ds_engine_stats s1, s2;
        ds_engine_get_stats(e, &s1);
        run_one(e, &q, &b);
        ds_engine_get_stats(e, &s2);
        uint64_t second = s2.prompt_tokens - s1.prompt_tokens;
        int32_t full = (g->n_ids[li] - 1) / 16 * 16;
        printf(
            "prefix caching %s: second run of a %d-token prompt prefilled %llu tokens, %d cached\n",
            on ? "on" : "off", g->n_ids[li], (unsigned long long)second, b.n_cached);
        CHECK(!memcmp(a.tokens, g->greedy[li], sizeof g->greedy[li]));
        CHECK(!memcmp(b.tokens, g->greedy[li], sizeof g->greedy[li]));
        if (on) {
            CHECK_MSG(b.n_cached == full && second == (uint64_t)(g->n_ids[li] - full),
                      "cached %d (want %d), prefilled %llu", b.n_cached, full,
                      (unsigned long long)second);
        } else {
            CHECK(b.n_cached == 0 && second == (uint64_t)g->n_ids[li]);
        }
        check_all_free(e, "prefix cache");
        ds_engine_close(e);
    }
}

static void check_stops_and_text(ds_model *m, const golden *g, const ds_tokenizer *tok) {
    ds_engine_params p = ds_engine_default_params();
    p.tokenizer = tok;
    ds_engine *e;
    CHECK(ds_engine_open(m, &p, &e) == DS_OK);
    if (!e) return;
    int bad = 0;
    for (int i = 0; i < g->n; i++) {
        outcome o;
        ds_request q = greedy_req(g, i);
        run_one(e, &q, &o);
        ds_buf want = {0};
        CHECK(ds_tok_decode(tok, o.tokens, (size_t)o.n_tokens, 1, &want) == DS_OK);
        bad += want.len != o.text_len || memcmp(want.data, o.text, o.text_len);
        /* a stop string from the middle of that text: output ends right before it */
        if (want.len >= 8 && !memchr(want.data, 0, want.len)) {
            size_t at = want.len / 2;
            char stop[4] = {0};
            memcpy(stop, want.data + at, 3);
            const char *stops[1] = {stop};
            char *first = memmem(want.data, want.len, stop, 3);
            size_t cut = (size_t)(first - want.data);
            q.stop = stops;
            q.n_stop = 1;
            outcome s;
            run_one(e, &q, &s);
            CHECK_MSG(s.finish == DS_FINISH_STOP && !strcmp(s.stop_str, stop) &&
                          s.text_len == cut && !memcmp(s.text, want.data, cut),
                      "prompt %s: stop string '%s': finish %d, %zu bytes of text (want %zu)",
                      g->name[i], stop, s.finish, s.text_len, cut);
            q.include_stop_str = 1;
            run_one(e, &q, &s);
            CHECK(s.text_len == cut + 3 && !memcmp(s.text, want.data, cut + 3));
            q.stop = NULL;
            q.n_stop = 0;
            q.include_stop_str = 0;
        }
        /* a stop token: the 5th generated token ends the output there, without its text */
        int32_t st = o.tokens[4];
        q.stop_token_ids = &st;
        q.n_stop_token_ids = 1;
        outcome t;
        run_one(e, &q, &t);
        int first = 0;
        while (o.tokens[first] != st) first++;
        CHECK_MSG(t.finish == DS_FINISH_STOP && t.stop_token == st && t.n_tokens == first + 1,
                  "stop token %d: finish %d after %d tokens", st, t.finish, t.n_tokens);
        /* min_tokens holds the stop token back */
        q.sampling.min_tokens = first + 2;
        run_one(e, &q, &t);
        CHECK(t.n_tokens >= first + 2);
        ds_buf_free(&want);
    }
    CHECK_MSG(bad == 0, "%d outputs: streamed text differs from decoding their tokens", bad);
    check_all_free(e, "stops");
    ds_engine_close(e);
}

static void check_refusals_and_aborts(ds_model *m, const golden *g) {
    /* an explicit max_model_len the cache cannot hold is refused at startup; bad params too */
    ds_engine_params small = ds_engine_default_params();
    small.max_model_len = 200;
    small.kv_cache_memory = ds_kv_bytes_per_token(ds_model_config(m), DS_KV_F32) * 100;
    ds_engine *bad = NULL;
    CHECK(ds_engine_open(m, &small, &bad) == DS_ERR_RANGE && bad == NULL);
    CHECK_ERR_CONTAINS("max_model_len 200");
    small = ds_engine_default_params();
    small.block_size = 0;
    CHECK(ds_engine_open(m, &small, &bad) == DS_ERR_ARG && bad == NULL);
    CHECK_ERR_CONTAINS("block_size");
    small = ds_engine_default_params();
    small.memory_utilization = 1.5;
    CHECK(ds_engine_open(m, &small, &bad) == DS_ERR_ARG);
    ds_engine_params p = ds_engine_default_params();
    p.max_num_batched_tokens = 4; /* slow prefill: aborts land mid-prefill */
    p.max_num_seqs = 2;           /* and some requests wait */
    ds_engine *e;
    CHECK(ds_engine_open(m, &p, &e) == DS_OK);
    if (!e) return;
    int32_t L = ds_engine_max_model_len(e);
    ds_request q = greedy_req(g, 0);
    ds_req *r;
    q.max_tokens = L;
    CHECK(ds_engine_submit(e, &q, &r) == DS_ERR_RANGE);
    CHECK_ERR_CONTAINS("maximum context length");
    q.max_tokens = 0;
    CHECK(ds_engine_submit(e, &q, &r) == DS_ERR_ARG);
    q.max_tokens = 4;
    q.sampling.top_p = 0;
    CHECK(ds_engine_submit(e, &q, &r) == DS_ERR_ARG);
    CHECK_ERR_CONTAINS("top_p");
    q.sampling.top_p = 1;
    int32_t bad_tok = 1 << 30;
    q.prompt = &bad_tok;
    q.n_prompt = 1;
    CHECK(ds_engine_submit(e, &q, &r) == DS_ERR_ARG);
    const char *stops[1] = {"x"};
    q = greedy_req(g, 0);
    q.stop = stops;
    q.n_stop = 1;
    CHECK(ds_engine_submit(e, &q, &r) == DS_ERR_ARG); /* no tokenizer */
    CHECK_ERR_CONTAINS("tokenizer");

    /* aborts at every stage; the rest finish; one handle released without reading */
    ds_req *rs[MAXP];
    for (int i = 0; i < g->n; i++) {
        q = greedy_req(g, i);
        CHECK(ds_engine_submit(e, &q, &rs[i]) == DS_OK);
    }
    ds_req_abort(rs[g->n - 1]); /* still waiting */
    usleep(2000);
    ds_req_abort(rs[0]);   /* prefilling or decoding by now */
    ds_req_release(rs[1]); /* the caller walks away */
    outcome o;
    drain(rs[2], &o); /* decodes to the end */
    CHECK(o.finish == DS_FINISH_LENGTH && !memcmp(o.tokens, g->greedy[2], sizeof g->greedy[2]));
    ds_req_release(rs[2]);
    for (int i = 3; i < g->n; i++) {
        if (i == 5) ds_req_abort(rs[i]);
        drain(rs[i], &o);
        CHECK(o.finish == (i == 5 || i == g->n - 1 ? DS_FINISH_ABORT : DS_FINISH_LENGTH) ||
              (i == 5 && o.finish == DS_FINISH_LENGTH));
        ds_req_release(rs[i]);
    }
    drain(rs[0], &o);
    CHECK(o.finish == DS_FINISH_ABORT || o.finish == DS_FINISH_LENGTH);
    ds_req_release(rs[0]);
    check_all_free(e, "aborts");
    /* close with requests in flight: each still gets its final event */
    for (int i = 0; i < 4; i++) {
        q = greedy_req(g, i);
        CHECK(ds_engine_submit(e, &q, &rs[i]) == DS_OK);
    }
    ds_engine_close(e);
    for (int i = 0; i < 4; i++) {
        drain(rs[i], &o);
        CHECK(o.finish == DS_FINISH_ABORT || o.finish == DS_FINISH_LENGTH);
        ds_req_release(rs[i]);
    }
}

static void check_dir(const char *dir, int full) {
    golden g;
    if (load_golden(dir, &g)) {
        CHECK_MSG(0, "%s: no golden.json", dir);
        return;
    }
    ds_model *m;
    CHECK_MSG(ds_model_open(dir, NULL, &m) == DS_OK, "%s", ds_err_msg());
    if (!m) return;
    char what[128];
    const int32_t bss[] = {1, 16, 64};
    for (int i = 0; i < 3; i++) {
        ds_engine_params p = ds_engine_default_params();
        p.block_size = bss[i];
        snprintf(what, sizeof what, "block size %d", bss[i]);
        check_greedy(m, &g, p, what);
    }
    ds_engine_params p = ds_engine_default_params();
    p.max_num_batched_tokens = 7;
    p.max_num_seqs = 2;
    check_greedy(m, &g, p, "chunked prefill 7, max_num_seqs 2");
    p = ds_engine_default_params();
    p.max_model_len = 128;
    p.kv_cache_memory = ds_kv_bytes_per_token(ds_model_config(m), DS_KV_F32) * 160;
    check_greedy(m, &g, p, "160-token cache, preempting");
    if (full) {
        check_seeds(m, &g);
        check_prefix_cache(m, &g);
        check_refusals_and_aborts(m, &g);
        ds_tokenizer *tok;
        CHECK_MSG(ds_tok_open(dir, &tok) == DS_OK, "%s", ds_err_msg());
        if (tok) check_stops_and_text(m, &g, tok);
        ds_tok_close(tok);
    }
    ds_model_close(m);
    free_golden(&g);
}

int main(void) {
    const char *fx = ds_test_fixtures();
    if (!fx) return ds_test_skip_or_fail("no fixtures");
    ds_log_set_level(DS_LOG_WARN);
    char dir[4096];
    snprintf(dir, sizeof dir, "%s/tiny-a", fx);
    check_dir(dir, 1);
    snprintf(dir, sizeof dir, "%s/tiny-a-fp8", fx);
    check_dir(dir, 0);
    return ds_test_finish("test_engine");
}
