/* What a checkpoint file truncated under a running process does to its mapping: a read past the
 * new end of file raises SIGBUS (BUS_ADRERR) in whatever thread touched the page, in the middle
 * of a matmul. With the guard installed, such a page inside a checkpoint mapping is replaced by a
 * page of zeros and the thread carries on; the caller finds out through ds_st_check_unchanged
 * (the file's size changed) after the step and fails the step's requests with a message naming
 * the file, instead of the process dying of a signal. A SIGBUS anywhere else keeps its default
 * action.
 *
 * The handler may only read plain memory: the mappings are kept in a fixed table of atomics,
 * written under a mutex by map / unmap. mmap is not on POSIX's list of async-signal-safe
 * functions, but on Linux it is a bare system call with no lock of the C library, which is what
 * the handler needs. */
#include "io/io.h"

#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <sys/mman.h>
#include <unistd.h>

#define GUARD_SLOTS 4096 /* a 671B checkpoint has 163 shards */

static struct { _Atomic uintptr_t start, end; } g_maps[GUARD_SLOTS];
static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
static uintptr_t g_page;

void ds_mapguard_add(const void *p, uint64_t len) {
    pthread_mutex_lock(&g_mu);
    for (int i = 0; i < GUARD_SLOTS; i++)
        if (!atomic_load(&g_maps[i].start)) {
            atomic_store(&g_maps[i].end, (uintptr_t)p + len);
            atomic_store(&g_maps[i].start, (uintptr_t)p);
            break;
        }
    pthread_mutex_unlock(&g_mu);
}

void ds_mapguard_remove(const void *p) {
    pthread_mutex_lock(&g_mu);
    for (int i = 0; i < GUARD_SLOTS; i++)
        if (atomic_load(&g_maps[i].start) == (uintptr_t)p) atomic_store(&g_maps[i].start, 0);
    pthread_mutex_unlock(&g_mu);
}

static void on_sigbus(int sig, siginfo_t *si, void *uctx) {
    (void)uctx;
    const uintptr_t a = (uintptr_t)si->si_addr;
    if (si->si_code == BUS_ADRERR && g_page)
        for (int i = 0; i < GUARD_SLOTS; i++) {
            const uintptr_t s = atomic_load(&g_maps[i].start), e = atomic_load(&g_maps[i].end);
            if (!s || a < s || a >= e) continue;
            void *pg = (void *)(a & ~(g_page - 1));
            if (mmap(pg, g_page, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) !=
                MAP_FAILED)
                return; /* the read is retried, and now gives zeros */
            break;
        }
    signal(sig, SIG_DFL); /* not ours: die of it as if there were no handler */
    raise(sig);
}

int ds_mapguard_install(void) {
    g_page = (uintptr_t)sysconf(_SC_PAGESIZE);
    struct sigaction sa = {0};
    sa.sa_sigaction = on_sigbus;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGBUS, &sa, NULL))
        return ds_err_set(DS_ERR_IO, "cannot install the SIGBUS handler");
    return DS_OK;
}
