/* `dsinfer check MODEL_DIR`: the deployment preflight. Is this node ready to serve this model?
 *
 * What is checked, cheapest first, every problem reported (on stderr as it is found, naming the
 * file, and in the table on stdout), none stopping the others:
 *   shards    the index (model.safetensors.index.json, or a single model.safetensors) names
 *             shards that all exist; each one's safetensors header parses and validates
 *             (src/io/safetensors.c) and the file ends exactly where its last tensor's data ends,
 *             so a truncated download is caught without any manifest; then the set opens as a
 *             whole (every indexed tensor in the shard the index names, no duplicates).
 *   config    config.json is one dsinfer runs (ds_config_load refuses the rest by field), and
 *             the model binds: every tensor the config implies is present with its shape and a
 *             dtype the kernels read (ds_model_open on one thread; views into the mapping, so
 *             one rank reads headers and a few KB of norms, not the weights; under mpirun the
 *             call is collective, each rank binds its part and pages it in, as serve would).
 *   memory    the field's rule of thumb for a deployment: free memory >= weights / nodes x 1.3
 *             (the 0.3 is the KV cache, activations, the allocator and the OS). The figures are
 *             printed, and what the KV cache would get (available - this node's weights) in
 *             bytes and in tokens. "Available" is MemAvailable from /proc/meminfo, lowered to
 *             the room left under this process's cgroup v2 memory.max (a container's limit),
 *             or --mem-available. Ranks of one run that share a machine (mpirun's local size)
 *             share its memory, so the machine's need counts each of them.
 *   disk      free space on the model directory's filesystem must be at least 1 GiB: logs,
 *             core files and temporary files of a long-running server need room, and a
 *             filesystem at 100% breaks things in ways nobody traces back to it.
 *   manifest  dsinfer-manifest.sha256 (written by quantize, or here by --write-manifest for a
 *             downloaded model) against every file's SHA-256 (io/manifest.c; all cores, files
 *             streamed). Files the manifest does not list are warnings. No manifest at all is a
 *             warning too: the contents are then unverified, and the output says how to fix it.
 *             --write-manifest refuses to bless shards that failed the shard check.
 *   ranks     under mpirun, every rank checks its own node and sends a fixed-size report to
 *             rank 0 (ds_dist_gather), which prints one table with a row per rank and flags
 *             every rank whose weights digest (the manifest text of its files as they are,
 *             io.h) differs from rank 0's. Without a manifest the ranks hash every file so
 *             that they can still be compared. Rank 0 waits for the slowest rank's hashing
 *             without a limit (--dist-timeout sets one).
 *
 * Exit status: one code per kind of problem, and when there are several, the lowest (the list
 * runs from "the files are wrong" to "the nodes disagree"): 0 ready, 1 the check itself failed,
 * 2 usage, 3 a file differs from the manifest (or the manifest is malformed), 4 a shard or listed
 * file missing, truncated or malformed, 5 a config dsinfer cannot run, 6 not enough memory, 7 not
 * enough disk, 8 ranks whose weights differ. A file gets one code: a truncated shard is 4, and
 * its digest mismatch is not counted again as 3. Every rank exits with rank 0's verdict, so
 * mpirun's status is the verdict too. docs/deploy.md has the table. */
#include "cli/cli.h"
#include "core/core.h"
#include "dist/dist.h"
#include "io/io.h"
#include "model/model.h"

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

/* Exit codes (see the top of the file and docs/deploy.md). */
enum {
    CK_EXIT_READY = 0,
    CK_EXIT_TOOL = 1,
    CK_EXIT_USAGE = 2,
    CK_EXIT_CORRUPT = 3,
    CK_EXIT_INCOMPLETE = 4,
    CK_EXIT_CONFIG = 5,
    CK_EXIT_MEMORY = 6,
    CK_EXIT_DISK = 7,
    CK_EXIT_RANKS = 8,
};

static const char *exit_name(int code) {
    switch (code) {
    case CK_EXIT_READY:
        return "ready";
    case CK_EXIT_TOOL:
        return "the check could not run";
    case CK_EXIT_CORRUPT:
        return "files differ from the manifest";
    case CK_EXIT_INCOMPLETE:
        return "missing or incomplete files";
    case CK_EXIT_CONFIG:
        return "config not runnable";
    case CK_EXIT_MEMORY:
        return "not enough memory";
    case CK_EXIT_DISK:
        return "not enough disk";
    case CK_EXIT_RANKS:
        return "weights differ between ranks";
    }
    return "usage";
}

#define CK_RULE 1.3                     /* free memory >= weights / nodes x CK_RULE */
#define CK_MIN_DISK ((uint64_t)1 << 30) /* free disk below this is a problem */
#define CK_MAX_MSGS 8                   /* messages per rank that reach rank 0 */
#define CK_MSG_LEN 320
#define CK_DETAIL_LEN 200

/* The checks of one node, in table order. */
enum { CK_SHARDS, CK_CONFIG, CK_MEMORY, CK_DISK, CK_MANIFEST, CK_N };
static const char *const check_names[CK_N] = {"shards", "config", "memory", "disk", "manifest"};
/* The state of one check. */
enum { ST_SKIPPED, ST_OK, ST_WARN, ST_FAIL };
static const char *const state_names[] = {"-", "ok", "warn", "FAIL"};

/* One rank's report: fixed size and plain bytes, so that rank 0 gathers them in one call. */
typedef struct {
    int32_t rank, code;     /* code: this node's exit code, 0 when ready */
    int32_t n_msgs, n_more; /* messages kept; problems and warnings beyond CK_MAX_MSGS */
    int32_t has_digest, local_ranks, config_ok;
    int32_t state[CK_N];
    uint64_t weights;   /* bytes of the safetensors files */
    uint64_t share;     /* this machine's part: weights / nodes x local ranks */
    uint64_t need;      /* share x CK_RULE */
    uint64_t mem, disk; /* available bytes */
    uint64_t kv_bytes;  /* mem - share (0 when negative) */
    uint64_t kv_tok_bf16, kv_tok_f32, kv_per_tok_bf16;
    uint64_t n_shards, n_tensors, n_files_verified, bytes_hashed;
    uint8_t digest[32];
    char host[64], mem_source[32];
    char detail[CK_N][CK_DETAIL_LEN];
    struct {
        int32_t code; /* 0: a warning */
        char text[CK_MSG_LEN];
    } msgs[CK_MAX_MSGS];
} ck_node;

