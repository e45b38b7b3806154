/* config.json -> ds_config.
 *
 * Dimensions are required: a config that lacks hidden_size is broken, and silently assuming the
 * 671B default would map a small checkpoint with absurd shapes. Fields with a semantic default
 * in Hugging Face's DeepseekV3Config (rms_norm_eps, rope_theta, moe_layer_freq, ...) take that
 * default when absent. Values the forward pass cannot honour (another scoring function, a rope
 * type other than YaRN, an unknown quantization method) are refused by name rather than
 * approximated. */
#include "io/io.h"

#include <math.h>
#include <string.h>

typedef struct {
    const json_t *root;
    const char *label;
} cfg_src;

static int want_int(cfg_src *s, const char *key, int required, int64_t dflt, int64_t min,
                    int64_t *out) {
    json_t *v = json_object_get(s->root, key);
    if (!v || json_is_null(v)) {
        if (required)
            return ds_err_set(DS_ERR_MISSING, "%s: missing required field \"%s\"", s->label, key);
        *out = dflt;
        return DS_OK;
    }
    if (!json_is_integer(v))
        return ds_err_set(DS_ERR_FORMAT, "%s: field \"%s\" must be an integer", s->label, key);
    *out = json_integer_value(v);
    if (*out < min)
        return ds_err_set(DS_ERR_RANGE, "%s: field \"%s\" = %lld, must be >= %lld", s->label, key,
                          (long long)*out, (long long)min);
    return DS_OK;
}

static int want_num(const json_t *obj, const char *label, const char *key, double dflt,
                    double *out) {
    json_t *v = json_object_get(obj, key);
    if (!v || json_is_null(v)) {
        *out = dflt;
        return DS_OK;
    }
    if (!json_is_number(v))
        return ds_err_set(DS_ERR_FORMAT, "%s: field \"%s\" must be a number", label, key);
    *out = json_number_value(v);
    if (!isfinite(*out))
        return ds_err_set(DS_ERR_RANGE, "%s: field \"%s\" is not finite", label, key);
    return DS_OK;
}

static int want_bool(cfg_src *s, const char *key, int dflt, int *out) {
    json_t *v = json_object_get(s->root, key);
    if (!v || json_is_null(v)) {
        *out = dflt;
        return DS_OK;
    }
    if (!json_is_boolean(v))
        return ds_err_set(DS_ERR_FORMAT, "%s: field \"%s\" must be true or false", s->label, key);
    *out = json_is_true(v);
    return DS_OK;
}

/* A string field that, when present, must be one of the accepted values. */
static int want_choice(cfg_src *s, const char *key, const char *const *ok, const char *what) {
    json_t *v = json_object_get(s->root, key);
    if (!v || json_is_null(v)) return DS_OK;
    if (!json_is_string(v))
        return ds_err_set(DS_ERR_FORMAT, "%s: field \"%s\" must be a string", s->label, key);
    for (; *ok; ok++)
        if (strcmp(json_string_value(v), *ok) == 0) return DS_OK;
    return ds_err_set(DS_ERR_UNSUPPORTED, "%s: unsupported %s = \"%s\" (dsinfer supports %s)",
                      s->label, key, json_string_value(v), what);
}

