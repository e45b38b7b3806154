/* quantize writes the layouts docs/formats.md describes, and only complete directories:
 *  - the output tensor set: every quantized projection as I8 weight + F32 weight_scale with the
 *    scheme's shapes, everything else under its own name, no *_scale_inv; nothing extra;
 *  - every quantized element dequantises (q * s) to within s / 2 of the source weight (the FP8
 *    source dequantised with its scale grid), s = max|row or group| / 127 (resp. 7); int4
 *    nibbles are unpacked here independently, padding included (odd column counts);
 *  - copied tensors are byte-identical to the source (BF16 case);
 *  - config.json = the source with only quantization_config replaced; the index maps exactly
 *    the output tensors; the manifest verifies with `sha256sum -c` and lists every file;
 *  - refusals (existing OUT_DIR, bad flags), --force, and a SIGKILLed run leaves no OUT_DIR;
 *  - faults: killed at several points then rerun, the output verifies with `dsinfer check`;
 *    the disk full mid-run (tmpfs, else RLIMIT_FSIZE): a clear error, nothing left behind. */
#include "cli/cli.h"
#include "io/io.h"
#include "kernels/kernels.h"
#include "model/model.h"
#include "testutil.h"

#include <dirent.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static int run(int (*fn)(int, char **), const char *a0, ...) {
    char *argv[32];
    int argc = 0;
    va_list ap;
    va_start(ap, a0);
    for (const char *a = a0; a && argc < 31; a = va_arg(ap, const char *)) argv[argc++] = (char *)a;
    va_end(ap);
    argv[argc] = NULL;
    fflush(stdout);
    return fn(argc, argv);
}

static char *join(const char *a, const char *b) {
    size_t n = strlen(a) + strlen(b) + 2;
    char *p = malloc(n);
    snprintf(p, n, "%s/%s", a, b);
    return p;
}

static int exists(const char *p) {
    struct stat st;
    return stat(p, &st) == 0;
}

/* The rule, written out again: projections in self_attn / mlp except the router. */
static int should_quantize(const char *name, int lm_head) {
    if (lm_head && !strcmp(name, "lm_head.weight")) return 1;
    if (strncmp(name, "model.layers.", 13) != 0) return 0;
    const char *s = strchr(name + 13, '.');
    if (!s || (strncmp(s, ".self_attn.", 11) && strncmp(s, ".mlp.", 5))) return 0;
    if (!strcmp(s, ".mlp.gate.weight")) return 0;
    size_t n = strlen(name);
    return n > 7 && !strcmp(name + n - 7, ".weight");
}

static int unpack4(const int8_t *row, int64_t c) {
    uint8_t b = (uint8_t)row[c / 2];
    int v = (c & 1) ? (b >> 4) : (b & 0xF);
    return v >= 8 ? v - 16 : v;
}

