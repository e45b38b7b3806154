/* A persistent thread pool for parallel-for.
 *
 * The forward pass issues hundreds of short parallel loops per decoded token (one per matmul and
 * attention phase), each often only tens of microseconds long. Waking sleeping threads through
 * a condition variable costs about as much as the work itself on virtual machines, so workers
 * first spin on an atomic generation counter for a while (~1 ms) and only then sleep; the
 * caller spins on the pending count while the loop runs. An idle engine therefore burns no CPU
 * beyond that first millisecond, and a busy one never pays for a wake-up. The caller's thread
 * runs slice 0 itself. */
#include "core/core.h"

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
    _Atomic uint64_t generation; /* bumped once per ds_pool_run */
    _Atomic int pending;         /* workers still running the current generation */
    _Atomic int quit;
    int sleepers; /* workers blocked on `wake`, guarded by mu */
    ds_pool_fn fn;
    void *ctx;
};

typedef struct {
    ds_pool *p;
    int index;
} worker_arg;

/* Waits until the generation moves past `seen` or the pool quits; returns the new generation. */
static uint64_t wait_generation(ds_pool *p, uint64_t seen) {
    for (int i = 0; i < SPIN_LIMIT; i++) {
        uint64_t g = atomic_load_explicit(&p->generation, memory_order_acquire);
        if (g != seen || atomic_load_explicit(&p->quit, memory_order_relaxed)) return g;
        cpu_relax();
    }
    pthread_mutex_lock(&p->mu);
    p->sleepers++;
    while (atomic_load(&p->generation) == seen && !atomic_load(&p->quit))
        pthread_cond_wait(&p->wake, &p->mu);
    p->sleepers--;
    pthread_mutex_unlock(&p->mu);
    return atomic_load_explicit(&p->generation, memory_order_acquire);
}

static void *worker_main(void *arg) {
    worker_arg *wa = arg;
    ds_pool *p = wa->p;
    int index = wa->index;
    free(wa);
    uint64_t seen = 0;
    for (;;) {
        seen = wait_generation(p, seen);
        if (atomic_load(&p->quit)) return NULL;
        p->fn(p->ctx, index, p->n); /* fn/ctx were published before the generation bump */
        atomic_fetch_sub_explicit(&p->pending, 1, memory_order_release);
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
        worker_arg *wa = malloc(sizeof *wa);
        if (wa) *wa = (worker_arg){p, i};
        if (!wa || pthread_create(&p->threads[i], NULL, worker_main, wa) != 0) {
            free(wa);
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

int ds_pool_size(const ds_pool *p) { return p ? p->n : 1; }

void ds_pool_run(ds_pool *p, ds_pool_fn fn, void *ctx) {
    if (!p || p->n == 1) {
        fn(ctx, 0, 1);
        return;
    }
    p->fn = fn;
    p->ctx = ctx;
    atomic_store_explicit(&p->pending, p->n - 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&p->generation, 1, memory_order_release);
    pthread_mutex_lock(&p->mu);
    if (p->sleepers) pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->mu);

    fn(ctx, 0, p->n);

    for (long spins = 0; atomic_load_explicit(&p->pending, memory_order_acquire) > 0; spins++) {
        if (spins < SPIN_LIMIT) cpu_relax();
        else sched_yield(); /* a descheduled worker (oversubscribed machine): let it run */
    }
}

void ds_split_range(size_t total, int i, int n, size_t *lo, size_t *hi) {
    size_t base = total / (size_t)n, rem = total % (size_t)n, ui = (size_t)i;
    *lo = ui * base + (ui < rem ? ui : rem);
    *hi = *lo + base + (ui < rem ? 1 : 0);
}
