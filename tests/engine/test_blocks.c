/* KV block manager: a seeded random program (sequences admitted with in-order prefix lookups,
 * allocations, commits, forks, releases, raw lookups and commits with crafted hashes) run
 * against ds_blocks and a naive twin made of arrays and linear scans, comparing every return
 * value, every counter and every block's refcount and cached flag after every step, over
 * configurations from one block to hundreds, with the real hash and with a 3-bit hash that
 * collides all the time; plus directed tests of LRU eviction order, collision safety,
 * duplicate commits, prefix caching off, exhaustion, full release, the hash's mixing,
 * argument errors and the assertions on broken invariants. */
#include "engine/engine_internal.h"
#include "testutil.h"

#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

/* ---- a deterministic test RNG ---------------------------------------------------------------- */
static uint64_t rng_state;
static uint64_t rng_next(void) { /* xorshift64* */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 0x2545f4914f6cdd1dULL;
}
static int32_t rng_int(int32_t n) {
    return (int32_t)(rng_next() % (uint64_t)n);
}

/* ---- the naive twin: the semantics written out as plainly as possible ----------------------
 * A block is free when its refcount is 0; it is "on the free list" when also uncached and
 * "evictable" when cached. Order within each group is the time it got there (stamp): the
 * allocation takes the uncached free block with the smallest stamp (blocks start with stamps
 * 0..n-1 in id order), else the cached one with the smallest stamp. */
typedef struct {
    int32_t n, bs;
    int pc;
    int32_t *ref;                    /* (n) */
    uint8_t *cached;                 /* (n) */
    uint64_t *hash, *parent, *stamp; /* (n) */
    int32_t *tok;                    /* (n, bs) */
    uint64_t clock;
    uint64_t lookups, hits, evictions, collisions;
} twin;

static void twin_init(twin *t, int32_t n, int32_t bs, int pc) {
    memset(t, 0, sizeof *t);
    t->n = n;
    t->bs = bs;
    t->pc = pc;
    t->ref = calloc((size_t)n, sizeof *t->ref);
    t->cached = calloc((size_t)n, 1);
    t->hash = calloc((size_t)n, sizeof *t->hash);
    t->parent = calloc((size_t)n, sizeof *t->parent);
    t->stamp = calloc((size_t)n, sizeof *t->stamp);
    t->tok = calloc((size_t)n * (size_t)bs, sizeof *t->tok);
    for (int32_t i = 0; i < n; i++) t->stamp[i] = (uint64_t)i;
    t->clock = (uint64_t)n;
}

static void twin_free(twin *t) {
    free(t->ref);
    free(t->cached);
    free(t->hash);
    free(t->parent);
    free(t->stamp);
    free(t->tok);
}

static int32_t twin_alloc(twin *t) {
    int32_t best = -1;
    for (int32_t i = 0; i < t->n; i++)
        if (t->ref[i] == 0 && !t->cached[i] && (best < 0 || t->stamp[i] < t->stamp[best])) best = i;
    if (best < 0) {
        for (int32_t i = 0; i < t->n; i++)
            if (t->ref[i] == 0 && t->cached[i] && (best < 0 || t->stamp[i] < t->stamp[best]))
                best = i;
        if (best < 0) return -1;
        t->cached[best] = 0;
        t->evictions++;
    }
    t->ref[best] = 1;
    return best;
}

static void twin_release(twin *t, int32_t id) {
    if (--t->ref[id] == 0) t->stamp[id] = t->clock++;
}

static int32_t twin_find(const twin *t, uint64_t hash) {
    for (int32_t i = 0; i < t->n; i++)
        if (t->cached[i] && t->hash[i] == hash) return i;
    return -1;
}

static int twin_same(const twin *t, int32_t id, uint64_t parent, const int32_t *tokens) {
    return t->parent[id] == parent &&
           memcmp(t->tok + (size_t)id * (size_t)t->bs, tokens, (size_t)t->bs * sizeof *tokens) == 0;
}

static int32_t twin_lookup(twin *t, uint64_t hash, uint64_t parent, const int32_t *tokens) {
    t->lookups++;
    if (!t->pc) return -1;
    int32_t id = twin_find(t, hash);
    if (id < 0) return -1;
    if (!twin_same(t, id, parent, tokens)) {
        t->collisions++;
        return -1;
    }
    t->ref[id]++;
    t->hits++;
    return id;
}

