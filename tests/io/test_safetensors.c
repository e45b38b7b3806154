/* safetensors reader: valid files parse to the right views; every kind of corruption gets its
 * own clear message naming the file and tensor. Files are written byte by byte here, so the
 * test does not depend on the writer it could share a bug with. */
#include "io/io.h"
#include "testutil.h"

#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

static char *tmp;

/* Writes 8-byte length + header + `data_len` bytes of pattern data; returns the path. */
static const char *write_st(const char *name, const char *header, uint64_t declared_len,
                            size_t data_len) {
    static char path[4096];
    snprintf(path, sizeof path, "%.3000s/%.200s", tmp, name);
    FILE *f = fopen(path, "wb");
    uint8_t len[8];
    for (int i = 0; i < 8; i++) len[i] = (uint8_t)(declared_len >> (8 * i));
    fwrite(len, 1, 8, f);
    fwrite(header, 1, strlen(header), f);
    for (size_t i = 0; i < data_len; i++) fputc((int)(i & 0xff), f);
    fclose(f);
    return path;
}

static const char *write_simple(const char *name, const char *header, size_t data_len) {
    return write_st(name, header, strlen(header), data_len);
}

static int open_fails(const char *path, int code, const char *needle) {
    ds_st_set *s = NULL;
    int rc = ds_st_open_file(path, &s);
    CHECK_MSG(rc == code, "%s: rc %d, expected %d (%s)", path, rc, code, ds_err_msg());
    CHECK(s == NULL);
    CHECK_ERR_CONTAINS(needle);
    CHECK_ERR_CONTAINS(path);
    ds_st_close(s);
    return rc;
}

static void test_valid(void) {
    /* a: F32 [2,3] at [0,24); b: BF16 [4] at [24,32); c: I8 [3] at [32,35); metadata */
    const char *h = "{\"__metadata__\":{\"format\":\"pt\"},"
                    "\"b\":{\"dtype\":\"BF16\",\"shape\":[4],\"data_offsets\":[24,32]},"
                    "\"a\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,24]},"
                    "\"c\":{\"dtype\":\"I8\",\"shape\":[3],\"data_offsets\":[32,35]}}   ";
    const char *p = write_simple("ok.safetensors", h, 35);
    ds_st_set *s;
    CHECK(ds_st_open_file(p, &s) == DS_OK);
    if (!s) return;
    CHECK(ds_st_count(s) == 3);
    const ds_st_tensor *a = ds_st_find(s, "a"), *b = ds_st_find(s, "b"), *c = ds_st_find(s, "c");
    CHECK(a && b && c && !ds_st_find(s, "d") && !ds_st_find(s, "__metadata__"));
    if (a && b && c) {
        CHECK(a->dtype == DS_F32 && a->ndim == 2 && a->shape[0] == 2 && a->shape[1] == 3);
        CHECK(a->nbytes == 24 && b->nbytes == 8 && c->nbytes == 3);
        uint64_t data_start = 8 + strlen(h);
        CHECK(a->offset == data_start && b->offset == data_start + 24);
        CHECK(((const uint8_t *)b->data)[0] == 24 && ((const uint8_t *)c->data)[2] == 34);
    }
    ds_st_close(s);
    /* A zero-element tensor is legal and has an empty range. */
    p = write_simple("empty.safetensors",
                     "{\"e\":{\"dtype\":\"F16\",\"shape\":[0,5],\"data_offsets\":[0,0]}}", 0);
    CHECK(ds_st_open_file(p, &s) == DS_OK);
    ds_st_close(s);
}