typedef struct {
    const char *dir;
    int nodes, threads, write_manifest, force, json;
    int dir_ok;                           /* MODEL_DIR is a directory */
    double dist_timeout;                  /* seconds to wait for the slowest rank; 0: no limit */
    uint64_t mem_override, disk_override; /* 0: measure */
    ck_node n;
    ds_config cfg;
    char **bad_files; /* files the shard check failed: their manifest mismatch is not counted */
    size_t n_bad, cap_bad;
} ck_ctx;

/* ---- reporting ------------------------------------------------------------------------------- */

/* The prefix of this rank's stderr lines. */
static void err_prefix(const ck_ctx *c) {
    if (ds_dist_size() > 1)
        fprintf(stderr, "dsinfer check [rank %d, %s]: ", ds_dist_rank(), c->n.host);
    else
        fprintf(stderr, "dsinfer check: ");
}

/* Records a problem (code >= 1) or a warning (code 0): stderr now, the report for the table. */
static void note(ck_ctx *c, int code, const char *fmt, ...) DS_PRINTF(3, 4);
static void note(ck_ctx *c, int code, const char *fmt, ...) {
    char text[CK_MSG_LEN];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(text, sizeof text, fmt, ap);
    va_end(ap);
    err_prefix(c);
    fprintf(stderr, "%s%s\n", code ? "" : "warning: ", text);
    ck_node *n = &c->n;
    if (code && (n->code == 0 || code < n->code)) n->code = code;
    if (n->n_msgs < CK_MAX_MSGS) {
        n->msgs[n->n_msgs].code = code;
        snprintf(n->msgs[n->n_msgs].text, CK_MSG_LEN, "%s", text);
        n->n_msgs++;
    } else if (code) {
        /* keep problems over warnings: replace the last warning when there is one */
        int w = -1;
        for (int i = 0; i < n->n_msgs; i++)
            if (n->msgs[i].code == 0) w = i;
        if (w >= 0) {
            memmove(&n->msgs[w], &n->msgs[w + 1], (size_t)(n->n_msgs - 1 - w) * sizeof n->msgs[0]);
            n->msgs[n->n_msgs - 1].code = code;
            snprintf(n->msgs[n->n_msgs - 1].text, CK_MSG_LEN, "%s", text);
        }
        n->n_more++;
    } else {
        n->n_more++;
    }
}

static void set_state(ck_ctx *c, int check, int state, const char *fmt, ...) DS_PRINTF(4, 5);
static void set_state(ck_ctx *c, int check, int state, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->n.detail[check], CK_DETAIL_LEN, fmt, ap);
    va_end(ap);
    c->n.state[check] = state;
}

static void mark_bad(ck_ctx *c, const char *name) {
    if (c->n_bad == c->cap_bad) {
        size_t cap = c->cap_bad ? 2 * c->cap_bad : 16;
        char **nb = realloc(c->bad_files, cap * sizeof *nb);
        if (!nb) return; /* only costs a duplicate message */
        c->bad_files = nb;
        c->cap_bad = cap;
    }
    if ((c->bad_files[c->n_bad] = strdup(name))) c->n_bad++;
}

static int is_bad(const ck_ctx *c, const char *name) {
    for (size_t i = 0; i < c->n_bad; i++)
        if (!strcmp(c->bad_files[i], name)) return 1;
    return 0;
}

/* ---- shards ---------------------------------------------------------------------------------- */

/* One safetensors file: present, its header valid, its size exactly header + data. */
static void check_one_shard(ck_ctx *c, const char *name, const char *named_by, int *bad) {
    char *path = ds_cli_path_join(c->dir, name);
    if (!path) {
        note(c, CK_EXIT_TOOL, "out of memory");
        *bad = 1;
        return;
    }
    struct stat st;
    ds_st_set *s = NULL;
    int ok = 0;
    if (stat(path, &st) != 0) {
        note(c, CK_EXIT_INCOMPLETE, "%s: missing (named by %s): %s", path, named_by,
             strerror(errno));
    } else if (!S_ISREG(st.st_mode)) {
        note(c, CK_EXIT_INCOMPLETE, "%s: not a regular file", path);
    } else {
        c->n.weights += (uint64_t)st.st_size;
        if (ds_st_open_file(path, &s) != DS_OK) {
            /* the message names the file, the tensor and the offsets */
            note(c, CK_EXIT_INCOMPLETE, "%s", ds_err_msg());
        } else {
            /* the parser checks that every tensor lies inside the file; a complete file also
             * ends where the last tensor's data ends (safetensors has no padding after it) */
            uint64_t end = 0;
            const size_t nt = ds_st_count(s);
            for (size_t i = 0; i < nt; i++) {
                const ds_st_tensor *t = ds_st_at(s, i);
                if (t->offset + t->nbytes > end) end = t->offset + t->nbytes;
            }
            ok = !nt || end == (uint64_t)st.st_size;
            if (!ok)
                note(c, CK_EXIT_INCOMPLETE,
                     "%s: %" PRIu64 " bytes, but its tensors' data ends at byte %" PRIu64
                     ": %" PRIu64 " stray bytes after it (not the file that was written)",
                     path, (uint64_t)st.st_size, end, (uint64_t)st.st_size - end);
            c->n.n_tensors += nt;
            c->n.n_shards++;
        }
    }
    if (!ok) {
        mark_bad(c, name);
        *bad = 1;
    }
    ds_st_close(s);
    free(path);
}

