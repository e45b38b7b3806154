/* A persistent thread pool for parallel-for.
 *
 * The forward pass issues hundreds of short parallel loops per decoded token (one per matmul and
 * attention phase), each often only tens of microseconds long. Two things make that hard:
 *  - waking sleeping threads through a condition variable costs about as much as the work on
 *    virtual machines, so idle workers first spin (~1 ms) on the ticket before they sleep;
 *  - when the machine is oversubscribed (ctest -j, a neighbour process), a worker may not be
 *    running at all. Slices are therefore not bound to threads: every participant, the caller
 *    included, claims slice indices from one atomic ticket until none are left, so a
 *    descheduled worker simply claims nothing and the caller never waits for it to wake up.
 * The ticket packs (generation << 32 | next slice); a claim is a compare-and-swap on it, so a
 * worker that arrives late for a finished loop claims nothing. A claimed slice keeps its
 * generation from completing, and fn/ctx and the slice count (which ds_pool_run_slices lets a
 * caller choose per loop) are only rewritten while a closed generation no one can claim from
 * holds the ticket, so reading them after a successful claim is race-free. */
#include "core/core.h"

#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <unistd.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#elif defined(__aarch64__)
#define cpu_relax() __asm__ __volatile__("yield")
#else
#define cpu_relax() ((void)0)
#endif

/* Spins before a worker sleeps: at ~10-40 ns per pause, on the order of a millisecond. */
#define SPIN_LIMIT 50000

struct ds_pool {
    int n;
    pthread_t *threads;
    pthread_mutex_t mu;
    pthread_cond_t wake;
    _Atomic uint64_t ticket; /* generation << 32 | next unclaimed slice */
    _Atomic int done;        /* slices finished in the current generation */
    _Atomic int quit;
    int sleepers;         /* workers blocked on `wake`, guarded by mu */
    _Atomic int n_slices; /* of the current generation */
    ds_pool_fn fn;
    void *ctx;
};

static uint32_t gen_of(uint64_t t) {
    return (uint32_t)(t >> 32);
}

/* Claims and runs slices of generation `gen` until none are left. */
static void run_slices(ds_pool *p, uint32_t gen) {
    uint64_t t = atomic_load_explicit(&p->ticket, memory_order_acquire);
    for (;;) {
        uint32_t i = (uint32_t)t;
        /* sequentially consistent with the caller's close and count (ds_pool_run_slices): a
         * count read here of a later run than t's means the claim below fails */
        int n = atomic_load(&p->n_slices);
        if (gen_of(t) != gen || i >= (uint32_t)n) return;
        if (!atomic_compare_exchange_weak(&p->ticket, &t, t + 1))
            continue; /* t now holds the current ticket */
        /* Slice i of `gen` is ours, so `gen` cannot finish before we do: fn/ctx are stable. */
        p->fn(p->ctx, (int)i, n);
        atomic_fetch_add_explicit(&p->done, 1, memory_order_release);
        t = atomic_load_explicit(&p->ticket, memory_order_acquire);
    }
}

/* Waits until the generation moves past `seen` or the pool quits; returns the new generation. */
static uint32_t wait_generation(ds_pool *p, uint32_t seen) {
    for (int i = 0; i < SPIN_LIMIT; i++) {
        uint32_t g = gen_of(atomic_load_explicit(&p->ticket, memory_order_acquire));
        if (g != seen || atomic_load_explicit(&p->quit, memory_order_relaxed)) return g;
        cpu_relax();
    }
    pthread_mutex_lock(&p->mu);
    p->sleepers++;
    while (gen_of(atomic_load(&p->ticket)) == seen && !atomic_load(&p->quit))
        pthread_cond_wait(&p->wake, &p->mu);
    p->sleepers--;
    pthread_mutex_unlock(&p->mu);
    return gen_of(atomic_load_explicit(&p->ticket, memory_order_acquire));
}

static void *worker_main(void *arg) {
    ds_pool *p = arg;
    uint32_t seen = 0;
    for (;;) {
        seen = wait_generation(p, seen);
        if (atomic_load(&p->quit)) return NULL;
        run_slices(p, seen);
    }
}

