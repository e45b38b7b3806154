/* R1 reasoning split: the examples, and the streaming property: for every way of cutting a text
 * into deltas (every single cut point, every pair of cut points, byte-by-byte, and random
 * cuttings), the concatenated reasoning/content equal the split of the whole text. */
#include "testutil.h"
#include "tokenizer/tokenizer.h"

#include <stdlib.h>

/* The reference, written the way vLLM's extract_reasoning reads (a leading <think> only). */
static void ref_split(const char *t, size_t n, ds_buf *rs, ds_buf *ct) {
    if (n >= 7 && !memcmp(t, "<think>", 7)) t += 7, n -= 7;
    for (size_t i = 0; i + 8 <= n; i++)
        if (!memcmp(t + i, "</think>", 8)) {
            ds_buf_append(rs, t, i);
            ds_buf_append(ct, t + i + 8, n - i - 8);
            return;
        }
    ds_buf_append(rs, t, n);
}

/* Streams t cut at the sorted positions cuts[0..nc) and compares with the reference. */
static int stream_ok(const char *t, size_t n, const size_t *cuts, size_t nc) {
    ds_buf r1 = {0}, c1 = {0}, r2 = {0}, c2 = {0};
    ref_split(t, n, &r1, &c1);
    ds_reasoning st;
    ds_reasoning_init(&st);
    size_t prev = 0;
    for (size_t k = 0; k <= nc; k++) {
        size_t at = k < nc ? cuts[k] : n;
        CHECK(ds_reasoning_push(&st, t + prev, at - prev, &r2, &c2) == DS_OK);
        prev = at;
    }
    CHECK(ds_reasoning_finish(&st, &r2, &c2) == DS_OK);
    int ok = r1.len == r2.len && c1.len == c2.len &&
             (!r1.len || !memcmp(r1.data, r2.data, r1.len)) &&
             (!c1.len || !memcmp(c1.data, c2.data, c1.len));
    ds_buf_free(&r1);
    ds_buf_free(&c1);
    ds_buf_free(&r2);
    ds_buf_free(&c2);
    return ok;
}

static void example(const char *text, const char *want_r, const char *want_c) {
    ds_buf r = {0}, c = {0};
    ds_reasoning st;
    ds_reasoning_init(&st);
    CHECK(ds_reasoning_push(&st, text, strlen(text), &r, &c) == DS_OK);
    CHECK(ds_reasoning_finish(&st, &r, &c) == DS_OK);
    CHECK_MSG(!strcmp(r.data ? r.data : "", want_r), "'%s': reasoning '%s', want '%s'", text,
              r.data ? r.data : "", want_r);
    CHECK_MSG(!strcmp(c.data ? c.data : "", want_c), "'%s': content '%s', want '%s'", text,
              c.data ? c.data : "", want_c);
    ds_buf_free(&r);
    ds_buf_free(&c);
}

int main(void) {
    example("", "", "");
    example("abc", "abc", "");
    example("abc</think>xyz", "abc", "xyz");
    example("<think>abc</think>xyz", "abc", "xyz");
    example("<think>abc", "abc", "");
    example("<think></think>", "", "");
    example("\n</think>\n\nanswer", "\n", "\n\nanswer");
    example("a</think>b</think>c", "a", "b</think>c");    /* only the first marker splits */
    example("<think><think>x</think>y", "<think>x", "y"); /* only one leading <think> */
    example(" <think>x</think>y", " <think>x", "y");      /* not leading: ordinary text */
    example("<thin", "<thin", "");
    example("a</thin", "a</thin", "");
    example("a<</think>b", "a<", "b");
    example("</think>", "", "");
    example("<</think>", "<", "");
    example("<think</think>z", "<think", "z");
    example("推理</think>答案", "推理", "答案");

    static const char *texts[] = {
        "<think>\nLet me think.\n</think>\n\nThe answer is 4.",
        "no markers at all <b>bold</b> < > </ </t",
        "<think>a<thin</thi</think></think><think>b",
        "<<<think>>></think></think><",
        "<</think>x<think></think>",
        "</think",
        "<think",
        "<think>",
        "x</think>",
        "推理<思考></think>答案 🙂",
    };
    size_t cuts[64];
    for (size_t t = 0; t < sizeof texts / sizeof texts[0]; t++) {
        const char *s = texts[t];
        size_t n = strlen(s);
        int ok = stream_ok(s, n, NULL, 0);
        for (size_t i = 0; i <= n; i++) { /* every single cut */
            cuts[0] = i;
            ok &= stream_ok(s, n, cuts, 1);
        }
        for (size_t i = 0; i <= n; i++) /* every pair of cuts */
            for (size_t j = i; j <= n; j++) {
                cuts[0] = i;
                cuts[1] = j;
                ok &= stream_ok(s, n, cuts, 2);
            }
        if (n <= 64) { /* byte by byte */
            for (size_t i = 0; i < n; i++) cuts[i] = i;
            ok &= stream_ok(s, n, cuts, n);
        }
        CHECK_MSG(ok, "text %zu: a cutting disagrees with the whole-text split", t);
    }

    /* random texts over an alphabet dense in marker pieces, randomly cut */
    static const char *pieces[] = {"<", "/",       "t",        "h",    "i",    "n", "k",
                                   ">", "<think>", "</think>", "</th", "ink>", "x", "é"};
    const size_t np = sizeof pieces / sizeof pieces[0];
    unsigned seed = 12345;
    int ok = 1;
    for (int iter = 0; iter < 20000; iter++) {
        char buf[256];
        size_t n = 0;
        seed = seed * 1103515245u + 12345u;
        int parts = (int)((seed >> 16) % 24);
        for (int k = 0; k < parts; k++) {
            seed = seed * 1103515245u + 12345u;
            const char *p = pieces[(seed >> 16) % np];
            size_t l = strlen(p);
            if (n + l >= sizeof buf) break;
            memcpy(buf + n, p, l);
            n += l;
        }
        size_t nc = 0;
        for (size_t i = 0; i <= n && nc < 64; i++) {
            seed = seed * 1103515245u + 12345u;
            if ((seed >> 16) % 3 == 0) cuts[nc++] = i;
        }
        if (!stream_ok(buf, n, cuts, nc)) {
            ok = 0;
            fprintf(stderr, "random text '%.*s' disagrees\n", (int)n, buf);
            break;
        }
    }
    CHECK(ok);
    return ds_test_finish("test_reasoning");
}
