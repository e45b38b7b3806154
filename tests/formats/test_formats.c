/* The foreign quantized layouts (FORMATS-SPEC.md: msModelSlim W8A8 and W4A8, MindSpore ptq,
 * smoothquant and a8w4, SGLang blockwise_int8) through the loader, against their dequantized
 * references.
 *
 * For three sources, the golden fixture tiny-a, a make-tiny "small" model (hidden 256,
 * moe_inter 256, q_lora 192: several 128-blocks, partial ones too) and a make-tiny "tiny" one
 * without q_lora (q_proj; fmtgen must refuse the MindSpore-named layouts for it), fmtgen writes
 * each layout (OUT) and its dequantized reference (REF). Then:
 *  1. an independent reader checks what fmtgen wrote against the spec: names (MindSpore's
 *     too), dtypes, shapes, the index (flat map, decoy index) and
 *     quant_model_description.json, the config; every quantized weight dequantized by the
 *     spec's rules (int4 nibbles on either packing, 128-blocks, int4 groups with U64 scales,
 *     stacked transposed experts, rotate-half rope rows, deq_scale / input_scale per tensor
 *     or per channel) is REF's weight and within half a step of the BF16 source; scale rules;
 *     quant_bias's formula; the kv_b split; and on calibration activations the static
 *     activation quantization reproduces x + b within one step and §0's int8 arithmetic
 *     reproduces REF's W x;
 *  2. `dsinfer info OUT` names the detected format;
 *  3. the engine on OUT against the engine on REF at every position of the golden prompts: mean
 *     KL and top-1 agreement within thresholds measured with a margin, and (make-tiny) greedy
 *     continuations that part only where REF's top-1 is a near tie. Until the loader reads a
 *     layout, this part fails, saying so. On tiny-a, whose engine run is the golden reference,
 *     the engine on OUT is also measured against the engine on the BF16 source (fidelity).
 * Without the fixtures the make-tiny half runs on synthetic prompts and the test exits 77
 * (1 under CI=true). */
#include "formats/fmtgen.h"
#include "io/io.h"
#include "kernels/kernels.h"
#include "model/model.h"
#include "testutil.h"

#include <stdlib.h>
#include <unistd.h>

#define MAX_PROMPTS 16
#define GREEDY_STEPS 8

typedef struct {
    int n;
    int32_t *ids[MAX_PROMPTS];
    int64_t len[MAX_PROMPTS];
} prompts;

/* The golden prompts' token ids (tiny-a/golden.json), else three synthetic ones. */
static void load_prompts(const char *fx, prompts *p) {
    char path[4096];
    snprintf(path, sizeof path, "%.4000s/tiny-a/golden.json", fx ? fx : "");
    json_t *g = fx ? json_load_file(path, 0, NULL) : NULL;
    size_t i;
    json_t *pr;
    json_array_foreach(json_object_get(g, "prompts"), i, pr) {
        json_t *ids = json_object_get(pr, "ids");
        if (p->n == MAX_PROMPTS || !json_array_size(ids)) continue;
        p->len[p->n] = (int64_t)json_array_size(ids);
        p->ids[p->n] = malloc((size_t)p->len[p->n] * sizeof(int32_t));
        for (size_t t = 0; t < json_array_size(ids); t++)
            p->ids[p->n][t] = (int32_t)json_integer_value(json_array_get(ids, t));
        p->n++;
    }
    json_decref(g);
    for (int k = 0; p->n < 3; k++) {
        p->len[p->n] = 24;
        p->ids[p->n] = malloc(24 * sizeof(int32_t));
        for (int t = 0; t < 24; t++) p->ids[p->n][t] = (int32_t)((t * 9973 + k * 611 + 5) % 128000);
        p->n++;
    }
}

/* ---- calibration activations of the source (prompt 0), for the static checks ---- */

enum { P_ATTN_NORM, P_Q_A_NORM, P_O_IN, N_POINTS };
static const char *const point_name[N_POINTS] = {"attn_norm_out", "q_a_norm_out", "o_proj_in"};

typedef struct {
    int64_t n_layers;
    float **x; /* [n_layers * N_POINTS]: rows x cols, NULL when not traced */
    int64_t *rows, *cols;
} capture;

static void capture_trace(void *ctx, const char *name, const float *data, int64_t rows,
                          int64_t cols) {
    capture *c = ctx;
    long long l;
    char what[64];
    if (sscanf(name, "layers.%lld.%63s", &l, what) != 2 || l < 0 || l >= c->n_layers) return;
    for (int p = 0; p < N_POINTS; p++) {
        size_t i = (size_t)(l * N_POINTS + p);
        if (strcmp(what, point_name[p]) || c->x[i]) continue;
        c->x[i] = malloc((size_t)(rows * cols) * sizeof(float));
        if (c->x[i]) memcpy(c->x[i], data, (size_t)(rows * cols) * sizeof(float));
        c->rows[i] = rows, c->cols[i] = cols;
    }
}

static void capture_run(const char *src, const prompts *pr, capture *c) {
    ds_model *m;
    if (ds_model_open(src, NULL, &m) != DS_OK) {
        CHECK_MSG(0, "%s: %s", src, ds_err_msg());
        return;
    }
    const ds_config *cfg = ds_model_config(m);
    c->n_layers = cfg->n_layers;
    c->x = calloc((size_t)(c->n_layers * N_POINTS), sizeof *c->x);
    c->rows = calloc((size_t)(c->n_layers * N_POINTS), sizeof *c->rows);
    c->cols = calloc((size_t)(c->n_layers * N_POINTS), sizeof *c->cols);
    float *logits = malloc((size_t)cfg->vocab_size * sizeof *logits);
    ds_kv_cache *kv = NULL;
    ds_model_set_trace(m, capture_trace, c);
    int rc = logits ? ds_kv_open(cfg, pr->len[0], &kv) : DS_ERR_NOMEM;
    if (!rc) rc = ds_model_forward(m, kv, pr->ids[0], pr->len[0], 0, logits, 0);
    CHECK_MSG(rc == DS_OK, "tracing %s: %s", src, ds_err_msg());
    ds_kv_close(kv);
    free(logits);
    ds_model_close(m);
}

static void capture_free(capture *c) {
    for (int64_t i = 0; c->x && i < c->n_layers * N_POINTS; i++) free(c->x[i]);
    free(c->x);
    free(c->rows);
    free(c->cols);
}

/* ---- an independent reader of the written layouts ---- */

/* What the layout's files are called (the brief's decisions). */
static const struct {
    const char *index; /* NULL: one model.safetensors */
    int n_shards;
    const char *shard; /* the first shard's name */
    int description;
    int flat;          /* the index is a bare {name: file} map (a MindSpore *_name_map.json) */
    const char *decoy; /* a float index beside it, naming no "quant" and a missing shard */
} layout[FMTGEN_N_KINDS] = {
    [FMTGEN_MODELSLIM_W8A8] = {"quant_model_weight_w8a8_dynamic.safetensors.index.json", 2,
                               "quant_model_weight_w8a8_dynamic-00001-of-00002.safetensors", 1, 0,
                               NULL},
    [FMTGEN_MODELSLIM_W4A8] = {"quant_model_weight_w8a8_dynamic.safetensors.index.json", 2,
                               "quant_model_weight_w8a8_dynamic-00001-of-00002.safetensors", 1, 0,
                               NULL},
    [FMTGEN_MS_PTQ] = {"quant_model_w8a8.index.json", 1,
                       "quant_model_w8a8-00001-of-00001.safetensors", 0, 0, NULL},
    [FMTGEN_BLOCK_INT8] = {NULL, 1, "model.safetensors", 0, 0, NULL},
    [FMTGEN_MS_SMOOTHQUANT] = {"quant_model.safetensors.index.json", 1,
                               "quant_model-00001-of-00001.safetensors", 0, 0,
                               "model-mtp.index.json"},
    [FMTGEN_MS_A8W4] = {"a8w4_name_map.json", 1, "a8w4-00001-of-00001.safetensors", 0, 1, NULL},
};

