/* Checkpoint formats: which stored form each projection has, and its binding to a ds_mat.
 *
 * The kernels run five stored forms (ds_mat): float (F32 / F16 / BF16), FP8 with 128x128 block
 * scales, int8 with per-channel or block scales and per-token activations, int8 with STATIC
 * activations (a stored step and zero point, an int32 bias), and int4 packed two per byte along
 * the input. Every format users download is one of these tensor by tensor, read in place from
 * the mapping, with one exception: msModelSlim's W4A8_DYNAMIC packs its int4 along the OUTPUT
 * axis (two rows per byte, for the NPU's tiles), which the CPU kernels cannot stream row by row;
 * those are repacked once at load into this process's memory, and the source pages dropped, so
 * the model is still held once. Only small vectors are converted (scales stored as BF16 or as
 * fp32 bits in I64, zero points, quant_bias x deq_scale).
 *
 * The facts about each layout, with the public loader each was checked against:
 * /work/shared/FORMATS-SPEC.md, summarised in docs/formats.md. The scheme of a projection comes
 * from the format: msModelSlim's description file names it per tensor; MindSpore "ptq" has the
 * static scheme wherever an input_scale sits next to an int8 weight; the others have one scheme
 * for all int8 weights. Whatever the format, a tensor whose dtype or shape does not fit its
 * scheme is refused, naming the tensor, rather than guessed at. */
#include "model/model_internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

typedef enum {
    FMT_FLOAT,      /* BF16 / F16 / F32 */
    FMT_FP8,        /* the official release */
    FMT_W8A8,       /* channel-int8: quant_method w8a8_int8, or detected by its tensors */
    FMT_W4A8,       /* dsinfer's w4a8_int4 */
    FMT_BLOCK_INT8, /* SGLang blockwise_int8 */
    FMT_MODELSLIM,  /* msModelSlim "ascend": quant_model_description.json */
    FMT_MS_PTQ,     /* MindSpore golden-stick "ptq" */
} fmt_kind;

typedef enum { S_FLOAT, S_FP8, S_DYNAMIC, S_STATIC, S_W4_IN, S_W4_OUT, S_BLOCK } scheme;

/* A float projection is named by its dtype. */
static const char *float_name(ds_dtype t) {
    return t == DS_BF16 ? "bf16" : t == DS_F16 ? "f16" : "f32";
}

static const char *const scheme_names[] = {
    [S_FLOAT] = "float",          [S_FP8] = "fp8-block",
    [S_DYNAMIC] = "w8a8-dynamic", [S_STATIC] = "w8a8-static",
    [S_W4_IN] = "w4a8-group",     [S_W4_OUT] = "w4a8-channel (output-packed, repacked at load)",
    [S_BLOCK] = "int8-block",
};

struct ds_format {
    fmt_kind kind;
    const ds_config *cfg;
    const ds_st_set *st;
    json_t *desc; /* msModelSlim: tensor name -> "FLOAT" | "W8A8" | ... */
    char *desc_path;
    void **owned; /* what bindings allocated */
    size_t n_owned, cap_owned;
};

static const char *const companions[] = {".weight_scale", ".weight_scale_inv", ".weight_offset",
                                         ".input_scale",  ".input_offset",     ".quant_bias",
                                         ".deq_scale",    ".scale_bias"};

/* ---- detection ---- */

/* Channel-int8 checkpoints may come without a quantization_config (FORMATS-SPEC §4): an int8
 * weight with its per-channel weight_scale tells. */
static int has_channel_int8(const ds_st_set *st) {
    for (size_t i = 0; i < ds_st_count(st); i++) {
        const ds_st_tensor *t = ds_st_at(st, i);
        char sname[512];
        if (t->dtype != DS_I8 || !ds_str_ends_with(t->name, ".weight")) continue;
        snprintf(sname, sizeof sname, "%s_scale", t->name);
        if (ds_st_find(st, sname)) return 1;
    }
    return 0;
}