/* Checks OUT against SRC for a scheme (group 0 = w8a8). */
static void check_output(const char *src, const char *out, int64_t group, int lm_head,
                         int bf16_src) {
    ds_st_set *s = NULL, *o = NULL;
    CHECK(ds_st_open_dir(src, &s) == 0);
    CHECK_MSG(ds_st_open_dir(out, &o) == 0, "%s", ds_err_msg());
    if (!s || !o) {
        ds_st_close(s);
        ds_st_close(o);
        return;
    }
    size_t expect_n = 0, n_quant = 0;
    char sname[512];
    float *row = NULL;
    for (size_t i = 0; i < ds_st_count(s); i++) {
        const ds_st_tensor *t = ds_st_at(s, i);
        size_t nl = strlen(t->name);
        if (nl > 10 && !strcmp(t->name + nl - 10, "_scale_inv")) {
            snprintf(sname, sizeof sname, "%s", t->name);
            CHECK_MSG(!ds_st_find(o, sname), "%s copied", t->name);
            continue;
        }
        const ds_st_tensor *u = ds_st_find(o, t->name);
        CHECK_MSG(u != NULL, "%s missing", t->name);
        if (!u) continue;
        expect_n++;
        snprintf(sname, sizeof sname, "%s_scale_inv", t->name);
        const ds_st_tensor *sinv = ds_st_find(s, sname);
        ds_mat m = {.dtype = t->dtype,
                    .rows = t->shape[0],
                    .cols = t->ndim == 2 ? t->shape[1] : 1,
                    .data = t->data,
                    .scale = sinv ? sinv->data : NULL,
                    .block_rows = 128,
                    .block_cols = 128};
        if (!should_quantize(t->name, lm_head) || t->ndim != 2) {
            CHECK_MSG(u->ndim == t->ndim && u->shape[0] == t->shape[0], "%s shape", t->name);
            if (t->dtype == DS_F8_E4M3) {
                CHECK(u->dtype == DS_BF16);
            } else {
                CHECK_MSG(u->dtype == t->dtype && u->nbytes == t->nbytes &&
                              !memcmp(u->data, t->data, t->nbytes),
                          "%s not byte-identical", t->name);
            }
            continue;
        }
        n_quant++;
        expect_n++;
        snprintf(sname, sizeof sname, "%s_scale", t->name);
        const ds_st_tensor *sc = ds_st_find(o, sname);
        const int64_t rows = m.rows, cols = m.cols;
        const int64_t rb = group ? (cols + 1) / 2 : cols,
                      ng = group ? (cols + group - 1) / group : 1;
        CHECK_MSG(u->dtype == DS_I8 && u->ndim == 2 && u->shape[0] == rows && u->shape[1] == rb,
                  "%s: %s [%lld, %lld]", t->name, ds_dtype_name(u->dtype), (long long)u->shape[0],
                  (long long)u->shape[1]);
        CHECK_MSG(sc && sc->dtype == DS_F32 && sc->ndim == 2 && sc->shape[0] == rows &&
                      sc->shape[1] == ng,
                  "%s missing or wrong", sname);
        if (!sc || u->dtype != DS_I8 || u->shape[1] != rb || sc->shape[1] != ng) continue;
        row = realloc(row, (size_t)cols * sizeof *row);
        int bad = 0;
        for (int64_t r = 0; r < rows && bad < 3; r++) {
            ds_mat_row_f32(&m, r, row);
            const int8_t *q = (const int8_t *)u->data + r * rb;
            for (int64_t g = 0; g < ng; g++) {
                const int64_t c0 = group ? g * group : 0;
                const int64_t c1 = group && c0 + group < cols ? c0 + group : cols;
                float mx = 0, s;
                memcpy(&s, (const char *)sc->data + (size_t)(r * ng + g) * 4, 4);
                for (int64_t c = c0; c < c1; c++) mx = fmaxf(mx, fabsf(row[c]));
                const float want = mx > 0 ? mx / (group ? 7.0f : 127.0f) : 1.0f;
                if (fabsf(s - want) > 1e-6f * want) bad++;
                for (int64_t c = c0; c < c1; c++) {
                    int v = group ? unpack4(q, c) : q[c];
                    if (group ? (v < -8 || v > 7) : (v < -127 || v > 127)) bad++;
                    if (fabs((double)v * s - row[c]) > 0.5 * s * (1 + 1e-5) + 1e-30) bad++;
                }
            }
            if (group && (cols & 1)) bad += ((uint8_t)q[rb - 1] >> 4) != 0;
        }
        CHECK_MSG(bad == 0, "%s: %d elements out of bounds", t->name, bad);
    }
    CHECK_MSG(ds_st_count(o) == expect_n, "%zu output tensors, %zu expected", ds_st_count(o),
              expect_n);
    CHECK(n_quant > 0);
    (void)bf16_src;
    free(row);

    /* index: exactly the output tensors, each in an existing file */
    char *ip = join(out, "model.safetensors.index.json");
    json_t *idx = NULL;
    CHECK(ds_json_load_file(ip, &idx) == 0);
    json_t *map = json_object_get(idx, "weight_map");
    CHECK(json_object_size(map) == ds_st_count(o));
    const char *k;
    json_t *v;
    json_object_foreach(map, k, v) {
        char *fp = join(out, json_string_value(v));
        CHECK_MSG(ds_st_find(o, k) && exists(fp), "index entry %s", k);
        free(fp);
    }
    json_decref(idx);
    free(ip);

    /* config.json: only quantization_config differs */
    char *sp = join(src, "config.json"), *op = join(out, "config.json");
    json_t *sj = NULL, *oj = NULL;
    CHECK(ds_json_load_file(sp, &sj) == 0 && ds_json_load_file(op, &oj) == 0);
    json_t *qc = json_object_get(oj, "quantization_config");
    json_t *want = group ? json_pack("{s:s, s:I, s:s}", "quant_method", "w4a8_int4", "group_size",
                                     (json_int_t)group, "activation_scheme", "dynamic")
                         : json_pack("{s:s, s:s}", "quant_method", "w8a8_int8", "activation_scheme",
                                     "dynamic");
    CHECK_MSG(json_equal(qc, want), "quantization_config differs");
    json_object_del(sj, "quantization_config");
    json_object_del(oj, "quantization_config");
    CHECK_MSG(json_equal(sj, oj), "config.json changed beyond quantization_config");
    json_decref(want);
    json_decref(sj);
    json_decref(oj);
    free(sp);
    free(op);

    /* manifest: sha256sum -c passes and it lists every other file, sorted */
    char cmd[4096];
    snprintf(cmd, sizeof cmd, "cd '%s' && sha256sum -c --quiet --strict dsinfer-manifest.sha256",
             out);
    CHECK_MSG(system(cmd) == 0, "sha256sum -c failed in %s", out);
    char *mp = join(out, "dsinfer-manifest.sha256");
    FILE *mf = fopen(mp, "r");
    CHECK(mf != NULL);
    char line[1024], prev[1024] = "";
    int lines = 0;
    while (mf && fgets(line, sizeof line, mf)) {
        lines++;
        size_t l = strlen(line);
        CHECK(l > 67 && line[64] == ' ' && line[65] == ' ' && line[l - 1] == '\n');
        line[l - 1] = 0;
        CHECK_MSG(strcmp(prev, line + 66) < 0, "manifest not sorted at %s", line + 66);
        snprintf(prev, sizeof prev, "%s", line + 66);
    }
    if (mf) fclose(mf);
    free(mp);
    int files = 0;
    DIR *d = opendir(out);
    struct dirent *e;
    while (d && (e = readdir(d))) files += e->d_name[0] != '.';
    if (d) closedir(d);
    CHECK_MSG(lines == files - 1, "manifest has %d lines for %d other files", lines, files - 1);
    ds_st_close(s);
    ds_st_close(o);
}

