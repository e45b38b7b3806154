/* make-tiny writes what Hugging Face's DeepSeek-V3 layout says, readable by our own reader:
 *  - every expected tensor (names written out here independently of make_tiny.c) with its dtype
 *    and shape, and nothing else; the index maps each to an existing shard that holds it;
 *  - config.json loads and matches the preset;
 *  - FP8 output dequantises (ds_mat_row_f32 with the scale grid) to the BF16 run's weights within
 *    e4m3 precision, with scale_inv = block max / 448, including multi-block and partial grids;
 *  - values depend on (seed, name) only; a rerun is byte-identical;
 *  - --dtype w8a8 / w4a8 --layers N: dsinfer quantize's layouts, values of the BF16 path's std,
 *    a model that loads;
 *  - refusals: existing non-empty OUT_DIR, missing tokenizer, bad flags; no temp dirs left;
 *  - the e4m3 / bf16 encoders: exact round trip of every code, ties to even, saturation. */
#include "cli/cli.h"
#include "io/io.h"
#include "kernels/kernels.h"
#include "model/model.h"
#include "testutil.h"

#include <dirent.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/stat.h>

/* ---- expected layout --------------------------------------------------------------------- */
typedef struct {
    const char *name;
    int64_t hidden, layers, heads, q_lora, kv_lora, rope, nope, v;
    int64_t experts, topk, n_group, topk_group, moe_inter, inter;
} preset;

static const preset TINY = {"tiny", 64, 3, 4, 32, 32, 8, 16, 16, 8, 2, 2, 1, 32, 128};
static const preset SMALL = {"small", 256, 4, 8, 192, 128, 32, 64, 64, 16, 4, 1, 1, 256, 1024};
#define VOCAB 129280

typedef struct {
    char name[160];
    ds_dtype dtype;
    int ndim;
    int64_t shape[2];
} exp_tensor;

typedef struct {
    exp_tensor *t;
    size_t n, cap;
} exp_list;

static void add(exp_list *l, ds_dtype dt, int64_t d0, int64_t d1, const char *fmt, ...)
    DS_PRINTF(5, 6);
static void add(exp_list *l, ds_dtype dt, int64_t d0, int64_t d1, const char *fmt, ...) {
    if (l->n == l->cap) {
        l->cap = l->cap ? 2 * l->cap : 256;
        l->t = realloc(l->t, l->cap * sizeof *l->t);
    }
    exp_tensor *t = &l->t[l->n++];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(t->name, sizeof t->name, fmt, ap);
    va_end(ap);
    t->dtype = dt;
    t->ndim = d1 ? 2 : 1;
    t->shape[0] = d0;
    t->shape[1] = d1;
}

static void add_proj(exp_list *l, int fp8, int64_t out, int64_t in, const char *name) {
    add(l, fp8 ? DS_F8_E4M3 : DS_BF16, out, in, "%s", name);
    if (fp8) add(l, DS_F32, (out + 127) / 128, (in + 127) / 128, "%s_scale_inv", name);
}

/* n = pre + printf(fmt, ...) */
static char *lname(char *n, size_t cap, const char *pre, const char *fmt, ...) DS_PRINTF(4, 5);
static char *lname(char *n, size_t cap, const char *pre, const char *fmt, ...) {
    size_t k = (size_t)snprintf(n, cap, "%s", pre);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(n + k, cap - k, fmt, ap);
    va_end(ap);
    return n;
}

