/* `dsinfer quantize IN_DIR OUT_DIR --scheme w8a8|w4a8`: a DeepSeek-V3 checkpoint in any format
 * dsinfer loads (BF16 / F16 / F32, the official FP8, and the int8 / int4 formats of
 * src/model/format.c) -> the int8 formats the CPU kernels run (docs/formats.md).
 *
 * Which tensors. Every 2-D `*.weight` under `model.layers.N.self_attn.` and `model.layers.N.mlp.`
 * (MTP layers N >= num_hidden_layers included), except the router `mlp.gate.weight`; with
 * --quantize-lm-head also `lm_head.weight`. Everything else (embeddings, norms, router and its
 * e_score_correction_bias, lm_head by default, MTP's eh_proj / shared_head) is copied: BF16 byte
 * for byte, an FP8 or int8 one dequantised to BF16, any other dtype unchanged. The source's
 * quantization data (scales, zero points, quant_bias, anti-outlier norm biases) is consumed by
 * the weights it belongs to, never copied: a static W8A8 linear is read as its real weight
 * q x deq_scale / input_scale, and its folded bias is dropped together with the norm bias it
 * compensates (docs/formats.md).
 *
 * Layouts (src/kernels/kernels.h, ds_mat, is the authority):
 *   W8A8  <p>.weight I8 [out, in], <p>.weight_scale F32 [out, 1]; per row s = max|w| / 127
 *         (1 for an all-zero row), q = clamp(rint(w / s), -127, 127) — SGLang's w8a8_int8.
 *   W4A8  <p>.weight I8 [out, ceil(in / 2)], <p>.weight_scale F32 [out, ceil(in / G)]; per
 *         group of G input columns s = max|w| / 7 (1 when all zero), q = clamp(rint(w / s), -8,
 *         7), byte j of a row = column 2j in the low nibble, 2j + 1 in the high one (an odd last
 *         high nibble is 0) — dsinfer's w4a8_int4.
 * rint rounds half to even (the default rounding mode). The source row is first dequantised
 * to f32 exactly as the reference does (ds_mat_row_f32: fp8 x scale_inv rounded once).
 *
 * Memory. The source shards are mmapped; a tensor is read row by row (rows split over a thread
 * pool, one f32 row of scratch per thread) into one output buffer of the tensor's quantized
 * size, written, and then its source pages are dropped with madvise(MADV_DONTNEED), so the
 * resident set stays near the largest single tensor whatever the checkpoint's size. Copied
 * tensors go from the mapping to the file without a buffer.
 *
 * Crash safety. Everything is written into OUT_DIR.tmp-XXXXXX and renamed to OUT_DIR after the
 * manifest, the last file, so an interrupted run never leaves a directory named OUT_DIR. SIGINT
 * and SIGTERM stop at the next tensor and remove the temporary directory; SIGKILL leaves it
 * behind, under its .tmp- name. */
#include "cli/cli.h"
#include "core/core.h"
#include "io/io.h"
#include "kernels/kernels.h"
#include "model/model.h"

#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

typedef enum { QZ_W8A8, QZ_W4A8 } qz_scheme;

/* What happens to one source tensor. */
typedef enum {
    QZ_COPY,    /* bytes unchanged */
    QZ_TO_BF16, /* an FP8 tensor outside the quantized set: dequantised to BF16 */
    QZ_QUANT,   /* quantized: two output tensors (weight, weight_scale) */
} qz_action;

typedef struct {
    char name[256];          /* the logical tensor (ds_format_logical): written under this name */
    const ds_st_tensor *src; /* the source tensor holding it (view into the set) */
    uint64_t in_bytes;       /* its share of src (MindSpore stacks the experts of a layer) */
    int64_t rows, cols;      /* QZ_QUANT, QZ_TO_BF16: the logical matrix (ds_format_shape) */
    qz_action action;
    ds_dtype out_dtype;
    int64_t out_shape[DS_ST_MAX_DIMS]; /* the weight (or copied tensor) */
    int out_ndim;
    int64_t scale_shape[2]; /* QZ_QUANT: weight_scale [out, n_groups] */
    uint64_t out_bytes, scale_bytes;
    int shard;
} qz_item;

