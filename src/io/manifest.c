/* The SHA-256 manifest of a model directory (dsinfer-manifest.sha256): write, verify, digest.
 *
 * The format is sha256sum's, so the file is useful without dsinfer: one line "<64 hex>  <name>"
 * per file, sorted by name. Reading accepts what `sha256sum -c` accepts of it in practice
 * (upper-case hex, the binary-mode marker "<hex> *<name>", a last line without a newline, CRLF)
 * and refuses the rest by line number: names that are empty, absolute, step out of the directory
 * ("..") or use sha256sum's backslash escaping, and a name listed twice. The manifest is
 * untrusted bytes like any other file of the checkpoint.
 *
 * Hashing is the expensive part: a 671B checkpoint is ~700 GB in ~160 shards. Files are handed
 * out one at a time to the threads of a pool (a thread claims the next file when it finishes
 * one), each streamed in 1 MiB pieces (ds_sha256_file_cb), so memory stays at 1 MiB per thread
 * and the speed is the disk's or cores x SHA-256's, whichever is lower. The progress bar is
 * shared under a mutex; it moves once per MiB, which is far below contention. */
#include "io/io.h"

#include <dirent.h>
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* A manifest line is ~100 bytes, so this allows about 600,000 files. */
#define MF_MAX_BYTES ((uint64_t)64 << 20)

const char *ds_manifest_state_name(ds_manifest_state s) {
    switch (s) {
    case DS_MANIFEST_OK:
        return "ok";
    case DS_MANIFEST_MISMATCH:
        return "mismatch";
    case DS_MANIFEST_MISSING:
        return "missing";
    case DS_MANIFEST_UNREADABLE:
        return "unreadable";
    case DS_MANIFEST_UNLISTED:
        return "not in manifest";
    }
    return "?";
}

void ds_manifest_report_free(ds_manifest_report *r) {
    if (!r) return;
    for (size_t i = 0; i < r->n_files; i++) {
        free(r->files[i].name);
        free(r->files[i].error);
    }
    free(r->files);
    memset(r, 0, sizeof *r);
}

static char *path_join(const char *dir, const char *name) {
    size_t n = strlen(dir) + strlen(name) + 2;
    char *p = malloc(n);
    if (p) snprintf(p, n, "%s/%s", dir, name);
    return p;
}

