/* Weight binding: Hugging Face tensor names -> layer structs.
 *
 * Projections stay in the mapping in their stored dtype (BF16, F16, F32, or the official FP8
 * with its 128x128 weight_scale_inv grid): the matmul kernels read those directly, so a
 * checkpoint is never copied. Only vectors the forward pass reads element-wise (norm weights,
 * the router bias) and scale grids whose mapping is misaligned for f32 access are copied into
 * small f32 arrays owned by the format (ds_format_alloc). Every tensor the config implies must be
 * present with its exact shape; the error names the tensor, its file, and what was expected. Layers
 * of the multi-token prediction module (model.layers.N for N >= num_hidden_layers) are recognised
 * and ignored. */
#include "dist/dist.h"
#include "model/model_internal.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* An f32 copy of a 1-D float tensor of n elements. */
static int bind_vec(ds_model *m, const char *name, int64_t n, float **out) {
    const ds_st_tensor *t;
    int rc = ds_find_shaped(m->fmt, name, n, 0, 1, &t);
    if (rc) return rc;
    if (t->dtype != DS_F32 && t->dtype != DS_BF16 && t->dtype != DS_F16)
        return ds_err_set(DS_ERR_UNSUPPORTED, "%s: tensor '%s' has dtype %s, expected a float type",
                          t->file, name, ds_dtype_name(t->dtype));
    float *v = ds_format_alloc(m->fmt, (size_t)n * sizeof(float));
    if (!v) return ds_err_set(DS_ERR_NOMEM, "out of memory binding '%s'", name);
    ds_mat view = {.dtype = t->dtype, .rows = 1, .cols = n, .data = t->data};
    ds_mat_row_f32(&view, 0, v);
    *out = v;
    return DS_OK;
}

/* An RMSNorm `prefix`.weight and its optional anti-outlier `prefix`.bias (msModelSlim m4,
 * golden-stick OSP: the shift whose correction the static linears it feeds carry in their
 * quant_bias; FORMATS-SPEC §0). */
static int bind_norm(ds_model *m, const char *prefix, int64_t n, float **w, float **b) {
    char name[240];
    snprintf(name, sizeof name, "%s.weight", prefix);
    int rc = bind_vec(m, name, n, w);
    snprintf(name, sizeof name, "%s.bias", prefix);
    *b = NULL;
    return rc || !ds_format_find(m->fmt, name) ? rc : bind_vec(m, name, n, b);
}

/* Appends w to mats when this rank bound it (others' experts have no data). */
static void ilv_add(ds_mat **mats, size_t *n, ds_mat *w) {
    if (w->rows && w->data) mats[(*n)++] = w;
}

static void ilv_add_mlp(ds_mat **mats, size_t *n, ds_mlp *p) {
    ilv_add(mats, n, &p->gate);
    ilv_add(mats, n, &p->up);
    ilv_add(mats, n, &p->down);
}

static void interleave_slice(void *arg, int slice, int n_slices) {
    (void)n_slices;
    ds_mat_interleave(((ds_mat **)arg)[slice]);
}

/* Once loaded (writable), each head's W_UV rows of kv_b transposed in place to (kv_lora_rank,
 * v_head_dim), where kv_b is BF16 or per-channel int8 and this machine's table runs the float
 * GEMMs (ds_layer.uv_t; the scales stay those of the rows). absorb_o then reads a head's W_UV as
 * one stream of rows that the GEMM reads in place; packing the row-major rows into panels read
 * them sixteen side by side, and at one token that was most of the phase. */
