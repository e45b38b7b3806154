/* Error codes and the per-thread message buffer (see core.h). */
#include "core/core.h"

#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

static _Thread_local char err_msg[1024];

const char *ds_strerror(int err) {
    switch (err) {
#define DS_ERR_CASE(name, val, str)                                                                \
    case val:                                                                                      \
        return str;
        DS_ERRORS(DS_ERR_CASE)
#undef DS_ERR_CASE
    }
    return "unknown error";
}

int ds_err_set(int err, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err_msg, sizeof err_msg, fmt, ap);
    va_end(ap);
    return err;
}

int ds_err_wrap(int err, const char *fmt, ...) {
    char prefix[512], old[sizeof err_msg];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(prefix, sizeof prefix, fmt, ap);
    va_end(ap);
    memcpy(old, err_msg, sizeof old);
    /* Truncation is fine: the start of the message names the context. */
    size_t n = (size_t)snprintf(err_msg, sizeof err_msg, "%.500s: ", prefix);
    if (n < sizeof err_msg)
        snprintf(err_msg + n, sizeof err_msg - n, "%.*s", (int)(sizeof err_msg - n - 1), old);
    return err;
}

const char *ds_err_msg(void) {
    return err_msg;
}

void ds_assert_fail(const char *expr, const char *file, int line) {
    fprintf(stderr, "dsinfer: internal error: assertion '%s' failed at %s:%d\n", expr, file, line);
    abort();
}
