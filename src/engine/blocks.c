/* KV block manager: which block ids of the paged MLA cache are free, which are in use by whom
 * (reference counts), and which hold the computed KV of a known prefix (prefix caching).
 *
 * What it assumes. The cache is a fixed array of n_blocks blocks of block_size tokens, sized
 * once at startup from --kv-cache-memory; this file hands out ids and never touches the
 * latents. The engine thread is the only caller, so there are no locks. A sequence owns one
 * reference on each block of its block table; a forked sequence (n > 1 completions sharing a
 * prompt) retains the blocks it shares. The pattern is sqlite's page cache: blocks are pinned by
 * reference count (alloc/lookup = fetch, release = unpin), and unpinned pages with useful
 * contents stay around until their memory is needed.
 *
 * Prefix caching (vLLM's automatic prefix caching). A full block is identified by a chained
 * hash: hash_i = H(hash_{i-1}, tokens of block i), hash_{-1} = 0, so equal hashes mean, with
 * overwhelming probability, an equal prefix from token 0 (the KV of a token depends on every
 * token before it, which is why the hash is chained rather than per block). When a block fills
 * and its KV is computed, the engine commits it under its hash; an arriving request looks its
 * full prompt blocks up in order, takes the hits and computes only from the first miss.
 *
 * Why tokens are verified. Serving wrong KV is silent corruption of someone's output, so a
 * 64-bit hash match alone is not trusted: every cached block keeps its parent hash and its
 * block_size token ids, and a lookup hits only when both match exactly. A collision between
 * two blocks' hashes then costs a cache miss, never wrong attention. What verification cannot
 * see is a collision one level up: a block's parent hash names the previous block by hash, not
 * by identity. Two holes remain, each needing a real 64-bit collision (about n^2 / 2^65 for n
 * distinct blocks ever committed) plus a coincidence on top: (a) a sequence whose block lost
 * the hash to a different block goes on to commit its next blocks under that hash as parent:
 * commit reports DS_BLOCKS_COLLISION so that the engine stops committing that sequence, which
 * closes this one; (b) the canonical parent is evicted and a colliding block becomes canonical
 * while its former children stay cached, and a request on the new prefix continues with
 * exactly those children's tokens. Closing (b) would take parent links by block identity and
 * epoch; we accept it, as vLLM accepts unverified hashes.
 *
 * Why the first commit stays canonical. Two sequences with the same prompt running at once
 * both compute the same block before either could find the other's. Only one copy can be
 * found under the hash; keeping the first means a block that has been handed out by lookup
 * (and is pinned by other sequences) never changes its identity under them, and the second copy
 * simply stays private to its sequence and returns to the free list when released. A second
 * commit with different parent or tokens is a collision: it is counted and refused.
 *
 * LRU of released cached blocks. A cached block whose last reference is released keeps its
 * contents and its hash and joins the back of the LRU list; it still counts as free because an
 * allocation may take it. Allocation prefers the free list (blocks with nothing worth
 * keeping), oldest-freed first, and only then evicts the front of the LRU: the cached block
 * released longest ago, the one least likely to be asked for again. A lookup hit on an
 * evictable block pins it and takes it off the LRU; its next release puts it at the back.
 * Eviction removes the block's hash from the table (so no lookup can find contents that are
 * about to be overwritten) and hands the block out with refcount 1 like any free block. A
 * sequence should release its blocks last-to-first so that a prefix's tail is evicted before
 * its head (a child without its parent can never be reached by an in-order lookup).
 *
 * Structure. Per block: refcount, state, hash, parent, links; tokens in one (n_blocks,
 * block_size) array. The free list and the LRU are circular doubly-linked lists threaded
 * through the block array, with two sentinel entries after the real blocks, so moving a block
 * between them is O(1). Cached blocks are indexed by an open-addressing table of block ids
 * (linear probing, at most half full, deletion by backward shift: no tombstones to rot), keyed
 * by a re-mix of the 64-bit hash so that crafted hashes cannot cluster the probes. */
#include "engine/engine_internal.h"

#include <stdlib.h>
#include <string.h>