/* quant_model_description.json: refuses what vllm-ascend HEAD itself does not load. */
static int read_desc(ds_format *f) {
    json_t *v = json_object_get(f->desc, "version");
    if (v && (!json_is_string(v) || strcmp(json_string_value(v), "1.0.0") != 0))
        return ds_err_set(DS_ERR_UNSUPPORTED,
                          "%s: \"version\" is not \"1.0.0\", the only description format dsinfer "
                          "knows",
                          f->desc_path);
    json_t *g = json_object_get(f->desc, "group_size");
    if (g && (!json_is_integer(g) || json_integer_value(g) != 0))
        return ds_err_set(DS_ERR_UNSUPPORTED,
                          "%s: \"group_size\" is not 0: per-group W4A8 (weight_scale_second) is "
                          "not supported (vllm-ascend refuses it as well); dsinfer loads the "
                          "per-channel layout",
                          f->desc_path);
    return DS_OK;
}

int ds_format_open(const char *dir, const ds_config *c, const ds_st_set *st, ds_format **out) {
    *out = NULL;
    ds_format *f = calloc(1, sizeof *f);
    if (!f) return ds_err_set(DS_ERR_NOMEM, "out of memory");
    f->cfg = c;
    f->st = st;
    size_t n = strlen(dir) + 40;
    f->desc_path = malloc(n);
    if (!f->desc_path) {
        ds_format_close(f);
        return ds_err_set(DS_ERR_NOMEM, "out of memory");
    }
    snprintf(f->desc_path, n, "%s/quant_model_description.json", dir);
    int rc = DS_OK;
    FILE *probe = fopen(f->desc_path, "rb");
    if (probe) {
        fclose(probe);
        if (c->quant != DS_QUANT_NONE)
            rc = ds_err_set(DS_ERR_FORMAT,
                            "%s: config.json has a quantization_config and the directory an "
                            "msModelSlim quant_model_description.json: which one applies is "
                            "ambiguous (msModelSlim removes quantization_config)",
                            dir);
        if (!rc) rc = ds_json_load_file(f->desc_path, &f->desc);
        if (!rc && !json_is_object(f->desc))
            rc = ds_err_set(DS_ERR_FORMAT, "%s: not a JSON object", f->desc_path);
        if (!rc) rc = read_desc(f);
        f->kind = FMT_MODELSLIM;
    } else {
        switch (c->quant) {
        case DS_QUANT_FP8:
            f->kind = FMT_FP8;
            break;
        case DS_QUANT_W8A8:
            f->kind = FMT_W8A8;
            break;
        case DS_QUANT_W4A8:
            f->kind = FMT_W4A8;
            break;
        case DS_QUANT_BLOCK_INT8:
            f->kind = FMT_BLOCK_INT8;
            break;
        case DS_QUANT_MS_PTQ:
            f->kind = FMT_MS_PTQ;
            break;
        case DS_QUANT_NONE:
            f->kind = has_channel_int8(st) ? FMT_W8A8 : FMT_FLOAT;
            break;
        }
    }
    if (rc) {
        ds_format_close(f);
        return rc;
    }
    *out = f;
    return DS_OK;
}

void ds_format_close(ds_format *f) {
    if (!f) return;
    ds_format_release(f);
    free(f->owned);
    json_decref(f->desc);
    free(f->desc_path);
    free(f);
}

const char *ds_format_name(const ds_format *f) {
    switch (f->kind) {
    case FMT_FLOAT:
        return "float (no quantization)";
    case FMT_FP8:
        return "fp8 (the official DeepSeek release: e4m3, 128x128 block scales)";
    case FMT_W8A8:
        return f->cfg->quant == DS_QUANT_W8A8 ? "w8a8_int8 (channel-int8: dsinfer, SGLang)"
                                              : "channel-int8 (I8 + weight_scale, no "
                                                "quantization_config)";
    case FMT_W4A8:
        return "w4a8_int4 (dsinfer)";
    case FMT_BLOCK_INT8:
        return "blockwise_int8 (SGLang block-int8)";
    case FMT_MODELSLIM:
        return "msModelSlim ascend (quant_model_description.json)";
    case FMT_MS_PTQ:
        return "MindSpore golden-stick ptq (W8A8, Hugging Face names)";
    }
    return "?";
}

