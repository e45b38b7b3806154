/* Multi-rank runs (src/dist, src/model/shard.c) on the fixture models under mpirun, against
 * one process:
 *  - logits of every prompt of golden.json (prefill at every position, greedy decode through
 *    the cache, and all prompts as one paged batch) are bit-identical with 1, 2 and 3 ranks, for
 *    BF16, the official FP8 layout, W8A8 and W4A8. tiny-a has 4 heads, 8 experts, hidden 64 and
 *    a vocabulary of 129280: three ranks split all of them unevenly, and FP8's 128-row scale
 *    blocks are cut inside;
 *  - `dsinfer generate --batch-file` (the engine: greedy and seeded sampling) prints the same
 *    lines under mpirun -np 3;
 *  - `dsinfer serve` under mpirun -np 2 answers a completion with one process's continuation;
 *  - a rank killed during a burst: every request answered (200 or 503), rank 0 names the rank
 *    and mpirun exits non-zero within seconds; a rank that stops (SIGSTOP) is given up on after
 *    --dist-timeout the same way.
 * The binary is also its own rank program: `test_dist --rank MODEL OUT` (see rank_main). */
#include "dist/dist.h"
#include "kernels/kernels.h"
#include "model/model.h"
#include "server/serverutil.h"
#include "formats/fmtgen.h"
#include "testutil.h"

#include <jansson.h>
#include <pthread.h>

/* ---- rank mode ---- */

static int write_all(FILE *f, const float *x, size_t n) {
    return fwrite(x, sizeof(float), n, f) == n ? 0 : -1;
}

/* Rank 0 writes every logit it computes to out; the others follow. */
static int rank_main(const char *model_dir, const char *out) {
    if (ds_dist_init(NULL, NULL)) return fprintf(stderr, "%s\n", ds_err_msg()), 1;
    ds_model_params mp = ds_model_default_params();
    mp.n_threads = 1;
    ds_model *m = NULL;
    if (ds_model_open(model_dir, &mp, &m)) return fprintf(stderr, "%s\n", ds_err_msg()), 1;
    if (ds_dist_rank() > 0) {
        int rc = ds_model_follow(m);
        if (rc) fprintf(stderr, "%s\n", ds_err_msg());
        ds_model_close(m);
        ds_dist_finalize();
        return rc ? 1 : 0;
    }
    const ds_config *c = ds_model_config(m);
    char path[4096];
    snprintf(path, sizeof path, "%s/tiny-a/golden.json", ds_test_fixtures());
    json_error_t je;
    json_t *g = json_load_file(path, 0, &je), *prompts = json_object_get(g, "prompts");
    FILE *f = fopen(out, "wb");
    int rc = g && f ? 0 : 1;
    size_t np = json_array_size(prompts), V = (size_t)c->vocab_size;
    int32_t *all_tok = NULL, *all_pos = NULL, *all_seq = NULL, *lidx = NULL, *tables = NULL;
    size_t total = 0;
    enum { DECODE = 8, BS = 4, MAXB = 64 };
    /* first a single token: with 3 ranks some rank's experts get no token in a layer before
     * any buffer of that rank was ever sized */
    if (!rc) {
        ds_kv_cache *kv = NULL;
        float *lg = malloc(V * sizeof *lg);
        int32_t bos = 0;
        rc = !lg || ds_kv_open(c, 1, &kv) || ds_model_forward(m, kv, &bos, 1, 0, lg, 0) ||
             write_all(f, lg, V);
        ds_kv_close(kv);
        free(lg);
    }
    /* one sequence at a time: prefill logits at every position, then greedy decode */
    for (size_t p = 0; !rc && p < np; p++) {
        json_t *ids = json_object_get(json_array_get(prompts, p), "ids");
        int64_t n = (int64_t)json_array_size(ids);
        int32_t *tok = malloc((size_t)(n + DECODE) * sizeof *tok);
        float *lg = malloc((size_t)n * V * sizeof *lg);
        ds_kv_cache *kv = NULL;
        for (int64_t i = 0; i < n; i++)
            tok[i] = (int32_t)json_integer_value(json_array_get(ids, i));
        rc = ds_kv_open(c, n + DECODE, &kv) || ds_model_forward(m, kv, tok, n, 0, lg, 1) ||
             write_all(f, lg, (size_t)n * V);
        for (int64_t d = 0; !rc && d < DECODE; d++) {
            const float *last = d == 0 ? lg + (size_t)(n - 1) * V : lg;
            int32_t best = 0;
            for (size_t v = 1; v < V; v++) best = last[v] > last[best] ? (int32_t)v : best;
            tok[n + d] = best;
            rc = ds_model_forward(m, kv, &tok[n + d], 1, n + d, lg, 0) || write_all(f, lg, V);
        }
        ds_kv_close(kv);
        free(tok);
        free(lg);
        total += (size_t)n;
    }
    /* every prompt in one paged batch (block size 4), logits at each prompt's last token */
    if (!rc) {
        all_tok = malloc(total * sizeof(int32_t));
        all_pos = malloc(total * sizeof(int32_t));
        all_seq = malloc(total * sizeof(int32_t));
        lidx = malloc(np * sizeof(int32_t));
        tables = malloc(np * MAXB * sizeof(int32_t));
        size_t k = 0;
        for (size_t p = 0; p < np; p++) {
            json_t *ids = json_object_get(json_array_get(prompts, p), "ids");
            for (size_t i = 0; i < json_array_size(ids); i++, k++) {
                all_tok[k] = (int32_t)json_integer_value(json_array_get(ids, i));
                all_pos[k] = (int32_t)i;
                all_seq[k] = (int32_t)p;
            }
            lidx[p] = (int32_t)k - 1;
            for (int b = 0; b < MAXB; b++) tables[p * MAXB + b] = (int32_t)(p * MAXB + b);
        }
        ds_kv_cache *kv = NULL;
        float *lg = malloc(np * V * sizeof *lg);
        int32_t *am = malloc(np * sizeof *am);
        ds_batch b = {(int32_t)total, all_tok, all_pos,     all_seq, (int32_t)np,
                      MAXB,           tables,  (int32_t)np, lidx};
        rc = ds_kv_open_paged(c, (int64_t)np * MAXB, BS, DS_KV_BF16, &kv) ||
             ds_model_forward_batch(m, kv, &b, lg, am) || write_all(f, lg, np * V);
        for (size_t p = 0; !rc && p < np; p++) /* the gathered rows' argmax */
            if (am[p] != ds_kernels_get()->argmax_f32(lg + p * V, V)) {
                fprintf(stderr, "rank 0: prompt %zu's argmax %d is not its logits'\n", p, am[p]);
                rc = 1;
            }
        ds_kv_close(kv);
        free(lg);
        free(am);
    }
    if (rc) fprintf(stderr, "rank 0: %s\n", ds_err_msg());
    free(all_tok), free(all_pos), free(all_seq), free(lidx), free(tables);
    if (f && fclose(f)) rc = 1;
    json_decref(g);
    ds_model_close(m);
    ds_dist_finalize();
    return rc ? 1 : 0;
}

