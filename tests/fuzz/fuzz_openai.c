/* libFuzzer target for the server's request mapping (src/server/openai.c): arbitrary bytes as
 * the body of /v1/completions, /v1/chat/completions, /tokenize or /detokenize, against the real
 * DeepSeek-V3 tokenizer ($DSINFER_FUZZ_TOKENIZER, else the build's tokenizer directory, else the
 * fixtures' tiny-a) and a small max_model_len (so that the length rules are reached).
 *
 * The first byte picks the endpoint: 'c' completions, 'h' chat, 'r' chat with the R1 reasoning
 * split, 't' tokenize, 'd' detokenize (other values: byte % 5 in that order). The rest is the
 * body. Properties checked (abort on violation, so libFuzzer reports it):
 *   - a refusal has an HTTP status in 400..599, a message and a type; the error JSON dumps;
 *   - an accepted request satisfies everything the engine relies on: 1 <= n <= limit, every
 *     prompt non-empty with ids in the vocabulary, prompt + max_tokens <= max_model_len (or an
 *     echo with max_tokens 0), min_tokens <= max_tokens, the sampling parameters of every choice
 *     pass ds_sampling_params_validate, stop strings non-empty;
 *   - the responses of an accepted request, fed with engine-like events (tokens drawn from the
 *     input, text from the incremental detokenizer, logprobs, each finish reason), render as
 *     whole and as streamed JSON that parses back. */
#include "core/core.h"
#include "server/server.h"
#include "tokenizer/tokenizer.h"

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifndef DSINFER_DEFAULT_TOKENIZER_DIR
#define DSINFER_DEFAULT_TOKENIZER_DIR ""
#endif

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static ds_tokenizer *tok;
static ds_oai_ctx ctx;
static const char *names[] = {"m", "/models/deepseek-r1"};

#define CHECK_OR_DIE(c)                                                                            \
    do {                                                                                           \
        if (!(c)) {                                                                                \
            fprintf(stderr, "fuzz_openai: %s:%d: %s\n", __FILE__, __LINE__, #c);                   \
            abort();                                                                               \
        }                                                                                          \
    } while (0)

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    ds_log_set_level(DS_LOG_ERROR);
    const char *env = getenv("DSINFER_FUZZ_TOKENIZER");
    const char *tries[] = {env, DSINFER_DEFAULT_TOKENIZER_DIR, "../shared/fixtures/tiny-a",
                           "../../shared/fixtures/tiny-a"};
    for (size_t i = 0; i < sizeof tries / sizeof *tries && !tok; i++)
        if (tries[i] && *tries[i] && ds_tok_open(tries[i], &tok) != 0) tok = NULL;
    if (!tok) {
        fprintf(stderr,
                "fuzz_openai: no tokenizer; set DSINFER_FUZZ_TOKENIZER to a directory holding "
                "tokenizer.json (last error: %s)\n",
                ds_err_msg());
        abort();
    }
    ctx = ds_oai_default_ctx();
    ctx.tok = tok;
    ctx.vocab = 129280;
    ctx.max_model_len = 96;
    ctx.names = names;
    ctx.n_names = 2;
    ds_chat_format f = DS_CHAT_V3;
    if (ds_tok_chat_template(tok)) ds_chat_detect(ds_tok_chat_template(tok), &f);
    ctx.chat_format = (int)f;
    return 0;
}

/* The JSON text parses back (what a client would do with it). */
static void roundtrip(json_t *o) {
    CHECK_OR_DIE(o != NULL);
    char *s = json_dumps(o, JSON_COMPACT);
    CHECK_OR_DIE(s != NULL);
    json_error_t e;
    json_t *back = json_loads(s, JSON_ALLOW_NUL, &e);
    CHECK_OR_DIE(back != NULL);
    json_decref(back);
    free(s);
    json_decref(o);
}

static void sse_roundtrip(const ds_buf *b) {
    for (const char *p = b->data; p && *p;) {
        const char *end = strstr(p, "\n\n");
        CHECK_OR_DIE(end != NULL && !strncmp(p, "data: ", 6));
        if (strncmp(p + 6, "[DONE]", 6)) {
            json_error_t e;
            json_t *o = json_loadb(p + 6, (size_t)(end - p - 6), JSON_ALLOW_NUL, &e);
            CHECK_OR_DIE(o != NULL);
            json_decref(o);
        }
        p = end + 2;
    }
}