enum { ST_FREE, ST_USED, ST_EVICTABLE };

typedef struct {
    uint64_t hash;      /* valid when cached */
    uint64_t parent;    /* valid when cached */
    int32_t ref;        /* references held by sequences */
    int32_t prev, next; /* links in the free list or the LRU; -1 while used */
    uint8_t state;      /* ST_* */
    uint8_t cached;     /* in the hash table */
} blk;

struct ds_blocks {
    int32_t n, bs; /* n_blocks, block_size */
    int prefix_caching;
    blk *blk;        /* (n + 2): the blocks, then the free-list and LRU sentinels */
    int32_t *tokens; /* (n, bs) token ids of cached blocks; NULL without prefix caching */
    int32_t *slots;  /* (cap) hash table of block ids, -1 empty */
    uint64_t mask;   /* cap - 1, cap a power of two >= 2 n */
    int32_t n_free_list, n_lru, n_cached;
    uint64_t lookups, hits, evictions, collisions;
};

#define FREE_HEAD(b) ((b)->n)    /* sentinel of the free list */
#define LRU_HEAD(b) ((b)->n + 1) /* sentinel of the LRU: next = least recently released */

/* ---- hashing ------------------------------------------------------------------------------- */

/* MurmurHash3's 64-bit finalizer: a bijection with full avalanche. */
static uint64_t fmix64(uint64_t k) {
    k ^= k >> 33;
    k *= 0xff51afd7ed558ccdULL;
    k ^= k >> 33;
    k *= 0xc4ceb9fe1a85ec53ULL;
    k ^= k >> 33;
    return k;
}

/* Each step is a bijection of the state for a given word, so equal-length inputs that differ in
 * one word (two tokens) never collide (but for the remapped 0); the length enters last, so [a]
 * and [a, 0] differ too. */
uint64_t ds_blocks_hash(uint64_t parent, const int32_t *tokens, int32_t n) {
    DS_ASSERT(n >= 0 && (n == 0 || tokens != NULL));
    uint64_t h = fmix64(parent ^ 0x6a09e667f3bcc908ULL);
    int32_t i = 0;
    for (; i + 1 < n; i += 2) {
        uint64_t w = (uint64_t)(uint32_t)tokens[i] | (uint64_t)(uint32_t)tokens[i + 1] << 32;
        h = fmix64(h ^ w) + 0x9e3779b97f4a7c15ULL;
    }
    if (i < n) h = fmix64(h ^ (uint32_t)tokens[i]) + 0x9e3779b97f4a7c15ULL;
    h = fmix64(h ^ ((uint64_t)(uint32_t)n * 0xbb67ae8584caa73bULL));
    return h ? h : 0x3c6ef372fe94f82bULL; /* 0 is reserved for "no parent" */
}

/* ---- intrusive lists ------------------------------------------------------------------------ */

static void list_init(ds_blocks *b, int32_t head) {
    b->blk[head].prev = b->blk[head].next = head;
}

static void list_push_back(ds_blocks *b, int32_t head, int32_t id) {
    int32_t last = b->blk[head].prev;
    b->blk[id].prev = last;
    b->blk[id].next = head;
    b->blk[last].next = id;
    b->blk[head].prev = id;
}

static void list_unlink(ds_blocks *b, int32_t id) {
    blk *x = &b->blk[id];
    b->blk[x->prev].next = x->next;
    b->blk[x->next].prev = x->prev;
    x->prev = x->next = -1;
}

/* ---- hash table ---------------------------------------------------------------------------- */

static uint64_t home(const ds_blocks *b, uint64_t hash) {
    return fmix64(hash ^ 0xa54ff53a5f1d36f1ULL) & b->mask;
}

/* Slot holding the block cached under hash, or -1. */
static int64_t table_find(const ds_blocks *b, uint64_t hash) {
    for (uint64_t i = home(b, hash);; i = (i + 1) & b->mask) {
        int32_t id = b->slots[i];
        if (id < 0) return -1;
        if (b->blk[id].hash == hash) return (int64_t)i;
    }
}

