/* bpe: loading a Hugging Face tokenizer.json (byte-level BPE) and encoding text with it.
 *
 * What is assumed, and why it is enough to be bit-for-bit Hugging Face:
 * - The pipeline is HF's: (1) added tokens are cut out of the raw text, leftmost-longest at each
 *   position (HF's aho-corasick with MatchKind::LeftmostLongest; the JS library's trie does the
 *   same), first the tokens with normalized=false on the raw text, then the normalized ones on
 *   what is left (the normalizer must be a no-op, so "normalizing" changes nothing but the
 *   order of the two passes is kept). (2) Every other stretch goes through the pre_tokenizer:
 *   each Split (behavior Isolated) cuts every current piece into regex matches and the gaps
 *   between them, then ByteLevel maps bytes to the GPT-2 alphabet. (3) BPE merges each piece.
 * - ByteLevel only renames bytes, so we never build the renamed strings: each byte starts as
 *   the vocab id of its renamed character (byte_id[]) and merges are looked up by id pair.
 * - BPE: repeatedly merge the adjacent pair of lowest merge rank, the leftmost among equal
 *   ranks. That is what HF's heap (ordered by rank, then position) and the JS library's queue
 *   (rank + position/len) both compute. Short pieces (nearly all) use a linear scan with the
 *   pair ranks cached; long ones a binary heap with lazy invalidation, O(n log n).
 * - Regexes: PCRE2 with UTF|UCP and JIT. The patterns are written for Oniguruma; they are
 *   rewritten (rewrite_regex) so PCRE2 means the same thing: \s is spelled \p{White_Space}
 *   (PCRE2's UCP \s also takes U+180E), and \p{L|M|N|P|S} get the code points Unicode 15.0
 *   added since PCRE2's Unicode 14 (unicode_delta.c), because Hugging Face tokenizers' Oniguruma
 *   6.9.8 uses Unicode 15.0. Escapes whose meaning differs between the engines are refused. Each
 * piece is matched as its own subject, so a lookahead never sees past it.
 * - Thread-safety: nothing is written after ds_tok_open; encode allocates its own scratch.
 * - Invalid UTF-8 input is repaired first (utf8.c), as a JS string built by TextDecoder is. */
#include "tokenizer/tok_internal.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <errno.h>
#include <jansson.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define MAX_SPLITS 8

int ds_tok__bpe_linear_max = 64;

/* A byte string inside the tokenizer's arena. */
typedef struct {
    uint32_t off, len;
} span;

/* A byte trie of added-token contents. Children form sibling lists; the root has a table. */
typedef struct {
    int32_t child, sibling, id; /* id: the token ending here, or -1 */
    unsigned char byte;
} trie_node;
typedef struct {
    trie_node *nodes;
    int32_t n, cap;
    int32_t root[256]; /* child of the root for each first byte, -1 when none */
} trie;

/* One merge: (left id, right id) -> rank and the merged token's id. */
typedef struct {
    uint64_t key; /* UINT64_MAX when the slot is empty */
    uint32_t rank;
    int32_t id;
} merge_slot;

struct ds_tokenizer {
    int32_t n_ids; /* largest id + 1 */
    char *arena;   /* every token spelling and decoded byte string */
    size_t arena_len, arena_cap;
    span *spell;    /* (n_ids) the id's token string: the added content, else the vocab key */
    span *dec;      /* (n_ids) its decoded bytes */
    uint8_t *flags; /* (n_ids) TF_* */
    /* spelling -> id, open addressing over id + 1 (0 = empty); added and vocab kept apart so an
     * added token wins, as in HF's token_to_id */
    int32_t *vocab_hash, *added_hash;
    span *vocab_spell; /* (n_ids) the vocab key of the id (len 0 when not in the vocab) */
    uint32_t hash_mask;
    int32_t byte_id[256]; /* vocab id of each byte's ByteLevel character */
    merge_slot *merges;
    uint32_t merge_mask;
    int ignore_merges;
    int32_t *raw_hash; /* decoded bytes -> vocab id; only with ignore_merges */
    trie tries[2];     /* [0]: normalized=false tokens (matched first), [1]: normalized=true */
    int n_splits;
    pcre2_code *re[MAX_SPLITS];
    int add_bos;
    int32_t bos_id, eos_id;
    char *bos_token, *eos_token, *chat_template;
};

enum { TF_VALID = 1, TF_ADDED = 2, TF_SPECIAL = 4 };

/* ---- small helpers ---------------------------------------------------------------------- */

static uint64_t hash_bytes(const void *p, size_t n) {
    const unsigned char *s = p;
    uint64_t h = 0xcbf29ce484222325ull; /* FNV-1a */
    for (size_t i = 0; i < n; i++) h = (h ^ s[i]) * 0x100000001b3ull;
    return h ^ (h >> 29);
}

