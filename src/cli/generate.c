/* dsinfer generate: greedy decoding of a token-id prompt; the generated ids on stdout. */
#include "cli/cli.h"
#include "model/model.h"

#include <getopt.h>
#include <stdlib.h>
#include <string.h>

static void usage(FILE *f) {
    fprintf(f,
            "usage: dsinfer generate [--model DIR] --prompt-ids IDS [--max-tokens N]\n"
            "                        [--threads N] [--ignore-eos]\n"
            "  --model DIR        checkpoint directory (default: the built-in demo model)\n"
            "  --prompt-ids IDS   prompt token ids, e.g. 0,671,4787 (used exactly; no BOS added)\n"
            "  --max-tokens N     tokens to generate (default 16)\n"
            "  --threads N        worker threads (default: all CPUs)\n"
            "  --ignore-eos       keep generating past the end-of-sequence token\n"
            "Prints the generated ids on stdout, comma-separated; logs go to stderr.\n");
}

static int argmax(const float *x, int64_t n) {
    int64_t best = 0;
    for (int64_t i = 1; i < n; i++)
        if (x[i] > x[best]) best = i;
    return (int)best;
}

int ds_cmd_generate(int argc, char **argv) {
    static const struct option opts[] = {
        {"model", required_argument, 0, 'm'},    {"prompt-ids", required_argument, 0, 'p'},
        {"prompt", required_argument, 0, 'P'},   {"max-tokens", required_argument, 0, 'n'},
        {"threads", required_argument, 0, 't'},  {"ignore-eos", no_argument, 0, 'e'},
        {"help", no_argument, 0, 'h'},           {0, 0, 0, 0}};
    const char *model_dir = ds_cli_default_model(), *ids_arg = NULL;
    long max_tokens = 16;
    int ignore_eos = 0;
    ds_model_params mp = ds_model_default_params();
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        char *end = NULL;
        switch (c) {
        case 'm': model_dir = optarg; break;
        case 'p': ids_arg = optarg; break;
        case 'P':
            fprintf(stderr, "dsinfer generate: --prompt TEXT needs the tokenizer, which is not "
                            "built yet; pass token ids with --prompt-ids\n");
            return 2;
        case 'n':
            max_tokens = strtol(optarg, &end, 10);
            if (*end || max_tokens < 1 || max_tokens > 1000000) {
                fprintf(stderr, "dsinfer generate: --max-tokens '%s' must be 1..1000000\n", optarg);
                return 2;
            }
            break;
        case 't':
            mp.n_threads = (int)strtol(optarg, &end, 10);
            if (*end || mp.n_threads < 1 || mp.n_threads > 1024) {
                fprintf(stderr, "dsinfer generate: --threads '%s' must be 1..1024\n", optarg);
                return 2;
            }
            break;
        case 'e': ignore_eos = 1; break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (optind < argc || !ids_arg) {
        usage(stderr);
        return 2;
    }
    int32_t *ids;
    int64_t n_ids;
    if (ds_cli_parse_ids(ids_arg, &ids, &n_ids) != 0) {
        fprintf(stderr, "dsinfer generate: %s\n", ds_err_msg());
        return 2;
    }
    ds_model *m = NULL;
    ds_kv_cache *kv = NULL;
    float *logits = NULL;
    int status = 1;
    double t0 = ds_now();
    if (ds_model_open(model_dir, &mp, &m)) goto fail;
    const ds_config *cfg = ds_model_config(m);
    ds_info("loaded %s in %.2fs (%d threads)", model_dir, ds_now() - t0,
            ds_pool_size(ds_model_pool(m)));
    if (n_ids + max_tokens > cfg->max_position_embeddings) {
        ds_err_set(DS_ERR_RANGE,
                   "prompt (%lld tokens) + --max-tokens (%ld) exceeds the model's "
                   "max_position_embeddings (%lld)",
                   (long long)n_ids, max_tokens, (long long)cfg->max_position_embeddings);
        goto fail;
    }
    if (ds_kv_open(cfg, n_ids + max_tokens, &kv)) goto fail;
    if (!(logits = malloc((size_t)cfg->vocab_size * sizeof *logits))) {
        ds_err_set(DS_ERR_NOMEM, "out of memory");
        goto fail;
    }
    double t1 = ds_now();
    if (ds_model_forward(m, kv, ids, n_ids, 0, logits, 0)) goto fail;
    double t2 = ds_now();
    long produced = 0;
    for (; produced < max_tokens; produced++) {
        int32_t tok = argmax(logits, cfg->vocab_size);
        int is_eos = 0;
        for (int i = 0; i < cfg->n_eos; i++) is_eos |= tok == cfg->eos_token_ids[i];
        if (is_eos && !ignore_eos) {
            ds_info("stopped at end-of-sequence token %d", tok);
            break;
        }
        printf("%s%d", produced ? "," : "", tok);
        fflush(stdout);
        if (produced + 1 < max_tokens && ds_model_forward(m, kv, &tok, 1, n_ids + produced, logits, 0))
            goto fail;
    }
    printf("\n");
    double t3 = ds_now();
    ds_info("prefill %lld tokens in %.3fs (%.1f tok/s); decode %ld tokens in %.3fs (%.1f tok/s)",
            (long long)n_ids, t2 - t1, (double)n_ids / (t2 - t1), produced, t3 - t2,
            produced > 1 ? (double)(produced - 1) / (t3 - t2) : 0.0);
    status = 0;
fail:
    if (status) fprintf(stderr, "dsinfer generate: %s\n", ds_err_msg());
    free(logits);
    free(ids);
    ds_kv_close(kv);
    ds_model_close(m);
    return status;
}
