/* model: a DeepSeek-V3 checkpoint bound to layer structs, and its forward pass.
 *
 * ds_model_open maps the weights (safetensors, used in place wherever the kernels read the
 * stored dtype), checks that every tensor the config implies is present with the right shape
 * and dtype, and prepares RoPE tables. ds_model_forward runs a span of tokens of one sequence
 * through the network, appending their MLA latents to a KV cache. */
#ifndef DS_MODEL_H
#define DS_MODEL_H

#include "core/core.h"
#include "io/io.h"
#include "kernels/kernels.h"

typedef struct ds_model ds_model;

/* ---- checkpoint formats (src/model/format.c; docs/formats.md) ----
 * How a checkpoint stores its projections, detected from config.json's quantization_config, an
 * msModelSlim quant_model_description.json, or (channel-int8 without a config) the tensors, and
 * each projection bound as a ds_mat the kernels run directly. */
typedef struct ds_format ds_format;
/* Detects the format of dir (its config c and tensors st, both outliving the format). */
int ds_format_open(const char *dir, const ds_config *c, const ds_st_set *st, ds_format **out);
void ds_format_close(ds_format *f); /* accepts NULL; frees what bindings allocated */
/* "msModelSlim (ascend) quant_model_description.json", "blockwise_int8", ... */
const char *ds_format_name(const ds_format *f);
/* Binds projection `prefix` (prefix.weight and the tensors its scheme adds) as a [rows, cols]
 * ds_mat: a tensor whose dtype or shape does not fit the detected scheme, or a field this loader
 * does not understand, is refused naming the tensor and the field. *scheme (may be NULL) gets a
 * short name of the stored form ("w8a8-static", "w4a8-channel (repacked)", "bf16", ...). */
int ds_format_bind(ds_format *f, const char *prefix, int64_t rows, int64_t cols, ds_mat *out,
                   const char **scheme);
/* The [rows, cols] of projection `prefix` as stored (int4 packs two per byte: along the input
 * in dsinfer's w4a8_int4, where an odd width cannot be told from an even one, along the output
 * in msModelSlim's W4A8_DYNAMIC). */
int ds_format_shape(ds_format *f, const char *prefix, int64_t *rows, int64_t *cols);
/* Frees what the bindings so far allocated (their ds_mats become invalid): a pass over the
 * tensors (quantize) holds one repacked tensor at a time. */
void ds_format_release(ds_format *f);
/* The stored form of projection `prefix` as ds_format_bind names it, without checking shapes
 * (dsinfer info); NULL with the error set when it cannot be told. */
const char *ds_format_scheme(ds_format *f, const char *prefix);
/* The tensor a Hugging Face name (e.g. "model.layers.3.input_layernorm.weight") is stored as
 * (MindSpore checkpoints use their own parameter names); NULL when absent. */
const ds_st_tensor *ds_format_find(const ds_format *f, const char *name);
/* 1 when the checkpoint stores the RoPE rows of q_b and kv_a de-interleaved (MindSpore names:
 * per head the even then the odd dimensions), so the forward pass re-interleaves their outputs. */
int ds_format_rope_split(const ds_format *f);
/* map[r] = the stored row of logical (Hugging Face order) row r of projection prefix's
 * [rows, cols]: the identity but for the rope rows ds_format_rope_split describes. */
void ds_format_stored_rows(const ds_format *f, const char *prefix, int64_t rows, int64_t *map);
/* The logical tensors (Hugging Face names, as ds_model binds them) stored in disk tensor
 * `disk`: 0 for quantization data (a scale, zero point or bias of a quantized projection, an
 * anti-outlier norm bias, the second half of MindSpore's split kv_b), E for MindSpore's stacked
 * experts, else 1; the name of the i-th goes to buf (may be NULL). dsinfer info and quantize
 * walk a checkpoint by it. */
int64_t ds_format_logical(const ds_format *f, const char *disk, int64_t i, char *buf, size_t cap);

typedef struct {
    int n_threads; /* <= 0: all online CPUs */
    int max_batch; /* tokens per internal forward chunk (bounds scratch memory) */
    /* 1: the weights stay views of the mapped files (4 KiB pages, read on first use) instead of
     * being loaded onto 2 MiB pages (ds_st_load_used) */
    int map_weights;
} ds_model_params;

ds_model_params ds_model_default_params(void);

/* Opens the checkpoint in dir. On failure *out is NULL and the message names file/tensor/field. */
int ds_model_open(const char *dir, const ds_model_params *params, ds_model **out);
void ds_model_close(ds_model *m); /* accepts NULL */
const ds_config *ds_model_config(const ds_model *m);
ds_pool *ds_model_pool(ds_model *m);
/* DS_OK while the checkpoint's files are as they were loaded (ds_st_check_unchanged): the engine
 * asks after every step, before it hands out the step's tokens. */