static uint64_t mix64(uint64_t x) { /* splitmix64 finaliser */
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ull;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

static int arena_add(ds_tokenizer *t, const void *p, size_t n, span *out) {
    if (n > UINT32_MAX || t->arena_len + n > UINT32_MAX)
        return ds_err_set(DS_ERR_RANGE, "tokenizer strings exceed 4 GiB");
    if (t->arena_len + n > t->arena_cap) {
        size_t cap = t->arena_cap ? t->arena_cap : 1 << 20;
        while (cap < t->arena_len + n) cap *= 2;
        char *a = realloc(t->arena, cap);
        if (!a) return ds_err_set(DS_ERR_NOMEM, "out of memory loading the tokenizer");
        t->arena = a;
        t->arena_cap = cap;
    }
    if (n) memcpy(t->arena + t->arena_len, p, n);
    out->off = (uint32_t)t->arena_len;
    out->len = (uint32_t)n;
    t->arena_len += n;
    return DS_OK;
}

/* Looks s[0, n) up in a spelling hash whose keys are keys[id]. */
static int32_t hash_find(const ds_tokenizer *t, const int32_t *h, const span *keys, const void *s,
                         size_t n) {
    if (!h) return -1;
    for (uint32_t i = (uint32_t)hash_bytes(s, n) & t->hash_mask;; i = (i + 1) & t->hash_mask) {
        int32_t v = h[i];
        if (!v) return -1;
        const span *k = &keys[v - 1];
        if (k->len == n && !memcmp(t->arena + k->off, s, n)) return v - 1;
    }
}

/* Inserts id under keys[id] (replacing an equal key). */
static void hash_put(const ds_tokenizer *t, int32_t *h, const span *keys, int32_t id) {
    const span *k = &keys[id];
    for (uint32_t i = (uint32_t)hash_bytes(t->arena + k->off, k->len) & t->hash_mask;;
         i = (i + 1) & t->hash_mask) {
        int32_t v = h[i];
        if (v) {
            const span *o = &keys[v - 1];
            if (o->len != k->len || memcmp(t->arena + o->off, t->arena + k->off, k->len)) continue;
        }
        h[i] = id + 1;
        return;
    }
}

static const merge_slot *merge_find(const ds_tokenizer *t, int32_t a, int32_t b) {
    uint64_t key = (uint64_t)(uint32_t)a << 32 | (uint32_t)b;
    for (uint32_t i = (uint32_t)mix64(key) & t->merge_mask;; i = (i + 1) & t->merge_mask) {
        const merge_slot *s = &t->merges[i];
        if (s->key == key) return s;
        if (s->key == UINT64_MAX) return NULL;
    }
}

/* GPT-2's bytes_to_unicode: printable Latin-1 bytes stand for themselves, the other 68 bytes
 * take U+0100.. in byte order. */
static uint32_t byte_to_cp(int b) {
    if ((b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF))
        return (uint32_t)b;
    int n = 0;
    for (int c = 0; c < b; c++)
        if (!((c >= 0x21 && c <= 0x7E) || (c >= 0xA1 && c <= 0xAC) || (c >= 0xAE && c <= 0xFF)))
            n++;
    return 256u + (uint32_t)n;
}

static int put_utf8(uint32_t c, unsigned char *o) {
    if (c < 0x80) {
        o[0] = (unsigned char)c;
        return 1;
    }
    if (c < 0x800) {
        o[0] = (unsigned char)(0xC0 | c >> 6);
        o[1] = (unsigned char)(0x80 | (c & 63));
        return 2;
    }
    if (c < 0x10000) {
        o[0] = (unsigned char)(0xE0 | c >> 12);
        o[1] = (unsigned char)(0x80 | ((c >> 6) & 63));
        o[2] = (unsigned char)(0x80 | (c & 63));
        return 3;
    }
    o[0] = (unsigned char)(0xF0 | c >> 18);
    o[1] = (unsigned char)(0x80 | ((c >> 12) & 63));
    o[2] = (unsigned char)(0x80 | ((c >> 6) & 63));
    o[3] = (unsigned char)(0x80 | (c & 63));
    return 4;
}

/* Decodes one code point of valid UTF-8 at s (n > 0 bytes); returns its length, 0 if invalid. */
static int get_utf8(const unsigned char *s, size_t n, uint32_t *cp) {
    size_t v = ds_utf8__valid_prefix(s, n < 4 ? n : 4);
    if (!v) return 0;
    int L = s[0] < 0x80 ? 1 : s[0] < 0xE0 ? 2 : s[0] < 0xF0 ? 3 : 4;
    uint32_t c = L == 1 ? s[0] : L == 2 ? s[0] & 0x1Fu : L == 3 ? s[0] & 0x0Fu : s[0] & 0x07u;
    for (int k = 1; k < L; k++) c = c << 6 | (s[k] & 63u);
    *cp = c;
    return L;
}

/* ---- added-token tries ------------------------------------------------------------------ */

static int trie_add(trie *tr, const unsigned char *s, size_t n, int32_t id) {
    int32_t node = -1; /* -1: the root */
    for (size_t i = 0; i < n; i++) {
        int32_t c = node < 0 ? tr->root[s[i]] : tr->nodes[node].child;
        while (c >= 0 && tr->nodes[c].byte != s[i]) c = tr->nodes[c].sibling;
        if (c < 0) {
            if (tr->n == tr->cap) {
                int32_t cap = tr->cap ? tr->cap * 2 : 256;
                trie_node *nn = realloc(tr->nodes, (size_t)cap * sizeof *nn);
                if (!nn) return ds_err_set(DS_ERR_NOMEM, "out of memory building added tokens");
                tr->nodes = nn;
                tr->cap = cap;
            }
            c = tr->n++;
            /* push front: indices, not pointers, since realloc may move the nodes */
            int32_t *head = node < 0 ? &tr->root[s[i]] : &tr->nodes[node].child;
            tr->nodes[c] = (trie_node){-1, *head, -1, s[i]};
            *head = c;
        }
        node = c;
    }
    /* a duplicate content keeps the last id, as HF's map insert does */
    tr->nodes[node].id = id;
    return DS_OK;
}

/* Longest token starting at s[0, n): its length, id in *id; 0 when none. */
static size_t trie_match(const trie *tr, const unsigned char *s, size_t n, int32_t *id) {
    int32_t node = tr->root[s[0]];
    size_t best = 0;
    for (size_t i = 0; node >= 0;) {
        if (tr->nodes[node].id >= 0) {
            best = i + 1;
            *id = tr->nodes[node].id;
        }
        if (++i >= n) break;
        node = tr->nodes[node].child;
        while (node >= 0 && tr->nodes[node].byte != s[i]) node = tr->nodes[node].sibling;
    }
    return best;
}

/* ---- regex rewriting -------------------------------------------------------------------- */

static int sb_add(ds_buf *b, const char *s) {
    return ds_buf_append(b, s, strlen(s));
}

static int add_delta(ds_buf *b, char cat) {
    size_t n;
    const uint32_t(*d)[2] = ds_tok__unicode_delta(cat, &n);
    char tmp[48];
    for (size_t i = 0; i < n; i++) {
        snprintf(tmp, sizeof tmp, "\\x{%X}-\\x{%X}", (unsigned)d[i][0], (unsigned)d[i][1]);
        if (sb_add(b, tmp)) return DS_ERR_NOMEM;
    }
    return DS_OK;
}

/* Rewrites an Oniguruma pattern (as tokenizer.json writes it) into a PCRE2 one with the same
 * meaning for the constructs we allow. `where` names the field for messages. */
static int rewrite_regex(const char *pat, size_t n, const char *where, ds_buf *out) {
    int in_class = 0;
    size_t class_start = 0;
    for (size_t i = 0; i < n; i++) {
        char c = pat[i];
        if (c == '\\') {
            if (i + 1 >= n) return ds_err_set(DS_ERR_FORMAT, "%s: pattern ends with '\\'", where);
            char e = pat[++i];
            if (e == 's' || e == 'S') {
                if (sb_add(out, e == 's' ? "\\p{White_Space}" : "\\P{White_Space}"))
                    return DS_ERR_NOMEM;
                continue;
            }
            if (e == 'p' || e == 'P') {
                char cat;
                size_t end;
                if (i + 1 < n && pat[i + 1] == '{') {
                    const char *close = memchr(pat + i + 2, '}', n - i - 2);
                    if (!close) return ds_err_set(DS_ERR_FORMAT, "%s: unterminated \\p{", where);
                    end = (size_t)(close - pat);
                    if (end != i + 3)
                        return ds_err_set(DS_ERR_UNSUPPORTED,
                                          "%s: unsupported Unicode property \\%c{%.*s} (only "
                                          "\\p{L}, \\p{M}, \\p{N}, \\p{P}, \\p{S} are supported)",
                                          where, e, (int)(end - i - 2), pat + i + 2);
                    cat = pat[i + 2];
                } else if (i + 1 < n) {
                    cat = pat[i + 1];
                    end = i + 1;
                } else {
                    return ds_err_set(DS_ERR_FORMAT, "%s: pattern ends with '\\%c'", where, e);
                }
                if (!strchr("LMNPS", cat) || !cat)
                    return ds_err_set(DS_ERR_UNSUPPORTED,
                                      "%s: unsupported Unicode property \\%c%c (only \\p{L}, "
                                      "\\p{M}, \\p{N}, \\p{P}, \\p{S} are supported)",
                                      where, e, cat);
                if (e == 'P' && in_class)
                    return ds_err_set(DS_ERR_UNSUPPORTED,
                                      "%s: unsupported \\P{%c} inside a character class", where,
                                      cat);
                char tmp[16];
                snprintf(tmp, sizeof tmp, "\\p{%c}", cat);
                if ((!in_class && sb_add(out, e == 'P' ? "[^" : "[")) || sb_add(out, tmp) ||
                    add_delta(out, cat) || (!in_class && sb_add(out, "]")))
                    return DS_ERR_NOMEM;
                i = end;
                continue;
            }
            if (strchr("dDwWbBhHXRQEKGgkNC", e))
                return ds_err_set(DS_ERR_UNSUPPORTED,
                                  "%s: unsupported regex escape \\%c (its Oniguruma and PCRE2 "
                                  "meanings differ)",
                                  where, e);
            char two[2] = {'\\', e};
            if (ds_buf_append(out, two, 2)) return DS_ERR_NOMEM;
            continue;
        }
        if (!in_class && c == '[') {
            in_class = 1;
            class_start = i;
        } else if (in_class && c == '[') {
            return ds_err_set(DS_ERR_UNSUPPORTED,
                              "%s: unsupported nested '[' in a character class (offset %zu)", where,
                              i);
        } else if (in_class && c == ']') {
            /* a ']' right after '[' or '[^' is a literal */
            size_t first = class_start + 1 + (class_start + 1 < n && pat[class_start + 1] == '^');
            if (i != first) in_class = 0;
        }
        if (ds_buf_append(out, &c, 1)) return DS_ERR_NOMEM;
    }
    if (in_class) return ds_err_set(DS_ERR_FORMAT, "%s: unterminated character class", where);
    return DS_OK;
}

static int compile_split(ds_tokenizer *t, const char *src, size_t n, int literal,
                         const char *where) {
    if (t->n_splits == MAX_SPLITS)
        return ds_err_set(DS_ERR_UNSUPPORTED, "%s: more than %d Split pre-tokenizers", where,
                          MAX_SPLITS);
    ds_buf pat = {0};
    int rc = literal ? ds_buf_append(&pat, src, n) : rewrite_regex(src, n, where, &pat);
    if (rc) {
        ds_buf_free(&pat);
        return rc;
    }
    int err;
    PCRE2_SIZE eoff;
    uint32_t opts = PCRE2_UTF | PCRE2_UCP | (literal ? PCRE2_LITERAL : 0);
    pcre2_code *re = pcre2_compile((PCRE2_SPTR)pat.data, pat.len, opts, &err, &eoff, NULL);
    ds_buf_free(&pat);
    if (!re) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(err, msg, sizeof msg);
        return ds_err_set(DS_ERR_FORMAT, "%s: regex does not compile: %s", where, (char *)msg);
    }
    uint32_t minlen = 0;
    pcre2_pattern_info(re, PCRE2_INFO_MINLENGTH, &minlen);
    if (minlen == 0) {
        pcre2_code_free(re);
        return ds_err_set(DS_ERR_UNSUPPORTED,
                          "%s: a Split pattern that can match the empty string is unsupported",
                          where);
    }
    pcre2_jit_compile(re, PCRE2_JIT_COMPLETE); /* falls back to the interpreter if no JIT */
    t->re[t->n_splits++] = re;
    return DS_OK;
}