static void check_request(const ds_oai_request *r) {
    CHECK_OR_DIE(r->n >= 1 && r->n <= DS_OAI_MAX_N);
    CHECK_OR_DIE(r->n_prompts >= 1 && ds_oai_n_choices(r) <= DS_OAI_MAX_CHOICES);
    for (int32_t i = 0; i < r->n_prompts; i++) {
        const ds_oai_prompt *p = &r->prompts[i];
        CHECK_OR_DIE(p->n >= 1 && p->ids);
        for (int32_t k = 0; k < p->n; k++) CHECK_OR_DIE(p->ids[k] >= 0 && p->ids[k] < ctx.vocab);
        CHECK_OR_DIE(p->max_tokens >= (r->echo ? 0 : 1));
        CHECK_OR_DIE((int64_t)p->n + p->max_tokens <= ctx.max_model_len);
        CHECK_OR_DIE(r->base.sampling.min_tokens <= p->max_tokens);
        if (r->echo) CHECK_OR_DIE(p->text != NULL);
    }
    for (int32_t i = 0; i < r->base.n_stop; i++)
        CHECK_OR_DIE(r->base.stop[i] && r->base.stop[i][0] &&
                     strlen(r->base.stop[i]) <= DS_OAI_MAX_STOP_LEN);
    for (int32_t i = 0; i < r->base.n_stop_token_ids; i++)
        CHECK_OR_DIE(r->base.stop_token_ids[i] >= 0 && r->base.stop_token_ids[i] < ctx.vocab);
    for (int32_t k = 0; k < ds_oai_n_choices(r); k++) {
        ds_request q;
        ds_oai_choice_request(r, k, &q);
        CHECK_OR_DIE(ds_sampling_params_validate(&q.sampling, ctx.vocab) == DS_OK);
        CHECK_OR_DIE(q.prompt && q.n_prompt >= 1);
    }
}

/* Feeds every choice engine-like events made from the input and renders the responses. */
static void simulate(const ds_oai_request *r, const uint8_t *data, size_t size) {
    const int32_t n = ds_oai_n_choices(r) < 8 ? ds_oai_n_choices(r) : 8;
    ds_oai_choice ch[8];
    ds_detok dt[8];
    ds_oai_meta m = {"cmpl-fuzz", 1, "m"};
    ds_buf stream = {0};
    for (int32_t k = 0; k < n; k++) {
        ds_oai_choice_init(r, k, &ch[k]);
        ds_detok_init(&dt[k], tok, r->base.skip_special_tokens);
    }
    ds_oai_stream_start(r, &m, ch, n, &stream);
    size_t pos = 0;
    for (int step = 0; step < 6; step++) {
        for (int32_t k = 0; k < n; k++) {
            if (ch[k].done) continue;
            ds_engine_event ev;
            memset(&ev, 0, sizeof ev);
            uint32_t x = 0;
            for (int b = 0; b < 3; b++)
                x = x << 8 | (pos < size ? data[pos++] : (uint8_t)(step * 37 + k));
            ev.token = (int32_t)(x % (uint32_t)ctx.vocab);
            ev.stop_token = -1;
            ds_buf piece = {0};
            ds_detok_push(&dt[k], ev.token, &piece);
            ev.sample.token = ev.token;
            ev.sample.logprob = -(float)(x % 1000) / 100.0f;
            ev.sample.rank = 1 + x % 7;
            ev.sample.n_top = r->logprobs > 0 ? r->logprobs : 0;
            for (int32_t t = 0; t < ev.sample.n_top; t++) {
                ev.sample.top[t].token =
                    (int32_t)((x * 2654435761u + (uint32_t)t) % (uint32_t)ctx.vocab);
                ev.sample.top[t].logprob = -(float)t;
            }
            ev.n_prompt = r->prompts[ch[k].prompt].n;
            ev.n_output = step + 1;
            ev.t_now = step;
            ev.t_first_token = 0;
            if (step == 5 || (x & 7) == 0) {
                ev.finish = (ds_finish_reason)(1 + x % 4);
                ds_detok_finish(&dt[k], &piece);
                if (ev.finish == DS_FINISH_STOP && r->base.n_stop) ev.stop_str = r->stop[0];
                if (ev.finish == DS_FINISH_ERROR) ev.error = "fuzz";
            }
            ev.text = piece.data;
            ev.text_len = piece.len;
            CHECK_OR_DIE(ds_oai_choice_event(&ctx, r, &ch[k], &ev) == DS_OK);
            ds_buf_free(&piece);
            if (r->stream) ds_oai_stream_choice(&ctx, r, &m, &ch[k], ch, n, &stream);
        }
    }
    if (r->stream) {
        ds_oai_stream_end(r, &m, ch, n, &stream);
        sse_roundtrip(&stream);
    } else {
        roundtrip(ds_oai_response(&ctx, r, &m, ch, n));
    }
    ds_buf_free(&stream);
    for (int32_t k = 0; k < n; k++) ds_oai_choice_free(&ch[k]);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    static const char modes[] = "chrtd";
    const char *pick = memchr(modes, data[0], 5);
    const char mode = pick ? *pick : modes[data[0] % 5];
    const char *body = (const char *)data + 1;
    const size_t len = size - 1;
    ds_oai_error err;
    if (mode == 't' || mode == 'd') {
        json_t *out = NULL;
        int rc = mode == 't' ? ds_oai_tokenize(&ctx, body, len, &out, &err)
                             : ds_oai_detokenize(&ctx, body, len, &out, &err);
        if (rc == 0)
            roundtrip(out);
        else
            CHECK_OR_DIE(err.status >= 400 && err.status < 600 && err.message[0]);
        return 0;
    }
    ctx.reasoning = mode == 'r';
    ds_oai_request r;
    int rc = ds_oai_parse(&ctx, mode == 'c' ? DS_OAI_COMPLETION : DS_OAI_CHAT, body, len, &r, &err);
    if (rc != 0) {
        CHECK_OR_DIE(err.status >= 400 && err.status < 600 && err.message[0] && err.type);
        roundtrip(ds_oai_error_json(&err));
        return 0;
    }
    check_request(&r);
    simulate(&r, data, size);
    ds_oai_request_free(&r);
    return 0;
}
