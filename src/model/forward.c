/* The DeepSeek-V3 forward pass for one sequence, f32 activations.
 *
 * MLA with weight absorption, for prefill and decode alike (the official reference's
 * attn_impl="absorb"). Per token and layer the cache holds only
 *   c_kv = kv_a_layernorm(kv_a(x)[:kv_lora_rank])            (kv_lora_rank)
 *   k_pe = rope(kv_a(x)[kv_lora_rank:])                       (qk_rope_head_dim, all heads)
 * and attention never decompresses per-head keys or values. kv_b_proj holds, per head h,
 * qk_nope rows W_UK[h] followed by v rows W_UV[h], each kv_lora_rank wide, so
 *   score(t, h, s) = (q_nope[t,h] W_UK[h]) . c_kv[s] + q_pe[t,h] . k_pe[s]     (x softmax_scale)
 *   out(t, h)      = W_UV[h] (sum_s p(t,h,s) c_kv[s])
 * q_nope W_UK is formed once per token and head ("q_abs", kv_lora_rank wide). For prefill this
 * costs kv_lora_rank + rope multiply-adds per (query, key) pair instead of qk_nope + rope for
 * the decompressed form; in exchange prefill and decode share one code path and one cache
 * layout, and the numbers match the reference's absorb mode term by term.
 *
 * MoE: sigmoid router scores in f32; e_score_correction_bias is added for selection only;
 * with n_group > 1 a group scores the sum of its two best biased scores and only the topk_group
 * best groups stay eligible; the top-k experts by biased score are weighted by their unbiased
 * scores (normalised when norm_topk_prob) times routed_scaling_factor. Tokens are gathered per
 * expert so each expert runs one matmul over all its tokens; experts are accumulated in index
 * order and the shared experts added last, the reference's summation order. */
#include "model/model_internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Chunk-sized activations; offsets into m->scratch, computed per chunk. */
typedef struct {
    float *x, *h, *a;       /* (B, hidden) residual, normed input, block output */
    float *qa;              /* (B, q_lora_rank) */
    float *q;               /* (B, heads, nope + rope) */
    float *kv;              /* (B, kv_lora_rank + rope) */
    float *q_abs, *o_lat;   /* (B, heads, kv_lora_rank) */
    float *o;               /* (B, heads * v) */
    float *router;          /* (B, n_routed_experts) */
    float *xs, *g, *u, *d;  /* expert batch: (B, hidden), (B, inter) x2, (B, hidden) */
    float *topw;            /* (B, k) routing weights */
    int32_t *tope;          /* (B, k) routed experts, by descending biased score */
    int32_t *by_expert;     /* (B * k) token indices grouped by expert */
    float *thread_buf;      /* per thread: scores (kv cap) + one dequantised row */
    size_t thread_floats;
} fwd_bufs;

static int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

static int setup_bufs(ds_model *m, const ds_kv_cache *kv, int64_t B, fwd_bufs *b) {
    const ds_config *c = &m->cfg;
    int64_t D = c->hidden_size, H = c->n_heads, qk = c->qk_nope_head_dim + c->qk_rope_head_dim;
    int64_t inter = imax(c->intermediate_size, c->moe_intermediate_size * imax(1, c->n_shared_experts));
    int64_t k = imax(1, c->n_experts_per_tok), E = imax(1, c->n_routed_experts);
    int64_t row = imax(imax(c->kv_lora_rank, c->v_head_dim), c->qk_nope_head_dim);
    b->thread_floats = (size_t)((kv->cap + row + 15) & ~(int64_t)15);
    size_t sizes[] = {
        (size_t)(B * D), (size_t)(B * D), (size_t)(B * D), (size_t)(B * c->q_lora_rank),
        (size_t)(B * H * qk), (size_t)(B * (c->kv_lora_rank + c->qk_rope_head_dim)),
        (size_t)(B * H * c->kv_lora_rank), (size_t)(B * H * c->kv_lora_rank),
        (size_t)(B * H * c->v_head_dim), (size_t)(B * E), (size_t)(B * D), (size_t)(B * inter),
        (size_t)(B * inter), (size_t)(B * D), (size_t)(B * k), (size_t)(B * k), (size_t)(B * k),
        b->thread_floats * (size_t)ds_pool_size(m->pool)};
    enum { N = sizeof sizes / sizeof sizes[0] };
    size_t total = 0;
    for (int i = 0; i < N; i++) total += (sizes[i] + 15) & ~(size_t)15; /* 64-byte aligned parts */
    if (total > m->scratch_floats) {
        ds_free(m->scratch);
        m->scratch = ds_alloc(total * sizeof(float));
        m->scratch_floats = m->scratch ? total : 0;
        if (!m->scratch)
            return ds_err_set(DS_ERR_NOMEM, "out of memory: %zu MiB of activations",
                              total * sizeof(float) >> 20);
    }
    float *p = m->scratch, **dst[] = {&b->x, &b->h, &b->a, &b->qa, &b->q, &b->kv, &b->q_abs,
                                      &b->o_lat, &b->o, &b->router, &b->xs, &b->g, &b->u, &b->d,
                                      &b->topw, (float **)&b->tope, (float **)&b->by_expert,
                                      &b->thread_buf};
    for (int i = 0; i < N; i++) {
        *dst[i] = p;
        p += (sizes[i] + 15) & ~(size_t)15;
    }
    return DS_OK;
}

