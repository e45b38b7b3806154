/* fmtgen: the foreign quantized layouts of FORMATS-SPEC.md, written from a BF16 checkpoint.
 *
 * The sources are tiny models, so everything is built in memory first: one list of tensors for
 * OUT and one for REF, in the source's order, each projection followed by its companions, the
 * copies pointing into the source's mapping. Then each list is written in its layout (shards,
 * index, quant_model_description.json, config.json, tokenizer files).
 *
 * The static schemes (msModelSlim W8A8, MindSpore ptq) calibrate first: the BF16 model runs
 * over the prompts and the trace hook gives, per layer, the per-channel minimum and maximum of
 * the inputs of the static linears (the input_layernorm output feeding q_a / q / kv_a, the
 * q_a_layernorm output feeding q_b, and o_proj's input). From them come the anti-outlier norm
 * biases (centring each channel) and then the per-tensor activation step and zero point of the
 * shifted activations, as msModelSlim's m4 anti-outlier and min-max calibration do (§0). */
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

#define FG_BLOCK 128    /* blockwise_int8 weight_block_size, both axes (§5) */
#define FG_TP_SLICES 16 /* msModelSlim's tp_num for down_proj's scale_bias (§1) */

const char *fmtgen_kind_name(fmtgen_kind kind) {
    static const char *const names[FMTGEN_N_KINDS] = {"modelslim-w8a8", "modelslim-w4a8", "ms-ptq",
                                                      "block-int8"};
    return (unsigned)kind < FMTGEN_N_KINDS ? names[kind] : "?";
}

static int is_static_kind(fmtgen_kind k) {
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
    int64_t shape[2];
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

/* Appends tensor prefix+suffix holding `data` (viewed, or owned when `owned`: then it is taken
 * in every case, freed here when rc is already an error or the append fails). A NULL data is an
 * allocation that failed. Returns the first error: calls chain as rc = fg_add(l, rc, ...). */
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
                     .shape = {shape[0], ndim > 1 ? shape[1] : 1},
                     .data = data,
                     .owned = owned ? (void *)data : NULL,
                     .qtype = l->qtype,
                     .group = l->group};
    t->nbytes = (uint64_t)(t->shape[0] * t->shape[1]) * ds_dtype_size(dt);
    return DS_OK;
}

/* A source tensor as it is (FLOAT). */
static int fg_copy(fg_list *l, int rc, const ds_st_tensor *t) {
    if (!rc && t->ndim > 2)
        return ds_err_set(DS_ERR_UNSUPPORTED, "%s: %d dimensions (fmtgen writes at most 2)",
                          t->name, t->ndim);
    return fg_add(l, rc, t->name, "", t->dtype, t->ndim, t->shape, t->data, 0);
}

/* ---- symmetric weight quantization ---- */

/* q = clamp(rint(w / s), qmin, qmax) with s = max|w| / qmax over each br x bc block (edge
 * blocks partial; 1 for an all-zero block). Per output channel is br = 1, bc = C. s holds
 * ceil(R / br) x ceil(C / bc) scales. lrintf rounds ties to even in the default mode. */
static void quant_blocks(const float *w, int64_t R, int64_t C, int64_t br, int64_t bc, int qmin,
                         int qmax, int8_t *q, float *s) {
    int64_t gc = (C + bc - 1) / bc;
    for (int64_t i0 = 0; i0 < R; i0 += br)
        for (int64_t j0 = 0; j0 < C; j0 += bc) {
            int64_t i1 = i0 + br < R ? i0 + br : R, j1 = j0 + bc < C ? j0 + bc : C;
            float mx = 0;
            for (int64_t i = i0; i < i1; i++)
                for (int64_t j = j0; j < j1; j++) mx = fmaxf(mx, fabsf(w[i * C + j]));
            float sc = mx > 0 ? mx / (float)qmax : 1.0f;
            s[i0 / br * gc + j0 / bc] = sc;
            for (int64_t i = i0; i < i1; i++)
                for (int64_t j = j0; j < j1; j++) {
                    long v = lrintf(w[i * C + j] / sc);
                    q[i * C + j] = (int8_t)(v < qmin ? qmin : v > qmax ? qmax : v);
                }
        }
}