static exp_list expected(const preset *p, int fp8, int q_lora) {
    exp_list l = {0};
    char n[160], pre[64];
    const int64_t H = p->hidden;
    add(&l, DS_BF16, VOCAB, H, "model.embed_tokens.weight");
    add(&l, DS_BF16, H, 0, "model.norm.weight");
    add(&l, DS_BF16, VOCAB, H, "lm_head.weight");
    for (int64_t L = 0; L < p->layers; L++) {
        snprintf(pre, sizeof pre, "model.layers.%lld.", (long long)L);
#define P(...) lname(n, sizeof n, pre, __VA_ARGS__)
        add(&l, DS_BF16, H, 0, "%s", P("input_layernorm.weight"));
        add(&l, DS_BF16, H, 0, "%s", P("post_attention_layernorm.weight"));
        if (q_lora) {
            add_proj(&l, fp8, p->q_lora, H, P("self_attn.q_a_proj.weight"));
            add(&l, DS_BF16, p->q_lora, 0, "%s", P("self_attn.q_a_layernorm.weight"));
            add_proj(&l, fp8, p->heads * (p->nope + p->rope), p->q_lora,
                     P("self_attn.q_b_proj.weight"));
        } else {
            add_proj(&l, fp8, p->heads * (p->nope + p->rope), H, P("self_attn.q_proj.weight"));
        }
        add_proj(&l, fp8, p->kv_lora + p->rope, H, P("self_attn.kv_a_proj_with_mqa.weight"));
        add(&l, DS_BF16, p->kv_lora, 0, "%s", P("self_attn.kv_a_layernorm.weight"));
        add_proj(&l, fp8, p->heads * (p->nope + p->v), p->kv_lora, P("self_attn.kv_b_proj.weight"));
        add_proj(&l, fp8, H, p->heads * p->v, P("self_attn.o_proj.weight"));
        if (L == 0) { /* first_k_dense_replace = 1 */
            add_proj(&l, fp8, p->inter, H, P("mlp.gate_proj.weight"));
            add_proj(&l, fp8, p->inter, H, P("mlp.up_proj.weight"));
            add_proj(&l, fp8, H, p->inter, P("mlp.down_proj.weight"));
            continue;
        }
        add(&l, DS_BF16, p->experts, H, "%s", P("mlp.gate.weight"));
        add(&l, DS_F32, p->experts, 0, "%s", P("mlp.gate.e_score_correction_bias"));
        for (int64_t e = 0; e < p->experts; e++) {
            add_proj(&l, fp8, p->moe_inter, H,
                     P("mlp.experts.%lld.gate_proj.weight", (long long)e));
            add_proj(&l, fp8, p->moe_inter, H, P("mlp.experts.%lld.up_proj.weight", (long long)e));
            add_proj(&l, fp8, H, p->moe_inter,
                     P("mlp.experts.%lld.down_proj.weight", (long long)e));
        }
        add_proj(&l, fp8, p->moe_inter, H, P("mlp.shared_experts.gate_proj.weight"));
        add_proj(&l, fp8, p->moe_inter, H, P("mlp.shared_experts.up_proj.weight"));
        add_proj(&l, fp8, H, p->moe_inter, P("mlp.shared_experts.down_proj.weight"));
#undef P
    }
    return l;
}

/* ---- helpers ----------------------------------------------------------------------------------
 */
static char *tok_dir; /* fixtures/tiny-a (holds the real tokenizer files) or NULL */

static int run_make_tiny(const char *out, const char *const *extra) {
    char *argv[32];
    int argc = 0;
    argv[argc++] = "make-tiny";
    argv[argc++] = (char *)out;
    if (tok_dir) {
        argv[argc++] = "--tokenizer";
        argv[argc++] = tok_dir;
    } else {
        argv[argc++] = "--no-tokenizer";
    }
    for (; extra && *extra; extra++) argv[argc++] = (char *)*extra;
    argv[argc] = NULL;
    return ds_cmd_make_tiny(argc, argv);
}

static int is_file(const char *dir, const char *name) {
    char p[4096];
    snprintf(p, sizeof p, "%s/%s", dir, name);
    struct stat st;
    return stat(p, &st) == 0 && S_ISREG(st.st_mode);
}

static const char *base_name(const char *p) {
    const char *s = strrchr(p, '/');
    return s ? s + 1 : p;
}

