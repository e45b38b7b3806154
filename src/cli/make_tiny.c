/* `dsinfer make-tiny OUT_DIR`: writes a random checkpoint with the exact DeepSeek-V3 Hugging Face
 * layout (config.json, sharded safetensors + model.safetensors.index.json, the real tokenizer),
 * small enough to run anywhere. It is the demo model and the test bed of every loader path: BF16
 * or the official FP8 block-scaled form, q_lora or plain q_proj, one shard or many.
 *
 * Determinism. Every tensor's values depend only on (--seed, tensor name): its generator is
 * splitmix64 (Steele, Lea, Flood 2014; the seeding generator of xoshiro) started from
 * splitmix64(seed ^ FNV-1a-64(name)), and element i is the i-th output in row-major order, its
 * top 24 bits mapped to a uniform u in [-1, 1). So the same seed gives the same weight in a BF16
 * and an FP8 run, with or without --no-q-lora, in any sharding, and tests can regenerate it.
 *
 * Values (uniform, so the std is amplitude / sqrt(3)):
 *   embed_tokens          std 1                      (like a trained embedding row)
 *   projections, lm_head  std 1 / sqrt(fan_in)       (fan_in = the input dimension, cols)
 *   norms                 1 + 0.2 u                  (std ~0.12 around 1)
 *   e_score_correction_bias 0.05 u (F32)             (moves expert selection, not the weights)
 * Every value is rounded to BF16 first (round-to-nearest-even). With --dtype fp8 the projections
 * inside the layers, except the router mlp.gate, are then quantised the way DeepSeek's
 * release is: per 128 x 128 block scale_inv = max|w| / 448 (F32), fp8 = e4m3fn(w / scale_inv)
 * rounded to nearest even and saturated; the real weight is fp8 x scale_inv. With --dtype
 * w8a8 / w4a8 the same projections are written in dsinfer quantize's layouts, their integers
 * drawn directly, uniform and symmetric around 0, with the scale that gives the real weight the
 * BF16 path's std: full-width slices for bench-layer without a BF16 detour.
 *
 * Memory. Tensors are generated and written one at a time, so the peak is the largest tensor
 * (embed_tokens / lm_head: vocab x hidden BF16, 265 MB for the medium preset) plus stdio buffers.
 *
 * Crash safety. Everything is written into OUT_DIR.tmp-XXXXXX next to OUT_DIR and renamed to
 * OUT_DIR only at the end, so a directory named OUT_DIR is always complete. */
#include "cli/cli.h"
#include "core/core.h"
#include "io/io.h"
#include "kernels/kernels.h"

#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* ---- presets ---------------------------------------------------------------------------- */
typedef struct {
    const char *name;
    int64_t hidden, layers, heads, q_lora, kv_lora, rope, nope, v;
    int64_t experts, topk, n_group, topk_group, moe_inter, inter;
} mt_preset;

static const mt_preset presets[] = {
    {"tiny", 64, 3, 4, 32, 32, 8, 16, 16, 8, 2, 2, 1, 32, 128},
    {"small", 256, 4, 8, 192, 128, 32, 64, 64, 16, 4, 1, 1, 256, 1024},
    {"medium", 1024, 8, 16, 384, 256, 64, 128, 128, 32, 4, 4, 2, 512, 2048},
    /* tiny with 40 heads: attention's groups of 16 heads, a partial one included */
    {"wide", 128, 2, 40, 64, 32, 8, 16, 16, 8, 2, 2, 1, 32, 128},
    /* DeepSeek-R1 / V3 at full width (61 layers: take a slice with --layers, bench-layer) */
    {"r1", 7168, 61, 128, 1536, 512, 64, 128, 128, 256, 8, 8, 4, 2048, 18432},
};

/* Fixed for every preset: DeepSeek-V3's own values. */
#define MT_VOCAB 129280
#define MT_N_SHARED 1
#define MT_FIRST_DENSE 1
#define MT_BLOCK 128 /* fp8 weight_block_size; the W4A8 group */

