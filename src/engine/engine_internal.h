/* Internal to src/engine: the pieces the engine is built from (KV block manager, ...). Nothing
 * outside src/engine and tests/engine includes this header; the public API is engine/engine.h.
 * Each section below is one concern with its own prefix; they share only core/. */
#ifndef DS_ENGINE_INTERNAL_H
#define DS_ENGINE_INTERNAL_H

#include "core/core.h"
#include "engine/engine.h"

#include <stdint.h>

/* ---- block manager ----------------------------------------------------------------------------
 * Block ids of the paged MLA cache (blocks.c has the design essay). A block holds the latents of
 * block_size consecutive tokens of one sequence; the memory itself lives elsewhere, indexed by
 * these ids. Blocks are pinned by reference count, like sqlite's page cache: alloc and lookup
 * hand out a reference, release drops one. With prefix caching on, a full block whose KV has
 * been computed can be committed under the hash of its prefix; later requests with the same
 * prefix find it by lookup and share it. A cached block nobody references stays cached until an
 * allocation that finds no free block evicts it, least recently released first.
 *
 * A block is in exactly one state: free (refcount 0, uncached), used (refcount > 0, cached or
 * not) or evictable (refcount 0, cached). Every operation is O(1) expected, plus O(block_size)
 * token comparisons for lookup and commit. Not thread-safe: one owner (the engine thread).
 * Invalid ids and releases of unreferenced blocks are broken invariants (DS_ASSERT). */

typedef struct ds_blocks ds_blocks;

/* Counters for /metrics and tests. n_free + n_used == n_blocks; n_evictable <= n_free. */
typedef struct {
    int32_t n_blocks, block_size;
    int32_t n_free;      /* refcount 0: the free list plus the evictable cached blocks, i.e. how
                            many allocations can still succeed */
    int32_t n_evictable; /* refcount 0 and cached (part of n_free) */
    int32_t n_used;      /* refcount > 0 */
    int32_t n_cached;    /* cached under a hash, referenced or evictable */
    uint64_t lookups;    /* ds_blocks_lookup calls, one per block looked up */
    uint64_t hits;       /* lookups that returned a block */
    uint64_t evictions;  /* cached blocks that an allocation took back */
    uint64_t collisions; /* lookups and commits that found their hash held by a block with a
                            different parent or tokens: a 64-bit hash collision (expect 0) */
} ds_blocks_stats;

/* Outcomes of ds_blocks_commit. */
enum {
    DS_BLOCKS_COLLISION = -1, /* a block with another parent or other tokens holds the hash (a
                                 64-bit collision): this one stays uncached, and the caller must
                                 commit no later block of this sequence (their parent hash now
                                 names someone else's prefix) */
    DS_BLOCKS_UNCACHED = 0,   /* an identical block (same parent and tokens) is already cached
                                 under the hash, or prefix caching is off: this one stays
                                 uncached; later blocks of the sequence may still be committed */
    DS_BLOCKS_CACHED = 1,     /* this block is now (or already was) the one cached under the hash */
};

/* n_blocks blocks of block_size tokens, all free, ids 0..n_blocks-1. prefix_caching 0 turns
 * lookup and commit into no-ops (lookups still count). DS_ERR_ARG when n_blocks or block_size
 * is not positive or too large, DS_ERR_NOMEM; the message names which. *out owned by the caller,
 * closed with ds_blocks_close. */
int ds_blocks_open(int32_t n_blocks, int32_t block_size, int prefix_caching, ds_blocks **out);
void ds_blocks_close(ds_blocks *b); /* accepts NULL */

/* A block with refcount 1 whose contents are to be (re)written: the free block that has been
 * free longest (never-used blocks first, in id order), else the least recently released cached
 * block, which loses its hash (an eviction). -1 when every block is referenced. */
int32_t ds_blocks_alloc(ds_blocks *b);
/* One more reference on a block the caller already references (a forked sequence sharing it). */
void ds_blocks_retain(ds_blocks *b, int32_t id);
/* Drops one reference. At 0 an uncached block goes to the back of the free list, a cached one
 * stays cached and becomes the most recently released evictable block. */
void ds_blocks_release(ds_blocks *b, int32_t id);

/* Hash of a block's prefix: parent is the previous block's hash (0 for a sequence's first
 * block), tokens (n) the block's token ids. Well mixed (every input bit affects every output
 * bit), deterministic across runs and machines, never 0 (so 0 can only mean "no parent").
 * Not cryptographic: lookups and commits verify tokens and parent, so collisions cost no
 * correctness at the level where they happen (blocks.c says what remains). */
uint64_t ds_blocks_hash(uint64_t parent, const int32_t *tokens, int32_t n);

/* The block cached under hash if its stored parent hash and block_size tokens equal parent and
 * tokens exactly, with one more reference taken for the caller (an evictable block stops being
 * evictable); else -1. Always -1 when prefix caching is off. Callers look up a sequence's
 * blocks in order and stop at the first miss. */
