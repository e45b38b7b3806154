/* The continuous-batching scheduler (vLLM V1's shape, first-come first-served).
 *
 * What it assumes. Every sequence is a list of tokens (the prompt, then each generated token)
 * of which a prefix, n_computed, has its KV in the cache. A step gives each chosen sequence
 * sched_n more tokens to run: a decoding sequence has exactly one uncomputed token (the one
 * just sampled), a prefilling one has the rest of its prompt, of which it may get only a chunk
 * (chunked prefill), so prefill and decode mix in one batch under max_num_batched_tokens. A
 * sequence whose tokens are all computed after the step gets logits and samples one more.
 *
 * Order. Running sequences first, oldest first, so a request that started keeps its pace;
 * then waiting ones in arrival order while the token budget, max_num_seqs and the free blocks
 * allow. The head of waiting blocks those behind it (FCFS: a long prompt is not overtaken
 * forever by short ones).
 *
 * Blocks. A step allocates the blocks its tokens need. When none is free, the newest running
 * sequence is preempted: its blocks are released (the full ones it committed stay in the prefix
 * cache while nobody needs the space, so recomputing it is often cheap), n_computed drops to 0
 * and it goes back to the head of waiting with all its tokens, to be recomputed as one long
 * prompt. If the newest is the one asking, it preempts itself. Nothing is lost: a preempted
 * sequence keeps its tokens, and the engine guarantees at submit that one sequence alone fits
 * the cache (prompt + max_tokens <= max_model_len <= capacity), so the oldest always progresses.
 * No waiting sequence is admitted in a step that preempted (it would take the blocks back).
 *
 * Prefix cache. At its (re)admission a sequence with nothing computed looks up its full blocks
 * in order, stopping at the first miss, and never the block holding its last token (that token
 * must run to produce logits). Found blocks are shared by reference, copy-free; they count as
 * computed. After each step the blocks that became full are committed under their prefix hash.
 * When the blocks for the rest cannot be had, the lookups are undone and admission stops. */
#include "engine/engine_internal.h"

#include <stdlib.h>
#include <string.h>

static void list_push_back(ds_seq_list *l, ds_seq *q) {
    q->prev = l->tail;
    q->next = NULL;
    if (l->tail)
        l->tail->next = q;
    else
        l->head = q;
    l->tail = q;
    l->n++;
}

static void list_push_front(ds_seq_list *l, ds_seq *q) {
    q->prev = NULL;
    q->next = l->head;
    if (l->head)
        l->head->prev = q;
    else
        l->tail = q;
    l->head = q;
    l->n++;
}

static void list_unlink(ds_seq_list *l, ds_seq *q) {
    if (q->prev)
        q->prev->next = q->next;
    else
        l->head = q->next;
    if (q->next)
        q->next->prev = q->prev;
    else
        l->tail = q->prev;
    q->prev = q->next = NULL;
    l->n--;
}

void ds_sched_init(ds_sched *s, ds_blocks *blocks, int32_t max_num_seqs,
                   int32_t max_num_batched_tokens) {
    memset(s, 0, sizeof *s);
    ds_blocks_stats st;
    ds_blocks_get_stats(blocks, &st);
    s->blocks = blocks;
    s->block_size = st.block_size;
    s->max_num_seqs = max_num_seqs;
    s->max_num_batched_tokens = max_num_batched_tokens;
}

ds_seq *ds_seq_new(const int32_t *prompt, int32_t n_prompt, int32_t max_tokens, void *owner) {
    ds_seq *q = calloc(1, sizeof *q);
    if (!q) return NULL;
    q->cap_tokens = n_prompt + (max_tokens > 0 ? max_tokens : 1);
    q->tokens = malloc((size_t)q->cap_tokens * sizeof(int32_t));
    if (!q->tokens) {
        free(q);
        return NULL;
    }
    memcpy(q->tokens, prompt, (size_t)n_prompt * sizeof(int32_t));
    q->n_tokens = q->n_prompt = n_prompt;
    q->owner = owner;
    return q;
}

void ds_seq_free(ds_seq *q) {
    if (!q) return;
    free(q->tokens);
    free(q->blocks);
    free(q->hashes);
    free(q);
}

int ds_seq_append(ds_seq *q, int32_t token) {
    if (q->n_tokens == q->cap_tokens) {
        int32_t cap = q->cap_tokens * 2;
        int32_t *t = realloc(q->tokens, (size_t)cap * sizeof(int32_t));
        if (!t) return ds_err_set(DS_ERR_NOMEM, "out of memory (sequence of %d tokens)", cap);
        q->tokens = t;
        q->cap_tokens = cap;
    }
    q->tokens[q->n_tokens++] = token;
    return DS_OK;
}

/* Room for n blocks in the table (and the hashes beside it). */
static int reserve_blocks(ds_seq *q, int32_t n) {
    if (n <= q->cap_blocks) return DS_OK;
    int32_t cap = q->cap_blocks ? q->cap_blocks : 4;
    while (cap < n) cap *= 2;
    int32_t *b = realloc(q->blocks, (size_t)cap * sizeof(int32_t));
    if (b) q->blocks = b;
    uint64_t *h = b ? realloc(q->hashes, (size_t)cap * sizeof(uint64_t)) : NULL;
    if (h) q->hashes = h;
    if (!b || !h) return ds_err_set(DS_ERR_NOMEM, "out of memory (block table of %d)", cap);
    q->cap_blocks = cap;
    return DS_OK;
}

/* Last block first: the end of a prefix becomes evictable before its start, so eviction
 * trims cached prefixes from their ends instead of orphaning their tails. */