static int ms_named(fmtgen_kind k) {
    return k == FMTGEN_MS_SMOOTHQUANT || k == FMTGEN_MS_A8W4;
}

/* V_STK8 / V_GRP4: MindSpore's routed experts, stacked [E, in, out] int8 with BF16 [E, out]
 * scales / int4 pairs [E, in, out / 2] with U64 [E, groups, out] scales. */
typedef enum { V_FLOAT, V_STATIC, V_DYN8, V_DYN4, V_BLOCK, V_STK8, V_GRP4 } vscheme;

/* The layer mix per layout for a decoder layer's projection: the first pattern found wins. */
static const struct {
    const char *pat;
    vscheme s[FMTGEN_N_KINDS];
} mix[] = {
    {".kv_b_proj.", {V_FLOAT, V_FLOAT, V_FLOAT, V_BLOCK, V_FLOAT, V_FLOAT}},
    {".self_attn.", {V_STATIC, V_DYN8, V_STATIC, V_BLOCK, V_STATIC, V_STATIC}},
    {".mlp.experts.", {V_DYN8, V_DYN4, V_DYN8, V_BLOCK, V_STK8, V_GRP4}},
    {".mlp.", {V_DYN8, V_DYN8, V_DYN8, V_BLOCK, V_DYN8, V_DYN8}},
};
static const char *const vscheme_qtype[] = {"FLOAT", "W8A8", "W8A8_DYNAMIC", "W4A8_DYNAMIC", "",
                                            "",      ""};

/* The MindSpore name of Hugging Face name (or projection prefix) hf into out (fmtgen's), and
 * the routed expert it is (*expert, -1 for none); 0 when there is none. */
static int ms_of(const char *hf, char *out, size_t cap, int64_t *expert) {
    long long l, e;
    int end = 0;
    *expert = -1;
    if (sscanf(hf, "model.layers.%lld.mlp.experts.%lld.%n", &l, &e, &end) == 2 && end)
        *expert = e;
    return fmtgen_ms_name(hf, out, cap) == DS_OK;
}

#define MAX_FILES 4
typedef struct {
    fmtgen_kind kind;
    const char *out;
    ds_st_set *file[MAX_FILES], *ref, *src;
    char *fname[MAX_FILES];
    int n_files;
    json_t *index, *desc; /* the parsed index and description (NULL when the layout has none) */
    json_t *map;          /* the index's name -> file map (in index) */
    ds_config cfg;
    json_t *seen; /* the OUT tensors this reader accounted for, as keys */
    const char *qtype;
    double rms_max; /* worst relative RMS error of a static linear's §0 output vs REF's W x */
} vctx;

static double val(const ds_st_tensor *t, int64_t i) {
    const uint8_t *d = t->data;
    float f;
    int32_t v;
    uint32_t u;
    switch (t->dtype) {
    case DS_F32:
        memcpy(&f, d + 4 * i, 4);
        return f;
    case DS_BF16:
        u = (uint32_t)(d[2 * i] | d[2 * i + 1] << 8) << 16;
        memcpy(&f, &u, 4);
        return f;
    case DS_I8:
        return ((const int8_t *)t->data)[i];
    case DS_I32:
        memcpy(&v, d + 4 * i, 4);
        return v;
    default:
        return NAN;
    }
}

static const ds_st_tensor *vfind(const vctx *v, const char *name) {
    if (!v->index) return v->file[0] ? ds_st_find(v->file[0], name) : NULL;
    const char *f = json_string_value(json_object_get(v->map, name));
    for (int i = 0; f && i < v->n_files; i++)
        if (!strcmp(f, v->fname[i])) return v->file[i] ? ds_st_find(v->file[i], name) : NULL;
    return NULL;
}

static ds_st_set *open_in(const char *dir, const char *name) {
    char p[4096];
    snprintf(p, sizeof p, "%.3000s/%.1000s", dir, name);
    ds_st_set *s = NULL;
    CHECK_MSG(ds_st_open_file(p, &s) == DS_OK, "%s", ds_err_msg());
    return s;
}

static json_t *load_in(const char *dir, const char *name) {
    char p[4096];
    snprintf(p, sizeof p, "%.3000s/%.1000s", dir, name);
    json_t *j = json_load_file(p, 0, NULL);
    CHECK_MSG(j != NULL, "%s is missing or not JSON", p);
    return j;
}

/* The decoy float index (§2: a loader takes the one whose name holds "quant"): no "quant" in its
 * name or text, and every shard it names absent, so that a loader picking it fails. */
static void check_decoy(const vctx *v) {
    const char *name = layout[v->kind].decoy;
    json_t *d = load_in(v->out, name), *f;
    char *text = d ? json_dumps(d, 0) : NULL;
    const char *key;
    size_t n = 0;
    CHECK_MSG(!strstr(name, "quant") && text && !strstr(text, "quant"), "%s mentions quant", name);
    json_object_foreach(json_object_get(d, "weight_map"), key, f) {
        char p[4096];
        snprintf(p, sizeof p, "%.3000s/%.1000s", v->out, json_string_value(f));
        CHECK_MSG(access(p, F_OK) != 0, "%s names %s, which exists", name, p);
        n++;
    }
    CHECK_MSG(n > 0, "%s names no tensor", name);
    free(text);
    json_decref(d);
}

/* The name -> file map of the index: its "weight_map" beside a "metadata" object, or the index
 * itself when the layout's is flat (then without a "weight_map" key). */
static json_t *index_map(const vctx *v) {
    if (layout[v->kind].flat) {
        CHECK_MSG(!json_object_get(v->index, "weight_map"), "%s: a weight_map in a flat map",
                  layout[v->kind].index);
        return v->index;
    }
    CHECK_MSG(json_is_object(json_object_get(v->index, "metadata")), "%s: no metadata object",
              layout[v->kind].index);
    return json_object_get(v->index, "weight_map");
}

/* OUT's files through its own index: every entry names a shard holding that tensor, the shards
 * hold nothing else, and the first is named as the layout says. */
static int vopen_out(vctx *v) {
    char p[4096];
    snprintf(p, sizeof p, "%.3000s/model.safetensors.index.json", v->out);
    CHECK_MSG(access(p, F_OK) != 0, "%s must not exist in this layout", p);
    if (!layout[v->kind].index) {
        v->file[v->n_files++] = open_in(v->out, "model.safetensors");
        return v->file[0] != NULL;
    }
    v->index = load_in(v->out, layout[v->kind].index);
    v->map = index_map(v);
    if (layout[v->kind].decoy) check_decoy(v);
    const char *name;
    json_t *f;
    size_t n_map = 0, n_held = 0;
    int first = 0;
    json_object_foreach(v->map, name, f) {
        int i = 0;
        while (i < v->n_files && strcmp(v->fname[i], json_string_value(f))) i++;
        if (i == v->n_files && i < MAX_FILES) {
            v->fname[i] = strdup(json_string_value(f));
            v->file[v->n_files++] = open_in(v->out, v->fname[i]);
        }
        n_map++;
        first |= !strcmp(json_string_value(f), layout[v->kind].shard);
        CHECK_MSG(i < v->n_files && v->file[i] && ds_st_find(v->file[i], name),
                  "index: %s is not in %s", name, json_string_value(f));
    }
    CHECK_MSG(first, "%s: no tensor in %s", layout[v->kind].index, layout[v->kind].shard);
    for (int i = 0; i < v->n_files; i++) n_held += v->file[i] ? ds_st_count(v->file[i]) : 0;
    CHECK_MSG(v->n_files == layout[v->kind].n_shards, "%d shards, expected %d", v->n_files,
              layout[v->kind].n_shards);
    CHECK_MSG(n_held == n_map, "the shards hold %zu tensors, the index lists %zu", n_held, n_map);
    return n_map > 0;
}