static void check_shards(ck_ctx *c) {
    char *idx_name = NULL;
    int bad = 0;
    if (ds_st_index_name(c->dir, &idx_name) != DS_OK) {
        note(c, CK_EXIT_INCOMPLETE, "%s", ds_err_msg());
        set_state(c, CK_SHARDS, ST_FAIL, "ambiguous index");
        return;
    }
    if (idx_name) {
        char *ip = ds_cli_path_join(c->dir, idx_name);
        json_t *root = NULL, *wm = NULL;
        if (!ip) {
            note(c, CK_EXIT_TOOL, "out of memory");
            set_state(c, CK_SHARDS, ST_FAIL, "out of memory");
            return;
        }
        if (ds_json_load_file(ip, &root) != DS_OK) {
            note(c, CK_EXIT_INCOMPLETE, "%s", ds_err_msg());
            bad = 1;
        } else if (!(wm = ds_st_index_map(root)) || json_object_size(wm) == 0) {
            note(c, CK_EXIT_INCOMPLETE, "%s: no \"weight_map\" object with entries", ip);
            bad = 1;
        } else {
            /* the shards, each once, in sorted order (the map's values repeat) */
            json_t *seen = json_object();
            const char *key;
            json_t *v;
            json_object_foreach(wm, key, v) {
                if (!json_is_string(v)) {
                    note(c, CK_EXIT_INCOMPLETE, "%s: tensor '%s' maps to a non-string", ip, key);
                    bad = 1;
                } else if (seen) {
                    json_object_set_new(seen, json_string_value(v), json_true());
                }
            }
            size_t n = json_object_size(seen), k = 0;
            const char **names = calloc(n ? n : 1, sizeof *names);
            if (!seen || !names) {
                note(c, CK_EXIT_TOOL, "out of memory");
                bad = 1;
            } else {
                json_object_foreach(seen, key, v) names[k++] = key;
                for (size_t i = 1; i < n; i++) /* insertion sort: a few hundred names */
                    for (size_t j = i; j > 0 && strcmp(names[j - 1], names[j]) > 0; j--) {
                        const char *t = names[j];
                        names[j] = names[j - 1];
                        names[j - 1] = t;
                    }
                for (size_t i = 0; i < n; i++) check_one_shard(c, names[i], idx_name, &bad);
                /* with shards missing, the index's total (tensor bytes) is the better figure */
                json_t *ts = json_object_get(json_object_get(root, "metadata"), "total_size");
                if (json_is_integer(ts) && json_integer_value(ts) > 0 &&
                    (uint64_t)json_integer_value(ts) > c->n.weights)
                    c->n.weights = (uint64_t)json_integer_value(ts);
            }
            free((void *)names);
            json_decref(seen);
        }
        json_decref(root);
        free(ip);
        free(idx_name);
    } else if (ds_cli_file_exists(c->dir, "model.safetensors")) {
        check_one_shard(c, "model.safetensors", "the checkpoint layout", &bad);
    } else {
        note(c, CK_EXIT_INCOMPLETE, "%s: no model.safetensors.index.json or model.safetensors",
             c->dir);
        set_state(c, CK_SHARDS, ST_FAIL, "no weights found");
        return;
    }
    if (!bad) {
        /* the set as a whole: index entries in the shards they name, no tensor twice */
        ds_st_set *s = NULL;
        if (ds_st_open_dir(c->dir, &s) != DS_OK) {
            note(c, CK_EXIT_INCOMPLETE, "%s", ds_err_msg());
            bad = 1;
        }
        ds_st_close(s);
    }
    char b[32];
    if (bad)
        set_state(c, CK_SHARDS, ST_FAIL, "missing, truncated or malformed shards (below)");
    else
        set_state(c, CK_SHARDS, ST_OK, "%" PRIu64 " shard%s complete, %" PRIu64 " tensors, %s",
                  c->n.n_shards, c->n.n_shards == 1 ? "" : "s", c->n.n_tensors,
                  ds_cli_human_bytes(c->n.weights, b, sizeof b));
}

/* ---- config ---------------------------------------------------------------------------------- */

static const char *quant_name(ds_quant_method q, ds_dtype torch_dtype) {
    switch (q) {
    case DS_QUANT_FP8:
        return "fp8 (e4m3, block scales)";
    case DS_QUANT_W8A8:
        return "w8a8_int8";
    case DS_QUANT_W4A8:
        return "w4a8_int4";
    case DS_QUANT_BLOCK_INT8:
        return "blockwise_int8";
    case DS_QUANT_MS_PTQ:
        return "ptq (MindSpore W8A8)";
    case DS_QUANT_MS_W8A8:
        return "osl / smoothquant (MindSpore W8A8)";
    case DS_QUANT_MS_A8W4:
        return "a8w4 (MindSpore)";
    case DS_QUANT_NONE:
        break;
    }
    return ds_dtype_name(torch_dtype);
}

static void check_config(ck_ctx *c) {
    const int loaded = ds_config_load(c->dir, &c->cfg) == DS_OK;
    if (!loaded && c->dir_ok) {
        note(c, CK_EXIT_CONFIG, "%s", ds_err_msg());
        set_state(c, CK_CONFIG, ST_FAIL, "config.json refused (below)");
    }
    c->n.config_ok = loaded; /* enough for the KV cache figures */
    /* ds_model_open below is collective under mpirun: every rank calls it, or none */
    int64_t any_failed = !loaded;
    if (ds_dist_size() > 1 && ds_dist_allreduce_max_i64(&any_failed, 1) != DS_OK) {
        note(c, CK_EXIT_TOOL, "%s", ds_err_msg());
        return;
    }
    if (!loaded) return;
    const ds_config *f = &c->cfg;
    if (any_failed) {
        set_state(c, CK_CONFIG, ST_SKIPPED,
                  "%lld layers, hidden %lld, %lld routed experts (top %lld), %s; tensors not "
                  "bound (another rank's config failed)",
                  (long long)f->n_layers, (long long)f->hidden_size, (long long)f->n_routed_experts,
                  (long long)f->n_experts_per_tok, quant_name(f->quant, f->torch_dtype));
        return;
    }
    /* the binding: every tensor the config implies, with its shape and a dtype the kernels
     * read. Made even when a shard failed (it then fails on the same file and is not counted
     * again), because under mpirun ds_model_open is collective: every rank opens its part of
     * the model (ds_model_open shards by the MPI world; together the ranks bind every tensor),
     * the ranks agree on the outcome, and model.h's protocol then has ranks > 0 follow rank 0
     * until it closes its model, which rank 0 does at once. */
    ds_model_params mp = ds_model_default_params();
    mp.n_threads = 1;
    mp.map_weights = 1; /* bound, never run: nothing to load */
    ds_model *m = NULL;
    int rc = ds_model_open(c->dir, &mp, &m);
    char msg[CK_MSG_LEN], me[32];
    snprintf(msg, sizeof msg, "%s", ds_err_msg());
    if (!rc && ds_dist_size() > 1 && ds_dist_rank() > 0 && ds_model_follow(m) != DS_OK)
        note(c, CK_EXIT_TOOL, "%s", ds_err_msg());
    ds_model_close(m);
    /* after a failure the ranks agree that it failed: a rank's own message starts "rank N: "
     * (weights.c), another rank's failure is reported by that rank */
    snprintf(me, sizeof me, "rank %d: ", ds_dist_rank());
    const int mine = rc && (ds_dist_size() == 1 || !strncmp(msg, me, strlen(me)));
    const char *why = !rc                              ? ""
                      : c->n.state[CK_SHARDS] != ST_OK ? "; tensors not bound (shards failed)"
                      : !mine ? "; tensors not bound (another rank failed to open its part)"
                              : NULL;
    if (!why) {
        note(c, CK_EXIT_CONFIG, "the weights do not match config.json: %s", msg);
        set_state(c, CK_CONFIG, ST_FAIL, "config.json and the tensors disagree (below)");
        return;
    }
    set_state(c, CK_CONFIG, rc ? ST_SKIPPED : ST_OK,
              "%lld layers, hidden %lld, %lld routed experts (top %lld), %s%s",
              (long long)f->n_layers, (long long)f->hidden_size, (long long)f->n_routed_experts,
              (long long)f->n_experts_per_tok, quant_name(f->quant, f->torch_dtype), why);
}