int ds_format_is_companion(const ds_format *f, const char *name) {
    if (ds_str_ends_with(name, "norm.bias")) return 1;
    for (size_t i = 0; i < sizeof companions / sizeof *companions; i++) {
        if (!ds_str_ends_with(name, companions[i])) continue;
        char w[512];
        snprintf(w, sizeof w, "%.*s.weight", (int)(strlen(name) - strlen(companions[i])), name);
        if (ds_st_find(f->st, w)) return 1;
    }
    return 0;
}

/* ---- small tensors ---- */

static void *own(ds_format *f, size_t bytes) {
    if (f->n_owned == f->cap_owned) {
        size_t cap = f->cap_owned ? 2 * f->cap_owned : 64;
        void **n = realloc(f->owned, cap * sizeof *n);
        if (!n) return NULL;
        f->owned = n;
        f->cap_owned = cap;
    }
    void *p = ds_alloc(bytes ? bytes : 1);
    if (p) f->owned[f->n_owned++] = p;
    return p;
}

static int64_t numel(const ds_st_tensor *t) {
    int64_t n = 1;
    for (int d = 0; d < t->ndim; d++) n *= t->shape[d];
    return n;
}

static const char *dims_str(const ds_st_tensor *t, char *buf, size_t n) {
    size_t k = (size_t)snprintf(buf, n, "[");
    for (int d = 0; d < t->ndim && k < n; d++)
        k += (size_t)snprintf(buf + k, n - k, "%s%lld", d ? ", " : "", (long long)t->shape[d]);
    if (k < n) snprintf(buf + k, n - k, "]");
    return buf;
}

int ds_find_shaped(const ds_st_set *st, const char *name, int64_t d0, int64_t d1, int ndim,
                   const ds_st_tensor **out) {
    const ds_st_tensor *t = ds_st_find(st, name);
    if (!t) return ds_err_set(DS_ERR_MISSING, "missing tensor '%s'", name);
    if (t->ndim != ndim || t->shape[0] != d0 || (ndim == 2 && t->shape[1] != d1)) {
        char got[128];
        if (ndim == 2)
            return ds_err_set(DS_ERR_SHAPE, "%s: tensor '%s' has shape %s, expected [%lld, %lld]",
                              t->file, name, dims_str(t, got, sizeof got), (long long)d0,
                              (long long)d1);
        return ds_err_set(DS_ERR_SHAPE, "%s: tensor '%s' has shape %s, expected [%lld]", t->file,
                          name, dims_str(t, got, sizeof got), (long long)d0);
    }
    *out = t;
    return DS_OK;
}

/* prefix + suffix, with `n` elements in any shape of that many ([n], [n, 1], [1, n]: the
 * toolchains squeeze differently); `alt` (or 0) is another accepted count. */
static int find_count(const ds_format *f, const char *prefix, const char *suffix, int64_t n,
                      int64_t alt, const ds_st_tensor **out) {
    char name[512], got[128];
    snprintf(name, sizeof name, "%s%s", prefix, suffix);
    const ds_st_tensor *t = ds_st_find(f->st, name);
    if (!t) return ds_err_set(DS_ERR_MISSING, "missing tensor '%s'", name);
    int64_t k = numel(t);
    if (t->ndim > 2 || (k != n && k != alt))
        return ds_err_set(DS_ERR_SHAPE, "%s: tensor '%s' has shape %s, expected %lld elements%s",
                          t->file, name, dims_str(t, got, sizeof got), (long long)n,
                          alt && alt != n ? " (or 1)" : "");
    *out = t;
    return DS_OK;
}

/* Element i of a small tensor as a double; the dtypes the toolchains write for scales, zero
 * points and biases. I64 / U64 scales hold fp32 bits in their low word (msModelSlim's deq_scale
 * of fp16 models, MindSpore's U64 scales). */
