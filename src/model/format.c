/* Checkpoint formats: which stored form each projection has, and its binding to a ds_mat.
 *
 * The kernels run five stored forms (ds_mat): float (F32 / F16 / BF16), FP8 with 128x128 block
 * scales, int8 with per-channel or block scales and per-token activations, int8 with STATIC
 * activations (a stored step and zero point, an int32 bias), and int4 packed two per byte along
 * the input. Every format users download is one of these tensor by tensor, read in place from
 * the mapping, except where a layout orders its bytes for an NPU's tiles: msModelSlim's
 * W4A8_DYNAMIC packs int4 along the OUTPUT axis (two rows per byte), MindSpore stacks a layer's
 * routed experts as [E, in, out] and splits kv_b into k_nope and v. The CPU kernels stream whole
 * rows, so those tensors are rearranged once at load into this process's memory and their source
 * pages dropped: the model is still held once. MindSpore's rope rows, stored de-interleaved, are
 * not touched: the forward pass re-interleaves 64 outputs per head instead
 * (ds_format_rope_split). Small vectors are converted (scales stored as BF16 or as fp32 bits in
 * I64 / U64, zero points, quant_bias x deq_scale).
 *
 * The facts about each layout, with the public loader each was checked against:
 * /work/shared/FORMATS-SPEC.md, summarised in docs/formats.md. The scheme of a projection comes
 * from the format: msModelSlim's description file names it per tensor; MindSpore "ptq" has the
 * static scheme wherever an input_scale sits next to an int8 weight; the others have one scheme
 * for all int8 weights. Whatever the format, a tensor whose dtype or shape does not fit its
 * scheme is refused, naming the tensor, rather than guessed at. */
#include "model/model_internal.h"

#include <math.h>
#include <stdarg.h>
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
    FMT_MS_W8A8,    /* golden-stick "osl" / "smoothquant": MindSpore parameter names */
    FMT_MS_A8W4,    /* golden-stick "a8w4": the same, routed experts int4 */
} fmt_kind;

/* S_MS_EXPERT: one expert of MindSpore's stacked [E, in, out(/2)] tensors; S_MS_KVB: kv_b,
 * stored as two tensors (k_nope, v) by MindSpore. */
typedef enum {
    S_FLOAT,
    S_FP8,
    S_DYNAMIC,
    S_STATIC,
    S_W4_IN,
    S_W4_OUT,
    S_BLOCK,
    S_MS_EXPERT,
    S_MS_KVB
} scheme;

/* A float projection is named by its dtype. */
static const char *float_name(ds_dtype t) {
    return t == DS_BF16 ? "bf16" : t == DS_F16 ? "f16" : "f32";
}

static const char *const scheme_names[] = {
    /* S_FLOAT is named by its dtype */
    [S_FP8] = "fp8-block",
    [S_DYNAMIC] = "w8a8-dynamic",
    [S_STATIC] = "w8a8-static",
    [S_W4_IN] = "w4a8-group",
    [S_W4_OUT] = "w4a8-channel (output-packed, repacked at load)",
    [S_BLOCK] = "int8-block",
    [S_MS_EXPERT] = "w8a8-dynamic (MindSpore stacked experts, transposed at load)",
    [S_MS_KVB] = "bf16 (k_nope + v, interleaved at load)",
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
        case DS_QUANT_MS_W8A8:
            f->kind = FMT_MS_W8A8;
            break;
        case DS_QUANT_MS_A8W4:
            f->kind = FMT_MS_A8W4;
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
    case FMT_MS_W8A8:
        return "MindSpore golden-stick osl / smoothquant (W8A8, MindSpore names)";
    case FMT_MS_A8W4:
        return "MindSpore golden-stick a8w4 (int4 routed experts, MindSpore names)";
    }
    return "?";
}

/* ---- MindSpore parameter names (FORMATS-SPEC §3; vllm-mindspore f4d94008
 * mf_models/deepseekv3_weight_processor.py, infer_smooth_quant_get_value,
 * smooth_quant_process_*, process_route_ffn_weight_a8w4) ---- */