/* The reference weight of a dynamic scheme: q * s of its block, one f32 product (malloc'd). */
static float *dequant_blocks(const int8_t *q, const float *s, int64_t R, int64_t C, int64_t br,
                             int64_t bc) {
    float *w = malloc((size_t)(R * C) * sizeof *w);
    int64_t gc = (C + bc - 1) / bc;
    for (int64_t i = 0; w && i < R; i++)
        for (int64_t j = 0; j < C; j++)
            w[i * C + j] = (float)q[i * C + j] * s[i / br * gc + j / bc];
    return w;
}

/* The quantized weight and scales of one projection, [R, C]. */
typedef struct {
    int64_t R, C;
    int8_t *q; /* [R, C] */
    float *s;  /* [ceil(R / br), ceil(C / bc)] */
} fg_quant;

static int fg_quantize(fg_quant *z, const float *w, int64_t R, int64_t C, int64_t br, int64_t bc,
                       int qmin, int qmax) {
    size_t n_scales = (size_t)((R + br - 1) / br) * (size_t)((C + bc - 1) / bc);
    *z = (fg_quant){R, C, malloc((size_t)(R * C)), malloc(n_scales * sizeof(float))};
    if (!z->q || !z->s) {
        free(z->q);
        free(z->s);
        return ds_err_set(DS_ERR_NOMEM, "out of memory");
    }
    quant_blocks(w, R, C, br, bc, qmin, qmax, z->q, z->s);
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

/* Static per-tensor activation quantization (§0), asymmetric min-max over the calibration
 * activations of x + b. */
typedef struct {
    float scale; /* input_scale as stored (BF16-rounded for ptq) */
    float zp;    /* input_offset, an integer in [-128, 127] */
} fg_act;

/* The range of x + b is the channel ranges shifted by b[c] (b NULL: none): f32 addition is
 * monotonic, so it is the range of the shifted activations exactly. When the scale is stored
 * as BF16 the zero point is taken from the rounded scale, so that the file's pair maps the
 * calibrated range onto [-128, 127] as a pair. */
static fg_act act_params(const fg_range *r, const float *b, int bf16_scale) {
    float lo = INFINITY, hi = -INFINITY;
    for (int64_t c = 0; c < r->cols; c++) {
        lo = fminf(lo, r->mn[c] + (b ? b[c] : 0));
        hi = fmaxf(hi, r->mx[c] + (b ? b[c] : 0));
    }
    float scale = (fmaxf(hi, 0) - fminf(lo, 0)) / 255.0f;
    if (!(scale > 0)) scale = 1; /* all-zero activations: any step represents them */
    if (bf16_scale) scale = bf16_round(scale);
    float zp = rintf(-fminf(lo, 0) / scale) - 128;
    return (fg_act){scale, zp > 127 ? 127 : zp};
}

/* §0: quant_bias[n] = rint(bias_f[n] / deq_scale[n] - input_offset * sum_k q[n,k]), bias_f the
 * anti-outlier correction -W_float b of the float weights (0 without a norm bias), in double. */
static int32_t quant_bias(const float *w, const int8_t *q, const float *b, int64_t C, float deq,
                          float zp) {
    double bias_f = 0, sq = 0;
    for (int64_t k = 0; k < C; k++) {
        bias_f -= b ? (double)w[k] * b[k] : 0;
        sq += q[k];
    }
    double v = rint(bias_f / deq - (double)zp * sq);
    return (int32_t)(v > INT32_MAX ? INT32_MAX : v < INT32_MIN ? INT32_MIN : v);
}

/* ---- the schemes: one projection into OUT (weight + companions) and REF (F32 weight) ---- */

typedef enum { FG_FLOAT, FG_STATIC, FG_DYN8, FG_DYN4, FG_BLOCK8 } fg_scheme;

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

/* The layer mixes of §1, §2 and §5 as fixed in fmtgen.h. */
static fg_scheme scheme_of(const fg_ctx *g, const ds_st_tensor *t) {
    int64_t l = layer_of(t->name);
    if (!is_projection(t) || l >= g->cfg.n_layers) return FG_FLOAT;
    if (g->kind == FMTGEN_BLOCK_INT8) return FG_BLOCK8;
    if (strstr(t->name, ".kv_b_proj.")) return FG_FLOAT;
    int attn = strstr(t->name, ".self_attn.") != NULL;
    if (g->kind == FMTGEN_MODELSLIM_W4A8)
        return !attn && strstr(t->name, ".mlp.experts.") ? FG_DYN4 : FG_DYN8;
    return attn ? FG_STATIC : FG_DYN8;
}

static int put_ref(fg_ctx *g, int rc, const char *prefix, int64_t R, int64_t C, float *w) {
    return fg_add(&g->ref, rc, prefix, ".weight", DS_F32, 2, (int64_t[]){R, C}, w, 1);
}

/* weight_scale and weight_offset [out, 1], the offsets zero (symmetric weights, §1). */
static int put_channel_scales(fg_ctx *g, int rc, const char *prefix, int64_t R, float *s) {
    rc = fg_add(&g->out, rc, prefix, ".weight_scale", DS_F32, 2, (int64_t[]){R, 1}, s, 1);
    return fg_add(&g->out, rc, prefix, ".weight_offset", DS_F32, 2, (int64_t[]){R, 1},
                  calloc((size_t)R, sizeof(float)), 1);
}

/* W8A8_DYNAMIC (§1) / golden-stick per-token (§2): I8 [out, in], per-channel scales. */
static int emit_dyn8(fg_ctx *g, const char *prefix, const float *w, int64_t R, int64_t C) {
    fg_quant z;
    int rc = fg_quantize(&z, w, R, C, 1, C, -128, 127);
    if (rc) return rc;
    float *deq = dequant_blocks(z.q, z.s, R, C, 1, C);
    g->out.qtype = "W8A8_DYNAMIC";
    rc = fg_add(&g->out, rc, prefix, ".weight", DS_I8, 2, (int64_t[]){R, C}, z.q, 1);
    rc = put_channel_scales(g, rc, prefix, R, z.s);
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
    int rc = fg_quantize(&z, w, R, C, 1, C, -8, 7);
    if (rc) return rc;
    float *sb = NULL;
    int64_t sbc = 0;
    rc = scale_bias(prefix, &z, &sb, &sbc);
    float *deq = dequant_blocks(z.q, z.s, R, C, 1, C);
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
    int rc = fg_quantize(&z, w, R, C, FG_BLOCK, FG_BLOCK, -127, 127);
    if (rc) return rc;
    float *deq = dequant_blocks(z.q, z.s, R, C, FG_BLOCK, FG_BLOCK);
    int64_t gshape[2] = {(R + FG_BLOCK - 1) / FG_BLOCK, (C + FG_BLOCK - 1) / FG_BLOCK};
    rc = fg_add(&g->out, rc, prefix, ".weight", DS_I8, 2, (int64_t[]){R, C}, z.q, 1);
    rc = fg_add(&g->out, rc, prefix, ".weight_scale_inv", DS_F32, 2, gshape, z.s, 1);
    return put_ref(g, rc, prefix, R, C, deq);
}

/* A malloc'd one-element tensor of dtype dt holding v (F32, BF16 or I8). */
static void *scalar_of(ds_dtype dt, float v) {
    void *p = malloc(4);
    if (p && dt == DS_F32) memcpy(p, &v, 4);
    if (p && dt == DS_BF16) *(uint16_t *)p = ds_f32_to_bf16(v);
    if (p && dt == DS_I8) *(int8_t *)p = (int8_t)v;
    return p;
}

/* The norm feeding static linear `prefix` (its bias, NULL for o_proj) and its calibrated input
 * range: input_layernorm feeds q_a / q / kv_a, q_a_layernorm feeds q_b (§0, VM
 * infer_quant_bias_weight), o_proj has no norm. */
static int static_input(const fg_ctx *g, const char *prefix, int64_t l, int64_t C, const float **b,
                        const fg_range **r) {
    if (ds_str_ends_with(prefix, ".o_proj")) {
        *b = NULL;
        return calib_range(&g->cal, l, FG_O_IN, C, r);
    }
    if (ds_str_ends_with(prefix, ".q_b_proj")) {
        *b = g->qa_bias[l];
        return calib_range(&g->cal, l, FG_Q_A_NORM, C, r);
    }
    *b = g->in_bias[l];
    return calib_range(&g->cal, l, FG_ATTN_NORM, C, r);
}

/* Static W8A8 (§0; §1's dtypes for msModelSlim, §2's BF16 input_scale / I8 input_offset for
 * ptq): weight, input_scale [1], input_offset [1], quant_bias I32 [out], deq_scale F32 [out]. */
static int emit_static(fg_ctx *g, const char *prefix, const float *w, int64_t R, int64_t C) {
    const float *b = NULL;
    const fg_range *r = NULL;
    int rc = static_input(g, prefix, layer_of(prefix), C, &b, &r);
    int ptq = g->kind == FMTGEN_MS_PTQ;
    fg_quant z;
    if (!rc) rc = fg_quantize(&z, w, R, C, 1, C, -128, 127);
    if (rc) return rc;
    fg_act a = act_params(r, b, ptq);
    float *deq = malloc((size_t)R * sizeof *deq), *wref = malloc((size_t)(R * C) * sizeof *wref);
    int32_t *qb = malloc((size_t)R * sizeof *qb);
    for (int64_t n = 0; deq && wref && qb && n < R; n++) {
        deq[n] = a.scale * z.s[n];
        qb[n] = quant_bias(w + n * C, z.q + n * C, b, C, deq[n], a.zp);
        for (int64_t k = 0; k < C; k++)
            wref[n * C + k] = (float)((double)z.q[n * C + k] * deq[n] / a.scale);
    }
    free(z.s);
    ds_dtype st = ptq ? DS_BF16 : DS_F32, ot = ptq ? DS_I8 : DS_F32;
    g->out.qtype = "W8A8";
    rc = fg_add(&g->out, rc, prefix, ".weight", DS_I8, 2, (int64_t[]){R, C}, z.q, 1);
    rc = fg_add(&g->out, rc, prefix, ".input_scale", st, 1, (int64_t[]){1}, scalar_of(st, a.scale),
                1);
    rc =
        fg_add(&g->out, rc, prefix, ".input_offset", ot, 1, (int64_t[]){1}, scalar_of(ot, a.zp), 1);
    rc = fg_add(&g->out, rc, prefix, ".quant_bias", DS_I32, 1, (int64_t[]){R}, qb, 1);
    rc = fg_add(&g->out, rc, prefix, ".deq_scale", DS_F32, 1, (int64_t[]){R}, deq, 1);
    return put_ref(g, rc, prefix, R, C, wref);
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

/* After input_layernorm.weight / q_a_layernorm.weight of a decoder layer, the static schemes add
 * the norm's anti-outlier bias (BF16 [dim], "FLOAT"; OUT only). */
static int emit_norm_bias(fg_ctx *g, const char *name) {
    int64_t l = layer_of(name);
    if (!is_static_kind(g->kind) || l < 0 || l >= g->cfg.n_layers) return DS_OK;
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
    if (sc != FG_FLOAT) return emit_projection(g, t, sc);
    int rc = fg_copy(&g->out, DS_OK, t);
    rc = fg_copy(&g->ref, rc, t);
    return rc ? rc : emit_norm_bias(g, t->name);
}

/* Calibrates and derives the norm biases of every decoder layer. */
static int prepare_static(fg_ctx *g, const char *src, const int32_t *const *prompts,
                          const int64_t *lens, int n_prompts) {
    int rc = calibrate(&g->cal, src, &g->cfg, prompts, lens, n_prompts);
    int64_t L = g->cfg.n_layers;
    g->in_bias = rc ? NULL : calloc((size_t)L, sizeof(float *));
    g->qa_bias = rc ? NULL : calloc((size_t)L, sizeof(float *));
    if (!rc && (!g->in_bias || !g->qa_bias)) rc = ds_err_set(DS_ERR_NOMEM, "out of memory");
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

typedef struct {
    const char *stem; /* shards STEM-0000i-of-0000n.safetensors; NULL: one model.safetensors */
    int n_shards;
    const char *index; /* the index file (NULL: none) */
    int description;   /* writes quant_model_description.json */
} fg_layout;

#define FG_MODELSLIM_LAYOUT                                                                        \
    {                                                                                              \
        "quant_model_weight_w8a8_dynamic", 2,                                                      \
            "quant_model_weight_w8a8_dynamic.safetensors.index.json", 1                            \
    }
static const fg_layout fg_layouts[FMTGEN_N_KINDS] = {
    [FMTGEN_MODELSLIM_W8A8] = FG_MODELSLIM_LAYOUT,
    [FMTGEN_MODELSLIM_W4A8] = FG_MODELSLIM_LAYOUT,
    [FMTGEN_MS_PTQ] = {"quant_model_w8a8", 1, "quant_model_w8a8.index.json", 0},
    [FMTGEN_BLOCK_INT8] = {NULL, 1, NULL, 0},
};
static const fg_layout fg_ref_layout = {NULL, 1, NULL, 0};

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

/* {"metadata": {"total_size": bytes}, "weight_map": {name: shard file}}. */
static int write_index(const char *dir, const fg_list *l, const int *shard, const fg_layout *lay) {
    json_t *root = json_object(), *map = json_object(), *meta = json_object();
    uint64_t total = 0;
    for (size_t i = 0; root && map && meta && i < l->n; i++) {
        char f[256];
        shard_name(lay, shard[i], f, sizeof f);
        json_object_set_new(map, l->t[i].name, json_string(f));
        total += l->t[i].nbytes;
    }
    if (!root || !map || !meta) {
        json_decref(map);
        json_decref(meta);
        json_decref(root);
        return ds_err_set(DS_ERR_NOMEM, "out of memory");
    }
    json_object_set_new(meta, "total_size", json_integer((json_int_t)total));
    json_object_set_new(root, "metadata", meta);
    json_object_set_new(root, "weight_map", map);
    return dump_json(root, dir, lay->index);
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
    if (!rc && lay->description) rc = write_description(dir, l);
    free(shard);
    return rc;
}

/* config.json: the source's without quantization_config and the informational msModelSlim
 * keys, then what the layout adds: §1's example-script keys (the same for both mixes, plus
 * moe_quantize for W4A8, as the scripts write them whatever the attention scheme), §2's and
 * §5's quantization_config. */
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
    if (!ref && kind == FMTGEN_MS_PTQ)
        json_object_set_new(c, "quantization_config", json_pack("{s:s}", "quant_method", "ptq"));
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

static int64_t argmax(const float *x, int64_t n) {
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
        cont[s] = (int32_t)argmax(all + (n - 1 + s) * V, V);
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
    int64_t top = argmax(logits, vocab);
    float second = -INFINITY;
    for (int64_t i = 0; i < vocab; i++)
        if (i != top && logits[i] > second) second = logits[i];
    return (double)logits[top] - second;
}

/* KL(p || q) of the softmaxes of logits p and q, in double. */
static double kl(const float *p, const float *q, int64_t n) {
    double mp = p[argmax(p, n)], mq = q[argmax(q, n)], zp = 0, zq = 0, k = 0;
    for (int64_t i = 0; i < n; i++) zp += exp(p[i] - mp), zq += exp(q[i] - mq);
    for (int64_t i = 0; i < n; i++) {
        double lp = p[i] - mp - log(zp), lq = q[i] - mq - log(zq);
        k += exp(lp) * (lp - lq);
    }
    return k;
}

void fmtgen_compare(fmtgen_agreement *a, const float *ref, const float *got, int64_t n,
                    int64_t vocab) {
    for (int64_t t = 0; t < n; t++) {
        const float *r = ref + t * vocab, *g = got + t * vocab;
        int same = argmax(g, vocab) == argmax(r, vocab);
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
