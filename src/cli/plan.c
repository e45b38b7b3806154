/* `dsinfer plan`: how many servers a deployment needs and what each holds, from config.json
 * alone (src/model/plan.c): the weights of every rank under dsinfer's shard plan, the MLA KV
 * cache the engine would size and the concurrency it allows at max_model_len, the runtime
 * buffers, whether it fits, the smallest node count that does, and the field's rule of thumb
 * (free memory >= weights / nodes x 1.3) beside it. */
#include "cli/cli.h"
#include "core/core.h"
#include "io/io.h"
#include "model/model.h"

#include <getopt.h>
#include <inttypes.h>
#include <jansson.h>
#include <stdlib.h>
#include <string.h>

#define RULE_OF_THUMB 1.3

static void usage(FILE *f) {
    fprintf(f,
            "usage: dsinfer plan --config CONFIG_JSON|MODEL_DIR --mem-per-node BYTES [--nodes N]\n"
            "                    [--scheme bf16|fp8|w8a8|w4a8] [options]\n\n"
            "  --config P             config.json, or a directory holding it (nothing else read)\n"
            "  --mem-per-node BYTES   memory of one node, e.g. 384G (K/M/G/T: powers of 1024)\n"
            "  --nodes N              ranks, one per node (default 1)\n"
            "  --scheme S             the checkpoint's weights (default: as config.json's\n"
            "                         quantization_config says; bf16 when it has none)\n"
            "  --group-size G         W4A8 group along the input (default: config's, else 128)\n"
            "  --quantize-lm-head     lm_head quantized too (dsinfer quantize --quantize-lm-head)\n"
            "  --max-model-len L      tokens per sequence (default: max_position_embeddings)\n"
            "  --max-num-seqs S       sequences at once (default 256)\n"
            "  --block-size N         tokens per KV block (default 16)\n"
            "  --kv-cache-dtype T     f32 (default) or bf16 / f16\n"
            "  --memory-utilization F fraction of memory for weights + KV cache (default 0.9)\n"
            "  --threads N            worker threads per node (default 64)\n"
            "  --json                 one JSON object on stdout\n\n"
            "Exit status: 0 it fits, 3 it does not fit on N nodes, 1 error, 2 usage.\n");
}

static json_t *rank_json(const ds_plan_rank *r, int rank) {
    return json_pack("{s:i, s:I, s:I, s:I, s:I}", "rank", rank, "weights_bytes",
                     (json_int_t)r->weights, "replicated_bytes", (json_int_t)r->weights_whole,
                     "runtime_bytes", (json_int_t)r->runtime, "total_bytes", (json_int_t)r->total);
}

static void print_rank(const char *label, const ds_plan_rank *r) {
    char a[32], b[32], c[32], d[32];
    printf("  %-18s weights %10s (replicated %s)  runtime %9s  with the KV cache %10s\n", label,
           ds_cli_human_bytes(r->weights, a, sizeof a),
           ds_cli_human_bytes(r->weights_whole, b, sizeof b),
           ds_cli_human_bytes(r->runtime, c, sizeof c), ds_cli_human_bytes(r->total, d, sizeof d));
}