static int ms_names(const ds_format *f) {
    return f->kind == FMT_MS_W8A8 || f->kind == FMT_MS_A8W4;
}

/* Hugging Face name -> MindSpore name, whole names first, then a linear's prefix and suffix. */
static const char *const ms_whole[][2] = {
    {"model.embed_tokens.weight", "model.tok_embeddings.embedding_weight"},
    {"model.norm.weight", "model.norm_out.weight"},
    {"input_layernorm.weight", "attention_norm.weight"},
    {"post_attention_layernorm.weight", "ffn_norm.weight"},
    {"self_attn.q_a_layernorm.weight", "attention.lq_norm.weight"},
    {"self_attn.kv_a_layernorm.weight", "attention.lkv_norm.weight"},
    {"mlp.gate.weight", "feed_forward.routed_experts.router.dense.weight"},
    {"mlp.gate.e_score_correction_bias",
     "feed_forward.routed_experts.router.e_score_correction_bias"},
};
static const char *const ms_linear[][2] = {
    {"self_attn.q_a_proj", "attention.q2l_proj"},
    {"self_attn.q_b_proj", "attention.l2q_proj"},
    {"self_attn.kv_a_proj_with_mqa", "attention.kv2l"},
    {"self_attn.o_proj", "attention.wo"},
    {"mlp.shared_experts.gate_proj", "feed_forward.shared_experts.w1"},
    {"mlp.shared_experts.up_proj", "feed_forward.shared_experts.w3"},
    {"mlp.shared_experts.down_proj", "feed_forward.shared_experts.w2"},
    {"mlp.gate_proj", "feed_forward.w1"},
    {"mlp.up_proj", "feed_forward.w3"},
    {"mlp.down_proj", "feed_forward.w2"},
};
static const char *const ms_suffix[][2] = {
    {".weight", "._layer.weight"},
    {".input_scale", ".quant_op.input_scale"},
    {".input_offset", ".quant_op.input_zp"},
    {".quant_bias", "._layer.matmul.quant_bias"},
    {".deq_scale", "._layer.matmul.dequant_scale"},
    {".weight_scale", "._layer.matmul.weight_scale"},
};

/* The MindSpore name of a Hugging Face name into buf; the name itself when it has none. */
static const char *ms_translate(const char *hf, char *buf, size_t cap) {
    long long l;
    int pre = 0;
    const char *rest = hf;
    if (sscanf(hf, "model.layers.%lld.%n", &l, &pre) == 1 && pre > 0) rest = hf + pre;
    for (size_t i = 0; i < sizeof ms_whole / sizeof *ms_whole; i++)
        if (!strcmp(rest, ms_whole[i][0])) {
            snprintf(buf, cap, "%.*s%s", pre, hf, ms_whole[i][1]);
            return buf;
        }
    for (size_t i = 0; i < sizeof ms_linear / sizeof *ms_linear; i++) {
        size_t n = strlen(ms_linear[i][0]);
        if (pre == 0 || strncmp(rest, ms_linear[i][0], n) != 0) continue;
        for (size_t j = 0; j < sizeof ms_suffix / sizeof *ms_suffix; j++)
            if (!strcmp(rest + n, ms_suffix[j][0])) {
                snprintf(buf, cap, "%.*s%s%s", pre, hf, ms_linear[i][1], ms_suffix[j][1]);
                return buf;
            }
    }
    return hf;
}

const ds_st_tensor *ds_format_find(const ds_format *f, const char *name) {
    char buf[512];
    return ds_st_find(f->st, ms_names(f) ? ms_translate(name, buf, sizeof buf) : name);
}

