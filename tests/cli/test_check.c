/* `dsinfer check`, run as the real binary on small checkpoints (make-tiny, then quantize with its
 * manifest), against damage made here byte by byte:
 *  - a clean quantized model is ready (0), and the --json figures follow the rule: need =
 *    weights / nodes x 1.3 with weights = the shard files' bytes, KV cache = available - weights,
 *    in tokens of ds_kv_bytes_per_token (bf16, and f32 = half as many);
 *  - one flipped byte inside a shard's data: 3, naming the shard; a removed shard: 4; a
 *    truncated shard: 4 with a manifest (its digest mismatch not counted again as 3) and
 *    without one; bytes appended after the data: 4; a listed file missing: 4;
 *  - a config dsinfer refuses, and one the tensors do not match: 5; too little memory
 *    (--mem-available), and enough once --nodes splits the weights: 6 then 0; too little disk: 7;
 *    several problems: the lowest code;
 *  - --write-manifest on make-tiny output: `sha256sum -c` accepts it, check then verifies it,
 *    a second one needs --force, and it refuses to bless a truncated shard;
 *  - a malformed manifest: 3 naming the line; a file not in the manifest: a warning only;
 *  - under mpirun (MPMD: one directory per rank): identical files are ready, files that differ
 *    on rank 1 (each side self-consistent) give 8 naming rank 1, rank 0 alone prints the table.
 * Without mpirun the MPI part is skipped (77), a failure under CI=true. */
#include "io/io.h"
#include "model/model.h"
#include "dist/dist.h"
#include "testutil.h"

#include <jansson.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static char *tmp;

static char *path(const char *a, const char *b) {
    size_t n = strlen(a) + strlen(b) + 2;
    char *p = malloc(n);
    snprintf(p, n, "%s/%s", a, b);
    return p;
}

/* Runs `dsinfer check ARGS` (stderr folded into the output unless json); returns the status. */
static int check(const char *args, char **out) {
    char cmd[8192];
    snprintf(cmd, sizeof cmd, "'%s' check %s 2>&1", DSINFER_BIN, args);
    int st = -1;
    char *o = ds_test_run(cmd, &st);
    if (out)
        *out = o ? o : strdup("");
    else
        free(o);
    return st;
}

/* The report as JSON (stdout only). NULL when it does not parse. */
static json_t *check_json(const char *args, int *status) {
    char cmd[8192];
    snprintf(cmd, sizeof cmd, "'%s' check --json %s 2>/dev/null", DSINFER_BIN, args);
    char *o = ds_test_run(cmd, status);
    json_t *j = o ? json_loads(o, 0, NULL) : NULL;
    free(o);
    return j;
}

static int sh(const char *fmt, const char *a, const char *b) {
    char cmd[8192];
    snprintf(cmd, sizeof cmd, fmt, a, b);
    return system(cmd);
}

static char *copy_model(const char *src, const char *name) {
    char *dst = path(tmp, name);
    CHECK(sh("cp -r '%s' '%s'", src, dst) == 0);
    return dst;
}

static uint64_t file_size(const char *dir, const char *name) {
    char *p = path(dir, name);
    struct stat st;
    uint64_t n = stat(p, &st) == 0 ? (uint64_t)st.st_size : 0;
    free(p);
    return n;
}

/* Flips every bit of the byte at `from_end` bytes before the end of dir/name. */
static void flip_byte(const char *dir, const char *name, long from_end) {
    char *p = path(dir, name);
    FILE *f = fopen(p, "r+b");
    CHECK(f != NULL);
    if (f) {
        CHECK(fseek(f, -from_end, SEEK_END) == 0);
        long at = ftell(f);
        int c = fgetc(f);
        CHECK(c != EOF);
        fseek(f, at, SEEK_SET);
        fputc(c ^ 0xFF, f);
        fclose(f);
    }
    free(p);
}

static void truncate_by(const char *dir, const char *name, uint64_t n) {
    char *p = path(dir, name);
    CHECK(truncate(p, (off_t)(file_size(dir, name) - n)) == 0);
    free(p);
}

