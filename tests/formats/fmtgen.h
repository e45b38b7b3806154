/* fmtgen: writes small checkpoints in the foreign quantized layouts of FORMATS-SPEC.md
 * (/work/shared/FORMATS-SPEC.md, cited as §N) from a BF16 Hugging Face DeepSeek-V3 checkpoint,
 * each with its "dequantized reference", for the loader's tests (tests/formats/test_formats.c).
 *
 * It is written from the spec and the decisions recorded below, not from the loader
 * (src/model/format.c, weights.c): when the two read the spec differently, engine(OUT) and
 * engine(REF) disagree.
 *
 * Decisions shared by every layout:
 *  - Projections are the 2-D model.layers.L.self_attn.*.weight and model.layers.L.mlp.*.weight
 *    of the decoder layers (L < num_hidden_layers), except the router mlp.gate.weight. Every
 *    other tensor (embedding, norms, router, e_score_correction_bias, lm_head, final norm, MTP
 *    layers) is copied unchanged (renamed, and MTP layers dropped, in the MindSpore-named
 *    layouts); tokenizer.json and tokenizer_config.json too.
 *  - Weights are quantized symmetrically: per output channel s[n] = max_k |w[n,k]| / qmax (1 for
 *    an all-zero row), q = clamp(rint(w / s), qmin, qmax), rint rounding ties to even; int8 per
 *    channel [-128, 127] / 127, int4 [-8, 7] / 7, block int8 [-127, 127] / 127 per 128 x 128.
 *    A scale stored as BF16 is rounded to BF16 first and the weights quantized with the rounded
 *    value, so that q * the stored scale is the weight meant.
 *  - REF is a plain checkpoint (model.safetensors, config.json without quantization_config and
 *    the informational msModelSlim keys, Hugging Face names and order): each quantized
 *    projection becomes the F32 weight it stands for (dynamic: q * s rounded once; static:
 *    q * deq_scale / input_scale computed in double and rounded once, input_scale of the input
 *    channel when there is one per channel), FLOAT projections stay as they are, and no norm
 *    bias is written: the static layers' norm bias and float bias cancel exactly, so REF drops
 *    both. */
#ifndef FMTGEN_H
#define FMTGEN_H

#include <stdint.h>
#include <stddef.h>

typedef enum {
    /* msModelSlim "ascend" R1 W8A8 mix (§0, §1): attention q_a/q_b (or q)/kv_a/o static W8A8
     * with anti-outlier norm biases, kv_b FLOAT, every MLP projection W8A8_DYNAMIC; two shards
     * quant_model_weight_w8a8_dynamic-0000i-of-00002.safetensors with their
     * *.safetensors.index.json and quant_model_description.json, no quantization_config. */
    FMTGEN_MODELSLIM_W8A8,
    /* msModelSlim per-channel W4A8 mix (§1): attention (but kv_b) and dense/shared MLP
     * W8A8_DYNAMIC, routed experts W4A8_DYNAMIC (int4 packed along the output axis,
     * scale_bias); no static layer, no norm bias. Every expert projection needs an even out. */
    FMTGEN_MODELSLIM_W4A8,
    /* MindSpore golden-stick "ptq" with Hugging Face names (§2): the static attention of the
     * W8A8 mix with BF16 input_scale and I8 input_offset, MLP per-channel int8 with
     * weight_scale / weight_offset; quant_model_w8a8.index.json over one shard. */
    FMTGEN_MS_PTQ,
    /* SGLang blockwise_int8 (§5): every projection, kv_b included, I8 with weight_scale_inv per
     * 128 x 128 block (edge blocks partial); one model.safetensors. */
    FMTGEN_BLOCK_INT8,
    /* MindSpore golden-stick "smoothquant" with MindSpore parameter names (§3): attention static
     * W8A8 with input_scale / input_zp per input channel (the smoothing folded into them),
     * kv_b split into lkv2kv_k_nope / lkv2kv_v, dense and shared MLP per-token int8 with BF16
     * weight_scale [out], routed experts stacked int8 [E, in, out] with BF16 [E, out]; rope rows
     * of l2q_proj / kv2l rotate-half ordered; quant_model-00001-of-00001.safetensors with
     * quant_model.safetensors.index.json and a decoy model-mtp.index.json; MTP not written.
     * A source without q_lora is refused: MindSpore's name for q_proj is unconfirmed (§3). */
    FMTGEN_MS_SMOOTHQUANT,
    /* MindSpore golden-stick "a8w4" (§3): as smoothquant but per-tensor static attention, and
     * routed experts int4 [E, in, out/2] packed along the output axis with U64 (fp32 bits)
     * scales [E, ceil(in / G), out] per group of G input rows; one a8w4-00001-of-00001.safetensors
     * with the flat map a8w4_name_map.json. G is 256 as in the release when in >= 512, else
     * in / 4 (a test-only choice, so that the small test models have several groups). */
    FMTGEN_MS_A8W4,
} fmtgen_kind;
#define FMTGEN_N_KINDS 6

/* "modelslim-w8a8", "modelslim-w4a8", "ms-ptq", "block-int8", "ms-smoothquant", "ms-a8w4". */
const char *fmtgen_kind_name(fmtgen_kind kind);

/* Writes SRC (a BF16 Hugging Face DeepSeek-V3 checkpoint directory) in layout `kind` into the
 * directory OUT and its dequantized reference into REF (both created when absent; existing
 * files of the same names are replaced). The static schemes calibrate on the BF16 model run
 * over prompts[i][0, lens[i]) for i < n_prompts (token ids); the others ignore them.
 * Returns 0, else a ds_err after printing why on stderr ("fmtgen <kind>: <message>"). */
int fmtgen_write(fmtgen_kind kind, const char *src, const char *out, const char *ref,
                 const int32_t *const *prompts, const int64_t *lens, int n_prompts);

/* ---- running and comparing checkpoints (the engine, single rank) ---- */

/* Opens dir and runs ids[0, n) from position 0, then `steps` greedy tokens: cont[s] is the
 * argmax of logits row n - 1 + s and is fed back. *logits (malloc'd, caller frees) is
 * [n + steps][*vocab]: the next-token logits after each prompt token, then after each
 * continuation token. Returns a ds_err with the message set (ds_err_msg) when the checkpoint
 * does not open or a forward fails; *logits is NULL then. */
int fmtgen_run(const char *dir, const int32_t *ids, int64_t n, int steps, float **logits,
               int64_t *vocab, int32_t *cont);

/* The MindSpore name of the Hugging Face tensor name or projection prefix `hf` (a routed
 * expert's: the stacked tensor's), into buf; DS_ERR_UNSUPPORTED when none is known. */
int fmtgen_ms_name(const char *hf, char *buf, size_t cap);

/* Agreement of logits `got` with logits `ref` over positions, accumulated by fmtgen_compare. A
 * position is "clear" when ref's top-1 leads its runner-up by more than 0.5. */
typedef struct {
    int positions, top1_same, top1_clear, top1_clear_same;
    double kl_sum, kl_max; /* KL(softmax(ref) || softmax(got)) */
} fmtgen_agreement;

void fmtgen_compare(fmtgen_agreement *a, const float *ref, const float *got, int64_t n,
                    int64_t vocab);
/* Index of the largest logit (the first of equals). */
int64_t fmtgen_argmax(const float *logits, int64_t vocab);
/* Top-1 logit minus the runner-up's. */
double fmtgen_margin(const float *logits, int64_t vocab);
/* One line: positions, top-1 agreement (all and clear), mean and max KL. */
void fmtgen_report(const char *what, const fmtgen_agreement *a);

#endif