static void test_corrupt(void) {
    const char *t1 = "{\"w\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}";
    /* Truncated shard: the header promises 16 bytes of data, the file has 10. */
    open_fails(write_simple("trunc.safetensors", t1, 10), DS_ERR_FORMAT,
               "tensor 'w': data_offsets [0, 16] run past the end of the data section");
    /* Header length larger than the file. */
    open_fails(write_st("hlen.safetensors", t1, 1u << 20, 16), DS_ERR_FORMAT,
               "header length 1048576 exceeds the file size");
    /* Absurd header length (would overflow naive arithmetic). */
    open_fails(write_st("hlen2.safetensors", t1, UINT64_MAX - 3, 16), DS_ERR_FORMAT,
               "exceeds the file size");
    /* Too short for the length prefix at all. */
    {
        char path[4096];
        snprintf(path, sizeof path, "%.3000s/short.safetensors", tmp);
        FILE *f = fopen(path, "wb");
        fwrite("abc", 1, 3, f);
        fclose(f);
        open_fails(path, DS_ERR_FORMAT, "too short");
    }
    /* Out-of-range offsets far beyond the file. */
    open_fails(write_simple("oor.safetensors",
                            "{\"w\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":"
                            "[4000000000,4000000016]}}",
                            16),
               DS_ERR_FORMAT, "run past the end of the data section");
    open_fails(write_simple("rev.safetensors",
                            "{\"w\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[8,0]}}", 16),
               DS_ERR_FORMAT, "end before begin");
    /* dtype x shape does not match the byte range. */
    open_fails(
        write_simple("shape.safetensors",
                     "{\"w\":{\"dtype\":\"BF16\",\"shape\":[4],\"data_offsets\":[0,16]}}", 16),
        DS_ERR_SHAPE, "tensor 'w': data_offsets [0, 16] hold 16 bytes but BF16 x shape needs 8");
    /* Shape whose element count overflows 64 bits. */
    open_fails(write_simple("ovf.safetensors",
                            "{\"w\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296,16],"
                            "\"data_offsets\":[0,16]}}",
                            16),
               DS_ERR_FORMAT, "shape overflows");
    open_fails(write_simple("neg.safetensors",
                            "{\"w\":{\"dtype\":\"F32\",\"shape\":[-4],\"data_offsets\":[0,16]}}",
                            16),
               DS_ERR_FORMAT, "shape[0] is not a non-negative integer");
    /* Unknown dtype. */
    open_fails(write_simple("dtype.safetensors",
                            "{\"w\":{\"dtype\":\"Q4_K\",\"shape\":[4],\"data_offsets\":[0,16]}}",
                            16),
               DS_ERR_UNSUPPORTED, "tensor 'w': unknown dtype \"Q4_K\"");
    /* Overlapping tensors. */
    open_fails(write_simple("overlap.safetensors",
                            "{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]},"
                            "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,16]}}",
                            16),
               DS_ERR_FORMAT, "tensors 'a' and 'b' overlap");
    /* Not JSON, not an object, duplicate keys, missing fields. */
    open_fails(write_simple("json.safetensors", "{\"w\": [1, 2", 16), DS_ERR_FORMAT,
               "header is not valid JSON");
    open_fails(write_simple("notobj.safetensors", "[1, 2, 3]", 16), DS_ERR_FORMAT,
               "does not start with a JSON object");
    open_fails(write_simple("dup.safetensors",
                            "{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
                            "\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}",
                            16),
               DS_ERR_FORMAT, "duplicate");
    open_fails(
        write_simple("nodt.safetensors", "{\"w\":{\"shape\":[1],\"data_offsets\":[0,4]}}", 4),
        DS_ERR_FORMAT, "tensor 'w': missing or non-string \"dtype\"");
    open_fails(write_simple("nooff.safetensors", "{\"w\":{\"dtype\":\"F32\",\"shape\":[1]}}", 4),
               DS_ERR_FORMAT, "\"data_offsets\" must be an array");
    open_fails(write_simple("meta.safetensors", "{\"__metadata__\":5}", 0), DS_ERR_FORMAT,
               "__metadata__ is not an object");
}

static void write_text(const char *name, const char *text) {
    char path[4096];
    snprintf(path, sizeof path, "%.3000s/%.200s", tmp, name);
    FILE *f = fopen(path, "w");
    fputs(text, f);
    fclose(f);
}

