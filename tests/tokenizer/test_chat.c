/* Chat templates: hand-written expected renderings for V3, R1 and R1-0528 (each derived from the
 * template text and checked against @huggingface/jinja, see docs/chat.md), recognition of the
 * real templates, refusal of others, and the errors for messages a template cannot render. */
#include "testutil.h"
#include "tokenizer/tokenizer.h"

#include <stdlib.h>
#include <sys/wait.h>

#define BOS "<｜begin▁of▁sentence｜>"
#define U "<｜User｜>"
#define A "<｜Assistant｜>"
#define E "<｜end▁of▁sentence｜>"
#define TCB "<｜tool▁calls▁begin｜>"
#define TCE "<｜tool▁calls▁end｜>"
#define TOB "<｜tool▁outputs▁begin｜>"
#define TOE "<｜tool▁outputs▁end｜>"
#define OB "<｜tool▁output▁begin｜>"
#define OE "<｜tool▁output▁end｜>"
/* one tool call as the templates spell it */
#define CALL(name, args)                                                                           \
    "<｜tool▁call▁begin｜>function<｜tool▁sep｜>" name "\n```json\n" args "\n```<"                 \
    "｜tool▁call▁end｜>"
#define TC_JSON(name, args)                                                                        \
    "{\"type\": \"function\", \"function\": {\"name\": \"" name "\", \"arguments\": " args "}}"

/* Renders messages (JSON text) and compares with the expected bytes. */
static void expect(ds_chat_format f, const char *json, int agp, const char *want, int line) {
    json_error_t e;
    json_t *m = json_loads(json, 0, &e);
    if (!m) {
        CHECK_MSG(0, "line %d: bad test JSON: %s", line, e.text);
        return;
    }
    ds_buf out = {0};
    int rc = ds_chat_render(f, BOS, m, agp, &out);
    CHECK_MSG(rc == DS_OK, "line %d: render failed: %s", line, ds_err_msg());
    if (rc == DS_OK)
        CHECK_MSG(out.len == strlen(want) && memcmp(out.data, want, out.len) == 0,
                  "line %d (%s):\n got: %s\nwant: %s", line, ds_chat_format_name(f),
                  out.data ? out.data : "", want);
    ds_buf_free(&out);
    json_decref(m);
}
#define EXPECT(f, json, agp, want) expect(f, json, agp, want, __LINE__)

/* Renders and expects DS_ERR_ARG with `needle` in the message; out must be left as it was. */
static void expect_err(ds_chat_format f, const char *json, const char *needle, int line) {
    json_error_t e;
    json_t *m = json_loads(json, JSON_DECODE_ANY, &e);
    if (!m) {
        CHECK_MSG(0, "line %d: bad test JSON: %s", line, e.text);
        return;
    }
    ds_buf out = {0};
    ds_buf_append(&out, "keep", 4);
    int rc = ds_chat_render(f, BOS, m, 1, &out);
    CHECK_MSG(rc == DS_ERR_ARG, "line %d: rc %d", line, rc);
    CHECK_MSG(strstr(ds_err_msg(), needle) != NULL, "line %d: message '%s' lacks '%s'", line,
              ds_err_msg(), needle);
    CHECK_MSG(out.len == 4 && !strcmp(out.data, "keep"), "line %d: out changed", line);
    ds_buf_free(&out);
    json_decref(m);
}
#define EXPECT_ERR(f, json, needle) expect_err(f, json, needle, __LINE__)

