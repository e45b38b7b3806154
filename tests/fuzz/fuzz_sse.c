/* libFuzzer target for the bench client's Server-Sent Events parser (ds_sse_*), which reads bytes
 * from any server the user points it at.
 *
 * The first byte picks where the rest is cut in two; the parser must never crash, leak or hit
 * undefined behaviour, and (the differential check) must dispatch exactly the same events
 * whether the stream arrives whole or in two pieces, or byte by byte. A small max_bytes makes
 * the over-long line / event refusal reachable. */
#include "bench/bench.h"
#include "core/core.h"

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    ds_log_set_level(DS_LOG_ERROR);
    return 0;
}

typedef struct {
    ds_buf all; /* every event's data, each followed by a 0xff separator */
    size_t n;
} events;

static int on_event(void *ctx, const char *data, size_t len) {
    events *e = ctx;
    if (strlen(data) > len) abort(); /* NUL-terminated at len, no earlier NUL than the data has */
    ds_buf_append(&e->all, data, len);
    ds_buf_append(&e->all, "\xff", 1);
    e->n++;
    return 0;
}

static int same(const events *a, const events *b) {
    return a->n == b->n && a->all.len == b->all.len &&
           (a->all.len == 0 || memcmp(a->all.data, b->all.data, a->all.len) == 0);
}

/* Parses p[0, n) cut at the given points (sorted, <= n); returns the feed/finish status. */
static int parse(const char *p, size_t n, const size_t *cuts, size_t n_cuts, events *e) {
    ds_sse s;
    ds_sse_init(&s, 256);
    int rc = 0;
    size_t at = 0;
    for (size_t i = 0; i <= n_cuts && !rc; i++) {
        size_t end = i < n_cuts ? cuts[i] : n;
        rc = ds_sse_feed(&s, p + at, end - at, on_event, e);
        at = end;
    }
    if (!rc) rc = ds_sse_finish(&s, on_event, e);
    ds_sse_free(&s);
    return rc;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1 || size > 4096) return 0;
    const char *p = (const char *)data + 1;
    size_t n = size - 1, cut = n ? data[0] % (n + 1) : 0;
    events whole = {{0}, 0}, two = {{0}, 0}, bytes = {{0}, 0};
    int r1 = parse(p, n, NULL, 0, &whole);
    int r2 = parse(p, n, &cut, 1, &two);
    size_t *every = malloc((n + 1) * sizeof *every);
    for (size_t i = 0; every && i < n; i++) every[i] = i;
    int r3 = every ? parse(p, n, every, n, &bytes) : r1;
    free(every);
    /* the same events, in the same order, however the bytes arrive (until an error stops it) */
    if (!r1 && (r2 || r3)) abort();
    if (!r1 && (!same(&whole, &two) || !same(&whole, &bytes))) abort();
    ds_buf_free(&whole.all);
    ds_buf_free(&two.all);
    ds_buf_free(&bytes.all);
    return 0;
}