/* mode "w" writes the file anew, "a" appends to it */
static void put_file(const char *dir, const char *name, const char *text, const char *mode) {
    char *p = path(dir, name);
    FILE *f = fopen(p, mode);
    CHECK(f != NULL);
    if (f) {
        fputs(text, f);
        fclose(f);
    }
    free(p);
}

static void write_file(const char *dir, const char *name, const char *text) {
    put_file(dir, name, text, "w");
}

static void remove_file(const char *dir, const char *name) {
    char *p = path(dir, name);
    CHECK(unlink(p) == 0);
    free(p);
}

/* Replaces the first `from` in dir/config.json by `to`. */
static void edit_config(const char *dir, const char *from, const char *to) {
    char *p = path(dir, "config.json");
    FILE *f = fopen(p, "rb");
    char buf[65536];
    size_t n = f ? fread(buf, 1, sizeof buf - 1, f) : 0;
    if (f) fclose(f);
    buf[n] = 0;
    char *at = strstr(buf, from);
    CHECK_MSG(at != NULL, "'%s' not in config.json", from);
    if (at) {
        f = fopen(p, "wb");
        fwrite(buf, 1, (size_t)(at - buf), f);
        fputs(to, f);
        fputs(at + strlen(from), f);
        fclose(f);
    }
    free(p);
}

#define HAS(out, s) CHECK_MSG(strstr((out), (s)) != NULL, "output lacks '%s':\n%s", (s), (out))
#define LACKS(out, s) CHECK_MSG(strstr((out), (s)) == NULL, "output has '%s':\n%s", (s), (out))

static const char *const shards[3] = {"model-00001-of-00003.safetensors",
                                      "model-00002-of-00003.safetensors",
                                      "model-00003-of-00003.safetensors"};

/* The JSON figures against the rule, computed here from the files and the config. */
static void check_figures(const char *dir, const char *extra, uint64_t mem, int nodes) {
    char args[4096];
    snprintf(args, sizeof args, "--mem-available %llu --nodes %d %s '%s'", (unsigned long long)mem,
             nodes, extra, dir);
    int st = -1;
    json_t *j = check_json(args, &st);
    CHECK_MSG(j != NULL, "no JSON from check %s", args);
    if (!j) return;
    json_t *r0 = json_array_get(json_object_get(j, "ranks"), 0);
    json_t *m = json_object_get(r0, "memory"), *kv = json_object_get(r0, "kv_cache");
    uint64_t weights = 0;
    for (int i = 0; i < 3; i++) weights += file_size(dir, shards[i]);
    ds_config cfg;
    CHECK(ds_config_load(dir, &cfg) == DS_OK);
    const uint64_t bpt = ds_kv_bytes_per_token(&cfg, DS_KV_BF16);
    const uint64_t share = weights / (uint64_t)nodes;
    CHECK((uint64_t)json_integer_value(json_object_get(m, "weights_bytes")) == weights);
    CHECK_NEAR(json_integer_value(json_object_get(m, "share_bytes")), share, 1);
    CHECK_NEAR(json_integer_value(json_object_get(m, "need_bytes")), share * 1.3, 2);
    CHECK((uint64_t)json_integer_value(json_object_get(m, "available_bytes")) == mem);
    const uint64_t kvb = mem > share ? mem - share : 0;
    CHECK_NEAR(json_integer_value(json_object_get(kv, "bytes")), kvb, 1);
    CHECK((uint64_t)json_integer_value(json_object_get(kv, "bytes_per_token_bf16")) == bpt);
    CHECK_NEAR(json_integer_value(json_object_get(kv, "tokens_bf16")), kvb / bpt, 1);
    CHECK_NEAR(json_integer_value(json_object_get(kv, "tokens_f32")), kvb / (2 * bpt), 1);
    const int ready = mem >= (uint64_t)(share * 1.3);
    CHECK_MSG(st == (ready ? 0 : 6), "status %d with %llu available for %llu per node", st,
              (unsigned long long)mem, (unsigned long long)share);
    CHECK(json_is_true(json_object_get(j, "ready")) == ready);
    CHECK(json_integer_value(json_object_get(j, "exit_code")) == st);
    json_decref(j);
}

