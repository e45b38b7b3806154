/* core: error codes, logging, dtypes, a persistent thread pool and a terminal progress bar.
 *
 * Nothing here knows about models or files; every other module builds on it. */
#ifndef DS_CORE_H
#define DS_CORE_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#if defined(__GNUC__)
#define DS_PRINTF(f, a) __attribute__((format(printf, f, a)))
#define DS_NORETURN __attribute__((noreturn))
#else
#define DS_PRINTF(f, a)
#define DS_NORETURN
#endif

/* ---- errors -------------------------------------------------------------------------------
 * Fallible functions return a ds_err (0 or a negative code). The human-readable message that
 * names the file / tensor / field lives in a thread-local buffer set by ds_err_set(), in the
 * same way dlerror() works: read it with ds_err_msg() right after the failing call. */
#define DS_ERRORS(X)                                                                               \
    X(DS_OK, 0, "success")                                                                         \
    X(DS_ERR_NOMEM, -1, "out of memory")                                                           \
    X(DS_ERR_IO, -2, "I/O error")                                                                  \
    X(DS_ERR_FORMAT, -3, "malformed input")                                                        \
    X(DS_ERR_UNSUPPORTED, -4, "unsupported")                                                       \
    X(DS_ERR_MISSING, -5, "missing")                                                               \
    X(DS_ERR_SHAPE, -6, "shape mismatch")                                                          \
    X(DS_ERR_ARG, -7, "invalid argument")                                                          \
    X(DS_ERR_RANGE, -8, "out of range")                                                            \
    X(DS_ERR_TIMEOUT, -9, "timed out")                                                             \
    X(DS_ERR_CLOSED, -10, "shut down")

typedef enum {
#define DS_ERR_ENUM(name, val, str) name = val,
    DS_ERRORS(DS_ERR_ENUM)
#undef DS_ERR_ENUM
} ds_err;

/* Static description of a code ("malformed input"); never NULL. */
const char *ds_strerror(int err);
/* Formats the message for the current thread and returns err, so `return ds_err_set(...)`. */
int ds_err_set(int err, const char *fmt, ...) DS_PRINTF(2, 3);
/* Prepends "prefix: " to the current message (adds context while unwinding); returns err. */
int ds_err_wrap(int err, const char *fmt, ...) DS_PRINTF(2, 3);
/* Last message set on this thread ("" when none); valid until the next ds_err_set on it. */
const char *ds_err_msg(void);

/* Always-on check for broken invariants (not for bad input: that gets a ds_err). */
#define DS_ASSERT(c) ((c) ? (void)0 : ds_assert_fail(#c, __FILE__, __LINE__))
DS_NORETURN void ds_assert_fail(const char *expr, const char *file, int line);

/* ---- logging (stderr only: stdout belongs to the command's result) --------------------------- */
typedef enum { DS_LOG_DEBUG, DS_LOG_INFO, DS_LOG_WARN, DS_LOG_ERROR } ds_log_level;
void ds_log_set_level(ds_log_level lvl);
void ds_log(ds_log_level lvl, const char *fmt, ...) DS_PRINTF(2, 3);
#define ds_info(...) ds_log(DS_LOG_INFO, __VA_ARGS__)
#define ds_warn(...) ds_log(DS_LOG_WARN, __VA_ARGS__)
#define ds_debug(...) ds_log(DS_LOG_DEBUG, __VA_ARGS__)

/* Monotonic seconds. */
double ds_now(void);
/* MemAvailable of /proc/meminfo in bytes; 0 when unknown. */
uint64_t ds_mem_available(void);

/* Allocation that is 64-byte aligned (SIMD rows) and zeroed; NULL on failure. Free with ds_free. */
void *ds_alloc(size_t bytes);
void ds_free(void *p);
/* Scratch memory of the calling thread kept from call to call, for the temporaries of hot
 * paths: at least `bytes`, 64-byte aligned, not zeroed, the same memory again for the next call
 * of the slot once it is large enough (a larger request replaces it; the contents are lost), freed
 * when the thread exits; NULL when out of memory. With malloc and free per call, a matmul's speed
 * hung on the allocator's heuristics: in a process that had not yet freed a large block, glibc
 * gave the freed top of its heap back after nearly every call, and the next call faulted it in
 * again (BF16 experts at 8 tokens each, 2 threads: 56 -> 113 GMAC/s without that). DS_SCRATCH_CALL
 * serves a call's own buffers, DS_SCRATCH_TASK the pool slices the same thread runs meanwhile. */