static int transpose_uv(ds_model *m) {
    const ds_config *c = &m->cfg;
    const int64_t H = m->shard.heads.hi - m->shard.heads.lo, R = c->kv_lora_rank;
    const int64_t dn = c->qk_nope_head_dim, dv = c->v_head_dim;
    float s;
    if (!ds_kernels_fgemm_native(ds_kernels_get()) || H <= 0 || R <= 0 || dv <= 0) return DS_OK;
    unsigned char *tmp = malloc((size_t)(dv * R) * 2);
    if (!tmp) return ds_err_set(DS_ERR_NOMEM, "out of memory (transposing kv_b)");
    for (int64_t l = 0; l < c->n_layers; l++) {
        ds_layer *L = &m->layers[l];
        const ds_mat *w = &L->kv_b;
        const size_t esz = w->dtype == DS_BF16 ? 2 : 1;
        if (!w->data || w->ilv != DS_ILV_NONE || w->bias || w->rows != H * (dn + dv) ||
            w->cols != R || (w->dtype != DS_BF16 && !ds_mat_i8_row(w, 0, &s)))
            continue;
        for (int64_t h = 0; h < H; h++) {
            unsigned char *uv = (unsigned char *)w->data + (size_t)((h * (dn + dv) + dn) * R) * esz;
            memcpy(tmp, uv, (size_t)(dv * R) * esz);
            for (int64_t d = 0; d < dv; d++) /* BF16 may sit at an odd address: byte copies */
                for (int64_t j = 0; j < R; j++)
                    if (esz == 2)
                        memcpy(uv + 2 * (j * dv + d), tmp + 2 * (d * R + j), 2);
                    else
                        uv[j * dv + d] = tmp[d * R + j];
        }
        L->uv_t = 1;
    }
    free(tmp);
    return DS_OK;
}

/* Once the weights are loaded: the BF16 and int8 projections that only the matmuls read,
 * interleaved by fours in place (ds_mat_interleave), a matrix per pool slice (one thread took
 * ~0.08 s per GiB: ~20 s on a 671B node's share). Not the embedding (rows looked up one at a
 * time, and lm_head may be the same bytes) nor kv_b (the absorptions read its rows in place;
 * its W_UV rows are transposed instead, transpose_uv). */
static int interleave_weights(ds_model *m) {
    const ds_config *c = &m->cfg;
    /* lm_head, then per layer 5 attention matrices and the dense, shared and routed MLPs */
    ds_mat **mats =
        malloc((1 + (size_t)c->n_layers * (11 + 3 * (size_t)c->n_routed_experts)) * sizeof *mats);
    if (!mats) return ds_err_set(DS_ERR_NOMEM, "out of memory (interleaving the weights)");
    size_t n = 0;
    if (m->lm_head.data != m->embed.data) ilv_add(mats, &n, &m->lm_head);
    for (int64_t l = 0; l < c->n_layers; l++) {
        ds_layer *L = &m->layers[l];
        ds_mat *attn[] = {&L->q_a, &L->q_b, &L->kv_a, &L->o, &L->router};
        for (size_t i = 0; i < sizeof attn / sizeof attn[0]; i++) ilv_add(mats, &n, attn[i]);
        ilv_add_mlp(mats, &n, &L->dense);
        ilv_add_mlp(mats, &n, &L->shared);
        for (int64_t e = 0; L->experts && e < c->n_routed_experts; e++)
            ilv_add_mlp(mats, &n, &L->experts[e]);
    }
    int rc = ds_st_loaded_writable(m->st, 1);
    if (!rc && n) ds_pool_run_slices(m->pool, interleave_slice, mats, (int)n);
    if (!rc) rc = transpose_uv(m);
    free(mats);
    return rc ? rc : ds_st_loaded_writable(m->st, 0);
}

/* A [rows, cols] projection `prefix` in its stored form (src/model/format.c). */
static int bind_mat(ds_model *m, const char *prefix, int64_t rows, int64_t cols, ds_mat *out) {
    return ds_format_bind(m->fmt, prefix, rows, cols, out, NULL);
}

/* bind_mat, then this rank's rows [s.lo, s.hi) of it. */
static int bind_rows(ds_model *m, const char *prefix, int64_t rows, int64_t cols, ds_span s,
                     ds_mat *out) {
    int rc = bind_mat(m, prefix, rows, cols, out);
    if (!rc) ds_mat_slice_rows(out, s.lo, s.hi);
    return rc;
}

/* An MLP; with `inter` a span, split across ranks: gate/up rows by it, down rows by the
 * hidden span (shard.c). NULL: whole (a routed expert). */
static int bind_mlp(ds_model *m, const char *prefix, int64_t width, const ds_span *inter,
                    ds_mlp *mlp) {
    char p[200];
    int64_t hid = m->cfg.hidden_size;
    ds_span is = inter ? *inter : (ds_span){0, width};
    ds_span hs = inter ? m->shard.hidden : (ds_span){0, hid};
    int rc;
    snprintf(p, sizeof p, "%s.gate_proj", prefix);
    if ((rc = bind_rows(m, p, width, hid, is, &mlp->gate))) return rc;
    snprintf(p, sizeof p, "%s.up_proj", prefix);
    if ((rc = bind_rows(m, p, width, hid, is, &mlp->up))) return rc;
    snprintf(p, sizeof p, "%s.down_proj", prefix);
    return bind_rows(m, p, hid, width, hs, &mlp->down);
}