/* A hand-written source with odd shapes, F32 / F16 projections and an all-zero row. */
static void write_odd_source(const char *dir) {
    mkdir(dir, 0755);
    char *p = join(dir, "model.safetensors");
    ds_st_writer *w = NULL;
    CHECK(ds_st_writer_open(p, &w) == 0);
    const int64_t s1[2] = {5, 37}, s2[2] = {3, 9}, s3[1] = {7};
    CHECK(ds_st_writer_add(w, "model.layers.0.mlp.down_proj.weight", DS_F32, 2, s1) == 0);
    CHECK(ds_st_writer_add(w, "model.layers.0.self_attn.o_proj.weight", DS_F16, 2, s2) == 0);
    CHECK(ds_st_writer_add(w, "model.norm.weight", DS_F32, 1, s3) == 0);
    CHECK(ds_st_writer_begin_data(w) == 0);
    float a[5 * 37];
    for (int i = 0; i < 5 * 37; i++) a[i] = i < 37 ? 0.0f : sinf((float)i * 0.7f) * (float)(i % 11);
    a[40] = 2.5f; /* a tie for int4 at some scale is fine either way: checked by bound */
    uint16_t h[27];
    for (int i = 0; i < 27; i++) h[i] = (uint16_t)(0x3C00 + (i * 97 % 1024)) | (i & 1 ? 0x8000 : 0);
    float n[7] = {1, 1, 1, 1, 1, 1, 1};
    CHECK(ds_st_writer_data(w, a, sizeof a) == 0);
    CHECK(ds_st_writer_data(w, h, sizeof h) == 0);
    CHECK(ds_st_writer_data(w, n, sizeof n) == 0);
    CHECK(ds_st_writer_close(w) == 0);
    free(p);
    p = join(dir, "config.json");
    FILE *f = fopen(p, "w");
    fputs("{\"model_type\": \"deepseek_v3\", \"rms_norm_eps\": 1e-06, \"hidden_size\": 7}\n", f);
    fclose(f);
    free(p);
}