static void test_index(void) {
    char dir[4096];
    snprintf(dir, sizeof dir, "%.3000s/sharded", tmp);
    CHECK(mkdir(dir, 0755) == 0);
    write_simple("sharded/model-00001-of-00002.safetensors",
                 "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8);
    write_simple("sharded/model-00002-of-00002.safetensors",
                 "{\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4);
    write_text("sharded/model.safetensors.index.json",
               "{\"metadata\":{\"total_size\":12},\"weight_map\":{"
               "\"a\":\"model-00001-of-00002.safetensors\","
               "\"b\":\"model-00002-of-00002.safetensors\"}}");
    ds_st_set *s = NULL;
    CHECK_MSG(ds_st_open_dir(dir, &s) == DS_OK, "%s", ds_err_msg());
    CHECK(s && ds_st_count(s) == 2 && ds_st_find(s, "a") && ds_st_find(s, "b"));
    if (s) CHECK(strstr(ds_st_find(s, "b")->file, "00002") != NULL);
    ds_st_close(s);

    /* The index names a shard that does not exist. */
    write_text("sharded/model.safetensors.index.json",
               "{\"weight_map\":{\"a\":\"model-00001-of-00002.safetensors\","
               "\"c\":\"model-00003-of-00002.safetensors\"}}");
    CHECK(ds_st_open_dir(dir, &s) == DS_ERR_MISSING && s == NULL);
    CHECK_ERR_CONTAINS("names shard 'model-00003-of-00002.safetensors', which does not exist");
    /* The index places a tensor in a shard that lacks it. */
    write_text("sharded/model.safetensors.index.json",
               "{\"weight_map\":{\"a\":\"model-00001-of-00002.safetensors\","
               "\"z\":\"model-00002-of-00002.safetensors\"}}");
    CHECK(ds_st_open_dir(dir, &s) == DS_ERR_MISSING);
    CHECK_ERR_CONTAINS(
        "tensor 'z' is in 'model-00002-of-00002.safetensors', but no shard holds it");
    /* A tensor in the wrong shard. */
    write_text("sharded/model.safetensors.index.json",
               "{\"weight_map\":{\"a\":\"model-00001-of-00002.safetensors\","
               "\"b\":\"model-00001-of-00002.safetensors\","
               "\"c\":\"model-00002-of-00002.safetensors\"}}");
    CHECK(ds_st_open_dir(dir, &s) == DS_ERR_MISSING);
    CHECK_ERR_CONTAINS(
        "tensor 'b' is in 'model-00001-of-00002.safetensors', but it is in another file");
    /* A shard path that escapes the model directory. */
    write_text("sharded/model.safetensors.index.json",
               "{\"weight_map\":{\"a\":\"../ok.safetensors\"}}");
    CHECK(ds_st_open_dir(dir, &s) == DS_ERR_FORMAT);
    CHECK_ERR_CONTAINS("maps to an invalid file name");
    /* The same tensor in two shards. */
    write_simple("sharded/model-00002-of-00002.safetensors",
                 "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8);
    write_text("sharded/model.safetensors.index.json",
               "{\"weight_map\":{\"a\":\"model-00001-of-00002.safetensors\","
               "\"x\":\"model-00002-of-00002.safetensors\"}}");
    CHECK(ds_st_open_dir(dir, &s) == DS_ERR_FORMAT);
    CHECK_ERR_CONTAINS("tensor 'a' appears in both");
    /* Broken index JSON. */
    write_text("sharded/model.safetensors.index.json", "{\"weight_map\": {");
    CHECK(ds_st_open_dir(dir, &s) == DS_ERR_FORMAT);
    CHECK_ERR_CONTAINS("model.safetensors.index.json: invalid JSON");
    /* No weights at all. */
    snprintf(dir, sizeof dir, "%.3000s/nothing", tmp);
    CHECK(mkdir(dir, 0755) == 0);
    CHECK(ds_st_open_dir(dir, &s) == DS_ERR_MISSING);
    CHECK_ERR_CONTAINS("no model.safetensors.index.json or model.safetensors found");
}

/* ds_st_load_used: the tensors looked up and not dropped are read into memory at the same
 * addresses; the others lose their data. */
static void test_load_used(void) {
    const size_t big = (size_t)3 << 20; /* a: 1.5 MiB, b: 1000 bytes, c, d: the rest */
    char h[512];
    snprintf(h, sizeof h,
             "{\"a\":{\"dtype\":\"I8\",\"shape\":[%zu],\"data_offsets\":[0,%zu]},"
             "\"b\":{\"dtype\":\"I8\",\"shape\":[1000],\"data_offsets\":[%zu,%zu]},"
             "\"c\":{\"dtype\":\"I8\",\"shape\":[%zu],\"data_offsets\":[%zu,%zu]},"
             "\"d\":{\"dtype\":\"I8\",\"shape\":[7],\"data_offsets\":[%zu,%zu]}}",
             big / 2, big / 2, big / 2, big / 2 + 1000, big / 2 - 1000, big / 2 + 1000, big, big,
             big + 7);
    const char *p = write_simple("load.safetensors", h, big + 7);
    ds_st_set *s;
    CHECK(ds_st_open_file(p, &s) == DS_OK);
    if (!s) return;
    const ds_st_tensor *a = ds_st_find(s, "a"), *b = ds_st_find(s, "b"), *c = ds_st_find(s, "c");
    const ds_st_tensor *d = ds_st_at(s, 3); /* listed, never looked up */
    CHECK(a && b && c && d && !strcmp(d->name, "d"));
    if (!a || !b || !c || !d) {
        ds_st_close(s);
        return;
    }
    const void *pa = a->data, *pb = b->data;
    /* offset 0 of the file at a 2 MiB boundary, the only place a 2 MiB page can go */
    CHECK(((uintptr_t)a->data - a->offset) % ((uintptr_t)2 << 20) == 0);
    ds_st_drop_pages(c); /* repacked elsewhere, say: not loaded */
    uint64_t bytes = 0;
    CHECK_MSG(ds_st_load_used(s, 1, &bytes) == DS_OK, "%s", ds_err_msg());
    CHECK(bytes == a->nbytes + b->nbytes);
    CHECK(a->data == pa && b->data == pb && c->data == NULL && d->data == NULL);
    size_t bad = 0; /* write_st's pattern: byte i of the data section is i & 0xff */
    for (size_t i = 0; i < a->nbytes; i++) bad += ((const uint8_t *)a->data)[i] != (i & 0xff);
    for (size_t i = 0; i < b->nbytes; i++)
        bad += ((const uint8_t *)b->data)[i] != ((big / 2 + i) & 0xff);
    CHECK_MSG(bad == 0, "%zu bytes differ from the file", bad);
    CHECK(ds_st_check_unchanged(s) == DS_OK);
    ds_st_close(s);
}

int main(void) {
    tmp = ds_test_tmpdir();
    CHECK(tmp != NULL);
    if (!tmp) return ds_test_finish("test_safetensors");
    test_valid();
    test_corrupt();
    test_index();
    test_load_used();
    ds_test_rmtree(tmp);
    free(tmp);
    return ds_test_finish("test_safetensors");
}