/* ---- memory and disk ------------------------------------------------------------------------- */

static int read_u64_file(const char *path, uint64_t *out) {
    FILE *f = fopen(path, "r");
    if (!f) return 0;
    unsigned long long v;
    int ok = fscanf(f, "%llu", &v) == 1;
    fclose(f);
    *out = v;
    return ok;
}

/* Room left under this process's cgroup v2 memory.max (a container's limit): 1 when there is a
 * limit, with *left = max - current. */
static int cgroup_left(uint64_t *left) {
    FILE *f = fopen("/proc/self/cgroup", "r");
    if (!f) return 0;
    char line[4096], path[4200];
    int found = 0;
    while (!found && fgets(line, sizeof line, f)) {
        if (strncmp(line, "0::", 3) != 0) continue;
        line[strcspn(line, "\n")] = 0;
        found = 1;
    }
    fclose(f);
    if (!found) return 0;
    const char *cg = line + 3;
    if (!strcmp(cg, "/")) cg = "";
    uint64_t max = 0, cur = 0;
    snprintf(path, sizeof path, "/sys/fs/cgroup%s/memory.max", cg);
    if (!read_u64_file(path, &max)) return 0; /* "max": no limit, or no such file */
    snprintf(path, sizeof path, "/sys/fs/cgroup%s/memory.current", cg);
    if (!read_u64_file(path, &cur)) cur = 0;
    *left = max > cur ? max - cur : 0;
    return 1;
}

static void check_memory(ck_ctx *c) {
    ck_node *n = &c->n;
    char b1[32], b2[32], b3[32], b4[32];
    if (c->mem_override) {
        n->mem = c->mem_override;
        snprintf(n->mem_source, sizeof n->mem_source, "--mem-available");
    } else {
        uint64_t left;
        n->mem = ds_mem_available();
        snprintf(n->mem_source, sizeof n->mem_source, "MemAvailable");
        if (cgroup_left(&left) && (left < n->mem || !n->mem)) {
            n->mem = left;
            snprintf(n->mem_source, sizeof n->mem_source, "cgroup memory.max");
        }
        if (!n->mem) {
            note(c, CK_EXIT_TOOL,
                 "cannot tell the available memory (no MemAvailable in /proc/meminfo); give it "
                 "with --mem-available BYTES");
            set_state(c, CK_MEMORY, ST_FAIL, "available memory unknown");
            return;
        }
    }
    n->local_ranks = ds_dist_local_size() > 0 ? ds_dist_local_size() : 1;
    /* this machine's part of the weights: weights / nodes for each rank it runs */
    n->share = (uint64_t)((double)n->weights / c->nodes * n->local_ranks);
    if (n->share > n->weights) n->share = n->weights;
    n->need = (uint64_t)((double)n->share * CK_RULE);
    n->kv_bytes = n->mem > n->share ? n->mem - n->share : 0;
    if (n->config_ok) {
        n->kv_per_tok_bf16 = ds_kv_bytes_per_token(&c->cfg, DS_KV_BF16);
        uint64_t f32 = ds_kv_bytes_per_token(&c->cfg, DS_KV_F32);
        n->kv_tok_bf16 = n->kv_per_tok_bf16 ? n->kv_bytes / n->kv_per_tok_bf16 : 0;
        n->kv_tok_f32 = f32 ? n->kv_bytes / f32 : 0;
    }
    char ranks[64] = "";
    if (n->local_ranks > 1) snprintf(ranks, sizeof ranks, " x %d ranks here", n->local_ranks);
    ds_cli_human_bytes(n->need, b1, sizeof b1);
    ds_cli_human_bytes(n->weights, b2, sizeof b2);
    ds_cli_human_bytes(n->mem, b3, sizeof b3);
    ds_cli_human_bytes(n->share, b4, sizeof b4);
    if (n->mem < n->need) {
        note(c, CK_EXIT_MEMORY,
             "not enough memory: this node needs %s (%s of weights / %d node%s%s = %s, x %.1f) "
             "but %s is available (%s)",
             b1, b2, c->nodes, c->nodes == 1 ? "" : "s", ranks, b4, CK_RULE, b3, n->mem_source);
        set_state(c, CK_MEMORY, ST_FAIL, "need %s = %s weights / %d node%s%s x %.1f; %s available",
                  b1, b2, c->nodes, c->nodes == 1 ? "" : "s", ranks, CK_RULE, b3);
    } else {
        set_state(c, CK_MEMORY, ST_OK, "need %s = %s weights / %d node%s%s x %.1f; %s available",
                  b1, b2, c->nodes, c->nodes == 1 ? "" : "s", ranks, CK_RULE, b3);
    }
}

