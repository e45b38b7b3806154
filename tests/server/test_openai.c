/* The request mapping and response rendering of src/server/openai.c without HTTP or an engine:
 *   - defaults (max_tokens 16 for completions, the rest of max_model_len for chat; the
 *     sampling defaults of the context, i.e. a generation_config.json), choice seeds (seed + i,
 *     wrapping: -1 + 1 = 0), choice indexes over prompts x n, usage counting each prompt once;
 *   - the R1 split streamed: "</think>" cut at every byte boundary between two events gives the
 *     same reasoning_content / content as the whole response, and a split output without
 *     "</think>" is all reasoning with content null;
 *   - echo with logprobs puts the prompt tokens first with null logprobs;
 *   - error JSON has OpenAI's four fields. */
#include "testutil.h"
#include "server/server.h"
#include "tokenizer/tokenizer.h"

#include <stdlib.h>

static ds_oai_ctx ctx;
static const char *names[] = {"m"};

static void feed_text(const ds_oai_request *r, ds_oai_choice *ch, const char *text, int finish) {
    ds_engine_event ev;
    memset(&ev, 0, sizeof ev);
    ev.token = 5;
    ev.stop_token = -1;
    ev.text = (char *)text;
    ev.text_len = strlen(text);
    ev.n_prompt = r->prompts[0].n;
    ev.n_output = ch->n_output + 1;
    ev.finish = finish ? DS_FINISH_LENGTH : DS_FINISH_NONE;
    CHECK(ds_oai_choice_event(&ctx, r, ch, &ev) == DS_OK);
}

/* The concatenated delta field `key` of every chunk in an SSE buffer. */
static void sse_concat(const ds_buf *b, const char *key, ds_buf *out) {
    for (const char *p = b->data; p && *p;) {
        const char *end = strstr(p, "\n\n");
        if (!end) break;
        json_error_t e;
        json_t *o =
            strncmp(p + 6, "[DONE]", 6) ? json_loadb(p + 6, (size_t)(end - p - 6), 0, &e) : NULL;
        json_t *d = json_object_get(json_array_get(json_object_get(o, "choices"), 0), "delta");
        json_t *v = json_object_get(d, key);
        if (json_is_string(v)) ds_buf_append(out, json_string_value(v), json_string_length(v));
        json_decref(o);
        p = end + 2;
    }
}

static void test_reasoning_split(void) {
    const char *outputs[] = {"abc</think>def", "</think>x", "think hard</think>", "no marker <th",
                             "<think>a</think>b</think>c"};
    ctx.reasoning = 1;
    for (size_t t = 0; t < sizeof outputs / sizeof *outputs; t++) {
        const char *text = outputs[t];
        ds_oai_request r;
        ds_oai_error e;
        const char *body = "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}";
        CHECK(ds_oai_parse(&ctx, DS_OAI_CHAT, body, strlen(body), &r, &e) == 0);
        /* whole */
        ds_oai_choice whole;
        ds_oai_choice_init(&r, 0, &whole);
        feed_text(&r, &whole, text, 1);
        ds_oai_meta m = {"chatcmpl-x", 1, "m"};
        json_t *resp = ds_oai_response(&ctx, &r, &m, &whole, 1);
        json_t *msg =
            json_object_get(json_array_get(json_object_get(resp, "choices"), 0), "message");
        const char *want_r = json_string_value(json_object_get(msg, "reasoning_content"));
        const char *want_c = json_string_value(json_object_get(msg, "content"));
        const char *cut = strstr(text, "</think>");
        if (!cut) CHECK(want_c == NULL && want_r && !strcmp(want_r, text));
        /* streamed, cut at every byte */
        for (size_t k = 0; k <= strlen(text); k++) {
            char a[64], b[64];
            snprintf(a, sizeof a, "%.*s", (int)k, text);
            snprintf(b, sizeof b, "%s", text + k);
            ds_oai_choice ch;
            ds_oai_choice_init(&r, 0, &ch);
            ds_buf sse = {0}, rs = {0}, cs = {0};
            ds_oai_stream_start(&r, &m, &ch, 1, &sse);
            feed_text(&r, &ch, a, 0);
            ds_oai_stream_choice(&ctx, &r, &m, &ch, &ch, 1, &sse);
            feed_text(&r, &ch, b, 1);
            ds_oai_stream_choice(&ctx, &r, &m, &ch, &ch, 1, &sse);
            ds_oai_stream_end(&r, &m, &ch, 1, &sse);
            sse_concat(&sse, "reasoning_content", &rs);
            sse_concat(&sse, "content", &cs);
            CHECK_MSG(!strcmp(rs.data ? rs.data : "", want_r ? want_r : ""),
                      "'%s' cut at %zu: reasoning '%s' vs '%s'", text, k, rs.data ? rs.data : "",
                      want_r ? want_r : "");
            CHECK_MSG(!strcmp(cs.data ? cs.data : "", want_c ? want_c : ""),
                      "'%s' cut at %zu: content '%s' vs '%s'", text, k, cs.data ? cs.data : "",
                      want_c ? want_c : "");
            CHECK(sse.data && strstr(sse.data, "\"role\":\"assistant\"") &&
                  strstr(sse.data, "data: [DONE]\n\n"));
            ds_buf_free(&sse);
            ds_buf_free(&rs);
            ds_buf_free(&cs);
            ds_oai_choice_free(&ch);
        }
        json_decref(resp);
        ds_oai_choice_free(&whole);
        ds_oai_request_free(&r);
    }
    ctx.reasoning = 0;
}

