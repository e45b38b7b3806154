/* ds_st_writer: files it writes parse back through ds_st_parse with the same names, dtypes,
 * shapes and bytes; the header is padded so data starts at a multiple of 8; mistakes (wrong byte
 * count, unwritten tensors, duplicates) are errors naming the tensor and leave no file behind. */
#include "io/io.h"
#include "testutil.h"

#include <stdint.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

static int exists(const char *path) {
    struct stat st;
    return stat(path, &st) == 0;
}

static uint64_t header_len(const uint8_t *b) {
    uint64_t n = 0;
    for (int i = 7; i >= 0; i--) n = (n << 8) | b[i];
    return n;
}

/* Round trip with several dtypes, a 3-D tensor, a scalar and odd byte counts in between. */
static void test_roundtrip(const char *dir) {
    char path[4096], tmp[4200];
    snprintf(path, sizeof path, "%s/rt.safetensors", dir);
    snprintf(tmp, sizeof tmp, "%s.tmp", path);

    float a[2 * 3 * 4];
    for (int i = 0; i < 24; i++) a[i] = (float)i * 0.5f - 3.0f;
    uint8_t c[3] = {7, 8, 9};
    uint16_t b[5] = {0x3F80, 0x4000, 0xBF80, 0x0000, 0x7F80};
    int64_t d[2] = {-1, 1234567890123ll};
    double s = 3.25;
    const int64_t sa[3] = {2, 3, 4}, sb[1] = {5}, sc[1] = {3}, sd[2] = {2, 1};

    ds_st_writer *w = NULL;
    CHECK(ds_st_writer_open(path, &w) == DS_OK);
    if (!w) return;
    CHECK(ds_st_writer_add(w, "a.weight", DS_F32, 3, sa) == DS_OK);
    CHECK(ds_st_writer_add(w, "odd.bytes", DS_U8, 1, sc) == DS_OK);
    CHECK(ds_st_writer_add(w, "b", DS_BF16, 1, sb) == DS_OK);
    CHECK(ds_st_writer_add(w, "d.i64", DS_I64, 2, sd) == DS_OK);
    CHECK(ds_st_writer_add(w, "scalar", DS_F64, 0, NULL) == DS_OK);
    CHECK(ds_st_writer_begin_data(w) == DS_OK);
    CHECK(exists(tmp) && !exists(path)); /* not visible under its name before close */
    CHECK(ds_st_writer_data(w, a, sizeof a) == DS_OK);
    CHECK(ds_st_writer_data(w, c, sizeof c) == DS_OK);
    CHECK(ds_st_writer_data(w, b, sizeof b) == DS_OK);
    CHECK(ds_st_writer_data(w, d, sizeof d) == DS_OK);
    CHECK(ds_st_writer_data(w, &s, sizeof s) == DS_OK);
    CHECK_MSG(ds_st_writer_close(w) == DS_OK, "%s", ds_err_msg());
    CHECK(exists(path) && !exists(tmp));

    size_t len = 0;
    uint8_t *buf = (uint8_t *)ds_test_read_file(path, &len);
    CHECK(buf != NULL && len > 8);
    if (!buf) return;
    uint64_t hl = header_len(buf);
    CHECK((8 + hl) % 8 == 0);
    CHECK(len == 8 + hl + sizeof a + sizeof c + sizeof b + sizeof d + sizeof s);
    CHECK(buf[8] == '{');
    CHECK(buf[8 + hl - 1] == '}' || buf[8 + hl - 1] == ' ');

    ds_st_header h = {0};
    int rc = ds_st_parse(buf, len, path, &h);
    CHECK_MSG(rc == DS_OK, "%s", ds_err_msg());
    if (rc == DS_OK) {
        CHECK(h.data_start == 8 + hl);
        CHECK(h.n_tensors == 5);
        json_t *meta = json_object_get(h.header, "__metadata__");
        CHECK(meta && json_is_string(json_object_get(meta, "format")) &&
              strcmp(json_string_value(json_object_get(meta, "format")), "pt") == 0);
        int seen = 0;
        for (size_t i = 0; i < h.n_tensors; i++) {
            const ds_st_tensor *t = &h.tensors[i];
            if (strcmp(t->name, "a.weight") == 0) {
                seen |= 1;
                CHECK(t->dtype == DS_F32 && t->ndim == 3);
                CHECK(t->shape[0] == 2 && t->shape[1] == 3 && t->shape[2] == 4);
                CHECK(t->nbytes == sizeof a && memcmp(t->data, a, sizeof a) == 0);
                /* the first tensor starts right at the (8-aligned) data section */
                CHECK(t->offset == h.data_start && t->offset % 8 == 0);
            } else if (strcmp(t->name, "odd.bytes") == 0) {
                seen |= 2;
                CHECK(t->dtype == DS_U8 && t->ndim == 1 && t->shape[0] == 3);
                CHECK(t->nbytes == 3 && memcmp(t->data, c, 3) == 0);
            } else if (strcmp(t->name, "b") == 0) {
                seen |= 4;
                CHECK(t->dtype == DS_BF16 && t->ndim == 1 && t->shape[0] == 5);
                CHECK(t->nbytes == sizeof b && memcmp(t->data, b, sizeof b) == 0);
                CHECK(t->offset == h.data_start + sizeof a + sizeof c); /* declaration order */
            } else if (strcmp(t->name, "d.i64") == 0) {
                seen |= 8;
                CHECK(t->dtype == DS_I64 && t->ndim == 2 && t->shape[0] == 2 && t->shape[1] == 1);
                CHECK(t->nbytes == sizeof d && memcmp(t->data, d, sizeof d) == 0);
            } else if (strcmp(t->name, "scalar") == 0) {
                seen |= 16;
                CHECK(t->dtype == DS_F64 && t->ndim == 0 && t->nbytes == 8);
                CHECK(memcmp(t->data, &s, 8) == 0);
            }
        }
        CHECK(seen == 31);
        ds_st_header_free(&h);
    }
    free(buf);
}

