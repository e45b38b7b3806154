/* safetensors reader.
 *
 * A safetensors file is an 8-byte little-endian header length N, N bytes of JSON describing
 * every tensor (dtype, shape, [begin, end) relative to the data section), then the data. The
 * bytes come from disk and may be truncated, corrupt or hostile, so nothing in the header is
 * trusted until it has been checked against the file: every size computation is guarded
 * against overflow, every range must lie inside the data section, byte lengths must equal
 * dtype x shape, and ranges may not overlap (two tensors aliasing the same bytes is never
 * legitimate and would hide a corrupt file). Only then are tensors handed out, as views into a
 * read-only private mapping. A model then loads the tensors it uses into memory of their own at
 * the same addresses (ds_st_load_used), read once from the file. */
#include "io/io.h"

#include <dirent.h>

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

/* The reference implementation refuses headers over 100 MB; a 671B checkpoint's largest shard
 * header is well under 1 MB. */
#define ST_MAX_HEADER ((uint64_t)100 << 20)

static int cmp_offset(const void *a, const void *b) {
    const ds_st_tensor *x = a, *y = b;
    return x->offset < y->offset ? -1 : x->offset > y->offset ? 1 : 0;
}

static int get_u64(const json_t *v, uint64_t *out) {
    if (!json_is_integer(v) || json_integer_value(v) < 0) return 0;
    *out = (uint64_t)json_integer_value(v);
    return 1;
}

/* Validates one header entry and fills *t; data pointers are set by the caller. */
static int parse_entry(const char *label, const char *name, json_t *v, uint64_t data_len,
                       ds_st_tensor *t) {
    if (!json_is_object(v))
        return ds_err_set(DS_ERR_FORMAT, "%s: tensor '%s': header entry is not an object", label,
                          name);
    json_t *dt = json_object_get(v, "dtype"), *shape = json_object_get(v, "shape"),
           *offs = json_object_get(v, "data_offsets");
    if (!json_is_string(dt))
        return ds_err_set(DS_ERR_FORMAT, "%s: tensor '%s': missing or non-string \"dtype\"", label,
                          name);
    int dtype = ds_dtype_parse(json_string_value(dt));
    if (dtype < 0)
        return ds_err_set(DS_ERR_UNSUPPORTED, "%s: tensor '%s': unknown dtype \"%s\"", label, name,
                          json_string_value(dt));
    if (!json_is_array(shape))
        return ds_err_set(DS_ERR_FORMAT, "%s: tensor '%s': missing or non-array \"shape\"", label,
                          name);
    if (json_array_size(shape) > DS_ST_MAX_DIMS)
        return ds_err_set(DS_ERR_UNSUPPORTED, "%s: tensor '%s': %zu dimensions (at most %d)", label,
                          name, json_array_size(shape), DS_ST_MAX_DIMS);
    if (!json_is_array(offs) || json_array_size(offs) != 2)
        return ds_err_set(DS_ERR_FORMAT,
                          "%s: tensor '%s': \"data_offsets\" must be an array [begin, end]", label,
                          name);
    t->name = name;
    t->dtype = (ds_dtype)dtype;
    t->ndim = (int)json_array_size(shape);
    uint64_t numel = 1;
    for (int d = 0; d < t->ndim; d++) {
        uint64_t dim;
        if (!get_u64(json_array_get(shape, (size_t)d), &dim) || dim > INT64_MAX)
            return ds_err_set(DS_ERR_FORMAT,
                              "%s: tensor '%s': shape[%d] is not a non-negative integer", label,
                              name, d);
        t->shape[d] = (int64_t)dim;
        if (!ds_mul_ok(numel, dim, &numel))
            return ds_err_set(DS_ERR_FORMAT, "%s: tensor '%s': shape overflows", label, name);
    }
    uint64_t need, begin, end;
    if (!ds_mul_ok(numel, ds_dtype_size(t->dtype), &need))
        return ds_err_set(DS_ERR_FORMAT, "%s: tensor '%s': shape overflows", label, name);
    if (!get_u64(json_array_get(offs, 0), &begin) || !get_u64(json_array_get(offs, 1), &end))
        return ds_err_set(DS_ERR_FORMAT,
                          "%s: tensor '%s': data_offsets are not non-negative integers", label,
                          name);
    if (end < begin)
        return ds_err_set(DS_ERR_FORMAT,
                          "%s: tensor '%s': data_offsets [%llu, %llu] end before begin", label,
                          name, (unsigned long long)begin, (unsigned long long)end);
    if (end - begin != need)
        return ds_err_set(DS_ERR_SHAPE,
                          "%s: tensor '%s': data_offsets [%llu, %llu] hold %llu bytes but %s x "
                          "shape needs %llu",
                          label, name, (unsigned long long)begin, (unsigned long long)end,
                          (unsigned long long)(end - begin), ds_dtype_name(t->dtype),
                          (unsigned long long)need);
    if (end > data_len)
        return ds_err_set(DS_ERR_FORMAT,
                          "%s: tensor '%s': data_offsets [%llu, %llu] run past the end of the data "
                          "section (%llu bytes; file truncated?)",
                          label, name, (unsigned long long)begin, (unsigned long long)end,
                          (unsigned long long)data_len);
    t->offset = begin; /* made absolute by the caller */
    t->nbytes = need;
    return DS_OK;
}