typedef struct {
    qz_scheme scheme;
    int64_t group; /* W4A8 group size along the input */
    int lm_head;
} qz_opts;

static volatile sig_atomic_t qz_interrupted;
static void on_signal(int sig) {
    (void)sig;
    qz_interrupted = 1;
}

/* ---- the plan ------------------------------------------------------------------------------ */
/* Whether a tensor name is one of the projections this command quantizes. */
static int is_quantized_name(const char *name, int lm_head) {
    if (lm_head && strcmp(name, "lm_head.weight") == 0) return 1;
    const char *p = "model.layers.";
    if (strncmp(name, p, strlen(p)) != 0) return 0;
    const char *s = name + strlen(p);
    if (*s < '0' || *s > '9') return 0;
    while (*s >= '0' && *s <= '9') s++;
    if (strncmp(s, ".self_attn.", 11) != 0 && strncmp(s, ".mlp.", 5) != 0) return 0;
    if (strcmp(s, ".mlp.gate.weight") == 0) return 0; /* the router */
    return ds_str_ends_with(name, ".weight");
}

static int64_t cdiv(int64_t a, int64_t b) {
    return (a + b - 1) / b;
}

/* One logical tensor of source tensor t (one of `parts`). */
static int plan_item(ds_format *fmt, const qz_opts *o, const ds_st_tensor *t, int64_t parts,
                     qz_item *q) {
    q->src = t;
    q->in_bytes = t->nbytes / (uint64_t)parts;
    q->out_dtype = t->dtype;
    q->out_ndim = t->ndim;
    memcpy(q->out_shape, t->shape, sizeof q->out_shape);
    q->out_bytes = t->nbytes;
    char prefix[256];
    int matrix = t->ndim >= 2; /* MindSpore stacks experts in 3-D */
    int proj = matrix && is_quantized_name(q->name, o->lm_head);
    int stored = matrix && ds_str_ends_with(q->name, ".weight") &&
                 (parts > 1 || t->dtype == DS_F8_E4M3 || t->dtype == DS_I8);
    if (!proj && !stored) {
        q->action = QZ_COPY;
        return DS_OK;
    }
    snprintf(prefix, sizeof prefix, "%.*s", (int)(strlen(q->name) - 7), q->name);
    int rc = ds_format_shape(fmt, prefix, &q->rows, &q->cols);
    if (rc) return rc;
    q->out_ndim = 2;
    q->out_shape[0] = q->rows;
    if (!proj) {
        q->action = QZ_TO_BF16;
        q->out_dtype = DS_BF16;
        q->out_shape[1] = q->cols;
        q->out_bytes = (uint64_t)q->rows * (uint64_t)q->cols * 2;
        return DS_OK;
    }
    q->action = QZ_QUANT;
    q->out_dtype = DS_I8;
    if (o->scheme == QZ_W8A8) {
        q->out_shape[1] = q->cols;
        q->scale_shape[1] = 1;
    } else {
        q->out_shape[1] = cdiv(q->cols, 2);
        q->scale_shape[1] = cdiv(q->cols, o->group);
    }
    q->scale_shape[0] = q->rows;
    q->out_bytes = (uint64_t)q->rows * (uint64_t)q->out_shape[1];
    q->scale_bytes = (uint64_t)q->rows * (uint64_t)q->scale_shape[1] * sizeof(float);
    return DS_OK;
}

/* The source's quantization data (scales, zero points, biases of its quantized projections,
 * anti-outlier norm biases) is consumed; its projections are requantized, its other stored
 * matrices (an FP8 or int8 tensor outside the set) dequantised to BF16, the rest copied. The
 * format decides how each is read (src/model/format.c). */
