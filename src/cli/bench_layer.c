/* `dsinfer bench-layer`: DeepSeek-R1 at full width, one dense and one MoE layer (or more), timed
 * layer by layer, and what that means for 61 layers and for N nodes.
 *
 * The slice is a real checkpoint: make-tiny --preset r1 --layers N --dtype w8a8|w4a8 (random
 * integers in dsinfer quantize's layouts, written once into --dir and reused), loaded and run by
 * the same code as any model. Random weights route tokens near-uniformly over the 256 experts
 * (group-limited, top-8 of 8 groups top-4, as R1 does); the experts a step touches are counted
 * from the routing itself, so the bytes moved are the step's own.
 *
 * Method. The weights are faulted in by a warm-up step touching every expert. Prefill: one step
 * of 1 and of 8 prompts of --context tokens (the engine prefills larger batches in chunks of the
 * same size). Decode: for each batch size, --steps steps of one token per sequence at position
 * --context (the KV cache's content does not change the work), the median per layer. A layer's
 * time runs from the end of the previous one (or the embedding) to its output, read through the
 * model's trace hook; "rest" is the embedding, the final norm and lm_head. Each layer's bytes
 * (weights read, from ds_model_layer_bytes with the experts the step touched) over its time is
 * set against this machine's read bandwidth measured in the same run.
 *
 * Extrapolation (printed with its assumptions): 61 layers = 3 dense + 58 MoE, so a step takes
 * 3 x dense + 58 x MoE + rest; on N nodes each rank reads its share of the weights
 * (`dsinfer plan`'s per-rank bytes for R1), so the step scales by that share, before the
 * communication that `mpirun -np 2 dsinfer bench-layer` measures as rank 0's waiting time. */
#include "cli/cli.h"
#include "dist/dist.h"
#include "kernels/kernels.h"
#include "model/model.h"

#include <getopt.h>
#include <stdlib.h>
#include <string.h>

#define R1_LAYERS 61
#define R1_DENSE 3

static void usage(FILE *f) {
    fprintf(f, "usage: dsinfer bench-layer [--scheme w8a8|w4a8] [--layers N] [--dir DIR] [--keep]\n"
               "                           [--batch 1,8,32,64,192] [--context C] [--steps S]\n"
               "                           [--nodes 1,2,3] [--threads N] [--preset r1|medium|...]\n"
               "  --layers N     layers of the slice: layer 0 dense, the others MoE (default 2)\n"
               "  --dir DIR      where the slice is written (or found); default a directory in\n"
               "                 $TMPDIR removed at the end unless --keep\n"
               "  --context C    tokens of each prompt / context before the decoded token (256)\n"
               "  --steps S      decode steps per batch size, the median reported (3)\n"
               "  --nodes N,...  node counts of the per-node estimate (1,2,3)\n"
               "  --preset P     make-tiny's dimensions (default r1: DeepSeek-R1's)\n");
}

/* ---- per-layer times through the trace hook ---- */
typedef struct {
    int64_t n_layers, n_experts;
    double last, *ms; /* ms[l]: this step's time in layer l (summed over internal chunks) */
    uint8_t *touched; /* [n_layers][n_experts]: the experts the step routed to */
} layer_clock;

static void on_trace(void *ctx, const char *name, const float *data, int64_t rows, int64_t cols) {
    layer_clock *k = ctx;
    long long l = -1;
    int end = 0;
    if (!strcmp(name, "embed")) {
        k->last = ds_now();
    } else if (sscanf(name, "layers.%lld.out%n", &l, &end) == 1 && !name[end] && l >= 0 &&
               l < k->n_layers) {
        double t = ds_now();
        k->ms[l] += 1e3 * (t - k->last);
        k->last = t;
    } else if (sscanf(name, "layers.%lld.moe.gate_experts%n", &l, &end) == 1 && !name[end] &&
               l >= 0 && l < k->n_layers) {
        for (int64_t i = 0; i < rows * cols; i++) {
            int64_t e = (int64_t)data[i];
            if (e >= 0 && e < k->n_experts) k->touched[l * k->n_experts + e] = 1;
        }
    }
}

