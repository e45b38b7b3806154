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

typedef struct ds_model ds_model;

typedef struct {
    int n_threads;       /* <= 0: all online CPUs */
    int max_batch;       /* tokens per internal forward chunk (bounds scratch memory) */
} ds_model_params;

ds_model_params ds_model_default_params(void);

/* Opens the checkpoint in dir. On failure *out is NULL and the message names file/tensor/field. */
int ds_model_open(const char *dir, const ds_model_params *params, ds_model **out);
void ds_model_close(ds_model *m); /* accepts NULL */
const ds_config *ds_model_config(const ds_model *m);
ds_pool *ds_model_pool(ds_model *m);
/* Bytes of weights read to decode one token (all dense weights + the active experts + lm_head
 * row block), from the stored dtypes; and the total bytes of all bound weights. */
uint64_t ds_model_bytes_per_token(const ds_model *m);
uint64_t ds_model_weight_bytes(const ds_model *m);

/* The MLA cache of one sequence: per layer and position only the normalised latent
 * (kv_lora_rank floats) and the rotated rope key (qk_rope_head_dim floats). */
typedef struct ds_kv_cache ds_kv_cache;
int ds_kv_open(const ds_config *c, int64_t max_len, ds_kv_cache **out);
void ds_kv_close(ds_kv_cache *kv); /* accepts NULL */
int64_t ds_kv_capacity(const ds_kv_cache *kv);

/* Runs tokens[0, n) at positions start_pos .. start_pos + n - 1 (the cache must already hold
 * positions < start_pos). Writes next-token logits: for every one of the n tokens into
 * logits[n][vocab] when all_logits, else only for the last token into logits[vocab].
 * Returns DS_ERR_RANGE when a token id is outside the vocabulary or positions exceed the
 * cache, with the message naming the value. */
int ds_model_forward(ds_model *m, ds_kv_cache *kv, const int32_t *tokens, int64_t n,
                     int64_t start_pos, float *logits, int all_logits);

/* Debug/trace hook: called with named intermediate activations ("layers.1.attn_out", shape
 * [rows, cols]) during forward. NULL disables it (the default). Used by the golden tests. */
typedef void (*ds_trace_fn)(void *ctx, const char *name, const float *data, int64_t rows,
                            int64_t cols);
void ds_model_set_trace(ds_model *m, ds_trace_fn fn, void *ctx);

#endif