static void trace(ds_model *m, const char *fmt, int64_t l, const float *data, int64_t rows,
                  int64_t cols) {
    if (!m->trace) return;
    char name[96];
    snprintf(name, sizeof name, fmt, (long long)l);
    m->trace(m->trace_ctx, name, data, rows, cols);
}

static void rmsnorm_rows(float *x, const float *w, int64_t rows, int64_t n, int64_t stride,
                         float eps) {
    for (int64_t t = 0; t < rows; t++) ds_rmsnorm(x + t * stride, x + t * stride, w, n, eps);
}

/* ---- MLA ---- */

typedef struct {
    ds_model *m;
    const ds_layer *L;
    ds_kv_cache *kv;
    fwd_bufs *b;
    int64_t n, start_pos, layer;
} attn_ctx;

/* q_abs[t, h] = sum_d q_nope[t, h, d] * W_UK[h][d, :], one dequantised W_UK row at a time so
 * each row is read once for all tokens. Threads split the heads. */
static void absorb_q_task(void *arg, int thread, int n_threads) {
    attn_ctx *a = arg;
    const ds_config *c = &a->m->cfg;
    const ds_kernels *k = ds_kernels_get();
    int64_t H = c->n_heads, R = c->kv_lora_rank, dn = c->qk_nope_head_dim;
    int64_t qk = dn + c->qk_rope_head_dim, rows_per_head = dn + c->v_head_dim;
    float *row = a->b->thread_buf + (size_t)thread * a->b->thread_floats + a->kv->cap;
    size_t h0, h1;
    ds_split_range((size_t)H, thread, n_threads, &h0, &h1);
    for (int64_t h = (int64_t)h0; h < (int64_t)h1; h++) {
        for (int64_t t = 0; t < a->n; t++) memset(a->b->q_abs + (t * H + h) * R, 0, (size_t)R * sizeof(float));
        for (int64_t d = 0; d < dn; d++) {
            ds_mat_row_f32(&a->L->kv_b, h * rows_per_head + d, row);
            for (int64_t t = 0; t < a->n; t++)
                k->axpy_f32(a->b->q_abs + (t * H + h) * R, a->b->q[(t * H + h) * qk + d], row, (size_t)R);
        }
    }
}

/* For each (token, head): scores over the cached positions, softmax, weighted latent sum. */
static void attend_task(void *arg, int thread, int n_threads) {
    attn_ctx *a = arg;
    const ds_config *c = &a->m->cfg;
    const ds_kernels *k = ds_kernels_get();
    int64_t H = c->n_heads, R = c->kv_lora_rank, dr = c->qk_rope_head_dim;
    int64_t qk = c->qk_nope_head_dim + dr;
    const float *lat = a->kv->latent + (size_t)a->layer * (size_t)a->kv->cap * (size_t)R;
    const float *pe = a->kv->pe + (size_t)a->layer * (size_t)a->kv->cap * (size_t)dr;
    float *scores = a->b->thread_buf + (size_t)thread * a->b->thread_floats;
    float scale = a->m->softmax_scale;
    size_t i0, i1;
    ds_split_range((size_t)(a->n * H), thread, n_threads, &i0, &i1);
    for (size_t i = i0; i < i1; i++) {
        int64_t t = (int64_t)i / H, h = (int64_t)i % H, S = a->start_pos + t + 1; /* causal */
        const float *qa = a->b->q_abs + (t * H + h) * R;
        const float *qpe = a->b->q + (t * H + h) * qk + c->qk_nope_head_dim;
        for (int64_t s = 0; s < S; s++)
            scores[s] = (k->dot_f32(qa, lat + s * R, (size_t)R) +
                         k->dot_f32(qpe, pe + s * dr, (size_t)dr)) * scale;
        ds_softmax(scores, S);
        float *ol = a->b->o_lat + (t * H + h) * R;
        memset(ol, 0, (size_t)R * sizeof(float));
        for (int64_t s = 0; s < S; s++) k->axpy_f32(ol, scores[s], lat + s * R, (size_t)R);
    }
}

