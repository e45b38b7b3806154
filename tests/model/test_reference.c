/* An independent, naive float64 DeepSeek-V3 forward pass, and the engine judged against it.
 *
 * The reference below is written from the semantics of Hugging Face's modeling_deepseek.py and
 * the facts in shared/fixtures/README.md, not from the engine's forward pass: decompressed MLA
 * (per head k = [k_nope from kv_b_proj(c_kv), k_pe], v from kv_b_proj; no weight absorption),
 * causal softmax in double, YaRN RoPE on interleaved pairs, group-limited sigmoid routing with
 * e_score_correction_bias for selection only. It reads config.json itself (jansson) and uses the
 * engine only to map safetensors (ds_st_open_dir / ds_st_find) and to dequantise a row
 * (ds_mat_row_f32: BF16 / F32 / F8_E4M3 x weight_scale_inv blocks).
 *
 * 1. Golden fixtures (when present): the reference's logits at the golden top10_ids of every
 *    prompt position ("english", "long_yarn") within 5e-4, and logsumexp within 5e-4: this
 *    validates the reference itself. The engine is then compared with it on "english" too
 *    (tiny-a has norm_topk_prob false, which make-tiny never writes).
 * 2. Checkpoints written by make-tiny (tiny bf16, tiny --no-q-lora (sharded), tiny fp8, small,
 *    small fp8 (several and partial 128x128 blocks), wide (40 heads, 80 positions)): the
 *    engine's full logits at every position (one prefill with all_logits) and again through
 *    prefill-half-then-decode-one-by-one, each within 1e-3 of the reference, and the same argmax
 *    wherever the reference's top1-top2 margin exceeds 1e-3.
 *
 * DS_REF_BREAK=<name> deliberately breaks the reference (yarn_mscale, yarn_freq, rope_pairs,
 * bias, norm_topk) to show that the checks bite; the test must then fail. */
#include "cli/cli.h"
#include "core/core.h"
#include "io/io.h"
#include "kernels/kernels.h"
#include "model/model.h"
#include "testutil.h"

#include <jansson.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define LOGIT_TOL 1e-3  /* engine (f32) vs reference (f64) */
#define MARGIN_TOL 1e-3 /* argmax must agree where the reference margin exceeds this */
#define GOLDEN_TOL 5e-4 /* reference vs golden fixtures (fixtures README) */

static const char *g_break = ""; /* DS_REF_BREAK */
static int brk(const char *what) {
    return strcmp(g_break, what) == 0;
}

static void fatal(const char *fmt, const char *a, const char *b) {
    fprintf(stderr, "test_reference: fatal: ");
    fprintf(stderr, fmt, a, b);
    fprintf(stderr, "\n");
    exit(1);
}

static void *xmalloc(size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p) fatal("out of memory%s%s", "", "");
    return p;
}

/* ---- config.json, read here (not through the engine's parser) ---------------------------- */
typedef struct {
    int64_t V, H, inter, moe_inter, L, nh, q_lora, kv_lora, nope, rope, vd;
    int64_t n_exp, n_shared, topk, n_group, topk_group, first_dense, moe_freq;
    int norm_topk;
    double rsf, eps, theta;
    int yarn;
    double factor, beta_fast, beta_slow, mscale, mscale_all_dim;
    int64_t orig_max;
    int64_t blk[2]; /* fp8 weight_block_size */
} rcfg;

static double jnum(const json_t *o, const char *k, int required, double def, const char *file) {
    const json_t *v = json_object_get(o, k);
    if (!v || json_is_null(v)) {
        if (required) fatal("%s: missing '%s'", file, k);
        return def;
    }
    if (json_is_boolean(v)) return json_is_true(v) ? 1.0 : 0.0;
    if (!json_is_number(v)) fatal("%s: '%s' is not a number", file, k);
    return json_number_value(v);
}

