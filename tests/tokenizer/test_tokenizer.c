/* Tokenizer tests: golden ids from Hugging Face (prompts.json), decoding, the streaming
 * detokenizer against whole decoding, invalid UTF-8, added tokens, refusals of unsupported
 * tokenizer.json features, and the two BPE merge paths against each other. */
#include "core/core.h"
#include "testutil.h"
#include "tokenizer/tok_internal.h"
#include "tokenizer/tokenizer.h"

#include <jansson.h>
#include <stdlib.h>
#include <string.h>

static ds_tokenizer *tok;
static char tok_dir[4096];

static uint64_t rng = 0x9E3779B97F4A7C15ull;
static uint32_t rnd(void) {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (uint32_t)(rng >> 11);
}

static int encode(const char *s, size_t n, int bos, int32_t **ids, size_t *m) {
    return ds_tok_encode(tok, s, n, bos, ids, m);
}

/* Encodes s and compares with the expected ids. */
static void check_ids(const char *s, const int32_t *want, size_t n_want, int bos) {
    int32_t *ids;
    size_t n;
    CHECK_MSG(encode(s, strlen(s), bos, &ids, &n) == 0, "%s", ds_err_msg());
    int same = n == n_want && (n == 0 || !memcmp(ids, want, n * sizeof *ids));
    CHECK_MSG(same, "'%s': %zu ids, want %zu", s, n, n_want);
    free(ids);
}

static void test_prompts(void) {
    char path[4200];
    snprintf(path, sizeof path, "%s/prompts.json", ds_test_fixtures());
    json_error_t je;
    json_t *root = json_load_file(path, 0, &je);
    CHECK_MSG(root != NULL, "%s: %s", path, je.text);
    if (!root) return;
    const json_t *prompts = json_object_get(root, "prompts");
    size_t i;
    const json_t *p;
    int n_checked = 0;
    json_array_foreach(prompts, i, p) {
        const char *text = json_string_value(json_object_get(p, "text"));
        const json_t *jids = json_object_get(p, "ids");
        size_t n = json_array_size(jids);
        int32_t *want = malloc((n + 1) * sizeof *want);
        for (size_t k = 0; k < n; k++)
            want[k] = (int32_t)json_integer_value(json_array_get(jids, k));
        /* ids carry BOS 0: with add_bos all of them, without it the rest */
        CHECK(n >= 1 && want[0] == 0);
        check_ids(text, want, n, 1);
        check_ids(text, want + 1, n - 1, 0);
        /* decode(encode(text)) == text, with and without skipping BOS */
        ds_buf out = {0};
        CHECK(ds_tok_decode(tok, want + 1, n - 1, 0, &out) == 0);
        CHECK_MSG(out.len == strlen(text) && (!out.len || !memcmp(out.data, text, out.len)),
                  "round trip of '%s'", text);
        out.len = 0;
        CHECK(ds_tok_decode(tok, want, n, 1, &out) == 0);
        CHECK(out.len == strlen(text) && (!out.len || !memcmp(out.data, text, out.len)));
        out.len = 0;
        CHECK(ds_tok_decode(tok, want, n, 0, &out) == 0);
        const char *bos = "<\xef\xbd\x9c"
                          "begin\xe2\x96\x81of\xe2\x96\x81sentence\xef\xbd\x9c>";
        CHECK(out.len == strlen(bos) + strlen(text) && !memcmp(out.data, bos, strlen(bos)));
        ds_buf_free(&out);
        free(want);
        n_checked++;
    }
    CHECK(n_checked == 8);
    json_decref(root);
}

static void test_basics(void) {
    CHECK(ds_tok_vocab_size(tok) == 128815);
    CHECK(ds_tok_bos_id(tok) == 0);
    CHECK(ds_tok_eos_id(tok) == 1);
    CHECK(ds_tok_add_bos(tok) == 1);
    CHECK(ds_tok_token_id(tok, "<|EOT|>") == 128805);
    CHECK(ds_tok_token_id(tok, "\xc4\xa0the") == 270); /* "Ġthe" */
    CHECK(ds_tok_token_id(tok, "no such token, surely") == -1);
    CHECK(ds_tok_chat_template(tok) != NULL);
    CHECK(strstr(ds_tok_bos_token(tok), "begin") != NULL);
    /* empty input: no ids, or just BOS */
    int32_t *ids;
    size_t n;
    CHECK(encode("", 0, 0, &ids, &n) == 0 && n == 0 && ids != NULL);
    free(ids);
    CHECK(encode(NULL, 0, 1, &ids, &n) == 0 && n == 1 && ids[0] == 0);
    free(ids);
    /* decode of an id outside the vocabulary */
    ds_buf out = {0};
    int32_t badv[2] = {270, 128815};
    CHECK(ds_tok_decode(tok, badv, 2, 0, &out) == DS_ERR_RANGE);
    CHECK_ERR_CONTAINS("128815");
    CHECK(out.len == 0);
    int32_t neg = -1;
    CHECK(ds_tok_decode_bytes(tok, &neg, 1, 0, &out) == DS_ERR_RANGE);
    ds_buf_free(&out);
}