/* o[t, h, v] = W_UV[h][v, :] . o_lat[t, h]; threads split the heads. */
static void absorb_o_task(void *arg, int thread, int n_threads) {
    attn_ctx *a = arg;
    const ds_config *c = &a->m->cfg;
    const ds_kernels *k = ds_kernels_get();
    int64_t H = c->n_heads, R = c->kv_lora_rank, dn = c->qk_nope_head_dim, dv = c->v_head_dim;
    float *row = a->b->thread_buf + (size_t)thread * a->b->thread_floats + a->kv->cap;
    size_t h0, h1;
    ds_split_range((size_t)H, thread, n_threads, &h0, &h1);
    for (int64_t h = (int64_t)h0; h < (int64_t)h1; h++)
        for (int64_t v = 0; v < dv; v++) {
            ds_mat_row_f32(&a->L->kv_b, h * (dn + dv) + dn + v, row);
            for (int64_t t = 0; t < a->n; t++)
                a->b->o[(t * H + h) * dv + v] = k->dot_f32(a->b->o_lat + (t * H + h) * R, row, (size_t)R);
        }
}

/* b->a = MLA(b->h) for n tokens at start_pos; appends their latents to the cache. */
static void attention(ds_model *m, const ds_layer *L, int64_t l, ds_kv_cache *kv, fwd_bufs *b,
                      int64_t n, int64_t start_pos) {
    const ds_config *c = &m->cfg;
    int64_t H = c->n_heads, R = c->kv_lora_rank, dr = c->qk_rope_head_dim;
    int64_t qk = c->qk_nope_head_dim + dr;
    if (c->q_lora_rank) {
        ds_matmul(m->pool, b->qa, b->h, n, &L->q_a);
        rmsnorm_rows(b->qa, L->q_a_norm, n, c->q_lora_rank, c->q_lora_rank, c->rms_norm_eps);
        ds_matmul(m->pool, b->q, b->qa, n, &L->q_b);
    } else {
        ds_matmul(m->pool, b->q, b->h, n, &L->q_b);
    }
    ds_matmul(m->pool, b->kv, b->h, n, &L->kv_a);
    float cs[DS_MAX_ROPE_DIM];
    for (int64_t t = 0; t < n; t++) {
        int64_t pos = start_pos + t;
        float *kvt = b->kv + t * (R + dr);
        float *lat = kv->latent + ((size_t)l * (size_t)kv->cap + (size_t)pos) * (size_t)R;
        float *pe = kv->pe + ((size_t)l * (size_t)kv->cap + (size_t)pos) * (size_t)dr;
        ds_rope_table(m, pos, cs);
        ds_rmsnorm(lat, kvt, L->kv_a_norm, R, c->rms_norm_eps);
        memcpy(pe, kvt + R, (size_t)dr * sizeof(float));
        ds_rope_rotate(pe, cs, dr);
        for (int64_t h = 0; h < H; h++) ds_rope_rotate(b->q + (t * H + h) * qk + c->qk_nope_head_dim, cs, dr);
    }
    attn_ctx a = {m, L, kv, b, n, start_pos, l};
    ds_pool_run(m->pool, absorb_q_task, &a);
    ds_pool_run(m->pool, attend_task, &a);
    ds_pool_run(m->pool, absorb_o_task, &a);
    ds_matmul(m->pool, b->a, b->o, n, &L->o);
}

/* ---- feed-forward ---- */

