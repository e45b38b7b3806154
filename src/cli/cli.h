/* cli: the `dsinfer` subcommands. Each takes the arguments after its name (argv[0] is the
 * subcommand name) and returns the process exit status: 0 ok, 1 runtime error, 2 usage error.
 * Results go to stdout; logs, progress and errors to stderr. */
#ifndef DS_CLI_H
#define DS_CLI_H

#include "engine/engine.h"
#include "model/model.h"

#include <getopt.h>
#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

int ds_cmd_generate(int argc, char **argv);
int ds_cmd_make_tiny(int argc, char **argv);
int ds_cmd_info(int argc, char **argv);
int ds_cmd_bench_model(int argc, char **argv);
int ds_cmd_tokenize(int argc, char **argv);
int ds_cmd_detokenize(int argc, char **argv);
int ds_cmd_chat_template(int argc, char **argv);
int ds_cmd_quantize(int argc, char **argv);
int ds_cmd_bench_kernels(int argc, char **argv);
/* bench_layer.c: DeepSeek-R1 at full width, layer by layer, extrapolated to 61 layers / N nodes */
int ds_cmd_bench_layer(int argc, char **argv);
int ds_cmd_serve(int argc, char **argv); /* serve.c: the OpenAI-compatible HTTP server */
int ds_cmd_bench(int argc, char **argv); /* bench.c: serving benchmark client (src/bench/) */
/* launch.c: mpirun over --hosts running dsinfer serve (docs/deploy.md). */
int ds_cmd_launch(int argc, char **argv);
/* check.c: deployment preflight; its own exit codes 3-8 name the kind of problem (usage). */
int ds_cmd_check(int argc, char **argv);
/* plan.c: the bytes per rank of an N-node deployment, from config.json alone */
int ds_cmd_plan(int argc, char **argv);

/* Helpers shared by the subcommands. */
/* Parses "1,2,3" or "1 2 3" into a malloc'd array; -1 and a message on bad input. */
int ds_cli_parse_ids(const char *s, int32_t **ids, int64_t *n);
/* The directory of the built-in demo model (DSINFER_MODEL env, else the build's demo-model). */
const char *ds_cli_default_model(void);
/* The directory of the real DeepSeek-V3 tokenizer files (DSINFER_TOKENIZER_DIR env, else the
 * path scripts/setup.sh fetched them to). */
const char *ds_cli_default_tokenizer_dir(void);

/* Ranks > 0 of an mpirun launch call this instead of running their command: open the model's
 * shard and run rank 0's steps until it stops (ds_model_follow). Returns the exit status. */
int ds_cli_follow(const char *cmd, const char *model_dir, const ds_model_params *mp);

/* "1.50 GiB" (bytes below 1 KiB as "N B") into buf; returns buf. */
const char *ds_cli_human_bytes(uint64_t n, char *buf, size_t cap);
/* Lifts the soft descriptor limit to the hard one when `want` descriptors (connections, streams)
 * would not fit under it. */
void ds_cli_raise_fd_limit(long want);

/* "a/b", malloc'd (caller frees); NULL when out of memory. */
char *ds_cli_path_join(const char *a, const char *b);
/* Copies a file; the message names the file on failure. */
int ds_cli_copy_file(const char *src, const char *dst);
/* Removes a tree this program created (or one --force told it to replace). */
void ds_cli_rm_tree(const char *path);
/* 1 when dir is a directory with entries, 0 when empty or absent, -1 when not a directory. */
int ds_cli_dir_state(const char *dir);
/* Whether dir/name is a regular file. */
int ds_cli_file_exists(const char *dir, const char *name);
/* A checkpoint directory written in a temporary sibling (OUT.tmp-XXXXXX) and published whole by
 * one rename, so a directory named OUT is always complete (make-tiny, quantize). */
typedef struct {
    char *out, *tmp; /* OUT without trailing slashes; its temporary sibling */
    int made;        /* tmp exists and is ours to remove */
} ds_cli_outdir;
/* Refuses an existing non-empty OUT unless force (returns 2), creates the temporary directory
 * (returns 1 on failure, 0 on success). Messages start with cmd. Always pair with _end. */
int ds_cli_outdir_begin(ds_cli_outdir *d, const char *cmd, const char *out, int force);
/* Moves a previous OUT aside (only reachable with --force), renames tmp to OUT, removes the old
 * one; 0 on success, 1 (message printed) on failure. */