static int count_tmp_siblings(const char *dir, const char *base) {
    DIR *d = opendir(dir);
    struct dirent *e;
    int n = 0;
    size_t bl = strlen(base);
    while (d && (e = readdir(d)))
        n += !strncmp(e->d_name, base, bl) && !strncmp(e->d_name + bl, ".tmp-", 5);
    if (d) closedir(d);
    return n;
}

/* Starts `dsinfer quantize SRC OUT --scheme w4a8` in a child (stdout and stderr to err_log),
 * with at most fsize bytes per written file when fsize > 0 (SIGXFSZ ignored: writes fail with
 * EFBIG instead, a disk that is full for this process). */
static pid_t start_quantize(const char *src, const char *out, const char *err_log, long fsize) {
    pid_t pid = fork();
    if (pid == 0) {
        freopen("/dev/null", "w", stdout);
        if (err_log) freopen(err_log, "w", stderr);
        if (fsize > 0) {
            signal(SIGXFSZ, SIG_IGN);
            struct rlimit rl = {(rlim_t)fsize, (rlim_t)fsize};
            setrlimit(RLIMIT_FSIZE, &rl);
        }
        execl(DSINFER_BIN, DSINFER_BIN, "quantize", src, out, "--scheme", "w4a8", "--threads", "1",
              (char *)NULL);
        _exit(127);
    }
    return pid;
}

/* `dsinfer check DIR`'s exit status. */
static int check_status(const char *dir) {
    char cmd[8300];
    snprintf(cmd, sizeof cmd, "'%s' check '%s' >/dev/null 2>&1", DSINFER_BIN, dir);
    int st;
    free(ds_test_run(cmd, &st));
    return st;
}

/* Killed at three points of its run (at once, early, late), quantize leaves no OUT_DIR; run
 * again to the end, it leaves one that `dsinfer check` verifies (manifest, shards, config). */
static void kill_and_rerun(const char *tmp, const char *src) {
    const long delays_ms[] = {0, 40, 120};
    char *out = join(tmp, "rerun");
    for (size_t i = 0; i < sizeof delays_ms / sizeof *delays_ms; i++) {
        pid_t pid = start_quantize(src, out, NULL, 0);
        CHECK(pid > 0);
        struct timespec ts = {delays_ms[i] / 1000, (delays_ms[i] % 1000) * 1000000};
        nanosleep(&ts, NULL);
        kill(pid, SIGKILL);
        int wst = 0;
        waitpid(pid, &wst, 0);
        if (WIFEXITED(wst)) { /* finished before the kill (a fast machine): start over */
            ds_test_rmtree(out);
            continue;
        }
        CHECK_MSG(!exists(out), "killed after %ld ms: OUT_DIR exists", delays_ms[i]);
    }
    pid_t pid = start_quantize(src, out, NULL, 0);
    int wst = 0;
    waitpid(pid, &wst, 0);
    CHECK_MSG(WIFEXITED(wst) && WEXITSTATUS(wst) == 0, "the rerun failed");
    CHECK_MSG(check_status(out) == 0, "dsinfer check refuses the rerun's output");
    free(out);
}

/* Disk full while quantizing: a 16 MiB tmpfs when this process may mount one (root), else a
 * 16 MiB limit per written file (RLIMIT_FSIZE). The run fails naming the cause, exits 1 and
 * leaves nothing that looks complete: no OUT_DIR and no temporary directory. */