/* out[n, hidden] = down(silu(gate(x)) * up(x)), using b->g and b->u as temporaries. */
static void mlp(ds_model *m, const ds_mlp *p, const float *x, int64_t n, float *out, fwd_bufs *b) {
    ds_matmul(m->pool, b->g, x, n, &p->gate);
    ds_matmul(m->pool, b->u, x, n, &p->up);
    ds_swiglu(b->g, b->u, n * p->gate.rows);
    ds_matmul(m->pool, out, b->g, n, &p->down);
}

/* Chooses each token's experts and weights (see the essay at the top). */
static void route(const ds_config *c, const ds_layer *L, fwd_bufs *b, int64_t n) {
    int64_t E = c->n_routed_experts, K = c->n_experts_per_tok, G = c->n_group;
    int64_t per_group = E / G;
    for (int64_t t = 0; t < n; t++) {
        float *sc = b->router + t * E; /* sigmoid scores, unbiased */
        float biased[DS_MAX_EXPERTS];
        int group_ok[DS_MAX_EXPERTS];
        for (int64_t e = 0; e < E; e++) {
            sc[e] = 1.0f / (1.0f + expf(-sc[e]));
            biased[e] = sc[e] + L->router_bias[e];
        }
        for (int64_t g = 0; g < G; g++) group_ok[g] = 1;
        if (G > 1) {
            float gscore[DS_MAX_EXPERTS];
            for (int64_t g = 0; g < G; g++) {
                float b1 = -INFINITY, b2 = -INFINITY;
                for (int64_t e = g * per_group; e < (g + 1) * per_group; e++) {
                    if (biased[e] > b1) b2 = b1, b1 = biased[e];
                    else if (biased[e] > b2) b2 = biased[e];
                }
                gscore[g] = b1 + b2;
                group_ok[g] = 0;
            }
            for (int64_t j = 0; j < c->topk_group; j++) {
                int64_t best = -1;
                for (int64_t g = 0; g < G; g++)
                    if (!group_ok[g] && (best < 0 || gscore[g] > gscore[best])) best = g;
                group_ok[best] = 1;
            }
        }
        /* K <= topk_group * per_group (checked in config), so an eligible expert always
         * remains; a NaN score can only lose comparisons, never leave best at -1. */
        unsigned char taken[DS_MAX_EXPERTS] = {0};
        float wsum = 0;
        for (int64_t j = 0; j < K; j++) {
            int64_t best = -1;
            for (int64_t e = 0; e < E; e++) {
                if (!group_ok[e / per_group] || taken[e]) continue;
                if (best < 0 || biased[e] > biased[best]) best = e;
            }
            taken[best] = 1;
            b->tope[t * K + j] = (int32_t)best;
            b->topw[t * K + j] = sc[best];
            wsum += sc[best];
        }
        for (int64_t j = 0; j < K; j++) {
            if (c->norm_topk_prob) b->topw[t * K + j] /= wsum;
            b->topw[t * K + j] *= c->routed_scaling_factor;
        }
    }
}

/* b->a = MoE(b->h): routed experts over their gathered tokens, then the shared experts. */
static void moe(ds_model *m, const ds_layer *L, int64_t l, fwd_bufs *b, int64_t n) {
    const ds_config *c = &m->cfg;
    int64_t D = c->hidden_size, E = c->n_routed_experts, K = c->n_experts_per_tok;
    ds_matmul(m->pool, b->router, b->h, n, &L->router);
    route(c, L, b, n);
    if (m->trace) {
        float *ids = b->xs; /* free until the experts run */
        for (int64_t i = 0; i < n * K; i++) ids[i] = (float)b->tope[i];
        trace(m, "layers.%lld.moe.gate_weights", l, b->topw, n, K);
        trace(m, "layers.%lld.moe.gate_experts", l, ids, n, K);
    }
    memset(b->a, 0, (size_t)(n * D) * sizeof(float));
    for (int64_t e = 0; e < E; e++) {
        int64_t cnt = 0;
        for (int64_t i = 0; i < n * K; i++)
            if (b->tope[i] == e) b->by_expert[cnt++] = (int32_t)i;
        if (!cnt) continue;
        for (int64_t j = 0; j < cnt; j++)
            memcpy(b->xs + j * D, b->h + (b->by_expert[j] / K) * D, (size_t)D * sizeof(float));
        mlp(m, &L->experts[e], b->xs, cnt, b->d, b);
        for (int64_t j = 0; j < cnt; j++) {
            int64_t i = b->by_expert[j];
            ds_kernels_get()->axpy_f32(b->a + (i / K) * D, b->topw[i], b->d + j * D, (size_t)D);
        }
    }
    if (L->shared.gate.rows) {
        mlp(m, &L->shared, b->h, n, b->d, b);
        trace(m, "layers.%lld.moe.shared_out", l, b->d, n, D);
        for (int64_t i = 0; i < n * D; i++) b->a[i] += b->d[i];
    }
}