/* Header lengths of every residue mod 8: data always starts 8-aligned. */
static void test_alignment(const char *dir) {
    char path[4096], name[64];
    snprintf(path, sizeof path, "%s/align.safetensors", dir);
    for (int k = 1; k <= 17; k++) {
        memset(name, 'x', (size_t)k);
        name[k] = 0;
        const int64_t shape[1] = {k};
        uint8_t data[32] = {0};
        for (int i = 0; i < k; i++) data[i] = (uint8_t)(i * 7 + k);
        ds_st_writer *w = NULL;
        CHECK(ds_st_writer_open(path, &w) == DS_OK);
        if (!w) return;
        CHECK(ds_st_writer_add(w, name, DS_U8, 1, shape) == DS_OK);
        CHECK(ds_st_writer_begin_data(w) == DS_OK);
        CHECK(ds_st_writer_data(w, data, (uint64_t)k) == DS_OK);
        CHECK(ds_st_writer_close(w) == DS_OK);
        size_t len = 0;
        uint8_t *buf = (uint8_t *)ds_test_read_file(path, &len);
        if (!buf) {
            CHECK(buf != NULL);
            return;
        }
        uint64_t hl = header_len(buf);
        CHECK_MSG(hl % 8 == 0, "name length %d: header length %llu", k, (unsigned long long)hl);
        ds_st_header h = {0};
        CHECK(ds_st_parse(buf, len, path, &h) == DS_OK);
        CHECK(h.n_tensors == 1 && h.n_tensors == 1 && strcmp(h.tensors[0].name, name) == 0 &&
              memcmp(h.tensors[0].data, data, (size_t)k) == 0);
        ds_st_header_free(&h);
        free(buf);
    }
}