/* ---- loading ---------------------------------------------------------------------------- */

static const char *type_of(const json_t *o) {
    const char *s = json_string_value(json_object_get(o, "type"));
    return s ? s : "(no type)";
}

/* Refuses a boolean field that is present and true. */
static int refuse_true(const json_t *o, const char *key, const char *where) {
    const json_t *v = json_object_get(o, key);
    if (v && json_is_true(v))
        return ds_err_set(DS_ERR_UNSUPPORTED, "tokenizer.json %s: %s=true is unsupported", where,
                          key);
    return DS_OK;
}

static int load_normalizer(const json_t *root) {
    const json_t *n = json_object_get(root, "normalizer");
    if (!n || json_is_null(n)) return DS_OK;
    const char *ty = type_of(n);
    if (!strcmp(ty, "Sequence")) {
        const json_t *list = json_object_get(n, "normalizers");
        if (json_is_array(list) && json_array_size(list) == 0) return DS_OK;
        if (json_is_array(list))
            return ds_err_set(DS_ERR_UNSUPPORTED,
                              "tokenizer.json normalizer: Sequence containing normalizer '%s' is "
                              "unsupported (only an empty Sequence is)",
                              type_of(json_array_get(list, 0)));
    }
    return ds_err_set(DS_ERR_UNSUPPORTED,
                      "tokenizer.json normalizer: type '%s' is unsupported (only none or an "
                      "empty Sequence)",
                      ty);
}

static int load_one_pretok(ds_tokenizer *t, const json_t *p, int idx, int last, int *have_bl) {
    char where[96];
    snprintf(where, sizeof where, "tokenizer.json pre_tokenizer[%d] (%s)", idx, type_of(p));
    const char *ty = type_of(p);
    if (!strcmp(ty, "ByteLevel")) {
        int rc;
        if ((rc = refuse_true(p, "add_prefix_space", where))) return rc;
        const json_t *ur = json_object_get(p, "use_regex");
        if (!ur || json_is_true(ur))
            return ds_err_set(DS_ERR_UNSUPPORTED,
                              "%s: use_regex=true (or absent, which means true) is unsupported",
                              where);
        if (!last)
            return ds_err_set(DS_ERR_UNSUPPORTED, "%s: ByteLevel must be the last pre-tokenizer",
                              where);
        *have_bl = 1;
        return DS_OK;
    }
    if (!strcmp(ty, "Split")) {
        const char *beh = json_string_value(json_object_get(p, "behavior"));
        if (!beh || strcmp(beh, "Isolated"))
            return ds_err_set(DS_ERR_UNSUPPORTED,
                              "%s: behavior '%s' is unsupported (only Isolated)", where,
                              beh ? beh : "(none)");
        int rc;
        if ((rc = refuse_true(p, "invert", where))) return rc;
        const json_t *pat = json_object_get(p, "pattern");
        const json_t *re = json_object_get(pat, "Regex"), *lit = json_object_get(pat, "String");
        if (json_is_string(re))
            return compile_split(t, json_string_value(re), json_string_length(re), 0, where);
        if (json_is_string(lit) && json_string_length(lit) > 0)
            return compile_split(t, json_string_value(lit), json_string_length(lit), 1, where);
        return ds_err_set(DS_ERR_FORMAT,
                          "%s: pattern must be {\"Regex\": ...} or {\"String\": ...}", where);
    }
    return ds_err_set(DS_ERR_UNSUPPORTED,
                      "%s: pre-tokenizer type '%s' is unsupported (only Split and ByteLevel)",
                      where, ty);
}

