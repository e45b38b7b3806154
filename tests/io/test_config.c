/* config.json -> ds_config: every field the forward pass uses is read, defaults follow Hugging
 * Face's DeepseekV3Config, and unsupported values are refused by name. */
#include "io/io.h"
#include "testutil.h"

#include <stdlib.h>

/* DeepSeek-V3's own config.json (671B), as released: tests/data/deepseek-v3/config.json. */
static char *v3;

/* Parses v3 with one field replaced by `value` (JSON text; NULL deletes the field). */
static int parse_with(const char *field, const char *value, ds_config *c) {
    json_t *root = json_loads(v3, 0, NULL);
    if (field) {
        if (value)
            json_object_set_new(root, field, json_loads(value, JSON_DECODE_ANY, NULL));
        else
            json_object_del(root, field);
    }
    int rc = ds_config_from_json(root, "config.json", c);
    json_decref(root);
    return rc;
}

static void expect_error(const char *field, const char *value, int code, const char *needle) {
    ds_config c;
    int rc = parse_with(field, value, &c);
    CHECK_MSG(rc == code, "%s=%s: rc %d, expected %d (%s)", field, value ? value : "(deleted)", rc,
              code, ds_err_msg());
    CHECK_ERR_CONTAINS(needle);
}

static void test_v3(void) {
    ds_config c;
    CHECK_MSG(parse_with(NULL, NULL, &c) == DS_OK, "%s", ds_err_msg());
    CHECK(c.vocab_size == 129280 && c.hidden_size == 7168 && c.intermediate_size == 18432);
    CHECK(c.moe_intermediate_size == 2048 && c.n_layers == 61 && c.n_heads == 128);
    CHECK(c.n_shared_experts == 1 && c.n_routed_experts == 256 && c.n_experts_per_tok == 8);
    CHECK(c.n_group == 8 && c.topk_group == 4 && c.norm_topk_prob == 1);
    CHECK(fabs(c.routed_scaling_factor - 2.5) < 1e-9 && c.first_k_dense_replace == 3);
    CHECK(c.moe_layer_freq == 1 && c.q_lora_rank == 1536 && c.kv_lora_rank == 512);
    CHECK(c.qk_nope_head_dim == 128 && c.qk_rope_head_dim == 64 && c.v_head_dim == 128);
    CHECK(fabs(c.rms_norm_eps - 1e-6) < 1e-12 && c.rope_theta == 10000);
    CHECK(c.rope_yarn && c.yarn_factor == 40 && c.yarn_original_max_position_embeddings == 4096);
    CHECK(c.yarn_beta_fast == 32 && c.yarn_beta_slow == 1 && c.yarn_mscale == 1 &&
          c.yarn_mscale_all_dim == 1);
    CHECK(c.max_position_embeddings == 163840 && c.bos_token_id == 0);
    CHECK(c.n_eos == 1 && c.eos_token_ids[0] == 1 && !c.tie_word_embeddings);
    CHECK(c.torch_dtype == DS_BF16 && c.num_nextn_predict_layers == 1);
    CHECK(c.quant == DS_QUANT_FP8 && c.quant_block[0] == 128 && c.quant_block[1] == 128);
    CHECK(!ds_config_layer_is_moe(&c, 2) && ds_config_layer_is_moe(&c, 3));
    CHECK(ds_config_layer_is_moe(&c, 60));
}

static void test_variants(void) {
    ds_config c;
    CHECK(parse_with("q_lora_rank", "null", &c) == DS_OK && c.q_lora_rank == 0);
    CHECK(parse_with("rope_scaling", "null", &c) == DS_OK && !c.rope_yarn);
    CHECK(parse_with("quantization_config", NULL, &c) == DS_OK && c.quant == DS_QUANT_NONE);
    CHECK(parse_with("quantization_config",
                     "{\"quant_method\":\"w8a8_int8\",\"activation_scheme\":\"dynamic\"}",
                     &c) == DS_OK &&
          c.quant == DS_QUANT_W8A8);
    CHECK(parse_with("quantization_config", "{\"quant_method\":\"w4a8_int4\",\"group_size\":256}",
                     &c) == DS_OK &&
          c.quant == DS_QUANT_W4A8 && c.quant_group == 256);
    CHECK(parse_with("quantization_config", "{\"quant_method\":\"w4a8_int4\"}", &c) == DS_OK &&
          c.quant_group == 128);
    CHECK(parse_with("eos_token_id", "[1, 128001]", &c) == DS_OK && c.n_eos == 2 &&
          c.eos_token_ids[1] == 128001);
    CHECK(parse_with("moe_layer_freq", "2", &c) == DS_OK && ds_config_layer_is_moe(&c, 4) &&
          !ds_config_layer_is_moe(&c, 5));
    /* HF defaults for optional fields. */
    CHECK(parse_with("rms_norm_eps", NULL, &c) == DS_OK && fabs(c.rms_norm_eps - 1e-6) < 1e-12);
    CHECK(parse_with("norm_topk_prob", NULL, &c) == DS_OK && c.norm_topk_prob == 0);
    CHECK(parse_with("torch_dtype", "\"float32\"", &c) == DS_OK && c.torch_dtype == DS_F32);
    /* rope_type is the newer spelling of type. */
    CHECK(
        parse_with("rope_scaling",
                   "{\"rope_type\":\"yarn\",\"factor\":4,\"original_max_position_embeddings\":64}",
                   &c) == DS_OK &&
        c.rope_yarn && c.yarn_mscale_all_dim == 0 && c.yarn_beta_fast == 32);
}