static int read_rope_scaling(cfg_src *s, ds_config *c) {
    json_t *rs = json_object_get(s->root, "rope_scaling");
    if (!rs || json_is_null(rs)) return DS_OK;
    if (!json_is_object(rs))
        return ds_err_set(DS_ERR_FORMAT, "%s: \"rope_scaling\" must be an object or null",
                          s->label);
    json_t *type = json_object_get(rs, "type");
    if (!type) type = json_object_get(rs, "rope_type");
    if (!json_is_string(type))
        return ds_err_set(DS_ERR_FORMAT, "%s: rope_scaling has no \"type\"", s->label);
    if (strcmp(json_string_value(type), "yarn") != 0)
        return ds_err_set(DS_ERR_UNSUPPORTED,
                          "%s: unsupported rope_scaling type \"%s\" (dsinfer supports \"yarn\")",
                          s->label, json_string_value(type));
    c->rope_yarn = 1;
    double orig;
    int rc;
    if ((rc = want_num(rs, s->label, "factor", NAN, &c->yarn_factor)) ||
        (rc = want_num(rs, s->label, "original_max_position_embeddings", NAN, &orig)) ||
        (rc = want_num(rs, s->label, "beta_fast", 32, &c->yarn_beta_fast)) ||
        (rc = want_num(rs, s->label, "beta_slow", 1, &c->yarn_beta_slow)) ||
        (rc = want_num(rs, s->label, "mscale", 1, &c->yarn_mscale)) ||
        (rc = want_num(rs, s->label, "mscale_all_dim", 0, &c->yarn_mscale_all_dim)))
        return rc;
    if (isnan(c->yarn_factor) || c->yarn_factor <= 0)
        return ds_err_set(DS_ERR_MISSING, "%s: rope_scaling.factor missing or not positive",
                          s->label);
    if (isnan(orig) || orig < 1 || orig > 1e15 || orig != floor(orig))
        return ds_err_set(DS_ERR_MISSING,
                          "%s: rope_scaling.original_max_position_embeddings missing or invalid",
                          s->label);
    if (c->yarn_beta_fast <= 0 || c->yarn_beta_slow <= 0)
        return ds_err_set(DS_ERR_RANGE, "%s: rope_scaling beta_fast/beta_slow must be positive",
                          s->label);
    c->yarn_original_max_position_embeddings = (int64_t)orig;
    return DS_OK;
}

static int read_quant(cfg_src *s, ds_config *c) {
    json_t *q = json_object_get(s->root, "quantization_config");
    c->quant = DS_QUANT_NONE;
    if (!q || json_is_null(q)) return DS_OK;
    if (!json_is_object(q))
        return ds_err_set(DS_ERR_FORMAT, "%s: \"quantization_config\" must be an object", s->label);
    json_t *m = json_object_get(q, "quant_method");
    if (!json_is_string(m))
        return ds_err_set(DS_ERR_FORMAT, "%s: quantization_config has no \"quant_method\"",
                          s->label);
    const char *method = json_string_value(m);
    if (strcmp(method, "ptq") == 0) { /* static attention + dynamic MLP, per tensor (formats.md) */
        c->quant = DS_QUANT_MS_PTQ;
        return DS_OK;
    }
    if (!strcmp(method, "osl") || !strcmp(method, "smoothquant") || !strcmp(method, "a8w4")) {
        c->quant = method[0] == 'a' ? DS_QUANT_MS_A8W4 : DS_QUANT_MS_W8A8;
        return DS_OK;
    }
    json_t *as = json_object_get(q, "activation_scheme");
    if (as && (!json_is_string(as) || strcmp(json_string_value(as), "dynamic") != 0))
        return ds_err_set(DS_ERR_UNSUPPORTED,
                          "%s: unsupported quantization_config.activation_scheme (dsinfer "
                          "supports \"dynamic\")",
                          s->label);
    if (strcmp(method, "w8a8_int8") == 0) {
        c->quant = DS_QUANT_W8A8;
        return DS_OK;
    }
    if (strcmp(method, "w4a8_int4") == 0) {
        json_t *g = json_object_get(q, "group_size");
        c->quant = DS_QUANT_W4A8;
        c->quant_group = 128;
        if (g && (!json_is_integer(g) || json_integer_value(g) < 2 ||
                  json_integer_value(g) > (1 << 20) || json_integer_value(g) % 2))
            return ds_err_set(DS_ERR_FORMAT,
                              "%s: quantization_config.group_size must be an even integer in "
                              "[2, 1048576]",
                              s->label);
        if (g) c->quant_group = json_integer_value(g);
        return DS_OK;
    }
    int block_int8 = strcmp(method, "blockwise_int8") == 0;
    if (strcmp(method, "fp8") != 0 && !block_int8)
        return ds_err_set(DS_ERR_UNSUPPORTED,
                          "%s: unsupported quantization_config.quant_method \"%s\" (dsinfer "
                          "supports \"fp8\", \"w8a8_int8\", \"w4a8_int4\", \"blockwise_int8\", "
                          "\"ptq\", \"osl\", \"smoothquant\", \"a8w4\" and msModelSlim's "
                          "quant_model_description.json)",
                          s->label, method);
    json_t *fmt = json_object_get(q, "fmt");
    if (!block_int8 && fmt && (!json_is_string(fmt) || strcmp(json_string_value(fmt), "e4m3") != 0))
        return ds_err_set(DS_ERR_UNSUPPORTED,
                          "%s: unsupported quantization_config.fmt (dsinfer supports \"e4m3\")",
                          s->label);
    json_t *bs = json_object_get(q, "weight_block_size");
    c->quant = block_int8 ? DS_QUANT_BLOCK_INT8 : DS_QUANT_FP8;
    c->quant_block[0] = c->quant_block[1] = 128;
    if (bs) {
        if (!json_is_array(bs) || json_array_size(bs) != 2 ||
            !json_is_integer(json_array_get(bs, 0)) || !json_is_integer(json_array_get(bs, 1)) ||
            json_integer_value(json_array_get(bs, 0)) < 1 ||
            json_integer_value(json_array_get(bs, 1)) < 1)
            return ds_err_set(DS_ERR_FORMAT,
                              "%s: quantization_config.weight_block_size must be [rows, cols] of "
                              "positive integers",
                              s->label);
        c->quant_block[0] = json_integer_value(json_array_get(bs, 0));
        c->quant_block[1] = json_integer_value(json_array_get(bs, 1));
    }
    return DS_OK;
}