static void rcfg_load(const char *dir, rcfg *c) {
    char path[4096];
    snprintf(path, sizeof path, "%s/config.json", dir);
    json_error_t err;
    json_t *r = json_load_file(path, 0, &err);
    if (!r) fatal("cannot parse %s: %s", path, err.text);
    memset(c, 0, sizeof *c);
    c->V = (int64_t)jnum(r, "vocab_size", 1, 0, path);
    c->H = (int64_t)jnum(r, "hidden_size", 1, 0, path);
    c->inter = (int64_t)jnum(r, "intermediate_size", 1, 0, path);
    c->moe_inter = (int64_t)jnum(r, "moe_intermediate_size", 1, 0, path);
    c->L = (int64_t)jnum(r, "num_hidden_layers", 1, 0, path);
    c->nh = (int64_t)jnum(r, "num_attention_heads", 1, 0, path);
    c->q_lora = (int64_t)jnum(r, "q_lora_rank", 0, 0, path); /* null: q_proj */
    c->kv_lora = (int64_t)jnum(r, "kv_lora_rank", 1, 0, path);
    c->nope = (int64_t)jnum(r, "qk_nope_head_dim", 1, 0, path);
    c->rope = (int64_t)jnum(r, "qk_rope_head_dim", 1, 0, path);
    c->vd = (int64_t)jnum(r, "v_head_dim", 1, 0, path);
    c->n_exp = (int64_t)jnum(r, "n_routed_experts", 0, 0, path);
    c->n_shared = (int64_t)jnum(r, "n_shared_experts", 0, 0, path);
    c->topk = (int64_t)jnum(r, "num_experts_per_tok", 0, 0, path);
    c->n_group = (int64_t)jnum(r, "n_group", 0, 1, path);
    c->topk_group = (int64_t)jnum(r, "topk_group", 0, 1, path);
    c->first_dense = (int64_t)jnum(r, "first_k_dense_replace", 0, 0, path);
    c->moe_freq = (int64_t)jnum(r, "moe_layer_freq", 0, 1, path);
    c->norm_topk = jnum(r, "norm_topk_prob", 0, 0, path) != 0;
    c->rsf = jnum(r, "routed_scaling_factor", 0, 1.0, path);
    c->eps = jnum(r, "rms_norm_eps", 0, 1e-6, path);
    c->theta = jnum(r, "rope_theta", 0, 10000.0, path);
    const json_t *rs = json_object_get(r, "rope_scaling");
    if (rs && json_is_object(rs)) {
        const json_t *t = json_object_get(rs, "type");
        if (!t) t = json_object_get(rs, "rope_type");
        if (!t || !json_is_string(t) || strcmp(json_string_value(t), "yarn") != 0)
            fatal("%s: rope_scaling type is not yarn%s", path, "");
        c->yarn = 1;
        c->factor = jnum(rs, "factor", 1, 0, path);
        c->beta_fast = jnum(rs, "beta_fast", 0, 32, path);
        c->beta_slow = jnum(rs, "beta_slow", 0, 1, path);
        c->mscale = jnum(rs, "mscale", 0, 1, path);
        c->mscale_all_dim = jnum(rs, "mscale_all_dim", 0, 0, path);
        c->orig_max = (int64_t)jnum(rs, "original_max_position_embeddings", 0, 4096, path);
    }
    c->blk[0] = c->blk[1] = 128;
    const json_t *q = json_object_get(r, "quantization_config");
    if (q && json_is_object(q)) {
        const json_t *b = json_object_get(q, "weight_block_size");
        if (b && json_array_size(b) == 2) {
            c->blk[0] = (int64_t)json_number_value(json_array_get(b, 0));
            c->blk[1] = (int64_t)json_number_value(json_array_get(b, 1));
        }
    }
    json_decref(r);
    if (c->moe_freq < 1) c->moe_freq = 1;
}

/* ---- weights: safetensors through the engine's reader, dequantised with ds_mat_row_f32 ---- */
typedef struct {
    rcfg c;
    ds_st_set *st;
    double min_group_gap, min_expert_gap; /* smallest selection margins seen (diagnostics) */
} ref_model;

static ds_mat get_mat(const ref_model *m, const char *name, int64_t rows, int64_t cols) {
    const ds_st_tensor *t = ds_st_find(m->st, name);
    if (!t) fatal("tensor %s missing%s", name, "");
    int64_t r = t->ndim == 2 ? t->shape[0] : 1, cc = t->ndim == 2 ? t->shape[1] : t->shape[0];
    if (t->ndim < 1 || t->ndim > 2 || r != rows || cc != cols)
        fatal("tensor %s has an unexpected shape%s", name, "");
    ds_mat w;
    memset(&w, 0, sizeof w);
    w.dtype = t->dtype;
    w.rows = rows;
    w.cols = cols;
    w.data = t->data;
    if (t->dtype == DS_F8_E4M3) {
        char sn[512];
        snprintf(sn, sizeof sn, "%s_scale_inv", name);
        const ds_st_tensor *s = ds_st_find(m->st, sn);
        if (!s || s->dtype != DS_F32 || s->ndim != 2 ||
            s->shape[0] != (rows + m->c.blk[0] - 1) / m->c.blk[0] ||
            s->shape[1] != (cols + m->c.blk[1] - 1) / m->c.blk[1])
            fatal("%s missing or misshapen for %s", sn, name);
        w.scale = (const float *)s->data;
        w.block_rows = m->c.blk[0];
        w.block_cols = m->c.blk[1];
    } else if (t->dtype != DS_BF16 && t->dtype != DS_F32 && t->dtype != DS_F16) {
        fatal("tensor %s: unexpected dtype %s", name, ds_dtype_name(t->dtype));
    }
    return w;
}

/* The whole matrix [rows, cols] in double. */
static double *ld(const ref_model *m, const char *name, int64_t rows, int64_t cols) {
    ds_mat w = get_mat(m, name, rows, cols);
    double *out = xmalloc((size_t)(rows * cols) * sizeof(double));
    float *row = xmalloc((size_t)cols * sizeof(float));
    for (int64_t r = 0; r < rows; r++) {
        ds_mat_row_f32(&w, r, row);
        for (int64_t i = 0; i < cols; i++) out[r * cols + i] = row[i];
    }
    free(row);
    return out;
}

static double *ldf(const ref_model *m, const char *fmt, int64_t l, int64_t rows, int64_t cols) {
    char name[512];
    snprintf(name, sizeof name, fmt, (long long)l);
    return ld(m, name, rows, cols);
}

static double *lde(const ref_model *m, int64_t l, int64_t e, const char *proj, int64_t rows,
                   int64_t cols) {
    char name[512];
    snprintf(name, sizeof name, "model.layers.%lld.mlp.experts.%lld.%s.weight", (long long)l,
             (long long)e, proj);
    return ld(m, name, rows, cols);
}