static int twin_commit(twin *t, int32_t id, uint64_t hash, uint64_t parent, const int32_t *tokens) {
    if (!t->pc) return DS_BLOCKS_UNCACHED;
    if (t->cached[id]) return DS_BLOCKS_CACHED;
    int32_t other = twin_find(t, hash);
    if (other >= 0) {
        if (twin_same(t, other, parent, tokens)) return DS_BLOCKS_UNCACHED;
        t->collisions++;
        return DS_BLOCKS_COLLISION;
    }
    t->cached[id] = 1;
    t->hash[id] = hash;
    t->parent[id] = parent;
    memcpy(t->tok + (size_t)id * (size_t)t->bs, tokens, (size_t)t->bs * sizeof *tokens);
    return DS_BLOCKS_CACHED;
}

/* ---- the model-based test ------------------------------------------------------------------ */
#define MAX_SEQS 192
#define SEQ_CAP 24 /* block references one program sequence may hold */
#define N_DOCS 12
#define DOC_BLOCKS 8
#define MAX_BS 16

typedef struct {
    int32_t ids[SEQ_CAP];
    int n;
} seq;

typedef struct {
    const char *name;
    ds_blocks *b;
    twin t;
    int weak_hash; /* keep 3 bits of the hash: collisions everywhere */
    long step;
    int failed; /* first divergence stops the run, so one bug prints one message */
    seq seqs[MAX_SEQS];
    int n_seqs;
    int32_t docs[N_DOCS + 1][DOC_BLOCKS][MAX_BS]; /* token chains that share prefixes; the last
                                                     is scratch for one-off prompts */
} model;

static uint64_t model_hash(const model *m, uint64_t parent, const int32_t *tokens) {
    uint64_t h = ds_blocks_hash(parent, tokens, m->t.bs);
    return m->weak_hash ? (h & 7) + 1 : h;
}

#define DIVERGE(...)                                                                               \
    do {                                                                                           \
        if (!m->failed) {                                                                          \
            fprintf(stderr, "%s, step %ld: ", m->name, m->step);                                   \
            fprintf(stderr, __VA_ARGS__);                                                          \
            fputc('\n', stderr);                                                                   \
        }                                                                                          \
        m->failed = 1;                                                                             \
    } while (0)

/* Everything observable, after every operation. */
static void compare(model *m) {
    m->step++;
    if (m->failed) return;
    const twin *t = &m->t;
    ds_blocks_stats s;
    ds_blocks_get_stats(m->b, &s);
    int32_t free_ = 0, evictable = 0, cached = 0;
    for (int32_t i = 0; i < t->n; i++) {
        free_ += t->ref[i] == 0;
        evictable += t->ref[i] == 0 && t->cached[i];
        cached += t->cached[i];
        if (ds_blocks_refcount(m->b, i) != t->ref[i] ||
            ds_blocks_is_cached(m->b, i) != t->cached[i])
            DIVERGE("block %d: refcount %d cached %d, twin %d %d", i, ds_blocks_refcount(m->b, i),
                    ds_blocks_is_cached(m->b, i), t->ref[i], t->cached[i]);
    }
    if (s.n_blocks != t->n || s.block_size != t->bs || s.n_free != free_ ||
        ds_blocks_num_free(m->b) != free_ || s.n_used != t->n - free_ ||
        s.n_evictable != evictable || s.n_cached != cached || s.lookups != t->lookups ||
        s.hits != t->hits || s.evictions != t->evictions || s.collisions != t->collisions)
        DIVERGE("counters free %d evictable %d used %d cached %d lookups %llu hits %llu "
                "evictions %llu collisions %llu; twin %d %d %d %d %llu %llu %llu %llu",
                s.n_free, s.n_evictable, s.n_used, s.n_cached, (unsigned long long)s.lookups,
                (unsigned long long)s.hits, (unsigned long long)s.evictions,
                (unsigned long long)s.collisions, free_, evictable, t->n - free_, cached,
                (unsigned long long)t->lookups, (unsigned long long)t->hits,
                (unsigned long long)t->evictions, (unsigned long long)t->collisions);
    if (ds_blocks__check(m->b) != 0) DIVERGE("self-check: %s", ds_err_msg());
}

