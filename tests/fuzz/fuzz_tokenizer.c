/* libFuzzer target for ds_tok_encode on arbitrary bytes (invalid UTF-8, added tokens, long
 * runs), with the real DeepSeek-V3 tokenizer: $DSINFER_FUZZ_TOKENIZER, else the build's
 * DSINFER_DEFAULT_TOKENIZER_DIR, else the fixtures' tiny-a.
 *
 * Properties checked on every input (abort on violation, so libFuzzer reports it):
 * - encode succeeds and every id is inside the vocabulary;
 * - decode(encode(x)) == the lossy UTF-8 repair of x (the tokenizer is lossless on valid text);
 * - the streaming detokenizer, pushed one id at a time, gives the same bytes as decode. */
#include "core/core.h"
#include "tokenizer/tokenizer.h"

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifndef DSINFER_DEFAULT_TOKENIZER_DIR
#define DSINFER_DEFAULT_TOKENIZER_DIR ""
#endif

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static ds_tokenizer *tok;

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    ds_log_set_level(DS_LOG_ERROR);
    const char *env = getenv("DSINFER_FUZZ_TOKENIZER");
    const char *tries[] = {env, DSINFER_DEFAULT_TOKENIZER_DIR, "../shared/fixtures/tiny-a",
                           "../../shared/fixtures/tiny-a"};
    for (size_t i = 0; i < sizeof tries / sizeof *tries && !tok; i++)
        if (tries[i] && *tries[i] && ds_tok_open(tries[i], &tok) != 0) tok = NULL;
    if (!tok) {
        fprintf(stderr,
                "fuzz_tokenizer: no tokenizer; set DSINFER_FUZZ_TOKENIZER to a directory "
                "holding tokenizer.json (last error: %s)\n",
                ds_err_msg());
        abort();
    }
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    int32_t *ids = NULL;
    size_t n = 0;
    if (ds_tok_encode(tok, (const char *)data, size, size & 1, &ids, &n) != 0) {
        fprintf(stderr, "encode failed: %s\n", ds_err_msg());
        abort();
    }
    for (size_t i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= ds_tok_vocab_size(tok)) abort();
    size_t skip = (size & 1) ? 1 : 0; /* the BOS we asked for */
    ds_buf dec = {0}, stream = {0};
    if (ds_tok_decode(tok, ids + skip, n - skip, 0, &dec) != 0) abort();
    /* the expected text: every maximal invalid subpart as U+FFFD; compare via re-encoding the
     * decoded text, which is valid UTF-8 and must round-trip to itself */
    int32_t *ids2 = NULL;
    size_t n2 = 0;
    if (ds_tok_encode(tok, dec.data ? dec.data : "", dec.len, 0, &ids2, &n2) != 0) abort();
    if (n2 != n - skip || (n2 && memcmp(ids2, ids + skip, n2 * sizeof *ids2))) abort();
    ds_detok d;
    ds_detok_init(&d, tok, 0);
    for (size_t i = skip; i < n; i++)
        if (ds_detok_push(&d, ids[i], &stream) != 0) abort();
    if (ds_detok_finish(&d, &stream) != 0) abort();
    if (stream.len != dec.len || (dec.len && memcmp(stream.data, dec.data, dec.len))) abort();
    /* valid UTF-8 input decodes back to exactly itself */
    int valid = 1;
    for (size_t i = 0; i < size && valid; i++) valid = data[i] < 0x80;
    if (valid && (dec.len != size || (size && memcmp(dec.data, data, size)))) abort();
    ds_buf_free(&dec);
    ds_buf_free(&stream);
    free(ids);
    free(ids2);
    return 0;
}
