/* dsinfer bench-kernels: the matmul kernels against this machine's own limits, measured in the
 * same run.
 *
 * Decode (one token) streams the weights, so its figure is the weight bytes read per second as a
 * fraction of the read bandwidth a plain parallel sum reaches here (ds_measure_read_bandwidth).
 * Prefill (many tokens) is compute bound, so its figure is int8 operations per second as a
 * fraction of the ISA's peak: multiply-adds per cycle per core (VNNI 2 x 64, AVX2 2 x 32, SDOT
 * 2 x 16) x cores x a clock estimated from a chain of dependent adds, which retire one per cycle.
 *
 * The machine this runs on is often shared, so the variants compared with each other (W8A8 and
 * W4A8 decode, and the bandwidth probe) are measured in interleaved rounds and each keeps its best
 * time: a noisy neighbour then slows all of them alike instead of whichever ran during the noise.
 * Each result is validated against a double-precision product of a few rows before it is timed. */
#include "cli/cli.h"
#include "kernels/kernels.h"

#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static void usage(FILE *f) {
    fprintf(f, "usage: dsinfer bench-kernels [--rows N] [--cols N] [--group N] [--threads N]\n"
               "                             [--rounds N] [--tokens N,N,...]\n"
               "  W8A8 and W4A8 (and BF16 / FP8 for reference) matrix-vector against the\n"
               "  measured read bandwidth, and the int8 GEMM at --tokens (default 8,64,256)\n"
               "  against the peak int8 rate. Defaults: 16384 x 7168, group 128, all cores.\n");
}

