/* sse: an incremental Server-Sent Events parser (the HTML standard's event stream format).
 *
 * Bytes arrive in arbitrary pieces (a TCP read may end inside a line, or between the CR and
 * LF of a CRLF), so the parser keeps the current line and the current event's data between
 * calls. Only "data" fields matter to an OpenAI stream; every other field is ignored. Lines
 * and events are bounded (max_bytes) so a server that never sends a newline cannot make the
 * client grow without limit. */
#include "bench/bench.h"

#include <string.h>

void ds_sse_init(ds_sse *s, size_t max_bytes) {
    memset(s, 0, sizeof *s);
    s->max_bytes = max_bytes ? max_bytes : (size_t)16 << 20;
}

void ds_sse_free(ds_sse *s) {
    if (!s) return;
    ds_buf_free(&s->line);
    ds_buf_free(&s->data);
    s->has_data = s->cr = 0;
}

static int dispatch(ds_sse *s, ds_sse_fn fn, void *ctx) {
    int rc = 0;
    if (s->has_data) rc = fn(ctx, s->data.data ? s->data.data : "", s->data.len);
    s->data.len = 0;
    if (s->data.data) s->data.data[0] = 0;
    s->has_data = 0;
    return rc;
}

/* One complete line (without its terminator) in s->line. */
static int line_done(ds_sse *s, ds_sse_fn fn, void *ctx) {
    const char *l = s->line.data ? s->line.data : "";
    size_t n = s->line.len;
    s->line.len = 0;
    if (n == 0) return dispatch(s, fn, ctx);
    if (l[0] == ':') return 0; /* comment (keep-alive pings) */
    const char *colon = memchr(l, ':', n);
    size_t name = colon ? (size_t)(colon - l) : n;
    if (name != 4 || memcmp(l, "data", 4)) return 0; /* event, id, retry, unknown: ignored */
    const char *v = colon ? colon + 1 : l + n;
    size_t vn = (size_t)(l + n - v);
    if (vn && *v == ' ') v++, vn--;
    if (s->data.len + vn + 1 > s->max_bytes)
        return ds_err_set(DS_ERR_FORMAT, "SSE event longer than %zu bytes", s->max_bytes);
    if (s->has_data && ds_buf_append(&s->data, "\n", 1)) return DS_ERR_NOMEM;
    if (ds_buf_append(&s->data, v, vn)) return DS_ERR_NOMEM;
    s->has_data = 1;
    return 0;
}

int ds_sse_feed(ds_sse *s, const char *p, size_t n, ds_sse_fn fn, void *ctx) {
    size_t i = 0;
    while (i < n) {
        if (s->cr) { /* CRLF split across calls or within this one */
            s->cr = 0;
            if (p[i] == '\n') {
                i++;
                continue;
            }
        }
        size_t j = i;
        while (j < n && p[j] != '\n' && p[j] != '\r') j++;
        if (j > i) {
            if (s->line.len + (j - i) > s->max_bytes)
                return ds_err_set(DS_ERR_FORMAT, "SSE line longer than %zu bytes", s->max_bytes);
            if (ds_buf_append(&s->line, p + i, j - i)) return DS_ERR_NOMEM;
        }
        if (j == n) break;
        s->cr = p[j] == '\r';
        i = j + 1;
        int rc = line_done(s, fn, ctx);
        if (rc) return rc;
    }
    return 0;
}

int ds_sse_finish(ds_sse *s, ds_sse_fn fn, void *ctx) {
    int rc = 0;
    if (s->line.len) rc = line_done(s, fn, ctx);
    if (!rc) rc = dispatch(s, fn, ctx);
    s->cr = 0;
    return rc;
}