static void table_insert(ds_blocks *b, int32_t id) {
    uint64_t i = home(b, b->blk[id].hash);
    while (b->slots[i] >= 0) i = (i + 1) & b->mask;
    b->slots[i] = id;
}

/* Backward-shift deletion: later entries of the probe run move into the hole when their home
 * slot does not lie cyclically in (hole, their slot], so every entry stays reachable. */
static void table_remove(ds_blocks *b, uint64_t hole) {
    for (uint64_t j = hole;;) {
        j = (j + 1) & b->mask;
        int32_t id = b->slots[j];
        if (id < 0) break;
        uint64_t k = home(b, b->blk[id].hash);
        if (((j - k) & b->mask) >= ((j - hole) & b->mask)) { /* k not in (hole, j] */
            b->slots[hole] = id;
            hole = j;
        }
    }
    b->slots[hole] = -1;
}

static void uncache(ds_blocks *b, int32_t id) {
    int64_t slot = table_find(b, b->blk[id].hash);
    DS_ASSERT(slot >= 0 && b->slots[slot] == id);
    table_remove(b, (uint64_t)slot);
    b->blk[id].cached = 0;
    b->n_cached--;
}

/* ---- lifecycle ----------------------------------------------------------------------------- */

int ds_blocks_open(int32_t n_blocks, int32_t block_size, int prefix_caching, ds_blocks **out) {
    *out = NULL;
    if (n_blocks <= 0 || n_blocks > INT32_MAX - 2)
        return ds_err_set(DS_ERR_ARG, "KV block manager: n_blocks must be in [1, %d] (got %d)",
                          INT32_MAX - 2, n_blocks);
    if (block_size <= 0)
        return ds_err_set(DS_ERR_ARG, "KV block manager: block_size must be positive (got %d)",
                          block_size);
    uint64_t n_tokens = 0, cap = 16;
    if (prefix_caching && (!ds_mul_ok((uint64_t)n_blocks, (uint64_t)block_size, &n_tokens) ||
                           n_tokens > SIZE_MAX / sizeof(int32_t)))
        return ds_err_set(DS_ERR_ARG,
                          "KV block manager: %d blocks of %d tokens overflow the token store",
                          n_blocks, block_size);
    while (cap < 2 * (uint64_t)n_blocks) cap *= 2;

    ds_blocks *b = calloc(1, sizeof *b);
    if (!b) goto nomem;
    b->n = n_blocks;
    b->bs = block_size;
    b->prefix_caching = prefix_caching != 0;
    b->blk = calloc((size_t)n_blocks + 2, sizeof *b->blk);
    if (!b->blk) goto nomem;
    if (b->prefix_caching) {
        b->tokens = malloc((size_t)n_tokens * sizeof *b->tokens);
        b->slots = malloc((size_t)cap * sizeof *b->slots);
        if (!b->tokens || !b->slots) goto nomem;
        memset(b->slots, 0xff, (size_t)cap * sizeof *b->slots); /* all -1 */
        b->mask = cap - 1;
    }
    list_init(b, FREE_HEAD(b));
    list_init(b, LRU_HEAD(b));
    for (int32_t i = 0; i < n_blocks; i++) {
        b->blk[i].state = ST_FREE;
        list_push_back(b, FREE_HEAD(b), i);
    }
    b->n_free_list = n_blocks;
    *out = b;
    return DS_OK;
nomem:
    ds_blocks_close(b);
    return ds_err_set(DS_ERR_NOMEM, "KV block manager: out of memory for %d blocks of %d tokens",
                      n_blocks, block_size);
}

void ds_blocks_close(ds_blocks *b) {
    if (!b) return;
    free(b->blk);
    free(b->tokens);
    free(b->slots);
    free(b);
}

/* ---- references ---------------------------------------------------------------------------- */