static void test_added_tokens(void) {
    /* embedded added tokens map to their ids; text around them is BPE'd separately */
    const char *s = "<\xef\xbd\x9cUser\xef\xbd\x9c>hi<|EOT|>";
    int32_t *ids;
    size_t n;
    CHECK(encode(s, strlen(s), 0, &ids, &n) == 0);
    CHECK(n >= 3 && ids[0] == 128803 && ids[n - 1] == 128805);
    for (size_t i = 1; i + 1 < n; i++) CHECK(ids[i] < 128000);
    free(ids);
    /* look-alikes: ASCII '|' instead of U+FF5C, a missing '>', a space inside: no added ids */
    const char *fakes[] = {"<|User|>", "<\xef\xbd\x9cUser\xef\xbd\x9c", "<|EOT|", "< |EOT|>",
                           "<\xef\xbd\x9cuser\xef\xbd\x9c>"};
    for (size_t k = 0; k < sizeof fakes / sizeof *fakes; k++) {
        CHECK(encode(fakes[k], strlen(fakes[k]), 0, &ids, &n) == 0);
        for (size_t i = 0; i < n; i++) CHECK_MSG(ids[i] < 128000, "'%s' gave %d", fakes[k], ids[i]);
        free(ids);
    }
    /* adjacent and repeated tokens; a token split in the middle of a word */
    s = "ab<|EOT|><|EOT|>cd";
    CHECK(encode(s, strlen(s), 0, &ids, &n) == 0);
    int found = 0;
    for (size_t i = 0; i + 1 < n; i++) found += ids[i] == 128805 && ids[i + 1] == 128805;
    CHECK(found == 1);
    free(ids);
    /* decode keeps or skips special tokens; <|EOT|> is special, <｜User｜> is not */
    int32_t v[] = {128803, 270, 128805};
    ds_buf out = {0};
    CHECK(ds_tok_decode(tok, v, 3, 1, &out) == 0);
    CHECK(out.len && !strcmp(out.data, "<\xef\xbd\x9cUser\xef\xbd\x9c> the"));
    out.len = 0;
    CHECK(ds_tok_decode(tok, v, 3, 0, &out) == 0);
    CHECK(!strcmp(out.data, "<\xef\xbd\x9cUser\xef\xbd\x9c> the<|EOT|>"));
    ds_buf_free(&out);
}

static void test_invalid_utf8(void) {
    /* each maximal invalid subpart is one U+FFFD before tokenizing: the ids equal those of the
     * repaired text */
    static const struct {
        const char *bad, *good;
    } cases[] = {
        {"a\x80"
         "b",
         "a\xef\xbf\xbd"
         "b"},
        {"\xe4\xb8", "\xef\xbf\xbd"}, /* truncated: one */
        {"\xe0\x80"
         "x",
         "\xef\xbf\xbd\xef\xbf\xbd"
         "x"},                                                    /* E0 80: two */
        {"\xed\xa0\x80", "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd"}, /* surrogate: three */
        {"\xf0\x9f\x8c"
         " z",
         "\xef\xbf\xbd z"}, /* cut emoji: one */
        {"\xff\xfe", "\xef\xbf\xbd\xef\xbf\xbd"},
        {"\xc0\xaf", "\xef\xbf\xbd\xef\xbf\xbd"}, /* overlong */
        {"\xf4\x90\x80\x80", "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd"},
    };
    for (size_t k = 0; k < sizeof cases / sizeof *cases; k++) {
        int32_t *a, *b;
        size_t na, nb;
        CHECK(encode(cases[k].bad, strlen(cases[k].bad), 0, &a, &na) == 0);
        CHECK(encode(cases[k].good, strlen(cases[k].good), 0, &b, &nb) == 0);
        CHECK_MSG(na == nb && !memcmp(a, b, na * sizeof *a), "case %zu", k);
        free(a);
        free(b);
        /* and the lossy decoder itself */
        ds_buf out = {0};
        unsigned char pend[8];
        int np = 0;
        CHECK(ds_utf8__lossy(pend, &np, (const unsigned char *)cases[k].bad, strlen(cases[k].bad),
                             1, &out) == 0);
        CHECK_MSG(out.len == strlen(cases[k].good) && !memcmp(out.data, cases[k].good, out.len),
                  "lossy case %zu", k);
        ds_buf_free(&out);
    }
    /* a NUL byte is ordinary text */
    int32_t *ids;
    size_t n;
    CHECK(encode("a\0b", 3, 0, &ids, &n) == 0 && n >= 1);
    ds_buf out = {0};
    CHECK(ds_tok_decode(tok, ids, n, 0, &out) == 0 && out.len == 3 && !memcmp(out.data, "a\0b", 3));
    ds_buf_free(&out);
    free(ids);
}