int ds_cli_outdir_publish(ds_cli_outdir *d, const char *cmd);
/* Removes tmp unless published, frees. Accepts a zeroed struct. */
void ds_cli_outdir_end(ds_cli_outdir *d);
/* "model-0000i-of-0000N.safetensors" for shard i (0-based) of n, as Hugging Face names them. */
void ds_cli_shard_name(char *buf, size_t cap, int i, int n);
/* Writes DIR/model.safetensors.index.json: {"metadata": {"total_size": total}, "weight_map":
 * map} with sorted keys. Takes ownership of map (may be NULL after a failed allocation). */
int ds_cli_write_index(const char *dir, json_t *map, uint64_t total);
/* Parses a non-negative integer (with allow_suffix: K, M, G, T binary multipliers, optional "B" or
 * "iB"); 0 when malformed or overflowing. */
int ds_cli_parse_u64(const char *s, uint64_t *out, int allow_suffix);

/* The engine flags shared by the commands that run the engine (generate --batch-file, serve),
 * named as in vLLM: --max-num-seqs, --max-num-batched-tokens, --max-model-len, --block-size,
 * --kv-cache-memory BYTES (K/M/G suffixes), --memory-utilization F (vLLM's
 * --gpu-memory-utilization is accepted too), --kv-cache-dtype f32|bf16|f16 (auto = f32),
 * --no-enable-prefix-caching / --enable-prefix-caching. Splice DS_CLI_ENGINE_OPTIONS into a
 * getopt_long table; their codes start at DS_CLI_ENGINE_OPT. */
#define DS_CLI_ENGINE_OPT 0x1000
#define DS_CLI_ENGINE_OPTIONS                                                                      \
    {"max-num-seqs", required_argument, 0, DS_CLI_ENGINE_OPT + 0},                                 \
        {"max-num-batched-tokens", required_argument, 0, DS_CLI_ENGINE_OPT + 1},                   \
        {"max-model-len", required_argument, 0, DS_CLI_ENGINE_OPT + 2},                            \
        {"block-size", required_argument, 0, DS_CLI_ENGINE_OPT + 3},                               \
        {"kv-cache-memory", required_argument, 0, DS_CLI_ENGINE_OPT + 4},                          \
        {"memory-utilization", required_argument, 0, DS_CLI_ENGINE_OPT + 5},                       \
        {"gpu-memory-utilization", required_argument, 0, DS_CLI_ENGINE_OPT + 5},                   \
        {"kv-cache-dtype", required_argument, 0, DS_CLI_ENGINE_OPT + 6},                           \
        {"enable-prefix-caching", no_argument, 0, DS_CLI_ENGINE_OPT + 7}, {                        \
        "no-enable-prefix-caching", no_argument, 0, DS_CLI_ENGINE_OPT + 8                          \
    }
/* The help lines of those flags. */
#define DS_CLI_ENGINE_HELP                                                                         \
    "  --max-num-seqs N            sequences running at once (default 256)\n"                      \
    "  --max-num-batched-tokens N  tokens per engine step (default 2048)\n"                        \
    "  --max-model-len N           prompt + output limit (default: the model's, capped to the\n"   \
    "                              KV cache)\n"                                                    \
    "  --block-size N              tokens per KV block (default 16)\n"                             \
    "  --kv-cache-memory BYTES     KV cache size, e.g. 8G (default: --memory-utilization)\n"       \
    "  --memory-utilization F      fraction of available memory after the weights (0.9)\n"         \
    "  --kv-cache-dtype T          f32 (default, exact), bf16 or f16 (half the memory)\n"          \
    "  --no-enable-prefix-caching  do not share KV blocks of common prefixes\n"
/* Applies one of those flags (code c, argument arg) to p. 1 when c is one of them, 0 when it
 * is not, -1 after printing a message about a bad value (a usage error). */
int ds_cli_engine_flag(int c, const char *arg, const char *cmd, ds_engine_params *p);

/* bench-model --batch: decode of B sequences together against this machine's limits
 * (bench_batch.c); batches (n_batches) are the batch sizes, bw a read bandwidth measured on
 * bw_bytes, which it measures again before each batch size. */
int ds_cli_bench_batch(ds_model *m, const int32_t *batches, int n_batches, long context, long steps,
                       double bw, size_t bw_bytes);

/* generate --batch-file: every JSON line of file through the engine at once (generate_batch.c). */
int ds_cli_generate_batch(const char *model_dir, const char *file, int text_out,
                          const ds_model_params *mp, const ds_engine_params *ep);

#endif