int32_t ds_blocks_alloc(ds_blocks *b) {
    int32_t id;
    if (b->n_free_list > 0) {
        id = b->blk[FREE_HEAD(b)].next;
        b->n_free_list--;
    } else if (b->n_lru > 0) {
        id = b->blk[LRU_HEAD(b)].next; /* least recently released */
        b->n_lru--;
        uncache(b, id);
        b->evictions++;
    } else {
        return -1;
    }
    list_unlink(b, id);
    b->blk[id].state = ST_USED;
    b->blk[id].ref = 1;
    return id;
}

void ds_blocks_retain(ds_blocks *b, int32_t id) {
    DS_ASSERT(id >= 0 && id < b->n && b->blk[id].ref > 0 && b->blk[id].ref < INT32_MAX);
    b->blk[id].ref++;
}

void ds_blocks_release(ds_blocks *b, int32_t id) {
    DS_ASSERT(id >= 0 && id < b->n && b->blk[id].ref > 0);
    blk *x = &b->blk[id];
    if (--x->ref > 0) return;
    if (x->cached) {
        x->state = ST_EVICTABLE;
        list_push_back(b, LRU_HEAD(b), id);
        b->n_lru++;
    } else {
        x->state = ST_FREE;
        list_push_back(b, FREE_HEAD(b), id);
        b->n_free_list++;
    }
}

/* ---- prefix cache -------------------------------------------------------------------------- */

/* 1 when cached block id was stored with exactly this parent and these tokens. */
static int same_content(const ds_blocks *b, int32_t id, uint64_t parent, const int32_t *tokens) {
    return b->blk[id].parent == parent && memcmp(b->tokens + (size_t)id * (size_t)b->bs, tokens,
                                                 (size_t)b->bs * sizeof *tokens) == 0;
}

int32_t ds_blocks_lookup(ds_blocks *b, uint64_t hash, uint64_t parent, const int32_t *tokens) {
    DS_ASSERT(tokens != NULL);
    b->lookups++;
    if (!b->prefix_caching) return -1;
    int64_t slot = table_find(b, hash);
    if (slot < 0) return -1;
    int32_t id = b->slots[slot];
    if (!same_content(b, id, parent, tokens)) {
        b->collisions++;
        return -1;
    }
    blk *x = &b->blk[id];
    if (x->ref == 0) { /* evictable: pin it again */
        DS_ASSERT(x->state == ST_EVICTABLE);
        list_unlink(b, id);
        b->n_lru--;
        x->state = ST_USED;
    }
    DS_ASSERT(x->ref < INT32_MAX);
    x->ref++;
    b->hits++;
    return id;
}

int ds_blocks_commit(ds_blocks *b, int32_t id, uint64_t hash, uint64_t parent,
                     const int32_t *tokens) {
    DS_ASSERT(id >= 0 && id < b->n && b->blk[id].ref > 0 && tokens != NULL);
    if (!b->prefix_caching) return DS_BLOCKS_UNCACHED;
    blk *x = &b->blk[id];
    if (x->cached) { /* again: must be its own hash (cached contents never change) */
        DS_ASSERT(x->hash == hash);
        return DS_BLOCKS_CACHED;
    }
    int64_t slot = table_find(b, hash);
    if (slot >= 0) {
        if (same_content(b, b->slots[slot], parent, tokens)) return DS_BLOCKS_UNCACHED;
        b->collisions++;
        return DS_BLOCKS_COLLISION;
    }
    x->hash = hash;
    x->parent = parent;
    x->cached = 1;
    memcpy(b->tokens + (size_t)id * (size_t)b->bs, tokens, (size_t)b->bs * sizeof *tokens);
    table_insert(b, id);
    b->n_cached++;
    return DS_BLOCKS_CACHED;
}

/* ---- counters ------------------------------------------------------------------------------ */

int32_t ds_blocks_num_free(const ds_blocks *b) {
    return b->n_free_list + b->n_lru;
}

int32_t ds_blocks_refcount(const ds_blocks *b, int32_t id) {
    DS_ASSERT(id >= 0 && id < b->n);
    return b->blk[id].ref;
}

int ds_blocks_is_cached(const ds_blocks *b, int32_t id) {
    DS_ASSERT(id >= 0 && id < b->n);
    return b->blk[id].cached;
}

