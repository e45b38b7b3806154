/* dist: the ranks of a multi-node run (MPI), behind a few collectives.
 *
 * One process per node (or per NUMA domain), started by mpirun. Rank 0 runs the command (HTTP,
 * scheduler, sampler); every rank runs the forward pass on its shard of the weights (see
 * src/model/shard.c and docs/deploy.md). Without mpirun, or in a build without MPI, there is one
 * rank and every collective is a copy or a no-op, so callers need no special case.
 *
 * The state is process-wide, like MPI's own. Calls come from one thread at a time (the engine
 * thread or main), which is what MPI_THREAD_SERIALIZED promises.
 *
 * Failure: every operation that waits for other ranks gives up after the timeout
 * (ds_dist_set_timeout) with DS_ERR_TIMEOUT and a message; after that the run is marked broken
 * and every later operation fails at once with DS_ERR_CLOSED, so that rank 0 can answer its
 * clients and exit instead of hanging on a rank that died. */
#ifndef DS_DIST_H
#define DS_DIST_H

#include "core/core.h"

#include <stddef.h>
#include <stdint.h>

/* Starts MPI when this process was launched by mpirun (OpenMPI's OMPI_COMM_WORLD_SIZE or PMIx's
 * PMIX_RANK in the environment); otherwise one rank. Refuses (DS_ERR_UNSUPPORTED) a launch of
 * several ranks in a build without MPI, rather than running N unrelated copies. Idempotent. */
int ds_dist_init(int *argc, char ***argv);
/* MPI_Finalize when MPI was started; idempotent. */
void ds_dist_finalize(void);
/* Ends every rank at once (MPI_Abort) with this exit status; one rank: exit(code). */
DS_NORETURN void ds_dist_abort(int code);

int ds_dist_rank(void);
int ds_dist_size(void);
/* Ranks on this node (mpirun's local size), for sizing thread pools; 1 without MPI. */
int ds_dist_local_size(void);
/* Whether this build can run several ranks. */
int ds_dist_available(void);

/* Seconds a rank waits for the others in one operation before giving up (default 300;
 * <= 0 waits forever). */
void ds_dist_set_timeout(double seconds);
/* 1 after an operation failed or timed out: the ranks can no longer agree on anything. */
int ds_dist_broken(void);

/* Seconds this rank has spent waiting in operations (not counting a follower's wait for the
 * next step) and how many there were: the communication share of a step, for benchmarks. */
void ds_dist_wait_stats(double *seconds, uint64_t *ops);

/* Elementwise sum over all ranks, in place, every rank gets the result. */
int ds_dist_allreduce_sum_f32(float *buf, size_t n);
/* Elementwise max over all ranks of int64 values, in place (agreeing on error codes). */
int ds_dist_allreduce_max_i64(int64_t *buf, size_t n);
/* buf (bytes) from root to every rank. wait_forever ignores the timeout: a follower waiting
 * for rank 0's next step may wait as long as the server is idle. */
int ds_dist_bcast(void *buf, size_t bytes, int root, int wait_forever);
/* Rank r's counts[r] floats, concatenated in rank order into out on every rank. */
int ds_dist_allgatherv_f32(const float *mine, float *out, const int *counts);
/* Same, into root's out only. */
int ds_dist_gatherv_f32(const float *mine, float *out, const int *counts, int root);
/* Every rank's `bytes` bytes, concatenated in rank order into out on root (out may be NULL
 * elsewhere). */
int ds_dist_gather(const void *mine, size_t bytes, void *out, int root);
/* Point to point, floats. */
int ds_dist_send_f32(const float *buf, size_t n, int to);
int ds_dist_recv_f32(float *buf, size_t n, int from);

#endif
