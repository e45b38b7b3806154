/* The deployment plan: what each rank of an N-rank run holds, from the config alone.
 *
 * The weights are walked as ds_model_open binds them (weights.c, shard.c): the same row spans,
 * the same stored forms, and every projection counted by ds_mat_bytes on a ds_mat shaped as the
 * binding would make it, so the figure for one rank is the one `dsinfer info` and the engine
 * see for a checkpoint of that scheme (tests/model/test_plan.c holds them equal). The KV cache
 * is sized as the engine sizes it (rank 0's memory x --memory-utilization - its weights, at most
 * max_num_seqs sequences of max_model_len), and every rank holds a cache of that geometry. The
 * runtime buffers are the forward pass's scratch for a chunk, the gather buffers of a split
 * model, the engine's logits and samplers, the norms' f32 copies, and a fixed allowance for the
 * rest (tokenizer, threads, HTTP): an estimate, printed as one. */
#include "model/model_internal.h"

#include <string.h>

static const char *const scheme_names[] = {"bf16", "fp8", "w8a8", "w4a8"};

int ds_plan_scheme_parse(const char *s, ds_plan_scheme *out) {
    for (int i = 0; i < (int)(sizeof scheme_names / sizeof *scheme_names); i++)
        if (strcmp(s, scheme_names[i]) == 0) {
            *out = (ds_plan_scheme)i;
            return DS_OK;
        }
    return ds_err_set(DS_ERR_ARG, "scheme '%s': expected bf16, fp8, w8a8 or w4a8", s);
}

const char *ds_plan_scheme_name(ds_plan_scheme s) {
    return s >= 0 && s <= DS_PLAN_W4A8 ? scheme_names[s] : "?";
}

/* The scheme a config's quantization_config names (channel- or block-int8: w8a8). */
static ds_plan_scheme scheme_of(const ds_config *c) {
    switch (c->quant) {
    case DS_QUANT_FP8:
        return DS_PLAN_FP8;
    case DS_QUANT_W4A8:
    case DS_QUANT_MS_A8W4:
        return DS_PLAN_W4A8;
    case DS_QUANT_NONE:
        return DS_PLAN_BF16;
    default:
        return DS_PLAN_W8A8;
    }
}

ds_plan_params ds_plan_params_of(const ds_config *c) {
    ds_plan_params p = {.scheme = scheme_of(c),
                        .group = c->quant == DS_QUANT_W4A8 && c->quant_group ? c->quant_group : 128,
                        .fp8_block = {128, 128},
                        .nodes = 1,
                        .max_num_seqs = 256,
                        .block_size = 16,
                        .chunk_tokens = 512,
                        .threads = 64,
                        .memory_utilization = 0.9,
                        .kv_dtype = DS_KV_F32,
                        .fixed_bytes = 512ull << 20};
    if (c->quant == DS_QUANT_FP8 && c->quant_block[0] > 0 && c->quant_block[1] > 0) {
        p.fp8_block[0] = c->quant_block[0];
        p.fp8_block[1] = c->quant_block[1];
    }
    return p;
}

typedef struct {
    const ds_config *c;
    const ds_plan_params *p;
    ds_shard sh;
    uint64_t whole, split; /* bytes every rank holds / this rank's share of split tensors */
    uint64_t vectors;      /* the f32 copies of norms and router biases (not counted as weights) */
} walk;

/* A projection bound whole (s NULL) or as rows [s->lo, s->hi), stored as the scheme stores it
 * when `quant` (else BF16), counted by ds_mat_bytes. */
static void proj(walk *w, int quant, int64_t rows, int64_t cols, const ds_span *s) {
    ds_mat m;
    memset(&m, 0, sizeof m);
    m.dtype = DS_BF16;
    m.cols = cols;
    if (quant) {
        m.dtype = w->p->scheme == DS_PLAN_BF16  ? DS_BF16
                  : w->p->scheme == DS_PLAN_FP8 ? DS_F8_E4M3
                                                : DS_I8;
        m.block_rows = w->p->scheme == DS_PLAN_FP8 ? w->p->fp8_block[0] : 1;
        m.block_cols = w->p->scheme == DS_PLAN_FP8    ? w->p->fp8_block[1]
                       : w->p->scheme == DS_PLAN_W4A8 ? w->p->group
                                                      : cols;
        m.int4 = w->p->scheme == DS_PLAN_W4A8;
    }
    m.row0 = s ? s->lo : 0;
    m.rows = s ? s->hi - s->lo : rows;
    *(s ? &w->split : &w->whole) += ds_mat_bytes(&m);
}

