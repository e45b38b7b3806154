/* io: untrusted bytes from disk -> validated structures.
 *
 * safetensors files are mapped read-only and every header is checked before any tensor is
 * handed out (header length, dtype x shape == byte length, ranges inside the data section, no
 * overlaps); a sharded checkpoint is opened through model.safetensors.index.json. config.json is
 * read completely into a ds_config, refusing values the engine cannot honour by name.
 * Every error message names the file and the tensor or field. */
#ifndef DS_IO_H
#define DS_IO_H

#include "core/core.h"

#include <jansson.h>
#include <stdint.h>

#define DS_ST_MAX_DIMS 8

/* One tensor of a safetensors file. Views only: valid while its file/set is open. */
typedef struct {
    const char *name;
    ds_dtype dtype;
    int ndim;
    int64_t shape[DS_ST_MAX_DIMS];
    const void *data; /* inside the mapping */
    uint64_t nbytes;  /* == numel * dtype size, checked */
    uint64_t offset;  /* absolute offset of the data in the file (for messages) */
    const char *file; /* path of the file holding it */
    /* what ds_st_load_used copies: tensors looked up by ds_st_find and not dropped since */
    unsigned char found, dropped;
} ds_st_tensor;

/* Parsed header of one safetensors file image. */
typedef struct {
    char *path;            /* owned copy of the label/path */
    ds_st_tensor *tensors; /* n_tensors entries, sorted by data offset */
    size_t n_tensors;
    json_t *header;      /* keeps the strings the tensors point to alive */
    uint64_t data_start; /* 8 + header length */
} ds_st_header;

/* Parses and validates the safetensors image buf[0, len). `label` names it in messages.
 * On success fills *out (release with ds_st_header_free); tensor data pointers point into buf.
 * This is the entry point of the fuzz target: it must never crash on any bytes. */
int ds_st_parse(const uint8_t *buf, uint64_t len, const char *label, ds_st_header *out);
void ds_st_header_free(ds_st_header *h); /* accepts a zeroed struct */

/* A set of mapped safetensors files (one file or the shards of an index) with name lookup. */
typedef struct ds_st_set ds_st_set;

/* Opens a checkpoint directory through its index (ds_st_index_name; every shard it names must
 * exist and hold the tensors it lists), else model.safetensors. */
int ds_st_open_dir(const char *dir, ds_st_set **out);
/* The index file of dir (malloc'd name, NULL when there is none): model.safetensors.index.json,
 * else the one *index.json / *_name_map.json whose name contains "quant", else the only such
 * file. Several candidates are refused as ambiguous, naming one. */
int ds_st_index_name(const char *dir, char **out);
/* The tensor -> file map of a parsed index: its "weight_map", or the bare map a MindSpore
 * *_name_map.json may be; NULL when neither is an object. */
json_t *ds_st_index_map(json_t *root);
/* Opens a single file. */
int ds_st_open_file(const char *path, ds_st_set **out);
void ds_st_close(ds_st_set *s); /* accepts NULL */
/* NULL when absent. */
const ds_st_tensor *ds_st_find(const ds_st_set *s, const char *name);
size_t ds_st_count(const ds_st_set *s);
const ds_st_tensor *ds_st_at(const ds_st_set *s, size_t i);
/* Drops the resident pages of a tensor's bytes (file-backed, read-only: they are read again if
 * touched), so a pass over a 700 GB checkpoint (quantize, a repack at load) does not keep it
 * resident; ds_st_load_used then leaves the tensor out. */
void ds_st_drop_pages(const ds_st_tensor *t);
/* The same for bytes [p, p + n) of tensor t (one expert of a stacked tensor). */
void ds_st_drop_range(const ds_st_tensor *t, const void *p, uint64_t n);
/* Loads the weights into memory on 2 MiB pages: each file's mapping is replaced, at the same
 * addresses (every view stays valid), by anonymous memory holding the tensors looked up so far
 * and not dropped, read from the file; with release_cache, the file's page cache is released as
 * it goes (else a restart finds it there). The other tensors of a loaded file lose their data
 * (NULL): call once binding is done. Adds the bytes read to *bytes. On a failure the files not
 * yet loaded stay mapped. */
int ds_st_load_used(ds_st_set *s, int release_cache, uint64_t *bytes);
/* Makes the memory of the files ds_st_load_used loaded writable (writable = 1), for tensors
 * rearranged in place (ds_mat_interleave), or read-only again (0), as loading leaves it. */
int ds_st_loaded_writable(ds_st_set *s, int writable);
/* The bytes ds_st_load_used would read now. */
uint64_t ds_st_used_bytes(const ds_st_set *s);
/* DS_OK while every file of the set is as it was mapped; DS_ERR_IO naming the first one written
 * to or truncated since (its size or modification time changed): the tensors read from it may
 * no longer be the ones loaded. A file replaced by rename, or deleted, is no change: the mapping
 * keeps the file that was opened. One fstat per file. */
int ds_st_check_unchanged(const ds_st_set *s);