static int read_tokens_and_dtype(cfg_src *s, ds_config *c) {
    int rc = want_int(s, "bos_token_id", 0, 0, 0, &c->bos_token_id);
    if (rc) return rc;
    json_t *eos = json_object_get(s->root, "eos_token_id");
    c->n_eos = 0;
    if (json_is_integer(eos) && json_integer_value(eos) >= 0) {
        c->eos_token_ids[c->n_eos++] = json_integer_value(eos);
    } else if (json_is_array(eos)) {
        size_t i;
        json_t *e;
        json_array_foreach(eos, i, e) {
            if (!json_is_integer(e) || json_integer_value(e) < 0 || c->n_eos == 8)
                return ds_err_set(DS_ERR_FORMAT,
                                  "%s: \"eos_token_id\" must be at most 8 non-negative integers",
                                  s->label);
            c->eos_token_ids[c->n_eos++] = json_integer_value(e);
        }
    } else if (eos && !json_is_null(eos)) {
        return ds_err_set(DS_ERR_FORMAT, "%s: \"eos_token_id\" must be an integer or a list",
                          s->label);
    } else {
        c->eos_token_ids[c->n_eos++] = 1;
    }
    c->torch_dtype = DS_BF16;
    json_t *td = json_object_get(s->root, "torch_dtype");
    if (td && !json_is_null(td)) {
        const char *v = json_is_string(td) ? json_string_value(td) : "";
        if (strcmp(v, "bfloat16") == 0)
            c->torch_dtype = DS_BF16;
        else if (strcmp(v, "float16") == 0)
            c->torch_dtype = DS_F16;
        else if (strcmp(v, "float32") == 0)
            c->torch_dtype = DS_F32;
        else
            return ds_err_set(DS_ERR_UNSUPPORTED,
                              "%s: unsupported torch_dtype \"%s\" (bfloat16, float16, float32)",
                              s->label, v);
    }
    return DS_OK;
}