/* Writes the Hugging Face name of logical tensor i of disk tensor `disk` (buf may be NULL). */
static int64_t logical_name(char *buf, size_t cap, int64_t n, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static int64_t logical_name(char *buf, size_t cap, int64_t n, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    if (buf) vsnprintf(buf, cap, fmt, ap);
    va_end(ap);
    return n;
}

int64_t ds_format_logical(const ds_format *f, const char *disk, int64_t i, char *buf, size_t cap) {
    if (ds_str_ends_with(disk, "norm.bias")) return 0;
    if (!ms_names(f)) {
        for (size_t j = 0; j < sizeof companions / sizeof *companions; j++) {
            if (!ds_str_ends_with(disk, companions[j])) continue;
            char w[512];
            snprintf(w, sizeof w, "%.*s.weight", (int)(strlen(disk) - strlen(companions[j])), disk);
            if (ds_st_find(f->st, w)) return 0;
        }
        return logical_name(buf, cap, 1, "%s", disk);
    }
    long long l = 0;
    int pre = 0;
    if (sscanf(disk, "model.layers.%lld.%n", &l, &pre) != 1) pre = 0;
    const char *rest = disk + pre;
    static const char ffn[] = "feed_forward.routed_experts.ffn.w";
    if (pre && !strncmp(rest, ffn, sizeof ffn - 1)) { /* stacked: one tensor per expert */
        const char *proj = rest[sizeof ffn - 1] == '1'   ? "gate_proj"
                           : rest[sizeof ffn - 1] == '3' ? "up_proj"
                                                         : "down_proj";
        const ds_st_tensor *t = ds_st_find(f->st, disk);
        if (!t || !ds_str_ends_with(disk, "._layer.weight") || t->ndim != 3) return 0;
        return logical_name(buf, cap, t->shape[0], "model.layers.%lld.mlp.experts.%lld.%s.weight",
                            l, (long long)i, proj);
    }
    if (pre && !strcmp(rest, "attention.lkv2kv_k_nope.weight"))
        return logical_name(buf, cap, 1, "model.layers.%lld.self_attn.kv_b_proj.weight", l);
    if (pre && !strcmp(rest, "attention.lkv2kv_v.weight")) return 0;
    for (size_t j = 0; j < sizeof ms_whole / sizeof *ms_whole; j++)
        if (!strcmp(rest, ms_whole[j][1]))
            return logical_name(buf, cap, 1, "%.*s%s", pre, disk, ms_whole[j][0]);
    for (size_t j = 0; pre && j < sizeof ms_linear / sizeof *ms_linear; j++) {
        size_t n = strlen(ms_linear[j][1]);
        if (strncmp(rest, ms_linear[j][1], n) != 0) continue;
        for (size_t k = 0; k < sizeof ms_suffix / sizeof *ms_suffix; k++)
            if (!strcmp(rest + n, ms_suffix[k][1]))
                return k ? 0
                         : logical_name(buf, cap, 1, "%.*s%s.weight", pre, disk, ms_linear[j][0]);
    }
    return logical_name(buf, cap, 1, "%s", disk);
}

/* A missing tensor, named as the format stores it. */
static int missing(const ds_format *f, const char *name) {
    char buf[512];
    const char *disk = ms_names(f) ? ms_translate(name, buf, sizeof buf) : name;
    return ds_err_set(DS_ERR_MISSING, "missing tensor '%s'", disk);
}

/* ---- small tensors ---- */

void *ds_format_alloc(ds_format *f, size_t bytes) {
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

int ds_find_shaped(const ds_format *f, const char *name, int64_t d0, int64_t d1, int ndim,
                   const ds_st_tensor **out) {
    const ds_st_tensor *t = ds_format_find(f, name);
    if (!t) return missing(f, name);
    name = t->name;
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
    const ds_st_tensor *t = ds_format_find(f, name);
    if (!t) return missing(f, name);
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
    float *v = ds_format_alloc(f, (size_t)n * sizeof *v);
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
    if (!ds_format_find(f, name)) return DS_OK;
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
    int rc = ds_find_shaped(f, name, d0, d1, 2, &s);
    if (rc) return rc;
    if (s->dtype != DS_F32) return bad_dtype(s, "F32");
    *out = s->data;
    if ((uintptr_t)s->data % sizeof(float)) {
        float *copy = ds_format_alloc(f, (size_t)s->nbytes);
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
    float *deq = f32_copy(f, dq, rows, 1), *bias = ds_format_alloc(f, (size_t)rows * sizeof(float));
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
    int rc = ds_find_shaped(f, t->name, rows / 2, cols, 2, &chk);
    if (!rc) rc = row_scales(f, prefix, rows, &out->scale);
    if (!rc) rc = zero_offsets(f, prefix, rows);
    if (rc) return rc;
    size_t rb = (size_t)(cols + 1) / 2;
    uint8_t *d = ds_format_alloc(f, (size_t)rows * rb);
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
    case FMT_MS_W8A8:
    case FMT_MS_A8W4:
        snprintf(name, sizeof name, "%s.input_scale", prefix);
        *out = ds_format_find(f, name) ? S_STATIC : S_DYNAMIC;
        return DS_OK;
    default:
        return ds_err_set(DS_ERR_FORMAT,
                          "%s: tensor '%s' is I8 but no int8 format is declared (config.json's "
                          "quantization_config, a quant_model_description.json) and it has no "
                          "weight_scale",
                          t->file, t->name);
    }
}

/* ---- MindSpore's stacked experts and split kv_b ---- */

/* One routed expert of MindSpore's stacked tensors: w [E, in, X] (X = out: int8, osl /
 * smoothquant; X = out / 2: int4 packed along the output, a8w4) and its weight_scale ([E, out]
 * per channel, or [E, groups, out] as U64 / I64 holding fp32 bits for int4). */
typedef struct {
    const ds_st_tensor *w, *s;
    int64_t e, rows, cols, groups; /* groups 0: per channel int8 */
} ms_expert;

static int ms_expert_find(const ds_format *f, const char *prefix, ms_expert *x) {
    static const char *const proj[][2] = {
        {"gate_proj", "w1"}, {"up_proj", "w3"}, {"down_proj", "w2"}};
    long long l, e;
    char which[16] = "", name[512], got[128];
    if (sscanf(prefix, "model.layers.%lld.mlp.experts.%lld.%15s", &l, &e, which) != 3)
        return ds_err_set(DS_ERR_FORMAT, "'%s' is not a routed expert's projection", prefix);
    const char *w = NULL;
    for (int i = 0; i < 3; i++)
        if (!strcmp(which, proj[i][0])) w = proj[i][1];
    if (!w) return ds_err_set(DS_ERR_FORMAT, "'%s' is not a routed expert's projection", prefix);
    snprintf(name, sizeof name,
             "model.layers.%lld.feed_forward.routed_experts.ffn.%s._layer.weight", l, w);
    if (!(x->w = ds_st_find(f->st, name)))
        return ds_err_set(DS_ERR_MISSING, "missing tensor '%s'", name);
    snprintf(name, sizeof name,
             "model.layers.%lld.feed_forward.routed_experts.ffn.%s._layer.matmul.weight_scale", l,
             w);
    if (!(x->s = ds_st_find(f->st, name)))
        return ds_err_set(DS_ERR_MISSING, "missing tensor '%s'", name);
    const ds_st_tensor *t = x->w, *sc = x->s;
    x->e = e;
    if (t->ndim != 3 || t->dtype != DS_I8 || e < 0 || e >= t->shape[0])
        return ds_err_set(
            DS_ERR_SHAPE, "%s: tensor '%s' is %s %s, expected I8 [experts > %lld, in, out]",
            t->file, t->name, ds_dtype_name(t->dtype), dims_str(t, got, sizeof got), e);
    x->cols = t->shape[1];
    x->groups = sc->ndim == 3 ? sc->shape[1] : 0;
    x->rows = sc->shape[sc->ndim - 1];
    int ok = sc->shape[0] == t->shape[0] &&
             (x->groups ? x->rows == 2 * t->shape[2] && x->cols % x->groups == 0 &&
                              (x->cols / x->groups) % 2 == 0 &&
                              DTYPES_OK(sc->dtype, DS_U64, DS_I64, DS_F32)
                        : sc->ndim == 2 && x->rows == t->shape[2] &&
                              DTYPES_OK(sc->dtype, DS_F32, DS_BF16, DS_F16));
    if (!ok)
        return ds_err_set(DS_ERR_SHAPE,
                          "%s: tensor '%s' is %s %s, which fits neither int8 experts ([E, out] "
                          "float scales for '%s' %s) nor int4 ([E, groups, out = 2 x %lld] U64 "
                          "scales, even groups)",
                          sc->file, sc->name, ds_dtype_name(sc->dtype),
                          dims_str(sc, got, sizeof got), t->name, dims_str(t, name, sizeof name),
                          (long long)t->shape[2]);
    return DS_OK;
}

/* Transposes expert e into ds_mat's [out, in] rows (int4: two input columns per byte, groups of
 * in / groups input columns), then drops its pages: held once, in the kernels' layout. */
static int bind_ms_expert(ds_format *f, const char *prefix, int64_t rows, int64_t cols,
                          ds_mat *out) {
    ms_expert x;
    int rc = ms_expert_find(f, prefix, &x);
    if (rc) return rc;
    if (x.rows != rows || x.cols != cols)
        return ds_err_set(
            DS_ERR_SHAPE,
            "%s: expert %lld of '%s' is [%lld, %lld] (out, in), expected [%lld, %lld]", x.w->file,
            (long long)x.e, x.w->name, (long long)x.rows, (long long)x.cols, (long long)rows,
            (long long)cols);
    const int64_t X = x.w->shape[2], G = x.groups ? x.groups : 1;
    const uint8_t *src = (const uint8_t *)x.w->data + (size_t)(x.e * cols * X);
    size_t rb = x.groups ? (size_t)(cols + 1) / 2 : (size_t)cols;
    uint8_t *d = ds_format_alloc(f, (size_t)rows * rb);
    float *sc = ds_format_alloc(f, (size_t)(rows * G) * sizeof(float));
    if (!d || !sc) return ds_err_set(DS_ERR_NOMEM, "out of memory repacking '%s'", x.w->name);
    for (int64_t k0 = 0; k0 < cols; k0 += 64) /* 64 x 64 tiles: both sides stay in cache */
        for (int64_t n0 = 0; n0 < rows; n0 += 64)
            for (int64_t k = k0; k < cols && k < k0 + 64; k++)
                for (int64_t n = n0; n < rows && n < n0 + 64; n++) {
                    if (!x.groups) {
                        d[(size_t)n * rb + (size_t)k] = src[k * X + n];
                        continue;
                    }
                    uint8_t nib = (uint8_t)((src[k * X + n / 2] >> (n % 2 ? 4 : 0)) & 0xF);
                    d[(size_t)n * rb + (size_t)k / 2] |= (uint8_t)(nib << (k % 2 ? 4 : 0));
                }
    for (int64_t n = 0; n < rows; n++)
        for (int64_t g = 0; g < G; g++)
            sc[n * G + g] = (float)elem(x.s, (x.e * G + g) * rows + n, 1);
    ds_st_drop_range(x.w, src, (uint64_t)(cols * X));
    *out = (ds_mat){.dtype = DS_I8,
                    .rows = rows,
                    .cols = cols,
                    .data = d,
                    .scale = sc,
                    .block_rows = 1,
                    .block_cols = x.groups ? cols / G : cols,
                    .int4 = x.groups > 0};
    return DS_OK;
}

/* kv_b from MindSpore's lkv2kv_k_nope [heads x nope, R] and lkv2kv_v [heads x v, R]: ds_mat's
 * rows are per head the nope rows then the v rows, so the two are interleaved into one copy. */
static int ms_kvb_find(const ds_format *f, const char *prefix, const ds_st_tensor **k,
                       const ds_st_tensor **v) {
    char name[512];
    int pre = (int)(strlen(prefix) - strlen("self_attn.kv_b_proj"));
    snprintf(name, sizeof name, "%.*sattention.lkv2kv_k_nope.weight", pre, prefix);
    if (!(*k = ds_st_find(f->st, name)))
        return ds_err_set(DS_ERR_MISSING, "missing tensor '%s'", name);
    snprintf(name, sizeof name, "%.*sattention.lkv2kv_v.weight", pre, prefix);
    if (!(*v = ds_st_find(f->st, name)))
        return ds_err_set(DS_ERR_MISSING, "missing tensor '%s'", name);
    return DS_OK;
}

static int bind_ms_kvb(ds_format *f, const char *prefix, int64_t rows, int64_t cols, ds_mat *out) {
    const ds_config *c = f->cfg;
    const ds_st_tensor *k, *v, *chk;
    int rc = ms_kvb_find(f, prefix, &k, &v);
    int64_t H = c->n_heads, dn = c->qk_nope_head_dim, dv = c->v_head_dim;
    if (!rc && H <= 0)
        rc = ds_err_set(DS_ERR_FORMAT,
                        "%s: splitting kv_b by heads needs config.json's head counts", k->name);
    if (!rc) rc = ds_find_shaped(f, k->name, H * dn, cols, 2, &chk);
    if (!rc) rc = ds_find_shaped(f, v->name, H * dv, cols, 2, &chk);
    if (rc) return rc;
    if (!DTYPES_OK(k->dtype, DS_F32, DS_F16, DS_BF16) || v->dtype != k->dtype)
        return bad_dtype(v, "the float dtype of lkv2kv_k_nope");
    if (rows != H * (dn + dv))
        return ds_err_set(DS_ERR_SHAPE, "'%s' has %lld rows, expected %lld", prefix,
                          (long long)rows, (long long)(H * (dn + dv)));
    size_t rowb = (size_t)cols * ds_dtype_size(k->dtype);
    unsigned char *d = ds_format_alloc(f, (size_t)rows * rowb);
    if (!d) return ds_err_set(DS_ERR_NOMEM, "out of memory binding '%s'", prefix);
    for (int64_t h = 0; h < H; h++) {
        memcpy(d + (size_t)(h * (dn + dv)) * rowb,
               (const unsigned char *)k->data + (size_t)(h * dn) * rowb, (size_t)dn * rowb);
        memcpy(d + (size_t)(h * (dn + dv) + dn) * rowb,
               (const unsigned char *)v->data + (size_t)(h * dv) * rowb, (size_t)dv * rowb);
    }
    ds_st_drop_pages(k);
    ds_st_drop_pages(v);
    *out = (ds_mat){.dtype = k->dtype, .rows = rows, .cols = cols, .data = d};
    return DS_OK;
}

/* prefix's weight tensor (NULL for MindSpore's stacked experts and split kv_b, which have no
 * tensor of their own) and scheme. */
static int lookup(const ds_format *f, const char *prefix, const ds_st_tensor **t, scheme *s) {
    *t = NULL;
    if (ms_names(f) && strstr(prefix, ".mlp.experts.")) {
        *s = S_MS_EXPERT;
        return DS_OK;
    }
    if (ms_names(f) && ds_str_ends_with(prefix, ".self_attn.kv_b_proj")) {
        *s = S_MS_KVB;
        return DS_OK;
    }
    char name[512];
    snprintf(name, sizeof name, "%s.weight", prefix);
    if (!(*t = ds_format_find(f, name))) return missing(f, name);
    return scheme_of(f, *t, prefix, s);
}

static const char *name_of(scheme s, const ds_st_tensor *t) {
    return s == S_FLOAT ? float_name(t->dtype) : scheme_names[s];
}

/* int4 stacked experts are named apart from int8 ones */
static const char *ms_expert_name(const ds_format *f, const char *prefix) {
    ms_expert x;
    if (ms_expert_find(f, prefix, &x)) return NULL;
    return x.groups ? "w4a8-group (MindSpore stacked experts, transposed at load)"
                    : scheme_names[S_MS_EXPERT];
}

const char *ds_format_scheme(ds_format *f, const char *prefix) {
    const ds_st_tensor *t;
    scheme s;
    if (lookup(f, prefix, &t, &s)) return NULL;
    return s == S_MS_EXPERT ? ms_expert_name(f, prefix) : name_of(s, t);
}

int ds_format_shape(ds_format *f, const char *prefix, int64_t *rows, int64_t *cols) {
    const ds_st_tensor *t, *k, *v;
    scheme s;
    ms_expert x;
    int rc = lookup(f, prefix, &t, &s);
    if (rc) return rc;
    if (s == S_MS_EXPERT) {
        rc = ms_expert_find(f, prefix, &x);
        *rows = x.rows;
        *cols = x.cols;
        return rc;
    }
    if (s == S_MS_KVB) {
        if ((rc = ms_kvb_find(f, prefix, &k, &v))) return rc;
        *rows = k->shape[0] + v->shape[0];
        *cols = k->shape[k->ndim - 1];
        return DS_OK;
    }
    if (t->ndim != 2)
        return ds_err_set(DS_ERR_SHAPE, "%s: tensor '%s' is not 2-D", t->file, t->name);
    *rows = t->shape[0] * (s == S_W4_OUT ? 2 : 1);
    *cols = t->shape[1] * (s == S_W4_IN ? 2 : 1);
    return DS_OK;
}

int ds_format_rope_split(const ds_format *f) {
    return ms_names(f);
}

void ds_format_stored_rows(const ds_format *f, const char *prefix, int64_t rows, int64_t *map) {
    const ds_config *c = f->cfg;
    const int64_t dr = c->qk_rope_head_dim, qk = c->qk_nope_head_dim + dr;
    for (int64_t r = 0; r < rows; r++) map[r] = r;
    int q = ds_str_ends_with(prefix, ".q_b_proj") || ds_str_ends_with(prefix, ".q_proj");
    int kv = ds_str_ends_with(prefix, ".kv_a_proj_with_mqa");
    if (!ds_format_rope_split(f) || (!q && !kv) || dr <= 0) return;
    /* the rope block of each head (q), or the one after the latent (kv_a): Hugging Face's pair
     * (2j, 2j + 1) is stored at j and dr / 2 + j */
    for (int64_t b0 = q ? c->qk_nope_head_dim : c->kv_lora_rank; b0 + dr <= rows;
         b0 += q ? qk : rows)
        for (int64_t i = 0; i < dr; i++) map[b0 + i] = b0 + (i % 2 ? dr / 2 : 0) + i / 2;
}

void ds_format_release(ds_format *f) {
    for (size_t i = 0; i < f->n_owned; i++) ds_free(f->owned[i]);
    f->n_owned = 0;
}

int ds_format_bind(ds_format *f, const char *prefix, int64_t rows, int64_t cols, ds_mat *out,
                   const char **scheme_name) {
    char name[512];
    snprintf(name, sizeof name, "%s.weight", prefix);
    const ds_st_tensor *t;
    scheme s;
    int rc = lookup(f, prefix, &t, &s);
    if (rc) return rc;
    if (s == S_MS_EXPERT || s == S_MS_KVB) {
        if (scheme_name) *scheme_name = s == S_MS_KVB ? scheme_names[s] : ms_expert_name(f, prefix);
        return s == S_MS_EXPERT ? bind_ms_expert(f, prefix, rows, cols, out)
                                : bind_ms_kvb(f, prefix, rows, cols, out);
    }
    if (scheme_name) *scheme_name = name_of(s, t);
    *out = (ds_mat){.dtype = t->dtype, .rows = rows, .cols = cols, .data = t->data};
    const ds_st_tensor *chk;
    const ds_config *c = f->cfg;
    if (s == S_FLOAT) {
        if (!DTYPES_OK(t->dtype, DS_F32, DS_F16, DS_BF16))
            return bad_dtype(t, f->kind == FMT_MODELSLIM ? "a float dtype (FLOAT in "
                                                           "quant_model_description.json)"
                                                         : "F32, F16, BF16, F8_E4M3 or I8");
        return ds_find_shaped(f, name, rows, cols, 2, &chk);
    }
    if (s != S_FP8 && t->dtype != DS_I8)
        return bad_dtype(t, s == S_W4_OUT ? "I8 (int4 pairs) for W4A8_DYNAMIC" : "I8");
    if (s == S_W4_OUT) return bind_w4_out(f, t, prefix, rows, cols, out);
    if (s == S_W4_IN) {
        out->int4 = 1;
        out->block_rows = 1;
        out->block_cols = c->quant_group;
        if ((rc = ds_find_shaped(f, name, rows, (cols + 1) / 2, 2, &chk))) return rc;
        return scale_grid(f, prefix, ".weight_scale", rows,
                          (cols + c->quant_group - 1) / c->quant_group, &out->scale);
    }
    if ((rc = ds_find_shaped(f, name, rows, cols, 2, &chk))) return rc;
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