ds_pool *ds_pool_open(int n_threads) {
    if (n_threads <= 0) {
        long c = sysconf(_SC_NPROCESSORS_ONLN);
        n_threads = c > 0 ? (int)c : 1;
    }
    ds_pool *p = calloc(1, sizeof *p);
    if (!p) {
        ds_err_set(DS_ERR_NOMEM, "thread pool: out of memory");
        return NULL;
    }
    p->n = n_threads;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->wake, NULL);
    p->threads = calloc((size_t)n_threads, sizeof *p->threads);
    if (!p->threads) {
        p->n = 1;
        ds_pool_close(p);
        ds_err_set(DS_ERR_NOMEM, "thread pool: out of memory");
        return NULL;
    }
    for (int i = 1; i < n_threads; i++) {
        if (pthread_create(&p->threads[i], NULL, worker_main, p) != 0) {
            p->n = i; /* only the threads started so far are joined */
            ds_pool_close(p);
            ds_err_set(DS_ERR_NOMEM, "thread pool: cannot start thread %d of %d", i, n_threads);
            return NULL;
        }
    }
    return p;
}

void ds_pool_close(ds_pool *p) {
    if (!p) return;
    pthread_mutex_lock(&p->mu);
    atomic_store(&p->quit, 1);
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->mu);
    for (int i = 1; i < p->n; i++) pthread_join(p->threads[i], NULL);
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->wake);
    free(p->threads);
    free(p);
}

int ds_pool_size(const ds_pool *p) {
    return p ? p->n : 1;
}

void ds_pool_run(ds_pool *p, ds_pool_fn fn, void *ctx) {
    ds_pool_run_slices(p, fn, ctx, ds_pool_size(p));
}

void ds_pool_run_slices(ds_pool *p, ds_pool_fn fn, void *ctx, int n_slices) {
    DS_ASSERT(n_slices >= 1);
    if (!p || p->n == 1) {
        for (int i = 0; i < n_slices; i++) fn(ctx, i, n_slices);
        return;
    }
    /* The previous generation is complete (done == its slices), but a worker may still hold one
     * of its tickets, read a slice count, and try to claim. Its generation is closed first (a
     * generation whose next slice is past any count), so that claim fails whatever count it
     * read; only then do fn, ctx and the count change, and the next generation opens. Without
     * the close, a worker that read the new, larger count could claim slice "n" of the old
     * generation and run the new fn with it (test_pool alternates counts to catch that). */
    uint32_t gen = gen_of(atomic_load_explicit(&p->ticket, memory_order_relaxed)) + 1;
    atomic_store(&p->ticket, (uint64_t)gen << 32 | UINT32_MAX);
    p->fn = fn;
    p->ctx = ctx;
    atomic_store(&p->n_slices, n_slices);
    atomic_store_explicit(&p->done, 0, memory_order_relaxed);
    gen++;
    atomic_store_explicit(&p->ticket, (uint64_t)gen << 32, memory_order_release);
    pthread_mutex_lock(&p->mu);
    if (p->sleepers) pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->mu);

    run_slices(p, gen);

    for (long spins = 0; atomic_load_explicit(&p->done, memory_order_acquire) < n_slices; spins++) {
        if (spins < SPIN_LIMIT)
            cpu_relax();
        else
            sched_yield(); /* a worker was descheduled mid-slice: let it finish */
    }
}

void ds_split_range(size_t total, int i, int n, size_t *lo, size_t *hi) {
    size_t base = total / (size_t)n, rem = total % (size_t)n, ui = (size_t)i;
    *lo = ui * base + (ui < rem ? ui : rem);
    *hi = *lo + base + (ui < rem ? 1 : 0);
}

void ds_split_tapered(size_t total, int i, int n, double q, size_t *lo, size_t *hi) {
    const double all = 1 - pow(q, n); /* part j holds total q^j (1 - q) / all */
    *lo = (size_t)((double)total * (1 - pow(q, i)) / all);
    *hi = i + 1 == n ? total : (size_t)((double)total * (1 - pow(q, i + 1)) / all);
}