static void test_v3(void) {
    const ds_chat_format f = DS_CHAT_V3;
    EXPECT(f, "[{\"role\":\"user\",\"content\":\"hi\"}]", 1, BOS U "hi" A);
    EXPECT(f, "[{\"role\":\"user\",\"content\":\"hi\"}]", 0, BOS U "hi");
    EXPECT(f, "[]", 1, BOS A);
    EXPECT(f, "[{\"role\":\"system\",\"content\":\"S\"},{\"role\":\"user\",\"content\":\"hi\"}]", 1,
           BOS "S" U "hi" A);
    /* every system message, wherever it is, joins the prompt with "\n\n" */
    EXPECT(f,
           "[{\"role\":\"system\",\"content\":\"S1\"},{\"role\":\"user\",\"content\":\"u\"},"
           "{\"role\":\"system\",\"content\":\"S2\"},{\"role\":\"system\",\"content\":\"\"}]",
           0, BOS "S1\n\nS2\n\n" U "u");
    /* history; V3 keeps <think> in assistant content */
    EXPECT(f,
           "[{\"role\":\"user\",\"content\":\"a\"},{\"role\":\"assistant\",\"content\":"
           "\"<think>r</think>b\"},{\"role\":\"user\",\"content\":\"c\"}]",
           1, BOS U "a" A "<think>r</think>b" E U "c" A);
    /* one tool call: no tool_calls_end (the template only closes after a second call) */
    EXPECT(
        f,
        "[{\"role\":\"user\",\"content\":\"q\"},{\"role\":\"assistant\",\"content\":null,"
        "\"tool_calls\":[" TC_JSON("f1", "\"{}\"") "]},{\"role\":\"tool\",\"content\":\"r\"},"
                                                   "{\"role\":\"assistant\",\"content\":\"ans\"}]",
        1, BOS U "q" A TCB CALL("f1", "{}") TOB OB "r" OE TOE "ans" E A);
    /* several calls: each later call is followed by tool_calls_end + eos */
    EXPECT(f,
           "[{\"role\":\"user\",\"content\":\"q\"},{\"role\":\"assistant\",\"content\":null,"
           "\"tool_calls\":[" TC_JSON("f1", "\"{\\\"a\\\": 1}\"") "," TC_JSON(
               "f2", "\"\"") "," TC_JSON("f3", "\"[]\"") "]}]",
           0,
           BOS U "q" A TCB CALL("f1", "{\"a\": 1}") "\n" CALL("f2", "") TCE E "\n" CALL("f3", "[]")
               TCE E);
    /* several outputs, then the answer; a trailing tool output suppresses the prompt */
    EXPECT(f,
           "[{\"role\":\"user\",\"content\":\"q\"},{\"role\":\"assistant\",\"content\":null,"
           "\"tool_calls\":[" TC_JSON("f1", "\"{}\"") "," TC_JSON(
               "f2", "\"{}\"") "]},"
                               "{\"role\":\"tool\",\"content\":\"r1\"},{\"role\":\"tool\","
                               "\"content\":\"r2\"},"
                               "{\"role\":\"assistant\",\"content\":\"ans\"}]",
           1,
           BOS U "q" A TCB CALL("f1", "{}") "\n" CALL("f2", "{}") TCE E TOB OB
           "r1" OE "\n" OB "r2" OE TOE "ans" E A);
    EXPECT(f,
           "[{\"role\":\"user\",\"content\":\"q\"},{\"role\":\"assistant\",\"content\":null,"
           "\"tool_calls\":[" TC_JSON("f1", "\"{}\"") "]},{\"role\":\"tool\",\"content\":\"r\"}]",
           1, BOS U "q" A TCB CALL("f1", "{}") TOB OB "r" OE TOE);
    /* ns.is_first and ns.is_output_first are never reset: a second round continues the first */
    EXPECT(f,
           "[{\"role\":\"user\",\"content\":\"q\"},{\"role\":\"assistant\",\"content\":null,"
           "\"tool_calls\":[" TC_JSON(
               "f1", "\"{}\"") "]},{\"role\":\"tool\",\"content\":\"r\"},"
                               "{\"role\":\"assistant\",\"content\":\"x\"},{\"role\":\"user\","
                               "\"content\":\"q2\"},"
                               "{\"role\":\"assistant\",\"content\":null,\"tool_calls\":[" TC_JSON(
                                   "f2", "\"{}\"") "]},{\"role\":\"tool\",\"content\":\"s\"}]",
           1,
           BOS U "q" A TCB CALL("f1", "{}") TOB OB "r" OE TOE "x" E U "q2"
                                                   "\n" CALL("f2", "{}") TCE E "\n" OB "s" OE TOE);
    /* content present: tool_calls are not rendered at all */
    EXPECT(
        f,
        "[{\"role\":\"assistant\",\"content\":\"x\",\"tool_calls\":[" TC_JSON("f", "\"{}\"") "]}]",
        0, BOS A "x" E);
    /* null content without tool calls: the template iterates nothing renderable */
    EXPECT(f, "[{\"role\":\"assistant\",\"content\":null,\"tool_calls\":[]}]", 0, BOS);
    EXPECT(f, "[{\"role\":\"user\",\"content\":\"\"},{\"role\":\"assistant\",\"content\":\"\"}]", 1,
           BOS U A E A);
    EXPECT(f, "[{\"role\":\"user\",\"content\":\"你好 🙂 é\\n\"}]", 1,
           BOS U "你好 🙂 é\n" A);
}

