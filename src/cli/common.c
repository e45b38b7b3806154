/* Helpers shared by the dsinfer subcommands: default locations, token-id lists, files. */
#include "cli/cli.h"
#include "core/core.h"

#include <dirent.h>
#include <errno.h>
#include <ftw.h>
#include <inttypes.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#ifndef DSINFER_DEFAULT_MODEL_DIR
#define DSINFER_DEFAULT_MODEL_DIR "demo-model"
#endif
#ifndef DSINFER_DEFAULT_TOKENIZER_DIR
#define DSINFER_DEFAULT_TOKENIZER_DIR "tokenizer"
#endif

static const char *env_or(const char *var, const char *dflt) {
    const char *s = getenv(var);
    return s && *s ? s : dflt;
}

const char *ds_cli_default_model(void) {
    return env_or("DSINFER_MODEL", DSINFER_DEFAULT_MODEL_DIR);
}

const char *ds_cli_default_tokenizer_dir(void) {
    return env_or("DSINFER_TOKENIZER_DIR", DSINFER_DEFAULT_TOKENIZER_DIR);
}

static int is_sep(char c) {
    return c == ',' || c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

/* Accepts "1,2,3", "1 2 3", "1, 2, 3" and a JSON-style "[1, 2, 3]". Ids are 0..INT32_MAX.
 * On success *ids (malloc'd, caller frees) holds *n >= 1 ids; on failure returns -1, leaves
 * *ids NULL and sets a message naming the offending token and its position. */
int ds_cli_parse_ids(const char *s, int32_t **ids, int64_t *n) {
    *ids = NULL;
    *n = 0;
    if (!s) {
        ds_err_set(DS_ERR_ARG, "no token ids given");
        return -1;
    }
    const char *p = s, *end = s + strlen(s);
    while (p < end && is_sep(*p)) p++;
    if (p < end && *p == '[') {
        /* strip one pair of brackets */
        const char *q = end;
        while (q > p && is_sep(q[-1])) q--;
        if (q == p + 1 || q[-1] != ']') {
            ds_err_set(DS_ERR_ARG, "token ids '%s': '[' without a closing ']'", s);
            return -1;
        }
        p++;
        end = q - 1;
    }
    size_t cap = 16, cnt = 0;
    int32_t *v = malloc(cap * sizeof *v);
    if (!v) {
        ds_err_set(DS_ERR_NOMEM, "out of memory");
        return -1;
    }
    while (p < end) {
        while (p < end && is_sep(*p)) p++;
        if (p >= end) break;
        const char *tok = p;
        while (p < end && !is_sep(*p)) p++;
        int len = (int)(p - tok);
        char buf[32];
        if (len >= (int)sizeof buf) len = (int)sizeof buf - 1;
        memcpy(buf, tok, (size_t)len);
        buf[len] = 0;
        char *e = NULL;
        errno = 0;
        long long x = strtoll(buf, &e, 10);
        if (e == buf || *e || errno || buf[0] == '+' || x < 0 || x > INT32_MAX ||
            (size_t)(p - tok) >= sizeof buf) {
            ds_err_set(DS_ERR_ARG, "token ids: '%.*s' (position %zu) is not an id in 0..%d",
                       (int)(p - tok), tok, cnt + 1, INT32_MAX);
            free(v);
            return -1;
        }
        if (cnt == cap) {
            int32_t *nv = realloc(v, 2 * cap * sizeof *nv);
            if (!nv) {
                free(v);
                ds_err_set(DS_ERR_NOMEM, "out of memory");
                return -1;
            }
            v = nv;
            cap *= 2;
        }
        v[cnt++] = (int32_t)x;
    }
    if (cnt == 0) {
        free(v);
        ds_err_set(DS_ERR_ARG, "no token ids in '%s'", s);
        return -1;
    }
    *ids = v;
    *n = (int64_t)cnt;
    return 0;
}

/* ---- files and directories (make-tiny, quantize) ---- */
char *ds_cli_path_join(const char *a, const char *b) {
    size_t n = strlen(a) + strlen(b) + 2;
    char *p = malloc(n);
    if (p) snprintf(p, n, "%s/%s", a, b);
    return p;
}
/* ---- files and directories ------------------------------------------------------------------ */
int ds_cli_copy_file(const char *src, const char *dst) {
    FILE *in = fopen(src, "rb");
    if (!in) return ds_err_set(DS_ERR_IO, "%s: cannot open: %s", src, strerror(errno));
    FILE *out = fopen(dst, "wb");
    if (!out) {
        int e = errno;
        fclose(in);
        return ds_err_set(DS_ERR_IO, "%s: cannot create: %s", dst, strerror(e));
    }
    char buf[1 << 16];
    size_t n;
    int rc = DS_OK;
    while ((n = fread(buf, 1, sizeof buf, in)) > 0)
        if (fwrite(buf, 1, n, out) != n) {
            rc = ds_err_set(DS_ERR_IO, "%s: write failed: %s", dst, strerror(errno));
            break;
        }
    if (!rc && ferror(in)) rc = ds_err_set(DS_ERR_IO, "%s: read failed", src);
    fclose(in);
    if (fclose(out) != 0 && !rc) rc = ds_err_set(DS_ERR_IO, "%s: write failed", dst);
    return rc;
}
static int rm_entry(const char *path, const struct stat *sb, int type, struct FTW *ftw) {
    (void)sb;
    (void)type;
    (void)ftw;
    return remove(path);
}
/* Removes a tree that this command created (or one --force told it to replace). */
void ds_cli_rm_tree(const char *path) {
    nftw(path, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
}
/* 1 when dir is a directory with entries, 0 when empty or absent, -1 when not a directory. */
int ds_cli_dir_state(const char *dir) {
    struct stat st;
    if (lstat(dir, &st) != 0) return 0;
    if (!S_ISDIR(st.st_mode)) return -1;
    DIR *d = opendir(dir);
    if (!d) return 1;
    int nonempty = 0;
    struct dirent *e;
    while (!nonempty && (e = readdir(d)) != NULL)
        nonempty = strcmp(e->d_name, ".") != 0 && strcmp(e->d_name, "..") != 0;
    closedir(d);
    return nonempty;
}
int ds_cli_file_exists(const char *dir, const char *name) {
    char *p = ds_cli_path_join(dir, name);
    struct stat st;
    int ok = p && stat(p, &st) == 0 && S_ISREG(st.st_mode);
    free(p);
    return ok;
}
int ds_cli_parse_u64(const char *s, uint64_t *out, int allow_suffix) {
    if (!s || !*s || *s == '-') return 0;
    char *e = NULL;
    errno = 0;
    unsigned long long v = strtoull(s, &e, 0);
    if (e == s || errno) return 0;
    uint64_t mul = 1;
    if (allow_suffix && *e) {
        switch (*e) {
        case 'k':
        case 'K':
            mul = 1ull << 10;
            break;
        case 'm':
        case 'M':
            mul = 1ull << 20;
            break;
        case 'g':
        case 'G':
            mul = 1ull << 30;
            break;
        case 't':
        case 'T':
            mul = 1ull << 40;
            break;
        default:
            return 0;
        }
        e++;
        if (*e == 'i' && e[1] == 'B')
            e += 2;
        else if (*e == 'B')
            e++;
    }
    if (*e) return 0;
    return ds_mul_ok(v, mul, out);
}

int ds_cli_outdir_begin(ds_cli_outdir *d, const char *cmd, const char *out, int force) {
    memset(d, 0, sizeof *d);
    size_t ol = strlen(out);
    while (ol > 1 && out[ol - 1] == '/') ol--; /* so OUT.tmp-XXXXXX is a sibling */
    d->out = malloc(ol + 1);
    d->tmp = malloc(ol + 16);
    if (!d->out || !d->tmp) {
        fprintf(stderr, "dsinfer %s: out of memory\n", cmd);
        return 1;
    }
    memcpy(d->out, out, ol);
    d->out[ol] = 0;
    snprintf(d->tmp, ol + 16, "%s.tmp-XXXXXX", d->out);
    int existing = ds_cli_dir_state(d->out);
    if (existing != 0 && !force) {
        fprintf(stderr, "dsinfer %s: %s already exists%s; pass --force to replace it\n", cmd,
                d->out, existing < 0 ? " and is not a directory" : " and is not empty");
        return 2;
    }
    if (!mkdtemp(d->tmp)) {
        fprintf(stderr, "dsinfer %s: cannot create %s: %s\n", cmd, d->tmp, strerror(errno));
        return 1;
    }
    d->made = 1;
    chmod(d->tmp, 0755); /* mkdtemp makes it 0700; a checkpoint is an ordinary directory */
    return 0;
}

int ds_cli_outdir_publish(ds_cli_outdir *d, const char *cmd) {
    size_t n = strlen(d->out) + 16;
    char *aside = malloc(n);
    if (!aside) {
        fprintf(stderr, "dsinfer %s: out of memory\n", cmd);
        return 1;
    }
    snprintf(aside, n, "%s.old-XXXXXX", d->out);
    int existing = ds_cli_dir_state(d->out), moved_aside = 0, rc = 1;
    if (existing < 0) {
        if (unlink(d->out) != 0) {
            fprintf(stderr, "dsinfer %s: cannot remove %s: %s\n", cmd, d->out, strerror(errno));
            goto out;
        }
    } else if (existing > 0) {
        if (!mkdtemp(aside) || rename(d->out, aside) != 0) {
            fprintf(stderr, "dsinfer %s: cannot move %s aside: %s\n", cmd, d->out, strerror(errno));
            rmdir(aside);
            goto out;
        }
        moved_aside = 1;
    } else {
        rmdir(d->out); /* an empty OUT is replaced */
    }
    if (rename(d->tmp, d->out) != 0) {
        fprintf(stderr, "dsinfer %s: cannot rename %s to %s: %s\n", cmd, d->tmp, d->out,
                strerror(errno));
        if (moved_aside && rename(aside, d->out) != 0)
            fprintf(stderr, "dsinfer %s: the previous %s is at %s\n", cmd, d->out, aside);
        goto out;
    }
    d->made = 0;
    if (moved_aside) ds_cli_rm_tree(aside);
    rc = 0;
out:
    free(aside);
    return rc;
}

void ds_cli_outdir_end(ds_cli_outdir *d) {
    if (d->made) ds_cli_rm_tree(d->tmp);
    free(d->out);
    free(d->tmp);
    memset(d, 0, sizeof *d);
}

void ds_cli_shard_name(char *buf, size_t cap, int i, int n) {
    snprintf(buf, cap, "model-%05d-of-%05d.safetensors", i + 1, n);
}

int ds_cli_write_index(const char *dir, json_t *map, uint64_t total) {
    json_t *root = json_object(), *meta = json_object();
    int bad = !root || !meta || !map;
    if (!bad) {
        bad |= json_object_set_new(meta, "total_size", json_integer((json_int_t)total));
        bad |= json_object_set_new(root, "metadata", meta);
        bad |= json_object_set_new(root, "weight_map", map);
        meta = map = NULL;
    }
    json_decref(meta);
    json_decref(map);
    char *path = bad ? NULL : ds_cli_path_join(dir, "model.safetensors.index.json");
    int rc = DS_OK;
    if (!path)
        rc = ds_err_set(DS_ERR_NOMEM, "out of memory");
    else if (json_dump_file(root, path, JSON_INDENT(2) | JSON_SORT_KEYS))
        rc = ds_err_set(DS_ERR_IO, "%s: cannot write: %s", path, strerror(errno));
    free(path);
    json_decref(root);
    return rc;
}

static int flag_long(const char *cmd, const char *flag, const char *arg, long lo, long hi,
                     long *out) {
    char *end;
    errno = 0;
    long v = strtol(arg, &end, 10);
    if (!*arg || *end || errno || v < lo || v > hi) {
        fprintf(stderr, "dsinfer %s: --%s '%s' must be an integer in %ld..%ld\n", cmd, flag, arg,
                lo, hi);
        return -1;
    }
    *out = v;
    return 0;
}

int ds_cli_engine_flag(int c, const char *arg, const char *cmd, ds_engine_params *p) {
    long v = 0;
    switch (c - DS_CLI_ENGINE_OPT) {
    case 0:
        if (flag_long(cmd, "max-num-seqs", arg, 1, 65536, &v)) return -1;
        p->max_num_seqs = (int32_t)v;
        return 1;
    case 1:
        if (flag_long(cmd, "max-num-batched-tokens", arg, 1, 1 << 20, &v)) return -1;
        p->max_num_batched_tokens = (int32_t)v;
        return 1;
    case 2:
        if (flag_long(cmd, "max-model-len", arg, 1, INT32_MAX, &v)) return -1;
        p->max_model_len = (int32_t)v;
        return 1;
    case 3:
        if (flag_long(cmd, "block-size", arg, 1, 4096, &v)) return -1;
        p->block_size = (int32_t)v;
        return 1;
    case 4:
        if (!ds_cli_parse_u64(arg, &p->kv_cache_memory, 1) || !p->kv_cache_memory) {
            fprintf(stderr,
                    "dsinfer %s: --kv-cache-memory '%s' must be a positive size such as "
                    "8G or 512M\n",
                    cmd, arg);
            return -1;
        }
        return 1;
    case 5: {
        char *end;
        double f = strtod(arg, &end);
        if (!*arg || *end || !(f > 0 && f <= 1)) {
            fprintf(stderr, "dsinfer %s: --memory-utilization '%s' must be in (0, 1]\n", cmd, arg);
            return -1;
        }
        p->memory_utilization = f;
        return 1;
    }
    case 6: {
        ds_kv_dtype dt;
        if (!strcmp(arg, "auto"))
            dt = DS_KV_F32;
        else if (ds_kv_dtype_parse(arg, &dt) != DS_OK) {
            fprintf(stderr, "dsinfer %s: --kv-cache-dtype '%s' must be auto, f32, bf16 or f16\n",
                    cmd, arg);
            return -1;
        }
        p->kv_dtype = (int)dt;
        return 1;
    }
    case 7:
        p->prefix_caching = 1;
        return 1;
    case 8:
        p->prefix_caching = 0;
        return 1;
    default:
        return 0;
    }
}

int ds_cli_follow(const char *cmd, const char *model_dir, const ds_model_params *mp) {
    signal(SIGUSR1, SIG_IGN); /* rank 0's graceful stop (serve); rank 0 then sends the stop */
    ds_model *m = NULL;
    int rc = ds_model_open(model_dir, mp, &m);
    if (!rc) rc = ds_model_follow(m);
    if (rc) fprintf(stderr, "dsinfer %s: %s\n", cmd, ds_err_msg());
    ds_model_close(m);
    return rc ? 1 : 0;
}

void ds_cli_raise_fd_limit(long want) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl)) return;
    if (rl.rlim_cur != RLIM_INFINITY && (rlim_t)want + 64 > rl.rlim_cur &&
        rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

const char *ds_cli_human_bytes(uint64_t n, char *buf, size_t cap) {
    const char *unit[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
    double v = (double)n;
    int u = 0;
    while (v >= 1024.0 && u < 5) {
        v /= 1024.0;
        u++;
    }
    if (u == 0)
        snprintf(buf, cap, "%" PRIu64 " B", n);
    else
        snprintf(buf, cap, "%.2f %s", v, unit[u]);
    return buf;
}
