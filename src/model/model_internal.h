/* Internal to src/model: the bound model shared by weights.c (binding), rope.c and forward.c. */
#ifndef DS_MODEL_INTERNAL_H
#define DS_MODEL_INTERNAL_H

#include "kernels/kernels.h"
#include "model/model.h"

typedef struct {
    ds_mat gate, up, down; /* gate/up [inter, hidden], down [hidden, inter] */
} ds_mlp;

typedef struct {
    /* attention (MLA) */
    float *attn_norm; /* (hidden) */
    /* anti-outlier biases added after these norms (FORMATS-SPEC §0); NULL when the checkpoint
     * has none */
    float *attn_norm_bias, *q_a_norm_bias, *kv_a_norm_bias, *ffn_norm_bias;
    ds_mat q_a;       /* (q_lora_rank, hidden); unused when q_lora_rank == 0 */
    float *q_a_norm;  /* (q_lora_rank) */
    ds_mat q_b;       /* (heads * (nope + rope), q_lora_rank), or q_proj (.., hidden) */
    ds_mat kv_a;      /* (kv_lora_rank + rope, hidden) */
    float *kv_a_norm; /* (kv_lora_rank) */
    ds_mat kv_b;      /* (heads * (nope + v), kv_lora_rank): per head W_UK rows then W_UV rows */
    int uv_t;         /* each head's W_UV stored transposed, (kv_lora_rank, v) (weights.c) */
    ds_mat o;         /* (hidden, heads * v) */
    /* feed-forward */
    float *ffn_norm; /* (hidden) */
    int moe;
    ds_mlp dense;       /* !moe */
    ds_mat router;      /* (n_routed_experts, hidden) */
    float *router_bias; /* (n_routed_experts) e_score_correction_bias */
    ds_mlp *experts;    /* (n_routed_experts) */
    ds_mlp shared;      /* moe_intermediate * n_shared_experts wide; rows == 0 when none */
} ds_layer;

/* format.c: `name` (a Hugging Face name, found as the format stores it) with exactly the shape [d0]
 * (ndim 1) or [d0, d1] (ndim 2), else an error naming file, tensor and both shapes. */
int ds_find_shaped(const ds_format *f, const char *name, int64_t d0, int64_t d1, int ndim,
                   const ds_st_tensor **out);

/* format.c: zeroed memory freed with the format (ds_format_close): the pieces bindings make at
 * load (norm vectors in f32, repacked or converted tensors). NULL when out of memory. */
void *ds_format_alloc(ds_format *f, size_t bytes);

/* [lo, hi) of something split across ranks. */
typedef struct {
    int64_t lo, hi;
} ds_span;

/* This rank's share of the model (shard.c; docs/deploy.md). Matrices are split by rows only,
 * each rank's rows one contiguous range of the file: attention heads (q_b, kv_b), routed experts
 * (whole), the vocabulary (embedding, lm_head), the intermediate width of the dense and shared
 * MLPs (gate, up) and the hidden width (o_proj, down_proj outputs). One rank: everything. */
typedef struct {
    int rank, size;
    ds_span heads, experts, vocab, hidden, dense_inter, shared_inter;
} ds_shard;

struct ds_model {
    ds_config cfg;
    ds_shard shard;
    ds_st_set *st;
    uint64_t loaded_bytes; /* of st's tensors, read into memory (ds_st_load_used) */
    ds_format *fmt;        /* how st stores the projections; owns repacked / converted pieces */
    int rope_split;        /* q_b / kv_a rope outputs come de-interleaved (ds_format_rope_split) */
    ds_pool *pool;
    int max_batch;
    ds_mat embed;                        /* (vocab, hidden) */
    ds_mat lm_head;                      /* (vocab, hidden) */
    float *final_norm, *final_norm_bias; /* (hidden); the bias NULL unless the file has one */
    ds_layer *layers;                    /* (n_layers) */
    /* RoPE */
    float *inv_freq;   /* (rope / 2) YaRN-corrected inverse frequencies, f32 like the reference */
    float rope_mscale; /* cos/sin multiplier (HF/vLLM: mscale / mscale_all_dim ratio, usually 1) */
    float softmax_scale; /* (nope + rope)^-0.5 x yarn attention mscale^2 */
    /* scratch, grown on demand by forward.c */
    float *scratch;
    size_t scratch_floats;
    ds_trace_fn trace;
    void *trace_ctx;
    ds_forward_cost cost; /* of the last ds_model_forward_batch */
    /* several ranks: a rank's piece of an activation, the gathered pieces, and (ranks > 0) the
     * weighted expert outputs waiting for the partial sum of the ranks before (shard.c) */
    float *part, *gathered, *moe_out;
    size_t part_floats, gathered_floats, moe_floats;
    int32_t *moe_slot;
    size_t moe_slots;
};