/* ---- the driver ---- */

static const char *self_path;

/* "mpirun ... -np N" for N ranks on this machine (oversubscribed: CI has 2 cores). */
static void mpirun_prefix(char *buf, size_t cap, int n) {
    snprintf(buf, cap, "mpirun --oversubscribe -np %d", n);
}

/* One process against `from`..3 ranks. */
static void check_logits(const char *tmp, const char *name, const char *model, int from) {
    char cmd[8192], f1[4096], fn[4096], pre[256];
    snprintf(f1, sizeof f1, "%s/%s-1.bin", tmp, name);
    snprintf(cmd, sizeof cmd, "%s --rank %s %s", self_path, model, f1);
    int st;
    free(ds_test_run(cmd, &st));
    CHECK_MSG(st == 0, "%s: one process failed", name);
    size_t n1 = 0, nn = 0;
    char *one = ds_test_read_file(f1, &n1);
    CHECK_MSG(one && n1 > 1000, "%s: no logits from one process", name);
    for (int ranks = from; ranks <= 3; ranks++) {
        snprintf(fn, sizeof fn, "%s/%s-%d.bin", tmp, name, ranks);
        mpirun_prefix(pre, sizeof pre, ranks);
        snprintf(cmd, sizeof cmd, "%s %s --rank %s %s 2>&1", pre, self_path, model, fn);
        char *log = ds_test_run(cmd, &st);
        CHECK_MSG(st == 0, "%s: %d ranks failed:\n%s", name, ranks, log ? log : "");
        free(log);
        char *many = ds_test_read_file(fn, &nn);
        CHECK_MSG(many && nn == n1, "%s: %d ranks wrote %zu bytes, one process %zu", name, ranks,
                  nn, n1);
        if (one && many && nn == n1) {
            const float *a = (const float *)one, *b = (const float *)many;
            double worst = 0;
            size_t differ = 0;
            for (size_t i = 0; i < n1 / sizeof(float); i++) {
                double d = fabs((double)a[i] - (double)b[i]);
                differ += memcmp(&a[i], &b[i], sizeof(float)) != 0;
                worst = d > worst ? d : worst;
            }
            CHECK_MSG(differ == 0, "%s: %d ranks: %zu of %zu logits differ (max %.3g)", name, ranks,
                      differ, n1 / sizeof(float), worst);
            printf("%s: %d ranks: %zu logits bit-identical to one process\n", name, ranks,
                   differ ? 0 : n1 / sizeof(float));
        }
        free(many);
    }
    free(one);
}