static void release_blocks(ds_sched *s, ds_seq *q) {
    for (int32_t i = q->n_blocks - 1; i >= 0; i--) ds_blocks_release(s->blocks, q->blocks[i]);
    q->n_blocks = q->n_hashed = 0;
    q->n_computed = 0;
    q->no_commit = 0;
}

void ds_sched_add(ds_sched *s, ds_seq *q) {
    q->state = DS_SEQ_WAITING;
    list_push_back(&s->waiting, q);
}

void ds_sched_remove(ds_sched *s, ds_seq *q) {
    if (q->state == DS_SEQ_WAITING)
        list_unlink(&s->waiting, q);
    else if (q->state == DS_SEQ_RUNNING)
        list_unlink(&s->running, q);
    release_blocks(s, q);
    q->state = DS_SEQ_DONE;
}

static void preempt(ds_sched *s, ds_seq *q) {
    list_unlink(&s->running, q);
    release_blocks(s, q);
    q->sched_n = 0;
    q->n_preempted++;
    q->state = DS_SEQ_WAITING;
    list_push_front(&s->waiting, q);
    s->preemptions++;
}

/* Gives q the blocks for its first n_computed + n tokens; 0 when the pool has too few. */
static int grow(ds_sched *s, ds_seq *q, int32_t n) {
    int32_t need = (q->n_computed + n + s->block_size - 1) / s->block_size;
    if (need <= q->n_blocks) return 1;
    if (ds_blocks_num_free(s->blocks) < need - q->n_blocks) return 0;
    if (reserve_blocks(q, need) != DS_OK) return 0;
    while (q->n_blocks < need) {
        int32_t id = ds_blocks_alloc(s->blocks);
        DS_ASSERT(id >= 0); /* num_free said so */
        q->blocks[q->n_blocks++] = id;
    }
    return 1;
}

/* Prefix-cache lookups for a sequence with nothing computed: its leading full blocks, never the
 * one holding its last token. */
static void lookup_prefix(ds_sched *s, ds_seq *q) {
    const int32_t bs = s->block_size, full = (q->n_tokens - 1) / bs;
    if (reserve_blocks(q, full + 1) != DS_OK) return;
    uint64_t parent = 0;
    for (int32_t b = 0; b < full; b++) {
        const int32_t *t = q->tokens + (size_t)b * (size_t)bs;
        uint64_t h = ds_blocks_hash(parent, t, bs);
        int32_t id = ds_blocks_lookup(s->blocks, h, parent, t);
        if (id < 0) break;
        q->blocks[q->n_blocks++] = id;
        q->hashes[q->n_hashed++] = h;
        q->n_computed += bs;
        parent = h;
    }
}

int32_t ds_sched_step(ds_sched *s, ds_seq **plan) {
    int32_t budget = s->max_num_batched_tokens, n_plan = 0;
    int preempted = 0;
    /* running sequences, oldest first */
    for (ds_seq *q = s->running.head; q && budget > 0;) {
        ds_seq *next = q->next;
        int32_t want = q->n_tokens - q->n_computed;
        int32_t n = want < budget ? want : budget;
        q->sched_n = 0;
        if (n < 1) { /* nothing to run (cannot happen: the engine samples after each step) */
            q = next;
            continue;
        }
        int ok;
        /* victims come from the tail, after q: the plan so far is never touched */
        while (!(ok = grow(s, q, n)) && s->running.tail != q) {
            ds_seq *victim = s->running.tail;
            if (victim == next) next = NULL; /* q is the tail now */
            preempt(s, victim);
            preempted = 1;
        }
        if (!ok) { /* q is the newest and still lacks blocks */
            preempt(s, q);
            preempted = 1;
            break;
        }
        q->sched_n = n;
        plan[n_plan++] = q;
        budget -= n;
        q = next;
    }
    /* waiting sequences in arrival order */
    while (!preempted && budget > 0 && s->waiting.head && s->running.n < s->max_num_seqs) {
        ds_seq *q = s->waiting.head;
        int first = q->n_preempted == 0 && q->n_cached == 0 && q->n_computed == 0;
        if (q->n_computed == 0) lookup_prefix(s, q);
        int32_t want = q->n_tokens - q->n_computed;
        int32_t n = want < budget ? want : budget;
        if (!grow(s, q, n)) {
            release_blocks(s, q); /* undo the lookups; the head waits for blocks */
            break;
        }
        if (first) {
            q->n_cached = q->n_computed < q->n_prompt ? q->n_computed : q->n_prompt;
            s->prompt_tokens_cached += (uint64_t)q->n_cached;
            s->prompt_tokens_total += (uint64_t)q->n_prompt;
        }
        list_unlink(&s->waiting, q);
        q->state = DS_SEQ_RUNNING;
        list_push_back(&s->running, q);
        q->sched_n = n;
        plan[n_plan++] = q;
        budget -= n;
    }
    return n_plan;
}

void ds_sched_computed(ds_sched *s, ds_seq *q) {
    const int32_t bs = s->block_size;
    q->n_computed += q->sched_n;
    q->sched_n = 0;
    while (!q->no_commit && (q->n_hashed + 1) * bs <= q->n_computed) {
        int32_t b = q->n_hashed;
        const int32_t *t = q->tokens + (size_t)b * (size_t)bs;
        uint64_t parent = b ? q->hashes[b - 1] : 0, h = ds_blocks_hash(parent, t, bs);
        if (ds_blocks_commit(s->blocks, q->blocks[b], h, parent, t) == DS_BLOCKS_COLLISION) {
            q->no_commit = 1;
            break;
        }
        q->hashes[q->n_hashed++] = h;
    }
}
