/* MPI underneath dist.h, or one rank when the build has no MPI (DS_HAVE_MPI unset).
 *
 * Every wait is a non-blocking operation polled against a deadline instead of a blocking MPI
 * call, because a blocking collective with a dead peer never returns: OpenMPI's mpirun does
 * kill the job when a rank dies, but a rank that hangs (a stopped process, a network that
 * drops packets) would leave rank 0 and its HTTP clients waiting forever. The poll spins for a
 * short while (steps are milliseconds apart in decode) and then yields the core, since with
 * several ranks on one machine a spinning waiter takes the core its peer needs. */
#include "dist/dist.h"

#include <errno.h>
#include <limits.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* Where each rank runs, so that a waiting rank can tell a peer on its own node has exited. */
typedef struct {
    int pid;
    char host[60];
} peer;

static struct {
    int init, mpi, rank, size, local_size, broken;
    _Atomic long timeout_ms; /* read by the waiting thread, set from any */
    peer *peers;             /* [size] */
    double wait_s;           /* ds_dist_wait_stats */
    uint64_t wait_ops;
} g = {.size = 1, .local_size = 1, .timeout_ms = 300000};

static int launched_by_mpirun(void) {
    return getenv("OMPI_COMM_WORLD_SIZE") || getenv("PMIX_RANK") || getenv("PMI_SIZE");
}

int ds_dist_rank(void) {
    return g.rank;
}
int ds_dist_size(void) {
    return g.size;
}
int ds_dist_local_size(void) {
    return g.local_size;
}
void ds_dist_set_timeout(double seconds) {
    atomic_store(&g.timeout_ms, seconds > 0 ? (long)(seconds * 1000) : 0);
}
int ds_dist_broken(void) {
    return g.broken;
}
void ds_dist_wait_stats(double *seconds, uint64_t *ops) {
    *seconds = g.wait_s;
    *ops = g.wait_ops;
}

#ifdef DS_HAVE_MPI
#include <mpi.h>

int ds_dist_available(void) {
    return 1;
}

int ds_dist_init(int *argc, char ***argv) {
    if (g.init) return DS_OK;
    g.init = 1;
    if (!launched_by_mpirun()) return DS_OK;
    int provided = 0;
    if (MPI_Init_thread(argc, argv, MPI_THREAD_SERIALIZED, &provided) != MPI_SUCCESS)
        return ds_err_set(DS_ERR_IO, "MPI_Init_thread failed");
    g.mpi = 1;
    if (provided < MPI_THREAD_SERIALIZED) {
        ds_dist_finalize();
        return ds_err_set(DS_ERR_UNSUPPORTED,
                          "this MPI library gives thread level %d; dsinfer needs "
                          "MPI_THREAD_SERIALIZED (the engine thread makes the calls)",
                          provided);
    }
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
    MPI_Comm_rank(MPI_COMM_WORLD, &g.rank);
    MPI_Comm_size(MPI_COMM_WORLD, &g.size);
    g.peers = calloc((size_t)g.size, sizeof *g.peers);
    if (g.peers) {
        peer me = {.pid = (int)getpid()};
        gethostname(me.host, sizeof me.host - 1);
        if (MPI_Allgather(&me, sizeof me, MPI_BYTE, g.peers, sizeof me, MPI_BYTE, MPI_COMM_WORLD) !=
            MPI_SUCCESS) {
            free(g.peers);
            g.peers = NULL;
        }
    }
    MPI_Comm node;
    if (MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &node) ==
        MPI_SUCCESS) {
        MPI_Comm_size(node, &g.local_size);
        MPI_Comm_free(&node);
    }
    return DS_OK;
}

void ds_dist_finalize(void) {
    int done = 0;
    /* After a failure MPI_Finalize would wait on the operations a dead peer never finishes;
     * mpirun reports a rank that exits without it, and this one exits non-zero anyway. */
    if (g.mpi && !g.broken && MPI_Finalized(&done) == MPI_SUCCESS && !done) MPI_Finalize();
    g.mpi = 0;
    free(g.peers);
    g.peers = NULL;
}

void ds_dist_abort(int code) {
    if (g.mpi) MPI_Abort(MPI_COMM_WORLD, code);
    exit(code);
}

/* The first rank on this node whose process is gone, or -1. Remote ranks cannot be seen from
 * here; mpirun names those when their node reports them. */
static int dead_local_peer(void) {
    for (int r = 0; g.peers && r < g.size; r++) {
        if (r == g.rank || strcmp(g.peers[r].host, g.peers[g.rank].host)) continue;
        if (kill((pid_t)g.peers[r].pid, 0) != 0 && errno == ESRCH) return r;
    }
    return -1;
}