typedef struct {
    double step_ms, layer_ms[2], gb[2]; /* [0] the dense layer (0), [1] the MoE layers' mean */
    double experts, wait_ms;            /* distinct experts a MoE layer touched; rank 0's wait */
} step_result;

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* Runs one step, filling r from the trace (dense: layer 0; MoE: layers 1.. averaged). */
static int timed_step(ds_model *m, ds_kv_cache *kv, const ds_batch *b, float *logits,
                      layer_clock *k, step_result *r) {
    const int64_t L = k->n_layers, E = k->n_experts;
    memset(k->ms, 0, (size_t)L * sizeof *k->ms);
    memset(k->touched, 0, (size_t)(L * E));
    double w0, w1;
    uint64_t o0, o1;
    ds_dist_wait_stats(&w0, &o0);
    const double t0 = ds_now();
    int rc = ds_model_forward_batch(m, kv, b, logits, NULL);
    r->step_ms = 1e3 * (ds_now() - t0);
    ds_dist_wait_stats(&w1, &o1);
    r->wait_ms = 1e3 * (w1 - w0);
    memset(r->layer_ms, 0, sizeof r->layer_ms);
    memset(r->gb, 0, sizeof r->gb);
    r->experts = 0;
    for (int64_t l = 0; l < L; l++) {
        const int moe = l > 0;
        const double gb = (double)ds_model_layer_bytes(m, l, k->touched + l * E) / 1e9;
        r->layer_ms[moe] += k->ms[l] / (double)(moe ? L - 1 : 1);
        r->gb[moe] += gb / (double)(moe ? L - 1 : 1);
        int64_t n = 0;
        for (int64_t e = 0; moe && e < E; e++) n += k->touched[l * E + e];
        r->experts += (double)n / (double)(L - 1);
    }
    return rc;
}

/* the step's time outside the layers: embedding, final norm, lm_head */
static double rest_ms(const step_result *r, int64_t n_layers) {
    return r->step_ms - r->layer_ms[0] - (double)(n_layers - 1) * r->layer_ms[1];
}

/* GB/s of `gb` gigabytes in `ms` and that as a share of the measured bandwidth */
static void rate(double gb, double ms, double bw, double *gbs, double *pct) {
    *gbs = ms > 0 ? gb / (ms / 1e3) : 0;
    *pct = 100 * *gbs * 1e9 / bw;
}

static void print_row(const char *phase, int32_t batch, int64_t tokens, const step_result *r,
                      int64_t n_layers, double bw, int dist) {
    double g0, p0, g1, p1;
    rate(r->gb[0], r->layer_ms[0], bw, &g0, &p0);
    rate(r->gb[1], r->layer_ms[1], bw, &g1, &p1);
    printf("%-7s %5d %6lld | %8.3f %6.2f %6.2f %4.0f%% | %8.3f %4.0f %6.2f %6.2f %4.0f%% | %7.3f | "
           "%8.3f",
           phase, batch, (long long)tokens, r->layer_ms[0], r->gb[0], g0, p0, r->layer_ms[1],
           r->experts, r->gb[1], g1, p1, rest_ms(r, n_layers), r->step_ms);
    if (dist) printf(" | %5.1f%%", 100 * r->wait_ms / r->step_ms);
    printf("\n");
}

/* The median step of `steps` runs of b (by step time), into *out. */
static int median_step(ds_model *m, ds_kv_cache *kv, const ds_batch *b, float *logits,
                       layer_clock *k, int steps, int32_t *pos, step_result *out) {
    step_result *all = malloc((size_t)steps * sizeof *all);
    double *t = malloc((size_t)steps * sizeof *t);
    if (!all || !t) {
        free(all);
        free(t);
        return ds_err_set(DS_ERR_NOMEM, "out of memory");
    }
    int rc = DS_OK;
    for (int i = 0; i < steps && !rc; i++) {
        rc = timed_step(m, kv, b, logits, k, &all[i]);
        t[i] = all[i].step_ms;
        for (int32_t j = 0; pos && j < b->n_tokens; j++) pos[j]++; /* the next position */
    }
    if (!rc) {
        qsort(t, (size_t)steps, sizeof *t, cmp_double);
        for (int i = 0; i < steps; i++)
            if (all[i].step_ms == t[steps / 2]) *out = all[i];
    }
    free(all);
    free(t);
    return rc;
}

/* Writes the slice with make-tiny unless dir already holds one of this scheme and depth. */
static int ensure_slice(const char *dir, const char *preset, const char *scheme, long layers) {
    ds_config c;
    if (ds_config_load(dir, &c) == DS_OK && c.n_layers == layers &&
        c.quant == (strcmp(scheme, "w4a8") ? DS_QUANT_W8A8 : DS_QUANT_W4A8)) {
        ds_info("bench-layer: reusing the slice in %s", dir);
        return 0;
    }
    char nl[32];
    snprintf(nl, sizeof nl, "%ld", layers);
    char *argv[] = {"make-tiny", (char *)dir,    "--preset",       (char *)preset, "--layers", nl,
                    "--dtype",   (char *)scheme, "--no-tokenizer", "--force",      "--seed",   "1",
                    NULL};
    ds_info("bench-layer: writing a %ld-layer %s slice (preset %s) to %s", layers, scheme, preset,
            dir);
    return ds_cmd_make_tiny((int)(sizeof argv / sizeof *argv) - 1, argv);
}