/* ---- the math --------------------------------------------------------------------------- */
/* y[t, r] = sum_c x[t, c] W[r, c] */
static void mm(double *y, const double *x, int64_t T, const double *W, int64_t rows, int64_t cols) {
    for (int64_t t = 0; t < T; t++)
        for (int64_t r = 0; r < rows; r++) {
            const double *w = W + r * cols, *xt = x + t * cols;
            double s = 0;
            for (int64_t c = 0; c < cols; c++) s += xt[c] * w[c];
            y[t * rows + r] = s;
        }
}

static void rmsnorm(double *y, const double *x, int64_t T, int64_t n, int64_t xstride,
                    const double *w, double eps) {
    for (int64_t t = 0; t < T; t++) {
        const double *xt = x + t * xstride;
        double ss = 0;
        for (int64_t i = 0; i < n; i++) ss += xt[i] * xt[i];
        double inv = 1.0 / sqrt(ss / (double)n + eps);
        for (int64_t i = 0; i < n; i++) y[t * n + i] = xt[i] * inv * w[i];
    }
}

static double silu(double x) {
    return x / (1.0 + exp(-x));
}
static double sigmoid(double x) {
    return 1.0 / (1.0 + exp(-x));
}

static double yarn_get_mscale(double scale, double mscale) {
    if (scale <= 1.0) return 1.0;
    return 0.1 * mscale * log(scale) + 1.0;
}

/* HF DeepseekV3YarnRotaryEmbedding / DeepseekV3RotaryEmbedding: inverse frequencies of the
 * rope/2 interleaved pairs, and the factor cos/sin are multiplied by. */
static void rope_setup(const rcfg *c, double *inv_freq, double *cs_mscale) {
    const int64_t d = c->rope, half = d / 2;
    *cs_mscale = 1.0;
    for (int64_t i = 0; i < half; i++)
        inv_freq[i] = 1.0 / pow(c->theta, (double)(2 * i) / (double)d);
    if (!c->yarn || brk("yarn_freq")) return;
    /* yarn_find_correction_dim(num_rot) = d * ln(orig / (num_rot * 2 pi)) / (2 ln base) */
    double lo_d =
        (double)d * log((double)c->orig_max / (c->beta_fast * 2.0 * M_PI)) / (2.0 * log(c->theta));
    double hi_d =
        (double)d * log((double)c->orig_max / (c->beta_slow * 2.0 * M_PI)) / (2.0 * log(c->theta));
    double lo = floor(lo_d), hi = ceil(hi_d);
    if (lo < 0) lo = 0;
    if (hi > (double)(d - 1)) hi = (double)(d - 1);
    if (lo == hi) hi += 0.001;
    for (int64_t i = 0; i < half; i++) {
        double ramp = ((double)i - lo) / (hi - lo);
        if (ramp < 0) ramp = 0;
        if (ramp > 1) ramp = 1;
        double smooth = 1.0 - ramp; /* inv_freq_mask: 1 = extrapolate (keep the original freq) */
        double f = inv_freq[i];
        inv_freq[i] = f / c->factor * (1.0 - smooth) + f * smooth;
    }
    *cs_mscale =
        yarn_get_mscale(c->factor, c->mscale) / yarn_get_mscale(c->factor, c->mscale_all_dim);
}

static void rope_apply(double *x, int64_t pos, const double *inv_freq, int64_t d, double cs) {
    if (brk("rope_pairs")) { /* (i, i + d/2) pairing, the wrong convention */
        for (int64_t i = 0; i < d / 2; i++) {
            double a = (double)pos * inv_freq[i], co = cos(a) * cs, si = sin(a) * cs;
            double x0 = x[i], x1 = x[i + d / 2];
            x[i] = x0 * co - x1 * si;
            x[i + d / 2] = x0 * si + x1 * co;
        }
        return;
    }
    for (int64_t i = 0; i < d / 2; i++) {
        double a = (double)pos * inv_freq[i], co = cos(a) * cs, si = sin(a) * cs;
        double x0 = x[2 * i], x1 = x[2 * i + 1];
        x[2 * i] = x0 * co - x1 * si;
        x[2 * i + 1] = x0 * si + x1 * co;
    }
}

/* out[T, H] += SwiGLU MLP of x[T, H] with the given weights ([inter, H], [inter, H], [H, inter]),
 * each token scaled by wt[t] (NULL: 1). */
static void mlp_add(double *out, const double *x, int64_t T, int64_t H, int64_t inter,
                    const double *g, const double *u, const double *dn, const double *wt,
                    const int64_t *rows, int64_t n_rows) {
    double *a = xmalloc((size_t)inter * sizeof(double));
    for (int64_t k = 0; k < (rows ? n_rows : T); k++) {
        int64_t t = rows ? rows[k] : k;
        const double *xt = x + t * H;
        for (int64_t i = 0; i < inter; i++) {
            double sg = 0, su = 0;
            for (int64_t c = 0; c < H; c++) {
                sg += g[i * H + c] * xt[c];
                su += u[i * H + c] * xt[c];
            }
            a[i] = silu(sg) * su;
        }
        double w = wt ? wt[t] : 1.0;
        for (int64_t r = 0; r < H; r++) {
            double s = 0;
            for (int64_t i = 0; i < inter; i++) s += dn[r * inter + i] * a[i];
            out[t * H + r] += w * s;
        }
    }
    free(a);
}