static int build_plan(const ds_st_set *set, ds_format *fmt, const qz_opts *o, qz_item **out,
                      size_t *n_out) {
    size_t n = 0;
    for (size_t i = 0; i < ds_st_count(set); i++)
        n += (size_t)ds_format_logical(fmt, ds_st_at(set, i)->name, 0, NULL, 0);
    qz_item *it = calloc(n ? n : 1, sizeof *it);
    if (!it) return ds_err_set(DS_ERR_NOMEM, "out of memory");
    int rc = DS_OK;
    size_t k = 0;
    for (size_t i = 0; !rc && i < ds_st_count(set); i++) {
        const ds_st_tensor *t = ds_st_at(set, i);
        int64_t parts = ds_format_logical(fmt, t->name, 0, NULL, 0);
        for (int64_t part = 0; !rc && part < parts; part++) {
            qz_item *q = &it[k++];
            ds_format_logical(fmt, t->name, part, q->name, sizeof q->name);
            rc = plan_item(fmt, o, t, parts, q);
        }
    }
    if (rc) {
        free(it);
        return rc;
    }
    *out = it;
    *n_out = n;
    return DS_OK;
}

/* Greedy in order; a weight and its weight_scale share a shard. Returns the shard count. */
static int assign_shards(qz_item *it, size_t n, uint64_t shard_bytes) {
    int shard = 0;
    uint64_t cur = 0;
    for (size_t i = 0; i < n; i++) {
        uint64_t b = it[i].out_bytes + it[i].scale_bytes;
        if (cur > 0 && cur + b > shard_bytes) {
            shard++;
            cur = 0;
        }
        it[i].shard = shard;
        cur += b;
    }
    return shard + 1;
}

static void scale_name(char *buf, size_t cap, const char *weight) {
    snprintf(buf, cap, "%s_scale", weight);
}

/* ---- quantizing one tensor ----------------------------------------------------------------- */
typedef struct {
    const ds_mat *src; /* the source matrix */
    const qz_opts *o;
    int8_t *q;    /* [rows, row_bytes] */
    float *scale; /* [rows, n_groups] */
    float **rowf; /* per pool slice: cols floats */
    int64_t row_bytes, n_groups;
    const int64_t *stored; /* output row r is source row stored[r] (ds_format_stored_rows) */
} qz_job;

/* q = clamp(rint(w / s), lo, hi) for w[0, n) with s = max|w| / hi (1 when all zero). */
static float quant_group(const float *w, int64_t n, float lo, float hi, int8_t *q) {
    float mx = 0.0f;
    for (int64_t i = 0; i < n; i++) mx = fmaxf(mx, fabsf(w[i]));
    const float s = mx > 0.0f ? mx / hi : 1.0f;
    for (int64_t i = 0; i < n; i++) {
        float v = rintf(w[i] / s);
        v = v < lo ? lo : v > hi ? hi : v;
        q[i] = (int8_t)v;
    }
    return s;
}

static void quant_rows(void *arg, int slice, int n_slices) {
    const qz_job *j = arg;
    const int64_t cols = j->src->cols;
    size_t lo, hi;
    ds_split_range((size_t)j->src->rows, slice, n_slices, &lo, &hi);
    float *w = j->rowf[slice];
    int8_t *tmp = (int8_t *)(w + cols); /* cols int8 after the floats (W4A8 staging) */
    for (size_t r = lo; r < hi; r++) {
        ds_mat_row_f32(j->src, j->stored[r], w);
        int8_t *qr = j->q + r * (size_t)j->row_bytes;
        float *sr = j->scale + r * (size_t)j->n_groups;
        if (j->o->scheme == QZ_W8A8) {
            sr[0] = quant_group(w, cols, -127.0f, 127.0f, qr);
            continue;
        }
        for (int64_t g = 0; g < j->n_groups; g++) {
            int64_t c0 = g * j->o->group, n = cols - c0 < j->o->group ? cols - c0 : j->o->group;
            sr[g] = quant_group(w + c0, n, -8.0f, 7.0f, tmp + c0);
        }
        for (int64_t b = 0; b < j->row_bytes; b++) {
            uint8_t l = (uint8_t)tmp[2 * b] & 0xF;
            uint8_t h = 2 * b + 1 < cols ? (uint8_t)tmp[2 * b + 1] & 0xF : 0;
            qr[b] = (int8_t)(uint8_t)(l | (uint8_t)(h << 4));
        }
    }
}

typedef struct {
    void *buf;
    size_t cap;
    float **rowf; /* n_slices rows of scratch */
    int n_slices;
    int64_t rowf_cols;
} qz_scratch;