int ds_st_parse(const uint8_t *buf, uint64_t len, const char *label, ds_st_header *out) {
    memset(out, 0, sizeof *out);
    if (len < 8)
        return ds_err_set(DS_ERR_FORMAT, "%s: %llu bytes, too short for a safetensors header",
                          label, (unsigned long long)len);
    uint64_t n = 0;
    for (int i = 7; i >= 0; i--) n = (n << 8) | buf[i];
    if (n > len - 8)
        return ds_err_set(DS_ERR_FORMAT,
                          "%s: header length %llu exceeds the file size %llu (truncated or not a "
                          "safetensors file)",
                          label, (unsigned long long)n, (unsigned long long)len);
    if (n > ST_MAX_HEADER)
        return ds_err_set(DS_ERR_FORMAT, "%s: header length %llu exceeds the 100 MB limit", label,
                          (unsigned long long)n);
    if (n < 2 || buf[8] != '{')
        return ds_err_set(DS_ERR_FORMAT, "%s: header does not start with a JSON object", label);

    json_error_t jerr;
    json_t *root = json_loadb((const char *)buf + 8, (size_t)n, JSON_REJECT_DUPLICATES, &jerr);
    if (!root)
        return ds_err_set(DS_ERR_FORMAT, "%s: header is not valid JSON: %s (line %d, column %d)",
                          label, jerr.text, jerr.line, jerr.column);
    if (!json_is_object(root)) {
        json_decref(root);
        return ds_err_set(DS_ERR_FORMAT, "%s: header is not a JSON object", label);
    }
    out->header = root;
    out->data_start = 8 + n;
    out->path = strdup(label);
    size_t cap = json_object_size(root);
    out->tensors = calloc(cap ? cap : 1, sizeof *out->tensors);
    if (!out->path || !out->tensors) {
        ds_st_header_free(out);
        return ds_err_set(DS_ERR_NOMEM, "%s: out of memory reading the header", label);
    }
    uint64_t data_len = len - out->data_start;
    const char *key;
    json_t *v;
    json_object_foreach(root, key, v) {
        if (strcmp(key, "__metadata__") == 0) {
            if (!json_is_object(v)) {
                ds_st_header_free(out);
                return ds_err_set(DS_ERR_FORMAT, "%s: __metadata__ is not an object", label);
            }
            continue;
        }
        ds_st_tensor *t = &out->tensors[out->n_tensors];
        int rc = parse_entry(label, key, v, data_len, t);
        if (rc) {
            ds_st_header_free(out);
            return rc;
        }
        t->data = buf + out->data_start + t->offset;
        t->offset += out->data_start;
        t->file = out->path;
        out->n_tensors++;
    }
    qsort(out->tensors, out->n_tensors, sizeof *out->tensors, cmp_offset);
    for (size_t i = 1; i < out->n_tensors; i++) {
        const ds_st_tensor *a = &out->tensors[i - 1], *b = &out->tensors[i];
        if (b->offset < a->offset + a->nbytes) {
            int rc =
                ds_err_set(DS_ERR_FORMAT, "%s: tensors '%s' and '%s' overlap in the data section",
                           label, a->name, b->name);
            ds_st_header_free(out);
            return rc;
        }
    }
    return DS_OK;
}