int ds_cmd_bench_layer(int argc, char **argv) {
    static const struct option opts[] = {
        {"scheme", required_argument, 0, 's'},  {"layers", required_argument, 0, 'l'},
        {"dir", required_argument, 0, 'd'},     {"keep", no_argument, 0, 'k'},
        {"batch", required_argument, 0, 'b'},   {"context", required_argument, 0, 'c'},
        {"steps", required_argument, 0, 'S'},   {"nodes", required_argument, 0, 'n'},
        {"threads", required_argument, 0, 't'}, {"preset", required_argument, 0, 'p'},
        {"help", no_argument, 0, 'h'},          {0, 0, 0, 0}};
    const char *scheme = "w8a8", *dir_arg = NULL, *batch_arg = "1,8,32,64,192",
               *nodes_arg = "1,2,3", *preset = "r1";
    uint64_t layers = 2, context = 256, steps = 3, threads = 0;
    int keep = 0, o;
    optind = 1;
    while ((o = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        const char *bad = NULL;
        switch (o) {
        case 's':
            scheme = optarg;
            break;
        case 'd':
            dir_arg = optarg;
            break;
        case 'k':
            keep = 1;
            break;
        case 'b':
            batch_arg = optarg;
            break;
        case 'n':
            nodes_arg = optarg;
            break;
        case 'p':
            preset = optarg;
            break;
        case 'l':
            if (!ds_cli_parse_u64(optarg, &layers, 0) || layers < 2 || layers > 61)
                bad = "--layers";
            break;
        case 'c':
            if (!ds_cli_parse_u64(optarg, &context, 0) || context < 1 || context > 65536)
                bad = "--context";
            break;
        case 'S':
            if (!ds_cli_parse_u64(optarg, &steps, 0) || steps < 1 || steps > 1000) bad = "--steps";
            break;
        case 't':
            if (!ds_cli_parse_u64(optarg, &threads, 0) || threads < 1 || threads > 1024)
                bad = "--threads";
            break;
        case 'h':
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
        if (bad) {
            fprintf(stderr, "dsinfer bench-layer: %s '%s' is out of range\n", bad, optarg);
            return 2;
        }
    }
    int32_t *batches = NULL, *nodes = NULL;
    int64_t nb = 0, nn = 0;
    int ok = optind == argc && (!strcmp(scheme, "w8a8") || !strcmp(scheme, "w4a8")) &&
             !ds_cli_parse_ids(batch_arg, &batches, &nb) && nb >= 1 && nb <= 16 &&
             !ds_cli_parse_ids(nodes_arg, &nodes, &nn) && nn >= 1 && nn <= 16;
    for (int64_t i = 0; ok && i < nb; i++) ok = batches[i] >= 1 && batches[i] <= 1024;
    for (int64_t i = 0; ok && i < nn; i++) ok = nodes[i] >= 1 && nodes[i] <= 64;
    if (!ok) {
        fprintf(stderr, "dsinfer bench-layer: bad arguments (--scheme w8a8|w4a8, --batch 1..1024 "
                        "x16, --nodes 1..64 x16)\n");
        usage(stderr);
        free(batches);
        free(nodes);
        return 2;
    }
    char dir[4096];
    const char *tmp = getenv("TMPDIR");
    if (dir_arg)
        snprintf(dir, sizeof dir, "%s", dir_arg);
    else
        snprintf(dir, sizeof dir, "%s/dsinfer-bench-layer-%s-%s-%llu", tmp && *tmp ? tmp : "/tmp",
                 preset, scheme, (unsigned long long)layers);
    /* rank 0 writes the slice; the others wait for it (however long that takes) */
    int32_t made = ds_dist_rank() == 0 ? ensure_slice(dir, preset, scheme, (long)layers) : 0;
    if (ds_dist_size() > 1 && ds_dist_bcast(&made, sizeof made, 0, 1)) made = 1;
    ds_model_params mp = ds_model_default_params();
    mp.n_threads = (int)threads;
    int status = 1;
    ds_model *m = NULL;
    ds_kv_cache *kv = NULL;
    float *logits = NULL;
    int32_t *tok = NULL, *pos = NULL, *seq = NULL, *tables = NULL, *lidx = NULL;
    layer_clock k = {0};
    if (made) {
        fprintf(stderr, "dsinfer bench-layer: could not write the slice to %s\n", dir);
        goto out;
    }
    if (ds_dist_rank() > 0) {
        status = ds_cli_follow("bench-layer", dir, &mp);
        goto out;
    }
    if (ds_model_open(dir, &mp, &m)) goto fail;
    const ds_config *c = ds_model_config(m);
    ds_pool *pool = ds_model_pool(m);
    int32_t B = 8;
    for (int64_t i = 0; i < nb; i++) B = batches[i] > B ? batches[i] : B;
    /* the largest step: B decoded tokens, or 8 prompts */
    const int64_t n_tok = (int64_t)B > 8 * (int64_t)context ? (int64_t)B : 8 * (int64_t)context;
    const int32_t maxb = (int32_t)((context + steps + 15) / 16);
    const int32_t n_seq = B > 8 ? B : 8;
    tok = malloc((size_t)n_tok * sizeof *tok);
    pos = malloc((size_t)n_tok * sizeof *pos);
    seq = malloc((size_t)n_tok * sizeof *seq);
    lidx = malloc((size_t)n_seq * sizeof *lidx);
    tables = malloc((size_t)n_seq * (size_t)maxb * sizeof *tables);
    logits = malloc((size_t)n_seq * (size_t)c->vocab_size * sizeof *logits);
    k.n_layers = c->n_layers;
    k.n_experts = c->n_routed_experts > 0 ? c->n_routed_experts : 1;
    k.ms = calloc((size_t)k.n_layers, sizeof *k.ms);
    k.touched = calloc((size_t)(k.n_layers * k.n_experts), 1);
    if (!tok || !pos || !seq || !lidx || !tables || !logits || !k.ms || !k.touched) {
        ds_err_set(DS_ERR_NOMEM, "out of memory");
        goto fail;
    }
    if (ds_kv_open_paged(c, (int64_t)n_seq * maxb, 16, DS_KV_F32, &kv)) goto fail;
    for (int64_t i = 0; i < (int64_t)n_seq * maxb; i++) tables[i] = (int32_t)i;
    uint64_t rs = 12345;
    for (int64_t i = 0; i < n_tok; i++) {
        rs = rs * 6364136223846793005ull + 1442695040888963407ull;
        tok[i] = (int32_t)((rs >> 33) % (uint64_t)c->vocab_size);
    }
    ds_model_set_trace(m, on_trace, &k);
    const double bw = ds_measure_read_bandwidth(pool, (size_t)1 << 30);
    const int dist = ds_dist_size() > 1;
    printf("bench-layer  %s: %s, %lld layers (layer 0 dense, %lld MoE), hidden %lld, %lld heads, "
           "%lld experts top-%lld; %s, %d threads%s\n",
           dir, scheme, (long long)c->n_layers, (long long)c->n_layers - 1,
           (long long)c->hidden_size, (long long)c->n_heads, (long long)c->n_routed_experts,
           (long long)c->n_experts_per_tok, ds_kernels_get()->name, ds_pool_size(pool),
           dist ? ", ranks below" : "");
    if (dist)
        printf("ranks        %d (rank 0's figures; the last column: its time waiting for the "
               "others)\n",
               ds_dist_size());
    printf("read bandwidth %.2f GB/s (measured here, 1 GiB)\n", bw / 1e9);

    /* warm-up: every sequence decodes one token (touching nearly every expert), faulting the
     * weights in */
    for (int32_t q = 0; q < n_seq; q++) pos[q] = (int32_t)context, seq[q] = q, lidx[q] = q;
    ds_batch warm = {n_seq, tok, pos, seq, n_seq, maxb, tables, n_seq, lidx};
    step_result r;
    if (timed_step(m, kv, &warm, logits, &k, &r)) goto fail;

    printf("\n%-7s %5s %6s | %8s %6s %6s %5s | %8s %4s %6s %6s %5s | %7s | %8s%s\n", "phase",
           "batch", "tokens", "dense ms", "GB", "GB/s", "bw", "MoE ms", "exp", "GB", "GB/s", "bw",
           "rest ms", "step ms", dist ? " |  wait" : "");
    step_result pre[2] = {{0}}, dec[16];
    const int32_t pre_b[2] = {1, 8};
    for (int i = 0; i < 2; i++) { /* prefill: prompts of `context` tokens, one step */
        int32_t n = 0;
        for (int32_t q = 0; q < pre_b[i]; q++) {
            for (uint64_t p = 0; p < context; p++, n++) pos[n] = (int32_t)p, seq[n] = q;
            lidx[q] = n - 1;
        }
        ds_batch b = {n, tok, pos, seq, n_seq, maxb, tables, pre_b[i], lidx};
        if (timed_step(m, kv, &b, logits, &k, &pre[i])) goto fail;
        print_row("prefill", pre_b[i], n, &pre[i], c->n_layers, bw, dist);
    }
    for (int64_t i = 0; i < nb; i++) { /* decode: one token per sequence at `context` */
        const int32_t b = batches[i];
        for (int32_t q = 0; q < b; q++) pos[q] = (int32_t)context, seq[q] = q, lidx[q] = q;
        ds_batch db = {b, tok, pos, seq, n_seq, maxb, tables, b, lidx};
        if (median_step(m, kv, &db, logits, &k, (int)steps, pos, &dec[i])) goto fail;
        print_row("decode", b, b, &dec[i], c->n_layers, bw, dist);
    }
    printf("(dense: layer 0; MoE: the mean of layers 1..%lld, exp = distinct experts a step "
           "touched; GB = weights read; bw = GB/s against the measured read bandwidth; rest = "
           "embedding + final norm + lm_head)\n",
           (long long)c->n_layers - 1);

    /* 61 layers, and N nodes (under mpirun the figures are already a rank's of this run) */
    if (dist) nn = 0;
    ds_config full = *c;
    full.n_layers = R1_LAYERS;
    full.first_k_dense_replace = R1_DENSE;
    ds_plan_params pp = ds_plan_params_of(&full);
    pp.mem_per_node = 1ull << 50; /* only the shares matter here */
    ds_plan one;
    double share[16];
    if (ds_plan_run(&full, &pp, &one)) goto fail;
    for (int64_t j = 0; j < nn; j++) {
        ds_plan pn;
        pp.nodes = nodes[j];
        share[j] =
            ds_plan_run(&full, &pp, &pn) ? 0 : (double)pn.rank0.weights / (double)one.weights_all;
    }
    printf("\n%d layers (%d dense + %d MoE) from these figures: step = %d x dense + %d x MoE + "
           "rest",
           R1_LAYERS, R1_DENSE, R1_LAYERS - R1_DENSE, R1_DENSE, R1_LAYERS - R1_DENSE);
    if (dist)
        printf(", on these %d ranks, communication included\n", ds_dist_size());
    else
        printf("; on N nodes x rank 0's weight share (dsinfer plan)\n");
    printf("%-7s %5s | %10s %9s", "phase", "batch", "step ms", "tok/s");
    for (int64_t j = 0; j < nn; j++) printf(" | N=%-2d tok/s", nodes[j]);
    printf("\n");
    for (int i = 0; i < 2 + (int)nb; i++) {
        const step_result *x = i < 2 ? &pre[i] : &dec[i - 2];
        const int32_t b = i < 2 ? pre_b[i] : batches[i - 2];
        const double tokens = i < 2 ? (double)b * (double)context : (double)b;
        const double ms = R1_DENSE * x->layer_ms[0] + (R1_LAYERS - R1_DENSE) * x->layer_ms[1] +
                          rest_ms(x, c->n_layers);
        printf("%-7s %5d | %10.3f %9.2f", i < 2 ? "prefill" : "decode", b, ms, tokens / ms * 1e3);
        for (int64_t j = 0; j < nn; j++)
            printf(" | %10.2f", share[j] > 0 ? tokens / (ms * share[j]) * 1e3 : 0);
        printf("\n");
    }
    printf("assumptions: random weights route near-uniformly (real routing is skewed: fewer "
           "distinct experts per step, fewer bytes); every layer of a kind costs what the "
           "measured one did at context %llu; the weights are all resident (the whole of R1 needs "
           "far more memory than this machine: time only)",
           (unsigned long long)context);
    if (!dist) {
        printf("; on N nodes a rank's time scales with its weight share");
        for (int64_t j = 0; j < nn; j++) printf("%s%d: %.3f", j ? ", " : " (", nodes[j], share[j]);
        printf("), before communication (mpirun -np 2 dsinfer bench-layer measures it)");
    }
    printf("\n");
    status = 0;
    goto out;
fail:
    fprintf(stderr, "dsinfer bench-layer: %s\n", ds_err_msg());
out:
    ds_kv_close(kv);
    ds_model_close(m);
    free(tok);
    free(pos);
    free(seq);
    free(lidx);
    free(tables);
    free(logits);
    free(k.ms);
    free(k.touched);
    free(batches);
    free(nodes);
    if (!dir_arg && !keep && ds_dist_rank() == 0 && !made) ds_cli_rm_tree(dir);
    return status;
}