struct ds_kv_cache {
    uint64_t id; /* increasing per process: followers know when rank 0 switched caches */
    int64_t cap, n_layers, kv_lora_rank, rope_dim; /* cap = n_blocks * block_size slots */
    int64_t n_blocks, block_size;
    ds_kv_dtype dtype;
    size_t esz;   /* bytes per element: 4 or 2 */
    void *latent; /* (n_layers, cap, kv_lora_rank) normalised c_kv; mmap'd */
    void *pe;     /* (n_layers, cap, rope_dim) rotated k_pe, shared by all heads; mmap'd */
    size_t latent_bytes, pe_bytes;
};

/* kv.c: element pointers of slot `slot` of layer l, and the f32 <-> stored conversions. */
void *ds_kv_latent_at(const ds_kv_cache *kv, int64_t l, int64_t slot);
void *ds_kv_pe_at(const ds_kv_cache *kv, int64_t l, int64_t slot);
void ds_kv_store(const ds_kv_cache *kv, void *dst, const float *src, int64_t n);
void ds_kv_load(const ds_kv_cache *kv, float *dst, const void *src, int64_t n);

/* forward.c: bytes of the forward pass's scratch for chunks of B tokens attending over at most
 * max_ctx positions, with `heads` of the attention heads and `threads` workers */
uint64_t ds_model_scratch_bytes(const ds_config *c, int64_t heads, int64_t max_ctx, int64_t B,
                                int threads);

/* shard.c */
/* [lo, hi) of rank's share of total, as ds_split_range splits it. */
ds_span ds_shard_span(int64_t total, int rank, int size);
/* Fills m->shard for this process's rank; refuses a split that leaves a rank no heads or no
 * experts, naming the sizes. */
int ds_shard_init(ds_model *m);
/* At least n floats in *buf (grown, contents lost); NULL when out of memory (message set). */
float *ds_shard_buf(float **buf, size_t *cap, size_t n);
/* The ranks' pieces [rows][their units x width] into full [rows][units x width], every rank. */
int ds_shard_gather_cols(ds_model *m, const float *mine, int64_t rows, int64_t units, int64_t width,
                         float *full);
/* Same, into rank 0's full only (logits). */
int ds_shard_gather_cols_root(ds_model *m, const float *mine, int64_t rows, int64_t units,
                              float *full);
/* Rank 0: hands the step to the other ranks (before running it itself); ds_model_close sends
 * the stop. */
int ds_shard_send_step(const ds_kv_cache *kv, const ds_batch *b);
void ds_shard_send_stop(ds_model *m);
/* Touches every page of this rank's weights (so the first request does not pay for it) and
 * logs the shard's bytes and the resident memory measured afterwards. */
void ds_shard_prefault(ds_model *m);

/* rope.c: fills inv_freq, rope_mscale and softmax_scale from the config. */
int ds_rope_init(ds_model *m);
/* cs[2i], cs[2i+1] = cos, sin of the angle of pair i at position pos (rope_dim floats). */
void ds_rope_table(const ds_model *m, int64_t pos, float *cs);
/* Rotates the interleaved pairs (x[2i], x[2i+1]) of x (rope_dim floats) by a table. */
void ds_rope_rotate(float *x, const float *cs, int64_t rope_dim);

#endif