static float bf16_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Checks the whole layout of one output directory; returns the number of shards. */
static int check_layout(const char *dir, const preset *p, int fp8, int q_lora) {
    ds_config c;
    int rc = ds_config_load(dir, &c);
    CHECK_MSG(rc == DS_OK, "%s: %s", dir, ds_err_msg());
    if (rc == DS_OK) {
        CHECK(c.vocab_size == VOCAB && c.hidden_size == p->hidden && c.n_layers == p->layers);
        CHECK(c.n_heads == p->heads && c.q_lora_rank == (q_lora ? p->q_lora : 0));
        CHECK(c.kv_lora_rank == p->kv_lora && c.qk_rope_head_dim == p->rope);
        CHECK(c.qk_nope_head_dim == p->nope && c.v_head_dim == p->v);
        CHECK(c.n_routed_experts == p->experts && c.n_experts_per_tok == p->topk);
        CHECK(c.n_group == p->n_group && c.topk_group == p->topk_group);
        CHECK(c.moe_intermediate_size == p->moe_inter && c.intermediate_size == p->inter);
        CHECK(c.n_shared_experts == 1 && c.first_k_dense_replace == 1 && c.moe_layer_freq == 1);
        CHECK(c.norm_topk_prob == 1 && c.routed_scaling_factor == 2.5f);
        CHECK(c.rope_yarn && c.yarn_factor == 40 &&
              c.yarn_original_max_position_embeddings == 4096);
        CHECK(c.yarn_beta_fast == 32 && c.yarn_beta_slow == 1 && c.yarn_mscale == 1 &&
              c.yarn_mscale_all_dim == 1);
        CHECK(c.rope_theta == 10000 && c.max_position_embeddings == 163840);
        CHECK(c.bos_token_id == 0 && c.n_eos >= 1 && c.eos_token_ids[0] == 1);
        CHECK(c.rms_norm_eps == 1e-6f && !c.tie_word_embeddings && c.num_nextn_predict_layers == 0);
        CHECK(c.torch_dtype == DS_BF16);
        CHECK(c.quant == (fp8 ? DS_QUANT_FP8 : DS_QUANT_NONE));
        if (fp8) CHECK(c.quant_block[0] == 128 && c.quant_block[1] == 128);
        uint64_t total = 0, active = 0;
        ds_config_param_counts(&c, &total, &active);
        CHECK(total > active && active > 0);
    }
    CHECK(is_file(dir, "tokenizer.json") == (tok_dir != NULL));
    CHECK(is_file(dir, "tokenizer_config.json") == (tok_dir != NULL));

    ds_st_set *s = NULL;
    rc = ds_st_open_dir(dir, &s);
    CHECK_MSG(rc == DS_OK, "%s: %s", dir, ds_err_msg());
    if (rc != DS_OK) return 0;
    exp_list ex = expected(p, fp8, q_lora);
    CHECK_MSG(ds_st_count(s) == ex.n, "%zu tensors, expected %zu", ds_st_count(s), ex.n);
    uint64_t numel_params = 0;
    for (size_t i = 0; i < ex.n; i++) {
        const exp_tensor *e = &ex.t[i];
        const ds_st_tensor *t = ds_st_find(s, e->name);
        CHECK_MSG(t != NULL, "missing %s", e->name);
        if (!t) continue;
        CHECK_MSG(t->dtype == e->dtype, "%s: %s, expected %s", e->name, ds_dtype_name(t->dtype),
                  ds_dtype_name(e->dtype));
        CHECK_MSG(t->ndim == e->ndim && t->shape[0] == e->shape[0] &&
                      (e->ndim == 1 || t->shape[1] == e->shape[1]),
                  "%s: shape", e->name);
        if (!strstr(e->name, "_scale_inv"))
            numel_params += (uint64_t)e->shape[0] * (uint64_t)(e->ndim == 2 ? e->shape[1] : 1);
    }
    if (rc == DS_OK && ds_config_load(dir, &c) == DS_OK) {
        uint64_t total = 0, active = 0;
        ds_config_param_counts(&c, &total, &active);
        CHECK_MSG(total == numel_params, "config implies %llu, tensors hold %llu",
                  (unsigned long long)total, (unsigned long long)numel_params);
    }

    /* the index: every tensor, each in an existing shard that holds it, total_size exact */
    char ip[4096];
    snprintf(ip, sizeof ip, "%s/model.safetensors.index.json", dir);
    json_t *idx = NULL;
    int n_shards = 0;
    CHECK(ds_json_load_file(ip, &idx) == DS_OK);
    if (idx) {
        json_t *map = json_object_get(idx, "weight_map");
        json_t *ts = json_object_get(json_object_get(idx, "metadata"), "total_size");
        CHECK(json_is_object(map) && json_object_size(map) == ex.n);
        uint64_t bytes = 0;
        const char *key;
        json_t *val;
        char shards[64][64];
        json_object_foreach(map, key, val) {
            const char *f = json_string_value(val);
            CHECK_MSG(f && is_file(dir, f), "%s -> %s", key, f ? f : "?");
            const ds_st_tensor *t = ds_st_find(s, key);
            CHECK_MSG(t && f && strcmp(base_name(t->file), f) == 0, "%s not in %s", key,
                      f ? f : "?");
            if (t) bytes += t->nbytes;
            int k = 0;
            while (f && k < n_shards && strcmp(shards[k], f) != 0) k++;
            if (f && k == n_shards && n_shards < 64) snprintf(shards[n_shards++], 64, "%s", f);
        }
        CHECK(json_is_integer(ts) && (uint64_t)json_integer_value(ts) == bytes);
        for (int k = 0; k < n_shards; k++) {
            char want[64];
            int found = 0;
            for (int j = 0; j < n_shards; j++) {
                snprintf(want, sizeof want, "model-%05d-of-%05d.safetensors", j + 1, n_shards);
                found |= strcmp(shards[k], want) == 0;
            }
            CHECK_MSG(found, "shard name %s", shards[k]);
        }
        json_decref(idx);
    }
    free(ex.t);
    ds_st_close(s);
    return n_shards;
}