static uint64_t rng_state = 0x243f6a8885a308d3ull;
static uint64_t rnd64(void) { /* splitmix64 */
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* Core clock estimate: a chain of dependent integer adds runs at one per cycle. 0 when this
 * architecture has no asm here. */
static double est_clock_hz(void) {
#if defined(__x86_64__) || defined(__aarch64__)
    volatile uint64_t seed = 1;
    double best = 0;
    for (int rep = 0; rep < 5; rep++) {
        uint64_t v = seed;
        const uint64_t n = 100000000;
        double t0 = ds_now();
#if defined(__x86_64__)
        for (uint64_t i = 0; i < n; i++) __asm__ volatile("add $1, %0" : "+r"(v));
#else
        for (uint64_t i = 0; i < n; i++) __asm__ volatile("add %0, %0, #1" : "+r"(v));
#endif
        double dt = ds_now() - t0;
        seed = v;
        if ((double)n / dt > best) best = (double)n / dt;
    }
    return best;
#else
    return 0;
#endif
}

typedef struct {
    const char *name;
    ds_mat m;
    void *data;
    float *scale;
    double best[4]; /* per token count slot: best seconds */
} variant;

/* Random stored weights of the variant's dtype; scales vary per block so a wrong block index
 * changes the answer. */
static int variant_make(variant *v, const char *name, ds_dtype dt, int64_t R, int64_t C, int64_t br,
                        int64_t bc, int int4) {
    memset(v, 0, sizeof *v);
    v->name = name;
    v->m = (ds_mat){
        .dtype = dt, .rows = R, .cols = C, .block_rows = br, .block_cols = bc, .int4 = int4};
    size_t bytes = (size_t)R * (int4 ? (size_t)(C + 1) / 2 : (size_t)C * ds_dtype_size(dt));
    unsigned char *d = malloc(bytes);
    size_t ns = (size_t)((R + br - 1) / br) * (size_t)((C + bc - 1) / bc);
    v->scale = malloc(ns * sizeof(float));
    if (!d || !v->scale) {
        free(d);
        free(v->scale);
        return -1;
    }
    for (size_t i = 0; i < bytes; i++) {
        uint8_t b = (uint8_t)rnd64();
        if (dt == DS_BF16 && i % 2) b &= 0x3f; /* moderate exponents, no inf / NaN */
        if (dt == DS_F8_E4M3) b &= 0x77;       /* no NaN codes */
        d[i] = b;
    }
    for (size_t i = 0; i < ns; i++) v->scale[i] = 1e-3f * (float)(1 + i % 7);
    v->data = d;
    v->m.data = d;
    v->m.scale = v->scale;
    ds_mat_interleave(&v->m); /* as the model lays out its loaded weights */
    for (int i = 0; i < 4; i++) v->best[i] = 1e30;
    return 0;
}

/* Relative error of a few rows of y = x W^T against a double product with the dequantized rows
 * (the int8 paths quantize x per token, ~1e-2 relative; the float ones ~1e-6). */
static double validate(const ds_mat *m, const float *x, const float *y, int64_t n_tok) {
    float *row = malloc((size_t)m->cols * sizeof(float));
    double worst = 0;
    for (int64_t r = 0; row && r < m->rows; r += m->rows / 7 + 1) {
        ds_mat_row_f32(m, r, row);
        for (int64_t t = 0; t < n_tok; t++) {
            double ref = 0, mag = 0;
            for (int64_t c = 0; c < m->cols; c++) {
                ref += (double)x[t * m->cols + c] * row[c];
                mag += fabs((double)x[t * m->cols + c] * row[c]);
            }
            double e = fabs(y[t * m->rows + r] - ref) / (mag > 0 ? mag : 1);
            if (!(e <= worst)) worst = e; /* NaN sticks */
        }
    }
    free(row);
    return row ? worst : INFINITY;
}

static double time_once(ds_pool *pool, float *y, const float *x, int64_t n_tok, const ds_mat *m) {
    double t0 = ds_now();
    ds_matmul(pool, y, x, n_tok, m);
    return ds_now() - t0;
}

static int parse_long(const char *flag, const char *s, long lo, long hi, long *out) {
    char *end;
    long v = strtol(s, &end, 10);
    if (!*s || *end || v < lo || v > hi) {
        fprintf(stderr, "dsinfer bench-kernels: %s '%s' must be %ld..%ld\n", flag, s, lo, hi);
        return -1;
    }
    *out = v;
    return 0;
}

int ds_cmd_bench_kernels(int argc, char **argv) {
    static const struct option opts[] = {
        {"rows", required_argument, 0, 'r'},   {"cols", required_argument, 0, 'c'},
        {"group", required_argument, 0, 'g'},  {"threads", required_argument, 0, 't'},
        {"rounds", required_argument, 0, 'n'}, {"tokens", required_argument, 0, 'k'},
        {"help", no_argument, 0, 'h'},         {0, 0, 0, 0}};
    long rows = 16384, cols = 7168, group = 128, rounds = 8;
    long threads = sysconf(_SC_NPROCESSORS_ONLN);
    const char *tok_list = "8,64,256";
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        int bad = 0;
        switch (c) {
        case 'r':
            bad = parse_long("--rows", optarg, 16, 1 << 20, &rows);
            break;
        case 'c':
            bad = parse_long("--cols", optarg, 128, 1 << 17, &cols);
            break;
        case 'g':
            bad = parse_long("--group", optarg, 2, 1 << 17, &group);
            break;
        case 't':
            bad = parse_long("--threads", optarg, 1, 1024, &threads);
            break;
        case 'n':
            bad = parse_long("--rounds", optarg, 1, 1000, &rounds);
            break;
        case 'k':
            tok_list = optarg;
            break;
        case 'h':
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
        if (bad) return 2;
    }
    if (optind != argc || group % 2) {
        if (group % 2) fprintf(stderr, "dsinfer bench-kernels: --group must be even\n");
        usage(stderr);
        return 2;
    }
    int32_t *toks = NULL;
    int64_t n_toks = 0;
    if (ds_cli_parse_ids(tok_list, &toks, &n_toks) != 0 || n_toks < 1) {
        fprintf(stderr, "dsinfer bench-kernels: --tokens: %s\n", ds_err_msg());
        free(toks);
        return 2;
    }
    for (int64_t i = 0; i < n_toks; i++)
        if (toks[i] < 1 || toks[i] > 4096) {
            fprintf(stderr, "dsinfer bench-kernels: --tokens entries must be 1..4096\n");
            free(toks);
            return 2;
        }
    if (threads < 1) threads = 1;
    if (threads > 1 && threads > 1024) threads = 1024;

    int rc = 1;
    ds_pool *pool = ds_pool_open((int)threads);
    variant v[4];
    memset(v, 0, sizeof v);
    int64_t max_tok = 1;
    for (int64_t i = 0; i < n_toks; i++)
        if (toks[i] > max_tok) max_tok = toks[i];
    float *x = malloc((size_t)(max_tok * cols) * sizeof(float));
    float *y = malloc((size_t)(max_tok * rows) * sizeof(float));
    if (!pool || !x || !y || variant_make(&v[0], "W8A8", DS_I8, rows, cols, 1, cols, 0) ||
        variant_make(&v[1], "W4A8", DS_I8, rows, cols, 1, group, 1) ||
        variant_make(&v[2], "BF16", DS_BF16, rows, cols, 1, 1, 0) ||
        variant_make(&v[3], "FP8", DS_F8_E4M3, rows, cols, 128, 128, 0)) {
        fprintf(stderr, "dsinfer bench-kernels: out of memory for %ld x %ld\n", rows, cols);
        goto done;
    }
    for (int64_t i = 0; i < max_tok * cols; i++)
        x[i] = (float)((int)(rnd64() % 2001) - 1000) / 1000;

    const char *isa = ds_kernels_get()->name;
    printf("bench-kernels: table %s, %ld threads, %ld x %ld, W4A8 group %ld, %ld rounds\n", isa,
           threads, rows, cols, group, rounds);
    for (int i = 0; i < 4; i++) { /* validate, then time */
        ds_matmul(pool, y, x, 1, &v[i].m);
        double e = validate(&v[i].m, x, y, 1);
        double tol = v[i].m.dtype == DS_I8 ? 2e-2 : 1e-4;
        if (!(e <= tol)) {
            fprintf(stderr, "dsinfer bench-kernels: %s matvec is wrong (relative error %.3g)\n",
                    v[i].name, e);
            goto done;
        }
    }
    /* decode: interleaved rounds of bandwidth probe, W8A8, W4A8, BF16, FP8 */
    double bw = 0;
    for (long r = 0; r < rounds; r++) {
        double b = ds_measure_read_bandwidth(pool, (size_t)512 << 20);
        if (b > bw) bw = b;
        for (int i = 0; i < 4; i++)
            for (int it = 0; it < 5; it++) {
                double t = time_once(pool, y, x, 1, &v[i].m);
                if (t < v[i].best[0]) v[i].best[0] = t;
            }
    }
    printf("read bandwidth: %.2f GB/s (best of %ld rounds)\n", bw / 1e9, rounds);
    for (int i = 0; i < 4; i++) {
        double gbs = (double)ds_mat_bytes(&v[i].m) / v[i].best[0];
        printf("decode %-5s matvec: %7.3f ms, %6.2f GB/s of weights = %3.0f%% of read bandwidth",
               v[i].name, v[i].best[0] * 1e3, gbs / 1e9, 100 * gbs / bw);
        if (i == 1) printf(", %.2fx faster than W8A8", v[0].best[0] / v[1].best[0]);
        printf("\n");
    }

    /* prefill: int8 GEMM against the ISA's peak */
    double hz = est_clock_hz();
    double macs = !strcmp(isa, "avx512") ? 128
                  : !strcmp(isa, "avx2") ? 64
                  : !strcmp(isa, "neon") ? 32
                                         : 0;
    double peak = 2.0 * macs * hz * (double)threads;
    if (peak > 0)
        printf("peak int8: %.0f GOPS (%ld cores x 2 x %.0f MACs/cycle x %.2f GHz, clock from a "
               "dependent-add chain)\n",
               peak / 1e9, threads, macs, hz / 1e9);
    for (int64_t ti = 0; ti < n_toks; ti++) {
        int64_t nt = toks[ti];
        for (int i = 0; i < 2; i++) {
            ds_matmul(pool, y, x, nt, &v[i].m);
            double e = validate(&v[i].m, x, y, nt);
            if (!(e <= 2e-2)) {
                fprintf(stderr, "dsinfer bench-kernels: %s at %lld tokens is wrong (%.3g)\n",
                        v[i].name, (long long)nt, e);
                goto done;
            }
        }
        double best[2] = {1e30, 1e30};
        int iters = nt >= 64 ? 2 : 4;
        for (long r = 0; r < (rounds + 1) / 2; r++)
            for (int i = 0; i < 2; i++)
                for (int it = 0; it < iters; it++) {
                    double t = time_once(pool, y, x, nt, &v[i].m);
                    if (t < best[i]) best[i] = t;
                }
        for (int i = 0; i < 2; i++) {
            double ops = 2.0 * (double)rows * (double)cols * (double)nt / best[i];
            printf("prefill %s %4lld tokens: %8.2f ms, %6.0f GOPS", v[i].name, (long long)nt,
                   best[i] * 1e3, ops / 1e9);
            if (peak > 0) printf(" = %3.0f%% of peak int8", 100 * ops / peak);
            printf("\n");
        }
    }
    rc = 0;
done:
    for (int i = 0; i < 4; i++) {
        free(v[i].data);
        free(v[i].scale);
    }
    free(x);
    free(y);
    free(toks);
    ds_pool_close(pool);
    return rc;
}
