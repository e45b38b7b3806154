/* detok: ids -> bytes -> text, whole or streamed.
 *
 * HF's decode maps each token to bytes (ByteLevel decoder) and then makes one string with
 * from_utf8_lossy. Decoding here is the same two steps: the bytes of each id come precomputed
 * from bpe.c, and the lossy step is utf8.c's streaming WHATWG decoder. The streaming
 * detokenizer feeds that decoder one token's bytes at a time and keeps only the (at most 3)
 * bytes of a character still being spelled in ds_detok.pending, so what it emits, concatenated,
 * is exactly the lossy decode of everything at once: the decoder's output never depends on how
 * its input is chunked. */
#include "tokenizer/tok_internal.h"

#include <string.h>

static int bad_id(int32_t id, const ds_tokenizer *t) {
    return ds_err_set(DS_ERR_RANGE, "token id %d is not in the vocabulary (size %lld)", (int)id,
                      (long long)ds_tok_vocab_size(t));
}

int ds_tok_decode_bytes(const ds_tokenizer *t, const int32_t *ids, size_t n, int skip_special,
                        ds_buf *out) {
    for (size_t i = 0; i < n; i++) {
        const char *p;
        size_t len;
        int special;
        if (ds_tok__id_bytes(t, ids[i], &p, &len, &special)) return bad_id(ids[i], t);
        if (special && skip_special) continue;
        if (ds_buf_append(out, p, len)) return DS_ERR_NOMEM;
    }
    return DS_OK;
}

int ds_tok_decode(const ds_tokenizer *t, const int32_t *ids, size_t n, int skip_special,
                  ds_buf *out) {
    /* validate first so that an error leaves out untouched */
    for (size_t i = 0; i < n; i++) {
        const char *p;
        size_t len;
        int special;
        if (ds_tok__id_bytes(t, ids[i], &p, &len, &special)) return bad_id(ids[i], t);
    }
    ds_detok d;
    ds_detok_init(&d, t, skip_special);
    size_t len0 = out->len;
    for (size_t i = 0; i < n; i++) {
        int rc = ds_detok_push(&d, ids[i], out);
        if (rc) {
            out->len = len0;
            if (out->data) out->data[len0] = '\0';
            return rc;
        }
    }
    return ds_detok_finish(&d, out);
}

void ds_detok_init(ds_detok *d, const ds_tokenizer *t, int skip_special) {
    memset(d, 0, sizeof *d);
    d->tok = t;
    d->skip_special = skip_special;
}

int ds_detok_push(ds_detok *d, int32_t id, ds_buf *out) {
    const char *p;
    size_t len;
    int special;
    if (ds_tok__id_bytes(d->tok, id, &p, &len, &special)) return bad_id(id, d->tok);
    if (special && d->skip_special) return DS_OK;
    return ds_utf8__lossy(d->pending, &d->n_pending, (const unsigned char *)p, len, 0, out);
}

int ds_detok_finish(ds_detok *d, ds_buf *out) {
    int rc = ds_utf8__lossy(d->pending, &d->n_pending, NULL, 0, 1, out);
    d->n_pending = 0;
    return rc;
}