/* OUT's tensor prefix+suffix: present with this dtype and shape[0, ndim), and described as
 * v->qtype. */
static const ds_st_tensor *vtensor(vctx *v, const char *prefix, const char *suffix, ds_dtype dt,
                                   int ndim, const int64_t *shape) {
    char name[512], got[128] = "", want[128] = "";
    snprintf(name, sizeof name, "%s%s", prefix, suffix);
    const ds_st_tensor *t = vfind(v, name);
    CHECK_MSG(t != NULL, "%s: %s is missing", fmtgen_kind_name(v->kind), name);
    if (!t) return NULL;
    json_object_set_new(v->seen, name, json_true());
    int ok = t->dtype == dt && t->ndim == ndim;
    for (int d = 0; d < ndim && d < t->ndim; d++) ok &= t->shape[d] == shape[d];
    for (int d = 0; d < t->ndim && d < 3; d++)
        snprintf(got + strlen(got), sizeof got - strlen(got), " %lld", (long long)t->shape[d]);
    for (int d = 0; d < ndim; d++)
        snprintf(want + strlen(want), sizeof want - strlen(want), " %lld", (long long)shape[d]);
    CHECK_MSG(ok, "%s: %s is %s [%s ], expected %s [%s ]", fmtgen_kind_name(v->kind), name,
              ds_dtype_name(t->dtype), got, ds_dtype_name(dt), want);
    if (v->desc) {
        const char *q = json_string_value(json_object_get(v->desc, name));
        CHECK_MSG(q && !strcmp(q, v->qtype), "description of %s: %s, expected %s", name,
                  q ? q : "(none)", v->qtype);
    }
    return ok ? t : NULL;
}

static int same_bytes(const ds_st_tensor *a, const ds_st_tensor *b) {
    return a && b && a->dtype == b->dtype && a->nbytes == b->nbytes &&
           !memcmp(a->data, b->data, a->nbytes);
}

/* A projection [R = out, C = in] as stored in OUT, bound by the spec's names for its scheme. */
typedef struct {
    vscheme s;
    int64_t R, C;
    const ds_st_tensor *w, *scale, *offset, *sbias, *in_scale, *in_off, *qbias, *deq;
    int64_t e;       /* V_STK8 / V_GRP4: its expert's slice of the stacked tensors */
    int64_t group;   /* V_GRP4: input rows per scale */
    int64_t *row;    /* stored row of each Hugging Face row (rope order; malloc'd), NULL: same */
    int bf16;        /* the rule's scale is stored (so rounded) as BF16 */
    int per_channel; /* V_STATIC: input_scale / input_zp per input channel */
} vproj;

static int vbind_hf(vctx *v, vproj *p, const char *prefix) {
    int64_t R = p->R, C = p->C;
    int ptq = v->kind == FMTGEN_MS_PTQ;
    switch (p->s) {
    case V_STATIC: /* §0 / §1 (F32 scale and offset) / §2 (BF16 scale, I8 offset) */
        p->w = vtensor(v, prefix, ".weight", DS_I8, 2, (int64_t[]){R, C});
        p->in_scale = vtensor(v, prefix, ".input_scale", ptq ? DS_BF16 : DS_F32, 1, (int64_t[]){1});
        p->in_off = vtensor(v, prefix, ".input_offset", ptq ? DS_I8 : DS_F32, 1, (int64_t[]){1});
        p->qbias = vtensor(v, prefix, ".quant_bias", DS_I32, 1, (int64_t[]){R});
        p->deq = vtensor(v, prefix, ".deq_scale", DS_F32, 1, (int64_t[]){R});
        return p->w && p->in_scale && p->in_off && p->qbias && p->deq;
    case V_DYN4: /* §1: packed along the output axis, scale_bias per K-slice */
        p->w = vtensor(v, prefix, ".weight", DS_I8, 2, (int64_t[]){R / 2, C});
        p->sbias = vtensor(
            v, prefix, ".scale_bias", DS_F32, 2,
            (int64_t[]){R, ds_str_ends_with(prefix, ".down_proj") && C >= 16 ? C / (C / 16) : 1});
        break;
    case V_BLOCK: /* §5 */
        p->w = vtensor(v, prefix, ".weight", DS_I8, 2, (int64_t[]){R, C});
        p->scale = vtensor(v, prefix, ".weight_scale_inv", DS_F32, 2,
                           (int64_t[]){(R + 127) / 128, (C + 127) / 128});
        return p->w && p->scale;
    default: /* V_DYN8, §1 */
        p->w = vtensor(v, prefix, ".weight", DS_I8, 2, (int64_t[]){R, C});
    }
    p->scale = vtensor(v, prefix, ".weight_scale", DS_F32, 2, (int64_t[]){R, 1});
    p->offset = vtensor(v, prefix, ".weight_offset", DS_F32, 2, (int64_t[]){R, 1});
    return p->w && p->scale && p->offset && (p->s != V_DYN4 || p->sbias);
}

/* §3: MindSpore rotates half, so Hugging Face rope row r0 + i of l2q_proj (each head's last
 * rope rows) and of kv2l (rows kv_lora ..) is stored at r0 + i / 2 when i is even, at
 * r0 + rope / 2 + i / 2 when odd. Malloc'd [R]; NULL for the other projections. */
static int64_t *rope_rows(const vctx *v, const char *prefix, int64_t R) {
    const ds_config *c = &v->cfg;
    int q_b = ds_str_ends_with(prefix, ".q_b_proj");
    if (!q_b && !ds_str_ends_with(prefix, ".kv_a_proj_with_mqa")) return NULL;
    int64_t rope = c->qk_rope_head_dim, blk = q_b ? c->qk_nope_head_dim + rope : R;
    int64_t r0 = q_b ? c->qk_nope_head_dim : c->kv_lora_rank;
    int64_t *row = malloc((size_t)R * sizeof *row);
    for (int64_t i = 0; row && i < R; i++) row[i] = i;
    for (int64_t b = 0; row && b < R; b += blk)
        for (int64_t i = 0; i < rope; i++) row[b + r0 + i] = b + r0 + (i % 2) * (rope / 2) + i / 2;
    return row;
}

/* §3's MindSpore names: static attention with per-tensor (a8w4) or per-channel (smoothquant)
 * input_scale / input_zp, dynamic MLP with BF16 [out] scales, stacked routed experts. */
static int vbind_ms(vctx *v, vproj *p, const char *prefix) {
    int64_t R = p->R, C = p->C, E = v->cfg.n_routed_experts, na;
    char m[512];
    int named = ms_of(prefix, m, sizeof m, &p->e);
    CHECK_MSG(named, "no MindSpore name for %s", prefix);
    if (!named) return 0;
    switch (p->s) {
    case V_STATIC:
        p->per_channel = v->kind == FMTGEN_MS_SMOOTHQUANT;
        na = p->per_channel ? C : 1;
        p->w = vtensor(v, m, "._layer.weight", DS_I8, 2, (int64_t[]){R, C});
        p->in_scale = vtensor(v, m, ".quant_op.input_scale", DS_BF16, 1, (int64_t[]){na});
        p->in_off = vtensor(v, m, ".quant_op.input_zp", DS_I8, 1, (int64_t[]){na});
        p->qbias = vtensor(v, m, "._layer.matmul.quant_bias", DS_I32, 1, (int64_t[]){R});
        p->deq = vtensor(v, m, "._layer.matmul.dequant_scale", DS_F32, 1, (int64_t[]){R});
        p->row = rope_rows(v, prefix, R);
        return p->w && p->in_scale && p->in_off && p->qbias && p->deq;
    case V_STK8:
        p->bf16 = 1;
        p->w = vtensor(v, m, "._layer.weight", DS_I8, 3, (int64_t[]){E, C, R});
        p->scale = vtensor(v, m, "._layer.matmul.weight_scale", DS_BF16, 2, (int64_t[]){E, R});
        break;
    case V_GRP4: /* the brief's test-only group: 256 from 512 inputs, else in / 4 */
        p->group = C >= 512 ? 256 : C / 4;
        p->w = vtensor(v, m, "._layer.weight", DS_I8, 3, (int64_t[]){E, C, R / 2});
        p->scale = vtensor(v, m, "._layer.matmul.weight_scale", DS_U64, 3,
                           (int64_t[]){E, (C + p->group - 1) / p->group, R});
        break;
    default: /* V_DYN8 */
        p->bf16 = 1;
        p->w = vtensor(v, m, "._layer.weight", DS_I8, 2, (int64_t[]){R, C});
        p->scale = vtensor(v, m, "._layer.matmul.weight_scale", DS_BF16, 1, (int64_t[]){R});
    }
    CHECK_MSG((p->s != V_STK8 && p->s != V_GRP4) || (p->e >= 0 && p->e < E),
              "%s: expert %lld of %lld", prefix, (long long)p->e, (long long)E);
    return p->w && p->scale;
}