static int32_t m_alloc(model *m) {
    int32_t a = ds_blocks_alloc(m->b), w = twin_alloc(&m->t);
    if (a != w) DIVERGE("alloc returned %d, twin %d", a, w);
    compare(m);
    return a;
}

static void m_release(model *m, int32_t id) {
    ds_blocks_release(m->b, id);
    twin_release(&m->t, id);
    compare(m);
}

static void m_retain(model *m, int32_t id) {
    ds_blocks_retain(m->b, id);
    m->t.ref[id]++;
    compare(m);
}

static int32_t m_lookup(model *m, uint64_t hash, uint64_t parent, const int32_t *tokens) {
    int32_t a = ds_blocks_lookup(m->b, hash, parent, tokens);
    int32_t w = twin_lookup(&m->t, hash, parent, tokens);
    if (a != w) DIVERGE("lookup(%llx) returned %d, twin %d", (unsigned long long)hash, a, w);
    compare(m);
    return a;
}

static int m_commit(model *m, int32_t id, uint64_t hash, uint64_t parent, const int32_t *tokens) {
    int a = ds_blocks_commit(m->b, id, hash, parent, tokens);
    int w = twin_commit(&m->t, id, hash, parent, tokens);
    if (a != w)
        DIVERGE("commit(%d, %llx) returned %d, twin %d", id, (unsigned long long)hash, a, w);
    compare(m);
    return a;
}

static seq *new_seq(model *m) {
    if (m->n_seqs == MAX_SEQS) return NULL;
    seq *s = &m->seqs[m->n_seqs++];
    s->n = 0;
    return s;
}

/* Releases a whole sequence, usually last block first (what the engine does), sometimes in a
 * random order, and drops it from the list. */
static void drop_seq(model *m, int k) {
    seq *s = &m->seqs[k];
    if (rng_int(4) == 0) {
        for (int i = s->n - 1; i > 0; i--) {
            int j = rng_int(i + 1);
            int32_t x = s->ids[i];
            s->ids[i] = s->ids[j];
            s->ids[j] = x;
        }
    }
    for (int i = s->n - 1; i >= 0 && !m->failed; i--) m_release(m, s->ids[i]);
    m->seqs[k] = m->seqs[--m->n_seqs];
}

/* A request arrives: look its full blocks up in order, stop at the first miss, allocate the
 * rest and commit them in order as their KV "is computed" (stopping after a collision, and
 * leaving the last block uncommitted now and then, as if it were still partial). */
static void admit(model *m) {
    seq *s = new_seq(m);
    if (!s) return;
    int d = rng_int(N_DOCS), len = 1 + rng_int(DOC_BLOCKS);
    if (rng_int(3) == 0) { /* a shared prefix, then a prompt of its own (fresh tokens) */
        int keep = rng_int(len + 1);
        for (int i = keep; i < DOC_BLOCKS; i++)
            for (int j = 0; j < m->t.bs; j++) m->docs[N_DOCS][i][j] = 3 + rng_int(1000);
        memcpy(m->docs[N_DOCS], m->docs[d], (size_t)keep * sizeof m->docs[d][0]);
        d = N_DOCS;
    }
    uint64_t parent = 0;
    int i = 0;
    for (; i < len && !m->failed; i++) {
        uint64_t h = model_hash(m, parent, m->docs[d][i]);
        int32_t id = m_lookup(m, h, parent, m->docs[d][i]);
        if (id < 0) break;
        s->ids[s->n++] = id;
        parent = h;
    }
    int committing = 1;
    for (; i < len && !m->failed; i++) {
        int32_t id = m_alloc(m);
        if (id < 0) break;
        s->ids[s->n++] = id;
        uint64_t h = model_hash(m, parent, m->docs[d][i]);
        if (committing && (i + 1 < len || rng_int(2)))
            committing = m_commit(m, id, h, parent, m->docs[d][i]) != DS_BLOCKS_COLLISION;
        parent = h;
    }
    if (s->n == 0) m->n_seqs--;
}

/* Crafted triples from a tiny space: hits, same-hash-other-tokens and same-hash-other-parent
 * all happen often. */