static int bind_layer(ds_model *m, int64_t l, ds_layer *L) {
    const ds_config *c = &m->cfg;
    const ds_shard *sh = &m->shard;
    char p[200], q[240];
    int64_t hid = c->hidden_size, H = c->n_heads;
    int64_t qk = c->qk_nope_head_dim + c->qk_rope_head_dim;
    int64_t kvb = c->qk_nope_head_dim + c->v_head_dim; /* kv_b rows per head */
    ds_span q_rows = {sh->heads.lo * qk, sh->heads.hi * qk};
    ds_span kv_rows = {sh->heads.lo * kvb, sh->heads.hi * kvb};
    int rc;
#define NAME(buf, ...) snprintf(buf, sizeof buf, __VA_ARGS__)
    NAME(p, "model.layers.%lld", (long long)l);
    NAME(q, "%s.input_layernorm", p);
    if ((rc = bind_norm(m, q, hid, &L->attn_norm, &L->attn_norm_bias))) return rc;
    NAME(q, "%s.post_attention_layernorm", p);
    if ((rc = bind_norm(m, q, hid, &L->ffn_norm, &L->ffn_norm_bias))) return rc;
    if (c->q_lora_rank) {
        NAME(q, "%s.self_attn.q_a_proj", p);
        if ((rc = bind_mat(m, q, c->q_lora_rank, hid, &L->q_a))) return rc;
        NAME(q, "%s.self_attn.q_a_layernorm", p);
        if ((rc = bind_norm(m, q, c->q_lora_rank, &L->q_a_norm, &L->q_a_norm_bias))) return rc;
        NAME(q, "%s.self_attn.q_b_proj", p);
        if ((rc = bind_rows(m, q, H * qk, c->q_lora_rank, q_rows, &L->q_b))) return rc;
    } else {
        NAME(q, "%s.self_attn.q_proj", p);
        if ((rc = bind_rows(m, q, H * qk, hid, q_rows, &L->q_b))) return rc;
    }
    NAME(q, "%s.self_attn.kv_a_proj_with_mqa", p);
    if ((rc = bind_mat(m, q, c->kv_lora_rank + c->qk_rope_head_dim, hid, &L->kv_a))) return rc;
    NAME(q, "%s.self_attn.kv_a_layernorm", p);
    if ((rc = bind_norm(m, q, c->kv_lora_rank, &L->kv_a_norm, &L->kv_a_norm_bias))) return rc;
    NAME(q, "%s.self_attn.kv_b_proj", p);
    if ((rc = bind_rows(m, q, H * kvb, c->kv_lora_rank, kv_rows, &L->kv_b))) return rc;
    NAME(q, "%s.self_attn.o_proj", p);
    if ((rc = bind_rows(m, q, hid, H * c->v_head_dim, sh->hidden, &L->o))) return rc;

    L->moe = ds_config_layer_is_moe(c, l);
    if (!L->moe) {
        NAME(q, "%s.mlp", p);
        return bind_mlp(m, q, c->intermediate_size, &sh->dense_inter, &L->dense);
    }
    int64_t E = c->n_routed_experts;
    NAME(q, "%s.mlp.gate", p);
    if ((rc = bind_mat(m, q, E, hid, &L->router))) return rc;
    NAME(q, "%s.mlp.gate.e_score_correction_bias", p);
    if ((rc = bind_vec(m, q, E, &L->router_bias))) return rc;
    L->experts = calloc((size_t)E, sizeof *L->experts);
    if (!L->experts) return ds_err_set(DS_ERR_NOMEM, "out of memory binding %s experts", p);
    for (int64_t e = sh->experts.lo; e < sh->experts.hi; e++) { /* the others stay unbound */
        NAME(q, "%s.mlp.experts.%lld", p, (long long)e);
        if ((rc = bind_mlp(m, q, c->moe_intermediate_size, NULL, &L->experts[e]))) return rc;
    }
    if (c->n_shared_experts > 0) {
        NAME(q, "%s.mlp.shared_experts", p);
        return bind_mlp(m, q, c->moe_intermediate_size * c->n_shared_experts, &sh->shared_inter,
                        &L->shared);
    }
    return DS_OK;
#undef NAME
}

