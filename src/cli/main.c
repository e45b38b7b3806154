/* dsinfer: one program, one subcommand per job. Nothing else lives here. */
#include "cli/cli.h"
#include "core/core.h"
#include "dist/dist.h"

#include <stdio.h>
#include <string.h>

#ifndef DSINFER_VERSION
#define DSINFER_VERSION "dev"
#endif

static const struct {
    const char *name;
    int (*fn)(int, char **);
    const char *help;
} commands[] = {
    {"serve", ds_cmd_serve, "OpenAI-compatible HTTP server (completions, chat, metrics)"},
    {"bench", ds_cmd_bench, "serving benchmark of an OpenAI-compatible endpoint (vLLM figures)"},
    {"generate", ds_cmd_generate, "greedy generation from token ids (ids on stdout)"},
    {"make-tiny", ds_cmd_make_tiny, "write a random DeepSeek-V3 checkpoint in the HF layout"},
    {"info", ds_cmd_info, "print a checkpoint's config, parameter counts and bytes per dtype"},
    {"bench-model", ds_cmd_bench_model, "prefill/decode tokens/s vs this machine's bandwidth"},
    {"bench-kernels", ds_cmd_bench_kernels, "matmul kernels vs read bandwidth and peak int8 ops"},
    {"bench-layer", ds_cmd_bench_layer, "DeepSeek-R1 at full width, per layer, extrapolated"},
    {"tokenize", ds_cmd_tokenize, "text to token ids with the model's tokenizer.json"},
    {"detokenize", ds_cmd_detokenize, "token ids to text (lossy UTF-8)"},
    {"chat-template", ds_cmd_chat_template, "render a JSON messages array with the chat template"},
    {"quantize", ds_cmd_quantize, "int8 / int4 weights (w8a8, w4a8) from a BF16 or FP8 checkpoint"},
    {"launch", ds_cmd_launch, "run dsinfer serve over several hosts with mpirun (--dry-run)"},
    {"check", ds_cmd_check, "deployment preflight: files, shards, config, memory, disk, ranks"},
    {"plan", ds_cmd_plan, "bytes per node of an N-node deployment, from config.json alone"},
};

static void usage(FILE *f) {
    fprintf(f, "usage: dsinfer <command> [options]   (dsinfer <command> --help)\n\ncommands:\n");
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        fprintf(f, "  %-12s %s\n", commands[i].name, commands[i].help);
}

int main(int argc, char **argv) {
    if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") ||
        !strcmp(argv[1], "help")) {
        usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    if (!strcmp(argv[1], "--version")) {
        printf("dsinfer %s\n", DSINFER_VERSION);
        return 0;
    }
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++) {
        if (strcmp(argv[1], commands[i].name)) continue;
        /* under mpirun every rank runs the same command line (src/dist) */
        if (ds_dist_init(&argc, &argv)) {
            fprintf(stderr, "dsinfer: %s\n", ds_err_msg());
            return 1;
        }
        int rc = commands[i].fn(argc - 1, argv + 1);
        ds_dist_finalize();
        return rc;
    }
    fprintf(stderr, "dsinfer: unknown command '%s'\n", argv[1]);
    usage(stderr);
    return 2;
}