static int vbind(vctx *v, vproj *p, const char *prefix) {
    v->qtype = vscheme_qtype[p->s];
    return ms_named(v->kind) ? vbind_ms(v, p, prefix) : vbind_hf(v, p, prefix);
}

static int64_t vrow(const vproj *p, int64_t n) {
    return p->row ? p->row[n] : n;
}

/* A signed int4 nibble of byte b: the high one or the low one. */
static int nibble(uint8_t b, int high) {
    int v = high ? b >> 4 : b & 15;
    return v >= 8 ? v - 16 : v;
}

/* The stored integer of element (n, k): int8 [out, in] (row in rope order), the nibble of
 * msModelSlim's output-axis pairs [out / 2, in], or of expert e's slice of MindSpore's stacked
 * [E, in, out] int8 / [E, in, out / 2] int4 pairs (low nibble the even output). */
static int vq(const vproj *p, int64_t n, int64_t k) {
    const uint8_t *b = p->w->data;
    int64_t N = p->R, K = p->C;
    switch (p->s) {
    case V_DYN4:
        return nibble(b[n / 2 * K + k], n % 2);
    case V_STK8:
        return (int8_t)b[(p->e * K + k) * N + n];
    case V_GRP4:
        return nibble(b[(p->e * K + k) * (N / 2) + n / 2], n % 2);
    default:
        return (int8_t)b[vrow(p, n) * K + k];
    }
}

/* A U64 scale: the fp32 whose bits its low word holds; NaN unless the high word is zero. */
static double u64_f32(const ds_st_tensor *t, int64_t i) {
    uint64_t u;
    memcpy(&u, (const uint8_t *)t->data + 8 * i, 8);
    uint32_t lo = (uint32_t)u;
    float f;
    memcpy(&f, &lo, 4);
    return u >> 32 ? NAN : f;
}

/* The stored weight scale of element (n, k) (not for V_STATIC). */
static double vscale(const vproj *p, int64_t n, int64_t k) {
    switch (p->s) {
    case V_BLOCK:
        return val(p->scale, n / 128 * ((p->C + 127) / 128) + k / 128);
    case V_STK8:
        return val(p->scale, p->e * p->R + n);
    case V_GRP4:
        return u64_f32(p->scale,
                       (p->e * ((p->C + p->group - 1) / p->group) + k / p->group) * p->R + n);
    default:
        return val(p->scale, n);
    }
}

/* input_scale and zero point of input column k. */
static double vin(const vproj *p, int64_t k) {
    return val(p->in_scale, p->per_channel ? k : 0);
}
static double vzp(const vproj *p, int64_t k) {
    return val(p->in_off, p->per_channel ? k : 0);
}

/* The real weight of element (n, k) as REF must hold it, and its quantization step. */
static float vweight(const vproj *p, int64_t n, int64_t k, double *step) {
    int q = vq(p, n, k);
    if (p->s == V_STATIC) {
        double in = vin(p, k), d = val(p->deq, vrow(p, n));
        *step = d / in;
        return (float)((double)q * d / in);
    }
    float s = (float)vscale(p, n, k);
    *step = s;
    return (float)q * s;
}

/* The block of (n, k) that one scale covers: rows [n0, n0 + br), columns [k0, k0 + bc). */
static void vblock(const vproj *p, int64_t *br, int64_t *bc) {
    *br = p->s == V_BLOCK ? 128 : 1;
    *bc = p->s == V_BLOCK ? 128 : p->s == V_GRP4 ? p->group : p->C;
}

static float bf16_of(float x) {
    uint32_t u = (uint32_t)ds_f32_to_bf16(x) << 16;
    memcpy(&x, &u, 4);
    return x;
}

/* The scale the spec's rule gives the block at (n, k) from the source weights: max|w| over it
 * (of w * input_scale[k] for per-channel static layers) / qmax, rounded to BF16 when stored so;
 * per-tensor static layers store it times input_scale as deq_scale. */
static float spec_scale(const vproj *p, const ds_st_tensor *src, int64_t n, int64_t k) {
    int64_t br, bc;
    vblock(p, &br, &bc);
    float mx = 0;
    for (int64_t r = n; r < n + br && r < p->R; r++)
        for (int64_t c = k; c < k + bc && c < p->C; c++) {
            float w = (float)val(src, r * p->C + c);
            mx = fmaxf(mx, fabsf(p->per_channel ? w * (float)vin(p, c) : w));
        }
    float s = mx > 0 ? mx / (p->s == V_DYN4 || p->s == V_GRP4 ? 7.0f : 127.0f) : 1.0f;
    if (p->bf16) s = bf16_of(s);
    return p->s == V_STATIC && !p->per_channel ? (float)vin(p, 0) * s : s;
}

/* The stored scales follow the spec's rule, block by block; weight offsets are zero. */
static void check_scales(vctx *v, const vproj *p, const ds_st_tensor *src) {
    int64_t br, bc, bad = 0, bad_off = 0;
    vblock(p, &br, &bc);
    for (int64_t n = 0; n < p->R; n += br)
        for (int64_t k = 0; k < p->C; k += bc) {
            double got = p->s == V_STATIC ? val(p->deq, vrow(p, n)) : vscale(p, n, k);
            bad += (float)got != spec_scale(p, src, n, k);
        }
    for (int64_t n = 0; p->offset && n < p->R; n++) bad_off += val(p->offset, n) != 0;
    CHECK_MSG(!bad, "%s %s: %lld scales break the max|w| / qmax rule", fmtgen_kind_name(v->kind),
              src->name, (long long)bad);
    CHECK_MSG(!bad_off, "%s %s: weight_offset is not zero", fmtgen_kind_name(v->kind), src->name);
}

/* Every element, dequantized by the spec, is REF's weight bit for bit and within half a step of
 * the source. */
static void check_weights(vctx *v, const vproj *p, const ds_st_tensor *src,
                          const ds_st_tensor *ref) {
    int64_t bad_ref = 0, bad_src = 0;
    char first[256] = "";
    for (int64_t n = 0; n < p->R; n++)
        for (int64_t k = 0; k < p->C; k++) {
            double step, w = val(src, n * p->C + k);
            float got = vweight(p, n, k, &step);
            bad_ref += got != (float)val(ref, n * p->C + k);
            if (fabs(got - w) > 0.5 * step * (1 + 1e-4) && !bad_src++)
                snprintf(first, sizeof first, "[%lld, %lld] = %g from %g, step %g", (long long)n,
                         (long long)k, got, w, step);
        }
    CHECK_MSG(!bad_ref, "%s %s: %lld weights differ from REF's", fmtgen_kind_name(v->kind),
              src->name, (long long)bad_ref);
    CHECK_MSG(!bad_src, "%s %s: %lld weights off the source by more than half a step, e.g. %s",
              fmtgen_kind_name(v->kind), src->name, (long long)bad_src, first);
    check_scales(v, p, src);
}