static void vec(walk *w, int64_t n) {
    w->vectors += (uint64_t)n * sizeof(float);
}

static ds_span scaled(ds_span s, int64_t k) {
    return (ds_span){s.lo * k, s.hi * k};
}

static void mlp(walk *w, int64_t width, const ds_span *inter) {
    const int64_t D = w->c->hidden_size;
    proj(w, 1, width, D, inter);
    proj(w, 1, width, D, inter);
    proj(w, 1, D, width, inter ? &w->sh.hidden : NULL);
}

static void layer(walk *w, int64_t l) {
    const ds_config *c = w->c;
    const int64_t D = c->hidden_size, H = c->n_heads;
    const int64_t qk = c->qk_nope_head_dim + c->qk_rope_head_dim;
    const ds_span q_rows = scaled(w->sh.heads, qk),
                  kv_rows = scaled(w->sh.heads, c->qk_nope_head_dim + c->v_head_dim);
    vec(w, 2 * D);
    if (c->q_lora_rank) {
        proj(w, 1, c->q_lora_rank, D, NULL);
        vec(w, c->q_lora_rank);
        proj(w, 1, H * qk, c->q_lora_rank, &q_rows);
    } else {
        proj(w, 1, H * qk, D, &q_rows);
    }
    proj(w, 1, c->kv_lora_rank + c->qk_rope_head_dim, D, NULL);
    vec(w, c->kv_lora_rank);
    proj(w, 1, H * (c->qk_nope_head_dim + c->v_head_dim), c->kv_lora_rank, &kv_rows);
    proj(w, 1, D, H * c->v_head_dim, &w->sh.hidden);
    if (!ds_config_layer_is_moe(c, l)) {
        mlp(w, c->intermediate_size, &w->sh.dense_inter);
        return;
    }
    proj(w, 0, c->n_routed_experts, D, NULL); /* the router stays as released */
    vec(w, c->n_routed_experts);
    walk one = *w; /* an expert: bound whole, on the rank that holds it */
    one.whole = 0;
    mlp(&one, c->moe_intermediate_size, NULL);
    w->split += one.whole * (uint64_t)(w->sh.experts.hi - w->sh.experts.lo);
    if (c->n_shared_experts > 0)
        mlp(w, c->moe_intermediate_size * c->n_shared_experts, &w->sh.shared_inter);
}

/* This rank's weights (ds_model_weight_bytes' count): *whole of them held by every rank;
 * *vectors the norms' f32 copies beside them. */
static uint64_t rank_weights(const ds_config *c, const ds_plan_params *p, int rank, uint64_t *whole,
                             uint64_t *vectors) {
    walk w = {.c = c, .p = p};
    const int n = p->nodes;
    w.sh = (ds_shard){.rank = rank,
                      .size = n,
                      .heads = ds_shard_span(c->n_heads, rank, n),
                      .experts = ds_shard_span(c->n_routed_experts, rank, n),
                      .vocab = ds_shard_span(c->vocab_size, rank, n),
                      .hidden = ds_shard_span(c->hidden_size, rank, n),
                      .dense_inter = ds_shard_span(c->intermediate_size, rank, n),
                      .shared_inter =
                          ds_shard_span(c->moe_intermediate_size * c->n_shared_experts, rank, n)};
    proj(&w, 0, c->vocab_size, c->hidden_size, &w.sh.vocab); /* embed_tokens */
    vec(&w, c->hidden_size);
    if (!c->tie_word_embeddings)
        proj(&w, p->quantize_lm_head && p->scheme >= DS_PLAN_W8A8, c->vocab_size, c->hidden_size,
             &w.sh.vocab);
    for (int64_t l = 0; l < c->n_layers; l++) layer(&w, l);
    *whole = w.whole;
    *vectors = w.vectors;
    return w.whole + w.split;
}

static int64_t imax(int64_t a, int64_t b) {
    return a > b ? a : b;
}