static void test_r1(void) {
    const ds_chat_format f = DS_CHAT_R1;
    EXPECT(f, "[{\"role\":\"user\",\"content\":\"hi\"}]", 1, BOS U "hi" A "<think>\n");
    EXPECT(f, "[{\"role\":\"user\",\"content\":\"hi\"}]", 0, BOS U "hi");
    EXPECT(f,
           "[{\"role\":\"system\",\"content\":\"S1\"},{\"role\":\"system\",\"content\":\"S2\"},"
           "{\"role\":\"user\",\"content\":\"hi\"}]",
           1, BOS "S1\n\nS2" U "hi" A "<think>\n");
    /* history: everything up to the last </think> is dropped */
    EXPECT(f,
           "[{\"role\":\"user\",\"content\":\"a\"},{\"role\":\"assistant\",\"content\":"
           "\"<think>\\nr\\n</think>\\n\\nans\"},{\"role\":\"user\",\"content\":\"c\"},"
           "{\"role\":\"assistant\",\"content\":\"x</think>y</think>z\"},"
           "{\"role\":\"assistant\",\"content\":\"no think\"}]",
           1, BOS U "a" A "\n\nans" E U "c" A "z" E A "no think" E A "<think>\n");
    /* one call closes tool_calls_end + eos */
    EXPECT(f,
           "[{\"role\":\"user\",\"content\":\"q\"},{\"role\":\"assistant\",\"content\":null,"
           "\"tool_calls\":[" TC_JSON("f1", "\"{}\"") "]}]",
           0, BOS U "q" A TCB CALL("f1", "{}") TCE E);
    /* content before the calls; several calls joined by "\n" */
    EXPECT(f,
           "[{\"role\":\"user\",\"content\":\"q\"},{\"role\":\"assistant\",\"content\":\"pre\","
           "\"tool_calls\":[" TC_JSON("f1", "\"{}\"") "," TC_JSON(
               "搜索", "\"{\\\"q\\\": \\\"é\\\"}\"") "]}]",
           0, BOS U "q" A "pre" TCB CALL("f1", "{}") "\n" CALL("搜索", "{\"q\": \"é\"}") TCE E);
    /* outputs: no "\n" between them in R1; the answer after outputs is not </think>-stripped */
    EXPECT(f,
           "[{\"role\":\"user\",\"content\":\"q\"},{\"role\":\"assistant\",\"content\":null,"
           "\"tool_calls\":[" TC_JSON("f1", "\"{}\"") "," TC_JSON(
               "f2", "\"{}\"") "]},"
                               "{\"role\":\"tool\",\"content\":\"r1\"},{\"role\":\"tool\","
                               "\"content\":\"r2\"},"
                               "{\"role\":\"assistant\",\"content\":\"t</think>ans\"}]",
           1,
           BOS U "q" A TCB CALL("f1", "{}") "\n" CALL("f2", "{}") TCE E TOB OB
           "r1" OE OB "r2" OE TOE "t</think>ans" E A "<think>\n");
    EXPECT(f,
           "[{\"role\":\"user\",\"content\":\"q\"},{\"role\":\"assistant\",\"content\":null,"
           "\"tool_calls\":[" TC_JSON("f1", "\"{}\"") "]},{\"role\":\"tool\",\"content\":\"r\"}]",
           1, BOS U "q" A TCB CALL("f1", "{}") TCE E TOB OB "r" OE TOE);
    /* the key alone selects the tool branch: an empty list drops the content */
    EXPECT(f, "[{\"role\":\"assistant\",\"content\":\"x\",\"tool_calls\":[]}]", 1,
           BOS TCE E A "<think>\n");
    EXPECT(f, "[{\"role\":\"user\",\"content\":\"\"}]", 1, BOS U A "<think>\n");
}