/* Streaming: pushes + finish == decode of the whole, for random ids including lone byte
 * tokens 0x80..0xFF (the ids of the ByteLevel characters) and special tokens. */
static void test_streaming(void) {
    int32_t byte_ids[256];
    for (int b = 0; b < 256; b++) {
        /* the id of byte b: encode of the byte (valid ASCII) or via decode-bytes search */
        byte_ids[b] = -1;
    }
    for (int32_t id = 0; id < 128000; id++) {
        const char *p;
        size_t n;
        int sp;
        if (ds_tok__id_bytes(tok, id, &p, &n, &sp) == 0 && n == 1 &&
            byte_ids[(unsigned char)p[0]] < 0)
            byte_ids[(unsigned char)p[0]] = id;
    }
    for (int b = 0; b < 256; b++) CHECK_MSG(byte_ids[b] >= 0, "no token for byte %d", b);
    for (int iter = 0; iter < 3000; iter++) {
        int32_t ids[40];
        size_t n = rnd() % 40;
        for (size_t i = 0; i < n; i++) {
            uint32_t r = rnd() % 10;
            if (r < 4)
                ids[i] = byte_ids[128 + rnd() % 128];
            else if (r < 5)
                ids[i] = byte_ids[rnd() % 128];
            else if (r < 6)
                ids[i] = (int32_t)(128000 + rnd() % 815);
            else
                ids[i] = (int32_t)(rnd() % 128000);
        }
        for (int skip = 0; skip < 2; skip++) {
            ds_buf whole = {0}, streamed = {0}, raw = {0};
            CHECK(ds_tok_decode(tok, ids, n, skip, &whole) == 0);
            CHECK(ds_tok_decode_bytes(tok, ids, n, skip, &raw) == 0);
            ds_detok d;
            ds_detok_init(&d, tok, skip);
            for (size_t i = 0; i < n; i++) {
                size_t before = streamed.len;
                CHECK(ds_detok_push(&d, ids[i], &streamed) == 0);
                /* every step appends complete UTF-8 */
                if (streamed.len > before)
                    CHECK(ds_utf8__valid_prefix((const unsigned char *)streamed.data + before,
                                                streamed.len - before) == streamed.len - before);
            }
            CHECK(ds_detok_finish(&d, &streamed) == 0);
            CHECK_MSG(whole.len == streamed.len &&
                          (!whole.len || !memcmp(whole.data, streamed.data, whole.len)),
                      "iter %d: stream %zu bytes vs whole %zu", iter, streamed.len, whole.len);
            /* decode == lossy(decode_bytes) */
            ds_buf lossy = {0};
            unsigned char pend[8];
            int np = 0;
            CHECK(ds_utf8__lossy(pend, &np, (const unsigned char *)raw.data, raw.len, 1, &lossy) ==
                  0);
            CHECK(lossy.len == whole.len &&
                  (!lossy.len || !memcmp(lossy.data, whole.data, lossy.len)));
            ds_buf_free(&whole);
            ds_buf_free(&streamed);
            ds_buf_free(&raw);
            ds_buf_free(&lossy);
        }
    }
    /* a character spelled across three tokens is held back, then emitted whole */
    ds_detok d;
    ds_detok_init(&d, tok, 0);
    ds_buf out = {0};
    CHECK(ds_detok_push(&d, byte_ids[0xE4], &out) == 0 && out.len == 0);
    CHECK(ds_detok_push(&d, byte_ids[0xB8], &out) == 0 && out.len == 0);
    CHECK(ds_detok_push(&d, byte_ids[0xAD], &out) == 0 && out.len == 3);
    CHECK(!memcmp(out.data, "\xe4\xb8\xad", 3));
    /* a dangling prefix becomes one U+FFFD at finish */
    CHECK(ds_detok_push(&d, byte_ids[0xF0], &out) == 0 && out.len == 3);
    CHECK(ds_detok_finish(&d, &out) == 0 && out.len == 6 &&
          !memcmp(out.data + 3, "\xef\xbf\xbd", 3));
    ds_buf_free(&out);
}

