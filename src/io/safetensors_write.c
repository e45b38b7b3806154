/* Incremental safetensors writer.
 *
 * Layout written (https://github.com/huggingface/safetensors, "Format"):
 *   u64 little-endian N | N bytes of JSON header | data section
 * The header maps each tensor name to {"dtype", "shape", "data_offsets": [begin, end]} (offsets
 * relative to the data section) plus "__metadata__": {"format": "pt"} as PyTorch's save_file
 * writes it. The JSON is padded with spaces so that 8 + N is a multiple of 8, which keeps every
 * tensor of an 8-byte-multiple predecessor naturally aligned in a mapping.
 *
 * Usage: open, add every tensor (name, dtype, shape), begin_data (writes the header), then one
 * ds_st_writer_data per tensor in declaration order with exactly dtype size x numel bytes, then
 * close. The bytes go to "<path>.tmp", which is renamed to <path> only by a close that saw no
 * error, so an interrupted or failed write never leaves a file that looks complete. Set
 * DSINFER_FSYNC=1 to fsync the file before the rename (off by default: make-tiny output is
 * reproducible, and fsync of gigabytes is slow on some file systems).
 *
 * Errors are sticky: after the first failure every call returns the same code and leaves the
 * message (which names the path and, where it applies, the tensor) untouched. */
#include "io/io.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef struct {
    char *name;
    ds_dtype dtype;
    int ndim;
    int64_t shape[DS_ST_MAX_DIMS];
    uint64_t nbytes;
} st_wtensor;

struct ds_st_writer {
    char *path;     /* final path (owned) */
    char *tmp_path; /* path + ".tmp" (owned) */
    FILE *f;
    st_wtensor *t; /* declared tensors, n of them, capacity cap */
    size_t n, cap;
    json_t *names;  /* object used as a set of declared names */
    uint64_t total; /* bytes of the data section declared so far */
    int begun;      /* header written */
    size_t next;    /* index of the tensor the next ds_st_writer_data call must hold */
    int err;        /* first error (sticky) */
};

static char *dup_str(const char *s) {
    size_t n = strlen(s) + 1;
    char *p = malloc(n);
    if (p) memcpy(p, s, n);
    return p;
}

/* "BF16 [3, 4]" for messages. */
static void shape_str(const st_wtensor *t, char *buf, size_t cap) {
    size_t off = (size_t)snprintf(buf, cap, "%s [", ds_dtype_name(t->dtype));
    for (int i = 0; i < t->ndim && off < cap; i++)
        off +=
            (size_t)snprintf(buf + off, cap - off, "%s%lld", i ? ", " : "", (long long)t->shape[i]);
    if (off < cap) snprintf(buf + off, cap - off, "]");
}

static int fail(ds_st_writer *w, int err) {
    if (!w->err) w->err = err;
    return w->err;
}

int ds_st_writer_open(const char *path, ds_st_writer **out) {
    *out = NULL;
    if (!path || !*path) return ds_err_set(DS_ERR_ARG, "safetensors writer: empty path");
    ds_st_writer *w = calloc(1, sizeof *w);
    if (!w) return ds_err_set(DS_ERR_NOMEM, "%s: out of memory", path);
    size_t n = strlen(path);
    w->path = dup_str(path);
    w->tmp_path = malloc(n + 5);
    w->names = json_object();
    if (!w->path || !w->tmp_path || !w->names) {
        free(w->path);
        free(w->tmp_path);
        json_decref(w->names);
        free(w);
        return ds_err_set(DS_ERR_NOMEM, "%s: out of memory", path);
    }
    memcpy(w->tmp_path, path, n);
    memcpy(w->tmp_path + n, ".tmp", 5);
    w->f = fopen(w->tmp_path, "wb");
    if (!w->f) {
        int e = errno;
        ds_err_set(DS_ERR_IO, "%s: cannot create: %s", w->tmp_path, strerror(e));
        free(w->path);
        free(w->tmp_path);
        json_decref(w->names);
        free(w);
        return DS_ERR_IO;
    }
    *out = w;
    return DS_OK;
}