static int load_pretok(ds_tokenizer *t, const json_t *root) {
    const json_t *p = json_object_get(root, "pre_tokenizer");
    int have_bl = 0, rc;
    if (!p || json_is_null(p))
        return ds_err_set(DS_ERR_UNSUPPORTED,
                          "tokenizer.json pre_tokenizer: none is unsupported (byte-level BPE "
                          "needs a ByteLevel pre-tokenizer)");
    if (!strcmp(type_of(p), "Sequence")) {
        const json_t *list = json_object_get(p, "pretokenizers");
        if (!json_is_array(list))
            return ds_err_set(DS_ERR_FORMAT, "tokenizer.json pre_tokenizer: Sequence without "
                                             "a pretokenizers array");
        size_t n = json_array_size(list);
        for (size_t i = 0; i < n; i++)
            if ((rc = load_one_pretok(t, json_array_get(list, i), (int)i, i + 1 == n, &have_bl)))
                return rc;
    } else if ((rc = load_one_pretok(t, p, 0, 1, &have_bl))) {
        return rc;
    }
    if (!have_bl)
        return ds_err_set(DS_ERR_UNSUPPORTED,
                          "tokenizer.json pre_tokenizer: no ByteLevel step (only byte-level BPE "
                          "is supported)");
    return DS_OK;
}

static int load_model_flags(const json_t *m) {
    const char *ty = type_of(m);
    if (strcmp(ty, "BPE"))
        return ds_err_set(DS_ERR_UNSUPPORTED,
                          "tokenizer.json model: type '%s' is unsupported (only BPE)", ty);
    const json_t *v;
    if ((v = json_object_get(m, "dropout")) && !json_is_null(v))
        return ds_err_set(DS_ERR_UNSUPPORTED, "tokenizer.json model: dropout is unsupported");
    if ((v = json_object_get(m, "unk_token")) && !json_is_null(v))
        return ds_err_set(DS_ERR_UNSUPPORTED,
                          "tokenizer.json model: unk_token is unsupported (byte-level BPE never "
                          "needs it)");
    static const char *strs[] = {"continuing_subword_prefix", "end_of_word_suffix"};
    for (int i = 0; i < 2; i++)
        if ((v = json_object_get(m, strs[i])) && !json_is_null(v) &&
            !(json_is_string(v) && json_string_length(v) == 0))
            return ds_err_set(DS_ERR_UNSUPPORTED, "tokenizer.json model: %s is unsupported",
                              strs[i]);
    int rc;
    if ((rc = refuse_true(m, "byte_fallback", "model"))) return rc;
    if ((rc = refuse_true(m, "fuse_unk", "model"))) return rc;
    return DS_OK;
}

static int load_misc(const json_t *root) {
    static const char *null_only[] = {"truncation", "padding"};
    for (int i = 0; i < 2; i++) {
        const json_t *v = json_object_get(root, null_only[i]);
        if (v && !json_is_null(v))
            return ds_err_set(DS_ERR_UNSUPPORTED, "tokenizer.json %s: only null is supported",
                              null_only[i]);
    }
    const json_t *pp = json_object_get(root, "post_processor");
    if (pp && !json_is_null(pp) && strcmp(type_of(pp), "ByteLevel"))
        return ds_err_set(DS_ERR_UNSUPPORTED,
                          "tokenizer.json post_processor: type '%s' is unsupported (only "
                          "ByteLevel or none)",
                          type_of(pp));
    const json_t *d = json_object_get(root, "decoder");
    if (!d || json_is_null(d) || strcmp(type_of(d), "ByteLevel"))
        return ds_err_set(DS_ERR_UNSUPPORTED,
                          "tokenizer.json decoder: type '%s' is unsupported (only ByteLevel)",
                          d && !json_is_null(d) ? type_of(d) : "none");
    return DS_OK;
}

static int ensure_ids(ds_tokenizer *t, int64_t id) {
    (void)t;
    if (id < 0 || id >= INT32_MAX / 2)
        return ds_err_set(DS_ERR_RANGE, "tokenizer.json: token id %lld out of range",
                          (long long)id);
    return DS_OK;
}

