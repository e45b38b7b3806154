/* reasoning: the DeepSeek-R1 split of generated text into reasoning_content and content.
 *
 * Semantics (vLLM's deepseek_r1 parser, extract_reasoning of vllm/reasoning/basic_parsers.py,
 * BaseThinkingReasoningParser; see docs/chat.md for the differences):
 *   1. a "<think>" at the very start of the output is dropped (R1's template already opened it,
 *      but the model sometimes repeats it);
 *   2. the text up to the first "</think>" is reasoning, everything after it is content (a
 *      later "</think>" is ordinary content);
 *   3. without "</think>" all of it is reasoning.
 *
 * Streaming works on bytes and holds back only what may still become a marker: while nothing
 * but a prefix of "<think>" has been seen (at_start), and in reasoning a trailing prefix of
 * "</think>". "</think>" has no proper prefix that is also a suffix, so on a mismatch the held
 * bytes are plain reasoning and matching restarts at the current byte. Hence for any cutting of
 * a text into deltas the concatenated outputs equal the split of the whole text. */
#include "tokenizer/tokenizer.h"

#include <string.h>

static const char OPEN[] = "<think>";   /* 7 bytes */
static const char CLOSE[] = "</think>"; /* 8 bytes */
#define OPEN_N (sizeof OPEN - 1)
#define CLOSE_N (sizeof CLOSE - 1)

void ds_reasoning_init(ds_reasoning *r) {
    memset(r, 0, sizeof *r);
    r->at_start = 1;
}

/* Feeds p[0, n) to the reasoning/content state (at_start is over). */
static int scan(ds_reasoning *r, const char *p, size_t n, ds_buf *reasoning, ds_buf *content) {
    size_t i = 0;
    int rc;
    while (i < n) {
        if (r->in_content) return ds_buf_append(content, p + i, n - i);
        if (r->n_held > 0) {
            if (p[i] == CLOSE[r->n_held]) {
                r->held[r->n_held++] = p[i++];
                if ((size_t)r->n_held == CLOSE_N) {
                    r->n_held = 0;
                    r->in_content = 1;
                }
                continue;
            }
            /* not the marker: the held bytes are reasoning; p[i] is looked at afresh */
            if ((rc = ds_buf_append(reasoning, r->held, (size_t)r->n_held))) return rc;
            r->n_held = 0;
            continue;
        }
        const char *lt = memchr(p + i, '<', n - i);
        size_t run = lt ? (size_t)(lt - (p + i)) : n - i;
        if (run && (rc = ds_buf_append(reasoning, p + i, run))) return rc;
        i += run;
        if (lt) {
            r->held[0] = '<';
            r->n_held = 1;
            i++;
        }
    }
    return DS_OK;
}

int ds_reasoning_push(ds_reasoning *r, const char *delta, size_t n, ds_buf *reasoning,
                      ds_buf *content) {
    size_t i = 0;
    while (r->at_start && i < n) {
        if (delta[i] == OPEN[r->n_held]) {
            r->held[r->n_held++] = delta[i++];
            if ((size_t)r->n_held == OPEN_N) { /* a leading <think>: dropped */
                r->n_held = 0;
                r->at_start = 0;
            }
            continue;
        }
        /* the output does not start with <think>: what was held is ordinary text (it may
         * itself begin "</think>", e.g. "<" then "/") */
        r->at_start = 0;
        char tmp[sizeof r->held];
        size_t nt = (size_t)r->n_held;
        memcpy(tmp, r->held, nt);
        r->n_held = 0;
        int rc = scan(r, tmp, nt, reasoning, content);
        if (rc) return rc;
    }
    return scan(r, delta + i, n - i, reasoning, content);
}

int ds_reasoning_finish(ds_reasoning *r, ds_buf *reasoning, ds_buf *content) {
    (void)content;
    int rc = DS_OK;
    /* a dangling prefix of either marker never became one: it is reasoning text */
    if (r->n_held > 0) rc = ds_buf_append(reasoning, r->held, (size_t)r->n_held);
    r->n_held = 0;
    r->at_start = 0;
    return rc;
}