static void check_disk(ck_ctx *c) {
    ck_node *n = &c->n;
    char b1[32], b2[32];
    if (c->disk_override) {
        n->disk = c->disk_override;
    } else {
        struct statvfs vs;
        if (statvfs(c->dir, &vs) != 0) {
            note(c, CK_EXIT_TOOL, "%s: statvfs: %s", c->dir, strerror(errno));
            set_state(c, CK_DISK, ST_FAIL, "free space unknown");
            return;
        }
        n->disk = (uint64_t)vs.f_bavail * (uint64_t)vs.f_frsize;
    }
    ds_cli_human_bytes(n->disk, b1, sizeof b1);
    ds_cli_human_bytes(CK_MIN_DISK, b2, sizeof b2);
    if (n->disk < CK_MIN_DISK) {
        note(c, CK_EXIT_DISK,
             "not enough disk: %s free on the filesystem of %s, less than %s (logs, core files, "
             "temporary files)",
             b1, c->dir, b2);
        set_state(c, CK_DISK, ST_FAIL, "%s free on the model's filesystem (minimum %s)", b1, b2);
    } else {
        set_state(c, CK_DISK, ST_OK, "%s free on the model's filesystem (minimum %s)", b1, b2);
    }
}

/* ---- manifest -------------------------------------------------------------------------------- */

static void check_manifest(ck_ctx *c) {
    ck_node *n = &c->n;
    char b[32];
    ds_manifest_report r = {0};
    if (c->write_manifest) {
        if (n->state[CK_SHARDS] != ST_OK) {
            note(c, CK_EXIT_INCOMPLETE,
                 "%s: not written: the shards failed their check, and a manifest would record "
                 "them as good",
                 DS_MANIFEST_NAME);
            set_state(c, CK_MANIFEST, ST_FAIL, "not written (the shards failed)");
            return;
        }
        if (ds_manifest_write(c->dir, c->threads, &r) != DS_OK) {
            note(c, CK_EXIT_TOOL, "%s: not written: %s", DS_MANIFEST_NAME, ds_err_msg());
            set_state(c, CK_MANIFEST, ST_FAIL, "not written (below)");
            return;
        }
        set_state(c, CK_MANIFEST, ST_OK, "written: %zu files, %s hashed", r.n_files,
                  ds_cli_human_bytes(r.bytes_hashed, b, sizeof b));
    } else {
        /* with no manifest the ranks of a run still compare: they hash everything */
        int has = ds_cli_file_exists(c->dir, DS_MANIFEST_NAME);
        if (ds_manifest_verify(c->dir, c->threads, !has && ds_dist_size() > 1, &r) != DS_OK) {
            note(c, CK_EXIT_CORRUPT, "%s", ds_err_msg());
            set_state(c, CK_MANIFEST, ST_FAIL, "unreadable (below)");
            return;
        }
        char want[65], got[65];
        for (size_t i = 0; i < r.n_files; i++) {
            const ds_manifest_file *f = &r.files[i];
            if (f->state == DS_MANIFEST_OK || f->state == DS_MANIFEST_UNLISTED) continue;
            if (is_bad(c, f->name)) continue; /* reported by the shard check, code 4 */
            if (f->state == DS_MANIFEST_MISMATCH) {
                ds_sha256_hex(f->want, want);
                ds_sha256_hex(f->got, got);
                note(c, CK_EXIT_CORRUPT,
                     "%s/%s: SHA-256 differs from %s (corrupt or changed): %.16s... here, "
                     "%.16s... listed",
                     c->dir, f->name, DS_MANIFEST_NAME, got, want);
            } else if (f->state == DS_MANIFEST_MISSING) {
                note(c, CK_EXIT_INCOMPLETE, "%s/%s: listed in %s, missing", c->dir, f->name,
                     DS_MANIFEST_NAME);
            } else {
                note(c, CK_EXIT_CORRUPT, "%s",
                     f->error ? f->error : "a file of the manifest could not be read");
            }
        }
        if (!r.present) {
            note(c, 0,
                 "%s/%s not found: file contents not verified (`dsinfer check --write-manifest "
                 "%s` writes one; best where the model was downloaded)",
                 c->dir, DS_MANIFEST_NAME, c->dir);
        } else if (r.n_unlisted) {
            char list[200] = "";
            size_t k = 0, len = 0;
            for (size_t i = 0; i < r.n_files && k < 3; i++) {
                if (r.files[i].state != DS_MANIFEST_UNLISTED) continue;
                int w =
                    snprintf(list + len, sizeof list - len, "%s%s", k ? ", " : "", r.files[i].name);
                if (w < 0 || (size_t)w >= sizeof list - len) break;
                len += (size_t)w;
                k++;
            }
            note(c, 0, "%zu file%s in %s not in %s, not verified: %s%s", r.n_unlisted,
                 r.n_unlisted == 1 ? "" : "s", c->dir, DS_MANIFEST_NAME, list,
                 r.n_unlisted > k ? ", ..." : "");
        }
        size_t bad = r.n_mismatch + r.n_missing + r.n_unreadable;
        if (!r.present)
            set_state(c, CK_MANIFEST, ST_WARN, "no %s: contents not verified%s", DS_MANIFEST_NAME,
                      r.bytes_hashed ? " (hashed to compare the ranks)" : "");
        else if (bad)
            set_state(c, CK_MANIFEST, ST_FAIL, "%zu of %zu listed files differ or are missing", bad,
                      r.n_files - r.n_unlisted);
        else
            set_state(c, CK_MANIFEST, r.n_unlisted ? ST_WARN : ST_OK,
                      "%zu files verified, %s hashed%s", r.n_ok,
                      ds_cli_human_bytes(r.bytes_hashed, b, sizeof b),
                      r.n_unlisted ? "; some files not listed" : "");
    }
    n->n_files_verified = r.n_ok;
    n->bytes_hashed = r.bytes_hashed;
    n->has_digest = r.present || r.bytes_hashed > 0;
    memcpy(n->digest, r.digest, 32);
    ds_manifest_report_free(&r);
}

/* ---- output (rank 0) ------------------------------------------------------------------------- */