static void crafted(model *m, uint64_t *hash, uint64_t *parent, int32_t *tokens) {
    *hash = 1 + (uint64_t)rng_int(8);
    *parent = (uint64_t)rng_int(3);
    for (int32_t j = 0; j < m->t.bs; j++) tokens[j] = rng_int(2);
}

static void run_model(const char *name, int32_t n, int32_t bs, int pc, int weak_hash, long ops,
                      uint64_t seed) {
    static model mm;
    model *m = &mm;
    memset(m, 0, sizeof *m);
    m->name = name;
    m->weak_hash = weak_hash;
    rng_state = seed;
    CHECK(bs <= MAX_BS);
    int rc = ds_blocks_open(n, bs, pc, &m->b);
    CHECK_MSG(rc == 0, "%s: open: %s", name, ds_err_msg());
    if (rc) return;
    twin_init(&m->t, n, bs, pc);

    /* Documents: each shares a random number of leading blocks with the previous one; tokens
     * from a vocabulary of 3 so equal blocks under different parents are common too. */
    for (int d = 0; d < N_DOCS; d++) {
        int shared = d ? rng_int(5) : 0;
        for (int i = 0; i < DOC_BLOCKS; i++)
            for (int j = 0; j < bs; j++)
                m->docs[d][i][j] = i < shared ? m->docs[d - 1][i][j] : rng_int(3);
    }

    int32_t tokens[MAX_BS];
    uint64_t hash, parent;
    while (m->step < ops && !m->failed) {
        int op = rng_int(100);
        if (op < 25) {
            admit(m);
        } else if (op < 50) {
            if (m->n_seqs)
                drop_seq(m, rng_int(m->n_seqs));
            else
                compare(m);
        } else if (op < 60) {
            seq *s = new_seq(m);
            if (!s) continue;
            int32_t id = m_alloc(m);
            if (id >= 0)
                s->ids[s->n++] = id;
            else
                m->n_seqs--;
        } else if (op < 72) {
            crafted(m, &hash, &parent, tokens);
            if (rng_int(2) && m->n_seqs) { /* replay a cached block's own triple: a hit */
                seq *s = &m->seqs[rng_int(m->n_seqs)];
                int32_t id = s->ids[rng_int(s->n)];
                if (m->t.cached[id]) {
                    hash = m->t.hash[id];
                    parent = m->t.parent[id];
                    memcpy(tokens, m->t.tok + (size_t)id * (size_t)bs, (size_t)bs * sizeof *tokens);
                }
            }
            seq *s = new_seq(m);
            int32_t id = s ? m_lookup(m, hash, parent, tokens) : -1;
            if (id >= 0)
                s->ids[s->n++] = id;
            else if (s)
                m->n_seqs--;
        } else if (op < 88) {
            if (!m->n_seqs) continue;
            seq *s = &m->seqs[rng_int(m->n_seqs)];
            int32_t id = s->ids[rng_int(s->n)];
            crafted(m, &hash, &parent, tokens);
            if (m->t.cached[id])
                hash = m->t.hash[id]; /* another hash would be a broken invariant */
            m_commit(m, id, hash, parent, tokens);
        } else if (op < 94) {
            if (!m->n_seqs) continue;
            seq *s = &m->seqs[rng_int(m->n_seqs)];
            if (s->n < SEQ_CAP) {
                int32_t id = s->ids[rng_int(s->n)];
                m_retain(m, id);
                s->ids[s->n++] = id;
            }
        } else if (op < 99 || rng_int(8)) {
            /* nothing: just time passing */
        } else { /* now and then (1 in 800 steps), everything ends at once */
            while (m->n_seqs && !m->failed) drop_seq(m, m->n_seqs - 1);
            if (!m->failed) {
                ds_blocks_stats st;
                ds_blocks_get_stats(m->b, &st);
                if (st.n_free != n || st.n_used != 0)
                    DIVERGE("all released but %d free", st.n_free);
            }
        }
    }
    /* Shutdown: everything released leaves every block free and nothing referenced. */
    while (m->n_seqs && !m->failed) drop_seq(m, m->n_seqs - 1);
    ds_blocks_stats st;
    ds_blocks_get_stats(m->b, &st);
    CHECK_MSG(!m->failed, "%s: ds_blocks diverged from the twin (see above)", name);
    CHECK_MSG(m->failed || (st.n_free == n && st.n_used == 0), "%s: %d of %d free at the end", name,
              st.n_free, n);
    /* The run must have exercised what it claims to (a test that never evicts tests nothing). */
    if (pc && n > 1 && !m->failed) {
        CHECK_MSG(st.hits > 100 && st.evictions > 10 && st.lookups > st.hits,
                  "%s: too little exercised: %llu lookups, %llu hits, %llu evictions", name,
                  (unsigned long long)st.lookups, (unsigned long long)st.hits,
                  (unsigned long long)st.evictions);
        if (weak_hash)
            CHECK_MSG(st.collisions > 10, "%s: only %llu collisions", name,
                      (unsigned long long)st.collisions);
    }
    printf("%s: %ld steps, %llu lookups, %llu hits, %llu evictions, %llu collisions\n", name,
           m->step, (unsigned long long)st.lookups, (unsigned long long)st.hits,
           (unsigned long long)st.evictions, (unsigned long long)st.collisions);
    ds_blocks_close(m->b);
    twin_free(&m->t);
}