static void attention(ref_model *m, int64_t l, const double *x, int64_t T, double *out) {
    const rcfg *c = &m->c;
    const int64_t H = c->H, nh = c->nh, qk = c->nope + c->rope, kvw = c->nope + c->vd;
    double *q = xmalloc((size_t)(T * nh * qk) * sizeof(double));
    if (c->q_lora) {
        double *wa = ldf(m, "model.layers.%lld.self_attn.q_a_proj.weight", l, c->q_lora, H);
        double *na = ldf(m, "model.layers.%lld.self_attn.q_a_layernorm.weight", l, 1, c->q_lora);
        double *wb = ldf(m, "model.layers.%lld.self_attn.q_b_proj.weight", l, nh * qk, c->q_lora);
        double *qa = xmalloc((size_t)(T * c->q_lora) * sizeof(double));
        mm(qa, x, T, wa, c->q_lora, H);
        rmsnorm(qa, qa, T, c->q_lora, c->q_lora, na, c->eps);
        mm(q, qa, T, wb, nh * qk, c->q_lora);
        free(qa);
        free(wa);
        free(na);
        free(wb);
    } else {
        double *wq = ldf(m, "model.layers.%lld.self_attn.q_proj.weight", l, nh * qk, H);
        mm(q, x, T, wq, nh * qk, H);
        free(wq);
    }
    const int64_t kva_w = c->kv_lora + c->rope;
    double *wkva = ldf(m, "model.layers.%lld.self_attn.kv_a_proj_with_mqa.weight", l, kva_w, H);
    double *nkv = ldf(m, "model.layers.%lld.self_attn.kv_a_layernorm.weight", l, 1, c->kv_lora);
    double *wkvb = ldf(m, "model.layers.%lld.self_attn.kv_b_proj.weight", l, nh * kvw, c->kv_lora);
    double *wo = ldf(m, "model.layers.%lld.self_attn.o_proj.weight", l, H, nh * c->vd);
    double *kva = xmalloc((size_t)(T * kva_w) * sizeof(double));
    double *ckv = xmalloc((size_t)(T * c->kv_lora) * sizeof(double));
    double *kpe = xmalloc((size_t)(T * c->rope) * sizeof(double));
    double *kv = xmalloc((size_t)(T * nh * kvw) * sizeof(double));
    mm(kva, x, T, wkva, kva_w, H);
    rmsnorm(ckv, kva, T, c->kv_lora, kva_w, nkv, c->eps); /* only the latent part */
    double inv_freq[DS_MAX_ROPE_DIM / 2], cs;
    rope_setup(c, inv_freq, &cs);
    for (int64_t t = 0; t < T; t++) {
        memcpy(kpe + t * c->rope, kva + t * kva_w + c->kv_lora, (size_t)c->rope * sizeof(double));
        rope_apply(kpe + t * c->rope, t, inv_freq, c->rope, cs);
        for (int64_t h = 0; h < nh; h++)
            rope_apply(q + t * nh * qk + h * qk + c->nope, t, inv_freq, c->rope, cs);
    }
    mm(kv, ckv, T, wkvb, nh * kvw, c->kv_lora);

    double scale = 1.0 / sqrt((double)qk);
    if (c->yarn && c->mscale_all_dim != 0 && !brk("yarn_mscale")) {
        double ms = yarn_get_mscale(c->factor, c->mscale_all_dim);
        scale *= ms * ms;
    }
    double *att = xmalloc((size_t)(T * nh * c->vd) * sizeof(double));
    double *p = xmalloc((size_t)T * sizeof(double));
    for (int64_t t = 0; t < T; t++)
        for (int64_t h = 0; h < nh; h++) {
            const double *qh = q + t * nh * qk + h * qk;
            double mx = -INFINITY;
            for (int64_t s = 0; s <= t; s++) {
                const double *kn = kv + s * nh * kvw + h * kvw, *kp = kpe + s * c->rope;
                double d = 0;
                for (int64_t i = 0; i < c->nope; i++) d += qh[i] * kn[i];
                for (int64_t i = 0; i < c->rope; i++) d += qh[c->nope + i] * kp[i];
                p[s] = d * scale;
                if (p[s] > mx) mx = p[s];
            }
            double sum = 0;
            for (int64_t s = 0; s <= t; s++) sum += (p[s] = exp(p[s] - mx));
            double *o = att + t * nh * c->vd + h * c->vd;
            for (int64_t i = 0; i < c->vd; i++) o[i] = 0;
            for (int64_t s = 0; s <= t; s++) {
                const double *v = kv + s * nh * kvw + h * kvw + c->nope;
                for (int64_t i = 0; i < c->vd; i++) o[i] += p[s] / sum * v[i];
            }
        }
    mm(out, att, T, wo, H, nh * c->vd);
    free(q);
    free(wkva);
    free(nkv);
    free(wkvb);
    free(wo);
    free(kva);
    free(ckv);
    free(kpe);
    free(kv);
    free(att);
    free(p);
}