static int load_vocab_and_added(ds_tokenizer *t, const json_t *root) {
    const json_t *m = json_object_get(root, "model");
    const json_t *vocab = json_object_get(m, "vocab");
    const json_t *added = json_object_get(root, "added_tokens");
    if (!json_is_object(vocab))
        return ds_err_set(DS_ERR_FORMAT, "tokenizer.json model.vocab: not an object");
    if (added && !json_is_null(added) && !json_is_array(added))
        return ds_err_set(DS_ERR_FORMAT, "tokenizer.json added_tokens: not an array");
    /* pass 1: the id range */
    int64_t max_id = -1;
    const char *key;
    const json_t *val;
    json_object_foreach((json_t *)vocab, key, val) {
        if (!json_is_integer(val) || ensure_ids(t, json_integer_value(val)))
            return ds_err_set(DS_ERR_FORMAT, "tokenizer.json model.vocab['%s']: bad id", key);
        if (json_integer_value(val) > max_id) max_id = json_integer_value(val);
    }
    size_t n_added = added ? json_array_size(added) : 0;
    for (size_t i = 0; i < n_added; i++) {
        const json_t *a = json_array_get(added, i);
        const json_t *id = json_object_get(a, "id");
        if (!json_is_integer(id) || ensure_ids(t, json_integer_value(id)) ||
            !json_is_string(json_object_get(a, "content")) ||
            json_string_length(json_object_get(a, "content")) == 0)
            return ds_err_set(DS_ERR_FORMAT,
                              "tokenizer.json added_tokens[%zu]: needs an integer id >= 0 and a "
                              "non-empty content",
                              i);
        if (json_integer_value(id) > max_id) max_id = json_integer_value(id);
    }
    if (max_id < 0) return ds_err_set(DS_ERR_FORMAT, "tokenizer.json: empty vocabulary");
    t->n_ids = (int32_t)(max_id + 1);
    size_t nid = (size_t)t->n_ids;
    t->spell = calloc(nid, sizeof *t->spell);
    t->vocab_spell = calloc(nid, sizeof *t->vocab_spell);
    t->dec = calloc(nid, sizeof *t->dec);
    t->flags = calloc(nid, 1);
    uint32_t hsize = 1024;
    while (hsize < 2 * nid + 2) hsize *= 2;
    t->hash_mask = hsize - 1;
    t->vocab_hash = calloc(hsize, sizeof(int32_t));
    t->added_hash = calloc(hsize, sizeof(int32_t));
    if (!t->spell || !t->vocab_spell || !t->dec || !t->flags || !t->vocab_hash || !t->added_hash)
        return ds_err_set(DS_ERR_NOMEM, "out of memory loading the vocabulary");
    /* pass 2: vocab spellings */
    json_object_foreach((json_t *)vocab, key, val) {
        int32_t id = (int32_t)json_integer_value(val);
        if (t->flags[id] & TF_VALID)
            return ds_err_set(DS_ERR_FORMAT, "tokenizer.json model.vocab: id %d appears twice",
                              (int)id);
        int rc = arena_add(t, key, strlen(key), &t->vocab_spell[id]);
        if (rc) return rc;
        t->spell[id] = t->vocab_spell[id];
        t->flags[id] = TF_VALID;
        hash_put(t, t->vocab_hash, t->vocab_spell, id);
    }
    /* added tokens: their content is the id's spelling (HF: added vocabulary first) */
    for (size_t i = 0; i < n_added; i++) {
        const json_t *a = json_array_get(added, i);
        char where[64];
        snprintf(where, sizeof where, "added_tokens[%zu]", i);
        int rc;
        if ((rc = refuse_true(a, "lstrip", where)) || (rc = refuse_true(a, "rstrip", where)) ||
            (rc = refuse_true(a, "single_word", where)))
            return rc;
        int32_t id = (int32_t)json_integer_value(json_object_get(a, "id"));
        const json_t *c = json_object_get(a, "content");
        int special = json_is_true(json_object_get(a, "special"));
        const json_t *nz = json_object_get(a, "normalized");
        int normalized = nz ? json_is_true(nz) : !special;
        if ((rc = arena_add(t, json_string_value(c), json_string_length(c), &t->spell[id])))
            return rc;
        t->flags[id] = (uint8_t)(TF_VALID | TF_ADDED | (special ? TF_SPECIAL : 0));
        hash_put(t, t->added_hash, t->spell, id);
        if ((rc = trie_add(&t->tries[normalized ? 1 : 0],
                           (const unsigned char *)t->arena + t->spell[id].off, t->spell[id].len,
                           id)))
            return rc;
    }
    /* decoded bytes: HF's ByteLevel decoder maps a token char by char through the byte table
     * when every char is in it, and otherwise keeps the token's own UTF-8 */
    int32_t cp_to_byte[324];
    for (int i = 0; i < 324; i++) cp_to_byte[i] = -1;
    for (int b = 0; b < 256; b++) cp_to_byte[byte_to_cp(b)] = b;
    unsigned char *tmp = NULL;
    size_t tmp_cap = 0;
    for (int32_t id = 0; id < t->n_ids; id++) {
        if (!(t->flags[id] & TF_VALID)) continue;
        span s = t->spell[id];
        if (s.len > tmp_cap) {
            unsigned char *nt = realloc(tmp, s.len);
            if (!nt) {
                free(tmp);
                return ds_err_set(DS_ERR_NOMEM, "out of memory");
            }
            tmp = nt;
            tmp_cap = s.len;
        }
        const unsigned char *p = (const unsigned char *)t->arena + s.off;
        size_t k = 0, o = 0;
        int mapped = 1;
        while (k < s.len) {
            uint32_t cp;
            int L = get_utf8(p + k, s.len - k, &cp);
            if (!L || cp >= 324 || cp_to_byte[cp] < 0) {
                mapped = 0;
                break;
            }
            tmp[o++] = (unsigned char)cp_to_byte[cp];
            k += (size_t)L;
        }
        if (mapped) {
            int rc = arena_add(t, tmp, o, &t->dec[id]);
            if (rc) {
                free(tmp);
                return rc;
            }
        } else {
            t->dec[id] = s;
        }
    }
    free(tmp);
    /* the byte alphabet must be complete: every byte's character is a vocab token */
    for (int b = 0; b < 256; b++) {
        unsigned char u[4];
        int L = put_utf8(byte_to_cp(b), u);
        t->byte_id[b] = hash_find(t, t->vocab_hash, t->vocab_spell, u, (size_t)L);
        if (t->byte_id[b] < 0)
            return ds_err_set(DS_ERR_UNSUPPORTED,
                              "tokenizer.json model.vocab: no token for byte 0x%02X ('%.*s'); a "
                              "vocabulary without the full byte alphabet is unsupported",
                              b, L, (const char *)u);
    }
    return DS_OK;
}

static int load_merges(ds_tokenizer *t, const json_t *m) {
    const json_t *merges = json_object_get(m, "merges");
    if (!json_is_array(merges))
        return ds_err_set(DS_ERR_FORMAT, "tokenizer.json model.merges: not an array");
    size_t n = json_array_size(merges);
    uint32_t size = 1024;
    while (size < 2 * n + 2) size *= 2;
    t->merge_mask = size - 1;
    t->merges = malloc(size * sizeof *t->merges);
    if (!t->merges) return ds_err_set(DS_ERR_NOMEM, "out of memory loading merges");
    for (uint32_t i = 0; i < size; i++) t->merges[i].key = UINT64_MAX;
    char *cat = NULL;
    size_t cat_cap = 0;
    int rc = DS_OK;
    for (size_t r = 0; r < n && !rc; r++) {
        const json_t *e = json_array_get(merges, r);
        const char *a, *b;
        size_t la, lb;
        if (json_is_string(e)) {
            a = json_string_value(e);
            const char *sp = strchr(a, ' ');
            if (!sp || strchr(sp + 1, ' ') || sp == a || !sp[1]) {
                rc = ds_err_set(DS_ERR_FORMAT,
                                "tokenizer.json model.merges[%zu]: '%s' is not \"left right\"", r,
                                a);
                break;
            }
            la = (size_t)(sp - a);
            b = sp + 1;
            lb = strlen(b);
        } else if (json_is_array(e) && json_array_size(e) == 2 &&
                   json_is_string(json_array_get(e, 0)) && json_is_string(json_array_get(e, 1))) {
            a = json_string_value(json_array_get(e, 0));
            la = json_string_length(json_array_get(e, 0));
            b = json_string_value(json_array_get(e, 1));
            lb = json_string_length(json_array_get(e, 1));
        } else {
            rc = ds_err_set(DS_ERR_FORMAT,
                            "tokenizer.json model.merges[%zu]: neither \"a b\" nor [\"a\", \"b\"]",
                            r);
            break;
        }
        int32_t ia = hash_find(t, t->vocab_hash, t->vocab_spell, a, la);
        int32_t ib = hash_find(t, t->vocab_hash, t->vocab_spell, b, lb);
        if (la + lb > cat_cap) {
            char *nc = realloc(cat, la + lb);
            if (!nc) {
                rc = ds_err_set(DS_ERR_NOMEM, "out of memory");
                break;
            }
            cat = nc;
            cat_cap = la + lb;
        }
        memcpy(cat, a, la);
        memcpy(cat + la, b, lb);
        int32_t inew = hash_find(t, t->vocab_hash, t->vocab_spell, cat, la + lb);
        if (ia < 0 || ib < 0 || inew < 0) {
            rc = ds_err_set(DS_ERR_FORMAT,
                            "tokenizer.json model.merges[%zu]: '%.*s' + '%.*s' uses a token "
                            "missing from the vocab",
                            r, (int)la, a, (int)lb, b);
            break;
        }
        uint64_t key = (uint64_t)(uint32_t)ia << 32 | (uint32_t)ib;
        uint32_t i = (uint32_t)mix64(key) & t->merge_mask;
        while (t->merges[i].key != UINT64_MAX && t->merges[i].key != key)
            i = (i + 1) & t->merge_mask;
        /* a repeated pair keeps its last rank, as HF's HashMap collect and JS's Map do */
        t->merges[i] = (merge_slot){key, (uint32_t)r, inew};
    }
    free(cat);
    return rc;
}