static int grow(void **p, size_t *cap, size_t need) {
    if (need <= *cap) return 1;
    free(*p);
    *p = malloc(need);
    *cap = *p ? need : 0;
    return *p != NULL;
}

static int ensure_rows(qz_scratch *sc, int64_t cols) {
    if (cols <= sc->rowf_cols) return 1;
    for (int i = 0; i < sc->n_slices; i++) {
        ds_free(sc->rowf[i]);
        /* cols floats + cols int8 of staging for the int4 packing */
        sc->rowf[i] = ds_alloc((size_t)cols * (sizeof(float) + 1) + 64);
        if (!sc->rowf[i]) {
            sc->rowf_cols = 0;
            return 0;
        }
    }
    sc->rowf_cols = cols;
    return 1;
}

/* Writes the data of item q (one or two ds_st_writer_data calls). */
static int write_item(ds_st_writer *w, ds_pool *pool, ds_format *fmt, const qz_opts *o,
                      const qz_item *q, qz_scratch *sc) {
    int rc = DS_OK;
    ds_mat m;
    char prefix[512];
    snprintf(prefix, sizeof prefix, "%.*s", (int)(strlen(q->name) - 7), q->name);
    if (q->action != QZ_COPY) { /* bound as the source's format stores it */
        if ((rc = ds_format_bind(fmt, prefix, q->rows, q->cols, &m, NULL))) return rc;
    }
    if (q->action == QZ_COPY) {
        rc = ds_st_writer_data(w, q->src->data, q->src->nbytes);
    } else if (q->action == QZ_TO_BF16) {
        if (!grow(&sc->buf, &sc->cap, (size_t)q->out_bytes + 1) || !ensure_rows(sc, m.cols))
            return ds_err_set(DS_ERR_NOMEM, "out of memory converting '%s'", q->name);
        uint16_t *d = sc->buf;
        for (int64_t r = 0; r < m.rows; r++) {
            ds_mat_row_f32(&m, r, sc->rowf[0]);
            for (int64_t c = 0; c < m.cols; c++) d[r * m.cols + c] = ds_f32_to_bf16(sc->rowf[0][c]);
        }
        rc = ds_st_writer_data(w, sc->buf, q->out_bytes);
    } else {
        if (!grow(&sc->buf, &sc->cap, (size_t)(q->out_bytes + q->scale_bytes) + 1) ||
            !ensure_rows(sc, m.cols))
            return ds_err_set(DS_ERR_NOMEM, "out of memory quantizing '%s' (%llu bytes)", q->name,
                              (unsigned long long)(q->out_bytes + q->scale_bytes));
        /* the scales first (4-byte aligned at the buffer start), then the int8 data */
        int64_t *stored = malloc((size_t)q->rows * sizeof *stored);
        if (!stored) return ds_err_set(DS_ERR_NOMEM, "out of memory quantizing '%s'", q->name);
        ds_format_stored_rows(fmt, prefix, q->rows, stored);
        qz_job j = {&m,
                    o,
                    (int8_t *)sc->buf + q->scale_bytes,
                    sc->buf,
                    sc->rowf,
                    q->out_shape[1],
                    q->scale_shape[1],
                    stored};
        ds_pool_run(pool, quant_rows, &j);
        free(stored);
        rc = ds_st_writer_data(w, j.q, q->out_bytes);
        if (!rc) rc = ds_st_writer_data(w, j.scale, q->scale_bytes);
    }
    ds_st_drop_pages(q->src);
    ds_format_release(fmt); /* a repacked source tensor */
    return rc;
}

typedef struct {
    size_t n_quant, n_copy;
    uint64_t bytes_in, bytes_out;
} qz_stats;