static void test_r1_0528(void) {
    const ds_chat_format f = DS_CHAT_R1_0528;
    /* the user turn opens the assistant; no second prompt after a user turn */
    EXPECT(f, "[{\"role\":\"user\",\"content\":\"hi\"}]", 1, BOS U "hi" A);
    EXPECT(f, "[{\"role\":\"user\",\"content\":\"hi\"}]", 0, BOS U "hi" A);
    EXPECT(f,
           "[{\"role\":\"system\",\"content\":\"S\"},{\"role\":\"user\",\"content\":\"a\"},"
           "{\"role\":\"assistant\",\"content\":\"<think>r</think>ans\"}]",
           1, BOS "S" U "a" A "ans" E A);
    /* outputs "\n"-joined; arguments that are not a string are tojson'd */
    EXPECT(f,
           "[{\"role\":\"user\",\"content\":\"q\"},{\"role\":\"assistant\",\"content\":\"\","
           "\"tool_calls\":[" TC_JSON("f1", "{\"a\":1,\"b\":[true,null]}") "," TC_JSON(
               "f2", "\"{}\"") "]},{\"role\":\"tool\",\"content\":\"r1\"},{\"role\":\"tool\","
                               "\"content\":\"r2\"},"
                               "{\"role\":\"assistant\",\"content\":\"ans\"}]",
           1,
           BOS U "q" A TCB CALL("f1", "{\"a\": 1, \"b\": [true, null]}") "\n" CALL("f2", "{}")
               TCE E TOB OB "r1" OE "\n" OB "r2" OE TOE "ans" E A);
    EXPECT(f, "[{\"role\":\"assistant\",\"content\":\"x\",\"tool_calls\":null}]", 0, BOS "x" E);
}

static void test_errors(void) {
    EXPECT_ERR(DS_CHAT_V3, "{\"role\":\"user\"}", "messages: expected an array");
    EXPECT_ERR(DS_CHAT_V3,
               "[{\"role\":\"user\",\"content\":\"a\"},{\"role\":\"bot\",\"content\":\"b\"}]",
               "messages[1].role: 'bot'");
    EXPECT_ERR(DS_CHAT_R1, "[{\"content\":\"a\"}]", "messages[0].role");
    EXPECT_ERR(DS_CHAT_R1, "[\"hi\"]", "messages[0]: expected an object");
    EXPECT_ERR(DS_CHAT_V3, "[{\"role\":\"user\",\"content\":null}]",
               "messages[0].content: expected a string, got null");
    EXPECT_ERR(DS_CHAT_V3, "[{\"role\":\"user\"}]",
               "messages[0].content: expected a string, got missing");
    EXPECT_ERR(DS_CHAT_R1, "[{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":\"x\"}]}]",
               "messages[0].content: expected a string, got an array");
    EXPECT_ERR(DS_CHAT_V3, "[{\"role\":\"system\",\"content\":5}]", "messages[0].content");
    EXPECT_ERR(DS_CHAT_V3,
               "[{\"role\":\"user\",\"content\":\"q\"},{\"role\":\"assistant\",\"content\":null}]",
               "messages[1].tool_calls: expected an array");
    EXPECT_ERR(DS_CHAT_R1, "[{\"role\":\"assistant\",\"content\":null,\"tool_calls\":null}]",
               "messages[0].tool_calls: expected an array");
    EXPECT_ERR(
        DS_CHAT_V3,
        "[{\"role\":\"assistant\",\"content\":null,\"tool_calls\":[" TC_JSON("f", "{}") "]}]",
        "messages[0].tool_calls[0].function.arguments: expected a string");
    EXPECT_ERR(
        DS_CHAT_R1,
        "[{\"role\":\"assistant\",\"content\":null,\"tool_calls\":[{\"type\":\"function\"}]}]",
        "messages[0].tool_calls[0].function: expected an object");
    EXPECT_ERR(DS_CHAT_R1, "[{\"role\":\"assistant\",\"tool_calls\":[" TC_JSON("f", "\"{}\"") "]}]",
               "messages[0].content: expected a string, got missing");
    EXPECT_ERR(
        DS_CHAT_R1_0528,
        "[{\"role\":\"assistant\",\"content\":null,\"tool_calls\":[" TC_JSON("f", "\"{}\"") "]}]",
        "messages[0].content");
    EXPECT_ERR(DS_CHAT_R1, "[{\"role\":\"tool\",\"content\":null}]", "messages[0].content");
}

/* Reads tokenizer_config.json of a fixture directory and returns its chat_template (malloc'd). */
static char *fixture_template(const char *dir) {
    char path[4200];
    snprintf(path, sizeof path, "%s/tokenizer_config.json", dir);
    json_error_t e;
    json_t *c = json_load_file(path, 0, &e);
    if (!c) return NULL;
    const char *t = json_string_value(json_object_get(c, "chat_template"));
    char *r = t ? strdup(t) : NULL;
    json_decref(c);
    return r;
}