/* Group-limited top-k routing of one token, as the fixtures README states. */
static void route(ref_model *m, const double *logit, const double *bias, int64_t *sel, double *w) {
    const rcfg *c = &m->c;
    const int64_t E = c->n_exp, G = c->n_group, per = E / G;
    double s[DS_MAX_EXPERTS], b[DS_MAX_EXPERTS], gs[DS_MAX_EXPERTS];
    int keep_g[DS_MAX_EXPERTS] = {0}, taken[DS_MAX_EXPERTS] = {0};
    for (int64_t e = 0; e < E; e++) {
        s[e] = sigmoid(logit[e]);
        b[e] = s[e] + (brk("bias") ? 0.0 : bias[e]);
    }
    for (int64_t g = 0; g < G; g++) { /* sum of the group's two best biased scores */
        double b1 = -INFINITY, b2 = -INFINITY;
        for (int64_t j = 0; j < per; j++) {
            double v = b[g * per + j];
            if (v > b1) {
                b2 = b1;
                b1 = v;
            } else if (v > b2)
                b2 = v;
        }
        gs[g] = per >= 2 ? b1 + b2 : b1;
    }
    double last_in = INFINITY;
    for (int64_t k = 0; k < c->topk_group; k++) {
        int64_t best = -1;
        for (int64_t g = 0; g < G; g++)
            if (!keep_g[g] && (best < 0 || gs[g] > gs[best])) best = g;
        keep_g[best] = 1;
        last_in = gs[best];
    }
    for (int64_t g = 0; g < G; g++)
        if (!keep_g[g] && last_in - gs[g] < m->min_group_gap) m->min_group_gap = last_in - gs[g];
    double sum = 0;
    last_in = INFINITY;
    for (int64_t k = 0; k < c->topk; k++) {
        int64_t best = -1;
        for (int64_t e = 0; e < E; e++)
            if (keep_g[e / per] && !taken[e] && (best < 0 || b[e] > b[best])) best = e;
        taken[best] = 1;
        sel[k] = best;
        w[k] = s[best];
        sum += s[best];
        last_in = b[best];
    }
    for (int64_t e = 0; e < E; e++)
        if (keep_g[e / per] && !taken[e] && last_in - b[e] < m->min_expert_gap)
            m->min_expert_gap = last_in - b[e];
    int norm = brk("norm_topk") ? !c->norm_topk : c->norm_topk;
    for (int64_t k = 0; k < c->topk; k++) w[k] = (norm ? w[k] / sum : w[k]) * c->rsf;
}

static void moe(ref_model *m, int64_t l, const double *x, int64_t T, double *out) {
    const rcfg *c = &m->c;
    const int64_t H = c->H, E = c->n_exp, I = c->moe_inter;
    double *gate = ldf(m, "model.layers.%lld.mlp.gate.weight", l, E, H);
    double *bias = ldf(m, "model.layers.%lld.mlp.gate.e_score_correction_bias", l, 1, E);
    double *logit = xmalloc((size_t)(T * E) * sizeof(double));
    mm(logit, x, T, gate, E, H);
    /* per expert: the tokens routed to it and their weights */
    double *wt = xmalloc((size_t)(E * T) * sizeof(double));
    int64_t *rows = xmalloc((size_t)(E * T) * sizeof(int64_t)),
            *nr = calloc((size_t)E, sizeof(int64_t));
    int64_t sel[DS_MAX_EXPERTS];
    double w[DS_MAX_EXPERTS];
    for (int64_t t = 0; t < T; t++) {
        route(m, logit + t * E, bias, sel, w);
        for (int64_t k = 0; k < c->topk; k++) {
            int64_t e = sel[k];
            rows[e * T + nr[e]++] = t;
            wt[e * T + t] = w[k];
        }
    }
    memset(out, 0, (size_t)(T * H) * sizeof(double));
    for (int64_t e = 0; e < E; e++) {
        if (!nr[e]) continue;
        double *g = lde(m, l, e, "gate_proj", I, H), *u = lde(m, l, e, "up_proj", I, H),
               *dn = lde(m, l, e, "down_proj", H, I);
        mlp_add(out, x, T, H, I, g, u, dn, wt + e * T, rows + e * T, nr[e]);
        free(g);
        free(u);
        free(dn);
    }
    if (c->n_shared > 0) {
        const int64_t SI = I * c->n_shared;
        double *g = ldf(m, "model.layers.%lld.mlp.shared_experts.gate_proj.weight", l, SI, H);
        double *u = ldf(m, "model.layers.%lld.mlp.shared_experts.up_proj.weight", l, SI, H);
        double *dn = ldf(m, "model.layers.%lld.mlp.shared_experts.down_proj.weight", l, H, SI);
        mlp_add(out, x, T, H, SI, g, u, dn, NULL, NULL, 0);
        free(g);
        free(u);
        free(dn);
    }
    free(gate);
    free(bias);
    free(logit);
    free(wt);
    free(rows);
    free(nr);
}

static void dense(ref_model *m, int64_t l, const double *x, int64_t T, double *out) {
    const rcfg *c = &m->c;
    double *g = ldf(m, "model.layers.%lld.mlp.gate_proj.weight", l, c->inter, c->H);
    double *u = ldf(m, "model.layers.%lld.mlp.up_proj.weight", l, c->inter, c->H);
    double *dn = ldf(m, "model.layers.%lld.mlp.down_proj.weight", l, c->H, c->inter);
    memset(out, 0, (size_t)(T * c->H) * sizeof(double));
    mlp_add(out, x, T, c->H, c->inter, g, u, dn, NULL, NULL, 0);
    free(g);
    free(u);
    free(dn);
}

static int ref_open(const char *dir, ref_model *m) {
    memset(m, 0, sizeof *m);
    rcfg_load(dir, &m->c);
    m->min_group_gap = m->min_expert_gap = INFINITY;
    if (ds_st_open_dir(dir, &m->st) != 0) {
        fprintf(stderr, "ds_st_open_dir(%s): %s\n", dir, ds_err_msg());
        return -1;
    }
    if (m->c.n_exp > DS_MAX_EXPERTS || m->c.rope > DS_MAX_ROPE_DIM || m->c.n_group < 1 ||
        m->c.n_exp % m->c.n_group) {
        fprintf(stderr, "%s: config outside what the reference handles\n", dir);
        return -1;
    }
    return 0;
}