/* The MPI part: 0 when run, 77 / 1 (CI) when mpirun is missing. */
static int test_mpi(const char *q, const char *corrupt) {
    if (!ds_dist_available()) {
        fprintf(stderr, "note: this build has no MPI (DSINFER_MPI=OFF or not found): the "
                        "multi-rank checks are not run\n");
        return 0;
    }
    if (system("command -v mpirun >/dev/null 2>&1") != 0)
        return ds_test_skip_or_fail("mpirun not found (apt-get install openmpi-bin)");
    if (geteuid() == 0) {
        setenv("OMPI_ALLOW_RUN_AS_ROOT", "1", 1);
        setenv("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1", 1);
    }
    /* rank 1's copy differs by one byte, and its manifest says so: each node is consistent on
     * its own, only the comparison across the ranks can tell */
    char *d = copy_model(q, "differs");
    flip_byte(d, shards[1], 77);
    char args[4096], cmd[8192];
    snprintf(args, sizeof args, "--write-manifest --force '%s'", d);
    CHECK(check(args, NULL) == 0);

    /* under ASan, OpenMPI's own allocations at exit are reported as leaks: not ours */
    const char *mpi = "ASAN_OPTIONS=\"${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_leaks=0\" timeout 120 "
                      "mpirun --oversubscribe";
    int st = -1;
    /* the same files on both ranks */
    snprintf(cmd, sizeof cmd, "%s -np 2 '%s' check '%s' 2>/dev/null", mpi, DSINFER_BIN, q);
    char *o = ds_test_run(cmd, &st);
    CHECK_MSG(st == 0, "mpirun -np 2 check: status %d\n%s", st, o ? o : "");
    if (o) {
        HAS(o, "2 ranks");
        HAS(o, "\nready\n");
        /* rank 0 alone prints: one header */
        CHECK(strstr(o, "dsinfer check ") == strstr(o, "dsinfer check ") &&
              !strstr(strstr(o, "dsinfer check ") + 1, "dsinfer check "));
    }
    free(o);
    /* files differ on rank 1 */
    snprintf(cmd, sizeof cmd, "%s -np 1 '%s' check '%s' : -np 1 '%s' check '%s' 2>&1", mpi,
             DSINFER_BIN, q, DSINFER_BIN, d);
    o = ds_test_run(cmd, &st);
    CHECK_MSG(st == 8, "MPMD with differing files: status %d\n%s", st, o ? o : "");
    if (o) {
        HAS(o, "weights differ on rank 1 (host ");
        HAS(o, "DIFFER");
        LACKS(o, "weights differ on rank 0");
    }
    free(o);
    /* rank 1 corrupt against its own manifest: 3 (the lower code), and it differs too */
    snprintf(cmd, sizeof cmd, "%s -np 1 '%s' check '%s' : -np 1 '%s' check '%s' 2>/dev/null", mpi,
             DSINFER_BIN, q, DSINFER_BIN, corrupt);
    o = ds_test_run(cmd, &st);
    CHECK_MSG(st == 3, "MPMD with a corrupt rank 1: status %d\n%s", st, o ? o : "");
    if (o) {
        HAS(o, "rank 1 (");
        HAS(o, shards[1]);
        HAS(o, "weights differ on rank 1");
    }
    free(o);
    free(d);
    return 0;
}