/* Every rank learns whether all opened their shard: one rank's missing file fails them all,
 * each naming the lowest failing rank, instead of leaving the others waiting for steps. */
static int agree(int rc) {
    int64_t v[2] = {rc ? 1 : 0, rc ? -(int64_t)ds_dist_rank() : INT64_MIN};
    char mine[512];
    snprintf(mine, sizeof mine, "%s", ds_err_msg());
    if (ds_dist_allreduce_max_i64(v, 2)) return DS_ERR_IO;
    if (!v[0]) return DS_OK;
    if (rc) return ds_err_set(rc, "rank %d: %s", ds_dist_rank(), mine);
    return ds_err_set(DS_ERR_IO, "rank %lld could not open its shard (its log says why)",
                      (long long)-v[1]);
}

ds_model_params ds_model_default_params(void) {
    return (ds_model_params){.n_threads = 0, .max_batch = 512};
}

int ds_model_open(const char *dir, const ds_model_params *params, ds_model **out) {
    *out = NULL;
    ds_model_params dp = ds_model_default_params();
    if (!params) params = &dp;
    ds_model *m = calloc(1, sizeof *m);
    if (!m) return ds_err_set(DS_ERR_NOMEM, "out of memory");
    m->max_batch = params->max_batch > 0 ? params->max_batch : dp.max_batch;
    /* ranks sharing a node share its cores */
    int threads = params->n_threads;
    if (threads <= 0 && ds_dist_local_size() > 1) {
        long cpus = sysconf(_SC_NPROCESSORS_ONLN);
        threads = cpus / ds_dist_local_size() > 1 ? (int)(cpus / ds_dist_local_size()) : 1;
    }
    int rc = ds_config_load(dir, &m->cfg);
    if (!rc) rc = ds_shard_init(m);
    if (!rc) rc = ds_st_open_dir(dir, &m->st);
    if (!rc) rc = ds_format_open(dir, &m->cfg, m->st, &m->fmt);
    if (!rc) m->rope_split = ds_format_rope_split(m->fmt);
    if (!rc && !(m->pool = ds_pool_open(threads))) rc = DS_ERR_NOMEM;
    if (!rc) rc = ds_rope_init(m);
    const ds_config *c = &m->cfg;
    if (!rc && !(m->layers = calloc((size_t)c->n_layers, sizeof *m->layers)))
        rc = ds_err_set(DS_ERR_NOMEM, "out of memory");
    if (!rc)
        rc = bind_rows(m, "model.embed_tokens", c->vocab_size, c->hidden_size, m->shard.vocab,
                       &m->embed);
    if (!rc) rc = bind_norm(m, "model.norm", c->hidden_size, &m->final_norm, &m->final_norm_bias);
    if (!rc) {
        if (c->tie_word_embeddings && !ds_format_find(m->fmt, "lm_head.weight"))
            m->lm_head = m->embed;
        else
            rc =
                bind_rows(m, "lm_head", c->vocab_size, c->hidden_size, m->shard.vocab, &m->lm_head);
    }
    ds_progress pb;
    ds_progress_begin(&pb, "binding layers", (uint64_t)c->n_layers);
    for (int64_t l = 0; !rc && l < c->n_layers; l++) {
        rc = bind_layer(m, l, &m->layers[l]);
        ds_progress_add(&pb, 1);
    }
    ds_progress_end(&pb);
    /* loaded only where they fit: mapped, they can still be paged in and out (slowly) where
     * memory is short, while loaded ones would get the process killed. The page cache of the
     * files counts as available; it is released as they are read when they take more than a
     * quarter of the memory (a 671B checkpoint's share of a node), and otherwise kept for the
     * next start (tests and small models reload in a fraction of a second). */
    const uint64_t need = rc ? 0 : ds_st_used_bytes(m->st), avail = ds_mem_available();
    if (!rc && !params->map_weights && avail && need > avail) {
        ds_warn("%.2f GiB of weights to load but %.2f GiB of memory available: they stay mapped "
                "from the files (4 KiB pages, read on use)",
                (double)need / (1 << 30), (double)avail / (1 << 30));
    } else if (!rc && !params->map_weights) {
        double t0 = ds_now();
        rc = ds_st_load_used(m->st, need > avail / 4, &m->loaded_bytes);
        if (!rc) rc = interleave_weights(m);
        if (!rc)
            ds_info("loaded %.2f GiB of weights into memory in %.1f s",
                    (double)m->loaded_bytes / (1 << 30), ds_now() - t0);
    }
    if (ds_dist_size() > 1) rc = agree(rc);
    if (rc) {
        m->shard.size = 1; /* nothing to stop: the other ranks fail too */
        ds_model_close(m);
        return rc;
    }
    if (m->shard.size > 1) ds_shard_prefault(m);
    *out = m;
    return DS_OK;
}

