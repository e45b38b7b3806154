/* Rotary position embedding with YaRN, as DeepSeek-V3 applies it to the rope part of q and k.
 *
 * The arithmetic mirrors the official reference (inference/model.py) in f32: inverse
 * frequencies base^(-2i/d) blended between interpolated (/factor) and extrapolated values by a
 * linear ramp between the correction dims of beta_fast and beta_slow; angle = f32(pos * freq);
 * pairs are interleaved (x[2i], x[2i+1]) and rotated as a complex multiply. As in Hugging Face
 * and vLLM, YaRN applies whenever rope_scaling says so (not only beyond the original context),
 * its attention mscale enters the softmax scale, and cos/sin carry the ratio
 * mscale(factor, mscale) / mscale(factor, mscale_all_dim), which is 1 for every released
 * DeepSeek-V3/R1 config. */
#include "model/model_internal.h"

#include <math.h>
#include <stdlib.h>

static double yarn_mscale(double factor, double mscale) {
    return factor <= 1 ? 1.0 : 0.1 * mscale * log(factor) + 1.0;
}

/* The dimension index at which a frequency completes num_rotations over max_pos positions. */
static double correction_dim(double num_rotations, double dim, double base, double max_pos) {
    return dim * log(max_pos / (num_rotations * 2 * M_PI)) / (2 * log(base));
}

int ds_rope_init(ds_model *m) {
    const ds_config *c = &m->cfg;
    int64_t half = c->qk_rope_head_dim / 2;
    m->inv_freq = malloc((size_t)half * sizeof(float));
    if (!m->inv_freq) return ds_err_set(DS_ERR_NOMEM, "out of memory (rope tables)");
    float dim = (float)c->qk_rope_head_dim, base = (float)c->rope_theta;
    double low = 0, high = 0;
    if (c->rope_yarn) {
        double orig = (double)c->yarn_original_max_position_embeddings;
        low = floor(correction_dim(c->yarn_beta_fast, dim, base, orig));
        high = ceil(correction_dim(c->yarn_beta_slow, dim, base, orig));
        if (low < 0) low = 0;
        if (high > dim - 1) high = dim - 1;
        if (low == high) high += 0.001;
    }
    for (int64_t i = 0; i < half; i++) {
        float f = 1.0f / powf(base, (float)(2 * i) / dim);
        if (c->rope_yarn) {
            float ramp = (float)(((double)i - low) / (high - low));
            ramp = ramp < 0 ? 0 : ramp > 1 ? 1 : ramp;
            float smooth = 1.0f - ramp;
            f = f / (float)c->yarn_factor * (1.0f - smooth) + f * smooth;
        }
        m->inv_freq[i] = f;
    }
    double scale = 1.0 / sqrt((double)(c->qk_nope_head_dim + c->qk_rope_head_dim));
    m->rope_mscale = 1.0f;
    if (c->rope_yarn) {
        if (c->yarn_mscale_all_dim != 0) {
            double ms = yarn_mscale(c->yarn_factor, c->yarn_mscale_all_dim);
            scale *= ms * ms;
        }
        m->rope_mscale = (float)(yarn_mscale(c->yarn_factor, c->yarn_mscale) /
                                 yarn_mscale(c->yarn_factor, c->yarn_mscale_all_dim));
    }
    m->softmax_scale = (float)scale;
    return DS_OK;
}

void ds_rope_table(const ds_model *m, int64_t pos, float *cs) {
    int64_t half = m->cfg.qk_rope_head_dim / 2;
    for (int64_t i = 0; i < half; i++) {
        float angle = (float)pos * m->inv_freq[i];
        cs[2 * i] = (float)cos((double)angle) * m->rope_mscale;
        cs[2 * i + 1] = (float)sin((double)angle) * m->rope_mscale;
    }
}

void ds_rope_rotate(float *x, const float *cs, int64_t rope_dim) {
    for (int64_t i = 0; i < rope_dim; i += 2) {
        float a = x[i], b = x[i + 1], c = cs[i], s = cs[i + 1];
        x[i] = a * c - b * s;
        x[i + 1] = a * s + b * c;
    }
}