int main(void) {
    tmp = ds_test_tmpdir();
    CHECK(tmp != NULL);
    if (!tmp) return ds_test_finish("test_check");
    char *src = path(tmp, "src"), *q = path(tmp, "q"), *out = NULL, args[4096];
    CHECK(sh("'%s' make-tiny '%s' --preset tiny --seed 1 --no-tokenizer --shard-bytes 8M "
             ">/dev/null 2>&1",
             DSINFER_BIN, src) == 0);
    snprintf(args, sizeof args, "'%s' '%s' --scheme w8a8 --shard-bytes 4M >/dev/null 2>&1", src, q);
    CHECK(sh("'%s' quantize %s", DSINFER_BIN, args) == 0);
    for (int i = 0; i < 3; i++) CHECK_MSG(file_size(q, shards[i]) > 0, "%s", shards[i]);

    /* clean: ready */
    snprintf(args, sizeof args, "'%s'", q);
    CHECK(check(args, &out) == 0);
    HAS(out, "\nready\n");
    HAS(out, "5 files verified");
    HAS(out, "3 shards complete");
    free(out);
    check_figures(q, "", 1ull << 30, 1);
    check_figures(q, "", 1ull << 20, 1); /* not enough: 6 */
    /* a bit more than a quarter of the need is enough when four nodes share the weights */
    const uint64_t weights =
        file_size(q, shards[0]) + file_size(q, shards[1]) + file_size(q, shards[2]);
    check_figures(q, "", (uint64_t)(weights / 4 * 1.3) + 4096, 4);
    check_figures(q, "", (uint64_t)(weights / 4 * 1.3) - 4096, 4);
    snprintf(args, sizeof args, "--mem-available 1M '%s'", q);
    CHECK(check(args, &out) == 6);
    HAS(out, "not enough memory");
    HAS(out, "x 1.3");
    HAS(out, "1.00 MiB available");
    HAS(out, "not ready: not enough memory (exit 6)");
    free(out);
    snprintf(args, sizeof args, "--disk-available 100M '%s'", q);
    CHECK(check(args, &out) == 7);
    HAS(out, "not enough disk");
    free(out);

    /* one flipped byte in the data of shard 2: 3, naming it */
    char *c1 = copy_model(q, "corrupt");
    flip_byte(c1, shards[1], 10);
    snprintf(args, sizeof args, "'%s'", c1);
    CHECK(check(args, &out) == 3);
    HAS(out, shards[1]);
    HAS(out, "SHA-256 differs");
    LACKS(out, shards[0]);
    free(out);
    /* with other problems too, the lowest code */
    snprintf(args, sizeof args, "--mem-available 1M --disk-available 1M '%s'", c1);
    CHECK(check(args, &out) == 3);
    HAS(out, "not enough memory");
    HAS(out, "not enough disk");
    free(out);

    /* a removed shard: 4, naming it (the index names it, the manifest lists it: once) */
    char *c2 = copy_model(q, "missing");
    remove_file(c2, shards[2]);
    snprintf(args, sizeof args, "'%s'", c2);
    CHECK(check(args, &out) == 4);
    HAS(out, shards[2]);
    HAS(out, "missing");
    free(out);

    /* a truncated shard: 4 with the manifest (not 3), and without it */
    char *c3 = copy_model(q, "truncated");
    truncate_by(c3, shards[0], 100);
    snprintf(args, sizeof args, "'%s'", c3);
    CHECK(check(args, &out) == 4);
    HAS(out, shards[0]);
    HAS(out, "truncated");
    LACKS(out, "SHA-256 differs");
    free(out);
    /* --write-manifest refuses to record it */
    snprintf(args, sizeof args, "--write-manifest --force '%s'", c3);
    CHECK(check(args, &out) == 4);
    HAS(out, "not written");
    free(out);
    remove_file(c3, DS_MANIFEST_NAME);
    snprintf(args, sizeof args, "--write-manifest '%s'", c3);
    CHECK(check(args, NULL) == 4);
    CHECK(file_size(c3, DS_MANIFEST_NAME) == 0);
    snprintf(args, sizeof args, "'%s'", c3);
    CHECK(check(args, &out) == 4);
    HAS(out, shards[0]);
    free(out);

    /* bytes after the last tensor's data: not the file that was written */
    char *c4 = copy_model(q, "appended");
    remove_file(c4, DS_MANIFEST_NAME);
    put_file(c4, shards[1], "garbage", "a");
    snprintf(args, sizeof args, "'%s'", c4);
    CHECK(check(args, &out) == 4);
    HAS(out, "7 stray bytes");
    free(out);

    /* a listed non-shard file missing: 4; an unlisted one: a warning */
    char *c6 = copy_model(q, "files");
    write_file(c6, "README.md", "# a model\n");
    snprintf(args, sizeof args, "'%s'", c6);
    CHECK(check(args, &out) == 0);
    HAS(out, "README.md");
    HAS(out, "not verified");
    free(out);
    char *c6b = copy_model(q, "nocfgindex");
    remove_file(c6b, "model.safetensors.index.json");
    snprintf(args, sizeof args, "'%s'", c6b);
    CHECK(check(args, &out) == 4);
    HAS(out, "no model.safetensors.index.json or model.safetensors");
    free(out);

    /* a malformed manifest: 3 naming the line */
    char *c7 = copy_model(q, "badmanifest");
    put_file(c7, DS_MANIFEST_NAME, "not a digest  config.json\n", "a");
    snprintf(args, sizeof args, "'%s'", c7);
    CHECK(check(args, &out) == 3);
    HAS(out, "line 6");
    free(out);

    /* config: refused by dsinfer (5, naming the field), or not matching the tensors (5) */
    char *c5 = copy_model(q, "config");
    remove_file(c5, DS_MANIFEST_NAME); /* else the edit is a manifest mismatch first (3) */
    edit_config(c5, "\"sigmoid\"", "\"softmax\"");
    snprintf(args, sizeof args, "'%s'", c5);
    CHECK(check(args, &out) == 5);
    HAS(out, "scoring_func");
    free(out);
    char *c5b = copy_model(q, "layers");
    edit_config(c5b, "\"num_hidden_layers\": 3", "\"num_hidden_layers\": 4");
    snprintf(args, sizeof args, "--write-manifest --force '%s'", c5b);
    CHECK(check(args, &out) == 5);
    HAS(out, "model.layers.3");
    free(out);

    /* --write-manifest on make-tiny output */
    snprintf(args, sizeof args, "'%s'", src);
    CHECK(check(args, &out) == 0); /* no manifest: a warning */
    HAS(out, "not found");
    HAS(out, "--write-manifest");
    free(out);
    snprintf(args, sizeof args, "--write-manifest '%s'", src);
    CHECK(check(args, &out) == 0);
    HAS(out, "written: 5 files");
    free(out);
    CHECK(sh("cd '%s' && sha256sum -c --quiet --strict %s", src, DS_MANIFEST_NAME) == 0);
    snprintf(args, sizeof args, "'%s'", src);
    CHECK(check(args, &out) == 0);
    HAS(out, "5 files verified");
    free(out);
    snprintf(args, sizeof args, "--write-manifest '%s'", src);
    CHECK(check(args, &out) == 2);
    HAS(out, "--force");
    free(out);
    snprintf(args, sizeof args, "--write-manifest --force '%s'", src);
    CHECK(check(args, NULL) == 0);

    /* usage */
    CHECK(check("", NULL) == 2);
    CHECK(check("--write-manifest --force", NULL) == 2);
    snprintf(args, sizeof args, "--nodes 0 '%s'", q);
    CHECK(check(args, NULL) == 2);
    snprintf(args, sizeof args, "--force '%s'", q);
    CHECK(check(args, NULL) == 2);
    snprintf(args, sizeof args, "--mem-available lots '%s'", q);
    CHECK(check(args, NULL) == 2);
    CHECK(check("--help", &out) == 0);
    HAS(out, "exit status");
    free(out);
    snprintf(args, sizeof args, "'%s/nonexistent'", tmp);
    CHECK(check(args, NULL) == 4);

    int mpi = test_mpi(q, c1);

    free(c1);
    free(c2);
    free(c3);
    free(c4);
    free(c5);
    free(c5b);
    free(c6);
    free(c6b);
    free(c7);
    free(src);
    free(q);
    ds_test_rmtree(tmp);
    free(tmp);
    int rc = ds_test_finish("test_check");
    return rc ? rc : mpi;
}