/* Random texts: encode -> decode is the identity on valid UTF-8, and the linear and heap
 * merge paths agree. */
static void test_roundtrip_and_merge_paths(void) {
    static const char *frag[] = {"hello",
                                 " world",
                                 "  ",
                                 "\n",
                                 "123456",
                                 "\xe4\xb8\xad\xe6\x96\x87",
                                 "\xf0\x9f\x8c\x8d",
                                 "caf\xc3\xa9",
                                 " -- ",
                                 "<|EOT|>",
                                 "aaaaaaa",
                                 "\t",
                                 "\xe3\x80\x80",
                                 "x.y",
                                 "'s",
                                 "\xc2\x85"};
    for (int iter = 0; iter < 400; iter++) {
        char s[2048];
        size_t len = 0;
        int k = 1 + (int)(rnd() % 40);
        for (int j = 0; j < k; j++) {
            const char *f = frag[rnd() % (sizeof frag / sizeof *frag)];
            size_t fl = strlen(f);
            if (len + fl < sizeof s) {
                memcpy(s + len, f, fl);
                len += fl;
            }
        }
        int32_t *a, *b;
        size_t na, nb;
        int keep = ds_tok__bpe_linear_max;
        ds_tok__bpe_linear_max = 1 << 30;
        CHECK(encode(s, len, 0, &a, &na) == 0);
        ds_tok__bpe_linear_max = 0;
        CHECK(encode(s, len, 0, &b, &nb) == 0);
        ds_tok__bpe_linear_max = keep;
        CHECK_MSG(na == nb && !memcmp(a, b, na * sizeof *a), "merge paths differ, iter %d", iter);
        ds_buf out = {0};
        CHECK(ds_tok_decode(tok, a, na, 0, &out) == 0);
        CHECK_MSG(out.len == len && !memcmp(out.data, s, len), "round trip iter %d", iter);
        ds_buf_free(&out);
        free(a);
        free(b);
    }
}

static void test_large_input(void) {
    /* 100 KB of mixed text, plus a 100 KB single word (one piece: the heap path) */
    size_t n = 100 * 1024;
    char *s = malloc(n);
    static const char *frag[] = {"The quick brown fox ",
                                 "\xe6\xb7\xb1\xe5\xba\xa6\xe6\xb1\x82\xe7\xb4\xa2", "3.14159 ",
                                 "if (x) { return y; }\n", "<|EOT|>"};
    size_t len = 0;
    while (len < n) {
        const char *f = frag[rnd() % 5];
        size_t fl = strlen(f);
        if (len + fl > n) break;
        memcpy(s + len, f, fl);
        len += fl;
    }
    int32_t *ids;
    size_t m;
    double t0 = ds_now();
    CHECK(encode(s, len, 0, &ids, &m) == 0);
    double dt = ds_now() - t0;
    CHECK(m > len / 10 && m < len);
    ds_buf out = {0};
    CHECK(ds_tok_decode(tok, ids, m, 0, &out) == 0 && out.len == len && !memcmp(out.data, s, len));
    ds_buf_free(&out);
    free(ids);
    fprintf(stderr, "  100 KB mixed: %zu ids in %.1f ms\n", m, dt * 1e3);
    memset(s, 'a', n);
    CHECK(encode(s, n, 0, &ids, &m) == 0 && m > 0 && m < n / 2);
    CHECK(ds_tok_decode(tok, ids, m, 0, &out) == 0 && out.len == n);
    ds_buf_free(&out);
    free(ids);
    memset(s, ' ', n);
    s[n - 1] = 'x';
    CHECK(encode(s, n, 0, &ids, &m) == 0 && m > 0);
    free(ids);
    free(s);
}

/* ---- refusals: small modified copies of the real tokenizer.json ---- */

