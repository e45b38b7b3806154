#include "testutil.h"

#include <stdlib.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

int ds_test_failures;
int ds_test_checks;

int ds_test_finish(const char *name) {
    printf("%s: %d checks, %d failed\n", name, ds_test_checks, ds_test_failures);
    return ds_test_failures ? 1 : 0;
}

const char *ds_test_fixtures(void) {
    const char *d = getenv("DSINFER_FIXTURES");
    if (!d || !*d) d = DSINFER_FIXTURES_DEFAULT;
    struct stat st;
    if (stat(d, &st) != 0 || !S_ISDIR(st.st_mode)) {
        fprintf(stderr, "\n*** golden fixtures not found at '%s' (set DSINFER_FIXTURES) ***\n\n",
                d);
        return NULL;
    }
    return d;
}

int ds_test_skip_or_fail(const char *why) {
    const char *ci = getenv("CI");
    if (ci && strcmp(ci, "true") == 0) {
        fprintf(stderr, "FAIL: %s (CI=true: missing fixtures are a failure)\n", why);
        return 1;
    }
    fprintf(stderr, "SKIPPED: %s\n", why);
    return 77;
}

char *ds_test_read_file(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *b = len >= 0 ? malloc((size_t)len + 1) : NULL;
    if (b && fread(b, 1, (size_t)len, f) != (size_t)len) {
        free(b);
        b = NULL;
    }
    fclose(f);
    if (b) b[len] = 0;
    if (b && n) *n = (size_t)len;
    return b;
}

char *ds_test_tmpdir(void) {
    const char *base = getenv("TMPDIR");
    if (!base || !*base) base = "/tmp";
    size_t n = strlen(base) + 32;
    char *p = malloc(n);
    if (!p) return NULL;
    snprintf(p, n, "%s/dsinfer-test-XXXXXX", base);
    if (!mkdtemp(p)) {
        free(p);
        return NULL;
    }
    return p;
}

void ds_test_rmtree(const char *dir) {
    if (!dir) return;
    char cmd[4096];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    if (system(cmd) != 0) fprintf(stderr, "warning: could not remove %s\n", dir);
}

char *ds_test_run(const char *cmd, int *status) {
    FILE *p = popen(cmd, "r");
    if (!p) return NULL;
    size_t cap = 1 << 16, n = 0, got;
    char *out = malloc(cap);
    while (out && (got = fread(out + n, 1, cap - n - 1, p)) > 0) {
        n += got;
        if (n + 1 == cap) {
            char *bigger = realloc(out, cap *= 2);
            if (!bigger) break;
            out = bigger;
        }
    }
    int st = pclose(p);
    if (status) *status = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
    if (out) out[n] = 0;
    return out;
}