/* ---- directed tests ------------------------------------------------------------------------ */

static void fill(int32_t *tok, int32_t bs, int32_t base) {
    for (int32_t j = 0; j < bs; j++) tok[j] = base + j;
}

/* Released cached blocks are evicted in release order, after the free list is used up; a hit
 * on an evictable block pins it and its next release sends it to the back. */
static void test_lru_order(void) {
    ds_blocks *b;
    CHECK(ds_blocks_open(6, 4, 1, &b) == 0);
    int32_t tok[6][4];
    uint64_t h[6];
    for (int32_t i = 0; i < 6; i++) {
        CHECK(ds_blocks_alloc(b) == i); /* fresh blocks in id order */
        fill(tok[i], 4, 100 * i);
        h[i] = ds_blocks_hash(0, tok[i], 4);
    }
    CHECK(ds_blocks_alloc(b) == -1);
    for (int32_t i = 0; i < 4; i++)
        CHECK(ds_blocks_commit(b, i, h[i], 0, tok[i]) == DS_BLOCKS_CACHED);
    /* Release order 2, 0, 3, 1 (cached -> LRU), then 5, 4 (uncached -> free list). */
    int32_t order[] = {2, 0, 3, 1, 5, 4};
    for (int i = 0; i < 6; i++) ds_blocks_release(b, order[i]);
    CHECK(ds_blocks_num_free(b) == 6);
    ds_blocks_stats s;
    ds_blocks_get_stats(b, &s);
    CHECK(s.n_evictable == 4 && s.n_cached == 4 && s.n_used == 0);
    /* Free list first, in release order; nothing evicted yet. */
    CHECK(ds_blocks_alloc(b) == 5);
    CHECK(ds_blocks_alloc(b) == 4);
    ds_blocks_get_stats(b, &s);
    CHECK(s.evictions == 0);
    /* A hit on block 2 (the LRU's front) takes it off; its release puts it at the back. */
    CHECK(ds_blocks_lookup(b, h[2], 0, tok[2]) == 2);
    CHECK(ds_blocks_refcount(b, 2) == 1 && ds_blocks_num_free(b) == 3);
    ds_blocks_release(b, 2);
    /* Now the LRU is 0, 3, 1, 2. */
    CHECK(ds_blocks_alloc(b) == 0);
    CHECK(!ds_blocks_is_cached(b, 0));
    CHECK(ds_blocks_lookup(b, h[0], 0, tok[0]) == -1); /* evicted: its hash is gone */
    CHECK(ds_blocks_alloc(b) == 3);
    CHECK(ds_blocks_alloc(b) == 1);
    CHECK(ds_blocks_lookup(b, h[2], 0, tok[2]) == 2); /* the survivor still hits */
    CHECK(ds_blocks_alloc(b) == -1);
    ds_blocks_get_stats(b, &s);
    CHECK(s.evictions == 3 && s.n_cached == 1 && s.n_free == 0 && s.hits == 2 && s.lookups == 3);
    CHECK(ds_blocks__check(b) == 0);
    ds_blocks_close(b);
}