static void disk_full(const char *tmp, const char *src) {
    char *mnt = join(tmp, "full"), *out = join(mnt, "out"), *log = join(tmp, "full.log");
    char cmd[8300];
    snprintf(cmd, sizeof cmd, "mkdir -p '%s' && mount -t tmpfs -o size=16m tmpfs '%s' 2>/dev/null",
             mnt, mnt);
    int st;
    free(ds_test_run(cmd, &st));
    const int tmpfs = st == 0;
    pid_t pid = start_quantize(src, out, log, tmpfs ? 0 : 16L << 20);
    int wst = 0;
    waitpid(pid, &wst, 0);
    char *err = ds_test_read_file(log, NULL);
    printf("disk full (%s): %s", tmpfs ? "16 MiB tmpfs" : "RLIMIT_FSIZE 16 MiB", err ? err : "");
    CHECK_MSG(WIFEXITED(wst) && WEXITSTATUS(wst) == 1, "disk full: status %d", wst);
    CHECK_MSG(err && (strstr(err, tmpfs ? "No space left" : "File too large")),
              "disk full: the message does not name the cause: %s", err ? err : "");
    CHECK(!exists(out) && count_tmp_siblings(mnt, "out") == 0);
    free(err);
    if (tmpfs) {
        snprintf(cmd, sizeof cmd, "umount '%s'", mnt);
        free(ds_test_run(cmd, &st));
        CHECK(st == 0);
    }
    free(mnt);
    free(out);
    free(log);
}

