/* Minimal test harness: CHECK macros that count failures, fixtures lookup and skip rules.
 * A test binary returns 0 when every check passed, 1 on any failure, 77 when skipped. */
#ifndef DS_TESTUTIL_H
#define DS_TESTUTIL_H

#include <math.h>
#include <stdio.h>
#include <string.h>

extern int ds_test_failures;
extern int ds_test_checks;

#define CHECK(cond)                                                                                \
    do {                                                                                           \
        ds_test_checks++;                                                                          \
        if (!(cond)) {                                                                             \
            ds_test_failures++;                                                                    \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond);               \
        }                                                                                          \
    } while (0)

#define CHECK_MSG(cond, ...)                                                                       \
    do {                                                                                           \
        ds_test_checks++;                                                                          \
        if (!(cond)) {                                                                             \
            ds_test_failures++;                                                                    \
            fprintf(stderr, "%s:%d: CHECK failed: %s: ", __FILE__, __LINE__, #cond);               \
            fprintf(stderr, __VA_ARGS__);                                                          \
            fputc('\n', stderr);                                                                   \
        }                                                                                          \
    } while (0)

#define CHECK_NEAR(a, b, tol)                                                                      \
    CHECK_MSG(fabs((double)(a) - (double)(b)) <= (tol), "%.9g vs %.9g (tol %g)", (double)(a),      \
              (double)(b), (double)(tol))

/* Asserts that the last ds_err message contains `needle`. */
#define CHECK_ERR_CONTAINS(needle)                                                                 \
    CHECK_MSG(strstr(ds_err_msg(), (needle)) != NULL, "message '%s' lacks '%s'", ds_err_msg(),     \
              (needle))

/* Prints "N checks, M failed" and returns the exit status. */
int ds_test_finish(const char *name);

/* The fixtures directory: $DSINFER_FIXTURES, else the build-time default. NULL (after a loud
 * message) when it does not exist; ds_test_skip_or_fail() then gives 77, or 1 when CI=true. */
const char *ds_test_fixtures(void);
int ds_test_skip_or_fail(const char *why);

/* Runs a shell command; returns its stdout (malloc'd, NUL-terminated; NULL when it could not be
 * started) and, when status is not NULL, its exit status (-1 when it did not exit normally). */
char *ds_test_run(const char *cmd, int *status);

/* A whole file (malloc'd, one NUL byte appended) and its length in *n (n may be NULL); NULL when
 * unreadable. */
char *ds_test_read_file(const char *path, size_t *n);

/* A fresh empty temporary directory (mkdtemp under $TMPDIR); removed by ds_test_rmtree. */
char *ds_test_tmpdir(void);
void ds_test_rmtree(const char *dir);

#endif