/* §1 scale_bias: 8 * scale[n] * sum of q over each of its K-slices. */
static void check_scale_bias(const vproj *p, const char *prefix) {
    int64_t cols = p->sbias->shape[1], run = p->C / cols, bad = 0;
    for (int64_t n = 0; n < p->R; n++)
        for (int64_t j = 0; j < cols; j++) {
            int64_t sum = 0;
            for (int64_t k = j * run; k < (j + 1) * run; k++) sum += vq(p, n, k);
            double want = 8.0 * val(p->scale, n) * (double)sum, got = val(p->sbias, n * cols + j);
            bad += fabs(got - want) > 1e-5 * fabs(want) + 1e-6 * val(p->scale, n);
        }
    CHECK_MSG(!bad, "%s.scale_bias: %lld entries differ from 8 * s * sum(q)", prefix,
              (long long)bad);
}

/* The norm bias feeding static linear `prefix` (NULL for o_proj) and its captured input. */
static const ds_st_tensor *static_input(vctx *v, const capture *cap, const char *prefix, int64_t l,
                                        const float **x, int64_t *rows) {
    int q_b = ds_str_ends_with(prefix, ".q_b_proj"), o = ds_str_ends_with(prefix, ".o_proj");
    size_t i = (size_t)(l * N_POINTS + (o ? P_O_IN : q_b ? P_Q_A_NORM : P_ATTN_NORM));
    *x = cap->x ? cap->x[i] : NULL;
    *rows = cap->rows ? cap->rows[i] : 0;
    if (o || ms_named(v->kind)) return NULL; /* OSL / smoothquant have no norm bias (§3) */
    char name[512];
    snprintf(name, sizeof name, "model.layers.%lld.%s.bias", (long long)l,
             q_b ? "self_attn.q_a_layernorm" : "input_layernorm");
    return vfind(v, name);
}

/* §0 on the static linear: quant_bias is rint(-W_src b / deq_scale - sum_k zp[k] q[n,k]), zp
 * of the tensor or of input channel k; on the source's activations x (prompt 0, among the
 * calibration prompts), x + b quantized with the file's steps and zero points comes back within
 * one step, and the int8 arithmetic (sum x_q q + quant_bias) deq_scale reproduces REF's W x (the
 * norm bias cancelled). quant_bias and deq_scale are read at the row's stored position. */
static void check_static_math(vctx *v, const vproj *p, const ds_st_tensor *src,
                              const ds_st_tensor *b, const float *x, int64_t rows) {
    double e2 = 0, y2 = 0;
    int64_t bad_qb = 0, bad_step = 0, C = p->C;
    int8_t *xq = malloc((size_t)C);
    for (int64_t n = 0; n < p->R; n++) {
        double bias_f = 0, zq = 0;
        for (int64_t k = 0; k < C; k++) {
            bias_f -= b ? val(src, n * C + k) * val(b, k) : 0;
            zq += vzp(p, k) * vq(p, n, k);
        }
        bad_qb += val(p->qbias, vrow(p, n)) != rint(bias_f / val(p->deq, vrow(p, n)) - zq);
    }
    for (int64_t t = 0; xq && x && t < rows; t++) {
        for (int64_t k = 0; k < C; k++) {
            float xb = x[t * C + k] + (b ? (float)val(b, k) : 0.0f);
            double in = vin(p, k), zp = vzp(p, k), r = rint(xb / in + zp);
            xq[k] = (int8_t)(r < -128 ? -128 : r > 127 ? 127 : r);
            bad_step += fabs((xq[k] - zp) * in - xb) > in * (1 + 1e-5);
        }
        for (int64_t n = 0; n < p->R; n++) {
            double acc = val(p->qbias, vrow(p, n)), yr = 0, step;
            for (int64_t k = 0; k < C; k++) {
                acc += (double)xq[k] * vq(p, n, k);
                yr += (double)vweight(p, n, k, &step) * x[t * C + k];
            }
            double ys = acc * val(p->deq, vrow(p, n));
            e2 += (ys - yr) * (ys - yr), y2 += yr * yr;
        }
    }
    free(xq);
    double rel = y2 > 0 ? sqrt(e2 / y2) : 0;
    v->rms_max = rel > v->rms_max ? rel : v->rms_max;
    CHECK_MSG(x != NULL, "%s: no captured activations", src->name);
    CHECK_MSG(!bad_qb, "%s: %lld quant_bias entries break §0's formula", src->name,
              (long long)bad_qb);
    CHECK_MSG(!bad_step, "%s: %lld activations not within one step after quantization", src->name,
              (long long)bad_step);
    CHECK_MSG(rel < 0.05, "%s: static int8 output vs REF's W x: relative RMS error %.3g", src->name,
              rel);
}

static vscheme expected_scheme(const vctx *v, const ds_st_tensor *t) {
    long long l = -1;
    int end = 0;
    sscanf(t->name, "model.layers.%lld.%n", &l, &end);
    if (t->ndim != 2 || !end || l >= v->cfg.n_layers || !ds_str_ends_with(t->name, ".weight") ||
        ds_str_ends_with(t->name, ".mlp.gate.weight"))
        return V_FLOAT;
    for (size_t i = 0; i < sizeof mix / sizeof mix[0]; i++)
        if (strstr(t->name, mix[i].pat)) return mix[i].s[v->kind];
    return V_FLOAT;
}

/* §3: kv_b [heads * (nope + v), kv_lora] split into attention.lkv2kv_k_nope [heads * nope, .]
 * (each head's first nope rows) and attention.lkv2kv_v [heads * v, .] (its last v rows), the
 * source's bytes. */
static void check_kv_b_split(vctx *v, const ds_st_tensor *t, long long l) {
    int64_t H = v->cfg.n_heads, nope = v->cfg.qk_nope_head_dim, vd = v->cfg.v_head_dim;
    int64_t K = t->shape[1], bad = 0;
    size_t row = (size_t)K * ds_dtype_size(t->dtype);
    char pre[128];
    snprintf(pre, sizeof pre, "model.layers.%lld.attention.lkv2kv_", l);
    const ds_st_tensor *kn =
        vtensor(v, pre, "k_nope.weight", t->dtype, 2, (int64_t[]){H * nope, K});
    const ds_st_tensor *vv = vtensor(v, pre, "v.weight", t->dtype, 2, (int64_t[]){H * vd, K});
    const uint8_t *src = t->data;
    for (int64_t h = 0; kn && vv && h < H; h++) {
        const uint8_t *head = src + (size_t)(h * (nope + vd)) * row;
        bad += memcmp((const uint8_t *)kn->data + (size_t)(h * nope) * row, head,
                      (size_t)nope * row) != 0;
        bad += memcmp((const uint8_t *)vv->data + (size_t)(h * vd) * row, head + nope * row,
                      (size_t)vd * row) != 0;
    }
    CHECK_MSG(!bad, "%s: %lld heads of lkv2kv_k_nope / lkv2kv_v differ from %s",
              fmtgen_kind_name(v->kind), (long long)bad, t->name);
}

/* A FLOAT tensor: the source's in REF, and in OUT under its name there (MindSpore's, kv_b
 * split, MTP layers absent: the count of OUT's tensors sees to that). */
static void check_float(vctx *v, const ds_st_tensor *t, const ds_st_tensor *r) {
    long long l = -1;
    sscanf(t->name, "model.layers.%lld.", &l);
    char name[512];
    int64_t e;
    v->qtype = "FLOAT";
    CHECK_MSG(same_bytes(r, t), "REF's %s is not the source's", t->name);
    if (ms_named(v->kind) && l >= v->cfg.n_layers) return;
    if (ms_named(v->kind) && ds_str_ends_with(t->name, ".self_attn.kv_b_proj.weight")) {
        check_kv_b_split(v, t, l);
        return;
    }
    if (!ms_named(v->kind)) {
        snprintf(name, sizeof name, "%s", t->name);
    } else if (!ms_of(t->name, name, sizeof name, &e)) {
        CHECK_MSG(0, "no MindSpore name for %s", t->name);
        return;
    }
    CHECK_MSG(same_bytes(vtensor(v, name, "", t->dtype, t->ndim, t->shape), t),
              "%s: OUT's %s is not the source's %s", fmtgen_kind_name(v->kind), name, t->name);
}