/* Cross-field checks: the shapes must make a network the forward pass can run. */
static int check_consistency(const char *label, const ds_config *c) {
    if (c->qk_rope_head_dim % 2)
        return ds_err_set(DS_ERR_RANGE, "%s: qk_rope_head_dim = %lld must be even (RoPE pairs)",
                          label, (long long)c->qk_rope_head_dim);
    if (c->qk_rope_head_dim > DS_MAX_ROPE_DIM)
        return ds_err_set(DS_ERR_UNSUPPORTED,
                          "%s: qk_rope_head_dim = %lld exceeds dsinfer's limit %d", label,
                          (long long)c->qk_rope_head_dim, DS_MAX_ROPE_DIM);
    if (c->n_routed_experts > DS_MAX_EXPERTS)
        return ds_err_set(DS_ERR_UNSUPPORTED,
                          "%s: n_routed_experts = %lld exceeds dsinfer's limit %d", label,
                          (long long)c->n_routed_experts, DS_MAX_EXPERTS);
    if (c->n_routed_experts > 0) {
        if (c->n_routed_experts % c->n_group)
            return ds_err_set(DS_ERR_RANGE,
                              "%s: n_routed_experts = %lld not divisible by n_group = %lld", label,
                              (long long)c->n_routed_experts, (long long)c->n_group);
        if (c->topk_group > c->n_group)
            return ds_err_set(DS_ERR_RANGE, "%s: topk_group = %lld exceeds n_group = %lld", label,
                              (long long)c->topk_group, (long long)c->n_group);
        int64_t per_group = c->n_routed_experts / c->n_group;
        if (c->n_group > 1 && per_group < 2)
            return ds_err_set(DS_ERR_RANGE,
                              "%s: group-limited routing needs at least 2 experts per group "
                              "(n_routed_experts / n_group = %lld)",
                              label, (long long)per_group);
        if (c->n_experts_per_tok > c->topk_group * per_group)
            return ds_err_set(DS_ERR_RANGE,
                              "%s: num_experts_per_tok = %lld exceeds the %lld experts of the "
                              "topk_group groups",
                              label, (long long)c->n_experts_per_tok,
                              (long long)(c->topk_group * per_group));
    }
    for (int i = 0; i < c->n_eos; i++)
        if (c->eos_token_ids[i] >= c->vocab_size)
            return ds_err_set(DS_ERR_RANGE, "%s: eos_token_id %lld outside the vocabulary", label,
                              (long long)c->eos_token_ids[i]);
    if (c->bos_token_id >= c->vocab_size)
        return ds_err_set(DS_ERR_RANGE, "%s: bos_token_id %lld outside the vocabulary", label,
                          (long long)c->bos_token_id);
    return DS_OK;
}

int ds_config_quant_from_json(const json_t *root, const char *label, ds_config *c) {
    memset(c, 0, sizeof *c);
    if (!json_is_object(root)) return ds_err_set(DS_ERR_FORMAT, "%s: not a JSON object", label);
    cfg_src s = {root, label};
    return read_quant(&s, c);
}