static int load_ignore_merges(ds_tokenizer *t, const json_t *m) {
    const json_t *v = json_object_get(m, "ignore_merges");
    if (v && !json_is_boolean(v))
        return ds_err_set(DS_ERR_FORMAT, "tokenizer.json model.ignore_merges: not a boolean");
    t->ignore_merges = v && json_is_true(v);
    if (!t->ignore_merges) return DS_OK;
    /* raw bytes -> vocab id for every vocab token spelled in the byte alphabet */
    t->raw_hash = calloc((size_t)t->hash_mask + 1, sizeof(int32_t));
    if (!t->raw_hash) return ds_err_set(DS_ERR_NOMEM, "out of memory");
    for (int32_t id = 0; id < t->n_ids; id++) {
        if (!t->vocab_spell[id].len || (t->flags[id] & TF_ADDED)) continue;
        /* dec == spell (same offset) means not byte-level mapped: such a key cannot come out
         * of the pre-tokenizer */
        if (t->dec[id].off == t->spell[id].off && t->dec[id].len == t->spell[id].len &&
            t->dec[id].len)
            continue;
        hash_put(t, t->raw_hash, t->dec, id);
    }
    return DS_OK;
}

static char *token_string(const json_t *v) {
    if (json_is_object(v)) v = json_object_get(v, "content");
    return strdup(json_is_string(v) ? json_string_value(v) : "");
}

static int load_config(ds_tokenizer *t, const char *cfg_path) {
    t->bos_id = t->eos_id = -1;
    struct stat st;
    if (stat(cfg_path, &st) != 0) {
        t->bos_token = strdup("");
        t->eos_token = strdup("");
        return t->bos_token && t->eos_token ? DS_OK : ds_err_set(DS_ERR_NOMEM, "out of memory");
    }
    json_error_t je;
    json_t *c = json_load_file(cfg_path, 0, &je);
    if (!c) return ds_err_set(DS_ERR_FORMAT, "%s:%d:%d: %s", cfg_path, je.line, je.column, je.text);
    int rc = DS_OK;
    if (!json_is_object(c)) {
        rc = ds_err_set(DS_ERR_FORMAT, "%s: not a JSON object", cfg_path);
        goto out;
    }
    const json_t *ab = json_object_get(c, "add_bos_token");
    t->add_bos = ab && json_is_true(ab);
    t->bos_token = token_string(json_object_get(c, "bos_token"));
    t->eos_token = token_string(json_object_get(c, "eos_token"));
    const json_t *ct = json_object_get(c, "chat_template");
    if (json_is_string(ct)) {
        t->chat_template = strdup(json_string_value(ct));
    } else if (json_is_array(ct)) { /* [{name, template}]: the "default" one */
        size_t i;
        const json_t *e;
        json_array_foreach(ct, i, e) {
            const char *name = json_string_value(json_object_get(e, "name"));
            const char *tpl = json_string_value(json_object_get(e, "template"));
            if (name && tpl && !strcmp(name, "default")) t->chat_template = strdup(tpl);
        }
    }
    if (!t->bos_token || !t->eos_token) {
        rc = ds_err_set(DS_ERR_NOMEM, "out of memory");
        goto out;
    }
    if (*t->bos_token) t->bos_id = ds_tok_token_id(t, t->bos_token);
    if (*t->eos_token) t->eos_id = ds_tok_token_id(t, t->eos_token);
out:
    json_decref(c);
    return rc;
}

int ds_tok_open(const char *path, ds_tokenizer **out) {
    *out = NULL;
    if (!path) return ds_err_set(DS_ERR_ARG, "no tokenizer path given");
    struct stat st;
    if (stat(path, &st) != 0) return ds_err_set(DS_ERR_IO, "%s: %s", path, strerror(errno));
    size_t pl = strlen(path);
    char *json_path = malloc(pl + 32), *cfg_path = malloc(pl + 32);
    if (!json_path || !cfg_path) {
        free(json_path);
        free(cfg_path);
        return ds_err_set(DS_ERR_NOMEM, "out of memory");
    }
    if (S_ISDIR(st.st_mode)) {
        snprintf(json_path, pl + 32, "%s/tokenizer.json", path);
        snprintf(cfg_path, pl + 32, "%s/tokenizer_config.json", path);
    } else {
        memcpy(json_path, path, pl + 1);
        const char *slash = strrchr(path, '/');
        if (slash)
            snprintf(cfg_path, pl + 32, "%.*s/tokenizer_config.json", (int)(slash - path), path);
        else
            snprintf(cfg_path, pl + 32, "tokenizer_config.json");
    }
    ds_tokenizer *t = calloc(1, sizeof *t);
    json_t *root = NULL;
    int rc;
    if (!t) {
        rc = ds_err_set(DS_ERR_NOMEM, "out of memory");
        goto fail;
    }
    for (int k = 0; k < 2; k++)
        for (int b = 0; b < 256; b++) t->tries[k].root[b] = -1;
    if (stat(json_path, &st) != 0) {
        rc = ds_err_set(DS_ERR_IO, "%s: %s", json_path, strerror(errno));
        goto fail;
    }
    json_error_t je;
    root = json_load_file(json_path, 0, &je);
    if (!root) {
        rc = ds_err_set(DS_ERR_FORMAT, "%s:%d:%d: %s", json_path, je.line, je.column, je.text);
        goto fail;
    }
    if (!json_is_object(root)) {
        rc = ds_err_set(DS_ERR_FORMAT, "%s: not a JSON object", json_path);
        goto fail;
    }
    const json_t *model = json_object_get(root, "model");
    if ((rc = load_misc(root)) || (rc = load_normalizer(root)) || (rc = load_model_flags(model)) ||
        (rc = load_pretok(t, root)) || (rc = load_vocab_and_added(t, root)) ||
        (rc = load_merges(t, model)) || (rc = load_ignore_merges(t, model)) ||
        (rc = load_config(t, cfg_path)))
        goto fail;
    json_decref(root);
    free(json_path);
    free(cfg_path);
    *out = t;
    return DS_OK;
fail:
    ds_err_wrap(rc, "%s", json_path);
    json_decref(root);
    ds_tok_close(t);
    free(json_path);
    free(cfg_path);
    return rc;
}