static int cmp_str(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Appends a zeroed entry named `name` (copied); NULL when out of memory. */
static ds_manifest_file *add_file(ds_manifest_report *r, size_t *cap, const char *name) {
    if (r->n_files == *cap) {
        size_t nc = *cap ? 2 * *cap : 64;
        ds_manifest_file *nf = realloc(r->files, nc * sizeof *nf);
        if (!nf) return NULL;
        r->files = nf;
        *cap = nc;
    }
    ds_manifest_file *f = &r->files[r->n_files];
    memset(f, 0, sizeof *f);
    if (!(f->name = strdup(name))) return NULL;
    r->n_files++;
    return f;
}

/* The regular files of dir (symlinks followed: a Hugging Face cache links shards to blobs),
 * without dot files and the manifest, sorted. *names is malloc'd, as is each name. */
static int list_dir(const char *dir, char ***names, size_t *n) {
    *names = NULL;
    *n = 0;
    DIR *d = opendir(dir);
    if (!d) return ds_err_set(DS_ERR_IO, "%s: cannot list: %s", dir, strerror(errno));
    size_t cap = 0;
    int rc = DS_OK;
    struct dirent *e;
    while (!rc && (e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.' || strcmp(e->d_name, DS_MANIFEST_NAME) == 0) continue;
        char *p = path_join(dir, e->d_name);
        struct stat st;
        int regular = p && stat(p, &st) == 0 && S_ISREG(st.st_mode);
        free(p);
        if (!regular) continue;
        if (*n == cap) {
            cap = cap ? 2 * cap : 32;
            char **nn = realloc(*names, cap * sizeof *nn);
            if (!nn) {
                rc = ds_err_set(DS_ERR_NOMEM, "out of memory");
                break;
            }
            *names = nn;
        }
        if (!((*names)[*n] = strdup(e->d_name)))
            rc = ds_err_set(DS_ERR_NOMEM, "out of memory");
        else
            (*n)++;
    }
    closedir(d);
    if (!rc) qsort(*names, *n, sizeof **names, cmp_str);
    return rc;
}

static void free_names(char **names, size_t n) {
    for (size_t i = 0; i < n; i++) free(names[i]);
    free(names);
}

/* ---- hashing on a pool ---- */

typedef struct {
    const char *dir;
    ds_manifest_file *files;
    const char *todo; /* todo[i]: hash files[i] */
    size_t n;
    atomic_size_t next;
    pthread_mutex_t lock;
    ds_progress pb;
} mf_job;

static void on_bytes(void *ctx, uint64_t n) {
    mf_job *j = ctx;
    pthread_mutex_lock(&j->lock);
    ds_progress_add(&j->pb, n);
    pthread_mutex_unlock(&j->lock);
}

static void hash_slice(void *ctx, int slice, int n_slices) {
    (void)slice, (void)n_slices;
    mf_job *j = ctx;
    for (;;) {
        size_t k = atomic_fetch_add(&j->next, 1);
        if (k >= j->n) return;
        if (!j->todo[k]) continue;
        ds_manifest_file *f = &j->files[k];
        char *p = path_join(j->dir, f->name);
        int rc = p ? ds_sha256_file_cb(p, f->got, on_bytes, j)
                   : ds_err_set(DS_ERR_NOMEM, "%s: out of memory", f->name);
        free(p);
        if (rc) {
            /* the message is this thread's; keep a copy (NULL after a failed strdup: the state
             * still says what happened) */
            f->error = strdup(ds_err_msg());
            if (f->state != DS_MANIFEST_UNLISTED) f->state = DS_MANIFEST_UNREADABLE;
            continue;
        }
        f->hashed = 1;
        if (f->state == DS_MANIFEST_OK && memcmp(f->got, f->want, 32) != 0)
            f->state = DS_MANIFEST_MISMATCH;
    }
}

/* Hashes the files marked in todo; per-file failures land in the entries. */
static int hash_files(const char *dir, ds_manifest_file *files, const char *todo, size_t n,
                      int n_threads, uint64_t *bytes) {
    size_t n_todo = 0;
    uint64_t total = 0;
    for (size_t i = 0; i < n; i++)
        if (todo[i]) n_todo++, total += files[i].size;
    *bytes = total;
    if (n_todo == 0) return DS_OK;
    if (n_threads <= 0) {
        long cpus = sysconf(_SC_NPROCESSORS_ONLN);
        n_threads = cpus > 0 ? (int)cpus : 1;
    }
    if ((size_t)n_threads > n_todo) n_threads = (int)n_todo;
    ds_pool *pool = ds_pool_open(n_threads);
    if (!pool) return ds_err_wrap(DS_ERR_NOMEM, "sha256 threads");
    mf_job j = {.dir = dir, .files = files, .todo = todo, .n = n};
    atomic_init(&j.next, 0);
    pthread_mutex_init(&j.lock, NULL);
    ds_progress_begin(&j.pb, "sha256", total);
    ds_pool_run(pool, hash_slice, &j);
    ds_progress_end(&j.pb);
    pthread_mutex_destroy(&j.lock);
    ds_pool_close(pool);
    return DS_OK;
}

/* The manifest text of r's files as they are; see ds_manifest_report.digest. With f not NULL
 * the lines are also written there. */
static int digest_text(const ds_manifest_report *r, FILE *f, uint8_t out[32]) {
    ds_sha256 *h = NULL;
    int rc = ds_sha256_open(&h);
    char line[160];
    for (size_t i = 0; !rc && i < r->n_files; i++) {
        const ds_manifest_file *e = &r->files[i];
        if (e->state == DS_MANIFEST_UNLISTED && !e->hashed) continue;
        char hex[65] = "-";
        if (e->hashed) ds_sha256_hex(e->got, hex);
        int n = snprintf(line, sizeof line, "%s  ", hex);
        rc = ds_sha256_update(h, line, (size_t)n);
        if (!rc) rc = ds_sha256_update(h, e->name, strlen(e->name));
        if (!rc) rc = ds_sha256_update(h, "\n", 1);
        if (!rc && f && fprintf(f, "%s%s\n", line, e->name) < 0)
            rc = ds_err_set(DS_ERR_IO, "write failed: %s", strerror(errno));
    }
    if (!rc) rc = ds_sha256_final(h, out);
    ds_sha256_close(h);
    return rc;
}

int ds_manifest_write(const char *dir, int n_threads, ds_manifest_report *out) {
    if (out) memset(out, 0, sizeof *out);
    ds_manifest_report r = {0};
    char **names = NULL, *todo = NULL, *tmp = NULL, *final = NULL;
    size_t n = 0, cap = 0;
    int rc = list_dir(dir, &names, &n);
    for (size_t i = 0; !rc && i < n; i++) {
        /* sha256sum escapes these, and the reader refuses escaped lines */
        if (strpbrk(names[i], "\n\\")) {
            rc = ds_err_set(DS_ERR_UNSUPPORTED,
                            "%s: file name '%s' holds a newline or backslash, which the manifest "
                            "cannot list",
                            dir, names[i]);
            break;
        }
        ds_manifest_file *f = add_file(&r, &cap, names[i]);
        char *p = path_join(dir, names[i]);
        struct stat st;
        if (!f || !p)
            rc = ds_err_set(DS_ERR_NOMEM, "out of memory");
        else if (stat(p, &st) != 0)
            rc = ds_err_set(DS_ERR_IO, "%s: cannot stat: %s", p, strerror(errno));
        else
            f->size = (uint64_t)st.st_size;
        free(p);
    }
    if (!rc && !(todo = malloc(r.n_files ? r.n_files : 1)))
        rc = ds_err_set(DS_ERR_NOMEM, "out of memory");
    if (!rc) {
        memset(todo, 1, r.n_files);
        rc = hash_files(dir, r.files, todo, r.n_files, n_threads, &r.bytes_hashed);
    }
    /* every file must hash: a manifest with holes would bless what nobody read */
    for (size_t i = 0; !rc && i < r.n_files; i++)
        if (!r.files[i].hashed)
            rc = ds_err_set(DS_ERR_IO, "%s", r.files[i].error ? r.files[i].error : "read failed");
    for (size_t i = 0; !rc && i < r.n_files; i++) {
        memcpy(r.files[i].want, r.files[i].got, 32);
        r.files[i].state = DS_MANIFEST_OK;
    }
    r.present = 1;
    r.n_ok = r.n_files;
    /* the text goes to a dot file (not listed by a concurrent writer) renamed into place */
    char tname[64];
    snprintf(tname, sizeof tname, "." DS_MANIFEST_NAME ".tmp-%ld", (long)getpid());
    if (!rc && (!(tmp = path_join(dir, tname)) || !(final = path_join(dir, DS_MANIFEST_NAME))))
        rc = ds_err_set(DS_ERR_NOMEM, "out of memory");
    if (!rc) {
        FILE *f = fopen(tmp, "w");
        if (!f) {
            rc = ds_err_set(DS_ERR_IO, "%s: cannot create: %s", tmp, strerror(errno));
        } else {
            rc = digest_text(&r, f, r.digest);
            if (rc) ds_err_wrap(rc, "%s", tmp);
            if (fclose(f) != 0 && !rc)
                rc = ds_err_set(DS_ERR_IO, "%s: write failed: %s", tmp, strerror(errno));
            if (!rc && rename(tmp, final) != 0)
                rc = ds_err_set(DS_ERR_IO, "%s: cannot rename to %s: %s", tmp, final,
                                strerror(errno));
            if (rc) unlink(tmp);
        }
    }
    free(tmp);
    free(final);
    free(todo);
    free_names(names, n);
    if (rc || !out)
        ds_manifest_report_free(&r);
    else
        *out = r;
    return rc;
}

/* ---- reading a manifest ---- */

static int hexval(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* A listed name may not be empty, absolute, or step out of the directory. */
static int safe_name(const char *f) {
    if (!*f || f[0] == '/') return 0;
    for (const char *p = f; *p; p++)
        if (p[0] == '.' && p[1] == '.' && (p == f || p[-1] == '/') && (p[2] == 0 || p[2] == '/'))
            return 0;
    return 1;
}

/* Parses the manifest text (NUL-terminated, len bytes) into r's listed entries. */
static int parse_manifest(const char *path, char *text, size_t len, ds_manifest_report *r,
                          size_t *cap) {
    size_t lineno = 0;
    for (char *p = text; p < text + len;) {
        char *nl = memchr(p, '\n', (size_t)(text + len - p));
        char *end = nl ? nl : text + len;
        lineno++;
        if (end > p && end[-1] == '\r') end--;
        size_t l = (size_t)(end - p);
        if (memchr(p, 0, l))
            return ds_err_set(DS_ERR_FORMAT, "%s: line %zu: NUL byte", path, lineno);
        if (l == 0 && !nl) break; /* nothing after the last newline */
        if (p[0] == '\\')
            return ds_err_set(DS_ERR_FORMAT,
                              "%s: line %zu: escaped file names (a backslash or newline in the "
                              "name) are not supported",
                              path, lineno);
        uint8_t want[32];
        int ok = l >= 67 && p[64] == ' ' && (p[65] == ' ' || p[65] == '*');
        for (int i = 0; ok && i < 32; i++) {
            int hi = hexval(p[2 * i]), lo = hexval(p[2 * i + 1]);
            ok = hi >= 0 && lo >= 0;
            want[i] = (uint8_t)(hi << 4 | lo);
        }
        if (!ok)
            return ds_err_set(DS_ERR_FORMAT,
                              "%s: line %zu is not \"<64 hex digits>  <file name>\" (sha256sum's "
                              "format)",
                              path, lineno);
        *end = 0; /* the name ends the line */
        const char *name = p + 66;
        if (!safe_name(name))
            return ds_err_set(DS_ERR_FORMAT,
                              "%s: line %zu: file name '%s' is empty, absolute or leaves the "
                              "directory",
                              path, lineno, name);
        ds_manifest_file *f = add_file(r, cap, name);
        if (!f) return ds_err_set(DS_ERR_NOMEM, "out of memory reading %s", path);
        memcpy(f->want, want, 32);
        f->state = DS_MANIFEST_OK; /* until hashed or found missing */
        if (!nl) break;
        p = nl + 1;
    }
    /* duplicates: sort pointers to the names */
    const char **sorted = malloc((r->n_files ? r->n_files : 1) * sizeof *sorted);
    if (!sorted) return ds_err_set(DS_ERR_NOMEM, "out of memory reading %s", path);
    for (size_t i = 0; i < r->n_files; i++) sorted[i] = r->files[i].name;
    qsort(sorted, r->n_files, sizeof *sorted, cmp_str);
    int rc = DS_OK;
    for (size_t i = 1; !rc && i < r->n_files; i++)
        if (!strcmp(sorted[i - 1], sorted[i]))
            rc = ds_err_set(DS_ERR_FORMAT, "%s: '%s' is listed twice", path, sorted[i]);
    free(sorted);
    return rc;
}

static int read_small_file(const char *path, char **text, size_t *len) {
    *text = NULL;
    FILE *f = fopen(path, "rb");
    if (!f) return ds_err_set(DS_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    struct stat st;
    int rc = DS_OK;
    if (fstat(fileno(f), &st) != 0 || !S_ISREG(st.st_mode))
        rc = ds_err_set(DS_ERR_IO, "%s: not a regular file", path);
    else if ((uint64_t)st.st_size > MF_MAX_BYTES)
        rc = ds_err_set(DS_ERR_FORMAT, "%s: %lld bytes, more than a manifest can be (64 MiB)", path,
                        (long long)st.st_size);
    else if (!(*text = malloc((size_t)st.st_size + 1)))
        rc = ds_err_set(DS_ERR_NOMEM, "out of memory reading %s", path);
    else {
        *len = fread(*text, 1, (size_t)st.st_size, f);
        if (*len != (size_t)st.st_size)
            rc = ds_err_set(DS_ERR_IO, "%s: read failed", path);
        else
            (*text)[*len] = 0;
    }
    fclose(f);
    if (rc) {
        free(*text);
        *text = NULL;
    }
    return rc;
}

int ds_manifest_verify(const char *dir, int n_threads, int hash_unlisted, ds_manifest_report *out) {
    memset(out, 0, sizeof *out);
    ds_manifest_report r = {0};
    size_t cap = 0, n_names = 0;
    char **names = NULL, *todo = NULL, *text = NULL;
    const char **listed = NULL;
    char *mpath = path_join(dir, DS_MANIFEST_NAME);
    int rc = mpath ? DS_OK : ds_err_set(DS_ERR_NOMEM, "out of memory");
    struct stat st;
    if (!rc && stat(mpath, &st) == 0) {
        size_t len = 0;
        r.present = 1;
        rc = read_small_file(mpath, &text, &len);
        if (!rc) rc = parse_manifest(mpath, text, len, &r, &cap);
    } else if (!rc && errno != ENOENT) {
        rc = ds_err_set(DS_ERR_IO, "%s: %s", mpath, strerror(errno));
    }
    /* the listed files as they are on disk */
    for (size_t i = 0; !rc && i < r.n_files; i++) {
        ds_manifest_file *f = &r.files[i];
        char *p = path_join(dir, f->name);
        if (!p) {
            rc = ds_err_set(DS_ERR_NOMEM, "out of memory");
        } else if (stat(p, &st) != 0) {
            if (errno == ENOENT || errno == ENOTDIR) {
                f->state = DS_MANIFEST_MISSING;
            } else {
                f->state = DS_MANIFEST_UNREADABLE;
                ds_err_set(DS_ERR_IO, "%s: %s", p, strerror(errno));
                f->error = strdup(ds_err_msg());
            }
        } else if (!S_ISREG(st.st_mode)) {
            f->state = DS_MANIFEST_UNREADABLE;
            ds_err_set(DS_ERR_IO, "%s: not a regular file", p);
            f->error = strdup(ds_err_msg());
        } else {
            f->size = (uint64_t)st.st_size;
        }
        free(p);
    }
    /* the files present but not listed */
    size_t n_listed = r.n_files;
    if (!rc) rc = list_dir(dir, &names, &n_names);
    if (!rc && !(listed = malloc((n_listed ? n_listed : 1) * sizeof *listed)))
        rc = ds_err_set(DS_ERR_NOMEM, "out of memory");
    if (!rc) {
        for (size_t i = 0; i < n_listed; i++) listed[i] = r.files[i].name;
        qsort(listed, n_listed, sizeof *listed, cmp_str);
    }
    for (size_t i = 0; !rc && i < n_names; i++) {
        const char *key = names[i];
        if (bsearch(&key, listed, n_listed, sizeof *listed, cmp_str)) continue;
        ds_manifest_file *f = add_file(&r, &cap, names[i]);
        char *p = path_join(dir, names[i]);
        if (!f || !p)
            rc = ds_err_set(DS_ERR_NOMEM, "out of memory");
        else {
            f->state = DS_MANIFEST_UNLISTED;
            if (stat(p, &st) == 0) f->size = (uint64_t)st.st_size;
        }
        free(p);
    }
    if (!rc && !(todo = calloc(r.n_files ? r.n_files : 1, 1)))
        rc = ds_err_set(DS_ERR_NOMEM, "out of memory");
    for (size_t i = 0; !rc && i < r.n_files; i++) {
        const ds_manifest_file *f = &r.files[i];
        todo[i] = f->state == DS_MANIFEST_OK || (f->state == DS_MANIFEST_UNLISTED && hash_unlisted);
    }
    if (!rc) rc = hash_files(dir, r.files, todo, r.n_files, n_threads, &r.bytes_hashed);
    for (size_t i = 0; !rc && i < r.n_files; i++) {
        switch (r.files[i].state) {
        case DS_MANIFEST_OK:
            r.n_ok++;
            break;
        case DS_MANIFEST_MISMATCH:
            r.n_mismatch++;
            break;
        case DS_MANIFEST_MISSING:
            r.n_missing++;
            break;
        case DS_MANIFEST_UNREADABLE:
            r.n_unreadable++;
            break;
        case DS_MANIFEST_UNLISTED:
            r.n_unlisted++;
            break;
        }
    }
    if (!rc) rc = digest_text(&r, NULL, r.digest);
    free(listed);
    free(todo);
    free(text);
    free(mpath);
    free_names(names, n_names);
    if (rc)
        ds_manifest_report_free(&r);
    else
        *out = r;
    return rc;
}