int ds_model_check_files(const ds_model *m);
/* Bytes of weights read to decode one token (all dense weights + the active experts + lm_head
 * row block), from the stored dtypes; and the total bytes of all bound weights. */
uint64_t ds_model_bytes_per_token(const ds_model *m);
uint64_t ds_model_weight_bytes(const ds_model *m);
/* Bytes of the checkpoint read into memory at open (0 with map_weights): already taken from the
 * memory the system reports available, unlike mapped weights, which are paged in on use. */
uint64_t ds_model_loaded_bytes(const ds_model *m);
/* The weight bytes a step reads in layer l on this rank: attention, the dense MLP or the
 * router, shared expert and this rank's routed experts flagged in touched[n_routed_experts]. */
uint64_t ds_model_layer_bytes(const ds_model *m, int64_t l, const uint8_t *touched);

/* ---- the MLA KV cache ----
 * Per layer and token slot only what the model needs: the normalised latent (kv_lora_rank) and
 * the rotated rope key (qk_rope_head_dim, shared by all heads), stored as f32, bf16 or f16. The
 * slots are grouped into blocks of block_size; which block holds which positions of which
 * sequence is decided by the caller (the engine's block manager) and handed to
 * ds_model_forward_batch as block tables. */
typedef struct ds_kv_cache ds_kv_cache;
typedef enum { DS_KV_F32, DS_KV_BF16, DS_KV_F16 } ds_kv_dtype;

/* "f32" / "float32", "bf16" / "bfloat16", "f16" / "float16" / "half"; DS_ERR_ARG otherwise. */
int ds_kv_dtype_parse(const char *s, ds_kv_dtype *out);
const char *ds_kv_dtype_name(ds_kv_dtype dt);
/* Bytes one token occupies: layers x (kv_lora_rank + qk_rope_head_dim) x the dtype's size. */
uint64_t ds_kv_bytes_per_token(const ds_config *c, ds_kv_dtype dt);
/* n_blocks blocks of block_size slots, zeroed. */
int ds_kv_open_paged(const ds_config *c, int64_t n_blocks, int64_t block_size, ds_kv_dtype dt,
                     ds_kv_cache **out);
/* One sequence of up to max_len tokens, f32: a single block (ds_model_forward's cache). */
int ds_kv_open(const ds_config *c, int64_t max_len, ds_kv_cache **out);
void ds_kv_close(ds_kv_cache *kv);             /* accepts NULL */
int64_t ds_kv_capacity(const ds_kv_cache *kv); /* slots: n_blocks x block_size */
int64_t ds_kv_block_size(const ds_kv_cache *kv);
int64_t ds_kv_n_blocks(const ds_kv_cache *kv);

/* ---- the deployment plan (plan.c; docs/deploy.md) ----
 * What each rank of an N-node run (one rank per node) holds for a checkpoint of the given scheme,
 * from the config alone: its weights as ds_model_open would bind them (replicated and split),
 * the KV cache the engine would size, the runtime buffers (estimated), and whether it fits. */
typedef enum { DS_PLAN_BF16, DS_PLAN_FP8, DS_PLAN_W8A8, DS_PLAN_W4A8 } ds_plan_scheme;
int ds_plan_scheme_parse(const char *s, ds_plan_scheme *out);
const char *ds_plan_scheme_name(ds_plan_scheme s);

typedef struct {
    ds_plan_scheme scheme;
    int64_t group;        /* W4A8: input columns per scale (128) */
    int64_t fp8_block[2]; /* FP8: the scale grid's block (128 x 128) */
    int quantize_lm_head; /* W8A8 / W4A8: lm_head quantized too (dsinfer quantize's flag) */
    int nodes;
    uint64_t mem_per_node;
    int64_t max_model_len; /* 0: the config's max_position_embeddings */
    int64_t max_num_seqs, block_size;
    int64_t chunk_tokens; /* tokens per forward chunk (ds_model_params.max_batch) */
    int threads;          /* worker threads per node (each has a scratch row) */
    double memory_utilization;
    ds_kv_dtype kv_dtype;
    uint64_t fixed_bytes; /* allowance for the tokenizer, thread stacks, the HTTP server */
} ds_plan_params;
/* The defaults for a checkpoint of config c: the scheme its quantization_config names
 * (channel- or block-int8: w8a8; none: bf16), its W4A8 group and FP8 block, one node, 256
 * sequences, blocks of 16, 512-token chunks, 64 threads, 90% of memory, an f32 KV cache. */
ds_plan_params ds_plan_params_of(const ds_config *c);

typedef struct {
    uint64_t weights, weights_whole; /* the rank's weight bytes; those every rank holds */
    uint64_t runtime;                /* estimated buffers */
    uint64_t total;                  /* weights + KV cache + runtime */
} ds_plan_rank;

