/* utf8: validation and lossy decoding of UTF-8, exactly as the WHATWG Encoding Standard's
 * decoder (Node's TextDecoder) and Rust's String::from_utf8_lossy do it: every maximal subpart
 * of an ill-formed sequence becomes one U+FFFD. A maximal subpart is the longest prefix of a
 * well-formed sequence (so E0 80 is two subparts: E0 alone, since E0's second byte must be
 * A0..BF, then 80), or a single byte that starts nothing (80..BF, C0, C1, F5..FF).
 *
 * Used three ways: encode repairs its input with it, decode makes HF's lossy string, and the
 * streaming detokenizer feeds it byte chunks one token at a time: the state is just the bytes
 * of the character being spelled, so chunking cannot change the output. */
#include "tokenizer/tok_internal.h"

#include <string.h>

static const char fffd[3] = {(char)0xEF, (char)0xBF, (char)0xBD};

/* Total length of a sequence led by b (0 when b cannot lead one). */
static int seq_len(unsigned char b) {
    if (b < 0x80) return 1;
    if (b >= 0xC2 && b <= 0xDF) return 2;
    if (b >= 0xE0 && b <= 0xEF) return 3;
    if (b >= 0xF0 && b <= 0xF4) return 4;
    return 0;
}

/* The allowed range of the byte at index i (>= 1) of a sequence led by lead. */
static void cont_range(unsigned char lead, int i, unsigned char *lo, unsigned char *hi) {
    *lo = 0x80;
    *hi = 0xBF;
    if (i != 1) return;
    if (lead == 0xE0)
        *lo = 0xA0;
    else if (lead == 0xED)
        *hi = 0x9F;
    else if (lead == 0xF0)
        *lo = 0x90;
    else if (lead == 0xF4)
        *hi = 0x8F;
}

size_t ds_utf8__valid_prefix(const unsigned char *p, size_t n) {
    size_t i = 0;
    while (i < n) {
        /* ASCII fast path, 8 bytes at a time */
        while (i + 8 <= n) {
            uint64_t w;
            memcpy(&w, p + i, 8);
            if (w & 0x8080808080808080ull) break;
            i += 8;
        }
        if (i >= n) break;
        unsigned char b = p[i];
        if (b < 0x80) {
            i++;
            continue;
        }
        int L = seq_len(b);
        if (!L || i + (size_t)L > n) return i;
        for (int k = 1; k < L; k++) {
            unsigned char lo, hi;
            cont_range(b, k, &lo, &hi);
            if (p[i + k] < lo || p[i + k] > hi) return i;
        }
        i += (size_t)L;
    }
    return i;
}

int ds_utf8__lossy(unsigned char *pend, int *n_pend, const unsigned char *p, size_t n, int final,
                   ds_buf *out) {
    size_t i = 0;
    while (i < n) {
        if (*n_pend == 0) {
            size_t v = ds_utf8__valid_prefix(p + i, n - i);
            if (v && ds_buf_append(out, p + i, v)) return DS_ERR_NOMEM;
            i += v;
            if (i >= n) break;
            unsigned char b = p[i++];
            if (seq_len(b) >= 2) {
                pend[0] = b;
                *n_pend = 1;
            } else if (ds_buf_append(out, fffd, 3)) {
                return DS_ERR_NOMEM;
            }
            continue;
        }
        unsigned char b = p[i], lo, hi;
        cont_range(pend[0], *n_pend, &lo, &hi);
        if (b < lo || b > hi) {
            /* the pending prefix is a maximal subpart; b is looked at afresh */
            *n_pend = 0;
            if (ds_buf_append(out, fffd, 3)) return DS_ERR_NOMEM;
            continue;
        }
        pend[(*n_pend)++] = b;
        i++;
        if (*n_pend == seq_len(pend[0])) {
            if (ds_buf_append(out, pend, (size_t)*n_pend)) return DS_ERR_NOMEM;
            *n_pend = 0;
        }
    }
    if (final && *n_pend) {
        *n_pend = 0;
        if (ds_buf_append(out, fffd, 3)) return DS_ERR_NOMEM;
    }
    return DS_OK;
}