static void ref_close(ref_model *m) {
    ds_st_close(m->st);
}

/* logits[T, V] (double) after each of tokens[0..T). */
static double *ref_forward(ref_model *m, const int32_t *tok, int64_t T) {
    const rcfg *c = &m->c;
    const int64_t H = c->H;
    double *h = xmalloc((size_t)(T * H) * sizeof(double));
    double *x = xmalloc((size_t)(T * H) * sizeof(double));
    double *o = xmalloc((size_t)(T * H) * sizeof(double));
    {
        ds_mat emb = get_mat(m, "model.embed_tokens.weight", c->V, H);
        float *row = xmalloc((size_t)H * sizeof(float));
        for (int64_t t = 0; t < T; t++) {
            ds_mat_row_f32(&emb, tok[t], row);
            for (int64_t i = 0; i < H; i++) h[t * H + i] = row[i];
        }
        free(row);
    }
    for (int64_t l = 0; l < c->L; l++) {
        double *n1 = ldf(m, "model.layers.%lld.input_layernorm.weight", l, 1, H);
        double *n2 = ldf(m, "model.layers.%lld.post_attention_layernorm.weight", l, 1, H);
        rmsnorm(x, h, T, H, H, n1, c->eps);
        attention(m, l, x, T, o);
        for (int64_t i = 0; i < T * H; i++) h[i] += o[i];
        rmsnorm(x, h, T, H, H, n2, c->eps);
        int is_moe = c->n_exp > 0 && l >= c->first_dense && l % c->moe_freq == 0;
        if (is_moe)
            moe(m, l, x, T, o);
        else
            dense(m, l, x, T, o);
        for (int64_t i = 0; i < T * H; i++) h[i] += o[i];
        free(n1);
        free(n2);
    }
    double *nf = ld(m, "model.norm.weight", 1, H);
    rmsnorm(x, h, T, H, H, nf, c->eps);
    free(nf);
    double *logits = xmalloc((size_t)(T * c->V) * sizeof(double));
    ds_mat lm = get_mat(m, "lm_head.weight", c->V, H);
    float *rowf = xmalloc((size_t)H * sizeof(float));
    double *row = xmalloc((size_t)H * sizeof(double));
    for (int64_t v = 0; v < c->V; v++) { /* each row converted once, dotted with every position */
        ds_mat_row_f32(&lm, v, rowf);
        for (int64_t i = 0; i < H; i++) row[i] = rowf[i];
        for (int64_t t = 0; t < T; t++) {
            const double *xt = x + t * H;
            double s = 0;
            for (int64_t i = 0; i < H; i++) s += xt[i] * row[i];
            logits[t * c->V + v] = s;
        }
    }
    free(rowf);
    free(row);
    free(h);
    free(x);
    free(o);
    return logits;
}

/* ---- comparisons -------------------------------------------------------------------------- */
static void top2(const double *l, int64_t V, int64_t *i1, double *margin) {
    int64_t a = 0;
    for (int64_t v = 1; v < V; v++)
        if (l[v] > l[a]) a = v;
    double second = -INFINITY;
    for (int64_t v = 0; v < V; v++)
        if (v != a && l[v] > second) second = l[v];
    *i1 = a;
    *margin = l[a] - second;
}

static int64_t argmax_f(const float *l, int64_t V) {
    int64_t a = 0;
    for (int64_t v = 1; v < V; v++)
        if (l[v] > l[a]) a = v;
    return a;
}

/* Engine logits eng[n, V] for positions pos0.. against ref[T, V]. Returns the max abs diff. */
static double compare(const char *label, const float *eng, const double *ref, int64_t pos0,
                      int64_t n, int64_t V, const ref_model *m) {
    double worst = 0;
    int64_t worst_pos = -1;
    int argmax_ok = 1;
    for (int64_t k = 0; k < n; k++) {
        const int64_t t = pos0 + k;
        const float *e = eng + k * V;
        const double *r = ref + t * V;
        double md = 0;
        int finite = 1;
        for (int64_t v = 0; v < V; v++) {
            if (!isfinite(e[v])) finite = 0;
            double d = fabs((double)e[v] - r[v]);
            if (d > md || d != d) md = d;
        }
        CHECK_MSG(finite, "%s: non-finite engine logit at position %lld", label, (long long)t);
        if (!finite) md = INFINITY;
        if (md > worst || worst_pos < 0) {
            worst = md;
            worst_pos = t;
        }
        CHECK_MSG(md <= LOGIT_TOL,
                  "%s: position %lld: max |engine - reference| = %.3g > %g "
                  "(min routing gaps seen by the reference: group %.3g, expert %.3g)",
                  label, (long long)t, md, LOGIT_TOL, m->min_group_gap, m->min_expert_gap);
        int64_t r1, e1 = argmax_f(e, V);
        double margin;
        top2(r, V, &r1, &margin);
        if (margin > MARGIN_TOL && e1 != r1) argmax_ok = 0;
        CHECK_MSG(margin <= MARGIN_TOL || e1 == r1,
                  "%s: position %lld: engine argmax %lld, reference argmax %lld (margin %.3g)",
                  label, (long long)t, (long long)e1, (long long)r1, margin);
    }
    printf("  %-34s positions %lld..%lld: max |diff| %.3g (at %lld)%s\n", label, (long long)pos0,
           (long long)(pos0 + n - 1), worst, (long long)worst_pos,
           argmax_ok ? "" : "  ARGMAX MISMATCH");
    return worst;
}