enum { DS_SCRATCH_CALL, DS_SCRATCH_TASK, DS_SCRATCH_SLOTS };
void *ds_thread_scratch(int slot, size_t bytes);
/* A private mapping of len bytes at a 2 MiB-aligned address, the only place the kernel maps a
 * 2 MiB page: of file fd, read-only, or with fd < 0 zeroed anonymous memory, read-write and
 * advised MADV_HUGEPAGE (advice only: refused, the memory works the same on 4 KiB pages).
 * NULL on failure (errno set); release with munmap(p, len). */
void *ds_map_aligned(size_t len, int fd);
/* a * b into *out; 0 on overflow. Used wherever sizes come from untrusted bytes. */
int ds_mul_ok(uint64_t a, uint64_t b, uint64_t *out);
/* 1 when s ends with suf. */
int ds_str_ends_with(const char *s, const char *suf);

/* ---- dtypes (the safetensors set) ----------------------------------------------------------- */
#define DS_DTYPES(X)                                                                               \
    X(DS_F64, "F64", 8)                                                                            \
    X(DS_F32, "F32", 4)                                                                            \
    X(DS_F16, "F16", 2)                                                                            \
    X(DS_BF16, "BF16", 2)                                                                          \
    X(DS_F8_E4M3, "F8_E4M3", 1)                                                                    \
    X(DS_F8_E5M2, "F8_E5M2", 1)                                                                    \
    X(DS_I64, "I64", 8)                                                                            \
    X(DS_I32, "I32", 4)                                                                            \
    X(DS_I16, "I16", 2)                                                                            \
    X(DS_I8, "I8", 1)                                                                              \
    X(DS_U64, "U64", 8)                                                                            \
    X(DS_U32, "U32", 4)                                                                            \
    X(DS_U16, "U16", 2)                                                                            \
    X(DS_U8, "U8", 1)                                                                              \
    X(DS_BOOL, "BOOL", 1)

typedef enum {
#define DS_DT_ENUM(e, s, n) e,
    DS_DTYPES(DS_DT_ENUM)
#undef DS_DT_ENUM
        DS_DTYPE_COUNT
} ds_dtype;

const char *ds_dtype_name(ds_dtype t);
size_t ds_dtype_size(ds_dtype t);
/* Parses a safetensors dtype string ("BF16"); returns -1 when unknown. */
int ds_dtype_parse(const char *s);

/* ---- thread pool ----------------------------------------------------------------------------
 * A fixed set of workers that run one parallel-for at a time; the caller takes part, so a pool
 * of 1 runs everything inline. Slices are claimed dynamically: fn(ctx, i, n) runs exactly once
 * for each i in [0, n) (n = pool size), on whichever thread claims it, so state indexed by i is
 * private to one call, but i is not a thread identity. Not reentrant: a task must not call
 * ds_pool_run on the same pool. ds_pool_run is not thread-safe: one caller at a time. */
typedef struct ds_pool ds_pool;
typedef void (*ds_pool_fn)(void *ctx, int thread, int n_threads);

/* n_threads <= 0 means the number of online CPUs. NULL on failure (message set). */
ds_pool *ds_pool_open(int n_threads);
void ds_pool_close(ds_pool *p); /* accepts NULL */
int ds_pool_size(const ds_pool *p);
/* Runs fn(ctx, i, n) for every i in [0, n) and returns when all have finished. */
void ds_pool_run(ds_pool *p, ds_pool_fn fn, void *ctx);
/* The same with n = n_slices (>= 1): more slices than threads let a thread that finishes early
 * (or runs while another is descheduled) take the rest, at the cost of one claim per slice. */
void ds_pool_run_slices(ds_pool *p, ds_pool_fn fn, void *ctx, int n_slices);
/* Splits [0, total) into n near-equal contiguous parts; part i is [*lo, *hi). */
void ds_split_range(size_t total, int i, int n, size_t *lo, size_t *hi);
/* Splits [0, total) into n contiguous parts that shrink geometrically, each about q (0 < q < 1)
 * times the one before: slices claimed in order end a loop on small ones. */
void ds_split_tapered(size_t total, int i, int n, double q, size_t *lo, size_t *hi);

/* ---- progress bar (stderr, only when stderr is a terminal) ---------------------------------- */
typedef struct {
    const char *label;
    uint64_t total, done;
    double t0, last_draw;
    int active; /* 0 when stderr is not a tty: every call is then a no-op */
} ds_progress;
void ds_progress_begin(ds_progress *pb, const char *label, uint64_t total);
void ds_progress_add(ds_progress *pb, uint64_t n);
void ds_progress_end(ds_progress *pb);

#endif