static void test_errors(const char *dir) {
    char path[4096], tmp[4200];
    snprintf(path, sizeof path, "%s/bad.safetensors", dir);
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    const int64_t s22[2] = {2, 2};
    float x[4] = {1, 2, 3, 4};

    /* wrong byte count: names the tensor and both counts; nothing is left on disk */
    ds_st_writer *w = NULL;
    CHECK(ds_st_writer_open(path, &w) == DS_OK);
    if (!w) return;
    CHECK(ds_st_writer_add(w, "ok", DS_F32, 2, s22) == DS_OK);
    CHECK(ds_st_writer_add(w, "layers.3.mismatch", DS_BF16, 2, s22) == DS_OK);
    CHECK(ds_st_writer_begin_data(w) == DS_OK);
    CHECK(ds_st_writer_data(w, x, sizeof x) == DS_OK);
    CHECK(ds_st_writer_data(w, x, 12) == DS_ERR_SHAPE);
    CHECK_ERR_CONTAINS("layers.3.mismatch");
    CHECK_ERR_CONTAINS("8 bytes");
    CHECK_ERR_CONTAINS("12");
    CHECK(ds_st_writer_data(w, x, 8) == DS_ERR_SHAPE); /* sticky */
    CHECK(ds_st_writer_close(w) == DS_ERR_SHAPE);
    CHECK_ERR_CONTAINS("layers.3.mismatch"); /* close keeps the first message */
    CHECK(!exists(path) && !exists(tmp));

    /* closing with a tensor unwritten: an error naming it, no file */
    CHECK(ds_st_writer_open(path, &w) == DS_OK);
    CHECK(ds_st_writer_add(w, "first", DS_F32, 2, s22) == DS_OK);
    CHECK(ds_st_writer_add(w, "never.written", DS_F32, 2, s22) == DS_OK);
    CHECK(ds_st_writer_begin_data(w) == DS_OK);
    CHECK(ds_st_writer_data(w, x, sizeof x) == DS_OK);
    CHECK(ds_st_writer_close(w) != DS_OK);
    CHECK_ERR_CONTAINS("never.written");
    CHECK(!exists(path) && !exists(tmp));

    /* duplicate names, data before the header, declarations after it */
    CHECK(ds_st_writer_open(path, &w) == DS_OK);
    CHECK(ds_st_writer_add(w, "dup", DS_F32, 2, s22) == DS_OK);
    CHECK(ds_st_writer_add(w, "dup", DS_F32, 2, s22) == DS_ERR_ARG);
    CHECK_ERR_CONTAINS("dup");
    CHECK(ds_st_writer_close(w) == DS_ERR_ARG);
    CHECK(!exists(path) && !exists(tmp));

    CHECK(ds_st_writer_open(path, &w) == DS_OK);
    CHECK(ds_st_writer_add(w, "t", DS_F32, 2, s22) == DS_OK);
    CHECK(ds_st_writer_data(w, x, sizeof x) != DS_OK);
    ds_st_writer_close(w);
    CHECK(!exists(path));

    CHECK(ds_st_writer_open(path, &w) == DS_OK);
    CHECK(ds_st_writer_begin_data(w) == DS_OK);
    CHECK(ds_st_writer_add(w, "late", DS_F32, 2, s22) != DS_OK);
    CHECK_ERR_CONTAINS("late");
    ds_st_writer_close(w);
    CHECK(!exists(path));

    /* a negative dimension is refused by name */
    const int64_t neg[2] = {2, -1};
    CHECK(ds_st_writer_open(path, &w) == DS_OK);
    CHECK(ds_st_writer_add(w, "neg", DS_F32, 2, neg) == DS_ERR_ARG);
    CHECK_ERR_CONTAINS("neg");
    ds_st_writer_close(w);

    /* an unwritable path names itself */
    char nodir[4200];
    snprintf(nodir, sizeof nodir, "%s/no/such/dir/x.safetensors", dir);
    w = NULL;
    CHECK(ds_st_writer_open(nodir, &w) == DS_ERR_IO && w == NULL);
    CHECK_ERR_CONTAINS("no/such/dir");

    /* a file with no tensors is still valid */
    CHECK(ds_st_writer_open(path, &w) == DS_OK);
    CHECK(ds_st_writer_close(w) == DS_OK);
    size_t len = 0;
    uint8_t *buf = (uint8_t *)ds_test_read_file(path, &len);
    CHECK(buf != NULL);
    if (buf) {
        ds_st_header h = {0};
        CHECK(ds_st_parse(buf, len, path, &h) == DS_OK && h.n_tensors == 0);
        CHECK(header_len(buf) % 8 == 0);
        ds_st_header_free(&h);
        free(buf);
    }
}

int main(void) {
    char *dir = ds_test_tmpdir();
    CHECK(dir != NULL);
    if (!dir) return ds_test_finish("test_st_writer");
    test_roundtrip(dir);
    test_alignment(dir);
    test_errors(dir);
    ds_test_rmtree(dir);
    free(dir);
    return ds_test_finish("test_st_writer");
}