void ds_st_header_free(ds_st_header *h) {
    if (!h) return;
    free(h->tensors);
    free(h->path);
    if (h->header) json_decref(h->header);
    memset(h, 0, sizeof *h);
}

/* ---- mapped files and the name index ---- */

typedef struct {
    void *map;
    uint64_t len;
    int fd;                /* open while mapped: ds_st_check_unchanged fstat()s it */
    struct timespec mtime; /* when it was mapped */
    int loaded;            /* map holds the used tensors in memory (ds_st_load_used) */
    ds_st_header h;
} st_file;

struct ds_st_set {
    st_file *files;
    size_t n_files;
    const ds_st_tensor **all; /* every tensor of every file, in file order */
    size_t n_all;
    const ds_st_tensor **slots; /* open-addressing hash table, capacity a power of two */
    size_t cap;
};

static uint64_t hash_str(const char *s) {
    uint64_t h = 1469598103934665603ull;
    while (*s) h = (h ^ (uint8_t)*s++) * 1099511628211ull;
    return h;
}

static void unmap_file(st_file *f) {
    if (!f->map) return;
    ds_mapguard_remove(f->map);
    munmap(f->map, (size_t)f->len);
    close(f->fd);
    f->map = NULL;
}

static int map_file(const char *path, st_file *f) {
    memset(f, 0, sizeof *f);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return ds_err_set(DS_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return ds_err_set(DS_ERR_IO, "%s: not a regular file", path);
    }
    f->len = (uint64_t)st.st_size;
    if (f->len < 8) {
        close(fd);
        return ds_err_set(DS_ERR_FORMAT, "%s: %llu bytes, too short for a safetensors header", path,
                          (unsigned long long)f->len);
    }
    f->map = ds_map_aligned((size_t)f->len, fd); /* aligned for ds_st_load_used's 2 MiB pages */
    if (!f->map) {
        close(fd);
        return ds_err_set(DS_ERR_IO, "%s: mmap failed: %s", path, strerror(errno));
    }
    f->fd = fd;
    f->mtime = st.st_mtim;
    int rc = ds_st_parse(f->map, f->len, path, &f->h);
    if (rc) {
        unmap_file(f);
        return rc;
    }
    ds_mapguard_add(f->map, f->len);
    return rc;
}

int ds_st_check_unchanged(const ds_st_set *s) {
    for (size_t i = 0; s && i < s->n_files; i++) {
        const st_file *f = &s->files[i];
        struct stat st;
        if (fstat(f->fd, &st) != 0)
            return ds_err_set(DS_ERR_IO, "%s: cannot stat: %s", f->h.path, strerror(errno));
        if ((uint64_t)st.st_size != f->len)
            return ds_err_set(
                DS_ERR_IO, "%s changed on disk while in use: %llu bytes, %llu when loaded",
                f->h.path, (unsigned long long)st.st_size, (unsigned long long)f->len);
        if (st.st_mtim.tv_sec != f->mtime.tv_sec || st.st_mtim.tv_nsec != f->mtime.tv_nsec)
            return ds_err_set(DS_ERR_IO,
                              "%s changed on disk while in use: modified since it was loaded",
                              f->h.path);
    }
    return DS_OK;
}