/* The engine on dir: one prefill with all logits, and prefill-half-then-decode. */
static void engine_vs_ref(const char *label, const char *dir, const int32_t *tok, int64_t T,
                          const double *ref, const ref_model *rm) {
    ds_model_params mp = ds_model_default_params();
    mp.n_threads = 2;
    ds_model *m = NULL;
    int rc = ds_model_open(dir, &mp, &m);
    CHECK_MSG(rc == 0, "%s: ds_model_open: %s", label, ds_err_msg());
    if (rc) return;
    const int64_t V = ds_model_config(m)->vocab_size;
    CHECK(V == rm->c.V);
    float *lg = xmalloc((size_t)(T * V) * sizeof(float));
    char lab[128];

    ds_kv_cache *kv = NULL;
    rc = ds_kv_open(ds_model_config(m), T, &kv);
    CHECK_MSG(rc == 0, "%s: ds_kv_open: %s", label, ds_err_msg());
    if (!rc) {
        rc = ds_model_forward(m, kv, tok, T, 0, lg, 1);
        CHECK_MSG(rc == 0, "%s: ds_model_forward: %s", label, ds_err_msg());
        snprintf(lab, sizeof lab, "%s prefill", label);
        if (!rc) compare(lab, lg, ref, 0, T, V, rm);
    }
    ds_kv_close(kv);

    kv = NULL;
    rc = ds_kv_open(ds_model_config(m), T, &kv);
    CHECK_MSG(rc == 0, "%s: ds_kv_open: %s", label, ds_err_msg());
    if (!rc) {
        const int64_t half = T / 2;
        rc = ds_model_forward(m, kv, tok, half, 0, lg, 1);
        CHECK_MSG(rc == 0, "%s: ds_model_forward (first half): %s", label, ds_err_msg());
        snprintf(lab, sizeof lab, "%s prefill-half", label);
        if (!rc) compare(lab, lg, ref, 0, half, V, rm);
        for (int64_t t = half; !rc && t < T; t++) {
            rc = ds_model_forward(m, kv, tok + t, 1, t, lg + (t - half) * V, 0);
            CHECK_MSG(rc == 0, "%s: ds_model_forward (decode %lld): %s", label, (long long)t,
                      ds_err_msg());
        }
        snprintf(lab, sizeof lab, "%s decode", label);
        if (!rc) compare(lab, lg, ref, half, T - half, V, rm);
    }
    ds_kv_close(kv);
    free(lg);
    ds_model_close(m);
}

/* ---- golden fixtures ------------------------------------------------------------------------ */
static void golden_dir(const char *fx, const char *name) {
    char dir[4096], path[4200];
    snprintf(dir, sizeof dir, "%s/%s", fx, name);
    snprintf(path, sizeof path, "%s/golden.json", dir);
    json_error_t err;
    json_t *g = json_load_file(path, 0, &err);
    if (!g) {
        CHECK_MSG(0, "cannot read %s: %s", path, err.text);
        return;
    }
    ref_model rm;
    if (ref_open(dir, &rm) != 0) {
        CHECK_MSG(0, "cannot open %s", dir);
        json_decref(g);
        return;
    }
    const json_t *prompts = json_object_get(g, "prompts");
    size_t i;
    const json_t *p;
    json_array_foreach(prompts, i, p) {
        const char *pn = json_string_value(json_object_get(p, "name"));
        if (!pn || (strcmp(pn, "english") != 0 && strcmp(pn, "long_yarn") != 0)) continue;
        const json_t *ids = json_object_get(p, "ids");
        const json_t *pre = json_object_get(p, "prefill");
        const json_t *tid = json_object_get(pre, "top10_ids"),
                     *tlg = json_object_get(pre, "top10_logits"),
                     *lse = json_object_get(pre, "logsumexp");
        const int64_t T = (int64_t)json_array_size(ids);
        CHECK_MSG(T > 0 && json_array_size(tid) == (size_t)T && json_array_size(tlg) == (size_t)T &&
                      json_array_size(lse) == (size_t)T,
                  "%s/%s: golden arrays have unexpected sizes", name, pn);
        if (T <= 0 || json_array_size(tid) != (size_t)T || json_array_size(tlg) != (size_t)T ||
            json_array_size(lse) != (size_t)T)
            continue;
        int32_t *tok = xmalloc((size_t)T * sizeof(int32_t));
        for (int64_t t = 0; t < T; t++)
            tok[t] = (int32_t)json_integer_value(json_array_get(ids, (size_t)t));
        double *ref = ref_forward(&rm, tok, T);
        double worst = 0, worst_lse = 0;
        int64_t bad = 0;
        for (int64_t t = 0; t < T; t++) {
            const double *r = ref + t * rm.c.V;
            const json_t *ti = json_array_get(tid, (size_t)t), *tl = json_array_get(tlg, (size_t)t);
            for (size_t k = 0; k < json_array_size(ti); k++) {
                int64_t id = (int64_t)json_integer_value(json_array_get(ti, k));
                double gl = json_number_value(json_array_get(tl, k));
                double d = (id >= 0 && id < rm.c.V) ? fabs(r[id] - gl) : INFINITY;
                if (d > worst) worst = d;
                if (!(d <= GOLDEN_TOL)) bad++;
            }
            double mx = -INFINITY, s = 0;
            for (int64_t v = 0; v < rm.c.V; v++)
                if (r[v] > mx) mx = r[v];
            for (int64_t v = 0; v < rm.c.V; v++) s += exp(r[v] - mx);
            double d = fabs(mx + log(s) - json_number_value(json_array_get(lse, (size_t)t)));
            if (d > worst_lse) worst_lse = d;
        }
        printf("  reference vs golden %s/%-10s %lld positions: max |logit diff| at top10 ids %.3g, "
               "max |logsumexp diff| %.3g\n",
               name, pn, (long long)T, worst, worst_lse);
        CHECK_MSG(bad == 0 && worst <= GOLDEN_TOL,
                  "%s/%s: %lld golden top-10 logits off by more than %g "
                  "(max %.3g): the reference itself is wrong",
                  name, pn, (long long)bad, GOLDEN_TOL, worst);
        CHECK_MSG(worst_lse <= GOLDEN_TOL, "%s/%s: logsumexp off by %.3g", name, pn, worst_lse);
        if (!strcmp(pn, "english")) {
            char lab[128];
            snprintf(lab, sizeof lab, "%s/english", name);
            engine_vs_ref(lab, dir, tok, T, ref, &rm);
        }
        free(ref);
        free(tok);
    }
    ref_close(&rm);
    json_decref(g);
}