static int write_shards(const char *dir, ds_pool *pool, ds_format *fmt, const qz_opts *o,
                        const qz_item *it, size_t n, int n_shards, qz_stats *st) {
    qz_scratch sc = {0};
    sc.n_slices = ds_pool_size(pool);
    sc.rowf = calloc((size_t)sc.n_slices, sizeof *sc.rowf);
    if (!sc.rowf) return ds_err_set(DS_ERR_NOMEM, "out of memory");
    ds_progress pb;
    uint64_t total = 0;
    for (size_t i = 0; i < n; i++) total += it[i].in_bytes;
    ds_progress_begin(&pb, "quantize", total);
    int rc = DS_OK;
    size_t i = 0;
    char sname[512];
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
        for (; !rc && j < n && it[j].shard == s; j++) {
            const qz_item *q = &it[j];
            rc = ds_st_writer_add(w, q->name, q->out_dtype, q->out_ndim, q->out_shape);
            if (!rc && q->action == QZ_QUANT) {
                scale_name(sname, sizeof sname, q->name);
                rc = ds_st_writer_add(w, sname, DS_F32, 2, q->scale_shape);
            }
        }
        if (!rc) rc = ds_st_writer_begin_data(w);
        for (size_t k = i; !rc && k < j; k++) {
            const qz_item *q = &it[k];
            if (qz_interrupted) rc = ds_err_set(DS_ERR_IO, "interrupted");
            if (!rc) rc = write_item(w, pool, fmt, o, q, &sc);
            if (!rc) {
                if (q->action == QZ_QUANT)
                    st->n_quant++;
                else
                    st->n_copy++;
                st->bytes_out += q->out_bytes + q->scale_bytes;
            }
            st->bytes_in += q->in_bytes;
            ds_progress_add(&pb, q->in_bytes);
        }
        if (w) { /* after a failure, closing reports the unwritten tensors: keep the cause */
            char why[512];
            snprintf(why, sizeof why, "%s", ds_err_msg());
            int rc2 = ds_st_writer_close(w);
            if (rc) ds_err_set(rc, "%s", why);
            rc = rc ? rc : rc2;
        }
        free(path);
        i = j;
    }
    ds_progress_end(&pb);
    free(sc.buf);
    for (int k = 0; k < sc.n_slices; k++) ds_free(sc.rowf[k]);
    free(sc.rowf);
    return rc;
}

/* ---- JSON outputs -------------------------------------------------------------------------- */
/* Whether every real in j survives printing with 15 significant digits (true for what people
 * write in config files: 1e-06, 0.02, 2.5); else the config is printed with 17, exact always. */
static int reals_short(const json_t *j) {
    if (json_is_real(j)) {
        char buf[64];
        snprintf(buf, sizeof buf, "%.15g", json_real_value(j));
        return strtod(buf, NULL) == json_real_value(j);
    }
    if (json_is_object(j)) {
        const char *k;
        json_t *v;
        json_object_foreach((json_t *)j, k, v) if (!reals_short(v)) return 0;
    } else if (json_is_array(j)) {
        size_t i;
        json_t *v;
        json_array_foreach(j, i, v) if (!reals_short(v)) return 0;
    }
    return 1;
}

static int dump_json(json_t *j, const char *dir, const char *name) {
    char *path = ds_cli_path_join(dir, name);
    if (!path) return ds_err_set(DS_ERR_NOMEM, "out of memory");
    int rc = DS_OK;
    size_t prec = reals_short(j) ? 15 : 17;
    if (json_dump_file(j, path, JSON_INDENT(2) | JSON_REAL_PRECISION(prec)))
        rc = ds_err_set(DS_ERR_IO, "%s: cannot write: %s", path, strerror(errno));
    free(path);
    return rc;
}

/* The quantization_config written for a scheme (docs/formats.md). */
static json_t *quant_config(const qz_opts *o) {
    if (o->scheme == QZ_W8A8)
        return json_pack("{s:s, s:s}", "quant_method", "w8a8_int8", "activation_scheme", "dynamic");
    return json_pack("{s:s, s:I, s:s}", "quant_method", "w4a8_int4", "group_size",
                     (json_int_t)o->group, "activation_scheme", "dynamic");
}

static int write_index(const char *dir, const qz_item *it, size_t n, int n_shards) {
    json_t *map = json_object();
    uint64_t total = 0;
    char sname[512];
    for (size_t i = 0; map && i < n; i++) {
        char fname[64];
        ds_cli_shard_name(fname, sizeof fname, it[i].shard, n_shards);
        int bad = json_object_set_new(map, it[i].name, json_string(fname));
        if (it[i].action == QZ_QUANT) {
            scale_name(sname, sizeof sname, it[i].name);
            bad |= json_object_set_new(map, sname, json_string(fname));
        }
        if (bad) {
            json_decref(map);
            map = NULL;
        }
        total += it[i].out_bytes + it[i].scale_bytes;
    }
    return ds_cli_write_index(dir, map, total);
}

