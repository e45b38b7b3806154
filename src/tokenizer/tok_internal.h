/* tok_internal: what the tokenizer's own .c files share and the public header does not show.
 * Nothing outside src/tokenizer/ (and its tests) includes this. */
#ifndef DS_TOK_INTERNAL_H
#define DS_TOK_INTERNAL_H

#include "tokenizer/tokenizer.h"

#include <stddef.h>
#include <stdint.h>

/* ---- unicode_delta.c ---- */
/* Code-point ranges [lo, hi] that Unicode 15.0 added to general category c ('L', 'M', 'N', 'P',
 * 'S') beyond what PCRE2 10.42 (Unicode 14.0) knows; *n gets the count. NULL for other c. */
const uint32_t (*ds_tok__unicode_delta(char c, size_t *n))[2];

/* ---- utf8.c: WHATWG / from_utf8_lossy decoding ---- */
/* Length of the longest prefix of p[0, n) that is complete, valid UTF-8. */
size_t ds_utf8__valid_prefix(const unsigned char *p, size_t n);
/* Streaming lossy decoder. `pend`/`*n_pend` hold the bytes of a character still being spelled
 * (at most 3; start with *n_pend = 0). Appends to out the valid UTF-8 of p[0, n), with one U+FFFD
 * per maximal invalid subpart (Unicode / WHATWG "substitution of maximal subparts"); when final,
 * a dangling prefix becomes one U+FFFD. Feeding bytes in any chunking gives the same output as
 * feeding them at once. DS_ERR_NOMEM only. */
int ds_utf8__lossy(unsigned char *pend, int *n_pend, const unsigned char *p, size_t n, int final,
                   ds_buf *out);

/* ---- bpe.c: per-id data for decoding ---- */
/* The decoded bytes of id (byte-level mapped; an added token's content as is). Returns 0, or -1
 * when id is not a token of t. *special is 1 for a special added token. */
int ds_tok__id_bytes(const ds_tokenizer *t, int32_t id, const char **p, size_t *n, int *special);

/* Pieces of at most this many bytes are merged by a linear scan, longer ones with a heap.
 * Both give identical results; tests lower/raise it to cross-check the two. */
extern int ds_tok__bpe_linear_max;

#endif
