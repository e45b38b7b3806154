/* `dsinfer info DIR`: what a checkpoint is, from its config and from its tensors.
 *
 * Prints the parsed config, the parameter counts the config implies (total and active per
 * token, ds_config_param_counts), the detected format with the stored form of every group of
 * projections (src/model/format.c), and then counts what the safetensors actually hold:
 * elements of the main model's tensors, of quantization data (scales, zero points, biases of
 * quantized projections, anti-outlier norm biases: kept apart because they are not
 * parameters), of MTP layers (model.layers.N with N >= num_hidden_layers), and bytes per
 * dtype. The two counts of the main model must agree; a difference is reported with a warning
 * (exit status stays 0: info describes, `dsinfer check` judges). */
#include "cli/cli.h"
#include "core/core.h"
#include "io/io.h"
#include "model/model.h"

#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

/* "671.03 B", "12.35 M": for parameter counts. */
static const char *human_count(uint64_t n, char *buf, size_t cap) {
    const char *unit[] = {"", " K", " M", " B", " T"};
    double v = (double)n;
    int u = 0;
    while (v >= 1000.0 && u < 4) {
        v /= 1000.0;
        u++;
    }
    if (u == 0)
        snprintf(buf, cap, "%" PRIu64, n);
    else
        snprintf(buf, cap, "%.2f%s", v, unit[u]);
    return buf;
}

/* The layer index of "model.layers.N.…", or -1. */
static int64_t layer_of(const char *name) {
    static const char pre[] = "model.layers.";
    if (strncmp(name, pre, sizeof pre - 1) != 0) return -1;
    char *e = NULL;
    long long l = strtoll(name + sizeof pre - 1, &e, 10);
    return e && *e == '.' ? (int64_t)l : -1;
}

/* A projection's group: its (Hugging Face) name with the layer and expert numbers starred
 * ("model.layers.*.mlp.experts.*.down_proj"), into buf; NULL for what is not a projection. */
static const char *group_of(const char *name, char *buf, size_t cap) {
    if (!ds_str_ends_with(name, ".weight")) return NULL;
    size_t k = 0;
    for (const char *p = name; *p && k + 2 < cap;) {
        int after_dot = p > name && p[-1] == '.';
        if (after_dot && *p >= '0' && *p <= '9') {
            while (*p >= '0' && *p <= '9') p++;
            buf[k++] = '*';
        } else {
            buf[k++] = *p++;
        }
    }
    buf[k > 7 ? k - 7 : k] = 0; /* without ".weight" */
    return buf;
}

typedef struct {
    char group[200];
    const char *scheme;
    size_t n;
} info_group;

/* The stored form of every group of projections; groups with mixed forms are listed once per
 * form. Returns 1 when some tensor's form cannot be told (the message is printed). */
/* Counts one projection of group key stored as sc; 0 when out of memory. */
static int add_group(info_group **g, size_t *n, size_t *cap, const char *key, const char *sc) {
    size_t j = 0;
    while (j < *n && (strcmp((*g)[j].group, key) || strcmp((*g)[j].scheme, sc))) j++;
    if (j == *n) {
        if (*n == *cap) {
            info_group *ng = realloc(*g, 2 * *cap * sizeof *ng);
            if (!ng) return 0;
            *g = ng;
            *cap *= 2;
        }
        snprintf((*g)[j].group, sizeof(*g)[j].group, "%s", key);
        (*g)[j].scheme = sc;
        (*g)[j].n = 0;
        (*n)++;
    }
    (*g)[j].n++;
    return 1;
}

static int print_format(ds_format *f, const ds_st_set *set) {
    printf("\n== format: %s\n", ds_format_name(f));
    size_t n = 0, cap = 64;
    info_group *g = calloc(cap, sizeof *g);
    int bad = !g;
    for (size_t i = 0; !bad && i < ds_st_count(set); i++) {
        const ds_st_tensor *t = ds_st_at(set, i);
        int64_t parts = t->ndim < 2 ? 0 : ds_format_logical(f, t->name, 0, NULL, 0);
        for (int64_t part = 0; !bad && part < parts; part++) {
            char name[256], key[200], prefix[512];
            ds_format_logical(f, t->name, part, name, sizeof name);
            if (!group_of(name, key, sizeof key)) continue;
            snprintf(prefix, sizeof prefix, "%.*s", (int)(strlen(name) - 7), name);
            const char *sc = ds_format_scheme(f, prefix);
            if (!sc) fprintf(stderr, "dsinfer info: %s\n", ds_err_msg());
            bad = !sc || !add_group(&g, &n, &cap, key, sc);
        }
    }
    printf("  %-52s %7s  %s\n", "projections", "tensors", "stored as");
    for (size_t j = 0; j < n; j++) printf("  %-52s %7zu  %s\n", g[j].group, g[j].n, g[j].scheme);
    free(g);
    return bad;
}