/* Same hash with other tokens or another parent never hits, and is counted. */
static void test_collision_safety(void) {
    ds_blocks *b;
    CHECK(ds_blocks_open(4, 3, 1, &b) == 0);
    int32_t tok[3] = {7, 8, 9}, other[3] = {7, 8, 10};
    uint64_t H = 42, P = 1234;
    int32_t id = ds_blocks_alloc(b);
    CHECK(ds_blocks_commit(b, id, H, P, tok) == DS_BLOCKS_CACHED);
    CHECK(ds_blocks_lookup(b, H, P, other) == -1);   /* last token differs */
    CHECK(ds_blocks_lookup(b, H, P + 1, tok) == -1); /* parent differs */
    CHECK(ds_blocks_lookup(b, H, 0, tok) == -1);     /* as a first block: no */
    CHECK(ds_blocks_lookup(b, H + 1, P, tok) == -1); /* plain miss */
    CHECK(ds_blocks_lookup(b, H, P, tok) == id);
    CHECK(ds_blocks_refcount(b, id) == 2);
    /* A colliding commit is refused and reported; the first block stays. */
    int32_t id2 = ds_blocks_alloc(b);
    CHECK(ds_blocks_commit(b, id2, H, P, other) == DS_BLOCKS_COLLISION);
    CHECK(ds_blocks_commit(b, id2, H, P + 1, tok) == DS_BLOCKS_COLLISION);
    CHECK(!ds_blocks_is_cached(b, id2) && ds_blocks_is_cached(b, id));
    ds_blocks_stats s;
    ds_blocks_get_stats(b, &s);
    CHECK(s.collisions == 5 && s.hits == 1 && s.lookups == 5 && s.n_cached == 1);
    ds_blocks_close(b);
}

/* The first commit stays canonical; an identical second copy stays private and goes back to
 * the free list on release; committing the canonical block again is a no-op. */
static void test_duplicate_commit(void) {
    ds_blocks *b;
    CHECK(ds_blocks_open(3, 2, 1, &b) == 0);
    int32_t tok[2] = {5, 6};
    uint64_t h = ds_blocks_hash(0, tok, 2);
    int32_t a = ds_blocks_alloc(b), c = ds_blocks_alloc(b);
    CHECK(ds_blocks_commit(b, a, h, 0, tok) == DS_BLOCKS_CACHED);
    CHECK(ds_blocks_commit(b, c, h, 0, tok) == DS_BLOCKS_UNCACHED);
    CHECK(ds_blocks_commit(b, a, h, 0, tok) == DS_BLOCKS_CACHED);
    CHECK(ds_blocks_is_cached(b, a) && !ds_blocks_is_cached(b, c));
    ds_blocks_release(b, c);
    ds_blocks_release(b, a);
    ds_blocks_stats s;
    ds_blocks_get_stats(b, &s);
    CHECK(s.n_free == 3 && s.n_evictable == 1 && s.n_cached == 1 && s.collisions == 0);
    /* The free list (2, then c) is used before a is evicted. */
    CHECK(ds_blocks_alloc(b) == 2);
    CHECK(ds_blocks_alloc(b) == c);
    CHECK(ds_blocks_lookup(b, h, 0, tok) == a);
    CHECK(ds_blocks__check(b) == 0);
    ds_blocks_close(b);
}

/* Prefix caching off: commits cache nothing, lookups miss (and count), releases free. */
static void test_caching_off(void) {
    ds_blocks *b;
    CHECK(ds_blocks_open(2, 4, 0, &b) == 0);
    int32_t tok[4] = {1, 2, 3, 4};
    uint64_t h = ds_blocks_hash(0, tok, 4);
    int32_t id = ds_blocks_alloc(b);
    CHECK(ds_blocks_commit(b, id, h, 0, tok) == DS_BLOCKS_UNCACHED);
    CHECK(!ds_blocks_is_cached(b, id));
    CHECK(ds_blocks_lookup(b, h, 0, tok) == -1);
    ds_blocks_release(b, id);
    ds_blocks_stats s;
    ds_blocks_get_stats(b, &s);
    CHECK(s.n_free == 2 && s.n_evictable == 0 && s.n_cached == 0 && s.lookups == 1 && s.hits == 0 &&
          s.evictions == 0);
    CHECK(ds_blocks_alloc(b) == 1 && ds_blocks_alloc(b) == id && ds_blocks_alloc(b) == -1);
    CHECK(ds_blocks__check(b) == 0);
    ds_blocks_close(b);
}