void ds_model_close(ds_model *m) {
    if (!m) return;
    ds_shard_send_stop(m);
    ds_free(m->part);
    ds_free(m->gathered);
    ds_free(m->moe_out);
    free(m->moe_slot);
    for (int64_t l = 0; m->layers && l < m->cfg.n_layers; l++) free(m->layers[l].experts);
    free(m->layers);
    free(m->inv_freq);
    ds_free(m->scratch);
    ds_pool_close(m->pool);
    ds_format_close(m->fmt);
    ds_st_close(m->st);
    free(m);
}

const ds_config *ds_model_config(const ds_model *m) {
    return &m->cfg;
}
ds_pool *ds_model_pool(ds_model *m) {
    return m->pool;
}
int ds_model_check_files(const ds_model *m) {
    return ds_st_check_unchanged(m->st);
}

void ds_model_set_trace(ds_model *m, ds_trace_fn fn, void *ctx) {
    m->trace = fn;
    m->trace_ctx = ctx;
}

static uint64_t mlp_bytes(const ds_mlp *p) {
    return p->gate.rows ? ds_mat_bytes(&p->gate) + ds_mat_bytes(&p->up) + ds_mat_bytes(&p->down)
                        : 0;
}

static uint64_t layer_attn_bytes(const ds_layer *L) {
    return (L->q_a.rows ? ds_mat_bytes(&L->q_a) : 0) + ds_mat_bytes(&L->q_b) +
           ds_mat_bytes(&L->kv_a) + ds_mat_bytes(&L->kv_b) + ds_mat_bytes(&L->o);
}

/* Sums weight bytes; with `active` only the experts one token visits (all experts have the
 * same shape, so n_experts_per_tok of them). */
static uint64_t weight_bytes(const ds_model *m, int active) {
    const ds_config *c = &m->cfg;
    uint64_t b = ds_mat_bytes(&m->lm_head);
    /* A decoded token reads one embedding row; the full table is counted once in the total. */
    b += active ? (uint64_t)(ds_mat_bytes(&m->embed) / (uint64_t)m->embed.rows)
                : (m->lm_head.data == m->embed.data ? 0 : ds_mat_bytes(&m->embed));
    for (int64_t l = 0; l < c->n_layers; l++) {
        const ds_layer *L = &m->layers[l];
        b += layer_attn_bytes(L);
        if (!L->moe) {
            b += mlp_bytes(&L->dense);
            continue;
        }
        b += ds_mat_bytes(&L->router) + mlp_bytes(&L->shared);
        /* this rank's experts (all of them on one rank); a token visits at most K of them */
        int64_t mine = m->shard.experts.hi - m->shard.experts.lo;
        b += mlp_bytes(&L->experts[m->shard.experts.lo]) *
             (uint64_t)(active && c->n_experts_per_tok < mine ? c->n_experts_per_tok : mine);
    }
    return b;
}

uint64_t ds_model_layer_bytes(const ds_model *m, int64_t l, const uint8_t *touched) {
    if (l < 0 || l >= m->cfg.n_layers) return 0;
    const ds_layer *L = &m->layers[l];
    uint64_t b = layer_attn_bytes(L);
    if (!L->moe) return b + mlp_bytes(&L->dense);
    b += ds_mat_bytes(&L->router) + mlp_bytes(&L->shared);
    for (int64_t e = m->shard.experts.lo; touched && e < m->shard.experts.hi; e++)
        if (touched[e]) b += mlp_bytes(&L->experts[e]);
    return b;
}

uint64_t ds_model_bytes_per_token(const ds_model *m) {
    return weight_bytes(m, 1);
}
uint64_t ds_model_weight_bytes(const ds_model *m) {
    return weight_bytes(m, 0);
}

uint64_t ds_model_loaded_bytes(const ds_model *m) {
    return m->loaded_bytes;
}