int ds_cmd_plan(int argc, char **argv) {
    enum { O_QLM = 0x100, O_MNS, O_BS, O_KVD, O_MU, O_JSON, O_GROUP, O_MML };
    static const struct option opts[] = {
        {"config", required_argument, 0, 'c'},
        {"mem-per-node", required_argument, 0, 'm'},
        {"nodes", required_argument, 0, 'n'},
        {"scheme", required_argument, 0, 's'},
        {"group-size", required_argument, 0, O_GROUP},
        {"quantize-lm-head", no_argument, 0, O_QLM},
        {"max-model-len", required_argument, 0, O_MML},
        {"max-num-seqs", required_argument, 0, O_MNS},
        {"block-size", required_argument, 0, O_BS},
        {"kv-cache-dtype", required_argument, 0, O_KVD},
        {"memory-utilization", required_argument, 0, O_MU},
        {"threads", required_argument, 0, 't'},
        {"json", no_argument, 0, O_JSON},
        {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0},
    };
    /* what is given; the rest comes from the config (ds_plan_params_of) */
    const char *config = NULL, *scheme = NULL, *kv_dtype = NULL;
    uint64_t mem = 0, group = 0, nodes = 1, threads = 0, max_len = 0, max_seqs = 0, block = 0;
    double util = 0;
    int json = 0, lm_head = 0, o;
    optind = 1;
    while ((o = getopt_long(argc, argv, "c:m:n:s:t:h", opts, NULL)) != -1) {
        const char *bad = NULL;
        switch (o) {
        case 'c':
            config = optarg;
            break;
        case 's':
            scheme = optarg;
            break;
        case O_KVD:
            kv_dtype = optarg;
            break;
        case 'm':
            if (!ds_cli_parse_u64(optarg, &mem, 1) || !mem) bad = "--mem-per-node";
            break;
        case 'n':
            if (!ds_cli_parse_u64(optarg, &nodes, 0) || nodes < 1 || nodes > 65536) bad = "--nodes";
            break;
        case 't':
            if (!ds_cli_parse_u64(optarg, &threads, 0) || threads < 1 || threads > 65536)
                bad = "--threads";
            break;
        case O_GROUP:
            if (!ds_cli_parse_u64(optarg, &group, 0) || group < 2 || group > (1u << 30))
                bad = "--group-size";
            break;
        case O_QLM:
            lm_head = 1;
            break;
        case O_MML:
            if (!ds_cli_parse_u64(optarg, &max_len, 0) || max_len < 1 || max_len > INT32_MAX)
                bad = "--max-model-len";
            break;
        case O_MNS:
            if (!ds_cli_parse_u64(optarg, &max_seqs, 0) || max_seqs < 1 || max_seqs > 65536)
                bad = "--max-num-seqs";
            break;
        case O_BS:
            if (!ds_cli_parse_u64(optarg, &block, 0) || block < 1 || block > 4096)
                bad = "--block-size";
            break;
        case O_MU: {
            char *e = NULL;
            util = strtod(optarg, &e);
            if (!e || *e || !(util > 0 && util <= 1)) bad = "--memory-utilization";
            break;
        }
        case O_JSON:
            json = 1;
            break;
        case 'h':
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
        if (bad) {
            fprintf(stderr, "dsinfer plan: %s '%s' is out of range or malformed\n", bad, optarg);
            return 2;
        }
    }
    if (optind < argc || !config || !mem) {
        fprintf(stderr, "dsinfer plan: %s\n",
                optind < argc ? "unexpected argument" : "--config and --mem-per-node are required");
        usage(stderr);
        return 2;
    }
    ds_config c;
    if (ds_config_load(config, &c)) {
        fprintf(stderr, "dsinfer plan: %s\n", ds_err_msg());
        return 1;
    }
    ds_plan_params p = ds_plan_params_of(&c);
    if ((scheme && ds_plan_scheme_parse(scheme, &p.scheme)) ||
        (kv_dtype && ds_kv_dtype_parse(kv_dtype, &p.kv_dtype))) {
        fprintf(stderr, "dsinfer plan: %s\n", ds_err_msg());
        return 2;
    }
    p.mem_per_node = mem;
    p.nodes = (int)nodes;
    p.quantize_lm_head = lm_head;
    if (group) p.group = (int64_t)group;
    if (threads) p.threads = (int)threads;
    if (max_len) p.max_model_len = (int64_t)max_len;
    if (max_seqs) p.max_num_seqs = (int64_t)max_seqs;
    if (block) p.block_size = (int64_t)block;
    if (util > 0) p.memory_utilization = util;
    ds_plan r;
    if (ds_plan_run(&c, &p, &r)) {
        fprintf(stderr, "dsinfer plan: %s\n", ds_err_msg());
        return 1;
    }
    const int min_fit = ds_plan_min_nodes(&c, &p, 0), min_full = ds_plan_min_nodes(&c, &p, 1);
    /* the rule of thumb: the whole checkpoint's weights / nodes x 1.3 must be free on a node */
    int min_rule = 0;
    for (int n = 1; n <= 65536 && !min_rule; n++)
        if ((double)r.weights_all / n * RULE_OF_THUMB <= (double)p.mem_per_node) min_rule = n;

    if (json) {
        json_t *ranks = json_array(); /* rank 0 (it holds the engine), and the largest */
        json_array_append_new(ranks, rank_json(&r.rank0, 0));
        if (r.worst_rank) json_array_append_new(ranks, rank_json(&r.worst, r.worst_rank));
        json_t *out = json_pack(
            "{s:s, s:i, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:o, s:b, s:b, s:i, s:i, s:i}",
            "scheme", ds_plan_scheme_name(p.scheme), "nodes", p.nodes, "mem_per_node_bytes",
            (json_int_t)p.mem_per_node, "weights_bytes", (json_int_t)r.weights_all, "max_model_len",
            (json_int_t)r.max_model_len, "kv_bytes_per_token", (json_int_t)r.kv_per_token,
            "kv_blocks", (json_int_t)r.kv_blocks, "kv_blocks_fit", (json_int_t)r.kv_blocks_fit,
            "kv_bytes_per_rank", (json_int_t)r.kv_bytes, "max_seqs_at_len",
            (json_int_t)r.seqs_at_len, "max_num_seqs", (json_int_t)p.max_num_seqs, "ranks", ranks,
            "fits", r.fits, "fits_max_num_seqs", r.full, "min_nodes", min_fit,
            "min_nodes_max_num_seqs", min_full, "min_nodes_rule_of_thumb", min_rule);
        char *s = out ? json_dumps(out, JSON_INDENT(1)) : NULL;
        if (!s) {
            fprintf(stderr, "dsinfer plan: out of memory\n");
            json_decref(out);
            return 1;
        }
        printf("%s\n", s);
        free(s);
        json_decref(out);
        return r.fits ? 0 : 3;
    }

    char a[32], b[32], d[32];
    printf("plan: %lld layers, hidden %lld, %lld heads, %lld routed experts; scheme %s",
           (long long)c.n_layers, (long long)c.hidden_size, (long long)c.n_heads,
           (long long)c.n_routed_experts, ds_plan_scheme_name(p.scheme));
    if (p.scheme == DS_PLAN_W4A8) printf(" (group %lld)", (long long)p.group);
    printf("; %d node%s x %s\n", p.nodes, p.nodes == 1 ? "" : "s",
           ds_cli_human_bytes(p.mem_per_node, a, sizeof a));
    printf("weights       %s in all (MTP layers not loaded); per rank:\n",
           ds_cli_human_bytes(r.weights_all, a, sizeof a));
    print_rank("rank 0", &r.rank0);
    if (r.worst_rank) {
        char label[32];
        snprintf(label, sizeof label, "rank %d (largest)", r.worst_rank);
        print_rank(label, &r.worst);
    }
    printf("kv cache      %" PRIu64 " bytes per token (%s, %lld layers x (%lld + %lld)); "
           "%lld blocks of %lld fit in %.0f%% of rank 0's memory after its weights\n",
           r.kv_per_token, ds_kv_dtype_name(p.kv_dtype), (long long)c.n_layers,
           (long long)c.kv_lora_rank, (long long)c.qk_rope_head_dim, (long long)r.kv_blocks_fit,
           (long long)p.block_size, 100 * p.memory_utilization);
    printf("              allocated: %lld blocks = %s on every rank (at most %lld sequences x "
           "max_model_len %lld)\n",
           (long long)r.kv_blocks, ds_cli_human_bytes(r.kv_bytes, b, sizeof b),
           (long long)p.max_num_seqs, (long long)r.max_model_len);
    printf("concurrency   %lld sequences of %lld tokens at once (--max-num-seqs %lld)\n",
           (long long)r.seqs_at_len, (long long)r.max_model_len, (long long)p.max_num_seqs);
    printf("assumptions   runtime = the forward scratch for %lld-token chunks with %d threads, "
           "gather buffers, the engine's logits and samplers, + %s fixed (an estimate)\n",
           (long long)p.chunk_tokens, p.threads, ds_cli_human_bytes(p.fixed_bytes, d, sizeof d));
    if (r.fits)
        printf("verdict       fits on %d node%s%s\n", p.nodes, p.nodes == 1 ? "" : "s",
               r.full ? "" : ", but not with --max-num-seqs sequences of max_model_len at once");
    else if (r.worst.total > p.mem_per_node)
        printf("verdict       does not fit: rank %d needs %s of %s\n", r.worst_rank,
               ds_cli_human_bytes(r.worst.total, a, sizeof a),
               ds_cli_human_bytes(p.mem_per_node, b, sizeof b));
    else
        printf("verdict       does not fit: the KV cache cannot hold one sequence of %lld tokens\n",
               (long long)r.max_model_len);
    printf("smallest N    %d that fits, %d for %lld sequences of %lld tokens at once "
           "(0: none); the rule of thumb (weights / N x %.1f <= memory) says %d\n",
           min_fit, min_full, (long long)p.max_num_seqs, (long long)r.max_model_len, RULE_OF_THUMB,
           min_rule);
    return r.fits ? 0 : 3;
}