static void print_node_table(const ck_node *n) {
    printf("%-9s %-7s %s\n", "check", "status", "detail");
    for (int k = 0; k < CK_N; k++) {
        printf("%-9s %-7s %s\n", check_names[k], state_names[n->state[k]], n->detail[k]);
        if (k == CK_MEMORY && n->state[CK_MEMORY] != ST_SKIPPED && n->mem) {
            char b1[32];
            ds_cli_human_bytes(n->kv_bytes, b1, sizeof b1);
            if (n->kv_per_tok_bf16)
                printf("%-9s %-7s %s left after the weights: %" PRIu64
                       " tokens of bf16 KV (%" PRIu64 " B/token), %" PRIu64
                       " of f32 KV (twice the bytes)\n",
                       "kv cache", "-", b1, n->kv_tok_bf16, n->kv_per_tok_bf16, n->kv_tok_f32);
            else
                printf("%-9s %-7s %s left after the weights\n", "kv cache", "-", b1);
        }
    }
}

static void print_rank_table(const ck_node *all, int size, const int *differs) {
    printf("%-4s %-16s %-8s %-6s %-6s %-6s %-4s %-8s %11s %11s %11s %12s  %s\n", "rank", "host",
           "manifest", "shards", "config", "memory", "disk", "weights", "available", "needed",
           "kv tokens", "digest", "status");
    for (int r = 0; r < size; r++) {
        const ck_node *n = &all[r];
        char b1[32], b2[32], dg[65] = "-";
        if (n->has_digest) ds_sha256_hex(n->digest, dg);
        dg[12] = 0;
        const char *status = n->code      ? exit_name(n->code)
                             : differs[r] ? exit_name(CK_EXIT_RANKS)
                                          : "ready";
        const char *same = r == 0 && n->has_digest              ? "(ref)"
                           : differs[r]                         ? "DIFFER"
                           : n->has_digest && all[0].has_digest ? "same"
                                                                : "-";
        printf("%-4d %-16.16s %-8s %-6s %-6s %-6s %-4s %-8s %11s %11s %11" PRIu64 " %12s  %s\n", r,
               n->host, state_names[n->state[CK_MANIFEST]], state_names[n->state[CK_SHARDS]],
               state_names[n->state[CK_CONFIG]], state_names[n->state[CK_MEMORY]],
               state_names[n->state[CK_DISK]], same, ds_cli_human_bytes(n->mem, b1, sizeof b1),
               ds_cli_human_bytes(n->need, b2, sizeof b2), n->kv_tok_bf16, dg, status);
    }
}

static json_t *node_json(const ck_node *n, int differs) {
    json_t *checks = json_object(), *problems = json_array(), *warnings = json_array();
    for (int k = 0; k < CK_N; k++)
        json_object_set_new(checks, check_names[k],
                            json_pack("{s:s, s:s}", "status",
                                      n->state[k] == ST_SKIPPED ? "skipped"
                                      : n->state[k] == ST_OK    ? "ok"
                                      : n->state[k] == ST_WARN  ? "warning"
                                                                : "fail",
                                      "detail", n->detail[k]));
    for (int i = 0; i < n->n_msgs; i++) {
        if (n->msgs[i].code)
            json_array_append_new(problems, json_pack("{s:i, s:s}", "code", (int)n->msgs[i].code,
                                                      "message", n->msgs[i].text));
        else
            json_array_append_new(warnings, json_string(n->msgs[i].text));
    }
    char dg[65];
    ds_sha256_hex(n->digest, dg);
    json_t *o = json_pack(
        "{s:i, s:s, s:i, s:s, s:o, s:{s:I, s:I, s:I, s:I, s:s, s:f, s:i}, "
        "s:{s:I, s:I, s:I, s:I}, s:I, s:o, s:b, s:o, s:o, s:i}",
        "rank", (int)n->rank, "host", n->host, "exit_code", (int)n->code, "status",
        n->code ? exit_name(n->code) : "ready", "checks", checks, "memory", "weights_bytes",
        (json_int_t)n->weights, "share_bytes", (json_int_t)n->share, "need_bytes",
        (json_int_t)n->need, "available_bytes", (json_int_t)n->mem, "available_source",
        n->mem_source, "rule_of_thumb", CK_RULE, "ranks_on_this_node", (int)n->local_ranks,
        "kv_cache", "bytes", (json_int_t)n->kv_bytes, "bytes_per_token_bf16",
        (json_int_t)n->kv_per_tok_bf16, "tokens_bf16", (json_int_t)n->kv_tok_bf16, "tokens_f32",
        (json_int_t)n->kv_tok_f32, "disk_free_bytes", (json_int_t)n->disk, "weights_digest",
        n->has_digest ? json_string(dg) : json_null(), "weights_differ_from_rank_0", differs,
        "problems", problems, "warnings", warnings, "messages_not_shown", (int)n->n_more);
    return o;
}

/* ---- the command ----------------------------------------------------------------------------- */

static void usage(FILE *f) {
    fprintf(f,
            "usage: dsinfer check MODEL_DIR [--nodes N] [--write-manifest [--force]]\n"
            "                     [--mem-available BYTES] [--disk-available BYTES] [--threads N]\n"
            "                     [--json] [--dist-timeout S]\n"
            "Deployment preflight: shards present and complete, config runnable, free memory\n"
            ">= weights / nodes x 1.3 (and what the KV cache would get), free disk >= 1 GiB,\n"
            "files against the SHA-256 manifest (dsinfer-manifest.sha256). Under mpirun every\n"
            "rank checks its own node, rank 0 prints one table and flags ranks whose weights\n"
            "differ. See docs/deploy.md.\n"
            "  --nodes N              nodes the weights are split over (default: the ranks of\n"
            "                         this run, 1 without mpirun)\n"
            "  --write-manifest       hash every file and write the manifest (a downloaded\n"
            "                         model), after the shard check; --force replaces one\n"
            "  --mem-available BYTES  take this as the free memory (K/M/G suffixes)\n"
            "  --disk-available BYTES take this as the free disk space\n"
            "  --threads N            hashing threads (default: the CPUs / ranks on this node)\n"
            "  --json                 the report as JSON on stdout\n"
            "  --dist-timeout S       with several ranks: seconds to wait for the slowest rank's\n"
            "                         report (default 0: no limit; hashing takes what it takes)\n"
            "exit status: 0 ready, 1 the check failed to run, 2 usage, 3 a file differs from\n"
            "the manifest, 4 missing/truncated/malformed shard or file, 5 config not runnable,\n"
            "6 not enough memory, 7 not enough disk, 8 weights differ between ranks; with\n"
            "several problems, the lowest of these codes.\n");
}