static double elem(const ds_st_tensor *t, int64_t i, int fp32_bits) {
    const unsigned char *p = (const unsigned char *)t->data + (size_t)i * ds_dtype_size(t->dtype);
    union {
        float f;
        uint32_t u;
    } b;
    int64_t i64;
    int32_t i32;
    uint16_t h;
    switch (t->dtype) {
    case DS_F32:
        memcpy(&b.f, p, 4);
        return b.f;
    case DS_BF16:
        memcpy(&h, p, 2);
        b.u = (uint32_t)h << 16;
        return b.f;
    case DS_F16: {
        float v;
        memcpy(&h, p, 2);
        ds_kernels_get()->f16_to_f32(&v, &h, 1);
        return v;
    }
    case DS_I8:
        return (double)(int8_t)p[0];
    case DS_I32:
        memcpy(&i32, p, 4);
        return i32;
    case DS_I64:
    case DS_U64:
        if (fp32_bits) {
            memcpy(&b.u, p, 4); /* little-endian: the low word */
            return b.f;
        }
        memcpy(&i64, p, 8);
        return (double)i64;
    default:
        return NAN;
    }
}

static int dtype_in(ds_dtype t, const ds_dtype *ok, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (t == ok[i]) return 1;
    return 0;
}

#define DTYPES_OK(t, ...)                                                                          \
    dtype_in((t), (const ds_dtype[]){__VA_ARGS__},                                                 \
             sizeof((const ds_dtype[]){__VA_ARGS__}) / sizeof(ds_dtype))

static int bad_dtype(const ds_st_tensor *t, const char *want) {
    return ds_err_set(DS_ERR_UNSUPPORTED, "%s: tensor '%s' has dtype %s, expected %s", t->file,
                      t->name, ds_dtype_name(t->dtype), want);
}

/* An owned f32 copy of n elements of t (element 0 repeated when t has one: a per-tensor value
 * broadcast), or NULL with the error set. */
static float *f32_copy(ds_format *f, const ds_st_tensor *t, int64_t n, int fp32_bits) {
    float *v = own(f, (size_t)n * sizeof *v);
    if (!v) {
        ds_err_set(DS_ERR_NOMEM, "out of memory binding '%s'", t->name);
        return NULL;
    }
    int one = numel(t) == 1;
    for (int64_t i = 0; i < n; i++) v[i] = (float)elem(t, one ? 0 : i, fp32_bits);
    return v;
}

/* The per-row weight scale: F32 in the mapping when aligned, else an f32 copy. */
static int row_scales(ds_format *f, const char *prefix, int64_t rows, const float **out) {
    const ds_st_tensor *s;
    int rc = find_count(f, prefix, ".weight_scale", rows, 0, &s);
    if (rc) return rc;
    if (!DTYPES_OK(s->dtype, DS_F32, DS_BF16, DS_F16)) return bad_dtype(s, "F32, BF16 or F16");
    if (s->dtype == DS_F32 && (uintptr_t)s->data % sizeof(float) == 0) {
        *out = s->data;
        return DS_OK;
    }
    return (*out = f32_copy(f, s, rows, 0)) ? DS_OK : DS_ERR_NOMEM;
}

/* weight_offset is written as zeros (symmetric weights; FORMATS-SPEC §0): anything else is
 * asymmetric int8, which no supported scheme computes. */
static int zero_offsets(const ds_format *f, const char *prefix, int64_t rows) {
    char name[512];
    snprintf(name, sizeof name, "%s.weight_offset", prefix);
    if (!ds_st_find(f->st, name)) return DS_OK;
    const ds_st_tensor *o;
    int rc = find_count(f, prefix, ".weight_offset", rows, 0, &o);
    for (int64_t i = 0; !rc && i < rows; i++)
        if (elem(o, i, 0) != 0)
            return ds_err_set(DS_ERR_UNSUPPORTED,
                              "%s: tensor '%s' is not all zero (element %lld): asymmetric int8 "
                              "weights are not supported",
                              o->file, name, (long long)i);
    return rc;
}