/* ---- make-tiny checkpoints ------------------------------------------------------------------ */
typedef struct {
    const char *name;
    const char *args[12]; /* after OUT_DIR; NULL-terminated */
    int64_t T;
} mt_case;

static int make_tiny(const char *out, const char *const *args) {
    char *argv[32];
    int argc = 0;
    argv[argc++] = (char *)"make-tiny";
    argv[argc++] = (char *)out;
    for (int i = 0; args[i]; i++) argv[argc++] = (char *)args[i];
    argv[argc++] = (char *)"--no-tokenizer";
    argv[argc] = NULL;
    return ds_cmd_make_tiny(argc, argv);
}

static void tiny_case(const char *tmp, const mt_case *cs) {
    char dir[4096];
    snprintf(dir, sizeof dir, "%s/%s", tmp, cs->name);
    double t0 = ds_now();
    int rc = make_tiny(dir, cs->args);
    CHECK_MSG(rc == 0, "%s: make-tiny failed (%d)", cs->name, rc);
    if (rc) return;
    ref_model rm;
    if (ref_open(dir, &rm) != 0) {
        CHECK_MSG(0, "%s: cannot open the checkpoint", cs->name);
        return;
    }
    /* BOS, then ids spread over the vocabulary, including rows beyond the tokenizer */
    int32_t tok[80];
    uint64_t s = 0x243F6A8885A308D3ull;
    tok[0] = 0;
    for (int64_t t = 1; t < cs->T; t++) {
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        tok[t] = (int32_t)((s >> 33) % (uint64_t)rm.c.V);
    }
    tok[cs->T - 1] = (int32_t)(rm.c.V - 1);
    if (cs->T > 3) tok[2] = 128815;
    double t1 = ds_now();
    double *ref = ref_forward(&rm, tok, cs->T);
    double t2 = ds_now();
    engine_vs_ref(cs->name, dir, tok, cs->T, ref, &rm);
    printf("  %-34s (make-tiny %.1fs, reference %.1fs, engine %.1fs; smallest routing gaps: "
           "group %.3g, expert %.3g)\n",
           cs->name, t1 - t0, t2 - t1, ds_now() - t2, rm.min_group_gap, rm.min_expert_gap);
    free(ref);
    ref_close(&rm);
}

int main(void) {
    const char *b = getenv("DS_REF_BREAK");
    if (b) {
        g_break = b;
        printf("DS_REF_BREAK=%s: the reference is deliberately wrong; this run must fail\n", b);
    }

    const char *fx = ds_test_fixtures();
    if (fx) {
        printf("golden fixtures (%s):\n", fx);
        golden_dir(fx, "tiny-a");
        golden_dir(fx, "tiny-a-fp8");
    } else {
        printf("golden fixtures not found: skipping the reference-vs-golden part\n");
    }

    char *tmp = ds_test_tmpdir();
    CHECK(tmp != NULL);
    if (tmp) {
        static const mt_case cases[] = {
            {"tiny-bf16", {"--preset", "tiny", "--seed", "7", NULL}, 12},
            {"tiny-no-q-lora",
             {"--preset", "tiny", "--seed", "8", "--no-q-lora", "--shard-bytes", "8M", NULL},
             12},
            {"tiny-fp8", {"--preset", "tiny", "--seed", "9", "--dtype", "fp8", NULL}, 12},
            {"small-bf16", {"--preset", "small", "--seed", "10", NULL}, 12},
            {"small-fp8", {"--preset", "small", "--seed", "11", "--dtype", "fp8", NULL}, 8},
            /* 40 heads: attention shares each pass over the cached rows among three groups of
             * heads (16, 16, 8); 80 positions: two chunks of its weighted sum */
            {"wide-bf16", {"--preset", "wide", "--seed", "12", NULL}, 80},
        };
        printf("make-tiny checkpoints (%s):\n", tmp);
        for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) tiny_case(tmp, &cases[i]);
        ds_test_rmtree(tmp);
        free(tmp);
    }
    return ds_test_finish("test_reference");
}
