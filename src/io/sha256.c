/* SHA-256 through OpenSSL's libcrypto (EVP): the digests of `dsinfer quantize`'s manifest, in
 * the format `sha256sum -c` and `dsinfer check` verify. A thin wrapper, so no other file
 * includes OpenSSL headers. */
#include "io/io.h"

#include <errno.h>
#include <openssl/evp.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>

struct ds_sha256 {
    EVP_MD_CTX *ctx;
};

int ds_sha256_open(ds_sha256 **out) {
    *out = NULL;
    ds_sha256 *h = calloc(1, sizeof *h);
    if (!h) return ds_err_set(DS_ERR_NOMEM, "sha256: out of memory");
    h->ctx = EVP_MD_CTX_new();
    if (!h->ctx || EVP_DigestInit_ex(h->ctx, EVP_sha256(), NULL) != 1) {
        EVP_MD_CTX_free(h->ctx);
        free(h);
        return ds_err_set(DS_ERR_NOMEM, "sha256: cannot initialise the OpenSSL digest");
    }
    *out = h;
    return DS_OK;
}

int ds_sha256_update(ds_sha256 *h, const void *data, size_t n) {
    if (n && EVP_DigestUpdate(h->ctx, data, n) != 1)
        return ds_err_set(DS_ERR_IO, "sha256: digest update failed");
    return DS_OK;
}

int ds_sha256_final(ds_sha256 *h, uint8_t out[32]) {
    unsigned int len = 0;
    if (EVP_DigestFinal_ex(h->ctx, out, &len) != 1 || len != 32)
        return ds_err_set(DS_ERR_IO, "sha256: digest final failed");
    return DS_OK;
}

void ds_sha256_close(ds_sha256 *h) {
    if (!h) return;
    EVP_MD_CTX_free(h->ctx);
    free(h);
}

int ds_sha256_buf(const void *data, size_t n, uint8_t out[32]) {
    ds_sha256 *h = NULL;
    int rc = ds_sha256_open(&h);
    if (!rc) rc = ds_sha256_update(h, data, n);
    if (!rc) rc = ds_sha256_final(h, out);
    ds_sha256_close(h);
    return rc;
}

int ds_sha256_file(const char *path, uint8_t out[32]) {
    return ds_sha256_file_cb(path, out, NULL, NULL);
}

int ds_sha256_file_cb(const char *path, uint8_t out[32], void (*cb)(void *ctx, uint64_t n),
                      void *ctx) {
    FILE *f = fopen(path, "rb");
    if (!f) return ds_err_set(DS_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    ds_sha256 *h = NULL;
    int rc = ds_sha256_open(&h);
    static const size_t BUF = 1 << 20;
    unsigned char *buf = rc ? NULL : malloc(BUF);
    if (!rc && !buf) rc = ds_err_set(DS_ERR_NOMEM, "%s: out of memory", path);
    size_t n;
    while (!rc && (n = fread(buf, 1, BUF, f)) > 0) {
        rc = ds_sha256_update(h, buf, n);
        if (cb) cb(ctx, n);
    }
    if (!rc && ferror(f)) rc = ds_err_set(DS_ERR_IO, "%s: read failed: %s", path, strerror(errno));
    if (!rc) rc = ds_sha256_final(h, out);
    free(buf);
    ds_sha256_close(h);
    fclose(f);
    return rc;
}

void ds_sha256_hex(const uint8_t d[32], char hex[65]) {
    static const char digits[] = "0123456789abcdef";
    for (int i = 0; i < 32; i++) {
        hex[2 * i] = digits[d[i] >> 4];
        hex[2 * i + 1] = digits[d[i] & 15];
    }
    hex[64] = 0;
}