static void test_defaults_and_seeds(void) {
    ds_oai_request r;
    ds_oai_error e;
    const char *b1 = "{\"prompt\": [[0, 1, 2], [3]], \"n\": 3, \"seed\": -1}";
    CHECK(ds_oai_parse(&ctx, DS_OAI_COMPLETION, b1, strlen(b1), &r, &e) == 0);
    CHECK(r.n_prompts == 2 && r.n == 3 && ds_oai_n_choices(&r) == 6);
    CHECK(r.prompts[0].max_tokens == 16 && r.prompts[1].max_tokens == 16);
    ds_request q;
    ds_oai_choice_request(&r, 4, &q); /* prompt 1, sample 1 */
    CHECK(q.n_prompt == 1 && q.prompt[0] == 3);
    CHECK(q.sampling.seed == 0); /* -1 + 1 wraps to 0 */
    ds_oai_choice_request(&r, 3, &q);
    CHECK(q.sampling.seed == UINT64_MAX);
    CHECK(q.sampling.temperature == 0.7f && q.sampling.top_p == 0.9f); /* the context's */
    ds_oai_choice ch[6];
    for (int k = 0; k < 6; k++) {
        ds_oai_choice_init(&r, k, &ch[k]);
        CHECK(ch[k].index == k && ch[k].prompt == k / 3);
        ch[k].n_output = 2;
        ch[k].done = 1;
        ch[k].finish = DS_FINISH_LENGTH;
    }
    json_t *u = ds_oai_usage(&r, ch, 6);
    CHECK(json_integer_value(json_object_get(u, "prompt_tokens")) == 4); /* once per prompt */
    CHECK(json_integer_value(json_object_get(u, "completion_tokens")) == 12);
    json_decref(u);
    for (int k = 0; k < 6; k++) ds_oai_choice_free(&ch[k]);
    ds_oai_request_free(&r);
    const char *b2 =
        "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}], \"temperature\": 0}";
    CHECK(ds_oai_parse(&ctx, DS_OAI_CHAT, b2, strlen(b2), &r, &e) == 0);
    CHECK(r.prompts[0].max_tokens == ctx.max_model_len - r.prompts[0].n);
    CHECK(r.base.sampling.temperature == 0.0f);
    ds_oai_request_free(&r);
    /* echo + logprobs: the prompt's tokens first, with null logprobs */
    const char *b3 =
        "{\"prompt\": \"Hello world\", \"echo\": true, \"logprobs\": 1, \"max_tokens\": 0}";
    CHECK(ds_oai_parse(&ctx, DS_OAI_COMPLETION, b3, strlen(b3), &r, &e) == 0);
    ds_oai_choice c0;
    ds_oai_choice_init(&r, 0, &c0);
    c0.done = 1;
    c0.finish = DS_FINISH_LENGTH;
    ds_oai_meta m = {"cmpl-x", 1, "m"};
    json_t *resp = ds_oai_response(&ctx, &r, &m, &c0, 1);
    json_t *c = json_array_get(json_object_get(resp, "choices"), 0);
    CHECK(!strcmp(json_string_value(json_object_get(c, "text")), "Hello world"));
    json_t *lp = json_object_get(c, "logprobs");
    CHECK(json_array_size(json_object_get(lp, "tokens")) == 3); /* BOS Hello ␣world */
    CHECK(json_is_null(json_array_get(json_object_get(lp, "token_logprobs"), 0)));
    CHECK(json_integer_value(json_array_get(json_object_get(lp, "text_offset"), 2)) > 0);
    json_decref(resp);
    ds_oai_choice_free(&c0);
    ds_oai_request_free(&r);
    /* errors */
    const char *b4 = "{\"prompt\": \"x\", \"top_p\": 0}";
    CHECK(ds_oai_parse(&ctx, DS_OAI_COMPLETION, b4, strlen(b4), &r, &e) == -1);
    CHECK(e.status == 400 && !strcmp(e.param, "top_p") && strstr(e.message, "top_p"));
    json_t *ej = ds_oai_error_json(&e), *in = json_object_get(ej, "error");
    CHECK(json_object_size(in) == 4 && json_is_string(json_object_get(in, "message")) &&
          !strcmp(json_string_value(json_object_get(in, "type")), "invalid_request_error") &&
          !strcmp(json_string_value(json_object_get(in, "param")), "top_p"));
    json_decref(ej);
}

int main(void) {
    const char *fx = ds_test_fixtures();
    if (!fx) return ds_test_skip_or_fail("golden fixtures missing");
    char dir[4096];
    snprintf(dir, sizeof dir, "%.4000s/tiny-a", fx);
    ds_tokenizer *tok = NULL;
    CHECK(ds_tok_open(dir, &tok) == DS_OK);
    if (!tok) return ds_test_finish("test_openai");
    ctx = ds_oai_default_ctx();
    ctx.tok = tok;
    ctx.vocab = 129280;
    ctx.max_model_len = 64;
    ctx.names = names;
    ctx.n_names = 1;
    ctx.chat_format = DS_CHAT_V3;
    ctx.temperature = 0.7f;
    ctx.top_p = 0.9f;
    test_defaults_and_seeds();
    test_reasoning_split();
    ds_tok_close(tok);
    return ds_test_finish("test_openai");
}