int main(void) {
    char *tmp = ds_test_tmpdir();
    CHECK(tmp != NULL);
    if (!tmp) return ds_test_finish("test_quantize");
    char *bf = join(tmp, "bf16"), *f8 = join(tmp, "fp8"), *odd = join(tmp, "odd");
    CHECK(run(ds_cmd_make_tiny, "make-tiny", bf, "--no-tokenizer", "--shard-bytes", "8M", NULL) ==
          0);
    CHECK(run(ds_cmd_make_tiny, "make-tiny", f8, "--no-tokenizer", "--dtype", "fp8", NULL) == 0);
    /* a generation_config.json to copy */
    char *gc = join(bf, "generation_config.json");
    FILE *f = fopen(gc, "w");
    fputs("{\"bos_token_id\": 0}\n", f);
    fclose(f);
    write_odd_source(odd);

    char *o1 = join(tmp, "bf16-w8a8"), *o2 = join(tmp, "bf16-w4a8"), *o3 = join(tmp, "fp8-w8a8"),
         *o4 = join(tmp, "fp8-w4a8"), *o5 = join(tmp, "odd-w4a8"), *o6 = join(tmp, "odd-w8a8");
    CHECK(run(ds_cmd_quantize, "quantize", bf, o1, "--scheme", "w8a8", "--shard-bytes", "4M",
              NULL) == 0);
    check_output(bf, o1, 0, 0, 1);
    char *gco = join(o1, "generation_config.json");
    CHECK(exists(gco));
    free(gco);
    CHECK(run(ds_cmd_quantize, "quantize", bf, o2, "--scheme=w4a8", "--quantize-lm-head",
              "--threads", "3", NULL) == 0);
    check_output(bf, o2, 128, 1, 1);
    CHECK(run(ds_cmd_quantize, "quantize", f8, o3, "--scheme", "w8a8", NULL) == 0);
    check_output(f8, o3, 0, 0, 0);
    CHECK(run(ds_cmd_quantize, "quantize", f8, o4, "--scheme", "w4a8", "--group-size", "24",
              NULL) == 0);
    check_output(f8, o4, 24, 0, 0);
    CHECK(run(ds_cmd_quantize, "quantize", odd, o5, "--scheme", "w4a8", "--group-size", "4",
              NULL) == 0);
    check_output(odd, o5, 4, 0, 0);
    CHECK(run(ds_cmd_quantize, "quantize", odd, o6, "--scheme", "w8a8", NULL) == 0);
    check_output(odd, o6, 0, 0, 0);
    CHECK(count_tmp_siblings(tmp, "bf16-w8a8") == 0);

    /* refusals: existing OUT_DIR (untouched), bad flags; --force replaces */
    char *cfg = join(o1, "config.json");
    struct stat before, after;
    stat(cfg, &before);
    CHECK(run(ds_cmd_quantize, "quantize", bf, o1, "--scheme", "w8a8", NULL) == 2);
    CHECK(stat(cfg, &after) == 0 && after.st_ino == before.st_ino);
    CHECK(run(ds_cmd_quantize, "quantize", bf, o1, "--scheme", "w3a8", "--force", NULL) == 2);
    CHECK(run(ds_cmd_quantize, "quantize", bf, o1, "--scheme", "w4a8", "--group-size", "0",
              "--force", NULL) == 2);
    CHECK(run(ds_cmd_quantize, "quantize", bf, o1, NULL) == 2);
    CHECK(run(ds_cmd_quantize, "quantize", bf, o1, "--scheme", "w8a8", "--force", NULL) == 0);
    check_output(bf, o1, 0, 0, 1);
    /* a quantized checkpoint is a source like any other: requantizing W8A8 as W8A8 gives back
     * its integers (the row maximum is +-127 again), each at most one step off where q x s / s'
     * rounds the other way */
    char *o7 = join(tmp, "again");
    CHECK(run(ds_cmd_quantize, "quantize", o1, o7, "--scheme", "w8a8", NULL) == 0);
    ds_st_set *s1 = NULL, *s7 = NULL;
    CHECK(ds_st_open_dir(o1, &s1) == DS_OK && ds_st_open_dir(o7, &s7) == DS_OK);
    size_t n_i8 = 0, off = 0;
    for (size_t i = 0; s1 && s7 && i < ds_st_count(s1); i++) {
        const ds_st_tensor *a = ds_st_at(s1, i), *b = ds_st_find(s7, a->name);
        CHECK_MSG(b && b->dtype == a->dtype && b->nbytes == a->nbytes, "%s", a->name);
        if (!b || a->dtype != DS_I8 || b->nbytes != a->nbytes) continue;
        n_i8++;
        for (uint64_t k = 0; k < a->nbytes; k++) {
            int d = ((const int8_t *)a->data)[k] - ((const int8_t *)b->data)[k];
            off += d != 0;
            CHECK_MSG(d >= -1 && d <= 1, "%s byte %llu", a->name, (unsigned long long)k);
        }
    }
    CHECK(n_i8 > 0);
    printf("requantized w8a8: %zu int8 tensors, %zu values one step off\n", n_i8, off);
    ds_st_close(s1);
    ds_st_close(s7);
    free(cfg);

    /* SIGKILL mid-run: OUT_DIR must not exist */
    char *sm = join(tmp, "small"), *ok = join(tmp, "killed");
    CHECK(run(ds_cmd_make_tiny, "make-tiny", sm, "--no-tokenizer", "--preset", "small", NULL) == 0);
    pid_t pid = fork();
    if (pid == 0) {
        freopen("/dev/null", "w", stdout);
        execl(DSINFER_BIN, DSINFER_BIN, "quantize", sm, ok, "--scheme", "w4a8", "--threads", "1",
              (char *)NULL);
        _exit(127);
    }
    CHECK(pid > 0);
    /* wait for the temporary directory to appear (the run has begun writing), then kill */
    for (int i = 0; i < 2000 && count_tmp_siblings(tmp, "killed") == 0; i++) {
        struct timespec ts = {0, 1000000};
        nanosleep(&ts, NULL);
    }
    struct timespec ts = {0, 20000000};
    nanosleep(&ts, NULL);
    kill(pid, SIGKILL);
    int wst = 0;
    waitpid(pid, &wst, 0);
    CHECK_MSG(WIFSIGNALED(wst), "the run finished before it could be killed");
    CHECK(!exists(ok));
    CHECK(count_tmp_siblings(tmp, "killed") == 1); /* left behind, under its .tmp- name */
    {
        /* ... and the loader refuses what the killed run left (no config.json / index yet). */
        DIR *d = opendir(tmp);
        struct dirent *e;
        int refused = 0, seen = 0;
        while (d && (e = readdir(d)))
            if (!strncmp(e->d_name, "killed.tmp-", 11)) {
                char *left = join(tmp, e->d_name);
                ds_model *m = NULL;
                seen = 1;
                refused = ds_model_open(left, NULL, &m) != DS_OK && m == NULL;
                CHECK_MSG(refused, "the loader accepted an interrupted quantize output");
                ds_model_close(m);
                free(left);
            }
        if (d) closedir(d);
        CHECK(seen && refused);
    }
    kill_and_rerun(tmp, sm);
    disk_full(tmp, sm);

    free(sm);
    free(ok);
    free(o7);
    free(gc);
    free(bf);
    free(f8);
    free(odd);
    free(o1);
    free(o2);
    free(o3);
    free(o4);
    free(o5);
    free(o6);
    ds_test_rmtree(tmp);
    free(tmp);
    return ds_test_finish("test_quantize");
}