/* The runtime buffers of `rank` (an estimate; see the top of the file). */
static uint64_t rank_runtime(const ds_config *c, const ds_plan_params *p, int rank, int64_t len,
                             uint64_t vectors) {
    const int n = p->nodes;
    const ds_span heads = ds_shard_span(c->n_heads, rank, n);
    const int64_t B = p->chunk_tokens, S = p->max_num_seqs;
    uint64_t b = ds_model_scratch_bytes(c, heads.hi - heads.lo, len, B, p->threads);
    if (n > 1) { /* a piece of a chunk's widest activation, the gathered whole, expert outputs */
        const int64_t wide = imax(imax(c->hidden_size, c->n_heads * c->v_head_dim),
                                  imax(c->intermediate_size, c->moe_intermediate_size));
        b += (uint64_t)B * (uint64_t)(2 * wide + c->n_experts_per_tok * c->hidden_size) * 4;
    }
    if (rank == 0) /* the engine: a step's logits (gathered from the ranks), a sampler a thread */
        b += (uint64_t)c->vocab_size * ((uint64_t)S * (n > 1 ? 8 : 4) + (uint64_t)p->threads * 32);
    return b + vectors + p->fixed_bytes;
}

int ds_plan_run(const ds_config *c, const ds_plan_params *p, ds_plan *out) {
    memset(out, 0, sizeof *out);
    if (p->nodes < 1 || p->nodes > c->n_heads ||
        (c->n_routed_experts > 0 && p->nodes > c->n_routed_experts))
        return ds_err_set(DS_ERR_ARG,
                          "%d nodes: every rank needs at least one of the %lld attention heads "
                          "and of the %lld routed experts",
                          p->nodes, (long long)c->n_heads, (long long)c->n_routed_experts);
    if (p->block_size < 1 || p->max_num_seqs < 1 || p->chunk_tokens < 1 || p->threads < 1 ||
        (p->scheme == DS_PLAN_W4A8 && p->group < 2) ||
        (p->scheme == DS_PLAN_FP8 && (p->fp8_block[0] < 1 || p->fp8_block[1] < 1)) ||
        !(p->memory_utilization > 0 && p->memory_utilization <= 1))
        return ds_err_set(DS_ERR_ARG, "plan parameters out of range");
    out->p = *p;
    const int64_t len = p->max_model_len ? p->max_model_len : c->max_position_embeddings;
    out->max_model_len = len;
    out->kv_per_token = ds_kv_bytes_per_token(c, p->kv_dtype);
    const uint64_t per_block = out->kv_per_token * (uint64_t)p->block_size;
    const int64_t seq_blocks = (len + p->block_size - 1) / p->block_size;
    /* the engine's sizing, on rank 0 */
    uint64_t whole0, vec0;
    const uint64_t w0 = rank_weights(c, p, 0, &whole0, &vec0);
    const double budget = p->memory_utilization * (double)p->mem_per_node - (double)w0;
    out->kv_blocks_fit = budget > 0 ? (int64_t)(budget / (double)per_block) : 0;
    const int64_t useful = p->max_num_seqs * seq_blocks;
    out->kv_blocks = out->kv_blocks_fit < useful ? out->kv_blocks_fit : useful;
    out->seqs_at_len = out->kv_blocks_fit / seq_blocks;
    const uint64_t kv = (uint64_t)out->kv_blocks * per_block;
    out->fits = out->kv_blocks_fit >= seq_blocks;
    out->full = out->fits && out->seqs_at_len >= p->max_num_seqs;
    for (int r = 0; r < p->nodes; r++) {
        ds_plan_rank pr;
        uint64_t vectors;
        pr.weights = rank_weights(c, p, r, &pr.weights_whole, &vectors);
        pr.runtime = rank_runtime(c, p, r, len, vectors);
        pr.total = pr.weights + kv + pr.runtime;
        out->weights_all += pr.weights - (r ? pr.weights_whole : 0);
        if (r == 0 || pr.total > out->worst.total) {
            out->worst = pr;
            out->worst_rank = r;
        }
        if (r == 0) out->rank0 = pr;
        if (pr.total > p->mem_per_node) out->fits = out->full = 0;
    }
    out->kv_bytes = kv;
    return DS_OK;
}

int ds_plan_min_nodes(const ds_config *c, const ds_plan_params *p, int full) {
    const int64_t most = c->n_routed_experts > 0 && c->n_routed_experts < c->n_heads
                             ? c->n_routed_experts
                             : c->n_heads;
    ds_plan_params q = *p;
    ds_plan r;
    for (q.nodes = 1; q.nodes <= most; q.nodes++)
        if (ds_plan_run(c, &q, &r) == DS_OK && (full ? r.full : r.fits)) return q.nodes;
    return 0;
}
