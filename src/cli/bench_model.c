/* dsinfer bench-model: prefill and decode speed of a checkpoint, set against this machine's
 * measured memory read bandwidth in the same run.
 *
 * Decode of one sequence is bound by reading weights: every token streams all dense weights,
 * the active experts and lm_head. bytes_per_token x decode tokens/s is the bandwidth the forward
 * pass achieved; dividing by the bandwidth a plain parallel read loop reaches here gives the
 * fraction of the memory-bandwidth limit, a ratio that stays comparable across machines. */
#include "cli/cli.h"
#include "dist/dist.h"
#include "kernels/kernels.h"
#include "model/model.h"

#include <getopt.h>
#include <stdlib.h>

static void usage(FILE *f) {
    fprintf(f, "usage: dsinfer bench-model [DIR] [--prompt-tokens N] [--decode-tokens N]\n"
               "                           [--threads N] [--bandwidth-mib N] [--batch B,B,...]\n"
               "                           [--mmap]\n"
               "  --batch B,...  decode B sequences together (each after --prompt-tokens of\n"
               "                 context, default 32 here) for --decode-tokens steps, against the\n"
               "                 memory and compute limits measured in the same run\n"
               "  --mmap         weights mapped from the files (4 KiB pages), not loaded onto\n"
               "                 2 MiB pages\n"
               "  DIR defaults to the built-in demo model; make a comparable one with\n"
               "  dsinfer make-tiny DIR --preset medium\n");
}

static long parse_pos(const char *flag, const char *v, long max) {
    char *end;
    long x = strtol(v, &end, 10);
    if (*end || x < 1 || x > max) {
        fprintf(stderr, "dsinfer bench-model: %s '%s' must be 1..%ld\n", flag, v, max);
        return -1;
    }
    return x;
}