/* FP8 tensors of `fp8_dir` against the BF16 tensors of `bf16_dir` (same seed). */
static void check_fp8_vs_bf16(const char *fp8_dir, const char *bf16_dir, const char *const *names,
                              int expect_multiblock) {
    ds_st_set *a = NULL, *b = NULL;
    CHECK(ds_st_open_dir(fp8_dir, &a) == DS_OK);
    CHECK(ds_st_open_dir(bf16_dir, &b) == DS_OK);
    int saw_multi = 0, saw_partial = 0;
    for (; a && b && *names; names++) {
        char sn[200];
        snprintf(sn, sizeof sn, "%s_scale_inv", *names);
        const ds_st_tensor *q = ds_st_find(a, *names), *sc = ds_st_find(a, sn);
        const ds_st_tensor *ref = ds_st_find(b, *names);
        CHECK_MSG(q && sc && ref, "%s", *names);
        if (!q || !sc || !ref) continue;
        const int64_t R = q->shape[0], C = q->shape[1];
        const int64_t br = sc->shape[0], bc = sc->shape[1];
        CHECK(q->dtype == DS_F8_E4M3 && ref->dtype == DS_BF16 && sc->dtype == DS_F32);
        CHECK(ref->shape[0] == R && ref->shape[1] == C);
        saw_multi |= br * bc > 1;
        saw_partial |= R % 128 != 0 && br > 1;
        const uint16_t *rw = ref->data;
        const float *scale = sc->data;
        /* block maxima of the BF16 reference; scale_inv must be exactly max / 448 */
        float *bmax = calloc((size_t)(br * bc), sizeof *bmax);
        for (int64_t r = 0; r < R; r++)
            for (int64_t c = 0; c < C; c++) {
                float v = fabsf(bf16_f32(rw[r * C + c]));
                float *m = &bmax[(r / 128) * bc + c / 128];
                if (v > *m) *m = v;
            }
        for (int64_t k = 0; k < br * bc; k++)
            CHECK_MSG(scale[k] == bmax[k] / 448.0f, "%s block %lld: scale %g, max/448 %g", *names,
                      (long long)k, scale[k], bmax[k] / 448.0f);
        ds_mat m = {.dtype = DS_F8_E4M3,
                    .rows = R,
                    .cols = C,
                    .data = q->data,
                    .scale = scale,
                    .block_rows = 128,
                    .block_cols = 128};
        float *row = malloc((size_t)C * sizeof *row);
        int bad = 0, exact_max = 0;
        for (int64_t r = 0; r < R; r++) {
            ds_mat_row_f32(&m, r, row);
            for (int64_t c = 0; c < C; c++) {
                float want = bf16_f32(rw[r * C + c]);
                float bm = bmax[(r / 128) * bc + c / 128];
                float err = fabsf(row[c] - want);
                if (err > bm * 0x1p-4f || err > fabsf(want) * 0x1p-4f + bm * 0x1p-10f) bad++;
                if (fabsf(want) == bm &&
                    fabsf(row[c]) == fabsf(scale[(r / 128) * bc + c / 128] * 448.0f))
                    exact_max++;
            }
        }
        CHECK_MSG(bad == 0, "%s: %d elements off by more than e4m3 precision", *names, bad);
        CHECK_MSG(exact_max >= br * bc, "%s: block maxima not mapped to 448", *names);
        free(row);
        free(bmax);
    }
    if (expect_multiblock) CHECK(saw_multi && saw_partial);
    ds_st_close(a);
    ds_st_close(b);
}

/* Same name, same seed -> same bytes across runs with different options; other seed differs. */
static void check_same_tensor(const char *d1, const char *d2, const char *name, int want_same) {
    ds_st_set *a = NULL, *b = NULL;
    CHECK(ds_st_open_dir(d1, &a) == DS_OK);
    CHECK(ds_st_open_dir(d2, &b) == DS_OK);
    const ds_st_tensor *x = a ? ds_st_find(a, name) : NULL, *y = b ? ds_st_find(b, name) : NULL;
    CHECK_MSG(x && y, "%s", name);
    if (x && y)
        CHECK_MSG((x->nbytes == y->nbytes && memcmp(x->data, y->data, x->nbytes) == 0) == want_same,
                  "%s: %s", name, want_same ? "differs" : "identical across seeds");
    ds_st_close(a);
    ds_st_close(b);
}

