/* fmtgen: the foreign quantized layouts of FORMATS-SPEC.md, written from a BF16 checkpoint.
 *
 * The sources are tiny models, so everything is built in memory first: one list of tensors for
 * OUT and one for REF, in the source's order, each projection followed by its companions, the
 * copies pointing into the source's mapping. Then each list is written in its layout (shards,
 * index, quant_model_description.json, config.json, tokenizer files).
 *
 * The static schemes (msModelSlim W8A8, the MindSpore ones) calibrate first: the BF16 model runs
 * over the prompts and the trace hook gives, per layer, the per-channel minimum and maximum of
 * the inputs of the static linears (the input_layernorm output feeding q_a / q / kv_a, the
 * q_a_layernorm output feeding q_b, and o_proj's input). From them come the anti-outlier norm
 * biases (centring each channel; msModelSlim W8A8 and ptq only) and then the activation step
 * and zero point of the shifted activations, as msModelSlim's m4 anti-outlier and min-max
 * calibration do (§0): per tensor, or per input channel for smoothquant.
 *
 * The MindSpore-named layouts (§3) rename every tensor, split kv_b, drop the MTP layers, store
 * the rope rows of q_b / kv_a in rotate-half order and stack each layer's routed experts per
 * projection, transposed to [E, in, out]: the stacked pair is built when expert 0 is met. */
#include "fmtgen.h"

#include "cli/cli.h"
#include "core/core.h"
#include "io/io.h"
#include "kernels/kernels.h"
#include "model/model.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define FG_BLOCK 128      /* blockwise_int8 weight_block_size, both axes (§5) */
#define FG_TP_SLICES 16   /* msModelSlim's tp_num for down_proj's scale_bias (§1) */
#define FG_A8W4_GROUP 256 /* the a8w4 release's int4 group along the input (§3) */

const char *fmtgen_kind_name(fmtgen_kind kind) {
    static const char *const names[FMTGEN_N_KINDS] = {
        "modelslim-w8a8", "modelslim-w4a8", "ms-ptq", "block-int8", "ms-smoothquant", "ms-a8w4"};
    return (unsigned)kind < FMTGEN_N_KINDS ? names[kind] : "?";
}

static int is_ms_named(fmtgen_kind k) {
    return k == FMTGEN_MS_SMOOTHQUANT || k == FMTGEN_MS_A8W4;
}

/* The kinds with static attention, calibrated on the prompts. */
static int is_static_kind(fmtgen_kind k) {
    return k == FMTGEN_MODELSLIM_W8A8 || k == FMTGEN_MS_PTQ || is_ms_named(k);
}

/* The kinds whose static layers get anti-outlier norm biases (OSL and smoothquant have none). */
static int has_norm_bias(fmtgen_kind k) {
    return k == FMTGEN_MODELSLIM_W8A8 || k == FMTGEN_MS_PTQ;
}