static int set_build_index(ds_st_set *s) {
    size_t n = 0;
    for (size_t i = 0; i < s->n_files; i++) n += s->files[i].h.n_tensors;
    s->cap = 16;
    while (s->cap < 2 * n) s->cap *= 2;
    s->slots = calloc(s->cap, sizeof *s->slots);
    s->all = calloc(n ? n : 1, sizeof *s->all);
    if (!s->slots || !s->all) return ds_err_set(DS_ERR_NOMEM, "out of memory indexing tensors");
    for (size_t i = 0; i < s->n_files; i++) {
        for (size_t j = 0; j < s->files[i].h.n_tensors; j++) {
            const ds_st_tensor *t = &s->files[i].h.tensors[j];
            size_t k = (size_t)hash_str(t->name) & (s->cap - 1);
            while (s->slots[k]) {
                if (strcmp(s->slots[k]->name, t->name) == 0)
                    return ds_err_set(DS_ERR_FORMAT, "tensor '%s' appears in both %s and %s",
                                      t->name, s->slots[k]->file, t->file);
                k = (k + 1) & (s->cap - 1);
            }
            s->slots[k] = t;
            s->all[s->n_all++] = t;
        }
    }
    return DS_OK;
}

const ds_st_tensor *ds_st_find(const ds_st_set *s, const char *name) {
    size_t k = (size_t)hash_str(name) & (s->cap - 1);
    while (s->slots[k]) {
        if (strcmp(s->slots[k]->name, name) == 0) {
            ((ds_st_tensor *)s->slots[k])->found = 1; /* see ds_st_drop_range */
            return s->slots[k];
        }
        k = (k + 1) & (s->cap - 1);
    }
    return NULL;
}

size_t ds_st_count(const ds_st_set *s) {
    return s->n_all;
}
const ds_st_tensor *ds_st_at(const ds_st_set *s, size_t i) {
    return i < s->n_all ? s->all[i] : NULL;
}

void ds_st_close(ds_st_set *s) {
    if (!s) return;
    for (size_t i = 0; i < s->n_files; i++) {
        ds_st_header_free(&s->files[i].h);
        unmap_file(&s->files[i]);
    }
    free(s->files);
    free(s->all);
    free(s->slots);
    free(s);
}

/* Opens the given paths into a new set. */
static int open_paths(char **paths, size_t n, ds_st_set **out) {
    *out = NULL;
    ds_st_set *s = calloc(1, sizeof *s);
    if (!s || !(s->files = calloc(n ? n : 1, sizeof *s->files))) {
        free(s);
        return ds_err_set(DS_ERR_NOMEM, "out of memory opening checkpoint");
    }
    int rc = DS_OK;
    for (size_t i = 0; i < n && !rc; i++) {
        rc = map_file(paths[i], &s->files[i]);
        if (!rc) s->n_files++;
    }
    if (!rc) rc = set_build_index(s);
    if (rc) {
        ds_st_close(s);
        return rc;
    }
    *out = s;
    return DS_OK;
}

int ds_st_open_file(const char *path, ds_st_set **out) {
    char *p = (char *)path;
    return open_paths(&p, 1, out);
}

static char *join_path(const char *dir, const char *name) {
    size_t n = strlen(dir) + strlen(name) + 2;
    char *p = malloc(n);
    if (p) snprintf(p, n, "%s/%s", dir, name);
    return p;
}

/* A shard name from the index may not escape the model directory. */
static int safe_shard_name(const char *f) {
    if (!*f || f[0] == '/') return 0;
    for (const char *p = f; *p; p++)
        if (p[0] == '.' && p[1] == '.' && (p == f || p[-1] == '/') && (p[2] == 0 || p[2] == '/'))
            return 0;
    return 1;
}

json_t *ds_st_index_map(json_t *root) {
    json_t *wm = json_object_get(root, "weight_map");
    /* MindSpore's *_name_map.json may be the bare map (FORMATS-SPEC §2) */
    if (!wm && !json_object_get(root, "metadata")) wm = root;
    return json_is_object(wm) ? wm : NULL;
}