static void check_tensor(vctx *v, const capture *cap, const ds_st_tensor *t) {
    vproj p = {.s = expected_scheme(v, t), .R = t->shape[0], .C = t->ndim > 1 ? t->shape[1] : 1};
    const ds_st_tensor *r = ds_st_find(v->ref, t->name);
    if (p.s == V_FLOAT) {
        check_float(v, t, r);
        return;
    }
    char prefix[512];
    snprintf(prefix, sizeof prefix, "%.*s", (int)(strlen(t->name) - 7), t->name);
    CHECK_MSG(r && r->dtype == DS_F32 && r->nbytes == (uint64_t)(p.R * p.C) * 4,
              "REF's %s is not F32 [%lld, %lld]", t->name, (long long)p.R, (long long)p.C);
    if (vbind(v, &p, prefix) && r && r->dtype == DS_F32) {
        check_weights(v, &p, t, r);
        if (p.s == V_DYN4) check_scale_bias(&p, prefix);
    }
    if (p.s == V_STATIC && p.w && p.in_scale && p.in_off && p.qbias && p.deq) {
        const float *x;
        int64_t rows;
        long long l = 0;
        sscanf(t->name, "model.layers.%lld.", &l);
        const ds_st_tensor *b = static_input(v, cap, prefix, l, &x, &rows);
        check_static_math(v, &p, t, b, x, rows);
    }
    free(p.row);
}

/* The anti-outlier norm biases of the static layouts (§0): BF16 [dim], FLOAT, OUT only. */
static void check_norm_biases(vctx *v) {
    int stat = v->kind == FMTGEN_MODELSLIM_W8A8 || v->kind == FMTGEN_MS_PTQ;
    v->qtype = "FLOAT";
    for (int64_t l = 0; stat && l < v->cfg.n_layers; l++) {
        char pre[256];
        snprintf(pre, sizeof pre, "model.layers.%lld.input_layernorm", (long long)l);
        vtensor(v, pre, ".bias", DS_BF16, 1, &v->cfg.hidden_size);
        snprintf(pre, sizeof pre, "model.layers.%lld.self_attn.q_a_layernorm", (long long)l);
        if (v->cfg.q_lora_rank) vtensor(v, pre, ".bias", DS_BF16, 1, &v->cfg.q_lora_rank);
    }
}

/* OUT's config: the layout's keys; REF's: none of them; both otherwise the source's. */
static void check_configs(vctx *v, const char *src, const char *ref) {
    json_t *cs = load_in(src, "config.json"), *co = load_in(v->out, "config.json"),
           *cr = load_in(ref, "config.json");
    json_t *qc = json_object_get(co, "quantization_config");
    const char *qm = json_string_value(json_object_get(qc, "quant_method"));
    const char *want[FMTGEN_N_KINDS] = {NULL, NULL, "ptq", "blockwise_int8", "smoothquant", "a8w4"};
    CHECK_MSG(want[v->kind] ? qm && !strcmp(qm, want[v->kind]) : !qc,
              "%s: quantization_config.quant_method %s", fmtgen_kind_name(v->kind),
              qm ? qm : "(none)");
    if (v->kind == FMTGEN_BLOCK_INT8) {
        json_t *bs = json_object_get(qc, "weight_block_size");
        CHECK(json_integer_value(json_array_get(bs, 0)) == 128 &&
              json_integer_value(json_array_get(bs, 1)) == 128 &&
              !strcmp(json_string_value(json_object_get(qc, "activation_scheme")), "dynamic"));
    }
    int ms = layout[v->kind].description;
    const char *mq = json_string_value(json_object_get(co, "moe_quantize"));
    CHECK(!ms || (json_object_get(co, "quantize") && json_object_get(co, "mla_quantize")));
    CHECK((v->kind == FMTGEN_MODELSLIM_W4A8) == (mq && !strcmp(mq, "w4a8_dynamic")));
    CHECK_MSG(!json_object_get(cr, "quantization_config") && !json_object_get(cr, "quantize") &&
                  !json_object_get(cr, "mla_quantize") && !json_object_get(cr, "moe_quantize"),
              "REF's config.json keeps quantization keys");
    CHECK(json_equal(json_object_get(cs, "hidden_size"), json_object_get(cr, "hidden_size")));
    CHECK(json_equal(json_object_get(cs, "hidden_size"), json_object_get(co, "hidden_size")));
    json_decref(cs);
    json_decref(co);
    json_decref(cr);
}

static void check_description_header(const vctx *v) {
    if (!v->desc) return;
    CHECK(!strcmp(json_string_value(json_object_get(v->desc, "version")), "1.0.0"));
    CHECK(!strcmp(json_string_value(json_object_get(v->desc, "model_quant_type")), "W8A8_DYNAMIC"));
    CHECK(json_integer_value(json_object_get(v->desc, "group_size")) == 0 &&
          json_is_integer(json_object_get(v->desc, "group_size")));
    /* every tensor written has an entry: the header's three keys besides */
    size_t n_out = 0;
    for (int i = 0; i < v->n_files; i++) n_out += v->file[i] ? ds_st_count(v->file[i]) : 0;
    CHECK_MSG(json_object_size(v->desc) == n_out + 3, "description: %zu entries for %zu tensors",
              json_object_size(v->desc) - 3, n_out);
}

static void validate(fmtgen_kind kind, const char *src, const char *out, const char *ref,
                     const capture *cap) {
    vctx v = {.kind = kind, .out = out, .seen = json_object()};
    CHECK_MSG(ds_config_load(src, &v.cfg) == DS_OK, "%s", ds_err_msg());
    CHECK_MSG(ds_st_open_dir(src, &v.src) == DS_OK, "%s", ds_err_msg());
    v.ref = open_in(ref, "model.safetensors");
    if (layout[kind].description) v.desc = load_in(out, "quant_model_description.json");
    if (vopen_out(&v) && v.src && v.ref) {
        for (size_t i = 0; i < ds_st_count(v.src); i++) check_tensor(&v, cap, ds_st_at(v.src, i));
        check_norm_biases(&v);
        size_t n_out = 0;
        for (int i = 0; i < v.n_files; i++) n_out += v.file[i] ? ds_st_count(v.file[i]) : 0;
        CHECK_MSG(json_object_size(v.seen) == n_out, "%s: OUT holds %zu tensors, %zu expected",
                  fmtgen_kind_name(kind), n_out, json_object_size(v.seen));
        CHECK_MSG(ds_st_count(v.ref) == ds_st_count(v.src), "REF holds %zu tensors, the source %zu",
                  ds_st_count(v.ref), ds_st_count(v.src));
        check_description_header(&v);
        check_configs(&v, src, ref);
        for (int i = 0; i < 2; i++) {
            const char *tok[] = {"tokenizer.json", "tokenizer_config.json"};
            char a[4096], b[4096];
            snprintf(a, sizeof a, "%.3000s/%s", src, tok[i]);
            snprintf(b, sizeof b, "%.3000s/%s", out, tok[i]);
            CHECK_MSG(access(a, F_OK) || !access(b, F_OK), "%s was not copied", b);
        }
        if (v.rms_max > 0)
            printf("  %-16s static linears: int8 §0 output vs REF's W x, worst relative RMS %.2e\n",
                   fmtgen_kind_name(kind), v.rms_max);
    }
    for (int i = 0; i < v.n_files; i++) {
        ds_st_close(v.file[i]);
        free(v.fname[i]);
    }
    ds_st_close(v.src);
    ds_st_close(v.ref);
    json_decref(v.index);
    json_decref(v.desc);
    json_decref(v.seen);
}

/* ---- dsinfer info ---- */