/* Every block referenced -> -1 until one is released; releasing everything frees everything,
 * and reference counts add up across retains and hits. */
static void test_exhaustion_and_release(void) {
    enum { N = 100 };
    ds_blocks *b;
    CHECK(ds_blocks_open(N, 16, 1, &b) == 0);
    int32_t ids[N];
    int distinct = 1;
    for (int i = 0; i < N; i++) {
        ids[i] = ds_blocks_alloc(b);
        if (ids[i] != i) distinct = 0;
    }
    CHECK(distinct);
    CHECK(ds_blocks_alloc(b) == -1 && ds_blocks_alloc(b) == -1);
    CHECK(ds_blocks_num_free(b) == 0);
    int32_t tok[16];
    for (int i = 0; i < N; i += 2) { /* half cached, half not */
        fill(tok, 16, i);
        CHECK(ds_blocks_commit(b, ids[i], ds_blocks_hash(0, tok, 16), 0, tok) == DS_BLOCKS_CACHED);
    }
    ds_blocks_retain(b, ids[7]);
    fill(tok, 16, 10);
    CHECK(ds_blocks_lookup(b, ds_blocks_hash(0, tok, 16), 0, tok) == 10);
    CHECK(ds_blocks_refcount(b, 7) == 2 && ds_blocks_refcount(b, 10) == 2);
    ds_blocks_release(b, 33);
    CHECK(ds_blocks_alloc(b) == 33);
    CHECK(ds_blocks_alloc(b) == -1);
    for (int i = N - 1; i >= 0; i--) ds_blocks_release(b, ids[i]);
    ds_blocks_release(b, 7);
    ds_blocks_release(b, 10);
    ds_blocks_stats s;
    ds_blocks_get_stats(b, &s);
    CHECK(s.n_free == N && s.n_used == 0 && s.n_cached == N / 2 && s.n_evictable == N / 2);
    int zero = 1;
    for (int i = 0; i < N; i++) zero &= ds_blocks_refcount(b, i) == 0;
    CHECK(zero);
    /* All N can be had again: 50 from the free list, then 50 evictions. */
    for (int i = 0; i < N; i++) CHECK(ds_blocks_alloc(b) >= 0);
    ds_blocks_get_stats(b, &s);
    CHECK(s.evictions == N / 2 && s.n_cached == 0 && ds_blocks_alloc(b) == -1);
    CHECK(ds_blocks__check(b) == 0);
    ds_blocks_close(b);
}

/* The chained hash: deterministic, sensitive to parent, every token, order and length, never
 * 0, and well mixed (one flipped input bit flips about half the output bits). */
static void test_hash(void) {
    int32_t t[8] = {1, 2, 3, 4, 5, 6, 7, 8}, u[8];
    uint64_t h = ds_blocks_hash(0, t, 8);
    CHECK(h == ds_blocks_hash(0, t, 8));
    CHECK(h != ds_blocks_hash(1, t, 8));
    CHECK(h != ds_blocks_hash(0, t, 7));
    int32_t z[2] = {5, 0};
    CHECK(ds_blocks_hash(0, z, 1) != ds_blocks_hash(0, z, 2)); /* trailing zero token */
    CHECK(ds_blocks_hash(0, NULL, 0) != 0 &&
          ds_blocks_hash(7, NULL, 0) != ds_blocks_hash(0, NULL, 0));
    int differ = 1;
    for (int i = 0; i < 8; i++) {
        memcpy(u, t, sizeof t);
        u[i] ^= 1;
        differ &= ds_blocks_hash(0, u, 8) != h;
        if (i < 7) {
            memcpy(u, t, sizeof t);
            u[i] = t[i + 1];
            u[i + 1] = t[i];
            differ &= ds_blocks_hash(0, u, 8) != h;
        }
    }
    CHECK(differ);
    /* Avalanche: mean flipped output bits over 4000 single-bit input flips. */
    rng_state = 99;
    double total = 0;
    int min_bits = 64;
    for (int k = 0; k < 4000; k++) {
        for (int i = 0; i < 8; i++) u[i] = rng_int(129280);
        uint64_t parent = rng_next(), a = ds_blocks_hash(parent, u, 8), c;
        int bit = rng_int(64 + 8 * 32);
        if (bit < 64) {
            c = ds_blocks_hash(parent ^ (1ULL << bit), u, 8);
        } else {
            bit -= 64;
            u[bit / 32] = (int32_t)((uint32_t)u[bit / 32] ^ (1u << (bit % 32)));
            c = ds_blocks_hash(parent, u, 8);
        }
        int flipped = __builtin_popcountll(a ^ c);
        total += flipped;
        if (flipped < min_bits) min_bits = flipped;
    }
    CHECK_MSG(total / 4000 > 31 && total / 4000 < 33, "mean flipped bits %.2f", total / 4000);
    CHECK_MSG(min_bits >= 12, "a single-bit flip changed only %d output bits", min_bits);
}