/* ---- the deterministic generator ---------------------------------------------------------- */
static uint64_t splitmix64(uint64_t *s) {
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static uint64_t tensor_state(uint64_t seed, const char *name) {
    uint64_t h = 0xCBF29CE484222325ull; /* FNV-1a 64 */
    for (const unsigned char *p = (const unsigned char *)name; *p; p++)
        h = (h ^ *p) * 0x100000001B3ull;
    uint64_t s = seed ^ h;
    return splitmix64(&s);
}

/* Uniform in [-1, 1) with 24 bits: exact in f32. */
static float next_u(uint64_t *s) {
    return (float)(int32_t)((splitmix64(s) >> 40) - (1u << 23)) * (1.0f / (float)(1u << 23));
}

typedef enum { MT_EMBED, MT_LINEAR, MT_NORM, MT_BIAS } mt_kind;

/* The values of one tensor before storage rounding: base + amp * u. */
static void kind_params(mt_kind k, int64_t fan_in, float *base, float *amp) {
    *base = 0.0f;
    *amp = 0.0f;
    switch (k) {
    case MT_EMBED:
        *base = 0.0f;
        *amp = sqrtf(3.0f);
        break;
    case MT_LINEAR:
        *base = 0.0f;
        *amp = sqrtf(3.0f / (float)fan_in);
        break;
    case MT_NORM:
        *base = 1.0f;
        *amp = 0.2f;
        break;
    case MT_BIAS:
        *base = 0.0f;
        *amp = 0.05f;
        break;
    }
}

/* ---- the tensor plan ------------------------------------------------------------------------ */
typedef struct {
    char name[160];
    ds_dtype dtype; /* as stored */
    int ndim;
    int64_t shape[2];
    mt_kind kind;
    int role; /* 0 plain, 1 quantized weight (the next entry is its scale), 2 that scale */
    uint64_t nbytes;
    int shard; /* 0-based */
} mt_tensor;

typedef struct {
    mt_tensor *t;
    size_t n, cap;
} mt_plan;

typedef enum { MT_BF16, MT_FP8, MT_W8A8, MT_W4A8 } mt_dtype;
static const char *const mt_dtype_names[] = {"bf16", "fp8", "w8a8", "w4a8"};

typedef struct {
    const mt_preset *p;
    uint64_t seed;
    mt_dtype dtype;
    int q_lora;
    int64_t layers;
} mt_opts;

static int plan_push(mt_plan *pl, const char *name, ds_dtype dt, int ndim, int64_t d0, int64_t d1,
                     mt_kind kind, int role) {
    if (pl->n == pl->cap) {
        size_t cap = pl->cap ? 2 * pl->cap : 256;
        mt_tensor *nt = realloc(pl->t, cap * sizeof *nt);
        if (!nt) return ds_err_set(DS_ERR_NOMEM, "out of memory");
        pl->t = nt;
        pl->cap = cap;
    }
    mt_tensor *t = &pl->t[pl->n++];
    memset(t, 0, sizeof *t);
    snprintf(t->name, sizeof t->name, "%s", name);
    t->dtype = dt;
    t->ndim = ndim;
    t->shape[0] = d0;
    t->shape[1] = d1;
    t->kind = kind;
    t->role = role;
    t->nbytes = (uint64_t)d0 * (uint64_t)(ndim == 2 ? d1 : 1) * ds_dtype_size(dt);
    return DS_OK;
}

/* A projection [out, in] inside a layer: BF16, or the stored form + its scales when quantising
 * (FP8: weight_scale_inv per 128 x 128 block; W8A8 / W4A8: dsinfer quantize's layouts,
 * weight_scale per row / per 128 inputs of a row, two int4 a byte). */
static int plan_proj(mt_plan *pl, const mt_opts *o, const char *name, int64_t out, int64_t in) {
    const int64_t groups = (in + MT_BLOCK - 1) / MT_BLOCK;
    char sname[200];
    int rc;
    switch (o->dtype) {
    case MT_BF16:
        return plan_push(pl, name, DS_BF16, 2, out, in, MT_LINEAR, 0);
    case MT_FP8:
        rc = plan_push(pl, name, DS_F8_E4M3, 2, out, in, MT_LINEAR, 1);
        snprintf(sname, sizeof sname, "%s_scale_inv", name);
        return rc ? rc
                  : plan_push(pl, sname, DS_F32, 2, (out + MT_BLOCK - 1) / MT_BLOCK, groups,
                              MT_LINEAR, 2);
    default:
        rc = plan_push(pl, name, DS_I8, 2, out, o->dtype == MT_W8A8 ? in : (in + 1) / 2, MT_LINEAR,
                       1);
        snprintf(sname, sizeof sname, "%s_scale", name);
        return rc ? rc
                  : plan_push(pl, sname, DS_F32, 2, out, o->dtype == MT_W8A8 ? 1 : groups,
                              MT_LINEAR, 2);
    }
}

/* Every tensor in Hugging Face's order: embedding, layers 0..L-1, final norm, lm_head. */
static int build_plan(const mt_opts *o, mt_plan *pl) {
    const mt_preset *p = o->p;
    const int64_t H = p->hidden, nh = p->heads, qk = p->nope + p->rope;
    char n[160];
    int rc = plan_push(pl, "model.embed_tokens.weight", DS_BF16, 2, MT_VOCAB, H, MT_EMBED, 0);
    for (int64_t l = 0; !rc && l < o->layers; l++) {
#define NAME(...) (snprintf(n, sizeof n, __VA_ARGS__), n)
#define L_(suffix) NAME("model.layers.%lld." suffix, (long long)l)
        rc = rc ? rc : plan_push(pl, L_("input_layernorm.weight"), DS_BF16, 1, H, 0, MT_NORM, 0);
        if (o->q_lora) {
            rc = rc ? rc : plan_proj(pl, o, L_("self_attn.q_a_proj.weight"), p->q_lora, H);
            rc = rc ? rc
                    : plan_push(pl, L_("self_attn.q_a_layernorm.weight"), DS_BF16, 1, p->q_lora, 0,
                                MT_NORM, 0);
            rc = rc ? rc : plan_proj(pl, o, L_("self_attn.q_b_proj.weight"), nh * qk, p->q_lora);
        } else {
            rc = rc ? rc : plan_proj(pl, o, L_("self_attn.q_proj.weight"), nh * qk, H);
        }
        rc = rc ? rc
                : plan_proj(pl, o, L_("self_attn.kv_a_proj_with_mqa.weight"), p->kv_lora + p->rope,
                            H);
        rc = rc ? rc
                : plan_push(pl, L_("self_attn.kv_a_layernorm.weight"), DS_BF16, 1, p->kv_lora, 0,
                            MT_NORM, 0);
        rc = rc ? rc
                : plan_proj(pl, o, L_("self_attn.kv_b_proj.weight"), nh * (p->nope + p->v),
                            p->kv_lora);
        rc = rc ? rc : plan_proj(pl, o, L_("self_attn.o_proj.weight"), H, nh * p->v);
        rc =
            rc ? rc
               : plan_push(pl, L_("post_attention_layernorm.weight"), DS_BF16, 1, H, 0, MT_NORM, 0);
        if (l < MT_FIRST_DENSE) {
            rc = rc ? rc : plan_proj(pl, o, L_("mlp.gate_proj.weight"), p->inter, H);
            rc = rc ? rc : plan_proj(pl, o, L_("mlp.up_proj.weight"), p->inter, H);
            rc = rc ? rc : plan_proj(pl, o, L_("mlp.down_proj.weight"), H, p->inter);
            continue;
        }
        /* the router stays BF16 (and its bias F32) in the official FP8 release too */
        rc =
            rc ? rc : plan_push(pl, L_("mlp.gate.weight"), DS_BF16, 2, p->experts, H, MT_LINEAR, 0);
        rc = rc ? rc
                : plan_push(pl, L_("mlp.gate.e_score_correction_bias"), DS_F32, 1, p->experts, 0,
                            MT_BIAS, 0);
        for (int64_t e = 0; !rc && e < p->experts; e++) {
#define E_(proj) NAME("model.layers.%lld.mlp.experts.%lld." proj, (long long)l, (long long)e)
            rc = rc ? rc : plan_proj(pl, o, E_("gate_proj.weight"), p->moe_inter, H);
            rc = rc ? rc : plan_proj(pl, o, E_("up_proj.weight"), p->moe_inter, H);
            rc = rc ? rc : plan_proj(pl, o, E_("down_proj.weight"), H, p->moe_inter);
#undef E_
        }
        const int64_t si = p->moe_inter * MT_N_SHARED;
        rc = rc ? rc : plan_proj(pl, o, L_("mlp.shared_experts.gate_proj.weight"), si, H);
        rc = rc ? rc : plan_proj(pl, o, L_("mlp.shared_experts.up_proj.weight"), si, H);
        rc = rc ? rc : plan_proj(pl, o, L_("mlp.shared_experts.down_proj.weight"), H, si);
#undef L_
#undef NAME
    }
    rc = rc ? rc : plan_push(pl, "model.norm.weight", DS_BF16, 1, H, 0, MT_NORM, 0);
    rc = rc ? rc : plan_push(pl, "lm_head.weight", DS_BF16, 2, MT_VOCAB, H, MT_LINEAR, 0);
    return rc;
}

/* Greedy sharding in order; an fp8 weight and its scale stay in one shard. Returns the count. */
static int assign_shards(mt_plan *pl, uint64_t shard_bytes) {
    int shard = 0;
    uint64_t cur = 0;
    for (size_t i = 0; i < pl->n; i++) {
        uint64_t b = pl->t[i].nbytes;
        if (pl->t[i].role == 1 && i + 1 < pl->n) b += pl->t[i + 1].nbytes;
        if (pl->t[i].role != 2 && cur > 0 && cur + b > shard_bytes) {
            shard++;
            cur = 0;
        }
        pl->t[i].shard = shard;
        if (pl->t[i].role != 2) cur += b;
    }
    return shard + 1;
}

/* ---- generating and writing ---------------------------------------------------------------- */
typedef struct {
    void *buf; /* scratch for one tensor's stored bytes */
    size_t buf_cap;
    float *f; /* scratch floats (fp8 path) */
    size_t f_cap;
    float *scale; /* scale grid of the last fp8 weight, written as the next tensor */
    size_t scale_cap;
} mt_scratch;

static int grow(void **p, size_t *cap, size_t need) {
    if (need <= *cap) return 1;
    void *np = realloc(*p, need);
    if (!np) return 0;
    *p = np;
    *cap = need;
    return 1;
}

static float bf16_round(float x) {
    uint32_t u = (uint32_t)ds_f32_to_bf16(x) << 16;
    float r;
    memcpy(&r, &u, sizeof r);
    return r;
}

/* Fills sc->buf with the stored bytes of t (for role 2, copies the scales kept by role 1). */
static int gen_tensor(const mt_opts *o, const mt_tensor *t, mt_scratch *sc) {
    if (!grow(&sc->buf, &sc->buf_cap, t->nbytes ? (size_t)t->nbytes : 1))
        return ds_err_set(DS_ERR_NOMEM, "out of memory generating '%s' (%llu bytes)", t->name,
                          (unsigned long long)t->nbytes);
    if (t->role == 2) {
        memcpy(sc->buf, sc->scale, (size_t)t->nbytes);
        return DS_OK;
    }
    const int64_t rows = t->shape[0], cols = t->ndim == 2 ? t->shape[1] : 1;
    const uint64_t numel = (uint64_t)rows * (uint64_t)cols;
    uint64_t st = tensor_state(o->seed, t->name);
    float base, amp;
    kind_params(t->kind, t->ndim == 2 ? cols : 1, &base, &amp);

    if (t->dtype == DS_BF16) {
        uint16_t *d = sc->buf;
        for (uint64_t i = 0; i < numel; i++) d[i] = ds_f32_to_bf16(base + amp * next_u(&st));
        return DS_OK;
    }
    if (t->dtype == DS_F32) {
        float *d = sc->buf;
        for (uint64_t i = 0; i < numel; i++) d[i] = base + amp * next_u(&st);
        return DS_OK;
    }
    if (t->dtype == DS_I8) {
        /* drawn as integers, a byte of a generator output each: uniform and symmetric around 0
         * (int8: -127..127 and one more 0; int4: -7..7), so that no layer adds a common offset
         * that would send every token to the same experts; the scale gives the real weight the
         * BF16 path's std (amp / sqrt(3)) */
        const int w4 = o->dtype == MT_W4A8;
        const int64_t in = w4 ? (int64_t)t->shape[1] * 2 : cols; /* even for every preset */
        const int64_t ns = w4 ? (in + MT_BLOCK - 1) / MT_BLOCK : 1;
        float a;
        kind_params(t->kind, in, &base, &a);
        if (!grow((void **)&sc->scale, &sc->scale_cap, (size_t)(rows * ns) * sizeof(float)))
            return ds_err_set(DS_ERR_NOMEM, "out of memory generating '%s'", t->name);
        /* std of the codes: int8 sqrt(2 x sum k^2, k = 1..127 / 256) = 73.2, int4 sqrt(2 x
         * sum k^2, k = 1..7 / 15) = 4.32 */
        const float code_std = w4 ? 4.3205f : 73.194f;
        for (int64_t i = 0; i < rows * ns; i++) sc->scale[i] = a / sqrtf(3.0f) / code_std;
        uint8_t *q = sc->buf;
        uint64_t r = 0;
        for (uint64_t i = 0; i < numel; i++) {
            if (!w4) {
                if (i % 8 == 0) r = splitmix64(&st);
                q[i] = (uint8_t)r == 0x80 ? 0 : (uint8_t)r;
                r >>= 8;
                continue;
            }
            uint8_t nib[2];
            for (int h = 0; h < 2; h++) {
                if ((2 * i + (uint64_t)h) % 8 == 0) r = splitmix64(&st);
                nib[h] = (uint8_t)((int)((uint8_t)r % 15) - 7) & 0xF;
                r >>= 8;
            }
            q[i] = (uint8_t)(nib[0] | nib[1] << 4);
        }
        return DS_OK;
    }
    DS_ASSERT(t->dtype == DS_F8_E4M3 && t->role == 1 && t->ndim == 2);
    /* the BF16 weights, then per-block max|w| / 448, then e4m3 of w / scale */
    const int64_t br = (rows + MT_BLOCK - 1) / MT_BLOCK, bc = (cols + MT_BLOCK - 1) / MT_BLOCK;
    if (!grow((void **)&sc->f, &sc->f_cap, numel * sizeof(float)) ||
        !grow((void **)&sc->scale, &sc->scale_cap, (size_t)(br * bc) * sizeof(float)))
        return ds_err_set(DS_ERR_NOMEM, "out of memory generating '%s'", t->name);
    float *w = sc->f; /* [rows, cols] */
    for (uint64_t i = 0; i < numel; i++) w[i] = bf16_round(base + amp * next_u(&st));
    uint8_t *q = sc->buf;
    for (int64_t bi = 0; bi < br; bi++) {
        for (int64_t bj = 0; bj < bc; bj++) {
            const int64_t r0 = bi * MT_BLOCK, r1 = r0 + MT_BLOCK < rows ? r0 + MT_BLOCK : rows;
            const int64_t c0 = bj * MT_BLOCK, c1 = c0 + MT_BLOCK < cols ? c0 + MT_BLOCK : cols;
            float mx = 0.0f;
            for (int64_t r = r0; r < r1; r++)
                for (int64_t c = c0; c < c1; c++) mx = fmaxf(mx, fabsf(w[r * cols + c]));
            const float s = mx > 0.0f ? mx / 448.0f : 1.0f;
            sc->scale[bi * bc + bj] = s;
            for (int64_t r = r0; r < r1; r++)
                for (int64_t c = c0; c < c1; c++)
                    q[r * cols + c] = ds_f32_to_e4m3(w[r * cols + c] / s);
        }
    }
    return DS_OK;
}

static int write_shards(const char *dir, const mt_opts *o, mt_plan *pl, int n_shards) {
    mt_scratch sc = {0};
    ds_progress pb;
    uint64_t total = 0;
    for (size_t i = 0; i < pl->n; i++) total += pl->t[i].nbytes;
    ds_progress_begin(&pb, "make-tiny", total);
    int rc = DS_OK;
    size_t i = 0;
    for (int s = 0; !rc && s < n_shards; s++) {
        char fname[64];
        ds_cli_shard_name(fname, sizeof fname, s, n_shards);
        char *path = ds_cli_path_join(dir, fname);
        if (!path) {
            rc = ds_err_set(DS_ERR_NOMEM, "out of memory");
            break;
        }
        ds_st_writer *w = NULL;
        rc = ds_st_writer_open(path, &w);
        size_t j = i;
        for (; !rc && j < pl->n && pl->t[j].shard == s; j++)
            rc = ds_st_writer_add(w, pl->t[j].name, pl->t[j].dtype, pl->t[j].ndim, pl->t[j].shape);
        if (!rc) rc = ds_st_writer_begin_data(w);
        for (size_t k = i; !rc && k < j; k++) {
            rc = gen_tensor(o, &pl->t[k], &sc);
            if (!rc) rc = ds_st_writer_data(w, sc.buf, pl->t[k].nbytes);
            ds_progress_add(&pb, pl->t[k].nbytes);
        }
        if (w) {
            int rc2 = ds_st_writer_close(w);
            if (!rc) rc = rc2;
        }
        free(path);
        i = j;
    }
    ds_progress_end(&pb);
    free(sc.buf);
    free(sc.f);
    free(sc.scale);
    return rc;
}

/* JSON files: sorted keys, two-space indent, like Python's json.dump(indent=2, sort_keys=True). */
static int dump_json(json_t *j, const char *dir, const char *name) {
    char *path = ds_cli_path_join(dir, name);
    if (!path) return ds_err_set(DS_ERR_NOMEM, "out of memory");
    int rc = DS_OK;
    if (!j || json_dump_file(j, path, JSON_INDENT(2) | JSON_SORT_KEYS | JSON_REAL_PRECISION(15)))
        rc = ds_err_set(DS_ERR_IO, "%s: cannot write: %s", path, strerror(errno));
    free(path);
    return rc;
}

static int write_index(const char *dir, const mt_plan *pl, int n_shards) {
    json_t *map = json_object();
    uint64_t total = 0;
    for (size_t i = 0; map && i < pl->n; i++) {
        char fname[64];
        ds_cli_shard_name(fname, sizeof fname, pl->t[i].shard, n_shards);
        if (json_object_set_new(map, pl->t[i].name, json_string(fname))) {
            json_decref(map);
            map = NULL;
        }
        total += pl->t[i].nbytes;
    }
    return ds_cli_write_index(dir, map, total);
}

/* config.json with the keys and values of deepseek-ai/DeepSeek-V3's, dimensions from the preset. */
static json_t *make_config(const mt_opts *o) {
    const mt_preset *p = o->p;
    json_t *c = json_object();
    if (!c) return NULL;
    int bad = 0;
#define SET(k, v) bad |= json_object_set_new(c, k, v)
#define INT(v) json_integer((json_int_t)(v))
    SET("architectures", json_pack("[s]", "DeepseekV3ForCausalLM"));
    SET("attention_bias", json_false());
    SET("attention_dropout", json_real(0.0));
    SET("auto_map",
        json_pack("{s:s, s:s, s:s}", "AutoConfig", "configuration_deepseek.DeepseekV3Config",
                  "AutoModel", "modeling_deepseek.DeepseekV3Model", "AutoModelForCausalLM",
                  "modeling_deepseek.DeepseekV3ForCausalLM"));
    SET("aux_loss_alpha", json_real(0.001));
    SET("bos_token_id", INT(0));
    SET("eos_token_id", INT(1));
    SET("ep_size", INT(1));
    SET("first_k_dense_replace", INT(MT_FIRST_DENSE));
    SET("hidden_act", json_string("silu"));
    SET("hidden_size", INT(p->hidden));
    SET("initializer_range", json_real(0.02));
    SET("intermediate_size", INT(p->inter));
    SET("kv_lora_rank", INT(p->kv_lora));
    SET("max_position_embeddings", INT(163840));
    SET("model_type", json_string("deepseek_v3"));
    SET("moe_intermediate_size", INT(p->moe_inter));
    SET("moe_layer_freq", INT(1));
    SET("n_group", INT(p->n_group));
    SET("n_routed_experts", INT(p->experts));
    SET("n_shared_experts", INT(MT_N_SHARED));
    SET("norm_topk_prob", json_true());
    SET("num_attention_heads", INT(p->heads));
    SET("num_experts_per_tok", INT(p->topk));
    SET("num_hidden_layers", INT(o->layers));
    SET("num_key_value_heads", INT(p->heads));
    SET("num_nextn_predict_layers", INT(0));
    SET("pretraining_tp", INT(1));
    SET("q_lora_rank", o->q_lora ? INT(p->q_lora) : json_null());
    SET("qk_nope_head_dim", INT(p->nope));
    SET("qk_rope_head_dim", INT(p->rope));
    if (o->dtype == MT_FP8)
        SET("quantization_config",
            json_pack("{s:s, s:s, s:s, s:[i,i]}", "activation_scheme", "dynamic", "fmt", "e4m3",
                      "quant_method", "fp8", "weight_block_size", MT_BLOCK, MT_BLOCK));
    if (o->dtype == MT_W8A8)
        SET("quantization_config",
            json_pack("{s:s, s:s}", "activation_scheme", "dynamic", "quant_method", "w8a8_int8"));
    if (o->dtype == MT_W4A8)
        SET("quantization_config", json_pack("{s:s, s:i, s:s}", "activation_scheme", "dynamic",
                                             "group_size", MT_BLOCK, "quant_method", "w4a8_int4"));
    SET("rms_norm_eps", json_real(1e-6));
    SET("rope_scaling", json_pack("{s:i, s:i, s:i, s:f, s:f, s:i, s:s}", "beta_fast", 32,
                                  "beta_slow", 1, "factor", 40, "mscale", 1.0, "mscale_all_dim",
                                  1.0, "original_max_position_embeddings", 4096, "type", "yarn"));
    SET("rope_theta", INT(10000));
    SET("routed_scaling_factor", json_real(2.5));
    SET("scoring_func", json_string("sigmoid"));
    SET("seq_aux", json_true());
    SET("tie_word_embeddings", json_false());
    SET("topk_group", INT(p->topk_group));
    SET("topk_method", json_string("noaux_tc"));
    SET("torch_dtype", json_string("bfloat16"));
    SET("transformers_version", json_string("4.33.1"));
    SET("use_cache", json_true());
    SET("v_head_dim", INT(p->v));
    SET("vocab_size", INT(MT_VOCAB));
#undef SET
#undef INT
    if (bad) {
        json_decref(c);
        return NULL;
    }
    return c;
}

/* ---- the command ---------------------------------------------------------------------------- */
static void usage(FILE *f) {
    fprintf(
        f,
        "usage: dsinfer make-tiny OUT_DIR [options]\n"
        "Writes a random DeepSeek-V3-architecture checkpoint in the Hugging Face layout.\n"
        "  --preset tiny|small|medium|wide|r1  dimensions (default tiny: hidden 64, 3\n"
        "                              layers, 8 experts; wide: tiny with 40 heads; r1:\n"
        "                              DeepSeek-R1's, 61 layers)\n"
        "  --layers N                  the first N layers only (layer 0 dense, the rest MoE)\n"
        "  --seed S                    values are a function of (seed, tensor name) "
        "(default 1)\n"
        "  --dtype bf16|fp8|w8a8|w4a8  fp8 = official block-scaled F8_E4M3 + weight_scale_inv;\n"
        "                              w8a8 / w4a8 = dsinfer quantize's layouts, drawn as\n"
        "                              integers\n"
        "  --tokenizer DIR             tokenizer.json + tokenizer_config.json to copy\n"
        "                              (default %s)\n"
        "  --no-tokenizer              write no tokenizer files\n"
        "  --shard-bytes N[K|M|G]      bytes per safetensors shard (default 512M)\n"
        "  --no-q-lora                 q_lora_rank null: q_proj instead of q_a/q_b\n"
        "  --force                     replace a non-empty OUT_DIR\n",
        ds_cli_default_tokenizer_dir());
}

int ds_cmd_make_tiny(int argc, char **argv) {
    const char *out_arg = NULL, *preset = "tiny", *dtype = "bf16", *tok_dir = NULL;
    uint64_t seed = 1, shard_bytes = 512ull << 20, layers = 0;
    int no_tok = 0, force = 0, q_lora = 1;
    static const struct option opts[] = {{"preset", required_argument, 0, 'p'},
                                         {"seed", required_argument, 0, 's'},
                                         {"dtype", required_argument, 0, 'd'},
                                         {"layers", required_argument, 0, 'l'},
                                         {"tokenizer", required_argument, 0, 't'},
                                         {"shard-bytes", required_argument, 0, 'b'},
                                         {"no-tokenizer", no_argument, 0, 'T'},
                                         {"no-q-lora", no_argument, 0, 'q'},
                                         {"force", no_argument, 0, 'f'},
                                         {"help", no_argument, 0, 'h'},
                                         {0, 0, 0, 0}};
    int c;
    optind = 0; /* full reset: tests call this repeatedly in one process */
    while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (c) {
        case 'p':
            preset = optarg;
            break;
        case 'd':
            dtype = optarg;
            break;
        case 'l':
            if (!ds_cli_parse_u64(optarg, &layers, 0) || layers < 1 || layers > 1024) {
                fprintf(stderr, "dsinfer make-tiny: --layers '%s' must be 1..1024\n", optarg);
                return 2;
            }
            break;
        case 't':
            tok_dir = optarg;
            break;
        case 's':
            if (!ds_cli_parse_u64(optarg, &seed, 0)) {
                fprintf(stderr, "dsinfer make-tiny: --seed '%s' is not a non-negative integer\n",
                        optarg);
                return 2;
            }
            break;
        case 'b':
            if (!ds_cli_parse_u64(optarg, &shard_bytes, 1) || shard_bytes == 0) {
                fprintf(stderr,
                        "dsinfer make-tiny: --shard-bytes '%s' is not a positive size "
                        "(e.g. 1048576 or 512M)\n",
                        optarg);
                return 2;
            }
            break;
        case 'T':
            no_tok = 1;
            break;
        case 'q':
            q_lora = 0;
            break;
        case 'f':
            force = 1;
            break;
        case 'h':
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
    }
    if (argc - optind > 1) {
        fprintf(stderr, "dsinfer make-tiny: unexpected argument '%s'\n", argv[optind + 1]);
        return 2;
    }
    if (optind < argc) out_arg = argv[optind];
    if (!out_arg) {
        usage(stderr);
        return 2;
    }
    mt_opts o = {NULL, seed, MT_BF16, q_lora, 0};
    for (size_t i = 0; i < sizeof presets / sizeof presets[0]; i++)
        if (!strcmp(preset, presets[i].name)) o.p = &presets[i];
    if (!o.p) {
        fprintf(stderr,
                "dsinfer make-tiny: unknown --preset '%s' (tiny, small, medium, wide or r1)\n",
                preset);
        return 2;
    }
    o.layers = layers ? (int64_t)layers : o.p->layers;
    int known = 0;
    for (int i = 0; i < 4; i++)
        if (!strcmp(dtype, mt_dtype_names[i])) o.dtype = (mt_dtype)i, known = 1;
    if (!known) {
        fprintf(stderr, "dsinfer make-tiny: unknown --dtype '%s' (bf16, fp8, w8a8 or w4a8)\n",
                dtype);
        return 2;
    }
    if (!tok_dir) tok_dir = ds_cli_default_tokenizer_dir();

    if (!no_tok && (!ds_cli_file_exists(tok_dir, "tokenizer.json") ||
                    !ds_cli_file_exists(tok_dir, "tokenizer_config.json"))) {
        fprintf(stderr,
                "dsinfer make-tiny: the DeepSeek-V3 tokenizer files (tokenizer.json, "
                "tokenizer_config.json) are not in %s.\n"
                "  Run scripts/setup.sh to fetch them, pass --tokenizer DIR, or --no-tokenizer "
                "for a checkpoint without them.\n",
                tok_dir);
        return 1;
    }
    ds_cli_outdir od;
    mt_plan pl = {0};
    int rc = DS_OK, status = ds_cli_outdir_begin(&od, "make-tiny", out_arg, force);
    if (status) goto done;
    status = 1;
    const char *tmp = od.tmp, *out = od.out;

    rc = build_plan(&o, &pl);
    int n_shards = rc ? 0 : assign_shards(&pl, shard_bytes);
    if (!rc) {
        json_t *cfg = make_config(&o);
        rc = cfg ? dump_json(cfg, tmp, "config.json") : ds_err_set(DS_ERR_NOMEM, "out of memory");
        json_decref(cfg);
    }
    if (!rc) rc = write_shards(tmp, &o, &pl, n_shards);
    if (!rc) rc = write_index(tmp, &pl, n_shards);
    const char *tok_files[] = {"tokenizer.json", "tokenizer_config.json"};
    for (int i = 0; !rc && !no_tok && i < 2; i++) {
        char *src = ds_cli_path_join(tok_dir, tok_files[i]),
             *dst = ds_cli_path_join(tmp, tok_files[i]);
        rc = src && dst ? ds_cli_copy_file(src, dst) : ds_err_set(DS_ERR_NOMEM, "out of memory");
        free(src);
        free(dst);
    }
    if (rc) {
        fprintf(stderr, "dsinfer make-tiny: %s\n", ds_err_msg());
        goto done;
    }
    if (ds_cli_outdir_publish(&od, "make-tiny")) goto done;
    {
        uint64_t bytes = 0;
        for (size_t i = 0; i < pl.n; i++) bytes += pl.t[i].nbytes;
        fprintf(stderr,
                "dsinfer make-tiny: wrote %s (preset %s, %s, seed %llu): %zu tensors, %.1f MB "
                "in %d shard%s\n",
                out, o.p->name, mt_dtype_names[o.dtype], (unsigned long long)seed, pl.n,
                (double)bytes / 1e6, n_shards, n_shards == 1 ? "" : "s");
    }
    status = 0;
done:
    ds_cli_outdir_end(&od);
    free(pl.t);
    return status;
}