int ds_cmd_info(int argc, char **argv) {
    if (argc != 2 || argv[1][0] == '-') {
        int help = argc == 2 && (!strcmp(argv[1], "-h") || !strcmp(argv[1], "--help"));
        fprintf(help ? stdout : stderr,
                "usage: dsinfer info DIR\n"
                "Prints the config, the parameter counts it implies and what the safetensors "
                "hold.\n");
        return help ? 0 : 2;
    }
    const char *dir = argv[1];
    ds_config c;
    if (ds_config_load(dir, &c) != DS_OK) {
        fprintf(stderr, "dsinfer info: %s\n", ds_err_msg());
        return 1;
    }
    printf("== %s\n", dir);
    ds_config_print(&c, stdout);

    uint64_t total = 0, active = 0;
    ds_config_param_counts(&c, &total, &active);
    char b1[32], b2[32];
    printf("\n== parameters implied by the config\n");
    printf("  total                %" PRIu64 " (%s)\n", total, human_count(total, b1, sizeof b1));
    printf("  active per token     %" PRIu64 " (%s; %lld of %lld routed experts)\n", active,
           human_count(active, b2, sizeof b2), (long long)c.n_experts_per_tok,
           (long long)c.n_routed_experts);

    ds_st_set *set = NULL;
    if (ds_st_open_dir(dir, &set) != DS_OK) {
        fprintf(stderr, "dsinfer info: %s\n", ds_err_msg());
        return 1;
    }
    ds_format *fmt = NULL;
    if (ds_format_open(dir, &c, set, &fmt) != DS_OK || print_format(fmt, set)) {
        if (!fmt) fprintf(stderr, "dsinfer info: %s\n", ds_err_msg());
        ds_format_close(fmt);
        ds_st_close(set);
        return 1;
    }
    struct {
        size_t n;
        uint64_t numel, bytes;
    } by_dtype[DS_DTYPE_COUNT] = {{0}};
    uint64_t main_numel = 0, scale_numel = 0, mtp_numel = 0, all_bytes = 0;
    size_t n_scale = 0, n_mtp = 0, n_files = 0;
    const char **files = NULL; /* distinct file paths (pointers owned by the set) */
    const size_t n = ds_st_count(set);
    files = calloc(n ? n : 1, sizeof *files);
    if (!files) {
        ds_format_close(fmt);
        ds_st_close(set);
        fprintf(stderr, "dsinfer info: out of memory\n");
        return 1;
    }
    for (size_t i = 0; i < n; i++) {
        const ds_st_tensor *t = ds_st_at(set, i);
        uint64_t numel = 1;
        for (int d = 0; d < t->ndim; d++) numel *= (uint64_t)t->shape[d];
        /* int4 formats store two parameters per I8 byte (docs/formats.md) */
        char name[256], prefix[512];
        int64_t parts = ds_format_logical(fmt, t->name, 0, name, sizeof name);
        snprintf(prefix, sizeof prefix, "%.*s",
                 (int)(strlen(name) - (ds_str_ends_with(name, ".weight") ? 7 : 0)), name);
        const char *sc =
            parts && t->dtype == DS_I8 && t->ndim >= 2 ? ds_format_scheme(fmt, prefix) : NULL;
        if (sc && !strncmp(sc, "w4a8", 4)) numel *= 2;
        by_dtype[t->dtype].n++;
        by_dtype[t->dtype].numel += numel;
        by_dtype[t->dtype].bytes += t->nbytes;
        all_bytes += t->nbytes;
        int64_t l = layer_of(t->name);
        if (!parts) {
            scale_numel += numel;
            n_scale++;
        } else if (l >= c.n_layers) {
            mtp_numel += numel;
            n_mtp++;
        } else {
            main_numel += numel;
        }
        size_t f = 0;
        while (f < n_files && strcmp(files[f], t->file) != 0) f++;
        if (f == n_files) files[n_files++] = t->file;
    }

    printf("\n== tensors: %zu in %zu file%s, %s\n", n, n_files, n_files == 1 ? "" : "s",
           ds_cli_human_bytes(all_bytes, b1, sizeof b1));
    printf("  %-9s %9s %16s %14s\n", "dtype", "tensors", "elements", "bytes");
    for (int d = 0; d < DS_DTYPE_COUNT; d++) {
        if (!by_dtype[d].n) continue;
        printf("  %-9s %9zu %16" PRIu64 " %14s\n", ds_dtype_name((ds_dtype)d), by_dtype[d].n,
               by_dtype[d].numel, ds_cli_human_bytes(by_dtype[d].bytes, b1, sizeof b1));
    }
    printf("  parameters (main)    %" PRIu64 " (%s)\n", main_numel,
           human_count(main_numel, b1, sizeof b1));
    if (n_scale)
        printf("  quantization data    %" PRIu64 " in %zu tensors (scales, zero points, biases: "
               "not parameters)\n",
               scale_numel, n_scale);
    if (n_mtp)
        printf("  MTP layers           %" PRIu64 " (%s) in %zu tensors (not counted above)\n",
               mtp_numel, human_count(mtp_numel, b2, sizeof b2), n_mtp);
    if (main_numel == total) {
        printf("  cross-check          tensors match the config's parameter count\n");
    } else {
        long long diff = (long long)main_numel - (long long)total;
        printf("  cross-check          MISMATCH: tensors hold %" PRIu64 ", the config implies "
               "%" PRIu64 " (difference %+lld)\n",
               main_numel, total, diff);
        fprintf(stderr,
                "dsinfer info: warning: the parameter count of the tensors in %s differs by "
                "%+lld from what its config.json implies\n",
                dir, diff);
    }
    free(files);
    ds_format_close(fmt);
    ds_st_close(set);
    return 0;
}