static int open_index(const char *dir, const char *index_path, ds_st_set **out) {
    json_t *root;
    int rc = ds_json_load_file(index_path, &root);
    if (rc) return rc;
    json_t *wm = ds_st_index_map(root);
    if (!wm) {
        json_decref(root);
        return ds_err_set(DS_ERR_FORMAT, "%s: no \"weight_map\" object", index_path);
    }
    /* Unique shard names, in first-seen order. */
    size_t n = 0, cap = 16;
    const char **names = malloc(cap * sizeof *names);
    char **paths = NULL;
    if (!names) rc = ds_err_set(DS_ERR_NOMEM, "out of memory reading %s", index_path);
    const char *key;
    json_t *v;
    json_object_foreach(wm, key, v) {
        if (rc) break;
        if (!json_is_string(v) || !safe_shard_name(json_string_value(v))) {
            rc = ds_err_set(DS_ERR_FORMAT, "%s: tensor '%s' maps to an invalid file name",
                            index_path, key);
            break;
        }
        const char *f = json_string_value(v);
        size_t i = 0;
        while (i < n && strcmp(names[i], f) != 0) i++;
        if (i < n) continue;
        if (n == cap) {
            const char **nn = realloc(names, 2 * cap * sizeof *names);
            if (!nn) {
                rc = ds_err_set(DS_ERR_NOMEM, "out of memory reading %s", index_path);
                break;
            }
            names = nn;
            cap *= 2;
        }
        names[n++] = f;
    }
    if (!rc && n == 0) rc = ds_err_set(DS_ERR_FORMAT, "%s: \"weight_map\" is empty", index_path);
    if (!rc && !(paths = calloc(n, sizeof *paths)))
        rc = ds_err_set(DS_ERR_NOMEM, "out of memory reading %s", index_path);
    for (size_t i = 0; !rc && i < n; i++) {
        paths[i] = join_path(dir, names[i]);
        if (!paths[i])
            rc = ds_err_set(DS_ERR_NOMEM, "out of memory reading %s", index_path);
        else if (access(paths[i], F_OK) != 0)
            rc = ds_err_set(DS_ERR_MISSING, "%s names shard '%s', which does not exist", index_path,
                            names[i]);
    }
    ds_st_set *s = NULL;
    if (!rc) rc = open_paths(paths, n, &s);
    /* Every entry of the index must be in the file it names. */
    json_object_foreach(wm, key, v) {
        if (rc) break;
        const ds_st_tensor *t = ds_st_find(s, key);
        const char *want = json_string_value(v);
        size_t wl = strlen(want), fl = t ? strlen(t->file) : 0;
        if (!t || fl < wl || strcmp(t->file + fl - wl, want) != 0)
            rc = ds_err_set(DS_ERR_MISSING, "%s says tensor '%s' is in '%s', but %s", index_path,
                            key, want, t ? "it is in another file" : "no shard holds it");
    }
    for (size_t i = 0; paths && i < n; i++) free(paths[i]);
    free(paths);
    free((void *)names);
    json_decref(root);
    if (rc) {
        ds_st_close(s);
        return rc;
    }
    *out = s;
    return DS_OK;
}