/* The F32 scale grid `prefix.suffix` of shape [d0, d1]; copied when misaligned in the file. */
static int scale_grid(ds_format *f, const char *prefix, const char *suffix, int64_t d0, int64_t d1,
                      const float **out) {
    char name[512];
    snprintf(name, sizeof name, "%s%s", prefix, suffix);
    const ds_st_tensor *s;
    int rc = ds_find_shaped(f->st, name, d0, d1, 2, &s);
    if (rc) return rc;
    if (s->dtype != DS_F32) return bad_dtype(s, "F32");
    *out = s->data;
    if ((uintptr_t)s->data % sizeof(float)) {
        float *copy = own(f, (size_t)s->nbytes);
        if (!copy) return ds_err_set(DS_ERR_NOMEM, "out of memory binding '%s'", name);
        memcpy(copy, s->data, (size_t)s->nbytes);
        *out = copy;
    }
    return DS_OK;
}

/* ---- the schemes ---- */

/* Static W8A8 (FORMATS-SPEC §0): input_scale / input_offset per tensor or per input channel,
 * int32 quant_bias (zero point and any linear bias folded in), deq_scale = input_scale x the
 * weight's scale per row. */
static int bind_static(ds_format *f, const char *prefix, int64_t rows, int64_t cols, ds_mat *out) {
    const ds_st_tensor *is, *io, *qb, *dq;
    int rc;
    if ((rc = find_count(f, prefix, ".input_scale", cols, 1, &is)) ||
        (rc = find_count(f, prefix, ".input_offset", cols, 1, &io)) ||
        (rc = find_count(f, prefix, ".quant_bias", rows, 0, &qb)) ||
        (rc = find_count(f, prefix, ".deq_scale", rows, 0, &dq)))
        return rc;
    if (!DTYPES_OK(is->dtype, DS_F32, DS_BF16, DS_F16)) return bad_dtype(is, "F32, BF16 or F16");
    if (!DTYPES_OK(io->dtype, DS_F32, DS_BF16, DS_F16, DS_I8))
        return bad_dtype(io, "F32, BF16, F16 or I8");
    if (!DTYPES_OK(qb->dtype, DS_I32, DS_I64)) return bad_dtype(qb, "I32 or I64");
    if (!DTYPES_OK(dq->dtype, DS_F32, DS_BF16, DS_F16, DS_I64, DS_U64))
        return bad_dtype(dq, "F32, BF16, F16, or I64 holding fp32 bits");
    int64_t n = numel(is) > 1 || numel(io) > 1 ? cols : 1;
    float *scale = f32_copy(f, is, n, 0), *zp = f32_copy(f, io, n, 0);
    float *deq = f32_copy(f, dq, rows, 1), *bias = own(f, (size_t)rows * sizeof(float));
    if (!scale || !zp || !deq || !bias)
        return ds_err_set(DS_ERR_NOMEM, "out of memory binding '%s'", prefix);
    for (int64_t i = 0; i < n; i++) {
        if (!(scale[i] > 0) || !isfinite(scale[i]))
            return ds_err_set(DS_ERR_FORMAT,
                              "%s: tensor '%s' element %lld is %g, not a positive "
                              "step",
                              is->file, is->name, (long long)i, (double)scale[i]);
        if (zp[i] != nearbyintf(zp[i]) || zp[i] < -128 || zp[i] > 127)
            return ds_err_set(DS_ERR_FORMAT,
                              "%s: tensor '%s' element %lld is %g, not an int8 zero point",
                              io->file, io->name, (long long)i, (double)zp[i]);
    }
    for (int64_t r = 0; r < rows; r++) {
        if (!isfinite(deq[r]))
            return ds_err_set(DS_ERR_FORMAT, "%s: tensor '%s' element %lld is not finite", dq->file,
                              dq->name, (long long)r);
        bias[r] = deq[r] * (float)elem(qb, r, 0);
    }
    out->block_rows = 1;
    out->block_cols = cols;
    out->scale = deq;
    out->act_n = n;
    out->act_scale = scale;
    out->act_zp = zp;
    out->bias = bias;
    return DS_OK;
}

/* msModelSlim W4A8_DYNAMIC (FORMATS-SPEC §1): [rows / 2, cols], byte [j, k] = rows 2j (low
 * nibble) and 2j + 1 (high) of column k, repacked into ds_mat's layout (two columns of a row per
 * byte). scale_bias is the NPU kernel's offset compensation, not part of the math: not read. */