static void test_detect(const char *fixtures) {
    ds_chat_format f = DS_CHAT_R1;
    char dir[4096];
    snprintf(dir, sizeof dir, "%s/tiny-a", fixtures);
    char *v3 = fixture_template(dir);
    CHECK(v3 != NULL);
    if (v3) {
        CHECK(ds_chat_detect(v3, &f) == DS_OK && f == DS_CHAT_V3);
        /* whitespace inside a tag does not matter ... */
        char *sp = strstr(v3, "{{bos_token}}");
        CHECK(sp != NULL);
        if (sp) {
            size_t n = strlen(v3);
            char *w = malloc(n + 3);
            size_t at = (size_t)(sp - v3);
            memcpy(w, v3, at);
            memcpy(w + at, "{{ bos_token }}", 15);
            strcpy(w + at + 15, sp + 13);
            f = DS_CHAT_R1;
            CHECK(ds_chat_detect(w, &f) == DS_OK && f == DS_CHAT_V3);
            free(w);
        }
        /* ... but outside a tag it is output: another template */
        size_t n = strlen(v3);
        char *w = malloc(n + 2);
        memcpy(w, v3, n);
        strcpy(w + n, " ");
        CHECK(ds_chat_detect(w, &f) == DS_ERR_UNSUPPORTED);
        free(w);
        free(v3);
    }
    {
        /* The published R1 template, kept as test data beside the JS conformance test. */
        json_t *r1 =
            json_load_file(DSINFER_SOURCE_DIR "/tests/js/templates/deepseek-r1.json", 0, NULL);
        CHECK(r1 != NULL);
        const char *tpl = json_string_value(json_object_get(r1, "chat_template"));
        CHECK(tpl && ds_chat_detect(tpl, &f) == DS_OK && f == DS_CHAT_R1);
        json_decref(r1);
    }
    CHECK(ds_chat_detect("{% for m in messages %}{{ m['content'] }}{% endfor %}", &f) ==
          DS_ERR_UNSUPPORTED);
    CHECK_ERR_CONTAINS("--chat-template-format v3|r1");
    CHECK(ds_chat_detect(NULL, &f) == DS_ERR_UNSUPPORTED);
    CHECK_ERR_CONTAINS("--chat-template-format");

    const char *names[] = {"v3", "r1", "r1-0528"};
    for (int i = 0; i < 3; i++) {
        CHECK(ds_chat_format_parse(names[i], &f) == DS_OK);
        CHECK(!strcmp(ds_chat_format_name(f), names[i]));
    }
    CHECK(ds_chat_format_parse("R1", &f) == DS_ERR_ARG);
    CHECK(ds_chat_format_parse("chatml", &f) == DS_ERR_ARG);
}

/* The CLI contract the conformance test relies on: --batch gives one JSON string per line. */
static void test_cli(const char *fixtures) {
    char cmd[8192];
    snprintf(cmd, sizeof cmd,
             "printf '%%s\\n%%s\\n' '{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],"
             "\"add_generation_prompt\":true}' '{\"messages\":[{\"role\":\"user\"}]}' | "
             "%s chat-template --model %s/tiny-a --batch 2>/dev/null",
             DSINFER_BIN, fixtures);
    FILE *p = popen(cmd, "r");
    CHECK(p != NULL);
    if (!p) return;
    char buf[4096];
    size_t n = fread(buf, 1, sizeof buf - 1, p);
    buf[n] = 0;
    int st = pclose(p);
    CHECK_MSG(!strcmp(buf, "\"" BOS U "hi" A "\"\nnull\n"), "batch output: %s", buf);
    CHECK(WEXITSTATUS(st) == 1); /* the second line failed */

    snprintf(cmd, sizeof cmd,
             "printf '%%s' '[{\"role\":\"system\",\"content\":\"S\"},{\"role\":\"user\","
             "\"content\":\"hi\"}]' | %s chat-template --model %s/tiny-a "
             "--chat-template-format r1 --add-generation-prompt",
             DSINFER_BIN, fixtures);
    p = popen(cmd, "r");
    CHECK(p != NULL);
    if (!p) return;
    n = fread(buf, 1, sizeof buf - 1, p);
    buf[n] = 0;
    st = pclose(p);
    CHECK_MSG(!strcmp(buf, BOS "S" U "hi" A "<think>\n"), "raw output: %s", buf);
    CHECK(WEXITSTATUS(st) == 0);
}

int main(void) {
    test_v3();
    test_r1();
    test_r1_0528();
    test_errors();
    const char *fx = ds_test_fixtures();
    if (fx) {
        test_detect(fx);
        test_cli(fx);
    }
    int rc = ds_test_finish("test_chat");
    return rc ? rc : (fx ? 0 : ds_test_skip_or_fail("fixtures missing"));
}