/* The format name `dsinfer info` prints on its "== format: NAME" line for each layout. */
static const char *const info_format[FMTGEN_N_KINDS] = {
    [FMTGEN_MODELSLIM_W8A8] = "msModelSlim ascend (quant_model_description.json)",
    [FMTGEN_MODELSLIM_W4A8] = "msModelSlim ascend (quant_model_description.json)",
    [FMTGEN_MS_PTQ] = "MindSpore golden-stick ptq (W8A8, Hugging Face names)",
    [FMTGEN_BLOCK_INT8] = "blockwise_int8 (SGLang block-int8)",
    [FMTGEN_MS_SMOOTHQUANT] = "MindSpore golden-stick osl / smoothquant (W8A8, MindSpore names)",
    [FMTGEN_MS_A8W4] = "MindSpore golden-stick a8w4 (int4 routed experts, MindSpore names)",
};

static void check_info(fmtgen_kind kind, const char *out) {
    char cmd[8300];
    snprintf(cmd, sizeof cmd, "'%s' info '%.8000s' 2>&1", DSINFER_BIN, out);
    int st;
    char *o = ds_test_run(cmd, &st);
    const char *line = o ? strstr(o, "== format:") : NULL;
    int len = line ? (int)strcspn(line, "\n") : 0;
    printf("  %-16s dsinfer info (status %d): %.*s\n", fmtgen_kind_name(kind), st, len,
           line ? line : (o ? o : "(no output)"));
    CHECK_MSG(st == 0 && line, "dsinfer info %s: status %d, no '== format:' line", out, st);
    if (line && info_format[kind])
        CHECK_MSG(
            strstr(line, info_format[kind]) && (int)(strstr(line, info_format[kind]) - line) < len,
            "dsinfer info names the format '%.*s', expected '%s'", len, line, info_format[kind]);
    free(o);
}

/* ---- the engine on OUT against the engine on REF ---- */

typedef struct {
    const char *name;
    char dir[4096];
    /* every layout, measured values with a margin (see main) */
    double max_kl, min_top1; /* mean KL(REF || OUT) per position; share of equal top-1 */
    double max_tie;          /* greedy runs may part only where REF's top-1 margin is below this */
    /* the golden fixture (the engine on it is DeepSeek's reference to 1e-5): each layout is
     * also measured against the engine on the BF16 source itself, whose logits are run once
     * per prompt and kept */
    int golden;
    int convert; /* also check `dsinfer quantize` of every layout */
    /* only the static layouts with Hugging Face names (what a model without q_lora adds:
     * q_proj fed by the biased input norm; the MindSpore names refuse it, int4 and blocks are
     * covered by the other sources) */
    int only_hf_static;
    float *src_logits[MAX_PROMPTS];
} source;

/* REF's top-1 margin where the greedy continuations first part; -1 when they never do. */
static double parting_margin(const int32_t *cr, const int32_t *co, const float *lr, int64_t n,
                             int64_t V) {
    for (int s = 0; s < GREEDY_STEPS; s++)
        if (cr[s] != co[s]) return fmtgen_margin(lr + (n - 1 + s) * V, V);
    return -1;
}

/* engine(SRC)'s logits of prompt i, [len][V] (kept in s); NULL when it failed. */
static const float *source_logits(source *s, const prompts *pr, int i) {
    int64_t V;
    int32_t none[1];
    if (!s->src_logits[i]) {
        int rc = fmtgen_run(s->dir, pr->ids[i], pr->len[i], 0, &s->src_logits[i], &V, none);
        CHECK_MSG(rc == DS_OK, "%s: %s", s->dir, ds_err_msg());
    }
    return s->src_logits[i];
}

/* Loose sanity bounds on engine(OUT) against the BF16 golden (KL(SRC || OUT) mean, top-1
 * agreement), so that the measured fidelity the docs quote is a checked figure: int4 routed
 * experts cost more than int8 weights. Measured (tiny-a, 249 positions): see main. */
static void check_fidelity(fmtgen_kind kind, const fmtgen_agreement *f) {
    int w4 = kind == FMTGEN_MODELSLIM_W4A8 || kind == FMTGEN_MS_A8W4;
    double max_kl = w4 ? 1.0 : 0.3, min_top1 = w4 ? 0.25 : 0.5;
    double mkl = f->kl_sum / f->positions, top1 = (double)f->top1_same / f->positions;
    printf("  fidelity %s: top-1 %d/%d (%.1f%%), mean KL %.3g vs the BF16 golden\n",
           fmtgen_kind_name(kind), f->top1_same, f->positions, 100 * top1, mkl);
    CHECK_MSG(mkl <= max_kl && top1 >= min_top1,
              "fidelity %s: mean KL %.3g (<= %.3g wanted), top-1 %.3f (>= %.2f wanted)",
              fmtgen_kind_name(kind), mkl, max_kl, top1, min_top1);
}

static void compare_engine(source *s, fmtgen_kind kind, const char *out, const char *ref,
                           const prompts *pr) {
    fmtgen_agreement a = {0}, fid = {0};
    int same_greedy = 0;
    double worst_tie = -1;
    for (int i = 0; i < pr->n; i++) {
        float *lr = NULL, *lo = NULL;
        int64_t V = 0, Vo = 0;
        int32_t cr[GREEDY_STEPS], co[GREEDY_STEPS];
        int rr = fmtgen_run(ref, pr->ids[i], pr->len[i], GREEDY_STEPS, &lr, &V, cr);
        CHECK_MSG(rr == DS_OK, "REF %s: %s", ref, ds_err_msg());
        int ro = rr ? rr : fmtgen_run(out, pr->ids[i], pr->len[i], GREEDY_STEPS, &lo, &Vo, co);
        if (!rr && ro) {
            CHECK_MSG(0,
                      "LOADER: %s %s does not open or run (expected until the loader reads "
                      "this layout): %s",
                      s->name, fmtgen_kind_name(kind), ds_err_msg());
            printf("  %-16s LOADER: not supported yet: %s\n", fmtgen_kind_name(kind), ds_err_msg());
        }
        const float *ls = !ro && s->golden ? source_logits(s, pr, i) : NULL;
        if (ls) fmtgen_compare(&fid, ls, lo, pr->len[i], V);
        if (!ro) {
            fmtgen_compare(&a, lr, lo, pr->len[i], V);
            double m = parting_margin(cr, co, lr, pr->len[i], V);
            same_greedy += m < 0;
            worst_tie = m > worst_tie ? m : worst_tie;
        }
        free(lr);
        free(lo);
        if (rr || ro) return;
    }
    char what[128];
    snprintf(what, sizeof what, "  %s %s vs REF", s->name, fmtgen_kind_name(kind));
    fmtgen_report(what, &a);
    printf("  %-34s greedy %d tokens: %d/%d prompts agree; REF's margin where they part <= %.3f\n",
           "", GREEDY_STEPS, same_greedy, pr->n, worst_tie < 0 ? 0 : worst_tie);
    double mkl = a.kl_sum / a.positions, top1 = (double)a.top1_same / a.positions;
    CHECK_MSG(mkl <= s->max_kl, "%s %s: mean KL %.3g > %.3g", s->name, fmtgen_kind_name(kind), mkl,
              s->max_kl);
    CHECK_MSG(top1 >= s->min_top1, "%s %s: top-1 agreement %.3f < %.3f", s->name,
              fmtgen_kind_name(kind), top1, s->min_top1);
    CHECK_MSG(worst_tie < s->max_tie,
              "%s %s: greedy continuations part where REF's top-1 leads "
              "by %.3f (>= %.3f)",
              s->name, fmtgen_kind_name(kind), worst_tie, s->max_tie);
    if (fid.positions) check_fidelity(kind, &fid);
}

/* `dsinfer quantize OUT CONV --scheme w8a8` reads the layout as the loader binds it: CONV holds
 * Hugging Face names only, no foreign quantization data, and runs within the source's bounds
 * of REF like OUT itself (its weights are REF's, requantized per channel). */