static void check_engine(const char *tmp, const char *model) {
    char batch[4096], cmd[16384], pre[256];
    snprintf(batch, sizeof batch, "%s/batch.jsonl", tmp);
    FILE *f = fopen(batch, "w");
    fputs("{\"prompt\":\"Hello\",\"max_tokens\":12}\n"
          "{\"prompt\":\"The capital of France is\",\"max_tokens\":10,\"temperature\":0.8,"
          "\"seed\":7}\n"
          "{\"prompt\":\"1, 2, 3, 4,\",\"max_tokens\":9,\"temperature\":1.2,\"top_p\":0.9,"
          "\"seed\":-9223372036854775808}\n"
          "{\"prompt_ids\":[0,100,200,300,400,500,600,700,800,900,1000],\"max_tokens\":5}\n",
          f);
    fclose(f);
    int s1, s3;
    snprintf(cmd, sizeof cmd, "%s generate --model %s --batch-file %s --block-size 4", DSINFER_BIN,
             model, batch);
    char *one = ds_test_run(cmd, &s1);
    mpirun_prefix(pre, sizeof pre, 3);
    snprintf(cmd, sizeof cmd, "%s %s generate --model %s --batch-file %s --block-size 4", pre,
             DSINFER_BIN, model, batch);
    char *three = ds_test_run(cmd, &s3);
    CHECK(s1 == 0 && s3 == 0);
    CHECK_MSG(one && three && strlen(one) > 200 && !strcmp(one, three),
              "generate --batch-file: one process:\n%s\nthree ranks:\n%s", one ? one : "",
              three ? three : "");
    free(one);
    free(three);
}

static const char *const MPI2[] = {"mpirun",    "--oversubscribe", "-np", "2",
                                   DSINFER_BIN, "serve",           NULL};

/* The pid of rank r from the shard line each rank logs ("rank 1/2 ... pid N"). */
static int rank_pid(const srv_proc *s, int r) {
    char *log = srv_log(s), key[32];
    snprintf(key, sizeof key, "rank %d/", r);
    const char *p = log ? strstr(log, key) : NULL, *q = p ? strstr(p, "pid ") : NULL;
    int pid = q ? atoi(q + 4) : 0;
    free(log);
    return pid;
}

static void check_serve(const char *model) {
    char cmd[8192];
    snprintf(cmd, sizeof cmd,
             "%s generate --model %s --prompt 'The quick brown fox' --max-tokens 12 --output text "
             "2>/dev/null",
             DSINFER_BIN, model);
    char *want = ds_test_run(cmd, NULL);
    srv_proc s;
    const char *args[] = {"--tensor-parallel-size", "2", NULL};
    CHECK(srv_start_with(&s, MPI2, model, args) == 0);
    srv_resp r = srv_post(s.port, "/v1/completions",
                          "{\"prompt\":\"The quick brown fox\",\"max_tokens\":12,"
                          "\"temperature\":0}");
    json_t *j = r.body ? json_loads(r.body, 0, NULL) : NULL;
    const char *text = json_string_value(
        json_object_get(json_array_get(json_object_get(j, "choices"), 0), "text"));
    size_t wl = want ? strlen(want) : 0;
    while (wl && want[wl - 1] == '\n') want[--wl] = 0; /* generate ends with a newline */
    CHECK_MSG(r.status == 200 && text && want && !strcmp(text, want),
              "serve under mpirun -np 2: %d '%s', one process '%s'", r.status, text ? text : "",
              want ? want : "");
    json_decref(j);
    srv_resp_free(&r);
    CHECK_MSG(srv_stop_sig(&s, SIGUSR1, 30) == 0,
              "mpirun -np 2 serve: SIGUSR1 (forwarded by mpirun) stops every rank, status 0");
    free(want);
}