/* Value statistics: what the generator promises. */
static void check_values(const char *dir) {
    ds_st_set *s = NULL;
    CHECK(ds_st_open_dir(dir, &s) == DS_OK);
    if (!s) return;
    const ds_st_tensor *t = ds_st_find(s, "model.layers.1.input_layernorm.weight");
    if (t) {
        double sum = 0;
        int all_one = 1;
        for (int64_t i = 0; i < t->shape[0]; i++) {
            float v = bf16_f32(((const uint16_t *)t->data)[i]);
            sum += v;
            all_one &= v == 1.0f;
            CHECK(v >= 0.79f && v <= 1.21f);
        }
        CHECK(!all_one && fabs(sum / (double)t->shape[0] - 1.0) < 0.1);
    }
    t = ds_st_find(s, "model.layers.1.mlp.gate.e_score_correction_bias");
    if (t) {
        const float *b = t->data;
        int nonzero = 0;
        for (int64_t i = 0; i < t->shape[0]; i++) {
            nonzero += b[i] != 0.0f;
            CHECK(fabsf(b[i]) <= 0.05f);
        }
        CHECK(nonzero == t->shape[0]);
    }
    t = ds_st_find(s, "model.layers.0.mlp.down_proj.weight"); /* [64, 128]: std 1/sqrt(128) */
    if (t && t->dtype == DS_BF16) {
        double ss = 0;
        int64_t n = t->shape[0] * t->shape[1];
        for (int64_t i = 0; i < n; i++) {
            double v = bf16_f32(((const uint16_t *)t->data)[i]);
            ss += v * v;
        }
        double sd = sqrt(ss / (double)n);
        CHECK_MSG(fabs(sd * sqrt(128.0) - 1.0) < 0.1, "std %g", sd);
    }
    ds_st_close(s);
}

/* --dtype w8a8 / w4a8 --layers 2: dsinfer quantize's layouts (I8 weight, F32 weight_scale per
 * row / per 128 inputs, two int4 a byte), the config saying so, codes symmetric (int8 never
 * -128, int4 never -8; their mean near 0, so no layer adds a common offset), the real
 * weights (q x scale) with the BF16 path's std 1/sqrt(fan_in), and a model that loads. */
static void check_int_layout(const char *dir, int w4) {
    ds_config c;
    CHECK(ds_config_load(dir, &c) == DS_OK && c.n_layers == 2 &&
          c.quant == (w4 ? DS_QUANT_W4A8 : DS_QUANT_W8A8) && (!w4 || c.quant_group == 128));
    ds_st_set *s = NULL;
    CHECK(ds_st_open_dir(dir, &s) == DS_OK);
    if (!s) return;
    CHECK(ds_st_find(s, "model.layers.2.input_layernorm.weight") == NULL);
    const ds_st_tensor *q = ds_st_find(s, "model.layers.1.mlp.experts.5.down_proj.weight"),
                       *sc = ds_st_find(s, "model.layers.1.mlp.experts.5.down_proj.weight_scale");
    /* [64, 32]: w8a8 I8 [64, 32] + [64, 1]; w4a8 I8 [64, 16] + [64, 1] */
    CHECK(q && sc && q->dtype == DS_I8 && sc->dtype == DS_F32 && q->shape[0] == 64 &&
          q->shape[1] == (w4 ? 16 : 32) && sc->shape[0] == 64 && sc->shape[1] == 1);
    CHECK(ds_st_find(s, "model.layers.1.mlp.gate.weight")->dtype == DS_BF16);
    CHECK(ds_st_find(s, "lm_head.weight")->dtype == DS_BF16);
    q = ds_st_find(s, "model.layers.0.mlp.down_proj.weight"); /* [64, 128] */
    sc = ds_st_find(s, "model.layers.0.mlp.down_proj.weight_scale");
    if (q && sc) {
        double ss = 0, sum = 0;
        int64_t n = 0, min = 0;
        const int8_t *b = q->data;
        for (int64_t r = 0; r < 64; r++)
            for (int64_t j = 0; j < q->shape[1]; j++) {
                const int8_t v = b[r * q->shape[1] + j];
                const int vals[2] = {w4 ? (int8_t)(uint8_t)((uint8_t)v << 4) >> 4 : v, v >> 4};
                for (int k = 0; k < (w4 ? 2 : 1); k++, n++) {
                    const double w = vals[k] * (double)((const float *)sc->data)[r];
                    ss += w * w;
                    sum += vals[k];
                    if (vals[k] < min) min = vals[k];
                }
            }
        CHECK(n == 64 * 128 && min == (w4 ? -7 : -127));
        /* the mean code: 5 standard errors (int4 -8..7 would give -0.5, 10 of them) */
        CHECK_MSG(fabs(sum / (double)n) < (w4 ? 0.25 : 4.0), "mean code %g", sum / (double)n);
        CHECK_MSG(fabs(sqrt(ss / (double)n) * sqrt(128.0) - 1.0) < 0.1, "std %g",
                  sqrt(ss / (double)n));
    }
    ds_st_close(s);
    ds_model *m = NULL;
    CHECK_MSG(ds_model_open(dir, NULL, &m) == DS_OK, "%s", ds_err_msg());
    ds_model_close(m);
}

static int count_entries(const char *dir) {
    DIR *d = opendir(dir);
    int n = 0;
    struct dirent *e;
    while (d && (e = readdir(d))) n += strcmp(e->d_name, ".") != 0 && strcmp(e->d_name, "..") != 0;
    if (d) closedir(d);
    return n;
}

