/* Thread pool: every slice of every parallel loop runs exactly once, across many back-to-back
 * loops (the decode pattern) and with more threads than cores (the oversubscribed pattern that
 * made slices wait on descheduled workers), and the pool shuts down cleanly from any state.
 * Per-thread scratch: reused while large enough, one buffer per slot and per thread. */
#include "core/core.h"
#include "testutil.h"

#include <math.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    _Atomic int *hits; /* per slice */
    _Atomic long sum;
    int expected_n;
    _Atomic int bad_n;
} loop_ctx;

static void body(void *arg, int i, int n) {
    loop_ctx *c = arg;
    if (n != c->expected_n) atomic_fetch_add(&c->bad_n, 1);
    atomic_fetch_add(&c->hits[i], 1);
    atomic_fetch_add(&c->sum, i + 1);
}

/* Loops alternate their slice count (ds_pool_run's one per thread, ds_pool_run_slices' 1 and
 * 4n + 3), so a late worker meets a loop of another shape than the one it last saw. */
static void run_many(int threads, int loops) {
    ds_pool *p = ds_pool_open(threads);
    CHECK(p != NULL);
    if (!p) return;
    int n = ds_pool_size(p);
    CHECK(n == threads);
    const int max_slices = 4 * n + 3;
    _Atomic int *hits = calloc((size_t)max_slices, sizeof *hits);
    int wrong = 0;
    for (int l = 0; l < loops; l++) {
        int slices = l % 3 == 0 ? n : l % 3 == 1 ? 1 : max_slices;
        loop_ctx c = {hits, 0, slices, 0};
        for (int i = 0; i < max_slices; i++) atomic_store(&hits[i], 0);
        if (l % 3 == 0)
            ds_pool_run(p, body, &c);
        else
            ds_pool_run_slices(p, body, &c, slices);
        long want = (long)slices * (slices + 1) / 2;
        for (int i = 0; i < max_slices; i++) wrong += atomic_load(&hits[i]) != (i < slices);
        wrong += atomic_load(&c.sum) != want || atomic_load(&c.bad_n) != 0;
    }
    CHECK_MSG(wrong == 0, "%d threads: %d loops ran a slice other than exactly once", threads,
              wrong);
    free(hits);
    ds_pool_close(p);
}

static void test_split(void) {
    size_t lo, hi, covered = 0, prev = 0;
    for (int i = 0; i < 7; i++) {
        ds_split_range(100, i, 7, &lo, &hi);
        CHECK(lo == prev && hi >= lo && hi - lo >= 14 && hi - lo <= 15);
        covered += hi - lo;
        prev = hi;
    }
    CHECK(covered == 100 && prev == 100);
    ds_split_range(3, 4, 5, &lo, &hi);
    CHECK(lo == 3 && hi == 3);
}

/* Tapered parts: contiguous from 0 to total, each q times the one before (to rounding), the
 * first total (1 - q) / (1 - q^n); more parts than units leave some empty, none lost. */
static void test_split_tapered(void) {
    const struct {
        size_t total;
        int n;
        double q;
    } cases[] = {{100, 7, 0.85}, {32320, 12, 0.85}, {1000000, 40, 0.9}, {5, 8, 0.85}, {0, 3, 0.5}};
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        const size_t total = cases[k].total;
        const int n = cases[k].n;
        const double q = cases[k].q;
        size_t lo, hi, prev = 0, prev_len = 0;
        int bad = 0;
        for (int i = 0; i < n; i++) {
            ds_split_tapered(total, i, n, q, &lo, &hi);
            const double want = (double)total * pow(q, i) * (1 - q) / (1 - pow(q, n));
            bad += lo != prev || hi < lo || fabs((double)(hi - lo) - want) > 1;
            bad += i > 0 && hi - lo > prev_len + 1; /* never grows */
            prev = hi;
            prev_len = hi - lo;
        }
        CHECK_MSG(bad == 0 && prev == total, "ds_split_tapered(%zu, n %d, q %g): %d parts wrong",
                  total, n, q, bad);
    }
}

/* Each slice fills its thread's scratch with its own index and reads it back after the others
 * had time to write theirs: two threads sharing a buffer would see another's index. */
static void scratch_body(void *arg, int i, int n) {
    (void)n;
    _Atomic int *bad = arg;
    const size_t len = 4096 + 64 * (size_t)i; /* growing requests replace the buffer */
    unsigned char *b = ds_thread_scratch(DS_SCRATCH_TASK, len);
    if (!b || (uintptr_t)b % 64) {
        atomic_fetch_add(bad, 1);
        return;
    }
    memset(b, i & 0xff, len);
    for (volatile int spin = 0; spin < 20000; spin++) {
    }
    for (size_t k = 0; k < len; k++)
        if (b[k] != (i & 0xff)) {
            atomic_fetch_add(bad, 1);
            return;
        }
}

static void test_scratch(void) {
    unsigned char *a = ds_thread_scratch(DS_SCRATCH_CALL, 100);
    CHECK(a != NULL && (uintptr_t)a % 64 == 0);
    if (!a) return;
    memset(a, 7, 100);
    CHECK(ds_thread_scratch(DS_SCRATCH_CALL, 50) == a); /* large enough: the same memory */
    CHECK(ds_thread_scratch(DS_SCRATCH_CALL, 0) == a);
    unsigned char *t = ds_thread_scratch(DS_SCRATCH_TASK, 100);
    CHECK(t != NULL && t != a && a[99] == 7); /* another slot leaves the first alone */
    unsigned char *big = ds_thread_scratch(DS_SCRATCH_CALL, (size_t)1 << 22);
    CHECK(big != NULL && (uintptr_t)big % 64 == 0);
    if (big) memset(big, 1, (size_t)1 << 22); /* all of it usable (ASan checks the bounds) */
    CHECK(ds_thread_scratch(DS_SCRATCH_CALL, SIZE_MAX) == NULL);
    ds_pool *p = ds_pool_open(4);
    CHECK(p != NULL);
    if (!p) return;
    _Atomic int bad = 0;
    for (int l = 0; l < 50; l++) ds_pool_run_slices(p, scratch_body, (void *)&bad, 16);
    CHECK_MSG(atomic_load(&bad) == 0, "%d slices saw a buffer another thread wrote",
              atomic_load(&bad));
    ds_pool_close(p); /* the workers' buffers go with them (LSan: no leak) */
}

int main(void) {
    test_split();
    test_split_tapered();
    test_scratch();
    run_many(1, 100);
    run_many(2, 20000);
    run_many(8, 3000); /* more threads than this machine's cores */
    /* Close right after open, and after the workers have gone to sleep. */
    ds_pool_close(ds_pool_open(4));
    ds_pool_close(NULL);
    return ds_test_finish("test_pool");
}