void ds_tok_close(ds_tokenizer *t) {
    if (!t) return;
    for (int i = 0; i < t->n_splits; i++) pcre2_code_free(t->re[i]);
    for (int k = 0; k < 2; k++) free(t->tries[k].nodes);
    free(t->arena);
    free(t->spell);
    free(t->vocab_spell);
    free(t->dec);
    free(t->flags);
    free(t->vocab_hash);
    free(t->added_hash);
    free(t->raw_hash);
    free(t->merges);
    free(t->bos_token);
    free(t->eos_token);
    free(t->chat_template);
    free(t);
}

int64_t ds_tok_vocab_size(const ds_tokenizer *t) {
    return t->n_ids;
}
int32_t ds_tok_bos_id(const ds_tokenizer *t) {
    return t->bos_id;
}
int32_t ds_tok_eos_id(const ds_tokenizer *t) {
    return t->eos_id;
}
int ds_tok_add_bos(const ds_tokenizer *t) {
    return t->add_bos;
}
const char *ds_tok_chat_template(const ds_tokenizer *t) {
    return t->chat_template;
}
const char *ds_tok_bos_token(const ds_tokenizer *t) {
    return t->bos_token;
}
const char *ds_tok_eos_token(const ds_tokenizer *t) {
    return t->eos_token;
}

int32_t ds_tok_token_id(const ds_tokenizer *t, const char *token) {
    size_t n = strlen(token);
    int32_t id = hash_find(t, t->added_hash, t->spell, token, n);
    return id >= 0 ? id : hash_find(t, t->vocab_hash, t->vocab_spell, token, n);
}

int ds_tok__id_bytes(const ds_tokenizer *t, int32_t id, const char **p, size_t *n, int *special) {
    if (id < 0 || id >= t->n_ids || !(t->flags[id] & TF_VALID)) return -1;
    *p = t->arena + t->dec[id].off;
    *n = t->dec[id].len;
    *special = (t->flags[id] & TF_SPECIAL) != 0;
    return 0;
}

/* ---- encoding --------------------------------------------------------------------------- */

/* Per-call memo of short pieces (words repeat): direct-mapped, keyed by the piece's bytes,
 * which point into the caller's text (alive for the whole call). Per call, so encode stays
 * free of shared mutable state. */
#define CACHE_SLOTS 4096
#define CACHE_MAX_BYTES 32
#define CACHE_MAX_IDS 7
typedef struct {
    const unsigned char *key;
    uint8_t klen, nids;
    int32_t ids[CACHE_MAX_IDS];
} cache_slot;

typedef struct {
    const ds_tokenizer *t;
    cache_slot *cache; /* NULL for short inputs */
    int32_t *ids;
    size_t n, cap;
    pcre2_match_data *md[MAX_SPLITS];
    /* heap-merge scratch, grown on demand */
    int32_t *sym, *prev, *next;
    uint64_t *heap;
    size_t scratch_cap;
} enc;

static int emit(enc *e, int32_t id) {
    if (e->n == e->cap) {
        size_t cap = e->cap ? e->cap * 2 : 64;
        int32_t *ni = realloc(e->ids, cap * sizeof *ni);
        if (!ni) return ds_err_set(DS_ERR_NOMEM, "out of memory encoding");
        e->ids = ni;
        e->cap = cap;
    }
    e->ids[e->n++] = id;
    return DS_OK;
}

/* Linear-scan merging for short pieces: sym[] and the cached rank of each adjacent pair. */
static int bpe_linear(enc *e, const unsigned char *p, size_t n) {
    const ds_tokenizer *t = e->t;
    int32_t sym[n], nid[n];
    uint32_t rank[n];
    for (size_t i = 0; i < n; i++) sym[i] = t->byte_id[p[i]];
    for (size_t i = 0; i + 1 < n; i++) {
        const merge_slot *m = merge_find(t, sym[i], sym[i + 1]);
        rank[i] = m ? m->rank : UINT32_MAX;
        nid[i] = m ? m->id : -1;
    }
    size_t ns = n;
    for (;;) {
        size_t best = SIZE_MAX;
        uint32_t br = UINT32_MAX;
        for (size_t i = 0; i + 1 < ns; i++)
            if (rank[i] < br) {
                br = rank[i];
                best = i;
            }
        if (best == SIZE_MAX) break;
        sym[best] = nid[best];
        /* drop sym[best + 1] and the pair (best + 1, best + 2)'s cache slot */
        size_t tail = ns - best - 2;
        memmove(sym + best + 1, sym + best + 2, tail * sizeof *sym);
        memmove(rank + best + 1, rank + best + 2, (tail ? tail - 1 : 0) * sizeof *rank);
        memmove(nid + best + 1, nid + best + 2, (tail ? tail - 1 : 0) * sizeof *nid);
        ns--;
        for (size_t i = best ? best - 1 : 0; i <= best && i + 1 < ns; i++) {
            const merge_slot *m = merge_find(t, sym[i], sym[i + 1]);
            rank[i] = m ? m->rank : UINT32_MAX;
            nid[i] = m ? m->id : -1;
        }
    }
    for (size_t i = 0; i < ns; i++)
        if (emit(e, sym[i])) return DS_ERR_NOMEM;
    return DS_OK;
}

static void heap_push(uint64_t *h, size_t *n, uint64_t v) {
    size_t i = (*n)++;
    while (i && h[(i - 1) / 2] > v) {
        h[i] = h[(i - 1) / 2];
        i = (i - 1) / 2;
    }
    h[i] = v;
}

static uint64_t heap_pop(uint64_t *h, size_t *n) {
    uint64_t top = h[0], v = h[--*n];
    size_t i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= *n) break;
        if (c + 1 < *n && h[c + 1] < h[c]) c++;
        if (h[c] >= v) break;
        h[i] = h[c];
        i = c;
    }
    if (*n) h[i] = v;
    return top;
}

/* Heap merging for long pieces: entries (rank << 32 | left position), smallest first; an entry
 * is stale when its left symbol died or the pair at it no longer has that rank. */
static int bpe_heap(enc *e, const unsigned char *p, size_t n) {
    const ds_tokenizer *t = e->t;
    if (n > e->scratch_cap) {
        free(e->sym);
        free(e->prev);
        free(e->next);
        free(e->heap);
        e->sym = malloc(n * sizeof *e->sym);
        e->prev = malloc(n * sizeof *e->prev);
        e->next = malloc(n * sizeof *e->next);
        e->heap = malloc(2 * n * sizeof *e->heap);
        e->scratch_cap = n;
        if (!e->sym || !e->prev || !e->next || !e->heap) {
            e->scratch_cap = 0;
            return ds_err_set(DS_ERR_NOMEM, "out of memory encoding a %zu-byte piece", n);
        }
    }
    int32_t *sym = e->sym, *prev = e->prev, *next = e->next;
    uint64_t *heap = e->heap;
    size_t nh = 0;
    for (size_t i = 0; i < n; i++) {
        sym[i] = t->byte_id[p[i]];
        prev[i] = (int32_t)i - 1;
        next[i] = i + 1 < n ? (int32_t)i + 1 : -1;
    }
    for (size_t i = 0; i + 1 < n; i++) {
        const merge_slot *m = merge_find(t, sym[i], sym[i + 1]);
        if (m) heap_push(heap, &nh, (uint64_t)m->rank << 32 | i);
    }
    while (nh) {
        uint64_t top = heap_pop(heap, &nh);
        int32_t i = (int32_t)(uint32_t)top, j = next[i];
        if (sym[i] < 0 || j < 0) continue;
        const merge_slot *m = merge_find(t, sym[i], sym[j]);
        if (!m || m->rank != (uint32_t)(top >> 32)) continue;
        sym[i] = m->id;
        sym[j] = -1;
        next[i] = next[j];
        if (next[j] >= 0) prev[next[j]] = i;
        if (prev[i] >= 0) {
            const merge_slot *l = merge_find(t, sym[prev[i]], sym[i]);
            if (l) heap_push(heap, &nh, (uint64_t)l->rank << 32 | (uint32_t)prev[i]);
        }
        if (next[i] >= 0) {
            const merge_slot *r = merge_find(t, sym[i], sym[next[i]]);
            if (r) heap_push(heap, &nh, (uint64_t)r->rank << 32 | (uint32_t)i);
        }
    }
    for (int32_t i = 0; i >= 0; i = next[i])
        if (emit(e, sym[i])) return DS_ERR_NOMEM;
    return DS_OK;
}