static void test_open_errors(void) {
    ds_blocks *b = (ds_blocks *)&b;
    CHECK(ds_blocks_open(0, 16, 1, &b) == DS_ERR_ARG && b == NULL);
    CHECK_ERR_CONTAINS("n_blocks");
    CHECK(ds_blocks_open(-3, 16, 1, &b) == DS_ERR_ARG);
    CHECK(ds_blocks_open(8, 0, 1, &b) == DS_ERR_ARG);
    CHECK_ERR_CONTAINS("block_size");
    CHECK(ds_blocks_open(INT32_MAX, 16, 0, &b) == DS_ERR_ARG);
    CHECK(ds_blocks_open(1, 1, 1, &b) == 0 && b != NULL);
    CHECK(ds_blocks_alloc(b) == 0 && ds_blocks_alloc(b) == -1);
    ds_blocks_close(b);
    ds_blocks_close(NULL);
}

/* Broken invariants abort (DS_ASSERT is always on): run each in a child. */
static int dies(void (*fn)(ds_blocks *)) {
    fflush(NULL);
    pid_t pid = fork();
    if (pid == 0) {
        if (!freopen("/dev/null", "w", stderr)) _exit(4);
        ds_blocks *b;
        if (ds_blocks_open(4, 2, 1, &b) != 0) _exit(3);
        fn(b);
        _exit(0);
    }
    int st;
    if (pid < 0 || waitpid(pid, &st, 0) != pid) return 0;
    return WIFSIGNALED(st) && WTERMSIG(st) == SIGABRT;
}
static void release_unreferenced(ds_blocks *b) {
    ds_blocks_release(b, 1);
}
static void release_twice(ds_blocks *b) {
    int32_t id = ds_blocks_alloc(b);
    ds_blocks_release(b, id);
    ds_blocks_release(b, id);
}
static void release_bad_id(ds_blocks *b) {
    ds_blocks_release(b, 4);
}
static void commit_unreferenced(ds_blocks *b) {
    int32_t tok[2] = {0, 0};
    ds_blocks_commit(b, 0, 1, 0, tok);
}
static void recommit_other_hash(ds_blocks *b) {
    int32_t tok[2] = {0, 0}, id = ds_blocks_alloc(b);
    ds_blocks_commit(b, id, 1, 0, tok);
    ds_blocks_commit(b, id, 2, 0, tok);
}
static void retain_unreferenced(ds_blocks *b) {
    ds_blocks_retain(b, 0);
}

static void test_asserts(void) {
    CHECK(dies(release_unreferenced));
    CHECK(dies(release_twice));
    CHECK(dies(release_bad_id));
    CHECK(dies(commit_unreferenced));
    CHECK(dies(recommit_other_hash));
    CHECK(dies(retain_unreferenced));
}

int main(void) {
    test_open_errors();
    test_hash();
    test_lru_order();
    test_collision_safety();
    test_duplicate_commit();
    test_caching_off();
    test_exhaustion_and_release();
    test_asserts();
    run_model("1 block", 1, 1, 1, 0, 5000, 1);
    run_model("8 blocks, weak hash", 8, 4, 1, 1, 30000, 2);
    run_model("64 blocks", 64, 4, 1, 0, 30000, 3);
    run_model("64 blocks, weak hash", 64, 2, 1, 1, 30000, 4);
    run_model("37 blocks, caching off", 37, 3, 0, 0, 20000, 5);
    run_model("200 blocks, block 16", 200, 16, 1, 0, 30000, 6);
    run_model("24 blocks, block 1, weak hash", 24, 1, 1, 1, 30000, 7);
    return ds_test_finish("test_blocks");
}