int ds_config_from_json(const json_t *root, const char *label, ds_config *c) {
    memset(c, 0, sizeof *c);
    if (!json_is_object(root)) return ds_err_set(DS_ERR_FORMAT, "%s: not a JSON object", label);
    cfg_src s = {root, label};
    static const char *const model_types[] = {"deepseek_v3", NULL};
    static const char *const scoring[] = {"sigmoid", NULL};
    static const char *const topk_methods[] = {"noaux_tc", NULL};
    static const char *const acts[] = {"silu", NULL};
    int rc;
    /* Refused by name before anything else, so the message is about the real cause. */
    if ((rc = want_choice(&s, "model_type", model_types, "\"deepseek_v3\"")) ||
        (rc = want_choice(&s, "scoring_func", scoring, "\"sigmoid\"")) ||
        (rc = want_choice(&s, "topk_method", topk_methods, "\"noaux_tc\"")) ||
        (rc = want_choice(&s, "hidden_act", acts, "\"silu\"")))
        return rc;
    int attention_bias = 0;
    if ((rc = want_bool(&s, "attention_bias", 0, &attention_bias))) return rc;
    if (attention_bias)
        return ds_err_set(DS_ERR_UNSUPPORTED, "%s: unsupported attention_bias = true", label);

    if ((rc = want_int(&s, "vocab_size", 1, 0, 1, &c->vocab_size)) ||
        (rc = want_int(&s, "hidden_size", 1, 0, 1, &c->hidden_size)) ||
        (rc = want_int(&s, "num_hidden_layers", 1, 0, 1, &c->n_layers)) ||
        (rc = want_int(&s, "num_attention_heads", 1, 0, 1, &c->n_heads)) ||
        (rc = want_int(&s, "q_lora_rank", 0, 0, 0, &c->q_lora_rank)) ||
        (rc = want_int(&s, "kv_lora_rank", 1, 0, 1, &c->kv_lora_rank)) ||
        (rc = want_int(&s, "qk_nope_head_dim", 1, 0, 1, &c->qk_nope_head_dim)) ||
        (rc = want_int(&s, "qk_rope_head_dim", 1, 0, 2, &c->qk_rope_head_dim)) ||
        (rc = want_int(&s, "v_head_dim", 1, 0, 1, &c->v_head_dim)) ||
        (rc = want_int(&s, "first_k_dense_replace", 0, 0, 0, &c->first_k_dense_replace)) ||
        (rc = want_int(&s, "moe_layer_freq", 0, 1, 1, &c->moe_layer_freq)) ||
        (rc = want_int(&s, "n_routed_experts", 0, 0, 0, &c->n_routed_experts)) ||
        (rc = want_int(&s, "max_position_embeddings", 0, 4096, 1, &c->max_position_embeddings)) ||
        (rc = want_int(&s, "num_nextn_predict_layers", 0, 0, 0, &c->num_nextn_predict_layers)))
        return rc;
    int any_dense =
        c->first_k_dense_replace > 0 || c->n_routed_experts == 0 || c->moe_layer_freq > 1;
    if ((rc = want_int(&s, "intermediate_size", any_dense, 0, 1, &c->intermediate_size))) return rc;
    if (c->n_routed_experts > 0) {
        if ((rc = want_int(&s, "moe_intermediate_size", 1, 0, 1, &c->moe_intermediate_size)) ||
            (rc = want_int(&s, "num_experts_per_tok", 1, 0, 1, &c->n_experts_per_tok)) ||
            (rc = want_int(&s, "n_shared_experts", 0, 0, 0, &c->n_shared_experts)) ||
            (rc = want_int(&s, "n_group", 0, 1, 1, &c->n_group)) ||
            (rc = want_int(&s, "topk_group", 0, 1, 1, &c->topk_group)))
            return rc;
        if (c->n_experts_per_tok > c->n_routed_experts)
            return ds_err_set(
                DS_ERR_RANGE, "%s: num_experts_per_tok = %lld exceeds n_routed_experts = %lld",
                label, (long long)c->n_experts_per_tok, (long long)c->n_routed_experts);
    }
    double d;
    if ((rc = want_num(root, label, "rms_norm_eps", 1e-6, &d))) return rc;
    c->rms_norm_eps = (float)d;
    if ((rc = want_num(root, label, "rope_theta", 10000.0, &c->rope_theta))) return rc;
    if ((rc = want_num(root, label, "routed_scaling_factor", 1.0, &d))) return rc;
    c->routed_scaling_factor = (float)d;
    if (c->rms_norm_eps <= 0 || c->rope_theta <= 1)
        return ds_err_set(DS_ERR_RANGE, "%s: rms_norm_eps must be > 0 and rope_theta > 1", label);
    if ((rc = want_bool(&s, "norm_topk_prob", 0, &c->norm_topk_prob)) ||
        (rc = want_bool(&s, "tie_word_embeddings", 0, &c->tie_word_embeddings)) ||
        (rc = read_rope_scaling(&s, c)) || (rc = read_quant(&s, c)) ||
        (rc = read_tokens_and_dtype(&s, c)))
        return rc;
    return check_consistency(label, c);
}

int ds_config_load(const char *path, ds_config *out) {
    char buf[4096];
    size_t n = strlen(path);
    /* A directory gets /config.json appended. */
    if (n < 5 || strcmp(path + n - 5, ".json") != 0) {
        snprintf(buf, sizeof buf, "%s/config.json", path);
        path = buf;
    }
    json_t *root;
    int rc = ds_json_load_file(path, &root);
    if (rc) return rc;
    rc = ds_config_from_json(root, path, out);
    json_decref(root);
    return rc;
}

int ds_config_layer_is_moe(const ds_config *c, int64_t l) {
    return c->n_routed_experts > 0 && l >= c->first_k_dense_replace && l % c->moe_layer_freq == 0;
}