/* ---- the encoders -------------------------------------------------------------------------------
 */
/* Independent reference decoder of e4m3fn. */
static float e4m3_ref(uint8_t b) {
    int s = b >> 7, e = (b >> 3) & 15, m = b & 7;
    float v = e ? ldexpf(1.0f + (float)m / 8.0f, e - 7) : ldexpf((float)m, -9);
    return s ? -v : v;
}

static void test_encoders(void) {
    const ds_kernels *k = ds_kernels_scalar();
    for (int b = 0; b < 256; b++) {
        if ((b & 0x7F) == 0x7F) continue; /* NaN codes */
        float v = e4m3_ref((uint8_t)b), kv = 0;
        k->fp8_to_f32(&kv, (const uint8_t *)&(uint8_t){(uint8_t)b}, 1, 1.0f);
        CHECK_MSG(memcmp(&kv, &v, 4) == 0, "code 0x%02x: kernel %g, ref %g", b, kv, v);
        CHECK_MSG(ds_f32_to_e4m3(v) == b, "code 0x%02x (%g) -> 0x%02x", b, v, ds_f32_to_e4m3(v));
    }
    /* ties between neighbours go to the even code; just off the tie goes to the nearer one */
    for (int b = 0; b < 0x7E; b++) {
        float lo = e4m3_ref((uint8_t)b), hi = e4m3_ref((uint8_t)(b + 1));
        float mid = 0.5f * (lo + hi); /* exact in f32 */
        uint8_t even = (b & 1) ? (uint8_t)(b + 1) : (uint8_t)b;
        CHECK_MSG(ds_f32_to_e4m3(mid) == even, "tie %g between 0x%02x and 0x%02x", mid, b, b + 1);
        CHECK(ds_f32_to_e4m3(-mid) == (0x80 | even));
        CHECK(ds_f32_to_e4m3(nextafterf(mid, 0.0f)) == b);
        CHECK(ds_f32_to_e4m3(nextafterf(mid, 1e9f)) == b + 1);
    }
    /* saturation at +-448 and never a NaN code */
    CHECK(ds_f32_to_e4m3(448.0f) == 0x7E && ds_f32_to_e4m3(-448.0f) == 0xFE);
    CHECK(ds_f32_to_e4m3(464.0f) == 0x7E && ds_f32_to_e4m3(500.0f) == 0x7E);
    CHECK(ds_f32_to_e4m3(1e30f) == 0x7E && ds_f32_to_e4m3(-1e30f) == 0xFE);
    CHECK(ds_f32_to_e4m3(INFINITY) == 0x7E && ds_f32_to_e4m3(-INFINITY) == 0xFE);
    CHECK((ds_f32_to_e4m3(NAN) & 0x7F) != 0x7F);
    CHECK(ds_f32_to_e4m3(0x1p-10f) == 0x00); /* half the smallest subnormal: tie to 0 */
    CHECK(ds_f32_to_e4m3(0x1.8p-10f) == 0x01);
    CHECK(ds_f32_to_e4m3(1e-30f) == 0x00 && ds_f32_to_e4m3(-0.0f) == 0x80);

    /* bf16: every finite code round-trips; ties to even; overflow to inf; NaN stays NaN */
    for (uint32_t h = 0; h < 0x10000; h++) {
        if ((h & 0x7F80) == 0x7F80 && (h & 0x7F)) continue; /* NaN */
        float f = bf16_f32((uint16_t)h);
        if (ds_f32_to_bf16(f) != h) {
            CHECK_MSG(0, "bf16 0x%04x does not round-trip", h);
            break;
        }
        if ((h & 0x7FFF) < 0x7F7F) { /* the tie between h and h + 1 */
            uint32_t u = (h << 16) | 0x8000u;
            float t;
            memcpy(&t, &u, 4);
            uint16_t even = (h & 1) ? (uint16_t)(h + 1) : (uint16_t)h;
            if (ds_f32_to_bf16(t) != even) {
                CHECK_MSG(0, "bf16 tie above 0x%04x", h);
                break;
            }
        }
    }
    CHECK(ds_f32_to_bf16(1.0f) == 0x3F80 && ds_f32_to_bf16(-2.0f) == 0xC000);
    CHECK(ds_f32_to_bf16(0x1.01p0f) == 0x3F80);   /* tie 1 + 2^-8: to even 0x3F80 */
    CHECK(ds_f32_to_bf16(0x1.03p0f) == 0x3F82);   /* tie 1 + 3 * 2^-8: to even 0x3F82 */
    CHECK(ds_f32_to_bf16(0x1.0101p0f) == 0x3F81); /* just above the tie */
    CHECK(ds_f32_to_bf16(3.4e38f) == 0x7F80 && ds_f32_to_bf16(INFINITY) == 0x7F80);
    uint16_t qn = ds_f32_to_bf16(NAN);
    CHECK((qn & 0x7F80) == 0x7F80 && (qn & 0x7F) != 0);

    /* f16 (the KV cache's): every finite code round-trips through an independent ldexp decode,
     * the tie with the next code goes to the even one, just off it to the nearer one */
    for (uint32_t h = 0; h < 0x7C00; h++) {
        int e = (int)(h >> 10), m = (int)(h & 0x3FF);
        float f = e ? ldexpf(1.0f + (float)m / 1024.0f, e - 15) : ldexpf((float)m, -24);
        float g = (h + 1 < 0x7C00)
                      ? ((h + 1) >> 10 ? ldexpf(1.0f + (float)((h + 1) & 0x3FF) / 1024.0f,
                                                (int)((h + 1) >> 10) - 15)
                                       : ldexpf((float)(h + 1), -24))
                      : 65536.0f;
        float mid = 0.5f * (f + g); /* exact in f32 */
        uint16_t even = (h & 1) ? (uint16_t)(h + 1) : (uint16_t)h;
        if (ds_f32_to_f16(f) != h || ds_f32_to_f16(-f) != (0x8000 | h) ||
            ds_f32_to_f16(mid) != (even == 0x7C00 ? 0x7C00 : even) ||
            ds_f32_to_f16(nextafterf(mid, 0.0f)) != h) {
            CHECK_MSG(0, "f16 code 0x%04x: round trip or tie wrong", h);
            break;
        }
    }
    CHECK(ds_f32_to_f16(65504.0f) == 0x7BFF && ds_f32_to_f16(65519.0f) == 0x7BFF);
    CHECK(ds_f32_to_f16(65520.0f) == 0x7C00 && ds_f32_to_f16(-INFINITY) == 0xFC00);
    CHECK(ds_f32_to_f16(0x1p-25f) == 0 && ds_f32_to_f16(0x1.8p-25f) == 1);
    uint16_t hn = ds_f32_to_f16(NAN);
    CHECK((hn & 0x7C00) == 0x7C00 && (hn & 0x3FF) != 0);
}

