/* Parameter counts implied by a DeepSeek-V3 config: pure arithmetic, the same tensor list that
 * make-tiny writes and the model binds (see ds_config_param_counts in io.h).
 *
 * Check on the real DeepSeek-V3 config.json: total = 671,026,419,200 ("671B") and active =
 * 37,552,297,472 ("37B"), the figures of the model card. As there, the embedding counts in full
 * towards the active parameters (a convention: a token reads only one row of it). */
#include "io/io.h"

void ds_config_param_counts(const ds_config *c, uint64_t *total, uint64_t *active) {
    const uint64_t H = (uint64_t)c->hidden_size, nh = (uint64_t)c->n_heads;
    const uint64_t nope = (uint64_t)c->qk_nope_head_dim, rope = (uint64_t)c->qk_rope_head_dim;
    const uint64_t vd = (uint64_t)c->v_head_dim, kv = (uint64_t)c->kv_lora_rank;
    const uint64_t q = c->q_lora_rank > 0 ? (uint64_t)c->q_lora_rank : 0;

    /* MLA attention of one layer */
    uint64_t attn = 0;
    if (q)
        attn += H * q + q + q * nh * (nope + rope); /* q_a_proj, q_a_layernorm, q_b_proj */
    else
        attn += H * nh * (nope + rope); /* q_proj */
    attn += H * (kv + rope) + kv;       /* kv_a_proj_with_mqa, kv_a_layernorm */
    attn += kv * nh * (nope + vd);      /* kv_b_proj */
    attn += nh * vd * H;                /* o_proj */
    const uint64_t norms = 2 * H;       /* input_layernorm, post_attention_layernorm */

    const uint64_t dense_mlp = 3 * H * (uint64_t)c->intermediate_size;
    const uint64_t expert = 3 * H * (uint64_t)c->moe_intermediate_size;
    const uint64_t E = (uint64_t)c->n_routed_experts;
    const uint64_t router = E * H + E; /* gate.weight + e_score_correction_bias */
    const uint64_t shared = (uint64_t)c->n_shared_experts * expert;

    uint64_t tot = 0, act = 0;
    for (int64_t l = 0; l < c->n_layers; l++) {
        tot += attn + norms;
        act += attn + norms;
        if (ds_config_layer_is_moe(c, l)) {
            tot += router + E * expert + shared;
            act += router + (uint64_t)c->n_experts_per_tok * expert + shared;
        } else {
            tot += dense_mlp;
            act += dense_mlp;
        }
    }
    const uint64_t V = (uint64_t)c->vocab_size;
    uint64_t outer = V * H + H;                  /* embed_tokens, model.norm */
    if (!c->tie_word_embeddings) outer += V * H; /* lm_head */
    *total = tot + outer;
    *active = act + outer;
}