/* Parses the flags into c; 0, 2 (usage error, message printed) or -1 (--help printed). */
static int parse_args(ck_ctx *c, int argc, char **argv) {
    static const struct option opts[] = {{"nodes", required_argument, 0, 'n'},
                                         {"write-manifest", no_argument, 0, 'w'},
                                         {"force", no_argument, 0, 'f'},
                                         {"mem-available", required_argument, 0, 'm'},
                                         {"disk-available", required_argument, 0, 'd'},
                                         {"threads", required_argument, 0, 't'},
                                         {"json", no_argument, 0, 'j'},
                                         {"dist-timeout", required_argument, 0, 'T'},
                                         {"help", no_argument, 0, 'h'},
                                         {0, 0, 0, 0}};
    const int quiet = ds_dist_rank() != 0; /* one rank speaks for all */
    uint64_t v;
    int ch;
    optind = 0;
    opterr = !quiet;
    while ((ch = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (ch) {
        case 'n':
            if (!ds_cli_parse_u64(optarg, &v, 0) || v == 0 || v > 1000000) {
                if (!quiet)
                    fprintf(stderr, "dsinfer check: --nodes '%s' is not a node count\n", optarg);
                return 2;
            }
            c->nodes = (int)v;
            break;
        case 'w':
            c->write_manifest = 1;
            break;
        case 'f':
            c->force = 1;
            break;
        case 'm':
        case 'd':
            if (!ds_cli_parse_u64(optarg, &v, 1) || v == 0) {
                if (!quiet)
                    fprintf(stderr, "dsinfer check: --%s '%s' is not a positive size (e.g. 512G)\n",
                            ch == 'm' ? "mem-available" : "disk-available", optarg);
                return 2;
            }
            *(ch == 'm' ? &c->mem_override : &c->disk_override) = v;
            break;
        case 't':
            if (!ds_cli_parse_u64(optarg, &v, 0) || v == 0 || v > 4096) {
                if (!quiet)
                    fprintf(stderr, "dsinfer check: --threads '%s' is not a thread count\n",
                            optarg);
                return 2;
            }
            c->threads = (int)v;
            break;
        case 'j':
            c->json = 1;
            break;
        case 'T':
            if (!ds_cli_parse_u64(optarg, &v, 0) || v > 7 * 86400) {
                if (!quiet)
                    fprintf(stderr,
                            "dsinfer check: --dist-timeout '%s' is not a number of seconds\n",
                            optarg);
                return 2;
            }
            c->dist_timeout = (double)v;
            break;
        case 'h':
            if (!quiet) usage(stdout);
            return -1;
        default:
            if (!quiet) usage(stderr);
            return 2;
        }
    }
    if (argc - optind != 1) {
        if (!quiet) {
            if (argc - optind > 1)
                fprintf(stderr, "dsinfer check: unexpected argument '%s'\n", argv[optind + 1]);
            usage(stderr);
        }
        return 2;
    }
    c->dir = argv[optind];
    if (c->force && !c->write_manifest) {
        if (!quiet) fprintf(stderr, "dsinfer check: --force goes with --write-manifest\n");
        return 2;
    }
    if (c->write_manifest && !c->force && ds_cli_file_exists(c->dir, DS_MANIFEST_NAME)) {
        /* every rank looks at its own directory; a refusal anywhere stops all */
        fprintf(stderr,
                "dsinfer check%s: %s/%s exists; --force replaces it (after the shard check)\n",
                quiet ? " [rank > 0]" : "", c->dir, DS_MANIFEST_NAME);
        return 2;
    }
    return 0;
}

/* Runs the checks of this node into c->n. */
static void check_node(ck_ctx *c) {
    ck_node *n = &c->n;
    n->rank = ds_dist_rank();
    struct stat st;
    int found = stat(c->dir, &st) == 0;
    if (!found || !S_ISDIR(st.st_mode)) {
        note(c, CK_EXIT_INCOMPLETE, "%s: %s", c->dir, !found ? strerror(errno) : "not a directory");
        set_state(c, CK_SHARDS, ST_FAIL, "no model directory");
        check_config(c); /* takes part in the ranks' agreement */
        check_memory(c); /* still useful: what this node has */
        return;
    }
    c->dir_ok = 1;
    check_shards(c);
    check_config(c);
    check_memory(c);
    check_disk(c);
    check_manifest(c);
}

/* Rank 0: the verdict over all ranks, printed; returns the exit code. */
static int report(ck_ctx *c, const ck_node *all, int size) {
    int *differs = calloc((size_t)size, sizeof *differs);
    if (!differs) {
        fprintf(stderr, "dsinfer check: out of memory\n");
        return CK_EXIT_TOOL;
    }
    int code = 0;
    for (int r = 0; r < size; r++)
        if (all[r].code && (!code || all[r].code < code)) code = all[r].code;
    /* ranks whose weights differ from rank 0's */
    char rank_msgs[8][CK_MSG_LEN];
    int n_rank_msgs = 0, n_differ = 0;
    for (int r = 1; r < size; r++) {
        if (!all[0].has_digest || !all[r].has_digest) continue;
        if (!memcmp(all[0].digest, all[r].digest, 32)) continue;
        differs[r] = 1;
        n_differ++;
        if (!code || CK_EXIT_RANKS < code) code = CK_EXIT_RANKS;
        char d0[65], dr[65];
        ds_sha256_hex(all[0].digest, d0);
        ds_sha256_hex(all[r].digest, dr);
        if (n_rank_msgs < 8) {
            snprintf(rank_msgs[n_rank_msgs], CK_MSG_LEN,
                     "weights differ on rank %d (host %s): files digest %.16s... vs rank 0's "
                     "%.16s... (compare the two nodes' %s)",
                     r, all[r].host, dr, d0, DS_MANIFEST_NAME);
            fprintf(stderr, "dsinfer check: %s\n", rank_msgs[n_rank_msgs]);
            n_rank_msgs++;
        }
    }
    if (c->json) {
        json_t *ranks = json_array(), *problems = json_array();
        for (int r = 0; r < size; r++) {
            json_array_append_new(ranks, node_json(&all[r], differs[r]));
            for (int i = 0; i < all[r].n_msgs; i++)
                if (all[r].msgs[i].code)
                    json_array_append_new(problems,
                                          json_pack("{s:i, s:i, s:s, s:s}", "rank", r, "code",
                                                    (int)all[r].msgs[i].code, "kind",
                                                    exit_name(all[r].msgs[i].code), "message",
                                                    all[r].msgs[i].text));
        }
        for (int i = 0; i < n_rank_msgs; i++)
            json_array_append_new(
                problems, json_pack("{s:n, s:i, s:s, s:s}", "rank", "code", CK_EXIT_RANKS, "kind",
                                    exit_name(CK_EXIT_RANKS), "message", rank_msgs[i]));
        json_t *o = json_pack("{s:s, s:b, s:i, s:s, s:i, s:i, s:f, s:I, s:o, s:o}", "model_dir",
                              c->dir, "ready", code == 0, "exit_code", code, "status",
                              exit_name(code), "ranks_total", size, "nodes", c->nodes,
                              "rule_of_thumb", CK_RULE, "min_disk_bytes", (json_int_t)CK_MIN_DISK,
                              "problems", problems, "ranks", ranks);
        char *s = o ? json_dumps(o, JSON_INDENT(2) | JSON_REAL_PRECISION(6)) : NULL;
        if (s)
            printf("%s\n", s);
        else
            fprintf(stderr, "dsinfer check: out of memory writing the JSON report\n");
        if (!s && !code) code = CK_EXIT_TOOL;
        free(s);
        json_decref(o);
        free(differs);
        return code;
    }
    printf("dsinfer check %s: %d rank%s, weights split over %d node%s\n\n", c->dir, size,
           size == 1 ? "" : "s", c->nodes, c->nodes == 1 ? "" : "s");
    if (size == 1) {
        print_node_table(&all[0]);
    } else {
        print_rank_table(all, size, differs);
        printf("\nrank 0 (%s):\n", all[0].host);
        print_node_table(&all[0]);
    }
    int shown_problem = 0, shown_warning = 0;
    for (int pass = 0; pass < 2; pass++) {
        for (int r = 0; r < size; r++) {
            for (int i = 0; i < all[r].n_msgs; i++) {
                if ((all[r].msgs[i].code != 0) != (pass == 0)) continue;
                int *shown = pass == 0 ? &shown_problem : &shown_warning;
                if (!*shown) printf("\n%s:\n", pass == 0 ? "problems" : "warnings");
                *shown = 1;
                if (size > 1)
                    printf("  rank %d (%s): %s\n", r, all[r].host, all[r].msgs[i].text);
                else
                    printf("  %s\n", all[r].msgs[i].text);
            }
            if (pass == 1 && all[r].n_more)
                printf("  (%d more message%s on rank %d's stderr)\n", (int)all[r].n_more,
                       all[r].n_more == 1 ? "" : "s", r);
        }
        if (pass == 0)
            for (int i = 0; i < n_rank_msgs; i++) {
                if (!shown_problem) printf("\nproblems:\n");
                shown_problem = 1;
                printf("  %s\n", rank_msgs[i]);
            }
    }
    if (n_differ > n_rank_msgs) printf("  (%d more ranks differ)\n", n_differ - n_rank_msgs);
    if (code)
        printf("\nnot ready: %s (exit %d)\n", exit_name(code), code);
    else
        printf("\nready\n");
    free(differs);
    return code;
}

static int run_check(int argc, char **argv) {
    ck_ctx c;
    memset(&c, 0, sizeof c); /* the report goes to rank 0 as bytes, padding included */
    int rc = parse_args(&c, argc, argv);
    /* the ranks agree on stopping before anything waits for the others */
    int64_t stop = rc == 2 ? 2 : rc < 0 ? 1 : 0;
    if (ds_dist_size() > 1 && ds_dist_allreduce_max_i64(&stop, 1) != DS_OK) {
        fprintf(stderr, "dsinfer check: %s\n", ds_err_msg());
        return CK_EXIT_TOOL;
    }
    if (stop) return stop == 2 ? CK_EXIT_USAGE : 0;

    const int size = ds_dist_size(), rank = ds_dist_rank();
    if (!c.nodes) c.nodes = size;
    if (!c.threads) {
        long cpus = sysconf(_SC_NPROCESSORS_ONLN);
        int local = ds_dist_local_size() > 0 ? ds_dist_local_size() : 1;
        c.threads = cpus > local ? (int)(cpus / local) : 1;
    }
    if (gethostname(c.n.host, sizeof c.n.host) != 0) snprintf(c.n.host, sizeof c.n.host, "?");
    c.n.host[sizeof c.n.host - 1] = 0;
    check_node(&c);
    for (size_t i = 0; i < c.n_bad; i++) free(c.bad_files[i]);
    free(c.bad_files);

    /* the ranks finish hashing when their disks let them, hours apart for a large model on
     * slow disks: no limit on this wait unless --dist-timeout (mpirun ends the job when a rank
     * dies) */
    ds_dist_set_timeout(c.dist_timeout);
    ck_node *all = rank == 0 ? calloc((size_t)size, sizeof *all) : NULL;
    int32_t code = CK_EXIT_TOOL;
    if (rank == 0 && !all) {
        fprintf(stderr, "dsinfer check: out of memory\n");
    } else if (ds_dist_gather(&c.n, sizeof c.n, all, 0) != DS_OK) {
        err_prefix(&c);
        fprintf(stderr, "%s\n", ds_err_msg());
    } else if (rank == 0) {
        code = report(&c, all, size);
    }
    fflush(stdout);
    free(all);
    /* every rank exits with rank 0's verdict */
    if (size > 1 && ds_dist_bcast(&code, sizeof code, 0, 0) != DS_OK) {
        err_prefix(&c);
        fprintf(stderr, "%s\n", ds_err_msg());
        code = CK_EXIT_TOOL;
    }
    return code;
}

int ds_cmd_check(int argc, char **argv) {
    /* main starts MPI (and finalizes it: a rank that exits without MPI_Finalize makes mpirun
     * exit 1 whatever it returned); this is a no-op then, and makes the command whole when it
     * is called on its own (tests). */
    if (ds_dist_init(&argc, &argv) != DS_OK) {
        fprintf(stderr, "dsinfer check: %s\n", ds_err_msg());
        return CK_EXIT_TOOL;
    }
    return run_check(argc, argv);
}