typedef struct {
    ds_plan_params p;
    int64_t max_model_len;
    uint64_t kv_per_token; /* bytes, every layer */
    int64_t kv_blocks_fit; /* blocks rank 0's budget holds */
    int64_t kv_blocks;     /* those allocated: at most max_num_seqs sequences of max_model_len */
    uint64_t kv_bytes;     /* on every rank */
    int64_t seqs_at_len;   /* sequences of max_model_len the budget holds at once */
    uint64_t weights_all;  /* the model's weights, counted once */
    ds_plan_rank rank0, worst;
    int worst_rank;
    int fits; /* every rank fits, with room for one sequence of max_model_len */
    int full; /* ... and for max_num_seqs of them at once */
} ds_plan;

/* p->nodes ranks; DS_ERR_ARG when a rank would get no head or no routed expert. */
int ds_plan_run(const ds_config *c, const ds_plan_params *p, ds_plan *out);
/* The smallest node count that fits (full: with max_num_seqs sequences of max_model_len);
 * 0 when none does. */
int ds_plan_min_nodes(const ds_config *c, const ds_plan_params *p, int full);

/* Runs tokens[0, n) of one sequence at positions start_pos .. start_pos + n - 1, the cache's
 * slots taken in order (slot = position; the cache must already hold positions < start_pos).
 * Writes next-token logits: for every one of the n tokens into logits[n][vocab] when
 * all_logits, else only for the last token into logits[vocab]. Returns DS_ERR_RANGE when a
 * token id is outside the vocabulary or positions exceed the cache, naming the value. */
int ds_model_forward(ds_model *m, ds_kv_cache *kv, const int32_t *tokens, int64_t n,
                     int64_t start_pos, float *logits, int all_logits);

/* One step of a ragged batch: tokens of several sequences, each at its own position, plain
 * arrays so that a step can be copied or broadcast as is. Token i belongs to sequence seq[i]
 * (a row of block_tables) at position positions[i]; its latent goes to slot
 * block_tables[seq[i]][p / block_size] * block_size + p % block_size, and it attends to
 * positions 0 .. p of its sequence, which must be in the cache or earlier in this batch (the
 * tokens of one sequence come in increasing position order). */
typedef struct {
    int32_t n_tokens;
    const int32_t *tokens;       /* [n_tokens] */
    const int32_t *positions;    /* [n_tokens] */
    const int32_t *seq;          /* [n_tokens] */
    int32_t n_seqs, max_blocks;  /* block_tables is [n_seqs][max_blocks] */
    const int32_t *block_tables; /* block ids; entries past a sequence's length are unused */
    int32_t n_logits;
    const int32_t *logits_idx; /* [n_logits] increasing token indices that want logits */
} ds_batch;

/* Runs a batch; logits[j][vocab] for token logits_idx[j], and when argmax is not NULL,
 * argmax[j] = the argmax_f32 of that row (kernels.h: its maximum's lowest id, a NaN's before any
 * number, -1 when all are -inf), taken while lm_head writes the row: greedy sampling without a
 * pass over the logits. DS_ERR_RANGE names the first bad token id, position, block id or index;
 * nothing is written to the cache then.
 * Several ranks (src/dist): rank 0 calls this as usual and the step goes to the other ranks,
 * which run it from ds_model_follow (logits and argmax NULL there); the logits are rank 0's. */
int ds_model_forward_batch(ds_model *m, ds_kv_cache *kv, const ds_batch *b, float *logits,
                           int32_t *argmax);

/* Ranks > 0 of a multi-rank run: runs every step rank 0 hands out, on this rank's shard and a
 * KV cache of the same geometry as rank 0's, until rank 0 closes its model (DS_OK) or the ranks
 * fail (the error). ds_model_open shards the model by the MPI world (docs/deploy.md). */
int ds_model_follow(ds_model *m);

/* What the last ds_model_forward_batch (or ds_model_forward) did, for benchmarks that set a
 * step's time against this machine's limits. */
typedef struct {
    uint64_t weight_bytes; /* weights read: every matrix once per internal chunk (the distinct
                              experts the tokens touched, not all of them) + embedding rows */
    uint64_t kv_bytes;     /* cache bytes attention read */
    uint64_t macs_int;     /* multiply-adds of int8 matmuls (W8A8, W4A8) */
    uint64_t macs_float;   /* multiply-adds of float-weight matmuls (F32, BF16, F16, FP8) */
    uint64_t macs_attn;    /* f32 multiply-adds of attention (absorption, scores, sums) */
} ds_forward_cost;
void ds_model_last_cost(const ds_model *m, ds_forward_cost *out);

/* Debug/trace hook: called with named intermediate activations ("layers.1.attn_out", shape
 * [rows, cols]) during forward. NULL disables it (the default). Used by the golden tests. */
typedef void (*ds_trace_fn)(void *ctx, const char *name, const float *data, int64_t rows,
                            int64_t cols);
void ds_model_set_trace(ds_model *m, ds_trace_fn fn, void *ctx);

#endif
