/* libFuzzer target for the safetensors header parser (ds_st_parse).
 *
 * Any byte string must either be refused with an error or give a header whose every tensor obeys
 * the invariants io.h promises: dtype x shape == byte length, data inside the data section of
 * the buffer, tensors sorted by offset and not overlapping. A violated invariant traps, so the
 * fuzzer reports it like a crash; ASan catches reads outside the input (libFuzzer hands the input
 * in an exactly-sized heap block) and LeakSanitizer any leak on the error paths. */
#include "core/core.h"
#include "io/io.h"

#include <stddef.h>
#include <stdint.h>
#include <string.h>

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define FUZZ_REQUIRE(c)                                                                            \
    do {                                                                                           \
        if (!(c)) __builtin_trap();                                                                \
    } while (0)

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    ds_log_set_level(DS_LOG_ERROR);
    return 0;
}

/* Checks what a successful parse promises about h (the image is data[0, size)). */
static void check_header(const ds_st_header *h, const uint8_t *data, size_t size) {
    FUZZ_REQUIRE(h->data_start >= 8 && h->data_start <= size);
    FUZZ_REQUIRE(h->n_tensors == 0 || h->tensors != NULL);
    uint64_t prev_end = h->data_start;
    for (size_t i = 0; i < h->n_tensors; i++) {
        const ds_st_tensor *t = &h->tensors[i];
        FUZZ_REQUIRE(t->name != NULL);
        (void)strlen(t->name); /* must be a live NUL-terminated string */
        FUZZ_REQUIRE((int)t->dtype >= 0 && t->dtype < DS_DTYPE_COUNT);
        FUZZ_REQUIRE(t->ndim >= 0 && t->ndim <= DS_ST_MAX_DIMS);
        uint64_t n = ds_dtype_size(t->dtype);
        for (int d = 0; d < t->ndim; d++) {
            FUZZ_REQUIRE(t->shape[d] >= 0);
            FUZZ_REQUIRE(ds_mul_ok(n, (uint64_t)t->shape[d], &n));
        }
        FUZZ_REQUIRE(n == t->nbytes);
        /* inside the data section, sorted, no overlap between non-empty tensors */
        FUZZ_REQUIRE(t->offset >= h->data_start);
        FUZZ_REQUIRE(t->offset <= size && t->nbytes <= size - t->offset);
        if (t->nbytes > 0) {
            FUZZ_REQUIRE(t->offset >= prev_end);
            prev_end = t->offset + t->nbytes;
            const uint8_t *p = (const uint8_t *)t->data;
            FUZZ_REQUIRE(p == data + t->offset);
            /* touch the first and last byte: ASan checks they are inside the input */
            volatile uint8_t sink = (uint8_t)(p[0] ^ p[t->nbytes - 1]);
            (void)sink;
        }
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    ds_st_header h;
    memset(&h, 0, sizeof h);
    if (ds_st_parse(data, (uint64_t)size, "fuzz", &h) == 0) check_header(&h, data, size);
    ds_st_header_free(&h); /* accepts a zeroed struct: also fine after a refusal */
    return 0;
}