int ds_st_writer_add(ds_st_writer *w, const char *name, ds_dtype dtype, int ndim,
                     const int64_t *shape) {
    if (w->err) return w->err;
    if (w->begun)
        return fail(w, ds_err_set(DS_ERR_ARG,
                                  "%s: tensor '%s' declared after the header was "
                                  "written",
                                  w->path, name ? name : "(null)"));
    if (!name || !*name || strcmp(name, "__metadata__") == 0)
        return fail(w, ds_err_set(DS_ERR_ARG, "%s: invalid tensor name '%s'", w->path,
                                  name ? name : "(null)"));
    if ((unsigned)dtype >= DS_DTYPE_COUNT)
        return fail(w, ds_err_set(DS_ERR_ARG, "%s: tensor '%s': invalid dtype %d", w->path, name,
                                  (int)dtype));
    if (ndim < 0 || ndim > DS_ST_MAX_DIMS || (ndim > 0 && !shape))
        return fail(w, ds_err_set(DS_ERR_ARG, "%s: tensor '%s': %d dimensions (at most %d)",
                                  w->path, name, ndim, DS_ST_MAX_DIMS));
    if (json_object_get(w->names, name))
        return fail(w, ds_err_set(DS_ERR_ARG, "%s: tensor '%s' declared twice", w->path, name));

    st_wtensor t = {0};
    t.dtype = dtype;
    t.ndim = ndim;
    uint64_t numel = 1;
    for (int i = 0; i < ndim; i++) {
        if (shape[i] < 0)
            return fail(w, ds_err_set(DS_ERR_ARG, "%s: tensor '%s': negative dimension %lld",
                                      w->path, name, (long long)shape[i]));
        t.shape[i] = shape[i];
        if (!ds_mul_ok(numel, (uint64_t)shape[i], &numel))
            return fail(w, ds_err_set(DS_ERR_RANGE, "%s: tensor '%s': element count overflows",
                                      w->path, name));
    }
    if (!ds_mul_ok(numel, ds_dtype_size(dtype), &t.nbytes) || w->total + t.nbytes < w->total)
        return fail(
            w, ds_err_set(DS_ERR_RANGE, "%s: tensor '%s': byte count overflows", w->path, name));
    if (w->n == w->cap) {
        size_t cap = w->cap ? 2 * w->cap : 64;
        st_wtensor *nt = realloc(w->t, cap * sizeof *nt);
        if (!nt) return fail(w, ds_err_set(DS_ERR_NOMEM, "%s: out of memory", w->path));
        w->t = nt;
        w->cap = cap;
    }
    t.name = dup_str(name);
    if (!t.name || json_object_set_new(w->names, name, json_true()) != 0) {
        free(t.name);
        return fail(w, ds_err_set(DS_ERR_NOMEM, "%s: out of memory", w->path));
    }
    w->total += t.nbytes;
    w->t[w->n++] = t;
    return DS_OK;
}

/* The header object in declaration order (jansson keeps insertion order when dumping). */
static json_t *build_header(const ds_st_writer *w) {
    json_t *h = json_object(), *meta = json_object();
    if (!h || !meta || json_object_set_new(meta, "format", json_string("pt")) ||
        json_object_set_new(h, "__metadata__", meta)) {
        json_decref(h);
        return NULL;
    }
    uint64_t off = 0;
    for (size_t i = 0; i < w->n; i++) {
        const st_wtensor *t = &w->t[i];
        json_t *e = json_object(), *shape = json_array(), *offs = json_array();
        int bad = !e || !shape || !offs;
        for (int d = 0; !bad && d < t->ndim; d++)
            bad |= json_array_append_new(shape, json_integer((json_int_t)t->shape[d]));
        if (!bad) {
            bad |= json_array_append_new(offs, json_integer((json_int_t)off));
            bad |= json_array_append_new(offs, json_integer((json_int_t)(off + t->nbytes)));
            bad |= json_object_set_new(e, "dtype", json_string(ds_dtype_name(t->dtype)));
            bad |= json_object_set_new(e, "shape", shape);
            shape = NULL;
            bad |= json_object_set_new(e, "data_offsets", offs);
            offs = NULL;
            bad |= json_object_set_new(h, t->name, e);
            e = NULL;
        }
        json_decref(shape);
        json_decref(offs);
        json_decref(e);
        if (bad) {
            json_decref(h);
            return NULL;
        }
        off += t->nbytes;
    }
    return h;
}