int ds_st_index_name(const char *dir, char **out) {
    *out = NULL;
    char *std = join_path(dir, "model.safetensors.index.json");
    if (!std) return ds_err_set(DS_ERR_NOMEM, "out of memory");
    int have_std = access(std, F_OK) == 0;
    free(std);
    if (have_std) {
        *out = strdup("model.safetensors.index.json");
        return *out ? DS_OK : ds_err_set(DS_ERR_NOMEM, "out of memory");
    }
    /* Other toolchains name their index freely (FORMATS-SPEC §1, §2): msModelSlim
     * quant_model_weight*.safetensors.index.json, MindSpore any *index.json with "quant" in the
     * name (one without names the float MTP weights) or *_name_map.json. */
    DIR *d = opendir(dir);
    if (!d) return DS_OK; /* open_dir reports the missing weights */
    char *any = NULL, *quant = NULL;
    int n_any = 0, n_quant = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        const char *f = e->d_name;
        if (f[0] == '.' ||
            !(ds_str_ends_with(f, "index.json") || ds_str_ends_with(f, "_name_map.json")))
            continue;
        char **slot = strstr(f, "quant") ? &quant : &any;
        int *cnt = strstr(f, "quant") ? &n_quant : &n_any;
        if (++*cnt == 1 || strcmp(f, *slot) < 0) { /* the first by name, for the message */
            free(*slot);
            *slot = strdup(f);
        }
    }
    closedir(d);
    int rc = DS_OK;
    if (n_quant > 1 || (!n_quant && n_any > 1))
        rc = ds_err_set(DS_ERR_FORMAT,
                        "%s: %d index files (e.g. '%s') and no model.safetensors.index.json: "
                        "which one describes the weights is ambiguous",
                        dir, n_quant > 1 ? n_quant : n_any, n_quant > 1 ? quant : any);
    else if (n_quant)
        *out = quant, quant = NULL;
    else
        *out = any, any = NULL;
    free(any);
    free(quant);
    return rc;
}

int ds_st_open_dir(const char *dir, ds_st_set **out) {
    *out = NULL;
    char *name, *index = NULL;
    int rc = ds_st_index_name(dir, &name);
    if (rc) return rc;
    char *single = join_path(dir, "model.safetensors");
    if (name) index = join_path(dir, name);
    if (!single || (name && !index))
        rc = ds_err_set(DS_ERR_NOMEM, "out of memory");
    else if (index)
        rc = open_index(dir, index, out);
    else if (access(single, F_OK) == 0)
        rc = ds_st_open_file(single, out);
    else
        rc = ds_err_set(DS_ERR_MISSING,
                        "%s: no model.safetensors.index.json or model.safetensors found", dir);
    free(name);
    free(index);
    free(single);
    return rc;
}

int ds_json_load_file(const char *path, json_t **out) {
    json_error_t jerr;
    *out = json_load_file(path, JSON_REJECT_DUPLICATES, &jerr);
    if (*out) return DS_OK;
    if (access(path, F_OK) != 0)
        return ds_err_set(DS_ERR_MISSING, "%s: cannot open: %s", path, strerror(errno));
    return ds_err_set(DS_ERR_FORMAT, "%s: invalid JSON: %s (line %d, column %d)", path, jerr.text,
                      jerr.line, jerr.column);
}

void ds_st_drop_range(const ds_st_tensor *t, const void *p, uint64_t n) {
    if (!t || !p || !n) return;
    ((ds_st_tensor *)t)->dropped = 1; /* the set's own tensor: const for its users only */
    const uintptr_t pg = (uintptr_t)sysconf(_SC_PAGESIZE);
    uintptr_t a = (uintptr_t)p & ~(pg - 1);
    uintptr_t b = ((uintptr_t)p + n + pg - 1) & ~(pg - 1);
    madvise((void *)a, b - a, MADV_DONTNEED);
}

void ds_st_drop_pages(const ds_st_tensor *t) {
    ds_st_drop_range(t, t ? t->data : NULL, t ? t->nbytes : 0);
}

/* Reads [off, off + n) of fd into p. */
static int read_range(int fd, unsigned char *p, uint64_t off, uint64_t n, const char *path) {
    while (n) {
        ssize_t r = pread(fd, p, n < ((uint64_t)1 << 30) ? (size_t)n : (size_t)1 << 30, (off_t)off);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0)
            return ds_err_set(DS_ERR_IO, "%s: cannot read %llu bytes at offset %llu: %s", path,
                              (unsigned long long)n, (unsigned long long)off,
                              r < 0 ? strerror(errno) : "unexpected end of file");
        p += r;
        off += (uint64_t)r;
        n -= (uint64_t)r;
    }
    return DS_OK;
}

