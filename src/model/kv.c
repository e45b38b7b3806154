/* The MLA KV cache's memory: per layer, slot-major arrays of latents and rope keys in the chosen
 * dtype. Which slots belong to which sequence is not known here (block tables come with each
 * batch). bf16 / f16 halve the cache at a rounding of each cached value (round to nearest even);
 * f32 keeps the forward pass exact against the reference. */
#include "kernels/kernels.h"
#include "model/model_internal.h"

#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

static _Atomic uint64_t next_id = 1;

int ds_kv_dtype_parse(const char *s, ds_kv_dtype *out) {
    static const struct {
        const char *name;
        ds_kv_dtype dt;
    } names[] = {{"f32", DS_KV_F32},       {"float32", DS_KV_F32}, {"bf16", DS_KV_BF16},
                 {"bfloat16", DS_KV_BF16}, {"f16", DS_KV_F16},     {"float16", DS_KV_F16},
                 {"half", DS_KV_F16}};
    for (size_t i = 0; s && i < sizeof names / sizeof names[0]; i++)
        if (!strcmp(s, names[i].name)) {
            *out = names[i].dt;
            return DS_OK;
        }
    return ds_err_set(DS_ERR_ARG, "KV cache dtype '%s' is not one of f32, bf16, f16",
                      s ? s : "(null)");
}

const char *ds_kv_dtype_name(ds_kv_dtype dt) {
    return dt == DS_KV_BF16 ? "bf16" : dt == DS_KV_F16 ? "f16" : "f32";
}

static size_t kv_esz(ds_kv_dtype dt) {
    return dt == DS_KV_F32 ? 4 : 2;
}

uint64_t ds_kv_bytes_per_token(const ds_config *c, ds_kv_dtype dt) {
    return (uint64_t)c->n_layers * (uint64_t)(c->kv_lora_rank + c->qk_rope_head_dim) * kv_esz(dt);
}

int ds_kv_open_paged(const ds_config *c, int64_t n_blocks, int64_t block_size, ds_kv_dtype dt,
                     ds_kv_cache **out) {
    *out = NULL;
    if (n_blocks < 1 || block_size < 1 || n_blocks > INT32_MAX / block_size)
        return ds_err_set(DS_ERR_ARG, "KV cache of %lld blocks x %lld tokens is out of range",
                          (long long)n_blocks, (long long)block_size);
    ds_kv_cache *kv = calloc(1, sizeof *kv);
    if (!kv) return ds_err_set(DS_ERR_NOMEM, "out of memory (KV cache)");
    kv->id = atomic_fetch_add(&next_id, 1);
    kv->n_blocks = n_blocks;
    kv->block_size = block_size;
    kv->cap = n_blocks * block_size;
    kv->n_layers = c->n_layers;
    kv->kv_lora_rank = c->kv_lora_rank;
    kv->rope_dim = c->qk_rope_head_dim;
    kv->dtype = dt;
    kv->esz = kv_esz(dt);
    size_t rows = (size_t)c->n_layers * (size_t)kv->cap;
    /* anonymous mappings: zero, page-aligned, and committed as the slots are first written, so
     * a cache sized for the whole memory budget costs nothing until it is used */
    kv->latent_bytes = rows * (size_t)c->kv_lora_rank * kv->esz;
    kv->pe_bytes = rows * (size_t)c->qk_rope_head_dim * kv->esz;
    /* on 2 MiB pages where the kernel allows it: with 4 KiB pages every decode step faulted in
     * ~480 new pages (192 sequences, medium: a page holds 4 tokens' latents of one layer), each
     * a trap through the hypervisor on a VM */
    kv->latent = ds_map_aligned(kv->latent_bytes, -1);
    kv->pe = ds_map_aligned(kv->pe_bytes, -1);
    if (!kv->latent || !kv->pe) {
        ds_kv_close(kv);
        return ds_err_set(
            DS_ERR_NOMEM, "out of memory: KV cache for %lld tokens (%llu MiB)",
            (long long)(n_blocks * block_size),
            (unsigned long long)(ds_kv_bytes_per_token(c, dt) * (uint64_t)(n_blocks * block_size) >>
                                 20));
    }
    *out = kv;
    return DS_OK;
}

int ds_kv_open(const ds_config *c, int64_t max_len, ds_kv_cache **out) {
    if (max_len < 1) {
        *out = NULL;
        return ds_err_set(DS_ERR_ARG, "KV cache length %lld must be >= 1", (long long)max_len);
    }
    return ds_kv_open_paged(c, 1, max_len, DS_KV_F32, out);
}

void ds_kv_close(ds_kv_cache *kv) {
    if (!kv) return;
    if (kv->latent) munmap(kv->latent, kv->latent_bytes);
    if (kv->pe) munmap(kv->pe, kv->pe_bytes);
    free(kv);
}

int64_t ds_kv_capacity(const ds_kv_cache *kv) {
    return kv->cap;
}
int64_t ds_kv_block_size(const ds_kv_cache *kv) {
    return kv->block_size;
}
int64_t ds_kv_n_blocks(const ds_kv_cache *kv) {
    return kv->n_blocks;
}

void *ds_kv_latent_at(const ds_kv_cache *kv, int64_t l, int64_t slot) {
    return (char *)kv->latent +
           ((size_t)l * (size_t)kv->cap + (size_t)slot) * (size_t)kv->kv_lora_rank * kv->esz;
}

void *ds_kv_pe_at(const ds_kv_cache *kv, int64_t l, int64_t slot) {
    return (char *)kv->pe +
           ((size_t)l * (size_t)kv->cap + (size_t)slot) * (size_t)kv->rope_dim * kv->esz;
}

void ds_kv_store(const ds_kv_cache *kv, void *dst, const float *src, int64_t n) {
    uint16_t *d = dst;
    switch (kv->dtype) {
    case DS_KV_F32:
        memcpy(dst, src, (size_t)n * sizeof(float));
        break;
    case DS_KV_BF16:
        for (int64_t i = 0; i < n; i++) d[i] = ds_f32_to_bf16(src[i]);
        break;
    case DS_KV_F16:
        for (int64_t i = 0; i < n; i++) d[i] = ds_f32_to_f16(src[i]);
        break;
    }
}

void ds_kv_load(const ds_kv_cache *kv, float *dst, const void *src, int64_t n) {
    const ds_kernels *k = ds_kernels_get();
    switch (kv->dtype) {
    case DS_KV_F32:
        memcpy(dst, src, (size_t)n * sizeof(float));
        break;
    case DS_KV_BF16:
        k->bf16_to_f32(dst, src, (size_t)n);
        break;
    case DS_KV_F16:
        k->f16_to_f32(dst, src, (size_t)n);
        break;
    }
}