static int bpe_merge(enc *e, const unsigned char *p, size_t n) {
    const ds_tokenizer *t = e->t;
    if (t->ignore_merges) {
        int32_t id = hash_find(t, t->raw_hash, t->dec, p, n);
        if (id >= 0) return emit(e, id);
    }
    return n <= (size_t)ds_tok__bpe_linear_max ? bpe_linear(e, p, n) : bpe_heap(e, p, n);
}

static int bpe_piece(enc *e, const unsigned char *p, size_t n) {
    if (n == 1) return emit(e, e->t->byte_id[p[0]]);
    if (!e->cache || n > CACHE_MAX_BYTES) return bpe_merge(e, p, n);
    cache_slot *c = &e->cache[hash_bytes(p, n) & (CACHE_SLOTS - 1)];
    if (c->key && c->klen == n && !memcmp(c->key, p, n)) {
        for (int i = 0; i < c->nids; i++)
            if (emit(e, c->ids[i])) return DS_ERR_NOMEM;
        return DS_OK;
    }
    size_t n0 = e->n;
    int rc = bpe_merge(e, p, n);
    if (!rc && e->n - n0 <= CACHE_MAX_IDS) {
        c->key = p;
        c->klen = (uint8_t)n;
        c->nids = (uint8_t)(e->n - n0);
        memcpy(c->ids, e->ids + n0, (e->n - n0) * sizeof *e->ids);
    }
    return rc;
}

/* Split stage `stage` cuts p[0, n) into matches and gaps (Isolated), each going on to the next
 * stage; after the last stage a piece is merged. */
static int pretok(enc *e, const unsigned char *p, size_t n, int stage) {
    const ds_tokenizer *t = e->t;
    if (stage == t->n_splits) return bpe_piece(e, p, n);
    pcre2_match_data *md = e->md[stage];
    size_t last = 0, off = 0;
    int rc;
    while (off < n) {
        int m = pcre2_match(t->re[stage], p, n, off, PCRE2_NO_UTF_CHECK, md, NULL);
        if (m == PCRE2_ERROR_NOMATCH) break;
        if (m < 0) {
            PCRE2_UCHAR msg[256];
            pcre2_get_error_message(m, msg, sizeof msg);
            return ds_err_set(DS_ERR_RANGE, "pre-tokenizer regex %d failed on a %zu-byte piece: %s",
                              stage, n, (char *)msg);
        }
        PCRE2_SIZE *ov = pcre2_get_ovector_pointer(md);
        size_t s = ov[0], end = ov[1];
        if (s > last && (rc = pretok(e, p + last, s - last, stage + 1))) return rc;
        if (end > s && (rc = pretok(e, p + s, end - s, stage + 1))) return rc;
        if (end == s) end = s + 1; /* cannot happen: patterns have a minimum length >= 1 */
        last = off = end;
    }
    if (last < n && (rc = pretok(e, p + last, n - last, stage + 1))) return rc;
    return DS_OK;
}

/* Cuts the added tokens of trie `k` out of p[0, n); the rest goes to trie k + 1, then to the
 * pre-tokenizer. */
static int split_added(enc *e, const unsigned char *p, size_t n, int k) {
    if (k == 2) return pretok(e, p, n, 0);
    const trie *tr = &e->t->tries[k];
    if (!tr->n) return split_added(e, p, n, k + 1);
    size_t last = 0;
    int rc;
    for (size_t i = 0; i < n;) {
        int32_t id;
        size_t len = tr->root[p[i]] >= 0 ? trie_match(tr, p + i, n - i, &id) : 0;
        if (!len) {
            i++;
            continue;
        }
        if (i > last && (rc = split_added(e, p + last, i - last, k + 1))) return rc;
        if ((rc = emit(e, id))) return rc;
        i += len;
        last = i;
    }
    if (last < n && (rc = split_added(e, p + last, n - last, k + 1))) return rc;
    return DS_OK;
}

int ds_tok_encode(const ds_tokenizer *t, const char *text, size_t len, int add_bos, int32_t **ids,
                  size_t *n) {
    *ids = NULL;
    *n = 0;
    if (add_bos && t->bos_id < 0)
        return ds_err_set(DS_ERR_MISSING, "add_bos: the tokenizer has no BOS token");
    enc e = {.t = t};
    ds_buf fixed = {0};
    const unsigned char *p = (const unsigned char *)text;
    int rc = DS_OK;
    if (len && ds_utf8__valid_prefix(p, len) != len) {
        unsigned char pend[4];
        int np = 0;
        if ((rc = ds_utf8__lossy(pend, &np, p, len, 1, &fixed))) goto out;
        p = (const unsigned char *)fixed.data;
        len = fixed.len;
    }
    for (int s = 0; s < t->n_splits; s++)
        if (!(e.md[s] = pcre2_match_data_create(1, NULL))) {
            rc = ds_err_set(DS_ERR_NOMEM, "out of memory");
            goto out;
        }
    if (len >= 4096 && !(e.cache = calloc(CACHE_SLOTS, sizeof *e.cache))) {
        rc = ds_err_set(DS_ERR_NOMEM, "out of memory");
        goto out;
    }
    if (add_bos && (rc = emit(&e, t->bos_id))) goto out;
    if (len) rc = split_added(&e, p, len, 0);
out:
    for (int s = 0; s < t->n_splits; s++) pcre2_match_data_free(e.md[s]);
    free(e.sym);
    free(e.prev);
    free(e.next);
    free(e.heap);
    free(e.cache);
    ds_buf_free(&fixed);
    if (rc) {
        free(e.ids);
        return rc;
    }
    if (!e.ids && !(e.ids = malloc(sizeof *e.ids))) return ds_err_set(DS_ERR_NOMEM, "oom");
    *ids = e.ids;
    *n = e.n;
    return DS_OK;
}
