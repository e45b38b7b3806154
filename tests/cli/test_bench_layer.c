/* `dsinfer bench-layer` on a small slice (--preset tiny: 8 experts, top-2), as one process and
 * under mpirun -np 2: it writes the slice, runs prefill and decode rows, and its figures hold
 * together:
 *   - one decoded token touches exactly top-k = 2 experts of the MoE layer, a batch of 4 between
 *     2 and 8; no layer takes longer than the whole step;
 *   - the 61-layer step is 3 x dense + 58 x MoE + rest of the measured row, tokens / step its
 *     tok/s, N=1 the same, N=2 that over rank 0's weight share;
 *   - under mpirun the wait column is there and no per-node column (the figures are a rank's);
 *     the slice directory is removed afterwards. */
#include "testutil.h"

#include <dirent.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    char phase[16];
    int batch;
    long tokens;
    double dense_ms, dense_gb, dense_gbs, dense_bw, moe_ms, exp, moe_gb, moe_gbs, moe_bw, rest,
        step;
} row;

/* The measured rows of the output (at most max). */
static int parse_rows(const char *out, row *r, int max) {
    int n = 0;
    for (const char *p = out; p && *p && n < max; p = strchr(p, '\n'), p = p ? p + 1 : NULL) {
        row x;
        if (sscanf(p, "%15s %d %ld | %lf %lf %lf %lf%% | %lf %lf %lf %lf %lf%% | %lf | %lf",
                   x.phase, &x.batch, &x.tokens, &x.dense_ms, &x.dense_gb, &x.dense_gbs,
                   &x.dense_bw, &x.moe_ms, &x.exp, &x.moe_gb, &x.moe_gbs, &x.moe_bw, &x.rest,
                   &x.step) == 14)
            r[n++] = x;
    }
    return n;
}

static int count_slices(const char *dir) {
    DIR *d = opendir(dir);
    int n = 0;
    struct dirent *e;
    while (d && (e = readdir(d))) n += strncmp(e->d_name, "dsinfer-bench-layer-", 20) == 0;
    if (d) closedir(d);
    return n;
}

static void check_output(const char *out, int dist) {
    row r[8];
    const int n = parse_rows(out, r, 8);
    CHECK_MSG(n == 4, "%d measured rows in:\n%s", n, out);
    for (int i = 0; i < n; i++) {
        CHECK(!strcmp(r[i].phase, i < 2 ? "prefill" : "decode"));
        CHECK(r[i].dense_ms > 0 && r[i].moe_ms > 0 && r[i].rest >= -0.02);
        CHECK(r[i].dense_ms + r[i].moe_ms <= r[i].step + 0.02);
    }
    if (n == 4) {
        CHECK(r[0].batch == 1 && r[0].tokens == 16 && r[1].batch == 8 && r[1].tokens == 128);
        CHECK_MSG(r[2].batch == 1 && r[2].exp == 2, "decode 1 touched %g experts", r[2].exp);
        CHECK(r[3].batch == 4 && r[3].exp >= 2 && r[3].exp <= 8);
    }
    /* the extrapolation table: "decode 1 | step tok/s | N=1 | N=2" */
    const char *t = strstr(out, "61 layers (3 dense + 58 MoE)");
    const char *d = t ? strstr(t, "\ndecode      1 |") : NULL;
    double ms = 0, tps = 0, n1 = 0, n2 = 0;
    CHECK(d && sscanf(d, "\ndecode %*d | %lf %lf", &ms, &tps) == 2);
    if (n == 4) {
        const double want = 3 * r[2].dense_ms + 58 * r[2].moe_ms + r[2].rest;
        /* each printed figure is rounded to 0.0005 ms */
        CHECK_MSG(ms > 0 && fabs(ms - want) <= 62 * 0.0005 + 1e-4 * want,
                  "61 layers: %g ms, want %g", ms, want);
        CHECK(fabs(tps - 1e3 / ms) <= 0.01 + 1e-3 * tps);
    }
    CHECK(dist == (strstr(out, "|  wait") != NULL));
    if (dist) { /* the figures are rank 0's of 2: no per-node columns */
        CHECK(d && !strstr(t, "N=2") && sscanf(d, "\ndecode %*d | %lf %lf", &ms, &tps) == 2);
        return;
    }
    CHECK(d && sscanf(d, "\ndecode %*d | %lf %lf | %lf | %lf", &ms, &tps, &n1, &n2) == 4);
    CHECK(fabs(n1 - tps) <= 0.01);
    const char *sh = strstr(out, "(1: 1.000, 2: ");
    double share = 0;
    CHECK(sh && sscanf(sh, "(1: 1.000, 2: %lf", &share) == 1 && share > 0.5 && share < 0.6);
    CHECK_MSG(share > 0 && fabs(n2 - tps / share) <= 0.02 + 2e-3 * n2, "N=2 %g, want %g / %g", n2,
              tps, share);
}

int main(void) {
    char *tmp = ds_test_tmpdir();
    CHECK(tmp != NULL);
    if (!tmp) return ds_test_finish("test_bench_layer");
    char cmd[8400];
    int st;
    const char *args = "bench-layer --preset tiny --layers 2 --batch 1,4 --steps 2 --context 16 "
                       "--nodes 1,2 --threads 1";
    snprintf(cmd, sizeof cmd, "TMPDIR='%s' '%s' %s 2>&1", tmp, DSINFER_BIN, args);
    char *out = ds_test_run(cmd, &st);
    CHECK_MSG(st == 0 && out, "%s: %d\n%s", cmd, st, out ? out : "");
    if (out) check_output(out, 0);
    free(out);
    CHECK(count_slices(tmp) == 0);
    if (system("command -v mpirun >/dev/null 2>&1") == 0) {
        /* as test_dist: OpenMPI's allocations at exit are no leak of ours; root needs consent */
        const char *asan = getenv("ASAN_OPTIONS");
        char asan_opts[1024];
        snprintf(asan_opts, sizeof asan_opts, "%s%sdetect_leaks=0", asan ? asan : "",
                 asan && *asan ? ":" : "");
        setenv("ASAN_OPTIONS", asan_opts, 1);
        setenv("OMPI_ALLOW_RUN_AS_ROOT", "1", 1);
        setenv("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1", 1);
        snprintf(cmd, sizeof cmd, "TMPDIR='%s' mpirun --oversubscribe -np 2 '%s' %s 2>&1", tmp,
                 DSINFER_BIN, args);
        out = ds_test_run(cmd, &st);
        CHECK_MSG(st == 0 && out, "%s: %d\n%s", cmd, st, out ? out : "");
        if (out) check_output(out, 1);
        free(out);
        CHECK(count_slices(tmp) == 0);
    } else if (getenv("CI")) {
        CHECK_MSG(0, "mpirun is not installed (scripts/setup.sh installs it)");
    }
    /* bad arguments */
    snprintf(cmd, sizeof cmd, "'%s' bench-layer --scheme fp8 2>&1", DSINFER_BIN);
    free(ds_test_run(cmd, &st));
    CHECK(st == 2);
    snprintf(cmd, sizeof cmd, "'%s' bench-layer --layers 1 2>&1", DSINFER_BIN);
    free(ds_test_run(cmd, &st));
    CHECK(st == 2);
    ds_test_rmtree(tmp);
    free(tmp);
    return ds_test_finish("test_bench_layer");
}
