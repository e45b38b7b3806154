/* A weight file changed under a running `dsinfer serve` (a copy of the tiny-a fixture) is never
 * used silently:
 *   - replaced by rename (how a careful update is made): the server keeps the file it mapped,
 *     greedy answers stay exactly what they were;
 *   - written to in place while a stream runs: the stream ends with an error event naming the
 *     file, the server logs it and exits with status 1;
 *   - truncated in place while a stream runs (reads past the new end raise SIGBUS): the same,
 *     and the server is not killed by the signal. */
#include "serverutil.h"

static char g_fixture[4096];

static const char *const FILES[] = {"config.json", "model.safetensors", "tokenizer.json",
                                    "tokenizer_config.json"};

/* dir holds a fresh copy of the fixture's files */
static void copy_fixture(const char *dir) {
    for (size_t i = 0; i < sizeof FILES / sizeof *FILES; i++) {
        char cmd[9000];
        snprintf(cmd, sizeof cmd, "cp '%s/%s' '%s/%s.new' && mv '%s/%s.new' '%s/%s'", g_fixture,
                 FILES[i], dir, FILES[i], dir, FILES[i], dir, FILES[i]);
        int st;
        free(ds_test_run(cmd, &st));
        CHECK_MSG(st == 0, "%s", cmd);
    }
}

static const char *GREEDY =
    "{\"prompt\": \"Mindspore is\", \"max_tokens\": 24, \"temperature\": 0}";

/* The greedy answer's text (malloc'd), NULL on any failure. */
static char *greedy_text(int port) {
    srv_resp r = srv_post(port, "/v1/completions", GREEDY);
    const char *t = r.status == 200 && r.body ? strstr(r.body, "\"text\":") : NULL;
    char *out = t ? strndup(t, strcspn(t, ",}")) : NULL;
    if (!out) fprintf(stderr, "greedy request: %d %.300s\n", r.status, r.body ? r.body : "");
    srv_resp_free(&r);
    return out;
}

/* A long stream on a fresh connection, read until its first bytes; the socket. */
static int stream_started(int port) {
    int fd = srv_send_completion(port, "{\"prompt\": \"x\", \"max_tokens\": 240, \"n\": 4, "
                                       "\"ignore_eos\": true, \"stream\": true}");
    CHECK(fd >= 0);
    char first[256];
    CHECK(fd >= 0 && recv(fd, first, sizeof first, 0) > 0);
    return fd;
}

static void test_replaced(const char *dir) {
    copy_fixture(dir);
    srv_proc s;
    CHECK(srv_start(&s, dir, NULL) == 0);
    char *before = greedy_text(s.port);
    /* another checkpoint (the bytes of the first tensor's data zeroed), renamed into place */
    char path[4200], tmp[4300];
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    snprintf(tmp, sizeof tmp, "%s.new", path);
    size_t n;
    char *bytes = ds_test_read_file(path, &n);
    CHECK(bytes && n > 4096);
    if (bytes && n > 4096) {
        memset(bytes + n - 4096, 0, 4096);
        FILE *f = fopen(tmp, "wb");
        CHECK(f && fwrite(bytes, 1, n, f) == n);
        if (f) fclose(f);
        CHECK(rename(tmp, path) == 0);
    }
    free(bytes);
    char *after = greedy_text(s.port);
    CHECK_MSG(before && after && strcmp(before, after) == 0,
              "after a rename the answer changed: %s / %s", before ? before : "-",
              after ? after : "-");
    free(before);
    free(after);
    srv_resp r = srv_get(s.port, "/health");
    CHECK(r.status == 200);
    srv_resp_free(&r);
    CHECK(srv_stop(&s) == 0);
    unlink(s.log);
}

/* change(path) alters the file in place while a stream runs */
static void test_changed(const char *dir, const char *what, void (*change)(const char *)) {
    copy_fixture(dir);
    srv_proc s;
    CHECK(srv_start(&s, dir, NULL) == 0);
    int fd = stream_started(s.port);
    char path[4200];
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    change(path);
    size_t n;
    char *rest = srv_read_all(fd, &n);
    close(fd);
    CHECK_MSG(rest && strstr(rest, "data: {\"error\"") &&
                  strstr(rest, "model.safetensors changed on disk") && strstr(rest, "data: [DONE]"),
              "%s: the stream's end: %.300s", what, rest ? rest : "");
    free(rest);
    int code = srv_stop_sig(&s, 0, 30); /* it exits by itself */
    CHECK_MSG(code == 1, "%s: exit status %d, want 1", what, code);
    char *log = srv_log(&s);
    CHECK_MSG(log && strstr(log, "changed on disk") && strstr(log, "restart the server"),
              "%s: the log does not say why it exited", what);
    free(log);
    unlink(s.log);
}

static void write_in_place(const char *path) {
    int fd = open(path, O_WRONLY);
    struct stat st;
    CHECK(fd >= 0 && fstat(fd, &st) == 0);
    char zeros[4096] = {0};
    CHECK(pwrite(fd, zeros, sizeof zeros, st.st_size - (off_t)sizeof zeros) ==
          (ssize_t)sizeof zeros);
    close(fd);
}

static void truncate_in_place(const char *path) {
    struct stat st;
    CHECK(stat(path, &st) == 0 && truncate(path, st.st_size / 16) == 0);
}

int main(void) {
    const char *fx = ds_test_fixtures();
    if (!fx) return ds_test_skip_or_fail("golden fixtures missing");
    snprintf(g_fixture, sizeof g_fixture, "%.4000s/tiny-a", fx);
    char *dir = ds_test_tmpdir();
    CHECK(dir != NULL);
    if (!dir) return ds_test_finish("test_server_weights");
    test_replaced(dir);
    test_changed(dir, "written in place", write_in_place);
    test_changed(dir, "truncated in place", truncate_in_place);
    ds_test_rmtree(dir);
    free(dir);
    return ds_test_finish("test_server_weights");
}