/* Polls req until done, the deadline passes (unless forever: a follower waiting for work) or
 * MPI reports an error. Every 100 ms it also looks for a peer on this node that has exited.
 * The timeout is re-read while waiting, so lowering it (serve does on SIGTERM) takes effect. */
static int wait_req(MPI_Request *req, const char *what, int forever) {
    if (g.broken)
        return ds_err_set(DS_ERR_CLOSED, "%s: an earlier operation between the ranks failed", what);
    double t0 = ds_now(), next_check = t0 + 0.1;
    for (long spins = 0;; spins++) {
        int done = 0, rc = MPI_Test(req, &done, MPI_STATUS_IGNORE);
        if (rc != MPI_SUCCESS) {
            char msg[MPI_MAX_ERROR_STRING];
            int len = 0;
            MPI_Error_string(rc, msg, &len);
            g.broken = 1;
            return ds_err_set(DS_ERR_IO, "%s failed on rank %d: %s", what, g.rank, msg);
        }
        if (done) {
            if (!forever) g.wait_s += ds_now() - t0, g.wait_ops++;
            return DS_OK;
        }
        if (spins < 20000) continue;
        double now = ds_now();
        if (now >= next_check) {
            next_check = now + 0.1;
            int dead = dead_local_peer();
            if (dead >= 0) {
                g.broken = 1;
                return ds_err_set(DS_ERR_CLOSED, "%s: rank %d (pid %d on %s) has exited", what,
                                  dead, g.peers[dead].pid, g.peers[dead].host);
            }
        }
        long limit = atomic_load(&g.timeout_ms);
        if (!forever && limit > 0 && (now - t0) * 1000 > (double)limit) {
            g.broken = 1;
            return ds_err_set(DS_ERR_TIMEOUT,
                              "%s: rank %d waited %.1f s for the other ranks (one died, hangs or "
                              "is unreachable; mpirun's log names a rank that exited)",
                              what, g.rank, now - t0);
        }
        if (spins < 40000) {
            sched_yield();
        } else {
            struct timespec ts = {0, 50000};
            nanosleep(&ts, NULL);
        }
    }
}

static int check_count(size_t n, const char *what) {
    if (n > INT_MAX) return ds_err_set(DS_ERR_RANGE, "%s: %zu elements is too many", what, n);
    return DS_OK;
}

#define START(call, what)                                                                          \
    do {                                                                                           \
        if (g.broken)                                                                              \
            return ds_err_set(DS_ERR_CLOSED, "%s: an earlier operation between the ranks failed",  \
                              what);                                                               \
        if ((call) != MPI_SUCCESS) {                                                               \
            g.broken = 1;                                                                          \
            return ds_err_set(DS_ERR_IO, "%s could not start on rank %d", what, g.rank);           \
        }                                                                                          \
    } while (0)

int ds_dist_allreduce_sum_f32(float *buf, size_t n) {
    if (!g.mpi || g.size == 1) return DS_OK;
    int rc = check_count(n, "allreduce");
    if (rc) return rc;
    MPI_Request r;
    START(MPI_Iallreduce(MPI_IN_PLACE, buf, (int)n, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD, &r),
          "allreduce");
    return wait_req(&r, "allreduce", 0);
}

int ds_dist_allreduce_max_i64(int64_t *buf, size_t n) {
    if (!g.mpi || g.size == 1) return DS_OK;
    int rc = check_count(n, "allreduce");
    if (rc) return rc;
    MPI_Request r;
    START(MPI_Iallreduce(MPI_IN_PLACE, buf, (int)n, MPI_INT64_T, MPI_MAX, MPI_COMM_WORLD, &r),
          "allreduce");
    return wait_req(&r, "allreduce", 0);
}

int ds_dist_bcast(void *buf, size_t bytes, int root, int wait_forever) {
    if (!g.mpi || g.size == 1) return DS_OK;
    int rc = check_count(bytes, "broadcast");
    if (rc) return rc;
    MPI_Request r;
    START(MPI_Ibcast(buf, (int)bytes, MPI_BYTE, root, MPI_COMM_WORLD, &r), "broadcast");
    return wait_req(&r, "broadcast", wait_forever);
}