static int bind_w4_out(ds_format *f, const ds_st_tensor *t, const char *prefix, int64_t rows,
                       int64_t cols, ds_mat *out) {
    if (rows % 2)
        return ds_err_set(DS_ERR_SHAPE,
                          "%s: '%s' is W4A8_DYNAMIC (two rows per byte) but has an odd %lld rows",
                          t->file, t->name, (long long)rows);
    const ds_st_tensor *chk;
    int rc = ds_find_shaped(f->st, t->name, rows / 2, cols, 2, &chk);
    if (!rc) rc = row_scales(f, prefix, rows, &out->scale);
    if (!rc) rc = zero_offsets(f, prefix, rows);
    if (rc) return rc;
    size_t rb = (size_t)(cols + 1) / 2;
    uint8_t *d = own(f, (size_t)rows * rb);
    if (!d) return ds_err_set(DS_ERR_NOMEM, "out of memory repacking '%s'", t->name);
    const uint8_t *s = t->data;
    for (int64_t r = 0; r < rows; r++) {
        const uint8_t *src = s + (size_t)(r / 2) * (size_t)cols;
        int shift = r % 2 ? 4 : 0;
        for (int64_t k = 0; k < cols; k++)
            d[(size_t)r * rb + (size_t)k / 2] |=
                (uint8_t)(((src[k] >> shift) & 0xF) << (k % 2 ? 4 : 0));
    }
    ds_st_drop_pages(t);
    out->data = d;
    out->int4 = 1;
    out->block_rows = 1;
    out->block_cols = cols;
    return DS_OK;
}

/* The scheme of prefix's weight t under the format. */
static int scheme_of(const ds_format *f, const ds_st_tensor *t, const char *prefix, scheme *out) {
    char name[512];
    if (f->kind == FMT_MODELSLIM) {
        json_t *v = json_object_get(f->desc, t->name);
        const char *s = json_string_value(v);
        if (!s)
            return ds_err_set(DS_ERR_FORMAT, "%s: no entry (string) for tensor '%s'", f->desc_path,
                              t->name);
        if (!strcmp(s, "FLOAT"))
            *out = S_FLOAT;
        else if (!strcmp(s, "W8A8"))
            *out = S_STATIC;
        else if (!strcmp(s, "W8A8_DYNAMIC"))
            *out = S_DYNAMIC;
        else if (!strcmp(s, "W4A8_DYNAMIC"))
            *out = S_W4_OUT;
        else
            return ds_err_set(DS_ERR_UNSUPPORTED,
                              "%s: tensor '%s' is \"%s\"; dsinfer loads FLOAT, W8A8, W8A8_DYNAMIC "
                              "and W4A8_DYNAMIC",
                              f->desc_path, t->name, s);
        return DS_OK;
    }
    if (t->dtype == DS_F8_E4M3) {
        if (f->kind != FMT_FP8)
            return ds_err_set(DS_ERR_FORMAT,
                              "%s: tensor '%s' is F8_E4M3 but config.json has no fp8 "
                              "quantization_config",
                              t->file, t->name);
        *out = S_FP8;
        return DS_OK;
    }
    if (t->dtype != DS_I8) {
        *out = S_FLOAT;
        return DS_OK;
    }
    switch (f->kind) {
    case FMT_W8A8:
        *out = S_DYNAMIC;
        return DS_OK;
    case FMT_W4A8:
        *out = S_W4_IN;
        return DS_OK;
    case FMT_BLOCK_INT8:
        *out = S_BLOCK;
        return DS_OK;
    case FMT_MS_PTQ:
        snprintf(name, sizeof name, "%s.input_scale", prefix);
        *out = ds_st_find(f->st, name) ? S_STATIC : S_DYNAMIC;
        return DS_OK;
    default:
        return ds_err_set(DS_ERR_FORMAT,
                          "%s: tensor '%s' is I8 but no int8 format is declared (config.json's "
                          "quantization_config, a quant_model_description.json) and it has no "
                          "weight_scale",
                          t->file, t->name);
    }
}