/* The SIGBUS guard (mapguard.c): with it installed, a read past the end of a checkpoint file
 * truncated while mapped gives zeros instead of killing the process (ds_st_check_unchanged then
 * reports the file). ds_st_* registers and removes its mappings. */
int ds_mapguard_install(void);
void ds_mapguard_add(const void *p, uint64_t len);
void ds_mapguard_remove(const void *p);

/* Incremental writer of one safetensors file: declare tensors, then write their data in the
 * same order. Used by make-tiny and, later, quantize. */
typedef struct ds_st_writer ds_st_writer;
int ds_st_writer_open(const char *path, ds_st_writer **out);
int ds_st_writer_add(ds_st_writer *w, const char *name, ds_dtype dtype, int ndim,
                     const int64_t *shape);
/* Writes the header; then ds_st_writer_data once per tensor, in declaration order. */
int ds_st_writer_begin_data(ds_st_writer *w);
int ds_st_writer_data(ds_st_writer *w, const void *data, uint64_t nbytes);
/* Finishes and closes (also on error); returns the first error seen. */
int ds_st_writer_close(ds_st_writer *w);

/* ---- JSON helpers (jansson) ---- */
/* Loads a JSON file; on failure the message names the file, line and column. */
int ds_json_load_file(const char *path, json_t **out);

/* ---- config.json ---- */
/* Engine limits, checked when the config is read (DeepSeek-V3 uses 256 experts, rope dim 64). */
#define DS_MAX_EXPERTS 1024
#define DS_MAX_ROPE_DIM 1024

/* quantization_config.quant_method (docs/formats.md). msModelSlim checkpoints have none: their
 * quant_model_description.json is read by the loader (src/model/weights.c). */
typedef enum {
    DS_QUANT_NONE,
    DS_QUANT_FP8,        /* "fp8": the official release */
    DS_QUANT_W8A8,       /* "w8a8_int8": channel-int8 (dsinfer quantize, SGLang) */
    DS_QUANT_W4A8,       /* "w4a8_int4": dsinfer's int4 */
    DS_QUANT_BLOCK_INT8, /* "blockwise_int8": SGLang's 128x128 block int8 */
    DS_QUANT_MS_PTQ,     /* "ptq": MindSpore golden-stick W8A8 with Hugging Face names */
    DS_QUANT_MS_W8A8,    /* "osl", "smoothquant": the same with MindSpore parameter names */
    DS_QUANT_MS_A8W4,    /* "a8w4": MindSpore names, int4 routed experts */
} ds_quant_method;

typedef struct {
    /* dimensions */
    int64_t vocab_size, hidden_size, intermediate_size, moe_intermediate_size;
    int64_t n_layers, n_heads;
    int64_t q_lora_rank; /* 0 when null: q_proj instead of q_a/q_b */
    int64_t kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim;
    /* MoE */
    int64_t n_routed_experts, n_shared_experts, n_experts_per_tok, n_group, topk_group;
    int64_t first_k_dense_replace, moe_layer_freq;
    int norm_topk_prob;
    float routed_scaling_factor;
    /* norms and positions */
    float rms_norm_eps;
    double rope_theta;
    int64_t max_position_embeddings;
    int rope_yarn; /* rope_scaling present with type yarn */
    double yarn_factor, yarn_beta_fast, yarn_beta_slow, yarn_mscale, yarn_mscale_all_dim;
    int64_t yarn_original_max_position_embeddings;
    /* tokens */
    int64_t bos_token_id;
    int64_t eos_token_ids[8];
    int n_eos;
    int tie_word_embeddings;
    ds_dtype torch_dtype;
    int64_t num_nextn_predict_layers; /* MTP layers after the main ones: recognised, skipped */
    /* quantization_config */
    ds_quant_method quant;
    int64_t quant_block[2]; /* fp8 / blockwise_int8 weight_block_size */
    int64_t quant_group;    /* w4a8_int4 group_size (input columns per scale) */
} ds_config;

/* Reads and validates DIR/config.json (or a config.json path). Messages name the field. */
int ds_config_load(const char *path, ds_config *out);
/* Same from a parsed object; `label` names the source in messages. */
int ds_config_from_json(const json_t *root, const char *label, ds_config *out);
/* Only the quantization fields (quant, quant_block, quant_group), the rest zero: what reading
 * the stored weights needs (dsinfer quantize), whatever else the config holds. */
int ds_config_quant_from_json(const json_t *root, const char *label, ds_config *out);
/* Whether layer l uses MoE (else the dense MLP). */
int ds_config_layer_is_moe(const ds_config *c, int64_t l);
/* Writes a human-readable summary of every field. */
void ds_config_print(const ds_config *c, FILE *f);
/* Parameter counts implied by the config (src/io/params.c; pure arithmetic): *total is every
 * weight of the main model (embedding, the n_layers decoder layers with their norms, router and
 * e_score_correction_bias, final norm, lm_head unless tied); *active is what one token reads
 * (the same with only n_experts_per_tok of the routed experts per MoE layer). MTP layers
 * (num_nextn_predict_layers) and fp8 scale tensors are not counted. */