int ds_cmd_bench_model(int argc, char **argv) {
    static const struct option opts[] = {{"prompt-tokens", required_argument, 0, 'p'},
                                         {"decode-tokens", required_argument, 0, 'd'},
                                         {"threads", required_argument, 0, 't'},
                                         {"bandwidth-mib", required_argument, 0, 'b'},
                                         {"batch", required_argument, 0, 'B'},
                                         {"mmap", no_argument, 0, 'M'},
                                         {"help", no_argument, 0, 'h'},
                                         {0, 0, 0, 0}};
    long n_prompt = 128, n_decode = 32, bw_mib = 1024;
    int prompt_set = 0;
    const char *batch = NULL;
    ds_model_params mp = ds_model_default_params();
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        long v = 0;
        switch (c) {
        case 'p':
            v = n_prompt = parse_pos("--prompt-tokens", optarg, 1 << 20);
            prompt_set = 1;
            break;
        case 'B':
            batch = optarg;
            break;
        case 'M':
            mp.map_weights = 1;
            break;
        case 'd':
            v = n_decode = parse_pos("--decode-tokens", optarg, 1 << 20);
            break;
        case 't':
            v = mp.n_threads = (int)parse_pos("--threads", optarg, 1024);
            break;
        case 'b':
            v = bw_mib = parse_pos("--bandwidth-mib", optarg, 1 << 20);
            break;
        case 'h':
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
        if (v < 0) return 2;
    }
    if (argc - optind > 1) {
        usage(stderr);
        return 2;
    }
    const char *dir = optind < argc ? argv[optind] : ds_cli_default_model();

    ds_model *m = NULL;
    ds_kv_cache *kv = NULL;
    float *logits = NULL;
    int32_t *ids = NULL;
    int status = 1;
    if (ds_dist_rank() > 0) return ds_cli_follow("bench-model", dir, &mp);
    if (ds_model_open(dir, &mp, &m)) goto out;
    const ds_config *cfg = ds_model_config(m);
    ds_pool *pool = ds_model_pool(m);
    double bw = ds_measure_read_bandwidth(pool, (size_t)bw_mib << 20);
    if (ds_kv_open(cfg, n_prompt + n_decode, &kv)) goto out;
    logits = malloc((size_t)cfg->vocab_size * sizeof *logits);
    ids = malloc((size_t)n_prompt * sizeof *ids);
    if (!logits || !ids) {
        ds_err_set(DS_ERR_NOMEM, "out of memory");
        goto out;
    }
    if (batch) {
        int32_t *bs = NULL;
        int64_t nb = 0;
        if (ds_cli_parse_ids(batch, &bs, &nb) || nb < 1 || nb > 64) {
            free(bs);
            ds_err_set(DS_ERR_ARG, "--batch '%s' must be 1 to 64 batch sizes such as 1,8,32",
                       batch);
            goto out;
        }
        int ok = 1;
        for (int64_t i = 0; i < nb; i++) ok &= bs[i] >= 1 && bs[i] <= 4096;
        if (!ok) ds_err_set(DS_ERR_ARG, "--batch sizes must be 1..4096");
        if (ok)
            printf("model            %s (%s, %d threads)\n", dir, ds_kernels_get()->name,
                   ds_pool_size(pool));
        if (ok && !ds_cli_bench_batch(m, bs, (int)nb, prompt_set ? n_prompt : 32, n_decode, bw,
                                      (size_t)bw_mib << 20))
            status = 0;
        free(bs);
        goto out;
    }
    uint64_t s = 12345; /* fixed prompt: runs stay comparable */
    for (long i = 0; i < n_prompt; i++) {
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        ids[i] = (int32_t)((s >> 33) % (uint64_t)cfg->vocab_size);
    }
    /* Warm-up: fault the mapping in so the timings measure compute, not page faults. */
    if (ds_model_forward(m, kv, ids, 1, 0, logits, 0)) goto out;
    double t0 = ds_now();
    if (ds_model_forward(m, kv, ids, n_prompt, 0, logits, 0)) goto out;
    double t1 = ds_now();
    int32_t tok = ids[0];
    double w0, w1;
    uint64_t ops0, ops1;
    ds_dist_wait_stats(&w0, &ops0);
    for (long i = 0; i < n_decode; i++) {
        tok = (tok * 7919 + 13) % (int32_t)cfg->vocab_size;
        if (ds_model_forward(m, kv, &tok, 1, n_prompt + i, logits, 0)) goto out;
    }
    double t2 = ds_now();
    ds_dist_wait_stats(&w1, &ops1);
    double prefill_tps = (double)n_prompt / (t1 - t0), decode_tps = (double)n_decode / (t2 - t1);
    uint64_t bpt = ds_model_bytes_per_token(m);
    double achieved = (double)bpt * decode_tps;
    printf("model            %s\n", dir);
    printf("isa / threads    %s / %d\n", ds_kernels_get()->name, ds_pool_size(pool));
    printf("weights          %.1f MiB total, %.1f MiB read per decoded token\n",
           (double)ds_model_weight_bytes(m) / (1 << 20), (double)bpt / (1 << 20));
    printf("read bandwidth   %.2f GB/s (measured here, %ld MiB buffer)\n", bw / 1e9, bw_mib);
    printf("prefill          %ld tokens: %.1f tok/s\n", n_prompt, prefill_tps);
    printf("decode           %ld tokens: %.2f tok/s, %.2f ms/token\n", n_decode, decode_tps,
           1e3 / decode_tps);
    printf("decode weight bandwidth %.2f GB/s = %.1f%% of the measured read bandwidth\n",
           achieved / 1e9, 100.0 * achieved / bw);
    if (ds_dist_size() > 1)
        printf("ranks            %d: rank 0 waited for the others %.3f ms/token in %.0f "
               "operations = %.1f%% of decode time (weights and bandwidth above: rank 0's)\n",
               ds_dist_size(), 1e3 * (w1 - w0) / (double)n_decode,
               (double)(ops1 - ops0) / (double)n_decode, 100.0 * (w1 - w0) / (t2 - t1));
    status = 0;
out:
    if (status) fprintf(stderr, "dsinfer bench-model: %s\n", ds_err_msg());
    free(ids);
    free(logits);
    ds_kv_close(kv);
    ds_model_close(m);
    return status;
}
