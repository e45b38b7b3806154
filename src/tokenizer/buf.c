/* buf: the growable byte buffer of tokenizer.h (ds_buf). Always NUL-terminated once it holds
 * anything, so data can be printed; len excludes the NUL. */
#include "tokenizer/tokenizer.h"

#include <stdlib.h>
#include <string.h>

/* Appends p[0, n); on failure the buffer is left exactly as it was. p may be NULL when n == 0.
 * Grows geometrically, so repeated appends are amortised O(1). */
int ds_buf_append(ds_buf *b, const void *p, size_t n) {
    if (n > SIZE_MAX - b->len - 1) return ds_err_set(DS_ERR_NOMEM, "buffer size overflow");
    size_t need = b->len + n + 1;
    if (need > b->cap) {
        size_t cap = b->cap ? b->cap : 64;
        while (cap < need) cap = cap > SIZE_MAX / 2 ? need : cap * 2;
        char *d = realloc(b->data, cap);
        if (!d) return ds_err_set(DS_ERR_NOMEM, "out of memory growing a buffer to %zu bytes", cap);
        b->data = d;
        b->cap = cap;
    }
    if (n) memcpy(b->data + b->len, p, n);
    b->len += n;
    b->data[b->len] = '\0';
    return DS_OK;
}

/* Frees the storage and leaves a zeroed buffer (safe to reuse or free again). */
void ds_buf_free(ds_buf *b) {
    if (!b) return;
    free(b->data);
    b->data = NULL;
    b->len = b->cap = 0;
}