static uint64_t file_used_bytes(const st_file *f) {
    uint64_t n = 0;
    for (size_t i = 0; i < f->h.n_tensors; i++)
        if (f->h.tensors[i].found && !f->h.tensors[i].dropped) n += f->h.tensors[i].nbytes;
    return n;
}

uint64_t ds_st_used_bytes(const ds_st_set *s) {
    uint64_t n = 0;
    for (size_t i = 0; i < s->n_files; i++) n += file_used_bytes(&s->files[i]);
    return n;
}

/* Weights on 2 MiB pages: a decode step reads every page of them once, and on 4 KiB pages each
 * is a TLB miss (a nested page walk on a VM) and a point where the hardware prefetcher stops.
 * Loaded, the medium test model decoded 4 - 17% faster in BF16 (by batch size, bench-model
 * medians of six alternating runs, 2-vCPU Zen 5 VM) and W8A8 4 - 9% (per-phase timer). Mapped file
 * pages would need the page cache to hold the file in 2 MiB folios, which few kernels and file
 * systems give (Linux 6.1's ext4 never). The tensors come from the file by pread, not through the
 * mapping, which would fault the file in 4 KiB pages first; with release_cache each tensor's page
 * cache is released once read, so a checkpoint too large to be held twice is resident once. The
 * memory replaces the mapping by mremap, which keeps the addresses and the 2 MiB pages (both
 * aligned: ds_map_aligned). */
static int load_file(st_file *f, int release_cache, uint64_t *bytes) {
    if (!file_used_bytes(f)) return DS_OK; /* nothing of this file is used: it stays mapped */
    const size_t len = (size_t)f->len;
    unsigned char *mem = ds_map_aligned(len, -1);
    if (!mem)
        return ds_err_set(DS_ERR_NOMEM, "%s: cannot allocate %zu bytes to load it: %s", f->h.path,
                          len, strerror(errno));
    int rc = DS_OK;
    for (size_t i = 0; i < f->h.n_tensors && !rc; i++) {
        ds_st_tensor *t = &f->h.tensors[i];
        if (!t->found || t->dropped) continue;
        rc = read_range(f->fd, mem + t->offset, t->offset, t->nbytes, f->h.path);
        if (release_cache)
            posix_fadvise(f->fd, (off_t)t->offset, (off_t)t->nbytes, POSIX_FADV_DONTNEED);
        if (!rc) *bytes += t->nbytes;
    }
    if (!rc && (mprotect(mem, len, PROT_READ) != 0 ||
                mremap(mem, len, len, MREMAP_MAYMOVE | MREMAP_FIXED, f->map) == MAP_FAILED))
        rc = ds_err_set(DS_ERR_NOMEM, "%s: cannot put the loaded weights in place: %s", f->h.path,
                        strerror(errno));
    if (rc) {
        munmap(mem, len);
        return rc;
    }
    for (size_t i = 0; i < f->h.n_tensors; i++) /* their bytes are now zeros */
        if (!f->h.tensors[i].found || f->h.tensors[i].dropped) f->h.tensors[i].data = NULL;
    f->loaded = 1;
    return DS_OK;
}

int ds_st_load_used(ds_st_set *s, int release_cache, uint64_t *bytes) {
    int rc = DS_OK;
    for (size_t i = 0; i < s->n_files && !rc; i++)
        rc = load_file(&s->files[i], release_cache, bytes);
    return rc;
}

int ds_st_loaded_writable(ds_st_set *s, int writable) {
    for (size_t i = 0; i < s->n_files; i++) {
        st_file *f = &s->files[i];
        if (f->loaded && mprotect(f->map, (size_t)f->len, PROT_READ | (writable ? PROT_WRITE : 0)))
            return ds_err_set(DS_ERR_IO, "%s: cannot change the loaded weights' protection: %s",
                              f->h.path, strerror(errno));
    }
    return DS_OK;
}