typedef struct {
    int port, status;
} burst_req;

static void *burst_one(void *arg) {
    burst_req *b = arg;
    srv_resp r = srv_post(b->port, "/v1/completions",
                          "{\"prompt\":\"Hello world\",\"max_tokens\":200,\"temperature\":0,"
                          "\"ignore_eos\":true}");
    b->status = r.status;
    srv_resp_free(&r);
    return NULL;
}

/* A burst of long requests; `fault` is done to rank 1 once they run; every request must get an
 * answer (200 if it finished first, else 503) and the job must end non-zero in time. */
static void check_fault(const char *model, int sig, const char *timeout, const char *expect) {
    srv_proc s;
    const char *args[] = {"--dist-timeout", timeout, "--max-model-len", "256", NULL};
    if (srv_start_with(&s, MPI2, model, args)) {
        CHECK_MSG(0, "mpirun -np 2 serve did not start");
        return;
    }
    int pid = rank_pid(&s, 1);
    CHECK_MSG(pid > 0, "rank 1's pid is in the log");
    enum { N = 24 };
    burst_req b[N];
    pthread_t th[N];
    for (int i = 0; i < N; i++) {
        b[i] = (burst_req){s.port, 0};
        pthread_create(&th[i], NULL, burst_one, &b[i]);
    }
    srv_sleep_ms(300);
    double t0 = srv_now();
    if (pid > 0) kill(pid, sig);
    int n503 = 0, n200 = 0;
    for (int i = 0; i < N; i++) {
        pthread_join(th[i], NULL);
        n503 += b[i].status == 503;
        n200 += b[i].status == 200;
    }
    double answered = srv_now() - t0;
    int st;
    pid_t w = 0;
    while (srv_now() - t0 < 20 && (w = waitpid(s.pid, &st, WNOHANG)) == 0) srv_sleep_ms(50);
    double ended = srv_now() - t0;
    if (w != s.pid) kill(s.pid, SIGKILL), waitpid(s.pid, &st, 0);
    if (pid > 0 && sig == SIGSTOP) kill(pid, SIGKILL);
    char *log = srv_log(&s);
    printf("rank 1 %s: %d x 503, %d x 200 in %.1f s; mpirun ended after %.1f s\n",
           sig == SIGKILL ? "killed" : "stopped", n503, n200, answered, ended);
    CHECK_MSG(n503 + n200 == N && n503 > 0, "%d of %d answered 503, %d 200", n503, N, n200);
    CHECK_MSG(w == s.pid && !(WIFEXITED(st) && WEXITSTATUS(st) == 0),
              "mpirun must end non-zero within 20 s");
    CHECK_MSG(log && strstr(log, expect), "rank 0's log names the failure ('%s'):\n%s", expect,
              log ? log : "");
    free(log);
    unlink(s.log);
}

/* dsinfer launch: the mpirun line it builds, then a real launch over localhost twice. */
static void check_launch(const char *model) {
    char cmd[8192];
    snprintf(cmd, sizeof cmd,
             "%s launch --hosts n1,n2,n3 --iface eth1 --dry-run /m --port 8000 "
             "--served-model-name \"r1 w4a8\"",
             DSINFER_BIN);
    int st;
    char *line = ds_test_run(cmd, &st);
    CHECK(st == 0 && line);
    if (line) {
        CHECK_MSG(strstr(line, "mpirun ") == line, "%s", line);
        CHECK_MSG(strstr(line, " -np 3 --host n1,n2,n3 "), "%s", line);
        CHECK_MSG(strstr(line, "btl_tcp_if_include eth1") &&
                      strstr(line, "oob_tcp_if_include eth1"),
                  "%s", line);
        CHECK_MSG(strstr(line, " serve /m --tensor-parallel-size 3 --port 8000 "
                               "--served-model-name 'r1 w4a8'"),
                  "%s", line);
        CHECK_MSG(!!strstr(line, "--allow-run-as-root") == (geteuid() == 0), "%s", line);
    }
    free(line);
    snprintf(cmd, sizeof cmd, "%s launch --hosts a,b /m --tensor-parallel-size 3 2>&1",
             DSINFER_BIN);
    free(ds_test_run(cmd, &st));
    CHECK_MSG(st == 2, "launch refuses its own --tensor-parallel-size");

    const char *const launch[] = {DSINFER_BIN, "launch", "--hosts", "localhost,localhost", NULL};
    srv_proc s;
    CHECK(srv_start_with(&s, launch, model, NULL) == 0);
    srv_resp r = srv_post(s.port, "/v1/completions", "{\"prompt\":\"Hi\",\"max_tokens\":4}");
    CHECK_MSG(r.status == 200, "launch: completion %d", r.status);
    srv_resp_free(&r);
    char *log = srv_log(&s);
    CHECK_MSG(log && strstr(log, "rank 1/2"), "launch started two ranks:\n%s", log ? log : "");
    free(log);
    CHECK_MSG(srv_stop(&s) == 0, "SIGTERM to launch: a graceful stop of every rank, status 0");
}