/* ---- the command ---------------------------------------------------------------------------- */
static void usage(FILE *f) {
    fprintf(f,
            "usage: dsinfer quantize IN_DIR OUT_DIR --scheme w8a8|w4a8 [options]\n"
            "Converts a BF16/F16/F32 or official FP8 DeepSeek-V3 checkpoint to int8 weights\n"
            "(every attention and MLP/expert projection; docs/formats.md).\n"
            "  --scheme w8a8|w4a8      w8a8: int8 per output channel (SGLang w8a8_int8);\n"
            "                          w4a8: int4 per input group, packed along rows (w4a8_int4)\n"
            "  --group-size G          W4A8 group along the input (default 128)\n"
            "  --quantize-lm-head      also quantize lm_head.weight (default: copied)\n"
            "  --shard-bytes N[K|M|G]  bytes per output shard (default 4G)\n"
            "  --threads N             quantizing threads (default: all CPUs)\n"
            "  --force                 replace a non-empty OUT_DIR\n");
}

int ds_cmd_quantize(int argc, char **argv) {
    const char *in_dir = NULL, *out_arg = NULL, *scheme = NULL;
    uint64_t group = 128, shard_bytes = 4ull << 30, threads = 0;
    int force = 0;
    qz_opts o = {QZ_W8A8, 128, 0};
    static const struct option opts[] = {{"scheme", required_argument, 0, 's'},
                                         {"group-size", required_argument, 0, 'g'},
                                         {"shard-bytes", required_argument, 0, 'b'},
                                         {"threads", required_argument, 0, 't'},
                                         {"quantize-lm-head", no_argument, 0, 'l'},
                                         {"force", no_argument, 0, 'f'},
                                         {"help", no_argument, 0, 'h'},
                                         {0, 0, 0, 0}};
    int c;
    optind = 0; /* full reset: tests call this repeatedly in one process */
    while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (c) {
        case 's':
            scheme = optarg;
            break;
        case 'g':
            if (!ds_cli_parse_u64(optarg, &group, 0) || group == 0 || group > (1u << 30)) {
                fprintf(stderr, "dsinfer quantize: --group-size '%s' is not a positive integer\n",
                        optarg);
                return 2;
            }
            break;
        case 'b':
            if (!ds_cli_parse_u64(optarg, &shard_bytes, 1) || shard_bytes == 0) {
                fprintf(stderr, "dsinfer quantize: --shard-bytes '%s' is not a positive size\n",
                        optarg);
                return 2;
            }
            break;
        case 't':
            if (!ds_cli_parse_u64(optarg, &threads, 0) || threads > 4096) {
                fprintf(stderr, "dsinfer quantize: --threads '%s' is not a thread count\n", optarg);
                return 2;
            }
            break;
        case 'l':
            o.lm_head = 1;
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
    if (argc - optind > 2) {
        fprintf(stderr, "dsinfer quantize: unexpected argument '%s'\n", argv[optind + 2]);
        return 2;
    }
    if (optind < argc) in_dir = argv[optind];
    if (optind + 1 < argc) out_arg = argv[optind + 1];
    if (!in_dir || !out_arg) {
        usage(stderr);
        return 2;
    }
    if (!scheme) {
        fprintf(stderr, "dsinfer quantize: --scheme w8a8|w4a8 is required\n");
        return 2;
    }
    if (!strcmp(scheme, "w4a8"))
        o.scheme = QZ_W4A8;
    else if (strcmp(scheme, "w8a8") != 0) {
        fprintf(stderr, "dsinfer quantize: unknown --scheme '%s' (w8a8 or w4a8)\n", scheme);
        return 2;
    }
    o.group = (int64_t)group;

    const double t0 = ds_now();
    int status = 1, rc = DS_OK;
    ds_cli_outdir od = {0};
    ds_st_set *set = NULL;
    ds_format *fmt = NULL;
    ds_config src_cfg;
    ds_pool *pool = NULL;
    json_t *cfg = NULL;
    qz_item *it = NULL;
    size_t n_items = 0;
    qz_stats st = {0};
    struct sigaction sa, old_int, old_term;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    qz_interrupted = 0;
    sigaction(SIGINT, &sa, &old_int);
    sigaction(SIGTERM, &sa, &old_term);

    status = ds_cli_outdir_begin(&od, "quantize", out_arg, force);
    if (status) goto done;
    status = 1;
    const char *tmp = od.tmp, *out = od.out;
    char *cfg_path = ds_cli_path_join(in_dir, "config.json");
    rc = cfg_path ? ds_json_load_file(cfg_path, &cfg) : ds_err_set(DS_ERR_NOMEM, "out of memory");
    free(cfg_path);
    /* the quantization fields are what reading the weights needs (MindSpore's split kv_b also
     * the head counts): a config the model could not run is still a source */
    if (!rc && ds_config_load(in_dir, &src_cfg) != DS_OK)
        rc = ds_config_quant_from_json(cfg, in_dir, &src_cfg);
    if (!rc) rc = ds_st_open_dir(in_dir, &set);
    if (!rc) rc = ds_format_open(in_dir, &src_cfg, set, &fmt);
    if (!rc) rc = build_plan(set, fmt, &o, &it, &n_items);
    if (!rc && !(pool = ds_pool_open((int)threads))) rc = DS_ERR_NOMEM;
    if (rc) {
        fprintf(stderr, "dsinfer quantize: %s\n", ds_err_msg());
        goto done;
    }
    int n_shards = assign_shards(it, n_items, shard_bytes);
    rc = write_shards(tmp, pool, fmt, &o, it, n_items, n_shards, &st);
    if (!rc) rc = write_index(tmp, it, n_items, n_shards);
    if (!rc) {
        /* other toolchains' informational keys describe the source, not this output */
        const char *stale[] = {"quantize", "mla_quantize", "moe_quantize"};
        for (size_t i = 0; i < sizeof stale / sizeof *stale; i++) json_object_del(cfg, stale[i]);
        json_t *qc = quant_config(&o);
        rc = qc && !json_object_set_new(cfg, "quantization_config", qc)
                 ? dump_json(cfg, tmp, "config.json")
                 : ds_err_set(DS_ERR_NOMEM, "out of memory");
    }
    const char *copied[] = {"tokenizer.json", "tokenizer_config.json", "generation_config.json"};
    for (int i = 0; !rc && i < 3; i++) {
        if (!ds_cli_file_exists(in_dir, copied[i])) continue;
        char *src = ds_cli_path_join(in_dir, copied[i]), *dst = ds_cli_path_join(tmp, copied[i]);
        rc = src && dst ? ds_cli_copy_file(src, dst) : ds_err_set(DS_ERR_NOMEM, "out of memory");
        free(src);
        free(dst);
    }
    if (!rc && qz_interrupted) rc = ds_err_set(DS_ERR_IO, "interrupted");
    if (!rc) rc = ds_manifest_write(tmp, (int)threads, NULL); /* the last file: io/manifest.c */
    if (rc) {
        fprintf(stderr, "dsinfer quantize: %s\n", ds_err_msg());
        goto done;
    }
    if (ds_cli_outdir_publish(&od, "quantize")) goto done;
    printf("quantized %s -> %s (%s", in_dir, out, o.scheme == QZ_W8A8 ? "w8a8_int8" : "w4a8_int4");
    if (o.scheme == QZ_W4A8) printf(", group %lld", (long long)o.group);
    printf("): %zu tensors quantized, %zu copied, %.1f MB in -> %.1f MB out in %d shard%s, "
           "%.1f s\n",
           st.n_quant, st.n_copy, (double)st.bytes_in / 1e6, (double)st.bytes_out / 1e6, n_shards,
           n_shards == 1 ? "" : "s", ds_now() - t0);
    status = 0;
done:
    ds_cli_outdir_end(&od);
    sigaction(SIGINT, &old_int, NULL);
    sigaction(SIGTERM, &old_term, NULL);
    free(it);
    ds_pool_close(pool);
    ds_format_close(fmt);
    ds_st_close(set);
    json_decref(cfg);
    return status;
}