int main(void) {
    test_encoders();

    const char *fx = ds_test_fixtures();
    if (fx) {
        size_t n = strlen(fx) + 16;
        tok_dir = malloc(n);
        snprintf(tok_dir, n, "%s/tiny-a", fx);
        if (!is_file(tok_dir, "tokenizer.json")) {
            free(tok_dir);
            tok_dir = NULL;
        }
    }
    char *tmp = ds_test_tmpdir();
    CHECK(tmp != NULL);
    if (!tmp) return ds_test_finish("test_make_tiny");
    char a[4200], b[4200], c[4200], d[4200], sb[4200], sf[4200];
    snprintf(a, sizeof a, "%s/tiny-bf16", tmp);
    snprintf(b, sizeof b, "%s/tiny-fp8", tmp);
    snprintf(c, sizeof c, "%s/tiny-noqlora", tmp);
    snprintf(d, sizeof d, "%s/tiny-bf16-again", tmp);
    snprintf(sb, sizeof sb, "%s/small-bf16", tmp);
    snprintf(sf, sizeof sf, "%s/small-fp8", tmp);

    /* 1. tiny bf16 (default preset), one shard */
    CHECK(run_make_tiny(a, (const char *const[]){"--seed", "7", NULL}) == 0);
    CHECK(check_layout(a, &TINY, 0, 1) == 1);
    check_values(a);

    /* 2. tiny fp8 in many shards (1 MiB each: embed and lm_head alone, layers split) */
    CHECK(run_make_tiny(b, (const char *const[]){"--seed=7", "--dtype", "fp8", "--preset", "tiny",
                                                 "--shard-bytes", "1M", NULL}) == 0);
    CHECK(check_layout(b, &TINY, 1, 1) >= 3);
    static const char *const tiny_proj[] = {"model.layers.0.self_attn.q_a_proj.weight",
                                            "model.layers.0.self_attn.q_b_proj.weight",
                                            "model.layers.0.self_attn.kv_a_proj_with_mqa.weight",
                                            "model.layers.0.mlp.down_proj.weight",
                                            "model.layers.2.mlp.experts.7.up_proj.weight",
                                            "model.layers.1.mlp.shared_experts.down_proj.weight",
                                            NULL};
    check_fp8_vs_bf16(b, a, tiny_proj, 0);
    /* BF16 tensors that stay BF16 in fp8 are the same bytes */
    check_same_tensor(a, b, "model.layers.1.mlp.gate.weight", 1);
    check_same_tensor(a, b, "lm_head.weight", 1);

    /* 3. --no-q-lora in tiny shards: q_proj, everything else unchanged */
    CHECK(run_make_tiny(c, (const char *const[]){"--seed", "7", "--no-q-lora", "--shard-bytes",
                                                 "20000000", NULL}) == 0);
    CHECK(check_layout(c, &TINY, 0, 0) == 2);
    check_same_tensor(a, c, "model.layers.2.self_attn.o_proj.weight", 1);
    check_same_tensor(a, c, "model.embed_tokens.weight", 1);

    /* 4. determinism: same seed byte-identical, other seed different */
    CHECK(run_make_tiny(d, (const char *const[]){"--seed", "7", NULL}) == 0);
    check_same_tensor(a, d, "model.layers.1.mlp.experts.3.down_proj.weight", 1);
    check_same_tensor(a, d, "model.embed_tokens.weight", 1);
    CHECK(run_make_tiny(d, (const char *const[]){"--seed", "8", "--force", NULL}) == 0);
    check_same_tensor(a, d, "model.layers.1.mlp.experts.3.down_proj.weight", 0);
    check_same_tensor(a, d, "model.norm.weight", 0);

    /* 5. small in fp8: multi-block scale grids with partial edge blocks */
    CHECK(run_make_tiny(sb, (const char *const[]){"--preset", "small", "--seed", "3", NULL}) == 0);
    CHECK(run_make_tiny(sf, (const char *const[]){"--preset", "small", "--seed", "3", "--dtype",
                                                  "fp8", NULL}) == 0);
    CHECK(check_layout(sf, &SMALL, 1, 1) >= 1);
    static const char *const small_proj[] = {
        "model.layers.0.self_attn.kv_a_proj_with_mqa.weight", /* [160, 256]: 2 x 2, partial */
        "model.layers.0.self_attn.q_b_proj.weight",           /* [768, 192]: 6 x 2, partial */
        "model.layers.0.mlp.down_proj.weight",                /* [256, 1024]: 2 x 8 */
        "model.layers.3.mlp.experts.15.gate_proj.weight", NULL};
    check_fp8_vs_bf16(sf, sb, small_proj, 1);

    /* 6. the integer layouts, two layers */
    char i8[4300], i4[4300];
    snprintf(i8, sizeof i8, "%s/tiny-w8a8", tmp);
    snprintf(i4, sizeof i4, "%s/tiny-w4a8", tmp);
    CHECK(run_make_tiny(i8, (const char *const[]){"--dtype", "w8a8", "--layers", "2", NULL}) == 0);
    CHECK(run_make_tiny(i4, (const char *const[]){"--dtype", "w4a8", "--layers", "2", NULL}) == 0);
    check_int_layout(i8, 0);
    check_int_layout(i4, 1);

    /* 7. refusals */
    CHECK(run_make_tiny(a, (const char *const[]){"--seed", "7", NULL}) == 2); /* not empty */
    CHECK(check_layout(a, &TINY, 0, 1) == 1);                                 /* untouched */
    char e[4300];
    snprintf(e, sizeof e, "%s/empty", tmp);
    mkdir(e, 0755);
    CHECK(run_make_tiny(e, NULL) == 0); /* an empty directory is fine */
    char nt[4300];
    snprintf(nt, sizeof nt, "%s/no-tok", tmp);
    {
        char *argv[] = {"make-tiny", nt, "--tokenizer", tmp, NULL};
        CHECK(ds_cmd_make_tiny(4, argv) == 1); /* tokenizer files missing */
        struct stat st;
        CHECK(stat(nt, &st) != 0);
        char *argv2[] = {"make-tiny", nt, "--preset", "huge", "--no-tokenizer", NULL};
        CHECK(ds_cmd_make_tiny(5, argv2) == 2);
        char *argv3[] = {"make-tiny", nt, "--dtype", "int3", "--no-tokenizer", NULL};
        CHECK(ds_cmd_make_tiny(5, argv3) == 2);
        char *argv4[] = {"make-tiny", nt, "--shard-bytes", "0", "--no-tokenizer", NULL};
        CHECK(ds_cmd_make_tiny(5, argv4) == 2);
        char *argv5[] = {"make-tiny", NULL};
        CHECK(ds_cmd_make_tiny(1, argv5) == 2);
        CHECK(stat(nt, &st) != 0);
    }
    /* nothing but the finished directories: no OUT_DIR.tmp-* or .old-* left behind */
    CHECK_MSG(count_entries(tmp) == 9, "%d entries in %s", count_entries(tmp), tmp);

    ds_test_rmtree(tmp);
    free(tmp);
    free(tok_dir);
    return ds_test_finish("test_make_tiny");
}