int main(int argc, char **argv) {
    if (argc == 4 && !strcmp(argv[1], "--rank")) return rank_main(argv[2], argv[3]);
    self_path = argv[0];
    const char *fx = ds_test_fixtures();
    if (!fx) return ds_test_skip_or_fail("fixtures missing");
    if (!ds_dist_available()) return ds_test_skip_or_fail("this build has no MPI");
    int st;
    free(ds_test_run("mpirun --version >/dev/null 2>&1", &st));
    if (st != 0) return ds_test_skip_or_fail("mpirun not found (apt-get install openmpi-bin)");
    /* OpenMPI's own allocations at exit read as leaks to LeakSanitizer (ASan stage) */
    const char *asan = getenv("ASAN_OPTIONS");
    char asan_opts[1024];
    snprintf(asan_opts, sizeof asan_opts, "%s%sdetect_leaks=0", asan ? asan : "",
             asan && *asan ? ":" : "");
    setenv("ASAN_OPTIONS", asan_opts, 1);
    if (geteuid() == 0) { /* OpenMPI refuses root unless told */
        setenv("OMPI_ALLOW_RUN_AS_ROOT", "1", 1);
        setenv("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1", 1);
    }
    signal(SIGPIPE, SIG_IGN);
    char *tmp = ds_test_tmpdir(), model[4096], fp8[4096], q[4096], cmd[16384];
    snprintf(model, sizeof model, "%s/tiny-a", fx);
    snprintf(fp8, sizeof fp8, "%s/tiny-a-fp8", fx);
    check_logits(tmp, "bf16", model, 2);
    check_logits(tmp, "fp8", fp8, 2);
    const char *schemes[] = {"w8a8", "w4a8"};
    for (int i = 0; i < 2; i++) {
        snprintf(q, sizeof q, "%s/%s", tmp, schemes[i]);
        snprintf(cmd, sizeof cmd, "%s quantize %s %s --scheme %s 2>&1", DSINFER_BIN, model, q,
                 schemes[i]);
        free(ds_test_run(cmd, &st));
        CHECK_MSG(st == 0, "quantize %s", schemes[i]);
        check_logits(tmp, schemes[i], q, 2);
    }
    /* the foreign layouts whose binding slices by rank differently, on 3 ranks (uneven
     * shares): static W8A8 (per-row bias and deq_scale read at row0 + r, anti-outlier norm
     * biases), MindSpore's stacked experts, split kv_b and rope rows (tests/formats) */
    const fmtgen_kind kinds[] = {FMTGEN_MODELSLIM_W8A8, FMTGEN_MS_A8W4};
    int32_t ids[12];
    for (int i = 0; i < 12; i++) ids[i] = (int32_t)(i * 7919 % 128000);
    const int32_t *pr[1] = {ids};
    const int64_t len[1] = {12};
    for (size_t i = 0; i < sizeof kinds / sizeof *kinds; i++) {
        char ref[4200];
        snprintf(q, sizeof q, "%s/%s", tmp, fmtgen_kind_name(kinds[i]));
        snprintf(ref, sizeof ref, "%s-ref", q);
        CHECK_MSG(fmtgen_write(kinds[i], model, q, ref, pr, len, 1) == 0, "%s", q);
        check_logits(tmp, fmtgen_kind_name(kinds[i]), q, 3);
    }
    check_engine(tmp, model);
    check_serve(model);
    check_launch(model);
    check_fault(model, SIGKILL, "300", "rank 1 (pid");
    check_fault(model, SIGSTOP, "2", "waited");
    ds_test_rmtree(tmp);
    free(tmp);
    return ds_test_finish("test_dist");
}