/* ---- the network ---- */

static int forward_chunk(ds_model *m, ds_kv_cache *kv, const int32_t *tokens, int64_t n,
                         int64_t start_pos, float *logits, int all_logits, int want_logits) {
    const ds_config *c = &m->cfg;
    int64_t D = c->hidden_size;
    fwd_bufs b;
    int rc = setup_bufs(m, kv, n, &b);
    if (rc) return rc;
    for (int64_t t = 0; t < n; t++) ds_mat_row_f32(&m->embed, tokens[t], b.x + t * D);
    trace(m, "embed", 0, b.x, n, D);
    for (int64_t l = 0; l < c->n_layers; l++) {
        const ds_layer *L = &m->layers[l];
        memcpy(b.h, b.x, (size_t)(n * D) * sizeof(float));
        rmsnorm_rows(b.h, L->attn_norm, n, D, D, c->rms_norm_eps);
        trace(m, "layers.%lld.attn_norm_out", l, b.h, n, D);
        attention(m, L, l, kv, &b, n, start_pos);
        trace(m, "layers.%lld.attn_out", l, b.a, n, D);
        for (int64_t i = 0; i < n * D; i++) b.x[i] += b.a[i];
        memcpy(b.h, b.x, (size_t)(n * D) * sizeof(float));
        rmsnorm_rows(b.h, L->ffn_norm, n, D, D, c->rms_norm_eps);
        trace(m, "layers.%lld.ffn_norm_out", l, b.h, n, D);
        if (L->moe) moe(m, L, l, &b, n);
        else mlp(m, &L->dense, b.h, n, b.a, &b);
        trace(m, "layers.%lld.ffn_out", l, b.a, n, D);
        for (int64_t i = 0; i < n * D; i++) b.x[i] += b.a[i];
        trace(m, "layers.%lld.out", l, b.x, n, D);
    }
    rmsnorm_rows(b.x, m->final_norm, n, D, D, c->rms_norm_eps);
    trace(m, "final_norm_out", 0, b.x, n, D);
    if (all_logits) ds_matmul(m->pool, logits, b.x, n, &m->lm_head);
    else if (want_logits) ds_matmul(m->pool, logits, b.x + (n - 1) * D, 1, &m->lm_head);
    return DS_OK;
}

int ds_model_forward(ds_model *m, ds_kv_cache *kv, const int32_t *tokens, int64_t n,
                     int64_t start_pos, float *logits, int all_logits) {
    const ds_config *c = &m->cfg;
    if (n < 1) return ds_err_set(DS_ERR_ARG, "forward: no tokens");
    if (start_pos < 0 || start_pos + n > kv->cap)
        return ds_err_set(DS_ERR_RANGE,
                          "forward: positions %lld..%lld exceed the KV cache of %lld tokens",
                          (long long)start_pos, (long long)(start_pos + n - 1), (long long)kv->cap);
    if (kv->n_layers != c->n_layers || kv->kv_lora_rank != c->kv_lora_rank ||
        kv->rope_dim != c->qk_rope_head_dim)
        return ds_err_set(DS_ERR_ARG, "forward: KV cache was made for another model shape");
    for (int64_t i = 0; i < n; i++)
        if (tokens[i] < 0 || tokens[i] >= c->vocab_size)
            return ds_err_set(DS_ERR_RANGE, "token id %d at index %lld is outside the vocabulary "
                              "[0, %lld)", tokens[i], (long long)i, (long long)c->vocab_size);
    for (int64_t done = 0; done < n;) {
        int64_t len = n - done < m->max_batch ? n - done : m->max_batch;
        int last = done + len == n;
        float *out = all_logits ? logits + (size_t)done * (size_t)c->vocab_size : logits;
        int rc = forward_chunk(m, kv, tokens + done, len, start_pos + done, out, all_logits, last);
        if (rc) return rc;
        done += len;
    }
    return DS_OK;
}