const char *ds_format_scheme(ds_format *f, const char *prefix) {
    char name[512];
    snprintf(name, sizeof name, "%s.weight", prefix);
    const ds_st_tensor *t = ds_st_find(f->st, name);
    scheme s;
    if (!t) {
        ds_err_set(DS_ERR_MISSING, "missing tensor '%s'", name);
        return NULL;
    }
    return scheme_of(f, t, prefix, &s) ? NULL
           : s == S_FLOAT              ? float_name(t->dtype)
                                       : scheme_names[s];
}

int ds_format_shape(ds_format *f, const char *prefix, int64_t *rows, int64_t *cols) {
    char name[512];
    snprintf(name, sizeof name, "%s.weight", prefix);
    const ds_st_tensor *t = ds_st_find(f->st, name);
    scheme s;
    if (!t) return ds_err_set(DS_ERR_MISSING, "missing tensor '%s'", name);
    if (t->ndim != 2) return ds_err_set(DS_ERR_SHAPE, "%s: tensor '%s' is not 2-D", t->file, name);
    int rc = scheme_of(f, t, prefix, &s);
    *rows = t->shape[0] * (s == S_W4_OUT ? 2 : 1);
    *cols = t->shape[1] * (s == S_W4_IN ? 2 : 1);
    return rc;
}

void ds_format_release(ds_format *f) {
    for (size_t i = 0; i < f->n_owned; i++) ds_free(f->owned[i]);
    f->n_owned = 0;
}

int ds_format_bind(ds_format *f, const char *prefix, int64_t rows, int64_t cols, ds_mat *out,
                   const char **scheme_name) {
    char name[512];
    snprintf(name, sizeof name, "%s.weight", prefix);
    const ds_st_tensor *t = ds_st_find(f->st, name);
    if (!t) return ds_err_set(DS_ERR_MISSING, "missing tensor '%s'", name);
    scheme s;
    int rc = scheme_of(f, t, prefix, &s);
    if (rc) return rc;
    if (scheme_name) *scheme_name = s == S_FLOAT ? float_name(t->dtype) : scheme_names[s];
    *out = (ds_mat){.dtype = t->dtype, .rows = rows, .cols = cols, .data = t->data};
    const ds_st_tensor *chk;
    const ds_config *c = f->cfg;
    if (s == S_FLOAT) {
        if (!DTYPES_OK(t->dtype, DS_F32, DS_F16, DS_BF16))
            return bad_dtype(t, f->kind == FMT_MODELSLIM ? "a float dtype (FLOAT in "
                                                           "quant_model_description.json)"
                                                         : "F32, F16, BF16, F8_E4M3 or I8");
        return ds_find_shaped(f->st, name, rows, cols, 2, &chk);
    }
    if (s != S_FP8 && t->dtype != DS_I8)
        return bad_dtype(t, s == S_W4_OUT ? "I8 (int4 pairs) for W4A8_DYNAMIC" : "I8");
    if (s == S_W4_OUT) return bind_w4_out(f, t, prefix, rows, cols, out);
    if (s == S_W4_IN) {
        out->int4 = 1;
        out->block_rows = 1;
        out->block_cols = c->quant_group;
        if ((rc = ds_find_shaped(f->st, name, rows, (cols + 1) / 2, 2, &chk))) return rc;
        return scale_grid(f, prefix, ".weight_scale", rows,
                          (cols + c->quant_group - 1) / c->quant_group, &out->scale);
    }
    if ((rc = ds_find_shaped(f->st, name, rows, cols, 2, &chk))) return rc;
    switch (s) {
    case S_FP8:
    case S_BLOCK: /* weight_scale_inv per block, FP8 and int8 alike */
        out->block_rows = c->quant_block[0];
        out->block_cols = c->quant_block[1];
        return scale_grid(f, prefix, ".weight_scale_inv",
                          (rows + out->block_rows - 1) / out->block_rows,
                          (cols + out->block_cols - 1) / out->block_cols, &out->scale);
    case S_STATIC:
        return bind_static(f, prefix, rows, cols, out);
    default: /* S_DYNAMIC */
        out->block_rows = 1;
        out->block_cols = cols;
        if ((rc = row_scales(f, prefix, rows, &out->scale))) return rc;
        return zero_offsets(f, prefix, rows);
    }
}