static json_t *base_json;

static void expect_refusal(const char *what, void (*edit)(json_t *), const char *needle) {
    json_t *j = json_deep_copy(base_json);
    edit(j);
    char *dir = ds_test_tmpdir();
    char path[4200];
    snprintf(path, sizeof path, "%s/tokenizer.json", dir);
    CHECK(json_dump_file(j, path, JSON_COMPACT) == 0);
    ds_tokenizer *t = NULL;
    int rc = ds_tok_open(dir, &t);
    CHECK_MSG(rc != 0, "%s was accepted", what);
    CHECK_ERR_CONTAINS(needle);
    ds_tok_close(t);
    ds_test_rmtree(dir);
    free(dir);
    json_decref(j);
}

static void ed_nfkc(json_t *j) {
    json_object_set_new(j, "normalizer", json_pack("{s:s}", "type", "NFKC"));
}
static void ed_wordpiece(json_t *j) {
    json_object_set_new(json_object_get(j, "model"), "type", json_string("WordPiece"));
}
static json_t *pretok(json_t *j, int i) {
    return json_array_get(json_object_get(json_object_get(j, "pre_tokenizer"), "pretokenizers"),
                          (size_t)i);
}
static void ed_removed(json_t *j) {
    json_object_set_new(pretok(j, 0), "behavior", json_string("Removed"));
}
static void ed_byte_fallback(json_t *j) {
    json_object_set_new(json_object_get(j, "model"), "byte_fallback", json_true());
}
static void ed_dropout(json_t *j) {
    json_object_set_new(json_object_get(j, "model"), "dropout", json_real(0.1));
}
static void ed_lstrip(json_t *j) {
    json_object_set_new(json_array_get(json_object_get(j, "added_tokens"), 5), "lstrip",
                        json_true());
}
static void ed_prefix(json_t *j) {
    json_object_set_new(pretok(j, 3), "add_prefix_space", json_true());
}
static void ed_use_regex(json_t *j) {
    json_object_set_new(pretok(j, 3), "use_regex", json_true());
}
static void ed_metaspace(json_t *j) {
    json_object_set_new(pretok(j, 1), "type", json_string("Metaspace"));
}
static void ed_decoder(json_t *j) {
    json_object_set_new(j, "decoder", json_pack("{s:s}", "type", "WordPiece"));
}
static void ed_template(json_t *j) {
    json_object_set_new(j, "post_processor", json_pack("{s:s}", "type", "TemplateProcessing"));
}
static void ed_word_escape(json_t *j) {
    json_object_set_new(pretok(j, 0), "pattern", json_pack("{s:s}", "Regex", "\\w+"));
}
static void ed_property(json_t *j) {
    json_object_set_new(pretok(j, 0), "pattern", json_pack("{s:s}", "Regex", "\\p{Han}+"));
}
static void ed_empty_match(json_t *j) {
    json_object_set_new(pretok(j, 0), "pattern", json_pack("{s:s}", "Regex", "a*"));
}
static void ed_bad_merge(json_t *j) {
    json_array_set_new(json_object_get(json_object_get(j, "model"), "merges"), 3,
                       json_string("nosuchtoken zzz"));
}
static void ed_truncation(json_t *j) {
    json_object_set_new(j, "truncation", json_pack("{s:i}", "max_length", 10));
}

static void test_refusals(void) {
    char path[4200];
    snprintf(path, sizeof path, "%s/tokenizer.json", tok_dir);
    json_error_t je;
    base_json = json_load_file(path, 0, &je);
    CHECK(base_json != NULL);
    if (!base_json) return;
    expect_refusal("NFKC", ed_nfkc, "normalizer: type 'NFKC' is unsupported");
    expect_refusal("WordPiece", ed_wordpiece, "model: type 'WordPiece' is unsupported");
    expect_refusal("Removed", ed_removed, "behavior 'Removed' is unsupported");
    expect_refusal("byte_fallback", ed_byte_fallback, "byte_fallback=true is unsupported");
    expect_refusal("dropout", ed_dropout, "dropout is unsupported");
    expect_refusal("lstrip", ed_lstrip, "added_tokens[5]: lstrip=true is unsupported");
    expect_refusal("add_prefix_space", ed_prefix, "add_prefix_space=true is unsupported");
    expect_refusal("use_regex", ed_use_regex, "use_regex=true");
    expect_refusal("Metaspace", ed_metaspace, "pre-tokenizer type 'Metaspace' is unsupported");
    expect_refusal("decoder", ed_decoder, "decoder: type 'WordPiece' is unsupported");
    expect_refusal("TemplateProcessing", ed_template, "post_processor: type 'TemplateProcessing'");
    expect_refusal("\\w", ed_word_escape, "unsupported regex escape \\w");
    expect_refusal("\\p{Han}", ed_property, "unsupported Unicode property \\p{Han}");
    expect_refusal("empty match", ed_empty_match, "can match the empty string");
    expect_refusal("bad merge", ed_bad_merge, "merges[3]");
    expect_refusal("truncation", ed_truncation, "truncation: only null");
    ds_tokenizer *t = NULL;
    CHECK(ds_tok_open("/nonexistent/dir", &t) == DS_ERR_IO && t == NULL);
    CHECK_ERR_CONTAINS("/nonexistent/dir");
    json_decref(base_json);
}