static void test_refusals(void) {
    expect_error("scoring_func", "\"softmax\"", DS_ERR_UNSUPPORTED,
                 "config.json: unsupported scoring_func = \"softmax\"");
    expect_error("topk_method", "\"greedy\"", DS_ERR_UNSUPPORTED,
                 "unsupported topk_method = \"greedy\"");
    expect_error("model_type", "\"deepseek_v2\"", DS_ERR_UNSUPPORTED,
                 "unsupported model_type = \"deepseek_v2\"");
    expect_error("hidden_act", "\"gelu\"", DS_ERR_UNSUPPORTED, "unsupported hidden_act");
    expect_error("rope_scaling", "{\"type\":\"linear\",\"factor\":2}", DS_ERR_UNSUPPORTED,
                 "unsupported rope_scaling type \"linear\"");
    expect_error("rope_scaling", "{\"type\":\"yarn\",\"original_max_position_embeddings\":64}",
                 DS_ERR_MISSING, "rope_scaling.factor");
    /* Found by the fuzzer: a huge float must not be converted to an integer. */
    expect_error("rope_scaling",
                 "{\"type\":\"yarn\",\"factor\":4,\"original_max_position_embeddings\":"
                 "1e21}",
                 DS_ERR_MISSING, "original_max_position_embeddings missing or invalid");
    expect_error("quantization_config", "{\"quant_method\":\"gptq\"}", DS_ERR_UNSUPPORTED,
                 "unsupported quantization_config.quant_method \"gptq\"");
    expect_error("quantization_config", "{\"quant_method\":\"w4a8_int4\",\"group_size\":127}",
                 DS_ERR_FORMAT, "group_size must be an even integer");
    expect_error("quantization_config",
                 "{\"quant_method\":\"w8a8_int8\",\"activation_scheme\":\"static\"}",
                 DS_ERR_UNSUPPORTED, "activation_scheme");
    expect_error("quantization_config", "{\"quant_method\":\"fp8\",\"fmt\":\"e5m2\"}",
                 DS_ERR_UNSUPPORTED, "quantization_config.fmt");
    expect_error("quantization_config", "{\"quant_method\":\"fp8\",\"weight_block_size\":[128]}",
                 DS_ERR_FORMAT, "weight_block_size");
    expect_error("attention_bias", "true", DS_ERR_UNSUPPORTED, "attention_bias");
    expect_error("hidden_size", NULL, DS_ERR_MISSING, "missing required field \"hidden_size\"");
    expect_error("kv_lora_rank", NULL, DS_ERR_MISSING, "\"kv_lora_rank\"");
    expect_error("hidden_size", "\"7168\"", DS_ERR_FORMAT, "\"hidden_size\" must be an integer");
    expect_error("num_hidden_layers", "0", DS_ERR_RANGE, "\"num_hidden_layers\" = 0, must be >= 1");
    expect_error("qk_rope_head_dim", "63", DS_ERR_RANGE, "qk_rope_head_dim = 63 must be even");
    expect_error("n_group", "7", DS_ERR_RANGE, "not divisible by n_group = 7");
    expect_error("topk_group", "9", DS_ERR_RANGE, "topk_group = 9 exceeds n_group = 8");
    expect_error("num_experts_per_tok", "300", DS_ERR_RANGE, "exceeds n_routed_experts");
    expect_error("num_experts_per_tok", "129", DS_ERR_RANGE, "experts of the topk_group groups");
    expect_error("n_routed_experts", "4096", DS_ERR_UNSUPPORTED, "exceeds dsinfer's limit");
    expect_error("eos_token_id", "200000", DS_ERR_RANGE, "eos_token_id 200000 outside");
    expect_error("eos_token_id", "\"</s>\"", DS_ERR_FORMAT, "eos_token_id");
    expect_error("rms_norm_eps", "\"small\"", DS_ERR_FORMAT, "\"rms_norm_eps\" must be a number");
    expect_error("norm_topk_prob", "1", DS_ERR_FORMAT, "\"norm_topk_prob\" must be true or false");
    expect_error("torch_dtype", "\"int4\"", DS_ERR_UNSUPPORTED, "torch_dtype");
}

static void test_load_file(void) {
    char *dir = ds_test_tmpdir();
    char path[4096];
    snprintf(path, sizeof path, "%.3000s/config.json", dir);
    ds_config c;
    CHECK(ds_config_load(dir, &c) == DS_ERR_MISSING);
    CHECK_ERR_CONTAINS("config.json: cannot open");
    FILE *f = fopen(path, "w");
    fputs("{\"hidden_size\": 64,\n  \"vocab_size\": }", f);
    fclose(f);
    CHECK(ds_config_load(dir, &c) == DS_ERR_FORMAT);
    CHECK_ERR_CONTAINS("config.json: invalid JSON");
    CHECK_ERR_CONTAINS("line 2");
    f = fopen(path, "w");
    fputs(v3, f);
    fclose(f);
    CHECK(ds_config_load(dir, &c) == DS_OK && c.hidden_size == 7168);
    CHECK(ds_config_load(path, &c) == DS_OK && c.n_layers == 61);
    ds_test_rmtree(dir);
    free(dir);
}

int main(void) {
    v3 = ds_test_read_file(DSINFER_SOURCE_DIR "/tests/data/deepseek-v3/config.json", NULL);
    CHECK(v3 != NULL);
    if (!v3) return ds_test_finish("test_config");
    test_v3();
    test_variants();
    test_refusals();
    test_load_file();
    free(v3);
    return ds_test_finish("test_config");
}
