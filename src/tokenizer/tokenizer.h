/* tokenizer: DeepSeek-V3/R1 text <-> token ids, chat formats and the R1 reasoning split.
 *
 * - Byte-level BPE loaded from a Hugging Face tokenizer.json, bit-for-bit what HF tokenizers
 *   produces: added tokens matched in the raw text first, the pre_tokenizer's Split regexes
 *   (PCRE2, UTF + UCP, JIT), the ByteLevel byte -> unicode mapping, ranked merges.
 * - Decoding and an incremental detokenizer for streaming.
 * - The DeepSeek chat templates (V3, R1), rendered byte-identically to the Jinja template in
 *   tokenizer_config.json, and recognised from it.
 * - The R1 reasoning parser that splits <think>...</think> from the answer, incrementally.
 * Nothing here knows about models or HTTP. */
#ifndef DS_TOKENIZER_H
#define DS_TOKENIZER_H

#include "core/core.h"

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

/* A growable byte buffer (NUL-terminated for convenience; len excludes the NUL). */
typedef struct {
    char *data;
    size_t len, cap;
} ds_buf;
/* Append n bytes; DS_ERR_NOMEM on failure (the buffer is left as it was). */
int ds_buf_append(ds_buf *b, const void *p, size_t n);
void ds_buf_free(ds_buf *b); /* leaves a zeroed buffer */

/* ---- tokenizer ---------------------------------------------------------------------------- */
typedef struct ds_tokenizer ds_tokenizer;

/* Loads DIR/tokenizer.json and, when present, DIR/tokenizer_config.json (add_bos_token,
 * bos/eos tokens, chat_template). `path` may also name a tokenizer.json file directly.
 * Any tokenizer.json feature that is not supported (another model type, normalizer, decoder,
 * pre-tokenizer, behaviour, byte_fallback, dropout, ...) is refused with a message naming it.
 * Thread-safety: an open tokenizer is read-only; encode/decode may run concurrently. */
int ds_tok_open(const char *path, ds_tokenizer **out);
void ds_tok_close(ds_tokenizer *t); /* accepts NULL */

int64_t ds_tok_vocab_size(const ds_tokenizer *t); /* largest id + 1 */
int32_t ds_tok_bos_id(const ds_tokenizer *t);     /* -1 when none */
int32_t ds_tok_eos_id(const ds_tokenizer *t);     /* -1 when none */
int ds_tok_add_bos(const ds_tokenizer *t);        /* tokenizer_config add_bos_token */
/* Id of an exact token string (vocab or added token, in its tokenizer.json spelling), or -1. */
int32_t ds_tok_token_id(const ds_tokenizer *t, const char *token);
/* The chat_template string of tokenizer_config.json, or NULL. */
const char *ds_tok_chat_template(const ds_tokenizer *t);
/* The bos_token / eos_token strings of tokenizer_config.json ("" when absent). */
const char *ds_tok_bos_token(const ds_tokenizer *t);
const char *ds_tok_eos_token(const ds_tokenizer *t);

/* Encodes text[0, len) (any bytes: invalid UTF-8 sequences are first replaced by U+FFFD, each
 * maximal invalid subpart by one, as WHATWG TextDecoder / Rust from_utf8_lossy do, which is
 * what a client's string holds before HF tokenizes it). Added tokens in the text are matched.
 * With add_bos the BOS id is prepended. *ids is malloc'd (caller frees), *n may be 0. */
int ds_tok_encode(const ds_tokenizer *t, const char *text, size_t len, int add_bos, int32_t **ids,
                  size_t *n);
/* Appends the raw bytes of ids (byte-level decoded; added tokens as their content; special
 * tokens left out when skip_special) to out. Not lossy: bytes may be invalid UTF-8.
 * DS_ERR_RANGE names an id outside the vocabulary. */
int ds_tok_decode_bytes(const ds_tokenizer *t, const int32_t *ids, size_t n, int skip_special,
                        ds_buf *out);
/* Same, then made valid UTF-8 the way HF decode does (from_utf8_lossy). */
int ds_tok_decode(const ds_tokenizer *t, const int32_t *ids, size_t n, int skip_special,
                  ds_buf *out);

/* Incremental detokenizer: each push appends only complete, valid UTF-8 to out; bytes of a
 * character still being spelled are held back; a sequence that can no longer become valid is
 * emitted as U+FFFD exactly where the lossy decode of the whole would put it. After finish, the
 * concatenation of everything appended equals ds_tok_decode of all pushed ids. */
typedef struct {
    const ds_tokenizer *tok;
    int skip_special;
    unsigned char pending[8]; /* an incomplete UTF-8 prefix */
    int n_pending;
} ds_detok;
void ds_detok_init(ds_detok *d, const ds_tokenizer *t, int skip_special);
int ds_detok_push(ds_detok *d, int32_t id, ds_buf *out);
int ds_detok_finish(ds_detok *d, ds_buf *out); /* flushes a dangling prefix as U+FFFD */

/* ---- chat formats ---------------------------------------------------------------------------- */
/* V3: DeepSeek-V3; R1: DeepSeek-R1 (the revision that opens "<think>\n" in the generation
 * prompt); R1_0528: DeepSeek-R1-0528. docs/chat.md says where each template comes from. */
typedef enum { DS_CHAT_V3, DS_CHAT_R1, DS_CHAT_R1_0528 } ds_chat_format;

/* Recognises a DeepSeek chat_template (from tokenizer_config.json); DS_ERR_UNSUPPORTED with a
 * message suggesting --chat-template-format for anything else. */
int ds_chat_detect(const char *chat_template, ds_chat_format *out);
/* Parses "v3" / "r1" / "r1-0528" (the --chat-template-format values); DS_ERR_ARG otherwise. */
int ds_chat_format_parse(const char *name, ds_chat_format *out);
const char *ds_chat_format_name(ds_chat_format f);

/* Renders an OpenAI-style messages array ([{role, content, tool_calls?}, ...]) exactly as the
 * format's Jinja template does, with bos_token as the template's bos_token. Appends to out.
 * Messages the template cannot render (unknown role, non-string content, malformed tool call)
 * get DS_ERR_ARG naming the message index and field. */
int ds_chat_render(ds_chat_format f, const char *bos_token, const json_t *messages,
                   int add_generation_prompt, ds_buf *out);

/* ---- R1 reasoning split ------------------------------------------------------------------- */
/* Splits generated text into reasoning_content (inside <think>...</think>) and content, as
 * vLLM's deepseek_r1 reasoning parser does: text before </think> is reasoning (a leading
 * <think> is dropped: R1's template already opened it), text after it is content; without
 * </think> everything is reasoning. Streaming: push deltas as they come; markers split across
 * deltas are held back until they can be told apart from ordinary text. */
typedef struct {
    int in_content; /* </think> seen */
    int at_start;   /* nothing but maybe a <think> seen so far */
    char held[16];  /* a possible prefix of a marker */
    int n_held;
} ds_reasoning;
void ds_reasoning_init(ds_reasoning *r);
int ds_reasoning_push(ds_reasoning *r, const char *delta, size_t n, ds_buf *reasoning,
                      ds_buf *content);
int ds_reasoning_finish(ds_reasoning *r, ds_buf *reasoning, ds_buf *content);

#endif