/* Newer tokenizer.json files write merges as pairs, and may set ignore_merges. */
static void test_merge_formats(void) {
    char path[4200];
    snprintf(path, sizeof path, "%s/tokenizer.json", tok_dir);
    json_error_t je;
    json_t *j = json_load_file(path, 0, &je);
    if (!j) return;
    json_t *merges = json_object_get(json_object_get(j, "model"), "merges");
    size_t i;
    json_t *m;
    json_array_foreach(merges, i, m) {
        const char *s = json_string_value(m);
        const char *sp = strchr(s, ' ');
        json_t *pair = json_pack("[s#s]", s, (int)(sp - s), sp + 1);
        json_array_set_new(merges, i, pair);
    }
    char *dir = ds_test_tmpdir();
    snprintf(path, sizeof path, "%s/tokenizer.json", dir);
    CHECK(json_dump_file(j, path, JSON_COMPACT) == 0);
    ds_tokenizer *t2 = NULL;
    CHECK_MSG(ds_tok_open(dir, &t2) == 0, "%s", ds_err_msg());
    const char *s = "The quick brown fox, 12345 \xe6\xb7\xb1\xe5\xba\xa6 <|EOT|>";
    int32_t *a = NULL, *b = NULL;
    size_t na = 0, nb = 0;
    CHECK(t2 && ds_tok_encode(t2, s, strlen(s), 0, &a, &na) == 0);
    CHECK(encode(s, strlen(s), 0, &b, &nb) == 0);
    CHECK(na == nb && !memcmp(a, b, na * sizeof *a));
    /* no tokenizer_config.json next to it: no BOS known, add_bos off */
    CHECK(t2 && ds_tok_add_bos(t2) == 0 && ds_tok_bos_id(t2) == -1);
    free(a);
    free(b);
    ds_tok_close(t2);
    /* ignore_merges: a piece that is a whole vocab token is emitted as is. "Ġthe" is id 270
     * either way; the merged result and the direct lookup must agree for vocab words. */
    json_object_set_new(json_object_get(j, "model"), "ignore_merges", json_true());
    CHECK(json_dump_file(j, path, JSON_COMPACT) == 0);
    CHECK_MSG(ds_tok_open(dir, &t2) == 0, "%s", ds_err_msg());
    CHECK(t2 && ds_tok_encode(t2, " the", 4, 0, &a, &na) == 0 && na == 1 && a[0] == 270);
    free(a);
    ds_tok_close(t2);
    ds_test_rmtree(dir);
    free(dir);
    json_decref(j);
}

int main(void) {
    const char *fx = ds_test_fixtures();
    if (!fx) return ds_test_skip_or_fail("fixtures not found");
    snprintf(tok_dir, sizeof tok_dir, "%s/tiny-a", fx);
    double t0 = ds_now();
    if (ds_tok_open(tok_dir, &tok) != 0) {
        fprintf(stderr, "ds_tok_open(%s): %s\n", tok_dir, ds_err_msg());
        return 1;
    }
    double dt = ds_now() - t0;
    fprintf(stderr, "  load: %.0f ms\n", dt * 1e3);
    CHECK(dt < 5.0); /* generous: sanitizer builds are slow; release loads in ~0.3 s */
    test_basics();
    test_prompts();
    test_added_tokens();
    test_invalid_utf8();
    test_streaming();
    test_roundtrip_and_merge_paths();
    test_large_input();
    test_refusals();
    test_merge_formats();
    ds_tok_close(tok);
    return ds_test_finish("test_tokenizer");
}