/* Rank r's counts[r] floats, concatenated in rank order into out on root (-1: every rank). */
static int gatherv(const float *mine, float *out, const int *counts, int root) {
    if (!g.mpi || g.size == 1) {
        memmove(out, mine, (size_t)counts[0] * sizeof(float));
        return DS_OK;
    }
    int *displs = malloc((size_t)g.size * sizeof(int));
    if (!displs) return ds_err_set(DS_ERR_NOMEM, "out of memory (gather)");
    for (int r = 0, d = 0; r < g.size; d += counts[r], r++) displs[r] = d;
    MPI_Request req;
    int rc = root < 0 ? MPI_Iallgatherv(mine, counts[g.rank], MPI_FLOAT, out, counts, displs,
                                        MPI_FLOAT, MPI_COMM_WORLD, &req)
                      : MPI_Igatherv(mine, counts[g.rank], MPI_FLOAT, out, counts, displs,
                                     MPI_FLOAT, root, MPI_COMM_WORLD, &req);
    if (rc != MPI_SUCCESS) {
        free(displs);
        g.broken = 1;
        return ds_err_set(DS_ERR_IO, "gather could not start on rank %d", g.rank);
    }
    rc = wait_req(&req, "gather", 0);
    free(displs);
    return rc;
}

int ds_dist_allgatherv_f32(const float *mine, float *out, const int *counts) {
    return gatherv(mine, out, counts, -1);
}

int ds_dist_gatherv_f32(const float *mine, float *out, const int *counts, int root) {
    return gatherv(mine, out, counts, root);
}

int ds_dist_gather(const void *mine, size_t bytes, void *out, int root) {
    if (!g.mpi || g.size == 1) {
        memmove(out, mine, bytes);
        return DS_OK;
    }
    int rc = check_count(bytes, "gather");
    if (rc) return rc;
    MPI_Request r;
    START(MPI_Igather(mine, (int)bytes, MPI_BYTE, out, (int)bytes, MPI_BYTE, root, MPI_COMM_WORLD,
                      &r),
          "gather");
    return wait_req(&r, "gather", 0);
}

int ds_dist_send_f32(const float *buf, size_t n, int to) {
    int rc = check_count(n, "send");
    if (rc) return rc;
    MPI_Request r;
    START(MPI_Isend(buf, (int)n, MPI_FLOAT, to, 0, MPI_COMM_WORLD, &r), "send");
    return wait_req(&r, "send", 0);
}

int ds_dist_recv_f32(float *buf, size_t n, int from) {
    int rc = check_count(n, "receive");
    if (rc) return rc;
    MPI_Request r;
    START(MPI_Irecv(buf, (int)n, MPI_FLOAT, from, 0, MPI_COMM_WORLD, &r), "receive");
    return wait_req(&r, "receive", 0);
}

#else /* one rank */

int ds_dist_available(void) {
    return 0;
}

static int env_int(const char *name, int fallback) {
    const char *s = getenv(name);
    return s && *s ? atoi(s) : fallback;
}

int ds_dist_init(int *argc, char ***argv) {
    (void)argc, (void)argv;
    g.init = 1;
    if (launched_by_mpirun() && env_int("OMPI_COMM_WORLD_SIZE", env_int("PMI_SIZE", 1)) > 1)
        return ds_err_set(DS_ERR_UNSUPPORTED,
                          "started by mpirun with several ranks, but this dsinfer was built "
                          "without MPI (install libopenmpi-dev and rebuild)");
    return DS_OK;
}

void ds_dist_finalize(void) {}

void ds_dist_abort(int code) {
    exit(code);
}

int ds_dist_allreduce_sum_f32(float *buf, size_t n) {
    (void)buf, (void)n;
    return DS_OK;
}
int ds_dist_allreduce_max_i64(int64_t *buf, size_t n) {
    (void)buf, (void)n;
    return DS_OK;
}
int ds_dist_bcast(void *buf, size_t bytes, int root, int wait_forever) {
    (void)buf, (void)bytes, (void)root, (void)wait_forever;
    return DS_OK;
}
int ds_dist_allgatherv_f32(const float *mine, float *out, const int *counts) {
    memmove(out, mine, (size_t)counts[0] * sizeof(float));
    return DS_OK;
}
int ds_dist_gatherv_f32(const float *mine, float *out, const int *counts, int root) {
    (void)root;
    memmove(out, mine, (size_t)counts[0] * sizeof(float));
    return DS_OK;
}
int ds_dist_gather(const void *mine, size_t bytes, void *out, int root) {
    (void)root;
    memmove(out, mine, bytes);
    return DS_OK;
}
int ds_dist_send_f32(const float *buf, size_t n, int to) {
    (void)buf, (void)n;
    return ds_err_set(DS_ERR_ARG, "send to rank %d: there is only one rank", to);
}
int ds_dist_recv_f32(float *buf, size_t n, int from) {
    (void)buf, (void)n;
    return ds_err_set(DS_ERR_ARG, "receive from rank %d: there is only one rank", from);
}

#endif