int32_t ds_blocks_lookup(ds_blocks *b, uint64_t hash, uint64_t parent, const int32_t *tokens);
/* Marks block id, full and with its KV computed, as cached under hash = ds_blocks_hash(parent,
 * tokens, block_size); the caller holds a reference. tokens are copied. If another block holds
 * the hash, the first one stays canonical and this one stays uncached (returns to the free list
 * when released). Committing a cached block again under its own hash is a no-op; under another
 * hash it is a broken invariant. Returns DS_BLOCKS_CACHED / _UNCACHED / _COLLISION above. */
int ds_blocks_commit(ds_blocks *b, int32_t id, uint64_t hash, uint64_t parent,
                     const int32_t *tokens);

/* Number of blocks an allocation can still get: free + evictable. */
int32_t ds_blocks_num_free(const ds_blocks *b);
/* Reference count of a block (tests, leak checks at shutdown). */
int32_t ds_blocks_refcount(const ds_blocks *b, int32_t id);
/* 1 when the block is cached under a hash (referenced or evictable), else 0. */
int ds_blocks_is_cached(const ds_blocks *b, int32_t id);
void ds_blocks_get_stats(const ds_blocks *b, ds_blocks_stats *out);
/* Test hook: walks the lists and the hash table and checks every invariant against the
 * per-block state. 0 when consistent, else DS_ERR_RANGE with a message naming the first fault.
 * O(n_blocks + table size). */
int ds_blocks__check(const ds_blocks *b);

/* ---- scheduler --------------------------------------------------------------------------------
 * Continuous batching over the block manager (scheduler.c has the design essay). A sequence is
 * the scheduling state of one request: its tokens (prompt, then every generated token), how many
 * of them have their KV in the cache, and its block table. The scheduler owns two FIFO lists,
 * waiting and running; each step it picks how many tokens of which sequences to run. Not
 * thread-safe: the engine thread owns it. */

typedef enum { DS_SEQ_NEW, DS_SEQ_WAITING, DS_SEQ_RUNNING, DS_SEQ_DONE } ds_seq_state;

typedef struct ds_seq ds_seq;
struct ds_seq {
    int32_t *tokens; /* (n_tokens) prompt then output; owned, grown by ds_seq_append */
    int32_t n_tokens, cap_tokens, n_prompt;
    int32_t n_computed; /* leading tokens whose KV is in the cache */
    int32_t *blocks;    /* (n_blocks) block table, owned */
    int32_t n_blocks, cap_blocks;
    uint64_t *hashes; /* (n_hashed) prefix hashes of the leading full blocks looked up or
                         committed; owned, cap_blocks long */
    int32_t n_hashed;
    int no_commit;       /* a hash collision: commit no further block of this sequence */
    int32_t n_cached;    /* prompt tokens found in the prefix cache at the first admission */
    int32_t sched_n;     /* tokens scheduled in the current step */
    int32_t n_preempted; /* times this sequence lost its blocks */
    ds_seq_state state;
    ds_seq *prev, *next; /* in the waiting or the running list */
    void *owner;         /* the engine's request */
};

typedef struct {
    ds_seq *head, *tail;
    int32_t n;
} ds_seq_list;

typedef struct {
    ds_blocks *blocks;
    int32_t block_size, max_num_seqs, max_num_batched_tokens;
    ds_seq_list waiting, running;
    uint64_t preemptions;          /* sequences preempted so far */
    uint64_t prompt_tokens_cached; /* prompt tokens served from the prefix cache */
    uint64_t prompt_tokens_total;  /* prompt tokens of admitted sequences (first admission) */
} ds_sched;

/* Initialises a scheduler over blocks (borrowed). */
void ds_sched_init(ds_sched *s, ds_blocks *blocks, int32_t max_num_seqs,
                   int32_t max_num_batched_tokens);
/* A sequence for prompt (n_prompt >= 1 tokens, copied); capacity for max_tokens more. NULL on
 * out of memory. Freed with ds_seq_free once it has left the scheduler. */
ds_seq *ds_seq_new(const int32_t *prompt, int32_t n_prompt, int32_t max_tokens, void *owner);
void ds_seq_free(ds_seq *q); /* accepts NULL */
/* Appends a generated token (the capacity given at creation is never exceeded by the engine;
 * beyond it the array grows). DS_ERR_NOMEM on failure. */
int ds_seq_append(ds_seq *q, int32_t token);
/* Queues q at the tail of waiting. */
void ds_sched_add(ds_sched *s, ds_seq *q);
/* Picks this step's work: fills plan (capacity max_num_seqs) with the sequences to run and sets
 * each one's sched_n (>= 1); the running ones (oldest first) come before the newly admitted.
 * Blocks for the scheduled tokens are allocated; sequences are preempted (newest running first,
 * blocks released, back to the head of waiting with all their tokens) when blocks run out.
 * Returns the number of sequences in plan (0: nothing can run). */
int32_t ds_sched_step(ds_sched *s, ds_seq **plan);
/* After the step's forward pass: q's scheduled tokens are in the cache; newly full blocks are
 * committed to the prefix cache. */
void ds_sched_computed(ds_sched *s, ds_seq *q);
/* Takes q out of the scheduler (finished or aborted; from any list or none) and releases its
 * blocks. */
void ds_sched_remove(ds_sched *s, ds_seq *q);

#endif