void ds_blocks_get_stats(const ds_blocks *b, ds_blocks_stats *out) {
    out->n_blocks = b->n;
    out->block_size = b->bs;
    out->n_free = b->n_free_list + b->n_lru;
    out->n_evictable = b->n_lru;
    out->n_used = b->n - out->n_free;
    out->n_cached = b->n_cached;
    out->lookups = b->lookups;
    out->hits = b->hits;
    out->evictions = b->evictions;
    out->collisions = b->collisions;
}

/* ---- self-check ---------------------------------------------------------------------------- */

/* Walks one list: every member has the state it should, links agree both ways, the length
 * matches the counter. */
static int check_list(const ds_blocks *b, int32_t head, int state, int32_t want, const char *name,
                      uint8_t *seen) {
    int32_t count = 0;
    for (int32_t id = b->blk[head].next, prev = head; id != head; prev = id, id = b->blk[id].next) {
        if (id < 0 || id >= b->n || seen[id] || count >= b->n)
            return ds_err_set(DS_ERR_RANGE, "blocks: %s list is corrupt at entry %d (id %d)", name,
                              count, id);
        if (b->blk[id].prev != prev)
            return ds_err_set(DS_ERR_RANGE, "blocks: %s list: block %d has a wrong prev link", name,
                              id);
        if (b->blk[id].state != state || b->blk[id].ref != 0 ||
            b->blk[id].cached != (state == ST_EVICTABLE))
            return ds_err_set(DS_ERR_RANGE,
                              "blocks: block %d on the %s list has state %d, ref %d, cached %d", id,
                              name, b->blk[id].state, b->blk[id].ref, b->blk[id].cached);
        seen[id] = 1;
        count++;
    }
    if (count != want)
        return ds_err_set(DS_ERR_RANGE, "blocks: %s list holds %d blocks, counter says %d", name,
                          count, want);
    return DS_OK;
}

int ds_blocks__check(const ds_blocks *b) {
    uint8_t *seen = calloc((size_t)b->n, 1);
    if (!seen) return ds_err_set(DS_ERR_NOMEM, "blocks: out of memory in the self-check");
    int rc = check_list(b, FREE_HEAD(b), ST_FREE, b->n_free_list, "free", seen);
    if (!rc) rc = check_list(b, LRU_HEAD(b), ST_EVICTABLE, b->n_lru, "LRU", seen);
    int32_t cached = 0;
    for (int32_t id = 0; id < b->n && !rc; id++) {
        const blk *x = &b->blk[id];
        if (!seen[id] && (x->state != ST_USED || x->ref <= 0 || x->prev != -1 || x->next != -1))
            rc = ds_err_set(DS_ERR_RANGE, "blocks: block %d is on no list but has state %d, ref %d",
                            id, x->state, x->ref);
        else if (x->cached && !b->prefix_caching)
            rc = ds_err_set(DS_ERR_RANGE, "blocks: block %d is cached with prefix caching off", id);
        else if (x->cached) {
            cached++;
            int64_t slot = table_find(b, x->hash);
            if (slot < 0 || b->slots[slot] != id)
                rc = ds_err_set(DS_ERR_RANGE, "blocks: cached block %d is not found by its hash",
                                id);
        }
    }
    if (!rc && cached != b->n_cached)
        rc = ds_err_set(DS_ERR_RANGE, "blocks: %d blocks are cached, counter says %d", cached,
                        b->n_cached);
    int32_t in_table = 0;
    for (uint64_t i = 0; b->prefix_caching && i <= b->mask && !rc; i++) {
        int32_t id = b->slots[i];
        if (id < 0) continue;
        in_table++;
        if (id >= b->n || !b->blk[id].cached)
            rc = ds_err_set(DS_ERR_RANGE, "blocks: table slot %llu holds uncached block %d",
                            (unsigned long long)i, id);
    }
    if (!rc && in_table != b->n_cached)
        rc = ds_err_set(DS_ERR_RANGE, "blocks: hash table holds %d blocks, counter says %d",
                        in_table, b->n_cached);
    free(seen);
    return rc;
}