void ds_config_param_counts(const ds_config *c, uint64_t *total, uint64_t *active);

/* ---- SHA-256 ----
 * OpenSSL libcrypto underneath (src/io/sha256.c). Used for the manifest that `dsinfer quantize`
 * writes and `dsinfer check` verifies ("<64 hex>  <file name>" lines, as sha256sum prints). */
typedef struct ds_sha256 ds_sha256;
/* A streaming hasher: open, update any number of times, final once, close (accepts NULL). */
int ds_sha256_open(ds_sha256 **out);
int ds_sha256_update(ds_sha256 *h, const void *data, size_t n);
int ds_sha256_final(ds_sha256 *h, uint8_t out[32]);
void ds_sha256_close(ds_sha256 *h);
/* Digest of data[0, n). */
int ds_sha256_buf(const void *data, size_t n, uint8_t out[32]);
/* Digest of a whole file, read in 1 MiB pieces; the message names the path on failure. */
int ds_sha256_file(const char *path, uint8_t out[32]);
/* Same, calling cb(ctx, bytes) after each piece (progress bars); cb may be NULL. */
int ds_sha256_file_cb(const char *path, uint8_t out[32], void (*cb)(void *ctx, uint64_t n),
                      void *ctx);
/* Lower-case hex of a digest, NUL-terminated. */
void ds_sha256_hex(const uint8_t d[32], char hex[65]);

/* ---- the SHA-256 manifest (src/io/manifest.c) ----
 * DIR/dsinfer-manifest.sha256 holds one line "<64 lower-case hex>  <file name>\n" per regular file
 * of DIR except itself and dot files, sorted by name (byte order): what `sha256sum *` prints, so
 * `sha256sum -c` verifies it as well. `dsinfer quantize` writes it; `dsinfer check` verifies it,
 * or writes it for a downloaded model (--write-manifest). Files are hashed in parallel (one file
 * per thread at a time), streamed in 1 MiB pieces, never loaded whole, with a progress bar on
 * stderr when it is a terminal. */
#define DS_MANIFEST_NAME "dsinfer-manifest.sha256"

typedef enum {
    DS_MANIFEST_OK,         /* listed, present, same digest */
    DS_MANIFEST_MISMATCH,   /* listed, present, another digest: the file changed */
    DS_MANIFEST_MISSING,    /* listed, absent */
    DS_MANIFEST_UNREADABLE, /* listed, present, but reading it failed (see error) */
    DS_MANIFEST_UNLISTED,   /* present, not listed (a README added later): a warning, no more */
} ds_manifest_state;

typedef struct {
    char *name; /* relative to DIR (owned) */
    ds_manifest_state state;
    uint64_t size;    /* bytes on disk; 0 when missing */
    int hashed;       /* got holds the file's digest */
    uint8_t want[32]; /* the manifest's digest (not for UNLISTED) */
    uint8_t got[32];
    char *error; /* UNREADABLE (and an unlisted file that could not be read): the message */
} ds_manifest_file;

typedef struct {
    int present;             /* DIR has a manifest */
    ds_manifest_file *files; /* the listed files in manifest order, then unlisted ones sorted */
    size_t n_files;
    size_t n_ok, n_mismatch, n_missing, n_unreadable, n_unlisted;
    uint64_t bytes_hashed;
    /* SHA-256 of the manifest text of the files as they are now: a line "<hex of got>  <name>\n"
     * per listed file in order ("-" for a digest that could not be taken), then one per hashed
     * unlisted file. It equals the digest of the manifest file itself when every file verifies
     * (and, with no manifest and hash_unlisted, of the one ds_manifest_write would write), so two
     * nodes compare their weights by comparing 32 bytes. */
    uint8_t digest[32];
} ds_manifest_report;

/* Hashes every regular file of dir (except dot files and the manifest) with n_threads threads
 * (<= 0: all CPUs) and writes dir/dsinfer-manifest.sha256 through a temporary dot file renamed
 * into place, replacing an existing manifest. When out is not NULL it receives the report of a
 * verification that would follow (every file OK, the digest of the text written): the caller
 * owns it (ds_manifest_report_free). The message names the file on failure. */
int ds_manifest_write(const char *dir, int n_threads, ds_manifest_report *out);
/* Verifies dir's manifest against the files: each listed file is hashed and marked OK, MISMATCH,
 * MISSING or UNREADABLE; files present but not listed are UNLISTED, and hashed only when
 * hash_unlisted (then they enter the digest too). Without a manifest, out->present is 0 and every
 * file is UNLISTED. Returns an error (and fills nothing the caller must free) only when the check
 * itself cannot be made: the manifest unreadable or malformed (the message names the line), the
 * directory unlistable, out of memory; problems of the files are in the report. Free out with
 * ds_manifest_report_free. */
int ds_manifest_verify(const char *dir, int n_threads, int hash_unlisted, ds_manifest_report *out);
void ds_manifest_report_free(ds_manifest_report *r); /* accepts a zeroed struct */
const char *ds_manifest_state_name(ds_manifest_state s);

#endif