static float bf16_round(float x) {
    uint32_t u = (uint32_t)ds_f32_to_bf16(x) << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* ---- the tensors to write ---- */

typedef struct {
    char *name;
    ds_dtype dtype;
    int ndim;
    int64_t shape[3];
    const void *data; /* `owned`, or a view into the source's mapping */
    void *owned;
    uint64_t nbytes;
    const char *qtype; /* its quant_model_description.json value (§1) */
    size_t group;      /* a projection and its companions share one: never split over shards */
} fg_tensor;

typedef struct {
    fg_tensor *t;
    size_t n, cap;
    size_t group;      /* stamped on what is added next */
    const char *qtype; /* likewise */
} fg_list;

static void fg_list_free(fg_list *l) {
    for (size_t i = 0; i < l->n; i++) {
        free(l->t[i].name);
        free(l->t[i].owned);
    }
    free(l->t);
}

/* Appends tensor prefix+suffix [shape[0, ndim)], ndim <= 3, holding `data` (viewed, or owned
 * when `owned`: then it is taken in every case, freed here when rc is already an error or the
 * append fails). A NULL data is an allocation that failed. Returns the first error: calls chain
 * as rc = fg_add(l, rc, ...). */
static int fg_add(fg_list *l, int rc, const char *prefix, const char *suffix, ds_dtype dt, int ndim,
                  const int64_t *shape, const void *data, int owned) {
    if (!rc && !data) rc = ds_err_set(DS_ERR_NOMEM, "out of memory");
    if (!rc && l->n == l->cap) {
        size_t cap = l->cap ? 2 * l->cap : 256;
        fg_tensor *t = realloc(l->t, cap * sizeof *t);
        if (t)
            l->t = t, l->cap = cap;
        else
            rc = ds_err_set(DS_ERR_NOMEM, "out of memory");
    }
    size_t len = strlen(prefix) + strlen(suffix) + 1;
    char *name = rc ? NULL : malloc(len);
    if (!rc && !name) rc = ds_err_set(DS_ERR_NOMEM, "out of memory");
    if (rc) {
        if (owned) free((void *)data);
        return rc;
    }
    snprintf(name, len, "%s%s", prefix, suffix);
    fg_tensor *t = &l->t[l->n++];
    *t = (fg_tensor){.name = name,
                     .dtype = dt,
                     .ndim = ndim,
                     .data = data,
                     .owned = owned ? (void *)data : NULL,
                     .qtype = l->qtype,
                     .group = l->group};
    t->nbytes = ds_dtype_size(dt);
    for (int d = 0; d < ndim; d++) t->nbytes *= (uint64_t)(t->shape[d] = shape[d]);
    return DS_OK;
}

/* A source tensor as it is (FLOAT). */
static int fg_copy(fg_list *l, int rc, const ds_st_tensor *t) {
    if (!rc && t->ndim > 3)
        return ds_err_set(DS_ERR_UNSUPPORTED, "%s: %d dimensions (fmtgen writes at most 3)",
                          t->name, t->ndim);
    return fg_add(l, rc, t->name, "", t->dtype, t->ndim, t->shape, t->data, 0);
}

/* ---- symmetric weight quantization ---- */

/* How a matrix is quantized: symmetric, one scale per br x bc block (bc 0: the whole row), q in
 * [qmin, qmax]. */
typedef struct {
    int64_t br, bc;
    int qmin, qmax;
    int bf16_scale; /* the scales are stored as BF16: quantize with the rounded ones */
} fg_qspec;

static const fg_qspec FG_INT8_ROW = {1, 0, -128, 127, 0};
static const fg_qspec FG_INT8_ROW_BF16 = {1, 0, -128, 127, 1};
static const fg_qspec FG_INT4_ROW = {1, 0, -8, 7, 0};
static const fg_qspec FG_INT8_BLOCK = {FG_BLOCK, FG_BLOCK, -127, 127, 0};

static int64_t spec_cols(const fg_qspec *sp, int64_t C) {
    return sp->bc ? sp->bc : C;
}

/* q = clamp(rint(w / s), qmin, qmax) with s = max|w| / qmax over each block (edge blocks
 * partial; 1 for an all-zero block). s holds ceil(R / br) x ceil(C / bc) scales. lrintf
 * rounds ties to even in the default mode. */
static void quant_blocks(const float *w, int64_t R, int64_t C, const fg_qspec *sp, int8_t *q,
                         float *s) {
    int64_t br = sp->br, bc = spec_cols(sp, C), gc = (C + bc - 1) / bc;
    for (int64_t i0 = 0; i0 < R; i0 += br)
        for (int64_t j0 = 0; j0 < C; j0 += bc) {
            int64_t i1 = i0 + br < R ? i0 + br : R, j1 = j0 + bc < C ? j0 + bc : C;
            float mx = 0;
            for (int64_t i = i0; i < i1; i++)
                for (int64_t j = j0; j < j1; j++) mx = fmaxf(mx, fabsf(w[i * C + j]));
            float sc = mx > 0 ? mx / (float)sp->qmax : 1.0f;
            if (sp->bf16_scale) sc = bf16_round(sc);
            s[i0 / br * gc + j0 / bc] = sc;
            for (int64_t i = i0; i < i1; i++)
                for (int64_t j = j0; j < j1; j++) {
                    long v = lrintf(w[i * C + j] / sc);
                    q[i * C + j] = (int8_t)(v < sp->qmin ? sp->qmin : v > sp->qmax ? sp->qmax : v);
                }
        }
}

/* The reference weight of a dynamic scheme: q * s of its block, one f32 product (malloc'd). */
static float *dequant_blocks(const int8_t *q, const float *s, int64_t R, int64_t C,
                             const fg_qspec *sp) {
    float *w = malloc((size_t)(R * C) * sizeof *w);
    int64_t bc = spec_cols(sp, C), gc = (C + bc - 1) / bc;
    for (int64_t i = 0; w && i < R; i++)
        for (int64_t j = 0; j < C; j++)
            w[i * C + j] = (float)q[i * C + j] * s[i / sp->br * gc + j / bc];
    return w;
}

/* The quantized weight and scales of one projection, [R, C]. */
typedef struct {
    int64_t R, C;
    int8_t *q; /* [R, C] */
    float *s;  /* [ceil(R / br), ceil(C / bc)] */
} fg_quant;

static int fg_quantize(fg_quant *z, const float *w, int64_t R, int64_t C, const fg_qspec *sp) {
    int64_t bc = spec_cols(sp, C);
    size_t n_scales = (size_t)((R + sp->br - 1) / sp->br) * (size_t)((C + bc - 1) / bc);
    *z = (fg_quant){R, C, malloc((size_t)(R * C)), malloc(n_scales * sizeof(float))};
    if (!z->q || !z->s) {
        free(z->q);
        free(z->s);
        return ds_err_set(DS_ERR_NOMEM, "out of memory");
    }
    quant_blocks(w, R, C, sp, z->q, z->s);
    return DS_OK;
}

/* ---- calibration (the static schemes) ---- */

typedef struct {
    int64_t cols; /* 0 until the trace point was seen */
    float *mn, *mx;
} fg_range;

enum { FG_ATTN_NORM, FG_Q_A_NORM, FG_O_IN, FG_N_POINTS };
static const char *const fg_points[FG_N_POINTS] = {"attn_norm_out", "q_a_norm_out", "o_proj_in"};

typedef struct {
    int64_t n_layers;
    fg_range *r; /* [n_layers][FG_N_POINTS] */
    int failed;  /* out of memory, or a trace point changed width */
} fg_calib;

static void range_update(fg_range *r, const float *x, int64_t rows, int64_t cols, int *failed) {
    if (!r->cols) {
        r->mn = malloc((size_t)cols * sizeof(float));
        r->mx = malloc((size_t)cols * sizeof(float));
        if (!r->mn || !r->mx) {
            *failed = 1;
            return;
        }
        for (int64_t c = 0; c < cols; c++) r->mn[c] = INFINITY, r->mx[c] = -INFINITY;
        r->cols = cols;
    }
    if (r->cols != cols) {
        *failed = 1;
        return;
    }
    for (int64_t t = 0; t < rows; t++)
        for (int64_t c = 0; c < cols; c++) {
            r->mn[c] = fminf(r->mn[c], x[t * cols + c]);
            r->mx[c] = fmaxf(r->mx[c], x[t * cols + c]);
        }
}

/* ds_trace_fn: "layers.L.<point>" [rows, cols] into the ranges; other points are ignored. */
static void calib_trace(void *ctx, const char *name, const float *x, int64_t rows, int64_t cols) {
    fg_calib *cal = ctx;
    long long l;
    char what[64];
    if (sscanf(name, "layers.%lld.%63s", &l, what) != 2 || l < 0 || l >= cal->n_layers) return;
    for (int p = 0; p < FG_N_POINTS; p++)
        if (!strcmp(what, fg_points[p]))
            range_update(&cal->r[l * FG_N_POINTS + p], x, rows, cols, &cal->failed);
}

static void calib_free(fg_calib *cal) {
    for (int64_t i = 0; cal->r && i < cal->n_layers * FG_N_POINTS; i++) {
        free(cal->r[i].mn);
        free(cal->r[i].mx);
    }
    free(cal->r);
}

static int calibrate(fg_calib *cal, const char *src, const ds_config *c,
                     const int32_t *const *prompts, const int64_t *lens, int n_prompts) {
    if (n_prompts <= 0)
        return ds_err_set(DS_ERR_ARG, "the static schemes need calibration prompts");
    cal->n_layers = c->n_layers;
    cal->r = calloc((size_t)(c->n_layers * FG_N_POINTS), sizeof *cal->r);
    ds_model *m = NULL;
    int rc = cal->r ? ds_model_open(src, NULL, &m) : ds_err_set(DS_ERR_NOMEM, "out of memory");
    if (rc) return rc;
    ds_model_set_trace(m, calib_trace, cal);
    float *logits = malloc((size_t)c->vocab_size * sizeof *logits);
    if (!logits) rc = ds_err_set(DS_ERR_NOMEM, "out of memory");
    for (int i = 0; !rc && i < n_prompts; i++) {
        ds_kv_cache *kv = NULL;
        rc = ds_kv_open(c, lens[i], &kv);
        if (!rc) rc = ds_model_forward(m, kv, prompts[i], lens[i], 0, logits, 0);
        ds_kv_close(kv);
    }
    free(logits);
    ds_model_close(m);
    if (!rc && cal->failed)
        rc = ds_err_set(DS_ERR_NOMEM, "calibration: out of memory or a trace changed width");
    return rc;
}

/* The calibrated range of layers.L.<point>, or an error naming it when it was never traced. */
static int calib_range(const fg_calib *cal, int64_t l, int point, int64_t cols,
                       const fg_range **out) {
    const fg_range *r = &cal->r[l * FG_N_POINTS + point];
    if (r->cols != cols)
        return ds_err_set(DS_ERR_MISSING,
                          "calibration: trace point layers.%lld.%s gave %lld columns, expected "
                          "%lld (is it traced by ds_model_forward?)",
                          (long long)l, fg_points[point], (long long)r->cols, (long long)cols);
    *out = r;
    return DS_OK;
}

/* Anti-outlier norm bias (§0: msModelSlim m4 / golden-stick OSP beta): b[c] = -(max_c + min_c)
 * / 2 centres channel c of the norm's output. Rounded to BF16, the dtype it is stored in, and
 * used rounded from then on so that the file's values are the ones the arithmetic assumed. */
static float *norm_bias(const fg_range *r) {
    float *b = malloc((size_t)r->cols * sizeof *b);
    for (int64_t c = 0; b && c < r->cols; c++) b[c] = bf16_round(-(r->mx[c] + r->mn[c]) / 2);
    return b;
}

/* The next BF16 value above x > 0. */
static float bf16_up(float x) {
    uint32_t u = (uint32_t)(ds_f32_to_bf16(x) + 1u) << 16;
    memcpy(&x, &u, sizeof x);
    return x;
}

/* §0's asymmetric min-max step and zero point of the activation range [lo, hi]. When the step
 * is stored as BF16 the zero point is taken from the rounded step, so that the file's pair maps
 * the calibrated range onto [-128, 127] as a pair; a step rounded down so far that hi would
 * quantize to 128 (and clamp a step away) is taken one BF16 up. */
static void act_step(float lo, float hi, int bf16_scale, float *scale, float *zp) {
    lo = fminf(lo, 0), hi = fmaxf(hi, 0);
    float sc = (hi - lo) / 255.0f;
    if (!(sc > 0)) sc = 1; /* all-zero activations: any step represents them */
    if (bf16_scale) sc = bf16_round(sc);
    if (bf16_scale && rintf(hi / sc + rintf(-lo / sc) - 128) > 127) sc = bf16_up(sc);
    float z = rintf(-lo / sc) - 128;
    *scale = sc;
    *zp = z > 127 ? 127 : z;
}

/* Static activation quantization (§0) of x + b (b NULL: none), calibrated: one step and zero
 * point for the tensor (a[0], zp[0]), or one per input channel (a[k], zp[k], k < r->cols). The
 * range of x + b is the channel ranges shifted by b[c]: f32 addition is monotonic, so it is the
 * range of the shifted activations exactly. */
static void act_params(const fg_range *r, const float *b, int bf16_scale, int per_channel, float *a,
                       float *zp) {
    float lo = INFINITY, hi = -INFINITY;
    for (int64_t c = 0; c < r->cols; c++) {
        float cl = r->mn[c] + (b ? b[c] : 0), ch = r->mx[c] + (b ? b[c] : 0);
        if (per_channel) act_step(cl, ch, bf16_scale, &a[c], &zp[c]);
        lo = fminf(lo, cl);
        hi = fmaxf(hi, ch);
    }
    if (!per_channel) act_step(lo, hi, bf16_scale, &a[0], &zp[0]);
}

/* §0: quant_bias[n] = rint(bias_f[n] / deq_scale[n] - sum_k zp[k] q[n,k]), bias_f the
 * anti-outlier correction -W_float b of the float weights (0 without a norm bias), zp[k] the
 * zero point of input channel k (n_zp == C) or of the tensor (n_zp == 1), in double. */
static int32_t quant_bias(const float *w, const int8_t *q, const float *b, const float *zp,
                          int64_t n_zp, int64_t C, float deq) {
    double bias_f = 0, zq = 0;
    for (int64_t k = 0; k < C; k++) {
        bias_f -= b ? (double)w[k] * b[k] : 0;
        zq += (double)zp[n_zp > 1 ? k : 0] * q[k];
    }
    double v = rint(bias_f / deq - zq);
    return (int32_t)(v > INT32_MAX ? INT32_MAX : v < INT32_MIN ? INT32_MIN : v);
}

/* ---- the schemes: one projection into OUT (weight + companions) and REF (F32 weight) ---- */

typedef enum {
    FG_FLOAT,
    FG_STATIC,
    FG_DYN8,
    FG_DYN4,
    FG_BLOCK8,
    FG_MS_EXPERTS /* a routed expert of a MindSpore-named layout: stacked (§3) */
} fg_scheme;

typedef struct {
    fmtgen_kind kind;
    ds_config cfg;
    ds_st_set *src;
    fg_calib cal;
    float **in_bias, **qa_bias; /* [n_layers]: input_layernorm / q_a_layernorm bias (static) */
    fg_list out, ref;
} fg_ctx;

static int64_t layer_of(const char *name) {
    long long l;
    int end = 0;
    return sscanf(name, "model.layers.%lld.%n", &l, &end) == 1 && end > 0 ? (int64_t)l : -1;
}

static int is_projection(const ds_st_tensor *t) {
    return t->ndim == 2 && layer_of(t->name) >= 0 && ds_str_ends_with(t->name, ".weight") &&
           (strstr(t->name, ".self_attn.") || strstr(t->name, ".mlp.")) &&
           !ds_str_ends_with(t->name, ".mlp.gate.weight");
}

/* The layer mixes of §1, §2, §3 and §5 as fixed in fmtgen.h. */
static fg_scheme scheme_of(const fg_ctx *g, const ds_st_tensor *t) {
    int64_t l = layer_of(t->name);
    if (!is_projection(t) || l >= g->cfg.n_layers) return FG_FLOAT;
    if (g->kind == FMTGEN_BLOCK_INT8) return FG_BLOCK8;
    if (strstr(t->name, ".kv_b_proj.")) return FG_FLOAT;
    int expert = strstr(t->name, ".mlp.experts.") != NULL;
    if (g->kind == FMTGEN_MODELSLIM_W4A8) return expert ? FG_DYN4 : FG_DYN8;
    if (expert && is_ms_named(g->kind)) return FG_MS_EXPERTS;
    return strstr(t->name, ".self_attn.") ? FG_STATIC : FG_DYN8;
}

/* ---- MindSpore parameter names (§3; VM f4d94008 deepseekv3_weight_processor.py) ---- */

/* Hugging Face name or projection prefix -> MindSpore name, but for MLP projections; the layer
 * entries follow "model.layers.L.". */
static const char *const fg_ms_top[][2] = {
    {"model.embed_tokens.weight", "model.tok_embeddings.embedding_weight"},
    {"model.norm.weight", "model.norm_out.weight"},
    {"lm_head.weight", "lm_head.weight"},
};
static const char *const fg_ms_layer[][2] = {
    {"input_layernorm.weight", "attention_norm.weight"},
    {"post_attention_layernorm.weight", "ffn_norm.weight"},
    {"self_attn.q_a_layernorm.weight", "attention.lq_norm.weight"},
    {"self_attn.kv_a_layernorm.weight", "attention.lkv_norm.weight"},
    {"self_attn.q_a_proj", "attention.q2l_proj"},
    {"self_attn.q_b_proj", "attention.l2q_proj"},
    {"self_attn.kv_a_proj_with_mqa", "attention.kv2l"},
    {"self_attn.o_proj", "attention.wo"},
    {"mlp.gate.weight", "feed_forward.routed_experts.router.dense.weight"},
    {"mlp.gate.e_score_correction_bias",
     "feed_forward.routed_experts.router.e_score_correction_bias"},
};
/* MindSpore's w1 / w3 / w2 are gate / up / down. */
static const char *const fg_ms_mlp[][2] = {
    {"gate_proj", "w1"}, {"up_proj", "w3"}, {"down_proj", "w2"}};

#define FG_LEN(a) (sizeof(a) / sizeof((a)[0]))

static const char *ms_lookup(const char *const (*table)[2], size_t n, const char *hf) {
    for (size_t i = 0; i < n; i++)
        if (!strcmp(table[i][0], hf)) return table[i][1];
    return NULL;
}

/* "mlp.[shared_experts. | experts.E.]<proj>" -> "feed_forward.[shared_experts. |
 * routed_experts.ffn.]<w>" into buf (routed experts lose their index: they are stacked). */
static const char *ms_mlp_name(const char *rest, char *buf, size_t cap) {
    const char *place = "feed_forward.";
    int e, end = 0;
    if (strncmp(rest, "mlp.", 4)) return NULL;
    rest += 4;
    if (!strncmp(rest, "shared_experts.", 15))
        place = "feed_forward.shared_experts.", rest += 15;
    else if (sscanf(rest, "experts.%d.%n", &e, &end) == 1 && end > 0)
        place = "feed_forward.routed_experts.ffn.", rest += end;
    const char *w = ms_lookup(fg_ms_mlp, FG_LEN(fg_ms_mlp), rest);
    if (w) snprintf(buf, cap, "%s%s", place, w);
    return w ? buf : NULL;
}

int fmtgen_ms_name(const char *hf, char *buf, size_t cap) {
    const char *ms = ms_lookup(fg_ms_top, FG_LEN(fg_ms_top), hf);
    long long l = 0;
    int end = 0;
    char mlp[128];
    if (ms) {
        snprintf(buf, cap, "%s", ms);
        return DS_OK;
    }
    if (sscanf(hf, "model.layers.%lld.%n", &l, &end) == 1 && end > 0) {
        ms = ms_lookup(fg_ms_layer, FG_LEN(fg_ms_layer), hf + end);
        if (!ms) ms = ms_mlp_name(hf + end, mlp, sizeof mlp);
    }
    if (!ms) return ds_err_set(DS_ERR_UNSUPPORTED, "%s: no MindSpore parameter name known", hf);
    snprintf(buf, cap, "model.layers.%lld.%s", l, ms);
    return DS_OK;
}

/* MindSpore rotates half (§3): the rope rows of l2q_proj per head and of kv2l are
 * stored as the even Hugging Face rows, then the odd ones. *src (malloc'd, [R]) is the Hugging
 * Face row each stored row holds; NULL for a projection without rope rows. */
static int rope_order(const fg_ctx *g, const char *prefix, int64_t R, int64_t **src) {
    const ds_config *c = &g->cfg;
    int64_t rope = c->qk_rope_head_dim, first, stride;
    *src = NULL;
    if (ds_str_ends_with(prefix, ".q_b_proj"))
        first = c->qk_nope_head_dim, stride = c->qk_nope_head_dim + rope; /* each head */
    else if (ds_str_ends_with(prefix, ".kv_a_proj_with_mqa"))
        first = c->kv_lora_rank, stride = R;
    else
        return DS_OK;
    if (rope % 2 || R % stride || first + rope > stride)
        return ds_err_set(DS_ERR_UNSUPPORTED, "%s: %lld rows do not hold rope blocks of %lld",
                          prefix, (long long)R, (long long)rope);
    if (!(*src = malloc((size_t)R * sizeof **src)))
        return ds_err_set(DS_ERR_NOMEM, "out of memory");
    for (int64_t i = 0; i < R; i++) (*src)[i] = i;
    for (int64_t r0 = first; r0 < R; r0 += stride)
        for (int64_t j = 0; j < rope / 2; j++) {
            (*src)[r0 + j] = r0 + 2 * j;
            (*src)[r0 + rope / 2 + j] = r0 + 2 * j + 1;
        }
    return DS_OK;
}

/* Reorders the R rows of data (row_bytes each) so that row i holds the old row src[i]. */
static int permute_rows(void *data, int64_t R, size_t row_bytes, const int64_t *src) {
    uint8_t *old = malloc((size_t)R * row_bytes), *d = data;
    if (!old) return ds_err_set(DS_ERR_NOMEM, "out of memory");
    memcpy(old, d, (size_t)R * row_bytes);
    for (int64_t i = 0; i < R; i++)
        memcpy(d + (size_t)i * row_bytes, old + (size_t)src[i] * row_bytes, row_bytes);
    free(old);
    return DS_OK;
}

/* ---- the schemes, continued ---- */

static int put_ref(fg_ctx *g, int rc, const char *prefix, int64_t R, int64_t C, float *w) {
    return fg_add(&g->ref, rc, prefix, ".weight", DS_F32, 2, (int64_t[]){R, C}, w, 1);
}

/* weight_scale and weight_offset [out, 1], the offsets zero (symmetric weights, §1). */
static int put_channel_scales(fg_ctx *g, int rc, const char *prefix, int64_t R, float *s) {
    rc = fg_add(&g->out, rc, prefix, ".weight_scale", DS_F32, 2, (int64_t[]){R, 1}, s, 1);
    return fg_add(&g->out, rc, prefix, ".weight_offset", DS_F32, 2, (int64_t[]){R, 1},
                  calloc((size_t)R, sizeof(float)), 1);
}

/* v[0, n) as a malloc'd array of dtype dt: F32, BF16, or I8 (the integral zero points). */
static void *to_dtype(ds_dtype dt, const float *v, int64_t n) {
    void *p = malloc((size_t)n * ds_dtype_size(dt));
    for (int64_t i = 0; p && i < n; i++) {
        if (dt == DS_F32) ((float *)p)[i] = v[i];
        if (dt == DS_BF16) ((uint16_t *)p)[i] = ds_f32_to_bf16(v[i]);
        if (dt == DS_I8) ((int8_t *)p)[i] = (int8_t)v[i];
    }
    return p;
}

/* W8A8_DYNAMIC (§1) / golden-stick per-token (§2, §3): I8 [out, in] with per-channel scales,
 * weight_scale / weight_offset F32 [out, 1] under Hugging Face names, BF16
 * ._layer.matmul.weight_scale [out] under MindSpore ones. */
static int emit_dyn8(fg_ctx *g, const char *prefix, const float *w, int64_t R, int64_t C) {
    int ms = is_ms_named(g->kind);
    const fg_qspec *sp = ms ? &FG_INT8_ROW_BF16 : &FG_INT8_ROW;
    fg_quant z;
    int rc = fg_quantize(&z, w, R, C, sp);
    if (rc) return rc;
    float *deq = dequant_blocks(z.q, z.s, R, C, sp);
    char m[512] = "";
    if (ms) rc = fmtgen_ms_name(prefix, m, sizeof m);
    g->out.qtype = "W8A8_DYNAMIC";
    rc = fg_add(&g->out, rc, ms ? m : prefix, ms ? "._layer.weight" : ".weight", DS_I8, 2,
                (int64_t[]){R, C}, z.q, 1);
    if (ms) {
        rc = fg_add(&g->out, rc, m, "._layer.matmul.weight_scale", DS_BF16, 1, (int64_t[]){R},
                    to_dtype(DS_BF16, z.s, R), 1);
        free(z.s);
    } else {
        rc = put_channel_scales(g, rc, prefix, R, z.s);
    }
    return put_ref(g, rc, prefix, R, C, deq);
}

/* §1 W4A8_DYNAMIC packing, two int4 along the OUTPUT axis: byte [j, k] = q[2j, k] in the low
 * nibble | q[2j+1, k] in the high nibble, two's complement (MS pack.py w4a8_pack_int4). */
static int8_t *pack_int4_out_axis(const int8_t *q, int64_t R, int64_t C) {
    int8_t *p = malloc((size_t)(R / 2) * (size_t)C);
    for (int64_t j = 0; p && j < R / 2; j++)
        for (int64_t k = 0; k < C; k++)
            p[j * C + k] = (int8_t)(((uint8_t)q[(2 * j + 1) * C + k] << 4) |
                                    ((uint8_t)q[2 * j * C + k] & 0x0F));
    return p;
}

/* §1 scale_bias (MS pack.py process_scale): 8 * sum_k q[n,k] s[n] per slice of K. gate/up:
 * one slice, [out, 1]. down: the [out, K] products are cut into runs of K / 16 (integer
 * division, tp_num 16) and summed per run, [out, K / (K / 16)]: 16 slices when 16 divides K.
 * A K the tool could not reshape (K < 16, or K / 16 not dividing K) is refused. */
static int scale_bias(const char *prefix, const fg_quant *z, float **out, int64_t *cols) {
    int64_t run = z->C;
    if (ds_str_ends_with(prefix, ".down_proj")) {
        run = z->C / FG_TP_SLICES;
        if (run == 0 || z->C % run)
            return ds_err_set(DS_ERR_UNSUPPORTED,
                              "%s: in = %lld cannot be cut into runs of in / %d for scale_bias",
                              prefix, (long long)z->C, FG_TP_SLICES);
    }
    *cols = z->C / run;
    *out = malloc((size_t)(z->R * *cols) * sizeof(float));
    for (int64_t n = 0; *out && n < z->R; n++)
        for (int64_t j = 0; j < *cols; j++) {
            int64_t sum = 0;
            for (int64_t k = j * run; k < (j + 1) * run; k++) sum += z->q[n * z->C + k];
            (*out)[n * *cols + j] = (float)(8.0 * z->s[n] * (double)sum);
        }
    return DS_OK; /* a failed malloc is caught by fg_add */
}

/* W4A8_DYNAMIC (§1, per channel, version 1.0.0): packed I8 [out/2, in], per-channel scales,
 * scale_bias. */
static int emit_dyn4(fg_ctx *g, const char *prefix, const float *w, int64_t R, int64_t C) {
    if (R % 2)
        return ds_err_set(DS_ERR_UNSUPPORTED,
                          "%s: out = %lld is odd; W4A8_DYNAMIC packs pairs of output rows", prefix,
                          (long long)R);
    fg_quant z;
    int rc = fg_quantize(&z, w, R, C, &FG_INT4_ROW);
    if (rc) return rc;
    float *sb = NULL;
    int64_t sbc = 0;
    rc = scale_bias(prefix, &z, &sb, &sbc);
    float *deq = dequant_blocks(z.q, z.s, R, C, &FG_INT4_ROW);
    int8_t *packed = pack_int4_out_axis(z.q, R, C);
    free(z.q);
    g->out.qtype = "W4A8_DYNAMIC";
    rc = fg_add(&g->out, rc, prefix, ".weight", DS_I8, 2, (int64_t[]){R / 2, C}, packed, 1);
    rc = put_channel_scales(g, rc, prefix, R, z.s);
    rc = fg_add(&g->out, rc, prefix, ".scale_bias", DS_F32, 2, (int64_t[]){R, sbc}, sb, 1);
    return put_ref(g, rc, prefix, R, C, deq);
}

/* blockwise_int8 (§5): I8 [N, K] + weight_scale_inv F32 [ceil(N/128), ceil(K/128)]. */
static int emit_block8(fg_ctx *g, const char *prefix, const float *w, int64_t R, int64_t C) {
    fg_quant z;
    int rc = fg_quantize(&z, w, R, C, &FG_INT8_BLOCK);
    if (rc) return rc;
    float *deq = dequant_blocks(z.q, z.s, R, C, &FG_INT8_BLOCK);
    int64_t gshape[2] = {(R + FG_BLOCK - 1) / FG_BLOCK, (C + FG_BLOCK - 1) / FG_BLOCK};
    rc = fg_add(&g->out, rc, prefix, ".weight", DS_I8, 2, (int64_t[]){R, C}, z.q, 1);
    rc = fg_add(&g->out, rc, prefix, ".weight_scale_inv", DS_F32, 2, gshape, z.s, 1);
    return put_ref(g, rc, prefix, R, C, deq);
}

/* The norm feeding static linear `prefix` (its bias, NULL for o_proj or a layout without norm
 * biases) and its calibrated input range: input_layernorm feeds q_a / q / kv_a, q_a_layernorm
 * feeds q_b (§0, VM infer_quant_bias_weight), o_proj has no norm. */
static int static_input(const fg_ctx *g, const char *prefix, int64_t l, int64_t C, const float **b,
                        const fg_range **r) {
    if (ds_str_ends_with(prefix, ".o_proj")) {
        *b = NULL;
        return calib_range(&g->cal, l, FG_O_IN, C, r);
    }
    if (ds_str_ends_with(prefix, ".q_b_proj")) {
        *b = g->qa_bias ? g->qa_bias[l] : NULL;
        return calib_range(&g->cal, l, FG_Q_A_NORM, C, r);
    }
    *b = g->in_bias ? g->in_bias[l] : NULL;
    return calib_range(&g->cal, l, FG_ATTN_NORM, C, r);
}

/* One static W8A8 projection (§0) before its layout names it. */
typedef struct {
    int64_t R, C, n_act; /* n_act: 1 (per-tensor activations) or C (per input channel) */
    int8_t *q;           /* [R, C] */
    float *deq;          /* [R] deq_scale */
    int32_t *qb;         /* [R] quant_bias */
    float *wref;         /* [R, C] the weight it stands for (REF's) */
    float *a, *zp;       /* [n_act] input_scale as stored, zero point */
} fg_static;

static void static_free(fg_static *st) {
    free(st->q);
    free(st->deq);
    free(st->qb);
    free(st->wref);
    free(st->a);
    free(st->zp);
}

/* Quantizes w [R, C] for calibrated static activations. Per tensor (msModelSlim, ptq, a8w4):
 * deq[n] = input_scale * s[n]. Per input channel (smoothquant, §3): the step a[k] is the smooth
 * scale folded in, so W diag(a) is what meets x / a: its rows are quantized and deq[n] = s[n].
 * Either way REF's weight is q * deq[n] / input_scale of the column. */
static int static_quantize(const fg_ctx *g, const char *prefix, const float *w, int64_t R,
                           int64_t C, fg_static *st) {
    const float *b = NULL;
    const fg_range *r = NULL;
    int rc = static_input(g, prefix, layer_of(prefix), C, &b, &r);
    if (rc) return rc;
    int per_channel = g->kind == FMTGEN_MS_SMOOTHQUANT;
    int64_t na = per_channel ? C : 1;
    *st = (fg_static){R,
                      C,
                      na,
                      NULL,
                      malloc((size_t)R * sizeof(float)),
                      malloc((size_t)R * sizeof(int32_t)),
                      malloc((size_t)(R * C) * sizeof(float)),
                      malloc((size_t)na * sizeof(float)),
                      malloc((size_t)na * sizeof(float))};
    float *ws = per_channel ? malloc((size_t)(R * C) * sizeof *ws) : NULL;
    fg_quant z;
    if (!st->deq || !st->qb || !st->wref || !st->a || !st->zp || (per_channel && !ws))
        rc = ds_err_set(DS_ERR_NOMEM, "out of memory");
    if (!rc) act_params(r, b, g->kind != FMTGEN_MODELSLIM_W8A8, per_channel, st->a, st->zp);
    for (int64_t i = 0; !rc && ws && i < R * C; i++) ws[i] = w[i] * st->a[i % C];
    if (!rc) rc = fg_quantize(&z, ws ? ws : w, R, C, &FG_INT8_ROW);
    free(ws);
    if (rc) {
        static_free(st);
        return rc;
    }
    st->q = z.q;
    for (int64_t n = 0; n < R; n++) {
        st->deq[n] = per_channel ? z.s[n] : st->a[0] * z.s[n];
        st->qb[n] = quant_bias(w + n * C, z.q + n * C, b, st->zp, na, C, st->deq[n]);
        for (int64_t k = 0; k < C; k++)
            st->wref[n * C + k] =
                (float)((double)z.q[n * C + k] * st->deq[n] / st->a[per_channel ? k : 0]);
    }
    free(z.s);
    return DS_OK;
}

/* §1's (F32 input_scale / input_offset) and §2 ptq's (BF16 / I8) names: weight, input_scale
 * [1], input_offset [1], quant_bias I32 [out], deq_scale F32 [out]. Takes q, qb and deq. */
static int put_static_hf(fg_ctx *g, const char *prefix, const fg_static *st) {
    int ptq = g->kind == FMTGEN_MS_PTQ;
    ds_dtype sdt = ptq ? DS_BF16 : DS_F32, odt = ptq ? DS_I8 : DS_F32;
    int64_t R = st->R;
    int rc = fg_add(&g->out, DS_OK, prefix, ".weight", DS_I8, 2, (int64_t[]){R, st->C}, st->q, 1);
    rc = fg_add(&g->out, rc, prefix, ".input_scale", sdt, 1, (int64_t[]){1},
                to_dtype(sdt, st->a, 1), 1);
    rc = fg_add(&g->out, rc, prefix, ".input_offset", odt, 1, (int64_t[]){1},
                to_dtype(odt, st->zp, 1), 1);
    rc = fg_add(&g->out, rc, prefix, ".quant_bias", DS_I32, 1, (int64_t[]){R}, st->qb, 1);
    return fg_add(&g->out, rc, prefix, ".deq_scale", DS_F32, 1, (int64_t[]){R}, st->deq, 1);
}

/* §3's names: ._layer.weight, .quant_op.input_scale BF16 and .quant_op.input_zp I8 [1 or in],
 * ._layer.matmul.quant_bias I32 [out], ._layer.matmul.dequant_scale F32 [out], the rows (and
 * their quant_bias / dequant_scale) in rotate-half order. Takes q, qb and deq. */
static int put_static_ms(fg_ctx *g, const char *prefix, const fg_static *st) {
    char m[512] = "";
    int64_t *src = NULL, R = st->R, na = st->n_act;
    int rc = fmtgen_ms_name(prefix, m, sizeof m);
    if (!rc) rc = rope_order(g, prefix, R, &src);
    if (!rc && src) rc = permute_rows(st->q, R, (size_t)st->C, src);
    if (!rc && src) rc = permute_rows(st->qb, R, sizeof *st->qb, src);
    if (!rc && src) rc = permute_rows(st->deq, R, sizeof *st->deq, src);
    free(src);
    rc = fg_add(&g->out, rc, m, "._layer.weight", DS_I8, 2, (int64_t[]){R, st->C}, st->q, 1);
    rc = fg_add(&g->out, rc, m, ".quant_op.input_scale", DS_BF16, 1, (int64_t[]){na},
                to_dtype(DS_BF16, st->a, na), 1);
    rc = fg_add(&g->out, rc, m, ".quant_op.input_zp", DS_I8, 1, (int64_t[]){na},
                to_dtype(DS_I8, st->zp, na), 1);
    rc = fg_add(&g->out, rc, m, "._layer.matmul.quant_bias", DS_I32, 1, (int64_t[]){R}, st->qb, 1);
    return fg_add(&g->out, rc, m, "._layer.matmul.dequant_scale", DS_F32, 1, (int64_t[]){R},
                  st->deq, 1);
}

/* Static W8A8 (§0), named by the layout. */
static int emit_static(fg_ctx *g, const char *prefix, const float *w, int64_t R, int64_t C) {
    fg_static st;
    int rc = static_quantize(g, prefix, w, R, C, &st);
    if (rc) return rc;
    g->out.qtype = "W8A8";
    rc = is_ms_named(g->kind) ? put_static_ms(g, prefix, &st) : put_static_hf(g, prefix, &st);
    rc = put_ref(g, rc, prefix, R, C, st.wref);
    free(st.a);
    free(st.zp);
    return rc;
}

/* The whole source matrix in f32 (malloc'd); a float dtype is required. */
static int read_f32(const ds_st_tensor *t, float **out) {
    if (t->dtype != DS_BF16 && t->dtype != DS_F32 && t->dtype != DS_F16)
        return ds_err_set(DS_ERR_UNSUPPORTED, "%s: dtype %s (fmtgen needs a BF16/F16/F32 source)",
                          t->name, ds_dtype_name(t->dtype));
    ds_mat m = {.dtype = t->dtype, .rows = t->shape[0], .cols = t->shape[1], .data = t->data};
    *out = malloc((size_t)(m.rows * m.cols) * sizeof(float));
    if (!*out) return ds_err_set(DS_ERR_NOMEM, "out of memory");
    for (int64_t r = 0; r < m.rows; r++) ds_mat_row_f32(&m, r, *out + r * m.cols);
    return DS_OK;
}

static int emit_projection(fg_ctx *g, const ds_st_tensor *t, fg_scheme sc) {
    float *w;
    int rc = read_f32(t, &w);
    if (rc) return rc;
    char prefix[512];
    snprintf(prefix, sizeof prefix, "%.*s", (int)(strlen(t->name) - 7), t->name);
    int64_t R = t->shape[0], C = t->shape[1];
    switch (sc) {
    case FG_STATIC:
        rc = emit_static(g, prefix, w, R, C);
        break;
    case FG_DYN8:
        rc = emit_dyn8(g, prefix, w, R, C);
        break;
    case FG_DYN4:
        rc = emit_dyn4(g, prefix, w, R, C);
        break;
    default:
        rc = emit_block8(g, prefix, w, R, C);
        break;
    }
    free(w);
    return rc;
}

/* ---- the MindSpore-named layouts: stacked routed experts, split kv_b, renamed copies ---- */

/* One projection of a layer's routed experts as MindSpore stacks them (§3), transposed. */
typedef struct {
    int64_t E, N, K, ng; /* experts, out, in; ng scales per column along in (1: per channel) */
    int int4;
    int8_t *w; /* int8 [E, K, N] (smoothquant); int4 pairs [E, K, N / 2] (a8w4) */
    void *s;   /* BF16 [E, N] (smoothquant); U64 [E, ng, N] holding fp32 bits (a8w4) */
} fg_stack;

/* The a8w4 experts' int4 group along the input: the release's 256 (§3). A test model's inputs
 * (<= 256) would make that one group, so below 512 inputs it is in / 4: a test-only deviation,
 * so that several groups per output column are exercised. */
static int64_t a8w4_group(int64_t in) {
    return in >= 2 * FG_A8W4_GROUP ? FG_A8W4_GROUP : in / 4;
}

/* Expert e's [N, K] q and scales into the stack: int8 q[n,k] at [e, k, n], its BF16 scale at
 * [e, n]; int4 q[2j,k] in the low nibble of byte [e, k, j] and q[2j+1,k] in the high one (two's
 * complement, GS np_int4data_pack_to_int8_3d), group g's scale as fp32 bits at [e, g, n]. */
static void stack_expert(fg_stack *st, int64_t e, const fg_quant *z) {
    int64_t N = st->N, K = st->K;
    for (int64_t k = 0; k < K; k++)
        for (int64_t n = 0; n < N; n++) {
            int8_t q = z->q[n * K + k];
            uint8_t *b = (uint8_t *)st->w + (e * K + k) * (N / 2) + n / 2;
            if (!st->int4)
                st->w[(e * K + k) * N + n] = q;
            else if (n % 2)
                *b = (uint8_t)(*b | (uint8_t)q << 4);
            else
                *b = (uint8_t)q & 0x0F;
        }
    for (int64_t n = 0; n < N; n++)
        for (int64_t g = 0; g < st->ng; g++) {
            float s = z->s[n * st->ng + g];
            uint32_t bits;
            memcpy(&bits, &s, sizeof bits);
            if (st->int4)
                ((uint64_t *)st->s)[(e * st->ng + g) * N + n] = bits;
            else
                ((uint16_t *)st->s)[e * N + n] = ds_f32_to_bf16(s);
        }
}

/* Quantizes expert e of the stack (source projection `prefix`) into it, and its F32 weight
 * into REF under its own name. */
static int stack_one(fg_ctx *g, fg_stack *st, int64_t e, const char *prefix, const fg_qspec *sp) {
    char name[600];
    snprintf(name, sizeof name, "%s.weight", prefix);
    const ds_st_tensor *t = ds_st_find(g->src, name);
    if (!t || t->ndim != 2 || t->shape[0] != st->N || t->shape[1] != st->K)
        return ds_err_set(DS_ERR_MISSING, "%s: missing, or not [%lld, %lld] as expert 0", name,
                          (long long)st->N, (long long)st->K);
    float *w;
    fg_quant z;
    int rc = read_f32(t, &w);
    if (rc) return rc;
    rc = fg_quantize(&z, w, st->N, st->K, sp);
    free(w);
    if (rc) return rc;
    stack_expert(st, e, &z);
    rc = put_ref(g, DS_OK, prefix, st->N, st->K, dequant_blocks(z.q, z.s, st->N, st->K, sp));
    free(z.q);
    free(z.s);
    return rc;
}

/* At expert 0 of a layer's routed projection: all E experts stacked into OUT (int8 per output
 * channel with BF16 scales, or a8w4's grouped int4), and each one's F32 weight into REF. The
 * other experts' tensors were consumed then. */
static int emit_ms_experts(fg_ctx *g, const ds_st_tensor *t) {
    long long l;
    int e;
    char proj[32];
    if (sscanf(t->name, "model.layers.%lld.mlp.experts.%d.%31[a-z_]", &l, &e, proj) != 3)
        return ds_err_set(DS_ERR_UNSUPPORTED, "%s: not a routed expert's projection", t->name);
    if (e) return DS_OK;
    fg_stack st = {.E = g->cfg.n_routed_experts,
                   .N = t->shape[0],
                   .K = t->shape[1],
                   .ng = 1,
                   .int4 = g->kind == FMTGEN_MS_A8W4};
    fg_qspec sp = st.int4 ? FG_INT4_ROW : FG_INT8_ROW_BF16;
    int rc = DS_OK;
    if (st.int4 && (st.N % 2 || st.K % 8))
        rc = ds_err_set(DS_ERR_UNSUPPORTED, "%s: a8w4 needs an even out and in %% 8 == 0", t->name);
    if (st.int4) sp.bc = a8w4_group(st.K), st.ng = (st.K + sp.bc - 1) / sp.bc;
    st.w = calloc((size_t)(st.E * st.K * (st.int4 ? st.N / 2 : st.N)), 1);
    st.s = malloc((size_t)(st.E * st.ng * st.N) * (st.int4 ? sizeof(uint64_t) : sizeof(uint16_t)));
    if (!rc && (!st.w || !st.s)) rc = ds_err_set(DS_ERR_NOMEM, "out of memory");
    char prefix[512], m[512] = "";
    for (int64_t x = 0; !rc && x < st.E; x++) {
        snprintf(prefix, sizeof prefix, "model.layers.%lld.mlp.experts.%lld.%s", l, (long long)x,
                 proj);
        rc = stack_one(g, &st, x, prefix, &sp);
    }
    if (!rc) rc = fmtgen_ms_name(prefix, m, sizeof m);
    rc = fg_add(&g->out, rc, m, "._layer.weight", DS_I8, 3,
                (int64_t[]){st.E, st.K, st.int4 ? st.N / 2 : st.N}, st.w, 1);
    if (st.int4)
        return fg_add(&g->out, rc, m, "._layer.matmul.weight_scale", DS_U64, 3,
                      (int64_t[]){st.E, st.ng, st.N}, st.s, 1);
    return fg_add(&g->out, rc, m, "._layer.matmul.weight_scale", DS_BF16, 2,
                  (int64_t[]){st.E, st.N}, st.s, 1);
}

/* kv_b_proj [heads * (nope + v), kv_lora] as MindSpore splits it (§3): lkv2kv_k_nope
 * [heads * nope, kv_lora], each head's first nope rows, and lkv2kv_v [heads * v, kv_lora], its
 * last v rows; the source's bytes. */
static int emit_ms_kv_b(fg_ctx *g, const ds_st_tensor *t) {
    int64_t H = g->cfg.n_heads, nope = g->cfg.qk_nope_head_dim, v = g->cfg.v_head_dim;
    int64_t K = t->shape[1];
    if (t->ndim != 2 || t->shape[0] != H * (nope + v))
        return ds_err_set(DS_ERR_UNSUPPORTED, "%s: not [heads * (nope + v), kv_lora]", t->name);
    size_t row = (size_t)K * ds_dtype_size(t->dtype);
    uint8_t *kn = malloc((size_t)(H * nope) * row), *vv = malloc((size_t)(H * v) * row);
    const uint8_t *src = t->data;
    for (int64_t h = 0; kn && vv && h < H; h++) {
        memcpy(kn + (size_t)(h * nope) * row, src + (size_t)(h * (nope + v)) * row,
               (size_t)nope * row);
        memcpy(vv + (size_t)(h * v) * row, src + (size_t)(h * (nope + v) + nope) * row,
               (size_t)v * row);
    }
    char pre[64];
    snprintf(pre, sizeof pre, "model.layers.%lld.attention.", (long long)layer_of(t->name));
    int rc = fg_add(&g->out, DS_OK, pre, "lkv2kv_k_nope.weight", t->dtype, 2,
                    (int64_t[]){H * nope, K}, kn, 1);
    return fg_add(&g->out, rc, pre, "lkv2kv_v.weight", t->dtype, 2, (int64_t[]){H * v, K}, vv, 1);
}

/* A FLOAT tensor into OUT under its MindSpore name, kv_b split; the MTP layers are not written
 * (§3: MindSpore reads them from its float index). */
static int emit_ms_float(fg_ctx *g, const ds_st_tensor *t) {
    if (layer_of(t->name) >= g->cfg.n_layers) return DS_OK;
    if (ds_str_ends_with(t->name, ".self_attn.kv_b_proj.weight")) return emit_ms_kv_b(g, t);
    char m[512];
    int rc = fmtgen_ms_name(t->name, m, sizeof m);
    return rc ? rc : fg_add(&g->out, rc, m, "", t->dtype, t->ndim, t->shape, t->data, 0);
}

/* After input_layernorm.weight / q_a_layernorm.weight of a decoder layer, the static schemes add
 * the norm's anti-outlier bias (BF16 [dim], "FLOAT"; OUT only). */
static int emit_norm_bias(fg_ctx *g, const char *name) {
    int64_t l = layer_of(name);
    if (!has_norm_bias(g->kind) || l < 0 || l >= g->cfg.n_layers) return DS_OK;
    const float *b = NULL;
    int64_t n = 0;
    if (ds_str_ends_with(name, ".input_layernorm.weight"))
        b = g->in_bias[l], n = g->cfg.hidden_size;
    else if (ds_str_ends_with(name, ".self_attn.q_a_layernorm.weight"))
        b = g->qa_bias[l], n = g->cfg.q_lora_rank;
    if (!b) return DS_OK;
    uint16_t *v = malloc((size_t)n * sizeof *v);
    for (int64_t c = 0; v && c < n; c++) v[c] = ds_f32_to_bf16(b[c]);
    char prefix[512];
    snprintf(prefix, sizeof prefix, "%.*s", (int)(strlen(name) - 7), name);
    return fg_add(&g->out, DS_OK, prefix, ".bias", DS_BF16, 1, (int64_t[]){n}, v, 1);
}

static int emit_tensor(fg_ctx *g, const ds_st_tensor *t, size_t group) {
    g->out.group = g->ref.group = group;
    g->out.qtype = "FLOAT";
    fg_scheme sc = scheme_of(g, t);
    if (sc == FG_MS_EXPERTS) return emit_ms_experts(g, t);
    if (sc != FG_FLOAT) return emit_projection(g, t, sc);
    int rc = fg_copy(&g->ref, DS_OK, t);
    if (is_ms_named(g->kind)) return rc ? rc : emit_ms_float(g, t);
    rc = fg_copy(&g->out, rc, t);
    return rc ? rc : emit_norm_bias(g, t->name);
}

/* Calibrates and, for the layouts that have them, derives the norm biases of every decoder
 * layer. */
static int prepare_static(fg_ctx *g, const char *src, const int32_t *const *prompts,
                          const int64_t *lens, int n_prompts) {
    int rc = calibrate(&g->cal, src, &g->cfg, prompts, lens, n_prompts);
    if (rc || !has_norm_bias(g->kind)) return rc;
    int64_t L = g->cfg.n_layers;
    g->in_bias = calloc((size_t)L, sizeof(float *));
    g->qa_bias = calloc((size_t)L, sizeof(float *));
    if (!g->in_bias || !g->qa_bias) rc = ds_err_set(DS_ERR_NOMEM, "out of memory");
    for (int64_t l = 0; !rc && l < L; l++) {
        const fg_range *r = NULL;
        rc = calib_range(&g->cal, l, FG_ATTN_NORM, g->cfg.hidden_size, &r);
        if (!rc && !(g->in_bias[l] = norm_bias(r))) rc = ds_err_set(DS_ERR_NOMEM, "out of memory");
        if (rc || !g->cfg.q_lora_rank) continue;
        rc = calib_range(&g->cal, l, FG_Q_A_NORM, g->cfg.q_lora_rank, &r);
        if (!rc && !(g->qa_bias[l] = norm_bias(r))) rc = ds_err_set(DS_ERR_NOMEM, "out of memory");
    }
    return rc;
}

/* ---- writing a checkpoint directory ---- */

/* What an index file holds. */
typedef enum {
    FG_INDEX_HF,  /* {"metadata": {"total_size": bytes}, "weight_map": {name: shard}} */
    FG_INDEX_MS,  /* {"metadata": {}, "weight_map": {...}} (§2: VM load_safetensors_shard) */
    FG_INDEX_FLAT /* {name: shard}: a MindSpore *_name_map.json */
} fg_index_form;

typedef struct {
    const char *stem; /* shards STEM-0000i-of-0000n.safetensors; NULL: one model.safetensors */
    int n_shards;
    const char *index; /* the index file (NULL: none) */
    int description;   /* writes quant_model_description.json */
    fg_index_form form;
    const char *decoy; /* an index without "quant" in it beside the real one (NULL: none) */
} fg_layout;

#define FG_MODELSLIM_LAYOUT                                                                        \
    {                                                                                              \
        .stem = "quant_model_weight_w8a8_dynamic", .n_shards = 2,                                  \
        .index = "quant_model_weight_w8a8_dynamic.safetensors.index.json", .description = 1        \
    }
static const fg_layout fg_layouts[FMTGEN_N_KINDS] = {
    [FMTGEN_MODELSLIM_W8A8] = FG_MODELSLIM_LAYOUT,
    [FMTGEN_MODELSLIM_W4A8] = FG_MODELSLIM_LAYOUT,
    [FMTGEN_MS_PTQ] = {.stem = "quant_model_w8a8",
                       .n_shards = 1,
                       .index = "quant_model_w8a8.index.json"},
    [FMTGEN_BLOCK_INT8] = {.n_shards = 1},
    [FMTGEN_MS_SMOOTHQUANT] = {.stem = "quant_model",
                               .n_shards = 1,
                               .index = "quant_model.safetensors.index.json",
                               .form = FG_INDEX_MS,
                               .decoy = "model-mtp.index.json"},
    [FMTGEN_MS_A8W4] = {.stem = "a8w4",
                        .n_shards = 1,
                        .index = "a8w4_name_map.json",
                        .form = FG_INDEX_FLAT},
};
static const fg_layout fg_ref_layout = {.n_shards = 1};

static void shard_name(const fg_layout *lay, int s, char *buf, size_t cap) {
    if (lay->stem)
        snprintf(buf, cap, "%s-%05d-of-%05d.safetensors", lay->stem, s + 1, lay->n_shards);
    else
        snprintf(buf, cap, "model.safetensors");
}

/* Shard of each tensor: a group starts in the shard its first byte falls in when the total is
 * cut into n equal parts, so the shards come out roughly equal and a group stays whole. */
static void assign_shards(const fg_list *l, int n, int *shard) {
    uint64_t total = 0, before = 0;
    for (size_t i = 0; i < l->n; i++) total += l->t[i].nbytes;
    int cur = 0;
    for (size_t i = 0; i < l->n; i++) {
        if (i == 0 || l->t[i].group != l->t[i - 1].group) {
            uint64_t s = total ? before * (uint64_t)n / total : 0;
            cur = s < (uint64_t)n ? (int)s : n - 1;
        }
        shard[i] = cur;
        before += l->t[i].nbytes;
    }
}

static int write_shard(const char *path, const fg_list *l, const int *shard, int s) {
    ds_st_writer *w;
    int rc = ds_st_writer_open(path, &w);
    if (rc) return rc;
    for (size_t i = 0; !rc && i < l->n; i++)
        if (shard[i] == s)
            rc = ds_st_writer_add(w, l->t[i].name, l->t[i].dtype, l->t[i].ndim, l->t[i].shape);
    if (!rc) rc = ds_st_writer_begin_data(w);
    for (size_t i = 0; !rc && i < l->n; i++)
        if (shard[i] == s) rc = ds_st_writer_data(w, l->t[i].data, l->t[i].nbytes);
    int rc2 = ds_st_writer_close(w);
    return rc ? rc : rc2;
}

static int dump_json(json_t *j, const char *dir, const char *name) {
    char *p = ds_cli_path_join(dir, name);
    int rc = !j || !p                               ? ds_err_set(DS_ERR_NOMEM, "out of memory")
             : json_dump_file(j, p, JSON_INDENT(2)) ? ds_err_set(DS_ERR_IO, "%s: cannot write", p)
                                                    : DS_OK;
    free(p);
    json_decref(j);
    return rc;
}

/* The index of OUT in the layout's form (fg_index_form). */
static int write_index(const char *dir, const fg_list *l, const int *shard, const fg_layout *lay) {
    json_t *map = json_object(), *meta = json_object();
    uint64_t total = 0;
    for (size_t i = 0; map && i < l->n; i++) {
        char f[256];
        shard_name(lay, shard[i], f, sizeof f);
        json_object_set_new(map, l->t[i].name, json_string(f));
        total += l->t[i].nbytes;
    }
    if (lay->form == FG_INDEX_HF && meta)
        json_object_set_new(meta, "total_size", json_integer((json_int_t)total));
    if (lay->form == FG_INDEX_FLAT) {
        json_decref(meta);
        return dump_json(map, dir, lay->index);
    }
    return dump_json(json_pack("{s:o, s:o}", "metadata", meta, "weight_map", map), dir, lay->index);
}

/* MindSpore keeps a float index for the MTP layers beside the quantized one, and a loader takes
 * the one whose name holds "quant" (§2, VM load_safetensors_shard). This one names a shard that
 * is not there, so a loader that picks it fails. */
static int write_decoy(const char *dir, const char *name) {
    return dump_json(json_pack("{s:{}, s:{s:s}}", "metadata", "weight_map",
                               "model.layers.61.eh_proj.weight", "mtp-00001-of-00001.safetensors"),
                     dir, name);
}

/* §1 quant_model_description.json: version, model_quant_type (forced to W8A8_DYNAMIC for the
 * DeepSeek mixes), group_size 0 (per channel), and every tensor's type. */
static int write_description(const char *dir, const fg_list *l) {
    json_t *d = json_object();
    if (d) {
        json_object_set_new(d, "version", json_string("1.0.0"));
        json_object_set_new(d, "model_quant_type", json_string("W8A8_DYNAMIC"));
        json_object_set_new(d, "group_size", json_integer(0));
    }
    for (size_t i = 0; d && i < l->n; i++)
        json_object_set_new(d, l->t[i].name, json_string(l->t[i].qtype));
    return dump_json(d, dir, "quant_model_description.json");
}

static int write_tensors(const char *dir, const fg_list *l, const fg_layout *lay) {
    int *shard = malloc((l->n ? l->n : 1) * sizeof *shard);
    if (!shard) return ds_err_set(DS_ERR_NOMEM, "out of memory");
    assign_shards(l, lay->n_shards, shard);
    int rc = DS_OK;
    for (int s = 0; !rc && s < lay->n_shards; s++) {
        char f[256];
        shard_name(lay, s, f, sizeof f);
        char *p = ds_cli_path_join(dir, f);
        rc = p ? write_shard(p, l, shard, s) : ds_err_set(DS_ERR_NOMEM, "out of memory");
        free(p);
    }
    if (!rc && lay->index) rc = write_index(dir, l, shard, lay);
    if (!rc && lay->decoy) rc = write_decoy(dir, lay->decoy);
    if (!rc && lay->description) rc = write_description(dir, l);
    free(shard);
    return rc;
}

/* config.json: the source's without quantization_config and the informational msModelSlim
 * keys, then what the layout adds: §1's example-script keys (the same for both mixes, plus
 * moe_quantize for W4A8, as the scripts write them whatever the attention scheme), §2's, §3's
 * and §5's quantization_config. */
static int write_config(const char *src, const char *dir, fmtgen_kind kind, int ref) {
    char *p = ds_cli_path_join(src, "config.json");
    json_t *c = NULL;
    int rc = p ? ds_json_load_file(p, &c) : ds_err_set(DS_ERR_NOMEM, "out of memory");
    free(p);
    if (rc) return rc;
    static const char *const drop[] = {"quantization_config", "quantize", "mla_quantize",
                                       "moe_quantize"};
    for (size_t i = 0; i < sizeof drop / sizeof drop[0]; i++) json_object_del(c, drop[i]);
    if (!ref && (kind == FMTGEN_MODELSLIM_W8A8 || kind == FMTGEN_MODELSLIM_W4A8)) {
        json_object_set_new(c, "quantize", json_string("w8a8_dynamic"));
        json_object_set_new(c, "mla_quantize", json_string("w8a8"));
        if (kind == FMTGEN_MODELSLIM_W4A8)
            json_object_set_new(c, "moe_quantize", json_string("w4a8_dynamic"));
    }
    static const char *const ms_method[FMTGEN_N_KINDS] = {[FMTGEN_MS_PTQ] = "ptq",
                                                          [FMTGEN_MS_SMOOTHQUANT] = "smoothquant",
                                                          [FMTGEN_MS_A8W4] = "a8w4"};
    if (!ref && ms_method[kind])
        json_object_set_new(c, "quantization_config",
                            json_pack("{s:s}", "quant_method", ms_method[kind]));
    if (!ref && kind == FMTGEN_BLOCK_INT8)
        json_object_set_new(c, "quantization_config",
                            json_pack("{s:s, s:s, s:[i,i]}", "activation_scheme", "dynamic",
                                      "quant_method", "blockwise_int8", "weight_block_size",
                                      FG_BLOCK, FG_BLOCK));
    return dump_json(c, dir, "config.json");
}

static int copy_tokenizer(const char *src, const char *dir) {
    static const char *const files[] = {"tokenizer.json", "tokenizer_config.json"};
    int rc = DS_OK;
    for (size_t i = 0; !rc && i < sizeof files / sizeof files[0]; i++) {
        if (!ds_cli_file_exists(src, files[i])) continue;
        char *a = ds_cli_path_join(src, files[i]), *b = ds_cli_path_join(dir, files[i]);
        rc = a && b ? ds_cli_copy_file(a, b) : ds_err_set(DS_ERR_NOMEM, "out of memory");
        free(a);
        free(b);
    }
    return rc;
}

static int write_checkpoint(const char *dir, const fg_list *l, const fg_layout *lay,
                            const char *src, fmtgen_kind kind, int ref) {
    if (mkdir(dir, 0755) && errno != EEXIST)
        return ds_err_set(DS_ERR_IO, "%s: cannot create: %s", dir, strerror(errno));
    int rc = write_tensors(dir, l, lay);
    if (!rc) rc = write_config(src, dir, kind, ref);
    if (!rc) rc = copy_tokenizer(src, dir);
    return rc;
}

static void ctx_free(fg_ctx *g) {
    for (int64_t l = 0; l < g->cfg.n_layers; l++) {
        if (g->in_bias) free(g->in_bias[l]);
        if (g->qa_bias) free(g->qa_bias[l]);
    }
    free(g->in_bias);
    free(g->qa_bias);
    calib_free(&g->cal);
    fg_list_free(&g->out);
    fg_list_free(&g->ref);
    ds_st_close(g->src);
}

int fmtgen_write(fmtgen_kind kind, const char *src, const char *out, const char *ref,
                 const int32_t *const *prompts, const int64_t *lens, int n_prompts) {
    fg_ctx g = {.kind = kind};
    int rc = (unsigned)kind < FMTGEN_N_KINDS ? ds_config_load(src, &g.cfg)
                                             : ds_err_set(DS_ERR_ARG, "unknown kind %d", kind);
    /* §3 leaves the MindSpore name of a model without q_lora (q_proj) unconfirmed: V3 and R1
     * always have q_lora, so no guess is written */
    if (!rc && is_ms_named(kind) && !g.cfg.q_lora_rank)
        rc = ds_err_set(DS_ERR_UNSUPPORTED, "no q_lora: MindSpore's name for q_proj is unknown");
    if (!rc) rc = ds_st_open_dir(src, &g.src);
    if (!rc && is_static_kind(kind)) rc = prepare_static(&g, src, prompts, lens, n_prompts);
    for (size_t i = 0; !rc && i < ds_st_count(g.src); i++)
        rc = emit_tensor(&g, ds_st_at(g.src, i), i);
    if (!rc) rc = write_checkpoint(out, &g.out, &fg_layouts[kind], src, kind, 0);
    if (!rc) rc = write_checkpoint(ref, &g.ref, &fg_ref_layout, src, kind, 1);
    if (rc) fprintf(stderr, "fmtgen %s: %s\n", fmtgen_kind_name(kind), ds_err_msg());
    ctx_free(&g);
    return rc;
}

/* ---- running and comparing checkpoints ---- */

int64_t fmtgen_argmax(const float *x, int64_t n) {
    int64_t b = 0;
    for (int64_t i = 1; i < n; i++)
        if (x[i] > x[b]) b = i;
    return b;
}

/* cont[s] is the argmax of row n - 1 + s of all; feeding it back gives row n + s. */
static int greedy(ds_model *m, ds_kv_cache *kv, float *all, int64_t n, int steps, int32_t *cont) {
    int64_t V = ds_model_config(m)->vocab_size;
    int rc = DS_OK;
    for (int s = 0; !rc && s < steps; s++) {
        cont[s] = (int32_t)fmtgen_argmax(all + (n - 1 + s) * V, V);
        rc = ds_model_forward(m, kv, &cont[s], 1, n + s, all + (n + s) * V, 0);
    }
    return rc;
}

int fmtgen_run(const char *dir, const int32_t *ids, int64_t n, int steps, float **logits,
               int64_t *vocab, int32_t *cont) {
    *logits = NULL;
    ds_model *m;
    int rc = ds_model_open(dir, NULL, &m);
    if (rc) return rc;
    int64_t V = *vocab = ds_model_config(m)->vocab_size;
    ds_kv_cache *kv = NULL;
    float *all = malloc((size_t)((n + steps) * V) * sizeof *all);
    rc = all ? ds_kv_open(ds_model_config(m), n + steps, &kv)
             : ds_err_set(DS_ERR_NOMEM, "out of memory");
    if (!rc) rc = ds_model_forward(m, kv, ids, n, 0, all, 1);
    if (!rc) rc = greedy(m, kv, all, n, steps, cont);
    ds_kv_close(kv);
    ds_model_close(m);
    if (rc)
        free(all);
    else
        *logits = all;
    return rc;
}

double fmtgen_margin(const float *logits, int64_t vocab) {
    int64_t top = fmtgen_argmax(logits, vocab);
    float second = -INFINITY;
    for (int64_t i = 0; i < vocab; i++)
        if (i != top && logits[i] > second) second = logits[i];
    return (double)logits[top] - second;
}

/* KL(p || q) of the softmaxes of logits p and q, in double, in one pass: with e_i =
 * exp(p_i - max p), log softmax(p)_i - log softmax(q)_i = p_i - q_i + c for one constant c, so
 * KL = sum_i e_i (p_i - q_i) / sum_i e_i + c. */
static double kl(const float *p, const float *q, int64_t n) {
    double mp = p[fmtgen_argmax(p, n)], mq = q[fmtgen_argmax(q, n)], zp = 0, zq = 0, ed = 0;
    for (int64_t i = 0; i < n; i++) {
        double e = exp(p[i] - mp);
        zp += e;
        zq += exp(q[i] - mq);
        ed += e * ((double)p[i] - q[i]);
    }
    return ed / zp - (mp - mq) - log(zp) + log(zq);
}

void fmtgen_compare(fmtgen_agreement *a, const float *ref, const float *got, int64_t n,
                    int64_t vocab) {
    for (int64_t t = 0; t < n; t++) {
        const float *r = ref + t * vocab, *g = got + t * vocab;
        int same = fmtgen_argmax(g, vocab) == fmtgen_argmax(r, vocab);
        double d = kl(r, g, vocab);
        a->positions++;
        a->top1_same += same;
        if (fmtgen_margin(r, vocab) > 0.5) a->top1_clear++, a->top1_clear_same += same;
        a->kl_sum += d;
        a->kl_max = d > a->kl_max ? d : a->kl_max;
    }
}

void fmtgen_report(const char *what, const fmtgen_agreement *a) {
    int n = a->positions ? a->positions : 1;
    printf("%-34s %4d positions: top-1 %5.1f%% (margin > 0.5: %d/%d), KL mean %.2e max %.2e\n",
           what, a->positions, 100.0 * a->top1_same / n, a->top1_clear_same, a->top1_clear,
           a->kl_sum / n, a->kl_max);
}