int ds_st_writer_begin_data(ds_st_writer *w) {
    if (w->err) return w->err;
    if (w->begun) return fail(w, ds_err_set(DS_ERR_ARG, "%s: header already written", w->path));
    json_t *h = build_header(w);
    char *js = h ? json_dumps(h, JSON_COMPACT | JSON_PRESERVE_ORDER | JSON_ENSURE_ASCII) : NULL;
    json_decref(h);
    if (!js) return fail(w, ds_err_set(DS_ERR_NOMEM, "%s: cannot build the header", w->path));
    size_t len = strlen(js);
    size_t padded = (len + 7) & ~(size_t)7; /* 8 + padded is then a multiple of 8 */
    uint8_t le[8];
    for (int i = 0; i < 8; i++) le[i] = (uint8_t)((uint64_t)padded >> (8 * i));
    int ok = fwrite(le, 1, 8, w->f) == 8 && fwrite(js, 1, len, w->f) == len;
    for (size_t i = len; ok && i < padded; i++) ok = fputc(' ', w->f) != EOF;
    free(js);
    if (!ok)
        return fail(w, ds_err_set(DS_ERR_IO, "%s: write failed: %s", w->tmp_path, strerror(errno)));
    w->begun = 1;
    return DS_OK;
}

int ds_st_writer_data(ds_st_writer *w, const void *data, uint64_t nbytes) {
    if (w->err) return w->err;
    if (!w->begun)
        return fail(
            w, ds_err_set(DS_ERR_ARG, "%s: tensor data before ds_st_writer_begin_data", w->path));
    if (w->next >= w->n)
        return fail(w, ds_err_set(DS_ERR_ARG,
                                  "%s: more tensor data than the %zu declared "
                                  "tensors",
                                  w->path, w->n));
    const st_wtensor *t = &w->t[w->next];
    if (nbytes != t->nbytes) {
        char sh[256];
        shape_str(t, sh, sizeof sh);
        return fail(w, ds_err_set(DS_ERR_SHAPE, "%s: tensor '%s' (%s) needs %llu bytes, got %llu",
                                  w->path, t->name, sh, (unsigned long long)t->nbytes,
                                  (unsigned long long)nbytes));
    }
    if (nbytes && (!data || fwrite(data, 1, (size_t)nbytes, w->f) != nbytes))
        return fail(w, ds_err_set(DS_ERR_IO, "%s: writing tensor '%s' failed: %s", w->tmp_path,
                                  t->name, data ? strerror(errno) : "no data"));
    w->next++;
    return DS_OK;
}

static int want_fsync(void) {
    const char *s = getenv("DSINFER_FSYNC");
    return s && *s && strcmp(s, "0") != 0;
}

int ds_st_writer_close(ds_st_writer *w) {
    if (!w) return DS_OK;
    /* A file with no tensors is still a valid file: write its header now. */
    if (!w->err && !w->begun && w->n == 0) ds_st_writer_begin_data(w);
    if (!w->err && w->next < w->n) {
        if (!w->begun)
            fail(w, ds_err_set(DS_ERR_ARG, "%s: closed before the header was written", w->path));
        else
            fail(w, ds_err_set(DS_ERR_ARG, "%s: closed with tensor '%s' and %zu more unwritten",
                               w->path, w->t[w->next].name, w->n - w->next - 1));
    }
    if (!w->err && fflush(w->f) != 0)
        fail(w, ds_err_set(DS_ERR_IO, "%s: write failed: %s", w->tmp_path, strerror(errno)));
    if (!w->err && want_fsync() && fsync(fileno(w->f)) != 0)
        fail(w, ds_err_set(DS_ERR_IO, "%s: fsync failed: %s", w->tmp_path, strerror(errno)));
    if (fclose(w->f) != 0 && !w->err)
        fail(w, ds_err_set(DS_ERR_IO, "%s: close failed: %s", w->tmp_path, strerror(errno)));
    if (!w->err && rename(w->tmp_path, w->path) != 0)
        fail(w, ds_err_set(DS_ERR_IO, "%s: cannot rename to %s: %s", w->tmp_path, w->path,
                           strerror(errno)));
    if (w->err) unlink(w->tmp_path);
    int err = w->err;
    for (size_t i = 0; i < w->n; i++) free(w->t[i].name);
    free(w->t);
    json_decref(w->names);
    free(w->path);
    free(w->tmp_path);
    free(w);
    return err;
}
