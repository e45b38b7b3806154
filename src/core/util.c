/* Logging, clocks, aligned allocation and the dtype table. */
#include "core/core.h"

#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static ds_log_level log_level = DS_LOG_INFO;

void ds_log_set_level(ds_log_level lvl) {
    log_level = lvl;
}

void ds_log(ds_log_level lvl, const char *fmt, ...) {
    static const char *const tag[] = {"debug", "info", "warning", "error"};
    if (lvl < log_level) return;
    char line[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    /* One fprintf per line so lines from different threads do not interleave. */
    fprintf(stderr, "dsinfer: %s: %s\n", tag[lvl], line);
}

double ds_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

void *ds_map_aligned(size_t len, int fd) {
    const size_t huge = (size_t)2 << 20, pg = (size_t)sysconf(_SC_PAGESIZE);
    if (!len) len = 1;
    if (len > SIZE_MAX - 2 * huge) {
        errno = ENOMEM;
        return NULL;
    }
    const size_t end = (len + pg - 1) / pg * pg, span = end + huge;
    /* a reservation 2 MiB larger, trimmed around the aligned mapping */
    unsigned char *r = mmap(NULL, span, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (r == MAP_FAILED) return NULL;
    unsigned char *a = (unsigned char *)(((uintptr_t)r + huge - 1) & ~(uintptr_t)(huge - 1));
    const int anon = fd < 0;
    void *p = mmap(a, len, anon ? PROT_READ | PROT_WRITE : PROT_READ,
                   MAP_PRIVATE | MAP_FIXED | (anon ? MAP_ANONYMOUS : 0), anon ? -1 : fd, 0);
    if (p == MAP_FAILED) {
        int e = errno;
        munmap(r, span);
        errno = e;
        return NULL;
    }
    if (a > r) munmap(r, (size_t)(a - r));
    if (r + span > a + end) munmap(a + end, (size_t)(r + span - (a + end)));
#ifdef MADV_HUGEPAGE
    if (anon) madvise(p, len, MADV_HUGEPAGE);
#endif
    return p;
}

void *ds_alloc(size_t bytes) {
    void *p = NULL;
    size_t rounded = (bytes + 63) & ~(size_t)63;
    if (rounded < bytes) return NULL;
    if (posix_memalign(&p, 64, rounded ? rounded : 64) != 0) return NULL;
    memset(p, 0, rounded);
    return p;
}

void ds_free(void *p) {
    free(p);
}

/* The buffers live in static TLS (scanned by leak checkers as long as the thread runs); the key
 * only runs the destructor at the thread's exit. */
typedef struct {
    void *p[DS_SCRATCH_SLOTS];
    size_t n[DS_SCRATCH_SLOTS];
} scratch_set;

static _Thread_local scratch_set scratch;
static pthread_key_t scratch_key;
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;
static int scratch_key_ok;

static void scratch_release(void *arg) {
    scratch_set *s = arg;
    for (int i = 0; i < DS_SCRATCH_SLOTS; i++) {
        free(s->p[i]);
        s->p[i] = NULL;
        s->n[i] = 0;
    }
}

static void scratch_key_init(void) {
    scratch_key_ok = pthread_key_create(&scratch_key, scratch_release) == 0;
}

void *ds_thread_scratch(int slot, size_t bytes) {
    DS_ASSERT(slot >= 0 && slot < DS_SCRATCH_SLOTS);
    scratch_set *s = &scratch;
    if (bytes <= s->n[slot] && s->p[slot]) return s->p[slot];
    pthread_once(&scratch_once, scratch_key_init);
    if (!scratch_key_ok || pthread_setspecific(scratch_key, s) != 0) return NULL;
    free(s->p[slot]);
    s->p[slot] = NULL;
    s->n[slot] = 0;
    /* half again as much: a few growing calls (longer prompts) settle on one buffer */
    size_t want = bytes > SIZE_MAX / 2 ? bytes : bytes + bytes / 2;
    if (want > SIZE_MAX - 63) return NULL;
    want = want ? (want + 63) & ~(size_t)63 : 64;
    if (posix_memalign(&s->p[slot], 64, want) != 0) {
        s->p[slot] = NULL;
        return NULL;
    }
    s->n[slot] = want;
    return s->p[slot];
}

int ds_mul_ok(uint64_t a, uint64_t b, uint64_t *out) {
    if (a != 0 && b > UINT64_MAX / a) return 0;
    *out = a * b;
    return 1;
}

static const struct {
    const char *name;
    size_t size;
} dtype_info[DS_DTYPE_COUNT] = {
#define DS_DT_INFO(e, s, n) {s, n},
    DS_DTYPES(DS_DT_INFO)
#undef DS_DT_INFO
};

const char *ds_dtype_name(ds_dtype t) {
    return (unsigned)t < DS_DTYPE_COUNT ? dtype_info[t].name : "?";
}

size_t ds_dtype_size(ds_dtype t) {
    return (unsigned)t < DS_DTYPE_COUNT ? dtype_info[t].size : 0;
}

int ds_dtype_parse(const char *s) {
    for (int i = 0; i < DS_DTYPE_COUNT; i++)
        if (strcmp(s, dtype_info[i].name) == 0) return i;
    return -1;
}

uint64_t ds_mem_available(void) {
    FILE *f = fopen("/proc/meminfo", "r");
    if (!f) return 0;
    char line[256];
    unsigned long long kb = 0;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "MemAvailable: %llu kB", &kb) == 1) break;
    fclose(f);
    return (uint64_t)kb * 1024;
}

int ds_str_ends_with(const char *s, const char *suf) {
    size_t n = strlen(s), m = strlen(suf);
    return n >= m && memcmp(s + n - m, suf, m) == 0;
}