static void check_convert(source *s, fmtgen_kind kind, const char *out, const char *ref,
                          const prompts *pr) {
    char conv[4300], cmd[9000];
    snprintf(conv, sizeof conv, "%.4200s-w8a8", out);
    snprintf(cmd, sizeof cmd, "'%s' quantize '%s' '%s' --scheme w8a8 2>&1", DSINFER_BIN, out, conv);
    int st;
    char *o = ds_test_run(cmd, &st);
    CHECK_MSG(st == 0, "%s: %s", cmd, o ? o : "");
    free(o);
    ds_st_set *set = NULL;
    if (st || ds_st_open_dir(conv, &set) != DS_OK) return;
    int foreign = 0;
    for (size_t i = 0; i < ds_st_count(set); i++) {
        const char *n = ds_st_at(set, i)->name;
        int bad = strstr(n, "._layer.") || strstr(n, ".input_scale") ||
                  strstr(n, ".input_offset") || strstr(n, "norm.bias") || strstr(n, "quant_bias") ||
                  strstr(n, "tok_embeddings");
        if (bad) printf("  foreign tensor in %s: %s\n", conv, n);
        foreign += bad;
    }
    CHECK_MSG(foreign == 0 && ds_st_find(set, "model.embed_tokens.weight") &&
                  ds_st_find(set, "model.layers.1.mlp.experts.0.down_proj.weight_scale"),
              "%s: %d foreign tensors, or Hugging Face ones missing", conv, foreign);
    ds_st_close(set);
    printf("  %-16s converted by dsinfer quantize --scheme w8a8 (3 prompts):\n",
           fmtgen_kind_name(kind));
    prompts few = *pr; /* the layouts themselves were compared on all of them */
    few.n = pr->n < 3 ? pr->n : 3;
    compare_engine(s, kind, conv, ref, &few);
}

static void run_source(source *s, const char *tmp, const prompts *pr) {
    printf("== %s (%s)\n", s->name, s->dir);
    capture cap = {0};
    capture_run(s->dir, pr, &cap);
    ds_config cfg = {0};
    CHECK_MSG(ds_config_load(s->dir, &cfg) == DS_OK, "%s", ds_err_msg());
    for (int k = 0; k < FMTGEN_N_KINDS; k++) {
        if (s->only_hf_static && k != FMTGEN_MODELSLIM_W8A8 && k != FMTGEN_MS_PTQ) continue;
        char out[4096], ref[4200];
        snprintf(out, sizeof out, "%.3000s/%s-%s", tmp, s->name, fmtgen_kind_name(k));
        snprintf(ref, sizeof ref, "%s-ref", out);
        int rc = fmtgen_write(k, s->dir, out, ref, (const int32_t *const *)pr->ids, pr->len, pr->n);
        /* MindSpore's name for q_proj is unconfirmed (§3): fmtgen refuses to guess it */
        int refused = ms_named(k) && !cfg.q_lora_rank;
        if (refused)
            printf("  %-16s refused without q_lora, as it should be\n", fmtgen_kind_name(k));
        CHECK_MSG(refused ? rc != 0 : rc == 0, "fmtgen %s %s: status %d", s->name,
                  fmtgen_kind_name(k), rc);
        if (rc) continue;
        validate(k, s->dir, out, ref, &cap);
        check_info(k, out);
        compare_engine(s, k, out, ref, pr);
        if (s->convert) check_convert(s, k, out, ref, pr);
    }
    capture_free(&cap);
    for (int i = 0; i < MAX_PROMPTS; i++) free(s->src_logits[i]);
}

/* `dsinfer make-tiny TMP/<name> ARGS` into s->dir; 1 when it worked. */
static int make_tiny(source *s, const char *tmp, const char *args) {
    snprintf(s->dir, sizeof s->dir, "%.3000s/%s", tmp, s->name);
    char cmd[8400];
    snprintf(cmd, sizeof cmd, "'%s' make-tiny '%s' %s 2>&1", DSINFER_BIN, s->dir, args);
    int st;
    char *o = ds_test_run(cmd, &st);
    CHECK_MSG(st == 0, "make-tiny %s: status %d: %s", args, st, o ? o : "");
    free(o);
    return st == 0;
}

int main(void) {
    char *tmp = ds_test_tmpdir();
    CHECK(tmp != NULL);
    if (!tmp) return ds_test_finish("test_formats");
    const char *fx = ds_test_fixtures();
    prompts pr = {0};
    load_prompts(fx, &pr);
    /* Thresholds from the figures measured over the 249 positions of the golden prompts (all
     * six layouts, scalar / AVX2 / AVX-512 tables alike), with a margin:
     *  - tiny-a: mean KL 3.9e-2 .. 8.8e-2, top-1 77 .. 88 %. Its random weights make routing
     *    near-tied (expert gaps down to 7e-4) and its next-token distributions flat, so
     *    activation rounding alone flips experts (one BF16 ulp on half of ptq's activation
     *    steps moved ms-ptq from KL 3.0e-2 / 87 % to 8.8e-2 / 77 %); its greedy runs part
     *    where REF leads by up to 0.69, so they are printed, not checked. Against the engine
     *    on the BF16 source (fidelity): int8 layouts KL 6.7e-2 .. 8.6e-2, top-1 78 .. 82 %;
     *    int4 routed experts KL 0.14 .. 0.16, top-1 58 .. 62 % (check_fidelity's bounds).
     *  - make-tiny small: mean KL 8.7e-3 .. 1.6e-2, top-1 72 .. 83 %, greedy runs part where
     *    REF leads by at most 0.29; on the synthetic prompts (no fixtures) smoothquant's by 0.54:
     *    its per-channel steps, calibrated on 72 tokens, clamp the continuation's activations
     *    (with the ranges widened 1.5 times, 0.10). The engine's own channel-int8 path
     * ("w8a8_int8") on the same model and prompts gives KL 1.15e-2 and top-1 77 %: these are the
     * cost of int8 activations on a model whose top-1 rarely leads by more than 0.5 (18 of 249
     *    positions), not of the loader.
     *  - make-tiny tiny without q_lora (q_proj fed by input_layernorm and its bias; the
     *    MindSpore-named layouts are not written for it): mean KL 1.3e-3 .. 5.6e-3, top-1
     *    90 .. 95 %; on the synthetic prompts (no fixtures) up to 2e-2 and down to 85 %, and
     *    greedy runs part where REF leads by 0.57: the tiny preset's routing is near-tied as
     *    tiny-a's, so greedy runs are printed, not checked.
     * A misread layout (nibble order, scale axis, a dropped norm bias or zero point) gives KL
     * of order 1 and top-1 near 0. */
    source tiny = {
        .name = "tiny-a", .max_kl = 0.15, .min_top1 = 0.7, .max_tie = INFINITY, .golden = 1};
    source small = {
        .name = "small", .max_kl = 0.03, .min_top1 = 0.65, .max_tie = 0.6, .convert = 1};
    source no_q_lora = {.name = "no-q-lora",
                        .max_kl = 0.05,
                        .min_top1 = 0.75,
                        .max_tie = INFINITY,
                        .only_hf_static = 1};
    if (fx) {
        snprintf(tiny.dir, sizeof tiny.dir, "%.4000s/tiny-a", fx);
        run_source(&tiny, tmp, &pr);
    }
    if (make_tiny(&small, tmp, "--preset small --seed 7")) run_source(&small, tmp, &pr);
    if (make_tiny(&no_q_lora, tmp, "--preset tiny --seed 3 --no-q-lora --no-tokenizer"))
        run_source(&no_q_lora, tmp, &pr);
    for (int i = 0; i < pr.n; i++) free(pr.ids[i]);
    ds_test_rmtree(tmp);
    free(tmp);
    if (!fx && !ds_test_failures)
        return ds_test_skip_or_fail("golden fixtures missing (the make-tiny part ran)");
    return ds_test_finish("test_formats");
}