void ds_config_print(const ds_config *c, FILE *f) {
    fprintf(f, "vocab_size               %lld\n", (long long)c->vocab_size);
    fprintf(f, "hidden_size              %lld\n", (long long)c->hidden_size);
    fprintf(f, "num_hidden_layers        %lld (+%lld MTP, skipped)\n", (long long)c->n_layers,
            (long long)c->num_nextn_predict_layers);
    fprintf(f, "num_attention_heads      %lld\n", (long long)c->n_heads);
    if (c->q_lora_rank)
        fprintf(f, "q_lora_rank              %lld\n", (long long)c->q_lora_rank);
    else
        fprintf(f, "q_lora_rank              null (q_proj)\n");
    fprintf(f, "kv_lora_rank             %lld\n", (long long)c->kv_lora_rank);
    fprintf(f, "qk_nope / rope / v dims  %lld / %lld / %lld\n", (long long)c->qk_nope_head_dim,
            (long long)c->qk_rope_head_dim, (long long)c->v_head_dim);
    fprintf(f, "intermediate_size        %lld (dense layers: %lld)\n",
            (long long)c->intermediate_size, (long long)c->first_k_dense_replace);
    if (c->n_routed_experts) {
        fprintf(f,
                "experts                  %lld routed (top-%lld), %lld shared, "
                "moe_intermediate %lld\n",
                (long long)c->n_routed_experts, (long long)c->n_experts_per_tok,
                (long long)c->n_shared_experts, (long long)c->moe_intermediate_size);
        fprintf(f,
                "routing                  sigmoid, noaux_tc, n_group %lld topk_group %lld, "
                "norm_topk_prob %s, scale %g, moe_layer_freq %lld\n",
                (long long)c->n_group, (long long)c->topk_group,
                c->norm_topk_prob ? "true" : "false", (double)c->routed_scaling_factor,
                (long long)c->moe_layer_freq);
    }
    fprintf(f, "rms_norm_eps             %g\n", (double)c->rms_norm_eps);
    fprintf(f, "rope_theta               %g\n", c->rope_theta);
    if (c->rope_yarn)
        fprintf(f,
                "rope_scaling             yarn factor %g over %lld, beta %g/%g, mscale %g, "
                "mscale_all_dim %g\n",
                c->yarn_factor, (long long)c->yarn_original_max_position_embeddings,
                c->yarn_beta_fast, c->yarn_beta_slow, c->yarn_mscale, c->yarn_mscale_all_dim);
    else
        fprintf(f, "rope_scaling             none\n");
    fprintf(f, "max_position_embeddings  %lld\n", (long long)c->max_position_embeddings);
    fprintf(f, "bos / eos                %lld / %lld\n", (long long)c->bos_token_id,
            (long long)c->eos_token_ids[0]);
    fprintf(f, "tie_word_embeddings      %s\n", c->tie_word_embeddings ? "true" : "false");
    fprintf(f, "torch_dtype              %s\n", ds_dtype_name(c->torch_dtype));
    if (c->quant == DS_QUANT_FP8)
        fprintf(f, "quantization             fp8 e4m3, %lldx%lld blocks\n",
                (long long)c->quant_block[0], (long long)c->quant_block[1]);
    else if (c->quant == DS_QUANT_W8A8)
        fprintf(f, "quantization             w8a8_int8 (int8 per output channel, int8 tokens)\n");
    else if (c->quant == DS_QUANT_BLOCK_INT8)
        fprintf(f, "quantization             blockwise_int8, %lldx%lld blocks, int8 tokens\n",
                (long long)c->quant_block[0], (long long)c->quant_block[1]);
    else if (c->quant == DS_QUANT_MS_W8A8)
        fprintf(f,
                "quantization             osl / smoothquant (MindSpore W8A8, MindSpore names)\n");
    else if (c->quant == DS_QUANT_MS_A8W4)
        fprintf(f, "quantization             a8w4 (MindSpore: int4 routed experts, W8A8 rest)\n");
    else if (c->quant == DS_QUANT_MS_PTQ)
        fprintf(f, "quantization             ptq (MindSpore W8A8: static attention, dynamic "
                   "MLP)\n");
    else if (c->quant == DS_QUANT_W4A8)
        fprintf(f, "quantization             w4a8_int4 (int4, groups of %lld, int8 tokens)\n",
                (long long)c->quant_group);
    else
        fprintf(f, "quantization             none\n");
}
